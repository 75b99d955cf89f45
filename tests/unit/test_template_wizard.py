"""The image template wizard's flow without Qt: what each step offers, its checks, next/back, the order,
the spec it builds, and saving (create and edit) through the real services."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from app.catalog.models import DiskFormat, ElasticMode, LayerType, SysprepMode, VersionState
from app.console.template_wizard import (
    STEPS,
    PriorityOrder,
    Step,
    TemplateWizardFlow,
    VersionChoice,
    WizardCatalog,
    clone_name_problem,
    load_catalog,
)
from app.errors import ValidationError
from app.services import Services
from app.services.templates import TemplateSpec

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _v(layer: str, version: str, kind: LayerType, os_layer: str | None, layer_id: int,
       state: VersionState = VersionState.DEPLOYABLE) -> VersionChoice:
    return VersionChoice(layer, version, kind, os_layer, state, layer_id, T0 + timedelta(days=layer_id))


CATALOG = WizardCatalog(
    versions=(
        _v("Win11", "1.0", LayerType.OS, None, 1),
        _v("Win11", "2.0", LayerType.OS, None, 1, VersionState.EDITING),
        _v("Win11", "0.9", LayerType.OS, None, 1, VersionState.BROKEN),
        _v("Win10", "1.0", LayerType.OS, None, 2),
        _v("Citrix-VDA", "1.0", LayerType.PLATFORM, "Win11", 3),
        _v("Office", "2024", LayerType.APP, "Win11", 4),
        _v("Office", "2025", LayerType.APP, "Win11", 4),
        _v("Chrome", "120", LayerType.APP, "Win11", 5),
        _v("Notepad++", "8.6", LayerType.APP, "Win11", 6),
        _v("Paint", "1.0", LayerType.APP, "Win10", 7),
    ),
    connectors=("vsphere-lab",),
    template_names=("Finance",),
)


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, ...]] = []

    def moving(self, source: int, destination: int) -> None:
        self.events.append(("moving", str(source), str(destination)))

    def moved(self, source: int, destination: int) -> None:
        self.events.append(("moved", str(source), str(destination)))

    def resetting(self) -> None:
        self.events.append(("resetting",))

    def reset(self) -> None:
        self.events.append(("reset",))


def test_priority_order_moves_and_tells_its_observers() -> None:
    order = PriorityOrder(["A:1", "B:1", "C:1"])
    seen = Recorder()
    order.subscribe(seen)
    assert order.move(0, 2) is True
    assert order.refs() == ("B:1", "C:1", "A:1")
    assert order.raise_priority(2) is False, "the top one cannot rise"
    assert order.lower_priority(0) is False, "the bottom one cannot sink"
    assert order.raise_priority(0) is True and order.layers() == ("C", "B", "A")
    assert order.move(1, 1) is False
    with pytest.raises(ValueError, match="cannot move"):
        order.move(0, 3)
    order.replace(["X:1"])
    assert seen.events == [("moving", "0", "2"), ("moved", "0", "2"), ("moving", "0", "1"), ("moved", "0", "1"),
                           ("resetting",), ("reset",)]
    order.unsubscribe(seen)
    order.replace([])
    assert len(seen.events) == 6


def _filled() -> TemplateWizardFlow:
    flow = TemplateWizardFlow(CATALOG)
    flow.name = "Sales"
    flow.set_os("Win11:1.0")
    flow.set_platform("Citrix-VDA:1.0")
    flow.set_app("Chrome", "120")
    flow.set_app("Office", "2024")
    return flow


def test_steps_offer_only_what_fits_the_chosen_os_layer() -> None:
    flow = TemplateWizardFlow(CATALOG)
    assert [c.ref for c in flow.os_choices()] == ["Win11:1.0", "Win11:2.0", "Win10:1.0"], "broken is not offered"
    assert flow.platform_choices() == [] and flow.app_choices() == {}
    flow.set_os("Win11:1.0")
    assert [c.ref for c in flow.platform_choices()] == ["Citrix-VDA:1.0"]
    apps = flow.app_choices()
    assert list(apps) == ["Chrome", "Notepad++", "Office"]
    assert [c.version for c in apps["Office"]] == ["2024", "2025"]


def test_each_step_says_what_to_fix() -> None:
    flow = TemplateWizardFlow(CATALOG)
    assert flow.current is Step.IDENTITY
    verdict = flow.check()
    assert not verdict.valid and "template name is empty" in verdict.error
    with pytest.raises(ValidationError, match="empty"):
        flow.next()
    assert flow.current is Step.IDENTITY
    flow.name = "finance"
    assert "already exists" in flow.check().error
    flow.name = "Bad|Name"
    assert "'|'" in flow.check().error
    flow.name = "Sales"
    flow.icon = "sales?.ico"
    assert not flow.check().valid
    flow.icon = "sales.ico"
    assert flow.next() is Step.OS
    assert "Choose the OS layer version" in flow.check().error
    flow.set_os("Win11:2.0")
    verdict = flow.check()
    assert verdict.valid and "Win11:2.0 (editing)" in verdict.warning
    flow.set_os("Win11:1.0")
    assert flow.next() is Step.PLATFORM
    assert flow.check().valid, "no platform layer is allowed"
    flow.set_platform("Win10:1.0")
    assert "not a platform layer version bound to OS layer Win11" in flow.check().error
    flow.set_platform("Citrix-VDA:1.0")
    assert flow.next() is Step.APPS
    flow.set_app("Paint", "1.0")  # bound to Win10: not offered, refused if forced
    assert "Paint:1.0" in flow.check().error
    flow.set_app("Paint", None)
    flow.set_app("Office", "2025")
    assert flow.next() is Step.PRIORITY
    assert flow.next() is Step.CONNECTOR
    flow.connector = "nope"
    assert "no connector configuration named 'nope'" in flow.check().error
    flow.connector = "vsphere-lab"
    assert flow.next() is Step.DISK
    flow.size_gb = 0
    assert "1 to 65536" in flow.check().error
    flow.size_gb = 64
    assert flow.next() is Step.SUMMARY
    assert flow.check().valid
    flow.comment = "bad\x01comment"
    assert "control characters" in flow.check().error
    with pytest.raises(ValidationError, match="last step"):
        flow.comment = ""
        flow.next()


def test_back_keeps_what_was_entered() -> None:
    flow = _filled()
    flow.current = Step.DISK
    flow.size_gb = 80
    assert flow.back() is Step.CONNECTOR
    assert flow.back() is Step.PRIORITY
    assert (flow.name, flow.os, flow.platform, flow.size_gb) == ("Sales", "Win11:1.0", "Citrix-VDA:1.0", 80)
    flow.current = Step.IDENTITY
    assert flow.back() is Step.IDENTITY and flow.previous_step() is None
    assert flow.next_step(Step.SUMMARY) is None and len(STEPS) == 8


def test_summary_names_the_first_step_to_fix() -> None:
    flow = _filled()
    flow.name = ""
    verdict = flow.check(Step.SUMMARY)
    assert not verdict.valid and verdict.error.startswith("Name and description: ")
    with pytest.raises(ValidationError, match="Name and description"):
        flow.spec()


def test_order_keeps_layers_and_puts_added_ones_on_top_newest_highest() -> None:
    flow = TemplateWizardFlow(CATALOG)
    flow.set_os("Win11:1.0")
    flow.set_app("Notepad++", "8.6")
    flow.set_app("Office", "2024")
    flow.set_app("Chrome", "120")
    # Added together: by layer age, the newest layer highest (last).
    assert flow.order.refs() == ("Notepad++:8.6", "Office:2024", "Chrome:120")
    flow.order.move(2, 0)  # the admin puts Chrome lowest
    flow.set_app("Office", "2025")  # another version keeps its place
    assert flow.order.refs() == ("Chrome:120", "Notepad++:8.6", "Office:2025")
    flow.set_app("Notepad++", None)
    assert flow.order.refs() == ("Chrome:120", "Office:2025")
    flow.set_app("Notepad++", "8.6")  # re-added: on top
    assert flow.order.refs() == ("Chrome:120", "Office:2025", "Notepad++:8.6")


def test_changing_the_os_layer_drops_what_was_bound_to_the_old_one() -> None:
    flow = _filled()
    flow.set_os("Win11:2.0")  # another version of the same OS layer keeps everything
    assert flow.platform == "Citrix-VDA:1.0" and len(flow.order) == 2 and flow.notice == ""
    flow.set_os("Win10:1.0")
    assert flow.platform is None and flow.apps == {} and flow.order.refs() == ()
    assert "Citrix-VDA:1.0" in flow.notice and "Chrome:120" in flow.notice


def test_spec_has_every_field_and_the_order_shown() -> None:
    flow = _filled()
    flow.order.move(1, 0)
    flow.description = "  sales desks  "
    flow.connector = "vsphere-lab"
    flow.disk_format, flow.size_gb = DiskFormat.QCOW2, 40
    flow.elastic_mode, flow.sysprep = ElasticMode.USER_LAYER_FULL, SysprepMode.GENERALIZE_OFFLINE
    assert flow.spec() == TemplateSpec(
        os="Win11:1.0", apps=("Office:2024", "Chrome:120"), platform="Citrix-VDA:1.0",
        disk_format=DiskFormat.QCOW2, size_gb=40, elastic_mode=ElasticMode.USER_LAYER_FULL,
        sysprep=SysprepMode.GENERALIZE_OFFLINE, connector="vsphere-lab", description="sales desks", icon=None,
    )
    rows = dict(flow.summary())
    assert rows["App layers (top wins)"] == "Chrome:120, Office:2024"
    assert rows["Disk"] == "QCOW2, 40 GB" and rows["Elastic layering"].endswith("full user layer")
    assert flow.stack() == ("Win11:1.0", ("Office:2024", "Chrome:120"), "Citrix-VDA:1.0")


def test_load_catalog_reads_versions_connectors_and_names(lab: Services) -> None:
    lab.templates.create_template("Finance", TemplateSpec(os="Win11:1.0"))
    catalog = load_catalog(lab)
    refs = {c.ref: c for c in catalog.versions}
    assert set(refs) == {"Win11:1.0", "Win11:2.0", "Win10:1.0", "Citrix-VDA:1.0", "Office:2024", "Chrome:120",
                         "Notepad++:8.6", "Paint:1.0"}
    assert refs["Win11:2.0"].state is VersionState.EDITING and refs["Paint:1.0"].os_layer == "Win10"
    assert catalog.template_names == ("Finance",) and catalog.connectors == ()


def test_save_creates_with_the_order_shown_in_one_revision(lab: Services) -> None:
    flow = TemplateWizardFlow(load_catalog(lab))
    flow.name = "Sales"
    flow.set_os("Win11:1.0")
    flow.set_platform("Citrix-VDA:1.0")
    for layer, version in (("Office", "2024"), ("Chrome", "120"), ("Notepad++", "8.6")):
        flow.set_app(layer, version)
    assert flow.order.layers() == ("Office", "Chrome", "Notepad++"), "default: the newest layer highest"
    flow.order.move(2, 0)
    flow.comment = "sales desks"
    saved = flow.save(lab.templates)
    assert saved.app_layers == ("Notepad++:8.6", "Office:2024", "Chrome:120") and saved.revision == 1
    history = lab.templates.history("Sales")
    assert [(r.revision, r.comment) for r in history] == [(1, "sales desks")]


def test_editing_reopens_prefilled_and_saves_content_and_order_together(lab: Services) -> None:
    lab.templates.create_template("Sales", TemplateSpec(os="Win11:1.0", apps=("Office:2024", "Chrome:120")))
    template = lab.templates.get_template("Sales")
    flow = TemplateWizardFlow(load_catalog(lab), template)
    assert flow.editing and flow.title == "Edit image template Sales"
    assert (flow.name, flow.os, flow.order.refs()) == ("Sales", "Win11:1.0", ("Office:2024", "Chrome:120"))
    assert flow.check(Step.IDENTITY).valid, "its own name is not a duplicate"
    flow.set_app("Notepad++", "8.6")
    flow.order.move(2, 0)
    flow.size_gb = 60
    saved = flow.save(lab.templates)
    assert saved.app_layers == ("Notepad++:8.6", "Office:2024", "Chrome:120") and saved.size_gb == 60
    assert saved.revision == 2


def test_a_failed_save_keeps_everything_entered(lab: Services) -> None:
    lab.templates.create_template("Sales", TemplateSpec(os="Win11:1.0"))
    flow = TemplateWizardFlow(load_catalog(lab), lab.templates.get_template("Sales"))
    flow.comment = "no change"
    with pytest.raises(ValidationError, match="Nothing to save"):
        flow.save(lab.templates)
    assert (flow.name, flow.os, flow.comment) == ("Sales", "Win11:1.0", "no change")
    other = TemplateWizardFlow(load_catalog(lab))
    other.name = "Late"
    other.set_os("Win11:1.0")
    lab.templates.create_template("late", TemplateSpec(os="Win11:1.0"))  # taken meanwhile
    with pytest.raises(Exception, match="already exists"):
        other.save(lab.templates)
    assert other.name == "Late" and other.os == "Win11:1.0"


def test_clone_names_are_checked() -> None:
    assert clone_name_problem("Sales", ["Finance"]) == ""
    assert "already exists" in clone_name_problem("FINANCE", ["Finance"])
    assert "empty" in clone_name_problem("", [])
