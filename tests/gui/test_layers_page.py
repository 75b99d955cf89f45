"""The Layers page over a real catalog, repository and task runner: type tabs and filter, creating a layer,
importing a version (progress, details, cancel), refused deletes showing the service's reason, role-based
disabling, and the demo lab offered on an empty catalog."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from PySide6.QtWidgets import QDialogButtonBox, QMessageBox, QWidget
from pytestqt.qtbot import QtBot
from shiboken6 import isValid

from app.catalog.models import LayerType, Role, TaskState
from app.services import Services
from app.services.demo import DEMO_TEMPLATE
from app.services.templates import TemplateSpec
from app.tasks.runner import TaskRunner
from tests.conftest import ServicesFactory
from tests.gui.test_tasks_page import Ticker, answer, settled  # noqa: F401 - settled: an autouse fixture
from ui.layers_page import ImportDialog, LayersPage, NewLayerDialog


@pytest.fixture
def runner(admin: Services) -> Iterator[TaskRunner]:
    runner = TaskRunner(admin.catalog, admin.caller, poll_s=0.1, progress_interval_s=0.05)
    yield runner
    runner.shutdown()


def open_page(qtbot: QtBot, services: Services, runner: TaskRunner) -> LayersPage:
    page = LayersPage(services, runner)
    qtbot.addWidget(page)
    page.resize(1100, 700)
    page.show()
    with qtbot.waitSignal(page.loaded, timeout=5000):
        page.refresh()
    return page


def shown(page: LayersPage) -> list[str]:
    return sorted(page.proxy.index(r, 0).data() for r in range(page.proxy.rowCount()))


def dialog_of(page: QWidget, qtbot: QtBot, kind: type) -> object:
    qtbot.waitUntil(lambda: page.findChild(kind) is not None, timeout=3000)
    return page.findChild(kind)


def ok(dialog: NewLayerDialog | ImportDialog) -> None:
    dialog.buttons.button(QDialogButtonBox.StandardButton.Ok).click()


def test_type_tabs_and_filter_and_the_templates_using_each_layer(
    qtbot: QtBot, event_loop: asyncio.AbstractEventLoop, lab: Services, runner: TaskRunner,
) -> None:
    lab.templates.create_template("Finance", TemplateSpec(os="Win11:1.0", apps=("Office:2024",)))
    page = open_page(qtbot, lab, runner)
    assert len(shown(page)) == 7 and not page.empty_banner.isVisible()
    page.type_tabs.setCurrentIndex(1)
    assert shown(page) == ["Win10", "Win11"]
    page.type_tabs.setCurrentIndex(2)
    assert shown(page) == ["Citrix-VDA"]
    page.type_tabs.setCurrentIndex(3)
    assert shown(page) == ["Chrome", "Notepad++", "Office", "Paint"]
    page.filter.setText("finance")  # the "Used by templates" column is searched too
    assert shown(page) == ["Office"]
    page.type_tabs.setCurrentIndex(0)
    assert shown(page) == ["Office", "Win11"]
    headers = [page.model.headerData(c, page.table.horizontalHeader().orientation())
               for c in range(page.model.columnCount())]
    assert page.proxy.index(0, headers.index("Used by templates")).data() == "Finance"


def test_new_layer_dialog_creates_the_layer_or_shows_why_not(
    qtbot: QtBot, event_loop: asyncio.AbstractEventLoop, lab: Services, runner: TaskRunner,
) -> None:
    page = open_page(qtbot, lab, runner)
    page.new_button.click()
    dialog = dialog_of(page, qtbot, NewLayerDialog)
    assert isinstance(dialog, NewLayerDialog)
    assert [dialog.os_layer.itemText(i) for i in range(dialog.os_layer.count())] == ["Win10", "Win11"]
    dialog.name.setText("Office")
    dialog.type.setCurrentIndex(dialog.type.findData(LayerType.APP))
    dialog.os_layer.setCurrentText("Win11")
    ok(dialog)
    qtbot.waitUntil(lambda: "already exists" in dialog.message.text(), timeout=3000)
    assert dialog.isVisible()

    dialog.name.setText("Visio")
    dialog.description.setText("Diagrams")
    with qtbot.waitSignal(page.details_loaded, timeout=5000) as loaded:
        ok(dialog)
    assert loaded.args == ["Visio"]
    assert page.selected_layer() is not None and page.selected_layer().name == "Visio"
    info = lab.layers.get_layer("Visio").layer
    assert (info.type, info.os_layer, info.description) == (LayerType.APP, "Win11", "Diagrams")


def _source(tmp_path: Path) -> tuple[Path, Path]:
    folder = tmp_path / "visio"
    (folder / "Program Files" / "Visio").mkdir(parents=True)
    (folder / "Program Files" / "Visio" / "visio.exe").write_bytes(b"v" * 2048)
    (folder / "Program Files" / "Visio" / "stencils.vss").write_bytes(b"s" * 1024)
    reg = tmp_path / "visio.reg"
    reg.write_text("Windows Registry Editor Version 5.00\r\n\r\n[HKEY_LOCAL_MACHINE\\SOFTWARE\\Visio]\r\n"
                   '"Version"="16"\r\n\r\n', encoding="utf-16")
    return folder, reg


def test_import_version_runs_as_a_task_with_progress_then_shows_the_contents_and_audit(
    qtbot: QtBot, event_loop: asyncio.AbstractEventLoop, lab: Services, runner: TaskRunner, tmp_path: Path,
) -> None:
    folder, reg = _source(tmp_path)
    page = open_page(qtbot, lab, runner)
    assert not page.import_button.isEnabled()  # nothing selected yet
    assert page.select_layer("Office")
    page.import_button.click()
    dialog = dialog_of(page, qtbot, ImportDialog)
    assert isinstance(dialog, ImportDialog)
    assert not dialog.image.isEnabled()
    dialog.kind.setCurrentIndex(1)  # a WIM file takes an image index
    assert dialog.image.isEnabled()
    dialog.kind.setCurrentIndex(0)
    dialog.source.setText(str(tmp_path / "missing"))
    dialog.version.setText("2025")
    ok(dialog)
    qtbot.waitUntil(lambda: "does not exist" in dialog.message.text(), timeout=3000)
    dialog.source.setText(str(folder))
    dialog.registry.addItem(str(reg))
    dialog.comment.setText("monthly channel")
    ok(dialog)
    qtbot.waitUntil(lambda: len(page.task_strips()) == 1, timeout=5000)
    (strip,) = page.task_strips()
    with qtbot.waitSignal(strip.finished, timeout=30000) as ended:
        pass
    assert ended.args[0].state is TaskState.COMPLETE
    assert strip.bar.value() == 100 and "done" in strip.label.text()
    assert lab.layers.get_version("Office:2025").comment == "monthly channel"

    qtbot.waitUntil(lambda: [v.name for v in page.versions.records()] == ["2024", "2025"], timeout=5000)
    page.versions_table.selectRow(1)
    qtbot.waitUntil(lambda: page.contents.toPlainText().startswith("Office:2025"), timeout=5000)
    text = page.contents.toPlainText()
    assert "Files:     2 (3.0 KiB)" in text
    assert "Registry:  1 change (HKLM\\SOFTWARE 1)" in text and "set HKLM\\SOFTWARE\\Visio\\Version" in text
    page.versions_table.selectRow(0)  # the lab's versions were never imported
    qtbot.waitUntil(lambda: page.contents.toPlainText().startswith("Office:2024"), timeout=5000)
    assert "Contents unavailable" in page.contents.toPlainText()
    operations = {e.operation for e in page.audit.records()}
    assert {"layer.create", "layer.version.add", "layer.version.state"} <= operations
    assert all(e.object_name.startswith("Office") for e in page.audit.records())


def test_an_import_can_be_canceled_from_its_progress_strip(
    qtbot: QtBot, event_loop: asyncio.AbstractEventLoop, lab: Services, runner: TaskRunner, tmp_path: Path,
) -> None:
    folder, _reg = _source(tmp_path)
    busy = [runner.submit(Ticker(f"busy {n}")) for n in range(2)]  # both workers: the import waits its turn
    page = open_page(qtbot, lab, runner)
    page.select_layer("Chrome")
    page.import_button.click()
    dialog = dialog_of(page, qtbot, ImportDialog)
    assert isinstance(dialog, ImportDialog)
    dialog.source.setText(str(folder))
    dialog.version.setText("121")
    ok(dialog)
    qtbot.waitUntil(lambda: len(page.task_strips()) == 1, timeout=5000)
    (strip,) = page.task_strips()
    qtbot.waitUntil(lambda: strip.task is not None, timeout=3000)
    assert strip.cancel_button.isEnabled()
    with qtbot.waitSignal(strip.finished, timeout=10000) as ended:
        strip.cancel_button.click()
    assert ended.args[0].state is TaskState.CANCELED
    assert "canceled; nothing was kept" in strip.label.text()
    for task_id in busy:
        lab.tasks.cancel(task_id)
    # Once a worker is free the canceled import undoes itself: the version is gone again.
    qtbot.waitUntil(lambda: [v.name for v in lab.layers.get_layer("Chrome").versions] == ["120"], timeout=5000)


def test_a_refused_delete_shows_the_services_reason(
    qtbot: QtBot, event_loop: asyncio.AbstractEventLoop, lab: Services, runner: TaskRunner,
) -> None:
    lab.templates.create_template("Finance", TemplateSpec(os="Win11:1.0", apps=("Office:2024",)))
    page = open_page(qtbot, lab, runner)
    page.select_layer("Office")
    page.delete_button.click()
    answer(page, qtbot, "confirm", "Delete")
    text = answer(page, qtbot, "message", "OK")
    assert text == ("Layer 'Office' is in use and was not deleted: version 2024: image template 'Finance'.")

    qtbot.waitUntil(lambda: page.selected_version() is not None, timeout=5000)
    page.delete_version_button.click()
    answer(page, qtbot, "confirm", "Delete")
    text = answer(page, qtbot, "message", "OK")
    assert text == "Version Office:2024 is in use and was not deleted: image template 'Finance'."
    assert lab.layers.get_layer("Office").layer.version_count == 1

    page.select_layer("Paint")
    page.delete_button.click()
    answer(page, qtbot, "confirm", "Cancel")  # asked, then not done
    page.delete_button.click()
    with qtbot.waitSignal(page.loaded, timeout=5000):
        answer(page, qtbot, "confirm", "Delete")
    assert "Paint" not in shown(page)
    assert not [box for box in page.findChildren(QMessageBox) if box.isVisible()]


def test_a_role_without_permission_sees_disabled_buttons_with_the_reason(
    qtbot: QtBot, event_loop: asyncio.AbstractEventLoop, lab: Services, runner: TaskRunner,
    services_for: ServicesFactory,
) -> None:
    reader = open_page(qtbot, services_for(Role.READ_ONLY), runner)
    reader.select_layer("Office")
    for button in (reader.new_button, reader.import_button, reader.delete_button, reader.delete_version_button):
        assert not button.isEnabled()
        assert "read_only (Read Only) may not" in button.toolTip(), button.text()
    assert "create, change or delete layers" in reader.new_button.toolTip()
    assert "Ask an Administrator" in reader.delete_button.toolTip()

    apps = open_page(qtbot, services_for(Role.MANAGE_APP_LAYERS), runner)
    assert apps.new_button.isEnabled() and apps.new_button.toolTip() == "Create an OS, platform or app layer."
    apps.select_layer("Win11")
    assert not apps.delete_button.isEnabled() and not apps.import_button.isEnabled()
    assert "may not create, change or delete OS layers" in apps.delete_button.toolTip()
    apps.select_layer("Office")
    assert apps.delete_button.isEnabled() and apps.import_button.isEnabled()
    assert apps.delete_button.toolTip() == "Delete the selected layer with all its versions."
    assert not apps.demo_button.isEnabled() and "OS layers" in apps.demo_button.toolTip()
    apps.new_button.click()
    dialog = dialog_of(apps, qtbot, NewLayerDialog)
    assert isinstance(dialog, NewLayerDialog)
    enabled = {LayerType(dialog.type.itemData(i)): dialog.type.model().item(i).isEnabled()
               for i in range(dialog.type.count())}
    assert enabled == {LayerType.OS: False, LayerType.PLATFORM: False, LayerType.APP: True}
    assert LayerType(dialog.type.currentData()) is LayerType.APP
    dialog.reject()


def test_an_empty_catalog_offers_the_demo_lab_which_is_built_in_the_background(
    qtbot: QtBot, event_loop: asyncio.AbstractEventLoop, admin: Services, runner: TaskRunner,
) -> None:
    page = open_page(qtbot, admin, runner)
    assert page.empty_banner.isVisible() and page.demo_button.isEnabled()
    percents: list[int] = []
    page.demo_progress.valueChanged.connect(percents.append)
    with qtbot.waitSignal(page.demo_finished, timeout=60000) as finished:
        page.demo_button.click()
        assert not page.demo_button.isEnabled()  # one demo at a time
    lab = finished.args[0]
    assert lab is not None and lab.template == DEMO_TEMPLATE
    assert percents and percents == sorted(percents) and percents[-1] == 100
    qtbot.waitUntil(lambda: len(shown(page)) == 5 and not page.empty_banner.isVisible(), timeout=5000)
    assert "demo – not bootable" in page.status.text()
    assert [t.name for t in admin.templates.list_templates()] == [DEMO_TEMPLATE]


def test_the_first_run_page_explains_the_layer_types_and_leads_to_importing_an_os_layer(
    qtbot: QtBot, event_loop: asyncio.AbstractEventLoop, admin: Services, runner: TaskRunner,
    services_for: ServicesFactory,
) -> None:
    page = open_page(qtbot, admin, runner)
    assert page.empty_banner.isVisible()
    text = page.demo_label.text()
    assert all(kind in text for kind in ("<b>OS layer</b>", "<b>Platform layer</b>", "<b>App layers</b>"))
    assert page.first_os_button.isEnabled()
    page.first_os_button.click()
    dialog = dialog_of(page, qtbot, NewLayerDialog)
    assert isinstance(dialog, NewLayerDialog) and dialog.type.currentData() == LayerType.OS
    dialog.name.setText("Win11")
    ok(dialog)
    imported = dialog_of(page, qtbot, ImportDialog)
    assert isinstance(imported, ImportDialog)
    assert page.selected_layer() is not None and page.selected_layer().name == "Win11"
    assert admin.layers.get_layer("Win11").layer.type is LayerType.OS
    assert not page.empty_banner.isVisible()
    imported.reject()

    # A role that may not create OS layers is told why, before trying.
    reader = open_page(qtbot, services_for(Role.READ_ONLY, username="viewer"), runner)
    reader.empty_banner.setVisible(True)
    reader.refresh()
    qtbot.waitUntil(lambda: not reader.first_os_button.isEnabled(), timeout=3000)
    assert reader.first_os_button.toolTip()


def test_packaging_actions_follow_the_role_and_the_version(
    qtbot: QtBot, event_loop: asyncio.AbstractEventLoop, lab: Services, runner: TaskRunner,
    services_for: ServicesFactory, tmp_path: Path,
) -> None:
    from app.services.packaging import packaging_service
    from ui.layers_page import FinalizeDialog, PackagingDialog

    packaging_service(lab).add_packaging_version("Office", "2025")
    reader = open_page(qtbot, services_for(Role.READ_ONLY), runner)
    reader.select_layer("Office")
    qtbot.waitUntil(lambda: reader.versions.rowCount() == 2, timeout=3000)
    for button in (reader.package_button, reader.finalize_button, reader.abandon_button):
        assert not button.isEnabled() and "read_only (Read Only) may not" in button.toolTip(), button.text()

    page = open_page(qtbot, lab, runner)
    page.select_layer("Win11")
    qtbot.waitUntil(lambda: page.versions.rowCount() == 2, timeout=3000)
    assert not page.package_button.isEnabled() and "imported from a gold disk" in page.package_button.toolTip()
    page.select_layer("Office")
    qtbot.waitUntil(lambda: page.versions.rowCount() == 2 and page.selected_version() is not None, timeout=3000)
    page.versions_table.selectRow(1)  # 2025, editing
    assert page.package_button.isEnabled() and page.finalize_button.isEnabled() and page.abandon_button.isEnabled()
    page.versions_table.selectRow(0)  # 2024, deployable
    assert not page.finalize_button.isEnabled() and "Select a version being edited." in page.finalize_button.toolTip()

    # The dialog shows the service's refusal (one packaging disk per layer at a time) and creates nothing.
    page.package_button.click()
    dialog = dialog_of(page, qtbot, PackagingDialog)
    assert isinstance(dialog, PackagingDialog)
    assert [dialog.prerequisites.item(i).text() for i in range(dialog.prerequisites.count())] == ["Chrome",
                                                                                                 "Notepad++"]
    dialog.version.setText("2026")
    dialog.output.setText(str(tmp_path))
    ok(dialog)
    qtbot.waitUntil(lambda: "already has version 2025 being edited" in dialog.message.text(), timeout=5000)
    assert [v.name for v in lab.layers.get_layer("Office").versions] == ["2024", "2025"]
    dialog.reject()

    page.versions_table.selectRow(1)
    page.finalize_button.click()
    finalize = dialog_of(page, qtbot, FinalizeDialog)
    assert isinstance(finalize, FinalizeDialog)
    finalize.disk.setText(str(tmp_path / "missing.vhdx"))
    ok(finalize)
    qtbot.waitUntil(lambda: "does not exist" in finalize.message.text(), timeout=5000)
    assert lab.layers.get_version("Office:2025").state.value == "editing"
    finalize.reject()


def test_a_packaging_disk_through_a_connector_and_its_finalize_from_there(
    qtbot: QtBot, event_loop: asyncio.AbstractEventLoop, admin: Services, runner: TaskRunner,
    demo_lab_template: Path, tmp_path: Path,
) -> None:
    """The demo lab's layers for real: the dialog offers the connectors, the disk goes to the folder connector,
    and the finalize dialog fetches it from there by default (a file can still be chosen instead)."""
    from app.services.packaging import packaging_service
    from tests.conftest import demo_lab
    from ui.layers_page import FinalizeDialog, PackagingDialog

    demo_lab(admin, demo_lab_template)
    shelf = tmp_path / "shelf"
    shelf.mkdir()
    admin.connectors.add_connector("Lab-Folder", "folder", endpoint=str(shelf))
    page = open_page(qtbot, admin, runner)
    page.select_layer("Demo-Tools")
    qtbot.waitUntil(lambda: page.versions.rowCount() == 1 and page.package_button.isEnabled(), timeout=3000)
    page.package_button.click()
    dialog = dialog_of(page, qtbot, PackagingDialog)
    assert isinstance(dialog, PackagingDialog)
    qtbot.waitUntil(lambda: dialog.deliver_to.count() == 2, timeout=3000)
    assert dialog.deliver_to.itemText(1) == "Connector Lab-Folder (folder)"
    assert dialog.output.isEnabled()
    dialog.deliver_to.setCurrentIndex(1)
    assert not dialog.output.isEnabled() and not dialog.browse_output.isEnabled()
    dialog.version.setText("2")
    dialog.format.setCurrentIndex(dialog.format.findText("QCOW2"))
    ok(dialog)
    qtbot.waitUntil(lambda: not isValid(dialog) or not dialog.isVisible(), timeout=10000)  # deleted on close
    assert runner.wait(runner_task(admin, "layer.package"), timeout_s=300) is TaskState.COMPLETE
    disk = next(shelf.glob("*.qcow2"))
    record = packaging_service(admin).get_packaging("Demo-Tools:2")
    assert record.disk is not None and record.disk.delivery is not None and record.disk.path == str(disk)

    page.refresh()
    qtbot.waitUntil(lambda: page.versions.rowCount() == 2, timeout=3000)
    page.versions_table.selectRow(1)
    qtbot.waitUntil(lambda: page.finalize_button.isEnabled(), timeout=3000)
    page.finalize_button.click()
    finalize = dialog_of(page, qtbot, FinalizeDialog)
    assert isinstance(finalize, FinalizeDialog)
    assert finalize.from_connector.isChecked() and not finalize.disk.isEnabled()
    assert finalize.from_connector.text() == "&Fetch it from connector Lab-Folder"
    assert finalize.delivered_to.text() == str(disk)
    finalize.from_file.setChecked(True)
    assert finalize.disk.isEnabled()
    finalize.disk.setText(str(tmp_path / "missing.vhdx"))
    ok(finalize)
    qtbot.waitUntil(lambda: "does not exist" in finalize.message.text(), timeout=5000)
    finalize.from_connector.setChecked(True)
    ok(finalize)
    qtbot.waitUntil(lambda: not isValid(finalize) or not finalize.isVisible(), timeout=10000)
    assert runner.wait(runner_task(admin, "layer.finalize"), timeout_s=300) is TaskState.COMPLETE
    assert admin.layers.get_version("Demo-Tools:2").state.value == "deployable"


def runner_task(services: Services, kind: str) -> int:
    """The newest task of ``kind``."""
    return max(t.id for t in services.tasks.list_tasks() if t.kind == kind)
