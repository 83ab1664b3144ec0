"""Signed policy: verified with the key pinned at enrolment; the last good one is kept."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agent.clock import SystemClock
from agent.enroll import enroll
from agent.identity import SIGNING_KEY, SPOOL
from agent.policy import (
    POLICY_DOMAIN,
    POLICY_FILE,
    POLICY_KEY_FILE,
    PolicyError,
    PolicyKeeper,
    verify_policy,
)
from agent.shipper import Shipper, ShipperSettings
from agent.signer import Signer
from agent.spool import Spool
from exfilwatch.v1 import collector_pb2
from tests.conftest import InProcessCollector
from tests.procs import wait_until


def _raw(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _signed(key: Ed25519PrivateKey, revision: str, issued: int = 1, **fields: int) -> bytes:
    body = collector_pb2.AgentPolicy(
        revision=revision,
        issued_at_ns=issued,
        heartbeat_interval_s=fields.get("heartbeat", 30),
        refresh_interval_s=fields.get("refresh", 300),
        document=b"labels: [public]\n",
    ).SerializeToString()
    return collector_pb2.SignedPolicy(
        body=body,
        signature=key.sign(POLICY_DOMAIN + body),
        key_id=hashlib.sha256(_raw(key)).digest(),
    ).SerializeToString()


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def test_good_policy_verifies(key: Ed25519PrivateKey) -> None:
    policy = verify_policy(_signed(key, "r1", heartbeat=15), _raw(key))
    assert (policy.revision, policy.heartbeat_s, policy.refresh_s) == ("r1", 15.0, 300.0)
    assert policy.document == b"labels: [public]\n"


def test_forged_tampered_and_garbage_policies_are_refused(key: Ed25519PrivateKey) -> None:
    other = Ed25519PrivateKey.generate()
    with pytest.raises(PolicyError, match="other than the one pinned"):
        verify_policy(_signed(other, "r1"), _raw(key))
    envelope = collector_pb2.SignedPolicy.FromString(_signed(key, "r1"))
    tampered = bytearray(envelope.body)
    tampered[2] ^= 1
    envelope.body = bytes(tampered)
    with pytest.raises(PolicyError, match="signature"):
        verify_policy(envelope.SerializeToString(), _raw(key))
    with pytest.raises(PolicyError):
        verify_policy(b"\xff\xff garbage", _raw(key))
    with pytest.raises(PolicyError, match="intervals"):
        verify_policy(_signed(key, "r1", heartbeat=0), _raw(key))


def test_keeper_keeps_the_last_good_policy_across_restarts(
    key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    (tmp_path / POLICY_KEY_FILE).write_bytes(_raw(key))
    keeper = PolicyKeeper(tmp_path)
    assert keeper.current is None and keeper.revision == ""
    assert keeper.offer(_signed(key, "r1", issued=10))
    assert not keeper.offer(_signed(Ed25519PrivateKey.generate(), "evil", issued=20))
    assert not keeper.offer(_signed(key, "r0", issued=5))  # older than the one in force
    assert keeper.revision == "r1" and keeper.rejected == 2
    # After a restart the stored policy is verified again and stays in force.
    assert PolicyKeeper(tmp_path).revision == "r1"
    (tmp_path / POLICY_FILE).write_bytes(b"tampered on disk")
    assert PolicyKeeper(tmp_path).current is None


def test_agent_runs_and_reports_the_collectors_policy(
    inproc_collector: InProcessCollector, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    identity = enroll(inproc_collector.enroll_address, inproc_collector.token(), state, "h")
    spool = Spool.open(
        state / SPOOL, agent_id=identity.agent_id, signer=Signer.load(state / SIGNING_KEY)
    )
    shipper = Shipper(identity, spool, SystemClock(), ShipperSettings())
    shipper.start()
    try:
        wait_until(lambda: shipper.policy.current is not None, 30, "the policy")

        def reported() -> str:
            agent = inproc_collector.store.get_agent(identity.agent_id)
            return agent.policy_revision if agent else ""

        revision = wait_until(reported, 30, "the revision in a heartbeat")
    finally:
        shipper.stop(flush_s=1)
        spool.close()
    assert shipper.policy.current is not None
    assert revision == shipper.policy.current.revision
    assert b"bulk-copy-to-usb" in shipper.policy.current.document
