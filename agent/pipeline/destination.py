"""Destination decisions: a file finished at a destination -> which labelled file it copies.

In DESIGN §3's order: the copy detector by size and sha256 (exact_hash, a MOVE when
the labelled inode itself arrived), then the archive stage (archive_member), then,
for a write that matched nothing, agent.pipeline.unmatched (label_in_content,
same_process, probable). Every decided copy joins the index (copies of copies).
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import replace

from agent import __version__
from agent.attribution import PipelineAttributor
from agent.clock import Clock
from agent.config import AgentConfig
from agent.copy_detector import (
    CopyDetector,
    Decision,
    ExactCopy,
    NeedsHash,
    WriteTrigger,
    WrittenFile,
)
from agent.destinations import Destinations
from agent.events import Action, Event, FileRef, event_id_at
from agent.index import Entry, FileKey, Hasher, HashFailure, SensitiveIndex, display
from agent.pipeline.archives import ArchiveStage
from agent.pipeline.reporting import Reporter, is_under
from agent.pipeline.unmatched import UnmatchedStage
from agent.reported import CopyIdentity

logger = logging.getLogger(__name__)


class DestinationStage:
    """Decides on files finished at destinations and reports the copies. Thread-safe.

    `lock` (the decide lock) serialises the copy detector and the index changes
    that go with its decisions; hashing, archive scans and attribution run outside it.
    """

    def __init__(
        self,
        config: AgentConfig,
        index: SensitiveIndex,
        detector: CopyDetector,
        attributor: PipelineAttributor,
        hasher: Hasher,
        clock: Clock,
        reporter: Reporter,
        destinations: Destinations,
        archives: ArchiveStage,
        unmatched: UnmatchedStage,
        lock: threading.Lock,
    ) -> None:
        self._config = config
        self._index = index
        self._detector = detector
        self._attributor = attributor
        self._hasher = hasher
        self._clock = clock
        self._reporter = reporter
        self._destinations = destinations
        self._archives = archives
        self._unmatched = unmatched
        self.lock = lock

    # what the worker loop hands over

    def file(
        self,
        root: bytes,
        path: bytes,
        trigger: WriteTrigger,
        st: os.stat_result | None,
        at: float | None = None,
    ) -> None:
        """A file under the destination `root` may have finished (`at`: the watcher's
        stamp of the observation; None for a scan)."""
        dest = self._destinations.get(root)
        if dest is None:
            return
        if st is None:
            outcome = self._hasher.stat(path)
            if outcome.st is None or outcome.failure is not None:
                self._reporter.skip(path, outcome.failure or HashFailure.VANISHED)
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
        self._decide(written, st, at)

    def settle(self) -> None:
        """Decide what the detector hands back now: temp names never renamed, retries."""
        with self.lock:
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

    def recheck(self, size: int) -> None:
        """A labelled file of `size` bytes was just indexed: decide recent misses again."""
        with self.lock:
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

    def forget(self, key: FileKey) -> None:
        """The inode `key` is an original in a sensitive root (again): decide it afresh."""
        with self.lock:
            self._detector.forget(key)

    def deleted(self, path: bytes) -> Entry | None:
        """`path` was deleted: out of the index, kept by the detector as a recent source.

        Atomic for a copy of it being decided meanwhile (it must still find it).
        """
        with self.lock:
            entry = self._index.remove_path(path)
            if entry is not None:
                self._detector.removed(entry, self._clock.monotonic())
        return entry

    def deleted_under(self, path: bytes) -> list[Entry]:
        """The directory `path` was deleted: as `deleted`, for every entry below it."""
        with self.lock:
            under = [e for e in self._index.entries() if is_under(e.path, path)]
            self._index.remove_under(path)
            for entry in under:
                self._detector.removed(entry, self._clock.monotonic())
        return under

    # deciding

    def _decide(self, written: WrittenFile, st: os.stat_result, at: float | None = None) -> None:
        with self.lock:
            decisions = self._detector.feed(written, self._clock.monotonic())
            copies = self._record(decisions)
            unmatched = self._detector.unmatched(written)
        last = written
        for decision in decisions:
            if not isinstance(decision, NeedsHash):
                continue
            if written.size > self._config.hashing.max_file_bytes:
                self._reporter.skip(written.path, HashFailure.TOO_LARGE)
                continue
            hashed = self._hasher.hash_file(written.path, st)
            if hashed.sha256 is None or hashed.st is None:
                failure = hashed.failure or HashFailure.UNREADABLE
                if failure is HashFailure.CHANGED:  # its mtime may be set after the close
                    with self.lock:
                        self._detector.retry(written, self._clock.monotonic())
                self._reporter.skip(written.path, failure)
                continue
            st = hashed.st
            last = replace(
                written.with_hash(hashed.sha256), size=st.st_size, mtime_ns=st.st_mtime_ns
            )
            with self.lock:
                copies += self._record(self._detector.feed(last, self._clock.monotonic()))
                unmatched = self._detector.unmatched(last)
        for copy in copies:
            self._report(copy, st)
        archived = self._archives.scan(written, st)
        if unmatched and not copies and not archived:
            self._unmatched.decide(last, st, at)

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
        copy_id = CopyIdentity(w.dev, w.ino, w.size, w.mtime_ns, copy.sha256)
        if self._reporter.reported_call(lambda r: r.seen(copy_id), False):
            # Reported before (by a previous run: a rescan after a crash found it).
            self._reporter.count("already_reported")
            logger.debug("already reported: %s", display(w.path))
            return
        process, user, method = self._attributor.attribute(w.path, st)
        self._unmatched.spend(src, process, user)  # that read explains nothing else
        # The labelled inode itself arrived at the destination (mv on one filesystem,
        # or a hard link): a move. Anything else is a copy, including rsync's
        # temp-then-rename, which is a copy that ends with a rename.
        action = Action.MOVE if (src.dev, src.ino) == (w.dev, w.ino) else Action.COPY
        wall_ns = self._clock.wall_ns()
        event = Event(
            event_id=event_id_at(wall_ns),
            observed_at_ns=wall_ns,
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
        self._reporter.count("copies")
        logger.info(
            "%s %s: %s label=%s -> %s (%s)",
            action,
            event.event_id,
            display(src.path),
            src.label,
            display(w.path),
            w.destination_class,
        )
        self._reporter.emit(event)
        # After the spool has it: a crash in between reports it twice, never not at all.
        self._reporter.reported_call(lambda r: r.add(copy_id, event.observed_at_ns), None)
