"""collector.queries: hand-written process and device JSON equal the encoder's; rows round-trip."""

from __future__ import annotations

import json
from base64 import b64encode

from hypothesis import given
from hypothesis import strategies as st

from collector.models import AgentId, DeviceView, EventId, ProcessView, StoredEvent
from collector.queries import device_json, event_from_row, event_rows, process_json

texts = st.text(max_size=40)
blobs = st.binary(max_size=40)
ints = st.integers(min_value=0, max_value=2**63 - 1)


def _encoder(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))


def _b64(data: bytes) -> str:
    return b64encode(data).decode("ascii")


@given(
    pid=st.integers(min_value=0, max_value=2**32 - 1),
    start=st.integers(min_value=-(2**63), max_value=2**63 - 1),
    exe=blobs,
    cmdline=st.lists(blobs, max_size=5),
    ppids=st.lists(st.integers(min_value=0, max_value=2**32 - 1), max_size=4),
    name=texts,
)
def test_process_json_is_what_the_encoder_writes(pid, start, exe, cmdline, ppids, name):
    p = ProcessView(pid, start, exe, tuple(cmdline), tuple(ppids), name)
    expected = {
        "pid": pid,
        "start_time_ns": start,
        "exe": _b64(exe),
        "cmdline": [_b64(a) for a in cmdline],
        "ppid_chain": ppids,
        "name": name,
    }
    assert process_json(p) == _encoder(expected)


@given(vendor=texts, model=texts, serial=texts, fs_uuid=texts, fs_type=texts, mount=blobs)
def test_device_json_is_what_the_encoder_writes(vendor, model, serial, fs_uuid, fs_type, mount):
    d = DeviceView(vendor, model, serial, fs_uuid, fs_type, mount)
    expected = {
        "vendor": vendor,
        "model": model,
        "serial": serial,
        "fs_uuid": fs_uuid,
        "fs_type": fs_type,
        "mount_point": _b64(mount),
    }
    assert device_json(d) == _encoder(expected)


def test_rows_round_trip_and_share_the_json_of_shared_views():
    device = DeviceView("Kingston", "DT50", "S1", "", "vfat", b"/media/\xff")
    process = ProcessView(7, 9, b"/usr/bin/cp", (b"cp", b"a"), (1,), "cp")
    events = [
        StoredEvent(
            event_id=EventId(f"00000000-0000-4000-8000-00000000000{i}"),
            agent_id=AgentId("ag"),
            batch_seq=1,
            seq=i,
            observed_at_ns=i,
            action="copy",
            host="h",
            user="u",
            process=process if i else None,
            device=device,
            gap_count=i,
        )
        for i in range(3)
    ]
    rows = list(event_rows(events))
    assert rows[1][19] is rows[2][19]  # serialised once
    assert rows[0][19] is None
    assert [event_from_row(row) for row in rows] == events
    assert event_from_row((*rows[0], 12345)) == events[0]  # trailing columns are ignored
