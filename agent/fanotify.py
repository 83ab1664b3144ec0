"""fanotify (Linux, root) for attribution: which process last wrote or read each file.

Tier 1 of FIELD-NOTES §3.5. inotify carries no pid; fanotify does. A reader thread
turns fanotify events into a bounded map (st_dev, st_ino) -> `Access` (pid and the
process facts read at once, while a short copier is most likely still there), and
agent.attribution asks it. ctypes only: two syscalls need no dependency.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import select
import struct
import sys
import termios
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from agent.errors import FanotifyError
from agent.proccache import ProcessCache, ProcessFacts

logger = logging.getLogger(__name__)

# <linux/fanotify.h>
FAN_CLOSE_WRITE = 0x08
FAN_CLOSE_NOWRITE = 0x10
FAN_OPEN = 0x20
FAN_Q_OVERFLOW = 0x4000
FAN_EVENT_ON_CHILD = 0x08000000
FAN_CLOEXEC = 0x01
FAN_NONBLOCK = 0x02
FAN_CLASS_NOTIF = 0x00
FAN_MARK_ADD = 0x01
FAN_MARK_REMOVE = 0x02
FAN_MARK_MOUNT = 0x10
FAN_MARK_FILESYSTEM = 0x100
FAN_MARK_INODE = 0x00
FANOTIFY_METADATA_VERSION = 3
_AT_FDCWD = -100
_O_LARGEFILE = 0o100000  # 0 in Python's os module on 64-bit; the kernel wants it

_METADATA = struct.Struct("=IBBHQii")
"""struct fanotify_event_metadata: event_len, vers, reserved, metadata_len, mask, fd, pid."""

WRITER_MASK = FAN_CLOSE_WRITE | FAN_OPEN
"""For a destination: who wrote (close-write), and the writer's facts read at open."""
READER_MASK = FAN_CLOSE_NOWRITE | FAN_OPEN
"""For sensitive files: who read (close-nowrite), and the reader's facts read at open."""

DEFAULT_CAPACITY = 8192
"""Files remembered per kind (last writer, last reader); the oldest are dropped."""
DEFAULT_MAX_AGE = 300.0
"""Seconds after which a record no longer answers (an unmarked path may have changed it)."""
_READ_SIZE = 64 * 1024
_READS_PER_ROUND = 64
"""Reads before checking for stop, so a flood cannot keep the thread from stopping."""


class MarkScope(StrEnum):
    MOUNT = "mount"
    """Every file on the mount that holds the path."""
    FILESYSTEM = "filesystem"
    """Every file on the filesystem, through any mount (bind mounts included)."""
    INODE = "inode"
    """That one file (e.g. a labelled file)."""
    CHILDREN = "children"
    """The files directly inside that directory (not deeper)."""


_MARK_FLAGS = {
    MarkScope.MOUNT: (FAN_MARK_MOUNT, 0),
    MarkScope.FILESYSTEM: (FAN_MARK_FILESYSTEM, 0),
    MarkScope.INODE: (FAN_MARK_INODE, 0),
    MarkScope.CHILDREN: (FAN_MARK_INODE, FAN_EVENT_ON_CHILD),
}

OutsideHook = Callable[[bytes], None]
"""`hook(path)`: an event for a file outside the scope (reader thread; must not block)."""


@dataclass(frozen=True)
class Access:
    """One process closing one file, as fanotify reported it."""

    pid: int
    facts: ProcessFacts | None
    """None when the process was gone before we could read it."""
    path: bytes
    """Where the file was at the event (readlink of the event fd; may end " (deleted)")."""
    at: float
    """Monotonic seconds when the reader handled the event."""


class Syscalls(Protocol):
    """The two fanotify system calls; each raises OSError with the kernel's errno."""

    def fanotify_init(self, flags: int, event_f_flags: int) -> int: ...

    def fanotify_mark(self, fd: int, flags: int, mask: int, path: bytes) -> None: ...


class LibcSyscalls:
    """fanotify_init(2) and fanotify_mark(2) through the C library, with ctypes."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        try:
            self._init = libc.fanotify_init
            self._mark = libc.fanotify_mark
        except AttributeError as e:
            raise OSError(errno.ENOSYS, "the C library has no fanotify") from e
        self._init.argtypes = [ctypes.c_uint, ctypes.c_uint]
        self._init.restype = ctypes.c_int
        self._mark.argtypes = [
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint64,
            ctypes.c_int,
            ctypes.c_char_p,
        ]
        self._mark.restype = ctypes.c_int

    def fanotify_init(self, flags: int, event_f_flags: int) -> int:
        fd = int(self._init(flags, event_f_flags))
        if fd < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
        return fd

    def fanotify_mark(self, fd: int, flags: int, mask: int, path: bytes) -> None:
        if self._mark(fd, flags, mask, _AT_FDCWD, path) < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), os.fsdecode(path))


def _explain(e: OSError) -> str:
    if e.errno == errno.EPERM:
        return "needs CAP_SYS_ADMIN (root)"
    if e.errno == errno.ENOSYS:
        return "the kernel has no fanotify"
    if e.errno == errno.EINVAL:
        return "the kernel refused the flags (too old?)"
    if e.errno == errno.EMFILE:
        return "too many fanotify groups (fs.fanotify.max_user_groups)"
    if e.errno == errno.ENOSPC:
        return "too many marks (fs.fanotify.max_user_marks)"
    return e.strerror or str(e)


def _is_under(path: bytes, prefix: bytes) -> bool:
    prefix = prefix.rstrip(b"/")
    return path == prefix or path.startswith(prefix + b"/")


class Fanotify:
    """A fanotify group in notification mode and the thread that reads it.

    Lifecycle: `open()` -> `mark(...)` -> `start()` -> ... -> `stop()` (joins the
    thread, closes the descriptors). Every event carries an open descriptor of the
    file; each one is closed at once, whatever happens (a leak would exhaust the
    agent's descriptors within minutes on a busy mount). Events from the agent
    itself (its hashing workers) are ignored, and so are paths outside `scope`
    (mount marks see the whole mount); those are handed to `on_outside` (from the
    reader thread), which agent.fanmarks uses to drop the mark of a directory
    moved out of a watched tree. Queue overflows are counted, not hidden:
    `take_overflows` hands them to whoever reports coverage gaps.
    """

    def __init__(
        self,
        fd: int,
        syscalls: Syscalls,
        cache: ProcessCache,
        *,
        scope: Iterable[bytes] = (),
        capacity: int = DEFAULT_CAPACITY,
        max_age: float = DEFAULT_MAX_AGE,
        monotonic: Callable[[], float] = time.monotonic,
        on_outside: OutsideHook | None = None,
    ) -> None:
        self._fd = fd
        self._syscalls = syscalls
        self._cache = cache
        self._scope = tuple(scope)
        self._capacity = capacity
        self._max_age = max_age
        self._monotonic = monotonic
        self.on_outside = on_outside
        """Settable once before `start()` (agent.fanmarks is built on the group)."""
        self._self = os.getpid()
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._lock = threading.Lock()
        self._writers: OrderedDict[tuple[int, int], Access] = OrderedDict()
        self._readers: OrderedDict[tuple[int, int], Access] = OrderedDict()
        self._cond = threading.Condition()
        self._requested = 0
        self._drained = 0
        self._noted = 0
        """Last flush request the reader has taken (reader thread only)."""
        self._waiting: list[tuple[int, int]] = []
        """Flush requests in progress: (generation, bytes still to read); reader only."""
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.events = 0
        """Events received (any pid, any path)."""
        self.overflows = 0
        """FAN_Q_OVERFLOW events: the kernel dropped events, attribution may miss some."""
        self._overflows_taken = 0
        self.failure: BaseException | None = None

    @classmethod
    def open(
        cls,
        cache: ProcessCache,
        *,
        scope: Iterable[bytes] = (),
        syscalls: Syscalls | None = None,
        capacity: int = DEFAULT_CAPACITY,
        max_age: float = DEFAULT_MAX_AGE,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> Fanotify:
        """A new group, or FanotifyError saying why not (callers fall back)."""
        try:
            calls = syscalls or LibcSyscalls()
            fd = calls.fanotify_init(
                FAN_CLASS_NOTIF | FAN_CLOEXEC | FAN_NONBLOCK,
                os.O_RDONLY | _O_LARGEFILE | os.O_CLOEXEC,
            )
        except OSError as e:
            raise FanotifyError(f"fanotify unavailable: {_explain(e)}") from e
        try:
            return cls(
                fd,
                calls,
                cache,
                scope=scope,
                capacity=capacity,
                max_age=max_age,
                monotonic=monotonic,
            )
        except OSError as e:
            os.close(fd)
            raise FanotifyError(f"fanotify unavailable: {_explain(e)}") from e

    def add_scope(self, prefix: bytes) -> None:
        """Also record paths under `prefix` (canonical: as /proc/self/fd shows it)."""
        if self._scope and prefix not in self._scope:
            self._scope = (*self._scope, prefix)  # one assignment: the reader sees old or new

    def remove_scope(self, prefix: bytes) -> None:
        """Stop recording paths under `prefix` (an unmounted stick)."""
        if prefix in self._scope and len(self._scope) > 1:  # empty would mean "everything"
            self._scope = tuple(p for p in self._scope if p != prefix)

    def mark(self, path: bytes, mask: int, scope: MarkScope = MarkScope.MOUNT) -> None:
        """Watch `path` (its mount, filesystem, inode or children) for `mask` events.

        Adding to a mark that exists adds the bits of `mask` to it: marking twice is harmless.
        """
        self._mark(FAN_MARK_ADD, path, mask, scope)

    def unmark(self, path: bytes, mask: int, scope: MarkScope = MarkScope.MOUNT) -> None:
        """Remove the `mask` bits of the mark on `path`; ENOENT when there is none."""
        self._mark(FAN_MARK_REMOVE, path, mask, scope)

    def _mark(self, action: int, path: bytes, mask: int, scope: MarkScope) -> None:
        flags, extra = _MARK_FLAGS[scope]
        try:
            self._syscalls.fanotify_mark(self._fd, action | flags, mask | extra, path)
        except OSError as e:
            verb = "mark" if action == FAN_MARK_ADD else "unmark"
            raise FanotifyError(
                f"fanotify cannot {verb} the {scope} of {os.fsdecode(path)!r}: {_explain(e)}",
                errno=e.errno or 0,
            ) from e

    def take_overflows(self) -> int:
        """Queue overflows since the last call (each is a coverage gap to report)."""
        with self._lock:
            seen = self.overflows
            new, self._overflows_taken = seen - self._overflows_taken, seen
        return new

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="fanotify", daemon=False)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the reader, join it, and close both descriptors. Idempotent."""
        self._stopping.set()
        if not self._closed:
            os.eventfd_write(self._wake, 1)
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.error("fanotify reader did not stop within %.1f s", timeout)
                return  # closing its descriptors under it would be worse
        if not self._closed:
            self._closed = True
            os.close(self._fd)
            os.close(self._wake)

    def flush(self, timeout: float) -> bool:
        """Wait until every event queued before this call has been handled.

        fanotify and inotify queue an event in the same kernel call, so once the
        pipeline has seen an inotify event, its fanotify twin is in our queue:
        after `flush`, `last_writer` knows about it. False on timeout or when the
        reader is not running.
        """
        if not self.alive:
            return False
        with self._cond:
            self._requested += 1
            target = self._requested
            os.eventfd_write(self._wake, 1)
            return self._cond.wait_for(
                lambda: self._drained >= target or not self.alive, timeout
            ) and (self._drained >= target)

    def last_writer(self, dev: int, ino: int) -> Access | None:
        """The last process that closed this file after writing it (FAN_CLOSE_WRITE)."""
        return self._recent(self._writers, (dev, ino))

    def last_reader(self, dev: int, ino: int) -> Access | None:
        """The last process that closed this file without writing (FAN_CLOSE_NOWRITE)."""
        return self._recent(self._readers, (dev, ino))

    def _recent(
        self, records: OrderedDict[tuple[int, int], Access], key: tuple[int, int]
    ) -> Access | None:
        with self._lock:
            access = records.get(key)
        if access is None or self._monotonic() - access.at > self._max_age:
            return None
        return access

    # the reader thread

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        poller.register(self._wake, select.POLLIN)
        try:
            while not self._stopping.is_set():
                poller.poll()
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self._wake)
                self._take_flush_request()
                self._drain()
        except FanotifyError as e:
            self.failure = e
            logger.error("fanotify reader stopped (%s): attribution falls back to lower tiers", e)
        except BaseException as e:
            self.failure = e
            logger.exception("fanotify reader died: attribution falls back to lower tiers")
            raise
        finally:
            with self._cond:
                self._cond.notify_all()

    def _take_flush_request(self) -> None:
        """A flush is done once the bytes queued at its request have been read (the
        queue is first in, first out), even while new events keep coming."""
        with self._cond:
            generation = self._requested
        if generation == self._noted:
            return
        self._noted = generation
        queued = self._queued_bytes()
        if queued > 0:
            self._waiting.append((generation, queued))
        else:
            self._flushed(generation)

    def _queued_bytes(self) -> int:
        size = array.array("i", [0])
        try:
            fcntl.ioctl(self._fd, termios.FIONREAD, size, True)
        except OSError:
            return sys.maxsize  # unknown: done when the queue is found empty
        return size[0]

    def _flushed(self, generation: int) -> None:
        with self._cond:
            if generation > self._drained:
                self._drained = generation
                self._cond.notify_all()

    def _drain(self) -> None:
        """Handle what is queued, a bounded number of reads at a time."""
        for _ in range(_READS_PER_ROUND):
            if self._stopping.is_set():
                return
            try:
                buf = os.read(self._fd, _READ_SIZE)
            except BlockingIOError:
                if self._waiting:
                    self._flushed(max(generation for generation, _ in self._waiting))
                    self._waiting.clear()
                return
            except InterruptedError:
                continue
            self._parse(buf)
            if self._waiting:
                self._waiting = [(g, left - len(buf)) for g, left in self._waiting]
                done = [g for g, left in self._waiting if left <= 0]
                if done:
                    self._flushed(max(done))
                    self._waiting = [(g, left) for g, left in self._waiting if left > 0]
        os.eventfd_write(self._wake, 1)  # more to read: come back after checking for stop

    def _parse(self, buf: bytes) -> None:
        offset = 0
        while offset + _METADATA.size <= len(buf):
            event_len, vers, _, _, mask, fd, pid = _METADATA.unpack_from(buf, offset)
            if vers != FANOTIFY_METADATA_VERSION or event_len < _METADATA.size:
                # A layout we do not know: its descriptors cannot be found, so stop
                # reading rather than leak them one buffer at a time.
                if fd >= 0 and vers == FANOTIFY_METADATA_VERSION:
                    os.close(fd)
                raise FanotifyError(f"fanotify metadata version {vers}, length {event_len}")
            offset += event_len
            self._handle(mask, fd, pid)

    def _handle(self, mask: int, fd: int, pid: int) -> None:
        self.events += 1
        if mask & FAN_Q_OVERFLOW:
            with self._lock:
                self.overflows += 1
            # Once at WARNING, then quietly: a flood would repeat it many times a second.
            level = logging.WARNING if self.overflows == 1 else logging.DEBUG
            logger.log(
                level,
                "fanotify queue overflowed (%d times): some accesses are unattributed",
                self.overflows,
            )
        if fd < 0:
            return
        try:
            if pid == self._self:
                return
            path = os.readlink(b"/proc/self/fd/%d" % fd)
            scope = self._scope
            if scope and not any(_is_under(path, prefix) for prefix in scope):
                if self.on_outside is not None:
                    self.on_outside(path)
                return
            st = os.fstat(fd)
        except OSError:
            return
        finally:
            os.close(fd)
        now = self._monotonic()
        facts = self._cache.lookup(pid, now)  # at once: a short copier exits quickly
        if not mask & (FAN_CLOSE_WRITE | FAN_CLOSE_NOWRITE):
            return  # FAN_OPEN: reading the facts early was the point
        access = Access(pid, facts, path, now)
        key = (st.st_dev, st.st_ino)
        with self._lock:
            if mask & FAN_CLOSE_WRITE:
                self._remember(self._writers, key, access)
            if mask & FAN_CLOSE_NOWRITE:
                self._remember(self._readers, key, access)

    def _remember(
        self, records: OrderedDict[tuple[int, int], Access], key: tuple[int, int], access: Access
    ) -> None:
        records.pop(key, None)
        records[key] = access
        while len(records) > self._capacity:
            records.popitem(last=False)
