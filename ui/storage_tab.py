"""The User layer storage tab: the SMB locations users' User Layers live in, in the order they are tried (the
first location assigned to one of the user's groups wins), reordered by drag and drop or Ctrl+Up / Ctrl+Down
and saved in one call with a comment; add, edit and remove a location; and "Where is this user's layer?".

The order's truth is an :class:`app.console.elastic.LocationOrder` (a plain list); the Qt model mirrors it
and emits proper move signals. Drag and drop accepts only the model's own rows and calls the list's ``move``.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import uuid
from collections.abc import Sequence
from typing import Any

from PySide6.QtCore import (
    QAbstractTableModel,
    QByteArray,
    QMimeData,
    QModelIndex,
    QPersistentModelIndex,
    Qt,
    Signal,
)
from PySide6.QtGui import QKeyEvent
from PySide6.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QTableView,
    QVBoxLayout,
    QWidget,
)
from shiboken6 import isValid

from app.catalog.models import PrincipalKind
from app.console.elastic import LocationOrder, location_problem, parse_size
from app.errors import LayerDeskError
from app.services import Services
from app.services.rbac import Operation
from app.services.storage import UserLayerPlace
from app.services.views import StorageLocationInfo
from ui.background import off_ui_thread
from ui.directory_picker import DirectoryPicker, DirectoryPickerDialog
from ui.icons import icon
from ui.pages import confirm, show_message, spawn
from ui.permissions import guard

log = logging.getLogger(__name__)

Index = QModelIndex | QPersistentModelIndex
MIME_TYPE = "application/x-layerdesk-storage-row"
ERROR_STYLE = "color: #b00020"


class LocationRole(enum.IntEnum):
    #: The row's :class:`StorageLocationInfo`.
    RECORD = Qt.ItemDataRole.UserRole + 1
    NAME = Qt.ItemDataRole.UserRole + 2


class LocationModel(QAbstractTableModel):
    """The locations, first tried on top; every row moves."""

    COLUMNS = ("Priority", "Name", "Path", "Groups", "Size (GB)")
    PRIORITY, NAME, PATH, GROUPS, SIZE = range(5)

    def __init__(self, order: LocationOrder, parent: Any = None) -> None:
        super().__init__(parent)
        self._order = order
        self._records: dict[str, StorageLocationInfo] = {}
        #: Drops carry this, so rows dragged from another model are refused.
        self._token = uuid.uuid4().hex
        order.subscribe(self)

    @property
    def order(self) -> LocationOrder:
        return self._order

    def set_records(self, records: Sequence[StorageLocationInfo]) -> None:
        """Show ``records`` in their saved order (the order is reset to it)."""
        self._records = {r.name: r for r in records}
        self._order.replace([r.name for r in sorted(records, key=lambda r: r.priority)])

    def record(self, row: int) -> StorageLocationInfo | None:
        return self._records.get(self._order[row]) if 0 <= row < len(self._order) else None

    # --- OrderObserver -------------------------------------------------------------------------------

    def moving(self, source: int, destination: int) -> None:
        ok = self.beginMoveRows(QModelIndex(), source, source, QModelIndex(),
                                destination + 1 if destination > source else destination)
        assert ok, (source, destination)

    def moved(self, source: int, destination: int) -> None:
        self.endMoveRows()
        # The priority column counts rows: every row between the two places shows a new number.
        top, bottom = min(source, destination), max(source, destination)
        self.dataChanged.emit(self.index(top, self.PRIORITY), self.index(bottom, self.PRIORITY))

    def resetting(self) -> None:
        self.beginResetModel()

    def reset(self) -> None:
        self.endResetModel()

    # --- Qt API --------------------------------------------------------------------------------------

    def rowCount(self, parent: Index = QModelIndex()) -> int:  # noqa: B008 - Qt's signature
        return 0 if parent.isValid() else len(self._order)

    def columnCount(self, parent: Index = QModelIndex()) -> int:  # noqa: B008
        return 0 if parent.isValid() else len(self.COLUMNS)

    def data(self, index: Index, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if not index.isValid() or not 0 <= index.row() < len(self._order):
            return None
        name = self._order[index.row()]
        record = self._records.get(name)
        column = index.column()
        if role == Qt.ItemDataRole.DisplayRole:
            if column == self.PRIORITY:
                return str(index.row() + 1)
            if column == self.NAME:
                return name
            if record is None:
                return ""
            if column == self.PATH:
                return record.path
            if column == self.GROUPS:
                return ", ".join(g for _sid, g in record.groups) or "(no group: never used)"
            return str(record.default_size_gb)
        if role == LocationRole.RECORD:
            return record
        if role == LocationRole.NAME:
            return name
        if role == Qt.ItemDataRole.ToolTipRole:
            if column == self.GROUPS and record is not None:
                return "\n".join(f"{g} ({sid})" for sid, g in record.groups) or "No group: nobody's layer goes here."
            return "Drag, or press Ctrl+Up / Ctrl+Down, to try this location sooner or later."
        if role == Qt.ItemDataRole.DecorationRole and column == self.NAME:
            return icon("storage")
        if role == Qt.ItemDataRole.TextAlignmentRole and column in (self.PRIORITY, self.SIZE):
            return int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        return None

    def headerData(self, section: int, orientation: Qt.Orientation,
                   role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if role == Qt.ItemDataRole.DisplayRole and orientation == Qt.Orientation.Horizontal \
                and 0 <= section < len(self.COLUMNS):
            return self.COLUMNS[section]
        return None

    def flags(self, index: Index) -> Qt.ItemFlag:
        if not index.isValid():
            return Qt.ItemFlag.ItemIsDropEnabled  # drops land between rows, never on one
        return Qt.ItemFlag.ItemIsEnabled | Qt.ItemFlag.ItemIsSelectable | Qt.ItemFlag.ItemIsDragEnabled

    def supportedDropActions(self) -> Qt.DropAction:
        return Qt.DropAction.MoveAction

    def supportedDragActions(self) -> Qt.DropAction:
        return Qt.DropAction.MoveAction

    def mimeTypes(self) -> list[str]:
        return [MIME_TYPE]

    def mimeData(self, indexes: Sequence[QModelIndex]) -> QMimeData:
        data = QMimeData()
        rows = sorted({i.row() for i in indexes if i.isValid()})
        if rows:
            data.setData(MIME_TYPE, QByteArray(f"{self._token}:{rows[0]}".encode()))
        return data

    def _dragged_row(self, data: QMimeData) -> int | None:
        if not data.hasFormat(MIME_TYPE):
            return None
        token, _, row = bytes(data.data(MIME_TYPE).data()).decode(errors="replace").partition(":")
        if token != self._token or not row.isdigit() or not 0 <= int(row) < len(self._order):
            return None
        return int(row)

    def canDropMimeData(self, data: QMimeData, action: Qt.DropAction, row: int, column: int,
                        parent: Index) -> bool:
        return action == Qt.DropAction.MoveAction and self._dragged_row(data) is not None

    def dropMimeData(self, data: QMimeData, action: Qt.DropAction, row: int, column: int, parent: Index) -> bool:
        """A drop of one of this model's own rows before ``row`` (or onto ``parent``'s row)."""
        source = self._dragged_row(data)
        if source is None or action != Qt.DropAction.MoveAction:
            return False
        if row < 0:
            row = parent.row() if parent.isValid() else self.rowCount()
        return self.moveRows(QModelIndex(), source, 1, QModelIndex(), row)

    def moveRows(self, sourceParent: Index, sourceRow: int, count: int, destinationParent: Index,
                 destinationChild: int) -> bool:
        """Move one row to before ``destinationChild`` (row numbers before the move)."""
        if count != 1 or sourceParent.isValid() or destinationParent.isValid() \
                or not 0 <= sourceRow < len(self._order):
            return False
        final = destinationChild - 1 if destinationChild > sourceRow else destinationChild
        final = min(max(final, 0), len(self._order) - 1)
        return self._order.move(sourceRow, final)


class LocationView(QTableView):
    """The locations table; Ctrl+Up tries the selected location sooner, Ctrl+Down later."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setDragDropMode(QAbstractItemView.DragDropMode.InternalMove)
        self.setDefaultDropAction(Qt.DropAction.MoveAction)
        self.setDragEnabled(True)
        self.setAcceptDrops(True)
        self.setDropIndicatorShown(True)
        self.setDragDropOverwriteMode(False)
        self.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.setAlternatingRowColors(True)
        self.verticalHeader().setVisible(False)
        self.setWordWrap(False)
        self.setAccessibleName("Storage locations, first tried on top")

    def model(self) -> LocationModel:
        model = super().model()
        assert isinstance(model, LocationModel)
        return model

    def step(self, sooner: bool) -> bool:
        current = self.currentIndex()
        if not current.isValid():
            return False
        order = self.model().order
        return order.earlier(current.row()) if sooner else order.later(current.row())

    def keyPressEvent(self, event: QKeyEvent) -> None:
        if event.modifiers() == Qt.KeyboardModifier.ControlModifier and event.key() in (Qt.Key.Key_Up,
                                                                                         Qt.Key.Key_Down):
            self.step(event.key() == Qt.Key.Key_Up)
            event.accept()
            return
        super().keyPressEvent(event)


class LocationDialog(QDialog):
    """Add a storage location, or edit one (its name stays); groups come from the directory picker."""

    saved = Signal(object)  # the StorageLocationInfo

    def __init__(self, services: Services, location: StorageLocationInfo | None, taken: Sequence[str],
                 parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("location_dialog")
        self.setWindowTitle(f"Edit storage location {location.name}" if location else "Add a storage location")
        self.resize(560, 420)
        self._services = services
        self._location = location
        self._taken = [t for t in taken if location is None or t != location.name]
        self._saving: asyncio.Future[None] | None = None
        #: The picker dialog opened last (tests drive it).
        self.picker_dialog: DirectoryPickerDialog | None = None
        self.name = QLineEdit(location.name if location else "")
        self.name.setAccessibleName("Name")
        self.name.setReadOnly(location is not None)
        self.path = QLineEdit(location.path if location else "", placeholderText="\\\\server\\share\\userlayers")
        self.path.setAccessibleName("Path")
        self.size_gb = QLineEdit(str(location.default_size_gb if location else 10))
        self.size_gb.setAccessibleName("Default size (GB)")
        self.size_gb.setMaximumWidth(90)
        self.groups = QListWidget()
        self.groups.setAccessibleName("Groups")
        for sid, name in location.groups if location else ():
            self._add_group(sid, name)
        add_group = QPushButton("Add group…")
        add_group.clicked.connect(self.pick_group)
        remove_group = QPushButton("Remove group")
        remove_group.clicked.connect(lambda: self.groups.takeItem(self.groups.currentRow()))
        self.comment = QLineEdit(placeholderText="Kept in the audit log")
        self.comment.setAccessibleName("Comment")
        self.error = QLabel()
        self.error.setObjectName("error")
        self.error.setWordWrap(True)
        self.error.setStyleSheet(ERROR_STYLE)
        self.buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Cancel)
        self.ok = self.buttons.addButton("Save" if location else "Add", QDialogButtonBox.ButtonRole.AcceptRole)
        self.ok.clicked.connect(self.save)
        self.buttons.rejected.connect(self.reject)
        for edit in (self.name, self.path, self.size_gb):
            edit.textChanged.connect(self._check)
        group_buttons = QVBoxLayout()
        group_buttons.addWidget(add_group)
        group_buttons.addWidget(remove_group)
        group_buttons.addStretch(1)
        group_row = QHBoxLayout()
        group_row.addWidget(self.groups, 1)
        group_row.addLayout(group_buttons)
        form = QFormLayout()
        form.addRow("Name:", self.name)
        form.addRow("Path:", self.path)
        form.addRow("Default size (GB):", self.size_gb)
        form.addRow("Groups:", group_row)
        form.addRow("Comment:", self.comment)
        layout = QVBoxLayout(self)
        intro = QLabel("Users in one of the groups (nested groups count) keep their User Layer here, unless a "
                       "location higher in the list is assigned to one of their groups too.")
        intro.setWordWrap(True)
        layout.addWidget(intro)
        layout.addLayout(form)
        layout.addWidget(self.error)
        layout.addWidget(self.buttons)
        self._check()

    def _add_group(self, sid: str, name: str) -> None:
        if sid in self.group_list():
            return
        item = QListWidgetItem(icon("users"), name)
        item.setData(Qt.ItemDataRole.UserRole, (sid, name))
        item.setToolTip(sid)
        self.groups.addItem(item)

    def group_list(self) -> dict[str, str]:
        """SID → name of the groups listed."""
        pairs = [self.groups.item(r).data(Qt.ItemDataRole.UserRole) for r in range(self.groups.count())]
        return dict(pairs)

    def pick_group(self) -> None:
        dialog = DirectoryPickerDialog(self._services, "Add a group", (PrincipalKind.AD_GROUP,), parent=self)
        dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        dialog.accepted.connect(lambda: self._picked(dialog))
        self.picker_dialog = dialog
        dialog.setWindowModality(Qt.WindowModality.WindowModal)
        dialog.open()

    def _picked(self, dialog: DirectoryPickerDialog) -> None:
        if dialog.choice is not None:
            self._add_group(dialog.choice.sid, dialog.choice.name)

    def _check(self) -> None:
        problem = location_problem(self.name.text(), self.path.text(), self.size_gb.text(), taken=self._taken)
        # Empty fields are not errors yet, only not done.
        started = bool(self.name.text() and self.path.text())
        self.error.setText(problem if started else "")
        guard(self.ok, self._services, Operation.EDIT_STORAGE, enabled=not problem)

    def save(self) -> None:
        if self._saving is None or self._saving.done():
            self._saving = spawn(self._save())

    async def _save(self) -> None:
        name, path, comment = self.name.text().strip(), self.path.text().strip(), self.comment.text()
        groups = list(self.group_list().items())
        try:
            size = parse_size(self.size_gb.text())
        except LayerDeskError as exc:
            self.error.setText(str(exc))
            return
        storage = self._services.storage
        self.ok.setEnabled(False)
        try:
            if self._location is None:
                info = await off_ui_thread(lambda: storage.add_location(
                    name, path, groups=groups, default_size_gb=size, comment=comment))
            else:
                info = await off_ui_thread(lambda: storage.update_location(
                    name, path=path, groups=groups, default_size_gb=size, comment=comment))
        except LayerDeskError as exc:
            if isValid(self):
                self._check()
                self.error.setText(str(exc))
            return
        if isValid(self):
            self.saved.emit(info)
            self.accept()


class WhereBox(QGroupBox):
    """Where is this user's layer? A user (picked or typed) and a template → the folder, and why there."""

    answered = Signal()

    def __init__(self, services: Services, parent: QWidget | None = None) -> None:
        super().__init__("Where is this user's layer?", parent)
        self.setObjectName("where_box")
        self._services = services
        self._generation = 0
        self.place: UserLayerPlace | None = None
        self.picker = DirectoryPicker(services, (PrincipalKind.AD_USER,))
        self.picker.results.setMaximumHeight(110)
        self.template = QComboBox()
        self.template.setAccessibleName("Image template")
        self.template.setMinimumContentsLength(16)
        self.find_button = QPushButton("&Find")
        self.find_button.clicked.connect(self.locate)
        self.answer = QLabel("Choose a user and an image template (its OS layer names the folder).")
        self.answer.setObjectName("where_answer")
        self.answer.setWordWrap(True)
        self.answer.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.answer.setAlignment(Qt.AlignmentFlag.AlignTop | Qt.AlignmentFlag.AlignLeft)
        row = QHBoxLayout()
        row.addWidget(QLabel("Template:"))
        row.addWidget(self.template, 1)
        row.addWidget(self.find_button)
        left = QVBoxLayout()
        left.addWidget(self.picker, 1)
        left.addLayout(row)
        layout = QHBoxLayout(self)
        layout.addLayout(left, 1)
        layout.addWidget(self.answer, 1)
        guard(self.find_button, services, Operation.READ)

    def set_templates(self, names: Sequence[str]) -> None:
        current = self.template.currentText()
        self.template.clear()
        self.template.addItems(list(names))
        if current in names:
            self.template.setCurrentText(current)

    def user_text(self) -> str:
        choice = self.picker.current()
        return choice.sid if choice is not None else self.picker.typed_text()

    def locate(self) -> None:
        """Ask where the user's layer for the template lives (in a worker thread)."""
        self._generation += 1
        spawn(self._find(self._generation, self.user_text(), self.template.currentText()))

    async def _find(self, generation: int, user: str, template: str) -> None:
        self.answer.setText("Asking the directory for the user's groups…")
        try:
            place = await off_ui_thread(self._services.storage.user_layer_location, user, template)
        except LayerDeskError as exc:
            if isValid(self) and generation == self._generation:
                self.place = None
                self.answer.setText(f"<span style='{ERROR_STYLE}'>{exc}</span>")
                self.answered.emit()
            return
        if not isValid(self) or generation != self._generation:
            return
        self.place = place
        also = f"<br>Not used (lower priority): {', '.join(place.also)}" if place.also else ""
        self.answer.setText(
            f"<tt>{place.folder}</tt><br>{place.user}: location <b>{place.location}</b> (priority "
            f"{place.priority}) via group {place.group_name}; OS layer {place.os_layer} of template "
            f"{place.template}; {place.size_gb} GB.{also}")
        self.answered.emit()


class StorageTab(QWidget):
    """The storage locations in priority order, their actions, and the "where is this user's layer" box."""

    loaded = Signal(int)
    failed = Signal(str)

    def __init__(self, services: Services, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("user_layer_storage")
        self.services = services
        self._saved: tuple[str, ...] = ()
        self._loading: asyncio.Future[None] | None = None
        self.dialog: QDialog | None = None
        self.order = LocationOrder()
        self.model = LocationModel(self.order, self)
        self.view = LocationView()
        self.view.setModel(self.model)
        header = self.view.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.Interactive)
        header.setStretchLastSection(False)
        header.setSectionResizeMode(LocationModel.GROUPS, QHeaderView.ResizeMode.Stretch)
        self.model.rowsMoved.connect(lambda *_a: self._update_actions())
        self.model.modelReset.connect(self._update_actions)
        self.view.selectionModel().selectionChanged.connect(lambda *_a: self._update_actions())
        self.view.doubleClicked.connect(self._double_clicked)

        self.add_button = QPushButton("A&dd…")
        self.add_button.setToolTip("Add a storage location (tried after the others)")
        self.add_button.clicked.connect(self.add)
        self.edit_button = QPushButton("&Edit…")
        self.edit_button.setToolTip("Change the selected location's path, groups or size")
        self.edit_button.clicked.connect(self.edit)
        self.remove_button = QPushButton("Re&move")
        self.remove_button.setToolTip("Remove the selected location (the layers on the share stay)")
        self.remove_button.clicked.connect(self.remove)
        self.sooner_button = QPushButton("Try sooner")
        self.sooner_button.setToolTip("Ctrl+Up")
        self.sooner_button.clicked.connect(lambda: self._step(sooner=True))
        self.later_button = QPushButton("Try later")
        self.later_button.setToolTip("Ctrl+Down")
        self.later_button.clicked.connect(lambda: self._step(sooner=False))
        self.comment = QLineEdit(placeholderText="Why the order changes (kept in the audit log)")
        self.comment.setAccessibleName("Comment")
        self.save_button = QPushButton("&Save order")
        self.save_button.setToolTip("Save the new order in one change")
        self.save_button.clicked.connect(self.save_order)
        self.revert_button = QPushButton("Revert")
        self.revert_button.setToolTip("Go back to the saved order")
        self.revert_button.clicked.connect(self._revert)
        self.status = QLabel()
        self.status.setObjectName("storage_status")
        self.status.setWordWrap(True)
        self.where = WhereBox(services)

        actions = QHBoxLayout()
        for button in (self.add_button, self.edit_button, self.remove_button):
            actions.addWidget(button)
        actions.addSpacing(16)
        actions.addWidget(self.sooner_button)
        actions.addWidget(self.later_button)
        actions.addStretch(1)
        save_row = QHBoxLayout()
        save_row.addWidget(QLabel("Comment:"))
        save_row.addWidget(self.comment, 1)
        save_row.addWidget(self.save_button)
        save_row.addWidget(self.revert_button)
        hint = QLabel("The first location (from the top) assigned to one of a user's groups holds their User "
                      "Layer. Drag a row, or select it and press Ctrl+Up / Ctrl+Down, then save the order.")
        hint.setWordWrap(True)
        layout = QVBoxLayout(self)
        layout.addWidget(QLabel("<h2>User layer storage</h2>"))
        layout.addWidget(hint)
        layout.addLayout(actions)
        layout.addWidget(self.view, 2)
        layout.addLayout(save_row)
        layout.addWidget(self.status)
        layout.addWidget(self.where, 1)
        self._update_actions()

    # --- loading -------------------------------------------------------------------------------------

    def refresh(self) -> None:
        if self._loading is None or self._loading.done():
            self._loading = spawn(self._load())

    async def _load(self) -> None:
        self.status.setText("Loading…")

        def read() -> tuple[list[StorageLocationInfo], list[str]]:
            return (self.services.storage.list_locations(),
                    [t.name for t in self.services.templates.list_templates()])

        try:
            locations, templates = await off_ui_thread(read)
        except LayerDeskError as exc:
            if isValid(self):
                self.status.setText(str(exc))
                self.failed.emit(str(exc))
            return
        if not isValid(self):
            return
        self._saved = tuple(r.name for r in sorted(locations, key=lambda r: r.priority))
        self.model.set_records(locations)
        self.view.resizeColumnsToContents()
        self.view.horizontalHeader().setSectionResizeMode(LocationModel.GROUPS, QHeaderView.ResizeMode.Stretch)
        self.where.set_templates(templates)
        count = len(locations)
        self.status.setText(f"{count} storage location{'s' if count != 1 else ''}" if count else
                            "No storage location yet: add one, and assign it to the groups whose users keep their "
                            "User Layers there.")
        self.loaded.emit(count)

    # --- selection and actions -----------------------------------------------------------------------

    def selected(self) -> StorageLocationInfo | None:
        rows = self.view.selectionModel().selectedRows()
        return self.model.record(rows[0].row()) if rows else None

    def dirty(self) -> bool:
        return self.order.names() != self._saved

    def _update_actions(self) -> None:
        chosen = self.selected() is not None
        guard(self.add_button, self.services, Operation.EDIT_STORAGE)
        for button in (self.edit_button, self.remove_button, self.sooner_button, self.later_button):
            guard(button, self.services, Operation.EDIT_STORAGE, enabled=chosen)
        for button in (self.save_button, self.revert_button):
            guard(button, self.services, Operation.EDIT_STORAGE, enabled=self.dirty())

    def _double_clicked(self) -> None:
        if self.edit_button.isEnabled():
            self.edit()

    def _step(self, *, sooner: bool) -> None:
        self.view.setFocus()
        self.view.step(sooner)

    def _revert(self) -> None:
        self.refresh()

    def save_order(self) -> None:
        spawn(self._save_order())

    async def _save_order(self) -> None:
        names, comment = self.order.names(), self.comment.text()
        self.save_button.setEnabled(False)
        try:
            saved = await off_ui_thread(lambda: self.services.storage.reorder(names, comment=comment))
        except LayerDeskError as exc:
            if isValid(self):
                self.status.setText(f"<span style='{ERROR_STYLE}'>The order was not saved: {exc}</span>")
                self._update_actions()
            return
        if not isValid(self):
            return
        self.comment.clear()
        self._saved = tuple(r.name for r in saved)
        self.model.set_records(saved)
        self.status.setText("Saved the order: " + " › ".join(self._saved) + ".")

    def _open(self, location: StorageLocationInfo | None) -> None:
        dialog = LocationDialog(self.services, location, self.order.names(), self)
        dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        dialog.saved.connect(self._location_saved)
        self.dialog = dialog
        dialog.setWindowModality(Qt.WindowModality.WindowModal)
        dialog.open()

    def add(self) -> None:
        self._open(None)

    def edit(self) -> None:
        location = self.selected()
        if location is not None:
            self._open(location)

    def _location_saved(self, info: StorageLocationInfo) -> None:
        self.refresh()
        self.status.setText(f"Saved storage location {info.name}.")

    def remove(self) -> None:
        location = self.selected()
        if location is not None:
            spawn(self._remove(location))

    async def _remove(self, location: StorageLocationInfo) -> None:
        if not await confirm(self, "Remove storage location",
                             f"Remove storage location {location.name} ({location.path})? The User Layers on the "
                             "share stay where they are; users of its groups get the next location that applies.",
                             action="Remove"):
            return
        try:
            await off_ui_thread(lambda: self.services.storage.remove_location(location.name))
        except LayerDeskError as exc:
            show_message(self, "Storage location not removed", str(exc))
            return
        self.refresh()
