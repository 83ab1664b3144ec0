"""Domain events <-> exfilwatch.v1 protobuf bytes: the agent's only protobuf edge.

Sits between the decision stages (which produce `agent.events.Event`) and the spool,
which stores event bytes and seals them into signed `EventBatch` bodies.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TypeVar

from google.protobuf.message import DecodeError

from agent.errors import SpoolError
from agent.events import (
    Action,
    AttributionMethod,
    CoverageGap,
    DestinationClass,
    DetectionMethod,
    DeviceInfo,
    Event,
    EventId,
    FileRef,
    ProcessInfo,
    UserInfo,
)
from exfilwatch.v1 import events_pb2 as pb

__all__ = [
    "encode_batch",
    "encode_event",
    "encode_signed_batch",
    "event_from_bytes",
    "event_to_bytes",
    "signed_batch_message",
]

_K = TypeVar("_K")
_V = TypeVar("_V")

_ACTION: Mapping[Action, pb.Action] = {
    Action.COPY: pb.ACTION_COPY,
    Action.MOVE: pb.ACTION_MOVE,
    Action.READ: pb.ACTION_READ,
    Action.WRITE: pb.ACTION_WRITE,
    Action.DELETE: pb.ACTION_DELETE,
    Action.RENAME: pb.ACTION_RENAME,
    Action.COVERAGE_GAP: pb.ACTION_COVERAGE_GAP,
    Action.AGENT_START: pb.ACTION_AGENT_START,
    Action.AGENT_STOP: pb.ACTION_AGENT_STOP,
}
_DESTINATION_CLASS: Mapping[DestinationClass, pb.DestinationClass] = {
    DestinationClass.REMOVABLE: pb.DESTINATION_CLASS_REMOVABLE,
    DestinationClass.NETWORK_SHARE: pb.DESTINATION_CLASS_NETWORK_SHARE,
    DestinationClass.CLOUD_SYNC: pb.DESTINATION_CLASS_CLOUD_SYNC,
    DestinationClass.LOCAL: pb.DESTINATION_CLASS_LOCAL,
}
_DETECTION: Mapping[DetectionMethod, pb.DetectionMethod] = {
    DetectionMethod.EXACT_HASH: pb.DETECTION_METHOD_EXACT_HASH,
    DetectionMethod.ARCHIVE_MEMBER: pb.DETECTION_METHOD_ARCHIVE_MEMBER,
    DetectionMethod.LABEL_IN_CONTENT: pb.DETECTION_METHOD_LABEL_IN_CONTENT,
    DetectionMethod.SAME_PROCESS: pb.DETECTION_METHOD_SAME_PROCESS,
    DetectionMethod.PROBABLE: pb.DETECTION_METHOD_PROBABLE,
}
_ATTRIBUTION: Mapping[AttributionMethod, pb.AttributionMethod] = {
    AttributionMethod.UNATTRIBUTED: pb.ATTRIBUTION_METHOD_UNATTRIBUTED,
    AttributionMethod.FANOTIFY: pb.ATTRIBUTION_METHOD_FANOTIFY,
    AttributionMethod.PROCESS_CACHE: pb.ATTRIBUTION_METHOD_PROCESS_CACHE,
    AttributionMethod.PROC_SCAN: pb.ATTRIBUTION_METHOD_PROC_SCAN,
    AttributionMethod.FILE_OWNER: pb.ATTRIBUTION_METHOD_FILE_OWNER,
}


def _inverse(mapping: Mapping[_K, _V]) -> dict[_V, _K]:
    return {v: k for k, v in mapping.items()}


_ACTION_FROM_PB = _inverse(_ACTION)
_DESTINATION_CLASS_FROM_PB = _inverse(_DESTINATION_CLASS)
_DETECTION_FROM_PB = _inverse(_DETECTION)
_ATTRIBUTION_FROM_PB = _inverse(_ATTRIBUTION)


def _set_file(msg: pb.FileRef, ref: FileRef) -> None:
    msg.SetInParent()  # presence must survive even when every field is at its default
    msg.path = ref.path
    msg.size = ref.size
    msg.sha256 = ref.sha256
    msg.device = ref.device
    msg.inode = ref.inode
    msg.mtime_ns = ref.mtime_ns


def _file(msg: pb.FileRef) -> FileRef:
    return FileRef(
        path=msg.path,
        size=msg.size,
        sha256=msg.sha256,
        device=msg.device,
        inode=msg.inode,
        mtime_ns=msg.mtime_ns,
    )


def encode_event(ev: Event) -> pb.Event:
    """Build the wire message for one domain event (None sub-messages stay absent)."""
    msg = pb.Event(
        event_id=ev.event_id,
        seq=ev.seq,
        observed_at_ns=ev.observed_at_ns,
        action=_ACTION[ev.action],
        label=ev.label,
        label_source=ev.label_source,
        host=ev.host,
        attribution=_ATTRIBUTION[ev.attribution],
        agent_version=ev.agent_version,
        count=ev.count,
        archive_member=ev.archive_member,
    )
    if ev.source is not None:
        _set_file(msg.source, ev.source)
    if ev.destination is not None:
        _set_file(msg.destination, ev.destination)
    if ev.destination_class is not None:
        msg.destination_class = _DESTINATION_CLASS[ev.destination_class]
    if ev.device is not None:
        d = ev.device
        msg.device.SetInParent()
        msg.device.vendor = d.vendor
        msg.device.model = d.model
        msg.device.serial = d.serial
        msg.device.fs_uuid = d.fs_uuid
        msg.device.fs_type = d.fs_type
        msg.device.mount_point = d.mount_point
        msg.device.remote = d.remote
    if ev.process is not None:
        p = ev.process
        msg.process.SetInParent()
        msg.process.pid = p.pid
        msg.process.start_time_ns = p.start_time_ns
        msg.process.exe = p.exe
        msg.process.cmdline.extend(p.cmdline)
        msg.process.ppid_chain.extend(p.ppid_chain)
        msg.process.name = p.name
    msg.user.SetInParent()
    msg.user.login = ev.user.login
    msg.user.effective = ev.user.effective
    msg.user.uid = ev.user.uid
    if ev.detection is not None:
        msg.detection = _DETECTION[ev.detection]
    if ev.gap is not None:
        msg.gap.SetInParent()
        msg.gap.reason = ev.gap.reason
        msg.gap.count = ev.gap.count
    return msg


def event_to_bytes(ev: Event) -> bytes:
    """Serialise one event; these bytes are stored in the spool and embedded in a batch."""
    return encode_event(ev).SerializeToString(deterministic=True)


def _lookup(table: Mapping[_K, _V], key: _K, what: str) -> _V:
    try:
        return table[key]
    except KeyError:
        raise SpoolError(f"stored event has unknown {what} {key!r}") from None


def event_from_bytes(data: bytes) -> Event:
    """Decode bytes written by `event_to_bytes`; malformed bytes raise SpoolError.

    Event bytes at rest on the agent only ever come from its own spool, hence the error class.
    """
    try:
        msg = pb.Event.FromString(data)
    except DecodeError as e:
        raise SpoolError(f"stored event is not a valid exfilwatch.v1.Event: {e}") from e
    if msg.action == pb.ACTION_UNSPECIFIED:
        raise SpoolError(f"stored event {msg.event_id!r} has no action")
    process = None
    if msg.HasField("process"):
        p = msg.process
        process = ProcessInfo(
            pid=p.pid,
            start_time_ns=p.start_time_ns,
            exe=p.exe,
            cmdline=tuple(p.cmdline),
            ppid_chain=tuple(p.ppid_chain),
            name=p.name,
        )
    device = None
    if msg.HasField("device"):
        d = msg.device
        device = DeviceInfo(
            vendor=d.vendor,
            model=d.model,
            serial=d.serial,
            fs_uuid=d.fs_uuid,
            fs_type=d.fs_type,
            mount_point=d.mount_point,
            remote=d.remote,
        )
    user = UserInfo()
    if msg.HasField("user"):
        user = UserInfo(login=msg.user.login, effective=msg.user.effective, uid=msg.user.uid)
    return Event(
        event_id=EventId(msg.event_id),
        observed_at_ns=msg.observed_at_ns,
        action=_lookup(_ACTION_FROM_PB, msg.action, "action"),
        host=msg.host,
        agent_version=msg.agent_version,
        seq=msg.seq,
        source=_file(msg.source) if msg.HasField("source") else None,
        label=msg.label,
        label_source=msg.label_source,
        destination=_file(msg.destination) if msg.HasField("destination") else None,
        destination_class=(
            None
            if msg.destination_class == pb.DESTINATION_CLASS_UNSPECIFIED
            else _lookup(_DESTINATION_CLASS_FROM_PB, msg.destination_class, "destination class")
        ),
        device=device,
        process=process,
        user=user,
        detection=(
            None
            if msg.detection == pb.DETECTION_METHOD_UNSPECIFIED
            else _lookup(_DETECTION_FROM_PB, msg.detection, "detection method")
        ),
        # An event that claims no attribution method was not attributed.
        attribution=(
            AttributionMethod.UNATTRIBUTED
            if msg.attribution == pb.ATTRIBUTION_METHOD_UNSPECIFIED
            else _lookup(_ATTRIBUTION_FROM_PB, msg.attribution, "attribution method")
        ),
        gap=CoverageGap(reason=msg.gap.reason, count=msg.gap.count)
        if msg.HasField("gap")
        else None,
        count=msg.count or 1,
        archive_member=msg.archive_member,
    )


def encode_batch(
    agent_id: str,
    batch_seq: int,
    prev_digest: bytes,
    sealed_at_ns: int,
    events: Sequence[bytes],
) -> bytes:
    """Build the `EventBatch` body that is signed, stored and shipped verbatim.

    `events` are bytes from `event_to_bytes`. The body is serialised exactly once, here;
    nobody downstream re-serialises it (FIELD-NOTES "Signing protobufs deterministically").
    """
    batch = pb.EventBatch(
        agent_id=agent_id,
        batch_seq=batch_seq,
        prev_batch_digest=prev_digest,
        sealed_at_ns=sealed_at_ns,
    )
    try:
        for data in events:
            batch.events.add().MergeFromString(data)
    except DecodeError as e:
        raise SpoolError(f"pending event is not a valid exfilwatch.v1.Event: {e}") from e
    return batch.SerializeToString(deterministic=True)


def signed_batch_message(body: bytes, signature: bytes, key_id: bytes) -> pb.SignedBatch:
    """The envelope the shipper puts on the wire: body bytes untouched, plus signature."""
    return pb.SignedBatch(body=body, signature=signature, key_id=key_id)


def encode_signed_batch(body: bytes, signature: bytes, key_id: bytes) -> bytes:
    """Serialised `SignedBatch` envelope (see `signed_batch_message`)."""
    return signed_batch_message(body, signature, key_id).SerializeToString(deterministic=True)
