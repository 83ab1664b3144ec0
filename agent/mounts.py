"""Mount table, read from `/proc/self/mountinfo` and followed as it changes.

Feeds `agent.destinations`: a USB stick or a network share appears as a new mount
whose root needs its own watch, because a watch on the folder it covers sees
nothing written to it (FIELD-NOTES §1.8). The kernel flags the open mountinfo file
with POLLPRI|POLLERR on every change, so following it needs no dependency and no
periodic rereading.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import select
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.errors import AgentError

logger = logging.getLogger(__name__)

MOUNTINFO = Path("/proc/self/mountinfo")

_OCTAL = re.compile(rb"\\([0-7]{3})")
_READ_CHUNK = 64 * 1024


@dataclass(frozen=True)
class Mount:
    """One line of mountinfo (proc_pid_mountinfo(5)), escapes decoded."""

    mount_id: int
    parent_id: int
    major: int
    minor: int
    """`st_dev` of files on it; major 0 is an anonymous device (tmpfs, FUSE, NFS, btrfs)."""
    root: bytes
    """The directory of the filesystem mounted here: `/` unless a bind mount of a subfolder."""
    mount_point: bytes
    """Raw bytes, as paths are everywhere in the agent (`\\040` etc. decoded)."""
    options: str
    """Per-mount options (`rw,nosuid,...`)."""
    fs_type: str
    """`ext4`, `vfat`, `nfs4`, `fuse.sshfs` (type.subtype for FUSE)..."""
    source: str
    """`/dev/sdb1`, `server:/export`, `//nas/share`, or whatever the mounter said."""
    super_options: str = ""
    optional: tuple[str, ...] = ()
    """Propagation tags such as `shared:1`, `master:2`."""

    @property
    def identity(self) -> tuple[int, int, bytes, bytes, str]:
        """What makes it the same mount for us: a change here is an unmount + mount."""
        return (self.major, self.minor, self.root, self.mount_point, self.fs_type)


def _unescape(field: bytes) -> bytes:
    return _OCTAL.sub(lambda m: bytes([int(m.group(1), 8) & 0xFF]), field)


def _text(field: bytes) -> str:
    return os.fsdecode(_unescape(field))


def parse_mountinfo(data: bytes) -> list[Mount]:
    """Parse the whole mountinfo text. Malformed lines are skipped (and logged).

    Fields: `id parent major:minor root mount_point options [optional...] -
    fstype source super_options`. The optional fields end at the lone `-`.
    """
    mounts: list[Mount] = []
    for number, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split(b" ")
        try:
            sep = fields.index(b"-", 6)
            major, minor = fields[2].split(b":")
            mounts.append(
                Mount(
                    mount_id=int(fields[0]),
                    parent_id=int(fields[1]),
                    major=int(major),
                    minor=int(minor),
                    root=_unescape(fields[3]),
                    mount_point=_unescape(fields[4]),
                    options=_text(fields[5]),
                    optional=tuple(_text(f) for f in fields[6:sep]),
                    fs_type=_text(fields[sep + 1]),
                    source=_text(fields[sep + 2]),
                    super_options=_text(fields[sep + 3]) if len(fields) > sep + 3 else "",
                )
            )
        except (ValueError, IndexError):
            logger.warning("mountinfo line %d is malformed: skipped", number)
    return mounts


def read_mounts(path: Path = MOUNTINFO) -> list[Mount]:
    """The current mount table (one read of `path`)."""
    try:
        return parse_mountinfo(path.read_bytes())
    except OSError as e:
        raise AgentError(f"cannot read the mount table {path}: {e.strerror}") from e


def diff_mounts(old: Sequence[Mount], new: Sequence[Mount]) -> tuple[list[Mount], list[Mount]]:
    """(added, removed) between two tables, by mount id.

    A mount whose id stayed but whose identity changed (`mount --move`) is both
    removed and added; a change of options only (`remount,ro`) is neither.
    """
    before = {m.mount_id: m for m in old}
    after = {m.mount_id: m for m in new}
    removed = [
        m
        for i, m in before.items()
        if i not in after or after[i].identity != m.identity  # moved
    ]
    added = [m for i, m in after.items() if i not in before or before[i].identity != m.identity]
    return added, removed


OnChange = Callable[[list[Mount], list[Mount]], None]
"""`on_change(added, removed)`."""


class MountFollower:
    """Follows a mountinfo file and reports what was mounted and unmounted.

    `start()` reads the table and reports every mount as added (in the caller's
    thread, so existing mounts are handled when it returns), then a thread waits
    in `poll()` for POLLPRI|POLLERR, rereads and diffs. `stop()` wakes it through
    a pipe and joins it. `on_change` runs in that thread; an `AgentError` it
    raises is logged and counted, anything else is a bug: the thread dies,
    `failure` is set and `healthy()` turns false for the supervisor.
    """

    def __init__(self, on_change: OnChange, *, path: Path = MOUNTINFO) -> None:
        self._on_change = on_change
        self._path = path
        self._fd = -1
        self._wake_r = -1
        self._wake_w = -1
        self._thread: threading.Thread | None = None
        self._mounts: list[Mount] = []
        self._lock = threading.Lock()
        self.errors = 0
        self.changes = 0
        """Changes of the table seen (wake-ups that found a difference)."""
        self.failure: BaseException | None = None

    @property
    def mounts(self) -> list[Mount]:
        """The table as last read."""
        with self._lock:
            return list(self._mounts)

    def start(self) -> None:
        try:
            self._fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise AgentError(f"cannot follow the mount table {self._path}: {e.strerror}") from e
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            mounts = self._read()
            with self._lock:
                self._mounts = mounts
            self._on_change(list(mounts), [])
        except BaseException:
            self._close()
            raise
        self._thread = threading.Thread(target=self._run, name="exfilwatch-mounts")
        self._thread.start()

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            with contextlib.suppress(BlockingIOError):  # a wake-up is already pending
                os.write(self._wake_w, b"x")
            thread.join()
        self._close()

    def healthy(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    def _close(self) -> None:
        for fd in (self._fd, self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._fd = self._wake_r = self._wake_w = -1

    def _read(self) -> list[Mount]:
        # A seq_file: rewind and read to EOF; the kernel re-arms POLLPRI on each read.
        os.lseek(self._fd, 0, os.SEEK_SET)
        chunks = []
        while chunk := os.read(self._fd, _READ_CHUNK):
            chunks.append(chunk)
        return parse_mountinfo(b"".join(chunks))

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLPRI | select.POLLERR)
        poller.register(self._wake_r, select.POLLIN)
        try:
            while True:
                ready = {fd for fd, _ in poller.poll()}
                if self._wake_r in ready:
                    return
                if self._fd in ready:
                    self._changed()
        except BaseException as e:
            self.failure = e
            logger.exception("the mount follower died")
            raise

    def _changed(self) -> None:
        new = self._read()
        with self._lock:
            added, removed = diff_mounts(self._mounts, new)
            self._mounts = new
        if not added and not removed:
            return
        self.changes += 1
        try:
            self._on_change(added, removed)
        except AgentError:
            self.errors += 1
            logger.exception("handling a mount change failed")
