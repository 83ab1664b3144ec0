"""Alert policy: the volume rules `collector.thresholds` applies to stored events.

Loaded once at the collector's entry point into frozen, validated objects; errors name the key path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Final, TypeVar

import yaml

from collector.detection.baseline import BaselineRule
from collector.detection.cumulative import CumulativeRule, Measure, Tier
from collector.detection.engine import LongRule, Selector
from collector.detection.risk import RiskConfig
from collector.errors import ConfigError
from collector.models import Severity

_NS_PER_S: Final = 1_000_000_000
MAX_WINDOW_NS: Final = 90 * 86_400 * _NS_PER_S
"""Longest sliding window a rule may use (90d)."""

_DURATION_UNITS: Final = MappingProxyType(
    {"d": 86_400 * _NS_PER_S, "h": 3_600 * _NS_PER_S, "m": 60 * _NS_PER_S, "s": _NS_PER_S}
)
_SIZE_UNITS: Final = MappingProxyType(
    {"GiB": 1 << 30, "MiB": 1 << 20, "KiB": 1 << 10, "GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
)
_DURATION_RE: Final = re.compile(r"(\d+)([smhd])")
_SIZE_RE: Final = re.compile(r"(\d+) ?(B|[KMG]i?B)?")
_T = TypeVar("_T")


class Dimension(StrEnum):
    """What a rule groups matching events by."""

    USER = "user"
    HOST = "host"
    DESTINATION = "destination"


class DestinationClass(StrEnum):
    """Where a copy landed, as the agent classifies its destination folders."""

    REMOVABLE = "removable"
    NETWORK_SHARE = "network_share"
    CLOUD_SYNC = "cloud_sync"
    LOCAL = "local"


class Action(StrEnum):
    """Agent actions a rule can count (those that move a labelled file's content)."""

    COPY = "copy"
    MOVE = "move"
    READ = "read"
    WRITE = "write"
    DELETE = "delete"
    RENAME = "rename"


ALL_DESTINATIONS: Final = frozenset(DestinationClass)
DEFAULT_ACTIONS: Final = frozenset({Action.COPY, Action.MOVE})


def parse_duration(text: str) -> int:
    """`30s`, `10m`, `24h`, `30d` -> nanoseconds. Raises ValueError."""
    m = _DURATION_RE.fullmatch(text)
    if m is None:
        raise ValueError(f"expected a duration like 10m (units s, m, h, d), got {text!r}")
    return int(m.group(1)) * _DURATION_UNITS[m.group(2)]


def format_duration(ns: int) -> str:
    """Nanoseconds -> the shortest spelling `parse_duration` reads back, e.g. `10m`."""
    for unit, size in _DURATION_UNITS.items():
        if ns % size == 0:
            return f"{ns // size}{unit}"
    return f"{ns / _NS_PER_S:g}s"


def parse_size(text: str) -> int:
    """`100MiB`, `1 GB`, `512B`, `4096` -> bytes. Raises ValueError."""
    m = _SIZE_RE.fullmatch(text)
    if m is None:
        raise ValueError(f"expected a size like 100MiB, got {text!r}")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2) or "B"]


def format_size(n: int) -> str:
    """Bytes -> the exact spelling in the largest unit that divides them, e.g. `100 MiB`."""
    for unit, size in _SIZE_UNITS.items():
        if n and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} B"


@dataclass(frozen=True)
class Threshold:
    """A window crosses when either criterion is met (inclusive), whichever comes first."""

    files: int | None = None
    """Matching events in the window; None when not a criterion."""
    bytes: int | None = None
    """Sum of the matching events' sizes in the window; None when not a criterion."""

    def __post_init__(self) -> None:
        if self.files is None and self.bytes is None:
            raise ValueError("needs at least one of files, bytes")
        if any(v is not None and v <= 0 for v in (self.files, self.bytes)):
            raise ValueError("files and bytes must be > 0")

    def describe(self) -> str:
        """E.g. `20 files / 100 MiB`."""
        parts = [] if self.files is None else [f"{self.files} files"]
        if self.bytes is not None:
            parts.append(format_size(self.bytes))
        return " / ".join(parts)


@dataclass(frozen=True)
class Match:
    """Which events a rule counts."""

    min_label: str
    """Events labelled at this rank or above match; unlabelled or unlisted labels never do."""
    destinations: frozenset[DestinationClass] = ALL_DESTINATIONS
    actions: frozenset[Action] = DEFAULT_ACTIONS


@dataclass(frozen=True)
class Rule:
    """One volume rule: matching events per group, in a sliding event-time window."""

    name: str
    match: Match
    group_by: tuple[Dimension, ...]
    """Group key dimensions, in key order."""
    window_ns: int
    threshold: Threshold
    severity: Severity

    def __post_init__(self) -> None:
        if not self.name or not self.name.isprintable():
            raise ValueError("a rule name must be non-empty printable text")
        if not self.group_by or len(set(self.group_by)) != len(self.group_by):
            raise ValueError("group_by must be non-empty without repeats")
        if not 0 < self.window_ns <= MAX_WINDOW_NS:
            raise ValueError("window must be > 0 and at most 90d")

    def describe(self) -> str:
        """E.g. `20 files / 100 MiB in 10m`."""
        return f"{self.threshold.describe()} in {format_duration(self.window_ns)}"


@dataclass(frozen=True)
class AgentSettings:
    """How agents stay in touch: served to them in the signed policy."""

    heartbeat_ns: int = 30 * _NS_PER_S
    silent_after_ns: int = 5 * 60 * _NS_PER_S
    """An agent heard from neither by heartbeat nor upload for this long raises an alert."""
    refresh_ns: int = 5 * 60 * _NS_PER_S
    """How often agents ask for a newer policy."""
    hash_rate: int = 0
    """Bytes/s every agent's hashing stays under (0: each agent's own hashing.max_rate)."""

    def __post_init__(self) -> None:
        if not 0 < self.heartbeat_ns < self.silent_after_ns:
            raise ValueError("agents.heartbeat must be shorter than agents.silent_after")
        if not 0 < self.refresh_ns <= 86400 * _NS_PER_S:
            raise ValueError("agents.policy_refresh must be between 1s and 1d")


@dataclass(frozen=True)
class Policy:
    """The whole policy: labels in ascending rank and at least one rule."""

    revision: str
    labels: tuple[str, ...]
    rules: tuple[Rule, ...]
    agents: AgentSettings = field(default_factory=AgentSettings)
    long_rules: tuple[LongRule, ...] = ()
    """Cumulative, baseline and risk rules (`long_rules:`), evaluated per user."""
    document: bytes = field(default=b"", repr=False, compare=False)
    """The file as written, served to agents inside the signed policy."""
    _ranks: Mapping[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ranks = MappingProxyType({label: rank for rank, label in enumerate(self.labels)})
        if not self.labels or len(ranks) != len(self.labels) or "" in ranks:
            raise ValueError("labels must be non-empty, unique, non-empty strings")
        if not self.rules:
            raise ValueError("no rules: an empty rule set would never alert")
        names = [rule.name for rule in self.rules] + [rule.name for rule in self.long_rules]
        if len(set(names)) != len(names):
            raise ValueError("rule names must be unique")
        for rule in self.rules:
            if rule.match.min_label not in ranks:
                raise ValueError(f"rule {rule.name!r}: unknown min_label {rule.match.min_label!r}")
        object.__setattr__(self, "_ranks", ranks)

    def label_rank(self, name: str) -> int | None:
        """Rank of a label (0 = lowest), or None when the policy does not list it."""
        return self._ranks.get(name)

    @property
    def max_window_ns(self) -> int:
        """The longest rule window: how much event history a restart must replay."""
        return max(rule.window_ns for rule in self.rules)


def load_policy(path: Path) -> Policy:
    """Read and validate a policy file. Raises ConfigError naming the file and key or line."""
    source = str(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{source}: cannot read policy: {e.strerror or e}") from e
    return policy_from_document(raw, source)


def policy_from_document(raw: bytes, source: str) -> Policy:
    """`load_policy` of a file's bytes (`source` names it in errors)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{source}: not UTF-8 text (byte {e.start})") from e
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        _reject_duplicate_keys(root, source)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(f"{source}: {where}invalid YAML: {e.problem or e.context}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: invalid YAML: {e}") from e
    policy = parse_policy(
        data,
        source,
        default_revision=hashlib.sha256(raw).hexdigest()[:12],
        line_of=lambda key: _line_of(root, key),
    )
    return dataclasses.replace(policy, document=raw)


def parse_policy(
    data: object,
    source: str,
    *,
    default_revision: str | None = None,
    line_of: Callable[[str], int | None] = lambda key: None,
) -> Policy:
    """Validate already-parsed YAML. Without `revision` in the data, use `default_revision`,
    else the first 12 hex digits of a sha256 over the data's canonical JSON. An error names
    the key, and the line `line_of` finds for it (`load_policy`: the file's)."""
    try:
        return _parse_policy(data, default_revision)
    except _Invalid as e:
        line = line_of(e.path) if e.path else None
        where = f"{source}: " + (f"line {line}: " if line else "")
        raise ConfigError(where + (f"{e.path}: " if e.path else "") + e.message) from e


_KEY_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def _line_of(root: yaml.Node | None, key: str) -> int | None:
    """The line (1-based) of a key such as `rules[0].threshold.bytes` in the composed file;
    for a key that is missing there, the line of the nearest one above it."""
    node, line = root, None
    for name, index in _KEY_PART.findall(key):
        found: yaml.Node | None = None
        if name and isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode) and k.value == name:
                    found, line = v, k.start_mark.line + 1
                    break
        elif index and isinstance(node, yaml.SequenceNode) and int(index) < len(node.value):
            found = node.value[int(index)]
            line = found.start_mark.line + 1
        if found is None:
            break
        node = found
    return line


class _Invalid(Exception):
    def __init__(self, path: str, message: str) -> None:
        super().__init__(path, message)
        self.path = path
        self.message = message


def _parse_policy(data: object, default_revision: str | None) -> Policy:
    top = _mapping(
        data, "", required=("labels", "rules"), optional=("revision", "agents", "long_rules")
    )
    revision = _text(top["revision"], "revision") if "revision" in top else default_revision
    labels = _list(top["labels"], "labels")
    if not labels:
        raise _Invalid("labels", "expected at least one label")
    ranks: dict[str, int] = {}
    for i, item in enumerate(labels):
        label = _text(item, f"labels[{i}]")
        if label in ranks:
            raise _Invalid(f"labels[{i}]", f"duplicate label {label!r}")
        ranks[label] = i
    items = _list(top["rules"], "rules")
    if not items:
        raise _Invalid("rules", "no rules: an empty rule set would never alert; add one")
    rules: list[Rule] = []
    for i, item in enumerate(items):
        rule = _parse_rule(item, f"rules[{i}]", ranks)
        if any(r.name == rule.name for r in rules):
            raise _Invalid(f"rules[{i}].name", f"duplicate rule name {rule.name!r}")
        rules.append(rule)
    if revision is None:
        canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
        revision = hashlib.sha256(canonical.encode()).hexdigest()[:12]
    agents = _parse_agents(top["agents"], "agents") if "agents" in top else AgentSettings()
    long_rules: list[LongRule] = []
    for i, item in enumerate(_list(top.get("long_rules", []), "long_rules")):
        long_rule = _parse_long_rule(item, f"long_rules[{i}]", ranks)
        if long_rule.name in {r.name for r in rules} | {r.name for r in long_rules}:
            raise _Invalid(f"long_rules[{i}].name", f"duplicate rule name {long_rule.name!r}")
        long_rules.append(long_rule)
    return _build(
        "", lambda: Policy(revision, tuple(ranks), tuple(rules), agents, tuple(long_rules))
    )


def _parse_agents(data: object, path: str) -> AgentSettings:
    m = _mapping(data, path, optional=("heartbeat", "silent_after", "policy_refresh", "hash_rate"))
    defaults = AgentSettings()
    values = {
        "heartbeat_ns": ("heartbeat", defaults.heartbeat_ns),
        "silent_after_ns": ("silent_after", defaults.silent_after_ns),
        "refresh_ns": ("policy_refresh", defaults.refresh_ns),
    }
    kwargs = {
        field_name: _convert(m[key], f"{path}.{key}", parse_duration, "a duration like 30s")
        if key in m
        else default
        for field_name, (key, default) in values.items()
    }
    hash_rate, raw = 0, m.get("hash_rate")
    if isinstance(raw, int) and not isinstance(raw, bool):
        raw = str(raw)  # bytes as a plain number
    if raw not in (None, "0"):
        hash_rate = _convert(raw, f"{path}.hash_rate", parse_size, "a size like 50MiB")
        if hash_rate < 64 * 1024:
            raise _Invalid(f"{path}.hash_rate", "at least 64KiB (per second), or 0 for none")
    return _build(path, lambda: AgentSettings(**kwargs, hash_rate=hash_rate))


def _parse_rule(data: object, path: str, ranks: Mapping[str, int]) -> Rule:
    keys = ("name", "match", "group_by", "window", "threshold", "severity")
    m = _mapping(data, path, required=keys)
    name = _text(m["name"], f"{path}.name")
    match = _parse_match(m["match"], f"{path}.match", ranks)
    group_by = _choices(m["group_by"], f"{path}.group_by", Dimension)
    window_ns = _convert(m["window"], f"{path}.window", parse_duration, "a duration like 10m")
    if not 0 < window_ns <= MAX_WINDOW_NS:
        raise _Invalid(f"{path}.window", f"must be > 0 and at most 90d, got {m['window']!r}")
    threshold = _parse_threshold(m["threshold"], f"{path}.threshold")
    severity = _choice(m["severity"], f"{path}.severity", Severity)
    return _build(path, lambda: Rule(name, match, group_by, window_ns, threshold, severity))


_LONG_COMMON = ("name", "kind", "match")
_CUMULATIVE_KEYS = ("measure", "window", "tiers")
_BASELINE_KEYS = (
    "bucket", "history", "multiplier", "baseline_min", "floor", "min_history_active_days",
    "winsor_quantile", "prior_weight_days", "peer_min_size", "severity",
)  # fmt: skip
_RISK_KEYS = (
    "base_by_label", "destination_factor", "watchlist_factor", "indicators", "dedup",
    "half_life", "max_age", "tiers", "rearm_below", "off_hours",
)  # fmt: skip
_INDICATORS = ("first_seen_device", "off_hours", "coverage_gap_near", "staged_before_copy")
_DAY_NS: Final = 86_400 * _NS_PER_S


def _parse_long_rule(data: object, path: str, ranks: Mapping[str, int]) -> LongRule:
    """One of `long_rules`: `kind` is cumulative, baseline or risk (DETECTION-RULES §1)."""
    head = _mapping(
        data, path, required=_LONG_COMMON, optional=_CUMULATIVE_KEYS + _BASELINE_KEYS + _RISK_KEYS
    )
    name = _text(head["name"], f"{path}.name")
    match = _parse_match(head["match"], f"{path}.match", ranks)
    selector = Selector(
        ranks[match.min_label],
        frozenset(d.value for d in match.destinations),
        frozenset(a.value for a in match.actions),
    )
    kind = head["kind"]
    if kind == "cumulative":
        m = _mapping(data, path, required=(*_LONG_COMMON, *_CUMULATIVE_KEYS))
        measure = _choice(m["measure"], f"{path}.measure", Measure)
        window = _duration(m["window"], f"{path}.window")
        if window > MAX_WINDOW_NS:
            raise _Invalid(f"{path}.window", "must be at most 90d")
        tiers = _tiers(m["tiers"], f"{path}.tiers", sizes=measure is Measure.BYTES)
        core = _build(path, lambda: CumulativeRule(name, measure, window, tuple(
            Tier(sev, int(limit)) for sev, limit in tiers)))  # fmt: skip
        return LongRule(name, selector, cumulative=core)
    if kind == "baseline":
        m = _mapping(data, path, required=_LONG_COMMON, optional=_BASELINE_KEYS)
        defaults = BaselineRule(name)
        bucket = _duration(m.get("bucket", "7d"), f"{path}.bucket")
        history = _duration(m.get("history", "56d"), f"{path}.history")
        if bucket % _DAY_NS or history % _DAY_NS:
            raise _Invalid(f"{path}.bucket", "bucket and history must be whole days")

        def num(key: str, *, zero: bool = False) -> float:
            return _number(m.get(key, getattr(defaults, key)), f"{path}.{key}", zero=zero)

        def count(key: str) -> int:
            return _positive(m.get(key, getattr(defaults, key)), f"{path}.{key}")

        core_b = _build(
            path,
            lambda: BaselineRule(
                name,
                bucket_days=bucket // _DAY_NS,
                history_days=history // _DAY_NS,
                multiplier=num("multiplier"),
                baseline_min=num("baseline_min", zero=True),
                floor=count("floor"),
                min_history_active_days=count("min_history_active_days"),
                winsor_quantile=num("winsor_quantile"),
                prior_weight_days=count("prior_weight_days"),
                peer_min_size=count("peer_min_size"),
            ),
        )
        severity = _choice(m.get("severity", "medium"), f"{path}.severity", Severity)
        return LongRule(name, selector, baseline=core_b, baseline_severity=severity.value)
    if kind == "risk":
        m = _mapping(
            data,
            path,
            required=(*_LONG_COMMON, "base_by_label", "destination_factor", "tiers"),
            optional=_RISK_KEYS,
        )
        base = _factors(m["base_by_label"], f"{path}.base_by_label")
        for label in base:
            if label not in ranks:
                raise _Invalid(f"{path}.base_by_label.{label}", "not one of the policy's labels")
        dest = _factors(m["destination_factor"], f"{path}.destination_factor")
        for cls in dest:
            _choice(cls, f"{path}.destination_factor.{cls}", DestinationClass)
        points: dict[str, float] = {}
        caps: dict[str, int] = {}
        indicators = _mapping(m.get("indicators", {}), f"{path}.indicators", optional=_INDICATORS)
        for key, value in indicators.items():
            where = f"{path}.indicators.{key}"
            if isinstance(value, dict):
                spec = _mapping(value, where, required=("points",), optional=("cap_per_day",))
                points[key] = _number(spec["points"], f"{where}.points")
                if "cap_per_day" in spec:
                    caps[key] = _positive(spec["cap_per_day"], f"{where}.cap_per_day")
            else:
                points[key] = _number(value, where)
        half = m.get("half_life", "14d")
        half_life = None if half == "none" else _duration(half, f"{path}.half_life")
        tiers = _tiers(m["tiers"], f"{path}.tiers", sizes=False)
        hours = [h for h in _list(m.get("off_hours", [7, 19]), f"{path}.off_hours")
                 if isinstance(h, int) and not isinstance(h, bool) and 0 <= h <= 24]  # fmt: skip
        if len(hours) != 2 or len(_list(m.get("off_hours", [7, 19]), f"{path}.off_hours")) != 2:
            raise _Invalid(f"{path}.off_hours", "expected [start hour, end hour] of working hours")
        config = _build(path, lambda: RiskConfig(
            base_by_label=base,
            destination_factor=dest,
            tiers=tuple(tiers),
            watchlist_factor=_factors(m.get("watchlist_factor", {}), f"{path}.watchlist_factor"),
            indicator_points=points,
            indicator_cap_per_day=caps,
            dedup_ns=_duration(m.get("dedup", "24h"), f"{path}.dedup"),
            half_life_ns=half_life,
            max_age_ns=_duration(m.get("max_age", "90d"), f"{path}.max_age"),
            rearm_below=_number(m.get("rearm_below", 0.8), f"{path}.rearm_below"),
        ))  # fmt: skip
        return LongRule(name, selector, risk=config, off_hours=(hours[0], hours[1]))
    raise _Invalid(f"{path}.kind", f"expected one of cumulative, baseline, risk, got {_got(kind)}")


def _duration(data: object, path: str) -> int:
    return _convert(data, path, parse_duration, "a duration like 30d")


def _number(data: object, path: str, *, zero: bool = False) -> float:
    if (
        isinstance(data, bool)
        or not isinstance(data, int | float)
        or data < 0
        or (data == 0 and not zero)
    ):
        raise _Invalid(path, f"expected a number {'>=' if zero else '>'} 0, got {_got(data)}")
    return float(data)


def _factors(data: object, path: str) -> dict[str, float]:
    m = _mapping(data, path, optional=tuple(str(k) for k in data) if isinstance(data, dict) else ())
    return {key: _number(value, f"{path}.{key}", zero=True) for key, value in m.items()}


def _tiers(data: object, path: str, *, sizes: bool) -> list[tuple[str, float]]:
    """`{medium: 15, high: 30}` (sizes like 2GiB allowed for byte measures), ascending."""
    m = _mapping(data, path, optional=tuple(s.value for s in Severity))
    if not m:
        raise _Invalid(path, "expected at least one tier, e.g. {medium: 15}")
    tiers: list[tuple[str, float]] = []
    for severity, value in m.items():
        where = f"{path}.{severity}"
        if sizes and isinstance(value, str):
            tiers.append((severity, float(_convert(value, where, parse_size, "a size"))))
        else:
            tiers.append((severity, _number(value, where)))
    order = [s.value for s in Severity]
    tiers.sort(key=lambda t: order.index(t[0]))
    limits = [limit for _, limit in tiers]
    if limits != sorted(set(limits)):
        raise _Invalid(path, "a higher severity needs a higher threshold")
    return tiers


def _parse_match(data: object, path: str, ranks: Mapping[str, int]) -> Match:
    m = _mapping(data, path, required=("min_label",), optional=("destinations", "actions"))
    min_label = _text(m["min_label"], f"{path}.min_label")
    if min_label not in ranks:
        known = ", ".join(ranks)
        raise _Invalid(f"{path}.min_label", f"unknown label {min_label!r} (labels: {known})")
    destinations = ALL_DESTINATIONS
    if "destinations" in m:
        destinations = frozenset(
            _choices(m["destinations"], f"{path}.destinations", DestinationClass)
        )
    actions = DEFAULT_ACTIONS
    if "actions" in m:
        actions = frozenset(_choices(m["actions"], f"{path}.actions", Action))
    return Match(min_label, destinations, actions)


def _parse_threshold(data: object, path: str) -> Threshold:
    m = _mapping(data, path, optional=("files", "bytes"))
    files = None if "files" not in m else _positive(m["files"], f"{path}.files")
    size = None
    if "bytes" in m:
        raw = m["bytes"]
        if isinstance(raw, int):
            size = _positive(raw, f"{path}.bytes")
        else:
            size = _convert(raw, f"{path}.bytes", parse_size, "a size like 100MiB")
        if size <= 0:
            raise _Invalid(f"{path}.bytes", f"must be > 0, got {raw!r}")
    return _build(path, lambda: Threshold(files, size))


def _build(path: str, make: Callable[[], _T]) -> _T:
    """Run a constructor; its invariant errors become errors at `path`."""
    try:
        return make()
    except ValueError as e:
        raise _Invalid(path, str(e)) from e


def _got(value: object) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _mapping(
    data: object, path: str, *, required: tuple[str, ...] = (), optional: tuple[str, ...] = ()
) -> dict[str, object]:
    if not isinstance(data, dict):
        raise _Invalid(path, f"expected a mapping, got {_got(data)}")
    allowed = required + optional
    for key in data:
        if key not in allowed:
            where = f"{path}.{key}" if path else str(key)
            raise _Invalid(where, f"unknown key (expected one of {', '.join(allowed)})")
    for key in required:
        if key not in data:
            raise _Invalid(path, f"missing key {key!r}")
    return {str(k): v for k, v in data.items()}


def _list(data: object, path: str) -> list[object]:
    if not isinstance(data, list):
        raise _Invalid(path, f"expected a list, got {_got(data)}")
    return data


def _text(data: object, path: str) -> str:
    if not isinstance(data, str) or not data or not data.isprintable():
        raise _Invalid(path, f"expected non-empty printable text, got {_got(data)}")
    return data


def _positive(data: object, path: str) -> int:
    if isinstance(data, bool) or not isinstance(data, int) or data <= 0:
        raise _Invalid(path, f"expected an integer > 0, got {_got(data)}")
    return data


def _convert(data: object, path: str, parse: Callable[[str], int], expected: str) -> int:
    if not isinstance(data, str):
        raise _Invalid(path, f"expected {expected}, got {_got(data)}")
    try:
        return parse(data)
    except ValueError as e:
        raise _Invalid(path, str(e)) from e


_E = TypeVar("_E", bound=StrEnum)


def _choice(data: object, path: str, kind: type[_E]) -> _E:
    if isinstance(data, str) and data in kind.__members__.values():
        return kind(data)
    options = ", ".join(member.value for member in kind)
    raise _Invalid(path, f"expected one of {options}, got {_got(data)}")


def _choices(data: object, path: str, kind: type[_E]) -> tuple[_E, ...]:
    items = _list(data, path)
    if not items:
        raise _Invalid(path, "expected at least one entry (omit the key for the default)")
    out: list[_E] = []
    for i, item in enumerate(items):
        choice = _choice(item, f"{path}[{i}]", kind)
        if choice in out:
            raise _Invalid(f"{path}[{i}]", f"repeated {choice.value!r}")
        out.append(choice)
    return tuple(out)


def _reject_duplicate_keys(root: yaml.Node | None, source: str) -> None:
    """safe_load keeps the last of two equal keys silently; a policy must not."""
    seen: set[int] = set()
    stack = [] if root is None else [root]
    while stack:
        node = stack.pop()
        if id(node) in seen:  # aliases may share or even nest nodes
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            keys: set[object] = set()
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.value in keys:
                    line = key.start_mark.line + 1 if key.start_mark else "?"
                    raise ConfigError(f"{source}: line {line}: duplicate key {key.value!r}")
                keys.add(key.value if isinstance(key, yaml.ScalarNode) else id(key))
                stack.extend((key, value))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
