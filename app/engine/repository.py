"""The layer repository: every layer version's content, deletions and registry delta, on disk.

Layout under the repository root (``Home.repository``)::

    layers/<layer_id>.wim              one WIM per layer (XPRESS), one image per version, named v<version_id>
    layers/<layer_id>/v<version_id>.json   the version's manifest

* **Dedup.** wimlib stores each distinct file content (by SHA-1) once per WIM, so the versions of a layer
  share every unchanged file; compression is XPRESS (DESIGN.md §4: LZX costs 8× the time for 1 % less).
* **Fidelity.** Images are captured by wimlib: data, attributes, security descriptors, alternate data
  streams, reparse points, short names and timestamps (from NTFS volume images; a Linux folder has no ACLs).
* **Manifest.** ``{"checksum": "sha256:…", "manifest": {…}}`` where the manifest holds the schema
  version, layer and version ids, image name, source, deletions (whiteouts), the registry delta, file
  count and data bytes, and ``checksum`` is the SHA-256 of the manifest's canonical JSON (sorted keys, no
  blanks, UTF-8). The catalog keeps the same value in ``LayerVersion.checksum``; :meth:`manifest` refuses
  a manifest that does not match its own checksum or the catalog's. The WIM's file data is checked by
  wimlib itself: every blob carries its SHA-1 (verified on extraction and by :meth:`check`) and each WIM
  is written with an integrity table.
* **Atomic writes.** A WIM is never changed in place: the whole new WIM is written to a work file
  (``.<layer_id>.wim.v<version_id>.tmp``), synced, and renamed over the old one; manifests likewise. A
  crash, a failure or a cancel leaves the previous WIM untouched; leftover work files are removed by
  :meth:`remove_version` for that version (and reported by :meth:`check`). Existing compressed data is
  copied raw, so a rewrite costs about one sequential copy of the layer's WIM.
* **Locking.** Changes to one layer's WIM are serialised by an exclusive lock on ``.<layer_id>.lock``
  (``flock``; held across processes, released by the OS if the holder dies). The lock file goes away
  with the layer's last version.

Version ids are catalog row ids, which SQLite may hand out again after the newest version was deleted:
storing a version replaces whatever an earlier holder of its id left behind.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.engine import gold
from app.engine.disk import (
    DiskError,
    DiskIdentity,
    check_image,
    extract_partition,
    image_info,
    read_image_partition_table,
)
from app.engine.gold import GoldLayout
from app.engine.registry.delta import RegistryDelta, RegistryDeltaError
from app.engine.wim import Compression, DeleteCommand, DirEntry, ProgressFn, Wim, WimError
from app.errors import EnvironmentProblem, LayerDeskError
from app.files import fsync_dir, write_atomic
from app.procs import Cancellable
from app.tasks.base import TaskCanceled

log = logging.getLogger(__name__)

__all__ = [
    "MANIFEST_FORMAT",
    "MANIFEST_SCHEMA",
    "BootRecord",
    "CaptureSource",
    "Deletion",
    "LayerRepository",
    "RepositoryDamaged",
    "RepositoryError",
    "SourceKind",
    "StoredVersion",
    "VersionKey",
    "VersionManifest",
    "image_name",
]

MANIFEST_FORMAT = "layerdesk.layer-version"
MANIFEST_SCHEMA = 1
_CHECKSUM_PREFIX = "sha256:"
_COMPRESSION: Compression = "xpress"
_LOCK_POLL_S = 0.1

_WIM_NAME = re.compile(r"(\d+)\.wim")
_MANIFEST_NAME = re.compile(r"v(\d+)\.json")
_IMAGE_NAME = re.compile(r"v(\d+)")
_BOOT_IMAGE_NAME = re.compile(r"v(\d+)" + re.escape(gold.BOOT_IMAGE_SUFFIX))
_LOCK_NAME = re.compile(r"\.(\d+)\.lock")
#: Work files: ``.<layer>.wim.v<version>.tmp`` and wimlib's ``..<layer>.wim.v<version>.tmp.<pid>.partial``
#: beside the WIMs, ``.v<version>.json.tmp`` beside the manifests.
_WORK_NAME = re.compile(r"\.{1,2}(?P<layer>\d+)\.wim\.v(?P<version>\d+)\.tmp(?:\.\d+\.partial)?")
_MANIFEST_WORK_NAME = re.compile(r"\.v(?P<version>\d+)\.json\.tmp")
#: Work folders of an import in progress, beside the WIMs: a disk image's partitions copied out
#: (``.import-<layer>-v<version>-<random>``) and a difference import's volumes (``.difference-<layer>-v<version>``).
_WORK_FOLDER_NAME = re.compile(r"\.(?:import|difference)-(?P<layer>\d+)-v(?P<version>\d+)(?:-\w+)?")

#: ``(layer_id, version_id)``
VersionKey = tuple[int, int]


class RepositoryError(EnvironmentProblem):
    """The layer repository cannot be read or written (disk, permissions, a busy layer)."""

    code = "repository"


class RepositoryDamaged(RepositoryError):
    """A stored object is missing, damaged, or does not match the catalog: it is never used."""

    code = "repository_damaged"


class SourceKind(enum.StrEnum):
    FOLDER = "folder"
    WIM = "wim"
    NTFS_VOLUME = "ntfs_volume"
    #: A disk image of any format qemu-img reads; its Windows NTFS partition is captured.
    DISK_IMAGE = "disk_image"


@dataclass(frozen=True)
class CaptureSource:
    """What a version is captured from: a folder, one image of a WIM file, or an NTFS volume image."""

    kind: SourceKind
    path: Path
    #: The 1-based image of a WIM source; ``None`` for the other kinds.
    image: int | None = None
    #: A difference import's base (a disk image or NTFS volume image): the version is what changed from it
    #: to ``path`` (see :mod:`app.engine.difference`); ``None`` for a plain capture.
    base: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        document: dict[str, Any] = {"kind": self.kind.value, "path": str(self.path), "image": self.image}
        if self.base is not None:
            document["base"] = str(self.base)
        return document

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CaptureSource:
        image, base = data.get("image"), data.get("base")
        return cls(SourceKind(data["kind"]), Path(data["path"]), int(image) if image is not None else None,
                   Path(base) if base is not None else None)


@dataclass(frozen=True)
class Deletion:
    """A whiteout: what the version removes from the layers below it.

    ``path`` is relative to the image root, Windows-style (``Program Files\\App\\old.dll``). ``opaque``:
    the directory ``path`` hides everything the lower layers had in it (the directory itself stays).
    """

    path: str
    opaque: bool = False

    def __post_init__(self) -> None:
        parts = self.path.split("\\")
        if not self.path or "/" in self.path or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"not a relative Windows path inside the layer: {self.path!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "opaque": self.opaque}

    @classmethod
    def from_dict(cls, data: object) -> Deletion:
        if not isinstance(data, dict) or set(data) != {"path", "opaque"}:
            raise ValueError(f"a deletion is {{'path': …, 'opaque': …}}, not {data!r}")
        path, opaque = data["path"], data["opaque"]
        if not isinstance(path, str) or not isinstance(opaque, bool):
            raise ValueError(f"bad deletion {data!r}")
        return cls(path, opaque)

    @property
    def image_path(self) -> str:
        """The path as wimlib spells it (``/Program Files/App/old.dll``)."""
        return "/" + self.path.replace("\\", "/")


@dataclass(frozen=True)
class BootRecord:
    """What an OS layer version keeps of its gold disk besides the Windows volume's files (see
    :mod:`app.engine.gold`): the layout, and the image of the layer's WIM holding the other partitions'
    bytes and the Windows volume's boot code, each file with its SHA-256."""

    image: str
    layout: GoldLayout
    files: Mapping[str, str]

    def to_dict(self) -> dict[str, Any]:
        return {"image": self.image, "layout": self.layout.to_dict(), "files": dict(sorted(self.files.items()))}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BootRecord:
        image = str(data["image"])
        if not _BOOT_IMAGE_NAME.fullmatch(image):
            raise ValueError(f"bad boot image name {image!r}")
        files = data["files"]
        if not isinstance(files, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and v.startswith(_CHECKSUM_PREFIX) for k, v in files.items()
        ):
            raise ValueError("'files' of the boot record is not a map of file names to checksums")
        layout = GoldLayout.from_dict(data["layout"])
        missing = {p.file for p in layout.kept} - set(files)
        if missing:
            raise ValueError(f"the boot record has no checksum for {sorted(m for m in missing if m)}")
        return cls(image, layout, files)


@dataclass(frozen=True)
class VersionManifest:
    """A version's manifest, read back and verified."""

    layer_id: int
    version_id: int
    image: str
    source: CaptureSource
    deletions: tuple[Deletion, ...]
    registry: RegistryDelta
    files: int
    data_bytes: int
    checksum: str
    #: The gold image's disk identity, for versions imported from a disk image.
    disk: DiskIdentity | None = None
    #: The gold disk's layout and boot partitions, for OS layer versions imported from a disk image.
    boot: BootRecord | None = None


@dataclass(frozen=True)
class StoredVersion:
    """What :meth:`LayerRepository.store_version` stored."""

    image: str
    #: ``sha256:…`` of the manifest: what the catalog keeps in ``LayerVersion.checksum``.
    checksum: str
    #: Files in the image (directories not counted).
    files: int
    #: Bytes of file data in the version (each hard-linked file once).
    data_bytes: int
    #: Size of the layer's WIM file after the store (all its versions).
    wim_bytes: int
    deletions: int = 0
    registry_operations: int = 0


@dataclass
class _ImageCount:
    files: int = 0
    data_bytes: int = 0
    _linked: set[int] = field(default_factory=set)

    def add(self, entry: DirEntry) -> None:
        if entry.is_directory:
            return
        self.files += 1
        if entry.link_count > 1:
            if entry.inode_id in self._linked:
                return
            self._linked.add(entry.inode_id)
        self.data_bytes += entry.size


def image_name(version_id: int) -> str:
    return f"v{version_id}"


def canonical_json(document: Any) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def manifest_checksum(document: Mapping[str, Any]) -> str:
    return _CHECKSUM_PREFIX + hashlib.sha256(canonical_json(document)).hexdigest()


# --- file system helpers ------------------------------------------------------------------------------


@contextlib.contextmanager
def _exclusive(lock_path: Path, cancel: Cancellable | None, *, discard: Any) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_path`` (created if needed). ``discard()`` is asked on release
    whether the lock file can go (the layer has nothing stored any more)."""
    if sys.platform == "win32":
        import msvcrt

        while True:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
                break
            except OSError:
                os.close(fd)
                if cancel is not None and cancel.cancelled:
                    raise TaskCanceled() from None
                time.sleep(_LOCK_POLL_S)
        try:
            yield
        finally:
            os.close(fd)  # the lock file stays: an open file cannot be deleted on Windows
        return

    import fcntl

    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if cancel is not None and cancel.cancelled:
                raise TaskCanceled() from None
            time.sleep(_LOCK_POLL_S)
            continue
        except BaseException:
            os.close(fd)
            raise
        # The holder before us may have deleted the file after we opened it: then lock the new one.
        try:
            current = lock_path.stat()
        except FileNotFoundError:
            os.close(fd)
            continue
        held = os.fstat(fd)
        if (held.st_dev, held.st_ino) != (current.st_dev, current.st_ino):
            os.close(fd)
            continue
        break
    try:
        yield
    finally:
        try:
            if discard():
                lock_path.unlink(missing_ok=True)
        finally:
            os.close(fd)


# --- the repository -----------------------------------------------------------------------------------


class LayerRepository:
    """The layer repository at ``root`` (see the module docstring). Safe to use from several processes."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.layers = self.root / "layers"

    def ensure(self) -> LayerRepository:
        """Create the repository's folders (idempotent)."""
        try:
            self.layers.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RepositoryError(f"Cannot create the layer repository {self.layers}: {exc.strerror or exc}.") from exc
        return self

    # --- names ---------------------------------------------------------------------------------

    def wim_path(self, layer_id: int) -> Path:
        return self.layers / f"{layer_id}.wim"

    def manifest_path(self, layer_id: int, version_id: int) -> Path:
        return self.layers / str(layer_id) / f"{image_name(version_id)}.json"

    def _work_path(self, layer_id: int, version_id: int) -> Path:
        return self.layers / f".{layer_id}.wim.{image_name(version_id)}.tmp"

    def _lock_path(self, layer_id: int) -> Path:
        return self.layers / f".{layer_id}.lock"

    def _locked(self, layer_id: int, cancel: Cancellable | None) -> contextlib.AbstractContextManager[None]:
        def nothing_stored() -> bool:
            folder = self.layers / str(layer_id)
            return not self.wim_path(layer_id).exists() and not (folder.exists() and any(folder.iterdir()))

        try:
            self.ensure()
            return _exclusive(self._lock_path(layer_id), cancel, discard=nothing_stored)
        except OSError as exc:
            raise RepositoryError(f"Cannot lock layer {layer_id} in the repository: {exc.strerror or exc}.") from exc

    # --- storing -------------------------------------------------------------------------------

    def store_version(
        self,
        layer_id: int,
        version_id: int,
        source: CaptureSource,
        *,
        deletions: Sequence[Deletion] = (),
        delta: RegistryDelta | None = None,
        drop: Sequence[str] = (),
        keep_boot: bool = False,
        build: Callable[[Wim, str], int] | None = None,
        disk: DiskIdentity | None = None,
        boot: BootRecord | None = None,
        progress: ProgressFn | None = None,
        cancel: Cancellable | None = None,
    ) -> StoredVersion:
        """Capture ``source`` as image ``v<version_id>`` of the layer's WIM and write its manifest.

        ``drop``: ``/``-separated paths in the captured tree that are not part of the layer (whiteout
        markers of a folder source); they are removed before anything is written. ``progress(done,
        total)`` reports the bytes written. ``keep_boot`` (OS layers): a disk image source's layout, other
        partitions and boot code are kept too (:class:`BootRecord`). ``build(layer_wim, name)``: adds the
        version's image ``name`` to the layer's WIM in place of a capture of ``source`` (which the manifest
        still records) and returns its index; a difference import builds it from two volumes, and keeps
        what it adds readable until this returns; ``disk`` and ``boot`` are then recorded as given (a version
        taken over from another installation keeps its gold disk's identity and boot record, whose image
        ``build`` adds as ``<name>-boot``). All or nothing: on failure or cancel,
        the previous WIM and manifests are untouched and no work file remains.
        """
        delta = delta if delta is not None else RegistryDelta()
        name = image_name(version_id)
        with self._locked(layer_id, cancel):
            wim_path = self.wim_path(layer_id)
            work = self._work_path(layer_id, version_id)
            manifest_path = self.manifest_path(layer_id, version_id)
            manifest_written = False
            try:
                with contextlib.ExitStack() as stack:
                    layer_wim = stack.enter_context(
                        Wim.open(wim_path) if wim_path.exists() else Wim.create(_COMPRESSION)
                    )
                    for stale_name in (name, name + gold.BOOT_IMAGE_SUFFIX):
                        stale = layer_wim.find_image(stale_name)
                        if stale is not None:
                            log.warning("replacing image %s of %s left by an earlier version with the same id",
                                        stale_name, wim_path)
                            layer_wim.delete_image(stale)
                    if build is not None:
                        index, identity = build(layer_wim, name), disk
                    else:
                        index, identity, boot = self._capture(stack, layer_wim, source, layer_id, name, drop,
                                                              keep_boot, cancel)
                    count = _ImageCount()
                    for entry in layer_wim.iterate_dir_tree(index):
                        count.add(entry)
                    layer_wim.write(work, check_integrity=True, fsync=True, progress=progress, cancel=cancel)
                if cancel is not None and cancel.cancelled:
                    raise TaskCanceled()
                document = {
                    "format": MANIFEST_FORMAT,
                    "schema": MANIFEST_SCHEMA,
                    "layer_id": layer_id,
                    "version_id": version_id,
                    "image": name,
                    "source": source.to_dict(),
                    "deletions": [d.to_dict() for d in deletions],
                    "registry": delta.to_dict(),
                    "files": count.files,
                    "data_bytes": count.data_bytes,
                }
                if identity is not None:
                    document["disk"] = identity.to_dict()
                if boot is not None:
                    document["boot"] = boot.to_dict()
                checksum = manifest_checksum(document)
                manifest_path.parent.mkdir(parents=True, exist_ok=True)
                body = json.dumps({"checksum": checksum, "manifest": document}, indent=1, sort_keys=True,
                                  ensure_ascii=False) + "\n"
                write_atomic(manifest_path, body.encode("utf-8"))
                manifest_written = True
                work.replace(wim_path)
                fsync_dir(self.layers)
            except BaseException:
                work.unlink(missing_ok=True)
                if manifest_written:
                    manifest_path.unlink(missing_ok=True)
                self._prune_layer_folder(layer_id)
                raise
            return StoredVersion(
                image=name, checksum=checksum, files=count.files, data_bytes=count.data_bytes,
                wim_bytes=wim_path.stat().st_size, deletions=len(deletions), registry_operations=len(delta),
            )

    def _capture(
        self, stack: contextlib.ExitStack, layer_wim: Wim, source: CaptureSource, layer_id: int, name: str,
        drop: Sequence[str], keep_boot: bool, cancel: Cancellable | None,
    ) -> tuple[int, DiskIdentity | None, BootRecord | None]:
        """Add ``source`` as image ``name``; return its index and, for a disk image, its identity and (with
        ``keep_boot``) its boot record."""
        if source.kind is SourceKind.WIM:
            source_wim = stack.enter_context(Wim.open(source.path))
            # Exported after the layer WIM was opened: ExitStack closes it first, before the layer WIM.
            return source_wim.export_image(source.image or 1, layer_wim, name), None, None
        if source.kind is SourceKind.NTFS_VOLUME:
            return layer_wim.add_image_from_ntfs_volume(source.path, name, cancel=cancel), None, None
        if source.kind is SourceKind.DISK_IMAGE:
            return self._capture_disk(stack, layer_wim, source, layer_id, name, keep_boot, cancel)
        index = layer_wim.add_image_from_folder(source.path, name, cancel=cancel)
        if drop:
            layer_wim.update_image(index, [DeleteCommand(path, recursive=False) for path in drop], cancel=cancel)
        return index, None, None

    def _capture_disk(
        self, stack: contextlib.ExitStack, layer_wim: Wim, source: CaptureSource, layer_id: int, name: str,
        keep_boot: bool, cancel: Cancellable | None,
    ) -> tuple[int, DiskIdentity, BootRecord | None]:
        """The Windows partition is copied out (sparse) beside the layer's WIM and captured; with
        ``keep_boot`` every other partition and the Windows volume's boot code become image
        ``<name>-boot``. The copies are removed afterwards."""
        folder = Path(tempfile.mkdtemp(prefix=f".import-{layer_id}-{name}-", dir=self.layers))
        stack.callback(shutil.rmtree, folder, ignore_errors=True)
        info = image_info(source.path)
        check_image(info)
        table = read_image_partition_table(info, folder)
        windows = table.ntfs_data_partition()
        layout = GoldLayout.of(table) if keep_boot else None  # refuses what cannot be laid out again, early
        volume = extract_partition(info, windows, folder / "volume.ntfs", cancel=cancel)
        with volume.open("rb") as file:
            vbr = file.read(gold.VBR_BYTES)
        if vbr[3:11] != b"NTFS    ":
            raise DiskError(f"{source.path}: the Windows partition read back is not an NTFS volume.")
        log.info("capturing partition %d of %s (%s, %d bytes)", windows.index, source.path, info.format,
                 windows.size)
        index = layer_wim.add_image_from_ntfs_volume(volume, name, cancel=cancel)
        volume.unlink()
        if layout is None:
            return index, DiskIdentity.of(table), None
        boot_folder = folder / "boot"
        boot_folder.mkdir()
        by_slot = {p.index: p for p in table.partitions}
        for partition in layout.kept:
            assert partition.file is not None
            extract_partition(info, by_slot[partition.slot], boot_folder / partition.file, cancel=cancel)
        (boot_folder / gold.VBR_FILE).write_bytes(vbr)
        files = {path.name: gold.sha256_file(path) for path in sorted(boot_folder.iterdir())}
        boot_name = name + gold.BOOT_IMAGE_SUFFIX
        layer_wim.add_image_from_folder(boot_folder, boot_name, cancel=cancel)
        log.info("kept the gold disk's layout (%s) and %d other partition(s) as image %s", layout.scheme,
                 len(layout.kept), boot_name)
        return index, DiskIdentity.of(table), BootRecord(boot_name, layout, files)

    def remove_version(
        self, layer_id: int, version_id: int, *, progress: ProgressFn | None = None,
        cancel: Cancellable | None = None,
    ) -> bool:
        """Drop version ``version_id``: its image (the WIM is rewritten without it; data other versions
        share stays), its manifest and any work file of it. Returns whether anything was there. Removing
        what is not there is not an error."""
        name = image_name(version_id)
        removed = False
        with self._locked(layer_id, cancel):
            wim_path = self.wim_path(layer_id)
            work = self._work_path(layer_id, version_id)
            try:
                if wim_path.exists():
                    with Wim.open(wim_path) as layer_wim:
                        # the version's image and its boot image; deleting renumbers, so highest first
                        indexes = sorted((i for i in (layer_wim.find_image(name),
                                                      layer_wim.find_image(name + gold.BOOT_IMAGE_SUFFIX))
                                          if i is not None), reverse=True)
                        index = indexes[0] if indexes else None
                        last = bool(indexes) and layer_wim.image_count == len(indexes)
                        if indexes and not last:
                            for doomed in indexes:
                                layer_wim.delete_image(doomed)
                            layer_wim.write(work, check_integrity=True, fsync=True, progress=progress,
                                            cancel=cancel)
                    if index is not None:
                        if last:
                            wim_path.unlink()
                        else:
                            work.replace(wim_path)
                        fsync_dir(self.layers)
                        removed = True
            finally:
                work.unlink(missing_ok=True)
            manifest = self.manifest_path(layer_id, version_id)
            if manifest.exists():
                manifest.unlink()
                removed = True
            removed = self._remove_work_files(layer_id, version_id) or removed
            self._prune_layer_folder(layer_id)
        return removed

    def _remove_work_files(self, layer_id: int, version_id: int) -> bool:
        """Work files and folders a killed process left for this version."""
        found = False
        for folder in self._work_folders():
            match = _WORK_FOLDER_NAME.fullmatch(folder.name)
            assert match is not None
            if (int(match["layer"]), int(match["version"])) == (layer_id, version_id):
                shutil.rmtree(folder, ignore_errors=True)
                found = True
        for path in self._work_files():
            match = _WORK_NAME.fullmatch(path.name) or _MANIFEST_WORK_NAME.fullmatch(path.name)
            assert match is not None
            owner = int(match["layer"]) if "layer" in match.groupdict() else int(path.parent.name)
            if owner == layer_id and int(match["version"]) == version_id:
                path.unlink(missing_ok=True)
                found = True
        return found

    def _work_folders(self) -> Iterator[Path]:
        if self.layers.is_dir():
            yield from (p for p in self.layers.iterdir() if p.is_dir() and _WORK_FOLDER_NAME.fullmatch(p.name))

    def _work_files(self) -> Iterator[Path]:
        if not self.layers.is_dir():
            return
        for path in self.layers.iterdir():
            if path.is_file() and _WORK_NAME.fullmatch(path.name):
                yield path
            elif path.is_dir() and path.name.isdigit():
                yield from (p for p in path.iterdir() if _MANIFEST_WORK_NAME.fullmatch(p.name))

    def _prune_layer_folder(self, layer_id: int) -> None:
        folder = self.layers / str(layer_id)
        with contextlib.suppress(OSError):  # not empty, or already gone
            folder.rmdir()

    # --- reading -------------------------------------------------------------------------------

    def manifest(self, layer_id: int, version_id: int, checksum: str | None) -> VersionManifest:
        """The version's manifest, verified against its own checksum and ``checksum``, the catalog's value.
        :class:`RepositoryDamaged` when it is missing, unreadable or does not match."""
        what = f"layer {layer_id} version {version_id}"
        if not checksum:
            raise RepositoryDamaged(f"The catalog has no checksum for {what}: it was never stored completely.")
        manifest = self._read_manifest(self.manifest_path(layer_id, version_id), what)
        if manifest.checksum != checksum:
            raise RepositoryDamaged(
                f"The stored manifest of {what} does not match the catalog (catalog {checksum}, repository "
                f"{manifest.checksum}); it is not used. `layerctl repo check` lists every problem."
            )
        if (manifest.layer_id, manifest.version_id) != (layer_id, version_id):
            raise RepositoryDamaged(f"The manifest stored for {what} belongs to layer {manifest.layer_id} "
                                    f"version {manifest.version_id}.")
        return manifest

    def _read_manifest(self, path: Path, what: str) -> VersionManifest:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise RepositoryDamaged(f"The repository has no manifest for {what} ({path} is missing).") from None
        except OSError as exc:
            raise RepositoryError(f"Cannot read the manifest of {what} ({path}): {exc.strerror or exc}.") from exc
        try:
            outer = json.loads(raw)
            if not isinstance(outer, dict) or set(outer) != {"checksum", "manifest"}:
                raise ValueError("expected an object with 'checksum' and 'manifest'")
            document = outer["manifest"]
            if not isinstance(document, dict):
                raise ValueError("'manifest' is not an object")
            stated = outer["checksum"]
            if manifest_checksum(document) != stated:
                raise RepositoryDamaged(
                    f"The manifest of {what} ({path}) is damaged: its content does not match its checksum."
                )
            return _parse_manifest(document, str(stated))
        except RepositoryDamaged:
            raise
        except (ValueError, KeyError, TypeError, RegistryDeltaError) as exc:
            raise RepositoryDamaged(f"The manifest of {what} ({path}) is damaged: {exc}") from None

    def extract_version_to_ntfs_volume(
        self, layer_id: int, version_id: int, volume: Path, *, checksum: str | None,
        progress: ProgressFn | None = None, cancel: Cancellable | None = None,
    ) -> VersionManifest:
        """Apply the version's image onto an empty NTFS volume image (see
        :meth:`Wim.extract_image_to_ntfs_volume`); the manifest is verified first and returned (its
        deletions and registry delta are the caller's to apply). wimlib checks every file's SHA-1 as it
        reads it."""
        manifest = self.manifest(layer_id, version_id, checksum)
        with Wim.open(self.wim_path(layer_id)) as layer_wim:
            index = layer_wim.find_image(manifest.image)
            if index is None:
                raise RepositoryDamaged(f"The repository's WIM of layer {layer_id} has no image {manifest.image} "
                                        f"for version {version_id}.")
            layer_wim.extract_image_to_ntfs_volume(index, volume, progress=progress, cancel=cancel)
        return manifest

    def extract_boot(
        self, layer_id: int, version_id: int, target: Path, *, checksum: str | None,
        cancel: Cancellable | None = None,
    ) -> tuple[BootRecord, dict[int, Path], bytes]:
        """The version's boot record, its kept partitions' bytes extracted into the existing folder
        ``target`` (by slot) and the Windows volume's boot code; every file is checked against the
        SHA-256 its manifest gives. :class:`RepositoryDamaged` when the version has none or it does not
        match."""
        manifest = self.manifest(layer_id, version_id, checksum)
        boot = manifest.boot
        if boot is None:
            raise RepositoryDamaged(f"Layer {layer_id} version {version_id} has no gold disk layout.")
        with Wim.open(self.wim_path(layer_id)) as layer_wim:
            index = layer_wim.find_image(boot.image)
            if index is None:
                raise RepositoryDamaged(f"The repository's WIM of layer {layer_id} has no image {boot.image} "
                                        f"for version {version_id}.")
            layer_wim.extract_paths_to_folder(index, ["/" + name for name in sorted(boot.files)], target)
        for name, expected in sorted(boot.files.items()):
            if cancel is not None and cancel.cancelled:
                raise TaskCanceled()
            if gold.sha256_file(target / name) != expected:
                raise RepositoryDamaged(f"The stored {name} of layer {layer_id} version {version_id} does not match "
                                        "its manifest's checksum; it is not used.")
        contents = {p.slot: target / p.file for p in boot.layout.kept if p.file is not None}
        return boot, contents, (target / gold.VBR_FILE).read_bytes()

    # --- checking ------------------------------------------------------------------------------

    def check(
        self, catalog: Mapping[VersionKey, str | None] | None = None, *,
        progress: ProgressFn | None = None, cancel: Cancellable | None = None,
    ) -> list[str]:
        """Every problem in the repository, in words (empty: healthy).

        Each WIM is opened with its integrity table checked and verified by wimlib (every blob's SHA-1,
        every image's metadata); each manifest must parse, match its checksum and have its image (with
        the file count it states); every image needs a manifest. ``catalog`` maps each layer version the
        catalog knows to its checksum (``None``: not stored yet, e.g. being imported): stored objects of
        versions the catalog does not know are orphans, versions with a checksum must be stored and
        match it. Work files are reported unless their version is still being stored.
        """
        problems: list[str] = []
        if not self.layers.is_dir():
            problems.extend(f"layer {layer} version {version}: not in the repository (it has no layers folder)"
                            for (layer, version), checksum in sorted((catalog or {}).items()) if checksum)
            return problems
        images: dict[VersionKey, int] = {}  # → file count in the image
        boot_images: set[VersionKey] = set()  # versions with a boot image (an OS layer's gold disk)
        damaged: set[int] = set()  # layers whose WIM could not be read: their images are unknown
        manifests: dict[VersionKey, VersionManifest] = {}
        wims = sorted((int(m[1]), p) for p in self.layers.iterdir() if (m := _WIM_NAME.fullmatch(p.name)))
        total = sum(p.stat().st_size for _, p in wims) or 1
        done = 0
        for layer_id, path in wims:
            rel = path.relative_to(self.root).as_posix()

            def step(completed: int, _total: int, base: int = done) -> None:
                if progress is not None:
                    progress(base + completed, total)

            found = self._check_wim(layer_id, path, rel, images, boot_images, step, cancel)
            if found and found[0].startswith(f"{rel}: damaged"):
                damaged.add(layer_id)
            problems.extend(found)
            done += path.stat().st_size
        for path in sorted(self.layers.iterdir()):
            if path.is_dir() and path.name.isdigit():
                problems.extend(self._check_manifests(int(path.name), path, manifests))
            elif not (_WIM_NAME.fullmatch(path.name) or _LOCK_NAME.fullmatch(path.name)
                      or _WORK_NAME.fullmatch(path.name) or _WORK_FOLDER_NAME.fullmatch(path.name)):
                problems.append(f"{path.relative_to(self.root).as_posix()}: unexpected "
                                f"{'folder' if path.is_dir() else 'file'} in the repository")
        for key in sorted(images.keys() - manifests.keys()):
            problems.append(f"layer {key[0]} version {key[1]}: image {image_name(key[1])} in "
                            f"layers/{key[0]}.wim has no manifest")
        for key, manifest in sorted(manifests.items()):
            if key[0] in damaged:
                continue
            if key not in images:
                problems.append(f"layer {key[0]} version {key[1]}: the manifest's image {manifest.image} is not "
                                f"in layers/{key[0]}.wim")
            elif images[key] != manifest.files:
                problems.append(f"layer {key[0]} version {key[1]}: image {manifest.image} holds {images[key]} "
                                f"files, its manifest says {manifest.files}")
            if manifest.boot is not None and key not in boot_images:
                problems.append(f"layer {key[0]} version {key[1]}: the manifest's boot image {manifest.boot.image} "
                                f"is not in layers/{key[0]}.wim")
        for key in sorted(boot_images - manifests.keys()):
            if key in images:
                continue  # reported above: the version's image has no manifest either
            problems.append(f"layer {key[0]} version {key[1]}: boot image {image_name(key[1])}"
                            f"{gold.BOOT_IMAGE_SUFFIX} in layers/{key[0]}.wim has no manifest")
        for key in sorted(k for k in boot_images & manifests.keys() if manifests[k].boot is None):
            problems.append(f"layer {key[0]} version {key[1]}: boot image {image_name(key[1])}"
                            f"{gold.BOOT_IMAGE_SUFFIX} in layers/{key[0]}.wim is not in its manifest")
        if catalog is not None:
            problems.extend(self._compare_with_catalog(catalog, images, manifests))
        pending = {key for key, checksum in (catalog or {}).items() if not checksum}
        for path in sorted(self._work_files()):
            match = _WORK_NAME.fullmatch(path.name) or _MANIFEST_WORK_NAME.fullmatch(path.name)
            assert match is not None
            owner = int(match["layer"]) if "layer" in match.groupdict() else int(path.parent.name)
            if (owner, int(match["version"])) not in pending:
                problems.append(f"{path.relative_to(self.root).as_posix()}: work file left by an interrupted "
                                "store or removal")
        for path in sorted(self._work_folders()):
            match = _WORK_FOLDER_NAME.fullmatch(path.name)
            assert match is not None
            if (int(match["layer"]), int(match["version"])) not in pending:
                problems.append(f"{path.relative_to(self.root).as_posix()}: work folder left by an interrupted "
                                "import")
        return problems

    def _check_wim(
        self, layer_id: int, path: Path, rel: str, images: dict[VersionKey, int], boot_images: set[VersionKey],
        progress: ProgressFn, cancel: Cancellable | None,
    ) -> list[str]:
        try:
            with Wim.open(path, check_integrity=True) as layer_wim:
                problems = [] if layer_wim.has_integrity_table else [f"{rel}: has no integrity table"]
                layer_wim.verify(progress=progress, cancel=cancel)
                for index in range(1, layer_wim.image_count + 1):
                    name = layer_wim.image_name(index)
                    boot = _BOOT_IMAGE_NAME.fullmatch(name)
                    if boot is not None:
                        boot_images.add((layer_id, int(boot[1])))
                        continue
                    match = _IMAGE_NAME.fullmatch(name)
                    if match is None:
                        problems.append(f"{rel}: image {index} has an unexpected name {name!r}")
                        continue
                    count = _ImageCount()
                    for entry in layer_wim.iterate_dir_tree(index):
                        count.add(entry)
                    images[(layer_id, int(match[1]))] = count.files
                return problems
        except TaskCanceled:
            raise
        except (WimError, EnvironmentProblem) as exc:
            return [f"{rel}: damaged: {exc}"]

    def _check_manifests(self, layer_id: int, folder: Path, manifests: dict[VersionKey, VersionManifest]) -> list[str]:
        problems = []
        for path in sorted(folder.iterdir()):
            rel = path.relative_to(self.root).as_posix()
            match = _MANIFEST_NAME.fullmatch(path.name)
            if match is None:
                if not _MANIFEST_WORK_NAME.fullmatch(path.name):
                    problems.append(f"{rel}: unexpected file in the repository")
                continue
            version_id = int(match[1])
            try:
                manifest = self._read_manifest(path, f"layer {layer_id} version {version_id}")
            except LayerDeskError as exc:
                problems.append(f"{rel}: {exc}")
                continue
            if (manifest.layer_id, manifest.version_id) != (layer_id, version_id):
                problems.append(f"{rel}: belongs to layer {manifest.layer_id} version {manifest.version_id}")
                continue
            manifests[(layer_id, version_id)] = manifest
        return problems

    @staticmethod
    def _compare_with_catalog(
        catalog: Mapping[VersionKey, str | None], images: Mapping[VersionKey, int],
        manifests: Mapping[VersionKey, VersionManifest],
    ) -> list[str]:
        problems = []
        for key in sorted((images.keys() | manifests.keys()) - catalog.keys()):
            problems.append(f"layer {key[0]} version {key[1]}: stored, but the catalog has no such version (orphan)")
        for key, checksum in sorted(catalog.items()):
            if not checksum:
                continue
            manifest = manifests.get(key)
            if manifest is None:
                problems.append(f"layer {key[0]} version {key[1]}: the catalog says it is stored ({checksum}), "
                                "but the repository has no valid manifest for it")
            elif manifest.checksum != checksum:
                problems.append(f"layer {key[0]} version {key[1]}: the manifest's checksum {manifest.checksum} "
                                f"does not match the catalog's {checksum}")
        return problems


def _parse_manifest(document: Mapping[str, Any], checksum: str) -> VersionManifest:
    if document.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"not a layer version manifest (format {document.get('format')!r})")
    if document.get("schema") != MANIFEST_SCHEMA:
        raise ValueError(f"manifest schema {document.get('schema')!r} is not supported (this LayerDesk reads "
                         f"schema {MANIFEST_SCHEMA})")

    def number(key: str) -> int:
        value = document[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{key!r} is not a count: {value!r}")
        return value

    image = document["image"]
    if not isinstance(image, str) or not _IMAGE_NAME.fullmatch(image):
        raise ValueError(f"bad image name {image!r}")
    deletions = document["deletions"]
    if not isinstance(deletions, list):
        raise ValueError("'deletions' is not a list")
    source = document["source"]
    if not isinstance(source, dict):
        raise ValueError("'source' is not an object")
    return VersionManifest(
        layer_id=number("layer_id"),
        version_id=number("version_id"),
        image=image,
        source=CaptureSource.from_dict(source),
        deletions=tuple(Deletion.from_dict(d) for d in deletions),
        registry=RegistryDelta.from_dict(document["registry"]),
        files=number("files"),
        data_bytes=number("data_bytes"),
        checksum=checksum,
        disk=DiskIdentity.from_dict(document["disk"]) if document.get("disk") else None,
        boot=BootRecord.from_dict(document["boot"]) if document.get("boot") else None,
    )

