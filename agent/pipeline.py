"""The glue between the stages: observations -> index / copy detector -> attribution -> Event.

Worker threads drain the watcher's queue and hand copy and coverage-gap `Event`s to
`emit` (then signer/spool). Every library call is a collaborator's.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import assert_never

from agent import __version__
from agent.attribution import AttributorProtocol
from agent.clock import Clock
from agent.config import AgentConfig, DestinationConfig
from agent.copy_detector import (
    CopyDetector,
    Decision,
    ExactCopy,
    NeedsHash,
    WriteTrigger,
    WrittenFile,
)
from agent.errors import AgentError
from agent.events import Action, CoverageGap, Event, EventId, FileRef
from agent.index import (
    Entry,
    Hasher,
    HashFailure,
    IndexOutcome,
    Scanner,
    ScanStats,
    SensitiveIndex,
    display,
    walk_files,
)
from agent.labels import Labeller
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
    ) -> None:
        self._config = config
        self._index = index
        self._detector = detector
        self._attributor = attributor
        self._hasher = hasher
        self._emit = emit
        self._clock = clock
        self._queue = observations
        self._scanner = scanner or Scanner(
            [os.fsencode(root) for root in config.sensitive_roots],
            Labeller(config),
            index,
            hasher,
        )
        self._drops = drops
        self._workers = workers
        self._gap_interval = gap_interval
        self._poll = poll_interval
        self._destinations: Mapping[bytes, DestinationConfig] = {
            os.fsencode(dest.path): dest for dest in config.destinations
        }
        self._decide_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._gap_lock = threading.Lock()
        self._gap_pending: Counter[str] = Counter()
        self._gap_last: dict[str, float] = {}
        self._rescan_lock = threading.Lock()
        self._rescan_again = threading.Event()
        self._threads: list[threading.Thread] = []
        self._started_wall_ns = 0
        self.failure: BaseException | None = None
        """Set when a worker died of an unexpected error (a bug); the service should exit."""

    # lifecycle

    def start(self) -> None:
        self._started_wall_ns = self._clock.wall_ns()
        self._threads = [
            threading.Thread(target=self._run, name=f"exfilwatch-pipeline-{i}")
            for i in range(self._workers)
        ]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Finish queued observations, stop the workers (one sentinel each), join them.

        Stop the watcher first, so nothing is queued after the sentinels.
        """
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
        self._flush_gaps(force=True)

    @property
    def alive(self) -> bool:
        return bool(self._threads) and all(t.is_alive() for t in self._threads)

    def stats(self) -> PipelineStats:
        with self._stats_lock:
            return PipelineStats(**{k: v for k, v in self._counts.items() if k in _STAT_FIELDS})

    def rescan(self) -> None:
        """Rebuild the index from the sensitive roots and re-check recent files at destinations.

        Used at startup and after lost events. Destination files are checked only
        when their ctime is after the pipeline started (earlier ones predate us;
        ctime, unlike mtime, cannot be set back by `cp -p`). Copies already in the
        index are not reported twice. Runs at most once at a time; a request
        during a run triggers one more run.
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
                since = self._started_wall_ns - 1_000_000_000
                for root in self._destinations:
                    for path, st in walk_files(root):
                        if st.st_ctime_ns >= since:
                            self._destination_file(root, path, WriteTrigger.SCAN, st)
                if not self._rescan_again.is_set():
                    break
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
                if obs is not _IDLE:
                    try:
                        self._handle(obs)
                    except AgentError:
                        self._count("errors")
                        logger.exception("failed to process %s", obs.kind)
                    self._count("observations")
                self._housekeeping()
        except BaseException as e:
            self.failure = e
            raise

    def _housekeeping(self) -> None:
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
            case ObservationKind.CLOSED_NO_WRITE:
                pass  # reads will feed the "probable" tier; not built yet
            case ObservationKind.DELETED:
                self._index.remove_path(obs.path)
            case ObservationKind.DIR_DELETED:
                self._index.remove_under(obs.path)
            case ObservationKind.DIR_CREATED:
                # Files already in a new directory may never get a close (cp -r):
                # look at them now; later closes of the same files are deduplicated.
                for path, st in walk_files(obs.path, recursive=False):
                    self._file(obs, path, WriteTrigger.SCAN, st)
            case ObservationKind.MOVED_IN:
                self._index.rename(obs.path, obs.dest_path)
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
                self._skip(written.path, hashed.failure or HashFailure.UNREADABLE)
                continue
            st = hashed.st
            with_hash = replace(
                written.with_hash(hashed.sha256), size=st.st_size, mtime_ns=st.st_mtime_ns
            )
            with self._decide_lock:
                copies += self._record(self._detector.feed(with_hash, self._clock.monotonic()))
        for copy in copies:
            self._report(copy, st)

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
