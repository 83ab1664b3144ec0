"""agent.spool: durable event queue, signed hash-chained batches, byte cap."""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import random
import shutil
import signal
import sqlite3
import stat
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent import codec
from agent.errors import SpoolError
from agent.events import Action, CoverageGap, Event, EventId, FileRef
from agent.signer import BATCH_DOMAIN, GENESIS_DIGEST, Signer
from agent.spool import SPOOL_FILE, SealedBatch, Spool
from exfilwatch.v1 import events_pb2 as pb
from tests.procs import Proc

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


LEVELS = ("public", "internal", "confidential", "secret")


def labelled(i: int, label: str, action: Action = Action.COPY) -> Event:
    """A file event whose stored size is the same whatever its label (for exact byte caps)."""
    pad = 20 - (len(label) + 2 if label else 0)  # an empty label is not encoded at all
    return Event(
        event_id=EventId(f"ev-{i:03d}"),
        observed_at_ns=T0,
        action=action,
        host="ws-17",
        agent_version="0.1.0",
        source=FileRef(path=b"/srv/" + b"x" * pad),
        label=label,
    )


def service_event(i: int, action: Action, gap: int = 0) -> Event:
    return Event(
        event_id=EventId(f"ev-{i:03d}"),
        observed_at_ns=T0,
        action=action,
        host="ws-17",
        agent_version="0.1.0",
        gap=CoverageGap("spool_dropped", gap) if gap else None,
    )


LABELLED_SIZE = event_size(labelled(1, ""))
assert {event_size(labelled(1, label)) for label in LEVELS} == {LABELLED_SIZE}


def pending_ids(spool: Spool) -> list[str]:
    """Ids of the pending events in seq order (seals them: call it last)."""
    batch = spool.seal(T0, max_events=10_000, max_bytes=1 << 30)
    return [] if batch is None else [e.event_id for e in batch_events(batch)]


# Appended in this order; the byte cap drops them in DROP_ORDER.
MIXED = [
    labelled(1, "secret"),
    labelled(2, "public"),
    labelled(3, "confidential"),
    labelled(4, ""),
    labelled(5, "public", Action.MOVE),
    service_event(6, Action.COVERAGE_GAP, gap=3),
    labelled(7, "secret"),
    service_event(8, Action.AGENT_START),
    labelled(9, "confidential"),
    labelled(10, "public"),
    labelled(11, "internal", Action.DELETE),
    service_event(12, Action.AGENT_STOP),
]
DROP_ORDER = [
    "ev-004",
    "ev-002",
    "ev-005",
    "ev-010",
    "ev-011",
    "ev-003",
    "ev-009",
    "ev-001",
    "ev-007",
]


@pytest.mark.parametrize("k", range(len(DROP_ORDER) + 1))
def test_byte_cap_drops_unlabelled_then_by_label_then_oldest(open_spool: OpenSpool, k: int) -> None:
    sizes: dict[str, int] = {
        ev.event_id: len(codec.event_to_bytes(replace(ev, seq=n))) for n, ev in enumerate(MIXED, 1)
    }
    # Exactly the first k of the drop order must go to fit under this cap.
    cap = sum(sizes.values()) - sum(sizes[i] for i in DROP_ORDER[:k])
    spool = open_spool(max_bytes=cap, levels=LEVELS)
    assert spool.append(MIXED) == list(range(1, len(MIXED) + 1))
    assert spool.dropped() == k
    assert spool.depth() == (len(MIXED) - k, 0)
    assert pending_ids(spool) == [e.event_id for e in MIXED if e.event_id not in DROP_ORDER[:k]]


def test_gap_and_agent_events_are_never_dropped_even_over_the_cap(open_spool: OpenSpool) -> None:
    spool = open_spool(max_bytes=1, levels=LEVELS)
    spool.append(MIXED)
    spool.append([service_event(20 + i, Action.COVERAGE_GAP, gap=1) for i in range(3)])
    assert spool.dropped() == len(DROP_ORDER)
    assert pending_ids(spool) == ["ev-006", "ev-008", "ev-012", "ev-020", "ev-021", "ev-022"]


FILL = ["secret", "public", "confidential", "public", "confidential", "secret"]
VICTIMS = ["ev-002", "ev-004", "ev-003", "ev-005", "ev-001", "ev-006"]


@pytest.mark.parametrize("pushes", range(len(VICTIMS) + 1))
def test_a_full_spool_makes_room_public_then_confidential_then_secret(
    open_spool: OpenSpool, pushes: int
) -> None:
    spool = open_spool(max_bytes=len(FILL) * LABELLED_SIZE, levels=LEVELS)
    for i, label in enumerate(FILL, start=1):
        spool.append([labelled(i, label)])
    newer = [labelled(100 + i, "secret") for i in range(pushes)]
    for ev in newer:  # one at a time, as the pipeline appends
        spool.append([ev])
    assert spool.dropped() == pushes
    originals = [f"ev-{i:03d}" for i in range(1, len(FILL) + 1)]
    assert pending_ids(spool) == [
        *(i for i in originals if i not in VICTIMS[:pushes]),
        *(e.event_id for e in newer),
    ]


def test_an_event_below_everything_pending_is_the_one_dropped(open_spool: OpenSpool) -> None:
    spool = open_spool(max_bytes=3 * LABELLED_SIZE, levels=LEVELS)
    spool.append([labelled(i, "secret") for i in (1, 2, 3)])
    spool.append([labelled(4, "public")])
    spool.append([labelled(5, "")])
    assert spool.dropped() == 2
    assert pending_ids(spool) == ["ev-001", "ev-002", "ev-003"]


def test_labels_outside_the_levels_rank_above_them(open_spool: OpenSpool) -> None:
    spool = open_spool(max_bytes=2 * LABELLED_SIZE, levels=("public", "internal"))
    spool.append([labelled(1, "top-secret"), labelled(2, "internal"), labelled(3, "public")])
    assert pending_ids(spool) == ["ev-001", "ev-002"]


def test_without_levels_unlabelled_go_first_then_oldest(open_spool: OpenSpool) -> None:
    spool = open_spool(max_bytes=2 * LABELLED_SIZE)
    spool.append([labelled(1, "secret"), labelled(2, "public"), labelled(3, "")])
    assert spool.dropped() == 1
    spool.append([labelled(4, "public")])
    assert spool.dropped() == 2
    assert pending_ids(spool) == ["ev-002", "ev-004"]


def test_drops_are_reported_once_in_the_gap_events_own_transaction(
    open_spool: OpenSpool,
) -> None:
    spool = open_spool(max_bytes=2 * LABELLED_SIZE, levels=LEVELS)
    spool.append([labelled(i, "public") for i in range(1, 6)])
    assert spool.dropped() == spool.dropped() == 3  # peeking does not reset
    # The gap event itself needs room: it pushes out one more public event, which is
    # counted in the same transaction that consumes the three it reports.
    spool.append([service_event(10, Action.COVERAGE_GAP, gap=3)], reported_drops=3)
    assert spool.dropped() == 1

    with pytest.raises(ValueError, match="2"):
        spool.append([service_event(11, Action.COVERAGE_GAP, gap=2)], reported_drops=2)
    with pytest.raises(SpoolError):  # a failed append consumes nothing
        spool.append([service_event(10, Action.COVERAGE_GAP, gap=1)], reported_drops=1)
    with pytest.raises(ValueError, match="event"):
        spool.append([], reported_drops=1)
    assert spool.dropped() == 1
    assert spool.append([service_event(12, Action.COVERAGE_GAP, gap=1)], reported_drops=1) == [7]
    assert spool.dropped() == 1  # ev-005 made room for it
    assert pending_ids(spool) == ["ev-010", "ev-012"]


def test_levels_must_be_unique(spool_path: Path, signer: Signer) -> None:
    with pytest.raises(ValueError, match="unique"):
        Spool.open(spool_path, agent_id=AGENT, signer=signer, levels=("a", "a"))


_V1_SCHEMA = (
    "CREATE TABLE pending (seq INTEGER PRIMARY KEY, event_id TEXT NOT NULL UNIQUE,"
    " observed_at_ns INTEGER NOT NULL, body BLOB NOT NULL, size INTEGER NOT NULL)",
    "CREATE TABLE batches (batch_seq INTEGER PRIMARY KEY, body BLOB NOT NULL,"
    " signature BLOB NOT NULL, digest BLOB NOT NULL, key_id BLOB NOT NULL,"
    " n_events INTEGER NOT NULL)",
    "CREATE TABLE meta (id INTEGER PRIMARY KEY CHECK (id = 1), agent_id TEXT NOT NULL,"
    " next_event_seq INTEGER NOT NULL, next_batch_seq INTEGER NOT NULL,"
    " last_digest BLOB NOT NULL, dropped INTEGER NOT NULL)",
)


def test_a_version_1_spool_is_upgraded_and_its_events_ranked(
    open_spool: OpenSpool, spool_path: Path
) -> None:
    old = [labelled(1, "secret"), labelled(2, "public"), service_event(3, Action.AGENT_STOP)]
    with contextlib.closing(sqlite3.connect(spool_path)) as conn, conn:
        for statement in _V1_SCHEMA:
            conn.execute(statement)
        conn.executemany(
            "INSERT INTO pending VALUES (?, ?, ?, ?, ?)",
            [
                (n, ev.event_id, T0, body, len(body))
                for n, ev in enumerate(old, start=1)
                for body in [codec.event_to_bytes(replace(ev, seq=n))]
            ],
        )
        conn.execute("INSERT INTO meta VALUES (1, ?, 4, 1, ?, 2)", (AGENT, GENESIS_DIGEST))
        conn.execute("PRAGMA user_version = 1")

    spool = open_spool(max_bytes=3 * LABELLED_SIZE, levels=LEVELS)
    assert spool.depth() == (3, 0)
    assert spool.dropped() == 2
    assert spool.append([labelled(4, "confidential")]) == [4]
    assert spool.dropped() == 3
    assert pending_ids(spool) == ["ev-001", "ev-003", "ev-004"]


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


# Appends (mixed labels, over a small cap), seals, acks and drop reports in a loop, printing
# each step once it has returned, until the parent kills it.
_CHURN_SCRIPT = """
import sys
from pathlib import Path
from agent.events import Action, CoverageGap, Event, EventId, FileRef
from agent.signer import Signer
from agent.spool import Spool
from exfilwatch.v1.events_pb2 import EventBatch

LEVELS = ("public", "internal", "confidential", "secret")
spool = Spool.open(
    Path(sys.argv[1]), agent_id="agent-1", signer=Signer.load(Path(sys.argv[2])),
    max_bytes=int(sys.argv[3]), levels=LEVELS,
)
i = 0
while True:
    i += 1
    ev = Event(EventId(f"ev-{i}"), i, Action.COPY, "h", "v", source=FileRef(b"/x" * 40),
               label=(*LEVELS, "")[i % 5])
    print("appended", *spool.append([ev]), ".", flush=True)
    if i % 7 == 0:
        batch = spool.seal(i, max_events=5)
        if batch is not None:
            events = EventBatch.FromString(batch.body).events
            gaps = sum(e.gap.count for e in events)
            seqs = " ".join(str(e.seq) for e in events)
            print("sealed", batch.batch_seq, batch.digest.hex(), gaps, seqs, ".", flush=True)
    if i % 11 == 0:
        batch = spool.next_unacked()
        if batch is not None:
            spool.ack(batch.batch_seq)
    if i % 13 == 0 and (n := spool.dropped()):
        gap = Event(EventId(f"gap-{i}"), i, Action.COVERAGE_GAP, "h", "v",
                    gap=CoverageGap("spool_dropped", n))
        spool.append([gap], reported_drops=n)
"""


@dataclass(frozen=True)
class Printed:
    digest: bytes
    gaps: int
    seqs: tuple[int, ...]


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kill_9_at_a_random_moment_loses_nothing_and_miscounts_nothing(
    tmp_path: Path, open_spool: OpenSpool, spool_path: Path, signer: Signer, seed: int
) -> None:
    """Every seq ever assigned is exactly once pending, sealed, acknowledged, or dropped;
    and the drops equal the counts reported in gap events plus the count still owed."""
    key = tmp_path / "agent.key"
    signer.save(key)
    kill_after = random.Random(seed).randrange(50, 600)  # appends before the kill
    proc = Proc(
        [sys.executable, "-c", _CHURN_SCRIPT, str(spool_path), str(key), "6000"],
        tmp_path / "churn.log",
    )
    proc.wait_line(f"appended {kill_after}", timeout=60)
    assert proc.stop(signal.SIGKILL) == -signal.SIGKILL
    lines = whole_lines([*proc.seen, *drain(proc.lines)])
    last_returned = max(int(w[1]) for w in lines if w[0] == "appended")
    sealed = {
        int(w[1]): Printed(bytes.fromhex(w[2]), int(w[3]), tuple(map(int, w[4:])))
        for w in lines
        if w[0] == "sealed"
    }

    spool = open_spool(max_bytes=1 << 30, levels=LEVELS)
    owed = spool.dropped()
    next_seq = spool.append([labelled(0, "secret")])[0]
    assert last_returned < next_seq, "an append that returned was lost"
    remaining: list[SealedBatch] = []
    while (batch := spool.next_unacked()) is not None:
        remaining.append(batch)
        spool.ack(batch.batch_seq)
    tail = spool.seal(T0, max_events=10_000, max_bytes=1 << 30)
    assert tail is not None
    in_spool = [e for b in remaining for e in batch_events(b)] + batch_events(tail)[:-1]

    # Acked batches are the lowest; each was printed when sealed (before any ack).
    first_left = remaining[0].batch_seq if remaining else max(sealed, default=0) + 1
    acked = [sealed[n] for n in range(1, first_left)]
    for batch in remaining:  # the chain goes on unbroken from the last acked batch
        before = sealed.get(batch.batch_seq - 1)
        assert pb_batch(batch).prev_batch_digest == (before.digest if before else GENESIS_DIGEST)
        if batch.batch_seq in sealed:
            assert batch.digest == sealed[batch.batch_seq].digest

    seqs = [s for b in acked for s in b.seqs] + [e.seq for e in in_spool]
    assert len(seqs) == len(set(seqs)), "an event is in two places"
    dropped = set(range(1, next_seq)) - set(seqs)
    reported = sum(b.gaps for b in acked) + sum(e.gap.count for e in in_spool if e.gap)
    assert len(dropped) == reported + owed
    assert dropped, "the cap should have dropped something (test too gentle)"


def whole_lines(lines: list[str]) -> list[list[str]]:
    """The words of each line the child finished (ending in "."), without the marker.

    A kill -9 or a power cut can tear the last line anywhere, even between words."""
    return [w[:-1] for w in map(str.split, lines) if len(w) > 1 and w[-1] == "."]


def drain(q: queue.Queue[str]) -> Iterator[str]:
    while True:
        try:
            yield q.get_nowait()
        except queue.Empty:
            return


# Power loss, simulated: an LD_PRELOAD shim journals, for files under POWERCUT_DIR, the bytes
# and size each write or truncate replaces, and each fsync/fdatasync. `power_cut` then undoes,
# per file, every change after its last sync: what a disk that lost all unsynced writes holds.
_POWERCUT_C = r"""
/* For files under $POWERCUT_DIR, every write and truncate first appends the bytes and the
 * size it replaces to $POWERCUT_LOG; fsync/fdatasync append a sync mark. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#define MAX_FD 4096
static char *paths[MAX_FD];
static int logfd = -1;

static ssize_t (*real_pwrite64)(int, const void *, size_t, off_t);
static ssize_t (*real_pread64)(int, void *, size_t, off_t);
static ssize_t (*real_write)(int, const void *, size_t);
static int (*real_open64)(const char *, int, ...);
static int (*real_ftruncate64)(int, off_t);

static void init(void) {
    if (real_pwrite64) return;
    real_pwrite64 = dlsym(RTLD_NEXT, "pwrite64");
    real_pread64 = dlsym(RTLD_NEXT, "pread64");
    real_write = dlsym(RTLD_NEXT, "write");
    real_open64 = dlsym(RTLD_NEXT, "open64");
    real_ftruncate64 = dlsym(RTLD_NEXT, "ftruncate64");
}

static void put(const void *p, size_t n) {
    const char *c = p;
    while (n) { ssize_t k = real_write(logfd, c, n); if (k <= 0) abort(); c += k; n -= (size_t)k; }
}

/* record: char kind; u16 pathlen; path; i64 off; i64 oldsize; u32 n; n bytes */
static void record(char kind, int fd, int64_t off, int64_t oldsize, const void *old, uint32_t n) {
    if (logfd < 0) {
        const char *log = getenv("POWERCUT_LOG");
        if (!log) abort();
        logfd = real_open64(log, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
        if (logfd < 0) abort();
    }
    uint16_t len = (uint16_t)strlen(paths[fd]);
    size_t total = 1 + 2 + len + 8 + 8 + 4 + n;
    char *buf = malloc(total), *p = buf;
    if (!buf) abort();
    *p++ = kind;
    memcpy(p, &len, 2); p += 2;
    memcpy(p, paths[fd], len); p += len;
    memcpy(p, &off, 8); p += 8;
    memcpy(p, &oldsize, 8); p += 8;
    memcpy(p, &n, 4); p += 4;
    if (n) memcpy(p, old, n);
    put(buf, total);  /* the change itself is made only after this returns */
    free(buf);
}

static void track(int fd, const char *path) {
    const char *dir = getenv("POWERCUT_DIR");
    if (fd < 0 || fd >= MAX_FD) return;
    free(paths[fd]); paths[fd] = NULL;
    if (dir && strncmp(path, dir, strlen(dir)) == 0) paths[fd] = strdup(path);
}

static void before_change(char kind, int fd, int64_t off, int64_t end) {
    struct stat st;
    if (fd < 0 || fd >= MAX_FD || !paths[fd]) return;
    if (fstat(fd, &st) != 0) abort();
    int64_t size = st.st_size, from = off, to = end < size ? end : size;
    uint32_t n = to > from ? (uint32_t)(to - from) : 0;
    char *old = n ? malloc(n) : NULL;
    if (n && real_pread64(fd, old, n, from) != (ssize_t)n) abort();
    record(kind, fd, off, size, old, n);
    free(old);
}

static int do_open(const char *path, int flags, mode_t mode) {
    init();
    int fd = real_open64(path, flags, mode);
    track(fd, path);
    return fd;
}
int open(const char *path, int flags, ...) {
    va_list ap; va_start(ap, flags); mode_t m = va_arg(ap, int); va_end(ap);
    return do_open(path, flags, m);
}
int open64(const char *path, int flags, ...) {
    va_list ap; va_start(ap, flags); mode_t m = va_arg(ap, int); va_end(ap);
    return do_open(path, flags, m);
}
ssize_t pwrite64(int fd, const void *buf, size_t n, off_t off) {
    init(); before_change('W', fd, off, off + (int64_t)n); return real_pwrite64(fd, buf, n, off);
}
ssize_t pwrite(int fd, const void *buf, size_t n, off_t off) { return pwrite64(fd, buf, n, off); }
ssize_t write(int fd, const void *buf, size_t n) {
    init();
    if (fd >= 0 && fd < MAX_FD && paths[fd]) {
        off_t off = lseek(fd, 0, SEEK_CUR);
        before_change('W', fd, off, off + (int64_t)n);
    }
    return real_write(fd, buf, n);
}
int ftruncate64(int fd, off_t len) {
    init(); before_change('T', fd, len, INT64_MAX); return real_ftruncate64(fd, len);
}
int ftruncate(int fd, off_t len) { return ftruncate64(fd, len); }
static void synced(int fd) {
    if (fd >= 0 && fd < MAX_FD && paths[fd]) record('S', fd, 0, 0, NULL, 0);
}
static int do_sync(const char *name, int fd) {
    init();
    int (*real)(int) = dlsym(RTLD_NEXT, name);
    int r = real(fd);
    if (r == 0) synced(fd);
    return r;
}
int fsync(int fd) { return do_sync("fsync", fd); }
int fdatasync(int fd) { return do_sync("fdatasync", fd); }
int close(int fd) {
    init(); int (*real)(int) = dlsym(RTLD_NEXT, "close");
    if (fd >= 0 && fd < MAX_FD) { free(paths[fd]); paths[fd] = NULL; }
    return real(fd);
}
"""


@pytest.fixture(scope="module")
def powercut_so(tmp_path_factory: pytest.TempPathFactory) -> Path:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None or not sys.platform.startswith("linux"):
        pytest.skip("simulating power loss needs Linux (glibc) and a C compiler")
    folder = tmp_path_factory.mktemp("powercut")
    (folder / "powercut.c").write_text(_POWERCUT_C)
    subprocess.run(
        [compiler, "-shared", "-fPIC", "-O1", "-o", "powercut.so", "powercut.c", "-ldl"],
        cwd=folder,
        check=True,
        capture_output=True,
    )
    return folder / "powercut.so"


def power_cut(journal: Path) -> int:
    """Undo every journalled change made after its file's last sync; return how many.

    A record cut short by the kill is ignored: its change was never made.
    """
    records = []
    data = journal.read_bytes()
    pos = 0
    while pos + 3 <= len(data):
        kind = data[pos : pos + 1]
        (n,) = struct.unpack_from("<H", data, pos + 1)
        if pos + 3 + n + 20 > len(data):
            break
        path = data[pos + 3 : pos + 3 + n].decode()
        off, old_size, size = struct.unpack_from("<qqI", data, pos + 3 + n)
        pos += 3 + n + 20
        if pos + size > len(data):
            break
        records.append((kind, path, off, old_size, data[pos : pos + size]))
        pos += size
    last_sync = {path: i for i, (kind, path, *_) in enumerate(records) if kind == b"S"}
    undone = 0
    for i in reversed(range(len(records))):
        kind, path, off, old_size, old = records[i]
        if kind == b"S" or i < last_sync.get(path, -1):
            continue
        with open(path, "r+b") as f:
            f.truncate(max(old_size, off + len(old), os.fstat(f.fileno()).st_size))
            f.seek(off)
            f.write(old)
            f.truncate(old_size)
        undone += 1
    return undone


# Appends, seals every 5th and acks every 7th round, printing each step once it returned;
# with a final count it then seals, appends 3 more and dies (the deterministic case).
_POWER_SCRIPT = """
import os, signal, sys
from pathlib import Path
from agent.events import Action, Event, EventId
from agent.signer import Signer
from agent.spool import Spool
from exfilwatch.v1.events_pb2 import EventBatch

spool = Spool.open(Path(sys.argv[1]), agent_id="agent-1", signer=Signer.load(Path(sys.argv[2])))
last = int(sys.argv[3])

def append(i):
    print("appended", *spool.append([Event(EventId(f"ev-{i}"), i, Action.COPY, "h", "v")]), ".",
          flush=True)

def seal(i):
    batch = spool.seal(i, max_events=4)
    if batch is not None:
        seqs = " ".join(str(e.seq) for e in EventBatch.FromString(batch.body).events)
        print("sealed", batch.batch_seq, batch.digest.hex(), seqs, ".", flush=True)

i = 0
while last == 0 or i < last:
    i += 1
    append(i)
    if i % 5 == 0:
        seal(i)
    if i % 7 == 0 and (batch := spool.next_unacked()) is not None:
        spool.ack(batch.batch_seq)
        print("acked", batch.batch_seq, ".", flush=True)
seal(i)
for j in range(3):
    append(i + 1 + j)
os.kill(os.getpid(), signal.SIGKILL)
"""


@dataclass(frozen=True)
class PowerRun:
    appended: list[int]
    """Seqs whose append returned, in order."""
    durable: int
    """The highest seq appended before the last seal or ack that returned."""
    sealed: dict[int, Printed]
    acked: set[int]


def run_until_power_cut(
    tmp_path: Path, spool_path: Path, signer: Signer, so: Path, *, last: int, kill_after: int = 0
) -> PowerRun:
    key = tmp_path / "agent.key"
    signer.save(key)
    journal = tmp_path / "writes.journal"
    proc = Proc(
        [sys.executable, "-c", _POWER_SCRIPT, str(spool_path), str(key), str(last)],
        tmp_path / "power.log",
        {
            "LD_PRELOAD": str(so),
            "POWERCUT_DIR": str(spool_path.parent),
            "POWERCUT_LOG": str(journal),
        },
    )
    # Either it dies by itself after its last three appends, or it is killed at a moment.
    proc.wait_line(f"appended {kill_after or last + 3}", timeout=60)
    assert proc.stop(signal.SIGKILL) == -signal.SIGKILL, proc.stderr_tail()
    assert power_cut(journal) > 0
    run = PowerRun([], 0, {}, set())
    for w in whole_lines([*proc.seen, *drain(proc.lines)]):
        if w[0] == "appended":
            run.appended.append(int(w[1]))
        elif w[0] == "sealed":
            run.sealed[int(w[1])] = Printed(bytes.fromhex(w[2]), 0, tuple(map(int, w[3:])))
        elif w[0] == "acked":
            run.acked.add(int(w[1]))
        if w[0] in ("sealed", "acked"):
            run = replace(run, durable=max(run.appended, default=0))
    return run


def test_power_loss_after_a_seal_loses_only_the_later_appends(
    tmp_path: Path, open_spool: OpenSpool, spool_path: Path, signer: Signer, powercut_so: Path
) -> None:
    run = run_until_power_cut(tmp_path, spool_path, signer, powercut_so, last=30)
    assert run.appended[-3:] == [31, 32, 33] and run.durable == 30

    spool = open_spool()
    remaining = []
    while (batch := spool.next_unacked()) is not None:
        remaining.append(batch)
        spool.ack(batch.batch_seq)
    # Acked batches stay gone; every sealed, unacked one is back byte for byte.
    assert [b.batch_seq for b in remaining] == sorted(set(run.sealed) - run.acked)
    assert all(b.digest == run.sealed[b.batch_seq].digest for b in remaining)
    tail = spool.seal(T0, max_events=10_000)
    pending = batch_events(tail) if tail is not None else []
    # Seqs 1..30 were appended before the last seal's fsync: each is in exactly one place.
    # 31..33 came after it and were never fsynced: lost, and their seqs are assigned again.
    seqs = [s for n in sorted(run.acked) for s in run.sealed[n].seqs]
    seqs += [e.seq for b in remaining for e in batch_events(b)] + [e.seq for e in pending]
    assert sorted(seqs) == list(range(1, 31))
    assert spool.append(make_events(100, 1)) == [31]
    last = tail or remaining[-1]
    following = spool.seal(T0)
    assert following is not None
    assert pb_batch(following).prev_batch_digest == last.digest


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_power_loss_at_a_random_moment_keeps_what_a_seal_or_ack_made_durable(
    tmp_path: Path,
    open_spool: OpenSpool,
    spool_path: Path,
    signer: Signer,
    powercut_so: Path,
    seed: int,
) -> None:
    kill_after = random.Random(seed).randrange(20, 300)
    run = run_until_power_cut(
        tmp_path, spool_path, signer, powercut_so, last=0, kill_after=kill_after
    )
    with contextlib.closing(sqlite3.connect(spool_path)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)

    spool = open_spool()
    remaining = []
    while (batch := spool.next_unacked()) is not None:
        remaining.append(batch)
        spool.ack(batch.batch_seq)
    tail = spool.seal(T0, max_events=10_000, max_bytes=1 << 30)
    pending = batch_events(tail) if tail is not None else []
    next_seq = spool.append(make_events(1000, 1))[0]

    # Durable: everything appended before the last seal or ack that returned. At most
    # one more append may have committed unprinted (the kill fell before its print).
    assert run.durable < next_seq <= max(run.appended) + 2
    # Acks are durable; so is every seal. The kill may also have fallen between an ack's
    # (or a seal's) commit and its print: one batch more gone (or there) than printed.
    gone = set(range(1, remaining[0].batch_seq)) if remaining else set(run.sealed)
    assert run.acked <= gone and len(gone - run.acked) <= 1
    assert {b.batch_seq for b in remaining} >= set(run.sealed) - gone
    for batch in remaining:
        before = run.sealed.get(batch.batch_seq - 1)
        assert pb_batch(batch).prev_batch_digest == (before.digest if before else GENESIS_DIGEST)
        if batch.batch_seq in run.sealed:
            assert batch.digest == run.sealed[batch.batch_seq].digest
    # Every seq below next_seq is in exactly one place: an acked batch, the spool.
    seqs = [s for n in sorted(gone) for s in run.sealed[n].seqs]
    seqs += [e.seq for b in remaining for e in batch_events(b)] + [e.seq for e in pending]
    assert sorted(seqs) == list(range(1, next_seq))


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
