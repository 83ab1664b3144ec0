"""agent.archive: zip and tar members hashed with bounded work, on real archive files.

Archives are written by the standard library and by the real `zip` and `tar` commands;
hostile ones (bombs, lying sizes, truncation) are made by editing real archives' bytes.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import lzma
import os
import shutil
import struct
import subprocess
import tarfile
import time
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.archive import (
    MAX_EXTENDED_HEADER,
    ArchiveKind,
    ArchiveLimits,
    ArchiveScan,
    Member,
    SkipReason,
    scan_archive,
    sniff,
)
from agent.events import Sha256Hex

LIMITS = ArchiveLimits()
NON_UTF8 = b"caf\xe9-\xff.txt"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def scan(path: Path, limits: ArchiveLimits = LIMITS) -> ArchiveScan:
    result = scan_archive(os.fsencode(path), limits)
    assert result is not None
    return result


def members(result: ArchiveScan) -> dict[bytes, tuple[int, str]]:
    return {m.name: (m.size, m.sha256) for m in result.members}


def make_zip(path: Path, files: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression=method) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def make_tar(path: Path, files: dict[bytes, bytes], mode: str = "w",
             fmt: int = tarfile.GNU_FORMAT) -> Path:  # fmt: skip
    with tarfile.open(  # type: ignore[call-overload]
        path, mode, format=fmt, encoding="utf-8", errors="surrogateescape"
    ) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name.decode("utf-8", "surrogateescape"))
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def central_entries(data: bytes) -> list[int]:
    """Offsets of the central directory headers of a zip."""
    found, at = [], data.find(b"PK\x01\x02")
    while at >= 0:
        found.append(at)
        at = data.find(b"PK\x01\x02", at + 4)
    return found


def patch(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    return data[:offset] + struct.pack(fmt, value) + data[offset + struct.calcsize(fmt) :]


class Counted:
    """A throttle that records how many member bytes were hashed."""

    def __init__(self) -> None:
        self.total = 0

    def __call__(self, n: int) -> None:
        self.total += n


# recognising archives


def test_zip_with_stored_and_deflated_members(tmp_path: Path) -> None:
    a, b = os.urandom(5000), b"board minutes " * 1000
    path = tmp_path / "out.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(zipfile.ZipInfo("docs/a.bin"), a, compress_type=zipfile.ZIP_STORED)
        zf.writestr(zipfile.ZipInfo("docs/b.txt"), b, compress_type=zipfile.ZIP_DEFLATED)
        zf.writestr(zipfile.ZipInfo("docs/"), b"")
        zf.writestr(zipfile.ZipInfo("empty"), b"")
    result = scan(path)
    assert result.kind is ArchiveKind.ZIP
    assert members(result) == {
        b"docs/a.bin": (5000, sha(a)),
        b"docs/b.txt": (len(b), sha(b)),
        b"empty": (0, sha(b"")),
    }
    assert result.complete
    assert result.skipped == {}
    assert result.reason == ""


def test_zip_command_with_symlink_and_non_utf8_name(tmp_path: Path) -> None:
    if shutil.which("zip") is None:
        pytest.skip("the zip command is not installed")
    src = tmp_path / "src"
    src.mkdir()
    data = os.urandom(70_000)
    (src / os.fsdecode(NON_UTF8)).write_bytes(data)
    (src / "plain.txt").write_bytes(b"x" * 100_000)  # zip deflates this one
    os.symlink("plain.txt", src / "link")
    out = tmp_path / "out.zip"
    subprocess.run(["zip", "-q", "-y", "-r", out, "."], cwd=src, check=True)
    result = scan(out)
    assert members(result) == {
        NON_UTF8: (70_000, sha(data)),
        b"plain.txt": (100_000, sha(b"x" * 100_000)),
    }  # the symlink (stored with -y as a link) is not a file of its own
    assert result.complete


@pytest.mark.parametrize(
    ("mode", "kind"),
    [
        ("w", ArchiveKind.TAR),
        ("w:gz", ArchiveKind.TAR_GZ),
        ("w:bz2", ArchiveKind.TAR_BZ2),
        ("w:xz", ArchiveKind.TAR_XZ),
    ],
)
@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_tar_in_every_compression_and_format(tmp_path: Path, mode: str, kind: ArchiveKind,
                                             fmt: int) -> None:  # fmt: skip
    files = {b"a/one.docx": os.urandom(3000), b"two.pdf": b"%PDF" * 5000, b"empty": b""}
    if fmt != tarfile.USTAR_FORMAT:  # ustar cannot carry a name this long
        files[b"d" * 150 + b"/long-name.txt"] = b"long"
    result = scan(make_tar(tmp_path / "x.archive", files, mode, fmt))
    assert result.kind is kind
    assert members(result) == {name: (len(d), sha(d)) for name, d in files.items()}
    assert result.complete


def test_tar_command_with_non_utf8_name_dirs_and_links(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    data = os.urandom(10_000)
    (src / "sub" / os.fsdecode(NON_UTF8)).write_bytes(data)
    os.symlink("sub", src / "link")
    os.link(src / "sub" / os.fsdecode(NON_UTF8), src / "hard")
    out = tmp_path / "out.tgz"
    subprocess.run(["tar", "czf", out, "-C", src, "."], check=True)
    result = scan(out)
    assert result.kind is ArchiveKind.TAR_GZ
    # The hard link's content is its first occurrence; whichever name tar put first wins.
    assert set(members(result).values()) == {(10_000, sha(data))}
    assert len(result.members) == 1
    assert result.members[0].name in (b"./sub/" + NON_UTF8, b"./hard")
    assert result.complete


@pytest.mark.parametrize(
    ("compress", "kind"),
    [(gzip.compress, ArchiveKind.GZIP), (bz2.compress, ArchiveKind.BZIP2),
     (lzma.compress, ArchiveKind.XZ)],
)  # fmt: skip
def test_a_single_compressed_file_is_one_member(tmp_path: Path, compress, kind) -> None:
    data = os.urandom(2000) + b"\x00" * 3000
    path = tmp_path / "report.docx.gz"
    path.write_bytes(compress(data))
    result = scan(path)
    assert result.kind is kind
    assert result.members == (Member(b"report.docx", 5000, Sha256Hex(sha(data))),)
    assert result.complete


def test_kind_is_decided_by_magic_bytes_not_by_name(tmp_path: Path) -> None:
    disguised = make_zip(tmp_path / "holiday.jpg", {"secret.xlsx": b"1,2,3\n" * 100})
    assert sniff(os.fsencode(disguised)) is ArchiveKind.ZIP
    assert scan(disguised).members[0].name == b"secret.xlsx"
    for name, data in [("fake.zip", b"not a zip at all"), ("fake.tar", os.urandom(4096)),
                       ("empty.tgz", b""), ("short", b"PK")]:  # fmt: skip
        path = tmp_path / name
        path.write_bytes(data)
        assert sniff(os.fsencode(path)) is None
        assert scan_archive(os.fsencode(path), LIMITS) is None


def test_symlinks_fifos_and_missing_files_are_not_archives(tmp_path: Path) -> None:
    real = make_zip(tmp_path / "real.zip", {"a": b"a"})
    os.symlink(real, tmp_path / "link.zip")
    os.mkfifo(tmp_path / "fifo.zip")  # opening it must not block
    for name in ("link.zip", "fifo.zip", "missing.zip"):
        path = os.fsencode(tmp_path / name)
        assert sniff(path) is None
        assert scan_archive(path, LIMITS) is None


# limits


def test_max_members_counts_the_rest_without_reading_them(tmp_path: Path) -> None:
    files = {f"f{i:02d}": b"%d" % i for i in range(20)}
    limits = ArchiveLimits(max_members=5)
    zipped = scan(make_zip(tmp_path / "m.zip", files), limits)
    assert len(zipped.members) == 5
    assert zipped.skipped == {SkipReason.TOO_MANY_MEMBERS: 15}
    assert not zipped.complete
    tarred = scan(make_tar(tmp_path / "m.tar", {k.encode(): v for k, v in files.items()}), limits)
    assert len(tarred.members) == 5
    assert tarred.skipped == {SkipReason.TOO_MANY_MEMBERS: 1}
    assert tarred.reason
    assert not tarred.complete


def test_max_member_bytes_skips_large_members_and_keeps_the_others(tmp_path: Path) -> None:
    files = {"big": os.urandom(20_000), "small": b"small"}
    limits = ArchiveLimits(max_member_bytes=10_000)
    tarred = make_tar(tmp_path / "l.tgz", {k.encode(): v for k, v in files.items()}, "w:gz")
    for path in (make_zip(tmp_path / "l.zip", files), tarred):
        result = scan(path, limits)
        assert members(result) == {b"small": (5, sha(b"small"))}
        assert result.skipped == {SkipReason.MEMBER_TOO_LARGE: 1}
        assert not result.complete


def test_max_total_bytes(tmp_path: Path) -> None:
    files = {f"f{i}": os.urandom(4000) for i in range(5)}
    limits = ArchiveLimits(max_total_bytes=10_000)
    zipped = scan(make_zip(tmp_path / "t.zip", files, zipfile.ZIP_STORED), limits)
    assert len(zipped.members) == 2
    assert zipped.skipped == {SkipReason.TOTAL_BYTES: 3}
    tarred = scan(make_tar(tmp_path / "t.tar", {k.encode(): v for k, v in files.items()}), limits)
    assert len(tarred.members) == 2  # 3 x (512 header + 4096 data) > 10,000
    assert tarred.skipped == {SkipReason.TOTAL_BYTES: 1}
    assert not tarred.complete


def test_zip_bomb_is_refused_by_its_declared_ratio_before_inflating(tmp_path: Path) -> None:
    bomb = make_zip(tmp_path / "bomb.zip", {"zeros": b"\x00" * (8 * 1024**2), "ok": b"fine"})
    counted = Counted()
    result = scan_archive(os.fsencode(bomb), ArchiveLimits(max_ratio=100), throttle=counted)
    assert result is not None
    assert members(result) == {b"ok": (4, sha(b"fine"))}
    assert result.skipped == {SkipReason.RATIO: 1}
    assert counted.total == 4  # not one byte of the bomb was inflated


def test_zip_member_inflating_past_its_declared_size_stops_there(tmp_path: Path) -> None:
    real = b"A" * 100_000 + os.urandom(100_000)
    data = make_zip(tmp_path / "x.zip", {"liar": real, "ok": b"ok"}).read_bytes()
    liar = central_entries(data)[0]
    lying = patch(data, liar + 24, "<L", 1000)  # declared uncompressed size: 1000
    path = tmp_path / "lying.zip"
    path.write_bytes(lying)
    counted = Counted()
    result = scan_archive(os.fsencode(path), LIMITS, throttle=counted)
    assert result is not None
    assert members(result) == {b"ok": (2, sha(b"ok"))}
    assert result.skipped == {SkipReason.CORRUPT: 1}
    assert counted.total <= 1001 + 2  # never more than declared (+1 to see the lie)


def test_zip_member_shorter_than_declared_or_stored_size_mismatch_is_corrupt(tmp_path) -> None:
    data = make_zip(tmp_path / "x.zip", {"short": os.urandom(3000)}).read_bytes()
    path = tmp_path / "long.zip"
    path.write_bytes(patch(data, central_entries(data)[0] + 24, "<L", 999_999))
    assert scan(path).skipped == {SkipReason.CORRUPT: 1}
    stored = make_zip(tmp_path / "s.zip", {"s": b"12345"}, zipfile.ZIP_STORED).read_bytes()
    path.write_bytes(patch(stored, central_entries(stored)[0] + 20, "<L", 3))  # csize 3 != 5
    assert scan(path).skipped == {SkipReason.CORRUPT: 1}


def test_overlapping_members_are_bounded_by_max_total_bytes(tmp_path: Path) -> None:
    """Many central entries pointing at one member (Fifield's non-recursive bomb)."""
    data = make_zip(tmp_path / "x.zip", {"m": os.urandom(50_000)}, zipfile.ZIP_STORED).read_bytes()
    cd = central_entries(data)[0]
    eocd = data.rfind(b"PK\x05\x06")
    entry = data[cd:eocd]
    copies = 1000
    end = bytearray(data[eocd:])
    struct.pack_into("<HHL", end, 8, copies, copies, len(entry) * copies)
    path = tmp_path / "overlap.zip"
    path.write_bytes(data[:cd] + entry * copies + bytes(end))
    counted = Counted()
    started = time.monotonic()
    result = scan_archive(
        os.fsencode(path), ArchiveLimits(max_total_bytes=500_000), throttle=counted
    )
    assert result is not None
    assert len(result.members) == 10
    assert result.skipped == {SkipReason.TOTAL_BYTES: 990}
    assert counted.total == 500_000
    assert time.monotonic() - started < 5


def test_compressed_tar_bomb_is_cut_by_the_observed_ratio(tmp_path: Path) -> None:
    path = make_tar(tmp_path / "b.tgz", {b"zeros": b"\x00" * (8 * 1024**2)}, "w:gz")
    counted = Counted()
    result = scan_archive(os.fsencode(path), ArchiveLimits(max_ratio=50), throttle=counted)
    assert result is not None
    assert result.members == ()
    assert result.skipped == {SkipReason.RATIO: 1}
    assert not result.complete
    assert counted.total < 2 * 1024**2


def test_encrypted_zip_members_are_skipped(tmp_path: Path) -> None:
    if shutil.which("zip") is None:
        pytest.skip("the zip command is not installed")
    (tmp_path / "secret.txt").write_bytes(b"secret " * 100)
    (tmp_path / "other.txt").write_bytes(b"other")
    out = tmp_path / "enc.zip"
    subprocess.run(["zip", "-q", "-P", "pw", out, "secret.txt", "other.txt"], cwd=tmp_path,
                   check=True)  # fmt: skip
    result = scan(out)
    assert result.members == ()
    assert result.skipped == {SkipReason.ENCRYPTED: 2}
    assert not result.complete


@pytest.mark.parametrize("method", [zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
def test_other_zip_methods_are_unsupported(tmp_path: Path, method: int) -> None:
    result = scan(make_zip(tmp_path / "o.zip", {"a": b"a" * 1000}, method))
    assert result.skipped == {SkipReason.UNSUPPORTED: 1}


# malformed input


def test_truncated_zip_and_tar_end_with_a_reason(tmp_path: Path) -> None:
    files = {f"f{i}": os.urandom(20_000) for i in range(4)}
    data = make_zip(tmp_path / "x.zip", files).read_bytes()
    path = tmp_path / "cut.zip"
    path.write_bytes(data[: len(data) // 2])
    result = scan(path)
    assert result.reason == "no end of central directory"
    assert not result.complete
    tar = make_tar(tmp_path / "x.tgz", {k.encode(): v for k, v in files.items()}, "w:gz")
    raw = tar.read_bytes()
    path = tmp_path / "cut.tgz"
    path.write_bytes(raw[: len(raw) // 2])
    result = scan(path)
    assert 1 <= len(result.members) < 4
    assert result.reason
    assert not result.complete


def test_oversized_pax_header_is_refused_quickly(tmp_path: Path) -> None:
    """tarfile would read it whole; Python 3.11.7 parses it in quadratic time."""
    size = MAX_EXTENDED_HEADER + 1
    info = tarfile.TarInfo("././@PaxHeader")
    info.type = tarfile.XHDTYPE
    info.size = size
    path = tmp_path / "pax.tar"
    path.write_bytes(info.tobuf(tarfile.USTAR_FORMAT) + b"9" * size + b"\x00" * 2048)
    started = time.monotonic()
    result = scan(path)
    assert result.reason
    assert result.members == ()
    assert time.monotonic() - started < 2


def test_a_member_larger_than_the_stream_is_truncated(tmp_path: Path) -> None:
    info = tarfile.TarInfo("claims-1GB")
    info.size = 10**9
    path = tmp_path / "short.tar"
    path.write_bytes(info.tobuf(tarfile.GNU_FORMAT) + b"x" * 1000)
    result = scan(path, ArchiveLimits(max_member_bytes=2 * 10**9, max_total_bytes=2 * 10**9))
    assert result.members == ()
    assert result.skipped == {SkipReason.CORRUPT: 1}
    assert result.reason == "truncated member data"


def _valid_archives(tmp_path: Path) -> list[bytes]:
    files = {b"a.txt": b"alpha " * 300, b"b.bin": os.urandom(700), b"dir/c": b"c"}
    return [
        make_zip(tmp_path / "f.zip", {k.decode(): v for k, v in files.items()}).read_bytes(),
        make_tar(tmp_path / "f.tgz", files, "w:gz").read_bytes(),
        make_tar(tmp_path / "f.tar", files, "w", tarfile.PAX_FORMAT).read_bytes(),
        make_tar(tmp_path / "f.txz", files, "w:xz").read_bytes(),
        make_tar(tmp_path / "f.tbz", files, "w:bz2").read_bytes(),
    ]


@settings(
    max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    which=st.integers(0, 4),
    edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.binary(min_size=1, max_size=8)),
                   min_size=1, max_size=6),
    cut=st.floats(0.05, 1.0),
)  # fmt: skip
def test_mutated_archives_never_raise_or_hang(tmp_path_factory, which, edits, cut) -> None:
    tmp = tmp_path_factory.mktemp("fuzz")
    data = bytearray(_valid_archives(tmp)[which])
    for where, blob in edits:
        at = int(where * len(data))
        data[at : at + len(blob)] = blob
    path = tmp / "mutant"
    path.write_bytes(bytes(data[: max(1, int(len(data) * cut))]))
    counted = Counted()
    limits = ArchiveLimits(max_total_bytes=10**6, max_member_bytes=10**6)
    result = scan_archive(os.fsencode(path), limits, throttle=counted)
    assert result is None or isinstance(result, ArchiveScan)
    assert counted.total <= 10**6
