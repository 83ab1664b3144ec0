"""The shipper: backoff, and delivery to a real collector with acknowledgement."""

from __future__ import annotations

import random
import time
import uuid
from pathlib import Path

import grpc
import pytest

from agent import codec
from agent.clock import SystemClock
from agent.enroll import enroll
from agent.events import Action, CoverageGap, DestinationClass, Event, EventId, FileRef
from agent.identity import SIGNING_KEY, SPOOL
from agent.shipper import Shipper, ShipperSettings, next_delay
from agent.signer import GENESIS_DIGEST, Signer
from agent.spool import Spool
from collector.enroll import Enrollment
from collector.ingest import Ingestor
from collector.policy import load_policy
from collector.rpc import Handlers
from collector.server import create_server
from exfilwatch.v1 import collector_pb2, collector_pb2_grpc
from tests.conftest import POLICY, InProcessCollector
from tests.procs import wait_until

LEVELS = ("public", "internal", "confidential", "secret")


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


def _copy(n: int, label: str) -> Event:
    """A copy of a labelled (or, with label "", unlabelled) file to a USB stick."""
    path = f"/home/alice/file-{n}.docx".encode()
    return Event(
        event_id=EventId(str(uuid.uuid4())),
        observed_at_ns=1_800_000_000 * 10**9 + n,
        action=Action.COPY,
        host="h",
        agent_version="t",
        source=FileRef(path, 1000, "a" * 64),
        label=label,
        destination=FileRef(b"/media/usb/" + path, 1000, "a" * 64),
        destination_class=DestinationClass.REMOVABLE,
    )


class SyncCountingSpool(Spool):
    """The real spool, counting `sync` calls (a power cut is tested in test_spool_sync)."""

    syncs = 0

    def sync(self) -> None:
        super().sync()
        self.syncs += 1


def test_outage_keeps_events_rankable_and_drops_only_the_least_sensitive(
    inproc_collector: InProcessCollector, tmp_path: Path
) -> None:
    """Issue 4, shipper bug A: while the collector is down the shipper seals no more than
    the one batch it keeps retrying, so the byte cap drops unlabelled events (and only
    them) instead of confidential ones that came later; the drop count is exact."""
    state = tmp_path / "state"
    identity = enroll(inproc_collector.enroll_address, inproc_collector.token(), state, "h")
    port = inproc_collector.bound.agent_port
    inproc_collector.bound.server.stop(grace=None).wait()  # the outage starts

    rounds = [
        [_copy(10 * r + i, "" if i % 2 else "confidential") for i in range(10)] for r in range(12)
    ]
    produced = [ev for batch in rounds for ev in batch]
    total = sum(len(codec.event_to_bytes(ev)) for ev in produced)
    spool = SyncCountingSpool.open(
        state / SPOOL,
        agent_id=identity.agent_id,
        signer=Signer.load(state / SIGNING_KEY),
        max_bytes=total * 2 // 3,  # a third must go; half of it is unlabelled
        levels=LEVELS,
    )
    assert isinstance(spool, SyncCountingSpool)
    # A short max_delay: the old shipper sealed a new batch that often during an outage.
    settings = ShipperSettings(
        max_events=10, linger_ns=0, max_delay_ns=10**6, call_timeout_s=0.2, max_backoff_s=0.2
    )
    shipper = Shipper(identity, spool, SystemClock(), settings)
    server = None
    shipper.start()
    try:
        for events in rounds:
            failures = shipper.send_failures
            spool.append(events)
            shipper.wake()
            wait_until(lambda: shipper.send_failures > failures, 30, "a failed send")  # noqa: B023
            assert spool.depth()[1] <= 1, "more than one batch sealed during the outage"
        # Unsealed is not undurable: the waiting shipper fsynced the spool instead.
        assert spool.syncs > 0
        assert spool.dropped() > 0
        # Report the drops as agent.service does: a coverage_gap event carries the count
        # (its own bytes may push one more event out, reported by the next one).
        reported = 0
        while dropped := spool.dropped():
            gap = Event(
                event_id=EventId(str(uuid.uuid4())),
                observed_at_ns=1_800_000_001 * 10**9,
                action=Action.COVERAGE_GAP,
                host="h",
                agent_version="t",
                gap=CoverageGap("spool_dropped", dropped),
            )
            spool.append([gap], reported_drops=dropped)
            reported += dropped

        # The collector comes back on the same port.
        policy = load_policy(POLICY)
        store, authority = inproc_collector.store, inproc_collector.authority
        handlers = Handlers(
            Ingestor(store, policy),
            Enrollment(store, authority),
            authority,
            time.time_ns,
            lambda: port,
            policy=policy,
        )
        server = create_server(
            handlers, authority, listen=f"127.0.0.1:{port}", enroll_listen="127.0.0.1:0"
        ).server
        server.start()
        shipper.wake()
        wait_until(lambda: spool.depth() == (0, 0), 30, "the spool to drain")
    finally:
        shipper.stop(flush_s=1)
        spool.close()
        if server is not None:
            server.stop(grace=None).wait()
    stored = inproc_collector.store.event_ids()
    missing = [ev for ev in produced if ev.event_id not in stored]
    assert {ev.label for ev in missing} == {""}, "a labelled event was dropped"
    gaps = [e for e in inproc_collector.store.list_events(limit=1000) if e.action == "coverage_gap"]
    assert sum(e.gap_count for e in gaps) == reported == len(missing) > 0


def test_wake_does_not_cut_the_backoff_after_a_refusal(
    inproc_collector: InProcessCollector, tmp_path: Path
) -> None:
    """Issue 4, shipper bug C: new events wake the shipper, but a refused batch is retried
    only after its jittered backoff. The collector counts every refusal on its alert."""
    state = tmp_path / "state"
    identity = enroll(inproc_collector.enroll_address, inproc_collector.token(), state, "h")
    signer = Signer.load(state / SIGNING_KEY)
    # Another batch 1 under this agent's key is stored first: the agent's own batch 1 is
    # then refused (ALREADY_EXISTS) however often it is sent.
    other = codec.event_to_bytes(_copy(0, "confidential"))
    body = codec.encode_batch(identity.agent_id, 1, GENESIS_DIGEST, time.time_ns(), [other])
    raw = codec.encode_signed_batch(body, signer.sign_batch(body), signer.key_id())
    Ingestor(inproc_collector.store, load_policy(POLICY)).upload(
        raw, identity.agent_id, time.time_ns()
    )
    spool = Spool.open(state / SPOOL, agent_id=identity.agent_id, signer=signer)

    def refusals() -> int:
        alerts = inproc_collector.store.list_alerts()
        return sum(a.count for a in alerts if a.rule == "ReplayConflictError")

    settings = ShipperSettings(linger_ns=0, max_backoff_s=10.0)
    shipper = Shipper(identity, spool, SystemClock(), settings)
    shipper.start()
    wakes = 0
    deadline = time.monotonic() + 30
    try:
        while refusals() < 4 and time.monotonic() < deadline:
            spool.append([_copy(wakes + 1, "")])
            shipper.wake()
            wakes += 1
    finally:
        shipper.stop(flush_s=0)
        spool.close()
    (alert,) = [a for a in inproc_collector.store.list_alerts() if a.rule == "ReplayConflictError"]
    assert alert.count >= 4
    # Backoffs after attempts 0, 1, 2 are at least 0.1, 0.2 and 0.4 s (half of 0.2 * 2**n).
    assert alert.last_ns - alert.created_at_ns >= 0.7e9
    assert wakes > 10 * alert.count, "the shipper was woken far more often than it sent"
