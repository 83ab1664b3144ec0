"""Sans-I/O read -> write correlation: `same_process` and `probable` copies.

After the copy detector: a destination write that matched no labelled file by hash
(converted, re-encoded, trimmed, or copied while the source changed) may still
carry one. If the writing process read a labelled file shortly before, that file
is the source (`same_process`, strong: needs a pid, fanotify when root). If only
the same user read a labelled file of about the written size moments before, it
is `probable` (weak). DESIGN §3 rules 4 and 5. Time is passed in; no I/O.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from agent.copy_detector import WrittenFile
from agent.events import DetectionMethod, ProcessInfo, UserInfo
from agent.index import Entry

DEFAULT_SAME_PROCESS_WINDOW = 300.0
"""Seconds a process's read of a labelled file can explain its later write."""
DEFAULT_PROBABLE_WINDOW = 30.0
"""Seconds a user's read of a labelled file can make a same-sized write probable."""
DEFAULT_SIZE_TOLERANCE = 0.01
"""For `probable`: |written - source| may be this fraction of the source's size."""
DEFAULT_PER_OWNER = 256
"""Labelled files remembered per process and per user (the most recent ones)."""
DEFAULT_MAX_OWNERS = 4096
"""Processes (and, separately, users) remembered; the least recently active go first."""

K = TypeVar("K", bound=Hashable)
FileKey = tuple[int, int]


@dataclass(frozen=True)
class Correlation:
    """`written` is probably a copy of the labelled `source` (see `method`)."""

    written: WrittenFile
    source: Entry
    method: DetectionMethod
    """SAME_PROCESS or PROBABLE."""
    read_at: float
    """When the source was read (the caller's monotonic seconds)."""


@dataclass(frozen=True)
class _Read:
    source: Entry
    at: float


class _RecentReads(Generic[K]):
    """Per owner (a process or a user), its most recent reads, oldest first.

    Bounded twice: `per_owner` files per owner, `max_owners` owners (the owner
    whose last read is oldest is dropped first).
    """

    def __init__(self, per_owner: int, max_owners: int) -> None:
        self._per_owner = per_owner
        self._max_owners = max_owners
        self._owners: OrderedDict[K, OrderedDict[FileKey, _Read]] = OrderedDict()

    def __len__(self) -> int:
        return sum(len(files) for files in self._owners.values())

    def add(self, owner: K, read: _Read) -> None:
        files = self._owners.pop(owner, None)
        if files is None:
            files = OrderedDict()
        self._owners[owner] = files
        files.pop(read.source.key, None)
        files[read.source.key] = read
        while len(files) > self._per_owner:
            files.popitem(last=False)
        while len(self._owners) > self._max_owners:
            self._owners.popitem(last=False)

    def since(self, owner: K, cutoff: float) -> Iterator[_Read]:
        """The owner's reads at or after `cutoff` (dropping its older ones)."""
        files = self._owners.get(owner)
        if files is None:
            return iter(())
        while files and next(iter(files.values())).at < cutoff:
            files.popitem(last=False)
        if not files:
            del self._owners[owner]
        return iter(list(files.values()))

    def expire(self, cutoff: float) -> None:
        """Forget owners whose last read is older than `cutoff`."""
        while self._owners:
            owner, files = next(iter(self._owners.items()))
            if files and next(reversed(files.values())).at >= cutoff:
                break
            del self._owners[owner]


def _process_key(process: ProcessInfo | None) -> tuple[int, int] | None:
    # A start time of 0 means unknown: without it a pid is not an identity.
    if process is None or process.start_time_ns == 0:
        return None
    return (process.pid, process.start_time_ns)


def _user_key(user: UserInfo) -> str | None:
    # The login user: `sudo cp` is still the person who logged in.
    return user.login or user.effective or None


class ReadCorrelator:
    """Remembers labelled-file reads; decides on writes that matched nothing by hash.

    Not thread-safe: the pipeline serialises calls (as for the copy detector).
    Call `read` for each read of a labelled file (with whatever attribution found),
    and `decide` for each finished destination write the copy detector did not
    match. `expire(now)` may be called now and then to give memory back early.
    """

    def __init__(
        self,
        *,
        same_process_window: float = DEFAULT_SAME_PROCESS_WINDOW,
        probable_window: float = DEFAULT_PROBABLE_WINDOW,
        size_tolerance: float = DEFAULT_SIZE_TOLERANCE,
        per_owner: int = DEFAULT_PER_OWNER,
        max_owners: int = DEFAULT_MAX_OWNERS,
    ) -> None:
        self._same_process_window = same_process_window
        self._probable_window = probable_window
        self._size_tolerance = size_tolerance
        self._by_process: _RecentReads[tuple[int, int]] = _RecentReads(per_owner, max_owners)
        self._by_user: _RecentReads[str] = _RecentReads(per_owner, max_owners)

    def __len__(self) -> int:
        """Reads remembered (per process plus per user)."""
        return len(self._by_process) + len(self._by_user)

    def read(self, source: Entry, process: ProcessInfo | None, user: UserInfo, now: float) -> None:
        """`process` (or at least `user`) read the labelled file `source` at `now`."""
        read = _Read(source, now)
        pkey = _process_key(process)
        if pkey is not None:
            self._by_process.add(pkey, read)
        ukey = _user_key(user)
        if ukey is not None:
            self._by_user.add(ukey, read)

    def decide(
        self, written: WrittenFile, process: ProcessInfo | None, user: UserInfo, now: float
    ) -> Correlation | None:
        """`same_process`, else `probable`, else None, for a write nobody matched by hash.

        same_process: the writing process read a labelled file in the window; the
        source is the one closest in size to the write (then the latest read).
        probable: the same user read a labelled file within the shorter window and
        its size is within the tolerance; the closest in size (then the latest).
        The written file itself is never its own source.
        """
        target = (written.dev, written.ino)
        pkey = _process_key(process)
        if pkey is not None:
            reads = [
                r
                for r in self._by_process.since(pkey, now - self._same_process_window)
                if r.source.key != target
            ]
            best = _closest(reads, written.size)
            if best is not None:
                return Correlation(written, best.source, DetectionMethod.SAME_PROCESS, best.at)
        ukey = _user_key(user)
        if ukey is not None:
            reads = [
                r
                for r in self._by_user.since(ukey, now - self._probable_window)
                if r.source.key != target and self._similar(r.source.size, written.size)
            ]
            best = _closest(reads, written.size)
            if best is not None:
                return Correlation(written, best.source, DetectionMethod.PROBABLE, best.at)
        return None

    def expire(self, now: float) -> None:
        self._by_process.expire(now - self._same_process_window)
        self._by_user.expire(now - self._probable_window)

    def _similar(self, source_size: int, written_size: int) -> bool:
        return abs(written_size - source_size) <= self._size_tolerance * source_size


def _closest(reads: list[_Read], size: int) -> _Read | None:
    if not reads:
        return None
    return min(reads, key=lambda r: (abs(r.source.size - size), -r.at))
