"""Findings of the console's security review, each pinned by a test that failed before its
fix: crash pages without the security headers, 500s from odd numbers, unbounded request
bodies, a bulk change reported as refused after it was made, a database connection per
worker thread, parallel password guesses past the limit, unbounded Argon2 memory, giant
alert pages, notes edited behind the trail's back, abandoned sessions kept forever."""

from __future__ import annotations

import dataclasses
import io
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal
from urllib.parse import urlencode

import pytest
from argon2 import PasswordHasher
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.testclient import TestClient

from collector import cli
from collector.errors import AuthError, ThrottledError
from collector.models import EventId
from collector.users import USER_LIMIT, Users
from collector.web import timeline
from collector.web.app import create_app
from collector.web.security import COOKIE, CSP, MAX_BODY
from collector.web.views.alerts import RAW_EVIDENCE, page_json
from tests.procs import wait_until
from tests.web.conftest import ORIGIN, PASSWORD, Web, login

T = 1_700_000_000 * 10**9


def test_a_crash_still_carries_the_security_headers(web: Web) -> None:
    """Starlette answers an unexpected exception outside every middleware."""

    def boom(request: Request) -> Response:
        raise RuntimeError("secret detail of a bug")

    app = create_app(web.console)
    app.router.routes.append(Route("/boom", boom))
    with TestClient(app, base_url=ORIGIN, raise_server_exceptions=False) as client:
        r = client.get("/boom")
    assert r.status_code == 500
    assert "secret detail" not in r.text and "Traceback" not in r.text
    assert r.headers["content-security-policy"] == CSP
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["cache-control"] == "no-store"
    assert r.headers["x-frame-options"] == "DENY"


@pytest.mark.parametrize(
    "url",
    [
        "/alerts?page=%C2%B2",  # "²".isdigit() is True, int("²") is an error
        "/alerts?size=%C2%B2",
        "/alerts/99999999999999999999999",  # beyond SQLite's integers
        "/events?before=99999999999999999999999.1",
        "/events?before=%C2%B9.1",
        "/audit?before=99999999999999999999999",
        "/alerts?since=9999-12-31",  # beyond nanoseconds in 64 bits
        "/alerts?until=0001-01-01",
        "/events?since=0001-01-01T00:00%2B14:00",
    ],
)
def test_odd_numbers_and_dates_are_refused_not_crashed(
    signed_in: tuple[TestClient, str], web: Web, url: str
) -> None:
    client, _ = signed_in
    quiet = TestClient(web.app, base_url=ORIGIN, follow_redirects=False,
                       raise_server_exceptions=False)  # fmt: skip
    quiet.cookies = client.cookies
    r = quiet.get(url)
    assert r.status_code in (400, 404), (url, r.status_code, r.text[:200])
    assert "cannot do that" in r.text


@pytest.mark.parametrize("ids", [["\u00b2"], ["9" * 25]])
def test_odd_alert_numbers_in_a_bulk_change_are_refused(
    signed_in: tuple[TestClient, str], web: Web, ids: list[str]
) -> None:
    client, csrf = signed_in
    quiet = TestClient(web.app, base_url=ORIGIN, headers={"origin": ORIGIN},
                       follow_redirects=False, raise_server_exceptions=False)  # fmt: skip
    quiet.cookies = client.cookies
    data = {"ids": ids, "op": "assign", "assignee": "@me", "csrf": csrf}
    r = quiet.post("/alerts/bulk", data=data)
    assert r.status_code == 400 and "ids: expected a number" in r.text


def test_an_oversized_body_is_refused_before_it_is_read(
    signed_in: tuple[TestClient, str], web: Web
) -> None:
    client, csrf = signed_in
    fields = {"ids": str(web.alert_id), "op": "assign", "assignee": "@me", "csrf": csrf}
    r = client.post("/alerts/bulk", data={**fields, "pad": "x" * MAX_BODY})
    assert r.status_code == 413
    # Without a Content-Length (chunked), the body is counted as it arrives.
    body = urlencode({**fields, "pad": "x" * MAX_BODY}).encode()

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(body), 16384):
            yield body[start : start + 16384]

    form = {"content-type": "application/x-www-form-urlencoded"}
    r = client.post("/alerts/bulk", content=chunks(), headers=form)
    assert r.status_code == 413 and "larger than the console accepts" in r.text
    assert r.headers["content-security-policy"] == CSP
    alert = web.console.reader.alert(web.alert_id)
    assert alert is not None and alert.assignee is None
    # The biggest honest form still fits: a note of 10,000 four-byte characters.
    note = "\U0001f600" * 10_000
    r = client.post(f"/alerts/{web.alert_id}/notes", data={"note": note, "csrf": csrf})
    assert r.status_code == 303
    assert [n.text for n in web.console.triage.notes(web.alert_id)] == [note]
    # Nobody signed in: the login form is capped too.
    with web.client() as anonymous:
        r = anonymous.post("/login", data={"name": "sam", "password": "x" * MAX_BODY})
        assert r.status_code == 413


def test_a_bulk_change_made_from_a_long_filter_returns_to_it(
    signed_in: tuple[TestClient, str], web: Web
) -> None:
    """The change was made, then the page said 400 because `back` passed 256 characters."""
    client, csrf = signed_in
    back = urlencode(
        [("f", "1"), *[("status", s) for s in ("new", "in_progress", "resolved")],
         *[("severity", s) for s in ("critical", "high", "medium", "low")],
         ("rule", "bulk-copy-to-usb"), ("user", "alice"), ("host", "lt-0412"),
         ("destination", "removable:0019E06B12345678"), ("since", "2023-11-01T00:00"),
         ("until", "2023-11-30T23:59"), ("sort", "severity"), ("order", "desc"), ("page", 1)]
    )  # fmt: skip
    assert len(back) > 256
    data = {"ids": str(web.alert_id), "op": "assign", "assignee": "@me", "csrf": csrf}
    r = client.post("/alerts/bulk", data={**data, "back": back})
    assert r.status_code == 303 and r.headers["location"].startswith("/alerts?f=1&status=new")
    assert client.get(r.headers["location"]).status_code == 200
    alert = web.console.reader.alert(web.alert_id)
    assert alert is not None and alert.assignee == "sam"


def _open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_console_reads_share_a_pool_not_a_connection_per_thread(web: Web) -> None:
    """The server's worker threads come and go; the store's per-thread readers stayed open
    (two files each) until the collector stopped."""
    console = web.console

    def what_a_request_reads() -> None:
        now = time.time_ns()
        console.sessions.get("x" * 43, now_ns=now)
        console.users.list()
        console.users.login_delay("sam", "10.0.0.1", now)
        console.trail.entries(limit=1)
        console.trail.verify()
        console.triage.notes(web.alert_id)
        console.triage.verify_notes()

    before = _open_files()
    for _ in range(20):
        worker = threading.Thread(target=what_a_request_reads)
        worker.start()
        worker.join()
    assert _open_files() - before <= 4


class GatedHasher(PasswordHasher):
    """Real Argon2id at a small cost; each verification waits until the test opens the
    gate, and the hasher notes how many ran at once."""

    def __init__(self) -> None:
        super().__init__(time_cost=1, memory_cost=1024, parallelism=1)
        self.gate = threading.Event()
        self._lock = threading.Lock()
        self.running = 0
        self.most = 0
        self.verified = 0

    def verify(self, hash: str | bytes, password: str | bytes) -> Literal[True]:
        with self._lock:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            self.gate.wait(timeout=30)
            return super().verify(hash, password)
        finally:
            with self._lock:
                self.running -= 1
                self.verified += 1


def _guess_in_parallel(users: Users, n: int) -> tuple[list[threading.Thread], list[type]]:
    outcomes: list[type] = []

    def guess(i: int) -> None:
        try:
            users.authenticate("sam", f"guess number {i}", now_ns=time.time_ns(),
                               client=f"10.0.{i // 250}.{i % 250}")  # fmt: skip
        except (AuthError, ThrottledError) as e:
            outcomes.append(type(e))

    threads = [threading.Thread(target=guess, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    return threads, outcomes


def test_parallel_guesses_cannot_outrun_the_failure_limit(web: Web) -> None:
    """Failures were counted after the password check, so every guess in flight passed the
    limit check: 40 at once (the server's threads) instead of USER_LIMIT."""
    hasher = GatedHasher()
    users = Users(web.store, hasher=hasher, reads=web.console.reader.connection,
                  hashing_at_once=100)  # fmt: skip
    n = 2 * USER_LIMIT
    threads, outcomes = _guess_in_parallel(users, n)
    try:
        wait_until(lambda: outcomes.count(ThrottledError) == n - USER_LIMIT, 10,
                   "the guesses past the limit to be refused unchecked")  # fmt: skip
    finally:
        hasher.gate.set()
        for thread in threads:
            thread.join()
    assert outcomes.count(AuthError) == USER_LIMIT and hasher.verified == USER_LIMIT
    # ... and the name is throttled now, as after USER_LIMIT failures one by one.
    with pytest.raises(ThrottledError):
        users.authenticate("sam", PASSWORD, now_ns=time.time_ns(), client="10.9.9.9")


def test_argon2_runs_at_most_hashing_at_once(web: Web, tmp_path: Path) -> None:
    """64 MiB each: a flood of logins must not run one per server thread."""
    hasher = GatedHasher()
    users = Users(web.store, hasher=hasher, reads=web.console.reader.connection,
                  hashing_at_once=2)  # fmt: skip
    threads, outcomes = _guess_in_parallel(users, 8)
    try:
        wait_until(lambda: hasher.running == 2, 10, "two verifications to start")
        with sqlite3.connect(tmp_path / "collector.db") as con:
            claims = "SELECT count(*) FROM login_failures WHERE subject = 'user:sam'"
            wait_until(lambda: con.execute(claims).fetchone()[0] == 8, 10, "every attempt")
        con.close()
        threading.Event().wait(0.3)  # a window in which a third would have started
        assert hasher.most == 2
    finally:
        hasher.gate.set()
        for thread in threads:
            thread.join()
    assert hasher.verified == 8 and outcomes == [AuthError] * 8


def test_a_huge_alert_keeps_a_page_that_opens(web: Web) -> None:
    """An open alert grows with every copy: a million small files made a page of tens of
    megabytes (every step in the SVG, every evidence id in the raw JSON)."""
    n = 200_000
    points = [(T + i * 10**6, 1000) for i in range(n)]
    line = timeline.build(points, threshold_bytes=123_456_789, threshold_files=None)
    assert line is not None
    assert line.path.count("L ") <= 2 * timeline.MAX_STEPS + 4
    assert line.crossed_at is not None  # from every point, not the kept ones
    last = line.path.rsplit("L ", 1)[1].split()
    assert float(last[0]) == line.plot_right  # the line still ends at the last event

    record = web.console.reader.alert_record(web.alert_id)
    assert record is not None
    assert "evidence_not_shown" not in page_json(record)
    big = dataclasses.replace(record, evidence=tuple(EventId(f"e-{i}") for i in range(5000)))
    doc = page_json(big)
    assert doc["evidence"] == [f"e-{i}" for i in range(RAW_EVIDENCE)]
    assert doc["evidence_not_shown"] == 5000 - RAW_EVIDENCE


def test_a_note_edited_behind_the_triggers_is_found(
    signed_in: tuple[TestClient, str], web: Web, tmp_path: Path
) -> None:
    """The trail kept each note's SHA-256, but nothing compared it with the note."""
    client, csrf = signed_in
    url = f"/alerts/{web.alert_id}/notes"
    assert client.post(url, data={"note": "manager confirms", "csrf": csrf}).status_code == 303
    html = client.get("/audit").text
    assert "Chain verified" in html and "Notes verified: 1 note," in html
    with sqlite3.connect(tmp_path / "collector.db") as con:
        con.execute("DROP TRIGGER alert_notes_no_update")
        con.execute("UPDATE alert_notes SET text = 'nothing to see here'")
    con.close()
    html = client.get("/audit").text
    assert "Chain verified" in html  # the trail itself is intact ...
    assert "Notes CHANGED" in html and "is not what trail entry" in html  # ... the note not
    check = web.console.triage.verify_notes()
    assert not check.ok and check.count == 1
    # `trail verify` on the command line says so too, and exits 1.
    (tmp_path / "ca.crt").write_bytes(b"")  # what marks a data directory
    out = io.StringIO()
    assert cli.main(["trail", "verify", "--data", str(tmp_path)], out=out) == 1
    assert "FAIL note 1 on alert" in out.getvalue()


def test_abandoned_sessions_are_swept_at_the_next_login(web: Web, tmp_path: Path) -> None:
    for _ in range(3):  # browsers closed a day ago without signing out
        web.console.sessions.create("ann", now_ns=time.time_ns() - 86400 * 10**9)
    with web.client() as client:
        login(client, "sam")
    with sqlite3.connect(tmp_path / "collector.db") as con:
        (left,) = con.execute("SELECT user FROM sessions").fetchall()
    con.close()
    assert left == ("sam",)


def test_an_admin_cannot_lock_themselves_out_by_changing_case(web: Web) -> None:
    with web.client() as client:
        csrf = login(client, "ada")
        r = client.post("/users/ADA/lock", data={"csrf": csrf})
        assert r.status_code == 400 and "cannot lock yourself out" in r.text
        assert client.get("/users").status_code == 200  # still signed in
    user = web.console.users.get("ada")
    assert user is not None and not user.locked


def test_a_session_cookie_never_outlives_the_browser(web: Web) -> None:
    """Verified, not changed: no Max-Age or Expires, so closing the browser drops it."""
    with web.client() as other:
        form = other.get("/login")
        token = form.text.split('name="csrf" value="', 1)[1].split('"', 1)[0]
        r = other.post("/login", data={"name": "sam", "password": PASSWORD, "csrf": token})
    cookie = next(v for k, v in r.headers.multi_items() if k == "set-cookie" and COOKIE in v)
    assert "max-age" not in cookie.lower() and "expires" not in cookie.lower()
