"""Event time: the agent's timestamp, clamped to what the collector can believe.

An agent that was offline delivers late, with its original times: those count in
the windows they belong to. A timestamp further back than `max_backdate` or ahead
of `max_skew` is clamped to that bound and flagged, so a skewed or forged clock
can neither hide a copy in an old window nor hold a window open in the future.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

DAY_NS = 86_400 * 1_000_000_000
DEFAULT_MAX_BACKDATE_NS = 7 * DAY_NS
DEFAULT_MAX_SKEW_NS = 5 * 60 * 1_000_000_000


class Clamp(StrEnum):
    BACKDATED = "backdated"
    """Claimed earlier than received - max_backdate."""
    FUTURE = "future"
    """Claimed later than received + max_skew."""


@dataclass(frozen=True)
class EventTime:
    ts_ns: int
    """The time rules use, inside [received - max_backdate, received + max_skew]."""
    clamped: Clamp | None = None
    """Why `ts_ns` differs from the agent's claim; None when it does not."""


def clamp_event_time(
    observed_ns: int,
    received_ns: int,
    *,
    max_backdate_ns: int = DEFAULT_MAX_BACKDATE_NS,
    max_skew_ns: int = DEFAULT_MAX_SKEW_NS,
) -> EventTime:
    """The rule time of an event observed at `observed_ns` and received at `received_ns`."""
    low, high = received_ns - max_backdate_ns, received_ns + max_skew_ns
    if observed_ns < low:
        return EventTime(low, Clamp.BACKDATED)
    if observed_ns > high:
        return EventTime(high, Clamp.FUTURE)
    return EventTime(observed_ns)
