"""Sans-I/O read -> write correlation: `same_process` and `probable` copies.

After the copy detector: a destination write that matched no labelled file by hash
(converted, re-encoded, trimmed, or copied while the source changed) may still
carry one. If the writing process read a labelled file shortly before, that file
is the source (`same_process`, strong: needs a pid, fanotify when root). If only
the same user read a labelled file of about the written size moments before, it
is `probable` (weak). DESIGN §3 rules 4 and 5. Time is passed in; no I/O.
Used by agent.pipeline.unmatched.
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
DEFAULT_PID_WINDOW = 10.0
"""Seconds within which a pid alone is the same process, when a start time is unknown
(fanotify gives the pid of a short copier that was gone before /proc could be read):
pids are handed out in sequence, and a reuse within seconds needs the whole pid
space (4,194,304 on 64-bit Linux) to wrap."""
DEFAULT_PROBABLE_WINDOW = 30.0
"""Seconds a user's read of a labelled file can make a same-sized write probable."""
DEFAULT_SIZE_TOLERANCE = 0.01
"""For `probable`: |written - source| may be this fraction of the source's size."""
DEFAULT_PER_OWNER = 256
"""Labelled files remembered per process and per user (the most recent ones)."""
DEFAULT_MAX_OWNERS = 4096
"""Processes (and, separately, users) remembered; the least recently active go first."""
SHELLS = frozenset({"sh", "dash", "bash", "zsh", "ksh", "mksh", "fish", "busybox"})
"""Writers that may write what their child reads: a shell opens `> dest` itself (dash
keeps it open until the child exits, so fanotify names the shell as the writer)."""
MAX_SPENT = 4096
"""Spent reads remembered (see `ReadCorrelator.spend`); the oldest go first."""

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
    start_ns: int = 0
    """The reader's start time (0: unknown), for reads remembered by pid."""


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

    def __bool__(self) -> bool:
        return bool(self._owners)  # an owner is dropped with its last read

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

    def discard(self, owner: K, key: FileKey, until: float) -> None:
        """Forget the owner's read of `key` if it was stamped at or before `until`."""
        files = self._owners.get(owner)
        if files is None:
            return
        read = files.get(key)
        if read is not None and read.at <= until:
            del files[key]
            if not files:
                del self._owners[owner]

    def latest_of(self, key: FileKey, until: float) -> tuple[K, _Read] | None:
        """The latest read of `key` stamped at or before `until`, by any owner (a scan)."""
        found: tuple[K, _Read] | None = None
        for owner, files in self._owners.items():
            read = files.get(key)
            if read is not None and read.at <= until and (found is None or read.at > found[1].at):
                found = (owner, read)
        return found

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


def _is_shell(process: ProcessInfo) -> bool:
    name = process.exe.rsplit(b"/", 1)[-1].decode("utf-8", "replace") if process.exe else ""
    return process.name in SHELLS or name in SHELLS


def _user_key(user: UserInfo) -> str | None:
    # The login user: `sudo cp` is still the person who logged in.
    return user.login or user.effective or None


class ReadCorrelator:
    """Remembers labelled-file reads; decides on writes that matched nothing by hash.

    Not thread-safe: the pipeline serialises calls (as for the copy detector).
    Call `read` for each read of a labelled file (with whatever attribution found),
    and `decide` for each finished destination write the copy detector did not
    match. `expire(now)` may be called now and then to give memory back early.
    Reads are remembered per process (pid and start time), per pid and per parent
    pid (for `pid_window` seconds: either start time may be unknown, and a shell
    writes what its child reads, see `SHELLS`) and per user.

    A read explains one write: `spend` it once a write is known to come from it
    (an exact copy, an archive member, a correlation reported). Otherwise a
    process copying labelled and unlabelled files alike (`cp -r`, a file manager)
    would make every unlabelled file a "copy" of the last labelled one it read.
    """

    def __init__(
        self,
        *,
        same_process_window: float = DEFAULT_SAME_PROCESS_WINDOW,
        pid_window: float = DEFAULT_PID_WINDOW,
        probable_window: float = DEFAULT_PROBABLE_WINDOW,
        size_tolerance: float = DEFAULT_SIZE_TOLERANCE,
        per_owner: int = DEFAULT_PER_OWNER,
        max_owners: int = DEFAULT_MAX_OWNERS,
    ) -> None:
        self._same_process_window = same_process_window
        self._pid_window = pid_window
        self._probable_window = probable_window
        self._size_tolerance = size_tolerance
        self._by_process: _RecentReads[tuple[int, int]] = _RecentReads(per_owner, max_owners)
        self._by_pid: _RecentReads[int] = _RecentReads(per_owner, max_owners)
        self._by_parent: _RecentReads[int] = _RecentReads(per_owner, max_owners)
        self._by_user: _RecentReads[str] = _RecentReads(per_owner, max_owners)
        self._spent: OrderedDict[tuple[object, FileKey], float] = OrderedDict()
        """(owner, source) -> reads stamped at or before this explain nothing more."""
        self._unclaimed: OrderedDict[FileKey, float] = OrderedDict()
        """Sources copied by a writer nobody could name, whose read has not come yet:
        the next read of each, stamped at or before the value, is that copier's."""

    def __bool__(self) -> bool:
        """Any read remembered (O(1), unlike `len`: the pipeline asks on every write)."""
        return bool(self._by_process or self._by_pid or self._by_parent or self._by_user)

    def __len__(self) -> int:
        """Reads remembered (per process, per pid, per parent pid and per user)."""
        return len(self._by_process) + len(self._by_pid) + len(self._by_parent) + len(self._by_user)

    def read(self, source: Entry, process: ProcessInfo | None, user: UserInfo, now: float) -> None:
        """`process` (or at least `user`) read the labelled file `source` at `now`.

        A read spent already (its write handled first, see `spend`) is not remembered.
        """
        until = self._unclaimed.get(source.key)
        if until is not None and now <= until and process is not None and process.pid > 0:
            del self._unclaimed[source.key]  # the unnamed copier's read: spent on arrival
            self._mark_spent(self._owners(process, UserInfo()), source.key, until)
            return
        read = _Read(source, now)
        pkey = _process_key(process)
        if pkey is not None and not self._is_spent(("p", pkey), source.key, now):
            self._by_process.add(pkey, read)
        if process is not None and process.pid > 0:
            if not self._is_spent(("pid", process.pid), source.key, now):
                self._by_pid.add(process.pid, _Read(source, now, process.start_time_ns))
            parent = process.ppid_chain[0] if process.ppid_chain else 0
            if parent > 1 and not self._is_spent(("pid", process.pid), source.key, now):
                self._by_parent.add(parent, _Read(source, now))
        ukey = _user_key(user)
        if ukey is not None and not self._is_spent(("u", ukey), source.key, now):
            self._by_user.add(ukey, read)

    def spend(
        self, source: FileKey, process: ProcessInfo | None, user: UserInfo, until: float
    ) -> None:
        """A write by `process` (as `user`) came from `source`: its reads of `source`
        stamped at or before `until` explain nothing else, also those still to come
        (reads and writes of different folders may be handled in either order)."""
        pkey = _process_key(process)
        if pkey is not None:
            self._by_process.discard(pkey, source, until)
        if process is not None and process.pid > 0:
            self._by_pid.discard(process.pid, source, until)
            if process.ppid_chain:
                self._by_parent.discard(process.ppid_chain[0], source, until)
        ukey = _user_key(user)
        if ukey is not None:
            self._by_user.discard(ukey, source, until)
        self._mark_spent(self._owners(process, user), source, until)
        if process is None or process.pid <= 0:
            self._spend_latest(source, until)

    def _spend_latest(self, source: FileKey, until: float) -> None:
        """The writer is unknown (a folder written to before fanotify marked it, or no
        fanotify): the latest read of `source` by any process is taken to be the
        copier's; when none came yet, the next one will be."""
        found = self._by_pid.latest_of(source, until)
        if found is None:
            self._unclaimed.pop(source, None)
            self._unclaimed[source] = until
            while len(self._unclaimed) > MAX_SPENT:
                self._unclaimed.popitem(last=False)
            return
        pid, read = found
        self._by_pid.discard(pid, source, until)
        owners: list[tuple[object, object]] = [("pid", pid)]
        if read.start_ns:
            self._by_process.discard((pid, read.start_ns), source, until)
            owners.append(("p", (pid, read.start_ns)))
        self._mark_spent(owners, source, until)

    def _mark_spent(
        self, owners: list[tuple[object, object]], source: FileKey, until: float
    ) -> None:
        for owner in owners:
            self._spent.pop((owner, source), None)
            self._spent[(owner, source)] = until
        while len(self._spent) > MAX_SPENT:
            self._spent.popitem(last=False)

    @staticmethod
    def _owners(process: ProcessInfo | None, user: UserInfo) -> list[tuple[object, object]]:
        owners: list[tuple[object, object]] = []
        pkey = _process_key(process)
        if pkey is not None:
            owners.append(("p", pkey))
        if process is not None and process.pid > 0:
            owners.append(("pid", process.pid))
        ukey = _user_key(user)
        if ukey is not None:
            owners.append(("u", ukey))
        return owners

    def _spent_by(self, owners: list[tuple[object, object]], read: _Read) -> bool:
        return any(self._is_spent(owner, read.source.key, read.at) for owner in owners)

    def _is_spent(self, owner: object, source: FileKey, at: float) -> bool:
        until = self._spent.get((owner, source))
        return until is not None and at <= until

    def decide(
        self, written: WrittenFile, process: ProcessInfo | None, user: UserInfo, now: float
    ) -> Correlation | None:
        """`same_process`, else `probable`, else None, for a write nobody matched by hash.

        same_process: the writing process read a labelled file in the window (or,
        within `pid_window`: a process with the same pid did, when the start time of
        the reader or the writer is unknown; or, when the writer is a shell, a child
        of it did: `sh -c 'base64 src > dest'`); the source is the one closest in
        size to the write (then the latest read).
        probable: the same user read a labelled file within the shorter window and
        its size is within the tolerance; the closest in size (then the latest).
        The written file itself is never its own source, and a read after `now`
        (the time of the write) never explains it: the caller may decide late.
        """
        target = (written.dev, written.ino)
        pkey = _process_key(process)
        # Spent reads are dropped where they are filed; by whom else (a pid whose
        # start time was unknown when it was spent), the marks left by `spend` say:
        # the process's marks for its reads, the user's for the user's.
        owners = self._owners(process, UserInfo())
        user_owners = self._owners(None, user)
        reads: list[_Read] = []
        if pkey is not None:
            reads = [
                r
                for r in self._by_process.since(pkey, now - self._same_process_window)
                if r.source.key != target and r.at <= now
            ]
        if process is not None and process.pid > 0:
            start = process.start_time_ns
            reads += [
                r
                for r in self._by_pid.since(process.pid, now - self._pid_window)
                if r.source.key != target
                and r.at <= now
                and (not r.start_ns or not start)  # else the per-process lookup decides
            ]
            if _is_shell(process):
                reads += [
                    r
                    for r in self._by_parent.since(process.pid, now - self._pid_window)
                    if r.source.key != target and r.at <= now
                ]
        reads = [r for r in reads if not self._spent_by(owners, r)]
        if reads:
            best = _closest(reads, written.size)
            if best is not None:
                return Correlation(written, best.source, DetectionMethod.SAME_PROCESS, best.at)
        ukey = _user_key(user)
        if ukey is not None:
            reads = [
                r
                for r in self._by_user.since(ukey, now - self._probable_window)
                if r.source.key != target
                and r.at <= now
                and self._similar(r.source.size, written.size)
                and not self._spent_by(user_owners, r)
            ]
            best = _closest(reads, written.size)
            if best is not None:
                return Correlation(written, best.source, DetectionMethod.PROBABLE, best.at)
        return None

    def expire(self, now: float) -> None:
        self._by_process.expire(now - self._same_process_window)
        self._by_pid.expire(now - self._pid_window)
        self._by_parent.expire(now - self._pid_window)
        self._by_user.expire(now - self._probable_window)

    def _similar(self, source_size: int, written_size: int) -> bool:
        return abs(written_size - source_size) <= self._size_tolerance * source_size


def _closest(reads: list[_Read], size: int) -> _Read | None:
    if not reads:
        return None
    return min(reads, key=lambda r: (abs(r.source.size - size), -r.at))
