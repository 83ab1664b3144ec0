"""collector.decoding: uploads verified and decoded in worker processes, as in the RPC thread."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from collector.decoding import InlineDecoder, PoolDecoder
from collector.errors import DecoderUnavailableError, SequenceGapError, SignatureError
from collector.ingest import Ingestor
from collector.policy import load_policy
from collector.store import SqliteStore
from collector.verify import ChainHead
from tests.collector.batches import T0, BatchChain, enroll, envelope, new_agent
from tests.conftest import POLICY
from tests.procs import Collector, run_cli, wait_until

NOW = T0 + 3600 * 10**9


@pytest.fixture(scope="module")
def pool() -> Iterator[PoolDecoder]:
    decoder = PoolDecoder(1)
    decoder.start()
    yield decoder
    decoder.close()


def test_a_worker_prepares_what_the_rpc_thread_prepares(pool: PoolDecoder) -> None:
    agent = new_agent()
    chain = BatchChain(agent)
    first, second = chain.next(n=5), chain.next(n=7)
    head = ChainHead(first.batch_seq, first.digest)
    for signed, last in ((first, None), (second, head)):
        inline = InlineDecoder().prepare(signed.parts, agent.agent_id, agent.key(), last)
        remote = pool.prepare(signed.parts, agent.agent_id, agent.key(), last)
        assert remote == inline  # the batch (body, signature, events) and its rows
        assert remote.batch.body == signed.body and len(remote.rows) == len(signed.events)


def test_a_worker_refuses_what_the_rpc_thread_refuses(pool: PoolDecoder) -> None:
    agent = new_agent()
    chain = BatchChain(agent)
    signed = chain.next()
    parts = (signed.body, new_agent().sign(signed.body), agent.key_id)
    with pytest.raises(SignatureError, match="does not verify"):
        pool.prepare(parts, agent.agent_id, agent.key(), None)
    later = chain.next()  # batch 2 with no batch 1 stored
    with pytest.raises(SequenceGapError, match="skips ahead"):
        pool.prepare(later.parts, agent.agent_id, agent.key(), None)


def test_a_killed_worker_fails_its_upload_retryably_and_the_pool_starts_again() -> None:
    agent = new_agent()
    signed = BatchChain(agent).next()
    decoder = PoolDecoder(1)
    try:
        decoder.prepare(signed.parts, agent.agent_id, agent.key(), None)  # started, warm
        (pid,) = decoder.pids()
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not psutil.pid_exists(pid) or _zombie(pid), 30, "the worker to die")
        with pytest.raises(DecoderUnavailableError, match="decode worker died"):
            decoder.prepare(signed.parts, agent.agent_id, agent.key(), None)
        again = decoder.prepare(signed.parts, agent.agent_id, agent.key(), None)
        assert again.batch.digest == signed.digest
        assert decoder.pids() and pid not in decoder.pids()
    finally:
        decoder.close()
    with pytest.raises(DecoderUnavailableError, match="stopping"):
        decoder.prepare(signed.parts, agent.agent_id, agent.key(), None)


def test_ingest_through_the_pool_stores_and_refuses_as_before(
    tmp_path: Path, pool: PoolDecoder
) -> None:
    with SqliteStore.open(tmp_path / "c.db") as store:
        agent = new_agent()
        enroll(store, agent)
        chain = BatchChain(agent)
        ingest = Ingestor(store, load_policy(POLICY), decoder=pool)
        batches = [chain.next(n=8) for _ in range(3)]
        acks = [ingest.upload(s.raw, agent.agent_id, NOW) for s in batches]
        assert [(a.batch_seq, a.events_stored, a.duplicate) for a in acks] == [
            (1, 8, False), (2, 8, False), (3, 8, False),
        ]  # fmt: skip
        assert ingest.upload(batches[2].raw, agent.agent_id, NOW).duplicate
        stored = [(b.batch_seq, b.body, b.signature) for b in store.batch_bodies(agent.agent_id)]
        assert stored == [(s.batch_seq, s.body, s.parts[1]) for s in batches]
        assert store.event_ids() == {e.event_id for s in batches for e in s.events}
        forged = chain.next()
        raw = envelope(forged.body, new_agent().sign(forged.body), agent.key_id)
        with pytest.raises(SignatureError):
            ingest.upload(raw, agent.agent_id, NOW)
        (alert,) = [a for a in store.list_alerts() if a.kind == "security"]
        assert alert.rule == "SignatureError"


def test_a_collector_killed_with_sigkill_leaves_no_worker_behind(tmp_path: Path) -> None:
    collector = Collector(
        tmp_path / "c", POLICY, tmp_path / "c.log", serve_args=("--decode-workers", "2")
    )
    collector.init()
    collector.start()
    assert collector.proc is not None
    parent = psutil.Process(collector.proc.popen.pid)
    wait_until(lambda: len(_workers(parent)) == 2, 30, "two decode workers")
    children = parent.children(recursive=True)
    collector.stop(signal.SIGKILL)
    deadline = time.monotonic() + 30
    alive = children
    while alive and time.monotonic() < deadline:
        _, alive = psutil.wait_procs(alive, timeout=0.5)
    assert not alive, [p.cmdline() for p in alive]


def test_serve_refuses_a_bad_worker_count(tmp_path: Path) -> None:
    collector = Collector(tmp_path / "c", POLICY, tmp_path / "c.log")
    collector.init()
    out = run_cli(
        "collector", "serve", "--data", str(collector.data), "--policy", str(POLICY),
        "--decode-workers", "-1", check=False,
    )  # fmt: skip
    assert out.returncode == 2 and "--decode-workers" in out.stderr


def _workers(parent: psutil.Process) -> list[psutil.Process]:
    return [c for c in parent.children() if "spawn_main" in " ".join(c.cmdline())]


def _zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
