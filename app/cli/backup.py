"""``layerctl backup``, ``layerctl restore``, ``layerctl logs bundle`` and ``layerctl maintenance run``."""

from __future__ import annotations

from typing import Any

import click

from app.cli.main import comment_option, emit, finish_task, show_progress, state
from app.services.backup import RestoreReport, backup_service
from app.services.maintenance import run_maintenance
from app.services.rbac import Operation
from app.services.support import write_log_bundle


@click.command("backup")
@click.option("--to", "to", required=True, metavar="PATH",
              help="A new folder for the backup, or an existing folder to create one (layerdesk-backup-TIME) in.")
@comment_option
def backup(to: str, comment: str) -> None:
    """Back up the catalog and the layer repository (Administrator; safe while LayerDesk works).
    Ctrl-C cancels; a cancelled or failed backup leaves nothing."""
    services = state().services()
    runner = state().runner()
    show_progress(runner)
    task_id = backup_service(services).backup(runner, to, comment=comment)
    task = finish_task(runner, task_id, "The backup")
    result: dict[str, Any] = dict(task.result or {})
    result.pop("type", None)
    emit(result, lambda r: str(r.get("summary") or task.message))


def _restored(report: RestoreReport) -> str:
    lines = [f"Restored the catalog and layer repository from {report.source} (made {report.created_at} by "
             f"{report.created_by}; catalog schema {report.schema_from}"
             + (f", upgraded to {report.schema_now})." if report.schema_now != report.schema_from else ")."),
             f"The replaced catalog is kept at {report.replaced_catalog}."]
    lines.extend(report.notes)
    return "\n".join(lines)


@click.command("restore")
@click.option("--from", "source", required=True, metavar="PATH", help="The backup folder.")
@comment_option
def restore(source: str, comment: str) -> None:
    """Replace the catalog and layer repository with a backup's (Administrator). Everything is verified
    before anything is replaced; refused while tasks run. Passwords are not in backups: see the output."""
    services = state().services()
    runner = state().runner()
    show_progress(runner)
    service = backup_service(services)
    task_id = service.restore(runner, source, comment=comment)
    task = finish_task(runner, task_id, "Verifying the backup")
    staging = str((task.result or {}).get("staging", ""))
    report = service.complete_restore(staging, comment=comment)
    emit(report, _restored)


@click.group("logs")
def logs_group() -> None:
    """LayerDesk's log files."""


@logs_group.command("bundle")
@click.option("--to", "to", required=True, metavar="FILE.zip", help="The zip file to write.")
def bundle(to: str) -> None:
    """Write a support bundle: logs, task logs, versions, settings, junction and connector configurations
    (never a password or token), catalog schema and row counts."""
    result = write_log_bundle(state().services(), to)
    emit(result, lambda r: f"Wrote the support bundle {r.path} ({r.bytes} bytes, {len(r.members)} files). "
                           "It holds no passwords; look it over before you send it.")


@click.group("maintenance")
def maintenance_group() -> None:
    """Periodic housekeeping (the console runs it every few hours)."""


@maintenance_group.command("run")
def maintenance_run() -> None:
    """Delete ended tasks, audit entries and rotated log files older than their retention settings, and what
    interrupted work left in the home a day ago or more (Administrator; audited as the system)."""
    services = state().services()
    services.caller.require(Operation.MANAGE_ALL_TASKS)
    services.caller.require(Operation.EDIT_SETTINGS)
    report = run_maintenance(services.home, services.catalog, services.secrets)
    emit(report, lambda r: f"Deleted {r.tasks_deleted} task(s), {r.audit_entries_deleted} audit entr"
                           f"{'y' if r.audit_entries_deleted == 1 else 'ies'}, {len(r.log_files_deleted)} "
                           f"old log file(s) and {len(r.leftovers_deleted)} leftover(s) of interrupted work.")



def register(cli: click.Group) -> None:
    for command in (backup, restore, logs_group, maintenance_group):
        cli.add_command(command)
