"""agent.copy_detector: pure decisions, no disk, time passed in."""

from __future__ import annotations

from dataclasses import replace

import pytest

from agent.copy_detector import (
    CopyDetector,
    ExactCopy,
    NeedsHash,
    WriteTrigger,
    WrittenFile,
    is_temp_name,
)
from agent.events import DestinationClass, DetectionMethod, DeviceInfo, Sha256Hex
from agent.index import Entry, SensitiveIndex

LEVELS = ("public", "internal", "confidential", "secret")
SHA_A = Sha256Hex("a" * 64)
SHA_B = Sha256Hex("b" * 64)
USB = DeviceInfo(vendor="Kingston", serial="123")


def source(path: bytes = b"/s/plan.pdf", *, ino: int = 1, size: int = 1000, sha: str = SHA_A,
           label: str = "confidential", is_copy: bool = False) -> Entry:  # fmt: skip
    return Entry(
        path=path,
        size=size,
        mtime_ns=5,
        sha256=Sha256Hex(sha),
        label=label,
        label_source="xattr",
        dev=1,
        ino=ino,
        is_copy=is_copy,
    )


def written(path: bytes = b"/usb/plan.pdf", *, ino: int = 100, size: int = 1000,
            sha: Sha256Hex | None = None, mtime_ns: int = 9,
            trigger: WriteTrigger = WriteTrigger.CLOSE) -> WrittenFile:  # fmt: skip
    return WrittenFile(
        path=path,
        size=size,
        dev=2,
        ino=ino,
        mtime_ns=mtime_ns,
        destination_class=DestinationClass.REMOVABLE,
        sha256=sha,
        device=USB,
        trigger=trigger,
    )


@pytest.fixture
def index() -> SensitiveIndex:
    index = SensitiveIndex(LEVELS)
    index.add(source())
    return index


@pytest.fixture
def detector(index: SensitiveIndex) -> CopyDetector:
    return CopyDetector(index, window=30.0, temp_grace=10.0)


def test_no_labelled_file_of_that_size_means_no_decision(detector) -> None:
    assert detector.feed(written(size=999), now=0.0) == []


def test_same_size_without_hash_asks_for_one(detector) -> None:
    obs = written()
    assert detector.feed(obs, now=0.0) == [NeedsHash(obs, 1)]


def test_equal_hash_is_an_exact_copy(detector, index) -> None:
    obs = written(sha=SHA_A)
    [decision] = detector.feed(obs, now=0.0)
    assert isinstance(decision, ExactCopy)
    assert decision.source == index.get((1, 1))
    assert decision.written == obs
    assert decision.sha256 == SHA_A
    assert decision.method is DetectionMethod.EXACT_HASH
    assert decision.written.device == USB


def test_different_hash_is_not_a_copy(detector) -> None:
    assert detector.feed(written(sha=SHA_B), now=0.0) == []


def test_the_same_write_is_decided_once_within_the_window(detector) -> None:
    assert len(detector.feed(written(sha=SHA_A), now=0.0)) == 1
    # shutil.copy's extra events, a close after the rename, a second worker
    assert detector.feed(written(sha=SHA_A), now=1.0) == []
    assert detector.feed(written(sha=SHA_A, trigger=WriteTrigger.RENAME), now=2.0) == []
    assert detector.feed(written(sha=None), now=3.0) == []
    assert len(detector) == 1
    assert len(detector.feed(written(sha=SHA_A), now=31.0)) == 1


def test_a_new_write_to_the_same_inode_is_a_new_decision(detector) -> None:
    assert len(detector.feed(written(sha=SHA_A), now=0.0)) == 1
    assert len(detector.feed(written(sha=SHA_A, mtime_ns=10), now=1.0)) == 1


def test_expire_forgets_old_decisions(detector) -> None:
    detector.feed(written(sha=SHA_A), now=0.0)
    detector.feed(written(ino=101, sha=SHA_A), now=20.0)
    detector.expire(35.0)
    assert len(detector) == 1


@pytest.mark.parametrize(
    "name",
    [b".plan.pdf.wO3pq0", b"plan.pdf.part", b"plan.pdf.crdownload", b"plan.TMP", b"~$plan.docx"],
)
def test_temp_names_are_decided_on_rename_not_on_close(detector, name) -> None:
    temp = written(b"/usb/" + name, sha=SHA_A)
    assert is_temp_name(temp.path)
    assert detector.feed(temp, now=0.0) == []
    final = replace(temp, path=b"/usb/plan.pdf", trigger=WriteTrigger.RENAME)
    [decision] = detector.feed(final, now=0.5)
    assert isinstance(decision, ExactCopy)
    assert detector.due(100.0) == []


@pytest.mark.parametrize(
    "name", [b"plan.pdf", b".bashrc", b"partial.pdf", b"tmp", b"a~$b", b".x.abc", b"\xff.part.pdf"]
)
def test_ordinary_names(name) -> None:
    assert not is_temp_name(b"/usb/" + name)


def test_a_temp_file_never_renamed_is_decided_after_the_grace_period(detector) -> None:
    temp = written(b"/usb/plan.tmp")
    assert detector.feed(temp, now=0.0) == []
    assert detector.feed(replace(temp, mtime_ns=11), now=1.0) == []  # closed again
    assert detector.due(10.5) == []
    [settled] = detector.due(11.0)
    assert settled.trigger is WriteTrigger.SETTLED
    assert settled.mtime_ns == 11
    assert detector.due(50.0) == []
    assert detector.feed(settled, now=11.0) == [NeedsHash(settled, 1)]
    [decision] = detector.feed(settled.with_hash(SHA_A), now=11.1)
    assert isinstance(decision, ExactCopy)


def test_rename_of_a_temp_to_another_temp_name_is_still_decided(detector) -> None:
    obs = written(b"/usb/x.part", sha=SHA_A, trigger=WriteTrigger.RENAME)
    assert len(detector.feed(obs, now=0.0)) == 1


def test_highest_label_wins_among_equal_hashes(index, detector) -> None:
    index.add(source(b"/s/other", ino=2, label="secret"))
    index.add(source(b"/s/low", ino=3, label="public"))
    [decision] = detector.feed(written(sha=SHA_A), now=0.0)
    assert isinstance(decision, ExactCopy)
    assert decision.source.path == b"/s/other"


def test_a_known_copy_is_not_reported_again(index, detector) -> None:
    # The pipeline indexes every decided copy; a rescan or a rename inside the
    # destination then finds the copy itself, unchanged.
    index.add(replace(source(b"/usb/plan.pdf", ino=100, is_copy=True), dev=2, mtime_ns=9))
    assert detector.feed(written(b"/usb/renamed.pdf", sha=None), now=100.0) == []
    assert detector.feed(written(b"/usb/renamed.pdf", sha=SHA_A), now=100.0) == []


def test_a_known_copy_rewritten_is_matched_against_others_not_itself(index, detector) -> None:
    copy = replace(source(b"/usb/plan.pdf", ino=100, is_copy=True), dev=2, mtime_ns=9)
    index.add(copy)
    [decision] = detector.feed(written(sha=SHA_A, mtime_ns=50), now=0.0)
    assert isinstance(decision, ExactCopy)
    assert decision.source.path == b"/s/plan.pdf"


def test_copy_of_a_copy_is_caught_when_the_original_is_gone(index, detector) -> None:
    index.remove((1, 1))
    index.add(replace(source(b"/usb/plan.pdf", ino=100, is_copy=True), dev=2))
    [decision] = detector.feed(written(b"/cloud/plan.pdf", ino=200, sha=SHA_A), now=0.0)
    assert isinstance(decision, ExactCopy)
    assert decision.source.path == b"/usb/plan.pdf"
    assert decision.source.label == "confidential"


def test_the_labelled_inode_itself_arriving_is_decided(index, detector) -> None:
    # mv on one filesystem: same inode, new path (the pipeline calls it a move)
    moved = replace(written(b"/usb/plan.pdf", sha=SHA_A, mtime_ns=5), dev=1, ino=1)
    [decision] = detector.feed(moved, now=0.0)
    assert isinstance(decision, ExactCopy)
    assert decision.source.key == (moved.dev, moved.ino)


def test_misses_are_handed_back_when_a_labelled_file_of_that_size_appears(index, detector) -> None:
    early = written(b"/usb/new.pdf", ino=300, size=4321)
    assert detector.feed(early, now=0.0) == []  # the index does not know the source yet
    mismatch = written(b"/usb/other.pdf", ino=301, sha=SHA_B)
    assert detector.feed(mismatch, now=0.0) == []
    assert detector.recheck(999, now=1.0) == []
    assert detector.recheck(4321, now=1.0) == [early]
    assert detector.recheck(4321, now=1.0) == []  # handed back once
    assert detector.recheck(1000, now=31.0) == []  # older than the window


def test_decided_writes_are_not_handed_back(detector) -> None:
    obs = written(sha=SHA_A)
    assert detector.feed(replace(obs, sha256=SHA_B), now=0.0) == []
    assert len(detector.feed(obs, now=0.5)) == 1
    assert detector.recheck(1000, now=1.0) == []


def test_a_just_deleted_original_is_still_a_source_for_a_while(index, detector) -> None:
    original = index.remove((1, 1))
    assert original is not None
    assert detector.feed(written(sha=SHA_A), now=0.0) == []  # gone, and nobody said so
    detector.removed(original, now=1.0)  # mv across filesystems: copy, then delete
    [needs] = detector.feed(written(ino=101), now=2.0)
    assert isinstance(needs, NeedsHash)
    [copy] = detector.feed(written(ino=101, sha=SHA_A), now=2.0)
    assert isinstance(copy, ExactCopy)
    assert copy.source == original
    assert detector.feed(written(ino=102, sha=SHA_A), now=31.5) == []  # the window ended


def test_an_indexed_copy_is_a_better_source_than_a_deleted_original(index, detector) -> None:
    original = index.remove((1, 1))
    assert original is not None
    copy_entry = source(b"/usb/one.pdf", ino=50, is_copy=True)
    index.add(copy_entry)
    detector.removed(original, now=0.0)
    [copy] = detector.feed(written(ino=102, sha=SHA_A), now=1.0)
    assert isinstance(copy, ExactCopy)
    assert copy.source == copy_entry


def test_forget_lets_an_inode_back_from_a_sensitive_root_be_decided_again(detector) -> None:
    assert len(detector.feed(written(sha=SHA_A), now=0.0)) == 1
    detector.forget((2, 100))  # moved back into a sensitive root
    assert len(detector.feed(written(sha=SHA_A), now=1.0)) == 1  # and out again


def test_a_file_that_changed_while_hashed_is_handed_back(detector) -> None:
    obs = written(sha=None)
    assert detector.retry(obs, now=0.0)
    assert detector.due(now=0.9) == []
    [again] = detector.due(now=1.0)
    assert (again.trigger, again.attempts) == (WriteTrigger.SETTLED, 1)
    for i in range(2):
        assert detector.retry(again, now=float(i))
        [again] = detector.due(now=10.0)
    assert again.attempts == 3
    assert not detector.retry(again, now=10.0)  # a file that never holds still: give up


def test_a_known_copy_whose_mtime_moved_is_not_a_new_copy(index, detector) -> None:
    copy = replace(source(b"/usb/plan.pdf", ino=100, is_copy=True), dev=2, mtime_ns=5)
    index.add(copy)  # decided at mtime 5; then copystat set 9, which brings no event
    triggers = (WriteTrigger.SETTLED, WriteTrigger.SCAN, WriteTrigger.CREATE)
    for mtime, trigger in enumerate(triggers, start=9):
        [needs] = detector.feed(written(mtime_ns=mtime, trigger=trigger), now=0.0)
        assert isinstance(needs, NeedsHash)
        assert detector.feed(written(mtime_ns=mtime, sha=SHA_A, trigger=trigger), now=0.0) == []
    # `cp` over it again closes it again: that is a copy (the test above)


def test_the_close_of_a_copy_decided_on_its_create_is_no_news(index, detector) -> None:
    # shutil.copy2: the content is complete at the create, copystat moves the mtime,
    # then the close is handled: the same write, not a second copy.
    [copy] = detector.feed(written(sha=SHA_A, trigger=WriteTrigger.CREATE), now=0.0)
    assert isinstance(copy, ExactCopy)
    index.add(replace(source(b"/usb/plan.pdf", ino=100, is_copy=True), dev=2, mtime_ns=9))
    assert detector.feed(written(sha=SHA_A, mtime_ns=12), now=0.5) == []
    # a later `cp` of the same bytes over it closes it again: a copy
    assert len(detector.feed(written(sha=SHA_A, mtime_ns=20), now=1.0)) == 1
