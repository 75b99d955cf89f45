"""The engine tools check the console's About page (and, later, start-up) shows: every tool found here
with the version the tool itself prints, and what it is needed for; refused to a caller without a role."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.catalog.models import DiskFormat, LayerType, Role
from app.errors import EnvironmentProblem, PermissionDenied
from app.services import Services
from app.services.templates import TemplateSpec
from app.tasks.runner import TaskRunner
from tests.conftest import ServicesFactory
from tests.support.tools import run_ok
from tests.unit.test_publishing import deployable_layer


def test_every_engine_tool_is_found_with_its_version(services_for: ServicesFactory) -> None:
    tools = {t.name: t for t in services_for(Role.READ_ONLY).repository.engine_tools()}
    assert set(tools) == {"wimlib", "qemu-img", "mkntfs (NTFS-3G)", "ntfscp (NTFS-3G)", "mkfs.fat (dosfstools)"}
    assert all(t.available and t.problem is None and t.needed_for for t in tools.values())
    assert tools["qemu-img"].version == run_ok("qemu-img", "--version").stdout.splitlines()[0].strip()
    # wimlib-imagex prints the version it was built with; the library may be a later patch release
    imagex = run_ok("wimlib-imagex", "--version").stdout.split()[1]
    assert (tools["wimlib"].version or "").split(".")[:2] == imagex.split(".")[:2]


def test_a_caller_without_a_role_is_refused(services_for: ServicesFactory) -> None:
    with pytest.raises(PermissionDenied):
        services_for().repository.engine_tools()


def _path_without(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, *missing: str) -> None:
    """PATH (and the system folders LayerDesk also searches) holding every tool but ``missing``."""
    import shutil

    from app import procs

    folder = tmp_path / "bin"
    folder.mkdir()
    for name in ("qemu-img", "mkntfs", "ntfscp", "ntfsls", "mkfs.fat"):
        found = shutil.which(name) or shutil.which(name, path=":".join(procs.SYSTEM_PROGRAM_DIRS))
        if found and name not in missing:
            (folder / name).symlink_to(found)
    monkeypatch.setenv("PATH", str(folder))
    monkeypatch.setattr(procs, "SYSTEM_PROGRAM_DIRS", ())


def test_publishing_is_refused_before_any_work_when_a_tool_the_format_needs_is_missing(
        admin: Services, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    deployable_layer(admin, "Win11", LayerType.OS, "1.0", size=20_000, checksum="sha256:win11")
    admin.templates.create_template("Finance", TemplateSpec(os="Win11:1.0", disk_format=DiskFormat.VHDX))
    stack = admin
    _path_without(monkeypatch, tmp_path, "qemu-img")
    runner = TaskRunner(stack.catalog, stack.caller)
    try:
        with pytest.raises(EnvironmentProblem) as refused:
            stack.publishing.publish(runner, "Finance", tmp_path / "out")
    finally:
        runner.shutdown()
    assert str(refused.value).startswith("Publishing a vhdx image needs qemu-img, which is not usable on this "
                                         "machine (qemu-img: The program 'qemu-img' was not found")
    assert "System > About" in str(refused.value)
    assert stack.tasks.list_tasks() == [] and not (tmp_path / "out").exists()


def test_the_console_is_told_which_operations_the_missing_tools_rule_out(
        services_for: ServicesFactory, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from app.engine.toolcheck import unavailable_operations

    services = services_for(Role.READ_ONLY)
    assert unavailable_operations(services.repository.engine_tools()) == []
    _path_without(monkeypatch, tmp_path, "qemu-img", "mkfs.fat")
    found = unavailable_operations(services.repository.engine_tools())
    assert [(u.operation, [t.name for t in u.missing]) for u in found] == [
        ("Importing disk images and publishing VHD, VHDX, VMDK, qcow2 and raw disks", ["qemu-img"]),
        ("Publishing disks for OS layers without a gold disk", ["mkfs.fat (dosfstools)"]),
    ]
