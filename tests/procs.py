"""Real exfilwatch processes for tests: start, wait on their output or files, stop.

Waits poll with a deadline or block on a queue; nothing sleeps for a fixed time.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent


def wait_until(check: Callable[[], T | None], timeout: float, what: str) -> T:
    """Poll `check` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        threading.Event().wait(delay)  # poll interval, not synchronisation
        delay = min(delay * 2, 0.2)


def env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONUNBUFFERED"] = "1"
    e.pop("EXFILWATCH_LOGLEVEL", None)
    e.update(extra or {})
    return e


class Proc:
    """A child process whose stdout lines are collected as they arrive."""

    def __init__(self, args: Sequence[str], log: Path, extra_env: Mapping[str, str] | None = None):
        self.args = list(args)
        self.log = log
        self._stderr = log.open("ab")
        self.popen = subprocess.Popen(
            self.args,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=env(extra_env),
            cwd=ROOT,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=False)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for raw in self.popen.stdout:
            self.lines.put(raw.decode("utf-8", "replace").rstrip("\n"))

    def wait_line(self, needle: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or (self.popen.poll() is not None and self.lines.empty()):
                raise AssertionError(
                    f"{self.args[:4]} did not print {needle!r} "
                    f"(rc={self.popen.poll()}); stderr:\n{self.stderr_tail()}"
                )
            try:
                line = self.lines.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                continue
            self.seen.append(line)
            if needle in line:
                return line

    def stderr_tail(self, n: int = 40) -> str:
        self._stderr.flush()
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
        try:
            rc = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            rc = self.popen.wait()
        self._reader.join()
        assert self.popen.stdout is not None
        self.popen.stdout.close()
        self._stderr.close()
        return rc


def run_cli(module: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        env=env(),
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{module} {args} failed ({result.returncode}):\n{result.stderr}")
    return result


class Collector:
    """`exfilwatch-collector serve` on free ports, with its data directory."""

    def __init__(self, data: Path, policy: Path, log: Path, serve_args: Sequence[str] = ()) -> None:
        self.data = data
        self.policy = policy
        self.log = log
        self.serve_args = tuple(serve_args)
        """More `serve` options, after the ones every test needs."""
        self.proc: Proc | None = None
        self.agents = ""
        self.enroll = ""
        self.console = ""
        """The console's URL (https://127.0.0.1:PORT/) once started."""
        self.metrics = ""
        """With serve --metrics-listen: http://HOST:PORT (no trailing slash)."""

    def init(self) -> None:
        run_cli("collector", "init", "--data", str(self.data))

    def start(self, listen: str = "127.0.0.1:0", enroll: str = "127.0.0.1:0") -> None:
        (self.data / "listen.json").unlink(missing_ok=True)
        self.proc = Proc(
            [
                sys.executable,
                "-m",
                "collector",
                "serve",
                "--data",
                str(self.data),
                "--listen",
                listen,
                "--enroll-listen",
                enroll,
                "--policy",
                str(self.policy),
                "--console-listen",
                "127.0.0.1:0",  # the console's default port is fixed; tests run side by side
                *self.serve_args,
            ],
            self.log,
        )
        self.proc.wait_line("listening")
        addresses = json.loads((self.data / "listen.json").read_text())
        self.agents, self.enroll = addresses["agents"], addresses["enroll"]
        self.console = addresses.get("console", "")
        self.metrics = addresses.get("metrics", "")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        rc = self.proc.stop(sig)
        self.proc = None
        return rc

    def token(self, uses: int = 1) -> str:
        return run_cli(
            "collector", "token", "create", "--data", str(self.data), "--uses", str(uses)
        ).stdout.strip()

    def cli_json(self, *args: str) -> list[dict[str, object]]:
        out = run_cli("collector", *args, "--data", str(self.data), "--json").stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]


class Agent:
    """An enrolled `exfilwatch-agent run` with its config, state and debug log."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config = config
        self.log = log
        self.proc: Proc | None = None

    def start(self) -> None:
        self.proc = Proc(
            [sys.executable, "-m", "agent", "run", "--config", str(self.config)],
            self.log,
            {"EXFILWATCH_LOGLEVEL": "DEBUG"},
        )
        self.proc.wait_line("running as")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        rc = self.proc.stop(sig)
        self.proc = None
        return rc

    def launch(self) -> Proc:
        """Like `start`, without waiting until it runs (to kill it at any moment)."""
        self.proc = Proc(
            [sys.executable, "-m", "agent", "run", "--config", str(self.config)],
            self.log,
            {"EXFILWATCH_LOGLEVEL": "DEBUG"},
        )
        return self.proc

    def spooled_event_ids(self) -> list[str]:
        """Every event id the agent spooled, from its debug log ("spooled event <id> ...")."""
        ids = []
        for line in self.log.read_text(errors="replace").splitlines():
            _, sep, rest = line.partition("spooled event ")
            if sep:
                ids.append(rest.split()[0])
        return ids
