"""The hashing rate cap: a token bucket in FileHasher, with an injected clock; its config."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest

from agent.config import load_config
from agent.errors import ConfigError
from agent.index import BURST_SECONDS, FileHasher, TokenBucket

MiB = 1024**2


class FakeTime:
    """A monotonic clock that only moves when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []
        self._lock = threading.Lock()

    def monotonic(self) -> float:
        with self._lock:
            return self.now

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.sleeps.append(seconds)
            self.now += seconds


def test_hashing_is_held_to_the_cap(tmp_path: Path) -> None:
    data = os.urandom(10 * MiB)
    path = tmp_path / "big"
    path.write_bytes(data)
    clock = FakeTime()
    hasher = FileHasher(10**9, 2 * MiB, monotonic=clock.monotonic, sleep=clock.sleep)
    outcome = hasher.hash_file(os.fsencode(path))
    assert outcome.sha256 == hashlib.sha256(data).hexdigest()
    # 10 MiB at 2 MiB/s, less the burst the bucket starts with.
    assert clock.now - 100.0 == pytest.approx(5 - BURST_SECONDS, abs=0.01)
    assert len(clock.sleeps) > 10  # paced per read, not one long sleep at the end


def test_small_files_read_in_one_go_are_capped_too(tmp_path: Path) -> None:
    path = tmp_path / "small"
    path.write_bytes(os.urandom(100 * 1024))
    clock = FakeTime()
    hasher = FileHasher(10**9, 100 * 1024, monotonic=clock.monotonic, sleep=clock.sleep)
    for _ in range(3):
        assert hasher.hash_file(os.fsencode(path)).sha256 is not None
    assert clock.now - 100.0 == pytest.approx(3 - BURST_SECONDS)


def test_the_cap_is_shared_by_files_and_archive_readers(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(os.urandom(MiB))
    clock = FakeTime()
    hasher = FileHasher(10**9, MiB, monotonic=clock.monotonic, sleep=clock.sleep)
    hasher.hash_file(os.fsencode(path))
    hasher.throttle(MiB)  # e.g. archive members
    hasher.throttle(MiB)
    assert clock.now - 100.0 == pytest.approx(3 - BURST_SECONDS)


def test_idle_time_refills_only_up_to_the_burst() -> None:
    clock = FakeTime()
    bucket = TokenBucket(1000, monotonic=clock.monotonic, sleep=clock.sleep)
    bucket.take(250)  # the initial burst: free
    assert clock.sleeps == []
    clock.now += 3600  # an idle hour does not bank an hour of bytes
    bucket.take(250)
    bucket.take(1000)
    assert clock.sleeps == [pytest.approx(1.0)]


def test_no_cap_never_sleeps(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(os.urandom(3 * MiB))
    clock = FakeTime()
    hasher = FileHasher(10**9, 0, monotonic=clock.monotonic, sleep=clock.sleep)
    assert hasher.hash_file(os.fsencode(path)).sha256 is not None
    hasher.throttle(10**9)
    assert clock.sleeps == []


def test_threads_sharing_a_cap_get_it_together(tmp_path: Path) -> None:
    paths = []
    for i in range(4):
        paths.append(tmp_path / f"f{i}")
        paths[-1].write_bytes(os.urandom(2 * MiB))
    clock = FakeTime()
    hasher = FileHasher(10**9, 4 * MiB, monotonic=clock.monotonic, sleep=clock.sleep)
    threads = [threading.Thread(target=hasher.hash_file, args=(os.fsencode(p),)) for p in paths]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # 8 MiB at 4 MiB/s: the debt slept off in all threads adds up to 2 s less the burst.
    assert sum(clock.sleeps) == pytest.approx(2 - BURST_SECONDS, abs=0.01)


def _config(tmp_path: Path, extra: str) -> Path:
    (tmp_path / "s").mkdir(exist_ok=True)
    (tmp_path / "d").mkdir(exist_ok=True)
    path = tmp_path / "agent.yaml"
    path.write_text(
        "state_dir: state\nsensitive_roots: [s]\n"
        "destinations: [{path: d, class: removable}]\n" + extra
    )
    return path


def test_config_rate_and_archive_limits(tmp_path: Path) -> None:
    config = load_config(
        _config(
            tmp_path,
            "hashing: {max_rate: 50MiB}\n"
            "archives: {enabled: false, max_members: 50, max_total_bytes: 2GiB,"
            " max_member_bytes: 100MiB, max_ratio: 20}\n",
        ),
        {},
    )
    assert config.hashing.max_rate == 50 * MiB
    assert not config.archives.enabled
    limits = config.archives.limits
    assert (limits.max_members, limits.max_total_bytes, limits.max_member_bytes) == (
        50,
        2 * 1024**3,
        100 * MiB,
    )
    assert limits.max_ratio == 20
    defaults = load_config(_config(tmp_path, "hashing: {max_rate: 0}\n"), {})
    assert defaults.hashing.max_rate == 0
    assert defaults.archives.enabled


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ("hashing: {max_rate: -5}\n", "hashing.max_rate"),
        ("hashing: {max_rate: fast}\n", "hashing.max_rate"),
        ("archives: {max_ratio: 0}\n", "archives.max_ratio"),
        ("archives: {enabled: maybe}\n", "archives.enabled"),
        ("archives: {max_depth: 3}\n", "archives.max_depth"),
    ],
)
def test_config_errors_name_the_key(tmp_path: Path, extra: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(_config(tmp_path, extra), {})
