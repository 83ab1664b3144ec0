"""agent.fanotify: real fanotify, real cp/dd/python children, the descriptors it receives.

Needs root (CAP_SYS_ADMIN); the non-root test drops to nobody in a child process.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.attribution import Attributor, open_attributor
from agent.errors import FanotifyError
from agent.events import AttributionMethod
from agent.fanotify import READER_MASK, WRITER_MASK, Fanotify, MarkScope
from agent.proccache import ProcessCache
from tests.procs import ROOT, wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="fanotify needs root")

CP = os.fsencode(os.path.realpath(shutil.which("cp") or "/usr/bin/cp"))
DD = os.fsencode(os.path.realpath(shutil.which("dd") or "/usr/bin/dd"))
PYTHON = os.fsencode(os.path.realpath(sys.executable))


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    dest, sensitive = tmp_path / "usb", tmp_path / "docs"
    dest.mkdir()
    sensitive.mkdir()
    return dest, sensitive


@pytest.fixture
def fan(dirs: tuple[Path, Path]) -> Iterator[Fanotify]:
    """As the service sets it up: mount marks, recording only under the two folders."""
    dest, sensitive = dirs
    try:
        # A long grace: a loaded CI machine must not turn a slow test into a miss.
        fan = Fanotify.open(
            ProcessCache(grace=60.0),
            scope=[os.fsencode(dest.resolve()), os.fsencode(sensitive.resolve())],
        )
    except FanotifyError as e:
        pytest.skip(str(e))
    fan.mark(os.fsencode(dest), WRITER_MASK, MarkScope.MOUNT)
    fan.mark(os.fsencode(sensitive), READER_MASK, MarkScope.MOUNT)
    fan.start()
    yield fan
    fan.stop()
    assert not fan.alive


def holds_open(pid: int, path: Path) -> bool:
    """True once `pid` has `path` open: its open() returned, so the event is queued."""
    try:
        return any(
            os.readlink(f"/proc/{pid}/fd/{fd}") == str(path) for fd in os.listdir(f"/proc/{pid}/fd")
        )
    except OSError:
        return False


def copy_through_fifo(argv: list[str], fifo: Path, dest: Path, fan: Fanotify) -> int:
    """Run a copier that reads `fifo` and writes `dest`; release it once fanotify saw
    it open `dest`; return its pid after it has exited and been reaped."""
    os.mkfifo(fifo)
    child = subprocess.Popen(argv)
    with open(fifo, "wb") as feed:  # blocks until the copier opens its source
        wait_until(lambda: holds_open(child.pid, dest), 10, "the copier to open its destination")
        assert fan.flush(10)
        feed.write(os.urandom(5000))
    assert child.wait(timeout=10) == 0
    return child.pid


def test_cp_is_attributed_with_its_exe_after_it_has_exited(dirs, fan, tmp_path) -> None:
    dest, _ = dirs
    target = dest / "copy.pdf"
    pid = copy_through_fifo(
        ["cp", str(tmp_path / "fifo"), str(target)], tmp_path / "fifo", target, fan
    )
    process, user, method = Attributor(fanotify=fan).attribute(os.fsencode(target), os.stat(target))
    assert method is AttributionMethod.FANOTIFY
    assert process is not None
    assert process.pid == pid
    assert process.exe == CP
    assert process.cmdline == (b"cp", os.fsencode(tmp_path / "fifo"), os.fsencode(target))
    assert process.ppid_chain[0] == os.getpid()
    assert process.start_time_ns > 0
    assert user.uid == os.getuid()


def test_dd_is_attributed_with_its_exe_after_it_has_exited(dirs, fan, tmp_path) -> None:
    dest, _ = dirs
    target = dest / "image.bin"
    fifo = tmp_path / "fifo"
    pid = copy_through_fifo(["dd", f"if={fifo}", f"of={target}", "status=none"], fifo, target, fan)
    process, _, method = Attributor(fanotify=fan).attribute(os.fsencode(target), os.stat(target))
    assert method is AttributionMethod.FANOTIFY
    assert process is not None
    assert (process.pid, process.exe) == (pid, DD)


def test_a_plain_cp_always_gets_its_exact_pid(dirs, fan) -> None:
    # Unsynchronised: a 100-byte cp may be gone before the reader gets to it, so
    # the facts are best effort; the pid comes with the event and is always right.
    dest, sensitive = dirs
    source = sensitive / "minutes.docx"
    source.write_bytes(os.urandom(100))
    target = dest / "minutes.docx"
    cp = subprocess.Popen(["cp", str(source), str(target)])
    assert cp.wait(timeout=10) == 0
    attributor = Attributor(fanotify=fan)
    process, _, method = attributor.attribute(os.fsencode(target), os.stat(target))
    assert method is AttributionMethod.FANOTIFY
    assert process is not None
    assert process.pid == cp.pid
    assert process.exe in (CP, b"")
    if process.exe:
        assert process.name == "cp"
    # It was also the last reader of the source.
    reader, _, how = attributor.reader_of(os.fsencode(source), os.stat(source))
    assert how is AttributionMethod.FANOTIFY
    assert reader is not None and reader.pid == process.pid


def test_reader_of_names_a_python_child_that_read_a_labelled_file(dirs, fan) -> None:
    _, sensitive = dirs
    doc = sensitive / "board-minutes.pdf"
    doc.write_bytes(os.urandom(3000))
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; open(sys.argv[1], 'rb').read(); print('read', flush=True); "
            "sys.stdin.read()",
            str(doc),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None and child.stdin is not None
    assert child.stdout.readline() == "read\n"
    attributor = Attributor(fanotify=fan)
    process, user, method = attributor.reader_of(os.fsencode(doc), os.stat(doc))
    child.stdin.close()
    child.wait(timeout=10)
    child.stdout.close()
    assert method is AttributionMethod.FANOTIFY
    assert process is not None
    assert (process.pid, process.exe) == (child.pid, PYTHON)
    assert user.uid == os.getuid()
    # Still told after the reader has gone; and reading is not writing.
    assert attributor.reader_of(os.fsencode(doc), os.stat(doc))[0] == process
    assert fan.last_writer(os.stat(doc).st_dev, os.stat(doc).st_ino) is None


def test_the_agent_itself_and_paths_outside_the_scope_are_ignored(dirs, fan, tmp_path) -> None:
    dest, _ = dirs
    ours = dest / "hashed-by-the-agent"
    ours.write_bytes(b"x")  # this process: the agent's own workers write and read
    assert ours.read_bytes() == b"x"
    assert fan.flush(10)
    st = os.stat(ours)
    assert fan.last_writer(st.st_dev, st.st_ino) is None
    assert fan.last_reader(st.st_dev, st.st_ino) is None
    elsewhere = tmp_path / "elsewhere.txt"
    subprocess.run(["cp", str(ours), str(elsewhere)], check=True)
    assert fan.flush(10)
    st = os.stat(elsewhere)
    assert fan.last_writer(st.st_dev, st.st_ino) is None  # written outside the scope
    st = os.stat(ours)
    assert fan.last_reader(st.st_dev, st.st_ino) is not None  # cp read it, in the scope


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_every_event_descriptor_is_closed(dirs) -> None:
    dest, sensitive = dirs
    before = open_fds()
    # Its own group: measured after stop, when no event can be in flight.
    fan = Fanotify.open(ProcessCache(), scope=[os.fsencode(dest.resolve())])
    fan.mark(os.fsencode(dest), WRITER_MASK, MarkScope.MOUNT)
    fan.mark(os.fsencode(sensitive), READER_MASK, MarkScope.MOUNT)
    fan.start()
    writer = textwrap.dedent(
        """
        import os, sys
        for i in range(1000):
            with open(os.path.join(sys.argv[1], f"f{i}"), "wb") as f:
                f.write(b"x")
        """
    )
    try:
        subprocess.run([sys.executable, "-c", writer, str(dest)], check=True)
        assert fan.flush(30)
        assert fan.events >= 1000  # at least one per file (open and close may merge)
        st = os.stat(dest / "f999")
        assert fan.last_writer(st.st_dev, st.st_ino) is not None
    finally:
        fan.stop()
    assert open_fds() == before


def test_without_root_open_says_why_and_the_lower_tiers_still_work() -> None:
    script = textwrap.dedent(
        """
        import os, shutil, tempfile
        # Everything imported first: this Python's library may not be readable by nobody.
        from agent.attribution import open_attributor
        from agent.errors import FanotifyError
        from agent.fanotify import Fanotify
        from agent.proccache import ProcessCache
        os.setgid(65534); os.setuid(65534)
        try:
            Fanotify.open(ProcessCache())
        except FanotifyError as e:
            print("error:", e)
        folder = tempfile.mkdtemp()
        path = os.path.join(folder, "mine")
        open(path, "wb").close()
        attributor = open_attributor([], [])
        print("fanotify:", attributor.fanotify)
        _, user, method = attributor.attribute(os.fsencode(path), os.stat(path))
        print("method:", method.value, user.uid)
        shutil.rmtree(folder)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    ).stdout.splitlines()
    assert out == [
        "error: fanotify unavailable: needs CAP_SYS_ADMIN (root)",
        "fanotify: False",
        "method: file_owner 65534",
    ]


def test_open_attributor_as_root_marks_and_closes(dirs, caplog) -> None:
    dest, sensitive = dirs
    caplog.set_level(logging.INFO, logger="agent.attribution")
    attributor = open_attributor([sensitive], [dest])
    try:
        assert attributor.fanotify
        target = dest / "out.bin"
        subprocess.run(["cp", "/etc/hostname", str(target)], check=True)
        _, _, method = attributor.attribute(os.fsencode(target), os.stat(target))
        assert method is AttributionMethod.FANOTIFY
        assert attributor.mark_destination(os.fsencode(dest))
    finally:
        attributor.close()
    assert "attribution by fanotify" in caplog.text


def test_open_attributor_not_root_logs_once_that_it_is_best_effort(dirs, caplog) -> None:
    dest, sensitive = dirs
    caplog.set_level(logging.INFO, logger="agent.attribution")
    attributor = open_attributor([sensitive], [dest], euid=1000)
    assert not attributor.fanotify
    assert not attributor.mark_destination(os.fsencode(dest))
    attributor.close()
    best_effort = [r for r in caplog.records if "best effort" in r.getMessage()]
    assert len(best_effort) == 1 and best_effort[0].levelno == logging.INFO


def test_marking_a_missing_path_is_a_clear_error(fan, tmp_path) -> None:
    with pytest.raises(FanotifyError, match="missing"):
        fan.mark(os.fsencode(tmp_path / "missing"), WRITER_MASK, MarkScope.MOUNT)


def test_stop_is_prompt_and_flush_after_stop_says_no(dirs) -> None:
    fan = Fanotify.open(ProcessCache())
    fan.mark(os.fsencode(dirs[0]), WRITER_MASK, MarkScope.MOUNT)
    fan.start()
    assert fan.flush(10)
    fan.stop(timeout=5)
    assert not fan.alive
    assert not fan.flush(0.1)
    fan.stop()  # idempotent
