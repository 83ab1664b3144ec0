"""The agent port's client-certificate check: remembered per certificate, valid only while it is."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from agent.enroll import enroll
from collector import pki
from collector.enroll import Enrollment
from collector.ingest import Ingestor
from collector.policy import load_policy
from collector.rpc import Handlers
from collector.server import create_server
from collector.store import SqliteStore
from exfilwatch.v1 import collector_pb2, collector_pb2_grpc
from tests.conftest import POLICY

DAY_NS = 86_400 * 10**9


class Clock:
    def __init__(self) -> None:
        self.ns = time.time_ns()

    def __call__(self) -> int:
        return self.ns


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[SqliteStore, pki.Authority, Clock, str, str]]:
    data = tmp_path / "collector"
    pki.init_pki(data)
    authority = pki.Authority.load(data)
    clock = Clock()
    ports: dict[str, int] = {}
    with SqliteStore.open(data / "collector.db") as store:
        policy = load_policy(POLICY)
        handlers = Handlers(
            Ingestor(store, policy),
            Enrollment(store, authority),
            authority,
            clock,
            lambda: ports["agent"],
            policy=policy,
        )
        bound = create_server(
            handlers, authority, listen="127.0.0.1:0", enroll_listen="127.0.0.1:0", workers=2
        )
        ports["agent"] = bound.agent_port
        bound.server.start()
        try:
            yield (
                store,
                authority,
                clock,
                f"127.0.0.1:{bound.enroll_port}",
                f"127.0.0.1:{bound.agent_port}",
            )
        finally:
            bound.server.stop(grace=None).wait()


def _token(store: SqliteStore, authority: pki.Authority) -> str:
    token = pki.new_token(authority.fingerprint)
    now = time.time_ns()
    store.add_token(token.token_id, pki.secret_hash(token.secret), now, now + DAY_NS, 1)
    return str(token)


def test_a_remembered_certificate_is_refused_once_it_expires(
    served: tuple[SqliteStore, pki.Authority, Clock, str, str], tmp_path: Path
) -> None:
    store, authority, clock, enroll_address, _ = served
    identity = enroll(enroll_address, _token(store, authority), tmp_path / "state", "h")
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
