"""agent.spool: durable event queue, signed hash-chained batches, byte cap."""

from __future__ import annotations

import hashlib
import signal
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent import codec
from agent.errors import SpoolError
from agent.events import Action, Event, EventId, FileRef
from agent.signer import BATCH_DOMAIN, GENESIS_DIGEST, Signer
from agent.spool import SPOOL_FILE, SealedBatch, Spool
from exfilwatch.v1 import events_pb2 as pb

AGENT = "agent-1"
T0 = 1_700_000_000_000_000_000
SECOND = 1_000_000_000

OpenSpool = Callable[..., Spool]


def make_events(start: int, n: int, *, observed_at_ns: int = T0, pad: int = 0) -> list[Event]:
    return [
        Event(
            event_id=EventId(f"ev-{i}"),
            observed_at_ns=observed_at_ns,
            action=Action.COPY,
            host="ws-17",
            agent_version="0.1.0",
            source=FileRef(path=b"/srv/" + b"x" * pad),
        )
        for i in range(start, start + n)
    ]


def event_size(ev: Event) -> int:
    """Stored size of an event once the spool numbers it (seqs 1..127 encode alike)."""
    return len(codec.event_to_bytes(replace(ev, seq=1)))


def batch_events(batch: SealedBatch) -> list[Event]:
    return [codec.event_from_bytes(e.SerializeToString()) for e in pb_batch(batch).events]


def pb_batch(batch: SealedBatch) -> pb.EventBatch:
    return pb.EventBatch.FromString(batch.body)


@pytest.fixture
def signer() -> Signer:
    return Signer.generate()


@pytest.fixture
def spool_path(tmp_path: Path) -> Path:
    return tmp_path / SPOOL_FILE


@pytest.fixture
def open_spool(spool_path: Path, signer: Signer) -> Iterator[OpenSpool]:
    """Open a Spool on the test's file; every spool opened is closed at teardown."""
    opened: list[Spool] = []

    def _open(**kwargs: Any) -> Spool:
        kwargs.setdefault("agent_id", AGENT)
        kwargs.setdefault("signer", signer)
        spool = Spool.open(spool_path, **kwargs)
        opened.append(spool)
        return spool

    yield _open
    for spool in opened:
        spool.close()


def test_new_spool_is_empty_and_private(open_spool: OpenSpool, spool_path: Path) -> None:
    spool = open_spool()
    assert spool.depth() == (0, 0)
    assert spool.seal(T0) is None
    assert spool.next_unacked() is None
    assert spool.take_dropped() == 0
    assert stat.S_IMODE(spool_path.stat().st_mode) == 0o600


def test_append_assigns_monotonic_seqs_across_reopen(open_spool: OpenSpool) -> None:
    spool = open_spool()
    assert spool.append(make_events(0, 3)) == [1, 2, 3]
    assert spool.append(make_events(3, 2)) == [4, 5]
    assert spool.append([]) == []
    batch = spool.seal(T0)
    assert batch is not None
    spool.ack(batch.batch_seq)  # tables now empty: the sequence must come from meta
    spool.close()

    spool = open_spool()
    assert spool.append(make_events(5, 2)) == [6, 7]


def test_sealed_events_carry_their_assigned_seq(open_spool: OpenSpool) -> None:
    spool = open_spool()
    events = make_events(0, 3)
    spool.append(events)
    batch = spool.seal(T0)
    assert batch is not None
    assert batch_events(batch) == [replace(ev, seq=n) for n, ev in enumerate(events, start=1)]


def test_seal_builds_a_signed_genesis_batch(open_spool: OpenSpool, signer: Signer) -> None:
    spool = open_spool()
    spool.append(make_events(0, 4))
    batch = spool.seal(T0 + 5)
    assert batch is not None
    assert batch.batch_seq == 1
    assert batch.n_events == 4
    assert batch.digest == hashlib.sha256(batch.body).digest()
    assert batch.key_id == signer.key_id()
    Ed25519PublicKey.from_public_bytes(signer.public_key_raw()).verify(
        batch.signature, BATCH_DOMAIN + batch.body
    )
    msg = pb_batch(batch)
    assert (msg.agent_id, msg.batch_seq, msg.sealed_at_ns) == (AGENT, 1, T0 + 5)
    assert msg.prev_batch_digest == GENESIS_DIGEST
    assert spool.depth() == (0, 1)
    assert spool.next_unacked() == batch


def test_chain_links_batches_across_reopen_and_ack(open_spool: OpenSpool) -> None:
    spool = open_spool()
    spool.append(make_events(0, 2))
    first = spool.seal(T0)
    assert first is not None
    spool.ack(first.batch_seq)
    spool.close()

    spool = open_spool()
    spool.append(make_events(2, 2))
    second = spool.seal(T0 + SECOND)
    assert second is not None
    spool.close()

    spool = open_spool()
    spool.append(make_events(4, 1))
    third = spool.seal(T0 + 2 * SECOND)
    assert third is not None

    assert [b.batch_seq for b in (first, second, third)] == [1, 2, 3]
    assert pb_batch(second).prev_batch_digest == first.digest
    assert pb_batch(third).prev_batch_digest == second.digest
    assert spool.next_unacked() == second  # survived the reopen byte for byte


def test_seal_caps_events_per_batch(open_spool: OpenSpool) -> None:
    spool = open_spool()
    spool.append(make_events(0, 7))
    sizes = []
    while (batch := spool.seal(T0, max_events=3)) is not None:
        sizes.append(batch.n_events)
    assert sizes == [3, 3, 1]
    assert spool.depth() == (0, 3)


def test_seal_caps_event_bytes_per_batch(open_spool: OpenSpool) -> None:
    spool = open_spool()
    events = make_events(0, 5, pad=100)
    spool.append(events)
    one = event_size(events[0])
    batch = spool.seal(T0, max_bytes=2 * one + one // 2)
    assert batch is not None
    assert batch.n_events == 2
    assert [e.seq for e in batch_events(batch)] == [1, 2]
    assert spool.depth() == (3, 1)


def test_seal_takes_an_oversized_event_alone(open_spool: OpenSpool) -> None:
    spool = open_spool()
    spool.append(make_events(0, 2, pad=1000))
    batch = spool.seal(T0, max_bytes=10)
    assert batch is not None
    assert batch.n_events == 1
    assert spool.depth() == (1, 1)


def test_seal_rejects_non_positive_caps(open_spool: OpenSpool) -> None:
    with pytest.raises(ValueError, match="positive"):
        open_spool().seal(T0, max_events=0)


def test_ack_removes_and_next_unacked_is_the_lowest(open_spool: OpenSpool) -> None:
    spool = open_spool()
    batches = []
    for i in range(3):
        spool.append(make_events(i, 1))
        batch = spool.seal(T0)
        assert batch is not None
        batches.append(batch)
    assert spool.next_unacked() == batches[0]

    spool.ack(2)  # out of order: the collector may commit a later retry first
    assert spool.next_unacked() == batches[0]
    assert spool.depth() == (0, 2)
    spool.ack(1)
    assert spool.next_unacked() == batches[2]
    spool.ack(1)  # a repeated ack is harmless
    spool.ack(99)
    spool.ack(3)
    assert spool.next_unacked() is None
    assert spool.depth() == (0, 0)


def test_should_seal_on_count_bytes_and_age(open_spool: OpenSpool) -> None:
    spool = open_spool()
    assert not spool.should_seal(T0)
    spool.append(make_events(0, 2, observed_at_ns=T0))
    assert not spool.should_seal(T0 + SECOND - 1)
    assert spool.should_seal(T0 + SECOND)
    assert spool.should_seal(T0, max_events=2)
    assert not spool.should_seal(T0, max_events=3)
    assert spool.should_seal(T0, max_bytes=10)
    assert spool.should_seal(T0 + 10, max_age_ns=10)


def test_should_seal_when_the_clock_stepped_back(open_spool: OpenSpool) -> None:
    spool = open_spool()
    spool.append(make_events(0, 1, observed_at_ns=T0 + 3600 * SECOND))
    assert spool.should_seal(T0)


def test_byte_cap_drops_oldest_pending_and_counts(open_spool: OpenSpool) -> None:
    one = event_size(make_events(0, 1, pad=200)[0])
    spool = open_spool(max_bytes=5 * one)
    assert spool.append(make_events(0, 4, pad=200)) == [1, 2, 3, 4]
    assert spool.depth() == (4, 0)
    assert spool.append(make_events(4, 3, pad=200)) == [5, 6, 7]
    assert spool.depth() == (5, 0)

    batch = spool.seal(T0)
    assert batch is not None
    assert [e.seq for e in batch_events(batch)] == [3, 4, 5, 6, 7]
    assert spool.take_dropped() == 2
    assert spool.take_dropped() == 0


def test_dropped_count_survives_reopen(open_spool: OpenSpool) -> None:
    one = event_size(make_events(0, 1)[0])
    spool = open_spool(max_bytes=2 * one)
    spool.append(make_events(0, 5))
    spool.close()
    spool = open_spool(max_bytes=2 * one)
    assert spool.depth() == (2, 0)
    assert spool.take_dropped() == 3


def test_byte_cap_never_drops_sealed_batches(open_spool: OpenSpool) -> None:
    one = event_size(make_events(0, 1, pad=200)[0])
    spool = open_spool(max_bytes=3 * one)
    spool.append(make_events(0, 3, pad=200))
    sealed = spool.seal(T0)
    assert sealed is not None
    spool.append(make_events(3, 2, pad=200))  # the batch alone fills the cap
    assert spool.depth() == (0, 1)
    assert spool.take_dropped() == 2
    assert spool.next_unacked() == sealed


def test_events_survive_a_close_without_seal(open_spool: OpenSpool) -> None:
    spool = open_spool()
    events = make_events(0, 3)
    spool.append(events)
    spool.close()

    spool = open_spool()
    assert spool.depth() == (3, 0)
    batch = spool.seal(T0)
    assert batch is not None
    assert [e.event_id for e in batch_events(batch)] == [e.event_id for e in events]


_CRASH_SCRIPT = """
import os, signal, sys
from pathlib import Path
from agent.events import Action, Event, EventId
from agent.signer import Signer
from agent.spool import Spool

spool = Spool.open(Path(sys.argv[1]), agent_id="agent-1", signer=Signer.load(Path(sys.argv[2])))
spool.append([Event(EventId(f"ev-{i}"), 1, Action.COPY, "h", "v") for i in range(5)])
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.slow
def test_events_survive_kill_9_between_append_and_seal(
    tmp_path: Path, open_spool: OpenSpool, spool_path: Path, signer: Signer
) -> None:
    key = tmp_path / "agent.key"
    signer.save(key)
    proc = subprocess.run(
        [sys.executable, "-c", _CRASH_SCRIPT, str(spool_path), str(key)],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()

    spool = open_spool()
    assert spool.depth() == (5, 0)
    assert spool.append(make_events(100, 1)) == [6]


def test_a_second_open_while_in_use_is_refused(
    open_spool: OpenSpool, spool_path: Path, signer: Signer
) -> None:
    open_spool()
    with pytest.raises(SpoolError, match="locked"):
        Spool.open(spool_path, agent_id=AGENT, signer=signer)


def test_a_spool_of_another_agent_is_refused(open_spool: OpenSpool) -> None:
    open_spool().close()
    with pytest.raises(SpoolError, match="belongs to agent"):
        open_spool(agent_id="agent-2")


def test_duplicate_event_id_rolls_back_the_whole_append(open_spool: OpenSpool) -> None:
    spool = open_spool()
    spool.append(make_events(0, 1))
    with pytest.raises(SpoolError) as info:
        spool.append(make_events(1, 2) + make_events(0, 1))
    assert info.value.__cause__ is not None
    assert spool.depth() == (1, 0)
    assert spool.append(make_events(5, 1)) == [2]


def test_closed_spool_raises(open_spool: OpenSpool) -> None:
    spool = open_spool()
    spool.close()
    spool.close()
    with pytest.raises(SpoolError, match="closed"):
        spool.append(make_events(0, 1))


def test_unopenable_path_raises_spool_error(tmp_path: Path, signer: Signer) -> None:
    with pytest.raises(SpoolError):
        Spool.open(tmp_path / "missing" / SPOOL_FILE, agent_id=AGENT, signer=signer)


def test_concurrent_append_and_seal_lose_nothing(open_spool: OpenSpool) -> None:
    spool = open_spool()
    writers = 4
    per_writer = 50
    done = threading.Event()
    sealed: list[SealedBatch] = []

    def write(w: int) -> None:
        for i in range(per_writer):
            spool.append(make_events(w * 1000 + i, 1))

    def seal() -> None:
        while not done.is_set() or spool.depth()[0]:
            batch = spool.seal(T0, max_events=7)
            if batch is not None:
                sealed.append(batch)

    sealer = threading.Thread(target=seal)
    sealer.start()
    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    sealer.join()

    seqs = [e.seq for b in sealed for e in batch_events(b)]
    assert seqs == list(range(1, writers * per_writer + 1))
    assert [b.batch_seq for b in sealed] == list(range(1, len(sealed) + 1))
    for prev, nxt in pairwise(sealed):
        assert pb_batch(nxt).prev_batch_digest == prev.digest
