"""Layers and their versions: create, describe, change state, delete (refused while in use)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session, aliased, selectinload

from app.catalog.models import (
    ElasticAssignment,
    ImageTemplate,
    Layer,
    LayerPrerequisite,
    LayerType,
    LayerVersion,
    TemplateAppLayer,
    VersionState,
)
from app.errors import Conflict, NotFound, ValidationError
from app.services.base import Service, ServiceContext, find_layer, find_version, split_qualified
from app.services.rbac import LAYER_OPERATION, Operation
from app.services.validation import check_unique, like_contains, validate_description, validate_name
from app.services.views import LayerDetail, LayerInfo, LayerVersionInfo

log = logging.getLogger(__name__)

#: The state machine of a layer version. ``deployable`` is final: a deployed version never changes.
TRANSITIONS: dict[VersionState, frozenset[VersionState]] = {
    VersionState.EDITING: frozenset({VersionState.FINALIZING, VersionState.BROKEN}),
    VersionState.FINALIZING: frozenset(
        {VersionState.DEPLOYABLE, VersionState.BROKEN, VersionState.EDITING}
    ),
    VersionState.BROKEN: frozenset({VersionState.EDITING}),
    VersionState.DEPLOYABLE: frozenset(),
}


#: At most this many registry paths are listed in :attr:`VersionContents.registry` (the count is exact).
REGISTRY_SUMMARY_LINES = 200


@dataclass(frozen=True)
class VersionContents:
    """What one stored layer version holds, read from its verified manifest in the layer repository."""

    layer: str
    version: str
    #: ``folder``, ``wim``, ``ntfs_volume`` or ``disk_image``, and the path it was imported from.
    source_kind: str
    source_path: str
    files: int
    data_bytes: int
    #: Paths the version removes from the layers below it (``\\`` at the end: a whole folder's content).
    deletions: tuple[str, ...]
    registry_operations: int
    #: ``"set HKLM\\SOFTWARE\\Key\\Value"`` and the like, one per registry path touched (the first
    #: :data:`REGISTRY_SUMMARY_LINES` of them).
    registry: tuple[str, ...]
    #: Registry paths touched, per root (``HKLM\\SOFTWARE`` → 12).
    registry_roots: tuple[tuple[str, int], ...]


def version_users(session: Session, version: LayerVersion) -> list[str]:
    """Everything that keeps ``version`` from being deleted, in words."""
    users: list[str] = []
    templates = session.scalars(
        select(ImageTemplate.name)
        .where(
            or_(
                ImageTemplate.os_version_id == version.id,
                ImageTemplate.platform_version_id == version.id,
                ImageTemplate.id.in_(
                    select(TemplateAppLayer.template_id).where(TemplateAppLayer.version_id == version.id)
                ),
            )
        )
        .order_by(ImageTemplate.name)
    ).all()
    users.extend(f"image template {name!r}" for name in templates)
    dependants = session.scalars(
        select(LayerVersion)
        .join(LayerPrerequisite, LayerPrerequisite.version_id == LayerVersion.id)
        .where(LayerPrerequisite.prerequisite_id == version.id)
        .options(selectinload(LayerVersion.layer))
    ).all()
    users.extend(f"prerequisite of {v.qualified_name}" for v in dependants)
    assigned = session.scalar(
        select(func.count()).select_from(ElasticAssignment).where(ElasticAssignment.version_id == version.id)
    )
    if assigned:
        users.append(f"{assigned} elastic assignment{'s' if assigned != 1 else ''}")
    return users


def _version_info(session: Session, version: LayerVersion, *, with_users: bool = True) -> LayerVersionInfo:
    return LayerVersionInfo(
        id=version.id,
        layer=version.layer.name,
        name=version.name,
        state=version.state,
        state_reason=version.state_reason,
        size_bytes=version.size_bytes,
        checksum=version.checksum,
        comment=version.comment,
        created_at=version.created_at,
        created_by=version.created_by,
        prerequisites=tuple(p.qualified_name for p in version.prerequisites),
        used_by=tuple(version_users(session, version)) if with_users else (),
    )


def _layer_info(layer: Layer) -> LayerInfo:
    latest = layer.versions[-1] if layer.versions else None
    return LayerInfo(
        id=layer.id,
        name=layer.name,
        type=layer.type,
        description=layer.description,
        icon=layer.icon,
        os_layer=layer.os_layer.name if layer.os_layer else None,
        created_at=layer.created_at,
        created_by=layer.created_by,
        version_count=len(layer.versions),
        latest_version=latest.name if latest else None,
        latest_state=latest.state if latest else None,
        size_bytes=sum(v.size_bytes for v in layer.versions),
    )


class StoredContent(Protocol):
    """Where layer versions' content is stored (the engine's layer repository)."""

    def remove_version(self, layer_id: int, version_id: int) -> bool: ...


class LayerService(Service):
    """Layers and their versions. With ``content`` (the layer repository), deleting a version or a layer
    also removes its stored content once the deletion has committed; if that fails, the deletion stands
    and ``layerctl repo check`` reports the leftover as an orphan."""

    def __init__(self, ctx: ServiceContext, content: StoredContent | None = None) -> None:
        super().__init__(ctx)
        self._content = content

    def _forget_content(self, layer_id: int, version_ids: Sequence[int]) -> None:
        if self._content is None:
            return
        for version_id in version_ids:
            try:
                self._content.remove_version(layer_id, version_id)
            except Exception as exc:  # noqa: BLE001 - the deletion stands; `repo check` lists the orphan
                log.warning("could not remove the stored content of layer %d version %d: %s", layer_id, version_id,
                            exc)

    # --- reads ---------------------------------------------------------------------------------

    def list_layers(self, type: LayerType | None = None, search: str | None = None) -> list[LayerInfo]:
        """Layers sorted by name, optionally of one type and/or whose name contains ``search``."""
        with self._read() as session:
            # Counts, sizes and the newest version come from one aggregate, not from loading every
            # version of every layer (a catalog holds tens of thousands of versions).
            stats = (
                select(
                    LayerVersion.layer_id.label("layer_id"),
                    func.count().label("count"),
                    func.coalesce(func.sum(LayerVersion.size_bytes), 0).label("size"),
                    func.max(LayerVersion.id).label("latest_id"),
                )
                .group_by(LayerVersion.layer_id)
                .subquery()
            )
            latest = aliased(LayerVersion)
            os_layer = aliased(Layer)
            query = (
                select(Layer, os_layer.name, stats.c.count, stats.c.size, latest.name, latest.state)
                .outerjoin(os_layer, os_layer.id == Layer.os_layer_id)
                .outerjoin(stats, stats.c.layer_id == Layer.id)
                .outerjoin(latest, latest.id == stats.c.latest_id)
            )
            if type is not None:
                query = query.where(Layer.type == type)
            if search:
                query = query.where(Layer.name.ilike(like_contains(search), escape="\\"))
            return [
                LayerInfo(
                    id=layer.id, name=layer.name, type=layer.type, description=layer.description, icon=layer.icon,
                    os_layer=os_name, created_at=layer.created_at, created_by=layer.created_by,
                    version_count=count or 0, latest_version=latest_name, latest_state=latest_state,
                    size_bytes=size or 0,
                )
                for layer, os_name, count, size, latest_name, latest_state in session.execute(
                    query.order_by(Layer.name)
                )
            ]

    def get_layer(self, name: str) -> LayerDetail:
        with self._read() as session:
            layer = find_layer(session, name)
            bound = session.scalars(
                select(Layer.name).where(Layer.os_layer_id == layer.id).order_by(Layer.name)
            ).all()
            return LayerDetail(
                layer=_layer_info(layer),
                versions=tuple(_version_info(session, v) for v in layer.versions),
                bound_layers=tuple(bound),
            )

    def get_version(self, ref: str) -> LayerVersionInfo:
        with self._read() as session:
            return _version_info(session, find_version(session, ref, default_latest=False))

    def template_usage(self) -> dict[int, tuple[str, ...]]:
        """Per layer id, the image templates that use any version of it (as OS, platform or app layer),
        sorted by name. Layers no template uses are left out."""
        with self._read() as session:
            rows = session.execute(
                select(LayerVersion.layer_id, ImageTemplate.name)
                .join(ImageTemplate, or_(ImageTemplate.os_version_id == LayerVersion.id,
                                         ImageTemplate.platform_version_id == LayerVersion.id))
                .union(
                    select(TemplateAppLayer.layer_id, ImageTemplate.name)
                    .join(ImageTemplate, ImageTemplate.id == TemplateAppLayer.template_id)
                )
            ).all()
        usage: dict[int, set[str]] = {}
        for layer_id, template in rows:
            usage.setdefault(layer_id, set()).add(template)
        return {layer_id: tuple(sorted(names, key=str.casefold)) for layer_id, names in usage.items()}

    def version_contents(self, ref: str, repository: Path) -> VersionContents:
        """What version ``LAYER:VERSION`` holds in the layer repository at ``repository`` (files, size,
        deletions, registry changes). :class:`NotFound` while nothing is stored for it (a version being
        edited); a manifest that does not match the catalog is refused (``RepositoryDamaged``)."""
        # Imported when used: most service calls never need the engine's modules (0.1 s to import).
        from app.engine.repository import LayerRepository

        with self._read() as session:
            version = find_version(session, ref, default_latest=False)
            layer_id, version_id, checksum = version.layer_id, version.id, version.checksum
            layer_name, version_name = version.layer.name, version.name
        if not checksum:
            raise NotFound(f"Nothing is stored for {layer_name}:{version_name} yet (it is not imported).")
        manifest = LayerRepository(repository).manifest(layer_id, version_id, checksum)
        touched = manifest.registry.touched()
        roots: dict[str, int] = {}
        for touch in touched:
            parts = touch.path.split("\\")
            root = parts[0] if parts[0] == "HKCU" else "\\".join(parts[:2])
            roots[root] = roots.get(root, 0) + 1
        return VersionContents(
            layer=layer_name,
            version=version_name,
            source_kind=manifest.source.kind.value,
            source_path=str(manifest.source.path),
            files=manifest.files,
            data_bytes=manifest.data_bytes,
            deletions=tuple(d.path + ("\\" if d.opaque else "") for d in manifest.deletions),
            registry_operations=len(manifest.registry),
            registry=tuple(f"{t.kind.value.replace('_', ' ')} {t.path}" for t in touched[:REGISTRY_SUMMARY_LINES]),
            registry_roots=tuple(sorted(roots.items())),
        )

    # --- changes -------------------------------------------------------------------------------

    def create_layer(
        self,
        name: str,
        type: LayerType,
        *,
        os_layer: str | None = None,
        description: str = "",
        icon: str | None = None,
        comment: str = "",
    ) -> LayerInfo:
        """Create an empty layer; app and platform layers must name the OS layer they belong to."""
        type = LayerType(type)
        with self._change(LAYER_OPERATION[type], "layer.create", "layer", name or "", comment) as change:
            name = validate_name(name, "layer name")
            description = validate_description(description)
            if icon is not None:
                icon = validate_name(icon, "icon file name", max_length=260)
            session = change.session
            self._refuse_duplicate_layer(session, name)
            os_row: Layer | None = None
            if type is LayerType.OS:
                if os_layer:
                    raise ValidationError(
                        f"OS layer {name!r} cannot be bound to another OS layer; leave --os-layer out."
                    )
            else:
                if not os_layer:
                    raise ValidationError(
                        f"A {type.value} layer belongs to one OS layer: name it with --os-layer.",
                        field="os_layer",
                    )
                os_row = find_layer(session, os_layer)
                if os_row.type is not LayerType.OS:
                    raise ValidationError(
                        f"{os_row.name!r} is a {os_row.type.value} layer, not an OS layer.", field="os_layer"
                    )
            layer = Layer(
                name=name,
                type=type,
                description=description,
                icon=icon,
                os_layer=os_row,
                created_at=self._now(),
                created_by=self.caller.username,
            )
            session.add(layer)
            session.flush()
            change.details = {"type": type.value, "os_layer": os_row.name if os_row else None}
            return _layer_info(layer)

    def update_layer(
        self,
        name: str,
        *,
        new_name: str | None = None,
        description: str | None = None,
        icon: str | None = None,
        comment: str = "",
    ) -> LayerInfo:
        with self._change(Operation.EDIT_ANY_LAYERS, "layer.update", "layer", name, comment) as change:
            layer = find_layer(change.session, name)
            change.require(LAYER_OPERATION[layer.type])
            details: dict[str, object] = {}
            if new_name is not None and new_name != layer.name:
                new_name = validate_name(new_name, "layer name")
                if new_name.casefold() != layer.name.casefold():
                    self._refuse_duplicate_layer(change.session, new_name)
                details["name"] = [layer.name, new_name]
                layer.name = new_name
            if description is not None:
                description = validate_description(description)
                details["description"] = [layer.description, description]
                layer.description = description
            if icon is not None:
                icon = validate_name(icon, "icon file name", max_length=260)
                details["icon"] = [layer.icon, icon]
                layer.icon = icon
            change.details = details
            return _layer_info(layer)

    def delete_layer(self, name: str, *, comment: str = "") -> None:
        """Delete a layer and all its versions; refused while any version or bound layer is in use."""
        with self._change(Operation.EDIT_ANY_LAYERS, "layer.delete", "layer", name, comment) as change:
            session = change.session
            layer = find_layer(session, name)
            change.require(LAYER_OPERATION[layer.type])
            problems: list[str] = []
            bound = session.scalars(select(Layer.name).where(Layer.os_layer_id == layer.id)).all()
            if bound:
                problems.append("OS layer of " + ", ".join(repr(b) for b in sorted(bound)))
            for version in layer.versions:
                problems.extend(f"version {version.name}: {u}" for u in version_users(session, version))
            if problems:
                raise Conflict(f"Layer {layer.name!r} is in use and was not deleted: " + "; ".join(problems) + ".")
            change.object_name = layer.name
            change.details = {"type": layer.type.value, "versions": [v.name for v in layer.versions]}
            layer_id, version_ids = layer.id, [v.id for v in layer.versions]
            change.after_commit(lambda: self._forget_content(layer_id, version_ids))
            session.delete(layer)

    def add_version(
        self,
        layer_name: str,
        version_name: str,
        *,
        prerequisites: Sequence[str] = (),
        comment: str = "",
    ) -> LayerVersionInfo:
        """Start a new version (state ``editing``) of a layer, with optional prerequisite versions."""
        with self._change(Operation.EDIT_ANY_LAYERS, "layer.version.add", "layer", layer_name, comment) as change:
            session = change.session
            layer = find_layer(session, layer_name)
            change.require(LAYER_OPERATION[layer.type])
            version_name = validate_name(version_name, "version name")
            if any(v.name.casefold() == version_name.casefold() for v in layer.versions):
                raise Conflict(f"Layer {layer.name!r} already has a version {version_name!r}.")
            prereqs = self._resolve_prerequisites(session, layer, prerequisites)
            version = LayerVersion(
                layer=layer,
                name=version_name,
                state=VersionState.EDITING,
                comment=change_comment(comment),
                created_at=self._now(),
                created_by=self.caller.username,
                prerequisites=prereqs,
            )
            session.add(version)
            session.flush()
            change.object_name = version.qualified_name
            change.object_type = "layer version"
            change.details = {"state": version.state.value, "prerequisites": [p.qualified_name for p in prereqs]}
            return _version_info(session, version)

    def set_prerequisites(self, ref: str, prerequisites: Sequence[str], *, comment: str = "") -> LayerVersionInfo:
        with self._change(
            Operation.EDIT_ANY_LAYERS, "layer.version.prerequisites", "layer version", ref, comment
        ) as change:
            session = change.session
            version = find_version(session, ref, default_latest=False)
            change.require(LAYER_OPERATION[version.layer.type])
            if version.state is VersionState.DEPLOYABLE:
                raise Conflict(f"{version.qualified_name} is deployable; its prerequisites can no longer change.")
            before = [p.qualified_name for p in version.prerequisites]
            version.prerequisites = self._resolve_prerequisites(session, version.layer, prerequisites)
            change.object_name = version.qualified_name
            change.details = {"prerequisites": [before, [p.qualified_name for p in version.prerequisites]]}
            return _version_info(session, version)

    def set_version_state(
        self,
        ref: str,
        state: VersionState,
        *,
        reason: str = "",
        size_bytes: int | None = None,
        checksum: str | None = None,
        comment: str = "",
    ) -> LayerVersionInfo:
        """Move a version along its life (``editing`` → ``finalizing`` → ``deployable`` / ``broken``)."""
        state = VersionState(state)
        with self._change(Operation.EDIT_ANY_LAYERS, "layer.version.state", "layer version", ref, comment) as change:
            session = change.session
            version = find_version(session, ref, default_latest=False)
            change.require(LAYER_OPERATION[version.layer.type])
            if state not in TRANSITIONS[version.state]:
                allowed = ", ".join(sorted(s.value for s in TRANSITIONS[version.state])) or "none: it is final"
                raise Conflict(
                    f"{version.qualified_name} is {version.state.value} and cannot become {state.value} "
                    f"(allowed next states: {allowed})."
                )
            if state is VersionState.BROKEN and not reason.strip():
                raise ValidationError("Say why the version is broken (a reason is required).", field="reason")
            if size_bytes is not None:
                if size_bytes < 0:
                    raise ValidationError("A version's size cannot be negative.", field="size_bytes")
                version.size_bytes = size_bytes
            if checksum is not None:
                version.checksum = checksum
            change.details = {"state": [version.state.value, state.value], "reason": reason}
            version.state = state
            version.state_reason = reason.strip()
            change.object_name = version.qualified_name
            return _version_info(session, version)

    def delete_version(self, ref: str, *, comment: str = "") -> None:
        """Delete one version; refused (naming the users) while templates, prerequisites or
        elastic assignments use it."""
        name, version_name = split_qualified(ref)
        if version_name is None:
            raise ValidationError(f"Name the version to delete: {name}:VERSION (or delete the whole layer).")
        with self._change(Operation.EDIT_ANY_LAYERS, "layer.version.delete", "layer version", ref, comment) as change:
            session = change.session
            version = find_version(session, ref, default_latest=False)
            change.require(LAYER_OPERATION[version.layer.type])
            users = version_users(session, version)
            if users:
                raise Conflict(
                    f"Version {version.qualified_name} is in use and was not deleted: {'; '.join(users)}."
                )
            change.object_name = version.qualified_name
            change.details = {"state": version.state.value}
            layer_id, version_id = version.layer_id, version.id
            change.after_commit(lambda: self._forget_content(layer_id, [version_id]))
            session.delete(version)

    # --- helpers -------------------------------------------------------------------------------

    @staticmethod
    def _refuse_duplicate_layer(session: Session, name: str) -> None:
        clash = session.scalars(select(Layer.name).where(Layer.name == name)).first()
        if clash is not None:
            raise Conflict(f"A layer named {clash!r} already exists (names ignore case, as on Windows).")

    @staticmethod
    def _resolve_prerequisites(session: Session, layer: Layer, refs: Sequence[str]) -> list[LayerVersion]:
        check_unique(refs, "The prerequisite list")
        if refs and layer.type is not LayerType.APP:
            raise ValidationError(f"Only app layers have prerequisites; {layer.name!r} is a {layer.type.value} layer.")
        result: list[LayerVersion] = []
        for ref in refs:
            prereq = find_version(session, ref)
            if prereq.layer_id == layer.id:
                raise ValidationError(f"Layer {layer.name!r} cannot be its own prerequisite.")
            if prereq.layer.type is LayerType.OS:
                raise ValidationError(
                    f"{prereq.qualified_name} is an OS layer; the OS layer is always present and is not a prerequisite."
                )
            if prereq.layer.os_layer_id != layer.os_layer_id:
                raise ValidationError(
                    f"Prerequisite {prereq.qualified_name} belongs to another OS layer than {layer.name!r}."
                )
            if prereq.state is VersionState.BROKEN:
                raise ValidationError(f"Prerequisite {prereq.qualified_name} is broken.")
            clash = next((p for p in result if p.layer_id == prereq.layer_id), None)
            if clash is not None:
                # "Office" and "Office:2024" differ as text but may name the same version; two
                # versions of one layer cannot both be present on a packaging machine.
                twice = prereq.qualified_name if clash.id == prereq.id else f"{clash.qualified_name} and {prereq.name}"
                raise ValidationError(f"The prerequisite list names {twice} twice: list each layer once.")
            result.append(prereq)
        return result


def change_comment(comment: str) -> str:
    return (comment or "").strip()
