"""Where copies can go: the destination registry, mount classification and cloud-sync folders.

The pipeline looks a watched root up in `Destinations` to learn its class and
device. `DestinationTracker` keeps that registry and the watcher's roots in step
with the mount table (agent.mounts) and the cloud-sync folders found in homes:
a USB stick is recognised by its device (agent.sysfs), not by its path, and a
filesystem mounted below a watched folder gets its own watch, because the folder's
watch sees nothing written to it (FIELD-NOTES §1.8, §4.2-4.4).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import stat
import threading
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Protocol

from agent.config import AgentConfig, CloudSyncConfig, DestinationConfig, RemovableConfig
from agent.events import DestinationClass, DeviceInfo
from agent.mounts import MOUNTINFO, Mount, MountFollower
from agent.sysfs import DEV_ROOT, SYS_ROOT, BlockInfo, block_info
from agent.watcher import Role

logger = logging.getLogger(__name__)

PSEUDO_FS = frozenset(
    {
        "autofs",
        "binfmt_misc",
        "bpf",
        "cgroup",
        "cgroup2",
        "configfs",
        "debugfs",
        "devpts",
        "devtmpfs",
        "efivarfs",
        "fusectl",
        "hugetlbfs",
        "mqueue",
        "nfsd",
        "nsfs",
        "proc",
        "pstore",
        "rpc_pipefs",
        "securityfs",
        "selinuxfs",
        "sysfs",
        "tracefs",
    }
)
"""Kernel interfaces, never a place a user copies a file to."""

NETWORK_FS = frozenset(
    {"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "ceph", "davfs", "afs", "glusterfs", "lustre"}
)
"""Network filesystems by type (FIELD-NOTES §4.3); FUSE clients are `fuse.*`."""

LOCAL_FUSE = frozenset(
    {"fuse.portal", "fuse.lxcfs", "fuse.snapfuse", "fuse.squashfuse", "fuse.appimagelauncherfs"}
)
"""FUSE filesystems that are local plumbing, not a share (desktop portals, containers, snaps)."""

CLOUD_SYNC_FOLDERS: tuple[tuple[str, str], ...] = (
    ("Dropbox", "Dropbox"),
    ("OneDrive", "OneDrive"),
    ("Google Drive", "Google Drive"),
    ("GoogleDrive", "Google Drive"),
    ("My Drive", "Google Drive"),
    ("iCloudDrive", "iCloud"),
    ("Library/Mobile Documents/com~apple~CloudDocs", "iCloud"),
    ("Nextcloud", "Nextcloud"),
)
"""Default sync folders inside a home (relative path, provider), FIELD-NOTES §4.4."""

_INFO_JSON_MAX = 64 * 1024
_CLOUD_STORAGE = "Library/CloudStorage"
"""macOS File Provider roots: one folder per account (`Dropbox`, `OneDrive-Personal`...)."""
_PROVIDER_PREFIXES = (
    ("Dropbox", "Dropbox"),
    ("OneDrive", "OneDrive"),
    ("GoogleDrive", "Google Drive"),
)


def _is_under(path: bytes, root: bytes) -> bool:
    return path == root or path.startswith(root.rstrip(b"/") + b"/")


def _display(path: bytes) -> str:
    return path.decode("utf-8", "backslashreplace")


class Destinations:
    """Thread-safe registry: watched root (bytes) -> `DestinationConfig`.

    Configured destinations are permanent; `add` puts an entry over them or
    beside them (a mount, a sync folder) and `remove` takes it away again, which
    brings the configured entry back if there was one (a stick unmounted from a
    configured folder).
    """

    def __init__(self, configured: Iterable[DestinationConfig] = ()) -> None:
        self._lock = threading.Lock()
        self._configured = {os.fsencode(d.path): d for d in configured}
        self._added: dict[bytes, DestinationConfig] = {}

    @classmethod
    def from_config(cls, config: AgentConfig) -> Destinations:
        return cls(config.destinations)

    def get(self, root: bytes) -> DestinationConfig | None:
        with self._lock:
            return self._added.get(root) or self._configured.get(root)

    def roots(self) -> list[bytes]:
        """Every root, deepest first: a rescan then meets a file on a mount below a
        watched folder through the mount's own entry (its class and device) first."""
        with self._lock:
            roots = set(self._added) | set(self._configured)
        return sorted(roots, key=lambda r: (-r.count(b"/"), r))

    def add(self, dest: DestinationConfig) -> None:
        with self._lock:
            self._added[os.fsencode(dest.path)] = dest

    def remove(self, root: bytes) -> DestinationConfig | None:
        """Forget what `add` put at `root`; configured destinations stay."""
        with self._lock:
            return self._added.pop(root, None)

    def enclosing(self, path: bytes) -> tuple[bytes, DestinationConfig] | None:
        """The deepest root strictly above `path`, with its destination."""
        with self._lock:
            entries = {**self._configured, **self._added}
        above = [r for r in entries if r != path and _is_under(path, r)]
        if not above:
            return None
        root = max(above, key=len)
        return root, entries[root]

    def __len__(self) -> int:
        with self._lock:
            return len(set(self._added) | set(self._configured))


# classification


def _device_of(mount: Mount, sys_root: Path, dev_root: Path) -> BlockInfo | None:
    major, minor = mount.major, mount.minor
    if major == 0 and mount.source.startswith("/dev/"):
        # btrfs (and some others) report an anonymous device: ask the source node
        try:
            rdev = os.stat(dev_root / mount.source.removeprefix("/dev/")).st_rdev
        except OSError:
            return None
        major, minor = os.major(rdev), os.minor(rdev)
    if major == 0:
        return None
    return block_info(major, minor, sys_root=sys_root, dev_root=dev_root)


def _device_named(removable: RemovableConfig, mount: Mount, block: BlockInfo | None) -> bool:
    """A `removable.devices` entry names this mount's device: by kernel name (the
    partition or its disk, with or without /dev/), USB serial or filesystem UUID."""
    if not removable.devices:
        return False

    def norm(name: str) -> str:
        return name.removeprefix("/dev/").lower()

    names = {norm(mount.source)}
    if block is not None:
        names |= {norm(n) for n in (block.name, block.disk, block.serial, block.fs_uuid) if n}
    return any(norm(wanted) in names for wanted in removable.devices)


def _mount_point_named(removable: RemovableConfig, mount_point: bytes) -> bool:
    return any(
        fnmatch.fnmatchcase(mount_point, os.fsencode(pattern)) for pattern in removable.mount_points
    )


def _device_info(mount: Mount, block: BlockInfo | None) -> DeviceInfo:
    if block is None:
        remote = share_remote(mount.source) if is_network_fs(mount.fs_type) else ""
        return DeviceInfo(fs_type=mount.fs_type, mount_point=mount.mount_point, remote=remote)
    return DeviceInfo(
        vendor=block.vendor,
        model=block.model,
        serial=block.serial,
        fs_uuid=block.fs_uuid,
        fs_type=mount.fs_type,
        mount_point=mount.mount_point,
    )


def share_remote(source: str) -> str:
    """What a network mount mounts, as an analyst reads it: the mount table's source with
    any password taken out (davfs and some FUSE mounts take URLs, which may carry one:
    `https://bob:secret@dav.example/x` -> `https://bob@dav.example/x`)."""
    scheme, sep, rest = source.partition("://")
    if not sep:
        return source
    authority, slash, path = rest.partition("/")
    userinfo, at, host = authority.rpartition("@")
    if at and ":" in userinfo:
        authority = userinfo.partition(":")[0] + "@" + host
    return f"{scheme}://{authority}{slash}{path}"


def is_network_fs(fs_type: str) -> bool:
    if fs_type in NETWORK_FS:
        return True
    # fuseblk is a local block device (ntfs-3g, exfat-fuse): classified by device
    return (fs_type == "fuse" or fs_type.startswith("fuse.")) and fs_type not in LOCAL_FUSE


def cloud_sync_provider(path: bytes, cloud: CloudSyncConfig) -> str | None:
    """The provider when `path` is a configured or default sync folder (no I/O)."""
    if any(path == os.fsencode(folder) for folder in cloud.folders):
        return "configured"
    if not cloud.detect:
        return None
    homes = os.fsencode(cloud.homes).rstrip(b"/") + b"/"
    if not path.startswith(homes):
        return None
    parts = path[len(homes) :].split(b"/", 1)
    if len(parts) != 2:
        return None
    inside = os.fsdecode(parts[1])
    for relative, provider in CLOUD_SYNC_FOLDERS:
        if inside == relative:
            return provider
    folder, _, name = inside.rpartition("/")
    if folder == _CLOUD_STORAGE and name:
        return next((p for prefix, p in _PROVIDER_PREFIXES if name.startswith(prefix)), name)
    return None


def classify_mount(
    mount: Mount,
    config: AgentConfig,
    sys_root: Path = SYS_ROOT,
    *,
    dev_root: Path = DEV_ROOT,
) -> DestinationConfig | None:
    """The destination a new mount is, or None when it is none by itself.

    In order: on the USB bus, or named by policy (`removable.devices` /
    `removable.mount_points`) -> removable; a configured destination folder ->
    its class; a cloud-sync location -> cloud_sync; a network filesystem ->
    network_share. Pseudo filesystems and `/` are never destinations. A mount
    inside a watched folder is the tracker's business (it inherits the folder's).
    """
    mp = mount.mount_point
    if mp == b"/" or mount.fs_type in PSEUDO_FS:
        return None
    block = _device_of(mount, sys_root, dev_root)
    path = Path(os.fsdecode(mp))
    device = _device_info(mount, block)
    if (
        (block is not None and block.usb)
        or _device_named(config.removable, mount, block)
        or _mount_point_named(config.removable, mp)
    ):
        return DestinationConfig(path, DestinationClass.REMOVABLE, device)
    configured = config.destination_for(path)
    if configured is not None:
        return replace(configured, device=_merge(configured.device, device))
    provider = cloud_sync_provider(mp, config.cloud_sync)
    if provider is not None:
        return DestinationConfig(
            path, DestinationClass.CLOUD_SYNC, replace(device, vendor=provider)
        )
    if is_network_fs(mount.fs_type):
        return DestinationConfig(path, DestinationClass.NETWORK_SHARE, device)
    return None


def _merge(configured: DeviceInfo | None, found: DeviceInfo) -> DeviceInfo:
    """What the administrator wrote wins; sysfs fills the blanks."""
    if configured is None:
        return found
    return DeviceInfo(
        vendor=configured.vendor or found.vendor,
        model=configured.model or found.model,
        serial=configured.serial or found.serial,
        fs_uuid=configured.fs_uuid or found.fs_uuid,
        fs_type=configured.fs_type or found.fs_type,
        mount_point=found.mount_point or configured.mount_point,
        remote=found.remote or configured.remote,
    )


# cloud-sync folders


def find_cloud_sync(cloud: CloudSyncConfig) -> list[DestinationConfig]:
    """Sync folders that exist now: configured ones, and the default locations in each home.

    "Detect and confirm" (FIELD-NOTES §4.4): a default location counts only when it
    is a directory; Dropbox's own `~/.dropbox/info.json` names the real folders
    when they were moved. Symlinks are resolved (the watch goes on the target).
    Everything found in a home is the user's to steer, and the agent runs as
    root: a detected folder must belong to the home's owner (a link or an
    info.json pointing at `/` or `/etc` is ignored), and info.json is read
    without following links or blocking on a FIFO.
    """
    found: dict[bytes, DestinationConfig] = {}

    def confirm(path: Path, provider: str, owner: int | None = None) -> None:
        try:
            real = Path(os.path.realpath(path, strict=True))
            st = real.stat()
        except OSError:  # missing, unreadable, or a symlink loop
            return
        if not stat.S_ISDIR(st.st_mode):
            return
        if owner is not None and st.st_uid != owner:
            logger.warning(
                "%s looks like a %s folder but does not belong to the home's owner: ignored",
                _display(os.fsencode(path)),
                provider,
            )
            return
        key = os.fsencode(real)
        if key not in found:
            device = DeviceInfo(vendor=provider, mount_point=key)
            found[key] = DestinationConfig(real, DestinationClass.CLOUD_SYNC, device)
            logger.info("cloud-sync folder (%s): %s", provider, _display(key))

    for folder in cloud.folders:
        if folder.is_dir():
            confirm(folder, "configured")
        else:
            logger.warning("cloud_sync.folders: %s does not exist (yet): not watched", folder)
    if cloud.detect:
        for home in _homes(cloud.homes):
            try:
                owner = home.stat().st_uid
            except OSError:
                continue
            for relative, provider in CLOUD_SYNC_FOLDERS:
                confirm(home / relative, provider, owner)
            for path in _dropbox_info(home):
                confirm(path, "Dropbox", owner)
            storage = home / _CLOUD_STORAGE
            for entry in _listdir(storage):
                provider = next(
                    (p for prefix, p in _PROVIDER_PREFIXES if entry.startswith(prefix)), entry
                )
                confirm(storage / entry, provider, owner)
    return list(found.values())


def _listdir(path: Path) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


def _homes(root: Path) -> list[Path]:
    return [root / name for name in _listdir(root) if (root / name).is_dir()]


def _dropbox_info(home: Path) -> list[Path]:
    """Paths in `~/.dropbox/info.json` ({"personal": {"path": ...}, "business": ...})."""
    try:
        fd = os.open(
            home / ".dropbox" / "info.json",
            os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
        )
    except OSError:
        return []
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return []
        info = json.loads(os.read(fd, _INFO_JSON_MAX))
    except (OSError, ValueError):
        return []
    finally:
        os.close(fd)
    if not isinstance(info, dict):
        return []
    return [
        Path(account["path"])
        for account in info.values()
        if isinstance(account, dict) and isinstance(account.get("path"), str)
    ]


# following mounts


class RootWatcher(Protocol):
    """What the tracker needs from `agent.watcher.Watcher`."""

    def add_root(self, path: Path | bytes, role: Role) -> bool: ...

    def remove_root(self, path: Path | bytes, role: Role | None = None) -> bool: ...


class RootMarker(Protocol):
    """What the tracker needs from `agent.attribution.Attributor`: fanotify marks on the
    roots it adds (a mount mark for a mount of its own), forgotten on unmount."""

    def mark_root(self, path: bytes, role: Role, *, own_filesystem: bool) -> bool: ...

    def unmounted(self, mount_point: bytes) -> None: ...


class DestinationTracker:
    """Keeps the watcher's roots and the `Destinations` registry in step with the world.

    `start()` watches the cloud-sync folders found now and (with `follow_mounts`)
    every mount that is a destination, then follows the mount table:

    - a mount that is a destination by itself (`classify_mount`), or lies inside a
      watched destination (it inherits that folder's class) or sensitive root, gets
      a watch on its root, and an entry in the registry;
    - an unmount drops both, quietly (an unmount is not a coverage gap);
    - a watched root at or below a mount point that was mounted or unmounted is
      watched again: its path now leads to other inodes.

    `marks` (optional, the attributor) gets the same roots for fanotify: a new
    mount is marked as a mount, a folder root (a sync folder, a root watched
    again) by directory; an unmount forgets the mount's marks.

    Call `start()` after the watcher started; `stop()` before stopping it.
    """

    def __init__(
        self,
        config: AgentConfig,
        destinations: Destinations,
        watcher: RootWatcher,
        *,
        mountinfo: Path = MOUNTINFO,
        sys_root: Path = SYS_ROOT,
        dev_root: Path = DEV_ROOT,
        marks: RootMarker | None = None,
    ) -> None:
        self._config = config
        self._destinations = destinations
        self._watcher = watcher
        self._marks = marks
        self._sys_root = sys_root
        self._dev_root = dev_root
        self._follower = (
            MountFollower(self.mounts_changed, path=mountinfo) if config.follow_mounts else None
        )
        self._lock = threading.Lock()
        self._static: dict[bytes, Role] = {
            os.fsencode(p): Role.SENSITIVE for p in config.sensitive_roots
        }
        self._static.update({os.fsencode(d.path): Role.DESTINATION for d in config.destinations})
        self._mounted: dict[bytes, tuple[int, Role]] = {}
        """Mount point -> (mount id, role) of the mounts we watch."""
        self._extra: dict[bytes, Role] = {}
        """Other roots we added (cloud-sync folders)."""
        self._initial = True

    def start(self) -> None:
        for dest in find_cloud_sync(self._config.cloud_sync):
            root = os.fsencode(dest.path)
            if self._destinations.get(root) is None:
                self._destinations.add(dest)
                if self._watcher.add_root(root, Role.DESTINATION):
                    self._extra[root] = Role.DESTINATION
                    self._mark(root, Role.DESTINATION, own_filesystem=self._is_whole(root))
        if self._follower is not None:
            self._follower.start()
        self._initial = False

    def stop(self) -> None:
        if self._follower is not None:
            self._follower.stop()

    def healthy(self) -> bool:
        return self._follower is None or self._follower.healthy()

    def watched_mounts(self) -> dict[bytes, Role]:
        """Mount points watched as roots of their own."""
        with self._lock:
            return {mp: role for mp, (_, role) in self._mounted.items()}

    def mounts_changed(self, added: list[Mount], removed: list[Mount]) -> None:
        """The follower's callback (its thread); also callable directly with `Mount` values."""
        with self._lock:
            # children before parents on the way out (a lazy unmount takes both),
            # parents before children on the way in (a child inherits its parent)
            for mount in sorted(removed, key=lambda m: -len(m.mount_point)):
                self._unmounted(mount)
            for mount in sorted(added, key=lambda m: len(m.mount_point)):
                self._new_mount(mount)

    def _all_roots(self) -> dict[bytes, Role]:
        roots = dict(self._static)
        roots.update(self._extra)
        roots.update({mp: role for mp, (_, role) in self._mounted.items()})
        return roots

    def _enclosing_role(self, mp: bytes) -> Role | None:
        above = [(r, role) for r, role in self._all_roots().items() if r != mp and _is_under(mp, r)]
        return max(above, key=lambda item: len(item[0]))[1] if above else None

    def _new_mount(self, mount: Mount) -> None:
        mp = mount.mount_point
        if mp == b"/" or mount.fs_type in PSEUDO_FS:
            return
        dest = classify_mount(mount, self._config, self._sys_root, dev_root=self._dev_root)
        role: Role | None = Role.DESTINATION if dest is not None else None
        if dest is None:
            role = self._enclosing_role(mp)
            if role is Role.DESTINATION:
                parent = self._destinations.enclosing(mp)
                if parent is None:
                    role = None
                else:
                    block = _device_of(mount, self._sys_root, self._dev_root)
                    dest = replace(
                        parent[1],
                        path=Path(os.fsdecode(mp)),
                        device=_merge(parent[1].device, _device_info(mount, block)),
                    )
        if role is not None:
            if dest is not None:
                self._destinations.add(dest)
                logger.info(
                    "mount %s (%s) is a %s destination",
                    _display(mp),
                    mount.fs_type,
                    dest.destination_class,
                )
            if self._watcher.add_root(mp, role):
                self._mounted[mp] = (mount.mount_id, role)
                self._mark(mp, role, own_filesystem=mount.root == b"/")
        if not self._initial:
            self._rewatch_below(mp, include_self=role is None)

    def _unmounted(self, mount: Mount) -> None:
        mp = mount.mount_point
        if mp == b"/" or mount.fs_type in PSEUDO_FS:
            return
        watched = self._mounted.get(mp)
        if watched is not None and watched[0] == mount.mount_id:
            del self._mounted[mp]
            self._destinations.remove(mp)
            if self._marks is not None:
                self._marks.unmounted(mp)
            static = self._static.get(mp) or self._extra.get(mp)
            if static is not None:
                self._watcher.add_root(mp, static)  # the folder is uncovered again
                self._mark(mp, static, own_filesystem=self._is_whole(mp))
            else:
                self._watcher.remove_root(mp, watched[1])
            logger.info("unmounted %s: watch dropped", _display(mp))
        self._rewatch_below(mp, include_self=watched is None)
        # A mount that was underneath (stacked on the same point) shows again.
        if self._follower is not None and mp not in self._mounted:
            below = [m for m in self._follower.mounts if m.mount_point == mp]
            if below:
                self._new_mount(below[-1])

    def _rewatch_below(self, mp: bytes, *, include_self: bool) -> None:
        """Watch again every root below `mp` (and `mp` itself if nobody did yet)."""
        for root, role in self._all_roots().items():
            if (include_self or root != mp) and _is_under(root, mp):
                logger.info("%s now leads elsewhere: watching it again", _display(root))
                self._watcher.add_root(root, role)
                self._mark(root, role, own_filesystem=self._is_whole(root))

    def _mark(self, root: bytes, role: Role, *, own_filesystem: bool) -> None:
        if self._marks is not None:
            self._marks.mark_root(root, role, own_filesystem=own_filesystem)

    def _is_whole(self, path: bytes) -> bool:
        """`path` is the mount point of a whole filesystem (its top mount shows `/`)."""
        if self._follower is None:
            return False  # not following mounts: folders, marked by directory
        # The follower's table is the new one during a change; the last entry for a
        # mount point is the one on top.
        on_top = [m for m in self._follower.mounts if m.mount_point == path]
        return bool(on_top) and on_top[-1].root == b"/"


def roots_for(destinations: Destinations, sensitive: Sequence[Path]) -> list[tuple[Path, Role]]:
    """The initial watch list: sensitive roots, then every registered destination."""
    roots = [(root, Role.SENSITIVE) for root in sensitive]
    roots += [(Path(os.fsdecode(root)), Role.DESTINATION) for root in destinations.roots()]
    return roots
