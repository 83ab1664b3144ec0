"""The collector's trust material: CA, server certificate, agent client certificates, tokens.

`init` creates it once under the data directory; enrolment issues short-lived
ECDSA P-256 client certificates (gRPC's TLS refuses Ed25519 certificates).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import secrets
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from collector.errors import ConfigError, EnrollmentError

CA_KEY = "ca.key"
CA_CERT = "ca.crt"
SERVER_KEY = "server.key"
SERVER_CERT = "server.crt"
POLICY_KEY = "policy-signing.key"
TOKEN_PREFIX = "exfw1"  # noqa: S105 (a format tag, not a secret)
CLIENT_CERT_DAYS = 30


@dataclass(frozen=True)
class Token:
    """An enrolment token: `exfw1.<id>.<secret>.<sha256 of the CA certificate, hex>`."""

    token_id: str
    secret: str
    ca_fingerprint: str

    def __str__(self) -> str:
        return f"{TOKEN_PREFIX}.{self.token_id}.{self.secret}.{self.ca_fingerprint}"


def secret_hash(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def new_token(ca_fingerprint: str) -> Token:
    return Token(secrets.token_hex(6), secrets.token_urlsafe(24), ca_fingerprint)


def fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def key_id(public_key_raw: bytes) -> bytes:
    """The id of an agent's signing key: SHA-256 of the raw public key."""
    return hashlib.sha256(public_key_raw).digest()


def agent_id_for(public_key_raw: bytes) -> str:
    """An agent's id is derived from its signing key, so it cannot be chosen."""
    return "ag-" + hashlib.sha256(public_key_raw).hexdigest()[:24]


def write_private(path: Path, data: bytes) -> None:
    """Write a secret file 0600, atomically, never readable by others even briefly."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _pem_key(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "exfilwatch"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def init_pki(data: Path, hostnames: Sequence[str] = ()) -> str:
    """Create CA, server certificate and policy key in `data`; returns the CA fingerprint."""
    data.mkdir(parents=True, exist_ok=True)
    os.chmod(data, 0o700)
    if (data / CA_KEY).exists():
        raise ConfigError(f"{data} is already initialised (found {CA_KEY})")
    now = _now()
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("exfilwatch collector CA"))
        .issuer_name(_name("exfilwatch collector CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    names: list[x509.GeneralName] = []
    for host in ["localhost", socket.gethostname(), *hostnames]:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    names += [
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    unique = list(dict.fromkeys(names))
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("exfilwatch collector"))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=825))
        .add_extension(x509.SubjectAlternativeName(unique), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    write_private(data / CA_KEY, _pem_key(ca_key))
    write_private(data / SERVER_KEY, _pem_key(server_key))
    write_private(data / POLICY_KEY, _pem_key(ed25519.Ed25519PrivateKey.generate()))
    (data / CA_CERT).write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    (data / SERVER_CERT).write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    return fingerprint(ca_cert)


@dataclass(frozen=True)
class Authority:
    """The loaded CA: issues and checks agent client certificates."""

    ca_cert: x509.Certificate
    ca_key: ec.EllipticCurvePrivateKey
    ca_pem: bytes
    server_key_pem: bytes
    server_chain_pem: bytes
    """Server certificate followed by the CA certificate, so agents can pin the CA."""
    policy_key: ed25519.Ed25519PrivateKey
    """Signs the policy served to agents; its public half is handed out at enrolment."""

    @property
    def policy_public_raw(self) -> bytes:
        return self.policy_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.ca_cert)

    @classmethod
    def load(cls, data: Path) -> Authority:
        try:
            ca_pem = (data / CA_CERT).read_bytes()
            key = serialization.load_pem_private_key((data / CA_KEY).read_bytes(), None)
            server_key_pem = (data / SERVER_KEY).read_bytes()
            server_pem = (data / SERVER_CERT).read_bytes()
            policy_key = serialization.load_pem_private_key((data / POLICY_KEY).read_bytes(), None)
        except FileNotFoundError as e:
            raise ConfigError(
                f"{data} is not an initialised collector data directory ({e.filename} missing); "
                f"run: exfilwatch-collector init --data {data}"
            ) from e
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"{data / CA_KEY}: not an ECDSA key")
        if not isinstance(policy_key, ed25519.Ed25519PrivateKey):
            raise ConfigError(f"{data / POLICY_KEY}: not an Ed25519 key")
        return cls(
            x509.load_pem_x509_certificate(ca_pem),
            key,
            ca_pem,
            server_key_pem,
            server_pem + ca_pem,
            policy_key,
        )

    def issue_client_cert(self, csr_der: bytes, agent_id: str) -> x509.Certificate:
        """Issue a short-lived client certificate for `agent_id` from the agent's CSR."""
        try:
            csr = x509.load_der_x509_csr(csr_der)
        except ValueError as e:
            raise EnrollmentError("certificate request is not valid DER") from e
        if not csr.is_signature_valid:
            raise EnrollmentError("certificate request signature does not verify")
        pub = csr.public_key()
        if not (isinstance(pub, ec.EllipticCurvePublicKey) and pub.curve.name == "secp256r1"):
            raise EnrollmentError("certificate request must carry an ECDSA P-256 key")
        now = _now()
        return (
            x509.CertificateBuilder()
            .subject_name(_name(agent_id))
            .issuer_name(self.ca_cert.subject)
            .public_key(pub)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=CLIENT_CERT_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(self.ca_key, hashes.SHA256())
        )

    def client_identity(self, cert_pem: bytes, now: dt.datetime) -> tuple[str, str]:
        """Check a TLS peer certificate ourselves (issuer, validity); return (agent id, serial).

        gRPC only *requests* client certificates (Enroll runs without one), so the
        chain is verified here rather than trusted because the handshake succeeded.
        """
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
            cert.verify_directly_issued_by(self.ca_cert)
        except (ValueError, TypeError, InvalidSignature) as e:
            raise EnrollmentError("client certificate not issued by this collector") from e
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise EnrollmentError("client certificate expired or not yet valid")
        cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if len(cns) != 1:
            raise EnrollmentError("client certificate has no single common name")
        return str(cns[0].value), format(cert.serial_number, "x")


def verify_enroll_proof(public_key_raw: bytes, token_id: str, csr_der: bytes, proof: bytes) -> None:
    """Check that the enrolling agent holds the Ed25519 key it asks us to trust."""
    try:
        key = ed25519.Ed25519PublicKey.from_public_bytes(public_key_raw)
        key.verify(proof, b"exfilwatch.enroll.v1\n" + token_id.encode() + b"\n" + csr_der)
    except (ValueError, InvalidSignature) as e:
        raise EnrollmentError("proof of key possession does not verify") from e
