"""agent.mounts: mountinfo parsing, diffing, and following real mounts (root) with poll()."""

from __future__ import annotations

import os
import queue
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.errors import AgentError
from agent.mounts import Mount, MountFollower, diff_mounts, parse_mountinfo, read_mounts

TIMEOUT = 10.0

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")

# Lines as the kernel writes them (proc_pid_mountinfo(5) and real machines).
SAMPLE = (
    b"22 27 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw\n"
    b"27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw,discard\n"
    b"36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n"
    # USB stick automounted under a label with a space, a tab and a backslash
    b"91 27 8:17 / /media/alice/KINGSTON\\040DT50\\011x\\134y rw,nosuid,nodev,relatime"
    b" shared:300 master:7 propagate_from:2 - vfat /dev/sdb1 rw,fmask=0022,uid=1000\n"
    # bind mount of a subfolder: root is not /
    b"95 27 254:0 /srv/data /home/alice/data rw,relatime - ext4 /dev/vda rw\n"
    b"97 27 0:55 / /home/alice/remote rw,nosuid,nodev - fuse.sshfs bob@host:/home/bob"
    b" rw,user_id=1000\n"
    b"98 27 0:56 / /net/share rw - nfs4 nas:/export rw,vers=4.2,addr=10.0.0.2\n"
    b"99 27 0:57 / /weird rw -\n"  # malformed: no type or source
    b"\n"
)


def test_fields_are_parsed_and_escapes_decoded() -> None:
    mounts = {m.mount_id: m for m in parse_mountinfo(SAMPLE)}
    assert set(mounts) == {22, 27, 36, 91, 95, 97, 98}
    stick = mounts[91]
    assert stick.parent_id == 27
    assert (stick.major, stick.minor) == (8, 17)
    assert stick.mount_point == b"/media/alice/KINGSTON DT50\tx\\y"
    assert isinstance(stick.mount_point, bytes)
    assert stick.root == b"/"
    assert stick.fs_type == "vfat"
    assert stick.source == "/dev/sdb1"
    assert stick.options == "rw,nosuid,nodev,relatime"
    assert stick.super_options == "rw,fmask=0022,uid=1000"
    assert stick.optional == ("shared:300", "master:7", "propagate_from:2")


def test_bind_mounts_keep_their_root_and_optional_fields_may_be_absent() -> None:
    mounts = {m.mount_id: m for m in parse_mountinfo(SAMPLE)}
    bind = mounts[95]
    assert bind.root == b"/srv/data"
    assert bind.mount_point == b"/home/alice/data"
    assert bind.optional == ()
    assert (bind.major, bind.minor) == (mounts[27].major, mounts[27].minor)
    assert mounts[36].optional == ("master:1",)
    assert mounts[36].root == b"/mnt1"
    assert mounts[97].fs_type == "fuse.sshfs"
    assert mounts[97].source == "bob@host:/home/bob"
    assert (mounts[98].major, mounts[98].fs_type) == (0, "nfs4")


def test_non_utf8_mount_points_stay_bytes() -> None:
    line = b"5 1 0:9 / /media/caf\xe9\\040x rw - tmpfs tmpfs rw\n"
    (mount,) = parse_mountinfo(line)
    assert mount.mount_point == b"/media/caf\xe9 x"


def test_this_machines_table_has_a_root_mount() -> None:
    mounts = read_mounts()
    assert any(m.mount_point == b"/" for m in mounts)
    with pytest.raises(AgentError, match="cannot read the mount table"):
        read_mounts(Path("/nonexistent/mountinfo"))


def mount(mount_id: int, mp: bytes, *, options: str = "rw", fs: str = "ext4") -> Mount:
    return Mount(mount_id, 1, 8, 1, b"/", mp, options, fs, "/dev/sdb1")


def test_diff_by_mount_id_treats_a_move_as_unmount_plus_mount() -> None:
    old = [mount(1, b"/"), mount(2, b"/media/a"), mount(3, b"/media/b")]
    new = [
        mount(1, b"/", options="ro"),  # options only: no change for us
        mount(3, b"/media/moved"),  # mount --move keeps the id
        mount(4, b"/media/a"),  # remounted: a new id
    ]
    added, removed = diff_mounts(old, new)
    assert sorted((m.mount_id, m.mount_point) for m in added) == [
        (3, b"/media/moved"),
        (4, b"/media/a"),
    ]
    assert sorted((m.mount_id, m.mount_point) for m in removed) == [
        (2, b"/media/a"),
        (3, b"/media/b"),
    ]
    assert diff_mounts(old, old) == ([], [])


def test_start_reports_the_current_table_and_stop_is_prompt(tmp_path) -> None:
    # A regular file never signals POLLPRI: the follower reads it once, then waits.
    table = tmp_path / "mountinfo"
    table.write_bytes(SAMPLE)
    calls: list[tuple[list[Mount], list[Mount]]] = []
    follower = MountFollower(lambda a, r: calls.append((a, r)), path=table)
    follower.start()
    assert follower.healthy()
    assert len(calls) == 1
    assert {m.mount_id for m in calls[0][0]} == {22, 27, 36, 91, 95, 97, 98}
    assert calls[0][1] == []
    started = time.monotonic()
    follower.stop()
    assert time.monotonic() - started < 1.0
    assert not follower.healthy()
    follower.stop()  # idempotent


def test_a_missing_table_is_an_agent_error(tmp_path) -> None:
    follower = MountFollower(lambda a, r: None, path=tmp_path / "absent")
    with pytest.raises(AgentError, match="cannot follow the mount table"):
        follower.start()


# real mounts (root)


class Changes:
    def __init__(self) -> None:
        self.q: queue.Queue[tuple[list[Mount], list[Mount]]] = queue.Queue()
        self.fail_next = False

    def __call__(self, added: list[Mount], removed: list[Mount]) -> None:
        self.q.put((added, removed))
        if self.fail_next:
            self.fail_next = False
            raise AgentError("handler trouble")

    def wait(self, what: str, mp: bytes) -> Mount:
        deadline = time.monotonic() + TIMEOUT
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"no {what} of {mp!r} reported")
            try:
                added, removed = self.q.get(timeout=left)
            except queue.Empty:
                continue
            for m in added if what == "mount" else removed:
                if m.mount_point == mp:
                    return m


@pytest.fixture
def tmpfs(tmp_path) -> Iterator[list[Path]]:
    """Mount points to use; whatever is still mounted there is unmounted at the end."""
    used: list[Path] = []
    yield used
    for path in reversed(used):
        while os.path.ismount(path):
            subprocess.run(["umount", "-l", path], check=False)


@needs_root
def test_mounts_and_unmounts_are_reported_as_they_happen(tmp_path, tmpfs) -> None:
    point = tmp_path / "USB STICK"  # a space: escaped as \040 in mountinfo
    point.mkdir()
    tmpfs.append(point)
    changes = Changes()
    follower = MountFollower(changes)
    follower.start()
    try:
        changes.q.get_nowait()  # the initial table
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "exfw-test", point], check=True)
        added = changes.wait("mount", os.fsencode(point))
        assert added.fs_type == "tmpfs"
        assert added.source == "exfw-test"
        assert added.major == 0
        assert any(m.mount_id == added.mount_id for m in follower.mounts)
        subprocess.run(["umount", point], check=True)
        removed = changes.wait("unmount", os.fsencode(point))
        assert removed.mount_id == added.mount_id
        assert follower.changes >= 2
    finally:
        follower.stop()


@needs_root
def test_a_failing_handler_is_counted_and_following_goes_on(tmp_path, tmpfs) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    for point in (first, second):
        point.mkdir()
        tmpfs.append(point)
    changes = Changes()
    follower = MountFollower(changes)
    follower.start()
    try:
        changes.q.get_nowait()
        changes.fail_next = True
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "exfw-a", first], check=True)
        changes.wait("mount", os.fsencode(first))
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "exfw-b", second], check=True)
        changes.wait("mount", os.fsencode(second))
        assert follower.errors == 1
        assert follower.healthy()
    finally:
        follower.stop()
        for point in (second, first):
            subprocess.run(["umount", point], check=False)
