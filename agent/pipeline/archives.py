"""Destination decisions, second rule: a labelled file packed into a zip or tar is still a copy.

After the exact-hash check (agent.pipeline.destination), every finished file at a
destination that is an archive has its members hashed (agent.archive, bounded);
a member equal to a labelled file is a COPY with detection archive_member.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import replace

from agent import __version__
from agent.archive import SkipReason, scan_archive, sniff
from agent.attribution import PipelineAttributor
from agent.clock import Clock
from agent.config import AgentConfig
from agent.copy_detector import WriteTrigger, WrittenFile, is_temp_name
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
from agent.index import Entry, Hasher, HashFailure, SensitiveIndex, Throttled, display
from agent.pipeline.reporting import GapReason, Reporter, file_ref, identity
from agent.reported import CopyIdentity

logger = logging.getLogger(__name__)

FINAL = (WriteTrigger.RENAME, WriteTrigger.SETTLED)
"""Triggers after which a temp-named file is decided as it is (`CopyDetector` rule 1)."""


class Claims:
    """What a stage did in the last `window` seconds (archives: file contents (dev, ino,
    size, mtime_ns) looked at, members reported, gaps reported; unmatched writes:
    inodes reported).

    At most `cap` (about 1.5 MB at 10,000): the oldest are forgotten first.
    """

    def __init__(self, window: float = 30.0, cap: int = 10_000) -> None:
        self._window = window
        self._cap = cap
        self._lock = threading.Lock()
        self._at: OrderedDict[Hashable, float] = OrderedDict()

    def claim(self, key: Hashable, now: float) -> bool:
        """True for the first claim of `key` within the window."""
        with self._lock:
            while self._at:
                oldest, at = next(iter(self._at.items()))
                if now - at < self._window and len(self._at) < self._cap:
                    break
                del self._at[oldest]
            if key in self._at:
                return False
            self._at[key] = now
            return True

    def release(self, key: Hashable) -> None:
        with self._lock:
            self._at.pop(key, None)


def _content(st: os.stat_result) -> tuple[int, int]:
    return (st.st_size, st.st_mtime_ns)


class ArchiveStage:
    """Scans archives finished at a destination; reports the labelled members. Thread-safe.

    `lock` is the destination stage's decide lock (the index gains the archive as
    a copy under it). `spend` is told of each member's source and the archiver
    (agent.pipeline.unmatched: that read explains nothing else).
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
        *,
        spend: Callable[[Entry, ProcessInfo | None, UserInfo], None] | None = None,
    ) -> None:
        self._config = config
        self._spend = spend
        self._index = index
        self._attributor = attributor
        self._hasher = hasher
        self._clock = clock
        self._reporter = reporter
        self._lock = lock
        self._claims = Claims()

    def scan(self, written: WrittenFile, st: os.stat_result) -> bool:
        """Hash the members of an archive that finished at a destination; report labelled ones.

        Called at the end of every decision on a destination file; True when the
        file is an archive holding labelled members (reported now or a moment ago).
        Temp names wait for their rename or settling, as in the detector (zip writes
        `ziXXXXXX` and renames it). Cheap first: the magic bytes (one 512-byte
        read). Not scanned when the index holds this very content as a copy
        already: an archive reported before, then renamed or found again by a
        rescan, or an exact copy of a labelled file (a labelled .docx is a zip).
        Each member whose sha256 and size equal a labelled file's is one COPY event
        with detection archive_member, its name in `archive_member`; the archive
        joins the index as a copy (copies of it are copies too). A scan that had to
        leave members out is a coverage gap.
        """
        archives = self._config.archives
        if not archives.enabled:
            return False
        if written.trigger not in FINAL and is_temp_name(written.path):
            return False  # as for the detector: its rename (or settling) brings it back
        # One look per content: a create and a close of the same file (often both seen
        # complete, in a burst) cost one sniff, and an archive handled by two workers
        # at once is not reported twice.
        if not self._claims.claim(identity(st), self._clock.monotonic()):
            return False
        if sniff(written.path) is None:
            return False
        own = self._index.get((written.dev, written.ino))
        if own is not None and own.is_copy and (own.size, own.mtime_ns) == _content(st):
            return False
        throttle = self._hasher.throttle if isinstance(self._hasher, Throttled) else None
        scan = scan_archive(written.path, archives.limits, throttle=throttle)
        again = self._hasher.stat(written.path)
        if scan is None or again.st is None or identity(again.st) != identity(st):
            # Renamed or rewritten meanwhile: its rename or next close brings it back.
            self._claims.release(identity(st))
            return False
        # A create seen while the file is still being written scans a truncated archive:
        # its close brings the whole (a file moved in has no close, but then it is whole).
        # One gap per archive file, however often it is looked at.
        truncated = bool(scan.reason) and set(scan.skipped) <= {SkipReason.CORRUPT}
        still_writing = written.trigger is WriteTrigger.CREATE and truncated
        if (
            not scan.complete
            and not still_writing
            and self._claims.claim((st.st_dev, st.st_ino, "gap"), self._clock.monotonic())
        ):
            logger.warning(
                "archive %s not fully scanned: %s %s",
                display(written.path),
                scan.reason or "skipped",
                ", ".join(f"{reason}={n}" for reason, n in scan.skipped.items()),
            )
            self._reporter.gap(GapReason.ARCHIVE_INCOMPLETE)
        matches: list[tuple[bytes, Entry]] = []
        for member in scan.members:
            entry = self._index.by_hash(member.sha256) if member.size else None
            if entry is not None and entry.size == member.size:
                matches.append((member.name, entry))
        if matches:
            self._report(written, st, matches)
        return bool(matches)

    def _report(
        self, written: WrittenFile, st: os.stat_result, matches: list[tuple[bytes, Entry]]
    ) -> None:
        hashed = self._hasher.hash_file(written.path, st)
        if hashed.failure is HashFailure.TOO_LARGE and hashed.st is not None:
            # Members were within the archive limits, the whole is past
            # hashing.max_file_bytes: report the members, the archive unhashed.
            hashed = replace(hashed, sha256=Sha256Hex(""))
        if hashed.sha256 is None or hashed.st is None:
            self._reporter.skip(written.path, hashed.failure or HashFailure.UNREADABLE)
            return
        if identity(hashed.st) != identity(st):
            return  # written since we scanned it: its next close brings it back
        sha256 = hashed.sha256
        copy_id = CopyIdentity(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, sha256)
        if self._reporter.reported_call(lambda r: r.seen(copy_id), False):
            self._reporter.count("already_reported")
            return
        best = self._index.best(entry for _, entry in matches) or matches[0][1]
        with self._lock:
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
            if not self._claims.claim((st.st_dev, st.st_ino, name, src.sha256), now):
                continue
            if self._spend is not None:
                self._spend(src, process, user)  # the archiver's read of it is explained
            event = Event(
                event_id=event_id_at(now_ns),
                observed_at_ns=now_ns,
                action=Action.COPY,
                host=self._config.host,
                agent_version=__version__,
                source=file_ref(src),
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
            self._reporter.count("copies")
            logger.info(
                "copy %s: %s label=%s -> %s member %s (%s)",
                event.event_id,
                display(src.path),
                src.label,
                display(written.path),
                display(name),
                written.destination_class,
            )
            self._reporter.emit(event)
        self._reporter.reported_call(lambda r: r.add(copy_id, now_ns), None)
