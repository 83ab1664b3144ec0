"""Enrolment against a real in-process collector over TLS."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from agent.enroll import enroll, fetch_pinned_ca, parse_token, split_hostport
from agent.errors import EnrollError, StateError
from agent.identity import SIGNING_KEY, TLS_KEY, Identity
from tests.conftest import InProcessCollector


def test_enroll_writes_identity_with_private_keys_0600(
    inproc_collector: InProcessCollector, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    identity = enroll(inproc_collector.enroll_address, inproc_collector.token(), state, "lt-0412")
    assert identity.agent_id.startswith("ag-")
    assert identity.agent_port == inproc_collector.bound.agent_port
    assert Identity.load(state) == identity
    for name in (SIGNING_KEY, TLS_KEY):
        assert stat.S_IMODE((state / name).stat().st_mode) == 0o600
    agents = inproc_collector.store.list_agents()
    assert [(a.agent_id, a.hostname) for a in agents] == [(identity.agent_id, "lt-0412")]


def test_wrong_ca_fingerprint_refuses_before_sending_the_token(
    inproc_collector: InProcessCollector, tmp_path: Path
) -> None:
    token = inproc_collector.token()
    forged = token[:-64] + "f" * 64
    with pytest.raises(EnrollError, match="does not present the CA named in the token"):
        enroll(inproc_collector.enroll_address, forged, tmp_path / "s", "h")
    # The token was never spent on the untrusted peer: it still works.
    enroll(inproc_collector.enroll_address, token, tmp_path / "s", "h")


def test_used_token_is_refused(inproc_collector: InProcessCollector, tmp_path: Path) -> None:
    token = inproc_collector.token(uses=1)
    enroll(inproc_collector.enroll_address, token, tmp_path / "a", "a")
    with pytest.raises(EnrollError, match="PERMISSION_DENIED"):
        enroll(inproc_collector.enroll_address, token, tmp_path / "b", "b")


def test_expired_token_is_refused(inproc_collector: InProcessCollector, tmp_path: Path) -> None:
    token = inproc_collector.token(ttl_s=-1)
    with pytest.raises(EnrollError, match="expired"):
        enroll(inproc_collector.enroll_address, token, tmp_path / "a", "a")


def test_fetch_pinned_ca_returns_the_collector_ca(inproc_collector: InProcessCollector) -> None:
    host, port = split_hostport(inproc_collector.enroll_address)
    pem = fetch_pinned_ca(host, port, inproc_collector.authority.fingerprint)
    assert pem.strip() == inproc_collector.authority.ca_pem.strip()


def test_unreachable_collector_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(EnrollError, match="cannot reach collector"):
        fetch_pinned_ca("127.0.0.1", 1, "0" * 64, timeout=2)


@pytest.mark.parametrize(
    "text",
    ["", "exfw1.a.b", "exfw2.a.b." + "0" * 64, "exfw1.a.b.short", "exfw1.a.b." + "z" * 64],
)
def test_malformed_tokens(text: str) -> None:
    with pytest.raises(EnrollError):
        parse_token(text)


@pytest.mark.parametrize("text", ["host", "host:", ":80", "host:99999", "host:x"])
def test_malformed_addresses(text: str) -> None:
    with pytest.raises(EnrollError, match="HOST:PORT"):
        split_hostport(text)


def test_identity_refuses_missing_or_readable_keys(tmp_path: Path) -> None:
    with pytest.raises(StateError, match="no enrolment"):
        Identity.load(tmp_path)
    identity = Identity("ag-x", "127.0.0.1", 1, tmp_path)
    identity.save()
    (tmp_path / TLS_KEY).write_bytes(b"key")
    (tmp_path / TLS_KEY).chmod(0o644)
    with pytest.raises(StateError, match="readable by others"):
        Identity.load(tmp_path).tls_material()
