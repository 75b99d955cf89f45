"""The directory client against a real Samba AD DC: connection test, sign-in outcomes, escaping,
SIDs, nested groups, paged searches and the picker's search."""

from __future__ import annotations

import logging
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.catalog.models import DirectorySecurity
from app.directory import DirectoryClient, DirectoryError, PrincipalType, SignInRefused
from app.errors import NotFound
from tests.directory.conftest import settings_for
from tests.support import samba_dc
from tests.support.samba_dc import PASSWORDS, RunningDC

pytestmark = pytest.mark.usefixtures("samba")


@pytest.fixture
def client(samba: RunningDC) -> Iterator[DirectoryClient]:
    with DirectoryClient(settings_for(samba)) as c:
        yield c


# --- test connection ----------------------------------------------------------------------------


@pytest.mark.parametrize(("security", "port"), [(DirectorySecurity.LDAPS, 636), (DirectorySecurity.STARTTLS, 389)])
def test_a_good_junction_passes_every_step(samba: RunningDC, security: DirectorySecurity, port: int) -> None:
    with DirectoryClient(settings_for(samba, security=security, port=port)) as c:
        report = c.test_connection()
    assert report.ok and report.failure is None and report.warnings == ()
    assert [(s.name, s.ok) for s in report.steps] == [("tcp", True), ("tls", True), ("bind", True), ("search", True)]
    assert "certificate" in report.steps[1].detail and "verified" in report.steps[1].detail
    assert report.steps[3].detail == "read DC=lab,DC=test (domain LAB, lab.test)"


def test_the_name_localhost_is_in_the_certificate_too(samba: RunningDC) -> None:
    with DirectoryClient(settings_for(samba, server="localhost")) as c:
        assert c.test_connection().ok


def test_plain_ldap_warns_and_this_directory_refuses_passwords_over_it(samba: RunningDC) -> None:
    with DirectoryClient(settings_for(samba, security=DirectorySecurity.PLAIN, port=389)) as c:
        report = c.test_connection()
        assert report.warnings and "unencrypted" in report.warnings[0]
        assert [(s.name, s.ok) for s in report.steps] == [("tcp", True), ("tls", None), ("bind", False),
                                                           ("search", None)]
        assert "refuses passwords over unencrypted LDAP" in (report.failure or "")
        with pytest.raises(DirectoryError) as refused:
            c.authenticate("alice", PASSWORDS["alice"])
    assert refused.value.reason == "encryption_required"


def test_a_certificate_from_an_unknown_ca_is_not_trusted(samba: RunningDC) -> None:
    # No CA given: the system's CAs do not know the lab's.
    with DirectoryClient(settings_for(samba, ca_certificate=None)) as c:
        report = c.test_connection()
        assert [(s.name, s.ok) for s in report.steps] == [("tcp", True), ("tls", False), ("bind", None),
                                                           ("search", None)]
        assert "is not trusted" in (report.failure or "") and "--ca-file" in (report.failure or "")
        with pytest.raises(DirectoryError) as refused:
            c.authenticate("alice", PASSWORDS["alice"])
    assert refused.value.reason == "untrusted_certificate"
    with DirectoryClient(settings_for(samba, ca_certificate=None, security=DirectorySecurity.STARTTLS,
                                      port=389)) as c, pytest.raises(DirectoryError) as refused:
        c.authenticate("alice", PASSWORDS["alice"])
    assert refused.value.reason == "untrusted_certificate"


def test_nothing_listening_is_reported_as_unreachable(samba: RunningDC) -> None:
    with socket.socket() as spare:
        spare.bind(("127.0.0.1", 0))
        free_port = spare.getsockname()[1]
    with DirectoryClient(settings_for(samba, port=free_port)) as c:
        report = c.test_connection()
        assert [(s.name, s.ok) for s in report.steps] == [("tcp", False), ("tls", None), ("bind", None),
                                                           ("search", None)]
        assert "nothing accepts connections" in (report.failure or "")
        with pytest.raises(DirectoryError) as refused:
            c.authenticate("alice", PASSWORDS["alice"])
    assert refused.value.reason == "unreachable"


@pytest.fixture
def wrong_name_tls_server(samba: RunningDC, tmp_path: Path) -> Iterator[int]:
    """A TLS server whose certificate (from the lab's own CA) names another host."""
    tls = samba.root / "tls"
    key, csr, crt, ext = (tmp_path / n for n in ("o.key", "o.csr", "o.crt", "o.ext"))
    ext.write_text("subjectAltName = DNS:other.example\n")
    subprocess.run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
                    "-subj", "/CN=other.example"], check=True, capture_output=True)
    subprocess.run(["openssl", "x509", "-req", "-in", csr, "-CA", tls / "ca.crt", "-CAkey", tls / "ca.key",
                    "-CAcreateserial", "-CAserial", tmp_path / "ca.srl", "-days", "2", "-extfile", ext,
                    "-out", crt], check=True, capture_output=True)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(crt, key)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                raw, _ = listener.accept()
            except TimeoutError:
                continue
            with raw:
                raw.settimeout(2)
                try:
                    with context.wrap_socket(raw, server_side=True):
                        pass
                except (ssl.SSLError, OSError):
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def test_a_certificate_for_another_name_is_refused(samba: RunningDC, wrong_name_tls_server: int) -> None:
    with DirectoryClient(settings_for(samba, port=wrong_name_tls_server)) as c:
        report = c.test_connection()
        assert [(s.name, s.ok) for s in report.steps][:2] == [("tcp", True), ("tls", False)]
        assert "not issued for the name '127.0.0.1'" in (report.failure or "")
        with pytest.raises(DirectoryError) as refused:
            c.authenticate("alice", PASSWORDS["alice"])
    assert refused.value.reason == "certificate_name_mismatch"


def test_a_wrong_bind_password_fails_the_bind_step(samba: RunningDC) -> None:
    with DirectoryClient(settings_for(samba, bind_password="not the bind password")) as c:
        report = c.test_connection()
        assert [(s.name, s.ok) for s in report.steps] == [("tcp", True), ("tls", True), ("bind", False),
                                                           ("search", None)]
        assert "refused the bind account" in (report.failure or "")
        with pytest.raises(DirectoryError) as refused:
            c.authenticate("alice", PASSWORDS["alice"])
    assert refused.value.reason == "bind_account_refused"


def test_a_base_dn_that_does_not_exist_fails_the_search_step(samba: RunningDC) -> None:
    with DirectoryClient(settings_for(samba, base_dn="OU=Nowhere,DC=lab,DC=test")) as c:
        report = c.test_connection()
    assert [(s.name, s.ok) for s in report.steps] == [("tcp", True), ("tls", True), ("bind", True),
                                                       ("search", False)]
    assert "OU=Nowhere,DC=lab,DC=test cannot be read" in (report.failure or "")


# --- sign-in --------------------------------------------------------------------------------------


@pytest.mark.parametrize("login", ["alice", r"LAB\alice", r"lab\ALICE", "alice@lab.test", "ALICE@LAB.TEST",
                                   r"lab.test\alice"])
def test_alice_signs_in_with_every_form_of_her_name(client: DirectoryClient, login: str) -> None:
    user = client.authenticate(login, PASSWORDS["alice"])
    assert user.principal.qualified_name == r"LAB\alice"
    assert user.principal.upn == "alice@lab.test"
    assert user.principal.sid.startswith("S-1-5-21-")


@pytest.mark.parametrize(("login", "password", "reason", "words"), [
    ("alice", "wrong password", "wrong_credentials", "The user name or password is incorrect."),
    ("nobody", "whatever-1", "wrong_credentials", "The user name or password is incorrect."),
    (r"OTHER\alice", PASSWORDS["alice"], "wrong_credentials", "The user name or password is incorrect."),
    ("alice@other.example", PASSWORDS["alice"], "wrong_credentials", "The user name or password is incorrect."),
    ("carol", PASSWORDS["carol"], "account_disabled", r"The account LAB\carol is disabled in the directory"),
    ("dave", PASSWORDS["dave"], "password_must_change", r"LAB\dave must change the password"),
    ("erin", PASSWORDS["erin"], "account_expired", r"The account LAB\erin has expired"),
    ("gina", PASSWORDS["gina"], "password_expired", r"The password of LAB\gina has expired"),
    ("alice", "", "wrong_credentials", "Give the password."),
])
def test_each_refusal_says_why(client: DirectoryClient, login: str, password: str, reason: str, words: str) -> None:
    with pytest.raises(SignInRefused) as refused:
        client.authenticate(login, password)
    assert refused.value.reason == reason
    assert words in refused.value.message
    assert password not in refused.value.message or not password


def test_a_locked_account_is_told_apart(client: DirectoryClient) -> None:
    # frank's own password policy locks him after LOCKOUT_THRESHOLD wrong passwords.
    for _ in range(samba_dc.LOCKOUT_THRESHOLD):
        with pytest.raises(SignInRefused):
            client.authenticate("frank", "wrong password")
    with pytest.raises(SignInRefused) as refused:
        client.authenticate("frank", PASSWORDS["frank"])
    assert refused.value.reason == "account_locked"
    assert r"The account LAB\frank is locked" in refused.value.message


@pytest.mark.parametrize("login", ["*", "a*", "al*ce", "*)(sAMAccountName=*", "alice)(|(cn=*", "alice\\", "\\",
                                   "alice\x00", "(", ")", "*@lab.test", r"LAB\*"])
def test_filter_syntax_in_a_user_name_matches_literally(client: DirectoryClient, login: str) -> None:
    assert client.find_user(login) is None
    with pytest.raises(SignInRefused) as refused:
        client.authenticate(login, PASSWORDS["alice"])
    assert refused.value.reason == "wrong_credentials"
    assert client.search_principals(login) == []


def test_passwords_are_never_logged(client: DirectoryClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "Never-Logged-9!"
    with pytest.raises(SignInRefused):
        client.authenticate("alice", secret)
    client.authenticate("alice", PASSWORDS["alice"])
    for password in (secret, PASSWORDS["alice"], samba_dc.BIND_PASSWORD):
        assert password not in caplog.text
    assert r"LAB\alice" in caplog.text  # the sign-in itself is logged


# --- principals, SIDs and groups ------------------------------------------------------------------


def test_users_and_groups_resolve_by_name_and_by_sid(client: DirectoryClient) -> None:
    alice = client.resolve("alice")
    assert (alice.type, alice.name, alice.display_name) == (PrincipalType.USER, "alice", "Alice Lab")
    assert client.resolve(alice.sid) == alice
    assert client.resolve(alice.sid.lower()) == alice
    group = client.resolve(r"LAB\Finance-Users", PrincipalType.GROUP)
    assert (group.type, group.qualified_name) == (PrincipalType.GROUP, r"LAB\Finance-Users")
    assert client.principal_by_sid(group.sid) == group
    assert client.resolve("Finance-Users") == group
    assert client.resolve("carol").enabled is False
    with pytest.raises(NotFound):
        client.resolve("Finance-Users", PrincipalType.USER)
    with pytest.raises(NotFound):
        client.resolve(alice.sid, PrincipalType.GROUP)
    with pytest.raises(NotFound):
        client.resolve(alice.sid[:-4] + "9999")


def test_nested_groups_come_through_the_in_chain_rule_and_token_groups(client: DirectoryClient) -> None:
    alice = client.resolve("alice")
    finance = client.resolve("Finance-Users", PrincipalType.GROUP)
    staff = client.resolve("All-Staff", PrincipalType.GROUP)
    admins = client.resolve("LayerDesk-Admins", PrincipalType.GROUP)
    assert [g.name for g in client.nested_groups(alice.dn)] == ["All-Staff", "Finance-Users"]
    tokens = client.token_group_sids(alice.dn)
    assert {finance.sid, staff.sid} <= tokens
    assert admins.sid not in tokens
    domain_users = alice.sid.rsplit("-", 1)[0] + "-513"
    assert domain_users in tokens  # the primary group, which no member attribute lists
    assert client.authenticate("alice", PASSWORDS["alice"]).group_sids == tokens


def test_searches_are_paged(samba: RunningDC) -> None:
    with DirectoryClient(settings_for(samba, page_size=7)) as c:
        members = list(c.paged_search("(&(objectClass=user)(sAMAccountName=pager*))", ["sAMAccountName"]))
        assert len(members) == len(samba_dc.PAGER_USERS) == 30
        assert c.last_search_pages == 5
        found = c.search_principals("pager", limit=100)
        assert [p.name for p in found] == ["Pager-Users", *samba_dc.PAGER_USERS]
        assert c.last_search_pages == 5
        assert len(c.search_principals("pager", limit=10)) == 10
        assert c.last_search_pages == 2


def test_the_picker_finds_users_and_groups_by_any_name_prefix(client: DirectoryClient) -> None:
    assert [(p.type, p.name) for p in client.search_principals("Fin")] == [(PrincipalType.GROUP, "Finance-Users")]
    assert [p.name for p in client.search_principals("Alice L")] == ["alice"]  # display name
    assert [p.name for p in client.search_principals("bob@lab")] == ["bob"]  # UPN
    assert [p.name for p in client.search_principals("layerdesk-")] == ["LayerDesk-Admins"]
    assert client.search_principals("") == []
    assert client.search_principals("zzz-nobody") == []
