"""Supervision, polled by the service loop: a dead watcher or pipeline worker is restarted.

Never silently blind (issue 3): each restart is reported as a coverage gap
(`watcher_restarted`, `worker_restarted`) and followed by a rescan, so copies
made while the agent was blind are still found. Restarts are budgeted: a part
that keeps dying fails the agent, and the service manager restarts the process.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from agent.errors import AgentError
from agent.pipeline import GapReason
from agent.watcher import Role

logger = logging.getLogger(__name__)

DEFAULT_MAX_RESTARTS = 5
DEFAULT_RESTART_WINDOW = 300.0
"""Seconds: more than `DEFAULT_MAX_RESTARTS` restarts of one part within it fail the agent."""


class RestartBudget:
    """At most `max_restarts` within `window` seconds (sans-I/O: `now` is passed in)."""

    def __init__(
        self, max_restarts: int = DEFAULT_MAX_RESTARTS, window: float = DEFAULT_RESTART_WINDOW
    ) -> None:
        self._max = max_restarts
        self._window = window
        self._times: deque[float] = deque()

    def allow(self, now: float) -> bool:
        """True (and counted) when one more restart fits in the budget."""
        while self._times and now - self._times[0] >= self._window:
            self._times.popleft()
        if len(self._times) >= self._max:
            return False
        self._times.append(now)
        return True


class RestartableWatcher(Protocol):
    """What `restart_watcher` needs from `agent.watcher.Watcher`."""

    def roots(self) -> list[tuple[bytes, Role]]: ...

    def stop(self) -> None: ...

    def start(self) -> None: ...

    def add_root(self, path: Path | bytes, role: Role) -> bool: ...


def restart_watcher(watcher: RestartableWatcher) -> None:
    """Stop and start a (dead) watcher, then watch again the roots added while it ran.

    `start()` watches the configured roots; mounts and sync folders added later
    (agent.destinations) are added back. Raises `AgentError` (ConfigError) when a
    configured root cannot be watched any more.
    """
    roots = watcher.roots()
    watcher.stop()
    watcher.start()
    for root, role in sorted(set(roots) - set(watcher.roots())):
        watcher.add_root(root, role)


class SupervisedPipeline(Protocol):
    """What the supervisor needs from `agent.pipeline.Pipeline`."""

    @property
    def alive(self) -> bool: ...

    def restart_workers(self) -> int: ...

    def report_gap(self, reason: str, count: int = 1) -> None: ...

    def request_rescan(self) -> None: ...


class Supervisor:
    """Checks the watcher and the pipeline workers; restarts, reports and rescans.

    `watcher_healthy` is `Watcher.healthy`; `restart_watcher` stops and starts it
    again (raising `AgentError` when it cannot, e.g. a root is gone), normally
    `lambda: restart_watcher(watcher)`. `check` runs
    in the service loop and returns a failure message when the agent should stop
    so that the service manager restarts it: a part died more often than the
    budget allows, or the watcher cannot be restarted.
    """

    def __init__(
        self,
        watcher_healthy: Callable[[], bool],
        restart_watcher: Callable[[], None],
        pipeline: SupervisedPipeline,
        *,
        watcher_budget: RestartBudget | None = None,
        worker_budget: RestartBudget | None = None,
    ) -> None:
        self._watcher_healthy = watcher_healthy
        self._restart_watcher = restart_watcher
        self._pipeline = pipeline
        self._watcher_budget = watcher_budget or RestartBudget()
        self._worker_budget = worker_budget or RestartBudget()
        self.watcher_restarts = 0
        self.worker_restarts = 0

    def check(self, now: float) -> str | None:
        """One round: None when all is well (again), else why the agent must stop."""
        if not self._pipeline.alive:
            if not self._worker_budget.allow(now):
                return "pipeline workers keep dying"
            restarted = self._pipeline.restart_workers()
            if not restarted:
                return "pipeline is not running"
            self.worker_restarts += restarted
            logger.error("pipeline worker died: restarted %d, rescanning", restarted)
            self._pipeline.report_gap(GapReason.WORKER_RESTARTED, restarted)
        if not self._watcher_healthy():
            if not self._watcher_budget.allow(now):
                return "filesystem watcher keeps dying"
            logger.error("filesystem watcher died: restarting it, then rescanning")
            try:
                self._restart_watcher()
            except AgentError as e:
                logger.error("cannot restart the filesystem watcher: %s", e)
                return f"filesystem watcher died and cannot be restarted: {e}"
            self.watcher_restarts += 1
            self._pipeline.report_gap(GapReason.WATCHER_RESTARTED)
            # After the restart: what happened while blind is on disk, not in events.
            self._pipeline.request_rescan()
        return None
