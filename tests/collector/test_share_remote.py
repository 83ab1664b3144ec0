"""A copy to a network share names the share's remote (server and export) wherever an
analyst reads the event: `events list --json`, `alerts show`, grouping by destination."""

from __future__ import annotations

import json
from pathlib import Path

from collector.policy import parse_policy
from collector.store import SqliteStore
from collector.thresholds import ThresholdEngine
from collector.verify import verify_batch
from exfilwatch.v1 import events_pb2
from tests.collector.batches import BatchChain, enroll, new_agent
from tests.collector.clirun import run

POLICY = {
    "labels": ["public", "internal", "confidential"],
    "rules": [
        {
            "name": "share",
            "match": {"min_label": "confidential", "destinations": ["network_share"]},
            "group_by": ["user", "destination"],
            "window": "1h",
            "threshold": {"files": 2},
            "severity": "medium",
        }
    ],
}


def _copies(chain: BatchChain, remote: str, n: int) -> list[events_pb2.Event]:
    return chain.events(
        n,
        destination_class=events_pb2.DESTINATION_CLASS_NETWORK_SHARE,
        destination=events_pb2.FileRef(path=b"/mnt/drop/q3.xlsx", size=1000, sha256="a" * 64),
        # The same folder, a different server each time: the server is the destination.
        device=events_pb2.Device(fs_type="cifs", mount_point=b"/mnt/drop", remote=remote),
    )


def test_the_remote_is_shown_and_separates_shares_mounted_at_one_folder(data: Path) -> None:
    agent = new_agent()
    chain = BatchChain(agent)
    events = _copies(chain, "//nas.corp/finance", 1) + _copies(chain, "//203.0.113.9/drop", 2)
    engine = ThresholdEngine(parse_policy(POLICY, "test"))
    with SqliteStore.open(data / "collector.db") as store:
        enroll(store, agent)
        batch = verify_batch(
            signed=chain.next(events).raw, tls_agent_id=agent.agent_id, agent=agent.key(),
            last=None,
        )  # fmt: skip
        now = chain.now_ns + 10**9
        result = store.store_batch(batch, lambda ev: engine.feed(ev, now), now)
    # Two files to 203.0.113.9 cross the threshold; the one to the corporate NAS, mounted
    # at the same folder before, is not counted with them.
    assert len(result.alerts_opened) == 1
    rc, text = run("alerts", "list", "--json", "--data", str(data))
    (alert,) = [json.loads(line) for line in text.splitlines()]
    assert rc == 0 and alert["files"] == 2
    assert alert["group"] == {"user": "alice", "destination": "network_share://203.0.113.9/drop"}
    rc, text = run("events", "list", "--json", "--data", str(data))
    remotes = [json.loads(line)["device"]["remote"] for line in text.splitlines()]
    assert remotes == ["//nas.corp/finance", "//203.0.113.9/drop", "//203.0.113.9/drop"]
    rc, text = run("alerts", "show", str(alert["alert_id"]), "--data", str(data))
    assert rc == 0 and text.count("[network_share //203.0.113.9/drop;") == 2
