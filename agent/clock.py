"""Time as a collaborator: cores take `now` as an argument, services take a Clock."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def wall_ns(self) -> int:
        """Wall-clock time, Unix epoch nanoseconds (event timestamps)."""
        ...

    def monotonic(self) -> float:
        """Monotonic seconds (durations, timeouts)."""
        ...


class SystemClock:
    def wall_ns(self) -> int:
        return time.time_ns()

    def monotonic(self) -> float:
        return time.monotonic()
