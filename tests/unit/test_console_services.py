"""Read-only service calls the console's pages use: which templates use each layer, and what a stored
layer version holds."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.catalog.models import Role, TaskState
from app.errors import NotFound, PermissionDenied
from app.services import Services
from app.services.templates import TemplateSpec
from app.tasks.runner import TaskRunner
from tests.conftest import ServicesFactory


def test_template_usage_names_every_template_per_layer(lab: Services) -> None:
    lab.templates.create_template("Finance", TemplateSpec(os="Win11:1.0", platform="Citrix-VDA:1.0",
                                                          apps=("Office:2024", "Chrome:120")))
    lab.templates.create_template("Basic", TemplateSpec(os="Win11:1.0", apps=("Chrome:120",)))
    ids = {layer.name: layer.id for layer in lab.layers.list_layers()}
    usage = lab.layers.template_usage()
    assert {name: usage.get(layer_id) for name, layer_id in ids.items()} == {
        "Win11": ("Basic", "Finance"), "Citrix-VDA": ("Finance",), "Office": ("Finance",),
        "Chrome": ("Basic", "Finance"), "Win10": None, "Paint": None, "Notepad++": None,
    }


def test_version_contents_reads_the_stored_manifest(services_for: ServicesFactory, tmp_path: Path) -> None:
    admin = services_for(Role.ADMINISTRATOR)
    source = tmp_path / "office"
    (source / "Program Files" / "Office").mkdir(parents=True)
    (source / "Program Files" / "Office" / "word.exe").write_bytes(b"w" * 1000)
    (source / "Program Files" / "Office" / "readme.txt").write_bytes(b"r" * 24)
    (source / "Windows" / "Temp").mkdir(parents=True)
    (source / "Windows" / "Temp" / ".wh.old.log").write_bytes(b"")
    reg = tmp_path / "office.reg"
    reg.write_text("Windows Registry Editor Version 5.00\r\n\r\n"
                   "[HKEY_LOCAL_MACHINE\\SOFTWARE\\Vendor\\Office]\r\n\"Version\"=\"16\"\r\n\"Seats\"=dword:00000005\r\n\r\n"
                   "[HKEY_CURRENT_USER\\Software\\Vendor]\r\n\"Theme\"=\"Dark\"\r\n\r\n"
                   "[-HKEY_LOCAL_MACHINE\\SOFTWARE\\Vendor\\Old]\r\n", encoding="utf-16")
    admin.layers.create_layer("Win11", "os")
    admin.layers.create_layer("Office", "app", os_layer="Win11")
    runner = TaskRunner(admin.catalog, admin.caller)
    try:
        task = admin.imports.start_import(runner, "Office", "2024", source, registry_files=[reg])
        assert runner.wait(task) is TaskState.COMPLETE
    finally:
        runner.shutdown()

    reader = services_for(Role.READ_ONLY)
    contents = reader.layers.version_contents("Office:2024", admin.home.repository)
    assert (contents.layer, contents.version, contents.source_kind, contents.source_path) \
        == ("Office", "2024", "folder", str(source))
    assert (contents.files, contents.data_bytes) == (2, 1024)
    assert contents.deletions == ("Windows\\Temp\\old.log",)
    assert contents.registry_operations == 4
    assert contents.registry == (
        "set HKLM\\SOFTWARE\\Vendor\\Office\\Version",
        "set HKLM\\SOFTWARE\\Vendor\\Office\\Seats",
        "set HKCU\\Software\\Vendor\\Theme",
        "delete key HKLM\\SOFTWARE\\Vendor\\Old\\",
    )
    assert contents.registry_roots == (("HKCU", 1), ("HKLM\\SOFTWARE", 3))

    admin.layers.add_version("Office", "2025")
    with pytest.raises(NotFound, match="Nothing is stored for Office:2025"):
        reader.layers.version_contents("Office:2025", admin.home.repository)


def test_both_reads_need_a_role(services_for: ServicesFactory) -> None:
    nobody = services_for()
    with pytest.raises(PermissionDenied, match="may not read the catalog"):
        nobody.layers.template_usage()
    with pytest.raises(PermissionDenied, match="may not read the catalog"):
        nobody.layers.version_contents("Office:2024", nobody.home.repository)
