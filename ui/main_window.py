"""The console's main window: navigation on the left, one page at a time, the signed-in
administrator and the running tasks in the status bar (a click there opens the Tasks page).

The window owns the task runner of the console's own tasks (imports, the demo lab); closing the window
cancels what still runs (each task undoes its work)."""

from __future__ import annotations

import asyncio
from typing import Any

from PySide6.QtCore import QSettings, QSize, QTimer
from PySide6.QtGui import QCloseEvent, QKeySequence, QShortcut
from PySide6.QtWidgets import (
    QLabel,
    QListWidget,
    QListWidgetItem,
    QMainWindow,
    QPushButton,
    QSplitter,
    QStackedWidget,
    QVBoxLayout,
    QWidget,
)
from shiboken6 import isValid

from app import __version__
from app.catalog.models import TaskState
from app.errors import LayerDeskError
from app.services import Services
from app.services.maintenance import INTERVAL_HOURS as MAINTENANCE_INTERVAL_HOURS
from app.services.maintenance import run_scheduled_maintenance
from app.tasks.runner import TaskRunner
from ui.background import off_ui_thread
from ui.connectors_page import ConnectorsPage
from ui.elastic_page import ElasticPage
from ui.icons import icon
from ui.layers_page import LayersPage
from ui.pages import spawn
from ui.system_page import SystemPage
from ui.tasks_page import TasksPage
from ui.templates_page import TemplatesPage
from ui.tool_banner import EngineToolsBanner

TASK_POLL_MS = 2000
#: The first retention run waits this long, so it does not compete with the first page's loading.
MAINTENANCE_FIRST_MS = 10_000
#: The navigation icon of each page (by its object name).
NAV_ICONS = {"layers": "layers", "image_templates": "templates", "elastic_layers": "elastic", "tasks": "tasks",
             "system": "system", "connectors": "connectors"}


class MainWindow(QMainWindow):
    def __init__(self, services: Services, *, remember: bool = True) -> None:
        super().__init__()
        self.services = services
        #: Whether window geometry and page are restored and saved (not in smoke runs).
        self._remember = remember
        self.setWindowTitle(f"LayerDesk {__version__} – {services.home.root}")
        self.runner = TaskRunner(services.catalog, services.caller)
        #: Each page has ``refresh()`` and the signals ``loaded(int)`` and ``failed(str)``.
        self.pages: list[Any] = [
            LayersPage(services, self.runner),
            TemplatesPage(services, self.runner),
            ElasticPage(services),
            ConnectorsPage(services),
            TasksPage(services),
            SystemPage(services, runner=self.runner),
        ]
        self.nav = QListWidget()
        self.nav.setAccessibleName("Navigation")
        self.stack = QStackedWidget()
        self.nav.setIconSize(QSize(20, 20))
        for page in self.pages:
            item = QListWidgetItem(page.objectName().replace("_", " ").capitalize())
            item.setIcon(icon(NAV_ICONS.get(page.objectName(), "system")))
            self.nav.addItem(item)
            self.stack.addWidget(page)
        self.nav.currentRowChanged.connect(self._show_page)
        splitter = QSplitter()
        splitter.addWidget(self.nav)
        # Missing engine tools are announced above every page, before anyone tries what needs them.
        self.tools_banner = EngineToolsBanner(services)
        right = QWidget()
        column = QVBoxLayout(right)
        column.setContentsMargins(0, 0, 0, 0)
        column.addWidget(self.tools_banner)
        column.addWidget(self.stack, 1)
        splitter.addWidget(right)
        splitter.setStretchFactor(0, 0)
        splitter.setStretchFactor(1, 1)
        splitter.setSizes([180, 920])
        self.setCentralWidget(splitter)

        caller = services.caller
        roles = ", ".join(sorted(r.value for r in caller.roles)) or "no role"
        who = QLabel(f"Signed in as <b>{caller.username}</b> ({roles})"
                     + (" – built-in administrator of this catalog" if caller.builtin else ""))
        self.running = QPushButton("No task running")
        self.running.setObjectName("running_tasks")
        self.running.setFlat(True)
        self.running.setToolTip("Open the Tasks page")
        self.running.clicked.connect(lambda: self.show_page("tasks"))
        self.statusBar().addWidget(who, 1)
        self.statusBar().addPermanentWidget(self.running)

        QShortcut(QKeySequence.StandardKey.Refresh, self, activated=lambda: self.current_page().refresh())
        self._polling: asyncio.Future[None] | None = None
        self._poll = QTimer(self, interval=TASK_POLL_MS, timeout=self._poll_tasks)
        self._poll.start()
        # Retention (old tasks, audit entries, log files): shortly after start-up, then every few hours.
        self._maintenance = QTimer(self, interval=MAINTENANCE_FIRST_MS, singleShot=False,
                                   timeout=self._run_maintenance)
        self._maintenance.start()
        self.tools_banner.check()
        self._restore()
        self.nav.setCurrentRow(min(max(self._saved_page, 0), len(self.pages) - 1))

    def current_page(self) -> Any:
        return self.pages[self.stack.currentIndex()]

    def show_page(self, name: str) -> None:
        """Show the page whose object name is ``name`` (``layers``, ``tasks``, ``system``…)."""
        for row, page in enumerate(self.pages):
            if page.objectName() == name:
                self.nav.setCurrentRow(row)
                return

    def _show_page(self, row: int) -> None:
        self.stack.setCurrentIndex(row)
        self.pages[row].refresh()

    def _run_maintenance(self) -> None:
        self._maintenance.setInterval(MAINTENANCE_INTERVAL_HOURS * 3600 * 1000)
        home, catalog, secrets = self.services.home, self.services.catalog, self.services.secrets
        spawn(off_ui_thread(lambda: run_scheduled_maintenance(home, catalog, secrets)))

    def _poll_tasks(self) -> None:
        if self._polling is None or self._polling.done():
            self._polling = spawn(self._update_running())

    async def _update_running(self) -> None:
        try:
            active = await off_ui_thread(
                lambda: self.services.tasks.list_tasks(
                    states=[TaskState.PENDING, TaskState.RUNNING, TaskState.CANCELING]))
        except LayerDeskError as exc:
            if isValid(self.running):
                self.running.setText(f"Tasks unavailable: {exc}")
            return
        if not isValid(self.running):  # the window was closed while the catalog was asked
            return
        self.running.setText(f"{len(active)} task{'s' if len(active) != 1 else ''} running" if active
                             else "No task running")

    # --- remembered geometry and page ----------------------------------------------------------

    def _settings(self) -> QSettings:
        return QSettings(str(self.services.home.root / "console.ini"), QSettings.Format.IniFormat)

    def _restore(self) -> None:
        self.resize(1100, 700)
        self._saved_page = 0
        if not self._remember:
            return
        settings = self._settings()
        geometry = settings.value("window/geometry")
        if geometry is not None:
            self.restoreGeometry(geometry)
        self._saved_page = int(settings.value("window/page", 0))

    def closeEvent(self, event: QCloseEvent) -> None:
        self._poll.stop()
        self._maintenance.stop()
        self.runner.shutdown(cancel=True)
        if not self._remember:
            super().closeEvent(event)
            return
        settings = self._settings()
        settings.setValue("window/geometry", self.saveGeometry())
        settings.setValue("window/page", self.stack.currentIndex())
        settings.sync()
        super().closeEvent(event)
