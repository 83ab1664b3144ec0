"""What the agent already reported, across restarts: copy identities and the last time it was alive.

Beside the spool in the state directory. The pipeline asks it before reporting a
copy (a copy reported before a `kill -9` is not reported again by the rescan
after restart), and the startup rescan looks at destination files changed since
the agent was last alive (copies made while it was down are still reported).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from agent.errors import ReportedStoreError
from agent.events import Sha256Hex

logger = logging.getLogger(__name__)

REPORTED = "reported.sqlite"
"""File name in the state directory."""
DEFAULT_KEEP_DAYS = 90
"""Identities older than this are forgotten (bounded size); a copy that old is not "new"."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS reported (
    dev INTEGER NOT NULL,
    ino INTEGER NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    reported_at_ns INTEGER NOT NULL,
    PRIMARY KEY (dev, ino, size, mtime_ns, sha256)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS reported_by_age ON reported (reported_at_ns);
CREATE TABLE IF NOT EXISTS alive (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    last_alive_ns INTEGER NOT NULL
);
"""
_U64 = 1 << 64
_I64_MAX = (1 << 63) - 1


def _signed(n: int) -> int:
    """st_dev and st_ino are unsigned 64-bit; SQLite integers are signed."""
    return n - _U64 if n > _I64_MAX else n


@dataclass(frozen=True)
class CopyIdentity:
    """The same bytes at the same inode: (dev, ino, size, mtime_ns, sha256)."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    sha256: Sha256Hex

    def row(self) -> tuple[int, int, int, int, str]:
        return (_signed(self.dev), _signed(self.ino), self.size, self.mtime_ns, self.sha256)


class ReportedCopies:
    """A small SQLite file (WAL). Thread-safe; every write is its own transaction.

    Writes use synchronous=NORMAL: they survive a crash of the agent (`kill -9`),
    not necessarily a power cut, in which case a copy may be reported twice,
    never lost (the event is spooled before its identity is written here).
    """

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn: sqlite3.Connection | None = conn
        self._path = path
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: Path) -> ReportedCopies:
        """Open or create it; a damaged file is set aside (`.damaged`) and replaced.

        Raises ReportedStoreError when the file cannot be created or opened at all.
        """
        try:
            return cls(_connect(path), path)
        except OSError as e:
            raise ReportedStoreError(f"cannot create {path}: {e.strerror}") from e
        except sqlite3.OperationalError as e:  # locked, permissions, disk full: not damage
            raise ReportedStoreError(f"cannot open {path}: {e}") from e
        except sqlite3.DatabaseError as e:
            logger.warning("%s is damaged (%s): setting it aside and starting afresh", path, e)
            aside = path.with_name(path.name + ".damaged")
            try:
                for suffix in ("", "-wal", "-shm"):
                    src = path.with_name(path.name + suffix)
                    if src.exists():
                        os.replace(src, aside.with_name(aside.name + suffix))
                return cls(_connect(path), path)
            except (OSError, sqlite3.Error) as e2:
                raise ReportedStoreError(f"cannot recreate {path}: {e2}") from e2

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._conn is None:
                raise ReportedStoreError(f"{self._path} is closed")
            try:
                yield self._conn
            except sqlite3.Error as e:
                raise ReportedStoreError(f"{self._path}: {e}") from e

    def seen(self, identity: CopyIdentity) -> bool:
        """Was this copy reported before: the same bytes (size, sha256) at the same inode?

        The mtime is kept but not compared: `cp -a`, `shutil.copy2` and `mv` set it
        after the close, possibly after the copy was reported.
        """
        dev, ino, size, _, sha256 = identity.row()
        with self._locked() as conn:
            row = conn.execute(
                "SELECT 1 FROM reported WHERE dev = ? AND ino = ? AND size = ? AND sha256 = ?",
                (dev, ino, size, sha256),
            ).fetchone()
            return row is not None

    def add(self, identity: CopyIdentity, now_ns: int) -> None:
        """Remember a reported copy (call it after the event was spooled)."""
        with self._locked() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO reported"
                " (dev, ino, size, mtime_ns, sha256, reported_at_ns) VALUES (?, ?, ?, ?, ?, ?)",
                (*identity.row(), now_ns),
            )

    def forget(self, dev: int, ino: int) -> int:
        """Forget every identity of inode (dev, ino): it is back in a sensitive root."""
        with self._locked() as conn:
            return conn.execute(
                "DELETE FROM reported WHERE dev = ? AND ino = ?", (_signed(dev), _signed(ino))
            ).rowcount

    def last_alive_ns(self) -> int | None:
        """Wall-clock time the agent last said it had handled everything, or None (new file)."""
        with self._locked() as conn:
            row = conn.execute("SELECT last_alive_ns FROM alive WHERE id = 1").fetchone()
            return None if row is None else int(row[0])

    def touch(self, now_ns: int) -> None:
        """Record that everything up to `now_ns` (wall clock) was handled."""
        with self._locked() as conn:
            conn.execute(
                "INSERT INTO alive (id, last_alive_ns) VALUES (1, ?)"
                " ON CONFLICT (id) DO UPDATE SET last_alive_ns = excluded.last_alive_ns",
                (now_ns,),
            )

    def prune(self, older_than_ns: int) -> int:
        """Forget identities reported before `older_than_ns`; returns how many."""
        with self._locked() as conn:
            return conn.execute(
                "DELETE FROM reported WHERE reported_at_ns < ?", (older_than_ns,)
            ).rowcount

    def __len__(self) -> int:
        with self._locked() as conn:
            (n,) = conn.execute("SELECT count(*) FROM reported").fetchone()
            return int(n)


def _connect(path: Path) -> sqlite3.Connection:
    # Private before SQLite creates it (it would honour the umask); the WAL inherits the mode.
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
    conn = sqlite3.connect(path, timeout=5, isolation_level=None, check_same_thread=False)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.executescript(_SCHEMA)
        conn.execute("SELECT count(*) FROM reported").fetchone()  # a damaged file fails here
    except BaseException:
        conn.close()
        raise
    return conn
