"""agent.index.SensitiveIndex on its temporary SQLite database: what the dict version did too,
plus raw bytes, 64-bit inode numbers, prefix edges, sweeps and bounded memory."""

from __future__ import annotations

import os
from pathlib import Path

import psutil

from agent.config import AgentConfig
from agent.events import Sha256Hex
from agent.index import Entry, FileHasher, Scanner, SensitiveIndex
from agent.labels import Labeller

LEVELS = ("public", "internal", "confidential", "secret")
XATTR = "user.exfilwatch.label"


def entry(path: bytes, ino: int, *, size: int = 10, sha: str = "a" * 64, dev: int = 7,
          label: str = "secret", is_copy: bool = False) -> Entry:  # fmt: skip
    return Entry(path, size, 1, Sha256Hex(sha), label, "xattr", dev, ino, is_copy)


def test_raw_bytes_and_unsigned_64_bit_identities_round_trip() -> None:
    index = SensitiveIndex(LEVELS)
    odd = entry(b"/s/caf\xe9-\xff\x00x", ino=2**64 - 1, dev=2**63 + 5, size=2**40)
    index.add(odd)
    assert index.get((2**63 + 5, 2**64 - 1)) == odd
    assert index.get_path(b"/s/caf\xe9-\xff\x00x") == odd
    assert index.candidates(2**40) == [odd]
    assert index.entries() == [odd]


def test_prefixes_match_whole_path_components() -> None:
    index = SensitiveIndex(LEVELS)
    for i, path in enumerate([b"/s/a", b"/s/a/x", b"/s/a/y/z", b"/s/ab", b"/s/a.txt", b"/s/a0"]):
        index.add(entry(path, ino=i))
    assert [e.path for e in index.entries_under(b"/s/a/")] == [b"/s/a", b"/s/a/x", b"/s/a/y/z"]
    moved = index.rename(b"/s/a", b"/t/b")
    assert moved is not None and moved.path == b"/t/b"
    assert sorted(e.path for e in index.entries()) == [
        b"/s/a.txt", b"/s/a0", b"/s/ab", b"/t/b", b"/t/b/x", b"/t/b/y/z",
    ]  # fmt: skip
    assert index.remove_under(b"/t/b") == 3
    assert len(index) == 3


def test_replacing_keeps_insertion_order_semantics() -> None:
    index = SensitiveIndex(LEVELS)
    a, b = entry(b"/s/a", 1), entry(b"/s/b", 2)
    index.add(a)
    index.add(b)
    a2 = entry(b"/s/a", 1, label="internal")
    assert index.add(a2) == a
    assert index.candidates(10) == [b, a2]  # re-added: now the newest
    assert index.best(index.candidates(10)) == b


def test_a_sweep_removes_only_unseen_originals_that_predate_it() -> None:
    index = SensitiveIndex(LEVELS)
    seen, unseen, copy = entry(b"/s/seen", 1), entry(b"/s/gone", 2), entry(b"/s/c", 3, is_copy=True)
    outside = entry(b"/elsewhere/x", 4)
    for e in (seen, unseen, copy, outside):
        index.add(e)
    sweep = index.begin_sweep()
    sweep.seen(seen.key)
    newcomer = entry(b"/s/new", 5)  # indexed by the pipeline while the walk runs
    index.add(newcomer)
    index.add(entry(b"/s/gone", 2, size=11))  # and changed: re-indexed, so not stale
    index.add(entry(b"/s/later", 6))
    index.remove_path(b"/s/later")
    assert sweep.finish([b"/s"]) == 0
    index.remove_path(b"/s/gone")
    index.add(unseen)
    sweep = index.begin_sweep()
    sweep.seen(seen.key)
    assert sweep.finish([b"/s"]) == 2  # unseen and newcomer; the copy and outside stay
    assert sorted(e.path for e in index.entries()) == [b"/elsewhere/x", b"/s/c", b"/s/seen"]


def test_memory_does_not_grow_with_the_index(tmp_path: Path) -> None:
    """The point of the on-disk store: 20,000 entries as objects cost ~25 MB of RSS."""
    index = SensitiveIndex(LEVELS)
    process = psutil.Process()
    before = process.memory_info().rss
    for i in range(20_000):
        index.add(
            entry(b"/home/someone/documents/project/%06d.docx" % i, i, size=i, sha=f"{i:064x}")
        )
    grown = process.memory_info().rss - before
    assert len(index) == 20_000
    assert index.by_hash(f"{777:064x}") == entry(
        b"/home/someone/documents/project/000777.docx", 777, size=777, sha=f"{777:064x}"
    )
    assert grown < 8 * 1024**2, grown


def test_scanner_rescan_sweeps_deleted_files(tmp_path: Path) -> None:
    root = tmp_path / "s"
    (root / "sub").mkdir(parents=True)
    for name in ("a", "b", "sub/c"):
        (root / name).write_bytes(name.encode() * 100)
        os.setxattr(root / name, XATTR, b"secret")
    config = AgentConfig(state_dir=tmp_path, sensitive_roots=(root,), destinations=(), host="h")
    index = SensitiveIndex(LEVELS)
    scanner = Scanner([os.fsencode(root)], Labeller(config), index, FileHasher(10**6))
    assert scanner.scan().hashed == 3
    (root / "b").unlink()
    stats = scanner.scan()
    assert (stats.reused, stats.removed) == (2, 1)
    assert sorted(os.path.basename(e.path) for e in index.entries()) == [b"a", b"c"]
