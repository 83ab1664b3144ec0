"""What a console page was asked for: filters, sort and page, parsed from the query string.

    request -> **filters** (validated, frozen) -> reads

Anything malformed is a BadRequestError naming the parameter; nothing unparsed reaches SQL.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeVar
from urllib.parse import urlencode

from starlette.datastructures import ImmutableMultiDict

from collector.models import AlertStatus, Severity
from collector.web.errors import BadRequestError

PAGE_SIZES = (25, 50, 100, 200)
MAX_OFFSET = 10_000
"""Deepest row a page may start at: OFFSET costs a scan of the rows it skips; past this,
narrow the filter (the page says so)."""
SORTS = ("severity", "id", "updated", "last", "files", "bytes", "status", "rule", "assignee")
OPEN = frozenset({AlertStatus.NEW, AlertStatus.IN_PROGRESS})
_SHA256 = re.compile(r"[0-9a-f]{64}")
_NUMBER = re.compile(r"[0-9]{1,19}")
"""A count, page or row number: ASCII digits (str.isdigit also takes "²", which int()
refuses) and below 2**63 (SQLite's integers; a bigger one cannot even be bound)."""
INT64 = 2**63
_MAX_TEXT = 256
E = TypeVar("E", AlertStatus, Severity)


Params = ImmutableMultiDict[str, object]
"""Starlette's QueryParams and FormData are both this."""


def text(params: Params, name: str) -> str:
    """A single text parameter, stripped; empty when absent. Uploads are refused."""
    value = params.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadRequestError(f"{name}: expected text")
    if len(value) > _MAX_TEXT:
        raise BadRequestError(f"{name}: longer than {_MAX_TEXT} characters")
    return value.strip()


def texts(params: Params, name: str) -> list[str]:
    out = []
    for value in params.getlist(name):
        if not isinstance(value, str) or len(value) > _MAX_TEXT:
            raise BadRequestError(f"{name}: expected short text")
        if value.strip():
            out.append(value.strip())
    return out


def number(value: str, name: str) -> int:
    """A non-negative integer SQLite can hold, or BadRequestError naming the parameter."""
    if not _NUMBER.fullmatch(value) or int(value) >= INT64:
        raise BadRequestError(f"{name}: expected a number")
    return int(value)


def time_ns(params: Params, name: str) -> int | None:
    """A date or date-time (the browser's datetime-local, read as UTC) in ns; None if empty."""
    value = text(params, name)
    if not value:
        return None
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError as e:
        raise BadRequestError(f"{name}: expected a date like 2026-11-28T09:30") from e
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    try:
        ns = int(when.timestamp()) * 1_000_000_000
    except (OverflowError, ValueError, OSError):
        ns = INT64  # out of range below
    if not -INT64 <= ns < INT64:  # nanoseconds in 64 bits: 1677 to 2262
        raise BadRequestError(f"{name}: expected a date between 1678 and 2261")
    return ns


def _enums(params: Params, name: str, kind: type[E]) -> frozenset[E]:
    try:
        return frozenset(kind(v) for v in texts(params, name))
    except ValueError as e:
        choices = ", ".join(m.value for m in kind)
        raise BadRequestError(f"{name}: expected one of {choices}") from e


@dataclass(frozen=True)
class PageRequest:
    page: int = 1
    """1-based."""
    size: int = 50

    @property
    def offset(self) -> int:
        return (self.page - 1) * self.size

    @classmethod
    def parse(cls, params: Params, default_size: int = 50) -> PageRequest:
        raw_page, raw_size = text(params, "page") or "1", text(params, "size")
        page = number(raw_page, "page")
        if page < 1:
            raise BadRequestError("page: expected a number from 1")
        size = number(raw_size, "size") if raw_size else default_size
        if size not in PAGE_SIZES and size != default_size:
            raise BadRequestError(f"size: expected one of {', '.join(map(str, PAGE_SIZES))}")
        if (page - 1) * size > MAX_OFFSET:
            raise BadRequestError(
                f"page: only the first {MAX_OFFSET + size} rows are paged; narrow the filter"
            )
        return cls(page, size)

    def pages(self, total: int) -> int:
        return max(1, min(-(-total // self.size), MAX_OFFSET // self.size + 1))


@dataclass(frozen=True)
class AlertFilter:
    """The alerts page's question; the default is what an analyst starts the day with."""

    statuses: frozenset[AlertStatus] = OPEN
    """Empty: every status."""
    severities: frozenset[Severity] = frozenset()
    rule: str = ""
    user: str = ""
    host: str = ""
    destination: str = ""
    assignee: str | None = None
    """None: anyone or nobody; "": unassigned only."""
    since_ns: int | None = None
    until_ns: int | None = None
    sort: str = "severity"
    descending: bool = True
    raw: tuple[tuple[str, str], ...] = field(default=(), compare=False)
    """The parameters as given, to rebuild links (sorting, paging) that keep the filter."""

    @classmethod
    def parse(cls, params: Params) -> AlertFilter:
        statuses = _enums(params, "status", AlertStatus)
        if not statuses and not text(params, "f"):
            statuses = OPEN  # first visit; a submitted form with no box ticked means all
        sort = text(params, "sort") or "severity"
        if sort not in SORTS:
            raise BadRequestError(f"sort: expected one of {', '.join(SORTS)}")
        order = text(params, "order") or "desc"
        if order not in ("asc", "desc"):
            raise BadRequestError("order: expected asc or desc")
        assignee_text = text(params, "assignee")
        raw: list[tuple[str, str]] = [("f", "1")]
        raw += [("status", s.value) for s in sorted(statuses)]
        severities = _enums(params, "severity", Severity)
        raw += [("severity", s.value) for s in sorted(severities)]
        for name in ("rule", "user", "host", "destination", "assignee", "since", "until"):
            if value := text(params, name):
                raw.append((name, value))
        return cls(
            statuses=statuses,
            severities=severities,
            rule=text(params, "rule"),
            user=text(params, "user"),
            host=text(params, "host"),
            destination=text(params, "destination"),
            assignee=None if not assignee_text else ("" if assignee_text == "-" else assignee_text),
            since_ns=time_ns(params, "since"),
            until_ns=time_ns(params, "until"),
            sort=sort,
            descending=order == "desc",
            raw=tuple(raw),
        )

    def query(self, **changes: str | int) -> str:
        """The query string of this filter with `changes` (sort, order, page) applied."""
        pairs: list[tuple[str, str | int]] = list(self.raw)
        pairs += [("sort", self.sort), ("order", "desc" if self.descending else "asc")]
        keep = [(k, v) for k, v in pairs if k not in changes]
        return urlencode([*keep, *changes.items()])

    def sort_query(self, key: str) -> str:
        """Link of a column header: sort by it, or flip the order when already sorted by it."""
        flip = "asc" if self.sort == key and self.descending else "desc"
        return self.query(sort=key, order=flip, page=1)


@dataclass(frozen=True)
class EventFilter:
    user: str = ""
    host: str = ""
    label: str = ""
    name: bytes = b""
    """Part of a source or destination path, as bytes (paths are bytes on the agent)."""
    sha256: str = ""
    since_ns: int | None = None
    until_ns: int | None = None
    raw: tuple[tuple[str, str], ...] = field(default=(), compare=False)

    @classmethod
    def parse(cls, params: Params) -> EventFilter:
        sha = text(params, "sha256").lower()
        if sha and not _SHA256.fullmatch(sha):
            raise BadRequestError("sha256: expected 64 hex digits")
        names = ("user", "host", "label", "name", "sha256", "since", "until", "size")
        raw = tuple((n, v) for n in names if (v := text(params, n)))
        return cls(
            user=text(params, "user"),
            host=text(params, "host"),
            label=text(params, "label"),
            name=text(params, "name").encode("utf-8", "surrogateescape"),
            sha256=sha,
            since_ns=time_ns(params, "since"),
            until_ns=time_ns(params, "until"),
            raw=raw,
        )

    def query(self, **changes: str) -> str:
        return urlencode([*(p for p in self.raw if p[0] not in changes), *changes.items()])

    @property
    def empty(self) -> bool:
        return not self.raw


def cursor(params: Params) -> tuple[int, int] | None:
    """The events page's keyset cursor ("<observed_at_ns>.<rowid>") or None."""
    value = text(params, "before")
    if not value:
        return None
    t, sep, r = value.partition(".")
    if not sep:
        raise BadRequestError("before: expected <time>.<row>")
    return number(t, "before"), number(r, "before")


def ids(params: Params, name: str = "ids", limit: int = 500) -> list[int]:
    """Alert ids ticked for a bulk action."""
    values: Sequence[str] = texts(params, name)
    if not values:
        raise BadRequestError("tick at least one alert")
    if len(values) > limit:
        raise BadRequestError(f"at most {limit} alerts at once")
    return sorted({number(v, name) for v in values})
