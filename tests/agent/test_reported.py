"""agent.reported on real SQLite files, and the pipeline's rescans across restarts with it."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.errors import ReportedStoreError
from agent.events import Action, Sha256Hex
from agent.reported import CopyIdentity, ReportedCopies
from tests.agent.pipeline_harness import (
    ShiftedClock,
    labelled,
)

pytestmark = pytest.mark.filterwarnings("ignore:Callback with id:RuntimeWarning")

SHA = Sha256Hex("ab" * 32)
DAY_NS = 86_400 * 10**9


def ident(ino: int = 7, mtime_ns: int = 5, sha: Sha256Hex = SHA) -> CopyIdentity:
    return CopyIdentity(dev=64768, ino=ino, size=1000, mtime_ns=mtime_ns, sha256=sha)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ReportedCopies]:
    s = ReportedCopies.open(tmp_path / "reported.sqlite")
    yield s
    s.close()


def test_identities_are_remembered_exactly(store: ReportedCopies) -> None:
    assert not store.seen(ident())
    store.add(ident(), now_ns=1)
    assert store.seen(ident())
    assert store.seen(ident(mtime_ns=6))  # the same bytes; cp -a set the mtime afterwards
    assert not store.seen(ident(sha=Sha256Hex("cd" * 32)))  # rewritten in place
    store.add(ident(), now_ns=2)  # again: still one row
    assert len(store) == 1


def test_unsigned_64_bit_inode_numbers_fit(store: ReportedCopies) -> None:
    big = ident(ino=2**64 - 3)
    store.add(big, now_ns=1)
    assert store.seen(big)
    assert not store.seen(ident(ino=2**63 - 3))
    assert store.forget(64768, 2**64 - 3) == 1


def test_forget_drops_every_identity_of_an_inode(store: ReportedCopies) -> None:
    store.add(ident(mtime_ns=1), now_ns=1)
    store.add(ident(mtime_ns=2), now_ns=1)
    store.add(ident(ino=8), now_ns=1)
    assert store.forget(64768, 7) == 2
    assert len(store) == 1


def test_last_alive_and_pruning_survive_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "reported.sqlite"
    first = ReportedCopies.open(path)
    assert first.last_alive_ns() is None
    first.touch(100 * DAY_NS)
    first.add(ident(ino=1), now_ns=5 * DAY_NS)
    first.add(ident(ino=2), now_ns=95 * DAY_NS)
    first.close()  # no clean shutdown needed: every write is its own transaction
    again = ReportedCopies.open(path)
    try:
        assert again.last_alive_ns() == 100 * DAY_NS
        assert again.prune(older_than_ns=10 * DAY_NS) == 1
        assert not again.seen(ident(ino=1))
        assert again.seen(ident(ino=2))
        again.touch(101 * DAY_NS)
        assert again.last_alive_ns() == 101 * DAY_NS
    finally:
        again.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_damaged_file_is_set_aside_and_replaced(tmp_path: Path) -> None:
    path = tmp_path / "reported.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    store = ReportedCopies.open(path)
    try:
        assert len(store) == 0
        assert store.last_alive_ns() is None
    finally:
        store.close()
    assert (tmp_path / "reported.sqlite.damaged").read_bytes().startswith(b"this is not")


def test_an_unusable_location_is_a_domain_error(tmp_path: Path) -> None:
    with pytest.raises(ReportedStoreError, match="cannot create"):
        ReportedCopies.open(tmp_path / "missing" / "reported.sqlite")
    closed = ReportedCopies.open(tmp_path / "reported.sqlite")
    closed.close()
    with pytest.raises(ReportedStoreError, match="closed"):
        closed.seen(ident())


# the pipeline across restarts


def test_copies_made_while_down_are_reported_and_earlier_ones_not_again(
    dirs, harness, tmp_path
) -> None:
    docs = [labelled(dirs.sensitive / f"doc{i}.pdf", os.urandom(3000 + i)) for i in range(4)]
    store = ReportedCopies.open(tmp_path / "reported.sqlite")
    try:
        first = harness(reported=store)
        first.start()
        before_copies_ns = time.time_ns()
        for doc in docs[:2]:
            shutil.copy(doc, dirs.usb)
        for doc in docs[:2]:
            first.wait_copy_to(dirs.usb / doc.name)
        first.stop()
        assert store.last_alive_ns() is not None
        # As after `kill -9`: the last periodic "alive" was before those copies.
        store.touch(before_copies_ns)
        # While the agent is down: two more copies.
        for doc in docs[2:]:
            subprocess.run(["cp", str(doc), str(dirs.usb)], check=True)

        # Restarted an hour later (wall clock): without "last alive", the rescan
        # would look back one second only and miss the copies made meanwhile.
        second = harness(reported=store, clock=ShiftedClock(3600.0))
        second.start()  # the first rescan runs here, synchronously
        second.barrier()
        second.stop()
    finally:
        store.close()
    reported = sorted(
        os.path.basename(e.destination.path)
        for e in second.copies()
        if e.destination and b"barrier-" not in e.destination.path
    )
    assert reported == [b"doc2.pdf", b"doc3.pdf"]
    assert second.pipeline.stats().already_reported == 2


def test_without_a_record_a_restart_only_looks_back_a_moment(dirs, harness) -> None:
    """The control for the test above: the record is what finds the copies made while down."""
    doc = labelled(dirs.sensitive / "doc.pdf", os.urandom(3000))
    subprocess.run(["cp", str(doc), str(dirs.usb)], check=True)
    h = harness(clock=ShiftedClock(3600.0))
    h.start()
    h.barrier()
    h.stop()
    assert [
        e for e in h.copies() if e.destination and e.destination.path.endswith(b"doc.pdf")
    ] == []


def test_a_file_moved_back_and_out_again_is_reported_again(dirs, harness, tmp_path) -> None:
    src = labelled(dirs.sensitive / "plan.pdf", os.urandom(4000))
    store = ReportedCopies.open(tmp_path / "reported.sqlite")
    try:
        h = harness(reported=store)
        h.start()
        os.rename(src, dirs.usb / "plan.pdf")
        assert h.wait_copy_to(dirs.usb / "plan.pdf").action is Action.MOVE
        os.rename(dirs.usb / "plan.pdf", src)
        h.wait(lambda seen: h.index.get_path(os.fsencode(src)) is not None and not len(store))
        os.rename(src, dirs.usb / "again.pdf")
        assert h.wait_copy_to(dirs.usb / "again.pdf").action is Action.MOVE
        h.stop()
    finally:
        store.close()
    assert len(h.copies()) == 2
