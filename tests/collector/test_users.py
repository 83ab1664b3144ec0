"""collector.users: Argon2id users, one answer for every failed login, slowing, sessions."""

from __future__ import annotations

import itertools
import sqlite3
from pathlib import Path
from typing import Literal

import pytest
from argon2 import PasswordHasher

from collector.errors import AuthError, NotFoundError, ThrottledError, UserError
from collector.store import SqliteStore
from collector.trail import Trail
from collector.users import (
    CLIENT_LIMIT,
    DELAY_CAP_S,
    FAILURE_WINDOW_NS,
    LOGIN_FAILED,
    USER_LIMIT,
    Role,
    Sessions,
    Users,
)
from tests.collector.batches import T0

PW = "correct horse battery"
S = 10**9


class CountingHasher(PasswordHasher):
    """Real Argon2id at a small cost (tests hash often); counts the verifications."""

    def __init__(self) -> None:
        super().__init__(time_cost=1, memory_cost=1024, parallelism=1)
        self.verified = 0

    def verify(self, hash: str | bytes, password: str | bytes) -> Literal[True]:
        self.verified += 1
        return super().verify(hash, password)


@pytest.fixture
def hasher() -> CountingHasher:
    return CountingHasher()


@pytest.fixture
def users(store: SqliteStore, hasher: CountingHasher) -> Users:
    u = Users(store, hasher=hasher)
    u.add("sam", "analyst", PW, actor="cli:root", now_ns=T0)
    return u


def test_passwords_are_stored_as_argon2id_with_their_parameters(
    store: SqliteStore, db_path: Path
) -> None:
    users = Users(store)  # the production parameters
    user = users.add("dana", "admin", PW, actor="cli:root", now_ns=T0)
    assert user.role is Role.ADMIN and not user.locked and user.last_login_ns == 0
    with sqlite3.connect(db_path) as con:
        (stored,) = con.execute("SELECT password_hash FROM users").fetchone()
    con.close()
    assert stored.startswith("$argon2id$v=19$m=65536,t=3,p=4$")
    assert PW.encode() not in db_path.read_bytes() + Path(f"{db_path}-wal").read_bytes()
    assert users.authenticate("dana", PW, now_ns=T0 + S, client="10.0.0.1").name == "dana"


@pytest.mark.parametrize(
    "name", ["", "a" * 65, "alice smith", "bob/../x", "<script>", "naïve", "tab\tname"]
)
def test_bad_names_are_refused(users: Users, name: str) -> None:
    with pytest.raises(UserError, match="invalid user name"):
        users.add(name, "viewer", PW, actor="cli:root", now_ns=T0)


def test_names_roles_and_passwords_follow_the_rules(users: Users) -> None:
    for name in ("a", "x" * 64, "dana.smith@corp-1_x"):
        users.add(name, "viewer", PW, actor="cli:root", now_ns=T0)
    with pytest.raises(UserError, match="at least 12"):
        users.add("short", "viewer", "elevenchars", actor="cli:root", now_ns=T0)
    with pytest.raises(UserError, match="at most 1024"):
        users.add("long", "viewer", "x" * 1025, actor="cli:root", now_ns=T0)
    with pytest.raises(UserError, match="unknown role 'root'"):
        users.add("eve", "root", PW, actor="cli:root", now_ns=T0)
    with pytest.raises(UserError, match="already exists"):
        users.add("SAM", "viewer", PW, actor="cli:root", now_ns=T0)  # names ignore case
    assert [u.name for u in users.list()] == ["a", "dana.smith@corp-1_x", "sam", "x" * 64]
    assert users.get("Sam") == users.get("sam") and users.get("nobody") is None


def test_users_are_locked_never_deleted(users: Users, db_path: Path) -> None:
    with sqlite3.connect(db_path) as con, pytest.raises(sqlite3.IntegrityError, match="never"):
        con.execute("DELETE FROM users")
    con.close()
    assert users.lock("sam", actor="dana", now_ns=T0 + 1).locked
    assert users.get("sam") is not None
    with pytest.raises(NotFoundError):
        users.lock("ghost", actor="dana", now_ns=T0 + 1)


def test_unknown_user_wrong_password_and_locked_user_fail_alike(
    store: SqliteStore, users: Users, hasher: CountingHasher
) -> None:
    users.add("lee", "viewer", PW, actor="cli:root", now_ns=T0)
    users.lock("lee", actor="dana", now_ns=T0)
    errors = []
    for name, password in (("ghost", PW), ("sam", PW + "!"), ("lee", PW), ("x y", PW)):
        before = hasher.verified
        with pytest.raises(AuthError) as info:
            users.authenticate(name, password, now_ns=T0 + S, client="10.0.0.1")
        errors.append((type(info.value), str(info.value)))
        # The same Argon2 work whether or not the name exists: no timing oracle.
        assert hasher.verified == before + 1, name
    assert errors == [(AuthError, LOGIN_FAILED)] * 4
    failed = Trail(store).entries(limit=4)
    assert [(e.action, e.target, e.detail["why"]) for e in reversed(failed)] == [
        ("login_failed", "user:ghost", "unknown_user"),
        ("login_failed", "user:sam", "bad_password"),
        ("login_failed", "user:lee", "locked"),
        ("login_failed", "user:x y", "unknown_user"),
    ]
    assert {e.actor for e in failed} == {"client:10.0.0.1"}


def test_a_login_is_recorded_and_resets_the_names_failures(
    store: SqliteStore, users: Users
) -> None:
    for i in range(3):
        with pytest.raises(AuthError):
            users.authenticate("sam", "wrong password!", now_ns=T0 + i, client="10.0.0.1")
    assert users.login_delay("sam", "10.0.0.2", T0 + 5) > 0
    user = users.authenticate("SAM", PW, now_ns=T0 + 10, client="10.0.0.2")
    assert (user.name, user.role, user.last_login_ns) == ("sam", Role.ANALYST, T0 + 10)
    assert users.get("sam").last_login_ns == T0 + 10  # type: ignore[union-attr]
    assert users.login_delay("sam", "10.0.0.2", T0 + 11) == 0.0
    assert users.login_delay("other", "10.0.0.1", T0 + 11) > 0  # the address still counts
    (login,) = Trail(store).entries(limit=1)
    assert (login.actor, login.action, dict(login.detail)) == (
        "sam",
        "login",
        {"client": "10.0.0.2"},
    )


def test_login_delay_grows_with_failures_and_is_capped(users: Users) -> None:
    delays = [users.login_delay("sam", "10.0.0.1", T0)]
    for i in range(8):
        with pytest.raises(AuthError):
            users.authenticate("sam", "not the password", now_ns=T0 + i, client="10.0.0.1")
        delays.append(users.login_delay("sam", "10.0.0.1", T0 + i))
    assert delays[0] == 0.0
    assert all(b > a for a, b in itertools.pairwise(delays[:7])), delays
    assert max(delays) == DELAY_CAP_S == delays[-1]
    # Counted per name (from any address) and per address (whatever the name).
    assert users.login_delay("sam", "192.0.2.7", T0 + 9) == DELAY_CAP_S
    assert users.login_delay("nobody", "10.0.0.1", T0 + 9) == DELAY_CAP_S
    assert users.login_delay("nobody", "192.0.2.7", T0 + 9) == 0.0
    # Failures are forgotten after the window.
    assert users.login_delay("sam", "10.0.0.1", T0 + 7 + FAILURE_WINDOW_NS) == 0.0


def test_an_account_is_throttled_after_too_many_failures(
    users: Users, hasher: CountingHasher
) -> None:
    for i in range(USER_LIMIT):
        with pytest.raises(AuthError) as info:
            users.authenticate("sam", f"guess number {i}", now_ns=T0 + i, client=f"10.0.0.{i}")
        assert not isinstance(info.value, ThrottledError)
    before = hasher.verified
    with pytest.raises(ThrottledError) as throttled:
        users.authenticate("sam", PW, now_ns=T0 + S, client="10.9.9.9")  # even the right one
    assert throttled.value.retry_after_s > 0 and hasher.verified == before
    for i in range(USER_LIMIT):
        with pytest.raises(AuthError):
            users.authenticate("ghost", "x" * 12, now_ns=T0 + i, client=f"10.1.0.{i}")
    with pytest.raises(ThrottledError):  # unknown names are throttled the same way
        users.authenticate("ghost", "x" * 12, now_ns=T0 + S, client="10.1.1.1")
    later = T0 + USER_LIMIT + FAILURE_WINDOW_NS
    assert users.authenticate("sam", PW, now_ns=later, client="10.9.9.9").name == "sam"


def test_one_address_spraying_many_names_is_throttled(users: Users) -> None:
    for i in range(CLIENT_LIMIT):
        with pytest.raises(AuthError):
            users.authenticate(f"user{i}", "x" * 12, now_ns=T0 + i, client="203.0.113.5")
    with pytest.raises(ThrottledError):
        users.authenticate("sam", PW, now_ns=T0 + S, client="203.0.113.5")
    assert users.authenticate("sam", PW, now_ns=T0 + S, client="10.0.0.1").name == "sam"


def test_lock_unlock_and_password_changes_are_trailed(store: SqliteStore, users: Users) -> None:
    sessions = Sessions(store)
    sid = sessions.create("sam", now_ns=T0).id
    users.lock("sam", actor="dana", now_ns=T0 + 1)
    users.lock("sam", actor="dana", now_ns=T0 + 2)  # already locked: nothing to record
    assert sessions.get(sid, now_ns=T0 + 3) is None
    with pytest.raises(AuthError):
        users.authenticate("sam", PW, now_ns=T0 + 3, client="10.0.0.1")
    assert not users.unlock("sam", actor="dana", now_ns=T0 + 4).locked
    sid = sessions.create("sam", now_ns=T0 + 5).id
    users.set_password("sam", "a brand new passphrase", actor="sam", now_ns=T0 + 6)
    assert sessions.get(sid, now_ns=T0 + 7) is None
    with pytest.raises(AuthError):
        users.authenticate("sam", PW, now_ns=T0 + 8, client="10.0.0.1")
    users.authenticate("sam", "a brand new passphrase", now_ns=T0 + 9, client="10.0.0.1")
    with pytest.raises(UserError):
        users.set_password("sam", "too short", actor="sam", now_ns=T0 + 10)
    actions = [(e.actor, e.action) for e in Trail(store).history("user:sam")]
    assert actions == [
        ("cli:root", "user_add"),
        ("dana", "user_lock"),
        ("client:10.0.0.1", "login_failed"),
        ("dana", "user_unlock"),
        ("sam", "user_password"),
        ("client:10.0.0.1", "login_failed"),
        ("sam", "login"),
    ]
    assert Trail(store).verify().ok


# -- sessions ----------------------------------------------------------------------


def test_a_session_is_stored_only_as_a_hash(
    users: Users, store: SqliteStore, db_path: Path
) -> None:
    sessions = Sessions(store)
    s = sessions.create("Sam", now_ns=T0)
    assert (s.user, s.role, s.created_at_ns, s.last_seen_ns) == ("sam", Role.ANALYST, T0, T0)
    assert len(s.id) == 43 and len(s.csrf) == 43  # 32 random bytes, URL-safe base64
    assert s.id != sessions.create("sam", now_ns=T0).id  # a new id at every login
    with sqlite3.connect(db_path) as con:
        stored = [row[0] for row in con.execute("SELECT id_hash FROM sessions")]
    con.close()
    assert len(stored) == 2 and all(len(h) == 32 for h in stored)
    assert s.id.encode() not in db_path.read_bytes() + Path(f"{db_path}-wal").read_bytes()
    assert sessions.get(s.id, now_ns=T0 + 1) == s
    assert sessions.get(_flip(s.id, 0), now_ns=T0 + 1) is None
    assert sessions.get("", now_ns=T0 + 1) is None
    assert s.csrf_ok(s.csrf) and not s.csrf_ok(_flip(s.csrf, -1)) and not s.csrf_ok(None)


def _flip(token: str, i: int) -> str:
    """`token` with its character at `i` changed (to one it is not: never the same token)."""
    chars = list(token)
    chars[i] = "y" if chars[i] == "x" else "x"
    return "".join(chars)


def test_sessions_for_unknown_or_locked_users_are_refused(users: Users, store: SqliteStore) -> None:
    users.add("lee", "viewer", PW, actor="cli:root", now_ns=T0)
    users.lock("lee", actor="dana", now_ns=T0)
    for name in ("ghost", "lee"):
        with pytest.raises(AuthError):
            Sessions(store).create(name, now_ns=T0)


def test_idle_sessions_expire_and_activity_keeps_them(users: Users, store: SqliteStore) -> None:
    sessions = Sessions(store, idle_s=600, absolute_s=3600)
    sid = sessions.create("sam", now_ns=T0).id
    seen = sessions.get(sid, now_ns=T0 + 599 * S)
    assert seen is not None and seen.last_seen_ns == T0 + 599 * S
    assert sessions.get(sid, now_ns=T0 + 1198 * S) is not None  # 599 s after the last use
    assert sessions.get(sid, now_ns=T0 + 1798 * S) is None  # 600 s idle
    assert sessions.get(sid, now_ns=T0 + 1798 * S) is None  # and it is gone


def test_absolute_timeout_ends_even_a_busy_session(users: Users, store: SqliteStore) -> None:
    sessions = Sessions(store, idle_s=600, absolute_s=3600)
    sid = sessions.create("sam", now_ns=T0).id
    for minute in range(1, 60):
        assert sessions.get(sid, now_ns=T0 + minute * 60 * S) is not None, minute
    assert sessions.get(sid, now_ns=T0 + 3600 * S) is None


def test_logout_and_lock_end_sessions(users: Users, store: SqliteStore) -> None:
    sessions = Sessions(store)
    users.add("lee", "viewer", PW, actor="cli:root", now_ns=T0)
    a, b = sessions.create("sam", now_ns=T0), sessions.create("sam", now_ns=T0)
    other = sessions.create("lee", now_ns=T0)
    sessions.destroy(a.id, now_ns=T0 + 1)
    assert sessions.get(a.id, now_ns=T0 + 2) is None and sessions.get(b.id, now_ns=T0 + 2)
    (logout,) = Trail(store).entries(limit=1)
    assert (logout.actor, logout.action, logout.target) == ("sam", "logout", "user:sam")
    users.lock("sam", actor="dana", now_ns=T0 + 3)
    assert sessions.get(b.id, now_ns=T0 + 4) is None
    assert sessions.get(other.id, now_ns=T0 + 4) is not None
    assert sessions.destroy_user("lee") == 1
    assert sessions.get(other.id, now_ns=T0 + 5) is None


def test_purge_removes_expired_sessions(users: Users, store: SqliteStore) -> None:
    sessions = Sessions(store, idle_s=60, absolute_s=600)
    old = sessions.create("sam", now_ns=T0)
    fresh = sessions.create("sam", now_ns=T0 + 100 * S)
    assert sessions.purge(T0 + 120 * S) == 1
    assert sessions.get(fresh.id, now_ns=T0 + 120 * S) is not None
    assert sessions.get(old.id, now_ns=T0 + 1) is None  # removed, not merely expired
