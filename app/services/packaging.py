"""Packaging machines: create a layer version's packaging disk, finalize the version from it, or abandon it.

:meth:`PackagingService.start_packaging` checks the request (roles, the layer, the versions that go in, the
output folder, the layer script), adds the version in state ``editing`` with its **packaging record** (the OS
layer version, the prerequisites and the previous version, each with its checksum; audited) and submits a
:class:`PackagingTask`: the compositing engine builds the packaging disk in a child process
(:func:`app.engine.packaging.package_worker`), it is delivered as ``<layer>_<version>_packaging.<ext>``, and the
disk (path, format, size, checksum, manifest digest, volume serial) is added to the record (audited). Instead of an
output folder the disk can go through a connector (``connector``): it is built in the home's work folder, handed to
the connector like a published image (a folder, a libvirt volume and VM, a vSphere VM…), and the delivery (the
connector, where the disk went and the destination's ids) is kept in the record. A failed or cancelled packaging
deletes the version again and leaves no file.

:meth:`PackagingService.start_finalize` moves the version ``editing`` → ``finalizing`` (audited) and submits a
:class:`FinalizeTask` (:func:`app.engine.packaging.finalize_worker`): the version becomes ``deployable`` with
what changed on the disk; a disk that is refused (not this version's packaging disk, a pending reboot or pending
file operations) puts it back to ``editing`` with the reason; any other failure marks it ``broken`` with the
reason. A cancel puts it back to ``editing``. A disk delivered through a connector that can hand it back
(:attr:`app.connectors.base.Connector.can_retrieve`) is finalized without naming a file: the task fetches it from
the connector first (into the work folder, removed afterwards).

Only one version of a layer is edited at a time: another packaging disk is refused while one is ``editing`` or
``finalizing``. :meth:`PackagingService.abandon` deletes an editing (or broken) packaged version; the disk file
delivered is left where it is (it belongs to whoever uses it now).
"""

from __future__ import annotations

import logging
import math
import secrets
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from sqlalchemy.orm import Session

from app.catalog.models import DiskFormat, Layer, LayerType, LayerVersion, VersionState
from app.connectors import connector_for
from app.connectors.base import ImageSidecar
from app.engine.compose import EXTENSIONS, StackLayer
from app.engine.packaging import disk_file_name
from app.engine.repository import LayerRepository
from app.errors import Conflict, EnvironmentProblem, NotFound, PermissionDenied, UserError, ValidationError
from app.paths import Home
from app.services.base import Service, ServiceContext, find_layer, find_version, split_qualified
from app.services.connectors import ConnectorDelivery, ConnectorService
from app.services.layers import LayerService, change_comment
from app.services.publishing import ENGINE_FORMATS
from app.services.rbac import LAYER_OPERATION, Operation
from app.services.settings import read_setting
from app.services.validation import COMMENT_LENGTH, validate_comment, validate_name
from app.services.views import LayerVersionInfo
from app.tasks.base import ProgressSpan, TaskCanceled, TaskContext, TaskResult
from app.tasks.worker import SubprocessTask

if TYPE_CHECKING:  # app.tasks.runner imports app.services: a module-level import here would be circular
    from app.services import Services
    from app.tasks.runner import TaskRunner

log = logging.getLogger(__name__)

#: The disk formats a packaging disk is delivered in (a WIM cannot boot a packaging machine).
PACKAGING_FORMATS: tuple[DiskFormat, ...] = (
    DiskFormat.VHDX, DiskFormat.VHD, DiskFormat.VMDK, DiskFormat.QCOW2, DiskFormat.RAW)
#: The packaging record's layout version (inside the ``packaging`` JSON column).
RECORD_SCHEMA = 1
#: A layer script is a small text file run once; anything bigger is not a script.
SCRIPT_MAX_BYTES = 64 * 1024
SCRIPT_SUFFIXES = (".ps1", ".cmd", ".bat")
#: Free room on a packaging disk, above the layers it holds, for the installation (as App Layering's
#: default layer size).
FREE_GB = 10
_GiB = 1024**3


@dataclass(frozen=True)
class LayerScript:
    """A layer script: a run-once PowerShell or cmd script kept with the version."""

    name: str
    text: str


def read_layer_script(path: Path | str) -> LayerScript:
    """Read and check a layer script file: ``.ps1``, ``.cmd`` or ``.bat``, at most :data:`SCRIPT_MAX_BYTES`,
    text (UTF-8, or UTF-16 with its byte order mark). :class:`ValidationError` says what is wrong."""
    path = Path(path)
    if path.suffix.casefold() not in SCRIPT_SUFFIXES:
        raise ValidationError(f"The layer script {path.name} is not a PowerShell or cmd script (.ps1, .cmd or "
                              ".bat).", field="script")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValidationError(f"Cannot read the layer script {path}: {exc.strerror or exc}.", field="script") from None
    if len(data) > SCRIPT_MAX_BYTES:
        raise ValidationError(f"The layer script {path.name} has {len(data)} bytes; a layer script may have at most "
                              f"{SCRIPT_MAX_BYTES} (put bigger work in a file the script runs).", field="script")
    encoding = "utf-16" if data.startswith((b"\xff\xfe", b"\xfe\xff")) else "utf-8-sig"
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError:
        raise ValidationError(f"The layer script {path.name} is not text (UTF-8, or UTF-16 with a byte order "
                              "mark).", field="script") from None
    if "\0" in text:
        raise ValidationError(f"The layer script {path.name} is not text (it holds NUL characters).", field="script")
    if not text.strip():
        raise ValidationError(f"The layer script {path.name} is empty.", field="script")
    return LayerScript(path.name, text)


@dataclass(frozen=True)
class PackagingInput:
    """A layer version that went into a packaging disk."""

    role: str  # "os", "prerequisite" or "previous"
    layer: str
    version: str
    layer_id: int
    version_id: int
    checksum: str

    def to_dict(self) -> dict[str, Any]:
        return {"role": self.role, "layer": self.layer, "version": self.version, "layer_id": self.layer_id,
                "version_id": self.version_id, "checksum": self.checksum}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PackagingInput:
        return cls(str(data["role"]), str(data["layer"]), str(data["version"]), int(data["layer_id"]),
                   int(data["version_id"]), str(data["checksum"]))


@dataclass(frozen=True)
class PackagingDisk:
    """The packaging disk as delivered."""

    path: str
    format: DiskFormat
    size_gb: float
    size_bytes: int
    #: ``sha256:<hex>`` of the disk file as delivered.
    checksum: str
    #: The compositing engine's digest of the disk's tree (:class:`app.engine.compose.ComposeResult`).
    manifest_digest: str
    #: The serial number of its Windows volume: what tells this disk from any other.
    volume_serial: str
    delivered_at: str
    task_id: int | None = None
    #: When it went through a connector: ``connector``, ``type``, ``location`` and the destination's ``ids``.
    delivery: dict[str, Any] | None = None


@dataclass(frozen=True)
class PackagingInfo:
    """A packaged version's record: what went into its packaging disk, the disk, and how it was finalized."""

    layer: str
    layer_type: LayerType
    version: str
    state: VersionState
    state_reason: str
    os: PackagingInput
    prerequisites: tuple[PackagingInput, ...]
    previous: PackagingInput | None
    size_gb: float
    format: DiskFormat
    disk: PackagingDisk | None
    script_name: str | None
    layer_script: str
    #: The disk it was finalized from (path and when), once finalized.
    finalized: dict[str, Any] | None


def _input(role: str, version: LayerVersion) -> PackagingInput:
    if version.checksum is None:
        raise ValidationError(f"{version.qualified_name} has no content yet; only deployable versions go on a "
                              "packaging disk.")
    return PackagingInput(role, version.layer.name, version.name, version.layer_id, version.id, version.checksum)


def _record_info(version: LayerVersion) -> PackagingInfo:
    record = version.packaging
    if not record:
        raise NotFound(f"{version.qualified_name} was not made on a packaging machine (it has no packaging "
                       "record); it was imported.")
    disk = record.get("disk")
    return PackagingInfo(
        layer=version.layer.name, layer_type=version.layer.type, version=version.name, state=version.state,
        state_reason=version.state_reason,
        os=PackagingInput.from_dict(record["os"]),
        prerequisites=tuple(PackagingInput.from_dict(p) for p in record.get("prerequisites", [])),
        previous=PackagingInput.from_dict(record["previous"]) if record.get("previous") else None,
        size_gb=float(record["size_gb"]), format=DiskFormat(record["format"]),
        disk=PackagingDisk(**{**disk, "format": DiskFormat(disk["format"])}) if disk else None,
        script_name=record.get("script_name"), layer_script=version.layer_script,
        finalized=record.get("finalized"),
    )


class PackagingService(Service):
    """Packaging disks and finalizing (see the module docstring)."""

    def __init__(self, ctx: ServiceContext, home: Home, repository: LayerRepository | None = None) -> None:
        super().__init__(ctx)
        self.home = home
        self.repository = repository if repository is not None else LayerRepository(home.repository)
        self._layers = LayerService(ctx, self.repository)

    # --- reads ---------------------------------------------------------------------------------

    def get_packaging(self, ref: str) -> PackagingInfo:
        """The packaging record of version ``LAYER:VERSION`` (:class:`NotFound` for an imported version)."""
        with self._read() as session:
            return _record_info(find_version(session, ref, default_latest=False))

    def editing_version(self, layer: str) -> str | None:
        """The version of ``layer`` being edited (``editing`` or ``finalizing``), if any: while there is one,
        no other packaging disk is made for the layer."""
        with self._read() as session:
            row = find_layer(session, layer)
            busy = _busy_version(row)
            return busy.name if busy is not None else None

    # --- catalog changes -------------------------------------------------------------------------

    def add_packaging_version(
        self, layer: str, version: str, *, previous: str | None = None, prerequisites: Sequence[str] = (),
        os_version: str | None = None, script: LayerScript | None = None, fmt: DiskFormat | str = DiskFormat.VHDX,
        size_gb: float | None = None, comment: str = "",
    ) -> LayerVersionInfo:
        """Add version ``version`` of the app or platform layer ``layer`` in state ``editing`` with its packaging
        record: the OS layer's version ``os_version`` (default: its newest deployable one), the prerequisite
        versions (``LAYER[:VERSION]``), and ``previous`` (a deployable version of the same layer whose content
        the new version starts from). Refused while another version of the layer is being edited. The disk is
        recorded later (:meth:`record_packaging_disk`)."""
        with self._change(Operation.EDIT_ANY_LAYERS, "layer.package", "layer", layer, comment) as change:
            session = change.session
            row = find_layer(session, layer)
            change.require(LAYER_OPERATION[row.type])
            if row.type is LayerType.OS:
                raise ValidationError(f"{row.name} is an OS layer: its versions are imported from a gold disk "
                                      "(layerctl layer import), not made on a packaging machine.")
            version = validate_name(version, "version name")
            if any(v.name.casefold() == version.casefold() for v in row.versions):
                raise Conflict(f"Layer {row.name!r} already has a version {version!r}.")
            busy = _busy_version(row)
            if busy is not None:
                raise Conflict(f"Layer {row.name!r} already has version {busy.name} being edited ({busy.state.value}): "
                               f"finalize or abandon {busy.qualified_name} before creating another packaging disk.")
            disk_format = _packaging_format(fmt)
            os_row = self._os_version(session, row, os_version)
            prereqs = LayerService._resolve_prerequisites(session, row, prerequisites)
            for prereq in prereqs:
                if prereq.state is not VersionState.DEPLOYABLE:
                    raise ValidationError(f"Prerequisite {prereq.qualified_name} is {prereq.state.value}; only "
                                          "deployable versions go on a packaging disk.", field="prerequisites")
            previous_row: LayerVersion | None = None
            if previous is not None:
                previous_row = find_version(session, f"{row.name}:{previous}", default_latest=False)
                if previous_row.state is not VersionState.DEPLOYABLE:
                    raise ValidationError(f"The previous version {previous_row.qualified_name} is "
                                          f"{previous_row.state.value}; a new version starts from a deployable one.",
                                          field="previous")
            inputs = [_input("os", os_row), *(_input("prerequisite", p) for p in prereqs)]
            if previous_row is not None:
                inputs.append(_input("previous", previous_row))
            if size_gb is None:
                data = sum(v.size_bytes for v in (os_row, *prereqs, *([previous_row] if previous_row else [])))
                size_gb = float(math.ceil(data * 1.2 / _GiB) + FREE_GB)
            if not 0.1 <= size_gb <= 65536:
                raise ValidationError(f"A packaging disk of {size_gb:g} GB cannot be made; choose 0.1 to 65536 GB.",
                                      field="size_gb")
            record: dict[str, Any] = {
                "schema": RECORD_SCHEMA,
                "os": inputs[0].to_dict(),
                "prerequisites": [i.to_dict() for i in inputs if i.role == "prerequisite"],
                "previous": inputs[-1].to_dict() if previous_row is not None else None,
                "format": disk_format.value,
                "size_gb": size_gb,
                "script_name": script.name if script is not None else None,
                "disk": None,
                "finalized": None,
            }
            new = LayerVersion(
                layer=row, name=version, state=VersionState.EDITING, comment=change_comment(comment),
                created_at=self._now(), created_by=self.caller.username, prerequisites=prereqs,
                layer_script=script.text if script is not None else "", packaging=record,
            )
            session.add(new)
            session.flush()
            change.object_type = "layer version"
            change.object_name = new.qualified_name
            change.details = {"state": new.state.value, "inputs": [f"{i.role} {i.layer}:{i.version}" for i in inputs],
                              "format": disk_format.value, "size_gb": size_gb, "script": record["script_name"]}
            return _version_info(session, new)

    def record_packaging_disk(
        self, ref: str, *, path: str, size_bytes: int, checksum: str, manifest_digest: str, volume_serial: str,
        task_id: int | None = None, delivery: Mapping[str, Any] | None = None, comment: str = "",
    ) -> PackagingInfo:
        """Record the packaging disk delivered for the editing version ``ref`` (once); ``delivery`` when it went
        through a connector (see :attr:`PackagingDisk.delivery`)."""
        with self._change(Operation.EDIT_ANY_LAYERS, "layer.package.disk", "layer version", ref, comment) as change:
            session = change.session
            version = find_version(session, ref, default_latest=False)
            change.require(LAYER_OPERATION[version.layer.type])
            _record_info(version)  # refuses a version without a packaging record
            record = dict(version.packaging or {})
            if version.state is not VersionState.EDITING:
                raise Conflict(f"{version.qualified_name} is {version.state.value}; a packaging disk is recorded "
                               "only for a version being edited.")
            if record.get("disk"):
                raise Conflict(f"{version.qualified_name} already has its packaging disk ({record['disk']['path']}).")
            if size_bytes < 0:
                raise ValidationError("A disk's size cannot be negative.")
            record["disk"] = {
                "path": path, "format": record["format"], "size_gb": record["size_gb"], "size_bytes": size_bytes,
                "checksum": checksum, "manifest_digest": manifest_digest, "volume_serial": volume_serial,
                "delivered_at": self._now().isoformat(timespec="seconds"), "task_id": task_id,
                "delivery": dict(delivery) if delivery is not None else None,
            }
            version.packaging = record  # a new dict: SQLAlchemy sees the change
            change.object_name = version.qualified_name
            change.details = {"disk": path, "checksum": checksum, "volume_serial": volume_serial}
            if delivery is not None:
                change.details["connector"] = delivery.get("connector")
                change.details["ids"] = dict(delivery.get("ids") or {})
            return _record_info(version)

    def begin_finalize(self, ref: str, disk: Path | str, *, comment: str = "") -> LayerVersionInfo:
        """Move the packaged version ``ref`` from ``editing`` to ``finalizing``, to be captured from ``disk``."""
        with self._change(Operation.EDIT_ANY_LAYERS, "layer.finalize", "layer version", ref, comment) as change:
            session = change.session
            version = find_version(session, ref, default_latest=False)
            change.require(LAYER_OPERATION[version.layer.type])
            _record_info(version)
            record = dict(version.packaging or {})
            if version.state is not VersionState.EDITING:
                raise Conflict(f"{version.qualified_name} is {version.state.value}; only a version being edited is "
                               "finalized.")
            if not record.get("disk"):
                raise Conflict(f"{version.qualified_name} has no packaging disk yet (its packaging task has not "
                               "finished).")
            record["finalized"] = {"disk": str(disk), "started_at": self._now().isoformat(timespec="seconds")}
            version.packaging = record
            version.state = VersionState.FINALIZING
            version.state_reason = ""
            change.object_name = version.qualified_name
            change.details = {"state": ["editing", "finalizing"], "disk": str(disk)}
            return _version_info(session, version)

    def abandon(self, ref: str, *, comment: str = "") -> None:
        """Delete the packaged version ``ref`` while it is ``editing`` (or ``broken``), with whatever was stored
        for it. The packaging disk file is left where it was delivered."""
        name, version_name = split_qualified(ref)
        if version_name is None:
            raise ValidationError(f"Name the version to abandon: {name}:VERSION.")
        with self._change(Operation.EDIT_ANY_LAYERS, "layer.abandon", "layer version", ref, comment) as change:
            session = change.session
            version = find_version(session, ref, default_latest=False)
            change.require(LAYER_OPERATION[version.layer.type])
            _record_info(version)
            if version.state not in (VersionState.EDITING, VersionState.BROKEN):
                raise Conflict(f"{version.qualified_name} is {version.state.value}; only a version being edited (or "
                               "a broken one) is abandoned. Delete a deployable version with layerctl layer delete.")
            disk = (version.packaging or {}).get("disk") or {}
            change.object_name = version.qualified_name
            change.details = {"state": version.state.value, "disk": disk.get("path")}
            layer_id, version_id = version.layer_id, version.id
            change.after_commit(lambda: self._forget(layer_id, version_id))
            session.delete(version)

    def _end_finalize(
        self, version_id: int, state: VersionState, *, reason: str = "", size_bytes: int | None = None,
        checksum: str | None = None, comment: str = "",
    ) -> LayerVersionInfo:
        """Move a finalizing version to ``deployable``, or back to ``editing`` / on to ``broken`` with ``reason``."""
        with self._change(None, "layer.finalize.end", "layer version", str(version_id), comment) as change:
            session = change.session
            version = session.get(LayerVersion, version_id)
            if version is None:
                raise NotFound("The version being finalized was deleted meanwhile.")
            change.require(LAYER_OPERATION[version.layer.type])
            if version.state is not VersionState.FINALIZING:
                raise Conflict(f"{version.qualified_name} is {version.state.value}, not finalizing.")
            record = dict(version.packaging or {})
            finalized = dict(record.get("finalized") or {})
            finalized.update({"ended_at": self._now().isoformat(timespec="seconds"), "outcome": state.value})
            record["finalized"] = finalized if state is VersionState.DEPLOYABLE else None
            if state is not VersionState.DEPLOYABLE:
                record["last_refusal"] = reason
            version.packaging = record
            if size_bytes is not None:
                version.size_bytes = size_bytes
            if checksum is not None:
                version.checksum = checksum
            version.state = state
            version.state_reason = reason[:COMMENT_LENGTH]
            change.object_name = version.qualified_name
            change.details = {"state": ["finalizing", state.value], "reason": reason[:COMMENT_LENGTH]}
            return _version_info(session, version)

    # --- tasks ---------------------------------------------------------------------------------

    def start_packaging(
        self, runner: TaskRunner, layer: str, version: str, output_dir: Path | str | None, *,
        connector: str | None = None, fmt: DiskFormat | str = DiskFormat.VHDX, previous: str | None = None,
        prerequisites: Sequence[str] = (), os_version: str | None = None, script: Path | str | None = None,
        size_gb: float | None = None, comment: str = "",
    ) -> int:
        """Check the request, add version ``version`` of ``layer`` (``editing``, with its packaging record) and
        start the task that makes its packaging disk in ``output_dir``, or delivers it through the connector
        named ``connector`` (one of the two); returns the task id. Nothing is created when a check fails; a
        failed or cancelled task deletes the version again and leaves no file."""
        comment = validate_comment(comment)
        self._require_layer_roles("layer.package", layer, comment)
        disk_format = _packaging_format(fmt)
        if (output_dir is None) == (connector is None):
            raise ValidationError("Deliver the packaging disk either to an output folder or through a connector "
                                  "(one of the two).", field="output")
        delivery = None
        if connector is not None:
            # The connector's credentials are a publisher's (audited when refused).
            self._require(Operation.PUBLISH_IMAGES, "layer.package", layer, comment)
            delivery = ConnectorService(self._ctx).delivery(connector)
        if output_dir is not None:
            folder = Path(output_dir)
            if not folder.is_dir():
                raise ValidationError(f"The output folder {folder} does not exist (or is not a folder); create it "
                                      "first.", field="output")
        layer_script = read_layer_script(script) if script is not None else None
        with self._read() as session:
            row = find_layer(session, layer)
            name = disk_file_name(row.name, validate_name(version, "version name"))
        engine_format = ENGINE_FORMATS[disk_format]
        if output_dir is None:
            folder = self.home.work / f"packaging-{secrets.token_hex(6)}"
        target = folder / f"{name}.{EXTENSIONS[engine_format]}"
        if target.exists():
            raise Conflict(f"{target} already exists; move it away or choose another output folder.")
        if delivery is not None:
            try:
                folder.mkdir(parents=True)
            except OSError as exc:
                raise EnvironmentProblem(f"Cannot create the work folder {folder}: {exc.strerror or exc}.") from None
        try:
            info = self.add_packaging_version(layer, version, previous=previous, prerequisites=prerequisites,
                                              os_version=os_version, script=layer_script, fmt=disk_format,
                                              size_gb=size_gb, comment=comment)
        except BaseException:
            if delivery is not None:
                shutil.rmtree(folder, ignore_errors=True)
            raise
        record = self.get_packaging(f"{info.layer}:{info.name}")
        task = PackagingTask(self, record, version_id=info.id, output_dir=folder.absolute(),
                             engine_format=engine_format, name=name, delivery=delivery, comment=comment)
        try:
            task.check_content()
            return runner.submit(task)
        except BaseException as exc:
            task.undo(exc)
            raise

    def start_finalize(self, runner: TaskRunner, ref: str, disk: Path | str | None = None, *,
                       comment: str = "") -> int:
        """Check the request, move the packaged version ``ref`` to ``finalizing`` and start the task that captures
        it from ``disk`` (the packaging machine's disk, shut down) or, without ``disk``, from the connector its
        packaging disk was delivered through; returns the task id."""
        comment = validate_comment(comment)
        name, version_name = split_qualified(ref)
        if version_name is None:
            raise ValidationError(f"Name the version to finalize: {name}:VERSION.")
        self._require_layer_roles("layer.finalize", name, comment)
        if disk is not None:
            disk = Path(disk).absolute()
            if not disk.is_file():
                raise ValidationError(f"The disk {disk} does not exist (or is not a file); name the packaging "
                                      "machine's disk file.", field="disk")
        with self._read() as session:
            row = find_version(session, ref, default_latest=False)
            record = _record_info(row)
            version_id, layer_id = row.id, row.layer_id
        if record.disk is None:
            raise Conflict(f"{ref} has no packaging disk yet (its packaging task has not finished).")
        fetch: _Fetch | None = None
        if disk is None:
            fetch = self._fetch_plan(ref, record, comment)
            source = f"{record.disk.path} (connector {fetch.delivery.name})"
        else:
            source = str(disk)
        self.begin_finalize(ref, source, comment=comment)
        task = FinalizeTask(self, record, version_id=version_id, layer_id=layer_id, disk=disk, fetch=fetch,
                            comment=comment)
        try:
            return runner.submit(task)
        except BaseException as exc:
            task.finish_failed(exc)
            raise

    # --- helpers -------------------------------------------------------------------------------

    def _fetch_plan(self, ref: str, record: PackagingInfo, comment: str) -> _Fetch:
        """How to fetch ``ref``'s packaging disk back from the connector it was delivered through (with the
        connector's credentials, which are a publisher's: audited when refused)."""
        assert record.disk is not None
        delivered = record.disk.delivery
        if not delivered:
            raise ValidationError(f"The packaging disk of {ref} was delivered to {record.disk.path}, not through a "
                                  "connector: name the disk to finalize from (the packaging machine's disk, shut "
                                  "down).", field="disk")
        self._require(Operation.PUBLISH_IMAGES, "layer.finalize", record.layer, comment)
        delivery = ConnectorService(self._ctx).delivery(str(delivered["connector"]))
        if delivery.settings.type != delivered.get("type"):
            raise UserError(f"Connector {delivery.name!r} is now of another type than the one the packaging disk of "
                            f"{ref} went through; name the disk to finalize from.")
        connector = connector_for(delivery.settings.type)
        if not connector.can_retrieve:
            raise UserError(f"A {connector.title} connector cannot hand the disk back: copy the packaging machine's "
                            f"disk ({record.disk.path}) to this computer and finalize from that file.")
        extension = EXTENSIONS[ENGINE_FORMATS[record.format]]
        return _Fetch(delivery, dict(delivered.get("ids") or {}), str(record.disk.path), extension)

    def _require_layer_roles(self, action: str, layer: str, comment: str) -> LayerType:
        """The roles a packaging task needs (audited when refused): a layer role for the layer's type, and
        running tasks."""
        self._require(Operation.EDIT_ANY_LAYERS, action, layer, comment)
        with self._read() as session:
            layer_type = find_layer(session, layer).type
        self._require(LAYER_OPERATION[layer_type], action, layer, comment)
        self._require(Operation.RUN_TASKS, action, layer, comment)
        return layer_type

    def _require(self, operation: Operation, action: str, layer: str, comment: str) -> None:
        try:
            self.caller.require(operation)
        except PermissionDenied as exc:
            self._audit_denied(action, "layer", layer, comment, str(exc))
            raise

    def _os_version(self, session: Session, layer: Layer, name: str | None) -> LayerVersion:
        os_layer = layer.os_layer
        assert os_layer is not None  # app and platform layers always have one (a CHECK constraint)
        if name is not None:
            chosen = find_version(session, f"{os_layer.name}:{name}", default_latest=False)
            if chosen.state is not VersionState.DEPLOYABLE:
                raise ValidationError(f"OS layer version {chosen.qualified_name} is {chosen.state.value}; a packaging "
                                      "disk starts from a deployable one.", field="os_version")
            return chosen
        deployable = [v for v in os_layer.versions if v.state is VersionState.DEPLOYABLE]
        if not deployable:
            raise ValidationError(f"OS layer {os_layer.name!r} has no deployable version yet; import one first.",
                                  field="os_version")
        return deployable[-1]

    def _forget(self, layer_id: int, version_id: int) -> None:
        try:
            self.repository.remove_version(layer_id, version_id)
        except Exception as exc:  # noqa: BLE001 - the deletion stands; `repo check` lists the orphan
            log.warning("could not remove the stored content of layer %d version %d: %s", layer_id, version_id, exc)

    def _current_ref(self, version_id: int) -> str | None:
        with self.catalog.read() as session:
            row = session.get(LayerVersion, version_id)
            return row.qualified_name if row is not None else None

    def _cache(self) -> tuple[Path, int]:
        with self._read() as session:
            cache_gb = int(read_setting(session, "layer_cache_gb"))
        return self.home.layer_cache, cache_gb * _GiB


@dataclass(frozen=True)
class _Fetch:
    """A packaging disk to fetch back from the connector it was delivered through."""

    delivery: ConnectorDelivery
    ids: dict[str, str]
    location: str
    extension: str


def _busy_version(layer: Layer) -> LayerVersion | None:
    return next((v for v in layer.versions if v.state in (VersionState.EDITING, VersionState.FINALIZING)), None)


def _packaging_format(fmt: DiskFormat | str) -> DiskFormat:
    try:
        chosen = DiskFormat(str(fmt).lower())
    except ValueError:
        chosen = None
    if chosen not in PACKAGING_FORMATS:
        raise ValidationError(f"A packaging disk is written as {', '.join(f.value for f in PACKAGING_FORMATS)}; not "
                              f"{fmt}.", field="format")
    assert chosen is not None
    return chosen


def _version_info(session: Session, version: LayerVersion) -> LayerVersionInfo:
    from app.services.layers import _version_info as info

    return info(session, version)


def _stack(record: PackagingInfo, *, with_previous: bool) -> list[StackLayer]:
    """The engine's stack of a packaging disk: the OS layer version, the prerequisites (as app layers), and the
    previous version on top (as the layer's own type) when ``with_previous``."""
    stack = [StackLayer("os", record.os.layer, record.os.layer_id, record.os.version_id, record.os.checksum)]
    stack.extend(StackLayer("app", p.layer, p.layer_id, p.version_id, p.checksum) for p in record.prerequisites)
    if with_previous and record.previous is not None:
        role = "platform" if record.layer_type is LayerType.PLATFORM else "app"
        stack.append(StackLayer(role, record.previous.layer, record.previous.layer_id, record.previous.version_id,
                                record.previous.checksum))
    return stack


# --- the tasks ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackagingResult(TaskResult):
    """What a finished packaging task delivered."""

    layer: str = ""
    version: str = ""
    path: str = ""
    format: str = ""
    size_bytes: int = 0
    checksum: str = ""
    manifest_digest: str = ""
    volume_serial: str = ""


@dataclass(frozen=True)
class FinalizeResult(TaskResult):
    """What a finished finalize stored."""

    layer: str = ""
    version: str = ""
    checksum: str = ""
    files: int = 0
    data_bytes: int = 0
    added: int = 0
    changed: int = 0
    deletions: int = 0
    registry_operations: int = 0


class PackagingTask(SubprocessTask):
    """Composites a packaging disk in a child process and records it (or deletes the version again)."""

    kind: ClassVar[str] = "layer.package"
    function: ClassVar[str] = "app.engine.packaging:package_worker"

    def __init__(self, service: PackagingService, record: PackagingInfo, *, version_id: int, output_dir: Path,
                 engine_format: str, name: str, delivery: ConnectorDelivery | None = None,
                 comment: str = "") -> None:
        super().__init__(f"Create the packaging disk of {record.layer}:{record.version}")
        self._service = service
        self.record = record
        self.version_id = version_id
        #: With a connector: a work folder of the task's own, removed at the end.
        self.output_dir = output_dir
        self.engine_format = engine_format
        self.name = name
        self.delivery = delivery
        self.comment = comment
        self.staging = output_dir / f".{name}.{secrets.token_hex(4)}.staging"
        self._delivered: Path | None = None

    @property
    def output_path(self) -> Path:
        return self.output_dir / f"{self.name}.{EXTENSIONS[self.engine_format]}"

    def check_content(self) -> None:
        """Every layer version that goes in has its content in the repository (checked before the task)."""
        for layer in _stack(self.record, with_previous=True):
            self._service.repository.manifest(layer.layer_id, layer.version_id, layer.checksum)

    def arguments(self) -> dict[str, Any]:
        cache_dir, cache_bytes = self._service._cache()
        return {
            "repository": str(self._service.repository.root),
            "stack": [layer.to_dict() for layer in _stack(self.record, with_previous=True)],
            "format": self.engine_format, "size_gb": self.record.size_gb, "name": self.name,
            "out_dir": str(self.output_dir), "staging": str(self.staging),
            "cache_dir": str(cache_dir), "cache_bytes": cache_bytes,
        }

    def run(self, ctx: TaskContext) -> TaskResult:
        delivered: dict[str, Any] | None = None
        try:
            data = self.run_worker(ctx if self.delivery is None else ProgressSpan(ctx, 0.0, 60.0))
            self._delivered = Path(str(data["path"]))
            if self._delivered != self.output_path or not self._delivered.is_file():
                raise RuntimeError(f"the packaging worker reported {self._delivered}, expected {self.output_path}")
            ref = self._service._current_ref(self.version_id)
            if ref is None:
                raise NotFound(f"Version {self.record.layer}:{self.record.version} was deleted while its packaging "
                               "disk was being made.")
            where = str(self._delivered)
            if self.delivery is not None:
                delivered = self._deliver(ProgressSpan(ctx, 60.0, 100.0), self._delivered, data)
                where = str(delivered["location"])
            self._service.record_packaging_disk(
                ref, path=where, size_bytes=int(data["size_bytes"]), checksum=str(data["checksum"]),
                manifest_digest=str(data["manifest_digest"]), volume_serial=str(data["volume_serial"]),
                task_id=ctx.task_id, delivery=delivered, comment=self.comment,
            )
        except BaseException as exc:
            if delivered is not None:
                ctx.log(f"The packaging disk was delivered to {delivered['location']} but could not be recorded; "
                        "remove it there.", "ERROR")
            self.undo(exc, ctx)
            raise
        if self.delivery is not None:
            shutil.rmtree(self.output_dir, ignore_errors=True)  # the connector has the disk now
        ctx.log(f"Packaging disk of {ref}: {where}")
        return PackagingResult(
            summary=f"Packaging disk of {ref} delivered: {where}.", layer=self.record.layer,
            version=self.record.version, path=where, format=self.record.format.value,
            size_bytes=int(data["size_bytes"]), checksum=str(data["checksum"]),
            manifest_digest=str(data["manifest_digest"]), volume_serial=str(data["volume_serial"]),
        )

    def _deliver(self, ctx: TaskContext, disk: Path, data: Mapping[str, Any]) -> dict[str, Any]:
        """Hand the packaging disk to the connector (which leaves nothing behind when it fails or is cancelled)."""
        assert self.delivery is not None
        settings = self.delivery.settings
        connector = connector_for(settings.type)
        inputs = (self.record.os, *self.record.prerequisites,
                  *((self.record.previous,) if self.record.previous is not None else ()))
        layers = tuple({"role": i.role, "layer": i.layer, "version": i.version, "checksum": i.checksum}
                       for i in inputs)
        sidecar = ImageSidecar(
            image=self.name, template=self.name, template_revision=0, format=disk.suffix.lstrip(".").lower(),
            size_bytes=int(data["size_bytes"]), checksum=str(data["checksum"]), layers=layers,
            created_at=datetime.now(UTC), created_by=self._service.caller.username,
        )
        ctx.log(f"Delivering {disk.name} to connector {settings.name} ({connector.title}).")
        result = connector.deliver(disk, sidecar, settings, self.delivery.password,
                                   lambda percent, message: ctx.progress(percent, message), ctx.cancel)
        ctx.log(f"Delivered to {result.location}.")
        return {"connector": settings.name, "type": settings.type, "location": result.location,
                "ids": dict(result.ids)}

    def discard(self) -> None:
        self.undo(TaskCanceled())

    def undo(self, failure: BaseException, ctx: TaskContext | None = None) -> None:
        """Remove what the packaging left (its staging folder, the disk if it was delivered, the work folder of
        a delivery through a connector) and delete the version again (audited, with the reason as the
        comment)."""
        shutil.rmtree(self.staging, ignore_errors=True)
        if self.delivery is not None:
            shutil.rmtree(self.output_dir, ignore_errors=True)
        if self._delivered is not None:
            try:
                self._delivered.unlink(missing_ok=True)
            except OSError:
                log.exception("cannot remove %s after a failed packaging", self._delivered)
        why = "canceled" if isinstance(failure, TaskCanceled) else f"failed: {failure}"
        ref = self._service._current_ref(self.version_id)
        if ref is None:
            return
        try:
            self._service._layers.delete_version(ref, comment=f"Packaging {why}"[:COMMENT_LENGTH])
        except NotFound:
            pass
        except Exception:
            log.exception("cannot delete the version %s of a failed packaging", ref)
            if ctx is not None:
                ctx.log(f"Could not delete {ref} after the failed packaging; abandon it.", "ERROR")


class FinalizeTask(SubprocessTask):
    """Captures a packaged version from its packaging machine's disk in a child process, then makes it deployable
    (or puts it back to editing, or marks it broken, with the reason)."""

    kind: ClassVar[str] = "layer.finalize"
    function: ClassVar[str] = "app.engine.packaging:finalize_worker"

    def __init__(self, service: PackagingService, record: PackagingInfo, *, version_id: int, layer_id: int,
                 disk: Path | None, fetch: _Fetch | None = None, comment: str = "") -> None:
        source = disk if fetch is None else f"connector {fetch.delivery.name}"
        super().__init__(f"Finalize {record.layer}:{record.version} from {source}")
        self._service = service
        self.record = record
        self.version_id = version_id
        self.layer_id = layer_id
        #: The disk read; with ``fetch``, set once it was fetched from the connector.
        self.disk = disk
        self.fetch = fetch
        self.comment = comment
        self._fetched: Path | None = None

    @property
    def work_dir(self) -> Path:
        """Inside the repository, beside the layers' WIMs; the worker removes it, and this task too."""
        return self._service.repository.layers / f".finalize-{self.layer_id}-v{self.version_id}"

    def arguments(self) -> dict[str, Any]:
        assert self.record.disk is not None and self.disk is not None
        cache_dir, cache_bytes = self._service._cache()
        return {
            "repository": str(self._service.repository.root), "layer_id": self.layer_id,
            "version_id": self.version_id, "ref": f"{self.record.layer}:{self.record.version}",
            "disk": str(self.disk), "base": [layer.to_dict() for layer in _stack(self.record, with_previous=False)],
            "size_gb": self.record.size_gb, "volume_serial": self.record.disk.volume_serial,
            # Without a previous version the base is exactly the packaging disk's stack: its digest must match.
            "manifest_digest": self.record.disk.manifest_digest if self.record.previous is None else None,
            "work_dir": str(self.work_dir), "cache_dir": str(cache_dir), "cache_bytes": cache_bytes,
        }

    def run(self, ctx: TaskContext) -> TaskResult:
        try:
            worker_ctx = ctx
            if self.fetch is not None:
                self.disk = self._fetch(ProgressSpan(ctx, 0.0, 30.0), self.fetch)
                worker_ctx = ProgressSpan(ctx, 30.0, 100.0)
            data = self.run_worker(worker_ctx)
            info = self._service._end_finalize(
                self.version_id, VersionState.DEPLOYABLE, size_bytes=int(data["data_bytes"]),
                checksum=str(data["checksum"]), comment=self.comment)
        except BaseException as exc:
            self.finish_failed(exc, ctx)
            raise
        finally:
            self._remove_fetched()
        return FinalizeResult(
            summary=str(data["summary"]), layer=info.layer, version=info.name, checksum=str(data["checksum"]),
            files=int(data["files"]), data_bytes=int(data["data_bytes"]), added=int(data["added"]),
            changed=int(data["changed"]), deletions=int(data["deletions"]),
            registry_operations=int(data["registry_operations"]),
        )

    def _fetch(self, ctx: TaskContext, fetch: _Fetch) -> Path:
        """The packaging disk from the connector: a file in the work folder (removed at the end), or the disk
        itself where the connector keeps it on this machine."""
        settings = fetch.delivery.settings
        work = self._service.home.work
        try:
            work.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EnvironmentProblem(f"Cannot create the work folder {work}: {exc.strerror or exc}.") from None
        target = work / f"finalize-{self.version_id}-{secrets.token_hex(4)}.{fetch.extension}"
        self._fetched = target
        ctx.log(f"Fetching the packaging disk from connector {settings.name}: {fetch.location}")
        disk = connector_for(settings.type).retrieve(fetch.ids, settings, fetch.delivery.password, target,
                                                     lambda percent, message: ctx.progress(percent, message),
                                                     ctx.cancel)
        ctx.log(f"Reading the packaging disk {disk}" + (" (fetched)" if disk == target else " where it is"))
        return disk

    def _remove_fetched(self) -> None:
        if self._fetched is not None:
            try:
                self._fetched.unlink(missing_ok=True)
            except OSError:
                log.exception("cannot remove the fetched disk %s", self._fetched)

    def discard(self) -> None:
        self.finish_failed(TaskCanceled())

    def finish_failed(self, failure: BaseException, ctx: TaskContext | None = None) -> None:
        """After a cancel or a refused disk the version is ``editing`` again (with the refusal as its reason);
        after any other failure it is ``broken`` with the reason. Whatever reached the repository is removed."""
        shutil.rmtree(self.work_dir, ignore_errors=True)
        self._service._forget(self.layer_id, self.version_id)
        if isinstance(failure, TaskCanceled):
            state, reason = VersionState.EDITING, ""
        elif isinstance(failure, UserError):
            state, reason = VersionState.EDITING, f"Finalize refused: {failure}"
        else:
            state, reason = VersionState.BROKEN, f"Finalize failed: {failure}"
        try:
            self._service._end_finalize(self.version_id, state, reason=reason,
                                        comment=(self.comment or reason)[:COMMENT_LENGTH])
        except Exception:
            log.exception("cannot end the failed finalize of version %d", self.version_id)
            if ctx is not None:
                ctx.log("Could not record the end of the finalize.", "ERROR")


def packaging_service(services: Services) -> PackagingService:
    """The packaging service for the caller of a :class:`~app.services.Services` bundle."""
    ctx = ServiceContext(catalog=services.catalog, caller=services.caller, secrets=services.secrets)
    return PackagingService(ctx, services.home, LayerRepository(services.home.repository))


__all__ = [
    "PACKAGING_FORMATS",
    "FinalizeTask",
    "LayerScript",
    "PackagingDisk",
    "PackagingInfo",
    "PackagingInput",
    "PackagingService",
    "PackagingTask",
    "packaging_service",
    "read_layer_script",
]
