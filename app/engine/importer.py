"""Import (capture) of a layer version: what a source is, its whiteouts, and the worker that stores it.

Sources:

* a **folder**, with OCI-style whiteouts: a file ``.wh.NAME`` deletes ``NAME`` from the lower layers and
  is not stored itself; a file ``.wh..wh..opq`` in a directory hides everything the lower layers had in
  that directory. A whiteout must name one plain Windows file name: ``..``, path separators, reserved
  device names (``CON``, ``NUL``, ``COM1``…), characters Windows forbids and names ending in a dot or
  blank are refused, as is an opaque marker at the layer's root (it would hide the whole OS layer);
* a **WIM file** (one image of it: ``image``, 1 by default);
* an **NTFS volume image** (the OEM id ``NTFS    `` at byte 3 of its boot sector);
* a **disk image** (VHD, VHDX, VMDK, qcow2, or a raw disk with MBR or GPT): its Windows NTFS partition;
  a LayerDesk **layer disk** (``layerctl layer export-disk``) brings its deletions and registry delta in
  ``LayerDesk\\layer.json``, which is read from it instead of being imported as a file.

Everything is checked by :func:`inspect_source` before a version is created;
the worker (:func:`import_worker`, run in a child process) checks again and captures with progress.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from types import FrameType
from typing import Any

from app.engine.difference import LayerDifference, capture_difference, ntfs_volume_of
from app.engine.disk import DiskError, image_info, read_image_partition_table, read_partition_table
from app.engine.layer_disk import capture_layer_disk, probe_layer_disk
from app.engine.registry.delta import RegistryDelta
from app.engine.registry.regfile import parse_reg_file
from app.engine.repository import CaptureSource, Deletion, LayerRepository, SourceKind, StoredVersion
from app.engine.wim import Wim, WimError
from app.errors import UserError
from app.tasks.base import CancelToken, TaskCanceled
from app.tasks.worker import WorkerReport

log = logging.getLogger(__name__)

__all__ = [
    "OPAQUE_MARKER",
    "WHITEOUT_PREFIX",
    "FolderScan",
    "ImportSourceError",
    "import_worker",
    "inspect_difference",
    "inspect_source",
    "read_registry_files",
    "scan_folder",
]

WHITEOUT_PREFIX = ".wh."
LAYER_DESCRIPTION = "LayerDesk\\layer.json"
OPAQUE_MARKER = ".wh..wh..opq"

_WIM_MAGICS = (b"MSWIM\0\0\0", b"WLPWM\0\0\0")  # ordinary and pipable WIMs
_NTFS_OEM_ID = b"NTFS    "
_FORBIDDEN_CHARACTERS = frozenset('<>:"/\\|?*') | frozenset(chr(c) for c in range(32))
_RESERVED_NAMES = frozenset(
    ["CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"]
    + [f"{port}{n}" for port in ("COM", "LPT") for n in [*"123456789", "¹", "²", "³"]]
)


class ImportSourceError(UserError):
    """The import source cannot be used as given (missing, of an unknown kind, bad whiteouts, bad image)."""

    code = "import_source"


# --- what a source is -----------------------------------------------------------------------------------


def _disk_image_kind(head: bytes, tail: bytes) -> str | None:
    """The disk image format ``head`` (the first 4 KiB) and ``tail`` (the last 512 bytes) show, if any."""
    if head.startswith(b"vhdxfile"):
        return "VHDX"
    if head.startswith(b"conectix") or tail.startswith(b"conectix"):
        return "VHD"
    if head.startswith((b"KDMV", b"# Disk DescriptorFile")):
        return "VMDK"
    if head.startswith(b"QFI\xfb"):
        return "qcow2"
    if head[512:520] == b"EFI PART":
        return "raw disk (GPT)"
    if len(head) >= 512 and head[510:512] == b"\x55\xaa" and any(head[446 + 16 * n + 4] for n in range(4)):
        return "raw disk (MBR)"
    return None


def inspect_source(path: Path, *, image: int | None = None) -> CaptureSource:
    """What ``path`` is, checked: a folder (its whiteouts too), one image of a WIM file, or an NTFS volume
    image (its path made absolute). :class:`ImportSourceError` with one clear sentence otherwise."""
    path = Path(path).absolute()
    if not path.exists():
        raise ImportSourceError(f"The import source {path} does not exist.")
    if path.is_dir():
        if image is not None:
            raise ImportSourceError(f"{path} is a folder; --image only applies to WIM files.")
        scan_folder(path)
        return CaptureSource(SourceKind.FOLDER, path)
    if not (path.is_file() or path.is_block_device()):
        raise ImportSourceError(f"{path} is neither a folder nor a file; it cannot be imported.")
    try:
        with path.open("rb") as file:
            head = file.read(4096)
            size = file.seek(0, os.SEEK_END)
            file.seek(max(0, size - 512))
            tail = file.read(512)
    except OSError as exc:
        raise ImportSourceError(f"Cannot read the import source {path}: {exc.strerror or exc}.") from None
    if head[:8] in _WIM_MAGICS:
        return CaptureSource(SourceKind.WIM, path, _check_wim_image(path, 1 if image is None else image))
    if image is not None:
        raise ImportSourceError(f"{path} is not a WIM file; --image only applies to WIM files.")
    if head[3:11] == _NTFS_OEM_ID:
        return CaptureSource(SourceKind.NTFS_VOLUME, path)
    disk = _disk_image_kind(head, tail)
    if disk is not None:
        _check_disk_image(path, disk)
        return CaptureSource(SourceKind.DISK_IMAGE, path)
    raise ImportSourceError(
        f"{path} is not a folder, a WIM file or an NTFS volume image (nor a disk image LayerDesk knows), "
        "so it cannot be imported."
    )


def _check_disk_image(path: Path, kind: str) -> None:
    """A disk image is imported from its Windows NTFS partition: check now, before a version exists, that
    qemu-img can read it and (for disks read directly) that it has one."""
    try:
        info = image_info(path)
        if info.raw_readable:
            read_partition_table(path, size=info.virtual_size).ntfs_data_partition()
    except DiskError as exc:
        raise ImportSourceError(f"{path} looks like a disk image ({kind}) but cannot be imported: {exc}") from None


def _check_wim_image(path: Path, image: int) -> int:
    try:
        with Wim.open(path) as source:
            count = source.image_count
    except WimError as exc:
        raise ImportSourceError(f"{path} cannot be read as a WIM file: {exc}") from None
    if not 1 <= image <= count:
        raise ImportSourceError(
            f"{path} has no image {image}: it has {count} image{'s' if count != 1 else ''} "
            f"(--image 1{f' to {count}' if count > 1 else ''})."
        )
    return image


#: What a difference import compares: the Windows volume of a disk image, or an NTFS volume image.
_DIFFERENCE_KINDS = (SourceKind.DISK_IMAGE, SourceKind.NTFS_VOLUME)
_KIND_WORDS = {SourceKind.FOLDER: "folder", SourceKind.WIM: "WIM file"}


def inspect_difference(source: CaptureSource, base: Path) -> CaptureSource:
    """``source`` (from :func:`inspect_source`) as a difference import from ``base``: both must hold a Windows
    NTFS volume (a disk image with one, or an NTFS volume image), checked now, before a version exists.
    :class:`ImportSourceError` with one clear sentence otherwise."""
    if source.kind not in _DIFFERENCE_KINDS:
        raise ImportSourceError(
            f"--base only applies to disk images and NTFS volume images (the machine after the change), but "
            f"{source.path} is a {_KIND_WORDS.get(source.kind, source.kind.value)}.")
    base = Path(base).absolute()
    if not base.exists():
        raise ImportSourceError(f"The base {base} does not exist.")
    if base.is_dir():
        raise ImportSourceError(f"The base {base} is a folder; --base takes a disk image or an NTFS volume image.")
    try:
        base_source = inspect_source(base)
    except ImportSourceError as exc:
        raise ImportSourceError(f"The base cannot be used: {exc.message}") from None
    if base_source.kind not in _DIFFERENCE_KINDS:
        raise ImportSourceError(f"The base {base} is a {_KIND_WORDS.get(base_source.kind, base_source.kind.value)}; "
                                "--base takes a disk image or an NTFS volume image.")
    if base.samefile(source.path):
        raise ImportSourceError(f"The base and the source are the same file ({base}): there is no difference.")
    for path, kind, what in ((base, base_source.kind, "base"), (source.path, source.kind, "source")):
        if kind is SourceKind.DISK_IMAGE:
            _check_windows_partition(path, what)
    return replace(source, base=base)


def _check_windows_partition(path: Path, what: str) -> None:
    """A disk image of any format has a Windows NTFS partition (read through qemu-img when it is not raw)."""
    try:
        info = image_info(path)
        with tempfile.TemporaryDirectory(prefix="layerdesk-disk-") as scratch:
            read_image_partition_table(info, Path(scratch)).ntfs_data_partition()
    except DiskError as exc:
        raise ImportSourceError(f"The {what} disk {path} cannot be used: {exc}") from None


# --- whiteouts ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FolderScan:
    """A folder's whiteouts: the deletions they mean and the marker files (not part of the layer)."""

    deletions: tuple[Deletion, ...]
    #: ``/``-separated paths of the marker files in the captured tree (``/Program Files/.wh.old.dll``).
    markers: tuple[str, ...]


def _windows(relative: PurePosixPath) -> str:
    return "\\".join(relative.parts)


def _whiteout_problem(target: str) -> str | None:
    """Why ``target`` (the name after ``.wh.``) is not one Windows file name inside the layer, or None."""
    if target == "":
        return "names nothing"
    if target in (".", ".."):
        return "escapes the layer"
    if any(ch in _FORBIDDEN_CHARACTERS for ch in target):
        bad = next(ch for ch in target if ch in _FORBIDDEN_CHARACTERS)
        shown = repr(bad) if bad.isprintable() else f"U+{ord(bad):04X}"
        what = "a path separator" if bad in "/\\" else "a character Windows forbids in file names"
        return f"contains {what} ({shown})"
    if target[-1] in ". ":
        return "ends with a dot or a blank, which Windows cannot name"
    if target.split(".", 1)[0].rstrip(" ").upper() in _RESERVED_NAMES:
        return "is a reserved Windows device name"
    try:
        target.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid UTF-8"
    return None


def scan_folder(root: Path, cancel: CancelToken | None = None) -> FolderScan:
    """Find the whiteouts under ``root`` (sorted, so the result is deterministic)."""
    deletions: list[Deletion] = []
    markers: list[str] = []

    def refuse(where: PurePosixPath, why: str) -> ImportSourceError:
        return ImportSourceError(f"The whiteout {_windows(where)!r} in {root} {why}; it was refused.")

    def walk_error(exc: OSError) -> None:
        raise ImportSourceError(f"Cannot read the folder {exc.filename}: {exc.strerror or exc}.")

    for folder, dirnames, filenames in os.walk(root, onerror=walk_error):
        if cancel is not None:
            cancel.raise_if_cancelled()
        dirnames.sort()
        here = PurePosixPath(Path(folder).relative_to(root).as_posix())
        if here == PurePosixPath("."):
            here = PurePosixPath()
        for name in dirnames:
            if name.startswith(WHITEOUT_PREFIX):
                raise refuse(here / name, "is a folder (a whiteout must be a file)")
        for name in sorted(filenames):
            if not name.startswith(WHITEOUT_PREFIX):
                continue
            marker = here / name
            if name == OPAQUE_MARKER:
                if not here.parts:
                    raise refuse(marker, "is at the root of the layer, where it would hide the whole OS layer")
                deletions.append(Deletion(_windows(here), opaque=True))
            elif name.startswith(WHITEOUT_PREFIX * 2):
                raise refuse(marker, "uses the reserved prefix .wh..wh. (only .wh..wh..opq is known)")
            else:
                target = name[len(WHITEOUT_PREFIX):]
                problem = _whiteout_problem(target)
                if problem is not None:
                    raise refuse(marker, problem)
                deletions.append(Deletion(_windows(here / target)))
            markers.append("/" + marker.as_posix())
    return FolderScan(tuple(deletions), tuple(markers))


# --- registry files ---------------------------------------------------------------------------------------


def read_registry_files(paths: Sequence[Path]) -> RegistryDelta:
    """The ``.reg`` files' changes, merged in the order given (later files win)."""
    deltas = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise ImportSourceError(f"The registry file {path} does not exist (or is not a file).")
        deltas.append(parse_reg_file(path))
    return RegistryDelta.merged(deltas)


# --- the worker -----------------------------------------------------------------------------------------


class _Throttle:
    """Sends progress at most every 0.2 s or whole percent."""

    def __init__(self, report: WorkerReport, low: float, high: float, message: str) -> None:
        self._report, self._low, self._high, self._message = report, low, high, message
        self._last_percent = -1
        self._last_time = 0.0

    def __call__(self, done: int, total: int) -> None:
        percent = int(self._low + (self._high - self._low) * (done / total if total else 1.0))
        now = time.monotonic()
        if percent != self._last_percent or now - self._last_time >= 0.2:
            self._last_percent, self._last_time = percent, now
            self._report.progress(percent, self._message)


def import_worker(args: dict[str, Any], report: WorkerReport) -> dict[str, Any]:
    """Worker function (child process): capture the source into the repository.

    ``args``: ``repository`` (root folder), ``layer_id``, ``version_id``, ``source`` (path, kind, image),
    ``registry`` (a :class:`RegistryDelta` as a dict) and ``keep_boot`` (an OS layer: a disk image's layout,
    other partitions and boot code are kept). A SIGTERM (the task's cancel) stops the capture
    at wimlib's next progress message; the repository is left as it was and the process exits 143.
    """
    token = CancelToken()
    previous: Callable[[int, FrameType | None], Any] | int | None = None
    if hasattr(signal, "SIGTERM"):
        previous = signal.signal(signal.SIGTERM, lambda *_: token.cancel())
    try:
        return _import(args, report, token)
    except TaskCanceled:
        report.log("Import canceled; nothing was stored.", "WARNING")
        sys.exit(143)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _import(args: dict[str, Any], report: WorkerReport, token: CancelToken) -> dict[str, Any]:
    wanted = CaptureSource.from_dict(args["source"])
    report.progress(1, "Checking the source")
    source = inspect_source(wanted.path, image=wanted.image)
    if source.kind is not wanted.kind:
        raise ImportSourceError(f"{source.path} changed: it is now a {source.kind.value}, not a {wanted.kind.value}.")
    if wanted.base is not None:
        return _import_difference(args, report, token, inspect_difference(source, wanted.base))
    if source.kind is SourceKind.DISK_IMAGE:
        stored_disk = _import_layer_disk(args, report, token, source)
        if stored_disk is not None:
            return stored_disk
    scan = scan_folder(source.path, token) if source.kind is SourceKind.FOLDER else FolderScan((), ())
    delta = RegistryDelta.from_dict(args["registry"])
    if scan.deletions:
        report.log(f"{len(scan.deletions)} whiteout(s): "
                   + ", ".join(f"{d.path}{' (opaque)' if d.opaque else ''}" for d in scan.deletions[:5])
                   + (", …" if len(scan.deletions) > 5 else ""))
    report.progress(2, f"Capturing {source.path}")
    repository = LayerRepository(Path(args["repository"]))
    stored = repository.store_version(
        int(args["layer_id"]), int(args["version_id"]), source,
        deletions=scan.deletions, delta=delta, drop=scan.markers, keep_boot=bool(args.get("keep_boot", False)),
        progress=_Throttle(report, 5, 99, "Writing the layer's WIM"), cancel=token,
    )
    report.log(f"Stored image {stored.image}: {stored.files} files, {stored.data_bytes} bytes of data; "
               f"the layer's WIM is now {stored.wim_bytes} bytes.")
    report.progress(100, "Stored")
    return _result(stored, f"Imported {stored.files} files ({stored.data_bytes} bytes) from {source.path}.")


def _import_layer_disk(
    args: dict[str, Any], report: WorkerReport, token: CancelToken, source: CaptureSource,
) -> dict[str, Any] | None:
    """A disk image that is a LayerDesk layer disk (:mod:`app.engine.layer_disk`) is imported as the version it
    holds: its files without the ``LayerDesk`` folder, its deletions and registry delta from ``layer.json``
    (the ``.reg`` files' changes go after them). ``None`` when the disk is not a layer disk."""
    repository = LayerRepository(Path(args["repository"])).ensure()
    layer_id, version_id = int(args["layer_id"]), int(args["version_id"])
    # Named like the repository's import work folders, so `repo check` explains a leftover of a killed worker.
    work = Path(tempfile.mkdtemp(prefix=f".import-{layer_id}-v{version_id}-", dir=repository.layers))
    try:
        report.progress(2, f"Looking for a layer description on {source.path.name}")
        probe = probe_layer_disk(source.path, work, cancel=token)
        if probe is None:
            return None
        info = probe.info
        report.log(f"{source.path} is a LayerDesk layer disk of {info.layer_name}:{info.version_name} "
                   f"({info.files} files, {len(info.deletions)} deletion(s), {len(info.registry)} registry "
                   f"operation(s)); its deletions and registry changes come from {LAYER_DESCRIPTION}.")
        stored = repository.store_version(
            layer_id, version_id, source, deletions=info.deletions,
            delta=RegistryDelta.merged([info.registry, RegistryDelta.from_dict(args["registry"])]),
            build=lambda layer_wim, name: capture_layer_disk(probe, layer_wim, name, cancel=token),
            progress=_Throttle(report, 10, 99, "Writing the layer's WIM"), cancel=token,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report.log(f"Stored image {stored.image}: {stored.files} files, {stored.data_bytes} bytes of data; "
               f"the layer's WIM is now {stored.wim_bytes} bytes.")
    report.progress(100, "Stored")
    return _result(stored, f"Imported the layer disk {source.path} ({info.layer_name}:{info.version_name}): "
                           f"{stored.files} files ({stored.data_bytes} bytes), {stored.deletions} deletion(s), "
                           f"{stored.registry_operations} registry operation(s).")


def _result(stored: StoredVersion, summary: str) -> dict[str, Any]:
    """The import worker's result: what the import task records for the version."""
    return {
        "summary": summary,
        "image": stored.image,
        "checksum": stored.checksum,
        "files": stored.files,
        "data_bytes": stored.data_bytes,
        "wim_bytes": stored.wim_bytes,
        "deletions": stored.deletions,
        "registry_operations": stored.registry_operations,
    }


class _Steps:
    """Maps a step's 0–1 progress onto ``low``–``high`` percent; sends at most every 0.2 s, whole percent or new
    message."""

    def __init__(self, report: WorkerReport, low: float, high: float) -> None:
        self._report, self._low, self._high = report, low, high
        self._last: tuple[int, str, float] = (-1, "", 0.0)

    def __call__(self, fraction: float, message: str) -> None:
        percent = int(self._low + (self._high - self._low) * fraction)
        now = time.monotonic()
        if (percent, message) != self._last[:2] or now - self._last[2] >= 0.2:
            self._last = (percent, message, now)
            self._report.progress(percent, message)


def _import_difference(
    args: dict[str, Any], report: WorkerReport, token: CancelToken, source: CaptureSource,
) -> dict[str, Any]:
    """A difference import: the layer is what changed from ``source.base`` to ``source.path``
    (:mod:`app.engine.difference`); the ``.reg`` files' changes go after the hives' difference. The volumes
    are copied out into ``args["work_dir"]`` (the task removes it too, should this process be killed)."""
    assert source.base is not None
    repository = LayerRepository(Path(args["repository"])).ensure()
    work = Path(args.get("work_dir") or tempfile.mkdtemp(prefix=".difference-", dir=repository.layers))
    shutil.rmtree(work, ignore_errors=True)  # a version id the catalog handed out again
    work.mkdir(parents=True)
    try:
        report.progress(2, f"Reading the Windows volume of the base {source.base.name}")
        base = ntfs_volume_of(source.base, work / "base.ntfs", cancel=token,
                              progress=_Throttle(report, 2, 15, "Reading the base's Windows volume"))
        after = ntfs_volume_of(source.path, work / "after.ntfs", cancel=token,
                               progress=_Throttle(report, 15, 28, "Reading the new Windows volume"))
        with capture_difference(base, after, work, step=_Steps(report, 28, 80), cancel=token) as difference:
            _log_difference(report, source, difference)
            delta = RegistryDelta.merged([difference.registry, RegistryDelta.from_dict(args["registry"])])
            stored = repository.store_version(
                int(args["layer_id"]), int(args["version_id"]), source, deletions=difference.deletions,
                delta=delta, build=difference.add_to, progress=_Throttle(report, 80, 99, "Writing the layer's WIM"),
                cancel=token,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report.log(f"Stored image {stored.image}: {stored.files} files, {stored.data_bytes} bytes of data; "
               f"the layer's WIM is now {stored.wim_bytes} bytes.")
    report.progress(100, "Stored")
    return _result(stored, f"Imported the difference from {source.base} to {source.path}: "
                           f"{len(difference.added)} added and {len(difference.changed)} changed files "
                           f"({stored.data_bytes} bytes), {stored.deletions} deletion(s), "
                           f"{stored.registry_operations} registry operation(s).")


def _log_difference(report: WorkerReport, source: CaptureSource, difference: LayerDifference) -> None:
    def some(items: Sequence[str]) -> str:
        return ", ".join(items[:5]) + (", …" if len(items) > 5 else "")

    timings = ", ".join(f"{step} {seconds:.1f} s" for step, seconds in difference.timings.items())
    report.log(f"Difference from {source.base}: {len(difference.added)} added, {len(difference.changed)} changed, "
               f"{difference.unchanged} unchanged files; {len(difference.deletions)} deletion(s); "
               f"{len(difference.registry)} registry operation(s) from the {', '.join(difference.hives) or 'no'} "
               f"hive(s) ({timings}).")
    if difference.deletions:
        report.log(f"Deleted: {some([d.path for d in difference.deletions])}")
    if difference.excluded:
        report.log(f"{len(difference.excluded)} changed file(s) left out (registry hive files, paging and "
                   f"hibernation files, restore points, the recycle bin): {some(difference.excluded)}")
