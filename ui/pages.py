"""The console's pages: each a filterable, sortable table of one kind of catalog object."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

from PySide6.QtCore import QSortFilterProxyModel, Qt, Signal
from PySide6.QtWidgets import (
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPushButton,
    QTableView,
    QVBoxLayout,
    QWidget,
)

from app.errors import LayerDeskError
from app.services import Services
from app.services.views import AuditEntryInfo, LayerInfo, TaskInfo, TemplateInfo
from ui.background import off_ui_thread
from ui.table_model import Column, ItemRole, RecordTableModel

log = logging.getLogger(__name__)


def _when(value: Any) -> str:
    return value.astimezone().strftime("%Y-%m-%d %H:%M") if value else ""


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


class ListPage(QWidget):
    """A title, a filter box, a refresh button and a table filled in the background."""

    loaded = Signal(int)  # number of rows after a load
    failed = Signal(str)  # a message a user can act on

    def __init__(self, title: str, columns: Sequence[Column[Any]], key: Callable[[Any], Any],
                 fetch: Callable[[], Sequence[Any]], parent: QWidget | None = None, *,
                 newest_first: bool = False) -> None:
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
        self.filter = QLineEdit(placeholderText="Filter…", clearButtonEnabled=True)
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
        self._loading = asyncio.ensure_future(self._load())

    async def _load(self) -> None:
        self.status.setText("Loading…")
        try:
            records = await off_ui_thread(self._fetch)
        except LayerDeskError as exc:
            self.status.setText(str(exc))
            self.failed.emit(str(exc))
            return
        self.model.replace(records)
        if not self.table.horizontalHeader().sectionsMoved():
            self.table.resizeColumnsToContents()
        self.status.setText(f"{len(records)} item{'s' if len(records) != 1 else ''}")
        self.loaded.emit(len(records))


def layers_page(services: Services) -> ListPage:
    columns: list[Column[LayerInfo]] = [
        Column("Name", lambda layer: layer.name),
        Column("Type", lambda layer: layer.type.value),
        Column("OS layer", lambda layer: layer.os_layer or ""),
        Column("Versions", lambda layer: str(layer.version_count), sort=lambda layer: layer.version_count),
        Column("Latest", lambda layer: layer.latest_version or ""),
        Column("State", lambda layer: layer.latest_state.value if layer.latest_state else ""),
        Column("Size", lambda layer: _size(layer.size_bytes), sort=lambda layer: layer.size_bytes),
        Column("Description", lambda layer: layer.description),
    ]
    return ListPage("Layers", columns, lambda layer: layer.id, services.layers.list_layers)


def templates_page(services: Services) -> ListPage:
    columns: list[Column[TemplateInfo]] = [
        Column("Name", lambda t: t.name),
        Column("OS layer", lambda t: t.os_version),
        Column("Platform layer", lambda t: t.platform_version or ""),
        Column("App layers", lambda t: str(len(t.app_layers)), sort=lambda t: len(t.app_layers),
               tooltip=lambda t: "\n".join(reversed(t.app_layers)) or "no app layers"),
        Column("Format", lambda t: t.disk_format.value),
        Column("Size (GB)", lambda t: str(t.size_gb), sort=lambda t: t.size_gb),
        Column("Revision", lambda t: str(t.revision), sort=lambda t: t.revision),
        Column("Publishable", lambda t: "yes" if not t.publish_blockers else "no",
               tooltip=lambda t: "\n".join(t.publish_blockers) or "ready to publish"),
    ]
    return ListPage("Image templates", columns, lambda t: t.id, services.templates.list_templates)


def tasks_page(services: Services) -> ListPage:
    columns: list[Column[TaskInfo]] = [
        Column("Id", lambda t: str(t.id), sort=lambda t: t.id),
        Column("Task", lambda t: t.title),
        Column("State", lambda t: t.state.value),
        Column("Progress", lambda t: f"{t.progress}%", sort=lambda t: t.progress),
        Column("Message", lambda t: t.message),
        Column("Started by", lambda t: t.started_by),
        Column("Created", lambda t: _when(t.created_at), sort=lambda t: t.created_at),
    ]
    return ListPage("Tasks", columns, lambda t: t.id, services.tasks.list_tasks, newest_first=True)


def audit_page(services: Services) -> ListPage:
    columns: list[Column[AuditEntryInfo]] = [
        Column("When", lambda e: _when(e.at), sort=lambda e: e.at),
        Column("User", lambda e: e.user),
        Column("Operation", lambda e: e.operation),
        Column("Object", lambda e: e.object_name),
        Column("Outcome", lambda e: e.outcome.value),
        Column("Comment", lambda e: e.comment),
    ]
    return ListPage("Audit log", columns, lambda e: e.id, services.audit.list_entries, newest_first=True)
