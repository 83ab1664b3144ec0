"""Detection beyond exact_hash: label_in_content, same_process and probable, with real commands.

A real watcher and pipeline watch a sensitive root and a destination on tmp_path
(tests/agent/pipeline_harness.py). same_process and probable need fanotify's pids
and users (root); label_in_content needs only the file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from agent.attribution import Attributor, open_attributor
from agent.config import AccessConfig
from agent.content import ContentConfig
from agent.events import Action, AttributionMethod, DetectionMethod, Event, ProcessInfo, UserInfo
from tests.agent.office_files import make_docx
from tests.agent.pipeline_harness import (
    Dirs,
    Harness,
    is_copy_to,
    labelled,
    make_dirs,
    wait_indexed,
)

pytestmark = pytest.mark.filterwarnings("ignore:Callback with id:RuntimeWarning")

GUID = "2096f6a2-d2f7-48be-b329-b73aaa526e5d"
RESAVE = textwrap.dedent(
    """
    # An editor saving a labelled document under a new name: same parts, new text.
    import sys, zipfile
    with zipfile.ZipFile(sys.argv[1]) as old, zipfile.ZipFile(sys.argv[2], "w") as new:
        for item in old.infolist():
            data = old.read(item)
            if item.filename == "word/document.xml":
                data = data.replace(b"Quarterly figures.", b"Quarterly figures, revised.")
            new.writestr(item, data)
    """
)
HOLD_AFTER_READ = (
    "import sys; open(sys.argv[1], 'rb').read(); print('read', flush=True); sys.stdin.read()"
)
ALTERNATE = textwrap.dedent(
    """
    import shutil, sys
    src, dst = sys.argv[1], sys.argv[2]
    for i in range(6):
        shutil.copy(f"{src}/budget.xlsx", f"{dst}/budget{i}.xlsx")
        shutil.copy(f"{src}/notes{i}.txt", f"{dst}/n{i}.txt")
    """
)
UPPERCASE = "import sys; open(sys.argv[2], 'wb').write(open(sys.argv[1], 'rb').read().upper())"


@pytest.fixture
def dirs(tmp_path: Path) -> Dirs:
    d = make_dirs(tmp_path)
    labels = replace(d.config.labels, content=ContentConfig(mip={GUID: "secret"}))
    return replace(d, config=replace(d.config, labels=labels))


@pytest.fixture
def fanotify(dirs: Dirs) -> Iterator[Attributor]:
    """The service's attributor over the two folders (root: fanotify)."""
    if os.geteuid() != 0:
        pytest.skip("same_process and probable need fanotify's pids and users (root)")
    attributor = open_attributor([dirs.sensitive], [dirs.usb])
    if not attributor.fanotify:
        attributor.close()
        pytest.skip("fanotify is not available here")
    yield attributor
    attributor.close()


def copy_to(h: Harness, path: Path) -> Event:
    return h.wait_copy_to(path)


def others(h: Harness) -> list[Event]:
    """Copies other than the barrier's."""
    return [e for e in h.copies() if e.destination and b"barrier-" not in e.destination.path]


def test_a_resaved_office_file_is_known_by_the_label_in_its_metadata(dirs, harness) -> None:
    source = make_docx(dirs.sensitive / "board.docx", label_guid=GUID)  # LabelInfo only
    h = harness()
    h.start()
    wait_indexed(h, source)
    assert h.index.get_path(os.fsencode(source)).label == "secret"
    resaved = dirs.usb / "board-v2.docx"
    subprocess.run([sys.executable, "-c", RESAVE, str(source), str(resaved)], check=True)
    event = h.wait_copy_to(resaved)
    assert event.action is Action.COPY
    assert event.detection is DetectionMethod.LABEL_IN_CONTENT
    assert (event.label, event.label_source) == ("secret", "mip")
    assert event.source is None  # the label came from the file itself
    assert event.destination is not None
    assert event.destination.sha256 == hashlib.sha256(resaved.read_bytes()).hexdigest()
    assert event.destination.sha256 != hashlib.sha256(source.read_bytes()).hexdigest()
    # It is a labelled file now: a copy of it is an exact copy with its label.
    subprocess.run(["cp", str(resaved), str(dirs.usb / "again.docx")], check=True)
    again = h.wait_copy_to(dirs.usb / "again.docx")
    assert again.detection is DetectionMethod.EXACT_HASH
    assert again.label == "secret"
    assert again.source is not None and again.source.path == os.fsencode(resaved)
    # An unlabelled document is nothing.
    make_docx(dirs.outside / "menu.docx", text="Lunch menu.")
    shutil.copy(dirs.outside / "menu.docx", dirs.usb / "menu.docx")
    h.barrier()
    h.stop()
    assert [e.destination.path for e in others(h) if e.destination] == [
        os.fsencode(resaved),
        os.fsencode(dirs.usb / "again.docx"),
    ]
    assert h.pipeline.stats().unmatched >= 2


class CountingAttributor:
    """Nobody, but counting the questions: an unmatched write must not cost one."""

    def __init__(self) -> None:
        self.writers = 0
        self._lock = threading.Lock()

    def attribute(self, path: bytes, st: os.stat_result, *, seen_at=None):
        with self._lock:
            self.writers += 1
        return None, UserInfo(), AttributionMethod.UNATTRIBUTED

    def reader_of(self, path: bytes, st: os.stat_result, *, seen_at=None):
        return None, UserInfo(), AttributionMethod.UNATTRIBUTED


def test_unrelated_writes_cost_no_attribution_when_nobody_read_a_labelled_file(
    dirs, harness
) -> None:
    labelled(dirs.sensitive / "plan.pdf", os.urandom(4000))
    counting = CountingAttributor()
    h = harness(attributor=counting)
    h.start()
    writer = (
        "import os, sys\nfor i in range(30): open(f'{sys.argv[1]}/f{i}', 'wb').write(b'x' * 10)"
    )
    subprocess.run([sys.executable, "-c", writer, str(dirs.usb)], check=True)
    h.barrier()
    h.stop()
    assert h.pipeline.stats().unmatched >= 30
    assert counting.writers == 1  # the barrier's copy


def test_a_process_that_read_a_labelled_file_and_wrote_a_transformed_one(
    dirs, harness, fanotify
) -> None:
    rows = [
        b"%s,%d\n" % (name, 100 + i) for i, name in enumerate([b"carol", b"alice", b"bob"] * 70)
    ]
    src = labelled(dirs.sensitive / "payroll.csv", b"".join(rows))
    h = harness(reads=True, attributor=fanotify)
    h.start()
    h.settle_own_reads()
    # Same size, other bytes: the hash cannot tell; the reader and writer are one process.
    ordered = dirs.usb / "payroll-sorted.csv"
    sort = subprocess.Popen(["sort", "-o", str(ordered), str(src)])
    assert sort.wait(timeout=10) == 0
    first = h.wait_copy_to(ordered)
    upper = dirs.usb / "PAYROLL.CSV"
    python = subprocess.Popen([sys.executable, "-c", UPPERCASE, str(src), str(upper)])
    assert python.wait(timeout=10) == 0
    second = h.wait_copy_to(upper)
    # gzip's output is an archive of one member: found by its member's hash first.
    gz = dirs.usb / "payroll.csv.gz"
    subprocess.run(["sh", "-c", 'gzip -c "$1" > "$2"', "sh", str(src), str(gz)], check=True)
    zipped = h.wait_copy_to(gz)
    h.stop()
    for event, pid in ((first, sort.pid), (second, python.pid)):
        assert event.action is Action.COPY
        assert event.detection is DetectionMethod.SAME_PROCESS
        assert event.source is not None and event.source.path == os.fsencode(src)
        assert event.label == "confidential"
        assert event.attribution is AttributionMethod.FANOTIFY
        assert isinstance(event.process, ProcessInfo) and event.process.pid == pid
        assert event.destination is not None and event.destination.sha256
    # The pid is fanotify's own; the rest is read from /proc while the copier lives.
    assert second.process is not None
    assert second.process.exe in (os.fsencode(os.path.realpath(sys.executable)), b"")
    assert zipped.detection is DetectionMethod.ARCHIVE_MEMBER
    assert len(others(h)) == 3
    assert h.index.get_path(os.fsencode(upper)) is not None  # copies of it are caught


def test_a_copier_of_labelled_and_plain_files_alike_reports_the_labelled_ones_only(
    dirs, harness, fanotify
) -> None:
    """Each read explains one write: cp's read of the labelled file is spent on its copy."""
    project = dirs.sensitive / "project"
    project.mkdir()
    labelled(project / "budget.xlsx", os.urandom(8000))
    for i in range(6):  # about the size: probable would take any of them
        (project / f"notes{i}.txt").write_bytes(os.urandom(8000 + i))
    h = harness(reads=True, attributor=fanotify)
    h.start()
    h.settle_own_reads()
    subprocess.run(["cp", "-r", str(project), str(dirs.usb)], check=True)
    # A program copying a labelled file, then plain ones, one after the other.
    subprocess.run([sys.executable, "-c", ALTERNATE, str(project), str(dirs.usb)], check=True)
    h.wait_copy_to(dirs.usb / "budget5.xlsx")
    h.barrier()
    h.stop()
    found = sorted(os.path.basename(e.destination.path) for e in others(h) if e.destination)
    assert found == [b"budget.xlsx", *(b"budget%d.xlsx" % i for i in range(6))]
    assert {e.detection for e in others(h)} == {DetectionMethod.EXACT_HASH}


def test_a_same_sized_write_just_after_the_users_read_is_probable(dirs, harness, fanotify) -> None:
    src = labelled(dirs.sensitive / "minutes.pdf", os.urandom(20_000))
    h = harness(reads=True, attributor=fanotify)
    h.start()
    h.settle_own_reads()
    # The reader stays until its read was seen: its user is known (a process gone
    # before fanotify's reader looked has only a pid, and probable needs a user).
    reader = subprocess.Popen(
        [sys.executable, "-c", HOLD_AFTER_READ, str(src)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert reader.stdout is not None
        assert reader.stdout.readline() == "read\n"
        read = h.wait_action(Action.READ, src)
    finally:
        reader.communicate("")
    assert read.user.login
    retyped = dirs.usb / "notes.pdf"  # another process, the same user, about the size
    writer = "import os, sys; open(sys.argv[1], 'wb').write(os.urandom(20_050))"
    subprocess.run([sys.executable, "-c", writer, str(retyped)], check=True)
    event = h.wait_copy_to(retyped)
    assert event.detection is DetectionMethod.PROBABLE
    assert event.source is not None and event.source.path == os.fsencode(src)
    assert event.user.uid == os.getuid()
    # A different size is nothing.
    small = dirs.usb / "small.bin"
    subprocess.run([sys.executable, "-c", writer.replace("20_050", "500"), str(small)], check=True)
    h.barrier()
    h.stop()
    assert not any(is_copy_to(e, os.fsencode(small)) for e in h.seen)


def test_reads_stay_reported_when_access_events_are_off_for_their_label(
    dirs, harness, fanotify
) -> None:
    """Policy switches READ events off, not copy detection: the read still counts."""
    src = labelled(dirs.sensitive / "menu.txt", b"soup of the day\n" * 100, label=b"internal")
    h = harness(reads=True, attributor=fanotify, access=AccessConfig(off_for_labels=("internal",)))
    h.start()
    h.settle_own_reads()
    upper = dirs.usb / "MENU.TXT"
    subprocess.run([sys.executable, "-c", UPPERCASE, str(src), str(upper)], check=True)
    event = h.wait_copy_to(upper)
    h.stop()
    assert event.detection is DetectionMethod.SAME_PROCESS
    assert h.of(Action.READ) == []
