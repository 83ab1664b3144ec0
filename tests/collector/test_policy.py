"""Policy loading: the DESIGN example and the shipped config parse; bad input names the key."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from collector.errors import ConfigError
from collector.models import Severity
from collector.policy import (
    ALL_DESTINATIONS,
    DEFAULT_ACTIONS,
    Action,
    DestinationClass,
    Dimension,
    Policy,
    format_duration,
    format_size,
    load_policy,
    parse_duration,
    parse_policy,
    parse_size,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

DESIGN_EXAMPLE = """\
revision: "2026-11-28.1"        # optional string, default derived from sha256 of file bytes
labels: [public, internal, confidential, secret]   # ascending rank
rules:
  - name: bulk-copy-to-usb
    match: {min_label: confidential, destinations: [removable]}
    group_by: [user, host]
    window: 10m
    threshold: {files: 20, bytes: 100MiB}
    severity: high
"""

MINIMAL_RULE = """\
labels: [public, confidential]
rules:
  - name: r
    match: {min_label: confidential}
    group_by: [user]
    window: 1h
    threshold: {files: 3}
    severity: low
"""


@pytest.fixture
def write(tmp_path: Path):
    def write(text: str, name: str = "policy.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return write


def test_design_example_parses_as_is(write) -> None:
    policy = load_policy(write(DESIGN_EXAMPLE))

    assert policy.revision == "2026-11-28.1"
    assert policy.labels == ("public", "internal", "confidential", "secret")
    (rule,) = policy.rules
    assert rule.name == "bulk-copy-to-usb"
    assert rule.match.min_label == "confidential"
    assert rule.match.destinations == {DestinationClass.REMOVABLE}
    assert rule.match.actions == {Action.COPY, Action.MOVE}
    assert rule.group_by == (Dimension.USER, Dimension.HOST)
    assert rule.window_ns == 600 * 10**9
    assert rule.threshold.files == 20
    assert rule.threshold.bytes == 100 * 1024 * 1024
    assert rule.severity is Severity.HIGH
    assert rule.describe() == "20 files / 100 MiB in 10m"
    assert policy.max_window_ns == rule.window_ns


def test_shipped_config_parses() -> None:
    policy = load_policy(CONFIGS / "policy.yaml")

    names = [rule.name for rule in policy.rules]
    assert names[0] == "bulk-copy-to-usb"
    assert "confidential-to-any-removable-30d" in names
    assert any(DestinationClass.NETWORK_SHARE in r.match.destinations for r in policy.rules)
    assert policy.max_window_ns == 30 * 86_400 * 10**9


def test_label_rank() -> None:
    policy = parse_policy(
        {"labels": ["low", "high"], "rules": _rules(match={"min_label": "low"})}, "p"
    )

    assert policy.label_rank("low") == 0
    assert policy.label_rank("high") == 1
    assert policy.label_rank("unknown") is None
    assert policy.label_rank("") is None


def test_defaults_for_destinations_and_actions(write) -> None:
    (rule,) = load_policy(write(MINIMAL_RULE)).rules

    assert rule.match.destinations == ALL_DESTINATIONS == set(DestinationClass)
    assert rule.match.actions == DEFAULT_ACTIONS
    assert rule.threshold.bytes is None


def test_default_revision_is_sha256_of_file_bytes(write) -> None:
    path = write(MINIMAL_RULE)

    expected = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    assert load_policy(path).revision == expected


def test_parse_policy_without_revision_derives_a_stable_one() -> None:
    data = {"labels": ["a"], "rules": _rules()}

    first = parse_policy(data, "p").revision
    assert len(first) == 12
    assert first == parse_policy(dict(reversed(data.items())), "p").revision
    assert parse_policy(data, "p", default_revision="rev-7").revision == "rev-7"


def test_explicit_actions_and_all_dimensions() -> None:
    rules = _rules(
        match={"min_label": "a", "actions": ["read", "write"], "destinations": ["cloud_sync"]},
        group_by=["destination", "user", "host"],
    )
    (rule,) = parse_policy({"labels": ["a"], "rules": rules}, "p").rules

    assert rule.match.actions == {Action.READ, Action.WRITE}
    assert rule.match.destinations == {DestinationClass.CLOUD_SYNC}
    assert rule.group_by == (Dimension.DESTINATION, Dimension.USER, Dimension.HOST)


@pytest.mark.parametrize(
    ("text", "ns"),
    [
        ("30s", 30 * 10**9),
        ("10m", 600 * 10**9),
        ("36h", 36 * 3600 * 10**9),
        ("30d", 2_592_000 * 10**9),
    ],
)
def test_durations(text: str, ns: int) -> None:
    assert parse_duration(text) == ns
    assert format_duration(ns) == text


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("512B", 512),
        ("4096", 4096),
        ("2KiB", 2048),
        ("100MiB", 100 << 20),
        ("1 GiB", 1 << 30),
        ("3KB", 3000),
        ("5MB", 5_000_000),
        ("2GB", 2_000_000_000),
    ],
)
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_format_size_is_exact() -> None:
    assert format_size(100 << 20) == "100 MiB"
    assert format_size(5_000_000) == "5 MB"
    assert format_size(1500) == "1500 B"


def test_bytes_accepts_an_integer() -> None:
    rules = _rules(threshold={"bytes": 1_000_000})
    (rule,) = parse_policy({"labels": ["a"], "rules": rules}, "p").rules

    assert rule.threshold.bytes == 1_000_000
    assert rule.threshold.files is None


# Each bad input: (what to patch: the minimal rule, the top level or keys to drop; how; message).
BAD = [
    (
        "top",
        {"colour": "red"},
        "p: colour: unknown key (expected one of labels, rules, revision, agents, long_rules)",
    ),
    ("top", {"revision": 7}, "p: revision: expected non-empty printable text, got 7"),
    ("top", {"labels": []}, "p: labels: expected at least one label"),
    ("top", {"labels": "a"}, "p: labels: expected a list, got 'a'"),
    ("top", {"labels": ["a", "a"]}, "p: labels[1]: duplicate label 'a'"),
    ("top", {"labels": ["a", 3]}, "p: labels[1]: expected non-empty printable text, got 3"),
    ("top", {"rules": []}, "p: rules: no rules: an empty rule set would never alert; add one"),
    ("top", {"rules": None}, "p: rules: expected a list, got nothing"),
    ("rule", {"treshold": {}}, "p: rules[0].treshold: unknown key (expected one of"),
    ("rule", {"severity": "urgent"}, "p: rules[0].severity: expected one of low, medium,"),
    ("rule", {"severity": None}, "p: rules[0].severity: expected one of"),
    ("rule", {"name": ""}, "p: rules[0].name: expected non-empty printable text, got ''"),
    ("rule", {"name": "a\nb"}, "p: rules[0].name: expected non-empty printable text"),
    ("rule", {"group_by": []}, "p: rules[0].group_by: expected at least one entry"),
    ("rule", {"group_by": ["user", "user"]}, "p: rules[0].group_by[1]: repeated 'user'"),
    ("rule", {"group_by": ["process"]}, "p: rules[0].group_by[0]: expected one of user, host,"),
    ("rule", {"group_by": "user"}, "p: rules[0].group_by: expected a list, got 'user'"),
    ("rule", {"window": "10 minutes"}, "p: rules[0].window: expected a duration like 10m"),
    ("rule", {"window": 600}, "p: rules[0].window: expected a duration like 10m, got 600"),
    ("rule", {"window": "0s"}, "p: rules[0].window: must be > 0 and at most 90d, got '0s'"),
    ("rule", {"window": "91d"}, "p: rules[0].window: must be > 0 and at most 90d, got '91d'"),
    ("rule", {"threshold": {}}, "p: rules[0].threshold: needs at least one of files, bytes"),
    ("rule", {"threshold": {"files": 0}}, "p: rules[0].threshold.files: expected an integer > 0"),
    (
        "rule",
        {"threshold": {"files": "20"}},
        "p: rules[0].threshold.files: expected an integer > 0, got '20'",
    ),
    ("rule", {"threshold": {"files": True}}, "p: rules[0].threshold.files: expected an integer"),
    (
        "rule",
        {"threshold": {"bytes": "lots"}},
        "p: rules[0].threshold.bytes: expected a size like 100MiB, got 'lots'",
    ),
    ("rule", {"threshold": {"bytes": "100TiB"}}, "p: rules[0].threshold.bytes: expected a size"),
    ("rule", {"threshold": {"bytes": 1.5}}, "p: rules[0].threshold.bytes: expected a size like"),
    ("rule", {"threshold": {"bytes": "0MiB"}}, "p: rules[0].threshold.bytes: must be > 0"),
    ("rule", {"threshold": [20]}, "p: rules[0].threshold: expected a mapping, got a list"),
    ("rule", {"match": {}}, "p: rules[0].match: missing key 'min_label'"),
    (
        "rule",
        {"match": {"min_label": "topsecret"}},
        "p: rules[0].match.min_label: unknown label 'topsecret' (labels: a, b)",
    ),
    ("rule", {"match": {"min_label": "a", "dest": []}}, "p: rules[0].match.dest: unknown key"),
    (
        "rule",
        {"match": {"min_label": "a", "destinations": ["usb"]}},
        "p: rules[0].match.destinations[0]: expected one of removable, network_share,",
    ),
    (
        "rule",
        {"match": {"min_label": "a", "destinations": []}},
        "p: rules[0].match.destinations: expected at least one entry",
    ),
    (
        "rule",
        {"match": {"min_label": "a", "actions": ["coverage_gap"]}},
        "p: rules[0].match.actions[0]: expected one of copy, move,",
    ),
    ("drop", {"window": None}, "p: rules[0]: missing key 'window'"),
    ("top", {"rules": ["r"]}, "p: rules[0]: expected a mapping, got 'r'"),
]


@pytest.mark.parametrize(("level", "patch", "message"), BAD)
def test_bad_input_names_the_key(level: str, patch: dict[str, object], message: str) -> None:
    rule = _rules()[0]
    data: dict[str, object] = {"labels": ["a", "b"], "rules": [rule]}
    if level == "rule":
        rule.update(patch)
    elif level == "top":
        data.update(patch)
    else:
        for key in patch:
            del rule[key]

    with pytest.raises(ConfigError) as info:
        parse_policy(data, "p")
    assert str(info.value).startswith(message)
    assert info.value.exit_code == 2


def test_duplicate_rule_names() -> None:
    data = {"labels": ["a"], "rules": _rules() + _rules()}

    with pytest.raises(ConfigError, match=r"^p: rules\[1\].name: duplicate rule name 'r'$"):
        parse_policy(data, "p")


@pytest.mark.parametrize("data", [None, [], "rules", 3])
def test_top_level_must_be_a_mapping(data: object) -> None:
    with pytest.raises(ConfigError, match=r"^p: expected a mapping, got "):
        parse_policy(data, "p")


def test_yaml_syntax_error_names_the_line(write) -> None:
    path = write("labels: [a, b]\nrules:\n  - name: r\n    match: {min_label: a\n")

    with pytest.raises(ConfigError) as info:
        load_policy(path)
    message = str(info.value)
    assert message.startswith(f"{path}: line 5, column 1: invalid YAML: ")


def test_yaml_bad_indentation_names_the_line(write) -> None:
    path = write("labels: [a]\nrules:\n  - name: r\n   window: 1m\n")

    with pytest.raises(ConfigError, match=r": line 4, column \d+: invalid YAML: "):
        load_policy(path)


def test_duplicate_yaml_key_names_the_line(write) -> None:
    text = MINIMAL_RULE.replace("    window: 1h\n", "    window: 1h\n    window: 90d\n")

    with pytest.raises(ConfigError, match=r"policy.yaml: line 7: duplicate key 'window'$"):
        load_policy(write(text))


def test_empty_file_is_an_error(write) -> None:
    with pytest.raises(ConfigError, match=r"policy.yaml: expected a mapping, got nothing$"):
        load_policy(write(""))


def test_missing_and_non_utf8_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read policy"):
        load_policy(tmp_path / "absent.yaml")
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"labels: [\xe9]\n")
    with pytest.raises(ConfigError, match=r"latin1.yaml: not UTF-8 text \(byte 9\)"):
        load_policy(bad)


def test_yaml_aliases_are_fine(write) -> None:
    text = """\
labels: &labels [a, b]
rules:
  - &base {name: one, match: {min_label: b}, group_by: [user], window: 1m,
           threshold: {files: 2}, severity: low}
  - {name: two, match: {min_label: a}, group_by: [host], window: 1m,
     threshold: {files: 2}, severity: low}
"""
    assert [r.name for r in load_policy(write(text)).rules] == ["one", "two"]


def test_policy_constructor_rejects_an_empty_rule_set() -> None:
    with pytest.raises(ValueError, match="no rules"):
        Policy("r", ("a",), ())


def _rules(**overrides: object) -> list[dict[str, object]]:
    rule: dict[str, object] = {
        "name": "r",
        "match": {"min_label": "a"},
        "group_by": ["user"],
        "window": "10m",
        "threshold": {"files": 3},
        "severity": "low",
    }
    rule.update(overrides)
    return [rule]


GOOD = """\
labels: [public, internal, confidential]
rules:
  - name: burst
    match: {min_label: confidential, destinations: [removable]}
    group_by: [user]
    window: 10m
    threshold: {files: 20}
    severity: high
  - name: slow
    match:
      min_label: confidential
      destinations: [removable, network_share]
    group_by: [user]
    window: 30d
    threshold:
      files: 30
      bytes: 5MiB
    severity: medium
"""


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("bytes: 5MiB", "bytes: lots",
         "line 17: rules[1].threshold.bytes: expected a size like 100MiB, got 'lots'"),
        ("[removable, network_share]", "[removable, floppy]",
         "line 12: rules[1].match.destinations[1]: expected one of"),
        ("    severity: medium\n", "", "line 9: rules[1]: missing key 'severity'"),
        ("rules:", "agents: {hash_rate: 1KiB}\nrules:",
         "line 2: agents.hash_rate: at least 64KiB"),
    ],
)  # fmt: skip
def test_a_bad_value_names_its_line_and_key(write, old: str, new: str, message: str) -> None:
    assert load_policy(write(GOOD)).rules[1].name == "slow"
    path = write(GOOD.replace(old, new, 1))
    with pytest.raises(ConfigError) as info:
        load_policy(path)
    assert str(info.value).startswith(f"{path}: {message}"), str(info.value)
