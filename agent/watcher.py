"""watchdog adapter, the first stage: filesystem events -> small `Observation`s on a bounded queue.

The handler decides nothing and never blocks: a slow or raising handler makes the
kernel queue overflow or kills watchdog's dispatcher (FIELD-NOTES §1.5, §8.2).
Roots can be added and removed while it runs (mounts come and go: agent.destinations),
and a full inotify watch table is reported instead of skipped silently (§1.6).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Protocol, TypeAlias

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileClosedNoWriteEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import DEFAULT_OBSERVER_TIMEOUT, BaseObserver, ObservedWatch

from agent.errors import AgentError, ConfigError

try:  # Linux only; elsewhere watchdog's own observer is used, without watch-limit hooks
    from watchdog.observers.inotify import InotifyEmitter, InotifyObserver
    from watchdog.observers.inotify_c import (
        CallbackId,
        InotifyFD,
        Mask,
        WatchCallback,
        WatchDescriptor,
    )
except (ImportError, OSError):  # pragma: no cover - not Linux
    InotifyObserver = None  # type: ignore[assignment,misc]

logger = logging.getLogger(__name__)

WATCHDOG_LOGGERS = ("watchdog.observers.inotify_c", "watchdog.observers.inotify")
"""Where watchdog reports what its handlers never see (queue overflow, lost watches)."""


class Role(StrEnum):
    SENSITIVE = "sensitive"
    """A sensitive root: files here are labelled and indexed."""
    DESTINATION = "destination"
    """A destination folder: finished writes here are checked for copies."""


class ObservationKind(StrEnum):
    CLOSED_WRITE = "closed_write"
    MOVED_IN = "moved_in"
    """Renamed inside a watched tree: `path` is the old name, `dest_path` the new."""
    CREATED = "created"
    """Created, or moved in from outside the tree (no close follows a move-in)."""
    DELETED = "deleted"
    CLOSED_NO_WRITE = "closed_no_write"
    DIR_CREATED = "dir_created"
    """A new directory: files already in it may never get a close (`cp -r`)."""
    DIR_DELETED = "dir_deleted"
    ATTRIB = "attrib"
    """Metadata changed, e.g. the label attribute was set (sensitive roots only)."""
    OVERFLOW = "overflow"
    """The kernel dropped events (IN_Q_OVERFLOW): a coverage gap, rescan."""
    WATCH_LOST = "watch_lost"
    """A watch died (root deleted, rebuild failed) or a new root could not be watched."""
    WATCH_LIMIT = "watch_limit"
    """inotify_add_watch failed with ENOSPC: `path` (below `root`) and what is added
    after it go unwatched, which watchdog 7 would not tell anyone (FIELD-NOTES §1.6)."""


@dataclass(frozen=True)
class Observation:
    kind: ObservationKind
    path: bytes
    """Raw bytes, exactly as the kernel reported them."""
    root: bytes
    """The watched root this came from (b"" for global observations such as OVERFLOW)."""
    role: Role | None
    at: float
    """Monotonic seconds when the handler saw it."""
    dest_path: bytes = b""
    """New name, for MOVED_IN."""

    @property
    def current_path(self) -> bytes:
        """Where the file is now: the new name for a move, else `path`."""
        return self.dest_path or self.path


ObservationQueue: TypeAlias = "queue.Queue[Observation | None]"
"""Bounded queue from the watcher to the pipeline; None is the consumers' stop sentinel."""

MAX_USER_WATCHES = Path("/proc/sys/fs/inotify/max_user_watches")
"""The per-user inotify watch limit (shared with IDEs and indexers of the same uid)."""
WATCH_LIMIT_REPORT_INTERVAL = 1.0
"""Seconds between two WATCH_LIMIT observations for one root (a big tree fails many times)."""
_BENIGN_ERRORS = ("called when the thread is inactive",)
"""watchdog logs this at ERROR when an emitter is stopped during a read: nothing was lost."""

_KINDS: dict[type[FileSystemEvent], ObservationKind] = {
    FileClosedEvent: ObservationKind.CLOSED_WRITE,
    FileMovedEvent: ObservationKind.MOVED_IN,
    FileCreatedEvent: ObservationKind.CREATED,
    FileDeletedEvent: ObservationKind.DELETED,
    FileClosedNoWriteEvent: ObservationKind.CLOSED_NO_WRITE,
    DirCreatedEvent: ObservationKind.DIR_CREATED,
    DirDeletedEvent: ObservationKind.DIR_DELETED,
    FileAttribEvent: ObservationKind.ATTRIB,
}

# The filter narrows the kernel mask (no IN_OPEN / IN_MODIFY / IN_ATTRIB): with the
# default mask a burst lost 74-78 % of files on tmpfs, with this one 0 % (FIELD-NOTES
# §1.5). Directory moves need no entry: watchdog emits FileMovedEvent per file inside.
EVENT_FILTER: list[type[FileSystemEvent]] = [
    FileClosedEvent,
    FileMovedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    DirCreatedEvent,
    DirDeletedEvent,
]
# Labels are often set after the file was written (`setfattr` on an existing file):
# sensitive roots also need IN_ATTRIB. watchdog 7.1 builds IN_ATTRIB into the mask
# only for FileModifiedEvent (which brings IN_MODIFY along; the handler drops those),
# never for FileAttribEvent alone (FIELD-NOTES §8.15).
_SENSITIVE_EXTRA: list[type[FileSystemEvent]] = [FileModifiedEvent, FileAttribEvent]


def _is_under(path: bytes, root: bytes) -> bool:
    return path == root or path.startswith(root + b"/")


class DirectoryListener(Protocol):
    """Told of each directory as it appears in a watched tree or leaves it.

    agent.fanmarks keeps a fanotify mark on every watched directory, as inotify
    keeps a watch: a copier writes into a new folder at once (`cp -r`), so the
    mark is added from watchdog's dispatch thread, before the observation is
    queued, not by a pipeline worker behind a backlog. Both calls are one system
    call at most and never raise.
    """

    def directory_created(self, path: bytes, role: Role) -> None: ...

    def directory_deleted(self, path: bytes) -> None: ...


def raise_watch_limit(target: int, *, path: Path = MAX_USER_WATCHES) -> bool:
    """Raise the inotify watch limit in `path` to `target` if it is lower; True if raised.

    Needs root (for the real sysctl); a refusal is logged and answered False.
    """
    try:
        current = int(path.read_text().strip() or 0)
        if current >= target:
            return False
        path.write_text(f"{target}\n")
    except (OSError, ValueError) as e:
        hint = ""
        if isinstance(e, OSError) and e.errno == errno.EROFS:
            # The systemd unit's ProtectKernelTunables=yes: a drop-in opens this one file.
            hint = " (read-only under the service's sandbox: see README, inotify watch limit)"
        logger.warning(
            "cannot raise the inotify watch limit in %s to %d: %s%s", path, target, e, hint
        )
        return False
    logger.warning("raised the inotify watch limit from %d to %d (%s)", current, target, path)
    return True


class _Handler(FileSystemEventHandler):
    """One per root: maps the event class to a kind and enqueues. Nothing else.

    Events inside a nested root of the same role (a mount below this root, watched
    on its own) are left to that root's handler: the watch on this root may reach
    into the mount (a recursive walk crosses mount points), and the nested root's
    destination (a USB stick's identity) is the one that counts.
    """

    def __init__(self, watcher: Watcher, root: bytes, role: Role) -> None:
        super().__init__()
        self._watcher = watcher
        self._root = root
        self._role = role

    def dispatch(self, event: FileSystemEvent) -> None:
        kind = _KINDS.get(type(event))
        if kind is None:
            return
        path = os.fsencode(event.src_path)
        nested = self._watcher.nested.get((self._root, self._role))
        if nested and any(_is_under(path, inner) for inner in nested):
            return
        if kind is ObservationKind.DIR_DELETED and path == self._root:
            kind = ObservationKind.WATCH_LOST
        listener = self._watcher.directories
        if listener is not None:
            if kind is ObservationKind.DIR_CREATED:
                listener.directory_created(path, self._role)
            elif kind is ObservationKind.DIR_DELETED:
                listener.directory_deleted(path)
        dest = os.fsencode(event.dest_path) if kind is ObservationKind.MOVED_IN else b""
        self._watcher.put(
            Observation(kind, path, self._root, self._role, self._watcher.now(), dest)
        )


class _WatchdogLogHandler(logging.Handler):
    """Turns watchdog's log-only failures into observations.

    watchdog 7.1 tells nobody but its logger that the kernel queue overflowed
    ("Inotify queue overflowed; filesystem events were lost", once per overflow
    from inotify_c; inotify adds one "reconciling" line per recursive watch, which
    we ignore so one overflow counts once) or that rebuilding watches failed.
    """

    def __init__(self, watcher: Watcher) -> None:
        super().__init__(level=logging.WARNING)
        self._watcher = watcher

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage().lower()
        if record.name == WATCHDOG_LOGGERS[0] and "overflow" in message:
            kind = ObservationKind.OVERFLOW
        elif record.levelno >= logging.ERROR and not any(b in message for b in _BENIGN_ERRORS):
            kind = ObservationKind.WATCH_LOST
        else:
            return
        self._watcher.put(Observation(kind, b"", b"", None, self._watcher.now()))


LimitHook = Callable[[bytes, bytes, int], None]
"""`hook(root, path, generation)`: watching `path` below the watched `root` failed with
ENOSPC; `generation` is the limit generation read before the attempt (see `_LimitState`)."""
GenerationProbe = Callable[[], int]


if InotifyObserver is not None:

    class _LimitReportingFD(InotifyFD):
        """watchdog's inotify instance, telling us about ENOSPC before watchdog swallows it.

        watchdog 7 skips a subfolder it cannot watch without a word (#1157); the
        failure passes here first. The hook runs in whichever thread adds watches
        (ours, or watchdog's reader when a new folder appears) and must not block.
        """

        def __init__(self, hook: LimitHook, generation: GenerationProbe) -> None:
            super().__init__()
            self._limit_hook = hook
            self._generation = generation

        def add_callback(
            self, path: bytes, mask: Mask, callback: WatchCallback, id_: CallbackId
        ) -> WatchDescriptor:
            # Read before the attempt: a limit raised while it fails must not count as
            # raised "after" the failure (the folder would stay unwatched).
            generation = self._generation()
            try:
                return super().add_callback(path, mask, callback, id_)
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    self._limit_hook(getattr(callback, "path", path), path, generation)
                raise

    class _LimitReportingObserver(InotifyObserver):
        """InotifyObserver built on `_LimitReportingFD` (its __init__, with our fd)."""

        def __init__(self, hook: LimitHook, generation: GenerationProbe) -> None:
            self._inotify_fd = _LimitReportingFD(hook, generation)
            self._inotify_fd.start()
            BaseObserver.__init__(
                self, InotifyEmitter, timeout=DEFAULT_OBSERVER_TIMEOUT, inotify_fd=self._inotify_fd
            )


def _new_observer(hook: LimitHook, generation: GenerationProbe) -> BaseObserver:
    if InotifyObserver is None:  # pragma: no cover - not Linux
        return Observer()
    return _LimitReportingObserver(hook, generation)


@dataclass
class _Root:
    role: Role
    watch: ObservedWatch
    dynamic: bool
    """Added while running (a mount, a sync folder): its death is a gap, not a failure."""


@dataclass
class _LimitState:
    hits: int = 0
    generation: int = 0
    """Bumped each time the limit was raised: a root that failed before may now fit."""
    pending: dict[bytes, int] = field(default_factory=dict)
    """Roots waiting for a re-watch -> generation when they failed."""
    reported: dict[bytes, float] = field(default_factory=dict)


class Watcher:
    """Watches sensitive roots and destinations recursively with one watchdog observer.

    Paths are scheduled as bytes, so events carry the exact bytes of non-UTF-8
    names. `start()` raises `ConfigError` when a root cannot be watched. `stop()`
    stops and joins the observer and its emitter and inotify threads (watchdog
    makes them daemon threads; we never leave them running).

    Sensitive roots also report metadata changes (ATTRIB: a label set on an
    existing file); destinations do not need them. When the queue is full the
    observation is dropped and counted (`dropped`, `take_dropped()`): the
    pipeline reports a coverage gap and rescans. Reads
    (`FileClosedNoWriteEvent`) are observed with `observe_reads` (the service sets
    it from `access.reads`); the pipeline tells the agent's own reads apart
    (agent.access.OwnReads).

    While running, `add_root` watches (or watches again: the path now leads to a
    new filesystem) and `remove_root` stops watching; both are synchronous, and
    a root that cannot be watched is reported as an observation (WATCH_LOST, or
    WATCH_LIMIT), not raised, so it reaches the collector as a coverage gap.

    Watch limit: every ENOSPC from inotify_add_watch becomes a WATCH_LIMIT
    observation (at most one per root per second). With `raise_watch_limit_to`
    the limit file (`max_user_watches`, a parameter for tests) is raised to that
    value and the roots that hit the limit are watched again by a small repair
    thread, so the folders skipped meanwhile are covered.

    `directories` (optional) is told of every directory created in or deleted
    from a watched tree (`DirectoryListener`: fanotify marks follow the tree).
    """

    def __init__(
        self,
        roots: Sequence[tuple[Path, Role]],
        observations: ObservationQueue,
        *,
        observe_reads: bool = False,
        monotonic: Callable[[], float] = time.monotonic,
        raise_watch_limit_to: int | None = None,
        max_user_watches: Path = MAX_USER_WATCHES,
        directories: DirectoryListener | None = None,
    ) -> None:
        self._initial = tuple((os.fsencode(path), role) for path, role in roots)
        self.directories = directories
        self._queue = observations
        reads = [FileClosedNoWriteEvent] if observe_reads else []
        self._filters = {
            Role.SENSITIVE: [*EVENT_FILTER, *_SENSITIVE_EXTRA, *reads],
            Role.DESTINATION: [*EVENT_FILTER, *reads],
        }
        self.now = monotonic
        self._raise_to = raise_watch_limit_to
        self._limit_file = max_user_watches
        self._lock = threading.Lock()
        """Guards counters only; never held while calling watchdog."""
        self._dropped = 0
        self._dropped_unreported = 0
        self._limit = _LimitState()
        self._roots_lock = threading.RLock()
        """Serialises schedule/unschedule. Never taken in watchdog's threads (they hold
        watchdog's locks that unschedule needs)."""
        self._roots: dict[tuple[bytes, Role], _Root] = {}
        self.nested: dict[tuple[bytes, Role], tuple[bytes, ...]] = {}
        """(root, role) -> dynamic roots of that role strictly inside it; read lock-free by
        the handlers, replaced whole under `_roots_lock`."""
        self._role_of: dict[bytes, Role] = {}
        """Root -> role, for the watch-limit hook (lock-free, replaced whole)."""
        self._observer: BaseObserver | None = None
        self._repairs: queue.Queue[bytes | None] = queue.Queue()
        self._repairer: threading.Thread | None = None
        self._log_handler = _WatchdogLogHandler(self)
        self._saved_levels: dict[str, int] = {}

    @property
    def dropped(self) -> int:
        """Observations dropped because the queue was full, since start."""
        with self._lock:
            return self._dropped

    @property
    def watch_limit_hits(self) -> int:
        """Folders that could not be watched because the watch limit was reached."""
        with self._lock:
            return self._limit.hits

    def take_dropped(self) -> int:
        """Drops not yet taken by a previous call (the pipeline polls this)."""
        with self._lock:
            n, self._dropped_unreported = self._dropped_unreported, 0
            return n

    def put(self, obs: Observation) -> None:
        """Enqueue without blocking; count a drop when the queue is full."""
        try:
            self._queue.put_nowait(obs)
        except queue.Full:
            with self._lock:
                self._dropped += 1
                self._dropped_unreported += 1

    def roots(self) -> list[tuple[bytes, Role]]:
        """What is watched now."""
        with self._roots_lock:
            return list(self._roots)

    def healthy(self) -> bool:
        """True while the observer, its emitters and its inotify reader thread all run.

        A thread that died (for example the reader, when a watchdog warning is turned
        into an exception by `-W error`) means silent blindness: the service polls this.
        Emitters of roots added while running do not count: a sync folder that was
        deleted was reported as WATCH_LOST and is not a reason to restart the agent.
        """
        observer = self._observer
        if observer is None or not observer.is_alive():
            return False
        with self._roots_lock:
            static = {r.watch for r in self._roots.values() if not r.dynamic}
            emitters = [e for e in observer.emitters if e.watch in static]
        if not all(emitter.is_alive() for emitter in emitters):
            return False
        if self._repairer is not None and not self._repairer.is_alive():
            return False
        # InotifyObserver's reader thread is private; other observers have none.
        reader = getattr(observer, "_inotify_fd", None)
        return reader is None or bool(reader.is_alive())

    def start(self) -> None:
        """Start the observer, then watch each root (synchronously: watched on return)."""
        self._attach_log_handler()
        observer = _new_observer(self._limit_hit, self._limit_generation)
        self._observer = observer
        observer.start()
        if self._raise_to is not None:
            self._repairer = threading.Thread(target=self._repair, name="exfilwatch-watch-repair")
            self._repairer.start()
        root = b""
        try:
            with self._roots_lock:
                for root, role in self._initial:
                    self._schedule(root, role, dynamic=False)
        except OSError as e:
            self.stop()
            raise ConfigError(f"cannot watch {_display(root)}: {e.strerror}") from e
        logger.info("watching %d roots", len(self._initial))

    def stop(self) -> None:
        repairer, self._repairer = self._repairer, None
        if repairer is not None:
            self._repairs.put(None)
            repairer.join()
        observer, self._observer = self._observer, None
        if observer is not None:
            self._stop_observer(observer)
        with self._roots_lock:
            self._roots.clear()
            self.nested = {}
        self._detach_log_handler()

    def add_root(self, path: Path | bytes, role: Role) -> bool:
        """Watch `path` recursively from now on, or again if it is watched already.

        "Again" is for a path that leads somewhere new: a filesystem was mounted on
        it, or unmounted from it; the old watches sit on the old inodes. True when
        watched; False when it could not be (reported as an observation).
        """
        root = os.fsencode(path)
        with self._roots_lock:
            if self._observer is None:
                raise AgentError("the watcher is not running")
            existing = self._roots.get((root, role))
            if existing is not None:
                self._unschedule(root, role)
            try:
                self._schedule(root, role, dynamic=existing is None or existing.dynamic)
            except OSError as e:
                logger.warning("cannot watch %s: %s", _display(root), e.strerror)
                if e.errno != errno.ENOSPC:  # ENOSPC: the limit hook reported it already
                    self.put(Observation(ObservationKind.WATCH_LOST, root, root, role, self.now()))
                return False
        logger.info("watching %s (%s)", _display(root), role)
        return True

    def remove_root(self, path: Path | bytes, role: Role | None = None) -> bool:
        """Stop watching `path` (in `role`, or in every role). True if it was watched.

        Orderly: no observation is made (an unmount is not a coverage gap).
        """
        root = os.fsencode(path)
        removed = False
        with self._roots_lock:
            for key in [k for k in self._roots if k[0] == root and role in (None, k[1])]:
                self._unschedule(*key)
                removed = True
        if removed:
            logger.info("stopped watching %s", _display(root))
        return removed

    # scheduling (under _roots_lock)

    def _schedule(self, root: bytes, role: Role, *, dynamic: bool) -> None:
        observer = self._observer
        if observer is None:
            raise AgentError("the watcher is not running")
        self._role_of = {**self._role_of, root: role}  # the limit hook may need it now
        try:
            try:
                watch = self._schedule_once(observer, root, role)
            except OSError as e:
                # The root itself did not fit: raise the limit now and try once more.
                if e.errno != errno.ENOSPC or not self._raise_limit():
                    raise
                watch = self._schedule_once(observer, root, role)
            self._roots[(root, role)] = _Root(role, watch, dynamic)
        finally:
            self._update_nested()

    def _schedule_once(self, observer: BaseObserver, root: bytes, role: Role) -> ObservedWatch:
        # watchdog annotates `path` as str | Path, but bytes works and is the only
        # way to get bytes back in events (FIELD-NOTES §1.7). On a running observer
        # schedule() starts the emitter, which adds every watch before returning.
        return observer.schedule(
            _Handler(self, root, role),
            root,  # type: ignore[arg-type]
            recursive=True,
            event_filter=self._filters[role],
        )

    def _unschedule(self, root: bytes, role: Role) -> None:
        entry = self._roots.pop((root, role))
        self._update_nested()
        observer = self._observer
        if observer is not None:
            with contextlib.suppress(KeyError):  # its emitter was already gone
                observer.unschedule(entry.watch)

    def _update_nested(self) -> None:
        nested: dict[tuple[bytes, Role], tuple[bytes, ...]] = {}
        for root, role in self._roots:
            inner = tuple(
                other
                for (other, other_role), other_entry in self._roots.items()
                if other_role is role
                and other_entry.dynamic
                and other != root
                and _is_under(other, root)
            )
            if inner:
                nested[(root, role)] = inner
        self.nested = nested
        self._role_of = dict(self._roots.keys())

    # watch limit

    def _limit_generation(self) -> int:
        with self._lock:
            return self._limit.generation

    def _limit_hit(self, root: bytes, path: bytes, generation: int) -> None:
        """ENOSPC while watching `path` below `root`, tried at limit `generation`.

        Runs in watchdog's threads too.
        """
        now = self.now()
        with self._lock:
            state = self._limit
            state.hits += 1
            last = state.reported.get(root)
            report = last is None or now - last >= WATCH_LIMIT_REPORT_INTERVAL
            if report:
                state.reported[root] = now
            # The root itself failing is retried by _schedule; a folder below it is
            # repaired by watching the whole root again once the limit was raised.
            repair = self._raise_to is not None and path != root and root not in state.pending
            if repair:
                state.pending[root] = generation
        if report:
            logger.warning(
                "inotify watch limit reached: %s (below %s) is not watched",
                _display(path),
                _display(root),
            )
            role = self._role_of.get(root)
            self.put(Observation(ObservationKind.WATCH_LIMIT, path, root, role, now))
        if repair:
            self._repairs.put_nowait(root)

    def _raise_limit(self) -> bool:
        """Raise the limit if configured; True if it is higher than when last raised."""
        if self._raise_to is None:
            return False
        with self._lock:
            generation = self._limit.generation
        if not raise_watch_limit(self._raise_to, path=self._limit_file):
            return False
        with self._lock:
            if self._limit.generation == generation:
                self._limit.generation += 1
        return True

    def _repair(self) -> None:
        """Thread: watch roots again whose folders were skipped, once the limit was raised."""
        while (root := self._repairs.get()) is not None:
            with self._lock:
                failed_at = self._limit.pending.get(root, -1)
                current = self._limit.generation
            if current == failed_at:
                self._raise_limit()
            with self._lock:
                raised = self._limit.generation > failed_at
                self._limit.pending.pop(root, None)
            if not raised:
                logger.warning(
                    "the inotify watch limit is already %d or more: folders below %s stay "
                    "unwatched",
                    self._raise_to,
                    _display(root),
                )
                continue
            with self._roots_lock:
                for role in [r for (p, r) in self._roots if p == root]:
                    self.add_root(root, role)

    @staticmethod
    def _stop_observer(observer: BaseObserver) -> None:
        # InotifyObserver starts its inotify reader thread in __init__; stop() joins
        # it and the emitters even when the observer thread itself never started.
        observer.stop()
        if observer.is_alive():
            observer.join()

    def _attach_log_handler(self) -> None:
        for name in WATCHDOG_LOGGERS:
            wd_logger = logging.getLogger(name)
            if wd_logger.getEffectiveLevel() > logging.WARNING:
                # The overflow warning must reach our handler even when the
                # application silences warnings.
                self._saved_levels[name] = wd_logger.level
                wd_logger.setLevel(logging.WARNING)
            wd_logger.addHandler(self._log_handler)

    def _detach_log_handler(self) -> None:
        for name in WATCHDOG_LOGGERS:
            wd_logger = logging.getLogger(name)
            wd_logger.removeHandler(self._log_handler)
            if name in self._saved_levels:
                wd_logger.setLevel(self._saved_levels.pop(name))


def _display(path: bytes) -> str:
    return path.decode("utf-8", "backslashreplace")
