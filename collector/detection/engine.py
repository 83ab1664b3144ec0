"""The long-horizon rule engine: cumulative, baseline and risk rules over a `History`.

Sans-I/O in the sense that matters: time comes from the events, and everything it
needs to know about the past comes from a `History` (the store in production, a
list in tests and simulations). It keeps only what DETECTION-RULES §2.3 allows in
memory: open episodes and one `RiskTracker` per user.

Feed events in the order they were stored (`feed`), after the History can see them.
Each call returns `Finding`s: an alert opened, escalated, or an event attached as
evidence to an open one. One open alert per (rule, user); it stays open until an
analyst closes it (`close`), so a slow leak keeps a single alert whose evidence
grows as later events arrive. Risk rules also re-arm only after their score fell
below `rearm_below` x the lowest tier.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from collector.detection import baseline
from collector.detection.baseline import BaselineRule, DayCount, Expectation
from collector.detection.cumulative import CumulativeRule, Measure, Slider, Tier, WindowEvent
from collector.detection.risk import Contribution, RiskConfig, RiskFacts, RiskTracker

logger = logging.getLogger(__name__)

DAY_NS = 86_400 * 1_000_000_000
HOUR_NS = 3_600 * 1_000_000_000
_MAX_EXPECTED = 100_000


@dataclass(frozen=True)
class Selector:
    """Which events a rule sees: label rank at least `min_rank`, these classes and actions."""

    min_rank: int
    destinations: frozenset[str]
    actions: frozenset[str] = frozenset({"copy", "move"})

    def matches(self, event: LongEvent) -> bool:
        return (
            event.rank >= self.min_rank
            and event.destination_class in self.destinations
            and event.action in self.actions
        )


@dataclass(frozen=True)
class LongEvent:
    event_id: str
    user: str
    ts_ns: int
    """Event time: the agent's, no later than the arrival (`longalerts.long_event`)."""
    label: str
    rank: int
    """The label's rank in the policy; -1 when unlabelled or unknown."""
    destination_class: str
    action: str
    sha256: str
    size: int
    path: bytes = b""
    device: str = ""
    host: str = ""
    archived: bool = False
    """The copy is a member of an archive written to the destination (staged)."""

    @property
    def day(self) -> int:
        return self.ts_ns // DAY_NS

    def window_event(self) -> WindowEvent:
        return WindowEvent(
            self.event_id, self.ts_ns, self.sha256, self.size, self.path, self.device
        )


class History(Protocol):
    """What the engine asks the store. Every method is a bounded query."""

    def window(
        self, user: str, selector: Selector, after_ns: int, until_ns: int
    ) -> list[WindowEvent]:
        """The user's matching events with after < ts <= until."""
        ...

    def days(self, user: str, selector: Selector, first_day: int, last_day: int) -> list[DayCount]:
        """Per day in [first, last]: distinct matching documents; was the user active."""
        ...

    def rates(self, selector: Selector, first_day: int, last_day: int) -> Mapping[str, float]:
        """Every user's matching documents per active day over [first, last]."""
        ...

    def department(self, user: str) -> str | None: ...

    def watchlists(self, user: str) -> frozenset[str]: ...

    def seen_device(self, user: str, device: str, after_ns: int, before_ns: int) -> bool:
        """The user copied to this device (or folder) in (after, before)."""
        ...

    def gaps(self, host: str, after_ns: int, until_ns: int) -> list[int]:
        """Times of the host's coverage gaps in (after, until], ascending."""
        ...

    def first_day(self) -> int | None:
        """The day of the oldest stored event (None: nothing stored yet)."""
        ...

    def renames(self, user: str, after_ns: int, until_ns: int) -> list[int]:
        """Times of the user's renames of labelled files in (after, until], ascending."""
        ...


@dataclass(frozen=True)
class OpenAlert:
    severity: str
    threshold: float
    start_day: int


class Episodes(Protocol):
    """Where alerts live (the store): asked afresh for every batch, so an analyst's close
    is seen by the next batch. Without one, the engine keeps episodes in memory."""

    def open_alert(self, rule: str, user: str) -> OpenAlert | None:
        """The rule's open (new or in progress) alert for the user."""
        ...

    def alerted_days(self, rule: str, user: str) -> list[tuple[int, int]]:
        """Days covered by the rule's open or confirmed alerts for the user (baselines)."""
        ...

    def contributions(self, rule: str, user: str, since_ns: int) -> list[Contribution]:
        """Stored risk contributions since `since_ns`, in time order, false positives left out."""
        ...


class RuleKind(StrEnum):
    CUMULATIVE = "cumulative"
    BASELINE = "baseline"
    RISK = "risk"


@dataclass(frozen=True)
class LongRule:
    """One rule of the policy with its selector; exactly one of the three cores is set."""

    name: str
    selector: Selector
    cumulative: CumulativeRule | None = None
    baseline: BaselineRule | None = None
    baseline_severity: str = "medium"
    risk: RiskConfig | None = None
    off_hours: tuple[int, int] = (7, 19)
    """Working hours [start, end) in the organisation's zone (UTC here); outside is off-hours."""
    indicator_lookback_ns: int = 90 * DAY_NS
    gap_within_ns: int = 10 * 60 * 1_000_000_000
    stage_within_ns: int = 3_600 * 1_000_000_000
    """A rename of a labelled file this long before a copy makes it "staged_before_copy"."""

    @property
    def kind(self) -> RuleKind:
        if self.cumulative is not None:
            return RuleKind.CUMULATIVE
        if self.baseline is not None:
            return RuleKind.BASELINE
        if self.risk is not None:
            return RuleKind.RISK
        raise ValueError(f"rule {self.name} has no kind")


class FindingKind(StrEnum):
    OPENED = "opened"
    ESCALATED = "escalated"
    EVIDENCE = "evidence"
    CONTRIBUTION = "contribution"
    """Risk points of an event while no alert is open: stored, so scores can be rebuilt."""


@dataclass(frozen=True)
class Finding:
    kind: FindingKind
    rule: str
    rule_kind: RuleKind
    user: str
    severity: str
    at_ns: int
    value: float
    """The measure (cumulative), the bucket count (baseline) or the score (risk)."""
    threshold: float
    explanation: str
    evidence: tuple[str, ...]
    """Event ids: the contributing events (opened/escalated) or the new one (evidence)."""
    contributions: tuple[tuple[str, str, float], ...] = ()
    """Risk only: (event id, term, points) of the new contribution."""


@dataclass
class _Episode:
    severity: str
    threshold: float
    start_day: int
    evidence: set[str] = field(default_factory=set)


class LongRuleEngine:
    """Evaluates the long-horizon rules event by event; see the module docstring."""

    def __init__(
        self, rules: Sequence[LongRule], history: History, episodes: Episodes | None = None
    ) -> None:
        self._rules = tuple(rules)
        self._history = history
        self._episodes = episodes
        self._open: dict[tuple[str, str], _Episode | None] = {}
        """Open episodes; with `episodes`, a cache of the store's answers for one batch."""
        self._closed_days: dict[tuple[str, str], list[tuple[int, int]]] = {}
        self._risk: dict[tuple[str, str], RiskTracker] = {}
        self._loaded_open: dict[tuple[str, str], bool] = {}
        self._selects: dict[tuple[str, int, str], bool] = {}
        """Whether the (rule, user) alert was open when its tracker was loaded or raised."""
        self._expected: dict[tuple[str, str], tuple[int, Expectation]] = {}
        """(rule, user) -> (last history day, expectation): baselines change once a day."""
        self._recent_times: dict[tuple[str, str], tuple[int, int, list[int]]] = {}
        """(kind, host or user) -> (after, until, times) for the current batch."""
        self._span: tuple[int, int] | None = None
        self._first: int | None = None
        self._devices: dict[tuple[str, str], int] = {}
        """(user, device) -> the latest copy to it the engine saw."""
        self._priors: dict[tuple[str, int, str | None], tuple[list[float], list[float]]] = {}

    # state the store restores

    def restore_alerted(self, rule: str, user: str, first_day: int, last_day: int) -> None:
        """A closed, confirmed alert: its days stay out of the user's baseline history."""
        self._closed_days.setdefault((rule, user), []).append((first_day, last_day))

    def tracker(self, rule: str, user: str, now_ns: int = 0) -> RiskTracker:
        """The user's risk score under `rule`, loaded from the Episodes on first use.

        Reloaded when the alert that was open at loading time has since been closed, so
        the points of an alert dismissed as a false positive leave the score."""
        key = (rule, user)
        tracker = self._risk.get(key)
        if (
            tracker is not None
            and self._episodes is not None
            and self._loaded_open.get(key)
            and self._episode(rule, user) is None
        ):
            tracker = None
        if tracker is None:
            config = next(r.risk for r in self._rules if r.name == rule and r.risk is not None)
            tracker = self._risk[key] = RiskTracker(config)
            if self._episodes is not None:
                episode = self._episode(rule, user)
                stored = self._episodes.contributions(rule, user, now_ns - config.max_age_ns)
                tracker.restore(stored, episode.severity if episode else None)
                self._loaded_open[key] = episode is not None
        return tracker

    def _episode(self, rule: str, user: str) -> _Episode | None:
        key = (rule, user)
        if key in self._open:
            return self._open[key]
        episode = None
        if self._episodes is not None:
            found = self._episodes.open_alert(rule, user)
            if found is not None:
                episode = _Episode(found.severity, found.threshold, found.start_day)
        self._open[key] = episode
        return episode

    def close(self, rule: str, user: str, *, confirmed: bool, last_day: int) -> None:
        """An analyst closed the alert (engines without Episodes): a new one may open."""
        episode = self._open.pop((rule, user), None)
        if episode is not None and confirmed:
            self.restore_alerted(rule, user, episode.start_day, last_day)

    def open_episodes(self) -> dict[tuple[str, str], str]:
        return {key: ep.severity for key, ep in self._open.items() if ep is not None}

    # evaluation

    def selects(self, action: str, rank: int, destination_class: str) -> bool:
        """Whether any rule can see an event with these fields (most events: no)."""
        key = (action, rank, destination_class)
        hit = self._selects.get(key)
        if hit is None:
            hit = self._selects[key] = any(
                rank >= r.selector.min_rank
                and action in r.selector.actions
                and destination_class in r.selector.destinations
                for r in self._rules
            )
        return hit

    def feed(self, event: LongEvent) -> list[Finding]:
        return self.feed_batch([event])

    def feed_batch(self, events: Sequence[LongEvent]) -> list[Finding]:
        """Evaluate events already visible in the History, in (time, id) order per user.

        Windows are asked for once per user and rule for the whole batch, then slid
        forward event by event. Findings come back ordered by event time, event id
        and the rule's place in the policy.
        """
        if self._episodes is not None:
            # Ask the store afresh, lazily per (rule, user) this batch touches: an analyst
            # may have closed an alert since the last batch.
            self._open.clear()
        ordered = sorted(events, key=lambda e: (e.ts_ns, e.event_id))
        self._recent_times = {}
        self._span = (ordered[0].ts_ns, ordered[-1].ts_ns) if ordered else None
        by_user: dict[str, list[LongEvent]] = {}
        for event in ordered:
            if event.user:
                by_user.setdefault(event.user, []).append(event)
        keyed: list[tuple[tuple[int, str, int], Finding]] = []
        for index, rule in enumerate(self._rules):
            for user, run in by_user.items():
                matching = [e for e in run if rule.selector.matches(e)]
                if not matching:
                    continue
                for event, finding in self._evaluate(rule, user, matching):
                    keyed.append(((event.ts_ns, event.event_id, index), finding))
        keyed.sort(key=lambda item: item[0])
        return [finding for _, finding in keyed]

    def _evaluate(
        self, rule: LongRule, user: str, run: list[LongEvent]
    ) -> Iterator[tuple[LongEvent, Finding]]:
        if rule.cumulative is not None:
            core = rule.cumulative
            # Rows up to a window past the run: windows ending at later stored events
            # (a late delivery) now hold the run's events too, so they are judged again.
            last = run[-1]
            rows = self._history.window(
                user, rule.selector, run[0].ts_ns - core.window_ns, last.ts_ns + core.window_ns
            )
            slider = Slider(core, rows)
            for event in run:
                finding = self._cumulative(rule, core, event, slider)
                if finding is not None:
                    yield event, finding
            for row in sorted(rows, key=lambda e: (e.ts_ns, e.event_id)):
                if row.ts_ns <= last.ts_ns:
                    continue
                later = dataclasses.replace(last, event_id=row.event_id, ts_ns=row.ts_ns)
                finding = self._cumulative(rule, core, later, slider, attach=False)
                if finding is not None:
                    yield later, finding
        elif rule.baseline is not None:
            base = rule.baseline
            bucket = CumulativeRule(
                rule.name, Measure.DISTINCT_FILES, base.bucket_days * DAY_NS, (Tier("", 1),)
            )
            rows = self._history.window(
                user, rule.selector, run[0].ts_ns - bucket.window_ns, run[-1].ts_ns
            )
            slider = Slider(bucket, rows)
            for event in run:
                finding = self._baseline(rule, base, event, slider)
                if finding is not None:
                    yield event, finding
        elif rule.risk is not None:
            for event in run:
                finding = self._risk_rule(rule, rule.risk, event)
                if finding is not None:
                    yield event, finding

    def _attach(self, rule: LongRule, event: LongEvent) -> Finding | None:
        episode = self._episode(rule.name, event.user)
        if episode is None or event.event_id in episode.evidence:
            return None
        episode.evidence.add(event.event_id)
        return Finding(
            FindingKind.EVIDENCE,
            rule.name,
            rule.kind,
            event.user,
            episode.severity,
            event.ts_ns,
            0,
            episode.threshold,
            "",
            (event.event_id,),
        )

    def _raise(
        self,
        rule: LongRule,
        event: LongEvent,
        severity: str,
        value: float,
        threshold: float,
        explanation: str,
        evidence: Iterable[str],
        contributions: tuple[tuple[str, str, float], ...] = (),
    ) -> Finding:
        key = (rule.name, event.user)
        episode = self._episode(rule.name, event.user)
        kind = FindingKind.ESCALATED if episode is not None else FindingKind.OPENED
        if episode is None:
            episode = self._open[key] = _Episode(severity, threshold, event.day)
            if key in self._risk:
                self._loaded_open[key] = True  # its close must reload the score too
        episode.severity, episode.threshold = severity, threshold
        ids = tuple(evidence)
        episode.evidence.update(ids)
        return Finding(
            kind,
            rule.name,
            rule.kind,
            event.user,
            severity,
            event.ts_ns,
            value,
            threshold,
            explanation,
            ids,
            contributions,
        )

    def _cumulative(
        self,
        rule: LongRule,
        core: CumulativeRule,
        event: LongEvent,
        slider: Slider,
        *,
        attach: bool = True,
    ) -> Finding | None:
        value = slider.advance(event.ts_ns)
        episode = self._episode(rule.name, event.user)
        current = -1.0 if episode is None else episode.threshold
        higher = [t.threshold for t in core.tiers if t.threshold > current]
        if not higher or value < higher[0]:  # the cheap path: no new tier reached
            return self._attach(rule, event) if attach else None
        verdict = slider.verdict()
        tier = verdict.tier
        if tier is None or tier.threshold <= current:
            return self._attach(rule, event) if attach else None
        explanation = (
            f"{event.user}: {verdict.value} {core.measure.value.replace('_', ' ')} in "
            f"{core.window_ns // DAY_NS} days ({verdict.documents} documents, "
            f"{verdict.bytes} bytes); {rule.name} tier {tier.severity} at {tier.threshold}"
        )
        if verdict.fallback_keys:
            explanation += f"; {verdict.fallback_keys} documents identified by path and size"
        return self._raise(
            rule, event, tier.severity, verdict.value, tier.threshold, explanation, verdict.evidence
        )

    def _baseline(
        self, rule: LongRule, core: BaselineRule, event: LongEvent, slider: Slider
    ) -> Finding | None:
        if self._episode(rule.name, event.user) is not None:
            return self._attach(rule, event)
        value = slider.advance(event.ts_ns)
        if value < core.floor:
            return None  # below the floor nothing can fire: skip the history queries
        first = self._first_day()
        if first is None or event.day - core.bucket_days - first + 1 < core.min_history_active_days:
            return None  # the organisation itself has no history yet: learning, no priors
        expect = self._expectation(rule, core, event)
        verdict = baseline.evaluate(core, value, expect)
        if not verdict.fire:
            return None
        return self._raise(
            rule,
            event,
            rule.baseline_severity,
            value,
            verdict.threshold,
            f"{event.user}: {verdict.explanation()}",
            slider.verdict().evidence,
        )

    def _expectation(self, rule: LongRule, core: BaselineRule, event: LongEvent) -> Expectation:
        """The user's expected count per bucket; computed once per user and day.

        The history ends the day before the current bucket, so it only changes when the
        day does (or when an alert of the rule opens, which stops evaluation anyway)."""
        last_day = event.day - core.bucket_days
        key = (rule.name, event.user)
        cached = self._expected.get(key)
        if cached is not None and cached[0] == last_day:
            return cached[1]
        first_day = last_day - core.history_days + 1
        days = self._history.days(event.user, rule.selector, first_day, last_day)
        alerted = list(self._closed_days.get(key, []))
        if self._episodes is not None:
            alerted += self._episodes.alerted_days(rule.name, event.user)
        days = [
            DayCount(
                d.day, d.count, d.active, d.alerted or any(a <= d.day <= b for a, b in alerted)
            )
            for d in days
        ]
        department = self._history.department(event.user)
        dept_rates: list[float] = []
        org_rates: list[float] = []
        active = sum(1 for d in days if d.active and not d.alerted)
        if active < core.min_history_active_days:  # a cold start: only then ask for priors
            dept_rates, org_rates = self._prior_rates(
                rule, event.user, department, first_day, last_day
            )
        expect = baseline.expectation(
            core, days, department=department, department_rates=dept_rates, org_rates=org_rates
        )
        if len(self._expected) > _MAX_EXPECTED:
            self._expected.clear()
        self._expected[key] = (last_day, expect)
        return expect

    def _prior_rates(
        self, rule: LongRule, user: str, department: str | None, first_day: int, last_day: int
    ) -> tuple[list[float], list[float]]:
        """Other users' rates in the user's department and in the organisation (cached per day)."""
        key = (rule.name, last_day, department)
        cached = self._priors.get(key)
        if cached is None:
            rates = self._history.rates(rule.selector, first_day, last_day)
            dept = [
                r
                for u, r in rates.items()
                if department and self._history.department(u) == department
            ]
            if len(self._priors) > 64:
                self._priors.clear()  # one entry per rule, day and department is live
            cached = self._priors[key] = (dept, list(rates.values()))
        dept, org = cached
        return dept, org

    def _first_day(self) -> int | None:
        if self._first is None:
            self._first = self._history.first_day()
        return self._first

    def _gap_near(self, rule: LongRule, event: LongEvent) -> bool:
        """The host reported a coverage gap within `gap_within_ns` before the event."""
        if not event.host:
            return False
        return self._recent("gap", event.host, rule.gap_within_ns, event, self._history.gaps)

    def _staged(self, rule: LongRule, event: LongEvent) -> bool:
        """Archived, or the user renamed a labelled file within `stage_within_ns` before."""
        return event.archived or self._recent(
            "rename", event.user, rule.stage_within_ns, event, self._history.renames
        )

    def _recent(
        self,
        kind: str,
        key: str,
        within_ns: int,
        event: LongEvent,
        fetch: Callable[[str, int, int], list[int]],
    ) -> bool:
        """Something of `kind` for `key` happened in (event - within, event]?

        Asked of the History once per key and batch, for the batch's whole span."""
        span = self._span
        cached = self._recent_times.get((kind, key))
        if cached is None:
            after = (span[0] if span else event.ts_ns) - within_ns
            until = span[1] if span else event.ts_ns
            cached = self._recent_times[kind, key] = (after, until, fetch(key, after, until))
        after, until, times = cached
        low = event.ts_ns - within_ns
        if not after <= low or event.ts_ns > until:
            times = fetch(key, low, event.ts_ns)
        i = bisect.bisect_right(times, low)
        return i < len(times) and times[i] <= event.ts_ns

    def _seen_device(self, rule: LongRule, event: LongEvent) -> bool:
        """The user copied to this device within the lookback before this event.

        Remembered per (user, device) once seen, so the store is asked at most once per
        device until the lookback has passed since its last use."""
        key = (event.user, event.device)
        last = self._devices.get(key)
        after = event.ts_ns - rule.indicator_lookback_ns
        seen = last is not None and after < last < event.ts_ns
        if not seen:
            seen = self._history.seen_device(event.user, event.device, after, event.ts_ns)
        if last is None or event.ts_ns > last:
            self._devices[key] = event.ts_ns
        return seen

    def _risk_rule(self, rule: LongRule, config: RiskConfig, event: LongEvent) -> Finding | None:
        tracker = self.tracker(rule.name, event.user, event.ts_ns)
        indicators: set[str] = set()
        hour = (event.ts_ns // HOUR_NS) % 24
        weekday = (event.day + 3) % 7  # 1970-01-01 was a Thursday; Monday = 0
        start, end = rule.off_hours
        if weekday >= 5 or not start <= hour < end:
            indicators.add("off_hours")
        if event.device and not self._seen_device(rule, event):
            indicators.add("first_seen_device")
        if self._gap_near(rule, event):
            indicators.add("coverage_gap_near")
        if self._staged(rule, event):
            indicators.add("staged_before_copy")
        facts = RiskFacts(
            event.event_id,
            event.ts_ns,
            event.label,
            event.destination_class,
            event.sha256,
            event.day,
            self._history.watchlists(event.user),
            frozenset(indicators),
        )
        contribution, crossing = tracker.feed(facts)
        terms = (
            tuple((event.event_id, t.name, t.points) for t in contribution.terms)
            if contribution
            else ()
        )
        episode = self._episode(rule.name, event.user)
        names = [severity for severity, _ in config.tiers]
        if (
            crossing is not None
            and episode is not None
            and names.index(crossing.severity) <= names.index(episode.severity)
        ):
            crossing = None  # re-armed and crossed again while the alert is still open
        if crossing is None:
            if contribution is None:
                return None
            finding = self._attach(rule, event)
            if finding is None:
                return Finding(
                    FindingKind.CONTRIBUTION, rule.name, rule.kind, event.user, "",
                    event.ts_ns, round(tracker.score(event.ts_ns), 2), 0, "", (), terms,
                )  # fmt: skip
            return _with_contributions(finding, terms)
        tiers = dict(config.tiers)
        listed = tracker.explain(event.ts_ns)
        explanation = (
            f"{event.user}: risk score {crossing.score:.1f} crossed {crossing.severity} "
            f"({tiers[crossing.severity]:g}) with {len(listed)} contributions; "
            f"crossing event {crossing.contribution.event_id}"
        )
        return self._raise(
            rule,
            event,
            crossing.severity,
            round(crossing.score, 2),
            tiers[crossing.severity],
            explanation,
            listed,
            terms,
        )


def _with_contributions(finding: Finding, terms: tuple[tuple[str, str, float], ...]) -> Finding:
    return Finding(
        finding.kind,
        finding.rule,
        finding.rule_kind,
        finding.user,
        finding.severity,
        finding.at_ns,
        finding.value,
        finding.threshold,
        finding.explanation,
        finding.evidence,
        terms,
    )
