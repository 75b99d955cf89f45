"""Packaging machines end to end, with real tools: a packaging disk is made from the demo lab's layers, changed
as an installer would (files written, overwritten and deleted through an ntfs-3g mount, a hive rewritten with our
hive writer and put back with ``ntfscp``), and finalized; the new version must hold exactly the change.

The disks are checked with tools that are not ours: ``qemu-img check``, ``ntfsls``/``ntfscat`` on the NTFS
partition, ``wimlib-imagex dir`` on the stored layer.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from app.catalog.models import DiskFormat, TaskState, VersionState
from app.engine.compose import StackLayer, compose
from app.engine.disk import image_info, read_partition_table
from app.engine.packaging import pending_operations
from app.engine.registry.delta import CreateKey, SetValue
from app.engine.registry.model import Hive, RegistryKey, ValueType
from app.engine.registry.regf import parse_hive, write_hive
from app.engine.repository import Deletion
from app.secrets import SecretStore
from app.services import Services
from app.services.packaging import PackagingService, packaging_service
from app.services.views import TaskInfo
from app.tasks.runner import TaskRunner
from tests.conftest import demo_lab
from tests.engine.test_wim import ntfs_cat, ntfs_tree, wimlib_imagex_dir
from tests.support.image_checksum import image_checksum
from tests.support.repository_checks import listing, outcome_snapshot
from tests.support.tools import run_ok

SZ, MULTI_SZ = int(ValueType.SZ), int(ValueType.MULTI_SZ)
SIZE_GB = 0.25
SESSION_MANAGER = "ControlSet001\\Control\\Session Manager"


def sz(text: str) -> bytes:
    return (text + "\0").encode("utf-16-le")


@pytest.fixture
def runner(admin: Services) -> Iterator[TaskRunner]:
    runner = TaskRunner(admin.catalog, admin.caller, poll_s=0.05)
    yield runner
    runner.shutdown()


@pytest.fixture
def lab(admin: Services, demo_lab_template: Path) -> PackagingService:
    """The demo lab (Demo-Win11, Demo-Hypervisor, Demo-Office, Demo-Browser, Demo-Tools) and a new app layer
    ``Notes`` on Demo-Win11."""
    demo_lab(admin, demo_lab_template)
    admin.layers.create_layer("Notes", admin.layers.get_layer("Demo-Office").layer.type, os_layer="Demo-Win11")
    return packaging_service(admin)


def _wait(service: PackagingService, runner: TaskRunner, task_id: int) -> TaskInfo:
    runner.wait(task_id, timeout_s=300)
    return _services(service).tasks.get_task(task_id)


def package(service: PackagingService, runner: TaskRunner, out: Path, layer: str, version: str,
            **options: object) -> TaskInfo:
    out.mkdir(parents=True, exist_ok=True)
    task_id = service.start_packaging(runner, layer, version, out, size_gb=SIZE_GB, **options)  # type: ignore[arg-type]
    return _wait(service, runner, task_id)


def finalize(service: PackagingService, runner: TaskRunner, ref: str, disk: Path) -> TaskInfo:
    return _wait(service, runner, service.start_finalize(runner, ref, disk))


# --- changing a disk as an installer would -----------------------------------------------------------------


class OpenDisk:
    """A disk image opened for change: its NTFS partition copied out to ``volume`` (and spliced back by
    :meth:`close`, converted to the disk's own format in place)."""

    def __init__(self, disk: Path, work: Path) -> None:
        self.disk, self.work = disk, work
        work.mkdir(parents=True, exist_ok=True)
        self.format = image_info(disk).format
        self.raw = work / "disk.raw"
        run_ok("qemu-img", "convert", "-f", self.format, "-O", "raw", disk, self.raw)
        with self.raw.open("rb") as file:
            self.partition = read_partition_table(file, size=self.raw.stat().st_size).ntfs_data_partition()
            file.seek(self.partition.start)
            self.volume = work / "volume.ntfs"
            self.volume.write_bytes(file.read(self.partition.size))

    def change_files(self, change: Callable[[Path], None]) -> None:
        """Mount the volume with ntfs-3g (FUSE), let ``change`` write in it, unmount."""
        mount = self.work / "mnt"
        mount.mkdir(exist_ok=True)
        run_ok("ntfs-3g", self.volume, mount)
        try:
            change(mount)
        finally:
            subprocess.run(["fusermount", "-u", str(mount)], check=True, timeout=60)

    def hive(self, path: str) -> Hive:
        return parse_hive(ntfs_cat(self.volume, path), name=path)

    def put_hive(self, path: str, hive: Hive) -> None:
        local = self.work / "hive.new"
        write_hive(hive, local)
        run_ok("ntfscp", "-f", self.volume, local, path)

    def close(self) -> None:
        with self.raw.open("r+b") as file:
            file.seek(self.partition.start)
            file.write(self.volume.read_bytes())
        target = self.work / f"out.{self.disk.suffix}"
        run_ok("qemu-img", "convert", "-f", "raw", "-O", self.format, self.raw, target)
        shutil.move(target, self.disk)
        shutil.rmtree(self.work)


def disk_volume(disk: Path, work: Path) -> Path:
    opened = OpenDisk(disk, work)
    return opened.volume


# --- the round trip -------------------------------------------------------------------------------------


def test_package_change_finalize_and_publish(lab: PackagingService, runner: TaskRunner, tmp_path: Path) -> None:
    out = tmp_path / "out"
    started = time.monotonic()
    task = package(lab, runner, out, "Notes", "1", prerequisites=["Demo-Browser"], fmt=DiskFormat.QCOW2,
                   comment="first")
    assert task.state is TaskState.COMPLETE, task.error
    packaged_s = time.monotonic() - started
    disk = out / "Notes_1_packaging.qcow2"
    assert sorted(p.name for p in out.iterdir()) == [disk.name]
    run_ok("qemu-img", "check", "-f", "qcow2", disk)
    record = lab.get_packaging("Notes:1")
    assert record.state is VersionState.EDITING
    assert (record.os.layer, record.os.version, [p.layer for p in record.prerequisites], record.previous) == \
        ("Demo-Win11", "1.0", ["Demo-Browser"], None)
    assert record.os.checksum.startswith("sha256:") and record.prerequisites[0].checksum.startswith("sha256:")
    assert record.disk is not None and record.disk.path == str(disk) and record.disk.format is DiskFormat.QCOW2
    assert record.disk.checksum == image_checksum(disk)
    assert record.disk.manifest_digest.startswith("sha256:") and len(record.disk.volume_serial) == 16

    # The OS layer's and the prerequisite's files are on the disk's NTFS partition.
    volume = disk_volume(disk, tmp_path / "look")
    tree = ntfs_tree(volume)
    assert {"/README-DEMO.txt", "/Program Files/Demo Browser/browser.exe", "/Windows/Temp/setup.log"} <= tree
    assert ntfs_cat(volume, "/Windows/System32/demo-runtime.dll") == b"demo runtime 3.0 (Demo-Browser)"
    assert "/Program Files/Demo Office/word.exe" not in tree  # not a prerequisite

    # The installer: a new file, a changed one, a deleted one, and a registry value.
    opened = OpenDisk(disk, tmp_path / "edit")

    def install(root: Path) -> None:
        (root / "Program Files" / "Notes").mkdir()
        (root / "Program Files" / "Notes" / "notes.exe").write_bytes(b"MZ notes 1.0")
        (root / "Windows" / "win.ini").write_bytes(b"; changed by Notes\r\n[Notes]\r\n")
        (root / "Windows" / "Temp" / "setup.log").unlink()

    opened.change_files(install)
    software = opened.hive("/Windows/System32/config/SOFTWARE")
    software.ensure("Vendor\\Notes").set_value("Version", SZ, sz("1.0"))
    opened.put_hive("/Windows/System32/config/SOFTWARE", software)
    opened.close()

    started = time.monotonic()
    done = finalize(lab, runner, "Notes:1", disk)
    assert done.state is TaskState.COMPLETE, done.error
    finalized_s = time.monotonic() - started
    admin = _services(lab)
    version = admin.layers.get_version("Notes:1")
    assert version.state is VersionState.DEPLOYABLE and version.state_reason == ""
    layer_id = admin.layers.get_layer("Notes").layer.id
    manifest = lab.repository.manifest(layer_id, version.id, version.checksum)
    assert set(manifest.deletions) == {Deletion("Windows\\Temp\\setup.log")}
    assert list(manifest.registry) == [CreateKey("SOFTWARE", "Vendor"),  # the new key without values of its own
                                       SetValue("SOFTWARE", "Vendor\\Notes", "Version", SZ, sz("1.0"))]
    assert wimlib_imagex_dir(lab.repository.wim_path(layer_id), 1) == {
        "/", "/Program Files", "/Program Files/Notes", "/Program Files/Notes/notes.exe", "/Windows",
        "/Windows/win.ini"}
    assert lab.get_packaging("Notes:1").finalized is not None

    # A template with it publishes, and the image has the change.
    stack = [StackLayer("os", "Demo-Win11", *_ids(admin, "Demo-Win11:1.0")),
             StackLayer("app", "Notes", *_ids(admin, "Notes:1"))]
    (tmp_path / "pub").mkdir()
    image = compose(stack, lab.repository, tmp_path / "pub", "wim", 1, name="Check").path
    published = wimlib_imagex_dir(image, 1)
    assert "/Program Files/Notes/notes.exe" in published and "/Windows/Temp/setup.log" not in published
    assert "/Program Files/Demo Browser/browser.exe" not in published  # a prerequisite is not part of the layer
    print(f"\npackaging disk {packaged_s:.1f} s, finalize {finalized_s:.1f} s")


def _services(service: PackagingService) -> Services:
    """The caller's other services (the tests' caller is the Administrator; nothing here needs a secret)."""
    return Services.for_caller(service.home, service.catalog, service.caller, SecretStore("packaging-tests"))


def _ids(services: Services, ref: str) -> tuple[int, int, str | None]:
    info = services.layers.get_version(ref)
    return services.layers.get_layer(info.layer).layer.id, info.id, info.checksum


def test_an_update_keeps_the_previous_versions_content(lab: PackagingService, runner: TaskRunner,
                                                        tmp_path: Path) -> None:
    task = package(lab, runner, tmp_path / "out", "Demo-Office", "2.0", previous="1.0", fmt=DiskFormat.VHDX)
    assert task.state is TaskState.COMPLETE, task.error
    disk = tmp_path / "out" / "Demo-Office_2.0_packaging.vhdx"
    run_ok("qemu-img", "check", "-f", "vhdx", disk)
    opened = OpenDisk(disk, tmp_path / "edit")
    assert ntfs_cat(opened.volume, "/Program Files/Demo Office/word.exe") == b"demo word processor"

    def update(root: Path) -> None:
        (root / "Program Files" / "Demo Office" / "excel.exe").write_bytes(b"demo spreadsheet")
        (root / "Program Files" / "Demo Office" / "word.exe").write_bytes(b"demo word processor 2.0")

    opened.change_files(update)
    opened.close()
    done = finalize(lab, runner, "Demo-Office:2.0", disk)
    assert done.state is TaskState.COMPLETE, done.error
    admin = _services(lab)
    layer_id, version_id, checksum = _ids(admin, "Demo-Office:2.0")
    office = "/Program Files/Demo Office"
    assert {p for p in wimlib_imagex_dir(lab.repository.wim_path(layer_id), 2) if "." in p.rpartition("/")[2]} == {
        f"{office}/word.exe", f"{office}/excel.exe", "/Program Files/Common Files/Demo/shared.dll",
        "/Windows/System32/demo-runtime.dll"}
    manifest = lab.repository.manifest(layer_id, version_id, checksum)
    touched = {(op.hive, op.key, getattr(op, "name", None)) for op in manifest.registry}
    assert {("SOFTWARE", "Demo\\Office", "Version"), ("SOFTWARE", "Demo\\Shared", "Owner"),
            ("NTUSER", "Software\\Demo\\Preferences", "Theme")} <= touched
    run_ok("wimlib-imagex", "extract", lab.repository.wim_path(layer_id), "2", f"{office}/word.exe",
           f"--dest-dir={tmp_path / 'x'}")
    assert (tmp_path / "x" / "word.exe").read_bytes() == b"demo word processor 2.0"


def test_a_pending_reboot_or_another_disk_refuses_finalize_and_the_version_stays_editing(
        lab: PackagingService, runner: TaskRunner, tmp_path: Path) -> None:
    assert package(lab, runner, tmp_path / "out", "Notes", "1").state is TaskState.COMPLETE
    disk = tmp_path / "out" / "Notes_1_packaging.vhdx"
    opened = OpenDisk(disk, tmp_path / "edit")
    system = opened.hive("/Windows/System32/config/SYSTEM")
    system.ensure(SESSION_MANAGER).set_value(
        "PendingFileRenameOperations", MULTI_SZ, "\\??\\C:\\Program Files\\Notes\\old.dll\0\0\0".encode("utf-16-le"))
    opened.put_hive("/Windows/System32/config/SYSTEM", system)
    opened.close()
    repo_before = listing(lab.repository.root)
    done = finalize(lab, runner, "Notes:1", disk)
    assert done.state is TaskState.FAILED
    assert "PendingFileRenameOperations" in (done.error or "") and "pending reboot" in (done.error or "")
    version = _services(lab).layers.get_version("Notes:1")
    assert version.state is VersionState.EDITING
    assert version.state_reason.startswith("Finalize refused: Notes:1 cannot be finalized yet")
    assert "ControlSet001\\Control\\Session Manager\\PendingFileRenameOperations" in version.state_reason
    assert listing(lab.repository.root) == repo_before

    # Another layer's packaging disk, and a file that is no disk, are refused too.
    assert package(lab, runner, tmp_path / "b", "Demo-Tools", "2").state is TaskState.COMPLETE
    other = tmp_path / "b" / "Demo-Tools_2_packaging.vhdx"
    done = finalize(lab, runner, "Notes:1", other)
    assert done.state is TaskState.FAILED
    assert (done.error or "").startswith(f"{other} is not the packaging disk of Notes:1: its Windows volume has "
                                         "serial number")
    text = tmp_path / "notes.txt"
    text.write_text("not a disk", encoding="utf-8")
    done = finalize(lab, runner, "Notes:1", text)
    assert done.state is TaskState.FAILED and (done.error or "").startswith(
        f"{text} cannot be the packaging disk of Notes:1:")
    assert _services(lab).layers.get_version("Notes:1").state is VersionState.EDITING


def test_a_cancelled_packaging_leaves_no_version_and_no_file(lab: PackagingService, runner: TaskRunner,
                                                              tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    admin = _services(lab)
    before = outcome_snapshot(lab.catalog)
    task_id = lab.start_packaging(runner, "Notes", "1", out, size_gb=2, fmt=DiskFormat.VMDK)
    deadline = time.monotonic() + 30
    while admin.tasks.get_task(task_id).state is not TaskState.RUNNING and time.monotonic() < deadline:
        time.sleep(0.01)
    admin.tasks.cancel(task_id)
    assert runner.wait(task_id, 60) is TaskState.CANCELED
    assert outcome_snapshot(lab.catalog) == before
    assert list(out.iterdir()) == []
    assert [v.name for v in admin.layers.get_layer("Notes").versions] == []


def test_what_counts_as_pending() -> None:
    system = Hive(RegistryKey("ROOT"))
    system.ensure("Select").set_value("Current", int(ValueType.DWORD), (2).to_bytes(4, "little"))
    software = Hive(RegistryKey("ROOT"))
    run_once_ex = software.ensure("Microsoft\\Windows\\CurrentVersion\\RunOnceEx")
    run_once_ex.set_value("Flags", int(ValueType.DWORD), bytes(4))  # a setting, nothing queued
    software.ensure("Microsoft\\Windows\\CurrentVersion\\RunOnce")
    system.ensure("ControlSet001\\Control\\Session Manager").set_value(
        "PendingFileRenameOperations", MULTI_SZ, "\\??\\C:\\x\0\0\0".encode("utf-16-le"))  # not the current set
    system.ensure("ControlSet002\\Control\\Session Manager").set_value(
        "PendingFileRenameOperations2", MULTI_SZ, bytes(4))  # empty
    assert pending_operations(system, software) == []
    system.ensure("ControlSet002\\Control\\Session Manager").set_value(
        "PendingFileRenameOperations", MULTI_SZ, "\\??\\C:\\a.dll\0\0\\??\\C:\\b.tmp\0!\\??\\C:\\b.dll\0\0".encode(
            "utf-16-le"))
    software.ensure("Microsoft\\Windows\\CurrentVersion\\RunOnce").set_value("Setup", SZ, sz("setup.exe /finish"))
    software.ensure("Microsoft\\Windows\\CurrentVersion\\RunOnceEx\\0001")
    software.ensure("Microsoft\\Windows\\CurrentVersion\\Component Based Servicing\\RebootPending")
    software.ensure("Microsoft\\Windows\\CurrentVersion\\WindowsUpdate\\Auto Update\\RebootRequired")
    found = pending_operations(system, software)
    assert [line.split(" (")[0] for line in found] == [
        "HKLM\\SYSTEM\\ControlSet002\\Control\\Session Manager\\PendingFileRenameOperations",
        "HKLM\\SOFTWARE\\Microsoft\\Windows\\CurrentVersion\\RunOnce",
        "HKLM\\SOFTWARE\\Microsoft\\Windows\\CurrentVersion\\RunOnceEx",
        "HKLM\\SOFTWARE\\Microsoft\\Windows\\CurrentVersion\\Component Based Servicing\\RebootPending",
        "HKLM\\SOFTWARE\\Microsoft\\Windows\\CurrentVersion\\WindowsUpdate\\Auto Update\\RebootRequired",
    ]
    assert "2 pending file operations" in found[0] and "Setup" in found[1] and "0001" in found[2]
