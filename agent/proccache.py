"""Process facts for attribution, captured when a process is seen and keyed by (pid, start time).

Used by the fanotify reader and the /proc scan (agent.attribution). A short `cp` has
exited before the copy is decided, so facts are read the moment a process is seen;
a pid is only an identity together with its start time, because pids are reused.
"""

from __future__ import annotations

import logging
import os
import pwd
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from agent.events import ProcessInfo, UserInfo

logger = logging.getLogger(__name__)

DEFAULT_CAPACITY = 4096
"""Processes remembered (least recently seen dropped first)."""
DEFAULT_GRACE = 2.0
"""Seconds a gone process's facts may still answer for its pid (see `ProcessCache.lookup`)."""
MAX_PPID_DEPTH = 16
_UNSET_LOGINUID = 4294967295
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def user_name(uid: int) -> str:
    """The account name of `uid`, or the number as text when it has none."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


@dataclass(frozen=True)
class ProcessFacts:
    """What we know of one process, as read from /proc while it was there."""

    process: ProcessInfo
    user: UserInfo
    start_ticks: int
    """Start time in clock ticks since boot (/proc/PID/stat field 22): the exact key."""
    complete: bool
    """False when exe or cmdline could not be read (a zombie: it had exited already)."""


@dataclass(frozen=True)
class _Stat:
    comm: str
    ppid: int
    start_ticks: int


@dataclass
class _Slot:
    facts: ProcessFacts
    seen_at: float
    """Monotonic time the process was last seen alive under this pid."""


class ProcessCache:
    """A bounded LRU of `ProcessFacts` by (pid, start_ticks). Thread-safe.

    Every lookup re-reads the pid's start time, so facts are only ever returned for
    the process that holds the pid now. The one exception is a process that is
    gone by the time we look: its facts answer for its pid for `grace` seconds
    after it was last seen. Linux hands out pids cyclically, so the same pid
    going to another process within those seconds needs pid_max forks in between.
    `proc` is a parameter so tests can present a /proc-shaped tree.
    """

    def __init__(
        self,
        *,
        proc: Path = Path("/proc"),
        capacity: int = DEFAULT_CAPACITY,
        grace: float = DEFAULT_GRACE,
    ) -> None:
        self._proc = proc
        self._root = os.fsencode(proc)
        self._capacity = capacity
        self._grace = grace
        self._lock = threading.Lock()
        self._slots: OrderedDict[tuple[int, int], _Slot] = OrderedDict()
        self._latest: dict[int, tuple[int, int]] = {}
        """pid -> key of the newest process seen under that pid."""
        self._names: dict[int, str] = {}
        self._boot_time = self._read_boot_time()

    def __len__(self) -> int:
        with self._lock:
            return len(self._slots)

    def start_ticks(self, pid: int) -> int | None:
        """The start time of whoever holds `pid` now, or None when nobody does."""
        stat = self._stat(pid)
        return stat.start_ticks if stat is not None else None

    def get(self, pid: int, start_ticks: int) -> ProcessFacts | None:
        """Facts for exactly (pid, start_ticks), if remembered. No I/O."""
        with self._lock:
            slot = self._slots.get((pid, start_ticks))
            return slot.facts if slot is not None else None

    def lookup(self, pid: int, now: float) -> ProcessFacts | None:
        """Facts for the process holding `pid` now (`now`: monotonic seconds).

        Alive (or a zombie): facts for its (pid, start time), from the cache or read
        now; a changed executable (an exec since: same pid and start time, another
        program) is read again. Gone: the facts last seen under `pid` if that was
        within `grace` seconds, else None. Never facts of one process for another.
        """
        with self._lock:
            known = self._latest.get(pid)
            slot = self._slots.get(known) if known is not None else None
        if slot is not None:
            stat = self._stat(pid)
            if stat is None:
                return self._recent(pid, now)
            if stat.start_ticks == slot.facts.start_ticks and slot.facts.complete:
                exe = self._read_exe(pid)
                # None: a zombie now; what we saw of it alive still stands.
                if exe is None or exe == slot.facts.process.exe:
                    self._touch((pid, stat.start_ticks), now)
                    return slot.facts
        # Read exe and cmdline first: they vanish the moment the process exits (a
        # zombie keeps only stat and status). The start-time checks below make sure
        # they belonged to the process we key them by.
        exe, cmdline = self._read_exe(pid), self._read_cmdline(pid)
        stat = self._stat(pid)
        if stat is None:
            return self._recent(pid, now)
        key = (pid, stat.start_ticks)
        facts = self._describe(pid, stat, exe, cmdline)
        if facts is None:
            return self._recent(pid, now)
        with self._lock:
            old = self._slots.get(key)
            if old is not None and old.facts.complete and exe is None:
                facts = old.facts  # seen whole before it turned into a zombie
            self._slots[key] = _Slot(facts, now)
            self._slots.move_to_end(key)
            self._latest[pid] = key
            while len(self._slots) > self._capacity:
                (old_pid, old_start), _ = self._slots.popitem(last=False)
                if self._latest.get(old_pid) == (old_pid, old_start):
                    del self._latest[old_pid]
        return facts

    def _touch(self, key: tuple[int, int], now: float) -> None:
        with self._lock:
            slot = self._slots.get(key)
            if slot is not None:
                slot.seen_at = now
                self._slots.move_to_end(key)
                self._latest[key[0]] = key

    def _recent(self, pid: int, now: float) -> ProcessFacts | None:
        with self._lock:
            key = self._latest.get(pid)
            slot = self._slots.get(key) if key is not None else None
            if slot is None or now - slot.seen_at > self._grace:
                return None
            return slot.facts

    # reading /proc (raw reads with bytes paths: this runs for every fanotify event)

    def _read(self, pid: int, name: bytes) -> bytes | None:
        try:
            fd = os.open(b"%s/%d/%s" % (self._root, pid, name), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            chunks = []
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)
            return b"".join(chunks)
        except OSError:
            return None
        finally:
            os.close(fd)

    def _read_exe(self, pid: int) -> bytes | None:
        try:
            return os.readlink(b"%s/%d/exe" % (self._root, pid))
        except OSError:
            return None

    def _read_cmdline(self, pid: int) -> tuple[bytes, ...]:
        raw = self._read(pid, b"cmdline")
        return tuple(raw.split(b"\0")[:-1]) if raw else ()

    def _stat(self, pid: int) -> _Stat | None:
        raw = self._read(pid, b"stat")
        if raw is None:
            return None
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        head, sep, rest = raw.rpartition(b")")
        fields = rest.split()
        if not sep or len(fields) < 20:
            return None
        try:
            return _Stat(
                comm=head.partition(b"(")[2].decode("utf-8", "replace"),
                ppid=int(fields[1]),
                start_ticks=int(fields[19]),
            )
        except ValueError:
            return None

    def _describe(
        self, pid: int, stat: _Stat, exe: bytes | None, cmdline: tuple[bytes, ...]
    ) -> ProcessFacts | None:
        # No exe: exited already (a zombie) or a kernel thread. No cmdline: the same.
        complete = exe is not None and bool(cmdline)
        uids = self._uids(pid)
        login = self._login_uid(pid)
        # The pid went to someone else while we read: none of it is trustworthy.
        again = self._stat(pid)
        if again is None or again.start_ticks != stat.start_ticks or uids is None:
            return None
        real, effective = uids
        info = ProcessInfo(
            pid=pid,
            start_time_ns=self._start_time_ns(stat.start_ticks),
            exe=exe or b"",
            cmdline=cmdline,
            ppid_chain=self._ppid_chain(stat.ppid),
            name=stat.comm,
        )
        user = UserInfo(
            login=self._name(login if login is not None else real),
            effective=self._name(effective),
            uid=real,
        )
        return ProcessFacts(info, user, stat.start_ticks, complete)

    def _uids(self, pid: int) -> tuple[int, int] | None:
        text = self._read(pid, b"status")
        for line in (text or b"").splitlines():
            if line.startswith(b"Uid:"):
                fields = line.split()
                try:
                    return int(fields[1]), int(fields[2])
                except (IndexError, ValueError):
                    return None
        return None

    def _login_uid(self, pid: int) -> int | None:
        """The audit login uid (survives sudo and su), when the kernel keeps one."""
        try:
            value = int((self._read(pid, b"loginuid") or b"").strip())
        except ValueError:
            return None
        return None if value == _UNSET_LOGINUID else value

    def _ppid_chain(self, ppid: int) -> tuple[int, ...]:
        chain: list[int] = []
        while ppid > 0 and len(chain) < MAX_PPID_DEPTH:
            chain.append(ppid)
            parent = self._stat(ppid)
            if parent is None:
                break
            ppid = parent.ppid
        return tuple(chain)

    def _name(self, uid: int) -> str:
        name = self._names.get(uid)
        if name is None:
            name = user_name(uid)
            if len(self._names) < 1024:
                self._names[uid] = name
        return name

    def _start_time_ns(self, ticks: int) -> int:
        # The same arithmetic as psutil's create_time(), so both agree to the ns.
        return round((ticks / _CLK_TCK + self._boot_time) * 1e9)

    def _read_boot_time(self) -> float:
        try:
            for line in (self._proc / "stat").read_bytes().splitlines():
                if line.startswith(b"btime"):
                    return float(line.split()[1])
        except (OSError, IndexError, ValueError):
            pass
        logger.warning("no boot time in %s/stat: process start times are relative", self._proc)
        return 0.0
