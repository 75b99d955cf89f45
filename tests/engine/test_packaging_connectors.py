"""Packaging disks that go through a connector and come back from it to be finalized, with real tools: the
folder connector delivers the disk beside its JSON sidecar, the disk is changed there as an installer would
(through an ntfs-3g mount), and ``layerctl layer finalize`` without a disk fetches it from the connector.
The refusals: a connector that cannot hand a disk back, one whose type changed, a disk that is gone, a
delivery that fails. What the catalog, the work folder and the destination hold afterwards is checked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.catalog.models import DiskFormat, Role, TaskState, VersionState
from app.errors import NotFound, PermissionDenied, UserError, ValidationError
from app.services import Services
from app.services.packaging import PackagingService, packaging_service
from app.tasks.runner import TaskRunner
from tests.conftest import ServicesFactory
from tests.engine.test_packaging import SIZE_GB, OpenDisk, _wait, lab, runner  # noqa: F401 - fixtures
from tests.engine.test_wim import wimlib_imagex_dir
from tests.support.image_checksum import image_checksum
from tests.support.repository_checks import listing, outcome_snapshot
from tests.support.tools import run_ok
from tests.unit.test_cli import Ctl


def _leftovers(service: PackagingService) -> list[str]:
    work = service.home.work
    return sorted(p.name for p in work.iterdir()) if work.exists() else []


def test_a_packaging_disk_delivered_through_a_connector_is_finalized_from_there(
        lab: PackagingService, runner: TaskRunner, admin: Services, tmp_path: Path) -> None:  # noqa: F811
    shelf = tmp_path / "shelf"
    shelf.mkdir()
    admin.connectors.add_connector("Lab-Folder", "folder", endpoint=str(shelf))
    task_id = lab.start_packaging(runner, "Notes", "1", None, connector="Lab-Folder", size_gb=SIZE_GB,
                                  prerequisites=["Demo-Browser"], comment="through the lab folder")
    task = _wait(lab, runner, task_id)
    assert task.state is TaskState.COMPLETE, task.error
    delivered = sorted(shelf.iterdir())
    assert [p.suffix for p in delivered] == [".json", ".vhdx"]
    assert all(p.name.startswith("Notes_1_packaging_") for p in delivered)
    sidecar, disk = delivered
    run_ok("qemu-img", "check", "-f", "vhdx", disk)
    described = json.loads(sidecar.read_text(encoding="utf-8"))
    assert described["template"] == "Notes_1_packaging" and described["format"] == "vhdx"
    assert [(layer["role"], layer["layer"], layer["version"]) for layer in described["layers"]] == [
        ("os", "Demo-Win11", "1.0"), ("prerequisite", "Demo-Browser", "1.0")]
    record = lab.get_packaging("Notes:1")
    assert record.state is VersionState.EDITING and record.disk is not None
    assert record.disk.path == str(disk) and record.disk.format is DiskFormat.VHDX
    assert record.disk.delivery == {"connector": "Lab-Folder", "type": "folder", "location": str(disk),
                                    "ids": {"image": str(disk), "sidecar": str(sidecar)}}
    assert described["checksum"] == record.disk.checksum == image_checksum(disk)
    assert _leftovers(lab) == []  # the disk was built in the work folder and is only at the connector now
    recorded = admin.audit.list_entries(operation="layer.package.disk")[0]
    assert recorded.change["connector"] == "Lab-Folder" and recorded.change["ids"]["image"] == str(disk)

    opened = OpenDisk(disk, tmp_path / "edit")

    def install(root: Path) -> None:
        (root / "Program Files" / "Notes").mkdir()
        (root / "Program Files" / "Notes" / "notes.exe").write_bytes(b"MZ notes 1.0")

    opened.change_files(install)
    opened.close()
    done = _wait(lab, runner, lab.start_finalize(runner, "Notes:1", comment="from the lab folder"))
    assert done.state is TaskState.COMPLETE, done.error
    version = admin.layers.get_version("Notes:1")
    assert version.state is VersionState.DEPLOYABLE
    layer_id = admin.layers.get_layer("Notes").layer.id
    assert wimlib_imagex_dir(lab.repository.wim_path(layer_id), 1) == {
        "/", "/Program Files", "/Program Files/Notes", "/Program Files/Notes/notes.exe"}
    finalized = lab.get_packaging("Notes:1").finalized
    assert finalized is not None and finalized["disk"] == f"{disk} (connector Lab-Folder)"
    assert disk.exists() and _leftovers(lab) == []  # read where it is; the connector's copy is left alone


def test_finalizing_without_a_disk_needs_a_connector_that_can_hand_it_back(
        lab: PackagingService, runner: TaskRunner, admin: Services, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "out"
    out.mkdir()
    assert _wait(lab, runner, lab.start_packaging(runner, "Notes", "1", out, size_gb=SIZE_GB)).state \
        is TaskState.COMPLETE
    with pytest.raises(ValidationError, match=r"delivered to .*Notes_1_packaging\.vhdx, not through a connector: "
                                              "name the disk to finalize from"):
        lab.start_finalize(runner, "Notes:1")
    # A delivery recorded through a connector whose type cannot hand the disk back (Azure keeps managed disks).
    lab.abandon("Notes:1")
    admin.connectors.add_connector("Cloud", "azure", endpoint="https://management.azure.com",
                                   username="99999999-8888-7777-6666-555555555555",
                                   password="client secret 1",
                                   options={"tenant": "11111111-2222-3333-4444-555555555555",
                                            "subscription": "66666666-7777-8888-9999-000000000000",
                                            "resource_group": "vdi", "location": "westeurope"})
    lab.add_packaging_version("Notes", "2", size_gb=SIZE_GB)
    lab.record_packaging_disk("Notes:2", path="Azure: managed disk Notes_2_packaging", size_bytes=1,
                              checksum="sha256:00", manifest_digest="sha256:00", volume_serial="0" * 16,
                              delivery={"connector": "Cloud", "type": "azure", "location": "Azure",
                                        "ids": {"disk": "Notes_2_packaging"}})
    before = outcome_snapshot(lab.catalog)
    with pytest.raises(UserError, match=r"A Microsoft Azure \(managed disk\) connector cannot hand the disk back: "
                                        r"copy the packaging machine's disk \(Azure: managed disk Notes_2_packaging\)"):
        lab.start_finalize(runner, "Notes:2")
    admin.connectors.remove_connector("Cloud")
    with pytest.raises(NotFound, match="There is no connector configuration named 'Cloud'"):
        lab.start_finalize(runner, "Notes:2")
    admin.connectors.add_connector("Cloud", "folder", endpoint=str(out))
    with pytest.raises(UserError, match="is now of another type than the one the packaging disk of Notes:2 went "
                                        "through"):
        lab.start_finalize(runner, "Notes:2")
    assert admin.layers.get_version("Notes:2").state is VersionState.EDITING
    after = outcome_snapshot(lab.catalog)
    assert {k: v for k, v in after.items() if k != "connector_config"} == \
        {k: v for k, v in before.items() if k != "connector_config"}


def test_a_disk_gone_from_the_connector_puts_the_version_back_to_editing(
        lab: PackagingService, runner: TaskRunner, admin: Services, tmp_path: Path) -> None:  # noqa: F811
    shelf = tmp_path / "shelf"
    shelf.mkdir()
    admin.connectors.add_connector("Lab-Folder", "folder", endpoint=str(shelf))
    assert _wait(lab, runner, lab.start_packaging(runner, "Notes", "1", None, connector="Lab-Folder",
                                                  size_gb=SIZE_GB)).state is TaskState.COMPLETE
    disk = next(shelf.glob("*.vhdx"))
    disk.unlink()
    repository = listing(lab.repository.root)
    done = _wait(lab, runner, lab.start_finalize(runner, "Notes:1"))
    assert done.state is TaskState.FAILED
    assert done.error == f"The disk {disk} is no longer there; it was moved or deleted. Finalize from the disk " \
                         "file where it is now."
    version = admin.layers.get_version("Notes:1")
    assert version.state is VersionState.EDITING and version.state_reason.startswith(
        f"Finalize refused: The disk {disk} is no longer there")
    assert listing(lab.repository.root) == repository and _leftovers(lab) == []


def test_a_failed_delivery_leaves_no_version_and_no_file(
        lab: PackagingService, runner: TaskRunner, admin: Services, tmp_path: Path) -> None:  # noqa: F811
    shelf = tmp_path / "shelf"
    shelf.mkdir()
    admin.connectors.add_connector("Lab-Folder", "folder", endpoint=str(shelf))
    with pytest.raises(ValidationError, match="either to an output folder or through a connector"):
        lab.start_packaging(runner, "Notes", "1", tmp_path, connector="Lab-Folder")
    with pytest.raises(ValidationError, match="either to an output folder or through a connector"):
        lab.start_packaging(runner, "Notes", "1", None)
    with pytest.raises(NotFound, match="There is no connector configuration named 'Nowhere'"):
        lab.start_packaging(runner, "Notes", "1", None, connector="Nowhere")
    before = outcome_snapshot(lab.catalog)
    shelf.rmdir()  # the folder went away after the connector was configured
    task = _wait(lab, runner, lab.start_packaging(runner, "Notes", "1", None, connector="Lab-Folder",
                                                  size_gb=SIZE_GB))
    assert task.state is TaskState.FAILED
    assert task.error == f"The folder {shelf} does not exist; create it or correct the connector's folder."
    assert [v.name for v in admin.layers.get_layer("Notes").versions] == []
    assert _leftovers(lab) == [] and not shelf.exists()
    assert outcome_snapshot(lab.catalog) == before


def test_layerctl_packages_through_a_connector_and_finalizes_from_it(
        lab: PackagingService, admin: Services, tmp_path: Path, capsys: pytest.CaptureFixture[str],  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    ctl = Ctl(admin.home.root, capsys, monkeypatch)
    shelf = tmp_path / "shelf"
    shelf.mkdir()
    status, _, err = ctl("connector", "add", "Lab-Folder", "--type", "folder", "--endpoint", str(shelf))
    assert status == 0, err
    status, _, err = ctl("layer", "package", "Notes", "--version", "1", "--connector", "Lab-Folder",
                         "--output", str(tmp_path))
    assert status == 3 and err.strip().endswith("Deliver the packaging disk either to an output folder or through a "
                                                "connector (one of the two).")
    status, out, err = ctl("layer", "package", "Notes", "--version", "1", "--connector", "Lab-Folder",
                           "--size-gb", str(SIZE_GB))
    assert status == 0, err
    disk = next(shelf.glob("*.vhdx"))
    assert out.startswith(f"Packaging disk of Notes:1 (editing): {disk}\n")
    assert "then: layerctl layer finalize Notes:1 (task" in out  # no --from: it comes back from the connector
    opened = OpenDisk(disk, tmp_path / "edit")
    opened.change_files(lambda root: (root / "notes.ini").write_bytes(b"[Notes]\r\n"))
    opened.close()
    status, out, err = ctl("--json", "layer", "finalize", "Notes:1")
    assert status == 0, err
    finalized = json.loads(out)
    assert (finalized["state"], finalized["added"], finalized["changed"], finalized["deletions"]) == \
        ("deployable", 1, 0, 0)


def test_delivering_through_a_connector_needs_the_publish_role_too(
        lab: PackagingService, runner: TaskRunner, admin: Services, services_for: ServicesFactory,  # noqa: F811
        tmp_path: Path) -> None:
    """A connector's credentials are a publisher's: an app layer manager packages to a folder, not through one."""
    shelf = tmp_path / "shelf"
    shelf.mkdir()
    admin.connectors.add_connector("Lab-Folder", "folder", endpoint=str(shelf))
    packager = services_for(Role.MANAGE_APP_LAYERS, username="packager")
    tasks = TaskRunner(packager.catalog, packager.caller, poll_s=0.05)
    before = outcome_snapshot(lab.catalog)
    try:
        with pytest.raises(PermissionDenied, match=r"^packager \(Manage App Layers\) may not publish"):
            packaging_service(packager).start_packaging(tasks, "Notes", "1", None, connector="Lab-Folder",
                                                        size_gb=SIZE_GB)
        assert outcome_snapshot(lab.catalog) == before and list(shelf.iterdir()) == [] and _leftovers(lab) == []
        (refused,) = admin.audit.list_entries(user="packager")
        assert (refused.operation, refused.outcome.value) == ("layer.package", "denied")
        out = tmp_path / "out"
        out.mkdir()
        task_id = packaging_service(packager).start_packaging(tasks, "Notes", "1", out, size_gb=SIZE_GB)
        assert tasks.wait(task_id, timeout_s=300) is TaskState.COMPLETE
        assert [p.name for p in out.iterdir()] == ["Notes_1_packaging.vhdx"]
        # Without a disk named, the finalize of a folder delivery asks for one (no connector is involved).
        with pytest.raises(ValidationError, match="not through a connector: name the disk to finalize from"):
            packaging_service(packager).start_finalize(tasks, "Notes:1")
        # A version delivered through the connector (by an administrator) is not fetched back by the packager.
        lab.abandon("Notes:1")
        assert _wait(lab, runner, lab.start_packaging(runner, "Notes", "2", None, connector="Lab-Folder",
                                                      size_gb=SIZE_GB)).state is TaskState.COMPLETE
        with pytest.raises(PermissionDenied, match=r"^packager \(Manage App Layers\) may not publish"):
            packaging_service(packager).start_finalize(tasks, "Notes:2")
        assert admin.layers.get_version("Notes:2").state is VersionState.EDITING
    finally:
        tasks.shutdown()
    assert [(e.operation, e.outcome.value) for e in admin.audit.list_entries(user="packager", outcome=None)
            if e.outcome.value == "denied"] == [("layer.finalize", "denied"), ("layer.package", "denied")]
