"""The RBAC matrix: each of App Layering's eight roles against every mutating service call.

The allowed roles per call are written out below as a literal table, reviewed against what the App
Layering roles mean (Administrator does everything; each "Manage …" role changes its own area; Publish
Layered Images publishes; Read Only only looks; system areas — storage, connectors, directory,
settings, audit retention, accounts, other people's tasks — are Administrator only). The table is
deliberately *not* computed from :mod:`app.services.rbac`, so a wrong entry there makes a test fail.

Every case starts from a fresh catalog: the objects the call needs are made as Administrator, then
the call is made by a caller holding only the role under test.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select

from app.catalog.database import Catalog
from app.catalog.models import (
    AuditEntry,
    AuditOutcome,
    LayerType,
    PrincipalKind,
    Role,
    Task,
    TaskState,
    VersionState,
    utcnow,
)
from app.connectors.base import DeliveryResult
from app.errors import PermissionDenied
from app.services import Services
from app.services.directory import JunctionSpec
from app.services.packaging import packaging_service
from app.services.templates import TemplateSpec
from app.tasks.base import LayerDeskTask, TaskCanceled, TaskContext, TaskResult
from app.tasks.runner import TaskRunner
from tests.conftest import ServicesFactory, make_deployable
from tests.support.catalog_checks import snapshot
from tests.support.keyring_memory import MemoryKeyring

ALL_ROLES = tuple(Role)
A = Role.ADMINISTRATOR

# --- the expected permissions: a literal table ------------------------------------------------------

OS_LAYER_ROLES = frozenset({A, Role.MANAGE_OS_LAYERS})
PLATFORM_LAYER_ROLES = frozenset({A, Role.MANAGE_PLATFORM_LAYERS})
APP_LAYER_ROLES = frozenset({A, Role.MANAGE_APP_LAYERS})
TEMPLATE_ROLES = frozenset({A, Role.MANAGE_IMAGE_TEMPLATES})
PUBLISH_ROLES = frozenset({A, Role.PUBLISH_LAYERED_IMAGES})
ELASTIC_ROLES = frozenset({A, Role.MANAGE_ELASTIC_ASSIGNMENTS})
ADMIN_ONLY = frozenset({A})
#: Anyone who may change something may cancel a task they started themselves; Read Only may not.
OWN_TASK_ROLES = frozenset(
    {
        A,
        Role.MANAGE_APP_LAYERS,
        Role.MANAGE_ELASTIC_ASSIGNMENTS,
        Role.MANAGE_IMAGE_TEMPLATES,
        Role.MANAGE_OS_LAYERS,
        Role.MANAGE_PLATFORM_LAYERS,
        Role.PUBLISH_LAYERED_IMAGES,
    }
)

LAYER_ROLES = {LayerType.OS: OS_LAYER_ROLES, LayerType.PLATFORM: PLATFORM_LAYER_ROLES, LayerType.APP: APP_LAYER_ROLES}
LAYER_WORDING = {
    LayerType.OS: "create, change or delete OS layers",
    LayerType.PLATFORM: "create, change or delete platform layers",
    LayerType.APP: "create, change or delete app layers",
}

GROUP_SID = "S-1-5-21-1004336348-1177238915-682003330-1201"
USER_SID = "S-1-5-21-1004336348-1177238915-682003330-1105"
CONNECTOR_PASSWORD = "connector-pass-9f3a"
BIND_PASSWORD = "bind-pass-77c1"
PASSWORD = "correct horse battery"


@dataclass
class Setup:
    """What a case's set-up step gets: the Administrator's services and the caller-to-be's name."""

    admin: Services
    caller_name: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Call:
    id: str
    allowed: frozenset[Role]
    #: What the refusal says the caller may not do.
    wording: str
    #: The audit entry's operation.
    operation: str
    run: Callable[[Services, Setup], Any]
    setup: Callable[[Setup], None] = lambda s: None
    #: The catalog table an allowed call must change (``None``: the call may leave the catalog as is).
    changes: str | None = None
    #: Extra checks of an allowed call's effect, made as Administrator.
    verify: Callable[[Setup], None] | None = None
    #: When a role is refused by another check first, the wording and roles that refusal names.
    refused_as: dict[Role, tuple[str, frozenset[Role]]] = field(default_factory=dict)


# --- set-up helpers -------------------------------------------------------------------------------


def _os(admin: Services, name: str = "Win11") -> None:
    admin.layers.create_layer(name, LayerType.OS)
    admin.layers.add_version(name, "1.0")
    make_deployable(admin, f"{name}:1.0")


def _subject_layer(layer_type: LayerType) -> Callable[[Setup], None]:
    """A layer ``Subject`` of ``layer_type`` with one editing version 1.0 (and its OS layer)."""

    def setup(s: Setup) -> None:
        if layer_type is LayerType.OS:
            s.admin.layers.create_layer("Subject", LayerType.OS)
        else:
            _os(s.admin)
            s.admin.layers.create_layer("Subject", layer_type, os_layer="Win11")
            if layer_type is LayerType.APP:
                s.admin.layers.create_layer("Helper", LayerType.APP, os_layer="Win11")
                s.admin.layers.add_version("Helper", "1.0")
                make_deployable(s.admin, "Helper:1.0")
        s.admin.layers.add_version("Subject", "1.0")

    return setup


def _os_only(layer_type: LayerType) -> Callable[[Setup], None]:
    def setup(s: Setup) -> None:
        if layer_type is not LayerType.OS:
            _os(s.admin)

    return setup


def _apps(s: Setup) -> None:
    _os(s.admin)
    for name in ("App1", "App2"):
        s.admin.layers.create_layer(name, LayerType.APP, os_layer="Win11")
        s.admin.layers.add_version(name, "1.0")
        make_deployable(s.admin, f"{name}:1.0")


GOLD = TemplateSpec(os="Win11:1.0", apps=("App1:1.0", "App2:1.0"))


def _template(s: Setup) -> None:
    _apps(s)
    s.admin.templates.create_template("Gold", GOLD)


def _planned(s: Setup) -> None:
    _template(s)
    s.data["plan"] = s.admin.publishing.plan("Gold")


def _published(s: Setup) -> None:
    _planned(s)
    s.admin.publishing.record_image(
        s.data["plan"], size_bytes=10, checksum="sha256:aa", location=r"\\fs1\images\gold.vhdx"
    )


def _assigned(s: Setup) -> None:
    _apps(s)
    s.admin.assignments.assign("App1:1.0", PrincipalKind.AD_GROUP, GROUP_SID, r"LAB\Finance")


def _associated(s: Setup) -> None:
    s.data["association"] = s.admin.assignments.add_machine_association(GROUP_SID, r"LAB\Finance", "VDA-FIN-*").id


def _locations(s: Setup) -> None:
    s.admin.storage.add_location("Main", r"\\fs1\users")
    s.admin.storage.add_location("Spare", r"\\fs2\users")


def _connector(s: Setup) -> None:
    s.admin.connectors.add_connector("Lab", "folder", endpoint=r"\\fs1\images", password=CONNECTOR_PASSWORD)


def _break_glass(s: Setup) -> None:
    s.admin.access.create_account("breakglass", PASSWORD, [Role.ADMINISTRATOR])


SPEC = JunctionSpec(server="dc1.lab.test", base_dn="DC=lab,DC=test", bind_account=r"LAB\svc-layerdesk")


def _junction(s: Setup) -> None:
    _break_glass(s)
    s.admin.directory.add_junction("Corp", SPEC, password=BIND_PASSWORD)


def _task(started_by: Callable[[Setup], str]) -> Callable[[Setup], None]:
    def setup(s: Setup) -> None:
        with s.admin.catalog.write() as session:
            row = Task(
                kind="test.wait", title="Waiting", state=TaskState.RUNNING, started_by=started_by(s),
                created_at=utcnow(), started_at=utcnow(),
            )
            session.add(row)
            session.flush()
            s.data["task"] = row.id

    return setup


def _ended_task(s: Setup) -> None:
    long_ago = utcnow() - timedelta(days=90)
    with s.admin.catalog.write() as session:
        row = Task(
            kind="test.done", title="Done long ago", state=TaskState.COMPLETE, started_by="admin",
            created_at=long_ago, started_at=long_ago, ended_at=long_ago,
        )
        session.add(row)
        session.flush()
        s.data["task"] = row.id


def _old_audit_entry(s: Setup) -> None:
    with s.admin.catalog.write() as session:
        row = AuditEntry(
            at=utcnow() - timedelta(days=800), user="admin", operation="layer.create", object_type="layer",
            object_name="Ancient", change={}, comment="", outcome=AuditOutcome.SUCCESS,
        )
        session.add(row)


def _account(s: Setup) -> None:
    s.admin.access.create_account("subject", PASSWORD, [Role.READ_ONLY])


def _task_gone(s: Setup) -> None:
    with s.admin.catalog.read() as session:
        assert session.get(Task, s.data["task"]) is None


def _audit_gone(s: Setup) -> None:
    # (Ids are no help here: SQLite may give the purge's own entry the id of the purged one.)
    assert [e.object_name for e in audit_rows(s.admin.catalog) if e.object_name == "Ancient"] == []


def _task_state(expected: TaskState) -> Callable[[Setup], None]:
    def verify(s: Setup) -> None:
        info = s.admin.tasks.get_task(s.data["task"])
        assert info.state is expected
        assert info.cancel_requested

    return verify


# --- the table ------------------------------------------------------------------------------------


def _layer_calls(t: LayerType) -> list[Call]:
    roles, wording, name = LAYER_ROLES[t], LAYER_WORDING[t], t.value
    prereqs = ["Helper:1.0"] if t is LayerType.APP else []
    return [
        Call(f"layers.create_layer[{name}]", roles, wording, "layer.create",
             lambda sv, s, t=t: sv.layers.create_layer(
                 "NewLayer", t, os_layer=None if t is LayerType.OS else "Win11"),
             _os_only(t), "layer"),
        Call(f"layers.update_layer[{name}]", roles, wording, "layer.update",
             lambda sv, s: sv.layers.update_layer("Subject", description="changed"), _subject_layer(t), "layer"),
        Call(f"layers.delete_layer[{name}]", roles, wording, "layer.delete",
             lambda sv, s: sv.layers.delete_layer("Subject"), _subject_layer(t), "layer"),
        Call(f"layers.add_version[{name}]", roles, wording, "layer.version.add",
             lambda sv, s: sv.layers.add_version("Subject", "2.0"), _subject_layer(t), "layer_version"),
        Call(f"layers.set_prerequisites[{name}]", roles, wording, "layer.version.prerequisites",
             lambda sv, s, p=prereqs: sv.layers.set_prerequisites("Subject:1.0", p), _subject_layer(t),
             "layer_prerequisite" if t is LayerType.APP else None),
        Call(f"layers.set_version_state[{name}]", roles, wording, "layer.version.state",
             lambda sv, s: sv.layers.set_version_state("Subject:1.0", VersionState.FINALIZING), _subject_layer(t),
             "layer_version"),
        Call(f"layers.delete_version[{name}]", roles, wording, "layer.version.delete",
             lambda sv, s: sv.layers.delete_version("Subject:1.0"), _subject_layer(t), "layer_version"),
    ]


def _packaging_layer(layer_type: LayerType, *, packaged: bool = False, delivered: bool = False
                     ) -> Callable[[Setup], None]:
    """A layer ``Subject`` of ``layer_type`` on Win11 (deployable 1.0); ``packaged``: with version 1.0 being edited
    on a packaging machine; ``delivered``: and its packaging disk recorded."""

    def setup(s: Setup) -> None:
        _os(s.admin)
        s.admin.layers.create_layer("Subject", layer_type, os_layer="Win11")
        service = packaging_service(s.admin)
        if packaged or delivered:
            service.add_packaging_version("Subject", "1.0")
        if delivered:
            service.record_packaging_disk("Subject:1.0", path="/disks/Subject_1.0_packaging.vhdx", size_bytes=1,
                                          checksum="sha256:aa", manifest_digest="sha256:bb",
                                          volume_serial="0011223344556677")

    return setup


def _packaging_calls(t: LayerType) -> list[Call]:
    roles, wording, name = LAYER_ROLES[t], LAYER_WORDING[t], t.value
    return [
        Call(f"packaging.add_packaging_version[{name}]", roles, wording, "layer.package",
             lambda sv, s: packaging_service(sv).add_packaging_version("Subject", "1.0"), _packaging_layer(t),
             "layer_version"),
        Call(f"packaging.record_packaging_disk[{name}]", roles, wording, "layer.package.disk",
             lambda sv, s: packaging_service(sv).record_packaging_disk(
                 "Subject:1.0", path="/d.vhdx", size_bytes=1, checksum="sha256:aa", manifest_digest="sha256:bb",
                 volume_serial="00"), _packaging_layer(t, packaged=True), "layer_version"),
        Call(f"packaging.begin_finalize[{name}]", roles, wording, "layer.finalize",
             lambda sv, s: packaging_service(sv).begin_finalize("Subject:1.0", "/d.vhdx"),
             _packaging_layer(t, delivered=True), "layer_version"),
        Call(f"packaging.abandon[{name}]", roles, wording, "layer.abandon",
             lambda sv, s: packaging_service(sv).abandon("Subject:1.0"), _packaging_layer(t, packaged=True),
             "layer_version"),
    ]


TEMPLATE_WORDING = "create, change or delete image templates"
PUBLISH_WORDING = "publish layered images"
ELASTIC_WORDING = "change elastic layer assignments and machine associations"
STORAGE_WORDING = "change user layer storage locations"
CONNECTOR_WORDING = "change connector configurations"
DIRECTORY_WORDING = "change directory junctions"
SETTINGS_WORDING = "change system settings"
ACCESS_WORDING = "change local accounts and role grants"
ALL_TASKS_WORDING = "cancel or purge tasks started by others"
RUN_TASKS_WORDING = "run tasks"

CALLS: list[Call] = [
    *_layer_calls(LayerType.OS),
    *_layer_calls(LayerType.PLATFORM),
    *_layer_calls(LayerType.APP),
    # layer versions made on a packaging machine (app and platform layers)
    *_packaging_calls(LayerType.PLATFORM),
    *_packaging_calls(LayerType.APP),
    # image templates
    Call("templates.create_template", TEMPLATE_ROLES, TEMPLATE_WORDING, "template.create",
         lambda sv, s: sv.templates.create_template("Silver", TemplateSpec(os="Win11:1.0", apps=("App1:1.0",))),
         _apps, "image_template"),
    Call("templates.update_template", TEMPLATE_ROLES, TEMPLATE_WORDING, "template.update",
         lambda sv, s: sv.templates.update_template(
             "Gold", TemplateSpec(os="Win11:1.0", apps=GOLD.apps, description="changed")),
         _template, "template_revision"),
    Call("templates.rename_template", TEMPLATE_ROLES, TEMPLATE_WORDING, "template.rename",
         lambda sv, s: sv.templates.rename_template("Gold", "Platinum"), _template, "image_template"),
    Call("templates.set_priority", TEMPLATE_ROLES, TEMPLATE_WORDING, "template.priority",
         lambda sv, s: sv.templates.set_priority("Gold", ["App2", "App1"]), _template, "template_app_layer"),
    Call("templates.clone_template", TEMPLATE_ROLES, TEMPLATE_WORDING, "template.clone",
         lambda sv, s: sv.templates.clone_template("Gold", "Gold-copy"), _template, "image_template"),
    Call("templates.delete_template", TEMPLATE_ROLES, TEMPLATE_WORDING, "template.delete",
         lambda sv, s: sv.templates.delete_template("Gold"), _template, "image_template"),
    # publishing
    Call("publishing.record_image", PUBLISH_ROLES, PUBLISH_WORDING, "image.publish",
         lambda sv, s: sv.publishing.record_image(
             s.data["plan"], size_bytes=10, checksum="sha256:aa", location=r"\\fs1\images\gold.vhdx"),
         _planned, "published_image"),
    Call("publishing.delete_image_record", PUBLISH_ROLES, PUBLISH_WORDING, "image.delete",
         lambda sv, s: sv.publishing.delete_image_record(s.data["plan"].image_name), _published, "published_image"),
    # elastic assignments and machine associations
    Call("assignments.assign", ELASTIC_ROLES, ELASTIC_WORDING, "elastic.assign",
         lambda sv, s: sv.assignments.assign("App1:1.0", PrincipalKind.AD_USER, USER_SID, r"LAB\alice"),
         _apps, "elastic_assignment"),
    Call("assignments.unassign", ELASTIC_ROLES, ELASTIC_WORDING, "elastic.unassign",
         lambda sv, s: sv.assignments.unassign("App1", GROUP_SID), _assigned, "elastic_assignment"),
    Call("assignments.add_machine_association", ELASTIC_ROLES, ELASTIC_WORDING, "machine_association.add",
         lambda sv, s: sv.assignments.add_machine_association(GROUP_SID, r"LAB\Finance", "VDA-FIN-*"),
         changes="machine_association"),
    Call("assignments.remove_machine_association", ELASTIC_ROLES, ELASTIC_WORDING, "machine_association.remove",
         lambda sv, s: sv.assignments.remove_machine_association(s.data["association"]), _associated,
         "machine_association"),
    # user layer storage
    Call("storage.add_location", ADMIN_ONLY, STORAGE_WORDING, "storage.add",
         lambda sv, s: sv.storage.add_location("Main", r"\\fs1\users", groups=[(GROUP_SID, r"LAB\Finance")]),
         changes="storage_location"),
    Call("storage.update_location", ADMIN_ONLY, STORAGE_WORDING, "storage.update",
         lambda sv, s: sv.storage.update_location("Main", path=r"\\fs3\users"), _locations, "storage_location"),
    Call("storage.reorder", ADMIN_ONLY, STORAGE_WORDING, "storage.reorder",
         lambda sv, s: sv.storage.reorder(["Spare", "Main"]), _locations, "storage_location"),
    Call("storage.remove_location", ADMIN_ONLY, STORAGE_WORDING, "storage.remove",
         lambda sv, s: sv.storage.remove_location("Main"), _locations, "storage_location"),
    # connectors
    Call("connectors.add_connector", ADMIN_ONLY, CONNECTOR_WORDING, "connector.add",
         lambda sv, s: sv.connectors.add_connector(
             "Lab", "folder", endpoint=r"\\fs1\images", password=CONNECTOR_PASSWORD),
         changes="connector_config"),
    Call("connectors.update_connector", ADMIN_ONLY, CONNECTOR_WORDING, "connector.update",
         lambda sv, s: sv.connectors.update_connector("Lab", endpoint=r"\\fs2\images"), _connector,
         "connector_config"),
    Call("connectors.remove_connector", ADMIN_ONLY, CONNECTOR_WORDING, "connector.remove",
         lambda sv, s: sv.connectors.remove_connector("Lab"), _connector, "connector_config"),
    Call("connectors.record_delivery", PUBLISH_ROLES, PUBLISH_WORDING, "image.deliver",
         lambda sv, s: sv.connectors.record_delivery(
             "Gold_2025-03-01_10-15", DeliveryResult("Lab", "folder", r"\\fs1\images\Gold_20250301T101500Z.vhdx")),
         _connector, "audit_entry"),
    # directory junctions
    Call("directory.add_junction", ADMIN_ONLY, DIRECTORY_WORDING, "directory.add",
         lambda sv, s: sv.directory.add_junction("Corp", SPEC, password=BIND_PASSWORD), _break_glass,
         "directory_junction"),
    Call("directory.update_junction", ADMIN_ONLY, DIRECTORY_WORDING, "directory.update",
         lambda sv, s: sv.directory.update_junction(
             "Corp", JunctionSpec(server="dc2.lab.test", base_dn=SPEC.base_dn, bind_account=SPEC.bind_account)),
         _junction, "directory_junction"),
    Call("directory.remove_junction", ADMIN_ONLY, DIRECTORY_WORDING, "directory.remove",
         lambda sv, s: sv.directory.remove_junction("Corp"), _junction, "directory_junction"),
    # tasks
    Call("tasks.cancel[own task]", OWN_TASK_ROLES, RUN_TASKS_WORDING, "task.cancel",
         lambda sv, s: sv.tasks.cancel(s.data["task"]), _task(lambda s: s.caller_name), "task",
         _task_state(TaskState.CANCELING)),
    Call("tasks.cancel[another's task]", ADMIN_ONLY, ALL_TASKS_WORDING, "task.cancel",
         lambda sv, s: sv.tasks.cancel(s.data["task"]), _task(lambda s: "someone-else"), "task",
         _task_state(TaskState.CANCELING),
         # Read Only is refused before the task is even looked at: it may not run (or cancel) any task.
         refused_as={Role.READ_ONLY: (RUN_TASKS_WORDING, OWN_TASK_ROLES)}),
    Call("tasks.purge_expired", ADMIN_ONLY, ALL_TASKS_WORDING, "task.purge",
         lambda sv, s: sv.tasks.purge_expired(), _ended_task, "task", _task_gone),
    # settings and audit retention
    Call("settings.set", ADMIN_ONLY, SETTINGS_WORDING, "settings.set",
         lambda sv, s: sv.settings.set("task_retention_days", 60), changes="setting"),
    Call("audit.purge_expired", ADMIN_ONLY, SETTINGS_WORDING, "audit.purge",
         lambda sv, s: sv.audit.purge_expired(), _old_audit_entry, "audit_entry", _audit_gone),
    # local accounts and role grants
    Call("access.create_account", ADMIN_ONLY, ACCESS_WORDING, "account.create",
         lambda sv, s: sv.access.create_account("newcomer", PASSWORD, [Role.READ_ONLY]), changes="local_account"),
    Call("access.set_password", ADMIN_ONLY, ACCESS_WORDING, "account.password",
         lambda sv, s: sv.access.set_password("subject", "another long password"), _account, "local_account"),
    Call("access.set_disabled", ADMIN_ONLY, ACCESS_WORDING, "account.disable",
         lambda sv, s: sv.access.set_disabled("subject", True), _account, "local_account"),
    Call("access.delete_account", ADMIN_ONLY, ACCESS_WORDING, "account.delete",
         lambda sv, s: sv.access.delete_account("subject"), _account, "local_account"),
    Call("access.grant_role", ADMIN_ONLY, ACCESS_WORDING, "role.grant",
         lambda sv, s: sv.access.grant_role(PrincipalKind.OS_USER, "bob", Role.READ_ONLY), changes="role_grant"),
    Call("access.revoke_role", ADMIN_ONLY, ACCESS_WORDING, "role.revoke",
         lambda sv, s: sv.access.revoke_role(PrincipalKind.LOCAL_USER, "subject", Role.READ_ONLY), _account,
         "role_grant"),
]


# --- catalog snapshots ----------------------------------------------------------------------------




def audit_rows(catalog: Catalog) -> list[AuditEntry]:
    with catalog.read() as session:
        return list(session.scalars(select(AuditEntry).order_by(AuditEntry.id)))


def _key(entry: AuditEntry) -> tuple[Any, ...]:
    return (entry.id, entry.at, entry.user, entry.operation, entry.object_name)


def needed_roles(message: str) -> set[str]:
    match = re.search(r"that needs the (.+) role\.", message)
    assert match, f"the refusal does not say which role is needed: {message!r}"
    return set(match.group(1).split(" or "))


def _case_id(call: Call) -> str:
    return call.id


def caller_name(roles: tuple[Role, ...]) -> str:
    return "caller-" + ("-".join(r.name.lower() for r in roles) or "norole")


#: Changing an existing layer is refused before the layer is looked up when the caller holds no layer
#: role at all, so a caller who may not touch layers learns nothing from NotFound versus refusal.
ANY_LAYER_WORDING = "create, change or delete layers"
ANY_LAYER_ROLES = frozenset({A, Role.MANAGE_OS_LAYERS, Role.MANAGE_PLATFORM_LAYERS, Role.MANAGE_APP_LAYERS})


def refusal(call: Call, roles: tuple[Role, ...]) -> tuple[str, frozenset[Role]]:
    """What a refusal of ``call`` to a caller holding ``roles`` must say: the wording and the roles needed."""
    looks_up_a_layer = call.id.startswith(("layers.", "packaging.")) and not call.id.startswith("layers.create_layer")
    if looks_up_a_layer and not set(roles) & ANY_LAYER_ROLES:
        return ANY_LAYER_WORDING, ANY_LAYER_ROLES
    if not roles and call.id.startswith("tasks.cancel"):
        # A caller without roles fails the "run tasks" check before the task is looked at.
        return RUN_TASKS_WORDING, OWN_TASK_ROLES
    if len(roles) == 1 and roles[0] in call.refused_as:
        return call.refused_as[roles[0]]
    return call.wording, call.allowed


def run_case(
    call: Call, roles: tuple[Role, ...], services_for: ServicesFactory, keyring_store: dict[Any, str]
) -> None:
    admin = services_for(Role.ADMINISTRATOR)
    name = caller_name(roles)
    s = Setup(admin, name)
    call.setup(s)
    caller = services_for(*roles, username=name)
    before = snapshot(admin.catalog)
    audit_before = audit_rows(admin.catalog)
    known = {_key(b) for b in audit_before}
    secrets_before = dict(keyring_store)

    if set(roles) & call.allowed:
        call.run(caller, s)
        after = snapshot(admin.catalog)
        if call.changes is not None:
            assert after[call.changes] != before[call.changes], f"{call.id} succeeded but changed no {call.changes}"
        if call.verify is not None:
            call.verify(s)
        new = [e for e in audit_rows(admin.catalog) if _key(e) not in known]
        assert [(e.user, e.operation, e.outcome) for e in new] == [(name, call.operation, AuditOutcome.SUCCESS)]
        return

    with pytest.raises(PermissionDenied) as refused:
        call.run(caller, s)
    message = str(refused.value)
    wording, needs = refusal(call, roles)
    held = ", ".join(sorted(r.value for r in roles)) or "no role"
    assert message.startswith(f"{name} ({held}) may not {wording}: "), message
    assert needed_roles(message) == {r.value for r in needs}
    # Nothing but the audit log changed, and there only one "denied" entry was added.
    after = snapshot(admin.catalog)
    for table in after:
        if table != "audit_entry":
            assert after[table] == before[table], f"a refused {call.id} changed table {table}"
    assert dict(keyring_store) == secrets_before, f"a refused {call.id} touched the keyring"
    audit_after = audit_rows(admin.catalog)
    assert after["audit_entry"][: len(before["audit_entry"])] == before["audit_entry"]
    new = [e for e in audit_after if _key(e) not in known]
    assert [(e.user, e.operation, e.outcome) for e in new] == [(name, call.operation, AuditOutcome.DENIED)]
    assert new[0].change == {"refused": message}


@pytest.mark.parametrize("role", ALL_ROLES, ids=[r.name for r in ALL_ROLES])
@pytest.mark.parametrize("call", CALLS, ids=_case_id)
def test_role_matrix(
    call: Call, role: Role, services_for: ServicesFactory, memory_keyring: MemoryKeyring
) -> None:
    run_case(call, (role,), services_for, memory_keyring.store)


@pytest.mark.parametrize("call", CALLS, ids=_case_id)
def test_caller_without_any_role_may_change_nothing(
    call: Call, services_for: ServicesFactory, memory_keyring: MemoryKeyring
) -> None:
    run_case(call, (), services_for, memory_keyring.store)


def test_the_table_covers_every_public_mutating_method() -> None:
    """A new mutating method must be added to the table above (and so reviewed for its roles)."""
    import inspect

    from app.services.access import AccessService
    from app.services.assignments import AssignmentService
    from app.services.audit import AuditService
    from app.services.connectors import ConnectorService
    from app.services.directory import DirectoryService
    from app.services.elastic import ElasticService
    from app.services.layers import LayerService
    from app.services.packaging import PackagingService
    from app.services.publishing import PublishingService
    from app.services.settings import SettingsService
    from app.services.storage import StorageService
    from app.services.tasks import TaskService
    from app.services.templates import TemplateService
    from app.services.transfer import TransferService

    reads = {
        "list_layers", "get_layer", "get_version", "list_templates", "get_template", "history", "diff", "plan",
        "list_images", "list_assignments", "list_machine_associations", "list_locations", "list_connectors",
        "get_connector", "password", "list_junctions", "list_tasks", "get_task", "log", "list_settings", "get",
        "list_entries", "list_accounts", "list_grants", "conflicts", "template_usage", "version_contents",
        "preview_conflicts", "resolve", "sync_plan", "user_layer_location", "get_packaging", "editing_version",
        "preview_import", "verify_image",
        # Read, but with a role beyond Read Only (the keyring password, a test against the peer, a sync's
        # pre-flight): see test_connector_checks_that_use_the_password_need_their_roles and tests/elastic.
        "settings", "test_connector", "test_settings", "delivery", "check_sync", "list_user_layers",
    }
    #: Starts a task that needs real layers in the repository: its roles are checked, role by role, in
    #: tests/unit/test_cli_publish.py (test_publishing_needs_the_publish_role_and_refusals_are_audited).
    #: Writes the Elastic Layer repository to an SMB share (the test DC's): its roles are checked in
    #: tests/elastic/test_sync.py (test_sync_needs_the_elastic_role_and_refusals_are_audited).
    #: Start packaging and finalize tasks that need real layers in the repository: their roles are checked, role by
    #: role, in tests/unit/test_packaging_service.py (test_starting_packaging_tasks_needs_a_layer_role_and_is_audited).
    #: Export, sync and import between installations and layer disk export start tasks on real layers: their roles
    #: are checked, role by role, in tests/engine/test_transfer.py
    #: (test_transfer_calls_need_their_roles_and_refusals_are_audited).
    tested_elsewhere = {"publish", "sync", "start_packaging", "start_finalize", "start_export", "start_sync",
                        "start_import", "start_layer_disk_export"}
    services = {
        "layers": LayerService, "templates": TemplateService, "publishing": PublishingService,
        "assignments": AssignmentService, "storage": StorageService, "connectors": ConnectorService,
        "directory": DirectoryService, "tasks": TaskService, "settings": SettingsService, "audit": AuditService,
        "access": AccessService, "elastic": ElasticService, "packaging": PackagingService,
        "transfer": TransferService,
    }
    public = {
        f"{area}.{name}"
        for area, cls in services.items()
        for name, member in inspect.getmembers(cls, inspect.isfunction)
        if not name.startswith("_") and name not in reads | tested_elsewhere
    }
    covered = {c.id.partition("[")[0] for c in CALLS}
    assert public == covered


# --- reading ----------------------------------------------------------------------------------------


def _rich_catalog(admin: Services) -> dict[str, Any]:
    """One of everything, made as Administrator."""
    s = Setup(admin, "admin")
    _planned(s)
    admin.publishing.record_image(s.data["plan"], size_bytes=10, checksum="sha256:aa", location=r"\\fs1\img\g.vhdx")
    admin.assignments.assign("App1:1.0", PrincipalKind.AD_GROUP, GROUP_SID, r"LAB\Finance")
    _associated(s)
    _locations(s)
    _connector(s)
    _junction(s)
    _task(lambda s: "admin")(s)
    admin.settings.set("layer_cache_gb", 20)
    admin.templates.update_template("Gold", TemplateSpec(os="Win11:1.0", apps=GOLD.apps, description="v2"))
    return s.data


READS: list[tuple[str, Callable[[Services, dict[str, Any]], Any]]] = [
    ("layers.list_layers", lambda sv, d: sv.layers.list_layers()),
    ("layers.get_layer", lambda sv, d: sv.layers.get_layer("Win11")),
    ("layers.get_version", lambda sv, d: sv.layers.get_version("App1:1.0")),
    ("templates.list_templates", lambda sv, d: sv.templates.list_templates()),
    ("templates.get_template", lambda sv, d: sv.templates.get_template("Gold")),
    ("templates.history", lambda sv, d: sv.templates.history("Gold")),
    ("templates.diff", lambda sv, d: sv.templates.diff("Gold", 1, 2)),
    ("publishing.list_images", lambda sv, d: sv.publishing.list_images()),
    ("assignments.list_assignments", lambda sv, d: sv.assignments.list_assignments()),
    ("assignments.list_machine_associations", lambda sv, d: sv.assignments.list_machine_associations()),
    ("storage.list_locations", lambda sv, d: sv.storage.list_locations()),
    ("connectors.list_connectors", lambda sv, d: sv.connectors.list_connectors()),
    ("connectors.get_connector", lambda sv, d: sv.connectors.get_connector("Lab")),
    ("directory.list_junctions", lambda sv, d: sv.directory.list_junctions()),
    ("tasks.list_tasks", lambda sv, d: sv.tasks.list_tasks()),
    ("tasks.get_task", lambda sv, d: sv.tasks.get_task(d["task"])),
    ("tasks.log", lambda sv, d: sv.tasks.log(d["task"])),
    ("settings.list_settings", lambda sv, d: sv.settings.list_settings()),
    ("settings.get", lambda sv, d: sv.settings.get("layer_cache_gb")),
    ("audit.list_entries", lambda sv, d: sv.audit.list_entries()),
    ("access.list_accounts", lambda sv, d: sv.access.list_accounts()),
    ("access.list_grants", lambda sv, d: sv.access.list_grants()),
]
#: Not reads of the catalog but the first step of a publish: Publish Layered Images (and Administrator).
PUBLISH_READS: list[tuple[str, Callable[[Services, dict[str, Any]], Any]]] = [
    ("publishing.plan", lambda sv, d: sv.publishing.plan("Gold")),
    ("connectors.password", lambda sv, d: sv.connectors.password("Lab")),
]


def test_a_caller_without_any_role_cannot_even_list_layers(lab: Services, services_for: ServicesFactory) -> None:
    nobody = services_for(username="nobody")
    with pytest.raises(PermissionDenied) as refused:
        nobody.layers.list_layers()
    message = str(refused.value)
    assert message.startswith("nobody (no role) may not read the catalog: ")
    assert needed_roles(message) == {r.value for r in Role}


@pytest.mark.parametrize("read", READS + PUBLISH_READS, ids=[r[0] for r in READS + PUBLISH_READS])
def test_a_caller_without_any_role_cannot_read_anything(
    read: tuple[str, Callable[[Services, dict[str, Any]], Any]], admin: Services, services_for: ServicesFactory
) -> None:
    data = _rich_catalog(admin)
    before = snapshot(admin.catalog)
    with pytest.raises(PermissionDenied, match=r"^nobody \(no role\) may not "):
        read[1](services_for(username="nobody"), data)
    assert snapshot(admin.catalog) == before


@pytest.mark.parametrize("role", ALL_ROLES, ids=[r.name for r in ALL_ROLES])
def test_every_role_reads_exactly_what_the_administrator_reads(
    role: Role, admin: Services, services_for: ServicesFactory
) -> None:
    data = _rich_catalog(admin)
    reader = services_for(role, username=caller_name((role,)))
    for name, read in READS:
        # The reader's own reads are not audited, so both see the same audit log too.
        assert read(reader, data) == read(admin, data), name


def test_read_only_reads_everything_and_changes_nothing(admin: Services, services_for: ServicesFactory) -> None:
    data = _rich_catalog(admin)
    reader = services_for(Role.READ_ONLY, username="auditor")
    seen = {name: read(reader, data) for name, read in READS}
    assert [layer.name for layer in seen["layers.list_layers"]] == ["App1", "App2", "Win11"]
    assert [t.name for t in seen["templates.list_templates"]] == ["Gold"]
    assert len(seen["publishing.list_images"]) == 1
    assert [a.principal_sid for a in seen["assignments.list_assignments"]] == [GROUP_SID]
    assert [loc.name for loc in seen["storage.list_locations"]] == ["Main", "Spare"]
    assert seen["connectors.get_connector"].has_credentials is True
    assert [j.name for j in seen["directory.list_junctions"]] == ["Corp"]
    assert seen["settings.get"] == 20
    assert [a.username for a in seen["access.list_accounts"]] == ["breakglass"]
    assert [c.field for c in seen["templates.diff"]] == ["description"]


@pytest.mark.parametrize("role", ALL_ROLES, ids=[r.name for r in ALL_ROLES])
def test_planning_a_publish_and_reading_connector_passwords_need_the_publish_role(
    role: Role, admin: Services, services_for: ServicesFactory
) -> None:
    data = _rich_catalog(admin)
    caller = services_for(role, username=caller_name((role,)))
    if role in PUBLISH_ROLES:
        assert caller.publishing.plan("Gold").template == "Gold"
        assert caller.connectors.password("Lab") == CONNECTOR_PASSWORD
        return
    for _name, read in PUBLISH_READS:
        with pytest.raises(PermissionDenied) as refused:
            read(caller, data)
        assert f"may not {PUBLISH_WORDING}:" in str(refused.value)
        assert needed_roles(str(refused.value)) == {r.value for r in PUBLISH_ROLES}


def test_the_read_table_covers_every_public_read() -> None:
    names = {n for n, _ in READS + PUBLISH_READS}
    assert names == {
        "layers.list_layers", "layers.get_layer", "layers.get_version", "templates.list_templates",
        "templates.get_template", "templates.history", "templates.diff", "publishing.plan",
        "publishing.list_images", "assignments.list_assignments", "assignments.list_machine_associations",
        "storage.list_locations", "connectors.list_connectors", "connectors.get_connector",
        "connectors.password", "directory.list_junctions", "tasks.list_tasks", "tasks.get_task", "tasks.log",
        "settings.list_settings", "settings.get", "audit.list_entries", "access.list_accounts",
        "access.list_grants",
    }


# --- tasks run by the task runner -------------------------------------------------------------------


class WaitForCancel(LayerDeskTask):
    """Waits until it is cancelled (or 20 s pass, so a broken cancel cannot hang the tests)."""

    kind = "test.wait_for_cancel"

    def __init__(self) -> None:
        super().__init__("Wait for cancel")
        self.started = threading.Event()

    def run(self, ctx: TaskContext) -> TaskResult:
        self.started.set()
        if ctx.cancel.wait(20):
            raise TaskCanceled()
        return TaskResult(summary="never cancelled")


def test_a_layer_manager_cancels_their_own_running_task_but_not_anothers(services_for: ServicesFactory) -> None:
    owner = services_for(Role.MANAGE_APP_LAYERS, username="packager")
    other = services_for(Role.MANAGE_OS_LAYERS, username="os-admin")
    admin = services_for(Role.ADMINISTRATOR)
    runner = TaskRunner(owner.catalog, owner.caller, poll_s=0.05)
    task = WaitForCancel()
    try:
        task_id = runner.submit(task)
        assert task.started.wait(10)
        assert admin.tasks.get_task(task_id).started_by == "packager"
        before = snapshot(admin.catalog)

        with pytest.raises(PermissionDenied) as refused:
            other.tasks.cancel(task_id)
        assert str(refused.value).startswith(f"os-admin ({Role.MANAGE_OS_LAYERS.value}) may not {ALL_TASKS_WORDING}:")
        assert needed_roles(str(refused.value)) == {A.value}
        after = snapshot(admin.catalog)
        assert after["task"] == before["task"]
        assert admin.tasks.get_task(task_id).state is TaskState.RUNNING
        denied = admin.audit.list_entries(user="os-admin")
        assert [(e.operation, e.outcome) for e in denied] == [("task.cancel", AuditOutcome.DENIED)]

        info = owner.tasks.cancel(task_id)
        assert info.state is TaskState.CANCELING
        assert runner.wait(task_id, timeout_s=10) is TaskState.CANCELED
        done = [(e.operation, e.outcome) for e in admin.audit.list_entries(user="packager")]
        assert done == [("task.cancel", AuditOutcome.SUCCESS)]
    finally:
        runner.shutdown(timeout_s=10)


def test_the_administrator_cancels_anyones_running_task(services_for: ServicesFactory) -> None:
    owner = services_for(Role.PUBLISH_LAYERED_IMAGES, username="publisher")
    admin = services_for(Role.ADMINISTRATOR)
    runner = TaskRunner(owner.catalog, owner.caller, poll_s=0.05)
    task = WaitForCancel()
    try:
        task_id = runner.submit(task)
        assert task.started.wait(10)
        assert admin.tasks.cancel(task_id).state is TaskState.CANCELING
        assert runner.wait(task_id, timeout_s=10) is TaskState.CANCELED
    finally:
        runner.shutdown(timeout_s=10)


def test_read_only_cannot_start_a_task(services_for: ServicesFactory) -> None:
    reader = services_for(Role.READ_ONLY, username="auditor")
    runner = TaskRunner(reader.catalog, reader.caller)
    try:
        with pytest.raises(PermissionDenied, match=r"^auditor \(Read Only\) may not run tasks: "):
            runner.submit(WaitForCancel())
        assert reader.tasks.list_tasks() == []
    finally:
        runner.shutdown()


@pytest.mark.parametrize("role", [Role.READ_ONLY, Role.MANAGE_IMAGE_TEMPLATES, Role.PUBLISH_LAYERED_IMAGES])
def test_a_caller_without_layer_roles_learns_nothing_about_which_layers_exist(
    services_for: ServicesFactory, role: Role
) -> None:
    admin = services_for(Role.ADMINISTRATOR)
    admin.layers.create_layer("Win11", LayerType.OS)
    caller = services_for(role)
    refusals = []
    for name in ("Win11", "NoSuchLayer"):
        with pytest.raises(PermissionDenied) as refused:
            caller.layers.delete_layer(name)
        refusals.append(str(refused.value))
    assert refusals[0] == refusals[1]
    assert [layer.name for layer in admin.layers.list_layers()] == ["Win11"]


def test_connector_checks_that_use_the_password_need_their_roles(services_for: ServicesFactory) -> None:
    """Testing a saved connector or preparing a delivery reads its keyring password: publishers may;
    testing an unsaved form is editing connectors: the Administrator's. Read Only may do neither."""
    admin = services_for(Role.ADMINISTRATOR)
    admin.connectors.add_connector("Lab", "folder", endpoint="/nonexistent-folder-for-rbac", password="pw")
    reader = services_for(Role.READ_ONLY, username="reader")
    publisher = services_for(Role.PUBLISH_LAYERED_IMAGES, username="publisher")
    for call in (lambda s: s.connectors.test_connector("Lab"), lambda s: s.connectors.delivery("Lab"),
                 lambda s: s.connectors.test_settings("folder", endpoint="/tmp")):
        with pytest.raises(PermissionDenied):
            call(reader)
    publisher.connectors.test_connector("Lab")  # allowed: the report says the folder is missing
    with pytest.raises(PermissionDenied):
        publisher.connectors.test_settings("folder", endpoint="/tmp")
