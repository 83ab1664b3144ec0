"""Where fanotify looks (tier-1 attribution, agent.fanotify): per directory, or per filesystem.

A mount mark sees every open and close on the mount: on the root filesystem of a
busy machine that is every other process's work, and the idle agent paid 2-7 % of
a core for it. So sensitive roots, and destination folders that are not mounts of
their own, get an inode mark with FAN_EVENT_ON_CHILD on each of their directories,
as inotify gets a watch on each: added when a directory appears (agent.watcher
tells us), dropped when it goes. Only a destination that is a whole filesystem of
its own (a USB stick, a share) is marked as a whole: everything written there is a
write to it.

As a whole *filesystem* (FAN_MARK_FILESYSTEM), not as a mount: a mount mark is on
the agent's copy of the mount, and the systemd unit runs the agent in a mount
namespace of its own (ProtectSystem=, PrivateTmp=, PrivateMounts=), where a mount
mark sees nothing that a user's process writes through the host's mount
(measured: 0 events, against 5 for a filesystem mark and 6 for directory marks).
Inode and filesystem marks hold across namespaces.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Collection, Iterable
from typing import Protocol

from agent.errors import FanotifyError
from agent.fanotify import READER_MASK, WRITER_MASK, MarkScope
from agent.mounts import Mount
from agent.watcher import Role

logger = logging.getLogger(__name__)

ALL_MASK = READER_MASK | WRITER_MASK
"""What a directory mark may carry (both roles: a destination inside a sensitive root)."""

_MASKS = {Role.SENSITIVE: READER_MASK, Role.DESTINATION: WRITER_MASK}
"""Sensitive roots: who read (close-nowrite); destinations: who wrote (close-write)."""

Key = tuple[int, int]

MAX_GONE = 10_000
"""Directories that left the tree remembered for `FanotifyMarks.outside` (about 1 MB)."""


class MarkTarget(Protocol):
    """What the marks need of agent.fanotify.Fanotify (tests may pass a recorder)."""

    def mark(self, path: bytes, mask: int, scope: MarkScope = MarkScope.MOUNT) -> None: ...

    def unmark(self, path: bytes, mask: int, scope: MarkScope = MarkScope.MOUNT) -> None: ...

    def add_scope(self, prefix: bytes) -> None: ...

    def remove_scope(self, prefix: bytes) -> None: ...


def mask_for(role: Role) -> int:
    return _MASKS[role]


def _is_under(path: bytes, root: bytes) -> bool:
    root = root.rstrip(b"/")
    return path == root or path.startswith(root + b"/")


def _real(path: bytes) -> bytes:
    return os.fsencode(os.path.realpath(path))


class FanotifyMarks:
    """The marks of one fanotify group, kept in step with the watched trees. Thread-safe.

    `add_root` marks a root: its mount when it is a destination that is a mount of
    its own, else every directory below it (walked now, symlinks not followed).
    `directory_created` / `directory_deleted` follow the tree as it changes (the
    watcher calls them from watchdog's thread: one system call each). A directory
    moved out of the tree keeps its mark until the first event from inside it,
    which the reader hands to `outside` (the event's path is outside the scope);
    that drops it. A deleted directory loses its mark in the kernel; we only
    forget it. Marking never raises: a failure is logged and counted in
    `failures` (ENOSPC: fs.fanotify.max_user_marks reached), attribution then
    falls back to the lower tiers for that folder.
    """

    def __init__(self, fan: MarkTarget) -> None:
        self._fan = fan
        self._lock = threading.Lock()
        self._dirs: dict[bytes, Key] = {}
        """Marked directory (path as marked) -> its (st_dev, st_ino)."""
        self._keys: dict[Key, bytes] = {}
        """The same, by inode: what `outside` looks up."""
        self._gone: OrderedDict[Key, bytes] = OrderedDict()
        """Directories that left the tree (at most `MAX_GONE`): deleted (no mark left) or
        moved out (marked until `outside` sees them). A stale inode number here costs
        at most one refused unmark, outside the tree."""
        self._mounts: set[bytes] = set()
        """Mount points whose filesystem is marked as a whole (real paths)."""
        self._root_dev = _dev(b"/")
        self._roots: dict[bytes, tuple[Role, bool]] = {}
        """Roots marked: (role, own filesystem), for `refresh`."""
        self.failures = 0
        self._limit_logged = False

    @property
    def directories(self) -> int:
        """Directories marked (one inode mark each)."""
        with self._lock:
            return len(self._dirs)

    @property
    def mounts(self) -> list[bytes]:
        with self._lock:
            return sorted(self._mounts)

    def add_root(self, root: bytes, role: Role, *, own_filesystem: bool) -> bool:
        """Mark `root` for `role`; True when at least its top was marked.

        `own_filesystem`: `root` is a mount point showing a whole filesystem (its
        mountinfo root is `/`). Only a destination uses that (one filesystem mark),
        and never for the filesystem of `/` (a bind mount of a folder on it is no
        stick); a sensitive root is marked by directory even on a filesystem of its
        own, so reads anywhere else on it never reach the agent.
        """
        real = _real(root)
        self._fan.add_scope(real)
        with self._lock:
            self._roots[root] = (role, own_filesystem)
        if role is Role.DESTINATION and own_filesystem and _dev(root) != self._root_dev:
            try:
                self._fan.mark(root, WRITER_MASK, MarkScope.FILESYSTEM)
            except FanotifyError as e:
                self._failed(e)
                return False
            with self._lock:
                self._mounts.add(real)
            logger.info("fanotify: filesystem mark on %s", _display(root))
            return True
        marked = self._mark_tree(root, mask_for(role))
        logger.info("fanotify: %d directories marked below %s (%s)", marked, _display(root), role)
        return marked > 0

    def refresh(self) -> int:
        """Mark every root again (walked anew); returns the directories marked.

        For folders created between the first walk and the start of the watcher,
        which no `directory_created` reports: call it once the watcher runs.
        Marking what is marked already changes nothing.
        """
        with self._lock:
            roots = dict(self._roots)
        for root, (role, whole) in roots.items():
            self.add_root(root, role, own_filesystem=whole)
        return self.directories

    def directory_created(self, path: bytes, role: Role) -> None:
        """A new directory in a watched tree (or moved into it): mark it, unless a
        filesystem mark covers it already. Subfolders come with their own call (watchdog reports
        each directory of a tree moved in)."""
        if self._covered(path):
            return
        self._mark_dir(path, mask_for(role))

    def directory_deleted(self, path: bytes) -> None:
        """Gone from the tree: deleted (the kernel dropped its mark) or moved out (still
        marked: `outside` unmarks it on its first event from there). Which of the two
        cannot be told from here, so it is kept aside for `outside`."""
        with self._lock:
            key = self._dirs.pop(path, None)
            if key is not None and self._keys.get(key) == path:
                del self._keys[key]
                self._gone[key] = path
                while len(self._gone) > MAX_GONE:
                    self._gone.popitem(last=False)

    def unmounted(self, mount_point: bytes) -> None:
        """`mount_point` was unmounted: the kernel dropped its marks with the filesystem
        (or keeps them while another mount of it is left: still the same stick); forget
        them."""
        real = _real(mount_point)
        with self._lock:
            self._mounts.discard(real)
            self._roots.pop(mount_point, None)
            gone = [p for p in self._dirs if _is_under(p, mount_point)]
            for path in gone:
                key = self._dirs.pop(path)
                if self._keys.get(key) == path:
                    del self._keys[key]
        self._fan.remove_scope(real)

    def outside(self, path: bytes) -> None:
        """The reader saw an event for `path` outside every root: if its folder carries
        one of our directory marks, the folder was moved out of the tree; unmark it."""
        parent = path.rsplit(b"/", 1)[0] or b"/"
        try:
            st = os.lstat(parent)
        except OSError:
            return
        key = (st.st_dev, st.st_ino)
        with self._lock:
            old = self._keys.pop(key, None) or self._gone.pop(key, None)
            if old is None:
                return
            if self._dirs.get(old) == key:
                del self._dirs[old]
        try:
            self._fan.unmark(parent, ALL_MASK, MarkScope.CHILDREN)
        except FanotifyError:
            return  # gone meanwhile: so is its mark
        logger.debug("fanotify: %s left the watched tree: unmarked", _display(parent))

    def _covered(self, path: bytes) -> bool:
        with self._lock:
            mounts = tuple(self._mounts)
        return bool(mounts) and any(_is_under(_real(path), m) for m in mounts)

    def _mark_tree(self, root: bytes, mask: int) -> int:
        marked = 0
        stack = [root]
        while stack:
            directory = stack.pop()
            if not self._mark_dir(directory, mask):
                continue
            marked += 1
            try:
                with os.scandir(directory) as it:
                    for entry in it:
                        try:
                            if entry.is_dir(follow_symlinks=False):
                                stack.append(entry.path)
                        except OSError:
                            continue
            except OSError:
                continue  # vanished or unreadable: nothing below to mark
        return marked

    def _mark_dir(self, path: bytes, mask: int) -> bool:
        try:
            self._fan.mark(path, mask, MarkScope.CHILDREN)
            st = os.lstat(path)
        except FanotifyError as e:
            if e.errno not in (errno.ENOENT, errno.ENOTDIR):
                self._failed(e)
            return False
        except OSError:
            return False  # removed just after we marked it: the kernel dropped the mark
        key = (st.st_dev, st.st_ino)
        with self._lock:
            self._dirs[path] = key
            self._keys[key] = path
            self._gone.pop(key, None)
        return True

    def _failed(self, e: FanotifyError) -> None:
        with self._lock:
            self.failures += 1
            first = not self._limit_logged
            if e.errno == errno.ENOSPC:
                self._limit_logged = True
        if e.errno != errno.ENOSPC:
            logger.warning("%s", e)
        elif first:
            logger.warning(
                "%s: folders past the limit are attributed without fanotify "
                "(raise fs.fanotify.max_user_marks)",
                e,
            )


def own_filesystems(paths: Collection[bytes], mounts: Iterable[Mount]) -> set[bytes]:
    """The `paths` that are mount points of whole filesystems (compared as real paths)."""
    whole = {m.mount_point for m in mounts if m.root == b"/"}
    return {p for p in paths if _real(p) in whole}


def _dev(path: bytes) -> int:
    try:
        return os.stat(path).st_dev
    except OSError:
        return -1


def _display(path: bytes) -> str:
    return path.decode("utf-8", "backslashreplace")
