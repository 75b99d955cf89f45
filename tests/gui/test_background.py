"""Jobs run off the UI thread, but what they hold dies on the UI thread: a page or dialog whose last reference
ended in a worker thread would be destroyed there, and Qt crashes when a widget is destroyed off its thread."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest
from pytestqt.qtbot import QtBot

from ui import background
from ui.background import off_ui_thread


class _Finalized:
    """Records the thread its last reference died on."""

    def __init__(self, threads: list[str]) -> None:
        self.threads = threads

    def __del__(self) -> None:
        self.threads.append(threading.current_thread().name)


def _job(threads: list[str], *, fail: bool = False, seconds: float = 0.0) -> Callable[[], int]:
    held = _Finalized(threads)

    def job() -> int:
        time.sleep(seconds)
        if fail:
            raise ValueError(f"refused ({held!r} goes with the traceback)")
        return 7

    return job


T = TypeVar("T")


def _run(qtbot: QtBot, coroutine: Coroutine[Any, Any, T]) -> T:
    """Run ``coroutine`` on the console's (already running) qasync loop."""
    task = asyncio.ensure_future(coroutine)
    qtbot.waitUntil(task.done, timeout=10_000)
    return task.result()


def _settle(qtbot: QtBot, ms: int = 300) -> None:
    """Let the worker threads finish and the UI thread take their outcomes."""
    qtbot.wait(ms)
    gc.collect()


def test_a_jobs_references_die_on_the_ui_thread(qtbot: QtBot, event_loop: asyncio.AbstractEventLoop) -> None:
    threads: list[str] = []

    async def run_all() -> list[int]:
        return list(await asyncio.gather(*(off_ui_thread(_job(threads)) for _ in range(50))))

    assert _run(qtbot, run_all()) == [7] * 50
    _settle(qtbot)
    assert threads == [threading.current_thread().name] * 50
    assert not background._jobs and not background._outcomes


def test_a_failed_jobs_exception_and_traceback_die_on_the_ui_thread(
    qtbot: QtBot, event_loop: asyncio.AbstractEventLoop
) -> None:
    threads: list[str] = []

    async def run() -> None:
        with pytest.raises(ValueError, match="refused"):
            await off_ui_thread(_job(threads, fail=True))

    _run(qtbot, run())
    _settle(qtbot)
    assert threads == [threading.current_thread().name]


def test_a_cancelled_wait_keeps_the_job_alive_until_it_ends(
    qtbot: QtBot, event_loop: asyncio.AbstractEventLoop
) -> None:
    """A page closed while its refresh runs cancels the coroutine; the job still runs, and what it holds
    must not then die with it in the worker thread."""
    threads: list[str] = []

    async def wait_then_give_up() -> None:
        task = asyncio.ensure_future(off_ui_thread(_job(threads, seconds=0.2)))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    _run(qtbot, wait_then_give_up())
    gc.collect()
    assert threads == []  # the job still runs and holds it
    _settle(qtbot, 500)
    assert threads == [threading.current_thread().name]
    assert not background._jobs and not background._outcomes
