"""agent.fanmarks: fanotify marks per directory (and per filesystem for a stick), real fanotify.

Needs root (CAP_SYS_ADMIN). Files are written by child processes: the group ignores
the agent's own pid, and a child's events are the ones a user's copier causes.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.attribution import Attributor, open_attributor
from agent.errors import FanotifyError
from agent.events import AttributionMethod
from agent.fanmarks import FanotifyMarks
from agent.fanotify import Fanotify
from agent.mounts import read_mounts
from agent.proccache import ProcessCache
from agent.watcher import Role, Watcher
from tests.procs import ROOT, wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="fanotify needs root")

TIMEOUT = 15.0
WRITER = textwrap.dedent(
    """
    import os, sys
    folder, n = sys.argv[1], int(sys.argv[2])
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        with open(os.path.join(folder, f"f{i}"), "wb") as f:
            f.write(b"x")
    """
)


def b(path: Path) -> bytes:
    return os.fsencode(path)


def write_files(folder: Path, n: int) -> None:
    """`n` small files written (open, write, close) by a child process."""
    subprocess.run([sys.executable, "-c", WRITER, str(folder), str(n)], check=True)


def cp(src: Path, dst: Path) -> int:
    child = subprocess.Popen(["cp", str(src), str(dst)])
    assert child.wait(timeout=10) == 0
    return child.pid


class Group:
    """A fanotify group marked as the service marks it, and what it received."""

    def __init__(self, scope: list[Path]) -> None:
        try:
            self.fan = Fanotify.open(
                ProcessCache(grace=60.0), scope=[b(p.resolve()) for p in scope]
            )
        except FanotifyError as e:
            pytest.skip(str(e))
        self.marks = FanotifyMarks(self.fan)
        self.fan.on_outside = self.marks.outside
        self.attributor = Attributor(fanotify=self.fan, marks=self.marks)

    def received(self, action: Callable[[], object]) -> int:
        """Events the group received while `action` ran (all queued ones handled)."""
        assert self.fan.flush(TIMEOUT)
        before = self.fan.events
        action()
        assert self.fan.flush(TIMEOUT)
        return self.fan.events - before


@pytest.fixture
def group() -> Iterator[Callable[[list[Path]], Group]]:
    made: list[Group] = []

    def make(scope: list[Path]) -> Group:
        made.append(Group(scope))
        return made[-1]

    yield make
    for g in made:
        g.fan.stop()
        assert not g.fan.alive


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A filesystem of its own (the "stick"), unmounted at the end."""
    point = tmp_path / "stick"
    point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "exfw-stick", point], check=True)
    try:
        yield point
    finally:
        subprocess.run(["umount", "-l", point], check=False)


def test_work_elsewhere_on_the_same_filesystem_reaches_nobody(tmp_path, group) -> None:
    """The idle cost: with a mount mark, every close on the disk woke the agent."""
    docs, usb, elsewhere = tmp_path / "docs", tmp_path / "usb", tmp_path / "elsewhere"
    for folder in (docs / "sub", usb / "sub", elsewhere):
        folder.mkdir(parents=True)
    assert os.stat(usb).st_dev == os.stat(elsewhere).st_dev == os.stat(docs).st_dev
    g = group([docs, usb])
    assert g.marks.add_root(b(docs), Role.SENSITIVE, own_filesystem=False)
    assert g.marks.add_root(b(usb), Role.DESTINATION, own_filesystem=True)  # not a mount
    assert g.marks.directories == 4
    assert g.marks.mounts == []
    g.fan.start()
    assert g.received(lambda: write_files(elsewhere, 200)) == 0
    assert g.received(lambda: write_files(usb / "sub", 200)) >= 200
    st = os.stat(usb / "sub" / "f199")
    assert g.fan.last_writer(st.st_dev, st.st_ino) is not None


def test_open_attributor_marks_folders_by_directory(tmp_path, group) -> None:
    docs, usb = tmp_path / "docs", tmp_path / "usb"
    (docs / "a" / "b").mkdir(parents=True)
    usb.mkdir()
    attributor = open_attributor([docs], [usb])
    try:
        assert attributor.fanotify
        marks = attributor.marks
        assert marks is not None
        assert (marks.directories, marks.mounts) == (4, [])
        source = docs / "a" / "b" / "minutes.pdf"
        source.write_bytes(os.urandom(1000))
        pid = cp(source, usb / "minutes.pdf")
        process, _, method = attributor.attribute(
            b(usb / "minutes.pdf"), os.stat(usb / "minutes.pdf")
        )
        assert method is AttributionMethod.FANOTIFY
        assert process is not None and process.pid == pid
        reader, _, how = attributor.reader_of(b(source), os.stat(source))
        assert how is AttributionMethod.FANOTIFY
        assert reader is not None and reader.pid == pid
    finally:
        attributor.close()


def test_new_directories_are_marked_as_the_watcher_reports_them(tmp_path, group) -> None:
    usb = tmp_path / "usb"
    usb.mkdir()
    g = group([usb])
    g.marks.add_root(b(usb), Role.DESTINATION, own_filesystem=False)
    g.fan.start()
    watcher = Watcher([(usb, Role.DESTINATION)], queue.Queue(), directories=g.attributor)
    watcher.start()
    try:
        deep = usb / "a" / "b" / "c"
        subprocess.run(["mkdir", "-p", str(deep)], check=True)
        wait_until(lambda: g.marks.directories == 4, TIMEOUT, "marks on the three new folders")
        source = tmp_path / "plan.pdf"
        source.write_bytes(os.urandom(3000))
        pid = cp(source, deep / "plan.pdf")
        process, _, method = g.attributor.attribute(
            b(deep / "plan.pdf"), os.stat(deep / "plan.pdf")
        )
        assert method is AttributionMethod.FANOTIFY
        assert process is not None and process.pid == pid
        subprocess.run(["rm", "-r", str(usb / "a")], check=True)
        wait_until(lambda: g.marks.directories == 1, TIMEOUT, "the deleted folders forgotten")
    finally:
        watcher.stop()


def test_refresh_marks_folders_made_before_anyone_reported_them(tmp_path, group) -> None:
    """The service marks, then starts the watcher: folders made in between need a refresh."""
    docs = tmp_path / "docs"
    docs.mkdir()
    g = group([docs])
    g.marks.add_root(b(docs), Role.SENSITIVE, own_filesystem=False)
    (docs / "late" / "later").mkdir(parents=True)
    assert g.marks.directories == 1
    assert g.marks.refresh() == 3
    assert g.marks.refresh() == 3  # marking twice changes nothing


def test_a_folder_moved_out_of_the_tree_is_unmarked_at_its_first_event(tmp_path, group) -> None:
    usb, elsewhere = tmp_path / "usb", tmp_path / "elsewhere"
    (usb / "out").mkdir(parents=True)
    elsewhere.mkdir()
    g = group([usb])
    g.marks.add_root(b(usb), Role.DESTINATION, own_filesystem=False)
    g.fan.start()
    assert g.marks.directories == 2
    os.rename(usb / "out", elsewhere / "out")
    g.marks.directory_deleted(b(usb / "out"))  # what the watcher reports for a move out
    assert g.marks.directories == 1
    assert 1 <= g.received(lambda: write_files(elsewhere / "out", 1)) <= 2  # open, close
    assert g.received(lambda: write_files(elsewhere / "out", 100)) == 0  # unmarked


def test_a_filesystem_of_its_own_is_marked_whole(tmp_path, group, tmpfs) -> None:
    g = group([tmpfs])
    assert g.marks.add_root(b(tmpfs), Role.DESTINATION, own_filesystem=True)
    assert (g.marks.directories, g.marks.mounts) == (0, [b(tmpfs.resolve())])
    g.fan.start()
    deep = tmpfs / "x" / "y"
    deep.mkdir(parents=True)  # nobody tells the marks: the filesystem mark covers it
    g.marks.directory_created(b(deep), Role.DESTINATION)
    assert g.marks.directories == 0
    source = tmp_path / "plan.pdf"
    source.write_bytes(os.urandom(3000))
    pid = cp(source, deep / "plan.pdf")
    process, _, method = g.attributor.attribute(b(deep / "plan.pdf"), os.stat(deep / "plan.pdf"))
    assert method is AttributionMethod.FANOTIFY
    assert process is not None and process.pid == pid
    g.marks.unmounted(b(tmpfs))
    assert g.marks.mounts == []


def test_a_bind_mount_of_a_folder_on_the_root_filesystem_is_marked_by_directory(
    tmp_path, group
) -> None:
    folder, bound = tmp_path / "folder", tmp_path / "bound"
    (folder / "sub").mkdir(parents=True)
    bound.mkdir()
    if os.stat(tmp_path).st_dev != os.stat("/").st_dev:
        pytest.skip("the temporary folder is not on the root filesystem")
    subprocess.run(["mount", "--bind", folder, bound], check=True)
    try:
        assert any(m.mount_point == b(bound) and m.root != b"/" for m in read_mounts())
        g = group([bound])
        g.marks.add_root(b(bound), Role.DESTINATION, own_filesystem=True)
        assert (g.marks.directories, g.marks.mounts) == (2, [])
    finally:
        subprocess.run(["umount", bound], check=True)


def test_a_filesystem_mark_sees_writes_from_another_mount_namespace(tmp_path, tmpfs) -> None:
    """The systemd unit runs the agent in its own mount namespace (ProtectSystem=,
    PrivateMounts=): a mount mark there sees nothing a user writes through the host's
    mount. Here the agent's side runs under `unshare -m`, the writer in ours."""
    script = textwrap.dedent(
        """
        import os, sys
        from agent.fanmarks import FanotifyMarks
        from agent.fanotify import Fanotify
        from agent.proccache import ProcessCache
        from agent.watcher import Role
        stick = os.fsencode(sys.argv[1])
        fan = Fanotify.open(ProcessCache(), scope=[stick])
        marks = FanotifyMarks(fan)
        marks.add_root(stick, Role.DESTINATION, own_filesystem=True)
        fan.start()
        print("ready", flush=True)
        sys.stdin.readline()
        fan.flush(10)
        print(fan.events, flush=True)
        fan.stop()
        """
    )
    child = subprocess.Popen(
        ["unshare", "-m", "--propagation", "slave", sys.executable, "-c", script, str(tmpfs)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        assert child.stdout.readline() == "ready\n"
        write_files(tmpfs / "out", 10)
        child.stdin.write("go\n")
        child.stdin.flush()
        assert int(child.stdout.readline()) >= 10
    finally:
        child.stdin.close()
        child.wait(timeout=10)
        child.stdout.close()


def test_overflows_are_counted_once_each_for_the_gap_report(tmp_path, group) -> None:
    usb = tmp_path / "usb"
    usb.mkdir()
    g = group([usb])
    g.marks.add_root(b(usb), Role.DESTINATION, own_filesystem=False)
    # Nobody reads while 2 x 17,000 events (open, close) are queued: past the
    # kernel's 16,384, so the queue overflows.
    write_files(usb, 17_000)
    g.fan.start()
    wait_until(lambda: g.fan.overflows, TIMEOUT, "the overflow event")
    assert g.fan.flush(TIMEOUT)
    taken = g.attributor.take_overflows()
    assert taken == g.fan.overflows >= 1
    assert g.attributor.take_overflows() == 0
