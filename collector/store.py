"""Persistence of the collector: verify -> **store** -> thresholds/alerts, on SQLite.

Schema at the top; writes are serialised on one connection, reads use one per thread.
"""

from __future__ import annotations

import hmac
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar, assert_never

from collector import queries
from collector.errors import (
    EnrollmentError,
    IngestError,
    NotFoundError,
    ReplayConflictError,
    StoreError,
)
from collector.longalerts import LONG_SCHEMA
from collector.models import (
    AlertId,
    AlertOpened,
    EvidenceAdded,
    GroupKey,
    Severity,
    StoredEvent,
    ThresholdDecision,
    VerifiedBatch,
)
from collector.records import AgentRecord, AlertRecord, StoreCounts, StoredBatch, StoreResult
from collector.verify import AgentKey, ChainHead, classify_seq

__all__ = [
    "SCHEMA_VERSION",
    "AgentRecord",
    "AlertRecord",
    "BatchWrite",
    "PreparedBatch",
    "SqliteStore",
    "StoreResult",
    "StoredBatch",
]

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 2
"""2: console users, sessions, login failures, alert notes, the trail; alerts.assignee;
events.archive_member."""
SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS agents (
    agent_id TEXT PRIMARY KEY, public_key BLOB NOT NULL, key_id BLOB NOT NULL UNIQUE,
    hostname TEXT NOT NULL, agent_version TEXT NOT NULL, enrolled_at_ns INTEGER NOT NULL,
    last_seen_ns INTEGER NOT NULL DEFAULT 0, revoked INTEGER NOT NULL DEFAULT 0,
    cert_serial TEXT NOT NULL DEFAULT '', policy_revision TEXT NOT NULL DEFAULT '',
    spool_depth INTEGER NOT NULL DEFAULT 0, coverage_gaps INTEGER NOT NULL DEFAULT 0,
    cpu_percent REAL NOT NULL DEFAULT 0, rss_bytes INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS tokens (
    token_id TEXT PRIMARY KEY, secret_hash BLOB NOT NULL, created_at_ns INTEGER NOT NULL,
    expires_at_ns INTEGER NOT NULL, uses_left INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS batches (
    agent_id TEXT NOT NULL REFERENCES agents (agent_id), batch_seq INTEGER NOT NULL,
    digest BLOB NOT NULL, prev_digest BLOB NOT NULL, body BLOB NOT NULL,
    signature BLOB NOT NULL, key_id BLOB NOT NULL, received_at_ns INTEGER NOT NULL,
    PRIMARY KEY (agent_id, batch_seq));
-- Batches holding events dated after they arrived (an agent clock ahead): the rules
-- counted those events at received_at_ns, and a restart counts them so again.
CREATE TABLE IF NOT EXISTS future_dated_batches (
    agent_id TEXT NOT NULL, batch_seq INTEGER NOT NULL, received_at_ns INTEGER NOT NULL,
    PRIMARY KEY (agent_id, batch_seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    event_id TEXT PRIMARY KEY, agent_id TEXT NOT NULL, batch_seq INTEGER NOT NULL,
    seq INTEGER NOT NULL, observed_at_ns INTEGER NOT NULL, action TEXT NOT NULL,
    host TEXT NOT NULL, user TEXT NOT NULL, label TEXT NOT NULL, label_source TEXT NOT NULL,
    source_path BLOB NOT NULL, source_size INTEGER NOT NULL, source_sha256 TEXT NOT NULL,
    dest_path BLOB NOT NULL, dest_size INTEGER NOT NULL, dest_sha256 TEXT NOT NULL,
    destination_class TEXT NOT NULL, detection TEXT NOT NULL, attribution TEXT NOT NULL,
    process_json TEXT, device_json TEXT, gap_reason TEXT NOT NULL, gap_count INTEGER NOT NULL,
    archive_member BLOB NOT NULL DEFAULT x'', access_count INTEGER NOT NULL DEFAULT 1,
    FOREIGN KEY (agent_id, batch_seq) REFERENCES batches (agent_id, batch_seq));
CREATE INDEX IF NOT EXISTS events_time ON events (observed_at_ns);
CREATE INDEX IF NOT EXISTS events_user_time ON events (user, observed_at_ns);
CREATE INDEX IF NOT EXISTS events_lifecycle ON events (agent_id, observed_at_ns)
    WHERE action IN ('agent_start', 'agent_stop');
CREATE TABLE IF NOT EXISTS alerts (
    alert_id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('threshold', 'security')),
    rule TEXT NOT NULL, group_json TEXT NOT NULL, severity TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('new', 'in_progress', 'resolved', 'false_positive')),
    reason TEXT NOT NULL, created_at_ns INTEGER NOT NULL, updated_at_ns INTEGER NOT NULL,
    files INTEGER NOT NULL, bytes INTEGER NOT NULL, first_ns INTEGER NOT NULL,
    last_ns INTEGER NOT NULL, hot_until_ns INTEGER NOT NULL, agent_id TEXT NOT NULL,
    count INTEGER NOT NULL DEFAULT 1, details TEXT NOT NULL DEFAULT '',
    assignee TEXT);
CREATE INDEX IF NOT EXISTS alerts_group ON alerts (kind, rule, group_json, status);
CREATE INDEX IF NOT EXISTS alerts_status ON alerts (status, alert_id);
CREATE TABLE IF NOT EXISTS alert_events (
    alert_id INTEGER NOT NULL REFERENCES alerts (alert_id),
    event_id TEXT NOT NULL REFERENCES events (event_id),
    PRIMARY KEY (alert_id, event_id)) WITHOUT ROWID;
-- The console (collector.users, collector.triage, collector.trail). Users are locked,
-- never deleted, so every trail entry keeps pointing at somebody.
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY COLLATE NOCASE,
    role TEXT NOT NULL CHECK (role IN ('admin', 'analyst', 'viewer')),
    password_hash TEXT NOT NULL, locked INTEGER NOT NULL DEFAULT 0,
    created_at_ns INTEGER NOT NULL, last_login_ns INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS sessions (
    id_hash BLOB PRIMARY KEY, user TEXT NOT NULL REFERENCES users (name), csrf TEXT NOT NULL,
    created_at_ns INTEGER NOT NULL, last_seen_ns INTEGER NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS sessions_user ON sessions (user);
CREATE TABLE IF NOT EXISTS login_failures (subject TEXT NOT NULL, at_ns INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS login_failures_subject ON login_failures (subject, at_ns);
CREATE TABLE IF NOT EXISTS alert_notes (
    note_id INTEGER PRIMARY KEY, alert_id INTEGER NOT NULL REFERENCES alerts (alert_id),
    author TEXT NOT NULL, at_ns INTEGER NOT NULL, text TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS alert_notes_alert ON alert_notes (alert_id, note_id);
CREATE TABLE IF NOT EXISTS trail (
    seq INTEGER PRIMARY KEY, at_ns INTEGER NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL,
    target TEXT NOT NULL, detail TEXT NOT NULL, prev_hash BLOB NOT NULL, hash BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS trail_target ON trail (target, seq);
CREATE INDEX IF NOT EXISTS trail_actor ON trail (actor, seq);
"""
TRIGGERS = (  # apart from SCHEMA: a trigger's body holds ';', which SCHEMA is split on
    "CREATE TRIGGER IF NOT EXISTS users_never_deleted BEFORE DELETE ON users"
    " BEGIN SELECT RAISE(ABORT, 'users are locked, never deleted'); END",
    "CREATE TRIGGER IF NOT EXISTS alert_notes_no_update BEFORE UPDATE ON alert_notes"
    " BEGIN SELECT RAISE(ABORT, 'notes are append-only'); END",
    "CREATE TRIGGER IF NOT EXISTS alert_notes_no_delete BEFORE DELETE ON alert_notes"
    " BEGIN SELECT RAISE(ABORT, 'notes are append-only'); END",
    # Defence in depth: collector.trail.Trail.verify still catches edits made without them.
    "CREATE TRIGGER IF NOT EXISTS trail_no_update BEFORE UPDATE ON trail"
    " BEGIN SELECT RAISE(ABORT, 'the trail is append-only'); END",
    "CREATE TRIGGER IF NOT EXISTS trail_no_delete BEFORE DELETE ON trail"
    " BEGIN SELECT RAISE(ABORT, 'the trail is append-only'); END",
)

_LAST_LIFECYCLE = (  # served by the partial index events_lifecycle
    "SELECT action FROM events WHERE agent_id = ? AND action IN ('agent_start', 'agent_stop')"
    " ORDER BY observed_at_ns DESC LIMIT 1"
)
_TOUCH = (  # a None leaves the column as it is
    "UPDATE agents SET last_seen_ns = max(last_seen_ns, ?),"
    " agent_version = coalesce(?, agent_version), policy_revision = coalesce(?, policy_revision),"
    " spool_depth = coalesce(?, spool_depth), coverage_gaps = coalesce(?, coverage_gaps),"
    " cert_serial = coalesce(?, cert_serial), cpu_percent = coalesce(?, cpu_percent),"
    " rss_bytes = coalesce(?, rss_bytes) WHERE agent_id = ?"
)

BACKSTOP_PAGES = 16384
"""wal_autocheckpoint of the writer once the checkpointer runs: 64 MiB of WAL."""
WRITER_CACHE_KIB = 64 * 1024
"""Page cache of the writing connection. Ingest inserts land on random pages of the
event-id and user indexes, which outgrow SQLite's default 2 MiB cache after some 50k
events; each miss is then a read from the OS (about 5% of ingest time at 150k events)."""
CHECKPOINT_EVERY_S = 0.25
"""Least time between two background checkpoints (see `_checkpoint_loop`)."""

Decide = Callable[[StoredEvent], list[ThresholdDecision]]
AfterEvents = Callable[[sqlite3.Connection, tuple[StoredEvent, ...]], Sequence[AlertId]]
"""Runs inside a batch's transaction on its new events; returns the alerts it opened."""
_T = TypeVar("_T")
_INSERT_BATCH = (
    "INSERT INTO batches (agent_id, batch_seq, digest, prev_digest, body, signature, key_id,"
    " received_at_ns) VALUES"
)
_SEEN = "UPDATE agents SET last_seen_ns = max(last_seen_ns, ?) WHERE agent_id = ?"
_FUTURE_DATED = (
    "INSERT OR IGNORE INTO future_dated_batches (agent_id, batch_seq, received_at_ns)"
    " VALUES (?, ?, ?)"
)


def connection_pragmas(synchronous: str, *, writer: bool) -> tuple[str, ...]:
    """The PRAGMAs the store runs on each new connection (bench/ingest.py mirrors them)."""
    pragmas = (
        "PRAGMA journal_mode = WAL",
        f"PRAGMA synchronous = {synchronous}",
        "PRAGMA foreign_keys = ON",
    )
    if not writer:
        return pragmas
    # temp_store: the statement journal of a multi-row INSERT (queries.insert_rows) stays in
    # memory rather than in a temporary file; measured 5-10% of the insert time.
    return (*pragmas, f"PRAGMA cache_size = -{WRITER_CACHE_KIB}", "PRAGMA temp_store = MEMORY")


@dataclass(frozen=True)
class PreparedBatch:
    """A verified batch and its events-table rows (`SqliteStore.prepare`)."""

    batch: VerifiedBatch
    rows: tuple[tuple[object, ...], ...]
    """One row per event, in event order and EVENT_COLUMNS order."""


@dataclass(frozen=True)
class BatchWrite:
    """One batch for `SqliteStore.store_batches`, with what `store_batch` takes beside it."""

    batch: PreparedBatch
    decide: Decide
    now_ns: int
    security: Sequence[tuple[str, str, Severity]] = ()
    after: AfterEvents | None = None


class SqliteStore:
    """The collector's database (SQLite, WAL, foreign keys on); safe to share between threads.

    Durability: synchronous="FULL" (the default, and what `serve` uses) syncs the WAL on
    every commit (one fsync per batch of events), so every acknowledgement survives power
    loss: the agent deletes a batch once it is acknowledged. "NORMAL" keeps every commit
    through a crash or kill of the collector process, and the database is never
    corrupted, but an OS crash or power loss can lose the commits made since the WAL was
    last synced (at each checkpoint), i.e. batches already acknowledged and dropped.
    """

    def __init__(
        self, path: str | Path, *, synchronous: Literal["NORMAL", "FULL"] = "FULL"
    ) -> None:
        self._path = str(path)
        self._synchronous = synchronous
        self._lock = threading.Lock()
        """Serialises write transactions; held while `decide` runs."""
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._closed = False
        self._checkpoint_wanted = threading.Event()
        self._stopping = threading.Event()
        self._checkpointer: threading.Thread | None = None
        self._writer = self._connect(writer=True)
        try:
            self._create_schema()
        except BaseException:
            self._writer.close()
            raise

    def _create_schema(self) -> None:
        with self._write() as con:
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    con.execute(statement)
            version = con.execute("SELECT max(version) FROM schema_version").fetchone()[0]
            if version is None:
                con.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            elif version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self._path}: schema version {version} is newer than this collector"
                    f" ({SCHEMA_VERSION}); upgrade exfilwatch"
                )
            _migrate(con)
            for statement in LONG_SCHEMA.split(";"):
                if statement.strip():
                    con.execute(statement)
            for trigger in TRIGGERS:
                con.execute(trigger)
            if version is not None and version < SCHEMA_VERSION:
                con.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))

    @classmethod
    def open(
        cls, path: str | Path, *, synchronous: Literal["NORMAL", "FULL"] = "FULL"
    ) -> SqliteStore:
        """Open (creating if needed) the database at `path`."""
        return cls(path, synchronous=synchronous)

    def __enter__(self) -> SqliteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the checkpointer and close every connection; the store is unusable afterwards."""
        with self._lock:
            self._closed = True
        self._stopping.set()
        self._checkpoint_wanted.set()
        if self._checkpointer is not None:
            self._checkpointer.join()
        with self._lock:
            for con in [self._writer, *self._readers]:
                con.close()
            self._readers.clear()

    # -- connections ---------------------------------------------------------------

    def _connect(self, *, writer: bool = False) -> sqlite3.Connection:
        try:
            # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE below).
            con = sqlite3.connect(
                self._path, timeout=10.0, isolation_level=None, check_same_thread=False
            )
            for pragma in connection_pragmas(self._synchronous, writer=writer):
                con.execute(pragma)
        except sqlite3.Error as e:
            raise StoreError(f"cannot open database {self._path}: {e}") from e
        return con

    def _reader(self) -> sqlite3.Connection:
        con: sqlite3.Connection | None = getattr(self._local, "con", None)
        if con is None:
            with self._lock:
                if self._closed:
                    raise StoreError("the store is closed")
                con = self._connect()
                self._readers.append(con)
            self._local.con = con
        elif self._closed:
            raise StoreError("the store is closed")
        return con

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: BEGIN IMMEDIATE ... COMMIT, rolled back on any error."""
        with self._lock:
            if self._closed:
                raise StoreError("the store is closed")
            con = self._writer
            try:
                con.execute("BEGIN IMMEDIATE")
                yield con
                con.execute("COMMIT")
            except BaseException as e:
                if con.in_transaction:
                    con.rollback()
                if isinstance(e, sqlite3.Error):
                    raise StoreError(f"database error: {e}") from e
                raise

    def _checkpoint_soon(self) -> None:
        """Have the checkpointer copy the WAL into the database, off the ingest path.

        SQLite's automatic checkpoint runs inside the committing transaction and, with
        its fsyncs, costs ingest about as much as the inserts. A daemon thread is safe
        here: a checkpoint cut short by exit loses nothing, the WAL stays authoritative.
        """
        if self._checkpointer is None:
            with self._lock:
                if self._closed or self._checkpointer is not None:
                    return
                con = self._connect()
                # Backstop only: the writer checkpoints itself if this thread falls behind.
                self._writer.execute(f"PRAGMA wal_autocheckpoint = {BACKSTOP_PAGES}")
                self._checkpointer = threading.Thread(
                    target=self._checkpoint_loop, args=(con,), name="sqlite-checkpoint", daemon=True
                )
                self._checkpointer.start()
        self._checkpoint_wanted.set()

    def _checkpoint_loop(self, con: sqlite3.Connection) -> None:
        try:
            while True:
                self._checkpoint_wanted.wait()
                self._checkpoint_wanted.clear()
                if self._closed:
                    return
                try:
                    con.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error as e:
                    logger.warning("WAL checkpoint failed: %s", e)
                # Commits made meanwhile wait for the next round: a checkpoint copies each
                # page once however often it was rewritten, and ingest rewrites the same
                # index pages batch after batch (random event ids and users).
                self._stopping.wait(CHECKPOINT_EVERY_S)
        finally:
            con.close()

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        con = self._reader()
        try:
            yield con
        except sqlite3.Error as e:
            raise StoreError(f"database error: {e}") from e

    # -- agents and tokens ---------------------------------------------------------

    def add_agent(
        self,
        *,
        agent_id: str,
        public_key: bytes,
        key_id: bytes,
        hostname: str,
        agent_version: str,
        enrolled_at_ns: int,
        cert_serial: str = "",
    ) -> None:
        """Enrol an agent; EnrollmentError if the id or key is already enrolled."""
        with self._write() as con:
            try:
                con.execute(
                    "INSERT INTO agents (agent_id, public_key, key_id, hostname, agent_version,"
                    " enrolled_at_ns, cert_serial) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (agent_id, public_key, key_id, hostname, agent_version,
                     enrolled_at_ns, cert_serial),
                )  # fmt: skip
            except sqlite3.IntegrityError as e:
                raise EnrollmentError(f"agent {agent_id!r} or its key is already enrolled") from e

    def get_agent(self, agent_id: str) -> AgentRecord | None:
        with self._read() as con:
            return queries.get_agent(con, agent_id)

    def get_agent_key(self, agent_id: str) -> AgentKey | None:
        """The key enrolled for `agent_id`, as `verify_batch` wants it."""
        agent = self.get_agent(agent_id)
        if agent is None:
            return None
        return AgentKey(agent.agent_id, agent.public_key_raw, agent.key_id, agent.revoked)

    def list_agents(self) -> list[AgentRecord]:
        with self._read() as con:
            return queries.list_agents(con)

    def touch_agent(
        self,
        agent_id: str,
        now_ns: int,
        *,
        agent_version: str | None = None,
        policy_revision: str | None = None,
        spool_depth: int | None = None,
        coverage_gaps: int | None = None,
        cert_serial: str | None = None,
        cpu_percent: float | None = None,
        rss_bytes: int | None = None,
    ) -> None:
        """Record a heartbeat (or any sign of life) and the fields it reported."""
        params = (
            now_ns, agent_version, policy_revision, spool_depth, coverage_gaps, cert_serial,
            cpu_percent, rss_bytes,
        )  # fmt: skip
        with self._write() as con:
            if con.execute(_TOUCH, (*params, agent_id)).rowcount == 0:
                raise NotFoundError(f"no agent {agent_id!r}")

    def revoke_agent(self, agent_id: str) -> None:
        """Refuse every later batch of the agent (verify sees `revoked`)."""
        with self._write() as con:
            sql = "UPDATE agents SET revoked = 1 WHERE agent_id = ?"
            if con.execute(sql, (agent_id,)).rowcount == 0:
                raise NotFoundError(f"no agent {agent_id!r}")

    def add_token(
        self, token_id: str, secret_hash: bytes, created_at_ns: int, expires_at_ns: int, uses: int
    ) -> None:
        with self._write() as con:
            con.execute(
                "INSERT INTO tokens (token_id, secret_hash, created_at_ns, expires_at_ns,"
                " uses_left) VALUES (?, ?, ?, ?, ?)",
                (token_id, secret_hash, created_at_ns, expires_at_ns, uses),
            )

    def consume_token(self, token_id: str, secret_hash: bytes, now_ns: int) -> bool:
        """Use up one use of a token if it exists, matches, has not expired and has uses left."""
        with self._write() as con:
            row = con.execute(
                "SELECT secret_hash, expires_at_ns, uses_left FROM tokens WHERE token_id = ?",
                (token_id,),
            ).fetchone()
            if row is None:
                return False
            stored, expires_at_ns, uses_left = row
            if not hmac.compare_digest(stored, secret_hash):
                return False
            if now_ns >= expires_at_ns or uses_left <= 0:
                return False
            sql = "UPDATE tokens SET uses_left = uses_left - 1 WHERE token_id = ?"
            con.execute(sql, (token_id,))
            return True

    # -- ingest --------------------------------------------------------------------

    def chain_head(self, agent_id: str) -> ChainHead | None:
        with self._read() as con:
            return _head(con, agent_id)

    @staticmethod
    def prepare(batch: VerifiedBatch) -> PreparedBatch:
        """The batch with its events-table rows built; pure, so callers can do it unlocked."""
        return PreparedBatch(batch, tuple(queries.event_rows(batch.events)))

    def store_batch(
        self,
        batch: VerifiedBatch | PreparedBatch,
        decide: Decide,
        now_ns: int,
        *,
        security: Sequence[tuple[str, str, Severity]] = (),
        after: AfterEvents | None = None,
    ) -> StoreResult:
        """Store a verified batch, its new events and the alerts they cause, atomically.

        A byte-identical replay returns duplicate=True and stores nothing; the same
        batch_seq with other bytes raises ReplayConflictError. `decide` runs under the
        store's write lock for each newly stored event (ids seen in an earlier batch are
        skipped); if it raises, nothing of the batch is stored. `security`: (kind, message,
        severity) of security alerts the batch raises although it is stored (e.g. dated
        in the future), recorded in the same transaction (not for a duplicate). `after`
        runs once with the transaction's connection and the new events, after the threshold
        decisions are written (the long rules), and returns the alerts it opened.
        """
        prepared = batch if isinstance(batch, PreparedBatch) else self.prepare(batch)
        (outcome,) = self.store_batches([BatchWrite(prepared, decide, now_ns, security, after)])
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def store_batches(self, writes: Sequence[BatchWrite]) -> list[StoreResult | IngestError]:
        """`store_batch` for several batches in one transaction: one commit, one fsync.

        Each batch is stored as `store_batch` would on its own, in order, and later ones
        see earlier ones (a batch sent twice in one group is a duplicate the second time;
        an event id in two of them is stored once). A batch refused for its place in its
        chain (ReplayConflictError, or the head moved since it was verified) is refused
        before anything of it is written, and comes back as its outcome; the others are
        stored. Any other error rolls back the whole transaction and is raised: every
        `decide` that ran saw events that are not stored.

        The batches' rows are written together (one statement for all their events, one
        for their links to alerts), so a busy collector makes few, large statements. A
        batch with an `after` (the long rules read the store) is written alone, after the
        ones before it.
        """
        with self._write() as con:
            if any(w.after is not None for w in writes):
                outcomes = [_store_group(con, (w,))[0] for w in writes]
            else:
                outcomes = _store_group(con, writes)
        self._checkpoint_soon()
        return outcomes

    def record_security_alert(
        self,
        agent_id: str,
        reason_kind: str,
        message: str,
        now_ns: int,
        severity: Severity = Severity.HIGH,
    ) -> AlertId:
        """Raise the security alert for (agent, refusal kind), or count it again while open."""
        with self._write() as con:
            return queries.security_alert(con, agent_id, reason_kind, message, now_ns, severity)

    def stopped_cleanly(self, agent_id: str) -> bool:
        """Whether the agent's last lifecycle event stored is agent_stop (not a crash)."""
        with self._read() as con:
            row = con.execute(_LAST_LIFECYCLE, (agent_id,)).fetchone()
        return row is not None and row[0] == "agent_stop"

    # -- queries -------------------------------------------------------------------

    def list_events(self, limit: int = 100, since_ns: int | None = None) -> list[StoredEvent]:
        """Up to `limit` events, oldest first: from `since_ns` on, else the most recent."""
        with self._read() as con:
            return queries.list_events(con, limit, since_ns)

    def events_since(self, since_ns: int) -> Iterator[StoredEvent]:
        """Events observed at or after `since_ns` in observation order (window rebuild)."""
        with self._read() as con:
            yield from queries.events_since(con, since_ns)

    def event_ids(self) -> set[str]:
        with self._read() as con:
            return {row[0] for row in con.execute("SELECT event_id FROM events")}

    def counts(self, silent_before_ns: int) -> StoreCounts:
        """Agents, events and open alerts, each count an index lookup or a small scan."""
        with self._read() as con:
            agents = con.execute(
                "SELECT count(*), total(revoked), total(revoked = 0 AND last_seen_ns < ?),"
                " total(spool_depth), total(coverage_gaps > 0),"
                " coalesce(max(CASE WHEN revoked = 0 THEN cpu_percent END), 0),"
                " coalesce(max(CASE WHEN revoked = 0 THEN rss_bytes END), 0) FROM agents",
                (silent_before_ns,),
            ).fetchone()
            # Events are never deleted, so the largest rowid is their number (a count(*)
            # would read every row of a big store).
            (events,) = con.execute("SELECT coalesce(max(rowid), 0) FROM events").fetchone()
            alerts = con.execute(
                "SELECT kind, status, count(*) FROM alerts"
                " WHERE status IN ('new', 'in_progress') GROUP BY kind, status"
            ).fetchall()
        return StoreCounts(
            agents=agents[0], revoked=int(agents[1]), silent=int(agents[2]),
            spool_depth=int(agents[3]), agents_with_gaps=int(agents[4]),
            max_cpu_percent=float(agents[5]), max_rss_bytes=int(agents[6]), events=events,
            open_alerts={(kind, status): n for kind, status, n in alerts},
        )  # fmt: skip

    def count_events(self) -> int:
        with self._read() as con:
            count: int = con.execute("SELECT count(*) FROM events").fetchone()[0]
            return count

    def list_alerts(self, status: str | None = None, limit: int = 100) -> list[AlertRecord]:
        """Newest first; `status` (an AlertStatus value) filters."""
        with self._read() as con:
            return queries.list_alerts(con, status, limit)

    def get_alert(self, alert_id: int) -> tuple[AlertRecord, list[StoredEvent]]:
        """An alert and its evidence events (oldest first); NotFoundError if none."""
        with self._read() as con:
            con.execute("BEGIN")  # one snapshot for both reads
            try:
                alert = queries.get_alert(con, alert_id)
                events = queries.events_of_alert(con, alert_id)
            finally:
                con.execute("COMMIT")
        if alert is None:
            raise NotFoundError(f"no alert {alert_id}")
        return alert, events

    def open_threshold_alerts(self) -> list[tuple[str, GroupKey, int]]:
        with self._read() as con:
            return queries.open_threshold_alerts(con)

    def read_with(self, query: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run a read-only query function (e.g. collector.restore's) on this thread's read
        connection; sqlite3 errors become StoreError. It must not keep the connection."""
        with self._read() as con:
            return query(con)

    def batch_bodies(self, agent_id: str) -> Iterator[StoredBatch]:
        """Every batch of an agent as received (body, signature, key id), in order."""
        with self._read() as con:
            yield from queries.batches(con, agent_id)


def _store_group(
    con: sqlite3.Connection, writes: Sequence[BatchWrite]
) -> list[StoreResult | IngestError]:
    """The batches of `SqliteStore.store_batches`, inside its transaction."""
    outcomes: list[StoreResult | IngestError | None] = [None] * len(writes)
    heads: dict[str, ChainHead | None] = {}
    taken: dict[tuple[str, int], bytes] = {}
    """(agent, batch_seq) -> digest of the batches of this group accepted so far."""
    accepted: list[int] = []
    for i, w in enumerate(writes):
        refused = _place(con, w.batch.batch, heads, taken)
        if refused is None:
            accepted.append(i)
        else:
            outcomes[i] = refused
    if accepted:
        stored = _write_batches(con, [writes[i] for i in accepted])
        for i, result in zip(accepted, stored, strict=True):
            outcomes[i] = result
    return [outcome for outcome in outcomes if outcome is not None]


def _place(
    con: sqlite3.Connection,
    batch: VerifiedBatch,
    heads: dict[str, ChainHead | None],
    taken: dict[tuple[str, int], bytes],
) -> StoreResult | IngestError | None:
    """None if the batch extends its agent's chain (and now heads it); else its outcome:
    a duplicate, or the refusal. Nothing is written."""
    agent_id, seq = batch.agent_id, batch.batch_seq
    if agent_id not in heads:
        heads[agent_id] = _head(con, agent_id)
    head = heads[agent_id]
    digest = taken.get((agent_id, seq))
    if digest is None and head is not None and seq <= head.batch_seq:
        sql = "SELECT digest FROM batches WHERE agent_id = ? AND batch_seq = ?"
        row = con.execute(sql, (agent_id, seq)).fetchone()
        digest = None if row is None else row[0]
    if digest is not None:
        if hmac.compare_digest(digest, batch.digest):
            return StoreResult(duplicate=True, events_stored=0)
        return ReplayConflictError(f"agent {agent_id!r} resent batch {seq} with other bytes")
    try:  # checked at verification against the committed head; the head may have moved
        place = classify_seq(seq, batch.prev_digest, head)
    except IngestError as e:
        return e
    if place == "replay":
        # Not stored, yet behind the head: the chain has a hole. Refuse, never fill it.
        return ReplayConflictError(f"agent {agent_id!r} batch {seq} is behind its chain head")
    taken[agent_id, seq] = batch.digest
    heads[agent_id] = ChainHead(seq, batch.digest)
    return None


def _write_batches(con: sqlite3.Connection, writes: Sequence[BatchWrite]) -> list[StoreResult]:
    """Write accepted batches, their new events and the decisions on them, in order."""
    queries.insert_rows(
        con,
        _INSERT_BATCH,
        [(b.agent_id, b.batch_seq, b.digest, b.prev_digest, b.body, b.signature, b.key_id,
          w.now_ns) for w in writes for b in (w.batch.batch,)],
        8,
    )  # fmt: skip
    rows = [row for w in writes for row in w.batch.rows]
    new = queries.insert_new_events(con, [w.batch.batch for w in writes], rows)
    seen: dict[str, int] = {}
    for w in writes:
        agent_id = w.batch.batch.agent_id
        seen[agent_id] = max(seen.get(agent_id, w.now_ns), w.now_ns)
    con.executemany(_SEEN, [(now_ns, agent_id) for agent_id, now_ns in seen.items()])

    writer = queries.AlertWriter(con, {ev.event_id: ev for events in new for ev in events})
    marks = []
    for w, events in zip(writes, new, strict=True):
        marks.append(len(writer.opened))
        agent_id, now_ns, decide = w.batch.batch.agent_id, w.now_ns, w.decide
        for ev in events:
            for decision in decide(ev):
                if isinstance(decision, AlertOpened):
                    writer.open(decision, agent_id, now_ns)
                elif isinstance(decision, EvidenceAdded):
                    writer.add(decision, now_ns)
                else:
                    assert_never(decision)
    writer.flush()
    marks.append(len(writer.opened))

    results = []
    for k, (w, events) in enumerate(zip(writes, new, strict=True)):
        batch, now_ns = w.batch.batch, w.now_ns
        opened = writer.opened[marks[k] : marks[k + 1]]
        if w.after is not None and events:
            opened.extend(w.after(con, events))
        if events and max(ev.observed_at_ns for ev in events) > now_ns:
            con.execute(_FUTURE_DATED, (batch.agent_id, batch.batch_seq, now_ns))
        for reason_kind, message, severity in w.security:
            queries.security_alert(con, batch.agent_id, reason_kind, message, now_ns, severity)
        results.append(
            StoreResult(duplicate=False, events_stored=len(events), alerts_opened=opened)
        )
    return results


def _migrate(con: sqlite3.Connection) -> None:
    """Bring a database made by an older collector up to SCHEMA: columns added since."""
    columns = {row[1] for row in con.execute("PRAGMA table_info(agents)")}
    if "cpu_percent" not in columns:  # schema 1 and 2 before heartbeats carried the cost
        con.execute("ALTER TABLE agents ADD COLUMN cpu_percent REAL NOT NULL DEFAULT 0")
        con.execute("ALTER TABLE agents ADD COLUMN rss_bytes INTEGER NOT NULL DEFAULT 0")
    columns = {row[1] for row in con.execute("PRAGMA table_info(alerts)")}
    if "assignee" not in columns:  # schema 1
        con.execute("ALTER TABLE alerts ADD COLUMN assignee TEXT")
    con.execute("CREATE INDEX IF NOT EXISTS alerts_assignee ON alerts (assignee, status, alert_id)")
    columns = {row[1] for row in con.execute("PRAGMA table_info(events)")}
    if "archive_member" not in columns:  # schema 1
        con.execute("ALTER TABLE events ADD COLUMN archive_member BLOB NOT NULL DEFAULT x''")
    if "access_count" not in columns:  # schema 1 and early schema 2
        con.execute("ALTER TABLE events ADD COLUMN access_count INTEGER NOT NULL DEFAULT 1")
    # Evidence links by event id: no query reads them that way and events are never
    # deleted, yet each link wrote a page at a random place of this index (docs/design-
    # decisions.md, "Ingest throughput").
    con.execute("DROP INDEX IF EXISTS alert_events_event")


def _head(con: sqlite3.Connection, agent_id: str) -> ChainHead | None:
    head = queries.chain_head(con, agent_id)
    return None if head is None else ChainHead(*head)
