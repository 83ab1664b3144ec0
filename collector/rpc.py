"""The gRPC edge: decode -> application service -> encode, and one map from errors to status codes.

UploadBatch takes the raw request bytes (no generated deserializer), so a
malformed request is our INVALID_ARGUMENT, never a framework INTERNAL, and the
signature is checked over exactly the bytes that arrived.
"""

from __future__ import annotations

import datetime as dt
import hmac
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn, Protocol, cast

import grpc
from cryptography import x509
from google.protobuf.message import DecodeError

from collector import pki
from collector.enroll import Enrollment, EnrollRequest
from collector.errors import (
    ChainError,
    CollectorError,
    DecoderUnavailableError,
    EnrollmentError,
    IdentityMismatchError,
    IngestUnavailableError,
    MalformedBatchError,
    ReplayConflictError,
    RevokedAgentError,
    SequenceGapError,
    SignatureError,
    UnknownAgentError,
)
from collector.policy import Policy
from exfilwatch.v1 import collector_pb2

logger = logging.getLogger(__name__)

SERVICE = "exfilwatch.v1.Collector"
MAX_CPU_PERCENT = 100_000.0
"""A heartbeat's CPU figure is capped here: 1,000 cores' worth."""
_MAX_INT = 2**63 - 1
"""SQLite's largest integer: a heartbeat's counts are capped here."""

# Most specific first: the first matching class decides.
_STATUS: tuple[tuple[type[CollectorError], grpc.StatusCode], ...] = (
    (MalformedBatchError, grpc.StatusCode.INVALID_ARGUMENT),
    (UnknownAgentError, grpc.StatusCode.UNAUTHENTICATED),
    (RevokedAgentError, grpc.StatusCode.PERMISSION_DENIED),
    (SignatureError, grpc.StatusCode.UNAUTHENTICATED),
    (IdentityMismatchError, grpc.StatusCode.PERMISSION_DENIED),
    (ReplayConflictError, grpc.StatusCode.ALREADY_EXISTS),
    (SequenceGapError, grpc.StatusCode.FAILED_PRECONDITION),
    (ChainError, grpc.StatusCode.FAILED_PRECONDITION),
    (EnrollmentError, grpc.StatusCode.PERMISSION_DENIED),
    (DecoderUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (IngestUnavailableError, grpc.StatusCode.UNAVAILABLE),
)


def status_for(error: CollectorError) -> grpc.StatusCode:
    for cls, code in _STATUS:
        if isinstance(error, cls):
            return code
    return grpc.StatusCode.INTERNAL


@dataclass(frozen=True)
class Ack:
    agent_id: str
    batch_seq: int
    batch_digest: bytes
    duplicate: bool
    events_stored: int


@dataclass(frozen=True)
class Heartbeat:
    agent_id: str
    sent_at_ns: int
    agent_version: str
    policy_revision: str
    spool_depth: int
    coverage_gaps: int
    cpu_percent: float = 0.0
    """The agent's CPU over its last heartbeat interval, percent of one core."""
    rss_bytes: int = 0


@dataclass(frozen=True)
class HeartbeatReply:
    server_time_ns: int
    last_batch_seq: int
    last_batch_digest: bytes


_CERTIFICATE_CACHE = 65536
"""Most verified client certificates remembered (emptied when full)."""


@dataclass(frozen=True)
class _Certificate:
    """What `Authority.client_identity` proved of a certificate, and when it is valid."""

    agent_id: str
    serial: str
    not_before: dt.datetime
    not_after: dt.datetime


class Ingest(Protocol):
    def upload(self, raw: bytes, tls_agent_id: str | None, now_ns: int) -> Ack: ...

    def heartbeat(self, hb: Heartbeat, now_ns: int) -> HeartbeatReply: ...


POLICY_DOMAIN = b"exfilwatch.policy.v1\n"


def sign_policy(
    policy: Policy, authority: pki.Authority, now_ns: int
) -> collector_pb2.SignedPolicy:
    """Serialise the agents' view of `policy` once and sign those bytes."""
    body = collector_pb2.AgentPolicy(
        revision=policy.revision,
        issued_at_ns=now_ns,
        heartbeat_interval_s=policy.agents.heartbeat_ns // 1_000_000_000,
        refresh_interval_s=policy.agents.refresh_ns // 1_000_000_000,
        document=policy.document,
        hash_rate=policy.agents.hash_rate,
    ).SerializeToString()
    return collector_pb2.SignedPolicy(
        body=body,
        signature=authority.policy_key.sign(POLICY_DOMAIN + body),
        key_id=pki.key_id(authority.policy_public_raw),
    )


class Handlers:
    """The servicer. Enroll is served on the enrolment port; the others need mutual TLS."""

    def __init__(
        self,
        ingest: Ingest,
        enrollment: Enrollment,
        authority: pki.Authority,
        clock_ns: Callable[[], int],
        agent_port: Callable[[], int],
        *,
        policy: Policy | None = None,
    ) -> None:
        self._signed_policy = (
            sign_policy(policy, authority, clock_ns()) if policy is not None else None
        )
        self._ingest = ingest
        self._enrollment = enrollment
        self._certificates: dict[bytes, _Certificate] = {}
        """Client certificates that verified, by their PEM: an agent presents the same one
        on every call, and checking its issuer's signature cost more than the rest of a
        heartbeat. Validity is still checked on every call, revocation and renewal too."""
        self._authority = authority
        self._clock_ns = clock_ns
        self._agent_port = agent_port

    def _abort(self, context: grpc.ServicerContext, error: CollectorError) -> NoReturn:
        code = status_for(error)
        if code is grpc.StatusCode.INTERNAL:
            logger.error("internal error serving %s", context.peer(), exc_info=error)
            context.abort(code, "internal error")
        context.abort(code, str(error))
        raise AssertionError("unreachable")  # context.abort raises

    def _identity(self, context: grpc.ServicerContext) -> str | None:
        """The agent id of a verified, current client certificate, or None.

        Only the latest certificate issued to an agent counts: after a renewal or a
        revocation the previous one is refused although TLS still accepts it.
        """
        # grpc-stubs types the values as bytes; at run time they are lists of bytes.
        pems = cast("list[bytes] | None", context.auth_context().get("x509_pem_cert"))
        if not pems:
            return None
        now = dt.datetime.fromtimestamp(self._clock_ns() / 1e9, dt.UTC)
        pem = pems[0]
        known = self._certificates.get(pem)
        if known is not None and known.not_before <= now <= known.not_after:
            agent_id, serial = known.agent_id, known.serial
        else:
            try:
                agent_id, serial = self._authority.client_identity(pem, now)
            except EnrollmentError:
                return None
            if len(self._certificates) >= _CERTIFICATE_CACHE:
                self._certificates.clear()
            cert = x509.load_pem_x509_certificate(pem)
            self._certificates[pem] = _Certificate(
                agent_id, serial, cert.not_valid_before_utc, cert.not_valid_after_utc
            )
        current = self._enrollment.current_serial(agent_id)
        if current is None:
            # Unknown or revoked: let ingest say which (and raise the security alert).
            return agent_id
        return agent_id if hmac.compare_digest(current, serial) else None

    def enroll(
        self, request: collector_pb2.EnrollRequest, context: grpc.ServicerContext
    ) -> collector_pb2.EnrollResponse:
        req = EnrollRequest(
            token_id=request.token_id,
            token_secret=request.token_secret,
            signing_public_key=request.signing_public_key,
            csr_der=request.csr_der,
            hostname=request.hostname,
            agent_version=request.agent_version,
            proof=request.proof,
        )
        try:
            done = self._enrollment.enroll(req, self._clock_ns())
        except CollectorError as e:
            logger.warning("enrolment refused from %s: %s", context.peer(), e)
            self._abort(context, e)
        return collector_pb2.EnrollResponse(
            agent_id=done.agent_id,
            client_certificate_pem=done.client_cert_pem,
            ca_certificate_pem=done.ca_pem,
            agent_port=self._agent_port(),
            policy_public_key=self._authority.policy_public_raw,
        )

    def upload_batch(self, request: bytes, context: grpc.ServicerContext) -> collector_pb2.BatchAck:
        try:
            ack = self._ingest.upload(request, self._identity(context), self._clock_ns())
        except CollectorError as e:
            self._abort(context, e)
        return collector_pb2.BatchAck(
            agent_id=ack.agent_id,
            batch_seq=ack.batch_seq,
            batch_digest=ack.batch_digest,
            duplicate=ack.duplicate,
            events_stored=ack.events_stored,
        )

    def heartbeat(
        self, request: bytes, context: grpc.ServicerContext
    ) -> collector_pb2.HeartbeatResponse:
        agent_id = self._identity(context)
        if agent_id is None:
            self._abort(
                context, UnknownAgentError("heartbeat without an enrolled client certificate")
            )
        try:
            msg = collector_pb2.HeartbeatRequest.FromString(request)
        except DecodeError as e:
            self._abort(context, MalformedBatchError(f"malformed heartbeat: {e}"))
        if msg.agent_id and msg.agent_id != agent_id:
            self._abort(
                context, IdentityMismatchError("heartbeat agent id differs from TLS identity")
            )
        hb = Heartbeat(
            agent_id=agent_id,
            sent_at_ns=msg.sent_at_ns,
            agent_version=msg.agent_version[:64],
            policy_revision=msg.policy_revision[:128],
            # Reported, not trusted: a NaN, a negative or an absurd figure is shown as 0 or
            # capped, never stored as sent (SQLite's integers stop at 2**63 - 1).
            spool_depth=min(msg.spool_depth, _MAX_INT),
            coverage_gaps=min(msg.coverage_gaps, _MAX_INT),
            cpu_percent=min(msg.cpu_percent, MAX_CPU_PERCENT) if msg.cpu_percent >= 0 else 0.0,
            rss_bytes=min(msg.rss_bytes, _MAX_INT),
        )
        try:
            reply = self._ingest.heartbeat(hb, self._clock_ns())
        except CollectorError as e:
            self._abort(context, e)
        return collector_pb2.HeartbeatResponse(
            server_time_ns=reply.server_time_ns,
            last_batch_seq=reply.last_batch_seq,
            last_batch_digest=reply.last_batch_digest,
        )

    def renew_certificate(
        self, request: collector_pb2.RenewRequest, context: grpc.ServicerContext
    ) -> collector_pb2.RenewResponse:
        agent_id = self._identity(context)
        if agent_id is None:
            self._abort(context, UnknownAgentError("renewal without a current client certificate"))
        try:
            pem = self._enrollment.renew(agent_id, request.csr_der, self._clock_ns())
        except CollectorError as e:
            self._abort(context, e)
        return collector_pb2.RenewResponse(client_certificate_pem=pem)

    def get_policy(
        self, request: collector_pb2.PolicyRequest, context: grpc.ServicerContext
    ) -> collector_pb2.SignedPolicy:
        if self._identity(context) is None:
            self._abort(context, UnknownAgentError("policy request without a client certificate"))
        if self._signed_policy is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, "this collector serves no policy")
        return self._signed_policy

    def generic_handler(self) -> grpc.GenericRpcHandler:  # type: ignore[type-arg]
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Enroll": grpc.unary_unary_rpc_method_handler(
                    self.enroll,
                    request_deserializer=collector_pb2.EnrollRequest.FromString,
                    response_serializer=collector_pb2.EnrollResponse.SerializeToString,
                ),
                "UploadBatch": grpc.unary_unary_rpc_method_handler(
                    self.upload_batch,
                    response_serializer=collector_pb2.BatchAck.SerializeToString,
                ),
                "RenewCertificate": grpc.unary_unary_rpc_method_handler(
                    self.renew_certificate,
                    request_deserializer=collector_pb2.RenewRequest.FromString,
                    response_serializer=collector_pb2.RenewResponse.SerializeToString,
                ),
                "GetPolicy": grpc.unary_unary_rpc_method_handler(
                    self.get_policy,
                    request_deserializer=collector_pb2.PolicyRequest.FromString,
                    response_serializer=collector_pb2.SignedPolicy.SerializeToString,
                ),
                "Heartbeat": grpc.unary_unary_rpc_method_handler(
                    self.heartbeat,
                    response_serializer=collector_pb2.HeartbeatResponse.SerializeToString,
                ),
            },
        )
