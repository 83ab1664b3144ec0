"""collector.store.store_batches: several agents' batches in one transaction, as each alone."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path

import pytest

from collector.errors import ReplayConflictError, SequenceGapError, StoreError
from collector.models import AlertId, StoredEvent, ThresholdDecision
from collector.policy import load_policy
from collector.records import StoreResult
from collector.store import BatchWrite, SqliteStore
from collector.thresholds import ThresholdEngine
from collector.verify import ChainHead, verify_batch
from tests.collector.batches import T0, BatchChain, Signed, TestAgent, enroll, new_agent
from tests.conftest import POLICY

NOW = T0 + 3600 * 10**9


def no_decisions(event: StoredEvent) -> list[ThresholdDecision]:
    return []


def ok(outcome: StoreResult | Exception) -> StoreResult:
    """A batch's outcome that must be a store result (not a refusal)."""
    assert isinstance(outcome, StoreResult), outcome
    return outcome


def stored(outcomes: Sequence[StoreResult | Exception]) -> list[int]:
    return [ok(o).events_stored for o in outcomes]


def write(
    store: SqliteStore,
    agent: TestAgent,
    signed: Signed,
    head: ChainHead | None = None,
    decide: object = no_decisions,
) -> BatchWrite:
    """A BatchWrite of a batch verified against `head` (default: the stored chain head)."""
    batch = verify_batch(
        signed=signed.raw,
        tls_agent_id=agent.agent_id,
        agent=agent.key(),
        last=head or store.chain_head(agent.agent_id),
    )
    return BatchWrite(store.prepare(batch), decide, NOW)  # type: ignore[arg-type]


def agents(store: SqliteStore, n: int) -> list[tuple[TestAgent, BatchChain]]:
    out = []
    for _ in range(n):
        agent = new_agent()
        enroll(store, agent)
        out.append((agent, BatchChain(agent)))
    return out


def test_batches_of_several_agents_are_stored_together(store: SqliteStore) -> None:
    (a, ca), (b, cb), (c, cc) = agents(store, 3)
    signed = [ca.next(n=4), cb.next(n=2), cc.next(n=3)]
    results = store.store_batches(
        [write(store, agent, s) for agent, s in zip((a, b, c), signed, strict=True)]
    )
    assert [ok(r).duplicate for r in results] == [False] * 3
    assert stored(results) == [4, 2, 3]
    assert store.event_ids() == {e.event_id for s in signed for e in s.events}
    for agent, s in zip((a, b, c), signed, strict=True):
        assert store.chain_head(agent.agent_id) == ChainHead(1, s.digest)
        record = store.get_agent(agent.agent_id)
        assert record is not None and record.last_seen_ns == NOW


def test_a_batch_twice_in_one_group_is_a_duplicate_the_second_time(store: SqliteStore) -> None:
    ((agent, chain),) = agents(store, 1)
    signed = chain.next(n=3)
    first, again = map(ok, store.store_batches([write(store, agent, signed)] * 2))
    assert (first.duplicate, first.events_stored) == (False, 3)
    assert (again.duplicate, again.events_stored) == (True, 0)
    assert store.count_events() == 3


def test_other_bytes_under_a_seq_taken_in_the_same_group_are_refused_alone(
    store: SqliteStore,
) -> None:
    (agent, chain), (other, other_chain) = agents(store, 2)
    signed = chain.next(n=3)
    rival = BatchChain(agent).next(n=2)  # batch_seq 1 again, other bytes
    good = other_chain.next(n=1)
    results = store.store_batches(
        [write(store, agent, signed), write(store, agent, rival), write(store, other, good)]
    )
    assert ok(results[0]).events_stored == 3 and ok(results[2]).events_stored == 1
    assert isinstance(results[1], ReplayConflictError)
    assert store.count_events() == 4


def test_one_agent_s_next_batches_extend_its_chain_within_a_group(store: SqliteStore) -> None:
    ((agent, chain),) = agents(store, 1)
    one, two = chain.next(n=2), chain.next(n=2)
    writes = [write(store, agent, one), write(store, agent, two, head=ChainHead(1, one.digest))]
    assert stored(store.store_batches(writes)) == [2, 2]
    assert store.chain_head(agent.agent_id) == ChainHead(2, two.digest)


def test_a_batch_whose_chain_moved_is_refused_and_the_others_stored(store: SqliteStore) -> None:
    (agent, chain), (other, other_chain) = agents(store, 2)
    one, two = chain.next(n=2), chain.next(n=2)
    # `two` was verified as if `one` were stored, but `one` is not in the group: a gap.
    writes = [
        write(store, agent, two, head=ChainHead(1, one.digest)),
        write(store, other, other_chain.next(n=5)),
    ]
    gap, rest = store.store_batches(writes)
    assert isinstance(gap, SequenceGapError)
    assert ok(rest).events_stored == 5 and store.count_events() == 5
    assert store.chain_head(agent.agent_id) is None


def test_an_event_id_in_two_batches_of_a_group_is_stored_once(store: SqliteStore) -> None:
    (a, ca), (b, cb) = agents(store, 2)
    first = ca.next(n=3)
    # b re-sends one of a's events (a copied id) among two of its own.
    second = cb.next([first.events[1], *cb.events(2)])
    assert stored(store.store_batches([write(store, a, first), write(store, b, second)])) == [3, 2]
    assert store.count_events() == 5


def test_a_failed_write_stores_nothing_of_the_group(store: SqliteStore) -> None:
    ((agent, chain),) = agents(store, 1)
    stranger = new_agent()  # never enrolled: its batch row fails the foreign key
    good = write(store, agent, chain.next(n=2))
    bad = write(store, stranger, BatchChain(stranger).next(n=2))
    with pytest.raises(StoreError, match="FOREIGN KEY"):
        store.store_batches([good, bad])
    assert store.count_events() == 0 and store.chain_head(agent.agent_id) is None


def ingest_in(
    store: SqliteStore, chains: list[list[Signed]], owners: list[TestAgent], grouped: bool
) -> None:
    """Store every batch with real threshold decisions: one group per round, or one by one."""
    engine = ThresholdEngine(load_policy(POLICY))

    def decide(event: StoredEvent) -> list[ThresholdDecision]:
        return engine.feed(event, NOW)

    for round_ in range(3):
        heads = [
            None if round_ == 0 else ChainHead(round_, chain[round_ - 1].digest) for chain in chains
        ]
        writes = [
            write(store, agent, chain[round_], head=head, decide=decide)
            for agent, chain, head in zip(owners, chains, heads, strict=True)
        ]
        if grouped:
            assert all(not isinstance(r, Exception) for r in store.store_batches(writes))
        else:
            for w in writes:
                store.store_batch(w.batch, w.decide, w.now_ns)


def alerts(store: SqliteStore) -> list[tuple[object, ...]]:
    return sorted(
        (a.rule, a.group, a.files, a.bytes, a.first_ns, a.last_ns, a.reason, frozenset(a.evidence))
        for a in store.list_alerts(limit=1000)
    )


def test_batches_written_together_are_decided_as_one_at_a_time(tmp_path: Path) -> None:
    per_batch = 110
    results = []
    for grouped in (True, False):
        with SqliteStore.open(tmp_path / f"grouped-{grouped}.db") as store:
            owners = [new_agent() for _ in range(2)]
            for agent in owners:
                enroll(store, agent)
            chains = []
            for agent in owners:
                chain = BatchChain(agent)
                chains.append([chain.next(n=per_batch) for _ in range(3)])
            ingest_in(store, chains, owners, grouped)
            results.append((store.count_events(), alerts(store)))
    (n_grouped, grouped_alerts), (n_single, single_alerts) = results
    assert n_grouped == n_single == 6 * per_batch
    # The same events (ids differ between the runs): the same alerts, minus the ids.
    assert [a[:7] for a in grouped_alerts] == [a[:7] for a in single_alerts]
    assert grouped_alerts and all(a[2] == len(a[7]) for a in grouped_alerts)  # type: ignore[arg-type]


def test_a_large_group_holding_a_stored_event_skips_it(store: SqliteStore) -> None:
    (a, ca), (b, cb) = agents(store, 2)
    early = ca.next(n=2)
    store.store_batches([write(store, a, early)])
    n = 300  # more than one statement's worth of rows
    later = cb.next([early.events[0], *cb.events(n)])  # one event stored before
    more = ca.next(n=n)
    seen: list[str] = []

    def decide(event: StoredEvent) -> list[ThresholdDecision]:
        seen.append(event.event_id)
        return []

    writes = [write(store, b, later, decide=decide), write(store, a, more, decide=decide)]
    assert stored(store.store_batches(writes)) == [n, n]
    assert early.events[0].event_id not in seen and len(seen) == 2 * n
    assert store.count_events() == 2 + 2 * n


def test_an_insert_that_fails_rolls_the_whole_group_back(
    store: SqliteStore, tmp_path: Path
) -> None:
    (a, ca), (b, cb) = agents(store, 2)
    con = sqlite3.connect(tmp_path / "collector.db")
    poison = "BEGIN SELECT RAISE(ABORT, 'poisoned'); END"
    con.execute(
        f"CREATE TRIGGER poison BEFORE INSERT ON events WHEN NEW.agent_id = '{b.agent_id}' {poison}"
    )
    con.close()
    n = 300
    writes = [write(store, a, ca.next(n=n)), write(store, b, cb.next(n=n))]
    with pytest.raises(StoreError, match="poisoned"):
        store.store_batches(writes)
    assert store.count_events() == 0
    assert stored(store.store_batches(writes[:1])) == [n]  # the store still works


def test_batches_with_long_rules_are_written_one_after_another(store: SqliteStore) -> None:
    (a, ca), (b, cb) = agents(store, 2)
    counts: list[int] = []

    def after(con: sqlite3.Connection, events: tuple[StoredEvent, ...]) -> list[AlertId]:
        counts.append(con.execute("SELECT count(*) FROM events").fetchone()[0])
        return []

    writes = [write(store, a, ca.next(n=2)), write(store, b, cb.next(n=3))]
    writes = [BatchWrite(w.batch, w.decide, w.now_ns, after=after) for w in writes]
    assert stored(store.store_batches(writes)) == [2, 3]
    assert counts == [2, 5]  # each saw the store as it stood after its own batch


def test_an_older_store_loses_the_evidence_by_event_index_and_still_reads(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    agent = new_agent()
    chain = BatchChain(agent)
    with SqliteStore.open(db) as store:
        enroll(store, agent)
        engine = ThresholdEngine(load_policy(POLICY))
        signed = chain.next(n=25)
        w = write(store, agent, signed, decide=lambda e: engine.feed(e, NOW))
        assert stored(store.store_batches([w])) == [25]
    con = sqlite3.connect(db)  # as a collector before this change left it
    con.execute("CREATE INDEX alert_events_event ON alert_events (event_id)")
    con.close()
    with SqliteStore.open(db) as store:
        con = sqlite3.connect(db)
        names = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        con.close()
        assert "alert_events_event" not in names
        (alert,) = [a for a in store.list_alerts() if a.rule == "bulk-copy-to-usb"]
        record, events = store.get_alert(alert.alert_id)
        assert len(events) == 25 == record.files
