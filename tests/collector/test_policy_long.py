"""collector.policy: the `long_rules` section (cumulative, baseline, risk)."""

from __future__ import annotations

import re

import pytest
import yaml

from collector.detection.cumulative import Measure, Tier
from collector.errors import ConfigError
from collector.policy import parse_policy

BASE = """
labels: [public, internal, confidential, secret]
rules:
  - {name: burst, match: {min_label: confidential}, group_by: [user], window: 10m,
     threshold: {files: 20}, severity: high}
long_rules:
  - name: trickle-30d
    kind: cumulative
    match: {min_label: confidential, destinations: [removable, cloud_sync]}
    measure: distinct_files
    window: 30d
    tiers: {high: 30, medium: 15}
  - name: volume-30d
    kind: cumulative
    match: {min_label: confidential}
    measure: bytes
    window: 30d
    tiers: {medium: 2GiB}
  - name: baseline-weekly
    kind: baseline
    match: {min_label: confidential}
    bucket: 7d
    history: 56d
    multiplier: 3
    floor: 5
  - name: risk
    kind: risk
    match: {min_label: internal, destinations: [removable, cloud_sync, network_share]}
    base_by_label: {internal: 1, confidential: 5, secret: 10}
    destination_factor: {removable: 2, cloud_sync: 2, network_share: 0.5}
    watchlist_factor: {departing: 1.5}
    indicators: {first_seen_device: 10, off_hours: {points: 3, cap_per_day: 3}}
    half_life: 14d
    tiers: {medium: 100, high: 150, critical: 250}
"""


def parse(text: str):
    return parse_policy(yaml.safe_load(text), "p")


def test_the_reference_sketch_parses():
    policy = parse(BASE)
    trickle, volume, weekly, risk = policy.long_rules
    assert trickle.cumulative is not None
    assert trickle.cumulative.tiers == (Tier("medium", 15), Tier("high", 30))
    assert trickle.selector.destinations == {"removable", "cloud_sync"}
    assert trickle.selector.min_rank == 2
    assert volume.cumulative is not None and volume.cumulative.measure is Measure.BYTES
    assert volume.cumulative.tiers == (Tier("medium", 2 << 30),)
    assert weekly.baseline is not None and weekly.baseline.bucket_days == 7
    assert risk.risk is not None and risk.risk.indicator_cap_per_day == {"off_hours": 3}
    assert risk.risk.tiers == (("medium", 100.0), ("high", 150.0), ("critical", 250.0))


@pytest.mark.parametrize(
    "old, new, message",
    [
        ("kind: baseline", "kind: zscore", "long_rules[2].kind: expected one of"),
        ("measure: distinct_files", "measure: files", "long_rules[0].measure"),
        ("tiers: {high: 30, medium: 15}", "tiers: {high: 10, medium: 15}", "higher threshold"),
        ("window: 30d\n    tiers: {medium: 2GiB}", "window: 91d\n    tiers: {medium: 2GiB}",
         "long_rules[1].window"),
        ("bucket: 7d", "bucket: 36h", "whole days"),
        ("{internal: 1, confidential", "{restricted: 1, confidential", "not one of the policy"),
        ("network_share: 0.5}", "nas: 0.5}", "destination_factor.nas"),
        ("name: volume-30d", "name: burst", "duplicate rule name"),
        ("floor: 5", "floor: 0", "long_rules[2].floor"),
    ],
)  # fmt: skip
def test_bad_long_rules_name_the_key(old, new, message):
    assert old in BASE
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse(BASE.replace(old, new, 1))


def test_the_shipped_slow_leak_policy_parses_and_keeps_the_burst_rules():
    from collector.policy import load_policy
    from tests.conftest import ROOT

    burst = load_policy(ROOT / "configs" / "policy.yaml")
    slow = load_policy(ROOT / "configs" / "policy-slow-leak.yaml")
    assert slow.rules == burst.rules
    assert [r.kind.value for r in slow.long_rules] == [
        "cumulative",
        "cumulative",
        "baseline",
        "risk",
    ]
