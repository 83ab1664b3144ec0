"""agent.content: labels inside real Office files, compound files, PDFs and text; guards."""

from __future__ import annotations

import errno
import os
import re
import struct
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.config import AgentConfig, LabelsConfig, PathRule, load_config
from agent.content import ContentConfig, ContentLabel, ContentReader, SkipReason
from agent.errors import ConfigError
from agent.labels import Labelled, Labeller, LabelSource
from tests.agent.office_files import (
    custom_xml,
    labelinfo_xml,
    make_docx,
    make_encrypted_office,
    make_pdf,
    make_pptx,
    make_xlsx,
    patch_declared_size,
    write_cfb,
)

LEVELS = ("public", "internal", "confidential", "secret")
GUID_CONF = "2096f6a2-d2f7-48be-b329-b73aaa526e5d"
GUID_TOP = "f42aa342-8706-4288-bd11-ebb85995028c"
GUID_INTERNAL = "0c5e4b4b-8e65-4d2b-9c3a-6f1d5e2a7b10"
GUID_UNMAPPED = "11111111-2222-4333-8444-555555555555"
OTHER_SITE = "72f988bf-86f1-41af-91ab-2d7cd011db47"
MIP = {GUID_CONF: "confidential", f"{{{GUID_TOP.upper()}}}": "secret", GUID_INTERNAL: "internal"}
MARKERS = (
    ("CONFIDENTIAL", "confidential"),
    ("TOP SECRET", "secret"),
    ("INTERNAL ONLY", "internal"),
)
VISA = "4111 1111 1111 1111"
AMEX = "3782-822463-10005"
MASTERCARD = "5500005555555559"
BAD_LUHN = "4111 1111 1111 1112"
FAST = 5.0
"""Seconds: a generous bound for hostile inputs (each takes milliseconds here)."""


def reader(**changes: Any) -> ContentReader:
    config: dict[str, Any] = {"mip": MIP, "markers": MARKERS}
    config.update(changes)
    return ContentReader(ContentConfig(**config), LEVELS)


def b(path: Path) -> bytes:
    return os.fsencode(path)


def mip(guid: str, label: str) -> ContentLabel:
    return ContentLabel(label, "mip", guid)


# --- MIP labels in OOXML ------------------------------------------------------------

BUILDERS: dict[str, Callable[..., Path]] = {
    "docx": make_docx,
    "xlsx": make_xlsx,
    "pptx": make_pptx,
}


@pytest.mark.parametrize("kind", BUILDERS)
def test_label_in_labelinfo_only(tmp_path, kind) -> None:
    path = BUILDERS[kind](tmp_path / f"a.{kind}", label_guid=GUID_CONF)
    with zipfile.ZipFile(path) as zf:
        assert "docProps/custom.xml" not in zf.namelist()
    r = reader()
    assert r.read(b(path)) == mip(GUID_CONF, "confidential")
    assert r.stats.skipped == {}


@pytest.mark.parametrize("kind", BUILDERS)
def test_label_in_custom_properties_only(tmp_path, kind) -> None:
    path = BUILDERS[kind](tmp_path / f"a.{kind}", custom_guid=GUID_TOP)
    with zipfile.ZipFile(path) as zf:
        assert "docMetadata/LabelInfo.xml" not in zf.namelist()
    assert reader().read(b(path)) == mip(GUID_TOP, "secret")


def test_labelinfo_wins_over_custom_properties_of_the_same_tenant(tmp_path) -> None:
    # Custom properties say secret, LabelInfo (read first) says confidential.
    path = make_docx(tmp_path / "a.docx", label_guid=GUID_CONF, custom_guid=GUID_TOP)
    assert reader().read(b(path)) == mip(GUID_CONF, "confidential")


def test_labelinfo_wins_for_the_same_label_id(tmp_path) -> None:
    path = make_docx(
        tmp_path / "a.docx", label_guid=GUID_TOP, custom_guid=GUID_TOP, custom_enabled=False
    )
    assert reader().read(b(path)) == mip(GUID_TOP, "secret")


def test_removed_label_in_labelinfo_masks_custom_properties(tmp_path) -> None:
    path = make_docx(
        tmp_path / "a.docx", label_guid=GUID_TOP, label_removed=True, custom_guid=GUID_TOP
    )
    assert reader().read(b(path)) is None


def test_another_tenants_label_in_custom_properties_still_counts(tmp_path) -> None:
    path = make_docx(
        tmp_path / "a.docx",
        label_guid=GUID_CONF,
        custom_guid=GUID_TOP,
        custom_site_id=OTHER_SITE,
    )
    assert reader().read(b(path)) == mip(GUID_TOP, "secret")


@pytest.mark.parametrize(
    "where", [{"custom_guid": GUID_TOP, "custom_enabled": False}, {"label_guid": GUID_TOP}]
)
def test_disabled_label_does_not_count(tmp_path, where) -> None:
    if "label_guid" in where:
        where = {**where, "label_enabled": False}
    path = make_docx(tmp_path / "a.docx", **where)
    assert reader().read(b(path)) is None


def test_labelinfo_is_found_through_the_package_relationships(tmp_path) -> None:
    path = tmp_path / "a.docx"
    rels = (
        '<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
        '<Relationship Id="rId1" Type="http://schemas.microsoft.com/office/2020/02/'
        'relationships/classificationlabels" Target="/meta/labels.xml"/></Relationships>'
    )
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("[Content_Types].xml", "<Types/>")
        zf.writestr("_rels/.rels", rels)
        zf.writestr("meta/labels.xml", labelinfo_xml(GUID_TOP))
        zf.writestr("docMetadata/LabelInfo.xml", labelinfo_xml(GUID_INTERNAL))
    assert reader().read(b(path)) == mip(GUID_TOP, "secret")


def test_label_names_map_when_the_guid_does_not(tmp_path) -> None:
    path = make_docx(tmp_path / "a.docx", custom_guid=GUID_UNMAPPED, name="Highly Confidential")
    r = reader(mip_names={"highly confidential": "secret"})
    assert r.read(b(path)) == mip(GUID_UNMAPPED, "secret")
    mapped = make_docx(tmp_path / "b.docx", custom_guid=GUID_INTERNAL, name="Highly Confidential")
    assert r.read(b(mapped)) == mip(GUID_INTERNAL, "internal")  # the GUID wins


def test_unmapped_label_is_counted_not_guessed(tmp_path) -> None:
    path = make_docx(tmp_path / "a.docx", label_guid=GUID_UNMAPPED)
    r = reader()
    assert r.read(b(path)) is None
    assert r.stats.unmapped_mip == 1


def test_file_name_does_not_matter(tmp_path) -> None:
    path = make_docx(tmp_path / "report.bin", label_guid=GUID_CONF)
    assert reader().read(b(path)) == mip(GUID_CONF, "confidential")


def test_zip_that_is_not_office_is_not_ours(tmp_path) -> None:
    path = tmp_path / "a.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("notes.txt", "TOP SECRET")
    r = reader()
    assert r.read(b(path)) is None
    assert r.stats.skipped == {}


# --- encrypted Office (OLE compound files) --------------------------------------------


def test_encrypted_office_labelinfo_stream(tmp_path) -> None:
    path = make_encrypted_office(tmp_path / "enc.docx", label_guid=GUID_TOP)
    assert path.read_bytes()[:8] == bytes.fromhex("d0cf11e0a1b11ae1")
    r = reader()
    assert r.read(b(path)) == mip(GUID_TOP, "secret")
    assert r.stats.skipped == {}


def test_encrypted_office_large_labelinfo_in_regular_sectors(tmp_path) -> None:
    big = labelinfo_xml(GUID_CONF) + b" " * 6000  # over the 4096-byte mini stream cutoff
    path = make_encrypted_office(tmp_path / "enc.xlsx", labelinfo=big, package_size=100_000)
    assert reader().read(b(path)) == mip(GUID_CONF, "confidential")


def test_encrypted_office_disabled_or_absent_label(tmp_path) -> None:
    r = reader()
    disabled = make_encrypted_office(tmp_path / "a.docx", label_guid=GUID_CONF, enabled=False)
    absent = make_encrypted_office(tmp_path / "b.docx")
    assert r.read(b(disabled)) is None
    assert r.read(b(absent)) is None
    assert r.stats.skipped == {}


def test_labelinfo_stream_with_entities_is_refused(tmp_path) -> None:
    hostile = b'<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaa">]><l>&a;</l>'
    path = make_encrypted_office(tmp_path / "enc.docx", labelinfo=hostile)
    r = reader()
    assert r.read(b(path)) is None
    assert r.stats.skipped == {"xml_forbidden": 1}


def test_markers_in_legacy_compound_files_but_not_in_ciphertext(tmp_path) -> None:
    text = b"Board minutes. TOP SECRET. " * 300  # > 4096 bytes: regular sectors
    legacy = write_cfb(tmp_path / "a.doc", {("WordDocument",): text})
    encrypted = write_cfb(
        tmp_path / "b.docx", {("EncryptionInfo",): b"\0" * 64, ("EncryptedPackage",): text}
    )
    r = reader()
    assert r.read(b(legacy)) == ContentLabel("secret", "marker", "TOP SECRET")
    assert r.read(b(encrypted)) is None  # an encrypted package's bytes are not text
    assert r.stats.skipped == {}


def test_truncated_compound_file_is_skipped(tmp_path) -> None:
    path = make_encrypted_office(tmp_path / "enc.docx", label_guid=GUID_CONF, package_size=50_000)
    data = path.read_bytes()
    path.write_bytes(data[:1536])
    r = reader()
    assert r.read(b(path)) is None
    assert r.stats.skipped == {"corrupt": 1}


def test_compound_file_with_a_looping_fat_is_skipped_fast(tmp_path) -> None:
    path = write_cfb(tmp_path / "loop.doc", {("Big",): b"x" * 10_000})
    data = bytearray(path.read_bytes())
    # The FAT is sector 0 (file offset 512); make every entry point at sector 1.
    struct.pack_into("<128I", data, 512, *([1] * 128))
    path.write_bytes(bytes(data))
    r = reader()
    started = time.monotonic()
    assert r.read(b(path)) is None
    assert time.monotonic() - started < FAST
    assert r.stats.skipped == {"corrupt": 1}


# --- PDF ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "where",
    [
        {"info_guid": GUID_TOP},
        {"xmp_guid": GUID_TOP},
        {"xmp_guid": GUID_TOP, "xmp_attributes": True},
        {"info_guid": GUID_TOP, "compressed": True},
        {"xmp_guid": GUID_TOP, "compressed": True},
    ],
    ids=["info", "xmp-elements", "xmp-attributes", "info-in-object-stream", "compressed-xmp"],
)
def test_pdf_label(tmp_path, where) -> None:
    path = make_pdf(tmp_path / "a.pdf", **where)
    if where.get("compressed"):
        assert b"MSIP_Label" not in path.read_bytes()  # only a decompressing reader finds it
    r = reader()
    assert r.read(b(path)) == mip(GUID_TOP, "secret")
    assert r.stats.skipped == {}


def test_pdf_disabled_label_and_label_names(tmp_path) -> None:
    disabled = make_pdf(tmp_path / "a.pdf", info_guid=GUID_TOP, enabled=False)
    named = make_pdf(tmp_path / "b.pdf", xmp_guid=GUID_UNMAPPED, name="Board & Execs")
    r = reader(mip_names={"Board & Execs": "secret"})
    assert r.read(b(disabled)) is None
    assert r.read(b(named)) == mip(GUID_UNMAPPED, "secret")


def test_pdf_label_at_the_end_of_a_large_file(tmp_path) -> None:
    small = make_pdf(tmp_path / "a.pdf", info_guid=GUID_CONF).read_bytes()
    # An incremental update appends objects: here 3 MiB of padding before the Info dict.
    at = small.index(b"7 0 obj")
    path = tmp_path / "big.pdf"
    path.write_bytes(small[:at] + b"%" + b"x" * (3 << 20) + b"\n" + small[at:])
    r = reader(pdf_window_bytes=1 << 20)
    assert r.read(b(path)) == mip(GUID_CONF, "confidential")


# --- markers ------------------------------------------------------------------------


def test_marker_in_plain_text_is_case_insensitive_and_whole_words(tmp_path) -> None:
    hit = tmp_path / "a.txt"
    hit.write_text("Minutes\nClassification: Top  Secret\n")
    miss = tmp_path / "b.txt"
    miss.write_text("This is NONCONFIDENTIAL and TOP SECRETARIAT material.\n")
    r = reader()
    assert r.read(b(hit)) == ContentLabel("secret", "marker", "TOP SECRET")
    assert r.read(b(miss)) is None


def test_highest_ranked_marker_wins(tmp_path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("INTERNAL ONLY ... CONFIDENTIAL ... top secret")
    assert reader().read(b(path)) == ContentLabel("secret", "marker", "TOP SECRET")


def test_marker_beyond_scan_bytes_is_not_seen(tmp_path) -> None:
    path = tmp_path / "a.txt"
    path.write_bytes(b"x" * 2000 + b" TOP SECRET")
    assert reader(scan_bytes=1024).read(b(path)) is None
    assert reader(scan_bytes=4096).read(b(path)) == ContentLabel("secret", "marker", "TOP SECRET")


def test_marker_in_utf16_text(tmp_path) -> None:
    path = tmp_path / "a.txt"
    path.write_bytes("\ufeffStrictly CONFIDENTIAL".encode("utf-16-le"))
    assert reader().read(b(path)) == ContentLabel("confidential", "marker", "CONFIDENTIAL")


def test_marker_in_office_text_not_in_raw_bytes(tmp_path) -> None:
    docx = make_docx(tmp_path / "a.docx", text="Board minutes\nTOP SECRET")
    xlsx = make_xlsx(tmp_path / "a.xlsx", text="Confidential salaries")
    pptx = make_pptx(tmp_path / "a.pptx", slides=["Agenda", "Internal only: roadmap"])
    assert b"TOP SECRET" not in docx.read_bytes()  # deflated: a raw scan would miss it
    r = reader()
    assert r.read(b(docx)) == ContentLabel("secret", "marker", "TOP SECRET")
    assert r.read(b(xlsx)) == ContentLabel("confidential", "marker", "CONFIDENTIAL")
    assert r.read(b(pptx)) == ContentLabel("internal", "marker", "INTERNAL ONLY")


def test_marker_split_across_word_runs(tmp_path) -> None:
    w = "http://schemas.openxmlformats.org/wordprocessingml/2006/main"
    document = (
        f'<w:document xmlns:w="{w}"><w:body><w:p><w:r><w:t>TOP SEC</w:t></w:r>'
        "<w:r><w:t>RET</w:t></w:r></w:p></w:body></w:document>"
    ).encode()
    path = make_docx(tmp_path / "a.docx", document_xml=document)
    assert reader().read(b(path)) == ContentLabel("secret", "marker", "TOP SECRET")


def test_mip_wins_ties_and_higher_markers_win_over_mip(tmp_path) -> None:
    tie = make_docx(tmp_path / "a.docx", label_guid=GUID_CONF, text="CONFIDENTIAL")
    higher = make_docx(tmp_path / "b.docx", label_guid=GUID_CONF, text="TOP SECRET")
    r = reader()
    assert r.read(b(tie)) == mip(GUID_CONF, "confidential")
    assert r.read(b(higher)) == ContentLabel("secret", "marker", "TOP SECRET")


def test_nothing_configured_opens_nothing(tmp_path) -> None:
    os.mkfifo(tmp_path / "fifo")
    r = ContentReader(ContentConfig(), LEVELS)
    assert not r.enabled
    assert r.read(b(tmp_path / "fifo")) is None
    assert r.stats.skipped == {}


# --- card numbers -------------------------------------------------------------------


def test_card_numbers_with_a_valid_luhn_check_count(tmp_path) -> None:
    path = tmp_path / "a.csv"
    path.write_text(f"name,card\nA,{VISA}\nB,{AMEX}\nC,{MASTERCARD}\nD,{BAD_LUHN}\n")
    r = reader(markers=(), card_number_label="confidential", card_number_min_matches=3)
    assert r.read(b(path)) == ContentLabel("confidential", "card_number", "3 card numbers")
    assert (
        reader(markers=(), card_number_label="secret", card_number_min_matches=4).read(b(path))
        is None
    )


def test_invalid_luhn_and_zero_filled_numbers_do_not_count(tmp_path) -> None:
    path = tmp_path / "a.txt"
    path.write_text(f"{BAD_LUHN} 1234 5678 9012 3456 0000 0000 0000 0000 4111-1111-1111-11111111")
    assert reader(markers=(), card_number_label="secret").read(b(path)) is None


def test_card_numbers_in_a_spreadsheet(tmp_path) -> None:
    path = make_xlsx(tmp_path / "a.xlsx", text=f"Card: {VISA}")
    r = reader(markers=(), card_number_label="secret")
    assert r.read(b(path)) == ContentLabel("secret", "card_number", "1 card numbers")


def test_markers_win_ties_over_card_numbers(tmp_path) -> None:
    path = tmp_path / "a.txt"
    path.write_text(f"CONFIDENTIAL {VISA}")
    r = reader(card_number_label="confidential")
    assert r.read(b(path)) == ContentLabel("confidential", "marker", "CONFIDENTIAL")


# --- guards -------------------------------------------------------------------------


def _timed_read(r: ContentReader, path: Path) -> ContentLabel | None:
    started = time.monotonic()
    found = r.read(b(path))
    assert time.monotonic() - started < FAST
    return found


def test_real_zip_bomb_is_skipped_before_reading(tmp_path) -> None:
    path = make_docx(tmp_path / "bomb.docx", text="short")
    with zipfile.ZipFile(path, "a", zipfile.ZIP_DEFLATED) as zf:
        with zf.open("word/header1.xml", "w", force_zip64=True) as part:
            chunk = b" " * (1 << 20)
            for _ in range(64):  # 64 MiB of spaces: about 64 KiB compressed
                part.write(chunk)
        info = zf.getinfo("word/header1.xml")
    assert info.file_size > 1000 * info.compress_size
    r = reader()
    assert _timed_read(r, path) is None
    assert r.stats.skipped == {"zip_bomb": 1}


def test_declared_huge_size_is_a_bomb(tmp_path) -> None:
    path = make_docx(tmp_path / "a.docx", label_guid=GUID_CONF, text="TOP SECRET")
    patch_declared_size(path, "word/document.xml", 0xFFFF0000)
    r = reader()
    # The part is refused; the label from LabelInfo still counts.
    assert _timed_read(r, path) == mip(GUID_CONF, "confidential")
    assert r.stats.skipped == {"zip_bomb": 1}


def test_lying_small_declared_size_is_never_read_past(tmp_path) -> None:
    text = "x" * 500 + " TOP SECRET"
    path = make_docx(tmp_path / "a.docx", text=text)
    patch_declared_size(path, "word/document.xml", 200)
    r = reader()
    assert _timed_read(r, path) is None  # the marker sits past the declared 200 bytes
    assert r.stats.skipped == {"corrupt": 1}


def test_huge_part_is_skipped_and_the_rest_still_read(tmp_path) -> None:
    filler = b"<w:p><w:r><w:t>" + os.urandom(48).hex().encode() + b"</w:t></w:r></w:p>"
    body = filler * ((50 << 20) // len(filler))
    w = "http://schemas.openxmlformats.org/wordprocessingml/2006/main"
    document = f'<w:document xmlns:w="{w}"><w:body>'.encode() + body + b"</w:body></w:document>"
    path = make_docx(
        tmp_path / "a.docx",
        label_guid=GUID_CONF,
        document_xml=document,
        compression=zipfile.ZIP_STORED,
    )
    assert path.stat().st_size > 50 << 20
    r = reader()
    assert _timed_read(r, path) == mip(GUID_CONF, "confidential")
    assert r.stats.skipped == {"part_too_large": 1}


def test_too_many_entries_is_refused_before_the_directory_is_read(tmp_path) -> None:
    path = make_docx(
        tmp_path / "a.docx",
        label_guid=GUID_CONF,
        extra={f"customXml/item{i}.xml": b"<a/>" for i in range(60)},
    )
    r = reader(max_zip_entries=50)
    assert _timed_read(r, path) is None
    assert r.stats.skipped == {"zip_bomb": 1}


def test_unsupported_compression_is_skipped(tmp_path) -> None:
    path = make_docx(tmp_path / "a.docx", text="TOP SECRET", compression=zipfile.ZIP_LZMA)
    r = reader()
    assert r.read(b(path)) is None
    assert r.stats.skipped == {"unsupported": 2}  # the relationships and the main part


BILLION_LAUGHS = (
    b'<?xml version="1.0"?>\n<!DOCTYPE lolz [<!ENTITY lol "lol">'
    + b"".join(
        b'<!ENTITY lol%d "%s">' % (i, (b"&lol%d;" % (i - 1) if i > 1 else b"&lol;") * 10)
        for i in range(1, 10)
    )
    + b']>\n<Properties><property name="MSIP_Label_'
    + GUID_TOP.encode()
    + b'_Enabled">&lol9;</property></Properties>'
)


def test_billion_laughs_is_refused_and_counted(tmp_path) -> None:
    path = make_docx(tmp_path / "a.docx", extra={"docProps/custom.xml": BILLION_LAUGHS})
    r = reader()
    assert _timed_read(r, path) is None
    assert r.stats.skipped == {"xml_forbidden": 1}


def test_external_entity_is_never_fetched(tmp_path) -> None:
    secret_file = tmp_path / "outside.txt"
    secret_file.write_text("TOP SECRET")
    w = "http://schemas.openxmlformats.org/wordprocessingml/2006/main"
    document = (
        f'<?xml version="1.0"?><!DOCTYPE d [<!ENTITY e SYSTEM "file://{secret_file}">]>'
        f'<w:document xmlns:w="{w}"><w:body><w:p><w:r><w:t>&e;</w:t></w:r></w:p>'
        "</w:body></w:document>"
    ).encode()
    path = make_docx(tmp_path / "a.docx", label_guid=GUID_INTERNAL, document_xml=document)
    r = reader()
    assert _timed_read(r, path) == mip(GUID_INTERNAL, "internal")  # not "secret"
    assert r.stats.skipped == {"xml_forbidden": 1}


def test_malformed_xml_is_skipped_and_the_rest_still_read(tmp_path) -> None:
    path = make_docx(
        tmp_path / "a.docx",
        label_guid=GUID_CONF,
        extra={"docProps/custom.xml": custom_xml(GUID_TOP)[:-40]},
    )
    r = reader()
    assert r.read(b(path)) == mip(GUID_CONF, "confidential")
    assert r.stats.skipped == {"xml_malformed": 1}


def test_truncated_zip_is_skipped(tmp_path) -> None:
    path = make_docx(tmp_path / "a.docx", label_guid=GUID_CONF)
    path.write_bytes(path.read_bytes()[:-60])
    r = reader()
    assert _timed_read(r, path) is None
    assert r.stats.skipped == {"corrupt": 1}


def test_fifo_directory_symlink_and_missing_file_are_skipped(tmp_path) -> None:
    os.mkfifo(tmp_path / "fifo")  # nobody writes: a blocking open would hang forever
    (tmp_path / "dir").mkdir()
    target = make_docx(tmp_path / "a.docx", label_guid=GUID_CONF)
    (tmp_path / "link.docx").symlink_to(target)
    r = reader()
    for name in ("fifo", "dir", "link.docx", "missing"):
        assert _timed_read(r, tmp_path / name) is None
    assert r.stats.skipped == {"not_regular": 2, "symlink": 1, "missing": 1}


def test_file_that_cannot_be_opened_even_by_root_is_skipped() -> None:
    path = Path("/proc/sys/vm/drop_caches")  # mode 0200: procfs refuses reads, even to root
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))
    except PermissionError:
        pass
    except OSError as e:
        pytest.skip(f"{path}: {e}")
    else:
        pytest.skip(f"{path} is readable here")
    r = reader()
    assert r.read(b(path)) is None
    assert r.stats.skipped == {"unreadable": 1}


def test_path_through_a_regular_file_is_missing(tmp_path) -> None:
    path = make_docx(tmp_path / "a.docx")  # open() fails with ENOTDIR
    r = reader()
    assert r.read(b(path) + b"/inside") is None
    assert r.stats.skipped == {"missing": 1}


SEEDS = {
    "docx": lambda p: make_docx(p, label_guid=GUID_CONF, custom_guid=GUID_TOP, text=VISA),
    "cfb": lambda p: make_encrypted_office(p, label_guid=GUID_CONF, package_size=6000),
    "pdf": lambda p: make_pdf(p, info_guid=GUID_CONF, xmp_guid=GUID_TOP, compressed=True),
}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(sorted(SEEDS)),
    edits=st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), max_size=8),
    cut=st.one_of(st.none(), st.integers(min_value=0)),
)
def test_damaged_files_never_raise(kind, edits, cut) -> None:
    r = reader(card_number_label="internal")
    with tempfile.TemporaryDirectory() as tmp:
        path = SEEDS[kind](Path(tmp) / "seed")
        data = bytearray(path.read_bytes())
        for offset, value in edits:
            data[offset % len(data)] = value
        if cut is not None:
            del data[cut % len(data) :]
        path.write_bytes(bytes(data))
        found = _timed_read(r, path)
    assert found is None or found.label in LEVELS
    assert set(r.stats.skipped) <= {reason.value for reason in SkipReason}


# --- the Labeller -------------------------------------------------------------------


def labeller(
    tmp_path: Path, *, xattr: bytes | None = None, rules: tuple[PathRule, ...] = ()
) -> Labeller:
    config = AgentConfig(
        state_dir=tmp_path / "state",
        sensitive_roots=(tmp_path,),
        destinations=(),
        host="test-host",
        labels=LabelsConfig(content=ContentConfig(mip=MIP, markers=MARKERS)),
        path_rules=rules,
    )

    def read_xattr(path: bytes, name: str) -> bytes:
        if xattr is None:
            raise OSError(errno.ENODATA, "No data available")
        return xattr

    return Labeller(config, read_xattr=read_xattr)


def test_labeller_takes_the_highest_ranked_source(tmp_path) -> None:
    path = b(make_docx(tmp_path / "a.docx", label_guid=GUID_CONF, text="INTERNAL ONLY"))
    assert labeller(tmp_path, xattr=b"internal").label_of(path) == Labelled(
        "confidential", LabelSource.MIP, GUID_CONF
    )
    rules = (PathRule("*.docx", "secret"),)
    assert labeller(tmp_path, xattr=b"internal", rules=rules).label_of(path) == Labelled(
        "secret", LabelSource.PATH
    )


def test_labeller_tie_order_is_xattr_mip_path_marker(tmp_path) -> None:
    path = b(make_docx(tmp_path / "a.docx", label_guid=GUID_CONF, text="CONFIDENTIAL"))
    rules = (PathRule("*", "confidential"),)
    assert labeller(tmp_path, xattr=b"confidential", rules=rules).label_of(path) == Labelled(
        "confidential", LabelSource.XATTR
    )
    assert labeller(tmp_path, rules=rules).label_of(path) == Labelled(
        "confidential", LabelSource.MIP, GUID_CONF
    )
    text = tmp_path / "a.txt"
    text.write_text("CONFIDENTIAL")
    assert labeller(tmp_path, rules=rules).label_of(b(text)) == Labelled(
        "confidential", LabelSource.PATH
    )
    assert labeller(tmp_path).label_of(b(text)) == Labelled(
        "confidential", LabelSource.MARKER, "CONFIDENTIAL"
    )


def test_labeller_skips_content_once_the_top_level_is_known(tmp_path) -> None:
    os.mkfifo(tmp_path / "fifo")
    top = labeller(tmp_path, xattr=b"secret")
    assert top.label_of(b(tmp_path / "fifo")) == Labelled("secret", LabelSource.XATTR)
    assert top.content_stats.skipped == {}  # the content was never opened
    lower = labeller(tmp_path, xattr=b"internal")
    assert lower.label_of(b(tmp_path / "fifo")) == Labelled("internal", LabelSource.XATTR)
    assert lower.content_stats.skipped == {"not_regular": 1}


def test_content_label_ignores_attribute_and_path(tmp_path) -> None:
    path = b(make_pdf(tmp_path / "a.pdf", info_guid=GUID_TOP))
    plain = b(make_pdf(tmp_path / "b.pdf"))
    lab = labeller(tmp_path, xattr=b"internal", rules=(PathRule("*", "confidential"),))
    assert lab.content_label(path) == Labelled("secret", LabelSource.MIP, GUID_TOP)
    assert lab.content_label(plain) is None


# --- configuration ------------------------------------------------------------------


def write_config(tmp_path: Path, labels: dict[str, Any]) -> Path:
    path = tmp_path / "agent.yaml"
    data = {
        "state_dir": "state",
        "sensitive_roots": ["sensitive"],
        "destinations": [{"path": "usb", "class": "removable"}],
        "labels": labels,
    }
    path.write_text(yaml.safe_dump(data))
    return path


def test_config_reads_content_labels(tmp_path) -> None:
    path = write_config(
        tmp_path,
        {
            "mip": {f"{{{GUID_CONF.upper()}}}": "confidential"},
            "mip_names": {"Highly Confidential": "secret"},
            "markers": [{"phrase": "TOP SECRET", "label": "secret"}],
            "card_numbers": {"label": "confidential", "min_matches": 3},
            "scan_bytes": "128KiB",
        },
    )
    content = load_config(path, {}, check_paths=False).labels.content
    assert content.mip == {GUID_CONF: "confidential"}
    assert content.mip_names == {"highly confidential": "secret"}
    assert content.markers == (("TOP SECRET", "secret"),)
    assert (content.card_number_label, content.card_number_min_matches) == ("confidential", 3)
    assert content.scan_bytes == 128 * 1024
    assert content.enabled
    default = load_config(write_config(tmp_path, {}), {}, check_paths=False).labels.content
    assert default == ContentConfig() and not default.enabled


def test_example_config_content_section_loads_when_uncommented(tmp_path) -> None:
    example = Path(__file__).resolve().parents[2] / "configs" / "agent.yaml"
    lines = example.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "# mip:")
    end = next(i for i, line in enumerate(lines) if line.strip().startswith("# scan_bytes:"))
    code = [
        line.replace("# ", "", 1)[2:]
        for line in lines[start : end + 1]
        if re.match(r"^  # (\s*- |\s*[^\s:][^:]*:(\s|$))", line)
    ]
    labels = yaml.safe_load("\n".join(code))
    assert set(labels) == {"mip", "mip_names", "markers", "card_numbers", "scan_bytes"}
    content = load_config(write_config(tmp_path, labels), {}, check_paths=False).labels.content
    assert content.enabled and content.card_number_label == "confidential"


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ({"mip": {"not-a-guid": "secret"}}, "labels.mip.not-a-guid: expected a label GUID"),
        ({"mip": {GUID_CONF: "ultra"}}, f"labels.mip.{GUID_CONF}: expected one of public"),
        ({"mip": ["x"]}, "labels.mip: expected a mapping"),
        ({"mip_names": {"Board": 3}}, "labels.mip_names.Board: expected one of"),
        ({"markers": [{"phrase": "X"}]}, "labels.markers[0].label: required key is missing"),
        ({"markers": [{"phrase": "", "label": "secret"}]}, "labels.markers[0].phrase: expected"),
        ({"markers": [{"phrase": "X", "label": "x"}]}, "labels.markers[0].label: expected one"),
        ({"markers": "X"}, "labels.markers: expected a list"),
        ({"card_numbers": {"min_matches": 2}}, "labels.card_numbers.label: required key"),
        ({"card_numbers": {"label": "secret", "min": 2}}, "labels.card_numbers.min: unknown key"),
        (
            {"card_numbers": {"label": "secret", "min_matches": 0}},
            "labels.card_numbers.min_matches: expected an integer >= 1",
        ),
        ({"scan_bytes": "lots"}, "labels.scan_bytes: expected a size"),
        ({"scan_bytes": "1GiB"}, "labels.scan_bytes: expected at most 16MiB"),
    ],
)
def test_config_errors_name_the_key(tmp_path, labels, message) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(write_config(tmp_path, labels), {}, check_paths=False)


def test_content_config_checks_its_own_invariants() -> None:
    with pytest.raises(ValueError, match="not a label GUID"):
        ContentConfig(mip={"x": "secret"})
    with pytest.raises(ValueError, match="scan_bytes"):
        ContentConfig(scan_bytes=0)
    assert hash(ContentConfig()) == hash(ContentConfig())  # usable inside frozen configs
    assert ContentConfig(mip={f"{{{GUID_CONF.upper()}}}": "secret"}).mip == {GUID_CONF: "secret"}


def test_levels_unknown_to_the_reader_are_ignored(tmp_path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("TOP SECRET")
    r = ContentReader(ContentConfig(markers=MARKERS), ("public", "confidential"))
    assert r.read(b(path)) is None
