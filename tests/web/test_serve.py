"""`exfilwatch-collector serve` starts the console: its URL printed and in listen.json,
HTTPS with the collector's certificate; `--no-console` and a taken port behave."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import httpx2
import pytest

from tests.e2e.conftest import POLICY
from tests.procs import ROOT, Collector, Proc, env

pytestmark = pytest.mark.slow


def test_serve_prints_and_records_the_console_url(tmp_path: Path) -> None:
    c = Collector(tmp_path / "collector", POLICY, tmp_path / "collector.log")
    c.init()
    c.start()
    try:
        assert c.console.startswith("https://127.0.0.1:")
        assert c.proc is not None
        assert c.proc.wait_line("console: https://") == f"console: {c.console}"
        # HTTPS with the server certificate the collector's CA issued
        tls = ssl.create_default_context(cafile=str(c.data / "ca.crt"))
        with httpx2.Client(verify=tls) as client:
            r = client.get(c.console + "alerts")
        assert r.status_code == 303 and r.headers["location"].startswith("/login")
        assert "default-src 'self'" in r.headers["content-security-policy"]
    finally:
        assert c.stop() == 0


def _serve(c: Collector, *extra: str) -> Proc:
    return Proc(
        [sys.executable, "-m", "collector", "serve", "--data", str(c.data), "--listen",
         "127.0.0.1:0", "--enroll-listen", "127.0.0.1:0", "--policy", str(c.policy), *extra],
        c.log,
    )  # fmt: skip


def test_no_console_and_a_taken_port(tmp_path: Path) -> None:
    c = Collector(tmp_path / "collector", POLICY, tmp_path / "collector.log")
    c.init()
    proc = _serve(c, "--no-console")
    try:
        proc.wait_line("listening")
        assert "console" not in json.loads((c.data / "listen.json").read_text())
    finally:
        assert proc.stop() == 0
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "collector", "serve", "--data", str(c.data), "--listen",
             "127.0.0.1:0", "--enroll-listen", "127.0.0.1:0", "--policy", str(c.policy),
             "--console-listen", f"127.0.0.1:{port}"],
            capture_output=True, text=True, env=env(), cwd=ROOT, timeout=60, check=False,
        )  # fmt: skip
    assert result.returncode == 2
    assert "--console-listen: cannot listen on" in result.stderr and "--no-console" in result.stderr
