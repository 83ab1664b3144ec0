"""Console people: users with Argon2id passwords and roles, logins, server-side sessions.

The console (web) and the CLI both come here; every change is written to the trail in
the same transaction. Time is always passed in (`now_ns`). Users are locked, never deleted.
"""

from __future__ import annotations

import builtins
import functools
import hashlib
import hmac
import logging
import re
import secrets
import sqlite3
import threading
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from collector.errors import AuthError, NotFoundError, ThrottledError, UserError
from collector.trail import Action, Reads, Trail

if TYPE_CHECKING:
    from collector.store import SqliteStore

__all__ = ["Role", "Session", "Sessions", "User", "Users"]

logger = logging.getLogger(__name__)

NAME = re.compile(r"[A-Za-z0-9._@-]{1,64}")
"""User names: 1-64 of these characters; unique regardless of case ("Alice" is "alice")."""
MIN_PASSWORD = 12
MAX_PASSWORD = 1024
"""Longer passwords are refused: hashing megabytes on request is a denial of service."""

FAILURE_WINDOW_NS = 15 * 60 * 10**9
"""Failed logins older than this are forgotten."""
USER_LIMIT = 10
"""Failures for one account name within the window before it is throttled."""
CLIENT_LIMIT = 50
"""Failures from one client address within the window (password spraying) before it is."""
HASHING_AT_ONCE = 4
"""Argon2 computations (logins, new passwords) run at most this many at a time per
`Users`: each takes 64 MiB, and a flood of login attempts would otherwise run one per
server worker thread (40 and more) at once."""
DELAY_BASE_S = 0.25
DELAY_CAP_S = 8.0

LOGIN_FAILED = "login failed: wrong user name or password"
"""The one message for an unknown user, a wrong password and a locked account."""

TOUCH_EVERY_NS = 60 * 10**9
"""A session's last_seen is rewritten at most this often: one write per request is waste,
and idle expiry to the minute is precise enough."""


class Role(StrEnum):
    """Viewers read; analysts also triage; admins also manage users, agents and policy."""

    ADMIN = "admin"
    ANALYST = "analyst"
    VIEWER = "viewer"

    @property
    def may_triage(self) -> bool:
        return self in (Role.ADMIN, Role.ANALYST)

    @property
    def may_administer(self) -> bool:
        return self is Role.ADMIN


@dataclass(frozen=True)
class User:
    name: str
    role: Role
    locked: bool
    created_at_ns: int
    last_login_ns: int
    """0 until the first login."""


@dataclass(frozen=True)
class Session:
    """A logged-in browser. Only a SHA-256 of `id` is stored, so the table's contents
    cannot be replayed as cookies."""

    id: str
    """The cookie value: 32 random bytes, URL-safe base64."""
    user: str
    role: Role
    """The user's role now (read at each `Sessions.get`), not at login."""
    csrf: str
    """The token every state-changing request must carry."""
    created_at_ns: int
    last_seen_ns: int

    def csrf_ok(self, token: str | None) -> bool:
        """Whether a submitted CSRF token is this session's (constant-time)."""
        return token is not None and hmac.compare_digest(token.encode(), self.csrf.encode())


def check_name(name: str) -> str:
    if not NAME.fullmatch(name):
        raise UserError(f"invalid user name {name[:80]!r}: use 1-64 letters, digits and . _ @ -")
    return name


def check_password(password: str) -> str:
    if len(password) < MIN_PASSWORD:
        raise UserError(f"the password is too short: at least {MIN_PASSWORD} characters")
    if len(password) > MAX_PASSWORD:
        raise UserError(f"the password is too long: at most {MAX_PASSWORD} characters")
    return password


def check_role(role: str) -> Role:
    try:
        return Role(role)
    except ValueError:
        roles = ", ".join(r.value for r in Role)
        raise UserError(f"unknown role {role!r}: use one of {roles}") from None


_USER = "SELECT name, role, locked, created_at_ns, last_login_ns FROM users"


def _user(row: Any) -> User:
    return User(row[0], Role(row[1]), bool(row[2]), row[3], row[4])


def _subject_user(name: str) -> str:
    return "user:" + name[:64].lower()  # names are ASCII; NOCASE in SQL is ASCII lower()


def _subject_client(client: str) -> str:
    return "client:" + client[:128]


class Users:
    """Adds, locks, lists and authenticates console users (the `users` table)."""

    def __init__(
        self,
        store: SqliteStore,
        *,
        hasher: PasswordHasher | None = None,
        reads: Reads | None = None,
        hashing_at_once: int = HASHING_AT_ONCE,
    ) -> None:
        self._store = store
        self._reads = reads or store._read
        """See `collector.trail.Reads`."""
        self._hasher = hasher or PasswordHasher()
        """argon2-cffi's defaults: Argon2id, RFC 9106's low-memory profile (t=3, 64 MiB, p=4)."""
        self._hashing = threading.BoundedSemaphore(hashing_at_once)
        self._trail = Trail(store)

    @functools.cached_property
    def _dummy_hash(self) -> str:
        """A hash no password matches, verified for unknown names so they take as long."""
        return self._hash(secrets.token_urlsafe(32))

    def _hash(self, password: str) -> str:
        with self._hashing:
            return self._hasher.hash(password)

    # -- reading -------------------------------------------------------------------

    def get(self, name: str) -> User | None:
        with self._reads() as con:
            row = con.execute(_USER + " WHERE name = ?", (name,)).fetchone()
        return None if row is None else _user(row)

    def list(self) -> builtins.list[User]:
        with self._reads() as con:
            return [_user(row) for row in con.execute(_USER + " ORDER BY name")]

    # -- administration ------------------------------------------------------------

    def add(self, name: str, role: str, password: str, *, actor: str, now_ns: int) -> User:
        """Create a user; UserError for a bad name, role or password, or a name in use."""
        check_name(name)
        role_ = check_role(role)
        pw_hash = self._hash(check_password(password))  # slow: outside the lock
        with self._store._write() as con:
            try:
                con.execute(
                    "INSERT INTO users (name, role, password_hash, created_at_ns)"
                    " VALUES (?, ?, ?, ?)",
                    (name, role_.value, pw_hash, now_ns),
                )
            except sqlite3.IntegrityError:
                raise UserError(f"a user named {name!r} already exists") from None
            self._trail.append(
                con, actor=actor, action=Action.USER_ADD, target=f"user:{name}",
                detail={"role": role_.value}, now_ns=now_ns,
            )  # fmt: skip
        logger.info("user %s added as %s", name, role_.value)
        return User(name, role_, False, now_ns, 0)

    def lock(self, name: str, *, actor: str, now_ns: int) -> User:
        """Lock a user out: no login, and every session of theirs ends now."""
        return self._set_locked(name, True, actor=actor, now_ns=now_ns)

    def unlock(self, name: str, *, actor: str, now_ns: int) -> User:
        """Let a locked user log in again; their failed-login count starts over."""
        return self._set_locked(name, False, actor=actor, now_ns=now_ns)

    def _set_locked(self, name: str, locked: bool, *, actor: str, now_ns: int) -> User:
        with self._store._write() as con:
            user = self._get_for_change(con, name)
            con.execute("DELETE FROM sessions WHERE user = ?", (user.name,))
            if not locked:
                sql = "DELETE FROM login_failures WHERE subject = ?"
                con.execute(sql, (_subject_user(user.name),))
            if user.locked != locked:  # the trail records changes, not repeats
                sql = "UPDATE users SET locked = ? WHERE name = ?"
                con.execute(sql, (int(locked), user.name))
                self._trail.append(
                    con, actor=actor, action=Action.USER_LOCK if locked else Action.USER_UNLOCK,
                    target=f"user:{user.name}", detail={}, now_ns=now_ns,
                )  # fmt: skip
        return User(user.name, user.role, locked, user.created_at_ns, user.last_login_ns)

    def set_password(self, name: str, password: str, *, actor: str, now_ns: int) -> None:
        """Replace a user's password; their sessions end (log in again with the new one)."""
        pw_hash = self._hash(check_password(password))
        with self._store._write() as con:
            user = self._get_for_change(con, name)
            sql = "UPDATE users SET password_hash = ? WHERE name = ?"
            con.execute(sql, (pw_hash, user.name))
            con.execute("DELETE FROM sessions WHERE user = ?", (user.name,))
            self._trail.append(
                con, actor=actor, action=Action.USER_PASSWORD, target=f"user:{user.name}",
                detail={}, now_ns=now_ns,
            )  # fmt: skip

    @staticmethod
    def _get_for_change(con: sqlite3.Connection, name: str) -> User:
        row = con.execute(_USER + " WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFoundError(f"no user named {name[:80]!r}")
        return _user(row)

    # -- logging in ----------------------------------------------------------------

    def authenticate(self, name: str, password: str, *, now_ns: int, client: str) -> User:
        """The user, if `password` is theirs and they may log in; AuthError otherwise.

        An unknown name, a wrong password and a locked account raise the same AuthError,
        after the same Argon2 work (unknown names verify against a dummy hash). Each
        failure counts against the name and the client address and goes into the trail;
        past USER_LIMIT (per name) or CLIENT_LIMIT (per address) failures within
        FAILURE_WINDOW_NS, ThrottledError refuses without checking the password, whether
        or not the name exists. A success resets the name's count and is recorded.
        The caller should also wait `login_delay` before answering a failure.
        """
        subjects = (_subject_user(name), _subject_client(client))
        with self._reads() as con:  # a cheap refusal first, without the write lock
            throttled = self._throttled(con, subjects, now_ns)
        attempt = None if throttled else self._attempt(name, subjects, now_ns)
        if attempt is None:
            raise ThrottledError(
                "too many failed logins for this account or address; try again later",
                retry_after_s=FAILURE_WINDOW_NS / 1e9,
            )
        claimed, row = attempt
        stored = self._dummy_hash if row is None else row[3]
        ok = self._verify(stored, password[:MAX_PASSWORD])
        if row is None or not ok or row[2]:
            why = "unknown_user" if row is None else "locked" if row[2] else "bad_password"
            self._failed(name, why, client, now_ns)
            raise AuthError(LOGIN_FAILED)
        user_name, role = row[0], Role(row[1])
        rehash = self._hasher.check_needs_rehash(stored)
        new_hash = self._hash(password) if rehash else None
        with self._store._write() as con:
            # The name's failures are forgiven; the address keeps its earlier ones.
            con.execute("DELETE FROM login_failures WHERE subject = ?", (subjects[0],))
            con.execute("DELETE FROM login_failures WHERE rowid = ?", (claimed[1],))
            con.execute(
                "UPDATE users SET last_login_ns = ?, password_hash = coalesce(?, password_hash)"
                " WHERE name = ?",
                (now_ns, new_hash, user_name),
            )
            self._trail.append(
                con, actor=user_name, action=Action.LOGIN, target=f"user:{user_name}",
                detail={"client": client}, now_ns=now_ns,
            )  # fmt: skip
        return User(user_name, role, False, row[4], now_ns)

    def _attempt(
        self, name: str, subjects: tuple[str, str], now_ns: int
    ) -> tuple[builtins.list[int], Any] | None:
        """Count an attempt as a failure before its password is checked, so attempts in
        parallel see each other: no more than USER_LIMIT guesses per name are checked,
        however many are in flight. None when throttled; else the failure rows' ids and
        the user's row (None for a name nobody has)."""
        with self._store._write() as con:
            if self._throttled(con, subjects, now_ns):
                return None
            claimed = self._claim(con, subjects, now_ns)
            row = None
            if NAME.fullmatch(name):
                sql = "SELECT name, role, locked, password_hash, created_at_ns FROM users"
                row = con.execute(sql + " WHERE name = ?", (name,)).fetchone()
        return claimed, row

    def _throttled(self, con: sqlite3.Connection, subjects: tuple[str, str], now_ns: int) -> bool:
        user_fails, client_fails = self._failures(con, subjects, now_ns)
        return user_fails >= USER_LIMIT or client_fails >= CLIENT_LIMIT

    @staticmethod
    def _claim(
        con: sqlite3.Connection, subjects: tuple[str, str], now_ns: int
    ) -> builtins.list[int]:
        """Record an attempt as a failure of each subject; the rows' ids."""
        con.execute("DELETE FROM login_failures WHERE at_ns <= ?", (now_ns - FAILURE_WINDOW_NS,))
        sql = "INSERT INTO login_failures (subject, at_ns) VALUES (?, ?)"
        return [con.execute(sql, (subject, now_ns)).lastrowid or 0 for subject in subjects]

    def _verify(self, stored: str, password: str) -> bool:
        try:
            with self._hashing:
                return self._hasher.verify(stored, password)
        except VerifyMismatchError:
            return False
        except (VerificationError, InvalidHashError):
            logger.warning("a stored password hash is unreadable")
            return False

    def _failed(self, name: str, why: str, client: str, now_ns: int) -> None:
        """Trail a failed attempt (`_claim` counted it already)."""
        with self._store._write() as con:
            # The actor is the address: whoever typed the name need not be its owner.
            self._trail.append(
                con, actor=f"client:{client}", action=Action.LOGIN_FAILED, target=f"user:{name}",
                detail={"client": client, "why": why}, now_ns=now_ns,
            )  # fmt: skip
        logger.info("failed login from %r (%s)", client, why)

    @staticmethod
    def _failures(
        con: sqlite3.Connection, subjects: tuple[str, str], now_ns: int
    ) -> builtins.list[int]:
        horizon = now_ns - FAILURE_WINDOW_NS
        sql = "SELECT count(*) FROM login_failures WHERE subject = ? AND at_ns > ?"
        return [con.execute(sql, (subject, horizon)).fetchone()[0] for subject in subjects]

    def login_delay(self, name: str, client: str, now_ns: int) -> float:
        """Seconds to wait before answering a login attempt: 0 without recent failures,
        then doubling from DELAY_BASE_S with each failure of the name or the address
        (whichever has more) up to DELAY_CAP_S."""
        with self._reads() as con:
            fails = max(self._failures(con, (_subject_user(name), _subject_client(client)), now_ns))
        if fails == 0:
            return 0.0
        return float(min(DELAY_CAP_S, DELAY_BASE_S * 2 ** min(fails - 1, 32)))


class Sessions:
    """Server-side sessions: idle and absolute timeouts, ended by logout or by locking."""

    def __init__(
        self,
        store: SqliteStore,
        *,
        idle_s: int = 1800,
        absolute_s: int = 43200,
        reads: Reads | None = None,
    ) -> None:
        self._store = store
        self._reads = reads or store._read
        """See `collector.trail.Reads`."""
        self._idle_ns = idle_s * 10**9
        self._absolute_ns = absolute_s * 10**9
        self._trail = Trail(store)

    def create(self, user_name: str, *, now_ns: int) -> Session:
        """A new session for a user who just authenticated (a new id at every login)."""
        session_id = secrets.token_urlsafe(32)
        csrf = secrets.token_urlsafe(32)
        with self._store._write() as con:
            sql = "SELECT name, role, locked FROM users WHERE name = ?"
            row = con.execute(sql, (user_name,)).fetchone()
            if row is None or row[2]:
                raise AuthError(LOGIN_FAILED)
            con.execute(
                "INSERT INTO sessions (id_hash, user, csrf, created_at_ns, last_seen_ns)"
                " VALUES (?, ?, ?, ?, ?)",
                (_id_hash(session_id), row[0], csrf, now_ns, now_ns),
            )
        return Session(session_id, row[0], Role(row[1]), csrf, now_ns, now_ns)

    def get(self, session_id: str, *, now_ns: int) -> Session | None:
        """The live session with this id, its last_seen moved to now; else None (unknown,
        idle or absolute timeout passed, or the user locked; such a session is removed)."""
        if not session_id or len(session_id) > 128:
            return None
        id_hash = _id_hash(session_id)
        with self._reads() as con:
            row = con.execute(
                "SELECT s.user, u.role, u.locked, s.csrf, s.created_at_ns, s.last_seen_ns"
                " FROM sessions s JOIN users u ON u.name = s.user WHERE s.id_hash = ?",
                (id_hash,),
            ).fetchone()
        if row is None:
            return None
        user, role, locked, csrf, created, last_seen = row
        if locked or now_ns - last_seen >= self._idle_ns or now_ns - created >= self._absolute_ns:
            with self._store._write() as con:
                con.execute("DELETE FROM sessions WHERE id_hash = ?", (id_hash,))
            return None
        if now_ns - last_seen >= TOUCH_EVERY_NS:
            with self._store._write() as con:
                sql = "UPDATE sessions SET last_seen_ns = max(last_seen_ns, ?) WHERE id_hash = ?"
                con.execute(sql, (now_ns, id_hash))
            last_seen = now_ns
        return Session(session_id, user, Role(role), csrf, created, last_seen)

    def destroy(self, session_id: str, *, now_ns: int | None = None) -> None:
        """End a session (logout). With `now_ns`, a logout entry goes into the trail."""
        id_hash = _id_hash(session_id)
        with self._store._write() as con:
            row = con.execute("SELECT user FROM sessions WHERE id_hash = ?", (id_hash,)).fetchone()
            con.execute("DELETE FROM sessions WHERE id_hash = ?", (id_hash,))
            if row is not None and now_ns is not None:
                self._trail.append(
                    con, actor=row[0], action=Action.LOGOUT, target=f"user:{row[0]}", detail={},
                    now_ns=now_ns,
                )  # fmt: skip

    def destroy_user(self, name: str) -> int:
        """End every session of a user; how many there were."""
        with self._store._write() as con:
            return con.execute("DELETE FROM sessions WHERE user = ?", (name,)).rowcount

    def purge(self, now_ns: int) -> int:
        """Remove every expired session (housekeeping; `get` refuses them anyway)."""
        with self._store._write() as con:
            return con.execute(
                _PURGE, (now_ns - self._idle_ns, now_ns - self._absolute_ns)
            ).rowcount


_PURGE = "DELETE FROM sessions WHERE last_seen_ns <= ? OR created_at_ns <= ?"


def _id_hash(session_id: str) -> bytes:
    return hashlib.sha256(session_id.encode("utf-8", "surrogatepass")).digest()
