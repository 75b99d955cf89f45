r"""Moving layers between installations, and a layer version as a layer disk: the service and its tasks.

* :meth:`TransferService.start_export` writes the chosen layers (all by default) into an export folder
  (:mod:`app.engine.transfer`), local or ``\\HOST\SHARE[\folder]``; an app or platform layer brings its OS
  layer (its newest deployable version, unless that layer was chosen itself) and its versions'
  prerequisites. A version the folder already holds with the same content checksum is not copied again.
  :meth:`TransferService.start_sync` exports everything and drops from the folder what this installation
  no longer has: after it, the folder mirrors the catalog, and only what changed since the last sync
  was copied (the state is the folder's own manifest: its checksums are compared with ours).
* :meth:`TransferService.preview_import` says what an import would do: which layers and versions are
  new, already here (same name, same content checksum) or in conflict (same name, other content, or a
  layer of another type or OS layer); :meth:`TransferService.start_import` copies the new versions' objects
  into a work folder and verifies **every** checksum before anything enters the catalog or the
  repository, then creates the layers and versions (audited), stores them, and gives them their
  exported state. A conflict is reported, never overwritten. A failed or cancelled import leaves
  nothing behind.
* :meth:`TransferService.start_layer_disk_export` writes one version as a layer disk (VHDX/VHD).

Share passwords are handed to the task in memory only: never stored, logged or put in a message.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from sqlalchemy import select

from app.catalog.models import AuditEntry, AuditOutcome, Layer, LayerType, LayerVersion, TaskState, VersionState
from app.elastic.sync import ShareLocation, ShareSession, parse_share
from app.engine import transfer as engine
from app.engine.layer_disk import LAYER_DISK_FORMATS, LayerDiskFormat, write_layer_disk
from app.engine.repository import LayerRepository
from app.engine.transfer import (
    MANIFEST_FILE,
    OBJECTS,
    ExportedLayer,
    ExportedVersion,
    ExportManifest,
    ExportTarget,
    FolderTarget,
    StagedVersion,
    TransferError,
)
from app.errors import LayerDeskError, NotFound, PermissionDenied, ValidationError
from app.paths import Home
from app.procs import Cancellable
from app.services.base import Service, ServiceContext, find_layer, find_version, split_qualified
from app.services.rbac import LAYER_OPERATION, Operation
from app.services.validation import COMMENT_LENGTH, validate_comment
from app.tasks.base import LayerDeskTask, TaskCanceled, TaskContext, TaskResult

if TYPE_CHECKING:
    from app.services import Services
    from app.tasks.runner import TaskRunner

log = logging.getLogger(__name__)

#: Versions that are exported: stored and not broken or still being edited.
_EXPORTED_STATES = (VersionState.DEPLOYABLE, VersionState.FINALIZING)


# --- where the export folder is ------------------------------------------------------------------------


class _ShareTarget(ShareSession):
    """An export folder on an SMB share (``ShareSession`` plus reading a file into a local one)."""

    def __init__(self, location: ShareLocation, username: str, password: str, *, port: int = 445) -> None:
        super().__init__(location, username, password, port=port)
        self.description = location.unc

    def _remote(self, relative: str) -> str:
        return relative.replace("/", "\\")

    def exists(self) -> bool:
        return True  # opening the session checked the share and folder

    def read(self, relative: str) -> bytes | None:
        return super().read(self._remote(relative))

    def size(self, relative: str) -> int | None:
        return super().size(self._remote(relative))

    def makedirs(self, relative: str) -> None:
        super().makedirs(self._remote(relative))

    def put(self, source: Path, relative: str, *, progress: Callable[[int], None] | None = None,
            cancel: Cancellable | None = None) -> None:
        try:
            self.upload(source, self._remote(relative), progress=progress, cancel=cancel)
        except LayerDeskError as exc:
            if cancel is not None and cancel.cancelled:
                raise TaskCanceled() from exc
            raise

    def get(self, relative: str, target: Path, *, progress: Callable[[int], None] | None = None,
            cancel: Cancellable | None = None) -> None:
        try:
            self.download(self._remote(relative), target, progress=progress, cancel=cancel)
        except NotFound:
            raise TransferError(f"The export folder {self.description} lacks {relative}: the export is "
                                "incomplete. Export again.") from None

    def replace(self, relative: str, data: bytes) -> None:
        self.write_atomic(self._remote(relative), data)

    def listdir(self, relative: str) -> list[str]:
        return sorted(super().listdir(self._remote(relative)))

    def remove(self, relative: str) -> None:
        super().remove(self._remote(relative))


@dataclass(frozen=True)
class Destination:
    r"""Where an export folder is: a local folder or ``\\HOST\SHARE[\folder]`` with the account to use."""

    path: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    port: int = 445

    @property
    def is_share(self) -> bool:
        return self.path.startswith(("\\\\", "//"))

    def open(self, *, create: bool) -> ExportTarget:
        """Open the folder (``create``: make it when missing, for an export); :class:`TransferError` when it
        is not there."""
        if self.is_share:
            if not self.username:
                raise ValidationError("A share needs an account: give --user (and the password on stdin).",
                                      field="user")
            location = parse_share(self.path.replace("/", "\\"))
            if create and location.folder:
                with _ShareTarget(ShareLocation(location.server, location.share), self.username,
                                  self.password or "", port=self.port) as root:
                    root.makedirs(location.folder.replace("\\", "/"))
            return _ShareTarget(location, self.username, self.password or "", port=self.port)
        folder = Path(self.path).expanduser()
        if create:
            if not folder.parent.is_dir():
                raise TransferError(f"The folder {folder.parent} does not exist; create it or choose another "
                                    "destination.")
            folder.mkdir(exist_ok=True)
        elif not folder.is_dir():
            raise TransferError(f"The export folder {folder} does not exist.")
        return FolderTarget(folder)


# --- plans and results -----------------------------------------------------------------------------------

ImportAction = Literal["new", "here", "conflict"]


@dataclass(frozen=True)
class ImportItem:
    """What an import does with one exported version (``version`` empty: the layer itself)."""

    layer: str
    version: str
    action: ImportAction
    reason: str = ""
    size_bytes: int = 0
    #: The layer's type (``os``, ``platform``, ``app``) as the export has it.
    layer_type: str = ""


@dataclass(frozen=True)
class ImportPreview:
    source: str
    items: tuple[ImportItem, ...]

    @property
    def new(self) -> tuple[ImportItem, ...]:
        return tuple(i for i in self.items if i.action == "new")

    @property
    def conflicts(self) -> tuple[ImportItem, ...]:
        return tuple(i for i in self.items if i.action == "conflict")


@dataclass(frozen=True)
class TransferResult(TaskResult):
    """What an export, sync or import did."""

    where: str = ""
    #: ``LAYER:VERSION`` copied (export/sync) or imported.
    copied: tuple[str, ...] = ()
    #: Already at the destination with the same checksum.
    skipped: tuple[str, ...] = ()
    #: ``LAYER:VERSION: why`` not imported.
    conflicts: tuple[str, ...] = ()
    #: Export folder objects a sync removed (the versions are gone from this installation).
    removed: tuple[str, ...] = ()
    bytes_copied: int = 0


@dataclass(frozen=True)
class LayerDiskResult(TaskResult):
    path: str = ""
    layer: str = ""
    version: str = ""
    checksum: str = ""
    files: int = 0
    size_bytes: int = 0


@dataclass(frozen=True)
class _VersionRow:
    layer_id: int
    version_id: int
    name: str
    state: str
    comment: str
    created_at: datetime
    created_by: str
    prerequisites: tuple[str, ...]
    size_bytes: int
    checksum: str | None


@dataclass(frozen=True)
class _LayerRow:
    name: str
    type: str
    description: str
    icon: str | None
    os_layer: str | None
    versions: tuple[_VersionRow, ...]


class _Progress:
    """Maps bytes done onto 0–100 % of a task, with the current message."""

    def __init__(self, ctx: TaskContext, total: int) -> None:
        self.ctx, self.total, self.done = ctx, max(total, 1), 0

    def step(self, message: str) -> Callable[[int], None]:
        base = self.done

        def moved(done: int) -> None:
            self.ctx.progress(min(99.0, 100.0 * (base + done) / self.total), message)

        return moved

    def wim(self, message: str) -> Callable[[int, int], None]:
        moved = self.step(message)
        return lambda done, _total: moved(done)

    def advance(self, n: int) -> None:
        self.done += n


# --- the tasks ---------------------------------------------------------------------------------------


class TransferExportTask(LayerDeskTask):
    """Writes layers into an export folder; with ``mirror`` (a sync) also drops what is gone here."""

    kind: ClassVar[str] = "transfer.export"

    def __init__(self, service: TransferService, destination: Destination, layers: Sequence[_LayerRow], *,
                 mirror: bool, comment: str) -> None:
        super().__init__(f"{'Sync' if mirror else 'Export'} layers to {destination.path}")
        self._service, self.destination, self.layers = service, destination, tuple(layers)
        self.mirror, self.comment = mirror, comment

    def run(self, ctx: TaskContext) -> TaskResult:
        return self._service._run_export(self, ctx)


class TransferImportTask(LayerDeskTask):
    """Verifies and imports layers from an export folder; leaves nothing when it fails or is cancelled."""

    kind: ClassVar[str] = "transfer.import"

    def __init__(self, service: TransferService, source: Destination, layers: Sequence[str], *,
                 comment: str) -> None:
        super().__init__(f"Import layers from {source.path}")
        self._service, self.source, self.layers, self.comment = service, source, tuple(layers), comment

    def run(self, ctx: TaskContext) -> TaskResult:
        return self._service._run_import(self, ctx)


class LayerDiskExportTask(LayerDeskTask):
    kind: ClassVar[str] = "layer.export_disk"

    def __init__(self, service: TransferService, version: _VersionRow, layer: str, layer_type: str, out: Path,
                 fmt: LayerDiskFormat, comment: str) -> None:
        super().__init__(f"Write {layer}:{version.name} as the layer disk {out}")
        self._service, self.version, self.layer, self.layer_type = service, version, layer, layer_type
        self.out, self.fmt, self.comment = out, fmt, comment

    def run(self, ctx: TaskContext) -> TaskResult:
        return self._service._run_layer_disk(self, ctx)


# --- the service ----------------------------------------------------------------------------------------


class TransferService(Service):
    def __init__(self, ctx: ServiceContext, home: Home, repository: LayerRepository) -> None:
        super().__init__(ctx)
        self.home = home
        self.repository = repository

    @classmethod
    def for_services(cls, services: Services) -> TransferService:
        ctx = ServiceContext(catalog=services.catalog, caller=services.caller, secrets=services.secrets)
        return cls(ctx, services.home, LayerRepository(services.home.repository))

    @property
    def _work_parent(self) -> Path:
        """Work folders (objects being written or verified) live in the home, beside the repository."""
        return self.home.root / "transfer"

    # --- layer disks -------------------------------------------------------------------------------

    def start_layer_disk_export(self, runner: TaskRunner, ref: str, out: Path | str, *, comment: str = "") -> int:
        """Write version ``LAYER:VERSION`` as a layer disk ``out`` (``.vhdx``, or ``.vhd`` for a dynamic VHD)
        in a task; returns the task id. Refused at once when the version has no stored content or ``out``
        exists or its folder does not."""
        comment = validate_comment(comment)
        self._require(Operation.RUN_TASKS, "layer.export_disk", ref, comment)
        out = Path(out).absolute()
        suffix = out.suffix.lower()
        if suffix not in (".vhdx", ".vhd"):
            raise ValidationError(f"A layer disk is a .vhdx or .vhd file, not {out.name!r}.", field="to")
        fmt: LayerDiskFormat = "vhdx" if suffix == ".vhdx" else "vhd-dynamic"
        assert fmt in LAYER_DISK_FORMATS
        if out.exists():
            raise ValidationError(f"{out} already exists; a layer disk is never written over a file.", field="to")
        if not out.parent.is_dir():
            raise ValidationError(f"The folder {out.parent} does not exist.", field="to")
        with self._read() as session:
            version = find_version(session, ref, default_latest=False)
            if version.state not in _EXPORTED_STATES or not version.checksum:
                raise ValidationError(f"{version.qualified_name} is {version.state.value}: only stored, deployable "
                                      "or finalizing versions can be written as a layer disk.")
            row = _version_row(version)
            layer, layer_type = version.layer.name, version.layer.type.value
        return runner.submit(LayerDiskExportTask(self, row, layer, layer_type, out, fmt, comment))

    def _run_layer_disk(self, task: LayerDiskExportTask, ctx: TaskContext) -> TaskResult:
        v = task.version
        ctx.progress(1, "Checking the stored version")
        info = write_layer_disk(
            self.repository, v.layer_id, v.version_id, v.checksum, task.out, layer_name=task.layer,
            layer_type=task.layer_type, version_name=v.name, fmt=task.fmt,
            progress=lambda done, total: ctx.progress(min(95.0, 95.0 * done / max(total, 1)), "Writing the disk"),
            cancel=ctx.cancel,
        )
        with self._change(Operation.RUN_TASKS, "layer.export_disk", "layer version", f"{task.layer}:{v.name}",
                          task.comment) as change:
            change.details = {"path": str(task.out), "format": task.fmt, "checksum": info.checksum}
        return LayerDiskResult(
            summary=f"Wrote {task.layer}:{v.name} as the layer disk {task.out} ({info.files} files).",
            path=str(task.out), layer=task.layer, version=v.name, checksum=info.checksum, files=info.files,
            size_bytes=task.out.stat().st_size)

    # --- export and sync ---------------------------------------------------------------------------

    def start_export(self, runner: TaskRunner, destination: Destination, layers: Sequence[str] = (), *,
                     comment: str = "") -> int:
        """Export ``LAYER`` or ``LAYER:VERSION`` refs (none: every layer) into ``destination`` in a task;
        returns the task id. Unknown names are refused at once."""
        comment = validate_comment(comment)
        self._require(Operation.RUN_TASKS, "transfer.export", destination.path, comment)
        rows = self._export_selection(layers)
        if not any(layer.versions for layer in rows):
            raise ValidationError("There is nothing to export: no chosen layer has a stored (deployable or "
                                  "finalizing) version.")
        return runner.submit(TransferExportTask(self, destination, rows, mirror=False, comment=comment))

    def start_sync(self, runner: TaskRunner, destination: Destination, *, comment: str = "") -> int:
        """Bring ``destination`` up to date with every layer here, copying only what changed since the last
        export or sync; what this installation no longer has is dropped from it."""
        comment = validate_comment(comment)
        self._require(Operation.RUN_TASKS, "transfer.sync", destination.path, comment)
        return runner.submit(TransferExportTask(self, destination, self._export_selection(()), mirror=True,
                                                comment=comment))

    def _export_selection(self, refs: Sequence[str]) -> list[_LayerRow]:
        """The layers and versions to export: what ``refs`` names (all when empty), their OS layers (newest
        deployable version, unless chosen) and their versions' prerequisites."""
        with self._read() as session:
            chosen: dict[int, set[int] | None] = {}  # layer id → version ids (None: all exported states)
            if not refs:
                for layer in session.scalars(select(Layer).order_by(Layer.id)):
                    chosen[layer.id] = None
            for ref in refs:
                name, version_name = split_qualified(ref)
                layer = find_layer(session, name)
                if version_name is None:
                    chosen[layer.id] = None
                else:
                    version = find_version(session, ref, default_latest=False)
                    if version.state not in _EXPORTED_STATES or not version.checksum:
                        raise ValidationError(f"{version.qualified_name} is {version.state.value}: only stored, "
                                              "deployable or finalizing versions are exported.")
                    wanted = chosen.setdefault(layer.id, set())
                    if wanted is not None:
                        wanted.add(version.id)
            by_id = {layer.id: layer for layer in session.scalars(select(Layer))}

            def versions_of(layer_id: int) -> list[LayerVersion]:
                wanted = chosen.get(layer_id)
                return [v for v in by_id[layer_id].versions
                        if v.state in _EXPORTED_STATES and v.checksum and (wanted is None or v.id in wanted)]

            changed = True
            while changed:  # prerequisites and OS layers may bring further layers
                changed = False
                for layer_id in list(chosen):
                    layer = by_id[layer_id]
                    needs: list[tuple[int, int | None]] = []
                    if layer.os_layer_id is not None and layer.os_layer_id not in chosen:
                        os_versions = [v for v in by_id[layer.os_layer_id].versions
                                       if v.state is VersionState.DEPLOYABLE and v.checksum]
                        needs.append((layer.os_layer_id, os_versions[-1].id if os_versions else None))
                    for version in versions_of(layer_id):
                        needs.extend((p.layer_id, p.id) for p in version.prerequisites)
                    for need_layer, need_version in needs:
                        wanted = chosen.get(need_layer, set()) if need_layer in chosen else set()
                        if need_layer not in chosen:
                            chosen[need_layer] = wanted
                            changed = True
                        if wanted is not None and need_version is not None and need_version not in wanted:
                            wanted.add(need_version)
                            changed = True
            order = sorted(chosen, key=lambda i: ({LayerType.OS: 0, LayerType.PLATFORM: 1}.get(by_id[i].type, 2), i))
            return [_layer_row(by_id[i], versions_of(i)) for i in order]

    def _run_export(self, task: TransferExportTask, ctx: TaskContext) -> TaskResult:
        ctx.progress(0, f"Opening {task.destination.path}")
        target = task.destination.open(create=True)
        try:
            return self._export_into(target, task, ctx)
        finally:
            target.close()

    def _export_into(self, target: ExportTarget, task: TransferExportTask, ctx: TaskContext) -> TaskResult:
        try:
            previous = engine.read_manifest(target, required=False)
        except TransferError as exc:
            raise TransferError(f"{exc.message} It was left as it is; remove it or choose another folder.") from None
        previous = previous or ExportManifest()
        target.makedirs(OBJECTS)
        total = sum(v.size_bytes for layer in task.layers for v in layer.versions)
        progress = _Progress(ctx, total)
        copied: list[str] = []
        skipped: list[str] = []
        copied_bytes = 0
        exported: list[ExportedLayer] = []
        previous_versions = [v for layer in previous.layers for v in layer.versions]
        present: dict[str, tuple[engine.ExportedObject, ...]] = {}  # content checksum → its objects
        with engine.staging_folder(self._work_parent) as work:
            for layer in task.layers:
                versions: list[ExportedVersion] = []
                for v in layer.versions:
                    ctx.cancel.raise_if_cancelled()
                    ref = f"{layer.name}:{v.name}"
                    checksum = engine.stored_content_checksum(self.repository, v.layer_id, v.version_id, v.checksum,
                                                              ctx.cancel)
                    # Objects are named by content: a version whose content the folder already holds (as this
                    # version, or as another of the same content) is not written again – rewriting an object
                    # would change the bytes other manifest entries' SHA-256 describe.
                    there = present.get(checksum)
                    if there is None:
                        old = next((x for x in previous_versions if x.checksum == checksum), None)
                        if old is not None and all(target.size(o.path) == o.size for o in old.objects):
                            there = present[checksum] = old.objects
                    if there is not None:
                        versions.append(_exported_version(v, checksum, there))
                        skipped.append(ref)
                        ctx.log(f"{ref}: already in {target.description} with the same checksum; not copied.")
                        progress.advance(v.size_bytes)
                        continue
                    folder = Path(tempfile.mkdtemp(dir=work))
                    objects = engine.write_version_objects(
                        self.repository, v.layer_id, v.version_id, v.checksum, folder,
                        progress=progress.wim(f"Packing {ref}"), cancel=ctx.cancel)
                    described = objects.described()
                    for item, path in zip(described, (objects.wim, objects.manifest), strict=True):
                        target.put(path, item.path, progress=progress.step(f"Copying {ref}"), cancel=ctx.cancel)
                        copied_bytes += item.size
                    shutil.rmtree(folder, ignore_errors=True)
                    present[checksum] = described
                    versions.append(_exported_version(v, checksum, described))
                    copied.append(ref)
                    ctx.log(f"{ref}: copied ({sum(o.size for o in described)} bytes).")
                    progress.advance(v.size_bytes)
                exported.append(ExportedLayer(layer.name, layer.type, layer.description, layer.icon, layer.os_layer,
                                              tuple(versions)))
        ctx.cancel.raise_if_cancelled()
        merged = _merge(previous, exported, mirror=task.mirror)
        now = datetime.now(UTC).isoformat(timespec="seconds")
        manifest = ExportManifest(merged, written_at=now, last_sync={
            "at": now, "by": self.caller.username, "kind": "sync" if task.mirror else "export",
            "copied": copied, "skipped": skipped})
        ctx.progress(99, f"Writing {MANIFEST_FILE}")
        target.replace(MANIFEST_FILE, manifest.to_bytes())
        removed: list[str] = []
        if task.mirror:
            for leftover in engine.unreferenced(target, manifest):
                with contextlib.suppress(LayerDeskError, OSError):  # a leftover is removed by the next sync
                    target.remove(leftover)
                    removed.append(leftover)
        action = "transfer.sync" if task.mirror else "transfer.export"
        with self._change(Operation.RUN_TASKS, action, "export folder", task.destination.path, task.comment) as change:
            change.details = {"copied": copied, "skipped": skipped, "removed": removed, "bytes": copied_bytes}
        what = "Synced" if task.mirror else "Exported"
        return TransferResult(
            summary=f"{what} {target.description}: {len(copied)} version(s) copied ({copied_bytes} bytes), "
                    f"{len(skipped)} already there" + (f", {len(removed)} old object(s) removed." if task.mirror
                                                        else "."),
            where=target.description, copied=tuple(copied), skipped=tuple(skipped), removed=tuple(removed),
            bytes_copied=copied_bytes)

    # --- import ------------------------------------------------------------------------------------

    def preview_import(self, source: Destination, layers: Sequence[str] = ()) -> ImportPreview:
        """What importing from ``source`` would do (nothing is changed)."""
        self.caller.require(Operation.READ)
        target = source.open(create=False)
        try:
            manifest = engine.read_manifest(target, required=True)
            assert manifest is not None
            return ImportPreview(target.description, tuple(self._plan(manifest, layers)))
        finally:
            target.close()

    def start_import(self, runner: TaskRunner, source: Destination, layers: Sequence[str] = (), *,
                     comment: str = "") -> int:
        """Import from ``source`` in a task (the named layers, or all); returns the task id. The folder and
        its manifest are checked at once: a missing folder, a malformed manifest, an object path outside the
        folder or a newer format is refused before a task exists."""
        comment = validate_comment(comment)
        self._require(Operation.EDIT_ANY_LAYERS, "transfer.import", source.path, comment)
        self._require(Operation.RUN_TASKS, "transfer.import", source.path, comment)
        preview = self.preview_import(source, layers)
        for kind in sorted({LayerType(item.layer_type) for item in preview.new}):
            self._require(LAYER_OPERATION[kind], "transfer.import", source.path, comment)
        return runner.submit(TransferImportTask(self, source, layers, comment=comment))

    def _plan(self, manifest: ExportManifest, names: Sequence[str]) -> list[ImportItem]:
        """Decide, for each exported layer and version asked for (with the OS layers and prerequisites they
        need), whether it is new here, already here, or in conflict."""
        wanted = self._wanted_layers(manifest, names)
        items: list[ImportItem] = []
        with self._read() as session:
            here = {layer.name.casefold(): layer for layer in session.scalars(select(Layer))}
            for exported in manifest.layers:
                if exported.name.casefold() not in wanted:
                    continue
                local = here.get(exported.name.casefold())
                problem = None
                if local is not None:
                    local_os = local.os_layer.name if local.os_layer is not None else None
                    if local.type.value != exported.type:
                        problem = (f"a {local.type.value} layer of that name exists here; the export has a "
                                   f"{exported.type} layer")
                    elif (local_os or "").casefold() != (exported.os_layer or "").casefold():
                        problem = (f"the layer here belongs to OS layer {local_os}; the export's to "
                                   f"{exported.os_layer}")
                kind = exported.type
                items.append(ImportItem(exported.name, "", "conflict" if problem else ("here" if local else "new"),
                                        problem or "", layer_type=kind))
                for version in exported.versions:
                    if problem is not None:
                        items.append(ImportItem(exported.name, version.name, "conflict", problem,
                                                version.size_bytes, kind))
                        continue
                    mine = next((v for v in (local.versions if local else [])
                                 if v.name.casefold() == version.name.casefold()), None)
                    if mine is None:
                        missing = [p for p in version.prerequisites if not self._prerequisite_known(manifest, here, p)]
                        if missing:
                            items.append(ImportItem(exported.name, version.name, "conflict",
                                                    f"its prerequisite {', '.join(missing)} is neither here nor in "
                                                    "the export", version.size_bytes, kind))
                        else:
                            items.append(ImportItem(exported.name, version.name, "new", "", version.size_bytes, kind))
                        continue
                    try:
                        checksum = engine.stored_content_checksum(self.repository, mine.layer_id, mine.id,
                                                                  mine.checksum) if mine.checksum else None
                    except (LayerDeskError, OSError) as exc:
                        checksum, why = None, f"the version here cannot be read ({exc})"
                    else:
                        why = "the version here has no stored content"
                    if checksum == version.checksum:
                        items.append(ImportItem(exported.name, version.name, "here", "same checksum",
                                                version.size_bytes, kind))
                    else:
                        items.append(ImportItem(
                            exported.name, version.name, "conflict",
                            why if checksum is None else
                            f"a version of that name with other content is here ({checksum}; the export has "
                            f"{version.checksum}); it is not overwritten", version.size_bytes, kind))
        return items

    @staticmethod
    def _prerequisite_known(manifest: ExportManifest, here: Mapping[str, Layer], ref: str) -> bool:
        name, _, version = ref.partition(":")
        local = here.get(name.casefold())
        if local is not None and any(v.name.casefold() == version.casefold() for v in local.versions):
            return True
        exported = manifest.layer(name)
        return exported is not None and exported.version(version) is not None

    @staticmethod
    def _wanted_layers(manifest: ExportManifest, names: Sequence[str]) -> set[str]:
        if not names:
            return {layer.name.casefold() for layer in manifest.layers}
        wanted: set[str] = set()
        todo = list(names)
        while todo:
            name = todo.pop()
            layer = manifest.layer(name)
            if layer is None:
                known = ", ".join(x.name for x in manifest.layers) or "none"
                raise NotFound(f"The export has no layer named {name!r} (it has: {known}).")
            if layer.name.casefold() in wanted:
                continue
            wanted.add(layer.name.casefold())
            if layer.os_layer and manifest.layer(layer.os_layer) is not None:
                todo.append(layer.os_layer)
            todo.extend(p.partition(":")[0] for v in layer.versions for p in v.prerequisites
                        if manifest.layer(p.partition(":")[0]) is not None)
        return wanted

    def _run_import(self, task: TransferImportTask, ctx: TaskContext) -> TaskResult:
        ctx.progress(0, f"Opening {task.source.path}")
        target = task.source.open(create=False)
        try:
            manifest = engine.read_manifest(target, required=True)
            assert manifest is not None
            plan = self._plan(manifest, task.layers)
            new = [(manifest.layer(i.layer), i) for i in plan if i.action == "new" and i.version]
            conflicts = tuple(f"{i.layer}{':' + i.version if i.version else ''}: {i.reason}" for i in plan
                              if i.action == "conflict")
            skipped = tuple(f"{i.layer}:{i.version}" for i in plan if i.action == "here" and i.version)
            for line in conflicts:
                ctx.log(f"Conflict, not imported: {line}", "WARNING")
            total = sum(i.size_bytes for _, i in new) * 2
            progress = _Progress(ctx, total)
            with engine.staging_folder(self._work_parent) as work:
                staged: list[tuple[ExportedLayer, ExportedVersion, StagedVersion]] = []
                # Every object is copied out and verified before anything enters the catalog.
                for layer, item in new:
                    assert layer is not None
                    version = layer.version(item.version)
                    assert version is not None
                    folder = work / f"{len(staged)}"
                    folder.mkdir()
                    staged.append((layer, version, engine.stage_objects(
                        target, layer, version, folder,
                        progress=progress.step(f"Verifying {layer.name}:{version.name}"), cancel=ctx.cancel)))
                    progress.advance(version.size_bytes)
                    ctx.log(f"{layer.name}:{version.name}: every checksum verified.")
                ctx.cancel.raise_if_cancelled()
                imported = self._commit_import(task, ctx, manifest, staged, progress)
        finally:
            target.close()
        state = TaskState.DONE_WITH_ERRORS if conflicts else TaskState.COMPLETE
        return TransferResult(
            summary=f"Imported {len(imported)} version(s) from {target.description}; {len(skipped)} already here"
                    + (f"; {len(conflicts)} conflict(s) not imported: " + "; ".join(conflicts) if conflicts else "."),
            state=state, where=target.description, copied=tuple(imported), skipped=skipped, conflicts=conflicts,
            bytes_copied=sum(v.size_bytes for _, v, _ in staged))

    def _commit_import(self, task: TransferImportTask, ctx: TaskContext, manifest: ExportManifest,
                       staged: Sequence[tuple[ExportedLayer, ExportedVersion, StagedVersion]],
                       progress: _Progress) -> list[str]:
        """Create the layers and versions (``editing``), store them, then give them their exported state;
        undo everything when any step fails or is cancelled."""
        if not staged:
            return []
        created: dict[str, int] = {}  # "LAYER:VERSION" → version id
        new_layers: list[str] = []
        layer_ids: dict[str, int] = {}
        with self._change(Operation.EDIT_ANY_LAYERS, "transfer.import", "export folder", task.source.path,
                          task.comment) as change:
            session = change.session

            def ensure_layer(name: str) -> Layer:
                """The layer here, or created from its export entry (its OS layer first)."""
                found = session.scalars(select(Layer).where(Layer.name == name)).one_or_none()
                if found is not None:
                    return found
                exported = manifest.layer(name)
                if exported is None:
                    raise NotFound(f"The OS layer {name!r} is neither here nor in the export; import it first.")
                os_row = ensure_layer(exported.os_layer) if exported.os_layer else None
                row = Layer(name=exported.name, type=LayerType(exported.type), description=exported.description,
                            icon=exported.icon, os_layer=os_row, created_at=self._now(),
                            created_by=self.caller.username)
                change.require(LAYER_OPERATION[row.type])
                session.add(row)
                session.flush()
                new_layers.append(row.name)
                self._audit(session, "layer.create", "layer", row.name, task.comment,
                            {"type": row.type.value, "imported_from": task.source.path})
                return row

            for layer, version, _ in staged:
                row = ensure_layer(layer.name)
                change.require(LAYER_OPERATION[row.type])
                v = LayerVersion(layer=row, name=version.name, state=VersionState.EDITING,
                                 comment=version.comment[:COMMENT_LENGTH], created_at=_parse_time(version.created_at),
                                 created_by=version.created_by or self.caller.username)
                session.add(v)
                session.flush()
                created[f"{layer.name}:{version.name}"] = v.id
                layer_ids[f"{layer.name}:{version.name}"] = row.id
                self._audit(session, "layer.version.add", "layer version", v.qualified_name, task.comment,
                            {"state": "editing", "imported_from": task.source.path, "checksum": version.checksum})
            change.details = {"layers": new_layers, "versions": list(created)}
        try:
            stored: dict[str, tuple[str, int]] = {}
            for layer, version, staged_version in staged:
                ref = f"{layer.name}:{version.name}"
                ctx.cancel.raise_if_cancelled()
                result = engine.store_transferred_version(
                    self.repository, layer_ids[ref], created[ref], staged_version,
                    progress=progress.wim(f"Storing {ref}"), cancel=ctx.cancel)
                stored[ref] = (result.checksum, result.data_bytes)
                progress.advance(version.size_bytes)
                ctx.log(f"{ref}: stored ({result.files} files, {result.data_bytes} bytes).")
            ctx.cancel.raise_if_cancelled()
            with self._change(Operation.EDIT_ANY_LAYERS, "transfer.import", "export folder", task.source.path,
                              task.comment) as change:
                session = change.session
                for layer, version, _ in staged:
                    ref = f"{layer.name}:{version.name}"
                    done = session.get(LayerVersion, created[ref])
                    if done is None:
                        raise NotFound(f"{ref} was deleted while it was being imported.")
                    done.checksum, done.size_bytes = stored[ref]
                    done.state = VersionState(version.state)
                    done.prerequisites = [find_version(session, p, default_latest=False)
                                          for p in version.prerequisites]
                    self._audit(session, "layer.version.state", "layer version", done.qualified_name, task.comment,
                                {"state": ["editing", done.state.value], "imported_from": task.source.path})
                change.details = {"imported": list(created)}
        except BaseException as failure:
            self._undo_import(task, created, layer_ids, new_layers, failure)
            raise
        return list(created)

    def _undo_import(self, task: TransferImportTask, created: Mapping[str, int], layer_ids: Mapping[str, int],
                     new_layers: Sequence[str], failure: BaseException) -> None:
        why = "canceled" if isinstance(failure, TaskCanceled) else f"failed: {failure}"
        for ref, version_id in created.items():
            try:
                self.repository.remove_version(layer_ids[ref], version_id)
            except Exception:
                log.exception("cannot remove the partly imported %s from the repository", ref)
        try:
            with self._change(Operation.EDIT_ANY_LAYERS, "transfer.import.undo", "export folder", task.source.path,
                              f"Import {why}"[:COMMENT_LENGTH]) as change:
                session = change.session
                for version_id in created.values():
                    row = session.get(LayerVersion, version_id)
                    if row is not None:
                        session.delete(row)
                session.flush()
                for name in reversed(new_layers):  # app layers before the OS layers they belong to
                    layer = session.scalars(select(Layer).where(Layer.name == name)).one_or_none()
                    if layer is not None:
                        session.refresh(layer)
                        if not layer.versions:
                            session.delete(layer)
                            session.flush()
                change.details = {"removed": list(created), "layers": list(new_layers)}
        except Exception:
            log.exception("cannot delete the versions of a failed import")

    # --- helpers -----------------------------------------------------------------------------------

    def _audit(self, session: Any, action: str, object_type: str, name: str, comment: str,
               details: dict[str, Any]) -> None:
        session.add(AuditEntry(at=self._now(), user=self.caller.username, operation=action, object_type=object_type,
                               object_name=name, change=details, comment=comment, outcome=AuditOutcome.SUCCESS))

    def _require(self, operation: Operation, action: str, name: str, comment: str) -> None:
        try:
            self.caller.require(operation)
        except PermissionDenied as exc:
            self._audit_denied(action, "export folder", name, comment, str(exc))
            raise


def _parse_time(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        return datetime.now(UTC)
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _version_row(v: LayerVersion) -> _VersionRow:
    return _VersionRow(v.layer_id, v.id, v.name, v.state.value, v.comment, v.created_at, v.created_by,
                       tuple(p.qualified_name for p in v.prerequisites), v.size_bytes, v.checksum)


def _layer_row(layer: Layer, versions: Sequence[LayerVersion]) -> _LayerRow:
    return _LayerRow(layer.name, layer.type.value, layer.description, layer.icon,
                     layer.os_layer.name if layer.os_layer is not None else None,
                     tuple(_version_row(v) for v in versions))


def _exported_version(v: _VersionRow, checksum: str, objects: Sequence[engine.ExportedObject]) -> ExportedVersion:
    return ExportedVersion(v.name, v.state, v.comment, v.created_at.isoformat(), v.created_by, v.prerequisites,
                           v.size_bytes, checksum, tuple(objects))


def _merge(previous: ExportManifest, exported: Sequence[ExportedLayer], *, mirror: bool) -> tuple[ExportedLayer, ...]:
    """The new manifest's layers: the exported ones (versions merged into what the folder had), and – unless
    mirroring – the folder's other layers as they were."""
    fresh = {layer.name.casefold(): layer for layer in exported}
    result: list[ExportedLayer] = []
    for old in previous.layers:
        new = fresh.pop(old.name.casefold(), None)
        if new is None:
            if not mirror:
                result.append(old)
            continue
        names = {v.name.casefold() for v in new.versions}
        kept = () if mirror else tuple(v for v in old.versions if v.name.casefold() not in names)
        result.append(ExportedLayer(new.name, new.type, new.description, new.icon, new.os_layer,
                                    kept + new.versions))
    result.extend(fresh.values())
    return tuple(result)


__all__ = ["Destination", "ImportItem", "ImportPreview", "LayerDiskResult", "TransferResult", "TransferService"]
