"""The console's pages: a filterable, sortable table of one kind of catalog object (:class:`ListPage`),
and what every page shares: formatting, messages that never block the event loop, background coroutines."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable, Coroutine, Sequence
from datetime import timedelta
from typing import Any, TypeVar

from PySide6.QtCore import QSortFilterProxyModel, Qt, Signal
from PySide6.QtWidgets import (
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QMessageBox,
    QPushButton,
    QTableView,
    QVBoxLayout,
    QWidget,
)
from shiboken6 import isValid

from app.errors import LayerDeskError
from app.services import Services
from app.services.views import AuditEntryInfo
from ui.background import off_ui_thread
from ui.table_model import Column, ItemRole, RecordTableModel

log = logging.getLogger(__name__)
T = TypeVar("T")


def format_when(value: Any) -> str:
    return value.astimezone().strftime("%Y-%m-%d %H:%M") if value else ""


def format_size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def format_duration(value: timedelta | None) -> str:
    """``42 s``, ``3 min 07 s``, ``2 h 05 min``; empty for ``None``."""
    if value is None:
        return ""
    seconds = max(0, int(value.total_seconds()))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def fit_columns(table: QTableView, *, widest: int = 360) -> None:
    """Size the columns to their contents, none wider than ``widest`` pixels (long text is elided; the
    tooltip or a wider column shows it), unless the user has rearranged them."""
    header = table.horizontalHeader()
    if header.sectionsMoved():
        return
    table.resizeColumnsToContents()
    for column in range(header.count()):
        if header.sectionSize(column) > widest:
            header.resizeSection(column, widest)


def spawn(coroutine: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
    """Run ``coroutine`` on the UI event loop. Errors a user can fix are the coroutine's to show; anything
    else that escapes it is a bug and goes to the crash dialog (``sys.excepthook``), never only to a log."""
    future = asyncio.ensure_future(coroutine)

    def report(done: asyncio.Future[T]) -> None:
        if done.cancelled():
            return
        error = done.exception()
        if error is not None:
            sys.excepthook(type(error), error, error.__traceback__)

    future.add_done_callback(report)
    return future


def show_message(parent: QWidget, title: str, text: str, *,
                 icon: QMessageBox.Icon = QMessageBox.Icon.Warning) -> QMessageBox:
    """Show ``text`` in a window-modal box that does not block the event loop (background work goes on)."""
    box = QMessageBox(icon, title, text, QMessageBox.StandardButton.Ok, parent)
    box.setObjectName("message")
    box.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
    box.setWindowModality(Qt.WindowModality.WindowModal)
    box.open()
    return box


async def confirm(parent: QWidget, title: str, text: str, *, action: str = "OK") -> bool:
    """Ask a yes/no question without blocking the event loop; ``True`` when ``action`` was chosen."""
    box = QMessageBox(QMessageBox.Icon.Question, title, text, QMessageBox.StandardButton.Cancel, parent)
    box.setObjectName("confirm")
    yes = box.addButton(action, QMessageBox.ButtonRole.AcceptRole)
    box.setDefaultButton(QMessageBox.StandardButton.Cancel)
    box.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
    box.setWindowModality(Qt.WindowModality.WindowModal)
    answer: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    box.finished.connect(lambda _code: answer.done() or answer.set_result(box.clickedButton() is yes))
    box.open()
    return await answer


class ListPage(QWidget):
    """A title, a filter box, a refresh button and a table filled in the background."""

    loaded = Signal(int)  # number of rows after a load
    failed = Signal(str)  # a message a user can act on

    def __init__(self, title: str, columns: Sequence[Column[Any]], key: Callable[[Any], Any],
                 fetch: Callable[[], Sequence[Any]], parent: QWidget | None = None, *,
                 newest_first: bool = False, placeholder: str = "Filter…") -> None:
        super().__init__(parent)
        self.setObjectName(title.replace(" ", "_").lower())
        self._fetch = fetch
        self._loading: asyncio.Future[Any] | None = None
        self.model: RecordTableModel[Any] = RecordTableModel(columns, key, self)
        self.proxy = QSortFilterProxyModel(self)
        self.proxy.setSourceModel(self.model)
        self.proxy.setSortRole(ItemRole.SORT)
        self.proxy.setFilterCaseSensitivity(Qt.CaseSensitivity.CaseInsensitive)
        self.proxy.setFilterKeyColumn(-1)

        heading = QLabel(f"<h2>{title}</h2>")
        self.filter = QLineEdit(placeholderText=placeholder, clearButtonEnabled=True)
        self.filter.textChanged.connect(self.proxy.setFilterFixedString)
        self.filter.setAccessibleName(f"Filter {title}")
        self.refresh_button = QPushButton("&Refresh")
        self.refresh_button.clicked.connect(self.refresh)
        self.status = QLabel()
        self.table = QTableView()
        self.table.setModel(self.proxy)
        self.table.setSortingEnabled(True)
        # Logs (tasks, audit) read newest first; catalogs of objects read by name.
        self.table.sortByColumn(0, Qt.SortOrder.DescendingOrder if newest_first else Qt.SortOrder.AscendingOrder)
        self.table.setSelectionBehavior(QTableView.SelectionBehavior.SelectRows)
        self.table.setAlternatingRowColors(True)
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Interactive)
        self.table.horizontalHeader().setStretchLastSection(True)

        bar = QHBoxLayout()
        bar.addWidget(heading)
        bar.addStretch(1)
        bar.addWidget(self.filter)
        bar.addWidget(self.refresh_button)
        layout = QVBoxLayout(self)
        layout.addLayout(bar)
        layout.addWidget(self.table, 1)
        layout.addWidget(self.status)

    def refresh(self) -> None:
        """Reload in a worker thread; the UI thread never waits on the catalog."""
        if self._loading is not None and not self._loading.done():
            return
        self._loading = spawn(self._load())

    async def _load(self) -> None:
        self.status.setText("Loading…")
        try:
            records = await off_ui_thread(self._fetch)
        except LayerDeskError as exc:
            if isValid(self):
                self.status.setText(str(exc))
                self.failed.emit(str(exc))
            return
        if not isValid(self):  # closed while the catalog was read
            return
        self.model.replace(records)
        fit_columns(self.table)
        self.status.setText(f"{len(records)} item{'s' if len(records) != 1 else ''}")
        self.loaded.emit(len(records))


#: The audit log's columns, wherever the console shows audit entries.
AUDIT_COLUMNS: list[Column[AuditEntryInfo]] = [
    Column("When", lambda e: format_when(e.at), sort=lambda e: e.at),
    Column("User", lambda e: e.user),
    Column("Operation", lambda e: e.operation),
    Column("Object", lambda e: e.object_name),
    Column("Outcome", lambda e: e.outcome.value),
    Column("Comment", lambda e: e.comment),
]


def audit_page(services: Services) -> ListPage:
    columns = AUDIT_COLUMNS
    return ListPage("Audit log", columns, lambda e: e.id, services.audit.list_entries, newest_first=True,
                    placeholder="Search user, operation, object, outcome, comment…")
