"""The shipper: backoff, and delivery to a real collector with acknowledgement."""

from __future__ import annotations

import random
import uuid
from pathlib import Path

import grpc
import pytest

from agent.clock import SystemClock
from agent.enroll import enroll
from agent.events import Action, Event, EventId
from agent.identity import SIGNING_KEY, SPOOL
from agent.shipper import Shipper, ShipperSettings, next_delay
from agent.signer import Signer
from agent.spool import Spool
from exfilwatch.v1 import collector_pb2, collector_pb2_grpc
from tests.conftest import InProcessCollector
from tests.procs import wait_until


def test_backoff_grows_jittered_and_capped() -> None:
    rng = random.Random(7)
    delays = [next_delay(a, rng, base=0.2, cap=10.0) for a in range(12)]
    assert all(0.1 <= d <= 10.0 for d in delays)
    assert delays[0] <= 0.2 and delays[-1] >= 5.0
    # Jitter: two agents failing together do not retry together.
    a = [next_delay(5, random.Random(1)) for _ in range(1)]
    b = [next_delay(5, random.Random(2)) for _ in range(1)]
    assert a != b


def _event(n: int) -> Event:
    return Event(
        event_id=EventId(str(uuid.uuid4())),
        observed_at_ns=1_800_000_000 * 10**9 + n,
        action=Action.AGENT_START,
        host="h",
        agent_version="t",
    )


def test_spooled_events_are_delivered_and_acknowledged(
    inproc_collector: InProcessCollector, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    identity = enroll(inproc_collector.enroll_address, inproc_collector.token(), state, "h")
    spool = Spool.open(
        state / SPOOL, agent_id=identity.agent_id, signer=Signer.load(state / SIGNING_KEY)
    )
    shipper = Shipper(identity, spool, SystemClock(), ShipperSettings(max_events=50))
    shipper.start()
    try:
        events = [_event(i) for i in range(120)]
        spool.append(events)
        shipper.wake()
        wait_until(lambda: spool.depth() == (0, 0), 30, "the spool to drain")
    finally:
        shipper.stop(flush_s=1)
        spool.close()
    stored = inproc_collector.store.event_ids()
    assert {e.event_id for e in events} <= stored
    head = inproc_collector.store.chain_head(identity.agent_id)
    assert head is not None and head.batch_seq == shipper.acked_batches >= 3


def test_certificate_is_renewed_and_the_old_one_refused(
    inproc_collector: InProcessCollector, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    identity = enroll(inproc_collector.enroll_address, inproc_collector.token(), state, "h")
    old_tls = identity.tls_material()
    before = inproc_collector.store.get_agent(identity.agent_id)
    assert before is not None
    spool = Spool.open(
        state / SPOOL, agent_id=identity.agent_id, signer=Signer.load(state / SIGNING_KEY)
    )
    # Certificates last 30 days; "renew when under 31 days left" renews at once.
    settings = ShipperSettings(renew_before_s=31 * 86400.0)
    shipper = Shipper(identity, spool, SystemClock(), settings)
    shipper.start()
    try:
        wait_until(lambda: shipper.renewals == 1, 30, "a renewal")
        spool.append([_event(1)])
        shipper.wake()
        wait_until(lambda: spool.depth() == (0, 0), 30, "delivery with the new certificate")
    finally:
        shipper.stop(flush_s=1)
        spool.close()
    after = inproc_collector.store.get_agent(identity.agent_id)
    assert after is not None and after.cert_serial != before.cert_serial
    assert identity.tls_material() != old_tls
    assert not list(state.glob("*.next"))
    # The replaced certificate still passes TLS but is refused by the collector.
    with grpc.secure_channel(identity.target, grpc.ssl_channel_credentials(*old_tls)) as ch:
        stub = collector_pb2_grpc.CollectorStub(ch)
        with pytest.raises(grpc.RpcError) as info:
            stub.Heartbeat(collector_pb2.HeartbeatRequest(), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_interrupted_rotation_is_completed(tmp_path: Path) -> None:
    from agent.identity import NEXT, TLS_CERT, TLS_KEY, Identity, write_private

    identity = Identity("ag-x", "127.0.0.1", 1, tmp_path)
    (tmp_path / "ca.crt").write_bytes(b"ca")
    write_private(tmp_path / TLS_KEY, b"old key")
    (tmp_path / TLS_CERT).write_bytes(b"old cert")
    # Crash after the key was replaced, before the certificate was.
    write_private(tmp_path / (TLS_KEY + NEXT), b"new key")
    write_private(tmp_path / (TLS_CERT + NEXT), b"new cert")
    (tmp_path / (TLS_KEY + NEXT)).replace(tmp_path / TLS_KEY)
    assert identity.tls_material() == (b"ca", b"new key", b"new cert")
