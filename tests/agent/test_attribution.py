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
from agent.events import AttributionMethod

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
