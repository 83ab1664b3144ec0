"""agent.attribution: a real process holding a file open, and the file-owner fallback."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from agent.attribution import Attributor, user_name
from agent.events import AttributionMethod, ProcessInfo, UserInfo
from agent.fanotify import Access, MarkScope
from agent.proccache import ProcessFacts

HOLDER = (
    "import sys; f = open(sys.argv[1], sys.argv[2]); print('ready', flush=True); sys.stdin.read()"
)


@pytest.fixture
def holder(tmp_path: Path):
    """Factory: a child process that keeps `path` open in `mode` until the test ends."""
    children: list[subprocess.Popen[str]] = []

    def spawn(path: Path, mode: str) -> subprocess.Popen[str]:
        child = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(path), mode],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        children.append(child)
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        return child

    yield spawn
    for child in children:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(timeout=10)
        assert child.stdout is not None
        child.stdout.close()


def test_a_process_holding_the_file_open_for_writing_is_found(tmp_path, holder) -> None:
    path = tmp_path / "copy.pdf"
    path.write_bytes(b"data")
    child = holder(path, "ab")
    process, user, method = Attributor(budget=5.0).attribute(os.fsencode(path), os.stat(path))
    assert method is AttributionMethod.PROC_SCAN
    assert process is not None
    assert process.pid == child.pid
    expected_start = round(psutil.Process(child.pid).create_time() * 1e9)
    assert process.start_time_ns == expected_start
    assert process.exe == os.fsencode(psutil.Process(child.pid).exe())
    assert process.cmdline[-2:] == (os.fsencode(path), b"ab")
    assert process.ppid_chain[0] == os.getpid()
    assert process.name
    assert user.effective == pwd.getpwuid(os.geteuid()).pw_name
    assert user.uid == os.getuid()
    assert user.login


def test_a_writer_wins_over_a_reader(tmp_path, holder) -> None:
    path = tmp_path / "copy.pdf"
    path.write_bytes(b"data")
    writer = holder(path, "ab")
    holder(path, "rb")  # newer pid, scanned first, but only reading
    process, _, _ = Attributor(budget=5.0).attribute(os.fsencode(path), os.stat(path))
    assert process is not None
    assert process.pid == writer.pid


def test_nobody_holding_it_falls_back_to_the_file_owner(tmp_path) -> None:
    path = tmp_path / "copy.pdf"
    path.write_bytes(b"data")
    st = os.stat(path)
    process, user, method = Attributor().attribute(os.fsencode(path), st)
    assert (process, method) == (None, AttributionMethod.FILE_OWNER)
    assert user.uid == st.st_uid
    assert user.login == user.effective == user_name(st.st_uid)


def test_an_exhausted_budget_or_vanished_processes_never_raise(tmp_path, holder) -> None:
    path = tmp_path / "copy.pdf"
    path.write_bytes(b"data")
    holder(path, "ab")
    st = os.stat(path)
    assert Attributor(budget=0.0).attribute(os.fsencode(path), st)[2] in (
        AttributionMethod.FILE_OWNER,
        AttributionMethod.PROC_SCAN,
    )
    gone = Attributor(pids=lambda: [2**22 + 12345])
    assert gone.attribute(os.fsencode(path), st)[2] is AttributionMethod.FILE_OWNER


def test_unknown_uid_is_shown_as_a_number() -> None:
    assert user_name(2**31 - 7) == str(2**31 - 7)


# The tiers in order, with a fake fanotify (the real one: tests/agent/test_fanotify.py).

WRITER = ProcessInfo(pid=4321, start_time_ns=17, exe=b"/usr/bin/cp", name="cp")
ALICE = UserInfo(login="alice", effective="root", uid=0)


def facts(process: ProcessInfo, user: UserInfo) -> ProcessFacts:
    return ProcessFacts(process, user, start_ticks=1, complete=True)


class FakeAccessLog:
    """Records by inode, as agent.fanotify.Fanotify keeps them; counts flushes."""

    def __init__(self) -> None:
        self.writers: dict[tuple[int, int], Access] = {}
        self.readers: dict[tuple[int, int], Access] = {}
        self.queued: dict[tuple[int, int], Access] = {}
        """Reads still in the queue: recorded by the next flush."""
        self.flushes = 0
        self.stopped = False

    def last_writer(self, dev: int, ino: int) -> Access | None:
        return self.writers.get((dev, ino))

    def last_reader(self, dev: int, ino: int) -> Access | None:
        return self.readers.get((dev, ino))

    def flush(self, timeout: float) -> bool:
        self.flushes += 1
        self.readers.update(self.queued)
        self.queued.clear()
        return True

    def take_overflows(self) -> int:
        return 0

    def mark(self, path: bytes, mask: int, scope: MarkScope = MarkScope.MOUNT) -> None:
        pass

    def add_scope(self, prefix: bytes) -> None:
        pass

    def stop(self, timeout: float = 5.0) -> None:
        self.stopped = True


@pytest.fixture
def written(tmp_path: Path) -> tuple[bytes, os.stat_result]:
    path = tmp_path / "copy.pdf"
    path.write_bytes(b"data")
    return os.fsencode(path), os.stat(path)


def test_a_fanotify_record_answers_first(written) -> None:
    path, st = written
    log = FakeAccessLog()
    log.writers[(st.st_dev, st.st_ino)] = Access(4321, facts(WRITER, ALICE), path, 0.0)
    attributor = Attributor(fanotify=log, pids=lambda: pytest.fail("no /proc scan needed"))
    assert attributor.attribute(path, st) == (WRITER, ALICE, AttributionMethod.FANOTIFY)
    assert log.flushes == 0
    attributor.close()
    assert log.stopped


def test_a_record_without_facts_still_gives_the_exact_pid(written) -> None:
    path, st = written
    log = FakeAccessLog()
    log.writers[(st.st_dev, st.st_ino)] = Access(4321, None, path, 0.0)
    log.readers[(st.st_dev, st.st_ino)] = Access(4322, None, path, 0.0)
    attributor = Attributor(fanotify=log)
    process, user, method = attributor.attribute(path, st)
    assert (process, method) == (ProcessInfo(pid=4321, start_time_ns=0), AttributionMethod.FANOTIFY)
    assert user.uid == st.st_uid  # the new file's owner: whoever created it
    process, user, method = attributor.reader_of(path, st)
    assert (process, user, method) == (
        ProcessInfo(pid=4322, start_time_ns=0),
        UserInfo(),
        AttributionMethod.FANOTIFY,
    )


def test_a_record_older_than_the_observation_is_checked_against_the_queue(written) -> None:
    """Labelled files are read by many in turn: the last record may be the one before."""
    path, st = written
    key = (st.st_dev, st.st_ino)
    log = FakeAccessLog()
    log.readers[key] = Access(4321, facts(WRITER, ALICE), path, 1.0)  # read at 1.0
    reader = ProcessInfo(pid=5555, start_time_ns=9, exe=b"/usr/bin/cat")
    log.queued[key] = Access(5555, facts(reader, ALICE), path, 5.0)  # observed at 4.0
    attributor = Attributor(fanotify=log)
    assert attributor.reader_of(path, st, seen_at=0.5)[0] == WRITER  # fresh enough
    assert log.flushes == 0
    assert attributor.reader_of(path, st, seen_at=4.0)[0] == reader
    assert log.flushes == 1


def test_no_record_waits_for_the_reader_then_falls_to_the_lower_tiers(written) -> None:
    path, st = written
    log = FakeAccessLog()
    attributor = Attributor(fanotify=log)
    assert attributor.attribute(path, st)[2] is AttributionMethod.FILE_OWNER
    assert attributor.reader_of(path, st) == (None, UserInfo(), AttributionMethod.UNATTRIBUTED)
    assert log.flushes == 2


def test_a_holder_seen_at_open_answers_after_it_has_gone(tmp_path, holder) -> None:
    path = tmp_path / "copy.pdf"
    path.write_bytes(b"data")
    st = os.stat(path)
    attributor = Attributor(budget=5.0)
    child = holder(path, "ab")
    attributor.note_open(os.fsencode(path), st)
    assert child.stdin is not None
    child.stdin.close()
    child.wait(timeout=10)
    process, _, method = attributor.attribute(os.fsencode(path), st)
    assert method is AttributionMethod.PROCESS_CACHE
    assert process is not None and process.pid == child.pid
    # Nobody held the other file when it was opened: nothing remembered for it.
    other = tmp_path / "other.pdf"
    other.write_bytes(b"x")
    attributor.note_open(os.fsencode(other), os.stat(other))
    assert attributor.attribute(os.fsencode(other), os.stat(other))[2] is (
        AttributionMethod.FILE_OWNER
    )


def test_reader_of_finds_a_reader_still_holding_the_file(tmp_path, holder) -> None:
    path = tmp_path / "minutes.pdf"
    path.write_bytes(b"data")
    child = holder(path, "rb")
    process, _, method = Attributor(budget=5.0).reader_of(os.fsencode(path), os.stat(path))
    assert method is AttributionMethod.PROC_SCAN
    assert process is not None and process.pid == child.pid
