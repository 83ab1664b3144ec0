"""The console in a real browser: Playwright driving Debian's chromium over HTTPS.

One journey against real processes (an agent's copies raise the alert an analyst then
decides), and the refusals against an in-process console. Any JavaScript dialog fails a
test: a file name that ran script would open one.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Dialog, Page, sync_playwright

from collector import pki
from collector.web.app import create_app
from collector.web.security import CSP
from collector.web.server import ConsoleServer
from tests.e2e.conftest import collector, make_agent, set_label, workspace  # noqa: F401 (fixtures)
from tests.procs import ROOT, Collector, env, wait_until
from tests.web.conftest import HOSTILE_RULE, PASSWORD, LongWeb, Web

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-gpu",
    "--no-first-run",
    "--disable-sync",
]
ARTIFACTS = ROOT / "test-artifacts"
IMG = "<img src=x onerror=alert(1)>.docx"
SCRIPT_DIR, SCRIPT_FILE = '"><script>alert(2)<', "script>.xlsx"
"""`"><script>alert(2)</script>.xlsx`: a `/` cannot be in a name, so it is a folder and a
file, and the path shown contains the whole string."""

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


@pytest.fixture
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        if os.geteuid() == 0:
            pytest.fail("no /usr/bin/chromium: run `make chromium` (.ci/run does) first")
        pytest.skip("no /usr/bin/chromium and not root to install it: apt-get install chromium")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            yield b
        finally:
            b.close()


class Watch:
    """What a page must never do: open a dialog, or break the Content-Security-Policy."""

    def __init__(self, page: Page) -> None:
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        page.on("dialog", self._dialog)
        page.on("console", self._console)

    def _dialog(self, dialog: Dialog) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def _console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.errors.append(message.text)

    def check(self) -> None:
        assert self.dialogs == [], f"a dialog opened: {self.dialogs}"
        violations = [e for e in self.errors if "Content Security Policy" in e]
        assert violations == [], violations


def sign_in(page: Page, base: str, name: str) -> None:
    page.goto(base + "login")
    page.fill("input[name=name]", name)
    page.fill("input[name=password]", PASSWORD)
    page.click("button:has-text('Sign in')")
    page.wait_for_url(re.compile(r".*/alerts$"))


def add_user(c: Collector, name: str, role: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "collector", "users", "add", name, "--role", role,
         "--password-stdin", "--data", str(c.data)],
        input=PASSWORD + "\n", text=True, env=env(), cwd=ROOT, check=True, timeout=60,
        capture_output=True,
    )  # fmt: skip


def copy_to_usb(workspace: Path) -> int:  # noqa: F811 (the fixture's name, a plain argument)
    """22 confidential files, two named to attack the console, copied to the USB folder."""
    sensitive, usb = workspace / "sensitive", workspace / "usb"
    (sensitive / SCRIPT_DIR).mkdir()
    (usb / SCRIPT_DIR).mkdir()
    sources = [sensitive / IMG, sensitive / SCRIPT_DIR / SCRIPT_FILE]
    sources += [sensitive / f"plan{i:02d}.docx" for i in range(20)]
    for i, path in enumerate(sources):
        path.write_bytes(f"quarterly plan {i} ".encode() * (200 + 31 * i))
        set_label(path, "confidential")
    for path in sources:
        shutil.copy(path, usb / path.relative_to(sensitive))
    return len(sources)


def test_analyst_decides_an_alert_raised_by_a_real_agent(
    collector: Collector,  # noqa: F811
    make_agent,  # noqa: F811
    workspace: Path,  # noqa: F811
    browser: Browser,
) -> None:
    assert collector.console.startswith("https://127.0.0.1:")
    add_user(collector, "sam", "analyst")
    make_agent()
    n = copy_to_usb(workspace)

    def alert() -> dict[str, object] | None:
        return next((a for a in collector.cli_json("alerts", "list") if a["files"] == n), None)

    alert_id = wait_until(alert, 90, f"an alert with {n} files")["alert_id"]
    base = collector.console
    context = browser.new_context(ignore_https_errors=True, viewport={"width": 1400, "height": 900})
    page = context.new_page()
    watch = Watch(page)
    try:
        sign_in(page, base, "sam")
        row = page.locator(f"a[href='/alerts/{alert_id}']").last
        row.click()
        page.wait_for_url(re.compile(rf".*/alerts/{alert_id}$"))
        response = page.reload()
        assert response is not None and response.headers["content-security-policy"] == CSP

        # Attacker-chosen names are shown as text and never become markup.
        files = page.locator("#files")
        assert files.get_by_text(IMG).count() == 2  # source and destination
        assert files.get_by_text(f"{SCRIPT_DIR}/{SCRIPT_FILE}").count() == 2
        assert page.locator("img").count() == 0
        assert page.locator("main script").count() == 0
        assert page.locator("svg path").count() == 1  # the timeline
        assert page.locator("svg line.threshold").count() == 1
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "alert-page.png"), full_page=True)

        page.click("button:has-text('Assign to me')")
        page.wait_for_url(re.compile(rf".*/alerts/{alert_id}$"))
        assert page.inner_text("#assignee") == "sam"

        page.fill("textarea[name=note]", "USB stick belongs to the backup rota; checked with IT.")
        page.click("button:has-text('Add note')")  # htmx: the notes section is swapped
        page.wait_for_selector("#notes .note-text:has-text('backup rota')")

        page.select_option("form.close select[name=status]", "false_positive")
        page.fill("form.close input[name=reason]", "sanctioned backup to an IT-issued stick")
        page.click("form.close button:has-text('Close')")
        page.wait_for_selector("h1 .status-false_positive")

        history = page.inner_text("#history")
        for action in ("alert_assign", "alert_note", "alert_status"):
            assert action in history
        assert "sanctioned backup" in history

        page.click("nav a:has-text('Audit trail')")
        assert "Chain verified" in page.inner_text("#verdict")
        trail = page.inner_text("table.trail")
        assert "sam" in trail and "login" in trail and f"alert:{alert_id}" in trail
        watch.check()
    finally:
        context.close()


def serve(web: Web, tmp_path: Path) -> Iterator[str]:
    """`web`'s console over HTTPS on a free port, in this process."""
    pki.init_pki(tmp_path / "pki")
    server = ConsoleServer(
        create_app(web.console), listen="127.0.0.1:0",
        certfile=tmp_path / "pki" / pki.SERVER_CERT, keyfile=tmp_path / "pki" / pki.SERVER_KEY,
    )  # fmt: skip
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def served(web: Web, tmp_path: Path) -> Iterator[str]:
    """The seeded console over HTTPS on a free port, in this process."""
    yield from serve(web, tmp_path)


@pytest.fixture
def long_served(long_web: LongWeb, tmp_path: Path) -> Iterator[str]:
    """The console with long rules (tests/web/conftest.py `long_web`), over HTTPS."""
    yield from serve(long_web, tmp_path)


def test_viewer_has_no_buttons_and_forged_posts_are_refused(
    web: Web, served: str, browser: Browser
) -> None:
    base, alert = served, f"alerts/{web.alert_id}"
    context = browser.new_context(ignore_https_errors=True)
    page = context.new_page()
    watch = Watch(page)
    try:
        sign_in(page, base, "vic")
        assert page.locator("input[type=checkbox][name=ids]").count() == 0
        page.goto(base + alert)
        assert page.get_by_text(IMG).count() == 2
        for label in ("Assign to me", "Close", "Start work", "Add note", "Export CSV"):
            assert page.locator(f"button:has-text('{label}')").count() == 0
        token = page.get_attribute("meta[name=csrf-token]", "content")
        origin = {"origin": base.rstrip("/")}
        forged = page.request.post(
            base + alert + "/status", form={"status": "in_progress", "csrf": token or ""},
            headers=origin, max_redirects=0,
        )  # fmt: skip
        assert forged.status == 403 and "analyst role" in forged.text()
        watch.check()
    finally:
        context.close()
    assert web.console.reader.alert(web.alert_id).status == "new"  # type: ignore[union-attr]


def test_a_form_posted_without_its_csrf_token_is_refused(
    web: Web, served: str, browser: Browser
) -> None:
    base = served
    context = browser.new_context(ignore_https_errors=True)
    page = context.new_page()
    watch = Watch(page)
    try:
        sign_in(page, base, "sam")
        page.goto(f"{base}alerts/{web.alert_id}")
        # htmx adds the token as a header: a note goes in without a reload
        page.fill("textarea[name=note]", "first look")
        page.click("button:has-text('Add note')")
        page.wait_for_selector("#notes .note-text:has-text('first look')")
        # The same form, its hidden token removed, posted by the browser itself
        start = page.locator("form:has(button:has-text('Start work'))")
        start.locator("input[name=csrf]").evaluate("e => e.remove()")
        with page.expect_response(lambda r: r.request.method == "POST") as posted:
            start.locator("button").click()
        assert posted.value.status == 403
        assert "security token" in page.inner_text("main")
        watch.check()
    finally:
        context.close()
    alert = web.console.reader.alert(web.alert_id)
    assert alert is not None and alert.status == "new"
    assert [n.text for n in web.console.triage.notes(web.alert_id)] == ["first look"]


def test_a_long_rule_alert_and_the_rules_page_render(
    long_web: LongWeb, long_served: str, browser: Browser
) -> None:
    """The cumulative alert's chart against its tiers, and the Rules page's weekly bars and
    numbers, drawn by the browser under the CSP, hostile rule and user names as text."""
    base = long_served
    alert_id = long_web.alerts[("trickle-30d", "alice")]
    record = long_web.console.reader.alert_record(alert_id)
    assert record is not None
    raised = sum(1 for rule, _ in long_web.alerts if rule == "trickle-30d")
    context = browser.new_context(ignore_https_errors=True, viewport={"width": 1400, "height": 900})
    page = context.new_page()
    watch = Watch(page)
    try:
        sign_in(page, base, "vic")
        page.goto(f"{base}alerts/{alert_id}")
        assert page.inner_text("#rule-kind") == "cumulative"
        measure = page.locator("#measure svg")
        assert measure.locator("path.measure").count() == 1
        assert measure.locator("line.threshold").count() == 2
        assert measure.locator("circle").count() == len(record.evidence)  # one per event
        assert measure.locator("text.level").all_text_contents() == ["medium 4", "high 8"]
        box = measure.bounding_box()
        assert box is not None and box["width"] > 300 and box["height"] > 100  # drawn
        assert page.inner_text("#latest").startswith(f"{len(record.evidence)} distinct files")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "long-alert-page.png"), full_page=True)

        page.click("nav a:has-text('Rules')")
        page.wait_for_url(re.compile(r".*/rules$"))
        table = page.locator("table.rules")
        assert table.locator("tbody tr").count() == 4
        assert table.locator("svg.bars").count() == 4
        assert table.locator("rect.week").count() == 48
        assert page.inner_text("#users-seen") == "13"  # alice, bob, the insider, ten others
        assert table.get_by_text(HOSTILE_RULE, exact=True).count() == 1  # a name, as text
        assert page.locator("img").count() == 0 and page.locator("main script").count() == 0
        trickle = table.locator("tr", has_text="trickle-30d")
        assert trickle.locator("td.raised").inner_text() == str(raised)
        assert trickle.locator("td.effectiveness").inner_text() == "-"
        assert page.locator("#noisy").is_visible()
        assert page.locator("nav a:has-text('Audit trail')").count() == 0  # a viewer
        page.screenshot(path=str(ARTIFACTS / "rules-page.png"), full_page=True)
        watch.check()
    finally:
        context.close()
