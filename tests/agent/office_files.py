"""Builders of small real Office, compound-file and PDF documents for tests.

Each writes a file that a real reader accepts: OOXML packages with content types
and relationships (zipfile), an OLE compound file laid out as [MS-CFB] version 3
describes (our own tiny writer: olefile cannot create files), and PDFs with a
correct cross-reference table or stream. Labels go where Office and Acrobat put
them (FIELD-NOTES §5.2-5.3).
"""

from __future__ import annotations

import struct
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from os import PathLike
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

SITE = "cb46c030-1825-4e81-a295-151c039dbf02"
"""Tenant GUID from Microsoft's documentation example."""

_CT = "http://schemas.openxmlformats.org/package/2006/content-types"
_REL = "http://schemas.openxmlformats.org/package/2006/relationships"
_OFFICE_REL = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"
_LABELINFO_REL = "http://schemas.microsoft.com/office/2020/02/relationships/classificationlabels"
_CLBL = "http://schemas.microsoft.com/office/2020/mipLabelMetadata"
_FMTID = "{D5CDD505-2E9C-101B-9397-08002B2CF9AE}"

StrPath = str | PathLike[str]


# --- label metadata ---------------------------------------------------------------


def labelinfo_xml(
    guid: str | None, *, enabled: bool = True, removed: bool = False, site_id: str = SITE
) -> bytes:
    """A LabelInfo part ([MS-OFFCRYPTO] 2.6.4); `guid` None gives an empty labelList."""
    labels = ""
    if guid is not None:
        labels = (
            f'<clbl:label id="{{{guid}}}" enabled="{int(enabled)}" method="Privileged" '
            f'siteId="{{{site_id}}}" contentBits="2" removed="{int(removed)}"/>'
        )
    return (
        '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
        f'<clbl:labelList xmlns:clbl="{_CLBL}">{labels}</clbl:labelList>'
    ).encode()


def custom_xml(
    guid: str, *, name: str = "Confidential", enabled: bool = True, site_id: str = SITE
) -> bytes:
    """`docProps/custom.xml` with the MSIP_Label_<GUID>_* properties Office writes."""
    values = {
        "Enabled": "true" if enabled else "false",
        "SetDate": "2018-11-08T21:13:16-0800",
        "Method": "Privileged",
        "Name": name,
        "SiteId": site_id,
        "ContentBits": "2",
        "ActionId": "88124cf5-1340-457d-90e1-0000a9427c99",
    }
    props = "".join(
        f'<property fmtid="{_FMTID}" pid="{pid}" name="MSIP_Label_{guid}_{key}">'
        f"<vt:lpwstr>{escape(value)}</vt:lpwstr></property>"
        for pid, (key, value) in enumerate(values.items(), start=2)
    )
    return (
        '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
        '<Properties xmlns="http://schemas.openxmlformats.org/officeDocument/2006/'
        'custom-properties" xmlns:vt="http://schemas.openxmlformats.org/officeDocument/'
        f'2006/docPropsVTypes">{props}</Properties>'
    ).encode()


# --- OOXML packages ---------------------------------------------------------------


def _package(
    path: StrPath,
    main: tuple[str, str, str],
    parts: dict[str, tuple[str, bytes]],
    *,
    label_guid: str | None,
    custom_guid: str | None,
    name: str,
    label_enabled: bool,
    label_removed: bool,
    custom_enabled: bool,
    site_id: str,
    custom_site_id: str | None,
    extra: Mapping[str, bytes] | None,
    compression: int,
) -> Path:
    """Write an OPC package: `main` is (part name, content type, relationship type)."""
    main_name, main_type, main_rel = main
    rels = [(main_rel, main_name)]
    if label_guid is not None:
        parts["docMetadata/LabelInfo.xml"] = (
            "application/vnd.ms-office.classificationlabels+xml",
            labelinfo_xml(
                label_guid, enabled=label_enabled, removed=label_removed, site_id=site_id
            ),
        )
        rels.append((_LABELINFO_REL, "docMetadata/LabelInfo.xml"))
    if custom_guid is not None:
        parts["docProps/custom.xml"] = (
            "application/vnd.openxmlformats-officedocument.custom-properties+xml",
            custom_xml(
                custom_guid, name=name, enabled=custom_enabled, site_id=custom_site_id or site_id
            ),
        )
        rels.append((f"{_OFFICE_REL}/custom-properties", "docProps/custom.xml"))
    overrides = "".join(
        f'<Override PartName="/{part}" ContentType="{ctype}"/>'
        for part, (ctype, _) in [(main_name, (main_type, b"")), *parts.items()]
        if ctype
    )
    content_types = (
        f'<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n<Types xmlns="{_CT}">'
        '<Default Extension="rels" '
        'ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
        '<Default Extension="xml" ContentType="application/xml"/>'
        f"{overrides}</Types>"
    )
    package_rels = "".join(
        f'<Relationship Id="rId{i}" Type="{rtype}" Target="{target}"/>'
        for i, (rtype, target) in enumerate(rels, start=1)
    )
    out = Path(path)
    with zipfile.ZipFile(out, "w", compression) as zf:
        zf.writestr("[Content_Types].xml", content_types)
        zf.writestr(
            "_rels/.rels",
            f'<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
            f'<Relationships xmlns="{_REL}">{package_rels}</Relationships>',
        )
        for part, (_, data) in parts.items():
            zf.writestr(part, data)
        for part, data in (extra or {}).items():
            zf.writestr(part, data)
    return out


def _xml(body: str) -> bytes:
    return f'<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n{body}'.encode()


_W = "http://schemas.openxmlformats.org/wordprocessingml/2006/main"


def word_document_xml(text: str) -> bytes:
    """A `word/document.xml` with one paragraph (one run) per line of `text`."""
    paragraphs = "".join(
        f'<w:p><w:r><w:t xml:space="preserve">{escape(line)}</w:t></w:r></w:p>'
        for line in text.split("\n")
    )
    return _xml(f'<w:document xmlns:w="{_W}"><w:body>{paragraphs}</w:body></w:document>')


def make_docx(
    path: StrPath,
    *,
    label_guid: str | None = None,
    custom_guid: str | None = None,
    name: str = "Confidential",
    text: str = "Quarterly figures.",
    label_enabled: bool = True,
    label_removed: bool = False,
    custom_enabled: bool = True,
    site_id: str = SITE,
    custom_site_id: str | None = None,
    document_xml: bytes | None = None,
    extra: Mapping[str, bytes] | None = None,
    compression: int = zipfile.ZIP_DEFLATED,
) -> Path:
    """A Word document; `label_guid` goes to LabelInfo, `custom_guid` to custom.xml.

    `document_xml` replaces the generated main part (for hostile XML); `extra`
    adds raw parts.
    """
    main = document_xml if document_xml is not None else word_document_xml(text)
    return _package(
        path,
        (
            "word/document.xml",
            "application/vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml",
            f"{_OFFICE_REL}/officeDocument",
        ),
        {"word/document.xml": ("", main)},
        label_guid=label_guid,
        custom_guid=custom_guid,
        name=name,
        label_enabled=label_enabled,
        label_removed=label_removed,
        custom_enabled=custom_enabled,
        site_id=site_id,
        custom_site_id=custom_site_id,
        extra=extra,
        compression=compression,
    )


def make_xlsx(
    path: StrPath,
    *,
    label_guid: str | None = None,
    custom_guid: str | None = None,
    name: str = "Confidential",
    text: str = "Quarterly figures.",
    site_id: str = SITE,
) -> Path:
    """A workbook with one sheet whose cell A1 holds `text` (a shared string)."""
    main = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"
    workbook = _xml(
        f'<workbook xmlns="{main}" xmlns:r="{_OFFICE_REL}"><sheets>'
        '<sheet name="Sheet1" sheetId="1" r:id="rId1"/></sheets></workbook>'
    )
    workbook_rels = _xml(
        f'<Relationships xmlns="{_REL}">'
        f'<Relationship Id="rId1" Type="{_OFFICE_REL}/worksheet" Target="worksheets/sheet1.xml"/>'
        f'<Relationship Id="rId2" Type="{_OFFICE_REL}/sharedStrings" Target="sharedStrings.xml"/>'
        "</Relationships>"
    )
    sheet = _xml(
        f'<worksheet xmlns="{main}"><sheetData><row r="1">'
        '<c r="A1" t="s"><v>0</v></c></row></sheetData></worksheet>'
    )
    strings = _xml(
        f'<sst xmlns="{main}" count="1" uniqueCount="1"><si><t>{escape(text)}</t></si></sst>'
    )
    return _package(
        path,
        (
            "xl/workbook.xml",
            "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet.main+xml",
            f"{_OFFICE_REL}/officeDocument",
        ),
        {
            "xl/workbook.xml": ("", workbook),
            "xl/_rels/workbook.xml.rels": ("", workbook_rels),
            "xl/worksheets/sheet1.xml": (
                "application/vnd.openxmlformats-officedocument.spreadsheetml.worksheet+xml",
                sheet,
            ),
            "xl/sharedStrings.xml": (
                "application/vnd.openxmlformats-officedocument.spreadsheetml.sharedStrings+xml",
                strings,
            ),
        },
        label_guid=label_guid,
        custom_guid=custom_guid,
        name=name,
        label_enabled=True,
        label_removed=False,
        custom_enabled=True,
        site_id=site_id,
        custom_site_id=None,
        extra=None,
        compression=zipfile.ZIP_DEFLATED,
    )


def make_pptx(
    path: StrPath,
    *,
    label_guid: str | None = None,
    custom_guid: str | None = None,
    name: str = "Confidential",
    slides: Sequence[str] = ("Quarterly figures.",),
    site_id: str = SITE,
) -> Path:
    """A presentation with one text box per slide (no masters: readers of text need none)."""
    pml = "http://schemas.openxmlformats.org/presentationml/2006/main"
    dml = "http://schemas.openxmlformats.org/drawingml/2006/main"
    ids = "".join(f'<p:sldId id="{256 + i}" r:id="rId{i + 1}"/>' for i in range(len(slides)))
    parts: dict[str, tuple[str, bytes]] = {
        "ppt/presentation.xml": (
            "",
            _xml(
                f'<p:presentation xmlns:p="{pml}" xmlns:r="{_OFFICE_REL}">'
                f"<p:sldIdLst>{ids}</p:sldIdLst></p:presentation>"
            ),
        ),
        "ppt/_rels/presentation.xml.rels": (
            "",
            _xml(
                f'<Relationships xmlns="{_REL}">'
                + "".join(
                    f'<Relationship Id="rId{i + 1}" Type="{_OFFICE_REL}/slide" '
                    f'Target="slides/slide{i + 1}.xml"/>'
                    for i in range(len(slides))
                )
                + "</Relationships>"
            ),
        ),
    }
    for i, text in enumerate(slides, start=1):
        parts[f"ppt/slides/slide{i}.xml"] = (
            "application/vnd.openxmlformats-officedocument.presentationml.slide+xml",
            _xml(
                f'<p:sld xmlns:p="{pml}" xmlns:a="{dml}"><p:cSld><p:spTree><p:sp><p:txBody>'
                f"<a:p><a:r><a:t>{escape(text)}</a:t></a:r></a:p>"
                "</p:txBody></p:sp></p:spTree></p:cSld></p:sld>"
            ),
        )
    return _package(
        path,
        (
            "ppt/presentation.xml",
            "application/vnd.openxmlformats-officedocument.presentationml.presentation.main+xml",
            f"{_OFFICE_REL}/officeDocument",
        ),
        parts,
        label_guid=label_guid,
        custom_guid=custom_guid,
        name=name,
        label_enabled=True,
        label_removed=False,
        custom_enabled=True,
        site_id=site_id,
        custom_site_id=None,
        extra=None,
        compression=zipfile.ZIP_DEFLATED,
    )


def patch_declared_size(path: StrPath, member: str, size: int) -> None:
    """Make the zip at `path` lie about `member`'s uncompressed size (both headers)."""
    data = bytearray(Path(path).read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(member)
    # Local file header: uncompressed size at offset 22.
    struct.pack_into("<I", data, info.header_offset + 22, size)
    # Central directory entry: signature, then the name at offset 46; size at 24.
    needle = member.encode()
    at = 0
    while True:
        at = data.find(b"PK\x01\x02", at)
        if at < 0:
            raise ValueError(f"{member} not in the central directory")
        name_len = struct.unpack_from("<H", data, at + 28)[0]
        if data[at + 46 : at + 46 + name_len] == needle:
            struct.pack_into("<I", data, at + 24, size)
            break
        at += 4
    Path(path).write_bytes(bytes(data))


# --- OLE compound files ([MS-CFB] version 3) --------------------------------------

_SECTOR = 512
_MINI = 64
_CUTOFF = 4096
_FREESECT, _ENDOFCHAIN, _FATSECT, _NOSTREAM = 0xFFFFFFFF, 0xFFFFFFFE, 0xFFFFFFFD, 0xFFFFFFFF


def write_cfb(path: StrPath, streams: Mapping[tuple[str, ...], bytes]) -> Path:
    """Write a compound file holding `streams` {(storage, ..., stream name): data}.

    Streams under 4096 bytes go to the mini stream, as [MS-CFB] requires; storages
    are created from the paths. Sibling trees are balanced and all black.
    """
    # Directory: index 0 is the root; every storage/stream gets an entry.
    names: list[str] = ["Root Entry"]
    kinds: list[int] = [5]
    parents: list[int] = [-1]
    data_of: dict[int, bytes] = {}
    where: dict[tuple[str, ...], int] = {(): 0}
    for spath, data in streams.items():
        for depth in range(1, len(spath) + 1):
            key = spath[:depth]
            if key not in where:
                where[key] = len(names)
                names.append(key[-1])
                kinds.append(2 if depth == len(spath) else 1)
                parents.append(where[key[:-1]])
        data_of[where[spath]] = data
    count = len(names)
    left, right, child = [_NOSTREAM] * count, [_NOSTREAM] * count, [_NOSTREAM] * count

    def order(i: int) -> tuple[int, str]:
        return (len(names[i]), names[i].upper())

    def balance(members: list[int]) -> int:
        if not members:
            return _NOSTREAM
        mid = len(members) // 2
        left[members[mid]] = balance(members[:mid])
        right[members[mid]] = balance(members[mid + 1 :])
        return members[mid]

    for parent in range(count):
        kids = sorted((i for i in range(count) if parents[i] == parent), key=order)
        child[parent] = balance(kids)

    # Mini stream and regular streams.
    mini = bytearray()
    minifat: list[int] = []
    start = [0] * count
    size = [0] * count
    big: list[tuple[int, bytes]] = []
    for i, data in data_of.items():
        size[i] = len(data)
        if len(data) < _CUTOFF:
            n = -(-len(data) // _MINI)
            start[i] = len(minifat) if n else _ENDOFCHAIN
            minifat += [len(minifat) + k + 1 for k in range(n - 1)] + ([_ENDOFCHAIN] if n else [])
            mini += data.ljust(n * _MINI, b"\0")
        else:
            big.append((i, data))

    def sectors(n_bytes: int) -> int:
        return -(-n_bytes // _SECTOR)

    dir_bytes = bytearray()
    n_dir = sectors(-(-count // 4) * 4 * 128)
    n_minifat = sectors(len(minifat) * 4)
    n_mini = sectors(len(mini))
    n_big = [sectors(len(d)) for _, d in big]
    others = n_dir + n_minifat + n_mini + sum(n_big)
    n_fat = 1
    while n_fat * (_SECTOR // 4) < others + n_fat:
        n_fat += 1
    fat = [_FATSECT] * n_fat
    next_free = n_fat

    def chain(n: int) -> int:
        nonlocal next_free
        if n == 0:
            return _ENDOFCHAIN
        first = next_free
        fat.extend([*range(first + 1, first + n), _ENDOFCHAIN])
        next_free += n
        return first

    first_dir = chain(n_dir)
    first_minifat = chain(n_minifat)
    first_mini = chain(n_mini)
    for (i, _), n in zip(big, n_big, strict=True):
        start[i] = chain(n)
    start[0], size[0] = first_mini, len(mini)
    fat += [_FREESECT] * (n_fat * (_SECTOR // 4) - len(fat))

    for i in range(-(-count // 4) * 4):
        if i >= count:
            empty = (b"", 0, 0, 0, _NOSTREAM, _NOSTREAM, _NOSTREAM, b"", 0, 0, 0, 0, 0)
            dir_bytes += struct.pack("<64sHBBIII16sIQQIQ", *empty)
            continue
        encoded = (names[i] + "\0").encode("utf-16-le")
        dir_bytes += struct.pack(
            "<64sHBBIII16sIQQIQ",
            encoded,
            len(encoded),
            kinds[i],
            1,  # black
            left[i],
            right[i],
            child[i],
            b"",
            0,
            0,
            0,
            start[i] if kinds[i] != 1 else 0,
            size[i],
        )

    header = struct.pack(
        "<8s16sHHHHH6sIIIIIIIII",
        bytes.fromhex("d0cf11e0a1b11ae1"),
        b"",
        0x3E,
        3,
        0xFFFE,
        9,
        6,
        b"",
        0,
        n_fat,
        first_dir,
        0,
        _CUTOFF,
        first_minifat,
        n_minifat,
        _ENDOFCHAIN,
        0,
    )
    difat = list(range(n_fat)) + [_FREESECT] * (109 - n_fat)
    header += struct.pack("<109I", *difat)

    def padded(raw: bytes | bytearray, n: int) -> bytes:
        return bytes(raw).ljust(n * _SECTOR, b"\0")

    out = Path(path)
    with open(out, "wb") as f:
        f.write(header)
        f.write(struct.pack(f"<{len(fat)}I", *fat))
        f.write(padded(dir_bytes, n_dir))
        minifat_raw = struct.pack(f"<{len(minifat)}I", *minifat)
        f.write(padded(minifat_raw + b"\xff" * (n_minifat * _SECTOR - len(minifat_raw)), n_minifat))
        f.write(padded(mini, n_mini))
        for (_, data), n in zip(big, n_big, strict=True):
            f.write(padded(data, n))
    return out


def make_encrypted_office(
    path: StrPath,
    *,
    label_guid: str | None = None,
    enabled: bool = True,
    site_id: str = SITE,
    labelinfo: bytes | None = None,
    package_size: int = 8192,
) -> Path:
    """An IRM-encrypted Office file as Office lays it out ([MS-OFFCRYPTO] 2.2, 2.6.2).

    The label is in `\\x06DataSpaces/TransformInfo/LabelInfo`; `labelinfo` replaces
    the generated stream (e.g. to make it large or hostile). `EncryptedPackage` is
    `package_size` pseudo-random bytes, so it lives in regular sectors.
    """
    streams: dict[tuple[str, ...], bytes] = {
        ("\x06DataSpaces", "Version"): _DATASPACES_VERSION,
        ("\x06DataSpaces", "DataSpaceMap"): b"\x08\x00\x00\x00\x01\x00\x00\x00",
        ("\x06DataSpaces", "DataSpaceInfo", "DRMEncryptedDataSpace"): b"\x08\x00\x00\x00",
        ("\x06DataSpaces", "TransformInfo", "DRMEncryptedTransform", "\x06Primary"): b"\0" * 64,
        ("EncryptionInfo",): b"\x04\x00\x04\x00\x40\x00\x00\x00" + b"\0" * 120,
        ("EncryptedPackage",): struct.pack("<Q", package_size) + _noise(package_size),
    }
    if labelinfo is None and label_guid is not None:
        labelinfo = labelinfo_xml(label_guid, enabled=enabled, site_id=site_id)
    if labelinfo is not None:
        streams[("\x06DataSpaces", "TransformInfo", "LabelInfo")] = labelinfo
    return write_cfb(path, streams)


_DATASPACES_VERSION = (
    struct.pack("<I", 60) + "Microsoft.Container.DataSpaces".encode("utf-16-le") + b"\x01\0\0\0" * 3
)
"""The DataSpaceVersionInfo stream ([MS-OFFCRYPTO] 2.1.5): feature name, versions 1.0."""


def _noise(n: int) -> bytes:
    out = bytearray()
    seed = b"exfilwatch"
    while len(out) < n:
        seed = zlib.crc32(seed).to_bytes(4, "little") + seed[:12]
        out += seed
    return bytes(out[:n])


# --- PDF --------------------------------------------------------------------------


def _pdf_text(text: str) -> bytes:
    return text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)").encode("latin-1")


def make_pdf(
    path: StrPath,
    *,
    info_guid: str | None = None,
    xmp_guid: str | None = None,
    xmp_attributes: bool = False,
    name: str = "Confidential",
    enabled: bool = True,
    site_id: str = SITE,
    text: str = "Quarterly figures.",
    compressed: bool = False,
) -> Path:
    """A one-page PDF; the label in the Info dictionary and/or the XMP packet.

    `compressed` writes PDF 1.5 the way modern writers do: the Info dictionary in
    a Flate-compressed object stream, a compressed XMP stream, an xref stream.
    """
    enabled_text = "true" if enabled else "false"
    info = b"<< /Title (Quarterly report) /Producer (exfilwatch tests)"
    if info_guid is not None:
        for key, value in (("Enabled", enabled_text), ("Name", name), ("SiteId", site_id)):
            info += b" /MSIP_Label_%s_%s (%s)" % (
                info_guid.encode(),
                key.encode(),
                _pdf_text(value),
            )
    info += b" >>"
    xmp_props = xmp_elements = ""
    if xmp_guid is not None:
        pairs = (("Enabled", enabled_text), ("Name", name), ("SiteId", site_id))
        if xmp_attributes:
            xmp_props = "".join(f" pdfx:MSIP_Label_{xmp_guid}_{k}={quoteattr(v)}" for k, v in pairs)
        else:
            xmp_elements = "".join(
                f"<pdfx:MSIP_Label_{xmp_guid}_{k}>{escape(v)}</pdfx:MSIP_Label_{xmp_guid}_{k}>"
                for k, v in pairs
            )
    xmp = (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
        'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description rdf:about="" xmlns:pdfx="http://ns.adobe.com/pdfx/1.3/"'
        f"{xmp_props}>"
        + xmp_elements
        + '</rdf:Description></rdf:RDF></x:xmpmeta><?xpacket end="w"?>'
    ).encode()
    content = b"BT /F1 12 Tf 72 720 Td (%s) Tj ET" % _pdf_text(text)
    if compressed:
        xmp_obj = _stream(b"/Type /Metadata /Subtype /XML /Filter /FlateDecode", zlib.compress(xmp))
    else:
        xmp_obj = _stream(b"/Type /Metadata /Subtype /XML", xmp)
    objects: dict[int, bytes] = {
        1: b"<< /Type /Catalog /Pages 2 0 R /Metadata 5 0 R >>",
        2: b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        3: b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 6 0 R >> >> >>",
        4: _stream(b"", content),
        5: xmp_obj,
        6: b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    }
    out = bytearray(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n")
    offsets: dict[int, int] = {}
    for number, body in objects.items():
        offsets[number] = len(out)
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    if not compressed:
        offsets[7] = len(out)
        out += b"7 0 obj\n%s\nendobj\n" % info
        xref = len(out)
        out += b"xref\n0 8\n0000000000 65535 f \n"
        out += b"".join(b"%010d 00000 n \n" % offsets[n] for n in range(1, 8))
        out += b"trailer\n<< /Size 8 /Root 1 0 R /Info 7 0 R >>\nstartxref\n%d\n%%%%EOF\n" % xref
    else:
        # Object 7 (Info) lives in object stream 8; object 9 is the xref stream.
        header = b"7 0 "
        objstm = zlib.compress(header + info)
        offsets[8] = len(out)
        out += b"8 0 obj\n%s\nendobj\n" % _stream(
            b"/Type /ObjStm /N 1 /First %d /Filter /FlateDecode" % len(header), objstm
        )
        rows = [b"\x00" + struct.pack(">I", 0) + b"\xff\xff"]
        for n in range(1, 10):
            if n == 7:
                rows.append(b"\x02" + struct.pack(">I", 8) + b"\x00\x00")
            elif n == 9:
                rows.append(b"\x01" + struct.pack(">I", len(out)) + b"\x00\x00")
            else:
                rows.append(b"\x01" + struct.pack(">I", offsets[n]) + b"\x00\x00")
        xref = len(out)
        out += b"9 0 obj\n%s\nendobj\n" % _stream(
            b"/Type /XRef /Size 10 /W [1 4 2] /Root 1 0 R /Info 7 0 R /Filter /FlateDecode",
            zlib.compress(b"".join(rows)),
        )
        out += b"startxref\n%d\n%%%%EOF\n" % xref
    result = Path(path)
    result.write_bytes(bytes(out))
    return result


def _stream(entries: bytes, data: bytes) -> bytes:
    return b"<< %s /Length %d >>\nstream\n%s\nendstream" % (entries, len(data), data)
