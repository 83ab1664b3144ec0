"""`audit verify`: re-prove every stored event from the signed batch bytes kept at ingest.

It reads the database on its own read-only connection and trusts nothing the
ingest path wrote except the enrolled public keys: each batch's signature,
digest and chain link are checked again, its body is decoded again, and every
stored event row must equal the event in the body it came from.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from collector.codec import decode_batch_body
from collector.errors import CollectorError, StoreError
from collector.queries import EVENT_COLUMNS, event_from_row
from collector.verify import DOMAIN, GENESIS

_EVENTS_OF_BATCH = f"SELECT {EVENT_COLUMNS} FROM events WHERE agent_id = ? AND batch_seq = ?"  # noqa: S608
_ORPHANS = (
    "SELECT e.event_id, e.agent_id, e.batch_seq FROM events e LEFT JOIN batches b"
    " ON b.agent_id = e.agent_id AND b.batch_seq = e.batch_seq WHERE b.body IS NULL"
)


@dataclass(frozen=True)
class Finding:
    """One thing that does not verify, named so an auditor can find it."""

    agent_id: str
    batch_seq: int
    event_id: str
    problem: str

    def __str__(self) -> str:
        where = f"agent {self.agent_id} batch {self.batch_seq}"
        if self.event_id:
            where += f" event {self.event_id}"
        return f"{where}: {self.problem}"


@dataclass(frozen=True)
class AuditReport:
    agents: int
    batches: int
    events: int
    findings: tuple[Finding, ...]

    @property
    def ok(self) -> bool:
        return not self.findings


def _connect(db: Path) -> sqlite3.Connection:
    if not db.exists():
        raise StoreError(f"{db} does not exist")
    try:
        return sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    except sqlite3.Error as e:
        raise StoreError(f"cannot open {db} read-only: {e}") from e


def _check_batch(
    con: sqlite3.Connection,
    key: Ed25519PublicKey,
    row: tuple[str, int, bytes, bytes, bytes, bytes],
    prev: bytes | None,
) -> Iterator[Finding]:
    agent_id, seq, digest, prev_digest, body, signature = row
    try:
        key.verify(signature, DOMAIN + body)
    except InvalidSignature:
        yield Finding(agent_id, seq, "", "signature does not verify over the stored body")
        return
    if hashlib.sha256(body).digest() != digest:
        yield Finding(agent_id, seq, "", "stored digest differs from the body's SHA-256")
    if prev is not None and prev_digest != prev:
        yield Finding(agent_id, seq, "", "chain broken: previous digest does not match")
    try:
        body_seq, body_prev, _sealed, events = decode_batch_body(body, agent_id=agent_id)
    except CollectorError as e:
        yield Finding(agent_id, seq, "", f"signed body does not decode: {e}")
        return
    if body_seq != seq or body_prev != prev_digest:
        yield Finding(agent_id, seq, "", "batch row disagrees with its signed body")
    signed = {e.event_id: e for e in events}
    for stored_row in con.execute(_EVENTS_OF_BATCH, (agent_id, seq)):
        stored = event_from_row(stored_row)
        original = signed.get(stored.event_id)
        if original is None:
            yield Finding(agent_id, seq, stored.event_id, "stored event is not in its signed batch")
        elif original != stored:
            fields = [
                name
                for name, mine, theirs in zip(stored._fields, stored, original, strict=True)
                if mine != theirs
            ]
            yield Finding(
                agent_id, seq, stored.event_id, f"stored event differs from signed: {fields}"
            )


def verify_store(db: Path) -> AuditReport:
    """Re-verify every batch and event in the collector database at `db`."""
    con = _connect(db)
    findings: list[Finding] = []
    n_batches = n_events = 0
    try:
        keys = {
            agent_id: Ed25519PublicKey.from_public_bytes(raw)
            for agent_id, raw in con.execute("SELECT agent_id, public_key FROM agents")
        }
        last: dict[str, tuple[int, bytes]] = {}
        rows = con.execute(
            "SELECT agent_id, batch_seq, digest, prev_digest, body, signature FROM batches"
            " ORDER BY agent_id, batch_seq"
        )
        for row in rows:
            agent_id, seq = row[0], row[1]
            n_batches += 1
            key = keys.get(agent_id)
            if key is None:
                findings.append(Finding(agent_id, seq, "", "batch of an agent never enrolled"))
                continue
            prev_seq, prev_digest = last.get(agent_id, (0, GENESIS))
            if seq != prev_seq + 1:
                findings.append(Finding(agent_id, seq, "", f"gap after batch {prev_seq}"))
            findings.extend(
                _check_batch(con, key, row, prev_digest if seq == prev_seq + 1 else None)
            )
            last[agent_id] = (seq, row[2])
        for event_id, agent_id, seq in con.execute(_ORPHANS):
            findings.append(Finding(agent_id, seq, event_id, "event without a stored batch"))
        n_events = con.execute("SELECT count(*) FROM events").fetchone()[0]
    except sqlite3.Error as e:
        raise StoreError(f"audit failed reading {db}: {e}") from e
    finally:
        con.close()
    return AuditReport(len(keys), n_batches, n_events, tuple(findings))
