"""Risk scores: points per event, decayed with a half-life, alerting on upward tier crossings.

Per labelled egress event (DETECTION-RULES §1.3):

    points = base_by_label[label] x destination_factor[class] x user_factor
             + sum(indicator points)

`user_factor` is the largest factor of the user's watchlists (1 when none).
Indicators (first use of a device, off-hours, archive or rename shortly before,
coverage gap near) are decided by the adapter, which sees the store; this core
applies their points and per-day caps. The same (sha256, destination class) within
`dedup_ns` adds nothing. Every contribution is kept with its terms, so the points
listed on an alert add up to its score; the score is the sum of the contributions
no older than `max_age_ns`, each decayed by `half_life_ns` (None: no decay, a hard
window of `max_age_ns`). Tiers fire upward with hysteresis: after a tier fired,
only a fall below `rearm_below` x the lowest tier starts a new episode.
"""

from __future__ import annotations

import bisect
import math
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

DAY_NS = 86_400 * 1_000_000_000


@dataclass(frozen=True)
class RiskConfig:
    base_by_label: Mapping[str, float]
    destination_factor: Mapping[str, float]
    tiers: tuple[tuple[str, float], ...]
    """(severity, score) ascending by score."""
    watchlist_factor: Mapping[str, float] = field(default_factory=dict)
    indicator_points: Mapping[str, float] = field(default_factory=dict)
    indicator_cap_per_day: Mapping[str, int] = field(default_factory=dict)
    """At most this many applications of an indicator per user and day."""
    dedup_ns: int = DAY_NS
    half_life_ns: int | None = 14 * DAY_NS
    max_age_ns: int = 90 * DAY_NS
    rearm_below: float = 0.8

    def __post_init__(self) -> None:
        scores = [score for _, score in self.tiers]
        if not scores or any(s <= 0 for s in scores) or scores != sorted(set(scores)):
            raise ValueError("risk tiers must be positive and strictly ascending")
        if self.half_life_ns is not None and self.half_life_ns <= 0:
            raise ValueError("half_life must be positive")
        if not 0 < self.rearm_below <= 1:
            raise ValueError("rearm_below must be in (0, 1]")


@dataclass(frozen=True)
class RiskFacts:
    """What the adapter knows about one event of one user."""

    event_id: str
    ts_ns: int
    label: str
    destination_class: str
    sha256: str
    day: int
    """The event's day (organisation time zone), for per-day indicator caps."""
    watchlists: frozenset[str] = frozenset()
    indicators: frozenset[str] = frozenset()
    """Indicators that hold for this event (e.g. "off_hours", "first_seen_device")."""


@dataclass(frozen=True)
class Term:
    name: str
    """E.g. "secret x removable x departing" or "off_hours"."""
    points: float


@dataclass(frozen=True)
class Contribution:
    event_id: str
    ts_ns: int
    terms: tuple[Term, ...]

    @property
    def points(self) -> float:
        return sum(term.points for term in self.terms)

    def current(self, now_ns: int, half_life_ns: int | None) -> float:
        """Points left at `now_ns` after decay."""
        if half_life_ns is None:
            return self.points
        age = max(0, now_ns - self.ts_ns)
        return self.points * math.pow(0.5, age / half_life_ns)


@dataclass(frozen=True)
class Crossing:
    severity: str
    score: float
    new_episode: bool
    """True for the first tier of an episode (a new alert), False for an escalation."""
    contribution: Contribution
    """The contribution that made the score cross."""


def score_event(
    config: RiskConfig, facts: RiskFacts, indicators_today: Mapping[str, int]
) -> Contribution:
    """The terms of one event; `indicators_today` counts each indicator already applied today."""
    base = config.base_by_label.get(facts.label, 0.0)
    dest = config.destination_factor.get(facts.destination_class, 0.0)
    lists = sorted(w for w in facts.watchlists if w in config.watchlist_factor)
    user = max((config.watchlist_factor[w] for w in lists), default=1.0)
    name = f"{facts.label} x {facts.destination_class}"
    if lists:
        name += " x " + "/".join(lists)
    terms = [Term(name, base * dest * user)]
    for indicator in sorted(facts.indicators):
        points = config.indicator_points.get(indicator)
        if points is None:
            continue
        cap = config.indicator_cap_per_day.get(indicator)
        if cap is not None and indicators_today.get(indicator, 0) >= cap:
            continue
        terms.append(Term(indicator, points))
    return Contribution(facts.event_id, facts.ts_ns, tuple(terms))


class RiskTracker:
    """One user's score. Sans-I/O: rebuilt from stored contributions on restart.

    Memory: the contributions of the last `max_age_ns` (points and terms), the
    dedup keys of the last `dedup_ns`, and today's indicator counts. The score is kept
    as a running sum weighted against an anchor time, so feeding an event costs
    O(log n) rather than a pass over every contribution.
    """

    def __init__(self, config: RiskConfig) -> None:
        self._config = config
        self._items: list[Contribution] = []
        """Contributions in time order; those before `_start` have expired."""
        self._start = 0
        self._anchor = 0
        self._weighted = 0.0
        """Sum of points x 2^((ts - anchor) / half_life) over the live contributions."""
        self._seen: OrderedDict[tuple[str, str], int] = OrderedDict()
        """(sha256, class) -> when it last counted; oldest first (re-counting moves it)."""
        self._day = -1
        self._today: dict[str, int] = {}
        self._tier = -1
        """Index of the highest tier fired in the current episode; -1 when armed."""

    @property
    def contributions(self) -> tuple[Contribution, ...]:
        return tuple(self._items[self._start :])

    def restore(self, contributions: Iterable[Contribution], tier: str | None) -> None:
        """Put back stored contributions and the open episode's tier."""
        for contribution in contributions:
            self._add(contribution)
        names = [severity for severity, _ in self._config.tiers]
        self._tier = names.index(tier) if tier in names else -1

    def feed(self, facts: RiskFacts) -> tuple[Contribution | None, Crossing | None]:
        """Score one event: its contribution (None when deduplicated) and any tier crossing."""
        config = self._config
        self._expire(facts.ts_ns)
        key = (facts.sha256, facts.destination_class)
        last = self._seen.get(key) if facts.sha256 else None
        if last is not None and facts.ts_ns - last < config.dedup_ns:
            return None, self._update(facts.ts_ns, None)
        if facts.sha256:
            self._seen[key] = facts.ts_ns
            self._seen.move_to_end(key)
        if facts.day != self._day:
            self._day, self._today = facts.day, {}
        contribution = score_event(config, facts, self._today)
        for term in contribution.terms[1:]:
            self._today[term.name] = self._today.get(term.name, 0) + 1
        if contribution.points > 0:
            self._add(contribution)
        return contribution, self._update(facts.ts_ns, contribution)

    def remove(self, event_ids: Iterable[str]) -> None:
        """Drop contributions (e.g. of an alert closed as a false positive)."""
        drop = set(event_ids)
        kept = [c for c in self._items[self._start :] if c.event_id not in drop]
        self._items, self._start = [], 0
        self._weighted = 0.0
        for contribution in kept:
            self._add(contribution)

    def score(self, now_ns: int) -> float:
        """The sum of the live contributions' decayed points at `now_ns`."""
        self._expire(now_ns)
        if self._start == len(self._items):
            return 0.0
        half_life = self._config.half_life_ns
        if half_life is None:
            return self._weighted
        return self._weighted * math.pow(0.5, (now_ns - self._anchor) / half_life)

    def explain(self, now_ns: int) -> dict[str, float]:
        """Current points per contributing event id (within max_age), largest first."""
        config = self._config
        points = {
            c.event_id: c.current(now_ns, config.half_life_ns)
            for c in self._items[self._start :]
            if 0 <= now_ns - c.ts_ns <= config.max_age_ns
        }
        return dict(sorted(points.items(), key=lambda kv: (-kv[1], kv[0])))

    def _weight(self, ts_ns: int) -> float:
        half_life = self._config.half_life_ns
        return 1.0 if half_life is None else math.pow(2.0, (ts_ns - self._anchor) / half_life)

    def _add(self, contribution: Contribution) -> None:
        if self._start == len(self._items):
            self._items, self._start = [], 0
            self._anchor, self._weighted = contribution.ts_ns, 0.0
        bisect.insort(self._items, contribution, lo=self._start, key=lambda c: c.ts_ns)
        self._weighted += contribution.points * self._weight(contribution.ts_ns)

    def _expire(self, now_ns: int) -> None:
        config = self._config
        items = self._items
        while self._start < len(items) and now_ns - items[self._start].ts_ns > config.max_age_ns:
            old = items[self._start]
            self._weighted -= old.points * self._weight(old.ts_ns)
            self._start += 1
        if self._start == len(items):
            self._weighted = 0.0
        elif self._start > 64 and self._start > len(items) // 2:
            self._items, self._start = items[self._start :], 0  # drop the expired
        if (
            config.half_life_ns is not None
            and self._start < len(self._items)
            and now_ns - self._anchor > 16 * config.half_life_ns
        ):
            # Rebase, so the weights stay near 1 whatever the age of the tracker.
            live = self._items[self._start :]
            self._anchor = live[0].ts_ns
            self._weighted = math.fsum(c.points * self._weight(c.ts_ns) for c in live)
        seen = self._seen
        while seen:  # oldest first; a late (earlier) event may leave one stale a while longer
            key, ts = next(iter(seen.items()))
            if now_ns - ts < config.dedup_ns:
                break
            del seen[key]

    def _update(self, now_ns: int, contribution: Contribution | None) -> Crossing | None:
        config = self._config
        score = self.score(now_ns)
        lowest = config.tiers[0][1]
        if self._tier >= 0 and score < config.rearm_below * lowest:
            self._tier = -1
        reached = -1
        for i, (_, limit) in enumerate(config.tiers):
            if score >= limit - 1e-9:
                reached = i
        if reached <= self._tier or contribution is None:
            return None
        new_episode = self._tier < 0
        self._tier = reached
        return Crossing(config.tiers[reached][0], score, new_episode, contribution)
