"""The trail: an append-only, hash-chained log of what people did in the console and CLI.

Not `collector.audit`, which re-proves stored batches. Each entry's hash covers the one
before it, so an edited, inserted or removed entry breaks the chain from there on
(`Trail.verify`). Writers append inside the transaction of the change they record.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from collector.errors import StoreError, TrailError

if TYPE_CHECKING:
    from collector.store import SqliteStore

__all__ = ["GENESIS", "Action", "Reads", "Trail", "TrailCheck", "TrailEntry", "entry_hash"]

logger = logging.getLogger(__name__)

DOMAIN = b"exfilwatch.trail.v1\x00"
"""Prefix of every hashed entry, so a trail hash is never valid as any other hash."""
GENESIS = bytes(32)
"""The `prev_hash` of the first entry."""
MAX_FIELD = 256
"""Longest actor or target kept; longer text (an attempted login name) is cut."""


class Action(StrEnum):
    """What a person did. The trail refuses any other action."""

    LOGIN = "login"
    LOGIN_FAILED = "login_failed"
    LOGOUT = "logout"
    ALERT_STATUS = "alert_status"
    ALERT_ASSIGN = "alert_assign"
    ALERT_NOTE = "alert_note"
    ALERT_EXPORT = "alert_export"
    USER_ADD = "user_add"
    USER_LOCK = "user_lock"
    USER_UNLOCK = "user_unlock"
    USER_PASSWORD = "user_password"  # noqa: S105 (an action name, not a password)
    AGENT_REVOKE = "agent_revoke"
    POLICY_CHANGE = "policy_change"


@dataclass(frozen=True)
class TrailEntry:
    """One recorded action. Actor and target are free text: escape them when shown."""

    seq: int
    """1, 2, 3, ... with no gaps."""
    at_ns: int
    actor: str
    """Who: a console user name, or "cli:" and the OS user for the command line."""
    action: str
    """An `Action` value (rows written behind the trail's back may hold anything)."""
    target: str
    """What it acted on: "alert:12", "user:alice", "agent:ag-1f..."."""
    detail: Mapping[str, Any]
    """The specifics, e.g. {"from": "new", "to": "resolved", "reason": "..."}; read-only."""
    prev_hash: bytes
    hash: bytes

    @property
    def hash_hex(self) -> str:
        return self.hash.hex()


@dataclass(frozen=True)
class TrailCheck:
    """Outcome of `Trail.verify`."""

    ok: bool
    count: int
    """Entries in the trail."""
    first_bad_seq: int | None
    """The first entry that does not verify; None when all do."""
    message: str


def canonical_detail(detail: Mapping[str, object]) -> str:
    """The detail as the JSON text stored and hashed: sorted keys, compact, ASCII."""
    try:
        return json.dumps(
            dict(detail), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
        )
    except (TypeError, ValueError) as e:
        raise TrailError(f"trail detail is not plain JSON: {e}") from e


def entry_hash(
    prev_hash: bytes, seq: int, at_ns: int, actor: str, action: str, target: str, detail: str
) -> bytes:
    """SHA-256 over the domain prefix and each field, length-prefixed (no two encodings
    of different entries are the same bytes). `detail` is the canonical JSON text."""
    h = hashlib.sha256(DOMAIN)
    for field in (
        prev_hash,
        seq.to_bytes(8, "big", signed=True),
        at_ns.to_bytes(8, "big", signed=True),
        actor.encode("utf-8", "surrogatepass"),
        action.encode("utf-8"),
        target.encode("utf-8", "surrogatepass"),
        detail.encode("ascii"),
    ):
        h.update(len(field).to_bytes(8, "big"))
        h.update(field)
    return h.digest()


Reads = Callable[[], AbstractContextManager[sqlite3.Connection]]
"""Where the console's domain objects (Trail, Users, Sessions, Triage) get a connection to
read with: the store's own `_read` by default (one connection per thread, kept until the
store closes: right for the CLI and the gRPC server's fixed threads), or the console's
pool (`collector.web.reads.Reader.connection`), whose worker threads come and go."""

_COLUMNS = "seq, at_ns, actor, action, target, detail, prev_hash, hash"
_INSERT = f"INSERT INTO trail ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"  # noqa: S608
_HEAD = "SELECT seq, hash FROM trail ORDER BY seq DESC LIMIT 1"


def _detail(text: object) -> Mapping[str, Any]:
    """The stored detail JSON, read-only; a row tampered into non-JSON still lists."""
    try:
        value = json.loads(text) if isinstance(text, str) else None
    except ValueError:
        value = None
    if not isinstance(value, dict):
        value = {"unreadable": repr(text)}
    return MappingProxyType(value)


def _entry(row: Any) -> TrailEntry:
    seq, at_ns, actor, action, target, detail, prev_hash, digest = row
    return TrailEntry(seq, at_ns, actor, action, target, _detail(detail), prev_hash, digest)


def _clip(text: str) -> str:
    return text if len(text) <= MAX_FIELD else text[: MAX_FIELD - 3] + "..."


class Trail:
    """Appends to and reads the trail table of a `SqliteStore`."""

    def __init__(self, store: SqliteStore, *, reads: Reads | None = None) -> None:
        self._store = store
        self._reads = reads or store._read

    def append(
        self,
        conn_or_none: sqlite3.Connection | None,
        *,
        actor: str,
        action: str,
        target: str,
        detail: Mapping[str, object],
        now_ns: int,
    ) -> TrailEntry:
        """Record one action; returns the entry as stored.

        Pass the connection of the write transaction that makes the change (from the
        store's `_write()`), so the change and its entry commit or roll back together.
        With None the entry gets a transaction of its own; never pass None while this
        thread holds a write transaction (the store's lock is not re-entrant).
        """
        try:
            act = Action(action)
        except ValueError:
            raise TrailError(f"unknown trail action {action!r}") from None
        if not actor.strip():
            raise TrailError("a trail entry needs an actor")
        if not target.strip():
            raise TrailError("a trail entry needs a target")
        actor, target = _clip(actor), _clip(target)
        detail_json = canonical_detail(detail)
        if conn_or_none is None:
            with self._store._write() as con:
                return self._append(con, actor, act, target, detail_json, now_ns)
        if not conn_or_none.in_transaction:
            raise TrailError("Trail.append needs the caller's open write transaction")
        try:
            return self._append(conn_or_none, actor, act, target, detail_json, now_ns)
        except sqlite3.Error as e:
            raise StoreError(f"database error: {e}") from e

    @staticmethod
    def _append(
        con: sqlite3.Connection, actor: str, action: Action, target: str, detail: str, now_ns: int
    ) -> TrailEntry:
        head = con.execute(_HEAD).fetchone()
        seq, prev = (1, GENESIS) if head is None else (head[0] + 1, head[1])
        digest = entry_hash(prev, seq, now_ns, actor, action.value, target, detail)
        con.execute(_INSERT, (seq, now_ns, actor, action.value, target, detail, prev, digest))
        # %r: actor and target are free text (a failed login's attempted name).
        logger.debug("trail %d: %r %s %r", seq, actor, action.value, target)
        return TrailEntry(seq, now_ns, actor, action, target, _detail(detail), prev, digest)

    def entries(
        self,
        *,
        target: str | None = None,
        actor: str | None = None,
        limit: int = 100,
        before_seq: int | None = None,
    ) -> list[TrailEntry]:
        """Newest first, at most `limit`; page on with `before_seq` = the last seq seen."""
        where, params = self._filter(target=target, actor=actor, before_seq=before_seq)
        sql = f"SELECT {_COLUMNS} FROM trail{where} ORDER BY seq DESC LIMIT ?"  # noqa: S608
        with self._reads() as con:
            return [_entry(row) for row in con.execute(sql, (*params, max(0, limit)))]

    def history(self, target: str) -> list[TrailEntry]:
        """Every entry about `target`, oldest first."""
        where, params = self._filter(target=target, actor=None, before_seq=None)
        sql = f"SELECT {_COLUMNS} FROM trail{where} ORDER BY seq"  # noqa: S608
        with self._reads() as con:
            return [_entry(row) for row in con.execute(sql, params)]

    @staticmethod
    def _filter(
        *, target: str | None, actor: str | None, before_seq: int | None
    ) -> tuple[str, tuple[object, ...]]:
        # Only these fixed fragments are joined into the SQL; values are bound.
        clauses: list[str] = []
        params: list[object] = []
        for clause, value in (
            ("target = ?", target),
            ("actor = ?", actor),
            ("seq < ?", before_seq),
        ):
            if value is not None:
                clauses.append(clause)
                params.append(value)
        return (" WHERE " + " AND ".join(clauses) if clauses else ""), tuple(params)

    def verify(self) -> TrailCheck:
        """Re-hash every entry in order; name the first one that does not verify.

        Catches an entry edited, inserted or removed in the middle (even with the
        append-only triggers dropped). Removing entries at the end, or re-hashing the
        whole chain after an edit, is only caught against a head recorded elsewhere:
        the message of a good check ends with the head hash to note down.
        """
        with self._reads() as con:
            con.execute("BEGIN")  # one snapshot
            try:
                total: int = con.execute("SELECT count(*) FROM trail").fetchone()[0]
                return self._check(self._rows(con), total)
            finally:
                con.execute("COMMIT")

    @staticmethod
    def _rows(con: sqlite3.Connection) -> Iterator[Any]:
        cur = con.execute(f"SELECT {_COLUMNS} FROM trail ORDER BY seq")  # noqa: S608
        while rows := cur.fetchmany(1000):
            yield from rows

    @staticmethod
    def _check(rows: Iterator[Any], total: int) -> TrailCheck:
        expected_seq, prev = 1, GENESIS
        for seq, at_ns, actor, action, target, detail, prev_hash, stored in rows:
            problem = ""
            if seq != expected_seq:
                problem = f"entry {seq} follows entry {expected_seq - 1}: entries are missing"
            elif prev_hash != prev:
                problem = f"entry {seq} does not link to entry {seq - 1}"
            elif not (
                isinstance(at_ns, int)
                and all(isinstance(v, str) for v in (actor, action, target, detail))
                and isinstance(stored, bytes)
            ):
                problem = f"entry {seq} has a field of the wrong type"
            elif detail.isascii() and stored == entry_hash(
                prev_hash, seq, at_ns, actor, action, target, detail
            ):
                expected_seq, prev = seq + 1, stored
                continue
            else:
                problem = f"entry {seq} was changed after it was written (hash mismatch)"
            return TrailCheck(False, total, seq, problem)
        head = prev.hex() if total else "-"
        entries = "1 entry" if total == 1 else f"{total} entries"
        return TrailCheck(True, total, None, f"{entries}, chain intact, head {head}")
