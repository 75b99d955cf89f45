"""Import: what a source is, OCI whiteouts, and the import task end to end (child process, catalog, audit).

A failed or cancelled import must leave nothing behind: every such test compares the whole catalog
(except the audit log and the task tables, which record the attempt) and a listing of the repository
folder with file hashes, before and after. Stored images are listed with ``wimlib-imagex dir``.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ClassVar

import psutil
import pytest

from app.catalog.models import LayerType, Role, TaskState, VersionState
from app.engine.importer import ImportSourceError, inspect_source, scan_folder
from app.engine.registry.delta import RegistryDelta
from app.engine.registry.regfile import RegFileError, parse_reg_file
from app.engine.repository import Deletion, LayerRepository, SourceKind
from app.errors import Conflict, LayerDeskError, PermissionDenied
from app.services import Services
from app.services.views import TaskInfo
from app.tasks.base import LayerDeskTask, TaskContext, TaskResult
from app.tasks.runner import TaskRunner
from tests.conftest import ServicesFactory
from tests.engine.test_wim import Layer, build_volume, run_ok, wimlib_imagex_dir
from tests.support.repository_checks import listing, make_tree, outcome_snapshot

MiB = 1024 * 1024


# --- sources and whiteouts (no catalog) -----------------------------------------------------------------


def test_folder_whiteouts_and_opaque_directories(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "layer", {
        "Program Files/App/app.exe": b"MZ",
        "Program Files/App/.wh.old.dll": b"",
        "Program Files/Old App/.wh..wh..opq": b"",
        "Program Files/Old App/new.txt": b"n",
        ".wh.stale.txt": b"",
        "Users/Default/.wh.ntuser.dat.LOG1": b"",
    })
    scan = scan_folder(root)
    assert scan.deletions == (
        Deletion("stale.txt"),
        Deletion("Program Files\\App\\old.dll"),
        Deletion("Program Files\\Old App", opaque=True),
        Deletion("Users\\Default\\ntuser.dat.LOG1"),
    )
    assert scan.markers == ("/.wh.stale.txt", "/Program Files/App/.wh.old.dll", "/Program Files/Old App/.wh..wh..opq",
                            "/Users/Default/.wh.ntuser.dat.LOG1")
    assert inspect_source(root).kind is SourceKind.FOLDER


@pytest.mark.parametrize(("name", "why"), [
    (".wh...", "escapes the layer"),
    (".wh..", "escapes the layer"),
    (".wh.", "names nothing"),
    (".wh.CON", "reserved Windows device name"),
    (".wh.nul.txt", "reserved Windows device name"),
    (".wh.com1", "reserved Windows device name"),
    (".wh.a:b", "character Windows forbids"),
    (".wh.what?", "character Windows forbids"),
    (".wh.back\\slash", "path separator"),
    (".wh.tab\tname", "U+0009"),
    (".wh.trailing.", "ends with a dot"),
    (".wh..wh.plnk", "reserved prefix"),
])
def test_whiteouts_that_do_not_name_one_windows_file_are_refused(tmp_path: Path, name: str, why: str) -> None:
    root = make_tree(tmp_path / "layer", {f"dir/{name}": b"", "dir/ok.txt": b"ok"})
    with pytest.raises(ImportSourceError, match="whiteout") as caught:
        inspect_source(root)
    assert why in str(caught.value) and "was refused" in str(caught.value)


def test_an_opaque_marker_at_the_root_or_a_whiteout_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ImportSourceError, match="would hide the whole OS layer"):
        scan_folder(make_tree(tmp_path / "a", {".wh..wh..opq": b""}))
    (tmp_path / "b" / ".wh.dir").mkdir(parents=True)
    with pytest.raises(ImportSourceError, match="a whiteout must be a file"):
        scan_folder(tmp_path / "b")


def _vhd_footer() -> bytes:
    return b"conectix" + b"\0" * 504


@pytest.mark.parametrize(("content", "shown"), [
    (b"\0" * 4096 + _vhd_footer(), "VHD"),  # fixed VHD: the footer is at the end
    (_vhd_footer() + b"\0" * 4096, "VHD"),  # dynamic VHD: a copy of it at the start
    (b"vhdxfile" + b"\0" * 4096, "VHDX"),
    (b"KDMV" + b"\0" * 4096, "VMDK"),
    (b"QFI\xfb" + b"\0" * 4096, "qcow2"),
    (b"\0" * 512 + b"EFI PART" + b"\0" * 4096, "raw disk (GPT)"),
    (b"\0" * 450 + b"\x07" + b"\0" * 59 + b"\x55\xaa" + b"\0" * 4096, "raw disk (MBR)"),
])
def test_a_damaged_or_empty_disk_image_is_refused_before_a_version_exists(tmp_path: Path, content: bytes,
                                                                           shown: str) -> None:
    """Only the signature of each kind: recognised as that kind of disk, and refused as unreadable."""
    path = tmp_path / "disk.img"
    path.write_bytes(content)
    with pytest.raises(ImportSourceError) as caught:
        inspect_source(path)
    assert f"looks like a disk image ({shown}) but cannot be imported: " in str(caught.value)


def test_other_files_and_misused_image_numbers_are_refused(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello", encoding="utf-8")
    with pytest.raises(ImportSourceError, match="is not a folder, a WIM file or an NTFS volume image"):
        inspect_source(text)
    with pytest.raises(ImportSourceError, match="does not exist"):
        inspect_source(tmp_path / "missing")
    with pytest.raises(ImportSourceError, match="--image only applies to WIM files"):
        inspect_source(tmp_path, image=1)
    with pytest.raises(ImportSourceError, match="--image only applies to WIM files"):
        inspect_source(text, image=2)


# --- the import task end to end -----------------------------------------------------------------------------


@pytest.fixture
def runner(admin: Services) -> Iterator[TaskRunner]:
    runner = TaskRunner(admin.catalog, admin.caller, poll_s=0.05)
    yield runner
    runner.shutdown()


@pytest.fixture
def layers(admin: Services) -> Services:
    admin.imports.repository.ensure()  # the empty repository, as `layerctl init` would leave it
    admin.layers.create_layer("Win11", LayerType.OS)
    admin.layers.create_layer("Tools", LayerType.APP, os_layer="Win11")
    return admin


def _import(services: Services, runner: TaskRunner, layer: str, version: str, source: Path,
            **kw: object) -> TaskInfo:
    task_id = services.imports.start_import(runner, layer, version, source, **kw)  # type: ignore[arg-type]
    runner.wait(task_id, 120)
    return services.tasks.get_task(task_id)


def _repo(services: Services) -> LayerRepository:
    return services.imports.repository


def _layer_id(services: Services, name: str) -> int:
    return services.layers.get_layer(name).layer.id


def test_a_folder_import_stores_the_version_and_makes_it_deployable(layers: Services, runner: TaskRunner,
                                                                     tmp_path: Path) -> None:
    src = make_tree(tmp_path / "tools", {
        "Tools/bin/tool.exe": b"MZ" * 500, "Tools/doc/readme.txt": b"read me", "Tools/.wh.old.exe": b"",
        "Tools/cache/.wh..wh..opq": b"", "Tools/cache/fresh.dat": b"f",
    })
    task = _import(layers, runner, "Tools", "1.0", src, comment="first drop")
    assert task.state is TaskState.COMPLETE, task.error
    assert task.kind == "layer.import" and task.progress == 100
    result = task.result or {}
    assert (result["type"], result["layer"], result["version"], result["files"]) == ("LayerImportResult", "Tools",
                                                                                     "1.0", 3)
    version = layers.layers.get_version("Tools:1.0")
    assert version.state is VersionState.DEPLOYABLE
    assert (version.size_bytes, version.checksum, version.comment) == (1008, result["checksum"], "first drop")
    repo, layer_id = _repo(layers), _layer_id(layers, "Tools")
    assert wimlib_imagex_dir(repo.wim_path(layer_id), 1) == {
        "/", "/Tools", "/Tools/bin", "/Tools/bin/tool.exe", "/Tools/doc", "/Tools/doc/readme.txt", "/Tools/cache",
        "/Tools/cache/fresh.dat"}
    manifest = repo.manifest(layer_id, version.id, version.checksum)
    assert manifest.deletions == (Deletion("Tools\\old.exe"), Deletion("Tools\\cache", opaque=True))
    assert manifest.registry == RegistryDelta()
    trail = [(e.operation, e.object_name, e.comment) for e in reversed(layers.audit.list_entries(limit=3))]
    assert trail == [("layer.version.add", "Tools:1.0", "first drop"),
                     ("layer.version.state", "Tools:1.0", "first drop"),
                     ("layer.version.state", "Tools:1.0", "first drop")]
    assert [e.change["state"] for e in layers.audit.list_entries(limit=2)] == [["finalizing", "deployable"],
                                                                                ["editing", "finalizing"]]
    assert layers.repository.check().problems == ()


def test_a_second_version_with_5_percent_changed_costs_far_less_than_a_copy(layers: Services, runner: TaskRunner,
                                                                           tmp_path: Path) -> None:
    files = {f"App/part{n % 10}/file{n:03}.bin": os.urandom(100 * 1024) for n in range(100)}
    first = make_tree(tmp_path / "v1", files)
    assert _import(layers, runner, "Tools", "1", first).state is TaskState.COMPLETE
    wim = _repo(layers).wim_path(_layer_id(layers, "Tools"))
    one_version = wim.stat().st_size
    second = make_tree(tmp_path / "v2", {**files, **{f"App/part{n % 10}/file{n:03}.bin": os.urandom(100 * 1024)
                                                     for n in range(0, 100, 20)}})
    assert _import(layers, runner, "Tools", "2", second).state is TaskState.COMPLETE
    two_versions = wim.stat().st_size
    assert one_version > 10_000_000
    assert two_versions < 1.3 * one_version, (one_version, two_versions)
    assert two_versions - one_version < 0.1 * one_version  # ≈ the 5 % that changed


def test_import_from_the_second_image_of_a_wim(layers: Services, runner: TaskRunner, tmp_path: Path) -> None:
    wim_file = tmp_path / "install.wim"
    run_ok("wimlib-imagex", "capture", make_tree(tmp_path / "home", {"Windows/notepad.exe": b"home"}), wim_file,
           "Home")
    run_ok("wimlib-imagex", "append", make_tree(tmp_path / "pro", {"Windows/notepad.exe": b"pro",
                                                                     "Windows/gpedit.msc": b"pro only"}),
           wim_file, "Pro")
    task = _import(layers, runner, "Win11", "pro", wim_file, image=2)
    assert task.state is TaskState.COMPLETE, task.error
    repo, layer_id = _repo(layers), _layer_id(layers, "Win11")
    assert wimlib_imagex_dir(repo.wim_path(layer_id), 1) == wimlib_imagex_dir(wim_file, 2) == {
        "/", "/Windows", "/Windows/notepad.exe", "/Windows/gpedit.msc"}
    version = layers.layers.get_version("Win11:pro")
    manifest = repo.manifest(layer_id, version.id, version.checksum)
    assert (manifest.source.kind, manifest.source.image, manifest.files) == (SourceKind.WIM, 2, 2)


def test_import_from_an_ntfs_volume_image(layers: Services, runner: TaskRunner, tmp_path: Path) -> None:
    volume = build_volume(tmp_path, Layer("os", {"Windows/System32/cmd.exe": b"MZcmd", "Users/Public/a.txt": b"a"},
                                          streams={"Users/Public/a.txt": {"Zone.Identifier": b"ZoneId=3"}}))
    blob = tmp_path / "boot.ini"
    blob.write_bytes(b"[boot loader]")
    run_ok("ntfscp", volume, blob, "/boot.ini")
    task = _import(layers, runner, "Win11", "1.0", volume)
    assert task.state is TaskState.COMPLETE, task.error
    wim = _repo(layers).wim_path(_layer_id(layers, "Win11"))
    assert wimlib_imagex_dir(wim, 1) == {"/", "/boot.ini", "/Windows", "/Windows/System32",
                                         "/Windows/System32/cmd.exe", "/Users", "/Users/Public",
                                         "/Users/Public/a.txt"}
    assert "Zone.Identifier" in run_ok("wimlib-imagex", "dir", wim, "1", "--path=/Users/Public/a.txt",
                                       "--detailed").stdout
    assert layers.layers.get_version("Win11:1.0").size_bytes == 5 + 1 + 13


def test_reg_files_become_the_versions_registry_delta(layers: Services, runner: TaskRunner, tmp_path: Path) -> None:
    first, second = tmp_path / "a.reg", tmp_path / "b.reg"
    first.write_text("Windows Registry Editor Version 5.00\r\n\r\n[HKEY_LOCAL_MACHINE\\SOFTWARE\\Tools]\r\n"
                     '"Version"="1.0"\r\n"Mode"=dword:00000001\r\n\r\n[HKEY_CURRENT_USER\\Software\\Tools]\r\n'
                     '"Theme"="dark"\r\n', encoding="utf-16")
    second.write_text('REGEDIT4\r\n\r\n[HKEY_LOCAL_MACHINE\\SOFTWARE\\Tools]\r\n"Version"="1.1"\r\n"Mode"=-\r\n'
                      "\r\n[-HKEY_LOCAL_MACHINE\\SOFTWARE\\Tools\\Legacy]\r\n", encoding="ascii")
    src = make_tree(tmp_path / "files", {"Tools/tool.exe": b"MZ"})
    task = _import(layers, runner, "Tools", "1.0", src, registry_files=[first, second])
    assert task.state is TaskState.COMPLETE, task.error
    version = layers.layers.get_version("Tools:1.0")
    manifest = _repo(layers).manifest(_layer_id(layers, "Tools"), version.id, version.checksum)
    expected = RegistryDelta.merged([parse_reg_file(first), parse_reg_file(second)])
    assert manifest.registry == expected
    assert [(t.path, t.kind.value) for t in manifest.registry.touched()] == [
        ("HKLM\\SOFTWARE\\Tools\\Version", "set"), ("HKLM\\SOFTWARE\\Tools\\Mode", "delete_value"),
        ("HKCU\\Software\\Tools\\Theme", "set"), ("HKLM\\SOFTWARE\\Tools\\Legacy\\", "delete_key")]
    assert (task.result or {})["registry_operations"] == len(expected) == 5


# --- nothing left behind ----------------------------------------------------------------------------------


@pytest.fixture
def stored_first(layers: Services, runner: TaskRunner, tmp_path: Path) -> Services:
    """Tools:1.0 imported, so "before" includes a layer WIM that must stay byte for byte."""
    task = _import(layers, runner, "Tools", "1.0", make_tree(tmp_path / "first", {"Tools/a.txt": b"a"}))
    assert task.state is TaskState.COMPLETE, task.error
    return layers


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[Callable[[Services, TaskRunner], object], type[LayerDeskError],
                                                    str]]:
    good = make_tree(tmp_path / "good", {"x.txt": b"x"})
    unknown = tmp_path / "data.bin"
    unknown.write_bytes(os.urandom(8192))
    vhd = tmp_path / "disk.vhd"
    vhd.write_bytes(b"\0" * 8192 + _vhd_footer())
    escaping = make_tree(tmp_path / "escaping", {"App/.wh...": b"", "App/x.txt": b"x"})
    bad_reg = tmp_path / "bad.reg"
    bad_reg.write_text('REGEDIT4\r\n\r\n[HKEY_LOCAL_MACHINE\\SOFTWARE\\X]\r\n"v"=dword:12\r\n', encoding="ascii")
    wim_file = tmp_path / "one.wim"
    run_ok("wimlib-imagex", "capture", good, wim_file, "only")

    def start(source: Path, version: str = "2.0", **kw: object) -> Callable[[Services, TaskRunner], object]:
        return lambda s, r: s.imports.start_import(r, "Tools", version, source, **kw)  # type: ignore[arg-type]

    return {
        "missing path": (start(tmp_path / "nowhere"), ImportSourceError, "does not exist"),
        "unknown kind": (start(unknown), ImportSourceError, "is not a folder, a WIM file or an NTFS volume image"),
        "vhd": (start(vhd), ImportSourceError, "looks like a disk image (VHD) but cannot be imported"),
        "escaping whiteout": (start(escaping), ImportSourceError, "escapes the layer"),
        "malformed reg": (start(good, registry_files=[bad_reg]), RegFileError, "line 4"),
        "missing reg": (start(good, registry_files=[tmp_path / "no.reg"]), ImportSourceError, "no.reg does not exist"),
        "wim image out of range": (start(wim_file, image=3), ImportSourceError, "has no image 3: it has 1 image"),
        "duplicate version": (start(good, "1.0"), Conflict, "already has a version '1.0'"),
    }


@pytest.mark.parametrize("case", ["missing path", "unknown kind", "vhd", "escaping whiteout", "malformed reg",
                                  "missing reg", "wim image out of range", "duplicate version"])
def test_bad_input_is_refused_with_one_clear_message_and_nothing_behind(
    stored_first: Services, runner: TaskRunner, tmp_path: Path, case: str
) -> None:
    action, error, fragment = _bad_inputs(tmp_path / "inputs")[case]
    catalog_before, repo_before = outcome_snapshot(stored_first.catalog), listing(_repo(stored_first).root)
    tasks_before = stored_first.tasks.list_tasks()
    with pytest.raises(error) as caught:
        action(stored_first, runner)
    message = str(caught.value)
    assert fragment in message and "\n" not in message
    assert outcome_snapshot(stored_first.catalog) == catalog_before
    assert listing(_repo(stored_first).root) == repo_before
    assert stored_first.tasks.list_tasks() == tasks_before  # refused before any task was started


def test_a_capture_that_fails_in_the_worker_deletes_the_version_again(stored_first: Services, runner: TaskRunner,
                                                                      tmp_path: Path) -> None:
    fake = tmp_path / "fake.ntfs"
    fake.write_bytes(b"\xebR\x90NTFS    " + os.urandom(64 * 1024))  # an NTFS boot sector's start, then noise
    catalog_before, repo_before = outcome_snapshot(stored_first.catalog), listing(_repo(stored_first).root)
    task = _import(stored_first, runner, "Tools", "2.0", fake, comment="try")
    assert task.state is TaskState.FAILED
    assert "Cannot capture" in (task.error or "") and "\n" not in (task.error or "")
    assert outcome_snapshot(stored_first.catalog) == catalog_before
    assert listing(_repo(stored_first).root) == repo_before
    trail = [(e.operation, e.object_name) for e in reversed(stored_first.audit.list_entries(limit=2))]
    assert trail == [("layer.version.add", "Tools:2.0"), ("layer.version.delete", "Tools:2.0")]
    assert stored_first.audit.list_entries(limit=1)[0].comment.startswith("Import failed: Cannot capture")


def _big_folder(root: Path, megabytes: int = 160) -> Path:
    """Incompressible files: wimlib needs a second or two to write them (time to cancel)."""
    for n in range(megabytes):
        folder = root / f"d{n % 8}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"f{n}.bin").write_bytes(os.urandom(MiB))
    return root


def test_a_cancelled_import_leaves_nothing_behind(stored_first: Services, runner: TaskRunner, tmp_path: Path) -> None:
    big = _big_folder(tmp_path / "big")
    catalog_before, repo_before = outcome_snapshot(stored_first.catalog), listing(_repo(stored_first).root)
    task_id = stored_first.imports.start_import(runner, "Tools", "2.0", big)
    deadline = time.monotonic() + 60
    while stored_first.tasks.get_task(task_id).progress < 6 and time.monotonic() < deadline:
        time.sleep(0.02)  # wait until wimlib is writing the layer's WIM
    running = stored_first.tasks.get_task(task_id)
    assert running.state is TaskState.RUNNING and running.message == "Writing the layer's WIM"
    stored_first.tasks.cancel(task_id)
    assert runner.wait(task_id, 60) is TaskState.CANCELED
    assert outcome_snapshot(stored_first.catalog) == catalog_before
    assert listing(_repo(stored_first).root) == repo_before
    last = stored_first.audit.list_entries(limit=1)[0]
    assert (last.operation, last.object_name, last.comment) == ("layer.version.delete", "Tools:2.0",
                                                                "Import canceled")
    # The worker stopped wimlib itself (a polite cancel), it was not killed.
    assert "Import canceled; nothing was stored." in [line.text for line in stored_first.tasks.log(task_id)]
    shutil.rmtree(big)


def test_a_killed_worker_leaves_nothing_behind(stored_first: Services, runner: TaskRunner, tmp_path: Path) -> None:
    big = _big_folder(tmp_path / "big")
    catalog_before, repo_before = outcome_snapshot(stored_first.catalog), listing(_repo(stored_first).root)
    task_id = stored_first.imports.start_import(runner, "Tools", "2.0", big)
    deadline = time.monotonic() + 60
    while stored_first.tasks.get_task(task_id).progress < 6 and time.monotonic() < deadline:
        time.sleep(0.02)
    (worker,) = [p for p in psutil.Process().children(recursive=True) if "app.tasks.worker" in p.cmdline()]
    assert any(".partial" in path.name for path in _repo(stored_first).layers.iterdir())  # wimlib is writing
    worker.kill()  # no chance to clean up: the task must
    assert runner.wait(task_id, 60) is TaskState.FAILED
    assert "worker process" in (stored_first.tasks.get_task(task_id).error or "")
    assert outcome_snapshot(stored_first.catalog) == catalog_before
    assert listing(_repo(stored_first).root) == repo_before
    shutil.rmtree(big)


def test_cancel_right_after_submit_leaves_nothing_behind(stored_first: Services, runner: TaskRunner,
                                                         tmp_path: Path) -> None:
    catalog_before, repo_before = outcome_snapshot(stored_first.catalog), listing(_repo(stored_first).root)
    task_id = stored_first.imports.start_import(runner, "Tools", "2.0", make_tree(tmp_path / "s", {"a": b"a"}))
    stored_first.tasks.cancel(task_id)
    state = runner.wait(task_id, 60)
    if state is TaskState.COMPLETE:
        # The tiny import stored its version before the cancel reached it: the cancel came too late, and the
        # version is kept whole rather than undone.
        assert stored_first.layers.get_version("Tools:2.0").state is VersionState.DEPLOYABLE
        return
    assert state is TaskState.CANCELED
    assert outcome_snapshot(stored_first.catalog) == catalog_before
    assert listing(_repo(stored_first).root) == repo_before


class _Blocker(LayerDeskTask):
    """Keeps the runner's only worker busy until released."""

    kind: ClassVar[str] = "test.block"

    def __init__(self) -> None:
        super().__init__("block")
        self.release = threading.Event()

    def run(self, ctx: TaskContext) -> TaskResult:
        self.release.wait(30)
        return TaskResult()


def test_an_import_cancelled_before_it_started_leaves_nothing_behind(stored_first: Services,
                                                                     tmp_path: Path) -> None:
    runner = TaskRunner(stored_first.catalog, stored_first.caller, workers=1)
    blocker = _Blocker()
    try:
        runner.submit(blocker)
        catalog_before, repo_before = outcome_snapshot(stored_first.catalog), listing(_repo(stored_first).root)
        task_id = stored_first.imports.start_import(runner, "Tools", "2.0", make_tree(tmp_path / "s", {"a": b"a"}))
        assert stored_first.layers.get_version("Tools:2.0").state is VersionState.EDITING
        assert stored_first.tasks.cancel(task_id).state is TaskState.CANCELED  # still pending: canceled at once
        blocker.release.set()
        assert runner.wait(task_id, 30) is TaskState.CANCELED
        assert outcome_snapshot(stored_first.catalog) == catalog_before
        assert listing(_repo(stored_first).root) == repo_before
        last = stored_first.audit.list_entries(limit=1)[0]
        assert (last.operation, last.comment) == ("layer.version.delete", "Import canceled")
    finally:
        blocker.release.set()
        runner.shutdown()


def test_importing_needs_the_role_for_the_layers_type(layers: Services, services_for: ServicesFactory,
                                                      tmp_path: Path) -> None:
    app_admin = services_for(Role.MANAGE_APP_LAYERS, username="appadmin")
    runner = TaskRunner(app_admin.catalog, app_admin.caller)
    try:
        before = outcome_snapshot(layers.catalog)
        with pytest.raises(PermissionDenied, match="Manage OS Layers"):
            app_admin.imports.start_import(runner, "Win11", "1.0", tmp_path / "does-not-matter")
        assert outcome_snapshot(layers.catalog) == before
        denied = layers.audit.list_entries(limit=1)[0]
        assert (denied.operation, denied.user, denied.outcome.value) == ("layer.import", "appadmin", "denied")
        task = _import(app_admin, runner, "Tools", "1.0", make_tree(tmp_path / "t", {"t.exe": b"MZ"}))
        assert task.state is TaskState.COMPLETE, task.error
    finally:
        runner.shutdown()


GOLD_DISK_GUID = "5c0ffee0-1d1e-4a11-8b00-000000000001"
GOLD_PARTITIONS = {"esp": "5c0ffee0-1d1e-4a11-8b00-0000000000e5", "msr": "5c0ffee0-1d1e-4a11-8b00-00000000005e",
                   "data": "5c0ffee0-1d1e-4a11-8b00-0000000000da"}


def _gold_disk(tmp_path: Path, fmt: str) -> Path:
    """A GPT gold image (ESP, MSR, NTFS with ntoskrnl.exe) with known identities, in format ``fmt``."""
    import uuid

    from app.engine import disk
    from app.engine.wim import make_ntfs_volume

    layout = disk.gpt_layout(256 * 1024 * 1024)
    volume = make_ntfs_volume(tmp_path / "volume.ntfs", layout.data_size, partition_start_sector=layout.data_start_lba)
    payload = make_tree(tmp_path / "payload", {"ntoskrnl.exe": b"MZkernel"})
    run_ok("ntfscp", volume, payload / "ntoskrnl.exe", "ntoskrnl.exe")
    raw = tmp_path / "gold.raw"
    disk.build_gpt_disk(volume, raw, disk_size=256 * 1024 * 1024, disk_guid=uuid.UUID(GOLD_DISK_GUID),
                        partition_guids={role: uuid.UUID(g) for role, g in GOLD_PARTITIONS.items()})  # type: ignore[misc]
    return raw if fmt == "raw" else disk.convert(raw, tmp_path / f"gold.{fmt}", fmt)  # type: ignore[arg-type]


@pytest.mark.parametrize("fmt", ["vhdx", "vhd-dynamic", "vmdk-sparse", "raw"])
def test_import_the_windows_partition_of_a_disk_image(layers: Services, runner: TaskRunner, tmp_path: Path,
                                                      fmt: str) -> None:
    """A GPT disk (ESP, MSR, NTFS) in each format: the NTFS partition's files become the version, checked
    with wimlib-imagex (not our code); the repository keeps no copy of the extracted partition."""
    task = _import(layers, runner, "Win11", "1.0", _gold_disk(tmp_path, fmt))
    assert task.state is TaskState.COMPLETE, task.error
    wim = _repo(layers).wim_path(_layer_id(layers, "Win11"))
    assert wimlib_imagex_dir(wim, 1) == {"/", "/ntoskrnl.exe"}
    leftovers = [p for p in wim.parent.rglob("*") if p.name.startswith(".import-") or p.suffix == ".ntfs"]
    assert leftovers == []


def test_a_published_disk_keeps_the_os_gold_images_identities(layers: Services, runner: TaskRunner,
                                                              tmp_path: Path) -> None:
    """Windows finds its boot disk by these GUIDs: sgdisk (not our code) reads them off the published VHDX."""
    from app.catalog.models import DiskFormat
    from app.services.templates import TemplateSpec

    task = _import(layers, runner, "Win11", "1.0", _gold_disk(tmp_path, "vhdx"))
    assert task.state is TaskState.COMPLETE, task.error
    layers.templates.create_template("Gold", TemplateSpec(os="Win11:1.0", disk_format=DiskFormat.VHDX, size_gb=1))
    task_id = layers.publishing.publish(runner, "Gold", tmp_path / "out")
    assert runner.wait(task_id, 120) is TaskState.COMPLETE, layers.tasks.get_task(task_id).error
    (image,) = layers.publishing.list_images()
    raw = tmp_path / "published.raw"
    run_ok("qemu-img", "convert", "-O", "raw", image.location, raw)
    assert f"Disk identifier (GUID): {GOLD_DISK_GUID.upper()}" in run_ok("sgdisk", "-p", raw).stdout
    for number, role in ((1, "esp"), (2, "msr"), (3, "data")):
        info = run_ok("sgdisk", "-i", str(number), raw).stdout
        assert f"Partition unique GUID: {GOLD_PARTITIONS[role].upper()}" in info, info
