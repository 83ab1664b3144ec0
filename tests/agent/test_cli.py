"""The agent command line, in process: exit codes and messages for people."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from agent.cli import main


def run(*argv: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    out = io.StringIO()
    return main(list(argv), out=out, environ=env or {}), out.getvalue()


def _config(tmp_path: Path, extra: str = "") -> Path:
    for name in ("sensitive", "usb"):
        (tmp_path / name).mkdir(exist_ok=True)
    path = tmp_path / "agent.yaml"
    path.write_text(
        f"state_dir: {tmp_path / 'state'}\nsensitive_roots: [{tmp_path / 'sensitive'}]\n"
        f"destinations:\n  - {{path: {tmp_path / 'usb'}, class: removable}}\n{extra}"
    )
    return path


def test_check_config_ok(tmp_path: Path) -> None:
    rc, text = run("check-config", "--config", str(_config(tmp_path)))
    assert rc == 0 and "1 sensitive roots, 1 destinations" in text


def test_unknown_key_exits_2_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _ = run("check-config", "--config", str(_config(tmp_path, "colector: x:1\n")))
    assert rc == 2
    assert "colector" in capsys.readouterr().err


def test_wrong_type_exits_2_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _ = run("check-config", "--config", str(_config(tmp_path, "queue_size: lots\n")))
    assert rc == 2
    assert "queue_size" in capsys.readouterr().err


def test_missing_sensitive_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path)
    (tmp_path / "sensitive").rmdir()
    rc, _ = run("check-config", "--config", str(config))
    assert rc == 2
    assert str(tmp_path / "sensitive") in capsys.readouterr().err


def test_run_without_enrolment_says_how_to_enrol(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, _ = run("run", "--config", str(_config(tmp_path)))
    assert rc == 1
    err = capsys.readouterr().err
    assert "no enrolment" in err and "exfilwatch-agent enroll" in err


def test_enroll_needs_a_token(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _ = run("enroll", "--collector", "127.0.0.1:1", "--state", str(tmp_path / "s"))
    assert rc == 2
    assert "no enrolment token" in capsys.readouterr().err
