"""A real watcher + pipeline over tmp_path folders, collecting what it emits (shared by tests).

Used by test_pipeline, test_access, test_reported, test_supervisor, test_copy_patterns,
test_burst and test_detection_methods. Waits poll the event queue with a deadline; nothing sleeps.
"""

from __future__ import annotations

import errno
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from agent.access import OwnReads
from agent.attribution import Attributor
from agent.clock import SystemClock
from agent.config import AccessConfig, AgentConfig, DestinationConfig, PathRule
from agent.copy_detector import CopyDetector
from agent.events import (
    Action,
    AttributionMethod,
    DestinationClass,
    DeviceInfo,
    Event,
    ProcessInfo,
    UserInfo,
)
from agent.index import FileHasher, SensitiveIndex
from agent.pipeline import GapReason, Pipeline
from agent.reported import ReportedCopies
from agent.watcher import Observation, ObservationKind, ObservationQueue, Role, Watcher

TIMEOUT = 15.0
XATTR = "user.exfilwatch.label"
STICK = DeviceInfo(vendor="Kingston", model="DT50", serial="S123")


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def monotonic(self) -> float:
        return self.t

    def wall_ns(self) -> int:
        return 1_700_000_000_000_000_000 + int(self.t * 1e9)

    def advance(self, seconds: float) -> None:
        self.t += seconds


class ShiftedClock:
    """Real time, with the wall clock shifted by `offset` seconds (a later "now")."""

    def __init__(self, offset: float) -> None:
        self.offset_ns = int(offset * 1e9)

    def monotonic(self) -> float:
        return time.monotonic()

    def wall_ns(self) -> int:
        return time.time_ns() + self.offset_ns


class NobodyAttributor:
    def attribute(
        self, path: bytes, st: os.stat_result, *, seen_at: float | None = None
    ) -> tuple[ProcessInfo | None, UserInfo, AttributionMethod]:
        return None, UserInfo(), AttributionMethod.UNATTRIBUTED

    reader_of = attribute


@dataclass
class Dirs:
    sensitive: Path
    usb: Path
    outside: Path
    config: AgentConfig


def skip_without_user_xattrs(folder: Path) -> None:
    """Skip the test where the filesystem of `folder` rejects user xattrs (labels)."""
    try:
        os.setxattr(folder, XATTR, b"probe")
        os.removexattr(folder, XATTR)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
            pytest.skip(f"filesystem of {folder} rejects user xattrs: {e}")
        raise


def make_dirs(tmp_path: Path, usb: Path | None = None) -> Dirs:
    """A sensitive root, a destination (`usb`, e.g. a tmpfs mount point) and an outside folder."""
    sensitive, outside = tmp_path / "sensitive", tmp_path / "outside"
    usb = usb or tmp_path / "usb"
    for path in (sensitive, usb, outside):
        path.mkdir(exist_ok=True)
    skip_without_user_xattrs(sensitive)
    config = AgentConfig(
        state_dir=tmp_path / "state",
        sensitive_roots=(sensitive,),
        destinations=(DestinationConfig(usb, DestinationClass.REMOVABLE, STICK),),
        host="ws-test",
        path_rules=(PathRule("*/board/*", "secret"),),
    )
    return Dirs(sensitive, usb, outside, config)


def labelled(path: Path, data: bytes, label: bytes | None = b"confidential") -> Path:
    path.write_bytes(data)
    if label is not None:
        os.setxattr(path, XATTR, label)
    return path


@dataclass
class Harness:
    """A pipeline over `dirs`, optionally fed by a real watcher; collects emitted events."""

    dirs: Dirs
    hasher: FileHasher | object
    clock: FakeClock | ShiftedClock | None
    attributor: object
    with_watcher: bool
    drops: Callable[[], int] | None = None
    reads: bool = False
    access: AccessConfig | None = None
    reported: ReportedCopies | None = None
    queue_size: int = 10_000
    overflows: Callable[[], int] | None = None
    observations: ObservationQueue = field(init=False)
    events: queue.Queue[Event] = field(default_factory=queue.Queue)
    seen: list[Event] = field(default_factory=list)

    def __post_init__(self) -> None:
        config = self.dirs.config
        if self.access is not None:
            config = replace(config, access=self.access)
        self.observations = queue.Queue(maxsize=self.queue_size)
        self.own = OwnReads()
        self.index = SensitiveIndex(config.labels.levels)
        self.watcher = Watcher(
            [(self.dirs.sensitive, Role.SENSITIVE), (self.dirs.usb, Role.DESTINATION)],
            self.observations,
            observe_reads=self.reads,
            # As the service wires it: fanotify's marks follow new folders.
            directories=self.attributor if isinstance(self.attributor, Attributor) else None,
        )
        self.pipeline = Pipeline(
            config,
            self.index,
            CopyDetector(self.index),
            self.attributor,  # type: ignore[arg-type]
            self.hasher,  # type: ignore[arg-type]
            self.events.put,
            self.clock or SystemClock(),
            observations=self.observations,
            drops=self.drops or (self.watcher.take_dropped if self.with_watcher else None),
            reported=self.reported,
            own_reads=self.own,
            attribution_overflows=self.overflows,
        )

    def start(self) -> None:
        """As the service does: workers, then the watcher, then the first scan."""
        self.pipeline.start()
        if self.with_watcher:
            self.watcher.start()
            if isinstance(self.attributor, Attributor):
                self.attributor.remark()
        self.pipeline.rescan()

    def stop(self) -> None:
        self.watcher.stop()
        self.pipeline.stop()
        self._drain()

    def put(self, kind: ObservationKind, path: Path | bytes, role: Role = Role.DESTINATION,
            dest: bytes = b"", at: float = 0.0) -> None:  # fmt: skip
        root = self.dirs.usb if role is Role.DESTINATION else self.dirs.sensitive
        self.observations.put(
            Observation(kind, os.fsencode(path), os.fsencode(root), role, at, dest)
        )

    def wait(
        self, predicate: Callable[[list[Event]], bool], timeout: float = TIMEOUT
    ) -> list[Event]:
        deadline = time.monotonic() + timeout
        while not predicate(self.seen):
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(
                    f"timed out; {self.pipeline.stats()}; own reads pending for "
                    f"{self.own.pending()[:5]}; events so far: {self.seen[-20:]}"
                )
            try:
                # short gets: some predicates look at counters, not at events
                self.seen.append(self.events.get(timeout=min(left, 0.05)))
            except queue.Empty:
                continue
        return self.seen

    def wait_copy_to(self, path: Path | bytes) -> Event:
        target = os.fsencode(path)

        def found(seen: list[Event]) -> bool:
            return any(is_copy_to(e, target) for e in seen)

        self.wait(found)
        return next(e for e in self.seen if is_copy_to(e, target))

    def wait_action(self, action: Action, source: Path | bytes) -> Event:
        target = os.fsencode(source)

        def match(e: Event) -> bool:
            return e.action is action and e.source is not None and e.source.path == target

        self.wait(lambda seen: any(match(e) for e in seen))
        return next(e for e in self.seen if match(e))

    def wait_gap(self, reason: GapReason) -> Event:
        self.wait(lambda seen: any(e.gap is not None and e.gap.reason == reason for e in seen))
        return next(e for e in self.seen if e.gap is not None and e.gap.reason == reason)

    def copies(self) -> list[Event]:
        return [e for e in self.seen if e.action in (Action.COPY, Action.MOVE)]

    def of(self, action: Action) -> list[Event]:
        return [e for e in self.seen if e.action is action]

    def settle_own_reads(self) -> None:
        """Wait until the agent's own reads are settled (all their closes accounted for).

        A stranger's read of a file while the agent reads it too may be merged with
        ours by the kernel (identical events not yet read are one): tests that read
        a file the agent just hashed wait for this first.
        """
        deadline = time.monotonic() + TIMEOUT
        while len(self.own):
            if time.monotonic() > deadline:
                pytest.fail(f"own reads never settled: {self.own.pending()}")
            threading.Event().wait(0.01)  # polling with a deadline

    def barrier(self) -> Event:
        """Return once every observation queued before this call was handled.

        Labels a fresh file, waits until it is indexed, copies it to the destination
        and waits for that copy: observations are handled in order, so what came
        before is done (stop() then lets the workers finish the rest). Needs the
        watcher; with reads observed, the copy's read of the source is an event too.
        """
        name = f"barrier-{time.monotonic_ns()}"
        src = labelled(self.dirs.sensitive / name, os.urandom(1531), label=b"internal")
        wait_indexed(self, src)
        shutil.copyfile(src, self.dirs.usb / name)
        return self.wait_copy_to(self.dirs.usb / name)

    def _drain(self) -> None:
        while True:
            try:
                self.seen.append(self.events.get_nowait())
            except queue.Empty:
                return


def is_copy_to(event: Event, target: bytes) -> bool:
    return (
        event.action in (Action.COPY, Action.MOVE)
        and event.destination is not None
        and event.destination.path == target
    )


def wait_indexed(h: Harness, path: Path, present: bool = True) -> None:
    key = os.fsencode(path)
    deadline = time.monotonic() + TIMEOUT
    while (h.index.get_path(key) is not None) != present:
        if time.monotonic() > deadline:
            pytest.fail(f"{path} never {'appeared in' if present else 'left'} the index")
        threading.Event().wait(0.01)  # polling the index with a deadline


def harness_factory(dirs: Dirs) -> Iterator[Callable[..., Harness]]:
    """Factory fixture body; every harness it made is stopped and must leave no thread."""
    before = set(threading.enumerate())
    made: list[Harness] = []

    def make(*, hasher: object | None = None, clock: FakeClock | ShiftedClock | None = None,
             attributor: object | None = None, with_watcher: bool = True,
             drops: Callable[[], int] | None = None, reads: bool = False,
             access: AccessConfig | None = None, reported: ReportedCopies | None = None,
             queue_size: int = 10_000, overflows: Callable[[], int] | None = None,
             ) -> Harness:  # fmt: skip
        h = Harness(
            dirs,
            hasher or FileHasher(dirs.config.hashing.max_file_bytes),
            clock,
            attributor or NobodyAttributor(),
            with_watcher,
            drops,
            reads,
            access,
            reported,
            queue_size,
            overflows,
        )
        made.append(h)
        return h

    yield make
    for h in made:
        h.stop()
    assert set(threading.enumerate()) <= before, "pipeline or watcher left threads running"
