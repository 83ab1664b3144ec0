"""Agent status for operators: the running agent's status.json, and `exfilwatch-agent status`.

The service writes <state>/status.json every few seconds (atomically). The status command
reads it; when the agent is not running it reads the spool itself, read-only, because the
running agent holds the spool with an exclusive lock.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sqlite3
import urllib.parse
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from agent.config import AgentConfig
from agent.errors import StateError
from agent.identity import SPOOL, Identity
from agent.spool import Spool
from agent.usage import Usage

logger = logging.getLogger(__name__)

STATUS_FILE = "status.json"
STATUS_INTERVAL_S = 5.0
"""How often the running agent rewrites status.json."""
STALE_AFTER_S = 6 * STATUS_INTERVAL_S
"""A running agent whose status.json is older than this is reported as not responding."""


class AckTrackingSpool(Spool):
    """The spool, remembering the last batch the collector acknowledged in this run."""

    last_acked: int | None = None

    def ack(self, batch_seq: int) -> None:
        super().ack(batch_seq)
        self.last_acked = batch_seq


@dataclass(frozen=True)
class AgentStatus:
    """The content of status.json."""

    agent_id: str
    pid: int
    running: bool
    """False in the last status written at shutdown."""
    healthy: bool
    """Every stage alive and the pipeline making progress (what the watchdog pings on)."""
    connected: bool
    """The last call to the collector succeeded."""
    acked_batches: int
    """Batches acknowledged since this agent started."""
    last_ack_batch_seq: int | None
    spool_pending_events: int
    spool_sealed_batches: int
    coverage_gaps: int
    """coverage_gap events reported since this agent started."""
    policy_revision: str
    started_at_ns: int
    updated_at_ns: int
    failure: str | None = None
    cpu_percent: float = 0.0
    """The agent's CPU since the previous status (agent.usage), in percent of one core."""
    rss_bytes: int = 0
    """Its resident memory. Both 0 in a status file written by an older agent."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    def summary(self, target: str) -> str:
        """One line for the service manager (`systemctl status` shows it)."""
        return (
            f"{'connected' if self.connected else 'not connected'} to {target}; "
            f"{self.spool_pending_events} events pending, "
            f"{self.spool_sealed_batches} batches unacknowledged"
        )

    @classmethod
    def from_json(cls, text: str) -> AgentStatus:
        try:
            data = json.loads(text)
            return cls(**data)
        except (ValueError, TypeError) as e:
            raise StateError(f"{STATUS_FILE}: damaged ({e})") from e


class ShipperState(Protocol):
    connected: bool
    acked_batches: int


def agent_status(
    agent_id: str,
    spool: Spool,
    shipper: ShipperState | None,
    *,
    running: bool,
    healthy: bool,
    coverage_gaps: int,
    policy_revision: str,
    started_at_ns: int,
    now_ns: int,
    failure: str | None,
    usage: Usage | None = None,
) -> AgentStatus:
    """The running agent's status, from its spool and shipper."""
    pending, sealed = spool.depth()
    last = spool.last_acked if isinstance(spool, AckTrackingSpool) else None
    if last is None:  # nothing acknowledged in this run yet; acks come in batch order
        oldest = spool.next_unacked()
        last = oldest.batch_seq - 1 if oldest is not None and oldest.batch_seq > 1 else None
    return AgentStatus(
        agent_id=agent_id,
        pid=os.getpid(),
        running=running,
        healthy=healthy,
        connected=shipper is not None and shipper.connected,
        acked_batches=shipper.acked_batches if shipper is not None else 0,
        last_ack_batch_seq=last,
        spool_pending_events=pending,
        spool_sealed_batches=sealed,
        coverage_gaps=coverage_gaps,
        policy_revision=policy_revision,
        started_at_ns=started_at_ns,
        updated_at_ns=now_ns,
        failure=failure,
        cpu_percent=usage.cpu_percent if usage is not None else 0.0,
        rss_bytes=usage.rss_bytes if usage is not None else 0,
    )


def write_status(state_dir: Path, status: AgentStatus) -> None:
    """Replace <state>/status.json atomically, so a reader never sees half of it."""
    path = state_dir / STATUS_FILE
    tmp = path.with_name(path.name + ".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(status.to_json())
        os.replace(tmp, path)
    except OSError as e:
        raise StateError(f"cannot write {path}: {e.strerror}") from e


def read_status(state_dir: Path) -> AgentStatus | None:
    """The last status the agent wrote, or None if it never wrote one."""
    try:
        text = (state_dir / STATUS_FILE).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StateError(f"cannot read {state_dir / STATUS_FILE}: {e.strerror}") from e
    return AgentStatus.from_json(text)


@dataclass(frozen=True)
class SpoolSnapshot:
    pending_events: int
    sealed_batches: int
    last_ack_batch_seq: int | None
    """None when no batch was ever acknowledged."""


class SpoolLocked(StateError):
    """The spool is held by a running agent."""


def read_spool(path: Path) -> SpoolSnapshot | None:
    """Depth and last acknowledged batch of a spool not in use; None if there is no spool.

    Opened read-only (`mode=ro`). Raises SpoolLocked while an agent holds it. SQLite may
    leave empty -wal/-shm companions beside it (0600, like the database); the agent
    reuses them and `uninstall` removes them.
    """
    if not path.exists():
        return None
    uri = f"file:{urllib.parse.quote(str(path))}?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=0, isolation_level=None)
    except sqlite3.Error as e:
        raise StateError(f"cannot open spool {path}: {e}") from e
    try:
        (pending,) = conn.execute("SELECT count(*) FROM pending").fetchone()
        (sealed, oldest) = conn.execute("SELECT count(*), min(batch_seq) FROM batches").fetchone()
        (next_batch,) = conn.execute("SELECT next_batch_seq FROM meta").fetchone()
    except sqlite3.OperationalError as e:
        if "locked" in str(e):
            raise SpoolLocked(f"spool {path} is locked by a running agent") from e
        raise StateError(f"cannot read spool {path}: {e}") from e
    except (sqlite3.Error, TypeError) as e:  # TypeError: no meta row yet
        raise StateError(f"cannot read spool {path}: {e}") from e
    finally:
        conn.close()
    last = (oldest if oldest is not None else next_batch) - 1
    return SpoolSnapshot(int(pending), int(sealed), last if last > 0 else None)


class RunState(StrEnum):
    RUNNING = "running"
    LOCKED = "running (spool locked)"
    """An agent holds the spool but writes no status.json (it predates it)."""
    UNRESPONSIVE = "not responding"
    STOPPED = "stopped"
    NOT_ENROLLED = "not enrolled"

    @property
    def exit_code(self) -> int:
        """LSB init-script conventions: 0 running, 1 dead but not cleanly stopped, 3 stopped."""
        if self in (RunState.RUNNING, RunState.LOCKED):
            return 0
        if self is RunState.UNRESPONSIVE:
            return 1
        return 3


@dataclass(frozen=True)
class StatusReport:
    """What `exfilwatch-agent status` shows."""

    state: RunState
    config: str
    state_dir: str
    agent_id: str | None = None
    collector: str | None = None
    pid: int | None = None
    connected: bool | None = None
    healthy: bool | None = None
    last_ack_batch_seq: int | None = None
    acked_batches: int | None = None
    spool_pending_events: int | None = None
    spool_sealed_batches: int | None = None
    coverage_gaps: int | None = None
    cpu_percent: float | None = None
    rss_bytes: int | None = None
    policy_revision: str | None = None
    updated_at: str | None = None
    failure: str | None = None
    problem: str | None = None
    """Why some figures are missing (e.g. the spool could not be read)."""

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "enrolled": self.state is not RunState.NOT_ENROLLED})

    def to_text(self) -> str:
        lines = [
            f"exfilwatch-agent: {self.state.value}" + (f" (pid {self.pid})" if self.pid else "")
        ]

        def add(name: str, value: object) -> None:
            if value is not None:
                lines.append(f"  {name + ':':<18}{value}")

        add("agent id", self.agent_id)
        if self.collector is not None:
            connected = {True: " (connected)", False: " (not connected)", None: ""}
            add("collector", self.collector + connected[self.connected])
        add("healthy", None if self.healthy is None else ("yes" if self.healthy else "no"))
        if self.state is not RunState.NOT_ENROLLED:
            add("last acked batch", self.last_ack_batch_seq or "none")
        add("acked since start", self.acked_batches)
        if self.spool_pending_events is not None:
            add(
                "spool",
                f"{self.spool_pending_events} events pending, "
                f"{self.spool_sealed_batches} batches unacknowledged",
            )
        add("coverage gaps", self.coverage_gaps)
        if self.rss_bytes:  # 0: written by an older agent
            add("cost", f"{self.cpu_percent:.1f}% CPU, {self.rss_bytes / 2**20:.1f} MiB resident")
        if self.policy_revision is not None:
            add("policy revision", self.policy_revision or "none")
        add("updated", self.updated_at)
        add("last failure", self.failure)
        add("note", self.problem)
        add("config", self.config)
        add("state", self.state_dir)
        return "\n".join(lines) + "\n"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def iso(ns: int) -> str:
    return datetime.datetime.fromtimestamp(ns / 1e9, datetime.UTC).isoformat(timespec="seconds")


def collect(
    config: AgentConfig, now_ns: int, alive: Callable[[int], bool] = pid_alive
) -> StatusReport:
    """Everything `status` shows, from the state directory named in `config`."""
    state_dir = config.state_dir
    report = StatusReport(RunState.NOT_ENROLLED, str(config.source or ""), str(state_dir))
    try:
        identity = Identity.load(state_dir)
    except StateError as e:
        return replace(report, problem=str(e))
    report = replace(
        report, agent_id=identity.agent_id, collector=config.collector or identity.target
    )
    try:
        status = read_status(state_dir)
    except StateError as e:
        status, report = None, replace(report, problem=str(e))
    if status is not None:
        report = replace(
            report,
            pid=status.pid,
            healthy=status.healthy,
            connected=status.connected,
            acked_batches=status.acked_batches,
            last_ack_batch_seq=status.last_ack_batch_seq,
            spool_pending_events=status.spool_pending_events,
            spool_sealed_batches=status.spool_sealed_batches,
            coverage_gaps=status.coverage_gaps,
            cpu_percent=status.cpu_percent,
            rss_bytes=status.rss_bytes,
            policy_revision=status.policy_revision,
            updated_at=iso(status.updated_at_ns),
            failure=status.failure,
        )
        if status.running and alive(status.pid):
            fresh = now_ns - status.updated_at_ns < STALE_AFTER_S * 1e9
            return replace(report, state=RunState.RUNNING if fresh else RunState.UNRESPONSIVE)
    # Not running, or it never wrote a status: what is left in the spool is the truth.
    report = replace(
        report,
        state=RunState.STOPPED,
        pid=None,
        connected=None,
        healthy=None,
        acked_batches=None,
        coverage_gaps=None,
        cpu_percent=None,
        rss_bytes=None,
    )
    try:
        spool = read_spool(state_dir / SPOOL)
    except SpoolLocked as e:
        return replace(report, state=RunState.LOCKED, problem=str(e))
    except StateError as e:
        return replace(report, problem=str(e))
    if spool is None:
        return report
    return replace(
        report,
        spool_pending_events=spool.pending_events,
        spool_sealed_batches=spool.sealed_batches,
        last_ack_batch_seq=spool.last_ack_batch_seq,
    )
