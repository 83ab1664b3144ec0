"""Ingest from many threads at once (group commit): the same store and alerts as one by one."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from collector.errors import CollectorError, StoreError
from collector.ingest import Ingestor
from collector.policy import load_policy
from collector.rpc import Ack
from collector.store import SqliteStore
from tests.collector.batches import T0, BatchChain, Signed, TestAgent, enroll, new_agent
from tests.conftest import POLICY

NOW = T0 + 3600 * 10**9
AGENTS = 6
BATCHES = 5


def fleet(store: SqliteStore) -> list[tuple[TestAgent, list[Signed]]]:
    """AGENTS agents, each with BATCHES batches of 8 copies by alice on lt-0412 (one group
    for the rules, so that alerts depend on how the agents' batches interleave)."""
    out = []
    for _ in range(AGENTS):
        agent = new_agent()
        enroll(store, agent)
        chain = BatchChain(agent)
        out.append((agent, [chain.next(n=8) for _ in range(BATCHES)]))
    return out


def upload_all(
    ingest: Ingestor, agents: list[tuple[TestAgent, list[Signed]]]
) -> dict[str, list[Ack | CollectorError]]:
    """Every agent uploads its chain in order from its own thread, all starting together;
    an agent stops at its first failure (a shipper would retry that batch later)."""
    results: dict[str, list[Ack | CollectorError]] = {a.agent_id: [] for a, _ in agents}
    start = threading.Barrier(len(agents))

    def run(agent: TestAgent, batches: list[Signed]) -> None:
        start.wait()
        for signed in batches:
            try:
                results[agent.agent_id].append(ingest.upload(signed.raw, agent.agent_id, NOW))
            except CollectorError as e:
                results[agent.agent_id].append(e)
                return

    threads = [threading.Thread(target=run, args=pair) for pair in agents]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
        assert not t.is_alive()
    return results


def summary(store: SqliteStore) -> list[tuple[object, ...]]:
    """Alerts without what depends on arrival order (ids, times, reason words)."""
    return sorted((a.kind, a.rule, a.group, a.status) for a in store.list_alerts(limit=1000))


def test_concurrent_uploads_are_stored_once_each_and_acknowledged(tmp_path: Path) -> None:
    with SqliteStore.open(tmp_path / "c.db") as store:
        agents = fleet(store)
        results = upload_all(Ingestor(store, load_policy(POLICY)), agents)
        for agent, batches in agents:
            acks = results[agent.agent_id]
            assert all(isinstance(a, Ack) for a in acks), acks
            assert [(a.batch_seq, a.events_stored, a.duplicate) for a in acks] == [  # type: ignore[union-attr]
                (s.batch_seq, 8, False) for s in batches
            ]
        expected = {e.event_id for _, batches in agents for s in batches for e in s.events}
        assert store.event_ids() == expected
        # One stretch of one group: a single alert holding every event as evidence.
        (alert,) = [a for a in store.list_alerts() if a.rule == "bulk-copy-to-usb"]
        assert alert.files == len(expected) and set(alert.evidence) == expected


def test_a_batch_that_cannot_be_stored_fails_alone_and_the_rules_stay_whole(
    tmp_path: Path,
) -> None:
    db = tmp_path / "c.db"
    with SqliteStore.open(db) as store:
        agents = fleet(store)
        poisoned = agents[2][0].agent_id
        _trigger(db, f"BEFORE INSERT ON events WHEN NEW.agent_id = '{poisoned}'")
        ingest = Ingestor(store, load_policy(POLICY))
        results = upload_all(ingest, agents)
        for agent, _ in agents:
            outcomes = results[agent.agent_id]
            if agent.agent_id == poisoned:
                assert len(outcomes) == 1 and isinstance(outcomes[0], StoreError), outcomes
            else:
                assert len(outcomes) == BATCHES, outcomes
                assert all(isinstance(o, Ack) for o in outcomes), outcomes
        stored = store.event_ids()
        assert len(stored) == (AGENTS - 1) * BATCHES * 8
        # The rules count exactly what is stored: the alert holds every stored event.
        (alert,) = [a for a in store.list_alerts() if a.rule == "bulk-copy-to-usb"]
        assert set(alert.evidence) == stored and alert.files == len(stored)
        # Once the store takes the batches again, the agent's retries go through.
        _drop_trigger(db)
        agent, batches = agents[2]
        acks = [ingest.upload(s.raw, agent.agent_id, NOW) for s in batches]
        assert [a.events_stored for a in acks] == [8] * BATCHES
        (alert,) = [a for a in store.list_alerts() if a.rule == "bulk-copy-to-usb"]
        assert alert.files == AGENTS * BATCHES * 8


def _trigger(db: Path, when: str) -> None:
    con = sqlite3.connect(db)
    con.execute(f"CREATE TRIGGER poison {when} BEGIN SELECT RAISE(ABORT, 'poisoned'); END")
    con.close()


def _drop_trigger(db: Path) -> None:
    con = sqlite3.connect(db)
    con.execute("DROP TRIGGER poison")
    con.close()


def test_concurrent_ingest_decides_like_serial_ingest(tmp_path: Path) -> None:
    summaries = []
    for mode in ("serial", "concurrent"):
        with SqliteStore.open(tmp_path / f"{mode}.db") as store:
            agents = fleet(store)
            ingest = Ingestor(store, load_policy(POLICY))
            if mode == "serial":
                for agent, batches in agents:
                    for s in batches:
                        ingest.upload(s.raw, agent.agent_id, NOW)
            else:
                upload_all(ingest, agents)
            summaries.append((store.count_events(), summary(store)))
    assert summaries[0] == summaries[1]
