"""agent.proccache: facts of real processes, and a /proc-shaped tree for PID reuse."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from agent.proccache import ProcessCache, user_name
from tests.procs import wait_until

SLEEPER = "import sys; print('ready', flush=True); sys.stdin.read()"


@pytest.fixture
def sleeper():
    """Factory: a real child that lives until its stdin closes."""
    children: list[subprocess.Popen[str]] = []

    def spawn() -> subprocess.Popen[str]:
        child = subprocess.Popen(
            [sys.executable, "-c", SLEEPER, "marker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        children.append(child)
        assert child.stdout is not None
        assert child.stdout.readline() == "ready\n"
        return child

    yield spawn
    for child in children:
        assert child.stdin is not None and child.stdout is not None
        if not child.stdin.closed:
            child.stdin.close()
        child.wait(timeout=10)
        child.stdout.close()


def end(child: subprocess.Popen[str]) -> None:
    assert child.stdin is not None
    child.stdin.close()
    child.wait(timeout=10)


class FakeProc:
    """A /proc-shaped tree: what the kernel would show for made-up processes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir()
        (root / "stat").write_bytes(b"cpu  1 2 3\nbtime 1700000000\n")

    def process(
        self,
        pid: int,
        *,
        start: int,
        exe: bytes | None,
        cmdline: tuple[bytes, ...],
        comm: bytes = b"prog",
        ppid: int = 1,
        uid: int = 1000,
        euid: int = 1000,
        loginuid: int = 4294967295,
    ) -> None:
        base = self.root / str(pid)
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir()
        rest = [b"S", str(ppid).encode()] + [b"0"] * 17 + [str(start).encode(), b"0"]
        (base / "stat").write_bytes(b"%d (%s) %s\n" % (pid, comm, b" ".join(rest)))
        if exe is not None:
            os.symlink(exe, base / "exe")
        (base / "cmdline").write_bytes(b"".join(arg + b"\0" for arg in cmdline))
        (base / "status").write_bytes(
            b"Name:\tprog\nUid:\t%d\t%d\t%d\t%d\nGid:\t0\t0\t0\t0\n" % (uid, euid, euid, euid)
        )
        (base / "loginuid").write_bytes(b"%d" % loginuid)

    def gone(self, pid: int) -> None:
        shutil.rmtree(self.root / str(pid))


@pytest.fixture
def fake(tmp_path: Path) -> FakeProc:
    return FakeProc(tmp_path / "proc")


def test_a_live_process_is_described_like_psutil_sees_it(sleeper) -> None:
    child = sleeper()
    cache = ProcessCache()
    facts = cache.lookup(child.pid, now=0.0)
    assert facts is not None and facts.complete
    real = psutil.Process(child.pid)
    assert facts.process.pid == child.pid
    assert facts.process.start_time_ns == round(real.create_time() * 1e9)
    assert facts.process.exe == os.fsencode(real.exe())
    assert facts.process.cmdline == (
        os.fsencode(sys.executable),
        b"-c",
        SLEEPER.encode(),
        b"marker",
    )
    assert facts.process.ppid_chain[0] == os.getpid()
    assert facts.process.name == real.name()
    assert facts.user.uid == os.getuid()
    assert facts.user.effective == user_name(os.geteuid())
    assert cache.lookup(child.pid, now=1.0) is facts  # served from the cache
    assert cache.get(child.pid, facts.start_ticks) is facts


def test_a_process_that_exited_is_remembered_only_for_the_grace_period(sleeper) -> None:
    child = sleeper()
    cache = ProcessCache(grace=2.0)
    facts = cache.lookup(child.pid, now=100.0)
    end(child)  # exited and reaped: /proc/<pid> is gone
    assert cache.start_ticks(child.pid) is None
    assert cache.lookup(child.pid, now=101.5) is facts
    assert cache.lookup(child.pid, now=102.5) is None


def test_a_zombie_still_gives_its_name_user_and_start_time() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        # Exited but not reaped (we have not waited): a zombie, exe and cmdline gone.
        wait_until(
            lambda: psutil.Process(child.pid).status() == psutil.STATUS_ZOMBIE, 10, "a zombie"
        )
        facts = ProcessCache().lookup(child.pid, now=0.0)
        assert facts is not None
        assert not facts.complete
        assert facts.process.exe == b""
        assert facts.process.name
        assert facts.process.start_time_ns == round(psutil.Process(child.pid).create_time() * 1e9)
        assert facts.user.uid == os.getuid()
    finally:
        child.wait(timeout=10)


def test_a_reused_pid_never_gets_the_old_process_facts(fake: FakeProc) -> None:
    cache = ProcessCache(proc=fake.root, grace=2.0)
    fake.process(4242, start=500, exe=b"/usr/bin/cp", cmdline=(b"cp", b"a", b"b"))
    old = cache.lookup(4242, now=10.0)
    assert old is not None and old.process.exe == b"/usr/bin/cp"
    assert old.process.start_time_ns == round((500 / os.sysconf("SC_CLK_TCK") + 1.7e9) * 1e9)
    # cp exits; the pid goes to another program with another start time.
    fake.process(4242, start=900, exe=b"/usr/bin/vim", cmdline=(b"vim",), uid=0, euid=0)
    new = cache.lookup(4242, now=10.5)
    assert new is not None
    assert (new.process.exe, new.start_ticks) == (b"/usr/bin/vim", 900)
    assert new.user.uid == 0
    assert cache.get(4242, 500) is old  # what cp did is still told as cp's
    # The new one exits too: within the grace only the newest answers, never cp.
    fake.gone(4242)
    assert cache.lookup(4242, now=11.0) is new
    assert cache.lookup(4242, now=13.0) is None


def test_an_exec_under_the_same_pid_and_start_time_is_read_again(fake: FakeProc) -> None:
    cache = ProcessCache(proc=fake.root)
    fake.process(77, start=5, exe=b"/usr/bin/bash", cmdline=(b"bash",))
    before = cache.lookup(77, now=0.0)
    assert before is not None and before.process.exe == b"/usr/bin/bash"
    fake.process(77, start=5, exe=b"/usr/bin/cat", cmdline=(b"cat", b"secret"))
    facts = cache.lookup(77, now=0.1)
    assert facts is not None
    assert (facts.process.exe, facts.process.cmdline) == (b"/usr/bin/cat", (b"cat", b"secret"))


def test_a_zombie_keeps_what_was_seen_while_it_lived(fake: FakeProc) -> None:
    cache = ProcessCache(proc=fake.root)
    fake.process(88, start=5, exe=b"/usr/bin/dd", cmdline=(b"dd", b"of=x"))
    alive = cache.lookup(88, now=0.0)
    fake.process(88, start=5, exe=None, cmdline=())  # exited, not yet reaped
    assert cache.lookup(88, now=0.1) is alive


def test_login_user_survives_sudo_and_odd_names_parse(fake: FakeProc) -> None:
    cache = ProcessCache(proc=fake.root)
    fake.process(99, start=7, exe=b"/x", cmdline=(b"x",), comm=b"a) (b", uid=0, euid=0, loginuid=0)
    facts = cache.lookup(99, now=0.0)
    assert facts is not None
    assert facts.process.name == "a) (b"
    assert facts.user.login == user_name(0)
    fake.process(98, start=7, exe=b"/x", cmdline=(b"x",), uid=2**31 - 7, euid=0)
    nobody = cache.lookup(98, now=0.0)
    assert nobody is not None
    assert (nobody.user.login, nobody.user.effective) == (str(2**31 - 7), user_name(0))


def test_the_cache_is_bounded(fake: FakeProc) -> None:
    cache = ProcessCache(proc=fake.root, capacity=2)
    for pid in (10, 11, 12):
        fake.process(pid, start=pid, exe=b"/x", cmdline=(b"x",))
        assert cache.lookup(pid, now=0.0) is not None
    assert len(cache) == 2
    assert cache.get(10, 10) is None
    fake.gone(10)
    assert cache.lookup(10, now=0.0) is None  # forgotten, not confused with 11 or 12


def test_an_unknown_or_gone_pid_gives_nothing(fake: FakeProc) -> None:
    cache = ProcessCache(proc=fake.root)
    assert cache.lookup(12345, now=0.0) is None
    (fake.root / "13").mkdir()
    (fake.root / "13" / "stat").write_bytes(b"garbage")
    assert cache.lookup(13, now=0.0) is None
