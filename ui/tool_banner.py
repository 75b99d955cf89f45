"""A warning strip at the top of the console, shown at start-up when engine tools are missing: which
operations are unavailable on this machine and why, before the administrator tries one (publishing
refuses them up front too, see :meth:`app.services.publishing.PublishingService.publish`)."""

from __future__ import annotations

import asyncio
import html
import logging

from PySide6.QtCore import Signal
from PySide6.QtWidgets import QFrame, QHBoxLayout, QLabel, QPushButton
from shiboken6 import isValid

from app.engine.toolcheck import Unavailable, unavailable_operations
from app.errors import LayerDeskError
from app.services import Services
from ui.background import off_ui_thread
from ui.pages import spawn

log = logging.getLogger(__name__)


def describe(found: list[Unavailable]) -> str:
    """The banner's text (rich text): one line per operation, with the tools it lacks and why."""
    lines = []
    for item in found:
        tools = ", ".join(f"<b>{html.escape(t.name, quote=False)}</b>" for t in item.missing)
        reasons = "; ".join(html.escape(t.problem, quote=False) for t in item.missing if t.problem)
        operation = html.escape(item.operation, quote=False)
        lines.append(f"• {operation}: needs {tools}" + (f" – {reasons}" if reasons else ""))
    return ("<b>Some operations are unavailable on this machine.</b><br>" + "<br>".join(lines)
            + "<br>Install the missing tools and restart LayerDesk; System › About lists every engine tool.")


class EngineToolsBanner(QFrame):
    """Hidden until :meth:`check` finds something missing. ``checked`` carries what was found."""

    checked = Signal(list)

    def __init__(self, services: Services) -> None:
        super().__init__()
        self.setObjectName("engine_tools_banner")
        self.setFrameShape(QFrame.Shape.StyledPanel)
        self.setStyleSheet("#engine_tools_banner { background: #fff4ce; border: 1px solid #e0b000; }")
        self.services = services
        self.text = QLabel()
        self.text.setWordWrap(True)
        self.dismiss = QPushButton("Dismiss")
        self.dismiss.clicked.connect(self.hide)
        layout = QHBoxLayout(self)
        layout.addWidget(self.text, 1)
        layout.addWidget(self.dismiss)
        self.hide()
        self._checking: asyncio.Future[None] | None = None

    def check(self) -> None:
        """Probe the engine's tools off the UI thread, then show or hide the banner."""
        if self._checking is None or self._checking.done():
            self._checking = spawn(self._check())

    async def _check(self) -> None:
        try:
            tools = await off_ui_thread(self.services.repository.engine_tools)
        except LayerDeskError as exc:  # e.g. a role that may not read: nothing to warn about here
            log.info("engine tools not checked: %s", exc)
            return
        found = unavailable_operations(tools)
        if not isValid(self):
            return
        if found:
            self.text.setText(describe(found))
        self.setVisible(bool(found))
        self.checked.emit(found)
