"""The long-rule part of an alert's page: which reads to make for which rule kind.

    GET /alerts/{id} (views.alerts) -> **longalert** -> reads (events, risk contributions)
    -> collector.web.longview (numbers) -> `_long.html`

A burst alert gets None here and its page stays as it was.
"""

from __future__ import annotations

from collector.detection.cumulative import WindowEvent
from collector.detection.engine import DAY_NS, LongRule, RuleKind
from collector.records import AlertRecord
from collector.web import longview
from collector.web.context import Console
from collector.web.longview import LongDetails, LongView
from collector.web.reads import AlertSummary


def long_view(console: Console, alert: AlertSummary, record: AlertRecord) -> LongView | None:
    """What the page shows of a long-rule alert; None for any other alert."""
    details = longview.parse_details(record.details)
    if details is None:
        return None
    user = alert.group_dict.get("user", "")
    rule = next((r for r in console.policy.long_rules if r.name == alert.rule), None)
    if rule is None or rule.kind is not details.rule_kind:
        evidence = []
        if details.rule_kind is RuleKind.RISK:
            evidence = console.reader.alert_contributions(alert.alert_id, alert.rule, user)
        return longview.orphan_view(
            details,
            evidence,
            f"the running policy (revision {console.policy.revision}) has no"
            f" {details.rule_kind.value} rule of this name: the measure is not recomputed",
        )
    if rule.cumulative is not None:
        times, rows = _window(console, alert, rule, user, rule.cumulative.window_ns)
        return longview.cumulative_view(rule, rule.cumulative, details, rows, times)
    if rule.baseline is not None:
        times, rows = _window(console, alert, rule, user, rule.baseline.bucket_days * DAY_NS)
        return longview.baseline_view(rule, rule.baseline, details, rows, times)
    return _risk(console, alert, rule, user, details)


def _window(
    console: Console, alert: AlertSummary, rule: LongRule, user: str, span_ns: int
) -> tuple[list[int], list[WindowEvent]]:
    """The evidence events' times, and the user's matching events from one window (or
    bucket) before the first of them to the last: all the window measures need."""
    times = [t for t, _ in console.reader.alert_points(alert.alert_id)]
    if not times:
        return [], []
    labels = console.policy.labels
    return times, console.reader.rule_window(
        user, rule.selector, labels, times[0] - span_ns, times[-1]
    )


def _risk(
    console: Console, alert: AlertSummary, rule: LongRule, user: str, details: LongDetails
) -> LongView:
    config = rule.risk
    if config is None:
        raise ValueError(f"rule {rule.name} is not a risk rule")  # long_view checked the kind
    reader = console.reader
    evidence = reader.alert_contributions(alert.alert_id, rule.name, user)
    history = []
    if evidence:
        first, last = evidence[0].ts_ns, max(c.ts_ns for c in evidence)
        history = reader.risk_history(
            rule.name, user, first - config.max_age_ns - 1, last, alert_id=alert.alert_id
        )
    return longview.risk_view(rule, config, details, history, evidence)
