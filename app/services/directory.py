"""Directory junctions: how LayerDesk reaches Active Directory for sign-in and elastic assignments.

The bind password lives in the OS keyring. Plain (unencrypted) LDAP is accepted only when asked for
explicitly, and then carries a warning wherever the junction is shown. Adding an enabled junction
makes sign-in required.

:class:`DirectoryService` keeps the junctions (catalog changes, audited); :class:`DirectoryLookup`
talks to the directories behind them (test a junction, find users and groups) and changes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.catalog.models import DirectoryJunction, DirectorySecurity
from app.errors import Conflict, NotFound, PermissionDenied, ValidationError
from app.secrets import SecretStore
from app.services.base import Service, ServiceContext
from app.services.rbac import Operation
from app.services.validation import validate_host, validate_name, validate_port
from app.services.views import DirectoryJunctionInfo

if TYPE_CHECKING:
    # The directory client (ldap3) is imported when first used: most commands never need it.
    from app.directory import (
        ConnectionReport,
        DirectoryClient,
        DirectoryPrincipal,
        DirectorySettings,
        PrincipalType,
    )
    from app.services import Services

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_PORTS = {DirectorySecurity.LDAPS: 636, DirectorySecurity.STARTTLS: 389, DirectorySecurity.PLAIN: 389}
PLAIN_WARNING = "Plain LDAP: passwords cross the network unencrypted. Use LDAPS or StartTLS."
DEFAULT_ATTRIBUTES = {"user_login": "sAMAccountName", "user_principal": "userPrincipalName",
                      "display_name": "displayName", "group_name": "cn"}


@dataclass(frozen=True)
class JunctionSpec:
    server: str
    base_dn: str
    bind_account: str
    security: DirectorySecurity = DirectorySecurity.LDAPS
    port: int | None = None
    ca_certificate: str | None = None
    attribute_map: dict[str, str] = field(default_factory=dict)
    enabled: bool = True
    #: Plain LDAP must be chosen on purpose.
    allow_plain: bool = False


def _secret_name(junction_id: int) -> str:
    return f"directory/{junction_id}"


def _info(row: DirectoryJunction) -> DirectoryJunctionInfo:
    warnings = (PLAIN_WARNING,) if row.security is DirectorySecurity.PLAIN else ()
    return DirectoryJunctionInfo(
        row.id, row.name, row.server, row.port, row.security, row.ca_certificate, row.base_dn,
        row.bind_account, dict(row.attribute_map), row.enabled, warnings,
    )


def _base_dn(value: str) -> str:
    text = (value or "").strip()
    parts = [p.strip() for p in text.split(",")] if text else []
    if not parts or any("=" not in p or not p.split("=", 1)[1].strip() for p in parts):
        raise ValidationError(f"The base DN {value!r} is not a distinguished name like DC=lab,DC=test.")
    return text


def _apply(row: DirectoryJunction, spec: JunctionSpec) -> None:
    security = DirectorySecurity(spec.security)
    if security is DirectorySecurity.PLAIN and not spec.allow_plain:
        raise ValidationError(
            "Plain LDAP sends passwords unencrypted; choose LDAPS or StartTLS, or allow plain LDAP explicitly."
        )
    row.server = validate_host(spec.server, "directory server")
    row.security = security
    row.port = validate_port(spec.port if spec.port is not None else DEFAULT_PORTS[security])
    row.base_dn = _base_dn(spec.base_dn)
    if not spec.bind_account.strip():
        raise ValidationError("Give the bind account (DOMAIN\\user, user@domain or a DN).")
    row.bind_account = spec.bind_account.strip()
    if spec.ca_certificate is not None and spec.ca_certificate.strip() and \
            "-----BEGIN CERTIFICATE-----" not in spec.ca_certificate:
        raise ValidationError("The CA certificate must be PEM text (-----BEGIN CERTIFICATE-----…).")
    row.ca_certificate = spec.ca_certificate.strip() if spec.ca_certificate else None
    unknown = set(spec.attribute_map) - set(DEFAULT_ATTRIBUTES)
    if unknown:
        raise ValidationError(f"Unknown attribute map key(s): {', '.join(sorted(unknown))}; "
                              f"known: {', '.join(DEFAULT_ATTRIBUTES)}.")
    row.attribute_map = {**DEFAULT_ATTRIBUTES, **spec.attribute_map}
    row.enabled = spec.enabled


def _require_break_glass(session: Session) -> None:
    """An enabled junction makes sign-in required: keep a local Administrator who can still sign in
    when the directory is unreachable."""
    from app.services.access import has_enabled_local_administrator

    if not has_enabled_local_administrator(session):
        raise Conflict(
            "Create a local account with the Administrator role first (`layerctl user add NAME --role "
            "Administrator`): with a directory configured everybody signs in, and that account is the way "
            "in when the directory cannot be reached."
        )


class DirectoryService(Service):
    def list_junctions(self) -> list[DirectoryJunctionInfo]:
        with self._read() as session:
            return [_info(r) for r in session.scalars(select(DirectoryJunction).order_by(DirectoryJunction.name))]

    def add_junction(self, name: str, spec: JunctionSpec, *, password: str | None = None,
                     comment: str = "") -> DirectoryJunctionInfo:
        with self._change(Operation.EDIT_DIRECTORY, "directory.add", "directory junction", name, comment) as change:
            name = validate_name(name, "directory junction name")
            session = change.session
            if session.scalars(select(DirectoryJunction).where(DirectoryJunction.name == name)).first():
                raise Conflict(f"A directory junction named {name!r} already exists.")
            row = DirectoryJunction(name=name, created_at=self._now())
            _apply(row, spec)
            if row.enabled:
                _require_break_glass(session)
            session.add(row)
            session.flush()
            if password:
                secret = _secret_name(row.id)
                self._ctx.secrets.set(secret, password)
                change.on_rollback(lambda: self._ctx.secrets.delete(secret))
                row.has_password = True
            change.details = {"server": row.server, "port": row.port, "security": row.security.value}
            return _info(row)

    def update_junction(self, name: str, spec: JunctionSpec, *, password: str | None = None,
                        comment: str = "") -> DirectoryJunctionInfo:
        with self._change(Operation.EDIT_DIRECTORY, "directory.update", "directory junction", name, comment) as change:
            row = self._row(change.session, name)
            before = _info(row)
            _apply(row, spec)
            if row.enabled:
                _require_break_glass(change.session)
            if password:
                self._ctx.secrets.set(_secret_name(row.id), password)
                row.has_password = True
            after = _info(row)
            change.details = {
                f: [getattr(before, f), getattr(after, f)]
                for f in ("server", "port", "security", "base_dn", "bind_account", "enabled")
                if getattr(before, f) != getattr(after, f)
            }
            if password:
                change.details["password"] = "changed"  # noqa: S105 - that it changed, never the value
            return after

    def remove_junction(self, name: str, *, comment: str = "") -> None:
        with self._change(Operation.EDIT_DIRECTORY, "directory.remove", "directory junction", name, comment) as change:
            row = self._row(change.session, name)
            junction_id, had_password = row.id, row.has_password
            change.details = {"server": row.server}
            change.session.delete(row)
            if had_password:
                change.after_commit(lambda: self._ctx.secrets.delete(_secret_name(junction_id)))

    @staticmethod
    def _row(session: Session, name: str) -> DirectoryJunction:
        row = session.scalars(select(DirectoryJunction).where(DirectoryJunction.name == name)).one_or_none()
        if row is None:
            raise NotFound(f"There is no directory junction named {name!r}.")
        return row


# --- talking to the directory ---------------------------------------------------------------------


def junction_settings(row: DirectoryJunction, secrets: SecretStore) -> DirectorySettings:
    """How to reach ``row``'s directory, with its bind password from the keyring."""
    from app.directory import DirectorySettings

    return DirectorySettings(
        server=row.server, port=row.port, security=row.security, base_dn=row.base_dn,
        bind_account=row.bind_account,
        bind_password=secrets.get(_secret_name(row.id)) if row.has_password else None,
        ca_certificate=row.ca_certificate, attribute_map={**DEFAULT_ATTRIBUTES, **(row.attribute_map or {})},
    )


def enabled_junctions(session: Session, secrets: SecretStore) -> list[tuple[str, DirectorySettings]]:
    """Every enabled junction's name and settings, in name order (the order sign-in tries them)."""
    rows = session.scalars(
        select(DirectoryJunction).where(DirectoryJunction.enabled.is_(True)).order_by(DirectoryJunction.name)
    ).all()
    return [(row.name, junction_settings(row, secrets)) for row in rows]


def ask_about_user(
    junctions: Sequence[tuple[str, DirectorySettings]], user: str,
    read: Callable[[DirectoryClient, DirectoryPrincipal], T],
) -> tuple[str, DirectoryPrincipal, T]:
    """Find ``user`` (a name, ``DOMAIN\\user``, UPN or SID) in the first junction that knows them and
    ``read`` what the caller needs while connected: returns the junction's name, the user and what
    ``read`` returned. :class:`NotFound` when no junction is configured or none knows the user; the last
    directory error when a junction could not be asked and no other one knew the user."""
    from app.directory import DirectoryClient, DirectoryError, PrincipalType

    if not junctions:
        raise NotFound("No directory junction is configured: add one with `layerctl directory add`.")
    unreachable: DirectoryError | None = None
    for name, settings in junctions:
        with DirectoryClient(settings) as client:
            try:
                principal = client.resolve(user, PrincipalType.USER)
                return name, principal, read(client, principal)
            except NotFound:
                continue
            except DirectoryError as failure:
                unreachable = failure
                continue
    if unreachable is not None:
        raise unreachable
    raise NotFound(f"No directory junction knows a user named {user!r}.")


class DirectoryLookup(Service):
    """Questions to the directories behind the junctions. Reads only: nothing here changes the catalog.

    Testing a junction uses its bind password, so it is the Administrator's (a refusal is audited);
    finding users and groups (for role grants, assignments, the picker) is open to every role."""

    @classmethod
    def for_services(cls, services: Services) -> DirectoryLookup:
        return cls(ServiceContext(catalog=services.catalog, caller=services.caller, secrets=services.secrets))

    def test_junction(self, name: str) -> ConnectionReport:
        """Try the junction step by step (TCP, TLS, bind, search); the report says which step failed."""
        try:
            self.caller.require(Operation.EDIT_DIRECTORY)
        except PermissionDenied as denied:
            self._audit_denied("directory.test", "directory junction", name, "", str(denied))
            raise
        from app.directory import DirectoryClient

        with self.catalog.read() as session:
            settings = junction_settings(DirectoryService._row(session, name), self._ctx.secrets)
        with DirectoryClient(settings) as client:
            report = client.test_connection()
        log.info("tested directory junction %s: %s", name, "ok" if report.ok else report.failure)
        return report

    def _settings(self, junction: str | None) -> list[tuple[str, DirectorySettings]]:
        with self._read() as session:
            if junction is not None:
                row = DirectoryService._row(session, junction)
                return [(row.name, junction_settings(row, self._ctx.secrets))]
            found = enabled_junctions(session, self._ctx.secrets)
        if not found:
            raise NotFound("No directory junction is configured: add one with `layerctl directory add`.")
        return found

    def search_principals(self, text: str, limit: int = 20, *, junction: str | None = None) -> list[DirectoryPrincipal]:
        """Users and groups whose names start with ``text`` (the picker's search-as-you-type), from every
        enabled junction (or the one named), at most ``limit``."""
        if not 1 <= limit <= 1000:
            raise ValidationError("The limit must be between 1 and 1000.", field="limit")
        from app.directory import DirectoryClient

        found: list[DirectoryPrincipal] = []
        for _name, settings in self._settings(junction):
            with DirectoryClient(settings) as client:
                found.extend(client.search_principals(text, limit - len(found)))
            if len(found) >= limit:
                break
        return found

    def resolve_principal(self, name: str, kind: PrincipalType | None = None, *,
                          junction: str | None = None) -> DirectoryPrincipal:
        """The user or group ``name`` means (a SID, ``DOMAIN\\name``, ``name@domain`` or a name), from
        the first enabled junction (in name order) that knows it; :class:`NotFound` when none does."""
        from app.directory import DirectoryClient, DirectoryError

        unreachable: DirectoryError | None = None
        for _name, settings in self._settings(junction):
            with DirectoryClient(settings) as client:
                try:
                    return client.resolve(name, kind)
                except NotFound:
                    continue
                except DirectoryError as failure:
                    unreachable = failure
        if unreachable is not None:
            raise unreachable
        what = kind.value if kind else "user or group"
        raise NotFound(f"No directory junction knows a {what} named {name!r}.")
