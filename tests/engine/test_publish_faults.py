"""Publishing with what real layers bring: files captured from NTFS volumes keep their ACLs, attributes
and named streams through a publish; a damaged OS hive and a disk that fills up during the publish each
give one clear message and leave nothing in the output folder. Read back with ntfsls/ntfscat,
ntfssecaudit and libntfs-3g's security API, not with our code."""

from __future__ import annotations

import contextlib
import lzma
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from app.engine import compose as compose_module
from app.engine import in_place
from app.engine.compose import ComposeError, StackLayer, compose
from app.engine.disk import DiskError
from app.engine.publish_hives import PendingHives
from app.engine.registry.regf import serialize_hive, write_hive
from app.engine.repository import CaptureSource, LayerRepository, SourceKind
from app.engine.wim import AddCommand, Wim, make_ntfs_volume
from app.errors import LayerDeskError, UserError
from tests.engine.test_compose import store
from tests.engine.test_hive import walk_cells
from tests.support import ntfs_security as sec
from tests.support.compose_stack import LayerDef, os_layer, software_hive, system_hive
from tests.support.repository_checks import make_tree
from tests.support.tools import loop_filesystem, run_ok, small_filesystem, tool

MiB = 1024 * 1024
HIVES = Path(__file__).parents[2].parent / "shared" / "testdata" / "hives"
APP_ACL = [(sec.ADMINISTRATORS, sec.FULL_CONTROL), (sec.USERS, sec.READ_EXECUTE)]
ZONE = b"[ZoneTransfer]\r\nZoneId=3\r\n"
HIDDEN, SYSTEM_ATTR = 0x2, 0x4


def _ntfscat(volume: Path, path: str, stream: str | None = None) -> bytes:
    argv = [tool("ntfscat"), *(["-n", stream] if stream else []), str(volume), path]
    return subprocess.run(argv, capture_output=True, check=True, timeout=60).stdout


def _app_volume(tmp: Path) -> Path:
    """An app layer as captured from an NTFS volume: an ACL, a named stream, hidden+system attributes."""
    files = make_tree(tmp / "app-files", {"Program Files/Secure/app.exe": b"MZ secure app",
                                          "Program Files/Secure/license.key": b"KEY"})
    volume = make_ntfs_volume(tmp / "app.ntfs", 32 * MiB)
    with Wim.create("none") as wim:
        wim.extract_image_to_ntfs_volume(wim.add_image_from_folder(files, "app"), volume)
    sec.set_security(volume, "/Program Files/Secure/app.exe",
                     sec.security_descriptor(sec.ADMINISTRATORS, sec.ADMINISTRATORS, APP_ACL))
    sec.set_attributes(volume, "/Program Files/Secure/license.key", HIDDEN | SYSTEM_ATTR)
    (tmp / "zone").write_bytes(ZONE)
    run_ok("ntfscp", "-N", "Zone.Identifier", volume, tmp / "zone", "/Program Files/Secure/app.exe")
    return volume


def test_acls_attributes_and_streams_of_ntfs_layers_survive_a_publish(tmp_path: Path) -> None:
    repository = LayerRepository(tmp_path / "repository").ensure()
    base = store(repository, tmp_path, os_layer(tmp_path), 1)
    stored = repository.store_version(2, 20, CaptureSource(SourceKind.NTFS_VOLUME, _app_volume(tmp_path)))
    stack = [base, StackLayer("app", "Secure", 2, 20, stored.checksum)]
    (tmp_path / "out").mkdir()
    result = compose(stack, repository, tmp_path / "out", "raw", 1, name="secure")
    volume = tmp_path / "windows.ntfs"
    start = int(run_ok("sgdisk", "-i", "3", result.path).stdout.split("First sector: ")[1].split()[0])
    with result.path.open("rb") as disk, volume.open("wb") as out:
        disk.seek(start * 512)
        out.write(disk.read(result.size_bytes - start * 512 - 33 * 512))
    descriptor = sec.get_security(volume, "/Program Files/Secure/app.exe")
    assert sec.owner_sid(descriptor) == sec.ADMINISTRATORS and sec.dacl_entries(descriptor) == APP_ACL
    assert "Windows owner S-1-5-32-544" in run_ok("ntfssecaudit", volume, "/Program Files/Secure/app.exe").stdout
    assert _ntfscat(volume, "/Program Files/Secure/app.exe") == b"MZ secure app"
    assert _ntfscat(volume, "/Program Files/Secure/app.exe", "Zone.Identifier") == ZONE
    assert sec.get_attributes(volume, "/Program Files/Secure/license.key") & (HIDDEN | SYSTEM_ATTR) == \
        HIDDEN | SYSTEM_ATTR


def test_a_damaged_os_hive_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    repository = LayerRepository(tmp_path / "repository").ensure()
    broken = LayerDef("Win11", "os", {
        "Windows/System32/config/SYSTEM": lzma.decompress((HIVES / "corrupted_system_hive.xz").read_bytes()),
        "Windows/System32/config/SOFTWARE": b"regf" + bytes(100),
    })
    app = LayerDef("Tools", "app", {"tool.exe": b"MZ"}, reg=(
        "[HKEY_LOCAL_MACHINE\\SOFTWARE\\Tools]\r\n\"On\"=dword:00000001\r\n\r\n"))
    stack = [store(repository, tmp_path, broken, 1), store(repository, tmp_path, app, 2)]
    (tmp_path / "out").mkdir()
    with pytest.raises(ComposeError) as caught:
        compose(stack, repository, tmp_path / "out", "wim", 1, name="broken")
    message = str(caught.value)
    assert "OS layer Win11" in message and "SOFTWARE hive" in message and "cannot be used" in message
    assert os.listdir(tmp_path / "out") == []


def _damaged_system_stack(repository: LayerRepository, tmp_path: Path) -> list[StackLayer]:
    broken = LayerDef("Win11", "os", {
        "Windows/System32/config/SYSTEM": lzma.decompress((HIVES / "corrupted_system_hive.xz").read_bytes()),
    })
    app = LayerDef("Tools", "app", {"tool.exe": b"MZ"}, reg=(
        "[HKEY_LOCAL_MACHINE\\SYSTEM\\CurrentControlSet\\Services\\Tools]\r\n\"Start\"=dword:00000002\r\n\r\n"))
    return [store(repository, tmp_path, broken, 1), store(repository, tmp_path, app, 2)]


def _publish_is_refused(stack: list[StackLayer], repository: LayerRepository, tmp_path: Path) -> None:
    """Publishing ``stack`` fails with the damaged SYSTEM hive's message and leaves nothing behind."""
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ComposeError) as caught:
        compose(stack, repository, out, "vhdx", 1, name="broken")
    message = str(caught.value)
    assert "OS layer Win11" in message and "SYSTEM hive" in message and "cannot be used" in message
    assert os.listdir(out) == []
    assert repository.check() == []


def test_a_damaged_os_hive_found_while_the_layers_merge_stops_the_publish_before_the_apply(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The registry merge runs in a child process beside the merge of the layers. Its failure only counts once
    the merged image is known to hold the OS layer's hive (a layer could have replaced it): then the publish
    stops before the image is applied, with the hive's message."""
    repository = LayerRepository(tmp_path / "repository").ensure()
    stack = _damaged_system_stack(repository, tmp_path)
    started: list[PendingHives] = []
    applies: list[str] = []
    real_start, real_update, real_extract = PendingHives.start, Wim.update_image, Wim.extract_image_to_ntfs_volume

    def start(*args: Any, **kwargs: Any) -> PendingHives:
        started.append(real_start(*args, **kwargs))
        return started[-1]

    def update(self: Wim, index: int, commands: Any, **kwargs: Any) -> None:
        if any(isinstance(c, AddCommand) for c in commands):  # a layer being merged: once the merge failed
            deadline = time.monotonic() + 20
            while not (started and started[0].failure) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert started and started[0].failure is not None
        real_update(self, index, commands, **kwargs)

    def extract(self: Wim, index: int, volume: Path, **kwargs: Any) -> None:
        applies.append(volume.name)
        real_extract(self, index, volume, **kwargs)

    monkeypatch.setattr(PendingHives, "start", start)
    monkeypatch.setattr(Wim, "update_image", update)
    monkeypatch.setattr(Wim, "extract_image_to_ntfs_volume", extract)
    _publish_is_refused(stack, repository, tmp_path)
    assert "windows.ntfs" not in applies


def test_a_damaged_os_hive_found_while_the_image_is_applied_stops_the_apply(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A registry merge that fails while the image is being applied stops the apply at once (here the merge
    only starts once the apply has begun, and the apply waits to be told to stop) and its message is the
    error, not a cancel."""
    repository = LayerRepository(tmp_path / "repository").ensure()
    stack = _damaged_system_stack(repository, tmp_path)
    applying = threading.Event()
    applies: list[str] = []
    real_run, real_extract = PendingHives._run, Wim.extract_image_to_ntfs_volume

    def run(self: PendingHives) -> None:
        assert applying.wait(20)
        real_run(self)

    def extract(self: Wim, index: int, volume: Path, **kwargs: Any) -> None:
        if volume.name != "windows.ntfs":  # a layer being staged
            real_extract(self, index, volume, **kwargs)
            return
        applies.append("started")
        applying.set()
        cancel = kwargs["cancel"]
        deadline = time.monotonic() + 20
        while not cancel.cancelled and time.monotonic() < deadline:
            time.sleep(0.01)
        real_extract(self, index, volume, **kwargs)
        applies.append("finished")

    monkeypatch.setattr(PendingHives, "_run", run)
    monkeypatch.setattr(Wim, "extract_image_to_ntfs_volume", extract)
    _publish_is_refused(stack, repository, tmp_path)
    assert applies == ["started"]  # stopped, not finished


def test_a_damaged_os_hive_that_a_layer_replaces_does_not_stop_the_publish(tmp_path: Path) -> None:
    """The registry merge starts from the OS layer's hives before the layers are merged. When a layer brings
    its own hive file in place of a damaged one, the changes go into the layer's file and the publish
    works."""
    repository = LayerRepository(tmp_path / "repository").ensure()
    os_def = os_layer(tmp_path)
    os_def.files["Windows/System32/config/SOFTWARE"] = b"regf" + bytes(100)
    good = tmp_path / "good-software"
    write_hive(software_hive(), good)
    brings = LayerDef("Hives", "app", {"Windows/System32/config/SOFTWARE": good.read_bytes()})
    changes = LayerDef("Tools", "app", {"tool.exe": b"MZ"}, reg=(
        "[HKEY_LOCAL_MACHINE\\SOFTWARE\\Tools]\r\n\"On\"=dword:00000001\r\n\r\n"))
    stack = [store(repository, tmp_path, os_def, 1), store(repository, tmp_path, brings, 2),
             store(repository, tmp_path, changes, 3)]
    (tmp_path / "out").mkdir()
    result = compose(stack, repository, tmp_path / "out", "wim", 1, name="replaced")
    extracted = tmp_path / "x"
    run_ok("wimlib-imagex", "extract", result.path, "1", "/Windows/System32/config/SOFTWARE",
           f"--dest-dir={extracted}")
    software = extracted / "SOFTWARE"
    assert run_ok("hivexget", software, "\\Tools", "On").stdout.strip() == "1"
    assert run_ok("hivexget", software, "\\Shared", "Owner").stdout.strip() == "OS"


def test_a_disk_that_fills_up_during_the_publish(tmp_path: Path) -> None:
    repository = LayerRepository(tmp_path / "repository").ensure()
    big = LayerDef("Big", "app", {f"Program Files/Big/blob{i}.bin": os.urandom(4 * MiB) for i in range(12)})
    stack = [store(repository, tmp_path, os_layer(tmp_path), 1), store(repository, tmp_path, big, 2)]
    with small_filesystem(tmp_path / "small", "40m") as out:
        with pytest.raises(LayerDeskError) as caught:  # where it runs out depends on the file system's layout
            compose(stack, repository, out, "vhdx", 1, name="full")
        assert "no space is left on its device" in str(caught.value), caught.value
        assert os.listdir(out) == []  # no image, no work folder
    # the repository is intact: the same stack publishes elsewhere
    (tmp_path / "out").mkdir()
    assert compose(stack, repository, tmp_path / "out", "wim", 1, name="fine").files > 12


def test_a_disk_that_fills_up_while_the_image_is_assembled_in_place(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """On a real ext4, where the image is built around the applied volume: another writer takes nearly all
    the free space right before that (a file fills the disk). One clear message, nothing left in the output
    folder, and the repository is intact: it checks clean and the same stack publishes elsewhere."""
    repository = LayerRepository(tmp_path / "repository").ensure()
    stack = [store(repository, tmp_path, os_layer(tmp_path), 1)]
    real = in_place.assemble

    def fill_then_assemble(pieces: list[Path], volume_index: int, fmt: str, **kwargs: object) -> str | None:
        fd = os.open(Path(pieces[volume_index]).parents[1] / "filler", os.O_WRONLY | os.O_CREAT)
        for step in (MiB, 64 * 1024, 4096):  # to the last block
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, bytes(step))
        os.ftruncate(fd, os.fstat(fd).st_size - 64 * 1024)  # room for the probe, not for the image's metadata
        os.close(fd)
        return real(pieces, volume_index, fmt, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(in_place, "assemble", fill_then_assemble)
    with loop_filesystem(tmp_path / "small", 96) as out:
        with pytest.raises(UserError) as caught:
            compose(stack, repository, out, "vhdx", 1, name="full")
        message = str(caught.value)
        assert message.startswith(f"The disk image does not fit in {out}: no space is left"), message
        assert isinstance(caught.value.__cause__, DiskError)
        assert "Cannot write the disk image in" in str(caught.value.__cause__)  # the in-place path hit it
        assert sorted(p.name for p in out.iterdir()) == ["filler", "lost+found"]  # no image, no work folder
    assert repository.check({(1, stack[0].version_id): stack[0].checksum}) == []
    monkeypatch.setattr(in_place, "assemble", real)
    (tmp_path / "out").mkdir()
    assert compose(stack, repository, tmp_path / "out", "vhdx", 1, name="fine").path.is_file()


def test_a_conflict_report_that_cannot_be_made_publishes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The conflict report is worked out beside the merge and the apply: when it fails, its message is the
    publish's error, after the image was built (so it ran meanwhile), and no image is published."""
    repository = LayerRepository(tmp_path / "repository").ensure()
    stack = [store(repository, tmp_path, os_layer(tmp_path), 1),
             store(repository, tmp_path, LayerDef("Tools", "app", {"tool.exe": b"MZ"}), 2)]
    applied = threading.Event()
    real_extract = Wim.extract_image_to_ntfs_volume

    def extract(self: Wim, index: int, volume: Path, **kwargs: Any) -> None:
        real_extract(self, index, volume, **kwargs)
        if volume.name == "windows.ntfs":
            applied.set()

    def failing(*args: Any) -> Any:
        assert threading.current_thread() is not threading.main_thread()
        raise ComposeError("The listing of layer Tools 2 is damaged.")

    monkeypatch.setattr(compose_module, "conflicts", failing)
    monkeypatch.setattr(Wim, "extract_image_to_ntfs_volume", extract)
    (tmp_path / "out").mkdir()
    with pytest.raises(ComposeError) as caught:
        compose(stack, repository, tmp_path / "out", "vhdx", 1, name="no-report")
    assert str(caught.value) == "The listing of layer Tools 2 is damaged."
    assert applied.is_set()
    assert os.listdir(tmp_path / "out") == []
    assert repository.check() == []


def test_a_damaged_key_node_on_a_layers_registry_path_is_refused(tmp_path: Path) -> None:
    """The OS hives are patched, so only what the layers' changes reach is read: a damaged key node on the
    way is refused with the hive's name and the damage, nothing is published and the repository is whole."""
    software = bytearray(serialize_hive(software_hive()))
    damaged = walk_cells(bytes(software)).keys["Microsoft\\Windows NT"].offset
    software[4096 + damaged + 4:4096 + damaged + 6] = b"xx"
    broken = LayerDef("Win11", "os", {
        "Windows/System32/config/SOFTWARE": bytes(software),
        "Windows/System32/config/SYSTEM": serialize_hive(system_hive()),
    })
    app = LayerDef("Tools", "app", {"tool.exe": b"MZ"}, reg=(
        "[HKEY_LOCAL_MACHINE\\SOFTWARE\\Microsoft\\Windows NT\\Tools]\r\n\"On\"=dword:00000001\r\n\r\n"))
    repository = LayerRepository(tmp_path / "repository").ensure()
    stack = [store(repository, tmp_path, broken, 1), store(repository, tmp_path, app, 2)]
    (tmp_path / "out").mkdir()
    with pytest.raises(ComposeError) as caught:
        compose(stack, repository, tmp_path / "out", "vhdx", 1, name="broken")
    assert str(caught.value) == (
        "The OS layer Win11's SOFTWARE hive (Windows\\System32\\config\\SOFTWARE) cannot be used: the hive is "
        f"damaged (cell at {damaged:#x} is not a key node); refusing to read it. Import the OS layer again from a "
        "machine that was shut down cleanly.")
    assert os.listdir(tmp_path / "out") == []
    assert repository.check() == []
