"""Silent agents: found by time since last contact; a crash and a clean stop told apart."""

from __future__ import annotations

from collector.models import AgentId, Severity
from collector.monitor import Monitor, SilenceKind, silent_agents
from collector.records import AgentRecord

MIN = 60 * 10**9
NOW = 1_800_000_000 * 10**9


def agent(agent_id: str, last_seen_ns: int, *, revoked: bool = False) -> AgentRecord:
    return AgentRecord(
        agent_id=AgentId(agent_id),
        public_key_raw=b"k" * 32,
        key_id=b"i" * 32,
        hostname=f"host-{agent_id}",
        agent_version="0.1.0",
        enrolled_at_ns=NOW - 60 * MIN,
        last_seen_ns=last_seen_ns,
        revoked=revoked,
        cert_serial="1",
        policy_revision="r",
        spool_depth=0,
        coverage_gaps=0,
    )


def test_silence_is_measured_from_last_contact() -> None:
    agents = [
        agent("fresh", NOW - 4 * MIN),
        agent("edge", NOW - 5 * MIN),
        agent("old", NOW - 50 * MIN),
        agent("never", 0),  # enrolled an hour ago, never heard from
        agent("gone", NOW - 50 * MIN, revoked=True),
    ]
    found = silent_agents(agents, lambda _id: False, NOW, 5 * MIN)
    assert [s.agent_id for s in found] == ["edge", "old", "never"]


def test_crash_and_clean_stop_are_told_apart() -> None:
    agents = [agent("crashed", NOW - 10 * MIN), agent("stopped", NOW - 10 * MIN)]
    found = {s.agent_id: s for s in silent_agents(agents, "stopped".__eq__, NOW, 5 * MIN)}
    assert found["crashed"].kind is SilenceKind.CRASHED
    assert found["crashed"].severity == "high"
    assert "without a clean stop" in found["crashed"].reason(NOW)
    assert found["stopped"].kind is SilenceKind.STOPPED
    assert found["stopped"].severity == "low"
    assert "stopped cleanly 10 min ago" in found["stopped"].reason(NOW)


class FakeStore:
    def __init__(self, agents: list[AgentRecord], stopped: set[str]) -> None:
        self.agents = agents
        self.stopped = stopped
        self.alerts: list[tuple[str, str, str]] = []

    def list_agents(self) -> list[AgentRecord]:
        return self.agents

    def stopped_cleanly(self, agent_id: str) -> bool:
        return agent_id in self.stopped

    def record_security_alert(
        self, agent_id: str, kind: str, message: str, now_ns: int, severity: Severity
    ) -> int:
        self.alerts.append((agent_id, kind, message))
        return len(self.alerts)


def test_monitor_records_one_alert_per_silent_agent() -> None:
    store = FakeStore([agent("a", NOW - 10 * MIN), agent("b", NOW)], stopped=set())
    monitor = Monitor(store, 5 * MIN, lambda: NOW, interval_s=3600)
    monitor.start()
    try:
        found = monitor.check()
    finally:
        monitor.stop()
    assert [s.agent_id for s in found] == ["a"]
    assert [(a, k) for a, k, _ in store.alerts] == [("a", "AgentSilent")]


def test_store_tells_a_clean_stop_from_a_crash(tmp_path) -> None:
    from collector.ingest import Ingestor
    from collector.policy import load_policy
    from collector.store import SqliteStore
    from exfilwatch.v1 import events_pb2
    from tests.collector.batches import T0, BatchChain, enroll, new_agent
    from tests.conftest import POLICY

    crashed, stopped = new_agent(), new_agent()
    with SqliteStore.open(tmp_path / "c.db") as store:
        ingest = Ingestor(store, load_policy(POLICY))
        for a, actions in (
            (crashed, [events_pb2.ACTION_AGENT_START, events_pb2.ACTION_COPY]),
            (stopped, [events_pb2.ACTION_AGENT_START, events_pb2.ACTION_AGENT_STOP]),
        ):
            enroll(store, a)
            chain = BatchChain(a)
            events = [chain.events(1, action=action)[0] for action in actions]
            ingest.upload(chain.next(events).raw, a.agent_id, T0)
        assert not store.stopped_cleanly(crashed.agent_id)
        assert store.stopped_cleanly(stopped.agent_id)
        late = T0 + 3600 * 10**9
        found = Monitor(store, 5 * MIN, lambda: late, interval_s=3600).check()
        assert {s.agent_id: s.kind for s in found} == {
            crashed.agent_id: SilenceKind.CRASHED,
            stopped.agent_id: SilenceKind.STOPPED,
        }
        alerts = {a.agent_id: a for a in store.list_alerts() if a.kind == "security"}
        assert alerts[crashed.agent_id].severity == "high"
        assert alerts[stopped.agent_id].severity == "low"
