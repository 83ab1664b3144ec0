"""MIP sensitivity-label keys in a PDF, from a bounded scan of its raw bytes.

Used by `agent.content`. Labelled PDFs carry `MSIP_Label_<GUID>_<Attr>` keys in the
document information dictionary or in the XMP packet (FIELD-NOTES §5.3). PDF 1.5+
writers often put both inside Flate-compressed streams (object streams, metadata
streams), so those streams are inflated too, with a cap on the output. No PDF
parser is involved: a parser that resolves the xref table follows attacker-chosen
offsets; a scan of a fixed window does not.
"""

from __future__ import annotations

import html
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

_GUID = rb"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}"
_KEY = rb"MSIP_Label_(" + _GUID + rb")_([A-Za-z0-9]{1,32})"
# Keys and values are at most 255 characters (MIP metadata spec); allow for escapes.
_INFO = re.compile(
    rb"/" + _KEY + rb"\s*(\((?:[^()\\]|\\.){0,1024}\)|<[0-9A-Fa-f\s]{0,2048}>)", re.DOTALL
)
# No unbounded prefix before the literal: `(?:[\w.-]+:)?MSIP` is quadratic on a long
# run of word characters (measured: minutes on 3 MiB), and PDFs are attacker data.
_XMP_ELEMENT = re.compile(rb"<(?:[\w.-]{1,64}:)?" + _KEY + rb"\s*>([^<]{0,1024})</")
_XMP_ATTRIBUTE = re.compile(_KEY + rb"\s*=\s*([\"'])(.{0,1024}?)\3", re.DOTALL)
_STREAM = re.compile(rb">>\s{0,16}stream\r?\n")
_LITERAL_ESCAPES = {b"n": b"\n", b"r": b"\r", b"t": b"\t", b"b": b"\b", b"f": b"\f"}
_ESCAPE = re.compile(rb"\\([0-7]{1,3}|.)", re.DOTALL)
_FILTER_CHAIN = re.compile(rb"/Filter\s*\[[^\]]*/\w+[^\]]*/\w+")
_MAX_STREAMS = 256
_MAX_DICTS = 4096
_OCTAL_DIGITS = frozenset(b"01234567")


@dataclass
class PdfLabels:
    """What a scan found: label attributes by GUID (lower case), and damage seen."""

    keys: dict[str, dict[str, str]] = field(default_factory=dict)
    """{guid: {"Enabled": "true", "Name": ..., "SiteId": ...}}"""
    bad_streams: int = 0
    """Compressed metadata or object streams that did not inflate."""

    def add(self, guid: bytes, attr: bytes, value: str) -> None:
        self.keys.setdefault(guid.decode("ascii").lower(), {})[attr.decode("ascii")] = value


def scan_pdf(windows: list[bytes], max_inflated: int) -> PdfLabels:
    """Find MSIP keys in the raw `windows` (head and tail of the file).

    At most `max_inflated` bytes of decompressed stream data are produced in all,
    from at most 256 candidate streams.
    """
    found = PdfLabels()
    budget = max_inflated
    for window in windows:
        _scan(window, found)
        view = memoryview(window)
        for start in _compressed_metadata(window):
            if budget <= 0:
                return found
            try:
                # Bytes past the end of the compressed data land in unused_data, unread.
                data = zlib.decompressobj().decompress(view[start:], budget)
            except zlib.error:
                found.bad_streams += 1
                continue
            budget -= len(data)
            _scan(data, found)
    return found


def without_labels(data: bytes) -> bytes:
    """`data` with the MSIP keys and values removed, for the marker scan.

    A label's name ("Confidential") is metadata, not a visible marking; a disabled
    label's name must not come back as a marker.
    """
    for pattern in (_INFO, _XMP_ELEMENT, _XMP_ATTRIBUTE):
        data = pattern.sub(b" ", data)
    return data


def _scan(data: bytes, found: PdfLabels) -> None:
    for m in _INFO.finditer(data):
        found.add(m.group(1), m.group(2), _pdf_string(m.group(3)))
    for m in _XMP_ELEMENT.finditer(data):
        found.add(m.group(1), m.group(2), _xml_text(m.group(3)))
    for m in _XMP_ATTRIBUTE.finditer(data):
        found.add(m.group(1), m.group(2), _xml_text(m.group(4)))


def _compressed_metadata(window: bytes) -> Iterator[int]:
    """Offsets of the Flate-compressed object and metadata streams in `window`.

    At most 4096 stream dictionaries are looked at and 256 streams returned, so a
    window stuffed with `>>stream` costs milliseconds, not seconds.
    """
    inflatable = 0
    for seen, m in enumerate(_STREAM.finditer(window)):
        if seen >= _MAX_DICTS:
            return
        head = window[max(0, m.start() - 512) : m.start()]
        head = head[head.rfind(b"obj") :]
        if not (b"/ObjStm" in head or b"/Metadata" in head) or b"/FlateDecode" not in head:
            continue
        if _FILTER_CHAIN.search(head):
            continue  # e.g. ASCII85 then Flate: rare for metadata, not decoded here
        inflatable += 1
        if inflatable > _MAX_STREAMS:
            return
        yield m.end()


def _pdf_string(token: bytes) -> str:
    if token.startswith(b"<"):
        digits = re.sub(rb"\s", b"", token[1:-1])
        raw = bytes.fromhex((digits + b"0" * (len(digits) % 2)).decode("ascii"))
    else:
        raw = _ESCAPE.sub(_unescape, token[1:-1])
    if raw.startswith(b"\xfe\xff"):
        return raw[2:].decode("utf-16-be", "replace")
    return raw.decode("latin-1")


def _unescape(m: re.Match[bytes]) -> bytes:
    escaped = m.group(1)
    if escaped[0] in _OCTAL_DIGITS:
        return bytes([int(escaped, 8) & 0xFF])
    if escaped in (b"\n", b"\r"):
        return b""  # a line continuation
    return _LITERAL_ESCAPES.get(escaped, escaped)


def _xml_text(raw: bytes) -> str:
    return html.unescape(raw.decode("utf-8", "replace")).strip()
