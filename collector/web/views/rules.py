"""The Rules page: every rule of the running policy, how often it alerts and how often
analysts agreed with it.

    GET /rules (every role) -> reads.rule_activity -> **rules** (rows, bars) -> rules.html

For the people who tune the policy: a rule that alerts for a large share of the users
it watches, or whose alerts are mostly dismissed, needs a narrower match or a higher
threshold (try it with `policy dry-run` first).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response

from collector.detection.engine import DAY_NS
from collector.policy import Policy, Rule, format_duration
from collector.web import longview
from collector.web.chart import utc
from collector.web.context import console_of, page, signed_in
from collector.web.reads import RuleActivity

WEEKS = 12
WEEK_NS = 7 * DAY_NS
RECENT_NS = 30 * DAY_NS
"""Users seen and users alerted are counted over this span."""
NOISY_SHARE = 0.15
"""A rule that alerted for more than this share of the users seen is flagged."""
BAR_WIDTH, BAR_GAP, BARS_HEIGHT = 11, 3, 28


@dataclass(frozen=True)
class Bar:
    x: int
    y: float
    height: float
    title: str


@dataclass(frozen=True)
class RuleRow:
    name: str
    kind: str
    """"burst", or the long rule's kind."""
    description: str
    weekly: tuple[int, ...]
    """Alerts raised per week, oldest first."""
    bars: tuple[Bar, ...]
    raised: int
    confirmed: int
    """Of the alerts raised in the span, closed as resolved (a true positive)."""
    dismissed: int
    """Of those, closed as false positive."""
    effectiveness: float | None
    """confirmed / (confirmed + dismissed); None while nothing was decided."""
    users_alerted: int
    share: float | None
    """users_alerted / users seen; None when nobody was seen."""

    @property
    def noisy(self) -> bool:
        return self.share is not None and self.share > NOISY_SHARE


def describe_burst(rule: Rule) -> str:
    dests = ", ".join(sorted(d.value for d in rule.match.destinations))
    return (
        f"{rule.describe()} per {', '.join(d.value for d in rule.group_by)}; "
        f"{rule.severity.value} ({rule.match.min_label} or above to {dests})"
    )


def _bars(weekly: Sequence[int], top: int, starts: Sequence[int]) -> tuple[Bar, ...]:
    out = []
    for i, (n, start) in enumerate(zip(weekly, starts, strict=True)):
        height = round(n / top * BARS_HEIGHT, 1) if top else 0.0
        height = max(height, 1.0) if n else 0.0
        week = f"week from {utc(start)[:10]}: {n} alert{'' if n == 1 else 's'}"
        out.append(Bar(i * (BAR_WIDTH + BAR_GAP), BARS_HEIGHT - height, height, week))
    return tuple(out)


def rule_rows(policy: Policy, activity: RuleActivity, since_ns: int) -> list[RuleRow]:
    """One row per rule of `policy`, burst rules first, in the policy's order."""
    named: list[tuple[str, str, str]] = [(r.name, "burst", describe_burst(r)) for r in policy.rules]
    named += [
        (r.name, r.kind.value, longview.describe(r, policy.labels)) for r in policy.long_rules
    ]
    top = max((n for counts in activity.weekly.values() for n in counts), default=0)
    starts = [since_ns + i * WEEK_NS for i in range(WEEKS)]
    rows = []
    for name, kind, description in named:
        weekly = tuple(activity.weekly.get(name, [0] * WEEKS))
        good, bad = activity.confirmed.get(name, 0), activity.dismissed.get(name, 0)
        users = activity.users_alerted.get(name, 0)
        seen = activity.users_seen
        rows.append(
            RuleRow(
                name=name,
                kind=kind,
                description=description,
                weekly=weekly,
                bars=_bars(weekly, top, starts),
                raised=sum(weekly),
                confirmed=good,
                dismissed=bad,
                effectiveness=good / (good + bad) if good + bad else None,
                users_alerted=users,
                share=users / seen if seen else None,
            )
        )
    return rows


def rules_page(request: Request) -> Response:
    session = signed_in(request)
    console = console_of(request)
    now = console.clock()
    since = now - WEEKS * WEEK_NS
    activity = console.reader.rule_activity(since, WEEK_NS, WEEKS, now - RECENT_NS)
    rows = rule_rows(console.policy, activity, since)
    return page(
        request, "rules.html", session, rows=rows, users_seen=activity.users_seen,
        noisy=[r for r in rows if r.noisy], weeks=WEEKS, since_ns=since,
        recent=format_duration(RECENT_NS), noisy_share=NOISY_SHARE,
        policy_revision=console.policy.revision, bars_width=WEEKS * (BAR_WIDTH + BAR_GAP),
        bars_height=BARS_HEIGHT, bar_width=BAR_WIDTH,
    )  # fmt: skip
