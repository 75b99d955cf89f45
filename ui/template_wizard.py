"""The image template wizard (create and edit). Its flow, checks and save live in
:mod:`app.console.template_wizard`; these pages only render the flow and hand it what the user enters.
A failed save shows why and stays on the summary, with everything entered kept."""

from __future__ import annotations

import asyncio
import html
import logging
from typing import Any

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QFormLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QPlainTextEdit,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
    QWizard,
    QWizardPage,
)
from shiboken6 import isValid

from app.catalog.models import DiskFormat, ElasticMode, SysprepMode
from app.console.template_wizard import (
    ELASTIC_LABELS,
    STEPS,
    SYSPREP_LABELS,
    Step,
    TemplateWizardFlow,
    WizardCatalog,
)
from app.errors import LayerDeskError, ValidationError
from app.services import Services
from app.services.templates import MAX_SIZE_GB
from app.services.views import TemplateInfo
from ui.background import off_ui_thread
from ui.pages import spawn
from ui.priority_editor import ConflictPanel, PriorityEditor

log = logging.getLogger(__name__)

NO_CHOICE = "__none__"


class FlowPage(QWizardPage):
    """One step: the flow's check decides whether Next is enabled; its error and warning are shown."""

    def __init__(self, wizard: TemplateWizard, step: Step) -> None:
        super().__init__()
        self.flow = wizard.flow
        self.services = wizard.services
        self.step = step
        self.busy = False
        self.setObjectName(f"step_{step.name.lower()}")
        self.setTitle(step.value)
        self.body = QVBoxLayout()
        self.warning = QLabel()
        self.warning.setObjectName("warning")
        self.warning.setWordWrap(True)
        self.warning.setStyleSheet("color: #8a5a00")
        self.error = QLabel()
        self.error.setObjectName("error")
        self.error.setWordWrap(True)
        self.error.setStyleSheet("color: #b00020")
        layout = QVBoxLayout(self)
        layout.addLayout(self.body, 1)
        layout.addWidget(self.warning)
        layout.addWidget(self.error)

    # --- rendering -----------------------------------------------------------------------------------

    def fill(self) -> None:
        """Fill the page's widgets from the flow."""

    def changed(self) -> None:
        verdict = self.flow.check(self.step)
        notice = self.flow.notice if self.step is Step.OS else ""
        self.warning.setText("\n".join(t for t in (verdict.warning, notice) if t))
        self.warning.setVisible(bool(self.warning.text()))
        self.error.setText(verdict.error)
        self.error.setVisible(bool(verdict.error))
        self.completeChanged.emit()

    def show_error(self, text: str) -> None:
        self.error.setText(text)
        self.error.setVisible(bool(text))

    # --- QWizardPage ---------------------------------------------------------------------------------

    def initializePage(self) -> None:
        self.flow.current = self.step
        self.fill()
        self.changed()

    def cleanupPage(self) -> None:
        # Back: the flow keeps what was entered (no registered fields are reset).
        self.flow.back()

    def isComplete(self) -> bool:
        return not self.busy and self.flow.check(self.step).valid

    def validatePage(self) -> bool:
        try:
            self.flow.next()
        except ValidationError as exc:
            self.show_error(exc.message)
            return False
        return True

    def nextId(self) -> int:
        following = self.flow.next_step(self.step)
        return STEPS.index(following) if following is not None else -1


class IdentityPage(FlowPage):
    def __init__(self, wizard: TemplateWizard) -> None:
        super().__init__(wizard, Step.IDENTITY)
        self.setSubTitle("The template's name names its published images (name_date_time).")
        self.name = QLineEdit()
        self.name.setAccessibleName("Template name")
        self.name.textEdited.connect(self._edited)
        self.description = QPlainTextEdit()
        self.description.setAccessibleName("Description")
        self.description.setMaximumHeight(90)
        self.description.textChanged.connect(self._edited)
        self.icon = QLineEdit(placeholderText="optional, e.g. finance.ico")
        self.icon.setAccessibleName("Icon file name")
        self.icon.textEdited.connect(self._edited)
        form = QFormLayout()
        form.addRow("&Name:", self.name)
        form.addRow("&Description:", self.description)
        form.addRow("&Icon:", self.icon)
        self.body.addLayout(form)
        self.body.addStretch(1)

    def fill(self) -> None:
        self.name.setText(self.flow.name)
        self.name.setReadOnly(self.flow.editing)
        if self.flow.editing:
            self.name.setToolTip("Editing keeps the name; Clone… makes a copy under another name.")
        if self.description.toPlainText() != self.flow.description:
            self.description.setPlainText(self.flow.description)
        self.icon.setText(self.flow.icon)

    def _edited(self, *_args: Any) -> None:
        self.flow.name = self.name.text()
        self.flow.description = self.description.toPlainText()
        self.flow.icon = self.icon.text().strip()
        self.changed()


class ChoicePage(FlowPage):
    """A list of versions (or connectors) with an optional "none" entry."""

    none_label = ""

    def __init__(self, wizard: TemplateWizard, step: Step, subtitle: str) -> None:
        super().__init__(wizard, step)
        self.setSubTitle(subtitle)
        self.list = QListWidget()
        self.list.setAccessibleName(step.value)
        self.list.currentItemChanged.connect(self._picked)
        self.empty = QLabel()
        self.empty.setWordWrap(True)
        self.body.addWidget(self.list, 1)
        self.body.addWidget(self.empty)
        self._filling = False

    def choices(self) -> list[tuple[str, str]]:
        """(value, label) pairs."""
        raise NotImplementedError

    def chosen(self) -> str | None:
        raise NotImplementedError

    def choose(self, value: str | None) -> None:
        raise NotImplementedError

    def fill(self) -> None:
        self._filling = True
        self.list.clear()
        entries = ([(NO_CHOICE, self.none_label)] if self.none_label else []) + self.choices()
        current = self.chosen() or NO_CHOICE
        for value, label in entries:
            item = QListWidgetItem(label)
            item.setData(Qt.ItemDataRole.UserRole, value)
            self.list.addItem(item)
            if value.casefold() == current.casefold():
                self.list.setCurrentItem(item)
        self._filling = False

    def _picked(self, item: QListWidgetItem | None, _previous: QListWidgetItem | None = None) -> None:
        if self._filling or item is None:
            return
        value = item.data(Qt.ItemDataRole.UserRole)
        self.choose(None if value == NO_CHOICE else str(value))
        self.changed()

    def select_value(self, value: str | None) -> None:
        """Pick the entry for ``value`` (``None``: the "none" entry), as a click would."""
        wanted = value or NO_CHOICE
        for row in range(self.list.count()):
            if self.list.item(row).data(Qt.ItemDataRole.UserRole) == wanted:
                self.list.setCurrentRow(row)
                return
        raise KeyError(value)


class OsPage(ChoicePage):
    def __init__(self, wizard: TemplateWizard) -> None:
        super().__init__(wizard, Step.OS, "The OS layer version every other layer is applied onto.")

    def choices(self) -> list[tuple[str, str]]:
        return [(c.ref, c.label) for c in self.flow.os_choices()]

    def chosen(self) -> str | None:
        return self.flow.os

    def choose(self, value: str | None) -> None:
        self.flow.set_os(value)


class PlatformPage(ChoicePage):
    none_label = "(no platform layer)"

    def __init__(self, wizard: TemplateWizard) -> None:
        super().__init__(wizard, Step.PLATFORM, "The hypervisor or broker tools; the platform layer always wins.")

    def choices(self) -> list[tuple[str, str]]:
        return [(c.ref, c.label) for c in self.flow.platform_choices()]

    def chosen(self) -> str | None:
        return self.flow.platform

    def choose(self, value: str | None) -> None:
        self.flow.set_platform(value)


class ConnectorPage(ChoicePage):
    none_label = "(no connector: publish to a folder)"

    def __init__(self, wizard: TemplateWizard) -> None:
        super().__init__(wizard, Step.CONNECTOR, "Where published images go. Optional.")

    def choices(self) -> list[tuple[str, str]]:
        return [(name, name) for name in self.flow.catalog.connectors]

    def chosen(self) -> str | None:
        return self.flow.connector

    def choose(self, value: str | None) -> None:
        self.flow.connector = value

    def fill(self) -> None:
        super().fill()
        self.empty.setText("" if self.flow.catalog.connectors else
                           "No connector configuration exists yet; an Administrator adds them.")


class AppsPage(FlowPage):
    """App layers bound to the chosen OS layer: tick the ones to include and pick each one's version."""

    def __init__(self, wizard: TemplateWizard) -> None:
        super().__init__(wizard, Step.APPS)
        self.setSubTitle("Tick the app layers to include; the next step orders them.")
        self.table = QTableWidget(0, 3)
        self.table.setAccessibleName("App layers")
        self.table.setHorizontalHeaderLabels(["App layer", "Version", "Description"])
        self.table.verticalHeader().setVisible(False)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.NoSelection)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(1, QHeaderView.ResizeMode.ResizeToContents)
        header.setStretchLastSection(True)
        self.table.itemChanged.connect(self._ticked)
        self.empty = QLabel()
        self.empty.setWordWrap(True)
        self.body.addWidget(self.table, 1)
        self.body.addWidget(self.empty)
        self._filling = False
        self._combos: dict[str, QComboBox] = {}

    def fill(self) -> None:
        self._filling = True
        offered = self.flow.app_choices()
        self.table.setRowCount(len(offered))
        self._combos = {}
        for row, (layer, versions) in enumerate(offered.items()):
            item = QTableWidgetItem(layer)
            item.setFlags(Qt.ItemFlag.ItemIsEnabled | Qt.ItemFlag.ItemIsUserCheckable)
            chosen = self.flow.apps.get(layer)
            item.setCheckState(Qt.CheckState.Checked if chosen else Qt.CheckState.Unchecked)
            self.table.setItem(row, 0, item)
            combo = QComboBox()
            combo.setAccessibleName(f"Version of {layer}")
            for version in versions:
                combo.addItem(f"{version.version} ({version.state.value})", version.ref)
            combo.setCurrentIndex(len(versions) - 1)  # the newest by default
            for index, version in enumerate(versions):
                if chosen and version.ref.casefold() == chosen.casefold():
                    combo.setCurrentIndex(index)
            combo.currentIndexChanged.connect(lambda _i, name=layer: self._version_changed(name))
            self._combos[layer] = combo
            self.table.setCellWidget(row, 1, combo)
            self.table.setItem(row, 2, QTableWidgetItem(versions[-1].description))
        self.empty.setText("" if offered else f"No app layer is bound to OS layer {self.flow.os_layer}.")
        self._filling = False

    def set_checked(self, layer: str, checked: bool) -> None:
        """Tick or untick ``layer``, as a click would."""
        for row in range(self.table.rowCount()):
            item = self.table.item(row, 0)
            if item.text() == layer:
                item.setCheckState(Qt.CheckState.Checked if checked else Qt.CheckState.Unchecked)
                return
        raise KeyError(layer)

    def _ticked(self, item: QTableWidgetItem) -> None:
        if self._filling or item.column() != 0:
            return
        layer = item.text()
        ref = self._combos[layer].currentData() if item.checkState() == Qt.CheckState.Checked else None
        self.flow.set_app(layer, ref)
        self.changed()

    def _version_changed(self, layer: str) -> None:
        if self._filling or layer not in self.flow.apps:
            return
        self.flow.set_app(layer, self._combos[layer].currentData())
        self.changed()


class PriorityPage(FlowPage):
    def __init__(self, wizard: TemplateWizard) -> None:
        super().__init__(wizard, Step.PRIORITY)
        self.setSubTitle("Where two layers supply the same file or registry value, the higher one wins.")
        self.editor = PriorityEditor(self.services, self.flow.order, self.flow.os, self.flow.platform)
        self.editor.changed.connect(self.changed)
        self.body.addWidget(self.editor, 1)

    def fill(self) -> None:
        self.editor.set_stack(self.flow.os, self.flow.platform)
        self.editor.recompute()


class DiskPage(FlowPage):
    def __init__(self, wizard: TemplateWizard) -> None:
        super().__init__(wizard, Step.DISK)
        self.setSubTitle("The published image's format and size, elastic layering and sysprep.")
        self.format_box = QComboBox()
        self.format_box.setAccessibleName("Disk format")
        for fmt in DiskFormat:
            self.format_box.addItem(fmt.value.upper(), fmt)
        self.size_box = QSpinBox()
        self.size_box.setAccessibleName("Disk size")
        self.size_box.setRange(1, MAX_SIZE_GB)
        self.size_box.setSuffix(" GB")
        self.elastic = QComboBox()
        self.elastic.setAccessibleName("Elastic layering")
        for mode, label in ELASTIC_LABELS.items():
            self.elastic.addItem(label, mode)
        self.sysprep = QComboBox()
        self.sysprep.setAccessibleName("Sysprep")
        for sysprep, label in SYSPREP_LABELS.items():
            self.sysprep.addItem(label, sysprep)
        form = QFormLayout()
        form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.FieldsStayAtSizeHint)
        form.addRow("Disk &format:", self.format_box)
        form.addRow("Disk &size:", self.size_box)
        form.addRow("&Elastic layering:", self.elastic)
        form.addRow("S&ysprep:", self.sysprep)
        self.body.addLayout(form)
        self.body.addStretch(1)
        for combo in (self.format_box, self.elastic, self.sysprep):
            combo.currentIndexChanged.connect(self._edited)
        self.size_box.valueChanged.connect(self._edited)
        self._filling = False

    def fill(self) -> None:
        self._filling = True
        self.format_box.setCurrentIndex(self.format_box.findData(self.flow.disk_format))
        self.size_box.setValue(self.flow.size_gb)
        self.elastic.setCurrentIndex(self.elastic.findData(self.flow.elastic_mode))
        self.sysprep.setCurrentIndex(self.sysprep.findData(self.flow.sysprep))
        self._filling = False

    def _edited(self, *_args: Any) -> None:
        if self._filling:
            return
        self.flow.disk_format = DiskFormat(self.format_box.currentData())
        self.flow.size_gb = self.size_box.value()
        self.flow.elastic_mode = ElasticMode(self.elastic.currentData())
        self.flow.sysprep = SysprepMode(self.sysprep.currentData())
        self.changed()


class SummaryPage(FlowPage):
    def __init__(self, wizard: TemplateWizard) -> None:
        super().__init__(wizard, Step.SUMMARY)
        self._wizard = wizard
        self.setSubTitle("Check the template and the conflict report, then save it with a comment.")
        self.setCommitPage(False)
        self.text = QLabel()
        self.text.setObjectName("summary")
        self.text.setTextFormat(Qt.TextFormat.RichText)
        self.text.setWordWrap(True)
        self.conflicts = ConflictPanel(self.services)
        self.comment = QLineEdit(placeholderText="Why this change (kept with the revision and in the audit log)")
        self.comment.setAccessibleName("Comment")
        self.comment.textEdited.connect(self._edited)
        form = QFormLayout()
        form.addRow("&Comment:", self.comment)
        self.body.addWidget(self.text)
        self.body.addWidget(self.conflicts, 1)
        self.body.addLayout(form)
        self._saving: asyncio.Future[None] | None = None
        self.saved = False

    def fill(self) -> None:
        rows = "".join(f"<tr><td style='padding-right:12px'><b>{html.escape(label)}</b></td>"
                       f"<td>{html.escape(value)}</td></tr>" for label, value in self.flow.summary())
        self.text.setText(f"<table>{rows}</table>")
        self.comment.setText(self.flow.comment)
        self.conflicts.request(*self.flow.stack(), at_once=True)

    def _edited(self, text: str) -> None:
        self.flow.comment = text
        self.changed()

    def validatePage(self) -> bool:
        if self.saved:
            return True
        if self._saving is None or self._saving.done():
            self._saving = spawn(self._save())
        return False

    async def _save(self) -> None:
        self.busy = True
        self.completeChanged.emit()
        self.show_error("")
        try:
            info = await off_ui_thread(self.flow.save, self.services.templates)
        except LayerDeskError as exc:
            if isValid(self):
                self.busy = False
                self.show_error(f"Not saved: {exc}")
                self.completeChanged.emit()
            return
        if not isValid(self):
            return
        self.busy = False
        self.saved = True
        self._wizard.saved_template = info
        self._wizard.saved.emit(info)
        self._wizard.accept()


class TemplateWizard(QWizard):
    """Create a template (``template=None``) or edit ``template``; ``catalog`` is what it offers (read off the
    UI thread with :func:`app.console.template_wizard.load_catalog`)."""

    saved = Signal(object)  # the TemplateInfo as saved

    def __init__(self, services: Services, catalog: WizardCatalog, template: TemplateInfo | None = None,
                 parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("template_wizard")
        self.services = services
        self.flow = TemplateWizardFlow(catalog, template)
        self.saved_template: TemplateInfo | None = None
        self.setWindowTitle(self.flow.title)
        self.setWizardStyle(QWizard.WizardStyle.ClassicStyle)
        self.setOption(QWizard.WizardOption.NoBackButtonOnStartPage, True)
        self.setButtonText(QWizard.WizardButton.FinishButton, "&Save")
        self.resize(980, 640)
        self.pages: dict[Step, FlowPage] = {}
        for page in (IdentityPage(self), OsPage(self), PlatformPage(self), AppsPage(self), PriorityPage(self),
                     ConnectorPage(self), DiskPage(self), SummaryPage(self)):
            self.pages[page.step] = page
            self.setPage(STEPS.index(page.step), page)
        self.setStartId(0)

    def page_for(self, step: Step) -> Any:
        return self.pages[step]
