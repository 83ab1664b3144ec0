"""CA, server certificate, client certificates and enrolment proofs."""

from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from collector import pki
from collector.errors import ConfigError, EnrollmentError


@pytest.fixture
def authority(tmp_path: Path) -> pki.Authority:
    pki.init_pki(tmp_path / "data", ["collector.corp"])
    return pki.Authority.load(tmp_path / "data")


def _csr(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.DER)


def test_init_writes_private_files_0600_and_refuses_twice(tmp_path: Path) -> None:
    data = tmp_path / "data"
    fp = pki.init_pki(data)
    for name in (pki.CA_KEY, pki.SERVER_KEY, pki.POLICY_KEY):
        assert stat.S_IMODE((data / name).stat().st_mode) == 0o600, name
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert pki.Authority.load(data).fingerprint == fp
    with pytest.raises(ConfigError, match="already initialised"):
        pki.init_pki(data)


def test_load_of_uninitialised_dir_says_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="exfilwatch-collector init --data"):
        pki.Authority.load(tmp_path)


def test_server_certificate_names_and_chain(authority: pki.Authority) -> None:
    certs = x509.load_pem_x509_certificates(authority.server_chain_pem)
    assert len(certs) == 2 and certs[1] == authority.ca_cert
    san = certs[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "collector.corp"} <= set(san.get_values_for_type(x509.DNSName))
    certs[0].verify_directly_issued_by(authority.ca_cert)


def test_client_certificate_round_trip(authority: pki.Authority) -> None:
    cert = authority.issue_client_cert(_csr(ec.generate_private_key(ec.SECP256R1())), "ag-1")
    pem = cert.public_bytes(serialization.Encoding.PEM)
    now = dt.datetime.now(dt.UTC)
    agent_id, serial = authority.client_identity(pem, now)
    assert agent_id == "ag-1" and serial == format(cert.serial_number, "x")
    with pytest.raises(EnrollmentError, match="expired"):
        authority.client_identity(pem, now + dt.timedelta(days=pki.CLIENT_CERT_DAYS + 1))


def test_client_certificate_from_another_ca_is_refused(
    authority: pki.Authority, tmp_path: Path
) -> None:
    pki.init_pki(tmp_path / "other")
    other = pki.Authority.load(tmp_path / "other")
    cert = other.issue_client_cert(_csr(ec.generate_private_key(ec.SECP256R1())), "ag-1")
    with pytest.raises(EnrollmentError, match="not issued by this collector"):
        authority.client_identity(
            cert.public_bytes(serialization.Encoding.PEM), dt.datetime.now(dt.UTC)
        )


def test_csr_must_be_p256_and_valid(authority: pki.Authority) -> None:
    with pytest.raises(EnrollmentError, match="P-256"):
        authority.issue_client_cert(_csr(ec.generate_private_key(ec.SECP384R1())), "ag-1")
    with pytest.raises(EnrollmentError, match="P-256"):
        authority.issue_client_cert(_csr(ed25519.Ed25519PrivateKey.generate()), "ag-1")
    with pytest.raises(EnrollmentError, match="DER"):
        authority.issue_client_cert(b"garbage", "ag-1")


def test_enroll_proof_binds_token_and_csr() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    proof = key.sign(b"exfilwatch.enroll.v1\ntok\ncsr")
    pki.verify_enroll_proof(raw, "tok", b"csr", proof)
    with pytest.raises(EnrollmentError):
        pki.verify_enroll_proof(raw, "other", b"csr", proof)
    with pytest.raises(EnrollmentError):
        pki.verify_enroll_proof(raw, "tok", b"csr2", proof)
    with pytest.raises(EnrollmentError):
        pki.verify_enroll_proof(b"short", "tok", b"csr", proof)


def test_agent_id_is_derived_from_the_key() -> None:
    assert pki.agent_id_for(b"k" * 32) == pki.agent_id_for(b"k" * 32)
    assert pki.agent_id_for(b"k" * 32) != pki.agent_id_for(b"j" * 32)
    assert pki.agent_id_for(b"k" * 32).startswith("ag-")


def test_token_string_carries_the_ca_fingerprint() -> None:
    token = pki.new_token("ab" * 32)
    parts = str(token).split(".")
    assert parts[0] == "exfw1" and parts[3] == "ab" * 32
    assert pki.new_token("ab" * 32).secret != token.secret
