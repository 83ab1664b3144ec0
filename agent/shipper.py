"""Shipper: seals spooled events into signed batches and delivers them, acknowledged or retried.

Batches close at max events/bytes, at max_delay, or after a short linger when
nothing is in flight (so a lone copy is not held back a whole second).
Delivery is at least once: a batch leaves the spool only after the collector's
acknowledgement; retries resend the same bytes.

At most one batch is sealed and unacknowledged at a time (batches are sent one after
the other, so a second one would only wait): during a collector outage the events keep
arriving as pending events, which the spool's byte cap can still rank and drop least
sensitive first, rather than as signed batches it must keep whole (agent.spool).
A failed or refused send is retried after a jittered backoff that new events do not
cut short: `wake()` only says there is something to seal.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from agent import __version__
from agent.clock import Clock
from agent.codec import signed_batch_message
from agent.enroll import certificate_expiry, new_tls_key_and_csr
from agent.identity import Identity
from agent.policy import PolicyKeeper
from agent.spool import SealedBatch, Spool
from agent.usage import Usage
from exfilwatch.v1 import collector_pb2, collector_pb2_grpc

logger = logging.getLogger(__name__)

CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_send_message_length", 8 * 1024 * 1024),
    ("grpc.max_receive_message_length", 1024 * 1024),
    # Matches the collector's min_ping_interval (30 s): never ping more often.
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 5_000),
)

# Refusals that retrying the same bytes cannot fix: logged loudly, retried slowly.
_REFUSED = {
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.INVALID_ARGUMENT,
}


def next_delay(attempt: int, rng: random.Random, *, base: float = 0.2, cap: float = 10.0) -> float:
    """Jittered exponential backoff: a fleet coming back does not reconnect in lockstep."""
    ceiling = min(cap, base * 2.0 ** min(attempt, 30))
    return ceiling * (0.5 + rng.random() / 2)


@dataclass(frozen=True)
class ShipperSettings:
    max_events: int = 500
    max_bytes: int = 1024 * 1024
    max_delay_ns: int = 1_000_000_000
    """While a batch waits for the collector nothing is sealed (a batch is sealed, after
    `linger_ns`, only when none is unacknowledged), so the spool is fsynced this often
    instead: a power loss then loses no more than sealing every max_delay did."""
    linger_ns: int = 50_000_000
    heartbeat_s: float = 30.0
    call_timeout_s: float = 15.0
    max_backoff_s: float = 10.0
    renew_before_s: float = 10 * 86400.0
    """Renew the client certificate when it expires within this long (certificates last 30 days)."""
    renew_check_s: float = 3600.0


class Shipper:
    """Owns one thread; `wake()` after appending to the spool; `stop(flush_s)` joins it."""

    def __init__(
        self,
        identity: Identity,
        spool: Spool,
        clock: Clock,
        settings: ShipperSettings,
        status: Callable[[], tuple[str, int]] = lambda: ("", 0),
        usage: Callable[[], Usage] | None = None,
    ) -> None:
        """`usage`: the agent's CPU and memory, read for each heartbeat (agent.usage)."""
        self._identity = identity
        self._spool = spool
        self._clock = clock
        self._settings = settings
        self._status = status  # (unused revision, coverage gaps so far)
        self._usage = usage
        self.policy = PolicyKeeper(identity.state_dir)
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._flush_deadline = 0.0
        self._retry_at = 0.0
        """Monotonic time before which the unacknowledged batch is not sent again."""
        self._next_sync = 0.0
        """Monotonic time of the next spool fsync while a batch waits (see max_delay_ns)."""
        self._unsynced = False
        """Events were appended (wake) since the last fsync of the spool."""
        self._thread = threading.Thread(target=self._run, name="shipper")
        self._rng = random.Random()  # noqa: S311 (jitter, not security)
        self._channel: grpc.Channel | None = None
        self.acked_batches = 0
        self.send_failures = 0
        """Batch sends that failed or were refused (each one is followed by a backoff)."""
        self.connected = False
        self.revoked = False
        self.renewals = 0
        self._cert_expiry = 0.0
        """Set when the collector says this agent is revoked; the shipper then stops."""

    def start(self) -> None:
        self._connect()
        self._thread.start()

    def _connect(self) -> None:
        if self._channel is not None:
            self._channel.close()
        ca, key, cert = self._identity.tls_material()
        self._cert_expiry = certificate_expiry(cert)
        creds = grpc.ssl_channel_credentials(ca, key, cert)
        self._channel = grpc.secure_channel(self._identity.target, creds, options=CHANNEL_OPTIONS)
        self._stub = collector_pb2_grpc.CollectorStub(self._channel)

    def _renew_if_due(self) -> None:
        """Renew the client certificate over mutual TLS before it expires."""
        if self._cert_expiry - time.time() > self._settings.renew_before_s:
            return
        key_pem, csr_der = new_tls_key_and_csr(self._identity.agent_id)
        try:
            reply = self._stub.RenewCertificate(
                collector_pb2.RenewRequest(csr_der=csr_der), timeout=self._settings.call_timeout_s
            )
        except grpc.RpcError as e:
            self._check_revoked(e)
            logger.warning("certificate renewal failed: %s: %s", e.code().name, e.details())
            return
        self._identity.rotate_tls(key_pem, reply.client_certificate_pem)
        self._connect()
        self.renewals += 1
        logger.info("client certificate renewed; valid until %s", time.ctime(self._cert_expiry))

    def wake(self) -> None:
        """New events are pending. Does not cut a retry backoff short (see `_run`)."""
        self._unsynced = True
        self._wake.set()

    def stop(self, flush_s: float = 5.0) -> None:
        """Try to deliver what is pending for up to `flush_s`, then stop.

        One attempt is made at once even during a backoff: stopping happens once, it
        cannot hammer the collector, and the flush window is short.
        """
        self._flush_deadline = self._clock.monotonic() + flush_s
        self._retry_at = 0.0
        self._stopping.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()
        if self._channel is not None:
            self._channel.close()

    def _seal_next(self, now_ns: int) -> SealedBatch | None:
        """Seal the next batch if one is due; call only when no sealed batch is unsent.

        Nothing is in flight then, so a batch is due after the short linger (or at
        once while stopping). Only one is sealed: the rest stay pending, and rankable.
        """
        s = self._settings
        max_age = 0 if self._stopping.is_set() else s.linger_ns
        if not self._spool.should_seal(
            now_ns, max_events=s.max_events, max_bytes=s.max_bytes, max_age_ns=max_age
        ):
            return None
        return self._spool.seal(now_ns, max_events=s.max_events, max_bytes=s.max_bytes)

    def _sync_pending(self) -> float | None:
        """While a batch waits, keep new pending events as durable as sealing them would.

        Returns the seconds until the next fsync is due; None when none is needed.
        """
        if not self._unsynced or self._spool.depth()[0] == 0:
            return None
        now = self._clock.monotonic()
        if now < self._next_sync:
            return self._next_sync - now
        self._unsynced = False  # before the fsync: a wake() during it asks for another
        self._spool.sync()
        self._next_sync = now + max(0.01, self._settings.max_delay_ns / 1e9)
        return None

    def _call_timeout(self) -> float:
        """The call deadline; while stopping, no later than the end of the flush."""
        if self._stopping.is_set():
            return max(
                0.5,
                min(self._settings.call_timeout_s, self._flush_deadline - self._clock.monotonic()),
            )
        return self._settings.call_timeout_s

    def _check_revoked(self, error: grpc.RpcError) -> None:
        if error.code() is grpc.StatusCode.PERMISSION_DENIED and "revoked" in (
            error.details() or ""
        ):
            if not self.revoked:
                logger.error(
                    "the collector revoked this agent: %s; stopping delivery", error.details()
                )
            self.revoked = True

    def _send(self, batch: SealedBatch) -> bool:
        request = signed_batch_message(batch.body, batch.signature, batch.key_id)
        try:
            # wait_for_ready: while the channel reconnects (its own jittered backoff), the
            # call waits for it instead of failing at once and adding our backoff on top.
            ack = self._stub.UploadBatch(request, timeout=self._call_timeout(), wait_for_ready=True)
        except grpc.RpcError as e:
            self.connected = False
            self.send_failures += 1
            self._check_revoked(e)
            code = e.code()
            if code in _REFUSED:
                logger.error(
                    "collector refused batch %d: %s: %s", batch.batch_seq, code.name, e.details()
                )
            else:
                logger.info("batch %d not delivered (%s); will retry", batch.batch_seq, code.name)
            return False
        if ack.batch_seq != batch.batch_seq or ack.batch_digest != batch.digest:
            logger.error("acknowledgement does not match batch %d; will resend", batch.batch_seq)
            self.send_failures += 1
            return False
        self._spool.ack(batch.batch_seq)
        self.connected = True
        self.acked_batches += 1
        logger.debug(
            "batch %d acknowledged (%d events%s)",
            batch.batch_seq,
            batch.n_events,
            ", duplicate" if ack.duplicate else "",
        )
        return True

    def _refresh_policy(self) -> None:
        try:
            signed = self._stub.GetPolicy(
                collector_pb2.PolicyRequest(have_revision=self.policy.revision),
                timeout=self._settings.call_timeout_s,
            )
        except grpc.RpcError as e:
            self._check_revoked(e)
            logger.info("policy refresh failed: %s", e.code().name)
            return
        self.policy.offer(signed.SerializeToString())

    def _heartbeat(self) -> None:
        pending, sealed = self._spool.depth()
        revision, gaps = self.policy.revision, self._status()[1]
        request = collector_pb2.HeartbeatRequest(
            agent_id=self._identity.agent_id,
            sent_at_ns=self._clock.wall_ns(),
            agent_version=__version__,
            policy_revision=revision,
            spool_depth=pending + sealed,
            coverage_gaps=gaps,
        )
        if self._usage is not None:
            usage = self._usage()
            request.cpu_percent, request.rss_bytes = usage.cpu_percent, usage.rss_bytes
        try:
            self._stub.Heartbeat(request, timeout=self._call_timeout(), wait_for_ready=True)
            self.connected = True
        except grpc.RpcError as e:
            self.connected = False
            self._check_revoked(e)
            logger.info("heartbeat failed: %s", e.code().name)

    def _run(self) -> None:
        attempt = 0
        next_heartbeat = 0.0
        next_renew_check = 0.0
        next_policy = 0.0
        while True:
            now = self._clock.monotonic()
            if self.revoked or (self._stopping.is_set() and now >= self._flush_deadline):
                break
            if now >= next_renew_check and not self._stopping.is_set():
                self._renew_if_due()
                next_renew_check = now + self._settings.renew_check_s
            if now >= next_policy and not self._stopping.is_set():
                self._refresh_policy()
                running = self.policy.current
                next_policy = now + (running.refresh_s if running else 60.0)
            if now >= next_heartbeat and not self._stopping.is_set():
                self._heartbeat()
                running = self.policy.current
                next_heartbeat = now + (
                    running.heartbeat_s if running else self._settings.heartbeat_s
                )
            batch = self._spool.next_unacked() or self._seal_next(self._clock.wall_ns())
            wait_s = self._retry_at - self._clock.monotonic()
            if batch is not None and wait_s > 0:
                # Backing off: a wake() (new events) is no reason to resend sooner, but
                # the events it announced are fsynced on time.
                sync_in = self._sync_pending()
                delay = wait_s if sync_in is None else min(wait_s, sync_in)
            elif batch is not None:
                if self._send(batch):
                    attempt = 0
                    continue
                delay = next_delay(attempt, self._rng, cap=self._settings.max_backoff_s)
                self._retry_at = self._clock.monotonic() + delay
                attempt += 1
                sync_in = self._sync_pending()
                delay = delay if sync_in is None else min(delay, sync_in)
            else:
                pending, _ = self._spool.depth()
                if self._stopping.is_set() and pending == 0:
                    break
                # Come back when the oldest pending event's linger is up, or on wake().
                delay = self._settings.linger_ns / 1e9 if pending else 1.0
            if self._stopping.is_set():
                delay = min(delay, max(0.0, self._flush_deadline - self._clock.monotonic()))
            self._wake.wait(delay)
            self._wake.clear()
