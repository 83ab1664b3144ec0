"""`exfilwatch-agent status`: from the running agent's status.json, or from the spool."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import time
import uuid
from pathlib import Path

import pytest

from agent.cli import main
from agent.config import load_config
from agent.enroll import enroll
from agent.events import Action, Event, EventId
from agent.identity import SIGNING_KEY, SPOOL, Identity
from agent.signer import Signer
from agent.spool import Spool
from agent.status import AgentStatus, RunState, collect, write_status
from tests.conftest import InProcessCollector


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    return main(list(argv), out=out, environ={}), out.getvalue()


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(
        f"state_dir: {tmp_path / 'state'}\nsensitive_roots: [/nonexistent/a]\n"
        "destinations:\n  - {path: /nonexistent/usb, class: removable}\n"
    )
    return path


@pytest.fixture
def state(tmp_path: Path, inproc_collector: InProcessCollector) -> Path:
    state = tmp_path / "state"
    enroll(inproc_collector.enroll_address, inproc_collector.token(), state, "ws-1")
    return state


def events(n: int) -> list[Event]:
    return [
        Event(EventId(str(uuid.uuid4())), time.time_ns(), Action.AGENT_START, "h", "0")
        for _ in range(n)
    ]


def open_spool(state: Path) -> Spool:
    identity = Identity.load(state)
    return Spool.open(
        state / SPOOL, agent_id=identity.agent_id, signer=Signer.load(state / SIGNING_KEY)
    )


def running_status(state: Path, **changes: object) -> AgentStatus:
    now = time.time_ns()
    status = AgentStatus(
        agent_id=Identity.load(state).agent_id,
        pid=os.getpid(),
        running=True,
        healthy=True,
        connected=True,
        acked_batches=7,
        last_ack_batch_seq=41,
        spool_pending_events=3,
        spool_sealed_batches=1,
        coverage_gaps=2,
        policy_revision="r9",
        started_at_ns=now,
        updated_at_ns=now,
    )
    return dataclasses.replace(status, **changes)  # type: ignore[arg-type]


def test_not_enrolled_exits_3_and_says_so(config: Path) -> None:
    rc, text = run("status", "--config", str(config))
    assert rc == 3
    assert text.startswith("exfilwatch-agent: not enrolled")
    rc, text = run("status", "--config", str(config), "--json")
    report = json.loads(text)
    assert rc == 3 and report["enrolled"] is False and report["state"] == "not enrolled"


def test_missing_config_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _ = run("status", "--config", str(tmp_path / "none.yaml"))
    assert rc == 2
    assert "none.yaml" in capsys.readouterr().err


def test_stopped_agent_is_read_from_its_spool(config: Path, state: Path) -> None:
    with open_spool(state) as spool:
        spool.append(events(2))
        first = spool.seal(time.time_ns())
        assert first is not None
        spool.ack(first.batch_seq)
        spool.append(events(3))
        spool.seal(time.time_ns())
        spool.append(events(1))
    rc, text = run("status", "--config", str(config), "--json")
    report = json.loads(text)
    assert rc == 3
    assert report["state"] == "stopped" and report["enrolled"] is True
    assert report["agent_id"] == Identity.load(state).agent_id
    assert report["spool_pending_events"] == 1
    assert report["spool_sealed_batches"] == 1
    assert report["last_ack_batch_seq"] == first.batch_seq


def test_a_spool_held_by_an_agent_means_running(config: Path, state: Path) -> None:
    with open_spool(state):
        rc, text = run("status", "--config", str(config))
    assert rc == 0
    assert "running (spool locked)" in text


def test_running_agent_is_read_from_its_status_file(config: Path, state: Path) -> None:
    write_status(state, running_status(state))
    rc, text = run("status", "--config", str(config))
    assert rc == 0
    assert text.startswith(f"exfilwatch-agent: running (pid {os.getpid()})")
    assert "(connected)" in text
    assert "last acked batch: 41" in text
    assert "3 events pending, 1 batches unacknowledged" in text
    assert "policy revision:  r9" in text
    assert "cost:" not in text  # a status file of an agent that did not measure itself


def test_the_agents_cost_is_shown_and_kept_in_json(config: Path, state: Path) -> None:
    write_status(state, running_status(state, cpu_percent=0.42, rss_bytes=67 * 2**20))
    rc, text = run("status", "--config", str(config))
    assert rc == 0 and "cost:             0.4% CPU, 67.0 MiB resident" in text
    rc, text = run("status", "--config", str(config), "--json")
    row = json.loads(text)
    assert (row["cpu_percent"], row["rss_bytes"]) == (0.42, 67 * 2**20)


def test_a_status_file_gone_stale_means_not_responding(config: Path, state: Path) -> None:
    write_status(state, running_status(state, updated_at_ns=time.time_ns() - 3600 * 10**9))
    rc, text = run("status", "--config", str(config))
    assert rc == 1
    assert text.startswith("exfilwatch-agent: not responding")


def test_a_crashed_agent_is_stopped_with_its_spool_counted(config: Path, state: Path) -> None:
    write_status(state, running_status(state, pid=2**22 + 1))
    with open_spool(state) as spool:
        spool.append(events(4))
    report = collect(load_config(config, {}, check_paths=False), time.time_ns(), lambda _: False)
    assert report.state is RunState.STOPPED
    assert report.spool_pending_events == 4 and report.pid is None
