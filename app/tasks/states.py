"""The states of a task, kept apart from the catalog's models: a worker process imports the task contract
without loading SQLAlchemy (the catalog's models re-export them)."""

from __future__ import annotations

import enum

__all__ = ["FINAL_TASK_STATES", "TaskState"]


class TaskState(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    CANCELING = "canceling"
    CANCELED = "canceled"
    COMPLETE = "complete"
    DONE_WITH_ERRORS = "done_with_errors"
    FAILED = "failed"
    ACTION_REQUIRED = "action_required"

    @property
    def is_final(self) -> bool:
        return self in FINAL_TASK_STATES


FINAL_TASK_STATES = frozenset(
    {
        TaskState.CANCELED,
        TaskState.COMPLETE,
        TaskState.DONE_WITH_ERRORS,
        TaskState.FAILED,
        TaskState.ACTION_REQUIRED,
    }
)
