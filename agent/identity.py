"""The agent's enrolled identity in its state directory: keys, certificates, collector address.

<state>/signing.key  Ed25519 batch-signing key (0600)
<state>/tls.key      ECDSA P-256 key for mutual TLS (0600)
<state>/tls.crt      client certificate issued at enrolment
<state>/ca.crt       the collector CA pinned at enrolment
<state>/identity.json  agent id, collector host and agent port
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from agent.errors import StateError

SIGNING_KEY = "signing.key"
TLS_KEY = "tls.key"
TLS_CERT = "tls.crt"
CA_CERT = "ca.crt"
IDENTITY = "identity.json"
SPOOL = "spool.db"
NEXT = ".next"
REVOKED = "revoked"
"""Marker written when the collector revoked this identity: `run` refuses to start."""


@dataclass(frozen=True)
class Identity:
    agent_id: str
    collector_host: str
    agent_port: int
    state_dir: Path

    @property
    def target(self) -> str:
        host = f"[{self.collector_host}]" if ":" in self.collector_host else self.collector_host
        return f"{host}:{self.agent_port}"

    def tls_material(self) -> tuple[bytes, bytes, bytes]:
        """(CA PEM, client key PEM, client certificate PEM)."""
        self._finish_rotation()
        key_path = self.state_dir / TLS_KEY
        check_private(key_path)
        try:
            return (
                (self.state_dir / CA_CERT).read_bytes(),
                key_path.read_bytes(),
                (self.state_dir / TLS_CERT).read_bytes(),
            )
        except OSError as e:
            raise StateError(f"cannot read TLS material in {self.state_dir}: {e}") from e

    def rotate_tls(self, key_pem: bytes, cert_pem: bytes) -> None:
        """Replace the mTLS key and certificate as a pair, surviving a crash half-way.

        Both are written as `.next` files first; then the key, then the certificate
        replace the current ones. `tls_material` completes an interrupted rotation.
        """
        write_private(self.state_dir / (TLS_KEY + NEXT), key_pem)
        write_private(self.state_dir / (TLS_CERT + NEXT), cert_pem)
        self._finish_rotation()

    def _finish_rotation(self) -> None:
        key_next = self.state_dir / (TLS_KEY + NEXT)
        cert_next = self.state_dir / (TLS_CERT + NEXT)
        if key_next.exists() and cert_next.exists():
            os.replace(key_next, self.state_dir / TLS_KEY)
        if cert_next.exists() and not key_next.exists():
            os.replace(cert_next, self.state_dir / TLS_CERT)

    def save(self) -> None:
        data = {
            "agent_id": self.agent_id,
            "collector_host": self.collector_host,
            "agent_port": self.agent_port,
        }
        tmp = self.state_dir / (IDENTITY + ".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, self.state_dir / IDENTITY)

    @classmethod
    def load(cls, state_dir: Path) -> Identity:
        path = state_dir / IDENTITY
        try:
            data = json.loads(path.read_text())
            return cls(
                agent_id=str(data["agent_id"]),
                collector_host=str(data["collector_host"]),
                agent_port=int(data["agent_port"]),
                state_dir=state_dir,
            )
        except FileNotFoundError as e:
            raise StateError(f"{state_dir} holds no enrolment ({IDENTITY} missing)") from e
        except (ValueError, KeyError, TypeError) as e:
            raise StateError(f"{path}: damaged ({e})") from e


def check_private(path: Path) -> None:
    """Refuse a secret file that others can read."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError as e:
        raise StateError(f"{path} is missing") from e
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise StateError(f"{path} is readable by others (mode {oct(mode & 0o777)}); chmod 600 it")


def write_private(path: Path, data: bytes) -> None:
    """Write a secret 0600 and atomically; never readable by others, even briefly."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
