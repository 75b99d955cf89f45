"""The Layers page: OS, platform and app layers with their versions; create a layer, import a version
(with its progress and a cancel button), create a packaging disk for a new version of an app or platform layer,
finalize it from the packaging machine's disk or abandon it (as tasks with progress and cancel), delete a layer or
a version (the service says why it refuses),
and the details of the selected layer and version: files, registry changes and the audit entries.

On an empty catalog it offers to create a demo lab (:mod:`app.services.demo`) as background work.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PySide6.QtCore import QModelIndex, QPersistentModelIndex, QSortFilterProxyModel, Qt, QTimer, Signal
from PySide6.QtGui import QFontDatabase, QHideEvent, QShowEvent, QStandardItemModel
from PySide6.QtWidgets import (
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QFileDialog,
    QFormLayout,
    QFrame,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QRadioButton,
    QSpinBox,
    QSplitter,
    QTabBar,
    QTableView,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)
from shiboken6 import isValid

from app.catalog.models import LayerType, TaskState, VersionState
from app.errors import LayerDeskError
from app.services import Services
from app.services.demo import DEMO_LABEL, DemoLab, create_demo_lab
from app.services.layers import VersionContents
from app.services.packaging import PACKAGING_FORMATS, packaging_service
from app.services.rbac import LAYER_OPERATION, Operation
from app.services.views import AuditEntryInfo, LayerDetail, LayerInfo, LayerVersionInfo, TaskInfo
from app.tasks.runner import TaskRunner
from ui.background import off_ui_thread
from ui.pages import AUDIT_COLUMNS, confirm, fit_columns, format_size, format_when, show_message, spawn
from ui.permissions import guard, refusal
from ui.table_model import Column, ItemRole, RecordTableModel

EMPTY_CATALOG = (
    "<h3>Welcome to LayerDesk</h3>"
    "<p>An image is built from three kinds of layer, merged bottom to top:</p>"
    "<ul>"
    "<li><b>OS layer</b> – Windows itself, imported once from a gold image (a VHD, VHDX, VMDK or WIM such as "
    "install.wim). Every other layer belongs to one OS layer.</li>"
    "<li><b>Platform layer</b> – what one hypervisor and broker need: their tools, drivers and agents (for "
    "example VMware Tools and the Citrix VDA). It is applied last and always wins.</li>"
    "<li><b>App layers</b> – one application each, in the priority order an image template gives them; "
    "they can also be delivered at logon as elastic layers.</li>"
    "</ul>"
    "<p>Start by importing your OS layer, or create a demo lab to look around first: a synthetic OS layer "
    f"with real registry hives, a platform layer, three overlapping app layers and an image template over "
    f"them ({DEMO_LABEL}).</p>"
)
#: How often a running import's progress is read.
IMPORT_POLL_MS = 400
TYPE_TABS: tuple[tuple[str, LayerType | None], ...] = (
    ("All", None), ("OS", LayerType.OS), ("Platform", LayerType.PLATFORM), ("App", LayerType.APP),
)


@dataclass(frozen=True)
class LayerRow:
    """A layer as the table shows it: the record and the image templates that use it."""

    layer: LayerInfo
    templates: tuple[str, ...]


def _table(model: Any, *, stretch_last: bool = True) -> QTableView:
    table = QTableView()
    table.setModel(model)
    table.setSelectionBehavior(QTableView.SelectionBehavior.SelectRows)
    table.setSelectionMode(QTableView.SelectionMode.SingleSelection)
    table.setAlternatingRowColors(True)
    table.setWordWrap(False)
    table.verticalHeader().setVisible(False)
    table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Interactive)
    table.horizontalHeader().setStretchLastSection(stretch_last)
    return table


class LayerFilter(QSortFilterProxyModel):
    """Filters by layer type (the tabs) and by text in any column (the filter box)."""

    def __init__(self, parent: Any = None) -> None:
        super().__init__(parent)
        self.layer_type: LayerType | None = None

    def set_layer_type(self, layer_type: LayerType | None) -> None:
        self.beginFilterChange()
        self.layer_type = layer_type
        self.endFilterChange()

    def filterAcceptsRow(self, source_row: int, source_parent: QModelIndex | QPersistentModelIndex) -> bool:
        if self.layer_type is not None:
            row = self.sourceModel().index(source_row, 0, source_parent).data(ItemRole.RECORD)
            if not isinstance(row, LayerRow) or row.layer.type is not self.layer_type:
                return False
        return super().filterAcceptsRow(source_row, source_parent)


# --- dialogs ------------------------------------------------------------------------------------------


class NewLayerDialog(QDialog):
    """Name, type (only the types the caller may create), OS layer binding, description, comment."""

    def __init__(self, services: Services, os_layers: Sequence[str], parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("New layer")
        self.setObjectName("new_layer")
        self.services = services
        self.created: LayerInfo | None = None
        self.name = QLineEdit()
        self.name.setAccessibleName("Layer name")
        self.type = QComboBox()
        self.type.setAccessibleName("Layer type")
        items = QStandardItemModel(self.type)
        self.type.setModel(items)
        for label, layer_type in (("OS layer", LayerType.OS), ("Platform layer", LayerType.PLATFORM),
                                  ("App layer", LayerType.APP)):
            self.type.addItem(label, layer_type)
            why = refusal(services, LAYER_OPERATION[layer_type])
            item = items.item(self.type.count() - 1)
            item.setEnabled(why is None)
            item.setToolTip(why or "")
        allowed = [i for i in range(self.type.count()) if items.item(i).isEnabled()]
        self.type.setCurrentIndex(allowed[-1] if allowed else 0)
        self.os_layer = QComboBox()
        self.os_layer.setAccessibleName("OS layer")
        self.os_layer.addItems(list(os_layers))
        self.description = QLineEdit()
        self.description.setAccessibleName("Description")
        self.comment = QLineEdit(placeholderText="Why (kept in the audit log)")
        self.comment.setAccessibleName("Comment")
        self.message = QLabel()
        self.message.setObjectName("error")
        self.message.setWordWrap(True)
        self.message.setStyleSheet("color: #b00020")
        self.buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        self.buttons.button(QDialogButtonBox.StandardButton.Ok).setText("Create")
        self.buttons.accepted.connect(lambda: spawn(self._create()))
        self.buttons.rejected.connect(self.reject)
        self.type.currentIndexChanged.connect(lambda _i: self._type_changed())
        form = QFormLayout(self)
        form.addRow("&Name:", self.name)
        form.addRow("&Type:", self.type)
        form.addRow("&OS layer:", self.os_layer)
        form.addRow("&Description:", self.description)
        form.addRow("&Comment:", self.comment)
        form.addRow(self.message)
        form.addRow(self.buttons)
        self.resize(460, self.sizeHint().height())
        self._type_changed()

    def _type_changed(self) -> None:
        is_os = LayerType(self.type.currentData()) is LayerType.OS
        self.os_layer.setEnabled(not is_os)
        self.os_layer.setToolTip("An OS layer is not bound to another OS layer." if is_os
                                 else "App and platform layers belong to one OS layer.")

    async def _create(self) -> None:
        layer_type = LayerType(self.type.currentData())
        os_layer = None if layer_type is LayerType.OS else (self.os_layer.currentText() or None)
        self.buttons.setEnabled(False)
        self.message.setText("Creating…")
        try:
            self.created = await off_ui_thread(lambda: self.services.layers.create_layer(
                self.name.text().strip(), layer_type, os_layer=os_layer, description=self.description.text().strip(),
                comment=self.comment.text().strip()))
        except LayerDeskError as exc:
            if isValid(self):
                self.message.setText(str(exc))
                self.buttons.setEnabled(True)
            return
        if isValid(self):
            self.accept()


#: Source kinds the import dialog offers: label, file dialog name filter (``None``: a folder), needs an image.
SOURCE_KINDS: tuple[tuple[str, str | None, bool], ...] = (
    ("Folder", None, False),
    ("WIM file", "WIM images (*.wim *.esd);;All files (*)", True),
    ("Disk image (VHD, VHDX, VMDK, qcow2, raw)", "Disk images (*.vhd *.vhdx *.vmdk *.qcow2 *.img *.raw);;All files (*)",
     False),
    ("NTFS volume image", "Volume images (*.ntfs *.img *.raw *.bin);;All files (*)", False),
)


class ImportDialog(QDialog):
    """Import a new version of one layer: the source (folder, WIM + image index, disk image, NTFS volume),
    ``.reg`` files, the version name and a comment. Starts the import task and keeps its id."""

    def __init__(self, services: Services, runner: TaskRunner, layer: LayerInfo, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle(f"Import a version of {layer.name}")
        self.setObjectName("import_version")
        self.services = services
        self.runner = runner
        self.layer = layer
        self.task_id: int | None = None
        self.version_ref = ""

        self.kind = QComboBox()
        self.kind.setAccessibleName("Source kind")
        for label, _filter, _image in SOURCE_KINDS:
            self.kind.addItem(label)
        self.source = QLineEdit(placeholderText="A folder, a WIM file, a disk image or an NTFS volume image")
        self.source.setAccessibleName("Source")
        browse = QPushButton("&Browse…")
        browse.clicked.connect(self._browse_source)
        source_row = QHBoxLayout()
        source_row.addWidget(self.source, 1)
        source_row.addWidget(browse)
        self.image = QSpinBox(minimum=1, maximum=999)
        self.image.setAccessibleName("WIM image index")
        self.image.setToolTip("The image of the WIM file to import (wiminfo lists them).")
        self.registry = QListWidget()
        self.registry.setAccessibleName("Registry files")
        self.registry.setMaximumHeight(90)
        self.registry.setToolTip(".reg files with the version's registry changes; later files win.")
        add_reg = QPushButton("&Add .reg…")
        add_reg.clicked.connect(self._browse_registry)
        remove_reg = QPushButton("Re&move")
        remove_reg.clicked.connect(self._remove_registry)
        reg_buttons = QVBoxLayout()
        reg_buttons.addWidget(add_reg)
        reg_buttons.addWidget(remove_reg)
        reg_buttons.addStretch(1)
        reg_row = QHBoxLayout()
        reg_row.addWidget(self.registry, 1)
        reg_row.addLayout(reg_buttons)
        self.version = QLineEdit()
        self.version.setAccessibleName("Version name")
        self.comment = QLineEdit(placeholderText="Why (kept in the audit log)")
        self.comment.setAccessibleName("Comment")
        self.message = QLabel()
        self.message.setObjectName("error")
        self.message.setWordWrap(True)
        self.message.setStyleSheet("color: #b00020")
        self.buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        self.buttons.button(QDialogButtonBox.StandardButton.Ok).setText("Import")
        self.buttons.accepted.connect(lambda: spawn(self._start()))
        self.buttons.rejected.connect(self.reject)
        self.kind.currentIndexChanged.connect(lambda _i: self._kind_changed())

        form = QFormLayout(self)
        form.addRow(QLabel(f"Import a new version of the {layer.type.value} layer <b>{layer.name}</b>. "
                           "The import runs as a task; you can cancel it."))
        form.addRow("Source &kind:", self.kind)
        form.addRow("&Source:", source_row)
        form.addRow("WIM &image:", self.image)
        form.addRow("&Registry files:", reg_row)
        form.addRow("&Version name:", self.version)
        form.addRow("&Comment:", self.comment)
        form.addRow(self.message)
        form.addRow(self.buttons)
        self.resize(620, self.sizeHint().height())
        self._kind_changed()

    def _kind_changed(self) -> None:
        self.image.setEnabled(SOURCE_KINDS[self.kind.currentIndex()][2])

    def _browse_source(self) -> None:
        label, name_filter, _image = SOURCE_KINDS[self.kind.currentIndex()]
        dialog = QFileDialog(self, f"Choose the {label.lower()} to import")
        if name_filter is None:
            dialog.setFileMode(QFileDialog.FileMode.Directory)
            dialog.setOption(QFileDialog.Option.ShowDirsOnly)
        else:
            dialog.setFileMode(QFileDialog.FileMode.ExistingFile)
            dialog.setNameFilters(name_filter.split(";;"))
        dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        dialog.fileSelected.connect(self.source.setText)
        dialog.open()

    def _browse_registry(self) -> None:
        dialog = QFileDialog(self, "Choose .reg files")
        dialog.setFileMode(QFileDialog.FileMode.ExistingFiles)
        dialog.setNameFilters(["Registry files (*.reg)", "All files (*)"])
        dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        dialog.filesSelected.connect(self.registry.addItems)
        dialog.open()

    def _remove_registry(self) -> None:
        for item in self.registry.selectedItems():
            self.registry.takeItem(self.registry.row(item))

    def registry_files(self) -> list[Path]:
        return [Path(self.registry.item(i).text()) for i in range(self.registry.count())]

    async def _start(self) -> None:
        source = self.source.text().strip()
        if not source:
            self.message.setText("Choose what to import: a folder, a WIM file, a disk image or an NTFS volume image.")
            return
        image = self.image.value() if self.image.isEnabled() else None
        version = self.version.text().strip()
        registry = self.registry_files()
        comment = self.comment.text().strip()
        self.buttons.setEnabled(False)
        self.message.setText("Checking the source…")
        try:
            self.task_id = await off_ui_thread(lambda: self.services.imports.start_import(
                self.runner, self.layer.name, version, Path(source), image=image, registry_files=registry,
                comment=comment))
        except LayerDeskError as exc:
            if isValid(self):
                self.message.setText(str(exc))
                self.buttons.setEnabled(True)
            return
        self.version_ref = f"{self.layer.name}:{version}"
        if isValid(self):
            self.accept()


class PackagingDialog(QDialog):
    """Create a packaging disk for a new version of an app or platform layer: version name, previous version,
    prerequisites, where the disk goes (an output folder or a connector), format, layer script and comment.
    Starts the packaging task and keeps its id."""

    def __init__(self, services: Services, runner: TaskRunner, layer: LayerInfo, versions: Sequence[str],
                 prerequisites: Sequence[str], parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle(f"Create a packaging disk for {layer.name}")
        self.setObjectName("create_packaging_disk")
        self.services = services
        self.runner = runner
        self.layer = layer
        self.task_id: int | None = None
        self.version_ref = ""
        self.version = QLineEdit()
        self.version.setAccessibleName("Version name")
        self.previous = QComboBox()
        self.previous.setAccessibleName("Previous version")
        self.previous.addItem("(none: a new layer's first content)", None)
        for name in versions:
            self.previous.addItem(name, name)
        if versions:
            self.previous.setCurrentIndex(len(versions))
        self.prerequisites = QListWidget()
        self.prerequisites.setAccessibleName("Prerequisites")
        self.prerequisites.setMaximumHeight(90)
        for ref in prerequisites:
            item = QListWidgetItem(ref)
            item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
            item.setCheckState(Qt.CheckState.Unchecked)
            self.prerequisites.addItem(item)
        if layer.type is not LayerType.APP:
            self.prerequisites.setEnabled(False)
            self.prerequisites.setToolTip("Only app layers have prerequisites.")
        self.deliver_to = QComboBox()
        self.deliver_to.setAccessibleName("Deliver to")
        self.deliver_to.addItem("An output folder on this computer", None)
        self.deliver_to.setToolTip("A connector delivers the disk where the packaging machine runs (a folder or "
                                   "share, a libvirt or vSphere VM…); Finalize then fetches it back from there.")
        self.deliver_to.currentIndexChanged.connect(self._deliver_to_changed)
        self.output = QLineEdit(str(services.home.root / "packaging"))
        self.output.setAccessibleName("Output folder")
        self.browse_output = QPushButton("&Browse…")
        self.browse_output.clicked.connect(self._browse_output)
        output_row = QHBoxLayout()
        output_row.addWidget(self.output, 1)
        output_row.addWidget(self.browse_output)
        self.format = QComboBox()
        self.format.setAccessibleName("Disk format")
        for disk_format in PACKAGING_FORMATS:
            self.format.addItem(disk_format.value.upper(), disk_format)
        self.script = QLineEdit(placeholderText="Optional: a .ps1 or .cmd script the image runs once")
        self.script.setAccessibleName("Layer script")
        browse_script = QPushButton("Bro&wse…")
        browse_script.clicked.connect(self._browse_script)
        script_row = QHBoxLayout()
        script_row.addWidget(self.script, 1)
        script_row.addWidget(browse_script)
        self.comment = QLineEdit(placeholderText="Why (kept in the audit log)")
        self.comment.setAccessibleName("Comment")
        self.message = QLabel()
        self.message.setObjectName("error")
        self.message.setWordWrap(True)
        self.message.setStyleSheet("color: #b00020")
        self.buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        self.buttons.button(QDialogButtonBox.StandardButton.Ok).setText("Create")
        self.buttons.accepted.connect(lambda: spawn(self._start()))
        self.buttons.rejected.connect(self.reject)
        form = QFormLayout(self)
        intro = QLabel(f"A new version of the {layer.type.value} layer <b>{layer.name}</b> is made on a packaging "
                       f"machine: its disk holds OS layer {layer.os_layer}, the prerequisites and the previous "
                       "version. Boot a machine from it, install, shut it down, then <i>Finalize</i>.")
        intro.setWordWrap(True)
        form.addRow(intro)
        form.addRow("&Version name:", self.version)
        form.addRow("&Previous version:", self.previous)
        form.addRow("P&rerequisites:", self.prerequisites)
        form.addRow("&Deliver to:", self.deliver_to)
        form.addRow("Output folder:", output_row)
        form.addRow("&Format:", self.format)
        form.addRow("Layer script:", script_row)
        form.addRow("&Comment:", self.comment)
        form.addRow(self.message)
        form.addRow(self.buttons)
        self.resize(640, self.sizeHint().height())
        spawn(self._load_connectors())

    async def _load_connectors(self) -> None:
        """Offer the configured connectors (read off the UI thread; a failure leaves the output folder only)."""
        try:
            connectors = await off_ui_thread(self.services.connectors.list_connectors)
        except LayerDeskError:
            return
        if not isValid(self):
            return
        for connector in connectors:
            self.deliver_to.addItem(f"Connector {connector.name} ({connector.type})", connector.name)

    def _deliver_to_changed(self) -> None:
        to_folder = self.deliver_to.currentData() is None
        self.output.setEnabled(to_folder)
        self.browse_output.setEnabled(to_folder)

    def _browse_output(self) -> None:
        dialog = QFileDialog(self, "Choose the folder the packaging disk goes to")
        dialog.setFileMode(QFileDialog.FileMode.Directory)
        dialog.setOption(QFileDialog.Option.ShowDirsOnly)
        dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        dialog.fileSelected.connect(self.output.setText)
        dialog.open()

    def _browse_script(self) -> None:
        dialog = QFileDialog(self, "Choose the layer script")
        dialog.setFileMode(QFileDialog.FileMode.ExistingFile)
        dialog.setNameFilters(["Scripts (*.ps1 *.cmd *.bat)", "All files (*)"])
        dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        dialog.fileSelected.connect(self.script.setText)
        dialog.open()

    def chosen_prerequisites(self) -> list[str]:
        return [self.prerequisites.item(i).text() for i in range(self.prerequisites.count())
                if self.prerequisites.item(i).checkState() == Qt.CheckState.Checked]

    async def _start(self) -> None:
        version = self.version.text().strip()
        connector = self.deliver_to.currentData()
        output = None if connector else Path(self.output.text().strip() or ".")
        script = self.script.text().strip()
        previous = self.previous.currentData()
        prerequisites = self.chosen_prerequisites()
        disk_format = self.format.currentData()
        comment = self.comment.text().strip()
        self.buttons.setEnabled(False)
        self.message.setText("Checking…")

        def start() -> int:
            if output is not None:
                output.mkdir(parents=True, exist_ok=True)
            return packaging_service(self.services).start_packaging(
                self.runner, self.layer.name, version, output, connector=connector, fmt=disk_format,
                previous=previous, prerequisites=prerequisites, script=Path(script) if script else None,
                comment=comment)

        try:
            self.task_id = await off_ui_thread(start)
        except (LayerDeskError, OSError) as exc:
            if isValid(self):
                self.message.setText(str(exc))
                self.buttons.setEnabled(True)
            return
        self.version_ref = f"{self.layer.name}:{version}"
        if isValid(self):
            self.accept()


class FinalizeDialog(QDialog):
    """Finalize a version being edited: from the connector its packaging disk went through, or from a disk file
    picked here. Starts the finalize task."""

    def __init__(self, services: Services, runner: TaskRunner, ref: str, disk: str,
                 parent: QWidget | None = None, *, connector: str | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle(f"Finalize {ref}")
        self.setObjectName("finalize_version")
        self.services = services
        self.runner = runner
        self.ref = ref
        self.task_id: int | None = None
        self.disk = QLineEdit(disk)
        self.disk.setAccessibleName("Packaging disk")
        browse = QPushButton("&Browse…")
        browse.clicked.connect(self._browse)
        disk_row = QHBoxLayout()
        disk_row.addWidget(self.disk, 1)
        disk_row.addWidget(browse)
        #: With a connector: fetch the disk from it (the default) or read a file named here.
        self.from_connector = QRadioButton(f"&Fetch it from connector {connector}")
        self.delivered_to = QLabel(disk)
        self.delivered_to.setWordWrap(True)
        self.delivered_to.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.delivered_to.setStyleSheet("color: palette(placeholder-text); margin-left: 22px")
        self.from_file = QRadioButton("From a disk &file:")
        self.from_file.toggled.connect(self.disk.setEnabled)
        self.from_file.toggled.connect(browse.setEnabled)
        self.comment = QLineEdit(placeholderText="Why (kept in the audit log)")
        self.comment.setAccessibleName("Comment")
        self.message = QLabel()
        self.message.setObjectName("error")
        self.message.setWordWrap(True)
        self.message.setStyleSheet("color: #b00020")
        self.buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        self.buttons.button(QDialogButtonBox.StandardButton.Ok).setText("Finalize")
        self.buttons.accepted.connect(lambda: spawn(self._start()))
        self.buttons.rejected.connect(self.reject)
        form = QFormLayout(self)
        intro = QLabel(f"<b>{ref}</b> becomes what changed on its packaging machine's disk. Shut the machine down "
                       "first; a pending reboot or pending file operations are refused.")
        intro.setWordWrap(True)
        form.addRow(intro)
        if connector:
            self.disk.setText("")
            form.addRow(self.from_connector)
            form.addRow(self.delivered_to)
            form.addRow(self.from_file, disk_row)
            self.from_connector.setChecked(True)
            self.disk.setEnabled(False)
            browse.setEnabled(False)
        else:
            self.from_connector.hide()
            self.delivered_to.hide()
            self.from_file.hide()
            self.from_file.setChecked(True)
            form.addRow("Disk:", disk_row)
        form.addRow("&Comment:", self.comment)
        form.addRow(self.message)
        form.addRow(self.buttons)
        self.resize(640, self.sizeHint().height())

    def _browse(self) -> None:
        dialog = QFileDialog(self, "Choose the packaging machine's disk")
        dialog.setFileMode(QFileDialog.FileMode.ExistingFile)
        dialog.setNameFilters(["Disk images (*.vhdx *.vhd *.vmdk *.qcow2 *.raw)", "All files (*)"])
        dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        dialog.fileSelected.connect(self.disk.setText)
        dialog.open()

    async def _start(self) -> None:
        disk = Path(self.disk.text().strip()) if self.from_file.isChecked() else None
        comment = self.comment.text().strip()
        self.buttons.setEnabled(False)
        self.message.setText("Checking…")
        try:
            self.task_id = await off_ui_thread(lambda: packaging_service(self.services).start_finalize(
                self.runner, self.ref, disk, comment=comment))
        except LayerDeskError as exc:
            if isValid(self):
                self.message.setText(str(exc))
                self.buttons.setEnabled(True)
            return
        if isValid(self):
            self.accept()


# --- a running task's progress strip ---------------------------------------------------------------------


class TaskProgress(QFrame):
    """One running task's progress, with Cancel; it reports the outcome when the task ends."""

    finished = Signal(object)  # the TaskInfo it ended with

    def __init__(self, services: Services, task_id: int, what: str, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName(f"task_{task_id}")
        self.setFrameShape(QFrame.Shape.StyledPanel)
        self.services = services
        self.task_id = task_id
        self.what = what
        self.task: TaskInfo | None = None
        self._reading: asyncio.Future[None] | None = None
        self.label = QLabel(f"{what}: starting…")
        self.bar = QProgressBar(minimum=0, maximum=100)
        self.bar.setAccessibleName(f"Progress of task {task_id}")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setToolTip(f"Cancel task {task_id}; nothing it did is kept.")
        self.cancel_button.clicked.connect(lambda: spawn(self._cancel()))
        guard(self.cancel_button, services, Operation.RUN_TASKS)
        self.close_button = QPushButton("Dismiss")
        self.close_button.hide()
        self.close_button.clicked.connect(self.deleteLater)
        layout = QHBoxLayout(self)
        layout.addWidget(self.label, 2)
        layout.addWidget(self.bar, 1)
        layout.addWidget(self.cancel_button)
        layout.addWidget(self.close_button)
        self._timer = QTimer(self, interval=IMPORT_POLL_MS)
        self._timer.timeout.connect(self._tick)

    # Polled only while shown (its page is the current one); it catches up when shown again.
    def showEvent(self, event: QShowEvent) -> None:
        super().showEvent(event)
        if self.task is None or not self.task.state.is_final:
            self._timer.start()
            self._tick()

    def hideEvent(self, event: QHideEvent) -> None:
        self._timer.stop()
        super().hideEvent(event)

    def _tick(self) -> None:
        if self._reading is None or self._reading.done():
            self._reading = spawn(self._read())

    async def _read(self) -> None:
        try:
            task = await off_ui_thread(self.services.tasks.get_task, self.task_id)
        except LayerDeskError as exc:
            if isValid(self):
                self.label.setText(f"{self.what}: {exc}")
            return
        if not isValid(self) or (self.task is not None and self.task.state.is_final):
            return
        self.task = task
        self.bar.setValue(task.progress)
        if not task.state.is_final:
            state = "canceling" if task.cancel_requested else (task.message or task.state.value)
            self.label.setText(f"{self.what}: {state}")
            return
        self._timer.stop()
        self.cancel_button.hide()
        self.close_button.show()
        if task.state is TaskState.COMPLETE:
            self.label.setText(f"{self.what}: done. {task.message}")
        elif task.state is TaskState.CANCELED:
            self.label.setText(f"{self.what}: canceled; nothing was kept.")
        else:
            self.label.setText(f"{self.what}: {task.state.value.replace('_', ' ')}. {task.error or task.message}")
            self.label.setStyleSheet("color: #b00020")
        self.label.setWordWrap(True)
        self.finished.emit(task)

    async def _cancel(self) -> None:
        self.cancel_button.setEnabled(False)
        try:
            await off_ui_thread(lambda: self.services.tasks.cancel(self.task_id, comment="Canceled in the console"))
        except LayerDeskError as exc:
            if isValid(self):
                show_message(self, "Task not canceled", str(exc))
                self.cancel_button.setEnabled(True)
            return
        if isValid(self):
            self._tick()


# --- the page -------------------------------------------------------------------------------------------


class LayersPage(QWidget):
    """The Layers page (see the module docstring). ``runner`` runs the imports (and the demo lab's)."""

    loaded = Signal(int)  # number of layers after a load
    failed = Signal(str)  # a message a user can act on
    details_loaded = Signal(str)  # the layer whose details are shown
    contents_loaded = Signal(str)  # LAYER:VERSION whose contents are shown
    demo_finished = Signal(object)  # the DemoLab, or None when it failed

    def __init__(self, services: Services, runner: TaskRunner, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("layers")
        self.services = services
        self.runner = runner
        self._loading: asyncio.Future[None] | None = None
        self._again = False
        self._details: asyncio.Future[None] | None = None
        self._detail_layer: str | None = None
        self._demo: asyncio.Future[None] | None = None
        #: The outcome of the last action, shown after the layer count.
        self._notice = ""
        self._count = ""

        columns: list[Column[LayerRow]] = [
            Column("Name", lambda r: r.layer.name),
            Column("Type", lambda r: r.layer.type.value),
            Column("OS layer", lambda r: r.layer.os_layer or ""),
            Column("Versions", lambda r: str(r.layer.version_count), sort=lambda r: r.layer.version_count),
            Column("Latest", lambda r: r.layer.latest_version or ""),
            Column("State", lambda r: r.layer.latest_state.value if r.layer.latest_state else ""),
            Column("Size", lambda r: format_size(r.layer.size_bytes), sort=lambda r: r.layer.size_bytes),
            Column("Used by templates", lambda r: ", ".join(r.templates), sort=lambda r: len(r.templates),
                   tooltip=lambda r: "\n".join(r.templates) or "no image template uses this layer"),
            Column("Description", lambda r: r.layer.description, tooltip=lambda r: r.layer.description),
        ]
        self.model: RecordTableModel[LayerRow] = RecordTableModel(columns, lambda r: r.layer.id, self)
        self.proxy = LayerFilter(self)
        self.proxy.setSourceModel(self.model)
        self.proxy.setSortRole(ItemRole.SORT)
        self.proxy.setFilterCaseSensitivity(Qt.CaseSensitivity.CaseInsensitive)
        self.proxy.setFilterKeyColumn(-1)

        self.type_tabs = QTabBar()
        self.type_tabs.setAccessibleName("Layer type")
        self.type_tabs.setExpanding(False)
        for label, _type in TYPE_TABS:
            self.type_tabs.addTab(label)
        self.type_tabs.currentChanged.connect(lambda i: self.proxy.set_layer_type(TYPE_TABS[i][1]))
        self.filter = QLineEdit(placeholderText="Filter…", clearButtonEnabled=True)
        self.filter.setAccessibleName("Filter layers")
        self.filter.textChanged.connect(self.proxy.setFilterFixedString)
        self.refresh_button = QPushButton("&Refresh")
        self.refresh_button.clicked.connect(self.refresh)

        self.new_button = QPushButton("&New layer…")
        self.new_button.setToolTip("Create an OS, platform or app layer.")
        self.new_button.clicked.connect(self._new_layer)
        self.import_button = QPushButton("&Import version…")
        self.import_button.setToolTip("Import a new version of the selected layer from a folder, WIM or disk image.")
        self.import_button.clicked.connect(self._import_version)
        self.delete_button = QPushButton("&Delete layer…")
        self.delete_button.setToolTip("Delete the selected layer with all its versions.")
        self.delete_button.clicked.connect(lambda: spawn(self._delete_layer()))

        self.table = _table(self.proxy)
        self.table.setSortingEnabled(True)
        self.table.sortByColumn(0, Qt.SortOrder.AscendingOrder)
        self.table.selectionModel().selectionChanged.connect(lambda *_: self._layer_selected())

        # Shown when the catalog holds no layer at all.
        self.demo_button = QPushButton("Create a &demo lab")
        self.demo_button.setToolTip(f"Synthetic layers and a template to try LayerDesk with ({DEMO_LABEL}).")
        self.demo_button.clicked.connect(self._create_demo)
        self.demo_progress = QProgressBar(minimum=0, maximum=100)
        self.demo_progress.setAccessibleName("Demo lab progress")
        self.demo_progress.setMinimumWidth(160)
        self.demo_progress.hide()
        self.first_os_button = QPushButton("Import an &OS layer…")
        self.first_os_button.setToolTip("Create your OS layer, then import its first version from a gold image.")
        self.first_os_button.clicked.connect(self._first_os_layer)
        self.demo_label = QLabel(EMPTY_CATALOG)
        self.demo_label.setWordWrap(True)
        self.empty_banner = QFrame()
        self.empty_banner.setObjectName("empty_catalog")
        self.empty_banner.setFrameShape(QFrame.Shape.StyledPanel)
        banner = QHBoxLayout(self.empty_banner)
        banner.addWidget(self.demo_label, 1)
        choices = QVBoxLayout()
        choices.addStretch(1)
        choices.addWidget(self.first_os_button)
        choices.addWidget(self.demo_button)
        choices.addWidget(self.demo_progress)
        choices.addStretch(1)
        banner.addLayout(choices)
        self.empty_banner.hide()

        self._build_details()
        self.imports_area = QVBoxLayout()
        self.imports_area.setContentsMargins(0, 0, 0, 0)
        self.status = QLabel()

        bar = QHBoxLayout()
        bar.addWidget(QLabel("<h2>Layers</h2>"))
        bar.addSpacing(12)
        bar.addWidget(self.type_tabs)
        bar.addStretch(1)
        bar.addWidget(self.filter)
        bar.addWidget(self.refresh_button)
        actions = QHBoxLayout()
        for button in (self.new_button, self.import_button, self.delete_button):
            actions.addWidget(button)
        actions.addStretch(1)
        splitter = QSplitter(Qt.Orientation.Vertical)
        splitter.addWidget(self.table)
        splitter.addWidget(self.details)
        splitter.setStretchFactor(0, 3)
        splitter.setStretchFactor(1, 2)
        layout = QVBoxLayout(self)
        layout.addLayout(bar)
        layout.addLayout(actions)
        layout.addWidget(self.empty_banner)
        layout.addWidget(splitter, 1)
        layout.addLayout(self.imports_area)
        layout.addWidget(self.status)
        self._update_actions()

    def _build_details(self) -> None:
        self.details = QGroupBox()
        self.details.hide()  # shown while a layer is selected
        self.detail_summary = QLabel()
        self.detail_summary.setWordWrap(True)
        self.detail_summary.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        version_columns: list[Column[LayerVersionInfo]] = [
            Column("Version", lambda v: v.name),
            Column("State", lambda v: v.state.value, tooltip=lambda v: v.state_reason or v.state.value),
            Column("Size", lambda v: format_size(v.size_bytes), sort=lambda v: v.size_bytes),
            Column("Created", lambda v: format_when(v.created_at), sort=lambda v: v.created_at),
            Column("By", lambda v: v.created_by),
            Column("Used by", lambda v: "; ".join(v.used_by), tooltip=lambda v: "\n".join(v.used_by) or "not in use"),
            Column("Comment", lambda v: v.comment),
        ]
        self.versions: RecordTableModel[LayerVersionInfo] = RecordTableModel(version_columns, lambda v: v.id, self)
        self.versions_table = _table(self.versions)
        self.versions_table.selectionModel().selectionChanged.connect(lambda *_: self._version_selected())
        self.delete_version_button = QPushButton("Delete &version…")
        self.delete_version_button.setToolTip("Delete the selected version (refused while something uses it).")
        self.delete_version_button.clicked.connect(lambda: spawn(self._delete_version()))
        self.package_button = QPushButton("Create &packaging disk…")
        self.package_button.setToolTip("Make a new version of this layer on a packaging machine.")
        self.package_button.clicked.connect(lambda: self._create_packaging_disk())
        self.finalize_button = QPushButton("&Finalize…")
        self.finalize_button.setToolTip("Capture the selected version from its packaging machine's disk.")
        self.finalize_button.clicked.connect(lambda: self._finalize())
        self.abandon_button = QPushButton("&Abandon…")
        self.abandon_button.setToolTip("Delete the selected version being edited.")
        self.abandon_button.clicked.connect(lambda: spawn(self._abandon()))

        self.contents = QPlainTextEdit(readOnly=True)
        self.contents.setAccessibleName("Version contents")
        self.contents.setFont(QFontDatabase.systemFont(QFontDatabase.SystemFont.FixedFont))
        self.contents.setPlaceholderText("Select a version to see its files and registry changes.")
        audit_columns = AUDIT_COLUMNS
        self.audit: RecordTableModel[AuditEntryInfo] = RecordTableModel(audit_columns, lambda e: e.id, self)
        self.audit_table = _table(self.audit)
        self.detail_tabs = QTabWidget()
        self.detail_tabs.addTab(self.contents, "Version contents")
        self.detail_tabs.addTab(self.audit_table, "Audit log")

        versions_box = QWidget()
        versions_layout = QVBoxLayout(versions_box)
        versions_layout.setContentsMargins(0, 0, 0, 0)
        versions_layout.addWidget(self.versions_table, 1)
        row = QHBoxLayout()
        row.addWidget(self.package_button)
        row.addWidget(self.finalize_button)
        row.addWidget(self.abandon_button)
        row.addWidget(self.delete_version_button)
        row.addStretch(1)
        versions_layout.addLayout(row)
        inner = QSplitter(Qt.Orientation.Horizontal)
        inner.addWidget(versions_box)
        inner.addWidget(self.detail_tabs)
        inner.setStretchFactor(0, 1)
        inner.setStretchFactor(1, 1)
        layout = QVBoxLayout(self.details)
        layout.addWidget(self.detail_summary)
        layout.addWidget(inner, 1)

    # --- loading -------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Reload the layers (and the selected layer's details) in a worker thread."""
        if self._loading is not None and not self._loading.done():
            self._again = True
            return
        self._loading = spawn(self._load())

    def _fetch(self) -> list[LayerRow]:
        layers = self.services.layers.list_layers()
        usage = self.services.layers.template_usage()
        return [LayerRow(layer, usage.get(layer.id, ())) for layer in layers]

    async def _load(self) -> None:
        while True:
            self._again = False
            if not self._count:  # later loads keep the count and the last action's outcome in view
                self.status.setText("Loading…")
            try:
                rows = await off_ui_thread(self._fetch)
            except LayerDeskError as exc:
                if isValid(self):
                    self.status.setText(str(exc))
                    self.failed.emit(str(exc))
                return
            if not isValid(self):
                return
            self.model.replace(rows)
            fit_columns(self.table)
            self._count = f"{len(rows)} layer{'s' if len(rows) != 1 else ''}"
            self._show_status()
            demo_running = self._demo is not None and not self._demo.done()
            self.empty_banner.setVisible(not rows or demo_running)
            self._update_actions()
            self.loaded.emit(len(rows))
            if self._detail_layer is not None:
                self._load_details(self._detail_layer)
            if not self._again:
                return

    def note(self, text: str) -> None:
        """Say how the last action went (kept beside the layer count until the next action)."""
        self._notice = text
        self._show_status()

    def _show_status(self) -> None:
        self.status.setText(" – ".join(part for part in (self._count, self._notice) if part))

    def selected_layer(self) -> LayerInfo | None:
        rows = self.table.selectionModel().selectedRows()
        if not rows:
            return None
        row = rows[0].data(ItemRole.RECORD)
        return row.layer if isinstance(row, LayerRow) else None

    def select_layer(self, name: str) -> bool:
        """Select the layer ``name`` (shown under the current filter); returns whether it is shown."""
        for r in range(self.proxy.rowCount()):
            row = self.proxy.index(r, 0).data(ItemRole.RECORD)
            if isinstance(row, LayerRow) and row.layer.name.casefold() == name.casefold():
                self.table.selectRow(r)
                return True
        return False

    def selected_version(self) -> LayerVersionInfo | None:
        rows = self.versions_table.selectionModel().selectedRows()
        if not rows:
            return None
        version = rows[0].data(ItemRole.RECORD)
        return version if isinstance(version, LayerVersionInfo) else None

    def _update_actions(self) -> None:
        layer = self.selected_layer()
        version = self.selected_version()
        guard(self.new_button, self.services, Operation.EDIT_ANY_LAYERS)
        layer_op = LAYER_OPERATION[layer.type] if layer is not None else Operation.EDIT_ANY_LAYERS
        guard(self.import_button, self.services, layer_op, Operation.RUN_TASKS, enabled=layer is not None)
        guard(self.delete_button, self.services, layer_op, enabled=layer is not None)
        guard(self.delete_version_button, self.services, layer_op, enabled=version is not None)
        packable = layer is not None and layer.type is not LayerType.OS
        editing = version is not None and version.state is VersionState.EDITING
        if guard(self.package_button, self.services, layer_op, Operation.RUN_TASKS, enabled=packable):
            self.package_button.setToolTip("Make a new version of this layer on a packaging machine." if packable
                                           else "OS layer versions are imported from a gold disk, not packaged.")
        if guard(self.finalize_button, self.services, layer_op, Operation.RUN_TASKS, enabled=packable and editing):
            self.finalize_button.setToolTip("Capture the selected version from its packaging machine's disk."
                                            if packable and editing else "Select a version being edited.")
        if guard(self.abandon_button, self.services, layer_op, enabled=packable and version is not None
                 and version.state in (VersionState.EDITING, VersionState.BROKEN)):
            self.abandon_button.setToolTip("Delete the selected version being edited.")
        guard(self.first_os_button, self.services, Operation.EDIT_OS_LAYERS, Operation.RUN_TASKS)
        guard(self.demo_button, self.services, Operation.EDIT_OS_LAYERS, Operation.EDIT_PLATFORM_LAYERS,
              Operation.EDIT_APP_LAYERS, Operation.EDIT_TEMPLATES, Operation.RUN_TASKS,
              enabled=self._demo is None or self._demo.done())

    def _layer_selected(self) -> None:
        layer = self.selected_layer()
        self._update_actions()
        if layer is None:
            self._detail_layer = None
            self.details.hide()
            return
        self.details.show()
        if layer.name != self._detail_layer:
            self._detail_layer = layer.name
            self.versions.replace([])
            self.audit.replace([])
            self.contents.clear()
            self.details.setTitle(f"{layer.type.value.capitalize()} layer {layer.name}")
            self.detail_summary.setText("Loading…")
        self._load_details(layer.name)

    def _load_details(self, name: str) -> None:
        self._details = spawn(self._read_details(name))

    async def _read_details(self, name: str) -> None:
        def read() -> tuple[LayerDetail, list[AuditEntryInfo]]:
            return (self.services.layers.get_layer(name),
                    self.services.audit.list_entries(object_name=name, limit=500))

        try:
            detail, entries = await off_ui_thread(read)
        except LayerDeskError as exc:
            if isValid(self) and self._detail_layer == name:
                self.detail_summary.setText(str(exc))
            return
        if not isValid(self) or self._detail_layer != name:
            return
        layer = detail.layer
        facts = [f"<b>{layer.name}</b> – {layer.type.value} layer"]
        if layer.os_layer:
            facts.append(f"on OS layer {layer.os_layer}")
        facts.append(f"created {format_when(layer.created_at)} by {layer.created_by}")
        text = ", ".join(facts) + "."
        if layer.description:
            text += f"<br>{layer.description}"
        if detail.bound_layers:
            text += f"<br>Layers bound to it: {', '.join(detail.bound_layers)}"
        self.detail_summary.setText(text)
        self.versions.replace(list(detail.versions))
        fit_columns(self.versions_table, widest=240)
        self.audit.replace(entries)
        fit_columns(self.audit_table, widest=240)
        self.audit_table.sortByColumn(0, Qt.SortOrder.DescendingOrder)
        if self.selected_version() is None and detail.versions:
            self.versions_table.selectRow(len(detail.versions) - 1)
        self._update_actions()
        self.details_loaded.emit(name)

    def _version_selected(self) -> None:
        self._update_actions()
        version = self.selected_version()
        if version is None:
            self.contents.clear()
            return
        spawn(self._read_contents(f"{version.layer}:{version.name}"))

    async def _read_contents(self, ref: str) -> None:
        try:
            contents = await off_ui_thread(self.services.layers.version_contents, ref, self.services.home.repository)
        except LayerDeskError as exc:
            text = f"{ref}\n\nContents unavailable: {exc}"
        else:
            text = describe_contents(ref, contents)
        version = self.selected_version() if isValid(self) else None
        if version is None or f"{version.layer}:{version.name}" != ref:
            return
        self.contents.setPlainText(text)
        self.contents_loaded.emit(ref)

    # --- actions -------------------------------------------------------------------------------

    def _os_layers(self) -> list[str]:
        return sorted((r.layer.name for r in self.model.records() if r.layer.type is LayerType.OS), key=str.casefold)

    def _new_layer(self) -> NewLayerDialog:
        dialog = NewLayerDialog(self.services, self._os_layers(), self)
        selected = self.selected_layer()
        if selected is not None:
            os_name = selected.name if selected.type is LayerType.OS else selected.os_layer
            if os_name:
                dialog.os_layer.setCurrentText(os_name)
        dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        dialog.accepted.connect(lambda: self._created(dialog.created))
        dialog.open()
        return dialog

    def _first_os_layer(self) -> NewLayerDialog:
        """The first-run path: a new OS layer, then at once the import of its first version."""
        dialog = NewLayerDialog(self.services, self._os_layers(), self)
        dialog.type.setCurrentIndex(dialog.type.findData(LayerType.OS))
        dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        dialog.accepted.connect(lambda: self._first_os_created(dialog.created))
        dialog.open()
        return dialog

    def _first_os_created(self, layer: LayerInfo | None) -> None:
        if layer is None:
            return

        def import_first(_rows: int) -> None:
            self.loaded.disconnect(import_first)
            self.select_layer(layer.name)
            self._import_version()

        self.note(f"Created OS layer {layer.name}: import its first version from your gold image.")
        self.loaded.connect(import_first)
        self.refresh()

    def _created(self, layer: LayerInfo | None) -> None:
        if layer is not None:
            self.note(f"Created {layer.type.value} layer {layer.name}.")
            self._select_after_load(layer.name)
        self.refresh()

    def _select_after_load(self, name: str) -> None:
        def select(_rows: int) -> None:
            self.loaded.disconnect(select)
            self.select_layer(name)

        self.loaded.connect(select)

    def _import_version(self) -> ImportDialog | None:
        layer = self.selected_layer()
        if layer is None:
            return None
        dialog = ImportDialog(self.services, self.runner, layer, self)
        dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        dialog.accepted.connect(lambda: self._import_started(dialog.task_id, dialog.version_ref))
        dialog.open()
        return dialog

    def _import_started(self, task_id: int | None, ref: str) -> None:
        if task_id is None:
            return
        self.watch_task(task_id, f"Import of {ref} (task {task_id})")
        self.refresh()

    def _create_packaging_disk(self) -> PackagingDialog | None:
        layer = self.selected_layer()
        if layer is None or layer.type is LayerType.OS:
            return None
        versions = [v.name for v in self.versions.records() if v.state is VersionState.DEPLOYABLE]
        prerequisites = sorted((r.layer.name for r in self.model.records() if r.layer.type is LayerType.APP
                                and r.layer.os_layer == layer.os_layer and r.layer.name != layer.name
                                and r.layer.latest_state is VersionState.DEPLOYABLE), key=str.casefold)
        dialog = PackagingDialog(self.services, self.runner, layer, versions, prerequisites, self)
        dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        dialog.accepted.connect(lambda: self._task_started(dialog.task_id, f"Packaging disk of {dialog.version_ref}"))
        dialog.open()
        return dialog

    def _finalize(self) -> FinalizeDialog | None:
        version = self.selected_version()
        if version is None:
            return None
        ref = f"{version.layer}:{version.name}"
        try:
            record = packaging_service(self.services).get_packaging(ref)
        except LayerDeskError as exc:
            show_message(self, "Cannot finalize", str(exc))
            return None
        delivery = record.disk.delivery if record.disk else None
        dialog = FinalizeDialog(self.services, self.runner, ref, record.disk.path if record.disk else "", self,
                                connector=str(delivery["connector"]) if delivery else None)
        dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        dialog.accepted.connect(lambda: self._task_started(dialog.task_id, f"Finalize of {ref}"))
        dialog.open()
        return dialog

    async def _abandon(self) -> None:
        version = self.selected_version()
        if version is None:
            return
        ref = f"{version.layer}:{version.name}"
        if not await confirm(self, "Abandon version", f"Abandon {ref} ({version.state.value})?\n\nThe version is "
                             "deleted; its packaging disk file is left where it was delivered.", action="Abandon"):
            return
        await self._delete(lambda: packaging_service(self.services).abandon(ref, comment="Abandoned in the console"),
                           f"Abandoned {ref}.", "Version not abandoned")

    def _task_started(self, task_id: int | None, what: str) -> None:
        if task_id is None:
            return
        self.watch_task(task_id, f"{what} (task {task_id})")
        self.refresh()

    def watch_task(self, task_id: int, what: str) -> TaskProgress:
        """Show a task's progress under the table, with Cancel; reload the layers when it ends."""
        strip = TaskProgress(self.services, task_id, what, self)
        strip.finished.connect(lambda _task: self.refresh())
        self.imports_area.addWidget(strip)
        return strip

    def task_strips(self) -> list[TaskProgress]:
        return self.findChildren(TaskProgress)

    async def _delete_layer(self) -> None:
        layer = self.selected_layer()
        if layer is None:
            return
        versions = f" and its {layer.version_count} version{'s' if layer.version_count != 1 else ''}" \
            if layer.version_count else ""
        if not await confirm(self, "Delete layer", f"Delete the {layer.type.value} layer {layer.name}{versions}?\n\n"
                             "This cannot be undone.", action="Delete"):
            return
        await self._delete(lambda: self.services.layers.delete_layer(layer.name, comment="Deleted in the console"),
                           f"Deleted layer {layer.name}.", "Layer not deleted")

    async def _delete_version(self) -> None:
        version = self.selected_version()
        if version is None:
            return
        ref = f"{version.layer}:{version.name}"
        if not await confirm(self, "Delete version", f"Delete version {ref} ({version.state.value})?\n\n"
                             "Its stored files are removed; this cannot be undone.", action="Delete"):
            return
        await self._delete(lambda: self.services.layers.delete_version(ref, comment="Deleted in the console"),
                           f"Deleted version {ref}.", "Version not deleted")

    async def _delete(self, action: Any, done: str, refused_title: str) -> None:
        try:
            await off_ui_thread(action)
        except LayerDeskError as exc:
            if isValid(self):
                show_message(self, refused_title, str(exc))
            return
        if isValid(self):
            self.note(done)
            self.refresh()

    def _create_demo(self) -> None:
        if self._demo is not None and not self._demo.done():
            return
        self._demo = spawn(self._run_demo())
        self._update_actions()

    async def _run_demo(self) -> None:
        loop = asyncio.get_running_loop()
        self.demo_progress.setValue(0)
        self.demo_progress.show()

        def progress(percent: int, message: str) -> None:  # called in the worker thread
            loop.call_soon_threadsafe(self._demo_step, percent, message)

        lab: DemoLab | None = None
        try:
            lab = await off_ui_thread(lambda: create_demo_lab(self.services, self.runner, progress=progress))
        except LayerDeskError as exc:
            if isValid(self):
                show_message(self, "Demo lab not created", str(exc))
        if not isValid(self):
            return
        self.demo_progress.hide()
        self.demo_label.setText(EMPTY_CATALOG)
        if lab is not None:
            self.note(f"Created the demo lab: template {lab.template} and {len(lab.versions)} layers "
                      f"({DEMO_LABEL}).")
        self._update_actions()
        self.refresh()
        self.demo_finished.emit(lab)

    def _demo_step(self, percent: int, message: str) -> None:
        if isValid(self):
            self.demo_progress.setValue(percent)
            self.demo_progress.setToolTip(message)
            self.demo_label.setText(f"<b>Creating the demo lab…</b> {message}")
            self.refresh()  # its layers appear as they are created


def describe_contents(ref: str, contents: VersionContents) -> str:
    """The version contents panel's text."""
    lines = [
        ref,
        "",
        f"Files:     {contents.files} ({format_size(contents.data_bytes)})",
        f"Source:    {contents.source_kind.replace('_', ' ')} {contents.source_path}",
        f"Deletions: {len(contents.deletions)}",
    ]
    lines.extend(f"  - {path}" for path in contents.deletions[:50])
    roots = ", ".join(f"{root} {count}" for root, count in contents.registry_roots)
    lines.append(f"Registry:  {contents.registry_operations} change{'s' if contents.registry_operations != 1 else ''}"
                 + (f" ({roots})" if roots else ""))
    lines.extend(f"  {line}" for line in contents.registry)
    touched = sum(count for _root, count in contents.registry_roots)
    if touched > len(contents.registry):
        lines.append(f"  … and {touched - len(contents.registry)} more")
    return "\n".join(lines)
