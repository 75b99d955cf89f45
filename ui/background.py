"""Blocking service calls run here, off the UI thread; the UI awaits them through asyncio.

Every reference a job holds (its callable, which often closes over a page or dialog, its arguments, its
result or exception) is released on the UI thread, never in the worker thread. A Qt object whose last
Python reference dies on another thread is destroyed there, and Qt widgets must not be: that crashes the
process. So the worker thread only ever holds a job's key; the job itself stays in :data:`_jobs` until the
UI thread takes its outcome, even when the awaiting coroutine was cancelled meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

_executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="layerdesk-ui-io")
_keys = itertools.count()
_lock = threading.Lock()
#: key → (the loop to answer on, callable, arguments, the future the coroutine awaits)
_jobs: dict[int, tuple[asyncio.AbstractEventLoop, Callable[..., Any], tuple[Any, ...], asyncio.Future[Any]]] = {}
#: key → (worked, result or exception), set by the worker thread, taken on the UI thread
_outcomes: dict[int, tuple[bool, Any]] = {}


async def off_ui_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(*args)`` in a worker thread and return its result to the awaiting coroutine."""
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[T] = loop.create_future()
    key = next(_keys)
    with _lock:
        _jobs[key] = (loop, fn, args, waiter)
    _executor.submit(_work, key)
    return await waiter


def _work(key: int) -> None:
    """In a worker thread: run job ``key``, park its outcome, drop every reference, then wake the UI thread."""
    with _lock:
        loop, fn, args = _jobs[key][:3]  # not the future: it will hold the result
    try:
        outcome: tuple[bool, Any] = (True, fn(*args))
    except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine, which raises it
        outcome = (False, exc)
    del fn, args
    with _lock:
        _outcomes[key] = outcome
    del outcome
    with contextlib.suppress(RuntimeError):  # the loop was closed: the job stays parked, never freed here
        loop.call_soon_threadsafe(_settle, key)


def _settle(key: int) -> None:
    """On the UI thread: hand job ``key``'s outcome to its coroutine; the job's references end here."""
    with _lock:
        _, _, _, waiter = _jobs.pop(key)
        worked, value = _outcomes.pop(key)
    if waiter.done():  # the coroutine was cancelled while the job ran
        return
    if worked:
        waiter.set_result(value)
    else:
        waiter.set_exception(value)


def shutdown() -> None:
    _executor.shutdown(wait=True, cancel_futures=True)
