"""The transfer dialog over two real homes (the demo lab's layers, imported for real): export checked layers to a
folder as a task, preview and import them into a second home, a missing folder refused with its reason, a
conflict shown in the preview, and Read Only unable to start anything."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from PySide6.QtCore import Qt
from pytestqt.qtbot import QtBot

from app.catalog.models import LayerType, PrincipalKind, Role, TaskState
from app.paths import Home
from app.services import Services, open_catalog
from app.services.rbac import Caller
from app.tasks.runner import TaskRunner
from tests.conftest import demo_lab
from tests.gui.test_tasks_page import settled  # noqa: F401 - an autouse fixture
from tests.support.keyring_memory import MemoryKeyring
from ui.transfer_dialog import COL_ACTION, COL_LAYER, COL_VERSION, TransferDialog


@pytest.fixture
def runner(admin: Services) -> Iterator[TaskRunner]:
    runner = TaskRunner(admin.catalog, admin.caller, poll_s=0.1, progress_interval_s=0.05)
    yield runner
    runner.shutdown()


@pytest.fixture
def demo(admin: Services, demo_lab_template: Path) -> Services:
    demo_lab(admin, demo_lab_template)
    return admin


@pytest.fixture
def second(tmp_path: Path, memory_keyring: MemoryKeyring) -> Iterator[tuple[Services, TaskRunner]]:
    home = Home(tmp_path / "second").ensure()
    catalog, secrets = open_catalog(home)
    services = Services.for_caller(home, catalog, Caller("admin", frozenset({Role.ADMINISTRATOR}),
                                                          PrincipalKind.LOCAL_USER), secrets)
    runner = TaskRunner(catalog, services.caller, poll_s=0.1, progress_interval_s=0.05)
    yield services, runner
    runner.shutdown()
    catalog.close()


def open_dialog(qtbot: QtBot, services: Services, runner: TaskRunner) -> TransferDialog:
    dialog = TransferDialog(services, runner)
    qtbot.addWidget(dialog)
    with qtbot.waitSignal(dialog.layers_loaded, timeout=5000):
        dialog.show()
    return dialog


def check(dialog: TransferDialog, *names: str) -> None:
    for row in range(dialog.layer_list.count()):
        item = dialog.layer_list.item(row)
        if item.data(Qt.ItemDataRole.UserRole) in names:
            item.setCheckState(Qt.CheckState.Checked)


def preview_rows(dialog: TransferDialog) -> list[tuple[str, str, str]]:
    table = dialog.preview_table
    return [(table.item(r, COL_LAYER).text(), table.item(r, COL_VERSION).text(), table.item(r, COL_ACTION).text())
            for r in range(table.rowCount())]


def test_export_then_preview_and_import_into_another_home(
    qtbot: QtBot, event_loop: asyncio.AbstractEventLoop, demo: Services, runner: TaskRunner,
    second: tuple[Services, TaskRunner], tmp_path: Path,
) -> None:
    dialog = open_dialog(qtbot, demo, runner)
    assert dialog.layer_list.count() == len(demo.layers.list_layers())
    dialog.export_button.click()
    qtbot.waitUntil(lambda: "Check the layers to export" in dialog.export_message.text(), timeout=3000)
    check(dialog, "Demo-Office")
    folder = tmp_path / "export"
    dialog.export_to.path.setText(str(folder))
    assert not dialog.export_to.account.isVisibleTo(dialog)
    with qtbot.waitSignal(dialog.task_finished, timeout=60000) as done:
        dialog.export_button.click()
    assert done.args[0].state is TaskState.COMPLETE
    document = json.loads((folder / "layerdesk-export.json").read_text(encoding="utf-8"))
    assert {layer["name"] for layer in document["layers"]} == {"Demo-Office", "Demo-Win11"}  # its OS layer too
    assert "is done" in dialog.export_message.text()

    services, runner2 = second
    importer = open_dialog(qtbot, services, runner2)
    importer.tabs.setCurrentIndex(1)
    importer.import_from.path.setText(str(tmp_path / "nowhere"))
    with qtbot.waitSignal(importer.previewed, timeout=10000):
        importer.preview_button.click()
    assert "does not exist" in importer.import_message.text() and not importer.import_button.isEnabled()

    importer.import_from.path.setText(str(folder))
    with qtbot.waitSignal(importer.previewed, timeout=10000):
        importer.preview_button.click()
    assert preview_rows(importer) == [("Demo-Win11", "1.0", "Import"), ("Demo-Office", "1.0", "Import")]
    assert importer.import_button.isEnabled()
    with qtbot.waitSignal(importer.task_finished, timeout=60000) as done:
        importer.import_button.click()
    assert done.args[0].state is TaskState.COMPLETE
    assert sorted(layer.name for layer in services.layers.list_layers()) == ["Demo-Office", "Demo-Win11"]
    with qtbot.waitSignal(importer.previewed, timeout=10000):
        importer.preview_button.click()
    assert {row[2] for row in preview_rows(importer)} == {"Already here"}
    assert not importer.import_button.isEnabled()


def test_a_conflict_is_shown_and_read_only_starts_nothing(
    qtbot: QtBot, event_loop: asyncio.AbstractEventLoop, demo: Services, runner: TaskRunner,
    second: tuple[Services, TaskRunner], tmp_path: Path, services_for: object,
) -> None:
    folder = tmp_path / "export"
    from app.services.transfer import Destination, TransferService

    runner.wait(TransferService.for_services(demo).start_export(runner, Destination(str(folder)), ["Demo-Tools"]), 60)
    services, runner2 = second
    services.layers.create_layer("Demo-Tools", LayerType.OS)  # same name, another type
    importer = open_dialog(qtbot, services, runner2)
    importer.import_from.path.setText(str(folder))
    with qtbot.waitSignal(importer.previewed, timeout=10000):
        importer.preview_button.click()
    rows = preview_rows(importer)
    assert ("Demo-Tools", "1.0", "Conflict") in rows
    assert "1 conflict(s)" in importer.import_message.text()

    read_only = Services.for_caller(services.home, services.catalog, Caller("viewer", frozenset({Role.READ_ONLY}),
                                                                            PrincipalKind.LOCAL_USER), services.secrets)
    viewer = open_dialog(qtbot, read_only, runner2)
    assert not viewer.export_button.isEnabled() and "Read Only" in viewer.export_button.toolTip()
    viewer.import_from.path.setText(str(folder))
    with qtbot.waitSignal(viewer.previewed, timeout=10000):
        viewer.preview_button.click()
    assert not viewer.import_button.isEnabled()
