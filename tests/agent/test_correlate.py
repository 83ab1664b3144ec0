"""agent.correlate: same_process and probable decisions, with time passed in."""

from __future__ import annotations

import pytest

from agent.copy_detector import WrittenFile
from agent.correlate import Correlation, ReadCorrelator
from agent.events import DestinationClass, DetectionMethod, ProcessInfo, Sha256Hex, UserInfo
from agent.index import Entry

ALICE = UserInfo(login="alice", effective="alice", uid=1000)
BOB = UserInfo(login="bob", effective="bob", uid=1001)
EDITOR = ProcessInfo(pid=100, start_time_ns=5_000, exe=b"/usr/bin/libreoffice")
SHELL = ProcessInfo(pid=200, start_time_ns=6_000, exe=b"/usr/bin/bash")


def labelled(name: str, size: int, ino: int) -> Entry:
    return Entry(
        path=b"/home/alice/docs/" + name.encode(),
        size=size,
        mtime_ns=1,
        sha256=Sha256Hex("ab" * 32),
        label="secret",
        label_source="xattr",
        dev=1,
        ino=ino,
    )


def write(size: int, ino: int = 900) -> WrittenFile:
    return WrittenFile(
        path=b"/media/usb/out.bin",
        size=size,
        dev=2,
        ino=ino,
        mtime_ns=1,
        destination_class=DestinationClass.REMOVABLE,
    )


MINUTES = labelled("minutes.docx", 10_000, 1)
PAYROLL = labelled("payroll.xlsx", 52_000, 2)
BUDGET = labelled("budget.xlsx", 51_000, 3)


@pytest.fixture
def correlator() -> ReadCorrelator:
    return ReadCorrelator(same_process_window=300.0, probable_window=30.0, size_tolerance=0.01)


def test_the_writing_process_read_a_labelled_file(correlator) -> None:
    correlator.read(MINUTES, EDITOR, ALICE, now=0.0)
    correlator.read(PAYROLL, EDITOR, ALICE, now=1.0)
    # An export of another size (a PDF of the spreadsheet): closest in size wins.
    decided = correlator.decide(write(40_000), EDITOR, ALICE, now=100.0)
    assert decided == Correlation(write(40_000), PAYROLL, DetectionMethod.SAME_PROCESS, 1.0)


def test_same_process_only_within_its_window(correlator) -> None:
    correlator.read(PAYROLL, EDITOR, ALICE, now=0.0)
    assert correlator.decide(write(40_000), EDITOR, BOB, now=300.0) is not None
    assert correlator.decide(write(40_000), EDITOR, BOB, now=300.5) is None


def test_a_reused_pid_is_another_process(correlator) -> None:
    correlator.read(PAYROLL, EDITOR, ALICE, now=0.0)
    reused = ProcessInfo(pid=EDITOR.pid, start_time_ns=EDITOR.start_time_ns + 1)
    assert correlator.decide(write(40_000), reused, BOB, now=1.0) is None


def test_probable_when_the_same_user_read_a_file_of_about_that_size(correlator) -> None:
    correlator.read(MINUTES, EDITOR, ALICE, now=0.0)
    decided = correlator.decide(write(10_050), SHELL, ALICE, now=20.0)
    assert decided == Correlation(write(10_050), MINUTES, DetectionMethod.PROBABLE, 0.0)


@pytest.mark.parametrize(
    ("size", "user", "now"),
    [
        (10_101, ALICE, 20.0),  # more than 1 % bigger
        (9_899, ALICE, 20.0),  # more than 1 % smaller
        (10_000, BOB, 20.0),  # someone else
        (10_000, ALICE, 30.5),  # too long after
    ],
)
def test_probable_needs_size_user_and_time(correlator, size, user, now) -> None:
    correlator.read(MINUTES, EDITOR, ALICE, now=0.0)
    assert correlator.decide(write(size), SHELL, user, now=now) is None


def test_a_pid_without_its_start_time_is_the_same_process_only_for_seconds(correlator) -> None:
    # fanotify's pid of a copier gone before /proc could be read: exact, but reused
    # one day; within seconds it cannot have been (pids come in sequence).
    pid_only = ProcessInfo(pid=EDITOR.pid, start_time_ns=0)
    correlator.read(PAYROLL, pid_only, ALICE, now=0.0)
    assert correlator.decide(write(40_000), pid_only, ALICE, now=1.0) == Correlation(
        write(40_000), PAYROLL, DetectionMethod.SAME_PROCESS, 0.0
    )
    # The reader's start time known, the writer's not (or the other way round).
    correlator.read(MINUTES, SHELL, BOB, now=2.0)
    shell = ProcessInfo(pid=SHELL.pid, start_time_ns=0)
    assert (
        correlator.decide(write(9_000), shell, BOB, now=3.0).method is DetectionMethod.SAME_PROCESS
    )
    assert correlator.decide(write(40_000), EDITOR, BOB, now=3.0).source == PAYROLL
    # After the pid window only probable is left (same user, about the size).
    assert correlator.decide(write(40_000), pid_only, ALICE, now=10.5) is None
    assert correlator.decide(write(52_000), pid_only, ALICE, now=10.5) == Correlation(
        write(52_000), PAYROLL, DetectionMethod.PROBABLE, 0.0
    )


def test_a_shell_writing_what_its_child_read_is_the_same_process(correlator) -> None:
    # `sh -c 'base64 src > dest'`: dash opens dest and closes it last, base64 reads.
    shell = ProcessInfo(pid=300, start_time_ns=7_000, exe=b"/usr/bin/dash")
    base64 = ProcessInfo(pid=301, start_time_ns=7_001, exe=b"/usr/bin/base64", ppid_chain=(300, 1))
    correlator.read(PAYROLL, base64, ALICE, now=0.0)
    decided = correlator.decide(write(70_000), shell, ALICE, now=1.0)
    assert decided == Correlation(write(70_000), PAYROLL, DetectionMethod.SAME_PROCESS, 0.0)
    assert correlator.decide(write(70_000), shell, ALICE, now=10.5) is None  # not for long
    init_child = ProcessInfo(pid=302, start_time_ns=7_002, ppid_chain=(1,))
    correlator.read(MINUTES, init_child, BOB, now=20.0)
    assert correlator.decide(write(5), ProcessInfo(pid=1, start_time_ns=1), BOB, now=21.0) is None


def test_a_parent_that_is_no_shell_is_not_blamed_for_its_childs_reads(correlator) -> None:
    # A script running `cp secret /usb`, then writing its own log there.
    script = ProcessInfo(pid=400, start_time_ns=8_000, exe=b"/usr/bin/python3.11", name="python3")
    cp = ProcessInfo(pid=401, start_time_ns=8_001, exe=b"/usr/bin/cp", ppid_chain=(400,))
    correlator.read(PAYROLL, cp, ALICE, now=0.0)
    assert correlator.decide(write(70_000), script, BOB, now=1.0) is None
    # A shell whose child's read was spent on the child's own exact copy: nothing either.
    shell = ProcessInfo(pid=500, start_time_ns=9_000, exe=b"/usr/bin/bash", name="bash")
    cat = ProcessInfo(pid=501, start_time_ns=9_001, exe=b"/usr/bin/cat", ppid_chain=(500,))
    correlator.read(MINUTES, cat, ALICE, now=2.0)
    correlator.spend(MINUTES.key, cat, ALICE, until=3.0)
    assert correlator.decide(write(70_000), shell, BOB, now=3.5) is None


def test_a_read_explains_one_write_even_when_its_write_came_first(correlator) -> None:
    correlator.read(PAYROLL, EDITOR, ALICE, now=0.0)
    correlator.spend(PAYROLL.key, EDITOR, ALICE, until=2.0)  # its exact copy was reported
    assert correlator.decide(write(52_000), EDITOR, ALICE, now=3.0) is None
    # The read of another copy, handled after that copy's write: spent on arrival.
    correlator.spend(MINUTES.key, SHELL, BOB, until=12.0)
    correlator.read(MINUTES, SHELL, BOB, now=11.5)
    assert correlator.decide(write(10_000), SHELL, BOB, now=12.5) is None
    # A read after that is a new read.
    correlator.read(MINUTES, SHELL, BOB, now=13.0)
    assert correlator.decide(write(9_000), SHELL, BOB, now=14.0).source == MINUTES


def test_a_read_spent_by_a_writer_known_only_by_its_pid_stays_spent(correlator) -> None:
    correlator.read(PAYROLL, EDITOR, ALICE, now=0.0)  # filed under (pid, start time)
    gone = ProcessInfo(pid=EDITOR.pid, start_time_ns=0)  # its exact copy's writer
    correlator.spend(PAYROLL.key, gone, UserInfo(), until=1.0)
    assert correlator.decide(write(40_000), EDITOR, ALICE, now=2.0) is None


def test_a_read_spent_by_one_process_is_still_anothers_read(correlator) -> None:
    correlator.read(PAYROLL, SHELL, ALICE, now=0.0)
    correlator.spend(PAYROLL.key, SHELL, ALICE, until=2.0)  # alice's shell copied it exactly
    correlator.read(PAYROLL, EDITOR, ALICE, now=1.0)  # her editor read it too
    decided = correlator.decide(write(40_000), EDITOR, ALICE, now=3.0)
    assert decided is not None and decided.method is DetectionMethod.SAME_PROCESS
    assert correlator.decide(write(52_000), None, ALICE, now=3.0) is None  # probable: spent


def test_a_copy_by_an_unnamed_writer_spends_the_latest_read_of_its_source(correlator) -> None:
    # cp wrote into a folder fanotify had not marked yet: the copy's writer is unknown.
    correlator.read(PAYROLL, SHELL, BOB, now=0.0)
    correlator.read(PAYROLL, EDITOR, ALICE, now=1.0)
    correlator.spend(PAYROLL.key, None, ALICE, until=1.5)
    assert correlator.decide(write(40_000), EDITOR, ALICE, now=2.0) is None
    assert correlator.decide(write(40_000), SHELL, BOB, now=2.0) is not None  # not that one
    # Its read still on its way: the next read of the source is the copier's.
    correlator.spend(MINUTES.key, None, UserInfo(), until=3.5)
    correlator.read(MINUTES, EDITOR, ALICE, now=3.0)
    assert correlator.decide(write(9_000), EDITOR, ALICE, now=4.0) is None
    correlator.read(MINUTES, EDITOR, ALICE, now=5.0)  # a new read
    assert correlator.decide(write(9_000), EDITOR, ALICE, now=6.0) is not None


def test_a_read_after_the_write_explains_nothing(correlator) -> None:
    correlator.read(PAYROLL, EDITOR, ALICE, now=5.0)
    assert correlator.decide(write(52_000), EDITOR, ALICE, now=4.0) is None
    assert correlator.decide(write(52_000), EDITOR, ALICE, now=5.0) is not None


def test_probable_prefers_the_closest_size_then_the_latest_read(correlator) -> None:
    correlator.read(PAYROLL, None, ALICE, now=0.0)
    correlator.read(BUDGET, None, ALICE, now=1.0)
    assert correlator.decide(write(51_900), None, ALICE, now=2.0).source == PAYROLL
    again = labelled("payroll-copy.xlsx", 52_000, 4)
    correlator.read(again, None, ALICE, now=3.0)
    assert correlator.decide(write(52_000), None, ALICE, now=4.0).source == again


def test_a_file_is_never_the_source_of_itself(correlator) -> None:
    correlator.read(MINUTES, EDITOR, ALICE, now=0.0)
    itself = WrittenFile(
        path=MINUTES.path,
        size=MINUTES.size,
        dev=MINUTES.dev,
        ino=MINUTES.ino,
        mtime_ns=2,
        destination_class=DestinationClass.LOCAL,
    )
    assert correlator.decide(itself, EDITOR, ALICE, now=1.0) is None


def test_an_unknown_user_and_process_decide_nothing(correlator) -> None:
    correlator.read(MINUTES, None, UserInfo(), now=0.0)
    assert len(correlator) == 0
    assert correlator.decide(write(10_000), None, UserInfo(), now=1.0) is None


def test_memory_is_bounded_per_owner_and_in_owners() -> None:
    correlator = ReadCorrelator(per_owner=3, max_owners=2)
    for ino in range(10):
        correlator.read(labelled(f"f{ino}", 1000 + ino, ino), EDITOR, ALICE, now=float(ino))
    assert len(correlator) == 9  # 3 for the process, 3 for its pid, 3 for the user
    # Only the three latest are remembered: f0 (size 1000) is gone.
    decided = correlator.decide(write(1000), EDITOR, BOB, now=10.0)
    assert decided is not None and decided.source.ino == 7
    others = [ProcessInfo(pid=pid, start_time_ns=1) for pid in (1, 2, 3)]
    for i, proc in enumerate(others):
        correlator.read(MINUTES, proc, UserInfo(login=f"u{i}"), now=11.0)
    assert len(correlator) == 6  # two processes, two pids and two users, one read each
    assert correlator.decide(write(1000), EDITOR, BOB, now=12.0) is None


def test_expire_gives_memory_back(correlator) -> None:
    correlator.read(MINUTES, EDITOR, ALICE, now=0.0)
    correlator.read(PAYROLL, SHELL, BOB, now=100.0)
    correlator.expire(now=120.0)  # alice's read is past the probable window
    assert len(correlator) == 3
    correlator.expire(now=1000.0)
    assert len(correlator) == 0
