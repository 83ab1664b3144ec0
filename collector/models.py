"""Domain values of the collector: verified events, agents, threshold decisions, alerts.

Generated protobuf types never appear here: `collector.codec` converts at the edge.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple, NewType

from collector.reasons import ReasonParts

AgentId = NewType("AgentId", str)
EventId = NewType("EventId", str)
AlertId = NewType("AlertId", int)

GroupKey = tuple[tuple[str, str], ...]
"""A rule's group, e.g. (("user", "alice"), ("host", "lt-0412")), in group_by order."""


class Severity(StrEnum):
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"


class AlertKind(StrEnum):
    THRESHOLD = "threshold"
    SECURITY = "security"


class AlertStatus(StrEnum):
    NEW = "new"
    IN_PROGRESS = "in_progress"
    RESOLVED = "resolved"
    FALSE_POSITIVE = "false_positive"


class ProcessView(NamedTuple):
    """The process an agent attributed an event to.

    A NamedTuple, like StoredEvent and for the same reason: the ingest process receives
    each decoded batch pickled, and a dataclass instance costs about five times a
    NamedTuple to unpickle (a batch relayed from many hosts holds one view per event)."""

    pid: int
    start_time_ns: int
    exe: bytes = b""
    cmdline: tuple[bytes, ...] = ()
    ppid_chain: tuple[int, ...] = ()
    name: str = ""


class DeviceView(NamedTuple):
    """The device (USB stick, network share) an event's destination is on (a NamedTuple,
    as ProcessView)."""

    vendor: str = ""
    model: str = ""
    serial: str = ""
    fs_uuid: str = ""
    fs_type: str = ""
    mount_point: bytes = b""
    remote: str = ""
    """A network share's remote (`//server/share`, `server:/export`); empty otherwise."""


class StoredEvent(NamedTuple):
    """An event whose batch verified; what the store keeps and the rules see.

    Immutable like the other values here, but a NamedTuple rather than a frozen
    dataclass: one is built for every event ingested, and a frozen dataclass's
    __init__ (one object.__setattr__ per field) costs about 7 us for these 24 fields
    against 1 us here. Fields are in the order of the store's events columns.
    """

    event_id: EventId
    agent_id: AgentId
    batch_seq: int
    seq: int
    observed_at_ns: int
    action: str
    """One of the agent's actions: copy, move, read, write, delete, rename, coverage_gap, ..."""
    host: str
    user: str
    """Login user name; empty when unknown."""
    label: str = ""
    label_source: str = ""
    source_path: bytes = b""
    source_size: int = 0
    source_sha256: str = ""
    dest_path: bytes = b""
    dest_size: int = 0
    dest_sha256: str = ""
    destination_class: str = ""
    """removable, network_share, cloud_sync, local; empty when the event has no destination."""
    detection: str = ""
    attribution: str = ""
    process: ProcessView | None = None
    device: DeviceView | None = None
    gap_reason: str = ""
    gap_count: int = 0
    archive_member: bytes = b""
    """For archive_member detections: the member's name inside the destination archive."""
    access_count: int = 1
    """How many accesses the event stands for (the agent folds repeated reads)."""

    @property
    def size(self) -> int:
        """Bytes moved: the destination's size, else the source's.

        A member of an archive moved its own bytes (the source's, equal by hash): each
        member counts as one labelled document, not as the whole archive again.
        """
        if self.archive_member:
            return self.source_size
        return self.dest_size or self.source_size

    @property
    def destination_key(self) -> str:
        """The destination as a grouping key: the device when known, else a network share's
        remote (the server and share it mounts), else the mount/folder."""
        if not self.destination_class:
            return ""
        dev = self.device
        ident = ""
        if dev is not None:
            ident = dev.serial or dev.fs_uuid or dev.remote or os.fsdecode(dev.mount_point)
        return f"{self.destination_class}:{ident}"


@dataclass(frozen=True)
class VerifiedBatch:
    """A batch whose signature, identity, sequence and chain were checked."""

    agent_id: AgentId
    batch_seq: int
    digest: bytes
    """SHA-256 of `body`."""
    prev_digest: bytes
    sealed_at_ns: int
    body: bytes
    signature: bytes
    key_id: bytes
    events: tuple[StoredEvent, ...]


@dataclass(frozen=True)
class AlertOpened:
    """A rule's group crossed its threshold with no open alert: raise one."""

    rule: str
    group: GroupKey
    severity: Severity
    evidence: tuple[EventId, ...]
    files: int
    bytes: int
    first_ns: int
    last_ns: int
    hot_until_ns: int
    """The window stays hot (alert open for new evidence) until this event time."""
    reason: str
    """One line an administrator reads, e.g. "alice copied 25 confidential files ..."."""
    parts: ReasonParts | None = None
    """What `reason` says apart from the numbers; the store re-renders it as evidence grows."""


class EvidenceAdded(NamedTuple):
    """A matching event arrived while the group's alert is open: attach it. A NamedTuple:
    the rules make one or two per event stored, and a frozen dataclass costs several times
    as much to build."""

    rule: str
    group: GroupKey
    event_id: EventId
    hot_until_ns: int
    parts: ReasonParts | None = None
    """How this event reads in its alert's reason (merged into the alert's parts)."""


ThresholdDecision = AlertOpened | EvidenceAdded
