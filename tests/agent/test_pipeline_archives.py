"""Archives at a destination, end to end in the agent: real `tar` and `zip`, real watcher.

Labelled files packed into an archive written to a watched destination each come out as one
COPY event with detection archive_member; archives that cannot be fully read are coverage
gaps; an archive already reported is not reported again when renamed or copied.
"""

from __future__ import annotations

import io
import os
import queue
import shutil
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from agent.archive import ArchiveLimits
from agent.clock import SystemClock
from agent.config import AgentConfig, ArchivesConfig, DestinationConfig, HashingConfig
from agent.copy_detector import CopyDetector, is_temp_name
from agent.events import (
    Action,
    AttributionMethod,
    DestinationClass,
    DetectionMethod,
    Event,
    ProcessInfo,
    UserInfo,
)
from agent.index import FileHasher, Scanner, SensitiveIndex
from agent.labels import Labeller
from agent.pipeline import GapReason, Pipeline
from agent.watcher import Observation, ObservationKind, ObservationQueue, Role, Watcher
from tests.agent.pipeline_harness import XATTR, skip_without_user_xattrs

pytestmark = [
    pytest.mark.filterwarnings("ignore:Callback with id:RuntimeWarning"),
    pytest.mark.skipif(shutil.which("zip") is None, reason="the zip command is not installed"),
]

TIMEOUT = 15.0
NON_UTF8 = b"r\xe9sum\xe9-\xff.docx"


class Nobody:
    def attribute(
        self, path: bytes, st: os.stat_result, *, seen_at: float | None = None
    ) -> tuple[ProcessInfo | None, UserInfo, AttributionMethod]:
        return None, UserInfo(), AttributionMethod.UNATTRIBUTED

    reader_of = attribute


class Agent:
    """Watcher + pipeline over a sensitive folder and a removable destination."""

    def __init__(self, config: AgentConfig, temp_grace: float) -> None:
        self.config = config
        self.index = SensitiveIndex(config.labels.levels)
        hasher = FileHasher(config.hashing.max_file_bytes)
        self.scanner = Scanner(
            [os.fsencode(config.sensitive_roots[0])], Labeller(config), self.index, hasher
        )
        observations: ObservationQueue = queue.Queue(maxsize=10_000)
        self.observations = observations
        self.watcher = Watcher(
            [(config.sensitive_roots[0], Role.SENSITIVE),
             (config.destinations[0].path, Role.DESTINATION)],
            observations,
        )  # fmt: skip
        self.events: queue.Queue[Event] = queue.Queue()
        self.seen: list[Event] = []
        self.pipeline = Pipeline(
            config,
            self.index,
            CopyDetector(self.index, temp_grace=temp_grace),
            Nobody(),
            hasher,
            self.events.put,
            SystemClock(),
            observations=observations,
            scanner=self.scanner,
            drops=self.watcher.take_dropped,
        )

    def start(self, *, watch: bool = True) -> None:
        self.scanner.scan()
        if watch:
            self.watcher.start()
        self.pipeline.start()

    def put(self, kind: ObservationKind, path: Path) -> None:
        """Feed an observation by hand (the watcher not started)."""
        root = os.fsencode(self.config.destinations[0].path)
        self.observations.put(Observation(kind, os.fsencode(path), root, Role.DESTINATION, 0.0))

    def stop(self) -> None:
        self.watcher.stop()
        self.pipeline.stop()
        while not self.events.empty():
            self.seen.append(self.events.get_nowait())

    def wait(self, predicate: Callable[[list[Event]], bool], what: str) -> None:
        deadline = time.monotonic() + TIMEOUT
        while not predicate(self.seen):
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"timed out waiting for {what}; events so far: {self.seen}")
            try:
                self.seen.append(self.events.get(timeout=left))
            except queue.Empty:
                continue

    def members(self) -> list[Event]:
        return [e for e in self.seen if e.detection is DetectionMethod.ARCHIVE_MEMBER]

    def wait_members(self, n: int) -> None:
        self.wait(lambda seen: len(self.members()) >= n, f"{n} archive member events")

    def wait_copy_to(self, path: Path) -> Event:
        target = os.fsencode(path)
        self.wait(
            lambda seen: any(e.destination and e.destination.path == target for e in seen),
            f"an event for {path}",
        )
        return next(e for e in self.seen if e.destination and e.destination.path == target)


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path, AgentConfig]:
    sensitive, usb = tmp_path / "sensitive", tmp_path / "usb"
    sensitive.mkdir()
    usb.mkdir()
    skip_without_user_xattrs(sensitive)
    config = AgentConfig(
        state_dir=tmp_path / "state",
        sensitive_roots=(sensitive,),
        destinations=(DestinationConfig(usb, DestinationClass.REMOVABLE),),
        host="ws-test",
    )
    return sensitive, usb, config


@pytest.fixture
def agent_for(tree) -> Iterator[Callable[..., Agent]]:
    made: list[Agent] = []

    def make(config: AgentConfig, temp_grace: float = 10.0, *, watch: bool = True) -> Agent:
        made.append(Agent(config, temp_grace))
        made[-1].start(watch=watch)
        return made[-1]

    yield make
    for a in made:
        a.stop()


def labelled(path: Path, data: bytes, label: bytes = b"confidential") -> bytes:
    path.write_bytes(data)
    os.setxattr(path, XATTR, label)
    return os.fsencode(path)


def test_tar_and_zip_of_labelled_files_are_one_event_per_labelled_member(tree, agent_for):
    sensitive, usb, config = tree
    sources = {
        b"board.docx": labelled(sensitive / "board.docx", os.urandom(30_000), b"secret"),
        b"payroll.xlsx": labelled(sensitive / "payroll.xlsx", b"salary;" * 20_000),
        NON_UTF8: labelled(sensitive / os.fsdecode(NON_UTF8), os.urandom(5_000)),
    }
    (sensitive / "public.txt").write_bytes(b"nothing to see")
    barrier = labelled(sensitive / "barrier.bin", os.urandom(777))
    agent = agent_for(config)
    assert len(agent.index) == 4

    names = [os.fsdecode(n) for n in sources] + ["public.txt"]
    subprocess.run(["tar", "cf", usb / "all.tar", "-C", sensitive, *names], check=True)
    subprocess.run(["tar", "czf", usb / "two.tgz", "-C", sensitive, names[0], names[3]],
                   check=True)  # fmt: skip
    # zip writes a temporary file and renames it into place.
    subprocess.run(["zip", "-q", usb / "some.zip", names[1], names[2], names[3]], cwd=sensitive,
                   check=True)  # fmt: skip
    agent.wait_members(3 + 1 + 2)
    subprocess.run(["cp", os.fsdecode(barrier), usb], check=True)
    agent.wait_copy_to(usb / "barrier.bin")
    agent.stop()

    got = sorted(
        (os.path.basename(e.destination.path), e.archive_member)
        for e in agent.members()
        if e.destination is not None
    )
    assert got == sorted(
        [(b"all.tar", n) for n in sources]
        + [(b"two.tgz", b"board.docx")]
        + [(b"some.zip", b"payroll.xlsx"), (b"some.zip", NON_UTF8)]
    )
    for event in agent.members():
        assert event.action is Action.COPY
        assert event.source is not None and event.destination is not None
        assert event.source.path == sources[event.archive_member]
        assert event.label == ("secret" if event.archive_member == b"board.docx" else
                               "confidential")  # fmt: skip
        assert event.destination_class is DestinationClass.REMOVABLE
        archive = Path(os.fsdecode(event.destination.path))
        assert event.destination.size == archive.stat().st_size
        assert event.destination.sha256 == _sha256(archive)
    assert not [e for e in agent.seen if e.action is Action.COVERAGE_GAP]


def test_a_reported_archive_renamed_is_not_reported_again_and_its_copies_are_copies(
    tree, agent_for
) -> None:
    sensitive, usb, config = tree
    labelled(sensitive / "plan.pdf", os.urandom(20_000))
    barrier = labelled(sensitive / "barrier.bin", os.urandom(777))
    agent = agent_for(config)
    subprocess.run(["tar", "cf", usb / "a.tar", "-C", sensitive, "plan.pdf"], check=True)
    agent.wait_members(1)
    os.rename(usb / "a.tar", usb / "b.tar")
    subprocess.run(["cp", usb / "b.tar", usb / "c.tar"], check=True)
    copy = agent.wait_copy_to(usb / "c.tar")
    subprocess.run(["cp", os.fsdecode(barrier), usb], check=True)
    agent.wait_copy_to(usb / "barrier.bin")
    agent.stop()
    assert len(agent.members()) == 1
    # The archive inherited its member's label: a copy of it is an exact copy.
    assert copy.detection is DetectionMethod.EXACT_HASH
    assert copy.source is not None and copy.source.path == os.fsencode(usb / "b.tar")
    assert copy.label == "confidential"


def test_an_archive_that_cannot_be_fully_read_is_a_coverage_gap(tree, agent_for) -> None:
    sensitive, usb, config = tree
    labelled(sensitive / "a.docx", os.urandom(3000))
    labelled(sensitive / "big.docx", os.urandom(50_000))
    limits = ArchiveLimits(max_member_bytes=10_000)
    agent = agent_for(replace(config, archives=ArchivesConfig(limits=limits)))
    subprocess.run(["zip", "-q", "-P", "pw", usb / "locked.zip", "a.docx"], cwd=sensitive,
                   check=True)  # fmt: skip
    agent.wait(
        lambda seen: any(e.gap and e.gap.reason == GapReason.ARCHIVE_INCOMPLETE for e in seen),
        "a coverage gap for the encrypted zip",
    )
    subprocess.run(["tar", "cf", usb / "mixed.tar", "-C", sensitive, "a.docx", "big.docx"],
                   check=True)  # fmt: skip
    event = agent.wait_copy_to(usb / "mixed.tar")  # the member within the limits
    assert event.archive_member == b"a.docx"
    agent.stop()
    gaps = [e for e in agent.seen if e.gap and e.gap.reason == GapReason.ARCHIVE_INCOMPLETE]
    assert sum(e.gap.count for e in gaps if e.gap) == 2
    assert len(agent.members()) == 1


def test_an_archive_under_a_temp_name_is_scanned_on_rename_or_once_it_settles(tree, agent_for):
    sensitive, usb, config = tree
    labelled(sensitive / "a.docx", os.urandom(3000))
    agent = agent_for(config, temp_grace=0.3)
    assert is_temp_name(b"/usb/zimmWthL")  # Info-ZIP's temporary file
    subprocess.run(["tar", "cf", usb / ".out.tar.Xy12Z9", "-C", sensitive, "a.docx"], check=True)
    os.rename(usb / ".out.tar.Xy12Z9", usb / "out.tar")  # rsync style
    (sensitive / "b.txt").write_bytes(b"unlabelled")  # another archive, not a copy of the first
    subprocess.run(["tar", "cf", usb / "hidden.part", "-C", sensitive, "a.docx", "b.txt"],
                   check=True)  # fmt: skip
    agent.wait_members(2)
    agent.stop()
    assert sorted(
        os.path.basename(e.destination.path) for e in agent.members() if e.destination
    ) == [
        b"hidden.part",
        b"out.tar",
    ]


def test_an_archive_too_large_to_hash_still_reports_its_members(tree, agent_for) -> None:
    sensitive, usb, config = tree
    labelled(sensitive / "a.docx", os.urandom(3000))
    agent = agent_for(replace(config, hashing=HashingConfig(max_file_bytes=5000)))
    subprocess.run(["tar", "cf", usb / "a.tar", "-C", sensitive, "a.docx"], check=True)
    event = agent.wait_copy_to(usb / "a.tar")  # 10,240 bytes: past max_file_bytes
    agent.stop()
    assert event.archive_member == b"a.docx"
    assert event.destination is not None
    assert (event.destination.size, event.destination.sha256) == (10240, "")


def test_a_tar_seen_half_written_then_whole_reports_each_member_once(tree, agent_for) -> None:
    """A create handled while tar still writes sees a truncated archive: no gap for that,
    its complete members reported then, the rest when the close comes, none twice."""
    sensitive, usb, config = tree
    a = os.urandom(3000)
    b = os.urandom(3000)
    labelled(sensitive / "a.docx", a)
    labelled(sensitive / "b.docx", b)
    agent = agent_for(config, watch=False)
    whole = io.BytesIO()
    with tarfile.open(fileobj=whole, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for name, data in (("a.docx", a), ("b.docx", b)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    data = whole.getvalue()
    path = usb / "x.tar"
    with path.open("wb") as f:
        f.write(data[: 512 + 3072 + 512 + 1000])  # a.docx whole, b.docx cut
        f.flush()
        agent.put(ObservationKind.CREATED, path)
        agent.wait_members(1)
        f.write(data[512 + 3072 + 512 + 1000 :])
    agent.put(ObservationKind.CLOSED_WRITE, path)
    agent.wait_members(2)
    agent.put(ObservationKind.CLOSED_WRITE, path)  # seen again: nothing new
    agent.stop()
    assert sorted(e.archive_member for e in agent.members()) == [b"a.docx", b"b.docx"]
    assert not [e for e in agent.seen if e.action is Action.COVERAGE_GAP]


def test_archives_can_be_switched_off(tree, agent_for) -> None:
    sensitive, usb, config = tree
    labelled(sensitive / "a.docx", os.urandom(3000))
    barrier = labelled(sensitive / "barrier.bin", os.urandom(777))
    agent = agent_for(replace(config, archives=ArchivesConfig(enabled=False)))
    subprocess.run(["tar", "cf", usb / "a.tar", "-C", sensitive, "a.docx"], check=True)
    subprocess.run(["cp", os.fsdecode(barrier), usb], check=True)
    agent.wait_copy_to(usb / "barrier.bin")
    agent.stop()
    assert agent.members() == []


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()
