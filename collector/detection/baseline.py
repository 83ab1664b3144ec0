"""Baseline rules: a user's count in the current bucket against their own history.

`fire if x >= max(floor, ceil(multiplier * max(expected, baseline_min)))`
(DETECTION-RULES §1.2), where `expected` per bucket is the user's rate per *active*
day times the active days a bucket usually holds. Choices, and why:

- Active days as denominator: two weeks of vacation do not lower the baseline.
- Winsorised mean at the user's p95 of active-day counts: one legitimate spike
  does not lift the baseline enough to hide a later leak.
- Days inside alerting periods are left out, so a slow ramp cannot train the
  baseline up to itself.
- Cold start: with fewer than `min_history_active_days` the user's rate is shrunk
  toward a prior (`(n * user + w * prior) / (n + w)`, w = `prior_weight_days`)
  taken from the user's department when it has at least `peer_min_size` members,
  else from the organisation. The explanation says which.

Departure from the reference: no workday/weekend split and no CUSUM variant yet.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import median

_EPSILON = 1e-9


@dataclass(frozen=True)
class BaselineRule:
    name: str
    bucket_days: int = 7
    history_days: int = 56
    multiplier: float = 3.0
    baseline_min: float = 0.5
    """Lowest expected value per bucket (a user who never copies still expects this)."""
    floor: int = 5
    """The threshold is never below this."""
    min_history_active_days: int = 14
    winsor_quantile: float = 0.95
    prior_weight_days: int = 14
    peer_min_size: int = 5

    def __post_init__(self) -> None:
        if self.bucket_days <= 0 or self.history_days < self.bucket_days:
            raise ValueError("bucket must be positive and history at least one bucket")
        if self.multiplier <= 0 or self.baseline_min < 0 or self.floor < 1:
            raise ValueError("multiplier must be > 0, baseline_min >= 0, floor >= 1")
        if not 0 < self.winsor_quantile <= 1:
            raise ValueError("winsor_quantile must be in (0, 1]")


@dataclass(frozen=True)
class DayCount:
    """One day of a user's history (the store's per-user daily buckets)."""

    day: int
    """Days since the epoch, in the organisation's time zone."""
    count: int
    """The rule's measure that day."""
    active: bool
    """The user was active that day (any event of theirs reached the collector)."""
    alerted: bool = False
    """The day lies in an open or confirmed alert of this rule: left out of the history."""


@dataclass(frozen=True)
class Expectation:
    per_bucket: float
    """Expected measure per bucket, before `baseline_min`."""
    rate: float
    """Expected measure per active day, after any cold-start shrinkage."""
    user_rate: float
    active_days: int
    """Active, non-alerted days of history used."""
    days_per_bucket: float
    """Active days a bucket usually holds for this user."""
    source: str
    """"user", or the prior it leaned on: "peer:<department>" or "org"."""
    cold_start: bool


@dataclass(frozen=True)
class BaselineVerdict:
    rule: str
    value: int
    threshold: int
    expected: float
    fire: bool
    expectation: Expectation

    def explanation(self) -> str:
        e = self.expectation
        text = (
            f"{self.value} in {self.rule}'s bucket; expected {e.per_bucket:.2f} "
            f"({e.rate:.2f} per active day x {e.days_per_bucket:.1f} active days), "
            f"threshold {self.threshold}"
        )
        if e.cold_start:
            text += f"; cold_start=true, prior from {e.source} ({e.active_days} active days)"
        return text


def winsorized_mean(values: Sequence[int], quantile: float) -> float:
    """Mean after capping every value at the nearest-rank `quantile` of `values`."""
    if not values:
        return 0.0
    ordered = sorted(values)
    cap = ordered[max(0, math.ceil(quantile * len(ordered)) - 1)]
    return sum(min(v, cap) for v in ordered) / len(ordered)


def user_rate(rule: BaselineRule, history: Sequence[DayCount]) -> tuple[float, int]:
    """(winsorised mean per active day, active days used), alerted days left out."""
    counts = [d.count for d in history if d.active and not d.alerted]
    return winsorized_mean(counts, rule.winsor_quantile), len(counts)


def peer_prior(rule: BaselineRule, peer_rates: Sequence[float]) -> float | None:
    """The median rate of a peer group, or None when it is too small to lean on."""
    if len(peer_rates) < rule.peer_min_size:
        return None
    return float(median(peer_rates))


def expectation(
    rule: BaselineRule,
    history: Sequence[DayCount],
    *,
    department: str | None,
    department_rates: Sequence[float],
    org_rates: Sequence[float],
) -> Expectation:
    """What the user is expected to do per bucket, from `history` (the rule's history span).

    `department_rates` and `org_rates` are other users' per-active-day rates
    (the caller leaves the user out), used only on a cold start.
    """
    rate, n = user_rate(rule, history)
    active = [d for d in history if d.active and not d.alerted]
    buckets: dict[int, int] = {}
    for d in active:
        buckets[d.day // rule.bucket_days] = buckets.get(d.day // rule.bucket_days, 0) + 1
    # Buckets with no activity at all (vacations) are not counted: active-day denominator.
    default_days = rule.bucket_days * 5 / 7 if rule.bucket_days >= 7 else float(rule.bucket_days)
    days_per_bucket = sum(buckets.values()) / len(buckets) if buckets else default_days
    source, cold = "user", False
    expected_rate = rate
    if n < rule.min_history_active_days:
        cold = True
        prior = peer_prior(rule, department_rates) if department else None
        if prior is not None:
            source = f"peer:{department}"
        else:
            source = "org"
            prior = float(median(org_rates)) if org_rates else 0.0
        w = rule.prior_weight_days
        expected_rate = (n * rate + w * prior) / (n + w)
        if not buckets:
            days_per_bucket = default_days
    return Expectation(
        per_bucket=expected_rate * days_per_bucket,
        rate=expected_rate,
        user_rate=rate,
        active_days=n,
        days_per_bucket=days_per_bucket,
        source=source,
        cold_start=cold,
    )


def threshold(rule: BaselineRule, expected: float) -> int:
    scaled = rule.multiplier * max(expected, rule.baseline_min)
    return max(rule.floor, math.ceil(scaled - _EPSILON))


def evaluate(rule: BaselineRule, value: int, expect: Expectation) -> BaselineVerdict:
    """Fire when `value` (the current bucket's measure) reaches the threshold (inclusive)."""
    limit = threshold(rule, expect.per_bucket)
    return BaselineVerdict(
        rule=rule.name,
        value=value,
        threshold=limit,
        expected=max(expect.per_bucket, rule.baseline_min),
        fire=value >= limit,
        expectation=expect,
    )
