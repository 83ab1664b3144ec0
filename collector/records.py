"""What the collector's store hands back: agents, alerts, stored batches, ingest results.

Plain frozen values read from `collector.store`; no database types leak out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from collector.models import AgentId, AlertId, AlertKind, AlertStatus, EventId, GroupKey, Severity


@dataclass(frozen=True)
class AgentRecord:
    """An enrolled agent and what its last heartbeat said."""

    agent_id: AgentId
    public_key_raw: bytes
    key_id: bytes
    hostname: str
    agent_version: str
    enrolled_at_ns: int
    last_seen_ns: int
    """0 until the agent uploads or sends a heartbeat."""
    revoked: bool
    cert_serial: str
    policy_revision: str
    spool_depth: int
    coverage_gaps: int
    cpu_percent: float = 0.0
    """The agent's CPU over its last heartbeat interval, percent of one core; 0 unknown."""
    rss_bytes: int = 0
    """Its resident memory at the last heartbeat; 0 unknown."""


@dataclass(frozen=True)
class AlertRecord:
    """One alert row and the ids of its evidence events, oldest observation first."""

    alert_id: AlertId
    kind: AlertKind
    rule: str
    """Threshold alerts: the rule name. Security alerts: the refusal kind, e.g. "signature"."""
    group: GroupKey
    severity: Severity
    status: AlertStatus
    reason: str
    created_at_ns: int
    updated_at_ns: int
    files: int
    bytes: int
    first_ns: int
    last_ns: int
    hot_until_ns: int
    agent_id: str
    """The agent whose batch opened the alert (security alerts: the offending agent)."""
    count: int
    """Security alerts: how many times the refusal was seen while the alert was open."""
    details: str
    evidence: tuple[EventId, ...]
    assignee: str | None = None
    """The console user working on it (collector.triage), if any."""


@dataclass(frozen=True)
class StoreCounts:
    """What the store holds, counted for monitoring (`SqliteStore.counts`)."""

    agents: int
    revoked: int
    silent: int
    """Agents not revoked and heard from neither by heartbeat nor upload since the cut-off."""
    spool_depth: int
    """Events waiting in agents' spools, summed over their last heartbeats."""
    agents_with_gaps: int
    max_cpu_percent: float
    """The highest CPU figure of an agent not revoked, at its last heartbeat."""
    max_rss_bytes: int
    events: int
    open_alerts: dict[tuple[str, str], int]
    """(kind, status) -> alerts new or in progress."""


@dataclass(frozen=True)
class StoredBatch:
    """A batch exactly as received, kept so its events can be re-proved later."""

    agent_id: AgentId
    batch_seq: int
    digest: bytes
    prev_digest: bytes
    body: bytes
    signature: bytes
    key_id: bytes
    received_at_ns: int


@dataclass(frozen=True)
class StoreResult:
    """Outcome of `SqliteStore.store_batch`, known only after commit."""

    duplicate: bool
    """A byte-identical replay: acknowledged, nothing stored."""
    events_stored: int
    alerts_opened: list[AlertId] = field(default_factory=list)
