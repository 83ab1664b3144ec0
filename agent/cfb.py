"""Bounded reader of OLE compound files ([MS-CFB]): fetch one small named stream.

Used by `agent.content` for IRM-encrypted Office documents, whose sensitivity label
lives in the `\\x06DataSpaces/TransformInfo/LabelInfo` stream ([MS-OFFCRYPTO] 2.6.2).
Every chain walk is capped and loop-checked, every read is a `pread` of one sector,
so a hostile file costs at most `max_sector_reads` sector reads.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass

MAGIC = bytes.fromhex("d0cf11e0a1b11ae1")

_HEADER = struct.Struct("<8s16sHHHHH6sIIIIIIIII")
"""Signature .. number of DIFAT sectors: the first 76 bytes of the 512-byte header."""
_HEADER_DIFAT = 109
_MAXREGSECT = 0xFFFFFFFA
_ENDOFCHAIN = 0xFFFFFFFE
_NOSTREAM = 0xFFFFFFFF
_DIRENTRY = struct.Struct("<64sHBBIII16sIQQIQ")
_DIRENTRY_SIZE = 128
_MINI_SECTOR = 64
_STORAGE, _STREAM, _ROOT = 1, 2, 5


class CfbError(Exception):
    """The compound file is malformed or truncated, or reading it costs too much."""


class StreamTooLarge(CfbError):
    """The named stream exists but is larger than the caller's cap."""


@dataclass(frozen=True)
class _Entry:
    name: str
    kind: int
    left: int
    right: int
    child: int
    start: int
    size: int


class CompoundFile:
    """Directory lookup and stream reads on an open file descriptor.

    `file_size` bounds every sector number; nothing is read beyond it. After
    `max_sector_reads` sector reads the file is given up on (`CfbError`).
    """

    def __init__(self, fd: int, file_size: int, *, max_sector_reads: int = 4096) -> None:
        self._fd = fd
        self._budget = max_sector_reads
        header = self._pread(512, 0)
        (
            magic,
            _clsid,
            _minor,
            major,
            byte_order,
            sector_shift,
            mini_shift,
            _reserved,
            _num_dir_sectors,
            self._num_fat_sectors,
            self._first_dir,
            _transaction,
            self._mini_cutoff,
            self._first_minifat,
            self._num_minifat,
            self._first_difat,
            self._num_difat,
        ) = _HEADER.unpack_from(header)
        if magic != MAGIC or byte_order != 0xFFFE:
            raise CfbError("not a compound file")
        if (major, sector_shift) not in ((3, 9), (4, 12)) or mini_shift != 6:
            raise CfbError("unsupported compound file version")
        self._v3 = major == 3
        self._ss = 1 << sector_shift
        self._per_sector = self._ss // 4
        self._sector_count = max(0, (file_size - self._ss + self._ss - 1) // self._ss)
        self._difat = struct.unpack_from(f"<{_HEADER_DIFAT}I", header, 76)
        self._fat_cache: dict[int, tuple[int, ...]] = {}
        self._difat_chain: list[int] | None = None
        self._minifat_chain: list[int] | None = None
        self._ministream: list[int] = []
        """The root entry's chain (the mini stream), walked only as far as needed."""
        self._ministream_seen: set[int] = set()
        self._entries = self._read_directory()

    def has_stream(self, path: Sequence[str]) -> bool:
        """True if a stream exists at `path`."""
        index = 0
        for name in path:
            index = self._find_child(self._entries[index].child, name)
            if index < 0:
                return False
        return self._entries[index].kind == _STREAM

    def read_stream(self, path: Sequence[str], max_bytes: int) -> bytes | None:
        """The stream at `path` (storage names, then the stream name), or None if absent.

        Names compare case-insensitively, as in [MS-CFB] 2.6.4. Raises
        `StreamTooLarge` when the stream's declared size exceeds `max_bytes`.
        """
        index = 0
        for name in path:
            index = self._find_child(self._entries[index].child, name)
            if index < 0:
                return None
        entry = self._entries[index]
        if entry.kind != _STREAM:
            return None
        if entry.size > max_bytes:
            raise StreamTooLarge(f"stream of {entry.size} bytes")
        if entry.size == 0:
            return b""
        if entry.size < self._mini_cutoff:
            return self._read_mini(entry.start, entry.size)
        sectors = self._chain(entry.start, -(-entry.size // self._ss))
        data = b"".join(self._sector(s) for s in sectors)
        if len(data) < entry.size:
            raise CfbError("stream shorter than its declared size")
        return data[: entry.size]

    # --- sectors and the FAT -------------------------------------------------

    def _pread(self, n: int, offset: int) -> bytes:
        data = os.pread(self._fd, n, offset)
        if len(data) < n:
            raise CfbError("truncated compound file")
        return data

    def _sector(self, number: int) -> bytes:
        if number > _MAXREGSECT or number >= self._sector_count:
            raise CfbError(f"sector {number} outside the file")
        self._budget -= 1
        if self._budget < 0:
            raise CfbError("too many sector reads")
        data = os.pread(self._fd, self._ss, (number + 1) * self._ss)
        if len(data) < self._ss:
            # Some writers leave the last sector short; anything else is truncation.
            if not data or number != self._sector_count - 1:
                raise CfbError("truncated compound file")
            data = data.ljust(self._ss, b"\0")
        return data

    def _fat_sector_location(self, k: int) -> int:
        if k >= self._num_fat_sectors:
            raise CfbError("FAT index beyond the FAT")
        if k < _HEADER_DIFAT:
            return int(self._difat[k])
        if self._difat_chain is None:
            # DIFAT sectors chain through their last entry, not through the FAT.
            chain: list[int] = []
            number = self._first_difat
            while number != _ENDOFCHAIN and len(chain) < self._num_difat:
                if number in chain:
                    raise CfbError("DIFAT loop")
                chain.append(number)
                number = struct.unpack_from("<I", self._sector(number), self._ss - 4)[0]
            self._difat_chain = chain
        per = self._per_sector - 1
        which, slot = divmod(k - _HEADER_DIFAT, per)
        if which >= len(self._difat_chain):
            raise CfbError("DIFAT too short")
        sector = self._sector(self._difat_chain[which])
        return int(struct.unpack_from("<I", sector, slot * 4)[0])

    def _fat_entry(self, number: int) -> int:
        k, slot = divmod(number, self._per_sector)
        entries = self._fat_cache.get(k)
        if entries is None:
            raw = self._sector(self._fat_sector_location(k))
            entries = struct.unpack(f"<{self._per_sector}I", raw)
            self._fat_cache[k] = entries
        return int(entries[slot])

    def _chain(self, start: int, limit: int) -> list[int]:
        """Sector numbers of the chain at `start`, at most `limit` of them."""
        chain: list[int] = []
        seen: set[int] = set()
        number = start
        while number != _ENDOFCHAIN and len(chain) < limit:
            if number > _MAXREGSECT or number in seen:
                raise CfbError("broken or looping sector chain")
            seen.add(number)
            chain.append(number)
            number = self._fat_entry(number)
        return chain

    # --- the directory ---------------------------------------------------------

    def _read_directory(self) -> list[_Entry]:
        # 1 MiB of directory is 8192 entries; encrypted documents hold about ten.
        sectors = self._chain(self._first_dir, (1 << 20) // self._ss)
        raw = b"".join(self._sector(s) for s in sectors)
        entries = []
        for offset in range(0, len(raw) - _DIRENTRY_SIZE + 1, _DIRENTRY_SIZE):
            (
                name,
                name_len,
                kind,
                _color,
                left,
                right,
                child,
                _clsid,
                _state,
                _c,
                _m,
                start,
                size,
            ) = _DIRENTRY.unpack_from(raw, offset)
            if self._v3:
                size &= 0xFFFFFFFF  # [MS-CFB] 2.6.3: v3 writers may leave garbage up there
            text = name[: max(0, min(name_len, 64) - 2)].decode("utf-16-le", "replace")
            entries.append(_Entry(text, kind, left, right, child, start, size))
        if not entries or entries[0].kind != _ROOT:
            raise CfbError("no root entry")
        return entries

    def _find_child(self, start: int, name: str) -> int:
        """Index of `name` in the red-black sibling tree rooted at `start`, or -1."""
        wanted = name.upper()
        stack = [start]
        seen: set[int] = set()
        while stack:
            index = stack.pop()
            if index == _NOSTREAM:
                continue
            if index >= len(self._entries) or index in seen:
                raise CfbError("broken directory tree")
            seen.add(index)
            entry = self._entries[index]
            if entry.kind in (_STORAGE, _STREAM) and entry.name.upper() == wanted:
                return index
            stack += (entry.left, entry.right)
        return -1

    # --- the mini stream -------------------------------------------------------

    def _read_mini(self, start: int, size: int) -> bytes:
        if self._minifat_chain is None:
            self._minifat_chain = self._chain(self._first_minifat, self._num_minifat)
        minifat = self._minifat_chain
        per_sector = self._ss // _MINI_SECTOR
        parts = []
        seen: set[int] = set()
        count = -(-size // _MINI_SECTOR)
        number = start
        while True:
            if number in seen or number > _MAXREGSECT:
                raise CfbError("broken or looping mini chain")
            seen.add(number)
            which, slot = divmod(number, per_sector)
            sector = self._sector(self._ministream_sector(which))
            parts.append(sector[slot * _MINI_SECTOR : (slot + 1) * _MINI_SECTOR])
            if len(parts) == count:
                break
            which, slot = divmod(number, self._per_sector)
            if which >= len(minifat):
                raise CfbError("mini FAT too short")
            number = struct.unpack_from("<I", self._sector(minifat[which]), slot * 4)[0]
        return b"".join(parts)[:size]

    def _ministream_sector(self, which: int) -> int:
        root = self._entries[0]
        if which * self._ss >= root.size:
            raise CfbError("mini sector outside the mini stream")
        chain = self._ministream
        while len(chain) <= which:
            number = self._fat_entry(chain[-1]) if chain else root.start
            if number > _MAXREGSECT or number in self._ministream_seen:
                raise CfbError("broken or looping mini stream chain")
            self._ministream_seen.add(number)
            chain.append(number)
        return chain[which]
