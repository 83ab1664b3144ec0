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

from agent.archive import ArchiveLimits
from agent.content import ContentConfig, normalise_guid
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
    content: ContentConfig = field(default_factory=ContentConfig)
    """Labels read from file content (MIP metadata, markers, card numbers); off by default."""

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
    """Identity of the medium: from the config, or found by agent.destinations (sysfs)."""


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
    max_rate: int = 0
    """Bytes per second all hashing may read together (index, copies, archives); 0: no cap."""


@dataclass(frozen=True)
class ArchivesConfig:
    """Zip and tar files written to destinations: their members are hashed (agent.archive)."""

    enabled: bool = True
    limits: ArchiveLimits = field(default_factory=ArchiveLimits)


@dataclass(frozen=True)
class RemovableConfig:
    """Mounts to treat as removable media besides those found on the USB bus (issue 3)."""

    mount_points: tuple[str, ...] = ()
    """Mount points, or fnmatch globs over them (`/media/*/*`)."""
    devices: tuple[str, ...] = ()
    """A USB serial, a filesystem UUID, or a device name (`loop0`, `/dev/sdc1`)."""


@dataclass(frozen=True)
class CloudSyncConfig:
    detect: bool = True
    """Look for OneDrive, Dropbox, Google Drive, iCloud, Nextcloud folders in every home."""
    homes: Path = Path("/home")
    """The folder holding the homes (one subfolder per user)."""
    folders: tuple[Path, ...] = ()
    """More sync folders; watched when they exist."""


@dataclass(frozen=True)
class InotifyConfig:
    raise_watch_limit: bool = False
    """When the watch limit is hit, raise fs.inotify.max_user_watches (root only)."""
    max_user_watches: int = 524_288
    """The value to raise it to."""


@dataclass(frozen=True)
class AccessConfig:
    """File access events besides copies: reads of labelled files (Linux), folded (issue 3)."""

    reads: bool = True
    """Report reads (opened, then closed without writing) of labelled files."""
    fold_interval: float = 60.0
    """Seconds during which repeated reads of one file by one process and user are one event
    (reported at once) plus one event carrying the count of the repeats."""
    exempt_executables: tuple[bytes, ...] = ()
    """Absolute paths of programs whose reads are not reported (backup agents, indexers)."""
    off_for_labels: tuple[str, ...] = ()
    """Labels whose files' reads are not reported."""
    off_for_paths: tuple[str, ...] = ()
    """fnmatch globs over absolute paths (`*` matches `/` too) whose reads are not reported."""


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
    archives: ArchivesConfig = field(default_factory=ArchivesConfig)
    access: AccessConfig = field(default_factory=AccessConfig)
    removable: RemovableConfig = field(default_factory=RemovableConfig)
    cloud_sync: CloudSyncConfig = field(default_factory=CloudSyncConfig)
    follow_mounts: bool = True
    """Watch removable and network mounts as they come and go (agent.destinations)."""
    inotify: InotifyConfig = field(default_factory=InotifyConfig)
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

    def boolean(self, value: object, key: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(key, "expected true or false")
        return value

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
    "archives",
    "access",
    "removable",
    "cloud_sync",
    "follow_mounts",
    "inotify",
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
        archives=_archives(reader, top.get("archives", {})),
        access=_access(reader, top.get("access", {}), labels),
        removable=_removable(reader, top.get("removable", {})),
        cloud_sync=_cloud_sync(reader, top.get("cloud_sync", {})),
        follow_mounts=reader.boolean(top.get("follow_mounts", True), "follow_mounts"),
        inotify=_inotify(reader, top.get("inotify", {})),
        queue_size=reader.integer(top.get("queue_size", 10_000), "queue_size", minimum=1),
        log_level=log_level,
        source=path.resolve(),
    )


def _labels(reader: _Reader, value: object) -> LabelsConfig:
    section = reader.mapping(
        value,
        "labels",
        {"levels", "xattr", "mip", "mip_names", "markers", "card_numbers", "scan_bytes"},
    )
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
    return LabelsConfig(levels=levels, xattr=xattr, content=_content(reader, section, levels))


_MAX_SCAN_BYTES = 16 * 1024**2


def _content(reader: _Reader, section: dict[str, Any], levels: tuple[str, ...]) -> ContentConfig:
    """`labels.mip`, `mip_names`, `markers`, `card_numbers`, `scan_bytes` (agent.content)."""
    mip: dict[str, str] = {}
    for guid, label in _table(reader, section.get("mip", {}), "labels.mip").items():
        key = f"labels.mip.{guid}"
        norm = normalise_guid(guid)
        if norm is None:
            raise reader.fail(
                key, "expected a label GUID, e.g. 2096f6a2-d2f7-48be-b329-b73aaa526e5d"
            )
        mip[norm] = reader.choice(label, key, levels)
    names = {
        name: reader.choice(label, f"labels.mip_names.{name}", levels)
        for name, label in _table(reader, section.get("mip_names", {}), "labels.mip_names").items()
    }
    markers = reader.sequence(
        section.get("markers", []),
        "labels.markers",
        lambda v, k: _marker(reader, v, k, levels),
        non_empty=False,
    )
    card_label, min_matches = None, 1
    if section.get("card_numbers") is not None:
        cards = reader.mapping(
            section["card_numbers"], "labels.card_numbers", {"label", "min_matches"}
        )
        if "label" not in cards:
            raise reader.fail("labels.card_numbers.label", "required key is missing")
        card_label = reader.choice(cards["label"], "labels.card_numbers.label", levels)
        min_matches = reader.integer(
            cards.get("min_matches", 1), "labels.card_numbers.min_matches", minimum=1
        )
    scan_bytes = reader.size(
        section.get("scan_bytes", ContentConfig.scan_bytes), "labels.scan_bytes"
    )
    if scan_bytes > _MAX_SCAN_BYTES:
        raise reader.fail("labels.scan_bytes", "expected at most 16MiB")
    return ContentConfig(
        mip=mip,
        mip_names=names,
        markers=markers,
        card_number_label=card_label,
        card_number_min_matches=min_matches,
        scan_bytes=scan_bytes,
    )


def _table(reader: _Reader, value: object, key: str) -> dict[str, object]:
    """A free-form mapping with non-empty string keys."""
    if not isinstance(value, dict):
        raise reader.fail(key, "expected a mapping")
    for name in value:
        if not isinstance(name, str) or not name.strip():
            raise reader.fail(key, f"keys must be non-empty strings, got {name!r}")
    return value


def _marker(reader: _Reader, value: object, key: str, levels: tuple[str, ...]) -> tuple[str, str]:
    marker = reader.mapping(value, key, {"phrase", "label"})
    for required in ("phrase", "label"):
        if required not in marker:
            raise reader.fail(f"{key}.{required}", "required key is missing")
    return (
        reader.string(marker["phrase"], f"{key}.phrase").strip(),
        reader.choice(marker["label"], f"{key}.label", levels),
    )


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


def _access(reader: _Reader, value: object, labels: LabelsConfig) -> AccessConfig:
    keys = {"reads", "fold_interval", "exempt_executables", "off_for_labels", "off_for_paths"}
    section = reader.mapping(value, "access", keys)
    defaults = AccessConfig()

    def executable(item: object, key: str) -> bytes:
        text = reader.string(item, key)
        if not text.startswith("/"):
            raise reader.fail(key, "expected an absolute path to an executable")
        return os.fsencode(os.path.normpath(text))

    return AccessConfig(
        reads=reader.boolean(section.get("reads", defaults.reads), "access.reads"),
        fold_interval=reader.duration(
            section.get("fold_interval", defaults.fold_interval), "access.fold_interval"
        ),
        exempt_executables=reader.sequence(
            section.get("exempt_executables", []),
            "access.exempt_executables",
            executable,
            non_empty=False,
        ),
        off_for_labels=reader.sequence(
            section.get("off_for_labels", []),
            "access.off_for_labels",
            lambda v, k: reader.choice(v, k, labels.levels),
            non_empty=False,
        ),
        off_for_paths=reader.sequence(
            section.get("off_for_paths", []), "access.off_for_paths", reader.string, non_empty=False
        ),
    )


def _hashing(reader: _Reader, value: object) -> HashingConfig:
    section = reader.mapping(value, "hashing", {"max_file_bytes", "max_rate"})
    rate = section.get("max_rate", 0)
    return HashingConfig(
        max_file_bytes=reader.size(
            section.get("max_file_bytes", HashingConfig.max_file_bytes), "hashing.max_file_bytes"
        ),
        # bytes per second, e.g. 50MiB; 0 (or absent) means no cap
        max_rate=0 if rate in (0, "0") else reader.size(rate, "hashing.max_rate"),
    )


def _archives(reader: _Reader, value: object) -> ArchivesConfig:
    keys = {"enabled", "max_members", "max_total_bytes", "max_member_bytes", "max_ratio"}
    section = reader.mapping(value, "archives", keys)
    d = ArchiveLimits()
    limits = ArchiveLimits(
        max_members=reader.integer(
            section.get("max_members", d.max_members), "archives.max_members", minimum=1
        ),
        max_total_bytes=reader.size(
            section.get("max_total_bytes", d.max_total_bytes), "archives.max_total_bytes"
        ),
        max_member_bytes=reader.size(
            section.get("max_member_bytes", d.max_member_bytes), "archives.max_member_bytes"
        ),
        max_ratio=reader.integer(
            section.get("max_ratio", d.max_ratio), "archives.max_ratio", minimum=1
        ),
    )
    enabled = section.get("enabled", True)
    if not isinstance(enabled, bool):
        raise reader.fail("archives.enabled", "expected true or false")
    return ArchivesConfig(enabled=enabled, limits=limits)


def _removable(reader: _Reader, value: object) -> RemovableConfig:
    section = reader.mapping(value, "removable", {"mount_points", "devices"})
    return RemovableConfig(
        mount_points=reader.sequence(
            section.get("mount_points", []),
            "removable.mount_points",
            reader.string,
            non_empty=False,
        ),
        devices=reader.sequence(
            section.get("devices", []), "removable.devices", reader.string, non_empty=False
        ),
    )


def _cloud_sync(reader: _Reader, value: object) -> CloudSyncConfig:
    section = reader.mapping(value, "cloud_sync", {"detect", "homes", "folders"})
    defaults = CloudSyncConfig()
    return CloudSyncConfig(
        detect=reader.boolean(section.get("detect", defaults.detect), "cloud_sync.detect"),
        homes=reader.path(section["homes"], "cloud_sync.homes")
        if "homes" in section
        else defaults.homes,
        folders=reader.sequence(
            section.get("folders", []), "cloud_sync.folders", reader.path, non_empty=False
        ),
    )


def _inotify(reader: _Reader, value: object) -> InotifyConfig:
    section = reader.mapping(value, "inotify", {"raise_watch_limit", "max_user_watches"})
    defaults = InotifyConfig()
    return InotifyConfig(
        raise_watch_limit=reader.boolean(
            section.get("raise_watch_limit", defaults.raise_watch_limit),
            "inotify.raise_watch_limit",
        ),
        max_user_watches=reader.integer(
            section.get("max_user_watches", defaults.max_user_watches),
            "inotify.max_user_watches",
            minimum=8192,
        ),
    )
