"""agent.watcher: real inotify on tmp_path; waits are queue.get(timeout=...) with a deadline."""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.errors import AgentError, ConfigError
from agent.watcher import (
    Observation,
    ObservationKind,
    ObservationQueue,
    Role,
    Watcher,
    raise_watch_limit,
)
from tests.procs import ROOT

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


# roots added and removed while running


def test_roots_can_be_added_and_removed_while_running(watching, dirs) -> None:
    watcher, collected = watching
    extra = dirs[2] / "sync"
    extra.mkdir()
    assert watcher.add_root(extra, Role.DESTINATION)
    assert (b(extra), Role.DESTINATION) in watcher.roots()
    (extra / "one").write_bytes(b"1")
    obs = collected.wait_kind(K.CLOSED_WRITE, b(extra / "one"))
    assert (obs.root, obs.role) == (b(extra), Role.DESTINATION)

    assert watcher.remove_root(extra)
    assert not watcher.remove_root(extra)
    (extra / "two").write_bytes(b"2")
    marker = dirs[1] / "marker"  # events arrive in order: after the marker, nothing more
    marker.write_bytes(b"m")
    collected.wait_kind(K.CLOSED_WRITE, b(marker))
    assert not any(o.path == b(extra / "two") for o in collected.seen)
    assert not any(o.kind is K.WATCH_LOST for o in collected.seen)  # orderly: no gap


def test_a_root_that_cannot_be_added_is_reported_not_raised(watching, dirs) -> None:
    watcher, collected = watching
    missing = dirs[2] / "gone"
    assert not watcher.add_root(missing, Role.DESTINATION)
    obs = collected.wait_kind(K.WATCH_LOST, b(missing))
    assert (obs.root, obs.role) == (b(missing), Role.DESTINATION)
    assert (b(missing), Role.DESTINATION) not in watcher.roots()


def test_add_root_needs_a_running_watcher(dirs) -> None:
    watcher = Watcher([(dirs[0], Role.SENSITIVE)], queue.Queue())
    with pytest.raises(AgentError, match="not running"):
        watcher.add_root(dirs[1], Role.DESTINATION)


def test_a_nested_root_gets_its_events_once(watching, dirs) -> None:
    watcher, collected = watching
    inner = dirs[1] / "stick"
    inner.mkdir()
    collected.wait_kind(K.DIR_CREATED, b(inner))
    assert watcher.add_root(inner, Role.DESTINATION)
    (inner / "copy.pdf").write_bytes(b"x")
    collected.wait_kind(K.CLOSED_WRITE, b(inner / "copy.pdf"))
    # The outer root's own events arrive in order (one emitter per root): its
    # duplicate, if it made one, would come before this marker.
    (dirs[1] / "marker").write_bytes(b"m")
    collected.wait_kind(K.CLOSED_WRITE, b(dirs[1] / "marker"))
    closes = [
        o for o in collected.seen if o.kind is K.CLOSED_WRITE and o.path.endswith(b"copy.pdf")
    ]
    assert [o.root for o in closes] == [b(inner)]


def test_a_deleted_added_root_is_lost_but_the_watcher_stays_healthy(watching, dirs) -> None:
    watcher, collected = watching
    folder = dirs[2] / "Dropbox"
    folder.mkdir()
    assert watcher.add_root(folder, Role.DESTINATION)
    folder.rmdir()
    collected.wait_kind(K.WATCH_LOST, b(folder))
    assert watcher.healthy()  # the fixture checks it again on the way out


def test_raise_watch_limit_only_ever_raises(tmp_path) -> None:
    limit = tmp_path / "max_user_watches"
    limit.write_text("8192\n")
    assert raise_watch_limit(65536, path=limit)
    assert limit.read_text() == "65536\n"
    assert not raise_watch_limit(10_000, path=limit)
    assert limit.read_text() == "65536\n"
    assert not raise_watch_limit(10**6, path=tmp_path / "absent" / "file")


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")
def test_a_mount_over_a_watched_folder_needs_a_new_watch(dirs) -> None:
    q: ObservationQueue = queue.Queue()
    watcher = Watcher([(dirs[1], Role.DESTINATION)], q)
    watcher.start()
    collected = Collected(q)
    mounted = False
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "exfw-w", dirs[1]], check=True)
        mounted = True
        (dirs[1] / "unseen").write_bytes(b"x")  # the watch sits on the covered inode
        assert watcher.add_root(dirs[1], Role.DESTINATION)  # watch again: the new inode
        (dirs[1] / "seen").write_bytes(b"x")
        collected.wait_kind(K.CLOSED_WRITE, b(dirs[1] / "seen"))
        assert not any(o.path == b(dirs[1] / "unseen") for o in collected.seen)
        assert watcher.healthy()
    finally:
        watcher.stop()
        if mounted:
            subprocess.run(["umount", dirs[1]], check=True)


# the inotify watch limit, in a user namespace of its own (its limit binds only us)

_LIMIT_CHILD = r"""
import json, os, queue, sys, time
from pathlib import Path
from agent.watcher import ObservationKind, Role, Watcher

tree, raise_to = Path(sys.argv[1]), int(sys.argv[2]) or None
limit = Path("/proc/sys/user/max_inotify_watches")  # this namespace's own limit
limit.write_text("40\n")
q = queue.Queue()
watcher = Watcher([(tree, Role.DESTINATION)], q, raise_watch_limit_to=raise_to,
                  max_user_watches=limit)
watcher.start()
seen, reports, deadline, rounds = set(), [], time.monotonic() + 45, 0
try:
    while len(seen) < 100 and time.monotonic() < deadline:
        rounds += 1
        for i in range(100):
            (tree / f"d{i:03d}" / f"f{rounds}").write_bytes(b"x")
        marker = tree / f"marker{rounds}"
        marker.write_bytes(b"m")
        round_ends = min(deadline, time.monotonic() + 5)
        while True:  # events arrive in order: after the marker, this round is complete
            try:  # (a marker written while the watches are rebuilt may be lost: next round)
                obs = q.get(timeout=max(0.1, round_ends - time.monotonic()))
            except queue.Empty:
                break
            if obs.kind is ObservationKind.WATCH_LIMIT:
                reports.append([os.fsdecode(obs.path), os.fsdecode(obs.root), str(obs.role)])
            elif obs.kind is ObservationKind.CLOSED_WRITE:
                if obs.path == os.fsencode(marker):
                    break
                if obs.path.endswith(b"/f%d" % rounds):
                    seen.add(os.path.basename(os.path.dirname(obs.path)))
        if raise_to is None:
            break
    print(json.dumps({"seen": len(seen), "reports": reports, "hits": watcher.watch_limit_hits,
                      "healthy": watcher.healthy(), "limit": int(limit.read_text())}))
finally:
    watcher.stop()
"""


def run_in_user_namespace(tree: Path, raise_to: int) -> dict[str, Any]:
    if shutil.which("unshare") is None:
        pytest.skip("unshare(1) is not installed")
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "true"], check=False)
    if probe.returncode != 0:
        pytest.skip("user namespaces are not available here")
    for i in range(100):
        (tree / f"d{i:03d}").mkdir(parents=True)
    result = subprocess.run(
        ["unshare", "--user", "--map-root-user", sys.executable, "-c", _LIMIT_CHILD,
         str(tree), str(raise_to)],
        capture_output=True, text=True, timeout=60, cwd=ROOT, check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    out: dict[str, Any] = json.loads(result.stdout)
    return out


def test_the_watch_limit_is_reported_not_skipped_silently(tmp_path) -> None:
    tree = tmp_path / "tree"
    out = run_in_user_namespace(tree, 0)
    # watchdog 7 starts fine and skips what does not fit (FIELD-NOTES §1.6) ...
    assert out["healthy"]
    assert 0 < out["seen"] < 100
    # ... we say so: one report for the burst, naming the root and a folder below it
    assert out["hits"] >= 100 - 40
    reports = out["reports"]
    assert isinstance(reports, list)
    assert len(reports) == 1
    path, root, role = reports[0]
    assert root == str(tree)
    assert path.startswith(f"{tree}/d")
    assert role == "destination"
    assert out["limit"] == 40  # not allowed to raise it


def test_the_watch_limit_is_raised_and_skipped_folders_are_watched_again(tmp_path) -> None:
    tree = tmp_path / "tree"
    out = run_in_user_namespace(tree, 1000)
    assert out["limit"] == 1000
    assert out["seen"] == 100
    assert out["hits"] >= 1
    assert out["reports"]
    assert out["healthy"]
