"""A layer captured as the difference between two NTFS volumes: the machine before and after a change.

A difference import (``layerctl layer import … --base``) and finalizing a packaging machine both capture an
app or platform layer this way: ``base`` is the machine's Windows volume before the installation, ``after``
the same volume afterwards (NTFS volume images; :func:`ntfs_volume_of` copies one out of a disk image).

1. Both volumes are captured into one work WIM in memory, one ``wimlib_add_image`` call each (never two NTFS
   sources in one call: the wimlib aliasing bug), and wimlib hashes every file's data once
   (:meth:`Wim.compute_hashes`, which reads both volumes in full: the step that takes the time).
2. The two trees are compared, paths case-insensitively as on Windows. A file is *changed* when its data, its
   named streams (names and data), its attributes, its reparse point (tag and data) or its security
   descriptor differ; timestamps and short names are not compared. A path that is a file on one side and a
   directory on the other is deleted, then added.
3. The layer image is ``after``'s tree without its unchanged files: ``after`` is captured once more into a
   second work WIM (the hashed one can only be listed, see :meth:`Wim.compute_hashes`; a capture only scans
   the volume's metadata) and one update call deletes them (a whole unchanged directory at once). A
   directory stays when something in it is new or changed, or when it is new itself (empty ones too). A
   directory both sides have keeps the OS layer's name, ACL and attributes when composited, so a change to
   a directory's own metadata is not part of the layer.
4. The deletions are the paths ``base`` has and ``after`` has not, topmost only, as whiteouts
   (:class:`Deletion`).
5. The registry: the hive files of :data:`app.engine.publish_hives.HIVE_FILES` (SOFTWARE, SYSTEM, DEFAULT, DRIVERS,
   the default user's NTUSER.DAT) are read from both sides (replaying their ``.LOG1``/``.LOG2``) and their
   difference becomes the layer's registry delta (:func:`app.engine.registry.diff.layer_registry_delta`:
   SYSTEM through its current control set, spelled ``ControlSet001`` as compositing expects).

Left out of the file difference (:func:`is_excluded`), on both sides:

* every file directly in ``Windows\\System32\\config`` and its ``TxR`` and ``RegBack`` folders: the registry's
  hive files, their transaction logs and backups. A hive file changes on every boot (its header's sequence
  numbers and timestamp), so as a file it would always differ; the five hives above are compared key by key
  instead, and the others (SAM, SECURITY, COMPONENTS, BBI, ELAM…) are the machine's own state, which an app
  layer must not replace;
* ``Users\\Default\\NTUSER.DAT`` and the files beside it whose names start with it (its logs and transaction
  files), for the same reason;
* at the volume's root: ``pagefile.sys``, ``swapfile.sys`` and ``hiberfil.sys`` (paging and hibernation data
  of the running machine), ``System Volume Information`` (restore points, volume shadow copies, the indexer's
  database) and ``$Recycle.Bin`` (deleted files).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

from app.engine.disk import extract_ntfs_volume
from app.engine.publish_hives import HIVE_FILES
from app.engine.registry.delta import HiveName, RegistryDelta
from app.engine.registry.diff import layer_registry_delta
from app.engine.registry.model import Hive, fold
from app.engine.registry.regf import HiveError, parse_hive
from app.engine.repository import Deletion
from app.engine.wim import DeleteCommand, DirEntry, Wim
from app.errors import EnvironmentProblem, UserError
from app.procs import Cancellable
from app.tasks.base import TaskCanceled

log = logging.getLogger(__name__)

__all__ = [
    "DifferenceError",
    "LayerDifference",
    "StepFn",
    "capture_difference",
    "is_excluded",
    "ntfs_volume_of",
]

#: ``step(fraction, message)``: how far the capture is (0.0–1.0) and what it is doing.
StepFn = Callable[[float, str], None]

_NTFS_OEM_ID = b"NTFS    "
_ROOT_NOISE = frozenset(fold(name) for name in (
    "pagefile.sys", "swapfile.sys", "hiberfil.sys", "System Volume Information", "$Recycle.Bin"))
_CONFIG = tuple(fold(part) for part in ("Windows", "System32", "config"))
_CONFIG_FOLDERS = frozenset(fold(name) for name in ("TxR", "RegBack"))
_DEFAULT_PROFILE = tuple(fold(part) for part in ("Users", "Default"))
_DEFAULT_USER_HIVE = fold("NTUSER.DAT")
# How much of the capture each step is (the hashing reads both volumes whole).
_SCAN, _HASH, _COMPARE = 0.05, 0.9, 0.95


class DifferenceError(UserError):
    """The two volumes cannot be compared as given (not the same Windows, a hive missing or unreadable)."""

    code = "difference"


def is_excluded(path: str, *, is_directory: bool) -> bool:
    """Whether ``path`` (``/``- or ``\\``-separated, from the volume's root) is left out of a difference
    (see the module docstring); whatever is below an excluded folder is excluded too."""
    parts = tuple(fold(part) for part in path.replace("\\", "/").split("/") if part)
    if not parts:
        return False
    if parts[0] in _ROOT_NOISE:
        return True
    if parts[:3] == _CONFIG and len(parts) > 3:
        return parts[3] in _CONFIG_FOLDERS or (len(parts) == 4 and not is_directory)
    return (parts[:2] == _DEFAULT_PROFILE and len(parts) == 3 and not is_directory
            and parts[2].startswith(_DEFAULT_USER_HIVE))


def ntfs_volume_of(
    path: Path, out: Path, *, progress: Callable[[int, int], None] | None = None, cancel: Cancellable | None = None,
) -> Path:
    """``path`` itself when it is an NTFS volume image; otherwise the Windows NTFS partition of the disk image
    ``path``, copied (sparse) to the new file ``out`` (:func:`app.engine.disk.extract_ntfs_volume`)."""
    with Path(path).open("rb") as file:
        head = file.read(16)
    if head[3:11] == _NTFS_OEM_ID:
        return Path(path)
    return extract_ntfs_volume(Path(path), out, progress=progress, cancel=cancel).volume


@dataclass
class _Plan:
    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    unchanged: int = 0
    deletions: list[Deletion] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)
    #: What is deleted from ``after``'s image to leave the layer (topmost paths, as the image spells them).
    drop: list[str] = field(default_factory=list)


class LayerDifference:
    """The difference between two volumes, with the layer image built in the work WIM.

    Keep it open (a context manager) until the layer image has been written where it goes (:meth:`add_to`
    then the layer WIM's write): the image's file data is read from the ``after`` volume, which must stay
    in place until then too.
    """

    def __init__(self, layer_source: Wim, image: int, plan: _Plan, registry: RegistryDelta, hives: Sequence[str],
                 timings: Mapping[str, float]) -> None:
        self._wim = layer_source
        self._image = image
        #: Files (Windows paths, as ``after`` spells them) new in ``after``; directories are not listed.
        self.added: tuple[str, ...] = tuple(plan.added)
        #: Files both sides have whose content, streams, attributes, reparse point or ACL differ.
        self.changed: tuple[str, ...] = tuple(plan.changed)
        #: How many files both sides have unchanged (left out of the layer).
        self.unchanged = plan.unchanged
        #: What ``base`` has and ``after`` has not (topmost paths, as ``base`` spells them).
        self.deletions: tuple[Deletion, ...] = tuple(plan.deletions)
        #: Files that differ but were left out (:func:`is_excluded`), Windows paths.
        self.excluded: tuple[str, ...] = tuple(plan.excluded)
        #: The registry delta of the hives both sides have (:func:`layer_registry_delta`).
        self.registry = registry
        #: The hives compared (:class:`HiveName` values).
        self.hives: tuple[str, ...] = tuple(hives)
        #: Seconds per step: ``scan``, ``hash``, ``compare``, ``registry``, ``build``.
        self.timings: dict[str, float] = dict(timings)

    def add_to(self, layer_wim: Wim, name: str) -> int:
        """Export the layer image into ``layer_wim`` as image ``name``; returns its index there. Write
        ``layer_wim`` before closing this."""
        return self._wim.export_image(self._image, layer_wim, name)

    def close(self) -> None:
        self._wim.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def capture_difference(
    base: Path, after: Path, work: Path, *, step: StepFn | None = None, cancel: Cancellable | None = None,
) -> LayerDifference:
    """Compare the NTFS volume images ``base`` and ``after`` and build the layer image (see the module
    docstring). ``work`` is an existing folder for the hives read; ``step`` reports progress; ``cancel`` stops
    it (:class:`TaskCanceled`). The caller closes the result."""
    timings: dict[str, float] = {}
    started = time.monotonic()

    def report(fraction: float, message: str) -> None:
        if cancel is not None and cancel.cancelled:
            raise TaskCanceled()
        if step is not None:
            step(fraction, message)

    work_wim = Wim.create("none")  # never written to a file: no point compressing
    try:
        report(0.0, "Scanning the base volume")
        base_index = work_wim.add_image_from_ntfs_volume(base, "base", cancel=cancel)
        report(_SCAN / 2, "Scanning the new volume")
        after_index = work_wim.add_image_from_ntfs_volume(after, "after", cancel=cancel)
        timings["scan"] = time.monotonic() - started

        def hashing(done: int, total: int) -> None:
            report(_SCAN + (_HASH - _SCAN) * (done / total if total else 1.0), "Reading both volumes' files")

        report(_SCAN, "Reading both volumes' files")
        mark = time.monotonic()
        work_wim.compute_hashes(progress=hashing, cancel=cancel)
        timings["hash"] = time.monotonic() - mark

        report(_HASH, "Comparing the volumes")
        mark = time.monotonic()
        base_entries = list(work_wim.iterate_dir_tree(base_index))
        after_entries = list(work_wim.iterate_dir_tree(after_index))
        plan = _compare(base_entries, after_entries)
        timings["compare"] = time.monotonic() - mark

        report(_COMPARE, "Comparing the registry hives")
        mark = time.monotonic()
        before_hives = _read_hives(work_wim, base_index, base_entries, work / "base", "base")
        after_hives = _read_hives(work_wim, after_index, after_entries, work / "after", "new")
        _check_same_hives(before_hives, after_hives)
        registry = layer_registry_delta(before_hives, after_hives)
        timings["registry"] = time.monotonic() - mark

        report(0.98, "Building the layer image")
        mark = time.monotonic()
        layer_source = Wim.create("none")
        try:
            index = layer_source.add_image_from_ntfs_volume(after, "layer", cancel=cancel)
            layer_source.update_image(index, [DeleteCommand(path, recursive=True) for path in plan.drop],
                                      cancel=cancel)
        except BaseException:
            layer_source.close()
            raise
        timings["build"] = time.monotonic() - mark
    finally:
        work_wim.close()
    try:
        report(1.0, "Difference captured")
    except BaseException:
        layer_source.close()
        raise
    log.info("difference of %s → %s: %d added, %d changed, %d unchanged files, %d deletions, %d registry "
             "operations; %s", base, after, len(plan.added), len(plan.changed), plan.unchanged,
             len(plan.deletions), len(registry), ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()))
    return LayerDifference(layer_source, index, plan, registry, [h.value for h in before_hives], timings)


# --- comparing the trees -------------------------------------------------------------------------------


def _key(entry: DirEntry) -> str:
    """The folded path without the leading ``/`` (``""`` is the root)."""
    return fold(entry.path.strip("/"))


def _windows(entry: DirEntry) -> str:
    return entry.path.strip("/").replace("/", "\\")


def _streams(entry: DirEntry) -> dict[str, bytes]:
    names = ("", *(fold(name) for name in entry.stream_names))
    hashes = entry.stream_hashes
    if len(hashes) != len(names) or any(h is None for h in hashes):
        raise EnvironmentProblem(f"wimlib did not report the data hashes of {entry.path}; the volumes cannot be "
                                 "compared.")
    return {name: h for name, h in zip(names, hashes, strict=True) if h is not None}


def _same(old: DirEntry, new: DirEntry) -> bool:
    return (old.attributes == new.attributes and old.reparse_tag == new.reparse_tag
            and old.security_descriptor == new.security_descriptor and _streams(old) == _streams(new))


def _compare(base_entries: Iterable[DirEntry], after_entries: Sequence[DirEntry]) -> _Plan:
    """What differs, what the layer keeps of ``after`` and what it deletes of ``base`` (entries come parents
    before children, as wimlib lists them)."""
    base = {_key(entry): entry for entry in base_entries}
    after = {_key(entry): entry for entry in after_entries}
    plan = _Plan()
    kept: set[str] = {""}  # folded paths the layer image keeps (with every parent)

    def keep(key: str) -> None:
        while key not in kept:
            kept.add(key)
            key = key.rpartition("/")[0]

    unchanged = 0
    for entry in after_entries:
        key = _key(entry)
        if not key:
            continue
        old = base.get(key)
        if is_excluded(key, is_directory=entry.is_directory):
            if not entry.is_directory and (old is None or old.is_directory or not _same(old, entry)):
                plan.excluded.append(_windows(entry))
            continue
        if old is not None and old.is_directory != entry.is_directory:
            old = None  # deleted first (below), then added
        if old is None:
            keep(key)
            if not entry.is_directory:
                plan.added.append(_windows(entry))
        elif entry.is_directory:
            continue  # kept if something below it is
        elif _same(old, entry):
            unchanged += 1
        else:
            keep(key)
            plan.changed.append(_windows(entry))
    plan.unchanged = unchanged
    gone: set[str] = set()  # base paths deleted (or replaced), to give only the topmost a whiteout
    for entry in base.values():
        key = _key(entry)
        if not key or is_excluded(key, is_directory=entry.is_directory):
            continue
        new = after.get(key)
        if new is not None and new.is_directory == entry.is_directory:
            continue
        covered = key.rpartition("/")[0] in gone
        gone.add(key)
        if not covered:
            plan.deletions.append(Deletion(_windows(entry)))
    for entry in after_entries:
        key = _key(entry)
        if key and key not in kept and key.rpartition("/")[0] in kept:
            plan.drop.append(entry.path)
    return plan


# --- the registry --------------------------------------------------------------------------------------


def _read_hives(
    work_wim: Wim, index: int, entries: Sequence[DirEntry], folder: Path, side: str,
) -> dict[HiveName, Hive]:
    """The hives of :data:`HIVE_FILES` the image has, read with their transaction logs replayed."""
    listing = {_key(entry): entry for entry in entries}
    found: dict[HiveName, tuple[DirEntry, list[DirEntry]]] = {}
    for hive, image_path in HIVE_FILES.items():
        entry = listing.get(fold(image_path.strip("/")))
        if entry is None or entry.is_directory:
            continue
        logs = [listing[key] for suffix in (".LOG1", ".LOG2")
                if (key := fold(image_path.strip("/") + suffix)) in listing and not listing[key].is_directory]
        found[hive] = (entry, logs)
    if not found:
        return {}
    folder.mkdir(parents=True, exist_ok=True)
    work_wim.extract_paths_to_folder(index, [e.path for entry, logs in found.values() for e in (entry, *logs)],
                                     folder)
    hives = {}
    for hive, (entry, logs) in found.items():
        local = folder / entry.path.strip("/")
        try:
            hives[hive] = parse_hive(local.read_bytes(), name=f"the {side} volume's {_windows(entry)}",
                                     logs=[(folder / log_entry.path.strip("/")).read_bytes() for log_entry in logs])
        except HiveError as exc:
            raise DifferenceError(f"Cannot compare the registry: {exc}") from None
        for path in (local, *(folder / log_entry.path.strip("/") for log_entry in logs)):
            path.unlink()
    return hives


def _check_same_hives(before: Mapping[HiveName, Hive], after: Mapping[HiveName, Hive]) -> None:
    for hive in HiveName:
        if (hive in before) != (hive in after):
            where = HIVE_FILES[hive].strip("/").replace("/", "\\")
            has, lacks = ("new", "base") if hive in after else ("base", "new")
            raise DifferenceError(
                f"The {has} volume has the {hive.value} hive ({where}) but the {lacks} volume has not: they are not "
                "the same Windows installation before and after a change.")
