"""Image templates: what to composite and how; every save is kept as a diffable revision."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from app.catalog.models import (
    ConnectorConfig,
    DiskFormat,
    ElasticMode,
    ImageTemplate,
    LayerType,
    LayerVersion,
    SysprepMode,
    TemplateAppLayer,
    TemplateRevision,
    VersionState,
)
from app.errors import Conflict, NotFound, ValidationError
from app.services.base import Service, find_version
from app.services.rbac import Operation
from app.services.validation import check_unique, choice, like_contains, validate_description, validate_name
from app.services.views import FieldChange, TemplateInfo, TemplateRevisionInfo

MAX_SIZE_GB = 65536
#: The order in which a snapshot's fields are shown and diffed.
SNAPSHOT_FIELDS = (
    "name",
    "description",
    "icon",
    "os",
    "platform",
    "apps",
    "connector",
    "disk_format",
    "size_gb",
    "elastic_mode",
    "sysprep",
)


@dataclass(frozen=True)
class TemplateSpec:
    """The whole content of a template as the user gives it (CLI, wizard)."""

    os: str
    apps: tuple[str, ...] = ()
    platform: str | None = None
    disk_format: DiskFormat = DiskFormat.VHDX
    size_gb: int = 100
    elastic_mode: ElasticMode = ElasticMode.NONE
    sysprep: SysprepMode = SysprepMode.NOT_GENERALIZED
    connector: str | None = None
    description: str = ""
    icon: str | None = None


def find_template(session: Session, name: str) -> ImageTemplate:
    template = session.scalars(
        select(ImageTemplate)
        .where(ImageTemplate.name == name)
        .options(selectinload(ImageTemplate.app_layers).selectinload(TemplateAppLayer.version))
    ).one_or_none()
    if template is None:
        raise NotFound(f"There is no image template named {name!r}. `layerctl template list` shows them.")
    return template


def snapshot(template: ImageTemplate) -> dict[str, Any]:
    """The template in names, not ids, so a revision reads (and diffs) on its own."""
    return {
        "name": template.name,
        "description": template.description,
        "icon": template.icon,
        "os": template.os_version.qualified_name,
        "platform": template.platform_version.qualified_name if template.platform_version else None,
        "apps": [entry.version.qualified_name for entry in template.app_layers],
        "connector": template.connector.name if template.connector else None,
        "disk_format": template.disk_format.value,
        "size_gb": template.size_gb,
        "elastic_mode": template.elastic_mode.value,
        "sysprep": template.sysprep.value,
    }


def publish_blockers(template: ImageTemplate) -> list[str]:
    versions = [template.os_version]
    if template.platform_version is not None:
        versions.append(template.platform_version)
    versions.extend(entry.version for entry in template.app_layers)
    return [
        f"{v.qualified_name} is {v.state.value}, not deployable"
        for v in versions
        if v.state is not VersionState.DEPLOYABLE
    ]


def template_info(template: ImageTemplate) -> TemplateInfo:
    snap = snapshot(template)
    return TemplateInfo(
        id=template.id,
        name=template.name,
        description=template.description,
        icon=template.icon,
        os_version=snap["os"],
        platform_version=snap["platform"],
        app_layers=tuple(snap["apps"]),
        connector=snap["connector"],
        disk_format=template.disk_format,
        size_gb=template.size_gb,
        elastic_mode=template.elastic_mode,
        sysprep=template.sysprep,
        revision=template.revision,
        created_at=template.created_at,
        created_by=template.created_by,
        updated_at=template.updated_at,
        publish_blockers=tuple(publish_blockers(template)),
    )


def diff_snapshots(before: dict[str, Any], after: dict[str, Any]) -> list[FieldChange]:
    changes = [
        FieldChange(key, before.get(key), after.get(key))
        for key in SNAPSHOT_FIELDS
        if before.get(key) != after.get(key)
    ]
    extra = sorted((set(before) | set(after)) - set(SNAPSHOT_FIELDS))
    changes.extend(FieldChange(k, before.get(k), after.get(k)) for k in extra if before.get(k) != after.get(k))
    return changes


class TemplateService(Service):
    # --- reads ---------------------------------------------------------------------------------

    def list_templates(self, search: str | None = None) -> list[TemplateInfo]:
        with self._read() as session:
            query = select(ImageTemplate).options(
                selectinload(ImageTemplate.app_layers)
                .selectinload(TemplateAppLayer.version)
                .selectinload(LayerVersion.layer),
                selectinload(ImageTemplate.os_version).selectinload(LayerVersion.layer),
                selectinload(ImageTemplate.platform_version).selectinload(LayerVersion.layer),
                selectinload(ImageTemplate.connector),
            )
            if search:
                query = query.where(ImageTemplate.name.ilike(like_contains(search), escape="\\"))
            return [template_info(t) for t in session.scalars(query.order_by(ImageTemplate.name))]

    def get_template(self, name: str) -> TemplateInfo:
        with self._read() as session:
            return template_info(find_template(session, name))

    def history(self, name: str) -> list[TemplateRevisionInfo]:
        with self._read() as session:
            template = find_template(session, name)
            return [
                TemplateRevisionInfo(r.revision, r.saved_at, r.saved_by, r.comment, r.snapshot)
                for r in template.revisions
            ]

    def diff(self, name: str, revision_a: int, revision_b: int) -> list[FieldChange]:
        """What changed from revision ``a`` to revision ``b``."""
        with self._read() as session:
            template = find_template(session, name)
            by_number = {r.revision: r.snapshot for r in template.revisions}
            for number in (revision_a, revision_b):
                if number not in by_number:
                    raise NotFound(
                        f"Template {template.name!r} has no revision {number} (1–{template.revision})."
                    )
            return diff_snapshots(by_number[revision_a], by_number[revision_b])

    # --- changes -------------------------------------------------------------------------------

    def create_template(
        self, name: str, spec: TemplateSpec, *, comment: str = "", given_order: bool = False
    ) -> TemplateInfo:
        """Create a template. App layers get the default priority: older layers lowest, the newest
        layer highest (the admin reorders with :meth:`set_priority`); with ``given_order`` they get the
        order of ``spec.apps`` instead, lowest first (the console's wizard sets the order before saving)."""
        with self._change(Operation.EDIT_TEMPLATES, "template.create", "image template", name, comment) as change:
            name = validate_name(name, "template name")
            session = change.session
            self._refuse_duplicate(session, name)
            template = ImageTemplate(
                name=name, created_at=self._now(), created_by=self.caller.username, revision=0
            )
            self._apply_spec(session, template, spec, keep_order=False, given_order=given_order)
            session.add(template)
            self._save_revision(session, template, change_comment=comment)
            change.details = {"revision": template.revision, "template": snapshot(template)}
            return template_info(template)

    def update_template(
        self, name: str, spec: TemplateSpec, *, comment: str = "", given_order: bool = False
    ) -> TemplateInfo:
        """Replace the template's content with ``spec``; app layers it already had keep their order,
        added ones go on top (newest layer highest). With ``given_order`` the app layers get the order of
        ``spec.apps`` instead, lowest first: one revision for content and order together."""
        with self._change(Operation.EDIT_TEMPLATES, "template.update", "image template", name, comment) as change:
            session = change.session
            template = find_template(session, name)
            before = snapshot(template)
            self._apply_spec(session, template, spec, keep_order=True, given_order=given_order)
            after = snapshot(template)
            if after == before:
                raise ValidationError(f"Nothing to save: template {template.name!r} already looks like this.")
            self._save_revision(session, template, change_comment=comment)
            change.object_name = template.name
            change.details = {
                "revision": template.revision,
                "changes": {c.field: [c.before, c.after] for c in diff_snapshots(before, after)},
            }
            return template_info(template)

    def rename_template(self, name: str, new_name: str, *, comment: str = "") -> TemplateInfo:
        with self._change(Operation.EDIT_TEMPLATES, "template.rename", "image template", name, comment) as change:
            session = change.session
            template = find_template(session, name)
            new_name = validate_name(new_name, "template name")
            if new_name.casefold() != template.name.casefold():
                self._refuse_duplicate(session, new_name)
            elif new_name == template.name:
                raise ValidationError(f"Template {template.name!r} already has that name.")
            change.details = {"name": [template.name, new_name]}
            template.name = new_name
            self._save_revision(session, template, change_comment=comment)
            return template_info(template)

    def set_priority(self, name: str, app_layers: Sequence[str], *, comment: str = "") -> TemplateInfo:
        """Reorder the template's app layers; ``app_layers`` lists every one of them, lowest first."""
        with self._change(Operation.EDIT_TEMPLATES, "template.priority", "image template", name, comment) as change:
            session = change.session
            template = find_template(session, name)
            current = {entry.version.layer.name.casefold(): entry for entry in template.app_layers}
            given: list[str] = []
            for ref in app_layers:
                layer_name = ref.partition(":")[0].strip()
                if layer_name.casefold() in {g.casefold() for g in given}:
                    raise ValidationError(f"The priority list names app layer {layer_name!r} twice.")
                if layer_name.casefold() not in current:
                    raise ValidationError(
                        f"App layer {layer_name!r} is not in template {template.name!r} "
                        f"(its app layers: {', '.join(e.version.layer.name for e in template.app_layers) or 'none'})."
                    )
                given.append(layer_name)
            missing = [e.version.layer.name for e in template.app_layers if e.version.layer.name.casefold()
                       not in {g.casefold() for g in given}]
            if missing:
                raise ValidationError(
                    "The priority list must name every app layer of the template; it leaves out "
                    + ", ".join(repr(m) for m in missing) + "."
                )
            before = snapshot(template)["apps"]
            ordered = [current[g.casefold()] for g in given]
            self._reorder(session, template, ordered)
            after = snapshot(template)["apps"]
            if after == before:
                raise ValidationError(f"Template {template.name!r} already has this priority order.")
            self._save_revision(session, template, change_comment=comment)
            change.object_name = template.name
            change.details = {"apps": [before, after], "revision": template.revision}
            return template_info(template)

    def clone_template(self, name: str, new_name: str, *, comment: str = "") -> TemplateInfo:
        with self._change(Operation.EDIT_TEMPLATES, "template.clone", "image template", new_name, comment) as change:
            session = change.session
            source = find_template(session, name)
            new_name = validate_name(new_name, "template name")
            self._refuse_duplicate(session, new_name)
            clone = ImageTemplate(
                name=new_name,
                description=source.description,
                icon=source.icon,
                os_version=source.os_version,
                platform_version=source.platform_version,
                connector=source.connector,
                disk_format=source.disk_format,
                size_gb=source.size_gb,
                elastic_mode=source.elastic_mode,
                sysprep=source.sysprep,
                created_at=self._now(),
                created_by=self.caller.username,
                revision=0,
                app_layers=[
                    TemplateAppLayer(layer_id=e.layer_id, version=e.version, priority=e.priority)
                    for e in source.app_layers
                ],
            )
            session.add(clone)
            self._save_revision(session, clone, change_comment=comment or f"cloned from {source.name}")
            change.details = {"cloned_from": source.name, "source_revision": source.revision}
            return template_info(clone)

    def delete_template(self, name: str, *, comment: str = "") -> None:
        with self._change(Operation.EDIT_TEMPLATES, "template.delete", "image template", name, comment) as change:
            template = find_template(change.session, name)
            change.object_name = template.name
            change.details = {"last_revision": template.revision, "template": snapshot(template)}
            change.session.delete(template)

    # --- helpers -------------------------------------------------------------------------------

    @staticmethod
    def _refuse_duplicate(session: Session, name: str) -> None:
        clash = session.scalars(select(ImageTemplate.name).where(ImageTemplate.name == name)).first()
        if clash is not None:
            raise Conflict(f"An image template named {clash!r} already exists (names ignore case).")

    def _save_revision(self, session: Session, template: ImageTemplate, *, change_comment: str) -> None:
        session.flush()
        session.refresh(template, ["app_layers"])
        template.revision += 1
        template.updated_at = self._now()
        template.revisions.append(
            TemplateRevision(
                revision=template.revision,
                saved_at=self._now(),
                saved_by=self.caller.username,
                comment=(change_comment or "").strip(),
                snapshot=snapshot(template),
            )
        )
        session.flush()

    @staticmethod
    def _reorder(session: Session, template: ImageTemplate, ordered: Sequence[TemplateAppLayer]) -> None:
        # Two passes keep the (template, priority) unique constraint satisfied at every statement.
        for index, entry in enumerate(ordered):
            entry.priority = -1 - index
        session.flush()
        for index, entry in enumerate(ordered):
            entry.priority = index
        session.flush()
        # The loaded collection keeps its old order until reloaded; snapshots read it.
        session.refresh(template, ["app_layers"])

    def _apply_spec(
        self, session: Session, template: ImageTemplate, spec: TemplateSpec, *, keep_order: bool,
        given_order: bool = False,
    ) -> None:
        template.description = validate_description(spec.description)
        template.icon = validate_name(spec.icon, "icon file name", max_length=260) if spec.icon else None
        template.disk_format = choice(DiskFormat, spec.disk_format, "disk format")
        size = spec.size_gb
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_SIZE_GB:
            raise ValidationError(
                f"The disk size must be a whole number of GB from 1 to {MAX_SIZE_GB}; got {size!r}.",
                field="size_gb",
            )
        template.size_gb = size
        template.elastic_mode = choice(ElasticMode, spec.elastic_mode, "elastic layering mode")
        template.sysprep = choice(SysprepMode, spec.sysprep, "sysprep mode")

        os_version = self._usable_version(session, spec.os, LayerType.OS, "OS layer")
        template.os_version = os_version
        os_layer = os_version.layer

        if spec.platform:
            platform = self._usable_version(session, spec.platform, LayerType.PLATFORM, "platform layer")
            if platform.layer.os_layer_id != os_layer.id:
                raise ValidationError(
                    f"Platform layer {platform.layer.name!r} is bound to OS layer "
                    f"{platform.layer.os_layer.name if platform.layer.os_layer else '?'!r}, but the template "
                    f"uses OS layer {os_layer.name!r}."
                )
            template.platform_version = platform
        else:
            template.platform_version = None

        if spec.connector:
            connector = session.scalars(
                select(ConnectorConfig).where(ConnectorConfig.name == spec.connector)
            ).one_or_none()
            if connector is None:
                raise NotFound(f"There is no connector configuration named {spec.connector!r}.")
            template.connector = connector
        else:
            template.connector = None

        check_unique([ref.partition(":")[0].strip() for ref in spec.apps], "The app layer list")
        versions: list[LayerVersion] = []
        for ref in spec.apps:
            version = self._usable_version(session, ref, LayerType.APP, "app layer")
            if version.layer.os_layer_id != os_layer.id:
                raise ValidationError(
                    f"App layer {version.layer.name!r} is bound to OS layer "
                    f"{version.layer.os_layer.name if version.layer.os_layer else '?'!r}, but the template "
                    f"uses OS layer {os_layer.name!r}."
                )
            versions.append(version)

        existing = {entry.layer_id: entry for entry in template.app_layers}
        kept: list[TemplateAppLayer] = []
        added: list[LayerVersion] = []
        for version in versions:
            if keep_order and version.layer_id in existing:
                entry = existing.pop(version.layer_id)
                entry.version = version
                kept.append(entry)
            else:
                added.append(version)
        kept.sort(key=lambda e: e.priority)
        # Default priority: the newest layer wins.
        added.sort(key=lambda v: (v.layer.created_at, v.layer_id))
        for entry in existing.values():
            template.app_layers.remove(entry)
        if template.id is not None:
            session.flush()
        new_entries = [
            TemplateAppLayer(layer_id=v.layer_id, version=v, priority=10_000 + i) for i, v in enumerate(added)
        ]
        template.app_layers.extend(new_entries)
        ordered = kept + new_entries
        if given_order:
            position = {v.layer_id: i for i, v in enumerate(versions)}
            ordered.sort(key=lambda e: position[e.layer_id])
        if template.id is not None:
            session.flush()
            self._reorder(session, template, ordered)
        else:
            for index, entry in enumerate(ordered):
                entry.priority = index

    @staticmethod
    def _usable_version(session: Session, ref: str, expected: LayerType, what: str) -> LayerVersion:
        version = find_version(session, ref)
        if version.layer.type is not expected:
            raise ValidationError(
                f"{version.layer.name!r} is a {version.layer.type.value} layer, not an {what}."
                if expected is not LayerType.PLATFORM
                else f"{version.layer.name!r} is a {version.layer.type.value} layer, not a platform layer."
            )
        if version.state is VersionState.BROKEN:
            raise ValidationError(
                f"{version.qualified_name} is broken ({version.state_reason or 'no reason given'}); "
                "choose another version."
            )
        return version
