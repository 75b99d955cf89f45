"""``layerctl elastic …``"""

from __future__ import annotations

import click

from app.catalog.models import PrincipalKind
from app.cli.main import comment_option, emit, state, table


@click.group("elastic")
def elastic_group() -> None:
    """Elastic layer assignments and machine associations."""


@elastic_group.command("assign")
@click.argument("ref", metavar="LAYER[:VERSION]")
@click.option("--user", "user_sid", metavar="SID", help="Assign to this AD user.")
@click.option("--group", "group_sid", metavar="SID", help="Assign to this AD group.")
@click.option("--name", required=True, metavar="NAME", help="The user's or group's name (LAB\\alice).")
@comment_option
def assign(ref: str, user_sid: str | None, group_sid: str | None, name: str, comment: str) -> None:
    """Assign an app layer version elastically to an AD user or group."""
    if bool(user_sid) == bool(group_sid):
        raise click.UsageError("give exactly one of --user SID or --group SID")
    kind = PrincipalKind.AD_USER if user_sid else PrincipalKind.AD_GROUP
    info = state().services().assignments.assign(ref, kind, user_sid or group_sid or "", name, comment=comment)
    emit(info, f"Assigned {info.layer}:{info.version} to {info.principal_name}.")


@elastic_group.command("unassign")
@click.argument("layer")
@click.argument("principal", metavar="SID|NAME")
@comment_option
def unassign(layer: str, principal: str, comment: str) -> None:
    """Remove a layer's elastic assignment from a user or group."""
    state().services().assignments.unassign(layer, principal, comment=comment)
    emit({"unassigned": layer, "principal": principal}, f"Unassigned {layer} from {principal}.")


@elastic_group.command("list")
@click.option("--layer", metavar="NAME")
@click.option("--principal", metavar="SID|NAME")
def list_(layer: str | None, principal: str | None) -> None:
    """List elastic assignments."""
    rows = state().services().assignments.list_assignments(layer=layer, principal=principal)
    emit(rows, lambda rs: table(
        [(r.layer, r.version, r.principal_kind.value, r.principal_name, r.principal_sid) for r in rs],
        ["LAYER", "VERSION", "KIND", "NAME", "SID"]))


@elastic_group.group("machine")
def machine_group() -> None:
    """Machine associations: AD groups tied to machine-name patterns."""


@machine_group.command("add")
@click.argument("group_sid", metavar="GROUP_SID")
@click.argument("pattern")
@click.option("--name", required=True, metavar="NAME", help="The group's name.")
@comment_option
def machine_add(group_sid: str, pattern: str, name: str, comment: str) -> None:
    """Tie a group to a machine-name wildcard pattern (VDA-FIN-*)."""
    info = state().services().assignments.add_machine_association(group_sid, name, pattern, comment=comment)
    emit(info, f"Associated {info.group_name} with {info.pattern} (id {info.id}).")


@machine_group.command("remove")
@click.argument("association_id", type=int, metavar="ID")
@comment_option
def machine_remove(association_id: int, comment: str) -> None:
    """Remove a machine association."""
    state().services().assignments.remove_machine_association(association_id, comment=comment)
    emit({"removed": association_id}, f"Removed machine association {association_id}.")


@machine_group.command("list")
def machine_list() -> None:
    """List machine associations."""
    rows = state().services().assignments.list_machine_associations()
    emit(rows, lambda rs: table([(r.id, r.group_name, r.pattern, r.group_sid) for r in rs],
                                ["ID", "GROUP", "PATTERN", "SID"]))


def register(cli: click.Group) -> None:
    cli.add_command(elastic_group)
