"""The sensitive index: every labelled file the agent knows, by inode, size and sha256.

Built by `Scanner` over the sensitive roots, kept current by the pipeline; the copy
detector looks candidates up here. `FileHasher` is the one place that reads file bytes.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Protocol

from agent.errors import LabelError
from agent.events import Sha256Hex
from agent.labels import Labelled, Labeller, LabelSource

logger = logging.getLogger(__name__)

FileKey = tuple[int, int]
"""(st_dev, st_ino): a file's identity; paths change, inodes stay."""


@dataclass(frozen=True)
class Entry:
    """One labelled file (an original in a sensitive root, or a detected copy)."""

    path: bytes
    size: int
    mtime_ns: int
    sha256: Sha256Hex
    label: str
    label_source: str
    """How the *original* got its label: "xattr" or "path"; copies keep their source's."""
    dev: int
    ino: int
    is_copy: bool = False
    """True for a detected copy (it inherited its label from the file it copies)."""

    @property
    def key(self) -> FileKey:
        return (self.dev, self.ino)


def display(path: bytes) -> str:
    """A printable form of a raw path for logs (never for identity)."""
    return path.decode("utf-8", "backslashreplace")


def _is_under(path: bytes, prefix: bytes) -> bool:
    prefix = prefix.rstrip(b"/")
    return path == prefix or path.startswith(prefix + b"/")


class SensitiveIndex:
    """Thread-safe in-memory index keyed by (st_dev, st_ino).

    Secondary maps: size -> keys (copy candidates), sha256 -> keys, path -> key.
    `levels` (lowest first) ranks labels when several entries share a hash.
    """

    def __init__(self, levels: Sequence[str] = ()) -> None:
        self._ranks = {label: i for i, label in enumerate(levels)}
        self._lock = threading.RLock()
        self._by_key: dict[FileKey, Entry] = {}
        self._by_size: dict[int, dict[FileKey, None]] = {}
        self._by_hash: dict[str, dict[FileKey, None]] = {}
        self._by_path: dict[bytes, FileKey] = {}

    def rank(self, label: str) -> int:
        """Rank of a label (higher is more sensitive); -1 when unknown."""
        return self._ranks.get(label, -1)

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_key)

    def entries(self) -> list[Entry]:
        with self._lock:
            return list(self._by_key.values())

    def get(self, key: FileKey) -> Entry | None:
        with self._lock:
            return self._by_key.get(key)

    def get_path(self, path: bytes) -> Entry | None:
        with self._lock:
            key = self._by_path.get(path)
            return None if key is None else self._by_key[key]

    def candidates(self, size: int) -> list[Entry]:
        """Entries of exactly `size` bytes, in insertion order."""
        with self._lock:
            return [self._by_key[k] for k in self._by_size.get(size, ())]

    def by_hash(self, sha256: str) -> Entry | None:
        """The entry with this hash; the highest label wins, then originals over copies."""
        with self._lock:
            entries = [self._by_key[k] for k in self._by_hash.get(sha256, ())]
        return self.best(entries)

    def best(self, entries: Iterable[Entry]) -> Entry | None:
        """Highest-ranked entry; on a tie an original beats a copy, then the oldest."""
        best: Entry | None = None
        for entry in entries:
            if best is None or (self.rank(entry.label), not entry.is_copy) > (
                self.rank(best.label),
                not best.is_copy,
            ):
                best = entry
        return best

    def add(self, entry: Entry) -> Entry | None:
        """Insert or replace the entry for `entry.key`; returns the one replaced."""
        with self._lock:
            old = self._remove_key(entry.key)
            stale = self._by_path.get(entry.path)
            if stale is not None:
                # Another inode used to live at this path (replaced by rename).
                self._remove_key(stale)
            self._by_key[entry.key] = entry
            self._by_size.setdefault(entry.size, {})[entry.key] = None
            self._by_hash.setdefault(entry.sha256, {})[entry.key] = None
            self._by_path[entry.path] = entry.key
            return old

    def update(self, entry: Entry) -> bool:
        """Replace an existing entry (same key); False when the key is not indexed."""
        with self._lock:
            if entry.key not in self._by_key:
                return False
            self.add(entry)
            return True

    def remove(self, key: FileKey) -> Entry | None:
        with self._lock:
            return self._remove_key(key)

    def remove_path(self, path: bytes) -> Entry | None:
        with self._lock:
            key = self._by_path.get(path)
            return None if key is None else self._remove_key(key)

    def remove_under(self, prefix: bytes) -> int:
        """Remove every entry at or below directory `prefix`; returns how many."""
        with self._lock:
            keys = [k for p, k in self._by_path.items() if _is_under(p, prefix)]
            for key in keys:
                self._remove_key(key)
            return len(keys)

    def rename(self, old: bytes, new: bytes) -> Entry | None:
        """Follow a rename: the entry at `old` (or below it, for a directory) moves to `new`."""
        with self._lock:
            moved: Entry | None = None
            for path, key in list(self._by_path.items()):
                if _is_under(path, old):
                    entry = self._by_key[key]
                    renamed = replace(entry, path=new + path[len(old.rstrip(b"/")) :])
                    self.add(renamed)
                    if path == old:
                        moved = renamed
            return moved

    def _remove_key(self, key: FileKey) -> Entry | None:
        entry = self._by_key.pop(key, None)
        if entry is None:
            return None
        same_size = self._by_size.get(entry.size)
        if same_size is not None:
            same_size.pop(key, None)
            if not same_size:
                del self._by_size[entry.size]
        same_hash = self._by_hash.get(entry.sha256)
        if same_hash is not None:
            same_hash.pop(key, None)
            if not same_hash:
                del self._by_hash[entry.sha256]
        if self._by_path.get(entry.path) == key:
            del self._by_path[entry.path]
        return entry


class HashFailure(StrEnum):
    VANISHED = "vanished"
    UNREADABLE = "unreadable"
    TOO_LARGE = "too_large"
    NOT_REGULAR = "not_regular"
    CHANGED = "changed"
    """Replaced or written while we read it: a later close will bring it back."""


@dataclass(frozen=True)
class HashOutcome:
    sha256: Sha256Hex | None = None
    st: os.stat_result | None = None
    """`fstat` of the file that was hashed (after hashing)."""
    failure: HashFailure | None = None


@dataclass(frozen=True)
class StatOutcome:
    st: os.stat_result | None = None
    failure: HashFailure | None = None


class Hasher(Protocol):
    """Reads files for the index and the pipeline (the only file I/O they need)."""

    def stat(self, path: bytes) -> StatOutcome: ...

    def hash_file(self, path: bytes, expect: os.stat_result | None = None) -> HashOutcome: ...


class _Capped:
    """A binary reader over a file descriptor that stops after `limit` bytes.

    `hashlib.file_digest` reads to end of file; this keeps it bounded by the size
    seen at open, so a file that keeps growing cannot keep a worker busy.
    """

    def __init__(self, fd: int, limit: int) -> None:
        self._fd = fd
        self._left = limit

    def readable(self) -> bool:
        return True

    def readinto(self, buf: bytearray) -> int:
        if self._left <= 0:
            return 0
        view = memoryview(buf)[: min(len(buf), self._left)]
        n = os.readv(self._fd, [view])
        self._left -= n
        return n


class FileHasher:
    """sha256 of regular files, bounded by `max_file_bytes`, never following symlinks.

    The file is opened with O_NOFOLLOW|O_NONBLOCK (a FIFO never blocks us), checked
    to be the inode the caller stat'ed, read for exactly the size seen at open
    with `hashlib.file_digest`, and re-checked: a file written meanwhile is
    reported as CHANGED instead of a wrong hash.
    """

    def __init__(self, max_file_bytes: int) -> None:
        self.max_file_bytes = max_file_bytes

    def stat(self, path: bytes) -> StatOutcome:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return StatOutcome(failure=HashFailure.VANISHED)
        except OSError as e:
            return StatOutcome(failure=_failure(e))
        if not stat.S_ISREG(st.st_mode):
            return StatOutcome(st=st, failure=HashFailure.NOT_REGULAR)
        return StatOutcome(st=st)

    def hash_file(self, path: bytes, expect: os.stat_result | None = None) -> HashOutcome:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            return HashOutcome(failure=_failure(e))
        try:
            before = os.fstat(fd)
            if not stat.S_ISREG(before.st_mode):
                return HashOutcome(failure=HashFailure.NOT_REGULAR)
            if expect is not None and (before.st_dev, before.st_ino) != (
                expect.st_dev,
                expect.st_ino,
            ):
                return HashOutcome(failure=HashFailure.CHANGED)
            if before.st_size > self.max_file_bytes:
                return HashOutcome(st=before, failure=HashFailure.TOO_LARGE)
            digest = hashlib.file_digest(_Capped(fd, before.st_size), "sha256")
            after = os.fstat(fd)
        except OSError as e:
            return HashOutcome(failure=_failure(e))
        finally:
            os.close(fd)
        if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
            return HashOutcome(st=after, failure=HashFailure.CHANGED)
        return HashOutcome(sha256=Sha256Hex(digest.hexdigest()), st=after)


def _failure(e: OSError) -> HashFailure:
    if isinstance(e, FileNotFoundError):
        return HashFailure.VANISHED
    if e.errno == errno.ELOOP:  # O_NOFOLLOW on a symlink
        return HashFailure.NOT_REGULAR
    return HashFailure.UNREADABLE


@dataclass
class ScanStats:
    """Counters of one scan (mutable while the scan runs, then handed out)."""

    files: int = 0
    labelled: int = 0
    hashed: int = 0
    reused: int = 0
    removed: int = 0
    vanished: int = 0
    unreadable: int = 0
    too_large: int = 0
    skipped_paths: list[bytes] = field(default_factory=list)
    """Unreadable files and directories (first 100), for the operator."""

    def skip(self, path: bytes, failure: HashFailure) -> None:
        if failure is HashFailure.VANISHED or failure is HashFailure.CHANGED:
            self.vanished += 1
            return
        if failure is HashFailure.TOO_LARGE:
            self.too_large += 1
        else:
            self.unreadable += 1
        if len(self.skipped_paths) < 100:
            self.skipped_paths.append(path)


class IndexOutcome(StrEnum):
    INDEXED = "indexed"
    UNCHANGED = "unchanged"
    UNLABELLED = "unlabelled"
    SKIPPED = "skipped"


def walk_files(
    root: bytes,
    on_error: Callable[[bytes, OSError], None] | None = None,
    *,
    recursive: bool = True,
) -> Iterator[tuple[bytes, os.stat_result]]:
    """Regular files below `root` (lstat results), depth first, never following symlinks.

    Directories that vanish or cannot be listed are reported to `on_error` and skipped.
    With `recursive=False` only the files directly in `root`.
    """
    stack = [root]
    while stack:
        directory = stack.pop()
        try:
            with os.scandir(directory) as it:
                entries = list(it)
        except OSError as e:
            if on_error is not None:
                on_error(directory, e)
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    if recursive:
                        stack.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    yield entry.path, entry.stat(follow_symlinks=False)
            except OSError as e:
                if on_error is not None:
                    on_error(entry.path, e)


class Scanner:
    """Builds and refreshes the index from the sensitive roots.

    Unchanged files (same inode, size and mtime) keep their hash; vanished and
    unreadable files are skipped and counted, never raised.
    """

    def __init__(
        self,
        roots: Sequence[bytes],
        labeller: Labeller,
        index: SensitiveIndex,
        hasher: Hasher,
    ) -> None:
        self._roots = tuple(roots)
        self._labeller = labeller
        self._index = index
        self._hasher = hasher

    def scan(self) -> ScanStats:
        """Walk every root; afterwards drop originals under the roots that were not seen."""
        stats = ScanStats()
        seen: set[FileKey] = set()
        # Only entries that predate the scan may be swept: the pipeline keeps
        # indexing new files while we walk.
        before = {entry.key: entry for entry in self._index.entries() if not entry.is_copy}

        def on_error(path: bytes, e: OSError) -> None:
            stats.skip(
                path,
                HashFailure.VANISHED
                if isinstance(e, FileNotFoundError)
                else HashFailure.UNREADABLE,
            )

        for root in self._roots:
            for path, st in walk_files(root, on_error):
                stats.files += 1
                seen.add((st.st_dev, st.st_ino))
                self.index_file(path, st, stats)
        for key, entry in before.items():
            if key in seen or self._index.get(key) is not entry:
                continue
            if any(_is_under(entry.path, root) for root in self._roots):
                self._index.remove(key)
                stats.removed += 1
        logger.info(
            "index scan: %d files, %d labelled (%d hashed, %d unchanged), %d vanished, "
            "%d unreadable, %d too large",
            stats.files,
            stats.labelled,
            stats.hashed,
            stats.reused,
            stats.vanished,
            stats.unreadable,
            stats.too_large,
        )
        return stats

    def index_file(
        self, path: bytes, st: os.stat_result | None = None, stats: ScanStats | None = None
    ) -> IndexOutcome:
        """Label and (re)hash one file of a sensitive root and update the index."""
        stats = stats if stats is not None else ScanStats()
        if st is None:
            outcome = self._hasher.stat(path)
            if outcome.st is None or outcome.failure is not None:
                if outcome.failure is not HashFailure.NOT_REGULAR:
                    stats.skip(path, outcome.failure or HashFailure.VANISHED)
                return IndexOutcome.SKIPPED
            st = outcome.st
        key = (st.st_dev, st.st_ino)
        try:
            labelled = self._labeller.label_of(path, st)
        except LabelError as e:
            vanished = isinstance(e.__cause__, FileNotFoundError)
            stats.skip(path, HashFailure.VANISHED if vanished else HashFailure.UNREADABLE)
            return IndexOutcome.SKIPPED
        if labelled is None:
            labelled = self._inherited(path, key)
        if labelled is None:
            old = self._index.get(key)
            if old is not None and not old.is_copy:
                self._index.remove(key)  # label removed at the source
            return IndexOutcome.UNLABELLED
        stats.labelled += 1
        old = self._index.get(key)
        if (
            old is not None
            and (old.size, old.mtime_ns, old.path) == (st.st_size, st.st_mtime_ns, path)
            and (old.label, old.label_source) == (labelled.label, labelled.label_source)
        ):
            stats.reused += 1
            return IndexOutcome.UNCHANGED
        if old is not None and (old.size, old.mtime_ns) == (st.st_size, st.st_mtime_ns):
            self._index.add(self._entry(path, st, old.sha256, labelled))
            stats.reused += 1
            return IndexOutcome.INDEXED
        hashed = self._hasher.hash_file(path, st)
        if hashed.sha256 is None or hashed.st is None:
            stats.skip(path, hashed.failure or HashFailure.UNREADABLE)
            if old is not None:
                self._index.remove(key)
            return IndexOutcome.SKIPPED
        stats.hashed += 1
        self._index.add(self._entry(path, hashed.st, hashed.sha256, labelled))
        return IndexOutcome.INDEXED

    def _inherited(self, path: bytes, key: FileKey) -> Labelled | None:
        """The label of the file this one replaced at the same path, if any.

        Editors save by writing a temp file and renaming it over the original, and
        the new inode has lost the label attribute (FIELD-NOTES §5.1): the label
        belongs to the document, so the new inode keeps it.
        """
        previous = self._index.get_path(path)
        if previous is None or previous.is_copy or previous.key == key:
            return None
        return Labelled(previous.label, LabelSource(previous.label_source))

    @staticmethod
    def _entry(path: bytes, st: os.stat_result, sha256: Sha256Hex, labelled: Labelled) -> Entry:
        return Entry(
            path=path,
            size=st.st_size,
            mtime_ns=st.st_mtime_ns,
            sha256=sha256,
            label=labelled.label,
            label_source=labelled.label_source.value,
            dev=st.st_dev,
            ino=st.st_ino,
        )
