"""GUI tests run offscreen with one qasync event loop per test (never stopped in teardown: that
would quit the QApplication for every later test)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import pytest
import qasync
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
    asyncio.set_event_loop(None)
    if failures:
        raise failures[0]
