"""Runs tasks in worker threads and keeps their state, progress and log in the catalog.

Cancellation goes through the catalog (``Task.cancel_requested``), so ``layerctl task cancel`` in one
process stops a task running in another; a watcher thread polls it every quarter second. Progress and
log lines are written at most a few times a second. Listeners (the console) hear of every write.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import psutil
from sqlalchemy import select

from app.catalog.database import Catalog
from app.catalog.models import Task, TaskLogLine, TaskState, utcnow
from app.errors import LayerDeskError
from app.services.rbac import Caller, Operation
from app.services.views import to_jsonable
from app.tasks.base import CancelToken, LayerDeskTask, TaskCanceled, TaskContext, TaskResult

log = logging.getLogger(__name__)


def process_owner() -> str:
    """``host:pid:start-time`` of this process: unique even when a pid is reused."""
    return f"{socket.gethostname()}:{os.getpid()}:{int(psutil.Process().create_time())}"


def owner_alive(owner: str | None) -> bool:
    """Whether the process named by ``owner`` still runs (unknown hosts count as alive)."""
    if not owner:
        return False
    try:
        host, pid_text, started = owner.rsplit(":", 2)
        pid = int(pid_text)
    except ValueError:
        return False
    if host != socket.gethostname():
        return True
    try:
        return int(psutil.Process(pid).create_time()) == int(started)
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return False


@dataclass(frozen=True)
class TaskEvent:
    task_id: int
    state: TaskState
    progress: int
    message: str


Listener = Callable[[TaskEvent], None]


class _RunContext(TaskContext):
    def __init__(self, runner: TaskRunner, task_id: int, token: CancelToken) -> None:
        self.cancel = token
        self._runner = runner
        self._task_id = task_id
        self.task_id = task_id
        self._lock = threading.Lock()
        self._percent = 0
        self._message = ""
        self._lines: list[tuple[Any, str, str]] = []
        self._dirty = False
        self._last_write = 0.0
        # One flush at a time (worker or watcher), so lines and progress land in order.
        self._flush_lock = threading.Lock()

    def progress(self, percent: float, message: str = "") -> None:
        with self._lock:
            self._percent = max(0, min(100, int(percent)))
            if message:
                self._message = message
            self._dirty = True
        self._maybe_flush()

    def log(self, text: str, level: str = "INFO") -> None:
        with self._lock:
            self._lines.append((utcnow(), level.upper(), text))
            self._dirty = True
        self._maybe_flush()

    def _maybe_flush(self) -> None:
        if time.monotonic() - self._last_write >= self._runner.progress_interval_s:
            self.flush()

    def flush_if_due(self) -> None:
        """Write what a now quiet task reported (the watcher calls this), so a line logged just
        before a long silence does not wait for the task's next report."""
        self._maybe_flush()

    def flush(self) -> None:
        with self._flush_lock:
            with self._lock:
                if not self._dirty:
                    return
                percent, message, lines = self._percent, self._message, self._lines
                self._lines, self._dirty = [], False
                self._last_write = time.monotonic()
            try:
                with self._runner.catalog.write() as session:
                    row = session.get(Task, self._task_id)
                    if row is None:
                        return
                    row.progress = percent
                    row.message = message
                    for at, level, text in lines:
                        session.add(TaskLogLine(task_id=self._task_id, at=at, level=level, text=text))
                    state = row.state
            except BaseException:
                with self._lock:  # keep the lines for the next flush
                    self._lines[:0] = lines
                    self._dirty = True
                raise
        self._runner._notify(TaskEvent(self._task_id, state, percent, message))


class TaskRunner:
    """Runs :class:`LayerDeskTask`s for one caller in a small pool of worker threads."""

    def __init__(
        self,
        catalog: Catalog,
        caller: Caller,
        *,
        workers: int = 2,
        poll_s: float = 0.25,
        progress_interval_s: float = 0.25,
    ) -> None:
        self.catalog = catalog
        self.caller = caller
        self.poll_s = poll_s
        self.progress_interval_s = progress_interval_s
        self.owner = process_owner()
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="layerdesk-task")
        self._tokens: dict[int, CancelToken] = {}
        self._contexts: dict[int, _RunContext] = {}
        self._futures: dict[int, Future[None]] = {}
        self._listeners: list[Listener] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._watcher: threading.Thread | None = None

    # --- public --------------------------------------------------------------------------------

    def subscribe(self, listener: Listener) -> None:
        """Call ``listener`` (from a worker thread) after each change of a task's state or progress."""
        self._listeners.append(listener)

    def submit(self, task: LayerDeskTask) -> int:
        """Check, record and start ``task``; return its id. ``prepare()`` errors are raised here,
        before anything is recorded."""
        if self._closed.is_set():
            raise RuntimeError("the task runner has been shut down")
        self.caller.require(Operation.RUN_TASKS)
        task.prepare()
        with self.catalog.write() as session:
            row = Task(
                kind=task.kind,
                title=task.title,
                state=TaskState.PENDING,
                started_by=self.caller.username,
                owner=self.owner,
                created_at=utcnow(),
            )
            session.add(row)
            session.flush()
            task_id = row.id
        token = CancelToken()
        with self._lock:
            for done in [tid for tid, fut in self._futures.items() if fut.done()]:
                del self._futures[done]
            self._tokens[task_id] = token
            self._futures[task_id] = self._executor.submit(self._execute, task_id, task, token)
            self._ensure_watcher()
        self._notify(TaskEvent(task_id, TaskState.PENDING, 0, ""))
        return task_id

    def wait(self, task_id: int, timeout_s: float | None = None) -> TaskState:
        """Block until the task ends (for ``--wait`` and tests); return its final state."""
        with self._lock:
            future = self._futures.get(task_id)
        if future is not None:
            future.result(timeout=timeout_s)
        with self.catalog.read() as session:
            row = session.get(Task, task_id)
            if row is None:
                raise KeyError(task_id)
            return row.state

    def running(self) -> list[int]:
        with self._lock:
            return [tid for tid, fut in self._futures.items() if not fut.done()]

    def shutdown(self, *, cancel: bool = True, timeout_s: float = 10.0) -> None:
        """Stop the runner: cancel what runs (by default) and wait for the workers to end."""
        if cancel:
            with self._lock:
                tokens = list(self._tokens.values())
            for token in tokens:
                token.cancel()
        deadline = time.monotonic() + timeout_s
        with self._lock:
            futures = list(self._futures.values())
        for future in futures:
            remaining = max(0.0, deadline - time.monotonic())
            # The worker recorded its own failure in the task; here only the waiting matters.
            with contextlib.suppress(Exception):
                future.result(timeout=remaining)
        self._closed.set()
        self._executor.shutdown(wait=True, cancel_futures=True)
        if self._watcher is not None:
            self._watcher.join(timeout=self.poll_s * 4)

    # --- internals -----------------------------------------------------------------------------

    def _notify(self, event: TaskEvent) -> None:
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                log.exception("task listener failed")

    def _ensure_watcher(self) -> None:
        if self._watcher is None or not self._watcher.is_alive():
            self._watcher = threading.Thread(target=self._watch, name="layerdesk-task-cancel", daemon=True)
            self._watcher.start()

    def _watch(self) -> None:
        while not self._closed.wait(self.poll_s):
            self._flush_quiet_tasks()
            with self._lock:
                active = {tid: tok for tid, tok in self._tokens.items() if not tok.cancelled}
            if not active:
                if not self.running():
                    return
                continue
            try:
                with self.catalog.read() as session:
                    wanted = session.scalars(
                        select(Task.id).where(Task.id.in_(active), Task.cancel_requested.is_(True))
                    ).all()
            except LayerDeskError:
                log.warning("cannot poll cancel requests; will retry", exc_info=True)
                continue
            for tid in wanted:
                active[tid].cancel()

    def _flush_quiet_tasks(self) -> None:
        with self._lock:
            contexts = list(self._contexts.values())
        for ctx in contexts:
            try:
                ctx.flush_if_due()
            except LayerDeskError:
                log.warning("cannot write a task's progress; will retry", exc_info=True)

    def _execute(self, task_id: int, task: LayerDeskTask, token: CancelToken) -> None:
        ctx = _RunContext(self, task_id, token)
        with self.catalog.write() as session:
            row = session.get(Task, task_id)
            assert row is not None
            # ``token``: shutdown(cancel=True) cancels queued tasks too; they must not start.
            if token.cancelled or row.cancel_requested or row.state is TaskState.CANCELED:
                self._finish(session, row, TaskState.CANCELED, "Canceled before it started.")
                started = False
            else:
                row.state = TaskState.RUNNING
                row.started_at = utcnow()
                started = True
        if not started:
            try:
                task.discard()
            except Exception:
                log.exception("task %d (%s) could not undo what was prepared for it", task_id, task.kind)
            finally:
                self._forget(task_id)
            return
        with self._lock:
            self._contexts[task_id] = ctx
        self._notify(TaskEvent(task_id, TaskState.RUNNING, 0, ""))
        state, message, error, result = TaskState.FAILED, "", "", None
        try:
            outcome = task.run(ctx)
            if not isinstance(outcome, TaskResult):
                raise TypeError(f"task {task.kind} returned {type(outcome).__name__}, not a TaskResult")
            state, message = outcome.state, outcome.summary
            result = {"type": type(outcome).__name__, **to_jsonable(outcome)}
        except TaskCanceled:
            state, message = TaskState.CANCELED, "Canceled by the user."
            ctx.log("Canceled by the user.", "WARNING")
        except LayerDeskError as exc:
            state, message, error = TaskState.FAILED, str(exc), str(exc)
            ctx.log(str(exc), "ERROR")
        except Exception as exc:
            log.exception("task %d (%s) failed with an internal error", task_id, task.kind)
            error = f"Internal error in LayerDesk: {type(exc).__name__}: {exc}. The log has the details."
            state, message = TaskState.FAILED, error
            ctx.log("".join(traceback.format_exception(exc)), "ERROR")
        try:
            ctx.flush()
            with self.catalog.write() as session:
                row = session.get(Task, task_id)
                assert row is not None
                if state is TaskState.COMPLETE:
                    row.progress = 100
                row.result = result
                row.error = error
                self._finish(session, row, state, message)
        finally:
            self._forget(task_id)
        self._notify(TaskEvent(task_id, state, 100 if state is TaskState.COMPLETE else ctx._percent, message))

    @staticmethod
    def _finish(session: Any, row: Task, state: TaskState, message: str) -> None:
        row.state = state
        row.message = message
        row.ended_at = utcnow()

    def _forget(self, task_id: int) -> None:
        with self._lock:
            self._tokens.pop(task_id, None)
            self._contexts.pop(task_id, None)
