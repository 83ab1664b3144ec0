"""Archives at a destination: the members of a zip or tar, hashed with bounded work.

A labelled file packed into an archive is still a copy (DESIGN §2). The pipeline asks
`scan_archive` about a file that finished at a destination and looks each member's
sha256 up in the sensitive index. The input is hostile (zip bombs, lying sizes,
truncated or garbage data): every limit is checked before the bytes are read, nothing
is read past a declared size, and malformed input ends the scan with a reason instead
of an exception.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import hashlib
import io
import logging
import lzma
import os
import stat
import struct
import tarfile
import zlib
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, BinaryIO, Protocol, cast

from agent.events import Sha256Hex

logger = logging.getLogger(__name__)

CHUNK = 1024 * 1024
"""Bytes read (or inflated) at a time."""
RATIO_FLOOR = 1024 * 1024
"""The compression ratio is only judged past this many uncompressed bytes: small
members (a page of zeros) compress a thousandfold legitimately and cost nothing."""
MAX_NAME_BYTES = 4096
"""Member names are cut here (PATH_MAX; the collector refuses longer paths)."""
MAX_EXTENDED_HEADER = 64 * 1024
"""Largest tar pax or GNU long-name header accepted. tarfile reads such a header into
memory whole, and Python 3.11.7's pax parsing is quadratic in its size (CVE-2024-6232)."""
SNIFF_BYTES = 512
"""Bytes `sniff` reads: the tar header holds its magic at offset 257."""


class ArchiveKind(StrEnum):
    ZIP = "zip"
    TAR = "tar"
    TAR_GZ = "tar.gz"
    TAR_BZ2 = "tar.bz2"
    TAR_XZ = "tar.xz"
    GZIP = "gz"
    """A single compressed file (`gzip secret.docx`): one member, the decompressed stream."""
    BZIP2 = "bz2"
    XZ = "xz"


class SkipReason(StrEnum):
    """Why a member was not hashed (`ArchiveScan.skipped` counts them)."""

    ENCRYPTED = "encrypted"
    UNSUPPORTED = "unsupported"
    """A zip compression method other than stored or deflated; a sparse tar member."""
    MEMBER_TOO_LARGE = "member_too_large"
    TOO_MANY_MEMBERS = "too_many_members"
    """Members past `max_members` (for tar, at least one: the rest is not read)."""
    TOTAL_BYTES = "total_bytes"
    """Would take the archive past `max_total_bytes`."""
    RATIO = "ratio"
    """Declared (zip) or observed (compressed tar) ratio above `max_ratio`."""
    CORRUPT = "corrupt"
    """Data shorter or longer than declared, truncated, or not valid compressed data."""


@dataclass(frozen=True)
class ArchiveLimits:
    """Bounds on the work one archive may cost (config `archives`)."""

    max_members: int = 10_000
    """Entries looked at (directories and links included); the rest are counted, not read."""
    max_total_bytes: int = 1024**3
    """Uncompressed bytes read from one archive. For zip, the members hashed; for tar,
    the whole decompressed stream, because skipping a tar member means reading past it."""
    max_member_bytes: int = 256 * 1024**2
    """Larger members are skipped (their declared size is checked before reading)."""
    max_ratio: int = 100
    """Uncompressed over compressed size, judged past RATIO_FLOOR bytes."""


@dataclass(frozen=True)
class Member:
    """One regular file inside an archive, hashed."""

    name: bytes
    """The name as stored (raw bytes: zip names need not be UTF-8, tar names neither)."""
    size: int
    sha256: Sha256Hex


@dataclass(frozen=True)
class ArchiveScan:
    """What `scan_archive` found: the hashed members and what it had to leave out."""

    kind: ArchiveKind
    members: tuple[Member, ...] = ()
    skipped: Mapping[SkipReason, int] = field(default_factory=dict)
    """Members not hashed, by reason."""
    reason: str = ""
    """Why the scan stopped before the end of the archive (malformed, truncated, limit); ""
    when it read the whole archive."""

    @property
    def complete(self) -> bool:
        """True when every regular member was hashed."""
        return not self.reason and not any(self.skipped.values())


# Foreign exceptions that malformed archive data raises from the standard library's
# decoders (tarfile, gzip/bz2/lzma readers, zlib, struct). They end the scan with a
# reason; anything else is a bug and propagates.
_MALFORMED: tuple[type[BaseException], ...] = (
    tarfile.TarError,
    OSError,
    EOFError,
    zlib.error,
    lzma.LZMAError,
    struct.error,
    ValueError,
    OverflowError,
    RecursionError,
    IndexError,
    KeyError,
)


def sniff(path: bytes) -> ArchiveKind | None:
    """The archive kind by magic bytes (the first 512 bytes), None for anything else.

    Cheap enough to ask about every file written to a destination. Compressed streams
    are reported as their tar kind; `scan_archive` tells a compressed tar from a
    single compressed file once it has decompressed the first block.
    """
    # No fstat: O_NONBLOCK keeps a FIFO from blocking, pread fails on anything but a
    # file (ESPIPE, EISDIR), and a device would have to be a destination file. Three
    # system calls for every file written to a destination (bench/agent.py).
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        head = os.pread(fd, SNIFF_BYTES, 0)
    except OSError:
        return None
    finally:
        os.close(fd)
    return _kind(head)


def _open(path: bytes) -> int:
    """A read-only descriptor of the regular file at `path` (symlinks and FIFOs refused)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"not a regular file: {path!r}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _kind(head: bytes) -> ArchiveKind | None:
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return ArchiveKind.ZIP
    if head[:2] == b"\x1f\x8b":
        return ArchiveKind.TAR_GZ
    if head[:3] == b"BZh" and head[3:4].isdigit():
        return ArchiveKind.TAR_BZ2
    if head[:6] == b"\xfd7zXZ\x00":
        return ArchiveKind.TAR_XZ
    if _is_tar_header(head):
        return ArchiveKind.TAR
    return None


def _is_tar_header(block: bytes) -> bool:
    """A POSIX/GNU header ("ustar" at 257), or a v7 header whose checksum adds up."""
    if len(block) < 512:
        return False
    if block[257:262] == b"ustar":
        return True
    field_ = block[148:156].strip(b" \x00")
    if not field_ or any(c not in b"01234567" for c in field_):
        return False
    # The checksum is the byte sum with its own field read as spaces.
    return int(field_, 8) == sum(block[:148]) + 8 * 32 + sum(block[156:512])


def scan_archive(
    path: bytes,
    limits: ArchiveLimits,
    *,
    throttle: Callable[[int], None] | None = None,
) -> ArchiveScan | None:
    """Hash the regular members of the zip or tar at `path`; None when it is not one.

    The kind is decided by magic bytes, never by name. `throttle(n)` is called before
    each chunk of n member bytes is hashed (the hashing rate cap). Never raises on
    malformed archives: the scan ends with a `reason`. A file that cannot be opened
    is treated as no archive (None).
    """
    try:
        fd = _open(path)
    except OSError:
        return None
    with open(fd, "rb", buffering=CHUNK) as f:
        try:
            kind = _kind(f.read(SNIFF_BYTES))
        except OSError:
            return None
        if kind is None:
            return None
        scan = _Scan(kind, limits, throttle or _no_throttle)
        try:
            if kind is ArchiveKind.ZIP:
                scan.zip(f)
            else:
                scan.compressed_or_tar(f, path)
        except _MALFORMED as e:
            # str(e) may quote archive bytes: the reason carries the type only.
            where = type(e).__module__
            what = type(e).__name__ if where == "builtins" else f"{where}.{type(e).__name__}"
            scan.stop(f"malformed {scan.kind} ({what})")
        return scan.result()


def _no_throttle(n: int) -> None:
    pass


class _Stop(Exception):
    """A limit or malformed structure ends the scan (internal)."""


class _Scan:
    """The mutable state of one scan; `result()` freezes it."""

    def __init__(self, kind: ArchiveKind, limits: ArchiveLimits, throttle: Callable[[int], None]):
        self.kind = kind
        self.limits = limits
        self.throttle = throttle
        self.members: list[Member] = []
        self.skipped: Counter[SkipReason] = Counter()
        self.reason = ""
        self.total = 0
        """Uncompressed bytes counted against max_total_bytes."""

    def result(self) -> ArchiveScan:
        skipped = {reason: n for reason, n in self.skipped.items() if n}
        return ArchiveScan(self.kind, tuple(self.members), skipped, self.reason)

    def stop(self, reason: str) -> None:
        if not self.reason:
            self.reason = reason

    def skip(self, reason: SkipReason, n: int = 1) -> None:
        self.skipped[reason] += n

    # zip

    def zip(self, f: BinaryIO) -> None:
        """Walk the central directory; hash each stored or deflated member it declares.

        Our own reader rather than `zipfile`: zipfile parses the whole central directory
        before the first member can be refused (millions of entries cost memory and
        time before `max_members` applies), and it trusts the sizes it reads.
        """
        try:
            _ZipReader(f, self).run()
        except _Stop as e:
            self.stop(str(e))

    # tar and single compressed files

    def compressed_or_tar(self, f: BinaryIO, path: bytes) -> None:
        f.seek(0)
        raw = _Counting(f)
        with contextlib.closing(_decompressed(self.kind, raw)) as source:
            stream = _Bounded(source, raw, self.limits)
            first = stream.peek_block()
            if self.kind is not ArchiveKind.TAR and not _is_tar_header(first):
                self.kind = _SINGLE[self.kind]
                self._single(stream, path)
                return
            try:
                with tarfile.open(
                    fileobj=stream,
                    mode="r|",
                    tarinfo=_BoundedTarInfo,
                    encoding="utf-8",
                    errors="surrogateescape",
                ) as tf:
                    self._tar(tf, stream)
            except tarfile.ReadError:  # from open(): _tar handles its own
                self._tar_failed(stream, "not a valid tar stream")

    def _single(self, stream: _Bounded, path: bytes) -> None:
        """`gzip file`: one member, the whole decompressed stream, named after the file."""
        name = os.path.basename(path)
        stem, dot, _ = name.rpartition(b".")
        h = hashlib.sha256()
        size = 0
        while True:
            want = self.limits.max_member_bytes + 1 - size
            chunk = stream.read(min(CHUNK, want))
            if not chunk:
                break
            self.throttle(len(chunk))
            h.update(chunk)
            size += len(chunk)
            if size > self.limits.max_member_bytes:
                self.skip(SkipReason.MEMBER_TOO_LARGE)
                return
        if stream.cut:
            self.skip(stream.cut)
            return
        self.members.append(Member((stem if dot else name)[:MAX_NAME_BYTES], size, _hex(h)))

    def _tar(self, tf: tarfile.TarFile, stream: _Bounded) -> None:
        limits = self.limits
        entries = 0
        while True:
            try:
                info = tf.next()
            except _MALFORMED:
                self._tar_failed(stream, "malformed tar header")
                return
            if info is None:
                break
            entries += 1
            if entries > limits.max_members:
                self.skip(SkipReason.TOO_MANY_MEMBERS)
                self.stop(f"more than {limits.max_members} members")
                return
            if not info.isreg():
                continue  # directories, links, devices: no content of their own
            if info.issparse() or info.size > limits.max_member_bytes:
                too_large = not info.issparse()
                self.skip(SkipReason.MEMBER_TOO_LARGE if too_large else SkipReason.UNSUPPORTED)
                # Passing over it means decompressing it: within the stream budget only.
                if info.offset_data + info.size > limits.max_total_bytes:
                    self.stop("archive larger than max_total_bytes")
                    return
                continue
            if info.offset_data + info.size > limits.max_total_bytes:
                self.skip(SkipReason.TOTAL_BYTES)
                self.stop("archive larger than max_total_bytes")
                return
            member = self._tar_member(tf, info, stream)
            if member is None:
                return
            self.members.append(member)

    def _tar_member(
        self, tf: tarfile.TarFile, info: tarfile.TarInfo, stream: _Bounded
    ) -> Member | None:
        data = tf.extractfile(info)
        if data is None:
            return None
        h = hashlib.sha256()
        left = info.size
        try:
            while left > 0:
                chunk = data.read(min(CHUNK, left))
                if not chunk:
                    break
                self.throttle(len(chunk))
                h.update(chunk)
                left -= len(chunk)
        except _MALFORMED:
            left = -1
        if left != 0:
            self._tar_failed(stream, "truncated member data", member=True)
            return None
        name = info.name.encode("utf-8", "surrogateescape")[:MAX_NAME_BYTES]
        return Member(name, info.size, _hex(h))

    def _tar_failed(self, stream: _Bounded, what: str, *, member: bool = False) -> None:
        """The tar stream ended early: our budget cut it, or the data is bad."""
        if stream.cut:
            self.skip(stream.cut)
            self.stop(f"stream cut: {stream.cut}")
        else:
            if member:
                self.skip(SkipReason.CORRUPT)
            self.stop(what)


def _decompressed(kind: ArchiveKind, raw: _Counting) -> _Readable:
    """The decompressing reader for a compressed archive; `raw` itself for a plain tar."""
    # The readers decompress lazily, at most what each read asks for: bounded memory.
    if kind is ArchiveKind.TAR_GZ:
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if kind is ArchiveKind.TAR_BZ2:
        return bz2.BZ2File(raw, mode="rb")
    if kind is ArchiveKind.TAR_XZ:
        return lzma.LZMAFile(cast(BinaryIO, raw), mode="rb")
    return raw


_SINGLE = {
    ArchiveKind.TAR_GZ: ArchiveKind.GZIP,
    ArchiveKind.TAR_BZ2: ArchiveKind.BZIP2,
    ArchiveKind.TAR_XZ: ArchiveKind.XZ,
}


def _hex(h: Any) -> Sha256Hex:
    return Sha256Hex(h.hexdigest())


class _BoundedTarInfo(tarfile.TarInfo):
    """Refuses oversized pax and GNU long-name headers before tarfile reads them.

    tarfile reads such a header's whole declared size into memory; `_proc_member` is
    the hook tarfile documents for subclasses to change member processing.
    """

    _EXTENDED = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE,
                 tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)  # fmt: skip

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in self._EXTENDED and self.size > MAX_EXTENDED_HEADER:
            raise tarfile.HeaderError("extended header too large")
        result: tarfile.TarInfo = super()._proc_member(tarfile_)  # type: ignore[misc]
        return result


class _Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...

    def close(self) -> None: ...


class _Counting(io.RawIOBase):
    """The raw archive file, counting the bytes read (the compressed side of the ratio)."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        data = self._f.read(len(view))
        view[: len(data)] = data
        self.count += len(data)
        return len(data)


class _Bounded(io.RawIOBase):
    """The decompressed stream, ending early (EOF) at the byte and ratio budgets.

    tarfile cannot be told to stop reading; this stream can stop feeding it. `cut`
    says why it stopped (tarfile then reports a truncated archive).
    """

    def __init__(self, source: _Readable, raw: _Counting, limits: ArchiveLimits) -> None:
        self._source = source
        self._raw = raw
        # Slack over max_total_bytes: tar headers and padding, and tarfile's read-ahead.
        self._budget = limits.max_total_bytes + 64 * 1024
        self._ratio = limits.max_ratio
        self._prefix = b""
        self.count = 0
        self.cut: SkipReason | None = None

    def readable(self) -> bool:
        return True

    def peek_block(self) -> bytes:
        """The first 512 decompressed bytes, still to be read."""
        block = b""
        while len(block) < 512:
            chunk = self.read(512 - len(block))
            if not chunk:
                break
            block += chunk
        self._prefix = block
        return block

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        if self._prefix:
            n = min(len(view), len(self._prefix))
            view[:n] = self._prefix[:n]
            self._prefix = self._prefix[n:]
            return n
        if self.cut is not None:
            return 0
        want = min(len(view), self._budget - self.count)
        if want <= 0:
            self.cut = SkipReason.TOTAL_BYTES
            return 0
        data = self._source.read(want)
        self.count += len(data)
        if self.count > RATIO_FLOOR and self.count > self._ratio * max(self._raw.count, 1):
            self.cut = SkipReason.RATIO
            return 0
        view[: len(data)] = data
        return len(data)


# zip structures (APPNOTE.TXT 4.3): little-endian, fixed parts only.
_EOCD = struct.Struct("<4s4H2LH")
"""End of central directory: sig, disk, cd disk, entries here, entries, cd size, cd offset,
comment length."""
_EOCD64_LOCATOR = struct.Struct("<4sLQL")
_EOCD64 = struct.Struct("<4sQ2H2L4Q")
_CENTRAL = struct.Struct("<4s4B4HL2L5H2L")
_LOCAL = struct.Struct("<4s2B4HL2L2H")
_FLAG_ENCRYPTED = 0x1
_STORED, _DEFLATED, _AES = 0, 8, 99
_ZIP64_EXTRA = 0x0001
_U32 = 0xFFFFFFFF


@dataclass(frozen=True)
class _Entry:
    name: bytes
    flags: int
    method: int
    csize: int
    usize: int
    offset: int
    regular: bool


class _ZipReader:
    """Reads one zip's central directory entry by entry, hashing members as it goes."""

    def __init__(self, f: BinaryIO, scan: _Scan) -> None:
        self._f = f
        self._scan = scan
        self._limits = scan.limits
        self._concat = 0
        """Bytes prepended to the archive (self-extracting zips); offsets are relative."""
        f.seek(0, os.SEEK_END)
        self._size = f.tell()

    def _read_at(self, offset: int, n: int) -> bytes:
        if offset < 0 or offset + n > self._size:
            raise _Stop("truncated or inconsistent offsets")
        self._f.seek(offset)
        data = self._f.read(n)
        if len(data) != n:
            raise _Stop("truncated")
        return data

    def run(self) -> None:
        entries, cd_offset, self._concat = self._directory()
        limit = min(entries, self._limits.max_members)
        if entries > limit:
            self._scan.skip(SkipReason.TOO_MANY_MEMBERS, entries - limit)
        pos = cd_offset
        for _ in range(limit):
            entry, pos = self._entry(pos)
            if entry.regular:
                self._member(entry)

    def _directory(self) -> tuple[int, int, int]:
        """(entries, central directory offset, prepended bytes) from the end records."""
        tail_len = min(self._size, _EOCD.size + 0xFFFF)
        tail = self._read_at(self._size - tail_len, tail_len)
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or at + _EOCD.size > len(tail):
            raise _Stop("no end of central directory")
        eocd_pos = self._size - tail_len + at
        _, _, _, _, entries, cd_size, cd_offset, _ = _EOCD.unpack_from(tail, at)
        end_of_cd = eocd_pos
        if _U32 in (cd_size, cd_offset) or entries == 0xFFFF:
            loc_pos = eocd_pos - _EOCD64_LOCATOR.size
            sig = _EOCD64_LOCATOR.unpack(self._read_at(loc_pos, _EOCD64_LOCATOR.size))[0]
            if sig != b"PK\x06\x07":
                raise _Stop("zip64 end record locator missing")
            # The records may sit after prepended data: find the zip64 record just
            # before its locator, as zipfile does.
            rec_pos = loc_pos - _EOCD64.size
            rec = _EOCD64.unpack(self._read_at(rec_pos, _EOCD64.size))
            if rec[0] != b"PK\x06\x06":
                raise _Stop("zip64 end record missing")
            entries, cd_size, cd_offset = rec[7], rec[8], rec[9]
            end_of_cd = rec_pos
        # Bytes prepended to the archive shift every offset (self-extracting zips).
        concat = end_of_cd - cd_size - cd_offset
        if concat < 0:
            raise _Stop("central directory outside the file")
        return entries, cd_offset + concat, concat

    def _entry(self, pos: int) -> tuple[_Entry, int]:
        fixed = _CENTRAL.unpack(self._read_at(pos, _CENTRAL.size))
        if fixed[0] != b"PK\x01\x02":
            raise _Stop("central directory ends early")
        system, flags, method = fixed[2], fixed[5], fixed[6]
        csize, usize = fixed[10], fixed[11]
        name_len, extra_len, comment_len = fixed[12], fixed[13], fixed[14]
        external, offset = fixed[17], fixed[18]
        variable = self._read_at(pos + _CENTRAL.size, name_len + extra_len)
        name, extra = variable[:name_len], variable[name_len:]
        if _U32 in (csize, usize, offset):
            usize, csize, offset = _zip64_sizes(extra, usize, csize, offset)
        mode = external >> 16
        regular = not name.endswith(b"/") and (
            # 3: a Unix mode in the external attributes; no file type bits means a file
            system != 3 or stat.S_IFMT(mode) in (0, stat.S_IFREG)
        )
        entry = _Entry(name[:MAX_NAME_BYTES], flags, method, csize, usize, offset, regular)
        return entry, pos + _CENTRAL.size + name_len + extra_len + comment_len

    def _member(self, e: _Entry) -> None:
        scan, limits = self._scan, self._limits
        if e.flags & _FLAG_ENCRYPTED or e.method == _AES:
            scan.skip(SkipReason.ENCRYPTED)
        elif e.method not in (_STORED, _DEFLATED):
            scan.skip(SkipReason.UNSUPPORTED)
        elif e.usize > limits.max_member_bytes:
            scan.skip(SkipReason.MEMBER_TOO_LARGE)
        elif scan.total + e.usize > limits.max_total_bytes:
            scan.skip(SkipReason.TOTAL_BYTES)
        elif e.usize > RATIO_FLOOR and e.usize > limits.max_ratio * max(e.csize, 1):
            scan.skip(SkipReason.RATIO)
        elif e.method == _STORED and e.csize != e.usize:
            scan.skip(SkipReason.CORRUPT)
        else:
            digest = self._hash(e)
            if digest is None:
                scan.skip(SkipReason.CORRUPT)
            else:
                scan.total += e.usize
                scan.members.append(Member(e.name, e.usize, digest))

    def _hash(self, e: _Entry) -> Sha256Hex | None:
        """sha256 of the member's data; None when it is not exactly `usize` bytes."""
        try:
            local = _LOCAL.unpack(self._read_at(e.offset + self._concat, _LOCAL.size))
        except _Stop:
            return None
        if local[0] != b"PK\x03\x04":
            return None
        start = e.offset + self._concat + _LOCAL.size + local[10] + local[11]
        if start + e.csize > self._size:
            return None
        self._f.seek(start)
        h = hashlib.sha256()
        if e.method == _STORED:
            left = e.usize
            while left:
                chunk = self._f.read(min(CHUNK, left))
                if not chunk:
                    return None
                self._scan.throttle(len(chunk))
                h.update(chunk)
                left -= len(chunk)
            return _hex(h)
        return self._inflate(e, h)

    def _inflate(self, e: _Entry, h: Any) -> Sha256Hex | None:
        """Inflate exactly `csize` bytes, never producing more than `usize` + 1."""
        d = zlib.decompressobj(-15)
        left_in, produced = e.csize, 0
        while left_in and not d.eof:
            data = self._f.read(min(CHUNK, left_in))
            if not data:
                return None
            left_in -= len(data)
            while data and not d.eof:
                try:
                    out = d.decompress(data, e.usize - produced + 1)
                except zlib.error:
                    return None
                produced += len(out)
                if produced > e.usize:
                    return None  # more data than declared: the size lies (a bomb)
                if out:
                    self._scan.throttle(len(out))
                    h.update(out)
                data = d.unconsumed_tail
        if not d.eof or produced != e.usize:
            return None
        return _hex(h)


def _zip64_sizes(extra: bytes, usize: int, csize: int, offset: int) -> tuple[int, int, int]:
    """Replace 0xFFFFFFFF sizes and offset with the zip64 extra field's 64-bit values."""
    pos = 0
    while pos + 4 <= len(extra):
        tag, length = struct.unpack_from("<2H", extra, pos)
        body = extra[pos + 4 : pos + 4 + length]
        pos += 4 + length
        if tag != _ZIP64_EXTRA:
            continue
        values = [v for (v,) in struct.iter_unpack("<Q", body[: len(body) // 8 * 8])]
        wanted = [usize, csize, offset].count(_U32)
        if len(values) < wanted:
            raise _Stop("zip64 extra field too short")
        if usize == _U32:
            usize = values.pop(0)
        if csize == _U32:
            csize = values.pop(0)
        if offset == _U32:
            offset = values.pop(0)
        return usize, csize, offset
    raise _Stop("zip64 sizes without a zip64 extra field")
