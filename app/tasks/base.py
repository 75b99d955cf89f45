"""What a task is: ``prepare()`` checks and plans without side effects, ``run(ctx)`` does the work,
reporting progress and log lines and honouring cancellation, and returns a typed :class:`TaskResult`.
"""

from __future__ import annotations

import abc
import threading
from dataclasses import dataclass
from typing import ClassVar

from app.tasks.states import TaskState


class TaskCanceled(Exception):
    """Raised inside a task when the user cancelled it."""


class CancelToken:
    """Set by the runner when a cancel is requested; checked by the task often (at least every second)."""

    def __init__(self) -> None:
        self._event = threading.Event()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def cancel(self) -> None:
        self._event.set()

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise TaskCanceled()

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; return True at once if cancelled meanwhile."""
        return self._event.wait(seconds)


@dataclass(frozen=True)
class TaskResult:
    """Base of every task's result. ``state`` lets a task end as ``done_with_errors`` or
    ``action_required`` instead of ``complete``."""

    summary: str = ""
    state: TaskState = TaskState.COMPLETE


class TaskContext(abc.ABC):
    """Handed to :meth:`LayerDeskTask.run`."""

    cancel: CancelToken
    #: The catalog id of the task being run (``None`` outside a runner).
    task_id: int | None = None

    @abc.abstractmethod
    def progress(self, percent: float, message: str = "") -> None:
        """Report 0–100 % done; throttled by the runner to a few writes per second."""

    @abc.abstractmethod
    def log(self, text: str, level: str = "INFO") -> None:
        """Append a line to the task's log."""


class ProgressSpan(TaskContext):
    """``ctx`` with its progress mapped into ``start``–``end`` % (for a task made of steps, such as
    compositing and then a delivery)."""

    def __init__(self, ctx: TaskContext, start: float, end: float) -> None:
        self._ctx = ctx
        self._start = start
        self._end = end
        self.cancel: CancelToken = ctx.cancel
        self.task_id = ctx.task_id

    def progress(self, percent: float, message: str = "") -> None:
        self._ctx.progress(self._start + (self._end - self._start) * max(0.0, min(percent, 100.0)) / 100.0, message)

    def log(self, text: str, level: str = "INFO") -> None:
        self._ctx.log(text, level)


class LayerDeskTask(abc.ABC):
    """A unit of long work. Subclasses set :attr:`kind` and implement :meth:`run`."""

    kind: ClassVar[str]

    def __init__(self, title: str) -> None:
        self.title = title

    def prepare(self) -> None:  # noqa: B027 - optional hook; the default has nothing to check
        """Validate and plan without side effects; raise a :class:`app.errors.UserError` to refuse."""

    def discard(self) -> None:  # noqa: B027 - optional hook; most tasks prepare nothing outside themselves
        """Called instead of :meth:`run` when the task is cancelled before it started: undo what was set up
        for it when it was submitted (e.g. a catalog row it was going to fill)."""

    @abc.abstractmethod
    def run(self, ctx: TaskContext) -> TaskResult:
        """Do the work; raise :class:`TaskCanceled` (via ``ctx.cancel``) when cancelled."""
