"""Trust gate of the collector: rpc -> **verify** -> store.

Checks identity, key and Ed25519 signature over the received bytes, and only then
parses the body and checks its sequence number and hash chain. Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from collector.codec import decode_batch_body, decode_signed_batch
from collector.errors import (
    ChainError,
    RevokedAgentError,
    SequenceGapError,
    SignatureError,
    UnknownAgentError,
)
from collector.models import AgentId, VerifiedBatch

DOMAIN = b"exfilwatch.batch.v1\n"
"""Prefix of every signed batch message, so a batch signature means nothing elsewhere."""
GENESIS = bytes(32)
"""prev_batch_digest of an agent's first batch (batch_seq 1)."""


@dataclass(frozen=True)
class AgentKey:
    """The signing key the collector enrolled for one agent."""

    agent_id: AgentId
    public_key_raw: bytes
    """Raw 32-byte Ed25519 public key."""
    key_id: bytes
    """SHA-256 of `public_key_raw`."""
    revoked: bool


@dataclass(frozen=True)
class ChainHead:
    """The last batch stored for an agent."""

    batch_seq: int
    digest: bytes


def classify_seq(
    batch_seq: int, prev_digest: bytes, head: ChainHead | None
) -> Literal["next", "replay"]:
    """Place a batch against the agent's chain head.

    "next" extends the chain; "replay" reuses a stored batch_seq (the store compares
    digests). Raises SequenceGapError when batch_seq skips ahead and ChainError when
    the next batch does not name the head's digest (GENESIS before the first batch).
    """
    expected = 1 if head is None else head.batch_seq + 1
    if batch_seq < expected:
        return "replay"
    if batch_seq > expected:
        raise SequenceGapError(f"batch_seq {batch_seq} skips ahead: expected {expected}")
    want = GENESIS if head is None else head.digest
    if not hmac.compare_digest(prev_digest, want):
        raise ChainError(
            f"batch {batch_seq}: prev_batch_digest {prev_digest.hex()[:16]}..."
            f" does not match the stored chain head {want.hex()[:16]}..."
        )
    return "next"


def verify_batch(
    *,
    signed: bytes | tuple[bytes, bytes, bytes],
    tls_agent_id: str | None,
    agent: AgentKey | None,
    last: ChainHead | None,
) -> VerifiedBatch:
    """Verify one uploaded batch, failing closed; return it parsed.

    `signed` is a serialised SignedBatch or its (body, signature, key_id). `agent` is
    the key enrolled for `tls_agent_id` (None when there is none) and `last` its chain
    head. Replays (batch_seq already stored) come back verified: the store decides
    between a duplicate acknowledgement and ReplayConflictError.
    """
    if not tls_agent_id:
        raise UnknownAgentError("the connection carries no agent identity")
    if agent is None or agent.agent_id != tls_agent_id:
        raise UnknownAgentError(f"agent {tls_agent_id!r} is not enrolled")
    if agent.revoked:
        raise RevokedAgentError(f"agent {tls_agent_id!r} is revoked")
    body, signature, key_id = decode_signed_batch(signed) if isinstance(signed, bytes) else signed
    # Never look for another key: a key_id hint that is not this agent's key is a rejection.
    if not hmac.compare_digest(key_id, agent.key_id):
        raise SignatureError(
            f"batch names key {key_id.hex()[:16]!r}, agent {tls_agent_id!r}"
            f" is enrolled with key {agent.key_id.hex()[:16]!r}"
        )
    try:
        public_key = Ed25519PublicKey.from_public_bytes(agent.public_key_raw)
        public_key.verify(signature, DOMAIN + body)
    except InvalidSignature as e:
        raise SignatureError(f"batch signature does not verify for agent {tls_agent_id!r}") from e
    except ValueError as e:
        raise SignatureError(f"enrolled key of agent {tls_agent_id!r} is unusable: {e}") from e
    agent_id = AgentId(tls_agent_id)
    batch_seq, prev_digest, sealed_at_ns, events = decode_batch_body(body, agent_id=agent_id)
    classify_seq(batch_seq, prev_digest, last)
    return VerifiedBatch(
        agent_id=agent_id,
        batch_seq=batch_seq,
        digest=hashlib.sha256(body).digest(),
        prev_digest=prev_digest,
        sealed_at_ns=sealed_at_ns,
        body=body,
        signature=signature,
        key_id=key_id,
        events=events,
    )


def future_skew_ns(batch: VerifiedBatch, now_ns: int) -> int:
    """How far the batch's latest timestamp (sealed_at, or an event's observed_at) lies
    after `now_ns`, the collector's clock at receipt; zero or less when none is ahead.

    A batch dated in the future is still genuine (signed, chained): the agent's clock runs
    ahead, by mistake or on purpose. The caller stores it and decides how much is implausible.
    """
    latest = batch.sealed_at_ns
    for event in batch.events:
        if event.observed_at_ns > latest:
            latest = event.observed_at_ns
    return latest - now_ns
