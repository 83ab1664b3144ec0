"""The sensitive index: every labelled file the agent knows, by inode, size and sha256.

Built by `Scanner` over the sensitive roots, kept current by the pipeline; the copy
detector looks candidates up here. `FileHasher` is the one place that reads file bytes.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

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


_U64 = 1 << 64
_I64_MAX = (1 << 63) - 1


def _signed(n: int) -> int:
    """st_dev and st_ino are unsigned 64-bit; SQLite integers are signed."""
    return n - _U64 if n > _I64_MAX else n


def _unsigned(n: int) -> int:
    return n + _U64 if n < 0 else n


_INDEX_SCHEMA = (
    "PRAGMA journal_mode = MEMORY",
    "PRAGMA synchronous = OFF",
    # rowid order is insertion order: a replaced entry is deleted and inserted anew.
    "CREATE TABLE entries (dev INTEGER NOT NULL, ino INTEGER NOT NULL, path BLOB NOT NULL,"
    " size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, sha256 TEXT NOT NULL,"
    " label TEXT NOT NULL, label_source TEXT NOT NULL, is_copy INTEGER NOT NULL,"
    " UNIQUE (dev, ino), UNIQUE (path))",
    "CREATE INDEX entries_size ON entries (size)",
    "CREATE INDEX entries_sha256 ON entries (sha256)",
    "CREATE TABLE seen (sweep INTEGER NOT NULL, dev INTEGER NOT NULL, ino INTEGER NOT NULL,"
    " PRIMARY KEY (sweep, dev, ino)) WITHOUT ROWID",
)
_COLUMNS = "path, size, mtime_ns, sha256, label, label_source, dev, ino, is_copy"
_SELECT = f"SELECT {_COLUMNS} FROM entries"  # noqa: S608 (constant text)
_UNDER = "(path = ?1 OR (path >= ?2 AND path < ?3))"
"""A path at or below a directory: ?1 the directory, ?2 it + "/", ?3 it + "0" ("/" + 1)."""


_UNSEEN = (  # originals under a root (?1-?3) older than the sweep (?4) that it (?5) missed
    f"is_copy = 0 AND rowid <= ?4 AND {_UNDER} AND NOT EXISTS (SELECT 1 FROM seen s"  # noqa: S608
    " WHERE s.sweep = ?5 AND s.dev = entries.dev AND s.ino = entries.ino)"
)


def _under_params(prefix: bytes) -> tuple[bytes, bytes, bytes]:
    prefix = prefix.rstrip(b"/")
    return prefix, prefix + b"/", prefix + b"0"


_FILTER_BITS = 1 << 23
"""Bits of each `_Maybe` filter: 1 MiB."""


class _Maybe:
    """A set of hashes that may answer "yes" wrongly but never "no" wrongly.

    Most files written to a destination have no labelled file of their size and are
    not indexed themselves; the filters answer that without a query. Bits are never
    cleared (a removed entry costs later lookups a query, nothing else). 100,000 entries
    set about 1.2 % of the bits: a false "yes" is that rare.
    """

    __slots__ = ("_bits",)

    def __init__(self) -> None:
        self._bits = bytearray(_FILTER_BITS >> 3)

    def add(self, h: int) -> None:
        """Call under the index lock: the read-modify-write must not race."""
        h &= _FILTER_BITS - 1
        self._bits[h >> 3] |= 1 << (h & 7)

    def __contains__(self, h: int) -> bool:
        h &= _FILTER_BITS - 1
        return bool(self._bits[h >> 3] & (1 << (h & 7)))


class SensitiveIndex:
    """Thread-safe index of labelled files keyed by (st_dev, st_ino), kept on disk.

    Lookups: by key, by path, by size (copy candidates), by sha256. `levels` (lowest
    first) ranks labels when several entries share a hash. Entries returned are new
    values on every call: compare them with ==, never with `is`.

    Storage is a private temporary SQLite database (SQLite creates it under
    $SQLITE_TMPDIR, $TMPDIR, /var/tmp or /tmp and unlinks it at once, so nothing is left
    behind, even after a crash) with a page cache of `cache_kib`. As Python objects, each
    entry cost about 1.3 KB of resident memory: 130 MB for 100,000 labelled files, where
    the agent's budget is 80 MiB in all (bench/agent.py). A lookup costs a few
    microseconds more than a dict, and in-memory filters (3 MiB) answer most lookups
    of files that are not indexed (the common case at a destination) without a query.
    """

    def __init__(self, levels: Sequence[str] = (), *, cache_kib: int = 2048) -> None:
        self._ranks = {label: i for i, label in enumerate(levels)}
        self._lock = threading.RLock()
        # "" is a private on-disk temporary database; autocommit, statements are atomic.
        self._db = sqlite3.connect("", isolation_level=None, check_same_thread=False)
        for statement in (*_INDEX_SCHEMA, f"PRAGMA cache_size = -{int(cache_kib)}"):
            self._db.execute(statement)
        self._sweeps = 0
        self._keys, self._sizes, self._paths = _Maybe(), _Maybe(), _Maybe()
        self._strings: dict[str, str] = {}
        """Labels and label sources are a handful of strings: one object each."""

    def close(self) -> None:
        """Drop the database (also happens when the process exits, however it exits)."""
        with self._lock:
            self._db.close()

    def rank(self, label: str) -> int:
        """Rank of a label (higher is more sensitive); -1 when unknown."""
        return self._ranks.get(label, -1)

    def __len__(self) -> int:
        with self._lock:
            count: int = self._db.execute("SELECT count(*) FROM entries").fetchone()[0]
            return count

    def _entry(self, row: tuple[Any, ...]) -> Entry:
        path, size, mtime_ns, sha256, label, source, dev, ino, is_copy = row
        strings = self._strings
        return Entry(
            path, size, mtime_ns, sha256, strings.setdefault(label, label),
            strings.setdefault(source, source), _unsigned(dev), _unsigned(ino), bool(is_copy),
        )  # fmt: skip

    def _query(self, where: str, params: tuple[Any, ...]) -> list[Entry]:
        with self._lock:
            rows = self._db.execute(f"{_SELECT} WHERE {where} ORDER BY rowid", params).fetchall()
        return [self._entry(row) for row in rows]

    def entries(self) -> list[Entry]:
        """Every entry, oldest first (100,000 entries take some 100 ms: prefer a lookup)."""
        return self._query("1", ())

    def entries_under(self, prefix: bytes) -> list[Entry]:
        """Entries at or below directory `prefix`, oldest first."""
        return self._query(_UNDER, _under_params(prefix))

    def get(self, key: FileKey) -> Entry | None:
        if hash(key) not in self._keys:
            return None
        found = self._query("dev = ? AND ino = ?", (_signed(key[0]), _signed(key[1])))
        return found[0] if found else None

    def get_path(self, path: bytes) -> Entry | None:
        if hash(path) not in self._paths:
            return None
        found = self._query("path = ?", (path,))
        return found[0] if found else None

    def candidates(self, size: int) -> list[Entry]:
        """Entries of exactly `size` bytes, in insertion order."""
        if size not in self._sizes:
            return []
        return self._query("size = ?", (size,))

    def by_hash(self, sha256: str) -> Entry | None:
        """The entry with this hash; the highest label wins, then originals over copies."""
        return self.best(self._query("sha256 = ?", (sha256,)))

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
        """Insert or replace the entry for `entry.key`; returns the one replaced.

        Another inode at the same path (replaced by a rename) is dropped too.
        """
        row = (
            _signed(entry.dev), _signed(entry.ino), entry.path, entry.size, entry.mtime_ns,
            entry.sha256, entry.label, entry.label_source, int(entry.is_copy),
        )  # fmt: skip
        with self._lock:
            old = self.get(entry.key)
            self._keys.add(hash(entry.key))
            self._sizes.add(entry.size)
            self._paths.add(hash(entry.path))
            # REPLACE deletes every row that conflicts on (dev, ino) or on path.
            self._db.execute(
                "INSERT OR REPLACE INTO entries (dev, ino, path, size, mtime_ns, sha256, label,"
                " label_source, is_copy) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                row,
            )
            return old

    def update(self, entry: Entry) -> bool:
        """Replace an existing entry (same key); False when the key is not indexed."""
        with self._lock:
            if self.get(entry.key) is None:
                return False
            self.add(entry)
            return True

    def _delete(self, where: str, params: tuple[Any, ...]) -> list[Entry]:
        with self._lock:
            gone = self._query(where, params)
            if gone:
                self._db.execute(f"DELETE FROM entries WHERE {where}", params)  # noqa: S608
            return gone

    def remove(self, key: FileKey) -> Entry | None:
        gone = self._delete("dev = ? AND ino = ?", (_signed(key[0]), _signed(key[1])))
        return gone[0] if gone else None

    def remove_path(self, path: bytes) -> Entry | None:
        gone = self._delete("path = ?", (path,))
        return gone[0] if gone else None

    def remove_under(self, prefix: bytes) -> int:
        """Remove every entry at or below directory `prefix`; returns how many."""
        return len(self._delete(_UNDER, _under_params(prefix)))

    def rename(self, old: bytes, new: bytes) -> Entry | None:
        """Follow a rename: the entry at `old` (or below it, for a directory) moves to `new`."""
        with self._lock:
            moved: Entry | None = None
            for entry in self.entries_under(old):
                renamed = replace(entry, path=new + entry.path[len(old.rstrip(b"/")) :])
                self.add(renamed)
                if entry.path == old:
                    moved = renamed
            return moved

    # sweeping (Scanner.scan): which entries did a full walk not see?

    def begin_sweep(self) -> Sweep:
        """Start recording the files a walk sees; `Sweep.finish` removes the others."""
        with self._lock:
            self._sweeps += 1
            mark = self._db.execute("SELECT coalesce(max(rowid), 0) FROM entries").fetchone()[0]
            return Sweep(self, self._sweeps, mark)

    def _batch(self, *, more: bool) -> None:
        """Commit the open batch of writes; with `more`, open the next one.

        A walk's writes go in batches: a transaction per statement costs the scan of
        100,000 small files a quarter of its time. Other threads' statements on the
        shared connection join the open batch; nothing here needs them apart.
        """
        with self._lock:
            if self._db.in_transaction:
                self._db.execute("COMMIT")
            if more:
                self._db.execute("BEGIN")

    def _seen(self, sweep: int, key: FileKey) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO seen VALUES (?, ?, ?)",
                (sweep, _signed(key[0]), _signed(key[1])),
            )

    def _sweep(self, sweep: int, mark: int, roots: Sequence[bytes]) -> int:
        """Remove originals under `roots` that predate the sweep and were not seen."""
        removed = 0
        with self._lock:
            for root in roots:
                params = (*_under_params(root), mark, sweep)
                removed += len(self._delete(_UNSEEN, params))
            self._db.execute("DELETE FROM seen WHERE sweep = ?", (sweep,))
        return removed


SWEEP_BATCH = 256
"""Files a walk indexes per transaction."""


@dataclass
class Sweep:
    """One walk's record of the files it saw (rows in the index's database, not memory).

    Only entries that predate the sweep (`mark`: the last rowid then) may be removed:
    the pipeline keeps indexing, and re-indexing a file re-inserts its row, while we walk.
    """

    index: SensitiveIndex
    sweep: int
    mark: int
    count: int = 0

    def seen(self, key: FileKey) -> None:
        if self.count % SWEEP_BATCH == 0:
            self.index._batch(more=True)
        self.count += 1
        self.index._seen(self.sweep, key)

    def finish(self, roots: Sequence[bytes]) -> int:
        """Remove the originals below `roots` not seen; returns how many."""
        self.index._batch(more=False)
        return self.index._sweep(self.sweep, self.mark, roots)


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


@runtime_checkable
class Throttled(Protocol):
    """A hasher with a rate cap that other readers of file bytes (archives) share."""

    def throttle(self, nbytes: int) -> None: ...


SMALL_FILE_BYTES = 256 * 1024
"""Files up to this size are hashed from one read: `hashlib.file_digest` allocates a
256 KiB buffer per call, which costs more than hashing a small document (most labelled
files are small; measured in bench/agent.py)."""

BURST_SECONDS = 0.25
"""A rate cap's bucket holds this many seconds' worth of bytes: short bursts go at
full speed, anything longer at the cap."""


class TokenBucket:
    """Bytes per second as a token bucket; `take(n)` sleeps off the debt. Thread-safe.

    A taker may overdraw the bucket (a read larger than the burst) and then sleeps until
    the debt is paid, so the long-run rate holds whatever the read sizes and however many
    threads share it. The sleep is the throttle itself, in the hashing worker.
    """

    def __init__(
        self,
        rate: int,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self._capacity = max(rate * BURST_SECONDS, 1.0)
        self._monotonic = monotonic
        self._sleep = sleep
        self._lock = threading.Lock()
        self._tokens = self._capacity
        self._last = monotonic()

    def take(self, n: int) -> None:
        with self._lock:
            now = self._monotonic()
            self._tokens = min(self._capacity, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= n
            wait = -self._tokens / self.rate
        if wait > 0:
            self._sleep(wait)


class _Capped:
    """A binary reader over a file descriptor that stops after `limit` bytes.

    `hashlib.file_digest` reads to end of file; this keeps it bounded by the size
    seen at open, so a file that keeps growing cannot keep a worker busy.
    `throttle(n)` is called after each read (the hashing rate cap).
    """

    def __init__(self, fd: int, limit: int, throttle: Callable[[int], None] | None) -> None:
        self._fd = fd
        self._left = limit
        self._throttle = throttle

    def readable(self) -> bool:
        return True

    def readinto(self, buf: bytearray) -> int:
        if self._left <= 0:
            return 0
        view = memoryview(buf)[: min(len(buf), self._left)]
        n = os.readv(self._fd, [view])
        self._left -= n
        if self._throttle is not None and n:
            self._throttle(n)
        return n


class FileHasher:
    """sha256 of regular files, bounded by `max_file_bytes`, never following symlinks.

    The file is opened with O_NOFOLLOW|O_NONBLOCK (a FIFO never blocks us), checked
    to be the inode the caller stat'ed, read for exactly the size seen at open
    with `hashlib.file_digest`, and re-checked: a file written meanwhile is
    reported as CHANGED instead of a wrong hash.

    `max_rate` (bytes/s, 0 = off) caps the bytes read by every thread hashing through
    this hasher together; `throttle` lets other readers (archive members) share it.
    `monotonic` and `sleep` are the bucket's clock, injectable for tests.
    """

    def __init__(
        self,
        max_file_bytes: int,
        max_rate: int = 0,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.max_file_bytes = max_file_bytes
        self._monotonic, self._sleep = monotonic, sleep
        self.max_rate = 0
        self._take: Callable[[int], None] | None = None
        self.set_max_rate(max_rate)

    def set_max_rate(self, max_rate: int) -> None:
        """Change the cap (0 = off) while hashing goes on: reads from now on take from a
        fresh bucket; a read already under way finishes under the old one."""
        if max_rate < 0:
            raise ValueError("max_rate must be >= 0")
        bucket = (
            TokenBucket(max_rate, monotonic=self._monotonic, sleep=self._sleep)
            if max_rate > 0
            else None
        )
        self._take = None if bucket is None else bucket.take
        self.max_rate = max_rate

    def _read_small(self, fd: int, size: int) -> bytes:
        """The first `size` bytes (fewer if the file shrank: the re-check catches that)."""
        data = os.read(fd, size)
        while len(data) < size:
            more = os.read(fd, size - len(data))
            if not more:
                break
            data += more
        if self._take is not None and data:
            self._take(len(data))
        return data

    def throttle(self, nbytes: int) -> None:
        """Account `nbytes` read outside `hash_file` against the rate cap (may sleep)."""
        if self._take is not None:
            self._take(nbytes)

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
            if before.st_size <= SMALL_FILE_BYTES:
                digest = hashlib.sha256(self._read_small(fd, before.st_size))
            else:
                digest = hashlib.file_digest(_Capped(fd, before.st_size, self._take), "sha256")
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
        # Seen files are recorded in the index's database, not in a set: 100,000 keys
        # would cost some 15 MB for the length of every rescan.
        sweep = self._index.begin_sweep()

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
                sweep.seen((st.st_dev, st.st_ino))
                self.index_file(path, st, stats)
        stats.removed = sweep.finish(self._roots)
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
