"""``layerctl login|logout|whoami|user …|role …``"""

from __future__ import annotations

import click

from app.catalog.models import PrincipalKind, Role
from app.cli.main import F, comment_option, emit, read_password, state, table
from app.services.access import embedded_caller, sign_in, sign_out
from app.services.rbac import Caller

ROLES = [r.value for r in Role]


def _caller(c: Caller) -> str:
    how = "built-in administrator of this catalog" if c.builtin else c.kind.value.replace("_", " ")
    return f"{c.username} ({how}): {', '.join(sorted(r.value for r in c.roles)) or 'no role'}"


@click.command("login")
@click.option("--user", "--username", "username", prompt="User name", metavar="USER",
              help="A local account, or a directory user: DOMAIN\\user, user@domain (UPN) or user.")
@click.option("--password-stdin", is_flag=True, help="Read the password from stdin instead of asking.")
def login(username: str, password_stdin: bool) -> None:
    """Sign in and keep a session (12 hours) in the OS keyring.

    A bare name that is a local account's signs in that account; any other name is looked up in the
    enabled directory junctions, and the directory user gets the roles granted to them and to their
    (nested) groups."""
    cli_state = state()
    catalog, secrets = cli_state.open()
    password = read_password("Password", password_stdin)
    token, caller = sign_in(catalog, username, password, secrets=secrets)
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


def _grantee(principal: str | None, kind: str, user: str | None, group: str | None) -> tuple[PrincipalKind, str, str]:
    """Who a grant names: ``(kind, principal, display name)``. ``--user``/``--group`` names are looked up
    in the directory (a bare ``--user`` name that is a local account's means that account)."""
    from app.directory import PrincipalType
    from app.directory.ldapfilter import is_sid
    from app.services.directory import DirectoryLookup

    given = [v for v in (principal, user, group) if v]
    if len(given) != 1:
        raise click.UsageError("name one grantee: NAME|SID (with --kind), --user USER or --group GROUP")
    if principal:
        return PrincipalKind(kind), principal, ""
    services = state().services()
    if group:
        found = DirectoryLookup.for_services(services).resolve_principal(group, PrincipalType.GROUP)
        return PrincipalKind.AD_GROUP, found.sid, found.qualified_name
    assert user is not None
    qualified = "@" in user or "\\" in user or is_sid(user)
    if not qualified and any(a.username.casefold() == user.strip().casefold() for a in services.access.list_accounts()):
        return PrincipalKind.LOCAL_USER, user.strip(), ""
    found = DirectoryLookup.for_services(services).resolve_principal(user, PrincipalType.USER)
    return PrincipalKind.AD_USER, found.sid, found.qualified_name


def _grantee_options(fn: F) -> F:
    for option in reversed([
        click.argument("principal", metavar="[NAME|SID]", required=False),
        click.option("--kind", type=click.Choice(_KINDS), default="local_user", show_default=True,
                     help="What NAME|SID is."),
        click.option("--user", metavar="USER", help="A local account or directory user (DOMAIN\\user, UPN, name)."),
        click.option("--group", metavar="GROUP", help="A directory group (DOMAIN\\group or name)."),
    ]):
        fn = option(fn)
    return fn


@role_group.command("grant")
@click.argument("role", type=click.Choice(ROLES))
@_grantee_options
@click.option("--name", "display_name", default="", help="Display name (for SIDs).")
@comment_option
def role_grant(role: str, principal: str | None, kind: str, user: str | None, group: str | None, display_name: str,
               comment: str) -> None:
    """Grant a role to NAME|SID, a user (--user) or a directory group (--group).

    A directory user's roles are those granted to them and to every group they belong to, nested groups
    included."""
    grantee_kind, grantee, shown = _grantee(principal, kind, user, group)
    info = state().services().access.grant_role(grantee_kind, grantee, Role(role),
                                                display_name=display_name or shown, comment=comment)
    emit(info, f"Granted {info.role.value} to {info.display_name or info.principal}.")


@role_group.command("revoke")
@click.argument("role", type=click.Choice(ROLES))
@_grantee_options
@comment_option
def role_revoke(role: str, principal: str | None, kind: str, user: str | None, group: str | None,
                comment: str) -> None:
    """Revoke a role from NAME|SID, a user (--user) or a directory group (--group)."""
    grantee_kind, grantee, shown = _grantee(principal, kind, user, group)
    state().services().access.revoke_role(grantee_kind, grantee, Role(role), comment=comment)
    emit({"revoked": role, "principal": grantee}, f"Revoked {role} from {shown or grantee}.")


@role_group.command("list")
def role_list() -> None:
    """List role grants."""
    emit(state().services().access.list_grants(), lambda rows: table(
        [(g.role.value, g.principal_kind.value, g.display_name or g.principal, g.granted_by) for g in rows],
        ["ROLE", "KIND", "WHO", "GRANTED BY"]))


def register(cli: click.Group) -> None:
    for command in (login, logout, whoami, user_group, role_group):
        cli.add_command(command)
