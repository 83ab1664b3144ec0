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
DEFAULT_RETRY_DELAY = 1.0
"""Seconds before a file that changed while it was hashed is looked at again."""
MAX_RETRIES = 3

# rsync writes ".name.XXXXXX" and renames it into place; browsers and editors
# write *.part / *.crdownload / *.tmp; Office keeps "~$name" lock files; Info-ZIP's
# zip writes "ziXXXXXX" (mkstemp) and renames it (archives are scanned on the rename).
_RSYNC_TEMP = re.compile(rb"^\..+\.[A-Za-z0-9]{6}$", re.DOTALL)
_ZIP_TEMP = re.compile(rb"^zi[A-Za-z0-9]{6}$")
_TEMP_SUFFIXES = (b".part", b".crdownload", b".tmp")
_TEMP_PREFIXES = (b"~$",)


def is_temp_name(path: bytes) -> bool:
    """True for names that copy tools use before renaming a finished file into place."""
    name = path.rsplit(b"/", 1)[-1]
    return (
        bool(_RSYNC_TEMP.match(name))
        or bool(_ZIP_TEMP.match(name))
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
    attempts: int = 0
    """Times `CopyDetector.retry` handed it back (it changed while it was hashed)."""

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
       copy (a rename inside the destination, a rescan); nor is it when only its
       mtime moved and no close says it was written again (`cp -a` sets the mtime
       after the close).
    4. No labelled file of the same size: nothing. Same size but no hash yet:
       `NeedsHash`. Equal hash: `ExactCopy` of the highest-labelled match
       (originals before copies).
    5. A write that matched nothing is remembered for `window` seconds: when the
       index learns a labelled file of that size a moment later (a file saved in a
       sensitive root and copied at once, its events handled out of order),
       `recheck(size)` hands the write back to be decided again.
    6. A labelled file just deleted (`removed`) stays a candidate for `window`
       seconds, after the indexed ones: `mv` across filesystems copies then
       deletes, and the two events may be handled in either order by different
       workers.
    """

    def __init__(
        self,
        index: SensitiveIndex,
        *,
        window: float = DEFAULT_WINDOW,
        temp_grace: float = DEFAULT_TEMP_GRACE,
        retry_delay: float = DEFAULT_RETRY_DELAY,
    ) -> None:
        self._index = index
        self._window = window
        self._temp_grace = temp_grace
        self._retry_delay = retry_delay
        self._retries: OrderedDict[tuple[int, int], tuple[WrittenFile, float]] = OrderedDict()
        self._unclosed: OrderedDict[tuple[int, int], float] = OrderedDict()
        """Inodes decided before their close (on a create, a scan): the close is no news."""
        self._decided: OrderedDict[tuple[int, int, int, int], float] = OrderedDict()
        self._deferred: OrderedDict[tuple[int, int], tuple[WrittenFile, float]] = OrderedDict()
        self._undecided: OrderedDict[tuple[int, int], tuple[WrittenFile, float]] = OrderedDict()
        self._removed: OrderedDict[tuple[int, int], tuple[Entry, float]] = OrderedDict()

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
        removed = [
            entry
            for entry, _ in self._removed.values()
            if entry.size == obs.size and self._index.get(entry.key) is None
        ]
        if not candidates and not removed:
            self._remember(obs, now)
            return []
        if obs.sha256 is None:
            return [NeedsHash(obs, len(candidates) + len(removed))]
        unclosed = obs.trigger is WriteTrigger.CLOSE and self._unclosed.pop(key, None) is not None
        if (
            own_copy
            and own is not None
            and (obs.trigger is not WriteTrigger.CLOSE or unclosed)
            and (own.size, own.sha256) == (obs.size, obs.sha256)
        ):
            # The same bytes, and no close after the one we decided on: only the
            # mtime moved (cp -a, shutil.copy2 and mv set it after the close, maybe
            # before we saw the close of a copy decided on its create). Unlike `cp`
            # writing the same bytes over it again, which closes it again.
            self._decided[obs.identity] = now
            return []
        # A file still indexed (a surviving copy) is a better source than a deleted one.
        source = self._index.best(e for e in candidates if e.sha256 == obs.sha256)
        if source is None:
            source = self._index.best(e for e in removed if e.sha256 == obs.sha256)
        if source is None:
            self._remember(obs, now)
            return []
        self._undecided.pop(key, None)
        self._decided[obs.identity] = now
        if obs.trigger is not WriteTrigger.CLOSE:
            self._unclosed.pop(key, None)
            self._unclosed[key] = now
        return [ExactCopy(obs, source, obs.sha256)]

    def unmatched(self, obs: WrittenFile) -> bool:
        """True when `obs`, as just fed, matched no labelled file (rule 5 remembered it).

        Not for a write held back (a temp name), deduplicated or already known as a
        copy: those are decided, or will be. The pipeline then asks the rules the
        hash cannot answer (label in content, same process, probable).
        """
        held = self._undecided.get((obs.dev, obs.ino))
        return held is not None and held[0].identity == obs.identity

    def forget(self, key: tuple[int, int]) -> None:
        """The inode `key` is an original in a sensitive root (again): decide it afresh.

        Without this, moving a labelled file out, back and out again within the window
        would be deduplicated as "the same write" (rule 2).
        """
        for identity in [i for i in self._decided if i[:2] == key]:
            del self._decided[identity]

    def removed(self, entry: Entry, now: float) -> None:
        """`entry` left the index (deleted): keep it as a candidate for `window` seconds."""
        self.expire(now)
        self._removed.pop(entry.key, None)
        self._removed[entry.key] = (entry, now)
        while len(self._removed) > MAX_UNDECIDED:
            self._removed.popitem(last=False)

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

    def retry(self, obs: WrittenFile, now: float) -> bool:
        """`obs` changed while it was hashed: hand it back from `due` in a moment.

        `cp -a`, `shutil.copy2` and `mv` across filesystems set the mtime after the
        close, and that brings no event of its own; nor does the end of a write we
        caught half way (a create). False when it was retried `MAX_RETRIES` times.
        """
        if obs.attempts >= MAX_RETRIES:
            return False
        key = (obs.dev, obs.ino)
        self._retries.pop(key, None)
        self._retries[key] = (replace(obs, attempts=obs.attempts + 1), now + self._retry_delay)
        return True

    def due(self, now: float) -> list[WrittenFile]:
        """Temp-named files whose rename did not come within the grace period, and retries.

        The caller checks that each still exists at its path (the same inode) and
        feeds it again, as it is now, with `trigger=WriteTrigger.SETTLED`.
        """
        ready: list[WrittenFile] = []
        for pending in (self._deferred, self._retries):
            while pending:  # each holds one delay: deadlines come in insertion order
                key, (obs, deadline) = next(iter(pending.items()))
                if now < deadline:
                    break
                del pending[key]
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
        while self._removed:
            key, (_, at) = next(iter(self._removed.items()))
            if now - at < self._window:
                break
            del self._removed[key]
        while self._unclosed:
            key, at = next(iter(self._unclosed.items()))
            if now - at < self._window:
                break
            del self._unclosed[key]

    def __len__(self) -> int:
        """Decisions still remembered for deduplication."""
        return len(self._decided)
