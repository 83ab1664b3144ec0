"""agent.watcher: real inotify on tmp_path; waits are queue.get(timeout=...) with a deadline."""

from __future__ import annotations

import logging
import os
import queue
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.errors import ConfigError
from agent.watcher import Observation, ObservationKind, ObservationQueue, Role, Watcher

K = ObservationKind
TIMEOUT = 10.0

# watchdog 7.1 warns "Callback with id ... already exists for watch" from its inotify
# reader thread while a copied tree is being watched (cp -r); with warnings as errors
# that exception kills the reader thread and every watch with it.
pytestmark = pytest.mark.filterwarnings("ignore:Callback with id:RuntimeWarning")


class Collected:
    """Everything the watcher put on the queue, with event-driven waiting."""

    def __init__(self, q: ObservationQueue) -> None:
        self.q = q
        self.seen: list[Observation] = []

    def wait_for(self, predicate: Callable[[list[Observation]], bool]) -> list[Observation]:
        deadline = time.monotonic() + TIMEOUT
        while not predicate(self.seen):
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"timed out; observations so far: {self.seen}")
            try:
                obs = self.q.get(timeout=left)
            except queue.Empty:
                continue
            assert obs is not None
            self.seen.append(obs)
        return self.seen

    def wait_kind(self, kind: ObservationKind, path: bytes) -> Observation:
        def found(seen: list[Observation]) -> bool:
            return any(o.kind is kind and o.current_path == path for o in seen)

        self.wait_for(found)
        return next(o for o in self.seen if o.kind is kind and o.current_path == path)


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(sensitive root, destination, an unwatched folder)."""
    paths = (tmp_path / "sensitive", tmp_path / "usb", tmp_path / "outside")
    for path in paths:
        path.mkdir()
    return paths


@pytest.fixture
def watching(dirs) -> Iterator[tuple[Watcher, Collected]]:
    sensitive, usb, _ = dirs
    before = set(threading.enumerate())
    q: ObservationQueue = queue.Queue(maxsize=1000)
    watcher = Watcher([(sensitive, Role.SENSITIVE), (usb, Role.DESTINATION)], q)
    watcher.start()
    yield watcher, Collected(q)
    assert watcher.healthy()
    watcher.stop()
    assert not watcher.healthy()
    assert set(threading.enumerate()) <= before, "watcher left threads running"


def b(path: Path) -> bytes:
    return os.fsencode(path)


@pytest.fixture
def source(dirs: tuple[Path, Path, Path]) -> Path:
    path = dirs[2] / "plan.pdf"
    path.write_bytes(os.urandom(300_000))
    return path


def test_cp_is_a_closed_write_at_the_destination(watching, dirs, source) -> None:
    _, collected = watching
    subprocess.run(["cp", source, dirs[1] / "B"], check=True)
    obs = collected.wait_kind(K.CLOSED_WRITE, b(dirs[1] / "B"))
    assert obs.role is Role.DESTINATION
    assert obs.root == b(dirs[1])
    assert isinstance(obs.path, bytes)


def test_shutil_copy(watching, dirs, source) -> None:
    _, collected = watching
    shutil.copy(source, dirs[1] / "C")
    collected.wait_kind(K.CLOSED_WRITE, b(dirs[1] / "C"))


def test_rsync_temp_file_is_renamed_into_place(watching, dirs, source) -> None:
    if shutil.which("rsync") is None:
        pytest.skip("rsync is not installed")
    _, collected = watching
    subprocess.run(["rsync", "-a", source, dirs[1] / "D"], check=True)
    moved = collected.wait_kind(K.MOVED_IN, b(dirs[1] / "D"))
    assert moved.dest_path == b(dirs[1] / "D")
    assert os.path.basename(moved.path).startswith(b".D.")
    assert any(o.kind is K.CLOSED_WRITE and o.path == moved.path for o in collected.seen)


def test_mv_into_the_folder_is_a_create_without_close(watching, dirs, source) -> None:
    _, collected = watching
    os.rename(source, dirs[1] / "moved.pdf")
    collected.wait_kind(K.CREATED, b(dirs[1] / "moved.pdf"))


def test_cp_r_of_a_tree_reports_the_new_directories(watching, dirs) -> None:
    _, collected = watching
    tree = dirs[2] / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    for name in ("f0", "a/f1", "a/b/f2"):
        (tree / name).write_bytes(os.urandom(1000))
    subprocess.run(["cp", "-r", tree, dirs[1]], check=True)
    copied = dirs[1] / "tree"
    for sub in (copied, copied / "a", copied / "a" / "b"):
        collected.wait_kind(K.DIR_CREATED, b(sub))
    # Every file shows up at least as created (watchdog simulates creates for files
    # already in a new directory); closes may or may not follow.
    for name in ("f0", "a/f1", "a/b/f2"):
        path = b(copied / name)
        collected.wait_for(
            lambda seen, path=path: any(
                o.path == path and o.kind in (K.CREATED, K.CLOSED_WRITE) for o in seen
            )
        )


def test_non_utf8_names_arrive_as_exact_bytes(watching, dirs, source) -> None:
    _, collected = watching
    name = b(dirs[1]) + b"/bad_\xff\xfe.txt"
    shutil.copy(source, name)
    obs = collected.wait_kind(K.CLOSED_WRITE, name)
    assert obs.path == name


def test_sensitive_root_events_carry_their_role(watching, dirs) -> None:
    _, collected = watching
    path = dirs[0] / "new.txt"
    path.write_bytes(b"x")
    obs = collected.wait_kind(K.CLOSED_WRITE, b(path))
    assert obs.role is Role.SENSITIVE
    path.unlink()
    collected.wait_kind(K.DELETED, b(path))


def test_metadata_changes_are_seen_in_sensitive_roots_only(watching, dirs) -> None:
    _, collected = watching
    (dirs[1] / "dest.txt").write_bytes(b"x")
    (dirs[0] / "src.txt").write_bytes(b"x")
    os.chmod(dirs[1] / "dest.txt", 0o600)
    os.chmod(dirs[0] / "src.txt", 0o600)
    collected.wait_kind(K.ATTRIB, b(dirs[0] / "src.txt"))
    assert not any(o.kind is K.ATTRIB and o.role is Role.DESTINATION for o in collected.seen)


def test_moving_out_of_the_tree_is_a_delete(watching, dirs) -> None:
    _, collected = watching
    path = dirs[0] / "leaving.txt"
    path.write_bytes(b"x")
    os.rename(path, dirs[2] / "left.txt")
    collected.wait_kind(K.DELETED, b(path))


def test_reads_are_not_observed_by_default(watching, dirs) -> None:
    _, collected = watching
    path = dirs[0] / "read.txt"
    path.write_bytes(b"x")
    path.read_bytes()
    marker = dirs[0] / "marker"
    marker.write_bytes(b"m")
    collected.wait_kind(K.CLOSED_WRITE, b(marker))
    assert not any(o.kind is K.CLOSED_NO_WRITE for o in collected.seen)


def test_reads_can_be_observed(dirs) -> None:
    q: ObservationQueue = queue.Queue()
    watcher = Watcher([(dirs[0], Role.SENSITIVE)], q, observe_reads=True)
    watcher.start()
    try:
        path = dirs[0] / "read.txt"
        path.write_bytes(b"x")
        path.read_bytes()
        Collected(q).wait_kind(K.CLOSED_NO_WRITE, b(path))
    finally:
        watcher.stop()


def test_inotify_overflow_warning_becomes_an_observation(watching) -> None:
    _, collected = watching
    # What watchdog 7.1 logs on IN_Q_OVERFLOW; the handler itself gets no event.
    logging.getLogger("watchdog.observers.inotify_c").warning(
        "Inotify queue overflowed; filesystem events were lost"
    )
    logging.getLogger("watchdog.observers.inotify").warning(
        "Inotify queue overflowed; reconciling recursive watches below %r", b"/x"
    )
    collected.wait_for(lambda seen: any(o.kind is K.OVERFLOW for o in seen))
    assert sum(o.kind is K.OVERFLOW for o in collected.seen) == 1


def test_overflow_is_seen_even_when_warnings_are_silenced(dirs) -> None:
    wd = logging.getLogger("watchdog.observers.inotify_c")
    previous = wd.level
    wd.setLevel(logging.ERROR)
    q: ObservationQueue = queue.Queue()
    watcher = Watcher([(dirs[1], Role.DESTINATION)], q)
    try:
        watcher.start()
        wd.warning("Inotify queue overflowed; filesystem events were lost")
        obs = q.get(timeout=TIMEOUT)
        assert obs is not None
        assert (obs.kind, obs.role) == (K.OVERFLOW, None)
    finally:
        watcher.stop()
        assert wd.level == logging.ERROR  # restored
        wd.setLevel(previous)


def test_failed_watch_rebuild_is_a_watch_lost(watching) -> None:
    _, collected = watching
    logging.getLogger("watchdog.observers.inotify").error("Unable to rebuild recursive watches")
    collected.wait_for(lambda seen: any(o.kind is K.WATCH_LOST for o in seen))


def test_deleting_a_watched_root_is_a_watch_lost(dirs) -> None:
    q: ObservationQueue = queue.Queue()
    watcher = Watcher([(dirs[0], Role.SENSITIVE), (dirs[1], Role.DESTINATION)], q)
    watcher.start()
    try:
        shutil.rmtree(dirs[1])
        Collected(q).wait_kind(K.WATCH_LOST, b(dirs[1]))
        deadline = time.monotonic() + TIMEOUT
        while watcher.healthy() and time.monotonic() < deadline:
            time.sleep(0.01)  # the emitter stops itself after DELETE_SELF
        assert not watcher.healthy()
    finally:
        watcher.stop()


def test_full_queue_drops_and_counts_without_blocking(dirs) -> None:
    q: ObservationQueue = queue.Queue(maxsize=1)
    watcher = Watcher([(dirs[1], Role.DESTINATION)], q)
    watcher.start()
    try:
        for i in range(5):
            (dirs[1] / f"f{i}").write_bytes(b"x")
        deadline = time.monotonic() + TIMEOUT
        while watcher.dropped < 5 and time.monotonic() < deadline:
            time.sleep(0.01)  # polling a counter with a deadline, not a fixed wait
        assert watcher.dropped >= 5
        assert watcher.take_dropped() == watcher.dropped
        assert watcher.take_dropped() == 0
        assert q.qsize() == 1
    finally:
        watcher.stop()


def test_a_root_that_cannot_be_watched_is_a_config_error(tmp_path) -> None:
    before = set(threading.enumerate())
    watcher = Watcher([(tmp_path / "absent", Role.DESTINATION)], queue.Queue())
    with pytest.raises(ConfigError, match=f"cannot watch {tmp_path / 'absent'}: No such file"):
        watcher.start()
    watcher.stop()
    assert set(threading.enumerate()) <= before
    for name in ("watchdog.observers.inotify_c", "watchdog.observers.inotify"):
        assert not logging.getLogger(name).handlers
