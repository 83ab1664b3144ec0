"""The store-backed `History`: the engine's questions as SQL over the events table.

Every query is bounded by user and time and served by the index `events_user_time`
(user, observed_at_ns); the organisation-wide rates (cold starts only) scan one
history span and are cached by the engine per day. Event time here is the stored
`observed_at_ns`: the collector clamps future-dated events at ingest.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Mapping, Sequence

from collector.detection.baseline import DayCount
from collector.detection.cumulative import WindowEvent
from collector.detection.engine import DAY_NS, Selector

DOC_SHA_SQL = "CASE WHEN archive_member != x'' THEN source_sha256 ELSE dest_sha256 END"
"""A document's hash: an archive member's is its source's (the destination is the archive)."""
DOC_SIZE_SQL = "CASE WHEN archive_member != x'' THEN source_size ELSE dest_size END"
_DOCUMENTS = (
    f"COUNT(DISTINCT CASE WHEN ({DOC_SHA_SQL}) != '' THEN ({DOC_SHA_SQL})"
    " ELSE hex(dest_path) || ':' || dest_size END)"
)
"""Distinct documents: by hash, else by path and size (as `WindowEvent.document`)."""
DEVICE_SQL = "coalesce(nullif(json_extract(device_json, '$.serial'), ''), " \
    "nullif(json_extract(device_json, '$.fs_uuid'), ''), " \
    "nullif(json_extract(device_json, '$.remote'), ''), " \
    "json_extract(device_json, '$.mount_point'), '')"  # fmt: skip


class SqlHistory:
    """`labels` are the policy's labels, lowest rank first (a selector's rank maps to names)."""

    def __init__(
        self,
        connect: Callable[[], sqlite3.Connection],
        labels: Sequence[str],
        *,
        departments: Mapping[str, str] | None = None,
        watchlists: Mapping[str, frozenset[str]] | None = None,
    ) -> None:
        self._connect = connect
        self._labels = tuple(labels)
        self._departments = dict(departments or {})
        self._watchlists = dict(watchlists or {})
        self._span: tuple[int, int] | None = None
        self._buckets: dict[Selector, dict[str, dict[int, int]]] = {}
        self._active: dict[str, set[int]] = {}

    def preload(self, selectors: Sequence[Selector], first_day: int, last_day: int) -> None:
        """Read the daily buckets of [first, last] once (a dry-run over a long span).

        Afterwards `days` and `rates` inside that span are answered from memory: one
        pass over the events instead of one query per user and day evaluated.
        """
        con = self._connect()
        lo, hi = first_day * DAY_NS, (last_day + 1) * DAY_NS
        active: dict[str, set[int]] = {}
        for user, day in con.execute(
            f"SELECT DISTINCT user, observed_at_ns / {DAY_NS} FROM events"  # noqa: S608
            " WHERE observed_at_ns >= ? AND observed_at_ns < ?",
            (lo, hi),
        ):
            active.setdefault(user, set()).add(day)
        for selector in set(selectors):
            clause, params = self._where(selector)
            per_user: dict[str, dict[int, int]] = {}
            for user, day, count in con.execute(
                f"SELECT user, observed_at_ns / {DAY_NS} AS day, {_DOCUMENTS}"  # noqa: S608
                f" FROM events WHERE observed_at_ns >= ? AND observed_at_ns < ? AND {clause}"
                " GROUP BY user, day",
                [lo, hi, *params],
            ):
                per_user.setdefault(user, {})[day] = count
            self._buckets[selector] = per_user
        self._active = active
        self._span = (first_day, last_day)

    def _preloaded(self, selector: Selector, first_day: int, last_day: int) -> bool:
        span = self._span
        return (
            span is not None
            and selector in self._buckets
            and span[0] <= first_day
            and last_day <= span[1]
        )

    def _where(self, selector: Selector) -> tuple[str, list[object]]:
        labels = list(self._labels[max(selector.min_rank, 0) :])
        dests = sorted(selector.destinations)
        actions = sorted(selector.actions)
        clause = (
            f"label IN ({','.join('?' * len(labels))})"
            f" AND destination_class IN ({','.join('?' * len(dests))})"
            f" AND action IN ({','.join('?' * len(actions))})"
        )
        return clause, [*labels, *dests, *actions]

    def window(
        self, user: str, selector: Selector, after_ns: int, until_ns: int
    ) -> list[WindowEvent]:
        clause, params = self._where(selector)
        sql = (
            f"SELECT event_id, observed_at_ns, {DOC_SHA_SQL}, {DOC_SIZE_SQL}, dest_path,"  # noqa: S608
            f" {DEVICE_SQL}"
            f" FROM events WHERE user = ? AND observed_at_ns > ? AND observed_at_ns <= ?"
            f" AND {clause}"
        )
        con = self._connect()
        rows = con.execute(sql, [user, after_ns, until_ns, *params]).fetchall()
        return [WindowEvent(r[0], r[1], r[2], r[3], r[4], r[5] or "") for r in rows]

    def days(self, user: str, selector: Selector, first_day: int, last_day: int) -> list[DayCount]:
        if self._preloaded(selector, first_day, last_day):
            counts = self._buckets[selector].get(user, {})
            active = self._active.get(user, set())
            return [
                DayCount(day, counts.get(day, 0), day in active)
                for day in range(first_day, last_day + 1)
            ]
        clause, params = self._where(selector)
        lo, hi = first_day * DAY_NS, (last_day + 1) * DAY_NS
        con = self._connect()
        counts = dict(
            con.execute(
                f"SELECT observed_at_ns / {DAY_NS} AS day, {_DOCUMENTS}"  # noqa: S608
                f" FROM events WHERE user = ? AND observed_at_ns >= ? AND observed_at_ns < ?"
                f" AND {clause} GROUP BY day",
                [user, lo, hi, *params],
            ).fetchall()
        )
        active = {
            row[0]
            for row in con.execute(
                f"SELECT DISTINCT observed_at_ns / {DAY_NS} FROM events"  # noqa: S608
                " WHERE user = ? AND observed_at_ns >= ? AND observed_at_ns < ?",
                (user, lo, hi),
            )
        }
        return [
            DayCount(day, counts.get(day, 0), day in active)
            for day in range(first_day, last_day + 1)
        ]

    def rates(self, selector: Selector, first_day: int, last_day: int) -> Mapping[str, float]:
        if self._preloaded(selector, first_day, last_day):
            rates: dict[str, float] = {}
            for user, days in self._active.items():
                n = sum(1 for d in days if first_day <= d <= last_day)
                if n:
                    counts = self._buckets[selector].get(user, {})
                    total = sum(c for d, c in counts.items() if first_day <= d <= last_day)
                    rates[user] = total / n
            return rates
        clause, params = self._where(selector)
        lo, hi = first_day * DAY_NS, (last_day + 1) * DAY_NS
        con = self._connect()
        active = dict(
            con.execute(
                f"SELECT user, COUNT(DISTINCT observed_at_ns / {DAY_NS}) FROM events"  # noqa: S608
                " WHERE observed_at_ns >= ? AND observed_at_ns < ? AND user != '' GROUP BY user",
                (lo, hi),
            ).fetchall()
        )
        documents = dict(
            con.execute(
                f"SELECT user, SUM(n) FROM (SELECT user, {_DOCUMENTS} AS n"  # noqa: S608
                f" FROM events WHERE observed_at_ns >= ? AND observed_at_ns < ? AND {clause}"
                f" GROUP BY user, observed_at_ns / {DAY_NS}) GROUP BY user",
                [lo, hi, *params],
            ).fetchall()
        )
        return {user: documents.get(user, 0) / days for user, days in active.items() if days}

    def department(self, user: str) -> str | None:
        return self._departments.get(user)

    def watchlists(self, user: str) -> frozenset[str]:
        return self._watchlists.get(user, frozenset())

    def seen_device(self, user: str, device: str, after_ns: int, before_ns: int) -> bool:
        row = (
            self._connect()
            .execute(
                f"SELECT 1 FROM events WHERE user = ? AND observed_at_ns > ? AND observed_at_ns < ?"  # noqa: S608
                f" AND {DEVICE_SQL} = ? LIMIT 1",
                (user, after_ns, before_ns, device),
            )
            .fetchone()
        )
        return row is not None

    def gaps(self, host: str, after_ns: int, until_ns: int) -> list[int]:
        rows = self._connect().execute(
            "SELECT observed_at_ns FROM events WHERE host = ? AND observed_at_ns > ?"
            " AND observed_at_ns <= ? AND action = 'coverage_gap' ORDER BY observed_at_ns",
            (host, after_ns, until_ns),
        )
        return [row[0] for row in rows]

    def first_day(self) -> int | None:
        row = self._connect().execute("SELECT min(observed_at_ns) FROM events").fetchone()
        return None if row[0] is None else int(row[0]) // DAY_NS

    def renames(self, user: str, after_ns: int, until_ns: int) -> list[int]:
        rows = self._connect().execute(
            "SELECT observed_at_ns FROM events WHERE user = ? AND observed_at_ns > ?"
            " AND observed_at_ns <= ? AND action = 'rename' AND label != ''"
            " ORDER BY observed_at_ns",
            (user, after_ns, until_ns),
        )
        return [row[0] for row in rows]
