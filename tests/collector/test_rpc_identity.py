"""The agent port's client-certificate check: remembered per certificate, valid only while it is."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from agent.enroll import enroll
from collector import pki
from exfilwatch.v1 import collector_pb2, collector_pb2_grpc
from tests.conftest import InProcessCollector, serving

DAY_NS = 86_400 * 10**9


class Clock:
    def __init__(self) -> None:
        self.ns = time.time_ns()

    def __call__(self) -> int:
        return self.ns


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[InProcessCollector, Clock]]:
    clock = Clock()
    with serving(tmp_path / "collector", clock=clock, rpc_workers=2) as collector:
        yield collector, clock


def test_a_remembered_certificate_is_refused_once_it_expires(
    served: tuple[InProcessCollector, Clock], tmp_path: Path
) -> None:
    collector, clock = served
    store = collector.store
    token = collector.token(ttl_s=DAY_NS // 10**9)
    identity = enroll(collector.enroll_address, token, tmp_path / "state", "h")
    credentials = grpc.ssl_channel_credentials(*identity.tls_material())
    with grpc.secure_channel(identity.target, credentials) as channel:
        stub = collector_pb2_grpc.CollectorStub(channel)
        request = collector_pb2.HeartbeatRequest(agent_id=identity.agent_id)
        for _ in range(2):  # the second call finds the certificate already checked
            assert stub.Heartbeat(request, timeout=10).server_time_ns == clock.ns
        clock.ns += (pki.CLIENT_CERT_DAYS + 1) * DAY_NS
        with pytest.raises(grpc.RpcError) as info:
            stub.Heartbeat(request, timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        clock.ns -= (pki.CLIENT_CERT_DAYS + 1) * DAY_NS  # and valid again inside its dates
        assert stub.Heartbeat(request, timeout=10).server_time_ns == clock.ns
        store.revoke_agent(identity.agent_id)  # revocation counts on the very next call
        with pytest.raises(grpc.RpcError) as info:
            stub.Heartbeat(request, timeout=10)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
