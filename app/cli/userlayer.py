"""``layerctl userlayer …``: where users' User Layers live."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from app.cli.main import emit, format_size, read_password, state, table

if TYPE_CHECKING:
    from app.services.storage import UserLayerReport


@click.group("userlayer")
def userlayer_group() -> None:
    """User Layers: where each user's layer lives."""


@userlayer_group.command("where")
@click.option("--user", required=True, metavar="USER", help="user, DOMAIN\\user, user@domain or a SID.")
@click.option("--template", required=True, metavar="NAME", help="The image template (its OS layer picks the folder).")
def where(user: str, template: str) -> None:
    """Where USER's User Layer for image template NAME lives: the highest-priority storage location
    assigned to one of the user's groups (nested groups included)."""
    from app.services.storage import UserLayerPlace

    found = state().services().storage.user_layer_location(user, template)

    def human(p: UserLayerPlace) -> str:
        lines = [
            p.folder,
            f"  user:     {p.user} ({p.user_sid})",
            f"  location: {p.location} (priority {p.priority}, via group {p.group_name})",
            f"  OS layer: {p.os_layer} (id {p.os_layer_id}, from template {p.template})",
            f"  size:     {p.size_gb} GB",
        ]
        if p.also:
            lines.append(f"  not used (lower priority): {', '.join(p.also)}")
        return "\n".join(lines)

    emit(found, human)


@userlayer_group.command("list")
@click.argument("location", metavar="LOCATION|\\\\SERVER\\SHARE")
@click.option("--user", "account", required=True, metavar="USER",
              help="The account to read the share with (DOMAIN\\user or user@domain).")
@click.option("--password-stdin", is_flag=True, help="Read the account's password from stdin.")
@click.option("--orphans", is_flag=True, help="Only the User Layers nobody can use any more.")
def list_user_layers(location: str, account: str, password_stdin: bool, orphans: bool) -> None:
    """The User Layers on a storage location's share (by the location's name or path): whose, for which
    OS layer, size and last write; orphans are those whose user is no longer in the directory (deleted
    or renamed) or whose OS layer was deleted or renamed. Nothing is deleted."""
    password = read_password(f"Password for {account}", password_stdin)
    report = state().services().storage.list_user_layers(location, account, password)
    if orphans:
        from dataclasses import replace

        report = replace(report, folders=report.orphans)

    def human(r: UserLayerReport) -> str:
        rows = [(f"{f.domain}\\{f.username}" if f.username else "-",
                 f"{f.os_layer_id}_{f.os_layer_name}" if f.os_layer_id is not None else "-",
                 format_size(f.size_bytes), f.last_write.strftime("%Y-%m-%d %H:%M") if f.last_write else "-",
                 f.status.value.replace("_", " "), f.reason or f.relative)
                for f in r.folders]
        where = f"{r.location} ({r.path})" if r.location else r.path
        if not rows:
            return f"No {'orphaned ' if orphans else ''}User Layers on {where}."
        return (f"User Layers on {where}: {len(r.folders)} ({len(r.orphans)} orphaned)\n"
                + table(rows, ["USER", "OS LAYER", "SIZE", "LAST WRITE", "STATUS", "WHY / FOLDER"]))

    emit(report, human)


def register(cli: click.Group) -> None:
    cli.add_command(userlayer_group)
