r"""Export and import of layers between installations (:mod:`app.services.transfer`), as a dialog.

**Export**: the layers to export (a checkable list; their OS layers and prerequisites come along), the
destination folder (local, or ``\\HOST\SHARE\folder`` with an account whose password is asked here and
handed to the task only), and a comment. **Import**: the export folder, a preview of what would be imported,
what is already here and what is in conflict, then the import. Both run as tasks with their progress and a
Cancel button.
"""

from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QAbstractItemView,
    QDialog,
    QDialogButtonBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)
from shiboken6 import isValid

from app.catalog.models import TaskState
from app.errors import LayerDeskError
from app.services import Services
from app.services.rbac import Operation
from app.services.transfer import Destination, ImportPreview, TransferService
from app.services.views import LayerInfo, TaskInfo
from app.tasks.runner import TaskRunner
from ui.background import off_ui_thread
from ui.layers_page import TaskProgress
from ui.pages import format_size, spawn
from ui.permissions import guard

#: Preview columns.
COL_LAYER, COL_VERSION, COL_ACTION, COL_SIZE, COL_WHY = range(5)
_ACTION_WORDS = {"new": "Import", "here": "Already here", "conflict": "Conflict"}
_ERROR_STYLE = "color: #b00020"


def _is_share(path: str) -> bool:
    return path.startswith(("\\\\", "//"))


class _FolderRow(QWidget):
    r"""A folder (or ``\\HOST\SHARE\folder``) with Browse…, and the share account shown for share paths."""

    def __init__(self, placeholder: str, name: str, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.path = QLineEdit(placeholderText=placeholder)
        self.path.setAccessibleName(name)
        browse = QPushButton("&Browse…")
        browse.clicked.connect(self._browse)
        self.user = QLineEdit(placeholderText="DOMAIN\\user")
        self.user.setAccessibleName("Share account")
        self.password = QLineEdit(echoMode=QLineEdit.EchoMode.Password)
        self.password.setAccessibleName("Share password")
        self.password.setToolTip("Used for this transfer only; it is never stored.")
        row = QHBoxLayout()
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.path, 1)
        row.addWidget(browse)
        self.account = QWidget()
        account = QHBoxLayout(self.account)
        account.setContentsMargins(0, 0, 0, 0)
        account.addWidget(QLabel("Account:"))
        account.addWidget(self.user, 1)
        account.addWidget(QLabel("Password:"))
        account.addWidget(self.password, 1)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(row)
        layout.addWidget(self.account)
        self.setFocusProxy(self.path)  # the form label's mnemonic lands in the path
        self.path.textChanged.connect(lambda _t: self._path_changed())
        self._path_changed()

    def _path_changed(self) -> None:
        self.account.setVisible(_is_share(self.path.text().strip()))

    def _browse(self) -> None:
        dialog = QFileDialog(self, "Choose the export folder")
        dialog.setFileMode(QFileDialog.FileMode.Directory)
        dialog.setOption(QFileDialog.Option.ShowDirsOnly)
        dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        dialog.fileSelected.connect(self.path.setText)
        dialog.open()

    def destination(self) -> Destination | None:
        path = self.path.text().strip()
        if not path:
            return None
        if _is_share(path):
            return Destination(path, self.user.text().strip() or None, self.password.text())
        return Destination(path)


class TransferDialog(QDialog):
    """Export layers to an export folder, or import them from one, as tasks with progress and Cancel."""

    layers_loaded = Signal(int)  # layers listed for export
    previewed = Signal(object)  # the ImportPreview shown (None: refused, the reason is shown)
    task_finished = Signal(object)  # the TaskInfo an export or import ended with

    def __init__(self, services: Services, runner: TaskRunner, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Export and import layers")
        self.setObjectName("transfer")
        self.services = services
        self.runner = runner
        self.transfer = TransferService.for_services(services)
        self.preview: ImportPreview | None = None
        self.task_ids: list[int] = []

        self.tabs = QTabWidget()
        self.tabs.addTab(self._export_tab(), "&Export")
        self.tabs.addTab(self._import_tab(), "&Import")
        self.tasks = QVBoxLayout()
        close = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        close.rejected.connect(self.reject)
        layout = QVBoxLayout(self)
        layout.addWidget(self.tabs, 1)
        layout.addLayout(self.tasks)
        layout.addWidget(close)
        self.resize(760, 560)
        spawn(self._load_layers())

    # --- export ----------------------------------------------------------------------------------

    def _export_tab(self) -> QWidget:
        tab = QWidget()
        self.layer_list = QListWidget()
        self.layer_list.setAccessibleName("Layers to export")
        self.layer_list.setToolTip("Checked layers are exported with all their deployable and finalizing versions; "
                                   "their OS layers and prerequisites come along.")
        all_button = QPushButton("Check &all")
        all_button.clicked.connect(lambda: self._check_all(Qt.CheckState.Checked))
        none_button = QPushButton("Check &none")
        none_button.clicked.connect(lambda: self._check_all(Qt.CheckState.Unchecked))
        checks = QHBoxLayout()
        checks.addWidget(all_button)
        checks.addWidget(none_button)
        checks.addStretch(1)
        self.export_to = _FolderRow("A folder, or \\\\HOST\\SHARE\\folder", "Export folder")
        self.export_comment = QLineEdit(placeholderText="Why (kept in the audit log)")
        self.export_comment.setAccessibleName("Export comment")
        self.export_message = QLabel(wordWrap=True)
        self.export_message.setObjectName("export_message")
        self.export_button = QPushButton("E&xport")
        self.export_button.setToolTip("Copy the checked layers into the folder; versions already there with the "
                                      "same checksum are not copied again.")
        self.export_button.clicked.connect(lambda: spawn(self._start_export()))
        guard(self.export_button, self.services, Operation.RUN_TASKS)
        form = QFormLayout(tab)
        form.addRow(QLabel("Export layers to a folder another LayerDesk installation can import from."))
        form.addRow("&Layers:", self.layer_list)
        form.addRow("", checks)
        form.addRow("&Destination:", self.export_to)
        form.addRow("&Comment:", self.export_comment)
        form.addRow(self.export_message)
        buttons = QHBoxLayout()
        buttons.addStretch(1)
        buttons.addWidget(self.export_button)
        form.addRow(buttons)
        return tab

    async def _load_layers(self) -> None:
        try:
            layers = await off_ui_thread(self.services.layers.list_layers)
        except LayerDeskError as exc:
            if isValid(self):
                self._say(self.export_message, str(exc), error=True)
            return
        if not isValid(self):
            return
        self.layer_list.clear()
        for layer in layers:
            self.layer_list.addItem(self._layer_item(layer))
        self.layers_loaded.emit(len(layers))

    @staticmethod
    def _layer_item(layer: LayerInfo) -> QListWidgetItem:
        latest = f", latest {layer.latest_version} ({layer.latest_state.value})" if layer.latest_version and \
            layer.latest_state else ", no versions"
        item = QListWidgetItem(f"{layer.name}  —  {layer.type.value} layer{latest}, {format_size(layer.size_bytes)}")
        item.setData(Qt.ItemDataRole.UserRole, layer.name)
        item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
        item.setCheckState(Qt.CheckState.Unchecked)
        return item

    def _check_all(self, state: Qt.CheckState) -> None:
        for row in range(self.layer_list.count()):
            self.layer_list.item(row).setCheckState(state)

    def checked_layers(self) -> list[str]:
        items = (self.layer_list.item(row) for row in range(self.layer_list.count()))
        return [str(i.data(Qt.ItemDataRole.UserRole)) for i in items if i.checkState() == Qt.CheckState.Checked]

    async def _start_export(self) -> None:
        destination = self.export_to.destination()
        names = self.checked_layers()
        if not names:
            self._say(self.export_message, "Check the layers to export.", error=True)
            return
        if destination is None:
            self._say(self.export_message, "Choose the destination folder.", error=True)
            return
        comment = self.export_comment.text().strip()
        self.export_button.setEnabled(False)
        self._say(self.export_message, "Checking…")
        try:
            task_id = await off_ui_thread(lambda: self.transfer.start_export(self.runner, destination, names,
                                                                             comment=comment))
        except LayerDeskError as exc:
            if isValid(self):
                self._say(self.export_message, str(exc), error=True)
                self.export_button.setEnabled(True)
            return
        if isValid(self):
            self._say(self.export_message, f"Export started (task {task_id}).")
            self._track(task_id, f"Export to {destination.path}", self.export_button, self.export_message)

    # --- import ----------------------------------------------------------------------------------

    def _import_tab(self) -> QWidget:
        tab = QWidget()
        self.import_from = _FolderRow("An export folder, or \\\\HOST\\SHARE\\folder", "Export folder to import")
        self.preview_button = QPushButton("&Preview")
        self.preview_button.setToolTip("Read the export folder and show what an import would do (nothing changes).")
        self.preview_button.clicked.connect(lambda: spawn(self._preview()))
        self.preview_table = QTableWidget(0, 5)
        self.preview_table.setAccessibleName("What the import would do")
        self.preview_table.setHorizontalHeaderLabels(["Layer", "Version", "Action", "Size", "Why"])
        self.preview_table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.preview_table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.preview_table.verticalHeader().hide()
        self.preview_table.verticalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        header = self.preview_table.horizontalHeader()
        for column in (COL_LAYER, COL_VERSION, COL_ACTION, COL_SIZE):
            header.setSectionResizeMode(column, QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(COL_WHY, QHeaderView.ResizeMode.Stretch)
        self.import_comment = QLineEdit(placeholderText="Why (kept in the audit log)")
        self.import_comment.setAccessibleName("Import comment")
        self.import_message = QLabel(wordWrap=True)
        self.import_message.setObjectName("import_message")
        self.import_button = QPushButton("I&mport")
        self.import_button.setToolTip("Verify every checksum, then import what is new; conflicts are never "
                                      "overwritten.")
        self.import_button.setEnabled(False)
        self.import_button.clicked.connect(lambda: spawn(self._start_import()))
        self.import_from.path.textChanged.connect(lambda _t: self._forget_preview())
        form = QFormLayout(tab)
        form.addRow(QLabel("Import layers from an export folder. Every checksum is verified before anything is "
                           "imported."))
        source = QWidget()  # a widget, not a layout, so that the label's mnemonic has a buddy
        source_row = QHBoxLayout(source)
        source_row.setContentsMargins(0, 0, 0, 0)
        source_row.addWidget(self.import_from, 1)
        source_row.addWidget(self.preview_button, 0, Qt.AlignmentFlag.AlignTop)
        source.setFocusProxy(self.import_from)
        form.addRow("&Source:", source)
        form.addRow(self.preview_table)
        form.addRow("&Comment:", self.import_comment)
        form.addRow(self.import_message)
        buttons = QHBoxLayout()
        buttons.addStretch(1)
        buttons.addWidget(self.import_button)
        form.addRow(buttons)
        return tab

    def _forget_preview(self) -> None:
        self.preview = None
        self.preview_table.setRowCount(0)
        self.import_button.setEnabled(False)

    async def _preview(self) -> None:
        source = self.import_from.destination()
        if source is None:
            self._say(self.import_message, "Choose the export folder to import from.", error=True)
            return
        self.preview_button.setEnabled(False)
        self._say(self.import_message, "Reading the export folder…")
        try:
            preview = await off_ui_thread(self.transfer.preview_import, source)
        except LayerDeskError as exc:
            if isValid(self):
                self._forget_preview()
                self._say(self.import_message, str(exc), error=True)
                self.preview_button.setEnabled(True)
                self.previewed.emit(None)
            return
        if not isValid(self):
            return
        self.preview_button.setEnabled(True)
        self._show_preview(preview)
        self.previewed.emit(preview)

    def _show_preview(self, preview: ImportPreview) -> None:
        self.preview = preview
        items = [i for i in preview.items if i.version or i.action == "conflict"]
        self.preview_table.setRowCount(len(items))
        for row, item in enumerate(items):
            cells = [item.layer, item.version or "(the layer)", _ACTION_WORDS[item.action],
                     format_size(item.size_bytes) if item.version else "", item.reason]
            for column, text in enumerate(cells):
                cell = QTableWidgetItem(text)
                if item.action == "conflict":
                    cell.setForeground(Qt.GlobalColor.darkRed)
                self.preview_table.setItem(row, column, cell)
        new = [i for i in preview.new if i.version]
        here = [i for i in preview.items if i.action == "here" and i.version]
        # A layer in conflict is counted by its versions (or once, when it has none).
        conflicts = [i for i in preview.conflicts
                     if i.version or not any(c.layer == i.layer and c.version for c in preview.conflicts)]
        self._say(self.import_message,
                  f"{len(new)} version(s) to import ({format_size(sum(i.size_bytes for i in new))}), {len(here)} "
                  f"already here, {len(conflicts)} conflict(s)."
                  + (" Conflicts are not imported." if conflicts else ""))
        self.import_button.setEnabled(bool(new) and self.services.caller.may(Operation.RUN_TASKS))

    async def _start_import(self) -> None:
        source = self.import_from.destination()
        if source is None or self.preview is None:
            return
        comment = self.import_comment.text().strip()
        self.import_button.setEnabled(False)
        self._say(self.import_message, "Checking…")
        try:
            task_id = await off_ui_thread(lambda: self.transfer.start_import(self.runner, source, comment=comment))
        except LayerDeskError as exc:
            if isValid(self):
                self._say(self.import_message, str(exc), error=True)
                self.import_button.setEnabled(True)
            return
        if isValid(self):
            self._say(self.import_message, f"Import started (task {task_id}).")
            self._track(task_id, f"Import from {source.path}", None, self.import_message)

    # --- tasks -------------------------------------------------------------------------------------

    def _track(self, task_id: int, what: str, button: QPushButton | None, label: QLabel) -> None:
        self.task_ids.append(task_id)
        strip = TaskProgress(self.services, task_id, what, self)
        self.tasks.addWidget(strip)

        def ended(task: TaskInfo) -> None:
            if button is not None and isValid(button):
                guard(button, self.services, Operation.RUN_TASKS)
            conflicts = (task.result or {}).get("conflicts") or []
            if not isValid(label):
                pass
            elif conflicts:
                self._say(label, "Not imported (conflicts): " + "; ".join(conflicts), error=True)
            elif task.state is TaskState.COMPLETE:
                self._say(label, f"Task {task_id} is done.")
            else:
                self._say(label, f"Task {task_id} ended {task.state.value.replace('_', ' ')}: "
                                 f"{task.error or task.message}", error=task.state is not TaskState.CANCELED)
            self.task_finished.emit(task)

        strip.finished.connect(ended)
        strip.show()

    @staticmethod
    def _say(label: QLabel, text: str, *, error: bool = False) -> None:
        label.setText(text)
        label.setStyleSheet(_ERROR_STYLE if error else "")


__all__ = ["TransferDialog"]
