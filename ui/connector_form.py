"""The connector form: a connector type's declared fields rendered as a form (:mod:`app.console.connector_form`
decides which editor each gets and what they start with), saved through the connector service, and a Test
that runs the type's step-by-step test with what is typed, in a worker thread, shown as a checklist.

The form never shows a stored password: an empty password box keeps the one in the OS keyring. A refusal
of the service is shown under the field it is about (or in the dialog) and what was typed stays. The dialog
can be closed while a test runs; the test's answer is then dropped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtGui import QColor, QResizeEvent
from PySide6.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)
from shiboken6 import isValid

from app.connectors.base import ConfigField, TestReport
from app.console.connector_form import (
    NAME_FIELD,
    ConnectorValues,
    EditorKind,
    FormValue,
    StepOutcome,
    editor_kind,
    error_field,
    field_hint,
    form_fields,
    form_values,
    initial_values,
    report_summary,
    secret_placeholder,
    step_detail,
    step_outcome,
    testable,
    type_choices,
)
from app.errors import LayerDeskError
from app.services import Services
from app.services.connectors import CONNECTOR_TYPES, check_settings
from app.services.rbac import Operation
from app.services.views import ConnectorInfo
from ui.background import off_ui_thread
from ui.pages import spawn
from ui.permissions import guard

log = logging.getLogger(__name__)

ERROR_STYLE = "color: #b00020"
HINT_STYLE = "color: palette(placeholder-text)"
#: How each step's result reads in the checklist, and its colour.
OUTCOME_LOOK = {
    StepOutcome.OK: ("✔ ok", "#1b7f3b"),
    StepOutcome.FAILED: ("✘ failed", "#b00020"),
    StepOutcome.NOT_TRIED: ("– not tried", "#6b6b6b"),
}
#: The running test's elapsed time is shown this often.
TICK_MS = 250
Editor = QLineEdit | QSpinBox | QCheckBox | QComboBox


def _error_label(name: str) -> QLabel:
    label = QLabel()
    label.setObjectName(name)
    label.setWordWrap(True)
    label.setStyleSheet(ERROR_STYLE)
    label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
    label.hide()
    return label


class StepList(QTableWidget):
    """A connector test's steps, in order, as a checklist: step, result (ok / failed / not tried), detail."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(0, 3, parent)
        self.setObjectName("test_steps")
        self.setHorizontalHeaderLabels(["Step", "Result", "Detail"])
        self.verticalHeader().setVisible(False)
        self.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.setSelectionMode(QAbstractItemView.SelectionMode.NoSelection)
        self.setFocusPolicy(Qt.FocusPolicy.NoFocus)
        self.setWordWrap(True)  # a failure's reason is a sentence: wrapped, never cut off
        header = self.horizontalHeader()
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(1, QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(2, QHeaderView.ResizeMode.Stretch)

    def show_report(self, report: TestReport) -> None:
        self.setRowCount(len(report.steps))
        for row, step in enumerate(report.steps):
            text, colour = OUTCOME_LOOK[step_outcome(step)]
            detail = step_detail(step)
            result = QTableWidgetItem(text)
            result.setForeground(QColor(colour))
            for column, item in enumerate((QTableWidgetItem(step.name), result, QTableWidgetItem(detail))):
                item.setToolTip(detail)
                self.setItem(row, column, item)
        self.resizeRowsToContents()
        # As tall as its steps (a test has a handful), so the settings above keep their room.
        rows = sum(self.rowHeight(r) for r in range(self.rowCount()))
        self.setFixedHeight(min(rows + self.horizontalHeader().height() + 2 * self.frameWidth() + 2, 260))

    def rows(self) -> list[tuple[str, str, str]]:
        """The checklist as shown: (step, result, detail) a row."""
        def text(row: int, column: int) -> str:
            item = self.item(row, column)
            return item.text() if item is not None else ""

        return [(text(r, 0), text(r, 1), text(r, 2)) for r in range(self.rowCount())]


class ConnectorForm(QDialog):
    """Add a connector (``info`` is ``None``; the type is chosen here) or edit ``info`` (its type is fixed).
    The service calls happen here, so a refusal shows next to the input, which stays."""

    fields_ready = Signal()  # the chosen type's fields are shown
    tested = Signal(object)  # the TestReport, or None when the settings were refused before any step ran
    saved = Signal(object)  # the ConnectorInfo

    def __init__(self, services: Services, info: ConnectorInfo | None = None, parent: QWidget | None = None, *,
                 connector_type: str | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("connector_form")
        self.setWindowTitle(f"Edit connector {info.name}" if info else "Add a connector")
        self.resize(700, 700)
        self._services = services
        self.info = info
        self.fields: tuple[ConfigField, ...] = ()
        self.editors: dict[str, Editor] = {}
        self.errors: dict[str, QLabel] = {}
        self.labels: dict[str, QLabel] = {}
        self._generation = 0
        self._testing: asyncio.Future[None] | None = None
        self._saving: asyncio.Future[None] | None = None
        self._test_started = 0.0
        self._busy_testing = False
        self._busy_saving = False
        self._ticker = QTimer(self)
        self._ticker.setInterval(TICK_MS)
        self._ticker.timeout.connect(self._tick)

        intro = QLabel("A connector says where published images go. Its password is kept in the OS keyring, "
                       "never in the catalog. <b>Test</b> tries the settings as typed without changing anything "
                       "at the destination.")
        intro.setWordWrap(True)
        self.name = QLineEdit(placeholderText="Lab-Share")
        self.name.setAccessibleName("Name")
        self.name_error = _error_label("name_error")
        self.type = QComboBox()
        self.type.setAccessibleName("Type")
        self.type.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        head = QFormLayout()
        head.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.ExpandingFieldsGrow)
        if info is None:
            for key, text in type_choices():
                self.type.addItem(text, key)
            if connector_type is not None:
                self.type.setCurrentIndex(max(0, self.type.findData(connector_type)))
            name_box = QWidget()
            name_column = QVBoxLayout(name_box)
            name_column.setContentsMargins(0, 0, 0, 0)
            name_column.setSpacing(2)
            name_column.addWidget(self.name)
            name_column.addWidget(self.name_error)
            head.addRow(self._label("Name", required=True), name_box)
            head.addRow("Type:", self.type)
        else:
            self.name.setText(info.name)
            self.type.addItem(CONNECTOR_TYPES.get(info.type, info.type), info.type)
            head.addRow("Name:", QLabel(f"<b>{info.name}</b>"))
            head.addRow("Type:", QLabel(CONNECTOR_TYPES.get(info.type, info.type)))
        self.type_note = QLabel()
        self.type_note.setObjectName("type_note")
        self.type_note.setWordWrap(True)
        self.type_note.hide()

        self.form = QFormLayout()
        self.form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.ExpandingFieldsGrow)
        self.form.setLabelAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignTop)
        inner = QWidget()
        inner.setLayout(self.form)
        self._settings_inner = inner
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QScrollArea.Shape.NoFrame)
        scroll.setWidget(inner)
        settings_box = QGroupBox("Settings")
        settings_layout = QVBoxLayout(settings_box)
        settings_layout.addWidget(scroll)
        required_note = QLabel(f"<span style='{ERROR_STYLE}'>*</span> required to test and publish")
        required_note.setStyleSheet(HINT_STYLE)
        settings_layout.addWidget(required_note)

        self.comment = QLineEdit(placeholderText="Kept in the audit log")
        self.comment.setAccessibleName("Comment")
        comment_row = QFormLayout()
        comment_row.addRow("Comment:", self.comment)

        self.test_button = QPushButton("&Test")
        self.test_button.setObjectName("test_button")
        self.test_button.setToolTip("Try these settings step by step (nothing is changed at the destination)")
        self.test_button.setAutoDefault(False)
        self.test_button.clicked.connect(self.run_test)
        self.test_status = QLabel()
        self.test_status.setObjectName("test_status")
        self.test_status.setWordWrap(True)
        self.steps = StepList()
        self.steps.hide()
        test_box = QGroupBox("Test")
        test_layout = QVBoxLayout(test_box)
        test_row = QHBoxLayout()
        test_row.addWidget(self.test_button, 0, Qt.AlignmentFlag.AlignTop)
        test_row.addWidget(self.test_status, 1)
        test_layout.addLayout(test_row)
        test_layout.addWidget(self.steps)

        self.error = _error_label("error")
        self.buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Cancel)
        self.ok = self.buttons.addButton("Add" if info is None else "Save", QDialogButtonBox.ButtonRole.AcceptRole)
        self.ok.setObjectName("save_button")
        self.ok.setAutoDefault(False)
        self.ok.clicked.connect(self.save)
        self.buttons.rejected.connect(self.reject)
        # However the dialog closes (Cancel, Escape, the window's close button), a running test is let go.
        self.finished.connect(lambda _code: self._abandon_test())

        layout = QVBoxLayout(self)
        layout.addWidget(intro)
        layout.addLayout(head)
        layout.addWidget(self.type_note)
        layout.addWidget(settings_box, 1)
        layout.addLayout(comment_row)
        layout.addWidget(test_box)
        layout.addWidget(self.error)
        layout.addWidget(self.buttons)
        self.type.currentIndexChanged.connect(lambda _i: self.load_fields())
        self._update_actions()
        self.load_fields()

    # --- fields -----------------------------------------------------------------------------------------

    def connector_type(self) -> str:
        return str(self.type.currentData())

    def load_fields(self) -> None:
        """Show the chosen type's fields (its module is imported in a worker thread on first use)."""
        self._generation += 1
        spawn(self._load_fields(self._generation, self.connector_type()))

    async def _load_fields(self, generation: int, connector_type: str) -> None:
        self.fields = ()
        self._update_actions()
        try:
            fields = await off_ui_thread(form_fields, connector_type)
        except LayerDeskError as exc:
            if isValid(self) and generation == self._generation:
                self._build(())
                self.error.setText(str(exc))
                self.error.show()
                self.fields_ready.emit()
            return
        if not isValid(self) or generation != self._generation:
            return
        self.error.hide()
        self._build(fields)
        self.fields_ready.emit()

    def _build(self, fields: tuple[ConfigField, ...]) -> None:
        typed = {key: self.value(key) for key in self.editors}
        while self.form.rowCount():
            self.form.removeRow(0)
        self.editors.clear()
        self.errors.clear()
        self.labels.clear()
        self.fields = fields
        start = initial_values(fields, self.info)
        for item in fields:
            self._add_row(item)
            self.set_value(item.key, start[item.key])
        # What was typed for the previous type carries over where the new type has the same field.
        for key, value in typed.items():
            if key in self.editors and type(value) is type(self.value(key)) and value not in ("", None):
                self.set_value(key, value)
        connector_type = self.connector_type()
        if not testable(connector_type):
            self.type_note.setText(f"LayerDesk cannot test or publish to {CONNECTOR_TYPES.get(connector_type)} "
                                   "yet; its configuration can be kept for when it can.")
            self.type_note.show()
        else:
            self.type_note.hide()
        self.steps.hide()
        self.steps.setRowCount(0)
        self.test_status.clear()
        self._update_actions()
        QTimer.singleShot(0, self._fit_settings_later)

    @staticmethod
    def _label(text: str, *, required: bool) -> QLabel:
        label = QLabel(f"{text} <span style='{ERROR_STYLE}'>*</span>:" if required else f"{text}:")
        label.setTextFormat(Qt.TextFormat.RichText)
        return label

    def _add_row(self, item: ConfigField) -> None:
        kind = editor_kind(item)
        editor: Editor
        extra: QWidget | None = None
        if kind is EditorKind.FLAG:
            editor = QCheckBox()
        elif kind is EditorKind.NUMBER:
            editor = QSpinBox()
            low = item.minimum if item.minimum is not None else 0
            editor.setRange(low, item.maximum if item.maximum is not None else 2**31 - 1)
            if not item.required and item.default is None:
                # One below the minimum reads "not set": the field is then left out.
                editor.setMinimum(low - 1)
                editor.setSpecialValueText("not set")
        elif kind is EditorKind.CHOICE:
            editor = QComboBox()
            if not item.required and item.default is None:
                editor.addItem("")
            editor.addItems(list(item.choices))
        else:
            editor = QLineEdit()
            if kind is EditorKind.SECRET:
                editor.setEchoMode(QLineEdit.EchoMode.Password)
                editor.setPlaceholderText(secret_placeholder(item, self.info))
            elif item.default not in (None, ""):
                editor.setPlaceholderText(str(item.default))
            if kind is EditorKind.PATH:
                browse = QPushButton("Browse…")
                browse.setAutoDefault(False)
                # The endpoint of a path type is a folder; any other path setting names a file (a CA, a key).
                folder = item.key == "endpoint"
                browse.setToolTip("Choose a folder on this machine" if folder else "Choose a file on this machine")
                browse.clicked.connect(lambda _c=False, e=editor, f=folder: self._browse(e, folder=f))
                extra = browse
        editor.setObjectName(item.key)
        editor.setAccessibleName(item.label)
        editor.setToolTip(item.help)
        hint = QLabel(field_hint(item))
        hint.setObjectName(f"{item.key}_hint")
        hint.setStyleSheet(HINT_STYLE)
        hint.setWordWrap(True)
        hint.setVisible(bool(hint.text()))
        error = _error_label(f"{item.key}_error")
        box = QWidget()
        # The whole row's width, so a wrapped hint gets the same width the form measured its height at.
        box.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)
        column = QVBoxLayout(box)
        column.setContentsMargins(0, 0, 0, 4)
        column.setSpacing(2)
        if extra is not None:
            line = QHBoxLayout()
            line.addWidget(editor, 1)
            line.addWidget(extra)
            column.addLayout(line)
        else:
            column.addWidget(editor)
        column.addWidget(hint)
        column.addWidget(error)
        label = self._label(item.label, required=item.required)
        label.setToolTip(editor.toolTip())
        label.setBuddy(editor)
        self.form.addRow(label, box)
        self.editors[item.key] = editor
        self.errors[item.key] = error
        self.labels[item.key] = label

    def _fit_settings(self) -> None:
        """Give the settings their full height at the width they have: the scroll area sizes its content
        by its size hint, which is too short for wrapped hints and messages, so rows would be squeezed."""
        inner = self._settings_inner
        inner.setMinimumHeight(self.form.heightForWidth(inner.width()) if self.form.hasHeightForWidth()
                               else self.form.sizeHint().height())

    def _fit_settings_later(self) -> None:
        # Once the layout has given the settings their new width (a queued call may outlive the dialog).
        if isValid(self):
            self._fit_settings()

    def resizeEvent(self, event: QResizeEvent) -> None:
        super().resizeEvent(event)
        QTimer.singleShot(0, self._fit_settings_later)

    def _browse(self, editor: QLineEdit, *, folder: bool) -> None:
        dialog = QFileDialog(self, "Choose the folder published images go to" if folder
                             else f"Choose the file for {editor.accessibleName()}", editor.text())
        if folder:
            dialog.setFileMode(QFileDialog.FileMode.Directory)
            dialog.setOption(QFileDialog.Option.ShowDirsOnly)
        else:
            dialog.setFileMode(QFileDialog.FileMode.ExistingFile)
        dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        dialog.fileSelected.connect(editor.setText)
        dialog.open()

    def value(self, key: str) -> FormValue:
        """What the editor of field ``key`` holds (text, number or flag; ``""`` for "not set")."""
        editor = self.editors[key]
        if isinstance(editor, QCheckBox):
            return editor.isChecked()
        if isinstance(editor, QSpinBox):
            return "" if editor.specialValueText() and editor.value() == editor.minimum() else editor.value()
        if isinstance(editor, QComboBox):
            return editor.currentText()
        return editor.text()

    def set_value(self, key: str, value: FormValue) -> None:
        editor = self.editors[key]
        if isinstance(editor, QCheckBox):
            editor.setChecked(bool(value))
        elif isinstance(editor, QSpinBox):
            editor.setValue(int(value) if isinstance(value, int | bool) or str(value).isdigit() else editor.minimum())
        elif isinstance(editor, QComboBox):
            index = editor.findText(str(value))
            editor.setCurrentIndex(max(index, 0))
        else:
            editor.setText(str(value))

    def values(self) -> ConnectorValues:
        """The form's content as the connector service takes it."""
        typed = {key: self.value(key) for key in self.editors}
        keep = self.info.options if self.info is not None and not testable(self.info.type) else None
        return form_values(self.fields, typed, keep)

    # --- refusals ---------------------------------------------------------------------------------------

    def clear_errors(self) -> None:
        for label in (*self.errors.values(), self.name_error, self.error):
            label.clear()
            label.hide()
        self._fit_settings()

    def show_error(self, exc: LayerDeskError) -> None:
        """Show a refusal under the field it is about (focusing it), else in the dialog."""
        key = error_field(exc, self.fields)
        label = self.name_error if key == NAME_FIELD else self.errors.get(key or "")
        if label is None or (key == NAME_FIELD and self.info is not None):
            label = self.error
        label.setText(str(exc))
        label.show()
        self._fit_settings()
        focus = self.name if key == NAME_FIELD else self.editors.get(key or "")
        if focus is not None and focus.isEnabled():
            focus.setFocus()

    def _update_actions(self) -> None:
        loaded = bool(self.fields)
        guard(self.ok, self._services, Operation.EDIT_CONNECTORS, enabled=loaded and not self._busy_saving)
        guard(self.test_button, self._services, Operation.EDIT_CONNECTORS,
              enabled=loaded and not self._busy_testing and testable(self.connector_type()))

    # --- test -------------------------------------------------------------------------------------------

    def testing(self) -> bool:
        """Whether a test runs (its answer not shown yet)."""
        return self._busy_testing

    def run_test(self) -> None:
        """Test what is typed, in a worker thread (a second click while one runs does nothing)."""
        if not self._busy_testing:
            self._busy_testing = True
            self._update_actions()
            self._testing = spawn(self._test())

    async def _test(self) -> None:
        values = self.values()
        connector_type = self.connector_type()
        name = self.name.text().strip() or "(new connector)"
        saved_password_of = self.info.name if self.info is not None and self.info.has_credentials else None
        self.clear_errors()
        self.steps.hide()
        self._test_started = time.monotonic()
        self._tick()
        self._ticker.start()
        try:
            report = await off_ui_thread(lambda: self._services.connectors.test_settings(
                connector_type, **values.service_arguments(), name=name, saved_password_of=saved_password_of))
        except LayerDeskError as exc:
            if isValid(self):
                self._test_done()
                self.test_status.setText("Not tested: correct the settings first (see the message).")
                self.show_error(exc)
                self.tested.emit(None)
            return
        if not isValid(self):
            return
        self._test_done()
        self.steps.show_report(report)
        self.steps.show()
        self.test_status.setText(report_summary(report))
        self.test_status.setStyleSheet("" if report.ok else ERROR_STYLE)
        self.tested.emit(report)

    def _tick(self) -> None:
        seconds = time.monotonic() - self._test_started
        self.test_status.setStyleSheet("")
        self.test_status.setText(f"Testing… {seconds:.0f} s. You can go on typing or close this window; "
                                 "the test is then let go.")

    def _test_done(self) -> None:
        self._ticker.stop()
        self._busy_testing = False
        self._update_actions()

    def _abandon_test(self) -> None:
        self._ticker.stop()
        if self._testing is not None and not self._testing.done():
            # The worker thread finishes on its own (a connector test never changes anything); its answer
            # is dropped with the coroutine that waited for it.
            self._testing.cancel()

    # --- save -------------------------------------------------------------------------------------------

    def save(self) -> None:
        if not self._busy_saving:
            self._busy_saving = True
            self._update_actions()
            self._saving = spawn(self._save())

    async def _save(self) -> None:
        values = self.values()
        connector_type = self.connector_type()
        name = self.name.text()
        comment = self.comment.text()
        self.clear_errors()
        try:
            info = await off_ui_thread(self._store, connector_type, name, values, comment)
        except LayerDeskError as exc:
            if isValid(self):
                self._busy_saving = False
                self._update_actions()
                self.show_error(exc)
            return
        if isValid(self):
            self.saved.emit(info)
            self.accept()

    def _store(self, connector_type: str, name: str, values: ConnectorValues, comment: str) -> ConnectorInfo:
        """(In a worker thread.) Check the settings are complete, as ``layerctl connector add`` does, then
        add or update the connector."""
        arguments: dict[str, Any] = values.service_arguments()
        check_settings(connector_type, values.endpoint, values.username, values.options)
        if self.info is None:
            return self._services.connectors.add_connector(name, connector_type, **arguments, comment=comment)
        return self._services.connectors.update_connector(self.info.name, **arguments, comment=comment)
