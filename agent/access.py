"""File access events, beside the copy detector: which reads of labelled files to report, how often.

`ReadPolicy` says which reads are reported at all, `ReadFolder` folds repeats
per (file, process, user) so an autosave or an indexer does not flood the
collector, and `OwnReads` recognises the reads the agent itself caused
(labelling, hashing) so they never come back as events. The three are sans-I/O
(time passed in); `track_own_opens` feeds `OwnReads` from the process's audit hook.
"""

from __future__ import annotations

import fnmatch
import os
import sys
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

from agent.config import AccessConfig
from agent.events import ProcessInfo, UserInfo

V = TypeVar("V")

OWN_RETENTION = 30.0
"""Seconds an own open waits for its close event at most (a failed open never gets one)."""
OWN_GRACE = 1.0
"""Seconds after an own open was seen closed during which its close event may still come."""
OWN_SETTLE = 0.1
"""Own opens younger than this are not checked for closing yet (most close at once)."""
OWN_CHECK_INTERVAL = 0.2
"""Seconds between two looks at this process's open files (/proc/self/fd)."""
MAX_OWN = 50_000
"""Own opens remembered at most (oldest forgotten first): bounds memory during a big scan."""
MAX_FOLDS = 10_000
"""Open folding windows at most; beyond it the oldest window is closed early."""


@dataclass(frozen=True)
class ReadKey:
    """What reads are folded by: the same file, by the same process, as the same user."""

    path: bytes
    pid: int
    """0 when the reader is unknown."""
    process_start_ns: int
    """Pairs with `pid` (pids are reused)."""
    uid: int
    login: str

    @classmethod
    def of(cls, path: bytes, process: ProcessInfo | None, user: UserInfo) -> ReadKey:
        if process is None:
            return cls(path, 0, 0, user.uid, user.login)
        return cls(path, process.pid, process.start_time_ns, user.uid, user.login)


@dataclass(frozen=True)
class Fold(Generic[V]):
    """Report `value` as standing for `count` accesses."""

    value: V
    count: int


@dataclass
class _Window(Generic[V]):
    until: float
    latest: V
    repeats: int = 0


class ReadFolder(Generic[V]):
    """Folds repeated accesses per key within `interval` seconds. Not thread-safe.

    The first access of a key is reported at once (`feed` returns `Fold(value, 1)`).
    Repeats until `interval` seconds after that first one are only counted; when
    the interval is over, `due` hands out one `Fold(latest value, repeats)` for
    it, and the next access starts a new interval. So a file read every second
    by the same process costs two events per interval, and a single read one.
    """

    def __init__(self, interval: float, *, max_keys: int = MAX_FOLDS) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        self._interval = interval
        self._max_keys = max_keys
        self._open: OrderedDict[Hashable, _Window[V]] = OrderedDict()
        self._ready: list[Fold[V]] = []

    def feed(self, key: Hashable, value: V, now: float) -> Fold[V] | None:
        """One access: a fold to report now, or None when it was folded into a window."""
        window = self._open.get(key)
        if window is not None and now < window.until:
            window.repeats += 1
            window.latest = value
            return None
        if window is not None:
            self._close(key)
        self._open[key] = _Window(now + self._interval, value)
        while len(self._open) > self._max_keys:
            self._close(next(iter(self._open)))
        return Fold(value, 1)

    def due(self, now: float) -> list[Fold[V]]:
        """Folds of the intervals that ended by `now` (only those with repeats)."""
        # Windows are kept in the order they opened, and all last `interval`: the
        # first one still open ends first.
        while self._open:
            key, window = next(iter(self._open.items()))
            if now < window.until:
                break
            self._close(key)
        ready, self._ready = self._ready, []
        return ready

    def flush(self) -> list[Fold[V]]:
        """Close every window now (at stop): the repeats counted so far."""
        while self._open:
            self._close(next(iter(self._open)))
        ready, self._ready = self._ready, []
        return ready

    def _close(self, key: Hashable) -> None:
        window = self._open.pop(key)
        if window.repeats:
            self._ready.append(Fold(window.latest, window.repeats))

    def __len__(self) -> int:
        """Windows still open."""
        return len(self._open)


class ReadPolicy:
    """Which reads of labelled files are reported, from the `access:` configuration.

    `wanted` is checked before attribution (cheap: path and label), `exempt`
    after it (the reading executable, e.g. a backup agent or an indexer).
    """

    def __init__(self, config: AccessConfig) -> None:
        self.enabled = config.reads
        self._labels = frozenset(config.off_for_labels)
        self._paths = tuple(os.fsencode(glob) for glob in config.off_for_paths)
        self._exes = frozenset(config.exempt_executables)

    def wanted(self, path: bytes, label: str) -> bool:
        if not self.enabled or label in self._labels:
            return False
        return not any(fnmatch.fnmatchcase(path, glob) for glob in self._paths)

    def exempt(self, process: ProcessInfo | None) -> bool:
        return process is not None and process.exe in self._exes


def own_open_files(fd_dir: bytes = b"/proc/self/fd") -> Counter[bytes]:
    """How many file descriptors this process holds on each path (I/O, for `OwnReads`)."""
    held: Counter[bytes] = Counter()
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return held
    for name in names:
        try:
            held[os.readlink(fd_dir + b"/" + name)] += 1
        except OSError:
            continue  # closed meanwhile
    return held


@dataclass
class _Open:
    at: float
    """When the open was recorded (before the system call)."""
    closed: float | None = None
    """When it was first seen closed (None: open, or not looked at yet)."""


class OwnReads:
    """The agent's own read-only opens, per path: their CLOSE_NOWRITE is ours, not a read.

    inotify carries no pid, so "who closed this?" cannot be asked. But every
    `open()` / `os.open()` in this process raises an audit event before the
    system call (PEP 578), which `track_own_opens` feeds to `opened`, whoever
    opened the file (the labellers, the hasher, an archive reader).

    A close observed at watcher time `at` (the same monotonic clock) consumes one
    own open of that path recorded before `at`: one close per open, so an own
    read is never reported, however the workers interleave. The kernel merges
    identical events not yet read, though, so two own closes may arrive as one
    and leave an open without its event. `settle` retires those: it looks at the
    files this process still holds (`open_files`, /proc/self/fd), marks the opens
    that were closed, and from then on they only match events stamped within
    `grace` seconds (their own close, still on its way), never a stranger's read
    later. A stranger's read right after ours may be taken for ours: the cost of
    never reporting our own. Opens are forgotten after `retention` seconds.
    Thread-safe; time is passed in.
    """

    def __init__(
        self,
        *,
        grace: float = OWN_GRACE,
        settle: float = OWN_SETTLE,
        check_interval: float = OWN_CHECK_INTERVAL,
        retention: float = OWN_RETENTION,
        max_entries: int = MAX_OWN,
        open_files: Callable[[], Counter[bytes]] = own_open_files,
    ) -> None:
        self._grace = grace
        self._settle = settle
        self._check_interval = check_interval
        self._retention = retention
        self._max = max_entries
        self._open_files = open_files
        self._lock = threading.Lock()
        self._pending: dict[bytes, list[_Open]] = {}
        self._count = 0
        self._next_check = 0.0

    def opened(self, path: bytes, now: float) -> None:
        """The agent is opening `path` for reading (recorded before the system call)."""
        with self._lock:
            self._pending.setdefault(path, []).append(_Open(now))
            self._count += 1
            if self._count > self._max:
                self._shrink(self._max * 3 // 4)  # amortised: not on every open

    def is_own(self, path: bytes, at: float) -> bool:
        """Was this close of `path`, seen by the watcher at `at`, one of ours? (Consumes it.)"""
        with self._lock:
            opens = self._pending.get(path)
            if not opens:
                return False
            for i, o in enumerate(opens):  # oldest first
                if o.at <= at and (o.closed is None or at <= o.closed + self._grace):
                    del opens[i]
                    self._count -= 1
                    if not opens:
                        del self._pending[path]
                    return True
            return False

    def settle(self, now: float) -> None:
        """Mark the own opens that were closed, forget the ones that can no longer match.

        Call it often (the pipeline does, between observations); it does its work
        at most every `check_interval` seconds.
        """
        with self._lock:
            if now < self._next_check or not self._pending:
                return
            self._next_check = now + self._check_interval
            self._drop(
                lambda o: (
                    (o.closed is not None and now - o.closed > self._grace)
                    or now - o.at >= self._retention
                )
            )
            due = [
                path
                for path, opens in self._pending.items()
                if any(o.closed is None and now - o.at >= self._settle for o in opens)
            ]
            if not due:
                return
        held = self._open_files()  # outside the lock: this is I/O
        with self._lock:
            for path in due:
                opens = self._pending.get(path, [])
                # The fds still held belong to the newest opens; the older ones closed.
                unmarked = [o for o in opens if o.closed is None and now - o.at >= self._settle]
                for o in unmarked[: max(0, len(unmarked) - held[path])]:
                    o.closed = now

    def pending(self) -> list[bytes]:
        """The paths with own opens waiting for their close event (for diagnostics)."""
        with self._lock:
            return sorted(self._pending)

    def __len__(self) -> int:
        """Own opens still waiting for their close event."""
        with self._lock:
            return self._count

    def _drop(self, gone: Callable[[_Open], bool]) -> None:
        """Forget the opens for which `gone` is true."""
        for path in list(self._pending):
            opens = self._pending[path]
            kept = [o for o in opens if not gone(o)]
            self._count -= len(opens) - len(kept)
            if kept:
                self._pending[path] = kept
            else:
                del self._pending[path]

    def _shrink(self, keep: int) -> None:
        """Forget the oldest opens, down to `keep`."""
        times = sorted(o.at for opens in self._pending.values() for o in opens)
        cutoff = times[len(times) - keep]
        self._drop(lambda o: o.at < cutoff)


class _AuditTap:
    """The one audit hook of the process, forwarding read-only opens to the `OwnReads` sinks.

    Audit hooks cannot be removed (PEP 578), hence one per process, installed on
    first use, doing nothing once its sinks are gone. A hook that raises would
    break the `open()` that triggered it, anywhere in the process: it never does.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._installed = False
        self._sinks: tuple[OwnReads, ...] = ()

    def add(self, own: OwnReads) -> None:
        with self._lock:
            if not self._installed:
                sys.addaudithook(self._hook)
                self._installed = True
            self._sinks = (*self._sinks, own)

    def remove(self, own: OwnReads) -> None:
        with self._lock:
            self._sinks = tuple(s for s in self._sinks if s is not own)

    def _hook(self, event: str, args: tuple[object, ...]) -> None:
        if event != "open" or not self._sinks:
            return
        try:
            path, _mode, flags = args
            if isinstance(path, int) or not isinstance(flags, int):
                return  # an fd, not a path: no new open of a watched name
            if flags & os.O_ACCMODE != os.O_RDONLY:
                return  # a write ends in CLOSE_WRITE, which is not a read event
            raw = os.fsencode(path)  # type: ignore[arg-type]
            if not raw.startswith(b"/") or raw.startswith(_NOT_WATCHED):
                return
            now = time.monotonic()
            for sink in self._sinks:
                sink.opened(raw, now)
        except Exception:  # noqa: S110 - see the class docstring
            pass


_NOT_WATCHED = (b"/proc/", b"/sys/", b"/dev/")
"""Pseudo-filesystems the agent reads (attribution) and never watches."""
_TAP = _AuditTap()
"""Process-wide by nature: audit hooks are per process and permanent."""


def track_own_opens(own: OwnReads) -> Callable[[], None]:
    """Feed `own` every read-only open this process makes from now on; returns the undo.

    The times are `time.monotonic()`, the watcher's default clock.
    """
    _TAP.add(own)
    return lambda: _TAP.remove(own)
