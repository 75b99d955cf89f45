"""Publishing: what a template's image is made of (the plan) and the record of every published image.

The compositing engine turns a :class:`PublishPlan` into a disk; this service checks that the template
can be published, names the image ``<template>_<yyyy-mm-dd_hh-mm>``, and records what was built.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from app.catalog.models import DiskFormat, LayerType, LayerVersion, PublishedImage, Task
from app.errors import Conflict, EnvironmentProblem, NotFound, PermissionDenied, UserError, ValidationError
from app.paths import Home
from app.services.base import Service, ServiceContext, find_version
from app.services.rbac import Operation
from app.services.settings import read_setting
from app.services.templates import find_template, publish_blockers
from app.services.validation import validate_comment
from app.services.views import PublishedImageInfo, PublishPlan, StackEntry, to_jsonable

if TYPE_CHECKING:  # imported when used: listing and planning never need the engine or the task runner
    from app.engine.compose import Conflict as LayerConflict
    from app.engine.compose import StackLayer
    from app.tasks.runner import TaskRunner

#: The engine's output format for each template disk format (VHD dynamic, VMDK monolithicSparse: the
#: streamOptimized VMDK is single-threaded zlib and several times slower, DESIGN.md §4).
ENGINE_FORMATS: Mapping[DiskFormat, str] = {
    DiskFormat.VHD: "vhd-dynamic",
    DiskFormat.VHDX: "vhdx",
    DiskFormat.VMDK: "vmdk-sparse",
    DiskFormat.QCOW2: "qcow2",
    DiskFormat.RAW: "raw",
    DiskFormat.WIM: "wim",
}


@dataclass(frozen=True)
class ConflictPreview:
    """The conflict report of a layer stack that need not be saved as a template yet."""

    #: Every contested file path and registry value, as :meth:`PublishingService.conflicts` reports them.
    conflicts: tuple[LayerConflict, ...]
    #: The stack's layer versions whose content is not in the repository, each with why. The report
    #: compares the layers' content, so it is empty while this is not.
    missing_content: tuple[str, ...] = ()


def _entry(role: str, version: LayerVersion, priority: int | None) -> StackEntry:
    return StackEntry(
        role=role,
        layer=version.layer.name,
        version=version.name,
        version_id=version.id,
        priority=priority,
        size_bytes=version.size_bytes,
        checksum=version.checksum,
    )


def _info(row: PublishedImage) -> PublishedImageInfo:
    return PublishedImageInfo(
        id=row.id,
        name=row.name,
        template=row.template_name,
        template_revision=row.template_revision,
        disk_format=row.disk_format,
        size_bytes=row.size_bytes,
        checksum=row.checksum,
        location=row.location,
        layers=tuple(row.layers),
        conflict_count=len(row.conflict_report or []),
        created_at=row.created_at,
        created_by=row.created_by,
    )


@dataclass(frozen=True)
class ImageCheck:
    """A published image's file whose checksum matches the one recorded."""

    name: str
    path: str
    checksum: str


class PublishingService(Service):
    def __init__(self, ctx: ServiceContext, home: Home | None = None) -> None:
        super().__init__(ctx)
        self.home = home

    def _home(self) -> Home:
        if self.home is None:
            raise UserError("This publishing service has no LayerDesk home, so it cannot reach the layer repository.")
        return self.home

    def plan(self, template_name: str) -> PublishPlan:
        """The layer stack to composite, bottom (OS) to top (platform), and the image's name.

        Refused, naming every reason, when a layer version is not deployable.
        """
        self.caller.require(Operation.PUBLISH_IMAGES)
        with self.catalog.read() as session:
            template = find_template(session, template_name)
            blockers = publish_blockers(template)
            if blockers:
                raise Conflict(f"Template {template.name!r} cannot be published yet: " + "; ".join(blockers) + ".")
            stack = [_entry("os", template.os_version, None)]
            stack.extend(_entry("app", e.version, e.priority) for e in template.app_layers)
            if template.platform_version is not None:
                stack.append(_entry("platform", template.platform_version, None))
            stamp = self._now().strftime("%Y-%m-%d_%H-%M")
            return PublishPlan(
                template=template.name,
                template_revision=template.revision,
                image_name=f"{template.name}_{stamp}",
                disk_format=template.disk_format,
                size_gb=template.size_gb,
                stack=tuple(stack),
                connector=template.connector.name if template.connector else None,
            )

    def record_image(
        self,
        plan: PublishPlan,
        *,
        size_bytes: int,
        checksum: str,
        location: str,
        conflict_report: Sequence[dict[str, Any]] = (),
        task_id: int | None = None,
        comment: str = "",
    ) -> PublishedImageInfo:
        """Record an image the engine built from ``plan``."""
        with self._change(
            Operation.PUBLISH_IMAGES, "image.publish", "published image", plan.image_name, comment
        ) as change:
            session = change.session
            if size_bytes < 0:
                raise ValidationError("An image's size cannot be negative.")
            if session.scalars(select(PublishedImage.id).where(PublishedImage.name == plan.image_name)).first():
                raise Conflict(
                    f"An image named {plan.image_name!r} was already published this minute; publish again "
                    "in a minute or delete the earlier record."
                )
            template = find_template(session, plan.template)
            if task_id is not None and session.get(Task, task_id) is None:
                raise NotFound(f"There is no task {task_id}.")
            row = PublishedImage(
                name=plan.image_name,
                template_id=template.id,
                template_name=plan.template,
                template_revision=plan.template_revision,
                disk_format=plan.disk_format,
                size_bytes=size_bytes,
                checksum=checksum,
                location=location,
                layers=[to_jsonable(entry) for entry in plan.stack],
                conflict_report=list(conflict_report),
                task_id=task_id,
                created_at=self._now(),
                created_by=self.caller.username,
            )
            session.add(row)
            session.flush()
            change.details = {"template": plan.template, "revision": plan.template_revision, "location": location}
            return _info(row)

    def list_images(self, template_name: str | None = None) -> list[PublishedImageInfo]:
        """Newest first, optionally of one template (also after the template was deleted)."""
        with self._read() as session:
            query = select(PublishedImage).order_by(PublishedImage.created_at.desc(), PublishedImage.id.desc())
            if template_name:
                # Template names ignore case, as everywhere in the catalog (the column has no NOCASE).
                query = query.where(PublishedImage.template_name.collate("NOCASE") == template_name)
            return [_info(row) for row in session.scalars(query)]

    def delete_image_record(self, name: str, *, comment: str = "") -> None:
        """Forget a published image (the disk at its location is left alone)."""
        with self._change(Operation.PUBLISH_IMAGES, "image.delete", "published image", name, comment) as change:
            row = change.session.scalars(select(PublishedImage).where(PublishedImage.name == name)).one_or_none()
            if row is None:
                raise NotFound(f"There is no published image named {name!r}.")
            change.details = {"location": row.location, "checksum": row.checksum}
            change.session.delete(row)

    def verify_image(self, name: str, path: str | None = None) -> ImageCheck:
        """Check a published image's file (at its recorded location, or ``path``: a copy of it) against the
        checksum recorded when it was published; :class:`UserError` when they differ (a damaged copy, or
        another image). Reads every byte of the file. Open to every role."""
        from app.engine.checksum import checksum_like

        self.caller.require(Operation.READ)
        with self._read() as session:
            row = session.scalars(select(PublishedImage).where(PublishedImage.name == name)).one_or_none()
            if row is None:
                raise NotFound(f"There is no published image named {name!r}.")
            recorded, location = row.checksum, row.location
        if not recorded:
            raise UserError(f"Image {name} has no checksum on record, so it cannot be verified.")
        file = Path(path) if path else Path(location)
        if not file.is_file():
            where = "is not a file on this machine" if not path else "is not a file"
            raise UserError(f"{file} {where}; give the path of a copy of image {name} with --path.")
        try:
            actual = checksum_like(file, recorded)
        except ValueError as exc:
            raise UserError(f"Image {name}'s checksum on record ({recorded}) is of a kind this version of "
                            f"LayerDesk does not know: {exc}.") from None
        except OSError as exc:
            raise UserError(f"Cannot read {file}: {exc.strerror or exc}.") from None
        if actual != recorded:
            raise UserError(f"{file} is not image {name} as it was published: its checksum is {actual}, the image "
                            f"was published with {recorded}. The file is damaged or holds another image.")
        return ImageCheck(name, str(file), recorded)

    # --- compositing ---------------------------------------------------------------------------

    def _engine_stack(self, plan: PublishPlan) -> list[StackLayer]:
        from app.engine.compose import StackLayer

        with self.catalog.read() as session:
            stack = []
            for entry in plan.stack:
                row = session.get(LayerVersion, entry.version_id)
                if row is None:
                    raise NotFound(f"Layer version {entry.layer}:{entry.version} was deleted meanwhile.")
                stack.append(StackLayer(entry.role, entry.layer, row.layer_id, row.id, row.checksum))
            return stack

    def conflicts(self, template_name: str) -> list[LayerConflict]:
        """Every file path and registry value more than one layer of the template supplies, which layers
        supplied it (lowest priority first) and which wins (see :func:`app.engine.compose.conflicts`).
        Computed from the layers' listings and manifests; nothing is written. Open to every role."""
        from app.engine.compose import conflicts
        from app.engine.repository import LayerRepository

        self.caller.require(Operation.READ)
        with self.catalog.read() as session:
            template = find_template(session, template_name)
            blockers = publish_blockers(template)
            if blockers:
                raise Conflict(f"The layers of template {template.name!r} cannot be compared yet: "
                               + "; ".join(blockers) + ".")
            name = template.name
        plan = self._plan_unchecked(name)
        return conflicts(self._engine_stack(plan), LayerRepository(self._home().repository))

    def preview_conflicts(
        self, os: str, apps: Sequence[str] = (), platform: str | None = None
    ) -> ConflictPreview:
        """The conflict report of the stack ``os`` + ``apps`` (``LAYER:VERSION`` refs, lowest priority first)
        + ``platform``, saved as a template or not (the console shows it while a template is edited or
        reordered). Versions without stored content are named in ``missing_content`` instead of failing.
        Nothing is written. Open to every role."""
        from app.engine.compose import StackLayer, conflicts
        from app.engine.repository import LayerRepository

        self.caller.require(Operation.READ)
        repository = LayerRepository(self._home().repository)
        wanted = [(os, LayerType.OS), *((ref, LayerType.APP) for ref in apps)]
        if platform:
            wanted.append((platform, LayerType.PLATFORM))
        stack: list[StackLayer] = []
        missing: list[str] = []
        with self.catalog.read() as session:
            for ref, kind in wanted:
                version = find_version(session, ref)
                if version.layer.type is not kind:
                    raise ValidationError(
                        f"{version.layer.name!r} is a {version.layer.type.value} layer, not the "
                        f"{kind.value} layer this stack needs there."
                    )
                if not version.checksum or not repository.manifest_path(version.layer_id, version.id).exists():
                    missing.append(f"{version.qualified_name} ({version.state.value}) has no content in the layer "
                                   "repository: import it first")
                stack.append(StackLayer(kind.value, version.layer.name, version.layer_id, version.id, version.checksum))
        if missing:
            return ConflictPreview((), tuple(missing))
        return ConflictPreview(tuple(conflicts(stack, repository)))

    def _plan_unchecked(self, template_name: str) -> PublishPlan:
        """:meth:`plan` without the publish role (for read-only views of the stack)."""
        with self.catalog.read() as session:
            template = find_template(session, template_name)
            stack = [_entry("os", template.os_version, None)]
            stack.extend(_entry("app", e.version, e.priority) for e in template.app_layers)
            if template.platform_version is not None:
                stack.append(_entry("platform", template.platform_version, None))
            return PublishPlan(
                template=template.name, template_revision=template.revision, image_name=template.name,
                disk_format=template.disk_format, size_gb=template.size_gb, stack=tuple(stack),
                connector=template.connector.name if template.connector else None,
            )

    def _require(self, operation: Operation, template: str, comment: str) -> None:
        try:
            self.caller.require(operation)
        except PermissionDenied as exc:
            self._audit_denied("image.publish", "published image", template, comment, str(exc))
            raise

    @staticmethod
    def _require_tools(fmt: str) -> None:
        """Refuse now, not halfway through compositing, when a tool this format needs is missing."""
        from app.engine.toolcheck import engine_tools, publish_tools, unavailable

        missing = unavailable(engine_tools(), f"Publishing a {fmt} image", publish_tools(fmt))
        if missing is not None:
            raise EnvironmentProblem(missing.message())

    def publish(
        self, runner: TaskRunner, template: str, output_dir: Path | str | None = None, *, comment: str = "",
        connector: str | None = None,
    ) -> int:
        """Start publishing ``template``'s image as a task; returns the task id.

        The image is written to ``<output_dir>/<image name>.<ext>`` (default folder: ``published`` in the
        LayerDesk home) and recorded when complete (:meth:`record_image`, audited). Refused before anything
        is written when a layer version is not deployable, the caller may not publish or run tasks (the
        refusal is audited), or the file exists already. With ``connector`` (default: the template's own),
        the image is then delivered to it in the same task (refused now when that connector is incomplete).
        """
        from app.engine.compose import EXTENSIONS
        from app.engine.repository import LayerRepository
        from app.services.publish_task import PublishTask

        comment = validate_comment(comment)
        self._require(Operation.PUBLISH_IMAGES, template, comment)
        self._require(Operation.RUN_TASKS, template, comment)
        plan = self.plan(template)
        fmt = ENGINE_FORMATS[plan.disk_format]
        self._require_tools(fmt)
        stack = self._engine_stack(plan)
        folder = Path(output_dir) if output_dir is not None else self._home().root / "published"
        if folder.exists() and not folder.is_dir():
            raise ValidationError(f"The output path {folder} is a file, not a folder.")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"Cannot create the output folder {folder}: {exc.strerror or exc}.") from None
        target = folder / f"{plan.image_name}.{EXTENSIONS[fmt]}"
        if target.exists():
            raise Conflict(f"{target} already exists; publish again in a minute or move it away.")
        with self._read() as session:
            cache_gb = int(read_setting(session, "layer_cache_gb"))
        delivery = None
        if connector or plan.connector:
            from app.services.connectors import ConnectorService

            delivery = ConnectorService(self._ctx).delivery(connector or str(plan.connector))
        task = PublishTask(self, LayerRepository(self._home().repository), plan, stack, folder.absolute(), fmt,
                           comment=comment, cache_dir=self._home().layer_cache, cache_bytes=cache_gb * 1024**3,
                           delivery=delivery)
        return runner.submit(task)
