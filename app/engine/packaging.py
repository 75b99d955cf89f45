"""Packaging machines: the packaging disk of a layer version, and finalizing the version from it.

An app or platform layer version is made on a packaging machine: a machine booted from a **packaging disk**
that holds the layer's OS layer version, the chosen prerequisite layer versions and, when the version updates
an earlier one, that previous version's content. The administrator installs the application on it, shuts it
down, and **finalizes**: the version is what changed.

* :func:`package_worker` (child process of the packaging task) composites the packaging disk with the
  compositing engine (:func:`app.engine.compose.compose`) into a staging folder, reads the serial number of
  its Windows volume (what identifies this very disk later), and hands it to :func:`deliver_to_folder`, the
  delivery step (the folder connector; a hypervisor connector delivers the same file elsewhere).
* :func:`finalize_worker` (child process of the finalize task) checks the disk it is given: it must be a disk
  image with an NTFS Windows volume whose serial number is the packaging disk's, and it must have nothing
  pending (:func:`pending_operations`: a reboot Windows asked for, or file operations and run-once entries
  that would run at the next start and so would be missing from the layer). Then it composites the base
  again, exactly as it went into the packaging disk but without the previous version (the OS layer version
  plus the prerequisites: the same layers composite to the same tree, which the manifest digest confirms
  when the packaging disk had no previous version), and captures the difference between that base and the
  disk (:func:`app.engine.difference.capture_difference`): new and changed files, deletions, and the
  registry difference of every hive. Taken against the base without the previous version, the new version
  holds the previous version's content plus the change, as an updated layer must.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from types import FrameType
from typing import Any

from app.engine.compose import StackLayer, compose
from app.engine.difference import capture_difference
from app.engine.disk import SECTOR, extract_ntfs_volume, extract_partition, image_info, read_image_partition_table
from app.engine.layer_cache import LayerDiskCache
from app.engine.publish_hives import HIVE_FILES
from app.engine.registry.delta import HiveName
from app.engine.registry.model import Hive, RegistryKey, ValueType, fold
from app.engine.registry.regf import HiveError, parse_hive
from app.engine.repository import CaptureSource, LayerRepository, SourceKind
from app.engine.wim import Wim, WimError
from app.errors import EnvironmentProblem, UserError
from app.tasks.base import CancelToken, TaskCanceled
from app.tasks.worker import WorkerReport

log = logging.getLogger(__name__)

__all__ = [
    "NotThePackagingDisk",
    "PackagingError",
    "PendingOperations",
    "deliver_to_folder",
    "disk_file_name",
    "finalize_worker",
    "package_worker",
    "pending_operations",
    "volume_serial",
]

_NTFS_OEM = b"NTFS    "
_SESSION_MANAGER = "Control\\Session Manager"
_CURRENT_VERSION = "Microsoft\\Windows\\CurrentVersion"
#: Values RunOnceEx may hold without anything being queued in it.
_RUN_ONCE_EX_SETTINGS = frozenset({fold("Flags"), fold("Title")})


class PackagingError(UserError):
    """A packaging disk cannot be made or used as asked."""

    code = "packaging"


class NotThePackagingDisk(PackagingError):
    """The disk given to finalize is not the packaging disk of the version (or not a usable disk at all)."""


class PendingOperations(PackagingError):
    """The packaging machine has a reboot or file operations pending: finalizing now would lose them."""


def disk_file_name(layer: str, version: str) -> str:
    """The packaging disk's file name without its extension: ``<layer>_<version>_packaging``."""
    return f"{layer}_{version}_packaging"


def deliver_to_folder(staged: Path, folder: Path) -> Path:
    """The folder connector's delivery: move the finished disk ``staged`` into ``folder`` under its own name and
    return where it is now. An existing file is never replaced. (Hypervisor connectors deliver the same file
    to their storage instead.)"""
    target = Path(folder) / staged.name
    try:
        os.link(staged, target)  # atomic, and refuses an existing file
    except FileExistsError:
        raise PackagingError(f"{target} already exists; it is never overwritten. Move it away and package "
                             "again.") from None
    except OSError:  # another file system: copy beside the target first, then link it into place
        partial = target.with_name(f".{target.name}.partial")
        try:
            shutil.copyfile(staged, partial)
            os.link(partial, target)
        except FileExistsError:
            raise PackagingError(f"{target} already exists; it is never overwritten.") from None
        finally:
            partial.unlink(missing_ok=True)
    staged.unlink()
    return target


# --- identifying a disk ----------------------------------------------------------------------------------


def volume_serial(volume: Path) -> str:
    """The serial number of the NTFS volume image ``volume`` (16 hex digits), set when the volume was formatted:
    it tells one packaging disk from another made of the same layers."""
    with Path(volume).open("rb") as file:
        boot = file.read(SECTOR)
    if boot[3:11] != _NTFS_OEM:
        raise NotThePackagingDisk(f"{volume} is not an NTFS volume.")
    return int.from_bytes(boot[0x48:0x50], "little").to_bytes(8, "big").hex().upper()


def disk_volume_serial(disk: Path, scratch: Path) -> str:
    """The serial number of the Windows volume of the disk image ``disk`` (any format the engine reads); only its
    boot sector is read (into a temporary file in ``scratch``)."""
    info = image_info(disk)
    partition = read_image_partition_table(info, scratch).ntfs_data_partition()
    boot = scratch / f".{disk.name}.boot"
    boot.unlink(missing_ok=True)
    try:
        extract_partition(info, replace(partition, size=8 * SECTOR), boot)
        return volume_serial(boot)
    finally:
        boot.unlink(missing_ok=True)


# --- what is pending on a packaging machine ----------------------------------------------------------------


def _multi_sz(data: bytes) -> list[str]:
    text = data.decode("utf-16-le", errors="replace")
    return [part for part in text.split("\0") if part.strip()]


def _file_operations(data: bytes) -> int:
    """How many operations a ``PendingFileRenameOperations`` value queues: its strings come in pairs, the file
    then its new name (empty: delete it)."""
    parts = data.decode("utf-16-le", errors="replace").split("\0")
    return max(1, sum(1 for source in parts[0::2] if source.strip()))


def _current_control_set(system: Hive) -> str:
    select = system.find("Select")
    value = select.value("Current") if select is not None else None
    if value is None or value.type != ValueType.DWORD or len(value.data) < 4:
        return "ControlSet001"
    return f"ControlSet{int.from_bytes(value.data[:4], 'little'):03d}"


def _entries(key: RegistryKey, ignore: frozenset[str] = frozenset()) -> int:
    """Values (the unnamed default one only when it holds something) and subkeys queued in ``key``."""
    values = [v for v in key.values.values() if fold(v.name) not in ignore and (v.name or v.data.strip(b"\0"))]
    return len(values) + len(key.subkeys)


def pending_operations(system: Hive | None, software: Hive | None) -> list[str]:
    """What the machine whose hives these are still has to do at its next start, one line each naming the
    registry path found: ``PendingFileRenameOperations`` / ``PendingFileRenameOperations2`` in ``Session
    Manager`` of the current control set, entries under ``RunOnce`` and ``RunOnceEx``, ``Component Based
    Servicing\\RebootPending`` and ``WindowsUpdate\\Auto Update\\RebootRequired``. Empty: nothing pending."""
    found: list[str] = []
    if system is not None:
        control_set = _current_control_set(system)
        manager = system.find(f"{control_set}\\{_SESSION_MANAGER}")
        for name in ("PendingFileRenameOperations", "PendingFileRenameOperations2"):
            value = manager.value(name) if manager is not None else None
            if value is None:
                continue
            operations = _multi_sz(value.data) if value.type == ValueType.MULTI_SZ else ["?"]
            if operations:
                count = _file_operations(value.data) if value.type == ValueType.MULTI_SZ else 1
                found.append(f"HKLM\\SYSTEM\\{control_set}\\{_SESSION_MANAGER}\\{name} "
                             f"({', '.join(operations[:2])}{', …' if len(operations) > 2 else ''}; "
                             f"{count} pending file operation{'s' if count != 1 else ''})")
    if software is not None:
        for name, ignore in (("RunOnce", frozenset[str]()), ("RunOnceEx", _RUN_ONCE_EX_SETTINGS)):
            key = software.find(f"{_CURRENT_VERSION}\\{name}")
            count = _entries(key, ignore) if key is not None else 0
            if count:
                shown = ", ".join([v.name for v in key.values.values() if v.name and fold(v.name) not in ignore]
                                  + [k.name for k in key.subkeys.values()]) if key is not None else ""
                found.append(f"HKLM\\SOFTWARE\\{_CURRENT_VERSION}\\{name} ({count} entr{'ies' if count != 1 else 'y'}"
                             f"{': ' + shown if shown else ''})")
        for path in (f"{_CURRENT_VERSION}\\Component Based Servicing\\RebootPending",
                     f"{_CURRENT_VERSION}\\WindowsUpdate\\Auto Update\\RebootRequired"):
            if software.find(path) is not None:
                found.append(f"HKLM\\SOFTWARE\\{path}")
    return found


def read_volume_hives(volume: Path, folder: Path, names: tuple[HiveName, ...]) -> dict[HiveName, Hive]:
    """The hives ``names`` of the Windows on the NTFS volume image ``volume`` (those it has), read with their
    transaction logs replayed; ``folder`` (made here, emptied after) holds the copies read."""
    wanted = {hive: HIVE_FILES[hive] for hive in names}
    folder.mkdir(parents=True, exist_ok=True)
    hives: dict[HiveName, Hive] = {}
    with Wim.create("none") as wim:  # a capture scans only the volume's metadata
        index = wim.add_image_from_ntfs_volume(volume, "check")
        try:
            listed = list(wim.iterate_dir_tree(index, "/Windows/System32/config"))
        except WimError:  # no such folder: no hives to read
            listed = []
        present = {fold(entry.path): entry.path for entry in listed if not entry.is_directory}
        paths = [present[fold(path + suffix)] for path in wanted.values() for suffix in ("", ".LOG1", ".LOG2")
                 if fold(path + suffix) in present]
        if paths:
            wim.extract_paths_to_folder(index, paths, folder)
    try:
        for hive, path in wanted.items():
            if fold(path) not in present:
                continue
            local = folder / present[fold(path)].strip("/")
            logs = [(folder / present[fold(path + s)].strip("/")).read_bytes() for s in (".LOG1", ".LOG2")
                    if fold(path + s) in present]
            try:
                hives[hive] = parse_hive(local.read_bytes(), name=f"the disk's {path.strip('/')}", logs=logs)
            except HiveError as exc:
                raise NotThePackagingDisk(f"The disk's registry cannot be read: {exc}") from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return hives


# --- the workers -----------------------------------------------------------------------------------------


class _Progress:
    """Maps a step's progress onto ``low``–``high`` percent of the task; at most every 0.2 s or whole percent."""

    def __init__(self, report: WorkerReport, low: float, high: float) -> None:
        self._report, self._low, self._high = report, low, high
        self._last: tuple[int, str, float] = (-1, "", 0.0)

    def step(self, fraction: float, message: str) -> None:
        percent = int(self._low + (self._high - self._low) * max(0.0, min(1.0, fraction)))
        now = time.monotonic()
        if (percent, message) != self._last[:2] or now - self._last[2] >= 0.2:
            self._last = (percent, message, now)
            self._report.progress(percent, message)

    def percent(self, value: float, message: str) -> None:
        self.step(value / 100, message)

    def bytes_done(self, message: str) -> Callable[[int, int], None]:
        return lambda done, total: self.step(done / total if total else 1.0, message)


def _cancellable(work: Callable[[CancelToken], dict[str, Any]], report: WorkerReport, what: str) -> dict[str, Any]:
    """Run ``work`` with a token that a SIGTERM (the task's cancel) sets; a cancel exits the process with 143."""
    token = CancelToken()
    previous: Callable[[int, FrameType | None], Any] | int | None = None
    if hasattr(signal, "SIGTERM"):
        previous = signal.signal(signal.SIGTERM, lambda *_: token.cancel())
    try:
        return work(token)
    except TaskCanceled:
        report.log(f"{what} canceled; nothing was kept.", "WARNING")
        sys.exit(143)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _cache(args: Mapping[str, Any]) -> LayerDiskCache | None:
    if not args.get("cache_dir"):
        return None
    return LayerDiskCache(Path(args["cache_dir"]), int(args.get("cache_bytes", 0)))


def package_worker(args: dict[str, Any], report: WorkerReport) -> dict[str, Any]:
    """Worker function (child process) of the packaging task: composite the packaging disk and deliver it.

    ``args``: ``repository``, ``stack`` (:meth:`StackLayer.to_dict` forms: the OS layer version, the
    prerequisites, the previous version), ``format`` (an engine output format), ``size_gb``, ``name`` (the file
    name without extension), ``out_dir`` (where it is delivered), ``staging`` (a new folder inside ``out_dir``
    for the work; removed at the end) and optionally ``cache_dir``/``cache_bytes``. Returns the delivered
    disk's ``path``, ``size_bytes``, ``checksum``, ``manifest_digest``, ``volume_serial`` and ``files``."""

    def work(token: CancelToken) -> dict[str, Any]:
        staging = Path(args["staging"])
        staging.mkdir()
        progress = _Progress(report, 0, 96)
        try:
            result = compose(
                [StackLayer.from_dict(layer) for layer in args["stack"]], LayerRepository(Path(args["repository"])),
                staging, str(args["format"]), float(args["size_gb"]), name=str(args["name"]), cache=_cache(args),
                progress=progress.percent, cancel=token,
            )
            report.progress(97, "Reading the packaging disk's volume serial number")
            serial = disk_volume_serial(result.path, staging)
            if token.cancelled:
                raise TaskCanceled()
            report.progress(98, "Delivering the packaging disk")
            delivered = deliver_to_folder(result.path, Path(args["out_dir"]))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        report.log(f"Packaging disk {delivered}: {result.files} files ({result.data_bytes} bytes), "
                   f"{result.size_bytes} bytes on disk, Windows volume serial {serial}.")
        report.progress(100, "Packaging disk delivered")
        return {
            "summary": f"Packaging disk {delivered.name} delivered to {delivered.parent}.",
            "path": str(delivered), "size_bytes": result.size_bytes, "checksum": result.checksum,
            "manifest_digest": result.manifest_digest, "volume_serial": serial, "files": result.files,
            "data_bytes": result.data_bytes,
        }

    return _cancellable(work, report, "Packaging")


def finalize_worker(args: dict[str, Any], report: WorkerReport) -> dict[str, Any]:
    """Worker function (child process) of the finalize task: check the disk, composite the base again and store
    the difference as the version (see the module docstring).

    ``args``: ``repository``, ``layer_id``, ``version_id``, ``ref`` (``LAYER:VERSION``, for messages), ``disk``,
    ``base`` (:meth:`StackLayer.to_dict` forms: the OS layer version and the prerequisites), ``size_gb``,
    ``volume_serial`` (the packaging disk's), ``manifest_digest`` (the base's, when known: the packaging disk's
    when it had no previous version; else ``None``), ``work_dir`` (a new folder, removed at the end) and
    optionally ``cache_dir``/``cache_bytes``. Refusals (:class:`NotThePackagingDisk`,
    :class:`PendingOperations`) happen before anything is stored."""

    def work(token: CancelToken) -> dict[str, Any]:
        work_dir = Path(args["work_dir"])
        shutil.rmtree(work_dir, ignore_errors=True)
        work_dir.mkdir(parents=True)
        try:
            return _finalize(args, report, token, work_dir)
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)

    return _cancellable(work, report, "Finalize")


def _finalize(args: dict[str, Any], report: WorkerReport, token: CancelToken, work: Path) -> dict[str, Any]:
    ref, disk = str(args["ref"]), Path(args["disk"])
    report.progress(1, f"Reading the Windows volume of {disk.name}")
    try:
        after = extract_ntfs_volume(disk, work / "after.ntfs", cancel=token,
                                    progress=_Progress(report, 1, 15).bytes_done("Reading the disk's Windows volume")
                                    ).volume
    except UserError as exc:
        raise NotThePackagingDisk(f"{disk} cannot be the packaging disk of {ref}: {exc}") from None
    serial = volume_serial(after)
    if serial != args["volume_serial"]:
        raise NotThePackagingDisk(
            f"{disk} is not the packaging disk of {ref}: its Windows volume has serial number {serial}, the "
            f"packaging disk delivered for {ref} has {args['volume_serial']}. Finalize with that disk, or abandon "
            "the version and create a new packaging disk.")
    report.progress(15, "Looking for a pending reboot or pending file operations")
    hives = read_volume_hives(after, work / "hives", (HiveName.SYSTEM, HiveName.SOFTWARE))
    pending = pending_operations(hives.get(HiveName.SYSTEM), hives.get(HiveName.SOFTWARE))
    if pending:
        raise PendingOperations(
            f"{ref} cannot be finalized yet: the packaging machine has a pending reboot or pending operations: "
            f"{'; '.join(pending)}. Start the packaging machine again (as often as it takes until nothing is "
            "pending), shut it down, then finalize.")
    if token.cancelled:
        raise TaskCanceled()
    base_stack = [StackLayer.from_dict(layer) for layer in args["base"]]
    repository = LayerRepository(Path(args["repository"])).ensure()
    progress = _Progress(report, 18, 45)
    (work / "base").mkdir()
    composed = compose(base_stack, repository, work / "base", "raw", float(args["size_gb"]), name="base",
                       cache=_cache(args), progress=lambda p, m: progress.percent(p, f"Base: {m}"), cancel=token)
    expected = args.get("manifest_digest")
    if expected and composed.manifest_digest != expected:
        raise EnvironmentProblem(
            f"The layers {ref}'s packaging disk was made of no longer composite to the same tree (manifest digest "
            f"{composed.manifest_digest}, the packaging disk's {expected}); the difference would not be exact, so "
            "nothing was stored. Check the layer repository (layerctl repo check).")
    base = extract_ntfs_volume(composed.path, work / "base.ntfs", cancel=token,
                               progress=_Progress(report, 45, 50).bytes_done("Reading the base's Windows volume")
                               ).volume
    composed.path.unlink()
    with capture_difference(base, after, work, step=_Progress(report, 50, 85).step, cancel=token) as difference:
        report.log(f"Difference of {disk.name} from its base: {len(difference.added)} added, "
                   f"{len(difference.changed)} changed, {difference.unchanged} unchanged files; "
                   f"{len(difference.deletions)} deletion(s); {len(difference.registry)} registry operation(s) "
                   f"from the {', '.join(difference.hives) or 'no'} hive(s).")
        if difference.excluded:
            report.log(f"{len(difference.excluded)} changed file(s) left out (registry hive files, paging files, "
                       "restore points, the recycle bin).")
        stored = repository.store_version(
            int(args["layer_id"]), int(args["version_id"]), CaptureSource(SourceKind.DISK_IMAGE, disk),
            deletions=difference.deletions, delta=difference.registry, build=difference.add_to,
            progress=_Progress(report, 85, 99).bytes_done("Writing the layer's WIM"), cancel=token,
        )
        added, changed = len(difference.added), len(difference.changed)
    report.progress(100, "Finalized")
    return {
        "summary": f"Finalized {ref}: {added} added and {changed} changed files ({stored.data_bytes} bytes), "
                   f"{stored.deletions} deletion(s), {stored.registry_operations} registry operation(s).",
        "image": stored.image, "checksum": stored.checksum, "files": stored.files,
        "data_bytes": stored.data_bytes, "wim_bytes": stored.wim_bytes, "deletions": stored.deletions,
        "registry_operations": stored.registry_operations, "added": added, "changed": changed,
        "volume_serial": serial,
    }
