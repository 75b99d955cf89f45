"""Behaviour of app.services.publishing: the publish plan and the record of published images."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select

from app.catalog.models import AuditOutcome, DiskFormat, LayerType, PublishedImage, Role, VersionState
from app.errors import Conflict, NotFound, PermissionDenied, ValidationError
from app.services import Services
from app.services.base import ServiceContext
from app.services.publishing import PublishingService
from app.services.templates import TemplateSpec
from app.services.views import PublishPlan, StackEntry, to_jsonable
from tests.conftest import ServicesFactory, make_deployable
from tests.support.catalog_checks import assert_refused

START = datetime(2024, 5, 17, 9, 5, 42, tzinfo=UTC)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: datetime = START) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


# --- helpers and fixtures -------------------------------------------------------------------------


def publishing_with_clock(services: Services, clock: Clock) -> PublishingService:
    ctx = ServiceContext(catalog=services.catalog, caller=services.caller, secrets=services.secrets, clock=clock)
    return PublishingService(ctx)


def deployable_layer(
    services: Services, name: str, layer_type: LayerType, version: str, *, size: int, checksum: str
) -> None:
    services.layers.create_layer(name, layer_type, os_layer=None if layer_type is LayerType.OS else "Win11")
    services.layers.add_version(name, version)
    make_deployable(services, f"{name}:{version}", size=size, checksum=checksum)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def stack(admin: Services) -> Services:
    """Win11 (OS), Citrix-VDA (platform), Office < Chrome < Notepad++ (apps), each with its own size and
    checksum, and template Finance using all of them."""
    deployable_layer(admin, "Win11", LayerType.OS, "1.0", size=20_000, checksum="sha256:win11")
    deployable_layer(admin, "Citrix-VDA", LayerType.PLATFORM, "2402", size=3_000, checksum="sha256:vda")
    deployable_layer(admin, "Office", LayerType.APP, "2024", size=2_000, checksum="sha256:office")
    deployable_layer(admin, "Chrome", LayerType.APP, "120", size=1_000, checksum="sha256:chrome")
    deployable_layer(admin, "Notepad++", LayerType.APP, "8.6", size=500, checksum="sha256:npp")
    admin.templates.create_template(
        "Finance",
        TemplateSpec(
            os="Win11:1.0",
            platform="Citrix-VDA:2402",
            apps=("Office:2024", "Chrome:120", "Notepad++:8.6"),
            disk_format=DiskFormat.VHDX,
            size_gb=80,
        ),
    )
    return admin


@pytest.fixture
def publishing(stack: Services, clock: Clock) -> PublishingService:
    return publishing_with_clock(stack, clock)


def record(publishing: PublishingService, plan: PublishPlan, **overrides: Any) -> Any:
    values: dict[str, Any] = {
        "size_bytes": 26_500,
        "checksum": "sha256:image",
        "location": f"/srv/images/{plan.image_name}.vhdx",
    }
    values.update(overrides)
    return publishing.record_image(plan, **values)


def image_names(services: Services, template: str | None = None) -> list[str]:
    return [image.name for image in services.publishing.list_images(template)]



def stored_template_id(services: Services, image_name: str) -> int | None:
    with services.catalog.read() as session:
        row = session.scalars(select(PublishedImage).where(PublishedImage.name == image_name)).one()
        return row.template_id


# --- the plan -------------------------------------------------------------------------------------


def test_plan_stacks_os_then_apps_by_priority_then_platform(publishing: PublishingService, stack: Services) -> None:
    plan = publishing.plan("Finance")

    def version_id(ref: str) -> int:
        return stack.layers.get_version(ref).id

    assert plan.stack == (
        StackEntry("os", "Win11", "1.0", version_id("Win11:1.0"), None, 20_000, "sha256:win11"),
        StackEntry("app", "Office", "2024", version_id("Office:2024"), 0, 2_000, "sha256:office"),
        StackEntry("app", "Chrome", "120", version_id("Chrome:120"), 1, 1_000, "sha256:chrome"),
        StackEntry("app", "Notepad++", "8.6", version_id("Notepad++:8.6"), 2, 500, "sha256:npp"),
        StackEntry("platform", "Citrix-VDA", "2402", version_id("Citrix-VDA:2402"), None, 3_000, "sha256:vda"),
    )


def test_plan_follows_the_templates_priority_order(publishing: PublishingService, stack: Services) -> None:
    stack.templates.set_priority("Finance", ["Notepad++", "Office", "Chrome"])

    plan = publishing.plan("Finance")

    assert [(e.layer, e.priority) for e in plan.stack] == [
        ("Win11", None),
        ("Notepad++", 0),
        ("Office", 1),
        ("Chrome", 2),
        ("Citrix-VDA", None),
    ]
    assert plan.template_revision == 2


def test_plan_without_platform_layer_ends_with_the_top_app(publishing: PublishingService, stack: Services) -> None:
    stack.templates.create_template("Lean", TemplateSpec(os="Win11:1.0", apps=("Chrome:120", "Office:2024")))

    plan = publishing.plan("Lean")

    assert [(e.role, e.layer) for e in plan.stack] == [("os", "Win11"), ("app", "Office"), ("app", "Chrome")]


def test_plan_of_an_os_only_template(publishing: PublishingService, stack: Services) -> None:
    stack.templates.create_template("Bare", TemplateSpec(os="Win11:1.0"))
    assert [(e.role, e.layer) for e in publishing.plan("Bare").stack] == [("os", "Win11")]


def test_plan_names_the_image_after_template_and_minute(publishing: PublishingService) -> None:
    plan = publishing.plan("Finance")

    assert plan.image_name == "Finance_2024-05-17_09-05"
    assert (plan.template, plan.template_revision, plan.disk_format, plan.size_gb, plan.connector) == (
        "Finance",
        1,
        DiskFormat.VHDX,
        80,
        None,
    )


def test_image_name_pads_every_field(stack: Services) -> None:
    early = publishing_with_clock(stack, Clock(datetime(2025, 1, 2, 3, 4, 59, tzinfo=UTC)))
    assert early.plan("finance").image_name == "Finance_2025-01-02_03-04"


def test_image_name_can_be_stamped_by_patching_now(
    stack: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stack.publishing, "_now", lambda: datetime(2030, 12, 31, 23, 59, tzinfo=UTC))
    assert stack.publishing.plan("Finance").image_name == "Finance_2030-12-31_23-59"


def test_plan_names_the_connector(publishing: PublishingService, stack: Services) -> None:
    stack.connectors.add_connector("Lab-Share", "folder", endpoint="/srv/images")
    stack.templates.update_template(
        "Finance",
        TemplateSpec(
            os="Win11:1.0",
            platform="Citrix-VDA:2402",
            apps=("Office:2024", "Chrome:120", "Notepad++:8.6"),
            size_gb=80,
            connector="Lab-Share",
        ),
    )
    plan = publishing.plan("Finance")
    assert (plan.connector, plan.template_revision) == ("Lab-Share", 2)


def test_plan_refuses_a_template_with_versions_that_are_not_deployable(
    publishing: PublishingService, stack: Services
) -> None:
    stack.layers.add_version("Win11", "2.0")
    stack.layers.add_version("Chrome", "121")
    stack.layers.set_version_state("Chrome:121", VersionState.FINALIZING)
    stack.layers.add_version("Citrix-VDA", "2403")
    stack.templates.create_template(
        "Next", TemplateSpec(os="Win11:2.0", platform="Citrix-VDA:2403", apps=("Office:2024", "Chrome:121"))
    )

    error = assert_refused(
        stack,
        lambda: publishing.plan("Next"),
        Conflict,
        "Template 'Next' cannot be published yet",
        "Win11:2.0 is editing, not deployable",
        "Citrix-VDA:2403 is editing, not deployable",
        "Chrome:121 is finalizing, not deployable",
    )
    assert "Office" not in str(error)


def test_plan_of_unknown_template_is_not_found(publishing: PublishingService) -> None:
    with pytest.raises(NotFound, match="'Sales'"):
        publishing.plan("Sales")


def test_plan_needs_the_publish_role(services_for: ServicesFactory, stack: Services) -> None:
    with pytest.raises(PermissionDenied, match="publish layered images"):
        services_for(Role.MANAGE_IMAGE_TEMPLATES).publishing.plan("Finance")
    assert services_for(Role.PUBLISH_LAYERED_IMAGES).publishing.plan("Finance").template == "Finance"


# --- recording images ------------------------------------------------------------------------------


def test_record_image_stores_the_stack_with_sizes_and_checksums(
    publishing: PublishingService, stack: Services, clock: Clock
) -> None:
    plan = publishing.plan("Finance")
    clock.advance(minutes=7)

    info = record(
        publishing,
        plan,
        conflict_report=[{"path": "C:/Windows/x.dll", "winner": "Chrome"}],
        comment="monthly build",
    )

    assert info.name == "Finance_2024-05-17_09-05"
    assert (info.template, info.template_revision, info.disk_format) == ("Finance", 1, DiskFormat.VHDX)
    assert (info.size_bytes, info.checksum, info.location) == (
        26_500,
        "sha256:image",
        "/srv/images/Finance_2024-05-17_09-05.vhdx",
    )
    assert info.layers == tuple(to_jsonable(entry) for entry in plan.stack)
    assert [(layer["layer"], layer["size_bytes"], layer["checksum"]) for layer in info.layers] == [
        ("Win11", 20_000, "sha256:win11"),
        ("Office", 2_000, "sha256:office"),
        ("Chrome", 1_000, "sha256:chrome"),
        ("Notepad++", 500, "sha256:npp"),
        ("Citrix-VDA", 3_000, "sha256:vda"),
    ]
    assert info.conflict_count == 1
    assert (info.created_at, info.created_by) == (START + timedelta(minutes=7), "admin")
    assert stack.publishing.list_images() == [info]

    entry = stack.audit.list_entries(limit=1)[0]
    assert (entry.operation, entry.object_name, entry.outcome, entry.comment) == (
        "image.publish",
        "Finance_2024-05-17_09-05",
        AuditOutcome.SUCCESS,
        "monthly build",
    )
    assert entry.change == {"template": "Finance", "revision": 1, "location": info.location}


def test_recorded_stack_does_not_change_with_the_template(publishing: PublishingService, stack: Services) -> None:
    info = record(publishing, publishing.plan("Finance"))
    stack.templates.set_priority("Finance", ["Notepad++", "Chrome", "Office"])

    kept = stack.publishing.list_images()[0]
    assert kept.layers == info.layers
    assert [layer["layer"] for layer in kept.layers][1:4] == ["Office", "Chrome", "Notepad++"]


def test_list_images_is_newest_first(publishing: PublishingService, stack: Services, clock: Clock) -> None:
    stack.templates.create_template("Lean", TemplateSpec(os="Win11:1.0", apps=("Chrome:120",)))
    record(publishing, publishing.plan("Finance"))
    clock.advance(hours=1, minutes=25)
    record(publishing, publishing.plan("Lean"))
    clock.advance(days=1)
    record(publishing, publishing.plan("Finance"))

    assert image_names(stack) == [
        "Finance_2024-05-18_10-30",
        "Lean_2024-05-17_10-30",
        "Finance_2024-05-17_09-05",
    ]
    assert image_names(stack, "Finance") == ["Finance_2024-05-18_10-30", "Finance_2024-05-17_09-05"]
    assert image_names(stack, "Lean") == ["Lean_2024-05-17_10-30"]
    assert image_names(stack, "Sales") == []


def test_list_images_orders_by_publish_time_not_by_recording_order(
    publishing: PublishingService, stack: Services, clock: Clock
) -> None:
    stack.templates.create_template("Lean", TemplateSpec(os="Win11:1.0"))
    record(publishing, publishing.plan("Finance"))
    clock.advance(hours=-2)  # e.g. the clock was corrected between two publishes
    record(publishing, publishing.plan("Lean"))

    assert image_names(stack) == ["Finance_2024-05-17_09-05", "Lean_2024-05-17_07-05"]


def test_recording_the_same_image_name_twice_is_refused(publishing: PublishingService, stack: Services) -> None:
    plan = publishing.plan("Finance")
    record(publishing, plan)

    assert_refused(
        stack,
        lambda: record(publishing, plan, checksum="sha256:other"),
        Conflict,
        "'Finance_2024-05-17_09-05' was already published this minute",
    )
    assert stack.publishing.list_images()[0].checksum == "sha256:image"


def test_same_minute_after_a_rename_back_is_refused_ignoring_case(
    publishing: PublishingService, stack: Services
) -> None:
    record(publishing, publishing.plan("Finance"))
    stack.templates.rename_template("Finance", "FINANCE")

    assert_refused(stack, lambda: record(publishing, publishing.plan("FINANCE")), Conflict, "already published")


def test_a_minute_later_the_template_publishes_again(
    publishing: PublishingService, stack: Services, clock: Clock
) -> None:
    record(publishing, publishing.plan("Finance"))
    clock.advance(minutes=1)
    record(publishing, publishing.plan("Finance"))
    assert image_names(stack) == ["Finance_2024-05-17_09-06", "Finance_2024-05-17_09-05"]


def test_negative_image_size_is_refused(publishing: PublishingService, stack: Services) -> None:
    plan = publishing.plan("Finance")
    assert_refused(stack, lambda: record(publishing, plan, size_bytes=-1), ValidationError, "cannot be negative")


def test_recording_for_a_deleted_template_is_refused(publishing: PublishingService, stack: Services) -> None:
    plan = publishing.plan("Finance")
    stack.templates.delete_template("Finance")
    assert_refused(stack, lambda: record(publishing, plan), NotFound, "'Finance'")


def test_recording_with_an_unknown_task_is_refused(publishing: PublishingService, stack: Services) -> None:
    plan = publishing.plan("Finance")
    assert_refused(stack, lambda: record(publishing, plan, task_id=4242), NotFound, "no task 4242")


def test_recording_needs_the_publish_role(
    services_for: ServicesFactory, publishing: PublishingService, stack: Services
) -> None:
    plan = publishing.plan("Finance")
    reader = services_for(Role.READ_ONLY)
    with pytest.raises(PermissionDenied):
        reader.publishing.record_image(plan, size_bytes=1, checksum="sha256:x", location="/tmp/x")
    assert image_names(stack) == []
    assert stack.audit.list_entries(limit=1)[0].outcome is AuditOutcome.DENIED


# --- deleting records -----------------------------------------------------------------------------


def test_delete_image_record(publishing: PublishingService, stack: Services, clock: Clock) -> None:
    record(publishing, publishing.plan("Finance"))
    clock.advance(minutes=1)
    record(publishing, publishing.plan("Finance"))

    publishing.delete_image_record("finance_2024-05-17_09-05", comment="superseded")

    assert image_names(stack) == ["Finance_2024-05-17_09-06"]
    entry = stack.audit.list_entries(limit=1)[0]
    assert (entry.operation, entry.object_name, entry.outcome, entry.comment) == (
        "image.delete",
        "finance_2024-05-17_09-05",
        AuditOutcome.SUCCESS,
        "superseded",
    )
    assert entry.change == {"location": "/srv/images/Finance_2024-05-17_09-05.vhdx", "checksum": "sha256:image"}


def test_deleted_record_frees_its_name(publishing: PublishingService, stack: Services) -> None:
    plan = publishing.plan("Finance")
    record(publishing, plan)
    publishing.delete_image_record(plan.image_name)

    info = record(publishing, plan, checksum="sha256:rebuilt")

    assert stack.publishing.list_images() == [info]


def test_deleting_an_unknown_record_is_not_found(publishing: PublishingService, stack: Services) -> None:
    record(publishing, publishing.plan("Finance"))
    assert_refused(
        stack,
        lambda: publishing.delete_image_record("Finance_1999-01-01_00-00"),
        NotFound,
        "no published image named 'Finance_1999-01-01_00-00'",
    )


# --- records outlive their template ---------------------------------------------------------------


def test_records_survive_template_deletion(publishing: PublishingService, stack: Services, clock: Clock) -> None:
    first = record(publishing, publishing.plan("Finance"))
    clock.advance(minutes=30)
    second = record(publishing, publishing.plan("Finance"))
    assert stored_template_id(stack, first.name) == stack.templates.get_template("Finance").id

    stack.templates.delete_template("Finance")

    assert stack.publishing.list_images("Finance") == [second, first]
    assert stack.publishing.list_images() == [second, first]
    assert stored_template_id(stack, first.name) is None
    assert stored_template_id(stack, second.name) is None


def test_a_new_template_with_the_old_name_lists_old_and_new_images(
    publishing: PublishingService, stack: Services, clock: Clock
) -> None:
    old = record(publishing, publishing.plan("Finance"))
    stack.templates.delete_template("Finance")
    stack.templates.create_template("Finance", TemplateSpec(os="Win11:1.0"))
    clock.advance(minutes=1)

    new = record(publishing, publishing.plan("Finance"))

    assert image_names(stack, "Finance") == [new.name, old.name]
    assert stored_template_id(stack, old.name) is None
    assert stored_template_id(stack, new.name) == stack.templates.get_template("Finance").id
    assert (old.template_revision, new.template_revision) == (1, 1)
    assert len(new.layers) == 1


def test_deleting_a_template_keeps_its_layers_deletable(publishing: PublishingService, stack: Services) -> None:
    record(publishing, publishing.plan("Finance"))
    stack.templates.delete_template("Finance")

    stack.layers.delete_layer("Notepad++")

    assert [layer["layer"] for layer in stack.publishing.list_images()[0].layers] == [
        "Win11",
        "Office",
        "Chrome",
        "Notepad++",
        "Citrix-VDA",
    ]


def test_list_images_by_template_name_ignores_case(publishing: PublishingService, stack: Services) -> None:
    # Template names ignore case everywhere else (lookup, uniqueness); the image list must agree,
    # also once the template is gone.
    info = record(publishing, publishing.plan("Finance"))

    assert stack.publishing.list_images("finance") == [info]
    stack.templates.delete_template("Finance")
    assert stack.publishing.list_images("FINANCE") == [info]
