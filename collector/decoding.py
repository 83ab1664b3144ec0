"""Verify and decode uploads, in the RPC thread or in worker processes.

Ingest's Python work splits in two: verifying a batch and turning its protobuf events into
values and rows (pure: bytes in, values out), and writing them and running the rules (the
single writer, collector.groupcommit). One collector process runs both on one core, the
GIL's. `PoolDecoder` moves the first half to worker processes, so a second core takes it:
the writer's thread spends on a batch only the unpickling of what a worker built (a third of
the decoding it replaces; docs/design-decisions.md, "Ingest throughput").

A worker holds nothing: the caller reads the agent's enrolled key and chain head from the
store and sends them with the bytes; the worker checks the signature before it parses the
body, as `collector.verify` always does. A refusal comes back as the same IngestError. A
worker that dies (killed, out of memory) fails the uploads it held with
`DecoderUnavailableError` (the agent retries them) and the pool is started again.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import signal
import threading
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.process import BaseProcess
from typing import Protocol

from collector.errors import DecoderUnavailableError
from collector.store import PreparedBatch, SqliteStore
from collector.verify import AgentKey, ChainHead, verify_batch

__all__ = ["Decoder", "InlineDecoder", "PoolDecoder", "default_workers", "verify_and_prepare"]

logger = logging.getLogger(__name__)

Signed = tuple[bytes, bytes, bytes]
"""(body, signature, key_id) of a SignedBatch: nothing trusted yet."""


def verify_and_prepare(
    signed: Signed, tls_agent_id: str | None, agent: AgentKey | None, head: ChainHead | None
) -> PreparedBatch:
    """`verify_batch`, then the events-table rows: everything of an upload but the writing."""
    batch = verify_batch(signed=signed, tls_agent_id=tls_agent_id, agent=agent, last=head)
    return SqliteStore.prepare(batch)


def _verify_and_prepare_remote(
    signed: Signed, tls_agent_id: str | None, agent: AgentKey | None, head: ChainHead | None
) -> PreparedBatch:
    """In a worker: as `verify_and_prepare`, sending back neither the body nor the signature
    (the caller has them)."""
    prepared = verify_and_prepare(signed, tls_agent_id, agent, head)
    light = dataclasses.replace(prepared.batch, body=b"", signature=b"", key_id=b"")
    return PreparedBatch(light, prepared.rows)


def default_workers() -> int:
    """One worker per core beside the writer's, at most 4; 0 (inline) on one core."""
    return min(4, (os.cpu_count() or 1) - 1)


class Decoder(Protocol):
    def prepare(
        self,
        signed: Signed,
        tls_agent_id: str | None,
        agent: AgentKey | None,
        head: ChainHead | None,
    ) -> PreparedBatch:
        """The verified batch and its rows; raises the IngestError that refuses it."""
        ...

    def close(self) -> None: ...


class InlineDecoder:
    """Verifies and decodes in the caller's thread (tests, one-core machines)."""

    def prepare(
        self,
        signed: Signed,
        tls_agent_id: str | None,
        agent: AgentKey | None,
        head: ChainHead | None,
    ) -> PreparedBatch:
        return verify_and_prepare(signed, tls_agent_id, agent, head)

    def close(self) -> None:
        pass


def _worker_init() -> None:
    # Ctrl-C in a terminal reaches the whole process group: the collector stops its
    # workers itself, and they should not print a KeyboardInterrupt each.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A collector killed with SIGKILL (or by the OOM killer) cannot stop its workers, and
    # a worker waiting for work would wait for ever: go when the parent goes.
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()


def _exit_with(parent: BaseProcess) -> None:
    parent.join()  # returns when the parent's end of the sentinel pipe closes
    os._exit(0)


class PoolDecoder:
    """Verifies and decodes in `workers` processes (spawned: the server's threads are running).

    `start()` spawns them without waiting (they import while the server binds; an upload
    that arrives first waits for them). Thread-safe.
    """

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise ValueError("a pool needs at least one worker")
        self._workers = workers
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None
        self._closed = False

    def start(self) -> None:
        pool = self._current()
        for _ in range(self._workers):
            pool.submit(os.getpid)

    def pids(self) -> set[int]:
        """Worker process ids (for tests and the operator's curiosity)."""
        pool = self._current()
        processes = getattr(pool, "_processes", None) or {}
        return set(processes)

    def _current(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._closed:
                raise DecoderUnavailableError("the collector is stopping")
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    max_workers=self._workers,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_worker_init,
                )
            return self._pool

    def _broken(self, pool: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pool is pool:
                self._pool = None
                logger.error("a decode worker died; starting the pool again")
        pool.shutdown(wait=False, cancel_futures=True)

    def prepare(
        self,
        signed: Signed,
        tls_agent_id: str | None,
        agent: AgentKey | None,
        head: ChainHead | None,
    ) -> PreparedBatch:
        pool = self._current()
        try:
            try:
                future: Future[PreparedBatch] = pool.submit(
                    _verify_and_prepare_remote, signed, tls_agent_id, agent, head
                )
            except BrokenProcessPool:
                raise
            except RuntimeError as e:  # submit after shutdown: close() raced this upload
                raise DecoderUnavailableError(f"the decode workers are stopping: {e}") from e
            light = future.result()
        except BrokenProcessPool as e:
            self._broken(pool)
            raise DecoderUnavailableError("a decode worker died; the batch was not stored") from e
        body, signature, key_id = signed
        batch = dataclasses.replace(light.batch, body=body, signature=signature, key_id=key_id)
        return PreparedBatch(batch, light.rows)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
