"""agent.sysfs: a copied USB stick tree, a loop device, dm-crypt over USB, superblocks."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import uuid
from pathlib import Path

import pytest

from agent.sysfs import block_info, fs_uuid, read_superblock_uuid, superblock_uuid
from tests.agent.sysfs_tree import (
    DISK,
    DM_UUID,
    FAT_UUID,
    MODEL,
    PARTITION,
    SERIAL,
    VENDOR,
    Tree,
    build_tree,
)


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    # "usb" in the folder holding the fake tree must not make every device a USB one
    return build_tree(tmp_path / "usb")


def test_the_tree_is_laid_out_as_sysfs_has_it(tree) -> None:
    assert (tree.sys / "class/block/sdb1").resolve() == (tree.sys / PARTITION).resolve()
    assert (tree.sys / DISK / "device").resolve().name == "6:0:0:0"
    assert (tree.sys / DISK / "device" / "vendor").read_text() == "SanDisk \n"


def test_a_usb_stick_partition_has_vendor_model_serial_and_uuid(tree) -> None:
    info = block_info(8, 17, sys_root=tree.sys, dev_root=tree.dev)
    assert info is not None
    assert info.usb
    assert (info.name, info.disk) == ("sdb1", "sdb")
    assert info.sysfs_path == PARTITION
    assert info.removable
    assert (info.vendor, info.model) == (VENDOR, MODEL)  # padding stripped
    assert info.serial == SERIAL
    assert (info.usb_vendor_id, info.usb_product_id) == ("0781", "5567")
    assert (info.manufacturer, info.product) == (VENDOR, MODEL)
    assert info.fs_uuid == FAT_UUID


def test_the_whole_disk_is_on_usb_too(tree) -> None:
    info = block_info(8, 16, sys_root=tree.sys, dev_root=tree.dev)
    assert info is not None
    assert (info.name, info.disk, info.usb, info.serial) == ("sdb", "sdb", True, SERIAL)
    assert info.fs_uuid == ""  # the partition carries the filesystem


def test_a_usb_disk_that_says_it_is_not_removable_is_still_usb(tree) -> None:
    (tree.sys / DISK / "removable").write_text("0\n")  # most USB SSDs and HDDs
    info = block_info(8, 17, sys_root=tree.sys, dev_root=tree.dev)
    assert info is not None
    assert info.usb
    assert not info.removable


def test_a_loop_device_is_not_on_usb(tree) -> None:
    info = block_info(7, 0, sys_root=tree.sys, dev_root=tree.dev)
    assert info is not None
    assert not info.usb
    assert (info.name, info.serial, info.vendor) == ("loop0", "", "")
    assert info.backing_file == "/var/tmp/stick.img"


def test_an_encrypted_mapping_takes_the_identity_of_the_stick_below(tree) -> None:
    info = block_info(253, 0, sys_root=tree.sys, dev_root=tree.dev)
    assert info is not None
    assert info.usb
    assert info.name == "dm-0"
    assert info.serial == SERIAL
    assert info.fs_uuid == DM_UUID  # the mapping's own


def test_unknown_devices_are_none(tree) -> None:
    assert block_info(8, 99, sys_root=tree.sys, dev_root=tree.dev) is None
    assert block_info(0, 42, sys_root=tree.sys, dev_root=tree.dev) is None


def test_this_machine_answers_without_error() -> None:
    st = os.stat("/")
    info = block_info(os.major(st.st_dev), os.minor(st.st_dev))
    if info is not None:  # a container's root may have no sysfs entry
        assert info.name


# filesystem UUIDs from superblocks


def test_ext4_uuid_from_a_real_image(tmp_path) -> None:
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("mkfs.ext4 is not installed")
    image = tmp_path / "ext4.img"
    image.write_bytes(b"")
    os.truncate(image, 4 * 1024 * 1024)
    wanted = str(uuid.uuid4())
    subprocess.run(["mkfs.ext4", "-q", "-F", "-U", wanted, image], check=True)
    assert read_superblock_uuid(image) == wanted
    # without by-uuid links, fs_uuid falls back to the superblock of /dev/NAME
    (tmp_path / "dev").mkdir()
    shutil.copy(image, tmp_path / "dev" / "loop9")
    assert fs_uuid("loop9", dev_root=tmp_path / "dev") == wanted


def boot_sector(oem: bytes) -> bytearray:
    sector = bytearray(512)
    sector[0:3] = b"\xeb\x3c\x90"
    sector[3:11] = oem
    sector[510:512] = b"\x55\xaa"
    return sector


def test_fat32_volume_id() -> None:
    sector = boot_sector(b"mkfs.fat")
    sector[0x42] = 0x29  # extended boot signature
    struct.pack_into("<I", sector, 0x43, 0x2C1B7F3A)
    sector[0x52:0x5A] = b"FAT32   "
    assert superblock_uuid(bytes(sector)) == "2C1B-7F3A"


def test_fat16_volume_id() -> None:
    sector = boot_sector(b"mkfs.fat")
    sector[0x26] = 0x29
    struct.pack_into("<I", sector, 0x27, 0x0000BEEF)
    sector[0x36:0x3E] = b"FAT16   "
    assert superblock_uuid(bytes(sector)) == "0000-BEEF"


def test_exfat_serial() -> None:
    sector = boot_sector(b"EXFAT   ")
    struct.pack_into("<I", sector, 0x64, 0x6A1E0C42)
    assert superblock_uuid(bytes(sector)) == "6A1E-0C42"


def test_ntfs_serial() -> None:
    sector = boot_sector(b"NTFS    ")
    struct.pack_into("<Q", sector, 0x48, 0x01D9F3A2B4C5D6E7)
    assert superblock_uuid(bytes(sector)) == "01D9F3A2B4C5D6E7"


def test_unknown_or_short_data_has_no_uuid(tmp_path) -> None:
    assert superblock_uuid(b"") == ""
    assert superblock_uuid(bytes(4096)) == ""
    assert superblock_uuid(bytes(boot_sector(b"WHATEVER"))) == ""
    assert read_superblock_uuid(tmp_path / "absent") == ""
