"""Connector configurations: how to reach a hypervisor or provisioning system.

Passwords go to the OS keyring under the connector's id, never into the catalog. The connector
types themselves (what each one does when publishing) are added by their own modules.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.catalog.models import ConnectorConfig, ImageTemplate
from app.errors import Conflict, NotFound, ValidationError
from app.services.base import Service
from app.services.rbac import Operation
from app.services.validation import validate_name
from app.services.views import ConnectorInfo

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
            row = ConnectorConfig(
                name=name, type=type, endpoint=_endpoint(endpoint), username=username.strip(),
                verify_tls=verify_tls, options=dict(options or {}), post_publish_script=post_publish_script,
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
