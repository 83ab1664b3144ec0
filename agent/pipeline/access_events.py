"""Access events, beside the copy decisions: reads, deletes and renames of labelled files.

A read (CLOSE_NOWRITE of an indexed file) is attributed to its reader
(`reader_of`: fanotify's close-nowrite record when root), fed to the read
correlator (agent.pipeline.unmatched: a later write by the same process may be a
transformed copy), then filtered by `access:` policy and folded per (file,
process, user) (agent.access). The agent's own closes are recognised and dropped.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace

from agent import __version__
from agent.access import Fold, OwnReads, ReadFolder, ReadKey, ReadPolicy
from agent.attribution import PipelineAttributor
from agent.clock import Clock
from agent.config import AgentConfig
from agent.destinations import Destinations
from agent.events import (
    Action,
    AttributionMethod,
    DestinationClass,
    DeviceInfo,
    Event,
    ProcessInfo,
    UserInfo,
    event_id_at,
)
from agent.index import Entry, Hasher, SensitiveIndex, display
from agent.pipeline.reporting import Reporter, file_ref
from agent.watcher import Observation

logger = logging.getLogger(__name__)

ReadSink = Callable[[Entry, ProcessInfo | None, UserInfo, float], None]
"""`sink(source, process, user, at)`: a labelled file was read (at the watcher's stamp)."""


@dataclass(frozen=True)
class _Read:
    """One read of a labelled file, as folded by `ReadFolder`."""

    entry: Entry
    process: ProcessInfo | None
    user: UserInfo
    method: AttributionMethod
    root: bytes
    """The watched root it was seen under (a destination: a copy was read)."""


class AccessStage:
    """READ, DELETE and RENAME events of indexed files (originals and detected copies).

    Thread-safe (workers call it concurrently). `on_read` gets every attributed
    read of a labelled file, wanted by policy or not: copy detection needs them
    all (an exempt backup agent's read still explains its write to a share).
    """

    def __init__(
        self,
        config: AgentConfig,
        index: SensitiveIndex,
        attributor: PipelineAttributor,
        hasher: Hasher,
        clock: Clock,
        reporter: Reporter,
        destinations: Destinations,
        own: OwnReads,
        *,
        on_read: ReadSink | None = None,
    ) -> None:
        self._config = config
        self._index = index
        self._attributor = attributor
        self._hasher = hasher
        self._clock = clock
        self._reporter = reporter
        self._destinations = destinations
        self._own = own
        self._on_read = on_read
        self._policy = ReadPolicy(config.access)
        self._lock = threading.Lock()
        self._folder: ReadFolder[_Read] = ReadFolder(config.access.fold_interval)

    def read(self, obs: Observation) -> None:
        # Ours first, labelled or not: every own close must settle its open (a copy
        # we hashed may be indexed only after its close arrives).
        if self._own.is_own(obs.path, obs.at):
            self._reporter.count("own_reads")
            return
        entry = self._index.get_path(obs.path)
        if entry is None:
            return
        wanted = self._policy.wanted(obs.path, entry.label)
        if not wanted and self._on_read is None:
            return
        outcome = self._hasher.stat(obs.path)
        if outcome.st is not None and outcome.failure is None:
            process, user, method = self._attributor.reader_of(obs.path, outcome.st, seen_at=obs.at)
        else:  # gone already: the read happened, the reader is unknown
            process, user, method = None, UserInfo(), AttributionMethod.UNATTRIBUTED
        if self._on_read is not None:
            self._on_read(entry, process, user, obs.at)
        if not wanted or self._policy.exempt(process):
            return
        read = _Read(entry, process, user, method, obs.root)
        with self._lock:
            fold = self._folder.feed(
                ReadKey.of(obs.path, process, user), read, self._clock.monotonic()
            )
        if fold is None:
            self._reporter.count("reads_folded")
        else:
            self._report_read(fold)

    def due(self) -> None:
        """Report the folding windows that ended (housekeeping)."""
        if not len(self._folder):
            return
        with self._lock:
            folds = self._folder.due(self._clock.monotonic())
        for fold in folds:
            self._report_read(fold)

    def flush(self) -> None:
        """Close every folding window now (at stop)."""
        with self._lock:
            folds = self._folder.flush()
        for fold in folds:
            self._report_read(fold)

    def deleted(self, obs: Observation, entry: Entry) -> None:
        """A labelled file (original or copy) was deleted, or moved out of sight.

        The caller took it out of the index and handed it to the detector (a copy of
        it still being hashed must find it) in one step, under the decide lock.
        """
        klass, device = self._context(obs.root)
        event = self._event(Action.DELETE, entry, klass, device)
        self._reporter.count("deletes")
        logger.info("delete %s: %s label=%s", event.event_id, display(entry.path), entry.label)
        self._reporter.emit(event)

    def renamed(self, obs: Observation, moved: Entry) -> None:
        """A labelled file was renamed inside a watched root; `moved` is at the new name."""
        outcome = self._hasher.stat(obs.dest_path)
        if outcome.st is not None and outcome.failure is None:
            process, user, method = self._attributor.attribute(obs.dest_path, outcome.st)
        else:
            process, user, method = None, UserInfo(), AttributionMethod.UNATTRIBUTED
        klass, device = self._context(obs.root)
        old = replace(moved, path=obs.path)
        event = replace(
            self._event(Action.RENAME, old, klass, device, process, user, method),
            destination=file_ref(moved),
        )
        self._reporter.count("renames")
        logger.info(
            "rename %s: %s -> %s label=%s",
            event.event_id,
            display(obs.path),
            display(obs.dest_path),
            moved.label,
        )
        self._reporter.emit(event)

    def _context(self, root: bytes) -> tuple[DestinationClass | None, DeviceInfo | None]:
        """The destination class and medium of a watched root (None for a sensitive root)."""
        dest = self._destinations.get(root)
        return (None, None) if dest is None else (dest.destination_class, dest.device)

    def _report_read(self, fold: Fold[_Read]) -> None:
        read = fold.value
        klass, device = self._context(read.root)
        event = self._event(
            Action.READ, read.entry, klass, device, read.process, read.user, read.method
        )
        self._reporter.count("reads")
        logger.debug("read %s x%d: %s", event.event_id, fold.count, display(read.entry.path))
        self._reporter.emit(replace(event, count=fold.count))

    def _event(
        self,
        action: Action,
        entry: Entry,
        klass: DestinationClass | None,
        device: DeviceInfo | None,
        process: ProcessInfo | None = None,
        user: UserInfo | None = None,
        method: AttributionMethod = AttributionMethod.UNATTRIBUTED,
    ) -> Event:
        wall_ns = self._clock.wall_ns()
        return Event(
            event_id=event_id_at(wall_ns),
            observed_at_ns=wall_ns,
            action=action,
            host=self._config.host,
            agent_version=__version__,
            source=file_ref(entry),
            label=entry.label,
            label_source=entry.label_source,
            destination_class=klass,
            device=device,
            process=process,
            user=user or UserInfo(),
            attribution=method,
        )
