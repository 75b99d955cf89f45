"""Local accounts, sign-in sessions, role grants, lockout guards and who the caller is
(:mod:`app.services.access`)."""

from __future__ import annotations

import getpass
import hashlib
import os
import statistics
import time
from datetime import timedelta

import argon2
import pytest
from sqlalchemy import select

from app.catalog.database import Catalog
from app.catalog.models import (
    AuditOutcome,
    LocalAccount,
    PrincipalKind,
    Role,
    SignInSession,
    utcnow,
)
from app.errors import AuthenticationFailed, Conflict, NotFound, PermissionDenied, ValidationError
from app.paths import Home
from app.services import Services, resolve_caller
from app.services import access as access_module
from app.services.access import (
    SESSION_TTL,
    embedded_caller,
    session_caller,
    sign_in,
    sign_out,
)
from app.services.directory import JunctionSpec
from tests.conftest import ServicesFactory
from tests.support.catalog_checks import catalog_bytes, snapshot

PASSWORD = "correct horse battery"
SID = "S-1-5-21-3623811015-3361044348-30300820-1013"
GROUP_SID = "S-1-5-21-3623811015-3361044348-30300820-2101"
JUNCTION = JunctionSpec(server="dc1.lab.test", base_dn="DC=lab,DC=test", bind_account=r"LAB\svc")
GENERIC_REFUSAL = "The user name or password is incorrect."



def account_row(catalog: Catalog, username: str) -> LocalAccount | None:
    with catalog.read() as session:
        return session.scalars(select(LocalAccount).where(LocalAccount.username == username)).one_or_none()


def sessions(catalog: Catalog) -> list[SignInSession]:
    with catalog.read() as session:
        return list(session.scalars(select(SignInSession).order_by(SignInSession.id)))


# --- local accounts -------------------------------------------------------------------------------


def test_create_account_stores_an_argon2id_hash_and_never_the_password(admin: Services) -> None:
    info = admin.access.create_account("alice", PASSWORD, [Role.MANAGE_APP_LAYERS, Role.READ_ONLY])
    assert info.username == "alice"
    assert info.disabled is False
    assert set(info.roles) == {Role.MANAGE_APP_LAYERS, Role.READ_ONLY}

    row = account_row(admin.catalog, "alice")
    assert row is not None
    assert row.password_hash.startswith("$argon2id$")
    assert PASSWORD not in row.password_hash
    assert argon2.PasswordHasher().verify(row.password_hash, PASSWORD)
    assert PASSWORD.encode() not in catalog_bytes(admin.catalog)

    (listed,) = admin.access.list_accounts()
    assert (listed.username, listed.disabled, set(listed.roles)) == (
        "alice", False, {Role.MANAGE_APP_LAYERS, Role.READ_ONLY}
    )
    (entry,) = admin.audit.list_entries(operation="account.create")
    assert (entry.user, entry.object_name, entry.outcome) == ("admin", "alice", AuditOutcome.SUCCESS)
    assert entry.change == {"roles": [Role.MANAGE_APP_LAYERS.value, Role.READ_ONLY.value]}


def test_two_accounts_with_the_same_password_get_different_hashes(admin: Services) -> None:
    admin.access.create_account("alice", PASSWORD, [])
    admin.access.create_account("bob", PASSWORD, [])
    alice, bob = account_row(admin.catalog, "alice"), account_row(admin.catalog, "bob")
    assert alice is not None and bob is not None
    assert alice.password_hash != bob.password_hash  # salted


@pytest.mark.parametrize(
    ("password", "message"),
    [
        ("", "at least 8 characters"),
        ("seven77", "at least 8 characters"),
        (" leading-space", "starts or ends with white space"),
        ("trailing-space ", "starts or ends with white space"),
    ],
)
def test_an_unacceptable_password_creates_no_account(admin: Services, password: str, message: str) -> None:
    before = snapshot(admin.catalog)
    with pytest.raises(ValidationError, match=message):
        admin.access.create_account("alice", password, [Role.ADMINISTRATOR])
    assert snapshot(admin.catalog) == before


def test_eight_characters_are_enough(admin: Services) -> None:
    admin.access.create_account("alice", "exactly8", [])
    sign_in(admin.catalog, "alice", "exactly8")


def test_a_duplicate_account_is_refused_ignoring_case(admin: Services) -> None:
    admin.access.create_account("alice", PASSWORD, [Role.READ_ONLY])
    before = snapshot(admin.catalog)
    for name in ("alice", "ALICE"):
        with pytest.raises(Conflict, match="already exists"):
            admin.access.create_account(name, "another password", [Role.ADMINISTRATOR])
    assert snapshot(admin.catalog) == before


@pytest.mark.parametrize(
    ("username", "message"),
    [
        ("alice@lab.test", "cannot contain '@'"),
        ("@", "cannot contain '@'"),
        ("", "empty"),
        (r"LAB\alice", "Windows does not allow"),
        (" alice", "starts or ends with a space"),
    ],
)
def test_invalid_local_user_names_are_refused(admin: Services, username: str, message: str) -> None:
    before = snapshot(admin.catalog)
    with pytest.raises(ValidationError, match=message):
        admin.access.create_account(username, PASSWORD, [Role.ADMINISTRATOR])
    assert snapshot(admin.catalog) == before


def test_unknown_accounts_are_not_found(admin: Services) -> None:
    before = snapshot(admin.catalog)
    for change in (
        lambda: admin.access.set_password("ghost", PASSWORD),
        lambda: admin.access.set_disabled("ghost", True),
        lambda: admin.access.delete_account("ghost"),
    ):
        with pytest.raises(NotFound, match="no local account named 'ghost'"):
            change()
    assert snapshot(admin.catalog) == before


def test_delete_account_removes_its_grants_and_sessions(admin: Services) -> None:
    admin.access.create_account("alice", PASSWORD, [Role.MANAGE_APP_LAYERS])
    token, _ = sign_in(admin.catalog, "alice", PASSWORD)
    admin.access.delete_account("alice")
    assert account_row(admin.catalog, "alice") is None
    assert admin.access.list_grants() == []
    assert sessions(admin.catalog) == []
    with pytest.raises(AuthenticationFailed, match="no longer valid"):
        session_caller(admin.catalog, token)


# --- signing in -----------------------------------------------------------------------------------


def test_sign_in_returns_a_token_whose_sha256_only_is_stored(admin: Services) -> None:
    admin.access.create_account("alice", PASSWORD, [Role.MANAGE_OS_LAYERS])
    now = utcnow()
    token, caller = sign_in(admin.catalog, "alice", PASSWORD, now=now)
    assert len(token) >= 32
    assert (caller.username, caller.roles, caller.kind) == (
        "alice", frozenset({Role.MANAGE_OS_LAYERS}), PrincipalKind.LOCAL_USER
    )
    (row,) = sessions(admin.catalog)
    assert row.token_hash == hashlib.sha256(token.encode()).hexdigest()
    assert row.username == "alice"
    assert row.roles == [Role.MANAGE_OS_LAYERS.value]
    assert row.expires_at == now + SESSION_TTL
    assert token.encode() not in catalog_bytes(admin.catalog)
    assert session_caller(admin.catalog, token) == caller
    (entry,) = admin.audit.list_entries(operation="session.sign_in")
    assert (entry.user, entry.outcome) == ("alice", AuditOutcome.SUCCESS)


def test_each_sign_in_gets_its_own_token(admin: Services) -> None:
    admin.access.create_account("alice", PASSWORD, [])
    first, _ = sign_in(admin.catalog, "alice", PASSWORD)
    second, _ = sign_in(admin.catalog, "alice", PASSWORD)
    assert first != second
    assert len(sessions(admin.catalog)) == 2


def test_user_names_sign_in_ignoring_case(admin: Services) -> None:
    admin.access.create_account("alice", PASSWORD, [Role.READ_ONLY])
    _, caller = sign_in(admin.catalog, "ALICE", PASSWORD)
    assert caller.username == "alice"


def test_wrong_password_and_unknown_user_get_the_same_message(admin: Services) -> None:
    admin.access.create_account("alice", PASSWORD, [Role.ADMINISTRATOR])
    with pytest.raises(AuthenticationFailed) as wrong:
        sign_in(admin.catalog, "alice", "not the password")
    with pytest.raises(AuthenticationFailed) as unknown:
        sign_in(admin.catalog, "mallory", "not the password")
    assert str(wrong.value) == str(unknown.value) == GENERIC_REFUSAL
    assert sessions(admin.catalog) == []


def test_failed_sign_ins_are_audited_as_denied_and_counted(admin: Services) -> None:
    admin.access.create_account("alice", PASSWORD, [])
    for user, password in (("alice", "wrong-one"), ("mallory", "guess-1"), ("alice", "wrong-two")):
        with pytest.raises(AuthenticationFailed):
            sign_in(admin.catalog, user, password)
    denied = admin.audit.list_entries(operation="session.sign_in", outcome=AuditOutcome.DENIED)
    assert [e.user for e in denied] == ["alice", "mallory", "alice"]  # newest first
    assert all(e.change == {"reason": "wrong user name or password"} for e in denied)
    assert all("wrong-" not in str(e.change) and "guess" not in str(e.change) for e in denied)
    row = account_row(admin.catalog, "alice")
    assert row is not None and row.failed_sign_ins == 2

    sign_in(admin.catalog, "alice", PASSWORD)
    row = account_row(admin.catalog, "alice")
    assert row is not None and row.failed_sign_ins == 0


def test_an_unknown_user_costs_a_password_check_too(admin: Services) -> None:
    """Otherwise the time a refusal takes tells a guesser which user names exist."""
    admin.access.create_account("alice", PASSWORD, [])

    def timed(user: str) -> float:
        samples = []
        for _ in range(3):
            start = time.perf_counter()
            with pytest.raises(AuthenticationFailed):
                sign_in(admin.catalog, user, "not the password")
            samples.append(time.perf_counter() - start)
        return statistics.median(samples)

    known, unknown = timed("alice"), timed("mallory")
    # A password check takes tens of milliseconds; skipping it is a hundred times faster.
    assert unknown > known * 0.3, (known, unknown)


def test_a_disabled_account_is_told_so_only_with_the_right_password(admin: Services) -> None:
    admin.access.create_account("alice", PASSWORD, [Role.ADMINISTRATOR])
    admin.access.create_account("root2", PASSWORD, [Role.ADMINISTRATOR])
    admin.access.set_disabled("alice", True)
    with pytest.raises(AuthenticationFailed) as refused:
        sign_in(admin.catalog, "alice", PASSWORD)
    assert str(refused.value) == "The account 'alice' is disabled; ask an Administrator."
    with pytest.raises(AuthenticationFailed) as wrong:
        sign_in(admin.catalog, "alice", "not the password")
    assert str(wrong.value) == GENERIC_REFUSAL
    assert sessions(admin.catalog) == []
    reasons = [e.change for e in admin.audit.list_entries(operation="session.sign_in", outcome=AuditOutcome.DENIED)]
    assert reasons == [{"reason": "wrong user name or password"}, {"reason": "account disabled"}]

    admin.access.set_disabled("alice", False)
    _, caller = sign_in(admin.catalog, "alice", PASSWORD)
    assert caller.roles == frozenset({Role.ADMINISTRATOR})


def test_a_session_expires_after_its_lifetime(admin: Services) -> None:
    admin.access.create_account("alice", PASSWORD, [Role.READ_ONLY])
    stale, _ = sign_in(admin.catalog, "alice", PASSWORD, now=utcnow() - SESSION_TTL - timedelta(minutes=1))
    with pytest.raises(AuthenticationFailed) as refused:
        session_caller(admin.catalog, stale)
    assert str(refused.value) == "Your session expired: sign in again with `layerctl login`."
    fresh, _ = sign_in(admin.catalog, "alice", PASSWORD, now=utcnow() - SESSION_TTL + timedelta(minutes=5))
    assert session_caller(admin.catalog, fresh).username == "alice"


def test_signing_in_clears_expired_sessions(admin: Services) -> None:
    admin.access.create_account("alice", PASSWORD, [])
    sign_in(admin.catalog, "alice", PASSWORD, now=utcnow() - timedelta(days=3))
    assert len(sessions(admin.catalog)) == 1
    token, _ = sign_in(admin.catalog, "alice", PASSWORD)
    (row,) = sessions(admin.catalog)
    assert row.token_hash == hashlib.sha256(token.encode()).hexdigest()


@pytest.mark.parametrize("token", [None, ""])
def test_no_token_means_sign_in_is_required(admin: Services, token: str | None) -> None:
    with pytest.raises(AuthenticationFailed) as refused:
        session_caller(admin.catalog, token)
    assert str(refused.value) == "Sign-in is required: run `layerctl login` (or sign in in the console)."


def test_an_unknown_token_is_no_longer_valid(admin: Services) -> None:
    admin.access.create_account("alice", PASSWORD, [])
    token, _ = sign_in(admin.catalog, "alice", PASSWORD)
    with pytest.raises(AuthenticationFailed) as refused:
        session_caller(admin.catalog, token + "x")
    assert str(refused.value) == "Your session is no longer valid: sign in again with `layerctl login`."


def test_sign_out_ends_the_session(admin: Services) -> None:
    admin.access.create_account("alice", PASSWORD, [])
    token, _ = sign_in(admin.catalog, "alice", PASSWORD)
    other, _ = sign_in(admin.catalog, "alice", PASSWORD)
    sign_out(admin.catalog, token)
    with pytest.raises(AuthenticationFailed, match="no longer valid"):
        session_caller(admin.catalog, token)
    assert session_caller(admin.catalog, other).username == "alice"


def test_set_password_ends_every_session_of_the_account(admin: Services) -> None:
    admin.access.create_account("alice", PASSWORD, [])
    admin.access.create_account("bob", PASSWORD, [])
    token, _ = sign_in(admin.catalog, "alice", PASSWORD)
    bobs, _ = sign_in(admin.catalog, "bob", PASSWORD)
    admin.access.set_password("alice", "a brand new password")
    with pytest.raises(AuthenticationFailed, match="no longer valid"):
        session_caller(admin.catalog, token)
    assert session_caller(admin.catalog, bobs).username == "bob"
    with pytest.raises(AuthenticationFailed, match="incorrect"):
        sign_in(admin.catalog, "alice", PASSWORD)
    sign_in(admin.catalog, "alice", "a brand new password")
    (entry,) = admin.audit.list_entries(operation="account.password")
    assert entry.change == {"sessions_ended": True}
    assert PASSWORD.encode() not in catalog_bytes(admin.catalog)
    assert b"a brand new password" not in catalog_bytes(admin.catalog)


def test_set_password_refuses_a_short_password_and_keeps_the_old_one(admin: Services) -> None:
    admin.access.create_account("alice", PASSWORD, [])
    token, _ = sign_in(admin.catalog, "alice", PASSWORD)
    before = snapshot(admin.catalog)
    with pytest.raises(ValidationError, match="at least 8"):
        admin.access.set_password("alice", "short")
    assert snapshot(admin.catalog) == before
    assert session_caller(admin.catalog, token).username == "alice"


def test_disabling_an_account_ends_its_sessions(admin: Services) -> None:
    admin.access.create_account("alice", PASSWORD, [Role.READ_ONLY])
    token, _ = sign_in(admin.catalog, "alice", PASSWORD)
    admin.access.set_disabled("alice", True)
    assert [a.disabled for a in admin.access.list_accounts()] == [True]
    with pytest.raises(AuthenticationFailed):
        session_caller(admin.catalog, token)


def test_a_session_of_an_account_disabled_behind_its_back_is_refused(admin: Services) -> None:
    admin.access.create_account("alice", PASSWORD, [Role.READ_ONLY])
    token, _ = sign_in(admin.catalog, "alice", PASSWORD)
    with admin.catalog.write() as session:
        row = session.scalars(select(LocalAccount).where(LocalAccount.username == "alice")).one()
        row.disabled = True
    with pytest.raises(AuthenticationFailed) as refused:
        session_caller(admin.catalog, token)
    assert str(refused.value) == "The account 'alice' is disabled or was deleted."


def test_a_local_session_sees_role_changes_at_once(admin: Services) -> None:
    admin.access.create_account("alice", PASSWORD, [Role.MANAGE_APP_LAYERS])
    token, _ = sign_in(admin.catalog, "alice", PASSWORD)
    admin.access.grant_role(PrincipalKind.LOCAL_USER, "alice", Role.PUBLISH_LAYERED_IMAGES)
    admin.access.revoke_role(PrincipalKind.LOCAL_USER, "alice", Role.MANAGE_APP_LAYERS)
    assert session_caller(admin.catalog, token).roles == frozenset({Role.PUBLISH_LAYERED_IMAGES})


# --- role grants ----------------------------------------------------------------------------------


def test_grants_to_every_kind_of_principal(admin: Services) -> None:
    admin.access.create_account("alice", PASSWORD, [])
    local = admin.access.grant_role(PrincipalKind.LOCAL_USER, "ALICE", Role.MANAGE_APP_LAYERS)
    os_user = admin.access.grant_role(PrincipalKind.OS_USER, "bob", Role.READ_ONLY, display_name="Bob B.")
    ad_user = admin.access.grant_role(PrincipalKind.AD_USER, SID.lower(), Role.MANAGE_OS_LAYERS)
    ad_group = admin.access.grant_role(PrincipalKind.AD_GROUP, GROUP_SID, Role.ADMINISTRATOR,
                                       display_name=r"LAB\Layer Admins")
    assert (local.principal, local.display_name) == ("alice", "alice")  # the account's own spelling
    assert (os_user.principal, os_user.display_name) == ("bob", "Bob B.")
    assert ad_user.principal == SID  # SIDs are kept upper-case
    assert ad_group.display_name == r"LAB\Layer Admins"
    grants = {(g.principal_kind, g.principal, g.role, g.granted_by) for g in admin.access.list_grants()}
    assert grants == {
        (PrincipalKind.LOCAL_USER, "alice", Role.MANAGE_APP_LAYERS, "admin"),
        (PrincipalKind.OS_USER, "bob", Role.READ_ONLY, "admin"),
        (PrincipalKind.AD_USER, SID, Role.MANAGE_OS_LAYERS, "admin"),
        (PrincipalKind.AD_GROUP, GROUP_SID, Role.ADMINISTRATOR, "admin"),
    }
    assert [(e.object_name, e.change) for e in admin.audit.list_entries(operation="role.grant")][-1] == (
        "ALICE", {"kind": "local_user", "role": Role.MANAGE_APP_LAYERS.value}
    )


@pytest.mark.parametrize(
    ("kind", "principal", "error", "message"),
    [
        (PrincipalKind.AD_USER, "alice", ValidationError, "not a Windows security identifier"),
        (PrincipalKind.AD_GROUP, "S-1-5", ValidationError, "not a Windows security identifier"),
        (PrincipalKind.AD_GROUP, "S-1-5-21-x", ValidationError, "not a Windows security identifier"),
        (PrincipalKind.LOCAL_USER, "ghost", NotFound, "no local account named 'ghost'"),
        (PrincipalKind.OS_USER, "", ValidationError, "empty"),
        (PrincipalKind.OS_USER, "bad|name", ValidationError, "Windows does not allow"),
    ],
)
def test_invalid_principals_get_no_grant(
    admin: Services, kind: PrincipalKind, principal: str, error: type[Exception], message: str
) -> None:
    before = snapshot(admin.catalog)
    with pytest.raises(error, match=message):
        admin.access.grant_role(kind, principal, Role.READ_ONLY)
    assert snapshot(admin.catalog) == before


def test_a_duplicate_grant_is_refused(admin: Services) -> None:
    admin.access.grant_role(PrincipalKind.AD_GROUP, GROUP_SID, Role.READ_ONLY)
    before = snapshot(admin.catalog)
    with pytest.raises(Conflict, match="already has the Read Only role"):
        admin.access.grant_role(PrincipalKind.AD_GROUP, GROUP_SID.lower(), Role.READ_ONLY)
    assert snapshot(admin.catalog) == before
    # The same principal may hold another role, and another kind of principal the same role.
    admin.access.grant_role(PrincipalKind.AD_GROUP, GROUP_SID, Role.MANAGE_APP_LAYERS)
    admin.access.grant_role(PrincipalKind.OS_USER, "bob", Role.READ_ONLY)
    assert len(admin.access.list_grants()) == 3


def test_revoke_removes_one_grant(admin: Services) -> None:
    admin.access.grant_role(PrincipalKind.AD_USER, SID, Role.READ_ONLY)
    admin.access.grant_role(PrincipalKind.AD_USER, SID, Role.MANAGE_APP_LAYERS)
    admin.access.revoke_role(PrincipalKind.AD_USER, SID, Role.READ_ONLY)
    assert [(g.principal, g.role) for g in admin.access.list_grants()] == [(SID, Role.MANAGE_APP_LAYERS)]
    (entry,) = admin.audit.list_entries(operation="role.revoke")
    assert entry.change == {"kind": "ad_user", "role": Role.READ_ONLY.value}


def test_revoking_a_grant_that_does_not_exist_is_not_found(admin: Services) -> None:
    admin.access.grant_role(PrincipalKind.AD_USER, SID, Role.READ_ONLY)
    before = snapshot(admin.catalog)
    with pytest.raises(NotFound, match="does not have the Administrator role"):
        admin.access.revoke_role(PrincipalKind.AD_USER, SID, Role.ADMINISTRATOR)
    with pytest.raises(NotFound):
        admin.access.revoke_role(PrincipalKind.AD_GROUP, SID, Role.READ_ONLY)  # same SID, other kind
    assert snapshot(admin.catalog) == before


# --- lockout guards -------------------------------------------------------------------------------


def _require_sign_in(admin: Services) -> None:
    admin.settings.set("require_sign_in", True)


def test_sign_in_cannot_be_required_without_a_local_administrator(admin: Services) -> None:
    admin.access.create_account("alice", PASSWORD, [Role.MANAGE_APP_LAYERS])
    before = snapshot(admin.catalog)
    with pytest.raises(Conflict, match="nobody could sign in"):
        _require_sign_in(admin)
    assert snapshot(admin.catalog) == before
    assert admin.settings.get("require_sign_in") is False


def test_sign_in_cannot_be_required_when_the_only_local_administrator_is_disabled(admin: Services) -> None:
    admin.access.create_account("root2", PASSWORD, [Role.ADMINISTRATOR])
    admin.access.set_disabled("root2", True)
    with pytest.raises(Conflict):
        _require_sign_in(admin)
    assert admin.settings.get("require_sign_in") is False


def test_sign_in_can_be_required_once_a_local_administrator_exists(admin: Services) -> None:
    admin.access.create_account("root2", PASSWORD, [Role.ADMINISTRATOR])
    _require_sign_in(admin)
    assert admin.settings.get("require_sign_in") is True


@pytest.mark.parametrize("how", ["setting", "junction"])
@pytest.mark.parametrize("change", ["disable", "delete", "revoke"])
def test_the_last_local_administrator_stays_while_sign_in_is_required(
    admin: Services, how: str, change: str
) -> None:
    admin.access.create_account("root2", PASSWORD, [Role.ADMINISTRATOR])
    admin.access.create_account("helper", PASSWORD, [Role.MANAGE_APP_LAYERS])
    if how == "setting":
        _require_sign_in(admin)
    else:
        admin.directory.add_junction("Corp", JUNCTION)
    before = snapshot(admin.catalog)
    with pytest.raises(Conflict, match="no enabled local Administrator"):
        {
            "disable": lambda: admin.access.set_disabled("root2", True),
            "delete": lambda: admin.access.delete_account("root2"),
            "revoke": lambda: admin.access.revoke_role(PrincipalKind.LOCAL_USER, "root2", Role.ADMINISTRATOR),
        }[change]()
    assert snapshot(admin.catalog) == before
    # Accounts that are not the last local Administrator come and go as before.
    admin.access.set_disabled("helper", True)
    admin.access.delete_account("helper")


@pytest.mark.parametrize("change", ["disable", "delete", "revoke"])
def test_a_second_local_administrator_may_go(admin: Services, change: str) -> None:
    admin.access.create_account("root1", PASSWORD, [Role.ADMINISTRATOR])
    admin.access.create_account("root2", PASSWORD, [Role.ADMINISTRATOR])
    _require_sign_in(admin)
    {
        "disable": lambda: admin.access.set_disabled("root2", True),
        "delete": lambda: admin.access.delete_account("root2"),
        "revoke": lambda: admin.access.revoke_role(PrincipalKind.LOCAL_USER, "root2", Role.ADMINISTRATOR),
    }[change]()
    with pytest.raises(Conflict):
        admin.access.delete_account("root1")
    assert [a.username for a in admin.access.list_accounts() if Role.ADMINISTRATOR in a.roles
            and not a.disabled] == ["root1"]


def test_without_required_sign_in_the_last_local_administrator_may_go(admin: Services) -> None:
    # The home owner is still the built-in Administrator, so nobody is locked out.
    admin.access.create_account("root2", PASSWORD, [Role.ADMINISTRATOR])
    admin.access.delete_account("root2")
    assert admin.access.list_accounts() == []


# --- who is calling -------------------------------------------------------------------------------


def _as_os_user(monkeypatch: pytest.MonkeyPatch, user: str, owner: str = "homeowner") -> None:
    monkeypatch.setattr(access_module, "current_os_user", lambda: user)
    monkeypatch.setattr(access_module, "home_owner", lambda root: owner)


def test_the_home_owner_is_the_builtin_administrator(
    admin: Services, home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    _as_os_user(monkeypatch, "homeowner")
    caller = embedded_caller(admin.catalog, home.root)
    assert caller is not None
    assert (caller.username, caller.roles, caller.kind, caller.builtin) == (
        "homeowner", frozenset({Role.ADMINISTRATOR}), PrincipalKind.OS_USER, True
    )


def test_the_owner_of_a_real_home_folder_is_recognised(
    admin: Services, home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    if os.name == "nt":
        me = getpass.getuser()  # on Windows the home is in the user's own profile
    else:
        import pwd

        me = pwd.getpwuid(os.getuid()).pw_name
    monkeypatch.setenv("LOGNAME", me)  # what getpass.getuser() reads first
    assert access_module.home_owner(home.root) == me == getpass.getuser()
    caller = embedded_caller(admin.catalog, home.root)
    assert caller is not None and caller.builtin and caller.username == me


def test_another_os_user_gets_only_the_roles_granted_to_them(
    admin: Services, home: Home, monkeypatch: pytest.MonkeyPatch, services_for: ServicesFactory
) -> None:
    _as_os_user(monkeypatch, "guest")
    caller = embedded_caller(admin.catalog, home.root)
    assert caller is not None
    assert (caller.username, caller.roles, caller.builtin) == ("guest", frozenset(), False)
    services = Services.for_caller(home, admin.catalog, caller, admin.secrets)
    with pytest.raises(PermissionDenied, match=r"^guest \(no role\) may not read the catalog"):
        services.layers.list_layers()

    admin.access.grant_role(PrincipalKind.OS_USER, "guest", Role.READ_ONLY)
    admin.access.grant_role(PrincipalKind.OS_USER, "guest", Role.MANAGE_APP_LAYERS)
    admin.access.grant_role(PrincipalKind.OS_USER, "someone-else", Role.ADMINISTRATOR)
    admin.access.grant_role(PrincipalKind.AD_USER, SID, Role.ADMINISTRATOR)
    caller = embedded_caller(admin.catalog, home.root)
    assert caller is not None
    assert caller.roles == frozenset({Role.READ_ONLY, Role.MANAGE_APP_LAYERS})
    assert caller.builtin is False


def test_no_embedded_caller_once_sign_in_is_required(
    admin: Services, home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    _as_os_user(monkeypatch, "homeowner")
    admin.access.create_account("root2", PASSWORD, [Role.ADMINISTRATOR])
    _require_sign_in(admin)
    assert embedded_caller(admin.catalog, home.root) is None
    admin.settings.set("require_sign_in", False)
    assert embedded_caller(admin.catalog, home.root) is not None


def test_an_enabled_directory_junction_makes_sign_in_required(
    admin: Services, home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    _as_os_user(monkeypatch, "homeowner")
    admin.access.create_account("root2", PASSWORD, [Role.ADMINISTRATOR])
    admin.directory.add_junction("Off", JunctionSpec(**{**JUNCTION.__dict__, "enabled": False}))
    assert embedded_caller(admin.catalog, home.root) is not None  # a disabled junction does not count
    admin.directory.add_junction("Corp", JUNCTION)
    assert embedded_caller(admin.catalog, home.root) is None
    _as_os_user(monkeypatch, "guest")
    assert embedded_caller(admin.catalog, home.root) is None


def test_resolve_caller_uses_the_kept_session_once_sign_in_is_required(
    admin: Services, home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    _as_os_user(monkeypatch, "homeowner")
    assert resolve_caller(home, admin.catalog, admin.secrets).builtin is True
    admin.access.create_account("root2", PASSWORD, [Role.ADMINISTRATOR])
    _require_sign_in(admin)
    with pytest.raises(AuthenticationFailed, match="Sign-in is required"):
        resolve_caller(home, admin.catalog, admin.secrets)
    token, _ = sign_in(admin.catalog, "root2", PASSWORD)
    admin.secrets.set("session", token)
    caller = resolve_caller(home, admin.catalog, admin.secrets)
    assert (caller.username, caller.roles, caller.builtin) == ("root2", frozenset({Role.ADMINISTRATOR}), False)


def test_unknown_role_or_principal_kind_is_a_clear_validation_error(admin: Services) -> None:
    with pytest.raises(ValidationError, match="Unknown role 'Superuser'; use one of: Administrator"):
        admin.access.grant_role(PrincipalKind.OS_USER, "bob", "Superuser")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="Unknown principal kind 'computer'"):
        admin.access.grant_role("computer", "bob", Role.READ_ONLY)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="Unknown role 'Root'"):
        admin.access.create_account("carol", "long enough pw", ["Root"])  # type: ignore[list-item]
    assert admin.access.list_grants() == [] and admin.access.list_accounts() == []
