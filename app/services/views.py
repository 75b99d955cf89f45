"""Typed, immutable results the services hand out (never ORM rows, never loose dicts).

The console shows them; ``layerctl --json`` prints them through :func:`to_jsonable`.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from app.catalog.models import (
    AuditOutcome,
    DirectorySecurity,
    DiskFormat,
    ElasticMode,
    LayerType,
    PrincipalKind,
    Role,
    SysprepMode,
    TaskState,
    VersionState,
)


def to_jsonable(value: Any) -> Any:
    """Dataclasses, enums, datetimes, tuples and dicts → plain JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, list | tuple | frozenset | set):
        items = [to_jsonable(v) for v in value]
        return sorted(items) if isinstance(value, frozenset | set) else items
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class LayerVersionInfo:
    id: int
    layer: str
    name: str
    state: VersionState
    state_reason: str
    size_bytes: int
    checksum: str | None
    comment: str
    created_at: datetime
    created_by: str
    prerequisites: tuple[str, ...]
    #: Templates, prerequisites and elastic assignments that use this version.
    used_by: tuple[str, ...]


@dataclass(frozen=True)
class LayerInfo:
    id: int
    name: str
    type: LayerType
    description: str
    icon: str | None
    os_layer: str | None
    created_at: datetime
    created_by: str
    version_count: int
    latest_version: str | None
    latest_state: VersionState | None
    size_bytes: int


@dataclass(frozen=True)
class LayerDetail:
    layer: LayerInfo
    versions: tuple[LayerVersionInfo, ...]
    #: App and platform layers bound to this OS layer.
    bound_layers: tuple[str, ...]


@dataclass(frozen=True)
class TemplateInfo:
    id: int
    name: str
    description: str
    icon: str | None
    os_version: str
    platform_version: str | None
    #: App layer versions, lowest priority first.
    app_layers: tuple[str, ...]
    connector: str | None
    disk_format: DiskFormat
    size_gb: int
    elastic_mode: ElasticMode
    sysprep: SysprepMode
    revision: int
    created_at: datetime
    created_by: str
    updated_at: datetime
    #: Why the template cannot be published as it stands (empty when it can).
    publish_blockers: tuple[str, ...]


@dataclass(frozen=True)
class TemplateRevisionInfo:
    revision: int
    saved_at: datetime
    saved_by: str
    comment: str
    snapshot: dict[str, Any]


@dataclass(frozen=True)
class FieldChange:
    field: str
    before: Any
    after: Any


@dataclass(frozen=True)
class StackEntry:
    """One layer of a publish, bottom (OS) to top (platform)."""

    role: str  # "os", "app" or "platform"
    layer: str
    version: str
    version_id: int
    priority: int | None
    size_bytes: int
    checksum: str | None


@dataclass(frozen=True)
class PublishPlan:
    template: str
    template_revision: int
    image_name: str
    disk_format: DiskFormat
    size_gb: int
    stack: tuple[StackEntry, ...]
    connector: str | None


@dataclass(frozen=True)
class PublishedImageInfo:
    id: int
    name: str
    template: str
    template_revision: int
    disk_format: DiskFormat
    size_bytes: int
    checksum: str | None
    location: str
    layers: tuple[dict[str, Any], ...]
    conflict_count: int
    created_at: datetime
    created_by: str


@dataclass(frozen=True)
class TaskInfo:
    id: int
    kind: str
    title: str
    state: TaskState
    progress: int
    message: str
    started_by: str
    created_at: datetime
    started_at: datetime | None
    ended_at: datetime | None
    error: str
    result: dict[str, Any] | None
    cancel_requested: bool


@dataclass(frozen=True)
class TaskLogLineInfo:
    id: int
    at: datetime
    level: str
    text: str


@dataclass(frozen=True)
class AuditEntryInfo:
    id: int
    at: datetime
    user: str
    operation: str
    object_type: str
    object_name: str
    change: dict[str, Any]
    comment: str
    outcome: AuditOutcome


@dataclass(frozen=True)
class RoleGrantInfo:
    id: int
    principal_kind: PrincipalKind
    principal: str
    display_name: str
    role: Role
    granted_at: datetime
    granted_by: str


@dataclass(frozen=True)
class AccountInfo:
    username: str
    disabled: bool
    roles: tuple[Role, ...]
    created_at: datetime


@dataclass(frozen=True)
class ElasticAssignmentInfo:
    id: int
    layer: str
    version: str
    principal_kind: PrincipalKind
    principal_sid: str
    principal_name: str
    created_at: datetime
    created_by: str


@dataclass(frozen=True)
class MachineAssociationInfo:
    id: int
    group_sid: str
    group_name: str
    pattern: str
    created_at: datetime
    created_by: str


@dataclass(frozen=True)
class StorageLocationInfo:
    id: int
    name: str
    path: str
    priority: int
    default_size_gb: int
    groups: tuple[tuple[str, str], ...]  # (SID, name)


@dataclass(frozen=True)
class ConnectorInfo:
    id: int
    name: str
    type: str
    endpoint: str
    username: str
    verify_tls: bool
    options: dict[str, Any]
    post_publish_script: str
    has_credentials: bool
    used_by: tuple[str, ...]


@dataclass(frozen=True)
class DirectoryJunctionInfo:
    id: int
    name: str
    server: str
    port: int
    security: DirectorySecurity
    ca_certificate: str | None
    base_dn: str
    bind_account: str
    attribute_map: dict[str, str]
    enabled: bool
    warnings: tuple[str, ...]


@dataclass(frozen=True)
class SettingInfo:
    key: str
    value: Any
    default: Any
    description: str
    updated_at: datetime | None
    updated_by: str
