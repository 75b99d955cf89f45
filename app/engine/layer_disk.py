"""Layer disks: one layer version as a disk of its own (VHD or VHDX), as the Elastic Layer repository and
other tools take layers, and such a disk read back as a version.

A layer disk is a GPT disk with one basic data partition (no ESP: nobody boots from it) holding an NTFS
volume with the version's files as the repository stores them (ACLs, streams, short names kept), plus
``\\LayerDesk\\layer.json``: what the files cannot say by themselves.

``layer.json`` (schema 1)::

    {"format": "layerdesk.layer-disk", "schema": 1,
     "layer": {"id": 7, "name": "Office", "type": "app"},
     "version": {"id": 12, "name": "2.0", "checksum": "sha256:…"},   # the repository manifest's checksum
     "deletions": [{"path": "Program Files\\\\Old", "opaque": false}],
     "registry": {…},                                                   # app.engine.registry.delta form
     "files": 1234, "data_bytes": 56789}

Reading a layer disk back (:func:`read_layer_disk`) captures the volume, takes ``layer.json`` out of the
captured image and checks it: the format, the schema, and that the image holds the number of files it
states; a disk without it, or with a damaged one, is refused with the reason.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from app.engine import disk
from app.engine.layer_cache import staging_size
from app.engine.registry.delta import RegistryDelta, RegistryDeltaError
from app.engine.repository import Deletion, LayerRepository, RepositoryDamaged
from app.engine.wim import AddCommand, DeleteCommand, Wim, WimError, make_ntfs_volume
from app.errors import UserError
from app.procs import Cancellable

__all__ = [
    "LAYER_DISK_FORMATS",
    "LayerDiskError",
    "LayerDiskInfo",
    "LayerDiskProbe",
    "capture_layer_disk",
    "probe_layer_disk",
    "read_layer_disk",
    "write_layer_disk",
]

MiB = 1024 * 1024
FORMAT = "layerdesk.layer-disk"
SCHEMA = 1
METADATA_FOLDER = "/LayerDesk"
METADATA_FILE = "/LayerDesk/layer.json"
LayerDiskFormat = Literal["vhdx", "vhd-dynamic"]
LAYER_DISK_FORMATS: tuple[LayerDiskFormat, ...] = ("vhdx", "vhd-dynamic")
ProgressFn = disk.ProgressFn


class LayerDiskError(UserError):
    """A layer disk cannot be written or read as asked."""

    code = "layer_disk"


@dataclass(frozen=True)
class LayerDiskInfo:
    """What ``layer.json`` of a layer disk says."""

    layer_id: int
    layer_name: str
    layer_type: str
    version_id: int
    version_name: str
    checksum: str
    deletions: tuple[Deletion, ...]
    registry: RegistryDelta
    files: int
    data_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "schema": SCHEMA,
            "layer": {"id": self.layer_id, "name": self.layer_name, "type": self.layer_type},
            "version": {"id": self.version_id, "name": self.version_name, "checksum": self.checksum},
            "deletions": [d.to_dict() for d in self.deletions],
            "registry": self.registry.to_dict(),
            "files": self.files, "data_bytes": self.data_bytes,
        }

    @classmethod
    def from_dict(cls, document: Mapping[str, Any]) -> LayerDiskInfo:
        if document.get("format") != FORMAT:
            raise ValueError(f"not a LayerDesk layer disk description (format {document.get('format')!r})")
        if document.get("schema") != SCHEMA:
            raise ValueError(f"layer disk schema {document.get('schema')!r} is not supported (this LayerDesk reads "
                             f"schema {SCHEMA})")
        layer, version = document["layer"], document["version"]

        def count(value: object, what: str) -> int:
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{what} is not a count: {value!r}")
            return value

        return cls(
            layer_id=count(layer["id"], "layer id"), layer_name=str(layer["name"]), layer_type=str(layer["type"]),
            version_id=count(version["id"], "version id"), version_name=str(version["name"]),
            checksum=str(version["checksum"]),
            deletions=tuple(Deletion.from_dict(d) for d in document["deletions"]),
            registry=RegistryDelta.from_dict(document["registry"]),
            files=count(document["files"], "files"), data_bytes=count(document["data_bytes"], "data_bytes"),
        )


def write_layer_disk(
    repository: LayerRepository, layer_id: int, version_id: int, checksum: str | None, out: Path, *,
    layer_name: str, layer_type: str, version_name: str, fmt: LayerDiskFormat = "vhdx",
    progress: ProgressFn | None = None, cancel: Cancellable | None = None,
) -> LayerDiskInfo:
    """Write the version as a layer disk ``out`` (which must not exist; it appears only when complete and
    verified). The repository's manifest is verified first; every file's SHA-1 is checked as it is read."""
    if fmt not in LAYER_DISK_FORMATS:
        raise LayerDiskError(f"A layer disk is {' or '.join(LAYER_DISK_FORMATS)}, not {fmt!r}.")
    out = Path(out)
    if out.exists():
        raise LayerDiskError(f"{out} already exists; it is never overwritten.")
    if not out.parent.is_dir():
        raise LayerDiskError(f"The folder {out.parent} does not exist.")
    manifest = repository.manifest(layer_id, version_id, checksum)
    info = LayerDiskInfo(layer_id, layer_name, layer_type, version_id, version_name, manifest.checksum,
                         manifest.deletions, manifest.registry, manifest.files, manifest.data_bytes)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".work", dir=out.parent))
    try:
        metadata = work / "layer.json"
        metadata.write_text(json.dumps(info.to_dict(), indent=1, sort_keys=True, ensure_ascii=False) + "\n",
                            encoding="utf-8")
        volume_size = staging_size(manifest) + 16 * MiB
        disk_size = -(-(volume_size + 3 * MiB) // MiB) * MiB
        layout = disk.gpt_layout(disk_size, esp_size=36 * MiB, msr_size=MiB)
        if layout.data_size < volume_size:
            disk_size += volume_size - layout.data_size + MiB
            layout = disk.gpt_layout(disk_size, esp_size=36 * MiB, msr_size=MiB)
        volume = make_ntfs_volume(work / "layer.ntfs", layout.data_size, label=layer_name[:32],
                                  partition_start_sector=layout.data_start_lba)
        with Wim.open(repository.wim_path(layer_id)) as layer_wim:
            index = layer_wim.find_image(manifest.image)
            if index is None:
                raise RepositoryDamaged(f"The repository's WIM of layer {layer_id} has no image {manifest.image}.")
            # in memory only: the repository's WIM is never written here
            layer_wim.update_image(index, [AddCommand(metadata, METADATA_FILE, ntfs=False)], cancel=cancel)
            layer_wim.extract_image_to_ntfs_volume(index, volume, progress=progress, cancel=cancel)
        prefix, suffix = work / "prefix.raw", work / "suffix.raw"
        disk.build_gpt_pieces(volume, prefix, suffix, disk_size=disk_size, esp_size=36 * MiB, msr_size=MiB)
        disk.convert_hashed([prefix, volume, suffix], out, fmt, cancel=cancel, consume=volume)  # in place if it can
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return info


def read_layer_disk(image: Path, layer_wim: Wim, name: str, scratch: Path, *,
                    cancel: Cancellable | None = None) -> tuple[int, LayerDiskInfo]:
    """Capture the layer disk ``image`` as image ``name`` of ``layer_wim`` (without its ``LayerDesk``
    folder) and return the new image's index and what its ``layer.json`` says. Refused
    (:class:`LayerDiskError`) when the disk is not a LayerDesk layer disk or does not match its
    description."""
    folder = Path(tempfile.mkdtemp(prefix=".layer-disk-", dir=scratch))
    try:
        extracted = disk.extract_ntfs_volume(Path(image), folder / "volume.ntfs", cancel=cancel)
        index = layer_wim.add_image_from_ntfs_volume(extracted.volume, name, cancel=cancel)
        try:
            layer_wim.extract_paths_to_folder(index, [METADATA_FILE], folder)
        except WimError:  # the path is not in the image
            raise LayerDiskError(f"{image} is not a LayerDesk layer disk (it has no {METADATA_FILE[1:]}).") from None
        info = _parse_description((folder / METADATA_FILE.lstrip("/")).read_bytes(), image)
        _drop_description(layer_wim, index, info, image, cancel)
        return index, info
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _parse_description(raw: bytes, image: Path) -> LayerDiskInfo:
    """``layer.json``'s bytes, checked; :class:`LayerDiskError` with the reason otherwise."""
    try:
        document = json.loads(raw.decode("utf-8"))
        if not isinstance(document, dict):
            raise ValueError("not a JSON object")
        return LayerDiskInfo.from_dict(document)
    except json.JSONDecodeError as exc:
        raise LayerDiskError(f"The layer description in {image} ({METADATA_FILE[1:]}) is damaged: {exc.msg} at line "
                             f"{exc.lineno}, column {exc.colno}. Write the layer disk again.") from None
    except (ValueError, KeyError, TypeError, RegistryDeltaError) as exc:
        raise LayerDiskError(f"The layer description in {image} is damaged: {exc}") from None


def _drop_description(layer_wim: Wim, index: int, info: LayerDiskInfo, image: Path,
                      cancel: Cancellable | None) -> None:
    """Remove the ``LayerDesk`` folder from the captured image and check the files its description counts."""
    layer_wim.update_image(index, [DeleteCommand(METADATA_FOLDER, recursive=True)], cancel=cancel)
    files = sum(1 for entry in layer_wim.iterate_dir_tree(index) if not entry.is_directory)
    if files != info.files:
        raise LayerDiskError(f"{image} holds {files} files but its description says {info.files}: it was changed "
                             "after it was written.")


# --- recognising a layer disk among import sources -----------------------------------------------------------


@dataclass(frozen=True)
class LayerDiskProbe:
    """A disk image found to be a LayerDesk layer disk: its volume copied out (kept until the capture has been
    written) and what its ``layer.json`` says."""

    image: Path
    volume: Path
    info: LayerDiskInfo


def _shaped_like_layer_disk(table: disk.PartitionTable) -> bool:
    """:func:`write_layer_disk` lays a disk out as GPT with a 36 MiB ESP, a 1 MiB MSR and the NTFS volume; a
    Windows installation's disk never has that MSR. Checked first so that an ordinary disk image is not
    copied out twice just to look for ``layer.json``."""
    sizes = {p.kind: p.size for p in table.partitions}
    return table.scheme == "gpt" and sizes.get("esp") == 36 * MiB and sizes.get("msr") == MiB and "ntfs" in sizes


def probe_layer_disk(image: Path, scratch: Path, *, cancel: Cancellable | None = None) -> LayerDiskProbe | None:
    """Whether the disk image ``image`` is a LayerDesk layer disk: ``None`` when it is not (no layer disk's
    layout, or no ``LayerDesk\\layer.json`` on its volume), else its volume copied into the existing folder
    ``scratch`` (the caller removes it) with its description. A layer disk whose description is malformed
    or of an unknown schema is refused (:class:`LayerDiskError`)."""
    image = Path(image)
    info = disk.image_info(image)
    if not _shaped_like_layer_disk(disk.read_image_partition_table(info, scratch)):
        return None
    volume = disk.extract_ntfs_volume(image, scratch / "layer-disk.ntfs", cancel=cancel).volume
    # A scan of the volume (wimlib reads only its metadata until asked for data) and one file extracted.
    with Wim.create("none") as probe:
        index = probe.add_image_from_ntfs_volume(volume, "probe", cancel=cancel)
        try:
            probe.extract_paths_to_folder(index, [METADATA_FILE], scratch)
        except WimError:  # no such file: an ordinary disk laid out like ours
            volume.unlink(missing_ok=True)
            return None
    raw = (scratch / METADATA_FILE.lstrip("/")).read_bytes()
    return LayerDiskProbe(image, volume, _parse_description(raw, image))


def capture_layer_disk(probe: LayerDiskProbe, layer_wim: Wim, name: str, *, cancel: Cancellable | None = None) -> int:
    """Add the probed layer disk's files as image ``name`` of ``layer_wim`` (without its ``LayerDesk``
    folder) and return its index; the volume must stay until ``layer_wim`` is written. Refused
    (:class:`LayerDiskError`) when the files do not match the description."""
    index = layer_wim.add_image_from_ntfs_volume(probe.volume, name, cancel=cancel)
    _drop_description(layer_wim, index, probe.info, probe.image, cancel)
    return index
