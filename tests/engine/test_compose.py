"""Compose: the conflict report and publishing a real stack to WIM, VHDX and raw, checked with tools that are not
ours (wimlib-imagex, qemu-img, sgdisk, dd + ntfsls/ntfscat, hivexget) against the stack's definition
(tests/support/compose_stack.py), never against the engine's own view."""

from __future__ import annotations

import logging
import re
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from regipy.registry import RegistryHive

from app.engine import publish_hives
from app.engine.compose import ComposeError, StackLayer, compose, conflicts
from app.engine.disk import DiskError
from app.engine.importer import scan_folder
from app.engine.registry.delta import RegistryDelta
from app.engine.registry.model import Hive, RegistryKey, ValueType
from app.engine.registry.regf import write_hive
from app.engine.registry.regfile import parse_reg_file
from app.engine.repository import CaptureSource, LayerRepository, SourceKind, image_name
from app.engine.wim import AddCommand, Wim
from app.tasks.base import CancelToken, TaskCanceled
from tests.support.compose_stack import (
    CITRIX,
    EXPECTED_CONFLICTS,
    EXPECTED_DIRS,
    EXPECTED_FILES,
    EXPECTED_PATH,
    OFFICE,
    TOOLS,
    LayerDef,
    os_layer,
)
from tests.support.image_checksum import image_checksum
from tests.support.tools import run_ok, small_filesystem, tool

MiB = 1024 * 1024


def store(repository: LayerRepository, root: Path, layer: LayerDef, layer_id: int) -> StackLayer:
    """Import ``layer`` as the import worker does: folder capture, whiteouts, .reg delta."""
    folder = layer.folder(root / "sources")
    scan = scan_folder(folder)
    reg = layer.reg_file(root)
    delta = parse_reg_file(reg) if reg is not None else RegistryDelta()
    stored = repository.store_version(layer_id, layer_id * 10, CaptureSource(SourceKind.FOLDER, folder),
                                      deletions=scan.deletions, delta=delta, drop=scan.markers)
    return StackLayer(layer.role, layer.name, layer_id, layer_id * 10, stored.checksum)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> tuple[LayerRepository, list[StackLayer]]:
    root = tmp_path_factory.mktemp("stack")
    repository = LayerRepository(root / "repository").ensure()
    layers = [os_layer(root), OFFICE, TOOLS, CITRIX]
    return repository, [store(repository, root, layer, n) for n, layer in enumerate(layers, 1)]


# --- independent readers ------------------------------------------------------------------------------


def output(*argv: str | Path) -> bytes:
    done = subprocess.run([tool(str(argv[0])), *map(str, argv[1:])], capture_output=True, check=False, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def wim_listing(wim_file: Path) -> set[str]:
    return {line for line in run_ok("wimlib-imagex", "dir", wim_file, "1").stdout.splitlines() if line}


def ntfs_listing(volume: Path) -> dict[str, str]:
    """Every path on the volume per ``ntfsls -R -F`` → "dir" or "file"."""
    found: dict[str, str] = {}
    current = ""
    for line in run_ok("ntfsls", "-R", "-F", volume).stdout.splitlines():
        if line.startswith("/") and line.endswith(":"):
            current = line[:-1].rstrip("/")
        elif line and line not in {"./", "../"}:
            path = f"{current}/{line.rstrip('/')}".lstrip("/")
            found[path] = "dir" if line.endswith("/") else "file"
    return found


def hive_value(hive: Path, key: str, name: str) -> str:
    return run_ok("hivexget", hive, key, name).stdout.rstrip("\n")


def check_hives(software: Path, system: Path) -> None:
    assert hive_value(software, "\\Vendor\\App", "Version") == "1.0"
    assert hive_value(software, "\\Vendor\\App", "InstallDir") == "C:\\Program Files\\Office"
    assert hive_value(software, "\\Vendor\\App", "Seats") == "42"
    assert hive_value(software, "\\Shared", "Owner") == "Tools"
    assert hive_value(software, "\\Microsoft\\Windows NT\\CurrentVersion", "ProductName") == "Windows 11 Pro"
    environment = "\\ControlSet001\\Control\\Session Manager\\Environment"
    assert hive_value(system, environment, "Path") == EXPECTED_PATH
    assert hive_value(system, environment, "OS") == "Windows_NT"


def expected_listing() -> dict[str, str]:
    found = dict.fromkeys(EXPECTED_DIRS, "dir")
    found.update(dict.fromkeys(EXPECTED_FILES, "file"))
    return found


# --- conflicts ----------------------------------------------------------------------------------------


def test_the_conflict_report_lists_exactly_the_expected_entries(
    stack: tuple[LayerRepository, list[StackLayer]],
) -> None:
    repository, layers = stack
    report = conflicts(layers, repository)
    assert [c.to_dict() for c in report] == EXPECTED_CONFLICTS
    assert [c.deleted for c in report] == [False, False, False, True, False]  # Tools' whiteout removes old.log


def test_conflicts_follow_the_stack_order(stack: tuple[LayerRepository, list[StackLayer]]) -> None:
    repository, (os_, office, tools, citrix) = stack
    swapped = [c.to_dict() for c in conflicts([os_, tools, office, citrix], repository)]
    assert {"kind": "file", "path": "Program Files\\OFFICE\\config.ini", "layers": ["Tools", "Office"],
            "winner": "Office"} in swapped
    assert {"kind": "registry", "path": "HKLM\\SOFTWARE\\Shared\\Owner", "layers": ["Tools", "Office"],
            "winner": "Office"} in swapped
    with pytest.raises(ComposeError, match="starts with its OS layer"):
        conflicts([office, os_], repository)


# --- publishing ---------------------------------------------------------------------------------------


def test_publish_to_wim(stack: tuple[LayerRepository, list[StackLayer]], tmp_path: Path) -> None:
    repository, layers = stack
    out = tmp_path / "out"
    out.mkdir()
    result = compose(layers, repository, out, "wim", 1, name="Gold_1")
    assert result.path == out / "Gold_1.wim" and sorted(p.name for p in out.iterdir()) == ["Gold_1.wim"]
    assert wim_listing(result.path) == {"/"} | {f"/{p}" for p in expected_listing()}
    extracted = tmp_path / "x"
    run_ok("wimlib-imagex", "apply", result.path, "1", extracted)
    for rel, data in EXPECTED_FILES.items():
        if data is not None:
            assert (extracted / rel).read_bytes() == data, rel
    config = extracted / "Windows/System32/config"
    check_hives(config / "SOFTWARE", config / "SYSTEM")
    assert result.files == len(EXPECTED_FILES)
    assert [c.to_dict() for c in result.conflicts] == EXPECTED_CONFLICTS
    assert result.checksum == image_checksum(result.path)
    again = compose(layers, repository, out, "wim", 1, name="Gold_2")
    assert again.manifest_digest == result.manifest_digest  # deterministic


def captured_at(repository: LayerRepository, layer: StackLayer) -> int:
    """When ``layer``'s version was captured, as ``wimlib-imagex info --xml`` shows its image's CREATIONTIME."""
    document = ET.fromstring(output("wimlib-imagex", "info", "--xml", repository.wim_path(layer.layer_id))
                             .decode("utf-16"))
    image = next(i for i in document.iter("IMAGE") if i.findtext("NAME") == image_name(layer.version_id))
    return int(image.findtext("CREATIONTIME/HIGHPART") or "", 16) << 32 | int(
        image.findtext("CREATIONTIME/LOWPART") or "", 16)


def key_times(hive: Path, *paths: str) -> list[int]:
    """Each key's last write time as regipy reads it from the key node."""
    opened = RegistryHive(str(hive))
    return [opened.get_key(path).header.last_modified for path in paths]


def test_the_keys_a_layer_changes_carry_the_time_its_version_was_captured(
        stack: tuple[LayerRepository, list[StackLayer]], tmp_path: Path) -> None:
    """A .reg file carries no times: the keys each layer's delta writes (and the keys new keys are made under)
    get the time the layer version was captured, the latest writer's when layers share a key; keys no layer
    changes keep theirs. So a publish is the same whenever it runs."""
    repository, (_os, office, tools, _citrix) = stack
    out = tmp_path / "out"
    out.mkdir()
    result = compose(stack[1], repository, out, "wim", 1, name="Stamped")
    extracted = tmp_path / "x"
    run_ok("wimlib-imagex", "apply", result.path, "1", extracted)
    config = extracted / "Windows/System32/config"
    office_time, tools_time = captured_at(repository, office), captured_at(repository, tools)
    assert office_time and tools_time and office_time != tools_time
    assert key_times(config / "SOFTWARE", "\\", "\\Vendor", "\\Vendor\\App", "\\Shared",
                     "\\Microsoft\\Windows NT\\CurrentVersion") == [
        office_time, office_time, office_time, tools_time, 0]
    assert key_times(config / "SYSTEM", "\\ControlSet001\\Control\\Session Manager\\Environment",
                     "\\Select") == [tools_time, 0]


def _partition_table(raw: Path) -> list[tuple[int, int, int, str, str]]:
    """(number, first sector, last sector, type code, name) per ``sgdisk -p``."""
    rows = []
    for line in run_ok("sgdisk", "-p", raw).stdout.splitlines():
        m = re.match(r"\s+(\d+)\s+(\d+)\s+(\d+)\s+\S+ \S+\s+([0-9A-F]{4})\s+(.*)", line)
        if m:
            rows.append((int(m[1]), int(m[2]), int(m[3]), m[4], m[5].strip()))
    return rows


def _check_disk(raw: Path, tmp_path: Path, disk_size: int) -> None:
    assert raw.stat().st_size == disk_size
    table = _partition_table(raw)
    assert [(n, code) for n, _, _, code, _ in table] == [(1, "EF00"), (2, "0C01"), (3, "0700")]
    _, first, last, _, _ = table[2]
    volume = tmp_path / "windows.ntfs"  # copied out by dd at sgdisk's offsets, not by our extractor
    run_ok("dd", f"if={raw}", f"of={volume}", "bs=512", f"skip={first}", f"count={last - first + 1}",
           "conv=sparse", "status=none")
    listing = {p: k for p, k in ntfs_listing(volume).items() if not p.startswith(("$", "System Volume Information"))}
    assert listing == expected_listing()
    for rel, data in EXPECTED_FILES.items():
        if data is not None:
            assert output("ntfscat", volume, "/" + rel) == data, rel
    hives = tmp_path / "hives"
    hives.mkdir()
    for name in ("SOFTWARE", "SYSTEM"):
        (hives / name).write_bytes(output("ntfscat", volume, f"/Windows/System32/config/{name}"))
    check_hives(hives / "SOFTWARE", hives / "SYSTEM")


def test_publish_to_vhdx_and_raw(stack: tuple[LayerRepository, list[StackLayer]], tmp_path: Path) -> None:
    repository, layers = stack
    out = tmp_path / "out"
    out.mkdir()
    result = compose(layers, repository, out, "vhdx", 1, name="Gold")
    assert sorted(p.name for p in out.iterdir()) == ["Gold.vhdx"]
    run_ok("qemu-img", "check", "-f", "vhdx", result.path)
    raw = tmp_path / "converted.raw"
    run_ok("qemu-img", "convert", "-f", "vhdx", "-O", "raw", result.path, raw)
    (tmp_path / "from-vhdx").mkdir()
    _check_disk(raw, tmp_path / "from-vhdx", 1024 * MiB)
    direct = compose(layers, repository, out, "raw", 1, name="Gold")
    assert direct.manifest_digest == result.manifest_digest
    (tmp_path / "from-raw").mkdir()
    _check_disk(direct.path, tmp_path / "from-raw", 1024 * MiB)


def test_the_hives_are_merged_in_a_child_process_beside_the_image(
    stack: tuple[LayerRepository, list[StackLayer]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A real SOFTWARE hive takes a second of Python to read, merge and write: a disk publish does it in a
    child process, from the OS layer's hives in the repository, once the layers' volumes are at hand. Here
    the layers are only merged once the new hive files exist (they would never appear if the registry merge
    waited for the merged image), hives opened in this process fail the test, and the disk carries the
    merged hives."""
    repository, layers = stack
    out = tmp_path / "out"
    out.mkdir()
    real_update = Wim.update_image

    def update(self: Wim, index: int, commands: Any, **kwargs: Any) -> None:
        if any(isinstance(c, AddCommand) and c.ntfs for c in commands):  # a layer being merged
            deadline = time.monotonic() + 30

            def both() -> bool:  # each new hive file appears whole (written aside, then renamed)
                return all(list(out.glob(f".*.work/hives/out/{hive}")) for hive in ("SOFTWARE", "SYSTEM"))

            while not both() and time.monotonic() < deadline:
                time.sleep(0.02)
            assert both(), "the hives were not merged before the layers"
        real_update(self, index, commands, **kwargs)

    def not_here(path: Path, **_: Any) -> None:
        raise AssertionError(f"{path} was opened in the publishing process")

    monkeypatch.setattr(Wim, "update_image", update)
    monkeypatch.setattr(publish_hives, "open_hive", not_here)
    result = compose(layers, repository, out, "raw", 1, name="Overlap")
    assert {"registry", "hives", "apply"} <= set(result.timings)
    _check_disk(result.path, tmp_path, 1024 * MiB)


def test_a_hive_file_a_layer_supplies_is_the_one_the_registry_changes_go_into(tmp_path: Path) -> None:
    """An app layer that brings its own SOFTWARE hive file replaces the OS layer's: the other layers' registry
    changes are merged into that file (extracted from the merged image), not into the OS layer's."""
    repository = LayerRepository(tmp_path / "repository").ensure()
    base = store(repository, tmp_path, os_layer(tmp_path), 1)
    own = Hive(RegistryKey("ROOT"), file_name="\\SystemRoot\\System32\\Config\\SOFTWARE")
    own.ensure("Brought").set_value("By", ValueType.SZ, "Hives layer\0".encode("utf-16-le"))
    write_hive(own, tmp_path / "own-software")
    brings = LayerDef("Hives", "app", {"Windows/System32/config/SOFTWARE": (tmp_path / "own-software").read_bytes()})
    layers = [base, store(repository, tmp_path, brings, 2), store(repository, tmp_path, OFFICE, 3)]
    out = tmp_path / "out"
    out.mkdir()
    result = compose(layers, repository, out, "wim", 1, name="Brought")
    extracted = tmp_path / "x"
    run_ok("wimlib-imagex", "extract", result.path, "1", "/Windows/System32/config/SOFTWARE",
           "/Windows/System32/config/SYSTEM", f"--dest-dir={extracted}")
    software = extracted / "SOFTWARE"
    assert hive_value(software, "\\Brought", "By") == "Hives layer"
    assert hive_value(software, "\\Vendor\\App", "Version") == "1.0"
    assert hive_value(software, "\\Shared", "Owner") == "Office"
    gone = subprocess.run([tool("hivexget"), software, "\\Microsoft\\Windows NT\\CurrentVersion", "ProductName"],
                          capture_output=True, text=True, check=False)
    assert gone.returncode != 0, gone.stdout  # the OS layer's SOFTWARE is not in the image any more


def test_os_hives_replaced_or_removed_by_layers_before_the_last_one(tmp_path: Path) -> None:
    """While the layers below the last one are merged, the OS image's SOFTWARE and SYSTEM hives are under
    other names (wimlib would otherwise decompress them after each layer to describe the image). A layer
    that replaces or removes them meanwhile still decides, as with the hives in place; without such layers
    the OS's hives are back, and wimlib still describes the image from them."""
    repository = LayerRepository(tmp_path / "repository").ensure()
    base = store(repository, tmp_path, os_layer(tmp_path), 1)
    replaces = LayerDef("NewSystem", "app", {"Windows/System32/config/SYSTEM": b"the layer's SYSTEM"})
    removes = LayerDef("NoSoftware", "app", {"Program Files/x.txt": b"x"},
                       whiteouts=["Windows/System32/config/SOFTWARE"])
    last = LayerDef("Last", "app", {"Program Files/z.txt": b"z"})
    middle = [store(repository, tmp_path, layer, n) for n, layer in enumerate((replaces, removes, last), 2)]
    out = tmp_path / "out"
    out.mkdir()
    changed = compose([base, *middle], repository, out, "wim", 1, name="Changed")
    listing = wim_listing(changed.path)
    assert "/Windows/System32/config/SOFTWARE" not in listing and "/Windows/System32/config/SYSTEM" in listing
    assert not [p for p in listing if ".layerdesk-" in p]
    extracted = tmp_path / "x"
    run_ok("wimlib-imagex", "apply", changed.path, "1", extracted)
    assert (extracted / "Windows/System32/config/SYSTEM").read_bytes() == b"the layer's SYSTEM"
    plain = compose([base, *[store(repository, tmp_path / "p", layer, n) for n, layer in
                             enumerate((OFFICE, last), 5)]], repository, out, "wim", 1, name="Plain")
    listing = wim_listing(plain.path)
    assert {"/Windows/System32/config/SOFTWARE", "/Windows/System32/config/SYSTEM"} <= listing
    assert not [p for p in listing if ".layerdesk-" in p]
    info = run_ok("wimlib-imagex", "info", plain.path, "1").stdout
    assert re.search(r"^Product Name:\s+Windows 11 Pro$", info, re.MULTILINE), info


# --- bad input ----------------------------------------------------------------------------------------


def test_registry_changes_without_os_hives_are_refused(stack: tuple[LayerRepository, list[StackLayer]],
                                                       tmp_path: Path) -> None:
    repository, layers = stack
    bare = store(repository, tmp_path, LayerDef("Bare", "os", {"Windows/win.ini": b"[fonts]"}), 9)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ComposeError, match=r"The OS layer Bare has no SOFTWARE hive .*Office, Tools need it"):
        compose([bare, *layers[1:]], repository, out, "wim", 1, name="Bare")
    assert list(out.iterdir()) == []


def test_a_disk_too_small_for_the_merged_layers(stack: tuple[LayerRepository, list[StackLayer]],
                                                 tmp_path: Path) -> None:
    repository, layers = stack
    big = store(repository, tmp_path, LayerDef("Big", "app", {"Big/blob.bin": bytes(120 * MiB)}), 8)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ComposeError, match=r"need about \d+ MiB .* a disk of 0.25 GB leaves \d+ MiB"):
        compose([*layers[:3], big], repository, out, "vhdx", 0.25, name="Small")
    assert list(out.iterdir()) == []
    with pytest.raises(DiskError, match="leaves no room"):
        compose(layers, repository, out, "vhdx", 0.1, name="Tiny")
    assert list(out.iterdir()) == []


@pytest.mark.parametrize(("fmt", "at"), [("wim", 50), ("vhdx", 50), ("vhdx", 80)])
def test_cancel_leaves_nothing_in_the_output_folder(stack: tuple[LayerRepository, list[StackLayer]], tmp_path: Path,
                                                    fmt: str, at: int) -> None:
    repository, layers = stack
    token = CancelToken()
    seen: list[float] = []

    def progress(percent: float, _message: str) -> None:
        seen.append(percent)
        if percent >= at:
            token.cancel()

    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(TaskCanceled):
        compose(layers, repository, out, fmt, 1, name="Gone", progress=progress, cancel=token)
    assert list(out.iterdir()) == [] and max(seen) >= at


def test_compose_refuses_what_it_cannot_write(stack: tuple[LayerRepository, list[StackLayer]], tmp_path: Path) -> None:
    repository, layers = stack
    with pytest.raises(ComposeError, match="Unknown output format"):
        compose(layers, repository, tmp_path, "iso", 1, name="x")
    with pytest.raises(ComposeError, match="does not exist"):
        compose(layers, repository, tmp_path / "missing", "wim", 1, name="x")
    (tmp_path / "taken.wim").write_bytes(b"keep")
    with pytest.raises(ComposeError, match="already exists"):
        compose(layers, repository, tmp_path, "wim", 1, name="taken")
    assert (tmp_path / "taken.wim").read_bytes() == b"keep"


@pytest.mark.parametrize(("fmt", "driver"), [("vhd-dynamic", "vpc"), ("qcow2", "qcow2"), ("vmdk-sparse", "vmdk")])
def test_publish_to_the_other_disk_formats(stack: tuple[LayerRepository, list[StackLayer]], tmp_path: Path,
                                           fmt: str, driver: str) -> None:
    repository, layers = stack
    out = tmp_path / "out"
    out.mkdir()
    result = compose(layers, repository, out, fmt, 1, name="Gold")
    if driver != "vpc":
        run_ok("qemu-img", "check", "-f", driver, result.path)
    raw = tmp_path / "converted.raw"
    run_ok("qemu-img", "convert", "-f", driver, "-O", "raw", result.path, raw)
    (tmp_path / "check").mkdir()
    _check_disk(raw, tmp_path / "check", 1024 * MiB)


def test_a_disk_image_is_assembled_around_the_volume_where_the_file_system_allows(
    stack: tuple[LayerRepository, list[StackLayer]], tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """On the machine's disk (ext4) the applied volume becomes the VHDX in place; on a tmpfs, which cannot
    move file blocks, the VHDX is streamed from it. Both read back the same through qemu-img, sgdisk and
    ntfs-3g's tools, and each checksum is the file's SHA-256."""
    repository, layers = stack
    out = tmp_path / "out"
    out.mkdir()
    caplog.set_level(logging.INFO, logger="app.engine.in_place")
    in_place = compose(layers, repository, out, "vhdx", 1, name="InPlace")
    assert any("(vhdx) assembled around the Windows volume in place" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with small_filesystem(tmp_path / "tmpfs", "256m") as small:
        streamed = compose(layers, repository, small, "vhdx", 1, name="Streamed")
        assert not any("in place" in r.getMessage() for r in caplog.records)
        assert any("cannot move file blocks" in r.getMessage() for r in caplog.records)
        assert streamed.manifest_digest == in_place.manifest_digest
        for number, result in enumerate((in_place, streamed)):
            assert result.checksum == image_checksum(result.path)
            run_ok("qemu-img", "check", "-f", "vhdx", result.path)
            raw = tmp_path / f"converted-{number}.raw"
            run_ok("qemu-img", "convert", "-f", "vhdx", "-O", "raw", result.path, raw)
            (tmp_path / f"read-{number}").mkdir()
            _check_disk(raw, tmp_path / f"read-{number}", 1024 * MiB)
            raw.unlink()
        assert sorted(p.name for p in small.iterdir()) == ["Streamed.vhdx"]
    assert sorted(p.name for p in out.iterdir()) == ["InPlace.vhdx"]
