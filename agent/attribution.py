"""Attribution, after the copy detector: who wrote the file (psutil adapter, never raises).

Tier 0 of FIELD-NOTES §3.5: a short `cp` has usually exited before we look, so most
copies end up FILE_OWNER; fanotify (root) is the later, reliable tier.
"""

from __future__ import annotations

import logging
import os
import pwd
import stat
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

import psutil

from agent.events import AttributionMethod, ProcessInfo, UserInfo

logger = logging.getLogger(__name__)

_UNSET_LOGINUID = 4294967295
_MAX_PPID_DEPTH = 16
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR


class AttributorProtocol(Protocol):
    def attribute(
        self, path: bytes, st: os.stat_result
    ) -> tuple[ProcessInfo | None, UserInfo, AttributionMethod]: ...


def user_name(uid: int) -> str:
    """The account name of `uid`, or the number as text when it has none."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


class Attributor:
    """Finds a process holding the file open by scanning /proc/<pid>/fd, within a budget.

    A match is by inode (st_dev, st_ino), not by path, so renames do not hide it.
    Processes that have it open for writing win over readers; the agent's own pid
    is skipped (its workers open files to hash them). When nobody holds it, the
    user is the file's owner and the process is unknown.
    """

    def __init__(
        self,
        *,
        budget: float = 0.05,
        proc: Path = Path("/proc"),
        monotonic: Callable[[], float] = time.monotonic,
        pids: Callable[[], Iterable[int]] = psutil.pids,
    ) -> None:
        self._budget = budget
        self._proc = proc
        self._monotonic = monotonic
        self._pids = pids
        self._self = os.getpid()

    def attribute(
        self, path: bytes, st: os.stat_result
    ) -> tuple[ProcessInfo | None, UserInfo, AttributionMethod]:
        pid = self._find_holder(st)
        if pid is not None:
            found = self._describe(pid)
            if found is not None:
                return found[0], found[1], AttributionMethod.PROC_SCAN
        name = user_name(st.st_uid)
        return (
            None,
            UserInfo(login=name, effective=name, uid=st.st_uid),
            AttributionMethod.FILE_OWNER,
        )

    def _find_holder(self, st: os.stat_result) -> int | None:
        target = (st.st_dev, st.st_ino)
        deadline = self._monotonic() + self._budget
        reader: int | None = None
        try:
            # Newest processes first: the copier is usually recent.
            pids = sorted(self._pids(), reverse=True)
        except OSError:
            return None
        for pid in pids:
            if pid == self._self:
                continue
            if self._monotonic() > deadline:
                logger.debug("attribution budget exhausted after scanning up to pid %d", pid)
                break
            fd_dir = self._proc / str(pid) / "fd"
            try:
                with os.scandir(fd_dir) as fds:
                    for fd in fds:
                        try:
                            fst = fd.stat()  # follows the magic link to the open file
                        except OSError:
                            continue
                        if (fst.st_dev, fst.st_ino) != target or not stat.S_ISREG(fst.st_mode):
                            continue
                        if self._opened_for_write(pid, fd.name):
                            return pid
                        if reader is None:
                            reader = pid
            except OSError:
                continue  # gone, or not ours to look at
        return reader

    def _opened_for_write(self, pid: int, fd: str) -> bool:
        try:
            text = (self._proc / str(pid) / "fdinfo" / fd).read_text()
        except OSError:
            return False
        for line in text.splitlines():
            if line.startswith("flags:"):
                try:
                    return bool(int(line.split()[1], 8) & _WRITE_FLAGS)
                except (IndexError, ValueError):
                    return False
        return False

    def _describe(self, pid: int) -> tuple[ProcessInfo, UserInfo] | None:
        try:
            proc = psutil.Process(pid)
            with proc.oneshot():
                start_ns = round(proc.create_time() * 1e9)
                name = proc.name()
                uids = proc.uids()
                ppid = proc.ppid()
                exe = _or_empty(proc.exe)
                cmdline = tuple(os.fsencode(arg) for arg in _or_list(proc.cmdline))
        except (psutil.Error, OSError):
            return None
        login_uid = self._login_uid(pid)
        real = user_name(uids.real)
        user = UserInfo(
            login=user_name(login_uid) if login_uid is not None else real,
            effective=user_name(uids.effective),
            uid=uids.real,
        )
        info = ProcessInfo(
            pid=pid,
            start_time_ns=start_ns,
            exe=os.fsencode(exe),
            cmdline=cmdline,
            ppid_chain=_ppid_chain(ppid),
            name=name,
        )
        return info, user

    def _login_uid(self, pid: int) -> int | None:
        """The audit login uid (survives sudo and su), when the kernel keeps one."""
        try:
            value = int((self._proc / str(pid) / "loginuid").read_text().strip())
        except (OSError, ValueError):
            return None
        return None if value == _UNSET_LOGINUID else value


def _or_empty(getter: Callable[[], str]) -> str:
    try:
        return getter()
    except psutil.AccessDenied:
        return ""


def _or_list(getter: Callable[[], list[str]]) -> list[str]:
    try:
        return getter()
    except psutil.AccessDenied:
        return []


def _ppid_chain(ppid: int) -> tuple[int, ...]:
    chain: list[int] = []
    while ppid > 0 and len(chain) < _MAX_PPID_DEPTH:
        chain.append(ppid)
        try:
            ppid = psutil.Process(ppid).ppid()
        except (psutil.Error, OSError):
            break
    return tuple(chain)
