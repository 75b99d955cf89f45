"""Publishing a template's image: the task that composites it in a child process and records it.

:meth:`app.services.publishing.PublishingService.publish` checks the request (roles, a deployable
stack, the output folder, a free output name) and submits a :class:`PublishTask`. The task runs
:func:`app.engine.compose.compose_worker` in a child process, which writes ``<image name>.<ext>`` into the
output folder only when the image is complete and verified; then the task records the
:class:`~app.catalog.models.PublishedImage` (size, SHA-256 of the file, location, layer versions and the
conflict report; audited). A failed or cancelled publish leaves no output file and no record: the work
folder and any output the child left are removed here as well, in case the child was killed.

With a connector (the template's, or one named for this publish), the recorded image is then handed to it
in the same task (:class:`app.services.connectors.ConnectorDelivery`: progress, cancel, audited). A
delivery that fails or is cancelled leaves nothing at the destination; the image stays published here.
"""

from __future__ import annotations

import logging
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from app.engine.compose import EXTENSIONS, StackLayer
from app.engine.repository import LayerRepository
from app.errors import LayerDeskError
from app.tasks.base import ProgressSpan, TaskContext, TaskResult
from app.tasks.worker import SubprocessTask

if TYPE_CHECKING:
    from app.services.connectors import ConnectorDelivery
    from app.services.publishing import PublishingService
    from app.services.views import PublishPlan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PublishResult(TaskResult):
    """What a finished publish wrote and recorded."""

    image: str = ""
    path: str = ""
    format: str = ""
    size_bytes: int = 0
    checksum: str = ""
    files: int = 0
    conflicts: int = 0
    manifest_digest: str = ""
    seconds: float = 0.0
    #: The connector the image was delivered to, where it went there and the destination's ids.
    connector: str = ""
    delivered_to: str = ""
    delivery_ids: dict[str, str] = field(default_factory=dict)


class PublishTask(SubprocessTask):
    """Composites one template's image in a child process, then records it (or leaves nothing behind)."""

    kind: ClassVar[str] = "image.publish"
    function: ClassVar[str] = "app.engine.compose:compose_worker"

    def __init__(
        self, publishing: PublishingService, repository: LayerRepository, plan: PublishPlan,
        stack: list[StackLayer], output_dir: Path, fmt: str, *, comment: str = "", cache_dir: Path | None = None,
        cache_bytes: int = 0, delivery: ConnectorDelivery | None = None,
    ) -> None:
        super().__init__(f"Publish {plan.image_name} from template {plan.template}")
        self._publishing = publishing
        self._repository = repository
        self.plan = plan
        self.stack = stack
        self.output_dir = output_dir
        self.format = fmt
        self.comment = comment
        #: The layer disk cache (its folder and bound in bytes); none: every layer is staged for this publish.
        self.cache_dir = cache_dir
        self.cache_bytes = cache_bytes
        self.work_dir = output_dir / f".{plan.image_name}.{secrets.token_hex(4)}.work"
        self._produced = False
        self.delivery = delivery

    @property
    def output_path(self) -> Path:
        return self.output_dir / f"{self.plan.image_name}.{EXTENSIONS[self.format]}"

    def arguments(self) -> dict[str, Any]:
        return {
            "repository": str(self._repository.root),
            "stack": [layer.to_dict() for layer in self.stack],
            "out_dir": str(self.output_dir),
            "format": self.format,
            "size_gb": self.plan.size_gb,
            "name": self.plan.image_name,
            "work_dir": str(self.work_dir),
            "cache_dir": str(self.cache_dir) if self.cache_dir is not None else None,
            "cache_bytes": self.cache_bytes,
        }

    def run(self, ctx: TaskContext) -> TaskResult:
        try:
            # With a delivery to follow, compositing is the first 70 % of the task's progress.
            data = self.run_worker(ctx if self.delivery is None else ProgressSpan(ctx, 0.0, 70.0))
            self._produced = True
            path = Path(str(data["path"]))
            if path != self.output_path or not path.is_file():
                raise RuntimeError(f"the publish worker reported {path}, expected {self.output_path}")
            info = self._publishing.record_image(
                self.plan, size_bytes=int(data["size_bytes"]), checksum=str(data["checksum"]), location=str(path),
                conflict_report=list(data["conflicts"]), task_id=ctx.task_id, comment=self.comment,
            )
        except BaseException:
            self.clean_up()
            raise
        ctx.log(f"Recorded published image {info.name} at {path}.")
        summary = f"Published {info.name} ({self.format}, {data['size_bytes']} bytes) to {path}."
        delivered = None
        if self.delivery is not None:
            try:
                delivered = self.delivery.deliver(ProgressSpan(ctx, 70.0, 100.0), path, self.plan, info,
                                                  comment=self.comment)
            except LayerDeskError as exc:
                raise type(exc)(f"{info.name} was published to {path}, but not delivered to connector "
                                f"{self.delivery.name}: {exc}") from None
            summary += f" Delivered to {delivered.location}."
        return PublishResult(
            summary=summary,
            image=info.name, path=str(path), format=self.format, size_bytes=int(data["size_bytes"]),
            checksum=str(data["checksum"]), files=int(data["files"]), conflicts=len(data["conflicts"]),
            manifest_digest=str(data["manifest_digest"]), seconds=float(data["seconds"]),
            connector=delivered.connector if delivered else "", delivered_to=delivered.location if delivered else "",
            delivery_ids=dict(delivered.ids) if delivered else {},
        )

    def clean_up(self) -> None:
        """Remove what a failed, cancelled or killed publish left in the output folder: its work folder, and
        its image if the child wrote it but it could not be recorded."""
        shutil.rmtree(self.work_dir, ignore_errors=True)
        if self._produced:
            try:
                self.output_path.unlink(missing_ok=True)
            except OSError:
                log.exception("cannot remove %s after a failed publish", self.output_path)
