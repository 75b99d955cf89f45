"""Long work as tasks: the task contract, the runner, and subprocess workers."""

from app.tasks.base import CancelToken, LayerDeskTask, TaskCanceled, TaskContext, TaskResult
from app.tasks.runner import TaskEvent, TaskRunner

__all__ = [
    "CancelToken",
    "LayerDeskTask",
    "TaskCanceled",
    "TaskContext",
    "TaskEvent",
    "TaskResult",
    "TaskRunner",
]
