"""The console in process (Starlette's TestClient): headers, sign-in, CSRF, Origin, roles,
escaping, pagination, decisions and the trail they leave."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
import time

import pytest
from starlette.testclient import TestClient

from collector.ingest import Ingestor
from collector.models import AlertStatus
from collector.policy import load_policy
from collector.web.app import create_app
from collector.web.security import COOKIE, CSP, LOGIN_COOKIE
from exfilwatch.v1 import events_pb2
from tests.collector.batches import T0, BatchChain, enroll, new_agent
from tests.conftest import POLICY
from tests.web.conftest import ORIGIN, PASSWORD, Web, login, page_token, seed_alert


def test_every_response_carries_the_security_headers(web: Web) -> None:
    with web.client() as client:
        for path in ("/login", "/alerts", "/static/console.css", "/nowhere"):
            r = client.get(path)
            assert r.headers["content-security-policy"] == CSP, path
            assert "script-src 'self'" in CSP and "unsafe-inline" not in CSP
            assert r.headers["strict-transport-security"].startswith("max-age=")
            assert r.headers["x-content-type-options"] == "nosniff"
            assert r.headers["referrer-policy"] == "same-origin"
            assert r.headers["x-frame-options"] == "DENY"
        login(client, "vic")
        assert client.get("/alerts").headers["cache-control"] == "no-store"
        assert client.get(f"/alerts/{web.alert_id}").headers["cache-control"] == "no-store"


def test_pages_need_a_session(web: Web) -> None:
    with web.client() as client:
        for path in (
            "/alerts",
            f"/alerts/{web.alert_id}",
            "/events",
            "/agents",
            "/audit",
            "/rules",
        ):
            r = client.get(path)
            assert r.status_code == 303 and r.headers["location"].startswith("/login?next=")


def test_login_sets_a_host_only_secure_cookie_and_renews_it(web: Web) -> None:
    with web.client() as client, web.client() as other:
        login(client, "sam")
        first = client.cookies[COOKIE]
        assert client.get("/login").status_code == 303  # already signed in
        # Sign in again with the old session cookie still sent: a new id, the old one dead.
        form = other.get("/login")
        token = re.search(r'name="csrf" value="([^"]*)"', form.text)
        assert token
        client.cookies.set(LOGIN_COOKIE, other.cookies[LOGIN_COOKIE])
        data = {"name": "sam", "password": PASSWORD, "csrf": token[1]}
        r = client.post("/login", data=data)
        assert r.status_code == 303
        second = r.cookies[COOKIE]
        assert second != first
        assert web.console.sessions.get(first, now_ns=time.time_ns()) is None
        assert web.console.sessions.get(second, now_ns=time.time_ns()) is not None
    raw = client_cookie_header(web)
    for part in ("__Host-exfw_session=", "Secure", "HttpOnly", "SameSite=strict", "Path=/"):
        assert part.lower() in raw.lower()
    assert "domain=" not in raw.lower()


def client_cookie_header(web: Web) -> str:
    with web.client() as client:
        form = client.get("/login")
        token = re.search(r'name="csrf" value="([^"]*)"', form.text)
        assert token
        r = client.post("/login", data={"name": "sam", "password": PASSWORD, "csrf": token[1]})
        return r.headers["set-cookie"]


def test_wrong_password_is_refused_counted_and_in_the_trail(web: Web) -> None:
    with web.client() as client:
        form = client.get("/login")
        token = re.search(r'name="csrf" value="([^"]*)"', form.text)
        assert token
        r = client.post("/login", data={"name": "sam", "password": "nope" * 4, "csrf": token[1]})
        assert r.status_code == 401
        assert "wrong user name or password" in r.text
        assert COOKIE not in client.cookies
    failed = web.console.trail.entries(target="user:sam")
    assert failed[0].action == "login_failed"
    assert web.console.users.login_delay("sam", "testclient", time.time_ns()) > 0


def test_login_form_without_its_token_or_from_elsewhere_is_refused(web: Web) -> None:
    with web.client() as client:
        client.get("/login")
        r = client.post("/login", data={"name": "sam", "password": PASSWORD})
        assert r.status_code == 403
        form = client.get("/login")
        token = re.search(r'name="csrf" value="([^"]*)"', form.text)
        assert token
        data = {"name": "sam", "password": PASSWORD, "csrf": token[1]}
        r = client.post("/login", data=data, headers={"origin": "https://evil.example"})
        assert r.status_code == 403
        assert COOKIE not in client.cookies


def test_state_change_needs_csrf_token_and_own_origin(
    web: Web, signed_in: tuple[TestClient, str]
) -> None:
    client, csrf = signed_in
    url = f"/alerts/{web.alert_id}/notes"
    assert client.post(url, data={"note": "no token"}).status_code == 403
    assert client.post(url, data={"note": "bad", "csrf": "x" * 43}).status_code == 403
    evil = {"origin": "https://evil.example"}
    assert client.post(url, data={"note": "x", "csrf": csrf}, headers=evil).status_code == 403
    no_origin = TestClient(web.app, base_url=ORIGIN, follow_redirects=False)
    no_origin.cookies = client.cookies
    assert no_origin.post(url, data={"note": "x", "csrf": csrf}).status_code == 403
    assert web.console.triage.notes(web.alert_id) == []
    ok = client.post(url, data={"note": "looked at it", "csrf": csrf})
    assert ok.status_code == 303
    via_header = client.post(url, data={"note": "htmx"}, headers={"x-csrf-token": csrf})
    assert via_header.status_code == 303
    assert [n.text for n in web.console.triage.notes(web.alert_id)] == ["looked at it", "htmx"]


def test_viewer_sees_no_buttons_and_every_forged_post_is_refused(web: Web) -> None:
    with web.client() as client:
        csrf = login(client, "vic")
        page = client.get(f"/alerts/{web.alert_id}").text
        for marker in ("/status", "/assign", "/notes", "/export", 'form="bulk"'):
            assert marker not in page
        base = f"/alerts/{web.alert_id}"
        posts = {
            f"{base}/status": {"status": "in_progress"},
            f"{base}/assign": {"assignee": "@me"},
            f"{base}/notes": {"note": "viewer"},
            f"{base}/export": {"format": "csv"},
            "/alerts/bulk": {"ids": str(web.alert_id), "op": "assign", "assignee": "@me"},
            "/users": {"name": "eve", "role": "admin", "password": PASSWORD},
            "/users/sam/lock": {},
        }
        for url, data in posts.items():
            r = client.post(url, data={**data, "csrf": csrf})
            assert r.status_code == 403, url
            assert "role" in r.text
        assert client.get("/users").status_code == 403
    alert = web.console.reader.alert(web.alert_id)
    assert alert is not None and alert.status is AlertStatus.NEW and alert.assignee is None
    assert web.console.users.get("eve") is None


def test_analyst_cannot_manage_users_or_revoke_agents(
    web: Web, signed_in: tuple[TestClient, str]
) -> None:
    client, csrf = signed_in
    agent_id = web.console.reader.alert(web.alert_id).agent_id  # type: ignore[union-attr]
    r = client.post(f"/agents/{agent_id}/revoke", data={"csrf": csrf, "confirm": agent_id})
    assert r.status_code == 403
    assert client.get(f"/agents/{agent_id}/revoke").status_code == 403
    assert not web.console.reader.agent(agent_id).revoked  # type: ignore[union-attr]


def test_hostile_file_names_are_text(web: Web, signed_in: tuple[TestClient, str]) -> None:
    client, _ = signed_in
    html = client.get(f"/alerts/{web.alert_id}").text
    assert "<img src=x" not in html and "<script>alert" not in html
    assert "&lt;img src=x onerror=alert(1)&gt;.docx" in html
    assert "&#34;&gt;&lt;script&gt;alert(2)&lt;/script&gt;.xlsx" in html
    # no inline script or style at all: CSP would block it, and we never write any
    assert re.search(r"<script(?![^>]*\bsrc=)", html) is None
    assert " style=" not in html and "<style" not in html


def test_a_network_share_shows_its_remote_as_text(
    web: Web, signed_in: tuple[TestClient, str]
) -> None:
    agent = new_agent()
    enroll(web.store, agent)
    chain = BatchChain(agent)
    remote = "//203.0.113.9/<b>drop</b>"
    share = events_pb2.Device(fs_type="cifs", mount_point=b"/mnt/drop", remote=remote)
    events = chain.events(
        200,  # configs/policy.yaml: bulk-copy-to-network-share, 200 files in 1 h
        destination_class=events_pb2.DESTINATION_CLASS_NETWORK_SHARE,
        destination=events_pb2.FileRef(path=b"/mnt/drop/q3.xlsx", size=1000, sha256="a" * 64),
        device=share,
    )
    ingest = Ingestor(web.store, load_policy(POLICY))
    ingest.upload(chain.next(events).raw, agent.agent_id, T0 + 10**12)
    (alert,) = [a for a in web.store.list_alerts() if a.rule == "bulk-copy-to-network-share"]
    client, _ = signed_in
    html = client.get(f"/alerts/{alert.alert_id}").text
    assert "<dt>remote</dt>" in html
    assert "//203.0.113.9/&lt;b&gt;drop&lt;/b&gt;" in html and "<b>drop" not in html


def test_the_device_panel_says_when_the_user_first_used_the_stick(
    web: Web, signed_in: tuple[TestClient, str]
) -> None:
    client, _ = signed_in
    copies = [e for e in web.store.list_events(limit=1000) if e.device is not None]
    first = min(e.observed_at_ns for e in copies)
    html = client.get(f"/alerts/{web.alert_id}").text
    shown = dt.datetime.fromtimestamp(first / 1e9, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
    assert f"<dt>first used</dt><dd>by alice {shown}" in html
    # A month earlier alice had copied one file to the same stick: that is the first use.
    agent = new_agent()
    enroll(web.store, agent)
    chain = BatchChain(agent, now_ns=first - 30 * 86_400 * 10**9)
    Ingestor(web.store, load_policy(POLICY)).upload(
        chain.next(n=1).raw, agent.agent_id, first - 30 * 86_400 * 10**9 + 10**10
    )
    html = client.get(f"/alerts/{web.alert_id}").text
    month_ago = first - 30 * 86_400 * 10**9 + 10**9
    shown = dt.datetime.fromtimestamp(month_ago / 1e9, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
    assert f"<dt>first used</dt><dd>by alice {shown}" in html


def test_decisions_reach_history_and_trail(web: Web, signed_in: tuple[TestClient, str]) -> None:
    client, csrf = signed_in
    base = f"/alerts/{web.alert_id}"
    assert client.post(f"{base}/assign", data={"assignee": "@me", "csrf": csrf}).status_code == 303
    r = client.post(f"{base}/status", data={"status": "false_positive", "csrf": csrf})
    assert r.status_code == 409 and "reason" in r.text  # closing needs a reason
    data = {"status": "false_positive", "reason": "backup drive", "csrf": csrf}
    assert client.post(f"{base}/status", data=data).status_code == 303
    alert = web.console.reader.alert(web.alert_id)
    assert alert is not None
    assert (alert.status, alert.assignee) == (AlertStatus.FALSE_POSITIVE, "sam")
    page = client.get(base).text
    assert "backup drive" in page and "alert_assign" in page
    actions = [(e.actor, e.action) for e in web.console.trail.history(f"alert:{web.alert_id}")]
    assert actions == [("sam", "alert_assign"), ("sam", "alert_status")]
    audit = client.get("/audit").text
    assert "Chain verified" in audit and f"alert:{web.alert_id}" in audit


def test_export_is_a_download_and_a_trail_entry(
    web: Web, signed_in: tuple[TestClient, str]
) -> None:
    client, csrf = signed_in
    r = client.post(f"/alerts/{web.alert_id}/export", data={"format": "csv", "csrf": csrf})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    assert "attachment" in r.headers["content-disposition"]
    lines = r.text.splitlines()
    assert lines[0].startswith("alert_id,event_id") and len(lines) == 1 + 25
    assert any("<img src=x onerror=alert(1)>.docx" in line for line in lines)
    r = client.post(f"/alerts/{web.alert_id}/export", data={"format": "json", "csrf": csrf})
    doc = json.loads(r.text)
    assert doc["alert_id"] == web.alert_id and len(doc["events"]) == 25
    exports = web.console.trail.entries(target=f"alert:{web.alert_id}")
    assert [e.detail["format"] for e in exports if e.action == "alert_export"] == ["json", "csv"]


def test_csv_export_defuses_formulas(web: Web, signed_in: tuple[TestClient, str]) -> None:
    from collector.web.views.alerts import _cell

    assert _cell("=HYPERLINK(1)") == "'=HYPERLINK(1)"
    assert _cell("@SUM") == "'@SUM" and _cell("report.docx") == "report.docx"


def test_bulk_status_and_assign(web: Web, signed_in: tuple[TestClient, str]) -> None:
    client, csrf = signed_in
    second = seed_alert(web.store, files=21, hostile=False)
    ids = [str(web.alert_id), str(second)]
    data = {"ids": ids, "op": "assign", "assignee": "ann", "csrf": csrf}
    assert client.post("/alerts/bulk", data=data).status_code == 303
    data = {"ids": ids, "op": "status", "status": "in_progress", "csrf": csrf}
    assert client.post("/alerts/bulk", data=data).status_code == 303
    for alert_id in (web.alert_id, second):
        alert = web.console.reader.alert(alert_id)
        assert alert is not None
        assert (alert.status, alert.assignee) == (AlertStatus.IN_PROGRESS, "ann")
    # all or nothing: closing without a reason changes neither
    data = {"ids": ids, "op": "status", "status": "resolved", "csrf": csrf}
    assert client.post("/alerts/bulk", data=data).status_code == 409
    assert web.console.reader.alert(second).status is AlertStatus.IN_PROGRESS  # type: ignore[union-attr]


def test_alerts_filter_sort_and_paginate(web: Web, signed_in: tuple[TestClient, str]) -> None:
    client, _ = signed_in
    for _ in range(3):
        seed_alert(web.store, files=21, hostile=False)
    rows = re.compile(r'<tr>\s*<td><input type="checkbox" name="ids" value="(\d+)"')
    page1 = client.get("/alerts?f=1&status=new&sort=id&order=asc&size=25").text
    assert rows.findall(page1)[:4] == sorted(rows.findall(page1))[:4]
    assert len(rows.findall(client.get("/alerts?sort=id&size=25&page=1").text)) == 4
    assert rows.findall(client.get("/alerts?user=bob").text) == []
    assert len(rows.findall(client.get("/alerts?user=alice&rule=bulk-copy-to-usb").text)) == 4
    assert client.get("/alerts?sort=password").status_code == 400
    assert client.get("/alerts?page=0").status_code == 400
    assert client.get("/alerts?page=100000").status_code == 400
    assert client.get("/alerts?since=yesterday").status_code == 400
    # resolved alerts leave the default view
    web.console.triage.set_status(
        web.alert_id, "resolved", actor="sam", reason="ok", now_ns=time.time_ns()
    )
    default = rows.findall(client.get("/alerts").text)
    assert str(web.alert_id) not in default and len(default) == 3
    everything = rows.findall(client.get("/alerts?f=1").text)
    assert str(web.alert_id) in everything


def test_events_search_and_agents(web: Web, signed_in: tuple[TestClient, str]) -> None:
    client, _ = signed_in
    html = client.get("/events?name=onerror").text
    assert html.count("onerror=alert(1)&gt;.docx") == 2  # source and destination
    assert "KINGSTON" in client.get("/events?sha256=" + "c" * 64).text
    assert client.get("/events?sha256=zz").status_code == 400
    seed_alert(web.store, files=21, hostile=False)
    first = client.get("/events?user=alice&size=25").text
    older = re.search(r'href="\?([^"]*before=[^"]*)" rel="next"', first)
    assert older is not None
    second = client.get("/events?" + older[1].replace("&amp;", "&")).text
    assert 'rel="next"' not in second
    stamps = re.compile(r"<tr>\s*<td>([^<]+)</td><td>alice</td>")
    assert len(stamps.findall(first)) == 25 and len(stamps.findall(second)) == 21
    agents = client.get("/agents").text
    assert "lt-0412" in agents and "Revoke" not in agents  # analysts do not revoke
    assert "<th>CPU</th><th>Memory</th>" in agents and "MiB" not in agents  # none reported
    for agent in web.store.list_agents():
        web.store.touch_agent(agent.agent_id, T0, cpu_percent=2.25, rss_bytes=71 * 2**20)
    agents = client.get("/agents").text
    assert '<td class="num">2.2%</td>' in agents and "71.0 MiB" in agents


def test_admin_revokes_after_confirming_and_adds_users(web: Web) -> None:
    agent_id = web.console.reader.alert(web.alert_id).agent_id  # type: ignore[union-attr]
    with web.client() as client:
        csrf = login(client, "ada")
        assert "Revoke" in client.get("/agents").text
        assert agent_id in client.get(f"/agents/{agent_id}/revoke").text
        url = f"/agents/{agent_id}/revoke"
        assert client.post(url, data={"csrf": csrf, "confirm": "no"}).status_code == 400
        assert not web.console.reader.agent(agent_id).revoked  # type: ignore[union-attr]
        assert client.post(url, data={"csrf": csrf, "confirm": agent_id}).status_code == 303
        assert web.console.reader.agent(agent_id).revoked  # type: ignore[union-attr]
        data = {"name": "lee", "role": "viewer", "password": PASSWORD, "csrf": csrf}
        assert client.post("/users", data=data).status_code == 303
        assert client.post("/users/sam/lock", data={"csrf": csrf}).status_code == 303
    actions = [e.action for e in web.console.trail.entries(limit=10)]
    assert {"agent_revoke", "user_add", "user_lock"} <= set(actions)
    assert web.console.users.get("sam").locked  # type: ignore[union-attr]


def test_locked_user_is_signed_out(web: Web, signed_in: tuple[TestClient, str]) -> None:
    client, _ = signed_in
    web.console.users.lock("sam", actor="ada", now_ns=time.time_ns())
    assert client.get("/alerts").status_code == 303


def test_logout_ends_the_session(web: Web, signed_in: tuple[TestClient, str]) -> None:
    client, csrf = signed_in
    cookie = client.cookies[COOKIE]
    assert client.post("/logout", data={"csrf": csrf}).status_code == 303
    assert web.console.sessions.get(cookie, now_ns=time.time_ns()) is None
    assert client.get("/alerts").status_code == 303


def test_unknown_alert_and_page_are_plain_errors(signed_in: tuple[TestClient, str]) -> None:
    client, _ = signed_in
    r = client.get("/alerts/999999")
    assert r.status_code == 404 and "no alert 999999" in r.text
    assert "Traceback" not in r.text
    assert client.get("/nowhere").status_code == 404


@pytest.mark.parametrize("next_url", ["//evil.example/", "https://evil.example/", "/\\evil"])
def test_login_never_redirects_off_site(web: Web, next_url: str) -> None:
    with web.client() as client:
        form = client.get("/login")
        token = re.search(r'name="csrf" value="([^"]*)"', form.text)
        assert token
        data = {"name": "vic", "password": PASSWORD, "csrf": token[1], "next": next_url}
        r = client.post("/login", data=data)
        assert r.headers["location"] == "/alerts"


def test_csrf_token_is_in_every_page_form(signed_in: tuple[TestClient, str], web: Web) -> None:
    client, csrf = signed_in
    html = client.get(f"/alerts/{web.alert_id}").text
    forms = re.findall(r'<form[^>]*method="post".*?</form>', html, re.S)
    assert forms and all(f'name="csrf" value="{csrf}"' in f for f in forms)
    assert page_token(html) == csrf


def test_idle_session_expires_on_the_console_clock(web: Web) -> None:
    now = [time.time_ns()]
    console = dataclasses.replace(web.console, clock=lambda: now[0])
    with TestClient(create_app(console), base_url=ORIGIN, headers={"origin": ORIGIN},
                    follow_redirects=False) as client:  # fmt: skip
        login(client, "sam")
        now[0] += 29 * 60 * 10**9
        assert client.get("/alerts").status_code == 200
        now[0] += 31 * 60 * 10**9  # 31 minutes after the last request: idle timeout
        r = client.get("/alerts", headers={"hx-request": "true"})
        assert r.status_code == 204 and r.headers["hx-redirect"].startswith("/login?next=")
