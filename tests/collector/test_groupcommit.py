"""Group commit: callers that queue while a group is written share the next one, in order."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import pytest

from collector.groupcommit import GroupCommit
from tests.procs import wait_until

WAIT_S = 10.0


class Gate:
    """A run_group that records each group and holds the first until `release()`."""

    def __init__(self, fail: Callable[[int], bool] = lambda item: False) -> None:
        self.groups: list[list[int]] = []
        self.entered = threading.Event()
        self._open = threading.Event()
        self._fail = fail

    def release(self) -> None:
        self._open.set()

    def __call__(self, items: Sequence[int]) -> list[int | Exception]:
        self.groups.append(list(items))
        self.entered.set()
        assert self._open.wait(WAIT_S), "the test never released the gate"
        if len(items) > 1 and any(self._fail(i) for i in items):
            raise RuntimeError("the transaction failed")
        return [ValueError(f"refused {i}") if i < 0 else i * 10 for i in items]


def submit_all(
    commits: GroupCommit[int, int], items: Sequence[int], gate: Gate
) -> dict[int, int | Exception]:
    """Submit items[0] first; once it is being written, the rest from one thread each."""
    results: dict[int, int | Exception] = {}

    def one(item: int) -> None:
        try:
            results[item] = commits.submit(item)
        except Exception as e:
            results[item] = e

    first = threading.Thread(target=one, args=(items[0],))
    first.start()
    assert gate.entered.wait(WAIT_S)
    rest = [threading.Thread(target=one, args=(i,)) for i in items[1:]]
    for t in rest:
        t.start()
    # Everyone but the first is queued behind the gate before it opens.
    wait_until(lambda: commits.pending == len(items), WAIT_S, "every caller queued")
    gate.release()
    for t in [first, *rest]:
        t.join(WAIT_S)
        assert not t.is_alive()
    return results


def test_a_lone_caller_runs_at_once_in_its_own_group() -> None:
    gate = Gate()
    gate.release()
    commits: GroupCommit[int, int] = GroupCommit(gate, max_items=8)
    assert commits.submit(3) == 30
    assert gate.groups == [[3]]


def test_callers_queued_behind_a_group_share_the_next_one_in_order() -> None:
    gate = Gate()
    commits: GroupCommit[int, int] = GroupCommit(gate, max_items=8)
    results = submit_all(commits, [1, 2, 3, 4, 5], gate)
    assert results == {1: 10, 2: 20, 3: 30, 4: 40, 5: 50}
    assert gate.groups[0] == [1]
    assert sorted(gate.groups[1]) == [2, 3, 4, 5] and len(gate.groups) == 2


def test_max_items_bounds_a_group() -> None:
    gate = Gate()
    commits: GroupCommit[int, int] = GroupCommit(gate, max_items=2)
    results = submit_all(commits, [1, 2, 3, 4, 5], gate)
    assert results == {1: 10, 2: 20, 3: 30, 4: 40, 5: 50}
    assert [len(g) for g in gate.groups] == [1, 2, 2]


def test_an_item_refused_in_a_group_fails_alone() -> None:
    gate = Gate()
    commits: GroupCommit[int, int] = GroupCommit(gate, max_items=8)
    results = submit_all(commits, [1, 2, -3, 4], gate)
    assert isinstance(results[-3], ValueError) and str(results[-3]) == "refused -3"
    assert {k: v for k, v in results.items() if k != -3} == {1: 10, 2: 20, 4: 40}


def test_a_failed_group_is_written_again_one_item_at_a_time() -> None:
    gate = Gate(fail=lambda item: item == 3)  # 3 fails any group it is in with others
    commits: GroupCommit[int, int] = GroupCommit(gate, max_items=8)
    results = submit_all(commits, [1, 2, 3, 4], gate)
    assert results == {1: 10, 2: 20, 3: 30, 4: 40}
    assert sorted(gate.groups[1]) == [2, 3, 4]
    assert sorted(gate.groups[2:]) == [[2], [3], [4]]


def test_what_a_lone_item_raises_is_raised_to_its_caller_only() -> None:
    def run(items: Sequence[int]) -> list[int | Exception]:
        if 7 in items:
            raise OSError("disk full")
        return list(items)

    commits: GroupCommit[int, int] = GroupCommit(run, max_items=8)
    with pytest.raises(OSError, match="disk full"):
        commits.submit(7)
    assert commits.submit(8) == 8  # the queue moved on


def test_a_wrong_number_of_outcomes_is_an_error_not_a_hang() -> None:
    commits: GroupCommit[int, int] = GroupCommit(lambda items: [], max_items=8)
    with pytest.raises(RuntimeError, match="0 outcomes for 1"):
        commits.submit(1)


def test_max_items_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_items"):
        GroupCommit(lambda items: list(items), max_items=0)
