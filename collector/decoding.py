"""Verify and decode uploads: the half of ingest that is pure (bytes in, values out).

Ingest's Python work splits in two: verifying a batch and turning its protobuf events into
values and rows, and writing them and running the rules (the single writer). The
collector's ingest process (collector.ingestproc) gives the first half to worker processes
that run `verify_and_prepare_light`, so another core takes it; `Ingestor.upload` runs
`verify_and_prepare` in the caller's thread.

A worker holds nothing: it is sent the agent's enrolled key and chain head with the bytes,
and checks the signature before it parses the body, as `collector.verify` always does. A
refusal comes back as the same IngestError.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import signal
import threading
from multiprocessing.process import BaseProcess

from collector.store import PreparedBatch, SqliteStore
from collector.verify import AgentKey, ChainHead, verify_batch

__all__ = [
    "default_workers",
    "verify_and_prepare",
    "verify_and_prepare_light",
    "with_signed",
    "worker_init",
]

Signed = tuple[bytes, bytes, bytes]
"""(body, signature, key_id) of a SignedBatch: nothing trusted yet."""


def verify_and_prepare(
    signed: Signed, tls_agent_id: str | None, agent: AgentKey | None, head: ChainHead | None
) -> PreparedBatch:
    """`verify_batch`, then the events-table rows: everything of an upload but the writing."""
    batch = verify_batch(signed=signed, tls_agent_id=tls_agent_id, agent=agent, last=head)
    return SqliteStore.prepare(batch)


def verify_and_prepare_light(
    signed: Signed, tls_agent_id: str | None, agent: AgentKey | None, head: ChainHead | None
) -> PreparedBatch:
    """In a worker: as `verify_and_prepare`, sending back neither the body nor the signature
    (the caller has them)."""
    prepared = verify_and_prepare(signed, tls_agent_id, agent, head)
    light = dataclasses.replace(prepared.batch, body=b"", signature=b"", key_id=b"")
    return PreparedBatch(light, prepared.rows)


def with_signed(light: PreparedBatch, signed: Signed) -> PreparedBatch:
    """The inverse of `verify_and_prepare_light`: its result with the body and signature
    the caller kept (what `verify_and_prepare` returns)."""
    body, signature, key_id = signed
    batch = dataclasses.replace(light.batch, body=body, signature=signature, key_id=key_id)
    return PreparedBatch(batch, light.rows)


def default_workers() -> int:
    """One worker per core beside the writer's, at most 4; 0 (in the ingest process's
    reader thread) on one core."""
    return min(4, (os.cpu_count() or 1) - 1)


def worker_init() -> None:
    """Start of a worker process: ignore Ctrl-C and SIGTERM, exit when the parent does."""
    # Ctrl-C in a terminal reaches the whole process group, and systemd's stop sends SIGTERM
    # to the whole unit: the collector stops its workers itself, after the calls they hold.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # A collector killed with SIGKILL (or by the OOM killer) cannot stop its workers, and
    # a worker waiting for work would wait for ever: go when the parent goes.
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()


def _exit_with(parent: BaseProcess) -> None:
    parent.join()  # returns when the parent's end of the sentinel pipe closes
    os._exit(0)
