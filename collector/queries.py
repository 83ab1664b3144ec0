"""SQL of the collector's store: row <-> value mapping, reads, and the writes of ingest.

`collector.store.SqliteStore` owns connections and transactions and calls these functions.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import sqlite3
from base64 import b64decode
from binascii import b2a_base64
from collections.abc import Iterator, Mapping, Sequence
from json.encoder import encode_basestring_ascii
from typing import Any

from collector.errors import StoreError
from collector.models import (
    AgentId,
    AlertId,
    AlertKind,
    AlertOpened,
    AlertStatus,
    DeviceView,
    EventId,
    EvidenceAdded,
    GroupKey,
    ProcessView,
    Severity,
    StoredEvent,
    VerifiedBatch,
)
from collector.reasons import ReasonParts
from collector.records import AgentRecord, AlertRecord, StoredBatch

logger = logging.getLogger(__name__)

EVENT_COLUMNS = (
    "event_id, agent_id, batch_seq, seq, observed_at_ns, action, host, user, label,"
    " label_source, source_path, source_size, source_sha256, dest_path, dest_size,"
    " dest_sha256, destination_class, detection, attribution, process_json, device_json,"
    " gap_reason, gap_count, archive_member, access_count"
)
ALERT_COLUMNS = (
    "alert_id, kind, rule, group_json, severity, status, reason, created_at_ns,"
    " updated_at_ns, files, bytes, first_ns, last_ns, hot_until_ns, agent_id, count, details,"
    " assignee"
)
AGENT_COLUMNS = (
    "agent_id, public_key, key_id, hostname, agent_version, enrolled_at_ns, last_seen_ns,"
    " revoked, cert_serial, policy_revision, spool_depth, coverage_gaps, cpu_percent, rss_bytes"
)
_EVIDENCE_IDS = (
    "(SELECT json_group_array(event_id) FROM (SELECT ae.event_id FROM alert_events ae"
    " JOIN events e USING (event_id) WHERE ae.alert_id = alerts.alert_id"
    " ORDER BY e.observed_at_ns, e.event_id))"
)
_FETCH = 1000

_COLUMNS = [c.strip() for c in EVENT_COLUMNS.split(",")]
_PROCESS, _DEVICE = _COLUMNS.index("process_json"), _COLUMNS.index("device_json")
if [c.removesuffix("_json") for c in _COLUMNS] != list(StoredEvent._fields):
    raise TypeError("StoredEvent fields and EVENT_COLUMNS differ: update collector.queries")

# SQL text is assembled only from the constant column lists above (hence ruff S608
# is silenced); every value is a bound parameter.
_E = ", ".join("e." + c.strip() for c in EVENT_COLUMNS.split(","))
INSERT_EVENT = f"INSERT INTO events ({EVENT_COLUMNS}) VALUES ({', '.join('?' * len(_COLUMNS))})"  # noqa: S608
_AGENT = f"SELECT {AGENT_COLUMNS} FROM agents WHERE agent_id = ?"  # noqa: S608
_AGENTS = f"SELECT {AGENT_COLUMNS} FROM agents ORDER BY agent_id"  # noqa: S608
_LATEST_EVENTS = (
    f"SELECT * FROM (SELECT {EVENT_COLUMNS}, rowid AS r FROM events"  # noqa: S608
    " ORDER BY observed_at_ns DESC, r DESC LIMIT ?) ORDER BY observed_at_ns, r"
)
_EVENTS_SINCE = (
    f"SELECT {EVENT_COLUMNS} FROM events WHERE observed_at_ns >= ?1"  # noqa: S608
    " ORDER BY observed_at_ns, rowid LIMIT ?2"
)
_ALERT_EVENTS = (
    f"SELECT {_E} FROM alert_events ae JOIN events e USING (event_id)"  # noqa: S608
    " WHERE ae.alert_id = ? ORDER BY e.observed_at_ns, e.event_id"
)
_ALERTS = f"SELECT {ALERT_COLUMNS}, {_EVIDENCE_IDS} FROM alerts"  # noqa: S608
_ALERT = f"{_ALERTS} WHERE alert_id = ?"
_ALERTS_ALL = f"{_ALERTS} ORDER BY alert_id DESC LIMIT ?"
_ALERTS_IN = f"{_ALERTS} WHERE status = ? ORDER BY alert_id DESC LIMIT ?"


_ENCODER = json.JSONEncoder(separators=(",", ":"))  # json.dumps(separators=...) builds one per call


_str = encode_basestring_ascii
"""A str as a JSON string literal, the way _ENCODER writes it."""


def _b64(data: bytes) -> str:
    return b2a_base64(data, newline=False).decode("ascii")


def _json(value: object) -> str:
    return _ENCODER.encode(value)


# process_json and device_json run for nearly every event stored, so they write the JSON
# themselves: the text is exactly what _json (compact separators, ASCII escapes) makes of
# the same dict (tests/collector/test_queries_json.py), in a third of the time.


def process_json(p: ProcessView) -> str:
    """JSON of a process; paths and arguments are base64 because they need not be UTF-8."""
    cmdline = ",".join(['"' + _b64(arg) + '"' for arg in p.cmdline])
    ppids = ",".join([str(int(pid)) for pid in p.ppid_chain])
    return (
        f'{{"pid":{int(p.pid)},"start_time_ns":{int(p.start_time_ns)},"exe":"{_b64(p.exe)}",'
        f'"cmdline":[{cmdline}],"ppid_chain":[{ppids}],"name":{_str(p.name)}}}'
    )


def device_json(d: DeviceView) -> str:
    """JSON of a device; `remote` only for a network share (rows of other devices, and rows
    written before it existed, have none)."""
    remote = f',"remote":{_str(d.remote)}' if d.remote else ""
    return (
        f'{{"vendor":{_str(d.vendor)},"model":{_str(d.model)},"serial":{_str(d.serial)},'
        f'"fs_uuid":{_str(d.fs_uuid)},"fs_type":{_str(d.fs_type)},'
        f'"mount_point":"{_b64(d.mount_point)}"{remote}}}'
    )


def group_json(group: GroupKey) -> str:
    """Canonical text of a group key, compared for equality in SQL."""
    return _json([list(pair) for pair in group])


def event_rows(events: Sequence[StoredEvent]) -> Iterator[tuple[object, ...]]:
    """The events-table rows of events, in EVENT_COLUMNS order.

    A StoredEvent's fields are the columns in order, with process and device where the
    row has their JSON. A process or device shared by several events (the codec shares
    equal ones within a batch) is serialised once; `events` keeps them alive, so their
    ids stay unique.
    """
    texts: dict[int, str | None] = {id(None): None}
    for ev in events:
        p, d = ev.process, ev.device
        p_json = texts.get(id(p))
        if p_json is None and p is not None:
            p_json = texts[id(p)] = process_json(p)
        d_json = texts.get(id(d))
        if d_json is None and d is not None:
            d_json = texts[id(d)] = device_json(d)
        yield (*ev[:_PROCESS], p_json, d_json, *ev[_DEVICE + 1 :])


def event_from_row(row: Any) -> StoredEvent:
    """Inverse of `event_rows`; columns after EVENT_COLUMNS (e.g. a rowid) are ignored."""
    process = device = None
    if row[_PROCESS] is not None:
        p = json.loads(row[_PROCESS])
        process = ProcessView(
            pid=p["pid"],
            start_time_ns=p["start_time_ns"],
            exe=b64decode(p["exe"]),
            cmdline=tuple(b64decode(arg) for arg in p["cmdline"]),
            ppid_chain=tuple(p["ppid_chain"]),
            name=p["name"],
        )
    if row[_DEVICE] is not None:
        d = json.loads(row[_DEVICE])
        device = DeviceView(
            vendor=d["vendor"],
            model=d["model"],
            serial=d["serial"],
            fs_uuid=d["fs_uuid"],
            fs_type=d["fs_type"],
            mount_point=b64decode(d["mount_point"]),
            remote=d.get("remote", ""),
        )
    return StoredEvent._make((*row[:_PROCESS], process, device, *row[_DEVICE + 1 : len(_COLUMNS)]))


def alert_from_row(row: Any) -> AlertRecord:
    """An alerts row selected as ALERT_COLUMNS followed by the evidence id array."""
    return AlertRecord(
        alert_id=AlertId(row[0]), kind=AlertKind(row[1]), rule=row[2],
        group=tuple((k, v) for k, v in json.loads(row[3])), severity=Severity(row[4]),
        status=AlertStatus(row[5]), reason=row[6], created_at_ns=row[7], updated_at_ns=row[8],
        files=row[9], bytes=row[10], first_ns=row[11], last_ns=row[12], hot_until_ns=row[13],
        agent_id=row[14], count=row[15], details=row[16], assignee=row[17],
        evidence=tuple(EventId(e) for e in json.loads(row[18])),
    )  # fmt: skip


def agent_from_row(row: Any) -> AgentRecord:
    return AgentRecord(
        agent_id=AgentId(row[0]), public_key_raw=row[1], key_id=row[2], hostname=row[3],
        agent_version=row[4], enrolled_at_ns=row[5], last_seen_ns=row[6],
        revoked=bool(row[7]), cert_serial=row[8], policy_revision=row[9],
        spool_depth=row[10], coverage_gaps=row[11], cpu_percent=row[12], rss_bytes=row[13],
    )  # fmt: skip


def get_agent(con: sqlite3.Connection, agent_id: str) -> AgentRecord | None:
    row = con.execute(_AGENT, (agent_id,)).fetchone()
    return None if row is None else agent_from_row(row)


def list_agents(con: sqlite3.Connection) -> list[AgentRecord]:
    return [agent_from_row(row) for row in con.execute(_AGENTS)]


def list_events(con: sqlite3.Connection, limit: int, since_ns: int | None) -> list[StoredEvent]:
    """Up to `limit` events, oldest observation first: from `since_ns` on, else the latest."""
    if since_ns is None:
        rows = con.execute(_LATEST_EVENTS, (limit,)).fetchall()
    else:
        rows = con.execute(_EVENTS_SINCE, (since_ns, limit)).fetchall()
    return [event_from_row(row) for row in rows]


def events_since(con: sqlite3.Connection, since_ns: int) -> Iterator[StoredEvent]:
    """Every event observed at or after `since_ns`, in observation order, streamed."""
    cur = con.execute(_EVENTS_SINCE, (since_ns, -1))
    while rows := cur.fetchmany(_FETCH):
        yield from map(event_from_row, rows)


def events_of_alert(con: sqlite3.Connection, alert_id: int) -> list[StoredEvent]:
    return [event_from_row(row) for row in con.execute(_ALERT_EVENTS, (alert_id,))]


def get_alert(con: sqlite3.Connection, alert_id: int) -> AlertRecord | None:
    row = con.execute(_ALERT, (alert_id,)).fetchone()
    return None if row is None else alert_from_row(row)


def list_alerts(con: sqlite3.Connection, status: str | None, limit: int) -> list[AlertRecord]:
    """Newest first, optionally only those in `status` (an AlertStatus value)."""
    if status is None:
        rows = con.execute(_ALERTS_ALL, (limit,))
    else:
        rows = con.execute(_ALERTS_IN, (str(status), limit))
    return [alert_from_row(row) for row in rows]


def open_threshold_alerts(con: sqlite3.Connection) -> list[tuple[str, GroupKey, int]]:
    """(rule, group, hot_until_ns) of every threshold alert still open."""
    sql = (
        "SELECT rule, group_json, hot_until_ns FROM alerts WHERE kind = 'threshold'"
        " AND status IN ('new', 'in_progress') ORDER BY alert_id"
    )
    return [
        (rule, tuple((k, v) for k, v in json.loads(group)), hot)
        for rule, group, hot in con.execute(sql)
    ]


def batches(con: sqlite3.Connection, agent_id: str) -> Iterator[StoredBatch]:
    """Every stored batch of an agent, in batch_seq order, streamed."""
    cur = con.execute(
        "SELECT agent_id, batch_seq, digest, prev_digest, body, signature, key_id,"
        " received_at_ns FROM batches WHERE agent_id = ? ORDER BY batch_seq",
        (agent_id,),
    )
    while rows := cur.fetchmany(_FETCH):
        for row in rows:
            yield StoredBatch(AgentId(row[0]), *row[1:])


# -- writes run inside SqliteStore's transactions -----------------------------------

_FIND_ALERT = (  # the open alert of a group, else its latest (see `_evidence_alert`)
    "SELECT alert_id, status IN ('new', 'in_progress') FROM alerts"
    " WHERE kind = ? AND rule = ? AND group_json = ?"
    " ORDER BY status IN ('new', 'in_progress') DESC, alert_id DESC LIMIT 1"
)
_FOLLOW_UP = (  # a closed alert's copy, opened for evidence that arrived after it closed
    "INSERT INTO alerts (kind, rule, group_json, severity, status, reason, created_at_ns,"
    " updated_at_ns, files, bytes, first_ns, last_ns, hot_until_ns, agent_id)"
    " SELECT kind, rule, group_json, severity, 'new',"
    " 'more after alert #' || alert_id || ' was closed as ' || status || ': ' || reason,"
    " ?1, ?1, 0, 0, ?2, ?2, ?3, agent_id FROM alerts WHERE alert_id = ?4"
)
_FIND_OPEN_ALERT = (
    "SELECT alert_id FROM alerts WHERE kind = ? AND rule = ? AND group_json = ?"
    " AND status IN ('new', 'in_progress') ORDER BY alert_id DESC LIMIT 1"
)
_INSERT_ALERT = (
    "INSERT INTO alerts (kind, rule, group_json, severity, status, reason, created_at_ns,"
    " updated_at_ns, files, bytes, first_ns, last_ns, hot_until_ns, agent_id)"
    " VALUES (?, ?, ?, ?, 'new', ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_ATTACH = "INSERT OR IGNORE INTO alert_events (alert_id, event_id) VALUES (?, ?)"
_ATTACH_MANY = "INSERT OR IGNORE INTO alert_events (alert_id, event_id) VALUES"
_INSERT_EVENTS = f"INSERT INTO events ({EVENT_COLUMNS}) VALUES"
_GROW = (
    "UPDATE alerts SET files = files + ?, bytes = bytes + ?, first_ns = min(first_ns, ?),"
    " last_ns = max(last_ns, ?), hot_until_ns = max(hot_until_ns, ?),"
    " updated_at_ns = ? WHERE alert_id = ?"
)


def insert_rows(
    con: sqlite3.Connection, head: str, rows: Sequence[tuple[object, ...]], width: int
) -> None:
    """Run `head` ("INSERT ... VALUES") over rows of `width` values, many rows a statement.

    Not executemany: the sqlite3 module releases the GIL around each statement step, once
    per row there, and takes it back before the next row. While other threads run Python
    (the next batches being decoded), every take-back can wait a switch interval: measured
    on the 2-core box, 500-row transactions of events fell from 12k rows/s alone to 650
    beside one busy thread. A multi-row INSERT steps once per chunk; the rows inserted
    and their order are the same. (Such a statement keeps a statement journal to undo
    itself on a constraint error: the store keeps it in memory, `temp_store`.)
    """
    chunk = rows_per_statement(con, width)
    for start in range(0, len(rows), chunk):
        part = rows[start : start + chunk]
        con.execute(_multi_row(head, width, len(part)), _flat(part))


def _flat(rows: Sequence[tuple[object, ...]]) -> list[object]:
    """The values of rows, one after another, as a multi-row INSERT binds them."""
    return list(itertools.chain.from_iterable(rows))


def rows_per_statement(con: sqlite3.Connection, width: int) -> int:
    """Rows `insert_rows` puts in one statement: at most 500, within the variable limit."""
    limit = con.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
    return max(1, min(_MAX_INSERT_ROWS, limit // width))


_MAX_INSERT_ROWS = 500


@functools.lru_cache(maxsize=32)
def _multi_row(head: str, width: int, n_rows: int) -> str:
    one = "(" + ", ".join("?" * width) + ")"
    return f"{head} {', '.join([one] * n_rows)}"


def insert_events(con: sqlite3.Connection, rows: Sequence[tuple[object, ...]]) -> None:
    """Insert events-table rows (`event_rows`), in order."""
    insert_rows(con, _INSERT_EVENTS, rows, len(_COLUMNS))


def insert_new_events(
    con: sqlite3.Connection, batches: Sequence[VerifiedBatch], rows: Sequence[tuple[object, ...]]
) -> list[tuple[StoredEvent, ...]]:
    """Insert the batches' events whose ids are not stored yet; return those, per batch.

    `rows` are the batches' `event_rows`, one batch after another, each in event order
    (see `insert_new_rows`: an id repeated in a later batch is skipped there).
    """
    skipped = insert_new_rows(con, rows)
    new: list[tuple[StoredEvent, ...]] = []
    offset = 0
    for batch in batches:
        events = batch.events
        if skipped and any(offset + i in skipped for i in range(len(events))):
            events = tuple(ev for i, ev in enumerate(events) if offset + i not in skipped)
            logger.warning(
                "agent %s batch %d: skipping %d events stored before",
                batch.agent_id, batch.batch_seq, len(batch.events) - len(events),
            )  # fmt: skip
        offset += len(batch.events)
        new.append(events)
    return new


def insert_new_rows(con: sqlite3.Connection, rows: Sequence[tuple[object, ...]]) -> set[int]:
    """Insert the events rows whose ids are neither stored nor earlier in `rows`; return
    the positions of the others, skipped.

    Ids already stored (an agent that re-sent events under a new batch_seq) are rare: try
    the plain insert first and look for them only when a statement hits the unique key.
    That statement undid itself, those before it stand; no savepoint is needed (one
    would copy every index page the inserts touch into its journal).
    """
    chunk = rows_per_statement(con, len(_COLUMNS))
    for start in range(0, len(rows), chunk):
        part = rows[start : start + chunk]
        try:
            con.execute(_multi_row(_INSERT_EVENTS, len(_COLUMNS), len(part)), _flat(part))
        except sqlite3.IntegrityError:
            return _insert_rest(con, rows, start)
    return set()


def _insert_rest(
    con: sqlite3.Connection, rows: Sequence[tuple[object, ...]], start: int
) -> set[int]:
    ids = json.dumps([row[0] for row in rows[start:]])
    sql = "SELECT event_id FROM events WHERE event_id IN (SELECT value FROM json_each(?))"
    seen = {row[0] for row in con.execute(sql, (ids,))}
    skipped: set[int] = set()
    fresh = []
    for i in range(start, len(rows)):
        event_id = rows[i][0]
        if event_id in seen:
            skipped.add(i)
        else:
            seen.add(event_id)  # a later row with the same id (another batch) is skipped
            fresh.append(rows[i])
    insert_events(con, fresh)
    return skipped


def chain_head(con: sqlite3.Connection, agent_id: str) -> tuple[int, bytes] | None:
    """(batch_seq, digest) of the agent's last stored batch."""
    sql = "SELECT batch_seq, digest FROM batches WHERE agent_id = ? ORDER BY batch_seq DESC"
    row = con.execute(sql + " LIMIT 1", (agent_id,)).fetchone()
    return None if row is None else (row[0], row[1])


def open_alert(con: sqlite3.Connection, d: AlertOpened, agent_id: str, now_ns: int) -> AlertId:
    """Insert a threshold alert and its evidence links."""
    cur = con.execute(
        _INSERT_ALERT,
        (AlertKind.THRESHOLD.value, d.rule, group_json(d.group), d.severity.value, d.reason,
         now_ns, now_ns, d.files, d.bytes, d.first_ns, d.last_ns, d.hot_until_ns, agent_id),
    )  # fmt: skip
    alert_id = AlertId(cur.lastrowid or 0)
    if d.parts is not None:  # the reason's words, re-rendered as evidence grows the totals
        con.execute(_SET_PARTS, (d.parts.to_json(), alert_id))
    insert_rows(con, _ATTACH_MANY, [(alert_id, event_id) for event_id in d.evidence], 2)
    logger.info("alert %d opened: rule %s, %d files", alert_id, d.rule, d.files)
    return alert_id


_SET_PARTS = "UPDATE alerts SET details = ? WHERE alert_id = ?"
_GROWN = "SELECT files, bytes, first_ns, last_ns, details FROM alerts WHERE alert_id = ?"
_SET_REASON = "UPDATE alerts SET reason = ?, details = ? WHERE alert_id = ?"


def rewrite_reason(con: sqlite3.Connection, alert_id: AlertId, parts: ReasonParts) -> None:
    """Re-render a threshold alert's reason from its current totals (issue 2: it must not
    say "20 files" when the alert holds 25), merging `parts` into the words it keeps.

    Only alerts opened with their parts stored (`details`, collector.reasons) are rewritten;
    others (opened by an older collector, or a follow-up of a closed alert) keep their line.
    """
    row = con.execute(_GROWN, (alert_id,)).fetchone()
    if row is None or not row[4]:
        return
    files, size, first_ns, last_ns, details = row
    stored = ReasonParts.from_json(details)
    if stored is None:
        return
    merged = stored.merge(parts)
    text = details if merged is stored else merged.to_json()
    con.execute(_SET_REASON, (merged.render(files, size, first_ns, last_ns), text, alert_id))


def add_evidence(
    con: sqlite3.Connection, d: EvidenceAdded, ev: StoredEvent | None, now_ns: int
) -> None:
    """Attach an event to its group's alert and grow the alert's totals once per event.

    `ev` is the event when the caller has it at hand, else it is read back.
    """
    if ev is None:
        sql = "SELECT observed_at_ns, CASE dest_size WHEN 0 THEN source_size ELSE dest_size END"
        one = con.execute(sql + " FROM events WHERE event_id = ?", (d.event_id,)).fetchone()
        if one is None:
            raise StoreError(f"evidence event {d.event_id} is not stored")
        observed_ns, size = one
    else:
        observed_ns, size = ev.observed_at_ns, ev.size
    alert_id = _evidence_alert(con, d, observed_ns, now_ns)
    if alert_id is None:
        logger.warning("evidence %s for rule %s has no alert; dropped", d.event_id, d.rule)
        return
    added = con.execute(_ATTACH, (alert_id, d.event_id)).rowcount
    grow = (added, size * added, observed_ns, observed_ns, d.hot_until_ns, now_ns, alert_id)
    con.execute(_GROW, grow)
    if d.parts is not None:
        rewrite_reason(con, alert_id, d.parts)


def _evidence_alert(
    con: sqlite3.Connection, d: EvidenceAdded, observed_ns: int, now_ns: int
) -> AlertId | None:
    """The alert evidence `d` joins: its group's open alert.

    The rules keep a group's window hot, and keep sending evidence, however its alert was
    decided. Once an analyst closed the alert (resolved, false positive), evidence must not
    vanish into it unseen, nor may one closing blind the group while it stays hot: the
    first such event opens a new alert (status new) on the closed one's rule and group,
    which later evidence joins. None when the group never had an alert.
    """
    params = (AlertKind.THRESHOLD.value, d.rule, group_json(d.group))
    found = con.execute(_FIND_ALERT, params).fetchone()
    if found is None:
        return None
    closed, is_open = found
    if is_open:
        return AlertId(closed)
    cur = con.execute(_FOLLOW_UP, (now_ns, observed_ns, d.hot_until_ns, closed))
    alert_id = AlertId(cur.lastrowid or 0)
    logger.info("alert %d was closed; evidence %s opens alert %d", closed, d.event_id, alert_id)
    return alert_id


class AlertWriter:
    """Writes the threshold decisions of one transaction (the batches of a group commit).

    Evidence for the transaction's own events (nearly all of it) is gathered and written by
    `flush`: one multi-row insert of links and one UPDATE per alert, where `add_evidence`
    runs three statements per event, and each alert's reason is re-rendered once. The same
    rows result: an alert's totals grow by sums, minima and maxima, which do not depend on
    the order they are folded in, and a link made earlier in this transaction is not
    counted twice (as INSERT OR IGNORE would not). Evidence for older events (a late event
    made them hot) goes through `add_evidence`.
    """

    def __init__(self, con: sqlite3.Connection, new_events: Mapping[str, StoredEvent]) -> None:
        self._con = con
        self._new = new_events
        """Events inserted by this transaction: none of them is linked to an alert yet."""
        self._alerts: dict[tuple[str, GroupKey], AlertId | None] = {}
        """The alert evidence joins per (rule, group) (`_evidence_alert`); `open` moves it."""
        self._linked: set[tuple[AlertId, str]] = set()
        self._links: list[tuple[AlertId, str]] = []
        self._totals: dict[AlertId, list[int]] = {}
        """alert -> [files, bytes, first_ns, last_ns, hot_until_ns, updated_at_ns] to apply."""
        self._parts: dict[AlertId, ReasonParts] = {}
        """alert -> the words of its new evidence, merged into its reason by `flush`."""
        self.opened: list[AlertId] = []

    def open(self, d: AlertOpened, agent_id: str, now_ns: int) -> AlertId:
        alert_id = open_alert(self._con, d, agent_id, now_ns)
        # The newest open alert of its group from now on, which is what _evidence_alert picks.
        self._alerts[d.rule, d.group] = alert_id
        self._linked.update((alert_id, event_id) for event_id in d.evidence)
        self.opened.append(alert_id)
        return alert_id

    def add(self, d: EvidenceAdded, now_ns: int) -> None:
        ev = self._new.get(d.event_id)
        if ev is None:
            add_evidence(self._con, d, None, now_ns)
            return
        key = (d.rule, d.group)
        if key in self._alerts:
            alert_id = self._alerts[key]
        else:
            t = ev.observed_at_ns
            alert_id = self._alerts[key] = _evidence_alert(self._con, d, t, now_ns)
        if alert_id is None:
            logger.warning("evidence %s for rule %s has no alert; dropped", d.event_id, d.rule)
            return
        if d.parts is not None:
            parts = self._parts.get(alert_id)
            self._parts[alert_id] = d.parts if parts is None else parts.merge(d.parts)
        link = (alert_id, d.event_id)
        if link in self._linked:
            added = size = 0
        else:
            self._linked.add(link)
            self._links.append(link)
            added, size = 1, ev.size
        t = ev.observed_at_ns
        totals = self._totals.get(alert_id)
        if totals is None:
            self._totals[alert_id] = [added, size, t, t, d.hot_until_ns, now_ns]
            return
        totals[0] += added
        totals[1] += size
        if t < totals[2]:
            totals[2] = t
        if t > totals[3]:
            totals[3] = t
        if d.hot_until_ns > totals[4]:
            totals[4] = d.hot_until_ns
        if now_ns > totals[5]:
            totals[5] = now_ns

    def flush(self) -> None:
        """Write the gathered evidence; call once, after the last decision."""
        insert_rows(self._con, _ATTACH_MANY, self._links, 2)
        self._con.executemany(
            _GROW,
            [(*totals, alert_id) for alert_id, totals in self._totals.items()],
        )
        for alert_id, parts in self._parts.items():
            rewrite_reason(self._con, alert_id, parts)
        self._links.clear()
        self._totals.clear()
        self._parts.clear()


def security_alert(
    con: sqlite3.Connection,
    agent_id: str,
    reason_kind: str,
    message: str,
    now_ns: int,
    severity: Severity = Severity.HIGH,
) -> AlertId:
    """Count the refusal on the open alert of (agent, kind), or open one."""
    group = group_json((("agent", agent_id),))
    params = (AlertKind.SECURITY.value, reason_kind, group)
    row = con.execute(_FIND_OPEN_ALERT, params).fetchone()
    if row is not None:
        con.execute(
            "UPDATE alerts SET count = count + 1, reason = ?, updated_at_ns = ?, last_ns = ?"
            " WHERE alert_id = ?",
            (message, now_ns, now_ns, row[0]),
        )
        return AlertId(row[0])
    cur = con.execute(
        _INSERT_ALERT,
        (*params, severity.value, message, now_ns, now_ns, 0, 0, now_ns, now_ns, 0, agent_id),
    )
    logger.warning("security alert %s for agent %s: %s", reason_kind, agent_id, message)
    return AlertId(cur.lastrowid or 0)
