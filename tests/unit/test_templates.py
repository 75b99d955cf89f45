"""Behaviour of app.services.templates: image templates, app layer priority, revisions and diffs."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from app.catalog.models import AuditOutcome, DiskFormat, ElasticMode, LayerType, Role, SysprepMode, VersionState
from app.errors import Conflict, NotFound, PermissionDenied, ValidationError
from app.services import Services
from app.services.templates import TemplateSpec
from app.services.views import AuditEntryInfo, FieldChange, TemplateInfo
from tests.conftest import ServicesFactory, make_deployable
from tests.support.catalog_checks import assert_refused

FINANCE = TemplateSpec(
    os="Win11:1.0",
    platform="Citrix-VDA:1.0",
    apps=("Office:2024", "Chrome:120"),
    disk_format=DiskFormat.VHDX,
    size_gb=120,
)


# --- helpers --------------------------------------------------------------------------------------


def spec(base: TemplateSpec = FINANCE, **changes: Any) -> TemplateSpec:
    return dataclasses.replace(base, **changes)



def assert_audited(services: Services, operation: str, object_name: str) -> AuditEntryInfo:
    entry = services.audit.list_entries(limit=1)[0]
    assert (entry.operation, entry.object_name, entry.outcome) == (operation, object_name, AuditOutcome.SUCCESS)
    return entry


def template_names(services: Services) -> list[str]:
    return [t.name for t in services.templates.list_templates()]


def apps_of(services: Services, name: str) -> tuple[str, ...]:
    return services.templates.get_template(name).app_layers


def add_deployable_version(services: Services, layer: str, version: str) -> str:
    ref = f"{layer}:{version}"
    services.layers.add_version(layer, version)
    make_deployable(services, ref)
    return ref


def everything_but_identity(info: TemplateInfo) -> dict[str, Any]:
    fields = dataclasses.asdict(info)
    for key in ("id", "name", "revision", "created_at", "updated_at"):
        fields.pop(key)
    return fields


# --- creating -------------------------------------------------------------------------------------


def test_create_template_with_os_platform_and_apps(lab: Services) -> None:
    info = lab.templates.create_template("Finance", FINANCE, comment="first cut")

    assert info.name == "Finance"
    assert (info.os_version, info.platform_version) == ("Win11:1.0", "Citrix-VDA:1.0")
    assert info.app_layers == ("Office:2024", "Chrome:120")
    assert (info.disk_format, info.size_gb, info.elastic_mode, info.sysprep) == (
        DiskFormat.VHDX,
        120,
        ElasticMode.NONE,
        SysprepMode.NOT_GENERALIZED,
    )
    assert (info.connector, info.revision, info.created_by, info.publish_blockers) == (None, 1, "admin", ())
    assert lab.templates.get_template("finance") == info
    assert lab.templates.list_templates() == [info]
    entry = assert_audited(lab, "template.create", "Finance")
    assert entry.comment == "first cut"
    assert entry.change["template"]["apps"] == ["Office:2024", "Chrome:120"]


def test_create_template_with_only_an_os_layer(lab: Services) -> None:
    info = lab.templates.create_template("Bare", TemplateSpec(os="Win10:1.0"))
    assert (info.os_version, info.platform_version, info.app_layers) == ("Win10:1.0", None, ())


def test_bare_layer_name_means_its_newest_usable_version(lab: Services) -> None:
    add_deployable_version(lab, "Office", "2025")
    lab.layers.add_version("Office", "2026")
    lab.layers.set_version_state("Office:2026", VersionState.BROKEN, reason="bad build")

    info = lab.templates.create_template("Finance", spec(apps=("Office",), platform="Citrix-VDA"))

    assert info.app_layers == ("Office:2025",)
    assert info.platform_version == "Citrix-VDA:1.0"


def test_create_template_with_settings_and_connector(lab: Services) -> None:
    lab.connectors.add_connector("Lab-Share", "folder", endpoint="/srv/images")

    info = lab.templates.create_template(
        "Finance",
        spec(
            connector="Lab-Share",
            disk_format=DiskFormat.VMDK,
            size_gb=65536,
            elastic_mode=ElasticMode.APPLICATION,
            sysprep=SysprepMode.GENERALIZE_OFFLINE,
            description="For the finance floor",
            icon="finance.png",
        ),
    )

    assert (info.connector, info.disk_format, info.size_gb) == ("Lab-Share", DiskFormat.VMDK, 65536)
    assert (info.elastic_mode, info.sysprep) == (ElasticMode.APPLICATION, SysprepMode.GENERALIZE_OFFLINE)
    assert (info.description, info.icon) == ("For the finance floor", "finance.png")
    assert lab.connectors.get_connector("Lab-Share").used_by == ("Finance",)


def test_default_priority_puts_the_oldest_layer_lowest_and_the_newest_highest(lab: Services) -> None:
    # The lab created Office, then Chrome, then Notepad++; the order given does not matter.
    info = lab.templates.create_template("Finance", spec(apps=("Notepad++:8.6", "Chrome:120", "Office:2024")))
    assert info.app_layers == ("Office:2024", "Chrome:120", "Notepad++:8.6")


def test_default_priority_follows_layer_age_not_version_age(lab: Services) -> None:
    # A new version of the oldest layer still sits lowest.
    add_deployable_version(lab, "Office", "2025")
    info = lab.templates.create_template("Finance", spec(apps=("Office:2025", "Chrome:120")))
    assert info.app_layers == ("Office:2025", "Chrome:120")


def test_app_layer_of_another_os_layer_is_refused(lab: Services) -> None:
    assert_refused(
        lab,
        lambda: lab.templates.create_template("Finance", spec(apps=("Office:2024", "Paint:1.0"))),
        ValidationError,
        "App layer 'Paint' is bound to OS layer 'Win10', but the template uses OS layer 'Win11'",
    )


def test_platform_layer_of_another_os_layer_is_refused(lab: Services) -> None:
    lab.layers.create_layer("Horizon", LayerType.PLATFORM, os_layer="Win10")
    add_deployable_version(lab, "Horizon", "8")

    assert_refused(
        lab,
        lambda: lab.templates.create_template("Finance", spec(platform="Horizon:8")),
        ValidationError,
        "Platform layer 'Horizon' is bound to OS layer 'Win10', but the template uses OS layer 'Win11'",
    )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"os": "Office:2024"}, "'Office' is a app layer, not an OS layer"),
        ({"os": "Citrix-VDA:1.0"}, "'Citrix-VDA' is a platform layer, not an OS layer"),
        ({"platform": "Win11:1.0"}, "'Win11' is a os layer, not a platform layer"),
        ({"platform": "Chrome:120"}, "'Chrome' is a app layer, not a platform layer"),
        ({"apps": ("Citrix-VDA:1.0",)}, "'Citrix-VDA' is a platform layer, not an app layer"),
        ({"apps": ("Win11:1.0",)}, "'Win11' is a os layer, not an app layer"),
    ],
    ids=["os=app", "os=platform", "platform=os", "platform=app", "app=platform", "app=os"],
)
def test_wrong_layer_type_for_a_slot_is_refused(lab: Services, changes: dict[str, Any], message: str) -> None:
    assert_refused(lab, lambda: lab.templates.create_template("Finance", spec(**changes)), ValidationError, message)


@pytest.mark.parametrize("slot", ["os", "platform", "apps"])
def test_broken_version_is_refused(lab: Services, slot: str) -> None:
    layer = {"os": "Win11", "platform": "Citrix-VDA", "apps": "Office"}[slot]
    lab.layers.add_version(layer, "9")
    lab.layers.set_version_state(f"{layer}:9", VersionState.BROKEN, reason="corrupt disk")
    ref = f"{layer}:9"
    if slot == "apps":
        changes: dict[str, Any] = {"apps": (ref,), "os": "Win11:1.0"}
    else:
        changes = {slot: ref}

    assert_refused(
        lab,
        lambda: lab.templates.create_template("Finance", spec(**changes)),
        ValidationError,
        f"{ref} is broken (corrupt disk)",
    )


@pytest.mark.parametrize("apps", [("Office:2024", "Office:2024"), ("Office:2024", "office"), ("Office", "Office:2024")])
def test_same_app_layer_twice_is_refused(lab: Services, apps: tuple[str, ...]) -> None:
    assert_refused(lab, lambda: lab.templates.create_template("Finance", spec(apps=apps)), ValidationError, "twice")


def test_two_versions_of_one_app_layer_are_refused(lab: Services) -> None:
    add_deployable_version(lab, "Office", "2025")
    assert_refused(
        lab,
        lambda: lab.templates.create_template("Finance", spec(apps=("Office:2024", "Office:2025"))),
        ValidationError,
        "The app layer list lists 'Office' twice",
    )


@pytest.mark.parametrize("size", [0, 65537, -1, "100", 100.0, 1.5, True, None], ids=repr)
def test_invalid_disk_size_is_refused(lab: Services, size: Any) -> None:
    error = assert_refused(
        lab,
        lambda: lab.templates.create_template("Finance", spec(size_gb=size)),
        ValidationError,
        "from 1 to 65536",
        f"got {size!r}",
    )
    assert error.field == "size_gb"  # type: ignore[attr-defined]


@pytest.mark.parametrize("size", [1, 65536])
def test_disk_size_limits_are_accepted(lab: Services, size: int) -> None:
    assert lab.templates.create_template("Finance", spec(size_gb=size)).size_gb == size


def test_unknown_disk_format_is_refused(lab: Services) -> None:
    assert_refused(
        lab,
        lambda: lab.templates.create_template("Finance", spec(disk_format="vdi")),  # type: ignore[arg-type]
        ValidationError,
        "Unknown disk format 'vdi'",
    )


def test_unknown_connector_is_refused(lab: Services) -> None:
    assert_refused(
        lab,
        lambda: lab.templates.create_template("Finance", spec(connector="Nowhere")),
        NotFound,
        "no connector configuration named 'Nowhere'",
    )


@pytest.mark.parametrize(
    ("changes", "missing"),
    [({"os": "Win12:1.0"}, "'Win12'"), ({"apps": ("Excel:1",)}, "'Excel'"), ({"apps": ("Office:1999",)}, "'1999'")],
)
def test_unknown_layers_and_versions_are_refused(lab: Services, changes: dict[str, Any], missing: str) -> None:
    assert_refused(lab, lambda: lab.templates.create_template("Finance", spec(**changes)), NotFound, missing)


@pytest.mark.parametrize(
    ("bad_name", "why"),
    [("", "is empty"), ("Fin/ance", "contains '/'"), ("Finance.", "ends with a dot"), ("PRN", "reserved")],
)
def test_invalid_template_names_are_refused(lab: Services, bad_name: str, why: str) -> None:
    assert_refused(
        lab, lambda: lab.templates.create_template(bad_name, FINANCE), ValidationError, "template name", why
    )


@pytest.mark.parametrize("clash", ["Finance", "finance", "FINANCE"])
def test_template_names_are_unique_ignoring_case(lab: Services, clash: str) -> None:
    lab.templates.create_template("Finance", FINANCE)
    assert_refused(
        lab,
        lambda: lab.templates.create_template(clash, spec(apps=())),
        Conflict,
        "An image template named 'Finance' already exists",
    )


def test_read_only_caller_may_not_create_templates(services_for: ServicesFactory, lab: Services) -> None:
    reader = services_for(Role.READ_ONLY)
    with pytest.raises(PermissionDenied, match="image templates"):
        reader.templates.create_template("Finance", FINANCE)
    assert template_names(lab) == []
    assert lab.audit.list_entries(limit=1)[0].outcome is AuditOutcome.DENIED


# --- priority -------------------------------------------------------------------------------------


@pytest.fixture
def finance(lab: Services) -> Services:
    """The lab with template Finance: Win11:1.0, Citrix-VDA:1.0, Office < Chrome < Notepad++."""
    lab.templates.create_template(
        "Finance", spec(apps=("Office:2024", "Chrome:120", "Notepad++:8.6")), comment="first cut"
    )
    return lab


def test_set_priority_reorders_and_saves_a_new_revision(finance: Services) -> None:
    info = finance.templates.set_priority("Finance", ["Notepad++", "Office:2024", "chrome"], comment="Notepad first")

    expected = ("Notepad++:8.6", "Office:2024", "Chrome:120")
    assert info.app_layers == expected
    assert info.revision == 2
    assert apps_of(finance, "Finance") == expected
    history = finance.templates.history("Finance")
    assert [r.revision for r in history] == [1, 2]
    assert history[-1].snapshot["apps"] == list(expected)
    assert history[-1].comment == "Notepad first"
    entry = assert_audited(finance, "template.priority", "Finance")
    assert entry.change["apps"] == [["Office:2024", "Chrome:120", "Notepad++:8.6"], list(expected)]


def test_set_priority_can_be_repeated(finance: Services) -> None:
    finance.templates.set_priority("Finance", ["Chrome", "Office", "Notepad++"])
    finance.templates.set_priority("Finance", ["Notepad++", "Chrome", "Office"])
    assert apps_of(finance, "Finance") == ("Notepad++:8.6", "Chrome:120", "Office:2024")
    assert finance.templates.get_template("Finance").revision == 3


def test_priority_list_leaving_out_a_layer_is_refused(finance: Services) -> None:
    assert_refused(
        finance,
        lambda: finance.templates.set_priority("Finance", ["Chrome", "Office"]),
        ValidationError,
        "must name every app layer",
        "leaves out 'Notepad++'",
    )


def test_priority_list_repeating_a_layer_is_refused(finance: Services) -> None:
    assert_refused(
        finance,
        lambda: finance.templates.set_priority("Finance", ["Chrome", "Office", "chrome:120", "Notepad++"]),
        ValidationError,
        "names app layer 'chrome' twice",
    )


@pytest.mark.parametrize("stranger", ["Paint", "Excel", "Citrix-VDA"])
def test_priority_list_naming_a_layer_not_in_the_template_is_refused(finance: Services, stranger: str) -> None:
    assert_refused(
        finance,
        lambda: finance.templates.set_priority("Finance", ["Chrome", "Office", "Notepad++", stranger]),
        ValidationError,
        f"App layer {stranger!r} is not in template 'Finance'",
        "its app layers: Office, Chrome, Notepad++",
    )


def test_priority_list_in_the_current_order_is_refused(finance: Services) -> None:
    assert_refused(
        finance,
        lambda: finance.templates.set_priority("Finance", ["Office", "Chrome", "Notepad++"]),
        ValidationError,
        "already has this priority order",
    )


def test_priority_of_unknown_template_is_not_found(finance: Services) -> None:
    assert_refused(finance, lambda: finance.templates.set_priority("Sales", ["Office"]), NotFound, "'Sales'")


# --- updating -------------------------------------------------------------------------------------


def test_update_puts_added_layers_on_top_even_when_older(lab: Services) -> None:
    lab.templates.create_template("Finance", spec(apps=("Chrome:120", "Notepad++:8.6")))

    # Office is the oldest layer: created with it, it would sit lowest; added later, it goes on top.
    info = lab.templates.update_template("Finance", spec(apps=("Office:2024", "Chrome:120", "Notepad++:8.6")))

    assert info.app_layers == ("Chrome:120", "Notepad++:8.6", "Office:2024")
    assert info.revision == 2


def test_update_keeps_the_order_set_by_set_priority(finance: Services) -> None:
    finance.templates.set_priority("Finance", ["Notepad++", "Chrome", "Office"])
    lab = finance
    lab.layers.create_layer("7-Zip", LayerType.APP, os_layer="Win11")
    add_deployable_version(lab, "7-Zip", "23")
    lab.layers.create_layer("VLC", LayerType.APP, os_layer="Win11")
    add_deployable_version(lab, "VLC", "3")

    info = lab.templates.update_template(
        "Finance", spec(apps=("VLC:3", "Office:2024", "7-Zip:23", "Chrome:120", "Notepad++:8.6"))
    )

    # Kept layers in their set order, then the added ones with the newest layer highest.
    assert info.app_layers == ("Notepad++:8.6", "Chrome:120", "Office:2024", "7-Zip:23", "VLC:3")
    assert apps_of(lab, "Finance") == info.app_layers


def test_update_to_a_new_version_keeps_the_layer_in_place(finance: Services) -> None:
    finance.templates.set_priority("Finance", ["Chrome", "Office", "Notepad++"])
    add_deployable_version(finance, "Office", "2025")

    info = finance.templates.update_template("Finance", spec(apps=("Office:2025", "Chrome:120", "Notepad++:8.6")))

    assert info.app_layers == ("Chrome:120", "Office:2025", "Notepad++:8.6")


def test_update_removing_a_layer_keeps_the_others_in_order(finance: Services) -> None:
    finance.templates.set_priority("Finance", ["Notepad++", "Chrome", "Office"])

    info = finance.templates.update_template("Finance", spec(apps=("Office:2024", "Notepad++:8.6")))

    assert info.app_layers == ("Notepad++:8.6", "Office:2024")
    assert finance.layers.get_version("Chrome:120").used_by == ()


def test_update_changes_settings_and_audits_the_changes(finance: Services) -> None:
    info = finance.templates.update_template(
        "Finance",
        spec(apps=("Office:2024", "Chrome:120", "Notepad++:8.6"), size_gb=200, platform=None),
        comment="bigger disk, no VDA",
    )

    assert (info.size_gb, info.platform_version, info.revision) == (200, None, 2)
    entry = assert_audited(finance, "template.update", "Finance")
    assert entry.change == {"revision": 2, "changes": {"platform": ["Citrix-VDA:1.0", None], "size_gb": [120, 200]}}
    assert entry.comment == "bigger disk, no VDA"


def test_update_with_no_change_is_refused(finance: Services) -> None:
    assert_refused(
        finance,
        lambda: finance.templates.update_template("Finance", spec(apps=("Office:2024", "Chrome:120", "Notepad++:8.6"))),
        ValidationError,
        "Nothing to save",
    )


def test_update_with_the_same_apps_in_another_order_changes_nothing(finance: Services) -> None:
    # The order of --app options is not a priority list: kept layers keep their place.
    assert_refused(
        finance,
        lambda: finance.templates.update_template("Finance", spec(apps=("Notepad++:8.6", "Chrome:120", "Office:2024"))),
        ValidationError,
        "Nothing to save",
    )


def test_update_runs_the_same_checks_as_create(finance: Services) -> None:
    assert_refused(
        finance,
        lambda: finance.templates.update_template("Finance", spec(apps=("Paint:1.0",))),
        ValidationError,
        "'Win10'",
        "'Win11'",
    )
    assert_refused(
        finance, lambda: finance.templates.update_template("Finance", spec(size_gb=0)), ValidationError, "got 0"
    )


# --- history and diff -----------------------------------------------------------------------------


def test_history_lists_every_revision_with_its_comment(finance: Services) -> None:
    finance.templates.update_template("Finance", spec(apps=("Office:2024", "Chrome:120")), comment="drop Notepad++")
    finance.templates.set_priority("Finance", ["Chrome", "Office"], comment="Chrome under Office")
    finance.templates.rename_template("Finance", "Accounting", comment="department renamed")

    history = finance.templates.history("Accounting")

    assert [(r.revision, r.comment, r.saved_by) for r in history] == [
        (1, "first cut", "admin"),
        (2, "drop Notepad++", "admin"),
        (3, "Chrome under Office", "admin"),
        (4, "department renamed", "admin"),
    ]
    assert [r.snapshot["apps"] for r in history] == [
        ["Office:2024", "Chrome:120", "Notepad++:8.6"],
        ["Office:2024", "Chrome:120"],
        ["Chrome:120", "Office:2024"],
        ["Chrome:120", "Office:2024"],
    ]
    assert [r.snapshot["name"] for r in history] == ["Finance", "Finance", "Finance", "Accounting"]


def test_diff_shows_exactly_the_changed_fields(finance: Services) -> None:
    finance.templates.update_template("Finance", spec(apps=("Office:2024", "Chrome:120")))
    finance.templates.update_template(
        "Finance", spec(apps=("Office:2024", "Chrome:120"), size_gb=80, sysprep=SysprepMode.GENERALIZE_OFFLINE)
    )

    assert finance.templates.diff("Finance", 1, 2) == [
        FieldChange("apps", ["Office:2024", "Chrome:120", "Notepad++:8.6"], ["Office:2024", "Chrome:120"]),
    ]
    assert finance.templates.diff("Finance", 2, 3) == [
        FieldChange("size_gb", 120, 80),
        FieldChange("sysprep", "not_generalized", "generalize_offline"),
    ]
    assert finance.templates.diff("Finance", 3, 1) == [
        FieldChange("apps", ["Office:2024", "Chrome:120"], ["Office:2024", "Chrome:120", "Notepad++:8.6"]),
        FieldChange("size_gb", 80, 120),
        FieldChange("sysprep", "generalize_offline", "not_generalized"),
    ]
    assert finance.templates.diff("Finance", 2, 2) == []


def test_diff_of_a_priority_change(finance: Services) -> None:
    finance.templates.set_priority("Finance", ["Notepad++", "Office", "Chrome"])
    assert finance.templates.diff("Finance", 1, 2) == [
        FieldChange(
            "apps",
            ["Office:2024", "Chrome:120", "Notepad++:8.6"],
            ["Notepad++:8.6", "Office:2024", "Chrome:120"],
        )
    ]


def test_diff_with_an_unknown_revision_is_not_found(finance: Services) -> None:
    with pytest.raises(NotFound, match="has no revision 5"):
        finance.templates.diff("Finance", 1, 5)


# --- clone, rename, delete ------------------------------------------------------------------------


def test_clone_copies_everything_including_priority(finance: Services) -> None:
    finance.connectors.add_connector("Lab-Share", "folder", endpoint="/srv/images")
    finance.templates.update_template(
        "Finance",
        spec(apps=("Office:2024", "Chrome:120", "Notepad++:8.6"), connector="Lab-Share", description="finance floor"),
    )
    finance.templates.set_priority("Finance", ["Notepad++", "Office", "Chrome"])
    source = finance.templates.get_template("Finance")

    clone = finance.templates.clone_template("Finance", "Finance-Test")

    assert clone.name == "Finance-Test"
    assert clone.id != source.id
    assert everything_but_identity(clone) == everything_but_identity(source)
    assert clone.app_layers == ("Notepad++:8.6", "Office:2024", "Chrome:120")
    assert finance.templates.get_template("Finance-Test") == clone
    assert_audited(finance, "template.clone", "Finance-Test")


def test_clone_starts_its_own_history(finance: Services) -> None:
    finance.templates.set_priority("Finance", ["Notepad++", "Office", "Chrome"])

    clone = finance.templates.clone_template("Finance", "Finance-Test")

    assert clone.revision == 1
    history = finance.templates.history("Finance-Test")
    assert [(r.revision, r.comment) for r in history] == [(1, "cloned from Finance")]
    assert history[0].snapshot["name"] == "Finance-Test"
    assert len(finance.templates.history("Finance")) == 2


def test_clone_is_independent_of_its_source(finance: Services) -> None:
    finance.templates.clone_template("Finance", "Finance-Test", comment="for testing")
    finance.templates.set_priority("Finance-Test", ["Chrome", "Office", "Notepad++"])

    assert apps_of(finance, "Finance") == ("Office:2024", "Chrome:120", "Notepad++:8.6")
    assert apps_of(finance, "Finance-Test") == ("Chrome:120", "Office:2024", "Notepad++:8.6")
    assert finance.templates.history("Finance-Test")[0].comment == "for testing"


def test_clone_to_an_existing_name_is_refused(finance: Services) -> None:
    finance.templates.create_template("Sales", spec(apps=()))
    assert_refused(
        finance,
        lambda: finance.templates.clone_template("Finance", "SALES"),
        Conflict,
        "An image template named 'Sales' already exists",
    )


def test_clone_of_unknown_template_is_not_found(finance: Services) -> None:
    assert_refused(finance, lambda: finance.templates.clone_template("Sales", "Sales-2"), NotFound, "'Sales'")


def test_rename_template(finance: Services) -> None:
    info = finance.templates.rename_template("Finance", "Accounting", comment="department renamed")

    assert (info.name, info.revision) == ("Accounting", 2)
    assert template_names(finance) == ["Accounting"]
    with pytest.raises(NotFound):
        finance.templates.get_template("Finance")
    assert finance.templates.diff("Accounting", 1, 2) == [FieldChange("name", "Finance", "Accounting")]
    assert assert_audited(finance, "template.rename", "Finance").change == {"name": ["Finance", "Accounting"]}


def test_rename_may_change_only_the_case(finance: Services) -> None:
    assert finance.templates.rename_template("Finance", "FINANCE").name == "FINANCE"


def test_rename_to_the_same_name_is_refused(finance: Services) -> None:
    assert_refused(
        finance,
        lambda: finance.templates.rename_template("Finance", "Finance"),
        ValidationError,
        "already has that name",
    )


def test_rename_to_another_templates_name_is_refused(finance: Services) -> None:
    finance.templates.create_template("Sales", spec(apps=()))
    assert_refused(
        finance,
        lambda: finance.templates.rename_template("Finance", "sales"),
        Conflict,
        "An image template named 'Sales' already exists",
    )


def test_rename_to_an_invalid_name_is_refused(finance: Services) -> None:
    assert_refused(
        finance, lambda: finance.templates.rename_template("Finance", "Fin|ance"), ValidationError, "contains '|'"
    )


def test_delete_template(finance: Services) -> None:
    finance.templates.create_template("Sales", spec(apps=()))

    finance.templates.delete_template("finance", comment="obsolete")

    assert template_names(finance) == ["Sales"]
    with pytest.raises(NotFound):
        finance.templates.history("Finance")
    entry = assert_audited(finance, "template.delete", "Finance")
    assert entry.comment == "obsolete"
    assert entry.change["template"]["apps"] == ["Office:2024", "Chrome:120", "Notepad++:8.6"]


def test_deleting_a_template_frees_its_layer_versions(finance: Services) -> None:
    finance.templates.delete_template("Finance")

    assert finance.layers.get_version("Notepad++:8.6").used_by == ()
    finance.layers.delete_version("Notepad++:8.6")
    finance.layers.delete_layer("Citrix-VDA")
    assert "Citrix-VDA" not in [layer.name for layer in finance.layers.list_layers()]


def test_a_deleted_name_can_be_used_again(finance: Services) -> None:
    finance.templates.delete_template("Finance")
    info = finance.templates.create_template("Finance", spec(apps=()))
    assert info.revision == 1
    assert [r.revision for r in finance.templates.history("Finance")] == [1]


def test_delete_unknown_template_is_not_found(finance: Services) -> None:
    assert_refused(finance, lambda: finance.templates.delete_template("Sales"), NotFound, "'Sales'")


# --- listing and publish blockers -----------------------------------------------------------------


def test_list_templates_is_sorted_and_searchable(lab: Services) -> None:
    for name in ("Sales", "Finance", "Fin_Test", "FinXTest"):
        lab.templates.create_template(name, spec(apps=()))

    assert template_names(lab) == ["Fin_Test", "Finance", "FinXTest", "Sales"]
    assert [t.name for t in lab.templates.list_templates(search="fin")] == ["Fin_Test", "Finance", "FinXTest"]
    assert [t.name for t in lab.templates.list_templates(search="_")] == ["Fin_Test"]
    assert lab.templates.list_templates(search="%") == []


def test_publish_blockers_list_every_version_that_is_not_deployable(lab: Services) -> None:
    lab.layers.add_version("Office", "2025")
    lab.layers.set_version_state("Office:2025", VersionState.FINALIZING)

    info = lab.templates.create_template("Next", spec(os="Win11:2.0", apps=("Office:2025", "Chrome:120")))

    assert info.publish_blockers == (
        "Win11:2.0 is editing, not deployable",
        "Office:2025 is finalizing, not deployable",
    )
    assert lab.templates.get_template("Next").publish_blockers == info.publish_blockers


def test_publish_blockers_clear_once_versions_are_deployable(lab: Services) -> None:
    lab.templates.create_template("Next", spec(os="Win11:2.0"))
    make_deployable(lab, "Win11:2.0")
    assert lab.templates.get_template("Next").publish_blockers == ()


def test_platform_blocker_is_listed(lab: Services) -> None:
    lab.layers.add_version("Citrix-VDA", "2.0")
    info = lab.templates.create_template("Next", spec(platform="Citrix-VDA:2.0"))
    assert info.publish_blockers == ("Citrix-VDA:2.0 is editing, not deployable",)


@pytest.mark.parametrize(
    ("field", "value", "what"),
    [("elastic_mode", "everything", "elastic layering mode"), ("sysprep", "maybe", "sysprep mode"),
     ("disk_format", "iso", "disk format")],
)
def test_unknown_choices_are_refused_with_the_valid_ones_listed(lab: Services, field: str, value: str,
                                                                what: str) -> None:
    spec = dataclasses.replace(TemplateSpec(os="Win11:1.0"), **{field: value})
    with pytest.raises(ValidationError, match=f"Unknown {what} '{value}'; use one of: "):
        lab.templates.create_template("Odd", spec)
    assert lab.templates.list_templates() == []
