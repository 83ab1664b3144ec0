"""collector.verify: identity, key, signature over received bytes, then sequence and chain."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import pytest

from collector.errors import (
    ChainError,
    IdentityMismatchError,
    MalformedBatchError,
    RevokedAgentError,
    SequenceGapError,
    SignatureError,
    UnknownAgentError,
)
from collector.verify import GENESIS, ChainHead, classify_seq, future_skew_ns, verify_batch
from tests.collector.batches import (
    T0,
    BatchChain,
    Signed,
    envelope,
    make_body,
    make_event,
    new_agent,
)


@pytest.fixture
def agent():
    return new_agent()


@pytest.fixture
def chain(agent):
    return BatchChain(agent)


def head_of(signed: Signed) -> ChainHead:
    return ChainHead(signed.batch_seq, signed.digest)


def test_good_batch_verifies_and_decodes(agent, chain):
    signed = chain.next(n=3)
    batch = verify_batch(
        signed=signed.raw, tls_agent_id=agent.agent_id, agent=agent.key(), last=None
    )
    assert batch.agent_id == agent.agent_id
    assert (batch.batch_seq, batch.prev_digest) == (1, GENESIS)
    assert batch.digest == hashlib.sha256(signed.body).digest() == signed.digest
    assert (batch.body, batch.signature, batch.key_id) == signed.parts
    assert [e.event_id for e in batch.events] == [e.event_id for e in signed.events]
    assert all(e.agent_id == agent.agent_id and e.batch_seq == 1 for e in batch.events)


def test_parts_are_accepted_as_well_as_wire_bytes(agent, chain):
    first = chain.next()
    second = chain.next()
    batch = verify_batch(
        signed=second.parts, tls_agent_id=agent.agent_id, agent=agent.key(), last=head_of(first)
    )
    assert (batch.batch_seq, batch.prev_digest) == (2, first.digest)


def test_signature_by_another_key_is_refused(agent, chain):
    signed = chain.next()
    forged = new_agent().sign(signed.body)
    raw = envelope(signed.body, forged, agent.key_id)
    with pytest.raises(SignatureError, match="does not verify"):
        verify_batch(signed=raw, tls_agent_id=agent.agent_id, agent=agent.key(), last=None)


def test_key_id_of_another_key_is_refused_without_trying_it(agent):
    other = new_agent()
    body = make_body(agent.agent_id, 1, GENESIS, [make_event()])
    # Validly signed by `other`, naming `other`'s key: still not this agent's key.
    raw = envelope(body, other.sign(body), other.key_id)
    with pytest.raises(SignatureError, match="names key"):
        verify_batch(signed=raw, tls_agent_id=agent.agent_id, agent=agent.key(), last=None)


@pytest.mark.parametrize("where", [0, 0.5, -1])
def test_one_tampered_byte_in_the_body_is_refused(agent, chain, where):
    signed = chain.next()
    body = bytearray(signed.body)
    index = int(len(body) * where) if isinstance(where, float) else where
    body[index] ^= 0x01
    raw = envelope(bytes(body), signed.signature, signed.key_id)
    with pytest.raises(SignatureError):
        verify_batch(signed=raw, tls_agent_id=agent.agent_id, agent=agent.key(), last=None)


@pytest.mark.parametrize("signature", [b"", b"\x00" * 64, b"\x00" * 63])
def test_empty_or_wrong_length_signature_is_refused(agent, chain, signature):
    signed = chain.next()
    raw = envelope(signed.body, signature, signed.key_id)
    with pytest.raises(SignatureError):
        verify_batch(signed=raw, tls_agent_id=agent.agent_id, agent=agent.key(), last=None)


def test_signature_is_domain_separated(agent, chain):
    signed = chain.next()
    bare = agent.private_key.sign(signed.body)  # signed without the domain prefix
    with pytest.raises(SignatureError):
        verify_batch(
            signed=(signed.body, bare, agent.key_id),
            tls_agent_id=agent.agent_id,
            agent=agent.key(),
            last=None,
        )


@pytest.mark.parametrize("tls_agent_id", [None, ""])
def test_no_tls_identity_is_unknown_agent(agent, chain, tls_agent_id):
    with pytest.raises(UnknownAgentError, match="no agent identity"):
        verify_batch(
            signed=chain.next().raw, tls_agent_id=tls_agent_id, agent=agent.key(), last=None
        )


def test_unenrolled_agent_is_unknown(agent, chain):
    with pytest.raises(UnknownAgentError, match="not enrolled"):
        verify_batch(signed=chain.next().raw, tls_agent_id=agent.agent_id, agent=None, last=None)


def test_key_enrolled_for_another_agent_is_unknown(agent, chain):
    other = new_agent()
    with pytest.raises(UnknownAgentError, match="not enrolled"):
        verify_batch(
            signed=chain.next().raw, tls_agent_id=agent.agent_id, agent=other.key(), last=None
        )


def test_revoked_agent_is_refused(agent, chain):
    with pytest.raises(RevokedAgentError, match="revoked"):
        verify_batch(
            signed=chain.next().raw,
            tls_agent_id=agent.agent_id,
            agent=agent.key(revoked=True),
            last=None,
        )


def test_identity_is_checked_before_anything_is_parsed(agent):
    with pytest.raises(UnknownAgentError):
        verify_batch(signed=b"\xff garbage", tls_agent_id=agent.agent_id, agent=None, last=None)


def test_signature_is_checked_before_the_body_is_parsed(agent):
    with pytest.raises(SignatureError):
        verify_batch(
            signed=(b"\xff not a batch", b"\x00" * 64, agent.key_id),
            tls_agent_id=agent.agent_id,
            agent=agent.key(),
            last=None,
        )


def test_garbage_envelope_of_a_known_agent_is_malformed(agent):
    with pytest.raises(MalformedBatchError):
        verify_batch(signed=b"\xff\xff", tls_agent_id=agent.agent_id, agent=agent.key(), last=None)


def test_validly_signed_garbage_body_is_malformed(agent):
    body = b"\xff\xff not protobuf"
    with pytest.raises(MalformedBatchError):
        verify_batch(
            signed=(body, agent.sign(body), agent.key_id),
            tls_agent_id=agent.agent_id,
            agent=agent.key(),
            last=None,
        )


def test_body_naming_another_agent_is_identity_mismatch(agent):
    """An agent signs a batch naming another agent: its own key verifies, the claim fails."""
    victim = new_agent()
    body = make_body(victim.agent_id, 1, GENESIS, [make_event()])
    with pytest.raises(IdentityMismatchError):
        verify_batch(
            signed=(body, agent.sign(body), agent.key_id),
            tls_agent_id=agent.agent_id,
            agent=agent.key(),
            last=None,
        )


def test_gap_is_refused(agent, chain):
    first = chain.next()
    chain.next()  # batch 2 never arrives
    third = chain.next()
    with pytest.raises(SequenceGapError, match="expected 2"):
        verify_batch(
            signed=third.raw, tls_agent_id=agent.agent_id, agent=agent.key(), last=head_of(first)
        )


def test_first_batch_must_be_seq_one(agent, chain):
    chain.next()
    with pytest.raises(SequenceGapError, match="expected 1"):
        verify_batch(
            signed=chain.next().raw, tls_agent_id=agent.agent_id, agent=agent.key(), last=None
        )


def test_broken_chain_is_refused(agent, chain):
    first = chain.next()
    chain.prev_digest = b"\x42" * 32  # batch 2 names a digest that is not batch 1's
    second = chain.next()
    with pytest.raises(ChainError, match="does not match"):
        verify_batch(
            signed=second.raw, tls_agent_id=agent.agent_id, agent=agent.key(), last=head_of(first)
        )


def test_first_batch_must_name_genesis(agent):
    chain = BatchChain(agent, prev_digest=b"\x01" * 32)
    with pytest.raises(ChainError):
        verify_batch(
            signed=chain.next().raw, tls_agent_id=agent.agent_id, agent=agent.key(), last=None
        )


def test_replay_is_returned_for_the_store_to_decide(agent, chain):
    first = chain.next()
    second = chain.next()
    batch = verify_batch(
        signed=first.raw, tls_agent_id=agent.agent_id, agent=agent.key(), last=head_of(second)
    )
    assert batch.batch_seq == 1 and batch.digest == first.digest


def test_classify_seq():
    head = ChainHead(5, b"\x05" * 32)
    assert classify_seq(1, GENESIS, None) == "next"
    assert classify_seq(6, b"\x05" * 32, head) == "next"
    assert classify_seq(5, b"anything", head) == "replay"
    assert classify_seq(1, GENESIS, head) == "replay"
    with pytest.raises(SequenceGapError):
        classify_seq(7, b"\x05" * 32, head)
    with pytest.raises(SequenceGapError):
        classify_seq(2, GENESIS, None)
    with pytest.raises(ChainError):
        classify_seq(6, b"\x06" * 32, head)
    with pytest.raises(ChainError):
        classify_seq(1, b"\x05" * 32, None)


def test_unusable_enrolled_key_fails_closed(agent, chain):
    broken = replace(agent.key(), public_key_raw=b"short")
    with pytest.raises(SignatureError, match="unusable"):
        verify_batch(signed=chain.next().raw, tls_agent_id=agent.agent_id, agent=broken, last=None)


def test_future_skew_is_the_latest_timestamp_past_now(agent, chain):
    events = chain.events(2)
    events[0].observed_at_ns, events[1].observed_at_ns = T0 - 5, T0 + 50
    body = make_body(agent.agent_id, 1, GENESIS, events, sealed_at_ns=T0 + 20)
    signed = chain.seal(body, events)
    batch = verify_batch(
        signed=signed.raw, tls_agent_id=agent.agent_id, agent=agent.key(), last=None
    )
    assert future_skew_ns(batch, T0) == 50
    assert future_skew_ns(batch, T0 + 100) == -50
    assert future_skew_ns(replace(batch, events=()), T0) == 20  # the seal alone
