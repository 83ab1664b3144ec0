"""agent.supervisor: a dead watcher or worker is restarted, reported and rescanned (real ones)."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable

import pytest

from agent.index import FileHasher, HashOutcome, StatOutcome
from agent.pipeline import GapReason
from agent.supervisor import RestartBudget, Supervisor, restart_watcher
from tests.agent.pipeline_harness import (
    TIMEOUT,
    Harness,
    labelled,
)

pytestmark = pytest.mark.filterwarnings("ignore:Callback with id:RuntimeWarning")


def test_the_restart_budget_is_a_sliding_window() -> None:
    budget = RestartBudget(max_restarts=2, window=60.0)
    assert budget.allow(0.0)
    assert budget.allow(10.0)
    assert not budget.allow(20.0)
    assert budget.allow(60.0)  # the first one left the window
    assert not budget.allow(65.0)


def supervise(h: Harness, **budgets: RestartBudget) -> Supervisor:
    return Supervisor(h.watcher.healthy, lambda: restart_watcher(h.watcher), h.pipeline, **budgets)


def poll(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        threading.Event().wait(0.01)  # polling with a deadline


def test_a_dead_watcher_is_restarted_reported_and_what_it_missed_is_found(dirs, harness) -> None:
    missed = labelled(dirs.sensitive / "missed.pdf", os.urandom(4000))
    later = labelled(dirs.sensitive / "later.pdf", os.urandom(4100))
    h = harness()
    h.start()
    supervisor = supervise(h)
    assert supervisor.check(time.monotonic()) is None  # healthy: nothing to do
    # The destination folder is removed and made again (a remount does the same):
    # its watch died with the old directory.
    shutil.rmtree(dirs.usb)
    poll(lambda: not h.watcher.healthy(), "the watcher to notice")
    dirs.usb.mkdir()
    subprocess.run(["cp", str(missed), str(dirs.usb)], check=True)  # nobody is watching

    assert supervisor.check(time.monotonic()) is None
    gap = h.wait_gap(GapReason.WATCHER_RESTARTED)
    assert gap.gap is not None
    assert gap.gap.count == 1
    assert h.wait_copy_to(dirs.usb / "missed.pdf").source is not None  # by the rescan
    assert h.watcher.healthy()
    assert supervisor.watcher_restarts == 1
    subprocess.run(["cp", str(later), str(dirs.usb)], check=True)  # watched again
    h.wait_copy_to(dirs.usb / "later.pdf")
    assert supervisor.check(time.monotonic()) is None
    h.stop()
    assert len(h.copies()) == 2


def test_a_watcher_that_cannot_come_back_fails_the_agent(dirs, harness) -> None:
    h = harness()
    h.start()
    supervisor = supervise(h)
    shutil.rmtree(dirs.usb)
    poll(lambda: not h.watcher.healthy(), "the watcher to notice")
    failure = supervisor.check(time.monotonic())
    assert failure is not None
    assert "cannot be restarted" in failure


class Fatal(BaseException):
    """Not an Exception: ends the worker thread, as only a bug in the loop itself could."""


class Dying:
    """A real hasher that raises `error` for paths containing `victim`, `times` times."""

    def __init__(self, victim: str, error: BaseException, times: int = 1) -> None:
        self.real = FileHasher(2**31)
        self.victim = victim.encode()
        self.error = error
        self.times = times

    def stat(self, path: bytes) -> StatOutcome:
        return self.real.stat(path)

    def hash_file(self, path: bytes, expect: os.stat_result | None = None) -> HashOutcome:
        if self.victim in path and self.times > 0:
            self.times -= 1
            raise self.error
        return self.real.hash_file(path, expect)


def test_a_handler_exception_is_counted_and_the_workers_carry_on(dirs, harness) -> None:
    bad = labelled(dirs.sensitive / "bad.pdf", os.urandom(4000))
    good = labelled(dirs.sensitive / "good.pdf", os.urandom(4100))
    h = harness(hasher=Dying("usb/bad.pdf", RuntimeError("a bug in a parser")))
    h.start()
    subprocess.run(["cp", str(bad), str(dirs.usb)], check=True)
    h.wait(lambda seen: h.pipeline.stats().errors >= 1)
    subprocess.run(["cp", str(good), str(dirs.usb)], check=True)
    h.wait_copy_to(dirs.usb / "good.pdf")
    assert h.pipeline.alive
    assert h.pipeline.failure is None


def test_a_dead_worker_is_restarted_reported_and_its_file_found_again(dirs, harness) -> None:
    victim = labelled(dirs.sensitive / "victim.pdf", os.urandom(4000))
    h = harness(hasher=Dying("usb/victim.pdf", Fatal()))
    h.start()
    supervisor = supervise(h)
    subprocess.run(["cp", str(victim), str(dirs.usb)], check=True)
    poll(lambda: not h.pipeline.alive, "a worker to die")
    assert isinstance(h.pipeline.failure, Fatal)

    assert supervisor.check(time.monotonic()) is None
    assert h.pipeline.alive
    gap = h.wait_gap(GapReason.WORKER_RESTARTED)
    assert gap.gap is not None
    assert gap.gap.count == 1
    h.wait_copy_to(dirs.usb / "victim.pdf")  # the rescan after the restart
    assert supervisor.worker_restarts == 1
    h.stop()
    assert len(h.copies()) == 1


def test_workers_that_keep_dying_fail_the_agent(dirs, harness) -> None:
    victims = [labelled(dirs.sensitive / f"v{i}.pdf", os.urandom(4000 + i)) for i in range(2)]
    h = harness(hasher=Dying("usb/v", Fatal(), times=10))
    h.start()
    supervisor = supervise(h, worker_budget=RestartBudget(max_restarts=1, window=600.0))
    for path in victims:
        subprocess.run(["cp", str(path), str(dirs.usb)], check=True)
    poll(lambda: not h.pipeline.alive, "a worker to die")
    assert supervisor.check(time.monotonic()) is None  # the one restart allowed
    poll(lambda: not h.pipeline.alive, "a worker to die again")  # the rescan kills it again
    assert supervisor.check(time.monotonic()) == "pipeline workers keep dying"
