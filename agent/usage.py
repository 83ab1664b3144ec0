"""What the agent costs its workstation: its own CPU and resident memory.

Heartbeats carry it to the collector (`agents list`, the console) and `status` shows it, so
an administrator sees the cost on a busy laptop without logging in to it. CPU is a
percentage of one core over the interval since the meter's previous reading (the first
reading: since the process started); memory is the resident set now.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import psutil

__all__ = ["Usage", "UsageMeter", "process_sample"]

Sample = tuple[float, float, int]
"""(monotonic seconds, CPU seconds used so far, resident bytes)."""


@dataclass(frozen=True)
class Usage:
    cpu_percent: float
    """CPU time over the interval, in percent of one core (above 100 on several cores)."""
    rss_bytes: int


def process_sample() -> Sample:
    """This process's figures now (psutil: /proc/self/stat and statm)."""
    me = psutil.Process()
    with me.oneshot():
        times = me.cpu_times()
        rss = me.memory_info().rss
    return time.monotonic(), times.user + times.system, rss


def _since_start() -> Sample:
    """The process's start, as a sample: no CPU used yet."""
    age = max(0.0, time.time() - psutil.Process().create_time())
    return time.monotonic() - age, 0.0, 0


class UsageMeter:
    """Readings of one consumer (heartbeats, or the status file): each covers the time since
    that consumer's previous one. Not thread-safe; one per consumer."""

    def __init__(
        self,
        sample: Callable[[], Sample] = process_sample,
        start: Callable[[], Sample] = _since_start,
    ) -> None:
        self._sample = sample
        self._last = start()

    def read(self) -> Usage:
        now, cpu, rss = self._sample()
        then, cpu_then, _ = self._last
        self._last = (now, cpu, rss)
        wall = now - then
        percent = 0.0 if wall <= 0 else max(0.0, cpu - cpu_then) / wall * 100
        return Usage(cpu_percent=round(percent, 2), rss_bytes=rss)
