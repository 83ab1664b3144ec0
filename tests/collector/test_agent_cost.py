"""What agents cost their workstations, as heartbeats report it: `agents list` and a store
made before the columns existed."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from pathlib import Path

from collector.store import SqliteStore
from tests.collector.batches import T0, enroll, new_agent
from tests.collector.clirun import run

MIB = 2**20


def test_agents_list_shows_cpu_and_memory_once_reported(data: Path) -> None:
    reporting, older = new_agent(), new_agent()
    with SqliteStore.open(data / "collector.db") as store:
        enroll(store, reporting)
        enroll(store, older)
        store.touch_agent(reporting.agent_id, T0, cpu_percent=0.75, rss_bytes=68 * MIB)
        store.touch_agent(older.agent_id, T0, spool_depth=3)  # an agent too old to say
    rc, text = run("agents", "list", "--data", str(data))
    lines = {line.split()[0]: line for line in text.splitlines()}
    assert rc == 0 and "cpu 0.8%  mem 68.0 MiB" in lines[reporting.agent_id]
    assert "cpu" not in lines[older.agent_id] and "spool 3" in lines[older.agent_id]
    rc, text = run("agents", "list", "--json", "--data", str(data))
    rows = {r["agent_id"]: r for r in map(json.loads, text.splitlines())}
    assert (rows[reporting.agent_id]["cpu_percent"], rows[reporting.agent_id]["rss_bytes"]) == (
        0.75, 68 * MIB,
    )  # fmt: skip
    assert (rows[older.agent_id]["cpu_percent"], rows[older.agent_id]["rss_bytes"]) == (0, 0)


def test_a_store_without_the_columns_gains_them(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    agent = new_agent()
    with SqliteStore.open(path) as store:
        enroll(store, agent)
    with contextlib.closing(sqlite3.connect(path)) as con:
        con.execute("ALTER TABLE agents DROP COLUMN cpu_percent")  # as schema 2 made it
        con.execute("ALTER TABLE agents DROP COLUMN rss_bytes")
        con.commit()
    with SqliteStore.open(path) as store:
        (before,) = store.list_agents()
        assert (before.cpu_percent, before.rss_bytes) == (0, 0)
        store.touch_agent(agent.agent_id, T0, cpu_percent=1.0, rss_bytes=MIB)
        (after,) = store.list_agents()
    assert (after.cpu_percent, after.rss_bytes) == (1.0, MIB)
