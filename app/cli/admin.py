"""``layerctl storage|connector|directory …``: the Administrator's configuration."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from app.catalog.models import DirectorySecurity
from app.cli.main import F, comment_option, emit, read_password, state, table
from app.errors import NotFound, ValidationError
from app.services.connectors import CONNECTOR_TYPES
from app.services.directory import PLAIN_WARNING, JunctionSpec
from app.services.views import ConnectorInfo, DirectoryJunctionInfo, StorageLocationInfo

if TYPE_CHECKING:
    from app.connectors.base import TestReport as ConnectorTestReport
    from app.directory import ConnectionReport


def _groups(values: tuple[str, ...]) -> list[tuple[str, str]]:
    """``(SID, name)`` per ``--group``: ``SID=NAME`` as given, or a group's name (``Finance-Users``,
    ``LAB\\Finance-Users``) or SID looked up in the directory."""
    pairs = []
    for value in values:
        sid, sep, name = value.partition("=")
        if sep:
            pairs.append((sid.strip(), name.strip()))
            continue
        from app.directory import PrincipalType
        from app.services.directory import DirectoryLookup

        found = DirectoryLookup.for_services(state().services()).resolve_principal(value, PrincipalType.GROUP)
        pairs.append((found.sid, found.qualified_name))
    return pairs


def _options(values: tuple[str, ...]) -> dict[str, str]:
    result = {}
    for value in values:
        key, sep, item = value.partition("=")
        if not sep or not key.strip():
            raise ValidationError(f"--option {value!r}: write KEY=VALUE.")
        result[key.strip()] = item
    return result


def _read_text(path: str | None, what: str) -> str | None:
    if path is None:
        return None
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ValidationError(f"Cannot read the {what} {path}: {exc.strerror or exc}.") from None
    except UnicodeDecodeError:
        raise ValidationError(f"The {what} {path} is not UTF-8 text.") from None


def _locations(rows: list[StorageLocationInfo]) -> str:
    return table([(r.priority, r.name, r.path, r.default_size_gb, ", ".join(n for _, n in r.groups)) for r in rows],
                 ["PRIORITY", "NAME", "PATH", "SIZE GB", "GROUPS"])


# --- storage -------------------------------------------------------------------------------------

@click.group("storage")
def storage_group() -> None:
    """User layer storage locations."""


def _location_name(path: str) -> str:
    r"""A storage location's name made from its path when none is given: ``\\fs1\ul\EU`` → ``fs1-ul-EU``."""
    parts = [part for part in path.strip().strip("\\").split("\\") if part]
    name = "-".join(parts)
    return "".join("-" if ch in ':*?"<>|/' else ch for ch in name) or path


@storage_group.command("add")
@click.argument("args", nargs=-1, required=True, metavar="[NAME] \\\\SERVER\\SHARE[\\FOLDER]")
@click.option("--name", "name_option", metavar="NAME", help="The location's name (default: made from the path).")
@click.option("--group", "groups", multiple=True, metavar="GROUP|SID=NAME",
              help="An AD group using it: its name (looked up in the directory) or SID=NAME (repeatable).")
@click.option("--size-gb", default=10, show_default=True, help="Default user layer size.")
@comment_option
def storage_add(args: tuple[str, ...], name_option: str | None, groups: tuple[str, ...], size_gb: int,
                comment: str) -> None:
    """Add a storage location for User Layers (tried after the existing ones). Give the share path, and
    optionally a name before it or with --name."""
    if len(args) > 2:
        raise click.UsageError("give the share path, optionally preceded by a name")
    path = args[-1]
    name = args[0] if len(args) == 2 else name_option or _location_name(path)
    if len(args) == 2 and name_option is not None and name_option != args[0]:
        raise click.UsageError("give the name once: as the first argument or with --name")
    info = state().services().storage.add_location(name, path, groups=_groups(groups), default_size_gb=size_gb,
                                                   comment=comment)
    emit(info, f"Added storage location {info.name!r} ({info.path}) at priority {info.priority}.")


@storage_group.command("update")
@click.argument("name")
@click.option("--path", metavar="\\\\SERVER\\SHARE")
@click.option("--group", "groups", multiple=True, metavar="GROUP|SID=NAME",
              help="Replaces the group list: names (looked up in the directory) or SID=NAME.")
@click.option("--size-gb", type=int)
@comment_option
def storage_update(name: str, path: str | None, groups: tuple[str, ...], size_gb: int | None, comment: str) -> None:
    """Change a storage location."""
    info = state().services().storage.update_location(
        name, path=path, groups=_groups(groups) if groups else None, default_size_gb=size_gb, comment=comment)
    emit(info, f"Updated storage location {info.name!r}.")


def _location_names(values: tuple[str, ...]) -> list[str]:
    """Storage locations named by name or by path, as names."""
    by_path = {row.path.casefold(): row.name for row in state().services().storage.list_locations()}
    names = []
    for value in values:
        if value.startswith("\\\\"):
            found = by_path.get(value.rstrip("\\").casefold()) or by_path.get(value.casefold())
            if found is None:
                raise NotFound(f"No storage location has the path {value}; `layerctl storage list` shows them.")
            names.append(found)
        else:
            names.append(value)
    return names


@storage_group.command("priority")
@click.argument("locations", nargs=-1, required=True, metavar="PATH|NAME ...")
@comment_option
def storage_priority(locations: tuple[str, ...], comment: str) -> None:
    """Set the order storage locations are tried in: list every location's path (or name), first tried
    first. A user in several groups gets a User Layer on the first location one of their groups has."""
    emit(state().services().storage.reorder(_location_names(locations), comment=comment), _locations)


@storage_group.command("remove")
@click.argument("name")
@comment_option
def storage_remove(name: str, comment: str) -> None:
    """Remove a storage location (user layers already there stay on the share)."""
    state().services().storage.remove_location(name, comment=comment)
    emit({"removed": name}, f"Removed storage location {name!r}.")


@storage_group.command("list")
def storage_list() -> None:
    """List storage locations in priority order."""
    emit(state().services().storage.list_locations(), _locations)


# --- connectors ----------------------------------------------------------------------------------

def _connector(c: ConnectorInfo) -> str:
    lines = [f"{c.name} ({CONNECTOR_TYPES.get(c.type, c.type)})", f"  Endpoint: {c.endpoint or '(none)'}",
             f"  User:     {c.username or '(none)'}{' (password in keyring)' if c.has_credentials else ''}",
             f"  TLS:      {'verified' if c.verify_tls else 'NOT verified'}"]
    lines.extend(f"  {k}: {v}" for k, v in sorted(c.options.items()))
    if c.used_by:
        lines.append(f"  Used by:  {', '.join(c.used_by)}")
    return "\n".join(lines)


@click.group("connector")
def connector_group() -> None:
    """Connector configurations (where images are published)."""


@connector_group.command("add")
@click.argument("name")
@click.option("--type", "connector_type", type=click.Choice(list(CONNECTOR_TYPES)), required=True)
@click.option("--endpoint", default="", metavar="URL|HOST|PATH")
@click.option("--username", default="")
@click.option("--password-stdin", is_flag=True, help="Read the password from stdin (else asked when --username).")
@click.option("--no-verify-tls", is_flag=True, help="Do not verify the server's TLS certificate (not recommended).")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE", help="Type-specific setting (repeatable).")
@click.option("--script", "script_file", metavar="FILE", help="Post-publish PowerShell script.")
@comment_option
def connector_add(name: str, connector_type: str, endpoint: str, username: str, password_stdin: bool,
                  no_verify_tls: bool, options: tuple[str, ...], script_file: str | None, comment: str) -> None:
    """Add a connector configuration; its password goes to the OS keyring.

    The settings are checked against the type's fields (`layerctl connector fields TYPE` lists them)."""
    from app.services.connectors import check_settings

    check_settings(connector_type, endpoint.strip(), username, _options(options))  # before asking a password
    password = read_password("Password", password_stdin) if (username or password_stdin) else None
    info = state().services().connectors.add_connector(
        name, connector_type, endpoint=endpoint, username=username, password=password or None,
        verify_tls=not no_verify_tls, options=_options(options),
        post_publish_script=_read_text(script_file, "script") or "", comment=comment)
    emit(info, _connector)


@connector_group.command("update")
@click.argument("name")
@click.option("--endpoint", metavar="URL|HOST|PATH")
@click.option("--username")
@click.option("--password-stdin", is_flag=True, help="Read a new password from stdin.")
@click.option("--verify-tls/--no-verify-tls", default=None)
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE", help="Replaces the settings.")
@click.option("--script", "script_file", metavar="FILE")
@comment_option
def connector_update(name: str, endpoint: str | None, username: str | None, password_stdin: bool,
                     verify_tls: bool | None, options: tuple[str, ...], script_file: str | None, comment: str) -> None:
    """Change a connector configuration."""
    password = read_password("Password", True) if password_stdin else None
    info = state().services().connectors.update_connector(
        name, endpoint=endpoint, username=username, password=password, verify_tls=verify_tls,
        options=_options(options) if options else None, post_publish_script=_read_text(script_file, "script"),
        comment=comment)
    emit(info, _connector)


@connector_group.command("list")
def connector_list() -> None:
    """List connector configurations."""
    emit(state().services().connectors.list_connectors(), lambda rows: table(
        [(c.name, c.type, c.endpoint, "yes" if c.verify_tls else "NO", ", ".join(c.used_by)) for c in rows],
        ["NAME", "TYPE", "ENDPOINT", "TLS VERIFIED", "USED BY"]))


@connector_group.command("show")
@click.argument("name")
def connector_show(name: str) -> None:
    """Show a connector configuration."""
    emit(state().services().connectors.get_connector(name), _connector)


@connector_group.command("remove")
@click.argument("name")
@comment_option
def connector_remove(name: str, comment: str) -> None:
    """Remove a connector configuration and its keyring entry (refused while a template uses it)."""
    state().services().connectors.remove_connector(name, comment=comment)
    emit({"removed": name}, f"Removed connector {name!r}.")


def _test_report(report: ConnectorTestReport) -> str:
    marks = {True: "ok  ", False: "FAIL", None: "-   "}
    return "\n".join(f"{marks[s.ok]}  {s.name:<8}  {s.detail}" for s in report.steps)


@connector_group.command("test")
@click.argument("name")
def connector_test(name: str) -> None:
    """Test a connector step by step (nothing is changed at the destination). Exits 3 when a step fails."""
    report = state().services().connectors.test_connector(name)
    emit({"connector": name, "ok": report.ok, "failure": report.failure, "steps": report.steps},
         lambda _: _test_report(report))
    if not report.ok:
        click.get_current_context().exit(3)


@connector_group.command("fields")
@click.argument("connector_type", metavar="TYPE", type=click.Choice(list(CONNECTOR_TYPES)))
def connector_fields_command(connector_type: str) -> None:
    """The settings of a connector type: --endpoint, --username, the password and each --option KEY."""
    from app.services.connectors import connector_fields

    fields = connector_fields(connector_type)
    emit(fields, lambda rows: table(
        [(("--option " + f.key) if f.is_option else f.key, "yes" if f.required else "",
          "/".join(f.choices) or f.kind.value, "" if f.default is None else f.default, f.help) for f in rows],
        ["SETTING", "REQUIRED", "VALUES", "DEFAULT", "HELP"]) if rows else
        f"Connectors of type {connector_type} cannot test or publish yet; any --option is kept as given.")


# --- directory -----------------------------------------------------------------------------------

def _junction(j: DirectoryJunctionInfo) -> str:
    lines = [f"{j.name}: {j.security.value}://{j.server}:{j.port} base {j.base_dn} as {j.bind_account}"
             f"{'' if j.enabled else ' (disabled)'}"]
    lines.extend(f"  WARNING: {w}" for w in j.warnings)
    return "\n".join(lines)


@click.group("directory")
def directory_group() -> None:
    """Directory junctions (Active Directory over LDAP)."""


def _junction_options(fn: F) -> F:
    for option in reversed([
        click.option("--server", required=True, metavar="HOST"),
        click.option("--port", type=int, help="Default: 636 for LDAPS, 389 otherwise."),
        click.option("--ldaps", "ldaps", is_flag=True, help="LDAP over TLS (the default)."),
        click.option("--starttls", "starttls", is_flag=True, help="LDAP, then StartTLS before any password."),
        click.option("--plain", "plain", is_flag=True,
                     help="Unencrypted LDAP: passwords cross the network in clear (not recommended)."),
        click.option("--security", type=click.Choice([s.value for s in DirectorySecurity]), default=None,
                     help="Same as --ldaps, --starttls or --plain."),
        click.option("--allow-plain", is_flag=True, help="Accept plain LDAP with --security plain."),
        click.option("--base-dn", required=True, metavar="DN"),
        click.option("--bind-user", "--bind-account", "bind_account", required=True, metavar="USER",
                     help="The account LayerDesk searches the directory as (DOMAIN\\user, UPN or DN)."),
        click.option("--ca-file", "--ca-cert", "ca_cert_file", metavar="PEM",
                     help="CA certificate that signed the server's (default: the system's trusted CAs)."),
        click.option("--disabled", is_flag=True),
        click.option("--password-stdin", is_flag=True, help="Read the bind password from stdin."),
    ]):
        fn = option(fn)
    return fn


def _junction_spec(server: str, port: int | None, ldaps: bool, starttls: bool, plain: bool, security: str | None,
                   allow_plain: bool, base_dn: str, bind_account: str, ca_cert_file: str | None,
                   disabled: bool) -> JunctionSpec:
    flags = [name for name, chosen in (("ldaps", ldaps), ("starttls", starttls), ("plain", plain)) if chosen]
    if len(flags) > 1 or (flags and security and security != flags[0]):
        raise click.UsageError("choose one of --ldaps, --starttls and --plain")
    chosen = DirectorySecurity(flags[0] if flags else security or "ldaps")
    if chosen is DirectorySecurity.PLAIN and (plain or allow_plain):
        click.echo(f"layerctl: warning: {PLAIN_WARNING}", err=True)
    return JunctionSpec(server=server, port=port, security=chosen, allow_plain=plain or allow_plain,
                        base_dn=base_dn, bind_account=bind_account,
                        ca_certificate=_read_text(ca_cert_file, "CA certificate"), enabled=not disabled)


@directory_group.command("add")
@click.argument("name")
@_junction_options
@comment_option
def directory_add(name: str, password_stdin: bool, comment: str, **kwargs: object) -> None:
    """Add a directory junction; the bind password goes to the OS keyring.

    LDAPS is the default; the server's certificate is always verified (give --ca-file for a private CA)."""
    password = read_password("Bind password", password_stdin)
    info = state().services().directory.add_junction(name, _junction_spec(**kwargs), password=password,  # type: ignore[arg-type]
                                                     comment=comment)
    emit(info, _junction)


@directory_group.command("update")
@click.argument("name")
@_junction_options
@comment_option
def directory_update(name: str, password_stdin: bool, comment: str, **kwargs: object) -> None:
    """Replace a directory junction's settings (and, with --password-stdin, its password)."""
    password = read_password("Bind password", True) if password_stdin else None
    info = state().services().directory.update_junction(name, _junction_spec(**kwargs), password=password,  # type: ignore[arg-type]
                                                        comment=comment)
    emit(info, _junction)


def _report(report: ConnectionReport) -> str:
    marks = {True: "ok  ", False: "FAIL", None: "-   "}
    lines = [f"{marks[s.ok]}  {s.name:<6}  {s.detail}" for s in report.steps]
    lines.extend(f"WARNING: {w}" for w in report.warnings)
    return "\n".join(lines)


@directory_group.command("test")
@click.argument("name")
def directory_test(name: str) -> None:
    """Test a junction step by step: TCP, TLS, bind, search. Exits 3 when a step fails."""
    from app.services.directory import DirectoryLookup

    report = DirectoryLookup.for_services(state().services()).test_junction(name)
    emit({"junction": name, "ok": report.ok, "failure": report.failure, "steps": report.steps,
          "warnings": report.warnings}, lambda _: _report(report))
    if not report.ok:
        click.get_current_context().exit(3)


@directory_group.command("search")
@click.argument("text")
@click.option("--limit", default=20, show_default=True, help="At most this many.")
@click.option("--junction", metavar="NAME", help="Only this junction (default: every enabled one).")
def directory_search(text: str, limit: int, junction: str | None) -> None:
    """Users and groups whose name starts with TEXT (what the console's picker shows)."""
    from app.services.directory import DirectoryLookup

    found = DirectoryLookup.for_services(state().services()).search_principals(text, limit, junction=junction)
    emit(found, lambda rows: table([(p.type.value, p.qualified_name, p.display_name, p.sid) for p in rows],
                                   ["TYPE", "NAME", "DISPLAY NAME", "SID"]))


@directory_group.command("list")
def directory_list() -> None:
    """List directory junctions."""
    emit(state().services().directory.list_junctions(), lambda rows: "\n".join(_junction(j) for j in rows) or "(none)")


@directory_group.command("remove")
@click.argument("name")
@comment_option
def directory_remove(name: str, comment: str) -> None:
    """Remove a directory junction and its keyring entry."""
    state().services().directory.remove_junction(name, comment=comment)
    emit({"removed": name}, f"Removed directory junction {name!r}.")


def register(cli: click.Group) -> None:
    for group in (storage_group, connector_group, directory_group):
        cli.add_command(group)
