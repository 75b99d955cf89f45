"""Elastic assignments, user layer storage, connectors, directory junctions, settings and the audit log."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import keyring
import keyring.backends.fail
import pytest

from app.catalog.database import Catalog
from app.catalog.models import (
    AuditEntry,
    AuditOutcome,
    DirectorySecurity,
    LayerType,
    PrincipalKind,
    Role,
    VersionState,
    utcnow,
)
from app.errors import Conflict, NotFound, SecretStoreUnavailable, UserError, ValidationError
from app.services import Services
from app.services.directory import DEFAULT_ATTRIBUTES, PLAIN_WARNING, JunctionSpec
from app.services.storage import user_layer_folder
from app.services.templates import TemplateSpec
from tests.conftest import ServicesFactory, make_deployable
from tests.support.catalog_checks import catalog_bytes, snapshot
from tests.support.keyring_memory import MemoryKeyring

USER_SID = "S-1-5-21-1004336348-1177238915-682003330-1105"
OTHER_USER_SID = "S-1-5-21-1004336348-1177238915-682003330-1106"
GROUP_SID = "S-1-5-21-1004336348-1177238915-682003330-1201"
OTHER_GROUP_SID = "S-1-5-21-1004336348-1177238915-682003330-1202"
PASSWORD = "correct horse battery"



def refused(services: Services, error: type[Exception], match: str, change: Any) -> Exception:
    """Run a change that must be refused; show the catalog (audit log included) is as it was."""
    before = snapshot(services.catalog)
    with pytest.raises(error, match=match) as info:
        change()
    assert snapshot(services.catalog) == before
    return info.value


# =================================================================================================
# Elastic assignments and machine associations
# =================================================================================================


def test_assign_an_app_layer_to_an_ad_user_and_an_ad_group(lab: Services) -> None:
    user = lab.assignments.assign("Office:2024", PrincipalKind.AD_USER, USER_SID.lower(), r"LAB\alice")
    group = lab.assignments.assign("Chrome:120", PrincipalKind.AD_GROUP, GROUP_SID, r"LAB\Finance")
    assert (user.layer, user.version, user.principal_kind, user.principal_sid, user.principal_name) == (
        "Office", "2024", PrincipalKind.AD_USER, USER_SID, r"LAB\alice"
    )
    assert (group.layer, group.version, group.principal_kind) == ("Chrome", "120", PrincipalKind.AD_GROUP)
    assert user.created_by == "admin"
    assert [(a.layer, a.principal_name) for a in lab.assignments.list_assignments()] == [
        ("Office", r"LAB\alice"), ("Chrome", r"LAB\Finance")
    ]
    entries = lab.audit.list_entries(operation="elastic.assign")
    assert [(e.object_name, e.change) for e in entries] == [
        (r"Chrome:120 → LAB\Finance", {"sid": GROUP_SID, "kind": "ad_group", "replaced": None}),
        (r"Office:2024 → LAB\alice", {"sid": USER_SID, "kind": "ad_user", "replaced": None}),
    ]


def test_list_assignments_filters_by_layer_and_principal(lab: Services) -> None:
    lab.assignments.assign("Office:2024", PrincipalKind.AD_USER, USER_SID, r"LAB\alice")
    lab.assignments.assign("Chrome:120", PrincipalKind.AD_USER, USER_SID, r"LAB\alice")
    lab.assignments.assign("Chrome:120", PrincipalKind.AD_GROUP, GROUP_SID, r"LAB\Finance")
    assert {a.principal_name for a in lab.assignments.list_assignments(layer="Chrome")} == {
        r"LAB\alice", r"LAB\Finance"
    }
    assert {a.layer for a in lab.assignments.list_assignments(principal=USER_SID.lower())} == {"Office", "Chrome"}
    assert {a.layer for a in lab.assignments.list_assignments(principal=r"lab\FINANCE")} == {"Chrome"}
    with pytest.raises(NotFound):
        lab.assignments.list_assignments(layer="Nope")


@pytest.mark.parametrize("kind", [PrincipalKind.LOCAL_USER, PrincipalKind.OS_USER])
def test_only_ad_users_and_groups_get_elastic_layers(lab: Services, kind: PrincipalKind) -> None:
    refused(lab, ValidationError, "AD users or AD groups",
            lambda: lab.assignments.assign("Office:2024", kind, USER_SID, "alice"))


@pytest.mark.parametrize(
    ("sid", "name", "message"),
    [
        ("alice", r"LAB\alice", "not a Windows security identifier"),
        ("S-1-5-21-", r"LAB\alice", "not a Windows security identifier"),
        (USER_SID, "", "empty"),
        (USER_SID, "bad\x07name", "control characters"),
    ],
)
def test_assignments_need_a_sid_and_a_name(lab: Services, sid: str, name: str, message: str) -> None:
    refused(lab, ValidationError, message,
            lambda: lab.assignments.assign("Office:2024", PrincipalKind.AD_USER, sid, name))


@pytest.mark.parametrize(("ref", "what"), [("Win11:1.0", "os"), ("Citrix-VDA:1.0", "platform")])
def test_only_app_layers_are_assigned(lab: Services, ref: str, what: str) -> None:
    refused(lab, ValidationError, f"is a {what} layer; only app layers are elastic",
            lambda: lab.assignments.assign(ref, PrincipalKind.AD_GROUP, GROUP_SID, "Finance"))


def test_only_deployable_versions_are_assigned(lab: Services) -> None:
    lab.layers.add_version("Office", "2025")
    refused(lab, Conflict, "Office:2025 is editing; only deployable",
            lambda: lab.assignments.assign("Office:2025", PrincipalKind.AD_GROUP, GROUP_SID, "Finance"))
    # A bare layer name means its newest usable version, here still being edited.
    refused(lab, Conflict, "Office:2025 is editing",
            lambda: lab.assignments.assign("Office", PrincipalKind.AD_GROUP, GROUP_SID, "Finance"))
    lab.layers.set_version_state("Office:2025", VersionState.BROKEN, reason="bad installer")
    refused(lab, Conflict, "Office:2025 is broken",
            lambda: lab.assignments.assign("Office:2025", PrincipalKind.AD_GROUP, GROUP_SID, "Finance"))
    # ... and a broken newest version is passed over.
    assert lab.assignments.assign("Office", PrincipalKind.AD_GROUP, GROUP_SID, "Finance").version == "2024"


def test_unknown_layers_and_versions_are_not_found(lab: Services) -> None:
    refused(lab, NotFound, "no layer named 'Visio'",
            lambda: lab.assignments.assign("Visio:1", PrincipalKind.AD_GROUP, GROUP_SID, "Finance"))
    refused(lab, NotFound, "has no version '9'",
            lambda: lab.assignments.assign("Office:9", PrincipalKind.AD_GROUP, GROUP_SID, "Finance"))


def test_assigning_another_version_replaces_the_earlier_one(lab: Services) -> None:
    lab.assignments.assign("Office:2024", PrincipalKind.AD_GROUP, GROUP_SID, r"LAB\Finance")
    lab.layers.add_version("Office", "2025")
    make_deployable(lab, "Office:2025")
    info = lab.assignments.assign("Office:2025", PrincipalKind.AD_GROUP, GROUP_SID, r"LAB\Finance Team")
    assert (info.version, info.principal_name) == ("2025", r"LAB\Finance Team")
    assert [(a.layer, a.version) for a in lab.assignments.list_assignments()] == [("Office", "2025")]
    latest = lab.audit.list_entries(operation="elastic.assign")[0]
    assert latest.change == {"sid": GROUP_SID, "kind": "ad_group", "replaced": "Office:2024"}
    assert latest.object_name == r"Office:2025 → LAB\Finance Team"
    # The replaced version is free again.
    assert lab.layers.get_version("Office:2024").used_by == ()
    assert lab.layers.get_version("Office:2025").used_by == ("1 elastic assignment",)


def test_assigning_the_same_version_twice_is_refused(lab: Services) -> None:
    lab.assignments.assign("Office:2024", PrincipalKind.AD_GROUP, GROUP_SID, r"LAB\Finance")
    refused(lab, Conflict, r"Office:2024 is already assigned to LAB\\Finance",
            lambda: lab.assignments.assign("Office:2024", PrincipalKind.AD_GROUP, GROUP_SID.lower(), "Finance"))


def test_one_layer_to_many_principals_and_many_layers_to_one(lab: Services) -> None:
    lab.assignments.assign("Office:2024", PrincipalKind.AD_GROUP, GROUP_SID, "Finance")
    lab.assignments.assign("Office:2024", PrincipalKind.AD_GROUP, OTHER_GROUP_SID, "Sales")
    lab.assignments.assign("Chrome:120", PrincipalKind.AD_GROUP, GROUP_SID, "Finance")
    assert len(lab.assignments.list_assignments()) == 3


def test_an_assigned_version_cannot_be_deleted(lab: Services) -> None:
    lab.assignments.assign("Office:2024", PrincipalKind.AD_GROUP, GROUP_SID, "Finance")
    refused(lab, Conflict, "1 elastic assignment", lambda: lab.layers.delete_version("Office:2024"))


def test_unassign_by_sid(lab: Services) -> None:
    lab.assignments.assign("Office:2024", PrincipalKind.AD_GROUP, GROUP_SID, r"LAB\Finance")
    lab.assignments.assign("Chrome:120", PrincipalKind.AD_GROUP, GROUP_SID, r"LAB\Finance")
    lab.assignments.unassign("Office", GROUP_SID.lower())
    assert [a.layer for a in lab.assignments.list_assignments()] == ["Chrome"]
    (entry,) = lab.audit.list_entries(operation="elastic.unassign")
    assert (entry.object_name, entry.change, entry.outcome) == (
        r"Office:2024 → LAB\Finance", {"sid": GROUP_SID}, AuditOutcome.SUCCESS
    )


def test_unassign_by_name_ignoring_case(lab: Services) -> None:
    lab.assignments.assign("Office:2024", PrincipalKind.AD_USER, USER_SID, r"LAB\alice")
    lab.assignments.unassign("Office", r"lab\ALICE")
    assert lab.assignments.list_assignments() == []


BOB = r"LAB\bob"


def test_unassign_what_is_not_assigned(lab: Services) -> None:
    lab.assignments.assign("Office:2024", PrincipalKind.AD_USER, USER_SID, r"LAB\alice")
    refused(lab, NotFound, re.escape(f"Layer 'Office' is not assigned to {BOB!r}."),
            lambda: lab.assignments.unassign("Office", BOB))
    refused(lab, NotFound, "Layer 'Chrome' is not assigned", lambda: lab.assignments.unassign("Chrome", USER_SID))
    refused(lab, NotFound, "no layer named 'Visio'", lambda: lab.assignments.unassign("Visio", USER_SID))


def test_unassign_by_a_name_two_principals_share_asks_for_the_sid(lab: Services) -> None:
    lab.assignments.assign("Office:2024", PrincipalKind.AD_USER, USER_SID, "Finance")
    lab.assignments.assign("Office:2024", PrincipalKind.AD_GROUP, GROUP_SID, "Finance")
    error = refused(lab, UserError, "Finance", lambda: lab.assignments.unassign("Office", "Finance"))
    assert USER_SID in str(error) and GROUP_SID in str(error)
    lab.assignments.unassign("Office", GROUP_SID)
    assert [a.principal_sid for a in lab.assignments.list_assignments()] == [USER_SID]


@pytest.mark.parametrize("pattern", ["VDA-FIN-*", "pc??.lab", "*", "RDS_01", "a" * 64])
def test_machine_association_patterns(admin: Services, pattern: str) -> None:
    info = admin.assignments.add_machine_association(GROUP_SID.lower(), r"LAB\Finance", f" {pattern} ")
    assert (info.group_sid, info.group_name, info.pattern, info.created_by) == (
        GROUP_SID, r"LAB\Finance", pattern, "admin"
    )
    (entry,) = admin.audit.list_entries(operation="machine_association.add")
    assert entry.object_name == rf"LAB\Finance ↔ {pattern}"


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("VDA FIN", "may hold only"),
        ("VDA/FIN", "may hold only"),
        (r"LAB\VDA", "may hold only"),
        ("VDA[1]", "may hold only"),
        ("a" * 65, "longer than 64"),
    ],
)
def test_bad_machine_patterns_are_refused(admin: Services, pattern: str, message: str) -> None:
    refused(admin, ValidationError, message,
            lambda: admin.assignments.add_machine_association(GROUP_SID, "Finance", pattern))


def test_machine_associations_need_a_group_sid_and_name(admin: Services) -> None:
    refused(admin, ValidationError, "security identifier",
            lambda: admin.assignments.add_machine_association("Finance", "Finance", "VDA-*"))
    refused(admin, ValidationError, "group name is empty",
            lambda: admin.assignments.add_machine_association(GROUP_SID, " ", "VDA-*"))


def test_a_duplicate_machine_association_is_refused(admin: Services) -> None:
    admin.assignments.add_machine_association(GROUP_SID, "Finance", "VDA-FIN-*")
    refused(admin, Conflict, "already associated",
            lambda: admin.assignments.add_machine_association(GROUP_SID, "Finance", "vda-fin-*"))
    admin.assignments.add_machine_association(OTHER_GROUP_SID, "Sales", "VDA-FIN-*")
    admin.assignments.add_machine_association(GROUP_SID, "Finance", "VDA-ACC-*")
    assert [(m.group_name, m.pattern) for m in admin.assignments.list_machine_associations()] == [
        ("Finance", "VDA-ACC-*"), ("Finance", "VDA-FIN-*"), ("Sales", "VDA-FIN-*")
    ]


def test_remove_a_machine_association(admin: Services) -> None:
    keep = admin.assignments.add_machine_association(GROUP_SID, "Finance", "VDA-FIN-*")
    gone = admin.assignments.add_machine_association(GROUP_SID, "Finance", "VDA-ACC-*")
    admin.assignments.remove_machine_association(gone.id)
    assert [m.id for m in admin.assignments.list_machine_associations()] == [keep.id]
    (entry,) = admin.audit.list_entries(operation="machine_association.remove")
    assert (entry.object_name, entry.change) == ("Finance ↔ VDA-ACC-*", {"sid": GROUP_SID})
    refused(admin, NotFound, f"no machine association {gone.id}",
            lambda: admin.assignments.remove_machine_association(gone.id))


# =================================================================================================
# User layer storage locations
# =================================================================================================


def test_locations_are_appended_in_priority_order(admin: Services) -> None:
    first = admin.storage.add_location("Main", "\\\\fs1\\users\\", groups=[(GROUP_SID.lower(), r"LAB\Finance")])
    second = admin.storage.add_location("Spare", r"\\fs2.lab.test\users\layers", default_size_gb=20)
    third = admin.storage.add_location("Old", r"\\10.0.0.5\ul")
    assert (first.path, first.priority, first.default_size_gb, first.groups) == (
        r"\\fs1\users", 1, 10, ((GROUP_SID, r"LAB\Finance"),)
    )
    assert (second.priority, second.default_size_gb, third.priority) == (2, 20, 3)
    assert [loc.name for loc in admin.storage.list_locations()] == ["Main", "Spare", "Old"]
    entry = admin.audit.list_entries(operation="storage.add")[-1]
    assert entry.change == {"path": r"\\fs1\users", "groups": [r"LAB\Finance"]}


def test_priority_keeps_growing_after_a_removal(admin: Services) -> None:
    for name in ("A", "B", "C"):
        admin.storage.add_location(name, rf"\\fs1\{name}")
    admin.storage.remove_location("b")
    added = admin.storage.add_location("D", r"\\fs1\D")
    assert added.priority == 4
    assert [(loc.name, loc.priority) for loc in admin.storage.list_locations()] == [("A", 1), ("C", 3), ("D", 4)]
    (entry,) = admin.audit.list_entries(operation="storage.remove")
    assert (entry.object_name, entry.change) == ("b", {"path": r"\\fs1\B"})


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("", "is empty"),
        (r"C:\Users", "not a share path"),
        ("//fs1/users", "not a share path"),
        (r"\\fs1", "names a server but no share"),
        ("\\\\fs1\\", "names a server but no share"),
        (r"\\fs1\users\..\admin", r"contains '\.\.'"),
        (r"\\fs1\..", r"contains '\.\.'"),
        (r"\\fs1\.\users", r"contains '\.'"),
        (r"\\bad_host!\users", "not a valid host name"),
        (r"\\-fs1\users", "not a valid host name"),
        (r"\\300.1.1.1\users", "not a valid IPv4 address"),
        (r"\\fs1\us|ers", "Windows does not allow"),
        (r"\\fs1\users\\deep", "empty"),
        (r"\\fs1\users\CON", "reserved Windows device name"),
    ],
)
def test_storage_paths_must_be_sound_unc_paths(admin: Services, path: str, message: str) -> None:
    refused(admin, ValidationError, message, lambda: admin.storage.add_location("Main", path))
    admin.storage.add_location("Good", r"\\fs9\users")
    refused(admin, ValidationError, message, lambda: admin.storage.update_location("Good", path=path))


def test_duplicate_location_names_and_paths_are_refused(admin: Services) -> None:
    admin.storage.add_location("Main", r"\\fs1\users")
    refused(admin, Conflict, "named 'MAIN' already exists", lambda: admin.storage.add_location("MAIN", r"\\fs2\u"))
    refused(admin, Conflict, "already uses", lambda: admin.storage.add_location("Other", r"\\FS1\Users"))


def test_a_location_cannot_be_moved_onto_anothers_path(admin: Services) -> None:
    admin.storage.add_location("Main", r"\\fs1\users")
    admin.storage.add_location("Spare", r"\\fs2\users")
    refused(admin, Conflict, "already uses", lambda: admin.storage.update_location("Spare", path=r"\\FS1\users"))
    # Its own path (in another spelling) is fine.
    assert admin.storage.update_location("Main", path=r"\\FS1\Users").path == r"\\FS1\Users"


@pytest.mark.parametrize("size", [0, -1, 2041, True, 10.5, "10"])
def test_default_user_layer_size_is_1_to_2040_gb(admin: Services, size: Any) -> None:
    refused(admin, ValidationError, "1–2040 GB",
            lambda: admin.storage.add_location("Main", r"\\fs1\u", default_size_gb=size))


def test_largest_and_smallest_default_size(admin: Services) -> None:
    assert admin.storage.add_location("Big", r"\\fs1\big", default_size_gb=2040).default_size_gb == 2040
    assert admin.storage.add_location("Small", r"\\fs1\small", default_size_gb=1).default_size_gb == 1


@pytest.mark.parametrize(
    ("groups", "message"),
    [
        ([("Finance", "Finance")], "security identifier"),
        ([(GROUP_SID, "")], "empty"),
        ([(GROUP_SID, "Finance"), (GROUP_SID.lower(), "Finance again")], "twice"),
    ],
)
def test_location_groups_are_checked(admin: Services, groups: list[tuple[str, str]], message: str) -> None:
    refused(admin, ValidationError, message, lambda: admin.storage.add_location("Main", r"\\fs1\u", groups=groups))


def test_update_a_location(admin: Services) -> None:
    admin.storage.add_location("Main", r"\\fs1\users", groups=[(GROUP_SID, "Finance")])
    info = admin.storage.update_location(
        "main", path=r"\\fs3\users", groups=[(OTHER_GROUP_SID, "Sales")], default_size_gb=30
    )
    assert (info.name, info.path, info.groups, info.default_size_gb, info.priority) == (
        "Main", r"\\fs3\users", ((OTHER_GROUP_SID, "Sales"),), 30, 1
    )
    (entry,) = admin.audit.list_entries(operation="storage.update")
    assert entry.change == {
        "path": [r"\\fs1\users", r"\\fs3\users"],
        "groups": [["Finance"], ["Sales"]],
        "default_size_gb": [10, 30],
    }
    refused(admin, NotFound, "no storage location named 'Nope'", lambda: admin.storage.update_location("Nope"))
    refused(admin, ValidationError, "1–2040", lambda: admin.storage.update_location("Main", default_size_gb=0))


def test_reorder_locations(admin: Services) -> None:
    for name in ("A", "B", "C"):
        admin.storage.add_location(name, rf"\\fs1\{name}")
    ordered = admin.storage.reorder(["c", "A", "B"])
    assert [(loc.name, loc.priority) for loc in ordered] == [("C", 1), ("A", 2), ("B", 3)]
    assert [loc.name for loc in admin.storage.list_locations()] == ["C", "A", "B"]
    (entry,) = admin.audit.list_entries(operation="storage.reorder")
    assert entry.change == {"order": [["A", "B", "C"], ["C", "A", "B"]]}
    # New locations still go last.
    assert admin.storage.add_location("D", r"\\fs1\D").priority == 4


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["A", "B"], "must name every storage location; it leaves out 'C'"),
        ([], "leaves out 'A', 'B', 'C'"),
        (["A", "B", "C", "a"], "lists 'a' twice"),
        (["A", "B", "B", "C"], "lists 'B' twice"),
        (["A", "B", "C", "Z"], "no storage location named 'Z'"),
        (["A", "Z", "C"], "no storage location named 'Z'"),
    ],
)
def test_a_bad_priority_list_changes_nothing(admin: Services, names: list[str], message: str) -> None:
    for name in ("A", "B", "C"):
        admin.storage.add_location(name, rf"\\fs1\{name}")
    refused(admin, ValidationError, message, lambda: admin.storage.reorder(names))


def test_remove_an_unknown_location(admin: Services) -> None:
    refused(admin, NotFound, "no storage location named 'Main'", lambda: admin.storage.remove_location("Main"))


def test_user_layer_folder_path_format(lab: Services) -> None:
    win11 = lab.layers.get_layer("Win11").layer
    assert user_layer_folder(r"\\fs1\users", "LAB", "alice", win11.id, win11.name) == (
        rf"\\fs1\users\Users\LAB_alice\{win11.id}_Win11" + "\\"
    )
    assert user_layer_folder("\\\\fs1\\users\\layers\\", "LAB", "bob", 7, "Win 10") == (
        "\\\\fs1\\users\\layers\\Users\\LAB_bob\\7_Win 10\\"
    )


@pytest.mark.parametrize(
    ("domain", "username", "os_name"),
    [("", "alice", "Win11"), ("LAB", r"x\alice", "Win11"), ("LAB", "..", "Win11"), ("LAB", "alice", "Win/11")],
)
def test_user_layer_folder_refuses_parts_that_are_not_file_names(domain: str, username: str, os_name: str) -> None:
    with pytest.raises(ValidationError):
        user_layer_folder(r"\\fs1\users", domain, username, 1, os_name)


# =================================================================================================
# Connector configurations
# =================================================================================================

CONNECTOR_PASSWORD = "hyp3rvisor-Secret!"


def connector_secrets(store: dict[tuple[str, str], str]) -> dict[str, str]:
    """The keyring's LayerDesk entries, keyed by the part after the installation id."""
    return {key.split("/", 1)[1]: value for (service, key), value in store.items() if service == "LayerDesk"}


def test_add_a_connector_keeps_its_password_in_the_keyring_only(
    admin: Services, memory_keyring: MemoryKeyring
) -> None:
    info = admin.connectors.add_connector(
        "vCenter", "vsphere", endpoint=" https://vc.lab.test/sdk ", username=" LAB\\svc-vc ",
        password=CONNECTOR_PASSWORD, options={"datastore": "ds1"},
    )
    assert (info.name, info.type, info.endpoint, info.username, info.verify_tls, info.options) == (
        "vCenter", "vsphere", "https://vc.lab.test/sdk", r"LAB\svc-vc", True, {"datastore": "ds1"}
    )
    assert info.has_credentials is True
    assert connector_secrets(memory_keyring.store) == {f"connector/{info.id}": CONNECTOR_PASSWORD}
    assert CONNECTOR_PASSWORD.encode() not in catalog_bytes(admin.catalog)
    (entry,) = admin.audit.list_entries(operation="connector.add")
    assert entry.change == {"type": "vsphere", "endpoint": "https://vc.lab.test/sdk", "verify_tls": True}
    assert admin.connectors.password("vCenter") == CONNECTOR_PASSWORD


def test_a_connector_without_password_has_no_keyring_entry(admin: Services, memory_keyring: MemoryKeyring) -> None:
    info = admin.connectors.add_connector("Share", "folder", endpoint=r"\\fs1\images")
    assert info.has_credentials is False
    assert connector_secrets(memory_keyring.store) == {}
    assert admin.connectors.password("Share") is None


def test_turning_tls_verification_off_is_audited_with_a_warning(admin: Services) -> None:
    admin.connectors.add_connector("Lab", "hyperv", endpoint="hv1.lab.test", verify_tls=False)
    (entry,) = admin.audit.list_entries(operation="connector.add")
    assert entry.change["warning"] == "TLS certificate verification is off"


def test_an_unknown_connector_type_is_refused(admin: Services, memory_keyring: MemoryKeyring) -> None:
    error = refused(admin, ValidationError, "Unknown connector type 'vmware'",
                    lambda: admin.connectors.add_connector("Lab", "vmware", password=CONNECTOR_PASSWORD))
    assert "vsphere" in str(error) and "libvirt" in str(error)
    assert memory_keyring.store == {}


@pytest.mark.parametrize("endpoint", ["https://vc lab", "vc.\tlab", "vc\x00.lab", "x" * 1025])
def test_bad_endpoints_are_refused(admin: Services, endpoint: str) -> None:
    refused(admin, ValidationError, "endpoint",
            lambda: admin.connectors.add_connector("Lab", "folder", endpoint=endpoint))


def test_a_duplicate_connector_name_is_refused(admin: Services, memory_keyring: MemoryKeyring) -> None:
    admin.connectors.add_connector("Lab", "folder", password="first-password")
    secrets_before = dict(memory_keyring.store)
    refused(admin, Conflict, "named 'LAB' already exists",
            lambda: admin.connectors.add_connector("LAB", "libvirt", password="second-password"))
    assert memory_keyring.store == secrets_before


def test_update_a_connector(admin: Services, memory_keyring: MemoryKeyring) -> None:
    info = admin.connectors.add_connector("Lab", "libvirt", endpoint="qemu+ssh://kvm1/system", password="old-pass-1")
    updated = admin.connectors.update_connector(
        "lab", endpoint="qemu+ssh://kvm2/system", password=CONNECTOR_PASSWORD, verify_tls=False
    )
    assert (updated.endpoint, updated.verify_tls, updated.has_credentials) == ("qemu+ssh://kvm2/system", False, True)
    assert connector_secrets(memory_keyring.store) == {f"connector/{info.id}": CONNECTOR_PASSWORD}
    (entry,) = admin.audit.list_entries(operation="connector.update")
    assert entry.change == {
        "endpoint": ["qemu+ssh://kvm1/system", "qemu+ssh://kvm2/system"],
        "verify_tls": [True, False],
        "password": "changed",
    }
    data = catalog_bytes(admin.catalog)
    assert CONNECTOR_PASSWORD.encode() not in data and b"old-pass-1" not in data


def test_an_update_that_changes_nothing_is_refused(admin: Services) -> None:
    admin.connectors.add_connector("Lab", "folder", endpoint=r"\\fs1\img")
    refused(admin, ValidationError, "Nothing to change", lambda: admin.connectors.update_connector("Lab"))
    refused(admin, ValidationError, "Nothing to change",
            lambda: admin.connectors.update_connector("Lab", endpoint=r"\\fs1\img"))
    refused(admin, NotFound, "no connector configuration named 'Nope'",
            lambda: admin.connectors.update_connector("Nope", endpoint="x"))


def test_remove_a_connector_deletes_its_keyring_entry(admin: Services, memory_keyring: MemoryKeyring) -> None:
    admin.connectors.add_connector("Keep", "folder", password="keep-this-one")
    admin.connectors.add_connector("Lab", "folder", password=CONNECTOR_PASSWORD)
    admin.connectors.remove_connector("lab")
    assert [c.name for c in admin.connectors.list_connectors()] == ["Keep"]
    assert list(connector_secrets(memory_keyring.store).values()) == ["keep-this-one"]
    (entry,) = admin.audit.list_entries(operation="connector.remove")
    assert entry.change == {"type": "folder"}
    refused(admin, NotFound, "no connector configuration named 'Lab'", lambda: admin.connectors.remove_connector("Lab"))


def test_a_connector_in_use_by_a_template_is_not_removed(lab: Services, memory_keyring: MemoryKeyring) -> None:
    lab.connectors.add_connector("Lab", "folder", password=CONNECTOR_PASSWORD)
    lab.templates.create_template("Gold", TemplateSpec(os="Win11:1.0", connector="Lab"))
    assert lab.connectors.get_connector("Lab").used_by == ("Gold",)
    secrets_before = dict(memory_keyring.store)
    refused(lab, Conflict, "used by image template\\(s\\) Gold", lambda: lab.connectors.remove_connector("Lab"))
    assert memory_keyring.store == secrets_before


def test_without_a_keyring_no_connector_with_a_password_is_created(admin: Services) -> None:
    admin.connectors.add_connector("Existing", "folder", endpoint=r"\\fs1\a")
    keyring.set_keyring(keyring.backends.fail.Keyring())
    error = refused(admin, SecretStoreUnavailable, "keyring",
                    lambda: admin.connectors.add_connector("Lab", "vsphere", password=CONNECTOR_PASSWORD))
    assert CONNECTOR_PASSWORD not in str(error)
    refused(admin, SecretStoreUnavailable, "keyring",
            lambda: admin.connectors.update_connector("Existing", endpoint=r"\\fs2\a", password=CONNECTOR_PASSWORD))
    assert [c.name for c in admin.connectors.list_connectors()] == ["Existing"]
    assert CONNECTOR_PASSWORD.encode() not in catalog_bytes(admin.catalog)
    # A connector that needs no secret can still be added.
    assert admin.connectors.add_connector("Plain", "folder").has_credentials is False


# =================================================================================================
# Directory junctions
# =================================================================================================

BIND_PASSWORD = "d1rectory-Bind!"


def junction(**changes: Any) -> JunctionSpec:
    base: dict[str, Any] = {"server": "dc1.lab.test", "base_dn": "DC=lab,DC=test", "bind_account": r"LAB\svc-ld"}
    return JunctionSpec(**{**base, **changes})


@pytest.fixture
def break_glass(admin: Services) -> Services:
    admin.access.create_account("breakglass", PASSWORD, [Role.ADMINISTRATOR])
    return admin


def test_add_a_junction_with_ldaps_by_default(break_glass: Services, memory_keyring: MemoryKeyring) -> None:
    admin = break_glass
    info = admin.directory.add_junction("Corp", junction(), password=BIND_PASSWORD)
    assert (info.server, info.port, info.security, info.base_dn, info.bind_account, info.enabled) == (
        "dc1.lab.test", 636, DirectorySecurity.LDAPS, "DC=lab,DC=test", r"LAB\svc-ld", True
    )
    assert info.warnings == ()
    assert info.attribute_map == DEFAULT_ATTRIBUTES
    assert connector_secrets(memory_keyring.store) == {f"directory/{info.id}": BIND_PASSWORD}
    assert BIND_PASSWORD.encode() not in catalog_bytes(admin.catalog)
    (entry,) = admin.audit.list_entries(operation="directory.add")
    assert entry.change == {"server": "dc1.lab.test", "port": 636, "security": "ldaps"}


@pytest.mark.parametrize(
    ("security", "port"),
    [(DirectorySecurity.LDAPS, 636), (DirectorySecurity.STARTTLS, 389), (DirectorySecurity.PLAIN, 389)],
)
def test_default_ports(break_glass: Services, security: DirectorySecurity, port: int) -> None:
    info = break_glass.directory.add_junction("Corp", junction(security=security, allow_plain=True))
    assert info.port == port
    assert break_glass.directory.add_junction("Other", junction(security=security, port=3269,
                                                                allow_plain=True)).port == 3269


def test_plain_ldap_is_refused_unless_allowed_and_then_warned(break_glass: Services) -> None:
    admin = break_glass
    refused(admin, ValidationError, "Plain LDAP sends passwords unencrypted",
            lambda: admin.directory.add_junction("Corp", junction(security=DirectorySecurity.PLAIN)))
    info = admin.directory.add_junction("Corp", junction(security=DirectorySecurity.PLAIN, allow_plain=True))
    assert info.warnings == (PLAIN_WARNING,)
    assert [j.warnings for j in admin.directory.list_junctions()] == [(PLAIN_WARNING,)]
    # Switching an existing junction to plain LDAP needs the same explicit choice.
    admin.directory.add_junction("Secure", junction())
    refused(admin, ValidationError, "Plain LDAP",
            lambda: admin.directory.update_junction("Secure", junction(security=DirectorySecurity.PLAIN)))


@pytest.mark.parametrize("port", [0, -1, 65536])
def test_ports_outside_1_to_65535_are_refused(break_glass: Services, port: int) -> None:
    refused(break_glass, ValidationError, "not between 1 and 65535",
            lambda: break_glass.directory.add_junction("Corp", junction(port=port)))


@pytest.mark.parametrize("base_dn", ["", "   ", "lab.test", "DC=lab,DC=", "DC=lab,,DC=test"])
def test_a_base_dn_must_be_a_distinguished_name(break_glass: Services, base_dn: str) -> None:
    refused(break_glass, ValidationError, "not a distinguished name",
            lambda: break_glass.directory.add_junction("Corp", junction(base_dn=base_dn)))


def test_a_good_base_dn_is_kept(break_glass: Services) -> None:
    info = break_glass.directory.add_junction("Corp", junction(base_dn=" OU=Staff, DC=lab, DC=test "))
    assert info.base_dn == "OU=Staff, DC=lab, DC=test"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"server": ""}, "empty"),
        ({"server": "dc 1.lab"}, "not a valid host name"),
        ({"bind_account": "  "}, "Give the bind account"),
        ({"ca_certificate": "not a certificate"}, "must be PEM text"),
        ({"attribute_map": {"email": "mail"}}, "Unknown attribute map key"),
    ],
)
def test_bad_junction_settings_are_refused(break_glass: Services, changes: dict[str, Any], message: str) -> None:
    refused(break_glass, ValidationError, message,
            lambda: break_glass.directory.add_junction("Corp", junction(**changes), password=BIND_PASSWORD))


def test_a_pem_ca_certificate_and_attribute_overrides_are_kept(break_glass: Services) -> None:
    pem = "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIU\n-----END CERTIFICATE-----"
    info = break_glass.directory.add_junction(
        "Corp", junction(ca_certificate=f"\n{pem}\n", attribute_map={"user_login": "uid"})
    )
    assert info.ca_certificate == pem
    assert info.attribute_map == {**DEFAULT_ATTRIBUTES, "user_login": "uid"}


def test_an_enabled_junction_needs_a_break_glass_local_administrator(admin: Services) -> None:
    refused(admin, Conflict, "Create a local account with the Administrator role first",
            lambda: admin.directory.add_junction("Corp", junction()))
    admin.access.create_account("helper", PASSWORD, [Role.MANAGE_APP_LAYERS])
    refused(admin, Conflict, "Administrator role first", lambda: admin.directory.add_junction("Corp", junction()))
    admin.access.create_account("root2", PASSWORD, [Role.ADMINISTRATOR])
    admin.access.set_disabled("root2", True)
    refused(admin, Conflict, "Administrator role first", lambda: admin.directory.add_junction("Corp", junction()))
    # A disabled junction asks for nothing, but enabling it later does.
    admin.directory.add_junction("Corp", junction(enabled=False))
    refused(admin, Conflict, "Administrator role first",
            lambda: admin.directory.update_junction("Corp", junction(enabled=True)))
    admin.access.set_disabled("root2", False)
    assert admin.directory.update_junction("Corp", junction(enabled=True)).enabled is True


def test_update_a_junction(break_glass: Services, memory_keyring: MemoryKeyring) -> None:
    admin = break_glass
    info = admin.directory.add_junction("Corp", junction(), password="old-bind-pass")
    updated = admin.directory.update_junction(
        "corp", junction(server="dc2.lab.test", security=DirectorySecurity.STARTTLS), password=BIND_PASSWORD
    )
    assert (updated.server, updated.port, updated.security) == ("dc2.lab.test", 389, DirectorySecurity.STARTTLS)
    assert connector_secrets(memory_keyring.store) == {f"directory/{info.id}": BIND_PASSWORD}
    (entry,) = admin.audit.list_entries(operation="directory.update")
    assert entry.change == {
        "server": ["dc1.lab.test", "dc2.lab.test"],
        "port": [636, 389],
        "security": ["ldaps", "starttls"],
        "password": "changed",
    }
    data = catalog_bytes(admin.catalog)
    assert BIND_PASSWORD.encode() not in data and b"old-bind-pass" not in data
    refused(admin, ValidationError, "not a distinguished name",
            lambda: admin.directory.update_junction("Corp", junction(base_dn="nope")))
    refused(admin, NotFound, "no directory junction named 'Nope'",
            lambda: admin.directory.update_junction("Nope", junction()))


def test_remove_a_junction_deletes_its_keyring_entry(break_glass: Services, memory_keyring: MemoryKeyring) -> None:
    admin = break_glass
    admin.directory.add_junction("Corp", junction(), password=BIND_PASSWORD)
    admin.directory.remove_junction("CORP")
    assert admin.directory.list_junctions() == []
    assert connector_secrets(memory_keyring.store) == {}
    refused(admin, NotFound, "no directory junction named 'Corp'", lambda: admin.directory.remove_junction("Corp"))


def test_a_duplicate_junction_name_is_refused(break_glass: Services) -> None:
    break_glass.directory.add_junction("Corp", junction())
    refused(break_glass, Conflict, "named 'corp' already exists",
            lambda: break_glass.directory.add_junction("corp", junction(server="dc2.lab.test")))


def test_without_a_keyring_no_junction_with_a_password_is_created(break_glass: Services) -> None:
    keyring.set_keyring(keyring.backends.fail.Keyring())
    refused(break_glass, SecretStoreUnavailable, "keyring",
            lambda: break_glass.directory.add_junction("Corp", junction(), password=BIND_PASSWORD))
    assert break_glass.directory.list_junctions() == []


# =================================================================================================
# Settings
# =================================================================================================

DEFAULTS = {
    "task_retention_days": 30,
    "audit_retention_days": 365,
    "log_retention_days": 30,
    "require_sign_in": False,
    "network_file_share": "",
    "elastic_layer_share": "",
    "layer_cache_gb": 50,
}


def test_every_setting_starts_at_its_default(admin: Services) -> None:
    listed = admin.settings.list_settings()
    assert {s.key: s.value for s in listed} == DEFAULTS
    assert {s.key: s.default for s in listed} == DEFAULTS
    assert all(s.updated_at is None and s.updated_by == "" and s.description for s in listed)
    assert {key: admin.settings.get(key) for key in DEFAULTS} == DEFAULTS


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("task_retention_days", 1, 1),
        ("task_retention_days", " 3650 ", 3650),
        ("audit_retention_days", 30, 30),
        ("audit_retention_days", "36500", 36500),
        ("log_retention_days", 1, 1),
        ("log_retention_days", 3650, 3650),
        ("network_file_share", "\\\\fs1\\uploads\\", r"\\fs1\uploads"),
        ("network_file_share", "", ""),
        ("elastic_layer_share", r"\\fs1.lab.test\elastic\layers", r"\\fs1.lab.test\elastic\layers"),
        ("layer_cache_gb", 0, 0),
        ("layer_cache_gb", "100000", 100000),
        ("require_sign_in", "no", False),
        ("require_sign_in", "off", False),
        ("require_sign_in", "0", False),
    ],
)
def test_accepted_setting_values(admin: Services, key: str, value: Any, expected: Any) -> None:
    info = admin.settings.set(key, value)
    assert (info.key, info.value, info.updated_by) == (key, expected, "admin")
    assert admin.settings.get(key) == expected


@pytest.mark.parametrize("value", [True, "true", "yes", "on", "1", " YES "])
def test_require_sign_in_accepts_yes_words(admin: Services, value: Any) -> None:
    admin.access.create_account("root2", PASSWORD, [Role.ADMINISTRATOR])
    assert admin.settings.set("require_sign_in", value).value is True


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("task_retention_days", 0, "outside the allowed range 1–3650"),
        ("task_retention_days", 3651, "outside the allowed range 1–3650"),
        ("task_retention_days", "a month", "not a whole number of days"),
        ("task_retention_days", "1.5", "not a whole number of days"),
        ("audit_retention_days", 29, "outside the allowed range 30–36500"),
        ("audit_retention_days", 36501, "outside the allowed range 30–36500"),
        ("log_retention_days", 0, "outside the allowed range 1–3650"),
        ("log_retention_days", 3651, "outside the allowed range 1–3650"),
        ("require_sign_in", "maybe", "not yes or no"),
        ("require_sign_in", 2, "not yes or no"),
        ("network_file_share", r"C:\uploads", "not a share path"),
        ("network_file_share", r"\\fs1", "no share"),
        ("elastic_layer_share", r"\\fs1\elastic\..\x", r"contains '\.\.'"),
        ("elastic_layer_share", r"\\bad host\x", "not a valid host name"),
        ("layer_cache_gb", -1, "outside the allowed range 0–100000"),
        ("layer_cache_gb", 100001, "outside the allowed range 0–100000"),
        ("layer_cache_gb", "lots", "not a whole number of GB"),
    ],
)
def test_refused_setting_values_change_nothing(admin: Services, key: str, value: Any, message: str) -> None:
    refused(admin, ValidationError, message, lambda: admin.settings.set(key, value))
    assert admin.settings.get(key) == DEFAULTS[key]


@pytest.mark.parametrize("key", ["no_such_setting", "installation_id", ""])
def test_unknown_settings_are_not_found(admin: Services, key: str) -> None:
    error = refused(admin, NotFound, "There is no setting", lambda: admin.settings.set(key, 1))
    assert "task_retention_days" in str(error)  # the known settings are listed
    with pytest.raises(NotFound):
        admin.settings.get(key)


def test_a_settings_change_is_audited_with_before_and_after(services_for: ServicesFactory) -> None:
    admin = services_for(Role.ADMINISTRATOR)
    other = services_for(Role.ADMINISTRATOR, username="root2")
    admin.settings.set("task_retention_days", 60, comment="keep tasks longer")
    other.settings.set("task_retention_days", "90")
    entries = admin.audit.list_entries(operation="settings.set")
    assert [(e.user, e.object_name, e.change, e.comment) for e in entries] == [
        ("root2", "task_retention_days", {"value": [60, 90]}, ""),
        ("admin", "task_retention_days", {"value": [30, 60]}, "keep tasks longer"),
    ]
    (info,) = [s for s in admin.settings.list_settings() if s.key == "task_retention_days"]
    assert (info.value, info.default, info.updated_by) == (90, 30, "root2")
    assert info.updated_at is not None


# =================================================================================================
# The audit log
# =================================================================================================


def add_entry(catalog: Catalog, *, days_ago: float, **fields: Any) -> None:
    values: dict[str, Any] = {
        "user": "admin", "operation": "layer.create", "object_type": "layer", "object_name": "Old",
        "change": {}, "comment": "", "outcome": AuditOutcome.SUCCESS,
    }
    values.update(fields)
    with catalog.write() as session:
        session.add(AuditEntry(at=utcnow() - timedelta(days=days_ago), **values))


def test_list_entries_newest_first_with_filters(lab: Services, services_for: ServicesFactory) -> None:
    publisher = services_for(Role.PUBLISH_LAYERED_IMAGES, username="publisher")
    lab.layers.update_layer("Office", description="Office 2024 ProPlus", comment="ticket CHG-42")
    with pytest.raises(Exception):  # noqa: B017 - any refusal will do; the audit entry is what counts
        publisher.layers.delete_layer("Office")
    everything = lab.audit.list_entries()
    assert [e.id for e in everything] == sorted((e.id for e in everything), reverse=True)
    assert everything[0].operation == "layer.delete" and everything[0].outcome is AuditOutcome.DENIED

    office = lab.audit.list_entries(object_name="office")
    assert {e.object_name for e in office} == {"Office", "Office:2024"}
    assert {e.operation for e in office} >= {"layer.create", "layer.version.add", "layer.update", "layer.delete"}

    assert [e.operation for e in lab.audit.list_entries(user="publisher")] == ["layer.delete"]
    assert lab.audit.list_entries(user="PUBLISHER") == []  # user names are matched exactly
    assert {e.object_name for e in lab.audit.list_entries(operation="layer.create")} == {
        "Win11", "Win10", "Citrix-VDA", "Office", "Chrome", "Notepad++", "Paint"
    }
    denied = lab.audit.list_entries(outcome=AuditOutcome.DENIED)
    assert [(e.user, e.object_name) for e in denied] == [("publisher", "Office")]
    assert [e.comment for e in lab.audit.list_entries(search="chg-42")] == ["ticket CHG-42"]
    assert {e.user for e in lab.audit.list_entries(search="publish")} == {"publisher"}
    assert len(lab.audit.list_entries(limit=3)) == 3


def test_object_name_filter_matches_whole_names_only(admin: Services) -> None:
    for name in ("Win_11", "WinX11", "Win_11 Extra"):
        admin.layers.create_layer(name, LayerType.OS)
        admin.layers.add_version(name, "1.0")
    names = {e.object_name for e in admin.audit.list_entries(object_name="win_11")}
    assert names == {"Win_11", "Win_11:1.0"}
    percent = {e.object_name for e in admin.audit.list_entries(object_name="Win%")}
    assert percent == set()


def test_search_treats_wildcards_literally(admin: Services) -> None:
    admin.layers.create_layer("App_1", LayerType.OS)
    admin.layers.create_layer("AppX1", LayerType.OS)
    admin.layers.create_layer("100%", LayerType.OS)
    admin.layers.create_layer("1000", LayerType.OS)
    assert {e.object_name for e in admin.audit.list_entries(search="p_1")} == {"App_1"}
    assert {e.object_name for e in admin.audit.list_entries(search="0%")} == {"100%"}


def test_list_entries_since(admin: Services) -> None:
    add_entry(admin.catalog, days_ago=10, object_name="Ten days")
    add_entry(admin.catalog, days_ago=2, object_name="Two days")
    add_entry(admin.catalog, days_ago=0, object_name="Today")
    recent = admin.audit.list_entries(since=utcnow() - timedelta(days=5))
    assert [e.object_name for e in recent] == ["Today", "Two days"]


def test_purge_expired_respects_the_retention_setting(admin: Services) -> None:
    add_entry(admin.catalog, days_ago=400, object_name="Older than a year")
    add_entry(admin.catalog, days_ago=364, object_name="Almost a year")
    add_entry(admin.catalog, days_ago=40, object_name="Forty days")
    assert admin.audit.purge_expired(comment="yearly") == 1
    names = [e.object_name for e in admin.audit.list_entries()]
    assert "Older than a year" not in names
    assert {"Almost a year", "Forty days"} <= set(names)
    purge = admin.audit.list_entries(operation="audit.purge")[0]
    assert (purge.user, purge.change, purge.comment) == ("admin", {"deleted": 1, "retention_days": 365}, "yearly")

    admin.settings.set("audit_retention_days", 30)
    assert admin.audit.purge_expired() == 2
    remaining = {e.object_name for e in admin.audit.list_entries()}
    assert not remaining & {"Almost a year", "Forty days"}
    assert "retention" in remaining  # the purges themselves are kept
    assert admin.audit.purge_expired() == 0


def test_a_connector_whose_commit_fails_leaves_no_secret_behind(
    admin: Services, memory_keyring: MemoryKeyring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The password is stored inside the transaction; when anything later in it fails (here the
    result cannot be built), the catalog rolls back and the keyring entry is taken out again."""
    from app.services.connectors import ConnectorService

    def broken(*_args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ConnectorService, "_info", classmethod(broken))
    with pytest.raises(OSError, match="No space left"):
        admin.connectors.add_connector("Lab", "vsphere", username="svc", password=CONNECTOR_PASSWORD)
    monkeypatch.undo()
    assert admin.connectors.list_connectors() == []
    assert connector_secrets(memory_keyring.store) == {}


def test_a_removal_that_fails_keeps_the_connectors_secret(
    admin: Services, memory_keyring: MemoryKeyring, monkeypatch: pytest.MonkeyPatch
) -> None:
    admin.connectors.add_connector("Lab", "vsphere", username="svc", password=CONNECTOR_PASSWORD)
    from app.catalog.models import AuditEntry

    def refuse_audit(*_args: object, **_kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(AuditEntry, "__init__", refuse_audit)
    with pytest.raises(OSError):
        admin.connectors.remove_connector("Lab")
    monkeypatch.undo()
    assert [c.name for c in admin.connectors.list_connectors()] == ["Lab"]
    assert list(connector_secrets(memory_keyring.store).values()) == [CONNECTOR_PASSWORD]
