"""Three slow insiders among 200 benign users: the long-horizon rules catch them, and only them.

The scenario of issue 6: each insider copies 30 confidential documents to a USB
stick over six weeks, in a different rhythm; benign users copy almost nothing, a
few heavy users copy many documents to a network share every working day. The
engine runs over an in-memory History here; the store-backed History answers the
same questions.
"""

from __future__ import annotations

import random
from collections import defaultdict

import pytest

from collector.detection.baseline import BaselineRule
from collector.detection.cumulative import CumulativeRule, Measure, Tier
from collector.detection.engine import (
    DAY_NS,
    Finding,
    FindingKind,
    LongEvent,
    LongRule,
    LongRuleEngine,
    Selector,
)
from collector.detection.memory import MemoryHistory
from collector.detection.risk import RiskConfig

HOUR = 3_600 * 1_000_000_000
RAISED = (FindingKind.OPENED, FindingKind.ESCALATED)
MINUTE = 60 * 1_000_000_000
RANKS = {"public": 0, "internal": 1, "confidential": 2, "secret": 3}
MONDAY = 20_003  # days since the epoch; (day + 3) % 7 == 0
PRE_WEEKS, TEST_WEEKS = 8, 6
START = MONDAY + PRE_WEEKS * 7  # first day of the six weeks

EGRESS = Selector(2, frozenset({"removable", "cloud_sync", "network_share"}))
TO_MEDIA = Selector(2, frozenset({"removable", "cloud_sync"}))
RULES = (
    LongRule(
        "burst-10m",
        TO_MEDIA,
        cumulative=CumulativeRule("burst-10m", Measure.DISTINCT_FILES, 10 * MINUTE,
                                  (Tier("high", 20),)),
    ),
    LongRule(
        "trickle-30d",
        TO_MEDIA,
        cumulative=CumulativeRule("trickle-30d", Measure.DISTINCT_FILES, 30 * DAY_NS,
                                  (Tier("medium", 15), Tier("high", 30))),
    ),
    LongRule(
        "trickle-90d",
        TO_MEDIA,
        cumulative=CumulativeRule("trickle-90d", Measure.DISTINCT_FILES, 90 * DAY_NS,
                                  (Tier("medium", 25), Tier("high", 60))),
    ),
    LongRule("baseline-weekly", EGRESS, baseline=BaselineRule("baseline-weekly")),
    LongRule(
        "risk",
        EGRESS,
        risk=RiskConfig(
            base_by_label={"confidential": 5, "secret": 10},
            destination_factor={"removable": 2, "cloud_sync": 2, "network_share": 0.1},
            indicator_points={"first_seen_device": 10, "off_hours": 3, "coverage_gap_near": 10},
            indicator_cap_per_day={"off_hours": 3},
            tiers=(("medium", 100), ("high", 150), ("critical", 250)),
        ),
    ),
)  # fmt: skip


class World:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.events: list[LongEvent] = []
        self.active: list[tuple[str, int]] = []
        self.departments: dict[str, str] = {}
        self.n = 0

    def copy(self, user: str, day: int, at: int, dest: str, device: str) -> LongEvent:
        self.n += 1
        event = LongEvent(
            event_id=f"ev-{self.n:07d}",
            user=user,
            ts_ns=day * DAY_NS + at,
            label="confidential",
            rank=RANKS["confidential"],
            destination_class=dest,
            action="copy",
            sha256=f"{self.rng.getrandbits(256):064x}",
            size=self.rng.randint(20_000, 5_000_000),
            device=device,
            host=f"ws-{user}",
        )
        self.events.append(event)
        return event

    def poisson(self, lam: float) -> int:
        # Knuth: small lambdas only
        limit, k, p = pow(2.718281828459045, -lam), 0, 1.0
        while True:
            p *= self.rng.random()
            if p <= limit:
                return k
            k += 1


def weekdays(first: int, weeks: int):
    return [d for d in range(first, first + weeks * 7) if (d + 3) % 7 < 5]


def build(seed: int) -> tuple[World, dict[str, list[str]]]:
    w = World(seed)
    benign = [f"user{i:03d}" for i in range(200)]
    heavy = benign[:5]
    insiders = ["steady", "clustered", "irregular"]
    for i, user in enumerate(benign + insiders):
        w.departments[user] = f"dept{i % 10}"
    all_days = weekdays(MONDAY, PRE_WEEKS + TEST_WEEKS)
    for user in benign + insiders:
        away = w.rng.randrange(len(all_days))  # two weeks of vacation somewhere
        for day in all_days:
            if away <= all_days.index(day) < away + 10 and user not in insiders:
                continue
            w.active.append((user, day))
            if user in heavy:
                for k in range(4):
                    w.copy(user, day, 9 * HOUR + k * HOUR, "network_share", "share-finance")
            elif user not in insiders or day < START:
                for k in range(w.poisson(0.03)):
                    w.copy(user, day, 10 * HOUR + k * MINUTE, "removable", f"usb-{user}")
    leaked: dict[str, list[str]] = defaultdict(list)
    test_days = weekdays(START, TEST_WEEKS)
    for day in test_days:  # steady: one a working day
        leaked["steady"].append(w.copy("steady", day, 14 * HOUR, "removable", "usb-x").event_id)
    for week in (0, 2, 4):  # clustered: ten in one evening, in weeks 1, 3 and 5
        day = START + week * 7 + 2
        for k in range(10):
            event = w.copy("clustered", day, 20 * HOUR + k * 2 * MINUTE, "removable", "usb-y")
            leaked["clustered"].append(event.event_id)
    plan = {0: [3, 4], 1: [5], 4: [4, 5], 5: [9]}  # irregular: a pause in weeks 3 and 4
    for week, per_day in plan.items():
        for i, count in enumerate(per_day):
            day = START + week * 7 + 1 + 2 * i
            for k in range(count):
                event = w.copy("irregular", day, 18 * HOUR + k * 7 * MINUTE, "removable", "usb-z")
                leaked["irregular"].append(event.event_id)
    assert all(len(ids) == 30 for ids in leaked.values())
    return w, leaked


def run(w: World) -> list[Finding]:
    """The rules are switched on at START over a store that already holds eight weeks."""
    history = MemoryHistory(w.departments)
    engine = LongRuleEngine(RULES, history)
    for user, day in w.active:
        history.activity(user, day)
    findings: list[Finding] = []
    for event in sorted(w.events, key=lambda e: (e.ts_ns, e.event_id)):
        history.add(event)
        if event.day >= START:
            findings.extend(engine.feed(event))
    return findings


@pytest.fixture(scope="module")
def simulated():
    w, leaked = build(seed=7)
    return w, leaked, run(w)


def test_every_insider_is_caught_before_the_end_of_week_five(simulated):
    _, leaked, findings = simulated
    deadline = (START + 5 * 7) * DAY_NS
    for insider in leaked:
        opened = [f for f in findings if f.user == insider and f.kind is FindingKind.OPENED]
        assert opened, f"{insider} never caught"
        assert min(f.at_ns for f in opened) < deadline, insider


def test_no_burst_rule_fires_and_no_benign_user_alerts(simulated):
    _, leaked, findings = simulated
    raised = [f for f in findings if f.kind in RAISED]
    assert not [f for f in raised if f.rule == "burst-10m"]
    benign = sorted({(f.user, f.rule) for f in raised if f.user not in leaked})
    assert benign == []


def test_one_alert_per_rule_and_insider_whose_evidence_lists_all_thirty(simulated):
    _, leaked, findings = simulated
    for insider, ids in leaked.items():
        by_rule: dict[str, list[Finding]] = defaultdict(list)
        for f in findings:
            if f.user == insider and f.kind is not FindingKind.CONTRIBUTION:
                by_rule[f.rule].append(f)
        assert by_rule, insider
        for rule, items in by_rule.items():
            assert [f.kind for f in items].count(FindingKind.OPENED) == 1, (insider, rule)
            raised = [f.threshold for f in items if f.kind in RAISED]
            assert raised == sorted(set(raised)), (insider, rule)  # severity only goes up
            evidence = {e for f in items for e in f.evidence}
            missing = set(ids) - evidence
            assert not missing, (insider, rule, len(missing))


def test_replay_is_deterministic(simulated):
    _, _, findings = simulated
    again, _ = build(seed=7)
    assert run(again) == findings


COLUMNS = (
    "event_id, agent_id, batch_seq, seq, observed_at_ns, action, host, user, label,"
    " label_source, source_path, source_size, source_sha256, dest_path, dest_size,"
    " dest_sha256, destination_class, detection, attribution, process_json, device_json,"
    " gap_reason, gap_count"
)


INSERT = f"INSERT INTO events ({COLUMNS}) VALUES ({','.join('?' * 23)})"  # noqa: S608


def copy_row(e: LongEvent, seq: int, shift_days: int = 0) -> tuple[object, ...]:
    """The events-table row of a simulated copy, `shift_days` later."""
    from collector.models import DeviceView
    from collector.queries import device_json

    return (e.event_id, "agent", 1, seq, e.ts_ns + shift_days * DAY_NS, e.action, e.host,
            e.user, e.label, "xattr", b"", 0, "", b"/media/" + e.event_id.encode(), e.size,
            e.sha256, e.destination_class, "exact_hash", "fanotify", None,
            device_json(DeviceView(serial=e.device)), "", 0)  # fmt: skip


def read_rows(w: World, shift_days: int = 0) -> list[tuple[object, ...]]:
    """Days on which a user was active but copied nothing still show in the store: a read."""
    seen = {(e.user, e.day) for e in w.events}
    return [
        (f"read-{u}-{d}", "agent", 1, 0, (d + shift_days) * DAY_NS + 9 * HOUR, "read",
         f"ws-{u}", u, "internal", "xattr", b"", 0, "", b"", 0, "", "local", "", "", None,
         None, "", 0)
        for u, d in w.active if (u, d) not in seen
    ]  # fmt: skip


def test_the_store_backed_history_gives_the_same_findings(simulated, tmp_path):
    import sqlite3

    from collector.detection.sqlhistory import SqlHistory
    from collector.store import SCHEMA

    w, _, findings = simulated
    con = sqlite3.connect(tmp_path / "events.db", isolation_level=None)
    con.executescript(SCHEMA)
    ordered = sorted(w.events, key=lambda e: (e.ts_ns, e.event_id))
    # (Only the past of each event matters to the reads, so they go in first.)
    con.executemany(INSERT, read_rows(w))
    history = SqlHistory(lambda: con, list(RANKS), departments=w.departments)
    engine = LongRuleEngine(RULES, history)
    replayed: list[Finding] = []
    for start in range(0, len(ordered), 500):  # stored batch by batch, as ingest does
        batch = ordered[start : start + 500]
        con.execute("BEGIN")
        con.executemany(INSERT, [copy_row(e, i) for i, e in enumerate(batch, start)])
        con.execute("COMMIT")
        replayed.extend(engine.feed_batch([e for e in batch if e.day >= START]))
    assert replayed == findings


def test_batches_give_the_same_findings_as_one_event_at_a_time(simulated):
    w, _, findings = simulated
    history = MemoryHistory(w.departments)
    engine = LongRuleEngine(RULES, history)
    for user, day in w.active:
        history.activity(user, day)
    ordered = sorted(w.events, key=lambda e: (e.ts_ns, e.event_id))
    batched: list[Finding] = []
    for start in range(0, len(ordered), 500):
        batch = ordered[start : start + 500]
        for event in batch:
            history.add(event)
        batched.extend(engine.feed_batch([e for e in batch if e.day >= START]))
    assert batched == findings


def test_baselines_wait_until_the_organisation_has_history():
    rule = LongRule("baseline-weekly", EGRESS, baseline=BaselineRule("baseline-weekly"))
    w = World(seed=1)
    history = MemoryHistory()
    engine = LongRuleEngine([rule], history)
    for quiet in range(10):  # colleagues at work every day, copying nothing
        for day in range(MONDAY, MONDAY + 22):
            history.activity(f"quiet{quiet}", day)
    found: list[Finding] = []
    for day in (MONDAY, MONDAY + 21):  # the store's first week, then three weeks on
        for k in range(6):
            event = w.copy(f"new{day}", day, 10 * HOUR + k * MINUTE, "removable", "usb")
            history.add(event)
            found.extend(engine.feed(event))
    assert [(f.user, f.kind) for f in found if f.kind in RAISED] == [
        (f"new{MONDAY + 21}", FindingKind.OPENED)
    ]
