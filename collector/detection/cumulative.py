"""Cumulative rules: distinct documents (or bytes) per user over long windows, with tiers.

`fire at t if measure(selector, user, (t - W, t]) >= tier`, tiers checked highest
first, inclusive (DETECTION-RULES §1.1). The adapter fetches the user's matching
events of the window from the store; this core only counts. One document is one
sha256, however often and under whatever names it was copied; an archive member
is a document of its own. Events without a hash fall back to (path, size) and are
counted in `fallback_keys`, so the explanation can say the count is less certain.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import assert_never


class Measure(StrEnum):
    COUNT = "count"
    """Matching events."""
    DISTINCT_FILES = "distinct_files"
    """Distinct documents (sha256)."""
    BYTES = "bytes"
    """Sum of the sizes of the distinct documents."""
    DISTINCT_DEVICES = "distinct_devices"
    """Distinct destination devices or folders."""


@dataclass(frozen=True)
class Tier:
    severity: str
    threshold: int
    """Inclusive: the measure reaching it fires the tier."""


@dataclass(frozen=True)
class CumulativeRule:
    name: str
    measure: Measure
    window_ns: int
    tiers: tuple[Tier, ...]
    """Ascending by threshold; at least one."""

    def __post_init__(self) -> None:
        if self.window_ns <= 0:
            raise ValueError("window must be positive")
        if not self.tiers:
            raise ValueError("at least one tier")
        limits = [t.threshold for t in self.tiers]
        if any(v <= 0 for v in limits) or limits != sorted(set(limits)):
            raise ValueError("tier thresholds must be positive and strictly ascending")


@dataclass(frozen=True)
class WindowEvent:
    """One matching event of a user, as the store hands it to the core."""

    event_id: str
    ts_ns: int
    """Event time as stored (`observed_at_ns`)."""
    sha256: str
    size: int
    path: bytes = b""
    device: str = ""
    """Identity of the destination (device serial, or folder) for DISTINCT_DEVICES."""

    @property
    def document(self) -> tuple[str, bytes, int]:
        """The document's identity: its hash, else its path and size."""
        if self.sha256:
            return (self.sha256, b"", 0)
        return ("", self.path, self.size)


@dataclass(frozen=True)
class CumulativeVerdict:
    rule: str
    at_ns: int
    value: int
    """The measure over (at - window, at]."""
    tier: Tier | None
    """The highest tier the value reaches; None below the lowest."""
    documents: int
    bytes: int
    events: int
    fallback_keys: int
    """Documents identified by path and size because the agent sent no hash."""
    evidence: tuple[str, ...]
    """Event ids in the window, in time order (then id)."""

    def escalates(self, current: Tier | None) -> bool:
        """True when this verdict reaches a tier above `current` (None: no open alert)."""
        if self.tier is None:
            return False
        return current is None or self.tier.threshold > current.threshold


def in_window(ts_ns: int, at_ns: int, window_ns: int) -> bool:
    """Half-open (at - window, at]: an event exactly one window old is out."""
    return at_ns - window_ns < ts_ns <= at_ns


def evaluate(rule: CumulativeRule, events: Iterable[WindowEvent], at_ns: int) -> CumulativeVerdict:
    """The rule's measure at `at_ns` over `events` (any superset of the window is fine)."""
    inside = sorted(
        (e for e in events if in_window(e.ts_ns, at_ns, rule.window_ns)),
        key=lambda e: (e.ts_ns, e.event_id),
    )
    sizes: dict[tuple[str, bytes, int], int] = {}
    devices: set[str] = set()
    for event in inside:
        sizes.setdefault(event.document, event.size)
        devices.add(event.device)
    total = sum(sizes.values())
    match rule.measure:
        case Measure.COUNT:
            value = len(inside)
        case Measure.DISTINCT_FILES:
            value = len(sizes)
        case Measure.BYTES:
            value = total
        case Measure.DISTINCT_DEVICES:
            value = len(devices)
        case _:
            assert_never(rule.measure)
    reached = [tier for tier in rule.tiers if value >= tier.threshold]
    return CumulativeVerdict(
        rule=rule.name,
        at_ns=at_ns,
        value=value,
        tier=reached[-1] if reached else None,
        documents=len(sizes),
        bytes=total,
        events=len(inside),
        fallback_keys=sum(1 for key in sizes if not key[0]),
        evidence=tuple(e.event_id for e in inside),
    )


class Slider:
    """The measure of `rule` at ascending times over `rows`, in O(1) amortised per row.

    For a run of events of one user (a batch at ingest, a user's history in a
    dry-run): the rows come from one store query covering the run's windows, and
    each `advance(at)` moves the half-open window (at - window, at] forward.
    """

    def __init__(self, rule: CumulativeRule, rows: Iterable[WindowEvent]) -> None:
        self._rule = rule
        self._rows = sorted(rows, key=lambda e: (e.ts_ns, e.event_id))
        self._lo = self._hi = 0
        self._docs: dict[tuple[str, bytes, int], int] = {}
        self._devices: dict[str, int] = {}
        self._bytes = 0
        self._at = -(2**63)

    def advance(self, at_ns: int) -> int:
        """The measure at `at_ns` (never earlier than the previous call)."""
        if at_ns < self._at:
            raise ValueError("Slider times must not go back")
        self._at = at_ns
        rows, window = self._rows, self._rule.window_ns
        while self._hi < len(rows) and rows[self._hi].ts_ns <= at_ns:
            event = rows[self._hi]
            self._hi += 1
            n = self._docs.get(event.document, 0)
            if n == 0:
                self._bytes += event.size
            self._docs[event.document] = n + 1
            self._devices[event.device] = self._devices.get(event.device, 0) + 1
        while self._lo < self._hi and rows[self._lo].ts_ns <= at_ns - window:
            event = rows[self._lo]
            self._lo += 1
            n = self._docs[event.document] - 1
            if n == 0:
                del self._docs[event.document]
                self._bytes -= event.size
            else:
                self._docs[event.document] = n
            d = self._devices[event.device] - 1
            if d == 0:
                del self._devices[event.device]
            else:
                self._devices[event.device] = d
        match self._rule.measure:
            case Measure.COUNT:
                return self._hi - self._lo
            case Measure.DISTINCT_FILES:
                return len(self._docs)
            case Measure.BYTES:
                return self._bytes
            case Measure.DISTINCT_DEVICES:
                return len(self._devices)
            case _:
                assert_never(self._rule.measure)

    def verdict(self) -> CumulativeVerdict:
        """The full verdict at the last `advance` (evidence included): for crossings only."""
        return evaluate(self._rule, self._rows[self._lo : self._hi], self._at)
