"""A copied sysfs and /dev layout of a USB stick, a loop device and dm-crypt over the stick.

Shared by test_sysfs.py and test_destinations.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# /sys/class/block/sdb1 of a SanDisk Cruzer Blade on an xHCI port, as the kernel
# lays it out (SCSI vendor and model are space-padded to 8 and 16 characters).
PCI = "devices/pci0000:00/0000:00:14.0"
USB_DEVICE = f"{PCI}/usb2/2-1"
SCSI_DEVICE = f"{USB_DEVICE}/2-1:1.0/host6/target6:0:0/6:0:0:0"
DISK = f"{SCSI_DEVICE}/block/sdb"
PARTITION = f"{DISK}/sdb1"
SERIAL = "4C530001230419117364"
VENDOR, MODEL = "SanDisk", "Cruzer Blade"
FAT_UUID = "2C1B-7F3A"
DM_UUID = "5f0c2a1e-4d83-4b7e-9a6f-3c9d8e2b1a70"


@dataclass
class Tree:
    sys: Path
    dev: Path


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def link(path: Path, target: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target)


def build_tree(base: Path) -> Tree:
    """Write the tree below `base` (`base/sys`, `base/dev`)."""
    sys, dev = base / "sys", base / "dev"
    usb = sys / USB_DEVICE
    write(usb / "idVendor", "0781\n")
    write(usb / "idProduct", "5567\n")
    write(usb / "serial", f"{SERIAL}\n")
    write(usb / "manufacturer", f"{VENDOR}\n")
    write(usb / "product", f"{MODEL}\n")
    write(usb / "2-1:1.0" / "bInterfaceClass", "08\n")  # mass storage interface, no idVendor
    write(sys / SCSI_DEVICE / "vendor", f"{VENDOR:<8}\n")
    write(sys / SCSI_DEVICE / "model", f"{MODEL:<16}\n")
    write(sys / DISK / "removable", "1\n")
    write(sys / DISK / "dev", "8:16\n")
    link(sys / DISK / "device", "../../../6:0:0:0")
    write(sys / PARTITION / "partition", "1\n")
    write(sys / PARTITION / "dev", "8:17\n")
    link(sys / "dev" / "block" / "8:16", f"../../{DISK}")
    link(sys / "dev" / "block" / "8:17", f"../../{PARTITION}")
    link(sys / "class" / "block" / "sdb1", f"../../{PARTITION}")
    # a loop device, and an encrypted mapping over the stick's partition
    write(sys / "devices/virtual/block/loop0/loop/backing_file", "/var/tmp/stick.img\n")
    write(sys / "devices/virtual/block/loop0/removable", "0\n")
    link(sys / "dev" / "block" / "7:0", "../../devices/virtual/block/loop0")
    link(sys / "devices/virtual/block/dm-0/slaves/sdb1", f"../../../../../{PARTITION}")
    link(sys / "dev" / "block" / "253:0", "../../devices/virtual/block/dm-0")
    # /dev with udev's by-uuid links
    dev.mkdir(parents=True)
    for name in ("sdb", "sdb1", "loop0", "dm-0"):
        (dev / name).write_bytes(b"")
    link(dev / "disk" / "by-uuid" / FAT_UUID, "../../sdb1")
    link(dev / "disk" / "by-uuid" / DM_UUID, "../../dm-0")
    return Tree(sys, dev)
