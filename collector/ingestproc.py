"""Ingest in a process of its own: the single writer, with a GIL nobody else takes.

`serve` answers agents with gRPC's threads, TLS and the console in one process. When the
writer (collector.ingest: the rules and the SQLite transaction) shares that process, every
time it releases the GIL for SQLite it waits to take it back from those threads; under a
fleet's load it spent a fifth of its time so (docs/design-decisions.md, "Ingest in a
process of its own"). `IngestProcess` runs the `Ingestor` in a child process, spawned,
and forwards each upload and heartbeat to it over a pipe: the signed bytes go, an Ack or
the refusal comes back, with the counters the call bumped.

The child opens the same database (its writes and the parent's, enrolment and the console,
take turns through SQLite's lock), rebuilds the rules' windows itself and exits when the
parent goes. If it dies, the calls it held fail with IngestUnavailableError (agents retry
them: nothing acknowledged is lost, and a batch committed but not acknowledged comes back
as a duplicate) and a new child is started, which restores the windows again.
"""

from __future__ import annotations

import functools
import itertools
import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, Literal

from collector.decoding import (
    Signed,
    verify_and_prepare,
    verify_and_prepare_light,
    with_signed,
    worker_init,
)
from collector.directory import Directory
from collector.errors import (
    CollectorError,
    DecoderUnavailableError,
    IngestError,
    IngestUnavailableError,
    StoreError,
)
from collector.groupcommit import write_group
from collector.ingest import (
    MAX_GROUP,
    RESTORING,
    Ingestor,
    IngestSettings,
    Pending,
    restore_failed,
)
from collector.metrics import Metrics
from collector.policy import policy_from_document
from collector.procsetup import log_to_stderr, serving_gc
from collector.records import StoreResult
from collector.rpc import Ack, Heartbeat, HeartbeatReply
from collector.store import SqliteStore

__all__ = ["IngestConfig", "IngestProcess"]

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class IngestConfig:
    """What the child needs to build its Ingestor (picklable: it crosses a spawn)."""

    database: Path
    synchronous: Literal["NORMAL", "FULL"]
    policy_document: bytes
    policy_source: str
    settings: IngestSettings
    directory: Directory | None
    decode_workers: int
    """Processes that verify and decode beside the child's writer; 0: in its loop."""
    log_level: int = logging.INFO


class _Recording(Metrics):
    """The child's counters: what one call adds, on one thread, goes back with its reply
    (`take`)."""

    def __init__(self) -> None:
        super().__init__()
        self._local = threading.local()

    def add(self, name: str, value: float = 1, **labels: str) -> None:
        super().add(name, value, **labels)
        adds: list[tuple[str, float, dict[str, str]]] | None = getattr(self._local, "adds", None)
        if adds is None:
            adds = self._local.adds = []
        adds.append((name, value, labels))

    def take(self) -> list[tuple[str, float, dict[str, str]]]:
        adds: list[tuple[str, float, dict[str, str]]] = getattr(self._local, "adds", None) or []
        self._local.adds = []
        return adds


# -- the child ---------------------------------------------------------------------------


def _decode_worker(conn: Connection) -> None:
    """A decode worker of the child: verify and decode the jobs in the order they come.

    One thread reads jobs, one sends results, this one decodes: the worker never stops
    reading while its results wait for the writer to take them (the writer can be busy
    writing a group), so neither end ever blocks on a full pipe and the worker decodes
    ahead of the writer."""
    worker_init()
    serving_gc()
    jobs: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
    results: queue.SimpleQueue[tuple[int, bool, object] | None] = queue.SimpleQueue()

    def read() -> None:
        while True:
            try:
                jobs.put(conn.recv())
            except (EOFError, OSError):
                jobs.put(None)
                return

    def send() -> None:
        while (result := results.get()) is not None:
            try:
                conn.send(result)
            except (OSError, ValueError):
                return

    threading.Thread(target=read, name="jobs", daemon=True).start()
    sender = threading.Thread(target=send, name="results")
    sender.start()
    while (message := jobs.get()) is not None:
        job, signed, tls_agent_id, agent, head = message
        try:
            results.put((job, True, verify_and_prepare_light(signed, tls_agent_id, agent, head)))
        except Exception as e:  # a refusal, or a bug: the parent answers INTERNAL
            results.put((job, False, _portable(e)))
    results.put(None)
    sender.join()


@dataclass(eq=False)
class _Upload:
    rid: int
    tls_agent_id: str | None
    now_ns: int
    signed: Signed
    arrived: float


@dataclass(eq=False)
class _Worker:
    process: BaseProcess
    conn: Connection
    jobs: dict[int, _Upload] = field(default_factory=dict)
    """The uploads it was sent and has not answered, by call id."""


_Item = tuple[_Upload, Pending] | Callable[[], None] | int | None
"""What the reader hands the writer: a verified upload, a call to run (a heartbeat), the id
of a call waiting for the restore, or None: stop."""


class _Loop:
    """The child's two threads. The reader (`run`) takes calls from the parent, hands the
    uploads to decode workers and their results to the writer; the writer writes what
    arrived while it wrote the last group as the next (group commit) and answers. The
    writer's SQLite work releases the GIL, so the reader's work mostly fits beside it."""

    def __init__(
        self, conn: Connection, ingest: Ingestor, metrics: _Recording, config: IngestConfig
    ) -> None:
        self._conn = conn
        self._send_lock = threading.Lock()
        self._ingest = ingest
        self._metrics = metrics
        self._settings = config.settings
        self._context = multiprocessing.get_context("spawn")
        self._workers = [self._spawn() for _ in range(config.decode_workers)]
        self._inbox: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._ready: list[tuple[_Upload, Pending]] = []
        """The writer's: verified uploads waiting for the next group."""
        self._restore_waiters: list[int] = []
        """The writer's."""

    def _spawn(self) -> _Worker:
        parent, child = self._context.Pipe()
        process = self._context.Process(
            target=_decode_worker, args=(child,), name="exfilwatch-decode", daemon=True
        )
        process.start()
        child.close()
        return _Worker(process, parent)

    def _reply(self, rid: int, ok: bool, value: object) -> None:
        message = ("ok" if ok else "err", rid, value, self._metrics.take())
        try:
            with self._send_lock:
                self._conn.send(message)
        except (OSError, ValueError):
            pass  # the parent is gone: the agent retries, and a batch stored is a duplicate

    def run(self) -> bool:
        """The reader, until the parent says stop and the calls held are answered (True),
        or until the parent is gone (False: what is held is dropped)."""
        writer = threading.Thread(target=self._write_loop, name="writer", daemon=True)
        writer.start()
        stopping = False
        try:
            while not (stopping and all(not w.jobs for w in self._workers)):
                conns = [w.conn for w in self._workers] + ([] if stopping else [self._conn])
                for conn in wait(conns):
                    if conn is self._conn:
                        calls = self._calls()
                        if calls is None:
                            return False
                        stopping = not calls
                    else:
                        self._decoded(next(w for w in self._workers if w.conn is conn))
            self._inbox.put(None)
            writer.join()
            return True
        finally:
            for worker in self._workers:
                worker.conn.close()
                worker.process.join(5)

    def _write_loop(self) -> None:
        stop = False
        while not (stop and not self._ready):
            timeout = 0.05 if self._ready or self._restore_waiters else None
            try:
                items = [self._inbox.get(timeout=timeout)]
            except queue.Empty:
                items = []
            while True:
                try:
                    items.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            for item in items:
                if item is None:
                    stop = True
                elif isinstance(item, int):
                    self._restore_waiters.append(item)
                elif isinstance(item, tuple):
                    self._ready.append(item)
                else:
                    item()
            self._write()
            if stop and self._ingest.restoring:
                for upload, _ in self._ready:
                    self._reply(upload.rid, False, IngestUnavailableError("stopping; retry"))
                self._ready.clear()

    def _calls(self) -> bool | None:
        """Take every call waiting on the parent's pipe; False once the parent said stop,
        None once it is gone."""
        while self._conn.poll():
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                return None
            kind = message[0]
            if kind == "stop":
                return False
            if kind == "upload":
                self._upload(*message[1:])
            elif kind == "heartbeat":
                _, rid, hb, now_ns = message
                heartbeat = functools.partial(self._ingest.heartbeat, hb, now_ns)
                self._inbox.put(functools.partial(self._call, rid, heartbeat))
            elif kind == "restored":
                self._inbox.put(message[1])
            else:
                logger.error("unknown message %r from the collector", kind)
        return True

    def _call(self, rid: int, method: Callable[[], object]) -> None:
        try:
            value = method()
        except Exception as e:
            self._reply(rid, False, _portable(e))
        else:
            self._reply(rid, True, value)

    def _refuse(self, upload: _Upload, error: Exception) -> None:
        if isinstance(error, IngestError):
            self._ingest.refused(error, upload.tls_agent_id, upload.now_ns)
        self._reply(upload.rid, False, error)

    def _upload(self, rid: int, raw: bytes, tls_agent_id: str | None, now_ns: int) -> None:
        try:
            signed, agent, head = self._ingest.receive(raw, tls_agent_id)
        except IngestError as e:
            self._refuse(_Upload(rid, tls_agent_id, now_ns, (b"", b"", b""), 0.0), e)
            return
        except CollectorError as e:
            self._reply(rid, False, e)
            return
        upload = _Upload(rid, tls_agent_id, now_ns, signed, time.monotonic())
        if not self._workers:
            try:
                prepared = verify_and_prepare(signed, tls_agent_id, agent, head)
            except IngestError as e:
                self._refuse(upload, e)
                return
            self._inbox.put((upload, self._ingest.pending(prepared, now_ns)))
            return
        worker = min(self._workers, key=lambda w: len(w.jobs))
        try:
            worker.conn.send((rid, signed, tls_agent_id, agent, head))
        except (OSError, ValueError):
            self._died(worker)
            self._reply(rid, False, DecoderUnavailableError("a decode worker died; retry"))
            return
        worker.jobs[rid] = upload

    def _decoded(self, worker: _Worker) -> None:
        """Take every result waiting on a worker's pipe."""
        while worker.conn.poll():
            try:
                rid, ok, value = worker.conn.recv()
            except (EOFError, OSError):
                self._died(worker)
                return
            upload = worker.jobs.pop(rid)
            if not ok:
                self._refuse(upload, value)
                continue
            pending = self._ingest.pending(with_signed(value, upload.signed), upload.now_ns)
            self._inbox.put((upload, pending))

    def _died(self, worker: _Worker) -> None:
        """A worker died: fail what it held and queued (agents retry), start another."""
        logger.error("a decode worker died; starting another")
        worker.conn.close()
        worker.process.join(5)
        self._workers[self._workers.index(worker)] = self._spawn()
        for upload in worker.jobs.values():
            self._reply(upload.rid, False, DecoderUnavailableError("a decode worker died; retry"))

    def _write(self) -> None:
        ingest = self._ingest
        if ingest.restoring:
            # Uploads wait for the windows they feed, as long as the settings allow.
            limit = time.monotonic() - self._settings.restore_wait_s
            waited = [item for item in self._ready if item[0].arrived < limit]
            for item in waited:
                self._ready.remove(item)
                self._reply(item[0].rid, False, StoreError(RESTORING))
            return
        for rid in self._restore_waiters:
            error = ingest.restore_error
            self._reply(rid, True, None if error is None else str(error))
        self._restore_waiters.clear()
        if ingest.restore_error is not None:
            for upload, _ in self._ready:
                self._reply(upload.rid, False, restore_failed(ingest.restore_error))
            self._ready.clear()
            return
        while self._ready:
            group, self._ready = self._ready[:MAX_GROUP], self._ready[MAX_GROUP:]
            pendings = [pending for _, pending in group]
            for (upload, pending), outcome in zip(group, self._store(pendings), strict=True):
                if isinstance(outcome, StoreResult):
                    self._reply(upload.rid, True, ingest.acknowledge(pending, outcome))
                else:
                    self._refuse(upload, outcome)

    def _store(self, pendings: list[Pending]) -> list[StoreResult | Exception]:
        """`Ingestor.store_group`, each upload again alone if the group fails
        (`groupcommit.write_group`); errors as the parent should see them."""
        outcomes = write_group(self._ingest.store_group, pendings)
        return [o if isinstance(o, StoreResult) else _portable(o) for o in outcomes]


def _portable(error: Exception) -> Exception:
    """The error as the parent should see it: ours as is, any other as a RuntimeError
    (INTERNAL), logged here with its traceback."""
    if isinstance(error, CollectorError):
        return error
    logger.error("ingest failed", exc_info=error)
    return RuntimeError(f"{type(error).__name__}: {error}")


def _child(conn: Connection, config: IngestConfig) -> None:
    # The parent stops us (Ctrl-C reaches the process group, systemd's stop the whole unit)
    # once its server stopped taking calls, and we finish the calls we hold first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    log_to_stderr(config.log_level)
    serving_gc()
    store = SqliteStore(config.database, synchronous=config.synchronous)
    try:
        metrics = _Recording()
        policy = policy_from_document(config.policy_document, config.policy_source)
        ingest = Ingestor(store, policy, config.settings, config.directory, metrics=metrics)
        # The windows are rebuilt at once, on every start (a child started again after one
        # died included); uploads wait in the loop meanwhile, heartbeats do not.
        restoring = ingest.restore_in_background(time.time_ns())
        loop = _Loop(conn, ingest, metrics, config)
        conn.send(("ready", os.getpid()))
        if not loop.run() or ingest.restoring:
            # Orphaned (the parent was killed: a new collector may start on this database
            # at once, and no answer can reach an agent), or stopped before the windows
            # were whole (only reads are lost): go now. A transaction cut short rolls back.
            os._exit(0)
        restoring.join()
    finally:
        store.close()
        conn.close()


# -- the parent --------------------------------------------------------------------------


@dataclass(eq=False)
class _Call:
    done: threading.Event = field(default_factory=threading.Event)
    ok: bool = False
    value: Any = None


class IngestProcess:
    """The parent's side: `upload` and `heartbeat` as `Ingestor`'s, run in the child.

    Thread-safe. `start()` spawns the child and waits until it answers; a child that dies
    is started again by the next call.
    """

    def __init__(self, config: IngestConfig, metrics: Metrics | None = None) -> None:
        self._config = config
        self._metrics = metrics or Metrics()
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._calls: dict[int, _Call] = {}
        self._conn: Connection | None = None
        self._process: BaseProcess | None = None
        self._reader: threading.Thread | None = None
        self._closed = False
        self._restored = threading.Event()
        self._restored.set()
        self._restore_error: str | None = None

    @property
    def pid(self) -> int | None:
        process = self._process
        return None if process is None else process.pid

    def start(self) -> None:
        with self._lock:
            self._start_locked()

    def _start_locked(self) -> None:
        again = self._process is not None
        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe()
        process = context.Process(
            target=_child, args=(child, self._config), name="exfilwatch-ingest"
        )
        process.start()
        child.close()
        try:
            if not parent.poll(START_TIMEOUT_S):
                raise IngestUnavailableError("the ingest process did not start in time")
            parent.recv()  # ("ready", pid)
        except (EOFError, OSError, IngestUnavailableError) as e:
            process.kill()
            process.join()
            parent.close()
            raise IngestUnavailableError(
                f"the ingest process failed to start (exit {process.exitcode}); see its log"
            ) from e
        self._conn, self._process = parent, process
        self._reader = threading.Thread(
            target=self._read, args=(parent,), name="ingest-replies", daemon=True
        )
        self._reader.start()
        if again:  # it restores the windows again: healthz says so meanwhile
            self.restore_in_background(on_failure=lambda: None)

    def _read(self, conn: Connection) -> None:
        while True:
            try:
                kind, rid, value, adds = conn.recv()
            except (EOFError, OSError):
                break
            for name, amount, labels in adds:
                self._metrics.add(name, amount, **labels)
            with self._lock:
                call = self._calls.pop(rid, None)
            if call is not None:
                call.ok, call.value = kind == "ok", value
                call.done.set()
        with self._lock:
            if self._conn is conn:
                self._conn = None
                if not self._closed:
                    logger.error("the ingest process died; its calls fail and it starts again")
            orphans, self._calls = self._calls, {}
        for call in orphans.values():
            call.value = IngestUnavailableError("the ingest process stopped; retry")
            call.done.set()

    def _call(self, message: tuple[Any, ...]) -> Any:
        call = _Call()
        with self._lock:
            if self._closed:
                raise IngestUnavailableError("the collector is stopping")
            conn = self._conn
            if conn is None:
                self._start_locked()
                conn = self._conn
            if conn is None:
                raise IngestUnavailableError("the ingest process did not start")
            rid = next(self._ids)
            self._calls[rid] = call
        try:
            with self._send_lock:
                conn.send((message[0], rid, *message[1:]))
        except (OSError, ValueError) as e:
            with self._lock:
                self._calls.pop(rid, None)
            raise IngestUnavailableError(f"the ingest process is gone: {e}") from e
        call.done.wait()
        if call.ok:
            return call.value
        raise call.value

    def upload(self, raw: bytes, tls_agent_id: str | None, now_ns: int) -> Ack:
        ack: Ack = self._call(("upload", raw, tls_agent_id, now_ns))
        return ack

    def heartbeat(self, hb: Heartbeat, now_ns: int) -> HeartbeatReply:
        reply: HeartbeatReply = self._call(("heartbeat", hb, now_ns))
        return reply

    def restore_in_background(self, on_failure: Callable[[], None]) -> threading.Thread:
        """Wait, on a thread (returned), for the child's restore of the rules' windows,
        which it starts by itself; call `on_failure` if that fails."""
        self._restored.clear()
        self._restore_error = None

        def run() -> None:
            try:
                error = self._call(("restored",))
            except CollectorError as e:
                error = str(e)
            self._restore_error = error
            self._restored.set()
            if error is not None:
                on_failure()

        thread = threading.Thread(target=run, name="restore-windows")
        thread.start()
        return thread

    @property
    def restoring(self) -> bool:
        return not self._restored.is_set()

    @property
    def restore_error(self) -> str | None:
        return self._restore_error

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conn, process = self._conn, self._process
        if conn is not None:
            try:
                with self._send_lock:
                    conn.send(("stop",))
            except (OSError, ValueError):
                pass
        if process is not None:
            process.join(30)
            if process.is_alive():
                process.kill()
                process.join()
        if self._reader is not None:
            self._reader.join(5)
