"""watchdog adapter, the first stage: filesystem events -> small `Observation`s on a bounded queue.

The handler decides nothing and never blocks: a slow or raising handler makes the
kernel queue overflow or kills watchdog's dispatcher (FIELD-NOTES §1.5, §8.2).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TypeAlias

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
from watchdog.observers.api import BaseObserver

from agent.errors import ConfigError

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
    """A watch died (root deleted, rebuild failed): a coverage gap."""


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
_EVENT_FILTER: list[type[FileSystemEvent]] = [
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


class _Handler(FileSystemEventHandler):
    """One per root: maps the event class to a kind and enqueues. Nothing else."""

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
        if kind is ObservationKind.DIR_DELETED and path == self._root:
            kind = ObservationKind.WATCH_LOST
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
        elif record.levelno >= logging.ERROR:
            kind = ObservationKind.WATCH_LOST
        else:
            return
        self._watcher.put(Observation(kind, b"", b"", None, self._watcher.now()))


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
    (`FileClosedNoWriteEvent`) are off by default: nothing consumes them yet and
    every hash the agent computes would come back as one.
    """

    def __init__(
        self,
        roots: Sequence[tuple[Path, Role]],
        observations: ObservationQueue,
        *,
        observe_reads: bool = False,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._roots = tuple((os.fsencode(path), role) for path, role in roots)
        self._queue = observations
        reads = [FileClosedNoWriteEvent] if observe_reads else []
        self._filters = {
            Role.SENSITIVE: [*_EVENT_FILTER, *_SENSITIVE_EXTRA, *reads],
            Role.DESTINATION: [*_EVENT_FILTER, *reads],
        }
        self.now = monotonic
        self._lock = threading.Lock()
        self._dropped = 0
        self._dropped_unreported = 0
        self._observer: BaseObserver | None = None
        self._log_handler = _WatchdogLogHandler(self)
        self._saved_levels: dict[str, int] = {}

    @property
    def dropped(self) -> int:
        """Observations dropped because the queue was full, since start."""
        with self._lock:
            return self._dropped

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

    def healthy(self) -> bool:
        """True while the observer, its emitters and its inotify reader thread all run.

        A thread that died (for example the reader, when a watchdog warning is turned
        into an exception by `-W error`) means silent blindness: the service polls this.
        """
        observer = self._observer
        if observer is None or not observer.is_alive():
            return False
        if not all(emitter.is_alive() for emitter in observer.emitters):
            return False
        # InotifyObserver's reader thread is private; other observers have none.
        reader = getattr(observer, "_inotify_fd", None)
        return reader is None or bool(reader.is_alive())

    def start(self) -> None:
        self._attach_log_handler()
        observer = Observer()
        try:
            for root, role in self._roots:
                # watchdog annotates `path` as str | Path, but bytes works and is the
                # only way to get bytes back in events (FIELD-NOTES §1.7).
                observer.schedule(
                    _Handler(self, root, role),
                    root,  # type: ignore[arg-type]
                    recursive=True,
                    event_filter=self._filters[role],
                )
            observer.start()
        except OSError as e:
            self._stop_observer(observer)
            self._detach_log_handler()
            # watchdog's OSError does not say which root failed
            bad = [root for root, _ in self._roots if not os.path.isdir(root)]
            where = ", ".join(r.decode("utf-8", "backslashreplace") for r in bad or [b"a root"])
            raise ConfigError(f"cannot watch {where}: {e.strerror}") from e
        self._observer = observer
        logger.info("watching %d roots", len(self._roots))

    def stop(self) -> None:
        observer, self._observer = self._observer, None
        if observer is not None:
            self._stop_observer(observer)
        self._detach_log_handler()

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
