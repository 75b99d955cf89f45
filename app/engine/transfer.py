r"""Moving layer versions between installations: the export folder, its manifest and its objects.

An **export folder** (a local folder or ``\\HOST\SHARE[\folder]``) holds::

    layerdesk-export.json          the export manifest (replaced in one rename, always whole)
    objects/<hex>.wim              one version's content: image 1 its files, image 2 (OS layers imported
                                   from a gold disk) its boot partitions, as the repository keeps them
    objects/<hex>.json             that version's repository manifest (deletions, registry delta, disk
                                   identity, boot record), byte for byte as the repository stored it

``<hex>`` is the version's **content checksum** (:func:`content_checksum`): the SHA-256 of what the
version *is* – its repository manifest without the ids and names only one installation knows, and every
file's path, attributes, security descriptor and stream hashes – so the same version has the same
checksum in every installation, and an object already at the destination under that name is not copied
again. The export manifest (:class:`ExportManifest`) lists each layer (name, type, description, icon, OS
layer) with its versions (name, state, comment, created at/by, prerequisites by name, size, checksum)
and each version's objects with their SHA-256 and size; importing verifies every one before anything
enters the catalog or the repository.

Objects are written first (each under a temporary name, renamed when whole), the manifest last: an
export that fails or is cancelled leaves the previous manifest valid and everything it names intact.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from app import __version__
from app.engine.disk import DiskIdentity
from app.engine.gold import BOOT_IMAGE_SUFFIX
from app.engine.registry.delta import RegistryDelta, RegistryDeltaError
from app.engine.repository import (
    BootRecord,
    CaptureSource,
    Deletion,
    LayerRepository,
    RepositoryDamaged,
    SourceKind,
    StoredVersion,
    canonical_json,
    manifest_checksum,
)
from app.engine.wim import Wim, WimError
from app.errors import UserError
from app.files import write_atomic
from app.procs import Cancellable
from app.tasks.base import TaskCanceled

__all__ = [
    "EXPORT_FORMAT",
    "EXPORT_SCHEMA",
    "MANIFEST_FILE",
    "ExportManifest",
    "ExportTarget",
    "ExportedLayer",
    "ExportedObject",
    "ExportedVersion",
    "FolderTarget",
    "TransferError",
    "content_checksum",
    "parse_export_manifest",
    "stage_objects",
    "store_transferred_version",
    "write_version_objects",
]

EXPORT_FORMAT = "layerdesk.export"
EXPORT_SCHEMA = 1
MANIFEST_FILE = "layerdesk-export.json"
OBJECTS = "objects"
CHUNK = 4 * 1024 * 1024
_CHECKSUM = re.compile(r"sha256:([0-9a-f]{64})")
_HEX = re.compile(r"[0-9a-f]{64}")
#: The repository manifest's keys that only one installation knows (its catalog ids, the WIM image name,
#: where it imported the version from): left out of the content checksum.
_LOCAL_KEYS = frozenset({"layer_id", "version_id", "image", "source"})
#: Image names inside an object WIM.
_CONTENT_IMAGE = "version"
_BOOT_IMAGE = "boot"

ProgressFn = Callable[[int, int], None]


class TransferError(UserError):
    """An export folder cannot be written or read as asked (missing, malformed, damaged, newer)."""

    code = "transfer"


def _check(cancel: Cancellable | None) -> None:
    if cancel is not None and cancel.cancelled:
        raise TaskCanceled()


# --- the content checksum ------------------------------------------------------------------------------


def _tree_digest(layer_wim: Wim, index: int, cancel: Cancellable | None) -> str:
    """SHA-256 over every entry of an image (sorted by path): what a version's files are, whatever WIM holds
    them. Hard links count by their link count, not their inode number (which is per WIM)."""
    rows = []
    for entry in layer_wim.iterate_dir_tree(index):
        _check(cancel)
        rows.append([
            entry.path, entry.is_directory, entry.size, entry.attributes, list(entry.stream_names),
            [h.hex() if h is not None else None for h in entry.stream_hashes], entry.short_name,
            entry.reparse_tag, entry.link_count,
            hashlib.sha256(entry.security_descriptor).hexdigest() if entry.security_descriptor else None,
        ])
    rows.sort(key=lambda row: str(row[0]))
    return hashlib.sha256(canonical_json(rows)).hexdigest()


def _portable(document: Mapping[str, Any]) -> dict[str, Any]:
    """The repository manifest without what only its installation knows."""
    portable = {k: v for k, v in document.items() if k not in _LOCAL_KEYS}
    boot = portable.get("boot")
    if isinstance(boot, dict):
        portable["boot"] = {k: v for k, v in boot.items() if k != "image"}
    return portable


def content_checksum(document: Mapping[str, Any], layer_wim: Wim, content_index: int, boot_index: int | None,
                     cancel: Cancellable | None = None) -> str:
    """``sha256:…`` of a version: its repository manifest ``document`` without local ids, and the trees of its
    content image (and boot image, if any) in ``layer_wim``."""
    trees = [_tree_digest(layer_wim, content_index, cancel)]
    if boot_index is not None:
        trees.append(_tree_digest(layer_wim, boot_index, cancel))
    return "sha256:" + hashlib.sha256(canonical_json({"manifest": _portable(document), "trees": trees})).hexdigest()


def stored_manifest_document(repository: LayerRepository, layer_id: int, version_id: int,
                             checksum: str | None) -> tuple[dict[str, Any], bytes]:
    """A stored version's manifest document and the manifest file's bytes, verified against the catalog's
    ``checksum`` (:class:`RepositoryDamaged` otherwise)."""
    repository.manifest(layer_id, version_id, checksum)  # verifies the file against itself and the catalog
    raw = repository.manifest_path(layer_id, version_id).read_bytes()
    document = json.loads(raw)["manifest"]
    if manifest_checksum(document) != checksum:
        raise RepositoryDamaged(f"The manifest of layer {layer_id} version {version_id} changed while it was read.")
    return document, raw


def stored_content_checksum(repository: LayerRepository, layer_id: int, version_id: int, checksum: str | None,
                            cancel: Cancellable | None = None) -> str:
    """The content checksum of a version stored in ``repository``."""
    document, _ = stored_manifest_document(repository, layer_id, version_id, checksum)
    with Wim.open(repository.wim_path(layer_id)) as layer_wim:
        content, boot = _version_images(layer_wim, document, f"layer {layer_id} version {version_id}")
        return content_checksum(document, layer_wim, content, boot, cancel)


def _version_images(layer_wim: Wim, document: Mapping[str, Any], what: str) -> tuple[int, int | None]:
    content = layer_wim.find_image(str(document["image"]))
    if content is None:
        raise RepositoryDamaged(f"The repository's WIM has no image {document['image']} for {what}.")
    boot = document.get("boot")
    boot_index = None
    if isinstance(boot, dict):
        boot_index = layer_wim.find_image(str(boot["image"]))
        if boot_index is None:
            raise RepositoryDamaged(f"The repository's WIM has no boot image {boot['image']} for {what}.")
    return content, boot_index


# --- the export manifest ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportedObject:
    """One file of the export folder: ``path`` relative to it (``objects/<hex>.wim``), its SHA-256 (hex)
    and size."""

    kind: str  # "wim" or "manifest"
    path: str
    sha256: str
    size: int

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": self.path, "sha256": self.sha256, "size": self.size}


@dataclass(frozen=True)
class ExportedVersion:
    name: str
    state: str
    comment: str
    created_at: str
    created_by: str
    #: ``LAYER:VERSION`` of each prerequisite.
    prerequisites: tuple[str, ...]
    size_bytes: int
    #: The content checksum (:func:`content_checksum`), the same in every installation.
    checksum: str
    objects: tuple[ExportedObject, ...]

    def object(self, kind: str) -> ExportedObject:
        return next(o for o in self.objects if o.kind == kind)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "state": self.state, "comment": self.comment, "created_at": self.created_at,
            "created_by": self.created_by, "prerequisites": list(self.prerequisites), "size_bytes": self.size_bytes,
            "checksum": self.checksum, "objects": [o.to_dict() for o in self.objects],
        }


@dataclass(frozen=True)
class ExportedLayer:
    name: str
    type: str
    description: str
    icon: str | None
    os_layer: str | None
    versions: tuple[ExportedVersion, ...]

    def version(self, name: str) -> ExportedVersion | None:
        return next((v for v in self.versions if v.name.casefold() == name.casefold()), None)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type, "description": self.description, "icon": self.icon,
                "os_layer": self.os_layer, "versions": [v.to_dict() for v in self.versions]}


@dataclass(frozen=True)
class ExportManifest:
    """What an export folder holds (``layerdesk-export.json``)."""

    layers: tuple[ExportedLayer, ...] = ()
    layerdesk: str = __version__
    written_at: str = ""
    #: The last export or sync that wrote this manifest: when, and which versions it copied.
    last_sync: Mapping[str, Any] = field(default_factory=dict)

    def layer(self, name: str) -> ExportedLayer | None:
        return next((layer for layer in self.layers if layer.name.casefold() == name.casefold()), None)

    def to_dict(self) -> dict[str, Any]:
        return {"format": EXPORT_FORMAT, "schema": EXPORT_SCHEMA, "layerdesk": self.layerdesk,
                "written_at": self.written_at, "last_sync": dict(self.last_sync),
                "layers": [layer.to_dict() for layer in self.layers]}

    def to_bytes(self) -> bytes:
        return (json.dumps(self.to_dict(), indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def object_path(checksum: str, kind: str) -> str:
    """Where a version's object lies in the export folder."""
    match = _CHECKSUM.fullmatch(checksum)
    assert match is not None
    return f"{OBJECTS}/{match[1]}.{'wim' if kind == 'wim' else 'json'}"


def _safe_relative(path: object, where: str) -> str:
    """``path`` as a relative path inside the export folder; refused when it is absolute or climbs out."""
    if not isinstance(path, str) or not path:
        raise ValueError(f"{where}: the object path {path!r} is not a path")
    pure = PurePosixPath(path.replace("\\", "/"))
    if pure.is_absolute() or re.match(r"[A-Za-z]:", path) or ".." in pure.parts or path.startswith(("\\", "/")):
        raise ValueError(f"{where}: the object path {path!r} points outside the export folder")
    if pure.parts[:1] != (OBJECTS,) or len(pure.parts) != 2:
        raise ValueError(f"{where}: the object path {path!r} is not in the {OBJECTS} folder")
    return pure.as_posix()


def parse_export_manifest(raw: bytes, where: str) -> ExportManifest:
    """Read an export manifest, checking every field; :class:`TransferError` with the reason (and, for bad
    JSON, the line and column) otherwise. ``where`` names the file in messages."""
    try:
        document = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise TransferError(f"{where} is not UTF-8 text (byte {exc.start}); it is not a LayerDesk export "
                            "manifest.") from None
    except json.JSONDecodeError as exc:
        raise TransferError(f"{where} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}. "
                            "Export again to rewrite it.") from None
    if not isinstance(document, dict) or document.get("format") != EXPORT_FORMAT:
        raise TransferError(f"{where} is not a LayerDesk export manifest (its format is not {EXPORT_FORMAT!r}).")
    schema = document.get("schema")
    if isinstance(schema, bool) or not isinstance(schema, int):
        raise TransferError(f"{where} has no valid format version (schema {schema!r}).")
    if schema > EXPORT_SCHEMA:
        raise TransferError(
            f"{where} was written by a newer LayerDesk ({document.get('layerdesk', 'unknown version')}, export "
            f"format version {schema}); this LayerDesk ({__version__}) reads format version {EXPORT_SCHEMA}. "
            "Update LayerDesk to import it.")
    if schema < 1:
        raise TransferError(f"{where} has the unknown export format version {schema}.")
    try:
        layers = document["layers"]
        if not isinstance(layers, list):
            raise ValueError("'layers' is not a list")
        parsed = tuple(_parse_layer(item) for item in layers)
        names = [layer.name.casefold() for layer in parsed]
        if len(set(names)) != len(names):
            raise ValueError("a layer is listed twice")
        last_sync = document.get("last_sync", {})
        if not isinstance(last_sync, dict):
            raise ValueError("'last_sync' is not an object")
        return ExportManifest(parsed, str(document.get("layerdesk", "")), str(document.get("written_at", "")),
                              last_sync)
    except (KeyError, TypeError, ValueError) as exc:
        what = f"the field {exc}" if isinstance(exc, KeyError) else str(exc)
        raise TransferError(f"{where} is damaged: {what}{' is missing' if isinstance(exc, KeyError) else ''}. "
                            "Export again to rewrite it.") from None


def _text(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} is not text: {value!r}")
    return value


def _count(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} is not a count: {value!r}")
    return value


def _parse_layer(item: object) -> ExportedLayer:
    if not isinstance(item, dict):
        raise ValueError(f"a layer entry is not an object: {item!r}")
    name = _text(item["name"], "a layer name")
    layer_type = _text(item["type"], f"the type of {name}")
    if layer_type not in ("os", "platform", "app"):
        raise ValueError(f"layer {name} has the unknown type {layer_type!r}")
    icon, os_layer = item.get("icon"), item.get("os_layer")
    versions = item["versions"]
    if not isinstance(versions, list):
        raise ValueError(f"the versions of {name} are not a list")
    return ExportedLayer(
        name, layer_type, _text(item.get("description", ""), f"the description of {name}"),
        None if icon is None else _text(icon, f"the icon of {name}"),
        None if os_layer is None else _text(os_layer, f"the OS layer of {name}"),
        tuple(_parse_version(name, v) for v in versions),
    )


def _parse_version(layer: str, item: object) -> ExportedVersion:
    if not isinstance(item, dict):
        raise ValueError(f"a version entry of {layer} is not an object")
    name = _text(item["name"], f"a version name of {layer}")
    where = f"{layer}:{name}"
    checksum = _text(item["checksum"], f"the checksum of {where}")
    if not _CHECKSUM.fullmatch(checksum):
        raise ValueError(f"the checksum of {where} is not sha256:<64 hex digits>")
    prerequisites = item.get("prerequisites", [])
    if not isinstance(prerequisites, list):
        raise ValueError(f"the prerequisites of {where} are not a list")
    objects = []
    for entry in item["objects"]:
        if not isinstance(entry, dict):
            raise ValueError(f"an object of {where} is not an object")
        kind = _text(entry["kind"], f"an object kind of {where}")
        if kind not in ("wim", "manifest"):
            raise ValueError(f"{where} has an object of unknown kind {kind!r}")
        digest = _text(entry["sha256"], f"an object checksum of {where}")
        if not _HEX.fullmatch(digest):
            raise ValueError(f"an object checksum of {where} is not 64 hex digits")
        objects.append(ExportedObject(kind, _safe_relative(entry["path"], where), digest,
                                      _count(entry["size"], f"an object size of {where}")))
    if sorted(o.kind for o in objects) != ["manifest", "wim"]:
        raise ValueError(f"{where} does not list exactly one WIM and one manifest object")
    return ExportedVersion(
        name, _text(item["state"], f"the state of {where}"), _text(item.get("comment", ""), f"the comment of {where}"),
        _text(item.get("created_at", ""), f"the creation time of {where}"),
        _text(item.get("created_by", ""), f"the creator of {where}"),
        tuple(_text(p, f"a prerequisite of {where}") for p in prerequisites),
        _count(item["size_bytes"], f"the size of {where}"), checksum, tuple(objects),
    )


# --- where an export folder is ----------------------------------------------------------------------------


class ExportTarget(Protocol):
    """An export folder, local or on a share; paths are ``/``-separated and relative to it."""

    description: str

    def exists(self) -> bool: ...
    def read(self, relative: str) -> bytes | None: ...
    def size(self, relative: str) -> int | None: ...
    def makedirs(self, relative: str) -> None: ...
    def put(self, source: Path, relative: str, *, progress: Callable[[int], None] | None = None,
            cancel: Cancellable | None = None) -> None: ...
    def get(self, relative: str, target: Path, *, progress: Callable[[int], None] | None = None,
            cancel: Cancellable | None = None) -> None: ...
    def replace(self, relative: str, data: bytes) -> None: ...
    def listdir(self, relative: str) -> list[str]: ...
    def remove(self, relative: str) -> None: ...
    def close(self) -> None: ...


def _copy(read: Any, write: Any, progress: Callable[[int], None] | None, cancel: Cancellable | None) -> None:
    done = 0
    while chunk := read(CHUNK):
        _check(cancel)
        write(chunk)
        done += len(chunk)
        if progress is not None:
            progress(done)


class FolderTarget:
    """An export folder on a local (or mounted) file system."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.description = str(self.root)

    def _path(self, relative: str) -> Path:
        return self.root.joinpath(*PurePosixPath(relative).parts)

    def exists(self) -> bool:
        return self.root.is_dir()

    def read(self, relative: str) -> bytes | None:
        try:
            return self._path(relative).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise TransferError(f"Cannot read {self._path(relative)}: {exc.strerror or exc}.") from None

    def size(self, relative: str) -> int | None:
        try:
            return self._path(relative).stat().st_size
        except FileNotFoundError:
            return None

    def makedirs(self, relative: str) -> None:
        self._path(relative).mkdir(parents=True, exist_ok=True)

    def put(self, source: Path, relative: str, *, progress: Callable[[int], None] | None = None,
            cancel: Cancellable | None = None) -> None:
        final = self._path(relative)
        partial = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.partial")
        try:
            with source.open("rb") as src, partial.open("wb") as dst:
                _copy(src.read, dst.write, progress, cancel)
                dst.flush()
                os.fsync(dst.fileno())
            partial.replace(final)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise

    def get(self, relative: str, target: Path, *, progress: Callable[[int], None] | None = None,
            cancel: Cancellable | None = None) -> None:
        try:
            with self._path(relative).open("rb") as src, target.open("wb") as dst:
                _copy(src.read, dst.write, progress, cancel)
        except FileNotFoundError:
            raise TransferError(f"The export folder {self.root} lacks {relative}: the export is incomplete. "
                                "Export again.") from None

    def replace(self, relative: str, data: bytes) -> None:
        write_atomic(self._path(relative), data)

    def listdir(self, relative: str) -> list[str]:
        folder = self._path(relative)
        return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []

    def remove(self, relative: str) -> None:
        self._path(relative).unlink(missing_ok=True)

    def close(self) -> None:
        pass


def read_manifest(target: ExportTarget, *, required: bool) -> ExportManifest | None:
    """The export folder's manifest; ``None`` when there is none yet and ``required`` is false."""
    raw = target.read(MANIFEST_FILE)
    if raw is None:
        if required:
            raise TransferError(f"{target.description} holds no LayerDesk export (it has no {MANIFEST_FILE}).")
        return None
    return parse_export_manifest(raw, f"{MANIFEST_FILE} in {target.description}")


# --- writing a version's objects ------------------------------------------------------------------------


def sha256_file(path: Path, cancel: Cancellable | None = None) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(CHUNK):
            _check(cancel)
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class VersionObjects:
    """A version's objects written into a local work folder, ready to be copied into an export folder."""

    checksum: str
    wim: Path
    manifest: Path

    def described(self) -> tuple[ExportedObject, ...]:
        return tuple(
            ExportedObject(kind, object_path(self.checksum, kind), sha256_file(path), path.stat().st_size)
            for kind, path in (("wim", self.wim), ("manifest", self.manifest))
        )


def write_version_objects(repository: LayerRepository, layer_id: int, version_id: int, checksum: str | None,
                          work: Path, *, progress: ProgressFn | None = None,
                          cancel: Cancellable | None = None) -> VersionObjects:
    """Write a stored version's objects into the existing folder ``work``: a WIM holding its content image
    (and boot image) as the repository keeps them (the compressed data is copied, not recompressed) and its
    manifest file. The manifest is verified against the catalog's ``checksum`` first."""
    document, raw = stored_manifest_document(repository, layer_id, version_id, checksum)
    what = f"layer {layer_id} version {version_id}"
    with Wim.open(repository.wim_path(layer_id)) as layer_wim:
        content, boot = _version_images(layer_wim, document, what)
        portable = content_checksum(document, layer_wim, content, boot, cancel)
        name = _hex_of(portable)
        wim_path, manifest_path = work / f"{name}.wim", work / f"{name}.json"
        with Wim.create("xpress") as out:
            layer_wim.export_image(content, out, _CONTENT_IMAGE)
            if boot is not None:
                layer_wim.export_image(boot, out, _BOOT_IMAGE)
            out.write(wim_path, check_integrity=True, progress=progress, cancel=cancel)
    manifest_path.write_bytes(raw)
    return VersionObjects(portable, wim_path, manifest_path)


def _hex_of(checksum: str) -> str:
    match = _CHECKSUM.fullmatch(checksum)
    assert match is not None
    return match[1]


# --- reading objects back ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StagedVersion:
    """A version's objects copied out of an export folder and verified: ready to be stored."""

    layer: str
    version: str
    checksum: str
    wim: Path
    document: Mapping[str, Any]


def stage_objects(target: ExportTarget, layer: ExportedLayer, version: ExportedVersion, staging: Path, *,
                  progress: Callable[[int], None] | None = None, cancel: Cancellable | None = None) -> StagedVersion:
    """Copy a version's objects into ``staging`` and verify them: each object's SHA-256 and size against the
    export manifest, the repository manifest against its own checksum, and the content checksum of the
    pair against the one the export manifest states. :class:`TransferError` naming the object otherwise."""
    where = f"{layer.name}:{version.name}"
    local: dict[str, Path] = {}
    for item in version.objects:
        path = staging / PurePosixPath(item.path).name
        target.get(item.path, path, progress=progress, cancel=cancel)
        size = path.stat().st_size
        if size != item.size:
            raise TransferError(f"The object {item.path} of {where} in {target.description} is {size} bytes, not "
                                f"the {item.size} its manifest states: it is damaged or incomplete. Nothing was "
                                "imported; export it again.")
        if sha256_file(path, cancel) != item.sha256:
            raise TransferError(f"The object {item.path} of {where} in {target.description} does not match its "
                                "SHA-256 in the export manifest: it is damaged. Nothing was imported; export it "
                                "again.")
        local[item.kind] = path
    try:
        outer = json.loads(local["manifest"].read_bytes())
        document = outer["manifest"]
        if not isinstance(document, dict) or manifest_checksum(document) != outer["checksum"]:
            raise ValueError("its content does not match its checksum")
        _parse_portable(document)
    except (ValueError, KeyError, TypeError, RegistryDeltaError) as exc:
        raise TransferError(f"The version manifest of {where} in {target.description} is damaged ({exc}). "
                            "Nothing was imported.") from None
    try:
        with Wim.open(local["wim"], check_integrity=True) as wim:
            boot = wim.find_image(_BOOT_IMAGE)
            found = content_checksum(document, wim, 1, boot, cancel)
    except WimError as exc:
        raise TransferError(f"The object {version.object('wim').path} of {where} cannot be read as a WIM: {exc}. "
                            "Nothing was imported.") from None
    if found != version.checksum:
        raise TransferError(f"The content of {where} in {target.description} does not match its checksum "
                            f"({found}, the manifest states {version.checksum}). Nothing was imported.")
    return StagedVersion(layer.name, version.name, found, local["wim"], document)


@dataclass(frozen=True)
class _Portable:
    deletions: tuple[Deletion, ...]
    registry: RegistryDelta
    disk: DiskIdentity | None
    boot: Mapping[str, Any] | None


def _parse_portable(document: Mapping[str, Any]) -> _Portable:
    deletions = document["deletions"]
    if not isinstance(deletions, list):
        raise ValueError("'deletions' is not a list")
    disk, boot = document.get("disk"), document.get("boot")
    if boot is not None:
        BootRecord.from_dict(boot)  # checks it
    return _Portable(tuple(Deletion.from_dict(d) for d in deletions), RegistryDelta.from_dict(document["registry"]),
                     DiskIdentity.from_dict(disk) if disk is not None else None, boot)


def store_transferred_version(repository: LayerRepository, layer_id: int, version_id: int, staged: StagedVersion,
                              *, progress: ProgressFn | None = None,
                              cancel: Cancellable | None = None) -> StoredVersion:
    """Store a staged version as ``version_id`` of ``layer_id``: its images exported into the layer's WIM, its
    deletions, registry delta, disk identity and boot record kept. The stored version's content checksum is
    checked against the staged one (:class:`RepositoryDamaged` otherwise; the caller removes it)."""
    portable = _parse_portable(staged.document)
    boot: BootRecord | None = None
    name = f"v{version_id}"
    if portable.boot is not None:
        boot = BootRecord.from_dict({**portable.boot, "image": name + BOOT_IMAGE_SUFFIX})
    with Wim.open(staged.wim) as source:
        boot_index = source.find_image(_BOOT_IMAGE)

        def build(layer_wim: Wim, image: str) -> int:
            index = source.export_image(1, layer_wim, image)
            if boot_index is not None:
                source.export_image(boot_index, layer_wim, image + BOOT_IMAGE_SUFFIX)
            return index

        stored = repository.store_version(
            layer_id, version_id, CaptureSource(SourceKind.WIM, staged.wim, 1), deletions=portable.deletions,
            delta=portable.registry, build=build, disk=portable.disk, boot=boot, progress=progress, cancel=cancel,
        )
    found = stored_content_checksum(repository, layer_id, version_id, stored.checksum, cancel)
    if found != staged.checksum:
        raise RepositoryDamaged(f"{staged.layer}:{staged.version} was stored with the content checksum {found}, not "
                                f"{staged.checksum}.")
    return stored


@contextlib.contextmanager
def staging_folder(parent: Path) -> Iterator[Path]:
    """A private work folder under ``parent``, removed afterwards whatever happens."""
    parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=".transfer-", dir=parent))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def referenced_objects(manifest: ExportManifest) -> set[str]:
    return {o.path for layer in manifest.layers for v in layer.versions for o in v.objects}


def unreferenced(target: ExportTarget, manifest: ExportManifest, keep: Sequence[str] = ()) -> list[str]:
    """Objects in the export folder its manifest no longer names (and leftover partial copies)."""
    wanted = referenced_objects(manifest) | set(keep)
    return [f"{OBJECTS}/{name}" for name in target.listdir(OBJECTS) if f"{OBJECTS}/{name}" not in wanted]
