"""Forged, tampered and replayed batches against the real collector over mutual TLS."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from agent import codec
from agent.events import Action, Event, EventId
from agent.identity import SIGNING_KEY, Identity
from agent.signer import GENESIS_DIGEST, Signer, batch_digest
from exfilwatch.v1 import collector_pb2, collector_pb2_grpc, events_pb2
from tests.e2e.conftest import AgentFactory, set_label
from tests.procs import Collector, run_cli


def _event(n: int) -> bytes:
    ev = Event(
        event_id=EventId(str(uuid.uuid4())),
        observed_at_ns=1_800_000_000 * 10**9 + n,
        action=Action.AGENT_START,
        host="refusal-host",
        agent_version="test",
        seq=n,
    )
    return codec.event_to_bytes(ev)


class Client:
    def __init__(self, identity: Identity, signer: Signer) -> None:
        ca, key, cert = identity.tls_material()
        self.channel = grpc.secure_channel(
            identity.target, grpc.ssl_channel_credentials(ca, key, cert)
        )
        self.stub = collector_pb2_grpc.CollectorStub(self.channel)
        self.identity = identity
        self.signer = signer

    def body(self, seq: int, prev: bytes, n_events: int = 3) -> bytes:
        events = [_event(seq * 100 + i) for i in range(n_events)]
        return codec.encode_batch(self.identity.agent_id, seq, prev, 1, events)

    def send(
        self, body: bytes, signature: bytes | None = None, key_id: bytes | None = None
    ) -> collector_pb2.BatchAck:
        return self.stub.UploadBatch(
            events_pb2.SignedBatch(
                body=body,
                signature=signature if signature is not None else self.signer.sign_batch(body),
                key_id=key_id if key_id is not None else self.signer.key_id(),
            ),
            timeout=10,
        )


@pytest.fixture
def client(make_agent: AgentFactory) -> Iterator[Client]:
    agent = make_agent("refusals", start=False)
    state = agent.config.parent / "refusals-state"
    c = Client(Identity.load(state), Signer.load(state / SIGNING_KEY))
    yield c
    c.channel.close()


def _refused(call: Callable[[], object], code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, info.value.details()
    return str(info.value.details())


def test_forged_tampered_and_replayed_batches(collector: Collector, client: Client) -> None:
    def db_events() -> int:
        return len(collector.cli_json("events", "list", "--limit", "1000"))

    first = client.body(1, GENESIS_DIGEST)
    ack = client.send(first)
    assert (ack.batch_seq, ack.duplicate, ack.events_stored) == (1, False, 3)
    assert db_events() == 3

    # A byte-identical replay is acknowledged and not stored twice.
    again = client.send(first)
    assert (again.batch_seq, again.duplicate, again.events_stored) == (1, True, 0)
    assert db_events() == 3

    second = client.body(2, batch_digest(first))
    tampered = bytearray(second)
    tampered[-5] ^= 0x01
    _refused(
        lambda: client.send(bytes(tampered), signature=client.signer.sign_batch(second)),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    forger = Signer.generate()
    _refused(
        lambda: client.send(second, signature=forger.sign_batch(second)),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    _refused(
        lambda: client.send(second, signature=forger.sign_batch(second), key_id=forger.key_id()),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    # Validly signed by the agent, but a different body under a used batch_seq.
    conflict = client.body(1, GENESIS_DIGEST)
    _refused(lambda: client.send(conflict), grpc.StatusCode.ALREADY_EXISTS)
    # A gap, and a broken chain.
    _refused(
        lambda: client.send(client.body(5, batch_digest(first))),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    _refused(lambda: client.send(client.body(2, bytes(32))), grpc.StatusCode.FAILED_PRECONDITION)
    raw_upload = client.channel.unary_unary(
        "/exfilwatch.v1.Collector/UploadBatch",
        request_serializer=None,
        response_deserializer=collector_pb2.BatchAck.FromString,
    )
    _refused(
        lambda: raw_upload(b"\xff\xffnot a protobuf", timeout=10),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert db_events() == 3, "a refused batch stored something"

    # The honest chain continues.
    assert client.send(second).events_stored == 3
    assert db_events() == 6

    security = [a for a in collector.cli_json("alerts", "list") if a["kind"] == "security"]
    kinds = {a["rule"] for a in security}
    assert {"SignatureError", "ReplayConflictError", "SequenceGapError", "ChainError"} <= kinds, (
        kinds
    )
    assert all(a["agent_id"] == client.identity.agent_id for a in security)
    signature_alert = next(a for a in security if a["rule"] == "SignatureError")
    assert signature_alert["count"] == 3  # one alert, seen three times


def test_no_client_certificate_is_refused(collector: Collector, client: Client) -> None:
    ca, _, _ = client.identity.tls_material()
    with grpc.secure_channel(client.identity.target, grpc.ssl_channel_credentials(ca)) as channel:
        stub = collector_pb2_grpc.CollectorStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Heartbeat(collector_pb2.HeartbeatRequest(), timeout=10)
    # The TLS handshake itself fails: the agent port requires a client certificate.
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_enrolment_port_refuses_uploads(collector: Collector, client: Client) -> None:
    ca, _, _ = client.identity.tls_material()
    target = collector.enroll
    with grpc.secure_channel(target, grpc.ssl_channel_credentials(ca)) as channel:
        stub = collector_pb2_grpc.CollectorStub(channel)
        body = client.body(1, GENESIS_DIGEST)
        with pytest.raises(grpc.RpcError) as info:
            stub.UploadBatch(
                events_pb2.SignedBatch(
                    body=body,
                    signature=client.signer.sign_batch(body),
                    key_id=client.signer.key_id(),
                ),
                timeout=10,
            )
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert collector.cli_json("events", "list") == []


def test_enrolment_token_is_single_use(collector: Collector, tmp_path: Path) -> None:
    token = collector.token()
    first = run_cli(
        "agent",
        "enroll",
        "--collector",
        collector.enroll,
        "--token",
        token,
        "--state",
        str(tmp_path / "a"),
        "--hostname",
        "a",
        check=False,
    )
    assert first.returncode == 0, first.stderr
    second = run_cli(
        "agent",
        "enroll",
        "--collector",
        collector.enroll,
        "--token",
        token,
        "--state",
        str(tmp_path / "b"),
        "--hostname",
        "b",
        check=False,
    )
    assert second.returncode == 1
    assert "unknown, expired or used up" in second.stderr
    wrong_ca = token[:-64] + "0" * 64
    third = run_cli(
        "agent",
        "enroll",
        "--collector",
        collector.enroll,
        "--token",
        wrong_ca,
        "--state",
        str(tmp_path / "c"),
        "--hostname",
        "c",
        check=False,
    )
    assert third.returncode == 1
    assert "does not present the CA named in the token" in third.stderr
    agents = collector.cli_json("agents", "list")
    assert [a["hostname"] for a in agents] == ["a"]


def test_revoked_agent_is_refused_and_stops_for_good(
    collector: Collector, make_agent: AgentFactory, workspace: Path
) -> None:
    source = workspace / "sensitive" / "x.docx"
    source.write_bytes(b"x" * 100)
    set_label(source, "secret")
    agent = make_agent("revokee")
    agent_id = collector.cli_json("agents", "list")[0]["agent_id"]
    run_cli("collector", "agents", "revoke", str(agent_id), "--data", str(collector.data))
    assert agent.proc is not None
    # The next heartbeat (or upload) is refused; the agent exits 78 and does not come back.
    shutil.copy(source, workspace / "usb")
    rc = agent.proc.popen.wait(60)
    assert rc == 78
    assert "revoked" in agent.proc.stderr_tail()
    agent.stop()
    state = agent.config.parent / "revokee-state"
    assert (state / "revoked").exists()
    again = run_cli("agent", "run", "--config", str(agent.config), check=False)
    assert again.returncode == 78 and "was revoked" in again.stderr
    assert any(a["rule"] == "RevokedAgentError" for a in collector.cli_json("alerts", "list"))
