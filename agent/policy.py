"""The policy the agent runs by: pulled from the collector, verified, last good kept.

A SignedPolicy is accepted only if its signature verifies with the policy key
received at enrolment; anything else is refused, counted, and the last good
policy stays in force (also across restarts: it is kept in the state directory).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from google.protobuf.message import DecodeError

from agent.errors import AgentError
from exfilwatch.v1 import collector_pb2

logger = logging.getLogger(__name__)

POLICY_DOMAIN = b"exfilwatch.policy.v1\n"
POLICY_KEY_FILE = "policy.pub"
POLICY_FILE = "policy.signed"


class PolicyError(AgentError):
    """A policy that does not verify or does not parse."""


@dataclass(frozen=True)
class RunningPolicy:
    revision: str
    issued_at_ns: int
    heartbeat_s: float
    refresh_s: float
    document: bytes
    hash_rate: int = 0
    """Bytes/s the fleet's hashing stays under (0: the agent's own hashing.max_rate only)."""


def verify_policy(signed: bytes, public_key_raw: bytes) -> RunningPolicy:
    """Check the signature over the received body bytes, then parse them."""
    try:
        envelope = collector_pb2.SignedPolicy.FromString(signed)
        key = Ed25519PublicKey.from_public_bytes(public_key_raw)
    except (DecodeError, ValueError) as e:
        raise PolicyError(f"policy envelope or key unreadable: {e}") from e
    if envelope.key_id != hashlib.sha256(public_key_raw).digest():
        raise PolicyError("policy signed with a key other than the one pinned at enrolment")
    try:
        key.verify(envelope.signature, POLICY_DOMAIN + envelope.body)
    except InvalidSignature as e:
        raise PolicyError("policy signature does not verify") from e
    try:
        body = collector_pb2.AgentPolicy.FromString(envelope.body)
    except DecodeError as e:
        raise PolicyError(f"signed policy does not parse: {e}") from e
    if not body.revision or body.heartbeat_interval_s == 0 or body.refresh_interval_s == 0:
        raise PolicyError("signed policy lacks a revision or its intervals")
    return RunningPolicy(
        body.revision,
        body.issued_at_ns,
        float(body.heartbeat_interval_s),
        float(body.refresh_interval_s),
        body.document,
        body.hash_rate,
    )


class PolicyKeeper:
    """Holds the current policy; `offer` a newly fetched one. Thread-safe by replacement."""

    def __init__(self, state_dir: Path) -> None:
        self._state = state_dir
        self.current: RunningPolicy | None = None
        self.rejected = 0
        try:
            self._key = (state_dir / POLICY_KEY_FILE).read_bytes()
        except FileNotFoundError:
            self._key = b""
            logger.warning("no policy key in %s: enrolled before signed policies", state_dir)
            return
        try:
            self.current = verify_policy((state_dir / POLICY_FILE).read_bytes(), self._key)
        except FileNotFoundError:
            pass
        except PolicyError as e:
            logger.error("stored policy does not verify (%s); waiting for a good one", e)

    @property
    def revision(self) -> str:
        return self.current.revision if self.current else ""

    def offer(self, signed: bytes) -> bool:
        """Adopt `signed` if it verifies; keep the last good policy otherwise."""
        try:
            policy = verify_policy(signed, self._key)
        except PolicyError as e:
            self.rejected += 1
            logger.error("refused policy from the collector: %s; keeping %r", e, self.revision)
            return False
        if self.current is not None and policy.issued_at_ns < self.current.issued_at_ns:
            self.rejected += 1
            logger.error("refused policy %r: older than the one in force", policy.revision)
            return False
        if self.current is None or policy.revision != self.current.revision:
            logger.info("policy %r in force", policy.revision)
        tmp = self._state / (POLICY_FILE + ".tmp")
        tmp.write_bytes(signed)
        os.replace(tmp, self._state / POLICY_FILE)
        self.current = policy
        return True
