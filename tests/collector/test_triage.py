"""collector.triage: status transitions, assignee, notes, bulk changes, and the trail of each."""

from __future__ import annotations

import hashlib
import itertools
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from argon2 import PasswordHasher

from collector.errors import NotFoundError, TrailError, TriageError
from collector.ingest import Ingestor
from collector.models import AlertStatus
from collector.policy import load_policy
from collector.store import SCHEMA, SqliteStore
from collector.trail import Trail
from collector.triage import CLOSED, TRANSITIONS, Triage
from collector.users import Users
from tests.collector.batches import T0, BatchChain, enroll, new_agent
from tests.conftest import POLICY

NEW, IN_PROGRESS, RESOLVED, FALSE_POSITIVE = (
    AlertStatus.NEW,
    AlertStatus.IN_PROGRESS,
    AlertStatus.RESOLVED,
    AlertStatus.FALSE_POSITIVE,
)
ALLOWED = {
    (NEW, IN_PROGRESS),
    (NEW, RESOLVED),
    (NEW, FALSE_POSITIVE),
    (IN_PROGRESS, RESOLVED),
    (IN_PROGRESS, FALSE_POSITIVE),
    (RESOLVED, IN_PROGRESS),
    (FALSE_POSITIVE, IN_PROGRESS),
}
"""The issue's lifecycle, written out apart from the code's table."""


@pytest.fixture
def store(db_path: Path) -> Iterator[SqliteStore]:
    with SqliteStore.open(db_path) as s:
        cheap = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
        users = Users(s, hasher=cheap)
        for name, role in (("sam", "analyst"), ("dana", "admin"), ("lee", "viewer")):
            users.add(name, role, "correct horse battery", actor="cli:root", now_ns=T0)
        yield s


@pytest.fixture
def triage(store: SqliteStore) -> Triage:
    return Triage(store, Trail(store))


def new_alert(store: SqliteStore, n: int) -> int:
    """A real alert row (security alerts are the simplest to raise)."""
    return int(store.record_security_alert(f"ag-{n}", "SignatureError", "bad signature", T0))


def alert_entries(store: SqliteStore, alert_id: int) -> list[tuple[str, str, dict[str, object]]]:
    return [(e.actor, e.action, dict(e.detail)) for e in Trail(store).history(f"alert:{alert_id}")]


def test_the_code_table_is_the_documented_lifecycle() -> None:
    assert {(a, b) for a, bs in TRANSITIONS.items() for b in bs} == ALLOWED


def reach(triage: Triage, alert_id: int, status: AlertStatus) -> None:
    if status is not NEW:
        triage.set_status(alert_id, status, actor="sam", reason="set up", now_ns=T0 + 1)


@pytest.mark.parametrize(("start", "to"), list(itertools.product(AlertStatus, AlertStatus)))
def test_every_transition_is_allowed_or_refused(
    store: SqliteStore, triage: Triage, start: AlertStatus, to: AlertStatus
) -> None:
    alert_id = new_alert(store, 1)
    reach(triage, alert_id, start)
    before = alert_entries(store, alert_id)
    if (start, to) in ALLOWED:
        record = triage.set_status(alert_id, to, actor="sam", reason="checked", now_ns=T0 + 9)
        assert (record.status, record.updated_at_ns) == (to, T0 + 9)
        assert alert_entries(store, alert_id) == [
            *before,
            ("sam", "alert_status", {"from": start.value, "to": to.value, "reason": "checked"}),
        ]
    else:
        with pytest.raises(TriageError, match=f"alert {alert_id} is {start.value}"):
            triage.set_status(alert_id, to, actor="sam", reason="checked", now_ns=T0 + 9)
        alert, _ = store.get_alert(alert_id)
        assert alert.status is start and alert_entries(store, alert_id) == before


@pytest.mark.parametrize("start", [NEW, IN_PROGRESS])
@pytest.mark.parametrize("to", sorted(CLOSED))
@pytest.mark.parametrize("reason", [None, "", "  \n "])
def test_closing_needs_a_reason(
    store: SqliteStore, triage: Triage, start: AlertStatus, to: AlertStatus, reason: str | None
) -> None:
    alert_id = new_alert(store, 1)
    reach(triage, alert_id, start)
    with pytest.raises(TriageError, match="needs a reason"):
        triage.set_status(alert_id, to, actor="sam", reason=reason, now_ns=T0 + 5)
    assert store.get_alert(alert_id)[0].status is start


def test_reopen_and_start_need_no_reason(store: SqliteStore, triage: Triage) -> None:
    alert_id = new_alert(store, 1)
    triage.set_status(alert_id, "in_progress", actor="sam", reason=None, now_ns=T0 + 1)
    triage.set_status(alert_id, "resolved", actor="sam", reason="HR confirmed", now_ns=T0 + 2)
    reopened = triage.set_status(alert_id, "in_progress", actor="dana", reason=None, now_ns=T0 + 3)
    assert reopened.status is IN_PROGRESS
    assert alert_entries(store, alert_id)[-1] == (
        "dana",
        "alert_status",
        {"from": "resolved", "to": "in_progress"},
    )


def test_bad_status_unknown_alert_and_bad_reason_are_refused(
    store: SqliteStore, triage: Triage
) -> None:
    alert_id = new_alert(store, 1)
    with pytest.raises(TriageError, match="unknown status 'closed'"):
        triage.set_status(alert_id, "closed", actor="sam", reason="x", now_ns=T0)
    with pytest.raises(NotFoundError, match="no alert 999"):
        triage.set_status(999, "in_progress", actor="sam", reason=None, now_ns=T0)
    with pytest.raises(TriageError, match="too long"):
        triage.set_status(alert_id, "resolved", actor="sam", reason="x" * 2001, now_ns=T0)
    with pytest.raises(TriageError, match="control characters"):
        triage.set_status(alert_id, "resolved", actor="sam", reason="ok\x1b[2J", now_ns=T0)
    assert alert_entries(store, alert_id) == []


def test_the_change_and_its_trail_entry_commit_together(store: SqliteStore, triage: Triage) -> None:
    alert_id = new_alert(store, 1)
    with pytest.raises(TrailError):  # the entry cannot be written: no change either
        triage.set_status(alert_id, "in_progress", actor="  ", reason=None, now_ns=T0)
    assert store.get_alert(alert_id)[0].status is NEW
    with pytest.raises(TrailError):
        triage.add_note(alert_id, "a note", actor="", now_ns=T0)
    assert triage.notes(alert_id) == []


def test_assign_to_analysts_and_admins_only(store: SqliteStore, triage: Triage) -> None:
    alert_id = new_alert(store, 1)
    Users(store).lock("dana", actor="cli:root", now_ns=T0)
    assert triage.assign(alert_id, "SAM", actor="sam", now_ns=T0 + 1).assignee == "sam"
    assert store.get_alert(alert_id)[0].assignee == "sam"
    for who, why in (("lee", "a viewer cannot"), ("dana", "locked"), ("ghost", "no such user")):
        with pytest.raises(TriageError, match=why):
            triage.assign(alert_id, who, actor="sam", now_ns=T0 + 2)
    triage.assign(alert_id, "sam", actor="sam", now_ns=T0 + 3)  # no change: not recorded
    Users(store).unlock("dana", actor="cli:root", now_ns=T0)
    assert triage.assign(alert_id, "dana", actor="sam", now_ns=T0 + 4).assignee == "dana"
    assert triage.assign(alert_id, None, actor="dana", now_ns=T0 + 5).assignee is None
    assert alert_entries(store, alert_id) == [
        ("sam", "alert_assign", {"from": None, "to": "sam"}),
        ("sam", "alert_assign", {"from": "sam", "to": "dana"}),
        ("dana", "alert_assign", {"from": "dana", "to": None}),
    ]
    with pytest.raises(NotFoundError):
        triage.assign(999, "sam", actor="sam", now_ns=T0)


def test_notes_are_append_only(store: SqliteStore, triage: Triage, db_path: Path) -> None:
    alert_id = new_alert(store, 1)
    first = triage.add_note(alert_id, "  called alice's manager\n", actor="sam", now_ns=T0 + 1)
    second = triage.add_note(alert_id, "<b>benign</b>: backup", actor="dana", now_ns=T0 + 2)
    assert first.text == "called alice's manager" and second.note_id > first.note_id
    assert triage.notes(alert_id) == [first, second]
    assert triage.notes(new_alert(store, 2)) == []
    for bad, why in (
        ("", "empty"),
        ("   ", "empty"),
        ("x" * 10_001, "too long"),
        ("\x00", "control"),
    ):
        with pytest.raises(TriageError, match=why):
            triage.add_note(alert_id, bad, actor="sam", now_ns=T0 + 3)
    assert len(triage.add_note(alert_id, "y" * 10_000, actor="sam", now_ns=T0 + 4).text) == 10_000
    with pytest.raises(NotFoundError):
        triage.add_note(999, "note", actor="sam", now_ns=T0)
    with sqlite3.connect(db_path) as con:
        for sql in ("UPDATE alert_notes SET text = 'edited'", "DELETE FROM alert_notes"):
            with pytest.raises(sqlite3.IntegrityError, match="append-only"):
                con.execute(sql)
    con.close()
    assert [n.text for n in triage.notes(alert_id)][:2] == [first.text, second.text]
    # The trail holds each note's digest, so an edit behind the triggers' back shows.
    (_, action, detail) = alert_entries(store, alert_id)[0]
    digest = hashlib.sha256(first.text.encode()).hexdigest()
    assert (action, detail) == (
        "alert_note",
        {"note_id": first.note_id, "chars": 22, "sha256": digest},
    )


def test_history_is_the_alerts_trail_oldest_first(store: SqliteStore, triage: Triage) -> None:
    a, b = new_alert(store, 1), new_alert(store, 2)
    triage.assign(a, "sam", actor="dana", now_ns=T0 + 1)
    triage.set_status(b, "in_progress", actor="sam", reason=None, now_ns=T0 + 2)
    triage.add_note(a, "looking", actor="sam", now_ns=T0 + 3)
    triage.set_status(a, "false_positive", actor="sam", reason="backup job", now_ns=T0 + 4)
    history = triage.history(a)
    assert [(e.action, e.at_ns) for e in history] == [
        ("alert_assign", T0 + 1),
        ("alert_note", T0 + 3),
        ("alert_status", T0 + 4),
    ]
    assert {e.target for e in history} == {f"alert:{a}"}
    assert Trail(store).verify().ok


def test_bulk_status_is_all_or_nothing(store: SqliteStore, triage: Triage) -> None:
    a, b, c = (new_alert(store, n) for n in range(3))
    triage.set_status(c, "resolved", actor="sam", reason="done", now_ns=T0 + 1)
    entries = Trail(store).verify().count
    with pytest.raises(TriageError, match=f"alert {c} is resolved"):
        triage.bulk_status([a, b, c], "false_positive", actor="sam", reason="noise", now_ns=T0 + 2)
    with pytest.raises(NotFoundError):
        triage.bulk_status([a, 999], "in_progress", actor="sam", reason=None, now_ns=T0 + 2)
    assert [store.get_alert(i)[0].status for i in (a, b, c)] == [NEW, NEW, RESOLVED]
    assert Trail(store).verify().count == entries
    done = triage.bulk_status(
        [a, b, a], "false_positive", actor="sam", reason="noise", now_ns=T0 + 3
    )
    assert [(r.alert_id, r.status) for r in done] == [(a, FALSE_POSITIVE), (b, FALSE_POSITIVE)]
    for i in (a, b):  # one entry per alert
        assert alert_entries(store, i) == [
            ("sam", "alert_status", {"from": "new", "to": "false_positive", "reason": "noise"})
        ]


def test_bulk_assign_is_all_or_nothing(store: SqliteStore, triage: Triage) -> None:
    a, b = new_alert(store, 1), new_alert(store, 2)
    with pytest.raises(NotFoundError):
        triage.bulk_assign([a, 999, b], "sam", actor="dana", now_ns=T0)
    with pytest.raises(TriageError):
        triage.bulk_assign([a, b], "lee", actor="dana", now_ns=T0)
    assert [store.get_alert(i)[0].assignee for i in (a, b)] == [None, None]
    done = triage.bulk_assign([a, b], "sam", actor="dana", now_ns=T0 + 1)
    assert [r.assignee for r in done] == ["sam", "sam"]
    assert [len(alert_entries(store, i)) for i in (a, b)] == [1, 1]


# -- decisions and the threshold rules ---------------------------------------------


def burst_alerts(store: SqliteStore) -> list[tuple[int, AlertStatus, int]]:
    return [
        (int(a.alert_id), a.status, a.files)
        for a in store.list_alerts()
        if a.rule == "bulk-copy-to-usb"
    ][::-1]


def test_evidence_joins_open_alerts_and_a_closed_one_is_followed_up(
    store: SqliteStore, triage: Triage, tmp_path: Path
) -> None:
    """bulk-copy-to-usb: 20 files in 10 min. Events come 1 s apart, in batches of 5."""
    agent = new_agent()
    enroll(store, agent)
    policy = load_policy(POLICY)
    ingest = Ingestor(store, policy)
    chain = BatchChain(agent)
    now = T0 + 3600 * 10**9

    def upload(n: int = 5) -> None:
        ingest.upload(chain.next(n=n).raw, agent.agent_id, now)

    for _ in range(4):
        upload()
    ((first, _, files),) = burst_alerts(store)
    assert files == 20
    triage.set_status(first, "in_progress", actor="sam", reason=None, now_ns=now)
    upload()
    assert burst_alerts(store) == [(first, IN_PROGRESS, 25)]  # in progress still collects
    ingest = Ingestor(store, policy)  # a restart keeps an in-progress alert open
    ingest.restore(chain.now_ns)
    upload()
    assert burst_alerts(store) == [(first, IN_PROGRESS, 30)]

    # Closed while the copying goes on: the next evidence opens a new alert, not lost in
    # the closed one, and later evidence joins that.
    triage.set_status(first, "false_positive", actor="sam", reason="backup", now_ns=now)
    upload(2)
    upload(3)
    (_, follow_up) = burst_alerts(store)
    assert follow_up[1:] == (NEW, 5)
    assert burst_alerts(store)[0] == (first, FALSE_POSITIVE, 30)
    record, _ = store.get_alert(follow_up[0])
    assert record.reason.startswith(f"more after alert #{first} was closed as false_positive: ")
    assert record.first_ns > store.get_alert(first)[0].last_ns

    # After a pause longer than the window, the next crossing opens a new alert again.
    triage.set_status(follow_up[0], "resolved", actor="sam", reason="same job", now_ns=now)
    chain.now_ns += 11 * 60 * 10**9
    for _ in range(4):
        upload()
    alerts = burst_alerts(store)
    assert [s for _, s, _ in alerts] == [FALSE_POSITIVE, RESOLVED, NEW]
    assert alerts[2][2] == 20


def test_a_schema_1_database_gains_the_console_tables_and_assignee(tmp_path: Path) -> None:
    old = SCHEMA.split("-- The console")[0].replace(",\n    assignee TEXT)", ")")
    assert "assignee" not in old
    path = tmp_path / "old.db"
    con = sqlite3.connect(path)
    con.executescript(old)
    con.execute("INSERT INTO schema_version (version) VALUES (1)")
    con.execute(
        "INSERT INTO alerts (kind, rule, group_json, severity, status, reason, created_at_ns,"
        " updated_at_ns, files, bytes, first_ns, last_ns, hot_until_ns, agent_id)"
        " VALUES ('security', 'SignatureError', '[]', 'high', 'new', 'r', 1, 1, 0, 0, 1, 1, 0, 'a')"
    )
    con.commit()
    con.close()
    with SqliteStore.open(path) as store:
        Users(store, hasher=PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)).add(
            "sam", "analyst", "correct horse battery", actor="cli:root", now_ns=T0
        )
        assert Triage(store, Trail(store)).assign(1, "sam", actor="x", now_ns=T0).assignee == "sam"
    with sqlite3.connect(path) as con:
        assert con.execute("SELECT version FROM schema_version").fetchall() == [(2,)]
    con.close()
