"""agent.signer: key files, key id and domain-separated Ed25519 signatures."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from agent.errors import StateError
from agent.signer import (
    BATCH_DOMAIN,
    ENROLL_DOMAIN,
    GENESIS_DIGEST,
    Signer,
    batch_digest,
)

BODY = b"\x0a\x07agent-1\x10\x01 a serialised EventBatch"


def public_key(signer: Signer) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(signer.public_key_raw())


def write_private(path: Path, data: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


def test_domain_constants() -> None:
    assert BATCH_DOMAIN == b"exfilwatch.batch.v1\n"
    assert ENROLL_DOMAIN == b"exfilwatch.enroll.v1\n"
    assert GENESIS_DIGEST == b"\x00" * 32
    assert batch_digest(BODY) == hashlib.sha256(BODY).digest()


def test_batch_signature_covers_domain_and_body() -> None:
    signer = Signer.generate()
    signature = signer.sign_batch(BODY)
    public_key(signer).verify(signature, BATCH_DOMAIN + BODY)
    with pytest.raises(InvalidSignature):
        public_key(signer).verify(signature, BODY)  # not valid without the domain


@pytest.mark.parametrize("index", [0, len(BODY) // 2, len(BODY) - 1])
def test_tampered_body_fails_verification(index: int) -> None:
    signer = Signer.generate()
    signature = signer.sign_batch(BODY)
    tampered = bytearray(BODY)
    tampered[index] ^= 0x01
    with pytest.raises(InvalidSignature):
        public_key(signer).verify(signature, BATCH_DOMAIN + bytes(tampered))


def test_tampered_signature_fails_verification() -> None:
    signer = Signer.generate()
    signature = bytearray(signer.sign_batch(BODY))
    signature[10] ^= 0x80
    with pytest.raises(InvalidSignature):
        public_key(signer).verify(bytes(signature), BATCH_DOMAIN + BODY)


def test_other_key_fails_verification() -> None:
    signature = Signer.generate().sign_batch(BODY)
    with pytest.raises(InvalidSignature):
        public_key(Signer.generate()).verify(signature, BATCH_DOMAIN + BODY)


def test_enroll_proof_is_bound_to_token_and_csr_and_its_domain() -> None:
    signer = Signer.generate()
    csr = b"0\x82\x01\x00 fake der"
    proof = signer.sign_enroll_proof("tok-123", csr)
    public_key(signer).verify(proof, ENROLL_DOMAIN + b"tok-123\n" + csr)
    with pytest.raises(InvalidSignature):
        public_key(signer).verify(proof, ENROLL_DOMAIN + b"tok-124\n" + csr)
    # A batch signature over the same bytes is not an enrolment proof, and vice versa.
    message = b"tok-123\n" + csr
    with pytest.raises(InvalidSignature):
        public_key(signer).verify(signer.sign_batch(message), ENROLL_DOMAIN + message)


def test_key_id_is_sha256_of_raw_public_key() -> None:
    signer = Signer.generate()
    raw = signer.public_key_raw()
    assert len(raw) == 32
    assert signer.key_id() == hashlib.sha256(raw).digest()
    assert Signer.generate().key_id() != signer.key_id()


def test_save_writes_0600_and_load_restores_the_key(tmp_path: Path) -> None:
    signer = Signer.generate()
    path = tmp_path / "agent.key"
    signer.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    loaded = Signer.load(path)
    assert loaded.public_key_raw() == signer.public_key_raw()
    public_key(signer).verify(loaded.sign_batch(BODY), BATCH_DOMAIN + BODY)


def test_save_is_0600_even_with_a_permissive_umask(tmp_path: Path) -> None:
    path = tmp_path / "agent.key"
    old = os.umask(0)
    try:
        Signer.generate().save(path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_save_replaces_an_existing_key_and_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "agent.key"
    Signer.generate().save(path)
    second = Signer.generate()
    second.save(path)
    assert Signer.load(path).key_id() == second.key_id()
    assert [p.name for p in tmp_path.iterdir()] == ["agent.key"]


def test_save_into_missing_directory_raises_state_error(tmp_path: Path) -> None:
    with pytest.raises(StateError):
        Signer.generate().save(tmp_path / "missing" / "agent.key")


def test_load_accepts_a_raw_32_byte_key(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    raw = key.private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )
    signer = Signer.load(write_private(tmp_path / "agent.key", raw))
    assert signer.public_key_raw() == key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_load_refuses_a_key_others_can_access(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "agent.key"
    Signer.generate().save(path)
    path.chmod(mode)
    with pytest.raises(StateError, match="chmod 600"):
        Signer.load(path)


def test_load_missing_file_raises_state_error(tmp_path: Path) -> None:
    with pytest.raises(StateError) as info:
        Signer.load(tmp_path / "nope.key")
    assert isinstance(info.value.__cause__, FileNotFoundError)


def test_load_refuses_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "real.key"
    Signer.generate().save(target)
    link = tmp_path / "agent.key"
    link.symlink_to(target)
    with pytest.raises(StateError):
        Signer.load(link)


def test_load_refuses_garbage(tmp_path: Path) -> None:
    with pytest.raises(StateError, match="not a raw or PEM"):
        Signer.load(write_private(tmp_path / "agent.key", b"not a key at all"))


def test_load_refuses_a_non_ed25519_key(tmp_path: Path) -> None:
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(StateError, match="not Ed25519"):
        Signer.load(write_private(tmp_path / "agent.key", pem))
