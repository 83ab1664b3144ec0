"""The collector command line, in process: main(argv) with captured output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.collector.clirun import run
from tests.conftest import POLICY


def test_init_then_token_then_empty_lists(tmp_path: Path) -> None:
    data = str(tmp_path / "d")
    rc, text = run("init", "--data", data)
    assert rc == 0 and "CA fingerprint sha256:" in text
    fp = text.split("sha256:")[1].split()[0]
    rc, text = run("token", "create", "--data", data, "--uses", "5", "--ttl", "7d")
    assert rc == 0 and text.strip().startswith("exfw1.") and text.strip().endswith(fp)
    rc, text = run("token", "create", "--data", data, "--json")
    row = json.loads(text)
    assert row["uses"] == 1 and row["token"].startswith("exfw1.")
    for cmd in (["agents", "list"], ["events", "list"], ["alerts", "list"]):
        rc, text = run(*cmd, "--data", data, "--json")
        assert (rc, text) == (0, "")


def test_uninitialised_data_dir_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, _ = run("alerts", "list", "--data", str(tmp_path))
    assert rc == 2
    assert "not an initialised collector data directory" in capsys.readouterr().err


def test_unknown_alert_is_not_found(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = str(tmp_path / "d")
    run("init", "--data", data)
    rc, _ = run("alerts", "show", "42", "--data", data)
    assert rc == 1 and "42" in capsys.readouterr().err


def test_policy_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, text = run("policy", "check", "--policy", str(POLICY))
    assert rc == 0 and "3 rules" in text
    bad = tmp_path / "bad.yaml"
    bad.write_text(POLICY.read_text().replace("window: 10m", "window: soon"))
    rc, _ = run("policy", "check", "--policy", str(bad))
    assert rc == 2
    err = capsys.readouterr().err
    assert "rules[0].window" in err and "soon" in err
    assert "Traceback" not in err


def test_bad_ttl_is_an_argument_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as info:
        run("token", "create", "--data", str(tmp_path), "--ttl", "forever")
    assert info.value.code == 2
