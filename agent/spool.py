"""Durable SQLite queue between the decision pipeline and the shipper.

The pipeline `append`s decided events; the shipper `seal`s them into signed, hash-chained
batches, sends `next_unacked()` and `ack`s it once the collector has committed it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import assert_never

from agent import codec
from agent.errors import SpoolError
from agent.events import Action, Event
from agent.signer import GENESIS_DIGEST, Signer, batch_digest

__all__ = [
    "BATCH_MAX_AGE_NS",
    "BATCH_MAX_BYTES",
    "BATCH_MAX_EVENTS",
    "DEFAULT_MAX_BYTES",
    "SPOOL_FILE",
    "SealedBatch",
    "Spool",
    "drop_rank",
]

logger = logging.getLogger(__name__)

SPOOL_FILE = "spool.db"
"""File name of the spool inside the agent's state directory."""
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
BATCH_MAX_EVENTS = 500
BATCH_MAX_BYTES = 1024 * 1024
BATCH_MAX_AGE_NS = 1_000_000_000

_SCHEMA_VERSION = 2
_SCHEMA = (
    # Decided events not yet in a batch. seq is the per-agent event sequence number.
    # drop_rank orders what the byte cap drops first (lowest, then oldest); NULL: never.
    """CREATE TABLE IF NOT EXISTS pending (
        seq INTEGER PRIMARY KEY,
        event_id TEXT NOT NULL UNIQUE,
        observed_at_ns INTEGER NOT NULL,
        body BLOB NOT NULL,
        size INTEGER NOT NULL,
        drop_rank INTEGER
    )""",
    """CREATE INDEX IF NOT EXISTS pending_drop_order ON pending (drop_rank, seq, size)
        WHERE drop_rank IS NOT NULL""",
    # Signed batches awaiting the collector's acknowledgement; body is shipped verbatim.
    """CREATE TABLE IF NOT EXISTS batches (
        batch_seq INTEGER PRIMARY KEY,
        body BLOB NOT NULL,
        signature BLOB NOT NULL,
        digest BLOB NOT NULL,
        key_id BLOB NOT NULL,
        n_events INTEGER NOT NULL
    )""",
    # One row: where the event sequence and the batch hash chain continue after a restart.
    """CREATE TABLE IF NOT EXISTS meta (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        agent_id TEXT NOT NULL,
        next_event_seq INTEGER NOT NULL,
        next_batch_seq INTEGER NOT NULL,
        last_digest BLOB NOT NULL,
        dropped INTEGER NOT NULL
    )""",
)


@dataclass(frozen=True)
class SealedBatch:
    """A signed batch as stored in the spool and shipped, byte for byte."""

    batch_seq: int
    """Position in this agent's batch chain; starts at 1, no gaps."""
    body: bytes
    """Serialised `EventBatch`: the signed bytes, never re-serialised."""
    signature: bytes
    """Ed25519 over `signer.BATCH_DOMAIN + body`."""
    digest: bytes
    """SHA-256 of `body`; the next batch's `prev_batch_digest`."""
    key_id: bytes
    """SHA-256 of the public key that signed, kept per batch so a rotated key still ships."""
    n_events: int


class Spool:
    """Durable event queue and signed-batch store in one SQLite file (WAL mode).

    Durability:

    * `append` commits with ``synchronous=NORMAL``: once it returns, the events survive
      ``kill -9`` of the agent (the WAL is written before commit returns), but a power loss
      or kernel crash may lose events appended since the last ``FULL`` commit.
    * `seal`, `ack` commit with ``synchronous=FULL``: the WAL is fsynced before they return,
      so a sealed batch (and every append committed before it, because WAL frames are
      replayed in order) survives power loss, and an acknowledged batch never comes back.
      Sealing is one transaction (insert batch, delete its pending events, advance the
      chain), so a crash leaves either the events pending or the batch sealed, never both.
    * A batch is shipped until acknowledged, so after a crash the collector may receive a
      batch twice; it deduplicates by ``(agent_id, batch_seq)`` and digest (DESIGN §5).

    Byte cap: when the stored payload (pending event bytes + sealed batch bodies) exceeds
    ``max_bytes``, pending events are dropped, least sensitive first (see `drop_rank`:
    unlabelled file events, then file events by label from the lowest of `levels` up,
    oldest first within a rank), until the payload fits again. Every drop is counted in
    the same transaction (`dropped`), and the count is handed back exactly once, in the
    transaction that appends the coverage_gap event reporting it
    (``append(..., reported_drops=n)``). Never dropped: coverage_gap, agent_start and
    agent_stop events (how the collector learns what it is missing), and sealed batches
    (signed links of the hash chain; a gap is a security event at the collector). So the
    cap can be exceeded by those; the SQLite file itself is also somewhat larger.

    Concurrency: one connection guarded by a lock, shared by the pipeline and shipper
    threads. The database is opened with ``locking_mode=EXCLUSIVE``, so a second process
    (a second agent on the same state directory) fails to open it with SpoolError.
    """

    def __init__(
        self,
        conn: sqlite3.Connection,
        *,
        agent_id: str,
        signer: Signer,
        max_bytes: int,
        levels: Sequence[str] = (),
    ) -> None:
        """Use `Spool.open`; this constructor expects a connection with the schema in place."""
        self._conn: sqlite3.Connection | None = conn
        self._agent_id = agent_id
        self._signer = signer
        self._max_bytes = max_bytes
        self._levels = tuple(levels)
        self._ranks = _ranks(self._levels)
        self._lock = threading.Lock()
        # Totals kept in memory (the exclusive lock makes this connection the only writer)
        # so that the byte cap and depth() never scan the tables.
        n, size = conn.execute("SELECT count(*), coalesce(sum(size), 0) FROM pending").fetchone()
        self._pending_n: int = n
        self._pending_bytes: int = size
        n, size = conn.execute(
            "SELECT count(*), coalesce(sum(length(body)), 0) FROM batches"
        ).fetchone()
        self._batches_n: int = n
        self._batch_bytes: int = size

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        agent_id: str,
        signer: Signer,
        max_bytes: int = DEFAULT_MAX_BYTES,
        levels: Sequence[str] = (),
    ) -> Spool:
        """Open or create the spool database at `path` (normally ``state_dir / SPOOL_FILE``).

        `levels` are the label names, least sensitive first (``config.labels.levels``);
        they decide what the byte cap drops first. A label missing from them ranks above
        all of them (an event we cannot rank is not the first to go). An event keeps the
        rank it was appended with.

        Raises SpoolError if the file cannot be opened, is in use by another process,
        has a newer schema, or belongs to a different agent id.
        """
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        if len(set(levels)) != len(levels):
            raise ValueError("levels must be unique")
        try:
            # Create it private before SQLite does (SQLite would honour the umask); the
            # WAL file inherits the database file's mode.
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
        except OSError as e:
            raise SpoolError(f"cannot create spool {path}: {e.strerror}") from e
        conn: sqlite3.Connection | None = None
        try:
            conn = sqlite3.connect(path, timeout=0, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA locking_mode = EXCLUSIVE")
            (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
            if mode != "wal":
                raise SpoolError(f"spool {path}: cannot enable WAL (journal_mode={mode})")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("BEGIN IMMEDIATE")
            _init_schema(conn, path, agent_id, _ranks(levels))
            conn.execute("COMMIT")
            spool = cls(conn, agent_id=agent_id, signer=signer, max_bytes=max_bytes, levels=levels)
        except sqlite3.Error as e:
            if conn is not None:
                conn.close()
            raise SpoolError(f"cannot open spool {path}: {e}") from e
        except BaseException:
            if conn is not None:
                conn.close()
            raise
        logger.info(
            "opened spool %s: %d pending events, %d sealed batches",
            path,
            spool._pending_n,
            spool._batches_n,
        )
        return spool

    def append(self, events: Sequence[Event], *, reported_drops: int = 0) -> list[int]:
        """Assign the next event seqs, store the encoded events in one transaction.

        Returns the assigned seqs. If the byte cap is exceeded, pending events (possibly
        some of these) are dropped, least sensitive first, and counted; their seqs stay
        used, so the collector sees the hole. `reported_drops` is the number of drops
        these events report (a coverage_gap with `dropped()`'s count): it is subtracted
        from the count in the same transaction, so a crash can neither lose the count
        nor report it twice.
        """
        if not events:
            if reported_drops:
                raise ValueError("reported_drops needs the event that reports them")
            return []
        with self._locked() as conn, self._txn(conn, durable=False):
            first, owed = conn.execute("SELECT next_event_seq, dropped FROM meta").fetchone()
            if not 0 <= reported_drops <= owed:
                raise ValueError(f"reported_drops={reported_drops}, but {owed} drops are counted")
            seqs = list(range(first, first + len(events)))
            rows = []
            for seq, ev in zip(seqs, events, strict=True):
                body = codec.event_to_bytes(replace(ev, seq=seq))
                rank = drop_rank(ev, self._ranks)
                rows.append((seq, ev.event_id, ev.observed_at_ns, body, len(body), rank))
            conn.executemany(
                "INSERT INTO pending (seq, event_id, observed_at_ns, body, size, drop_rank)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )
            conn.execute(
                "UPDATE meta SET next_event_seq = ?, dropped = dropped - ?",
                (first + len(events), reported_drops),
            )
            added = sum(r[4] for r in rows)
            excess = self._pending_bytes + added + self._batch_bytes - self._max_bytes
            dropped = _drop_pending(conn, excess)
        bytes_dropped = sum(size for size, _ in dropped.values())
        n_dropped = sum(n for _, n in dropped.values())
        self._pending_n += len(rows) - n_dropped
        self._pending_bytes += added - bytes_dropped
        if n_dropped:
            logger.warning(
                "spool over %d bytes: dropped %d pending events (%s)",
                self._max_bytes,
                n_dropped,
                ", ".join(
                    f"{self._rank_name(rank)} {n}" for rank, (_, n) in sorted(dropped.items())
                ),
            )
        return seqs

    def _rank_name(self, rank: int) -> str:
        if rank == 0:
            return "unlabelled"
        if rank <= len(self._levels):
            return self._levels[rank - 1]
        return "other labels"

    def should_seal(
        self,
        now_ns: int,
        *,
        max_events: int = BATCH_MAX_EVENTS,
        max_bytes: int = BATCH_MAX_BYTES,
        max_age_ns: int = BATCH_MAX_AGE_NS,
    ) -> bool:
        """Whether a full batch is pending, or the oldest pending event is `max_age_ns` old.

        Age is measured from the event's `observed_at_ns` (same wall clock as `now_ns`).
        """
        with self._locked() as conn:
            if self._pending_n == 0:
                return False
            if self._pending_n >= max_events or self._pending_bytes >= max_bytes:
                return True
            (oldest,) = conn.execute(
                "SELECT observed_at_ns FROM pending ORDER BY seq LIMIT 1"
            ).fetchone()
        age = now_ns - int(oldest)
        # A negative age means the wall clock stepped back: seal now rather than hold the
        # events until the clock catches up with their timestamps.
        return age >= max_age_ns or age < 0

    def seal(
        self,
        now_ns: int,
        *,
        max_events: int = BATCH_MAX_EVENTS,
        max_bytes: int = BATCH_MAX_BYTES,
    ) -> SealedBatch | None:
        """Seal the oldest pending events into the next signed batch; None if none pend.

        Takes events in seq order up to `max_events` and `max_bytes` of event bytes
        (at least one event, even a larger one, so an oversized event cannot wedge the
        queue). Building, signing, storing the batch and deleting its events is one
        durable transaction.
        """
        if max_events < 1 or max_bytes < 1:
            raise ValueError("max_events and max_bytes must be positive")
        with self._locked() as conn:
            if self._pending_n == 0:
                return None
            with self._txn(conn, durable=True):
                bodies: list[bytes] = []
                total = 0
                last_seq = 0
                rows = conn.execute(
                    "SELECT seq, body FROM pending ORDER BY seq LIMIT ?", (max_events,)
                ).fetchall()
                for seq, body in rows:
                    if bodies and total + len(body) > max_bytes:
                        break
                    bodies.append(body)
                    total += len(body)
                    last_seq = seq
                batch_seq, prev = conn.execute(
                    "SELECT next_batch_seq, last_digest FROM meta"
                ).fetchone()
                payload = codec.encode_batch(self._agent_id, batch_seq, prev, now_ns, bodies)
                batch = SealedBatch(
                    batch_seq=batch_seq,
                    body=payload,
                    signature=self._signer.sign_batch(payload),
                    digest=batch_digest(payload),
                    key_id=self._signer.key_id(),
                    n_events=len(bodies),
                )
                conn.execute(
                    "INSERT INTO batches (batch_seq, body, signature, digest, key_id, n_events)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        batch.batch_seq,
                        batch.body,
                        batch.signature,
                        batch.digest,
                        batch.key_id,
                        batch.n_events,
                    ),
                )
                conn.execute("DELETE FROM pending WHERE seq <= ?", (last_seq,))
                conn.execute(
                    "UPDATE meta SET next_batch_seq = ?, last_digest = ?",
                    (batch_seq + 1, batch.digest),
                )
            self._pending_n -= len(bodies)
            self._pending_bytes -= total
            self._batches_n += 1
            self._batch_bytes += len(payload)
        logger.debug("sealed batch %d with %d events", batch.batch_seq, batch.n_events)
        return batch

    def next_unacked(self) -> SealedBatch | None:
        """The lowest-numbered sealed batch not yet acknowledged (ship it next)."""
        with self._locked() as conn:
            row = conn.execute(
                "SELECT batch_seq, body, signature, digest, key_id, n_events"
                " FROM batches ORDER BY batch_seq LIMIT 1"
            ).fetchone()
        if row is None:
            return None
        return SealedBatch(
            batch_seq=row[0],
            body=row[1],
            signature=row[2],
            digest=row[3],
            key_id=row[4],
            n_events=row[5],
        )

    def ack(self, batch_seq: int) -> None:
        """Forget a batch the collector has committed. Acking an unknown batch is a no-op."""
        with self._locked() as conn:
            with self._txn(conn, durable=True):
                row = conn.execute(
                    "SELECT length(body) FROM batches WHERE batch_seq = ?", (batch_seq,)
                ).fetchone()
                if row is not None:
                    conn.execute("DELETE FROM batches WHERE batch_seq = ?", (batch_seq,))
            if row is None:
                logger.debug("ack for batch %d which is not in the spool", batch_seq)
                return
            self._batches_n -= 1
            self._batch_bytes -= row[0]

    def sync(self) -> None:
        """Make every append committed so far survive power loss: one fsync of the WAL.

        Appends commit with ``synchronous=NORMAL``; a seal or an ack makes them durable on
        the way. The shipper seals nothing while a batch waits for the collector (agent.
        shipper), so it calls this instead, at most every ``max_delay``.
        """
        with self._locked() as conn:
            # A checkpoint fsyncs the WAL (synchronous NORMAL or FULL) before it copies it
            # into the database file, and that file after. (An idle write, such as
            # "UPDATE meta SET dropped = dropped", commits nothing, so it syncs nothing.)
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def depth(self) -> tuple[int, int]:
        """(pending events, sealed unacknowledged batches)."""
        with self._locked():
            return self._pending_n, self._batches_n

    def dropped(self) -> int:
        """Events dropped by the byte cap and not yet reported (see `append`)."""
        with self._locked() as conn:
            (n,) = conn.execute("SELECT dropped FROM meta").fetchone()
        return int(n)

    def take_dropped(self) -> int:
        """Return and reset the count of events dropped by the byte cap.

        Prefer ``append([gap_event], reported_drops=dropped())``: with this method the
        reset and the coverage_gap event's append are two commits, and a ``kill -9``
        between them loses the count (a power loss loses both, or the reset, and the
        count is reported again, which is also safe).
        """
        with self._locked() as conn, self._txn(conn, durable=False):
            (n,) = conn.execute("SELECT dropped FROM meta").fetchone()
            if n:
                conn.execute("UPDATE meta SET dropped = 0")
        return int(n)

    def close(self) -> None:
        """Close the database (idempotent). Nothing is lost by not calling it."""
        with self._lock:
            if self._conn is not None:
                conn, self._conn = self._conn, None
                try:
                    conn.close()
                except sqlite3.Error as e:
                    raise SpoolError(f"cannot close spool: {e}") from e

    def __enter__(self) -> Spool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[sqlite3.Connection]:
        """Hold the lock and translate sqlite3 errors raised inside into SpoolError."""
        with self._lock:
            if self._conn is None:
                raise SpoolError("spool is closed")
            try:
                yield self._conn
            except sqlite3.Error as e:
                raise SpoolError(f"spool operation failed: {e}") from e

    @staticmethod
    @contextlib.contextmanager
    def _txn(conn: sqlite3.Connection, *, durable: bool) -> Iterator[None]:
        """One write transaction; rolled back if the body raises."""
        # synchronous cannot change inside a transaction, so set it per transaction.
        conn.execute("PRAGMA synchronous = FULL" if durable else "PRAGMA synchronous = NORMAL")
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise


def drop_rank(event: Event, ranks: Mapping[str, int]) -> int | None:
    """Where `event` stands in the byte cap's drop order: lowest first; None: never dropped.

    0 for a file event without a label, 1 + its rank for a labelled one (`ranks` maps
    label -> 0 for the least sensitive), 1 + len(ranks) for a label not in `ranks`.
    """
    action = event.action
    match action:
        case Action.COVERAGE_GAP | Action.AGENT_START | Action.AGENT_STOP:
            return None
        case Action.COPY | Action.MOVE | Action.READ | Action.WRITE | Action.DELETE | Action.RENAME:
            if not event.label:
                return 0
            return 1 + ranks.get(event.label, len(ranks))
        case _:
            assert_never(action)


def _ranks(levels: Sequence[str]) -> dict[str, int]:
    return {label: i for i, label in enumerate(levels)}


def _init_schema(
    conn: sqlite3.Connection, path: Path, agent_id: str, ranks: Mapping[str, int]
) -> None:
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    if version > _SCHEMA_VERSION:
        raise SpoolError(f"spool {path} has schema version {version}, newer than this agent")
    if version == 1:
        # v2 ranks pending events for the byte cap; rank what a v1 agent left behind.
        conn.execute("ALTER TABLE pending ADD COLUMN drop_rank INTEGER")
        rows = conn.execute("SELECT seq, body FROM pending").fetchall()
        conn.executemany(
            "UPDATE pending SET drop_rank = ? WHERE seq = ?",
            [(drop_rank(codec.event_from_bytes(body), ranks), seq) for seq, body in rows],
        )
    for statement in _SCHEMA:
        conn.execute(statement)
    conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION:d}")
    row = conn.execute("SELECT agent_id FROM meta").fetchone()
    if row is None:
        conn.execute(
            "INSERT INTO meta (id, agent_id, next_event_seq, next_batch_seq, last_digest,"
            " dropped) VALUES (1, ?, 1, 1, ?, 0)",
            (agent_id, GENESIS_DIGEST),
        )
    elif row[0] != agent_id:
        # Its batches are signed under the old identity and its chain is the old agent's.
        raise SpoolError(
            f"spool {path} belongs to agent {row[0]!r}, not {agent_id!r}; "
            "ship or move it away before running under a new identity"
        )


def _drop_pending(conn: sqlite3.Connection, excess: int) -> dict[int, tuple[int, int]]:
    """Delete droppable pending events, lowest rank then oldest first, until `excess` bytes
    are freed (or nothing droppable is left), and count them.

    Returns {rank: (bytes, events)} of what was dropped.
    """
    dropped: dict[int, tuple[int, int]] = {}
    if excess <= 0:
        return dropped
    freed = 0
    last: tuple[int, int] | None = None
    sizes: Counter[int] = Counter()
    counts: Counter[int] = Counter()
    cursor = conn.execute(
        "SELECT drop_rank, seq, size FROM pending WHERE drop_rank IS NOT NULL"
        " ORDER BY drop_rank, seq"
    )
    try:
        for rank, seq, size in cursor:
            sizes[rank] += size
            counts[rank] += 1
            freed += size
            last = (rank, seq)
            if freed >= excess:
                break
    finally:
        cursor.close()
    if last is None:
        return dropped
    # Everything before `last` in (drop_rank, seq) order, and `last` itself.
    conn.execute(
        "DELETE FROM pending WHERE drop_rank < ? OR (drop_rank = ? AND seq <= ?)",
        (last[0], *last),
    )
    conn.execute("UPDATE meta SET dropped = dropped + ?", (sum(counts.values()),))
    return {rank: (sizes[rank], counts[rank]) for rank in counts}
