"""Test helper: agent signing keys and chains of real signed batches (events_pb2 + Ed25519).

Bytes are built and signed the way the agent does it, so collector tests verify real input.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from collector.models import AgentId
from collector.verify import DOMAIN, GENESIS, AgentKey
from exfilwatch.v1 import events_pb2

T0 = 1_700_000_000 * 10**9
"""A fixed wall-clock instant (ns) tests start from."""
SHA_A = "a" * 64
SHA_B = "b" * 64


@dataclass(frozen=True)
class TestAgent:
    """An agent's Ed25519 signing key and the ids derived from it."""

    __test__ = False  # not a pytest class

    private_key: Ed25519PrivateKey
    public_key_raw: bytes
    key_id: bytes
    agent_id: AgentId

    def key(self, *, revoked: bool = False) -> AgentKey:
        """The AgentKey the collector would have enrolled for this agent."""
        return AgentKey(self.agent_id, self.public_key_raw, self.key_id, revoked)

    def sign(self, body: bytes) -> bytes:
        return self.private_key.sign(DOMAIN + body)


def new_agent() -> TestAgent:
    private_key = Ed25519PrivateKey.generate()
    raw = private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    digest = hashlib.sha256(raw)
    return TestAgent(private_key, raw, digest.digest(), AgentId("ag-" + digest.hexdigest()[:24]))


def enroll(store: Any, agent: TestAgent, *, now_ns: int = T0) -> None:
    """Add `agent` to a SqliteStore as enrolment would."""
    store.add_agent(
        agent_id=agent.agent_id,
        public_key=agent.public_key_raw,
        key_id=agent.key_id,
        hostname="lt-0412",
        agent_version="0.1.0",
        enrolled_at_ns=now_ns,
        cert_serial="1f",
    )


def make_event(**overrides: Any) -> events_pb2.Event:
    """A fully populated copy-to-USB event; keyword arguments replace fields."""
    fields: dict[str, Any] = {
        "event_id": str(uuid.uuid4()),
        "seq": 1,
        "observed_at_ns": T0,
        "action": events_pb2.ACTION_COPY,
        "source": events_pb2.FileRef(
            path=b"/home/alice/secret.docx", size=1000, sha256=SHA_A, device=2049, inode=77,
            mtime_ns=T0 - 10**12,
        ),
        "label": "confidential",
        "label_source": "xattr",
        "destination": events_pb2.FileRef(
            path=b"/media/alice/KINGSTON/secret.docx", size=1000, sha256=SHA_A
        ),
        "destination_class": events_pb2.DESTINATION_CLASS_REMOVABLE,
        "device": events_pb2.Device(
            vendor="Kingston", model="DT50", serial="0019E06B", fs_uuid="1A2B-3C4D",
            fs_type="vfat", mount_point=b"/media/alice/KINGSTON",
        ),
        "process": events_pb2.ProcessInfo(
            pid=4242, start_time_ns=T0 - 10**9, exe=b"/usr/bin/cp",
            cmdline=[b"cp", b"secret.docx", b"/media/alice/KINGSTON/"], ppid_chain=[4000, 1],
            name="cp",
        ),
        "user": events_pb2.UserInfo(login="alice", effective="alice", uid=1000),
        "host": "lt-0412",
        "detection": events_pb2.DETECTION_METHOD_EXACT_HASH,
        "attribution": events_pb2.ATTRIBUTION_METHOD_PROC_SCAN,
        "agent_version": "0.1.0",
    }  # fmt: skip
    fields.update(overrides)
    return events_pb2.Event(**{k: v for k, v in fields.items() if v is not None})


def make_body(
    agent_id: str,
    batch_seq: int,
    prev_digest: bytes,
    events: Sequence[events_pb2.Event],
    *,
    sealed_at_ns: int = T0,
) -> bytes:
    batch = events_pb2.EventBatch(
        agent_id=agent_id,
        batch_seq=batch_seq,
        prev_batch_digest=prev_digest,
        sealed_at_ns=sealed_at_ns,
        events=list(events),
    )
    return batch.SerializeToString()


def envelope(body: bytes, signature: bytes, key_id: bytes) -> bytes:
    """The serialised SignedBatch an agent uploads."""
    return events_pb2.SignedBatch(body=body, signature=signature, key_id=key_id).SerializeToString()


@dataclass(frozen=True)
class Signed:
    """One signed batch: its parts, its wire bytes and where it sits in the chain."""

    body: bytes
    signature: bytes
    key_id: bytes
    batch_seq: int
    digest: bytes
    events: tuple[events_pb2.Event, ...]

    @property
    def raw(self) -> bytes:
        return envelope(self.body, self.signature, self.key_id)

    @property
    def parts(self) -> tuple[bytes, bytes, bytes]:
        return self.body, self.signature, self.key_id


@dataclass
class BatchChain:
    """Seals consecutive batches for one agent: batch_seq 1, 2, ... linked by digest."""

    agent: TestAgent
    batch_seq: int = 0
    prev_digest: bytes = GENESIS
    event_seq: int = 0
    now_ns: int = T0
    sealed: list[Signed] = field(default_factory=list)

    def events(self, n: int, **overrides: Any) -> list[events_pb2.Event]:
        """`n` fresh events, one second apart, with the agent's next event seqs."""
        out = []
        for _ in range(n):
            self.event_seq += 1
            self.now_ns += 10**9
            fields = {"seq": self.event_seq, "observed_at_ns": self.now_ns, **overrides}
            out.append(make_event(**fields))
        return out

    def next(self, events: Sequence[events_pb2.Event] | None = None, *, n: int = 3) -> Signed:
        """Seal and sign the next batch (of `events`, else of `n` fresh ones)."""
        evs = tuple(self.events(n) if events is None else events)
        body = make_body(self.agent.agent_id, self.batch_seq + 1, self.prev_digest, evs)
        return self.seal(body, evs)

    def seal(self, body: bytes, events: Sequence[events_pb2.Event] = ()) -> Signed:
        """Sign `body` as the next batch and advance the chain past it."""
        self.batch_seq += 1
        digest = hashlib.sha256(body).digest()
        signed = Signed(
            body, self.agent.sign(body), self.agent.key_id, self.batch_seq, digest, tuple(events)
        )
        self.prev_digest = digest
        self.sealed.append(signed)
        return signed
