"""The Elastic layers page: which app layer versions are assigned to which AD users and groups, the machine
associations (a group tied to machine-name patterns gives its layers to everybody on those machines), the
resolver (which layers a user gets on a machine, and why) and, in its own tab, the User Layer storage
locations (:mod:`ui.storage_tab`).

Users and groups are chosen with the directory picker (search as you type). Everything reads and writes
through the services in a worker thread; buttons the signed-in administrator's roles do not allow are
disabled, and their tooltip says which role is needed.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QColor
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
    QTableWidget,
    QTableWidgetItem,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)
from shiboken6 import isValid

from app.catalog.models import PrincipalKind
from app.console.elastic import (
    Outcome,
    PrincipalChoice,
    ResolutionRow,
    assignable_versions,
    pattern_problem,
    resolution_rows,
    resolution_summary,
)
from app.errors import LayerDeskError
from app.services import Services
from app.services.elastic import ElasticService, Resolution
from app.services.rbac import Operation
from app.services.views import ElasticAssignmentInfo, MachineAssociationInfo
from ui.background import off_ui_thread
from ui.directory_picker import DirectoryPicker
from ui.pages import ListPage, confirm, format_when, show_message, spawn
from ui.permissions import guard
from ui.storage_tab import StorageTab
from ui.table_model import Column, ItemRole
from ui.templates_page import run_dialog

log = logging.getLogger(__name__)

ERROR_STYLE = "color: #b00020"


def _kind(kind: PrincipalKind) -> str:
    return {PrincipalKind.AD_USER: "User", PrincipalKind.AD_GROUP: "Group"}.get(kind, kind.value)


ASSIGNMENT_COLUMNS: list[Column[ElasticAssignmentInfo]] = [
    Column("Layer", lambda a: a.layer),
    Column("Version", lambda a: a.version),
    Column("Assigned to", lambda a: a.principal_name),
    Column("Kind", lambda a: _kind(a.principal_kind)),
    Column("SID", lambda a: a.principal_sid, tooltip=lambda a: a.principal_sid),
    Column("Assigned by", lambda a: a.created_by),
    Column("Assigned", lambda a: format_when(a.created_at), sort=lambda a: a.created_at),
]

ASSOCIATION_COLUMNS: list[Column[MachineAssociationInfo]] = [
    Column("Group", lambda m: m.group_name),
    Column("Machine-name pattern", lambda m: m.pattern),
    Column("Group SID", lambda m: m.group_sid, tooltip=lambda m: m.group_sid),
    Column("Added by", lambda m: m.created_by),
    Column("Added", lambda m: format_when(m.created_at), sort=lambda m: m.created_at),
]


def _error_label() -> QLabel:
    label = QLabel()
    label.setObjectName("error")
    label.setWordWrap(True)
    label.setStyleSheet(ERROR_STYLE)
    return label


def _chosen_text(choice: PrincipalChoice | None, what: str) -> str:
    if choice is None:
        return f"<i>No {what} chosen yet: search above and select one.</i>"
    return f"<b>{choice.name}</b> ({_kind(choice.kind).lower()}, {choice.sid})"


# --- dialogs ----------------------------------------------------------------------------------------------


class AssignDialog(QDialog):
    """Assign an app layer version to a user or group; the service call happens here, so a refusal shows
    next to the input, which stays."""

    saved = Signal(object)  # the ElasticAssignmentInfo

    def __init__(self, services: Services, versions: dict[str, tuple[str, ...]],
                 parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("assign_dialog")
        self.setWindowTitle("Assign an elastic layer")
        self.resize(620, 560)
        self._services = services
        self._versions = versions
        self._saving: asyncio.Future[None] | None = None
        self.layer = QComboBox()
        self.layer.setAccessibleName("App layer")
        self.layer.addItems(sorted(versions, key=str.casefold))
        self.version = QComboBox()
        self.version.setAccessibleName("Version")
        self.layer.currentTextChanged.connect(self._layer_changed)
        self.picker = DirectoryPicker(services)
        self.picker.selected.connect(lambda _c: self._update())
        self.who = QLabel()
        self.who.setWordWrap(True)
        self.comment = QLineEdit(placeholderText="Kept in the audit log")
        self.comment.setAccessibleName("Comment")
        self.error = _error_label()
        self.buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Cancel)
        self.ok = self.buttons.addButton("Assign", QDialogButtonBox.ButtonRole.AcceptRole)
        self.ok.setAutoDefault(False)
        self.ok.clicked.connect(self.save)
        self.buttons.rejected.connect(self.reject)
        intro = QLabel("Users get the layer when they sign in, wherever the template allows elastic layers. "
                       "Assigning another version of the same layer to the same user or group replaces it.")
        intro.setWordWrap(True)
        form = QFormLayout()
        form.addRow("App layer:", self.layer)
        form.addRow("Version:", self.version)
        layout = QVBoxLayout(self)
        layout.addWidget(intro)
        layout.addLayout(form)
        layout.addWidget(QLabel("<b>Assign to</b> (an AD user or group):"))
        layout.addWidget(self.picker, 1)
        layout.addWidget(self.who)
        comment_row = QFormLayout()
        comment_row.addRow("Comment:", self.comment)
        layout.addLayout(comment_row)
        layout.addWidget(self.error)
        layout.addWidget(self.buttons)
        if not versions:
            self.error.setText("No app layer has a deployable version to assign: finalize a version first.")
        self._layer_changed(self.layer.currentText())

    def _layer_changed(self, layer: str) -> None:
        self.version.clear()
        self.version.addItems(list(self._versions.get(layer, ())))
        self._update()

    def _update(self) -> None:
        choice = self.picker.current()
        self.who.setText(_chosen_text(choice, "user or group"))
        guard(self.ok, self._services, Operation.EDIT_ELASTIC_ASSIGNMENTS,
              enabled=choice is not None and bool(self.version.currentText()))

    def save(self) -> None:
        if self._saving is None or self._saving.done():
            self._saving = spawn(self._save())

    async def _save(self) -> None:
        choice = self.picker.current()
        if choice is None:
            return
        ref = f"{self.layer.currentText()}:{self.version.currentText()}"
        comment = self.comment.text()
        self.ok.setEnabled(False)
        self.error.clear()
        try:
            info = await off_ui_thread(lambda: self._services.assignments.assign(
                ref, choice.kind, choice.sid, choice.name, comment=comment))
        except LayerDeskError as exc:
            if isValid(self):
                self.error.setText(str(exc))
                self._update()
            return
        if isValid(self):
            self.saved.emit(info)
            self.accept()


class AssociationDialog(QDialog):
    """Tie an AD group to a machine-name pattern; the pattern is checked as it is typed."""

    saved = Signal(object)  # the MachineAssociationInfo

    def __init__(self, services: Services, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("association_dialog")
        self.setWindowTitle("Add a machine association")
        self.resize(600, 520)
        self._services = services
        self._saving: asyncio.Future[None] | None = None
        intro = QLabel("Everybody who signs in on a machine whose name matches the pattern gets the layers "
                       "assigned to the group, member or not. <tt>*</tt> is any run of characters, <tt>?</tt> "
                       "one character; case is ignored.")
        intro.setWordWrap(True)
        self.picker = DirectoryPicker(services, (PrincipalKind.AD_GROUP,))
        self.picker.selected.connect(lambda _c: self._update())
        self.who = QLabel()
        self.who.setWordWrap(True)
        self.pattern = QLineEdit(placeholderText="VDA-FIN-*")
        self.pattern.setAccessibleName("Machine-name pattern")
        self.pattern.textChanged.connect(lambda _t: self._update())
        self.comment = QLineEdit(placeholderText="Kept in the audit log")
        self.comment.setAccessibleName("Comment")
        self.error = _error_label()
        self.buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Cancel)
        self.ok = self.buttons.addButton("Add", QDialogButtonBox.ButtonRole.AcceptRole)
        self.ok.setAutoDefault(False)
        self.ok.clicked.connect(self.save)
        self.buttons.rejected.connect(self.reject)
        form = QFormLayout()
        form.addRow("Machine-name pattern:", self.pattern)
        form.addRow("Comment:", self.comment)
        layout = QVBoxLayout(self)
        layout.addWidget(intro)
        layout.addWidget(QLabel("<b>Group</b>:"))
        layout.addWidget(self.picker, 1)
        layout.addWidget(self.who)
        layout.addLayout(form)
        layout.addWidget(self.error)
        layout.addWidget(self.buttons)
        self._update()

    def _update(self) -> None:
        choice = self.picker.current()
        self.who.setText(_chosen_text(choice, "group"))
        problem = pattern_problem(self.pattern.text())
        # An empty box is not an error yet, only not done.
        self.error.setText(problem if self.pattern.text() else "")
        guard(self.ok, self._services, Operation.EDIT_ELASTIC_ASSIGNMENTS, enabled=choice is not None and not problem)

    def save(self) -> None:
        if self._saving is None or self._saving.done():
            self._saving = spawn(self._save())

    async def _save(self) -> None:
        choice = self.picker.current()
        if choice is None:
            return
        pattern, comment = self.pattern.text(), self.comment.text()
        self.ok.setEnabled(False)
        try:
            info = await off_ui_thread(lambda: self._services.assignments.add_machine_association(
                choice.sid, choice.name, pattern, comment=comment))
        except LayerDeskError as exc:
            if isValid(self):
                self._update()
                self.error.setText(str(exc))
            return
        if isValid(self):
            self.saved.emit(info)
            self.accept()


# --- tabs -------------------------------------------------------------------------------------------------


class AssignmentsTab(ListPage):
    """The elastic assignments, with Assign… and Remove."""

    def __init__(self, services: Services, parent: QWidget | None = None) -> None:
        super().__init__("Elastic assignments", ASSIGNMENT_COLUMNS, lambda a: a.id,
                         services.assignments.list_assignments, parent,
                         placeholder="Filter layer, version, user or group, SID…")
        self.services = services
        self.dialog: QDialog | None = None
        self.filter.setMinimumWidth(280)  # room for the placeholder, which says what it filters
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.assign_button = QPushButton("&Assign…")
        self.assign_button.setToolTip("Assign an app layer version to an AD user or group")
        self.assign_button.clicked.connect(self.assign)
        self.remove_button = QPushButton("Re&move")
        self.remove_button.setToolTip("Remove the selected assignment")
        self.remove_button.clicked.connect(self.remove)
        self.table.selectionModel().selectionChanged.connect(lambda *_a: self._update_actions())
        self.loaded.connect(lambda _n: self._update_actions())
        self.note = QLabel()
        self.note.setWordWrap(True)
        actions = QHBoxLayout()
        actions.addWidget(self.assign_button)
        actions.addWidget(self.remove_button)
        actions.addWidget(self.note, 1)
        layout = self.layout()
        assert isinstance(layout, QVBoxLayout)
        layout.insertLayout(1, actions)
        self._update_actions()

    def selected(self) -> ElasticAssignmentInfo | None:
        rows = self.table.selectionModel().selectedRows()
        record = rows[0].data(ItemRole.RECORD) if rows else None
        return record if isinstance(record, ElasticAssignmentInfo) else None

    def _update_actions(self) -> None:
        guard(self.assign_button, self.services, Operation.EDIT_ELASTIC_ASSIGNMENTS)
        guard(self.remove_button, self.services, Operation.EDIT_ELASTIC_ASSIGNMENTS,
              enabled=self.selected() is not None)

    def assign(self) -> None:
        spawn(self._assign())

    async def _assign(self) -> None:
        self.note.setText("Reading the deployable app layer versions…")
        try:
            versions = await off_ui_thread(assignable_versions, self.services)
        except LayerDeskError as exc:
            self.note.setText(str(exc))
            return
        self.note.clear()
        dialog = AssignDialog(self.services, versions, self)
        dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        dialog.saved.connect(self._assigned)
        self.dialog = dialog
        await run_dialog(dialog)

    def _assigned(self, info: ElasticAssignmentInfo) -> None:
        self.note.setText(f"Assigned {info.layer}:{info.version} to {info.principal_name}.")
        self.refresh()

    def remove(self) -> None:
        record = self.selected()
        if record is not None:
            spawn(self._remove(record))

    async def _remove(self, record: ElasticAssignmentInfo) -> None:
        if not await confirm(self, "Remove elastic assignment",
                             f"Remove {record.layer}:{record.version} from {record.principal_name}? They no "
                             "longer get it at their next sign-in.", action="Remove"):
            return
        try:
            await off_ui_thread(lambda: self.services.assignments.unassign(record.layer, record.principal_sid))
        except LayerDeskError as exc:
            show_message(self, "Assignment not removed", str(exc))
            return
        self.note.setText(f"Removed {record.layer}:{record.version} from {record.principal_name}.")
        self.refresh()


class MachineTab(ListPage):
    """The machine associations, with Add… and Remove."""

    def __init__(self, services: Services, parent: QWidget | None = None) -> None:
        super().__init__("Machine associations", ASSOCIATION_COLUMNS, lambda m: m.id,
                         services.assignments.list_machine_associations, parent,
                         placeholder="Filter group, pattern, SID…")
        self.services = services
        self.dialog: QDialog | None = None
        self.filter.setMinimumWidth(280)  # room for the placeholder, which says what it filters
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.add_button = QPushButton("A&dd…")
        self.add_button.setToolTip("Tie an AD group to a machine-name pattern")
        self.add_button.clicked.connect(self.add)
        self.remove_button = QPushButton("Re&move")
        self.remove_button.setToolTip("Remove the selected machine association")
        self.remove_button.clicked.connect(self.remove)
        self.table.selectionModel().selectionChanged.connect(lambda *_a: self._update_actions())
        self.loaded.connect(lambda _n: self._update_actions())
        self.note = QLabel()
        self.note.setWordWrap(True)
        actions = QHBoxLayout()
        actions.addWidget(self.add_button)
        actions.addWidget(self.remove_button)
        actions.addWidget(self.note, 1)
        layout = self.layout()
        assert isinstance(layout, QVBoxLayout)
        layout.insertLayout(1, actions)
        self._update_actions()

    def selected(self) -> MachineAssociationInfo | None:
        rows = self.table.selectionModel().selectedRows()
        record = rows[0].data(ItemRole.RECORD) if rows else None
        return record if isinstance(record, MachineAssociationInfo) else None

    def _update_actions(self) -> None:
        guard(self.add_button, self.services, Operation.EDIT_ELASTIC_ASSIGNMENTS)
        guard(self.remove_button, self.services, Operation.EDIT_ELASTIC_ASSIGNMENTS,
              enabled=self.selected() is not None)

    def add(self) -> None:
        dialog = AssociationDialog(self.services, self)
        dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        dialog.saved.connect(self._added)
        self.dialog = dialog
        spawn(run_dialog(dialog))

    def _added(self, info: MachineAssociationInfo) -> None:
        self.note.setText(f"Associated {info.group_name} with {info.pattern}.")
        self.refresh()

    def remove(self) -> None:
        record = self.selected()
        if record is not None:
            spawn(self._remove(record))

    async def _remove(self, record: MachineAssociationInfo) -> None:
        if not await confirm(self, "Remove machine association",
                             f"Remove the association of {record.group_name} with {record.pattern}? Users on "
                             "those machines no longer get the group's layers unless they are members.",
                             action="Remove"):
            return
        try:
            await off_ui_thread(lambda: self.services.assignments.remove_machine_association(record.id))
        except LayerDeskError as exc:
            show_message(self, "Association not removed", str(exc))
            return
        self.note.setText(f"Removed the association of {record.group_name} with {record.pattern}.")
        self.refresh()


#: The resolver table's colour for rows that do not reach the user.
_MUTED = {Outcome.LOST: "#8a5a00", Outcome.SKIPPED: "#b00020"}


class ResolverTab(QWidget):
    """Which layers a user gets on a machine, and why; the assignments that lose, and why."""

    resolved = Signal()  # an answer (or the reason there is none) is shown

    def __init__(self, services: Services, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("resolver")
        self.services = services
        self._generation = 0
        self.resolution: Resolution | None = None
        self.picker = DirectoryPicker(services, (PrincipalKind.AD_USER,))
        self.picker.chosen.connect(lambda _c: self.resolve())
        self.machine = QLineEdit(placeholderText="VDA-FIN-01")
        self.machine.setAccessibleName("Machine name")
        self.machine.returnPressed.connect(self.resolve)
        self.resolve_button = QPushButton("&Resolve")
        self.resolve_button.setToolTip("Ask the directory for the user's groups and apply the assignment rules")
        self.resolve_button.clicked.connect(self.resolve)
        self.summary = QLabel("Choose a user (or type their name, DOMAIN\\name, UPN or SID) and a machine name.")
        self.summary.setObjectName("resolver_summary")
        self.summary.setWordWrap(True)
        self.table = QTableWidget(0, 5)
        self.table.setObjectName("resolution")
        self.table.setHorizontalHeaderLabels(["Layer", "Version", "Outcome", "Why", "Lost because"])
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setWordWrap(True)  # the reasons are sentences: wrapped, never cut off
        header = self.table.horizontalHeader()
        for column in (0, 1, 2):
            header.setSectionResizeMode(column, QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(3, QHeaderView.ResizeMode.Stretch)
        header.setSectionResizeMode(4, QHeaderView.ResizeMode.Stretch)
        self.groups = QLabel()
        self.groups.setObjectName("resolver_groups")
        self.groups.setWordWrap(True)
        self.groups.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

        left = QWidget()
        left_layout = QVBoxLayout(left)
        left_layout.setContentsMargins(0, 0, 0, 0)
        left_layout.addWidget(QLabel("<b>User</b>"))
        left_layout.addWidget(self.picker, 1)
        machine_row = QFormLayout()
        machine_row.addRow("Machine:", self.machine)
        left_layout.addLayout(machine_row)
        left_layout.addWidget(self.resolve_button, 0, Qt.AlignmentFlag.AlignRight)
        right = QWidget()
        right_layout = QVBoxLayout(right)
        right_layout.setContentsMargins(0, 0, 0, 0)
        right_layout.addWidget(self.summary)
        right_layout.addWidget(self.table, 1)
        right_layout.addWidget(self.groups)
        splitter = QSplitter()
        splitter.addWidget(left)
        splitter.addWidget(right)
        splitter.setStretchFactor(0, 1)
        splitter.setStretchFactor(1, 2)
        splitter.setChildrenCollapsible(False)
        splitter.setSizes([300, 600])
        layout = QVBoxLayout(self)
        layout.addWidget(QLabel("<h2>Resolver</h2>Which elastic layers a user gets on a machine, and why."))
        layout.addWidget(splitter, 1)
        guard(self.resolve_button, services, Operation.READ)

    def user_text(self) -> str:
        """The chosen user's SID, or the name typed in the picker's box."""
        choice = self.picker.current()
        return choice.sid if choice is not None else self.picker.typed_text()

    def resolve(self) -> None:
        self._generation += 1
        spawn(self._resolve(self._generation, self.user_text(), self.machine.text()))

    async def _resolve(self, generation: int, user: str, machine: str) -> None:
        self.summary.setText(f"Resolving {user or 'the user'} on {machine or 'the machine'}…")
        self.resolve_button.setEnabled(False)
        try:
            found = await off_ui_thread(ElasticService.for_services(self.services).resolve, user, machine)
        except LayerDeskError as exc:
            if isValid(self) and generation == self._generation:
                self.resolution = None
                self._show([], f"<span style='{ERROR_STYLE}'>{exc}</span>", "")
            return
        finally:
            if isValid(self):
                guard(self.resolve_button, self.services, Operation.READ)
        if not isValid(self) or generation != self._generation:
            return
        self.resolution = found
        groups = ", ".join(found.groups) or "none"
        self._show(resolution_rows(found), resolution_summary(found), f"<b>Groups:</b> {groups}")

    def _show(self, rows: list[ResolutionRow], summary: str, groups: str) -> None:
        self.table.setRowCount(len(rows))
        for row, line in enumerate(rows):
            for column, text in enumerate((line.layer, line.version, line.outcome.value, line.why, line.reason)):
                item = QTableWidgetItem(text)
                item.setToolTip(text)
                if line.outcome in _MUTED and column == 2:
                    item.setForeground(QColor(_MUTED[line.outcome]))
                self.table.setItem(row, column, item)
        # The "lost because" column only when something lost.
        self.table.setColumnHidden(4, not any(line.reason for line in rows))
        self.table.resizeRowsToContents()
        self.summary.setText(summary)
        self.groups.setText(groups)
        self.resolved.emit()

    def rows(self) -> list[tuple[str, ...]]:
        """The answer as shown: one tuple of cell texts a row."""
        return [tuple(item.text() if (item := self.table.item(r, c)) else "" for c in range(self.table.columnCount()))
                for r in range(self.table.rowCount())]

    def refresh(self) -> None:
        """Nothing to reload: the resolver answers when asked."""


# --- the page ---------------------------------------------------------------------------------------------


class ElasticPage(QWidget):
    """Tabs: Assignments, Machine associations, Resolver, User layer storage."""

    loaded = Signal(int)  # rows in the current tab after a load
    failed = Signal(str)  # a message a user can act on

    def __init__(self, services: Services, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("elastic_layers")
        self.services = services
        self.assignments = AssignmentsTab(services)
        self.machines = MachineTab(services)
        self.resolver = ResolverTab(services)
        self.storage = StorageTab(services)
        self.tabs = QTabWidget()
        self.tabs.setDocumentMode(True)
        self.tabs.addTab(self.assignments, "Assignments")
        self.tabs.addTab(self.machines, "Machine associations")
        self.tabs.addTab(self.resolver, "Resolver")
        self.tabs.addTab(self.storage, "User layer storage")
        for tab in (self.assignments, self.machines, self.storage):
            tab.loaded.connect(self.loaded)
            tab.failed.connect(self.failed)
        self.tabs.currentChanged.connect(lambda _i: self.refresh())
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.tabs)

    def current_tab(self) -> Any:
        return self.tabs.currentWidget()

    def show_tab(self, tab: QWidget) -> None:
        self.tabs.setCurrentWidget(tab)

    def refresh(self) -> None:
        self.current_tab().refresh()
