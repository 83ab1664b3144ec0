"""agent.index: the sensitive index, the bounded hasher and the scanner."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pytest

from agent.config import AgentConfig, PathRule
from agent.events import Sha256Hex
from agent.index import (
    Entry,
    FileHasher,
    HashFailure,
    HashOutcome,
    IndexOutcome,
    Scanner,
    SensitiveIndex,
    StatOutcome,
    walk_files,
)
from agent.labels import Labeller

LEVELS = ("public", "internal", "confidential", "secret")
XATTR = "user.exfilwatch.label"


def entry(path: bytes, *, size: int = 10, sha: str = "a" * 64, label: str = "secret", ino: int = 1,
          is_copy: bool = False) -> Entry:  # fmt: skip
    return Entry(
        path=path,
        size=size,
        mtime_ns=1,
        sha256=Sha256Hex(sha),
        label=label,
        label_source="xattr",
        dev=7,
        ino=ino,
        is_copy=is_copy,
    )


# SensitiveIndex


def test_add_and_look_up_by_key_size_hash_and_path() -> None:
    index = SensitiveIndex(LEVELS)
    a = entry(b"/s/a", ino=1)
    b = entry(b"/s/b", ino=2, size=20, sha="b" * 64)
    index.add(a)
    index.add(b)
    assert len(index) == 2
    assert index.get((7, 1)) == a
    assert index.get_path(b"/s/b") == b
    assert index.candidates(10) == [a]
    assert index.candidates(11) == []
    assert index.by_hash("b" * 64) == b
    assert index.by_hash("c" * 64) is None


def test_add_replaces_the_same_inode_everywhere() -> None:
    index = SensitiveIndex(LEVELS)
    index.add(entry(b"/s/a", ino=1))
    newer = entry(b"/s/a", ino=1, size=11, sha="d" * 64)
    assert index.add(newer) is not None
    assert index.candidates(10) == []
    assert index.candidates(11) == [newer]
    assert index.by_hash("a" * 64) is None
    assert len(index) == 1


def test_a_new_inode_at_an_indexed_path_replaces_the_old_one() -> None:
    index = SensitiveIndex(LEVELS)
    index.add(entry(b"/s/a", ino=1))
    index.add(entry(b"/s/a", ino=2))  # editor save: temp file renamed over the original
    assert [e.ino for e in index.entries()] == [2]


def test_update_only_replaces_existing_entries() -> None:
    index = SensitiveIndex(LEVELS)
    assert not index.update(entry(b"/s/a"))
    index.add(entry(b"/s/a"))
    assert index.update(entry(b"/s/a", label="internal"))
    assert index.get((7, 1)) is not None
    assert index.get((7, 1)).label == "internal"  # type: ignore[union-attr]


def test_remove_by_key_path_and_prefix() -> None:
    index = SensitiveIndex(LEVELS)
    index.add(entry(b"/s/a", ino=1))
    index.add(entry(b"/s/d/b", ino=2))
    index.add(entry(b"/s/d/e/c", ino=3))
    index.add(entry(b"/s/dd", ino=4))
    assert index.remove((7, 1)) is not None
    assert index.remove((7, 1)) is None
    assert index.remove_under(b"/s/d") == 2
    assert [e.path for e in index.entries()] == [b"/s/dd"]
    assert index.remove_path(b"/s/dd") is not None
    assert index.remove_path(b"/s/dd") is None
    assert len(index) == 0
    assert index.candidates(10) == []


def test_rename_follows_files_and_directories() -> None:
    index = SensitiveIndex(LEVELS)
    index.add(entry(b"/s/a", ino=1))
    index.add(entry(b"/s/d/b", ino=2))
    moved = index.rename(b"/s/a", b"/s/z")
    assert moved is not None
    assert moved.path == b"/s/z"
    index.rename(b"/s/d", b"/s/e")
    assert sorted(e.path for e in index.entries()) == [b"/s/e/b", b"/s/z"]
    assert index.get_path(b"/s/a") is None
    assert index.rename(b"/nowhere", b"/else") is None


def test_best_prefers_higher_label_then_originals_then_oldest() -> None:
    index = SensitiveIndex(LEVELS)
    low = entry(b"/s/low", ino=1, label="internal")
    copy = entry(b"/usb/high", ino=2, label="secret", is_copy=True)
    high = entry(b"/s/high", ino=3, label="secret")
    high2 = entry(b"/s/high2", ino=4, label="secret")
    for e in (low, copy, high, high2):
        index.add(e)
    assert index.by_hash("a" * 64) == high
    assert index.best([low, copy]) == copy
    assert index.best([]) is None
    assert index.rank("secret") == 3
    assert index.rank("unknown") == -1


# FileHasher


def test_hash_matches_hashlib(tmp_path) -> None:
    data = os.urandom(300_000)
    path = tmp_path / "f"
    path.write_bytes(data)
    outcome = FileHasher(10**9).hash_file(os.fsencode(path), os.stat(path))
    assert outcome.failure is None
    assert outcome.sha256 == hashlib.sha256(data).hexdigest()
    assert outcome.st is not None
    assert outcome.st.st_size == len(data)


def test_hash_of_empty_file(tmp_path) -> None:
    path = tmp_path / "empty"
    path.write_bytes(b"")
    assert FileHasher(10).hash_file(os.fsencode(path)).sha256 == hashlib.sha256().hexdigest()


def test_too_large_files_are_not_read(tmp_path) -> None:
    path = tmp_path / "big"
    path.write_bytes(b"x" * 101)
    outcome = FileHasher(100).hash_file(os.fsencode(path))
    assert (outcome.sha256, outcome.failure) == (None, HashFailure.TOO_LARGE)


def test_vanished_file(tmp_path) -> None:
    hasher = FileHasher(100)
    assert hasher.hash_file(os.fsencode(tmp_path / "gone")).failure is HashFailure.VANISHED
    assert hasher.stat(os.fsencode(tmp_path / "gone")) == StatOutcome(failure=HashFailure.VANISHED)


def test_symlinks_and_fifos_are_not_regular_and_never_block(tmp_path) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"data")
    (tmp_path / "link").symlink_to(target)
    os.mkfifo(tmp_path / "fifo")
    hasher = FileHasher(100)
    for name in ("link", "fifo"):
        path = os.fsencode(tmp_path / name)
        assert hasher.hash_file(path).failure is HashFailure.NOT_REGULAR
        assert hasher.stat(path).failure is HashFailure.NOT_REGULAR


def test_a_different_inode_than_expected_is_changed(tmp_path) -> None:
    (tmp_path / "a").write_bytes(b"a")
    (tmp_path / "b").write_bytes(b"b")
    outcome = FileHasher(100).hash_file(os.fsencode(tmp_path / "a"), os.stat(tmp_path / "b"))
    assert outcome.failure is HashFailure.CHANGED


def test_stat_of_a_regular_file(tmp_path) -> None:
    (tmp_path / "a").write_bytes(b"abc")
    outcome = FileHasher(100).stat(os.fsencode(tmp_path / "a"))
    assert outcome.failure is None
    assert outcome.st is not None
    assert outcome.st.st_size == 3


# walk_files


def test_walk_lists_regular_files_without_following_symlinks(tmp_path) -> None:
    (tmp_path / "d" / "e").mkdir(parents=True)
    (tmp_path / "a").write_bytes(b"1")
    (tmp_path / "d" / "b").write_bytes(b"2")
    (tmp_path / "d" / "e" / "c").write_bytes(b"3")
    (tmp_path / "loop").symlink_to(tmp_path, target_is_directory=True)
    (tmp_path / "alias").symlink_to(tmp_path / "a")
    root = os.fsencode(tmp_path)
    names = sorted(os.path.relpath(p, root) for p, _ in walk_files(root))
    assert names == [b"a", b"d/b", b"d/e/c"]
    flat = sorted(os.path.relpath(p, root) for p, _ in walk_files(root, recursive=False))
    assert flat == [b"a"]


def test_walk_reports_missing_directories(tmp_path) -> None:
    errors: list[bytes] = []
    assert list(walk_files(os.fsencode(tmp_path / "nope"), lambda p, e: errors.append(p))) == []
    assert errors == [os.fsencode(tmp_path / "nope")]


# Scanner


@pytest.fixture
def tree(tmp_path):
    """A sensitive root with labelled (xattr and path rule) and unlabelled files."""
    root = tmp_path / "sensitive"
    (root / "board").mkdir(parents=True)
    (root / "xattr.txt").write_bytes(b"by attribute")
    (root / "board" / "minutes.txt").write_bytes(b"by path rule")
    (root / "plain.txt").write_bytes(b"nothing")
    (root / b"caf\xe9.txt".decode("utf-8", "surrogateescape")).write_bytes(b"non utf-8")
    for name in ("xattr.txt", b"caf\xe9.txt".decode("utf-8", "surrogateescape")):
        try:
            os.setxattr(root / name, XATTR, b"confidential")
        except OSError as e:
            if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
                pytest.skip(f"filesystem rejects user xattrs: {e}")
            raise
    return root


def make_scanner(root: Path, hasher=None) -> tuple[Scanner, SensitiveIndex]:
    config = AgentConfig(
        state_dir=root / "state",
        sensitive_roots=(root,),
        destinations=(),
        host="h",
        path_rules=(PathRule("*/board/*", "secret"),),
    )
    index = SensitiveIndex(config.labels.levels)
    scanner = Scanner([os.fsencode(root)], Labeller(config), index, hasher or FileHasher(10**6))
    return scanner, index


def test_scan_indexes_labelled_files_only(tree) -> None:
    scanner, index = make_scanner(tree)
    stats = scanner.scan()
    assert (stats.files, stats.labelled, stats.hashed) == (4, 3, 3)
    by_name = {os.path.basename(e.path): e for e in index.entries()}
    assert set(by_name) == {b"xattr.txt", b"minutes.txt", b"caf\xe9.txt"}
    assert by_name[b"minutes.txt"].label == "secret"
    assert by_name[b"minutes.txt"].label_source == "path"
    assert by_name[b"xattr.txt"].label_source == "xattr"
    assert by_name[b"xattr.txt"].sha256 == hashlib.sha256(b"by attribute").hexdigest()
    st = os.stat(tree / "xattr.txt")
    assert by_name[b"xattr.txt"].key == (st.st_dev, st.st_ino)
    assert not any(e.is_copy for e in index.entries())


def test_rescan_reuses_hashes_and_sweeps_deleted_files(tree) -> None:
    scanner, index = make_scanner(tree)
    scanner.scan()
    (tree / "board" / "minutes.txt").unlink()
    stats = scanner.scan()
    assert (stats.hashed, stats.reused, stats.removed) == (0, 2, 1)
    assert len(index) == 2


def test_index_file_follows_content_and_label_changes(tree) -> None:
    scanner, index = make_scanner(tree)
    scanner.scan()
    path = os.fsencode(tree / "xattr.txt")
    (tree / "xattr.txt").write_bytes(b"new content")
    assert scanner.index_file(path) is IndexOutcome.INDEXED
    found = index.get_path(path)
    assert found is not None
    assert found.sha256 == hashlib.sha256(b"new content").hexdigest()
    assert scanner.index_file(path) is IndexOutcome.UNCHANGED
    os.removexattr(path, XATTR)
    assert scanner.index_file(path) is IndexOutcome.UNLABELLED
    assert index.get_path(path) is None


def test_an_editor_style_save_keeps_the_label(tree) -> None:
    scanner, index = make_scanner(tree)
    scanner.scan()
    path = os.fsencode(tree / "xattr.txt")
    before = index.get_path(path)
    assert before is not None
    (tree / ".xattr.txt.swp").write_bytes(b"edited")  # no attribute on the new inode
    os.replace(tree / ".xattr.txt.swp", tree / "xattr.txt")
    assert scanner.index_file(path) is IndexOutcome.INDEXED
    after = index.get_path(path)
    assert after is not None
    assert after.key != before.key
    assert (after.label, after.label_source) == (before.label, before.label_source)
    assert after.sha256 == hashlib.sha256(b"edited").hexdigest()
    assert index.get(before.key) is None


class DeletingHasher:
    """Deletes a chosen file just before hashing it (a file vanishing mid-scan)."""

    def __init__(self, victim: bytes) -> None:
        self.real = FileHasher(10**6)
        self.victim = victim

    def stat(self, path: bytes) -> StatOutcome:
        return self.real.stat(path)

    def hash_file(self, path: bytes, expect: os.stat_result | None = None) -> HashOutcome:
        if path == self.victim:
            os.unlink(path)
        return self.real.hash_file(path, expect)


class UnreadableHasher(DeletingHasher):
    def hash_file(self, path: bytes, expect: os.stat_result | None = None) -> HashOutcome:
        if path == self.victim:
            return HashOutcome(failure=HashFailure.UNREADABLE)
        return self.real.hash_file(path, expect)


def test_vanished_and_unreadable_files_are_skipped_and_counted(tree) -> None:
    victim = os.fsencode(tree / "xattr.txt")
    scanner, index = make_scanner(tree, DeletingHasher(victim))
    stats = scanner.scan()
    assert (stats.vanished, stats.unreadable, stats.labelled) == (1, 0, 3)
    assert index.get_path(victim) is None
    assert len(index) == 2

    victim = os.fsencode(tree / "board" / "minutes.txt")
    scanner, index = make_scanner(tree, UnreadableHasher(victim))
    stats = scanner.scan()
    assert stats.unreadable == 1
    assert stats.skipped_paths == [victim]
    assert len(index) == 1


def test_scan_survives_a_missing_root(tmp_path) -> None:
    scanner, index = make_scanner(tmp_path / "absent")
    stats = scanner.scan()
    assert (stats.files, stats.vanished) == (0, 1)
    assert len(index) == 0


def test_scan_keeps_detected_copies(tree) -> None:
    scanner, index = make_scanner(tree)
    copy = entry(os.fsencode(tree / "elsewhere"), ino=999_999_999, is_copy=True)
    index.add(copy)
    scanner.scan()
    assert index.get(copy.key) == copy
