"""Blocking service calls run here, off the UI thread; the UI awaits them through asyncio."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

_executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="layerdesk-ui-io")


async def off_ui_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(*args)`` in a worker thread and return its result to the awaiting coroutine."""
    return await asyncio.get_running_loop().run_in_executor(_executor, fn, *args)


def shutdown() -> None:
    _executor.shutdown(wait=True, cancel_futures=True)
