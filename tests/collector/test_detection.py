"""collector.detection cores against the cases of DETECTION-RULES §3 that need no store."""

from __future__ import annotations

import math
from typing import Any

import pytest

from collector.detection import baseline, cumulative
from collector.detection.baseline import BaselineRule, DayCount
from collector.detection.cumulative import CumulativeRule, Measure, Tier, WindowEvent
from collector.detection.risk import RiskConfig, RiskFacts, RiskTracker

S = 1_000_000_000
DAY = 86_400 * S
TRICKLE = CumulativeRule(
    "trickle-30d", Measure.DISTINCT_FILES, 30 * DAY, (Tier("medium", 15), Tier("high", 30))
)


def docs(n: int, *, start: int = 0, step: int = DAY, prefix: str = "d") -> list[WindowEvent]:
    return [
        WindowEvent(f"{prefix}{i}", start + i * step, f"{prefix}{i:062x}", 1000 + i)
        for i in range(n)
    ]


# 3.1 cumulative


def test_threshold_is_inclusive():
    events = docs(15)
    at = events[-1].ts_ns
    assert cumulative.evaluate(TRICKLE, events[:14], at).tier is None
    verdict = cumulative.evaluate(TRICKLE, events, at)
    assert verdict.tier == Tier("medium", 15)
    assert verdict.value == 15


def test_window_is_half_open():
    at = 100 * DAY
    old = WindowEvent("old", at - 30 * DAY, "a" * 64, 1)
    edge = WindowEvent("edge", at - 30 * DAY + S, "b" * 64, 1)
    verdict = cumulative.evaluate(TRICKLE, [old, edge], at)
    assert verdict.evidence == ("edge",)


def test_documents_count_once_by_hash_and_names_do_not_merge_documents():
    same = [
        WindowEvent(f"c{i}", i * S, "f" * 64, 500, path=f"/usb/x{i}".encode()) for i in range(5)
    ]
    verdict = cumulative.evaluate(TRICKLE, same, 10 * S)
    assert (verdict.value, verdict.bytes, verdict.events) == (1, 500, 5)
    named = [
        WindowEvent(f"n{i}", i * S, f"{i:064x}", 10, path=b"/usb/report.docx") for i in range(15)
    ]
    assert cumulative.evaluate(TRICKLE, named, 20 * S).value == 15


def test_events_without_hash_fall_back_to_path_and_size_and_say_so():
    events = [WindowEvent("a", 1, "", 10, b"/u/a"), WindowEvent("b", 2, "", 10, b"/u/a")]
    verdict = cumulative.evaluate(TRICKLE, events, 5)
    assert (verdict.value, verdict.fallback_keys) == (1, 1)


def test_tiers_escalate_and_never_step_down():
    events = docs(30)
    medium = cumulative.evaluate(TRICKLE, events[:15], events[14].ts_ns)
    high = cumulative.evaluate(TRICKLE, events, events[-1].ts_ns)
    assert medium.escalates(None)
    assert high.escalates(medium.tier)
    assert not medium.escalates(high.tier)
    assert not high.escalates(high.tier)


@pytest.mark.parametrize("measure, value", [(Measure.BYTES, 3000), (Measure.COUNT, 4)])
def test_bytes_sum_distinct_documents_and_count_counts_events(measure, value):
    rule = CumulativeRule("r", measure, DAY, (Tier("low", 1),))
    events = [
        WindowEvent("1", 1, "a" * 64, 1000),
        WindowEvent("2", 2, "a" * 64, 1000),
        WindowEvent("3", 3, "b" * 64, 2000),
        WindowEvent("4", 4, "b" * 64, 2000),
    ]
    assert cumulative.evaluate(rule, events, 10).value == value


def test_slow_leak_defeats_a_30_document_30_day_window_but_not_tiers_at_15():
    # 5 documents a week for six weeks: no 30-day window holds all 30.
    events = [e for w in range(6) for e in docs(5, start=w * 7 * DAY, step=S, prefix=f"w{w}-")]
    best = max(cumulative.evaluate(TRICKLE, events, e.ts_ns).value for e in events)
    assert best < 30
    assert best >= 15


# 3.2 baseline


def history(counts: list[int], *, start_day: int = 0, active: list[bool] | None = None):
    flags = active or [True] * len(counts)
    return [
        DayCount(start_day + i, c, a) for i, (c, a) in enumerate(zip(counts, flags, strict=True))
    ]


def expect(rule: BaselineRule, hist: list[DayCount], **kw: Any) -> baseline.Expectation:
    return baseline.expectation(
        rule,
        hist,
        department=kw.get("department"),
        department_rates=kw.get("department_rates", []),
        org_rates=kw.get("org_rates", []),
    )


def test_sparse_history_the_floor_governs():
    rule = BaselineRule("baseline-weekly")
    e = expect(rule, history([0] * 40))
    assert math.isclose(e.per_bucket, 0.0)
    assert not baseline.evaluate(rule, 4, e).fire
    verdict = baseline.evaluate(rule, 5, e)
    assert verdict.fire and verdict.threshold == 5


def test_heavy_legitimate_user_daily_bucket():
    rule = BaselineRule("daily", bucket_days=1, history_days=56)
    e = expect(rule, history([4] * 40))
    assert not baseline.evaluate(rule, 8, e).fire
    verdict = baseline.evaluate(rule, 13, e)
    assert verdict.fire and verdict.threshold == 12 and math.isclose(verdict.expected, 4)
    assert "expected 4.00" in verdict.explanation()


def test_cold_start_uses_the_department_then_the_organisation():
    rule = BaselineRule("daily", bucket_days=1)
    e = expect(rule, history([0, 0, 0]), department="finance", department_rates=[0.2] * 6)
    assert e.cold_start and e.source == "peer:finance"
    assert "cold_start=true" in baseline.evaluate(rule, 10, e).explanation()
    assert baseline.evaluate(rule, 10, e).fire
    small = expect(rule, history([0, 0, 0]), department="legal", department_rates=[0.2] * 3,
                   org_rates=[0.1, 0.3])  # fmt: skip
    assert small.source == "org"


def test_vacation_does_not_lower_the_baseline():
    rule = BaselineRule("weekly")
    work = [2, 2, 2, 2, 2, 0, 0] * 4
    before = expect(rule, history(work, active=[c > 0 for c in work]))
    away = work + [0] * 14
    after = expect(rule, history(away, active=[c > 0 for c in away]))
    assert math.isclose(before.per_bucket, after.per_bucket)
    assert math.isclose(before.per_bucket, 10.0)


def test_alerted_days_do_not_train_the_baseline():
    # a ramp of 0, 1, 2, 3 documents a day, two weeks each; alerts cover the ramp
    rule = BaselineRule("weekly")
    ramp = [DayCount(d, d // 14, True, alerted=d >= 14) for d in range(56)]
    excluded = expect(rule, ramp)
    assert excluded.active_days == 14
    assert baseline.evaluate(rule, 21, excluded).fire
    trained = expect(rule, [DayCount(d.day, d.count, True) for d in ramp])
    assert not baseline.evaluate(rule, 21, trained).fire  # why the exclusion matters


def test_one_spike_is_winsorised():
    # weekdays active: one document on Mondays, nothing else, and one day of 200
    rule = BaselineRule("weekly")
    days = [DayCount(d, 1 if d % 7 == 0 else 0, d % 7 < 5) for d in range(56)]
    days[23] = DayCount(23, 200, True)
    e = expect(rule, days)
    assert e.rate < 0.5
    assert baseline.evaluate(rule, 15, e).fire


def test_baseline_is_deterministic():
    rule = BaselineRule("weekly")
    hist = history([0, 3, 1, 0, 7, 2] * 9)
    assert expect(rule, hist) == expect(rule, list(hist))


# 3.3 risk

RISK = RiskConfig(
    base_by_label={"public": 0, "internal": 1, "confidential": 5, "secret": 10},
    destination_factor={"removable": 2, "cloud_sync": 2, "network_share": 0.5},
    watchlist_factor={"departing": 1.5, "priority": 1.25},
    indicator_points={"first_seen_device": 10, "off_hours": 3},
    indicator_cap_per_day={"off_hours": 3},
    tiers=(("medium", 100), ("high", 150), ("critical", 250)),
)


def fact(i: int, ts: int, *, label="secret", dest="removable", sha=None, **kw) -> RiskFacts:
    return RiskFacts(f"e{i}", ts, label, dest, sha or f"{i:064x}", ts // DAY, **kw)


def test_arithmetic_is_listed_term_by_term():
    tracker = RiskTracker(RISK)
    facts = fact(1, 0, watchlists=frozenset({"departing"}),
                 indicators=frozenset({"off_hours", "first_seen_device"}))  # fmt: skip
    contribution, _ = tracker.feed(facts)
    assert contribution is not None
    assert contribution.points == pytest.approx(43)
    assert [t.points for t in contribution.terms] == [30, 10, 3]
    assert contribution.terms[0].name == "secret x removable x departing"


def test_decay_halves_every_half_life():
    config = RiskConfig(base_by_label={"secret": 30}, destination_factor={"removable": 2},
                        tiers=((("medium", 100),)))  # fmt: skip
    tracker = RiskTracker(config)
    tracker.feed(fact(1, 0))
    assert tracker.score(0) == pytest.approx(60)
    assert tracker.score(14 * DAY) == pytest.approx(30)
    assert tracker.score(28 * DAY) == pytest.approx(15)


def test_same_file_to_same_destination_counts_once_a_day():
    tracker = RiskTracker(RISK)
    for i in range(10):
        tracker.feed(fact(i, i * 60 * S, sha="a" * 64))
    assert tracker.score(600 * S) == pytest.approx(20, rel=1e-3)
    tracker.feed(fact(99, DAY + 60 * S, sha="a" * 64))
    assert len(tracker.contributions) == 2


def test_listed_points_add_up_to_the_score_and_the_crossing_is_named():
    tracker = RiskTracker(RISK)
    crossings = []
    for i in range(6):
        _, crossing = tracker.feed(fact(i, i * DAY))
        if crossing:
            crossings.append(crossing)
    now = 6 * DAY
    listed = tracker.explain(now)
    assert sum(listed.values()) == pytest.approx(tracker.score(now), abs=0.01)
    assert list(listed.values()) == sorted(listed.values(), reverse=True)
    assert [c.severity for c in crossings] == ["medium"]
    assert crossings[0].new_episode
    assert crossings[0].contribution.event_id == "e5"  # 20 x sum of 6 decays = 106


def test_hysteresis_one_alert_until_the_score_falls_below_rearm():
    config = RiskConfig(base_by_label={"secret": 1}, destination_factor={"removable": 1},
                        tiers=(("medium", 100),), half_life_ns=None, max_age_ns=10 * S)  # fmt: skip
    tracker = RiskTracker(config)
    crossings = []
    # 101 single points inside 10 s, then the window slides: the score hovers near 100
    for i in range(300):
        _, crossing = tracker.feed(fact(i, i * S // 10))
        if crossing:
            crossings.append(crossing)
    assert len(crossings) == 1
    # silence: the score falls to 0 (below 80), so the next crossing is a new episode
    for i in range(300, 410):
        _, crossing = tracker.feed(fact(i, 100 * S + (i - 300) * S // 10))
        if crossing:
            crossings.append(crossing)
    assert [c.new_episode for c in crossings] == [True, True]


def test_false_positive_contributions_can_be_removed():
    tracker = RiskTracker(RISK)
    tracker.feed(fact(1, 0))
    tracker.feed(fact(2, 0))
    tracker.remove(["e1"])
    assert tracker.score(0) == pytest.approx(20)


def test_off_hours_is_capped_per_day_base_points_are_not():
    tracker = RiskTracker(RISK)
    for i in range(50):
        tracker.feed(fact(i, i * S, label="public", indicators=frozenset({"off_hours"})))
    assert tracker.score(60 * S) == pytest.approx(9, rel=1e-3)
    for i in range(50, 60):
        tracker.feed(fact(i, 70 * S, label="internal"))
    assert tracker.score(70 * S) == pytest.approx(9 + 20, rel=1e-3)


@pytest.mark.parametrize(
    "half_life, max_age, reaches",
    [
        (None, DAY, False),
        (None, 7 * DAY, False),
        (None, 30 * DAY, True),
        (14 * DAY, 90 * DAY, True),
    ],
)
def test_window_semantics_for_a_slow_leak(half_life, max_age, reaches):
    # four confidential documents to USB a week for six weeks, 10 points each
    config = RiskConfig(base_by_label={"confidential": 5}, destination_factor={"removable": 2},
                        tiers=(("medium", 100),), half_life_ns=half_life,
                        max_age_ns=max_age)  # fmt: skip
    tracker = RiskTracker(config)
    fired = False
    for week in range(6):
        for day in range(4):
            ts = (week * 7 + day) * DAY
            _, crossing = tracker.feed(fact(week * 7 + day, ts, label="confidential"))
            fired = fired or crossing is not None
    assert fired is reaches


def test_replay_gives_the_same_score():
    first, second = RiskTracker(RISK), RiskTracker(RISK)
    stream = [fact(i, i * 3600 * S, indicators=frozenset({"off_hours"})) for i in range(40)]
    for f in stream:
        first.feed(f)
    second.restore(first.contributions, None)
    assert round(second.score(50 * 3600 * S), 2) == round(first.score(50 * 3600 * S), 2)


@pytest.mark.parametrize("measure", list(Measure))
def test_the_slider_agrees_with_a_fresh_evaluation(measure):
    import random

    rng = random.Random(3)
    rule = CumulativeRule("r", measure, 50 * S, (Tier("low", 1),))
    docs = [rng.randrange(30) for _ in range(300)]  # equal hashes have equal sizes
    rows = [
        WindowEvent(f"e{i}", rng.randrange(0, 400) * S, f"{doc:064x}", 10 + doc * 7,
                    device=f"d{rng.randrange(4)}")
        for i, doc in enumerate(docs)
    ]  # fmt: skip
    slider = cumulative.Slider(rule, rows)
    for at in sorted({r.ts_ns for r in rows} | {r.ts_ns + 50 * S for r in rows}):
        assert slider.advance(at) == cumulative.evaluate(rule, rows, at).value
    assert slider.verdict() == cumulative.evaluate(rule, rows, at)
    with pytest.raises(ValueError, match="back"):
        slider.advance(0)


@pytest.mark.parametrize("half_life", [None, 14 * DAY])
def test_the_running_score_equals_the_listed_points_over_months(half_life):
    import random

    rng = random.Random(5)
    config = RiskConfig(base_by_label={"secret": 10}, destination_factor={"removable": 1},
                        tiers=(("medium", 10_000),), half_life_ns=half_life,
                        max_age_ns=30 * DAY)  # fmt: skip
    tracker = RiskTracker(config)
    ts = 0
    for i in range(3000):
        ts += rng.randrange(0, 2 * 3600) * S
        tracker.feed(fact(i, ts))
        if i % 97 == 0:
            assert tracker.score(ts) == pytest.approx(sum(tracker.explain(ts).values()), rel=1e-9)
    assert tracker.contributions[0].ts_ns > ts - 30 * DAY - 1
