"""The service additions the console's template screens use: the conflict report of a stack that is not
saved yet (``publishing.preview_conflicts``) and saving a template with the app layer order as given
(``given_order``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.catalog.models import LayerType, Role, TaskState
from app.errors import NotFound, ValidationError
from app.services import Services
from app.services.templates import TemplateSpec
from app.tasks.runner import TaskRunner
from tests.conftest import ServicesFactory
from tests.support.compose_stack import CITRIX, EXPECTED_CONFLICTS, OFFICE, TOOLS, os_layer


def import_stack(services: Services, root: Path) -> None:
    """Layers Win11 (OS), Office and Tools (app; Tools newer) and Citrix (platform), each with version 1
    imported for real from tests/support/compose_stack.py."""
    runner = TaskRunner(services.catalog, services.caller)
    try:
        for name, kind in (("Win11", LayerType.OS), ("Office", LayerType.APP), ("Tools", LayerType.APP),
                           ("Citrix", LayerType.PLATFORM)):
            services.layers.create_layer(name, kind, os_layer=None if kind is LayerType.OS else "Win11")
        for layer in (os_layer(root), OFFICE, TOOLS, CITRIX):
            reg = layer.reg_file(root)
            task = services.imports.start_import(runner, layer.name, "1", layer.folder(root / "sources"),
                                                 registry_files=[reg] if reg else [])
            assert runner.wait(task, 120) is TaskState.COMPLETE, services.tasks.get_task(task).error
    finally:
        runner.shutdown()


def test_preview_names_versions_without_content_instead_of_failing(lab: Services) -> None:
    preview = lab.publishing.preview_conflicts("Win11:1.0", ["Office:2024", "Chrome:120"], "Citrix-VDA:1.0")
    assert preview.conflicts == ()
    assert len(preview.missing_content) == 4
    assert preview.missing_content[1].startswith("Office:2024 (deployable) has no content in the layer repository")
    assert "Win11:2.0 (editing)" in lab.publishing.preview_conflicts("Win11:2.0").missing_content[0]


def test_preview_checks_the_stack(lab: Services) -> None:
    with pytest.raises(ValidationError, match="'Office' is a app layer, not the os layer"):
        lab.publishing.preview_conflicts("Office:2024")
    with pytest.raises(ValidationError, match="not the platform layer"):
        lab.publishing.preview_conflicts("Win11:1.0", [], "Chrome:120")
    with pytest.raises(NotFound):
        lab.publishing.preview_conflicts("Win11:1.0", ["Visio:1"])


def test_preview_of_imported_layers_follows_the_order_given(admin: Services, tmp_path: Path,
                                                            services_for: ServicesFactory) -> None:
    import_stack(admin, tmp_path)
    reader = services_for(Role.READ_ONLY)
    preview = reader.publishing.preview_conflicts("Win11:1", ["Office:1", "Tools:1"], "Citrix:1")
    assert preview.missing_content == ()
    assert [c.to_dict() for c in preview.conflicts] == EXPECTED_CONFLICTS
    swapped_preview = reader.publishing.preview_conflicts("Win11:1", ["Tools:1", "Office:1"], "Citrix:1")
    swapped = {c.path.casefold(): c.winner for c in swapped_preview.conflicts}
    assert swapped["program files\\office\\config.ini"] == "Office"
    assert swapped["hklm\\software\\shared\\owner"] == "Office"
    assert swapped["windows\\notepad.exe"] == "Citrix", "the platform layer always wins"


def test_given_order_saves_the_app_layers_as_listed(lab: Services) -> None:
    spec = TemplateSpec(os="Win11:1.0", apps=("Chrome:120", "Notepad++:8.6", "Office:2024"))
    default = lab.templates.create_template("Default", spec)
    assert default.app_layers == ("Office:2024", "Chrome:120", "Notepad++:8.6"), "newest layer highest"
    given = lab.templates.create_template("Given", spec, given_order=True)
    assert given.app_layers == spec.apps
    updated = lab.templates.update_template(
        "Given", TemplateSpec(os="Win11:1.0", apps=("Office:2024", "Chrome:120")), comment="one save",
        given_order=True)
    assert updated.app_layers == ("Office:2024", "Chrome:120") and updated.revision == 2
    assert lab.templates.history("Given")[-1].comment == "one save"
    kept = lab.templates.update_template("Given", TemplateSpec(os="Win11:1.0", apps=("Chrome:120", "Office:2024"),
                                                               size_gb=50))
    assert kept.app_layers == ("Office:2024", "Chrome:120"), "without given_order the kept order stays"
