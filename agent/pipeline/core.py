"""The pipeline's worker loop: observations off the watcher's queue, each to its stage.

Sensitive-root changes go to the index (scanner), destination files to
agent.pipeline.destination, reads, deletes and renames to
agent.pipeline.access_events; lost events become coverage gaps and rescans
(agent.pipeline.reporting). The lifecycle (start, stop, restart of dead
workers, rescans, "last alive") lives here.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, assert_never

from agent.access import OwnReads, track_own_opens
from agent.attribution import PipelineAttributor
from agent.clock import Clock
from agent.config import AgentConfig
from agent.copy_detector import CopyDetector, WriteTrigger
from agent.correlate import ReadCorrelator
from agent.destinations import Destinations
from agent.events import Event
from agent.index import (
    Hasher,
    IndexOutcome,
    Scanner,
    ScanStats,
    SensitiveIndex,
    display,
    walk_files,
)
from agent.labels import Labeller
from agent.pipeline.access_events import AccessStage
from agent.pipeline.archives import ArchiveStage
from agent.pipeline.destination import DestinationStage
from agent.pipeline.reporting import GapReason, LastAlive, PipelineStats, Reporter
from agent.pipeline.unmatched import Progress, UnmatchedStage
from agent.reported import ReportedCopies
from agent.watcher import Observation, ObservationKind, ObservationQueue, Role

logger = logging.getLogger(__name__)


class Pipeline:
    """Consumes observations in `workers` threads and emits copy, access and coverage-gap events.

    Needs: the frozen `config` (host, destinations and their class/device,
    hashing cap), the shared `index`, a `detector` over that index, an
    `attributor` (the writer of a destination file, the reader of a labelled
    one), a `hasher` (stat + bounded sha256; the only file I/O), `emit` (called
    from worker threads, so it must be thread-safe, e.g. a spool append), a
    `clock`, and the watcher's `observations` queue. `drops` is the watcher's
    `take_dropped`, polled for queue drops; `attribution_overflows` the
    attributor's `take_overflows`, polled for fanotify queue overflows (each a
    coverage gap). `scanner` defaults to one over the sensitive roots with
    `labeller` (default `Labeller(config)`, which also reads labels in the
    content of files arriving at destinations).

    Copies are added to the index as labelled copies (copies of copies are caught);
    a write that matched no labelled file is asked about its content's label and
    about recent reads of labelled files (`correlator`, agent.correlate).
    Coverage gaps are emitted at most once per `gap_interval` per reason, with the
    count accumulated meanwhile; `stop()` flushes what is left.

    Access events: reads of labelled files (CLOSED_NO_WRITE, when the watcher
    observes reads) are attributed to their reader, filtered by `config.access`
    and folded per (file, process, user) (`agent.access`); closes caused by this
    process's own opens (labelling, hashing, archives) are recognised by
    `own_reads`, fed from the audit hook while the pipeline runs (it compares
    against the watcher's stamps: both are `time.monotonic()`). Deletes and
    renames of indexed files (originals and detected copies) are reported as
    DELETE / RENAME.

    `reported` (optional) remembers reported copy identities and when we were
    last alive, across restarts: the rescans look at destination files changed
    since then, and a copy whose identity was reported already is not reported
    again. A handler exception is logged, counted and skipped; only a
    BaseException ends a worker, and `restart_workers` replaces it.
    """

    def __init__(
        self,
        config: AgentConfig,
        index: SensitiveIndex,
        detector: CopyDetector,
        attributor: PipelineAttributor,
        hasher: Hasher,
        emit: Callable[[Event], None],
        clock: Clock,
        *,
        observations: ObservationQueue,
        scanner: Scanner | None = None,
        drops: Callable[[], int] | None = None,
        workers: int = 2,
        gap_interval: float = 1.0,
        poll_interval: float = 0.25,
        destinations: Destinations | None = None,
        reported: ReportedCopies | None = None,
        own_reads: OwnReads | None = None,
        alive_interval: float = 30.0,
        alive_margin: float = 10.0,
        keep_reported_days: int = 90,
        labeller: Labeller | None = None,
        correlator: ReadCorrelator | None = None,
        attribution_overflows: Callable[[], int] | None = None,
    ) -> None:
        self._config = config
        self._index = index
        self._clock = clock
        self._queue = observations
        self._own = own_reads if own_reads is not None else OwnReads()  # has __len__
        self._own_now = time.monotonic
        """OwnReads compares the audit hook's and the watcher's stamps: their clock, not ours."""
        self._untrack: Callable[[], None] | None = None
        labeller = labeller or Labeller(config)
        self._scanner = scanner or _SerialScanner(
            [os.fsencode(root) for root in config.sensitive_roots], labeller, index, hasher
        )
        self._drops = drops
        self._overflows = attribution_overflows
        self._workers = workers
        self._poll = poll_interval
        # Shared with agent.destinations.DestinationTracker, which adds mounts as they come.
        self._destinations = (
            destinations if destinations is not None else Destinations.from_config(config)
        )
        self._report = Reporter(config, clock, emit, reported=reported, gap_interval=gap_interval)
        decide_lock = threading.Lock()
        self._progress = Progress(observations.empty, self._own_now)
        self._unmatched = UnmatchedStage(
            config, index, attributor, hasher, clock, self._report, decide_lock, labeller,
            correlator or ReadCorrelator(), progress=self._progress, now=self._own_now,
        )  # fmt: skip
        self._dest = DestinationStage(
            config,
            index,
            detector,
            attributor,
            hasher,
            clock,
            self._report,
            self._destinations,
            ArchiveStage(
                config,
                index,
                attributor,
                hasher,
                clock,
                self._report,
                decide_lock,
                spend=self._unmatched.spend,
            ),
            self._unmatched,
            decide_lock,
        )
        self._access = AccessStage(
            config, index, attributor, hasher, clock, self._report, self._destinations,
            self._own, on_read=self._unmatched.read,
        )  # fmt: skip
        self._rescan_lock = threading.Lock()
        self._rescan_again = threading.Event()
        self._rescan_requested = threading.Event()
        self._threads: list[threading.Thread] = []
        self._threads_lock = threading.Lock()
        self._since_ns = 0
        """Rescans look at destination files whose ctime is at or after this (wall ns)."""
        self._fatal = False
        self._alive = LastAlive(
            self._report, clock, interval=alive_interval, margin=alive_margin,
            keep_days=keep_reported_days,
        )  # fmt: skip
        self.failure: BaseException | None = None
        """The last BaseException that ended a worker (a handler's Exception does not)."""

    # lifecycle

    def start(self) -> None:
        self._since_ns = self._alive.since_ns(self._clock.wall_ns())
        self._alive.prune()
        if self._untrack is None:  # every open this process makes is ours, not a read
            self._untrack = track_own_opens(self._own)
        with self._threads_lock:
            self._threads = [self._thread(i) for i in range(self._workers)]
            for thread in self._threads:
                thread.start()

    def _thread(self, i: int) -> threading.Thread:
        return threading.Thread(target=self._run, name=f"exfilwatch-pipeline-{i}")

    def stop(self) -> None:
        """Finish queued observations, stop the workers (one sentinel each), join them.

        Stop the watcher first, so nothing is queued after the sentinels. A second
        call does nothing.
        """
        if not self._threads:
            return
        for _ in self._threads:
            while True:
                try:
                    self._queue.put(None, timeout=self._poll)
                    break
                except queue.Full:
                    if not any(t.is_alive() for t in self._threads):
                        break
        for thread in self._threads:
            thread.join()
        self._threads = []
        self._access.flush()
        self._unmatched.flush()
        # Every queued observation was handled (the sentinels came after them), so
        # "last alive" may move to now, unless something is still owed a rescan.
        dropped = self._drops() if self._drops is not None else 0
        if dropped:
            self._report.count("queue_drops", dropped)
            self._report.gap(GapReason.QUEUE_OVERFLOW, dropped)
        self._take_overflows()
        self._report.flush_gaps(force=True)
        if not (dropped or self._fatal or self._rescan_requested.is_set()):
            self._alive.touch(idle=self._idle, force=True)
        if self._untrack is not None:
            self._untrack()
            self._untrack = None

    @property
    def alive(self) -> bool:
        return bool(self._threads) and all(t.is_alive() for t in self._threads)

    def restart_workers(self) -> int:
        """Replace workers that died (a BaseException); returns how many were restarted.

        A rescan is requested (a worker runs it); the caller (agent.supervisor)
        reports the coverage gap.
        """
        restarted = 0
        with self._threads_lock:
            for i, thread in enumerate(self._threads):
                if not thread.is_alive():
                    self._threads[i] = self._thread(i)
                    self._threads[i].start()
                    restarted += 1
            if restarted:
                # What the dead worker held is covered by the rescan the caller asks
                # for; until it ran, "last alive" stays where it was.
                self._fatal = False
                self._rescan_requested.set()
        if restarted:
            logger.warning("restarted %d pipeline worker(s)", restarted)
        return restarted

    def report_gap(self, reason: str, count: int = 1) -> None:
        """Report a coverage gap noticed outside the pipeline (rate-limited per reason)."""
        self._report.gap(reason, count)

    def request_rescan(self) -> None:
        """Ask a worker to rescan soon (without blocking the caller)."""
        self._rescan_requested.set()

    def stats(self) -> PipelineStats:
        return self._report.stats()

    def rescan(self) -> None:
        """Rebuild the index from the sensitive roots and re-check recent files at destinations.

        Used at startup and after lost events. Destination files are checked only
        when their ctime is after the pipeline started, or after the agent was last
        alive when `reported` knows it (copies made while it was down); ctime,
        unlike mtime, cannot be set back by `cp -p`. Copies already in the index,
        or whose identity `reported` holds, are not reported twice. Runs at most
        once at a time; a request during a run triggers one more run.
        """
        if not self._rescan_lock.acquire(blocking=False):
            self._rescan_again.set()
            return
        try:
            while True:
                self._rescan_again.clear()
                self._report.count("rescans")
                stats = self._scanner.scan()
                self._report.account(stats)
                since = self._since_ns
                for root in self._destinations.roots():
                    for path, st in walk_files(root):
                        if st.st_ctime_ns >= since:
                            self._dest.file(root, path, WriteTrigger.SCAN, st)
                if not self._rescan_again.is_set():
                    break
            self._alive.caught_up = True  # only now may "last alive" move forward
        finally:
            self._rescan_lock.release()

    # worker

    def _run(self) -> None:
        try:
            while True:
                try:
                    obs = self._queue.get(timeout=self._poll)
                except queue.Empty:
                    obs = _IDLE
                if obs is None:
                    return
                # The loop boundary: whatever one observation (or housekeeping)
                # raises is logged, counted and skipped; a blind worker is worse
                # than one missed observation, and the next rescan covers it.
                try:
                    if obs is not _IDLE:
                        self._progress.begin(obs.at)
                        try:
                            self._handle(obs)
                        finally:
                            self._progress.end(obs.at)
                            self._report.count("observations")
                    self._housekeeping()
                except Exception:
                    self._report.count("errors")
                    logger.exception(
                        "failed to process %s %s: skipped", obs.kind, display(obs.current_path)
                    )
        except BaseException as e:
            # Not re-raised: the supervisor sees the dead worker, restarts it and
            # reports a coverage gap (agent.supervisor).
            self.failure = e
            self._fatal = True
            logger.critical("pipeline worker died: %r", e, exc_info=True)

    def _housekeeping(self) -> None:
        if self._rescan_requested.is_set():
            self._rescan_requested.clear()
            self.rescan()
        if self._drops is not None:
            dropped = self._drops()
            if dropped:
                self._report.count("queue_drops", dropped)
                self._report.gap(GapReason.QUEUE_OVERFLOW, dropped)
                self.rescan()
        self._take_overflows()
        self._dest.settle()
        self._own.settle(self._own_now())
        self._access.due()
        self._unmatched.expire()
        self._alive.touch(idle=self._idle)
        self._report.flush_gaps()

    def _take_overflows(self) -> None:
        """fanotify overflows: attribution (not detection) was lost, so a gap, no rescan."""
        overflows = self._overflows() if self._overflows is not None else 0
        if overflows:
            logger.warning(
                "fanotify queue overflowed %d times: some events lost their pid", overflows
            )
            self._report.count("fanotify_overflows", overflows)
            self._report.gap(GapReason.FANOTIFY_OVERFLOW, overflows)

    def _handle(self, obs: Observation) -> None:
        kind = obs.kind
        match kind:
            case ObservationKind.OVERFLOW:
                logger.warning("inotify queue overflowed: events were lost, rescanning")
                self._report.gap(GapReason.INOTIFY_OVERFLOW)
                self._report.count("overflows")
                self.rescan()
            case ObservationKind.WATCH_LOST:
                logger.warning("watch lost on %s", display(obs.path or obs.root))
                self._report.gap(GapReason.WATCH_LOST)
            case ObservationKind.WATCH_LIMIT:
                logger.warning("inotify watch limit reached below %s", display(obs.root))
                self._report.gap(GapReason.WATCH_LIMIT)
            case ObservationKind.CLOSED_NO_WRITE:
                self._access.read(obs)
            case ObservationKind.DELETED:
                entry = self._dest.deleted(obs.path)
                if entry is not None:
                    self._access.deleted(obs, entry)
            case ObservationKind.DIR_DELETED:
                for entry in self._dest.deleted_under(obs.path):
                    self._access.deleted(obs, entry)
            case ObservationKind.DIR_CREATED:
                # Files already in a new directory may never get a close (cp -r):
                # look at them now; later closes of the same files are deduplicated.
                for path, st in walk_files(obs.path, recursive=False):
                    self._file(obs, path, WriteTrigger.SCAN, st)
            case ObservationKind.MOVED_IN:
                moved = self._index.rename(obs.path, obs.dest_path)
                if moved is not None:
                    self._access.renamed(obs, moved)
                self._file(obs, obs.dest_path, WriteTrigger.RENAME)
            case ObservationKind.CREATED:
                self._file(obs, obs.path, WriteTrigger.CREATE)
            case ObservationKind.CLOSED_WRITE:
                self._file(obs, obs.path, WriteTrigger.CLOSE)
            case ObservationKind.ATTRIB:
                if obs.role is Role.SENSITIVE:  # a label may have been set or removed
                    self._file(obs, obs.path, WriteTrigger.CLOSE)
            case _:
                assert_never(kind)

    def _file(
        self,
        obs: Observation,
        path: bytes,
        trigger: WriteTrigger,
        st: os.stat_result | None = None,
    ) -> None:
        if obs.role is Role.SENSITIVE:
            stats = ScanStats()
            outcome = self._scanner.index_file(path, st, stats)
            self._report.account(stats)
            entry = self._index.get_path(path)
            if outcome is IndexOutcome.INDEXED and entry is not None:
                # Back in a sensitive root (moved back): moving it out again is news.
                self._dest.forget(entry.key)
                self._report.reported_call(lambda r: r.forget(entry.dev, entry.ino), 0)
                self._dest.recheck(entry.size)
        elif obs.role is Role.DESTINATION:
            # A scan has no time of its own: files it finds were written before now.
            at = None if trigger is WriteTrigger.SCAN else obs.at
            self._dest.file(obs.root, path, trigger, st, at)

    def _idle(self) -> bool:
        """Nothing pending: "last alive" may move to now (agent.pipeline.reporting)."""
        if self._rescan_requested.is_set() or self._rescan_lock.locked():
            return False
        if not self._queue.empty():
            return False
        return not self._progress.busy


_IDLE = Observation(ObservationKind.CLOSED_NO_WRITE, b"", b"", None, 0.0)
"""Stands for "no observation this poll" inside the worker loop."""


class _SerialScanner(Scanner):
    """The default scanner: one file is labelled and indexed by one thread at a time.

    Two workers (or a worker and a rescan) may handle the same file at once: its
    close and the label set on it just after (ATTRIB). The one that read no label
    yet would then remove the entry the other had just indexed ("label removed").
    """

    _STRIPES = 64

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._locks = [threading.Lock() for _ in range(self._STRIPES)]

    def index_file(
        self, path: bytes, st: os.stat_result | None = None, stats: ScanStats | None = None
    ) -> IndexOutcome:
        with self._locks[hash(path) % self._STRIPES]:
            return super().index_file(path, st, stats)
