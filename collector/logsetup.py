"""Where the collector's log goes: stderr, one format, for `serve` and its ingest process."""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def log_to_stderr(level: str | int) -> None:
    """Send the `collector` loggers' records at `level` and above to stderr (once)."""
    pkg = logging.getLogger("collector")
    if not pkg.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT))
        pkg.addHandler(handler)
    pkg.setLevel(level)
