"""Destination decisions, last rules: a write that matched no labelled file by hash or member.

DESIGN §3 rules 3-5, after exact_hash and archive_member (agent.pipeline.destination):
the file's own content carries a label (MIP metadata, a marker, card numbers:
`Labeller.content_label`) -> label_in_content; else the process that wrote it read
a labelled file before (fanotify's pid, agent.correlate) -> same_process; else the
same user read a labelled file of about its size moments before -> probable.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace

from agent import __version__
from agent.attribution import Attribution, PipelineAttributor
from agent.clock import Clock
from agent.config import AgentConfig
from agent.copy_detector import WriteTrigger, WrittenFile
from agent.correlate import ReadCorrelator
from agent.events import (
    Action,
    DetectionMethod,
    Event,
    FileRef,
    ProcessInfo,
    Sha256Hex,
    UserInfo,
    event_id_at,
)
from agent.index import Entry, Hasher, HashFailure, SensitiveIndex, display
from agent.labels import Labeller
from agent.pipeline.archives import Claims
from agent.pipeline.reporting import Reporter, file_ref, identity
from agent.reported import CopyIdentity

logger = logging.getLogger(__name__)

SLACK = 0.5
"""Seconds by which a read may be stamped after the write it explains.

Observations of different roots reach the queue through different watchdog emitter
threads: a copier's read of its source may be stamped (and queued) after its write
to the destination, by a few scheduling delays."""
HORIZON = 2.0
"""Seconds after a write whose observations are all handled before it is decided: the
reads within `SLACK`, and the exact copies that may spend them (made moments after
the read; agent.correlate `spend`), even on a loaded machine."""
CONFIRM = 0.05
"""Seconds between the two looks at `Progress` before a held write is decided."""
MAX_HELD = 1024
"""Writes held at most: beyond, the oldest are decided at once (a burst of unrelated
files at a destination holds only these; with nobody reading labelled files their
decision costs nothing)."""


@dataclass(slots=True)
class _Held:
    """A write that matched nothing by hash, waiting for the reads stamped near it."""

    written: WrittenFile
    st: os.stat_result
    at: float
    """The write's watcher stamp (monotonic)."""
    unsettled: bool
    """Seen on its create or by a scan, maybe half written: decided only if it held still."""
    ready_at: float | None = None
    """When `Progress.done_upto` first said yes; decided `CONFIRM` seconds later if it
    still does (a worker may have taken an observation without marking it yet)."""


class Progress:
    """How far the workers got through the watcher's stamps (they are queued in order).

    `begin`/`end` bracket the handling of each observation (`busy`: how many are
    being handled). `done_upto(t)`: nothing stamped at or before `t` is left to
    handle, so a write held until then has seen every read that may explain it, and
    every exact copy that may spend one.
    """

    def __init__(self, queue_empty: Callable[[], bool], now: Callable[[], float]) -> None:
        self._queue_empty = queue_empty
        self._now = now
        self._lock = threading.Lock()
        self._busy: Counter[float] = Counter()
        self._taken = float("-inf")
        """The latest stamp taken off the queue."""

    @property
    def busy(self) -> int:
        with self._lock:
            return self._busy.total()

    def begin(self, at: float) -> None:
        with self._lock:
            self._busy[at] += 1
            self._taken = max(self._taken, at)

    def end(self, at: float) -> None:
        with self._lock:
            self._busy[at] -= 1
            if self._busy[at] <= 0:
                del self._busy[at]

    def done_upto(self, t: float) -> bool:
        if self._now() < t:
            return False  # what is stamped up to t may not even be queued yet
        with self._lock:
            if any(at <= t for at in self._busy):
                return False
            taken = self._taken
        return taken >= t or self._queue_empty()


class UnmatchedStage:
    """Label in content, same process, probable: for writes the hash did not explain.

    Thread-safe. `read` is fed every attributed read of a labelled file (the access
    stage's `on_read`); `decide` is given each finished destination write that
    matched nothing by hash and is no archive of labelled files, with its watcher
    stamp `at` (None for a scan: now). A closed file's content label is reported at
    once (label_in_content). Otherwise the write is held until every observation
    stamped up to `HORIZON` seconds after it was handled (`progress`), then the
    correlator is asked (same_process, probable), from `expire` (housekeeping); a
    read stamped more than `SLACK` seconds after the write never explains it. A
    file seen on its create or by a directory scan may still be being written (a
    gzip stream is no archive yet, half a text shows a marker): it is decided only
    if it held still meanwhile, unless a newer decision (its close) came first.
    Content is read only when `labels.content` configures something, and the
    writer is attributed only when the correlator remembers reads: a burst of
    unrelated files at a destination costs neither. A reported file joins the
    index as a labelled copy (copies of it are exact copies), and is reported once
    per inode within `Claims`' window.
    """

    def __init__(
        self,
        config: AgentConfig,
        index: SensitiveIndex,
        attributor: PipelineAttributor,
        hasher: Hasher,
        clock: Clock,
        reporter: Reporter,
        lock: threading.Lock,
        labeller: Labeller,
        correlator: ReadCorrelator,
        *,
        progress: Progress | None = None,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._index = index
        self._attributor = attributor
        self._hasher = hasher
        self._clock = clock
        self._reporter = reporter
        self._lock = lock
        self._labeller = labeller
        self._correlator = correlator
        self._correlator_lock = threading.Lock()
        """Guards the correlator and `_held`."""
        self._held: OrderedDict[tuple[int, int], _Held] = OrderedDict()
        self._now = now
        self._progress = progress or Progress(lambda: True, now)
        self._claims = Claims()
        self._next_look = 0.0
        """`expire` has nothing to decide before this (monotonic)."""
        self._reads_content = labeller.reads_content

    def read(self, source: Entry, process: ProcessInfo | None, user: UserInfo, at: float) -> None:
        """A labelled file was read (by `process`, as `user`) at watcher time `at`."""
        with self._correlator_lock:
            self._correlator.read(source, process, user, at)

    def spend(self, source: Entry, process: ProcessInfo | None, user: UserInfo) -> None:
        """A write (an exact copy, an archive) by `process` came from `source`: that read
        explains nothing else (agent.correlate, `ReadCorrelator.spend`)."""
        with self._correlator_lock:
            self._correlator.spend(source.key, process, user, self._now() + SLACK)

    def decide(self, written: WrittenFile, st: os.stat_result, at: float | None) -> None:
        self._reporter.count("unmatched")
        key = (written.dev, written.ino)
        unsettled = written.trigger in (WriteTrigger.CREATE, WriteTrigger.SCAN)
        if not unsettled and self._reads_content and self._content(written, st):
            with self._correlator_lock:  # this decision supersedes a held one
                self._held.pop(key, None)
            return
        write = _Held(written, st, self._now() if at is None else at, unsettled)
        with self._correlator_lock:
            held = self._held
            held.pop(key, None)
            held[key] = write
            over = held.popitem(last=False)[1] if len(held) > MAX_HELD else None
        if over is not None:
            self._settle(over)

    def expire(self) -> None:
        """Decide the writes held long enough; forget reads too old to explain one
        (housekeeping)."""
        now = self._now()
        if now < self._next_look or (not self._held and not self._correlator):
            return  # the common case, after every observation: nothing to do
        due: list[_Held] = []
        with self._correlator_lock:
            while self._held:
                key, write = next(iter(self._held.items()))
                if not self._progress.done_upto(write.at + HORIZON):
                    write.ready_at = None
                    # Not before its horizon; then again at most every CONFIRM seconds.
                    self._next_look = max(write.at + HORIZON, now + CONFIRM)
                    break
                if write.ready_at is None:
                    write.ready_at = now
                if now - write.ready_at < CONFIRM:
                    self._next_look = write.ready_at + CONFIRM
                    break
                del self._held[key]
                due.append(write)
        for write in due:
            self._settle(write)
        with self._correlator_lock:  # after: the reads due writes needed are still there
            if self._correlator:
                self._correlator.expire(self._now())

    def flush(self) -> None:
        """At stop: decide every write still held."""
        with self._correlator_lock:
            due = list(self._held.values())
            self._held.clear()
        for write in due:
            self._settle(write)

    def _settle(self, write: _Held) -> None:
        written, st = write.written, write.st
        with self._correlator_lock:
            asked = bool(self._correlator)
        if not asked and not (write.unsettled and self._reads_content):
            return  # nothing to ask (a burst of unrelated files ends here, without I/O)
        if write.unsettled:
            outcome = self._hasher.stat(written.path)
            if outcome.st is None or identity(outcome.st) != identity(st):
                return  # still written (its close decides) or gone
            written = replace(written, trigger=WriteTrigger.SETTLED)
            if self._reads_content and self._content(written, st):
                return
        with self._correlator_lock:
            if not self._correlator:
                return  # nobody read a labelled file lately: nothing to ask
        attribution = self._attributor.attribute(written.path, st, seen_at=write.at)
        process, user, _ = attribution
        with self._correlator_lock:
            correlation = self._correlator.decide(written, process, user, write.at + SLACK)
        if correlation is None:
            return
        src = correlation.source
        self.spend(src, process, user)
        self._report(written, st, src, src.label, src.label_source, correlation.method, attribution)

    def _content(self, written: WrittenFile, st: os.stat_result) -> bool:
        """Report `written` if its content carries a label; True if it does."""
        found = self._labeller.content_label(written.path)
        if found is None:
            return False
        attribution = self._attributor.attribute(written.path, st)
        self._report(
            written, st, None, found.label, found.label_source,
            DetectionMethod.LABEL_IN_CONTENT, attribution,
        )  # fmt: skip
        return True

    def _report(
        self,
        written: WrittenFile,
        st: os.stat_result,
        source: Entry | None,
        label: str,
        label_source: str,
        method: DetectionMethod,
        attribution: Attribution,
    ) -> None:
        sha256 = written.sha256
        if sha256 is None:
            hashed = self._hasher.hash_file(written.path, st)
            if hashed.failure is HashFailure.TOO_LARGE and hashed.st is not None:
                sha256 = Sha256Hex("")  # report it unhashed: the label is what counts
            elif hashed.sha256 is None or hashed.st is None:
                self._reporter.skip(written.path, hashed.failure or HashFailure.UNREADABLE)
                return
            elif identity(hashed.st) != identity(st):
                return  # written since: its next close brings it back
            else:
                sha256 = hashed.sha256
        copy_id = CopyIdentity(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, sha256)
        if self._reporter.reported_call(lambda r: r.seen(copy_id), False):
            self._reporter.count("already_reported")
            return
        if not self._claims.claim((st.st_dev, st.st_ino), self._clock.monotonic()):
            return  # reported a moment ago (its create, then its close)
        if sha256:
            with self._lock:
                self._index.add(
                    Entry(
                        path=written.path, size=st.st_size, mtime_ns=st.st_mtime_ns,
                        sha256=sha256, label=label, label_source=label_source,
                        dev=st.st_dev, ino=st.st_ino, is_copy=True,
                    )
                )  # fmt: skip
        process, user, how = attribution
        wall_ns = self._clock.wall_ns()
        event = Event(
            event_id=event_id_at(wall_ns),
            observed_at_ns=wall_ns,
            action=Action.COPY,
            host=self._config.host,
            agent_version=__version__,
            source=file_ref(source) if source is not None else None,
            label=label,
            label_source=label_source,
            destination=FileRef(
                path=written.path,
                size=st.st_size,
                sha256=sha256,
                device=st.st_dev,
                inode=st.st_ino,
                mtime_ns=st.st_mtime_ns,
            ),
            destination_class=written.destination_class,
            device=written.device,
            process=process,
            user=user,
            detection=method,
            attribution=how,
        )
        self._reporter.count("copies")
        logger.info(
            "copy %s (%s): %s label=%s -> %s (%s)",
            event.event_id,
            method,
            display(source.path) if source is not None else "-",
            label,
            display(written.path),
            written.destination_class,
        )
        self._reporter.emit(event)
        self._reporter.reported_call(lambda r: r.add(copy_id, event.observed_at_ns), None)
