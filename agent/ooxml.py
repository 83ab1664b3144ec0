"""Office Open XML pieces for `agent.content`: safe XML parsing and the zip end record.

Parses package relationships, the LabelInfo part ([MS-OFFCRYPTO] 2.6.4), custom
document properties and the text of content parts, with an expat parser that
refuses any DTD. Raises `XmlForbidden` / `XmlMalformed`; the caller counts them.
"""

from __future__ import annotations

import os
import posixpath
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, NoReturn
from xml.parsers import expat

from agent import textscan

_GUID_RE = re.compile(
    r"^\{?([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})\}?$", re.IGNORECASE
)
_CUSTOM_KEY = re.compile(r"^MSIP_Label_([0-9a-fA-F-]{36})_([A-Za-z0-9]+)$")
_TEXT_BREAKS = frozenset({"p", "si", "br", "tab", "cr", "tc"})
"""Elements after which extracted text gets a line break (paragraphs, cells)."""
_ZIP_EOCD = struct.Struct("<4sHHHHIIH")
_ZIP64_LOCATOR = struct.Struct("<4sIQI")
_ZIP64_EOCD = struct.Struct("<4sQHHIIQQQQ")


class XmlError(Exception):
    """A part could not be parsed."""


class XmlForbidden(XmlError):
    """The part declares a DTD or entities: refused before any expansion or fetch."""


class XmlMalformed(XmlError):
    """The part is not well-formed XML."""


def normalise_guid(text: str) -> str | None:
    """`text` as a lower-case GUID without braces, or None if it is not a GUID."""
    match = _GUID_RE.match(text.strip())
    return match.group(1).lower() if match else None


@dataclass(frozen=True)
class MipEntry:
    """A MIP label as a document declares it (LabelInfo, custom properties or PDF)."""

    guid: str
    """Lower case, no braces."""
    enabled: bool
    site: str = ""
    name: str = ""


class _Enough(Exception):
    """Internal: the text budget is full; stop parsing."""


def _forbid(*_: object) -> NoReturn:
    raise XmlForbidden


def _parser() -> expat.XMLParserType:
    """An expat parser that rejects any DOCTYPE, so no entity is ever declared.

    Office parts never carry a DTD. Refusing it outright stops both entity
    expansion (billion laughs) and external entities before either can start.
    """
    parser = expat.ParserCreate(namespace_separator=" ")
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    parser.StartDoctypeDeclHandler = _forbid
    parser.EntityDeclHandler = _forbid
    parser.ExternalEntityRefHandler = _forbid
    parser.buffer_text = True
    return parser


def _parse(data: bytes, parser: expat.XMLParserType) -> None:
    try:
        parser.Parse(data, True)
    except (expat.ExpatError, ValueError, LookupError) as e:
        raise XmlMalformed(str(e)) from e


def _local(name: str) -> str:
    return name.rpartition(" ")[2]


def relationships(data: bytes, targets: dict[str, str]) -> None:
    """Update `targets` {relationship type: part name} from a package `.rels` part."""
    parser = _parser()

    def start(name: str, attrs: dict[str, str]) -> None:
        if _local(name) == "Relationship" and attrs.get("Type") in targets:
            target = attrs.get("Target", "")
            if target and attrs.get("TargetMode") != "External":
                targets[attrs["Type"]] = posixpath.normpath(target.lstrip("/"))

    parser.StartElementHandler = start
    _parse(data, parser)


def labelinfo(data: bytes) -> list[MipEntry]:
    """`label` elements of a LabelInfo part or stream ([MS-OFFCRYPTO] 2.6.4)."""
    found = []
    parser = _parser()

    def start(name: str, attrs: dict[str, str]) -> None:
        if _local(name) != "label":
            return
        guid = normalise_guid(attrs.get("id", ""))
        if guid is None:
            return
        enabled = attrs.get("enabled", "").strip() in ("1", "true")
        removed = attrs.get("removed", "").strip() in ("1", "true")
        site = normalise_guid(attrs.get("siteId", "")) or ""
        found.append(MipEntry(guid, enabled and not removed, site))

    parser.StartElementHandler = start
    _parse(data, parser)
    return found


def custom(data: bytes) -> list[MipEntry]:
    """Enabled/SiteId/Name of each `MSIP_Label_<GUID>_*` custom document property."""
    props: dict[str, dict[str, str]] = {}
    current: list[str] = []
    parser = _parser()

    def start(name: str, attrs: dict[str, str]) -> None:
        if _local(name) == "property":
            current[:] = [attrs.get("name", ""), ""]

    def chars(text: str) -> None:
        if current and len(current[1]) < 1024:  # MIP values are at most 255 characters
            current[1] += text[:1024]

    def end(name: str) -> None:
        if _local(name) == "property" and current:
            match = _CUSTOM_KEY.match(current[0])
            guid = normalise_guid(match.group(1)) if match else None
            if match and guid:
                props.setdefault(guid, {})[match.group(2)] = current[1].strip()
            current.clear()

    parser.StartElementHandler = start
    parser.CharacterDataHandler = chars
    parser.EndElementHandler = end
    _parse(data, parser)
    return [
        MipEntry(
            guid,
            attrs.get("Enabled", "").lower() == "true",
            normalise_guid(attrs.get("SiteId", "")) or "",
            attrs.get("Name", ""),
        )
        for guid, attrs in props.items()
    ]


def xml_text(part: IO[bytes], limit: int) -> str:
    """Character data of an XML part, streamed, up to `limit` characters."""
    pieces: list[str] = []
    size = 0
    parser = _parser()

    def chars(text: str) -> None:
        nonlocal size
        pieces.append(text)
        size += len(text)
        if size >= limit:
            raise _Enough

    def end(name: str) -> None:
        if _local(name) in _TEXT_BREAKS:
            pieces.append("\n")

    parser.CharacterDataHandler = chars
    parser.EndElementHandler = end
    try:
        for chunk in _chunks(part):
            parser.Parse(chunk, False)
        parser.Parse(b"", True)
    except _Enough:
        pass
    except (expat.ExpatError, ValueError, LookupError) as e:
        raise XmlMalformed(str(e)) from e
    return textscan.join_limited(pieces, limit)


def _chunks(part: IO[bytes]) -> Iterator[bytes]:
    while chunk := part.read(64 * 1024):
        yield chunk


def zip_directory_size(fd: int, size: int) -> tuple[int, int] | None:
    """(entries, central directory bytes) from the end record; None if there is none.

    Read before `zipfile` reads the central directory, so its size can be capped.
    """
    tail_size = min(size, _ZIP_EOCD.size + 0xFFFF)
    tail = os.pread(fd, tail_size, size - tail_size)
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < _ZIP_EOCD.size:
        return None
    _sig, _disk, _cd_disk, _here, entries, directory, _offset, _comment = _ZIP_EOCD.unpack_from(
        tail, at
    )
    if entries == 0xFFFF or directory == 0xFFFFFFFF:
        locator_at = at - _ZIP64_LOCATOR.size
        if locator_at < 0 or tail[locator_at : locator_at + 4] != b"PK\x06\x07":
            return None
        record_offset = _ZIP64_LOCATOR.unpack_from(tail, locator_at)[2]
        if record_offset > size - _ZIP64_EOCD.size:
            return None
        record = os.pread(fd, _ZIP64_EOCD.size, record_offset)
        if len(record) < _ZIP64_EOCD.size or not record.startswith(b"PK\x06\x06"):
            return None
        fields = _ZIP64_EOCD.unpack(record)
        entries, directory = fields[7], fields[8]
    return int(entries), int(directory)
