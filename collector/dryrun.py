"""`policy dry-run`: replay stored events against a candidate policy, touching nothing.

Opens the store read-only, streams the events of the span in time order, feeds the
candidate's burst rules (`ThresholdEngine`) and long rules (`LongRuleEngine` over
the store-backed History, which sees the whole store, so windows and baselines
reach back before the span), and reports per rule the alerts it would raise and
for whom. Real alerts, the trail and the running collector are never touched.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from collector.detection.engine import DAY_NS, FindingKind, LongEvent, LongRuleEngine
from collector.detection.sqlhistory import DEVICE_SQL, DOC_SHA_SQL, DOC_SIZE_SQL, SqlHistory
from collector.directory import Directory
from collector.errors import StoreError
from collector.models import AlertOpened, StoredEvent
from collector.policy import Policy
from collector.queries import EVENT_COLUMNS, event_from_row
from collector.thresholds import ThresholdEngine


@dataclass(frozen=True)
class WouldAlert:
    rule: str
    who: str
    """The user, or the group key of a burst rule."""
    severity: str
    at_ns: int
    explanation: str
    evidence: int


@dataclass
class DryRun:
    events: int = 0
    alerts: list[WouldAlert] = field(default_factory=list)

    def by_rule(self) -> dict[str, list[WouldAlert]]:
        out: dict[str, list[WouldAlert]] = {}
        for alert in self.alerts:
            out.setdefault(alert.rule, []).append(alert)
        return out


def dry_run(
    database: Path, policy: Policy, *, since_ns: int, directory: Directory | None = None
) -> DryRun:
    """Replay the events observed at or after `since_ns` in `database` against `policy`.

    Two read-only connections: one streams the span, the other answers the History.
    """
    directory = directory or Directory()
    uri = f"{database.resolve().as_uri()}?mode=ro"
    if not database.is_file():
        raise StoreError(f"{database}: no such store (run `init` and `serve` first)")
    try:
        stream = sqlite3.connect(uri, uri=True)
        lookup = sqlite3.connect(uri, uri=True)
    except sqlite3.Error as e:
        raise StoreError(f"{database}: cannot open the store read-only: {e}") from e
    try:
        history = SqlHistory(
            lambda: lookup,
            policy.labels,
            departments=directory.departments,
            watchlists=directory.watchlists,
        )
        return _replay(stream, history, policy, since_ns)
    except sqlite3.OperationalError as e:
        if "no such" in str(e):
            raise StoreError(
                f"{database}: {e}: the store predates this collector; start `serve` on it"
                " once to bring it up to date"
            ) from e
        raise StoreError(f"{database}: {e}") from e
    except sqlite3.Error as e:
        raise StoreError(f"{database}: {e}") from e
    finally:
        stream.close()
        lookup.close()


def _replay(con: sqlite3.Connection, history: SqlHistory, policy: Policy, since_ns: int) -> DryRun:
    report = DryRun()
    burst = ThresholdEngine(policy)
    report.events = con.execute(
        "SELECT count(*) FROM events WHERE observed_at_ns >= ?", (since_ns,)
    ).fetchone()[0]
    actions = sorted({a.value for rule in policy.rules for a in rule.match.actions})
    for event in _burst_events(con, since_ns, actions):  # groups may span users: time order
        for decision in burst.feed(event, event.observed_at_ns):
            if isinstance(decision, AlertOpened):
                who = ", ".join(f"{k}={v}" for k, v in decision.group)
                report.alerts.append(
                    WouldAlert(
                        decision.rule,
                        who,
                        decision.severity.value,
                        decision.last_ns,
                        decision.reason,
                        len(decision.evidence),
                    )
                )
    if policy.long_rules:
        report.alerts.extend(_long_rules(con, history, policy, since_ns))
    report.alerts.sort(key=lambda a: (a.at_ns, a.rule, a.who))
    return report


def _burst_events(
    con: sqlite3.Connection, since_ns: int, actions: list[str]
) -> Iterator[StoredEvent]:
    """The span's events a burst rule can count, in time order (reads are most events)."""
    marks = ",".join("?" * len(actions))
    cur = con.execute(
        f"SELECT {EVENT_COLUMNS} FROM events WHERE observed_at_ns >= ?"  # noqa: S608
        f" AND action IN ({marks}) ORDER BY observed_at_ns, rowid",
        (since_ns, *actions),
    )
    while rows := cur.fetchmany(1000):
        yield from map(event_from_row, rows)


def _long_rules(
    con: sqlite3.Connection, history: SqlHistory, policy: Policy, since_ns: int
) -> list[WouldAlert]:
    """User by user: each user's span is one batch, so each window is one query.

    The long rules are per user, so this gives the findings of replaying in time order.
    """
    since_day = since_ns // DAY_NS
    reach = max(
        (r.baseline.bucket_days + r.baseline.history_days for r in policy.long_rules if r.baseline),
        default=0,
    )
    baselines = [r.selector for r in policy.long_rules if r.baseline is not None]
    if baselines:
        history.preload(baselines, since_day - reach - 1, time.time_ns() // DAY_NS + 1)
    engine = LongRuleEngine(policy.long_rules, history)
    users = [
        row[0]
        for row in con.execute(
            "SELECT DISTINCT user FROM events WHERE observed_at_ns >= ? AND user != ''",
            (since_ns,),
        )
    ]
    alerts: list[WouldAlert] = []
    ranks = {label: rank for rank, label in enumerate(policy.labels)}
    actions = sorted({a for r in policy.long_rules for a in r.selector.actions})
    sql = _USER_EVENTS.format(marks=",".join("?" * len(actions)))
    for user in sorted(users):
        events = [
            LongEvent(r[0], user, r[1], r[2], ranks.get(r[2], -1), r[3], r[4], r[5], r[6],
                      r[7], r[8] or "", r[9], bool(r[10]))
            for r in con.execute(sql, (user, since_ns, *actions))
        ]  # fmt: skip
        current: dict[str, int] = {}
        """rule -> index in `alerts` of the user's open alert."""
        for finding in engine.feed_batch(events):
            if finding.kind is FindingKind.CONTRIBUTION:
                continue
            at = current.get(finding.rule)
            if finding.kind is FindingKind.OPENED or at is None:
                current[finding.rule] = len(alerts)
                alerts.append(
                    WouldAlert(finding.rule, user, finding.severity, finding.at_ns,
                               finding.explanation, len(finding.evidence))
                )  # fmt: skip
            else:
                old = alerts[at]
                alerts[at] = WouldAlert(
                    old.rule, user, finding.severity, old.at_ns,
                    finding.explanation or old.explanation, old.evidence + len(finding.evidence),
                )  # fmt: skip
    return alerts


_USER_EVENTS = (
    "SELECT event_id, observed_at_ns, label, destination_class, action,"  # noqa: S608
    f" {DOC_SHA_SQL}, {DOC_SIZE_SQL}, dest_path, {DEVICE_SQL}, host, archive_member != x''"
    " FROM events"
    " WHERE user = ? AND observed_at_ns >= ? AND action IN ({marks})"
    " ORDER BY observed_at_ns, event_id"
)
