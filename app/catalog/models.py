"""The catalog's typed mappings: every object an administrator manages.

Names follow App Layering (``Layer``, ``LayerVersion``, ``ImageTemplate``, ``ElasticAssignment``...).
Only :mod:`app.services` changes these rows; everything else reads through the services.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    DateTime,
    Enum,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    event,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from app.tasks.states import FINAL_TASK_STATES as FINAL_TASK_STATES
from app.tasks.states import TaskState as TaskState

NAME_LENGTH = 64


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timestamps stored as UTC and always read back timezone-aware (SQLite keeps no zone)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the catalog; use timezone-aware UTC")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


class LayerType(enum.StrEnum):
    OS = "os"
    PLATFORM = "platform"
    APP = "app"


class VersionState(enum.StrEnum):
    """A layer version's life: ``editing`` → ``finalizing`` → ``deployable``, or ``broken``."""

    EDITING = "editing"
    FINALIZING = "finalizing"
    DEPLOYABLE = "deployable"
    BROKEN = "broken"


class DiskFormat(enum.StrEnum):
    VHD = "vhd"
    VHDX = "vhdx"
    VMDK = "vmdk"
    QCOW2 = "qcow2"
    RAW = "raw"
    WIM = "wim"


class ElasticMode(enum.StrEnum):
    """The template's elastic layering setting, as App Layering names it."""

    NONE = "none"
    APPLICATION = "application"
    USER_LAYER_FULL = "user_layer_full"
    USER_LAYER_OFFICE365 = "user_layer_office365"
    SESSION_OFFICE365 = "session_office365"


class SysprepMode(enum.StrEnum):
    NOT_GENERALIZED = "not_generalized"
    GENERALIZE_OFFLINE = "generalize_offline"


# TaskState and FINAL_TASK_STATES live with the tasks (a worker process needs them without SQLAlchemy).


class Role(enum.StrEnum):
    """App Layering's eight administrator roles."""

    ADMINISTRATOR = "Administrator"
    MANAGE_APP_LAYERS = "Manage App Layers"
    MANAGE_ELASTIC_ASSIGNMENTS = "Manage Elastic Layer Assignments"
    MANAGE_IMAGE_TEMPLATES = "Manage Image Templates"
    MANAGE_OS_LAYERS = "Manage OS Layers"
    MANAGE_PLATFORM_LAYERS = "Manage Platform Layers"
    PUBLISH_LAYERED_IMAGES = "Publish Layered Images"
    READ_ONLY = "Read Only"


class PrincipalKind(enum.StrEnum):
    """Who a role grant or an elastic assignment names."""

    LOCAL_USER = "local_user"
    OS_USER = "os_user"
    AD_USER = "ad_user"
    AD_GROUP = "ad_group"


class DirectorySecurity(enum.StrEnum):
    LDAPS = "ldaps"
    STARTTLS = "starttls"
    PLAIN = "plain"


class AuditOutcome(enum.StrEnum):
    SUCCESS = "success"
    DENIED = "denied"


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    # Stored as the value string with a CHECK constraint: readable in any SQLite browser and
    # validated by the database itself.
    return Enum(
        cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=40,
        values_callable=lambda members: [m.value for m in members],
        validate_strings=True,
    )


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime()}


# --- layers -------------------------------------------------------------------------------------


class Layer(Base):
    __tablename__ = "layer"
    __table_args__ = (
        CheckConstraint(
            "(type = 'os' AND os_layer_id IS NULL) OR (type != 'os' AND os_layer_id IS NOT NULL)",
            name="ck_layer_os_binding",
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LENGTH, collation="NOCASE"), unique=True)
    type: Mapped[LayerType] = mapped_column(_enum(LayerType, "layer_type"), index=True)
    description: Mapped[str] = mapped_column(Text, default="")
    icon: Mapped[str | None] = mapped_column(String(260))
    #: App and platform layers are bound to one OS layer; OS layers to none.
    os_layer_id: Mapped[int | None] = mapped_column(ForeignKey("layer.id", ondelete="RESTRICT"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str] = mapped_column(String(256))

    os_layer: Mapped[Layer | None] = relationship(remote_side=[id])
    versions: Mapped[list[LayerVersion]] = relationship(
        back_populates="layer", order_by="LayerVersion.id", cascade="all, delete-orphan"
    )


class LayerVersion(Base):
    __tablename__ = "layer_version"
    __table_args__ = (UniqueConstraint("layer_id", "name", name="uq_layer_version_name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    layer_id: Mapped[int] = mapped_column(ForeignKey("layer.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(NAME_LENGTH, collation="NOCASE"))
    state: Mapped[VersionState] = mapped_column(_enum(VersionState, "version_state"), index=True)
    #: Why a version is ``broken`` (or what it waits for); empty otherwise.
    state_reason: Mapped[str] = mapped_column(Text, default="")
    size_bytes: Mapped[int] = mapped_column(Integer, default=0)
    checksum: Mapped[str | None] = mapped_column(String(100))
    comment: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str] = mapped_column(String(256))
    #: The layer script (PowerShell or cmd) a published image runs once at its first start; empty: none.
    layer_script: Mapped[str] = mapped_column(Text, default="", server_default="")
    #: A version made on a packaging machine: what its packaging disk was made of (OS layer version,
    #: prerequisites, the previous version, each with its checksum) and the disk delivered (path, format,
    #: checksum, manifest digest, volume serial). ``None`` for imported versions. Schema 2.
    packaging: Mapped[dict[str, Any] | None] = mapped_column(JSON)

    layer: Mapped[Layer] = relationship(back_populates="versions")
    prerequisites: Mapped[list[LayerVersion]] = relationship(
        secondary="layer_prerequisite",
        primaryjoin="LayerVersion.id == LayerPrerequisite.version_id",
        secondaryjoin="LayerVersion.id == LayerPrerequisite.prerequisite_id",
        order_by="LayerVersion.id",
    )

    @property
    def qualified_name(self) -> str:
        return f"{self.layer.name}:{self.name}"


class LayerPrerequisite(Base):
    """An app layer version needs another layer version present while it is packaged."""

    __tablename__ = "layer_prerequisite"

    version_id: Mapped[int] = mapped_column(
        ForeignKey("layer_version.id", ondelete="CASCADE"), primary_key=True
    )
    prerequisite_id: Mapped[int] = mapped_column(
        ForeignKey("layer_version.id", ondelete="RESTRICT"), primary_key=True, index=True
    )


# --- image templates and published images --------------------------------------------------------


class ImageTemplate(Base):
    __tablename__ = "image_template"
    __table_args__ = (CheckConstraint("size_gb BETWEEN 1 AND 65536", name="ck_template_size"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LENGTH, collation="NOCASE"), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    icon: Mapped[str | None] = mapped_column(String(260))
    os_version_id: Mapped[int] = mapped_column(ForeignKey("layer_version.id", ondelete="RESTRICT"), index=True)
    platform_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("layer_version.id", ondelete="RESTRICT"), index=True
    )
    connector_id: Mapped[int | None] = mapped_column(ForeignKey("connector_config.id", ondelete="RESTRICT"))
    disk_format: Mapped[DiskFormat] = mapped_column(_enum(DiskFormat, "disk_format"))
    size_gb: Mapped[int] = mapped_column(Integer)
    elastic_mode: Mapped[ElasticMode] = mapped_column(_enum(ElasticMode, "elastic_mode"))
    sysprep: Mapped[SysprepMode] = mapped_column(_enum(SysprepMode, "sysprep_mode"))
    #: The number of the latest saved :class:`TemplateRevision`.
    revision: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str] = mapped_column(String(256))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)

    os_version: Mapped[LayerVersion] = relationship(foreign_keys=[os_version_id])
    platform_version: Mapped[LayerVersion | None] = relationship(foreign_keys=[platform_version_id])
    connector: Mapped[ConnectorConfig | None] = relationship()
    app_layers: Mapped[list[TemplateAppLayer]] = relationship(
        order_by="TemplateAppLayer.priority", cascade="all, delete-orphan", back_populates="template"
    )
    revisions: Mapped[list[TemplateRevision]] = relationship(
        order_by="TemplateRevision.revision", cascade="all, delete-orphan", back_populates="template"
    )


class TemplateAppLayer(Base):
    """One app layer version in a template; ``priority`` 0 is the lowest (applied first)."""

    __tablename__ = "template_app_layer"
    __table_args__ = (
        UniqueConstraint("template_id", "priority", name="uq_template_priority"),
        UniqueConstraint("template_id", "layer_id", name="uq_template_layer"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    template_id: Mapped[int] = mapped_column(ForeignKey("image_template.id", ondelete="CASCADE"))
    #: Kept beside ``version_id`` so the database itself refuses two versions of one layer.
    layer_id: Mapped[int] = mapped_column(ForeignKey("layer.id", ondelete="RESTRICT"))
    version_id: Mapped[int] = mapped_column(ForeignKey("layer_version.id", ondelete="RESTRICT"), index=True)
    priority: Mapped[int] = mapped_column(Integer)

    template: Mapped[ImageTemplate] = relationship(back_populates="app_layers")
    version: Mapped[LayerVersion] = relationship()


class TemplateRevision(Base):
    """Every saved state of a template, kept for history and diffs."""

    __tablename__ = "template_revision"
    __table_args__ = (UniqueConstraint("template_id", "revision", name="uq_template_revision"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    template_id: Mapped[int] = mapped_column(ForeignKey("image_template.id", ondelete="CASCADE"))
    revision: Mapped[int] = mapped_column(Integer)
    saved_at: Mapped[datetime] = mapped_column(default=utcnow)
    saved_by: Mapped[str] = mapped_column(String(256))
    comment: Mapped[str] = mapped_column(Text, default="")
    #: The template as it was saved: names and versions, not ids, so a diff reads on its own.
    snapshot: Mapped[dict[str, Any]] = mapped_column(JSON)

    template: Mapped[ImageTemplate] = relationship(back_populates="revisions")


class PublishedImage(Base):
    __tablename__ = "published_image"

    id: Mapped[int] = mapped_column(primary_key=True)
    #: ``<template name>_<yyyy-mm-dd_hh-mm>``
    name: Mapped[str] = mapped_column(String(200, collation="NOCASE"), unique=True)
    template_id: Mapped[int | None] = mapped_column(
        ForeignKey("image_template.id", ondelete="SET NULL"), index=True
    )
    template_name: Mapped[str] = mapped_column(String(NAME_LENGTH))
    template_revision: Mapped[int] = mapped_column(Integer)
    disk_format: Mapped[DiskFormat] = mapped_column(_enum(DiskFormat, "disk_format"))
    size_bytes: Mapped[int] = mapped_column(Integer, default=0)
    checksum: Mapped[str | None] = mapped_column(String(100))
    location: Mapped[str] = mapped_column(Text, default="")
    #: The exact layer stack, bottom to top, with sizes and checksums.
    layers: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    conflict_report: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    task_id: Mapped[int | None] = mapped_column(ForeignKey("task.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str] = mapped_column(String(256))


# --- tasks and audit ------------------------------------------------------------------------------


class Task(Base):
    __tablename__ = "task"
    # Ids are shown to users and followed by scripts: never reuse one after a purge.
    __table_args__ = {"sqlite_autoincrement": True}  # noqa: RUF012 - SQLAlchemy's declarative form

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(64), index=True)
    title: Mapped[str] = mapped_column(String(300))
    state: Mapped[TaskState] = mapped_column(_enum(TaskState, "task_state"), index=True)
    progress: Mapped[int] = mapped_column(Integer, default=0)
    message: Mapped[str] = mapped_column(Text, default="")
    started_by: Mapped[str] = mapped_column(String(256), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    started_at: Mapped[datetime | None] = mapped_column()
    ended_at: Mapped[datetime | None] = mapped_column()
    #: Which process runs the task (``host:pid:start-time``), to tell a crash from a live run.
    owner: Mapped[str | None] = mapped_column(String(200))
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    #: The typed result, serialised; ``None`` until the task ends well.
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[str] = mapped_column(Text, default="")

    log_lines: Mapped[list[TaskLogLine]] = relationship(
        order_by="TaskLogLine.id", cascade="all, delete-orphan", passive_deletes=True
    )


class TaskLogLine(Base):
    __tablename__ = "task_log_line"
    # A live log is followed by the last line id seen: ids must only grow.
    __table_args__ = {"sqlite_autoincrement": True}  # noqa: RUF012

    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("task.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    level: Mapped[str] = mapped_column(String(10), default="INFO")
    text: Mapped[str] = mapped_column(Text)


class AuditEntry(Base):
    __tablename__ = "audit_entry"
    # Audit ids only grow, even after retention deletes old entries.
    __table_args__ = (Index("ix_audit_object", "object_type", "object_name"), {"sqlite_autoincrement": True})

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    user: Mapped[str] = mapped_column(String(256), index=True)
    operation: Mapped[str] = mapped_column(String(64))
    object_type: Mapped[str] = mapped_column(String(64))
    object_name: Mapped[str] = mapped_column(String(300, collation="NOCASE"))
    #: What changed, as a small JSON document (before/after of the fields that moved).
    change: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    comment: Mapped[str] = mapped_column(Text, default="")
    outcome: Mapped[AuditOutcome] = mapped_column(_enum(AuditOutcome, "audit_outcome"))


# --- identity -------------------------------------------------------------------------------------


class RoleGrant(Base):
    __tablename__ = "role_grant"
    __table_args__ = (UniqueConstraint("principal_kind", "principal", "role", name="uq_role_grant"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    principal_kind: Mapped[PrincipalKind] = mapped_column(_enum(PrincipalKind, "principal_kind"))
    #: A local or OS account name, or an AD object's SID.
    principal: Mapped[str] = mapped_column(String(256, collation="NOCASE"), index=True)
    display_name: Mapped[str] = mapped_column(String(256), default="")
    role: Mapped[Role] = mapped_column(_enum(Role, "role"))
    granted_at: Mapped[datetime] = mapped_column(default=utcnow)
    granted_by: Mapped[str] = mapped_column(String(256))


class LocalAccount(Base):
    """An account kept by LayerDesk itself (labs without a directory). Passwords: argon2id."""

    __tablename__ = "local_account"

    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(NAME_LENGTH, collation="NOCASE"), unique=True)
    password_hash: Mapped[str] = mapped_column(String(200))
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    failed_sign_ins: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class SignInSession(Base):
    """A ``layerctl login`` session. Only a hash of its token is stored; the token is in the keyring."""

    __tablename__ = "sign_in_session"

    id: Mapped[int] = mapped_column(primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    username: Mapped[str] = mapped_column(String(256))
    principal_kind: Mapped[PrincipalKind] = mapped_column(_enum(PrincipalKind, "principal_kind"))
    #: Roles resolved at sign-in (for directory users whose groups are not re-read each command).
    roles: Mapped[list[str]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column()


class DirectoryJunction(Base):
    """How LayerDesk reaches an Active Directory. The bind password lives in the OS keyring."""

    __tablename__ = "directory_junction"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LENGTH, collation="NOCASE"), unique=True)
    server: Mapped[str] = mapped_column(String(255))
    port: Mapped[int] = mapped_column(Integer)
    security: Mapped[DirectorySecurity] = mapped_column(_enum(DirectorySecurity, "directory_security"))
    ca_certificate: Mapped[str | None] = mapped_column(Text)
    base_dn: Mapped[str] = mapped_column(String(1024))
    bind_account: Mapped[str] = mapped_column(String(256))
    #: Whether the bind password was put in the OS keyring (the password never is here).
    has_password: Mapped[bool] = mapped_column(Boolean, default=False)
    attribute_map: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


# --- elastic layering and user layers -------------------------------------------------------------


class ElasticAssignment(Base):
    """An app layer version assigned elastically to an AD user or group (by SID)."""

    __tablename__ = "elastic_assignment"
    __table_args__ = (UniqueConstraint("layer_id", "principal_sid", name="uq_elastic_layer_principal"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    layer_id: Mapped[int] = mapped_column(ForeignKey("layer.id", ondelete="RESTRICT"), index=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("layer_version.id", ondelete="RESTRICT"), index=True)
    principal_kind: Mapped[PrincipalKind] = mapped_column(_enum(PrincipalKind, "principal_kind"))
    principal_sid: Mapped[str] = mapped_column(String(184), index=True)
    principal_name: Mapped[str] = mapped_column(String(256, collation="NOCASE"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str] = mapped_column(String(256))

    version: Mapped[LayerVersion] = relationship()


class MachineAssociation(Base):
    """Ties an AD group to machine-name wildcard patterns (``VDA-FIN-*``)."""

    __tablename__ = "machine_association"
    __table_args__ = (UniqueConstraint("group_sid", "pattern", name="uq_machine_association"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    group_sid: Mapped[str] = mapped_column(String(184), index=True)
    group_name: Mapped[str] = mapped_column(String(256))
    pattern: Mapped[str] = mapped_column(String(64, collation="NOCASE"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str] = mapped_column(String(256))


class StorageLocation(Base):
    """Where User Layers live: an SMB path for some AD groups, in priority order."""

    __tablename__ = "storage_location"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LENGTH, collation="NOCASE"), unique=True)
    path: Mapped[str] = mapped_column(String(1024))
    #: Lower numbers are tried first; unique so the order is never ambiguous.
    priority: Mapped[int] = mapped_column(Integer, unique=True)
    default_size_gb: Mapped[int] = mapped_column(Integer, default=10)
    groups: Mapped[list[StorageLocationGroup]] = relationship(
        cascade="all, delete-orphan", order_by="StorageLocationGroup.group_name"
    )


class StorageLocationGroup(Base):
    __tablename__ = "storage_location_group"

    location_id: Mapped[int] = mapped_column(
        ForeignKey("storage_location.id", ondelete="CASCADE"), primary_key=True
    )
    group_sid: Mapped[str] = mapped_column(String(184), primary_key=True)
    group_name: Mapped[str] = mapped_column(String(256))


class ConnectorConfig(Base):
    """How to reach a hypervisor or provisioning system. Credentials live in the OS keyring."""

    __tablename__ = "connector_config"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LENGTH, collation="NOCASE"), unique=True)
    type: Mapped[str] = mapped_column(String(32), index=True)
    endpoint: Mapped[str] = mapped_column(String(1024), default="")
    username: Mapped[str] = mapped_column(String(256), default="")
    verify_tls: Mapped[bool] = mapped_column(Boolean, default=True)
    #: Whether a password for this connector was put in the OS keyring (the password never is here).
    has_password: Mapped[bool] = mapped_column(Boolean, default=False)
    #: Type-specific choices (datastore, host, VM template, store, ...).
    options: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    post_publish_script: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str] = mapped_column(String(256))


class Setting(Base):
    __tablename__ = "setting"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[Any] = mapped_column(JSON)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_by: Mapped[str] = mapped_column(String(256), default="")


@event.listens_for(ImageTemplate, "before_update")
def _touch_template(mapper: Any, connection: Any, target: ImageTemplate) -> None:
    target.updated_at = utcnow()
