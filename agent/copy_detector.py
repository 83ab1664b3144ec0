"""Sans-I/O copy detector: a finished write at a destination -> "exact copy of labelled file X".

Sits between the pipeline's stat/hash workers and event building. No disk, no
psutil, no clock: the caller passes `now` (monotonic seconds) and the hashes.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from dataclasses import dataclass, replace
from enum import StrEnum

from agent.events import DestinationClass, DetectionMethod, DeviceInfo, Sha256Hex
from agent.index import Entry, SensitiveIndex

logger = logging.getLogger(__name__)

DEFAULT_WINDOW = 30.0
"""Seconds during which the same (dev, ino, size, mtime_ns) is decided only once."""
DEFAULT_TEMP_GRACE = 10.0
"""Seconds a temp-named file may wait for its rename before it is decided as it is."""
MAX_UNDECIDED = 10_000
"""Recent writes without a match kept for `recheck` (oldest dropped beyond this)."""

# rsync writes ".name.XXXXXX" and renames it into place; browsers and editors
# write *.part / *.crdownload / *.tmp; Office keeps "~$name" lock files.
_RSYNC_TEMP = re.compile(rb"^\..+\.[A-Za-z0-9]{6}$", re.DOTALL)
_TEMP_SUFFIXES = (b".part", b".crdownload", b".tmp")
_TEMP_PREFIXES = (b"~$",)


def is_temp_name(path: bytes) -> bool:
    """True for names that copy tools use before renaming a finished file into place."""
    name = path.rsplit(b"/", 1)[-1]
    return (
        bool(_RSYNC_TEMP.match(name))
        or name.lower().endswith(_TEMP_SUFFIXES)
        or name.startswith(_TEMP_PREFIXES)
    )


class WriteTrigger(StrEnum):
    """What told us the write was finished."""

    CLOSE = "close"
    """Closed after writing."""
    RENAME = "rename"
    """Renamed into place inside a watched tree (rsync, editors, browsers)."""
    CREATE = "create"
    """Appeared without a close: moved in from outside, or inside a new directory."""
    SCAN = "scan"
    """Found by a directory scan (new directory, or a rescan after lost events)."""
    SETTLED = "settled"
    """A temp-named file that was never renamed into place (see `CopyDetector.due`)."""


@dataclass(frozen=True)
class WrittenFile:
    """A file that may have just finished being written at a destination."""

    path: bytes
    size: int
    dev: int
    ino: int
    mtime_ns: int
    destination_class: DestinationClass
    sha256: Sha256Hex | None = None
    """None until the pipeline hashed it (the detector asks with `NeedsHash`)."""
    device: DeviceInfo | None = None
    trigger: WriteTrigger = WriteTrigger.CLOSE

    @property
    def identity(self) -> tuple[int, int, int, int]:
        """(dev, ino, size, mtime_ns): the same content at the same inode."""
        return (self.dev, self.ino, self.size, self.mtime_ns)

    def with_hash(self, sha256: Sha256Hex) -> WrittenFile:
        return replace(self, sha256=sha256)


@dataclass(frozen=True)
class ExactCopy:
    """`written` has the same size and sha256 as the labelled `source`."""

    written: WrittenFile
    source: Entry
    sha256: Sha256Hex
    """The hash both files share."""
    method: DetectionMethod = DetectionMethod.EXACT_HASH


@dataclass(frozen=True)
class NeedsHash:
    """A labelled file of the same size exists: hash `written` and feed it again."""

    written: WrittenFile
    candidates: int


Decision = ExactCopy | NeedsHash


class CopyDetector:
    """Decides on finished writes. Not thread-safe: the pipeline serialises calls.

    Rules, in order:

    1. A temp name (`.name.XXXXXX`, `*.part`, `*.crdownload`, `*.tmp`, `~$*`) is
       not decided on close: its rename into place is. A temp-named file that is
       never renamed comes back from `due()` after `temp_grace` seconds, so that
       naming a copy `report.tmp` is not a way around the agent.
    2. The same (dev, ino, size, mtime_ns) decided within `window` seconds is not
       decided again (cp then chmod, shutil.copy's extra events, close after rename).
    3. A file the index already holds as a detected copy, unchanged, is not a new
       copy (a rename inside the destination, a rescan).
    4. No labelled file of the same size: nothing. Same size but no hash yet:
       `NeedsHash`. Equal hash: `ExactCopy` of the highest-labelled match
       (originals before copies).
    5. A write that matched nothing is remembered for `window` seconds: when the
       index learns a labelled file of that size a moment later (a file saved in a
       sensitive root and copied at once, its events handled out of order),
       `recheck(size)` hands the write back to be decided again.
    """

    def __init__(
        self,
        index: SensitiveIndex,
        *,
        window: float = DEFAULT_WINDOW,
        temp_grace: float = DEFAULT_TEMP_GRACE,
    ) -> None:
        self._index = index
        self._window = window
        self._temp_grace = temp_grace
        self._decided: OrderedDict[tuple[int, int, int, int], float] = OrderedDict()
        self._deferred: OrderedDict[tuple[int, int], tuple[WrittenFile, float]] = OrderedDict()
        self._undecided: OrderedDict[tuple[int, int], tuple[WrittenFile, float]] = OrderedDict()

    def feed(self, obs: WrittenFile, now: float) -> list[Decision]:
        self.expire(now)
        key = (obs.dev, obs.ino)
        if obs.trigger is WriteTrigger.RENAME:
            self._deferred.pop(key, None)
        elif obs.trigger is not WriteTrigger.SETTLED and is_temp_name(obs.path):
            self._deferred.pop(key, None)
            self._deferred[key] = (obs, now + self._temp_grace)
            return []
        if obs.identity in self._decided:
            return []
        own = self._index.get(key)
        own_copy = own is not None and own.is_copy
        if own_copy and own is not None and (own.size, own.mtime_ns) == (obs.size, obs.mtime_ns):
            return []
        candidates = [
            entry
            for entry in self._index.candidates(obs.size)
            if not (own_copy and entry.key == key)
        ]
        if not candidates:
            self._remember(obs, now)
            return []
        if obs.sha256 is None:
            return [NeedsHash(obs, len(candidates))]
        source = self._index.best(entry for entry in candidates if entry.sha256 == obs.sha256)
        if source is None:
            self._remember(obs, now)
            return []
        self._undecided.pop(key, None)
        self._decided[obs.identity] = now
        return [ExactCopy(obs, source, obs.sha256)]

    def recheck(self, size: int, now: float) -> list[WrittenFile]:
        """Recent undecided writes of `size` bytes, handed back (and forgotten).

        Call it when the index gains or changes a labelled file of that size. The
        caller re-stats each and feeds it again (without the old hash if it changed).
        """
        self.expire(now)
        found = [obs for obs, _ in self._undecided.values() if obs.size == size]
        for obs in found:
            del self._undecided[(obs.dev, obs.ino)]
        return found

    def _remember(self, obs: WrittenFile, now: float) -> None:
        key = (obs.dev, obs.ino)
        self._undecided.pop(key, None)
        self._undecided[key] = (obs, now)
        while len(self._undecided) > MAX_UNDECIDED:
            self._undecided.popitem(last=False)

    def due(self, now: float) -> list[WrittenFile]:
        """Temp-named files whose rename did not come within the grace period.

        The caller checks that each still exists unchanged at its path and feeds it
        again with `trigger=WriteTrigger.SETTLED`.
        """
        ready: list[WrittenFile] = []
        while self._deferred:
            key, (obs, deadline) = next(iter(self._deferred.items()))
            if now < deadline:
                break
            del self._deferred[key]
            ready.append(replace(obs, trigger=WriteTrigger.SETTLED))
        return ready

    def expire(self, now: float) -> None:
        """Forget decisions and undecided writes older than the window."""
        while self._decided:
            identity, at = next(iter(self._decided.items()))
            if now - at < self._window:
                break
            del self._decided[identity]
        while self._undecided:
            key, (_, at) = next(iter(self._undecided.items()))
            if now - at < self._window:
                break
            del self._undecided[key]

    def __len__(self) -> int:
        """Decisions still remembered for deduplication."""
        return len(self._decided)
