"""agent.events.event_id_at: UUIDv7 event ids dated by the event's time."""

from __future__ import annotations

import itertools
import re
import uuid

from agent.events import event_id_at
from collector.codec import _UUID as COLLECTOR_UUID

T_NS = 1_795_000_000_123_456_789  # 2026-11-18, 123.456789 ms into a second


def test_the_id_is_a_canonical_version_7_uuid_carrying_the_milliseconds() -> None:
    event_id = event_id_at(T_NS)
    parsed = uuid.UUID(event_id)
    assert str(parsed) == event_id  # canonical, lowercase: the only spelling the collector takes
    assert COLLECTOR_UUID.fullmatch(event_id)
    assert parsed.version == 7
    assert parsed.variant == uuid.RFC_4122
    assert parsed.int >> 80 == T_NS // 10**6


def test_ids_sort_in_time_order_below_a_millisecond() -> None:
    # 7 us apart, more than the 12-bit field's 1/4096 ms (244 ns): strictly increasing ids
    ids = [event_id_at(T_NS + step * 7_000) for step in range(1_000)]
    assert all(a < b for a, b in itertools.pairwise(ids))


def test_ids_of_the_same_instant_differ_in_their_random_bits() -> None:
    ids = {event_id_at(T_NS) for _ in range(1_000)}
    assert len(ids) == 1_000
    assert len({i[:18] for i in ids}) == 1  # the same time and sub-millisecond field


def test_given_random_bits_make_the_id_reproducible_and_stay_in_their_field() -> None:
    a = event_id_at(T_NS, random_bits=(1 << 64) - 1)  # too wide: cut to the 62 random bits
    assert a == event_id_at(T_NS, random_bits=(1 << 62) - 1)
    assert uuid.UUID(a).version == 7 and uuid.UUID(a).variant == uuid.RFC_4122
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-bfff-f{12}", a)


def test_a_clock_before_1970_still_gives_a_valid_id() -> None:
    assert uuid.UUID(event_id_at(-5)).int >> 80 == 0
