"""The agent's lifecycle: startup() -> run() -> shutdown(), owning every thread it starts.

It wires watcher -> pipeline -> spool -> shipper, reports agent_start/agent_stop,
turns spool drops into coverage gaps, restarts a dead watcher or pipeline worker
(agent.supervisor: reported as a coverage gap, then a rescan), and exits when a
stage keeps dying (a blind agent must not look healthy).
"""

from __future__ import annotations

import logging
import queue
import threading

from agent import __version__
from agent.attribution import Attributor, open_attributor
from agent.clock import Clock
from agent.config import AgentConfig
from agent.copy_detector import CopyDetector
from agent.destinations import Destinations, DestinationTracker, roots_for
from agent.errors import AgentError
from agent.events import Action, CoverageGap, Event, event_id_at
from agent.identity import REVOKED, SIGNING_KEY, SPOOL, Identity
from agent.index import FileHasher, SensitiveIndex
from agent.pipeline import Pipeline
from agent.reported import REPORTED, ReportedCopies
from agent.sdnotify import READY, STOPPING, Notifier, SdNotifier, Watchdog
from agent.shipper import Shipper, ShipperSettings
from agent.signer import Signer
from agent.spool import Spool
from agent.status import STATUS_INTERVAL_S, AckTrackingSpool, agent_status, write_status
from agent.supervisor import Supervisor, restart_watcher
from agent.usage import UsageMeter
from agent.watcher import ObservationQueue, Watcher

logger = logging.getLogger(__name__)


def stricter_rate(local: int, fleet: int) -> int:
    """The lower of two byte rates, where 0 means no cap."""
    caps = [rate for rate in (local, fleet) if rate > 0]
    return min(caps) if caps else 0


class AgentService:
    def __init__(
        self,
        config: AgentConfig,
        identity: Identity,
        clock: Clock,
        *,
        shipper_settings: ShipperSettings | None = None,
        notifier: Notifier | None = None,
        status_interval: float = STATUS_INTERVAL_S,
    ) -> None:
        self._config = config
        self._identity = identity
        self._clock = clock
        self._shipper_settings = shipper_settings or ShipperSettings(
            max_events=config.batch.max_events,
            max_bytes=config.batch.max_bytes,
            max_delay_ns=int(config.batch.max_delay * 1e9),
        )
        self.should_exit = threading.Event()
        self._spool: Spool | None = None
        self._shipper: Shipper | None = None
        self._watcher: Watcher | None = None
        self._tracker: DestinationTracker | None = None
        self._pipeline: Pipeline | None = None
        self._hasher: FileHasher | None = None
        self._attributor: Attributor | None = None
        self._reported: ReportedCopies | None = None
        self._supervisor: Supervisor | None = None
        self._gaps = 0
        self._gaps_lock = threading.Lock()
        self.failure: str | None = None
        self.revoked = False
        # Reporting: sd_notify to the service manager, status.json for `status`.
        self._notifier: Notifier = notifier or SdNotifier(None)
        self._watchdog = Watchdog(self._notifier)
        self._status_interval = status_interval
        self._usage = UsageMeter()
        self._observations: ObservationQueue | None = None
        self._started_ns = 0

    # events

    def _event(self, action: Action, gap: CoverageGap | None = None) -> Event:
        wall_ns = self._clock.wall_ns()
        return Event(
            event_id=event_id_at(wall_ns),
            observed_at_ns=wall_ns,
            action=action,
            host=self._config.host,
            agent_version=__version__,
            gap=gap,
        )

    def emit(self, event: Event, *, reported_drops: int = 0) -> None:
        """Called from pipeline workers: spool durably, then wake the shipper.

        `reported_drops`: spool drops this event reports, taken off the spool's count
        in the same transaction, so a crash can neither lose nor repeat the count.
        """
        if self._spool is None:
            raise AgentError("agent not started")
        if event.action is Action.COVERAGE_GAP:
            with self._gaps_lock:
                self._gaps += 1
        self._spool.append([event], reported_drops=reported_drops)
        logger.debug("spooled event %s %s", event.event_id, event.action)
        if self._shipper is not None:
            self._shipper.wake()

    def _status(self) -> tuple[str, int]:
        """(policy revision in force, coverage gaps reported so far)."""
        revision = self._shipper.policy.revision if self._shipper is not None else ""
        with self._gaps_lock:
            return revision, self._gaps

    # lifecycle

    def startup(self) -> None:
        config, state = self._config, self._identity.state_dir
        signer = Signer.load(state / SIGNING_KEY)
        self._started_ns = self._clock.wall_ns()
        self._spool = AckTrackingSpool.open(
            state / SPOOL,
            agent_id=self._identity.agent_id,
            signer=signer,
            max_bytes=config.spool.max_bytes,
            levels=config.labels.levels,
        )
        self._shipper = Shipper(
            self._identity, self._spool, self._clock, self._shipper_settings, self._status,
            usage=UsageMeter().read,
        )  # fmt: skip
        self._shipper.start()
        self.emit(self._event(Action.AGENT_START))
        try:
            self._reported = ReportedCopies.open(state / REPORTED)
        except AgentError:
            # Degraded, not blind: without it a restart may report a copy twice.
            logger.exception("cannot open the record of reported copies: continuing without it")
        index = SensitiveIndex(config.labels.levels)
        observations: ObservationQueue = queue.Queue(maxsize=config.queue_size)
        self._observations = observations
        destinations = Destinations.from_config(config)
        # fanotify when root (tier 1), else best effort; logged once either way. Its
        # marks follow the watched trees: the watcher reports new and deleted
        # directories to it, the tracker mounts (agent.fanmarks).
        self._attributor = open_attributor(
            config.sensitive_roots, [dest.path for dest in config.destinations]
        )
        self._watcher = Watcher(
            roots_for(destinations, config.sensitive_roots),
            observations,
            observe_reads=config.access.reads,
            raise_watch_limit_to=(
                config.inotify.max_user_watches if config.inotify.raise_watch_limit else None
            ),
            directories=self._attributor,
        )
        self._tracker = DestinationTracker(
            config, destinations, self._watcher, marks=self._attributor
        )
        self._hasher = FileHasher(config.hashing.max_file_bytes, config.hashing.max_rate)
        self._apply_policy()
        self._pipeline = Pipeline(
            config,
            index,
            CopyDetector(index),
            self._attributor,
            self._hasher,
            self.emit,
            self._clock,
            observations=observations,
            drops=self._watcher.take_dropped,
            destinations=destinations,
            reported=self._reported,
            attribution_overflows=self._attributor.take_overflows,
        )
        self._supervisor = Supervisor(self._watcher.healthy, self._restart_watcher, self._pipeline)
        self._pipeline.start()
        # Watch before the first scan: a copy made during the scan is still seen.
        self._watcher.start()
        self._tracker.start()  # mounts and sync folders; before the scan, which walks them
        # Folders made between the first marking and the watcher's start: mark them too.
        self._attributor.remark()
        self._pipeline.rescan()
        logger.info(
            "agent %s running: %d labelled files indexed, %d sensitive roots, %d destinations",
            self._identity.agent_id,
            len(index),
            len(config.sensitive_roots),
            len(config.destinations),
        )
        self._report(running=True, healthy=True)
        self._notifier.notify(READY)

    def run(self, health_interval: float = 1.0) -> None:
        """Block until should_exit is set or a stage dies."""
        if self._spool is None or self._watcher is None or self._pipeline is None:
            raise AgentError("agent not started")
        next_report = self._clock.monotonic() + self._status_interval
        while not self.should_exit.wait(health_interval):
            dropped = self._spool.dropped()
            if dropped:
                logger.warning("spool full: dropped %d events", dropped)
                gap = self._event(Action.COVERAGE_GAP, CoverageGap("spool_dropped", dropped))
                self.emit(gap, reported_drops=dropped)
            # A dead watcher or worker is restarted, reported and rescanned; only one
            # that keeps dying (or cannot come back) stops the agent.
            failure = self._supervisor.check(self._clock.monotonic()) if self._supervisor else None
            if failure is not None:
                self.failure = failure
            elif self._tracker is not None and not self._tracker.healthy():
                self.failure = "filesystem watcher died"
            elif self._shipper is not None and self._shipper.revoked:
                self.revoked = True
                (self._identity.state_dir / REVOKED).write_text("revoked by the collector\n")
                logger.error("revoked by the collector: stopping for good")
                return
            # WATCHDOG=1 only from here and only while healthy: a stuck run loop or a
            # pipeline sitting on queued work stops the pings, and systemd restarts us.
            now = self._clock.monotonic()
            healthy = self._watchdog.check(
                alive=self.failure is None,
                handled=self._pipeline.stats().observations,
                backlog=self._observations.qsize() if self._observations is not None else 0,
                now=now,
            )
            if now >= next_report:
                self._apply_policy()
                self._report(running=True, healthy=healthy)
                next_report = now + self._status_interval
            if self.failure:
                logger.error("%s: stopping so the service manager restarts the agent", self.failure)
                return

    def _apply_policy(self) -> None:
        """Hash no faster than the stricter of hashing.max_rate and the policy's hash_rate."""
        if self._hasher is None:
            return
        policy = self._shipper.policy.current if self._shipper is not None else None
        rate = stricter_rate(self._config.hashing.max_rate, policy.hash_rate if policy else 0)
        if rate != self._hasher.max_rate:
            logger.info("hashing rate cap: %s", f"{rate} bytes/s" if rate else "none")
            self._hasher.set_max_rate(rate)

    def _restart_watcher(self) -> None:
        """The supervisor's way to revive a dead watcher (with the roots added meanwhile)."""
        if self._watcher is None:
            raise AgentError("agent not started")
        restart_watcher(self._watcher)

    def shutdown(self, flush_s: float = 5.0) -> None:
        """Stop watching, finish queued work, report agent_stop, deliver what is spooled."""
        self._notifier.notify(STOPPING)
        if self._tracker is not None:
            self._tracker.stop()
        if self._watcher is not None:
            self._watcher.stop()
        if self._pipeline is not None:
            self._pipeline.stop()
        if self._attributor is not None:
            self._attributor.close()
        if self._reported is not None:
            self._reported.close()
        if self._spool is not None:
            try:
                self.emit(self._event(Action.AGENT_STOP))
            except AgentError:
                logger.exception("could not spool agent_stop")
        if self._shipper is not None:
            self._shipper.stop(flush_s)
        if self._spool is not None:
            self._report(running=False, healthy=False)
            self._spool.close()

    def _report(self, *, running: bool, healthy: bool) -> None:
        """Write status.json (for `exfilwatch-agent status`) and STATUS= for the manager."""
        if self._spool is None:
            return
        revision, gaps = self._status()
        try:
            status = agent_status(
                self._identity.agent_id,
                self._spool,
                self._shipper,
                running=running,
                healthy=healthy,
                coverage_gaps=gaps,
                policy_revision=revision,
                started_at_ns=self._started_ns,
                now_ns=self._clock.wall_ns(),
                failure=self.failure,
                usage=self._usage.read(),
            )
            write_status(self._identity.state_dir, status)
        except AgentError:  # reporting must never take the agent (or its shutdown) down
            logger.warning("cannot write the status file", exc_info=True)
            return
        self._notifier.notify(f"STATUS={status.summary(self._identity.target)}")
