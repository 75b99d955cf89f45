"""An OS layer imported from a gold disk keeps what the published disk needs to boot: the partition
layout and identities, the other partitions byte for byte (the ESP with its BCD store, recovery, System
Reserved), the MBR boot code and the Windows volume's NTFS boot code; and rewritten hives keep their ACLs.

The gold disks are built with sgdisk/sfdisk, mkfs.fat + mtools, mkntfs + ntfscp and libntfs-3g's security
API, and the published disks are read back with sgdisk, sfdisk, qemu-img, dd-style offsets, fsck.fat,
mdir, ntfsls/ntfscat, ntfssecaudit, hivexget: none of them is LayerDesk's code.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import subprocess
from pathlib import Path

import pytest

from app import procs
from app.catalog.models import LayerType, TaskState
from app.engine.compose import StackLayer, compose
from app.engine.disk import DiskError
from app.engine.gold import GoldLayout
from app.engine.registry.regf import write_hive
from app.engine.registry.regfile import parse_reg_file
from app.engine.repository import CaptureSource, LayerRepository, RepositoryDamaged, SourceKind, manifest_checksum
from app.engine.wim import Wim, make_ntfs_volume
from app.services import Services
from app.tasks.runner import TaskRunner
from tests.support import ntfs_security as sec
from tests.support.compose_stack import software_hive, system_hive
from tests.support.repository_checks import listing, make_tree, outcome_snapshot
from tests.support.tools import run_ok, tool

MiB = 1024 * 1024
SECTOR = 512
HIVES = Path(__file__).parents[2].parent / "shared" / "testdata" / "hives"

DISK_GUID = "0DDBA11F-0000-4000-8000-00000000D15C"
ESP_GUID = "0DDBA11F-0000-4000-8000-0000000000E5"
WINDOWS_GUID = "0DDBA11F-0000-4000-8000-0000000000DA"
RECOVERY_GUID = "0DDBA11F-0000-4000-8000-0000000000EC"
MBR_SIGNATURE = 0x1234ABCD
BOOT_CODE = bytes((i * 7 + 3) % 256 for i in range(440))
#: What the gold Windows volume's boot code says (the NTFS bootstrap area of sector 0 and sectors 1–15).
NTFS_BOOT_MARK = b"WINDOWS NTFS BOOT CODE "
HIVE_ACL = [(sec.SYSTEM, sec.FULL_CONTROL), (sec.ADMINISTRATORS, sec.FULL_CONTROL)]


def _write_at(image: Path, offset: int, data: bytes) -> None:
    with image.open("r+b") as file:
        file.seek(offset)
        file.write(data)


def _read_at(image: Path, offset: int, size: int) -> bytes:
    with image.open("rb") as file:
        file.seek(offset)
        return file.read(size)


def _splice(image: Path, offset: int, piece: Path) -> None:
    with piece.open("rb") as source, image.open("r+b") as target:
        target.seek(offset)
        while chunk := source.read(4 * MiB):
            target.write(chunk)


def _windows_volume(tmp: Path, size: int, start_lba: int) -> Path:
    """A Windows volume: SYSTEM and SOFTWARE hives with a SYSTEM/Administrators ACL, a kernel, and boot code
    marked with :data:`NTFS_BOOT_MARK`."""
    files = tmp / "windows-files"
    config = make_tree(files, {"Windows/System32/ntoskrnl.exe": b"MZ kernel"}) / "Windows/System32/config"
    config.mkdir()
    write_hive(system_hive(), config / "SYSTEM")
    write_hive(software_hive(), config / "SOFTWARE")
    volume = make_ntfs_volume(tmp / "windows.ntfs", size, partition_start_sector=start_lba)
    with Wim.create("none") as wim:
        wim.extract_image_to_ntfs_volume(wim.add_image_from_folder(files, "gold"), volume)
    acl = sec.security_descriptor(sec.SYSTEM, sec.SYSTEM, HIVE_ACL)
    for hive in ("SYSTEM", "SOFTWARE"):
        sec.set_security(volume, f"/Windows/System32/config/{hive}", acl)
    code = (NTFS_BOOT_MARK * 400)[: 15 * SECTOR]
    _write_at(volume, 0x54, code[: 0x1FE - 0x54])
    _write_at(volume, SECTOR, code)
    return volume


def _gpt_gold(tmp: Path) -> Path:
    """300 MiB GPT: ESP (FAT32 with a real BCD store and a boot manager), MSR, Windows, recovery at the end."""
    raw = tmp / "gold-gpt.raw"
    with raw.open("wb") as file:
        file.truncate(300 * MiB)
    run_ok("sgdisk", "-o", "-U", DISK_GUID,
           "-n", "1:2048:+100M", "-t", "1:ef00", "-u", f"1:{ESP_GUID}", "-c", "1:EFI system partition",
           "-n", "2:0:+16M", "-t", "2:0c01", "-c", "2:Microsoft reserved partition",
           "-n", "3:0:+140M", "-t", "3:0700", "-u", f"3:{WINDOWS_GUID}", "-c", "3:Basic data partition",
           "-n", "4:0:+40M", "-t", "4:2700", "-u", f"4:{RECOVERY_GUID}", "-c", "4:Recovery",
           "-A", "4:set:0", "-A", "4:set:63", raw)
    esp = tmp / "esp.fat"
    with esp.open("wb") as file:
        file.truncate(100 * MiB)
    run_ok("mkfs.fat", "-F", "32", "-s", "2", esp)
    boot = make_tree(tmp / "esp-files", {"bootmgfw.efi": b"MZ" + os.urandom(4096)})
    (boot / "BCD").write_bytes(lzma.decompress((HIVES / "BCD.xz").read_bytes()))
    run_ok("mmd", "-i", esp, "::/EFI", "::/EFI/Microsoft", "::/EFI/Microsoft/Boot")
    run_ok("mcopy", "-i", esp, boot / "bootmgfw.efi", boot / "BCD", "::/EFI/Microsoft/Boot/")
    _splice(raw, MiB, esp)
    windows_start = (1 + 100 + 16) * MiB
    _splice(raw, windows_start, _windows_volume(tmp, 140 * MiB, windows_start // SECTOR))
    _write_at(raw, windows_start + 140 * MiB, os.urandom(40 * MiB))  # WinRE: incompressible
    return raw


def _mbr_gold(tmp: Path) -> Path:
    """200 MiB MBR: System Reserved (active NTFS), Windows, recovery (0x27) after it; MBR boot code."""
    raw = tmp / "gold-mbr.raw"
    with raw.open("wb") as file:
        file.truncate(200 * MiB)
    script = (f"label: dos\nlabel-id: 0x{MBR_SIGNATURE:08x}\n"
              "start=2048, size=102400, type=7, bootable\n"  # 50 MiB System Reserved
              "start=104448, size=245760, type=7\n"  # 120 MiB Windows
              "start=350208, size=40960, type=27\n")  # 20 MiB recovery
    outcome = procs.run([tool("sfdisk"), str(raw)], stdin=script, timeout_s=60)
    assert outcome.ok, outcome.stderr
    _write_at(raw, 0, BOOT_CODE)
    reserved = make_ntfs_volume(tmp / "reserved.ntfs", 50 * MiB, label="System Reserved", partition_start_sector=2048)
    run_ok("ntfscp", reserved, make_tree(tmp / "bootmgr", {"bootmgr": b"BOOTMGR" * 1000}) / "bootmgr", "/bootmgr")
    _splice(raw, 2048 * SECTOR, reserved)
    _splice(raw, 104448 * SECTOR, _windows_volume(tmp, 120 * MiB, 104448))
    _write_at(raw, 350208 * SECTOR, os.urandom(20 * MiB))
    return raw


def _store_os(repository: LayerRepository, gold: Path, *, keep_boot: bool = True) -> StackLayer:
    stored = repository.store_version(1, 10, CaptureSource(SourceKind.DISK_IMAGE, gold), keep_boot=keep_boot)
    return StackLayer("os", "Win11", 1, 10, stored.checksum)


def _store_app(repository: LayerRepository, tmp: Path) -> StackLayer:
    folder = make_tree(tmp / "app", {"Program Files/App/app.exe": b"MZ app"})
    reg = tmp / "app.reg"
    reg.write_text('Windows Registry Editor Version 5.00\r\n\r\n[HKEY_LOCAL_MACHINE\\SOFTWARE\\Vendor]\r\n'
                   '"Installed"="yes"\r\n', encoding="utf-16")
    stored = repository.store_version(2, 20, CaptureSource(SourceKind.FOLDER, folder), delta=parse_reg_file(reg))
    return StackLayer("app", "App", 2, 20, stored.checksum)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _published_raw(image: Path, tmp: Path) -> Path:
    raw = tmp / "published.raw"
    run_ok("qemu-img", "convert", "-O", "raw", image, raw)
    return raw


def _cut(raw: Path, start: int, size: int, out: Path) -> Path:
    out.write_bytes(_read_at(raw, start, size))
    return out


def _sgdisk_info(raw: Path, number: int) -> dict[str, str]:
    lines = run_ok("sgdisk", "-i", str(number), raw).stdout.splitlines()
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in lines) if v}


@pytest.fixture(scope="module")
def gpt_published(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(gold raw, published raw, work folder) for a GPT gold disk + one app layer, published as VHDX on 512 MiB."""
    tmp = tmp_path_factory.mktemp("gpt")
    gold = _gpt_gold(tmp)
    repository = LayerRepository(tmp / "repository").ensure()
    stack = [_store_os(repository, gold), _store_app(repository, tmp)]
    (tmp / "out").mkdir()
    result = compose(stack, repository, tmp / "out", "vhdx", 0.5, name="gold-gpt")
    run_ok("qemu-img", "check", result.path)
    return gold, _published_raw(result.path, tmp), tmp


def test_gpt_layout_identities_and_moved_recovery(gpt_published: tuple[Path, Path, Path]) -> None:
    _gold, raw, _tmp = gpt_published
    assert raw.stat().st_size == 512 * MiB
    table = run_ok("sgdisk", "-p", raw).stdout
    assert f"Disk identifier (GUID): {DISK_GUID}" in table
    esp, msr, windows, recovery = (_sgdisk_info(raw, n) for n in (1, 2, 3, 4))
    assert esp["Partition unique GUID"] == ESP_GUID and esp["First sector"].startswith("2048 ")
    assert esp["Partition name"] == "'EFI system partition'"
    assert msr["Partition GUID code"].startswith("E3C9E316")
    assert windows["Partition unique GUID"] == WINDOWS_GUID
    assert windows["First sector"].startswith(f"{117 * 2048} ")  # where the gold disk had it
    assert recovery["Partition unique GUID"] == RECOVERY_GUID
    assert recovery["Attribute flags"] == "8000000000000001"
    assert recovery["Partition name"] == "'Recovery'"
    # recovery moved to the end of the larger disk; Windows grew up to it
    last_usable = 512 * MiB // SECTOR - 34
    rec_first = int(recovery["First sector"].split()[0])
    rec_last = int(recovery["Last sector"].split()[0])
    assert rec_last - rec_first + 1 == 40 * MiB // SECTOR and rec_last <= last_usable and rec_first % 2048 == 0
    assert last_usable - rec_last < 2048
    assert int(windows["Last sector"].split()[0]) == rec_first - 1
    assert "Problems found" not in run_ok("sgdisk", "-v", raw).stdout


def test_gpt_boot_partitions_arrive_byte_for_byte(gpt_published: tuple[Path, Path, Path]) -> None:
    gold, raw, tmp = gpt_published
    assert _sha(_read_at(raw, MiB, 100 * MiB)) == _sha(_read_at(gold, MiB, 100 * MiB))
    esp = _cut(raw, MiB, 100 * MiB, tmp / "published-esp.fat")
    run_ok("fsck.fat", "-n", esp)
    listing = run_ok("mdir", "-i", esp, "-b", "::/EFI/Microsoft/Boot").stdout
    assert "BCD" in listing and "bootmgfw.efi" in listing
    bcd = tmp / "bcd-back"
    run_ok("mcopy", "-i", esp, "::/EFI/Microsoft/Boot/BCD", bcd)
    assert bcd.read_bytes() == lzma.decompress((HIVES / "BCD.xz").read_bytes())
    rec_first = int(_sgdisk_info(raw, 4)["First sector"].split()[0])
    assert _sha(_read_at(raw, rec_first * SECTOR, 40 * MiB)) == _sha(_read_at(gold, 257 * MiB, 40 * MiB))


def test_gpt_windows_volume_boot_code_hives_and_acls(gpt_published: tuple[Path, Path, Path]) -> None:
    _gold, raw, tmp = gpt_published
    info = _sgdisk_info(raw, 3)
    first, last = int(info["First sector"].split()[0]), int(info["Last sector"].split()[0])
    volume = _cut(raw, first * SECTOR, (last - first + 1) * SECTOR, tmp / "published-windows.ntfs")
    boot = _read_at(volume, 0, 16 * SECTOR)
    assert int.from_bytes(boot[0x1C:0x20], "little") == first  # hidden sectors: the partition's start
    assert int.from_bytes(boot[0x28:0x30], "little") == last - first  # the new volume's own size in the BPB
    assert boot[0x54:0x54 + len(NTFS_BOOT_MARK)] == NTFS_BOOT_MARK and NTFS_BOOT_MARK in boot[SECTOR:]
    assert _read_at(volume, (last - first) * SECTOR, SECTOR) == boot[:SECTOR]  # the backup boot sector too
    run_ok("ntfsfix", "-n", volume)
    assert "app.exe" in run_ok("ntfsls", "-p", "/Program Files/App", volume).stdout
    software = tmp / "SOFTWARE-back"
    software.write_bytes(_ntfscat(volume, "/Windows/System32/config/SOFTWARE"))
    assert run_ok("hivexget", software, "\\Vendor", "Installed").stdout.strip() == "yes"
    for hive in ("SOFTWARE", "SYSTEM"):  # the rewritten hive keeps the ACL the gold image gave it
        descriptor = sec.get_security(volume, f"/Windows/System32/config/{hive}")
        assert sec.owner_sid(descriptor) == sec.SYSTEM
        assert sec.dacl_entries(descriptor) == HIVE_ACL
    audit = run_ok("ntfssecaudit", volume, "/Windows/System32/config/SOFTWARE").stdout
    assert "Windows owner S-1-5-18" in audit


def _ntfscat(volume: Path, path: str) -> bytes:
    return subprocess.run([tool("ntfscat"), str(volume), path], capture_output=True, check=True, timeout=60).stdout


def test_mbr_gold_disk_keeps_signature_boot_code_and_offsets(tmp_path: Path) -> None:
    gold = _mbr_gold(tmp_path)
    repository = LayerRepository(tmp_path / "repository").ensure()
    stack = [_store_os(repository, gold), _store_app(repository, tmp_path)]
    (tmp_path / "out").mkdir()
    result = compose(stack, repository, tmp_path / "out", "vhd-dynamic", 0.25, name="gold-mbr")
    raw = _published_raw(result.path, tmp_path)
    assert raw.stat().st_size == 256 * MiB
    layout = json.loads(run_ok("sfdisk", "--json", raw).stdout)["partitiontable"]
    assert layout["label"] == "dos" and int(layout["id"], 16) == MBR_SIGNATURE
    parts = [(p["start"], p["size"], p["type"], p.get("bootable", False)) for p in layout["partitions"]]
    assert parts == [(2048, 102400, "7", True), (104448, 245760, "7", False), (350208, 40960, "27", False)]
    assert _read_at(raw, 0, 440) == BOOT_CODE
    for start, size, _, _ in parts[::2]:  # System Reserved and recovery, byte for byte
        assert _sha(_read_at(raw, start * SECTOR, size * SECTOR)) == _sha(_read_at(gold, start * SECTOR, size * SECTOR))
    volume = _cut(raw, 104448 * SECTOR, 245760 * SECTOR, tmp_path / "windows-back.ntfs")
    assert NTFS_BOOT_MARK in _read_at(volume, SECTOR, SECTOR)
    assert "app.exe" in run_ok("ntfsls", "-p", "/Program Files/App", volume).stdout


def test_mbr_partitions_after_windows_need_a_disk_at_least_as_large(tmp_path: Path) -> None:
    gold = _mbr_gold(tmp_path)
    repository = LayerRepository(tmp_path / "repository").ensure()
    stack = [_store_os(repository, gold)]
    (tmp_path / "out").mkdir()
    with pytest.raises(DiskError, match="must keep their places on an MBR disk; the disk must be at least"):
        compose(stack, repository, tmp_path / "out", "raw", 0.125, name="small")
    assert os.listdir(tmp_path / "out") == []


def test_layout_plans_refuse_what_cannot_be_built() -> None:
    layout = GoldLayout.from_dict({
        "scheme": "gpt", "disk_size": 300 * MiB, "disk_guid": DISK_GUID, "mbr_signature": None, "boot_code": "",
        "partitions": [
            {"slot": 1, "start": MiB, "size": 100 * MiB, "kind": "esp", "windows": False, "type_guid": None,
             "unique_guid": None, "name": "", "attributes": 0, "mbr_type": None, "active": False},
            {"slot": 2, "start": 101 * MiB, "size": 150 * MiB, "kind": "ntfs", "windows": True, "type_guid": None,
             "unique_guid": None, "name": "", "attributes": 0, "mbr_type": None, "active": False},
        ]})
    assert layout.plan(1024 * MiB).windows.size == 1024 * MiB - 101 * MiB - MiB  # up to the backup GPT's MiB
    with pytest.raises(DiskError, match="leaves no room for the Windows partition"):
        layout.plan(128 * MiB)
    with pytest.raises(ValueError, match="exactly one Windows partition"):
        GoldLayout.from_dict({**layout.to_dict(), "partitions": [layout.to_dict()["partitions"][0]]})


def test_app_layers_from_disks_and_damaged_boot_files(tmp_path: Path) -> None:
    """Without keep_boot (app layers) nothing but the files is kept; a damaged boot file is never used."""
    gold = _gpt_gold(tmp_path)
    repository = LayerRepository(tmp_path / "repository").ensure()
    stored = repository.store_version(3, 30, CaptureSource(SourceKind.DISK_IMAGE, gold))
    assert repository.manifest(3, 30, stored.checksum).boot is None
    os_layer = _store_os(repository, gold)
    manifest = repository.manifest(1, 10, os_layer.checksum)
    assert manifest.boot is not None
    assert sorted(manifest.boot.files) == ["partition-1.img", "partition-2.img", "partition-4.img",
                                          "windows-boot.bin"]
    assert repository.check({(1, 10): os_layer.checksum, (3, 30): stored.checksum}) == []
    # a manifest whose recorded checksum of a boot file does not match the stored bytes is refused
    record = json.loads(repository.manifest_path(1, 10).read_text())
    record["manifest"]["boot"]["files"]["partition-1.img"] = "sha256:" + "0" * 64
    record["checksum"] = manifest_checksum(record["manifest"])
    repository.manifest_path(1, 10).write_text(json.dumps(record))
    (tmp_path / "boot").mkdir()
    with pytest.raises(RepositoryDamaged, match=r"partition-1\.img .* does not match"):
        repository.extract_boot(1, 10, tmp_path / "boot", checksum=record["checksum"])
    # removing the version removes its boot image too
    assert repository.remove_version(1, 10)
    with Wim.open(repository.wim_path(3)) as wim:
        assert [wim.image_name(i) for i in range(1, wim.image_count + 1)] == ["v30"]
    assert not repository.wim_path(1).exists()


def test_an_os_gold_disk_that_cannot_be_laid_out_again_is_refused_and_leaves_nothing(
    admin: Services, tmp_path: Path
) -> None:
    """Windows on a logical partition of an extended MBR partition: LayerDesk keeps primary partitions only,
    so the OS layer import fails with that reason, and catalog and repository are as they were."""
    raw = tmp_path / "extended.raw"
    with raw.open("wb") as file:
        file.truncate(200 * MiB)
    script = ("label: dos\nlabel-id: 0x0badc0de\n"
              "start=2048, size=102400, type=7, bootable\n"
              "start=104448, size=300000, type=5\n"
              "start=106496, size=245760, type=7\n")
    outcome = procs.run([tool("sfdisk"), str(raw)], stdin=script, timeout_s=60)
    assert outcome.ok, outcome.stderr
    _splice(raw, 106496 * SECTOR, _windows_volume(tmp_path, 120 * MiB, 106496))
    admin.imports.repository.ensure()
    admin.layers.create_layer("Win11", LayerType.OS)
    catalog_before, repo_before = outcome_snapshot(admin.catalog), listing(admin.imports.repository.root)
    runner = TaskRunner(admin.catalog, admin.caller, poll_s=0.05)
    try:
        task_id = admin.imports.start_import(runner, "Win11", "1", raw)
        assert runner.wait(task_id, 120) is TaskState.FAILED
    finally:
        runner.shutdown()
    error = admin.tasks.get_task(task_id).error or ""
    assert "extended MBR partition" in error and "keeps primary partitions only" in error and "\n" not in error
    assert outcome_snapshot(admin.catalog) == catalog_before
    assert listing(admin.imports.repository.root) == repo_before
