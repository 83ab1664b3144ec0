"""collector.ingestproc: ingest in a process of its own, with its decode workers, as `serve`
runs it; and collector.decoding, the workers' half."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from collector.decoding import verify_and_prepare, verify_and_prepare_light, with_signed
from collector.errors import (
    CollectorError,
    DecoderUnavailableError,
    IngestUnavailableError,
    SequenceGapError,
    SignatureError,
    UnknownAgentError,
)
from collector.ingestproc import IngestProcess
from collector.metrics import Metrics
from collector.rpc import Ack, Heartbeat
from collector.store import SqliteStore
from collector.verify import ChainHead
from tests.collector.batches import T0, BatchChain, TestAgent, enroll, envelope, new_agent
from tests.conftest import POLICY, started_ingest_process
from tests.procs import Collector, run_cli, wait_until

NOW = T0 + 3600 * 10**9
DB = "c.db"


@pytest.fixture
def db(tmp_path: Path) -> Iterator[SqliteStore]:
    with SqliteStore.open(tmp_path / DB) as store:
        yield store


def _started(db: Path, workers: int, metrics: Metrics | None = None) -> IngestProcess:
    process = started_ingest_process(db, workers, metrics)
    assert not process.restoring and process.restore_error is None
    return process


def test_a_worker_prepares_what_the_writer_would_prepare_itself() -> None:
    agent = new_agent()
    chain = BatchChain(agent)
    first, second = chain.next(n=5), chain.next(n=7)
    head = ChainHead(first.batch_seq, first.digest)
    for signed, last in ((first, None), (second, head)):
        inline = verify_and_prepare(signed.parts, agent.agent_id, agent.key(), last)
        light = verify_and_prepare_light(signed.parts, agent.agent_id, agent.key(), last)
        assert light.batch.body == b"" and light.batch.signature == b""  # not sent back
        assert with_signed(light, signed.parts) == inline
        assert len(inline.rows) == len(signed.events)


@pytest.mark.parametrize("workers", [0, 1], ids=["in-its-reader", "one-worker"])
def test_the_ingest_process_stores_refuses_and_counts_as_ingest_does(
    tmp_path: Path, db: SqliteStore, workers: int
) -> None:
    agent = new_agent()
    enroll(db, agent)
    chain = BatchChain(agent)
    metrics = Metrics()
    process = _started(tmp_path / DB, workers, metrics)
    try:
        batches = [chain.next(n=8) for _ in range(3)]
        acks = [process.upload(s.raw, agent.agent_id, NOW) for s in batches]
        assert acks == [
            Ack(agent.agent_id, s.batch_seq, s.digest, duplicate=False, events_stored=8)
            for s in batches
        ]
        assert process.upload(batches[2].raw, agent.agent_id, NOW).duplicate
        forged = chain.next()
        raw = envelope(forged.body, new_agent().sign(forged.body), agent.key_id)
        with pytest.raises(SignatureError, match="does not verify"):
            process.upload(raw, agent.agent_id, NOW)
        with pytest.raises(SequenceGapError, match="skips ahead"):
            process.upload(chain.next().raw, agent.agent_id, NOW)
        with pytest.raises(UnknownAgentError):
            process.upload(batches[0].raw, new_agent().agent_id, NOW)
    finally:
        process.close()
    stored = [(b.batch_seq, b.body, b.signature) for b in db.batch_bodies(agent.agent_id)]
    assert stored == [(s.batch_seq, s.body, s.parts[1]) for s in batches]
    assert db.event_ids() == {e.event_id for s in batches for e in s.events}
    security = {a.rule for a in db.list_alerts() if a.kind == "security"}
    assert {"SignatureError", "SequenceGapError", "UnknownAgentError"} <= security
    # The child's counters reach the parent's /metrics.
    assert metrics.value("exfilwatch_batches_total", outcome="stored") == 3
    assert metrics.value("exfilwatch_batches_total", outcome="duplicate") == 1
    assert metrics.value("exfilwatch_events_stored_total") == 24
    assert metrics.value("exfilwatch_batches_refused_total", reason="SignatureError") == 1
    assert metrics.value("exfilwatch_batches_refused_total", reason="SequenceGapError") == 1


def test_heartbeats_are_answered_by_the_ingest_process(tmp_path: Path, db: SqliteStore) -> None:
    agent = new_agent()
    enroll(db, agent)
    chain = BatchChain(agent)
    process = _started(tmp_path / DB, 1)
    try:
        signed = chain.next(n=2)
        process.upload(signed.raw, agent.agent_id, NOW)
        hb = Heartbeat(agent.agent_id, NOW, "0.2.0", "rev-7", spool_depth=3, coverage_gaps=1)
        reply = process.heartbeat(hb, NOW + 1)
        assert (reply.last_batch_seq, reply.last_batch_digest) == (1, signed.digest)
        with pytest.raises(UnknownAgentError):
            process.heartbeat(dataclasses.replace(hb, agent_id=new_agent().agent_id), NOW)
    finally:
        process.close()
    record = db.get_agent(agent.agent_id)
    assert record is not None
    assert (record.agent_version, record.policy_revision, record.spool_depth) == (
        "0.2.0", "rev-7", 3,
    )  # fmt: skip


def _killed_holding(
    victim: psutil.Process, process: IngestProcess, agent: TestAgent, raw: bytes
) -> object:
    """Stop `victim`, upload `raw` (on a thread) until it reaches it, kill it: what the
    upload returned or raised."""
    victim.suspend()  # it takes the call, and will not answer
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(process.upload(raw, agent.agent_id, NOW))
        except CollectorError as e:
            outcome.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    wait_until(lambda: _has_queued(victim), 30, "the upload to reach the stopped process")
    victim.kill()
    thread.join(30)
    assert len(outcome) == 1
    return outcome[0]


@pytest.mark.parametrize("victim", ["decode-worker", "ingest-process"])
def test_a_killed_process_fails_the_upload_it_held_retryably_and_another_takes_over(
    tmp_path: Path, db: SqliteStore, victim: str
) -> None:
    agent = new_agent()
    enroll(db, agent)
    signed = BatchChain(agent).next(n=3)
    process = _started(tmp_path / DB, 1)
    try:
        first = process.pid
        assert first is not None
        child = psutil.Process(first)
        (worker,) = child.children()
        outcome = _killed_holding(
            worker if victim == "decode-worker" else child, process, agent, signed.raw
        )
        if victim == "decode-worker":
            assert isinstance(outcome, DecoderUnavailableError)
            (again,) = wait_until(child.children, 30, "another worker")
            assert again.pid != worker.pid
        else:
            assert isinstance(outcome, IngestUnavailableError)
        ack = process.upload(signed.raw, agent.agent_id, NOW)  # the agent's retry
        assert (ack.batch_seq, ack.duplicate, ack.events_stored) == (1, False, 3)
        if victim == "ingest-process":  # the call started another
            assert process.pid not in (None, first)
            assert _gone(first)
            wait_until(lambda: _gone(worker.pid), 30, "its worker to follow it")
    finally:
        process.close()


def test_close_stops_the_child_and_its_workers_and_later_calls_are_refused(
    tmp_path: Path, db: SqliteStore
) -> None:
    process = _started(tmp_path / DB, 2)
    assert process.pid is not None
    child = psutil.Process(process.pid)
    family = [child, *child.children()]
    assert len(family) == 3
    process.close()
    _, alive = psutil.wait_procs(family, timeout=30)
    assert not alive
    with pytest.raises(IngestUnavailableError, match="stopping"):
        process.upload(b"", None, NOW)


def test_a_collector_killed_with_sigkill_leaves_no_process_behind(tmp_path: Path) -> None:
    collector = Collector(
        tmp_path / "c", POLICY, tmp_path / "c.log", serve_args=("--decode-workers", "2")
    )
    collector.init()
    collector.start()
    assert collector.proc is not None
    parent = psutil.Process(collector.proc.popen.pid)
    # The ingest process and its two decode workers (beside multiprocessing's resource
    # tracker, which goes too).
    wait_until(lambda: len(_spawned(parent)) == 3, 30, "three processes")
    children = parent.children(recursive=True)
    collector.stop(signal.SIGKILL)
    deadline = time.monotonic() + 30
    alive = children
    while alive and time.monotonic() < deadline:
        _, alive = psutil.wait_procs(alive, timeout=0.5)
    assert not alive, [p.cmdline() for p in alive]


def test_a_collector_stopped_with_sigterm_to_its_whole_group_stops_cleanly(
    tmp_path: Path,
) -> None:
    """systemd's stop signals every process of the unit: the children ignore it and are
    stopped by the collector, after the calls they hold."""
    collector = Collector(tmp_path / "c", POLICY, tmp_path / "c.log")
    collector.init()
    collector.start()
    assert collector.proc is not None
    parent = psutil.Process(collector.proc.popen.pid)
    wait_until(lambda: len(_spawned(parent)) == 2, 30, "the ingest process and its worker")
    family = [parent, *parent.children(recursive=True)]
    for p in family[1:]:
        os.kill(p.pid, signal.SIGTERM)
    gone, _ = psutil.wait_procs(family[1:], timeout=1)
    assert not gone  # they wait for the collector
    assert collector.proc.stop(signal.SIGTERM, timeout=60) == 0
    _, alive = psutil.wait_procs(family[1:], timeout=30)
    assert not alive


def test_serve_refuses_a_bad_worker_count(tmp_path: Path) -> None:
    collector = Collector(tmp_path / "c", POLICY, tmp_path / "c.log")
    collector.init()
    out = run_cli(
        "collector", "serve", "--data", str(collector.data), "--policy", str(POLICY),
        "--decode-workers", "-1", check=False,
    )  # fmt: skip
    assert out.returncode == 2 and "--decode-workers" in out.stderr


def _has_queued(process: psutil.Process) -> bool:
    """Whether bytes wait unread on one of `process`'s Unix sockets (iproute2's `ss`): the
    call sent to a stopped process has reached it."""
    if shutil.which("ss") is None:
        pytest.skip("needs ss (iproute2) to see a socket's receive queue")
    out = subprocess.run(["ss", "-xpnH"], capture_output=True, text=True, check=True).stdout
    mine = f"pid={process.pid},"
    return any(mine in line and int(line.split()[2]) > 0 for line in out.splitlines())


def _spawned(parent: psutil.Process) -> list[psutil.Process]:
    return [c for c in parent.children(recursive=True) if "spawn_main" in " ".join(c.cmdline())]


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
