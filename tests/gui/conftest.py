"""GUI tests run offscreen with one qasync event loop per test (never stopped in teardown: that
would quit the QApplication for every later test)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import pytest
import qasync
from PySide6.QtCore import QEventLoop
from PySide6.QtWidgets import QApplication


@pytest.fixture
def event_loop(qapp: QApplication) -> Iterator[asyncio.AbstractEventLoop]:
    loop = qasync.QEventLoop(qapp, already_running=True)
    asyncio.set_event_loop(loop)
    failures: list[BaseException] = []

    def handler(_loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
        failures.append(context.get("exception") or RuntimeError(str(context.get("message"))))  # type: ignore[arg-type]

    loop.set_exception_handler(handler)
    yield loop
    _cancel_pending(loop, qapp)
    asyncio.set_event_loop(None)
    if failures:
        raise failures[0]


def _cancel_pending(loop: asyncio.AbstractEventLoop, qapp: QApplication) -> None:
    """Cancel the test's tasks still waiting (a search typed at the end, a refresh) and let them end while
    their loop is the running one: every qasync loop shares the Qt event dispatcher, so a task left behind
    would take its next step in a later test, under that test's loop ("attached to a different loop")."""
    pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
    for task in pending:
        task.cancel()
    deadline = time.monotonic() + 5
    while any(not task.done() for task in pending) and time.monotonic() < deadline:
        qapp.processEvents(QEventLoop.ProcessEventsFlag.AllEvents, 50)
