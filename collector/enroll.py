"""Enrolment: token + proof of key possession in, agent id + client certificate out."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

from cryptography.hazmat.primitives import serialization

from collector import pki
from collector.errors import EnrollmentError, RevokedAgentError, UnknownAgentError
from collector.records import AgentRecord

logger = logging.getLogger(__name__)


class EnrollStore(Protocol):
    def consume_token(self, token_id: str, secret_hash: bytes, now_ns: int) -> bool: ...

    def get_agent(self, agent_id: str) -> AgentRecord | None: ...

    def touch_agent(
        self, agent_id: str, now_ns: int, *, cert_serial: str | None = None
    ) -> None: ...

    def add_agent(
        self,
        *,
        agent_id: str,
        public_key: bytes,
        key_id: bytes,
        hostname: str,
        agent_version: str,
        enrolled_at_ns: int,
        cert_serial: str,
    ) -> None: ...


@dataclass(frozen=True)
class EnrollRequest:
    token_id: str
    token_secret: str
    signing_public_key: bytes
    csr_der: bytes
    hostname: str
    agent_version: str
    proof: bytes


@dataclass(frozen=True)
class Enrolled:
    agent_id: str
    client_cert_pem: bytes
    ca_pem: bytes


class Enrollment:
    def __init__(self, store: EnrollStore, authority: pki.Authority) -> None:
        self._store = store
        self._authority = authority

    def enroll(self, req: EnrollRequest, now_ns: int) -> Enrolled:
        if len(req.signing_public_key) != 32:
            raise EnrollmentError("signing key must be a raw Ed25519 public key (32 bytes)")
        if not 0 < len(req.hostname) <= 255 or len(req.agent_version) > 64:
            raise EnrollmentError("hostname or agent version missing or too long")
        # Proof first: a token is only spent by someone holding the key it enrols.
        pki.verify_enroll_proof(req.signing_public_key, req.token_id, req.csr_der, req.proof)
        if not self._store.consume_token(req.token_id, pki.secret_hash(req.token_secret), now_ns):
            raise EnrollmentError("enrolment token unknown, expired or used up")
        agent_id = pki.agent_id_for(req.signing_public_key)
        cert = self._authority.issue_client_cert(req.csr_der, agent_id)
        self._store.add_agent(
            agent_id=agent_id,
            public_key=req.signing_public_key,
            key_id=pki.key_id(req.signing_public_key),
            hostname=req.hostname,
            agent_version=req.agent_version,
            enrolled_at_ns=now_ns,
            cert_serial=format(cert.serial_number, "x"),
        )
        logger.info("enrolled agent %s (host %r, token %s)", agent_id, req.hostname, req.token_id)
        return Enrolled(
            agent_id, cert.public_bytes(serialization.Encoding.PEM), self._authority.ca_pem
        )

    def current_serial(self, agent_id: str) -> str | None:
        """The serial of the one client certificate this agent may use now (None: refuse)."""
        agent = self._store.get_agent(agent_id)
        if agent is None or agent.revoked:
            return None
        return agent.cert_serial

    def renew(self, agent_id: str, csr_der: bytes, now_ns: int) -> bytes:
        """Issue a new client certificate; from now on only its serial is accepted."""
        agent = self._store.get_agent(agent_id)
        if agent is None:
            raise UnknownAgentError(f"agent {agent_id!r} is not enrolled")
        if agent.revoked:
            raise RevokedAgentError(f"agent {agent_id!r} is revoked")
        cert = self._authority.issue_client_cert(csr_der, agent_id)
        serial = format(cert.serial_number, "x")
        self._store.touch_agent(agent_id, now_ns, cert_serial=serial)
        logger.info("renewed client certificate of %s (serial %s)", agent_id, serial)
        return cert.public_bytes(serialization.Encoding.PEM)
