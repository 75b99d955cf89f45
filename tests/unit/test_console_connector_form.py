"""The connector form's logic without Qt: editors per declared field, what the form starts with (never a
password), the service's arguments from what was typed, where a refusal is shown, a test's wording."""

from __future__ import annotations

import pytest

from app.connectors.base import TestReport, TestStep
from app.console.connector_form import (
    GENERIC_FIELDS,
    ConnectorValues,
    EditorKind,
    FormValue,
    connector_rows,
    editor_kind,
    error_field,
    field_hint,
    form_fields,
    form_values,
    initial_values,
    report_summary,
    secret_placeholder,
    step_detail,
    step_outcome,
    type_choices,
)
from app.errors import Conflict, ValidationError
from app.services import Services
from app.services.connectors import CONNECTOR_TYPES, check_settings
from app.services.views import ConnectorInfo


def stored(**changes: object) -> ConnectorInfo:
    base = {"id": 1, "name": "KVM", "type": "libvirt", "endpoint": "qemu+ssh://root@kvm1/system",
            "username": "", "verify_tls": False, "options": {"pool": "images", "memory_mb": 8192},
            "post_publish_script": "", "has_credentials": True, "used_by": ()}
    base.update(changes)
    return ConnectorInfo(**base)  # type: ignore[arg-type]


def test_each_declared_field_gets_its_editor_and_a_secret_is_always_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    kinds = {f.key: editor_kind(f) for f in form_fields("libvirt")}
    assert kinds == {"endpoint": EditorKind.LINE, "username": EditorKind.LINE, "password": EditorKind.SECRET,
                     "verify_tls": EditorKind.FLAG, "pool": EditorKind.LINE, "network": EditorKind.LINE,
                     "disk_bus": EditorKind.CHOICE, "nic_model": EditorKind.CHOICE, "memory_mb": EditorKind.NUMBER,
                     "vcpus": EditorKind.NUMBER, "start": EditorKind.FLAG}
    assert editor_kind(form_fields("folder")[0]) is EditorKind.PATH
    # A type without an implementation (as a catalog from a later LayerDesk may name) still gets a form:
    # the settings every connector has.
    monkeypatch.setitem(CONNECTOR_TYPES, "future-cloud", "Future cloud")
    assert form_fields("future-cloud") == GENERIC_FIELDS
    assert [t for t, _text in type_choices()][:2] == ["folder", "libvirt"]
    assert dict(type_choices())["future-cloud"] == "Future cloud (cannot test or publish yet)"


def test_the_form_starts_with_the_stored_values_or_the_defaults_and_never_a_password() -> None:
    fields = form_fields("libvirt")
    assert initial_values(fields, None) == {
        "endpoint": "qemu:///system", "username": "", "password": "", "verify_tls": True, "pool": "",
        "network": "", "disk_bus": "virtio", "nic_model": "e1000e", "memory_mb": 4096, "vcpus": 2, "start": False}
    editing = initial_values(fields, stored())
    assert editing["endpoint"] == "qemu+ssh://root@kvm1/system"
    assert (editing["verify_tls"], editing["pool"], editing["memory_mb"], editing["vcpus"]) == (False, "images",
                                                                                                  8192, 2)
    assert editing["password"] == ""
    password = fields[2]
    assert secret_placeholder(password, stored()) == "kept in the OS keyring; leave empty to keep it"
    assert secret_placeholder(password, None) == "none"
    assert field_hint(fields[-3]) == "default 4096"
    assert field_hint(fields[0]).startswith("qemu:///system, ") and field_hint(fields[0]).endswith(
        "; default qemu:///system")
    assert field_hint(fields[4]) == "the pool the image is uploaded into"


def test_what_was_typed_becomes_the_services_arguments() -> None:
    fields = form_fields("libvirt")
    typed: dict[str, FormValue] = {
        "endpoint": " qemu:///system ", "username": "", "password": "", "verify_tls": True, "pool": "images",
        "network": "", "disk_bus": "sata", "nic_model": "e1000e", "memory_mb": 2048, "vcpus": 2, "start": True}
    values = form_values(fields, typed)
    assert values == ConnectorValues("qemu:///system", "", None, True, {
        "pool": "images", "disk_bus": "sata", "nic_model": "e1000e", "memory_mb": 2048, "vcpus": 2, "start": True})
    assert check_settings("libvirt", values.endpoint, values.username, values.options)["memory_mb"] == 2048
    assert form_values(fields, {**typed, "password": "pw"}).password == "pw"
    # A type without an implementation keeps its stored options as they are.
    generic = form_values(GENERIC_FIELDS, {"endpoint": "vc1.lab.test", "password": "", "verify_tls": False},
                          keep_options={"datacenter": "DC1"})
    assert generic.service_arguments() == {"endpoint": "vc1.lab.test", "username": "", "password": None,
                                           "verify_tls": False, "options": {"datacenter": "DC1"}}


def test_a_refusal_is_shown_under_the_field_it_names_else_in_the_dialog() -> None:
    fields = form_fields("folder")
    with pytest.raises(ValidationError) as refused:
        check_settings("folder", "", "", {})
    assert error_field(refused.value, fields) == "endpoint"
    assert error_field(ValidationError("The connector name is empty.", field="connector name"), fields) == \
        "connector name"
    assert error_field(ValidationError("no such setting", field="options"), fields) is None
    assert error_field(Conflict("already exists"), fields) is None


def test_a_tests_steps_read_ok_failed_or_not_tried() -> None:
    steps = (TestStep("folder", True, "/srv/images exists", 3), TestStep("write", False, "Cannot write.", 1500),
             TestStep("space", None, "not run: an earlier step failed"))
    assert [step_outcome(s).value for s in steps] == ["ok", "failed", "not tried"]
    assert [step_detail(s) for s in steps] == ["/srv/images exists", "Cannot write. (1.5 s)",
                                               "not run: an earlier step failed"]
    assert report_summary(TestReport("Lab", steps)) == "The step “write” failed: Cannot write."
    assert report_summary(TestReport("Lab", steps[:1])) == "The step passed; nothing was changed at the destination."


def test_the_list_says_whether_a_type_verifies_tls(admin: Services) -> None:
    admin.connectors.add_connector("Share", "folder", endpoint="/srv/images")
    admin.connectors.add_connector("KVM", "libvirt", endpoint="qemu+tls://kvm1/system", verify_tls=False,
                                   options={"pool": "images"})
    admin.connectors.add_connector("VC", "vsphere", endpoint="vc1.lab.test")
    assert {r.info.name: r.tls for r in connector_rows(admin)} == {"KVM": "NO", "Share": "not used", "VC": "yes"}
