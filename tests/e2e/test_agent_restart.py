"""End to end: the agent killed with SIGKILL, copies made while it is down, then restarted.

The copies made while it was down are reported when it comes back, and the ones it
had reported before the kill are not reported again (agent.reported).
"""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

from tests.e2e.conftest import AgentFactory, set_label
from tests.procs import Collector, wait_until


def copies(collector: Collector) -> list[str]:
    events = collector.cli_json("events", "list", "--limit", "1000")
    return [
        str(e["destination"]["path"])
        for e in events
        if e["action"] == "copy" and isinstance(e["destination"], dict)
    ]


def test_copies_while_down_are_reported_once_after_a_kill(
    collector: Collector, make_agent: AgentFactory, workspace: Path
) -> None:
    sensitive, usb = workspace / "sensitive", workspace / "usb"
    docs = []
    for i in range(5):
        doc = sensitive / f"doc{i}.docx"
        doc.write_bytes(f"document {i} ".encode() * (200 + i))
        set_label(doc, "confidential")
        docs.append(doc)
    agent = make_agent()
    for doc in docs[:3]:
        shutil.copy(doc, usb)
    wait_until(lambda: len(copies(collector)) >= 3, 60, "three copies stored")

    assert agent.stop(signal.SIGKILL) == -signal.SIGKILL
    for doc in docs[3:]:  # nobody is watching
        shutil.copy(doc, usb)
    agent.start()

    wait_until(lambda: len(copies(collector)) >= 5, 60, "the two copies made while down")
    agent.stop()  # a clean stop: everything spooled is delivered
    stored = copies(collector)
    assert sorted(stored) == sorted(str(usb / d.name) for d in docs)  # each exactly once
