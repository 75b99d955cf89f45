"""An Active Directory client over LDAP (ldap3): sign-in, principals by name or SID, nested groups.

Connections are LDAPS or StartTLS with the server's certificate verified (against the junction's CA
certificate when given, else the system's trusted CAs) and its name checked; plain LDAP is used only
when the junction says so. Binds are simple binds (over TLS); the bind account's password comes from
the caller (the OS keyring), never from the catalog. Nothing here logs a password, and every value a
user typed reaches a search filter only through :func:`~app.directory.ldapfilter.escape_filter_value`.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import math
import socket
import ssl
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType, TracebackType
from typing import Any

with warnings.catch_warnings():
    # ldap3 2.9 imports names pyasn1 0.6 has renamed (a DeprecationWarning at import, harmless).
    warnings.simplefilter("ignore", DeprecationWarning)
    from ldap3 import BASE, NONE, SIMPLE, SUBTREE, Connection, Server, Tls
    from ldap3.core.exceptions import LDAPException

from app.catalog.models import DirectorySecurity
from app.directory.errors import (
    WRONG_CREDENTIALS,
    DirectoryError,
    SignInRefused,
    refusal_from_result,
    transport_error,
)
from app.directory.ldapfilter import (
    escape_filter_bytes,
    escape_filter_value,
    is_sid,
    sid_from_bytes,
    sid_to_bytes,
)
from app.errors import NotFound, ValidationError

log = logging.getLogger(__name__)

IN_CHAIN = "1.2.840.113556.1.4.1941"
_PAGED = "1.2.840.113556.1.4.319"
ATTRIBUTE_DEFAULTS: Mapping[str, str] = MappingProxyType({
    "user_login": "sAMAccountName", "user_principal": "userPrincipalName",
    "display_name": "displayName", "group_name": "cn",
})
_USERS = "(&(objectCategory=person)(objectClass=user))"
_GROUPS = "(objectClass=group)"
_ACCOUNT_DISABLED = 0x2


class PrincipalType(enum.StrEnum):
    USER = "user"
    GROUP = "group"


@dataclass(frozen=True)
class DirectorySettings:
    """How to reach one directory (a junction's settings plus its bind password)."""

    server: str
    port: int
    security: DirectorySecurity
    base_dn: str
    bind_account: str = ""
    bind_password: str | None = field(default=None, repr=False)
    #: PEM text of the CA certificate(s) to trust; ``None`` trusts the system's CAs.
    ca_certificate: str | None = field(default=None, repr=False)
    attribute_map: Mapping[str, str] = field(default_factory=lambda: dict(ATTRIBUTE_DEFAULTS))
    timeout_s: float = 10.0
    page_size: int = 500

    def attribute(self, key: str) -> str:
        return self.attribute_map.get(key) or ATTRIBUTE_DEFAULTS[key]


@dataclass(frozen=True)
class DirectoryPrincipal:
    """A user or group as the directory knows it; ``qualified_name`` is ``DOMAIN\\name``."""

    sid: str
    type: PrincipalType
    name: str
    qualified_name: str
    display_name: str
    dn: str
    upn: str | None = None
    enabled: bool = True


@dataclass(frozen=True)
class AuthenticatedUser:
    """A user whose password the directory accepted, with every group they belong to (nested too)."""

    principal: DirectoryPrincipal
    group_sids: frozenset[str]


@dataclass(frozen=True)
class ConnectionStep:
    name: str
    #: ``None`` when the step did not apply or could not run (an earlier step failed).
    ok: bool | None
    detail: str
    elapsed_ms: int = 0


@dataclass(frozen=True)
class ConnectionReport:
    steps: tuple[ConnectionStep, ...]
    warnings: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return all(s.ok is not False for s in self.steps)

    @property
    def failure(self) -> str | None:
        failed = [s for s in self.steps if s.ok is False]
        return failed[0].detail if failed else None


@dataclass(frozen=True)
class DomainInfo:
    netbios_name: str
    dns_name: str
    dn: str


class _VerifiedTls(Tls):
    """ldap3's TLS with Python's own certificate and host name checks, keeping the real TLS failure
    (ldap3 re-wraps it into an exception that loses the verification details)."""

    def __init__(self, context: ssl.SSLContext, host: str) -> None:
        super().__init__(validate=context.verify_mode)
        self._context = context
        self._host = host
        self.failure: BaseException | None = None

    def wrap_socket(self, connection: Any, do_handshake: bool = False) -> None:
        try:
            connection.socket = self._context.wrap_socket(
                connection.socket, server_side=False, do_handshake_on_connect=do_handshake,
                server_hostname=self._host)
        except (ssl.SSLError, OSError) as exc:
            self.failure = exc
            raise


def _tls_context(settings: DirectorySettings) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=settings.ca_certificate or None)
    except ssl.SSLError as exc:
        why = getattr(exc, "reason", None) or exc
        raise ValidationError(f"The junction's CA certificate cannot be used: {why}.") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _text(entry: Mapping[str, Any], attribute: str) -> str:
    values = entry.get("raw_attributes", {}).get(attribute) or []
    return values[0].decode("utf-8", "replace") if values else ""


def _binary(entry: Mapping[str, Any], attribute: str) -> list[bytes]:
    return list(entry.get("raw_attributes", {}).get(attribute) or [])


class DirectoryClient:
    """One directory, used from one thread. Use as a context manager (it closes its connections)."""

    def __init__(self, settings: DirectorySettings) -> None:
        self.settings = settings
        self._service: Connection | None = None
        self._domain: DomainInfo | None = None
        #: Result pages read by the last paged search (tests and diagnostics).
        self.last_search_pages = 0

    def __enter__(self) -> DirectoryClient:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        if self._service is not None:
            _discard(self._service)
            self._service = None

    @property
    def where(self) -> str:
        return f"{self.settings.server}:{self.settings.port}"

    # --- connecting ------------------------------------------------------------------------------

    def _server(self) -> tuple[Server, _VerifiedTls | None]:
        s = self.settings
        tls = None if s.security is DirectorySecurity.PLAIN else _VerifiedTls(_tls_context(s), s.server)
        server = Server(s.server, port=s.port, use_ssl=s.security is DirectorySecurity.LDAPS, tls=tls,
                        get_info=NONE, connect_timeout=s.timeout_s)
        return server, tls

    def _open(self, user: str | None = None, password: str | None = None) -> Connection:
        """An open connection (TLS started as configured), not yet bound."""
        server, tls = self._server()
        connection = Connection(server, user=user, password=password, authentication=SIMPLE if user else None,
                                raise_exceptions=False, receive_timeout=max(1, math.ceil(self.settings.timeout_s)),
                                auto_referrals=False, read_only=True)
        try:
            connection.open()
            if self.settings.security is DirectorySecurity.STARTTLS and not connection.start_tls():
                raise DirectoryError(f"{self.where} refused StartTLS: {connection.result.get('description')}.",
                                     reason="tls_failed")
        except LDAPException as exc:
            _discard(connection)
            raise transport_error(exc, self.settings.server, self.settings.port,
                                  tls.failure if tls else None) from None
        return connection

    def _bind(self, user: str, password: str, *, shown_as: str) -> Connection:
        """A connection bound as ``user``; a refusal raises the error that says why."""
        if not password:
            # An empty password would be an anonymous bind, which succeeds: never let it sign anyone in.
            raise SignInRefused(WRONG_CREDENTIALS, reason="wrong_credentials")
        connection = self._open(user, password)
        try:
            bound = connection.bind()
        except LDAPException as exc:
            _discard(connection)
            raise transport_error(exc, self.settings.server, self.settings.port) from None
        if not bound:
            result = dict(connection.result)
            _discard(connection)
            raise refusal_from_result(result, shown_as)
        return connection

    def _service_connection(self) -> Connection:
        if self._service is None:
            s = self.settings
            if not s.bind_account or not s.bind_password:
                raise DirectoryError("The junction has no bind account password: set it with `layerctl directory "
                                     "update NAME … --password-stdin`.", reason="no_bind_password")
            try:
                self._service = self._bind(s.bind_account, s.bind_password, shown_as=s.bind_account)
            except SignInRefused as refused:
                raise DirectoryError(
                    f"The directory refused the bind account {s.bind_account}: {refused.message} Update the "
                    "junction's bind account or password (`layerctl directory update NAME … --password-stdin`).",
                    reason="bind_account_refused") from None
        return self._service

    # --- test connection -------------------------------------------------------------------------

    def test_connection(self) -> ConnectionReport:
        """Try each step in turn – TCP, TLS, bind, search – and say which one failed and why."""
        s = self.settings
        steps: list[ConnectionStep] = []
        warnings: list[str] = []

        def run(name: str, action: Any) -> bool:
            began = time.monotonic()
            try:
                detail = action()
            except (DirectoryError, SignInRefused, ValidationError) as exc:
                steps.append(ConnectionStep(name, False, exc.message, int((time.monotonic() - began) * 1000)))
                return False
            steps.append(ConnectionStep(name, True, detail, int((time.monotonic() - began) * 1000)))
            return True

        def tcp() -> str:
            try:
                with socket.create_connection((s.server, s.port), timeout=s.timeout_s) as probe:
                    peer = probe.getpeername()
            except OSError as exc:
                raise transport_error(exc, s.server, s.port) from None
            return f"connected to {peer[0]} port {peer[1]}"

        def tls() -> str:
            if s.security is DirectorySecurity.LDAPS:
                context = _tls_context(s)
                try:
                    with socket.create_connection((s.server, s.port), timeout=s.timeout_s) as raw, \
                            context.wrap_socket(raw, server_hostname=s.server) as wrapped:
                        version, cert = wrapped.version(), wrapped.getpeercert() or {}
                except OSError as exc:
                    raise transport_error(exc, s.server, s.port) from None
                return f"{version}, certificate for {_subject(cert)} verified"
            connection = self._open()
            version = getattr(connection.socket, "version", lambda: "TLS")()
            connection.unbind()
            return f"StartTLS: {version}, certificate verified"

        def bind() -> str:
            self._service_connection()
            return f"bound as {s.bind_account}"

        def search() -> str:
            domain = self.domain()
            connection = self._service_connection()
            connection.search(s.base_dn, "(objectClass=*)", BASE, attributes=["distinguishedName"])
            if connection.result.get("result") != 0:
                raise DirectoryError(f"The base DN {s.base_dn} cannot be read: {connection.result.get('description')}"
                                     f" ({connection.result.get('message')}).", reason="search_failed")
            return f"read {s.base_dn} (domain {domain.netbios_name}, {domain.dns_name})"

        if s.security is DirectorySecurity.PLAIN:
            warnings.append("Plain LDAP: passwords cross the network unencrypted. Use LDAPS or StartTLS.")
        ok = run("tcp", tcp)
        if s.security is DirectorySecurity.PLAIN:
            steps.append(ConnectionStep("tls", None, "not used (plain LDAP)"))
        elif ok:
            ok = run("tls", tls)
        ok = ok and run("bind", bind)
        ok = ok and run("search", search)
        done = {step.name for step in steps}
        steps.extend(ConnectionStep(n, None, "not tried (an earlier step failed)")
                     for n in ("tcp", "tls", "bind", "search") if n not in done)
        order = {"tcp": 0, "tls": 1, "bind": 2, "search": 3}
        return ConnectionReport(tuple(sorted(steps, key=lambda x: order[x.name])), tuple(warnings))

    # --- searching -------------------------------------------------------------------------------

    def paged_search(self, search_filter: str, attributes: list[str], *, base: str | None = None,
                     limit: int | None = None) -> Iterator[dict[str, Any]]:
        """Entries matching ``search_filter`` under the base DN, read page by page (``page_size`` at a
        time), stopping after ``limit``. The filter must already hold only escaped values."""
        connection = self._service_connection()
        cookie: bytes | None = None
        returned = 0
        self.last_search_pages = 0
        while True:
            size = self.settings.page_size if limit is None else min(self.settings.page_size, limit - returned)
            connection.search(base or self.settings.base_dn, search_filter, SUBTREE, attributes=attributes,
                              paged_size=size, paged_cookie=cookie)
            result = connection.result
            if result.get("result") not in (0, 4):  # 4: the size limit asked for was reached
                raise DirectoryError(f"A directory search failed: {result.get('description')} "
                                     f"({result.get('message')}).", reason="search_failed")
            self.last_search_pages += 1
            for entry in connection.response or []:
                if entry.get("type") != "searchResEntry":
                    continue  # continuation references to other partitions
                yield entry
                returned += 1
                if limit is not None and returned >= limit:
                    return
            controls = result.get("controls") or {}
            cookie = controls.get(_PAGED, {}).get("value", {}).get("cookie")
            if not cookie:
                return

    def domain(self) -> DomainInfo:
        """The directory's NetBIOS and DNS domain names (for ``DOMAIN\\user`` names)."""
        if self._domain is None:
            connection = self._service_connection()
            connection.search("", "(objectClass=*)", BASE,
                              attributes=["defaultNamingContext", "configurationNamingContext"])
            root = connection.response[0] if connection.response else {}
            naming = _text(root, "defaultNamingContext") or _domain_part(self.settings.base_dn)
            configuration = _text(root, "configurationNamingContext")
            netbios = dns = ""
            if configuration:
                connection.search(f"CN=Partitions,{configuration}",
                                  f"(&(objectClass=crossRef)(nCName={escape_filter_value(naming)}))",
                                  SUBTREE, attributes=["nETBIOSName", "dnsRoot"])
                for entry in connection.response or []:
                    if entry.get("type") == "searchResEntry":
                        netbios, dns = _text(entry, "nETBIOSName"), _text(entry, "dnsRoot")
            dns = dns or _dns_name(naming)
            self._domain = DomainInfo(netbios or dns.split(".")[0].upper(), dns, naming)
        return self._domain

    _PRINCIPAL_ATTRIBUTES = ("objectSid", "objectClass", "distinguishedName", "userAccountControl",
                             "sAMAccountName")

    def _attributes(self) -> list[str]:
        s = self.settings
        names = {*self._PRINCIPAL_ATTRIBUTES, s.attribute("user_login"), s.attribute("user_principal"),
                 s.attribute("display_name"), s.attribute("group_name")}
        return sorted(names)

    def _principal(self, entry: Mapping[str, Any]) -> DirectoryPrincipal:
        s = self.settings
        classes = {c.decode().lower() for c in _binary(entry, "objectClass")}
        kind = PrincipalType.GROUP if "group" in classes else PrincipalType.USER
        sids = _binary(entry, "objectSid")
        name = _text(entry, s.attribute("user_login")) or _text(entry, "sAMAccountName")
        if kind is PrincipalType.GROUP:
            name = _text(entry, "sAMAccountName") or _text(entry, s.attribute("group_name"))
        display = _text(entry, s.attribute("display_name")) or _text(entry, s.attribute("group_name")) or name
        control = _text(entry, "userAccountControl")
        return DirectoryPrincipal(
            sid=sid_from_bytes(sids[0]) if sids else "",
            type=kind,
            name=name,
            qualified_name=f"{self.domain().netbios_name}\\{name}",
            display_name=display,
            dn=str(entry.get("dn", "")),
            upn=_text(entry, s.attribute("user_principal")) or None if kind is PrincipalType.USER else None,
            enabled=not (int(control) & _ACCOUNT_DISABLED) if control.isdigit() else True,
        )

    def _one(self, search_filter: str) -> DirectoryPrincipal | None:
        found = [self._principal(e) for e in self.paged_search(search_filter, self._attributes(), limit=2)]
        if len(found) > 1:
            raise DirectoryError("More than one directory object matches that name; use DOMAIN\\name or the SID.",
                                 reason="ambiguous")
        return found[0] if found else None

    def _user_filter(self, login: str) -> str | None:
        """The filter for the user a sign-in name means in this domain, or ``None`` if it is another
        domain's (``OTHER\\user``, ``user@other.example``)."""
        s = self.settings
        domain = self.domain()
        login = login.strip()
        by_login = s.attribute("user_login")
        if "\\" in login:
            prefix, account = login.split("\\", 1)
            if prefix.casefold() not in (domain.netbios_name.casefold(), domain.dns_name.casefold()):
                return None
            return f"(&{_USERS}({by_login}={escape_filter_value(account)}))"
        if "@" in login:
            account, suffix = login.rsplit("@", 1)
            by_upn = f"({s.attribute('user_principal')}={escape_filter_value(login)})"
            if suffix.casefold() == domain.dns_name.casefold():
                # Accounts without an explicit UPN still sign in as name@dns-domain (the implicit UPN).
                by_upn = f"(|{by_upn}({by_login}={escape_filter_value(account)}))"
            return f"(&{_USERS}{by_upn})"
        return f"(&{_USERS}({by_login}={escape_filter_value(login)}))"

    def find_user(self, login: str) -> DirectoryPrincipal | None:
        """The user a sign-in name (``user``, ``DOMAIN\\user``, ``user@domain``, a UPN) stands for."""
        if not login.strip() or _unusable_name(login):
            return None
        search_filter = self._user_filter(login)
        return self._one(search_filter) if search_filter else None

    def find_group(self, name: str) -> DirectoryPrincipal | None:
        """A group by ``name``, ``DOMAIN\\name`` or its common name."""
        name = name.strip()
        if _unusable_name(name):
            return None
        if "\\" in name:
            prefix, name = name.split("\\", 1)
            if prefix.casefold() != self.domain().netbios_name.casefold():
                return None
        if not name:
            return None
        value = escape_filter_value(name)
        group_name = self.settings.attribute("group_name")
        return self._one(f"(&{_GROUPS}(|(sAMAccountName={value})({group_name}={value})))")

    def principal_by_sid(self, sid: str) -> DirectoryPrincipal | None:
        try:
            data = sid_to_bytes(sid)
        except ValueError as exc:
            raise ValidationError(str(exc)) from None
        return self._one(f"(objectSid={escape_filter_bytes(data)})")

    def resolve(self, name: str, kind: PrincipalType | None = None) -> DirectoryPrincipal:
        """A user or group by SID, ``DOMAIN\\name``, ``name@domain`` or name; raises :class:`NotFound`."""
        text = name.strip()
        found: DirectoryPrincipal | None
        if is_sid(text):
            found = self.principal_by_sid(text)
            if found is not None and kind is not None and found.type is not kind:
                found = None
        elif kind is PrincipalType.GROUP:
            found = self.find_group(text)
        elif kind is PrincipalType.USER:
            found = self.find_user(text)
        else:
            found = self.find_user(text) or self.find_group(text)
        if found is None:
            what = kind.value if kind else "user or group"
            raise NotFound(f"The directory has no {what} named {name!r} (under {self.settings.base_dn}).")
        return found

    def search_principals(self, text: str, limit: int = 20) -> list[DirectoryPrincipal]:
        """Users and groups whose name, display name or UPN starts with ``text`` (a type-ahead picker),
        sorted by name, at most ``limit``."""
        text = text.strip()
        if not text or limit <= 0 or _unusable_name(text):
            return []
        s = self.settings
        value = escape_filter_value(text) + "*"
        names = {"sAMAccountName", s.attribute("user_login"), s.attribute("display_name"),
                 s.attribute("group_name"), s.attribute("user_principal"), "cn"}
        search_filter = (f"(&(|{_USERS}{_GROUPS})(|{''.join(f'({n}={value})' for n in sorted(names))}))")
        found = [self._principal(e) for e in self.paged_search(search_filter, self._attributes(), limit=limit)]
        return sorted(found, key=lambda p: (p.name.casefold(), p.sid))

    # --- groups ----------------------------------------------------------------------------------

    def token_group_sids(self, dn: str) -> frozenset[str]:
        """Every security group ``dn`` belongs to, directly or through other groups, including its
        primary group: the directory's ``tokenGroups``, as Windows builds a sign-in token."""
        connection = self._service_connection()
        connection.search(dn, "(objectClass=*)", BASE, attributes=["tokenGroups"])
        if connection.result.get("result") != 0 or not connection.response:
            raise DirectoryError(f"The groups of {dn} cannot be read: {connection.result.get('description')}.",
                                 reason="search_failed")
        return frozenset(sid_from_bytes(v) for v in _binary(connection.response[0], "tokenGroups"))

    def nested_groups(self, dn: str) -> list[DirectoryPrincipal]:
        """Every group ``dn`` is a member of, directly or through other groups (the in-chain rule),
        security and distribution groups alike, sorted by name."""
        found = [self._principal(e) for e in
                 self.paged_search(f"(&{_GROUPS}(member:{IN_CHAIN}:={escape_filter_value(dn)}))", self._attributes())]
        return sorted(found, key=lambda p: p.name.casefold())

    # --- sign-in ---------------------------------------------------------------------------------

    def authenticate(self, login: str, password: str) -> AuthenticatedUser:
        """Check ``password`` for the user ``login`` names (``user``, ``DOMAIN\\user``, ``user@domain``,
        a UPN). Returns the user and all their group SIDs, or raises :class:`SignInRefused` (the
        directory's reason: wrong password, disabled, expired, locked…) or :class:`DirectoryError`."""
        if not password:
            raise SignInRefused("Give the password.", reason="wrong_credentials")
        user = self.find_user(login) if login.strip() else None
        if user is None:
            raise SignInRefused(WRONG_CREDENTIALS, reason="wrong_credentials")
        # The bind proves the password; the directory says why it refuses one (disabled, locked…).
        self._bind(user.dn, password, shown_as=user.qualified_name).unbind()
        groups = set(self.token_group_sids(user.dn))
        log.info("directory sign-in of %s accepted by %s (%d groups)", user.qualified_name, self.where, len(groups))
        return AuthenticatedUser(user, frozenset(groups))


def _discard(connection: Connection) -> None:
    """Close a connection that may already be broken, without raising."""
    with contextlib.suppress(LDAPException, OSError):
        connection.unbind()
    raw = getattr(connection, "socket", None)
    if raw is not None:
        with contextlib.suppress(OSError):
            raw.close()


def _unusable_name(text: str) -> bool:
    """Directory names hold no control characters; some servers end a value at NUL, so a name with
    one is refused before it reaches a filter (where it is escaped all the same)."""
    return any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in text)


def _domain_part(dn: str) -> str:
    parts = [p.strip() for p in dn.split(",")]
    return ",".join(p for p in parts if p.upper().startswith("DC="))


def _dns_name(dn: str) -> str:
    return ".".join(p.split("=", 1)[1] for p in (x.strip() for x in dn.split(",")) if p.upper().startswith("DC="))


def _subject(cert: Mapping[str, Any]) -> str:
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return "the server"
