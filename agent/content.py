"""Labels carried inside files: MIP metadata, marker phrases, card numbers.

`agent.labels.Labeller` asks a `ContentReader` for the label a file's bytes carry.
Every read is bounded (declared sizes and compression ratios are checked before a
zip member is opened, parts and scans are capped) and never raises: what cannot
be read is skipped and counted by reason in `ContentReader.stats`.

Formats are told by their first bytes, not by the file name: OOXML (zip), OLE
compound files (IRM-encrypted Office, see `agent.cfb`), PDF (`agent.pdfmeta`),
anything else as raw text (`agent.textscan`).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
import struct
import threading
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import IO, Literal

from agent import cfb, ooxml, pdfmeta, textscan
from agent.ooxml import MipEntry, normalise_guid

__all__ = [
    "ContentConfig",
    "ContentLabel",
    "ContentReader",
    "ContentSource",
    "ContentStats",
    "SkipReason",
    "normalise_guid",
]

logger = logging.getLogger(__name__)

ContentSource = Literal["mip", "marker", "card_number"]

_LABELINFO_REL = "http://schemas.microsoft.com/office/2020/02/relationships/classificationlabels"
_CUSTOM_REL = (
    "http://schemas.openxmlformats.org/officeDocument/2006/relationships/custom-properties"
)
_LABELINFO_STREAM = ("\x06DataSpaces", "TransformInfo", "LabelInfo")
_TEXT_PART = re.compile(
    r"^(?:word/(?:header|footer)\d*\.xml|word/document\.xml|xl/sharedStrings\.xml"
    r"|ppt/slides/slide(\d+)\.xml)$"
)
_MAX_CARDS_COUNTED = 1000
_RATIO_FLOOR = 1 << 20
"""Parts declaring at most this many bytes are cheap whatever their ratio."""
_ZIP_ERRORS = (
    zipfile.BadZipFile,
    EOFError,
    ValueError,
    NotImplementedError,
    OverflowError,
    struct.error,
    zlib.error,
)
"""What zipfile raises on damaged archives ("zip file version 9.0" is NotImplementedError,
a 64-bit offset past 2**63 an OverflowError from seek)."""


class SkipReason(StrEnum):
    """Why a file, or one part of it, was not read."""

    MISSING = "missing"
    SYMLINK = "symlink"
    NOT_REGULAR = "not_regular"
    UNREADABLE = "unreadable"
    CORRUPT = "corrupt"
    """Truncated or malformed zip, compound file or compressed stream."""
    ZIP_BOMB = "zip_bomb"
    """Declared size, compression ratio or entry count beyond the caps."""
    PART_TOO_LARGE = "part_too_large"
    UNSUPPORTED = "unsupported"
    """Encrypted zip member or compression method other than stored/deflated."""
    XML_MALFORMED = "xml_malformed"
    XML_FORBIDDEN = "xml_forbidden"
    """A DTD or entity declaration: never expanded, never fetched."""


@dataclass(frozen=True)
class ContentConfig:
    """What to look for inside files, and how much work one file may cost."""

    mip: Mapping[str, str] = field(default_factory=dict, hash=False)
    """MIP label GUID -> our label. LabelInfo carries only the GUID (FIELD-NOTES §5.2)."""
    mip_names: Mapping[str, str] = field(default_factory=dict, hash=False)
    """MIP label name (custom properties, PDF) -> our label, case-insensitive; GUIDs win."""
    markers: tuple[tuple[str, str], ...] = ()
    """(phrase, label): whole-word, case-insensitive, in the first `scan_bytes`."""
    card_number_label: str | None = None
    """Label for files holding payment card numbers (Luhn-checked); None: off."""
    card_number_min_matches: int = 1
    scan_bytes: int = 64 * 1024
    """Raw bytes (or, for Office files, characters of text) the classifiers see."""
    max_part_bytes: int = 8 * 1024**2
    """Office text parts declaring more are skipped; also the inflate budget per file."""
    max_metadata_bytes: int = 1024**2
    """Cap for LabelInfo, custom properties and relationship parts."""
    max_archive_ratio: int = 100
    """Declared size / compressed size above which a part is a zip bomb."""
    max_zip_entries: int = 10_000
    pdf_window_bytes: int = 4 * 1024**2
    """PDFs are scanned in their first and last this many bytes."""

    def __post_init__(self) -> None:
        mip = {}
        for guid, label in self.mip.items():
            norm = normalise_guid(guid)
            if norm is None:
                raise ValueError(f"not a label GUID: {guid!r}")
            mip[norm] = label
        names = {name.lower(): label for name, label in self.mip_names.items()}
        object.__setattr__(self, "mip", MappingProxyType(mip))
        object.__setattr__(self, "mip_names", MappingProxyType(names))
        for name in (
            "scan_bytes",
            "max_part_bytes",
            "max_metadata_bytes",
            "max_archive_ratio",
            "max_zip_entries",
            "pdf_window_bytes",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.card_number_min_matches < 1:
            raise ValueError("card_number_min_matches must be at least 1")

    @property
    def enabled(self) -> bool:
        """False when nothing is configured: then no file is opened at all."""
        return bool(self.mip or self.mip_names or self.markers or self.card_number_label)


@dataclass(frozen=True)
class ContentLabel:
    label: str
    """One of the configured levels."""
    source: ContentSource
    detail: str
    """The MIP label GUID, the marker phrase, or "n card numbers"; never file content."""


class ContentStats:
    """Files and parts skipped, by reason; thread-safe (one reader serves all workers)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._skipped: Counter[str] = Counter()
        self._unmapped_mip = 0

    def skip(self, reason: SkipReason) -> None:
        with self._lock:
            self._skipped[reason.value] += 1

    def unmapped(self) -> None:
        with self._lock:
            self._unmapped_mip += 1

    @property
    def skipped(self) -> dict[str, int]:
        """A snapshot: {reason: count}."""
        with self._lock:
            return dict(self._skipped)

    @property
    def unmapped_mip(self) -> int:
        """Enabled MIP labels whose GUID and name map to none of our labels."""
        with self._lock:
            return self._unmapped_mip


class _Skip(Exception):
    """Internal: this file, or this part, cannot be read."""

    def __init__(self, reason: SkipReason) -> None:
        super().__init__(reason.value)
        self.reason = reason


class ContentReader:
    """Reads the label a file's content carries; see the module docstring.

    `levels` are the configured labels, lowest first; labels outside them are
    ignored. `read` returns the highest-ranked label found, MIP before markers
    before card numbers on ties.
    """

    def __init__(self, config: ContentConfig, levels: Sequence[str]) -> None:
        self._config = config
        self._rank = {level: i for i, level in enumerate(levels)}
        self._top = len(levels) - 1
        markers = [
            (textscan.compile_marker(phrase), phrase, label)
            for phrase, label in config.markers
            if label in self._rank
        ]
        markers.sort(key=lambda m: -self._rank[m[2]])  # stable: config order on ties
        self._markers = tuple(markers)
        self._card_label = (
            config.card_number_label if config.card_number_label in self._rank else None
        )
        self.stats = ContentStats()

    @property
    def enabled(self) -> bool:
        return self._config.enabled

    def read(self, path: bytes) -> ContentLabel | None:
        """The label carried in the file at `path`, or None. Never raises."""
        if not self._config.enabled:
            return None
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(path, flags)
        except OSError as e:
            self._skip(path, _open_failure(e))
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                os.close(fd)  # before fdopen, which refuses directories
                raise _Skip(SkipReason.NOT_REGULAR)
            with os.fdopen(fd, "rb") as f:
                return self._read_open(f, fd, st.st_size, path)
        except _Skip as e:
            self._skip(path, e.reason)
        except OSError:
            self._skip(path, SkipReason.UNREADABLE)
        return None

    def _skip(self, path: bytes, reason: SkipReason) -> None:
        self.stats.skip(reason)
        logger.debug("content of %s not read: %s", _display(path), reason.value)

    def _read_open(self, f: IO[bytes], fd: int, size: int, path: bytes) -> ContentLabel | None:
        head = os.pread(fd, min(size, max(self._config.scan_bytes, 1024)), 0)
        entries: list[MipEntry] = []
        if head.startswith(b"PK\x03\x04"):
            zf = self._open_zip(f, fd, size)
            if zf is None:
                return None
            with zf:
                entries = self._ooxml_labels(zf, path)
                best = self._best_mip(entries)
                if self._is_top(best) or not self._wants_text:
                    return best
                return self._best(best, self._classify(self._ooxml_text(zf, path)))
        raw = head[: self._config.scan_bytes]
        if head.startswith(cfb.MAGIC):
            entries, encrypted = self._cfb_labels(fd, size, path)
            if encrypted:
                raw = b""  # ciphertext carries no marker; legacy .doc/.xls text might
        elif b"%PDF-" in head[:1024]:
            entries = self._pdf_labels(fd, size, path)
            raw = pdfmeta.without_labels(raw)
        best = self._best_mip(entries)
        if self._is_top(best) or not self._wants_text:
            return best
        return self._best(best, self._classify(textscan.decode_text(raw)))

    # --- choosing --------------------------------------------------------------

    @property
    def _wants_text(self) -> bool:
        return bool(self._markers) or self._card_label is not None

    def _is_top(self, found: ContentLabel | None) -> bool:
        return found is not None and self._rank[found.label] == self._top

    def _best(self, *found: ContentLabel | None) -> ContentLabel | None:
        """The highest-ranked of `found`; the earliest on ties."""
        best: ContentLabel | None = None
        for candidate in found:
            if candidate and (best is None or self._rank[candidate.label] > self._rank[best.label]):
                best = candidate
        return best

    def _best_mip(self, entries: Sequence[MipEntry]) -> ContentLabel | None:
        found = []
        for entry in entries:
            if not entry.enabled:
                continue
            label = self._config.mip.get(entry.guid) or self._config.mip_names.get(
                entry.name.lower()
            )
            if label is not None and label in self._rank:
                found.append(ContentLabel(label, "mip", entry.guid))
            else:
                self.stats.unmapped()
        return self._best(*found)

    def _classify(self, text: str) -> ContentLabel | None:
        marker = None
        hit = textscan.first_marker(text, self._markers)
        if hit is not None:
            marker = ContentLabel(hit[1], "marker", hit[0])
        if self._card_label is None or self._is_top(marker):
            return marker
        wanted = self._config.card_number_min_matches
        count = textscan.count_card_numbers(text, max(wanted, _MAX_CARDS_COUNTED))
        cards = None
        if count >= wanted:
            cards = ContentLabel(self._card_label, "card_number", f"{count} card numbers")
        return self._best(marker, cards)

    # --- OOXML -----------------------------------------------------------------

    def _open_zip(self, f: IO[bytes], fd: int, size: int) -> zipfile.ZipFile | None:
        """The zip, after its end record passed the entry-count and directory caps."""
        sizes = ooxml.zip_directory_size(fd, size)
        if sizes is None:
            raise _Skip(SkipReason.CORRUPT)
        entries, directory = sizes
        cap = self._config.max_zip_entries
        if entries > cap or directory > cap * 1024:
            raise _Skip(SkipReason.ZIP_BOMB)
        try:
            zf = zipfile.ZipFile(f)
        except _ZIP_ERRORS as e:
            raise _Skip(SkipReason.CORRUPT) from e
        except OSError as e:
            raise _corrupt_or_unreadable(e) from e
        if "[Content_Types].xml" not in zf.NameToInfo:
            zf.close()
            return None  # a zip, but not an Office document: archives are not ours
        return zf

    def _member(self, zf: zipfile.ZipFile, info: zipfile.ZipInfo, cap: int) -> IO[bytes]:
        """Open `info` after checking what it declares; raises _Skip for the part."""
        if info.flag_bits & 0x1 or info.compress_type not in (
            zipfile.ZIP_STORED,
            zipfile.ZIP_DEFLATED,
        ):
            raise _Skip(SkipReason.UNSUPPORTED)
        declared = info.file_size
        if declared > _RATIO_FLOOR and declared > self._config.max_archive_ratio * max(
            info.compress_size, 1
        ):
            raise _Skip(SkipReason.ZIP_BOMB)
        if declared > cap:
            raise _Skip(SkipReason.PART_TOO_LARGE)
        try:
            # ZipExtFile stops at the declared size and then checks the CRC.
            return zf.open(info)
        except _ZIP_ERRORS as e:
            raise _Skip(SkipReason.CORRUPT) from e
        except OSError as e:
            raise _corrupt_or_unreadable(e) from e

    def _metadata(
        self, zf: zipfile.ZipFile, name: str, path: bytes, parse: Callable[[bytes], None]
    ) -> bool:
        """Read and parse one small part; False (and counted) when it was skipped."""
        info = zf.NameToInfo.get(name)
        if info is None:
            return False
        try:
            with self._member(zf, info, self._config.max_metadata_bytes) as part:
                data = part.read(info.file_size)
            parse(data)
        except _Skip as e:
            self._skip(path, e.reason)
            return False
        except ooxml.XmlError as e:
            self._skip(path, _xml_reason(e))
            return False
        except _ZIP_ERRORS as e:
            self._skip(path, SkipReason.CORRUPT)
            logger.debug("part %s: %s", name, e)
            return False
        return True

    def _ooxml_labels(self, zf: zipfile.ZipFile, path: bytes) -> list[MipEntry]:
        """MIP labels: LabelInfo first, custom properties only where it is silent.

        [MS-OFFCRYPTO] 2.6.3: custom properties count only for labels with no
        LabelInfo element; a document has one label per tenant, so a LabelInfo
        element (even a removed one) for a tenant also masks that tenant's custom
        properties. Parts are found through `_rels/.rels`, else at their usual names.
        """
        targets = {_LABELINFO_REL: "docMetadata/LabelInfo.xml", _CUSTOM_REL: "docProps/custom.xml"}
        self._metadata(zf, "_rels/.rels", path, lambda d: ooxml.relationships(d, targets))
        labelinfo: list[MipEntry] = []
        self._metadata(
            zf, targets[_LABELINFO_REL], path, lambda d: labelinfo.extend(ooxml.labelinfo(d))
        )
        custom: list[MipEntry] = []
        self._metadata(zf, targets[_CUSTOM_REL], path, lambda d: custom.extend(ooxml.custom(d)))
        guids = {entry.guid for entry in labelinfo}
        sites = {entry.site for entry in labelinfo if entry.site}
        return labelinfo + [e for e in custom if e.guid not in guids and e.site not in sites]

    def _ooxml_text(self, zf: zipfile.ZipFile, path: bytes) -> str:
        """Text of headers, footers and main parts, up to `scan_bytes` characters."""
        parts = []
        for info in zf.infolist():
            match = _TEXT_PART.match(info.filename)
            if match:
                parts.append((int(match.group(1) or 0), info))
        parts.sort(key=lambda p: (p[0], "document" in p[1].filename))
        budget = self._config.scan_bytes
        inflate = self._config.max_part_bytes
        texts: list[str] = []
        for _, info in parts:
            if budget <= 0 or inflate <= 0:
                break
            try:
                with self._member(zf, info, min(self._config.max_part_bytes, inflate)) as part:
                    text = ooxml.xml_text(part, budget)
            except _Skip as e:
                self._skip(path, e.reason)
                continue
            except ooxml.XmlError as e:
                self._skip(path, _xml_reason(e))
                continue
            except _ZIP_ERRORS:
                self._skip(path, SkipReason.CORRUPT)
                continue
            inflate -= info.file_size
            budget -= len(text)
            texts.append(text)
        return "\n".join(texts)

    # --- compound files and PDF ------------------------------------------------

    def _cfb_labels(self, fd: int, size: int, path: bytes) -> tuple[list[MipEntry], bool]:
        """MIP labels of a compound file, and whether it is an encrypted Office package."""
        try:
            compound = cfb.CompoundFile(fd, size)
            encrypted = compound.has_stream(("EncryptedPackage",))
            data = compound.read_stream(_LABELINFO_STREAM, self._config.max_metadata_bytes)
        except cfb.StreamTooLarge:
            self._skip(path, SkipReason.PART_TOO_LARGE)
            return [], True
        except cfb.CfbError as e:
            logger.debug("compound file %s: %s", _display(path), e)
            raise _Skip(SkipReason.CORRUPT) from e
        if data is None:
            return [], encrypted
        if not data.startswith((b"<", b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff")):
            start = data.find(b"<", 0, 16)  # tolerate a short length prefix
            data = data[start:] if start > 0 else data
        try:
            return ooxml.labelinfo(data), encrypted
        except ooxml.XmlError as e:
            self._skip(path, _xml_reason(e))
            return [], encrypted

    def _pdf_labels(self, fd: int, size: int, path: bytes) -> list[MipEntry]:
        window = self._config.pdf_window_bytes
        windows = [os.pread(fd, min(size, window), 0)]
        if size > window:
            windows.append(os.pread(fd, window, size - window))
        found = pdfmeta.scan_pdf(windows, self._config.max_part_bytes)
        if found.bad_streams:
            self._skip(path, SkipReason.CORRUPT)
        return [
            MipEntry(
                guid,
                attrs.get("Enabled", "").strip().lower() == "true",
                normalise_guid(attrs.get("SiteId", "")) or "",
                attrs.get("Name", ""),
            )
            for guid, attrs in found.keys.items()
        ]


# --- helpers ---------------------------------------------------------------------


def _xml_reason(e: ooxml.XmlError) -> SkipReason:
    if isinstance(e, ooxml.XmlForbidden):
        return SkipReason.XML_FORBIDDEN
    return SkipReason.XML_MALFORMED


def _corrupt_or_unreadable(e: OSError) -> _Skip:
    """A damaged zip makes zipfile seek before the start of the file (EINVAL)."""
    return _Skip(SkipReason.CORRUPT if e.errno == errno.EINVAL else SkipReason.UNREADABLE)


def _open_failure(e: OSError) -> SkipReason:
    if isinstance(e, FileNotFoundError | NotADirectoryError):
        return SkipReason.MISSING
    if e.errno == errno.ELOOP:  # O_NOFOLLOW met a symlink
        return SkipReason.SYMLINK
    return SkipReason.UNREADABLE


def _display(path: bytes) -> str:
    """A printable, escaped form of a raw path, for logs only."""
    return path.decode("utf-8", "backslashreplace")
