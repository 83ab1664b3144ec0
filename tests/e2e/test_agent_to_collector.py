"""End to end: real agent and collector processes, real inotify, real TLS, real copies."""

from __future__ import annotations

import base64
import os
import shutil
import signal
import sqlite3
import subprocess
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.identity import SIGNING_KEY
from agent.signer import Signer
from exfilwatch.v1 import events_pb2
from tests.e2e.conftest import AgentFactory, set_label
from tests.procs import Collector, run_cli, wait_until


def make_files(folder: Path, n: int, label: str | None, prefix: str = "doc") -> list[Path]:
    files = []
    for i in range(n):
        path = folder / f"{prefix}{i:03d}.docx"
        # Distinct sizes and contents: each file is its own document.
        path.write_bytes(f"{prefix} {i} ".encode() * (100 + 37 * i))
        if label:
            set_label(path, label)
        files.append(path)
    return files


def verified_event_ids(db: Path, public_key: Ed25519PublicKey) -> set[str]:
    """Independently re-verify every stored batch and return the event ids inside them."""
    ids: set[str] = set()
    with sqlite3.connect(db) as conn:
        for body, signature in conn.execute("SELECT body, signature FROM batches"):
            public_key.verify(signature, b"exfilwatch.batch.v1\n" + body)
            ids.update(e.event_id for e in events_pb2.EventBatch.FromString(body).events)
    return ids


def stored_event_ids(db: Path) -> list[str]:
    with sqlite3.connect(db) as conn:
        return [row[0] for row in conn.execute("SELECT event_id FROM events")]


def test_labelled_copies_become_one_alert(
    collector: Collector, make_agent: AgentFactory, workspace: Path
) -> None:
    agent = make_agent()
    sensitive, usb = workspace / "sensitive", workspace / "usb"
    labelled = make_files(sensitive, 25, "confidential")
    plain = make_files(sensitive, 5, None, prefix="plain")

    # 12 with cp, 13 with shutil.copy, plus 5 unlabelled files.
    subprocess.run(["cp", *map(str, labelled[:12]), str(usb)], check=True)
    for path in labelled[12:]:
        shutil.copy(path, usb)
    for path in plain:
        shutil.copy(path, usb)

    def full_alert() -> dict[str, object] | None:
        alerts = collector.cli_json("alerts", "list")
        return next((a for a in alerts if a["files"] == 25), None)

    alert = wait_until(full_alert, 60, "an alert with 25 files")
    alerts = collector.cli_json("alerts", "list")
    assert [a["kind"] for a in alerts] == ["threshold"], alerts
    assert alert["rule"] == "bulk-copy-to-usb"
    assert alert["bytes"] == sum(p.stat().st_size for p in labelled)
    group = alert["group"]
    assert isinstance(group, dict) and group["host"] == "agent-host" and group["user"]

    shown = collector.cli_json("alerts", "show", str(alert["alert_id"]))[0]
    events = shown["events"]
    assert isinstance(events, list) and len(events) == 25
    assert {e["destination"]["path"] for e in events} == {str(usb / p.name) for p in labelled}
    assert {e["source"]["path"] for e in events} == {str(p) for p in labelled}
    assert {e["label"] for e in events} == {"confidential"}
    assert {e["detection"] for e in events} == {"exact_hash"}
    assert all(e["device"]["serial"] == "E2E-0001" for e in events)

    # Nothing about the unlabelled files reached the collector.
    stored = collector.cli_json("events", "list", "--limit", "1000")
    paths = {str(e["destination"]["path"]) for e in stored if isinstance(e["destination"], dict)}
    assert not paths & {str(usb / p.name) for p in plain}

    # Every stored event sits in a batch whose signature verifies with the agent's key.
    key = Signer.load(agent.config.parent / "agent-state" / SIGNING_KEY)
    public = Ed25519PublicKey.from_public_bytes(key.public_key_raw())
    db = collector.data / "collector.db"
    assert set(stored_event_ids(db)) <= verified_event_ids(db, public)


def test_collector_restart_loses_and_duplicates_nothing(
    collector: Collector, make_agent: AgentFactory, workspace: Path
) -> None:
    agent = make_agent()
    sensitive, usb = workspace / "sensitive", workspace / "usb"
    files = make_files(sensitive, 60, "secret")
    agents_addr, enroll_addr = collector.agents, collector.enroll

    for path in files[:20]:
        shutil.copy(path, usb)
    # Stop the collector while the agent is copying; it keeps spooling.
    collector.stop(signal.SIGKILL)
    for path in files[20:40]:
        shutil.copy(path, usb)
    collector.start(listen=agents_addr, enroll=enroll_addr)
    for path in files[40:]:
        shutil.copy(path, usb)

    db = collector.data / "collector.db"

    def all_copies_stored() -> bool:
        events = collector.cli_json("events", "list", "--limit", "1000")
        return sum(1 for e in events if e["action"] == "copy") >= 60

    wait_until(all_copies_stored, 90, "60 copy events stored after the restart")
    agent.stop()
    produced = agent.spooled_event_ids()
    wait_until(lambda: len(stored_event_ids(db)) >= len(produced), 30, "agent_stop stored")
    stored = stored_event_ids(db)
    assert len(stored) == len(set(stored)), "an event was stored twice"
    assert len(produced) == len(set(produced))
    assert set(stored) == set(produced)


def test_hostile_file_names_travel_byte_exact_and_print_escaped(
    collector: Collector, make_agent: AgentFactory, workspace: Path
) -> None:
    make_agent()
    sensitive, usb = os.fsencode(workspace / "sensitive"), os.fsencode(workspace / "usb")
    names = [b"bad_\xff\xfe.docx", b"<img src=x onerror=alert(1)>.docx", b"line\nbreak\x1b[2J.xlsx"]
    for i, name in enumerate(names):
        src = os.path.join(sensitive, name)
        with open(src, "wb") as f:
            f.write(b"payload %d " % i * 50)
        set_label(Path(os.fsdecode(src)), "secret")
        shutil.copy(src, os.path.join(usb, name))

    def copies() -> list[dict[str, object]] | None:
        rows = [e for e in collector.cli_json("events", "list") if e["action"] == "copy"]
        return rows if len(rows) == len(names) else None

    rows = wait_until(copies, 60, "three copy events")
    got = set()
    for row in rows:
        dest = row["destination"]
        assert isinstance(dest, dict)
        raw = base64.b64decode(str(dest["path_b64"]))
        got.add(os.path.basename(raw))
        assert "\n" not in str(dest["path"]) and "\x1b" not in str(dest["path"])
    assert got == set(names)

    text = run_cli("collector", "events", "list", "--data", str(collector.data)).stdout
    assert "bad_\\xff\\xfe.docx" in text
    assert "line\\x0abreak\\x1b[2J.xlsx" in text
    assert "\x1b" not in text
    assert len([line for line in text.splitlines() if "copy" in line]) == len(names)
