"""``layerctl init|settings …|audit …|catalog check``"""

from __future__ import annotations

from datetime import datetime

import click

from app.catalog.models import AuditOutcome, TaskState
from app.cli.main import comment_option, emit, state, table
from app.errors import EnvironmentProblem
from app.services.views import AuditEntryInfo, SettingInfo


@click.command("init")
def init() -> None:
    """Create (or open) the LayerDesk home: catalog, repository, logs."""
    services = state().services()
    home = services.home
    result = {"home": str(home.root), "catalog": str(home.catalog), "repository": str(home.repository),
              "logs": str(home.logs), "user": services.caller.username,
              "roles": sorted(r.value for r in services.caller.roles)}
    emit(result, f"LayerDesk home: {home.root}\n  catalog:    {home.catalog}\n  repository: {home.repository}\n"
                 f"  logs:       {home.logs}\nYou are {services.caller.describe()}.")


@click.group("settings")
def settings_group() -> None:
    """System settings (retention, sign-in, shares)."""


def _settings(rows: list[SettingInfo]) -> str:
    return table([(s.key, s.value, s.default, s.description) for s in rows], ["KEY", "VALUE", "DEFAULT", "MEANING"])


@settings_group.command("list")
def settings_list() -> None:
    """Show every setting."""
    emit(state().services().settings.list_settings(), _settings)


@settings_group.command("set")
@click.argument("key")
@click.argument("value")
@comment_option
def settings_set(key: str, value: str, comment: str) -> None:
    """Change a setting."""
    info = state().services().settings.set(key, value, comment=comment)
    emit(info, f"{info.key} = {info.value}")


@click.group("audit")
def audit_group() -> None:
    """The audit log."""


def _audit(rows: list[AuditEntryInfo]) -> str:
    return table([(f"{e.at:%Y-%m-%d %H:%M:%S}", e.user, e.operation, e.object_name,
                   "" if e.outcome is AuditOutcome.SUCCESS else "DENIED", e.comment) for e in rows],
                 ["WHEN (UTC)", "USER", "OPERATION", "OBJECT", "OUTCOME", "COMMENT"])


@audit_group.command("list")
@click.option("--object", "object_name", metavar="NAME", help="Only entries about this object.")
@click.option("--user", metavar="NAME")
@click.option("--operation", metavar="OP", help="e.g. layer.create")
@click.option("--search", metavar="TEXT", help="Text in object, operation, user or comment.")
@click.option("--denied", is_flag=True, help="Only refused attempts.")
@click.option("--since", type=click.DateTime(), help="Only entries since this UTC time.")
@click.option("--limit", default=200, show_default=True)
def audit_list(object_name: str | None, user: str | None, operation: str | None, search: str | None,
               denied: bool, since: datetime | None, limit: int) -> None:
    """Search the audit log, newest first."""
    from datetime import UTC

    rows = state().services().audit.list_entries(
        object_name=object_name, user=user, operation=operation, search=search,
        outcome=AuditOutcome.DENIED if denied else None,
        since=since.replace(tzinfo=UTC) if since else None, limit=limit)
    emit(rows, _audit)


@audit_group.command("purge")
@comment_option
def audit_purge(comment: str) -> None:
    """Delete audit entries older than the audit retention setting."""
    count = state().services().audit.purge_expired(comment=comment)
    emit({"deleted": count}, f"Deleted {count} old audit entr{'y' if count == 1 else 'ies'}.")


@click.group("catalog")
def catalog_group() -> None:
    """The catalog database itself."""


@catalog_group.command("check")
def catalog_check() -> None:
    """Check the catalog's integrity (SQLite's check and foreign keys), as a task in a child process.
    Exits 1 when problems are found."""
    from app.catalog.maintenance import CatalogCheckTask

    cli_state = state()
    services = cli_state.services()
    runner = cli_state.runner()
    task_id = runner.submit(CatalogCheckTask(services.catalog.path))
    runner.wait(task_id)
    task = services.tasks.get_task(task_id)
    if task.state is TaskState.FAILED:
        raise EnvironmentProblem(f"Task {task_id} failed: {task.error}")
    result = task.result or {}
    problems = list(result.get("problems", []))
    emit({"task": task_id, "ok": not problems, "problems": problems, "size_bytes": result.get("size_bytes", 0)},
         task.message + ("" if not problems else "\n" + "\n".join(f"  {p}" for p in problems)))
    if problems:
        click.get_current_context().exit(1)


def register(cli: click.Group) -> None:
    for command in (init, settings_group, audit_group, catalog_group):
        cli.add_command(command)
