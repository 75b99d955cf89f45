"""The UI thread keeps turning while a publish runs: a 20 ms timer ticks all through a real VHDX publish
started from the Templates page, and the compositing runs in a child process, not in the console's
threads. (How long the worst stall is, is measured by benchmarks/ui_latency.py, not asserted here.)"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import psutil
from PySide6.QtCore import QTimer
from pytestqt.qtbot import QtBot

from app.catalog.models import DiskFormat, LayerType, TaskState
from app.services import Services
from app.services.templates import TemplateSpec
from app.tasks.runner import TaskRunner
from tests.support.repository_checks import make_tree
from tests.unit.test_console_queries import import_stack
from ui.templates_page import AskDialog, TemplatesPage

#: Far above any stall a healthy console shows, far below what blocking on the publish would cause.
FROZEN_S = 1.0


def _big_layer(services: Services, root: Path) -> None:
    files = {f"Program Files/Big/data{i:02}.bin": os.urandom(2 * 1024 * 1024) for i in range(40)}
    services.layers.create_layer("Big", LayerType.APP, os_layer="Win11")
    runner = TaskRunner(services.catalog, services.caller)
    try:
        task = services.imports.start_import(runner, "Big", "1", make_tree(root / "big", files))
        assert runner.wait(task, 120) is TaskState.COMPLETE
    finally:
        runner.shutdown()


def test_the_ui_thread_keeps_turning_during_a_publish(
    qtbot: QtBot, event_loop: asyncio.AbstractEventLoop, admin: Services, tmp_path: Path
) -> None:
    import_stack(admin, tmp_path)
    _big_layer(admin, tmp_path)
    admin.templates.create_template("Busy", TemplateSpec(os="Win11:1", platform="Citrix:1", apps=("Office:1", "Big:1"),
                                                         disk_format=DiskFormat.VHDX, size_gb=1))
    page = TemplatesPage(admin)
    qtbot.addWidget(page)
    page.show()
    with qtbot.waitSignal(page.loaded, timeout=5000):
        page.refresh()
    assert page.select_template("Busy")
    ticks: list[float] = []
    workers: set[int] = set()

    def tick() -> None:
        ticks.append(time.monotonic())
        for child in psutil.Process().children(recursive=True):
            try:
                if "app.tasks.worker" in " ".join(child.cmdline()):
                    workers.add(child.pid)
            except psutil.Error:
                pass

    timer = QTimer(interval=20, timeout=tick)
    page.publish_button.click()
    qtbot.waitUntil(lambda: isinstance(page.dialog, AskDialog) and page.dialog.isVisible(), timeout=5000)
    assert isinstance(page.dialog, AskDialog)
    timer.start()
    started = time.monotonic()
    with qtbot.waitSignal(page.publish_finished, timeout=120_000) as finished:
        page.dialog.ok.click()
    ended = time.monotonic()
    timer.stop()
    page.shutdown()
    assert finished.args is not None and finished.args[1] is TaskState.COMPLETE, page.note.text()
    assert ended - started > 0.5, "the publish was too quick to say anything"
    assert workers, "the compositing ran in a child process"
    gaps = [b - a for a, b in zip([started, *ticks], [*ticks, ended], strict=True)]
    assert max(gaps) < FROZEN_S, f"the UI thread stood still for {max(gaps):.2f} s"
    assert len(ticks) > (ended - started) / 0.2, "the timer ticked all through"
