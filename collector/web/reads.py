"""The console's reads: alerts, evidence, agents and events for the pages, as plain values.

    pages -> **reads** -> SQLite (own read-only connections; WAL, so a page never waits
    for ingest and ingest never waits for a page)

Writes go through the domain layer (`collector.triage`, `collector.users`, ...), never here.
Every SQL text below is built only from the constant fragments in this module; every value
a person typed is a bound parameter.
"""

from __future__ import annotations

import json
import queue
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from collector import queries
from collector.detection.cumulative import WindowEvent
from collector.detection.engine import Selector
from collector.detection.risk import Contribution, Term
from collector.detection.sqlhistory import DEVICE_SQL, SqlHistory
from collector.errors import StoreError
from collector.longalerts import device_key
from collector.models import AlertKind, AlertStatus, DeviceView, GroupKey, Severity, StoredEvent
from collector.records import AgentRecord, AlertRecord
from collector.web.filters import AlertFilter, EventFilter, PageRequest

SEVERITY_RANK = (
    "(CASE severity WHEN 'critical' THEN 3 WHEN 'high' THEN 2 WHEN 'medium' THEN 1 ELSE 0 END)"
)
SORT_SQL = {
    "severity": SEVERITY_RANK,
    "id": "alert_id",
    "updated": "updated_at_ns",
    "last": "last_ns",
    "files": "files",
    "bytes": "bytes",
    "status": "status",
    "rule": "rule",
    "assignee": "assignee",
}
"""Sort keys the alerts page offers, to the SQL they order by (alert_id breaks ties)."""

_SUMMARY = (
    "SELECT alert_id, kind, rule, group_json, severity, status, reason, created_at_ns,"
    " updated_at_ns, files, bytes, first_ns, last_ns, agent_id, count, assignee FROM alerts"
)
_EVENTS = f"SELECT {queries.EVENT_COLUMNS}, rowid FROM events"  # noqa: S608
_E = ", ".join("e." + c.strip() for c in queries.EVENT_COLUMNS.split(","))
_ALERT_EVENTS = (
    f"SELECT {_E} FROM alert_events ae JOIN events e USING (event_id)"  # noqa: S608
    " WHERE ae.alert_id = ? ORDER BY e.observed_at_ns, e.event_id LIMIT ? OFFSET ?"
)
_POOL = 8
_FALSE_POSITIVE_EVENTS = (
    " SELECT ae.event_id FROM alert_events ae JOIN alerts a USING (alert_id)"
    " WHERE a.kind = 'threshold' AND a.rule = ? AND a.group_json = ?"
    " AND a.status = 'false_positive' AND a.alert_id != ?"
)
_RISK_HISTORY = (
    "SELECT event_id, ts_ns, term, points FROM risk_contributions"  # noqa: S608 (constants)
    " WHERE rule = ? AND user = ? AND ts_ns > ? AND ts_ns <= ?"
    f" AND event_id NOT IN ({_FALSE_POSITIVE_EVENTS})"
    " ORDER BY ts_ns, event_id, rowid"
)
_ALERT_CONTRIBUTIONS = (
    "SELECT rc.event_id, rc.ts_ns, rc.term, rc.points FROM alert_events ae"
    " JOIN risk_contributions rc ON rc.event_id = ae.event_id"
    " WHERE ae.alert_id = ? AND rc.rule = ? AND rc.user = ?"
    " ORDER BY rc.ts_ns, rc.event_id, rc.rowid"
)
_WEEKLY = (
    "SELECT rule, (created_at_ns - ?1) / ?2, count(*), sum(status = 'resolved'),"
    " sum(status = 'false_positive') FROM alerts"
    " WHERE kind = 'threshold' AND created_at_ns >= ?1 GROUP BY 1, 2"
)
_USERS_ALERTED = (
    "SELECT a.rule, count(DISTINCT json_extract(j.value, '$[1]'))"
    " FROM alerts a, json_each(a.group_json) j"
    " WHERE a.kind = 'threshold' AND max(a.created_at_ns, a.last_ns) >= ?"
    " AND json_extract(j.value, '$[0]') = 'user' GROUP BY a.rule"
)
_USERS_SEEN = (
    # A loose index scan over events_user_time: one probe per distinct user, not one
    # row per event (the events table holds millions).
    "WITH RECURSIVE u(name) AS ("
    " SELECT min(user) FROM events"
    " UNION ALL SELECT (SELECT min(user) FROM events WHERE user > u.name) FROM u"
    " WHERE u.name IS NOT NULL)"
    " SELECT count(*) FROM u WHERE u.name IS NOT NULL AND u.name != ''"
    " AND EXISTS (SELECT 1 FROM events e WHERE e.user = u.name AND e.observed_at_ns >= ?)"
)


@dataclass(frozen=True)
class AlertSummary:
    """One alerts row as the console lists it (no evidence ids)."""

    alert_id: int
    kind: AlertKind
    rule: str
    group: GroupKey
    severity: Severity
    status: AlertStatus
    reason: str
    created_at_ns: int
    updated_at_ns: int
    files: int
    bytes: int
    first_ns: int
    last_ns: int
    agent_id: str
    count: int
    assignee: str | None

    @property
    def group_dict(self) -> dict[str, str]:
        return dict(self.group)


@dataclass(frozen=True)
class AlertPage:
    rows: tuple[AlertSummary, ...]
    total: int
    """Rows matching the filter, all pages together."""


@dataclass(frozen=True)
class RuleActivity:
    """Alerts of each rule (by name) for the Rules page."""

    weekly: dict[str, list[int]]
    """Alerts raised per week, oldest week first."""
    confirmed: dict[str, int]
    """Of those, closed as resolved (a true positive)."""
    dismissed: dict[str, int]
    """Of those, closed as false positive."""
    users_alerted: dict[str, int]
    """Distinct users with an alert of the rule raised, or with evidence, since `recent`."""
    users_seen: int
    """Distinct users with any event since `recent`."""


@dataclass(frozen=True)
class EventPage:
    rows: tuple[StoredEvent, ...]
    next_cursor: str | None
    """Keyset of the page after this one ("<observed_at_ns>.<rowid>"), None on the last."""


def _summary(row: Any) -> AlertSummary:
    return AlertSummary(
        alert_id=row[0], kind=AlertKind(row[1]), rule=row[2],
        group=tuple((str(k), str(v)) for k, v in json.loads(row[3])),
        severity=Severity(row[4]), status=AlertStatus(row[5]), reason=row[6],
        created_at_ns=row[7], updated_at_ns=row[8], files=row[9], bytes=row[10],
        first_ns=row[11], last_ns=row[12], agent_id=row[13], count=row[14], assignee=row[15],
    )  # fmt: skip


def group_pair(key: str, value: str) -> str:
    """The JSON text of one group pair exactly as `queries.group_json` writes it.

    A group is stored as canonical JSON (compact, ASCII escapes), so `instr(group_json,
    pair)` finds the pair and nothing else: inside a string value every quote is
    escaped, so an unescaped `["user","alice"]` can only be a whole pair.
    """
    return queries.group_json(((key, value),))[1:-1]


def alert_where(f: AlertFilter) -> tuple[str, list[object]]:
    """WHERE clause (possibly empty) and parameters of an alerts filter."""
    terms: list[str] = []
    params: list[object] = []
    if f.statuses:
        terms.append(f"status IN ({', '.join('?' * len(f.statuses))})")
        params += [s.value for s in f.statuses]
    if f.severities:
        terms.append(f"severity IN ({', '.join('?' * len(f.severities))})")
        params += [s.value for s in f.severities]
    if f.rule:
        terms.append("rule = ?")
        params.append(f.rule)
    for key, value in (("user", f.user), ("host", f.host), ("destination", f.destination)):
        if value:
            terms.append("instr(group_json, ?) > 0")
            params.append(group_pair(key, value))
    if f.assignee is not None:
        if f.assignee:
            terms.append("assignee = ?")
            params.append(f.assignee)
        else:
            terms.append("assignee IS NULL")
    if f.since_ns is not None:
        terms.append("last_ns >= ?")
        params.append(f.since_ns)
    if f.until_ns is not None:
        terms.append("first_ns <= ?")
        params.append(f.until_ns)
    return (" WHERE " + " AND ".join(terms)) if terms else "", params


def event_where(f: EventFilter, cursor: tuple[int, int] | None) -> tuple[str, list[object]]:
    terms: list[str] = []
    params: list[object] = []
    for column, value in (("user", f.user), ("host", f.host), ("label", f.label)):
        if value:
            terms.append(f"{column} = ?")
            params.append(value)
    if f.name:
        terms.append("(instr(source_path, ?) > 0 OR instr(dest_path, ?) > 0)")
        params += [f.name, f.name]
    if f.sha256:
        terms.append("(source_sha256 = ? OR dest_sha256 = ?)")
        params += [f.sha256, f.sha256]
    if f.since_ns is not None:
        terms.append("observed_at_ns >= ?")
        params.append(f.since_ns)
    if f.until_ns is not None:
        terms.append("observed_at_ns <= ?")
        params.append(f.until_ns)
    if cursor is not None:
        terms.append("(observed_at_ns, rowid) < (?, ?)")
        params += list(cursor)
    return (" WHERE " + " AND ".join(terms)) if terms else "", params


class Reader:
    """Read-only connections to the collector's database, shared by the console's threads.

    A small pool rather than one connection per thread: the server's worker threads come
    and go, and a thread-local connection would outlive its thread until shutdown.
    """

    def __init__(self, db_path: str | Path) -> None:
        self._uri = Path(db_path).resolve().as_uri() + "?mode=ro"
        self._idle: queue.LifoQueue[sqlite3.Connection] = queue.LifoQueue()
        self._all: list[sqlite3.Connection] = []
        self._closed = False

    def close(self) -> None:
        self._closed = True
        for con in self._all:
            con.close()
        self._all.clear()

    @contextmanager
    def connection(self) -> Iterator[sqlite3.Connection]:
        """A pooled read-only connection for one read (the domain layer's `reads` too)."""
        if self._closed:
            raise StoreError("the console's database reader is closed")
        try:
            con = self._idle.get_nowait()
        except queue.Empty:
            try:
                con = sqlite3.connect(
                    self._uri, uri=True, timeout=10.0, isolation_level=None,
                    check_same_thread=False,
                )  # fmt: skip
                con.execute("PRAGMA query_only = ON")
            except sqlite3.Error as e:
                raise StoreError(f"cannot open the database for reading: {e}") from e
            self._all.append(con)
        try:
            yield con
        except sqlite3.Error as e:
            raise StoreError(f"database error: {e}") from e
        finally:
            if con.in_transaction:
                con.execute("COMMIT")
            if self._idle.qsize() < _POOL:
                self._idle.put(con)
            else:
                self._all.remove(con)
                con.close()

    # -- alerts ------------------------------------------------------------------

    def alerts(self, f: AlertFilter, page: PageRequest) -> AlertPage:
        """One page of alerts matching `f`, in the filter's order, and the number matching."""
        where, params = alert_where(f)
        direction = "DESC" if f.descending else "ASC"
        order = f" ORDER BY {SORT_SQL[f.sort]} {direction}, alert_id {direction}"
        with self.connection() as con:
            con.execute("BEGIN")
            total = con.execute(f"SELECT count(*) FROM alerts{where}", params).fetchone()[0]  # noqa: S608
            sql = f"{_SUMMARY}{where}{order} LIMIT ? OFFSET ?"
            rows = con.execute(sql, [*params, page.size, page.offset]).fetchall()
        return AlertPage(tuple(_summary(r) for r in rows), int(total))

    def alert(self, alert_id: int) -> AlertSummary | None:
        with self.connection() as con:
            row = con.execute(f"{_SUMMARY} WHERE alert_id = ?", (alert_id,)).fetchone()
        return None if row is None else _summary(row)

    def alert_record(self, alert_id: int) -> AlertRecord | None:
        """The alert as `alerts show --json` has it (with its evidence ids)."""
        with self.connection() as con:
            return queries.get_alert(con, alert_id)

    def alert_points(self, alert_id: int) -> list[tuple[int, int]]:
        """(observed_at_ns, bytes moved) of every event of an alert, oldest first."""
        sql = (
            "SELECT e.observed_at_ns, CASE e.dest_size WHEN 0 THEN e.source_size"
            " ELSE e.dest_size END FROM alert_events ae JOIN events e USING (event_id)"
            " WHERE ae.alert_id = ? ORDER BY e.observed_at_ns, e.event_id"
        )
        with self.connection() as con:
            return [(int(t), int(n)) for t, n in con.execute(sql, (alert_id,))]

    def alert_events(self, alert_id: int, limit: int, offset: int = 0) -> list[StoredEvent]:
        """A page of an alert's events, oldest first (`limit` -1: all)."""
        with self.connection() as con:
            rows = con.execute(_ALERT_EVENTS, (alert_id, limit, offset)).fetchall()
        return [queries.event_from_row(r) for r in rows]

    def earlier_alerts(self, alert: AlertSummary, limit: int = 10) -> list[AlertSummary]:
        """Older alerts of the same user (if the group has one) or the same rule."""
        user = alert.group_dict.get("user")
        terms, params = ["rule = ?"], [alert.rule]
        if user is not None:
            terms.append("instr(group_json, ?) > 0")
            params.append(group_pair("user", user))
        sql = (
            f"{_SUMMARY} WHERE alert_id < ? AND kind = ? AND ({' OR '.join(terms)})"
            " ORDER BY alert_id DESC LIMIT ?"
        )
        with self.connection() as con:
            rows = con.execute(sql, [alert.alert_id, alert.kind.value, *params, limit]).fetchall()
        return [_summary(r) for r in rows]

    def device_first_used(self, user: str, device: DeviceView) -> int | None:
        """When `user` first copied to `device` (the long rules' identity of it: serial, file
        system UUID, a share's remote, else its mount point), as far as the store goes back.

        It walks the user's events oldest first through (user, observed_at_ns) and stops at
        the first on the device: at worst every event of that user, never the whole store.
        """
        sql = (
            f"SELECT observed_at_ns FROM events WHERE user = ? AND {DEVICE_SQL} = ?"  # noqa: S608
            " ORDER BY observed_at_ns LIMIT 1"
        )
        with self.connection() as con:
            row = con.execute(sql, (user, device_key(device))).fetchone()
        return None if row is None else int(row[0])

    # -- long rules and the rules page ------------------------------------------------

    def rule_window(
        self, user: str, selector: Selector, labels: tuple[str, ...], after_ns: int, until_ns: int
    ) -> list[WindowEvent]:
        """The user's events a long rule matches with after < time <= until: the very query
        the engine asks at ingest (`SqlHistory.window`), on a read-only connection."""
        with self.connection() as con:
            return SqlHistory(lambda: con, labels).window(user, selector, after_ns, until_ns)

    def risk_history(
        self, rule: str, user: str, after_ns: int, until_ns: int, *, alert_id: int
    ) -> list[Contribution]:
        """The user's stored risk contributions under `rule` with after < time <= until,
        oldest first. Those of other alerts closed as false positives are left out, as
        the engine leaves them out of the score (collector.longalerts); `alert_id`'s own
        are kept, so a dismissed alert still shows the score it was raised on."""
        group = queries.group_json((("user", user),))
        params = (rule, user, after_ns, until_ns, rule, group, alert_id)
        with self.connection() as con:
            return _contributions(con.execute(_RISK_HISTORY, params))

    def alert_contributions(self, alert_id: int, rule: str, user: str) -> list[Contribution]:
        """The stored risk contributions of an alert's evidence events, oldest first."""
        with self.connection() as con:
            return _contributions(con.execute(_ALERT_CONTRIBUTIONS, (alert_id, rule, user)))

    def rule_activity(
        self, since_ns: int, week_ns: int, weeks: int, recent_ns: int
    ) -> RuleActivity:
        """Per rule: alerts raised in each of `weeks` weeks from `since_ns`, how many of
        them were confirmed or dismissed, and users alerted since `recent_ns`."""
        weekly: dict[str, list[int]] = {}
        confirmed: dict[str, int] = {}
        dismissed: dict[str, int] = {}
        with self.connection() as con:
            con.execute("BEGIN")
            for rule, week, n, good, bad in con.execute(_WEEKLY, (since_ns, week_ns)):
                counts = weekly.setdefault(rule, [0] * weeks)
                counts[min(int(week), weeks - 1)] += n
                confirmed[rule] = confirmed.get(rule, 0) + good
                dismissed[rule] = dismissed.get(rule, 0) + bad
            alerted = dict(con.execute(_USERS_ALERTED, (recent_ns,)).fetchall())
            seen = int(con.execute(_USERS_SEEN, (recent_ns,)).fetchone()[0])
        return RuleActivity(weekly, confirmed, dismissed, alerted, seen)

    # -- agents and events -----------------------------------------------------------

    def agents(self, page: PageRequest) -> tuple[list[AgentRecord], int]:
        sql = f"SELECT {queries.AGENT_COLUMNS} FROM agents ORDER BY hostname, agent_id LIMIT ? OFFSET ?"  # noqa: S608, E501
        with self.connection() as con:
            con.execute("BEGIN")
            total = int(con.execute("SELECT count(*) FROM agents").fetchone()[0])
            rows = con.execute(sql, (page.size, page.offset)).fetchall()
        return [queries.agent_from_row(r) for r in rows], total

    def agent(self, agent_id: str) -> AgentRecord | None:
        with self.connection() as con:
            return queries.get_agent(con, agent_id)

    def events(self, f: EventFilter, limit: int, cursor: tuple[int, int] | None) -> EventPage:
        """Newest first, `limit` a page, continuing below `cursor` (keyset pagination)."""
        where, params = event_where(f, cursor)
        sql = f"{_EVENTS}{where} ORDER BY observed_at_ns DESC, rowid DESC LIMIT ?"
        with self.connection() as con:
            rows = con.execute(sql, [*params, limit + 1]).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        events = tuple(queries.event_from_row(r) for r in rows)
        nxt = f"{rows[-1][4]}.{rows[-1][-1]}" if more and rows else None
        return EventPage(events, nxt)


def _contributions(rows: Iterator[Any] | sqlite3.Cursor) -> list[Contribution]:
    """(event_id, ts_ns, term, points) rows, ordered by event, as Contributions."""
    out: list[Contribution] = []
    for event_id, ts_ns, term, points in rows:
        if out and out[-1].event_id == event_id:
            last = out[-1]
            out[-1] = Contribution(event_id, last.ts_ns, (*last.terms, Term(term, points)))
        else:
            out.append(Contribution(event_id, ts_ns, (Term(term, points),)))
    return out
