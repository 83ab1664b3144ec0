"""The agent's Ed25519 identity: key file handling and domain-separated signatures.

The spool calls `Signer.sign_batch` when it seals a batch body; enrolment uses
`sign_enroll_proof`. Only this module touches private key material.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import stat
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.errors import StateError

__all__ = [
    "BATCH_DOMAIN",
    "ENROLL_DOMAIN",
    "GENESIS_DIGEST",
    "Signer",
    "batch_digest",
]

logger = logging.getLogger(__name__)

BATCH_DOMAIN = b"exfilwatch.batch.v1\n"
"""Prefix of every batch signature, so a batch signature can never pass for another message."""
ENROLL_DOMAIN = b"exfilwatch.enroll.v1\n"
"""Prefix of the enrolment proof-of-possession signature."""
GENESIS_DIGEST = bytes(32)
"""`prev_batch_digest` of batch 1: the chain starts from 32 zero bytes."""

_RAW_KEY_LEN = 32
_MAX_KEY_FILE = 16 * 1024  # a PEM Ed25519 key is ~120 bytes; refuse to slurp anything large


def batch_digest(body: bytes) -> bytes:
    """SHA-256 of a batch body: the next batch's `prev_batch_digest`."""
    return hashlib.sha256(body).digest()


class Signer:
    """Holds the agent's Ed25519 private key and signs with domain separation."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self._public_raw = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @classmethod
    def generate(cls) -> Signer:
        """A fresh key (enrolment); call `save` to keep it."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: Path) -> Signer:
        """Read a raw 32-byte or PEM PKCS#8 key; refuse a file others may read.

        Raises StateError when the file is missing, unreadable, group/world
        accessible, or not an Ed25519 private key.
        """
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            raise StateError(f"cannot open agent key {path}: {e.strerror}") from e
        with os.fdopen(fd, "rb") as f:
            # Check the mode of the file we actually opened, not of whatever the path
            # names a moment later.
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise StateError(f"agent key {path} is not a regular file")
            if st.st_mode & 0o077:
                raise StateError(
                    f"agent key {path} has mode {stat.S_IMODE(st.st_mode):04o}; "
                    "it must not be accessible by group or others (chmod 600)"
                )
            try:
                data = f.read(_MAX_KEY_FILE + 1)
            except OSError as e:
                raise StateError(f"cannot read agent key {path}: {e.strerror}") from e
        return cls(_parse_private_key(data, path))

    def save(self, path: Path) -> None:
        """Write the key as PEM PKCS#8, mode 0600, atomically (temp file + rename).

        The temp file is created with O_EXCL and mode 0600, so the key is never
        readable by others, not even briefly; a crash leaves the old file or the new one.
        """
        pem = self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise StateError(f"cannot create agent key {path}: {e.strerror}") from e
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        except OSError as e:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise StateError(f"cannot write agent key {path}: {e.strerror}") from e
        logger.info("saved agent key %s (key id %s)", path, self.key_id().hex())

    def public_key_raw(self) -> bytes:
        """The 32-byte raw public key (what enrolment sends to the collector)."""
        return self._public_raw

    def key_id(self) -> bytes:
        """SHA-256 of the raw public key: the `key_id` in every SignedBatch."""
        return hashlib.sha256(self._public_raw).digest()

    def sign_batch(self, body: bytes) -> bytes:
        """Ed25519 signature over `BATCH_DOMAIN + body` (body = serialised EventBatch)."""
        return self._key.sign(BATCH_DOMAIN + body)

    def sign_enroll_proof(self, token_id: str, csr_der: bytes) -> bytes:
        """Proof of key possession for enrolment, bound to the token and the CSR."""
        return self._key.sign(ENROLL_DOMAIN + token_id.encode() + b"\n" + csr_der)


def _parse_private_key(data: bytes, path: Path) -> Ed25519PrivateKey:
    if len(data) > _MAX_KEY_FILE:
        raise StateError(f"agent key {path} is too large to be an Ed25519 key")
    if len(data) == _RAW_KEY_LEN and not data.startswith(b"-----"):
        return Ed25519PrivateKey.from_private_bytes(data)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise StateError(f"agent key {path} is not a raw or PEM PKCS#8 key: {e}") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise StateError(f"agent key {path} is {type(key).__name__}, not Ed25519")
    return key


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable: fsync the directory entry (POSIX)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
