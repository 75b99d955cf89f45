"""The live task monitor: every task with its state, progress, elapsed time and who started it; filters;
Cancel for the selected task; the selected task's log as it is written.

While the page is visible it polls the catalog (off the UI thread, twice a second): the task list and
the selected task's log lines after the last one shown. Tasks of other processes (``layerctl``, another
console) show and cancel the same way, since both go through the catalog.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from PySide6.QtCore import QModelIndex, QPersistentModelIndex, QSortFilterProxyModel, Qt, QTimer, Signal
from PySide6.QtGui import QFontDatabase, QHideEvent, QPainter, QShowEvent, QTextCursor
from PySide6.QtWidgets import (
    QApplication,
    QComboBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QPushButton,
    QSplitter,
    QStyle,
    QStyledItemDelegate,
    QStyleOptionProgressBar,
    QStyleOptionViewItem,
    QTableView,
    QVBoxLayout,
    QWidget,
)
from shiboken6 import isValid

from app.catalog.models import TaskState
from app.errors import LayerDeskError
from app.services import Services
from app.services.rbac import Operation
from app.services.views import TaskInfo, TaskLogLineInfo
from ui.background import off_ui_thread
from ui.pages import confirm, fit_columns, format_duration, format_when, show_message, spawn
from ui.permissions import guard
from ui.table_model import Column, ItemRole, RecordTableModel

#: How often the visible page polls the catalog (a few times a second at most).
POLL_MS = 500
ACTIVE_STATES = (TaskState.PENDING, TaskState.RUNNING, TaskState.CANCELING)
#: Task kinds offered in the filter before any task of that kind was seen.
KNOWN_KINDS = ("image.publish", "layer.import", "layer.package", "layer.finalize", "layer.export_disk",
               "elastic.sync", "transfer.export", "transfer.import", "home.backup", "home.restore",
               "support.bundle", "catalog.check")
#: At most this many tasks are listed (newest first).
TASK_LIMIT = 500


@dataclass(frozen=True)
class TaskRow:
    """A task as the monitor shows it: the record and how long it has run (at the time it was read)."""

    task: TaskInfo
    elapsed: timedelta | None


def task_row(task: TaskInfo, now: datetime) -> TaskRow:
    if task.started_at is None:
        return TaskRow(task, None)
    return TaskRow(task, (task.ended_at or now) - task.started_at)


def _log_line(line: TaskLogLineInfo) -> str:
    return f"{line.at.astimezone():%H:%M:%S}  {line.level:<7}  {line.text}"


class ProgressDelegate(QStyledItemDelegate):
    """Draws the progress column as a progress bar."""

    def paint(self, painter: QPainter, option: QStyleOptionViewItem,
              index: QModelIndex | QPersistentModelIndex) -> None:
        row = index.data(ItemRole.RECORD)
        if not isinstance(row, TaskRow):
            super().paint(painter, option, index)
            return
        widget = option.widget
        style = widget.style() if widget is not None else QApplication.style()
        style.drawPrimitive(QStyle.PrimitiveElement.PE_PanelItemViewItem, option, painter, widget)
        bar = QStyleOptionProgressBar()
        bar.rect = option.rect.adjusted(3, 3, -3, -3)
        bar.minimum, bar.maximum = 0, 100
        bar.progress = row.task.progress
        bar.text = f"{row.task.progress}%"
        bar.textVisible = True
        bar.state = option.state | QStyle.StateFlag.State_Horizontal
        bar.palette = option.palette
        bar.fontMetrics = option.fontMetrics
        style.drawControl(QStyle.ControlElement.CE_ProgressBar, bar, painter, widget)


class TasksPage(QWidget):
    """The Tasks page (see the module docstring)."""

    loaded = Signal(int)  # number of tasks after a load
    failed = Signal(str)  # a message a user can act on

    def __init__(self, services: Services, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("tasks")
        self.services = services
        self._polling: asyncio.Future[None] | None = None
        self._again = False
        #: The task whose log is shown, and the id of its last line shown.
        self._log_task: int | None = None
        self._log_after = 0
        self._sized = False

        columns: list[Column[TaskRow]] = [
            Column("Id", lambda r: str(r.task.id), sort=lambda r: r.task.id),
            Column("Task", lambda r: r.task.title, tooltip=lambda r: r.task.title),
            Column("Kind", lambda r: r.task.kind),
            Column("State", lambda r: r.task.state.value.replace("_", " ")
                   + (" (cancel requested)" if r.task.cancel_requested and not r.task.state.is_final else "")),
            Column("Progress", lambda r: f"{r.task.progress}%", sort=lambda r: r.task.progress),
            Column("Message", lambda r: r.task.message, tooltip=lambda r: r.task.error or r.task.message),
            Column("Started by", lambda r: r.task.started_by),
            Column("Created", lambda r: format_when(r.task.created_at), sort=lambda r: r.task.created_at),
            Column("Elapsed", lambda r: format_duration(r.elapsed),
                   sort=lambda r: r.elapsed.total_seconds() if r.elapsed is not None else -1.0),
        ]
        self.model: RecordTableModel[TaskRow] = RecordTableModel(columns, lambda r: r.task.id, self)
        self.proxy = QSortFilterProxyModel(self)
        self.proxy.setSourceModel(self.model)
        self.proxy.setSortRole(ItemRole.SORT)
        self.proxy.setFilterCaseSensitivity(Qt.CaseSensitivity.CaseInsensitive)
        self.proxy.setFilterKeyColumn(-1)

        self.state_filter = QComboBox()
        self.state_filter.setAccessibleName("Task state")
        self.state_filter.addItem("All states", ())
        self.state_filter.addItem("Active", ACTIVE_STATES)
        for state in TaskState:
            self.state_filter.addItem(state.value.replace("_", " ").capitalize(), (state,))
        self.state_filter.currentIndexChanged.connect(lambda _i: self.refresh())
        self.kind_filter = QComboBox()
        self.kind_filter.setAccessibleName("Task kind")
        self.kind_filter.addItem("All kinds", None)
        for kind in KNOWN_KINDS:
            self.kind_filter.addItem(kind, kind)
        self.kind_filter.currentIndexChanged.connect(lambda _i: self.refresh())
        self.filter = QLineEdit(placeholderText="Filter…", clearButtonEnabled=True)
        self.filter.setAccessibleName("Filter tasks")
        self.filter.textChanged.connect(self.proxy.setFilterFixedString)
        self.refresh_button = QPushButton("&Refresh")
        self.refresh_button.clicked.connect(self.refresh)
        self.cancel_button = QPushButton("&Cancel task…")
        self.cancel_button.setToolTip("Ask the selected task to stop; what it did so far is undone.")
        self.cancel_button.clicked.connect(lambda: spawn(self._cancel_selected()))

        self.table = QTableView()
        self.table.setModel(self.proxy)
        self.table.setSortingEnabled(True)
        self.table.sortByColumn(0, Qt.SortOrder.DescendingOrder)
        self.table.setSelectionBehavior(QTableView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QTableView.SelectionMode.SingleSelection)
        self.table.setAlternatingRowColors(True)
        self.table.setWordWrap(False)
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Interactive)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.table.setItemDelegateForColumn(4, ProgressDelegate(self.table))
        self.table.selectionModel().selectionChanged.connect(lambda *_: self._selection_changed())

        self.log_title = QLabel("Select a task to follow its log.")
        self.log = QPlainTextEdit(readOnly=True)
        self.log.setAccessibleName("Task log")
        self.log.setMaximumBlockCount(20_000)
        self.log.setFont(QFontDatabase.systemFont(QFontDatabase.SystemFont.FixedFont))
        self.log.setLineWrapMode(QPlainTextEdit.LineWrapMode.NoWrap)
        self.status = QLabel()

        bar = QHBoxLayout()
        bar.addWidget(QLabel("<h2>Tasks</h2>"))
        bar.addStretch(1)
        bar.addWidget(self.state_filter)
        bar.addWidget(self.kind_filter)
        bar.addWidget(self.filter)
        bar.addWidget(self.refresh_button)
        actions = QHBoxLayout()
        actions.addWidget(self.cancel_button)
        actions.addStretch(1)
        log_panel = QWidget()
        log_layout = QVBoxLayout(log_panel)
        log_layout.setContentsMargins(0, 0, 0, 0)
        log_layout.addWidget(self.log_title)
        log_layout.addWidget(self.log, 1)
        splitter = QSplitter(Qt.Orientation.Vertical)
        splitter.addWidget(self.table)
        splitter.addWidget(log_panel)
        splitter.setStretchFactor(0, 3)
        splitter.setStretchFactor(1, 2)
        layout = QVBoxLayout(self)
        layout.addLayout(bar)
        layout.addLayout(actions)
        layout.addWidget(splitter, 1)
        layout.addWidget(self.status)

        self._timer = QTimer(self, interval=POLL_MS)
        self._timer.timeout.connect(self.refresh)
        self._update_cancel()

    # --- polling -------------------------------------------------------------------------------

    def showEvent(self, event: QShowEvent) -> None:
        super().showEvent(event)
        self._timer.start()

    def hideEvent(self, event: QHideEvent) -> None:
        self._timer.stop()
        super().hideEvent(event)

    def refresh(self) -> None:
        """Read the tasks and the selected task's new log lines in a worker thread."""
        if self._polling is not None and not self._polling.done():
            self._again = True  # the filters changed meanwhile: read once more when this read ends
            return
        self._polling = spawn(self._poll())

    def _query(self) -> tuple[Sequence[TaskState], str | None]:
        return self.state_filter.currentData() or (), self.kind_filter.currentData()

    async def _poll(self) -> None:
        while True:
            self._again = False
            states, kind = self._query()
            log_task, after = self._log_task, self._log_after
            try:
                tasks, lines, now = await off_ui_thread(self._read, states, kind, log_task, after)
            except LayerDeskError as exc:
                if isValid(self):
                    self.status.setText(str(exc))
                    self.failed.emit(str(exc))
                return
            if not isValid(self):
                return
            self._show(tasks, now)
            if log_task == self._log_task and after == self._log_after:
                self._append_log(lines)
            if not self._again:
                return

    def _read(self, states: Sequence[TaskState], kind: str | None, log_task: int | None,
              after: int) -> tuple[list[TaskInfo], list[TaskLogLineInfo], datetime]:
        """(In a worker thread.) The tasks, the new log lines of ``log_task``, and when they were read."""
        tasks = self.services.tasks.list_tasks(states=states, kind=kind, limit=TASK_LIMIT)
        lines = self.services.tasks.log(log_task, after_id=after) if log_task is not None else []
        return tasks, lines, datetime.now(UTC)

    def _show(self, tasks: list[TaskInfo], now: datetime) -> None:
        self.model.replace([task_row(t, now) for t in tasks])
        known = {self.kind_filter.itemData(i) for i in range(self.kind_filter.count())}
        for kind in sorted({t.kind for t in tasks} - known):
            self.kind_filter.addItem(kind, kind)
        if not self._sized:
            fit_columns(self.table)
            self.table.setColumnWidth(4, max(self.table.columnWidth(4), 110))
            self._sized = bool(tasks)
        running = sum(1 for t in tasks if t.state in ACTIVE_STATES)
        shown = f"{len(tasks)} task{'s' if len(tasks) != 1 else ''}"
        self.status.setText(f"{shown}, {running} active" if running else shown)
        self._update_cancel()
        self.loaded.emit(len(tasks))

    def _append_log(self, lines: list[TaskLogLineInfo]) -> None:
        if not lines:
            return
        bar = self.log.verticalScrollBar()
        following = bar.value() >= bar.maximum() - 2
        cursor = QTextCursor(self.log.document())
        cursor.movePosition(QTextCursor.MoveOperation.End)
        text = "\n".join(_log_line(line) for line in lines)
        cursor.insertText(text if self.log.document().isEmpty() else "\n" + text)
        self._log_after = lines[-1].id
        if following:
            bar.setValue(bar.maximum())

    # --- selection and cancel ------------------------------------------------------------------

    def selected_task(self) -> TaskInfo | None:
        rows = self.table.selectionModel().selectedRows()
        if not rows:
            return None
        row = rows[0].data(ItemRole.RECORD)
        return row.task if isinstance(row, TaskRow) else None

    def select_task(self, task_id: int) -> bool:
        """Select the task ``task_id`` if it is listed; returns whether it is."""
        row = self.model.row_of(task_id)
        if row is None:
            return False
        index = self.proxy.mapFromSource(self.model.index(row, 0))
        if not index.isValid():
            return False
        self.table.selectRow(index.row())
        return True

    def _selection_changed(self) -> None:
        task = self.selected_task()
        task_id = task.id if task is not None else None
        if task_id != self._log_task:
            self._log_task, self._log_after = task_id, 0
            self.log.clear()
            self.log_title.setText(f"Log of task {task.id}: {task.title}" if task is not None
                                   else "Select a task to follow its log.")
            if task is not None:
                self.refresh()
        self._update_cancel()

    def _update_cancel(self) -> None:
        task = self.selected_task()
        operations = [Operation.RUN_TASKS]
        if task is not None and task.started_by != self.services.caller.username:
            operations.append(Operation.MANAGE_ALL_TASKS)
        cancelable = task is not None and task.state in (TaskState.PENDING, TaskState.RUNNING) \
            and not task.cancel_requested
        guard(self.cancel_button, self.services, *operations, enabled=cancelable)

    async def _cancel_selected(self) -> None:
        task = self.selected_task()
        if task is None:
            return
        if not await confirm(self, "Cancel task", f"Cancel task {task.id}, “{task.title}”?\n\n"
                             "It stops within a second; what it did so far is undone.", action="Cancel task"):
            return
        try:
            await off_ui_thread(lambda: self.services.tasks.cancel(task.id, comment="Canceled in the console"))
        except LayerDeskError as exc:
            if isValid(self):
                show_message(self, "Task not canceled", str(exc))
            return
        if isValid(self):
            self.refresh()

