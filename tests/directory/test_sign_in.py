"""Directory sign-in and effective roles, the directory lookups, and the layerctl commands, against
the real Samba AD DC."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from sqlalchemy import select

from app.catalog.models import AuditOutcome, PrincipalKind, Role, SignInSession
from app.directory import DirectoryError, PrincipalType, SignInRefused
from app.errors import AuthenticationFailed, NotFound, PermissionDenied
from app.services import Services
from app.services.access import session_caller, sign_in
from app.services.directory import DirectoryLookup
from tests.conftest import ServicesFactory
from tests.directory.conftest import spec_for
from tests.support import samba_dc
from tests.support.keyring_memory import MemoryKeyring
from tests.support.samba_dc import PASSWORDS, RunningDC
from tests.unit.test_cli import Ctl

BREAK_GLASS_PASSWORD = "break glass 123"


@pytest.fixture
def lab(admin: Services, samba: RunningDC) -> Services:
    """A catalog with a local break-glass Administrator, a junction to the test DC, and role grants:
    All-Staff → Read Only (alice gets it through Finance-Users), alice → Manage App Layers,
    LayerDesk-Admins → Administrator."""
    admin.access.create_account("breakglass", BREAK_GLASS_PASSWORD, [Role.ADMINISTRATOR])
    admin.directory.add_junction("Lab", spec_for(samba), password=samba_dc.BIND_PASSWORD)
    lookup = DirectoryLookup.for_services(admin)
    staff = lookup.resolve_principal("All-Staff", PrincipalType.GROUP)
    admins = lookup.resolve_principal("LayerDesk-Admins", PrincipalType.GROUP)
    alice = lookup.resolve_principal(r"LAB\alice", PrincipalType.USER)
    admin.access.grant_role(PrincipalKind.AD_GROUP, staff.sid, Role.READ_ONLY, display_name=staff.qualified_name)
    admin.access.grant_role(PrincipalKind.AD_GROUP, admins.sid, Role.ADMINISTRATOR, display_name=admins.qualified_name)
    admin.access.grant_role(PrincipalKind.AD_USER, alice.sid, Role.MANAGE_APP_LAYERS, display_name=alice.qualified_name)
    return admin


def _sign_ins(services: Services) -> list[tuple[str, AuditOutcome, dict[str, object]]]:
    """Sign-in audit entries, oldest first."""
    entries = services.audit.list_entries(operation="session.sign_in")
    return [(e.user, e.outcome, e.change) for e in reversed(entries)]


def test_a_directory_users_roles_are_the_union_over_their_nested_groups(lab: Services) -> None:
    token, caller = sign_in(lab.catalog, "alice@lab.test", PASSWORDS["alice"], secrets=lab.secrets)
    assert caller.username == r"LAB\alice" and caller.kind is PrincipalKind.AD_USER
    assert caller.roles == {Role.READ_ONLY, Role.MANAGE_APP_LAYERS}
    assert caller.display_name == "Alice Lab"
    assert session_caller(lab.catalog, token) == caller
    with lab.catalog.read() as session:
        (row,) = session.scalars(select(SignInSession).where(SignInSession.username == r"LAB\alice")).all()
        assert token not in str(row.__dict__) and row.token_hash != token
    alice_sid = DirectoryLookup.for_services(lab).resolve_principal("alice").sid
    assert _sign_ins(lab)[-1] == (r"LAB\alice", AuditOutcome.SUCCESS, {"directory": "Lab", "sid": alice_sid})

    _, bob = sign_in(lab.catalog, r"LAB\bob", PASSWORDS["bob"], secrets=lab.secrets)
    assert bob.roles == {Role.ADMINISTRATOR}


def test_sign_in_finds_the_keyring_by_itself(lab: Services) -> None:
    # The console calls sign_in without a secret store: the installation's keyring entries are used.
    _, caller = sign_in(lab.catalog, "bob", PASSWORDS["bob"])
    assert caller.username == r"LAB\bob"


def test_a_directory_user_without_any_role_is_refused_and_audited(lab: Services) -> None:
    with pytest.raises(AuthenticationFailed, match=r"LAB\\pager001 signed in to the directory but holds no "
                                                   r"LayerDesk role"):
        sign_in(lab.catalog, "pager001", samba_dc.PAGER_PASSWORD, secrets=lab.secrets)
    assert _sign_ins(lab)[-1] == (r"LAB\pager001", AuditOutcome.DENIED, {"reason": "no LayerDesk role"})


@pytest.mark.parametrize(("user", "password", "reason"), [
    ("alice", "wrong password", "wrong_credentials"),
    ("carol", PASSWORDS["carol"], "account_disabled"),
    ("gina", PASSWORDS["gina"], "password_expired"),
    ("erin", PASSWORDS["erin"], "account_expired"),
])
def test_refused_directory_sign_ins_are_audited_with_their_reason(lab: Services, user: str, password: str,
                                                                  reason: str) -> None:
    with pytest.raises(SignInRefused) as refused:
        sign_in(lab.catalog, user, password, secrets=lab.secrets)
    assert refused.value.reason == reason
    assert _sign_ins(lab)[-1] == (user, AuditOutcome.DENIED, {"reason": f"directory: {reason}"})
    assert password not in json.dumps([e.change for e in lab.audit.list_entries()])


def test_the_local_break_glass_account_works_when_the_directory_is_down(lab: Services, samba: RunningDC) -> None:
    with socket.socket() as spare:
        spare.bind(("127.0.0.1", 0))
        dead_port = spare.getsockname()[1]
    lab.directory.update_junction("Lab", spec_for(samba, port=dead_port))
    _, caller = sign_in(lab.catalog, "breakglass", BREAK_GLASS_PASSWORD, secrets=lab.secrets)
    assert caller.kind is PrincipalKind.LOCAL_USER and caller.roles == {Role.ADMINISTRATOR}
    with pytest.raises(DirectoryError) as unreachable:
        sign_in(lab.catalog, "alice", PASSWORDS["alice"], secrets=lab.secrets)
    assert unreachable.value.reason == "unreachable"
    assert _sign_ins(lab)[-1] == ("alice", AuditOutcome.DENIED, {"reason": "directory: unreachable"})


def test_lookups_are_open_to_every_role_but_testing_a_junction_is_the_administrators(
        lab: Services, services_for: ServicesFactory) -> None:
    reader = services_for(Role.READ_ONLY, username="auditor")
    lookup = DirectoryLookup.for_services(reader)
    assert [p.qualified_name for p in lookup.search_principals("Finance")] == [r"LAB\Finance-Users"]
    assert lookup.resolve_principal("bob@lab.test").type is PrincipalType.USER
    with pytest.raises(NotFound):
        lookup.resolve_principal("nobody-here")
    with pytest.raises(PermissionDenied, match="may not change directory junctions"):
        lookup.test_junction("Lab")
    (denied,) = lab.audit.list_entries(outcome=AuditOutcome.DENIED)
    assert (denied.user, denied.operation, denied.object_name) == ("auditor", "directory.test", "Lab")
    assert DirectoryLookup.for_services(lab).test_junction("Lab").ok
    with pytest.raises(PermissionDenied):
        DirectoryLookup.for_services(services_for(username="nobody")).search_principals("a")


# --- layerctl ------------------------------------------------------------------------------------


@pytest.fixture
def ctl(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        memory_keyring: MemoryKeyring) -> Ctl:
    return Ctl(tmp_path / "home", capsys, monkeypatch)


def test_layerctl_directory_sign_in_and_role_grants(ctl: Ctl, samba: RunningDC) -> None:
    ctl.json("init")
    ctl.json("user", "add", "breakglass", "--role", "Administrator", "--password-stdin",
             stdin=BREAK_GLASS_PASSWORD + "\n")
    added = ctl.json("directory", "add", "Lab", "--server", "127.0.0.1", "--ldaps", "--ca-file", str(samba.ca_file),
                     "--base-dn", samba.base_dn, "--bind-user", rf"LAB\{samba_dc.BIND_USER}", "--password-stdin",
                     stdin=samba_dc.BIND_PASSWORD + "\n")
    assert added["port"] == 636 and added["security"] == "ldaps"  # type: ignore[index]
    # An enabled junction makes sign-in required.
    status, _, err = ctl("directory", "test", "Lab")
    assert status == 4 and "layerctl login" in err
    ctl.json("login", "--user", "breakglass", "--password-stdin", stdin=BREAK_GLASS_PASSWORD + "\n")

    report = ctl.json("directory", "test", "Lab")
    assert report["ok"] is True  # type: ignore[index]
    assert [s["name"] for s in report["steps"]] == ["tcp", "tls", "bind", "search"]  # type: ignore[index]
    status, out, _ = ctl("directory", "test", "Lab")
    assert status == 0 and "ok    bind    bound as LAB\\svc-layerdesk" in out

    found = ctl.json("directory", "search", "pager", "--limit", "3")
    assert isinstance(found, list) and len(found) == 3
    assert all(p["qualified_name"].casefold().startswith(r"lab\pager") for p in found)

    grant = ctl.json("role", "grant", "Administrator", "--group", "LayerDesk-Admins", "--comment", "AD admins")
    assert grant["principal_kind"] == "ad_group" and grant["display_name"] == r"LAB\LayerDesk-Admins"  # type: ignore[index]
    assert grant["principal"].startswith("S-1-5-21-")  # type: ignore[index]
    grant = ctl.json("role", "grant", "Read Only", "--user", "alice@lab.test")
    assert grant["principal_kind"] == "ad_user" and grant["display_name"] == r"LAB\alice"  # type: ignore[index]
    grant = ctl.json("role", "grant", "Manage App Layers", "--user", "breakglass")
    assert grant["principal_kind"] == "local_user"  # type: ignore[index]
    status, _, err = ctl("role", "grant", "Read Only", "--group", "No-Such-Group")
    assert status == 5 and "No-Such-Group" in err
    status, _, err = ctl("role", "grant", "Read Only", "--user", "alice", "--group", "All-Staff")
    assert status == 2 and "name one grantee" in err

    who = ctl.json("login", "--user", r"LAB\bob", "--password-stdin", stdin=PASSWORDS["bob"] + "\n")
    assert who == {"username": r"LAB\bob", "roles": ["Administrator"]}
    assert ctl.json("whoami")["kind"] == "ad_user"  # type: ignore[index]
    ctl.json("role", "revoke", "Read Only", "--user", "alice")
    status, _, err = ctl("login", "--user", "alice", "--password-stdin", stdin=PASSWORDS["alice"] + "\n")
    assert status == 4 and "holds no LayerDesk role" in err

    status, _, err = ctl("login", "--user", "carol", "--password-stdin", stdin=PASSWORDS["carol"] + "\n")
    assert status == 4 and r"The account LAB\carol is disabled in the directory" in err
    assert PASSWORDS["carol"] not in err
    status, out, err = ctl("--json", "login", "--user", "alice", "--password-stdin", stdin="nope\n")
    assert status == 4 and json.loads(out)["error"]["code"] == "authentication"


def test_layerctl_directory_add_refuses_a_silent_plain_junction_and_warns_on_plain(ctl: Ctl, samba: RunningDC) -> None:
    ctl.json("init")
    ctl.json("user", "add", "breakglass", "--role", "Administrator", "--password-stdin",
             stdin=BREAK_GLASS_PASSWORD + "\n")
    common = ["--server", "127.0.0.1", "--base-dn", samba.base_dn, "--bind-user", "svc-layerdesk@lab.test",
              "--disabled", "--password-stdin"]
    status, _, err = ctl("directory", "add", "Clear", "--security", "plain", *common, stdin="x\n")
    assert status == 3 and "Plain LDAP sends passwords unencrypted" in err
    status, _, err = ctl("directory", "add", "Both", "--ldaps", "--plain", *common, stdin="x\n")
    assert status == 2 and "choose one of --ldaps, --starttls and --plain" in err
    status, out, err = ctl("directory", "add", "Clear", "--plain", *common, stdin=samba_dc.BIND_PASSWORD + "\n")
    assert status == 0 and "warning: Plain LDAP" in err and "WARNING: Plain LDAP" in out
    assert "389" in out
    # This directory refuses passwords over plain LDAP: the test says so, and exits 3.
    status, out, _ = ctl("directory", "test", "Clear")
    assert status == 3
    assert "FAIL  bind    The directory refuses passwords over unencrypted LDAP" in out
    status, out, _ = ctl("--json", "directory", "test", "Clear")
    assert status == 3 and json.loads(out)["ok"] is False
    ctl.json("directory", "add", "Tls", "--starttls", *common, "--ca-file", str(samba.ca_file),
             stdin=samba_dc.BIND_PASSWORD + "\n")
    assert ctl.json("directory", "test", "Tls")["ok"] is True  # type: ignore[index]
