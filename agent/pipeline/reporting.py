"""The last step before `emit`: counters, coverage gaps and the record of reported copies.

Every stage of agent.pipeline reports through one `Reporter`: what it counted
(`PipelineStats`), what it may have missed (COVERAGE_GAP events, at most one per
reason per interval, with the count accumulated meanwhile) and, for copies,
whether a previous run reported the same one already (agent.reported).
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import TypeVar

from agent import __version__
from agent.clock import Clock
from agent.config import AgentConfig
from agent.errors import ReportedStoreError
from agent.events import Action, CoverageGap, Event, FileRef, event_id_at
from agent.index import Entry, HashFailure, ScanStats, display
from agent.reported import ReportedCopies

logger = logging.getLogger(__name__)

_T = TypeVar("_T")


class GapReason(StrEnum):
    """Reasons carried by COVERAGE_GAP events (strings on the wire)."""

    QUEUE_OVERFLOW = "queue_overflow"
    """The watcher dropped observations: our own bounded queue was full."""
    INOTIFY_OVERFLOW = "inotify_overflow"
    """The kernel dropped events (IN_Q_OVERFLOW)."""
    FANOTIFY_OVERFLOW = "fanotify_overflow"
    """The kernel dropped fanotify events (FAN_Q_OVERFLOW): some writers and readers
    of that moment are attributed by the lower tiers, and same_process may miss."""
    UNREADABLE_FILE = "unreadable_file"
    """A file could not be read to label or hash it."""
    FILE_TOO_LARGE = "file_too_large"
    """A same-size candidate existed but the file exceeds hashing.max_file_bytes."""
    WATCH_LOST = "watch_lost"
    """A watched root disappeared or its watches could not be rebuilt."""
    WATCH_LIMIT = "watch_limit"
    """The inotify watch limit was reached: folders went unwatched."""
    WATCHER_RESTARTED = "watcher_restarted"
    """The filesystem watcher died and was restarted (agent.supervisor); a rescan follows."""
    WORKER_RESTARTED = "worker_restarted"
    """A pipeline worker died and was restarted (agent.supervisor); a rescan follows."""
    ARCHIVE_INCOMPLETE = "archive_incomplete"
    """An archive at a destination was not fully hashed (archives limits, damage, encryption)."""


@dataclass(frozen=True)
class PipelineStats:
    """A snapshot of the pipeline's counters since start."""

    observations: int = 0
    """Observations fully handled."""
    copies: int = 0
    gap_events: int = 0
    vanished: int = 0
    """Files gone before we could stat, label or hash them (skipped)."""
    unreadable: int = 0
    too_large: int = 0
    changed: int = 0
    """Files written while we hashed them (their next close brings them back)."""
    queue_drops: int = 0
    overflows: int = 0
    fanotify_overflows: int = 0
    rescans: int = 0
    errors: int = 0
    """Observations whose handling raised (logged with the traceback, then skipped)."""
    reads: int = 0
    """READ events emitted (a folded repeat summary counts once)."""
    reads_folded: int = 0
    """Reads counted into an open folding window instead of an event of their own."""
    own_reads: int = 0
    """Closes caused by the agent's own labelling and hashing (never reported)."""
    deletes: int = 0
    renames: int = 0
    already_reported: int = 0
    """Copies found again (a rescan after restart) whose identity was reported before."""
    unmatched: int = 0
    """Destination writes that matched no labelled file by hash (then asked: content, reads)."""


_STAT_FIELDS = frozenset(PipelineStats.__dataclass_fields__)


def file_ref(entry: Entry) -> FileRef:
    return FileRef(
        path=entry.path,
        size=entry.size,
        sha256=entry.sha256,
        device=entry.dev,
        inode=entry.ino,
        mtime_ns=entry.mtime_ns,
    )


def identity(st: os.stat_result) -> tuple[int, int, int, int]:
    """The same content at the same inode: (dev, ino, size, mtime_ns)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def is_under(path: bytes, prefix: bytes) -> bool:
    prefix = prefix.rstrip(b"/")
    return path == prefix or path.startswith(prefix + b"/")


class Reporter:
    """Counters, rate-limited coverage gaps and the record of reported copies. Thread-safe.

    `emit` is the pipeline's sink (called from worker threads). `reported`
    (optional) remembers reported copy identities across restarts; when it fails
    the pipeline carries on without it (reporting twice beats not reporting).
    """

    def __init__(
        self,
        config: AgentConfig,
        clock: Clock,
        emit: Callable[[Event], None],
        *,
        reported: ReportedCopies | None = None,
        gap_interval: float = 1.0,
    ) -> None:
        self._config = config
        self._clock = clock
        self.emit = emit
        self.reported = reported
        self._gap_interval = gap_interval
        self._stats_lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._gap_lock = threading.Lock()
        self._gap_pending: Counter[str] = Counter()
        self._gap_last: dict[str, float] = {}

    # counters

    def count(self, name: str, n: int = 1) -> None:
        with self._stats_lock:
            self._counts[name] += n

    def stats(self) -> PipelineStats:
        with self._stats_lock:
            return PipelineStats(**{k: v for k, v in self._counts.items() if k in _STAT_FIELDS})

    def skip(self, path: bytes, failure: HashFailure) -> None:
        if failure is HashFailure.NOT_REGULAR:
            return
        if failure is HashFailure.VANISHED:
            self.count("vanished")
        elif failure is HashFailure.CHANGED:
            self.count("changed")
        elif failure is HashFailure.TOO_LARGE:
            self.count("too_large")
            self.gap(GapReason.FILE_TOO_LARGE)
        else:
            self.count("unreadable")
            self.gap(GapReason.UNREADABLE_FILE)
            logger.warning("cannot read %s: skipped", display(path))

    def account(self, stats: ScanStats) -> None:
        """Fold a scan's skips into our counters; unreadable files are coverage gaps."""
        if stats.vanished:
            self.count("vanished", stats.vanished)
        if stats.too_large:
            self.count("too_large", stats.too_large)
        if stats.unreadable:
            self.count("unreadable", stats.unreadable)
            self.gap(GapReason.UNREADABLE_FILE, stats.unreadable)

    # coverage gaps

    def gap(self, reason: str, count: int = 1) -> None:
        with self._gap_lock:
            self._gap_pending[reason] += count
        self.flush_gaps()

    def flush_gaps(self, *, force: bool = False) -> None:
        now = self._clock.monotonic()
        due: list[tuple[str, int]] = []
        with self._gap_lock:
            for reason, count in list(self._gap_pending.items()):
                last = self._gap_last.get(reason)
                if force or last is None or now - last >= self._gap_interval:
                    due.append((reason, count))
                    self._gap_last[reason] = now
                    del self._gap_pending[reason]
        for reason, count in due:
            self.count("gap_events")
            logger.warning("coverage gap: %s x%d", reason, count)
            wall_ns = self._clock.wall_ns()
            self.emit(
                Event(
                    event_id=event_id_at(wall_ns),
                    observed_at_ns=wall_ns,
                    action=Action.COVERAGE_GAP,
                    host=self._config.host,
                    agent_version=__version__,
                    gap=CoverageGap(reason=reason, count=count),
                )
            )

    # reported copies

    def reported_call(self, call: Callable[[ReportedCopies], _T], default: _T) -> _T:
        """Ask `reported`; when it fails, log and carry on with `default` (report, don't lose)."""
        if self.reported is None:
            return default
        try:
            return call(self.reported)
        except ReportedStoreError:
            logger.warning("record of reported copies failed", exc_info=True)
            return default


class LastAlive:
    """When the agent was last alive, in the record of reported copies (agent.reported).

    After a restart, rescans look at destination files changed since then (copies made
    while the agent was down). It moves forward only when it is true: once a rescan
    caught up (`caught_up`) and nothing is pending (the caller says, `idle`), at most
    every `interval` seconds. Old reported identities are pruned hourly.
    """

    def __init__(
        self,
        reporter: Reporter,
        clock: Clock,
        *,
        interval: float = 30.0,
        margin: float = 10.0,
        keep_days: int = 90,
    ) -> None:
        self._reporter = reporter
        self._clock = clock
        self._interval = interval
        self._margin_ns = int(margin * 1e9)
        self._keep_ns = keep_days * 86_400 * 10**9
        self.caught_up = False
        self._next = 0.0
        self._next_prune = 0.0

    def since_ns(self, started_wall_ns: int) -> int:
        """Where rescans look back to (wall ns): one second before `started_wall_ns`
        (files written while we were starting), or to when we were last alive (copies
        made while the agent was down), with a margin for events in flight then."""
        since = started_wall_ns - 1_000_000_000
        last = self._reporter.reported_call(lambda r: r.last_alive_ns(), None)
        if last is not None:
            since = min(since, last - self._margin_ns)
            logger.info(
                "last alive %.0f s ago: rescans look back to then", (started_wall_ns - last) / 1e9
            )
        return since

    def touch(self, *, idle: Callable[[], bool], force: bool = False) -> None:
        """Move "last alive" to now, when due and `idle()` (or `force`: at a clean stop)."""
        if self._reporter.reported is None or not self.caught_up:
            return
        now = self._clock.monotonic()
        if not force and (now < self._next or not idle()):
            return
        self._next = now + self._interval
        wall = self._clock.wall_ns()
        self._reporter.reported_call(lambda r: r.touch(wall), None)
        if now >= self._next_prune:
            self.prune()

    def prune(self) -> None:
        self._next_prune = self._clock.monotonic() + 3600.0
        cutoff = self._clock.wall_ns() - self._keep_ns
        pruned = self._reporter.reported_call(lambda r: r.prune(cutoff), 0)
        if pruned:
            logger.info("forgot %d reported copies older than the retention", pruned)
