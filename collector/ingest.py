"""Ingest: verify a signed batch, then store it and run the threshold rules in one transaction.

Framework-free: `serve` runs it in its ingest process (collector.ingestproc), which calls
its steps from its own threads; tests and the in-process server call `upload`. Batches that
arrive while another is being written share the next transaction (collector.groupcommit),
each acknowledged only once that transaction committed.
A refused batch stores nothing but a (deduplicated) security alert. A batch dated
implausibly far in the future is stored (it is genuine) and raises one as well.
"""

from __future__ import annotations

import functools
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from collector import restore
from collector.codec import decode_signed_batch
from collector.decoding import Signed, verify_and_prepare
from collector.detection.engine import LongRuleEngine
from collector.detection.sqlhistory import SqlHistory
from collector.directory import Directory
from collector.errors import (
    CollectorError,
    IngestError,
    RevokedAgentError,
    StoreError,
    UnknownAgentError,
)
from collector.groupcommit import GroupCommit
from collector.longalerts import StoreEpisodes, apply_findings, long_events
from collector.metrics import Metrics
from collector.models import AlertId, Severity, StoredEvent, ThresholdDecision, VerifiedBatch
from collector.policy import Policy
from collector.records import StoreResult
from collector.render import human_duration
from collector.rpc import Ack, Heartbeat, HeartbeatReply
from collector.store import AfterEvents, BatchWrite, PreparedBatch, SqliteStore
from collector.thresholds import ThresholdEngine
from collector.verify import AgentKey, ChainHead, future_skew_ns

logger = logging.getLogger(__name__)

EXPIRE_EVERY_NS = 60 * 1_000_000_000
MAX_GROUP = 64
"""Most uploads one transaction holds. In practice the server's RPC threads bound a group
(each waits in it with its caller's batch); this only bounds the worst case."""
RESTORING = "the rule windows are still being restored; retry"
"""Why an upload fails that waited restore_wait_s for the windows (StoreError: retried)."""
CLOCK_SKEW_FUTURE = "clock_skew_future"
"""Kind of the security alert for batches dated too far ahead of the collector's clock."""


def restore_failed(error: object) -> StoreError:
    """What an upload fails with once the rules' windows could not be restored (retried)."""
    return StoreError(f"the rule windows could not be restored: {error}")


@dataclass(frozen=True)
class IngestSettings:
    """Collector-side limits of ingest (`serve` flags)."""

    max_future_skew_ns: int = 10 * 60 * 1_000_000_000
    """A batch sealed, or holding an event observed, more than this after the collector's
    clock raises a clock_skew_future security alert. It is stored all the same, and the
    rules count every event at the earlier of its own time and its arrival."""
    restore_wait_s: float = 120.0
    """How long an upload waits for the rules' windows to be restored before it fails
    (retryably) instead."""

    def __post_init__(self) -> None:
        if self.max_future_skew_ns < 0 or self.restore_wait_s <= 0:
            raise ValueError("max_future_skew_ns must be >= 0 and restore_wait_s > 0")


@dataclass(frozen=True)
class Pending:
    """A verified upload waiting for its group commit."""

    prepared: PreparedBatch
    now_ns: int
    security: tuple[tuple[str, str, Severity], ...]


def _feed(engine: ThresholdEngine, event: StoredEvent, *, now_ns: int) -> list[ThresholdDecision]:
    return engine.feed(event, now_ns)


class Ingestor:
    def __init__(
        self,
        store: SqliteStore,
        policy: Policy,
        settings: IngestSettings | None = None,
        directory: Directory | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        """`metrics` counts uploads."""
        self._store = store
        self._metrics = metrics or Metrics()
        self._policy = policy
        self._settings = settings or IngestSettings()
        self._directory = directory or Directory()
        self._engine = ThresholdEngine(policy)
        self._episodes = StoreEpisodes()
        self._long = self._long_engine()
        # The engine is not thread-safe, and its state must move with the store's commits.
        self._lock = threading.Lock()
        self._commits = GroupCommit(self.store_group, max_items=MAX_GROUP)
        self._last_expire_ns = 0
        self._restored = threading.Event()
        """Clear while `restore_in_background` runs: uploads wait for it, heartbeats do not."""
        self._restored.set()
        self._restore_error: BaseException | None = None

    def restore(self, now_ns: int) -> None:
        """Rebuild the rules' windows from the store (start-up, or after a failed commit)."""
        with self._lock:
            self._restore_locked(now_ns)

    def restore_in_background(
        self, now_ns: int, on_failure: Callable[[], None] = lambda: None
    ) -> threading.Thread:
        """Start `restore(now_ns)` on a thread and return it (join it on shutdown).

        The server can listen meanwhile: enrolment, heartbeats and policy are served at
        once, and uploads wait (after verifying their batch) until the windows they
        feed are whole. If the restore fails, `on_failure` is called (serve stops) and
        uploads fail with StoreError, which agents retry.
        """
        self._restored.clear()
        self._restore_error = None
        thread = threading.Thread(
            target=self._restore_thread, args=(now_ns, on_failure), name="restore-windows"
        )
        thread.start()
        return thread

    def _restore_thread(self, now_ns: int, on_failure: Callable[[], None]) -> None:
        try:
            self.restore(now_ns)
        except BaseException as e:
            self._restore_error = e
            on_failure()
            if not isinstance(e, CollectorError):
                raise  # a bug: let the thread die loudly
            logger.error("cannot restore the rule windows: %s", e)
        finally:
            self._restored.set()

    @property
    def restoring(self) -> bool:
        """Whether `restore_in_background` still runs (uploads wait for it)."""
        return not self._restored.is_set()

    @property
    def restore_error(self) -> BaseException | None:
        """Why the last `restore_in_background` failed; None if it did not (or still runs)."""
        return self._restore_error

    def _wait_restored(self) -> None:
        if not self._restored.wait(self._settings.restore_wait_s):
            raise StoreError(RESTORING)
        if self._restore_error is not None:
            raise restore_failed(self._restore_error)

    def _restore_locked(self, now_ns: int) -> None:
        started = time.monotonic()
        state = self._store.read_with(
            functools.partial(restore.load, policy=self._policy, now_ns=now_ns)
        )
        engine = ThresholdEngine(self._policy)
        engine.restore(state.alerts, state.events)
        self._engine = engine
        logger.info(
            "rule windows restored in %.2f s: %d events replayed (%d read), %d alerts",
            time.monotonic() - started,
            len(state.events),
            state.rows_read,
            len(state.alerts),
        )

    def _long_engine(self) -> LongRuleEngine | None:
        """The long rules' engine; its state is read lazily from the store, so a new one is
        as good as the old after a rollback."""
        if not self._policy.long_rules:
            return None
        episodes = self._episodes
        history = SqlHistory(
            lambda: episodes.con,
            self._policy.labels,
            departments=self._directory.departments,
            watchlists=self._directory.watchlists,
        )
        return LongRuleEngine(self._policy.long_rules, history, episodes)

    def _long_rules(self, agent_id: str, now_ns: int) -> AfterEvents | None:
        engine = self._long
        if engine is None:
            return None

        def after(con: sqlite3.Connection, events: tuple[StoredEvent, ...]) -> list[AlertId]:
            self._episodes.use(con)
            policy = self._policy
            findings = engine.feed_batch(long_events(events, policy, engine, now_ns))
            return apply_findings(con, findings, agent_id, now_ns)

        return after

    def _future_alert(
        self, batch: VerifiedBatch, now_ns: int
    ) -> tuple[tuple[str, str, Severity], ...]:
        skew = future_skew_ns(batch, now_ns)
        limit = self._settings.max_future_skew_ns
        if skew <= limit:
            return ()
        message = (
            f"agent {batch.agent_id} batch {batch.batch_seq} is dated {skew / 1e9:.3f} s"
            f" ({human_duration(skew / 1e9)}) ahead of the collector's clock, more than"
            f" {human_duration(limit / 1e9)}; stored, its events counted at their arrival"
        )
        return ((CLOCK_SKEW_FUTURE, message, Severity.MEDIUM),)

    def upload(self, raw: bytes, tls_agent_id: str | None, now_ns: int) -> Ack:
        """Verify, store and run the rules on one signed batch; its Ack once committed.

        Raises the IngestError that refused it (after recording the security alert), or
        StoreError. `collector.ingestproc` runs the same steps from its own loop:
        `receive`, `verify_and_prepare` (in a worker), `pending`, `store_group`, then
        `acknowledge` or `refused`.
        """
        try:
            signed, agent, head = self.receive(raw, tls_agent_id)
            # Verify and build the rows before queueing for the writer: other batches are
            # written meanwhile.
            prepared = verify_and_prepare(signed, tls_agent_id, agent, head)
            pending = self.pending(prepared, now_ns)
            self._wait_restored()
            result = self._commits.submit(pending)
        except IngestError as e:
            self.refused(e, tls_agent_id, now_ns)
            raise
        return self.acknowledge(pending, result)

    def receive(
        self, raw: bytes, tls_agent_id: str | None
    ) -> tuple[Signed, AgentKey | None, ChainHead | None]:
        """The SignedBatch's parts, with the enrolled key and committed chain head of the
        TLS identity (what a decoder needs); MalformedBatchError if it does not parse."""
        signed = decode_signed_batch(raw)
        agent = self._store.get_agent_key(tls_agent_id) if tls_agent_id else None
        head = self._store.chain_head(agent.agent_id) if agent is not None else None
        return signed, agent, head

    def pending(self, prepared: PreparedBatch, now_ns: int) -> Pending:
        """A verified upload, ready for `store_group`."""
        return Pending(prepared, now_ns, self._future_alert(prepared.batch, now_ns))

    def refused(self, error: IngestError, tls_agent_id: str | None, now_ns: int) -> None:
        """Log, count and record (as a security alert) an upload refused with `error`."""
        who = tls_agent_id or "unauthenticated"
        logger.warning("refused batch from %s: %s: %s", who, type(error).__name__, error)
        self._metrics.add("exfilwatch_batches_refused_total", reason=type(error).__name__)
        self._store.record_security_alert(who, type(error).__name__, str(error), now_ns)

    def acknowledge(self, pending: Pending, result: StoreResult) -> Ack:
        """Count and log a stored (or duplicate) upload; the Ack its agent gets."""
        metrics = self._metrics
        outcome = "duplicate" if result.duplicate else "stored"
        metrics.add("exfilwatch_batches_total", outcome=outcome)
        metrics.add("exfilwatch_events_stored_total", result.events_stored)
        metrics.add("exfilwatch_alerts_opened_total", len(result.alerts_opened))
        if result.alerts_opened:
            logger.info("alerts opened: %s", ", ".join(map(str, result.alerts_opened)))
        if pending.security and not result.duplicate:
            logger.warning("%s: %s", CLOCK_SKEW_FUTURE, pending.security[0][1])
        batch = pending.prepared.batch
        return Ack(
            agent_id=batch.agent_id,
            batch_seq=batch.batch_seq,
            batch_digest=batch.digest,
            duplicate=result.duplicate,
            events_stored=result.events_stored,
        )

    def store_group(self, group: Sequence[Pending]) -> list[StoreResult | IngestError]:
        """Write the uploads of one group commit (`GroupCommit` calls it, one at a time;
        collector.ingestproc's loop too, once the windows are restored).

        An outcome is the upload's StoreResult, or the refusal its caller raises.
        """
        with self._lock:
            outcomes = self._store_locked(group)
            now_ns = max(p.now_ns for p in group)
            if now_ns - self._last_expire_ns > EXPIRE_EVERY_NS:
                self._engine.expire(now_ns)
                self._last_expire_ns = now_ns
        return outcomes

    def _store_locked(self, group: Sequence[Pending]) -> list[StoreResult | IngestError]:
        engine = self._engine
        writes = [
            BatchWrite(
                p.prepared,
                functools.partial(_feed, engine, now_ns=p.now_ns),
                p.now_ns,
                security=p.security,
                after=self._long_rules(p.prepared.batch.agent_id, p.now_ns),
            )
            for p in group
        ]
        try:
            return self._store.store_batches(writes)
        except Exception:
            # The transaction rolled back; the engines may have seen events that are not
            # stored. Rebuild them from what is.
            self._long = self._long_engine()
            self._restore_locked(max(p.now_ns for p in group))
            raise

    def heartbeat(self, hb: Heartbeat, now_ns: int) -> HeartbeatReply:
        agent = self._store.get_agent_key(hb.agent_id)
        if agent is None:
            raise UnknownAgentError(f"agent {hb.agent_id!r} is not enrolled")
        if agent.revoked:
            error = RevokedAgentError(f"agent {hb.agent_id!r} is revoked")
            self._store.record_security_alert(hb.agent_id, type(error).__name__, str(error), now_ns)
            raise error
        self._store.touch_agent(
            hb.agent_id,
            now_ns,
            agent_version=hb.agent_version,
            policy_revision=hb.policy_revision,
            spool_depth=hb.spool_depth,
            coverage_gaps=hb.coverage_gaps,
            cpu_percent=hb.cpu_percent,
            rss_bytes=hb.rss_bytes,
        )
        head = self._store.chain_head(hb.agent_id)
        return HeartbeatReply(
            server_time_ns=now_ns,
            last_batch_seq=head.batch_seq if head else 0,
            last_batch_digest=head.digest if head else b"",
        )
