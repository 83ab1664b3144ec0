"""Shared fixtures: an in-process collector on free ports, and a thread-leak guard."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from collector import pki
from collector.enroll import Enrollment
from collector.ingest import Ingestor, IngestSettings
from collector.ingestproc import IngestConfig, IngestProcess
from collector.metrics import Metrics
from collector.policy import load_policy
from collector.rpc import Handlers, Ingest
from collector.server import Bound, create_server
from collector.store import SqliteStore

ROOT = Path(__file__).resolve().parent.parent
POLICY = ROOT / "configs" / "policy.yaml"


@dataclass
class InProcessCollector:
    data: Path
    store: SqliteStore
    authority: pki.Authority
    bound: Bound

    @property
    def enroll_address(self) -> str:
        return f"127.0.0.1:{self.bound.enroll_port}"

    @property
    def agent_address(self) -> str:
        return f"127.0.0.1:{self.bound.agent_port}"

    def token(self, uses: int = 1, ttl_s: int = 3600) -> str:
        token = pki.new_token(self.authority.fingerprint)
        now = time.time_ns()
        self.store.add_token(
            token.token_id, pki.secret_hash(token.secret), now, now + ttl_s * 10**9, uses
        )
        return str(token)


def started_ingest_process(
    db: Path, decode_workers: int, metrics: Metrics | None = None
) -> IngestProcess:
    """An ingest process on `db` as `serve` starts it (configs/policy.yaml), its windows
    restored; the caller closes it."""
    policy = load_policy(POLICY)
    config = IngestConfig(
        db, "FULL", policy.document, str(POLICY), IngestSettings(), None, decode_workers
    )
    process = IngestProcess(config, metrics)
    process.start()
    process.restore_in_background(on_failure=lambda: None).join()
    return process


@contextmanager
def serving(
    data: Path,
    *,
    clock: Callable[[], int] = time.time_ns,
    decode_workers: int | None = None,
    rpc_workers: int = 4,
) -> Iterator[InProcessCollector]:
    """A collector initialised in `data` and serving on free loopback ports, with `clock` as
    its time; stopped and closed at the end. Ingest runs in this process, or, given
    `decode_workers`, in an ingest process with that many decode workers, as `serve` runs
    it (whose windows are restored at the real time)."""
    pki.init_pki(data)
    authority = pki.Authority.load(data)
    store = SqliteStore.open(data / "collector.db")
    policy = load_policy(POLICY)
    ingest: Ingest
    process: IngestProcess | None = None
    if decode_workers is None:
        ingest = Ingestor(store, policy)
        ingest.restore(clock())
    else:
        ingest = process = started_ingest_process(data / "collector.db", decode_workers)
    ports: dict[str, int] = {}
    handlers = Handlers(
        ingest,
        Enrollment(store, authority),
        authority,
        clock,
        lambda: ports["agent"],
        policy=policy,
    )
    bound = create_server(
        handlers, authority, listen="127.0.0.1:0", enroll_listen="127.0.0.1:0", workers=rpc_workers
    )
    ports["agent"] = bound.agent_port
    bound.server.start()
    try:
        yield InProcessCollector(data, store, authority, bound)
    finally:
        bound.server.stop(grace=None).wait()
        if process is not None:
            process.close()
        store.close()


@pytest.fixture
def inproc_collector(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[InProcessCollector]:
    """A collector server in this process. Indirect parameter: the number of decode workers
    of an ingest process as `serve` runs (default None: ingest in this process)."""
    workers = getattr(request, "param", None)
    with serving(tmp_path / "collector", decode_workers=workers) as collector:
        yield collector


@pytest.fixture(autouse=True)
def _no_thread_leaks() -> Iterator[None]:
    """Every thread a test starts is stopped and joined by the end of that test."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 5
    while True:
        leaked = [
            t for t in threading.enumerate() if t not in before and t.is_alive() and not t.daemon
        ]
        if not leaked or time.monotonic() > deadline:
            break
        leaked[0].join(0.1)
    assert not leaked, f"threads left running: {[t.name for t in leaked]}"
