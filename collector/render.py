"""Text for people: file names (attacker-chosen bytes) made safe to print, sizes, durations."""

from __future__ import annotations

import base64

_SAFE_CONTROL = str.maketrans({c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F]})


def display_path(raw: bytes) -> str:
    """A file name as printable text: invalid UTF-8 as \\xNN, control characters escaped.

    An insider chooses file names; a name must never move a terminal's cursor,
    inject a line into a report, or pass for another name.
    """
    text = raw.decode("utf-8", "backslashreplace")
    escaped = text.translate(_SAFE_CONTROL)
    return "".join(
        ch if ch.isprintable() or ch == " " else ch.encode("unicode_escape").decode("ascii")
        for ch in escaped
    )


def display_text(text: str) -> str:
    """Free text as printable text, escaped as `display_path` escapes a name.

    What agents and devices report (a USB stick's vendor, model and serial, a label read
    from an extended attribute, a host or user name) is chosen by whoever controls them, as
    a file name is. Idempotent: already escaped text is printable and passes unchanged.
    """
    return display_path(text.encode("utf-8", "surrogatepass"))


def path_b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
