"""The Connectors page: where published images go. Each connector with its type, endpoint, user, whether TLS
certificates are verified and the image templates that publish through it; Add… and Edit… open the connector
form (:mod:`ui.connector_form`), Test tries a saved connector step by step, Remove asks first (the service
refuses removing one a template uses, and says which).

Changing connectors is the Administrator's; testing one is open to whoever may publish through it. Buttons
the signed-in administrator's roles do not allow are disabled, and their tooltip says which role is needed.
"""

from __future__ import annotations

import logging

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QAbstractItemView,
    QDialog,
    QDialogButtonBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QVBoxLayout,
    QWidget,
)
from shiboken6 import isValid

from app.connectors.base import TestReport
from app.console.connector_form import ConnectorRow, connector_rows, report_summary, testable, type_text, user_text
from app.errors import LayerDeskError
from app.services import Services
from app.services.rbac import Operation
from ui.background import off_ui_thread
from ui.connector_form import ERROR_STYLE, ConnectorForm, StepList
from ui.pages import ListPage, confirm, show_message, spawn
from ui.permissions import guard
from ui.table_model import Column, ItemRole
from ui.templates_page import run_dialog

log = logging.getLogger(__name__)

CONNECTOR_COLUMNS: list[Column[ConnectorRow]] = [
    Column("Name", lambda r: r.info.name),
    Column("Type", lambda r: type_text(r.info)),
    Column("Endpoint", lambda r: r.info.endpoint, tooltip=lambda r: r.info.endpoint),
    Column("User", lambda r: user_text(r.info)),
    Column("TLS verified", lambda r: r.tls),
    Column("Used by templates", lambda r: ", ".join(r.info.used_by),
           tooltip=lambda r: ", ".join(r.info.used_by)),
]


class TestReportDialog(QDialog):
    """A saved connector's test: one line saying how it went, then every step as a checklist."""

    __test__ = False  # not a pytest test class

    def __init__(self, report: TestReport, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("test_report")
        self.setWindowTitle(f"Test of connector {report.connector}")
        self.summary = QLabel(report_summary(report))
        self.summary.setWordWrap(True)
        self.summary.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        if not report.ok:
            self.summary.setStyleSheet(ERROR_STYLE)
        self.steps = StepList()
        self.steps.show_report(report)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        buttons.rejected.connect(self.reject)
        layout = QVBoxLayout(self)
        layout.addWidget(self.summary)
        layout.addWidget(self.steps)
        layout.addStretch(1)
        layout.addWidget(buttons)
        self.adjustSize()
        self.resize(640, self.sizeHint().height())


class ConnectorsPage(ListPage):
    """The connectors, with Add…, Edit…, Test and Remove."""

    #: A saved connector's test ended: its report (``None`` when it could not start; the note says why).
    tested = Signal(object)
    #: A removal ended: the removed connector's name, or "" when it was refused or not confirmed.
    removed = Signal(str)

    def __init__(self, services: Services, parent: QWidget | None = None) -> None:
        super().__init__("Connectors", CONNECTOR_COLUMNS, lambda r: r.info.id, lambda: connector_rows(services),
                         parent, placeholder="Filter name, type, endpoint, user, template…")
        self.services = services
        self.dialog: QDialog | None = None
        self.filter.setMinimumWidth(280)  # room for the placeholder, which says what it filters
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.add_button = QPushButton("&Add…")
        self.add_button.setToolTip("Add a connector: where published images go")
        self.add_button.clicked.connect(self.add)
        self.edit_button = QPushButton("&Edit…")
        self.edit_button.setToolTip("Change the selected connector's settings")
        self.edit_button.clicked.connect(self.edit)
        self.test_button = QPushButton("&Test")
        self.test_button.setToolTip("Try the selected connector step by step (nothing is changed at the "
                                    "destination)")
        self.test_button.clicked.connect(self.test)
        self.remove_button = QPushButton("Re&move")
        self.remove_button.setToolTip("Remove the selected connector (not while a template publishes through it)")
        self.remove_button.clicked.connect(self.remove)
        self.table.doubleClicked.connect(lambda _i: self.edit())
        self.table.selectionModel().selectionChanged.connect(lambda *_a: self._update_actions())
        self.loaded.connect(self._loaded)
        self.note = QLabel()
        self.note.setObjectName("note")
        self.note.setWordWrap(True)
        self._testing = False
        #: The connector to select once the list is loaded again (the one just saved).
        self._select_after_load = ""
        actions = QHBoxLayout()
        for button in (self.add_button, self.edit_button, self.test_button, self.remove_button):
            actions.addWidget(button)
        actions.addWidget(self.note, 1)
        layout = self.layout()
        assert isinstance(layout, QVBoxLayout)
        layout.insertLayout(1, actions)
        self._update_actions()

    def selected(self) -> ConnectorRow | None:
        rows = self.table.selectionModel().selectedRows()
        record = rows[0].data(ItemRole.RECORD) if rows else None
        return record if isinstance(record, ConnectorRow) else None

    def select(self, name: str) -> None:
        """Select the connector ``name`` (when it is shown)."""
        for row in range(self.proxy.rowCount()):
            index = self.proxy.index(row, 0)
            if index.data() == name:
                self.table.selectRow(row)
                return

    def _update_actions(self) -> None:
        row = self.selected()
        guard(self.add_button, self.services, Operation.EDIT_CONNECTORS)
        guard(self.edit_button, self.services, Operation.EDIT_CONNECTORS, enabled=row is not None)
        guard(self.test_button, self.services, Operation.PUBLISH_IMAGES,
              enabled=row is not None and testable(row.info.type) and not self._testing)
        guard(self.remove_button, self.services, Operation.EDIT_CONNECTORS, enabled=row is not None)

    # --- add, edit ---------------------------------------------------------------------------------------

    def add(self) -> None:
        self._open(ConnectorForm(self.services, None, self))

    def edit(self) -> None:
        row = self.selected()
        if row is not None and self.edit_button.isEnabled():
            self._open(ConnectorForm(self.services, row.info, self))

    def _open(self, form: ConnectorForm) -> None:
        form.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        form.saved.connect(self._saved)
        self.dialog = form
        spawn(run_dialog(form))

    def _saved(self, info: object) -> None:
        name = getattr(info, "name", "")
        self.note.setStyleSheet("")
        self.note.setText(f"Saved connector {name}.")
        self._select_after_load = name
        self.refresh()

    def _loaded(self, _count: int) -> None:
        if self._select_after_load:
            self.select(self._select_after_load)
            self._select_after_load = ""
        self._update_actions()

    # --- test -------------------------------------------------------------------------------------------

    def test(self) -> None:
        row = self.selected()
        if row is not None and not self._testing:
            self._testing = True
            self._update_actions()
            spawn(self._test(row.info.name))

    async def _test(self, name: str) -> None:
        self.note.setStyleSheet("")
        self.note.setText(f"Testing connector {name}…")
        try:
            report = await off_ui_thread(self.services.connectors.test_connector, name)
        except LayerDeskError as exc:
            if isValid(self):
                self._testing = False
                self._update_actions()
                self.note.setStyleSheet(ERROR_STYLE)
                self.note.setText(f"Connector {name} was not tested: {exc}")
                self.tested.emit(None)
            return
        if not isValid(self):
            return
        self._testing = False
        self._update_actions()
        self.note.setStyleSheet("" if report.ok else ERROR_STYLE)
        self.note.setText(f"{name}: {'every step passed' if report.ok else 'a step failed'}.")
        dialog = TestReportDialog(report, self)
        dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        self.dialog = dialog
        dialog.setWindowModality(Qt.WindowModality.WindowModal)
        dialog.open()
        self.tested.emit(report)

    # --- remove -----------------------------------------------------------------------------------------

    def remove(self) -> None:
        row = self.selected()
        if row is not None:
            spawn(self._remove(row))

    async def _remove(self, row: ConnectorRow) -> None:
        info = row.info
        used = f" It is used by {', '.join(info.used_by)}." if info.used_by else ""
        keyring = " Its password is removed from the OS keyring too." if info.has_credentials else ""
        if not await confirm(self, "Remove connector",
                             f"Remove connector {info.name}?{keyring}{used}",
                             action="Remove"):
            self.removed.emit("")
            return
        try:
            await off_ui_thread(lambda: self.services.connectors.remove_connector(info.name))
        except LayerDeskError as exc:
            if isValid(self):
                show_message(self, "Connector not removed", str(exc))
                self.removed.emit("")
            return
        if not isValid(self):
            return
        self.note.setStyleSheet("")
        self.note.setText(f"Removed connector {info.name}.")
        self.refresh()
        self.removed.emit(info.name)
