"""The console commands of exfilwatch-collector: users, alert triage and the trail.

Real processes where a password is read (--password-stdin) and for exit codes; in
process (`main(argv, out)`) for the rest, on a real data directory.
"""

from __future__ import annotations

import getpass
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from collector.errors import AuthError
from collector.store import SqliteStore
from collector.trail import Trail
from collector.triage import Triage
from collector.users import Users
from tests.collector.batches import T0
from tests.collector.clirun import run
from tests.procs import ROOT, env

PW = "correct horse battery"


def cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """`python -m collector ARGS` with `stdin` as its standard input."""
    return subprocess.run(
        [sys.executable, "-m", "collector", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env(),
        cwd=ROOT,
        timeout=60,
        check=False,
    )


def raise_alert(data: Path, n: int = 1) -> int:
    with SqliteStore.open(data / "collector.db") as store:
        return int(store.record_security_alert(f"ag-{n}", "SignatureError", "bad sig", T0))


def test_users_and_triage_end_to_end(data: Path) -> None:
    d = str(data)
    r = cli("users", "add", "dana", "--role", "admin", "--password-stdin", "--data", d, stdin=PW)
    assert (r.returncode, r.stdout) == (0, "added dana (admin)\n"), r.stderr
    r = cli(
        "users", "add", "sam", "--role", "analyst", "--password-stdin", "--actor", "dana",
        "--data", d, stdin=PW + "\n",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = cli("users", "add", "lee", "--role", "viewer", "--password-stdin", "--data", d, stdin="x")
    assert r.returncode == 2 and "at least 12 characters" in r.stderr
    assert "Traceback" not in r.stderr
    r = cli("users", "add", "lee", "--role", "viewer", "--data", d, stdin=PW)  # no terminal
    assert r.returncode == 2 and "--password-stdin" in r.stderr

    alert_id = str(raise_alert(data))
    r = cli("alerts", "status", alert_id, "resolved", "--data", d)
    assert r.returncode == 2 and "needs a reason" in r.stderr
    r = cli("alerts", "assign", alert_id, "sam", "--actor", "dana", "--data", d)
    assert (r.returncode, r.stdout) == (0, f"alert #{alert_id} assigned to sam\n"), r.stderr
    for argv in (
        ("alerts", "status", alert_id, "in_progress", "--actor", "sam"),
        ("alerts", "note", alert_id, "asked alice's manager", "--actor", "sam"),
        ("alerts", "status", alert_id, "false_positive", "--reason", "backup", "--actor", "sam"),
    ):
        assert run(*argv, "--data", d)[0] == 0

    with SqliteStore.open(data / "collector.db") as store:
        users = Users(store)
        assert users.authenticate("sam", PW, now_ns=T0, client="127.0.0.1").name == "sam"
        alert, _ = store.get_alert(int(alert_id))
        assert (alert.status, alert.assignee) == ("false_positive", "sam")
        notes = Triage(store, Trail(store)).notes(int(alert_id))
        assert [(n.author, n.text) for n in notes] == [("sam", "asked alice's manager")]
    rc, text = run("users", "lock", "sam", "--data", d)
    assert (rc, text) == (0, "sam: locked, sessions ended\n")
    with SqliteStore.open(data / "collector.db") as store, pytest.raises(AuthError):
        Users(store).authenticate("sam", PW, now_ns=T0, client="127.0.0.1")

    rc, text = run("users", "list", "--json", "--data", d)
    listed = [json.loads(line) for line in text.splitlines()]
    assert [(u["name"], u["role"], u["locked"]) for u in listed] == [
        ("dana", "admin", False),
        ("sam", "analyst", True),
    ]
    rc, text = run("trail", "list", "--json", "--target", f"alert:{alert_id}", "--data", d)
    entries = [json.loads(line) for line in text.splitlines()][::-1]
    assert [(e["actor"], e["action"], e["detail"]) for e in entries] == [
        ("dana", "alert_assign", {"from": None, "to": "sam"}),
        ("sam", "alert_status", {"from": "new", "to": "in_progress"}),
        ("sam", "alert_note", entries[2]["detail"]),
        (
            "sam",
            "alert_status",
            {"from": "in_progress", "to": "false_positive", "reason": "backup"},
        ),
    ]
    rc, text = run("trail", "list", "--json", "--data", d)
    by_actor = {(e["action"], e["target"]): e["actor"] for e in map(json.loads, text.splitlines())}
    assert by_actor[("user_add", "user:dana")] == "cli:" + getpass.getuser()
    assert by_actor[("user_add", "user:sam")] == "dana"
    assert by_actor[("login", "user:sam")] == "sam"
    rc, text = run("trail", "verify", "--data", d)
    assert rc == 0 and ", chain intact, head " in text


def test_trail_verify_exits_1_and_names_the_first_bad_entry(data: Path) -> None:
    d = str(data)
    alert_id = raise_alert(data)
    for i in range(3):
        assert (
            run("alerts", "note", str(alert_id), f"note {i}", "--actor", "sam", "--data", d)[0] == 0
        )
    r = cli("trail", "verify", "--data", d)
    assert r.returncode == 0 and r.stdout.startswith("trail: 3 entries, chain intact, head ")
    with sqlite3.connect(data / "collector.db") as con:
        con.execute("DROP TRIGGER trail_no_update")
        con.execute("UPDATE trail SET actor = 'dana' WHERE seq = 2")
    con.close()
    r = cli("trail", "verify", "--data", d)
    assert r.returncode == 1, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "FAIL entry 2 was changed after it was written (hash mismatch)"
    assert lines[1].startswith("first bad entry:      2  ") and "  dana  alert_note  " in lines[1]


def test_bad_input_is_a_clear_error_with_exit_code_2(
    data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = str(data)
    alert_id = str(raise_alert(data))
    with SqliteStore.open(data / "collector.db") as store:
        Users(store).add("lee", "viewer", PW, actor="cli:root", now_ns=T0)
    cases = [
        (("alerts", "assign", alert_id, "lee"), "a viewer cannot triage"),
        (("alerts", "assign", alert_id, "ghost"), "no such user"),
        (("alerts", "assign", alert_id), "--none"),
        (("alerts", "assign", alert_id, "lee", "--none"), "--none"),
        (("alerts", "note", alert_id, "   "), "the note is empty"),
        (("alerts", "status", alert_id, "false_positive", "--reason", " "), "needs a reason"),
        (("users", "add", "bad name", "--role", "viewer", "--password-stdin"), "invalid user"),
    ]
    for argv, message in cases:
        rc, _ = run(*argv, "--data", d)
        err = capsys.readouterr().err
        assert rc == 2 and message in err and "Traceback" not in err, (argv, err)
    rc, _ = run("alerts", "status", "999", "in_progress", "--data", d)
    assert rc == 1 and "no alert 999" in capsys.readouterr().err
    rc, _ = run("users", "lock", "ghost", "--data", d)
    assert rc == 1 and "no user named 'ghost'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:  # argparse: not a status
        run("alerts", "status", alert_id, "closed", "--data", d)
    assert info.value.code == 2
    assert run("trail", "list", "--json", "--target", f"alert:{alert_id}", "--data", d) == (0, "")


def test_free_text_is_escaped_when_printed(data: Path) -> None:
    d = str(data)
    with SqliteStore.open(data / "collector.db") as store, pytest.raises(AuthError):
        Users(store).authenticate("\x1b[2Jroot\nFAKE LINE", PW, now_ns=T0, client="10.0.0.9")
    rc, text = run("trail", "list", "--data", d)
    assert rc == 0 and "\x1b" not in text and len(text.splitlines()) == 1
    assert "user:\\x1b[2Jroot\\x0aFAKE LINE" in text and "login_failed" in text
    rc, text = run("users", "list", "--data", d)
    assert text == "no users; add one: exfilwatch-collector users add NAME --role admin\n"
