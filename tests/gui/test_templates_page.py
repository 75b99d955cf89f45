"""The Image templates screen: the priority editor (model checks, drops, keyboard moves, the conflict report
next to it, one save), the template wizard (create, edit, a failed save that keeps the input), clone, history,
publish, and buttons that follow the caller's roles."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from PySide6.QtCore import QMimeData, QModelIndex, Qt
from PySide6.QtWidgets import QWizard
from pytestqt.modeltest import ModelTester
from pytestqt.qtbot import QtBot

from app.catalog.models import DiskFormat, Role, TaskState
from app.console.template_wizard import PriorityOrder, Step
from app.services import Services
from app.services.templates import TemplateSpec
from tests.conftest import ServicesFactory
from tests.unit.test_console_queries import import_stack
from ui.priority_editor import MIME_TYPE, PriorityDialog, PriorityEditor, PriorityModel, PriorityRole
from ui.template_wizard import TemplateWizard
from ui.templates_page import AskDialog, HistoryDialog, TemplatesPage

ROOT = Path(__file__).resolve().parents[2]


def _shown(model: PriorityModel) -> list[str]:
    return [model.index(r, 0).data(PriorityRole.REF) for r in range(model.rowCount())]


# --- the priority model ------------------------------------------------------------------------------------


def test_priority_model_mirrors_the_list_and_moves_by_drop(qtmodeltester: ModelTester) -> None:
    order = PriorityOrder(["Office:1", "Chrome:1", "Notepad:1"])  # lowest first
    model = PriorityModel(order, "Win11:1", "Citrix:1")
    qtmodeltester.check(model)
    assert _shown(model) == ["Citrix:1", "Notepad:1", "Chrome:1", "Office:1", "Win11:1"], "top wins"
    assert model.index(0, 0).data(PriorityRole.KIND) == "platform"
    assert not model.flags(model.index(0, 0)) & Qt.ItemFlag.ItemIsDragEnabled
    assert not model.flags(model.index(4, 0)) & Qt.ItemFlag.ItemIsDragEnabled
    assert model.flags(model.index(2, 0)) & Qt.ItemFlag.ItemIsDragEnabled

    moves: list[tuple[int, int]] = []
    model.rowsMoved.connect(lambda _p, start, _end, _d, row: moves.append((start, row)))
    # Drag Office (row 3) above Notepad (drop before row 1): it becomes the highest app layer.
    data = model.mimeData([model.index(3, 0)])
    assert model.canDropMimeData(data, Qt.DropAction.MoveAction, 1, 0, QModelIndex())
    assert model.dropMimeData(data, Qt.DropAction.MoveAction, 1, 0, QModelIndex())
    assert order.refs() == ("Chrome:1", "Notepad:1", "Office:1") and moves == [(3, 1)]
    # A drop above the platform layer or below the OS layer lands at the nearest end of the app layers.
    assert not model.dropMimeData(model.mimeData([model.index(1, 0)]), Qt.DropAction.MoveAction, 0, 0,
                                  QModelIndex()), "already the highest app layer: nothing moves"
    assert order.refs() == ("Chrome:1", "Notepad:1", "Office:1")
    assert model.dropMimeData(model.mimeData([model.index(1, 0)]), Qt.DropAction.MoveAction, -1, -1, QModelIndex())
    assert _shown(model) == ["Citrix:1", "Notepad:1", "Chrome:1", "Office:1", "Win11:1"]
    qtmodeltester.check(model)

    # Only the model's own rows: fixed rows, other models' rows and other data are refused.
    assert model.mimeData([model.index(0, 0)]).formats() == []
    other = PriorityModel(PriorityOrder(["Office:1", "Chrome:1"]), "Win11:1")
    foreign = other.mimeData([other.index(0, 0)])
    assert not model.canDropMimeData(foreign, Qt.DropAction.MoveAction, 1, 0, QModelIndex())
    assert not model.dropMimeData(foreign, Qt.DropAction.MoveAction, 1, 0, QModelIndex())
    text = QMimeData()
    text.setText("Office:1")
    assert not model.dropMimeData(text, Qt.DropAction.MoveAction, 1, 0, QModelIndex())
    forged = QMimeData()
    forged.setData(MIME_TYPE, b"0:1")
    assert not model.dropMimeData(forged, Qt.DropAction.MoveAction, 1, 0, QModelIndex())
    assert not model.dropMimeData(model.mimeData([model.index(2, 0)]), Qt.DropAction.CopyAction, 1, 0,
                                  QModelIndex())
    assert order.refs() == ("Office:1", "Chrome:1", "Notepad:1")

    # The list changed elsewhere (the wizard): the model follows.
    order.replace(["A:1"])
    assert _shown(model) == ["Citrix:1", "A:1", "Win11:1"]
    model.set_fixed("Win11:1", None)
    assert _shown(model) == ["A:1", "Win11:1"]
    qtmodeltester.check(model)


def test_keyboard_moves_the_selected_app_layer(qtbot: QtBot, event_loop: asyncio.AbstractEventLoop,
                                               lab: Services) -> None:
    order = PriorityOrder(["Office:2024", "Chrome:120", "Notepad++:8.6"])
    editor = PriorityEditor(lab, order, "Win11:1.0", "Citrix-VDA:1.0")
    qtbot.addWidget(editor)
    editor.show()
    view = editor.view
    view.setFocus()
    view.setCurrentIndex(editor.model.index(3, 0))  # Office, the lowest app layer
    with qtbot.waitSignal(editor.changed):
        qtbot.keyClick(view, Qt.Key.Key_Up, Qt.KeyboardModifier.ControlModifier)
    assert order.refs() == ("Chrome:120", "Office:2024", "Notepad++:8.6")
    assert view.currentIndex().data(PriorityRole.REF) == "Office:2024", "the selection follows the layer"
    qtbot.keyClick(view, Qt.Key.Key_Up, Qt.KeyboardModifier.ControlModifier)
    qtbot.keyClick(view, Qt.Key.Key_Up, Qt.KeyboardModifier.ControlModifier)  # the platform layer stays on top
    assert order.refs() == ("Chrome:120", "Notepad++:8.6", "Office:2024")
    assert _shown(editor.model)[0] == "Citrix-VDA:1.0"
    qtbot.keyClick(view, Qt.Key.Key_Down, Qt.KeyboardModifier.ControlModifier)
    assert order.refs() == ("Chrome:120", "Office:2024", "Notepad++:8.6")
    view.setCurrentIndex(editor.model.index(4, 0))  # the OS layer does not move
    qtbot.keyClick(view, Qt.Key.Key_Up, Qt.KeyboardModifier.ControlModifier)
    assert order.refs() == ("Chrome:120", "Office:2024", "Notepad++:8.6")
    editor.raise_button.click()  # nothing selectable is current: nothing moves
    qtbot.waitUntil(lambda: "no content in the layer repository" in editor.conflicts.summary.text(), timeout=5000)


def test_priority_dialog_saves_the_order_in_one_call(qtbot: QtBot, event_loop: asyncio.AbstractEventLoop,
                                                      lab: Services) -> None:
    lab.templates.create_template("Sales", TemplateSpec(os="Win11:1.0", platform="Citrix-VDA:1.0",
                                                        apps=("Office:2024", "Chrome:120", "Notepad++:8.6")))
    template = lab.templates.get_template("Sales")
    dialog = PriorityDialog(lab, template)
    qtbot.addWidget(dialog)
    dialog.show()
    # Layers without stored content: the report says so instead of failing.
    qtbot.waitUntil(lambda: "have none yet" in dialog.editor.conflicts.summary.text(), timeout=5000)
    assert "Office:2024 (deployable) has no content" in dialog.editor.conflicts.summary.text()
    assert not dialog.save_button.isEnabled(), "nothing to save before a move"
    model = dialog.editor.model
    # Notepad++ (the top app layer) dropped just above the OS layer: now the lowest.
    model.dropMimeData(model.mimeData([model.index(1, 0)]), Qt.DropAction.MoveAction, 4, 0, QModelIndex())
    assert dialog.order.refs() == ("Notepad++:8.6", "Office:2024", "Chrome:120")
    assert dialog.save_button.isEnabled()
    dialog.comment.setText("Chrome wins")
    with qtbot.waitSignal(dialog.saved, timeout=5000):
        dialog.save_button.click()
    saved = lab.templates.get_template("Sales")
    assert saved.app_layers == ("Notepad++:8.6", "Office:2024", "Chrome:120") and saved.revision == 2
    assert lab.templates.history("Sales")[-1].comment == "Chrome wins"
    audit = [e for e in lab.audit.list_entries() if e.operation == "template.priority"]
    assert [e.comment for e in audit] == ["Chrome wins"]


def test_a_refused_priority_save_shows_why_and_keeps_the_order(
    qtbot: QtBot, event_loop: asyncio.AbstractEventLoop, lab: Services
) -> None:
    lab.templates.create_template("Sales", TemplateSpec(os="Win11:1.0", apps=("Office:2024", "Chrome:120")))
    dialog = PriorityDialog(lab, lab.templates.get_template("Sales"))
    qtbot.addWidget(dialog)
    dialog.order.move(0, 1)
    lab.templates.update_template("Sales", TemplateSpec(os="Win11:1.0", apps=("Office:2024",)))  # meanwhile
    dialog.save_button.click()
    qtbot.waitUntil(lambda: "not in template" in dialog.error.text(), timeout=5000)
    assert dialog.result() == 0, "the dialog stays open"
    assert dialog.order.refs() == ("Chrome:120", "Office:2024") and dialog.save_button.isEnabled()


def test_the_conflict_report_follows_the_order(qtbot: QtBot, event_loop: asyncio.AbstractEventLoop,
                                               admin: Services, tmp_path: Path) -> None:
    import_stack(admin, tmp_path)
    order = PriorityOrder(["Office:1", "Tools:1"])
    editor = PriorityEditor(admin, order, "Win11:1", "Citrix:1")
    qtbot.addWidget(editor)
    editor.show()
    with qtbot.waitSignal(editor.conflicts.computed, timeout=10000):
        editor.recompute()
    winners = {path.casefold(): who for path, who in editor.conflicts.winners().items()}
    assert winners["hklm\\software\\shared\\owner"] == "Tools"
    assert winners["windows\\notepad.exe"] == "Citrix"
    assert editor.conflicts.table.rowCount() == 5 and "5 contested" in editor.conflicts.summary.text()
    editor.view.setCurrentIndex(editor.model.index(1, 0))  # Tools, the top app layer
    with qtbot.waitSignal(editor.conflicts.computed, timeout=10000):
        qtbot.keyClick(editor.view, Qt.Key.Key_Down, Qt.KeyboardModifier.ControlModifier)
    winners = {path.casefold(): who for path, who in editor.conflicts.winners().items()}
    assert winners["hklm\\software\\shared\\owner"] == "Office"
    assert winners["program files\\office\\config.ini"] == "Office"
    assert winners["windows\\notepad.exe"] == "Citrix", "the platform layer always wins"


# --- the page, its buttons and the wizard ------------------------------------------------------------------


def _page(qtbot: QtBot, services: Services) -> TemplatesPage:
    page = TemplatesPage(services)
    qtbot.addWidget(page)
    page.resize(1100, 700)
    page.show()
    with qtbot.waitSignal(page.loaded, timeout=5000):
        page.refresh()
    return page


def _select(qtbot: QtBot, page: TemplatesPage, name: str) -> None:
    assert page.select_template(name)
    qtbot.waitUntil(lambda: page.images_status.text() not in ("", "Loading…"), timeout=5000)


def test_buttons_follow_the_callers_roles(qtbot: QtBot, event_loop: asyncio.AbstractEventLoop, lab: Services,
                                          services_for: ServicesFactory) -> None:
    lab.templates.create_template("Sales", TemplateSpec(os="Win11:1.0"))
    page = _page(qtbot, services_for(Role.READ_ONLY))
    assert page.objectName() == "image_templates" and page.status.text() == "1 item"
    assert not page.new_button.isEnabled() and "Manage Image Templates" in page.new_button.toolTip()
    _select(qtbot, page, "Sales")
    assert page.history_button.isEnabled()
    assert not page.edit_button.isEnabled() and "may not create, change or delete" in page.edit_button.toolTip()
    assert not page.publish_button.isEnabled() and "Publish Layered Images" in page.publish_button.toolTip()
    assert "No image has been published from Sales yet." in page.images_status.text()

    publisher = _page(qtbot, services_for(Role.PUBLISH_LAYERED_IMAGES))
    assert not publisher.publish_button.isEnabled(), "nothing selected yet"
    _select(qtbot, publisher, "Sales")
    assert publisher.publish_button.isEnabled() and not publisher.priority_button.isEnabled()


def _wizard(qtbot: QtBot, page: TemplatesPage) -> TemplateWizard:
    qtbot.waitUntil(lambda: isinstance(page.dialog, TemplateWizard) and page.dialog.isVisible(), timeout=5000)
    assert isinstance(page.dialog, TemplateWizard)
    return page.dialog


def _next(wizard: TemplateWizard) -> None:
    button = wizard.button(QWizard.WizardButton.NextButton)
    assert button.isEnabled(), wizard.currentPage().error.text()
    button.click()


def test_wizard_creates_a_template_with_the_order_shown(
    qtbot: QtBot, event_loop: asyncio.AbstractEventLoop, lab: Services
) -> None:
    page = _page(qtbot, lab)
    page.new_button.click()
    wizard = _wizard(qtbot, page)
    identity = wizard.page_for(Step.IDENTITY)
    assert not wizard.button(QWizard.WizardButton.NextButton).isEnabled()
    assert "template name is empty" in identity.error.text()
    qtbot.keyClicks(identity.name, "Sales")
    _next(wizard)
    os_page = wizard.page_for(Step.OS)
    assert [os_page.list.item(r).text() for r in range(os_page.list.count())] == [
        "Win10 1.0 (deployable)", "Win11 1.0 (deployable)", "Win11 2.0 (editing)"]
    os_page.select_value("Win11:1.0")
    _next(wizard)
    wizard.page_for(Step.PLATFORM).select_value("Citrix-VDA:1.0")
    _next(wizard)
    apps = wizard.page_for(Step.APPS)
    assert [apps.table.item(r, 0).text() for r in range(apps.table.rowCount())] == ["Chrome", "Notepad++", "Office"]
    for layer in ("Office", "Chrome", "Notepad++"):
        apps.set_checked(layer, True)
    _next(wizard)
    priority = wizard.page_for(Step.PRIORITY)
    model = priority.editor.model
    assert _shown(model) == ["Citrix-VDA:1.0", "Notepad++:8.6", "Chrome:120", "Office:2024", "Win11:1.0"]
    model.dropMimeData(model.mimeData([model.index(3, 0)]), Qt.DropAction.MoveAction, 1, 0, QModelIndex())
    assert _shown(model)[1] == "Office:2024"
    _next(wizard)
    _next(wizard)  # no connector
    disk = wizard.page_for(Step.DISK)
    disk.format_box.setCurrentIndex(disk.format_box.findData(DiskFormat.QCOW2))
    disk.size_box.setValue(40)
    _next(wizard)
    summary = wizard.page_for(Step.SUMMARY)
    assert "Office:2024, Notepad++:8.6, Chrome:120" in summary.text.text()
    qtbot.waitUntil(lambda: "have none yet" in summary.conflicts.summary.text(), timeout=5000)
    qtbot.keyClicks(summary.comment, "sales desks")
    with qtbot.waitSignal(page.loaded, timeout=5000):
        wizard.button(QWizard.WizardButton.FinishButton).click()
    saved = lab.templates.get_template("Sales")
    assert saved.app_layers == ("Chrome:120", "Notepad++:8.6", "Office:2024")
    assert (saved.disk_format, saved.size_gb, saved.platform_version) == (DiskFormat.QCOW2, 40, "Citrix-VDA:1.0")
    assert lab.templates.history("Sales")[-1].comment == "sales desks"
    assert page.selected_template() is not None and page.selected_template().name == "Sales"  # type: ignore[union-attr]
    assert "Saved template Sales (revision 1)" in page.note.text()


def test_a_failed_save_shows_why_and_keeps_the_input(
    qtbot: QtBot, event_loop: asyncio.AbstractEventLoop, lab: Services
) -> None:
    page = _page(qtbot, lab)
    page.new_button.click()
    wizard = _wizard(qtbot, page)
    qtbot.keyClicks(wizard.page_for(Step.IDENTITY).name, "Late")
    _next(wizard)
    wizard.page_for(Step.OS).select_value("Win11:1.0")
    for _ in range(6):
        _next(wizard)
    summary = wizard.page_for(Step.SUMMARY)
    assert wizard.currentPage() is summary
    lab.templates.create_template("late", TemplateSpec(os="Win10:1.0"))  # someone else, meanwhile
    qtbot.keyClicks(summary.comment, "my comment")
    wizard.button(QWizard.WizardButton.FinishButton).click()
    qtbot.waitUntil(lambda: "already exists" in summary.error.text(), timeout=5000)
    assert summary.error.text().startswith("Not saved: ")
    assert wizard.isVisible() and wizard.currentPage() is summary
    assert (wizard.flow.name, wizard.flow.os, summary.comment.text()) == ("Late", "Win11:1.0", "my comment")
    assert wizard.button(QWizard.WizardButton.FinishButton).isEnabled(), "the user can try again"
    wizard.back()
    wizard.back()
    assert wizard.page_for(Step.DISK).size_box.value() == 100
    wizard.reject()


def test_edit_reopens_the_wizard_filled_in(qtbot: QtBot, event_loop: asyncio.AbstractEventLoop,
                                           lab: Services) -> None:
    lab.templates.create_template("Sales", TemplateSpec(os="Win11:1.0", apps=("Office:2024", "Chrome:120"),
                                                        size_gb=60, description="sales desks"))
    page = _page(qtbot, lab)
    _select(qtbot, page, "Sales")
    page.edit_button.click()
    wizard = _wizard(qtbot, page)
    assert wizard.windowTitle() == "Edit image template Sales"
    identity = wizard.page_for(Step.IDENTITY)
    assert identity.name.text() == "Sales" and identity.name.isReadOnly()
    assert identity.description.toPlainText() == "sales desks"
    _next(wizard)
    assert wizard.page_for(Step.OS).list.currentItem().text() == "Win11 1.0 (deployable)"
    _next(wizard)
    _next(wizard)
    apps = wizard.page_for(Step.APPS)
    checked = [apps.table.item(r, 0).text() for r in range(apps.table.rowCount())
               if apps.table.item(r, 0).checkState() == Qt.CheckState.Checked]
    assert checked == ["Chrome", "Office"]
    apps.set_checked("Chrome", False)
    for _ in range(3):
        _next(wizard)
    assert wizard.page_for(Step.DISK).size_box.value() == 60
    _next(wizard)
    with qtbot.waitSignal(page.loaded, timeout=5000):
        wizard.button(QWizard.WizardButton.FinishButton).click()
    assert lab.templates.get_template("Sales").app_layers == ("Office:2024",)


def test_clone_and_history_with_a_diff(qtbot: QtBot, event_loop: asyncio.AbstractEventLoop, lab: Services) -> None:
    lab.templates.create_template("Sales", TemplateSpec(os="Win11:1.0", apps=("Office:2024",)), comment="first")
    lab.templates.update_template("Sales", TemplateSpec(os="Win11:1.0", apps=("Office:2024", "Chrome:120"),
                                                        size_gb=80), comment="second")
    page = _page(qtbot, lab)
    _select(qtbot, page, "Sales")
    page.clone_button.click()
    qtbot.waitUntil(lambda: isinstance(page.dialog, AskDialog) and page.dialog.isVisible(), timeout=5000)
    ask = page.dialog
    assert isinstance(ask, AskDialog)
    assert ask.name.text() == "Sales copy" and ask.ok.isEnabled()
    ask.name.setText("sales")
    assert not ask.ok.isEnabled() and "already exists" in ask.error.text()
    ask.name.setText("Sales-Test")
    ask.comment.setText("for testing")
    with qtbot.waitSignal(page.loaded, timeout=5000):
        ask.ok.click()
    assert lab.templates.get_template("Sales-Test").app_layers == ("Office:2024", "Chrome:120")
    assert page.selected_template().name == "Sales-Test"  # type: ignore[union-attr]

    _select(qtbot, page, "Sales")
    page.history_button.click()
    history = page.dialog
    assert isinstance(history, HistoryDialog)
    qtbot.waitUntil(lambda: "changed from revision 1 to 2" in history.status.text(), timeout=5000)
    assert [history.table.item(r, 3).text() for r in range(2)] == ["second", "first"]
    rows = {history.diff.item(r, 0).text(): (history.diff.item(r, 1).text(), history.diff.item(r, 2).text())
            for r in range(history.diff.rowCount())}
    assert rows == {"App layers (lowest first)": ("Office:2024", "Office:2024, Chrome:120"),
                    "Disk size (GB)": ("100", "80")}
    history.table.selectRow(1)  # revision 1: nothing before it to compare with
    qtbot.waitUntil(lambda: "Choose two different revisions" in history.status.text(), timeout=5000)
    history.table.selectRow(0)
    qtbot.waitUntil(lambda: "changed from revision 1 to 2" in history.status.text(), timeout=5000)
    history.before.setCurrentIndex(1)
    qtbot.waitUntil(lambda: "Choose two different revisions" in history.status.text(), timeout=5000)
    history.reject()


def test_publish_runs_the_task_and_shows_the_image(
    qtbot: QtBot, event_loop: asyncio.AbstractEventLoop, admin: Services, tmp_path: Path
) -> None:
    import_stack(admin, tmp_path)
    admin.templates.create_template("Gold", TemplateSpec(os="Win11:1", platform="Citrix:1",
                                                         apps=("Office:1", "Tools:1"), disk_format=DiskFormat.WIM,
                                                         size_gb=1))
    page = _page(qtbot, admin)
    _select(qtbot, page, "Gold")
    assert page.publish_button.isEnabled()
    page.publish_button.click()
    qtbot.waitUntil(lambda: isinstance(page.dialog, AskDialog) and page.dialog.isVisible(), timeout=5000)
    assert isinstance(page.dialog, AskDialog)
    page.dialog.comment.setText("gold image")
    with qtbot.waitSignal(page.publish_finished, timeout=120_000) as finished:
        page.dialog.ok.click()
    assert finished.args is not None and finished.args[1] is TaskState.COMPLETE, page.note.text()
    qtbot.waitUntil(lambda: page.images.rowCount() == 1, timeout=5000)
    image = page.images.records()[0]
    assert image.name.startswith("Gold_") and Path(image.location).is_file() and image.checksum
    assert [entry["layer"] for entry in image.layers] == ["Win11", "Office", "Tools", "Citrix"]
    assert page.images.index(0, 3).data(Qt.ItemDataRole.ToolTipRole).splitlines()[0] == "platform: Citrix:1"
    assert "published Gold_" in page.note.text()
    page.shutdown()


def test_publish_refused_shows_a_message(qtbot: QtBot, event_loop: asyncio.AbstractEventLoop, lab: Services) -> None:
    lab.templates.create_template("Sales", TemplateSpec(os="Win11:2.0"))
    page = _page(qtbot, lab)
    _select(qtbot, page, "Sales")
    assert not page.publish_button.isEnabled()
    assert "Win11:2.0 is editing, not deployable" in page.publish_button.toolTip()


# --- a real mouse drag (not possible offscreen: QDrag.exec returns at once) --------------------------------

DRAG_SCRIPT = textwrap.dedent("""
    import sys
    from PySide6.QtCore import QPoint, QTimer, Qt
    from PySide6.QtTest import QTest
    from PySide6.QtWidgets import QApplication
    from app.console.template_wizard import PriorityOrder
    from ui.priority_editor import PriorityListView, PriorityModel

    app = QApplication(sys.argv[:1])
    order = PriorityOrder(["Office:1", "Chrome:1", "Notepad:1"])
    view = PriorityListView()
    view.setModel(PriorityModel(order, "Win11:1", "Citrix:1", view))
    view.resize(300, 200)
    view.show()
    QTest.qWaitForWindowExposed(view)
    port = view.viewport()
    source = view.visualRect(view.model().index(3, 0)).center()          # Office, lowest app layer
    target = view.visualRect(view.model().index(1, 0)).topLeft() + QPoint(20, 2)  # above Notepad
    steps = [source + QPoint(0, -dy) for dy in range(0, source.y() - target.y() + 1, 4)] + [target]

    def move(points):
        if points:
            QTest.mouseMove(port, points[0])
            QTimer.singleShot(10, lambda: move(points[1:]))
        else:
            QTest.mouseRelease(port, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier, target)

    QTest.mousePress(port, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier, source)
    QTimer.singleShot(50, lambda: move(steps))
    # Moving past the drag distance starts QDrag.exec, whose own loop the timers above then drive.
    for dy in range(2, 12):
        QTest.mouseMove(port, source + QPoint(0, -dy))
    QTest.qWait(1500)
    print(",".join(order.refs()))
""")


def test_a_real_mouse_drag_reorders_on_the_minimal_platform(tmp_path: Path) -> None:
    env = {**os.environ, "QT_QPA_PLATFORM": "minimal", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", DRAG_SCRIPT], capture_output=True, text=True, cwd=tmp_path,
                          env=env, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "Chrome:1,Notepad:1,Office:1", done.stdout + done.stderr

