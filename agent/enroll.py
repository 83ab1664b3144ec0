"""Enrolment, agent side: pin the collector CA from the token, prove key possession, store identity.

gRPC needs trusted roots before it can talk, so the CA is first read from the
TLS chain the collector presents (no trust yet) and accepted only if its
SHA-256 equals the fingerprint in the token, as `kubeadm join` does.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent import __version__
from agent.errors import EnrollError
from agent.identity import (
    CA_CERT,
    REVOKED,
    SIGNING_KEY,
    SPOOL,
    TLS_CERT,
    TLS_KEY,
    Identity,
    write_private,
)
from agent.policy import POLICY_KEY_FILE
from agent.signer import Signer
from exfilwatch.v1 import collector_pb2, collector_pb2_grpc

logger = logging.getLogger(__name__)

TOKEN_PREFIX = "exfw1"  # noqa: S105 (a format tag, not a secret)


@dataclass(frozen=True)
class Token:
    token_id: str
    secret: str
    ca_fingerprint: str


def parse_token(text: str) -> Token:
    parts = text.strip().split(".")
    if len(parts) != 4 or parts[0] != TOKEN_PREFIX or len(parts[3]) != 64:
        raise EnrollError("not an exfilwatch enrolment token (expected exfw1.ID.SECRET.CAHASH)")
    try:
        bytes.fromhex(parts[3])
    except ValueError as e:
        raise EnrollError("enrolment token: CA fingerprint is not hex") from e
    return Token(parts[1], parts[2], parts[3].lower())


def split_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise EnrollError(f"--collector: expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def fetch_pinned_ca(host: str, port: int, fingerprint: str, timeout: float = 10.0) -> bytes:
    """Return the PEM of the CA certificate in the collector's TLS chain matching `fingerprint`."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # nothing is trusted yet: the fingerprint decides below
    ctx.set_alpn_protocols(["h2"])
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            ctx.wrap_socket(raw, server_hostname=host) as tls,
        ):
            # Public as SSLSocket.get_unverified_chain() from Python 3.13.
            chain = tls._sslobj.get_unverified_chain() or []  # type: ignore[attr-defined]
            ders = [c.public_bytes(ssl._ssl.ENCODING_DER) for c in chain]  # type: ignore[attr-defined]
    except OSError as e:
        raise EnrollError(f"cannot reach collector at {host}:{port}: {e}") from e
    for der in ders:
        if hashlib.sha256(der).hexdigest() == fingerprint:
            return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)
    raise EnrollError(
        f"collector at {host}:{port} does not present the CA named in the token "
        "(wrong address, or someone in between): refusing to enrol"
    )


def enroll(collector: str, token_text: str, state_dir: Path, hostname: str) -> Identity:
    """Enrol with the collector's enrolment port and write the identity into `state_dir`."""
    token = parse_token(token_text)
    host, port = split_hostport(collector)
    state_dir.mkdir(parents=True, exist_ok=True)
    state_dir.chmod(0o700)
    ca_pem = fetch_pinned_ca(host, port, token.ca_fingerprint)

    signer_path = state_dir / SIGNING_KEY
    if (state_dir / REVOKED).exists():
        # A revoked identity is never reused: set its key and undeliverable spool aside.
        for name in (SIGNING_KEY, SPOOL):
            if (state_dir / name).exists():
                os.replace(state_dir / name, state_dir / f"{name}.revoked")
        (state_dir / REVOKED).unlink()
    if signer_path.exists():
        signer = Signer.load(signer_path)
    else:
        signer = Signer.generate()
        signer.save(signer_path)
    tls_key_pem, csr_der = new_tls_key_and_csr(hostname)
    request = collector_pb2.EnrollRequest(
        token_id=token.token_id,
        token_secret=token.secret,
        signing_public_key=signer.public_key_raw(),
        csr_der=csr_der,
        hostname=hostname,
        agent_version=__version__,
        proof=signer.sign_enroll_proof(token.token_id, csr_der),
    )
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    with grpc.secure_channel(target, grpc.ssl_channel_credentials(ca_pem)) as channel:
        try:
            reply = collector_pb2_grpc.CollectorStub(channel).Enroll(request, timeout=15)
        except grpc.RpcError as e:
            raise EnrollError(f"enrolment refused: {e.code().name}: {e.details()}") from e
    if reply.ca_certificate_pem.strip() != ca_pem.strip():
        raise EnrollError("collector returned a different CA than the one pinned")
    write_private(state_dir / TLS_KEY, tls_key_pem)
    (state_dir / TLS_CERT).write_bytes(reply.client_certificate_pem)
    (state_dir / CA_CERT).write_bytes(ca_pem)
    if len(reply.policy_public_key) != 32:
        raise EnrollError("collector sent no policy key: it is older than this agent")
    (state_dir / POLICY_KEY_FILE).write_bytes(reply.policy_public_key)
    identity = Identity(reply.agent_id, host, reply.agent_port, state_dir)
    identity.save()
    logger.info("enrolled as %s with %s", reply.agent_id, collector)
    return identity


def new_tls_key_and_csr(name: str) -> tuple[bytes, bytes]:
    """A fresh ECDSA P-256 key (PEM) and a certificate request for it (DER)."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, name)]))
        .sign(key, hashes.SHA256())
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return pem, csr.public_bytes(serialization.Encoding.DER)


def certificate_expiry(cert_pem: bytes) -> float:
    """Unix time at which a PEM certificate stops being valid."""
    return x509.load_pem_x509_certificate(cert_pem).not_valid_after_utc.timestamp()
