"""The packaging service's checks: what is refused (with the user-facing message) leaves the catalog and the output
folder as they were; roles; the packaging record and the layer script; abandon. The round trip with real disks is in
tests/engine/test_packaging.py."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from app.catalog.models import AuditOutcome, Role, VersionState
from app.errors import Conflict, LayerDeskError, NotFound, PermissionDenied, ValidationError
from app.services import Services
from app.services.packaging import SCRIPT_MAX_BYTES, PackagingService, packaging_service, read_layer_script
from app.tasks.runner import TaskRunner
from tests.conftest import ServicesFactory
from tests.support.repository_checks import outcome_snapshot


@pytest.fixture
def runner(lab: Services) -> Iterator[TaskRunner]:
    runner = TaskRunner(lab.catalog, lab.caller, poll_s=0.05)
    yield runner
    runner.shutdown()


@pytest.fixture
def service(lab: Services) -> PackagingService:
    return packaging_service(lab)


def _script(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _bad_requests(tmp_path: Path) -> dict[str, tuple[Callable[[PackagingService, TaskRunner], object], type, str]]:
    out = tmp_path / "out"
    out.mkdir()
    (out / "Office_2025_packaging.vhdx").write_bytes(b"someone's disk")

    def start(layer: str = "Office", version: str = "2026", folder: Path = out, **kw: object
              ) -> Callable[[PackagingService, TaskRunner], object]:
        return lambda s, r: s.start_packaging(r, layer, version, folder, **kw)  # type: ignore[arg-type]

    return {
        "os layer": (start("Win11"), ValidationError, "Win11 is an OS layer: its versions are imported from a gold "
                                                      "disk"),
        "no folder": (start(folder=tmp_path / "none"), ValidationError,
                      f"The output folder {tmp_path / 'none'} does not exist"),
        "file exists": (start(version="2025"), Conflict, f"{out / 'Office_2025_packaging.vhdx'} already exists"),
        "wim format": (start(fmt="wim"), ValidationError, "A packaging disk is written as vhdx, vhd, vmdk, qcow2, raw"),
        "script suffix": (start(script=_script(tmp_path, "setup.sh", b"echo")), ValidationError,
                          "The layer script setup.sh is not a PowerShell or cmd script"),
        "script too big": (start(script=_script(tmp_path, "big.ps1", b"#" * (SCRIPT_MAX_BYTES + 1))), ValidationError,
                           f"a layer script may have at most {SCRIPT_MAX_BYTES}"),
        "script binary": (start(script=_script(tmp_path, "bin.cmd", b"MZ\x90\x00\xff\xfe")), ValidationError,
                          "The layer script bin.cmd is not text"),
        "unknown layer": (start("Win11-app", previous="1"), NotFound, "There is no layer named 'Win11-app'"),
        "unknown previous": (start(previous="1999"), NotFound, "Layer 'Office' has no version '1999'"),
        "prerequisite of another os": (start(prerequisites=["Paint"]), ValidationError,
                                       "Prerequisite Paint:1.0 belongs to another OS layer than 'Office'"),
        "platform prerequisite": (start("Citrix-VDA", prerequisites=["Chrome"]), ValidationError,
                                  "Only app layers have prerequisites"),
        "size": (start(size_gb=0.01), ValidationError, "A packaging disk of 0.01 GB cannot be made"),
        "no content": (start(), LayerDeskError, "layer"),  # the demo-less catalog has no stored content
    }


CASES = ["os layer", "no folder", "file exists", "wim format", "script suffix", "script too big", "script binary",
         "unknown layer", "unknown previous", "prerequisite of another os", "platform prerequisite", "size",
         "no content"]


@pytest.mark.parametrize("case", CASES)
def test_bad_packaging_requests_are_refused_and_leave_nothing(service: PackagingService, runner: TaskRunner,
                                                              tmp_path: Path, case: str) -> None:
    action, error, fragment = _bad_requests(tmp_path)[case]
    before = outcome_snapshot(service.catalog)
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    with pytest.raises(error) as refused:
        action(service, runner)
    assert fragment in str(refused.value) and "\n" not in str(refused.value), str(refused.value)
    assert outcome_snapshot(service.catalog) == before
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == files


def test_one_packaging_disk_per_layer_at_a_time(service: PackagingService, lab: Services) -> None:
    service.add_packaging_version("Office", "2025", prerequisites=["Chrome"])
    assert service.editing_version("Office") == "2025"
    before = outcome_snapshot(lab.catalog)
    with pytest.raises(Conflict, match=r"^Layer 'Office' already has version 2025 being edited \(editing\): "
                                       r"finalize or abandon Office:2025 before creating another packaging disk\.$"):
        service.add_packaging_version("Office", "2026")
    assert outcome_snapshot(lab.catalog) == before
    # A version added by hand and still editing blocks it as well.
    lab.layers.add_version("Chrome", "121")
    with pytest.raises(Conflict, match="already has version 121 being edited"):
        service.add_packaging_version("Chrome", "122")


def test_the_packaging_record_and_the_layer_script(service: PackagingService, lab: Services,
                                                   tmp_path: Path) -> None:
    script = _script(tmp_path, "Setup.ps1", "\ufeffWrite-Host 'configure Office'\r\n".encode())
    info = service.add_packaging_version("Office", "2025", previous="2024", prerequisites=["Chrome:120"],
                                         script=read_layer_script(script), fmt="qcow2", comment="monthly")
    assert (info.state, info.prerequisites, info.comment) == (VersionState.EDITING, ("Chrome:120",), "monthly")
    record = service.get_packaging("Office:2025")
    assert (record.os.layer, record.os.version, record.os.checksum) == ("Win11", "1.0", "sha256:00")
    assert [(p.layer, p.version) for p in record.prerequisites] == [("Chrome", "120")]
    assert record.previous is not None and (record.previous.layer, record.previous.version) == ("Office", "2024")
    assert (record.format.value, record.disk, record.finalized) == ("qcow2", None, None)
    assert record.size_gb == 11  # the layers' data (a few KiB) plus 10 GB to install into
    assert (record.script_name, record.layer_script) == ("Setup.ps1", "Write-Host 'configure Office'\r\n")
    entry = lab.audit.list_entries(operation="layer.package")[0]
    assert entry.object_name == "Office:2025" and entry.change["inputs"] == [
        "os Win11:1.0", "prerequisite Chrome:120", "previous Office:2024"]
    with pytest.raises(Conflict, match="has no packaging disk yet"):
        service.begin_finalize("Office:2025", "/disks/x.vhdx")
    service.record_packaging_disk("Office:2025", path="/disks/x.vhdx", size_bytes=5, checksum="sha256:aa",
                                  manifest_digest="sha256:bb", volume_serial="0011223344556677")
    with pytest.raises(Conflict, match="already has its packaging disk"):
        service.record_packaging_disk("Office:2025", path="/y", size_bytes=5, checksum="sha256:aa",
                                      manifest_digest="sha256:bb", volume_serial="00")
    assert service.begin_finalize("Office:2025", "/disks/x.vhdx").state is VersionState.FINALIZING
    with pytest.raises(Conflict, match="is finalizing; only a version being edited"):
        service.abandon("Office:2025")


def test_abandon(service: PackagingService, lab: Services) -> None:
    service.add_packaging_version("Office", "2025")
    service.abandon("Office:2025", comment="wrong installer")
    assert [v.name for v in lab.layers.get_layer("Office").versions] == ["2024"]
    entry = lab.audit.list_entries(operation="layer.abandon")[0]
    assert (entry.object_name, entry.comment) == ("Office:2025", "wrong installer")
    with pytest.raises(NotFound, match="Office:2024 was not made on a packaging machine"):
        service.abandon("Office:2024")
    with pytest.raises(ValidationError, match="Name the version to abandon: Office:VERSION"):
        service.abandon("Office")


@pytest.mark.parametrize("role", [Role.READ_ONLY, Role.MANAGE_OS_LAYERS, Role.MANAGE_IMAGE_TEMPLATES,
                                  Role.PUBLISH_LAYERED_IMAGES])
def test_starting_packaging_tasks_needs_a_layer_role_and_is_audited(
        lab: Services, services_for: ServicesFactory, tmp_path: Path, role: Role) -> None:
    packaging_service(lab).add_packaging_version("Chrome", "121")
    caller = services_for(role, username="someone")
    runner = TaskRunner(caller.catalog, caller.caller)
    before = outcome_snapshot(lab.catalog)
    try:
        with pytest.raises(PermissionDenied, match=r"^someone \(.*\) may not create, change or delete (app )?layers"):
            packaging_service(caller).start_packaging(runner, "Office", "2025", tmp_path)
        with pytest.raises(PermissionDenied, match=r"^someone \(.*\) may not create, change or delete (app )?layers"):
            packaging_service(caller).start_finalize(runner, "Chrome:121", tmp_path / "x.vhdx")
    finally:
        runner.shutdown()
    assert outcome_snapshot(lab.catalog) == before
    denied = [(e.operation, e.outcome) for e in lab.audit.list_entries(user="someone")]
    assert sorted(denied) == [("layer.finalize", AuditOutcome.DENIED), ("layer.package", AuditOutcome.DENIED)]
