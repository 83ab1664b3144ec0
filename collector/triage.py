"""Triage: the decisions people take on alerts (status, assignee, notes), each one trailed.

Console and CLI share these rules. Role checks are the caller's (the web layer checks the
session's role; the CLI runs as the local administrator). Every change commits together
with its trail entry; a bulk change is one transaction, so it happens to all or to none.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from collector import queries
from collector.errors import NotFoundError, TriageError
from collector.models import AlertStatus
from collector.records import AlertRecord
from collector.trail import Action, Reads, Trail, TrailEntry
from collector.users import Role

if TYPE_CHECKING:
    from collector.store import SqliteStore

__all__ = ["CLOSED", "OPEN", "TRANSITIONS", "Note", "NotesCheck", "Triage", "alert_target"]

logger = logging.getLogger(__name__)

S = AlertStatus
TRANSITIONS: Mapping[AlertStatus, frozenset[AlertStatus]] = {
    S.NEW: frozenset({S.IN_PROGRESS, S.RESOLVED, S.FALSE_POSITIVE}),
    S.IN_PROGRESS: frozenset({S.RESOLVED, S.FALSE_POSITIVE}),
    S.RESOLVED: frozenset({S.IN_PROGRESS}),  # reopen
    S.FALSE_POSITIVE: frozenset({S.IN_PROGRESS}),  # reopen
}
"""Where each status may go. Anything else (including to the same status) is refused."""
OPEN = frozenset({S.NEW, S.IN_PROGRESS})
"""Statuses in which an alert collects further evidence (collector.queries)."""
CLOSED = frozenset({S.RESOLVED, S.FALSE_POSITIVE})
"""Statuses that need a reason to enter."""

MAX_NOTE = 10_000
MAX_REASON = 2_000
_ALLOWED_CONTROLS = frozenset("\t\n\r")


def alert_target(alert_id: int) -> str:
    """How trail entries name an alert."""
    return f"alert:{int(alert_id)}"


@dataclass(frozen=True)
class Note:
    """A note on an alert; notes are never edited or removed."""

    note_id: int
    alert_id: int
    author: str
    at_ns: int
    text: str


@dataclass(frozen=True)
class NotesCheck:
    """Outcome of `Triage.verify_notes`."""

    ok: bool
    count: int
    """Notes stored."""
    problems: tuple[str, ...]
    """One line per note that differs from, lacks or outlived its trail entry."""


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _status(status: str) -> AlertStatus:
    try:
        return AlertStatus(status)
    except ValueError:
        names = ", ".join(s.value for s in AlertStatus)
        raise TriageError(f"unknown status {status!r}: use one of {names}") from None


def _text(text: str, what: str, limit: int) -> str:
    text = text.strip()
    if not text:
        raise TriageError(f"the {what} is empty")
    if len(text) > limit:
        raise TriageError(f"the {what} is too long: {len(text)} characters, at most {limit}")
    if any((ord(ch) < 0x20 and ch not in _ALLOWED_CONTROLS) or ch == "\x7f" for ch in text):
        raise TriageError(f"the {what} holds control characters")
    return text


def _unique(ids: Iterable[int]) -> list[int]:
    return list(dict.fromkeys(int(i) for i in ids))


class Triage:
    """Changes alerts' status and assignee and adds notes, writing the trail as it goes."""

    def __init__(self, store: SqliteStore, trail: Trail, *, reads: Reads | None = None) -> None:
        self._store = store
        self._trail = trail
        self._reads = reads or store._read
        """See `collector.trail.Reads`."""

    # -- status --------------------------------------------------------------------

    def set_status(
        self, alert_id: int, status: str, *, actor: str, reason: str | None, now_ns: int
    ) -> AlertRecord:
        """Move an alert along TRANSITIONS; closing (resolved, false_positive) needs a reason.

        TriageError for a transition the table refuses or a missing reason,
        NotFoundError for an unknown alert.
        """
        (record,) = self.bulk_status([alert_id], status, actor=actor, reason=reason, now_ns=now_ns)
        return record

    def bulk_status(
        self,
        ids: Iterable[int],
        status: str,
        *,
        actor: str,
        reason: str | None,
        now_ns: int,
    ) -> list[AlertRecord]:
        """`set_status` for each alert, one trail entry each, in one transaction: if any
        alert refuses, none changes."""
        to = _status(status)
        why = None if reason is None or not reason.strip() else _text(reason, "reason", MAX_REASON)
        if to in CLOSED and why is None:
            raise TriageError(f"closing an alert as {to.value} needs a reason")
        alert_ids = _unique(ids)
        with self._store._write() as con:
            for alert_id in alert_ids:
                self._change_status(con, alert_id, to, why, actor, now_ns)
            return [self._record(con, alert_id) for alert_id in alert_ids]

    def _change_status(
        self,
        con: sqlite3.Connection,
        alert_id: int,
        to: AlertStatus,
        reason: str | None,
        actor: str,
        now_ns: int,
    ) -> None:
        row = con.execute("SELECT status FROM alerts WHERE alert_id = ?", (alert_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"no alert {alert_id}")
        current = AlertStatus(row[0])
        allowed = TRANSITIONS[current]
        if to not in allowed:
            if to is current:
                raise TriageError(f"alert {alert_id} is {current.value} already")
            ways = " or ".join(sorted(s.value for s in allowed))
            raise TriageError(
                f"alert {alert_id} is {current.value}: it can go to {ways}, not {to.value}"
            )
        sql = (
            "UPDATE alerts SET status = ?, updated_at_ns = max(updated_at_ns, ?) WHERE alert_id = ?"
        )
        con.execute(sql, (to.value, now_ns, alert_id))
        detail: dict[str, object] = {"from": current.value, "to": to.value}
        if reason is not None:
            detail["reason"] = reason
        self._trail.append(
            con, actor=actor, action=Action.ALERT_STATUS, target=alert_target(alert_id),
            detail=detail, now_ns=now_ns,
        )  # fmt: skip
        logger.info("alert %d: %s -> %s by %r", alert_id, current.value, to.value, actor)

    # -- assignee ------------------------------------------------------------------

    def assign(
        self, alert_id: int, assignee: str | None, *, actor: str, now_ns: int
    ) -> AlertRecord:
        """Give an alert to an unlocked analyst or admin, or to nobody (None).

        The trail records a change only; assigning the current assignee again is a no-op.
        """
        (record,) = self.bulk_assign([alert_id], assignee, actor=actor, now_ns=now_ns)
        return record

    def bulk_assign(
        self, ids: Iterable[int], assignee: str | None, *, actor: str, now_ns: int
    ) -> list[AlertRecord]:
        """`assign` for each alert in one transaction: all of them or none."""
        alert_ids = _unique(ids)
        with self._store._write() as con:
            who = None if assignee is None else self._assignee(con, assignee)
            for alert_id in alert_ids:
                sql = "SELECT assignee FROM alerts WHERE alert_id = ?"
                row = con.execute(sql, (alert_id,)).fetchone()
                if row is None:
                    raise NotFoundError(f"no alert {alert_id}")
                if row[0] == who:
                    continue
                con.execute(
                    "UPDATE alerts SET assignee = ?, updated_at_ns = max(updated_at_ns, ?)"
                    " WHERE alert_id = ?",
                    (who, now_ns, alert_id),
                )
                self._trail.append(
                    con, actor=actor, action=Action.ALERT_ASSIGN, target=alert_target(alert_id),
                    detail={"from": row[0], "to": who}, now_ns=now_ns,
                )  # fmt: skip
            return [self._record(con, alert_id) for alert_id in alert_ids]

    @staticmethod
    def _assignee(con: sqlite3.Connection, name: str) -> str:
        sql = "SELECT name, role, locked FROM users WHERE name = ?"
        row = con.execute(sql, (name,)).fetchone()
        if row is None:
            raise TriageError(f"cannot assign to {name[:80]!r}: no such user")
        if row[2]:
            raise TriageError(f"cannot assign to {row[0]!r}: the user is locked")
        if not Role(row[1]).may_triage:
            raise TriageError(f"cannot assign to {row[0]!r}: a {row[1]} cannot triage alerts")
        return str(row[0])

    # -- notes and history ---------------------------------------------------------

    def add_note(self, alert_id: int, text: str, *, actor: str, now_ns: int) -> Note:
        """Append a note (1-10,000 characters, outer whitespace dropped)."""
        body = _text(text, "note", MAX_NOTE)
        with self._store._write() as con:
            if (
                con.execute("SELECT 1 FROM alerts WHERE alert_id = ?", (alert_id,)).fetchone()
                is None
            ):
                raise NotFoundError(f"no alert {alert_id}")
            cur = con.execute(
                "INSERT INTO alert_notes (alert_id, author, at_ns, text) VALUES (?, ?, ?, ?)",
                (alert_id, actor, now_ns, body),
            )
            note_id = cur.lastrowid or 0
            # The digest ties the trail to the note's text: an edit shows against the chain.
            digest = _digest(body)
            self._trail.append(
                con, actor=actor, action=Action.ALERT_NOTE, target=alert_target(alert_id),
                detail={"note_id": note_id, "chars": len(body), "sha256": digest}, now_ns=now_ns,
            )  # fmt: skip
        return Note(note_id, alert_id, actor, now_ns, body)

    def notes(self, alert_id: int) -> list[Note]:
        """The alert's notes, oldest first."""
        with self._reads() as con:
            rows = con.execute(
                "SELECT note_id, alert_id, author, at_ns, text FROM alert_notes"
                " WHERE alert_id = ? ORDER BY note_id",
                (alert_id,),
            ).fetchall()
        return [Note(*row) for row in rows]

    def verify_notes(self) -> NotesCheck:
        """Compare every stored note with the digest its trail entry recorded.

        The notes table refuses updates and deletes by trigger; this catches a note edited,
        removed or slipped in with the triggers dropped. The trail entries themselves are
        `Trail.verify`'s: a digest changed to match an edited note breaks the chain.
        """
        with self._reads() as con:
            con.execute("BEGIN")  # one snapshot of both tables
            try:
                notes = con.execute(
                    "SELECT note_id, alert_id, text FROM alert_notes ORDER BY note_id"
                ).fetchall()
                entries = con.execute(
                    "SELECT seq, target, detail FROM trail WHERE action = ? ORDER BY seq",
                    (Action.ALERT_NOTE.value,),
                ).fetchall()
            finally:
                con.execute("COMMIT")
        recorded: dict[object, tuple[int, object, object]] = {}
        for seq, target, detail in entries:
            try:
                fields = json.loads(detail)
                recorded[fields["note_id"]] = (seq, target, fields["sha256"])
            except (TypeError, ValueError, KeyError):
                continue  # an unreadable entry is Trail.verify's to report
        problems = []
        for note_id, alert_id, text in notes:
            found = recorded.pop(note_id, None)
            if found is None:
                problems.append(f"note {note_id} on alert {alert_id} has no trail entry")
            elif (found[1], found[2]) != (alert_target(alert_id), _digest(str(text))):
                problems.append(
                    f"note {note_id} on alert {alert_id} is not what trail entry {found[0]}"
                    " recorded"
                )
        for note_id, (seq, target, _) in recorded.items():
            problems.append(f"note {note_id} on {target} (trail entry {seq}) is missing")
        return NotesCheck(not problems, len(notes), tuple(problems))

    def history(self, alert_id: int) -> list[TrailEntry]:
        """The trail entries about the alert, oldest first."""
        return self._trail.history(alert_target(alert_id))

    @staticmethod
    def _record(con: sqlite3.Connection, alert_id: int) -> AlertRecord:
        record = queries.get_alert(con, alert_id)
        if record is None:  # read inside the transaction that just changed it
            raise NotFoundError(f"no alert {alert_id}")
        return record
