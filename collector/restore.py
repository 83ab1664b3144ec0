"""Start-up of the threshold engine: read from the store only what can still decide.

Replaying every event of the longest window (30 days) cost a restart a minute on a store
of a million events. The engine keeps, per rule and group, only the newest events that
windows ending at or after the group's newest event need: at most `files` of them, or the
shortest newest run whose bytes reach `bytes`, all within one window (ThresholdEngine's
"Memory"). `load` reads just those: for rules grouped by user it walks each user's events
newest first through the (user, observed_at_ns) index and stops as soon as the group has
enough; other rules scan their window (every rule of configs/policy.yaml groups by user).
It also reads the alerts whose stretch may still be hot, so later events attach to them.

Events an agent dated after they arrived count at their arrival, as they did live
(`future_dated_batches`).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass

from collector.models import GroupKey, StoredEvent
from collector.policy import Dimension, Policy, Rule
from collector.queries import EVENT_COLUMNS, event_from_row
from collector.thresholds import group_values

__all__ = ["RestoreState", "load"]

# process_json is read as NULL: the rules never look at the process, and parsing it is
# most of the cost of turning a row into an event.
_COLUMNS = ", ".join(
    "NULL" if c.strip() == "process_json" else "e." + c.strip() for c in EVENT_COLUMNS.split(",")
)
_USERS = (  # every distinct user, one index seek each
    "WITH RECURSIVE u(user) AS (SELECT min(user) FROM events UNION ALL"
    " SELECT (SELECT min(user) FROM events WHERE user > u.user) FROM u WHERE u.user IS NOT NULL)"
    " SELECT user FROM u WHERE user IS NOT NULL"
)
_ALERTS = (
    "SELECT rule, group_json, hot_until_ns FROM alerts WHERE kind = 'threshold'"
    " AND hot_until_ns > ? ORDER BY alert_id"
)


@dataclass(frozen=True)
class RestoreState:
    """What `ThresholdEngine.restore` takes, and how much was read for it."""

    alerts: list[tuple[str, GroupKey, int]]
    """(rule, group, hot_until_ns) of every threshold alert whose stretch may be hot."""
    events: list[tuple[int, StoredEvent]]
    """(counted-at time, event), in (time, event id) order."""
    rows_read: int


def load(con: sqlite3.Connection, policy: Policy, now_ns: int) -> RestoreState:
    """Read the engine's state at `now_ns` in one read transaction (a consistent snapshot)."""
    con.execute("BEGIN")
    try:
        users: list[str] | None = None
        chosen: dict[str, tuple[int, StoredEvent]] = {}
        rows = 0
        for rule in policy.rules:
            if Dimension.USER in rule.group_by:
                if users is None:
                    users = [row[0] for row in con.execute(_USERS)]
                scans = [_RuleScan(con, policy, rule, now_ns, user) for user in users]
            else:
                scans = [_RuleScan(con, policy, rule, now_ns, None)]
            for scan in scans:
                for t, event in scan.run():
                    chosen[event.event_id] = (t, event)
                rows += scan.rows
        horizon = now_ns - policy.max_window_ns
        alerts = [
            (rule, tuple((str(k), str(v)) for k, v in json.loads(group)), hot_until)
            for rule, group, hot_until in con.execute(_ALERTS, (horizon,))
        ]
    finally:
        con.execute("COMMIT")
    events = sorted(chosen.values(), key=lambda item: (item[0], item[1].event_id))
    return RestoreState(alerts, events, rows)


class _RuleScan:
    """The events one rule's groups still need, newest first, for one user or for all."""

    def __init__(
        self, con: sqlite3.Connection, policy: Policy, rule: Rule, now_ns: int, user: str | None
    ) -> None:
        self.rule = rule
        self.rows = 0
        self._con = con
        self._since = now_ns - rule.window_ns
        labels = list(policy.labels[policy.label_rank(rule.match.min_label) or 0 :])
        actions = sorted(a.value for a in rule.match.actions)
        classes = sorted(d.value for d in rule.match.destinations)
        where = "e.user = ? AND " if user is not None else ""
        self._sql = (
            f"SELECT {_COLUMNS}, f.received_at_ns FROM events e"  # noqa: S608 (constants)
            " LEFT JOIN future_dated_batches f"
            " ON f.agent_id = e.agent_id AND f.batch_seq = e.batch_seq"
            f" WHERE {where}e.observed_at_ns >= ?"
            f" AND e.label IN ({_marks(labels)}) AND e.action IN ({_marks(actions)})"
            f" AND e.destination_class IN ({_marks(classes)})"
            " ORDER BY e.observed_at_ns DESC"
        )
        self._params = (
            *(() if user is None else (user,)),
            self._since,
            *labels,
            *actions,
            *classes,
        )
        self._group_of = group_values(rule)
        """An event's group, as the engine keys it (flat: cheaper than its GroupKey)."""
        # One group per user: once it has what it needs, nothing older can matter.
        self._one_group = user is not None and rule.group_by == (Dimension.USER,)

    def run(self) -> Iterator[tuple[int, StoredEvent]]:
        """(counted-at time, event) of what each group needs: its newest events up to
        `files` of them or `bytes` of them (whichever is fewer), plus any tied in time with
        the last one taken, plus events that counted earlier than their own time (their
        place in the order is not the scan's)."""
        files, size = self.rule.threshold.files, self.rule.threshold.bytes
        full: dict[object, int] = {}
        """group -> observed_at_ns of the event that completed it."""
        counts: dict[object, tuple[int, int]] = {}
        cursor = self._con.execute(self._sql, self._params)
        try:
            for row in cursor:
                self.rows += 1
                observed, received = row[4], row[-1]
                t = observed if received is None or received >= observed else received
                event = event_from_row(row)
                key = self._group_of(event)
                done_at = full.get(key)
                if done_at is not None:
                    if observed == done_at:
                        yield t, event  # tied with the last one taken
                    elif self._one_group:
                        return
                    continue
                if t != observed:
                    yield t, event  # counted at its arrival: its place is not the scan's
                    continue
                n, total = counts.get(key, (0, 0))
                n, total = n + 1, total + event.size
                counts[key] = (n, total)
                yield observed, event
                if (files is not None and n >= files) or (size is not None and total >= size):
                    full[key] = observed
        finally:
            cursor.close()


def _marks(values: list[str]) -> str:
    return ", ".join("?" * len(values)) if values else "NULL"
