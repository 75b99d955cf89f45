r"""``layerctl export``, ``layerctl import`` and ``layerctl sync``: layers between installations, through an
export folder (a local folder or ``\\HOST\SHARE[\folder]``)."""

from __future__ import annotations

import contextlib

import click

from app.catalog.models import TaskState
from app.cli.main import F, Interrupted, comment_option, emit, read_password, show_progress, state, table
from app.errors import Conflict, EnvironmentProblem
from app.services.transfer import Destination, ImportPreview, TransferService
from app.services.views import TaskInfo

_SHARE_HELP = "The account for a share (DOMAIN\\user); the password is read from stdin with --password-stdin."


def _destination(path: str, username: str | None, password_stdin: bool) -> Destination:
    """Where the export folder is; a share's password comes from stdin (or a hidden prompt), never an argument."""
    if path.startswith(("\\\\", "//")):
        if not username:
            raise click.UsageError("a share needs an account: add --user USER (the password comes from stdin)")
        return Destination(path, username, read_password("Password", password_stdin))
    if username:
        raise click.UsageError("--user is only for a share (\\\\HOST\\SHARE); the destination is a local folder")
    return Destination(path)


def _wait(service: TransferService, task_id: int, what: str) -> TaskInfo:
    """Wait for the task (Ctrl-C cancels it); a task that failed or was cancelled becomes one clear error.
    ``done_with_errors`` (an import with conflicts) is returned: the caller reports it."""
    cli_state = state()
    runner, services = cli_state.runner(), cli_state.services()
    try:
        runner.wait(task_id)
    except KeyboardInterrupt as interrupt:
        click.echo(f"Canceling task {task_id}…", err=True)
        with contextlib.suppress(Conflict):
            services.tasks.cancel(task_id, comment="Ctrl-C in layerctl")
        if runner.wait(task_id) is TaskState.CANCELED:
            raise Interrupted(f"{what} canceled by Ctrl-C (task {task_id}).") from interrupt
    task = services.tasks.get_task(task_id)
    if task.state is TaskState.CANCELED:
        raise EnvironmentProblem(f"{what} was canceled (task {task_id}).")
    if task.state not in (TaskState.COMPLETE, TaskState.DONE_WITH_ERRORS):
        raise EnvironmentProblem(f"{what} failed (task {task_id}): {task.error or task.message}")
    return task


def _service() -> TransferService:
    return TransferService.for_services(state().services())


def _share_options(fn: F) -> F:
    fn = click.option("--password-stdin", is_flag=True, help="Read the share account's password from stdin.")(fn)
    return click.option("--user", "username", metavar="USER", help=_SHARE_HELP)(fn)


@click.command("export")
@click.option("--to", "to", required=True, metavar="PATH|\\\\HOST\\SHARE", help="The export folder.")
@click.argument("layers", nargs=-1, metavar="[LAYER[:VERSION] ...]")
@_share_options
@comment_option
def export(to: str, layers: tuple[str, ...], username: str | None, password_stdin: bool, comment: str) -> None:
    """Export layers (all without names) into an export folder, with their OS layers and prerequisites.
    Versions already there with the same checksum are not copied again."""
    destination = _destination(to, username, password_stdin)
    service = _service()
    show_progress(state().runner())
    task_id = service.start_export(state().runner(), destination, layers, comment=comment)
    task = _wait(service, task_id, f"Export to {to}")
    result = task.result or {}
    emit({**result, "task": task_id}, task.message)


@click.command("sync")
@click.option("--to", "to", required=True, metavar="PATH|\\\\HOST\\SHARE", help="The export folder to update.")
@_share_options
@comment_option
def sync(to: str, username: str | None, password_stdin: bool, comment: str) -> None:
    """Bring an export folder up to date with every layer here: only versions that changed since the last
    sync are copied; what is gone here is dropped from the folder."""
    destination = _destination(to, username, password_stdin)
    service = _service()
    show_progress(state().runner())
    task_id = service.start_sync(state().runner(), destination, comment=comment)
    task = _wait(service, task_id, f"Sync to {to}")
    emit({**(task.result or {}), "task": task_id}, task.message)


def _preview_text(preview: ImportPreview) -> str:
    words = {"new": "import", "here": "already here", "conflict": "CONFLICT"}
    rows = [(i.layer if not i.version else f"{i.layer}:{i.version}", words[i.action], i.reason)
            for i in preview.items]
    return table(rows, ["LAYER[:VERSION]", "ACTION", "WHY"])


@click.command("import")
@click.option("--from", "source", required=True, metavar="PATH|\\\\HOST\\SHARE", help="The export folder.")
@click.argument("layers", nargs=-1, metavar="[LAYER ...]")
@click.option("--preview", is_flag=True, help="Only say what would be imported, skipped or in conflict.")
@_share_options
@comment_option
def import_(source: str, layers: tuple[str, ...], preview: bool, username: str | None, password_stdin: bool,
            comment: str) -> None:
    """Import layers (all without names) from an export folder. Every checksum is verified before anything
    is imported; versions already here are skipped and a version of the same name with other content is
    reported as a conflict, never overwritten. A failed or cancelled import leaves nothing."""
    where = _destination(source, username, password_stdin)
    service = _service()
    if preview:
        emit(service.preview_import(where, layers), _preview_text)
        return
    show_progress(state().runner())
    task_id = service.start_import(state().runner(), where, layers, comment=comment)
    task = _wait(service, task_id, f"Import from {source}")
    emit({**(task.result or {}), "task": task_id, "state": task.state.value}, task.message)
    if task.state is TaskState.DONE_WITH_ERRORS:
        raise click.exceptions.Exit(1)


def register(cli: click.Group) -> None:
    for command in (export, sync, import_):
        cli.add_command(command)
