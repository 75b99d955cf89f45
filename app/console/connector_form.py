"""The connector form's logic, without Qt: which editor each declared field gets, what the form starts with
(a stored connector's values or the type's defaults; never a password), the service call's arguments made
from what was typed, and the wording of a test's steps and of the connector list.

The console's connector form and Connectors page only render these.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from app.connectors.base import ConfigField, FieldKind, TestReport, TestStep
from app.errors import LayerDeskError
from app.services.connectors import CONNECTOR_TYPES, connector_fields
from app.services.views import ConnectorInfo

if TYPE_CHECKING:
    from app.services import Services

#: The fields of a type that has no implementation yet: its configuration can be kept, not tested.
GENERIC_FIELDS: tuple[ConfigField, ...] = (
    ConfigField("endpoint", "Endpoint", help="the host name or URL of the hypervisor or provisioning system"),
    ConfigField("username", "User name", help="the account LayerDesk signs in with"),
    ConfigField("password", "Password", secret=True, help="the account's password"),
    ConfigField("verify_tls", "Verify TLS certificates", FieldKind.FLAG, default=True,
                help="leave on unless the server's certificate cannot be checked"),
)

#: The form's own name field, for a refusal of the name (the service names it so in its errors).
NAME_FIELD = "connector name"

FormValue = str | int | bool


class EditorKind(enum.StrEnum):
    """The editor a field gets in the form."""

    LINE = "line"  # one line of text
    PATH = "path"  # a line with Browse… for a local folder
    SECRET = "secret"  # noqa: S105 - a masked line, never filled in
    NUMBER = "number"  # a spin box bounded by the field's minimum and maximum
    FLAG = "flag"  # a check box
    CHOICE = "choice"  # a drop-down of the field's choices


def editor_kind(item: ConfigField) -> EditorKind:
    """The editor for ``item``: a secret is always masked, whatever its kind."""
    if item.secret:
        return EditorKind.SECRET
    return {
        FieldKind.TEXT: EditorKind.LINE,
        FieldKind.PATH: EditorKind.PATH,
        FieldKind.NUMBER: EditorKind.NUMBER,
        FieldKind.FLAG: EditorKind.FLAG,
        FieldKind.CHOICE: EditorKind.CHOICE,
    }[item.kind]


def type_choices() -> list[tuple[str, str]]:
    """(type, what the combo shows) for every known type, those that can be tested first."""
    from app import connectors

    ready = [t for t in CONNECTOR_TYPES if connectors.implemented(t)]
    later = [t for t in CONNECTOR_TYPES if not connectors.implemented(t)]
    return ([(t, CONNECTOR_TYPES[t]) for t in ready]
            + [(t, f"{CONNECTOR_TYPES[t]} (cannot test or publish yet)") for t in later])


def form_fields(connector_type: str) -> tuple[ConfigField, ...]:
    """(In a worker thread: a type's module is imported on first use.) The fields the form shows for
    ``connector_type``: its declared ones, or :data:`GENERIC_FIELDS` for a type without an implementation.
    :class:`app.errors.EnvironmentProblem` naming what to install when the type's library is missing."""
    return connector_fields(connector_type) or GENERIC_FIELDS


def testable(connector_type: str) -> bool:
    """Whether a configuration of this type can be tested (its type has an implementation)."""
    from app import connectors

    return connectors.implemented(connector_type)


def initial_values(fields: tuple[ConfigField, ...], info: ConnectorInfo | None) -> dict[str, FormValue]:
    """What each editor starts with: the stored value when editing ``info``, else the field's default.
    A secret always starts empty: the stored one stays in the keyring unless a new one is typed."""
    values: dict[str, FormValue] = {}
    for item in fields:
        stored: Any = None
        if item.secret:
            values[item.key] = ""
            continue
        if info is not None:
            stored = {"endpoint": info.endpoint or None, "username": info.username or None,
                      "verify_tls": info.verify_tls}.get(item.key, info.options.get(item.key))
        if stored is None:
            stored = item.default
        if item.kind is FieldKind.FLAG:
            values[item.key] = bool(stored)
        elif item.kind is FieldKind.NUMBER and isinstance(stored, int | str) and str(stored).strip().isdigit():
            values[item.key] = int(stored)
        else:
            values[item.key] = "" if stored is None else str(stored)
    return values


def secret_placeholder(item: ConfigField, info: ConnectorInfo | None) -> str:
    """The hint in an empty secret box: whether leaving it empty keeps a stored secret."""
    if info is not None and info.has_credentials:
        return "kept in the OS keyring; leave empty to keep it"
    return "none" if not item.required else ""


def field_hint(item: ConfigField) -> str:
    """The line under an editor: the field's help as its type declares it (a phrase that may start with a
    value, such as ``qemu:///system``, so it is not recapitalised), and its default when it has one."""
    text = item.help
    if item.default not in (None, "") and item.kind is not FieldKind.FLAG:
        text = f"{text}; default {item.default}" if text else f"default {item.default}"
    return text


@dataclass(frozen=True)
class ConnectorValues:
    """What the form holds, as the connector service takes it."""

    endpoint: str = ""
    username: str = ""
    #: ``None`` when the box was left empty: no password (adding) or the stored one kept (editing).
    password: str | None = None
    verify_tls: bool = True
    options: dict[str, Any] = field(default_factory=dict)

    def service_arguments(self) -> dict[str, Any]:
        """Keyword arguments for ``add_connector``, ``update_connector`` and ``test_settings``."""
        return {"endpoint": self.endpoint, "username": self.username, "password": self.password,
                "verify_tls": self.verify_tls, "options": dict(self.options)}


def form_values(fields: tuple[ConfigField, ...], values: Mapping[str, FormValue],
                keep_options: Mapping[str, Any] | None = None) -> ConnectorValues:
    """The typed ``values`` (by field key) as the service takes them. Text is passed as typed (the service
    checks it and says what is wrong); an empty option is left out, so it is not kept. ``keep_options``
    are stored options the form does not show (a type without an implementation), passed on unchanged."""
    options: dict[str, Any] = dict(keep_options or {})
    endpoint = username = ""
    password: str | None = None
    verify_tls = True
    for item in fields:
        value = values.get(item.key)
        if item.key == "endpoint":
            endpoint = str(value or "").strip()
        elif item.key == "username":
            username = str(value or "").strip()
        elif item.key == "password":
            password = str(value) if value else None
        elif item.key == "verify_tls":
            verify_tls = bool(value)
        elif item.is_option and not item.secret and value is not None and value != "":
            options[item.key] = value
    return ConnectorValues(endpoint, username, password, verify_tls, options)


def error_field(error: LayerDeskError, fields: tuple[ConfigField, ...]) -> str | None:
    """The key of the field a refusal is about (shown under it), or ``None`` (shown in the dialog)."""
    key = getattr(error, "field", None)
    if key == NAME_FIELD or key in {f.key for f in fields}:
        return str(key)
    return None


# --- a test's steps ---------------------------------------------------------------------------------------


class StepOutcome(enum.StrEnum):
    OK = "ok"
    FAILED = "failed"
    NOT_TRIED = "not tried"


def step_outcome(step: TestStep) -> StepOutcome:
    return {True: StepOutcome.OK, False: StepOutcome.FAILED, None: StepOutcome.NOT_TRIED}[step.ok]


def step_detail(step: TestStep) -> str:
    """The step's detail, with how long it took when it ran."""
    if step.ok is None:
        return step.detail
    took = f" ({step.elapsed_ms / 1000:.1f} s)" if step.elapsed_ms >= 100 else ""
    return f"{step.detail}{took}"


def report_summary(report: TestReport) -> str:
    """One line: every step passed, or which step failed and why."""
    if report.ok:
        passed = "The step passed" if len(report.steps) == 1 else f"All {len(report.steps)} steps passed"
        return f"{passed}; nothing was changed at the destination."
    failed = next((s for s in report.steps if s.ok is False), None)
    if failed is None:
        return "The test ran no step."
    return f"The step “{failed.name}” failed: {failed.detail}"


# --- the connector list -----------------------------------------------------------------------------------


def type_text(info: ConnectorInfo) -> str:
    return CONNECTOR_TYPES.get(info.type, info.type)


def user_text(info: ConnectorInfo) -> str:
    """The user name, and whether a password is kept for it."""
    if info.username:
        return f"{info.username} (password in keyring)" if info.has_credentials else info.username
    return "(password in keyring)" if info.has_credentials else ""


def tls_text(info: ConnectorInfo, fields: tuple[ConfigField, ...]) -> str:
    """``yes`` / ``NO`` for a type that speaks TLS (declares ``verify_tls``), else ``not used``."""
    if not any(f.key == "verify_tls" for f in fields):
        return "not used"
    return "yes" if info.verify_tls else "NO"


@dataclass(frozen=True)
class ConnectorRow:
    """One line of the Connectors page."""

    info: ConnectorInfo
    tls: str


def connector_rows(services: Services) -> list[ConnectorRow]:
    """(In a worker thread.) The connectors, each with whether its type verifies TLS certificates."""
    infos = services.connectors.list_connectors()
    fields_of: dict[str, tuple[ConfigField, ...]] = {}
    for connector_type in {i.type for i in infos}:
        try:
            fields_of[connector_type] = form_fields(connector_type)
        except LayerDeskError:
            # Its library is missing: the list still shows the stored setting; the form says what to install.
            fields_of[connector_type] = GENERIC_FIELDS
    return [ConnectorRow(i, tls_text(i, fields_of[i.type])) for i in infos]
