"""What every connector is: its declared configuration fields, a step-by-step test, and a delivery.

A connector type hands a published image to a hypervisor or provisioning system. Its module declares
the fields of its configuration (:class:`ConfigField`: the console renders its form from them and
``layerctl connector add`` checks ``--option`` against them), tests a configuration step by step
(:meth:`Connector.test`) and delivers an image (:meth:`Connector.deliver`), leaving nothing half-made
at the destination when the delivery fails or is cancelled. Types that can also hand a delivered disk
back (:attr:`Connector.can_retrieve`) implement :meth:`Connector.retrieve`: a packaging machine's disk is
delivered like an image and, once the machine is shut down, fetched again to be finalized.

The common settings live in the catalog row's own columns (``endpoint``, ``username``, ``verify_tls``;
the password in the OS keyring); every other field is kept in the row's ``options``.
"""

from __future__ import annotations

import abc
import enum
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

from app.errors import UserError, ValidationError
from app.procs import Cancellable

#: ``progress(percent 0–100 of the delivery, or of fetching a disk back, message)``.
DeliveryProgress = Callable[[float, str], None]

#: Fields kept in the catalog row's own columns rather than in ``options``.
COMMON_FIELDS = frozenset({"endpoint", "username", "password", "verify_tls"})


class FieldKind(enum.StrEnum):
    TEXT = "text"
    PATH = "path"
    CHOICE = "choice"
    FLAG = "flag"
    NUMBER = "number"


@dataclass(frozen=True)
class ConfigField:
    """One setting of a connector type, enough to render and check a form field."""

    key: str
    label: str
    kind: FieldKind = FieldKind.TEXT
    required: bool = False
    #: A secret is masked in forms and kept only in the OS keyring.
    secret: bool = False
    help: str = ""
    default: str | int | bool | None = None
    choices: tuple[str, ...] = ()
    minimum: int | None = None
    maximum: int | None = None

    @property
    def is_option(self) -> bool:
        """Whether the value is kept in the configuration's ``options`` (not in a column of its own)."""
        return self.key not in COMMON_FIELDS

    def check(self, value: Any) -> str | int | bool | None:
        """``value`` as this field keeps it (text, number or flag; ``None`` when empty and optional).

        :class:`ValidationError` naming the field and what to write instead when it does not fit."""
        if value is None or (isinstance(value, str) and not value.strip()):
            if self.required:
                raise ValidationError(f"{self.label} is required: {self.help or 'give a value'}", field=self.key)
            return None
        if self.kind is FieldKind.FLAG:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValidationError(f"{self.label}: write yes or no, not {value!r}.", field=self.key)
        if self.kind is FieldKind.NUMBER:
            try:
                number = int(str(value).strip())
            except ValueError:
                raise ValidationError(f"{self.label}: {value!r} is not a whole number.", field=self.key) from None
            if self.minimum is not None and number < self.minimum:
                raise ValidationError(f"{self.label} must be at least {self.minimum}.", field=self.key)
            if self.maximum is not None and number > self.maximum:
                raise ValidationError(f"{self.label} must be at most {self.maximum}.", field=self.key)
            return number
        text = str(value).strip()
        if any(ord(ch) < 32 for ch in text):
            raise ValidationError(f"{self.label} contains control characters.", field=self.key)
        if self.kind is FieldKind.CHOICE and text not in self.choices:
            raise ValidationError(f"{self.label}: {text!r} is not one of {', '.join(self.choices)}.", field=self.key)
        return text


@dataclass(frozen=True)
class ConnectorSettings:
    """A connector configuration as a connector needs it (the password is passed on its own)."""

    name: str
    type: str
    endpoint: str = ""
    username: str = ""
    verify_tls: bool = True
    options: Mapping[str, Any] = field(default_factory=dict)

    def option(self, key: str, default: Any = None) -> Any:
        value = self.options.get(key)
        return default if value is None or value == "" else value


@dataclass(frozen=True)
class TestStep:
    """One step of a connector test (``ok`` is ``None`` when it did not run because an earlier one failed)."""

    __test__: ClassVar[bool] = False  # not a pytest test class

    name: str
    ok: bool | None
    detail: str
    elapsed_ms: int = 0


@dataclass(frozen=True)
class TestReport:
    """Every step of a connector test, in order."""

    __test__: ClassVar[bool] = False

    connector: str
    steps: tuple[TestStep, ...]

    @property
    def ok(self) -> bool:
        return bool(self.steps) and all(s.ok is not False for s in self.steps)

    @property
    def failure(self) -> str | None:
        failed = [s for s in self.steps if s.ok is False]
        return failed[0].detail if failed else None


class TestSteps:
    """Collects a test's steps: ``steps.run("connect", action)`` calls ``action`` (which returns the step's
    detail) and records the step as passed, or as failed with the :class:`app.errors.LayerDeskError`'s
    message; once one failed, later steps are not run and recorded as such."""

    __test__: ClassVar[bool] = False

    def __init__(self, connector: str) -> None:
        self.connector = connector
        self._steps: list[TestStep] = []

    @property
    def failed(self) -> bool:
        return any(s.ok is False for s in self._steps)

    def skip(self, name: str, why: str = "not run: an earlier step failed") -> None:
        self._steps.append(TestStep(name, None, why))

    def run(self, name: str, action: Callable[[], str]) -> bool:
        """Run one step; whether it passed (``False`` also when it was not run)."""
        from app.errors import LayerDeskError

        if self.failed:
            self.skip(name)
            return False
        started = time.monotonic()
        try:
            detail = action()
        except LayerDeskError as exc:
            self._steps.append(TestStep(name, False, str(exc), int((time.monotonic() - started) * 1000)))
            return False
        self._steps.append(TestStep(name, True, detail, int((time.monotonic() - started) * 1000)))
        return True

    def report(self) -> TestReport:
        return TestReport(self.connector, tuple(self._steps))


@dataclass(frozen=True)
class ImageSidecar:
    """What is known of a published image, delivered beside it (the folder connector writes it as JSON)."""

    image: str
    template: str
    template_revision: int
    format: str
    size_bytes: int
    checksum: str | None
    #: Bottom (OS) to top (platform): ``role``, ``layer``, ``version``, ``priority``, ``checksum`` each.
    layers: tuple[Mapping[str, Any], ...]
    created_at: datetime
    created_by: str

    def to_json(self) -> dict[str, Any]:
        return {
            "image": self.image, "template": self.template, "template_revision": self.template_revision,
            "format": self.format, "size_bytes": self.size_bytes, "checksum": self.checksum,
            "layers": [{k: layer.get(k) for k in ("role", "layer", "version", "priority", "size_bytes", "checksum")}
                       for layer in self.layers],
            "created_at": self.created_at.isoformat(), "created_by": self.created_by,
        }


@dataclass(frozen=True)
class DeliveryResult:
    """Where a delivered image went: a place a person can find it and the destination's own ids."""

    connector: str
    type: str
    location: str
    #: e.g. ``{"volume": "…", "domain_uuid": "…"}`` or ``{"image": "…", "sidecar": "…"}``.
    ids: Mapping[str, str] = field(default_factory=dict)
    size_bytes: int = 0
    seconds: float = 0.0


class Connector(abc.ABC):
    """One connector type. Subclasses declare :attr:`type`, :attr:`title` and :attr:`fields`."""

    type: ClassVar[str]
    title: ClassVar[str]
    fields: ClassVar[tuple[ConfigField, ...]]
    #: Whether :meth:`retrieve` can fetch a delivered disk back.
    can_retrieve: ClassVar[bool] = False

    def field(self, key: str) -> ConfigField:
        for candidate in self.fields:
            if candidate.key == key:
                return candidate
        raise KeyError(key)

    def validate(self, endpoint: str, username: str, options: Mapping[str, Any], *,
                 complete: bool = True) -> dict[str, Any]:
        """The options as they are kept (checked against :attr:`fields`; empty ones left out); the
        endpoint and user name checked too. :class:`ValidationError` for an unknown or bad value, and,
        with ``complete``, for a required field left empty."""
        known = {f.key for f in self.fields if f.is_option}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValidationError(
                f"A {self.title} connector has no setting {', '.join(map(repr, unknown))}; its settings are "
                f"{', '.join(sorted(known)) or 'none'}.", field="options")
        declared = {f.key for f in self.fields}
        if "endpoint" in declared and (complete or endpoint.strip()):
            self.field("endpoint").check(endpoint)
            self.check_endpoint(endpoint.strip())
        if "username" in declared:
            self.field("username").check(username)
        kept: dict[str, Any] = {}
        for item in self.fields:
            if item.is_option and not item.secret:
                value = options.get(item.key)
                if not complete and (value is None or value == ""):
                    continue
                value = item.check(value)
                if value is not None:
                    kept[item.key] = value
        return kept

    def check_endpoint(self, endpoint: str) -> None:  # noqa: B027 - most types accept any endpoint text
        """Refuse an endpoint this type cannot use (:class:`ValidationError`)."""

    @abc.abstractmethod
    def test(self, settings: ConnectorSettings, password: str | None) -> TestReport:
        """Try the configuration step by step without changing anything at the destination."""

    @abc.abstractmethod
    def deliver(self, image: Path, sidecar: ImageSidecar, settings: ConnectorSettings, password: str | None,
                progress: DeliveryProgress, cancel: Cancellable) -> DeliveryResult:
        """Hand ``image`` to the destination. Raises :class:`app.tasks.base.TaskCanceled` when ``cancel`` is
        set and a :class:`app.errors.UserError`/:class:`app.errors.EnvironmentProblem` with a clear message
        otherwise; either way nothing it started to create is left at the destination."""

    def retrieve(self, ids: Mapping[str, str], settings: ConnectorSettings, password: str | None, target: Path,
                 progress: DeliveryProgress, cancel: Cancellable) -> Path:
        """Fetch the disk that a delivery of this connector made (``ids``: its :attr:`DeliveryResult.ids`) into
        the new file ``target`` and return ``target``, in the disk's own format (the same as delivered); a type
        whose disk is already a file on this machine may return that file's path instead (the caller only reads
        it). Used to
        finalize a packaging machine: the disk is read as it is now, after the machine changed it. Raises
        :class:`app.errors.NotFound` when the disk is gone, :class:`app.tasks.base.TaskCanceled` when ``cancel``
        is set, and clear :class:`app.errors.UserError`/:class:`app.errors.EnvironmentProblem` otherwise. A
        ``target`` that exists already is refused (:class:`app.errors.Conflict`) and left alone; after any other
        failure ``target`` does not exist. Nothing at the destination is ever changed. ``progress`` reports the
        percent of the copy done."""
        raise UserError(f"A {self.title} connector cannot hand a disk back; copy the packaging machine's disk to "
                        "this computer and finalize from that file.")
