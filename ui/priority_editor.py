"""The layer priority editor: a template's app layers, highest priority on top, reordered by drag and drop or
Ctrl+Up / Ctrl+Down, between the platform layer (fixed on top: it always wins) and the OS layer (fixed at the
bottom: the base). Next to it, the conflict report says which layer wins each contested file and registry
value, recomputed off the UI thread as the order changes.

The truth is a :class:`app.console.template_wizard.PriorityOrder` (a plain list, lowest priority first); the
Qt model mirrors it and emits proper move signals when it moves. Drag and drop accepts only the model's own
rows and calls the list's ``move``.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import uuid
from collections.abc import Sequence
from typing import Any

from PySide6.QtCore import (
    QAbstractListModel,
    QByteArray,
    QMimeData,
    QModelIndex,
    QPersistentModelIndex,
    Qt,
    QTimer,
    Signal,
)
from PySide6.QtGui import QFont, QKeyEvent, QPalette
from PySide6.QtWidgets import (
    QAbstractItemView,
    QDialog,
    QDialogButtonBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QListView,
    QPushButton,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)
from shiboken6 import isValid

from app.console.template_wizard import PriorityOrder
from app.errors import LayerDeskError
from app.services import Services
from app.services.publishing import ConflictPreview
from app.services.rbac import Operation
from app.services.views import TemplateInfo
from ui.background import off_ui_thread
from ui.pages import spawn
from ui.permissions import guard

log = logging.getLogger(__name__)

Index = QModelIndex | QPersistentModelIndex
MIME_TYPE = "application/x-layerdesk-priority-row"
#: Wait this long after the last move before computing the conflict report again.
CONFLICT_DELAY_MS = 250


class PriorityRole(enum.IntEnum):
    #: The row's ``LAYER:VERSION``.
    REF = Qt.ItemDataRole.UserRole + 1
    #: ``"platform"``, ``"app"`` or ``"os"``.
    KIND = Qt.ItemDataRole.UserRole + 2


class PriorityModel(QAbstractListModel):
    """Rows top (wins) to bottom: the platform layer (if any), the app layers from the highest priority
    down, the OS layer. Only app layer rows move."""

    def __init__(self, order: PriorityOrder, os: str | None = None, platform: str | None = None,
                 parent: Any = None) -> None:
        super().__init__(parent)
        self._order = order
        self._os = os
        self._platform = platform
        #: Drops carry this, so rows dragged from another model are refused.
        self._token = uuid.uuid4().hex
        order.subscribe(self)

    @property
    def order(self) -> PriorityOrder:
        return self._order

    def detach(self) -> None:
        """Stop following the order (before the model goes away while the order lives on)."""
        self._order.unsubscribe(self)

    def set_fixed(self, os: str | None, platform: str | None) -> None:
        self.beginResetModel()
        self._os, self._platform = os, platform
        self.endResetModel()

    # --- rows ↔ the order ----------------------------------------------------------------------------

    @property
    def _offset(self) -> int:
        return 1 if self._platform else 0

    def app_rows(self) -> range:
        return range(self._offset, self._offset + len(self._order))

    def row_of(self, index: int) -> int:
        """The row showing item ``index`` of the order (0 = lowest priority = the lowest app row)."""
        return self._offset + len(self._order) - 1 - index

    def index_of(self, row: int) -> int:
        return len(self._order) - 1 - (row - self._offset)

    def _kind(self, row: int) -> str:
        if self._platform and row == 0:
            return "platform"
        return "app" if row in self.app_rows() else "os"

    # --- OrderObserver -------------------------------------------------------------------------------

    def moving(self, source: int, destination: int) -> None:
        src, dst = self.row_of(source), self.row_of(destination)
        ok = self.beginMoveRows(QModelIndex(), src, src, QModelIndex(), dst + 1 if dst > src else dst)
        assert ok, (src, dst)

    def moved(self, source: int, destination: int) -> None:
        self.endMoveRows()

    def resetting(self) -> None:
        self.beginResetModel()

    def reset(self) -> None:
        self.endResetModel()

    # --- Qt API --------------------------------------------------------------------------------------

    def rowCount(self, parent: Index = QModelIndex()) -> int:  # noqa: B008 - Qt's signature
        if parent.isValid():
            return 0
        return self._offset + len(self._order) + (1 if self._os else 0)

    def data(self, index: Index, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if not index.isValid() or not 0 <= index.row() < self.rowCount():
            return None
        row = index.row()
        kind = self._kind(row)
        if kind == "platform":
            ref = self._platform
        elif kind == "os":
            ref = self._os
        else:
            ref = self._order[self.index_of(row)]
        if role == Qt.ItemDataRole.DisplayRole:
            if kind == "platform":
                return f"{ref}   – platform layer, always on top"
            if kind == "os":
                return f"{ref}   – OS layer, the base"
            return f"{self.index_of(row) + 1}. {ref}"
        if role == PriorityRole.REF:
            return ref
        if role == PriorityRole.KIND:
            return kind
        if role == Qt.ItemDataRole.ToolTipRole:
            if kind == "app":
                return "Drag, or press Ctrl+Up / Ctrl+Down, to change its priority (the higher one wins)."
            return ("The platform layer is applied last and always wins." if kind == "platform"
                    else "The OS layer is the base every other layer is applied onto.")
        if role == Qt.ItemDataRole.FontRole and kind != "app":
            font = QFont()
            font.setItalic(True)
            return font
        if role == Qt.ItemDataRole.ForegroundRole and kind != "app":
            return QPalette().brush(QPalette.ColorGroup.Disabled, QPalette.ColorRole.Text)
        if role == Qt.ItemDataRole.BackgroundRole and kind != "app":
            return QPalette().brush(QPalette.ColorRole.Window)
        return None

    def flags(self, index: Index) -> Qt.ItemFlag:
        if not index.isValid():
            return Qt.ItemFlag.ItemIsDropEnabled  # drops land between rows, never on one
        if self._kind(index.row()) == "app":
            return Qt.ItemFlag.ItemIsEnabled | Qt.ItemFlag.ItemIsSelectable | Qt.ItemFlag.ItemIsDragEnabled
        return Qt.ItemFlag.ItemIsEnabled

    def supportedDropActions(self) -> Qt.DropAction:
        return Qt.DropAction.MoveAction

    def supportedDragActions(self) -> Qt.DropAction:
        return Qt.DropAction.MoveAction

    def mimeTypes(self) -> list[str]:
        return [MIME_TYPE]

    def mimeData(self, indexes: Sequence[QModelIndex]) -> QMimeData:
        data = QMimeData()
        rows = sorted({i.row() for i in indexes if i.isValid() and self._kind(i.row()) == "app"})
        if rows:
            data.setData(MIME_TYPE, QByteArray(f"{self._token}:{rows[0]}".encode()))
        return data

    def _dragged_row(self, data: QMimeData) -> int | None:
        if not data.hasFormat(MIME_TYPE):
            return None
        token, _, row = bytes(data.data(MIME_TYPE).data()).decode(errors="replace").partition(":")
        if token != self._token or not row.isdigit() or int(row) not in self.app_rows():
            return None
        return int(row)

    def canDropMimeData(self, data: QMimeData, action: Qt.DropAction, row: int, column: int,
                        parent: Index) -> bool:
        return action == Qt.DropAction.MoveAction and self._dragged_row(data) is not None

    def dropMimeData(self, data: QMimeData, action: Qt.DropAction, row: int, column: int, parent: Index) -> bool:
        """A drop of one of this model's own app rows before ``row`` (or onto ``parent``'s row)."""
        source = self._dragged_row(data)
        if source is None or action != Qt.DropAction.MoveAction:
            return False
        if row < 0:
            row = parent.row() if parent.isValid() else self.rowCount()
        return self.moveRows(QModelIndex(), source, 1, QModelIndex(), row)

    def moveRows(self, sourceParent: Index, sourceRow: int, count: int, destinationParent: Index,
                 destinationChild: int) -> bool:
        """Move one app row to before ``destinationChild`` (row numbers before the move); a destination
        among the fixed rows means the nearest end of the app rows."""
        apps = self.app_rows()
        if count != 1 or sourceParent.isValid() or destinationParent.isValid() or sourceRow not in apps:
            return False
        final = destinationChild - 1 if destinationChild > sourceRow else destinationChild
        final = min(max(final, apps.start), apps.stop - 1)
        return self._order.move(self.index_of(sourceRow), self.index_of(final))


class PriorityListView(QListView):
    """The list of layers; Ctrl+Up raises the selected app layer's priority, Ctrl+Down lowers it."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setDragDropMode(QAbstractItemView.DragDropMode.InternalMove)
        self.setDefaultDropAction(Qt.DropAction.MoveAction)
        self.setDragEnabled(True)
        self.setAcceptDrops(True)
        self.setDropIndicatorShown(True)
        self.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.setSpacing(2)
        self.setAccessibleName("Layer priority, top wins")

    def model(self) -> PriorityModel:
        model = super().model()
        assert isinstance(model, PriorityModel)
        return model

    def step(self, up: bool) -> bool:
        """Move the current app layer one row up (higher priority) or down."""
        model = self.model()
        current = self.currentIndex()
        if not current.isValid() or current.row() not in model.app_rows():
            return False
        index = model.index_of(current.row())
        return model.order.raise_priority(index) if up else model.order.lower_priority(index)

    def keyPressEvent(self, event: QKeyEvent) -> None:
        if event.modifiers() == Qt.KeyboardModifier.ControlModifier and event.key() in (Qt.Key.Key_Up,
                                                                                         Qt.Key.Key_Down):
            self.step(event.key() == Qt.Key.Key_Up)
            event.accept()
            return
        super().keyPressEvent(event)


class ConflictPanel(QWidget):
    """The conflict report of a layer stack: each contested path or value, the layers that supply it (lowest
    first) and the one that wins. Computed in a worker thread; only the latest request is shown."""

    #: Emitted after each report (or explanation) is shown.
    computed = Signal()

    def __init__(self, services: Services, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("conflict_report")
        self._services = services
        self._generation = 0
        self._wanted: tuple[str | None, tuple[str, ...], str | None] = (None, (), None)
        self.preview: ConflictPreview | None = None
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(CONFLICT_DELAY_MS)
        self._timer.timeout.connect(self._start)
        heading = QLabel("<b>Conflict report</b>")
        self.summary = QLabel("")
        self.summary.setWordWrap(True)
        self.summary.setObjectName("conflict_summary")
        self.table = QTableWidget(0, 4)
        self.table.setHorizontalHeaderLabels(["Path or value", "Kind", "Supplied by (lowest first)", "Wins"])
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setAlternatingRowColors(True)
        self.table.setWordWrap(False)  # one line a row; long text is elided and the tooltip shows all of it
        self.table.setTextElideMode(Qt.TextElideMode.ElideMiddle)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        header.setSectionResizeMode(1, QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(2, QHeaderView.ResizeMode.Interactive)
        header.resizeSection(2, 200)
        header.setSectionResizeMode(3, QHeaderView.ResizeMode.ResizeToContents)
        # Takes the table's room while there is no table, so the text stays under the heading.
        self._filler = QWidget()
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(heading)
        layout.addWidget(self.summary)
        layout.addWidget(self.table, 1)
        layout.addWidget(self._filler, 1)
        self.table.hide()

    def request(self, os: str | None, apps: Sequence[str], platform: str | None, *, at_once: bool = False) -> None:
        """Show the report of this stack (after a short pause, so a burst of moves computes once)."""
        self._wanted = (os, tuple(apps), platform)
        self._generation += 1
        self.summary.setText("Computing the conflict report…")
        if at_once:
            self._timer.stop()
            self._start()
        else:
            self._timer.start()

    def _start(self) -> None:
        spawn(self._compute(self._generation, *self._wanted))

    async def _compute(self, generation: int, os: str | None, apps: tuple[str, ...], platform: str | None) -> None:
        if os is None:
            self._show(generation, None, "Choose an OS layer version to see the conflict report.")
            return
        try:
            preview = await off_ui_thread(self._services.publishing.preview_conflicts, os, apps, platform)
        except LayerDeskError as exc:
            self._show(generation, None, f"The conflict report cannot be computed: {exc}")
            return
        if preview.missing_content:
            self._show(generation, preview, "The conflict report compares the layers' stored content, and "
                       "these versions have none yet:\n• " + "\n• ".join(preview.missing_content))
            return
        count = len(preview.conflicts)
        self._show(generation, preview, "No file or registry value is supplied by more than one layer." if not count
                   else f"{count} contested path{'s' if count != 1 else ''} or value{'s' if count != 1 else ''}; "
                        "the layer in the last column wins.")

    def _show(self, generation: int, preview: ConflictPreview | None, text: str) -> None:
        if not isValid(self) or generation != self._generation:
            return  # the panel is gone, or a newer order was asked for meanwhile
        self.preview = preview
        conflicts = preview.conflicts if preview else ()
        self.table.setSortingEnabled(False)  # rows would move while they are filled
        self.table.setRowCount(len(conflicts))
        for row, conflict in enumerate(conflicts):
            winner = f"{conflict.winner} (removes)" if conflict.deleted else conflict.winner
            for column, text_ in enumerate((conflict.path, conflict.kind, " < ".join(conflict.layers), winner)):
                item = QTableWidgetItem(text_)
                item.setToolTip(text_)
                self.table.setItem(row, column, item)
        self.table.setSortingEnabled(True)  # click a heading to sort, e.g. by the layer that wins
        self.table.setVisible(bool(conflicts))
        self._filler.setVisible(not conflicts)
        self.summary.setText(text)
        self.computed.emit()

    def winners(self) -> dict[str, str]:
        """Path → winning layer, as shown."""
        return {c.path: c.winner for c in (self.preview.conflicts if self.preview else ())}


class PriorityEditor(QWidget):
    """The priority list with its buttons, and the conflict report next to it."""

    #: Emitted after every move.
    changed = Signal()

    def __init__(self, services: Services, order: PriorityOrder, os: str | None = None,
                 platform: str | None = None, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("priority_editor")
        self._os, self._platform = os, platform
        self.model = PriorityModel(order, os, platform, self)
        self.view = PriorityListView()
        self.view.setModel(self.model)
        self.model.rowsMoved.connect(self._moved)
        self.model.modelReset.connect(self._moved)
        self.raise_button = QPushButton("Raise priority")
        self.raise_button.setToolTip("Ctrl+Up")
        self.raise_button.clicked.connect(lambda: self._step(up=True))
        self.lower_button = QPushButton("Lower priority")
        self.lower_button.setToolTip("Ctrl+Down")
        self.lower_button.clicked.connect(lambda: self._step(up=False))
        self.conflicts = ConflictPanel(services)

        hint = QLabel("Top wins. Drag an app layer, or select it and press Ctrl+Up / Ctrl+Down.")
        hint.setWordWrap(True)
        buttons = QHBoxLayout()
        buttons.addWidget(self.raise_button)
        buttons.addWidget(self.lower_button)
        buttons.addStretch(1)
        left = QWidget()
        left_layout = QVBoxLayout(left)
        left_layout.setContentsMargins(0, 0, 0, 0)
        left_layout.addWidget(hint)
        left_layout.addWidget(self.view, 1)
        left_layout.addLayout(buttons)
        splitter = QSplitter()
        splitter.addWidget(left)
        splitter.addWidget(self.conflicts)
        splitter.setStretchFactor(0, 1)
        splitter.setStretchFactor(1, 2)
        splitter.setChildrenCollapsible(False)
        splitter.setSizes([320, 680])  # scaled to the width it gets
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(splitter)

    @property
    def order(self) -> PriorityOrder:
        return self.model.order

    def set_stack(self, os: str | None, platform: str | None) -> None:
        self._os, self._platform = os, platform
        self.model.set_fixed(os, platform)

    def recompute(self, *, at_once: bool = True) -> None:
        self.conflicts.request(self._os, self.order.refs(), self._platform, at_once=at_once)

    def _step(self, *, up: bool) -> None:
        self.view.setFocus()
        self.view.step(up)

    def _moved(self, *_args: Any) -> None:
        self.conflicts.request(self._os, self.order.refs(), self._platform)
        self.changed.emit()


class PriorityDialog(QDialog):
    """Reorder a saved template's app layers and save the order in one service call with a comment."""

    saved = Signal(object)  # the TemplateInfo after the save

    def __init__(self, services: Services, template: TemplateInfo, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("priority_dialog")
        self.setWindowTitle(f"Layer priority – {template.name}")
        self.resize(960, 560)
        self._services = services
        self._template = template
        self._saving: asyncio.Future[None] | None = None
        self.order = PriorityOrder(template.app_layers)
        self.editor = PriorityEditor(services, self.order, template.os_version, template.platform_version)
        self.editor.changed.connect(self._moved)
        self.comment = QLineEdit(placeholderText="Why the order changes (kept in the audit log)")
        self.comment.setAccessibleName("Comment")
        self.error = QLabel()
        self.error.setObjectName("error")
        self.error.setWordWrap(True)
        self.error.setStyleSheet("color: #b00020")
        self.buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Save | QDialogButtonBox.StandardButton.Close)
        self.save_button = self.buttons.button(QDialogButtonBox.StandardButton.Save)
        self.save_button.clicked.connect(self.save)
        self.buttons.rejected.connect(self.reject)
        comment_row = QHBoxLayout()
        comment_row.addWidget(QLabel("Comment:"))
        comment_row.addWidget(self.comment, 1)
        layout = QVBoxLayout(self)
        if not template.app_layers:
            layout.addWidget(QLabel("This template has no app layers to order; add some with Edit…."))
        layout.addWidget(self.editor, 1)
        layout.addLayout(comment_row)
        layout.addWidget(self.error)
        layout.addWidget(self.buttons)
        self._update()
        self.editor.recompute()

    def _moved(self) -> None:
        self.error.clear()
        self._update()

    def _update(self) -> None:
        changed = self.order.refs() != self._template.app_layers
        guard(self.save_button, self._services, Operation.EDIT_TEMPLATES, enabled=changed)

    def save(self) -> None:
        if self._saving is None or self._saving.done():
            self._saving = spawn(self._save())

    async def _save(self) -> None:
        self.save_button.setEnabled(False)
        layers = list(self.order.layers())
        try:
            info = await off_ui_thread(lambda: self._services.templates.set_priority(
                self._template.name, layers, comment=self.comment.text()))
        except LayerDeskError as exc:
            if isValid(self):
                self.error.setText(str(exc))
                self._update()
            return
        if isValid(self):
            self.saved.emit(info)
            self.accept()
