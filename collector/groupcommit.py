"""Group commit for ingest: the batches that queue while one transaction commits share the next.

Leader/follower, as LevelDB's writer queue: the caller at the head of the queue writes
the batches queued behind it (its own first) in one transaction and hands each caller
its outcome; the others wait, and the next head leads the next group. No thread of its
own: an idle collector commits a lone batch at once, a busy one amortises the
transaction, the fsync and the rewritten index pages over every batch that arrived
meanwhile (collector.ingest).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

__all__ = ["GroupCommit", "write_group"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


@dataclass(eq=False)
class _Slot(Generic[T, R]):
    item: T
    turn: threading.Event = field(default_factory=threading.Event)
    """Set when the item's outcome is in, or when its caller leads the next group."""
    done: bool = False
    outcome: R | Exception | None = None


class GroupCommit(Generic[T, R]):
    """Serialises `run_group` over the items callers `submit`, grouping those that queue.

    `run_group(items)` runs on one caller's thread at a time with at most `max_items`
    items, oldest first, and returns one outcome per item, in order: a value, or an
    exception for that caller to raise. When it raises for a group of several items,
    each is run again alone, so that an item that cannot be written fails by itself and
    does not hold the others back; for a lone item, what it raised is the outcome.
    `max_items` bounds what one transaction holds, and so the latency the first item of
    a group pays for the last.
    """

    def __init__(self, run_group: Callable[[Sequence[T]], Sequence[R | Exception]], max_items: int):
        if max_items < 1:
            raise ValueError("max_items must be at least 1")
        self._run_group = run_group
        self._max_items = max_items
        self._lock = threading.Lock()
        self._queue: deque[_Slot[T, R]] = deque()

    @property
    def pending(self) -> int:
        """Items submitted and not answered yet (being written, or queued behind)."""
        with self._lock:
            return len(self._queue)

    def submit(self, item: T) -> R:
        """Run `item` in a group (perhaps led by this thread); return its result or raise."""
        slot: _Slot[T, R] = _Slot(item)
        with self._lock:
            self._queue.append(slot)
            lead = len(self._queue) == 1
        if not lead:
            slot.turn.wait()
        if not slot.done:  # at the head of the queue: lead a group
            self._lead()
        outcome = slot.outcome
        if isinstance(outcome, Exception):
            raise outcome
        return outcome  # type: ignore[return-value]  # R when it is no exception

    def _lead(self) -> None:
        with self._lock:
            group = [self._queue[i] for i in range(min(len(self._queue), self._max_items))]
        try:
            outcomes = write_group(self._run_group, [s.item for s in group])
        except BaseException as e:
            # Not ours to handle (KeyboardInterrupt, SystemExit): the others fail, this raises.
            self._finish(group, [RuntimeError(f"group commit interrupted: {e!r}") for _ in group])
            raise
        self._finish(group, outcomes)

    def _finish(self, group: list[_Slot[T, R]], outcomes: Sequence[R | Exception]) -> None:
        with self._lock:
            for slot, outcome in zip(group, outcomes, strict=True):
                slot.outcome = outcome
                slot.done = True
                self._queue.popleft()
            head = self._queue[0] if self._queue else None
        for slot in group:
            slot.turn.set()
        if head is not None:
            head.turn.set()  # not done: it leads the next group


def write_group(
    run_group: Callable[[Sequence[T]], Sequence[R | Exception]], items: Sequence[T]
) -> list[R | Exception]:
    """`run_group(items)`'s outcomes, one per item. When it raises for several items, each
    is run again alone, so that an item that cannot be written fails by itself and does not
    hold the others back; for a lone item, what it raised is the outcome."""
    try:
        return _outcomes(run_group, items)
    except Exception as e:
        if len(items) == 1:
            return [e]
        logger.warning("a group of %d failed (%s); writing each alone", len(items), e)
    outcomes: list[R | Exception] = []
    for item in items:
        try:
            outcomes.extend(_outcomes(run_group, [item]))
        except Exception as alone:
            outcomes.append(alone)
    return outcomes


def _outcomes(
    run_group: Callable[[Sequence[T]], Sequence[R | Exception]], items: Sequence[T]
) -> list[R | Exception]:
    outcomes = list(run_group(items))
    if len(outcomes) != len(items):
        raise RuntimeError(f"run_group returned {len(outcomes)} outcomes for {len(items)}")
    return outcomes
