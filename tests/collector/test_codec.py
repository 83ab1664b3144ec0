"""collector.codec: SignedBatch / EventBatch bytes -> domain values, with field checks."""

from __future__ import annotations

import pytest

from collector.codec import (
    MAX_EVENT_BYTES,
    MAX_EVENTS,
    MAX_TEXT,
    decode_batch_body,
    decode_signed_batch,
)
from collector.errors import IdentityMismatchError, MalformedBatchError
from collector.models import AgentId, DeviceView, EventId, ProcessView, StoredEvent
from collector.verify import GENESIS
from exfilwatch.v1 import events_pb2
from tests.collector.batches import SHA_A, T0, envelope, make_body, make_event

AGENT = AgentId("ag-0123456789abcdef01234567")
EID = "6f1c2a4e-8d3b-4c5a-9e7f-0a1b2c3d4e5f"


def body_of(*events: events_pb2.Event, seq: int = 1, prev: bytes = GENESIS) -> bytes:
    return make_body(AGENT, seq, prev, events)


def decode_one(event: events_pb2.Event) -> StoredEvent:
    (stored,) = decode_batch_body(body_of(event), agent_id=AGENT)[3]
    return stored


def test_signed_batch_splits_into_its_parts():
    raw = envelope(b"body", b"s" * 64, b"k" * 32)
    assert decode_signed_batch(raw) == (b"body", b"s" * 64, b"k" * 32)


@pytest.mark.parametrize("raw", [b"\xff\xff\xff", b"\x0a\x05ab", b"\x08"])
def test_garbage_envelope_is_malformed(raw):
    with pytest.raises(MalformedBatchError, match="signed batch does not parse"):
        decode_signed_batch(raw)


def test_every_field_maps_to_stored_event():
    event = make_event(event_id=EID, seq=7)
    seq, prev, sealed, events = decode_batch_body(
        make_body(AGENT, 3, b"\x01" * 32, [event], sealed_at_ns=T0 + 5), agent_id=AGENT
    )
    assert (seq, prev, sealed) == (3, b"\x01" * 32, T0 + 5)
    assert events == (
        StoredEvent(
            event_id=EventId(EID),
            agent_id=AGENT,
            batch_seq=3,
            seq=7,
            observed_at_ns=T0,
            action="copy",
            host="lt-0412",
            user="alice",
            label="confidential",
            label_source="xattr",
            source_path=b"/home/alice/secret.docx",
            source_size=1000,
            source_sha256=SHA_A,
            dest_path=b"/media/alice/KINGSTON/secret.docx",
            dest_size=1000,
            dest_sha256=SHA_A,
            destination_class="removable",
            detection="exact_hash",
            attribution="proc_scan",
            process=ProcessView(
                pid=4242,
                start_time_ns=T0 - 10**9,
                exe=b"/usr/bin/cp",
                cmdline=(b"cp", b"secret.docx", b"/media/alice/KINGSTON/"),
                ppid_chain=(4000, 1),
                name="cp",
            ),
            device=DeviceView(
                vendor="Kingston",
                model="DT50",
                serial="0019E06B",
                fs_uuid="1A2B-3C4D",
                fs_type="vfat",
                mount_point=b"/media/alice/KINGSTON",
            ),
        ),
    )


def test_absent_submessages_become_defaults():
    event = events_pb2.Event(event_id=EID, action=events_pb2.ACTION_COVERAGE_GAP)
    event.gap.reason = "inotify_overflow"
    event.gap.count = 12
    stored = decode_one(event)
    assert stored.process is None and stored.device is None
    assert (stored.user, stored.source_path, stored.destination_class) == ("", b"", "")
    assert (stored.action, stored.gap_reason, stored.gap_count) == (
        "coverage_gap",
        "inotify_overflow",
        12,
    )


ACTIONS = [
    "",
    "copy",
    "move",
    "read",
    "write",
    "delete",
    "rename",
    "coverage_gap",
    "agent_start",
    "agent_stop",
]
DESTINATIONS = ["", "removable", "network_share", "cloud_sync", "local"]
DETECTIONS = ["", "exact_hash", "archive_member", "label_in_content", "same_process", "probable"]
ATTRIBUTIONS = ["", "unattributed", "fanotify", "process_cache", "proc_scan", "file_owner"]


@pytest.mark.parametrize(("number", "name"), list(enumerate(ACTIONS)))
def test_action_names(number, name):
    assert decode_one(make_event(action=number)).action == name


@pytest.mark.parametrize(("number", "name"), list(enumerate(DESTINATIONS)))
def test_destination_class_names(number, name):
    assert decode_one(make_event(destination_class=number)).destination_class == name


@pytest.mark.parametrize(("number", "name"), list(enumerate(DETECTIONS)))
def test_detection_names(number, name):
    assert decode_one(make_event(detection=number)).detection == name


@pytest.mark.parametrize(("number", "name"), list(enumerate(ATTRIBUTIONS)))
def test_attribution_names(number, name):
    assert decode_one(make_event(attribution=number)).attribution == name


@pytest.mark.parametrize("field", ["action", "destination_class", "detection", "attribution"])
def test_unknown_enum_number_is_malformed(field):
    with pytest.raises(MalformedBatchError, match="unknown enum value"):
        decode_one(make_event(**{field: 99}))


def test_non_utf8_paths_travel_byte_exact():
    path = b"/media/usb/r\xe9sum\xe9-\xff\xfe.docx"
    event = make_event(destination=events_pb2.FileRef(path=path, size=3))
    event.process.cmdline.append(b"\x80arg")
    stored = decode_one(event)
    assert stored.dest_path == path
    assert stored.process is not None and stored.process.cmdline[-1] == b"\x80arg"


def test_bad_utf8_in_a_string_field_is_malformed():
    body = bytearray(body_of(make_event(host="HOSTNAME")))
    body[body.index(b"HOSTNAME")] = 0xFF
    with pytest.raises(MalformedBatchError, match="does not parse"):
        decode_batch_body(bytes(body), agent_id=AGENT)


def test_garbage_body_is_malformed():
    with pytest.raises(MalformedBatchError, match="batch body does not parse"):
        decode_batch_body(b"\xff\xff\xff", agent_id=AGENT)


def test_body_of_another_agent_is_identity_mismatch():
    body = make_body("ag-someone-else", 1, GENESIS, [make_event()])
    with pytest.raises(IdentityMismatchError, match="ag-someone-else"):
        decode_batch_body(body, agent_id=AGENT)


@pytest.mark.parametrize(
    "event_id", ["", "not-a-uuid", EID.upper(), EID.replace("-", ""), "{" + EID + "}", EID + "\n"]
)
def test_event_id_must_be_canonical_uuid(event_id):
    with pytest.raises(MalformedBatchError, match="not a lowercase canonical UUID"):
        decode_one(make_event(event_id=event_id))


def test_duplicate_event_id_in_a_batch_is_malformed():
    body = body_of(make_event(event_id=EID), make_event(event_id=EID))
    with pytest.raises(MalformedBatchError, match="repeats an event_id"):
        decode_batch_body(body, agent_id=AGENT)


def test_batch_seq_zero_is_malformed():
    with pytest.raises(MalformedBatchError, match="batch_seq"):
        decode_batch_body(body_of(make_event(), seq=0), agent_id=AGENT)


@pytest.mark.parametrize("prev", [b"", b"\x00" * 31, b"\x00" * 33])
def test_prev_digest_must_be_32_bytes(prev):
    with pytest.raises(MalformedBatchError, match="prev_batch_digest"):
        decode_batch_body(body_of(make_event(), prev=prev), agent_id=AGENT)


def test_event_count_is_bounded():
    event = events_pb2.Event(action=events_pb2.ACTION_READ)
    events = []
    for i in range(MAX_EVENTS + 1):
        e = events_pb2.Event()
        e.CopyFrom(event)
        e.event_id = f"00000000-0000-4000-8000-{i:012x}"
        events.append(e)
    assert len(decode_batch_body(body_of(*events[:MAX_EVENTS]), agent_id=AGENT)[3]) == MAX_EVENTS
    with pytest.raises(MalformedBatchError, match=f"at most {MAX_EVENTS}"):
        decode_batch_body(body_of(*events), agent_id=AGENT)


def test_empty_batch_decodes():
    assert decode_batch_body(body_of(), agent_id=AGENT)[3] == ()


@pytest.mark.parametrize(
    "overrides",
    [
        {"label": "x" * (MAX_TEXT + 1)},
        {"host": "h" * (MAX_TEXT + 1)},
        {"user": events_pb2.UserInfo(login="u" * (MAX_TEXT + 1))},
        {"source": events_pb2.FileRef(path=b"/" * (MAX_TEXT + 1))},
        {"device": events_pb2.Device(serial="s" * (MAX_TEXT + 1))},
        {"process": events_pb2.ProcessInfo(exe=b"e" * (MAX_TEXT + 1))},
        {"process": events_pb2.ProcessInfo(cmdline=[b"a" * (MAX_TEXT + 1)])},
    ],
)
def test_oversized_fields_are_malformed(overrides):
    with pytest.raises(MalformedBatchError, match=f"longer than {MAX_TEXT}"):
        decode_one(make_event(**overrides))


def test_fields_at_the_limit_are_accepted():
    event = make_event(label="x" * MAX_TEXT, source=events_pb2.FileRef(path=b"/" * MAX_TEXT))
    event.process.cmdline[:] = [b"a" * MAX_TEXT] * 10
    stored = decode_one(event)
    assert len(stored.label) == MAX_TEXT and len(stored.source_path) == MAX_TEXT
    assert stored.process is not None and stored.process.cmdline[-1] == b"a" * MAX_TEXT


def test_event_size_is_bounded():
    event = make_event()
    event.process.cmdline[:] = [b"a" * 100] * (MAX_EVENT_BYTES // 100)
    with pytest.raises(MalformedBatchError, match=f"larger than {MAX_EVENT_BYTES}"):
        decode_one(event)


def test_equal_processes_and_devices_are_decoded_once_per_batch():
    first, second = make_event(), make_event()
    third = make_event(process=events_pb2.ProcessInfo(pid=1, name="rsync"))
    events = decode_batch_body(body_of(first, second, third), agent_id=AGENT)[3]
    assert events[0].process is events[1].process
    assert events[0].device is events[1].device is events[2].device
    assert events[2].process == ProcessView(pid=1, start_time_ns=0, name="rsync")


@pytest.mark.parametrize("sha", ["abc", "A" * 64, "g" * 64, "a" * 65])
def test_sha256_must_be_lowercase_hex(sha):
    with pytest.raises(MalformedBatchError, match="sha256"):
        decode_one(make_event(destination=events_pb2.FileRef(path=b"/x", sha256=sha)))


def test_counters_beyond_int64_are_malformed():
    with pytest.raises(MalformedBatchError, match="2\\*\\*63-1"):
        decode_one(make_event(destination=events_pb2.FileRef(path=b"/x", size=2**63)))


@pytest.mark.parametrize(("count", "stored"), [(0, 1), (1, 1), (37, 37)])
def test_folded_reads_keep_their_count(count, stored):
    assert decode_one(make_event(action=events_pb2.ACTION_READ, count=count)).access_count == stored


def test_a_network_share_remote_is_kept_and_bounded():
    share = events_pb2.Device(fs_type="cifs", mount_point=b"/mnt/finance", remote="//nas/fin")
    stored = decode_one(
        make_event(destination_class=events_pb2.DESTINATION_CLASS_NETWORK_SHARE, device=share)
    )
    assert stored.device == DeviceView(
        fs_type="cifs", mount_point=b"/mnt/finance", remote="//nas/fin"
    )
    assert stored.destination_key == "network_share://nas/fin"
    long = events_pb2.Device(fs_type="cifs", remote="x" * (MAX_TEXT + 1))
    with pytest.raises(MalformedBatchError, match="longer than"):
        decode_one(make_event(device=long))
