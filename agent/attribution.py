"""Attribution, after the copy detector: who wrote (or read) the file. Never raises.

Tiers, best first (FIELD-NOTES §3.5, DESIGN §4): fanotify's record of the last
writer or reader (root; FANOTIFY), a holder remembered from an open-time /proc
scan (PROCESS_CACHE), a holder found by a /proc scan now (PROC_SCAN), the file's
owner (FILE_OWNER), else UNATTRIBUTED. Every event says which tier answered.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Protocol

import psutil

from agent.errors import AgentError, FanotifyError
from agent.events import AttributionMethod, ProcessInfo, UserInfo
from agent.fanmarks import FanotifyMarks, own_filesystems
from agent.fanotify import Access, Fanotify, MarkScope
from agent.mounts import Mount, read_mounts
from agent.proccache import ProcessCache, ProcessFacts, user_name
from agent.watcher import Role

__all__ = [
    "AccessLog",
    "Attribution",
    "Attributor",
    "AttributorProtocol",
    "PipelineAttributor",
    "ReaderAttributorProtocol",
    "open_attributor",
    "user_name",
]

logger = logging.getLogger(__name__)

Attribution = tuple[ProcessInfo | None, UserInfo, AttributionMethod]

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR
DEFAULT_FLUSH_TIMEOUT = 1.0
"""Seconds `attribute` may wait for the fanotify reader to catch up when it has no
record: about 100 µs when it keeps up; long only when it is behind a flood."""
DEFAULT_OPENED_CAPACITY = 1024
DEFAULT_OPENED_MAX_AGE = 60.0


class AttributorProtocol(Protocol):
    def attribute(
        self, path: bytes, st: os.stat_result, *, seen_at: float | None = None
    ) -> Attribution: ...


class ReaderAttributorProtocol(Protocol):
    def reader_of(
        self, path: bytes, st: os.stat_result, *, seen_at: float | None = None
    ) -> Attribution:
        """Who last read this (labelled) file: for access events."""
        ...


class PipelineAttributor(AttributorProtocol, ReaderAttributorProtocol, Protocol):
    """What the pipeline asks: the writer of a destination file, the reader of a labelled one."""


class AccessLog(Protocol):
    """What the attributor needs of agent.fanotify.Fanotify (tests may pass a fake)."""

    def last_writer(self, dev: int, ino: int) -> Access | None: ...

    def last_reader(self, dev: int, ino: int) -> Access | None: ...

    def flush(self, timeout: float) -> bool: ...

    def mark(self, path: bytes, mask: int, scope: MarkScope = MarkScope.MOUNT) -> None: ...

    def add_scope(self, prefix: bytes) -> None: ...

    def stop(self, timeout: float = 5.0) -> None: ...

    def take_overflows(self) -> int: ...


def _owner(st: os.stat_result) -> UserInfo:
    name = user_name(st.st_uid)
    return UserInfo(login=name, effective=name, uid=st.st_uid)


class Attributor:
    """Answers "who wrote this file" (`attribute`) and "who read it" (`reader_of`).

    With `fanotify` (root), the reader thread's records answer, exactly by inode.
    Without it, or when fanotify has no record, a /proc/<pid>/fd scan within
    `budget` seconds looks for a process holding the file (by (st_dev, st_ino), so
    renames do not hide it; writers win over readers; the agent's own pid is
    skipped, its workers open files to hash them). Processes are described through
    `cache`, keyed by (pid, start time). Thread-safe; `close()` stops fanotify.

    `marks` (with fanotify) keeps the group's marks in step with the watched
    trees: the watcher tells the attributor of new and deleted directories
    (agent.watcher.DirectoryListener) and the destination tracker of mounts
    (`mark_root`, `unmounted`); without fanotify these do nothing.
    """

    def __init__(
        self,
        *,
        fanotify: AccessLog | None = None,
        marks: FanotifyMarks | None = None,
        cache: ProcessCache | None = None,
        budget: float = 0.05,
        flush_timeout: float = DEFAULT_FLUSH_TIMEOUT,
        proc: Path = Path("/proc"),
        monotonic: Callable[[], float] = time.monotonic,
        pids: Callable[[], Iterable[int]] = psutil.pids,
    ) -> None:
        self._fanotify = fanotify
        self._marks = marks if fanotify is not None else None
        self._cache = cache or ProcessCache(proc=proc)
        self._budget = budget
        self._flush_timeout = flush_timeout
        self._proc = proc
        self._monotonic = monotonic
        self._pids = pids
        self._self = os.getpid()
        self._opened_lock = threading.Lock()
        self._opened: OrderedDict[tuple[int, int], tuple[ProcessFacts, float]] = OrderedDict()

    @property
    def fanotify(self) -> bool:
        """True when fanotify answers (tier 1); False: best effort."""
        return self._fanotify is not None

    def attribute(
        self, path: bytes, st: os.stat_result, *, seen_at: float | None = None
    ) -> Attribution:
        """Who wrote the file: the last writer fanotify saw, else a holder, else the owner.

        `seen_at`: when the write was observed (the watcher's stamp, monotonic). A
        record older than that may be the file's previous writer: the fanotify
        queue is flushed first (its twin of the observed event is in it).
        """
        key = (st.st_dev, st.st_ino)
        if self._fanotify is not None:
            access = self._fanotify.last_writer(*key)
            if _stale(access, seen_at) and self._fanotify.flush(self._flush_timeout):
                access = self._fanotify.last_writer(*key)
            if access is not None:
                return _from_access(access, _owner(st))
        with self._opened_lock:
            opened = self._opened.get(key)
        if opened is not None and self._monotonic() - opened[1] <= DEFAULT_OPENED_MAX_AGE:
            seen = opened[0]
            return seen.process, seen.user, AttributionMethod.PROCESS_CACHE
        facts = self._scan(st)
        if facts is not None:
            return facts.process, facts.user, AttributionMethod.PROC_SCAN
        return None, _owner(st), AttributionMethod.FILE_OWNER

    def reader_of(
        self, path: bytes, st: os.stat_result, *, seen_at: float | None = None
    ) -> Attribution:
        """Who last read the file (closed it without writing), else who holds it now.

        Never the file's owner: owning a file says nothing about who read it.
        `seen_at` as for `attribute`: a labelled file is read by many in turn.
        """
        key = (st.st_dev, st.st_ino)
        if self._fanotify is not None:
            access = self._fanotify.last_reader(*key)
            if _stale(access, seen_at) and self._fanotify.flush(self._flush_timeout):
                access = self._fanotify.last_reader(*key)
            if access is not None:
                return _from_access(access, UserInfo())
        facts = self._scan(st)
        if facts is not None:
            return facts.process, facts.user, AttributionMethod.PROC_SCAN
        return None, UserInfo(), AttributionMethod.UNATTRIBUTED

    def note_open(self, path: bytes, st: os.stat_result) -> None:
        """Look for the holder now, while it has the file open, and remember it.

        Tier 0's best chance without fanotify: call on an inotify open at a
        destination; by the close, a short writer has usually gone. `attribute`
        then answers PROCESS_CACHE from what was found here.
        """
        facts = self._scan(st)
        if facts is None:
            return
        key = (st.st_dev, st.st_ino)
        with self._opened_lock:
            self._opened.pop(key, None)
            self._opened[key] = (facts, self._monotonic())
            while len(self._opened) > DEFAULT_OPENED_CAPACITY:
                self._opened.popitem(last=False)

    @property
    def marks(self) -> FanotifyMarks | None:
        """The fanotify marks (None without fanotify): for status and tests."""
        return self._marks

    def mark_destination(self, path: bytes) -> bool:
        """Also watch the filesystem mounted at `path` for writers (a stick mounted later)."""
        return self.mark_root(path, Role.DESTINATION, own_filesystem=True)

    def mark_root(self, path: bytes, role: Role, *, own_filesystem: bool) -> bool:
        """Mark a root watched from now on (agent.fanmarks: by filesystem or by directory)."""
        if self._marks is None:
            return False
        return self._marks.add_root(path, role, own_filesystem=own_filesystem)

    def remark(self) -> None:
        """Walk the marked roots again, once the watcher runs (agent.fanmarks `refresh`):
        folders created before it started are reported by nobody else."""
        if self._marks is not None:
            marked = self._marks.refresh()
            logger.info("fanotify: %d directories marked", marked)

    def unmounted(self, mount_point: bytes) -> None:
        """`mount_point` was unmounted: its marks went with it."""
        if self._marks is not None:
            self._marks.unmounted(mount_point)

    def directory_created(self, path: bytes, role: Role) -> None:
        """agent.watcher.DirectoryListener: a new directory in a watched tree."""
        if self._marks is not None:
            self._marks.directory_created(path, role)

    def directory_deleted(self, path: bytes) -> None:
        """agent.watcher.DirectoryListener: a directory left a watched tree."""
        if self._marks is not None:
            self._marks.directory_deleted(path)

    def take_overflows(self) -> int:
        """fanotify queue overflows since the last call: coverage gaps for the pipeline."""
        return self._fanotify.take_overflows() if self._fanotify is not None else 0

    def close(self) -> None:
        """Stop the fanotify reader (joined). The lower tiers keep working."""
        if self._fanotify is not None:
            self._fanotify.stop()

    # tier 0: /proc scan

    def _scan(self, st: os.stat_result) -> ProcessFacts | None:
        pid = self._find_holder(st)
        if pid is None:
            return None
        return self._cache.lookup(pid, self._monotonic())

    def _find_holder(self, st: os.stat_result) -> int | None:
        target = (st.st_dev, st.st_ino)
        deadline = self._monotonic() + self._budget
        reader: int | None = None
        try:
            # Newest processes first: the copier is usually recent.
            pids = sorted(self._pids(), reverse=True)
        except OSError:
            return None
        for pid in pids:
            if pid == self._self:
                continue
            if self._monotonic() > deadline:
                logger.debug("attribution budget exhausted after scanning up to pid %d", pid)
                break
            fd_dir = self._proc / str(pid) / "fd"
            try:
                with os.scandir(fd_dir) as fds:
                    for fd in fds:
                        try:
                            fst = fd.stat()  # follows the magic link to the open file
                        except OSError:
                            continue
                        if (fst.st_dev, fst.st_ino) != target or not stat.S_ISREG(fst.st_mode):
                            continue
                        if self._opened_for_write(pid, fd.name):
                            return pid
                        if reader is None:
                            reader = pid
            except OSError:
                continue  # gone, or not ours to look at
        return reader

    def _opened_for_write(self, pid: int, fd: str) -> bool:
        try:
            text = (self._proc / str(pid) / "fdinfo" / fd).read_text()
        except OSError:
            return False
        for line in text.splitlines():
            if line.startswith("flags:"):
                try:
                    return bool(int(line.split()[1], 8) & _WRITE_FLAGS)
                except (IndexError, ValueError):
                    return False
        return False


def _stale(access: Access | None, seen_at: float | None) -> bool:
    """No record, or one older than the observation it should explain."""
    return access is None or (seen_at is not None and access.at < seen_at)


def _from_access(access: Access, unknown_user: UserInfo) -> Attribution:
    """A fanotify record as an attribution. The pid is exact even when the process
    was gone before its facts could be read; then the start time is 0 (unknown)
    and the user is `unknown_user` (the file's owner for a write: a new file
    belongs to whoever created it)."""
    if access.facts is not None:
        return access.facts.process, access.facts.user, AttributionMethod.FANOTIFY
    return ProcessInfo(pid=access.pid, start_time_ns=0), unknown_user, AttributionMethod.FANOTIFY


def open_attributor(
    sensitive_roots: Sequence[Path],
    destinations: Sequence[Path],
    *,
    euid: int | None = None,
    proc: Path = Path("/proc"),
    mounts: Sequence[Mount] | None = None,
) -> Attributor:
    """The best attributor this process can have, for the service.

    As root: fanotify, marked by agent.fanmarks: every directory of the sensitive
    roots (readers) and of the destination folders (writers), and the whole
    filesystem of a destination that is one of its own; recording only paths under
    those roots. Anything else (not root, no fanotify in the kernel or the
    container) is logged once at INFO, and the lower tiers answer alone. `mounts`
    (the mount table, read when not given) and `euid` are for tests.
    """
    cache = ProcessCache(proc=proc)
    if (os.geteuid() if euid is None else euid) != 0:
        logger.info("attribution is best effort (not root: no fanotify); events say how")
        return Attributor(cache=cache, proc=proc)
    scope = [os.fsencode(os.path.realpath(p)) for p in (*destinations, *sensitive_roots)]
    try:
        fan = Fanotify.open(cache, scope=scope)
    except FanotifyError as e:
        logger.info("attribution is best effort (%s); events say how", e)
        return Attributor(cache=cache, proc=proc)
    if mounts is None:
        try:
            mounts = read_mounts()
        except AgentError as e:
            logger.warning("%s: destinations are marked by directory", e)
            mounts = []
    dest_paths = [os.fsencode(dest) for dest in destinations]
    whole = own_filesystems(dest_paths, mounts)
    marks = FanotifyMarks(fan)
    fan.on_outside = marks.outside
    ok = [
        marks.add_root(os.fsencode(root), Role.SENSITIVE, own_filesystem=False)
        for root in sensitive_roots
    ]
    ok += [
        marks.add_root(dest, Role.DESTINATION, own_filesystem=dest in whole) for dest in dest_paths
    ]
    if not all(ok):
        fan.stop()
        logger.info("attribution is best effort (fanotify cannot mark every root); events say how")
        return Attributor(cache=cache, proc=proc)
    fan.start()
    logger.info(
        "attribution by fanotify: %d destinations (%d filesystems of their own), "
        "%d sensitive roots, %d directories marked",
        len(destinations),
        len(whole),
        len(sensitive_roots),
        marks.directories,
    )
    return Attributor(fanotify=fan, marks=marks, cache=cache, proc=proc)
