"""agent.access and the pipeline's access events: reads (folded), deletes and renames.

The cores are fed by hand with time passed in; the pipeline runs with a real
watcher on tmp_path and real readers (`cat`, a Python child holding the file).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.access import Fold, OwnReads, ReadFolder, ReadKey, ReadPolicy, track_own_opens
from agent.attribution import Attributor, open_attributor
from agent.config import AccessConfig, load_config
from agent.errors import ConfigError
from agent.events import (
    Action,
    AttributionMethod,
    DestinationClass,
    Event,
    ProcessInfo,
    UserInfo,
)
from tests.agent.pipeline_harness import (
    Harness,
    labelled,
    wait_indexed,
)

pytestmark = pytest.mark.filterwarnings("ignore:Callback with id:RuntimeWarning")

ALICE = UserInfo(login="alice", effective="alice", uid=1000)
BOB = UserInfo(login="bob", effective="bob", uid=1001)
EDITOR = ProcessInfo(pid=42, start_time_ns=7, exe=b"/usr/bin/editor")


# ReadFolder: the sans-I/O folding core


def key(path: bytes = b"/s/a", process: ProcessInfo | None = EDITOR, user: UserInfo = ALICE):
    return ReadKey.of(path, process, user)


def test_the_first_read_is_reported_at_once_and_repeats_are_counted() -> None:
    folder: ReadFolder[str] = ReadFolder(60.0)
    assert folder.feed(key(), "read-1", now=0.0) == Fold("read-1", 1)
    for i in range(2, 6):
        assert folder.feed(key(), f"read-{i}", now=float(i)) is None
    assert folder.due(now=59.9) == []
    assert folder.due(now=60.0) == [Fold("read-5", 4)]  # the latest, with the repeat count
    assert len(folder) == 0
    assert folder.feed(key(), "read-6", now=61.0) == Fold("read-6", 1)  # a new interval


def test_a_single_read_costs_one_event() -> None:
    folder: ReadFolder[str] = ReadFolder(10.0)
    assert folder.feed(key(), "once", now=0.0) == Fold("once", 1)
    assert folder.due(now=100.0) == []


def test_reads_are_folded_per_file_process_and_user() -> None:
    folder: ReadFolder[str] = ReadFolder(60.0)
    other_pid = ProcessInfo(pid=43, start_time_ns=7)
    reused_pid = ProcessInfo(pid=42, start_time_ns=8)  # same pid, another process
    keys = [key(), key(b"/s/b"), key(process=other_pid), key(process=reused_pid), key(user=BOB)]
    assert all(folder.feed(k, "r", now=1.0) == Fold("r", 1) for k in keys)
    assert folder.feed(key(), "r", now=2.0) is None


def test_an_ended_interval_is_summarised_even_when_the_next_read_comes_first() -> None:
    folder: ReadFolder[str] = ReadFolder(10.0)
    folder.feed(key(), "a", now=0.0)
    folder.feed(key(), "b", now=5.0)
    assert folder.feed(key(), "c", now=12.0) == Fold("c", 1)
    assert folder.due(now=12.0) == [Fold("b", 1)]


def test_flush_closes_every_window_and_too_many_windows_close_early() -> None:
    folder: ReadFolder[str] = ReadFolder(60.0, max_keys=2)
    for path in (b"/1", b"/2"):
        folder.feed(key(path), "first", now=0.0)
        folder.feed(key(path), path.decode(), now=1.0)
    folder.feed(key(b"/3"), "first", now=2.0)  # the window of /1 is closed early
    assert folder.due(now=2.0) == [Fold("/1", 1)]
    assert folder.flush() == [Fold("/2", 1)]
    assert len(folder) == 0


def test_the_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        ReadFolder(0.0)


# ReadPolicy


def test_policy_switches_reads_off_per_label_path_and_executable() -> None:
    policy = ReadPolicy(
        AccessConfig(
            off_for_labels=("internal",),
            off_for_paths=("*/cache/*",),
            exempt_executables=(b"/usr/bin/backup",),
        )
    )
    assert policy.wanted(b"/s/a.docx", "secret")
    assert not policy.wanted(b"/s/a.docx", "internal")
    assert not policy.wanted(b"/s/cache/deep/a.docx", "secret")
    assert policy.exempt(ProcessInfo(pid=1, start_time_ns=1, exe=b"/usr/bin/backup"))
    assert not policy.exempt(EDITOR)
    assert not policy.exempt(None)
    assert not ReadPolicy(AccessConfig(reads=False)).wanted(b"/s/a", "secret")


# OwnReads


def test_one_close_consumes_one_own_open() -> None:
    own = OwnReads()
    own.opened(b"/s/a", now=10.0)  # the labeller
    own.opened(b"/s/a", now=10.1)  # then the hasher, or another worker
    assert not own.is_own(b"/s/a", at=9.9)  # closed before we opened it
    assert not own.is_own(b"/s/b", at=12.0)
    assert own.is_own(b"/s/a", at=10.2)
    assert own.is_own(b"/s/a", at=10.3)
    assert not own.is_own(b"/s/a", at=10.4)  # a third close: somebody else
    assert len(own) == 0


def held(*paths: bytes) -> Callable[[], Counter[bytes]]:
    return lambda: Counter(paths)


def test_an_open_whose_close_was_merged_is_retired_by_settle() -> None:
    own = OwnReads(grace=1.0, settle=0.1, check_interval=0.2, open_files=held())
    own.opened(b"/s/a", now=0.0)
    own.opened(b"/s/a", now=0.01)
    assert own.is_own(b"/s/a", at=0.05)  # the kernel merged both closes into one event
    own.settle(now=0.5)  # nothing held any more: the other open was closed by now
    assert own.is_own(b"/s/a", at=0.4)  # its own close could still be on its way...
    own.opened(b"/s/a", now=3.0)
    own.opened(b"/s/a", now=3.01)
    assert own.is_own(b"/s/a", at=3.05)
    own.settle(now=3.5)
    assert not own.is_own(b"/s/a", at=4.6)  # ...but not a stranger's read after the grace
    own.settle(now=4.6)
    assert len(own) == 0


def test_an_open_still_held_keeps_waiting_for_its_close() -> None:
    own = OwnReads(grace=1.0, settle=0.1, check_interval=0.2, open_files=held(b"/s/big"))
    own.opened(b"/s/big", now=0.0)  # hashing a big file
    own.settle(now=5.0)
    assert own.is_own(b"/s/big", at=20.0)
    own.opened(b"/s/gone", now=0.0)  # failed: no close will ever come
    own.settle(now=30.0)
    assert len(own) == 0


def test_own_opens_are_bounded() -> None:
    own = OwnReads(max_entries=4)
    for i in range(6):
        own.opened(b"/s/%d" % i, now=float(i))
    assert len(own) <= 4
    assert not own.is_own(b"/s/0", at=10.0)
    assert own.is_own(b"/s/5", at=10.0)


def test_the_audit_hook_counts_this_processes_read_only_opens(tmp_path: Path) -> None:
    own = OwnReads()
    path = tmp_path / "doc.pdf"
    path.write_bytes(b"x")
    untrack = track_own_opens(own)
    try:
        path.read_bytes()
        fd = os.open(os.fsencode(path), os.O_RDONLY)
        os.close(fd)
        path.write_bytes(b"y")  # writes end in CLOSE_WRITE: not counted
        with open(fd_path := tmp_path / "other", "wb"):
            pass
        assert len(own) == 2
        assert own.is_own(os.fsencode(path), at=time.monotonic())
        assert own.is_own(os.fsencode(path), at=time.monotonic())
        assert not own.is_own(os.fsencode(fd_path), at=time.monotonic())
        assert len(own) == 0
    finally:
        untrack()
    path.read_bytes()
    assert len(own) == 0  # no longer fed


# the access: configuration


def write_config(tmp_path: Path, access: str) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(
        "state_dir: state\nsensitive_roots: [s]\n"
        "destinations: [{path: usb, class: removable}]\n" + access
    )
    return path


def test_the_access_section_is_parsed(tmp_path: Path) -> None:
    config = load_config(
        write_config(
            tmp_path,
            "access:\n  reads: false\n  fold_interval: 30s\n"
            "  exempt_executables: [/usr/bin/restic, /opt/x/../bin/idx]\n"
            "  off_for_labels: [public]\n  off_for_paths: ['*/cache/*']\n",
        ),
        {},
        check_paths=False,
    )
    assert config.access == AccessConfig(
        reads=False,
        fold_interval=30.0,
        exempt_executables=(b"/usr/bin/restic", b"/opt/bin/idx"),
        off_for_labels=("public",),
        off_for_paths=("*/cache/*",),
    )
    default = load_config(write_config(tmp_path, ""), {}, check_paths=False)
    assert default.access == AccessConfig()
    assert default.access.reads


@pytest.mark.parametrize(
    ("access", "message"),
    [
        ("access: {reads: yes-please}", "access.reads: expected true or false"),
        ("access: {fold_interval: 0}", "access.fold_interval: expected a positive duration"),
        ("access: {exempt_executables: [restic]}", "access.exempt_executables[0]: expected an"),
        ("access: {off_for_labels: [topsecret]}", "access.off_for_labels[0]: expected one of"),
        ("access: {reeds: true}", "access.reeds: unknown key"),
    ],
)
def test_access_configuration_errors_name_the_key(tmp_path: Path, access: str, message) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(write_config(tmp_path, access + "\n"), {}, check_paths=False)


# the pipeline, with a real watcher and real readers


def reads_of(h: Harness, path: Path) -> list[Event]:
    target = os.fsencode(path)
    return [e for e in h.of(Action.READ) if e.source and e.source.path == target]


def test_a_read_of_a_labelled_file_is_an_event_and_the_agents_own_reads_are_not(
    dirs, harness
) -> None:
    board = labelled(dirs.sensitive / "board.pdf", os.urandom(5000), label=b"secret")
    plain = labelled(dirs.sensitive / "lunch.txt", os.urandom(300), label=None)
    edited = labelled(dirs.sensitive / "plan.docx", os.urandom(4000))
    h = harness(reads=True)
    h.start()  # the first scan opened and hashed every labelled file
    with edited.open("ab") as f:  # re-labelled and re-hashed by the agent
        f.write(b"more")
    h.wait(lambda seen: (e := h.index.get_path(os.fsencode(edited))) is not None and e.size == 4004)
    # A stranger's read at the same moment as ours may be merged with it: let ours settle.
    h.settle_own_reads()
    subprocess.run(["cp", str(edited), str(dirs.usb)], check=True)  # we hash the copy
    h.wait_copy_to(dirs.usb / "plan.docx")
    h.settle_own_reads()
    subprocess.run(["cat", str(board)], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cat", str(plain)], check=True, stdout=subprocess.DEVNULL)
    read = h.wait_action(Action.READ, board)
    h.barrier()
    h.stop()

    assert read.label == "secret"
    assert read.count == 1
    assert read.source is not None
    assert read.source.size == 5000
    assert read.destination_class is None  # read in a sensitive root
    assert read.host == "ws-test"
    # Reads: cat of board.pdf and cp's of plan.docx; none of ours (the scan, the
    # re-hash, hashing the copies; this test process counts as the agent too: the
    # barrier's in-process copy), and none of the unlabelled lunch.txt.
    sources = sorted(os.path.basename(e.source.path) for e in h.of(Action.READ) if e.source)
    assert sources == [b"board.pdf", b"plan.docx"]
    assert h.pipeline.stats().own_reads >= 4  # the events came, and were recognised


def test_repeated_reads_are_folded_and_the_count_is_reported(dirs, harness) -> None:
    doc = labelled(dirs.sensitive / "minutes.docx", os.urandom(3000))
    h = harness(reads=True, access=AccessConfig(fold_interval=3600.0))
    h.start()
    h.settle_own_reads()

    def handled() -> int:
        stats = h.pipeline.stats()
        return int(stats.reads + stats.reads_folded)

    for i in range(5):
        subprocess.run(["cat", str(doc)], check=True, stdout=subprocess.DEVNULL)
        # One at a time: the kernel merges identical events not yet read.
        h.wait(lambda seen, n=i + 1: handled() == n)
    first = h.wait_action(Action.READ, doc)
    assert h.pipeline.stats().reads_folded == 4
    assert len(reads_of(h, doc)) == 1
    h.stop()  # closes the window: one more event, carrying the repeats
    assert [e.count for e in reads_of(h, doc)] == [1, 4]
    assert first.count == 1


def test_a_read_carries_the_reader_when_it_is_still_around(dirs, harness) -> None:
    doc = labelled(dirs.sensitive / "payroll.xlsx", os.urandom(2000))
    h = harness(reads=True, attributor=Attributor(budget=0.5))
    h.start()
    h.settle_own_reads()
    # The reader opens the file twice and closes one: CLOSE_NOWRITE while it still
    # holds the other, so the /proc scan finds it.
    reader = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; a = open(sys.argv[1], 'rb'); open(sys.argv[1], 'rb').close(); "
            "print('closed', flush=True); sys.stdin.read()",
            str(doc),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert reader.stdout is not None
        assert reader.stdout.readline() == "closed\n"
        read = h.wait_action(Action.READ, doc)
    finally:
        reader.communicate("")
    assert read.process is not None
    assert read.process.pid == reader.pid
    assert read.process.exe == os.fsencode(os.path.realpath(sys.executable))
    assert read.attribution is AttributionMethod.PROC_SCAN
    assert read.user.uid == os.getuid()


@pytest.mark.skipif(os.geteuid() != 0, reason="fanotify needs root")
def test_a_short_reader_is_named_by_fanotify_as_the_reader(dirs, harness) -> None:
    """cat is gone before any /proc scan: only fanotify's close-nowrite record names it,
    and only `reader_of` asks for that record (the writer's is empty for a read)."""
    doc = labelled(dirs.sensitive / "board.pdf", os.urandom(2500))
    attributor = open_attributor([dirs.sensitive], [dirs.usb])
    try:
        if not attributor.fanotify:
            pytest.skip("fanotify is not available here")
        h = harness(reads=True, attributor=attributor)
        h.start()
        h.settle_own_reads()
        cat = subprocess.Popen(["cat", str(doc)], stdout=subprocess.DEVNULL)
        assert cat.wait(timeout=10) == 0
        read = h.wait_action(Action.READ, doc)
        h.stop()
    finally:
        attributor.close()
    assert read.attribution is AttributionMethod.FANOTIFY
    assert read.process is not None and read.process.pid == cat.pid


def test_exempt_executables_labels_and_paths_are_not_reported(dirs, harness) -> None:
    (dirs.sensitive / "cache").mkdir()
    cached = labelled(dirs.sensitive / "cache" / "thumb.db", os.urandom(1000))
    public = labelled(dirs.sensitive / "menu.txt", os.urandom(1100), label=b"public")
    doc = labelled(dirs.sensitive / "doc.pdf", os.urandom(1200))
    backup = ProcessInfo(pid=9, start_time_ns=1, exe=b"/usr/bin/backup")

    class BackupReadsDoc:
        """The backup agent read doc.pdf; nobody else is found (as for a finished cat)."""

        def reader_of(self, path: bytes, st: os.stat_result, *, seen_at=None):
            if path == os.fsencode(doc):
                return backup, ALICE, AttributionMethod.FANOTIFY
            return None, UserInfo(), AttributionMethod.UNATTRIBUTED

        def attribute(self, path: bytes, st: os.stat_result, *, seen_at=None):
            return None, UserInfo(), AttributionMethod.UNATTRIBUTED

    access = AccessConfig(
        exempt_executables=(b"/usr/bin/backup",),
        off_for_labels=("public",),
        off_for_paths=("*/cache/*",),
    )
    h = harness(reads=True, access=access, attributor=BackupReadsDoc())
    h.start()
    h.settle_own_reads()
    for path in (cached, public, doc):
        subprocess.run(["cat", str(path)], check=True, stdout=subprocess.DEVNULL)
    h.barrier()
    h.stop()
    assert [e for e in h.of(Action.READ) if b"barrier-" not in (e.source.path or b"")] == []


def test_reads_are_not_watched_when_switched_off(dirs, harness) -> None:
    doc = labelled(dirs.sensitive / "doc.pdf", os.urandom(1200))
    h = harness(reads=True, access=AccessConfig(reads=False))
    h.start()
    h.settle_own_reads()
    subprocess.run(["cat", str(doc)], check=True, stdout=subprocess.DEVNULL)
    h.barrier()
    h.stop()
    assert h.of(Action.READ) == []


def test_deletes_and_renames_of_labelled_files_are_reported(dirs, harness) -> None:
    plan = labelled(dirs.sensitive / "plan.pdf", os.urandom(4000), label=b"secret")
    memo = labelled(dirs.sensitive / "memo.pdf", os.urandom(4100))
    h = harness()
    h.start()
    renamed = dirs.sensitive / "renamed.pdf"
    os.rename(plan, renamed)
    rename = h.wait_action(Action.RENAME, plan)
    assert rename.destination is not None
    assert rename.destination.path == os.fsencode(renamed)
    assert rename.source is not None
    assert rename.source.sha256 == rename.destination.sha256
    assert rename.label == "secret"
    memo.unlink()
    delete = h.wait_action(Action.DELETE, memo)
    assert delete.label == "confidential"
    assert delete.source is not None
    assert delete.source.size == 4100
    h.barrier()
    h.stop()
    assert len(h.of(Action.RENAME)) == 1
    assert len(h.of(Action.DELETE)) == 1


def test_a_copy_then_deleting_the_original_is_both_events(dirs, harness) -> None:
    plan = labelled(dirs.sensitive / "plan.pdf", os.urandom(4000))
    h = harness()
    h.start()
    subprocess.run(["cp", str(plan), str(dirs.usb)], check=True)
    plan.unlink()
    copy = h.wait_copy_to(dirs.usb / "plan.pdf")
    delete = h.wait_action(Action.DELETE, plan)
    assert copy.action is Action.COPY
    assert copy.source is not None
    assert copy.source.path == os.fsencode(plan)
    assert delete.source is not None
    assert delete.source.sha256 == copy.source.sha256
    # and then the copy on the stick is deleted too
    (dirs.usb / "plan.pdf").unlink()
    gone = h.wait_action(Action.DELETE, dirs.usb / "plan.pdf")
    assert gone.destination_class is DestinationClass.REMOVABLE
    assert gone.label == "confidential"


def test_a_folder_moved_out_of_sight_is_a_delete_per_labelled_file(dirs, harness) -> None:
    project = dirs.sensitive / "project"
    (project / "sub").mkdir(parents=True)
    files = [
        labelled(project / "a.pdf", os.urandom(1000)),
        labelled(project / "sub" / "b.pdf", os.urandom(1001)),
    ]
    h = harness()
    h.start()
    for path in files:
        wait_indexed(h, path)
    os.rename(project, dirs.outside / "project")
    for path in files:
        h.wait_action(Action.DELETE, path)
    h.barrier()
    h.stop()
    assert len(h.of(Action.DELETE)) == 2
