"""How stored records look to people and scripts: JSON objects (`--json`) and text lines.

Every file name goes through `render.display_path`; JSON also carries the exact bytes as base64.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from collector.models import StoredEvent
from collector.records import AgentRecord, AlertRecord
from collector.render import display_path, display_text, human_bytes, path_b64


def iso(ns: int) -> str | None:
    if not ns:
        return None
    return dt.datetime.fromtimestamp(ns / 1e9, dt.UTC).isoformat(timespec="milliseconds")


def agent_json(a: AgentRecord) -> dict[str, object]:
    return {
        "agent_id": a.agent_id,
        "hostname": a.hostname,
        "agent_version": a.agent_version,
        "enrolled_at": iso(a.enrolled_at_ns),
        "last_seen": iso(a.last_seen_ns),
        "revoked": a.revoked,
        "policy_revision": a.policy_revision,
        "spool_depth": a.spool_depth,
        "coverage_gaps": a.coverage_gaps,
        "cpu_percent": a.cpu_percent,
        "rss_bytes": a.rss_bytes,
        "key_id": a.key_id.hex(),
    }


def _file(path: bytes, size: int, sha256: str) -> dict[str, object] | None:
    if not path:
        return None
    return {"path": display_path(path), "path_b64": path_b64(path), "size": size, "sha256": sha256}


def event_json(e: StoredEvent) -> dict[str, object]:
    row: dict[str, object] = {
        "event_id": e.event_id,
        "agent_id": e.agent_id,
        "batch_seq": e.batch_seq,
        "seq": e.seq,
        "observed_at": iso(e.observed_at_ns),
        "observed_at_ns": e.observed_at_ns,
        "action": e.action,
        "host": e.host,
        "user": e.user,
        "label": e.label,
        "label_source": e.label_source,
        "source": _file(e.source_path, e.source_size, e.source_sha256),
        "destination": _file(e.dest_path, e.dest_size, e.dest_sha256),
        "destination_class": e.destination_class or None,
        "detection": e.detection or None,
        "attribution": e.attribution or None,
        "process": None,
        "device": None,
        "gap": {"reason": e.gap_reason, "count": e.gap_count} if e.gap_reason else None,
        "count": e.access_count,
        "archive_member": (
            {"name": display_path(e.archive_member), "name_b64": path_b64(e.archive_member)}
            if e.archive_member
            else None
        ),
    }
    if e.process is not None:
        p = e.process
        row["process"] = {
            "pid": p.pid,
            "start_time_ns": p.start_time_ns,
            "name": display_path(p.name.encode()),
            "exe": display_path(p.exe),
            "cmdline": [display_path(arg) for arg in p.cmdline],
            "ppid_chain": list(p.ppid_chain),
        }
    if e.device is not None:
        d = e.device
        row["device"] = {
            "vendor": d.vendor,
            "model": d.model,
            "serial": d.serial,
            "fs_uuid": d.fs_uuid,
            "fs_type": d.fs_type,
            "mount_point": display_path(d.mount_point),
            "remote": d.remote or None,
        }
    return row


def event_line(e: StoredEvent) -> str:
    when = iso(e.observed_at_ns) or "-"
    if e.action == "coverage_gap":
        return f"{when}  {e.host}  coverage_gap {e.gap_reason} x{e.gap_count}"
    src = display_path(e.source_path) if e.source_path else "-"
    dst = _destination_text(e) if e.dest_path else "-"
    return (
        f"{when}  {e.host}  {e.user or '?'}  {e.action}  {e.label or '-'}  "
        f"{human_bytes(e.size)}  {src} -> {dst}  [{e.destination_class or '-'}]"
    )


def _destination_text(e: StoredEvent) -> str:
    """The destination path, and the member's name when the copy sits inside an archive."""
    dst = display_path(e.dest_path)
    if e.archive_member:
        return f"{dst} (member {display_path(e.archive_member)})"
    return dst


def alert_json(a: AlertRecord, evidence: Sequence[StoredEvent] | None) -> dict[str, object]:
    row: dict[str, object] = {
        "alert_id": a.alert_id,
        "kind": a.kind,
        "rule": a.rule,
        "group": dict(a.group),
        "severity": a.severity,
        "status": a.status,
        "reason": a.reason,
        "created_at": iso(a.created_at_ns),
        "updated_at": iso(a.updated_at_ns),
        "files": a.files,
        "bytes": a.bytes,
        "first_event_at": iso(a.first_ns),
        "last_event_at": iso(a.last_ns),
        "agent_id": a.agent_id,
        "count": a.count,
        "assignee": a.assignee,
        "evidence": list(a.evidence),
    }
    if evidence is not None:
        row["events"] = [event_json(e) for e in evidence]
    return row


def alert_text(a: AlertRecord, events: Sequence[StoredEvent]) -> str:
    lines = [
        f"Alert #{a.alert_id}  {a.severity.upper()}  {a.status}  ({a.kind}: {a.rule})",
        f"  {a.reason}",
    ]
    if a.group:
        lines.append("  group: " + "  ".join(f"{k}={v}" for k, v in a.group))
    if a.kind == "security":
        lines.append(f"  agent: {a.agent_id}  seen {a.count} time(s)  {a.details}")
    if a.first_ns:
        lines.append(
            f"  events: {iso(a.first_ns)} .. {iso(a.last_ns)}  "
            f"{a.files} files, {human_bytes(a.bytes)}"
        )
    if events:
        lines.append(f"  files ({len(events)}):")
        for e in events:
            proc = e.process.name if e.process is not None and e.process.name else e.attribution
            dev = ""
            if e.device is not None and (e.device.vendor or e.device.model):
                dev = f" {e.device.vendor} {e.device.model} {e.device.serial}".rstrip()
            elif e.device is not None and e.device.remote:
                dev = f" {e.device.remote}"
            lines.append(
                f"    {iso(e.observed_at_ns)}  {e.label:<12} {human_bytes(e.size):>10}  "
                f"{display_path(e.source_path)} -> {_destination_text(e)}  "
                f"[{e.destination_class}{dev}; {e.detection}; {e.user or '?'}; "
                f"{display_path(proc.encode())}]"
            )
            lines.append(f"      sha256 {e.dest_sha256 or e.source_sha256}")
    # Hosts, users, labels, device names and group values come from agents and devices:
    # nothing of them may reach a terminal as a control sequence.
    return "".join(display_text(line) + "\n" for line in lines)
