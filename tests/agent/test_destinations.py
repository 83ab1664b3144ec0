"""agent.destinations: registry, mount classes, cloud-sync folders, and real mounts (root).

The root tests mount a loop ext4 image (the "USB stick", declared removable by
policy: a loop device is not on a USB bus) after the pipeline started, and a tmpfs
inside a watched folder; everything mounted is unmounted and detached in fixtures.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.attribution import Attributor, PipelineAttributor, open_attributor
from agent.clock import SystemClock
from agent.config import (
    AgentConfig,
    CloudSyncConfig,
    DestinationConfig,
    InotifyConfig,
    PathRule,
    RemovableConfig,
    load_config,
)
from agent.copy_detector import CopyDetector
from agent.destinations import (
    Destinations,
    DestinationTracker,
    classify_mount,
    cloud_sync_provider,
    find_cloud_sync,
    roots_for,
    share_remote,
)
from agent.errors import ConfigError
from agent.events import (
    Action,
    AttributionMethod,
    DestinationClass,
    DeviceInfo,
    Event,
    ProcessInfo,
    UserInfo,
)
from agent.index import FileHasher, Scanner, SensitiveIndex
from agent.labels import Labeller
from agent.mounts import Mount
from agent.pipeline import GapReason, Pipeline
from agent.watcher import Observation, ObservationKind, ObservationQueue, Role, Watcher
from tests.agent.sysfs_tree import FAT_UUID, MODEL, SERIAL, VENDOR, Tree, build_tree
from tests.procs import wait_until

TIMEOUT = 15.0
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="loop devices and mounts need root")


def b(path: Path) -> bytes:
    return os.fsencode(path)


def config_for(tmp_path: Path, **changes: Any) -> AgentConfig:
    config = AgentConfig(
        state_dir=tmp_path / "state",
        sensitive_roots=(tmp_path / "sensitive",),
        destinations=(),
        host="ws-test",
        path_rules=(PathRule("*/board/*", "secret"),),
        cloud_sync=CloudSyncConfig(detect=True, homes=tmp_path / "homes"),
    )
    return replace(config, **changes)


def mnt(mp: bytes, fs: str, source: str = "none", dev: tuple[int, int] = (0, 50), mid: int = 100):
    return Mount(mid, 1, dev[0], dev[1], b"/", mp, "rw", fs, source)


# the registry


def test_registry_adds_over_configured_entries_and_falls_back() -> None:
    usb = DestinationConfig(Path("/media/usb"), DestinationClass.LOCAL)
    registry = Destinations([usb])
    assert registry.get(b"/media/usb") == usb
    stick = DestinationConfig(
        Path("/media/usb"), DestinationClass.REMOVABLE, DeviceInfo(serial="S")
    )
    registry.add(stick)
    assert registry.get(b"/media/usb") == stick
    share = DestinationConfig(Path("/media/usb/share"), DestinationClass.NETWORK_SHARE)
    registry.add(share)
    assert registry.roots() == [b"/media/usb/share", b"/media/usb"]  # deepest first
    assert registry.enclosing(b"/media/usb/share/x") == (b"/media/usb/share", share)
    assert registry.enclosing(b"/media/usb/share") == (b"/media/usb", stick)
    assert registry.enclosing(b"/media/usbx") is None
    assert registry.remove(b"/media/usb") == stick
    assert registry.get(b"/media/usb") == usb  # the configured entry is back
    assert registry.remove(b"/media/usb") is None
    assert len(registry) == 2
    assert registry.get(b"/elsewhere") is None


def test_registry_is_safe_to_share_between_threads() -> None:
    registry = Destinations()
    errors: list[BaseException] = []

    def churn(i: int) -> None:
        try:
            for j in range(500):
                path = Path(f"/m/{i}/{j}")
                registry.add(DestinationConfig(path, DestinationClass.REMOVABLE))
                registry.roots()
                registry.remove(b(path))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=churn, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(registry) == 0


# classifying mounts


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    return build_tree(tmp_path / "fake")


def test_a_usb_stick_is_removable_by_device(tmp_path, tree) -> None:
    stick = mnt(b"/media/alice/CRUZER", "vfat", "/dev/sdb1", (8, 17))
    dest = classify_mount(stick, config_for(tmp_path), tree.sys, dev_root=tree.dev)
    assert dest is not None
    assert dest.destination_class is DestinationClass.REMOVABLE
    assert dest.path == Path("/media/alice/CRUZER")
    assert dest.device == DeviceInfo(
        vendor=VENDOR,
        model=MODEL,
        serial=SERIAL,
        fs_uuid=FAT_UUID,
        fs_type="vfat",
        mount_point=b"/media/alice/CRUZER",
    )


def test_removable_by_policy_device_name_serial_uuid_or_mount_point(tmp_path, tree) -> None:
    loop = mnt(b"/srv/image", "ext4", "/dev/loop0", (7, 0))
    config = config_for(tmp_path)
    assert classify_mount(loop, config, tree.sys, dev_root=tree.dev) is None  # not on USB
    for devices in (("loop0",), ("/dev/loop0",), ("LOOP0",)):
        named = replace(config, removable=RemovableConfig(devices=devices))
        dest = classify_mount(loop, named, tree.sys, dev_root=tree.dev)
        assert dest is not None
        assert dest.destination_class is DestinationClass.REMOVABLE
        assert dest.device is not None
        assert dest.device.fs_type == "ext4"
    # a stick named by serial or UUID (here: the same stick, to show the match)
    stick = mnt(b"/mnt/x", "vfat", "/dev/sdb1", (8, 17))
    for devices in ((SERIAL,), (FAT_UUID.lower(),)):
        named = replace(config, removable=RemovableConfig(devices=devices))
        assert classify_mount(stick, named, tree.sys, dev_root=tree.dev) is not None
    globbed = replace(config, removable=RemovableConfig(mount_points=("/srv/*",)))
    assert classify_mount(loop, globbed, tree.sys, dev_root=tree.dev) is not None
    other = replace(config, removable=RemovableConfig(devices=("loop1", "0000-0000")))
    assert classify_mount(loop, other, tree.sys, dev_root=tree.dev) is None


@pytest.mark.parametrize(
    ("fs", "source", "klass"),
    [
        ("nfs", "nas:/export", DestinationClass.NETWORK_SHARE),
        ("nfs4", "nas:/export", DestinationClass.NETWORK_SHARE),
        ("cifs", "//nas/share", DestinationClass.NETWORK_SHARE),
        ("smb3", "//nas/share", DestinationClass.NETWORK_SHARE),
        ("fuse.sshfs", "bob@host:/home/bob", DestinationClass.NETWORK_SHARE),
        ("fuse.rclone", "gdrive:", DestinationClass.NETWORK_SHARE),
        ("fuse.gvfsd-fuse", "gvfsd-fuse", DestinationClass.NETWORK_SHARE),
        ("fuse.portal", "portal", None),
        ("proc", "proc", None),
        ("cgroup2", "cgroup2", None),
        ("tmpfs", "tmpfs", None),
        ("overlay", "overlay", None),
    ],
)
def test_network_shares_by_type_and_never_pseudo_filesystems(tmp_path, fs, source, klass) -> None:
    dest = classify_mount(mnt(b"/net/x", fs, source), config_for(tmp_path), tmp_path / "nosys")
    assert (dest.destination_class if dest else None) is klass
    if dest is not None:  # the share's remote travels with the event: where it went
        assert dest.device == DeviceInfo(fs_type=fs, mount_point=b"/net/x", remote=source)


@pytest.mark.parametrize(
    ("source", "shown"),
    [
        ("//nas/finance", "//nas/finance"),
        ("nas:/export/home", "nas:/export/home"),
        ("bob@203.0.113.9:/srv/drop", "bob@203.0.113.9:/srv/drop"),
        (
            "https://bob:s3cret@dav.example.org/remote.php/dav",
            "https://bob@dav.example.org/remote.php/dav",
        ),
        ("https://:s3cret@dav.example.org", "https://@dav.example.org"),
        ("https://dav.example.org/a@b:c", "https://dav.example.org/a@b:c"),
        ("davs://bob@dav.example.org:8443/x", "davs://bob@dav.example.org:8443/x"),
    ],
)
def test_a_share_remote_never_carries_a_password(source: str, shown: str) -> None:
    assert share_remote(source) == shown
    assert "s3cret" not in share_remote(source)


def test_a_webdav_mount_reports_its_remote_without_the_password(tmp_path) -> None:
    mount = mnt(b"/net/dav", "davfs", "https://bob:s3cret@dav.example.org/dav")
    dest = classify_mount(mount, config_for(tmp_path), tmp_path / "nosys")
    assert dest is not None and dest.device is not None
    assert dest.device.remote == "https://bob@dav.example.org/dav"


def test_a_local_disk_and_the_root_are_not_destinations(tmp_path, tree) -> None:
    config = replace(config_for(tmp_path), removable=RemovableConfig(mount_points=("/*",)))
    root = mnt(b"/", "ext4", "/dev/sdb1", (8, 17))
    assert classify_mount(root, config, tree.sys, dev_root=tree.dev) is None
    data = mnt(b"/data", "ext4", "/dev/vdb", (254, 16))
    assert classify_mount(data, config_for(tmp_path), tree.sys, dev_root=tree.dev) is None


def test_a_configured_folder_keeps_its_class_and_gains_the_device(tmp_path, tree) -> None:
    configured = DestinationConfig(
        Path("/mnt/backup"), DestinationClass.LOCAL, DeviceInfo(vendor="Acme")
    )
    config = config_for(tmp_path, destinations=(configured,))
    disk = mnt(b"/mnt/backup", "ext4", "/dev/loop0", (7, 0))
    dest = classify_mount(disk, config, tree.sys, dev_root=tree.dev)
    assert dest is not None
    assert dest.destination_class is DestinationClass.LOCAL
    assert dest.device == DeviceInfo(vendor="Acme", fs_type="ext4", mount_point=b"/mnt/backup")


def test_a_sync_client_mount_in_a_home_is_cloud_sync(tmp_path) -> None:
    config = config_for(tmp_path)
    home = b(tmp_path / "homes" / "alice")
    dest = classify_mount(mnt(home + b"/OneDrive", "fuse.rclone"), config, tmp_path / "nosys")
    assert dest is not None
    assert dest.destination_class is DestinationClass.CLOUD_SYNC
    assert dest.device is not None
    assert (dest.device.vendor, dest.device.fs_type) == ("OneDrive", "fuse.rclone")
    cloud = config.cloud_sync
    assert cloud_sync_provider(home + b"/Library/CloudStorage/GoogleDrive-a@b.c", cloud) == (
        "Google Drive"
    )
    assert cloud_sync_provider(home + b"/Dropbox/sub", cloud) is None
    assert cloud_sync_provider(b"/elsewhere/Dropbox", cloud) is None
    off = replace(cloud, detect=False, folders=(Path("/srv/sync"),))
    assert cloud_sync_provider(home + b"/OneDrive", off) is None
    assert cloud_sync_provider(b"/srv/sync", off) == "configured"


# cloud-sync folders


def test_sync_folders_are_detected_in_homes_and_confirmed(tmp_path) -> None:
    homes = tmp_path / "homes"
    (homes / "alice" / "Dropbox").mkdir(parents=True)
    (homes / "bob" / "OneDrive").mkdir(parents=True)
    (homes / "carol").mkdir()
    (homes / "carol" / "Dropbox").write_text("not a folder")  # not confirmed
    moved = tmp_path / "data" / "Dropbox (Acme)"
    moved.mkdir(parents=True)
    (homes / "carol" / ".dropbox").mkdir()
    (homes / "carol" / ".dropbox" / "info.json").write_text(
        json.dumps({"business": {"path": str(moved), "host": 1}, "personal": {"nope": 1}})
    )
    storage = homes / "dave" / "Library" / "CloudStorage"
    (storage / "GoogleDrive-dave@example.com").mkdir(parents=True)
    (storage / "Box-Box").mkdir()
    (homes / "erin" / "Library" / "Mobile Documents" / "com~apple~CloudDocs").mkdir(parents=True)
    (homes / "frank").mkdir()
    (homes / "frank" / "Nextcloud").symlink_to(tmp_path / "data")  # watched at the target
    configured = tmp_path / "sync"
    configured.mkdir()
    cloud = CloudSyncConfig(homes=homes, folders=(configured, tmp_path / "missing"))

    found = {d.path: d for d in find_cloud_sync(cloud)}
    providers = {path: d.device.vendor for path, d in found.items() if d.device}
    assert providers == {
        configured: "configured",
        homes / "alice" / "Dropbox": "Dropbox",
        homes / "bob" / "OneDrive": "OneDrive",
        moved: "Dropbox",
        storage / "Box-Box": "Box-Box",
        storage / "GoogleDrive-dave@example.com": "Google Drive",
        homes / "erin" / "Library" / "Mobile Documents" / "com~apple~CloudDocs": "iCloud",
        tmp_path / "data": "Nextcloud",
    }
    assert all(d.destination_class is DestinationClass.CLOUD_SYNC for d in found.values())
    assert [d.path for d in find_cloud_sync(replace(cloud, detect=False))] == [configured]


@needs_root
def test_folders_a_user_points_elsewhere_are_not_watched(tmp_path) -> None:
    homes = tmp_path / "homes"
    mallory = homes / "mallory"
    (mallory / "OneDrive").mkdir(parents=True)
    (mallory / "Dropbox").symlink_to("/etc")  # root's, not mallory's
    (mallory / "Nextcloud").symlink_to("Nextcloud")  # a loop
    (mallory / ".dropbox").mkdir()
    os.mkfifo(mallory / ".dropbox" / "info.json")  # would block a plain open()
    for path in (mallory, mallory / "OneDrive", mallory / ".dropbox"):
        os.chown(path, 12345, 12345)
    found = find_cloud_sync(CloudSyncConfig(homes=homes))
    assert [d.path for d in found] == [mallory / "OneDrive"]
    (mallory / ".dropbox" / "info.json").unlink()
    (mallory / "Other").mkdir()
    os.chown(mallory / "Other", 12345, 12345)
    elsewhere = tmp_path / "info.json"
    elsewhere.write_text(json.dumps({"personal": {"path": str(mallory / "Other")}}))
    (mallory / ".dropbox" / "info.json").symlink_to(elsewhere)  # not followed
    assert [d.path for d in find_cloud_sync(CloudSyncConfig(homes=homes))] == [mallory / "OneDrive"]


# configuration


def test_config_sections_load_with_defaults_and_values(tmp_path) -> None:
    (tmp_path / "sensitive").mkdir()
    (tmp_path / "usb").mkdir()
    base = {
        "state_dir": "state",
        "sensitive_roots": ["sensitive"],
        "destinations": [{"path": "usb", "class": "removable"}],
    }
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(base))
    defaults = load_config(path, {})
    assert defaults.follow_mounts is True
    assert defaults.removable == RemovableConfig()
    assert defaults.cloud_sync == CloudSyncConfig(detect=True, homes=Path("/home"))
    assert defaults.inotify == InotifyConfig(raise_watch_limit=False, max_user_watches=524288)
    full = {
        **base,
        "follow_mounts": False,
        "removable": {"mount_points": ["/media/*/*"], "devices": ["loop0", "2C1B-7F3A"]},
        "cloud_sync": {"detect": False, "homes": "homes", "folders": ["sync"]},
        "inotify": {"raise_watch_limit": True, "max_user_watches": 1048576},
    }
    path.write_text(yaml.safe_dump(full))
    config = load_config(path, {})
    assert config.follow_mounts is False
    assert config.removable == RemovableConfig(("/media/*/*",), ("loop0", "2C1B-7F3A"))
    assert config.cloud_sync == CloudSyncConfig(False, tmp_path / "homes", (tmp_path / "sync",))
    assert config.inotify == InotifyConfig(True, 1048576)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"follow_mounts": "yes"}, "agent.yaml: follow_mounts: expected true or false"),
        ({"removable": {"disks": []}}, "agent.yaml: removable.disks: unknown key"),
        ({"removable": {"devices": "loop0"}}, "agent.yaml: removable.devices: expected a list"),
        ({"cloud_sync": {"detect": 1}}, "agent.yaml: cloud_sync.detect: expected true or false"),
        ({"cloud_sync": {"folders": [""]}}, "agent.yaml: cloud_sync.folders[0]: expected a non"),
        ({"inotify": {"max_user_watches": 10}}, "agent.yaml: inotify.max_user_watches: expected"),
    ],
)
def test_bad_sections_name_the_key(tmp_path, changes, message) -> None:
    (tmp_path / "sensitive").mkdir()
    (tmp_path / "usb").mkdir()
    path = tmp_path / "agent.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "state_dir": "state",
                "sensitive_roots": ["sensitive"],
                "destinations": [{"path": "usb", "class": "removable"}],
                **changes,
            }
        )
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert message in str(info.value)


# the tracker, fed mount tables by hand (a watcher that records calls)


@dataclass
class RecordingWatcher:
    calls: list[tuple[str, bytes, Role | None]] = field(default_factory=list)
    refuse: set[bytes] = field(default_factory=set)

    def add_root(self, path: Path | bytes, role: Role) -> bool:
        self.calls.append(("add", os.fsencode(path), role))
        return os.fsencode(path) not in self.refuse

    def remove_root(self, path: Path | bytes, role: Role | None = None) -> bool:
        self.calls.append(("remove", os.fsencode(path), role))
        return True


def test_tracker_watches_destination_mounts_and_drops_them_quietly(tmp_path, tree) -> None:
    sensitive, folder = tmp_path / "sensitive", tmp_path / "folder"
    config = config_for(
        tmp_path,
        follow_mounts=False,  # fed by hand below
        destinations=(DestinationConfig(folder, DestinationClass.LOCAL),),
        cloud_sync=CloudSyncConfig(detect=False),
    )
    registry = Destinations.from_config(config)
    watcher = RecordingWatcher()
    tracker = DestinationTracker(config, registry, watcher, sys_root=tree.sys, dev_root=tree.dev)
    tracker.start()
    stick = mnt(b"/media/alice/CRUZER", "vfat", "/dev/sdb1", (8, 17), mid=10)
    inside = mnt(b(folder / "nfs"), "nfs4", "nas:/x", mid=11)
    ram = mnt(b(folder / "ram"), "tmpfs", "tmpfs", mid=12)
    hidden = mnt(b(sensitive / "disk"), "ext4", "/dev/loop0", (7, 0), mid=13)
    ignored = [mnt(b"/proc", "proc", mid=14), mnt(b"/run", "tmpfs", mid=15), mnt(b"/", "ext4")]
    tracker.mounts_changed([stick, inside, ram, hidden, *ignored], [])

    assert watcher.calls == [
        ("add", b"/media/alice/CRUZER", Role.DESTINATION),
        ("add", b(folder / "nfs"), Role.DESTINATION),
        ("add", b(folder / "ram"), Role.DESTINATION),
        ("add", b(sensitive / "disk"), Role.SENSITIVE),
    ]
    removable = registry.get(b"/media/alice/CRUZER")
    assert removable is not None
    assert removable.destination_class is DestinationClass.REMOVABLE
    assert removable.device is not None
    assert removable.device.serial == SERIAL
    nfs = registry.get(b(folder / "nfs"))
    assert nfs is not None
    assert nfs.destination_class is DestinationClass.NETWORK_SHARE  # its own class
    inherited = registry.get(b(folder / "ram"))
    assert inherited is not None
    assert inherited.destination_class is DestinationClass.LOCAL  # the folder's class
    assert inherited.device == DeviceInfo(fs_type="tmpfs", mount_point=b(folder / "ram"))
    assert registry.get(b(sensitive / "disk")) is None
    assert set(tracker.watched_mounts()) == {
        b"/media/alice/CRUZER",
        b(folder / "nfs"),
        b(folder / "ram"),
        b(sensitive / "disk"),
    }

    watcher.calls.clear()
    tracker.mounts_changed([], [stick, ram, *ignored])
    assert watcher.calls == [
        ("remove", b(folder / "ram"), Role.DESTINATION),
        ("remove", b"/media/alice/CRUZER", Role.DESTINATION),
    ]
    assert registry.get(b"/media/alice/CRUZER") is None
    tracker.stop()


def test_tracker_watches_a_configured_folder_again_when_mounted_over(tmp_path) -> None:
    folder = tmp_path / "usb"
    config = config_for(
        tmp_path,
        follow_mounts=False,
        destinations=(DestinationConfig(folder, DestinationClass.REMOVABLE),),
        cloud_sync=CloudSyncConfig(detect=False),
    )
    registry = Destinations.from_config(config)
    watcher = RecordingWatcher()
    tracker = DestinationTracker(config, registry, watcher, sys_root=tmp_path / "nosys")
    tracker.start()
    over = mnt(b(folder), "ext4", "/dev/loop5", mid=20)
    tracker.mounts_changed([over], [])
    assert watcher.calls == [("add", b(folder), Role.DESTINATION)]
    configured_dest = registry.get(b(folder))
    assert configured_dest is not None
    assert configured_dest.device is not None
    assert configured_dest.device.fs_type == "ext4"
    tracker.mounts_changed([], [over])
    # the folder is uncovered: watched again (not dropped), configured entry back
    assert watcher.calls[1:] == [("add", b(folder), Role.DESTINATION)]
    assert registry.get(b(folder)) == config.destinations[0]
    # a mount above a watched root: the root's path leads elsewhere, watch it again
    watcher.calls.clear()
    tracker.mounts_changed([mnt(b(tmp_path), "tmpfs", mid=21)], [])
    assert ("add", b(folder), Role.DESTINATION) in watcher.calls
    assert ("add", b(tmp_path / "sensitive"), Role.SENSITIVE) in watcher.calls


def test_tracker_adds_cloud_sync_folders_at_start(tmp_path) -> None:
    (tmp_path / "homes" / "alice" / "Dropbox").mkdir(parents=True)
    config = config_for(tmp_path, follow_mounts=False)
    registry = Destinations.from_config(config)
    watcher = RecordingWatcher()
    DestinationTracker(config, registry, watcher).start()
    dropbox = b(tmp_path / "homes" / "alice" / "Dropbox")
    assert watcher.calls == [("add", dropbox, Role.DESTINATION)]
    dest = registry.get(dropbox)
    assert dest is not None
    assert dest.destination_class is DestinationClass.CLOUD_SYNC


# real watcher + pipeline + tracker


class NobodyAttributor:
    def attribute(
        self, path: bytes, st: os.stat_result, *, seen_at: float | None = None
    ) -> tuple[ProcessInfo | None, UserInfo, AttributionMethod]:
        return None, UserInfo(), AttributionMethod.UNATTRIBUTED

    reader_of = attribute


@dataclass
class Rig:
    """Watcher, pipeline and tracker over `config`, started like the service starts them."""

    config: AgentConfig
    attributor: Attributor | None = None
    """A real one (fanotify as root) is wired as the service wires it; None: nobody."""
    events: queue.Queue[Event] = field(default_factory=queue.Queue)
    seen: list[Event] = field(default_factory=list)

    def __post_init__(self) -> None:
        config = self.config
        self.observations: ObservationQueue = queue.Queue(maxsize=10_000)
        self.index = SensitiveIndex(config.labels.levels)
        hasher = FileHasher(config.hashing.max_file_bytes)
        self.scanner = Scanner(
            [b(r) for r in config.sensitive_roots], Labeller(config), self.index, hasher
        )
        self.registry = Destinations.from_config(config)
        self.watcher = Watcher(
            roots_for(self.registry, config.sensitive_roots),
            self.observations,
            directories=self.attributor,
        )
        attributor: PipelineAttributor = self.attributor or NobodyAttributor()
        self.pipeline = Pipeline(
            config,
            self.index,
            CopyDetector(self.index),
            attributor,
            hasher,
            self.events.put,
            SystemClock(),
            observations=self.observations,
            scanner=self.scanner,
            drops=self.watcher.take_dropped,
            destinations=self.registry,
        )
        self.tracker = DestinationTracker(
            config, self.registry, self.watcher, marks=self.attributor
        )

    def start(self) -> None:
        self.scanner.scan()
        self.pipeline.start()
        self.watcher.start()
        self.tracker.start()

    def stop(self) -> None:
        self.tracker.stop()
        self.watcher.stop()
        self.pipeline.stop()
        while not self.events.empty():
            self.seen.append(self.events.get_nowait())

    def wait(self, predicate: Callable[[Event], bool], what: str) -> Event:
        deadline = time.monotonic() + TIMEOUT
        while not any(predicate(e) for e in self.seen):
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"timed out waiting for {what}; events: {self.seen}")
            try:
                self.seen.append(self.events.get(timeout=left))
            except queue.Empty:
                continue
        return next(e for e in self.seen if predicate(e))

    def wait_copy_to(self, path: Path) -> Event:
        target = b(path)
        return self.wait(
            lambda e: e.destination is not None and e.destination.path == target, f"copy to {path}"
        )

    def gaps(self, reason: str) -> list[Event]:
        return [e for e in self.seen if e.gap is not None and e.gap.reason == reason]


@pytest.fixture
def rig() -> Iterator[Callable[[AgentConfig], Rig]]:
    made: list[Rig] = []

    def make(config: AgentConfig, attributor: Attributor | None = None) -> Rig:
        made.append(Rig(config, attributor))
        return made[-1]

    yield make
    for r in made:
        r.stop()


@pytest.fixture
def mounts() -> Iterator[list[Path]]:
    """Mount points used by a test: still mounted at the end -> unmounted."""
    used: list[Path] = []
    yield used
    for point in reversed(used):
        while os.path.ismount(point):
            subprocess.run(["umount", "-l", point], check=False)


@dataclass
class LoopStick:
    device: str
    fs_uuid: str


@pytest.fixture
def loop_stick(tmp_path) -> Iterator[LoopStick]:
    """An ext4 image on a loop device (detached at the end, even on failure)."""
    if shutil.which("mkfs.ext4") is None or shutil.which("losetup") is None:
        pytest.skip("mkfs.ext4 and losetup are needed")
    if os.geteuid() != 0:
        pytest.skip("loop devices need root")
    image = tmp_path / "stick.img"
    image.write_bytes(b"")
    os.truncate(image, 16 * 1024 * 1024)
    fs_uuid = str(uuid.uuid4())
    subprocess.run(["mkfs.ext4", "-q", "-F", "-U", fs_uuid, image], check=True)
    device = subprocess.run(
        ["losetup", "--find", "--show", image], check=True, capture_output=True, text=True
    ).stdout.strip()
    try:
        yield LoopStick(device, fs_uuid)
    finally:
        subprocess.run(["losetup", "-d", device], check=False)


@needs_root
def test_a_stick_mounted_later_is_watched_unmounted_and_watched_again(
    tmp_path, rig, mounts, loop_stick
) -> None:
    (tmp_path / "sensitive" / "board").mkdir(parents=True)
    plan = tmp_path / "sensitive" / "board" / "plan.pdf"  # labelled by the path rule
    plan.write_bytes(os.urandom(50_000))
    point = tmp_path / "media" / "STICK"
    point.mkdir(parents=True)
    mounts.append(point)
    name = os.path.basename(loop_stick.device)
    config = config_for(
        tmp_path,
        removable=RemovableConfig(devices=(name,)),  # a loop device is not on USB
        cloud_sync=CloudSyncConfig(detect=False),
    )
    r = rig(config)
    r.start()
    assert len(r.index) == 1

    subprocess.run(["mount", loop_stick.device, point], check=True)
    wait_until(lambda: b(point) in r.tracker.watched_mounts(), TIMEOUT, "a watch on the stick")
    subprocess.run(["cp", plan, point / "plan.pdf"], check=True)
    event = r.wait_copy_to(point / "plan.pdf")
    assert event.action is Action.COPY
    assert event.label == "secret"
    assert event.destination_class is DestinationClass.REMOVABLE
    assert event.device is not None
    assert event.device.fs_type == "ext4"
    assert event.device.fs_uuid == loop_stick.fs_uuid
    assert event.device.mount_point == b(point)

    unmount(point)
    wait_until(lambda: b(point) not in r.tracker.watched_mounts(), TIMEOUT, "the watch dropped")
    assert (b(point), Role.DESTINATION) not in r.watcher.roots()
    assert r.registry.get(b(point)) is None

    subprocess.run(["mount", loop_stick.device, point], check=True)
    wait_until(lambda: b(point) in r.tracker.watched_mounts(), TIMEOUT, "the watch back")
    shutil.copy(plan, point / "again.pdf")
    again = r.wait_copy_to(point / "again.pdf")
    assert again.device is not None
    assert again.device.fs_uuid == loop_stick.fs_uuid
    unmount(point)
    wait_until(lambda: not r.tracker.watched_mounts(), TIMEOUT, "the watch dropped again")
    r.stop()
    assert r.gaps(GapReason.WATCH_LOST) == []  # orderly unmounts are no coverage gaps
    assert len([e for e in r.seen if e.action is Action.COPY]) == 2


@needs_root
def test_fanotify_marks_a_stick_mounted_later_as_a_whole_and_forgets_it_unmounted(
    tmp_path, rig, mounts, loop_stick
) -> None:
    """A stick mounted later is marked as a whole filesystem (folders made on it need no
    marks of their own), as the service wires it; the unmount forgets the mark."""
    (tmp_path / "sensitive" / "board").mkdir(parents=True)
    plan = tmp_path / "sensitive" / "board" / "plan.pdf"  # labelled by the path rule
    plan.write_bytes(os.urandom(40_000))
    point = tmp_path / "media" / "STICK"
    point.mkdir(parents=True)
    mounts.append(point)
    config = config_for(
        tmp_path,
        removable=RemovableConfig(devices=(os.path.basename(loop_stick.device),)),
        cloud_sync=CloudSyncConfig(detect=False),
    )
    attributor = open_attributor(config.sensitive_roots, [d.path for d in config.destinations])
    try:
        marks = attributor.marks
        if marks is None:
            pytest.skip("fanotify is not available here")
        r = rig(config, attributor)
        r.start()
        assert marks.mounts == []
        subprocess.run(["mount", loop_stick.device, point], check=True)
        wait_until(lambda: b(point) in marks.mounts, TIMEOUT, "a filesystem mark on the stick")
        deep = point / "new" / "folders"
        subprocess.run(["mkdir", "-p", str(deep)], check=True)
        cp = subprocess.Popen(["cp", str(plan), str(deep / "plan.pdf")])
        assert cp.wait(timeout=10) == 0
        event = r.wait_copy_to(deep / "plan.pdf")
        assert event.destination_class is DestinationClass.REMOVABLE
        assert event.attribution is AttributionMethod.FANOTIFY
        assert event.process is not None and event.process.pid == cp.pid
        unmount(point)
        wait_until(lambda: not marks.mounts, TIMEOUT, "the stick's mark forgotten")
        r.stop()
    finally:
        attributor.close()


@needs_root
def test_a_mount_inside_a_watched_destination_gets_its_own_watch(tmp_path, rig, mounts) -> None:
    (tmp_path / "sensitive" / "board").mkdir(parents=True)
    minutes = tmp_path / "sensitive" / "board" / "minutes.txt"
    minutes.write_bytes(os.urandom(20_000))
    folder = tmp_path / "exports"
    sub = folder / "ram"
    sub.mkdir(parents=True)
    mounts.append(sub)
    config = config_for(
        tmp_path,
        destinations=(DestinationConfig(folder, DestinationClass.LOCAL),),
        cloud_sync=CloudSyncConfig(detect=False),
    )
    r = rig(config)
    r.start()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "exfw-sub", sub], check=True)
    wait_until(lambda: b(sub) in r.tracker.watched_mounts(), TIMEOUT, "a watch on the mount")
    # the folder's own watch sits on the covered directory and would never see this
    shutil.copy(minutes, sub / "m.txt")
    event = r.wait_copy_to(sub / "m.txt")
    assert event.destination_class is DestinationClass.LOCAL  # the folder's class
    assert event.device == DeviceInfo(fs_type="tmpfs", mount_point=b(sub))
    shutil.copy(minutes, folder / "beside.txt")  # the folder itself is still watched
    r.wait_copy_to(folder / "beside.txt")
    subprocess.run(["umount", sub], check=True)
    wait_until(lambda: not r.tracker.watched_mounts(), TIMEOUT, "the watch dropped")
    r.stop()
    assert len([e for e in r.seen if e.destination and e.destination.path == b(sub / "m.txt")]) == 1
    assert r.gaps(GapReason.WATCH_LOST) == []


def test_a_watch_limit_observation_is_a_coverage_gap(tmp_path, rig) -> None:
    (tmp_path / "sensitive").mkdir()
    r = rig(config_for(tmp_path, follow_mounts=False, cloud_sync=CloudSyncConfig(detect=False)))
    r.start()
    root = b(tmp_path / "sensitive")
    r.observations.put(
        Observation(ObservationKind.WATCH_LIMIT, root + b"/deep", root, Role.SENSITIVE, 0.0)
    )
    gap = r.wait(lambda e: e.gap is not None, "a coverage gap")
    assert gap.action is Action.COVERAGE_GAP
    assert gap.gap is not None
    assert (gap.gap.reason, gap.gap.count) == (GapReason.WATCH_LIMIT, 1)
    assert str(GapReason.WATCH_LIMIT) == "watch_limit"


def unmount(point: Path) -> None:
    """Unmount as a user ejecting a stick would: retried while the agent still reads it
    ("target is busy" while a worker hashes the last copy), within a deadline."""
    wait_until(
        lambda: subprocess.run(["umount", point], capture_output=True).returncode == 0,
        TIMEOUT,
        f"{point} unmounted",
    )
