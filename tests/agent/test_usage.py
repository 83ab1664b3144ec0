"""agent.usage: the agent's own CPU and memory, and their way to the collector in heartbeats."""

from __future__ import annotations

import math
import time
from pathlib import Path

import grpc
import pytest

from agent.clock import SystemClock
from agent.enroll import enroll
from agent.identity import SIGNING_KEY, SPOOL, Identity
from agent.shipper import Shipper, ShipperSettings
from agent.signer import Signer
from agent.spool import Spool
from agent.usage import Usage, UsageMeter, process_sample
from exfilwatch.v1 import collector_pb2, collector_pb2_grpc
from tests.conftest import InProcessCollector
from tests.procs import wait_until

MIB = 2**20


def test_cpu_is_a_share_of_one_core_over_each_interval() -> None:
    samples = iter([(110.0, 2.5, 40 * MIB), (120.0, 7.5, 42 * MIB), (120.0, 7.5, 42 * MIB)])
    meter = UsageMeter(sample=lambda: next(samples), start=lambda: (100.0, 0.0, 0))
    assert meter.read() == Usage(cpu_percent=25.0, rss_bytes=40 * MIB)  # 2.5 s in 10 s
    assert meter.read() == Usage(cpu_percent=50.0, rss_bytes=42 * MIB)  # 5 s in 10 s
    assert meter.read() == Usage(cpu_percent=0.0, rss_bytes=42 * MIB)  # no time passed


def test_this_process_is_measured() -> None:
    meter = UsageMeter()
    deadline = time.process_time() + 0.2
    while time.process_time() < deadline:  # burn CPU: the reading must see it
        pass
    usage = meter.read()
    assert usage.cpu_percent > 0 and math.isfinite(usage.cpu_percent)
    assert 10 * MIB < usage.rss_bytes == pytest.approx(process_sample()[2], rel=0.5)


def _agent(collector: InProcessCollector, tmp_path: Path) -> tuple[Identity, Spool]:
    state = tmp_path / "state"
    identity = enroll(collector.enroll_address, collector.token(), state, "h")
    spool = Spool.open(
        state / SPOOL, agent_id=identity.agent_id, signer=Signer.load(state / SIGNING_KEY)
    )
    return identity, spool


def test_heartbeats_carry_the_cost_to_the_collector(
    inproc_collector: InProcessCollector, tmp_path: Path
) -> None:
    identity, spool = _agent(inproc_collector, tmp_path)
    usage = Usage(cpu_percent=3.25, rss_bytes=71 * MIB)
    shipper = Shipper(identity, spool, SystemClock(), ShipperSettings(), usage=lambda: usage)
    shipper.start()
    try:

        def reported() -> tuple[float, int] | None:
            agent = inproc_collector.store.get_agent(identity.agent_id)
            return (agent.cpu_percent, agent.rss_bytes) if agent and agent.rss_bytes else None

        assert wait_until(reported, 30, "the cost in a heartbeat") == (3.25, 71 * MIB)
    finally:
        shipper.stop(flush_s=1)
        spool.close()


@pytest.mark.parametrize(
    ("cpu", "rss", "stored"),
    [
        (float("nan"), 1, (0.0, 1)),
        (-5.0, 1, (0.0, 1)),
        (float("inf"), 2**64 - 1, (100_000.0, 2**63 - 1)),
    ],
)
def test_absurd_figures_are_not_stored_as_sent(
    inproc_collector: InProcessCollector,
    tmp_path: Path,
    cpu: float,
    rss: int,
    stored: tuple[float, int],
) -> None:
    identity, spool = _agent(inproc_collector, tmp_path)
    spool.close()
    ca, key, cert = identity.tls_material()
    creds = grpc.ssl_channel_credentials(ca, key, cert)
    with grpc.secure_channel(identity.target, creds) as channel:
        collector_pb2_grpc.CollectorStub(channel).Heartbeat(
            collector_pb2.HeartbeatRequest(
                agent_id=identity.agent_id, cpu_percent=cpu, rss_bytes=rss, spool_depth=rss,
                coverage_gaps=rss,
            ),
            timeout=30,
        )  # fmt: skip
    agent = inproc_collector.store.get_agent(identity.agent_id)
    assert agent is not None and (agent.cpu_percent, agent.rss_bytes) == stored
    assert agent.spool_depth == agent.coverage_gaps == stored[1]
