"""``layerctl elastic …``"""

from __future__ import annotations

import contextlib

import click

from app.catalog.models import PrincipalKind
from app.cli.main import F, comment_option, emit, read_password, show_progress, state, table


@click.group("elastic")
def elastic_group() -> None:
    """Elastic layer assignments and machine associations."""


def _principal(user: str | None, group: str | None, name: str | None) -> tuple[PrincipalKind, str, str]:
    """Who ``--user``/``--group`` names: ``(kind, SID, DOMAIN\\name)``. Names (``alice``, ``LAB\\alice``,
    ``alice@lab.test``, group names) are looked up in the directory; a SID with ``--name`` is taken as
    given (no directory needed), a SID without it is looked up for its name."""
    from app.directory import PrincipalType
    from app.directory.ldapfilter import is_sid
    from app.services.directory import DirectoryLookup

    if bool(user) == bool(group):
        raise click.UsageError("give exactly one of --user USER or --group GROUP")
    value = (user or group or "").strip()
    kind = PrincipalKind.AD_USER if user else PrincipalKind.AD_GROUP
    if is_sid(value) and name:
        return kind, value, name
    wanted = PrincipalType.USER if user else PrincipalType.GROUP
    found = DirectoryLookup.for_services(state().services()).resolve_principal(value, wanted)
    return kind, found.sid, name or found.qualified_name


def _principal_options(fn: F) -> F:
    fn = click.option("--group", metavar="GROUP",
                      help="An AD group: its name, DOMAIN\\group or SID.")(fn)
    return click.option("--user", metavar="USER",
                        help="An AD user: alice, DOMAIN\\alice, alice@domain or a SID.")(fn)


@elastic_group.command("assign")
@click.argument("ref", metavar="LAYER[:VERSION]")
@_principal_options
@click.option("--name", metavar="NAME",
              help="The name to show (default: the directory's DOMAIN\\name); with a SID, no directory lookup.")
@comment_option
def assign(ref: str, user: str | None, group: str | None, name: str | None, comment: str) -> None:
    """Assign an app layer version elastically to an AD user or group, named or by SID."""
    kind, sid, shown = _principal(user, group, name)
    info = state().services().assignments.assign(ref, kind, sid, shown, comment=comment)
    emit(info, f"Assigned {info.layer}:{info.version} to {info.principal_name}.")


@elastic_group.command("unassign")
@click.argument("layer")
@click.argument("principal", metavar="[SID|NAME]", required=False)
@_principal_options
@comment_option
def unassign(layer: str, principal: str | None, user: str | None, group: str | None, comment: str) -> None:
    """Remove a layer's elastic assignment from a user or group: --user USER or --group GROUP (looked up
    in the directory), or SID|NAME as the assignment shows it."""
    if principal and (user or group):
        raise click.UsageError("name the principal once: SID|NAME, --user USER or --group GROUP")
    if not principal:
        from app.directory.ldapfilter import is_sid

        value = (user or group or "").strip()
        principal = value if value and is_sid(value) else _principal(user, group, None)[1]
    state().services().assignments.unassign(layer, principal, comment=comment)
    emit({"unassigned": layer, "principal": principal}, f"Unassigned {layer} from {user or group or principal}.")


@elastic_group.command("list")
@click.option("--layer", metavar="NAME")
@click.option("--principal", metavar="SID|NAME")
def list_(layer: str | None, principal: str | None) -> None:
    """List elastic assignments."""
    rows = state().services().assignments.list_assignments(layer=layer, principal=principal)
    emit(rows, lambda rs: table(
        [(r.layer, r.version, r.principal_kind.value, r.principal_name, r.principal_sid) for r in rs],
        ["LAYER", "VERSION", "KIND", "NAME", "SID"]))


@elastic_group.command("resolve")
@click.option("--user", "user", required=True, metavar="USER", help="user, DOMAIN\\user, user@domain or a SID.")
@click.option("--machine", required=True, metavar="NAME", help="The machine the user signs in on.")
def resolve(user: str, machine: str) -> None:
    """Which app layers USER gets on machine NAME, and why (direct, via group, via machine pattern)."""
    from app.services.elastic import ElasticService, Resolution

    found = ElasticService.for_services(state().services()).resolve(user, machine)

    def human(r: Resolution) -> str:
        head = f"{r.user_name} on {r.machine}: {len(r.layers)} app layer(s)"
        rows = [(x.layer, x.version, x.explanation) for x in r.layers]
        rows += [(x.layer, x.version, f"  also {g.why}") for x in r.layers for g in x.reasons[1:]]
        rows.sort(key=lambda row: (row[0].casefold(), row[2].startswith("  ")))
        lines = [head, table(rows, ["LAYER", "VERSION", "WHY"])]
        for x in r.layers:
            lines += [f"{x.layer}: not {o.grant.version} ({o.grant.why}): {o.reason}" for o in x.overridden]
        lines += [f"skipped {o.grant.layer}:{o.grant.version} ({o.grant.why}): {o.reason}" for o in r.skipped]
        return "\n".join(lines)

    emit(found, human)


@elastic_group.command("sync")
@click.option("--share", required=True, metavar="\\\\HOST\\SHARE",
              help="The share (and folder) to write the repository to.")
@click.option("--user", "username", required=True, metavar="USER", help="The account that writes (DOMAIN\\user).")
@click.option("--password-stdin", is_flag=True, help="Read the account's password from stdin instead of asking.")
@click.option("--format", "fmt", type=click.Choice(["vhdx", "vhd-dynamic"]), default="vhdx", show_default=True,
              help="The layer disks' format.")
@comment_option
def sync(share: str, username: str, password_stdin: bool, fmt: str, comment: str) -> None:
    """Write the Elastic Layer repository (layer disks, Layers.json, ElasticLayerAssignment.json,
    MachineAssociations.json) to an SMB share, as a task: its progress is shown on stderr until it ends,
    and `layerctl task cancel ID` (or Ctrl-C) stops it, exiting with 130. Only disks the share lacks are
    copied (an interrupted copy is resumed); JSON files are replaced atomically; an interrupted sync is
    finished by running it again."""
    from app.catalog.models import TaskState
    from app.elastic.sync import SyncCanceled
    from app.errors import Conflict, EnvironmentProblem
    from app.services.elastic import ElasticService

    password = read_password("Password", password_stdin)
    cli_state = state()
    services = cli_state.services()
    runner = cli_state.runner()
    show_progress(runner)
    task = ElasticService.for_services(services).start_sync(
        runner, share, username, password, comment=comment, fmt="vhd-dynamic" if fmt == "vhd-dynamic" else "vhdx")
    del password
    assert task.task_id is not None
    canceled = SyncCanceled(f"The sync was canceled (task {task.task_id}); the share keeps its previous "
                            "repository. Run the sync again to finish it.")
    try:
        runner.wait(task.task_id)
    except KeyboardInterrupt:
        click.echo(f"Canceling task {task.task_id}…", err=True)
        with contextlib.suppress(Conflict):  # it has just ended
            services.tasks.cancel(task.task_id, comment="Ctrl-C in layerctl")
        if runner.wait(task.task_id) is TaskState.CANCELED:
            raise canceled from None
    info = services.tasks.get_task(task.task_id)
    if info.state is TaskState.CANCELED:
        raise canceled
    if info.state is not TaskState.COMPLETE:
        # The sync's own error (its message and exit status), when it raised one.
        raise task.failure or EnvironmentProblem(f"The sync failed (task {task.task_id}): {info.error or info.message}")
    result = {k: v for k, v in (info.result or {}).items() if k not in ("type", "summary", "state")}
    copied, resumed = result.get("copied", []), int(result.get("bytes_resumed", 0))
    emit({"task": task.task_id, **result},
         f"Synced {result.get('share')}: {len(copied)} disk(s) copied ({result.get('bytes_copied')} bytes"
         + (f", {resumed} more resumed from an interrupted copy" if resumed else "")
         + f"), {len(result.get('kept', []))} already there; replaced "
           f"{', '.join(result.get('replaced', [])) or 'no JSON file'}; deleted {len(result.get('deleted', []))} "
           f"old file(s) (task {task.task_id}).")


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


@click.command("associate")
@click.argument("group", metavar="GROUP")
@click.option("--pattern", required=True, metavar="PATTERN", help="A machine-name wildcard pattern (VDA-FIN-*).")
@click.option("--name", metavar="NAME",
              help="The name to show (default: the directory's DOMAIN\\group); with a SID, no directory lookup.")
@comment_option
def machine_associate(group: str, pattern: str, name: str | None, comment: str) -> None:
    """Tie GROUP (its name, DOMAIN\\group or SID) to a machine-name wildcard pattern (VDA-FIN-*)."""
    _kind, sid, shown = _principal(None, group, name)
    info = state().services().assignments.add_machine_association(sid, shown, pattern, comment=comment)
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


@click.group("machine")
def machine_top_group() -> None:
    """Machine associations: AD groups tied to machine-name patterns (as under `elastic machine`)."""


def register(cli: click.Group) -> None:
    machine_group.add_command(machine_associate)
    for command in (machine_associate, machine_list, machine_remove):
        machine_top_group.add_command(command)
    cli.add_command(elastic_group)
    cli.add_command(machine_top_group)
