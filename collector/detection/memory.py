"""An in-memory `History`: for simulations, tests and small dry-runs.

Holds every event it is given; the store-backed History answers the same
questions with SQL over the events table.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Mapping

from collector.detection.baseline import DayCount
from collector.detection.cumulative import WindowEvent
from collector.detection.engine import DAY_NS, LongEvent, Selector


class MemoryHistory:
    def __init__(
        self,
        departments: Mapping[str, str] | None = None,
        watchlists: Mapping[str, frozenset[str]] | None = None,
    ) -> None:
        self._events: dict[str, list[tuple[int, str, LongEvent]]] = defaultdict(list)
        self._active: dict[str, set[int]] = defaultdict(set)
        self._gaps: dict[str, list[int]] = defaultdict(list)
        self._renames: dict[str, list[int]] = defaultdict(list)
        self._departments = dict(departments or {})
        self._watchlists = dict(watchlists or {})

    def add(self, event: LongEvent) -> None:
        """Store a copy-like event; it also marks the user active that day."""
        bisect.insort(self._events[event.user], (event.ts_ns, event.event_id, event))
        self.activity(event.user, event.day)

    def activity(self, user: str, day: int) -> None:
        """The user was seen that day (any event, labelled or not)."""
        self._active[user].add(day)

    def gap(self, host: str, ts_ns: int) -> None:
        bisect.insort(self._gaps[host], ts_ns)

    def _matching(self, user: str, selector: Selector, after: int, until: int) -> list[LongEvent]:
        rows = self._events.get(user, [])
        lo = bisect.bisect_right(rows, (after, "\U0010ffff"))
        hi = bisect.bisect_right(rows, (until, "\U0010ffff"))
        return [e for _, _, e in rows[lo:hi] if selector.matches(e)]

    def window(
        self, user: str, selector: Selector, after_ns: int, until_ns: int
    ) -> list[WindowEvent]:
        return [e.window_event() for e in self._matching(user, selector, after_ns, until_ns)]

    def days(self, user: str, selector: Selector, first_day: int, last_day: int) -> list[DayCount]:
        per_day: dict[int, set[tuple[str, bytes, int]]] = defaultdict(set)
        after, until = first_day * DAY_NS - 1, (last_day + 1) * DAY_NS - 1
        for event in self._matching(user, selector, after, until):
            per_day[event.day].add(event.window_event().document)
        active = self._active.get(user, set())
        return [
            DayCount(day, len(per_day.get(day, ())), day in active)
            for day in range(first_day, last_day + 1)
        ]

    def rates(self, selector: Selector, first_day: int, last_day: int) -> Mapping[str, float]:
        rates: dict[str, float] = {}
        for user, active in self._active.items():
            days = [d for d in active if first_day <= d <= last_day]
            if not days:
                continue
            counts = self.days(user, selector, first_day, last_day)
            rates[user] = sum(d.count for d in counts) / len(days)
        return rates

    def department(self, user: str) -> str | None:
        return self._departments.get(user)

    def watchlists(self, user: str) -> frozenset[str]:
        return self._watchlists.get(user, frozenset())

    def seen_device(self, user: str, device: str, after_ns: int, before_ns: int) -> bool:
        rows = self._events.get(user, [])
        lo = bisect.bisect_right(rows, (after_ns, "\U0010ffff"))
        return any(e.device == device for ts, _, e in rows[lo:] if ts < before_ns)

    def gaps(self, host: str, after_ns: int, until_ns: int) -> list[int]:
        gaps = self._gaps.get(host, [])
        return gaps[bisect.bisect_right(gaps, after_ns) : bisect.bisect_right(gaps, until_ns)]

    def first_day(self) -> int | None:
        days = [d for active in self._active.values() for d in active]
        return min(days) if days else None

    def renames(self, user: str, after_ns: int, until_ns: int) -> list[int]:
        rows = self._renames.get(user, [])
        return rows[bisect.bisect_right(rows, after_ns) : bisect.bisect_right(rows, until_ns)]

    def rename(self, user: str, ts_ns: int) -> None:
        """The user renamed a labelled file at `ts_ns`."""
        bisect.insort(self._renames[user], ts_ns)
