"""Disk images around NTFS volumes, checked with tools that are not ours.

A small NTFS volume (``make_ntfs_volume`` + ``ntfscp``) is put on a sparse GPT disk (ESP 100 MiB, MSR
16 MiB, data 64 MiB: 182 MiB virtual, a few MiB on disk), converted to every output format, and read
back. The checks use ``sgdisk`` (layout, names, types, GUIDs, ``-v``), ``sfdisk -d`` (MBR), ``fsck.fat``
(the ESP), ``qemu-img check``/``info``/``compare`` (the images) and ``ntfsls``/``ntfscat`` (the files on
the volume read back out of each image).
"""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from app import procs
from app.engine import disk
from app.engine.disk import DiskError, DiskFormat, ExtractedVolume
from app.engine.wim import make_ntfs_volume
from app.tasks.base import CancelToken, TaskCanceled
from tests.support.tools import tool

MiB = 1024 * 1024
DISK_SIZE = 182 * MiB  # ESP at 1 MiB (100 MiB), MSR (16 MiB), data 64 MiB, 1 MiB left for the backup GPT
DISK_GUID = uuid.UUID("11111111-2222-3333-4444-555555555555")
GUIDS: dict[disk.Role, uuid.UUID] = {
    "esp": uuid.UUID("aaaaaaaa-0000-4000-8000-000000000001"),
    "msr": uuid.UUID("aaaaaaaa-0000-4000-8000-000000000002"),
    "data": uuid.UUID("aaaaaaaa-0000-4000-8000-000000000003"),
}
PAYLOAD = random.Random(7).randbytes(3 * MiB // 2)
FORMATS: tuple[DiskFormat, ...] = ("vhd-dynamic", "vhd-fixed", "vhdx", "vmdk-stream", "vmdk-sparse", "qcow2", "raw")
QEMU_FORMAT = {"vhd-dynamic": "vpc", "vhd-fixed": "vpc", "vhdx": "vhdx", "vmdk-stream": "vmdk",
               "vmdk-sparse": "vmdk", "qcow2": "qcow2", "raw": "raw"}

# --- independent tools ------------------------------------------------------------------------------


def run(*argv: str | Path) -> procs.Outcome:
    return procs.run([tool(str(argv[0])), *map(str, argv[1:])], timeout_s=120)


def run_ok(*argv: str | Path) -> procs.Outcome:
    outcome = run(*argv)
    assert outcome.ok, f"{outcome.argv}: {outcome.returncode}\n{outcome.stdout}\n{outcome.stderr}"
    return outcome


def ntfs_cat(volume: Path, path: str) -> bytes:
    """procs.run decodes output as text, so this one tool runs through subprocess to get the bytes."""
    done = subprocess.run([tool("ntfscat"), str(volume), path], capture_output=True, check=False, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def qemu_info(image: Path, fmt: str | None = None) -> dict[str, object]:
    info = json.loads(run_ok("qemu-img", "info", "--output=json", *(["-f", fmt] if fmt else []), image).stdout)
    assert isinstance(info, dict)
    return info


def sparse_copy(source: Path, target: Path) -> Path:
    run_ok("cp", "--sparse=always", source, target)
    return target


def patch(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as file:
        file.seek(offset)
        file.write(data)


def assert_holds_payload(extracted: ExtractedVolume) -> None:
    assert "layer.bin" in run_ok("ntfsls", extracted.volume).stdout.split()
    assert ntfs_cat(extracted.volume, "layer.bin") == PAYLOAD


# --- fixtures -----------------------------------------------------------------------------------------


def make_volume(folder: Path, layout: disk.DiskLayout, *, start_sector: int | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    volume = make_ntfs_volume(folder / "volume.ntfs", layout.data_size, partition_start_sector=start_sector)
    (folder / "layer.bin").write_bytes(PAYLOAD)
    run_ok("ntfscp", volume, folder / "layer.bin", "layer.bin")
    return volume


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("disk")


@pytest.fixture(scope="module")
def volume(work: Path) -> Path:
    layout = disk.gpt_layout(DISK_SIZE)
    return make_volume(work / "vol", layout, start_sector=layout.data_start_lba)


@pytest.fixture(scope="module")
def gpt_disk(work: Path, volume: Path) -> Path:
    table = disk.build_gpt_disk(volume, work / "disk.raw", disk_size=DISK_SIZE, disk_guid=DISK_GUID,
                                partition_guids=GUIDS)
    assert table.disk_guid == DISK_GUID
    return work / "disk.raw"


@pytest.fixture(scope="module")
def converted(work: Path, gpt_disk: Path) -> dict[str, Path]:
    folder = work / "images"
    folder.mkdir()
    return {fmt: disk.convert(gpt_disk, folder / f"disk.{fmt}", fmt) for fmt in FORMATS}


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    """An empty folder of the test's own (tmp_path also holds the fake home folder)."""
    folder = tmp_path / "scratch"
    folder.mkdir()
    yield folder
    assert not list(folder.glob(".*")), "a temporary file was left behind"


# --- layout and GPT writing -----------------------------------------------------------------------------


def test_gpt_layout_is_aligned_and_leaves_room_for_the_backup_gpt() -> None:
    layout = disk.gpt_layout(DISK_SIZE)
    assert (layout.esp_start, layout.esp_size) == (MiB, 100 * MiB)
    assert (layout.msr_start, layout.msr_size) == (101 * MiB, 16 * MiB)
    assert (layout.data_start, layout.data_size) == (117 * MiB, 64 * MiB)
    assert layout.data_end + 33 * 512 <= DISK_SIZE
    with pytest.raises(DiskError, match="multiple of 1 MiB"):
        disk.gpt_layout(DISK_SIZE + 512)
    with pytest.raises(DiskError, match="no room"):
        disk.gpt_layout(120 * MiB)


def test_sgdisk_sees_our_partitions_names_types_and_guids(gpt_disk: Path) -> None:
    printed = run_ok("sgdisk", "-p", gpt_disk).stdout
    assert f"Disk identifier (GUID): {str(DISK_GUID).upper()}" in printed
    rows = [line.split() for line in printed.splitlines() if line.strip()[:1].isdigit()]
    assert [(r[0], r[1], r[2], r[5]) for r in rows] == [
        ("1", "2048", "206847", "EF00"), ("2", "206848", "239615", "0C01"), ("3", "239616", "370687", "0700"),
    ]
    expected: list[tuple[disk.Role, uuid.UUID, str]] = [
        ("esp", disk.ESP_TYPE, "EFI system partition"), ("msr", disk.MSR_TYPE, "Microsoft reserved partition"),
        ("data", disk.BASIC_DATA_TYPE, "Basic data partition"),
    ]
    for number, (role, type_guid, name) in enumerate(expected, start=1):
        info = run_ok("sgdisk", "-i", str(number), gpt_disk).stdout
        assert f"Partition GUID code: {str(type_guid).upper()}" in info
        assert f"Partition unique GUID: {str(GUIDS[role]).upper()}" in info
        assert f"Partition name: '{name}'" in info
    verified = run_ok("sgdisk", "-v", gpt_disk).stdout
    assert "No problems found" in verified


def test_the_esp_is_fat32_that_fsck_accepts(gpt_disk: Path, tmp_path: Path) -> None:
    esp = tmp_path / "esp.img"
    run_ok("dd", f"if={gpt_disk}", f"of={esp}", "bs=1M", "skip=1", "count=100", "conv=sparse", "status=none")
    run_ok("fsck.fat", "-n", esp)
    boot = esp.read_bytes()[:512]
    assert boot[0x52:0x5A] == b"FAT32   "
    assert int.from_bytes(boot[0x1C:0x20], "little") == 2048  # hidden sectors: the partition's start
    assert boot[0x43:0x47] == GUIDS["esp"].bytes[:4][::-1]  # volume serial from the partition GUID
    sectors, per_cluster = int.from_bytes(boot[0x20:0x24], "little"), boot[0x0D]
    assert sectors == 100 * MiB // 512 and sectors // per_cluster >= 65525  # enough clusters for FAT32


def test_the_esp_does_not_depend_on_the_disk_size(gpt_disk: Path, work: Path, scratch: Path) -> None:
    """mkfs.fat sizes clusters by the whole file unless told: a large disk must get the same ESP."""
    layout = disk.gpt_layout(4096 * MiB)
    big = make_ntfs_volume(work / "big.ntfs", layout.data_size, partition_start_sector=layout.data_start_lba)
    disk.build_gpt_pieces(big, scratch / "prefix.raw", scratch / "suffix.raw", disk_size=4096 * MiB,
                          partition_guids={"esp": GUIDS["esp"]})
    run_ok("cmp", "-n", str(100 * MiB), "-i", f"{MiB}:{MiB}", gpt_disk, scratch / "prefix.raw")
    assert (scratch / "suffix.raw").stat().st_size == 4096 * MiB - layout.data_end


def test_the_volume_is_spliced_at_the_data_partition(gpt_disk: Path, volume: Path) -> None:
    run_ok("cmp", "-n", str(64 * MiB), "-i", f"{117 * MiB}:0", gpt_disk, volume)
    assert os.stat(gpt_disk).st_blocks * 512 < 16 * MiB, "the raw disk is not sparse"


def test_our_reader_reads_the_table_back(gpt_disk: Path) -> None:
    with gpt_disk.open("rb") as file:  # any readable file object will do
        table = disk.read_partition_table(file)
    assert table.scheme == "gpt" and table.disk_guid == DISK_GUID and not table.from_backup_gpt
    assert [(p.index, p.kind, p.start, p.size) for p in table.partitions] == [
        (1, "esp", MiB, 100 * MiB), (2, "msr", 101 * MiB, 16 * MiB), (3, "ntfs", 117 * MiB, 64 * MiB),
    ]
    assert table.ntfs_data_partition().index == 3
    assert [p.kind for p in table.boot_partitions()] == ["esp", "msr"]
    assert table.partition_guids() == GUIDS
    assert (table.first_usable_lba, table.last_usable_lba) == (34, DISK_SIZE // 512 - 34)


def test_guids_are_made_up_when_not_given(volume: Path, scratch: Path) -> None:
    first = disk.build_gpt_disk(volume, scratch / "a.raw", disk_size=DISK_SIZE)
    second = disk.build_gpt_disk(volume, scratch / "b.raw", disk_size=DISK_SIZE, partition_guids={"msr": GUIDS["msr"]})
    assert first.disk_guid != second.disk_guid
    read = disk.read_partition_table(scratch / "b.raw")
    assert read.partition_guids()["msr"] == GUIDS["msr"]
    assert read.partition_guids()["data"] != GUIDS["data"]
    assert read.disk_guid == second.disk_guid


def test_pieces_convert_to_the_same_disk_as_the_full_raw_disk(gpt_disk: Path, volume: Path, scratch: Path) -> None:
    disk.build_gpt_pieces(volume, scratch / "prefix.raw", scratch / "suffix.raw", disk_size=DISK_SIZE,
                          disk_guid=DISK_GUID, partition_guids=GUIDS)
    assert (scratch / "prefix.raw").stat().st_size == 117 * MiB
    assert (scratch / "suffix.raw").stat().st_size == DISK_SIZE - 181 * MiB
    image = disk.convert([scratch / "prefix.raw", volume, scratch / "suffix.raw"], scratch / "pieces.vhdx", "vhdx")
    compared = run("qemu-img", "compare", "-f", "raw", "-F", "vhdx", gpt_disk, image)
    assert compared.returncode == 0, compared.stdout + compared.stderr
    assert "Images are identical" in compared.stdout


def test_hidden_sectors_are_corrected_in_the_copy(work: Path, scratch: Path) -> None:
    layout = disk.gpt_layout(DISK_SIZE)
    elsewhere = make_volume(work / "elsewhere", layout, start_sector=63)  # e.g. taken from an old MBR disk
    before = elsewhere.read_bytes()
    disk.build_gpt_disk(elsewhere, scratch / "disk.raw", disk_size=DISK_SIZE)
    assert elsewhere.read_bytes() == before, "the source volume was changed"
    extracted = disk.extract_ntfs_volume(scratch / "disk.raw", scratch / "back.ntfs")
    data = extracted.volume.read_bytes()
    assert int.from_bytes(data[0x1C:0x20], "little") == layout.data_start_lba
    backup = data[-512:]
    assert backup[3:11] == b"NTFS    " and int.from_bytes(backup[0x1C:0x20], "little") == layout.data_start_lba
    assert_holds_payload(extracted)
    with pytest.raises(DiskError, match="partition_start_sector=239616"):
        disk.build_gpt_pieces(elsewhere, scratch / "p.raw", scratch / "s.raw", disk_size=DISK_SIZE)
    assert not (scratch / "p.raw").exists() and not (scratch / "s.raw").exists()


def test_a_volume_of_the_wrong_size_is_refused(volume: Path, scratch: Path) -> None:
    with pytest.raises(DiskError, match=r"holds 67108864 bytes.*make_ntfs_volume\(path, 68157440"):
        disk.build_gpt_disk(volume, scratch / "disk.raw", disk_size=DISK_SIZE + MiB)
    (scratch / "plain.bin").write_bytes(bytes(64 * MiB))
    with pytest.raises(DiskError, match="not an NTFS volume image"):
        disk.build_gpt_disk(scratch / "plain.bin", scratch / "disk.raw", disk_size=DISK_SIZE)
    assert not (scratch / "disk.raw").exists()


# --- MBR ----------------------------------------------------------------------------------------------


def test_mbr_disk_has_one_active_ntfs_partition_and_keeps_its_signature(work: Path, scratch: Path) -> None:
    layout = disk.mbr_layout(66 * MiB)
    volume = make_volume(work / "mbr", layout, start_sector=layout.data_start_lba)
    boot_code = bytes(range(200))
    disk.build_mbr_disk(volume, scratch / "mbr.raw", disk_size=66 * MiB, disk_signature=0x1234ABCD,
                        boot_code=boot_code)
    dumped = run_ok("sfdisk", "-d", scratch / "mbr.raw").stdout
    assert "label: dos" in dumped and "label-id: 0x1234abcd" in dumped
    rows = [line for line in dumped.splitlines() if "start=" in line]
    assert len(rows) == 1
    assert "start=        2048" in rows[0] and f"size={65 * 2048:>12}" in rows[0]
    assert "type=7" in rows[0] and "bootable" in rows[0]
    listed = run_ok("fdisk", "-l", scratch / "mbr.raw").stdout
    assert "Disk identifier: 0x1234abcd" in listed
    table = disk.read_partition_table(scratch / "mbr.raw")
    assert (table.scheme, table.mbr_signature, table.boot_code[:200]) == ("mbr", 0x1234ABCD, boot_code)
    data = table.ntfs_data_partition()
    assert (data.index, data.start, data.size, data.active, data.mbr_type) == (1, MiB, 65 * MiB, True, 7)
    assert table.boot_partitions() == ()  # the active partition is the Windows volume itself
    extracted = disk.extract_ntfs_volume(disk.convert(scratch / "mbr.raw", scratch / "mbr.vhdx", "vhdx"),
                                         scratch / "back.ntfs")
    assert extracted.table.mbr_signature == 0x1234ABCD
    assert_holds_payload(extracted)


def test_mbr_logical_partitions_and_a_system_reserved_partition(work: Path, scratch: Path) -> None:
    image = scratch / "ext.raw"
    with image.open("wb") as file:
        file.truncate(96 * MiB)
    script = ("label: dos\nlabel-id: 0x0badcafe\nstart=2048, size=20M, type=7, bootable\nstart=43008, type=5\n"
              "start=45056, size=64M, type=7\n")
    outcome = procs.run([tool("sfdisk"), "-q", str(image)], stdin=script, timeout_s=60)
    assert outcome.ok, outcome.stderr
    for start, size, name in ((MiB, 20 * MiB, "reserved"), (22 * MiB, 64 * MiB, "windows")):
        layout = disk.DiskLayout(96 * MiB, 0, 0, 0, 0, start, size)
        volume = make_volume(work / f"logical-{name}", layout, start_sector=start // 512)
        run_ok("dd", f"if={volume}", f"of={image}", "bs=1M", f"seek={start // MiB}", "conv=notrunc,sparse",
               "status=none")
    table = disk.read_partition_table(image)
    assert [(p.index, p.kind, p.start, p.active) for p in table.partitions] == [
        (1, "ntfs", MiB, True), (2, "extended", 21 * MiB, False), (5, "ntfs", 22 * MiB, False),
    ]
    assert table.ntfs_data_partition().index == 5  # the largest NTFS partition
    assert [p.index for p in table.boot_partitions()] == [1]  # "System Reserved"
    assert_holds_payload(disk.extract_ntfs_volume(image, scratch / "back.ntfs"))


# --- formats --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_passes_checks_and_reads_back(fmt: DiskFormat, converted: dict[str, Path], tmp_path: Path) -> None:
    image = converted[fmt]
    qemu_format = QEMU_FORMAT[fmt]
    if qemu_format in {"qcow2", "vhdx", "vmdk"}:
        run_ok("qemu-img", "check", "-f", qemu_format, image)
    else:  # qemu-img has no check for VHD and raw: it says so
        assert run("qemu-img", "check", "-f", qemu_format, image).returncode == 63
    assert qemu_info(image, qemu_format)["virtual-size"] == DISK_SIZE  # exactly: force_size=on for VHD
    extracted = disk.extract_ntfs_volume(image, tmp_path / "volume.ntfs")
    assert extracted.image.format == qemu_format and extracted.image.virtual_size == DISK_SIZE
    assert extracted.partition.index == 3 and extracted.volume.stat().st_size == 64 * MiB
    assert extracted.table.disk_guid == DISK_GUID and extracted.table.partition_guids() == GUIDS
    assert os.stat(extracted.volume).st_blocks * 512 < 16 * MiB, "the extracted volume is not sparse"
    assert_holds_payload(extracted)
    assert not list(tmp_path.glob(".*")), "scratch files were left behind"


def test_a_fixed_vhd_is_recognised_as_vhd(converted: dict[str, Path]) -> None:
    image = converted["vhd-fixed"]
    assert qemu_info(image)["format"] == "raw"  # the pitfall: qemu-img probes a fixed VHD as raw
    with image.open("rb") as file:
        file.seek(-512, os.SEEK_END)
        assert file.read(8) == b"conectix"
    info = disk.image_info(image)
    assert (info.format, info.fixed_vhd, info.virtual_size) == ("vpc", True, DISK_SIZE)
    assert disk.image_info(converted["vhd-dynamic"]).fixed_vhd is False


def test_convert_reports_progress_from_carriage_return_lines(gpt_disk: Path, scratch: Path) -> None:
    seen: list[tuple[int, int]] = []
    disk.convert(gpt_disk, scratch / "disk.qcow2", "qcow2", progress=lambda done, total: seen.append((done, total)))
    assert len(seen) >= 3
    assert {total for _, total in seen} == {DISK_SIZE}
    done = [d for d, _ in seen]
    assert done == sorted(done) and done[-1] == DISK_SIZE and done[0] < DISK_SIZE


def test_a_cancel_during_convert_leaves_no_output(gpt_disk: Path, scratch: Path) -> None:
    token = CancelToken()
    calls: list[int] = []

    def cancel_on_first(done: int, total: int) -> None:
        calls.append(done)
        token.cancel()

    out = scratch / "disk.vmdk"
    with pytest.raises(TaskCanceled):
        disk.convert(gpt_disk, out, "vmdk-stream", progress=cancel_on_first, cancel=token)
    assert calls and not out.exists()
    assert list(scratch.iterdir()) == []
    with pytest.raises(TaskCanceled):  # cancelled before it starts
        disk.convert(gpt_disk, out, "qcow2", cancel=token)
    assert list(scratch.iterdir()) == []


def test_convert_refuses_to_overwrite_its_input(gpt_disk: Path) -> None:
    with pytest.raises(DiskError, match="one of the raw disks"):
        disk.convert(gpt_disk, gpt_disk, "raw")


def test_verify_image_fails_clearly(converted: dict[str, Path], scratch: Path) -> None:
    with pytest.raises(DiskError, match="not 1048576"):
        disk.verify_image(converted["vhd-dynamic"], "vhd-dynamic", MiB)
    damaged = sparse_copy(converted["qcow2"], scratch / "damaged.qcow2")
    os.truncate(damaged, damaged.stat().st_size // 2)
    with pytest.raises(DiskError, match="did not pass qemu-img check"):
        disk.verify_image(damaged, "qcow2", DISK_SIZE)


# --- bad input ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["vhdx", "vmdk-sparse", "vmdk-stream", "qcow2", "vhd-dynamic", "vhd-fixed"])
def test_truncated_images_are_refused(fmt: DiskFormat, converted: dict[str, Path], scratch: Path) -> None:
    cut = sparse_copy(converted[fmt], scratch / f"cut.{fmt}")
    os.truncate(cut, cut.stat().st_size // 2)
    with pytest.raises(DiskError, match="truncated"):
        disk.extract_ntfs_volume(cut, scratch / "volume.ntfs")
    assert not (scratch / "volume.ntfs").exists()


def test_a_truncated_raw_disk_is_refused(gpt_disk: Path, scratch: Path) -> None:
    cut = sparse_copy(gpt_disk, scratch / "cut.raw")
    os.truncate(cut, 150 * MiB)
    with pytest.raises(DiskError, match="truncated: its GPT describes a disk of 190840832 bytes"):
        disk.read_partition_table(cut)
    os.truncate(cut, 2 * MiB)  # the primary GPT alone
    with pytest.raises(DiskError, match="truncated"):
        disk.extract_ntfs_volume(cut, scratch / "volume.ntfs")


def test_random_bytes_are_no_disk(scratch: Path) -> None:
    noise = bytearray(random.Random(3).randbytes(MiB))
    noise[510:512] = b"\0\0"
    (scratch / "noise.img").write_bytes(noise)
    with pytest.raises(DiskError, match="no partition table"):
        disk.extract_ntfs_volume(scratch / "noise.img", scratch / "volume.ntfs")
    with pytest.raises(DiskError, match="no partition table"):
        disk.read_partition_table(scratch / "noise.img")


def test_a_volume_is_no_disk(volume: Path) -> None:
    with pytest.raises(DiskError, match="NTFS volume image, not a partitioned disk"):
        disk.read_partition_table(volume)


def test_a_disk_with_only_a_fat_partition_has_no_ntfs_partition(scratch: Path) -> None:
    image = scratch / "fat.raw"
    with image.open("wb") as file:
        file.truncate(48 * MiB)
    run_ok("sgdisk", "-o", "-n", "1:2048:+40M", "-t", "1:0700", "-c", "1:DATA", image)
    run_ok("mkfs.fat", "-F", "32", "--offset=2048", image, str(40 * 1024))
    with pytest.raises(DiskError, match=r"no NTFS data partition \(partitions: partition 1 'DATA'"):
        disk.extract_ntfs_volume(image, scratch / "volume.ntfs")
    assert not (scratch / "volume.ntfs").exists()


@pytest.mark.parametrize("damage", ["header", "entries"])
def test_a_damaged_primary_gpt_is_replaced_by_the_backup(
    damage: str, gpt_disk: Path, scratch: Path, caplog: pytest.LogCaptureFixture
) -> None:
    damaged = sparse_copy(gpt_disk, scratch / "damaged.raw")
    patch(damaged, 512 + 0x40 if damage == "header" else 1024 + 0x38, b"\xff")  # disk GUID / a name
    checked = run("sgdisk", "-v", damaged)
    assert "corrupt GPT" in checked.stdout  # sgdisk sees the damage too
    with caplog.at_level(logging.WARNING, logger="app.engine.disk"):
        table = disk.read_partition_table(damaged)
    assert table.from_backup_gpt
    assert table.disk_guid == DISK_GUID and table.partition_guids() == GUIDS
    reason = "header CRC32 mismatch" if damage == "header" else "partition entries CRC32 mismatch"
    assert f"the primary GPT header is damaged ({reason}); using the backup GPT header at LBA 372735" in caplog.text
    assert_holds_payload(disk.extract_ntfs_volume(damaged, scratch / "volume.ntfs"))


def test_both_damaged_gpt_headers_are_a_clear_error(gpt_disk: Path, scratch: Path) -> None:
    damaged = sparse_copy(gpt_disk, scratch / "damaged.raw")
    patch(damaged, 512 + 0x40, b"\xff")
    patch(damaged, DISK_SIZE - 512 + 0x40, b"\xff")
    with pytest.raises(DiskError, match=r"both GPT headers are damaged \(primary at LBA 1: header CRC32 mismatch"):
        disk.read_partition_table(damaged)
    with pytest.raises(DiskError, match="both GPT headers are damaged"):
        disk.extract_ntfs_volume(damaged, scratch / "volume.ntfs")


def test_missing_files_are_clear_errors(scratch: Path) -> None:
    with pytest.raises(DiskError, match="does not exist"):
        disk.extract_ntfs_volume(scratch / "nothing.vhdx", scratch / "volume.ntfs")
    with pytest.raises(DiskError, match="does not exist"):
        disk.read_partition_table(scratch / "nothing.raw")
    with pytest.raises(DiskError, match="does not exist"):
        disk.convert(scratch / "nothing.raw", scratch / "out.vhdx", "vhdx")
