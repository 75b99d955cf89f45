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
from tests.support.repository_checks import make_tree
from tests.support.tools import run_ok, tool

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
