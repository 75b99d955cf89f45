"""The console's main window: navigation on the left, one page at a time, the signed-in
administrator and the running tasks in the status bar."""

from __future__ import annotations

import asyncio

from PySide6.QtCore import QSettings, QTimer
from PySide6.QtGui import QCloseEvent, QKeySequence, QShortcut
from PySide6.QtWidgets import QLabel, QListWidget, QMainWindow, QSplitter, QStackedWidget

from app import __version__
from app.catalog.models import TaskState
from app.errors import LayerDeskError
from app.services import Services
from ui.background import off_ui_thread
from ui.pages import ListPage, audit_page, layers_page, tasks_page, templates_page

TASK_POLL_MS = 2000


class MainWindow(QMainWindow):
    def __init__(self, services: Services, *, remember: bool = True) -> None:
        super().__init__()
        self.services = services
        #: Whether window geometry and page are restored and saved (not in smoke runs).
        self._remember = remember
        self.setWindowTitle(f"LayerDesk {__version__} – {services.home.root}")
        self.pages: list[ListPage] = [
            layers_page(services), templates_page(services), tasks_page(services), audit_page(services)
        ]
        self.nav = QListWidget()
        self.nav.setAccessibleName("Navigation")
        self.stack = QStackedWidget()
        for page in self.pages:
            self.nav.addItem(page.objectName().replace("_", " ").capitalize())
            self.stack.addWidget(page)
        self.nav.currentRowChanged.connect(self._show_page)
        splitter = QSplitter()
        splitter.addWidget(self.nav)
        splitter.addWidget(self.stack)
        splitter.setStretchFactor(0, 0)
        splitter.setStretchFactor(1, 1)
        splitter.setSizes([180, 920])
        self.setCentralWidget(splitter)

        caller = services.caller
        roles = ", ".join(sorted(r.value for r in caller.roles)) or "no role"
        who = QLabel(f"Signed in as <b>{caller.username}</b> ({roles})"
                     + (" – built-in administrator of this catalog" if caller.builtin else ""))
        self.running = QLabel("No task running")
        self.statusBar().addWidget(who, 1)
        self.statusBar().addPermanentWidget(self.running)

        QShortcut(QKeySequence.StandardKey.Refresh, self, activated=self.current_page().refresh)
        self._polling: asyncio.Future[None] | None = None
        self._poll = QTimer(self, interval=TASK_POLL_MS, timeout=self._poll_tasks)
        self._poll.start()
        self._restore()
        self.nav.setCurrentRow(min(max(self._saved_page, 0), len(self.pages) - 1))

    def current_page(self) -> ListPage:
        return self.pages[self.stack.currentIndex()]

    def _show_page(self, row: int) -> None:
        self.stack.setCurrentIndex(row)
        self.pages[row].refresh()

    def _poll_tasks(self) -> None:
        if self._polling is None or self._polling.done():
            self._polling = asyncio.ensure_future(self._update_running())

    async def _update_running(self) -> None:
        try:
            active = await off_ui_thread(
                lambda: self.services.tasks.list_tasks(
                    states=[TaskState.PENDING, TaskState.RUNNING, TaskState.CANCELING]))
        except LayerDeskError as exc:
            self.running.setText(f"Tasks unavailable: {exc}")
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
        if not self._remember:
            super().closeEvent(event)
            return
        settings = self._settings()
        settings.setValue("window/geometry", self.saveGeometry())
        settings.setValue("window/page", self.stack.currentIndex())
        settings.sync()
        super().closeEvent(event)
