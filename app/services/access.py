"""Who is calling: built-in administrator, local accounts, role grants and sign-in sessions.

Rules (documented for administrators in README):

* On an embedded catalog with no directory junction and ``require_sign_in`` off, the operating-system
  account that owns the LayerDesk home is its built-in Administrator. Other OS accounts get the roles
  granted to them as ``os_user`` principals (none by default).
* Once sign-in is required (the setting, or any enabled directory junction), every caller signs in.
  ``layerctl login`` keeps a session whose token lives in the OS keyring; the catalog holds only its
  SHA-256 hash and expiry.
* Local accounts' passwords are hashed with argon2id (memory-hard).
* Directory users sign in as ``DOMAIN\\user``, ``user@domain`` (or their UPN), or a bare name that is
  no local account's: the enabled directory junctions are asked in name order. Their roles are the
  union of the roles granted to their SID and to the SIDs of every group they belong to, nested groups
  included (the directory's ``tokenGroups``); they are fixed for the session's life. A directory user
  without any role is refused. A bare name that is a local account's is always the local account, so
  the local Administrator stays the way in when the directory cannot be reached.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import os
import secrets as pysecrets
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import argon2
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from app.catalog.database import Catalog
from app.catalog.models import (
    AuditEntry,
    AuditOutcome,
    DirectoryJunction,
    LocalAccount,
    PrincipalKind,
    Role,
    RoleGrant,
    Setting,
    SignInSession,
    utcnow,
)
from app.errors import AuthenticationFailed, Conflict, NotFound, ValidationError
from app.secrets import SecretStore
from app.services.base import Service
from app.services.rbac import Caller, Operation
from app.services.settings import INSTALLATION_ID, read_setting
from app.services.validation import choice, validate_name, validate_sid
from app.services.views import AccountInfo, RoleGrantInfo

if TYPE_CHECKING:
    from app.directory import DirectorySettings

SESSION_TTL = timedelta(hours=12)
MIN_PASSWORD_LENGTH = 8
_hasher = argon2.PasswordHasher()  # argon2id, 64 MiB, 3 passes


def hash_password(password: str) -> str:
    return _hasher.hash(password)


_dummy_hash: str | None = None


def _verify_nobody(password: str) -> None:
    """Spend a password check on an unknown user name, so a refusal takes as long either way."""
    global _dummy_hash
    if _dummy_hash is None:
        _dummy_hash = hash_password(pysecrets.token_urlsafe(16))
    with contextlib.suppress(argon2.exceptions.VerificationError):
        _hasher.verify(_dummy_hash, password)


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def current_os_user() -> str:
    return getpass.getuser()


def home_owner(root: Path) -> str:
    """The OS account that owns the LayerDesk home folder."""
    if os.name == "nt":
        # The home is under the user's own profile; its creator is the current account.
        return current_os_user()
    import pwd

    uid = root.stat().st_uid
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def sign_in_required(session: Session) -> bool:
    if bool(read_setting(session, "require_sign_in")):
        return True
    junctions = session.scalar(
        select(func.count()).select_from(DirectoryJunction).where(DirectoryJunction.enabled.is_(True))
    )
    return bool(junctions)


def granted_roles(session: Session, kind: PrincipalKind, principals: list[str]) -> frozenset[Role]:
    if not principals:
        return frozenset()
    rows = session.scalars(
        select(RoleGrant.role).where(RoleGrant.principal_kind == kind, RoleGrant.principal.in_(principals))
    ).all()
    return frozenset(rows)


def embedded_caller(catalog: Catalog, root: Path) -> Caller | None:
    """The caller when no sign-in is needed, or ``None`` when it is."""
    with catalog.read() as session:
        if sign_in_required(session):
            return None
        user = current_os_user()
        if user == home_owner(root):
            return Caller(user, frozenset({Role.ADMINISTRATOR}), PrincipalKind.OS_USER, builtin=True)
        return Caller(user, granted_roles(session, PrincipalKind.OS_USER, [user]), PrincipalKind.OS_USER)


def session_caller(catalog: Catalog, token: str | None) -> Caller:
    """The caller a ``layerctl login`` session stands for."""
    if not token:
        raise AuthenticationFailed("Sign-in is required: run `layerctl login` (or sign in in the console).")
    with catalog.read() as session:
        row = session.scalars(select(SignInSession).where(SignInSession.token_hash == _token_hash(token))).one_or_none()
        if row is None:
            raise AuthenticationFailed("Your session is no longer valid: sign in again with `layerctl login`.")
        if row.expires_at <= utcnow():
            raise AuthenticationFailed("Your session expired: sign in again with `layerctl login`.")
        if row.principal_kind is PrincipalKind.LOCAL_USER:
            account = session.scalars(select(LocalAccount).where(LocalAccount.username == row.username)).one_or_none()
            if account is None or account.disabled:
                raise AuthenticationFailed(f"The account {row.username!r} is disabled or was deleted.")
            roles = granted_roles(session, PrincipalKind.LOCAL_USER, [account.username])
        else:
            roles = frozenset(Role(r) for r in row.roles)
        return Caller(row.username, roles, row.principal_kind)


def sign_in(catalog: Catalog, username: str, password: str, *, now: datetime | None = None,
            secrets: SecretStore | None = None) -> tuple[str, Caller]:
    """Check a local account's or a directory user's password; return a new session token and the caller.

    The same message is given for an unknown account and a wrong password, so a guesser learns
    nothing; a disabled account is told apart because only its owner can know the password. Directory
    users get the directory's own reason (disabled, expired, locked…). ``secrets`` holds the junctions'
    bind passwords (default: this installation's keyring entries).
    """
    now = now or utcnow()
    with catalog.read() as session:
        local = session.scalars(select(LocalAccount.id).where(LocalAccount.username == username)).first()
        directory_name = "@" in username or "\\" in username or local is None
        if directory_name and session.scalar(
                select(func.count()).select_from(DirectoryJunction).where(DirectoryJunction.enabled.is_(True))):
            if secrets is None:
                row = session.get(Setting, INSTALLATION_ID)
                secrets = SecretStore(str(row.value) if row is not None else "")
            from app.services.directory import enabled_junctions

            junctions = enabled_junctions(session, secrets)
        else:
            junctions = []
    if junctions:
        return _directory_sign_in(catalog, junctions, username, password, now)
    refused = "The user name or password is incorrect."
    with catalog.write() as session:
        account = session.scalars(select(LocalAccount).where(LocalAccount.username == username)).one_or_none()
        ok = False
        if account is None:
            _verify_nobody(password)
        else:
            try:
                ok = _hasher.verify(account.password_hash, password)
            except argon2.exceptions.VerificationError:
                ok = False
            except argon2.exceptions.InvalidHashError:
                ok = False
        if not ok or account is None:
            if account is not None:
                account.failed_sign_ins += 1
            session.add(_sign_in_audit(username, now, AuditOutcome.DENIED, "wrong user name or password"))
            outcome: Exception = AuthenticationFailed(refused)
        elif account.disabled:
            session.add(_sign_in_audit(username, now, AuditOutcome.DENIED, "account disabled"))
            outcome = AuthenticationFailed(f"The account {account.username!r} is disabled; ask an Administrator.")
        else:
            if _hasher.check_needs_rehash(account.password_hash):
                account.password_hash = hash_password(password)
            account.failed_sign_ins = 0
            roles = granted_roles(session, PrincipalKind.LOCAL_USER, [account.username])
            token = _open_session(session, account.username, PrincipalKind.LOCAL_USER, roles, now)
            session.add(_sign_in_audit(account.username, now, AuditOutcome.SUCCESS, ""))
            return token, Caller(account.username, roles, PrincipalKind.LOCAL_USER)
    raise outcome


def _directory_sign_in(catalog: Catalog, junctions: list[tuple[str, DirectorySettings]], username: str,
                       password: str, now: datetime) -> tuple[str, Caller]:
    """Ask each enabled junction in turn; the first that accepts the password decides the roles."""
    from app.directory import AuthenticatedUser, DirectoryClient, DirectoryError, SignInRefused

    accepted: tuple[str, AuthenticatedUser] | None = None
    failure: DirectoryError | SignInRefused | None = None
    for name, settings in junctions:
        try:
            with DirectoryClient(settings) as client:
                accepted = (name, client.authenticate(username, password))
            break
        except SignInRefused as refused:
            if refused.reason != "wrong_credentials":
                failure = refused
                break
            failure = failure or refused  # perhaps another junction knows this name
        except DirectoryError as unusable:
            # The user may be this directory's: say it could not be asked, not that the password is wrong.
            failure = unusable if failure is None or isinstance(failure, SignInRefused) else failure
    if accepted is None:
        assert failure is not None
        why = getattr(failure, "reason", "refused")
        with catalog.write() as session:
            session.add(_sign_in_audit(username, now, AuditOutcome.DENIED, f"directory: {why}"))
        raise failure
    junction, user = accepted
    principal = user.principal
    with catalog.write() as session:
        roles = granted_roles(session, PrincipalKind.AD_USER, [principal.sid]) | granted_roles(
            session, PrincipalKind.AD_GROUP, sorted(user.group_sids))
        if not roles:
            session.add(_sign_in_audit(principal.qualified_name, now, AuditOutcome.DENIED, "no LayerDesk role"))
            outcome = AuthenticationFailed(
                f"{principal.qualified_name} signed in to the directory but holds no LayerDesk role: ask an "
                f"Administrator to grant one (`layerctl role grant ROLE --user {principal.qualified_name}`)."
            )
        else:
            token = _open_session(session, principal.qualified_name, PrincipalKind.AD_USER, roles, now)
            entry = _sign_in_audit(principal.qualified_name, now, AuditOutcome.SUCCESS, "")
            entry.change = {"directory": junction, "sid": principal.sid}
            session.add(entry)
            return token, Caller(principal.qualified_name, roles, PrincipalKind.AD_USER,
                                 display_name=principal.display_name)
    raise outcome


def _open_session(session: Session, username: str, kind: PrincipalKind, roles: frozenset[Role], now: datetime) -> str:
    """Record a new sign-in session (its token's hash, the roles it carries, when it expires), drop expired
    ones, and return the token (kept by the caller in the OS keyring, never in the catalog)."""
    token = pysecrets.token_urlsafe(32)
    session.add(SignInSession(token_hash=_token_hash(token), username=username, principal_kind=kind,
                              roles=sorted(r.value for r in roles), created_at=now, expires_at=now + SESSION_TTL))
    session.execute(delete(SignInSession).where(SignInSession.expires_at <= now))
    return token


def sign_out(catalog: Catalog, token: str) -> None:
    with catalog.write() as session:
        session.execute(delete(SignInSession).where(SignInSession.token_hash == _token_hash(token)))


def _sign_in_audit(username: str, at: datetime, outcome: AuditOutcome, why: str) -> AuditEntry:
    return AuditEntry(
        at=at,
        user=username,
        operation="session.sign_in",
        object_type="session",
        object_name=username,
        change={"reason": why} if why else {},
        comment="",
        outcome=outcome,
    )


def _role(value: object) -> Role:
    return choice(Role, value, "role")


def _principal_kind(value: object) -> PrincipalKind:
    return choice(PrincipalKind, value, "principal kind")


def _check_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ValidationError(f"The password must have at least {MIN_PASSWORD_LENGTH} characters.", field="password")
    if password != password.strip():
        raise ValidationError("The password starts or ends with white space.", field="password")
    return password


class AccessService(Service):
    """Local accounts and role grants (Administrator only)."""

    def list_accounts(self) -> list[AccountInfo]:
        with self._read() as session:
            accounts = session.scalars(select(LocalAccount).order_by(LocalAccount.username)).all()
            return [
                AccountInfo(
                    a.username,
                    a.disabled,
                    tuple(sorted(granted_roles(session, PrincipalKind.LOCAL_USER, [a.username]))),
                    a.created_at,
                )
                for a in accounts
            ]

    def list_grants(self) -> list[RoleGrantInfo]:
        with self._read() as session:
            rows = session.scalars(select(RoleGrant).order_by(RoleGrant.principal, RoleGrant.role)).all()
            return [
                RoleGrantInfo(r.id, r.principal_kind, r.principal, r.display_name, r.role, r.granted_at, r.granted_by)
                for r in rows
            ]

    def create_account(self, username: str, password: str, roles: list[Role], *, comment: str = "") -> AccountInfo:
        with self._change(Operation.EDIT_ACCESS, "account.create", "local account", username, comment) as change:
            username = validate_name(username, "user name")
            if "@" in username:
                raise ValidationError("A local user name cannot contain '@' (that is how directory users sign in).")
            session = change.session
            if session.scalars(select(LocalAccount).where(LocalAccount.username == username)).first():
                raise Conflict(f"A local account named {username!r} already exists.")
            account = LocalAccount(username=username, password_hash=hash_password(_check_password(password)),
                                   created_at=self._now())
            session.add(account)
            for role in dict.fromkeys(_role(r) for r in roles):
                session.add(self._grant(PrincipalKind.LOCAL_USER, username, role, username))
            granted = sorted({_role(r) for r in roles})
            change.details = {"roles": [r.value for r in granted]}
            return AccountInfo(username, False, tuple(granted), account.created_at)

    def set_password(self, username: str, password: str, *, comment: str = "") -> None:
        with self._change(Operation.EDIT_ACCESS, "account.password", "local account", username, comment) as change:
            account = self._account(change.session, username)
            account.password_hash = hash_password(_check_password(password))
            change.session.execute(delete(SignInSession).where(SignInSession.username == account.username))
            change.details = {"sessions_ended": True}

    def set_disabled(self, username: str, disabled: bool, *, comment: str = "") -> None:
        action = "account.disable" if disabled else "account.enable"
        with self._change(Operation.EDIT_ACCESS, action, "local account", username, comment) as change:
            account = self._account(change.session, username)
            account.disabled = disabled
            if disabled:
                self._refuse_lockout(change.session)
                change.session.execute(delete(SignInSession).where(SignInSession.username == account.username))
            change.details = {"disabled": disabled}

    def delete_account(self, username: str, *, comment: str = "") -> None:
        with self._change(Operation.EDIT_ACCESS, "account.delete", "local account", username, comment) as change:
            session = change.session
            account = self._account(session, username)
            session.execute(
                delete(RoleGrant).where(
                    RoleGrant.principal_kind == PrincipalKind.LOCAL_USER, RoleGrant.principal == account.username
                )
            )
            session.execute(delete(SignInSession).where(SignInSession.username == account.username))
            session.delete(account)
            session.flush()
            self._refuse_lockout(session)

    def grant_role(
        self, kind: PrincipalKind, principal: str, role: Role, *, display_name: str = "", comment: str = ""
    ) -> RoleGrantInfo:
        kind, role = _principal_kind(kind), _role(role)
        with self._change(Operation.EDIT_ACCESS, "role.grant", "role grant", principal, comment) as change:
            principal = self._principal(change.session, kind, principal)
            exists = change.session.scalars(
                select(RoleGrant).where(
                    RoleGrant.principal_kind == kind, RoleGrant.principal == principal, RoleGrant.role == role
                )
            ).first()
            if exists:
                raise Conflict(f"{principal} already has the {role.value} role.")
            grant = self._grant(kind, principal, role, display_name or principal)
            change.session.add(grant)
            change.session.flush()
            change.details = {"kind": kind.value, "role": role.value}
            return RoleGrantInfo(
                grant.id, kind, principal, grant.display_name, role, grant.granted_at, grant.granted_by
            )

    def revoke_role(self, kind: PrincipalKind, principal: str, role: Role, *, comment: str = "") -> None:
        kind, role = _principal_kind(kind), _role(role)
        with self._change(Operation.EDIT_ACCESS, "role.revoke", "role grant", principal, comment) as change:
            grant = change.session.scalars(
                select(RoleGrant).where(
                    RoleGrant.principal_kind == kind, RoleGrant.principal == principal, RoleGrant.role == role
                )
            ).first()
            if grant is None:
                raise NotFound(f"{principal} ({kind.value}) does not have the {role.value} role.")
            change.session.delete(grant)
            change.session.flush()
            self._refuse_lockout(change.session)
            change.details = {"kind": kind.value, "role": role.value}

    # --- helpers -------------------------------------------------------------------------------

    def _grant(self, kind: PrincipalKind, principal: str, role: Role, display: str) -> RoleGrant:
        return RoleGrant(principal_kind=kind, principal=principal, role=role, display_name=display,
                         granted_at=self._now(), granted_by=self.caller.username)

    @staticmethod
    def _account(session: Session, username: str) -> LocalAccount:
        account = session.scalars(select(LocalAccount).where(LocalAccount.username == username)).one_or_none()
        if account is None:
            raise NotFound(f"There is no local account named {username!r}.")
        return account

    @staticmethod
    def _principal(session: Session, kind: PrincipalKind, principal: str) -> str:
        if kind in (PrincipalKind.AD_USER, PrincipalKind.AD_GROUP):
            return validate_sid(principal)
        if kind is PrincipalKind.LOCAL_USER:
            return AccessService._account(session, principal).username
        return validate_name(principal, "OS account name", max_length=256)

    @staticmethod
    def _refuse_lockout(session: Session) -> None:
        """Never leave a catalog that requires sign-in (the setting, or an enabled directory junction)
        without an enabled local Administrator: with a junction it is the way in when the directory
        cannot be reached (see :func:`app.services.directory._require_break_glass`)."""
        if not sign_in_required(session):
            return
        if not has_enabled_local_administrator(session):
            raise Conflict(
                "This change would leave no enabled local Administrator while sign-in is required, "
                "and nobody could sign in. Grant Administrator to another account first."
            )


def has_enabled_local_administrator(session: Session) -> bool:
    count = session.scalar(
        select(func.count())
        .select_from(LocalAccount)
        .join(
            RoleGrant,
            (RoleGrant.principal == LocalAccount.username) & (RoleGrant.principal_kind == PrincipalKind.LOCAL_USER),
        )
        .where(LocalAccount.disabled.is_(False), RoleGrant.role == Role.ADMINISTRATOR)
    )
    return bool(count)
