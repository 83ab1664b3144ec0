"""Talking to the service manager: sd_notify datagrams and the watchdog decision.

The agent's run loop (agent/service.py) reports READY=1, STOPPING=1 and WATCHDOG=1 through
a `Notifier`. No dependency: the protocol is one datagram to the AF_UNIX socket named by
$NOTIFY_SOCKET (systemd.exec(5), sd_notify(3)); an '@' prefix means the abstract namespace.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Mapping
from typing import Protocol

logger = logging.getLogger(__name__)

NOTIFY_SOCKET = "NOTIFY_SOCKET"

READY = "READY=1"
STOPPING = "STOPPING=1"
WATCHDOG = "WATCHDOG=1"

STALL_AFTER_S = 300.0
"""How long the pipeline may sit on queued work without finishing any before the watchdog
pings stop. One observation can legitimately take long: hashing a 2 GiB file (the default
`hashing.max_file_bytes`) on a USB 2 stick at ~10 MB/s takes about 200 s. The service
manager restarts the agent WatchdogSec (60 s) after the last ping."""


class Notifier(Protocol):
    """Where the agent reports its lifecycle; `SdNotifier` or a test fake."""

    def notify(self, *assignments: str) -> bool:
        """Send `KEY=value` assignments as one message; False when nobody listens."""
        ...


class SdNotifier:
    """sd_notify(3) without libsystemd: one datagram per call, never raises.

    A manager that cannot be told is not a reason to stop watching files, so
    send errors are logged (once until a send works again) and reported as False.
    """

    def __init__(self, address: str | None, *, timeout: float = 1.0) -> None:
        """`address` as in $NOTIFY_SOCKET: an absolute path, or '@name' (abstract); None: off."""
        self._address: str | bytes | None = None
        self._timeout = timeout
        self._failing = False
        if address is None or not address:
            return
        if address.startswith("@"):
            self._address = b"\0" + address[1:].encode()
        elif address.startswith("/"):
            self._address = address
        else:
            # systemd 253+ also offers vsock:CID:PORT; this agent does not speak it.
            logger.warning(
                "%s=%r is not a unix socket address; not notifying", NOTIFY_SOCKET, address
            )

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> SdNotifier:
        """The notifier the service manager asked for, or a disabled one."""
        return cls(environ.get(NOTIFY_SOCKET))

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, *assignments: str) -> bool:
        if self._address is None or not assignments:
            return False
        message = "\n".join(assignments).encode("utf-8", "replace")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                # Bounded: a manager that stopped reading must not stall the run loop.
                sock.settimeout(self._timeout)
                sock.sendto(message, self._address)
        except OSError as e:
            if not self._failing:
                logger.warning("cannot notify the service manager at %s: %s", self._shown(), e)
            self._failing = True
            return False
        if self._failing:
            logger.info("service manager notifications work again")
        self._failing = False
        return True

    def _shown(self) -> str:
        address = self._address
        if isinstance(address, bytes):
            return "@" + address[1:].decode("utf-8", "replace")
        return str(address)


class Watchdog:
    """Decides, once per health check, whether the agent deserves a WATCHDOG=1 ping.

    Sans-I/O apart from the notifier: the run loop passes what it sampled and `now`
    (monotonic seconds). The agent is worth keeping alive when every stage is alive
    and the pipeline either has nothing queued or finished an observation since the
    last check; queued work with no progress for `stall_after` seconds is a stall.
    Pings come only from this decision in the run loop, never from a timer thread
    that would keep pinging while the pipeline is stuck.
    """

    def __init__(self, notifier: Notifier, *, stall_after: float = STALL_AFTER_S) -> None:
        self._notifier = notifier
        self._stall_after = stall_after
        self._handled = -1
        self._progress_at: float | None = None
        self.stalled = False

    def check(self, *, alive: bool, handled: int, backlog: int, now: float) -> bool:
        """Ping if healthy; return whether the agent is healthy.

        `handled` is the pipeline's count of observations finished so far and
        `backlog` the observations waiting for it.
        """
        if self._progress_at is None or backlog == 0 or handled != self._handled:
            self._handled = handled
            self._progress_at = now
        stalled = now - self._progress_at >= self._stall_after
        if stalled and not self.stalled:
            logger.error(
                "pipeline finished nothing in %.0f s with %d observations queued: "
                "no more watchdog pings, the service manager will restart the agent",
                now - self._progress_at,
                backlog,
            )
        elif self.stalled and not stalled:
            logger.warning("pipeline is making progress again")
        self.stalled = stalled
        healthy = alive and not stalled
        if healthy:
            self._notifier.notify(WATCHDOG)
        return healthy

    def stalled_for(self, now: float) -> float:
        """Seconds since the pipeline last made progress while it had work (0 if none)."""
        if self._progress_at is None:
            return 0.0
        return now - self._progress_at
