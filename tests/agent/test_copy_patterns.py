"""Every way a labelled file is copied into a destination, each with the real command.

A real watcher and pipeline watch a sensitive root and a destination on tmp_path;
each test copies one way and checks the one event it must produce, and how it was
decided. The event sequences these tools cause are in FIELD-NOTES §1.3.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.events import Action, DestinationClass, DetectionMethod, Event
from tests.agent.pipeline_harness import (
    STICK,
    Dirs,
    Harness,
    harness_factory,
    labelled,
    make_dirs,
)

pytestmark = pytest.mark.filterwarnings("ignore:Callback with id:RuntimeWarning")


def run(*args: str | Path) -> None:
    subprocess.run([str(a) for a in args], check=True, stdout=subprocess.DEVNULL)


def chunked(src: Path, dst: Path) -> None:
    """A program writing the copy itself, in small flushed writes."""
    data = src.read_bytes()
    with dst.open("wb") as f:
        for i in range(0, len(data), 4096):
            f.write(data[i : i + 4096])
            f.flush()


COPIERS: dict[str, Callable[[Path, Path], object]] = {
    "cp": lambda s, d: run("cp", s, d),
    "cp -a": lambda s, d: run("cp", "-a", s, d),
    "rsync -a": lambda s, d: run("rsync", "-a", s, d),
    "dd": lambda s, d: run("dd", f"if={s}", f"of={d}", "bs=64k", "status=none"),
    "cat a > b": lambda s, d: run("sh", "-c", 'cat "$1" > "$2"', "sh", s, d),
    "shutil.copy": shutil.copy,
    "shutil.copy2": shutil.copy2,
    "python chunked writes": chunked,
}


def only_copy(h: Harness, dest: Path) -> Event:
    """The one copy event for `dest` (after stop: nothing else came for it)."""
    target = os.fsencode(dest)
    events = [e for e in h.copies() if e.destination and e.destination.path == target]
    assert len(events) == 1, events
    return events[0]


def assert_exact_copy(event: Event, src: Path, dest: Path, label: str = "confidential") -> None:
    assert event.action is Action.COPY
    assert event.detection is DetectionMethod.EXACT_HASH
    assert event.label == label
    assert event.source is not None
    assert event.destination is not None
    assert event.source.path == os.fsencode(src)
    assert event.destination.path == os.fsencode(dest)
    assert event.source.sha256 == event.destination.sha256 != ""
    assert event.destination_class is DestinationClass.REMOVABLE
    assert event.device == STICK


@pytest.mark.parametrize("how", list(COPIERS))
def test_a_single_file_copy_is_one_exact_copy_event(dirs, harness, how: str) -> None:
    if how.startswith("rsync") and shutil.which("rsync") is None:
        pytest.skip("rsync is not installed")
    src = labelled(dirs.sensitive / "board-minutes.pdf", os.urandom(300_000))
    dest = dirs.usb / "board-minutes.pdf"
    h = harness()
    h.start()
    COPIERS[how](src, dest)
    h.wait_copy_to(dest)
    h.barrier()
    h.stop()
    assert_exact_copy(only_copy(h, dest), src, dest)
    assert len(h.copies()) == 2  # and the barrier's
    assert h.of(Action.COVERAGE_GAP) == []


def test_cp_r_of_a_tree_finds_files_in_new_subfolders(dirs, harness) -> None:
    # Files inside directories created by the copy arrive without a close event
    # (FIELD-NOTES §1.3): the new directory is looked into.
    tree = dirs.sensitive / "project"
    (tree / "a" / "b").mkdir(parents=True)
    names = ["f0", "a/f1", "a/b/f2", "a/b/f3"]
    for i, name in enumerate(names):
        labelled(tree / name, os.urandom(3000 + i))
    h = harness()
    h.start()
    run("cp", "-r", tree, dirs.usb)
    for name in names:
        h.wait_copy_to(dirs.usb / "project" / name)
    h.barrier()
    h.stop()
    for name in names:
        assert_exact_copy(
            only_copy(h, dirs.usb / "project" / name), tree / name, dirs.usb / "project" / name
        )
    assert len(h.copies()) == len(names) + 1


def test_mv_on_the_same_filesystem_is_a_move(dirs, harness) -> None:
    src = labelled(dirs.sensitive / "plan.pdf", os.urandom(4000))
    dest = dirs.usb / "plan.pdf"
    h = harness()
    h.start()
    run("mv", src, dirs.usb)
    event = h.wait_copy_to(dest)
    h.barrier()
    h.stop()
    assert only_copy(h, dest) is event
    assert event.action is Action.MOVE
    assert event.detection is DetectionMethod.EXACT_HASH
    assert event.source is not None
    assert event.source.path == os.fsencode(src)
    assert event.source.inode == event.destination.inode if event.destination else False
    assert h.of(Action.DELETE) == []  # the move is the whole story


@pytest.fixture
def stick(tmp_path: Path) -> Iterator[tuple[Dirs, Callable[..., Harness]]]:
    """The destination on its own filesystem: a tmpfs (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount_point = tmp_path / "stick"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "exfilwatch-test", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        dirs = make_dirs(tmp_path, usb=mount_point)
        factory = harness_factory(dirs)
        yield dirs, next(factory)
        next(factory, None)  # stops every harness, checks for leftover threads
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_mv_across_filesystems_is_a_copy_and_a_delete(stick) -> None:
    dirs, harness = stick
    src = labelled(dirs.sensitive / "plan.pdf", os.urandom(200_000))
    dest = dirs.usb / "plan.pdf"
    h = harness()
    h.start()
    assert os.stat(dirs.usb).st_dev != os.stat(dirs.sensitive).st_dev
    run("mv", src, dirs.usb)
    copy = h.wait_copy_to(dest)
    delete = h.wait_action(Action.DELETE, src)
    h.barrier()
    h.stop()
    assert only_copy(h, dest) is copy
    assert_exact_copy(copy, src, dest)
    assert delete.source is not None
    assert delete.source.sha256 == copy.source.sha256 if copy.source else False
    assert len(h.of(Action.DELETE)) == 1


def test_a_copy_renamed_inside_the_destination_is_one_copy_then_a_rename(dirs, harness) -> None:
    src = labelled(dirs.sensitive / "plan.pdf", os.urandom(4000))
    first, final = dirs.usb / "plan.pdf", dirs.usb / "holiday-photos.jpg"
    h = harness()
    h.start()
    run("cp", src, first)
    h.wait_copy_to(first)
    run("mv", first, final)
    h.wait_action(Action.RENAME, first)
    h.barrier()
    h.stop()
    copies = [e for e in h.copies() if e.destination and b"barrier-" not in e.destination.path]
    assert len(copies) == 1  # not a second copy under the new name
    assert_exact_copy(copies[0], src, first)
    (rename,) = h.of(Action.RENAME)
    assert rename.source is not None
    assert rename.destination is not None
    assert (rename.source.path, rename.destination.path) == (os.fsencode(first), os.fsencode(final))
    assert rename.label == "confidential"
    assert rename.destination_class is DestinationClass.REMOVABLE
    assert h.index.get_path(os.fsencode(final)) is not None  # copies of it are still caught


def test_a_copy_renamed_at_once_is_still_one_copy(dirs, harness) -> None:
    """Renamed before the agent looked: one copy, under whichever name it was decided."""
    src = labelled(dirs.sensitive / "plan.pdf", os.urandom(4000))
    first, final = dirs.usb / "plan.pdf", dirs.usb / "holiday-photos.jpg"
    h = harness()
    h.start()
    run("sh", "-c", 'cp "$1" "$2" && mv "$2" "$3"', "sh", src, first, final)
    h.barrier()
    h.stop()
    copies = [e for e in h.copies() if e.destination and b"barrier-" not in e.destination.path]
    assert len(copies) == 1
    assert copies[0].destination is not None
    if copies[0].destination.path == os.fsencode(first):  # decided before the rename
        assert len(h.of(Action.RENAME)) == 1
    else:
        assert_exact_copy(copies[0], src, final)
        assert h.of(Action.RENAME) == []


def test_a_copy_of_a_copy_inherits_the_label(dirs, harness) -> None:
    src = labelled(dirs.sensitive / "plan.pdf", os.urandom(4000), label=b"secret")
    one, two = dirs.usb / "one.pdf", dirs.usb / "sub" / "two.pdf"
    h = harness()
    h.start()
    run("cp", src, one)
    h.wait_copy_to(one)
    src.unlink()  # the original is gone: only the copy can say what two.pdf is
    h.wait_action(Action.DELETE, src)
    two.parent.mkdir()
    run("cp", one, two)
    second = h.wait_copy_to(two)
    h.barrier()
    h.stop()
    assert second.action is Action.COPY
    assert second.detection is DetectionMethod.EXACT_HASH
    assert second.label == "secret"  # inherited: cp dropped the xattr, the index kept it
    assert second.source is not None
    assert second.source.path == os.fsencode(one)
