"""What agents and devices report is printed escaped: `agents list`, `events list`,
`alerts list` and `alerts show` on a real data folder, fed through real verification.

A USB stick names its own vendor, model and serial (its string descriptors); a label is
whatever the extended attribute holds; an enrolling agent names its host. None of these
may reach an administrator's terminal as a control sequence, nor reorder what it shows.
"""

from __future__ import annotations

import json
from pathlib import Path

from collector.policy import parse_policy
from collector.store import SqliteStore
from collector.thresholds import ThresholdEngine
from collector.verify import verify_batch
from exfilwatch.v1 import events_pb2
from tests.collector.batches import T0, BatchChain, new_agent
from tests.collector.clirun import run

CLEAR = "\x1b[2J"
BIDI = "\u202e"  # right-to-left override: "gpj.exe" shows as "exe.jpg"
HOSTILE = {
    "vendor": f"King{CLEAR}ston",
    "model": f"DT{BIDI}50",
    "serial": "0019\x07E06B",
    "label": f"confidential{CLEAR}",
    "host": f"lt-0412\r{CLEAR}",
    "user": "alice\x1b]52;c;ZXZpbA==\x07",  # OSC 52: writes the terminal's clipboard
}
POLICY = {
    "labels": ["public", "internal", "confidential"],
    "rules": [
        {
            "name": "any-copy",
            "match": {"min_label": "confidential", "destinations": ["removable"]},
            "group_by": ["user", "host", "destination"],
            "window": "10m",
            "threshold": {"files": 2},
            "severity": "high",
        }
    ],
}


def _stored(data: Path) -> None:
    agent = new_agent()
    chain = BatchChain(agent)
    events = chain.events(
        2,
        host=HOSTILE["host"],
        user=events_pb2.UserInfo(login=HOSTILE["user"], effective=HOSTILE["user"], uid=1000),
        device=events_pb2.Device(
            vendor=HOSTILE["vendor"], model=HOSTILE["model"], serial=HOSTILE["serial"],
            fs_type="vfat", mount_point=b"/media/alice/KINGSTON",
        ),
    )  # fmt: skip
    events += chain.events(1, label=HOSTILE["label"])  # no rule matches a label not in policy
    engine = ThresholdEngine(parse_policy(POLICY, "test"))
    with SqliteStore.open(data / "collector.db") as store:
        store.add_agent(
            agent_id=agent.agent_id, public_key=agent.public_key_raw, key_id=agent.key_id,
            hostname=HOSTILE["host"], agent_version=f"0.1.0{BIDI}", enrolled_at_ns=T0,
            cert_serial="1f",
        )  # fmt: skip
        batch = verify_batch(
            signed=chain.next(events).raw, tls_agent_id=agent.agent_id, agent=agent.key(),
            last=None,
        )  # fmt: skip
        result = store.store_batch(batch, lambda ev: engine.feed(ev, T0 + 10**12), T0 + 10**12)
    assert result.events_stored == 3 and len(result.alerts_opened) == 1


def _printable(text: str) -> bool:
    return all(ch.isprintable() or ch in " \n" for ch in text)


def test_reported_names_are_escaped_in_every_text_listing(data: Path) -> None:
    _stored(data)
    d = str(data)
    outputs = {}
    for argv in (
        ("agents", "list"),
        ("events", "list"),
        ("alerts", "list"),
        ("alerts", "show", "1"),
    ):
        rc, text = run(*argv, "--data", d)
        assert rc == 0, argv
        outputs[argv] = text
        assert _printable(text), (argv, text)
    shown = outputs["alerts", "show", "1"]
    assert "King\\x1b[2Jston DT\\u202e50 0019\\x07E06B" in shown  # the device, readable
    assert "alice\\x1b]52;c;ZXZpbA==\\x07" in shown
    assert "lt-0412\\x0d\\x1b[2J" in outputs["agents", "list"]
    assert "confidential\\x1b[2J" in outputs["events", "list"]
    # JSON keeps the exact text (json.dumps escapes control characters itself).
    rc, text = run("events", "list", "--json", "--data", d)
    rows = [json.loads(line) for line in text.splitlines()]
    assert rc == 0 and [r["device"]["vendor"] for r in rows][:2] == [HOSTILE["vendor"]] * 2
    assert "\x1b" not in text
