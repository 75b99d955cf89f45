"""``layerctl task …``"""

from __future__ import annotations

import click

from app.catalog.models import TaskState
from app.cli.main import comment_option, emit, state, table
from app.services.views import TaskInfo, TaskLogLineInfo


def _show(t: TaskInfo) -> str:
    lines = [
        f"Task {t.id}: {t.title}",
        f"  Kind:     {t.kind}",
        f"  State:    {t.state.value}{' (cancel requested)' if t.cancel_requested and not t.state.is_final else ''}",
        f"  Progress: {t.progress}% {t.message}",
        f"  Started by {t.started_by} at {t.created_at:%Y-%m-%d %H:%M:%S}",
    ]
    if t.ended_at:
        lines.append(f"  Ended:    {t.ended_at:%Y-%m-%d %H:%M:%S}")
    if t.error:
        lines.append(f"  Error:    {t.error}")
    return "\n".join(lines)


def _log(lines: list[TaskLogLineInfo]) -> str:
    return "\n".join(f"{line.at:%H:%M:%S} {line.level:<7} {line.text}" for line in lines) or "(no log lines)"


@click.group("task")
def task_group() -> None:
    """Tasks: long work with progress, logs and cancel."""


@task_group.command("list")
@click.option("--state", "states", multiple=True, type=click.Choice([s.value for s in TaskState]))
@click.option("--mine", is_flag=True, help="Only tasks I started.")
@click.option("--limit", default=100, show_default=True)
def list_(states: tuple[str, ...], mine: bool, limit: int) -> None:
    """List tasks, newest first."""
    services = state().services()
    tasks = services.tasks.list_tasks(
        states=[TaskState(s) for s in states], started_by=services.caller.username if mine else None, limit=limit
    )
    emit(tasks, lambda ts: table(
        [(t.id, t.state.value, f"{t.progress}%", t.title, t.started_by, f"{t.created_at:%Y-%m-%d %H:%M}") for t in ts],
        ["ID", "STATE", "DONE", "TITLE", "BY", "CREATED"]))


@task_group.command("show")
@click.argument("task_id", type=int, metavar="ID")
def show(task_id: int) -> None:
    """Show a task."""
    emit(state().services().tasks.get_task(task_id), _show)


@task_group.command("log")
@click.argument("task_id", type=int, metavar="ID")
@click.option("--after", default=0, help="Only lines after this line id (to follow a live log).")
def log(task_id: int, after: int) -> None:
    """Print a task's log."""
    emit(state().services().tasks.log(task_id, after_id=after), _log)


@task_group.command("cancel")
@click.argument("task_id", type=int, metavar="ID")
@comment_option
def cancel(task_id: int, comment: str) -> None:
    """Ask a task to stop (it stops within a second)."""
    info = state().services().tasks.cancel(task_id, comment=comment)
    emit(info, f"Task {info.id} is {info.state.value}.")


@task_group.command("purge")
@comment_option
def purge(comment: str) -> None:
    """Delete ended tasks older than the task retention setting."""
    count = state().services().tasks.purge_expired(comment=comment)
    emit({"deleted": count}, f"Deleted {count} old task(s).")


def register(cli: click.Group) -> None:
    cli.add_command(task_group)
