"""10,000 malformed or random UploadBatch requests against the real server over mutual TLS.

Each must get a clean INVALID_ARGUMENT, UNAUTHENTICATED or PERMISSION_DENIED, the server
must keep serving, and nothing may be stored. Uploads are decoded in a worker process, as
`serve` does by default on more than one CPU (collector.decoding).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import codec
from agent.enroll import enroll
from agent.identity import SIGNING_KEY
from agent.signer import GENESIS_DIGEST, Signer
from exfilwatch.v1 import collector_pb2, events_pb2
from tests.conftest import InProcessCollector

ALLOWED = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
}


class Raw:
    """An mTLS channel that sends UploadBatch request bytes exactly as given."""

    def __init__(self, target: str, tls: tuple[bytes, bytes, bytes]) -> None:
        self.channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(*tls))
        self.upload = self.channel.unary_unary(
            "/exfilwatch.v1.Collector/UploadBatch",
            request_serializer=None,
            response_deserializer=collector_pb2.BatchAck.FromString,
        )


@pytest.fixture
def raw_client(
    inproc_collector: InProcessCollector, tmp_path: Path
) -> Iterator[tuple[Raw, Signer, str]]:
    identity = enroll(
        inproc_collector.enroll_address, inproc_collector.token(), tmp_path / "s", "fuzz"
    )
    client = Raw(identity.target, identity.tls_material())
    yield client, Signer.load(tmp_path / "s" / SIGNING_KEY), identity.agent_id
    client.channel.close()


def _signed(body: bytes, signature: bytes, key_id: bytes) -> bytes:
    return events_pb2.SignedBatch(body=body, signature=signature, key_id=key_id).SerializeToString()


def requests(signer: Signer, agent_id: str) -> st.SearchStrategy[bytes]:
    good_body = codec.encode_batch(agent_id, 1, GENESIS_DIGEST, 1, [])
    good = _signed(good_body, signer.sign_batch(good_body), signer.key_id())

    def flip(data: bytes, index: int, bit: int) -> bytes:
        if not data:
            return data
        b = bytearray(data)
        b[index % len(b)] ^= 1 << bit
        return bytes(b)

    return st.one_of(
        st.binary(max_size=2048),  # random bytes
        st.builds(  # a SignedBatch with random parts
            _signed, st.binary(max_size=512), st.binary(max_size=80), st.binary(max_size=40)
        ),
        st.builds(  # right key id, random signature and body
            lambda body, sig: _signed(body, sig, signer.key_id()),
            st.binary(max_size=512),
            st.binary(min_size=64, max_size=64),
        ),
        st.builds(  # validly signed garbage body
            lambda body: _signed(body, signer.sign_batch(body), signer.key_id()),
            st.binary(max_size=512),
        ),
        st.builds(  # a good request with one bit flipped
            flip, st.just(good), st.integers(min_value=0), st.integers(min_value=0, max_value=7)
        ),
        st.builds(  # a good request cut short, or with junk appended
            lambda n, tail: good[:n] + tail,
            st.integers(min_value=0, max_value=len(good) - 1),
            st.binary(max_size=16),
        ),
    )


@pytest.mark.slow
@pytest.mark.parametrize("inproc_collector", [1], indirect=True, ids=["ingest-process"])
def test_fuzzed_uploads_are_refused_cleanly(
    inproc_collector: InProcessCollector, raw_client: tuple[Raw, Signer, str]
) -> None:
    client, signer, agent_id = raw_client
    seen: dict[grpc.StatusCode, int] = {}
    accepted: list[bytes] = []
    good_body = codec.encode_batch(agent_id, 1, GENESIS_DIGEST, 1, [])

    @settings(
        max_examples=10_000,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(requests(signer, agent_id))
    def one(request: bytes) -> None:
        try:
            client.upload(request, timeout=10)
        except grpc.RpcError as e:
            code = e.code()
            assert code in ALLOWED, (code, e.details(), request[:64])
            seen[code] = seen.get(code, 0) + 1
            return
        # Junk appended to the envelope can parse as unknown fields around the genuine,
        # signed parts: only that honest batch may ever be accepted.
        parsed = events_pb2.SignedBatch.FromString(request)
        assert (parsed.body, parsed.signature, parsed.key_id) == (
            good_body,
            signer.sign_batch(good_body),
            signer.key_id(),
        )
        accepted.append(request)

    one()
    assert sum(seen.values()) >= 9_000, seen
    assert inproc_collector.store.count_events() == 0
    # The server still serves: the honest first batch is accepted (again, if a fuzzed
    # envelope around it already was), and nothing else is in the chain.
    ack = client.upload(_signed(good_body, signer.sign_batch(good_body), signer.key_id()))
    assert (ack.batch_seq, ack.duplicate) == (1, bool(accepted))
    head = inproc_collector.store.chain_head(agent_id)
    assert head is not None and head.batch_seq == 1
