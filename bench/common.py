"""Shared pieces of the benches: real collector processes, enrolment, progress output.

The benches are scripts (`.venv/bin/python bench/ingest.py`), so each puts the repository
root on sys.path before importing this module and `tests.procs`.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import psutil

from tests.procs import ROOT, Collector, run_cli

POLICY = ROOT / "configs" / "policy.yaml"

_T0 = time.monotonic()


def progress(message: str) -> None:
    """One line on stderr (stdout carries only the JSON result)."""
    sys.stderr.write(f"[{time.monotonic() - _T0:7.1f}s] {message}\n")
    sys.stderr.flush()


def start_collector(tmp: Path, policy: Path = POLICY, serve_args: Sequence[str] = ()) -> Collector:
    """`collector init` + `collector serve` on free loopback ports, data in tmp/collector."""
    collector = Collector(tmp / "collector", policy, tmp / "collector.log", serve_args)
    collector.init()
    collector.start()
    return collector


def enroll(collector: Collector, state: Path, hostname: str) -> None:
    """`agent enroll` into `state` with a fresh one-use token."""
    run_cli(
        "agent",
        "enroll",
        "--collector",
        collector.enroll,
        "--token",
        collector.token(),
        "--state",
        str(state),
        "--hostname",
        hostname,
    )


def cpu_seconds(process: psutil.Process, *, children: bool = False) -> float:
    """User + system CPU seconds of `process` (and with `children`, of its descendants,
    such as the collector's decode workers; one that exits meanwhile is skipped)."""
    total = 0.0
    for p in (process, *(process.children(recursive=True) if children else ())):
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (q in 0..100)."""
    if not sorted_values:
        raise ValueError("no values")
    rank = max(1, -(-len(sorted_values) * q // 100))  # ceil(n * q / 100), at least 1
    return sorted_values[int(rank) - 1]
