"""Deleting a layer version or a whole layer also removes what the repository stored for it, once the
catalog change has committed; a refused deletion removes nothing. Checked with ``wimlib-imagex info``
(not our code) and the repository check against the catalog."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from app.catalog.models import LayerType, TaskState
from app.errors import Conflict
from app.services import Services
from app.services.templates import TemplateSpec
from app.tasks.runner import TaskRunner
from tests.support.repository_checks import make_tree
from tests.support.tools import run_ok


@pytest.fixture
def runner(admin: Services) -> Iterator[TaskRunner]:
    runner = TaskRunner(admin.catalog, admin.caller, poll_s=0.05)
    yield runner
    runner.shutdown()


def _image_names(wim: Path) -> list[str]:
    lines = run_ok("wimlib-imagex", "info", wim).stdout.splitlines()
    return [line.split(":", 1)[1].strip() for line in lines if line.startswith("Name:")]


def _import(admin: Services, runner: TaskRunner, layer: str, version: str, source: Path) -> None:
    task_id = admin.imports.start_import(runner, layer, version, source)
    assert runner.wait(task_id, 120) is TaskState.COMPLETE, admin.tasks.get_task(task_id).error


def test_deleting_versions_and_layers_removes_their_stored_content(admin: Services, runner: TaskRunner,
                                                                   tmp_path: Path) -> None:
    repo = admin.imports.repository.ensure()
    admin.layers.create_layer("Win11", LayerType.OS)
    admin.layers.create_layer("Tools", LayerType.APP, os_layer="Win11")
    _import(admin, runner, "Win11", "1", make_tree(tmp_path / "os", {"Windows/notepad.exe": b"MZ"}))
    for version in ("1", "2", "3"):
        _import(admin, runner, "Tools", version, make_tree(tmp_path / f"t{version}", {"tool.exe": version.encode()}))
    tools = admin.layers.get_layer("Tools")
    ids = {v.name: v.id for v in tools.versions}
    wim = repo.wim_path(tools.layer.id)
    assert _image_names(wim) == [f"v{ids['1']}", f"v{ids['2']}", f"v{ids['3']}"]

    admin.layers.delete_version("Tools:2", comment="superseded")
    assert _image_names(wim) == [f"v{ids['1']}", f"v{ids['3']}"]
    assert not repo.manifest_path(tools.layer.id, ids["2"]).exists()
    assert admin.repository.check().problems == ()

    admin.templates.create_template("Desk", TemplateSpec(os="Win11:1", apps=["Tools:3"]))
    with pytest.raises(Conflict, match="in use"):
        admin.layers.delete_layer("Tools")
    assert _image_names(wim) == [f"v{ids['1']}", f"v{ids['3']}"]  # refused: nothing removed

    admin.templates.delete_template("Desk")
    admin.layers.delete_layer("Tools")
    assert not wim.exists() and not (wim.parent / str(tools.layer.id)).exists()
    assert admin.repository.check().problems == ()
