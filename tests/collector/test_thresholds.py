"""Threshold engine: windows on event time, one alert per hot group, bounded memory, restore."""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from hypothesis import given, settings
from hypothesis import strategies as st

from collector.models import (
    AgentId,
    AlertOpened,
    DeviceView,
    EventId,
    EvidenceAdded,
    GroupKey,
    Severity,
    StoredEvent,
    ThresholdDecision,
)
from collector.policy import Policy, parse_policy
from collector.reasons import ReasonParts
from collector.thresholds import ThresholdEngine, group_key

S = 1_000_000_000
MIB = 1 << 20
LABELS = ["public", "internal", "confidential", "secret"]
_ids = itertools.count()


def make_event(
    t: int,
    *,
    size: int = 1000,
    user: str = "alice",
    host: str = "lt-0412",
    label: str = "confidential",
    action: str = "copy",
    destination_class: str = "removable",
    serial: str = "KINGSTON-1",
    event_id: str | None = None,
) -> StoredEvent:
    """A copy of a labelled file to a USB stick at event time `t` (ns)."""
    n = next(_ids)
    return StoredEvent(
        event_id=EventId(event_id or f"ev-{n}"),
        agent_id=AgentId(f"agent-{host}"),
        batch_seq=1,
        seq=n,
        observed_at_ns=t,
        action=action,
        host=host,
        user=user,
        label=label,
        source_path=b"/srv/secret/plan.docx",
        source_size=size,
        dest_path=b"/media/usb/plan.docx",
        dest_size=size,
        destination_class=destination_class,
        device=DeviceView(serial=serial) if destination_class == "removable" else None,
    )


def make_policy(*rules: dict[str, object]) -> Policy:
    return parse_policy({"labels": LABELS, "rules": list(rules)}, "test")


def rule(
    name: str = "r",
    *,
    files: int | None = 3,
    size: str | int | None = None,
    window: str = "10s",
    group_by: Iterable[str] = ("user", "host"),
    **match: object,
) -> dict[str, object]:
    threshold: dict[str, object] = {}
    if files is not None:
        threshold["files"] = files
    if size is not None:
        threshold["bytes"] = size
    return {
        "name": name,
        "match": {"min_label": "confidential", "destinations": ["removable"], **match},
        "group_by": list(group_by),
        "window": window,
        "threshold": threshold,
        "severity": "high",
    }


def feed_all(engine: ThresholdEngine, events: Iterable[StoredEvent]) -> list[ThresholdDecision]:
    decisions: list[ThresholdDecision] = []
    for event in events:
        decisions.extend(engine.feed(event, event.observed_at_ns))
    return decisions


def kinds(decisions: Iterable[ThresholdDecision]) -> list[str]:
    return ["open" if isinstance(d, AlertOpened) else "evidence" for d in decisions]


def test_exactly_at_files_threshold_fires_one_below_does_not() -> None:
    engine = ThresholdEngine(make_policy(rule(files=3)))
    events = [make_event(t * S) for t in range(3)]

    assert feed_all(engine, events[:2]) == []
    (opened,) = engine.feed(events[2], 2 * S)

    assert isinstance(opened, AlertOpened)
    assert opened.rule == "r"
    assert opened.group == (("user", "alice"), ("host", "lt-0412"))
    assert opened.severity is Severity.HIGH
    assert opened.evidence == tuple(e.event_id for e in events)
    assert (opened.files, opened.bytes) == (3, 3000)
    assert (opened.first_ns, opened.last_ns) == (0, 2 * S)
    assert opened.hot_until_ns == 0 + 10 * S  # the 3rd most recent event + window


def test_exactly_at_bytes_threshold_fires_one_below_does_not() -> None:
    engine = ThresholdEngine(make_policy(rule(files=None, size=100)))

    assert feed_all(engine, [make_event(0, size=60), make_event(S, size=39)]) == []
    (opened,) = engine.feed(make_event(2 * S, size=1), 2 * S)

    assert isinstance(opened, AlertOpened)
    assert (opened.files, opened.bytes) == (3, 100)
    assert opened.hot_until_ns == 0 + 10 * S  # the newest run reaching 100 bytes starts at 0


def test_event_exactly_a_window_apart_is_outside_one_ns_inside_is_in() -> None:
    engine = ThresholdEngine(make_policy(rule(files=2, window="10s")))

    assert feed_all(engine, [make_event(0), make_event(10 * S)]) == []
    (opened,) = engine.feed(make_event(20 * S - 1), 20 * S)

    assert isinstance(opened, AlertOpened)
    assert (opened.first_ns, opened.last_ns) == (10 * S, 20 * S - 1)


def test_bytes_cross_before_files() -> None:
    engine = ThresholdEngine(make_policy(rule(files=20, size="100MiB", window="10m")))

    decisions = feed_all(engine, [make_event(t * S, size=40 * MIB) for t in range(3)])

    (opened,) = decisions
    assert isinstance(opened, AlertOpened)
    assert (opened.files, opened.bytes) == (3, 120 * MIB)
    assert opened.hot_until_ns == 0 + 600 * S  # only all three together reach 100 MiB


def test_one_alert_per_group_while_hot_then_evidence_extends_hot_until() -> None:
    engine = ThresholdEngine(make_policy(rule(files=3, window="10s")))
    feed_all(engine, [make_event(t * S) for t in range(3)])

    later = [make_event(t * S) for t in (3, 4, 9)]
    decisions = feed_all(engine, later)

    # Each decision says how its event reads in the alert's reason (collector.reasons).
    words = ReasonParts(
        "r: 3 files in 10s",
        "alice",
        "lt-0412",
        None,
        2,
        "confidential",
        ("copied",),
        ("removable",),
    )
    assert decisions == [
        EvidenceAdded("r", group_key_of(later[0]), later[0].event_id, 11 * S, words),
        EvidenceAdded("r", group_key_of(later[0]), later[1].event_id, 12 * S, words),
        EvidenceAdded("r", group_key_of(later[0]), later[2].event_id, 13 * S, words),
    ]


def test_new_alert_after_the_window_cools() -> None:
    engine = ThresholdEngine(make_policy(rule(files=3, window="10s")))
    assert kinds(feed_all(engine, [make_event(t * S) for t in range(3)])) == ["open"]  # hot to 10s

    assert feed_all(engine, [make_event(12 * S + 1)]) == []  # (2s + 1, 12s + 1] holds just it
    second = feed_all(engine, [make_event(t * S) for t in (15, 16)])

    (opened,) = second
    assert isinstance(opened, AlertOpened)
    assert opened.files == 3
    assert opened.first_ns == 12 * S + 1


def test_a_crossing_exactly_at_hot_until_continues_the_episode() -> None:
    engine = ThresholdEngine(make_policy(rule(files=3, window="10s")))
    feed_all(engine, [make_event(t * S) for t in range(3)])  # hot until 10s

    (decision,) = engine.feed(make_event(10 * S), 10 * S)  # (0, 10s] still holds 3 events

    assert isinstance(decision, EvidenceAdded)
    assert decision.hot_until_ns == 11 * S


def test_groups_by_user_user_host_and_destination_keep_separate_state() -> None:
    policy = make_policy(
        rule("by-user", files=2, group_by=["user"]),
        rule("by-user-host", files=2, group_by=["user", "host"]),
        rule("by-destination", files=2, group_by=["destination"]),
    )
    engine = ThresholdEngine(policy)
    events = [
        make_event(0, host="h1", serial="A"),
        make_event(1, host="h2", serial="B"),
        make_event(2, user="bob", host="h3", serial="C"),
    ]

    decisions = feed_all(engine, events)

    (opened,) = decisions
    assert isinstance(opened, AlertOpened)
    assert (opened.rule, opened.group) == ("by-user", (("user", "alice"),))
    # Carol uses alice's stick A: the second event for "removable:A", and only that, fires.
    (dest,) = engine.feed(make_event(3, user="carol", host="h4", serial="A"), 3)
    assert isinstance(dest, AlertOpened)
    assert (dest.rule, dest.group) == ("by-destination", (("destination", "removable:A"),))
    assert dest.evidence == (events[0].event_id, dest.evidence[1])
    # by-user: alice 2 + episode, bob 1, carol 1; by-user-host: 4 x 1; by-destination: A 2
    # + episode, B 1, C 1.
    assert engine.state_size() == 5 + 4 + 5


def test_labels_below_min_unlisted_or_empty_never_match() -> None:
    engine = ThresholdEngine(make_policy(rule(files=1)))

    for label in ("public", "internal", "top-secret", "", "CONFIDENTIAL"):
        assert engine.feed(make_event(0, label=label), 0) == []
    assert engine.state_size() == 0
    assert kinds(engine.feed(make_event(0, label="secret"), 0)) == ["open"]


def test_actions_and_destinations_filter() -> None:
    engine = ThresholdEngine(make_policy(rule(files=1), rule("reads", files=1, actions=["read"])))

    assert engine.feed(make_event(0, action="delete"), 0) == []
    assert engine.feed(make_event(0, destination_class="local"), 0) == []
    assert engine.feed(make_event(0, destination_class=""), 0) == []
    (moved,) = engine.feed(make_event(0, action="move"), 0)
    assert isinstance(moved, AlertOpened)
    assert moved.rule == "r"
    (read,) = engine.feed(make_event(0, action="read"), 0)
    assert isinstance(read, AlertOpened)
    assert read.rule == "reads"


def test_duplicate_event_ids_are_ignored() -> None:
    engine = ThresholdEngine(make_policy(rule(files=2)))
    event = make_event(0)

    assert engine.feed(event, 0) == []
    assert engine.feed(event, 0) == []
    assert engine.state_size() == 1
    assert kinds(engine.feed(make_event(1), 1)) == ["open"]
    assert engine.feed(event, 1) == []


def test_out_of_order_event_completes_a_window_in_time_order() -> None:
    engine = ThresholdEngine(make_policy(rule(files=3, window="10s")))
    events = [make_event(t * S) for t in (5, 1, 3)]

    (opened,) = feed_all(engine, events)

    assert isinstance(opened, AlertOpened)
    assert opened.evidence == (events[1].event_id, events[2].event_id, events[0].event_id)
    assert (opened.first_ns, opened.last_ns) == (1 * S, 5 * S)
    assert opened.hot_until_ns == 11 * S


def test_late_event_makes_an_earlier_window_cross_and_attaches_later_events() -> None:
    engine = ThresholdEngine(make_policy(rule(files=None, size=100, window="10s")))
    early = [make_event(t * S, size=n) for t, n in ((8, 50), (12, 10), (15, 30))]
    assert feed_all(engine, early) == []  # (5s, 15s] holds 90 bytes

    late = make_event(9 * S, size=45)
    opened, attached = engine.feed(late, 16 * S)

    assert isinstance(opened, AlertOpened)
    assert opened.evidence == (early[0].event_id, late.event_id, early[1].event_id)
    assert (opened.first_ns, opened.last_ns, opened.bytes) == (8 * S, 12 * S, 105)
    assert opened.hot_until_ns == 18 * S  # the 100 bytes ending at 12s and 15s start at 8s
    assert attached == EvidenceAdded("r", opened.group, early[2].event_id, 18 * S, opened.parts)


def test_very_late_event_is_counted_against_what_is_retained_only() -> None:
    engine = ThresholdEngine(make_policy(rule(files=3, window="10s")))
    assert feed_all(engine, [make_event(t * S) for t in (0, 8, 20)]) == []  # at 20s, 0s and 8s go

    # In time order, (-1s, 9s] would hold 0s, 8s, 9s and cross: the documented undercount.
    assert engine.feed(make_event(9 * S), 21 * S) == []


def test_late_event_inside_an_open_episode_is_evidence() -> None:
    engine = ThresholdEngine(make_policy(rule(files=3, window="10s")))
    feed_all(engine, [make_event(t * S) for t in (4, 5, 6)])  # hot from 6s until 14s

    (decision,) = engine.feed(make_event(1 * S), 7 * S)  # in the crossing window (-4s, 6s]

    assert isinstance(decision, EvidenceAdded)
    assert decision.hot_until_ns == 14 * S


def test_events_with_equal_times_share_their_window() -> None:
    engine = ThresholdEngine(make_policy(rule(files=3, window="10s")))

    decisions = feed_all(engine, [make_event(5 * S) for _ in range(3)])

    assert kinds(decisions) == ["open"]
    assert decisions[0].hot_until_ns == 15 * S


def test_reason_reads_like_a_sentence() -> None:
    engine = ThresholdEngine(
        make_policy(rule("bulk-copy-to-usb", files=20, size="100MiB", window="10m"))
    )
    events = [make_event(t * 9 * S + t * S // 2, size=2 * MIB) for t in range(19)]
    events.append(make_event(180 * S, size=2 * MIB, label="secret"))

    (opened,) = feed_all(engine, events)

    assert isinstance(opened, AlertOpened)
    assert opened.reason == (
        "alice on lt-0412 copied 20 secret files, 40.0 MiB (41943040 bytes), to removable "
        "in 3 min; rule bulk-copy-to-usb: 20 files / 100 MiB in 10m"
    )


def test_reason_without_user_keeps_group_values_and_one_line() -> None:
    engine = ThresholdEngine(make_policy(rule(files=2, group_by=["host", "destination"])))

    decisions = feed_all(
        engine, [make_event(0, host="lt\n9", action="move"), make_event(S, host="lt\n9")]
    )

    (opened,) = decisions
    assert isinstance(opened, AlertOpened)
    assert opened.reason == (
        "on lt\\n9: 2 confidential files, 2.0 KiB (2000 bytes), copied or moved to "
        "removable:KINGSTON-1 in 1 s; rule r: 2 files in 10s"
    )


def test_thirty_day_window_with_100k_events_keeps_state_bounded() -> None:
    engine = ThresholdEngine(make_policy(rule(files=30, size="10GiB", window="30d")))
    step = 20 * S  # 100,000 events over 23 days: every one is inside the 30-day window

    opened = evidence = 0
    for i in range(100_000):
        for decision in engine.feed(make_event(i * step, size=4096), i * step):
            opened += isinstance(decision, AlertOpened)
            evidence += isinstance(decision, EvidenceAdded)
        if i % 10_000 == 0:
            engine.expire(i * step)
            assert engine.state_size() <= 31

    assert (opened, evidence) == (1, 100_000 - 30)
    assert engine.state_size() <= 31


def test_bytes_only_rule_keeps_the_shortest_run_that_reaches_bytes() -> None:
    engine = ThresholdEngine(make_policy(rule(files=None, size="1MiB", window="30d")))

    feed_all(engine, [make_event(i * S, size=256 * 1024) for i in range(1000)])

    assert engine.state_size() == 4 + 1  # four 256 KiB events reach 1 MiB, plus the episode


def test_expire_forgets_idle_groups_but_keeps_recently_fed_backlogs() -> None:
    engine = ThresholdEngine(make_policy(rule(files=3, window="10m")))
    hour = 3600 * S
    now = 10 * hour
    backlog = [make_event(t * S, user="bob") for t in range(2)]  # copied 10 h ago, offline

    assert feed_all(engine, [make_event(now)]) == []
    for event in backlog:
        engine.feed(event, now)
    engine.expire(now + 5 * 60 * S)
    assert engine.state_size() == 3

    (opened,) = engine.feed(make_event(2 * S, user="bob"), now + 6 * 60 * S)
    assert isinstance(opened, AlertOpened)
    engine.expire(now + hour)
    assert engine.state_size() == 0


def test_restore_seeds_open_alerts_older_than_the_replayed_events() -> None:
    policy = make_policy(rule(files=3, window="10s"))
    engine = ThresholdEngine(policy)
    replayed = [make_event(t * S) for t in (7, 8)]
    key = group_key(policy.rules[0], replayed[0])

    engine.restore([("r", key, 14 * S), ("gone", key, 99 * S)], _at_own_time(replayed))

    assert engine.feed(replayed[1], 9 * S) == []  # already known: no new decision
    new = make_event(9 * S)
    (added,) = engine.feed(new, 9 * S)
    assert isinstance(added, EvidenceAdded)
    assert (added.rule, added.group, added.event_id, added.hot_until_ns) == (
        "r",
        key,
        new.event_id,
        17 * S,
    )


def test_restore_skips_an_open_alert_grouped_otherwise_than_its_rule_is_now() -> None:
    """The policy changed the rule's group_by since the alert opened: the alert cannot be
    matched to a group any more, so the rule's groups start cool."""
    policy = make_policy(rule(files=3, window="10s", group_by=("user",)))
    engine = ThresholdEngine(policy)
    old_key = (("user", "alice"), ("host", "lt-0412"))

    engine.restore([("r", old_key, 99 * S)], [])

    assert kinds(feed_all(engine, [make_event(t * S) for t in (1, 2)])) == []
    (opened,) = feed_all(engine, [make_event(3 * S)])
    assert isinstance(opened, AlertOpened)
    assert opened.group == (("user", "alice"),)


def test_restore_reproduces_the_decisions_of_an_engine_that_never_stopped() -> None:
    policy = make_policy(
        rule("burst", files=4, size=5000, window="10s"),
        rule("slow", files=6, window="60s", group_by=["user"]),
    )
    times = [0, 1, 2, 3, 5, 9, 14, 15, 16, 17, 18, 30, 41, 42, 43, 44, 61, 62, 75, 76, 77, 78]
    events = [make_event(t * S, size=1500, host=f"h{t % 2}") for t in times]
    _check_restore(policy, events, cut=13)


@settings(max_examples=60, deadline=None)
@given(
    gaps=st.lists(st.integers(0, 6), min_size=1, max_size=60),
    sizes=st.lists(st.integers(0, 3000), min_size=60, max_size=60),
    files=st.one_of(st.none(), st.integers(1, 5)),
    size=st.one_of(st.none(), st.integers(1, 8000)),
    window=st.integers(1, 12),
)
def test_in_order_matches_a_reference_that_keeps_every_event(gaps, sizes, files, size, window):
    if files is None and size is None:
        files = 2
    engine = ThresholdEngine(make_policy(rule(files=files, size=size, window=f"{window}s")))
    times = list(itertools.accumulate(g * S for g in gaps))
    events = [make_event(t, size=sizes[i]) for i, t in enumerate(times)]

    got = [(kinds([d])[0], d.hot_until_ns) for d in feed_all(engine, events)]

    assert got == _reference(events, files, size, window * S)


@settings(max_examples=40, deadline=None)
@given(
    gaps=st.lists(st.integers(0, 5), min_size=2, max_size=40),
    cut=st.integers(1, 39),
    files=st.integers(1, 5),
)
def test_restore_at_any_point_matches(gaps, cut, files):
    policy = make_policy(rule(files=files, size=4000, window="8s"))
    times = list(itertools.accumulate(g * S for g in gaps))
    events = [make_event(t, size=1000 + 137 * i) for i, t in enumerate(times)]
    _check_restore(policy, events, cut=min(cut, len(events) - 1))


@settings(max_examples=80, deadline=None)
@given(
    gaps=st.lists(st.integers(0, 5), min_size=1, max_size=40),
    sizes=st.lists(st.integers(0, 3000), min_size=40, max_size=40),
    files=st.one_of(st.none(), st.integers(1, 5)),
    size=st.one_of(st.none(), st.integers(1, 6000)),
    order=st.randoms(use_true_random=False),
)
def test_out_of_order_decisions_are_sound(gaps, sizes, files, size, order):
    """Whatever the arrival order: every alert's evidence is a real crossing window, and no
    event is attached twice."""
    if files is None and size is None:
        files = 2
    window = 8 * S
    engine = ThresholdEngine(make_policy(rule(files=files, size=size, window="8s")))
    times = list(itertools.accumulate(g * S for g in gaps))
    events = [make_event(t, size=sizes[i]) for i, t in enumerate(times)]
    by_id = {e.event_id: e for e in events}
    arrival = events[:]
    order.shuffle(arrival)

    attached: list[EventId] = []
    for now, event in enumerate(arrival):
        for decision in engine.feed(event, max(times) + now):
            if isinstance(decision, EvidenceAdded):
                attached.append(decision.event_id)
                assert decision.hot_until_ns > by_id[decision.event_id].observed_at_ns
                continue
            inside = [by_id[i] for i in decision.evidence]
            stamps = [e.observed_at_ns for e in inside]
            assert stamps == sorted(stamps)
            assert (decision.first_ns, decision.last_ns) == (stamps[0], stamps[-1])
            assert all(decision.last_ns - window < t for t in stamps)
            assert decision.files == len(inside)
            assert decision.bytes == sum(e.size for e in inside)
            assert (files is not None and decision.files >= files) or (
                size is not None and decision.bytes >= size
            )
    assert len(attached) == len(set(attached))


def _check_restore(policy: Policy, events: list[StoredEvent], cut: int) -> None:
    """Restart after events[:cut]: replay the last max-window and the open alerts."""
    steady = ThresholdEngine(policy)
    hot: dict[tuple[str, GroupKey], int] = {}
    for decision in feed_all(steady, events[:cut]):
        hot[(decision.rule, decision.group)] = decision.hot_until_ns
    now = events[cut - 1].observed_at_ns
    restarted = ThresholdEngine(policy)
    restarted.restore(
        [(name, group, until) for (name, group), until in hot.items()],
        _at_own_time(e for e in events[:cut] if e.observed_at_ns > now - policy.max_window_ns),
    )

    assert feed_all(restarted, events[cut:]) == feed_all(steady, events[cut:])


def _at_own_time(events: Iterable[StoredEvent]) -> list[tuple[int, StoredEvent]]:
    return [(e.observed_at_ns, e) for e in events]


def _reference(
    events: list[StoredEvent], files: int | None, size: int | None, window: int
) -> list[tuple[str, int]]:
    """The spec, literally, over every event ever seen (in time order)."""
    out: list[tuple[str, int]] = []
    hot_until: int | None = None
    evidence: set[EventId] = set()
    for i, event in enumerate(events):
        t = event.observed_at_ns
        inside = [e for e in events[: i + 1] if t - window < e.observed_at_ns <= t]
        until = None
        if files is not None and len(inside) >= files:
            until = inside[-files].observed_at_ns + window
        if size is not None and sum(e.size for e in inside) >= size:
            k = max(j for j in range(len(inside)) if sum(e.size for e in inside[j:]) >= size)
            until = max(until or 0, inside[k].observed_at_ns + window)
        if hot_until is not None and t < hot_until:
            hot_until = max(hot_until, until or 0)
            out.append(("evidence", hot_until))
            evidence.add(event.event_id)
        elif until is not None and hot_until is not None and t == hot_until:
            # No instant was cool: the episode goes on, and every event of the crossing
            # window joins it, including those that came earlier at this same instant.
            hot_until = until
            joining = [e for e in inside if e.event_id not in evidence]
            out.extend(("evidence", hot_until) for _ in joining)
            evidence.update(e.event_id for e in joining)
        elif until is not None:
            hot_until = until
            out.append(("open", hot_until))
            evidence.update(e.event_id for e in inside)
    return out


def group_key_of(event: StoredEvent) -> tuple[tuple[str, str], ...]:
    return (("user", event.user), ("host", event.host))


def test_an_event_dated_after_now_counts_at_now() -> None:
    """The collector's clock bounds event time: a burst stamped an hour ahead is counted
    when it arrived, so it neither holds the window open for an hour nor escapes it."""
    engine = ThresholdEngine(make_policy(rule(files=3, window="10s")))
    hour = 3600 * S
    assert feed_all(engine, [make_event(t * S) for t in (0, 1)]) == []

    (opened,) = engine.feed(make_event(hour), 2 * S)  # arrives at 2s, claims 1h

    assert isinstance(opened, AlertOpened)
    assert (opened.files, opened.first_ns, opened.last_ns) == (3, 0, 2 * S)
    assert opened.hot_until_ns == 10 * S
    assert kinds(engine.feed(make_event(hour + S), 11 * S)) == []  # cooled at 10s


def test_reason_grows_words_as_other_kinds_of_evidence_arrive() -> None:
    engine = ThresholdEngine(make_policy(rule(files=2, window="10s")))
    (opened,) = feed_all(engine, [make_event(0), make_event(S)])
    (added,) = engine.feed(make_event(2 * S, action="move", label="secret"), 2 * S)

    assert isinstance(opened, AlertOpened) and isinstance(added, EvidenceAdded)
    assert opened.parts is not None and added.parts is not None
    merged = opened.parts.merge(added.parts)
    assert merged.render(3, 3000, 0, 2 * S) == (
        "alice on lt-0412 copied or moved 3 secret files, 2.9 KiB (3000 bytes), to removable "
        "in 2 s; rule r: 2 files in 10s"
    )
