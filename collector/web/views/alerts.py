"""Alerts: the list an analyst starts the day with, one alert's evidence, and decisions.

GET /alerts, GET /alerts/{id}                      -> reads (read-only connections)
POST /alerts/{id}/status|assign|notes|export, /alerts/bulk -> collector.triage / trail
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import Response

from collector.errors import NotFoundError
from collector.models import AlertStatus, DeviceView, ProcessView, Severity, StoredEvent
from collector.records import AlertRecord
from collector.render import display_path, path_b64
from collector.triage import TRANSITIONS
from collector.users import Role, Session
from collector.views import alert_json, iso
from collector.web import filters, longview, timeline
from collector.web.context import console_of, guarded, page, redirect, signed_in
from collector.web.errors import BadRequestError
from collector.web.reads import AlertSummary
from collector.web.views.longalert import long_view

FILES_PER_PAGE = 100
CLOSED = (AlertStatus.RESOLVED, AlertStatus.FALSE_POSITIVE)
"""In the order the close form offers them."""


def alert_list(request: Request) -> Response:
    session = signed_in(request)
    console = console_of(request)
    f = filters.AlertFilter.parse(request.query_params)
    paging = filters.PageRequest.parse(request.query_params)
    result = console.reader.alerts(f, paging)
    return page(
        request,
        "alerts.html",
        session,
        f=f,
        paging=paging,
        result=result,
        pages=paging.pages(result.total),
        statuses=list(AlertStatus),
        severities=list(Severity),
        rules=sorted(
            {r.name for r in console.policy.rules} | {r.name for r in console.policy.long_rules}
        ),
        assignees=_assignees(request),
        closing=CLOSED,
    )


def _assignees(request: Request) -> list[str]:
    users = console_of(request).users.list()
    return [u.name for u in users if not u.locked and u.role in (Role.ANALYST, Role.ADMIN)]


def _alert(request: Request) -> AlertSummary:
    raw = request.path_params["alert_id"]  # the route's int: digits, of any length
    alert = console_of(request).reader.alert(raw) if raw < filters.INT64 else None
    if alert is None:
        raise NotFoundError(f"no alert {raw}")
    return alert


def _processes(events: Sequence[StoredEvent]) -> list[tuple[ProcessView, int]]:
    counts = Counter(e.process for e in events if e.process is not None)
    return counts.most_common(5)


@dataclass(frozen=True)
class DeviceUse:
    device: DeviceView
    events: int
    """Events of the page on it."""
    user: str
    """Who copied to it on this page (the most frequent)."""
    first_ns: int | None
    """When that user first copied to it, as far as the store goes back."""


def _devices(request: Request, events: Sequence[StoredEvent]) -> list[DeviceUse]:
    counts = Counter(e.device for e in events if e.device is not None)
    uses = []
    for device, n in counts.most_common(5):
        users = Counter(e.user for e in events if e.device == device and e.user)
        user = users.most_common(1)[0][0] if users else ""
        first = console_of(request).reader.device_first_used(user, device) if user else None
        uses.append(DeviceUse(device, n, user, first))
    return uses


def _ending(request: Request, alert: AlertSummary) -> str:
    """How an earlier alert ended: the reason given when it was last closed."""
    if alert.status not in CLOSED:
        return ""
    trail = console_of(request).trail
    for entry in trail.entries(target=f"alert:{alert.alert_id}", limit=20):
        if entry.action == "alert_status" and entry.detail.get("to") == alert.status.value:
            return str(entry.detail.get("reason") or "")
    return ""


def alert_page(request: Request) -> Response:
    session = signed_in(request)
    console = console_of(request)
    alert = _alert(request)
    record = console.reader.alert_record(alert.alert_id)
    fpage = filters.PageRequest.parse(request.query_params, default_size=FILES_PER_PAGE)
    events = console.reader.alert_events(alert.alert_id, fpage.size, fpage.offset)
    rule = next((r for r in console.policy.rules if r.name == alert.rule), None)
    long = None if record is None else long_view(console, alert, record)
    line = None
    if long is None:  # a burst (or security) alert: its page as it always was
        line = timeline.build(
            console.reader.alert_points(alert.alert_id),
            threshold_bytes=None if rule is None else rule.threshold.bytes,
            threshold_files=None if rule is None else rule.threshold.files,
        )
    earlier = console.reader.earlier_alerts(alert)
    raw = page_json(record) if record is not None else {}
    return page(
        request,
        "alert.html",
        session,
        alert=alert,
        rule=rule,
        timeline=line,
        long=long,
        long_rule=(
            longview.describe(long.rule, console.policy.labels)
            if long is not None and long.rule is not None
            else ""
        ),
        events=events,
        fpage=fpage,
        fpages=fpage.pages(alert.files),
        agent=console.reader.agent(alert.agent_id),
        processes=_processes(events),
        devices=_devices(request, events),
        earlier=[(a, _ending(request, a)) for a in earlier],
        notes=console.triage.notes(alert.alert_id),
        history=console.triage.history(alert.alert_id),
        raw_json=json.dumps(raw, indent=2, sort_keys=True, default=str),
        next_statuses=sorted(TRANSITIONS[alert.status]),
        closing=CLOSED,
        assignees=_assignees(request),
    )


RAW_EVIDENCE = 1000
"""Event ids the page's raw JSON lists at most; the JSON export has them all."""


def page_json(record: AlertRecord) -> dict[str, object]:
    """The alert's raw JSON as the page shows it: an alert keeps growing while open, and
    a million evidence ids would make its page too big to open."""
    doc = alert_json(record, evidence=None)
    if len(record.evidence) > RAW_EVIDENCE:
        doc["evidence"] = list(record.evidence[:RAW_EVIDENCE])
        doc["evidence_not_shown"] = len(record.evidence) - RAW_EVIDENCE
    return doc


def _status_arg(form: FormData) -> AlertStatus:
    try:
        return AlertStatus(filters.text(form, "status"))
    except ValueError as e:
        raise BadRequestError(
            "status: expected new, in_progress, resolved or false_positive"
        ) from e


@guarded(Role.ANALYST)
def set_status(request: Request, session: Session, form: FormData) -> Response:
    console = console_of(request)
    alert = _alert(request)
    reason = filters.text(form, "reason") or None
    console.triage.set_status(
        alert.alert_id, _status_arg(form), actor=session.user, reason=reason,
        now_ns=console.clock(),
    )  # fmt: skip
    return redirect(f"/alerts/{alert.alert_id}")


@guarded(Role.ANALYST)
def assign(request: Request, session: Session, form: FormData) -> Response:
    console = console_of(request)
    alert = _alert(request)
    who = filters.text(form, "assignee")
    assignee = session.user if who == "@me" else (who or None)
    console.triage.assign(alert.alert_id, assignee, actor=session.user, now_ns=console.clock())
    return redirect(f"/alerts/{alert.alert_id}")


@guarded(Role.ANALYST)
def add_note(request: Request, session: Session, form: FormData) -> Response:
    console = console_of(request)
    alert = _alert(request)
    note = form.get("note")
    if not isinstance(note, str):
        raise BadRequestError("note: expected text")
    console.triage.add_note(alert.alert_id, note, actor=session.user, now_ns=console.clock())
    return redirect(f"/alerts/{alert.alert_id}#notes")


@guarded(Role.ANALYST)
def bulk(request: Request, session: Session, form: FormData) -> Response:
    console = console_of(request)
    ids = filters.ids(form)
    op = filters.text(form, "op")
    now = console.clock()
    if op == "status":
        reason = filters.text(form, "reason") or None
        console.triage.bulk_status(
            ids, _status_arg(form), actor=session.user, reason=reason, now_ns=now
        )
    elif op == "assign":
        who = filters.text(form, "assignee")
        assignee = session.user if who == "@me" else (who or None)
        console.triage.bulk_assign(ids, assignee, actor=session.user, now_ns=now)
    else:
        raise BadRequestError("op: expected status or assign")
    return redirect(_back(form))


MAX_BACK = 4096


def _back(form: FormData) -> str:
    """The alerts page the bulk form was on. Read after the change is made, so it never
    refuses: a filter's query string may be long (every status and severity, user, host,
    destination, times), and one it cannot use just leads to the default view."""
    back = form.get("back")
    if not isinstance(back, str) or not back or len(back) > MAX_BACK:
        return "/alerts"
    return "/alerts?" + back  # a query string only: the path stays ours


CSV_COLUMNS = (
    "alert_id", "event_id", "observed_at", "user", "host", "action", "label", "size",
    "source_path", "source_sha256", "dest_path", "dest_sha256", "destination_class",
    "device", "process", "source_path_b64", "dest_path_b64",
)  # fmt: skip


def _cell(value: object) -> object:
    """Neutralise spreadsheet formulas: a file name may start with = + - @ on purpose."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def _csv(alert_id: int, events: Sequence[StoredEvent]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    for e in events:
        dev = e.device
        device = " ".join(x for x in (dev.vendor, dev.model, dev.serial) if x) if dev else ""
        proc = display_path(e.process.exe or e.process.name.encode()) if e.process else ""
        row = (
            alert_id, e.event_id, iso(e.observed_at_ns), e.user, e.host, e.action, e.label,
            e.size, display_path(e.source_path), e.source_sha256, display_path(e.dest_path),
            e.dest_sha256, e.destination_class, device, proc, path_b64(e.source_path),
            path_b64(e.dest_path),
        )  # fmt: skip
        writer.writerow([_cell(v) for v in row])
    return out.getvalue()


@guarded(Role.ANALYST)
def export(request: Request, session: Session, form: FormData) -> Response:
    """The alert and all its evidence as a download; every export is a trail entry."""
    console = console_of(request)
    alert = _alert(request)
    fmt = filters.text(form, "format")
    if fmt not in ("csv", "json"):
        raise BadRequestError("format: expected csv or json")
    record = console.reader.alert_record(alert.alert_id)
    if record is None:
        raise NotFoundError(f"no alert {alert.alert_id}")
    events = console.reader.alert_events(alert.alert_id, -1)
    if fmt == "csv":
        body, media = _csv(alert.alert_id, events), "text/csv; charset=utf-8"
    else:
        doc = alert_json(record, evidence=events)
        body, media = json.dumps(doc, indent=2, sort_keys=True, default=str), "application/json"
    console.trail.append(
        None,
        actor=session.user,
        action="alert_export",
        target=f"alert:{alert.alert_id}",
        detail={"format": fmt, "events": len(events)},
        now_ns=console.clock(),
    )
    name = f"exfilwatch-alert-{alert.alert_id}.{fmt}"
    return Response(
        body,
        media_type=media,
        headers={"content-disposition": f'attachment; filename="{name}"'},
    )
