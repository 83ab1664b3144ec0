"""collector.queries: the JSON of processes and devices, event rows, inserting new events."""

from __future__ import annotations

import json
import sqlite3
from base64 import b64encode

import pytest
from hypothesis import given
from hypothesis import strategies as st

from collector.detection.sqlhistory import DEVICE_SQL
from collector.longalerts import device_key
from collector.models import (
    AgentId,
    DeviceView,
    EventId,
    ProcessView,
    StoredEvent,
    VerifiedBatch,
)
from collector.queries import (
    EVENT_COLUMNS,
    device_json,
    event_from_row,
    event_rows,
    insert_new_events,
    process_json,
)
from collector.store import SCHEMA

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


@given(
    vendor=texts, model=texts, serial=texts, fs_uuid=texts, fs_type=texts, mount=blobs,
    remote=texts,
)  # fmt: skip
def test_device_json_is_what_the_encoder_writes(
    vendor, model, serial, fs_uuid, fs_type, mount, remote
):
    d = DeviceView(vendor, model, serial, fs_uuid, fs_type, mount, remote)
    expected = {
        "vendor": vendor,
        "model": model,
        "serial": serial,
        "fs_uuid": fs_uuid,
        "fs_type": fs_type,
        "mount_point": _b64(mount),
    }
    if remote:  # only network shares have one
        expected["remote"] = remote
    assert device_json(d) == _encoder(expected)


DEVICES = [
    DeviceView("Kingston", "DT50", "0019E06B", "1A2B-3C4D", "vfat", b"/media/a/K"),
    DeviceView(fs_uuid="1A2B-3C4D", fs_type="vfat", mount_point=b"/media/a/K"),
    DeviceView(fs_type="cifs", mount_point=b"/mnt/finance", remote="//nas/finance"),
    DeviceView(fs_type="nfs4", mount_point=b"/mnt/\xff"),
]


@pytest.mark.parametrize("device", DEVICES)
def test_a_device_has_one_identity_in_python_and_in_sql(device: DeviceView) -> None:
    con = sqlite3.connect(":memory:")
    sql = f"SELECT {DEVICE_SQL} FROM (SELECT ? AS device_json)"  # noqa: S608
    (in_sql,) = con.execute(sql, (device_json(device),)).fetchone()
    assert in_sql == device_key(device)


def test_a_share_is_identified_by_its_remote_and_rows_from_before_still_read() -> None:
    share = DEVICES[2]
    assert device_key(share) == "//nas/finance"
    event = StoredEvent(
        EventId("e"), AgentId("a"), 1, 1, 0, "copy", "h", "u", destination_class="network_share",
        device=share,
    )  # fmt: skip
    assert event.destination_key == "network_share://nas/finance"
    # A row a collector wrote before devices had a remote:
    old = _encoder(dict.fromkeys(("vendor", "model", "serial", "fs_uuid"), ""))[:-1]
    old += ',"fs_type":"cifs","mount_point":"L21udA=="}'
    i = [c.strip() for c in EVENT_COLUMNS.split(",")].index("device_json")
    row = next(event_rows([event._replace(device=None)]))
    device = event_from_row((*row[:i], old, *row[i + 1 :])).device
    assert device == DeviceView(fs_type="cifs", mount_point=b"/mnt")


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


def _batch(events: list[StoredEvent]) -> VerifiedBatch:
    return VerifiedBatch(
        agent_id=AgentId("ag"),
        batch_seq=1,
        digest=b"d" * 32,
        prev_digest=bytes(32),
        sealed_at_ns=0,
        body=b"",
        signature=b"",
        key_id=b"",
        events=tuple(events),
    )


@pytest.mark.parametrize("variables", [250_000, 100])
def test_insert_new_events_skips_stored_ids_in_one_statement_or_several(variables):
    con = sqlite3.connect(":memory:", isolation_level=None)
    for statement in SCHEMA.split(";"):
        if statement.strip():
            con.execute(statement)
    con.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, variables)  # 100: 4 rows a statement
    events = [
        StoredEvent(
            EventId(f"00000000-0000-4000-8000-{i:012x}"), AgentId("ag"), 1, i, i, "copy", "h", "u"
        )
        for i in range(10)
    ]
    con.execute("BEGIN")
    assert insert_new_events(con, [_batch(events[7:8])], list(event_rows(events[7:8]))) == [
        (events[7],)
    ]
    (stored,) = insert_new_events(con, [_batch(events)], list(event_rows(events)))
    con.execute("COMMIT")
    assert stored == tuple(events[:7] + events[8:])
    rows = con.execute("SELECT event_id FROM events ORDER BY seq").fetchall()
    assert [r[0] for r in rows] == [e.event_id for e in events]
