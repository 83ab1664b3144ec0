"""`make demo`: a collector and an agent on a throwaway folder, 25 real copies, one alert.

Everything runs as the current user on 127.0.0.1 with real TLS, real inotify
and real file copies; the data is left in ./demo-data for a look afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "demo-data"
PY = sys.executable


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m" if sys.stdout.isatty() else f"\n== {text}", flush=True)


def cli(*args: str) -> str:
    result = subprocess.run([PY, "-m", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.exit(f"demo: {' '.join(args[:3])} failed:\n{result.stderr}")
    return result.stdout


def wait_for(
    check: Callable[[], dict[str, object] | None], timeout: float, what: str
) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)  # polling a child process's output, not synchronising threads
    sys.exit(f"demo: timed out waiting for {what}")


def start(args: list[str], log: Path, ready: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [PY, "-m", *args], stdout=subprocess.PIPE, stderr=log.open("w"), text=True, env=env
    )
    line = proc.stdout.readline() if proc.stdout is not None else ""
    if ready not in line:
        proc.kill()
        sys.exit(f"demo: {args[0]} did not start; see {log}:\n{log.read_text()[-2000:]}")
    print("  " + line.strip())
    return proc


def main() -> int:
    shutil.rmtree(DEMO, ignore_errors=True)
    data, sensitive, usb, state = (DEMO / n for n in ("collector", "sensitive", "usb", "agent"))
    for folder in (sensitive, usb):
        folder.mkdir(parents=True)

    say("collector: init, enrolment token, serve")
    print("  " + cli("collector", "init", "--data", str(data)).splitlines()[0])
    token = cli("collector", "token", "create", "--data", str(data)).strip()
    collector = start(
        [
            "collector",
            "serve",
            "--data",
            str(data),
            "--listen",
            "127.0.0.1:0",
            "--enroll-listen",
            "127.0.0.1:0",
            "--console-listen",
            "127.0.0.1:0",
            "--policy",
            str(ROOT / "configs/policy.yaml"),
        ],
        DEMO / "collector.log",
        "listening",
    )
    agent: subprocess.Popen[str] | None = None
    try:
        enroll_addr = json.loads((data / "listen.json").read_text())["enroll"]

        say("agent: enrol with the token, then run on the demo folders")
        print(
            "  "
            + cli(
                "agent",
                "enroll",
                "--collector",
                enroll_addr,
                "--token",
                token,
                "--state",
                str(state),
                "--hostname",
                "demo-laptop",
            ).strip()
        )
        files = []
        for i in range(1, 26):
            path = sensitive / f"board-minutes-{i:02d}.docx"
            path.write_bytes(f"Board minutes, meeting {i}. ".encode() * (800 + 97 * i))
            files.append(path)
        try:
            for path in files:
                os.setxattr(path, "user.exfilwatch.label", b"confidential")
            rules = ""
        except OSError:  # no user.* xattrs on this filesystem: label by path instead
            rules = 'path_rules:\n  - {glob: "*/sensitive/board-minutes-*", label: confidential}\n'
        config = DEMO / "agent.yaml"
        config.write_text(
            f"state_dir: {state}\nhost: demo-laptop\nsensitive_roots: [{sensitive}]\n{rules}"
            f"destinations:\n  - path: {usb}\n    class: removable\n"
            "    device: {vendor: Kingston, model: DataTraveler 50, serial: 0019E06B0848F161}\n"
        )
        agent = start(["agent", "run", "--config", str(config)], DEMO / "agent.log", "running")

        say(f"copy 25 confidential files to the demo USB stick ({usb})")
        subprocess.run(["cp", *map(str, files[:15]), str(usb)], check=True)
        for path in files[15:]:
            shutil.copy(path, usb)
        (usb / "holiday-photo.txt").write_text("not sensitive\n")
        print("  cp 15 files, shutil.copy 10 files, plus 1 unlabelled file")

        def alert_complete() -> dict[str, object] | None:
            out = cli("collector", "alerts", "list", "--data", str(data), "--json")
            rows = [json.loads(line) for line in out.splitlines()]
            return next((r for r in rows if r["files"] == 25), None)

        alert = wait_for(alert_complete, 60, "the alert")
        say("what the administrator sees: exfilwatch-collector alerts list / alerts show")
        print(cli("collector", "alerts", "list", "--data", str(data)).rstrip())
        print()
        print(cli("collector", "alerts", "show", str(alert["alert_id"]), "--data", str(data)))
        console = json.loads((data / "listen.json").read_text()).get("console")
        if console:
            print(
                f"\n  the web console served this alert at {console}alerts/{alert['alert_id']}"
                " while the demo ran (README: The console)"
            )
    finally:
        say("stopping agent and collector")
        for proc in (agent, collector):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
        print(f"  done; data and logs are in {DEMO}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
