"""collector.store: one transaction per batch, replay handling, alerts, tokens, persistence."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from collector.errors import (
    ChainError,
    EnrollmentError,
    NotFoundError,
    ReplayConflictError,
    SequenceGapError,
    StoreError,
)
from collector.models import (
    AlertKind,
    AlertOpened,
    AlertStatus,
    EventId,
    EvidenceAdded,
    Severity,
    StoredEvent,
    ThresholdDecision,
)
from collector.store import SqliteStore
from collector.verify import ChainHead, verify_batch
from exfilwatch.v1 import events_pb2
from tests.collector.batches import T0, BatchChain, Signed, TestAgent, enroll, new_agent

WINDOW = 600 * 10**9
GROUP = (("user", "alice"), ("host", "lt-0412"))


def no_decisions(event: StoredEvent) -> list[ThresholdDecision]:
    return []


class OpenOnThird:
    """A trivial rule: the 3rd event opens an alert, every later one attaches to it."""

    def __init__(self, fail_at: int = 0) -> None:
        self.seen: list[StoredEvent] = []
        self.fail_at = fail_at

    def __call__(self, event: StoredEvent) -> list[ThresholdDecision]:
        self.seen.append(event)
        n = len(self.seen)
        if n == self.fail_at:
            raise RuntimeError("rule engine failed")
        hot = event.observed_at_ns + WINDOW
        if n < 3:
            return []
        if n == 3:
            return [
                AlertOpened(
                    rule="bulk-copy-to-usb",
                    group=GROUP,
                    severity=Severity.HIGH,
                    evidence=tuple(e.event_id for e in self.seen),
                    files=3,
                    bytes=sum(e.size for e in self.seen),
                    first_ns=self.seen[0].observed_at_ns,
                    last_ns=event.observed_at_ns,
                    hot_until_ns=hot,
                    reason="alice copied 3 confidential files to USB",
                )
            ]
        return [EvidenceAdded("bulk-copy-to-usb", GROUP, event.event_id, hot)]


@pytest.fixture
def agent(store):
    a = new_agent()
    enroll(store, a)
    return a


@pytest.fixture
def chain(agent):
    return BatchChain(agent)


def ingest(store, agent: TestAgent, signed: Signed, decide=no_decisions, now_ns=T0, last=None):
    head = store.chain_head(agent.agent_id) if last is None else last
    batch = verify_batch(
        signed=signed.raw,
        tls_agent_id=agent.agent_id,
        agent=store.get_agent_key(agent.agent_id),
        last=head,
    )
    return store.store_batch(batch, decide, now_ns)


def ids(signed: Signed) -> set[str]:
    return {e.event_id for e in signed.events}


def test_batch_and_events_are_stored_and_read_back_exactly(store, agent, chain):
    signed = chain.next(n=4)
    batch = verify_batch(
        signed=signed.raw, tls_agent_id=agent.agent_id, agent=agent.key(), last=None
    )
    result = store.store_batch(batch, no_decisions, T0)
    assert (result.duplicate, result.events_stored, result.alerts_opened) == (False, 4, [])
    assert store.count_events() == 4
    assert store.event_ids() == ids(signed)
    assert store.list_events(limit=10) == list(batch.events)
    assert list(store.events_since(0)) == list(batch.events)
    assert store.chain_head(agent.agent_id) == ChainHead(1, signed.digest)
    (kept,) = store.batch_bodies(agent.agent_id)
    assert (kept.body, kept.signature, kept.key_id, kept.digest) == (*signed.parts, signed.digest)
    assert store.get_agent(agent.agent_id).last_seen_ns == T0


def test_events_without_process_or_device_round_trip(store, agent, chain):
    events = chain.events(2)
    events[0].ClearField("process")
    events[1].ClearField("device")
    ingest(store, agent, chain.next(events))
    stored = store.list_events(limit=10)
    assert stored[0].process is None and stored[0].device is not None
    assert stored[1].device is None and stored[1].process is not None


def test_non_utf8_paths_are_stored_and_read_back_exactly(store, agent, chain):
    path = b"/media/usb/r\xe9sum\xe9-\xff\xfe\x80.docx"
    (event,) = chain.events(1)
    event.destination.path = path
    event.device.mount_point = b"/media/\xff"
    event.process.cmdline.append(b"\xc3\x28")
    ingest(store, agent, chain.next([event]))
    (stored,) = store.list_events(limit=1)
    assert stored.dest_path == path
    assert stored.device is not None and stored.device.mount_point == b"/media/\xff"
    assert stored.process is not None and stored.process.cmdline[-1] == b"\xc3\x28"
    assert next(store.events_since(0)).dest_path == path


def test_byte_identical_replay_is_a_duplicate_and_stores_nothing(store, agent, chain):
    first = chain.next(n=3)
    ingest(store, agent, first)
    ingest(store, agent, chain.next(n=2))
    calls = OpenOnThird()
    result = ingest(store, agent, first, decide=calls)
    assert (result.duplicate, result.events_stored) == (True, 0)
    assert calls.seen == []
    assert store.count_events() == 5
    assert len(list(store.batch_bodies(agent.agent_id))) == 2


def test_same_seq_with_other_bytes_conflicts_and_stores_nothing(store, agent, chain):
    first = chain.next(n=3)
    ingest(store, agent, first)
    other = BatchChain(agent).next(n=2)  # another batch 1 of the same agent, validly signed
    with pytest.raises(ReplayConflictError, match="other bytes"):
        ingest(store, agent, other)
    assert store.event_ids() == ids(first)
    assert [b.body for b in store.batch_bodies(agent.agent_id)] == [first.body]


def test_gap_at_commit_time_is_refused(store, agent, chain):
    first = chain.next()
    second = chain.next()
    third = chain.next()
    ingest(store, agent, first)
    with pytest.raises(SequenceGapError):
        # Verified against a head that the store does not have (a racing upload, say).
        ingest(store, agent, third, last=ChainHead(2, second.digest))
    assert store.event_ids() == ids(first)


def test_broken_chain_at_commit_time_is_refused(store, agent, chain):
    ingest(store, agent, chain.next())
    chain.prev_digest = b"\x42" * 32
    forked = chain.next()
    with pytest.raises(ChainError):
        ingest(store, agent, forked, last=ChainHead(1, b"\x42" * 32))
    assert store.chain_head(agent.agent_id).batch_seq == 1
    assert store.count_events() == 3


def test_event_ids_stored_by_an_earlier_batch_are_skipped(store, agent, chain):
    first = chain.next(n=2)
    ingest(store, agent, first)
    again = events_pb2.Event()
    again.CopyFrom(first.events[1])
    (fresh,) = chain.events(1)
    calls = OpenOnThird()
    result = ingest(store, agent, chain.next([again, fresh]), decide=calls)
    assert result.events_stored == 1
    assert [e.event_id for e in calls.seen] == [fresh.event_id]
    assert store.count_events() == 3
    assert store.chain_head(agent.agent_id).batch_seq == 2


def test_decisions_are_applied_in_the_batch_transaction(store, agent, chain):
    rule = OpenOnThird()
    first = chain.next(n=2)
    assert ingest(store, agent, first, decide=rule).alerts_opened == []
    second = chain.next(n=3)
    result = ingest(store, agent, second, decide=rule, now_ns=T0 + 7)
    (alert_id,) = result.alerts_opened
    alert, events = store.get_alert(alert_id)
    assert [e.event_id for e in events] == [e.event_id for e in rule.seen]
    assert alert.evidence == tuple(e.event_id for e in rule.seen)
    assert (alert.kind, alert.status, alert.severity) == (
        AlertKind.THRESHOLD,
        AlertStatus.NEW,
        Severity.HIGH,
    )
    assert (alert.rule, alert.group, alert.agent_id) == ("bulk-copy-to-usb", GROUP, agent.agent_id)
    assert (alert.files, alert.bytes) == (5, 5000)  # opened with 3, the 4th and 5th attached
    assert alert.first_ns == rule.seen[0].observed_at_ns
    assert alert.last_ns == rule.seen[-1].observed_at_ns
    assert alert.hot_until_ns == rule.seen[-1].observed_at_ns + WINDOW
    assert (alert.created_at_ns, alert.updated_at_ns) == (T0 + 7, T0 + 7)
    assert alert.reason == "alice copied 3 confidential files to USB"
    assert store.open_threshold_alerts() == [("bulk-copy-to-usb", GROUP, alert.hot_until_ns)]
    ingest(store, agent, chain.next(n=1), decide=rule, now_ns=T0 + 9)
    alert, _ = store.get_alert(alert_id)
    assert (alert.files, alert.updated_at_ns, len(alert.evidence)) == (6, T0 + 9, 6)
    assert [a.alert_id for a in store.list_alerts()] == [alert_id]


def test_evidence_for_an_event_of_an_earlier_batch_is_read_back(store, agent, chain):
    first = chain.next(n=3)
    result = ingest(store, agent, first, decide=OpenOnThird())
    old = first.events[0].event_id

    def attach_old(event):
        return [EvidenceAdded("bulk-copy-to-usb", GROUP, old, T0 + WINDOW * 2)]

    ingest(store, agent, chain.next(n=1), decide=attach_old)
    alert, _ = store.get_alert(result.alerts_opened[0])
    assert alert.files == 3  # already evidence: attached once, counted once
    assert alert.hot_until_ns == T0 + WINDOW * 2


def test_a_failing_decide_rolls_back_everything(store, agent, chain):
    signed = chain.next(n=5)
    with pytest.raises(RuntimeError, match="rule engine failed"):
        ingest(store, agent, signed, decide=OpenOnThird(fail_at=4))  # after opening an alert
    assert store.chain_head(agent.agent_id) is None
    assert store.count_events() == 0
    assert store.list_alerts() == []
    result = ingest(store, agent, signed, decide=OpenOnThird())  # the retry goes through
    assert (result.events_stored, len(result.alerts_opened)) == (5, 1)


def test_batch_of_an_unenrolled_agent_is_a_store_error(store, chain):
    stranger = new_agent()
    signed = BatchChain(stranger).next()
    batch = verify_batch(
        signed=signed.raw, tls_agent_id=stranger.agent_id, agent=stranger.key(), last=None
    )
    with pytest.raises(StoreError, match="FOREIGN KEY"):
        store.store_batch(batch, no_decisions, T0)
    assert store.count_events() == 0


def test_tokens_expire_and_run_out(store):
    store.add_token("tok1", b"h" * 32, T0, T0 + 100, 2)
    assert not store.consume_token("tok1", b"x" * 32, T0)  # wrong secret spends nothing
    assert not store.consume_token("nope", b"h" * 32, T0)
    assert store.consume_token("tok1", b"h" * 32, T0)
    assert store.consume_token("tok1", b"h" * 32, T0 + 99)
    assert not store.consume_token("tok1", b"h" * 32, T0 + 99)  # used up
    store.add_token("tok2", b"h" * 32, T0, T0 + 100, 5)
    assert not store.consume_token("tok2", b"h" * 32, T0 + 100)  # expired


def test_security_alerts_are_deduplicated_while_open(store, db_path):
    first = store.record_security_alert("ag-x", "SignatureError", "bad signature", T0)
    again = store.record_security_alert("ag-x", "SignatureError", "bad signature again", T0 + 5)
    other_kind = store.record_security_alert("ag-x", "ReplayConflictError", "replay", T0 + 6)
    other_agent = store.record_security_alert("ag-y", "SignatureError", "bad signature", T0 + 7)
    assert first == again
    assert len({first, other_kind, other_agent}) == 3
    alert, evidence = store.get_alert(first)
    assert (alert.kind, alert.count, alert.severity, evidence) == (
        AlertKind.SECURITY,
        2,
        Severity.HIGH,
        [],
    )
    assert (alert.created_at_ns, alert.updated_at_ns, alert.reason) == (
        T0,
        T0 + 5,
        "bad signature again",
    )
    assert (alert.rule, alert.agent_id, alert.group) == (
        "SignatureError",
        "ag-x",
        (("agent", "ag-x"),),
    )
    with sqlite3.connect(db_path) as con:  # an administrator resolves it
        con.execute("UPDATE alerts SET status = 'resolved' WHERE alert_id = ?", (first,))
    con.close()
    assert store.record_security_alert("ag-x", "SignatureError", "once more", T0 + 9) != first
    assert [a.alert_id for a in store.list_alerts(status=AlertStatus.RESOLVED)] == [first]
    assert store.open_threshold_alerts() == []


def test_agents_enrol_heartbeat_and_revoke(store, agent):
    with pytest.raises(EnrollmentError):
        enroll(store, agent)
    store.touch_agent(agent.agent_id, T0 + 5, policy_revision="r7", spool_depth=3, coverage_gaps=1)
    store.touch_agent(agent.agent_id, T0 + 1, agent_version="0.2.0")  # late: last_seen stays
    (record,) = store.list_agents()
    assert (record.last_seen_ns, record.policy_revision, record.spool_depth) == (T0 + 5, "r7", 3)
    assert (record.coverage_gaps, record.agent_version, record.hostname) == (1, "0.2.0", "lt-0412")
    assert store.get_agent_key(agent.agent_id) == agent.key()
    store.revoke_agent(agent.agent_id)
    assert store.get_agent_key(agent.agent_id) == agent.key(revoked=True)
    assert store.get_agent_key("ag-unknown") is None
    with pytest.raises(NotFoundError):
        store.touch_agent("ag-unknown", T0)
    with pytest.raises(NotFoundError):
        store.revoke_agent("ag-unknown")


def test_list_events_limit_and_since(store, agent, chain):
    signed = chain.next(n=5)
    ingest(store, agent, signed)
    times = [e.observed_at_ns for e in signed.events]
    assert [e.observed_at_ns for e in store.list_events(limit=2)] == times[-2:]
    assert [e.observed_at_ns for e in store.list_events(limit=2, since_ns=times[1])] == times[1:3]
    assert [e.observed_at_ns for e in store.events_since(times[3])] == times[3:]


def test_unknown_alert_is_not_found(store):
    with pytest.raises(NotFoundError):
        store.get_alert(42)


def test_everything_survives_a_reopen(db_path, store, agent, chain):
    first = chain.next(n=3)
    result = ingest(store, agent, first, decide=OpenOnThird())
    store.record_security_alert(agent.agent_id, "ChainError", "broken chain", T0)
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.count_events()
    with SqliteStore.open(db_path) as reopened:
        assert reopened.event_ids() == ids(first)
        assert reopened.chain_head(agent.agent_id) == ChainHead(1, first.digest)
        assert reopened.get_agent_key(agent.agent_id) == agent.key()
        assert len(reopened.list_alerts()) == 2
        assert reopened.get_alert(result.alerts_opened[0])[0].files == 3
        ingest(reopened, agent, chain.next(n=1))  # the chain continues where it was
        assert reopened.count_events() == 4


def test_newer_schema_is_refused(db_path, store):
    store.close()
    with sqlite3.connect(db_path) as con:
        con.execute("UPDATE schema_version SET version = 99")
    con.close()
    with pytest.raises(StoreError, match="schema version 99"):
        SqliteStore.open(db_path)


def test_unopenable_path_is_a_store_error(tmp_path):
    with pytest.raises(StoreError, match="cannot open"):
        SqliteStore.open(tmp_path / "missing-dir" / "collector.db")


def test_concurrent_uploads_and_reads_from_a_thread_pool(store):
    agents = [new_agent() for _ in range(4)]
    for a in agents:
        enroll(store, a)
    errors: list[BaseException] = []
    start = threading.Barrier(len(agents) + 1)

    def upload(a: TestAgent) -> None:
        chain = BatchChain(a)
        start.wait()
        try:
            for _ in range(10):
                ingest(store, a, chain.next(n=5))
                store.list_events(limit=5)
        except BaseException as e:  # reported to the main thread below
            errors.append(e)

    threads = [threading.Thread(target=upload, args=(a,)) for a in agents]
    for t in threads:
        t.start()
    start.wait()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert store.count_events() == 4 * 10 * 5
    assert {store.chain_head(a.agent_id).batch_seq for a in agents} == {10}


def test_checkpointer_thread_is_joined_on_close(db_path, agent, chain, store):
    ingest(store, agent, chain.next())
    (checkpointer,) = [t for t in threading.enumerate() if t.name == "sqlite-checkpoint"]
    store.close()
    assert not checkpointer.is_alive()
    with SqliteStore.open(db_path) as reopened:
        assert reopened.count_events() == 3


def test_evidence_for_an_unknown_event_is_a_store_error(store, agent, chain):
    result = ingest(store, agent, chain.next(n=3), decide=OpenOnThird())
    assert result.alerts_opened

    def bogus(event):
        return [
            EvidenceAdded(
                "bulk-copy-to-usb", GROUP, EventId("0" * 8 + "-0000-4000-8000-" + "0" * 12), 0
            )
        ]

    with pytest.raises(StoreError, match="not stored"):
        ingest(store, agent, chain.next(n=1), decide=bogus)
    assert store.count_events() == 3
