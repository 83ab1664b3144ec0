"""Silent agents: an agent heard from by neither heartbeat nor upload for too long.

The core is sans-I/O (`silent_agents`, time passed in); `Monitor` is the thread
in `serve` that asks the store and records one alert per silence. A crash and a
clean stop are told apart by the agent's last lifecycle event: a clean stop
sends `agent_stop` before it goes quiet, a crash, power loss or a killed agent
does not.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from collector.errors import CollectorError
from collector.models import Severity
from collector.records import AgentRecord
from collector.render import human_duration

logger = logging.getLogger(__name__)


class SilenceKind(StrEnum):
    CRASHED = "AgentSilent"
    """Silent without a clean stop: crash, power loss, network cut, or someone stopped it."""
    STOPPED = "AgentStopped"
    """Stopped cleanly (agent_stop received) and not back."""


@dataclass(frozen=True)
class Silence:
    agent_id: str
    hostname: str
    last_seen_ns: int
    kind: SilenceKind

    @property
    def severity(self) -> Severity:
        return Severity.HIGH if self.kind is SilenceKind.CRASHED else Severity.LOW

    def reason(self, now_ns: int) -> str:
        quiet = human_duration((now_ns - self.last_seen_ns) / 1e9)
        if self.kind is SilenceKind.CRASHED:
            return (
                f"agent on {self.hostname} silent for {quiet} without a clean stop "
                "(crash, power loss, network cut, or stopped by someone)"
            )
        return f"agent on {self.hostname} stopped cleanly {quiet} ago and has not come back"


def silent_agents(
    agents: Iterable[AgentRecord], stopped: Callable[[str], bool], now_ns: int, silent_after_ns: int
) -> list[Silence]:
    """Agents not heard from for `silent_after_ns`; `stopped(id)`: its last word was agent_stop."""
    out = []
    for agent in agents:
        if agent.revoked:
            continue
        last = agent.last_seen_ns or agent.enrolled_at_ns
        if now_ns - last < silent_after_ns:
            continue
        kind = SilenceKind.STOPPED if stopped(agent.agent_id) else SilenceKind.CRASHED
        out.append(Silence(agent.agent_id, agent.hostname, last, kind))
    return out


class MonitorStore(Protocol):
    def list_agents(self) -> list[AgentRecord]: ...

    def stopped_cleanly(self, agent_id: str) -> bool: ...

    def record_security_alert(
        self, agent_id: str, reason_kind: str, message: str, now_ns: int, severity: Severity
    ) -> object: ...


class Monitor:
    """Checks for silent agents every `interval_s` until `stop()`; joins its thread."""

    def __init__(
        self,
        store: MonitorStore,
        silent_after_ns: int,
        clock_ns: Callable[[], int],
        interval_s: float,
    ) -> None:
        self._store = store
        self._silent_after_ns = silent_after_ns
        self._clock_ns = clock_ns
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="agent-monitor")

    def check(self) -> list[Silence]:
        now = self._clock_ns()
        found = silent_agents(
            self._store.list_agents(), self._store.stopped_cleanly, now, self._silent_after_ns
        )
        for silence in found:
            # One open alert per agent and kind: the store counts repeats on it.
            self._store.record_security_alert(
                silence.agent_id, silence.kind.value, silence.reason(now), now, silence.severity
            )
        return found

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.check()
            except CollectorError:
                # A failed pass (database busy, disk full) is retried on the next one.
                logger.exception("agent monitor pass failed")
