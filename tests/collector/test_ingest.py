"""Ingest without gRPC: verify -> store -> thresholds, refusals, and a restart."""

from __future__ import annotations

import random
import sqlite3
import threading
from pathlib import Path

import pytest

from collector import restore
from collector.codec import decode_batch_body
from collector.errors import ReplayConflictError, SignatureError, StoreError, UnknownAgentError
from collector.ingest import CLOCK_SKEW_FUTURE, Ingestor, IngestSettings
from collector.models import AlertOpened, EvidenceAdded, ThresholdDecision
from collector.policy import load_policy, parse_policy
from collector.records import AlertRecord
from collector.store import SqliteStore
from collector.thresholds import ThresholdEngine
from tests.collector.batches import T0, BatchChain, Signed, enroll, make_body, new_agent
from tests.conftest import POLICY


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


# -- issue 4: batches dated in the future -----------------------------------------------

MIN = 60 * 10**9


def _future(chain: BatchChain, n: int, at_ns: int, *, sealed_at_ns: int | None = None) -> Signed:
    """The chain's next batch: `n` copies observed at `at_ns` (one ns apart), signed."""
    events = chain.events(n)
    for i, ev in enumerate(events):
        ev.observed_at_ns = at_ns + i
    body = make_body(
        chain.agent.agent_id,
        chain.batch_seq + 1,
        chain.prev_digest,
        events,
        sealed_at_ns=at_ns if sealed_at_ns is None else sealed_at_ns,
    )
    return chain.seal(body, events)


def _skew_alerts(store: SqliteStore) -> list[AlertRecord]:
    return [a for a in store.list_alerts() if a.rule == CLOCK_SKEW_FUTURE]


def test_a_batch_dated_in_the_future_is_stored_and_raises_one_alert_per_agent(
    store: SqliteStore,
) -> None:
    agent = new_agent()
    enroll(store, agent)
    ingest = Ingestor(store, load_policy(POLICY))
    chain = BatchChain(agent)
    now = T0 + 3600 * 10**9

    within = _future(chain, 2, now + 9 * MIN)  # 9 min ahead: a clock a little off
    assert ingest.upload(within.raw, agent.agent_id, now).events_stored == 2
    assert _skew_alerts(store) == []

    ahead = _future(chain, 2, now + 2 * 3600 * 10**9)  # two hours ahead
    ack = ingest.upload(ahead.raw, agent.agent_id, now)
    assert (ack.events_stored, ack.duplicate) == (2, False)  # genuine: stored all the same
    (alert,) = _skew_alerts(store)
    assert (alert.kind, alert.agent_id, alert.count) == ("security", agent.agent_id, 1)
    assert f"batch {ahead.batch_seq} " in alert.reason
    assert "7200.000 s" in alert.reason

    sealed_late = _future(chain, 1, now, sealed_at_ns=now + 11 * MIN)  # only its seal is ahead
    ingest.upload(sealed_late.raw, agent.agent_id, now)
    assert ingest.upload(sealed_late.raw, agent.agent_id, now).duplicate  # a replay: no alert
    (alert,) = _skew_alerts(store)  # deduplicated per agent, like the refusals
    assert alert.count == 2
    assert f"batch {sealed_late.batch_seq} " in alert.reason and "660.000 s" in alert.reason
    assert store.count_events() == 5

    other = new_agent()
    enroll(store, other)
    ingest.upload(_future(BatchChain(other), 1, now + MIN, sealed_at_ns=now + 99 * MIN).raw,
                  other.agent_id, now)  # fmt: skip
    assert {a.agent_id for a in _skew_alerts(store)} == {agent.agent_id, other.agent_id}


def test_the_skew_limit_is_a_setting(store: SqliteStore) -> None:
    agent = new_agent()
    enroll(store, agent)
    strict = Ingestor(store, load_policy(POLICY), IngestSettings(max_future_skew_ns=MIN))
    strict.upload(_future(BatchChain(agent), 1, T0 + 2 * MIN).raw, agent.agent_id, T0)
    assert len(_skew_alerts(store)) == 1


def _bulk(store: SqliteStore) -> list[AlertRecord]:
    return [a for a in store.list_alerts() if a.rule == "bulk-copy-to-usb"]


def test_a_future_timestamp_cannot_dodge_a_window(store: SqliteStore) -> None:
    """19 copies now and one stamped an hour ahead: counted at its arrival, it is the 20th
    copy of the same 10 minutes, and the rule fires."""
    agent = new_agent()
    enroll(store, agent)
    ingest = Ingestor(store, load_policy(POLICY))
    chain = BatchChain(agent)
    now = chain.now_ns + 19 * 10**9
    ingest.upload(chain.next(n=19).raw, agent.agent_id, now)
    assert _bulk(store) == []
    ingest.upload(_future(chain, 1, now + 3600 * 10**9).raw, agent.agent_id, now)
    (alert,) = _bulk(store)
    assert alert.files == 20


def test_a_future_timestamp_cannot_hold_a_window_open(store: SqliteStore) -> None:
    """20 copies stamped an hour ahead count at their arrival: the group cools ten minutes
    later, and a later burst opens a new alert instead of attaching to the old one."""
    agent = new_agent()
    enroll(store, agent)
    ingest = Ingestor(store, load_policy(POLICY))
    chain = BatchChain(agent)
    now = T0
    ingest.upload(_future(chain, 20, now + 3600 * 10**9).raw, agent.agent_id, now)
    (first,) = _bulk(store)
    assert first.hot_until_ns == now + 10 * MIN  # not an hour and ten minutes from now

    chain.now_ns = now + 20 * MIN
    later = now + 21 * MIN
    ingest.upload(chain.next(n=20).raw, agent.agent_id, later)
    assert len(_bulk(store)) == 2


def test_a_restart_counts_future_dated_events_at_their_arrival_too(tmp_path: Path) -> None:
    policy = load_policy(POLICY)
    agent = new_agent()
    chain = BatchChain(agent)
    arrival = T0
    with SqliteStore.open(tmp_path / "c.db") as store:
        enroll(store, agent)
        ingest = Ingestor(store, policy)
        ingest.upload(_future(chain, 1, arrival + 3600 * 10**9).raw, agent.agent_id, arrival)
    chain.now_ns = arrival
    with SqliteStore.open(tmp_path / "c.db") as store:
        ingest = Ingestor(store, policy)
        ingest.restore(arrival + 30 * 10**9)
        ingest.upload(chain.next(n=19).raw, agent.agent_id, arrival + 30 * 10**9)
        (alert,) = _bulk(store)  # the one stamped an hour ahead is the 20th of these minutes
        assert alert.files == 20


# -- issue 2: the reason grows with the evidence, across a restart ----------------------


def test_reason_and_totals_grow_with_the_evidence_across_a_restart(tmp_path: Path) -> None:
    policy = load_policy(POLICY)
    agent = new_agent()
    chain = BatchChain(agent)
    now = T0 + 3600 * 10**9
    with SqliteStore.open(tmp_path / "c.db") as store:
        enroll(store, agent)
        ingest = Ingestor(store, policy)
        for _ in range(5):
            ingest.upload(chain.next(n=5).raw, agent.agent_id, now)
        (alert,) = _bulk(store)
        assert (alert.files, alert.bytes) == (25, 25_000)
        assert "copied 25 confidential files, 24.4 KiB (25000 bytes), to removable" in alert.reason
        assert alert.reason.startswith("alice on lt-0412 copied 25 ")
        assert alert.reason.endswith("; rule bulk-copy-to-usb: 20 files / 100 MiB in 10m")
    with SqliteStore.open(tmp_path / "c.db") as store:
        ingest = Ingestor(store, policy)
        ingest.restore(now)
        secret = chain.events(5, label="secret")
        ingest.upload(chain.next(secret).raw, agent.agent_id, now)
        (alert,) = _bulk(store)
        assert (alert.files, alert.bytes, len(alert.evidence)) == (30, 30_000, 30)
        assert "copied 30 secret files, 29.3 KiB (30000 bytes), to removable in 29 s" in (
            alert.reason
        )


# -- issue 4: start-up reads only what can still decide ---------------------------------


def _copies(chain: BatchChain, spec: list[tuple[int, str, str, int]]) -> Signed:
    """One batch of copies: (seconds after T0, user, host, size) each."""
    events = []
    for t, user, host, size in spec:
        (ev,) = chain.events(1)
        ev.observed_at_ns = T0 + t * 10**9
        ev.user.login = user
        ev.host = host
        ev.source.size = ev.destination.size = size
        events.append(ev)
    return chain.next(events)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_restore_from_sql_decides_like_a_full_replay(tmp_path: Path, seed: int) -> None:
    """collector.restore reads a few events per group; an engine restored from them decides
    the next events exactly as one that replayed every event of the window."""
    policy = parse_policy(
        {
            "labels": ["public", "internal", "confidential", "secret"],
            "rules": [
                # Thresholds near what the load reaches: groups cool down and heat up.
                _rule("per-user", ["user"], "1h", files=150),
                _rule("per-user-host", ["user", "host"], "10m", bytes=24_000),
                _rule("per-host", ["host"], "30m", files=110),
                _rule("per-user-usb", ["user", "destination"], "2h", files=290, bytes=390_000),
            ],
        },
        "test",
    )
    rng = random.Random(seed)
    agent = new_agent()
    chain = BatchChain(agent)
    users, hosts = ["alice", "bob", "carol"], ["lt-1", "lt-2"]
    restart = 3 * 3600  # seconds after T0

    def copies(first_s: int, last_s: int, n: int) -> list[tuple[int, str, str, int]]:
        return sorted(
            (rng.randrange(first_s, last_s), rng.choice(users), rng.choice(hosts),
             rng.choice([100, 900, 3000]))
            for _ in range(n)
        )  # fmt: skip

    before = copies(0, restart, 1200)
    after = copies(restart, restart + 1800, 200)
    with SqliteStore.open(tmp_path / "c.db") as store:
        enroll(store, agent)
        live = Ingestor(store, policy)
        for i in range(0, len(before), 100):
            batch = _copies(chain, before[i : i + 100])
            live.upload(batch.raw, agent.agent_id, T0 + restart * 10**9)
        restart_ns = T0 + restart * 10**9
        state = store.read_with(lambda con: restore.load(con, policy, restart_ns))
        everything = list(store.events_since(restart_ns - policy.max_window_ns))

    from_sql, replayed = ThresholdEngine(policy), ThresholdEngine(policy)
    from_sql.restore(state.alerts, state.events)
    replayed.restore(state.alerts, [(e.observed_at_ns, e) for e in everything])
    signed = _copies(chain, after)
    decided_sql: list[ThresholdDecision] = []
    decided_replay: list[ThresholdDecision] = []
    for ev in decode_batch_body(signed.body, agent_id=agent.agent_id)[3]:
        decided_sql += from_sql.feed(ev, ev.observed_at_ns)
        decided_replay += replayed.feed(ev, ev.observed_at_ns)
    assert decided_sql == decided_replay
    assert {type(d) for d in decided_sql} == {AlertOpened, EvidenceAdded}


def test_restore_reads_only_what_can_still_decide(store: SqliteStore) -> None:
    """200 copies a minute apart: the 30-day rule needs the newest 30 (and one tied with
    the 30th), the 10-minute one the last ten minutes (10 copies, fewer than its 20 files);
    nothing else is read."""
    agent = new_agent()
    enroll(store, agent)
    ingest = Ingestor(store, load_policy(POLICY))
    chain = BatchChain(agent)
    spec = [(60 * i, "alice", "lt-0412", 1000) for i in range(200)]
    spec[169] = spec[170]  # the 31st newest is as new as the 30th: both are read
    now = T0 + 200 * 60 * 10**9
    for i in range(0, 200, 50):
        ingest.upload(_copies(chain, spec[i : i + 50]).raw, agent.agent_id, now)
    state = store.read_with(lambda con: restore.load(con, load_policy(POLICY), now))
    newest = sorted(e.observed_at_ns for e in store.events_since(0))[-31:]
    assert [t for t, _ in state.events] == newest
    assert state.rows_read == 31 + 1 + 10  # and one row to see that no more are tied
    assert [a[0] for a in state.alerts] == ["confidential-to-any-removable-30d"]


def _rule(
    name: str,
    group_by: list[str],
    window: str,
    *,
    files: int | None = None,
    bytes: int | None = None,
) -> dict[str, object]:
    threshold = {k: v for k, v in (("files", files), ("bytes", bytes)) if v is not None}
    return {
        "name": name,
        "match": {"min_label": "confidential", "destinations": ["removable"]},
        "group_by": group_by,
        "window": window,
        "threshold": threshold,
        "severity": "high",
    }


def test_uploads_wait_for_a_background_restore(tmp_path: Path) -> None:
    policy = load_policy(POLICY)
    agent = new_agent()
    chain = BatchChain(agent)
    now = T0 + 3600 * 10**9
    with SqliteStore.open(tmp_path / "c.db") as store:
        enroll(store, agent)
        ingest = Ingestor(store, policy)
        for _ in range(3):
            ingest.upload(chain.next(n=5).raw, agent.agent_id, now)
    with SqliteStore.open(tmp_path / "c.db") as store:
        ingest = Ingestor(store, policy)
        failed = threading.Event()
        restoring = ingest.restore_in_background(chain.now_ns, on_failure=failed.set)
        ingest.upload(chain.next(n=5).raw, agent.agent_id, now)  # right away
        restoring.join()
        (alert,) = _bulk(store)  # 15 restored + 5 new: the upload waited for the 15
        assert alert.files == 20
        assert not failed.is_set() and ingest.restore_error is None


def test_a_failed_background_restore_refuses_uploads_and_says_so(tmp_path: Path) -> None:
    agent = new_agent()
    chain = BatchChain(agent)
    with SqliteStore.open(tmp_path / "c.db") as store:
        enroll(store, agent)
        Ingestor(store, load_policy(POLICY)).upload(chain.next().raw, agent.agent_id, T0)
        con = sqlite3.connect(tmp_path / "c.db")
        con.execute("DROP TABLE future_dated_batches")  # the restore's query now fails
        con.commit()
        con.close()
        ingest = Ingestor(store, load_policy(POLICY))
        failed = threading.Event()
        ingest.restore_in_background(T0, on_failure=failed.set).join()
        assert failed.is_set()
        assert isinstance(ingest.restore_error, StoreError)
        with pytest.raises(StoreError, match="could not be restored"):
            ingest.upload(chain.next().raw, agent.agent_id, T0)
        assert store.count_events() == 3
