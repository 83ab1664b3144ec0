"""What a long-rule alert's page shows: the rule's measure over time against its tiers,
and for a risk rule the contributions that make up the score.

    alert details + stored events / risk contributions (reads) -> **longview** ->
    chart (collector.web.chart) and tables in `_long.html`

Pure: the numbers are recomputed with the detection cores themselves (`Slider` for
windows and buckets; decay and max_age as `RiskTracker` applies them), over the same
rows the engine asked the store for, so the page and the alert cannot disagree about
what counted.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from collector.detection.baseline import BaselineRule
from collector.detection.cumulative import (
    CumulativeRule,
    Measure,
    Slider,
    Tier,
    WindowEvent,
    evaluate,
)
from collector.detection.engine import DAY_NS, LongRule, RuleKind
from collector.detection.risk import Contribution, RiskConfig
from collector.policy import format_duration, format_size
from collector.render import human_bytes
from collector.web import chart
from collector.web.chart import Chart, utc

MAX_CONTRIBUTIONS = 500
"""Events the risk table lists at most (the largest, by points left); the rest are
summed in one line, so the listed points still add up to the score."""


@dataclass(frozen=True)
class LongDetails:
    """The `details` a long rule writes on its alert (collector.longalerts)."""

    rule_kind: RuleKind
    value: float
    """The measure, bucket count or score when the alert opened or last escalated."""
    threshold: float
    """The tier (or baseline threshold) it reached then."""
    explanation: str


def parse_details(text: str) -> LongDetails | None:
    """The details of a long-rule alert; None for any other alert (burst rules store
    their reason's parts there, security alerts nothing)."""
    try:
        doc = json.loads(text) if text else None
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    try:
        kind = RuleKind(str(doc.get("rule_kind")))
    except ValueError:
        return None
    value, threshold = doc.get("value"), doc.get("threshold")
    explanation = doc.get("explanation")
    return LongDetails(
        kind,
        float(value) if isinstance(value, int | float) else 0.0,
        float(threshold) if isinstance(threshold, int | float) else 0.0,
        explanation if isinstance(explanation, str) else "",
    )


@dataclass(frozen=True)
class RiskRow:
    """One event's contribution: its terms as stored and what they are worth now."""

    event_id: str
    ts_ns: int
    terms: tuple[tuple[str, float], ...]
    stored: float
    """Points when the event happened (the sum of its terms, as stored)."""
    worth: float
    """Those points decayed to the table's `at_ns`."""


@dataclass(frozen=True)
class RiskTable:
    rows: tuple[RiskRow, ...]
    """Oldest first."""
    at_ns: int
    """When the listed points are valued: the alert's latest contribution."""
    half_life_ns: int | None
    """None: no decay (a hard window of max_age)."""
    max_age_ns: int
    hidden: int
    """Contributions not listed (beyond MAX_CONTRIBUTIONS)."""
    hidden_stored: float
    hidden_worth: float
    stored_total: float
    worth_total: float
    """The score at `at_ns`: the sum of the listed `worth` and `hidden_worth`."""


@dataclass(frozen=True)
class LongView:
    kind: RuleKind
    details: LongDetails
    rule: LongRule | None
    """The rule in the running policy; None when it is gone or changed kind."""
    measure: str
    """What the chart draws, in words ("distinct files in 30d")."""
    chart: Chart | None
    latest: str
    """The measure at the alert's latest event, in words."""
    reached: tuple[tuple[str, str], ...]
    """(level, when it was first reached within the chart)."""
    raised: str
    """The value and threshold the alert recorded when it opened or last escalated."""
    risk: RiskTable | None = None


def _value_label(measure: Measure) -> Callable[[float], str]:
    if measure is Measure.BYTES:
        return lambda v: human_bytes(int(v))
    return lambda v: f"{v:g}"


def _reached(
    points: Sequence[tuple[int, float]],
    levels: Sequence[tuple[str, float]],
    label: Callable[[float], str],
) -> tuple[tuple[str, str], ...]:
    """When the line first reached each level (inclusive, as the rules count)."""
    out = []
    for name, limit in levels:
        hit = next((t for t, v in points if v >= limit - 1e-9), None)
        if hit is not None:
            out.append((f"{name} {label(limit)}", utc(hit)))
    return tuple(out)


def _series(rule: CumulativeRule, rows: Sequence[WindowEvent], times: Sequence[int]) -> list[int]:
    slider = Slider(rule, rows)
    return [slider.advance(t) for t in sorted(times)]


def cumulative_view(
    rule: LongRule,
    core: CumulativeRule,
    details: LongDetails,
    rows: Sequence[WindowEvent],
    times: Sequence[int],
) -> LongView:
    """The window's measure at each evidence event (`times`), against the tiers.

    `rows` must hold the user's matching events from one window before the first
    evidence event to the last one (`Reader.rule_window`)."""
    times = sorted(times)
    values = _series(core, rows, times)
    points = list(zip(times, [float(v) for v in values], strict=True))
    label = _value_label(core.measure)
    levels = [(t.severity, float(t.threshold)) for t in core.tiers]
    latest = ""
    if times:
        end = evaluate(core, rows, times[-1])
        latest = (
            f"{label(end.value)} {core.measure.value.replace('_', ' ')} in the"
            f" {format_duration(core.window_ns)} to {utc(times[-1])}: {end.documents}"
            f" documents, {human_bytes(end.bytes)}, {end.events} events"
        )
    return LongView(
        kind=RuleKind.CUMULATIVE,
        details=details,
        rule=rule,
        measure=f"{core.measure.value.replace('_', ' ')} in {format_duration(core.window_ns)}",
        chart=chart.build(points, levels, label=label),
        latest=latest,
        reached=_reached(points, levels, label),
        raised=f"{label(details.value)}, against the tier at {label(details.threshold)}",
    )


def baseline_view(
    rule: LongRule,
    base: BaselineRule,
    details: LongDetails,
    rows: Sequence[WindowEvent],
    times: Sequence[int],
) -> LongView:
    """The bucket's distinct documents at each evidence event, against the threshold the
    alert was raised at (a baseline's threshold is the user's own, as of that day)."""
    bucket = CumulativeRule(
        rule.name, Measure.DISTINCT_FILES, base.bucket_days * DAY_NS, (Tier("", 1),)
    )
    times = sorted(times)
    values = _series(bucket, rows, times)
    points = list(zip(times, [float(v) for v in values], strict=True))
    levels = [("threshold", details.threshold)] if details.threshold > 0 else []
    latest = ""
    if times:
        latest = (
            f"{values[-1]} distinct documents in the {base.bucket_days} days to {utc(times[-1])}"
        )
    return LongView(
        kind=RuleKind.BASELINE,
        details=details,
        rule=rule,
        measure=f"distinct documents in {base.bucket_days}d buckets",
        chart=chart.build(points, levels, label=lambda v: f"{v:g}"),
        latest=latest,
        reached=_reached(points, levels, lambda v: f"{v:g}"),
        raised=f"{details.value:g}, against the threshold {details.threshold:g}",
    )


def score_at(contributions: Sequence[Contribution], config: RiskConfig, at_ns: int) -> float:
    """The score at `at_ns`, as `RiskTracker` keeps it: the points of contributions no
    older than max_age (and not after `at_ns`), each decayed by the half-life."""
    return math.fsum(
        c.current(at_ns, config.half_life_ns)
        for c in contributions
        if 0 <= at_ns - c.ts_ns <= config.max_age_ns
    )


def score_series(
    contributions: Sequence[Contribution], config: RiskConfig, times: Sequence[int]
) -> list[float]:
    """`score_at` at each of the ascending `times`, in one pass (a page may chart
    thousands of contributions): the running sum is decayed from one time to the next,
    and a contribution leaves it, decayed as far, once it is older than max_age."""
    items = sorted(contributions, key=lambda c: c.ts_ns)
    half_life = config.half_life_ns

    def decay(dt_ns: int) -> float:
        return 1.0 if half_life is None else math.pow(0.5, dt_ns / half_life)

    out: list[float] = []
    total, lo, hi, previous = 0.0, 0, 0, None
    for t in times:
        if previous is not None:
            total *= decay(t - previous)
        previous = t
        while hi < len(items) and items[hi].ts_ns <= t:
            total += items[hi].points * decay(t - items[hi].ts_ns)
            hi += 1
        while lo < hi and t - items[lo].ts_ns > config.max_age_ns:
            total -= items[lo].points * decay(t - items[lo].ts_ns)
            lo += 1
        if lo == hi:
            total = 0.0  # nothing live: drop the rounding the subtractions left
        out.append(total)
    return out


def risk_table(
    evidence: Sequence[Contribution], config: RiskConfig | None, at_ns: int
) -> RiskTable:
    """The alert's contributions valued at `at_ns` (without a config: as stored)."""
    half_life = None if config is None else config.half_life_ns
    max_age = 2**62 if config is None else config.max_age_ns
    rows = [
        RiskRow(
            c.event_id,
            c.ts_ns,
            tuple((t.name, t.points) for t in c.terms),
            c.points,
            c.current(at_ns, half_life) if 0 <= at_ns - c.ts_ns <= max_age else 0.0,
        )
        for c in evidence
    ]
    shown, hidden = rows, []
    if len(rows) > MAX_CONTRIBUTIONS:
        order = sorted(range(len(rows)), key=lambda i: (-rows[i].worth, rows[i].ts_ns))
        keep = set(order[:MAX_CONTRIBUTIONS])
        shown = [r for i, r in enumerate(rows) if i in keep]
        hidden = [r for i, r in enumerate(rows) if i not in keep]
    return RiskTable(
        rows=tuple(shown),
        at_ns=at_ns,
        half_life_ns=half_life,
        max_age_ns=max_age,
        hidden=len(hidden),
        hidden_stored=math.fsum(r.stored for r in hidden),
        hidden_worth=math.fsum(r.worth for r in hidden),
        stored_total=math.fsum(r.stored for r in rows),
        worth_total=math.fsum(r.worth for r in rows),
    )


def risk_view(
    rule: LongRule,
    config: RiskConfig,
    details: LongDetails,
    history: Sequence[Contribution],
    evidence: Sequence[Contribution],
) -> LongView:
    """The score at each of the user's contributions up to the alert's latest, against
    the tiers, and the alert's own contributions valued at that latest one.

    `history`: the user's stored contributions under the rule from max_age before the
    alert's first one to its latest, false positives left out (`Reader.risk_history`).
    """
    at_ns = max((c.ts_ns for c in evidence), default=0)
    first = min((c.ts_ns for c in evidence), default=0)
    times = sorted({c.ts_ns for c in history if first <= c.ts_ns <= at_ns})
    points = list(zip(times, score_series(history, config, times), strict=True))
    levels = [(name, score) for name, score in config.tiers]
    table = risk_table(evidence, config, at_ns)
    decay = (
        f"half-life {format_duration(config.half_life_ns)}"
        if config.half_life_ns is not None
        else "no decay"
    )
    return LongView(
        kind=RuleKind.RISK,
        details=details,
        rule=rule,
        measure=f"risk score ({decay}, contributions kept {format_duration(config.max_age_ns)})",
        chart=chart.build(points, levels, label=lambda v: f"{v:g}", steps=False),
        latest=f"score {table.worth_total:.1f} at {utc(at_ns)}" if evidence else "",
        reached=_reached(points, levels, lambda v: f"{v:g}"),
        raised=f"score {details.value:.1f}, against the tier at {details.threshold:g}",
        risk=table,
    )


def orphan_view(
    details: LongDetails, evidence: Sequence[Contribution] = (), reason: str = ""
) -> LongView:
    """An alert whose rule the running policy no longer has (or has as another kind):
    what the alert recorded, no recomputed measure."""
    table = None
    if details.rule_kind is RuleKind.RISK and evidence:
        table = risk_table(evidence, None, max(c.ts_ns for c in evidence))
    return LongView(
        kind=details.rule_kind,
        details=details,
        rule=None,
        measure=reason,
        chart=None,
        latest="",
        reached=(),
        raised=f"{details.value:g}, against {details.threshold:g}",
        risk=table,
    )


def describe(rule: LongRule, labels: Sequence[str]) -> str:
    """A long rule in one line, for the Rules page and the alert's rule panel."""
    sel = rule.selector
    label = labels[sel.min_rank] if 0 <= sel.min_rank < len(labels) else "?"
    scope = f"{label} or above to {', '.join(sorted(sel.destinations))}"
    if rule.cumulative is not None:
        core = rule.cumulative
        size = core.measure is Measure.BYTES
        tiers = ", ".join(
            f"{t.severity} at {format_size(t.threshold) if size else t.threshold}"
            for t in core.tiers
        )
        what = core.measure.value.replace("_", " ")
        return f"{what} per user in {format_duration(core.window_ns)}: {tiers} ({scope})"
    if rule.baseline is not None:
        b = rule.baseline
        return (
            f"distinct documents per user in {b.bucket_days} days against"
            f" max({b.floor}, ceil({b.multiplier:g} x expected)), expected from the user's"
            f" {b.history_days} days before (cold start below {b.min_history_active_days}"
            f" active days); {rule.baseline_severity} ({scope})"
        )
    if rule.risk is not None:
        r = rule.risk
        tiers = ", ".join(f"{name} at {score:g}" for name, score in r.tiers)
        decay = (
            f"half-life {format_duration(r.half_life_ns)}"
            if r.half_life_ns is not None
            else "no decay"
        )
        labels_part = ", ".join(f"{k} {v:g}" for k, v in sorted(r.base_by_label.items()))
        return (
            f"risk points per user (label: {labels_part}; x destination factor), {decay},"
            f" kept {format_duration(r.max_age_ns)}: {tiers} ({scope})"
        )
    raise ValueError(f"rule {rule.name} has no kind")
