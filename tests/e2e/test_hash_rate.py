"""agents.hash_rate in the collector's policy reaches a real agent and caps its hashing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import POLICY, AgentFactory, running_collector
from tests.procs import Collector, wait_until


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[Collector]:
    """The e2e collector, serving configs/policy.yaml with a fleet hashing cap added."""
    policy = tmp_path / "policy.yaml"
    text = POLICY.read_text()
    assert "\nagents:\n" in text
    policy.write_text(text.replace("\nagents:\n", "\nagents:\n  hash_rate: 3MiB\n", 1))
    with running_collector(tmp_path, policy) as c:
        yield c


def test_the_fleet_cap_is_applied_by_the_agent(make_agent: AgentFactory) -> None:
    agent = make_agent()

    def applied() -> bool:
        return "hashing rate cap: 3145728 bytes/s" in agent.log.read_text(errors="replace")

    wait_until(applied, 30, "the policy's hashing cap applied")
