"""Difference imports: a layer as what changed between two disks of a packaging machine.

The machine is built here as real NTFS volumes (mkntfs, wimlib) in real VHDX disks (qemu-img): a base, and an
"after" copy of it (captured from the base volume, so unchanged files keep their ACLs) with files added,
changed and deleted, a named stream added, a file replaced by a folder, changed hives (written with our regf
writer) and noise that must be left out. What the import stores is checked with tools that are not ours
(``wimlib-imagex dir``, ``ntfsls``/``ntfscat``, ``hivexget``) against expectations written out by hand from
the definitions below; publishing the OS layer plus the difference layer must give back the "after" tree.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from app.catalog.models import LayerType, Role, TaskState
from app.engine import disk
from app.engine.compose import StackLayer, compose
from app.engine.difference import DifferenceError, _compare, capture_difference, is_excluded
from app.engine.importer import ImportSourceError
from app.engine.registry.delta import CreateKey, DeleteKey, SetValue
from app.engine.registry.model import Hive, RegistryKey, ValueType
from app.engine.registry.regf import read_hive, write_hive
from app.engine.repository import Deletion
from app.engine.wim import AddCommand, DeleteCommand, DirEntry, Wim, make_ntfs_volume
from app.errors import LayerDeskError
from app.services import Services
from app.services.views import TaskInfo
from app.tasks.runner import TaskRunner
from tests.conftest import ServicesFactory
from tests.engine.test_wim import ntfs_cat, ntfs_tree, wimlib_imagex_dir
from tests.support.repository_checks import listing, make_tree, outcome_snapshot
from tests.support.tools import run_ok

MiB = 1024 * 1024
DISK_SIZE = 256 * MiB
SZ, EXPAND_SZ, DWORD, BINARY = int(ValueType.SZ), int(ValueType.EXPAND_SZ), int(ValueType.DWORD), int(ValueType.BINARY)
ENVIRONMENT = "ControlSet001\\Control\\Session Manager\\Environment"
ZONE = b"[ZoneTransfer]\r\nZoneId=3\r\n"


def sz(text: str) -> bytes:
    return (text + "\0").encode("utf-16-le")


def dword(number: int) -> bytes:
    return number.to_bytes(4, "little")


# --- the packaging machine, before and after -----------------------------------------------------------


def software(after: bool) -> Hive:
    hive = Hive(RegistryKey("ROOT"), file_name="\\SystemRoot\\System32\\Config\\SOFTWARE")
    hive.ensure("Microsoft\\Windows NT\\CurrentVersion").set_value("ProductName", SZ, sz("Windows 11 Pro"))
    hive.ensure("Shared").set_value("Owner", SZ, sz("App" if after else "OS"))
    if after:
        app = hive.ensure("Vendor\\App")
        app.set_value("Version", SZ, sz("1.0"))
        app.set_value("Seats", DWORD, dword(42))
        hive.ensure("Vendor\\App\\Plugins")  # an empty key
    else:
        hive.ensure("Legacy\\Old").set_value("x", DWORD, dword(1))
    return hive


def system(after: bool) -> Hive:
    hive = Hive(RegistryKey("ROOT"), file_name="\\SystemRoot\\System32\\Config\\SYSTEM")
    hive.ensure("Select").set_value("Current", DWORD, dword(1))
    path = "%SystemRoot%\\system32;%SystemRoot%" + (";C:\\Program Files\\App" if after else "")
    hive.ensure(ENVIRONMENT).set_value("Path", EXPAND_SZ, sz(path))
    hive.ensure(ENVIRONMENT).set_value("OS", SZ, sz("Windows_NT"))
    hive.ensure("RNG").set_value("Seed", BINARY, bytes([after]) * 76)  # rewritten at every boot: noise
    if after:
        hive.ensure("ControlSet001\\Services\\AppSvc").set_value("Start", DWORD, dword(2))
    return hive


def ntuser(after: bool) -> Hive:
    hive = Hive(RegistryKey("ROOT"), file_name="\\??\\C:\\Users\\Default\\NTUSER.DAT")
    hive.ensure("Control Panel\\Desktop").set_value("Wallpaper", SZ, sz(""))
    if after:
        hive.ensure("Software\\App").set_value("Theme", SZ, sz("dark"))
    return hive


def hive_bytes(hive: Hive, tmp: Path, name: str) -> bytes:
    write_hive(hive, tmp / name)
    return (tmp / name).read_bytes()


BASE_FILES: dict[str, bytes] = {
    "Windows/System32/config/SAM": b"sam v1",
    "Windows/notepad.exe": b"notepad v1",
    "Windows/System32/drivers/etc/hosts": b"127.0.0.1 localhost\r\n",
    "Windows/Temp/gone.log": b"old log",
    "Program Files/Common/shared.dll": b"shared v1",
    "Program Files/Common/data": b"a file that becomes a folder",
    "Program Files/Old/old.exe": b"old app",
    "Program Files/Old/sub/x.dat": b"x",
    "Users/Public/doc.txt": b"public doc",
    "Users/Public/notes.txt": b"notes",
    "pagefile.sys": bytes(4096),
}
#: Written over the base (a folder overlaid with wimlib), after AFTER_REMOVED is removed.
AFTER_CHANGES: dict[str, bytes] = {
    "Program Files/App/app.exe": b"MZ app",
    "Windows/notepad.exe": b"notepad v2",  # the same size as v1
    "Program Files/Common/shared.dll": b"shared v2",
    "Program Files/Common/data/part.bin": b"part",
    "Windows/System32/config/SAM": b"sam v2",  # machine state: left out
    "pagefile.sys": b"\1" * 4096,  # left out
    "System Volume Information/tracking.log": b"t",  # left out
}
AFTER_REMOVED = ["/Program Files/Old", "/Windows/Temp/gone.log", "/Program Files/Common/data"]

EXPECTED_ADDED = {"Program Files\\App\\app.exe", "Program Files\\Common\\data\\part.bin"}
EXPECTED_CHANGED = {"Windows\\notepad.exe", "Program Files\\Common\\shared.dll", "Users\\Public\\notes.txt"}
EXPECTED_DELETIONS = {Deletion("Windows\\Temp\\gone.log"), Deletion("Program Files\\Common\\data"),
                      Deletion("Program Files\\Old")}
EXPECTED_EXCLUDED = {"Windows\\System32\\config\\SOFTWARE", "Windows\\System32\\config\\SYSTEM",
                     "Windows\\System32\\config\\SAM", "Users\\Default\\NTUSER.DAT", "pagefile.sys",
                     "System Volume Information\\tracking.log"}
#: What the layer's image holds, per wimlib-imagex dir.
EXPECTED_LAYER_TREE = {
    "/", "/Program Files", "/Program Files/App", "/Program Files/App/app.exe", "/Program Files/App/Logs",
    "/Program Files/Common", "/Program Files/Common/shared.dll", "/Program Files/Common/data",
    "/Program Files/Common/data/part.bin", "/Windows", "/Windows/notepad.exe", "/Users", "/Users/Public",
    "/Users/Public/notes.txt",
}
#: The registry delta, in the order the hives and keys are walked (SOFTWARE, SYSTEM, then the default user).
EXPECTED_REGISTRY = [
    DeleteKey("SOFTWARE", "Legacy"),  # the root's deleted keys first, then its subkeys in order
    SetValue("SOFTWARE", "Shared", "Owner", SZ, sz("App")),
    CreateKey("SOFTWARE", "Vendor"),  # new keys without values of their own are created
    SetValue("SOFTWARE", "Vendor\\App", "Version", SZ, sz("1.0")),
    SetValue("SOFTWARE", "Vendor\\App", "Seats", DWORD, dword(42)),
    CreateKey("SOFTWARE", "Vendor\\App\\Plugins"),
    SetValue("SYSTEM", ENVIRONMENT, "Path", EXPAND_SZ,
             sz("%SystemRoot%\\system32;%SystemRoot%;C:\\Program Files\\App")),  # the RNG seed is noise
    CreateKey("SYSTEM", "ControlSet001\\Services"),
    SetValue("SYSTEM", "ControlSet001\\Services\\AppSvc", "Start", DWORD, dword(2)),
    CreateKey("NTUSER", "Software"),
    SetValue("NTUSER", "Software\\App", "Theme", SZ, sz("dark")),
]


@dataclass(frozen=True)
class Machine:
    base_volume: Path
    after_volume: Path
    base_disk: Path
    after_disk: Path


def _apply(wim: Wim, index: int, volume: Path) -> None:
    wim.extract_image_to_ntfs_volume(index, volume)


def build_machine(root: Path, *, extra: dict[str, bytes] | None = None, software_after: bytes | None = None
                  ) -> Machine:
    """The base and after volumes (partition-sized, so they also go into GPT disks) and both VHDX disks."""
    root.mkdir(parents=True, exist_ok=True)
    hives = root / "hives"
    hives.mkdir()
    base_tree = make_tree(root / "base-files", {
        **BASE_FILES, **(extra or {}),
        "Windows/System32/config/SOFTWARE": hive_bytes(software(False), hives, "SOFTWARE.before"),
        "Windows/System32/config/SYSTEM": hive_bytes(system(False), hives, "SYSTEM.before"),
        "Users/Default/NTUSER.DAT": hive_bytes(ntuser(False), hives, "NTUSER.before"),
    })
    changes = make_tree(root / "after-files", {
        **AFTER_CHANGES,
        "Windows/System32/config/SOFTWARE": software_after or hive_bytes(software(True), hives, "SOFTWARE.after"),
        "Windows/System32/config/SYSTEM": hive_bytes(system(True), hives, "SYSTEM.after"),
        "Users/Default/NTUSER.DAT": hive_bytes(ntuser(True), hives, "NTUSER.after"),
    })
    (changes / "Program Files/App/Logs").mkdir()  # a new, empty folder
    layout = disk.gpt_layout(DISK_SIZE)
    base_volume = make_ntfs_volume(root / "base.ntfs", layout.data_size, partition_start_sector=layout.data_start_lba)
    after_volume = make_ntfs_volume(root / "after.ntfs", layout.data_size,
                                    partition_start_sector=layout.data_start_lba)
    with Wim.create("none") as wim:
        _apply(wim, wim.add_image_from_folder(base_tree, "base"), base_volume)
    (root / "zone").write_bytes(ZONE)
    run_ok("ntfscp", "-N", "Zone.Identifier", base_volume, root / "zone", "/Users/Public/doc.txt")
    with Wim.create("none") as wim:  # a copy of the base volume (ACLs kept), then the changes
        index = wim.add_image_from_ntfs_volume(base_volume, "after")
        wim.update_image(index, [DeleteCommand(path) for path in AFTER_REMOVED])
        wim.update_image(index, [AddCommand(changes, "/", ntfs=False)])
        _apply(wim, index, after_volume)
    (root / "extra").write_bytes(b"extra")
    run_ok("ntfscp", "-N", "Extra", after_volume, root / "extra", "/Users/Public/notes.txt")  # only a new stream
    disks = []
    for volume in (base_volume, after_volume):
        raw = root / f"{volume.stem}.raw"
        disk.build_gpt_disk(volume, raw, disk_size=DISK_SIZE)
        run_ok("qemu-img", "convert", "-f", "raw", "-O", "vhdx", raw, root / f"{volume.stem}.vhdx")
        raw.unlink()
        disks.append(root / f"{volume.stem}.vhdx")
    return Machine(base_volume, after_volume, disks[0], disks[1])


@pytest.fixture(scope="module")
def machine(tmp_path_factory: pytest.TempPathFactory) -> Machine:
    return build_machine(tmp_path_factory.mktemp("machine"))


# --- the engine ----------------------------------------------------------------------------------------


def test_capture_difference_finds_exactly_what_changed(machine: Machine, tmp_path: Path) -> None:
    steps: list[tuple[float, str]] = []
    with capture_difference(machine.base_volume, machine.after_volume, tmp_path,
                            step=lambda f, m: steps.append((f, m))) as difference:
        assert set(difference.added) == EXPECTED_ADDED
        assert set(difference.changed) == EXPECTED_CHANGED
        assert set(difference.deletions) == EXPECTED_DELETIONS and len(difference.deletions) == 3
        assert set(difference.excluded) == EXPECTED_EXCLUDED
        assert difference.unchanged == 2  # hosts, doc.txt (with its stream)
        assert list(difference.registry) == EXPECTED_REGISTRY
        assert difference.hives == ("SOFTWARE", "SYSTEM", "NTUSER")
        with Wim.create("xpress") as out:
            difference.add_to(out, "v1")
            out.write(tmp_path / "layer.wim")
    assert wimlib_imagex_dir(tmp_path / "layer.wim", 1) == EXPECTED_LAYER_TREE
    run_ok("wimlib-imagex", "verify", tmp_path / "layer.wim")  # every file's data is there
    run_ok("wimlib-imagex", "extract", tmp_path / "layer.wim", "1", "/Program Files/App/app.exe",
           f"--dest-dir={tmp_path / 'x'}")
    assert (tmp_path / "x" / "app.exe").read_bytes() == AFTER_CHANGES["Program Files/App/app.exe"]
    assert [f for f, _ in steps] == sorted(f for f, _ in steps) and steps[-1] == (1.0, "Difference captured")
    assert not any(p.is_file() for p in tmp_path.rglob("*") if p.parent.name != "x" and p.name != "layer.wim")


def test_a_volume_against_itself_is_an_empty_layer(machine: Machine, tmp_path: Path) -> None:
    with capture_difference(machine.base_volume, machine.base_volume, tmp_path) as difference, \
            Wim.create("none") as out:
        assert (difference.added, difference.changed, difference.deletions, difference.excluded) == ((), (), (), ())
        assert len(difference.registry) == 0
        difference.add_to(out, "v1")
        assert [e.path for e in out.iterate_dir_tree(1)] == ["/"]


def test_the_timing_of_a_bigger_difference(tmp_path: Path) -> None:
    """2,000 files of 8 KiB on each side, 5 % changed: how long the comparison takes (printed with -s)."""
    files = {f"Data/d{n % 40}/f{n:04}.bin": os.urandom(8192) for n in range(2000)}
    base = _volume(tmp_path, "base", files, 64 * MiB)
    changed = {**files, **{f"Data/d{n % 40}/f{n:04}.bin": os.urandom(8192) for n in range(0, 2000, 20)}}
    after = _volume(tmp_path, "after", changed, 64 * MiB)
    started = time.monotonic()
    with capture_difference(base, after, tmp_path) as difference:
        assert (len(difference.changed), difference.unchanged, len(difference.added)) == (100, 1900, 0)
        print(f"\ndifference of 2 x 2000 files: {time.monotonic() - started:.2f} s; {difference.timings}")


def _volume(root: Path, name: str, files: dict[str, bytes], size: int) -> Path:
    volume = make_ntfs_volume(root / f"{name}.ntfs", size)
    with Wim.create("none") as wim:
        _apply(wim, wim.add_image_from_folder(make_tree(root / name, files), name), volume)
    return volume


def test_a_hive_on_one_side_only_or_unreadable_is_refused(tmp_path: Path) -> None:
    bare = _volume(tmp_path, "bare", {"Windows/notepad.exe": b"n"}, 16 * MiB)
    with_hive = _volume(tmp_path, "hive", {"Windows/notepad.exe": b"n", "Windows/System32/config/SOFTWARE":
                                           hive_bytes(software(False), tmp_path, "SOFTWARE")}, 16 * MiB)
    broken = _volume(tmp_path, "broken", {"Windows/notepad.exe": b"n",
                                          "Windows/System32/config/SOFTWARE": b"regf" + bytes(8188)}, 16 * MiB)
    with pytest.raises(DifferenceError, match=r"The new volume has the SOFTWARE hive \(Windows\\System32\\config"
                                              r"\\SOFTWARE\) but the base volume has not"):
        capture_difference(bare, with_hive, tmp_path / "w1")
    (tmp_path / "w2").mkdir()
    with pytest.raises(DifferenceError, match="Cannot compare the registry: the new volume's Windows"):
        capture_difference(with_hive, broken, tmp_path / "w2")


def test_what_is_left_out() -> None:
    for path in ("pagefile.sys", "HIBERFIL.SYS", "swapfile.sys", "System Volume Information/x/y",
                 "$RECYCLE.BIN/S-1-5-21/$I123", "Windows/System32/config/SAM", "windows/system32/CONFIG/software.LOG1",
                 "Windows/System32/config/TxR/x.blf", "Windows/System32/config/RegBack/SYSTEM",
                 "Users/Default/NTUSER.DAT", "Users/Default/ntuser.dat.LOG2",
                 "Users/Default/NTUSER.DAT{1c3e2b20-0000-0000-0000-000000000000}.TM.blf"):
        assert is_excluded(path, is_directory=False), path
    for path in ("Windows/System32/config/systemprofile/AppData/x.txt", "Users/Default/Desktop/NTUSER.DAT",
                 "Users/Bob/NTUSER.DAT", "Program Files/pagefile.sys", "Windows/System32/configs/SAM"):
        assert not is_excluded(path, is_directory=False), path
    assert not is_excluded("Windows/System32/config/systemprofile", is_directory=True)
    assert not is_excluded("Users/Default/NTUSER.DAT.d", is_directory=True)


def _entry(path: str, *, directory: bool = False, data: bytes = b"", attributes: int = 0x20, streams: tuple[
        tuple[str, bytes], ...] = (), security: bytes | None = b"sd", reparse: int = 0) -> DirEntry:
    import hashlib

    def digest(content: bytes) -> bytes:
        return hashlib.sha1(content).digest() if content else bytes(20)

    return DirEntry(path=path, is_directory=directory, size=len(data), attributes=0x10 if directory else attributes,
                    has_security_descriptor=security is not None, stream_names=tuple(n for n, _ in streams),
                    short_name=None, reparse_tag=reparse, link_count=1, inode_id=hash(path),
                    stream_hashes=(digest(data), *(digest(d) for _, d in streams)), security_descriptor=security)


def test_what_counts_as_a_change() -> None:
    base = [_entry("/", directory=True), _entry("/d", directory=True), _entry("/d/same", data=b"x"),
            _entry("/d/attr", data=b"x"), _entry("/d/acl", data=b"x"), _entry("/d/stream", data=b"x"),
            _entry("/d/streamdata", data=b"x", streams=(("s", b"1"),)), _entry("/d/reparse", data=b"x"),
            _entry("/d/case", data=b"x", streams=(("Zone", b"z"),)), _entry("/d/time", data=b"x")]
    after = [_entry("/", directory=True), _entry("/d", directory=True), _entry("/d/same", data=b"x"),
             _entry("/d/attr", data=b"x", attributes=0x21), _entry("/d/acl", data=b"x", security=b"other"),
             _entry("/d/stream", data=b"x", streams=(("s", b""),)),
             _entry("/d/streamdata", data=b"x", streams=(("s", b"2"),)), _entry("/d/reparse", data=b"x", reparse=1),
             _entry("/D/CASE", data=b"x", streams=(("ZONE", b"z"),)), _entry("/d/time", data=b"x")]
    plan = _compare(base, after)
    assert plan.changed == ["d\\attr", "d\\acl", "d\\stream", "d\\streamdata", "d\\reparse"]
    assert (plan.unchanged, plan.added, plan.deletions) == (3, [], [])
    assert plan.drop == ["/d/same", "/D/CASE", "/d/time"]  # "/d" stays: it holds changes


def test_unchanged_folders_go_whole_and_only_topmost_deletions_are_kept() -> None:
    def tree(*paths: str) -> list[DirEntry]:
        return [_entry("/", directory=True)] + [_entry(p.rstrip("/"), directory=p.endswith("/"), data=b"x")
                                                for p in paths]

    base = tree("/a/", "/a/b/", "/a/b/c", "/a/d", "/gone/", "/gone/x/", "/gone/x/y", "/f", "/dir/", "/dir/z")
    after = tree("/a/", "/a/b/", "/a/b/c", "/a/d", "/a/new/", "/f/", "/f/inside", "/dir")
    plan = _compare(base, after)
    assert plan.drop == ["/a/b", "/a/d"]  # /a stays for its new, empty folder; /a/b goes whole
    assert plan.deletions == [Deletion("gone"), Deletion("f"), Deletion("dir")]  # a kind change: deleted, added
    assert plan.added == ["f\\inside", "dir"]


# --- the import, end to end ----------------------------------------------------------------------------


@pytest.fixture
def runner(admin: Services) -> Iterator[TaskRunner]:
    runner = TaskRunner(admin.catalog, admin.caller, poll_s=0.05)
    yield runner
    runner.shutdown()


@pytest.fixture
def layers(admin: Services) -> Services:
    admin.imports.repository.ensure()
    admin.layers.create_layer("Win11", LayerType.OS)
    admin.layers.create_layer("App", LayerType.APP, os_layer="Win11")
    return admin


def _import(services: Services, runner: TaskRunner, layer: str, version: str, source: Path,
            **kw: object) -> TaskInfo:
    task_id = services.imports.start_import(runner, layer, version, source, **kw)  # type: ignore[arg-type]
    runner.wait(task_id, 300)
    return services.tasks.get_task(task_id)


def _stack(services: Services, *refs: tuple[str, str, str]) -> list[StackLayer]:
    stack = []
    for role, layer, version in refs:
        info = services.layers.get_version(f"{layer}:{version}")
        stack.append(StackLayer(role, layer, services.layers.get_layer(layer).layer.id, info.id, info.checksum))
    return stack


def _folded(hive: Hive) -> dict[str, object]:
    def walk(key: RegistryKey) -> dict[str, object]:
        return {"values": {n: (v.type, v.data) for n, v in key.values.items()},
                "keys": {n: walk(k) for n, k in key.subkeys.items()}}
    return walk(hive.root)


def test_a_difference_import_from_two_vhdx_disks_and_its_publish(layers: Services, runner: TaskRunner,
                                                                  machine: Machine, tmp_path: Path) -> None:
    base_task = _import(layers, runner, "Win11", "1", machine.base_volume)  # the OS layer: the base, whole
    assert base_task.state is TaskState.COMPLETE, base_task.error
    reg = tmp_path / "extra.reg"
    reg.write_text('REGEDIT4\r\n\r\n[HKEY_LOCAL_MACHINE\\SOFTWARE\\Shared]\r\n"Owner"="App (reg)"\r\n',
                   encoding="ascii")
    started = time.monotonic()
    task = _import(layers, runner, "App", "1", machine.after_disk, base=machine.base_disk, registry_files=[reg],
                   comment="packaged")
    assert task.state is TaskState.COMPLETE, task.error
    seconds = time.monotonic() - started
    log = [line.text for line in layers.tasks.log(task.id)]
    assert any(line.startswith("Difference from ") and "2 added, 3 changed, 2 unchanged files; 3 deletion(s); "
               "11 registry operation(s) from the SOFTWARE, SYSTEM, NTUSER hive(s)" in line for line in log), log
    assert any("6 changed file(s) left out" in line for line in log), log
    repo = layers.imports.repository
    app = layers.layers.get_layer("App").layer.id
    # independently: the layer's WIM holds exactly the added and changed files (and their folders)
    assert wimlib_imagex_dir(repo.wim_path(app), 1) == EXPECTED_LAYER_TREE
    assert "Extra" in run_ok("wimlib-imagex", "dir", repo.wim_path(app), "1", "--path=/Users/Public/notes.txt",
                             "--detailed").stdout
    version = layers.layers.get_version("App:1")
    manifest = repo.manifest(app, version.id, version.checksum)
    assert set(manifest.deletions) == EXPECTED_DELETIONS and len(manifest.deletions) == 3
    # the .reg file goes after the hives' difference (merged: its Owner replaces the difference's in place)
    with_reg = [SetValue("SOFTWARE", "Shared", "Owner", SZ, sz("App (reg)")) if getattr(op, "name", "") == "Owner"
                else op for op in EXPECTED_REGISTRY]
    assert list(manifest.registry) == with_reg
    assert (manifest.source.path, manifest.source.base) == (machine.after_disk, machine.base_disk)
    assert manifest.files == 5 and version.comment == "packaged"
    assert not any(p.name.startswith((".difference", ".import")) for p in repo.layers.iterdir())
    # publishing the OS layer plus the layer gives back the machine after the change
    out = tmp_path / "out"
    out.mkdir()
    stack = _stack(layers, ("os", "Win11", "1"), ("app", "App", "1"))
    result = compose(stack, repo, out, "wim", 1, name="Check")
    published = {line for line in run_ok("wimlib-imagex", "dir", result.path, "1").stdout.splitlines() if line}
    after_tree = {p.rstrip("/") for p in ntfs_tree(machine.after_volume)}
    left_out = {"/System Volume Information", "/System Volume Information/tracking.log"}
    assert published == {"/"} | (after_tree - left_out), (published ^ ({"/"} | after_tree))
    extracted = tmp_path / "published"
    run_ok("wimlib-imagex", "apply", result.path, "1", extracted)
    for path in sorted(after_tree - left_out):
        local = extracted / path.lstrip("/")
        if local.is_dir() or "/config/" in path or path.endswith("NTUSER.DAT"):
            continue
        if path in ("/pagefile.sys", "/Windows/System32/config/SAM"):
            assert local.read_bytes() == BASE_FILES[path.lstrip("/")], path  # left out: the OS layer's
        else:
            assert local.read_bytes() == ntfs_cat(machine.after_volume, path), path
    config = extracted / "Windows/System32/config"
    expected_software = software(True)
    expected_software.ensure("Shared").set_value("Owner", SZ, sz("App (reg)"))
    assert _folded(read_hive(config / "SOFTWARE")) == _folded(expected_software)
    expected_system = system(True)
    expected_system.ensure("RNG").set_value("Seed", BINARY, bytes(76))  # the noise stays the OS layer's
    assert _folded(read_hive(config / "SYSTEM")) == _folded(expected_system)
    assert _folded(read_hive(extracted / "Users/Default/NTUSER.DAT")) == _folded(ntuser(True))
    assert run_ok("hivexget", config / "SOFTWARE", "\\Vendor\\App", "Seats").stdout.strip() == "42"
    assert run_ok("hivexget", config / "SYSTEM", f"\\{ENVIRONMENT}", "Path").stdout.strip() == \
        "%SystemRoot%\\system32;%SystemRoot%;C:\\Program Files\\App"
    print(f"\ndifference import of two {DISK_SIZE // MiB} MiB VHDX disks: {seconds:.1f} s")


# --- refused and failed imports leave nothing behind ---------------------------------------------------


@pytest.fixture
def stored_first(layers: Services, runner: TaskRunner, tmp_path: Path) -> Services:
    task = _import(layers, runner, "App", "0", make_tree(tmp_path / "first", {"App/a.txt": b"a"}))
    assert task.state is TaskState.COMPLETE, task.error
    return layers


def _no_ntfs_disk(tmp_path: Path) -> Path:
    raw = tmp_path / "esp-only.raw"
    with raw.open("wb") as file:
        file.truncate(64 * MiB)
    run_ok("sgdisk", "-n", "1:2048:+16M", "-t", "1:ef00", raw)
    run_ok("qemu-img", "convert", "-f", "raw", "-O", "vhdx", raw, tmp_path / "esp-only.vhdx")
    return tmp_path / "esp-only.vhdx"


def _bad_bases(tmp_path: Path, machine: Machine) -> dict[str, tuple[Callable[[Services, TaskRunner], object], str]]:
    text = tmp_path / "notes.txt"
    text.write_text("not a disk", encoding="utf-8")
    folder = make_tree(tmp_path / "folder", {"a.txt": b"a"})
    wim_file = tmp_path / "one.wim"
    run_ok("wimlib-imagex", "capture", folder, wim_file, "only")
    no_ntfs = _no_ntfs_disk(tmp_path)

    def start(source: Path, base: Path, layer: str = "App") -> Callable[[Services, TaskRunner], object]:
        return lambda s, r: s.imports.start_import(r, layer, "2", source, base=base)

    return {
        "base not a disk": (start(machine.after_disk, text),
                            f"The base cannot be used: {text} is not a folder, a WIM file or an NTFS volume image"),
        "base a folder": (start(machine.after_disk, folder), f"The base {folder} is a folder; --base takes a disk"),
        "base a wim": (start(machine.after_disk, wim_file), f"The base {wim_file} is a WIM file; --base takes a disk"),
        "base missing": (start(machine.after_disk, tmp_path / "none.vhdx"), "does not exist"),
        "base without ntfs": (start(machine.after_disk, no_ntfs),
                              f"The base disk {no_ntfs} cannot be used: The disk has no NTFS data partition"),
        "folder source": (start(folder, machine.base_disk),
                          f"--base only applies to disk images and NTFS volume images (the machine after the "
                          f"change), but {folder} is a folder."),
        "same file": (start(machine.base_disk, machine.base_disk), "are the same file"),
        "os layer": (start(machine.after_disk, machine.base_disk, "Win11"),
                     "Win11 is an OS layer: it is imported whole, never as a difference"),
    }


@pytest.mark.parametrize("case", ["base not a disk", "base a folder", "base a wim", "base missing",
                                  "base without ntfs", "folder source", "same file", "os layer"])
def test_bad_bases_are_refused_with_one_clear_message_and_nothing_behind(
    stored_first: Services, runner: TaskRunner, machine: Machine, tmp_path: Path, case: str,
) -> None:
    action, fragment = _bad_bases(tmp_path, machine)[case]
    catalog_before, repo_before = outcome_snapshot(stored_first.catalog), listing(stored_first.imports.repository.root)
    tasks_before = stored_first.tasks.list_tasks()
    with pytest.raises(ImportSourceError) as caught:
        action(stored_first, runner)
    message = str(caught.value)
    assert fragment in message and "\n" not in message, message
    assert outcome_snapshot(stored_first.catalog) == catalog_before
    assert listing(stored_first.imports.repository.root) == repo_before
    assert stored_first.tasks.list_tasks() == tasks_before


def test_a_difference_that_fails_in_the_worker_leaves_nothing_behind(stored_first: Services, runner: TaskRunner,
                                                                      tmp_path: Path) -> None:
    broken = build_machine(tmp_path / "m", software_after=b"regf" + bytes(8188))  # a damaged hive after
    catalog_before, repo_before = outcome_snapshot(stored_first.catalog), listing(stored_first.imports.repository.root)
    task = _import(stored_first, runner, "App", "2", broken.after_volume, base=broken.base_volume)
    assert task.state is TaskState.FAILED
    assert (task.error or "").startswith("Cannot compare the registry: the new volume's Windows\\System32\\config"
                                         "\\SOFTWARE") and "\n" not in (task.error or "")
    assert outcome_snapshot(stored_first.catalog) == catalog_before
    assert listing(stored_first.imports.repository.root) == repo_before


@pytest.fixture
def big_machine(tmp_path: Path) -> tuple[Path, Path]:
    """Two volumes with 96 MiB of incompressible files each: wimlib needs a moment to read them."""
    files = {f"Data/d{n % 8}/f{n}.bin": os.urandom(MiB) for n in range(96)}
    base = _volume(tmp_path, "big-base", files, 256 * MiB)
    files.update({f"Data/d{n % 8}/f{n}.bin": os.urandom(MiB) for n in range(0, 96, 2)})
    return base, _volume(tmp_path, "big-after", files, 256 * MiB)


def _wait_for(services: Services, task_id: int, message: str) -> None:
    deadline = time.monotonic() + 60
    while services.tasks.get_task(task_id).message != message and time.monotonic() < deadline:
        time.sleep(0.01)
    running = services.tasks.get_task(task_id)
    assert running.state is TaskState.RUNNING and running.message == message, running


@pytest.mark.parametrize("how", ["cancel", "kill"])
def test_a_cancelled_or_killed_difference_import_leaves_nothing_behind(
    stored_first: Services, runner: TaskRunner, big_machine: tuple[Path, Path], how: str,
) -> None:
    base, after = big_machine
    repo = stored_first.imports.repository
    catalog_before, repo_before = outcome_snapshot(stored_first.catalog), listing(repo.root)
    task_id = stored_first.imports.start_import(runner, "App", "2", after, base=base)
    _wait_for(stored_first, task_id, "Reading both volumes' files")
    if how == "cancel":
        stored_first.tasks.cancel(task_id)
        assert runner.wait(task_id, 60) is TaskState.CANCELED
        assert "Import canceled; nothing was stored." in [line.text for line in stored_first.tasks.log(task_id)]
    else:
        (worker,) = [p for p in psutil.Process().children(recursive=True) if "app.tasks.worker" in p.cmdline()]
        assert any(p.name.startswith(".difference-") for p in repo.layers.iterdir())
        worker.kill()
        assert runner.wait(task_id, 60) is TaskState.FAILED
    assert outcome_snapshot(stored_first.catalog) == catalog_before
    assert listing(repo.root) == repo_before


def test_a_difference_import_needs_the_layer_role(layers: Services, services_for: ServicesFactory,
                                                   machine: Machine) -> None:
    reader = services_for(Role.READ_ONLY, username="reader")
    runner = TaskRunner(reader.catalog, reader.caller)
    try:
        with pytest.raises(LayerDeskError, match="Manage App Layers"):
            reader.imports.start_import(runner, "App", "1", machine.after_disk, base=machine.base_disk)
    finally:
        runner.shutdown()


def test_the_manifest_of_a_plain_import_has_no_base(layers: Services, runner: TaskRunner, tmp_path: Path) -> None:
    task = _import(layers, runner, "App", "1", make_tree(tmp_path / "s", {"a": b"a"}))
    assert task.state is TaskState.COMPLETE, task.error
    repo = layers.imports.repository
    manifest_file = repo.manifest_path(layers.layers.get_layer("App").layer.id, layers.layers.get_version("App:1").id)
    assert '"base"' not in manifest_file.read_text(encoding="utf-8")  # older manifests and readers are unaffected
