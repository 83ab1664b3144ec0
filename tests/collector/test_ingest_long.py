"""Long rules at ingest: real signed batches through the real store, triage, and a restart."""

from __future__ import annotations

import json
import sqlite3
import uuid

import pytest
import yaml

from collector.ingest import Ingestor
from collector.policy import parse_policy
from collector.records import AlertRecord
from collector.store import SqliteStore
from collector.trail import Trail
from collector.triage import Triage
from exfilwatch.v1 import events_pb2
from tests.collector.batches import T0, BatchChain, enroll, new_agent

DAY = 86_400 * 10**9
POLICY = """
labels: [public, internal, confidential, secret]
rules:
  - {name: burst, match: {min_label: confidential, destinations: [removable]},
     group_by: [user], window: 10m, threshold: {files: 20}, severity: high}
long_rules:
  - name: trickle-30d
    kind: cumulative
    match: {min_label: confidential, destinations: [removable]}
    measure: distinct_files
    window: 30d
    tiers: {medium: 6, high: 10}
  - name: risk
    kind: risk
    match: {min_label: confidential, destinations: [removable]}
    base_by_label: {confidential: 5, secret: 10}
    destination_factor: {removable: 2}
    indicators: {first_seen_device: 10, coverage_gap_near: 7}
    tiers: {medium: 40, high: 80}
"""


def long_alerts(store: SqliteStore, rule: str) -> list[AlertRecord]:
    return sorted((a for a in store.list_alerts() if a.rule == rule), key=lambda a: a.alert_id)


def leak(ingest: Ingestor, chain: BatchChain, day: int, n: int, first: int) -> None:
    """`n` distinct documents to the USB stick on `day`, one batch."""
    events = []
    for i in range(n):
        chain.event_seq += 1
        sha = f"{first + i:064x}"
        ev = chain.events(1)[0]
        ev.seq = chain.event_seq
        ev.observed_at_ns = T0 + day * DAY + i * 10**9
        ev.destination.sha256 = sha
        ev.destination.size = 1000 + first + i
        events.append(ev)
    ingest.upload(chain.next(events).raw, chain.agent.agent_id, T0 + day * DAY + 3600 * 10**9)


def test_a_slow_leak_raises_one_alert_whose_evidence_grows_and_escalates(store):
    agent = new_agent()
    enroll(store, agent)
    ingest = Ingestor(store, parse_policy(yaml.safe_load(POLICY), "p"))
    chain = BatchChain(agent)
    for week in range(4):  # three documents a week
        leak(ingest, chain, week * 7, 3, first=week * 3)
    assert long_alerts(store, "burst") == []
    (alert,) = long_alerts(store, "trickle-30d")
    assert alert.severity == "high"  # 6 in the second week (medium), 12 by the fourth
    details = json.loads(alert.details)
    assert details["rule_kind"] == "cumulative"
    assert details["threshold"] == 10
    assert alert.files == 12 and len(alert.evidence) == 12
    assert alert.bytes == sum(1000 + i for i in range(12))
    assert dict(alert.group) == {"user": "alice"}


def test_restart_and_triage(tmp_path):
    path = tmp_path / "collector.db"
    policy = parse_policy(yaml.safe_load(POLICY), "p")
    agent = new_agent()
    chain = BatchChain(agent)
    with SqliteStore.open(path) as store:
        enroll(store, agent)
        ingest = Ingestor(store, policy)
        leak(ingest, chain, 0, 6, first=0)
        (alert,) = long_alerts(store, "trickle-30d")
        assert alert.severity == "medium" and alert.files == 6
    with SqliteStore.open(path) as store:  # a restart: the engine starts empty
        ingest = Ingestor(store, policy)
        leak(ingest, chain, 1, 2, first=100)
        (alert,) = long_alerts(store, "trickle-30d")
        assert alert.files == 8, "evidence joins the open alert after a restart"
        Triage(store, Trail(store)).set_status(
            alert.alert_id, "resolved", actor="sam", reason="confirmed, HR informed", now_ns=T0
        )
        leak(ingest, chain, 2, 2, first=200)  # 10 in 30 days: a new episode, at high
        alerts = long_alerts(store, "trickle-30d")
        assert [(a.status, a.severity) for a in alerts] == [
            ("resolved", "medium"),
            ("new", "high"),
        ]


def test_risk_points_are_stored_term_by_term_and_add_up(store, tmp_path):
    agent = new_agent()
    enroll(store, agent)
    ingest = Ingestor(store, parse_policy(yaml.safe_load(POLICY), "p"))
    chain = BatchChain(agent)
    leak(ingest, chain, 0, 4, first=0)  # 10 + 10 (first device) + 10 + 10 + 10 = 50
    (alert,) = long_alerts(store, "risk")
    details = json.loads(alert.details)
    assert details["value"] == pytest.approx(50, rel=0.01)
    con = sqlite3.connect(tmp_path / "collector.db")
    rows = con.execute("SELECT term, points FROM risk_contributions ORDER BY rowid").fetchall()
    assert ("first_seen_device", 10.0) in rows
    assert sum(p for _, p in rows) == pytest.approx(50)


def test_a_coverage_gap_just_before_a_copy_adds_its_points(store, tmp_path):
    from exfilwatch.v1 import events_pb2

    agent = new_agent()
    enroll(store, agent)
    ingest = Ingestor(store, parse_policy(yaml.safe_load(POLICY), "p"))
    chain = BatchChain(agent)
    leak(ingest, chain, 0, 1, first=0)  # day 0: one copy, no gap
    chain.event_seq += 1
    gap = chain.events(1)[0]
    gap.Clear()
    gap.event_id, gap.seq, gap.host = str(uuid.uuid4()), chain.event_seq, "lt-0412"
    gap.action = events_pb2.ACTION_COVERAGE_GAP
    gap.observed_at_ns = T0 + 5 * DAY - 60 * 10**9
    gap.gap.reason, gap.gap.count = "inotify_overflow", 3
    ingest.upload(chain.next([gap]).raw, agent.agent_id, T0 + 5 * DAY)
    leak(ingest, chain, 5, 1, first=1)  # a minute after the gap
    leak(ingest, chain, 6, 1, first=2)  # a day later: no gap near
    con = sqlite3.connect(tmp_path / "collector.db")
    terms = con.execute(
        "SELECT ts_ns / ?, term FROM risk_contributions WHERE term = 'coverage_gap_near'", (DAY,)
    ).fetchall()
    assert [day - T0 // DAY for day, _ in terms] == [5]


def test_each_member_of_an_archive_is_a_document(store):
    agent = new_agent()
    enroll(store, agent)
    ingest = Ingestor(store, parse_policy(yaml.safe_load(POLICY), "p"))
    chain = BatchChain(agent)
    events = []
    for i in range(6):  # one zip on the stick, six labelled members: six documents
        ev = chain.events(1)[0]
        ev.source.sha256, ev.source.size = f"{i + 1:064x}", 500 + i
        ev.destination.sha256, ev.destination.size = "e" * 64, 4000
        ev.destination.path = b"/media/alice/KINGSTON/board.zip"
        ev.detection = events_pb2.DETECTION_METHOD_ARCHIVE_MEMBER
        ev.archive_member = f"minutes-{i}.docx".encode()
        events.append(ev)
    ingest.upload(chain.next(events).raw, agent.agent_id, T0 + 3600 * 10**9)
    (alert,) = long_alerts(store, "trickle-30d")
    assert alert.files == 6
    assert alert.bytes == sum(500 + i for i in range(6))


def test_a_false_positive_takes_its_points_out_of_the_score(store):
    agent = new_agent()
    enroll(store, agent)
    ingest = Ingestor(store, parse_policy(yaml.safe_load(POLICY), "p"))
    chain = BatchChain(agent)
    leak(ingest, chain, 0, 4, first=0)  # 50 points: a risk alert at medium (40)
    (alert,) = long_alerts(store, "risk")
    Triage(store, Trail(store)).set_status(
        alert.alert_id, "false_positive", actor="sam", reason="backup job", now_ns=T0
    )
    leak(ingest, chain, 0, 3, first=10)  # 30 more: 80 (high) with the dismissed points
    assert [a.status for a in long_alerts(store, "risk")] == ["false_positive"]
    leak(ingest, chain, 0, 1, first=20)  # 40 without them: a new alert, at medium
    assert [(a.status, a.severity) for a in long_alerts(store, "risk")] == [
        ("false_positive", "medium"),
        ("new", "medium"),
    ]


def test_late_events_count_in_the_windows_they_belong_to(store):
    """An agent offline for three days delivers with the original times (DETECTION-RULES
    §3.1.5): they count in their own windows, and the alert shows those times."""
    agent = new_agent()
    enroll(store, agent)
    ingest = Ingestor(store, parse_policy(yaml.safe_load(POLICY), "p"))
    chain = BatchChain(agent)
    leak(ingest, chain, 10, 3, first=0)  # day 10, delivered on time
    events = []
    for i in range(3):  # days 7 to 9, delivered on day 10 after the others
        ev = chain.events(1)[0]
        ev.observed_at_ns = T0 + (7 + i) * DAY
        ev.destination.sha256, ev.destination.size = f"{100 + i:064x}", 2000 + i
        events.append(ev)
    ingest.upload(chain.next(events).raw, agent.agent_id, T0 + 10 * DAY + 7200 * 10**9)
    (alert,) = long_alerts(store, "trickle-30d")
    assert alert.files == 6
    assert alert.first_ns == T0 + 7 * DAY  # the evidence keeps the original times


def test_a_rename_or_an_archive_shortly_before_a_copy_is_staging(store, tmp_path):
    policy = parse_policy(
        yaml.safe_load(POLICY.replace("coverage_gap_near: 7}", "staged_before_copy: 3}")), "p"
    )
    agent = new_agent()
    enroll(store, agent)
    ingest = Ingestor(store, policy)
    chain = BatchChain(agent)
    rename = chain.events(1)[0]
    rename.action = events_pb2.ACTION_RENAME
    rename.observed_at_ns = T0 + 2 * DAY - 600 * 10**9  # ten minutes before day 2's copy
    ingest.upload(chain.next([rename]).raw, agent.agent_id, T0 + 2 * DAY)
    leak(ingest, chain, 0, 1, first=0)  # day 0: nothing staged
    leak(ingest, chain, 2, 1, first=1)  # day 2: a rename ten minutes before
    archived = chain.events(1)[0]  # day 4: a member of a zip on the stick
    archived.observed_at_ns = T0 + 4 * DAY
    archived.source.sha256, archived.destination.sha256 = "7" * 64, "8" * 64
    archived.detection = events_pb2.DETECTION_METHOD_ARCHIVE_MEMBER
    archived.archive_member = b"minutes.docx"
    ingest.upload(chain.next([archived]).raw, agent.agent_id, T0 + 4 * DAY)
    con = sqlite3.connect(tmp_path / "collector.db")
    days = con.execute(
        "SELECT ts_ns / ? FROM risk_contributions WHERE term = 'staged_before_copy'", (DAY,)
    ).fetchall()
    assert [day - T0 // DAY for (day,) in days] == [2, 4]
