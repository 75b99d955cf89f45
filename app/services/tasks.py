"""Tasks as the administrator sees them: list, details, live log, cancel, retention, crash recovery."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app.catalog.database import Catalog
from app.catalog.models import FINAL_TASK_STATES, Task, TaskLogLine, TaskState, utcnow
from app.errors import Conflict, NotFound
from app.services.base import Service
from app.services.rbac import Operation
from app.services.settings import read_setting
from app.services.views import TaskInfo, TaskLogLineInfo

INTERRUPTED = "Interrupted: LayerDesk stopped while this task ran. Start it again."


def task_info(row: Task) -> TaskInfo:
    return TaskInfo(
        id=row.id,
        kind=row.kind,
        title=row.title,
        state=row.state,
        progress=row.progress,
        message=row.message,
        started_by=row.started_by,
        created_at=row.created_at,
        started_at=row.started_at,
        ended_at=row.ended_at,
        error=row.error,
        result=row.result,
        cancel_requested=row.cancel_requested,
    )


def recover_interrupted(catalog: Catalog) -> list[int]:
    """Mark failed every unfinished task whose process is gone; return their ids.

    Runs when LayerDesk starts, before any caller acts: a task is never left "running" by a crash.
    """
    # Imported here: app.tasks.runner imports app.services, so a module-level import makes
    # ``import app.tasks`` (before app.services) fail with a circular import.
    from app.tasks.runner import owner_alive

    with catalog.write() as session:
        rows = session.scalars(select(Task).where(Task.state.not_in(FINAL_TASK_STATES))).all()
        lost = [row for row in rows if not owner_alive(row.owner)]
        for row in lost:
            row.state = TaskState.FAILED
            row.error = INTERRUPTED
            row.message = INTERRUPTED
            row.ended_at = utcnow()
            session.add(TaskLogLine(task_id=row.id, level="ERROR", text=INTERRUPTED, at=utcnow()))
        return [row.id for row in lost]


class TaskService(Service):
    def list_tasks(
        self,
        *,
        states: Sequence[TaskState] = (),
        started_by: str | None = None,
        kind: str | None = None,
        limit: int = 500,
    ) -> list[TaskInfo]:
        """Newest first."""
        with self._read() as session:
            query = select(Task).order_by(Task.id.desc()).limit(max(1, min(limit, 100_000)))
            if states:
                query = query.where(Task.state.in_([TaskState(s) for s in states]))
            if started_by:
                query = query.where(Task.started_by == started_by)
            if kind:
                query = query.where(Task.kind == kind)
            return [task_info(row) for row in session.scalars(query)]

    def get_task(self, task_id: int) -> TaskInfo:
        with self._read() as session:
            return task_info(self._row(session, task_id))

    def log(self, task_id: int, *, after_id: int = 0) -> list[TaskLogLineInfo]:
        """The task's log lines after ``after_id`` (pass the last id seen to follow a live log)."""
        with self._read() as session:
            self._row(session, task_id)
            rows = session.scalars(
                select(TaskLogLine)
                .where(TaskLogLine.task_id == task_id, TaskLogLine.id > after_id)
                .order_by(TaskLogLine.id)
            )
            return [TaskLogLineInfo(r.id, r.at, r.level, r.text) for r in rows]

    def cancel(self, task_id: int, *, comment: str = "") -> TaskInfo:
        """Ask a task to stop. Anyone who may run tasks cancels their own; others' need Administrator."""
        with self._change(Operation.RUN_TASKS, "task.cancel", "task", str(task_id), comment) as change:
            row = self._row(change.session, task_id)
            if row.started_by != self.caller.username:
                change.require(Operation.MANAGE_ALL_TASKS)
            if row.state in FINAL_TASK_STATES:
                raise Conflict(f"Task {task_id} has already ended ({row.state.value}); nothing to cancel.")
            change.object_name = f"{task_id} {row.title}"
            change.details = {"state": row.state.value}
            row.cancel_requested = True
            if row.state is TaskState.PENDING:
                row.state = TaskState.CANCELED
                row.message = "Canceled before it started."
                row.ended_at = utcnow()
            elif row.state is TaskState.RUNNING:
                row.state = TaskState.CANCELING
                row.message = "Canceling…"
            return task_info(row)

    def purge_expired(self, *, comment: str = "") -> int:
        """Delete ended tasks (and their logs) older than the retention setting; return how many."""
        with self._change(Operation.MANAGE_ALL_TASKS, "task.purge", "task", "retention", comment) as change:
            days = int(read_setting(change.session, "task_retention_days"))
            cutoff = self._now() - timedelta(days=days)
            ids = change.session.scalars(
                select(Task.id).where(Task.state.in_(FINAL_TASK_STATES), Task.ended_at < cutoff)
            ).all()
            if ids:
                change.session.execute(delete(TaskLogLine).where(TaskLogLine.task_id.in_(ids)))
                change.session.execute(delete(Task).where(Task.id.in_(ids)))
            change.details = {"deleted": len(ids), "retention_days": days}
            return len(ids)

    @staticmethod
    def _row(session: Session, task_id: int) -> Task:
        row = session.get(Task, task_id)
        if row is None:
            raise NotFound(f"There is no task {task_id}. `layerctl task list` shows the tasks.")
        return row
