"""The one-line reason of a threshold alert, kept apart from its numbers so it can grow.

The threshold engine (collector.thresholds) says what the evidence is (who, which label,
which actions, where, which rule): `ReasonParts`. The store renders the line from those
parts and the alert's current totals each time evidence attaches, so the reason never says
"20 files" while the alert holds 25 (issue 2). The parts are kept in the alert row
(`details`, as JSON) so a restarted collector keeps growing the same sentence.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

__all__ = ["ReasonParts", "human_size", "human_span"]

_FORMAT = 1


@dataclass(frozen=True, slots=True)
class ReasonParts:
    """Everything in an alert's reason except the numbers."""

    rule: str
    """E.g. "bulk-copy-to-usb: 20 files / 100 MiB in 10m"."""
    user: str | None
    """The group's user when the rule groups by user (empty: unknown), else None."""
    host: str | None
    destination: str | None
    """The group's destination when the rule groups by destination, else None."""
    label_rank: int
    label: str
    """The most sensitive label among the evidence."""
    verbs: tuple[str, ...]
    """Sorted past-tense actions, e.g. ("copied", "moved")."""
    destination_classes: tuple[str, ...]
    """Sorted destination classes of the evidence (said when not grouped by destination)."""

    def merge(self, other: ReasonParts) -> ReasonParts:
        """The parts describing both sets of evidence (same rule and group)."""
        if other is self or other == self:
            return self
        top = self if self.label_rank >= other.label_rank else other
        verbs = tuple(sorted({*self.verbs, *other.verbs}))
        classes = tuple(sorted({*self.destination_classes, *other.destination_classes}))
        if top is self and verbs == self.verbs and classes == self.destination_classes:
            return self
        return ReasonParts(
            self.rule,
            self.user,
            self.host,
            self.destination,
            top.label_rank,
            top.label,
            verbs,
            classes,
        )

    def render(self, files: int, nbytes: int, first_ns: int, last_ns: int) -> str:
        """One plain, printable line, e.g. "alice on lt-0412 copied 25 confidential files,
        50.0 MiB (52428800 bytes), to removable in 3 min; rule bulk-copy-to-usb: 20 files /
        100 MiB in 10m"."""
        noun = "file" if files == 1 else "files"
        what = f"{files} {self.label} {noun}, {human_size(nbytes)}"
        verb = " or ".join(self.verbs)
        dest = self.destination or ", ".join(self.destination_classes)
        span = "" if files == 1 else f" in {human_span(last_ns - first_ns)}"
        if self.user is not None:
            who = self.user or "unknown user"
            if self.host is not None:
                who += f" on {self.host or 'unknown host'}"
            text = f"{who} {verb} {what}, to {dest}{span}"
        else:
            where = "" if self.host is None else f"on {self.host or 'unknown host'}: "
            text = f"{where}{what}, {verb} to {dest}{span}"
        text += f"; rule {self.rule}"
        # Group values come from agents (user and host names): keep the line one line.
        return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": _FORMAT,
                "rule": self.rule,
                "user": self.user,
                "host": self.host,
                "destination": self.destination,
                "label_rank": self.label_rank,
                "label": self.label,
                "verbs": list(self.verbs),
                "destination_classes": list(self.destination_classes),
            },
            sort_keys=True,
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> ReasonParts | None:
        """The parts stored by `to_json`; None for anything else (e.g. an older alert)."""
        try:
            d = json.loads(text)
            if not isinstance(d, dict) or d.get("format") != _FORMAT:
                return None
            return cls(
                str(d["rule"]),
                _opt(d["user"]),
                _opt(d["host"]),
                _opt(d["destination"]),
                int(d["label_rank"]),
                str(d["label"]),
                tuple(map(str, d["verbs"])),
                tuple(map(str, d["destination_classes"])),
            )
        except (ValueError, KeyError, TypeError):
            return None


def _opt(value: object) -> str | None:
    return None if value is None else str(value)


def human_size(n: int) -> str:
    """Bytes for a person, exact: "1000 B", "50.0 MiB (52428800 bytes)"."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit} ({n} bytes)"


def human_span(ns: int) -> str:
    seconds = ns // 1_000_000_000
    if seconds < 1:
        return "under 1 s"
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min"
    if seconds < 48 * 3600:
        return f"{seconds // 3600} h"
    return f"{seconds // 86400} days"
