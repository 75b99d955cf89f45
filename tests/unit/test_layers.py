"""Behaviour of app.services.layers: layers, their versions, prerequisites, state and deletion."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from app.catalog.models import AuditOutcome, LayerType, LayerVersion, PrincipalKind, Role, VersionState
from app.errors import Conflict, NotFound, PermissionDenied, UserError, ValidationError
from app.services import Services
from app.services.templates import TemplateSpec
from app.services.views import AuditEntryInfo
from tests.conftest import ServicesFactory, make_deployable
from tests.support.catalog_checks import assert_refused

FINANCE_SID = "S-1-5-21-1-2-3-1001"


# --- helpers --------------------------------------------------------------------------------------



def newest_audit(services: Services) -> AuditEntryInfo:
    return services.audit.list_entries(limit=1)[0]


def assert_audited(services: Services, operation: str, object_name: str) -> AuditEntryInfo:
    entry = newest_audit(services)
    assert (entry.operation, entry.object_name, entry.outcome) == (operation, object_name, AuditOutcome.SUCCESS)
    assert entry.user == services.caller.username
    return entry


def names(services: Services, **filters: Any) -> list[str]:
    return [layer.name for layer in services.layers.list_layers(**filters)]


def version_names(services: Services, layer: str) -> list[str]:
    return [v.name for v in services.layers.get_layer(layer).versions]


def create_template(services: Services, name: str, **spec: Any) -> None:
    services.templates.create_template(name, TemplateSpec(**spec))


def version_in_state(services: Services, ref: str, state: VersionState) -> None:
    """Bring a fresh (editing) version to ``state``."""
    if state is VersionState.FINALIZING:
        services.layers.set_version_state(ref, VersionState.FINALIZING)
    elif state is VersionState.DEPLOYABLE:
        make_deployable(services, ref)
    elif state is VersionState.BROKEN:
        services.layers.set_version_state(ref, VersionState.BROKEN, reason="setup failed")
    assert services.layers.get_version(ref).state is state


# --- creating layers ------------------------------------------------------------------------------


def test_create_os_layer(admin: Services) -> None:
    info = admin.layers.create_layer("Win11", LayerType.OS, description="Windows 11 23H2", comment="new base")

    assert (info.name, info.type, info.os_layer, info.description) == ("Win11", LayerType.OS, None, "Windows 11 23H2")
    assert (info.version_count, info.latest_version, info.latest_state, info.size_bytes) == (0, None, None, 0)
    assert info.created_by == "admin"
    assert admin.layers.list_layers() == [info]
    entry = assert_audited(admin, "layer.create", "Win11")
    assert entry.comment == "new base"
    assert entry.change == {"type": "os", "os_layer": None}


def test_create_platform_layer_bound_to_os_layer(admin: Services) -> None:
    admin.layers.create_layer("Win11", LayerType.OS)

    info = admin.layers.create_layer("Citrix-VDA", LayerType.PLATFORM, os_layer="Win11")

    assert (info.type, info.os_layer) == (LayerType.PLATFORM, "Win11")
    assert admin.layers.get_layer("Win11").bound_layers == ("Citrix-VDA",)
    assert assert_audited(admin, "layer.create", "Citrix-VDA").change == {"type": "platform", "os_layer": "Win11"}


def test_create_app_layer_bound_to_os_layer(admin: Services) -> None:
    admin.layers.create_layer("Win11", LayerType.OS)

    info = admin.layers.create_layer("Office", LayerType.APP, os_layer="win11", icon="office.png")

    assert (info.type, info.os_layer, info.icon) == (LayerType.APP, "Win11", "office.png")
    assert names(admin) == ["Office", "Win11"]
    assert_audited(admin, "layer.create", "Office")


@pytest.mark.parametrize("layer_type", [LayerType.APP, LayerType.PLATFORM])
def test_app_and_platform_layers_need_an_os_layer(admin: Services, layer_type: LayerType) -> None:
    admin.layers.create_layer("Win11", LayerType.OS)

    error = assert_refused(
        admin, lambda: admin.layers.create_layer("Thing", layer_type), ValidationError, "--os-layer"
    )
    assert error.field == "os_layer"  # type: ignore[attr-defined]


@pytest.mark.parametrize("layer_type", [LayerType.APP, LayerType.PLATFORM])
def test_os_layer_of_an_app_or_platform_layer_must_be_an_os_layer(lab: Services, layer_type: LayerType) -> None:
    assert_refused(
        lab,
        lambda: lab.layers.create_layer("Thing", layer_type, os_layer="Office"),
        ValidationError,
        "'Office' is a app layer, not an OS layer",
    )
    assert_refused(
        lab,
        lambda: lab.layers.create_layer("Thing", layer_type, os_layer="Citrix-VDA"),
        ValidationError,
        "'Citrix-VDA' is a platform layer, not an OS layer",
    )


def test_os_layer_that_does_not_exist_is_refused(lab: Services) -> None:
    assert_refused(
        lab, lambda: lab.layers.create_layer("Thing", LayerType.APP, os_layer="Win12"), NotFound, "'Win12'"
    )


def test_os_layer_cannot_be_bound_to_another_os_layer(lab: Services) -> None:
    assert_refused(
        lab,
        lambda: lab.layers.create_layer("Win12", LayerType.OS, os_layer="Win11"),
        ValidationError,
        "OS layer 'Win12' cannot be bound to another OS layer",
    )


@pytest.mark.parametrize("clash", ["Office", "office", "OFFICE", "oFfIcE"])
def test_duplicate_layer_names_are_refused_ignoring_case(lab: Services, clash: str) -> None:
    assert_refused(
        lab,
        lambda: lab.layers.create_layer(clash, LayerType.APP, os_layer="Win11"),
        Conflict,
        "A layer named 'Office' already exists",
    )


def test_duplicate_name_is_refused_across_layer_types(lab: Services) -> None:
    assert_refused(
        lab, lambda: lab.layers.create_layer("chrome", LayerType.OS), Conflict, "A layer named 'Chrome' already exists"
    )


# --- name validation ----------------------------------------------------------------------------

_BAD_NAMES = [
    pytest.param("", "is empty", id="empty"),
    pytest.param("   ", "is empty", id="only-spaces"),
    pytest.param(" Office", "starts or ends with a space", id="leading-space"),
    pytest.param("Office ", "starts or ends with a space", id="trailing-space"),
    pytest.param("x" * 65, "65 characters long; at most 64", id="65-chars"),
    *[pytest.param(f"Off{ch}ice", f"contains '{ch}'", id=f"char-{ch}") for ch in '<>:"/\\|?*'],
    *[
        pytest.param(f"Off{ch}ice", f"contains {ch!r}", id=f"control-{ord(ch):02x}")
        for ch in ("\x00", "\t", "\n", "\x1f", "\x7f")
    ],
    pytest.param("Office.", "ends with a dot", id="trailing-dot"),
    pytest.param("CON", "reserved Windows device name (CON)", id="CON"),
    pytest.param("nul", "reserved Windows device name (NUL)", id="nul"),
    pytest.param("COM1", "reserved Windows device name (COM1)", id="COM1"),
    pytest.param("LPT9", "reserved Windows device name (LPT9)", id="LPT9"),
    pytest.param("CON.txt", "reserved Windows device name (CON)", id="CON.txt"),
]


@pytest.mark.parametrize(("bad_name", "why"), _BAD_NAMES)
def test_invalid_layer_names_are_refused_with_a_clear_message(admin: Services, bad_name: str, why: str) -> None:
    error = assert_refused(
        admin, lambda: admin.layers.create_layer(bad_name, LayerType.OS), ValidationError, "layer name", why
    )
    assert error.field == "layer name"  # type: ignore[attr-defined]
    assert names(admin) == []


def test_control_characters_are_named_as_such(admin: Services) -> None:
    assert_refused(
        admin, lambda: admin.layers.create_layer("Off\x01ice", LayerType.OS), ValidationError, "control characters"
    )


def test_name_of_64_characters_is_accepted(admin: Services) -> None:
    longest = "x" * 64
    admin.layers.create_layer(longest, LayerType.OS)
    assert names(admin) == [longest]


@pytest.mark.parametrize(("bad_name", "why"), _BAD_NAMES)
def test_invalid_names_are_refused_on_rename(lab: Services, bad_name: str, why: str) -> None:
    assert_refused(lab, lambda: lab.layers.update_layer("Office", new_name=bad_name), ValidationError, why)


@pytest.mark.parametrize(
    ("bad_name", "why"), [("", "is empty"), ("1.0.", "ends with a dot"), ("v1/2", "contains '/'"), ("AUX", "reserved")]
)
def test_invalid_version_names_are_refused(lab: Services, bad_name: str, why: str) -> None:
    assert_refused(lab, lambda: lab.layers.add_version("Office", bad_name), ValidationError, "version name", why)


# --- listing and describing -----------------------------------------------------------------------


def test_list_layers_is_sorted_by_name(lab: Services) -> None:
    assert names(lab) == ["Chrome", "Citrix-VDA", "Notepad++", "Office", "Paint", "Win10", "Win11"]


def test_list_layers_filters_by_type(lab: Services) -> None:
    assert names(lab, type=LayerType.OS) == ["Win10", "Win11"]
    assert names(lab, type=LayerType.PLATFORM) == ["Citrix-VDA"]
    assert names(lab, type=LayerType.APP) == ["Chrome", "Notepad++", "Office", "Paint"]


def test_list_layers_search_matches_part_of_the_name_ignoring_case(lab: Services) -> None:
    assert names(lab, search="win") == ["Win10", "Win11"]
    assert names(lab, search="PAD") == ["Notepad++"]
    assert names(lab, search="i", type=LayerType.APP) == ["Office", "Paint"]
    assert names(lab, search="nothing like it") == []


def test_list_layers_search_treats_percent_and_underscore_literally(lab: Services) -> None:
    for name in ("100%Office", "100xOffice", "Tool_A", "ToolXA"):
        lab.layers.create_layer(name, LayerType.APP, os_layer="Win11")

    assert names(lab, search="%") == ["100%Office"]
    assert names(lab, search="0%O") == ["100%Office"]
    assert names(lab, search="_") == ["Tool_A"]
    assert names(lab, search="l_a") == ["Tool_A"]


def test_get_layer_shows_versions_and_bound_layers(lab: Services) -> None:
    detail = lab.layers.get_layer("win11")

    assert detail.layer.name == "Win11"
    assert [(v.name, v.state) for v in detail.versions] == [
        ("1.0", VersionState.DEPLOYABLE),
        ("2.0", VersionState.EDITING),
    ]
    assert (detail.layer.version_count, detail.layer.latest_version, detail.layer.latest_state) == (
        2,
        "2.0",
        VersionState.EDITING,
    )
    assert detail.layer.size_bytes == 1024
    assert detail.versions[0].checksum == "sha256:00"
    assert detail.bound_layers == ("Chrome", "Citrix-VDA", "Notepad++", "Office")
    assert lab.layers.get_layer("Win10").bound_layers == ("Paint",)
    assert lab.layers.get_layer("Office").bound_layers == ()


def test_get_layer_shows_who_uses_each_version(lab: Services) -> None:
    create_template(lab, "Finance", os="Win11:1.0", platform="Citrix-VDA:1.0", apps=("Office:2024",))
    lab.layers.add_version("Chrome", "121", prerequisites=["Office:2024"])
    lab.assignments.assign("Office:2024", PrincipalKind.AD_GROUP, FINANCE_SID, "LAB\\Finance")

    office = lab.layers.get_layer("Office").versions[0]
    assert office.used_by == ("image template 'Finance'", "prerequisite of Chrome:121", "1 elastic assignment")
    assert lab.layers.get_layer("Win11").versions[0].used_by == ("image template 'Finance'",)
    assert lab.layers.get_layer("Win11").versions[1].used_by == ()
    assert lab.layers.get_layer("Citrix-VDA").versions[0].used_by == ("image template 'Finance'",)
    assert lab.layers.get_version("Chrome:121").prerequisites == ("Office:2024",)


def test_unknown_layer_and_version_are_not_found(lab: Services) -> None:
    with pytest.raises(NotFound, match="no layer named 'Excel'"):
        lab.layers.get_layer("Excel")
    with pytest.raises(NotFound, match="has no version '2030'"):
        lab.layers.get_version("Office:2030")


# --- updating -------------------------------------------------------------------------------------


def test_update_layer_changes_description_and_icon(lab: Services) -> None:
    info = lab.layers.update_layer("Office", description="Microsoft 365 Apps", icon="office.ico", comment="tidy")

    assert (info.description, info.icon) == ("Microsoft 365 Apps", "office.ico")
    assert lab.layers.get_layer("Office").layer == info
    entry = assert_audited(lab, "layer.update", "Office")
    assert entry.change == {"description": ["", "Microsoft 365 Apps"], "icon": [None, "office.ico"]}
    assert entry.comment == "tidy"


def test_rename_layer(lab: Services) -> None:
    lab.layers.update_layer("Office", new_name="M365")

    assert "Office" not in names(lab)
    assert "M365" in names(lab)
    assert lab.layers.get_version("M365:2024").layer == "M365"
    assert "M365" in lab.layers.get_layer("Win11").bound_layers
    assert assert_audited(lab, "layer.update", "Office").change == {"name": ["Office", "M365"]}
    with pytest.raises(NotFound):
        lab.layers.get_layer("Office")


def test_rename_layer_may_change_only_the_case(lab: Services) -> None:
    lab.layers.update_layer("Office", new_name="OFFICE")
    assert "OFFICE" in names(lab)


@pytest.mark.parametrize("clash", ["Chrome", "chrome", "WIN11"])
def test_rename_to_an_existing_name_is_refused(lab: Services, clash: str) -> None:
    assert_refused(lab, lambda: lab.layers.update_layer("Office", new_name=clash), Conflict, "already exists")


# --- versions -------------------------------------------------------------------------------------


def test_add_version_starts_in_editing(lab: Services) -> None:
    info = lab.layers.add_version("Office", "2025", comment="monthly channel")

    assert (info.layer, info.name, info.state, info.comment, info.prerequisites) == (
        "Office",
        "2025",
        VersionState.EDITING,
        "monthly channel",
        (),
    )
    assert version_names(lab, "Office") == ["2024", "2025"]
    assert lab.layers.get_layer("Office").layer.latest_version == "2025"
    entry = assert_audited(lab, "layer.version.add", "Office:2025")
    assert entry.object_type == "layer version"


def test_duplicate_version_name_is_refused(lab: Services) -> None:
    assert_refused(
        lab, lambda: lab.layers.add_version("Office", "2024"), Conflict, "'Office' already has a version '2024'"
    )


def test_duplicate_version_name_is_refused_ignoring_case(lab: Services) -> None:
    lab.layers.add_version("Office", "v2")
    assert_refused(lab, lambda: lab.layers.add_version("Office", "V2"), Conflict, "already has a version 'V2'")


def test_same_version_name_in_another_layer_is_fine(lab: Services) -> None:
    lab.layers.add_version("Chrome", "2024")
    assert version_names(lab, "Chrome") == ["120", "2024"]


def test_version_of_unknown_layer_is_refused(lab: Services) -> None:
    assert_refused(lab, lambda: lab.layers.add_version("Excel", "1.0"), NotFound, "'Excel'")


# --- prerequisites --------------------------------------------------------------------------------


def test_app_layer_version_with_prerequisites(lab: Services) -> None:
    info = lab.layers.add_version("Chrome", "121", prerequisites=["Office:2024", "Notepad++"])

    assert info.prerequisites == ("Office:2024", "Notepad++:8.6")
    assert lab.layers.get_version("Chrome:121").prerequisites == ("Office:2024", "Notepad++:8.6")
    assert assert_audited(lab, "layer.version.add", "Chrome:121").change["prerequisites"] == [
        "Office:2024",
        "Notepad++:8.6",
    ]


def test_platform_layer_may_be_an_app_prerequisite(lab: Services) -> None:
    info = lab.layers.add_version("Chrome", "121", prerequisites=["Citrix-VDA:1.0"])
    assert info.prerequisites == ("Citrix-VDA:1.0",)


@pytest.mark.parametrize("layer", ["Win11", "Citrix-VDA"])
def test_only_app_layers_have_prerequisites(lab: Services, layer: str) -> None:
    assert_refused(
        lab,
        lambda: lab.layers.add_version(layer, "9.9", prerequisites=["Office:2024"]),
        ValidationError,
        f"Only app layers have prerequisites; {layer!r}",
    )


def test_layer_cannot_be_its_own_prerequisite(lab: Services) -> None:
    assert_refused(
        lab,
        lambda: lab.layers.add_version("Chrome", "121", prerequisites=["Chrome:120"]),
        ValidationError,
        "'Chrome' cannot be its own prerequisite",
    )


def test_os_layer_is_not_a_prerequisite(lab: Services) -> None:
    assert_refused(
        lab,
        lambda: lab.layers.add_version("Chrome", "121", prerequisites=["Win11:1.0"]),
        ValidationError,
        "Win11:1.0 is an OS layer",
    )


def test_prerequisite_must_belong_to_the_same_os_layer(lab: Services) -> None:
    assert_refused(
        lab,
        lambda: lab.layers.add_version("Chrome", "121", prerequisites=["Paint:1.0"]),
        ValidationError,
        "Prerequisite Paint:1.0 belongs to another OS layer than 'Chrome'",
    )


def test_broken_prerequisite_is_refused(lab: Services) -> None:
    lab.layers.add_version("Office", "2025")
    lab.layers.set_version_state("Office:2025", VersionState.BROKEN, reason="activation fails")

    assert_refused(
        lab,
        lambda: lab.layers.add_version("Chrome", "121", prerequisites=["Office:2025"]),
        ValidationError,
        "Prerequisite Office:2025 is broken",
    )


@pytest.mark.parametrize(
    "prerequisites",
    [
        ["Office:2024", "Office:2024"],
        ["Office:2024", "office:2024"],
        ["Office", "Office:2024"],
    ],
    ids=["same-ref", "other-case", "bare-and-qualified"],
)
def test_duplicate_prerequisites_are_refused(lab: Services, prerequisites: list[str]) -> None:
    assert_refused(
        lab,
        lambda: lab.layers.add_version("Chrome", "121", prerequisites=prerequisites),
        ValidationError,
        "twice",
    )


def test_two_versions_of_one_layer_as_prerequisites_are_refused(lab: Services) -> None:
    lab.layers.add_version("Office", "2025")

    assert_refused(
        lab,
        lambda: lab.layers.add_version("Chrome", "121", prerequisites=["Office:2024", "Office:2025"]),
        ValidationError,
        "Office:2024 and 2025 twice",
    )


def test_unknown_prerequisite_is_refused(lab: Services) -> None:
    assert_refused(
        lab, lambda: lab.layers.add_version("Chrome", "121", prerequisites=["Excel:1"]), NotFound, "'Excel'"
    )


def test_set_prerequisites_replaces_the_list(lab: Services) -> None:
    lab.layers.add_version("Chrome", "121", prerequisites=["Office:2024"])

    info = lab.layers.set_prerequisites("Chrome:121", ["Notepad++:8.6"])

    assert info.prerequisites == ("Notepad++:8.6",)
    assert lab.layers.get_version("Office:2024").used_by == ()
    assert lab.layers.get_version("Notepad++:8.6").used_by == ("prerequisite of Chrome:121",)
    assert assert_audited(lab, "layer.version.prerequisites", "Chrome:121").change == {
        "prerequisites": [["Office:2024"], ["Notepad++:8.6"]]
    }


def test_set_prerequisites_runs_the_same_checks(lab: Services) -> None:
    lab.layers.add_version("Chrome", "121")
    assert_refused(
        lab, lambda: lab.layers.set_prerequisites("Chrome:121", ["Chrome:120"]), ValidationError, "its own prerequisite"
    )
    assert_refused(
        lab, lambda: lab.layers.set_prerequisites("Chrome:121", ["Paint:1.0"]), ValidationError, "another OS layer"
    )


def test_prerequisites_of_a_deployable_version_cannot_change(lab: Services) -> None:
    assert_refused(
        lab,
        lambda: lab.layers.set_prerequisites("Chrome:120", ["Office:2024"]),
        Conflict,
        "Chrome:120 is deployable",
    )


# --- the version state machine --------------------------------------------------------------------

E, F, D, B = VersionState.EDITING, VersionState.FINALIZING, VersionState.DEPLOYABLE, VersionState.BROKEN
_ALLOWED = {(E, F), (E, B), (F, D), (F, B), (F, E), (B, E)}


@pytest.mark.parametrize("target", list(VersionState), ids=lambda s: f"to-{s.value}")
@pytest.mark.parametrize("start", list(VersionState), ids=lambda s: f"from-{s.value}")
def test_version_state_transitions(lab: Services, start: VersionState, target: VersionState) -> None:
    lab.layers.add_version("Office", "2025")
    version_in_state(lab, "Office:2025", start)
    reason = "setup crashed" if target is B else ""

    def move() -> object:
        return lab.layers.set_version_state("Office:2025", target, reason=reason)

    if (start, target) in _ALLOWED:
        info = move()
        assert lab.layers.get_version("Office:2025").state is target
        assert info.state is target  # type: ignore[attr-defined]
        entry = assert_audited(lab, "layer.version.state", "Office:2025")
        assert entry.change["state"] == [start.value, target.value]
    else:
        assert_refused(lab, move, Conflict, f"Office:2025 is {start.value} and cannot become {target.value}")


def test_deployable_is_final(lab: Services) -> None:
    assert_refused(
        lab,
        lambda: lab.layers.set_version_state("Office:2024", VersionState.EDITING),
        Conflict,
        "allowed next states: none: it is final",
    )


def test_refused_transition_names_the_allowed_states(lab: Services) -> None:
    lab.layers.add_version("Office", "2025")
    assert_refused(
        lab,
        lambda: lab.layers.set_version_state("Office:2025", VersionState.DEPLOYABLE),
        Conflict,
        "allowed next states: broken, finalizing",
    )


@pytest.mark.parametrize("reason", ["", "   "])
def test_broken_needs_a_reason(lab: Services, reason: str) -> None:
    lab.layers.add_version("Office", "2025")
    error = assert_refused(
        lab,
        lambda: lab.layers.set_version_state("Office:2025", VersionState.BROKEN, reason=reason),
        ValidationError,
        "reason is required",
    )
    assert error.field == "reason"  # type: ignore[attr-defined]


def test_broken_reason_is_kept_until_repaired(lab: Services) -> None:
    lab.layers.add_version("Office", "2025")

    lab.layers.set_version_state("Office:2025", VersionState.BROKEN, reason="  activation fails ")
    assert lab.layers.get_version("Office:2025").state_reason == "activation fails"

    lab.layers.set_version_state("Office:2025", VersionState.EDITING)
    assert lab.layers.get_version("Office:2025").state_reason == ""


def test_deployable_records_size_and_checksum(lab: Services) -> None:
    lab.layers.add_version("Office", "2025")
    make_deployable(lab, "Office:2025", size=4096, checksum="sha256:ab")

    info = lab.layers.get_version("Office:2025")
    assert (info.state, info.size_bytes, info.checksum) == (VersionState.DEPLOYABLE, 4096, "sha256:ab")
    assert lab.layers.get_layer("Office").layer.size_bytes == 1024 + 4096


def test_negative_size_is_refused(lab: Services) -> None:
    lab.layers.add_version("Office", "2025")
    lab.layers.set_version_state("Office:2025", VersionState.FINALIZING)
    assert_refused(
        lab,
        lambda: lab.layers.set_version_state("Office:2025", VersionState.DEPLOYABLE, size_bytes=-1),
        ValidationError,
        "cannot be negative",
    )


def test_state_change_needs_a_version_name(lab: Services) -> None:
    assert_refused(
        lab, lambda: lab.layers.set_version_state("Office", VersionState.FINALIZING), ValidationError, "Office:VERSION"
    )


# --- deleting versions ----------------------------------------------------------------------------


@pytest.fixture
def used_lab(lab: Services) -> Services:
    """The lab plus two templates, a prerequisite and an elastic assignment using its versions."""
    create_template(lab, "Finance", os="Win11:1.0", platform="Citrix-VDA:1.0", apps=("Office:2024", "Chrome:120"))
    create_template(lab, "Sales", os="Win11:1.0", apps=("Office:2024",))
    lab.layers.add_version("Notepad++", "8.7", prerequisites=["Chrome:120"])
    lab.assignments.assign("Office:2024", PrincipalKind.AD_GROUP, FINANCE_SID, "LAB\\Finance")
    return lab


def test_deleting_an_os_version_used_by_templates_is_refused(used_lab: Services) -> None:
    assert_refused(
        used_lab,
        lambda: used_lab.layers.delete_version("Win11:1.0"),
        Conflict,
        "Version Win11:1.0 is in use and was not deleted: image template 'Finance'; image template 'Sales'.",
    )


def test_deleting_a_platform_version_used_by_a_template_is_refused(used_lab: Services) -> None:
    error = assert_refused(
        used_lab,
        lambda: used_lab.layers.delete_version("Citrix-VDA:1.0"),
        Conflict,
        "image template 'Finance'",
    )
    assert "Sales" not in str(error)


def test_deleting_an_app_version_used_by_a_template_is_refused(used_lab: Services) -> None:
    error = assert_refused(
        used_lab,
        lambda: used_lab.layers.delete_version("Chrome:120"),
        Conflict,
        "image template 'Finance'",
        "prerequisite of Notepad++:8.7",
    )
    assert "Sales" not in str(error)
    assert "elastic" not in str(error)


def test_deleting_a_prerequisite_is_refused(lab: Services) -> None:
    lab.layers.add_version("Notepad++", "8.7", prerequisites=["Chrome:120"])
    assert_refused(
        lab,
        lambda: lab.layers.delete_version("Chrome:120"),
        Conflict,
        "Version Chrome:120 is in use and was not deleted: prerequisite of Notepad++:8.7.",
    )


def test_deleting_an_elastically_assigned_version_is_refused(lab: Services) -> None:
    lab.assignments.assign("Office:2024", PrincipalKind.AD_GROUP, FINANCE_SID, "LAB\\Finance")
    assert_refused(
        lab,
        lambda: lab.layers.delete_version("Office:2024"),
        Conflict,
        "Version Office:2024 is in use and was not deleted: 1 elastic assignment.",
    )


def test_refusal_names_every_kind_of_user(used_lab: Services) -> None:
    used_lab.assignments.assign("Office:2024", PrincipalKind.AD_USER, "S-1-5-21-1-2-3-1002", "LAB\\alice")
    used_lab.layers.add_version("Chrome", "121", prerequisites=["Office:2024"])

    assert_refused(
        used_lab,
        lambda: used_lab.layers.delete_version("Office:2024"),
        Conflict,
        "image template 'Finance'; image template 'Sales'; prerequisite of Chrome:121; 2 elastic assignments.",
    )


def test_delete_unused_version(lab: Services) -> None:
    lab.layers.delete_version("Win11:2.0", comment="never finished")

    assert version_names(lab, "Win11") == ["1.0"]
    with pytest.raises(NotFound):
        lab.layers.get_version("Win11:2.0")
    entry = assert_audited(lab, "layer.version.delete", "Win11:2.0")
    assert entry.comment == "never finished"


def test_delete_version_frees_its_prerequisites(lab: Services) -> None:
    lab.layers.add_version("Chrome", "121", prerequisites=["Office:2024"])
    lab.layers.delete_version("Chrome:121")

    assert lab.layers.get_version("Office:2024").used_by == ()
    lab.layers.delete_version("Office:2024")
    assert version_names(lab, "Office") == []


def test_delete_version_needs_a_version_name(lab: Services) -> None:
    assert_refused(lab, lambda: lab.layers.delete_version("Win11"), ValidationError, "Win11:VERSION")


def test_delete_unknown_version_is_not_found(lab: Services) -> None:
    assert_refused(lab, lambda: lab.layers.delete_version("Win11:9.9"), NotFound, "no version '9.9'")


# --- deleting layers ------------------------------------------------------------------------------


def test_deleting_an_os_layer_with_bound_layers_is_refused(lab: Services) -> None:
    assert_refused(
        lab, lambda: lab.layers.delete_layer("Win10"), Conflict, "Layer 'Win10' is in use", "OS layer of 'Paint'"
    )
    assert_refused(
        lab,
        lambda: lab.layers.delete_layer("Win11"),
        Conflict,
        "OS layer of 'Chrome', 'Citrix-VDA', 'Notepad++', 'Office'",
    )


def test_deleting_a_layer_whose_versions_are_in_use_is_refused(used_lab: Services) -> None:
    assert_refused(
        used_lab,
        lambda: used_lab.layers.delete_layer("Office"),
        Conflict,
        "version 2024: image template 'Finance'",
        "version 2024: image template 'Sales'",
        "version 2024: 1 elastic assignment",
    )
    assert_refused(
        used_lab,
        lambda: used_lab.layers.delete_layer("Citrix-VDA"),
        Conflict,
        "version 1.0: image template 'Finance'",
    )


def test_delete_layer_cascades_its_versions(lab: Services) -> None:
    lab.layers.add_version("Paint", "2.0")
    version_ids = [v.id for v in lab.layers.get_layer("Paint").versions]

    lab.layers.delete_layer("Paint", comment="retired")

    assert "Paint" not in names(lab)
    with lab.catalog.read() as session:
        assert session.scalars(select(LayerVersion).where(LayerVersion.id.in_(version_ids))).all() == []
    entry = assert_audited(lab, "layer.delete", "Paint")
    assert entry.change == {"type": "app", "versions": ["1.0", "2.0"]}
    assert lab.layers.get_layer("Win10").bound_layers == ()


def test_os_layer_can_be_deleted_once_its_bound_layers_are_gone(lab: Services) -> None:
    lab.layers.delete_layer("Paint")
    lab.layers.delete_layer("win10")

    assert names(lab, type=LayerType.OS) == ["Win11"]
    assert_audited(lab, "layer.delete", "Win10")


def test_delete_layer_whose_version_has_prerequisites(lab: Services) -> None:
    lab.layers.add_version("Chrome", "121", prerequisites=["Office:2024"])

    lab.layers.delete_layer("Chrome")

    assert "Chrome" not in names(lab)
    assert lab.layers.get_version("Office:2024").used_by == ()


def test_delete_unknown_layer_is_not_found(lab: Services) -> None:
    assert_refused(lab, lambda: lab.layers.delete_layer("Excel"), NotFound, "'Excel'")


# --- audit ----------------------------------------------------------------------------------------


def test_only_successful_changes_are_audited_as_success(admin: Services) -> None:
    layers = admin.layers
    layers.create_layer("Win11", LayerType.OS)
    for refused in (
        lambda: layers.create_layer("win11", LayerType.OS),
        lambda: layers.create_layer("Bad|Name", LayerType.OS),
        lambda: layers.create_layer("Office", LayerType.APP),
    ):
        with pytest.raises(UserError):
            refused()
    layers.create_layer("Office", LayerType.APP, os_layer="Win11")
    layers.add_version("Office", "2024")
    with pytest.raises(Conflict):
        layers.add_version("Office", "2024")
    with pytest.raises(Conflict):
        layers.set_version_state("Office:2024", VersionState.DEPLOYABLE)
    layers.set_version_state("Office:2024", VersionState.FINALIZING)
    layers.delete_version("Office:2024")

    entries = list(reversed(admin.audit.list_entries()))
    assert [(e.operation, e.object_name) for e in entries] == [
        ("layer.create", "Win11"),
        ("layer.create", "Office"),
        ("layer.version.add", "Office:2024"),
        ("layer.version.state", "Office:2024"),
        ("layer.version.delete", "Office:2024"),
    ]
    assert {e.outcome for e in entries} == {AuditOutcome.SUCCESS}


def test_changes_need_the_role_for_the_layer_type(services_for: ServicesFactory, lab: Services) -> None:
    app_admin = services_for(Role.MANAGE_APP_LAYERS)
    app_admin.layers.add_version("Office", "2025")
    assert "2025" in version_names(lab, "Office")

    with pytest.raises(PermissionDenied, match="may not create, change or delete OS layers"):
        app_admin.layers.add_version("Win11", "3.0")
    assert version_names(lab, "Win11") == ["1.0", "2.0"]
    denied = newest_audit(lab)
    assert (denied.operation, denied.outcome, denied.user) == (
        "layer.version.add",
        AuditOutcome.DENIED,
        "manage_app_layers",
    )


def test_read_only_may_list_but_not_create(services_for: ServicesFactory, lab: Services) -> None:
    reader = services_for(Role.READ_ONLY)
    assert names(reader) == names(lab)
    with pytest.raises(PermissionDenied):
        reader.layers.create_layer("Excel", LayerType.APP, os_layer="Win11")
    assert "Excel" not in names(lab)
