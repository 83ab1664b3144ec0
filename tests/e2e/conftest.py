"""Fixtures that run the real collector and agent processes on free ports."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.procs import ROOT, Agent, Collector, run_cli

POLICY = ROOT / "configs" / "policy.yaml"


def set_label(path: Path, label: str) -> None:
    try:
        os.setxattr(path, "user.exfilwatch.label", label.encode())
    except OSError as e:
        pytest.skip(f"filesystem under {path.parent} rejects user.* xattrs: {e}")


@contextmanager
def running_collector(
    tmp_path: Path, policy: Path = POLICY, serve_args: Sequence[str] = ()
) -> Iterator[Collector]:
    """`collector init` and `serve` in tmp_path/collector, stopped at the end."""
    c = Collector(tmp_path / "collector", policy, tmp_path / "collector.log", serve_args)
    c.init()
    c.start()
    try:
        yield c
    finally:
        if c.proc is not None:
            c.stop()


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[Collector]:
    """A module may define its own `collector` (make_agent enrols with that one)."""
    with running_collector(tmp_path) as c:
        yield c


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    for name in ("sensitive", "usb"):
        (tmp_path / name).mkdir()
    return tmp_path


AgentFactory = Callable[..., Agent]


@pytest.fixture
def make_agent(workspace: Path, collector: Collector) -> Iterator[AgentFactory]:
    agents: list[Agent] = []

    def make(name: str = "agent", start: bool = True) -> Agent:
        state = workspace / f"{name}-state"
        run_cli(
            "agent",
            "enroll",
            "--collector",
            collector.enroll,
            "--token",
            collector.token(),
            "--state",
            str(state),
            "--hostname",
            f"{name}-host",
        )
        config = workspace / f"{name}.yaml"
        config.write_text(
            f"state_dir: {state}\n"
            f"host: {name}-host\n"
            f"sensitive_roots: [{workspace / 'sensitive'}]\n"
            "destinations:\n"
            f"  - path: {workspace / 'usb'}\n"
            "    class: removable\n"
            "    device: {vendor: Kingston, model: DataTraveler 50, serial: E2E-0001}\n"
        )
        agent = Agent(config, workspace / f"{name}.log")
        agents.append(agent)
        if start:
            agent.start()
        return agent

    yield make
    for agent in agents:
        if agent.proc is not None:
            agent.stop()
