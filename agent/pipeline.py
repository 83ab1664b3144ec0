"""The glue between the stages: observations -> index / copy detector -> attribution -> Event.

Worker threads drain the watcher's queue and hand copy, access (read, delete,
rename) and coverage-gap `Event`s to `emit` (then signer/spool). Every library
call is a collaborator's.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any, TypeVar, assert_never

from agent import __version__
from agent.access import Fold, OwnReads, ReadFolder, ReadKey, ReadPolicy, track_own_opens
from agent.archive import SkipReason, scan_archive, sniff
from agent.attribution import AttributorProtocol
from agent.clock import Clock
from agent.config import AgentConfig
from agent.copy_detector import (
    CopyDetector,
    Decision,
    ExactCopy,
    NeedsHash,
    WriteTrigger,
    WrittenFile,
    is_temp_name,
)
from agent.destinations import Destinations
from agent.errors import ReportedStoreError
from agent.events import (
    Action,
    AttributionMethod,
    CoverageGap,
    DestinationClass,
    DetectionMethod,
    DeviceInfo,
    Event,
    EventId,
    FileRef,
    ProcessInfo,
    Sha256Hex,
    UserInfo,
)
from agent.index import (
    Entry,
    Hasher,
    HashFailure,
    IndexOutcome,
    Scanner,
    ScanStats,
    SensitiveIndex,
    Throttled,
    display,
    walk_files,
)
from agent.labels import Labeller
from agent.reported import CopyIdentity, ReportedCopies
from agent.watcher import Observation, ObservationKind, ObservationQueue, Role

logger = logging.getLogger(__name__)


class GapReason(StrEnum):
    """Reasons carried by COVERAGE_GAP events (strings on the wire)."""

    QUEUE_OVERFLOW = "queue_overflow"
    """The watcher dropped observations: our own bounded queue was full."""
    INOTIFY_OVERFLOW = "inotify_overflow"
    """The kernel dropped events (IN_Q_OVERFLOW)."""
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


_STAT_FIELDS = frozenset(PipelineStats.__dataclass_fields__)


class Pipeline:
    """Consumes observations in `workers` threads and emits copy and coverage-gap events.

    Needs: the frozen `config` (host, destinations and their class/device,
    hashing cap), the shared `index`, a `detector` over that index, an
    `attributor`, a `hasher` (stat + bounded sha256; the only file I/O), `emit`
    (called from worker threads, so it must be thread-safe, e.g. a spool append),
    a `clock`, and the watcher's `observations` queue. `drops` is the watcher's
    `take_dropped`, polled for queue drops. `scanner` defaults to one over the
    sensitive roots with a `Labeller(config)`.

    Copies are added to the index as labelled copies (copies of copies are caught).
    Coverage gaps are emitted at most once per `gap_interval` per reason, with the
    count accumulated meanwhile; `stop()` flushes what is left.

    Access events: reads of labelled files (CLOSED_NO_WRITE, when the watcher
    observes reads) are filtered by `config.access` and folded per (file,
    process, user) (`agent.access`); closes caused by this process's own opens
    (labelling, hashing, archives) are recognised by `own_reads`, fed from the
    audit hook while the pipeline runs (it compares against the watcher's stamps:
    both are `time.monotonic()`). Deletes and renames of indexed files (originals
    and detected copies) are reported as DELETE / RENAME.

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
        attributor: AttributorProtocol,
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
    ) -> None:
        self._config = config
        self._index = index
        self._detector = detector
        self._attributor = attributor
        self._hasher = hasher
        self._emit = emit
        self._clock = clock
        self._queue = observations
        self._own = own_reads if own_reads is not None else OwnReads()  # has __len__
        self._own_now = time.monotonic
        """OwnReads compares the audit hook's and the watcher's stamps: their clock, not ours."""
        self._untrack: Callable[[], None] | None = None
        self._scanner = scanner or _SerialScanner(
            [os.fsencode(root) for root in config.sensitive_roots],
            Labeller(config),
            index,
            hasher,
        )
        self._drops = drops
        self._workers = workers
        self._gap_interval = gap_interval
        self._poll = poll_interval
        # Shared with agent.destinations.DestinationTracker, which adds mounts as they come.
        self._destinations = (
            destinations if destinations is not None else Destinations.from_config(config)
        )
        self._decide_lock = threading.Lock()
        self._archives_claimed = _Claims()
        self._stats_lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._gap_lock = threading.Lock()
        self._gap_pending: Counter[str] = Counter()
        self._gap_last: dict[str, float] = {}
        self._rescan_lock = threading.Lock()
        self._rescan_again = threading.Event()
        self._rescan_requested = threading.Event()
        self._threads: list[threading.Thread] = []
        self._threads_lock = threading.Lock()
        self._started_wall_ns = 0
        self._since_ns = 0
        """Rescans look at destination files whose ctime is at or after this (wall ns)."""
        self._inflight = 0
        self._fatal = False
        # Access events.
        self._read_policy = ReadPolicy(config.access)
        self._access_lock = threading.Lock()
        self._folder: ReadFolder[_Read] = ReadFolder(config.access.fold_interval)
        # Reported copies and "last alive", across restarts.
        self._reported = reported
        self._alive_interval = alive_interval
        self._alive_margin_ns = int(alive_margin * 1e9)
        self._keep_reported_ns = keep_reported_days * 86_400 * 10**9
        self._caught_up = False
        """True once a rescan completed: only then may "last alive" move forward."""
        self._next_alive = 0.0
        self._next_prune = 0.0
        self.failure: BaseException | None = None
        """The last BaseException that ended a worker (a handler's Exception does not)."""

    # lifecycle

    def start(self) -> None:
        self._started_wall_ns = self._clock.wall_ns()
        # Without a record of when we were last alive, look back one second (files
        # written while we were starting); with one, look back to it (copies made
        # while the agent was down), with a margin for events still in flight then.
        self._since_ns = self._started_wall_ns - 1_000_000_000
        last_alive = self._reported_call(lambda r: r.last_alive_ns(), None)
        if last_alive is not None:
            self._since_ns = min(self._since_ns, last_alive - self._alive_margin_ns)
            logger.info(
                "last alive %.0f s ago: rescans look back to then",
                (self._started_wall_ns - last_alive) / 1e9,
            )
        self._prune_reported()
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
        with self._access_lock:
            folds = self._folder.flush()
        for fold in folds:
            self._report_read(fold)
        # Every queued observation was handled (the sentinels came after them), so
        # "last alive" may move to now, unless something is still owed a rescan.
        dropped = self._drops() if self._drops is not None else 0
        if dropped:
            self._count("queue_drops", dropped)
            self._gap(GapReason.QUEUE_OVERFLOW, dropped)
        self._flush_gaps(force=True)
        if not (dropped or self._fatal or self._rescan_requested.is_set()):
            self._touch_alive(force=True)
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
        self._gap(reason, count)

    def request_rescan(self) -> None:
        """Ask a worker to rescan soon (without blocking the caller)."""
        self._rescan_requested.set()

    def stats(self) -> PipelineStats:
        with self._stats_lock:
            return PipelineStats(**{k: v for k, v in self._counts.items() if k in _STAT_FIELDS})

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
                self._count("rescans")
                stats = self._scanner.scan()
                self._account(stats)
                since = self._since_ns
                for root in self._destinations.roots():
                    for path, st in walk_files(root):
                        if st.st_ctime_ns >= since:
                            self._destination_file(root, path, WriteTrigger.SCAN, st)
                if not self._rescan_again.is_set():
                    break
            self._caught_up = True
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
                        self._busy(1)
                        try:
                            self._handle(obs)
                        finally:
                            self._busy(-1)
                            self._count("observations")
                    self._housekeeping()
                except Exception:
                    self._count("errors")
                    logger.exception(
                        "failed to process %s %s: skipped", obs.kind, display(obs.current_path)
                    )
        except BaseException as e:
            # Not re-raised: the supervisor sees the dead worker, restarts it and
            # reports a coverage gap (agent.supervisor).
            self.failure = e
            self._fatal = True
            logger.critical("pipeline worker died: %r", e, exc_info=True)

    def _busy(self, n: int) -> None:
        with self._stats_lock:
            self._inflight += n

    def _housekeeping(self) -> None:
        if self._rescan_requested.is_set():
            self._rescan_requested.clear()
            self.rescan()
        if self._drops is not None:
            dropped = self._drops()
            if dropped:
                self._count("queue_drops", dropped)
                self._gap(GapReason.QUEUE_OVERFLOW, dropped)
                self.rescan()
        with self._decide_lock:
            settled = self._detector.due(self._clock.monotonic())
        for written in settled:
            outcome = self._hasher.stat(written.path)
            st = outcome.st
            if st is None or outcome.failure is not None:
                continue
            if (st.st_dev, st.st_ino) == (written.dev, written.ino):
                self._decide(
                    replace(written, size=st.st_size, mtime_ns=st.st_mtime_ns, sha256=None), st
                )
        self._own.settle(self._own_now())
        if len(self._folder):
            with self._access_lock:
                folds = self._folder.due(self._clock.monotonic())
            for fold in folds:
                self._report_read(fold)
        self._touch_alive()
        self._flush_gaps()

    def _handle(self, obs: Observation) -> None:
        kind = obs.kind
        match kind:
            case ObservationKind.OVERFLOW:
                logger.warning("inotify queue overflowed: events were lost, rescanning")
                self._gap(GapReason.INOTIFY_OVERFLOW)
                self._count("overflows")
                self.rescan()
            case ObservationKind.WATCH_LOST:
                logger.warning("watch lost on %s", display(obs.path or obs.root))
                self._gap(GapReason.WATCH_LOST)
            case ObservationKind.WATCH_LIMIT:
                logger.warning("inotify watch limit reached below %s", display(obs.root))
                self._gap(GapReason.WATCH_LIMIT)
            case ObservationKind.CLOSED_NO_WRITE:
                self._read(obs)
            case ObservationKind.DELETED:
                with self._decide_lock:  # atomic for a copy of it being decided meanwhile
                    entry = self._index.remove_path(obs.path)
                    if entry is not None:
                        self._detector.removed(entry, self._clock.monotonic())
                if entry is not None:
                    self._deleted(obs, entry)
            case ObservationKind.DIR_DELETED:
                with self._decide_lock:
                    under = [e for e in self._index.entries() if _is_under(e.path, obs.path)]
                    self._index.remove_under(obs.path)
                    for entry in under:
                        self._detector.removed(entry, self._clock.monotonic())
                for entry in under:
                    self._deleted(obs, entry)
            case ObservationKind.DIR_CREATED:
                # Files already in a new directory may never get a close (cp -r):
                # look at them now; later closes of the same files are deduplicated.
                for path, st in walk_files(obs.path, recursive=False):
                    self._file(obs, path, WriteTrigger.SCAN, st)
            case ObservationKind.MOVED_IN:
                moved = self._index.rename(obs.path, obs.dest_path)
                if moved is not None:
                    self._renamed(obs, moved)
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
            self._account(stats)
            entry = self._index.get_path(path)
            if outcome is IndexOutcome.INDEXED and entry is not None:
                # Back in a sensitive root (moved back): moving it out again is news.
                with self._decide_lock:
                    self._detector.forget(entry.key)
                self._reported_call(lambda r: r.forget(entry.dev, entry.ino), 0)
                self._recheck(entry.size)
        elif obs.role is Role.DESTINATION:
            self._destination_file(obs.root, path, trigger, st)

    def _destination_file(
        self, root: bytes, path: bytes, trigger: WriteTrigger, st: os.stat_result | None
    ) -> None:
        dest = self._destinations.get(root)
        if dest is None:
            return
        if st is None:
            outcome = self._hasher.stat(path)
            if outcome.st is None or outcome.failure is not None:
                self._skip(path, outcome.failure or HashFailure.VANISHED)
                return
            st = outcome.st
        if st.st_size == 0:
            return  # nothing written yet (a create); the close will come
        written = WrittenFile(
            path=path,
            size=st.st_size,
            dev=st.st_dev,
            ino=st.st_ino,
            mtime_ns=st.st_mtime_ns,
            destination_class=dest.destination_class,
            device=dest.device,
            trigger=trigger,
        )
        self._decide(written, st)

    def _recheck(self, size: int) -> None:
        """A labelled file of `size` bytes was just indexed: decide recent misses again."""
        with self._decide_lock:
            missed = self._detector.recheck(size, self._clock.monotonic())
        for written in missed:
            outcome = self._hasher.stat(written.path)
            st = outcome.st
            if st is None or outcome.failure is not None:
                continue
            if (st.st_dev, st.st_ino) != (written.dev, written.ino):
                continue
            unchanged = (st.st_size, st.st_mtime_ns) == (written.size, written.mtime_ns)
            self._decide(
                replace(
                    written,
                    size=st.st_size,
                    mtime_ns=st.st_mtime_ns,
                    sha256=written.sha256 if unchanged else None,
                ),
                st,
            )

    def _decide(self, written: WrittenFile, st: os.stat_result) -> None:
        with self._decide_lock:
            decisions = self._detector.feed(written, self._clock.monotonic())
            copies = self._record(decisions)
        for decision in decisions:
            if not isinstance(decision, NeedsHash):
                continue
            if written.size > self._config.hashing.max_file_bytes:
                self._skip(written.path, HashFailure.TOO_LARGE)
                continue
            hashed = self._hasher.hash_file(written.path, st)
            if hashed.sha256 is None or hashed.st is None:
                failure = hashed.failure or HashFailure.UNREADABLE
                if failure is HashFailure.CHANGED:  # its mtime may be set after the close
                    with self._decide_lock:
                        self._detector.retry(written, self._clock.monotonic())
                self._skip(written.path, failure)
                continue
            st = hashed.st
            with_hash = replace(
                written.with_hash(hashed.sha256), size=st.st_size, mtime_ns=st.st_mtime_ns
            )
            with self._decide_lock:
                copies += self._record(self._detector.feed(with_hash, self._clock.monotonic()))
        for copy in copies:
            self._report(copy, st)
        self._archive(written, st)

    def _record(self, decisions: list[Decision]) -> list[ExactCopy]:
        """Index each decided copy at once (under the decide lock): copies of copies."""
        copies = [d for d in decisions if isinstance(d, ExactCopy)]
        for copy in copies:
            w, src = copy.written, copy.source
            self._index.add(
                Entry(
                    path=w.path,
                    size=w.size,
                    mtime_ns=w.mtime_ns,
                    sha256=copy.sha256,
                    label=src.label,
                    label_source=src.label_source,
                    dev=w.dev,
                    ino=w.ino,
                    is_copy=True,
                )
            )
        return copies

    def _report(self, copy: ExactCopy, st: os.stat_result) -> None:
        w, src = copy.written, copy.source
        identity = CopyIdentity(w.dev, w.ino, w.size, w.mtime_ns, copy.sha256)
        if self._reported_call(lambda r: r.seen(identity), False):
            # Reported before (by a previous run: a rescan after a crash found it).
            self._count("already_reported")
            logger.debug("already reported: %s", display(w.path))
            return
        process, user, method = self._attributor.attribute(w.path, st)
        # The labelled inode itself arrived at the destination (mv on one filesystem,
        # or a hard link): a move. Anything else is a copy, including rsync's
        # temp-then-rename, which is a copy that ends with a rename.
        action = Action.MOVE if (src.dev, src.ino) == (w.dev, w.ino) else Action.COPY
        event = Event(
            event_id=EventId(str(uuid.uuid4())),
            observed_at_ns=self._clock.wall_ns(),
            action=action,
            host=self._config.host,
            agent_version=__version__,
            source=FileRef(
                path=src.path,
                size=src.size,
                sha256=src.sha256,
                device=src.dev,
                inode=src.ino,
                mtime_ns=src.mtime_ns,
            ),
            label=src.label,
            label_source=src.label_source,
            destination=FileRef(
                path=w.path,
                size=w.size,
                sha256=copy.sha256,
                device=w.dev,
                inode=w.ino,
                mtime_ns=w.mtime_ns,
            ),
            destination_class=w.destination_class,
            device=w.device,
            process=process,
            user=user,
            detection=copy.method,
            attribution=method,
        )
        self._count("copies")
        logger.info(
            "%s %s: %s label=%s -> %s (%s)",
            action,
            event.event_id,
            display(src.path),
            src.label,
            display(w.path),
            w.destination_class,
        )
        self._emit(event)
        # After the spool has it: a crash in between reports it twice, never not at all.
        self._reported_call(lambda r: r.add(identity, event.observed_at_ns), None)

    # archives: a labelled file packed into a zip or tar is still a copy

    def _archive(self, written: WrittenFile, st: os.stat_result) -> None:
        """Hash the members of an archive that finished at a destination; report labelled ones.

        Called at the end of every decision on a destination file. Temp names wait for
        their rename or settling, as in the detector (zip writes `ziXXXXXX` and renames
        it). Cheap first: the magic bytes (one 512-byte read). Not scanned when the index
        holds this very content as a copy already: an archive reported before, then
        renamed or found again by a rescan, or an exact copy of a labelled file (a
        labelled .docx is a zip). Each member whose sha256 and size equal a labelled
        file's is one COPY event with detection archive_member, its name in
        `archive_member`; the archive joins the index as a copy (copies of it are
        copies too). A scan that had to leave members out is a coverage gap.
        """
        archives = self._config.archives
        if not archives.enabled:
            return
        if written.trigger not in _FINAL and is_temp_name(written.path):
            return  # as for the detector: its rename (or settling) brings it back
        # One look per content: a create and a close of the same file (often both seen
        # complete, in a burst) cost one sniff, and an archive handled by two workers
        # at once is not reported twice.
        if not self._archives_claimed.claim(_identity(st), self._clock.monotonic()):
            return
        if sniff(written.path) is None:
            return
        own = self._index.get((written.dev, written.ino))
        if own is not None and own.is_copy and (own.size, own.mtime_ns) == _content(st):
            return
        throttle = self._hasher.throttle if isinstance(self._hasher, Throttled) else None
        scan = scan_archive(written.path, archives.limits, throttle=throttle)
        again = self._hasher.stat(written.path)
        if scan is None or again.st is None or _identity(again.st) != _identity(st):
            # Renamed or rewritten meanwhile: its rename or next close brings it back.
            self._archives_claimed.release(_identity(st))
            return
        # A create seen while the file is still being written scans a truncated archive:
        # its close brings the whole (a file moved in has no close, but then it is whole).
        # One gap per archive file, however often it is looked at.
        truncated = bool(scan.reason) and set(scan.skipped) <= {SkipReason.CORRUPT}
        still_writing = written.trigger is WriteTrigger.CREATE and truncated
        if (
            not scan.complete
            and not still_writing
            and self._archives_claimed.claim((st.st_dev, st.st_ino, "gap"), self._clock.monotonic())
        ):
            logger.warning(
                "archive %s not fully scanned: %s %s",
                display(written.path),
                scan.reason or "skipped",
                ", ".join(f"{reason}={n}" for reason, n in scan.skipped.items()),
            )
            self._gap(GapReason.ARCHIVE_INCOMPLETE)
        matches: list[tuple[bytes, Entry]] = []
        for member in scan.members:
            entry = self._index.by_hash(member.sha256) if member.size else None
            if entry is not None and entry.size == member.size:
                matches.append((member.name, entry))
        if matches:
            self._report_archive(written, st, matches)

    def _report_archive(
        self, written: WrittenFile, st: os.stat_result, matches: list[tuple[bytes, Entry]]
    ) -> None:
        hashed = self._hasher.hash_file(written.path, st)
        if hashed.failure is HashFailure.TOO_LARGE and hashed.st is not None:
            # Members were within the archive limits, the whole is past
            # hashing.max_file_bytes: report the members, the archive unhashed.
            hashed = replace(hashed, sha256=Sha256Hex(""))
        if hashed.sha256 is None or hashed.st is None:
            self._skip(written.path, hashed.failure or HashFailure.UNREADABLE)
            return
        if _identity(hashed.st) != _identity(st):
            return  # written since we scanned it: its next close brings it back
        sha256 = hashed.sha256
        identity = CopyIdentity(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, sha256)
        if self._reported_call(lambda r: r.seen(identity), False):
            self._count("already_reported")
            return
        best = self._index.best(entry for _, entry in matches) or matches[0][1]
        with self._decide_lock:
            self._index.add(
                replace(
                    best, path=written.path, size=st.st_size, mtime_ns=st.st_mtime_ns,
                    sha256=sha256, dev=st.st_dev, ino=st.st_ino, is_copy=True,
                )
            )  # fmt: skip
        process, user, method = self._attributor.attribute(written.path, hashed.st)
        archive = FileRef(
            path=written.path, size=st.st_size, sha256=sha256, device=st.st_dev,
            inode=st.st_ino, mtime_ns=st.st_mtime_ns,
        )  # fmt: skip
        now_ns = self._clock.wall_ns()
        now = self._clock.monotonic()
        for name, src in matches:
            # A member is reported once per archive file: a scan of the file while it was
            # written, then of the whole, or an append to a tar, find it again.
            if not self._archives_claimed.claim((st.st_dev, st.st_ino, name, src.sha256), now):
                continue
            event = Event(
                event_id=EventId(str(uuid.uuid4())),
                observed_at_ns=now_ns,
                action=Action.COPY,
                host=self._config.host,
                agent_version=__version__,
                source=_file_ref(src),
                label=src.label,
                label_source=src.label_source,
                destination=archive,
                destination_class=written.destination_class,
                device=written.device,
                process=process,
                user=user,
                detection=DetectionMethod.ARCHIVE_MEMBER,
                attribution=method,
                archive_member=name,
            )
            self._count("copies")
            logger.info(
                "copy %s: %s label=%s -> %s member %s (%s)",
                event.event_id,
                display(src.path),
                src.label,
                display(written.path),
                display(name),
                written.destination_class,
            )
            self._emit(event)
        self._reported_call(lambda r: r.add(identity, now_ns), None)

    # access events: reads, deletes, renames

    def _context(self, root: bytes) -> tuple[DestinationClass | None, DeviceInfo | None]:
        """The destination class and medium of a watched root (None for a sensitive root)."""
        dest = self._destinations.get(root)
        return (None, None) if dest is None else (dest.destination_class, dest.device)

    def _read(self, obs: Observation) -> None:
        # Ours first, labelled or not: every own close must settle its open (a copy
        # we hashed may be indexed only after its close arrives).
        if self._own.is_own(obs.path, obs.at):
            self._count("own_reads")
            return
        entry = self._index.get_path(obs.path)
        if entry is None or not self._read_policy.wanted(obs.path, entry.label):
            return
        outcome = self._hasher.stat(obs.path)
        if outcome.st is not None and outcome.failure is None:
            process, user, method = self._attributor.attribute(obs.path, outcome.st)
        else:  # gone already: the read happened, the reader is unknown
            process, user, method = None, UserInfo(), AttributionMethod.UNATTRIBUTED
        if self._read_policy.exempt(process):
            return
        read = _Read(entry, process, user, method, obs.root)
        with self._access_lock:
            fold = self._folder.feed(
                ReadKey.of(obs.path, process, user), read, self._clock.monotonic()
            )
        if fold is None:
            self._count("reads_folded")
        else:
            self._report_read(fold)

    def _report_read(self, fold: Fold[_Read]) -> None:
        read = fold.value
        klass, device = self._context(read.root)
        event = self._access_event(
            Action.READ, read.entry, klass, device, read.process, read.user, read.method
        )
        self._count("reads")
        logger.debug("read %s x%d: %s", event.event_id, fold.count, display(read.entry.path))
        self._emit(replace(event, count=fold.count))

    def _deleted(self, obs: Observation, entry: Entry) -> None:
        """A labelled file (original or copy) was deleted, or moved out of sight.

        The caller took it out of the index and handed it to the detector (a copy of
        it still being hashed must find it) in one step, under the decide lock.
        """
        klass, device = self._context(obs.root)
        event = self._access_event(Action.DELETE, entry, klass, device)
        self._count("deletes")
        logger.info("delete %s: %s label=%s", event.event_id, display(entry.path), entry.label)
        self._emit(event)

    def _renamed(self, obs: Observation, moved: Entry) -> None:
        """A labelled file was renamed inside a watched root; `moved` is at the new name."""
        outcome = self._hasher.stat(obs.dest_path)
        if outcome.st is not None and outcome.failure is None:
            process, user, method = self._attributor.attribute(obs.dest_path, outcome.st)
        else:
            process, user, method = None, UserInfo(), AttributionMethod.UNATTRIBUTED
        klass, device = self._context(obs.root)
        old = replace(moved, path=obs.path)
        event = replace(
            self._access_event(Action.RENAME, old, klass, device, process, user, method),
            destination=_file_ref(moved),
        )
        self._count("renames")
        logger.info(
            "rename %s: %s -> %s label=%s",
            event.event_id,
            display(obs.path),
            display(obs.dest_path),
            moved.label,
        )
        self._emit(event)

    def _access_event(
        self,
        action: Action,
        entry: Entry,
        klass: DestinationClass | None,
        device: DeviceInfo | None,
        process: ProcessInfo | None = None,
        user: UserInfo | None = None,
        method: AttributionMethod = AttributionMethod.UNATTRIBUTED,
    ) -> Event:
        return Event(
            event_id=EventId(str(uuid.uuid4())),
            observed_at_ns=self._clock.wall_ns(),
            action=action,
            host=self._config.host,
            agent_version=__version__,
            source=_file_ref(entry),
            label=entry.label,
            label_source=entry.label_source,
            destination_class=klass,
            device=device,
            process=process,
            user=user or UserInfo(),
            attribution=method,
        )

    # reported copies and "last alive"

    def _reported_call(self, call: Callable[[ReportedCopies], _T], default: _T) -> _T:
        """Ask `reported`; when it fails, log and carry on with `default` (report, don't lose)."""
        if self._reported is None:
            return default
        try:
            return call(self._reported)
        except ReportedStoreError:
            logger.warning("record of reported copies failed", exc_info=True)
            return default

    def _touch_alive(self, *, force: bool = False) -> None:
        """Move "last alive" forward, but only when nothing is pending (so it is true)."""
        if self._reported is None or not self._caught_up:
            return
        now = self._clock.monotonic()
        if not force:
            if now < self._next_alive or self._rescan_requested.is_set():
                return
            if self._rescan_lock.locked() or not self._queue.empty():
                return
            with self._stats_lock:
                if self._inflight:
                    return
        self._next_alive = now + self._alive_interval
        wall = self._clock.wall_ns()
        self._reported_call(lambda r: r.touch(wall), None)
        if now >= self._next_prune:
            self._prune_reported()

    def _prune_reported(self) -> None:
        self._next_prune = self._clock.monotonic() + 3600.0
        cutoff = self._clock.wall_ns() - self._keep_reported_ns
        pruned = self._reported_call(lambda r: r.prune(cutoff), 0)
        if pruned:
            logger.info("forgot %d reported copies older than the retention", pruned)

    # counting and coverage gaps

    def _count(self, name: str, n: int = 1) -> None:
        with self._stats_lock:
            self._counts[name] += n

    def _skip(self, path: bytes, failure: HashFailure) -> None:
        if failure is HashFailure.NOT_REGULAR:
            return
        if failure is HashFailure.VANISHED:
            self._count("vanished")
        elif failure is HashFailure.CHANGED:
            self._count("changed")
        elif failure is HashFailure.TOO_LARGE:
            self._count("too_large")
            self._gap(GapReason.FILE_TOO_LARGE)
        else:
            self._count("unreadable")
            self._gap(GapReason.UNREADABLE_FILE)
            logger.warning("cannot read %s: skipped", display(path))

    def _account(self, stats: ScanStats) -> None:
        """Fold a scan's skips into our counters; unreadable files are coverage gaps."""
        if stats.vanished:
            self._count("vanished", stats.vanished)
        if stats.too_large:
            self._count("too_large", stats.too_large)
        if stats.unreadable:
            self._count("unreadable", stats.unreadable)
            self._gap(GapReason.UNREADABLE_FILE, stats.unreadable)

    def _gap(self, reason: str, count: int = 1) -> None:
        with self._gap_lock:
            self._gap_pending[reason] += count
        self._flush_gaps()

    def _flush_gaps(self, *, force: bool = False) -> None:
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
            self._count("gap_events")
            logger.warning("coverage gap: %s x%d", reason, count)
            self._emit(
                Event(
                    event_id=EventId(str(uuid.uuid4())),
                    observed_at_ns=self._clock.wall_ns(),
                    action=Action.COVERAGE_GAP,
                    host=self._config.host,
                    agent_version=__version__,
                    gap=CoverageGap(reason=reason, count=count),
                )
            )


_IDLE = Observation(ObservationKind.CLOSED_NO_WRITE, b"", b"", None, 0.0)
"""Stands for "no observation this poll" inside the worker loop."""

_T = TypeVar("_T")


@dataclass(frozen=True)
class _Read:
    """One read of a labelled file, as folded by `ReadFolder`."""

    entry: Entry
    process: ProcessInfo | None
    user: UserInfo
    method: AttributionMethod
    root: bytes
    """The watched root it was seen under (a destination: a copy was read)."""


class _Claims:
    """What the archive stage did in the last `window` seconds: file contents (dev, ino,
    size, mtime_ns) looked at, members reported, gaps reported.

    At most `cap` (about 1.5 MB at 10,000): the oldest are forgotten first.
    """

    def __init__(self, window: float = 30.0, cap: int = 10_000) -> None:
        self._window = window
        self._cap = cap
        self._lock = threading.Lock()
        self._at: OrderedDict[Hashable, float] = OrderedDict()

    def claim(self, identity: Hashable, now: float) -> bool:
        """True for the first claim of `identity` within the window."""
        with self._lock:
            while self._at:
                oldest, at = next(iter(self._at.items()))
                if now - at < self._window and len(self._at) < self._cap:
                    break
                del self._at[oldest]
            if identity in self._at:
                return False
            self._at[identity] = now
            return True

    def release(self, identity: Hashable) -> None:
        with self._lock:
            self._at.pop(identity, None)


_FINAL = (WriteTrigger.RENAME, WriteTrigger.SETTLED)
"""Triggers after which a temp-named file is decided as it is (`CopyDetector` rule 1)."""


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    """The same content at the same inode: (dev, ino, size, mtime_ns)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _content(st: os.stat_result) -> tuple[int, int]:
    return (st.st_size, st.st_mtime_ns)


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


def _file_ref(entry: Entry) -> FileRef:
    return FileRef(
        path=entry.path,
        size=entry.size,
        sha256=entry.sha256,
        device=entry.dev,
        inode=entry.ino,
        mtime_ns=entry.mtime_ns,
    )


def _is_under(path: bytes, prefix: bytes) -> bool:
    prefix = prefix.rstrip(b"/")
    return path == prefix or path.startswith(prefix + b"/")
