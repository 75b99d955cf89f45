"""``layerctl login|logout|whoami|user …|role …``"""

from __future__ import annotations

import click

from app.catalog.models import PrincipalKind, Role
from app.cli.main import comment_option, emit, read_password, state, table
from app.services.access import embedded_caller, sign_in, sign_out
from app.services.rbac import Caller

ROLES = [r.value for r in Role]


def _caller(c: Caller) -> str:
    how = "built-in administrator of this catalog" if c.builtin else c.kind.value.replace("_", " ")
    return f"{c.username} ({how}): {', '.join(sorted(r.value for r in c.roles)) or 'no role'}"


@click.command("login")
@click.option("--username", prompt="User name", help="Local account name.")
@click.option("--password-stdin", is_flag=True, help="Read the password from stdin instead of asking.")
def login(username: str, password_stdin: bool) -> None:
    """Sign in and keep a session (12 hours) in the OS keyring."""
    cli_state = state()
    catalog, secrets = cli_state.open()
    password = read_password("Password", password_stdin)
    token, caller = sign_in(catalog, username, password)
    secrets.set("session", token)
    note = ""
    if embedded_caller(catalog, cli_state.home.root) is not None:
        note = " (sign-in is not required on this catalog: commands run as the OS account until it is)"
    emit({"username": caller.username, "roles": sorted(caller.roles)}, f"Signed in as {_caller(caller)}{note}.")


@click.command("logout")
def logout() -> None:
    """End the kept session."""
    catalog, secrets = state().open()
    token = secrets.get("session")
    if token:
        sign_out(catalog, token)
        secrets.delete("session")
    emit({"signed_out": bool(token)}, "Signed out." if token else "No session was kept.")


@click.command("whoami")
def whoami() -> None:
    """Who commands run as, and with which roles."""
    caller = state().services().caller
    emit({"username": caller.username, "kind": caller.kind, "roles": sorted(caller.roles), "builtin": caller.builtin},
         _caller(caller))


@click.group("user")
def user_group() -> None:
    """Local accounts (for labs without a directory, and as a way in when the directory is down)."""


@user_group.command("add")
@click.argument("username")
@click.option("--role", "roles", multiple=True, type=click.Choice(ROLES), help="Role to grant (repeatable).")
@click.option("--password-stdin", is_flag=True, help="Read the password from stdin instead of asking.")
@comment_option
def user_add(username: str, roles: tuple[str, ...], password_stdin: bool, comment: str) -> None:
    """Create a local account."""
    password = read_password("Password", password_stdin, confirm=True)
    info = state().services().access.create_account(username, password, [Role(r) for r in roles], comment=comment)
    emit(info, f"Created local account {info.username!r} ({', '.join(r.value for r in info.roles) or 'no role'}).")


@user_group.command("list")
def user_list() -> None:
    """List local accounts."""
    emit(state().services().access.list_accounts(), lambda rows: table(
        [(a.username, "disabled" if a.disabled else "enabled", ", ".join(r.value for r in a.roles)) for a in rows],
        ["USER", "STATE", "ROLES"]))


@user_group.command("passwd")
@click.argument("username")
@click.option("--password-stdin", is_flag=True)
@comment_option
def user_passwd(username: str, password_stdin: bool, comment: str) -> None:
    """Set a local account's password (ends its sessions)."""
    password = read_password("New password", password_stdin, confirm=True)
    state().services().access.set_password(username, password, comment=comment)
    emit({"username": username}, f"Password of {username!r} changed.")


@user_group.command("disable")
@click.argument("username")
@comment_option
def user_disable(username: str, comment: str) -> None:
    """Disable a local account (ends its sessions)."""
    state().services().access.set_disabled(username, True, comment=comment)
    emit({"username": username, "disabled": True}, f"Disabled {username!r}.")


@user_group.command("enable")
@click.argument("username")
@comment_option
def user_enable(username: str, comment: str) -> None:
    """Enable a local account."""
    state().services().access.set_disabled(username, False, comment=comment)
    emit({"username": username, "disabled": False}, f"Enabled {username!r}.")


@user_group.command("delete")
@click.argument("username")
@comment_option
def user_delete(username: str, comment: str) -> None:
    """Delete a local account and its role grants."""
    state().services().access.delete_account(username, comment=comment)
    emit({"deleted": username}, f"Deleted local account {username!r}.")


@click.group("role")
def role_group() -> None:
    """Role grants to local accounts, OS accounts and AD users or groups."""


_KINDS = [k.value for k in PrincipalKind]


@role_group.command("grant")
@click.argument("role", type=click.Choice(ROLES))
@click.argument("principal", metavar="NAME|SID")
@click.option("--kind", type=click.Choice(_KINDS), default="local_user", show_default=True)
@click.option("--name", "display_name", default="", help="Display name (for SIDs).")
@comment_option
def role_grant(role: str, principal: str, kind: str, display_name: str, comment: str) -> None:
    """Grant a role."""
    info = state().services().access.grant_role(PrincipalKind(kind), principal, Role(role),
                                                display_name=display_name, comment=comment)
    emit(info, f"Granted {info.role.value} to {info.display_name or info.principal}.")


@role_group.command("revoke")
@click.argument("role", type=click.Choice(ROLES))
@click.argument("principal", metavar="NAME|SID")
@click.option("--kind", type=click.Choice(_KINDS), default="local_user", show_default=True)
@comment_option
def role_revoke(role: str, principal: str, kind: str, comment: str) -> None:
    """Revoke a role."""
    state().services().access.revoke_role(PrincipalKind(kind), principal, Role(role), comment=comment)
    emit({"revoked": role, "principal": principal}, f"Revoked {role} from {principal}.")


@role_group.command("list")
def role_list() -> None:
    """List role grants."""
    emit(state().services().access.list_grants(), lambda rows: table(
        [(g.role.value, g.principal_kind.value, g.display_name or g.principal, g.granted_by) for g in rows],
        ["ROLE", "KIND", "WHO", "GRANTED BY"]))


def register(cli: click.Group) -> None:
    for command in (login, logout, whoami, user_group, role_group):
        cli.add_command(command)
