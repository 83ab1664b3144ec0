"""Ingest without gRPC: verify -> store -> thresholds, refusals, and a restart."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from collector.errors import ReplayConflictError, SignatureError, UnknownAgentError
from collector.ingest import Ingestor
from collector.policy import load_policy
from collector.store import SqliteStore
from tests.collector.batches import T0, BatchChain, enroll, new_agent
from tests.conftest import POLICY


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    with SqliteStore.open(tmp_path / "collector.db") as s:
        yield s


def test_twenty_copies_open_one_alert_and_later_ones_attach(store: SqliteStore) -> None:
    agent = new_agent()
    enroll(store, agent)
    ingest = Ingestor(store, load_policy(POLICY))
    chain = BatchChain(agent)
    now = T0 + 3600 * 10**9
    acks = [ingest.upload(chain.next(n=5).raw, agent.agent_id, now) for _ in range(5)]
    assert [a.batch_seq for a in acks] == [1, 2, 3, 4, 5]
    assert all(a.events_stored == 5 and not a.duplicate for a in acks)
    alerts = [a for a in store.list_alerts() if a.rule == "bulk-copy-to-usb"]
    assert len(alerts) == 1
    assert alerts[0].files == 25 and len(alerts[0].evidence) == 25
    assert dict(alerts[0].group) == {"user": "alice", "host": "lt-0412"}


def test_refused_batch_stores_nothing_and_raises_a_security_alert(store: SqliteStore) -> None:
    agent, forger = new_agent(), new_agent()
    enroll(store, agent)
    ingest = Ingestor(store, load_policy(POLICY))
    forged = BatchChain(forger)
    forged.agent = forger
    signed = forged.next()
    # The forger's batch claims to come from `agent` over agent's TLS identity.
    with pytest.raises(SignatureError):
        ingest.upload(signed.raw, agent.agent_id, T0)
    with pytest.raises(UnknownAgentError):
        ingest.upload(signed.raw, None, T0)
    assert store.count_events() == 0
    kinds = {a.rule for a in store.list_alerts() if a.kind == "security"}
    assert kinds == {"SignatureError", "UnknownAgentError"}


def test_replay_identical_is_acknowledged_and_different_is_refused(store: SqliteStore) -> None:
    agent = new_agent()
    enroll(store, agent)
    ingest = Ingestor(store, load_policy(POLICY))
    chain = BatchChain(agent)
    first = chain.next()
    assert not ingest.upload(first.raw, agent.agent_id, T0).duplicate
    assert ingest.upload(first.raw, agent.agent_id, T0).duplicate
    other = BatchChain(agent).next()  # seq 1 again, different events
    with pytest.raises(ReplayConflictError):
        ingest.upload(other.raw, agent.agent_id, T0)
    assert store.count_events() == 3


def test_restart_rebuilds_windows_from_the_store(tmp_path: Path) -> None:
    agent = new_agent()
    policy = load_policy(POLICY)
    now = T0 + 3600 * 10**9
    chain = BatchChain(agent)
    with SqliteStore.open(tmp_path / "c.db") as store:
        enroll(store, agent)
        ingest = Ingestor(store, policy)
        for _ in range(3):
            ingest.upload(chain.next(n=5).raw, agent.agent_id, now)
        assert [a for a in store.list_alerts() if a.kind == "threshold"] == []
    with SqliteStore.open(tmp_path / "c.db") as store:
        ingest = Ingestor(store, policy)
        ingest.restore(chain.now_ns)
        ingest.upload(chain.next(n=5).raw, agent.agent_id, now)
        burst = [a for a in store.list_alerts() if a.rule == "bulk-copy-to-usb"]
        # 15 events before the restart + 5 after = the 20 that cross the threshold.
        assert len(burst) == 1 and burst[0].files == 20
        ingest = Ingestor(store, policy)
        ingest.restore(chain.now_ns)
        ingest.upload(chain.next(n=5).raw, agent.agent_id, now)
        burst = [a for a in store.list_alerts() if a.rule == "bulk-copy-to-usb"]
        assert len(burst) == 1 and burst[0].files == 25, "a restart opened a second alert"
