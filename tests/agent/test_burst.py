"""A burst into a destination: 20,000 files at full speed, 500 of them copies of labelled files.

Every copy must be reported exactly once, and whatever was dropped on the way (the
kernel queue, our own queue) must show as a coverage gap: FIELD-NOTES §1.5 measured
45-78 % loss for a naive watcher under such bursts.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from agent.events import Action, Event
from agent.pipeline import GapReason
from tests.agent.pipeline_harness import Dirs, Harness, labelled

pytestmark = pytest.mark.filterwarnings("ignore:Callback with id:RuntimeWarning")

FILES = 20_000
COPIES = 500
DEADLINE = 40.0

# A separate process, as a user's tool would be (and off the agent's GIL): 19,500
# files of random bytes, and every 40th file a copy of a labelled one, at full speed.
WRITER = r"""
import os, random, sys, time
sources, dest, n, every = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rng = random.Random(7)
names = sorted(os.listdir(sources))
start = time.monotonic()
for i in range(n):
    path = os.path.join(dest, "f%05d.bin" % i)
    if i % every == 0:
        with open(os.path.join(sources, names[i // every]), "rb") as f:
            data = f.read()
    else:
        data = rng.randbytes(rng.randrange(4000, 6000))  # sizes overlap the labelled ones
    with open(path, "wb") as f:
        f.write(data)
print("%.3f" % (time.monotonic() - start))
"""


def burst(dirs: Dirs, h: Harness) -> tuple[set[bytes], float, float]:
    """Write the burst; wait until every copy is reported. (expected, write s, report s)"""
    for i in range(COPIES):
        labelled(dirs.sensitive / f"doc{i:03d}.docx", os.urandom(4500 + i))
    h.start()
    assert len(h.index) == COPIES
    expected = {os.fsencode(dirs.usb / f"f{i:05d}.bin") for i in range(0, FILES, FILES // COPIES)}
    started = time.monotonic()
    written = subprocess.run(
        [sys.executable, "-c", WRITER, str(dirs.sensitive), str(dirs.usb), str(FILES),
         str(FILES // COPIES)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip

    def reported(seen: list[Event]) -> bool:
        return expected <= {e.destination.path for e in seen if e.destination}

    h.wait(reported, timeout=DEADLINE)
    took = time.monotonic() - started
    h.barrier()
    h.stop()
    return expected, float(written.stdout), took


def check(h: Harness, expected: set[bytes]) -> None:
    copies = [e.destination.path for e in h.copies() if e.destination]
    burst_copies = [p for p in copies if p in expected]
    assert len(burst_copies) == len(expected) == COPIES  # all of them, none twice
    assert set(burst_copies) == expected
    assert len(copies) == COPIES + 1  # and the barrier's; nothing else is a copy
    assert all(e.action is Action.COPY for e in h.copies())


def test_every_copy_in_a_burst_is_reported_once(dirs, harness, capsys) -> None:
    h = harness(reads=True)
    expected, write_s, report_s = burst(dirs, h)
    check(h, expected)
    stats = h.pipeline.stats()
    gaps = {e.gap.reason for e in h.of(Action.COVERAGE_GAP) if e.gap}
    # Whatever was lost on the way is a coverage gap, never silence.
    if stats.overflows:
        assert GapReason.INOTIFY_OVERFLOW in gaps
    if stats.queue_drops or h.watcher.dropped:
        assert GapReason.QUEUE_OVERFLOW in gaps
    with capsys.disabled():
        print(
            f"\nburst: {FILES} files written in {write_s:.2f} s ({FILES / write_s:,.0f}/s), "
            f"{COPIES} copies reported {report_s:.2f} s after the start; "
            f"{stats.observations} observations, kernel overflows {stats.overflows}, "
            f"queue drops {stats.queue_drops}, rescans {stats.rescans}, gaps {sorted(gaps)}"
        )


def test_a_burst_through_a_small_queue_drops_reports_the_gap_and_misses_nothing(
    dirs, harness, capsys
) -> None:
    # A queue of 200 cannot hold this burst: observations are dropped for sure, and
    # the rescans after the drops must find every copy anyway.
    h = harness(queue_size=200)
    expected, _, report_s = burst(dirs, h)
    check(h, expected)
    stats = h.pipeline.stats()
    gaps = [e.gap for e in h.of(Action.COVERAGE_GAP) if e.gap]
    assert h.watcher.dropped > 0
    assert stats.queue_drops == h.watcher.dropped  # every drop is counted in a gap...
    assert sum(g.count for g in gaps if g.reason == GapReason.QUEUE_OVERFLOW) == stats.queue_drops
    assert stats.rescans >= 2  # ...and followed by a rescan
    with capsys.disabled():
        print(
            f"\nburst, queue of 200: {report_s:.2f} s to report all {COPIES} copies; "
            f"{h.watcher.dropped} observations dropped, {stats.rescans} rescans"
        )
