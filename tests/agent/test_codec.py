"""agent.codec: domain events <-> exfilwatch.v1 bytes, and batch / envelope bodies."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from agent import codec
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

NON_UTF8 = b"bad_\xff\xfe.txt"


def make_event(**overrides: Any) -> Event:
    fields: dict[str, Any] = {
        "event_id": EventId("6f1c2a4e-0000-4000-8000-000000000001"),
        "observed_at_ns": 1_700_000_000_123_456_789,
        "action": Action.COPY,
        "host": "ws-17",
        "agent_version": "0.1.0",
    }
    fields.update(overrides)
    return Event(**fields)


def full_event() -> Event:
    return make_event(
        seq=42,
        source=FileRef(
            path=b"/home/ana/" + NON_UTF8,
            size=123_456,
            sha256="ab" * 32,
            device=2049,
            inode=1_234_567,
            mtime_ns=-5,
        ),
        label="confidential",
        label_source="xattr",
        destination=FileRef(path=b"/media/ana/STICK/" + NON_UTF8, size=123_456),
        destination_class=DestinationClass.REMOVABLE,
        device=DeviceInfo(
            vendor="SanDisk",
            model="Cruzer",
            serial="4C53000",
            fs_uuid="1234-ABCD",
            fs_type="vfat",
            mount_point=b"/media/ana/ST\xffICK",
        ),
        process=ProcessInfo(
            pid=4242,
            start_time_ns=1_699_999_999_000_000_000,
            exe=b"/usr/bin/cp",
            cmdline=(b"cp", b"/home/ana/" + NON_UTF8, b"/media/ana/STICK/"),
            ppid_chain=(4000, 1),
            name="cp",
        ),
        user=UserInfo(login="ana", effective="root", uid=0),
        detection=DetectionMethod.EXACT_HASH,
        attribution=AttributionMethod.FANOTIFY,
    )


def test_full_event_round_trips_including_non_utf8_bytes() -> None:
    ev = full_event()
    assert codec.event_from_bytes(codec.event_to_bytes(ev)) == ev


def test_minimal_event_round_trips_with_sub_messages_absent() -> None:
    ev = make_event()
    data = codec.event_to_bytes(ev)
    msg = pb.Event.FromString(data)
    for name in ("source", "destination", "device", "process", "gap"):
        assert not msg.HasField(name), name
    assert msg.destination_class == pb.DESTINATION_CLASS_UNSPECIFIED
    assert msg.detection == pb.DETECTION_METHOD_UNSPECIFIED
    assert codec.event_from_bytes(data) == ev


def test_sub_messages_at_default_values_stay_present() -> None:
    ev = make_event(
        source=FileRef(path=b""),
        destination=FileRef(path=b""),
        device=DeviceInfo(),
        process=ProcessInfo(pid=0, start_time_ns=0),
        user=UserInfo(login="", effective="", uid=0),
        gap=CoverageGap(reason="", count=0),
    )
    msg = codec.encode_event(ev)
    for name in ("source", "destination", "device", "process", "user", "gap"):
        assert msg.HasField(name), name
    assert codec.event_from_bytes(codec.event_to_bytes(ev)) == ev


def test_unknown_user_keeps_uid_minus_one() -> None:
    ev = make_event(user=UserInfo())
    assert codec.event_from_bytes(codec.event_to_bytes(ev)).user.uid == -1


def test_absent_user_decodes_as_unknown_user() -> None:
    data = pb.Event(event_id="x", action=pb.ACTION_COPY).SerializeToString()
    assert codec.event_from_bytes(data).user == UserInfo()


def test_coverage_gap_round_trips() -> None:
    ev = make_event(action=Action.COVERAGE_GAP, gap=CoverageGap(reason="spool_dropped", count=7))
    assert codec.event_from_bytes(codec.event_to_bytes(ev)) == ev


@pytest.mark.parametrize("action", list(Action))
def test_every_action_round_trips(action: Action) -> None:
    ev = make_event(action=action)
    assert codec.encode_event(ev).action == pb.Action.Value(f"ACTION_{action.name}")
    assert codec.event_from_bytes(codec.event_to_bytes(ev)).action is action


@pytest.mark.parametrize("value", list(DestinationClass))
def test_every_destination_class_round_trips(value: DestinationClass) -> None:
    ev = make_event(destination_class=value)
    wire = codec.encode_event(ev).destination_class
    assert wire == pb.DestinationClass.Value(f"DESTINATION_CLASS_{value.name}")
    assert codec.event_from_bytes(codec.event_to_bytes(ev)).destination_class is value


@pytest.mark.parametrize("value", list(DetectionMethod))
def test_every_detection_method_round_trips(value: DetectionMethod) -> None:
    ev = make_event(detection=value)
    wire = codec.encode_event(ev).detection
    assert wire == pb.DetectionMethod.Value(f"DETECTION_METHOD_{value.name}")
    assert codec.event_from_bytes(codec.event_to_bytes(ev)).detection is value


@pytest.mark.parametrize("value", list(AttributionMethod))
def test_every_attribution_method_round_trips(value: AttributionMethod) -> None:
    ev = make_event(attribution=value)
    wire = codec.encode_event(ev).attribution
    assert wire == pb.AttributionMethod.Value(f"ATTRIBUTION_METHOD_{value.name}")
    assert codec.event_from_bytes(codec.event_to_bytes(ev)).attribution is value


@pytest.mark.parametrize(
    ("wire_enum", "domain_enum"),
    [
        (pb.Action, Action),
        (pb.DestinationClass, DestinationClass),
        (pb.DetectionMethod, DetectionMethod),
        (pb.AttributionMethod, AttributionMethod),
    ],
)
def test_every_wire_enum_value_has_a_domain_value(wire_enum: Any, domain_enum: Any) -> None:
    # Guards against a value added to events.proto but not to agent.events / the codec.
    assert len(wire_enum.values()) - 1 == len(domain_enum)


def test_unspecified_attribution_decodes_as_unattributed() -> None:
    data = pb.Event(event_id="x", action=pb.ACTION_READ).SerializeToString()
    assert codec.event_from_bytes(data).attribution is AttributionMethod.UNATTRIBUTED


def test_event_without_action_is_rejected() -> None:
    data = pb.Event(event_id="x").SerializeToString()
    with pytest.raises(SpoolError, match="no action"):
        codec.event_from_bytes(data)


def test_unknown_enum_number_is_rejected() -> None:
    # Field 4 (action), varint 99: what a newer schema could write.
    data = pb.Event(event_id="x").SerializeToString() + b"\x20\x63"
    with pytest.raises(SpoolError, match="unknown action"):
        codec.event_from_bytes(data)


def test_garbage_bytes_raise_spool_error() -> None:
    with pytest.raises(SpoolError) as info:
        codec.event_from_bytes(b"\xff\xff\xff")
    assert info.value.__cause__ is not None


def test_encode_batch_embeds_event_bytes_verbatim() -> None:
    events = [
        codec.event_to_bytes(replace(full_event(), seq=1)),
        codec.event_to_bytes(make_event(seq=2, event_id=EventId("e2"))),
    ]
    prev = bytes(range(32))
    body = codec.encode_batch("agent-1", 7, prev, 1_700_000_000_000_000_000, events)

    batch = pb.EventBatch.FromString(body)
    assert batch.agent_id == "agent-1"
    assert batch.batch_seq == 7
    assert batch.prev_batch_digest == prev
    assert batch.sealed_at_ns == 1_700_000_000_000_000_000
    assert [e.SerializeToString(deterministic=True) for e in batch.events] == events
    for data in events:
        assert data in body
    assert [codec.event_from_bytes(e.SerializeToString()) for e in batch.events] == [
        codec.event_from_bytes(data) for data in events
    ]


def test_encode_batch_is_stable_and_accepts_no_events() -> None:
    events = [codec.event_to_bytes(full_event())]
    first = codec.encode_batch("a", 1, bytes(32), 5, events)
    assert codec.encode_batch("a", 1, bytes(32), 5, events) == first
    assert len(pb.EventBatch.FromString(codec.encode_batch("a", 1, bytes(32), 5, [])).events) == 0


def test_encode_batch_rejects_malformed_event_bytes() -> None:
    with pytest.raises(SpoolError):
        codec.encode_batch("a", 1, bytes(32), 5, [b"\xff\xff\xff"])


def test_signed_batch_carries_body_untouched() -> None:
    body = codec.encode_batch("a", 1, bytes(32), 5, [codec.event_to_bytes(full_event())])
    msg = codec.signed_batch_message(body, b"s" * 64, b"k" * 32)
    assert (msg.body, msg.signature, msg.key_id) == (body, b"s" * 64, b"k" * 32)
    parsed = pb.SignedBatch.FromString(codec.encode_signed_batch(body, b"s" * 64, b"k" * 32))
    assert parsed.body == body
    assert parsed.signature == b"s" * 64
    assert parsed.key_id == b"k" * 32


def test_a_network_share_remote_round_trips() -> None:
    share = DeviceInfo(fs_type="cifs", mount_point=b"/mnt/finance", remote="//nas/finance")
    ev = replace(full_event(), destination_class=DestinationClass.NETWORK_SHARE, device=share)
    decoded = codec.event_from_bytes(codec.event_to_bytes(ev))
    assert decoded == ev and decoded.device is not None
    assert decoded.device.remote == "//nas/finance"
