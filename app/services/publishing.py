"""Publishing: what a template's image is made of (the plan) and the record of every published image.

The compositing engine turns a :class:`PublishPlan` into a disk; this service checks that the template
can be published, names the image ``<template>_<yyyy-mm-dd_hh-mm>``, and records what was built.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import select

from app.catalog.models import LayerVersion, PublishedImage, Task
from app.errors import Conflict, NotFound, ValidationError
from app.services.base import Service
from app.services.rbac import Operation
from app.services.templates import find_template, publish_blockers
from app.services.views import PublishedImageInfo, PublishPlan, StackEntry, to_jsonable


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


class PublishingService(Service):
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
