"""The archive member name of an archive_member detection, from the agent to `events list`.

Agent event -> agent codec -> signed batch -> collector codec -> store -> views, with a
hostile member name (not UTF-8, terminal escapes); and an older database gaining the column.
"""

from __future__ import annotations

import base64
import contextlib
import json
import sqlite3

from agent import codec
from agent.events import (
    Action,
    DestinationClass,
    DetectionMethod,
    Event,
    EventId,
    FileRef,
)
from collector.models import AlertId, AlertKind, AlertStatus, Severity
from collector.records import AlertRecord
from collector.store import SqliteStore
from collector.verify import verify_batch
from collector.views import alert_text, event_json, event_line
from tests.collector.batches import SHA_A, SHA_B, T0, BatchChain, enroll, new_agent

MEMBER = b"board/\x1b[2Jminutes-\xff.docx"
"""A name an insider chose: an ANSI escape and a byte that is not UTF-8."""


def member_event(seq: int, member: bytes) -> Event:
    return Event(
        event_id=EventId(f"6f1c2a4e-8d3b-4c5a-9e7f-{seq:012x}"),
        observed_at_ns=T0 + seq,
        action=Action.COPY,
        host="lt-0412",
        agent_version="0.1.0",
        seq=seq,
        source=FileRef(path=b"/srv/board/minutes.docx", size=1000, sha256=SHA_A),
        label="secret",
        label_source="xattr",
        destination=FileRef(path=b"/media/usb/out.zip", size=50_000, sha256=SHA_B),
        destination_class=DestinationClass.REMOVABLE,
        detection=DetectionMethod.ARCHIVE_MEMBER,
        archive_member=member,
    )


def ingest(store: SqliteStore, events: list[Event]) -> None:
    agent = new_agent()
    enroll(store, agent)
    chain = BatchChain(agent)
    signed = chain.next([codec.encode_event(ev) for ev in events])
    batch = verify_batch(
        signed=signed.raw, tls_agent_id=agent.agent_id, agent=agent.key(), last=None
    )
    store.store_batch(batch, lambda ev: [], T0)


def test_member_name_travels_exactly_and_is_escaped_for_people(store) -> None:
    ingest(store, [member_event(1, MEMBER), member_event(2, b"")])
    with_member, plain = store.list_events(limit=10)
    assert with_member.archive_member == MEMBER
    assert with_member.detection == "archive_member"
    assert plain.archive_member == b""
    # One labelled document: the member's bytes, not the whole archive's.
    assert with_member.size == 1000
    assert plain.size == 50_000

    row = json.loads(json.dumps(event_json(with_member)))
    assert row["archive_member"] == {
        "name": "board/\\x1b[2Jminutes-\\xff.docx",
        "name_b64": base64.b64encode(MEMBER).decode(),
    }
    assert event_json(plain)["archive_member"] is None
    line = event_line(with_member)
    assert "\x1b" not in line
    assert "/media/usb/out.zip (member board/\\x1b[2Jminutes-\\xff.docx)" in line


def test_agent_codec_round_trips_the_member_name() -> None:
    ev = member_event(3, MEMBER)
    assert codec.event_from_bytes(codec.event_to_bytes(ev)) == ev


def test_alert_text_names_the_member(store) -> None:
    ingest(store, [member_event(1, MEMBER)])
    (ev,) = store.list_events(limit=1)
    alert = AlertRecord(
        alert_id=AlertId(1), kind=AlertKind.THRESHOLD, rule="r", group=(),
        severity=Severity.HIGH, status=AlertStatus.NEW, reason="x", created_at_ns=T0,
        updated_at_ns=T0, files=1, bytes=1000, first_ns=T0, last_ns=T0, hot_until_ns=T0,
        agent_id="ag", count=1, details="", evidence=(ev.event_id,),
    )  # fmt: skip
    text = alert_text(alert, [ev])
    assert "(member board/\\x1b[2Jminutes-\\xff.docx)" in text
    assert "\x1b" not in text


def test_a_database_without_the_column_gains_it(tmp_path) -> None:
    path = tmp_path / "old.db"
    with SqliteStore.open(path) as s:
        ingest(s, [member_event(1, b"")])
    with contextlib.closing(sqlite3.connect(path)) as con:
        con.execute("ALTER TABLE events DROP COLUMN archive_member")  # as schema 1 made it
        con.execute("UPDATE schema_version SET version = 1")
        con.commit()
    with SqliteStore.open(path) as s:
        (old,) = s.list_events(limit=10)
        assert old.archive_member == b""
        ingest(s, [member_event(2, MEMBER)])
        assert [e.archive_member for e in s.list_events(limit=10)] == [b"", MEMBER]
