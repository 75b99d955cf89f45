"""The Image templates page: the templates, what to do with them (New…, Edit…, Clone…, Priority…, History…,
Publish) and, for the selected one, its layers and the images published from it.

Everything reads and writes through the services in a worker thread; publishing runs as a task (the same
one ``layerctl image publish`` starts) whose progress shows here and on the Tasks page. Buttons for what the
signed-in administrator's roles do not allow are disabled, and their tooltip says which role is needed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from PySide6.QtCore import QCoreApplication, QSortFilterProxyModel, Qt, Signal
from PySide6.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QFormLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPushButton,
    QSplitter,
    QTableView,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)
from shiboken6 import isValid

from app.catalog.models import TaskState
from app.console.template_wizard import clone_name_problem, load_catalog
from app.errors import LayerDeskError
from app.services import Services
from app.services.rbac import Operation
from app.services.views import PublishedImageInfo, TemplateInfo, TemplateRevisionInfo
from app.tasks.runner import TaskRunner
from ui.background import off_ui_thread
from ui.pages import ListPage, fit_columns, format_size, format_when, show_message, spawn
from ui.permissions import guard
from ui.priority_editor import PriorityDialog
from ui.table_model import Column, ItemRole, RecordTableModel
from ui.template_wizard import TemplateWizard

log = logging.getLogger(__name__)

#: How often a running publish is looked at.
PUBLISH_POLL_S = 1.0


#: How a revision's fields read in the history's diff.
FIELD_LABELS = {
    "name": "Name", "description": "Description", "icon": "Icon", "os": "OS layer", "platform": "Platform layer",
    "apps": "App layers (lowest first)", "connector": "Connector", "disk_format": "Disk format",
    "size_gb": "Disk size (GB)", "elastic_mode": "Elastic layering", "sysprep": "Sysprep",
}


def _value(value: Any) -> str:
    if value is None or value == "":
        return "—"
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value) or "—"
    return str(value)


def _short_checksum(checksum: str | None) -> str:
    """``sha256:d3287a8161c2…``: enough to compare by eye; the tooltip has all of it."""
    if not checksum:
        return ""
    kind, _, digest = checksum.rpartition(":")
    return f"{kind}:{digest[:12]}…" if len(digest) > 12 else checksum


def _stack_text(image: PublishedImageInfo) -> str:
    """The image's layers, top (wins) first."""
    return "\n".join(f"{e.get('role', '')}: {e.get('layer', '')}:{e.get('version', '')}"
                     for e in reversed(image.layers))


TEMPLATE_COLUMNS: list[Column[TemplateInfo]] = [
    Column("Name", lambda t: t.name),
    Column("OS layer", lambda t: t.os_version),
    Column("Platform layer", lambda t: t.platform_version or ""),
    Column("App layers", lambda t: str(len(t.app_layers)), sort=lambda t: len(t.app_layers),
           tooltip=lambda t: "\n".join(reversed(t.app_layers)) or "no app layers"),
    Column("Format", lambda t: t.disk_format.value),
    Column("Size (GB)", lambda t: str(t.size_gb), sort=lambda t: t.size_gb),
    Column("Revision", lambda t: str(t.revision), sort=lambda t: t.revision),
    Column("Publishable", lambda t: "yes" if not t.publish_blockers else "no",
           tooltip=lambda t: "\n".join(t.publish_blockers) or "ready to publish"),
]

IMAGE_COLUMNS: list[Column[PublishedImageInfo]] = [
    Column("Image", lambda i: i.name),
    Column("Published", lambda i: format_when(i.created_at), sort=lambda i: i.created_at),
    Column("Revision", lambda i: str(i.template_revision), sort=lambda i: i.template_revision),
    Column("Layers", lambda i: str(len(i.layers)), sort=lambda i: len(i.layers), tooltip=_stack_text),
    Column("Format", lambda i: i.disk_format.value),
    Column("Size", lambda i: format_size(i.size_bytes), sort=lambda i: i.size_bytes),
    Column("Conflicts", lambda i: str(i.conflict_count), sort=lambda i: i.conflict_count),
    Column("Checksum", lambda i: _short_checksum(i.checksum), tooltip=lambda i: i.checksum or ""),
    Column("Location", lambda i: i.location, tooltip=lambda i: i.location),
    Column("By", lambda i: i.created_by),
]


async def run_dialog(dialog: QDialog) -> bool:
    """Open ``dialog`` window-modal without blocking the event loop; ``True`` when it was accepted."""
    finished: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def done(code: int) -> None:
        if not finished.done():
            finished.set_result(code)

    dialog.finished.connect(done)
    dialog.setWindowModality(Qt.WindowModality.WindowModal)
    dialog.open()
    return bool(await finished)


class AskDialog(QDialog):
    """A short question: an optional new name (checked as typed) and a comment for the audit log."""

    def __init__(self, title: str, intro: str, action: str, *, name_label: str | None = None,
                 name_problem: Callable[[str], str] | None = None, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("ask_dialog")
        self.setWindowTitle(title)
        self.setMinimumWidth(460)
        self._name_problem = name_problem
        text = QLabel(intro)
        text.setWordWrap(True)
        self.name = QLineEdit()
        self.name.setAccessibleName(name_label or "Name")
        self.comment = QLineEdit(placeholderText="Kept in the audit log")
        self.comment.setAccessibleName("Comment")
        self.error = QLabel()
        self.error.setObjectName("error")
        self.error.setWordWrap(True)
        self.error.setStyleSheet("color: #b00020")
        self.buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Cancel)
        self.ok = self.buttons.addButton(action, QDialogButtonBox.ButtonRole.AcceptRole)
        self.buttons.accepted.connect(self.accept)
        self.buttons.rejected.connect(self.reject)
        form = QFormLayout()
        if name_label:
            form.addRow(f"{name_label}:", self.name)
            self.name.textChanged.connect(self._check)
        form.addRow("Comment:", self.comment)
        layout = QVBoxLayout(self)
        layout.addWidget(text)
        layout.addLayout(form)
        layout.addWidget(self.error)
        layout.addWidget(self.buttons)
        if name_label:
            self._check()

    def _check(self) -> None:
        problem = self._name_problem(self.name.text()) if self._name_problem else ""
        # An empty field is not an error yet, just not done.
        self.error.setText(problem if self.name.text() else "")
        self.ok.setEnabled(not problem)


class HistoryDialog(QDialog):
    """A template's revisions, and what changed between any two of them."""

    def __init__(self, services: Services, name: str, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("history_dialog")
        self.setWindowTitle(f"History – {name}")
        self.resize(900, 560)
        self._services = services
        self._name = name
        self.revisions: list[TemplateRevisionInfo] = []
        self.table = QTableWidget(0, 4)
        self.table.setHorizontalHeaderLabels(["Revision", "Saved", "By", "Comment"])
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.horizontalHeader().setSectionResizeMode(3, QHeaderView.ResizeMode.Stretch)
        self.table.itemSelectionChanged.connect(self._revision_picked)
        self.before = QComboBox()
        self.before.setAccessibleName("Compare revision")
        self.after = QComboBox()
        self.after.setAccessibleName("with revision")
        self.diff = QTableWidget(0, 3)
        self.diff.setObjectName("diff")
        self.diff.setHorizontalHeaderLabels(["Field", "Before", "After"])
        self.diff.verticalHeader().setVisible(False)
        self.diff.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.diff.setWordWrap(True)
        header = self.diff.horizontalHeader()
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(1, QHeaderView.ResizeMode.Stretch)
        header.setSectionResizeMode(2, QHeaderView.ResizeMode.Stretch)
        self.status = QLabel("Loading…")
        self.status.setWordWrap(True)
        compare = QHBoxLayout()
        compare.addWidget(QLabel("Compare revision"))
        compare.addWidget(self.before)
        compare.addWidget(QLabel("with revision"))
        compare.addWidget(self.after)
        compare.addStretch(1)
        close = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        close.rejected.connect(self.reject)
        splitter = QSplitter(Qt.Orientation.Vertical)
        splitter.addWidget(self.table)
        bottom = QWidget()
        bottom_layout = QVBoxLayout(bottom)
        bottom_layout.setContentsMargins(0, 0, 0, 0)
        bottom_layout.addLayout(compare)
        bottom_layout.addWidget(self.diff, 1)
        bottom_layout.addWidget(self.status)
        splitter.addWidget(bottom)
        layout = QVBoxLayout(self)
        layout.addWidget(splitter, 1)
        layout.addWidget(close)
        self.before.currentIndexChanged.connect(self._compare)
        self.after.currentIndexChanged.connect(self._compare)
        self._filling = True
        self.loading = spawn(self._load())

    async def _load(self) -> None:
        try:
            revisions = await off_ui_thread(self._services.templates.history, self._name)
        except LayerDeskError as exc:
            if isValid(self):
                self.status.setText(str(exc))
            return
        if not isValid(self):
            return
        self.revisions = revisions
        self.table.setRowCount(len(revisions))
        for row, r in enumerate(reversed(revisions)):  # newest first
            for column, text in enumerate((str(r.revision), format_when(r.saved_at), r.saved_by, r.comment)):
                self.table.setItem(row, column, QTableWidgetItem(text))
        self.table.resizeColumnsToContents()
        for combo in (self.before, self.after):
            combo.clear()
            for r in revisions:
                combo.addItem(str(r.revision), r.revision)
        last = len(revisions) - 1
        self.before.setCurrentIndex(max(0, last - 1))
        self.after.setCurrentIndex(last)
        self._filling = False
        await self._show_diff()

    def _revision_picked(self) -> None:
        """A revision picked in the list: compare it with the one before it."""
        rows = self.table.selectionModel().selectedRows()
        if self._filling or not rows:
            return
        index = len(self.revisions) - 1 - rows[0].row()
        self._filling = True
        self.after.setCurrentIndex(index)
        self.before.setCurrentIndex(max(0, index - 1))
        self._filling = False
        self._compare()

    def _compare(self) -> None:
        if not self._filling:
            spawn(self._show_diff())

    async def _show_diff(self) -> None:
        a, b = self.before.currentData(), self.after.currentData()
        if a is None or b is None:
            return
        if a == b:
            self.diff.setRowCount(0)
            self.status.setText("Only one revision so far." if len(self.revisions) == 1
                                else "Choose two different revisions to compare.")
            return
        try:
            changes = await off_ui_thread(self._services.templates.diff, self._name, int(a), int(b))
        except LayerDeskError as exc:
            if isValid(self):
                self.status.setText(str(exc))
            return
        if not isValid(self) or (self.before.currentData(), self.after.currentData()) != (a, b):
            return
        self.diff.setRowCount(len(changes))
        for row, change in enumerate(changes):
            label = FIELD_LABELS.get(change.field, change.field)
            for column, text in enumerate((label, _value(change.before), _value(change.after))):
                item = QTableWidgetItem(text)
                item.setToolTip(text)
                self.diff.setItem(row, column, item)
        self.diff.resizeRowsToContents()
        self.status.setText(f"{len(changes)} field{'s' if len(changes) != 1 else ''} changed from revision {a} "
                            f"to {b}." if changes else f"Revisions {a} and {b} are the same.")


class TemplatesPage(QWidget):
    """The image templates, their actions, and the published images of the selected one."""

    loaded = Signal(int)  # number of templates after a load
    failed = Signal(str)  # a message a user can act on
    #: A publish task ended: its id and final state.
    publish_finished = Signal(int, object)

    def __init__(self, services: Services, runner: TaskRunner | None = None, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("image_templates")
        self.services = services
        self._runner = runner
        self._own_runner = False
        self._select_after_load: str | None = None
        self._images_loading: asyncio.Future[None] | None = None
        #: The dialog or wizard opened last (tests drive it).
        self.dialog: QDialog | None = None

        self.list = ListPage("Image templates", TEMPLATE_COLUMNS, lambda t: t.id,
                             services.templates.list_templates, placeholder="Filter templates…")
        self.list.setObjectName("templates_list")
        self.model = self.list.model
        self.proxy = self.list.proxy
        self.table = self.list.table
        self.filter = self.list.filter
        self.status = self.list.status
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.list.loaded.connect(self._loaded)
        self.list.failed.connect(self.failed)
        self.table.selectionModel().selectionChanged.connect(self._selected)

        self.new_button = QPushButton("&New…")
        self.new_button.setToolTip("Create an image template with the wizard")
        self.new_button.clicked.connect(self.new)
        self.edit_button = QPushButton("&Edit…")
        self.edit_button.setToolTip("Change the selected template in the wizard")
        self.edit_button.clicked.connect(self.edit)
        self.clone_button = QPushButton("&Clone…")
        self.clone_button.setToolTip("Copy the selected template under a new name")
        self.clone_button.clicked.connect(self.clone)
        self.priority_button = QPushButton("&Priority…")
        self.priority_button.setToolTip("Reorder the selected template's app layers")
        self.priority_button.clicked.connect(self.priority)
        self.history_button = QPushButton("&History…")
        self.history_button.setToolTip("Revisions of the selected template and what changed")
        self.history_button.clicked.connect(self.history)
        self.publish_button = QPushButton("P&ublish")
        self.publish_button.setToolTip("Composite the selected template's layers into a new image")
        self.publish_button.clicked.connect(self.publish)
        self.table.doubleClicked.connect(self._double_clicked)
        actions = QHBoxLayout()
        for button in (self.new_button, self.edit_button, self.clone_button, self.priority_button,
                       self.history_button, self.publish_button):
            actions.addWidget(button)
        actions.addStretch(1)
        self.note = QLabel()
        self.note.setObjectName("note")
        self.note.setWordWrap(True)

        self.details = QLabel("Select a template to see its layers and published images.")
        self.details.setObjectName("template_details")
        self.details.setWordWrap(True)
        self.details.setTextFormat(Qt.TextFormat.RichText)
        self.details.setAlignment(Qt.AlignmentFlag.AlignTop | Qt.AlignmentFlag.AlignLeft)
        self.images = RecordTableModel(IMAGE_COLUMNS, lambda i: i.id, self)
        self.images_sorted = QSortFilterProxyModel(self)
        self.images_sorted.setSourceModel(self.images)
        self.images_sorted.setSortRole(ItemRole.SORT)
        self.images_table = QTableView()
        self.images_table.setObjectName("published_images")
        self.images_table.setModel(self.images_sorted)
        self.images_table.setSortingEnabled(True)
        self.images_table.sortByColumn(1, Qt.SortOrder.DescendingOrder)  # newest first
        self.images_table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.images_table.setAlternatingRowColors(True)
        self.images_table.verticalHeader().setVisible(False)
        self.images_table.horizontalHeader().setStretchLastSection(True)
        self.images_status = QLabel()
        self.images_status.setWordWrap(True)

        right = QWidget()
        right_layout = QVBoxLayout(right)
        right_layout.setContentsMargins(0, 0, 0, 0)
        right_layout.addWidget(self.details)
        right_layout.addWidget(QLabel("<b>Published images</b>"))
        right_layout.addWidget(self.images_table, 1)
        right_layout.addWidget(self.images_status)
        splitter = QSplitter(Qt.Orientation.Vertical)
        splitter.addWidget(self.list)
        splitter.addWidget(right)
        splitter.setStretchFactor(0, 3)
        splitter.setStretchFactor(1, 2)
        # The actions go under the list's heading and filter.
        list_layout = self.list.layout()
        assert isinstance(list_layout, QVBoxLayout)
        list_layout.insertLayout(1, actions)
        list_layout.insertWidget(2, self.note)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(splitter, 1)
        self.note.hide()
        self._update_actions()

    # --- loading and selection -----------------------------------------------------------------------

    def refresh(self) -> None:
        self.list.refresh()

    def _loaded(self, count: int) -> None:
        if self._select_after_load:
            self.select_template(self._select_after_load)
            self._select_after_load = None
        self._selected()
        self.loaded.emit(count)

    def selected_template(self) -> TemplateInfo | None:
        rows = self.table.selectionModel().selectedRows()
        if not rows:
            return None
        record = rows[0].data(ItemRole.RECORD)
        return record if isinstance(record, TemplateInfo) else None

    def select_template(self, name: str) -> bool:
        for row in range(self.proxy.rowCount()):
            index = self.proxy.index(row, 0)
            if str(index.data()).casefold() == name.casefold():
                self.table.selectRow(row)
                self.table.scrollTo(index)
                return True
        return False

    def _selected(self, *_args: Any) -> None:
        self._update_actions()
        template = self.selected_template()
        if template is None:
            self.details.setText("Select a template to see its layers and published images.")
            self.images.replace([])
            self.images_status.clear()
            return
        stack = ([f"platform: {template.platform_version}"] if template.platform_version else []) + [
            f"app: {ref}" for ref in reversed(template.app_layers)] + [f"OS: {template.os_version}"]
        blockers = ("<br><span style='color:#8a5a00'>Not publishable yet: "
                    + "; ".join(template.publish_blockers) + "</span>") if template.publish_blockers else ""
        self.details.setText(
            f"<b>{template.name}</b> – revision {template.revision}, {template.disk_format.value.upper()} "
            f"{template.size_gb} GB{', connector ' + template.connector if template.connector else ''}<br>"
            f"Layers, top wins: {' › '.join(stack)}{blockers}")
        self._images_loading = spawn(self._load_images(template.name))

    async def _load_images(self, name: str) -> None:
        self.images_status.setText("Loading…")
        try:
            images = await off_ui_thread(self.services.publishing.list_images, name)
        except LayerDeskError as exc:
            if isValid(self):
                self.images_status.setText(str(exc))
            return
        if not isValid(self) or not isValid(self.table):
            return  # the page went away meanwhile
        current = self.selected_template()
        if current is None or current.name.casefold() != name.casefold():
            return
        self.images.replace(images)
        fit_columns(self.images_table)
        self.images_status.setText(f"{len(images)} image{'s' if len(images) != 1 else ''} published from {name}"
                                   if images else f"No image has been published from {name} yet.")

    def _update_actions(self) -> None:
        template = self.selected_template()
        chosen = template is not None
        guard(self.new_button, self.services, Operation.EDIT_TEMPLATES)
        for button in (self.edit_button, self.clone_button, self.priority_button):
            guard(button, self.services, Operation.EDIT_TEMPLATES, enabled=chosen)
        guard(self.history_button, self.services, Operation.READ, enabled=chosen)
        allowed = guard(self.publish_button, self.services, Operation.PUBLISH_IMAGES, Operation.RUN_TASKS,
                        enabled=chosen and not (template and template.publish_blockers))
        if allowed and template is not None and template.publish_blockers:
            self.publish_button.setToolTip("Not publishable yet: " + "; ".join(template.publish_blockers))

    def show_note(self, text: str) -> None:
        self.note.setText(text)
        self.note.setVisible(bool(text))

    # --- actions -------------------------------------------------------------------------------------

    def _double_clicked(self) -> None:
        if self.edit_button.isEnabled():
            self.edit()

    def new(self) -> None:
        spawn(self._open_wizard(None))

    def edit(self) -> None:
        template = self.selected_template()
        if template is not None:
            spawn(self._open_wizard(template.name))

    async def _open_wizard(self, name: str | None) -> None:
        self.show_note("Opening the wizard…")

        def read() -> tuple[Any, TemplateInfo | None]:
            return load_catalog(self.services), self.services.templates.get_template(name) if name else None

        try:
            catalog, template = await off_ui_thread(read)
        except LayerDeskError as exc:
            self.show_note(str(exc))
            return
        self.show_note("")
        wizard = TemplateWizard(self.services, catalog, template, self)
        wizard.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        wizard.saved.connect(self._saved)
        self.dialog = wizard
        wizard.setWindowModality(Qt.WindowModality.WindowModal)
        wizard.open()

    def _saved(self, info: TemplateInfo) -> None:
        self.show_note(f"Saved template {info.name} (revision {info.revision}).")
        self._select_after_load = info.name
        self.refresh()

    def clone(self) -> None:
        template = self.selected_template()
        if template is not None:
            spawn(self._clone(template))

    async def _clone(self, template: TemplateInfo) -> None:
        names = [r.name for r in self.model.records()]
        dialog = AskDialog(f"Clone {template.name}", f"Copy template {template.name} (its layers, priority order "
                           "and settings) under a new name.", "Clone", name_label="New name",
                           name_problem=lambda text: clone_name_problem(text, names), parent=self)
        dialog.name.setText(f"{template.name} copy")
        self.dialog = dialog
        if not await run_dialog(dialog):
            return
        new_name, comment = dialog.name.text(), dialog.comment.text()
        try:
            info = await off_ui_thread(lambda: self.services.templates.clone_template(template.name, new_name,
                                                                                      comment=comment))
        except LayerDeskError as exc:
            show_message(self, "Clone not made", str(exc))
            return
        self._saved(info)

    def priority(self) -> None:
        template = self.selected_template()
        if template is None:
            return
        dialog = PriorityDialog(self.services, template, self)
        dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        dialog.saved.connect(self._saved)
        self.dialog = dialog
        dialog.setWindowModality(Qt.WindowModality.WindowModal)
        dialog.open()

    def history(self) -> None:
        template = self.selected_template()
        if template is None:
            return
        dialog = HistoryDialog(self.services, template.name, self)
        dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        self.dialog = dialog
        dialog.open()

    # --- publishing ----------------------------------------------------------------------------------

    def runner(self) -> TaskRunner:
        """The task runner publishes run in: the window's, or the page's own (shut down when the console
        quits, cancelling what still runs)."""
        if self._runner is None:
            self._runner = TaskRunner(self.services.catalog, self.services.caller)
            self._own_runner = True
            app = QCoreApplication.instance()
            if app is not None:
                app.aboutToQuit.connect(self.shutdown)
        return self._runner

    def shutdown(self) -> None:
        """Stop the page's own task runner (a runner handed in belongs to whoever made it)."""
        if self._own_runner and self._runner is not None:
            self._runner.shutdown(cancel=True)
            self._runner = None
            self._own_runner = False

    def publish(self) -> None:
        template = self.selected_template()
        if template is not None:
            spawn(self._publish(template))

    async def _publish(self, template: TemplateInfo) -> None:
        dialog = AskDialog(f"Publish {template.name}",
                           f"Composite the layers of {template.name} (revision {template.revision}) into a new "
                           f"{template.disk_format.value.upper()} image in the LayerDesk home's published folder. "
                           "It runs as a task; you can go on working meanwhile.", "Publish", parent=self)
        self.dialog = dialog
        if not await run_dialog(dialog):
            return
        comment = dialog.comment.text()
        runner = self.runner()
        self.show_note(f"Starting the publish of {template.name}…")
        try:
            task_id = await off_ui_thread(lambda: self.services.publishing.publish(runner, template.name,
                                                                                   comment=comment))
        except LayerDeskError as exc:
            self.show_note("")
            show_message(self, "Not published", str(exc))
            return
        self.show_note(f"Task {task_id}: publishing {template.name}…")
        spawn(self._follow(task_id, template.name))

    async def _follow(self, task_id: int, name: str) -> None:
        """Show the publish task's progress until it ends, then the new image."""
        while True:
            await asyncio.sleep(PUBLISH_POLL_S)
            if not isValid(self):
                return
            try:
                task = await off_ui_thread(self.services.tasks.get_task, task_id)
            except LayerDeskError as exc:
                self.show_note(f"Task {task_id}: {exc}")
                return
            if not isValid(self):
                return
            if task.state.is_final:
                break
            self.show_note(f"Task {task_id}: publishing {name} – {task.progress}% {task.message}")
        if task.state is TaskState.COMPLETE:
            image = (task.result or {}).get("image", "")
            self.show_note(f"Task {task_id}: published {image} from {name}.")
        else:
            self.show_note(f"Task {task_id}: the publish of {name} ended {task.state.value}. "
                           f"{task.error or task.message}")
        if not isValid(self.table):
            return
        current = self.selected_template()
        if current is not None and current.name.casefold() == name.casefold():
            self._images_loading = spawn(self._load_images(name))
        self.publish_finished.emit(task_id, task.state)
