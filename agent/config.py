"""Agent configuration: `agent.yaml` parsed once, at the entry point, into frozen objects.

Every later stage receives these objects; nothing else reads the file or `os.environ`.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from agent.errors import ConfigError
from agent.events import DestinationClass, DeviceInfo

logger = logging.getLogger(__name__)

T = TypeVar("T")

LOGLEVEL_ENV = "EXFILWATCH_LOGLEVEL"
"""Environment variable that overrides `log_level`."""

DEFAULT_LEVELS = ("public", "internal", "confidential", "secret")
DEFAULT_XATTR = "user.exfilwatch.label"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$")
_XATTR_RE = re.compile(r"^(user|trusted|security)\.[^\s]+$")
_HOSTPORT_RE = re.compile(
    r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^\s:\[\]]+)):(?P<port>\d{1,5})$"
)


@dataclass(frozen=True)
class LabelsConfig:
    levels: tuple[str, ...] = DEFAULT_LEVELS
    """Label names, lowest sensitivity first: the position is the rank."""
    xattr: str = DEFAULT_XATTR
    """Extended attribute that carries a file's label at the source."""

    def rank(self, label: str) -> int:
        """Rank of `label` (higher is more sensitive); -1 for an unknown label."""
        try:
            return self.levels.index(label)
        except ValueError:
            return -1


@dataclass(frozen=True)
class PathRule:
    """Label every file whose absolute path matches `glob`.

    Matching is `fnmatch.fnmatchcase` on the absolute path bytes, so `*` also
    matches `/`: `**/board/**` and `*/board/*` mean the same thing. The first
    matching rule wins.
    """

    glob: str
    label: str


@dataclass(frozen=True)
class DestinationConfig:
    path: Path
    """Absolute directory watched (recursively) for copies landing in it."""
    destination_class: DestinationClass
    device: DeviceInfo | None = None
    """Identity of the medium, from the config for now (sysfs discovery comes later)."""


@dataclass(frozen=True)
class BatchConfig:
    max_events: int = 500
    max_bytes: int = 1024**2
    max_delay: float = 1.0
    """Seconds."""


@dataclass(frozen=True)
class SpoolConfig:
    max_bytes: int = 256 * 1024**2


@dataclass(frozen=True)
class HashingConfig:
    max_file_bytes: int = 2 * 1024**3
    """Files larger than this are never hashed (skipped and counted)."""


@dataclass(frozen=True)
class AgentConfig:
    state_dir: Path
    sensitive_roots: tuple[Path, ...]
    destinations: tuple[DestinationConfig, ...]
    host: str
    collector: str | None = None
    """HOST:PORT override; normally the address comes from the enrolment state."""
    labels: LabelsConfig = field(default_factory=LabelsConfig)
    path_rules: tuple[PathRule, ...] = ()
    batch: BatchConfig = field(default_factory=BatchConfig)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    hashing: HashingConfig = field(default_factory=HashingConfig)
    queue_size: int = 10_000
    log_level: str = "INFO"
    source: Path | None = None
    """The file this configuration was read from, for messages."""

    def destination_for(self, path: Path) -> DestinationConfig | None:
        """The configured destination whose directory is exactly `path`."""
        for dest in self.destinations:
            if dest.path == path:
                return dest
        return None


class _Reader:
    """Walks the parsed YAML, naming the key path in every error."""

    def __init__(self, filename: str, base: Path) -> None:
        self.filename = filename
        self.base = base

    def fail(self, key: str, message: str) -> ConfigError:
        where = f"{self.filename}: {key}" if key else self.filename
        return ConfigError(f"{where}: {message}")

    def mapping(self, value: object, key: str, allowed: set[str]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(key, "expected a mapping")
        for name in value:
            if not isinstance(name, str):
                raise self.fail(key, f"keys must be strings, got {name!r}")
            if name not in allowed:
                where = f"{key}.{name}" if key else name
                raise self.fail(
                    where, f"unknown key (expected one of {', '.join(sorted(allowed))})"
                )
        return value

    def string(self, value: object, key: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(key, "expected a non-empty string")
        return value

    def integer(self, value: object, key: str, *, minimum: int = 0) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, "expected an integer")
        if value < minimum:
            raise self.fail(key, f"expected an integer >= {minimum}")
        return value

    def size(self, value: object, key: str) -> int:
        """Bytes: an integer or a string such as `1MiB`, `256 MiB`, `2GiB`, `500kB`."""
        if isinstance(value, bool):
            raise self.fail(key, "expected a size (bytes, or e.g. 1MiB)")
        if isinstance(value, int):
            if value <= 0:
                raise self.fail(key, "expected a positive size")
            return value
        if isinstance(value, str):
            match = _SIZE_RE.match(value)
            if match and match.group(2).lower() in _SIZE_UNITS:
                size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])
                if size > 0:
                    return size
        raise self.fail(key, "expected a size (bytes, or e.g. 1MiB)")

    def duration(self, value: object, key: str) -> float:
        """Seconds: a number or a string such as `500ms`, `1s`, `2m`."""
        if isinstance(value, bool):
            raise self.fail(key, "expected a duration (seconds, or e.g. 500ms, 1s)")
        if isinstance(value, int | float):
            if value <= 0:
                raise self.fail(key, "expected a positive duration")
            return float(value)
        if isinstance(value, str):
            match = _DURATION_RE.match(value)
            if match:
                seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
                if seconds > 0:
                    return seconds
        raise self.fail(key, "expected a duration (seconds, or e.g. 500ms, 1s)")

    def path(self, value: object, key: str) -> Path:
        """A path; relative paths resolve against the config file's directory."""
        text = self.string(value, key)
        return (self.base / Path(text)).resolve()

    def sequence(
        self, value: object, key: str, item: Callable[[object, str], T], *, non_empty: bool
    ) -> tuple[T, ...]:
        if not isinstance(value, list):
            raise self.fail(key, "expected a list")
        if non_empty and not value:
            raise self.fail(key, "expected a non-empty list")
        return tuple(item(element, f"{key}[{i}]") for i, element in enumerate(value))

    def choice(self, value: object, key: str, choices: tuple[str, ...]) -> str:
        if not isinstance(value, str) or value not in choices:
            raise self.fail(key, f"expected one of {', '.join(choices)}")
        return value


_TOP_KEYS = {
    "state_dir",
    "collector",
    "host",
    "labels",
    "sensitive_roots",
    "path_rules",
    "destinations",
    "batch",
    "spool",
    "hashing",
    "queue_size",
    "log_level",
}


def load_config(path: Path, environ: Mapping[str, str], *, check_paths: bool = True) -> AgentConfig:
    """Read `path` (YAML) into a validated, frozen `AgentConfig`.

    Relative paths resolve against the directory of `path`. With `check_paths`
    (the default, used by `run` and `check-config`) every sensitive root and
    every destination must be an existing directory; `check_paths=False` only
    validates the structure, for example to load the shipped example on a
    machine without its directories. `EXFILWATCH_LOGLEVEL` in `environ`
    overrides `log_level`.
    """
    filename = path.name
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read configuration: {e}") from e
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{filename}: invalid YAML: {e}") from e
    if raw is None:
        raw = {}
    reader = _Reader(filename, path.parent.resolve())
    top = reader.mapping(raw, "", _TOP_KEYS)

    for required in ("state_dir", "sensitive_roots", "destinations"):
        if required not in top:
            raise reader.fail(required, "required key is missing")

    labels = _labels(reader, top.get("labels", {}))
    rules = reader.sequence(
        top.get("path_rules", []),
        "path_rules",
        lambda v, k: _path_rule(reader, v, k, labels),
        non_empty=False,
    )
    roots = reader.sequence(top["sensitive_roots"], "sensitive_roots", reader.path, non_empty=True)
    destinations = reader.sequence(
        top["destinations"], "destinations", lambda v, k: _destination(reader, v, k), non_empty=True
    )
    if check_paths:
        for i, root in enumerate(roots):
            if not root.is_dir():
                raise reader.fail(
                    f"sensitive_roots[{i}]",
                    f"sensitive root {root} does not exist or is not a directory",
                )
        for i, dest in enumerate(destinations):
            if not dest.path.is_dir():
                raise reader.fail(
                    f"destinations[{i}].path", f"{dest.path} does not exist or is not a directory"
                )

    collector = None
    if top.get("collector") is not None:
        collector = reader.string(top["collector"], "collector")
        match = _HOSTPORT_RE.match(collector)
        if not match or not 0 < int(match.group("port")) < 65536:
            raise reader.fail("collector", "expected HOST:PORT")

    host = (
        reader.string(top["host"], "host") if top.get("host") is not None else socket.gethostname()
    )

    log_level = "INFO"
    if "log_level" in top:
        log_level = reader.choice(str(top["log_level"]).upper(), "log_level", LOG_LEVELS)
    if environ.get(LOGLEVEL_ENV):
        log_level = reader.choice(environ[LOGLEVEL_ENV].upper(), LOGLEVEL_ENV, LOG_LEVELS)

    return AgentConfig(
        state_dir=reader.path(top["state_dir"], "state_dir"),
        sensitive_roots=roots,
        destinations=destinations,
        host=host,
        collector=collector,
        labels=labels,
        path_rules=rules,
        batch=_batch(reader, top.get("batch", {})),
        spool=_spool(reader, top.get("spool", {})),
        hashing=_hashing(reader, top.get("hashing", {})),
        queue_size=reader.integer(top.get("queue_size", 10_000), "queue_size", minimum=1),
        log_level=log_level,
        source=path.resolve(),
    )


def _labels(reader: _Reader, value: object) -> LabelsConfig:
    section = reader.mapping(value, "labels", {"levels", "xattr"})
    levels: tuple[str, ...] = DEFAULT_LEVELS
    if "levels" in section:
        levels = reader.sequence(section["levels"], "labels.levels", reader.string, non_empty=True)
        if len(set(levels)) != len(levels):
            raise reader.fail("labels.levels", "levels must be unique")
    xattr = DEFAULT_XATTR
    if "xattr" in section:
        xattr = reader.string(section["xattr"], "labels.xattr")
        if not _XATTR_RE.match(xattr):
            raise reader.fail(
                "labels.xattr", "expected an attribute name such as user.exfilwatch.label"
            )
    return LabelsConfig(levels=levels, xattr=xattr)


def _path_rule(reader: _Reader, value: object, key: str, labels: LabelsConfig) -> PathRule:
    rule = reader.mapping(value, key, {"glob", "label"})
    for required in ("glob", "label"):
        if required not in rule:
            raise reader.fail(f"{key}.{required}", "required key is missing")
    glob = reader.string(rule["glob"], f"{key}.glob")
    label = reader.choice(rule["label"], f"{key}.label", labels.levels)
    return PathRule(glob=glob, label=label)


def _destination(reader: _Reader, value: object, key: str) -> DestinationConfig:
    dest = reader.mapping(value, key, {"path", "class", "device"})
    for required in ("path", "class"):
        if required not in dest:
            raise reader.fail(f"{key}.{required}", "required key is missing")
    path = reader.path(dest["path"], f"{key}.path")
    klass = DestinationClass(
        reader.choice(dest["class"], f"{key}.class", tuple(c.value for c in DestinationClass))
    )
    device = None
    if dest.get("device") is not None:
        dev = reader.mapping(dest["device"], f"{key}.device", {"vendor", "model", "serial"})
        fields = {name: reader.string(dev[name], f"{key}.device.{name}") for name in dev}
        device = DeviceInfo(mount_point=os.fsencode(path), **fields)
    return DestinationConfig(path=path, destination_class=klass, device=device)


def _batch(reader: _Reader, value: object) -> BatchConfig:
    section = reader.mapping(value, "batch", {"max_events", "max_bytes", "max_delay"})
    defaults = BatchConfig()
    return BatchConfig(
        max_events=reader.integer(
            section.get("max_events", defaults.max_events), "batch.max_events", minimum=1
        ),
        max_bytes=reader.size(section.get("max_bytes", defaults.max_bytes), "batch.max_bytes"),
        max_delay=reader.duration(section.get("max_delay", defaults.max_delay), "batch.max_delay"),
    )


def _spool(reader: _Reader, value: object) -> SpoolConfig:
    section = reader.mapping(value, "spool", {"max_bytes"})
    return SpoolConfig(
        max_bytes=reader.size(section.get("max_bytes", SpoolConfig.max_bytes), "spool.max_bytes")
    )


def _hashing(reader: _Reader, value: object) -> HashingConfig:
    section = reader.mapping(value, "hashing", {"max_file_bytes"})
    return HashingConfig(
        max_file_bytes=reader.size(
            section.get("max_file_bytes", HashingConfig.max_file_bytes), "hashing.max_file_bytes"
        )
    )
