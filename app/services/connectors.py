"""Connector configurations: how to reach a hypervisor or provisioning system.

Passwords go to the OS keyring under the connector's id, never into the catalog. The connector
types themselves (their fields, test and delivery) are modules of :mod:`app.connectors`; a type without
one yet can be configured but not tested or published to.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app import connectors as connector_types
from app.catalog.models import ConnectorConfig, ImageTemplate
from app.connectors.base import ConfigField, ConnectorSettings, DeliveryResult, ImageSidecar, TestReport
from app.errors import Conflict, NotFound, ValidationError
from app.services.base import Service
from app.services.rbac import Operation
from app.services.validation import validate_name
from app.services.views import ConnectorInfo, PublishedImageInfo, PublishPlan

if TYPE_CHECKING:
    from app.tasks.base import TaskContext

#: The connector types LayerDesk knows, with a one-line description each.
CONNECTOR_TYPES: dict[str, str] = {
    "folder": "Local folder or SMB share (offline labs)",
    "libvirt": "libvirt / QEMU",
    "vsphere": "VMware vSphere",
    "mcs-vsphere": "Machine Creation Services on vSphere",
    "hyperv": "Microsoft Hyper-V",
    "xenserver": "Citrix Hypervisor / XenServer",
    "nutanix": "Nutanix AHV",
    "azure": "Microsoft Azure",
    "pvs": "Citrix Provisioning (agent)",
}


def _secret_name(connector_id: int) -> str:
    return f"connector/{connector_id}"


def _endpoint(value: str) -> str:
    text = (value or "").strip()
    if any(ch.isspace() for ch in text) or any(ord(ch) < 32 for ch in text):
        raise ValidationError(f"The endpoint {value!r} contains white space or control characters.")
    if len(text) > 1024:
        raise ValidationError("The endpoint is longer than 1024 characters.")
    return text


class ConnectorService(Service):
    def list_connectors(self) -> list[ConnectorInfo]:
        with self._read() as session:
            rows = session.scalars(select(ConnectorConfig).order_by(ConnectorConfig.name))
            return [self._info(session, row) for row in rows]

    def get_connector(self, name: str) -> ConnectorInfo:
        with self._read() as session:
            return self._info(session, self._row(session, name))

    def add_connector(
        self,
        name: str,
        type: str,
        *,
        endpoint: str = "",
        username: str = "",
        password: str | None = None,
        verify_tls: bool = True,
        options: dict[str, Any] | None = None,
        post_publish_script: str = "",
        comment: str = "",
    ) -> ConnectorInfo:
        with self._change(Operation.EDIT_CONNECTORS, "connector.add", "connector", name, comment) as change:
            name = validate_name(name, "connector name")
            if type not in CONNECTOR_TYPES:
                raise ValidationError(f"Unknown connector type {type!r}; known types: {', '.join(CONNECTOR_TYPES)}.")
            session = change.session
            if session.scalars(select(ConnectorConfig).where(ConnectorConfig.name == name)).first():
                raise Conflict(f"A connector configuration named {name!r} already exists.")
            endpoint = _endpoint(endpoint)
            kept = check_settings(type, endpoint, username, options or {}, complete=False)
            row = ConnectorConfig(
                name=name, type=type, endpoint=endpoint, username=username.strip(),
                verify_tls=verify_tls, options=kept, post_publish_script=post_publish_script,
                created_at=self._now(), created_by=self.caller.username,
            )
            session.add(row)
            session.flush()
            if password:
                # Inside the transaction: if the keyring refuses, the connector is not created either;
                # if the commit fails, the secret is taken back out.
                secret = _secret_name(row.id)
                self._ctx.secrets.set(secret, password)
                change.on_rollback(lambda: self._ctx.secrets.delete(secret))
                row.has_password = True
            change.details = {"type": type, "endpoint": row.endpoint, "verify_tls": verify_tls}
            if not verify_tls:
                change.details["warning"] = "TLS certificate verification is off"
            return self._info(session, row)

    def update_connector(
        self,
        name: str,
        *,
        endpoint: str | None = None,
        username: str | None = None,
        password: str | None = None,
        verify_tls: bool | None = None,
        options: dict[str, Any] | None = None,
        post_publish_script: str | None = None,
        comment: str = "",
    ) -> ConnectorInfo:
        with self._change(Operation.EDIT_CONNECTORS, "connector.update", "connector", name, comment) as change:
            session = change.session
            row = self._row(session, name)
            details: dict[str, Any] = {}
            if endpoint is not None or username is not None or options is not None:
                checked = check_settings(row.type, _endpoint(endpoint) if endpoint is not None else row.endpoint,
                                         username if username is not None else row.username,
                                         options if options is not None else row.options, complete=False)
                options = checked if options is not None else None
            for field, value in (
                ("endpoint", None if endpoint is None else _endpoint(endpoint)),
                ("username", None if username is None else username.strip()),
                ("verify_tls", verify_tls),
                ("options", options),
                ("post_publish_script", post_publish_script),
            ):
                if value is not None and getattr(row, field) != value:
                    details[field] = [getattr(row, field), value]
                    setattr(row, field, value)
            if password is not None:
                self._ctx.secrets.set(_secret_name(row.id), password)
                row.has_password = True
                details["password"] = "changed"  # noqa: S105 - that it changed, never the value
            if not details:
                raise ValidationError(f"Nothing to change in connector {row.name!r}.")
            change.details = details
            return self._info(session, row)

    def remove_connector(self, name: str, *, comment: str = "") -> None:
        with self._change(Operation.EDIT_CONNECTORS, "connector.remove", "connector", name, comment) as change:
            session = change.session
            row = self._row(session, name)
            users = self._used_by(session, row)
            if users:
                raise Conflict(f"Connector {row.name!r} is used by image template(s) {', '.join(users)}; not removed.")
            change.details = {"type": row.type}
            connector_id = row.id
            had_password = row.has_password
            session.delete(row)
            if had_password:
                # Only once the removal is committed: a failed removal keeps a working connector.
                change.after_commit(lambda: self._ctx.secrets.delete(_secret_name(connector_id)))

    def password(self, name: str) -> str | None:
        """The connector's password from the keyring (for the connector code, never for display)."""
        self.caller.require(Operation.PUBLISH_IMAGES)
        with self._read() as session:
            row = self._row(session, name)
            return self._ctx.secrets.get(_secret_name(row.id))

    def settings(self, name: str) -> ConnectorSettings:
        """The configuration as its connector type uses it."""
        info = self.get_connector(name)
        return ConnectorSettings(info.name, info.type, info.endpoint, info.username, info.verify_tls,
                                 dict(info.options))

    def test_connector(self, name: str) -> TestReport:
        """Test a saved connector step by step with its keyring password (nothing is changed at the
        destination). Open to whoever may publish through it."""
        settings = self.settings(name)
        password = self.password(name)
        connector = connector_types.connector_for(settings.type)
        check_settings(settings.type, settings.endpoint, settings.username, settings.options)
        return connector.test(settings, password)

    def test_settings(
        self, type: str, *, endpoint: str = "", username: str = "", password: str | None = None,
        verify_tls: bool = True, options: Mapping[str, Any] | None = None, name: str = "(new connector)",
        saved_password_of: str | None = None,
    ) -> TestReport:
        """Test a configuration before it is saved (the console's form). ``saved_password_of`` names a saved
        connector whose keyring password is used when ``password`` is not given (editing without retyping)."""
        self.caller.require(Operation.EDIT_CONNECTORS)
        kept = check_settings(type, _endpoint(endpoint), username, options or {})
        if password is None and saved_password_of:
            password = self.password(saved_password_of)
        settings = ConnectorSettings(name, type, _endpoint(endpoint), username.strip(), verify_tls, kept)
        return connector_types.connector_for(type).test(settings, password)

    def delivery(self, name: str) -> ConnectorDelivery:
        """What a publish needs to hand its image to connector ``name`` (checked now, before compositing)."""
        settings = self.settings(name)
        connector_types.connector_for(settings.type)
        check_settings(settings.type, settings.endpoint, settings.username, settings.options)
        return ConnectorDelivery(self, settings, self.password(name))

    def record_delivery(self, image: str, result: DeliveryResult, *, comment: str = "") -> None:
        """Audit that the published image ``image`` was delivered (where to, the destination's ids)."""
        with self._change(Operation.PUBLISH_IMAGES, "image.deliver", "published image", image, comment) as change:
            self._row(change.session, result.connector)
            change.details = {"connector": result.connector, "type": result.type, "location": result.location,
                              "ids": dict(result.ids), "size_bytes": result.size_bytes}

    # --- helpers -------------------------------------------------------------------------------

    @staticmethod
    def _row(session: Session, name: str) -> ConnectorConfig:
        row = session.scalars(select(ConnectorConfig).where(ConnectorConfig.name == name)).one_or_none()
        if row is None:
            raise NotFound(f"There is no connector configuration named {name!r}.")
        return row

    @staticmethod
    def _used_by(session: Session, row: ConnectorConfig) -> list[str]:
        return list(
            session.scalars(
                select(ImageTemplate.name).where(ImageTemplate.connector_id == row.id).order_by(ImageTemplate.name)
            )
        )

    @classmethod
    def _info(cls, session: Session, row: ConnectorConfig) -> ConnectorInfo:
        return ConnectorInfo(
            id=row.id, name=row.name, type=row.type, endpoint=row.endpoint, username=row.username,
            verify_tls=row.verify_tls, options=dict(row.options), post_publish_script=row.post_publish_script,
            has_credentials=row.has_password,
            used_by=tuple(cls._used_by(session, row)),
        )


def connector_fields(connector_type: str) -> tuple[ConfigField, ...]:
    """The declared fields of a type (empty for a type that has no implementation yet)."""
    if not connector_types.implemented(connector_type):
        return ()
    return connector_types.connector_for(connector_type).fields


def check_settings(connector_type: str, endpoint: str, username: str, options: Mapping[str, Any], *,
                   complete: bool = True) -> dict[str, Any]:
    """``options`` as they are kept, checked against the type's declared fields (types without an
    implementation keep them as given). With ``complete``, every required field must be set too
    (a configuration may be saved incomplete, but not tested or published to)."""
    if not connector_types.implemented(connector_type):
        return dict(options)
    return connector_types.connector_for(connector_type).validate(endpoint, username, options, complete=complete)


@dataclass
class ConnectorDelivery:
    """Hands a just-published image to a connector inside the publish task, then audits where it went."""

    service: ConnectorService
    settings: ConnectorSettings
    #: Kept in memory for the task only; never written anywhere.
    password: str | None

    @property
    def name(self) -> str:
        return self.settings.name

    def deliver(self, ctx: TaskContext, image: Path, plan: PublishPlan, info: PublishedImageInfo,
                *, comment: str = "") -> DeliveryResult:
        """Deliver ``image`` (recorded as ``info``) reporting progress and honouring ``ctx.cancel``."""
        connector = connector_types.connector_for(self.settings.type)
        sidecar = ImageSidecar(
            image=info.name, template=plan.template, template_revision=plan.template_revision,
            format=image.suffix.lstrip(".").lower(), size_bytes=info.size_bytes, checksum=info.checksum,
            layers=tuple(dict(layer) for layer in info.layers), created_at=info.created_at, created_by=info.created_by,
        )
        ctx.log(f"Delivering {image.name} to connector {self.name} ({connector.title}).")
        started = time.monotonic()
        result = connector.deliver(image, sidecar, self.settings, self.password,
                                   lambda percent, message: ctx.progress(percent, message), ctx.cancel)
        ctx.log(f"Delivered to {result.location} in {time.monotonic() - started:.1f} s.")
        self.service.record_delivery(info.name, result, comment=comment)
        return result
