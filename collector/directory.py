"""Users' departments and watchlists, from a directory export named in the collector config.

Two formats, chosen by extension: CSV with a header row (`user`, `department`, and
optionally `watchlists`, separated by `;`), or LDIF (`uid`/`sAMAccountName` for the
user, `department`/`ou` for the department, `exfilwatchWatchlist` values).
Bad input is a `ConfigError` naming the line; nothing is half-loaded.
"""

from __future__ import annotations

import base64
import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

from collector.errors import ConfigError

_USER_ATTRS = ("uid", "samaccountname")
_DEPT_ATTRS = ("department", "ou")
_WATCH_ATTRS = ("exfilwatchwatchlist",)


@dataclass(frozen=True)
class Directory:
    departments: dict[str, str] = field(default_factory=dict)
    watchlists: dict[str, frozenset[str]] = field(default_factory=dict)


def load_directory(path: Path) -> Directory:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the directory file: {e}") from e
    if path.suffix.lower() == ".ldif":
        return parse_ldif(text, path.name)
    return parse_csv(text, path.name)


def parse_csv(text: str, source: str) -> Directory:
    reader = csv.DictReader(io.StringIO(text))
    fields = {f.strip().lower() for f in reader.fieldnames or ()}
    if not {"user", "department"} <= fields:
        raise ConfigError(f"{source}: the header must name the columns user and department")
    departments: dict[str, str] = {}
    watchlists: dict[str, frozenset[str]] = {}
    for row in reader:
        values = {(k or "").strip().lower(): (v or "").strip() for k, v in row.items()}
        user = values.get("user", "")
        if not user:
            raise ConfigError(f"{source}:{reader.line_num}: empty user")
        departments[user] = values.get("department", "")
        lists = frozenset(w.strip() for w in values.get("watchlists", "").split(";") if w.strip())
        if lists:
            watchlists[user] = lists
    return Directory(departments, watchlists)


def parse_ldif(text: str, source: str) -> Directory:
    departments: dict[str, str] = {}
    watchlists: dict[str, frozenset[str]] = {}
    for _, entry in _ldif_entries(text, source):
        user = next((entry[a][0] for a in _USER_ATTRS if a in entry), "")
        if not user:
            continue  # groups, organisational units: not people
        dept = next((entry[a][0] for a in _DEPT_ATTRS if a in entry), "")
        departments[user] = dept
        lists = frozenset(v for a in _WATCH_ATTRS for v in entry.get(a, []))
        if lists:
            watchlists[user] = lists
    return Directory(departments, watchlists)


def _ldif_entries(text: str, source: str) -> list[tuple[int, dict[str, list[str]]]]:
    """LDIF records (RFC 2849): folded lines, `attr: value` and `attr:: base64`."""
    lines: list[tuple[int, str]] = []
    for number, raw in enumerate(text.splitlines(), 1):
        if raw.startswith(" ") and lines:
            lines[-1] = (lines[-1][0], lines[-1][1] + raw[1:])
        elif not raw.startswith("#"):
            lines.append((number, raw))
    entries: list[tuple[int, dict[str, list[str]]]] = []
    current: dict[str, list[str]] = {}
    start = 0
    for number, line in [*lines, (0, "")]:
        if not line.strip():
            if current:
                entries.append((start, current))
            current = {}
            continue
        if not current:
            start = number
        attr, sep, value = line.partition(":")
        if not sep:
            raise ConfigError(f"{source}:{number}: expected 'attribute: value'")
        if value.startswith(":"):
            try:
                value = base64.b64decode(value[1:].strip(), validate=True).decode("utf-8")
            except (ValueError, UnicodeDecodeError) as e:
                raise ConfigError(f"{source}:{number}: bad base64 value") from e
        current.setdefault(attr.strip().lower(), []).append(value.strip())
    return entries
