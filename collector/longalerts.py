"""Long-rule alerts in the store: the engine's Episodes, and the writer of its findings.

A long rule's alert is an ordinary alert row (kind `threshold`, group `user=<name>`,
triaged like any other) that stays open until an analyst closes it; `details` holds
the rule kind, the measure, the threshold and the explanation. Risk contributions are
kept term by term in `risk_contributions`, so the points listed on an alert add up to
its score and a restart rebuilds every score from them. Both classes work on the
connection of the ingest transaction, so what they read and write commits (or rolls
back) with the batch.
"""

from __future__ import annotations

import base64
import json
import logging
import sqlite3
from collections import defaultdict
from collections.abc import Iterable, Sequence

from collector.detection.engine import (
    DAY_NS,
    Finding,
    FindingKind,
    LongEvent,
    LongRuleEngine,
    OpenAlert,
)
from collector.detection.risk import Contribution, Term
from collector.models import AlertId, DeviceView, StoredEvent
from collector.policy import Policy
from collector.queries import group_json, insert_rows

logger = logging.getLogger(__name__)

LONG_SCHEMA = """
CREATE TABLE IF NOT EXISTS risk_contributions (
    rule TEXT NOT NULL, user TEXT NOT NULL, event_id TEXT NOT NULL, ts_ns INTEGER NOT NULL,
    term TEXT NOT NULL, points REAL NOT NULL);
CREATE INDEX IF NOT EXISTS risk_contributions_user ON risk_contributions (rule, user, ts_ns);
CREATE INDEX IF NOT EXISTS events_gaps ON events (host, observed_at_ns)
    WHERE action = 'coverage_gap';
"""
"""Tables and indexes the long rules add to the store's schema (idempotent)."""

OPEN_UNTIL_CLOSED = 2**62
"""hot_until_ns of a long-rule alert: it stays open until an analyst closes it."""

_OPEN = (
    "SELECT alert_id, severity, details, first_ns FROM alerts WHERE kind = 'threshold'"
    " AND rule = ? AND group_json = ? AND status IN ('new', 'in_progress')"
    " ORDER BY alert_id DESC LIMIT 1"
)
_ALERTED = (
    "SELECT first_ns, last_ns FROM alerts WHERE kind = 'threshold' AND rule = ?"
    " AND group_json = ? AND status IN ('new', 'in_progress', 'resolved')"
)
_CONTRIBUTIONS = (
    "SELECT event_id, ts_ns, term, points FROM risk_contributions"
    " WHERE rule = ?1 AND user = ?2 AND ts_ns >= ?3 AND event_id NOT IN ("
    "  SELECT ae.event_id FROM alert_events ae JOIN alerts a USING (alert_id)"
    "  WHERE a.rule = ?1 AND a.group_json = ?4 AND a.status = 'false_positive')"
    " ORDER BY ts_ns, event_id, rowid"
)
_INSERT = (
    "INSERT INTO alerts (kind, rule, group_json, severity, status, reason, created_at_ns,"
    " updated_at_ns, files, bytes, first_ns, last_ns, hot_until_ns, agent_id, details)"
    " VALUES ('threshold', ?, ?, ?, 'new', ?, ?, ?, 0, 0, ?, ?, ?, ?, ?)"
)
_ESCALATE = (
    "UPDATE alerts SET severity = ?, reason = ?, details = ?, updated_at_ns = ? WHERE alert_id = ?"
)
_ATTACH = "INSERT OR IGNORE INTO alert_events (alert_id, event_id) VALUES"
_TOTALS = (
    "UPDATE alerts SET (files, bytes, first_ns, last_ns, updated_at_ns) = ("
    " SELECT count(*), coalesce(sum(CASE WHEN e.archive_member != x'' THEN e.source_size"
    " ELSE e.dest_size END), 0), coalesce(min(e.observed_at_ns), 0),"
    " coalesce(max(e.observed_at_ns), 0), ?2"
    " FROM alert_events ae JOIN events e USING (event_id) WHERE ae.alert_id = ?1)"
    " WHERE alert_id = ?1"
)
_CONTRIBUTE = "INSERT INTO risk_contributions (rule, user, event_id, ts_ns, term, points) VALUES"


def device_key(device: DeviceView | None) -> str:
    """The identity of a destination device, as `SqlHistory` computes it in SQL."""
    if device is None:
        return ""
    if device.serial:
        return device.serial
    if device.fs_uuid:
        return device.fs_uuid
    if device.remote:
        return device.remote
    return base64.b64encode(device.mount_point).decode("ascii")


def long_event(event: StoredEvent, policy: Policy, now_ns: int | None = None) -> LongEvent:
    """The long rules' view of a stored event; with `now_ns`, a future time counts as now."""
    rank = policy.label_rank(event.label)
    ts = event.observed_at_ns if now_ns is None else min(event.observed_at_ns, now_ns)
    return LongEvent(
        event_id=event.event_id,
        user=event.user,
        ts_ns=ts,
        label=event.label,
        rank=-1 if rank is None else rank,
        destination_class=event.destination_class,
        action=event.action,
        sha256=event.source_sha256 if event.archive_member else event.dest_sha256,
        size=event.size,
        path=event.dest_path,
        device=device_key(event.device),
        host=event.host,
        archived=bool(event.archive_member),
    )


def long_events(
    events: Iterable[StoredEvent], policy: Policy, engine: LongRuleEngine, now_ns: int
) -> list[LongEvent]:
    """The events some long rule can see, as the engine wants them (reads mostly not)."""
    out: list[LongEvent] = []
    for event in events:
        if not event.user:
            continue
        rank = policy.label_rank(event.label)
        if rank is not None and engine.selects(event.action, rank, event.destination_class):
            out.append(long_event(event, policy, now_ns))
    return out


def user_group(user: str) -> str:
    return group_json((("user", user),))


class StoreEpisodes:
    """The engine's `Episodes`, answered from the alerts and risk tables.

    The ingestor points it (`use`) at the connection of each batch's transaction.
    """

    def __init__(self, con: sqlite3.Connection | None = None) -> None:
        self._con = con

    def use(self, con: sqlite3.Connection) -> None:
        self._con = con

    @property
    def con(self) -> sqlite3.Connection:
        if self._con is None:
            raise RuntimeError("StoreEpisodes used outside a transaction")
        return self._con

    def open_alert(self, rule: str, user: str) -> OpenAlert | None:
        row = self.con.execute(_OPEN, (rule, user_group(user))).fetchone()
        if row is None:
            return None
        details = _details(row[2])
        threshold = details.get("threshold", 0.0)
        return OpenAlert(
            row[1],
            float(threshold) if isinstance(threshold, int | float) else 0.0,
            row[3] // DAY_NS,
        )

    def alerted_days(self, rule: str, user: str) -> list[tuple[int, int]]:
        rows = self.con.execute(_ALERTED, (rule, user_group(user)))
        return [(first // DAY_NS, last // DAY_NS) for first, last in rows]

    def contributions(self, rule: str, user: str, since_ns: int) -> list[Contribution]:
        rows = self.con.execute(_CONTRIBUTIONS, (rule, user, since_ns, user_group(user)))
        out: list[Contribution] = []
        for event_id, ts_ns, term, points in rows:
            if out and out[-1].event_id == event_id:
                last = out[-1]
                out[-1] = Contribution(last.event_id, last.ts_ns, (*last.terms, Term(term, points)))
            else:
                out.append(Contribution(event_id, ts_ns, (Term(term, points),)))
        return out


def _details(text: str) -> dict[str, object]:
    try:
        value = json.loads(text) if text else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def apply_findings(
    con: sqlite3.Connection, findings: Sequence[Finding], agent_id: str, now_ns: int
) -> list[AlertId]:
    """Write the findings of one batch; returns the alerts opened."""
    opened: list[AlertId] = []
    alerts: dict[tuple[str, str], AlertId] = {}
    links: list[tuple[AlertId, str]] = []
    touched: set[AlertId] = set()
    contributions: list[tuple[object, ...]] = []
    for finding in findings:
        contributions.extend(
            (finding.rule, finding.user, event_id, finding.at_ns, term, points)
            for event_id, term, points in finding.contributions
        )
        if finding.kind is FindingKind.CONTRIBUTION:
            continue
        key = (finding.rule, finding.user)
        alert_id = alerts.get(key)
        if alert_id is None:
            row = con.execute(_OPEN, (finding.rule, user_group(finding.user))).fetchone()
            alert_id = None if row is None else AlertId(row[0])
        if finding.kind is FindingKind.OPENED or alert_id is None:
            if finding.kind is not FindingKind.OPENED:
                logger.warning("%s for %s has no open alert: opening one", finding.rule, key[1])
            alert_id = _open(con, finding, agent_id, now_ns)
            opened.append(alert_id)
        elif finding.kind is FindingKind.ESCALATED:
            con.execute(
                _ESCALATE,
                (finding.severity, finding.explanation, _details_of(finding), now_ns, alert_id),
            )
        alerts[key] = alert_id
        touched.add(alert_id)
        links.extend((alert_id, event_id) for event_id in finding.evidence)
    insert_rows(con, _ATTACH, links, 2)
    insert_rows(con, _CONTRIBUTE, contributions, 6)
    con.executemany(_TOTALS, [(alert_id, now_ns) for alert_id in sorted(touched)])
    for alert_id in opened:
        logger.info("long-rule alert %d opened", alert_id)
    return opened


def _open(con: sqlite3.Connection, finding: Finding, agent_id: str, now_ns: int) -> AlertId:
    cur = con.execute(
        _INSERT,
        (finding.rule, user_group(finding.user), finding.severity, finding.explanation,
         now_ns, now_ns, finding.at_ns, finding.at_ns, OPEN_UNTIL_CLOSED, agent_id,
         _details_of(finding)),
    )  # fmt: skip
    return AlertId(cur.lastrowid or 0)


def _details_of(finding: Finding) -> str:
    return json.dumps(
        {
            "rule_kind": finding.rule_kind.value,
            "value": finding.value,
            "threshold": finding.threshold,
            "explanation": finding.explanation,
        },
        sort_keys=True,
    )


def contributions_of(
    con: sqlite3.Connection, rule: str, user: str, event_ids: Iterable[str]
) -> dict[str, list[tuple[str, float]]]:
    """The stored terms of these events under `rule`, for an alert's explanation."""
    ids = list(event_ids)
    out: dict[str, list[tuple[str, float]]] = defaultdict(list)
    for start in range(0, len(ids), 500):
        part = ids[start : start + 500]
        marks = ",".join("?" * len(part))
        sql = (
            "SELECT event_id, term, points FROM risk_contributions"  # noqa: S608
            f" WHERE rule = ? AND user = ? AND event_id IN ({marks}) ORDER BY rowid"
        )
        for event_id, term, points in con.execute(sql, (rule, user, *part)):
            out[event_id].append((term, points))
    return dict(out)
