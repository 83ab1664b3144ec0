"""How the collector's serving processes are set up (`serve`, its ingest process and that
process's decode workers): where the log goes, how often the garbage collector runs."""

from __future__ import annotations

import gc
import logging
import sys

GC_THRESHOLDS = (5_000, 20, 100)
"""Cyclic GC thresholds of a serving process (Python's default is 700, 10, 10).

Ingest allocates some twenty container objects per event (decoded events, rows, rule
entries) that die within the batch, so with the default the collector ran a young
collection every few dozen events and a full one, over every rule window it keeps, every
few thousand: 10-15% of ingest CPU, measured in process. Cycles are still
collected; full collections are rarer."""

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def log_to_stderr(level: str | int) -> None:
    """Send the `collector` loggers' records at `level` and above to stderr (once)."""
    pkg = logging.getLogger("collector")
    if not pkg.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT))
        pkg.addHandler(handler)
    pkg.setLevel(level)


def serving_gc() -> None:
    """Set this process's GC_THRESHOLDS: it serves from now on."""
    gc.set_threshold(*GC_THRESHOLDS)
