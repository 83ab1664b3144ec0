"""`serve --metrics-listen`: /healthz and /metrics of a real collector, fed by a real agent."""

from __future__ import annotations

import json
import re
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from collector import __version__ as collector_version
from tests.e2e.conftest import AgentFactory, running_collector
from tests.e2e.test_agent_to_collector import make_files
from tests.procs import Collector, wait_until


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[Collector]:
    """The e2e collector, with its metrics port (make_agent enrols with this one)."""
    with running_collector(tmp_path, serve_args=["--metrics-listen", "127.0.0.1:0"]) as c:
        yield c


def get(url: str) -> tuple[int, str, str]:
    """(status, content type, body) of a plain GET, error statuses included."""
    try:
        with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310 (http to our port)
            return r.status, r.headers["content-type"], r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["content-type"], e.read().decode()


def samples(text: str) -> dict[str, float]:
    """`name{labels}` -> value of a Prometheus text exposition."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def test_health_and_counts_of_a_collector_at_work(
    collector: Collector, make_agent: AgentFactory, workspace: Path
) -> None:
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", collector.metrics)

    def healthy() -> tuple[int, str, str] | None:
        reply = get(collector.metrics + "/healthz")
        return reply if reply[0] == 200 else None

    health = wait_until(healthy, 30, "healthy")
    assert health[1] == "application/json" and json.loads(health[2]) == {"status": "ok"}
    assert get(collector.metrics + "/nothing")[0] == 404

    make_agent()
    for path in make_files(workspace / "sensitive", 25, "confidential"):
        shutil.copy(path, workspace / "usb")

    def alerted() -> dict[str, float] | None:
        status, ctype, text = get(collector.metrics + "/metrics")
        assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
        found = samples(text)
        # the 25 copies and the agent's start, and the alert 20 of them raised
        done = found["exfilwatch_events_stored_total"] >= 26
        return found if done and found["exfilwatch_alerts_opened_total"] >= 1 else None

    found = wait_until(alerted, 60, "the copies and their alert counted")
    stored = len(collector.cli_json("events", "list", "--limit", "1000"))
    assert found["exfilwatch_events_in_store"] >= found["exfilwatch_events_stored_total"]
    assert stored >= found["exfilwatch_events_stored_total"] >= 26
    assert found['exfilwatch_batches_total{outcome="stored"}'] >= 1
    assert found['exfilwatch_alerts_open{kind="threshold",status="new"}'] == 1
    assert found['exfilwatch_agents{state="active"}'] == 1
    assert found['exfilwatch_agents{state="revoked"}'] == 0
    assert found["exfilwatch_rules_restoring"] == 0
    assert found[f'exfilwatch_build_info{{version="{collector_version}"}}'] == 1
    assert found["exfilwatch_batches_refused_total"] == 0
    # The real agent's heartbeat said what it costs its workstation.
    (agent,) = collector.cli_json("agents", "list")
    assert isinstance(agent["rss_bytes"], int) and 10 * 2**20 < agent["rss_bytes"] < 2**31
    assert found["exfilwatch_agent_rss_bytes_max"] > 10 * 2**20
    # Counts only: no host, user or file name reaches the monitoring port.
    _, _, text = get(collector.metrics + "/metrics")
    assert "agent-host" not in text and "doc0" not in text and ".docx" not in text
