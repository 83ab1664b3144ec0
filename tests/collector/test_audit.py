"""`audit verify` re-proves stored events and names what does not verify."""

from __future__ import annotations

import io
import sqlite3
from pathlib import Path

from collector.audit import verify_store
from collector.cli import main
from collector.ingest import Ingestor
from collector.policy import load_policy
from collector.store import SqliteStore
from tests.collector.batches import T0, BatchChain, enroll, new_agent
from tests.conftest import POLICY


def _populate(db: Path) -> tuple[str, list[str]]:
    agent = new_agent()
    with SqliteStore.open(db) as store:
        enroll(store, agent)
        ingest = Ingestor(store, load_policy(POLICY))
        chain = BatchChain(agent)
        for _ in range(4):
            ingest.upload(chain.next(n=5).raw, agent.agent_id, T0)
        ids = [e.event_id for b in chain.sealed for e in b.events]
    return agent.agent_id, ids


def test_untouched_store_verifies(tmp_path: Path) -> None:
    db = tmp_path / "collector.db"
    _populate(db)
    report = verify_store(db)
    assert report.ok and (report.agents, report.batches, report.events) == (1, 4, 20)


def test_one_changed_byte_in_an_event_is_named(tmp_path: Path) -> None:
    db = tmp_path / "collector.db"
    agent_id, ids = _populate(db)
    with sqlite3.connect(db) as con:
        con.execute("UPDATE events SET source_size = source_size + 1 WHERE event_id = ?", (ids[7],))
    report = verify_store(db)
    assert [(f.agent_id, f.batch_seq, f.event_id) for f in report.findings] == [
        (agent_id, 2, ids[7])
    ]
    assert "source_size" in report.findings[0].problem


def test_one_changed_byte_in_a_signed_body_is_named(tmp_path: Path) -> None:
    db = tmp_path / "collector.db"
    agent_id, _ = _populate(db)
    with sqlite3.connect(db) as con:
        (body,) = con.execute("SELECT body FROM batches WHERE batch_seq = 3").fetchone()
        changed = bytearray(body)
        changed[len(changed) // 2] ^= 0x01
        con.execute("UPDATE batches SET body = ? WHERE batch_seq = 3", (bytes(changed),))
    report = verify_store(db)
    assert [(f.agent_id, f.batch_seq) for f in report.findings] == [(agent_id, 3)]
    assert "signature" in report.findings[0].problem


def test_a_deleted_batch_is_a_gap_and_its_events_orphans(tmp_path: Path) -> None:
    db = tmp_path / "collector.db"
    _populate(db)
    with sqlite3.connect(db) as con:
        con.execute("DELETE FROM batches WHERE batch_seq = 2")
    problems = [f.problem for f in verify_store(db).findings]
    assert any("gap after batch 1" in p for p in problems)
    assert sum("without a stored batch" in p for p in problems) == 5


def test_cli_exit_codes(tmp_path: Path) -> None:
    data = tmp_path / "d"
    out = io.StringIO()
    assert main(["init", "--data", str(data)], out=out) == 0
    _, ids = _populate(data / "collector.db")
    out = io.StringIO()
    assert main(["audit", "verify", "--data", str(data)], out=out) == 0
    assert "20 events in 4 batches from 1 agents: all verify" in out.getvalue()
    with sqlite3.connect(data / "collector.db") as con:
        con.execute("UPDATE events SET label = 'public' WHERE event_id = ?", (ids[0],))
    out = io.StringIO()
    assert main(["audit", "verify", "--data", str(data)], out=out) == 1
    assert "FAIL agent " in out.getvalue() and ids[0] in out.getvalue()
