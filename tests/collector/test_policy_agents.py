"""The policy's `agents` section: how agents stay in touch."""

from __future__ import annotations

from pathlib import Path

import pytest

from collector.errors import ConfigError
from collector.policy import AgentSettings, load_policy, parse_policy
from tests.conftest import POLICY

BASE = {
    "labels": ["public", "confidential"],
    "rules": [
        {
            "name": "r",
            "match": {"min_label": "confidential"},
            "group_by": ["user"],
            "window": "10m",
            "threshold": {"files": 2},
            "severity": "high",
        }
    ],
}


def test_defaults_and_the_shipped_example() -> None:
    assert parse_policy(BASE, "p").agents == AgentSettings()
    policy = load_policy(POLICY)
    assert policy.agents.heartbeat_ns == 30 * 10**9
    assert policy.agents.silent_after_ns == 300 * 10**9
    assert policy.document == POLICY.read_bytes()


def test_agents_section_parses() -> None:
    data = {**BASE, "agents": {"heartbeat": "10s", "silent_after": "2m", "policy_refresh": "1h"}}
    agents = parse_policy(data, "p").agents
    assert (agents.heartbeat_ns, agents.silent_after_ns, agents.refresh_ns) == (
        10 * 10**9,
        120 * 10**9,
        3600 * 10**9,
    )


@pytest.mark.parametrize(
    ("agents", "message"),
    [
        ({"heartbeat": "soon"}, "agents.heartbeat"),
        ({"heartbat": "10s"}, "agents.heartbat: unknown key"),
        ({"heartbeat": "10m", "silent_after": "5m"}, "shorter than agents.silent_after"),
        ("often", "agents: expected a mapping"),
    ],
)
def test_bad_agents_section(agents: object, message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_policy({**BASE, "agents": agents}, "p")
