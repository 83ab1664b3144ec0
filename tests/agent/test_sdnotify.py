"""sd_notify over a real AF_UNIX datagram socket, the watchdog decision, and the service's hooks."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.cli import main
from agent.clock import SystemClock
from agent.config import load_config
from agent.enroll import enroll
from agent.identity import Identity
from agent.sdnotify import READY, STOPPING, WATCHDOG, SdNotifier, Watchdog
from agent.service import AgentService
from agent.status import STATUS_FILE
from tests.conftest import InProcessCollector


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket standing in for systemd's notify socket: (socket, NOTIFY_SOCKET)."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(10)
        yield sock, str(path)


def receive_until(sock: socket.socket, done: Callable[[list[str]], bool]) -> list[str]:
    """Messages received until `done(messages)`; each recv waits up to the socket timeout."""
    messages: list[str] = []
    while not done(messages):
        messages.append(sock.recv(4096).decode())
    return messages


def seen(*wanted: str) -> Callable[[list[str]], bool]:
    return lambda messages: all(any(w in m.split("\n") for m in messages) for w in wanted)


class Recorder:
    def __init__(self) -> None:
        self.sent: list[tuple[str, ...]] = []

    def notify(self, *assignments: str) -> bool:
        self.sent.append(assignments)
        return True


# the protocol


def test_ready_reaches_the_socket_named_in_notify_socket(
    listener: tuple[socket.socket, str],
) -> None:
    sock, address = listener
    notifier = SdNotifier.from_environ({"NOTIFY_SOCKET": address})
    assert notifier.enabled
    assert notifier.notify(READY)
    assert sock.recv(4096) == b"READY=1"


def test_assignments_of_one_call_travel_in_one_datagram(
    listener: tuple[socket.socket, str],
) -> None:
    sock, address = listener
    SdNotifier(address).notify(STOPPING, "STATUS=flushing the spool")
    assert sock.recv(4096) == b"STOPPING=1\nSTATUS=flushing the spool"


def test_at_sign_means_the_abstract_namespace() -> None:
    name = f"exfilwatch-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(10)
        assert SdNotifier.from_environ({"NOTIFY_SOCKET": "@" + name}).notify(WATCHDOG)
        assert sock.recv(4096) == b"WATCHDOG=1"


def test_without_notify_socket_nothing_is_sent() -> None:
    notifier = SdNotifier.from_environ({})
    assert not notifier.enabled
    assert not notifier.notify(READY)


def test_an_address_that_is_not_a_unix_socket_disables_notification() -> None:
    assert not SdNotifier("vsock:2:1234").enabled
    assert not SdNotifier("relative/path").enabled


def test_a_manager_that_went_away_is_logged_once_and_never_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = SdNotifier(str(tmp_path / "gone"))
    with caplog.at_level(logging.WARNING, logger="agent.sdnotify"):
        assert not notifier.notify(WATCHDOG)
        assert not notifier.notify(WATCHDOG)
    assert len([r for r in caplog.records if "cannot notify" in r.message]) == 1


# the watchdog decision


def test_watchdog_pings_while_idle_and_while_progressing() -> None:
    recorder = Recorder()
    watchdog = Watchdog(recorder, stall_after=10)
    assert watchdog.check(alive=True, handled=0, backlog=0, now=0)
    assert watchdog.check(alive=True, handled=0, backlog=0, now=100)  # idle is healthy
    assert watchdog.check(alive=True, handled=5, backlog=3, now=105)
    assert watchdog.check(alive=True, handled=9, backlog=3, now=200)  # progress each check
    assert recorder.sent == [(WATCHDOG,)] * 4


def test_watchdog_stops_pinging_when_queued_work_makes_no_progress() -> None:
    recorder = Recorder()
    watchdog = Watchdog(recorder, stall_after=10)
    assert watchdog.check(alive=True, handled=7, backlog=4, now=0)
    assert watchdog.check(alive=True, handled=7, backlog=4, now=9.9)  # one slow file is fine
    assert not watchdog.check(alive=True, handled=7, backlog=4, now=10)
    assert not watchdog.check(alive=True, handled=7, backlog=9, now=50)
    assert (watchdog.stalled, watchdog.stalled_for(50), len(recorder.sent)) == (True, 50, 2)
    # It recovers when the pipeline moves again (the manager may not have restarted it yet).
    assert watchdog.check(alive=True, handled=8, backlog=9, now=51)
    assert (watchdog.stalled, len(recorder.sent)) == (False, 3)


def test_watchdog_never_pings_for_a_dead_stage() -> None:
    recorder = Recorder()
    assert not Watchdog(recorder).check(alive=False, handled=0, backlog=0, now=0)
    assert recorder.sent == []


# the service's hooks


@pytest.fixture
def agent_config(tmp_path: Path, inproc_collector: InProcessCollector) -> Path:
    for name in ("sensitive", "usb"):
        (tmp_path / name).mkdir()
    enroll(inproc_collector.enroll_address, inproc_collector.token(), tmp_path / "state", "ws-1")
    path = tmp_path / "agent.yaml"
    path.write_text(
        f"state_dir: {tmp_path / 'state'}\nsensitive_roots: [{tmp_path / 'sensitive'}]\n"
        f"destinations:\n  - {{path: {tmp_path / 'usb'}, class: removable}}\n"
    )
    return path


def test_service_reports_ready_watchdog_and_stopping(
    agent_config: Path, listener: tuple[socket.socket, str]
) -> None:
    sock, address = listener
    config = load_config(agent_config, {})
    service = AgentService(
        config,
        Identity.load(config.state_dir),
        SystemClock(),
        notifier=SdNotifier(address),
        status_interval=0.05,
    )
    status_file = config.state_dir / STATUS_FILE
    service.startup()
    runner = threading.Thread(target=service.run, kwargs={"health_interval": 0.02})
    runner.start()
    try:
        messages = receive_until(sock, seen(READY, WATCHDOG))
        assert messages.index(READY) < messages.index(WATCHDOG)
        assert any(m.startswith("STATUS=") for m in messages)
        running = json.loads(status_file.read_text())
        assert running["running"] and running["healthy"]
        assert running["pid"] == os.getpid()
    finally:
        service.should_exit.set()
        runner.join()
        service.shutdown()
    assert receive_until(sock, seen(STOPPING))
    stopped = json.loads(status_file.read_text())
    assert not stopped["running"] and stopped["failure"] is None
    # agent_start and agent_stop were delivered: the last acknowledged batch is known.
    assert stopped["last_ack_batch_seq"] is not None and stopped["connected"]


@pytest.fixture
def restore_signals() -> Iterator[None]:
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.mark.usefixtures("restore_signals")
def test_run_notifies_the_socket_from_its_environment(
    agent_config: Path, listener: tuple[socket.socket, str]
) -> None:
    """`exfilwatch-agent run` as systemd starts it: NOTIFY_SOCKET in the environment."""
    sock, address = listener
    received: list[str] = []

    def systemd() -> None:
        received.extend(receive_until(sock, seen(READY, WATCHDOG)))
        os.kill(os.getpid(), signal.SIGTERM)  # `systemctl stop`; run's handler is in place
        received.extend(receive_until(sock, seen(STOPPING)))

    manager = threading.Thread(target=systemd)
    manager.start()
    try:
        rc = main(
            ["run", "--config", str(agent_config)],
            out=io.StringIO(),
            environ={"NOTIFY_SOCKET": address},
        )
    finally:
        manager.join(timeout=30)
    assert rc == 0
    assert {READY, WATCHDOG, STOPPING} <= set(received)
