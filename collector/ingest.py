"""Ingest: verify a signed batch, then store it and run the threshold rules in one transaction.

Framework-free: the gRPC servicer calls `upload`; tests call it directly.
A refused batch stores nothing but a (deduplicated) security alert.
"""

from __future__ import annotations

import logging
import threading

from collector.codec import decode_signed_batch
from collector.errors import IngestError, RevokedAgentError, UnknownAgentError
from collector.models import StoredEvent, ThresholdDecision
from collector.policy import Policy
from collector.rpc import Ack, Heartbeat, HeartbeatReply
from collector.store import SqliteStore
from collector.thresholds import ThresholdEngine
from collector.verify import verify_batch

logger = logging.getLogger(__name__)

EXPIRE_EVERY_NS = 60 * 1_000_000_000


class Ingestor:
    def __init__(self, store: SqliteStore, policy: Policy) -> None:
        self._store = store
        self._policy = policy
        self._engine = ThresholdEngine(policy)
        # The engine is not thread-safe, and its state must move with the store's commits.
        self._lock = threading.Lock()
        self._last_expire_ns = 0

    def restore(self, now_ns: int) -> None:
        """Rebuild the rules' windows from the store (start-up, or after a failed commit)."""
        with self._lock:
            self._restore_locked(now_ns)

    def _restore_locked(self, now_ns: int) -> None:
        self._engine = ThresholdEngine(self._policy)
        self._engine.restore(
            self._store.open_threshold_alerts(),
            self._store.events_since(now_ns - self._policy.max_window_ns),
        )

    def upload(self, raw: bytes, tls_agent_id: str | None, now_ns: int) -> Ack:
        try:
            body, signature, key_id = decode_signed_batch(raw)
            agent = self._store.get_agent_key(tls_agent_id) if tls_agent_id else None
            head = self._store.chain_head(agent.agent_id) if agent is not None else None
            batch = verify_batch(
                signed=(body, signature, key_id), tls_agent_id=tls_agent_id, agent=agent, last=head
            )
            # Build the rows before queueing for the lock: batches from other agents are
            # stored meanwhile (SQLite releases the GIL while it works).
            prepared = self._store.prepare(batch)
            with self._lock:
                engine = self._engine

                def decide(event: StoredEvent) -> list[ThresholdDecision]:
                    return engine.feed(event, now_ns)

                try:
                    result = self._store.store_batch(prepared, decide, now_ns)
                except Exception:
                    # The transaction rolled back; the engine may have seen events that
                    # are not stored. Rebuild it from what is.
                    self._restore_locked(now_ns)
                    raise
                if now_ns - self._last_expire_ns > EXPIRE_EVERY_NS:
                    engine.expire(now_ns)
                    self._last_expire_ns = now_ns
        except IngestError as e:
            who = tls_agent_id or "unauthenticated"
            logger.warning("refused batch from %s: %s: %s", who, type(e).__name__, e)
            self._store.record_security_alert(who, type(e).__name__, str(e), now_ns)
            raise
        if result.alerts_opened:
            logger.info("alerts opened: %s", ", ".join(map(str, result.alerts_opened)))
        return Ack(
            agent_id=batch.agent_id,
            batch_seq=batch.batch_seq,
            batch_digest=batch.digest,
            duplicate=result.duplicate,
            events_stored=result.events_stored,
        )

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
        )
        head = self._store.chain_head(hb.agent_id)
        return HeartbeatReply(
            server_time_ns=now_ns,
            last_batch_seq=head.batch_seq if head else 0,
            last_batch_digest=head.digest if head else b"",
        )
