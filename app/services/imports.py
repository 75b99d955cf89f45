"""Importing a layer version: check everything, create the version, capture it in a child process.

:meth:`ImportService.start_import` checks the caller's roles, the source (its kind, its whiteouts, the
WIM image) and the ``.reg`` files before anything is created; then it adds the version (``editing``,
audited) and submits a :class:`LayerImportTask`. The task runs :func:`app.engine.importer.import_worker`
in a child process and, when the version is stored, records its size and manifest checksum and moves it
``editing`` → ``finalizing`` → ``deployable`` through :class:`LayerService` (each step audited). When the
capture fails or is cancelled, the task removes whatever reached the repository and deletes the version
again (audited, with the reason as its comment): a failed or cancelled import leaves nothing behind.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from app.catalog.models import LayerType, LayerVersion, VersionState
from app.engine.importer import ImportSourceError, inspect_difference, inspect_source, read_registry_files
from app.engine.registry.delta import RegistryDelta
from app.engine.repository import CaptureSource, LayerRepository
from app.errors import NotFound, PermissionDenied
from app.services.base import Service, ServiceContext, find_layer
from app.services.layers import LayerService
from app.services.rbac import LAYER_OPERATION, Operation
from app.services.validation import COMMENT_LENGTH, validate_comment
from app.tasks.base import TaskCanceled, TaskContext, TaskResult
from app.tasks.worker import SubprocessTask

if TYPE_CHECKING:  # app.tasks.runner imports app.services: a module-level import here would be circular
    from app.tasks.runner import TaskRunner

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerImportResult(TaskResult):
    """What a finished import stored."""

    layer: str = ""
    version: str = ""
    version_id: int = 0
    image: str = ""
    checksum: str = ""
    files: int = 0
    data_bytes: int = 0
    #: The layer's WIM file after the import (all its versions, deduplicated).
    wim_bytes: int = 0
    deletions: int = 0
    registry_operations: int = 0


class LayerImportTask(SubprocessTask):
    """Captures one layer version in a child process, then finalizes it in the catalog (or undoes it)."""

    kind: ClassVar[str] = "layer.import"
    function: ClassVar[str] = "app.engine.importer:import_worker"

    def __init__(
        self, layers: LayerService, repository: LayerRepository, *, layer_id: int, version_id: int,
        qualified_name: str, source: CaptureSource, registry: RegistryDelta, comment: str = "",
        keep_boot: bool = False,
    ) -> None:
        difference = f" as the difference from {source.base}" if source.base is not None else ""
        super().__init__(f"Import {qualified_name} from {source.path}{difference}")
        self._layers = layers
        self._repository = repository
        self.layer_id = layer_id
        self.version_id = version_id
        self.qualified_name = qualified_name
        self.source = source
        self.registry = registry
        self.comment = comment
        #: An OS layer keeps a disk image's layout, boot partitions and boot code, so its images can boot.
        self.keep_boot = keep_boot

    def arguments(self) -> dict[str, Any]:
        return {
            "repository": str(self._repository.root),
            "layer_id": self.layer_id,
            "version_id": self.version_id,
            "source": self.source.to_dict(),
            "registry": self.registry.to_dict(),
            "keep_boot": self.keep_boot,
            **({"work_dir": str(self.work_dir)} if self.work_dir is not None else {}),
        }

    @property
    def work_dir(self) -> Path | None:
        """Where a difference import copies its two volumes out (inside the repository, beside the layers'
        WIMs); the worker removes it, and :meth:`undo` too in case the worker was killed."""
        if self.source.base is None:
            return None
        return self._repository.layers / f".difference-{self.layer_id}-v{self.version_id}"

    def run(self, ctx: TaskContext) -> TaskResult:
        try:
            data = self.run_worker(ctx)
            ref = self._current_ref()
            if ref is None:
                raise NotFound(f"Version {self.qualified_name} was deleted while it was being imported.")
            self._layers.set_version_state(
                ref, VersionState.FINALIZING, size_bytes=int(data["data_bytes"]), checksum=str(data["checksum"]),
                comment=self.comment,
            )
            info = self._layers.set_version_state(ref, VersionState.DEPLOYABLE, comment=self.comment)
        except BaseException as exc:
            self.undo(exc, ctx)
            raise
        return LayerImportResult(
            summary=f"Imported {info.layer}:{info.name}: {data['files']} files, {data['data_bytes']} bytes.",
            layer=info.layer, version=info.name, version_id=info.id, image=str(data["image"]),
            checksum=str(data["checksum"]), files=int(data["files"]), data_bytes=int(data["data_bytes"]),
            wim_bytes=int(data["wim_bytes"]), deletions=int(data["deletions"]),
            registry_operations=int(data["registry_operations"]),
        )

    def discard(self) -> None:
        self.undo(TaskCanceled())

    def _current_ref(self) -> str | None:
        """``LAYER:VERSION`` as the catalog names the version now (a layer may be renamed meanwhile)."""
        with self._layers.catalog.read() as session:
            row = session.get(LayerVersion, self.version_id)
            return row.qualified_name if row is not None else None

    def undo(self, failure: BaseException, ctx: TaskContext | None = None) -> None:
        """Remove what the import stored and delete the version again (audited). If the repository
        cannot be cleaned, the version is marked broken instead, so the leftover stays explained."""
        why = "canceled" if isinstance(failure, TaskCanceled) else f"failed: {failure}"
        comment = f"Import {why}"[:COMMENT_LENGTH]
        ref = self._current_ref()
        if self.work_dir is not None:
            shutil.rmtree(self.work_dir, ignore_errors=True)
        try:
            self._repository.remove_version(self.layer_id, self.version_id)
        except Exception as exc:
            log.exception("cannot remove the partly imported %s from the repository", self.qualified_name)
            if ctx is not None:
                ctx.log(f"Could not remove what the import stored: {exc}", "ERROR")
            if ref is not None:
                try:
                    self._layers.set_version_state(
                        ref, VersionState.BROKEN, comment=comment,
                        reason=f"Import {why}; its partly stored data could not be removed: {exc}"[:COMMENT_LENGTH],
                    )
                except Exception:
                    log.exception("cannot mark %s broken", ref)
            return
        if ref is None:
            return
        try:
            self._layers.delete_version(ref, comment=comment)
        except NotFound:
            pass
        except Exception:
            log.exception("cannot delete the version %s of a failed import", ref)


class ImportService(Service):
    def __init__(self, ctx: ServiceContext, repository: LayerRepository) -> None:
        super().__init__(ctx)
        self.repository = repository
        self._layers = LayerService(ctx)

    def start_import(
        self,
        runner: TaskRunner,
        layer: str,
        version: str,
        source: Path | str,
        *,
        image: int | None = None,
        registry_files: Sequence[Path | str] = (),
        base: Path | str | None = None,
        comment: str = "",
    ) -> int:
        """Check the request, create version ``version`` of ``layer`` (``editing``) and start the task that
        imports ``source`` into it; returns the task id. Nothing is created when a check fails.

        ``base`` (app and platform layers): a disk image or NTFS volume image of the machine before a change;
        the version is then the difference from it to ``source`` (a disk image or NTFS volume image of the
        same machine after the change): new and changed files, deletions, and the hives' registry difference
        (:mod:`app.engine.difference`); ``registry_files`` still apply on top."""
        comment = validate_comment(comment)
        self._require(Operation.EDIT_ANY_LAYERS, layer, comment)
        with self._read() as session:
            row = find_layer(session, layer)
            layer_id, layer_name, layer_type = row.id, row.name, row.type
        self._require(LAYER_OPERATION[layer_type], layer_name, comment)
        self._require(Operation.RUN_TASKS, layer_name, comment)
        if base is not None and layer_type is LayerType.OS:
            raise ImportSourceError(f"{layer_name} is an OS layer: it is imported whole, never as a difference "
                                    "(--base is for app and platform layers).")
        captured = inspect_source(Path(source), image=image)
        if base is not None:
            captured = inspect_difference(captured, Path(base))
        registry = read_registry_files([Path(p) for p in registry_files])
        info = self._layers.add_version(layer_name, version, comment=comment)
        task = LayerImportTask(
            self._layers, self.repository, layer_id=layer_id, version_id=info.id,
            qualified_name=f"{info.layer}:{info.name}", source=captured, registry=registry, comment=comment,
            keep_boot=layer_type is LayerType.OS,
        )
        try:
            return runner.submit(task)
        except BaseException as exc:
            task.undo(exc)
            raise

    def _require(self, operation: Operation, layer: str, comment: str) -> None:
        try:
            self.caller.require(operation)
        except PermissionDenied as exc:
            self._audit_denied("layer.import", "layer", layer, comment, str(exc))
            raise
