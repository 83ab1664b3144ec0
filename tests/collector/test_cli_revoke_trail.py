"""`agents revoke` on the command line leaves the same trail entry as the console's revoke."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from collector.cli_console import default_actor
from collector.store import SqliteStore
from collector.trail import Trail
from tests.collector.batches import enroll, new_agent
from tests.collector.clirun import run


def test_revoke_is_a_trail_entry_and_the_chain_verifies(data: Path) -> None:
    agent = new_agent()
    with SqliteStore.open(data / "collector.db") as store:
        enroll(store, agent)
    rc, out = run("agents", "revoke", agent.agent_id, "--data", str(data))
    assert (rc, out) == (0, f"revoked {agent.agent_id}: its next call is refused\n")
    with SqliteStore.open(data / "collector.db") as store:
        assert store.get_agent_key(agent.agent_id).revoked  # type: ignore[union-attr]
        (entry,) = Trail(store).entries(target=f"agent:{agent.agent_id}")
        assert Trail(store).verify().ok
    assert (entry.actor, entry.action, dict(entry.detail)) == (default_actor(), "agent_revoke", {})
    assert entry.actor.startswith("cli:")
    rc, out = run("trail", "list", "--json", "--data", str(data))
    listed = [json.loads(line) for line in out.splitlines()]
    assert rc == 0 and [e["action"] for e in listed] == ["agent_revoke"]


def test_a_failed_revoke_leaves_no_entry(data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _ = run("agents", "revoke", "ag-nosuchagent", "--data", str(data))
    assert rc == 1 and "no agent" in capsys.readouterr().err
    with SqliteStore.open(data / "collector.db") as store:
        assert Trail(store).entries() == []
