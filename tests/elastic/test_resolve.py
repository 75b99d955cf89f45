"""The elastic layer resolver: the rules on their own, then against the real test DC's nested groups."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.catalog.models import PrincipalKind, Role, VersionState
from app.directory import PrincipalType
from app.errors import NotFound, ValidationError
from app.paths import Home
from app.services import Services, open_catalog
from app.services.elastic import (
    AssignmentRow,
    AssociationRow,
    ElasticService,
    GrantSource,
    Membership,
    pattern_matches,
    resolve_layers,
)
from tests.conftest import ADMIN, ServicesFactory, make_deployable
from tests.elastic.conftest import BREAK_GLASS_PASSWORD, sid_of
from tests.support import samba_dc
from tests.support.keyring_memory import MemoryKeyring
from tests.unit.test_cli import Ctl

USER = "S-1-5-21-1-2-3-1105"
FINANCE = "S-1-5-21-1-2-3-1201"
STAFF = "S-1-5-21-1-2-3-1202"
OTHER = "S-1-5-21-1-2-3-1203"
MEMBERSHIP = Membership(USER, r"LAB\alice", {FINANCE: (r"LAB\Finance",), STAFF: (r"LAB\Finance", r"LAB\Staff")},
                        {FINANCE: r"LAB\Finance", STAFF: r"LAB\Staff"})


def _row(version_id: int, principal: str, *, kind: PrincipalKind = PrincipalKind.AD_GROUP, layer: str = "Office",
         state: VersionState = VersionState.DEPLOYABLE) -> AssignmentRow:
    names = {USER: r"LAB\alice", FINANCE: r"LAB\Finance", STAFF: r"LAB\Staff", OTHER: r"LAB\Other"}
    return AssignmentRow(hash(layer) % 1000, layer, "Win11", version_id, f"v{version_id}", state, 10, "sha256:aa",
                         kind, principal, names[principal])


# --- the rules -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("pattern", "machine", "matches"), [
    ("VDA-FIN-*", "VDA-FIN-01", True), ("VDA-FIN-*", "vda-fin-01", True), ("vda-fin-*", "VDA-FIN-01.lab.test", True),
    ("VDA-FIN-??", "VDA-FIN-01", True), ("VDA-FIN-??", "VDA-FIN-001", False), ("VDA-FIN-*", "VDA-HR-01", False),
    ("VDA.FIN", "VDAXFIN", False), ("*", "anything", True),
])
def test_machine_patterns_use_star_and_question_mark_and_ignore_case(pattern: str, machine: str,
                                                                       matches: bool) -> None:
    assert pattern_matches(pattern, machine) is matches


def test_a_direct_assignment_beats_a_group_assignment_of_a_newer_version() -> None:
    found = resolve_layers(MEMBERSHIP, "VDA-1", [_row(2, STAFF), _row(1, USER, kind=PrincipalKind.AD_USER)], [])
    (office,) = found.layers
    assert office.version == "v1" and office.reasons[0].source is GrantSource.USER
    assert office.explanation == r"assigned directly to LAB\alice"
    (lost,) = office.overridden
    assert lost.grant.principal_name == r"LAB\Staff" and "direct assignment" in lost.reason


def test_among_groups_the_newest_version_wins_and_every_reason_is_kept() -> None:
    found = resolve_layers(MEMBERSHIP, "VDA-FIN-7", [_row(1, FINANCE), _row(3, STAFF), _row(3, OTHER)],
                           [AssociationRow(OTHER, r"LAB\Other", "vda-fin-*")])
    (office,) = found.layers
    assert office.version == "v3"
    assert [(g.source, g.principal_name) for g in office.reasons] == [
        (GrantSource.GROUP, r"LAB\Staff"), (GrantSource.MACHINE, r"LAB\Other")]
    assert office.reasons[0].why == r"via group LAB\Staff (nested: LAB\Finance → LAB\Staff)"
    assert office.reasons[1].why == r"via machine association LAB\Other ↔ vda-fin-*"
    assert [(o.grant.version, o.reason) for o in office.overridden] == [("v1", "Office:v3 is newer")]


def test_a_machine_association_reaches_non_members_only_on_matching_machines() -> None:
    rows = [_row(1, OTHER, layer="Chrome")]
    associations = [AssociationRow(OTHER, r"LAB\Other", "VDA-FIN-*")]
    assert [x.layer for x in resolve_layers(MEMBERSHIP, "vda-fin-01", rows, associations).layers] == ["Chrome"]
    assert resolve_layers(MEMBERSHIP, "VDA-HR-01", rows, associations).layers == ()


def test_other_users_assignments_do_not_apply() -> None:
    other_user = AssignmentRow(1, "Office", "Win11", 1, "v1", VersionState.DEPLOYABLE, 1, None,
                               PrincipalKind.AD_USER, "S-1-5-21-1-2-3-9999", r"LAB\bob")
    assert resolve_layers(MEMBERSHIP, "VDA-1", [other_user], []).layers == ()


def test_a_version_that_is_not_deployable_is_skipped_and_the_others_decide() -> None:
    found = resolve_layers(MEMBERSHIP, "VDA-1", [
        _row(2, USER, kind=PrincipalKind.AD_USER, state=VersionState.BROKEN), _row(1, FINANCE)], [])
    assert [(x.version, x.reasons[0].source) for x in found.layers] == [("v1", GrantSource.GROUP)]
    (skipped,) = found.skipped
    assert skipped.grant.source is GrantSource.USER and "broken, not deployable" in skipped.reason


# --- against the real DC ----------------------------------------------------------------------------


def _assign_lab(services: Services) -> dict[str, str]:
    """Office 2025 → All-Staff (alice through Finance-Users), Office 2024 → alice herself, Notepad++ →
    Finance-Users, Chrome → LayerDesk-Admins (bob) and, by association, every user on VDA-FIN-*, Paint →
    Domain Users (everybody's primary group)."""
    sids = {
        "alice": sid_of(services, "alice", PrincipalType.USER),
        "staff": sid_of(services, "All-Staff", PrincipalType.GROUP),
        "finance": sid_of(services, "Finance-Users", PrincipalType.GROUP),
        "admins": sid_of(services, "LayerDesk-Admins", PrincipalType.GROUP),
        "domain_users": sid_of(services, "Domain Users", PrincipalType.GROUP),
    }
    a = services.assignments
    a.assign("Office:2025", PrincipalKind.AD_GROUP, sids["staff"], r"LAB\All-Staff")
    a.assign("Office:2024", PrincipalKind.AD_USER, sids["alice"], r"LAB\alice")
    a.assign("Notepad++:8.6", PrincipalKind.AD_GROUP, sids["finance"], r"LAB\Finance-Users")
    a.assign("Chrome:120", PrincipalKind.AD_GROUP, sids["admins"], r"LAB\LayerDesk-Admins")
    a.assign("Paint:1.0", PrincipalKind.AD_GROUP, sids["domain_users"], r"LAB\Domain Users")
    a.add_machine_association(sids["admins"], r"LAB\LayerDesk-Admins", "VDA-FIN-*")
    return sids


def test_resolve_against_the_directory_nested_groups_direct_and_machine(joined: Services) -> None:
    sids = _assign_lab(joined)
    resolver = ElasticService.for_services(joined)

    alice = resolver.resolve("alice@lab.test", "vda-fin-07")
    assert alice.user_sid == sids["alice"] and alice.user_name == r"LAB\alice"
    assert {r"LAB\All-Staff", r"LAB\Finance-Users", r"LAB\Domain Users"} <= set(alice.groups)
    why = {x.layer: (x.version, x.explanation) for x in alice.layers}
    assert why == {
        "Chrome": ("120", r"via machine association LAB\LayerDesk-Admins ↔ VDA-FIN-*"),
        "Notepad++": ("8.6", r"via group LAB\Finance-Users"),
        "Office": ("2024", r"assigned directly to LAB\alice"),
        "Paint": ("1.0", r"via group LAB\Domain Users (primary group)"),
    }
    office = next(x for x in alice.layers if x.layer == "Office")
    (lost,) = office.overridden
    assert lost.grant.version == "2025"
    assert lost.grant.why == r"via group LAB\All-Staff (nested: LAB\Finance-Users → LAB\All-Staff)"

    # Off the associated machines Chrome is not hers; without the direct assignment All-Staff's newer
    # Office reaches her through her nested membership.
    joined.assignments.unassign("Office", sids["alice"])
    alice = resolver.resolve(r"LAB\alice", "VDA-HR-01")
    assert {x.layer: x.version for x in alice.layers} == {"Notepad++": "8.6", "Office": "2025", "Paint": "1.0"}

    bob = resolver.resolve(sid_of(joined, "bob", PrincipalType.USER), "VDA-HR-01")
    assert {x.layer: x.explanation for x in bob.layers} == {
        "Chrome": r"via group LAB\LayerDesk-Admins", "Paint": r"via group LAB\Domain Users (primary group)"}


def test_resolve_is_a_read_open_to_read_only(joined: Services, services_for: ServicesFactory) -> None:
    _assign_lab(joined)
    reader = ElasticService.for_services(services_for(Role.READ_ONLY))
    assert [x.layer for x in reader.resolve("bob", "VDA-FIN-01").layers] == ["Chrome", "Paint"]


def test_resolve_refuses_unknown_users_and_bad_machine_names(joined: Services) -> None:
    resolver = ElasticService.for_services(joined)
    with pytest.raises(NotFound, match="no-such-user"):
        resolver.resolve("no-such-user", "VDA-1")
    with pytest.raises(ValidationError, match="not a machine name"):
        resolver.resolve("alice", "VDA 1;rm")


def test_layerctl_elastic_resolve(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch, memory_keyring: MemoryKeyring,
                                  samba: samba_dc.RunningDC) -> None:
    ctl = Ctl(tmp_path / "home", capsys, monkeypatch)
    ctl.json("init")
    ctl.json("layer", "create", "--type", "os", "Win11")
    ctl.json("layer", "create", "--type", "app", "Office", "--os-layer", "Win11")
    ctl.json("layer", "version", "add", "Office", "2024")
    _deployable(ctl, "Office:2024")
    ctl.json("user", "add", "breakglass", "--role", "Administrator", "--password-stdin",
             stdin=BREAK_GLASS_PASSWORD + "\n")
    ctl.json("directory", "add", "Lab", "--server", "127.0.0.1", "--ldaps", "--ca-file", str(samba.ca_file),
             "--base-dn", samba.base_dn, "--bind-user", rf"LAB\{samba_dc.BIND_USER}", "--password-stdin",
             stdin=samba_dc.BIND_PASSWORD + "\n")
    ctl.json("login", "--user", "breakglass", "--password-stdin", stdin=BREAK_GLASS_PASSWORD + "\n")
    (staff,) = ctl.json("directory", "search", "All-Staff")  # type: ignore[misc]
    ctl.json("elastic", "assign", "Office:2024", "--group", staff["sid"], "--name", staff["qualified_name"])

    found = ctl.json("elastic", "resolve", "--user", "alice", "--machine", "VDA-FIN-01")
    assert isinstance(found, dict)
    (office,) = found["layers"]
    assert (office["layer"], office["version"]) == ("Office", "2024")
    assert office["reasons"][0]["why"] == r"via group LAB\All-Staff (nested: LAB\Finance-Users → LAB\All-Staff)"
    status, out, _ = ctl("elastic", "resolve", "--user", "alice", "--machine", "VDA-FIN-01")
    assert status == 0 and r"LAB\alice on VDA-FIN-01: 1 app layer(s)" in out and "via group LAB\\All-Staff" in out
    status, _, err = ctl("elastic", "resolve", "--user", "nobody-here", "--machine", "VDA-FIN-01")
    assert status == 5 and "nobody-here" in err



def _deployable(ctl: Ctl, ref: str) -> None:
    """Versions become deployable through an import; here the catalog is told so directly."""
    home = Home(ctl.home)
    catalog, secrets = open_catalog(home)
    try:
        make_deployable(Services.for_caller(home, catalog, ADMIN, secrets), ref)
    finally:
        catalog.close()
