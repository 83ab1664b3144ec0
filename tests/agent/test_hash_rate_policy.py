"""The fleet's hashing cap, set in the collector's policy (agents.hash_rate): parsed, signed,
verified by the agent, and applied to its hasher as the stricter of it and the agent's own."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.index import FileHasher
from agent.policy import verify_policy
from agent.service import stricter_rate
from collector import pki
from collector.errors import ConfigError
from collector.policy import parse_policy
from collector.rpc import sign_policy

MIB = 2**20
BASE = {
    "labels": ["public", "confidential"],
    "rules": [
        {
            "name": "r", "match": {"min_label": "confidential"}, "group_by": ["user"],
            "window": "10m", "threshold": {"files": 5}, "severity": "low",
        }
    ],
}  # fmt: skip


@pytest.mark.parametrize(
    ("value", "rate"), [(None, 0), ("0", 0), (0, 0), ("50MiB", 50 * MIB), (1_048_576, MIB)]
)
def test_the_policy_sets_a_fleet_hashing_rate(value: object, rate: int) -> None:
    agents = {} if value is None else {"hash_rate": value}
    assert parse_policy({**BASE, "agents": agents}, "p").agents.hash_rate == rate


@pytest.mark.parametrize(
    ("value", "message"),
    [("fast", "agents.hash_rate: expected a size"), ("1KiB", "at least 64KiB"),
     (True, "agents.hash_rate: expected a size"), ([5], "expected a size")],
)  # fmt: skip
def test_a_bad_rate_names_the_key(value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_policy({**BASE, "agents": {"hash_rate": value}}, "p")


def test_the_agent_reads_the_rate_from_the_signed_policy(tmp_path: Path) -> None:
    pki.init_pki(tmp_path)
    authority = pki.Authority.load(tmp_path)
    policy = parse_policy({**BASE, "agents": {"hash_rate": "20MiB"}}, "p")
    signed = sign_policy(policy, authority, 1).SerializeToString()
    assert verify_policy(signed, authority.policy_public_raw).hash_rate == 20 * MIB
    plain = sign_policy(parse_policy(BASE, "p"), authority, 1).SerializeToString()
    assert verify_policy(plain, authority.policy_public_raw).hash_rate == 0


def test_the_stricter_rate_holds_and_zero_means_none() -> None:
    assert stricter_rate(0, 0) == 0
    assert stricter_rate(8 * MIB, 0) == 8 * MIB
    assert stricter_rate(0, 20 * MIB) == 20 * MIB
    assert stricter_rate(8 * MIB, 20 * MIB) == 8 * MIB
    assert stricter_rate(40 * MIB, 20 * MIB) == 20 * MIB


class Clock:
    """The token bucket's time, passed in: sleeping advances it."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept = 0.0

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.slept += seconds


def test_the_cap_changes_while_the_hasher_lives(tmp_path: Path) -> None:
    path = tmp_path / "doc.bin"
    path.write_bytes(b"x" * (4 * MIB))
    clock = Clock()
    hasher = FileHasher(64 * MIB, 0, monotonic=lambda: clock.now, sleep=clock.sleep)

    def hash_seconds() -> float:
        before = clock.slept
        outcome = hasher.hash_file(bytes(path))
        assert outcome.sha256 is not None
        return clock.slept - before

    assert hash_seconds() == 0  # no cap
    hasher.set_max_rate(MIB)
    # 4 MiB at 1 MiB/s, less the bucket's quarter-second burst it starts with
    assert hash_seconds() == pytest.approx(3.75, abs=0.05)
    hasher.set_max_rate(2 * MIB)
    assert hash_seconds() == pytest.approx(1.75, abs=0.05)
    hasher.set_max_rate(0)
    assert hash_seconds() == 0 and hasher.max_rate == 0
