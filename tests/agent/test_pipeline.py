"""agent.pipeline: real watcher + pipeline on tmp_path, and the pipeline alone fed by hand."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

import agent
from agent.attribution import Attributor
from agent.events import (
    Action,
    AttributionMethod,
    DestinationClass,
    DetectionMethod,
)
from agent.index import FileHasher, HashFailure, HashOutcome, StatOutcome
from agent.pipeline import GapReason
from agent.watcher import ObservationKind, Role
from tests.agent.pipeline_harness import (
    STICK,
    TIMEOUT,
    XATTR,
    FakeClock,
    labelled,
)

# See test_watcher.py: this watchdog warning, raised as an error, kills its reader thread.
pytestmark = pytest.mark.filterwarnings("ignore:Callback with id:RuntimeWarning")


# the walking-skeleton scenario


def test_25_labelled_copies_with_cp_and_shutil_copy_are_25_copy_events(dirs, harness) -> None:
    sources: dict[bytes, bytes] = {}
    for i in range(25):
        data = os.urandom(1000 + 997 * i)
        sources[b"doc%02d.xlsx" % i] = data
        labelled(dirs.sensitive / f"doc{i:02d}.xlsx", data)
    for i in range(5):
        labelled(dirs.sensitive / f"public{i}.txt", os.urandom(2000 + i), label=None)
    barrier = labelled(dirs.sensitive / "barrier.bin", os.urandom(777))
    h = harness(attributor=Attributor(budget=0.02))
    h.start()
    assert len(h.index) == 26

    for i, name in enumerate(sorted(sources)):
        src, dst = dirs.sensitive / os.fsdecode(name), dirs.usb / os.fsdecode(name)
        if i % 2:
            shutil.copy(src, dst)
        else:
            subprocess.run(["cp", src, dst], check=True)
    for i in range(5):
        subprocess.run(["cp", dirs.sensitive / f"public{i}.txt", dirs.usb], check=True)
    subprocess.run(["cp", barrier, dirs.usb], check=True)
    # Observations are queued in order: once the barrier's event is out, everything
    # before it was taken off the queue, and stop() lets the workers finish.
    h.wait_copy_to(dirs.usb / "barrier.bin")
    h.stop()

    copies = [e for e in h.copies() if e.destination and e.destination.path.endswith(b".xlsx")]
    assert len(h.copies()) == 26
    assert len(copies) == 25
    assert len({e.event_id for e in h.seen}) == len(h.seen)
    assert not [e for e in h.seen if e.action is Action.COVERAGE_GAP]
    by_name = {os.path.basename(e.destination.path): e for e in copies if e.destination}
    assert set(by_name) == set(sources)
    for name, data in sources.items():
        event = by_name[name]
        assert event.action is Action.COPY
        assert event.source is not None
        assert event.destination is not None
        assert event.source.path == os.fsencode(dirs.sensitive) + b"/" + name
        assert event.destination.path == os.fsencode(dirs.usb) + b"/" + name
        assert event.label == "confidential"
        assert event.label_source == "xattr"
        assert event.source.size == event.destination.size == len(data)
        assert event.source.sha256 == event.destination.sha256 == hashlib.sha256(data).hexdigest()
        assert event.destination_class is DestinationClass.REMOVABLE
        assert event.device == STICK
        assert event.detection is DetectionMethod.EXACT_HASH
        assert event.host == "ws-test"
        assert event.agent_version == agent.__version__
        assert event.observed_at_ns > 0
        event_id = uuid.UUID(event.event_id)
        assert (event_id.version, event_id.int >> 80) == (7, event.observed_at_ns // 10**6)
        assert event.attribution in (AttributionMethod.PROC_SCAN, AttributionMethod.FILE_OWNER)
        assert event.user.login
    stats = h.pipeline.stats()
    assert stats.copies == 26
    assert (stats.vanished, stats.unreadable, stats.queue_drops) == (0, 0, 0)
    # copies became index entries
    assert len(h.index) == 52


# skipped files


class VictimHasher:
    """A real hasher, except for one path: deleted just before hashing, or unreadable."""

    def __init__(self, victim: bytes, mode: str) -> None:
        self.real = FileHasher(2**31)
        self.victim = victim
        self.mode = mode

    def stat(self, path: bytes) -> StatOutcome:
        return self.real.stat(path)

    def hash_file(self, path: bytes, expect: os.stat_result | None = None) -> HashOutcome:
        if path == self.victim:
            if self.mode == "unreadable":
                return HashOutcome(failure=HashFailure.UNREADABLE)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        return self.real.hash_file(path, expect)


def test_a_file_deleted_mid_way_is_skipped_and_counted(dirs, harness) -> None:
    a = labelled(dirs.sensitive / "a.pdf", os.urandom(5000))
    b = labelled(dirs.sensitive / "b.pdf", os.urandom(6000))
    h = harness(hasher=VictimHasher(os.fsencode(dirs.usb / "a.pdf"), "delete"))
    h.start()
    subprocess.run(["cp", a, dirs.usb], check=True)
    subprocess.run(["cp", b, dirs.usb], check=True)
    h.wait_copy_to(dirs.usb / "b.pdf")
    h.stop()
    assert [os.path.basename(e.destination.path) for e in h.copies() if e.destination] == [b"b.pdf"]
    assert h.pipeline.stats().vanished >= 1
    assert h.pipeline.alive is False  # stopped cleanly, not crashed
    assert h.pipeline.failure is None


def test_an_unreadable_file_is_a_coverage_gap(dirs, harness) -> None:
    a = labelled(dirs.sensitive / "a.pdf", os.urandom(5000))
    victim = os.fsencode(dirs.usb / "a.pdf")
    h = harness(hasher=VictimHasher(victim, "unreadable"), with_watcher=False)
    h.start()
    shutil.copy(a, dirs.usb / "a.pdf")
    h.put(ObservationKind.CLOSED_WRITE, dirs.usb / "a.pdf")
    gap = h.wait_gap(GapReason.UNREADABLE_FILE)
    assert gap.action is Action.COVERAGE_GAP
    assert gap.gap is not None
    assert gap.gap.count == 1
    assert gap.host == "ws-test"
    assert h.pipeline.stats().unreadable == 1
    assert h.copies() == []


# copy tools and destinations


def test_rsync_is_one_copy_event_for_the_final_name(dirs, harness) -> None:
    if shutil.which("rsync") is None:
        pytest.skip("rsync is not installed")
    src = labelled(dirs.sensitive / "plan.pdf", os.urandom(40_000))
    barrier = labelled(dirs.sensitive / "barrier", os.urandom(99))
    h = harness()
    h.start()
    subprocess.run(["rsync", "-a", src, dirs.usb / "plan.pdf"], check=True)
    event = h.wait_copy_to(dirs.usb / "plan.pdf")
    shutil.copy(barrier, dirs.usb)
    h.wait_copy_to(dirs.usb / "barrier")
    h.stop()
    assert event.action is Action.COPY
    assert len(h.copies()) == 2


def test_cp_r_of_a_labelled_tree_finds_every_file(dirs, harness) -> None:
    tree = dirs.sensitive / "project"
    (tree / "a" / "b").mkdir(parents=True)
    names = ["f0", "f1", "a/f2", "a/f3", "a/b/f4", "a/b/f5"]
    for i, name in enumerate(names):
        labelled(tree / name, os.urandom(3000 + i))
    h = harness()
    h.start()
    subprocess.run(["cp", "-r", tree, dirs.usb], check=True)
    for name in names:
        h.wait_copy_to(dirs.usb / "project" / name)
    h.stop()
    assert len(h.copies()) == len(names)


def test_mv_of_a_labelled_file_into_the_destination_is_a_move(dirs, harness) -> None:
    src = labelled(dirs.sensitive / "plan.pdf", os.urandom(4000))
    h = harness()
    h.start()
    os.rename(src, dirs.usb / "plan.pdf")
    event = h.wait_copy_to(dirs.usb / "plan.pdf")
    assert event.action is Action.MOVE
    assert event.source is not None
    assert event.source.path == os.fsencode(src)


def test_copies_of_copies_and_renames_inside_the_destination(dirs, harness) -> None:
    src = labelled(dirs.sensitive / "plan.pdf", os.urandom(4000), label=b"secret")
    barrier = labelled(dirs.sensitive / "barrier", os.urandom(99))
    h = harness()
    h.start()
    shutil.copy(src, dirs.usb / "one.pdf")
    h.wait_copy_to(dirs.usb / "one.pdf")
    (dirs.usb / "sub").mkdir()
    shutil.copy(dirs.usb / "one.pdf", dirs.usb / "sub" / "two.pdf")
    second = h.wait_copy_to(dirs.usb / "sub" / "two.pdf")
    assert second.source is not None
    assert second.source.path == os.fsencode(src)  # the original, while it exists
    assert second.label == "secret"
    os.rename(dirs.usb / "one.pdf", dirs.usb / "renamed.pdf")  # not a new copy
    shutil.copy(barrier, dirs.usb)
    h.wait_copy_to(dirs.usb / "barrier")
    h.stop()
    assert len(h.copies()) == 3
    assert h.index.get_path(os.fsencode(dirs.usb / "renamed.pdf")) is not None


def test_non_utf8_destination_names_travel_as_bytes(dirs, harness) -> None:
    src = labelled(dirs.sensitive / "plan.pdf", os.urandom(4000))
    h = harness()
    h.start()
    name = os.fsencode(dirs.usb) + b"/bad_\xff\xfe.txt"
    shutil.copy(os.fsencode(src), name)
    event = h.wait_copy_to(Path(os.fsdecode(name)))
    assert event.destination is not None
    assert event.destination.path == name


# sensitive roots follow changes


def test_sensitive_root_changes_update_the_index(dirs, harness) -> None:
    (dirs.sensitive / "board").mkdir()
    h = harness()
    h.start()
    minutes = dirs.sensitive / "board" / "minutes.txt"
    minutes.write_bytes(os.urandom(1234))  # labelled by the path rule
    deadline = time.monotonic() + TIMEOUT
    key = os.fsencode(minutes)
    while h.index.get_path(key) is None and time.monotonic() < deadline:
        time.sleep(0.01)  # polling the index with a deadline
    entry = h.index.get_path(key)
    assert entry is not None
    assert (entry.label, entry.label_source) == ("secret", "path")
    shutil.copy(minutes, dirs.usb / "m.txt")
    assert h.wait_copy_to(dirs.usb / "m.txt").label == "secret"
    minutes.unlink()
    while h.index.get_path(key) is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert h.index.get_path(key) is None


def test_a_copy_seen_before_its_source_was_indexed_is_still_reported(dirs, harness) -> None:
    (dirs.sensitive / "board").mkdir()
    h = harness(with_watcher=False)
    h.start()
    minutes = dirs.sensitive / "board" / "minutes.txt"
    minutes.write_bytes(os.urandom(1234))  # labelled by the path rule, not indexed yet
    shutil.copy(minutes, dirs.usb / "m.txt")
    h.put(ObservationKind.CLOSED_WRITE, dirs.usb / "m.txt")
    h.wait(lambda seen: h.pipeline.stats().observations == 1)
    assert h.copies() == []
    h.put(ObservationKind.CLOSED_WRITE, minutes, Role.SENSITIVE)
    event = h.wait_copy_to(dirs.usb / "m.txt")
    assert event.source is not None
    assert event.source.path == os.fsencode(minutes)


def test_a_label_set_after_writing_is_picked_up(dirs, harness) -> None:
    h = harness()
    h.start()
    path = dirs.sensitive / "later.pdf"
    path.write_bytes(os.urandom(2222))
    os.setxattr(path, XATTR, b"secret")  # labelling tools do this on existing files
    deadline = time.monotonic() + TIMEOUT
    while h.index.get_path(os.fsencode(path)) is None and time.monotonic() < deadline:
        time.sleep(0.01)  # polling the index with a deadline
    entry = h.index.get_path(os.fsencode(path))
    assert entry is not None
    assert (entry.label, entry.label_source) == ("secret", "xattr")
    os.removexattr(path, XATTR)
    while h.index.get_path(os.fsencode(path)) is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert h.index.get_path(os.fsencode(path)) is None


# coverage gaps and rescans (the pipeline fed by hand, time controlled)


def test_inotify_overflow_is_a_gap_and_a_rescan_finds_missed_copies(dirs, harness) -> None:
    src = labelled(dirs.sensitive / "plan.pdf", os.urandom(4000))
    h = harness(with_watcher=False)
    h.start()
    shutil.copy(src, dirs.usb / "missed.pdf")  # nobody saw it
    h.put(ObservationKind.OVERFLOW, b"")
    gap = h.wait_gap(GapReason.INOTIFY_OVERFLOW)
    assert gap.gap is not None
    assert gap.gap.count == 1
    h.wait_copy_to(dirs.usb / "missed.pdf")
    assert h.pipeline.stats().rescans >= 2  # the first scan, then the one after the overflow
    h.put(ObservationKind.OVERFLOW, b"")  # a second rescan reports nothing new
    h.stop()
    assert len(h.copies()) == 1


def test_gaps_are_rate_limited_per_reason_with_counts(dirs, harness) -> None:
    clock = FakeClock()
    h = harness(with_watcher=False, clock=clock)
    h.start()
    for _ in range(3):
        h.put(ObservationKind.OVERFLOW, b"")
    first = h.wait_gap(GapReason.INOTIFY_OVERFLOW)
    assert first.gap is not None
    assert first.gap.count == 1
    h.wait(lambda seen: h.pipeline.stats().observations == 3)
    assert len([e for e in h.seen if e.gap]) == 1
    clock.advance(1.0)
    h.wait(lambda seen: len([e for e in seen if e.gap]) == 2)
    assert [e.gap.count for e in h.seen if e.gap] == [1, 2]


def test_queue_drops_are_a_gap_with_the_count(dirs, harness) -> None:
    pending = [7]

    def drops() -> int:
        n, pending[0] = pending[0], 0
        return n

    h = harness(with_watcher=False, drops=drops)
    h.start()
    gap = h.wait_gap(GapReason.QUEUE_OVERFLOW)
    assert gap.gap is not None
    assert gap.gap.count == 7
    assert h.pipeline.stats().queue_drops == 7


def test_watch_lost_is_a_gap(dirs, harness) -> None:
    h = harness(with_watcher=False)
    h.start()
    h.put(ObservationKind.WATCH_LOST, dirs.usb)
    h.wait_gap(GapReason.WATCH_LOST)


def test_a_temp_file_never_renamed_is_reported_after_the_grace_period(dirs, harness) -> None:
    clock = FakeClock()
    src = labelled(dirs.sensitive / "plan.pdf", os.urandom(4000))
    h = harness(with_watcher=False, clock=clock)
    h.start()
    shutil.copy(src, dirs.usb / "plan.pdf.tmp")
    h.put(ObservationKind.CLOSED_WRITE, dirs.usb / "plan.pdf.tmp")
    h.put(ObservationKind.CLOSED_NO_WRITE, dirs.usb / "plan.pdf.tmp")
    h.wait(lambda seen: h.pipeline.stats().observations == 2)
    assert h.copies() == []
    clock.advance(10.0)
    event = h.wait_copy_to(dirs.usb / "plan.pdf.tmp")
    assert event.action is Action.COPY


def test_fanotify_overflows_are_a_gap_with_the_count_and_no_rescan(dirs, harness) -> None:
    """fanotify only attributes: its overflow loses pids, not files (inotify saw them)."""
    pending = [3]

    def overflows() -> int:
        n, pending[0] = pending[0], 0
        return n

    h = harness(with_watcher=False, overflows=overflows)
    h.start()
    gap = h.wait_gap(GapReason.FANOTIFY_OVERFLOW)
    assert gap.gap is not None
    assert gap.gap.reason == "fanotify_overflow"
    assert gap.gap.count == 3
    pending[0] = 2  # counted again after stop's last look
    h.stop()
    assert [e.gap.count for e in h.seen if e.gap] == [3, 2]
    stats = h.pipeline.stats()
    assert (stats.fanotify_overflows, stats.rescans) == (5, 1)  # the first scan only


def test_stop_flushes_pending_gaps(dirs, harness) -> None:
    clock = FakeClock()
    h = harness(with_watcher=False, clock=clock)
    h.start()
    h.put(ObservationKind.WATCH_LOST, dirs.usb)
    h.put(ObservationKind.WATCH_LOST, dirs.usb)
    h.wait(lambda seen: h.pipeline.stats().observations == 2)
    h.stop()
    assert [e.gap.count for e in h.seen if e.gap] == [1, 1]
