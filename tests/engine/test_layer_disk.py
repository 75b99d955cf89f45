"""Layer disks: a version written as its own VHDX/VHD (files with their ACLs, plus LayerDesk\\layer.json
with its deletions and registry delta) and read back. Checked with qemu-img, sgdisk, ntfsls/ntfscat,
libntfs-3g's security API and wimlib-imagex, not with our code."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from app.engine.layer_disk import LayerDiskError, read_layer_disk, write_layer_disk
from app.engine.registry.regfile import parse_reg_file
from app.engine.repository import CaptureSource, Deletion, LayerRepository, SourceKind
from app.engine.wim import Wim, make_ntfs_volume
from tests.support import ntfs_security as sec
from tests.support.compose_stack import TOOLS, os_layer
from tests.support.keyring_memory import MemoryKeyring
from tests.support.repository_checks import listing, make_tree
from tests.support.tools import run_ok, tool
from tests.unit.test_cli import Ctl

MiB = 1024 * 1024
ACL = [(sec.ADMINISTRATORS, sec.FULL_CONTROL), (sec.USERS, sec.READ_EXECUTE)]


def _ntfscat(volume: Path, path: str) -> bytes:
    return subprocess.run([tool("ntfscat"), str(volume), path], capture_output=True, check=True, timeout=60).stdout


@pytest.fixture
def stored(tmp_path: Path) -> tuple[LayerRepository, str]:
    files = make_tree(tmp_path / "files", {"Program Files/Viewer/viewer.exe": b"MZ viewer" * 100,
                                           "Program Files/Viewer/help/index.html": b"<html/>"})
    volume = make_ntfs_volume(tmp_path / "app.ntfs", 32 * MiB)
    with Wim.create("none") as wim:
        wim.extract_image_to_ntfs_volume(wim.add_image_from_folder(files, "x"), volume)
    sec.set_security(volume, "/Program Files/Viewer/viewer.exe", sec.security_descriptor(sec.SYSTEM, sec.SYSTEM, ACL))
    reg = tmp_path / "viewer.reg"
    reg.write_text('Windows Registry Editor Version 5.00\r\n\r\n[HKEY_LOCAL_MACHINE\\SOFTWARE\\Viewer]\r\n'
                   '"Version"="3.1"\r\n', encoding="utf-16")
    repository = LayerRepository(tmp_path / "repository").ensure()
    version = repository.store_version(5, 50, CaptureSource(SourceKind.NTFS_VOLUME, volume),
                                       deletions=[Deletion("Program Files\\Viewer\\old.dll")],
                                       delta=parse_reg_file(reg))
    return repository, version.checksum


@pytest.mark.parametrize("fmt", ["vhdx", "vhd-dynamic"])
def test_a_layer_disk_holds_the_files_acls_and_description(stored: tuple[LayerRepository, str], tmp_path: Path,
                                                           fmt: str) -> None:
    repository, checksum = stored
    out = tmp_path / f"Viewer-3.1.{'vhdx' if fmt == 'vhdx' else 'vhd'}"
    info = write_layer_disk(repository, 5, 50, checksum, out, layer_name="Viewer", layer_type="app",
                            version_name="3.1", fmt=fmt)  # type: ignore[arg-type]
    assert info.files == 2
    if fmt == "vhdx":
        run_ok("qemu-img", "check", out)
    raw = tmp_path / "disk.raw"
    run_ok("qemu-img", "convert", "-O", "raw", out, raw)
    table = run_ok("sgdisk", "-p", raw).stdout
    assert "Basic data partition" in table
    first = int(run_ok("sgdisk", "-i", "3", raw).stdout.split("First sector: ")[1].split()[0])
    last = int(run_ok("sgdisk", "-i", "3", raw).stdout.split("Last sector: ")[1].split()[0])
    volume = tmp_path / "back.ntfs"
    with raw.open("rb") as source, volume.open("wb") as target:
        source.seek(first * 512)
        target.write(source.read((last - first + 1) * 512))
    assert "viewer.exe" in run_ok("ntfsls", "-p", "/Program Files/Viewer", volume).stdout
    assert _ntfscat(volume, "/Program Files/Viewer/viewer.exe") == b"MZ viewer" * 100
    assert sec.dacl_entries(sec.get_security(volume, "/Program Files/Viewer/viewer.exe")) == ACL
    described = json.loads(_ntfscat(volume, "/LayerDesk/layer.json"))
    assert described["format"] == "layerdesk.layer-disk" and described["schema"] == 1
    assert described["layer"] == {"id": 5, "name": "Viewer", "type": "app"}
    assert described["version"] == {"id": 50, "name": "3.1", "checksum": checksum}
    assert described["deletions"] == [{"path": "Program Files\\Viewer\\old.dll", "opaque": False}]
    assert described["registry"]["operations"][0]["key"] == "Viewer"

    # read back: the same files, the description, and no LayerDesk folder in the captured image
    with Wim.create("none") as wim:
        index, back = read_layer_disk(out, wim, "v1", tmp_path)
        paths = {e.path for e in wim.iterate_dir_tree(index)}
        wim.write(tmp_path / "back.wim")
    assert back == info
    assert not any(p.lower().startswith("/layerdesk") for p in paths)
    original = set(run_ok("wimlib-imagex", "dir", repository.wim_path(5), "1").stdout.splitlines())
    assert set(run_ok("wimlib-imagex", "dir", tmp_path / "back.wim", "1").stdout.splitlines()) == original


def _plain_disk(tmp_path: Path, files: dict[str, bytes]) -> Path:
    from app.engine import disk

    layout = disk.gpt_layout(128 * MiB)
    volume = make_ntfs_volume(tmp_path / "plain.ntfs", layout.data_size, partition_start_sector=layout.data_start_lba)
    folder = make_tree(tmp_path / "plain", files)
    with Wim.create("none") as wim:
        wim.extract_image_to_ntfs_volume(wim.add_image_from_folder(folder, "x"), volume)
    raw = tmp_path / "plain.raw"
    disk.build_gpt_disk(volume, raw, disk_size=128 * MiB)
    return raw


@pytest.mark.parametrize(("files", "message"), [
    ({"data.txt": b"x"}, "is not a LayerDesk layer disk"),
    ({"data.txt": b"x", "LayerDesk/layer.json": b"{not json"}, "layer description .* is damaged"),
    ({"data.txt": b"x", "LayerDesk/layer.json": json.dumps({"format": "other"}).encode()}, "is damaged: not a"),
])
def test_disks_that_are_not_layer_disks_are_refused(tmp_path: Path, files: dict[str, bytes], message: str) -> None:
    with Wim.create("none") as wim, pytest.raises(LayerDiskError, match=message):
        read_layer_disk(_plain_disk(tmp_path, files), wim, "v1", tmp_path)


def test_a_changed_layer_disk_is_refused(stored: tuple[LayerRepository, str], tmp_path: Path) -> None:
    repository, checksum = stored
    out = tmp_path / "Viewer.vhdx"
    write_layer_disk(repository, 5, 50, checksum, out, layer_name="Viewer", layer_type="app", version_name="3.1")
    described = json.dumps({**json.loads(json.dumps(_description(repository, checksum))), "files": 7}).encode()
    tampered = _plain_disk(tmp_path, {"a.txt": b"a", "LayerDesk/layer.json": described})
    with Wim.create("none") as wim, pytest.raises(LayerDiskError, match="holds 1 files but its description says 7"):
        read_layer_disk(tampered, wim, "v1", tmp_path)
    with pytest.raises(LayerDiskError, match="never overwritten"):
        write_layer_disk(repository, 5, 50, checksum, out, layer_name="Viewer", layer_type="app", version_name="3.1")


def _description(repository: LayerRepository, checksum: str) -> dict[str, object]:
    manifest = repository.manifest(5, 50, checksum)
    return {"format": "layerdesk.layer-disk", "schema": 1, "layer": {"id": 5, "name": "Viewer", "type": "app"},
            "version": {"id": 50, "name": "3.1", "checksum": checksum}, "deletions": [],
            "registry": manifest.registry.to_dict(), "files": manifest.files, "data_bytes": manifest.data_bytes}


# --- layerctl layer export-disk, and a layer disk imported back as a version ------------------------------


def _volume_of(disk_image: Path, tmp_path: Path) -> Path:
    """The data partition of a layer disk, cut out with qemu-img and sgdisk (not our code)."""
    raw = tmp_path / f"{disk_image.stem}.raw"
    run_ok("qemu-img", "convert", "-O", "raw", disk_image, raw)
    info = run_ok("sgdisk", "-i", "3", raw).stdout
    first = int(info.split("First sector: ")[1].split()[0])
    last = int(info.split("Last sector: ")[1].split()[0])
    volume = tmp_path / f"{disk_image.stem}.ntfs"
    with raw.open("rb") as source, volume.open("wb") as target:
        source.seek(first * 512)
        target.write(source.read((last - first + 1) * 512))
    return volume


def _ntfs_files(volume: Path) -> set[str]:
    """Every file and folder of an NTFS volume as ntfsls lists them, ``/``-separated from the root."""
    found: set[str] = set()

    def walk(folder: str) -> None:
        names = run_ok("ntfsls", "-F", "-p", folder, volume).stdout.splitlines()
        for name in names:
            if name in ("./", "../") or not name.strip():
                continue
            path = f"{folder.rstrip('/')}/{name.rstrip('/')}"
            found.add(path)
            if name.endswith("/"):
                walk(path)

    walk("/")
    return found


def _wim_files(wim: Path, image: str) -> set[str]:
    return {line for line in run_ok("wimlib-imagex", "dir", wim, image).stdout.splitlines() if line != "/"}


@pytest.fixture
def layered(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
            memory_keyring: MemoryKeyring) -> Ctl:
    """A home with Win11 and Tools (whiteouts and a .reg file) imported from folders."""
    ctl = Ctl(tmp_path / "home", capsys, monkeypatch)
    sources = tmp_path / "sources"
    reg = TOOLS.reg_file(tmp_path)
    assert reg is not None
    for args in (("layer", "create", "--type", "os", "Win11"),
                 ("layer", "create", "--type", "app", "Tools", "--os-layer", "Win11"),
                 ("layer", "import", "Win11", "--version", "1", "--from", str(os_layer(tmp_path).folder(sources))),
                 ("layer", "import", "Tools", "--version", "1", "--from", str(TOOLS.folder(sources)),
                  "--registry", str(reg))):
        status, _, err = ctl(*args)
        assert status == 0, (args, err)
    return ctl


def _stored(ctl: Ctl, layer: str, version: str) -> tuple[Path, str, dict[str, object]]:
    shown = ctl.json("layer", "show", layer)
    assert isinstance(shown, dict)
    row = next(v for v in shown["versions"] if v["name"] == version)
    layer_id = shown["layer"]["id"]
    layers = ctl.home / "repository" / "layers"
    document = json.loads((layers / str(layer_id) / f"v{row['id']}.json").read_text(encoding="utf-8"))["manifest"]
    return layers / f"{layer_id}.wim", f"v{row['id']}", document


@pytest.mark.parametrize("suffix", ["vhdx", "vhd"])
def test_export_disk_then_import_gives_the_same_version(layered: Ctl, tmp_path: Path, suffix: str) -> None:
    out = tmp_path / f"Tools-1.{suffix}"
    result = layered.json("layer", "export-disk", "Tools:1", "--to", str(out), "--comment", "for the share")
    assert isinstance(result, dict) and result["path"] == str(out) and out.is_file()
    run_ok("qemu-img", "info", out)
    wim, image, original = _stored(layered, "Tools", "1")

    # the disk, read with ntfsls/ntfscat: the version's files plus LayerDesk\layer.json
    volume = _volume_of(out, tmp_path)
    on_disk = _ntfs_files(volume)
    assert on_disk - {"/LayerDesk", "/LayerDesk/layer.json"} == _wim_files(wim, image)
    described = json.loads(_ntfscat(volume, "/LayerDesk/layer.json"))
    assert described["deletions"] == original["deletions"] and described["registry"] == original["registry"]
    assert {d["path"] for d in described["deletions"]} == {"Windows\\Temp\\old.log", "ghost.txt"}

    status, _, err = layered("layer", "import", "Tools", "--version", "2", "--from", str(out))
    assert status == 0, err
    wim2, image2, imported = _stored(layered, "Tools", "2")
    assert imported["deletions"] == original["deletions"]
    assert imported["registry"] == original["registry"]
    assert (imported["files"], imported["data_bytes"]) == (original["files"], original["data_bytes"])
    assert _wim_files(wim2, image2) == _wim_files(wim, image)  # no LayerDesk folder among the files
    check = layered.json("repo", "check")
    assert isinstance(check, dict) and check["problems"] == []
    audit = layered.json("audit", "list", "--object", "Tools:1")
    assert isinstance(audit, list) and any(e["operation"] == "layer.export_disk" for e in audit)


def _layer_disk_shaped(tmp_path: Path, files: dict[str, bytes]) -> Path:
    """A disk laid out as layer disks are (36 MiB ESP, 1 MiB MSR) holding ``files``."""
    from app.engine import disk

    layout = disk.gpt_layout(64 * MiB, esp_size=36 * MiB, msr_size=MiB)
    volume = make_ntfs_volume(tmp_path / "odd.ntfs", layout.data_size, partition_start_sector=layout.data_start_lba)
    folder = make_tree(tmp_path / "odd", files)
    with Wim.create("none") as wim:
        wim.extract_image_to_ntfs_volume(wim.add_image_from_folder(folder, "x"), volume)
    raw = tmp_path / "odd.raw"
    disk.build_gpt_disk(volume, raw, disk_size=64 * MiB, esp_size=36 * MiB, msr_size=MiB)
    out = tmp_path / "odd.vhdx"
    run_ok("qemu-img", "convert", "-O", "vhdx", raw, out)
    return out


@pytest.mark.parametrize(("description", "message"), [
    (b'{"format": "layerdesk.layer-disk",\n "schema": 1,,}', "is damaged: Expecting property name enclosed in "
                                                            "double quotes at line 2, column 14"),
    (json.dumps({"format": "layerdesk.layer-disk", "schema": 9}).encode(), "layer disk schema 9 is not supported"),
])
def test_a_layer_disk_with_a_bad_description_is_not_imported(layered: Ctl, tmp_path: Path, description: bytes,
                                                             message: str) -> None:
    bad = _layer_disk_shaped(tmp_path, {"Tools/tool.exe": b"x", "LayerDesk/layer.json": description})
    before = layered.json("layer", "show", "Tools")
    repository = listing(layered.home / "repository")
    status, _, err = layered("layer", "import", "Tools", "--version", "2", "--from", str(bad))
    assert status != 0 and message in err and str(bad) in err, err
    assert layered.json("layer", "show", "Tools") == before
    assert {k: v for k, v in listing(layered.home / "repository").items() if not k.endswith(".lock")} == \
        {k: v for k, v in repository.items() if not k.endswith(".lock")}


def test_a_plain_disk_laid_out_like_a_layer_disk_is_imported_whole(layered: Ctl, tmp_path: Path) -> None:
    plain = _layer_disk_shaped(tmp_path, {"Tools/tool.exe": b"plain tool"})
    status, _, err = layered("layer", "import", "Tools", "--version", "2", "--from", str(plain))
    assert status == 0, err
    wim, image, document = _stored(layered, "Tools", "2")
    assert "/Tools/tool.exe" in _wim_files(wim, image) and document["deletions"] == []
