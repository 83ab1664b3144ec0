"""Who is behind a block device: sysfs (bus, vendor, model, USB serial) and the filesystem UUID.

Used by `agent.destinations` to recognise removable media by device, not by path
(FIELD-NOTES §4.2): a device whose sysfs path runs through a USB controller is on
the USB bus, whatever its `removable` flag says (0 for most USB disks). The roots
are parameters, so tests present the copied tree of a real stick.
"""

from __future__ import annotations

import logging
import os
import struct
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

logger = logging.getLogger(__name__)

SYS_ROOT = Path("/sys")
DEV_ROOT = Path("/dev")

_ATTR_MAX = 4096
_SUPERBLOCK_READ = 4096
"""Enough for every superblock we read (ext's UUID ends at byte 1144)."""
_MAX_STACK = 4
"""Levels of dm/md stacking followed down to the physical device."""


@dataclass(frozen=True)
class BlockInfo:
    name: str
    """Kernel name of the device itself: `sdb1`, `loop0`, `nvme0n1p2`."""
    disk: str
    """The whole disk: `sdb` for `sdb1`; the device itself when not a partition."""
    sysfs_path: str
    """Resolved device directory, relative to the sysfs root (`devices/pci.../block/sdb/sdb1`)."""
    usb: bool
    """On the USB bus: the criterion for removable media."""
    removable: bool = False
    """The disk's `removable` flag (advisory only: 0 for most USB disks)."""
    vendor: str = ""
    model: str = ""
    serial: str = ""
    """From the USB device ancestor."""
    usb_vendor_id: str = ""
    usb_product_id: str = ""
    manufacturer: str = ""
    product: str = ""
    fs_uuid: str = ""
    """As blkid shows it: ext `1b4e28ba-...`, FAT/exFAT `ABCD-1234`, NTFS 16 hex digits."""
    backing_file: str = ""
    """For a loop device, the image file behind it."""


def _attr(path: Path) -> str:
    """A sysfs attribute, stripped; "" when absent or unreadable."""
    try:
        with path.open("rb") as f:
            return f.read(_ATTR_MAX).decode("utf-8", "replace").strip()
    except OSError:
        return ""


def _usb_device(start: Path, stop: Path) -> Path | None:
    """The nearest ancestor of `start` (below `stop`) that is a USB device (has idVendor).

    USB interfaces (`2-1:1.0`) have no idVendor; the device above them (`2-1`) does.
    """
    for directory in (start, *start.parents):
        if directory == stop or stop not in directory.parents:
            return None
        if (directory / "idVendor").is_file():
            return directory
    return None


def block_info(
    major: int, minor: int, *, sys_root: Path = SYS_ROOT, dev_root: Path = DEV_ROOT
) -> BlockInfo | None:
    """What sysfs says about block device MAJOR:MINOR; None when it is not a block device.

    A device-mapper or md device (an encrypted stick: `dm-0` over `sdb1`) takes its
    bus and identity from the device below it (`slaves/`), its UUID from itself.
    """
    link = sys_root / "dev" / "block" / f"{major}:{minor}"
    if not link.exists():
        return None
    root = sys_root.resolve()
    device = link.resolve()
    if root not in device.parents:
        return None
    info = _describe(device, root)
    return replace(info, fs_uuid=fs_uuid(device.name, dev_root=dev_root))


def _describe(device: Path, root: Path, depth: int = 0) -> BlockInfo:
    disk = device.parent if (device / "partition").is_file() else device
    relative = device.relative_to(root).as_posix()
    # Only the part below the sysfs root counts: the root itself may be any folder.
    usb = "/usb" in f"/{relative}"
    info = BlockInfo(
        name=device.name,
        disk=disk.name,
        sysfs_path=relative,
        usb=usb,
        removable=_attr(disk / "removable") == "1",
        vendor=_attr(disk / "device" / "vendor"),
        model=_attr(disk / "device" / "model"),
        backing_file=_attr(disk / "loop" / "backing_file"),
    )
    if not usb:
        below = _slave(device) if depth < _MAX_STACK else None
        if below is None or root not in below.parents or not below.is_dir():
            return info
        lower = _describe(below, root, depth + 1)
        return replace(lower, name=info.name, disk=info.disk, sysfs_path=info.sysfs_path)
    usb_dev = _usb_device(disk, root)
    if usb_dev is None:
        return info
    return replace(
        info,
        serial=_attr(usb_dev / "serial"),
        usb_vendor_id=_attr(usb_dev / "idVendor"),
        usb_product_id=_attr(usb_dev / "idProduct"),
        manufacturer=_attr(usb_dev / "manufacturer"),
        product=_attr(usb_dev / "product"),
        # the SCSI vendor/model of some USB bridges are blank
        vendor=info.vendor or _attr(usb_dev / "manufacturer"),
        model=info.model or _attr(usb_dev / "product"),
    )


def _slave(device: Path) -> Path | None:
    """The first device below a stacked one (dm, md), resolved; None if there is none."""
    try:
        names = sorted(os.listdir(device / "slaves"))
    except OSError:
        return None
    return (device / "slaves" / names[0]).resolve() if names else None


def fs_uuid(name: str, *, dev_root: Path = DEV_ROOT) -> str:
    """The filesystem UUID of /dev/NAME: udev's by-uuid links when present, else the superblock."""
    by_uuid = dev_root / "disk" / "by-uuid"
    target = (dev_root / name).resolve()
    try:
        links = list(os.scandir(by_uuid))
    except OSError:
        links = []
    for link in links:
        if (by_uuid / link.name).resolve() == target:
            return link.name
    return read_superblock_uuid(dev_root / name)


def read_superblock_uuid(device: Path) -> str:
    """Filesystem UUID read from the first 4 KiB of `device` (ext2/3/4, FAT, exFAT, NTFS).

    "" when the device cannot be read or holds none of these.
    """
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        logger.debug("cannot open %s for its superblock: %s", device, e.strerror)
        return ""
    try:
        data = os.pread(fd, _SUPERBLOCK_READ, 0)
    except OSError as e:
        logger.debug("cannot read the superblock of %s: %s", device, e.strerror)
        return ""
    finally:
        os.close(fd)
    return superblock_uuid(data)


def superblock_uuid(data: bytes) -> str:
    """The UUID in a filesystem's first bytes, formatted as blkid formats it; "" if unknown."""
    if len(data) >= 1024 + 0x78 and data[1024 + 0x38 : 1024 + 0x3A] == b"\x53\xef":  # ext2/3/4
        return str(uuid.UUID(bytes=data[1024 + 0x68 : 1024 + 0x78]))
    if len(data) < 512 or data[510:512] != b"\x55\xaa":
        return ""
    if data[3:11] == b"EXFAT   ":
        return _fat_style(data, 0x64)
    if data[3:11] == b"NTFS    ":
        (serial,) = struct.unpack_from("<Q", data, 0x48)
        return f"{serial:016X}"
    if data[0x52:0x5A] == b"FAT32   " and data[0x42] in (0x28, 0x29):
        return _fat_style(data, 0x43)
    if data[0x36:0x39] == b"FAT" and data[0x26] in (0x28, 0x29):
        return _fat_style(data, 0x27)
    return ""


def _fat_style(data: bytes, offset: int) -> str:
    (serial,) = struct.unpack_from("<I", data, offset)
    return f"{serial >> 16:04X}-{serial & 0xFFFF:04X}"
