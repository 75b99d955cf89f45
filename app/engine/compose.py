"""Compositing: a layer stack (OS, app layers lowest priority first, platform) → one image (DESIGN.md §3–4).

* :func:`conflicts` lists every file path and registry value supplied by more than one layer of a stack,
  which layers supplied it (lowest first) and which one wins. It reads only the layers' WIM directory
  listings and manifests; nothing is written. Rules:

  - **Files.** Paths compare case-insensitively and read Windows-style (``Program Files\\App\\x.dll``),
    spelled as the merged image spells them (a directory keeps the lowest layer's spelling, a file takes
    the spelling of the layer that supplied it last). Directories are not reported. A whiteout of a
    layer that removes a file a lower layer supplied counts as that layer supplying it: it wins, and the
    :class:`Conflict` is marked ``deleted``. A layer that removes a path and supplies it again (an opaque
    directory) counts once.
  - **Registry.** Conflicts are between the layers' registry *deltas*; the OS layer's own hive files are
    the base every delta applies to and supply nothing here (its version may carry a delta of its own,
    which counts like any other). A value is reported when the deltas of two or more layers set or
    delete it; a key deletion also counts as touching every value and key below it that a lower layer
    touched. ``Path``-like environment variables that the layers only extend (they concatenate, see
    :func:`app.engine.registry.delta.merge_environment`) and keys that layers only create are not
    conflicts. Registry paths read ``HKLM\\SOFTWARE\\Key\\Sub\\ValueName`` (keys end with ``\\``).

* :func:`compose` builds the image, in the process that calls it (the publish task runs it in a child
  process through :func:`compose_worker`):

  1. the OS version's image is opened from the repository's WIM and changed *in memory only* (the
     repository file is never written);
  2. each app layer in order, then the platform layer, is taken as an NTFS volume from the layer disk
     cache (:mod:`app.engine.layer_cache`; staged from the repository onto an empty volume when not
     there) and merged with ONE ``wimlib_update_image`` call: its whiteouts (recursive deletes, missing paths
     ignored), then the volume at ``/`` (NTFS mode: ACLs, streams and short names kept; the wimlib
     aliasing bug needs one NTFS source per call). Where both layers hold a directory, the lower
     layer's directory (name, ACL, attributes) stays; files are replaced whole;
  3. the hives some delta changes (``Windows\\System32\\config\\SOFTWARE``, ``SYSTEM``, ``DEFAULT``,
     ``DRIVERS``, ``Users\\Default\\NTUSER.DAT``) get every layer's delta in stack order, in a child process
     that starts with the publish and reads them from the OS layer's image (from the merged image when a
     layer replaced or removed one: :mod:`app.engine.publish_hives`); the new hive files replace the old
     ones (their transaction logs, stale now, are removed from the image). ``.reg`` imports map ``CurrentControlSet`` to
     ``ControlSet001``; when ``SYSTEM\\Select\\Current`` names another control set, keys under
     ``ControlSet001`` are moved to it. On a disk the new hive files overwrite the old ones in place on
     the applied volume (``ntfscp``), keeping their ACLs and attributes; in a WIM output they are new
     files without an ACL of their own (Windows' ``config`` folder ACL applies);
  4. ``wim``: the merged image is exported to a new WIM (XPRESS), written and verified; disk formats: a
     partition-sized NTFS volume is made for the template's disk, the merged image is applied onto it,
     and the disk is written from the pieces around the volume (:func:`app.engine.disk.convert_hashed`:
     LayerDesk's own VHD, VHDX and raw writers, which hash the file as they write it, qemu-img for the
     other formats), then verified. An OS layer imported from a gold disk lays the disk out like it, with its other
     partitions and boot code (:mod:`app.engine.gold`); otherwise the disk is GPT: ESP (empty FAT32),
     MSR, then Windows up to the backup GPT.

  Everything is written in a work folder (``.<name>.<random>.work``) inside ``out_dir``; the output
  appears as ``<name>.<ext>`` only when complete and verified (a hard link, so an existing file is never
  replaced), and the work folder is removed on success, failure and cancel alike. The result carries a
  digest of the merged tree's manifest (every path with its kind, size, attributes, named streams and
  reparse tag, sorted; plus the new hives' SHA-256): the same inputs give the same digest.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import secrets
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Literal, get_args

from app.engine import disk, gold
from app.engine.checksum import BLOCK, Known, file_checksum
from app.engine.composite import (
    Changes,
    Composite,
    CompositeStore,
    apply_changes,
    clones_between,
    entries_below,
    plan_changes,
    prune_to,
    signatures,
)
from app.engine.layer_cache import COMPOSITES, CachedVolume, LayerDiskCache
from app.engine.ntfs_volume import NtfsVolumeError
from app.engine.publish_hives import (
    HIVE_FILES,
    HiveEntries,
    HiveMergeError,
    NewHive,
    PendingHives,
    changed_hives,
    find_entry,
    same_entries,
    windows_path,
)
from app.engine.registry.delta import HiveName, TouchKind
from app.engine.registry.model import fold
from app.engine.repository import LayerRepository, VersionManifest
from app.engine.wim import (
    AddCommand,
    DeleteCommand,
    DirEntry,
    RenameCommand,
    UpdateCommand,
    Wim,
    WimDataChanged,
    WimError,
    make_ntfs_volume,
    overwrite_file_in_ntfs_volume,
)
from app.errors import EnvironmentProblem, UserError
from app.files import no_space
from app.procs import Cancellable
from app.tasks.base import CancelToken, TaskCanceled
from app.tasks.worker import WorkerReport

log = logging.getLogger(__name__)

__all__ = [
    "EXTENSIONS",
    "ComposeError",
    "ComposeResult",
    "Conflict",
    "OutputFormat",
    "StackLayer",
    "compose",
    "compose_worker",
    "conflicts",
]

MiB = 1024 * 1024
GiB = 1024 * MiB

OutputFormat = Literal["wim", "vhd-dynamic", "vhd-fixed", "vhdx", "vmdk-stream", "vmdk-sparse", "qcow2", "raw"]
_OUTPUT_FORMATS: tuple[str, ...] = get_args(OutputFormat)
#: The file name extension of each output format.
EXTENSIONS: Mapping[str, str] = {
    "wim": "wim", "vhd-dynamic": "vhd", "vhd-fixed": "vhd", "vhdx": "vhdx", "vmdk-stream": "vmdk",
    "vmdk-sparse": "vmdk", "qcow2": "qcow2", "raw": "raw",
}

_NTFS_FIXED = 32 * MiB  # $MFT zone start, $LogFile, bitmaps of a small volume

ProgressFn = Callable[[float, str], None]


class ComposeError(UserError):
    """The stack cannot be composited as asked (a missing hive, a disk too small, a bad stack or format)."""

    code = "compose"


@dataclass(frozen=True)
class StackLayer:
    """One layer version of a stack, bottom (OS) to top (platform)."""

    role: str  # "os", "app" or "platform"
    name: str  # the layer's name, as conflict reports show it
    layer_id: int
    version_id: int
    checksum: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"role": self.role, "name": self.name, "layer_id": self.layer_id, "version_id": self.version_id,
                "checksum": self.checksum}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StackLayer:
        checksum = data.get("checksum")
        return cls(str(data["role"]), str(data["name"]), int(data["layer_id"]), int(data["version_id"]),
                   str(checksum) if checksum is not None else None)


@dataclass(frozen=True)
class Conflict:
    """A path more than one layer supplied. ``deleted``: the winner removed it (a whiteout, a deletion)."""

    kind: Literal["file", "registry"]
    path: str
    layers: tuple[str, ...]
    winner: str
    deleted: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The report's JSON form: exactly ``kind``, ``path``, ``layers`` (lowest first) and ``winner``."""
        return {"kind": self.kind, "path": self.path, "layers": list(self.layers), "winner": self.winner}


@dataclass(frozen=True)
class ComposeResult:
    path: Path
    format: str
    size_bytes: int
    #: The output file's checksum (:mod:`app.engine.checksum`).
    checksum: str
    files: int
    data_bytes: int
    #: ``sha256:<hex>`` of the merged tree's sorted manifest (see the module docstring).
    manifest_digest: str
    conflicts: tuple[Conflict, ...]
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)
    #: App and platform layers whose volumes came from the layer disk cache.
    cache_hits: int = 0
    #: Bytes of the image whose block digests came from the last publish of the stack (not read again).
    reused_bytes: int = 0


# --- the stack -----------------------------------------------------------------------------------------


def _check_stack(stack: Sequence[StackLayer]) -> None:
    if not stack or stack[0].role != "os":
        raise ComposeError("A stack starts with its OS layer version.")
    if any(layer.role == "os" for layer in stack[1:]):
        raise ComposeError("A stack has exactly one OS layer version, at the bottom.")
    if any(layer.role == "platform" for layer in stack[:-1]):
        raise ComposeError("The platform layer version goes on top of the stack.")


def _manifests(stack: Sequence[StackLayer], repository: LayerRepository) -> list[VersionManifest]:
    return [repository.manifest(layer.layer_id, layer.version_id, layer.checksum) for layer in stack]


def _list_image(repository: LayerRepository, layer: StackLayer, manifest: VersionManifest,
                ) -> list[tuple[str, bool]]:
    """``(path, is a directory)`` of everything in the layer version's image."""
    with Wim.open(repository.wim_path(layer.layer_id)) as layer_wim:
        index = layer_wim.find_image(manifest.image)
        if index is None:
            raise ComposeError(f"The repository's WIM of layer {layer.name} has no image {manifest.image}.")
        return layer_wim.list_paths(index)


# --- conflicts -----------------------------------------------------------------------------------------


def conflicts(stack: Sequence[StackLayer], repository: LayerRepository) -> list[Conflict]:
    """Every file path and registry value more than one layer of ``stack`` supplies (see the module
    docstring): files first, then registry values, each sorted by path (case-insensitively)."""
    _check_stack(stack)
    manifests = _manifests(stack, repository)
    listings = [_list_image(repository, layer, manifest) for layer, manifest in zip(stack, manifests, strict=True)]
    return _file_conflicts(stack, manifests, listings) + _registry_conflicts(stack, manifests)


def _file_conflicts(
    stack: Sequence[StackLayer], manifests: Sequence[VersionManifest],
    listings: Sequence[Sequence[tuple[str, bool]]],
) -> list[Conflict]:
    present: set[str] = set()  # folded paths of the files in the tree so far
    history: dict[str, list[int]] = {}  # folded path → indexes of the layers that supplied or removed it
    removed: dict[str, bool] = {}  # folded path → whether its last layer removed it
    spelled: dict[str, str] = {}  # folded file path → as the merged tree spells it
    folders: dict[str, str] = {"": ""}  # folded directory path → as the merged tree spells it

    def touch(key: str, index: int, *, deleting: bool) -> None:
        seen = history.setdefault(key, [])
        if not seen or seen[-1] != index:
            seen.append(index)
        removed[key] = deleting

    for index, (manifest, entries) in enumerate(zip(manifests, listings, strict=True)):
        if index:  # the OS layer has nothing below it to remove
            for deletion in manifest.deletions:
                gone = fold(deletion.path)
                under = gone + "\\"
                for key in sorted(k for k in present if k == gone or k.startswith(under)):
                    present.discard(key)
                    touch(key, index, deleting=True)
                for key in [k for k in folders if k == gone or k.startswith(under)]:
                    del folders[key]
        for image_path, is_directory in entries:
            if image_path == "/":
                continue
            path = windows_path(image_path)
            key = fold(path)
            parent_key = key.rpartition("\\")[0]
            parent = folders.get(parent_key, path.rpartition("\\")[0])
            name = path.rpartition("\\")[2]
            display = f"{parent}\\{name}" if parent else name
            if is_directory:
                folders.setdefault(key, display)
                continue
            present.add(key)
            spelled[key] = display
            touch(key, index, deleting=False)
    found = []
    for key in sorted(history):
        indexes = history[key]
        if len(indexes) < 2:
            continue
        found.append(Conflict("file", spelled[key], tuple(stack[i].name for i in indexes), stack[indexes[-1]].name,
                              deleted=removed[key]))
    return found


_QUIET_KINDS = frozenset({TouchKind.MERGE, TouchKind.CREATE_KEY})
_DELETING_KINDS = frozenset({TouchKind.DELETE_VALUE, TouchKind.DELETE_KEY})


def _registry_conflicts(stack: Sequence[StackLayer], manifests: Sequence[VersionManifest]) -> list[Conflict]:
    touches: dict[str, list[tuple[int, TouchKind]]] = {}
    spelled: dict[str, str] = {}
    for index, manifest in enumerate(manifests):
        for touch in manifest.registry.touched():
            touches.setdefault(touch.folded, []).append((index, touch.kind))
            spelled.setdefault(touch.folded, touch.path)
    key_deletions = [(key, index) for key, seen in touches.items() for index, kind in seen
                     if kind is TouchKind.DELETE_KEY]
    for key, index in key_deletions:
        for other, seen in touches.items():
            if other != key and other.startswith(key) and any(i < index for i, _ in seen):
                seen.append((index, TouchKind.DELETE_KEY))
    found = []
    for key in sorted(touches):
        seen = sorted(touches[key], key=lambda t: t[0])  # stable: a layer's own order stays
        indexes = list(dict.fromkeys(i for i, _ in seen))
        if len(indexes) < 2 or all(kind in _QUIET_KINDS for _, kind in seen):
            continue
        found.append(Conflict("registry", spelled[key], tuple(stack[i].name for i in indexes),
                              stack[indexes[-1]].name, deleted=seen[-1][1] in _DELETING_KINDS))
    return found


# --- compose -------------------------------------------------------------------------------------------


class _Steps:
    """Maps each step's own 0–1 progress onto a part of 0–100 % and times the steps."""

    def __init__(self, report: ProgressFn | None, cancel: Cancellable | None) -> None:
        self._report = report
        #: What the steps' work stops on: the task's cancel, or work running beside them that failed.
        self._cancel = _Abort(cancel)
        #: The task's own cancel.
        self.task_cancel = cancel
        #: Why work running beside the steps failed (the publish's error), once it did.
        self.failure: BaseException | None = None
        self._last = (-1, 0.0)
        self._lock = threading.Lock()  # layers are staged in several threads
        self.timings: dict[str, float] = {}
        self.cache_hits = 0
        self.reused_bytes = 0
        self.cached: list[str] = []  # names of the layer disk cache's volumes this publish uses

    def check(self) -> None:
        if self._cancel.cancelled:
            raise TaskCanceled()

    def fail(self, error: BaseException) -> None:
        """Work running beside the steps failed with ``error``: the steps stop at their next check."""
        self.failure = error
        self._cancel.failed.set()

    def at(self, percent: float, message: str) -> None:
        self.check()
        with self._lock:
            now = time.monotonic()
            if self._report is not None and (int(percent) != self._last[0] or now - self._last[1] >= 0.2):
                self._last = (int(percent), now)
                self._report(percent, message)

    def bytes_in(self, low: float, high: float, message: str) -> Callable[[int, int], None]:
        def on_bytes(done: int, total: int) -> None:
            self.at(low + (high - low) * (done / total if total else 1.0), message)
        return on_bytes

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        start = time.monotonic()
        try:
            yield
        finally:
            self.timings[name] = round(self.timings.get(name, 0.0) + time.monotonic() - start, 3)


def compose(
    stack: Sequence[StackLayer],
    repository: LayerRepository,
    out_dir: Path,
    fmt: str,
    size_gb: float,
    *,
    name: str,
    work_dir: Path | None = None,
    cache: LayerDiskCache | None = None,
    progress: ProgressFn | None = None,
    cancel: Cancellable | None = None,
) -> ComposeResult:
    """Composite ``stack`` into ``out_dir/<name>.<ext>`` in format ``fmt`` (see the module docstring);
    ``size_gb`` GiB is the disk's size (unused for ``wim``). ``work_dir`` (a new folder inside ``out_dir``,
    made here; a unique name by default) holds the work files and is removed at the end. ``cache``: the
    layer disk cache to take app and platform layers' volumes from (none: each is staged in ``work_dir``). On failure or
    cancel nothing is left in ``out_dir``."""
    started = time.monotonic()
    _check_stack(stack)
    if fmt not in _OUTPUT_FORMATS:
        raise ComposeError(f"Unknown output format {fmt!r}; choose one of {', '.join(_OUTPUT_FORMATS)}.")
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise ComposeError(f"The output folder {out_dir} does not exist.")
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise ComposeError(f"{name!r} cannot name an image file.")
    final = out_dir / f"{name}.{EXTENSIONS[fmt]}"
    if final.exists():
        raise ComposeError(f"{final} already exists; it is never overwritten.")
    steps = _Steps(progress, cancel)
    steps.at(1, "Reading the layers' manifests")
    manifests = _manifests(stack, repository)
    disk_size = 0
    if fmt != "wim":
        disk_size = round(size_gb * 1024) * MiB
        boot = manifests[0].boot
        # a disk too small for any Windows volume is refused before any work
        if boot is not None:
            boot.layout.plan(disk_size)
        else:
            disk.gpt_layout(disk_size)
    # the conflict report is only needed at the end: it is worked out beside the merging and applying
    background = ThreadPoolExecutor(1, thread_name_prefix="conflicts")
    reports: list[Future[list[Conflict]]] = []
    work = Path(work_dir) if work_dir is not None else out_dir / f".{name}.{secrets.token_hex(4)}.work"
    try:
        work.mkdir()
    except FileExistsError:
        raise ComposeError(f"The work folder {work} already exists (another publish is using it).") from None

    composites = CompositeStore(cache.root / COMPOSITES, evict=cache.evict) if cache is not None and cache.enabled \
        else None
    from_composite = True

    def build() -> tuple[Path, str, list[DirEntry], dict[str, NewHive]]:
        with contextlib.ExitStack() as held:
            pending: list[PendingHives | None] = []

            def beside(os_hives: HiveEntries | None) -> None:
                """Start the work that runs beside the merge (see :func:`_merge`)."""
                if not reports:
                    reports.append(background.submit(_timed_conflicts, stack, repository, steps))
                    background.shutdown(wait=False)
                pending.append(_start_hives(stack, manifests, repository, work, steps, held, os_hives, cache))

            merged, index, os_hives = _merge(stack, manifests, repository, work, held, steps,
                                             cache if cache is not None else LayerDiskCache(work / "staged", 0),
                                             beside)
            job = _hive_job(stack, manifests, repository, merged, index, work, steps, os_hives, pending[0], held)
            if fmt == "wim":
                hives = _merge_registry(job, merged, index, steps)
                steps.at(45, "Listing the merged image")
                entries = list(merged.iterate_dir_tree(index))
                built = _write_wim(merged, index, name, work, steps)
                steps.at(98, "Computing the image's checksum")
                with steps.timed("checksum"):
                    checksum = file_checksum(built, cancel=steps._cancel)
            else:  # the disk writer hashes what it writes, and merges the hives while it applies the image
                steps.at(45, "Listing the merged image")
                entries = list(merged.iterate_dir_tree(index))
                built, checksum, hives = _write_disk(merged, index, fmt, disk_size, entries, work, steps, stack,
                                                     manifests, repository, job, composites, from_composite)
        return built, checksum, entries, hives

    try:
        retried = False
        while True:
            try:
                built, checksum, entries, hives = build()
                break
            except TaskCanceled:
                if isinstance(steps.failure, HiveMergeError):  # the registry merge failed: its error, not a cancel
                    raise ComposeError(str(steps.failure)) from None
                if steps.failure is not None:
                    raise steps.failure from None
                raise
            except _FullApplyNeeded as exc:
                # the last composite could not be changed into this one (it was forgotten): apply every layer
                log.warning("re-publishing from the last composite failed (%s); applying every layer", exc)
                from_composite = False
                shutil.rmtree(work)
                work.mkdir()
            except WimDataChanged as exc:
                # a volume from the layer disk cache that no longer holds what its layer holds is never used:
                # the volumes taken from the cache are staged afresh from the repository (whose WIMs wimlib
                # checks as it reads them) and the image built again, once
                if retried or cache is None or not steps.cached:
                    log.error("layer data changed while the image was being built: %s", exc)
                    raise ComposeError(_DATA_CHANGED) from exc
                log.warning("A layer volume from the layer disk cache does not match its layer (%s); the %d "
                            "volume(s) taken from the cache are staged again.", exc, len(steps.cached))
                cache.discard(steps.cached)
                steps.cached, steps.cache_hits = [], 0
                retried = True
                shutil.rmtree(work)
                work.mkdir()
        files, data_bytes, digest = _tree_manifest(entries, hives)
        report = reports[0].result()
        steps.check()
        try:
            os.link(built, final)  # never replaces an image another publish wrote meanwhile
        except FileExistsError:
            raise ComposeError(f"{final} appeared while the image was being built; it was left alone.") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    steps.at(100, "Published")
    return ComposeResult(
        path=final, format=fmt, size_bytes=final.stat().st_size, checksum=checksum, files=files,
        data_bytes=data_bytes, manifest_digest=digest, conflicts=tuple(report),
        seconds=round(time.monotonic() - started, 3), timings=steps.timings, cache_hits=steps.cache_hits,
        reused_bytes=steps.reused_bytes,
    )


class _FullApplyNeeded(Exception):
    """Changing the last composite failed in a way a full apply does not (the reason is the message)."""


_DATA_CHANGED = ("The layers' files changed while the image was being built: a file's data no longer matched its "
                 "checksum in the layer repository. Nothing was published. Publish again; if this repeats, run "
                 "'layerctl repo check'.")


def _timed_conflicts(stack: Sequence[StackLayer], repository: LayerRepository, steps: _Steps) -> list[Conflict]:
    with steps.timed("conflicts"):
        return conflicts(stack, repository)


def _merge(
    stack: Sequence[StackLayer], manifests: Sequence[VersionManifest], repository: LayerRepository, work: Path,
    held: contextlib.ExitStack, steps: _Steps, cache: LayerDiskCache, beside: Callable[[HiveEntries | None], None],
) -> tuple[Wim, int, HiveEntries | None]:
    """The OS image, opened in memory, with every other layer merged into it (one update call per layer), and
    the OS image's own hive files that the registry merge reads (``None`` when no layer changes the
    registry). The layers' volumes come from the layer disk cache (or are staged into it); ``beside`` is
    given those hive files before staging the volumes that are not there when they are few
    (:data:`_LIGHT_STAGING`), else once they are all at hand."""
    os_layer, os_manifest = stack[0], manifests[0]
    merged = held.enter_context(Wim.open(repository.wim_path(os_layer.layer_id)))
    index = merged.find_image(os_manifest.image)
    if index is None:
        raise ComposeError(f"The repository's WIM of layer {os_layer.name} has no image {os_manifest.image}.")
    changed = changed_hives(manifests)
    os_hives = HiveEntries.of(merged, index, changed) if changed else None
    uppers = list(zip(stack[1:], manifests[1:], strict=True))
    to_stage = sum(manifest.data_bytes for layer, manifest in uppers
                   if not cache.holds(layer.layer_id, layer.version_id, manifest.checksum))
    light = to_stage <= _LIGHT_STAGING
    if light:
        beside(os_hives)
    with steps.timed("stage"):
        volumes = _stage(uppers, repository, work, steps, cache)
    if not light:
        beside(os_hives)
    hidden = _hide_info_hives(merged, index) if len(uppers) > 1 else []
    for number, ((layer, manifest), volume) in enumerate(zip(uppers, volumes, strict=True), 1):
        if number == len(uppers) and hidden:
            _restore_info_hives(merged, index, hidden, [m for _, m in uppers[:-1]])
        commands: list[UpdateCommand] = [DeleteCommand(d.image_path, recursive=True, missing_ok=True)
                                         for d in manifest.deletions]
        commands.append(AddCommand(volume, "/", ntfs=True))
        steps.at(30 + 10 * number / len(uppers), f"Merging layer {layer.name}")
        with steps.timed("merge"):
            merged.update_image(index, commands, cancel=steps._cancel)
            _take_hashes(merged, index, repository, layer, manifest)
    return merged, index, os_hives


def _take_hashes(merged: Wim, index: int, repository: LayerRepository, layer: StackLayer,
                 manifest: VersionManifest) -> None:
    """The files a layer's volume just added get the SHA-1s its repository image holds for them (the volume was
    staged from that image, times and all), so wimlib does not read the whole volume to hash them before the
    first extraction (1.6 s for 1.2 GB of app layers). Applying the image still reads each file's data and
    checks it against its SHA-1: a volume whose data no longer matches its layer stops the publish."""
    with Wim.open(repository.wim_path(layer.layer_id)) as layer_wim:
        image = layer_wim.find_image(manifest.image)
        if image is None:  # what the conflict report, beside this, finds too
            raise ComposeError(f"The repository's WIM of layer {layer.name} has no image {manifest.image}.")
        merged.take_hashes_from(index, layer_wim, image)


#: After every update that adds at the image's root, wimlib describes the image in its XML (edition, version)
#: from these hives, decompressing them whole: 0.16-0.23 s a layer with an 80 MB SOFTWARE hive.
_INFO_HIVES = ("/Windows/System32/config/SOFTWARE", "/Windows/System32/config/SYSTEM")


def _hide_info_hives(merged: Wim, index: int) -> list[tuple[str, str]]:
    """Move the OS image's hives wimlib reads to names it does not look for; ``(path, hidden path)`` of each.
    Layers are merged meanwhile; :func:`_restore_info_hives` puts them back before the last one, so wimlib
    reads them once."""
    token = secrets.token_hex(4)
    hidden = []
    for path in _INFO_HIVES:
        entry = find_entry(merged, index, path)
        if entry is not None and not entry.is_directory:
            folder, _, name = entry.path.rpartition("/")
            hidden.append((entry.path, f"{folder}/.layerdesk-{token}-{name}"))
    if hidden:
        merged.update_image(index, [RenameCommand(path, away) for path, away in hidden])
    return hidden


def _restore_info_hives(merged: Wim, index: int, hidden: Sequence[tuple[str, str]],
                        merged_so_far: Sequence[VersionManifest]) -> None:
    """Put the hidden hives back, or drop them where the layers merged meanwhile replaced or deleted them, so
    the image is what merging with the hives in place gives: a layer that supplied the file wins; a layer's
    whiteout of the file (or of a folder above it) removed it; a deleted folder took the hidden file along."""
    deleted = [fold(d.image_path.rstrip("/")) for manifest in merged_so_far for d in manifest.deletions]
    commands: list[UpdateCommand] = []
    for path, away in hidden:
        if find_entry(merged, index, away) is None:
            continue
        folded = fold(path)
        if find_entry(merged, index, path) is not None or any(
            folded == d or folded.startswith(d + "/") for d in deleted
        ):
            commands.append(DeleteCommand(away, recursive=False))
        else:
            commands.append(RenameCommand(away, path))
    if commands:
        merged.update_image(index, commands)


#: Staging at most this many bytes of layers leaves a core free for the work beside the merge (the registry
#: merge, the conflict report), which then starts at once; more, and it waits until the layers are staged.
_LIGHT_STAGING = 256 * MiB

#: Layers staged at once: each staging is one thread in wimlib and NTFS-3G (decompressing, checking SHA-1s,
#: writing the volume), so the cores share them; more than four would mostly wait for the disk.
_STAGING_THREADS = max(1, min(4, os.cpu_count() or 1))


class _Abort:
    """Cancel for work running beside other work: the task's cancel, or the other work failed."""

    def __init__(self, cancel: Cancellable | None) -> None:
        self._cancel = cancel
        self.failed = threading.Event()

    @property
    def cancelled(self) -> bool:
        return self.failed.is_set() or (self._cancel is not None and self._cancel.cancelled)


def _stage(
    uppers: Sequence[tuple[StackLayer, VersionManifest]], repository: LayerRepository, work: Path, steps: _Steps,
    cache: LayerDiskCache,
) -> list[Path]:
    """Every layer's volume, in stack order: from the layer disk cache, or staged from the repository. Layers
    not in the cache are staged in up to :data:`_STAGING_THREADS` threads at once (each on its own WIM and
    volume); progress is their bytes together. When one staging fails the others stop, and its error is
    raised (the first in stack order when several fail); a cancel stops them all."""
    in_use = {cache.name_for(layer.layer_id, layer.version_id, manifest.checksum) for layer, manifest in uppers}
    total = sum(manifest.data_bytes for _, manifest in uppers) or 1
    done: dict[int, int] = {}
    abort = _Abort(steps._cancel)
    lock = threading.Lock()

    def stage(number: int) -> CachedVolume:
        layer = uppers[number][0]

        def on_bytes(value: int, _of: int) -> None:
            with lock:
                done[number] = value
                share = sum(done.values()) / total
            steps.at(5 + 25 * min(1.0, share), f"Staging layer {layer.name}")

        try:
            on_bytes(0, 0)
            return cache.volume(repository, layer.layer_id, layer.version_id, layer.checksum, label=layer.name,
                                scratch=work, keep=in_use, progress=on_bytes, cancel=abort)
        except BaseException:
            abort.failed.set()
            raise

    workers = min(_STAGING_THREADS, len(uppers))
    if workers <= 1:
        staged = [stage(number) for number in range(len(uppers))]
    else:
        with ThreadPoolExecutor(workers, thread_name_prefix="stage") as pool:
            futures = [pool.submit(stage, number) for number in range(len(uppers))]
        failures = [exc for exc in (f.exception() for f in futures) if exc is not None]
        steps.check()  # the task's own cancel first: the stagings it stopped raised TaskCanceled
        if failures:
            raise next((exc for exc in failures if not isinstance(exc, TaskCanceled)), failures[0])
        staged = [f.result() for f in futures]
    steps.cache_hits += sum(volume.hit for volume in staged)
    steps.cached += [volume.path.name for volume in staged if volume.hit]
    return [volume.path for volume in staged]


# --- registry ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _HiveJob:
    """The hive files a publish rewrites: the merged image's entries of them (``found``: by hive name, SYSTEM
    always when the image has it), the ones some delta changes (``changed``) and the child process merging
    them (:mod:`app.engine.publish_hives`)."""

    found: Mapping[str, DirEntry]
    changed: Sequence[str]
    pending: PendingHives


def _start_hives(stack: Sequence[StackLayer], manifests: Sequence[VersionManifest], repository: LayerRepository,
                 work: Path, steps: _Steps, held: contextlib.ExitStack, os_hives: HiveEntries | None,
                 cache: LayerDiskCache | None) -> PendingHives | None:
    """The registry merge, started in a child process from the OS layer's hive files ``os_hives`` (kept in
    the layer disk cache, or read from the repository); ``None`` when no layer changes the registry. Ended
    (if still running) when ``held`` closes."""
    if os_hives is None:
        return None
    os_layer = stack[0]
    folder = cache.hives_folder(os_layer.layer_id, os_layer.version_id, manifests[0].checksum) if cache else None
    in_use = [cache.name_for(layer.layer_id, layer.version_id, manifest.checksum)
              for layer, manifest in zip(stack[1:], manifests[1:], strict=True)] if cache else []
    pending = PendingHives.start(repository, [layer.to_dict() for layer in stack], work / "hives",
                                 steps.task_cancel, expected=os_hives, cache=folder,
                                 cache_bytes=cache.max_bytes if cache else 0, keep=in_use)
    held.callback(pending.stop)
    return pending


def _hive_job(
    stack: Sequence[StackLayer], manifests: Sequence[VersionManifest], repository: LayerRepository, merged: Wim,
    index: int, work: Path, steps: _Steps, os_hives: HiveEntries | None, pending: PendingHives | None,
    held: contextlib.ExitStack,
) -> _HiveJob | None:
    """The merged image's hives that the deltas change (and SYSTEM, for its current control set), with
    their stale transaction logs removed from the image; ``None`` when no layer changes the registry.
    Where the layers left the OS layer's hive files and logs as they were (``os_hives``), the merge started
    with the publish (``pending``) goes on; otherwise the merged image's hives are extracted and merged
    afresh."""
    changed = changed_hives(manifests)
    if not changed or pending is None or os_hives is None:
        return None
    steps.at(40, "Merging the registry")
    with steps.timed("registry"):
        here = HiveEntries.of(merged, index, changed)
        for hive in changed:
            if hive not in here.hives:
                users = [layer.name for layer, manifest in zip(stack, manifests, strict=True)
                         if hive in manifest.registry.hives]
                raise ComposeError(
                    f"The OS layer {stack[0].name} has no {hive} hive ({windows_path(HIVE_FILES[HiveName(hive)])} "
                    f"is not in its image), but the registry changes of {', '.join(users)} need it. Import the OS "
                    "layer with its registry hive files."
                )
        if not same_entries(here, os_hives):  # a layer replaced or removed a hive or one of its logs
            log.info("the layers changed the OS layer's hive files: merging the registry into the merged image's")
            pending.stop()
            folder = work / "hives-merged"
            (folder / "in").mkdir(parents=True)
            merged.extract_paths_to_folder(index, here.paths(), folder / "in")
            steps.check()
            pending = PendingHives.start(
                repository, [layer.to_dict() for layer in stack], folder, steps.task_cancel,
                found={hive: entry.path for hive, entry in here.hives.items()})
            held.callback(pending.stop)
        pending.watch(steps.fail)  # from now on its failure stops the publish
        steps.check()
        if here.logs:
            merged.update_image(index, [DeleteCommand(entry.path, recursive=False, missing_ok=True)
                                        for entry in here.logs], cancel=steps._cancel)
    return _HiveJob(here.hives, changed, pending)


def _new_hives(job: _HiveJob, steps: _Steps) -> dict[str, NewHive]:
    """Waits for the registry merge; its new hive files."""
    try:
        return job.pending.result()
    except HiveMergeError as exc:
        raise ComposeError(str(exc)) from None
    finally:
        steps.timings["hives"] = job.pending.seconds


def _merge_registry(job: _HiveJob | None, merged: Wim, index: int, steps: _Steps) -> dict[str, NewHive]:
    """For a WIM output: the new hive files (see :mod:`app.engine.publish_hives`) replace the old ones in the
    merged image. They carry no ACL of their own there (a disk output overwrites the old files in place on the
    applied volume instead, keeping their ACLs and attributes)."""
    if job is None:
        return {}
    written = _new_hives(job, steps)
    steps.check()
    merged.update_image(index, [AddCommand(h.file, h.image_path, ntfs=False) for h in written.values()],
                        cancel=steps._cancel)
    return written


# --- the merged tree -----------------------------------------------------------------------------------


def _tree_manifest(entries: Sequence[DirEntry], hives: Mapping[str, NewHive]) -> tuple[int, int, str]:
    """(files, data bytes, ``sha256:`` digest of the sorted tree manifest). A rewritten hive is listed by
    its new content's SHA-256 and size (a disk output keeps the old file in the image until it overwrites
    it on the volume, so the listing's size is the old one)."""
    replaced = {fold(hive.image_path): hive for hive in hives.values()}
    files = 0
    data_bytes = 0
    linked: set[int] = set()
    lines = []
    for entry in entries:
        new = replaced.get(fold(entry.path))
        size = new.file.stat().st_size if new is not None else entry.size
        if not entry.is_directory:
            files += 1
            if entry.link_count <= 1 or entry.inode_id not in linked:
                data_bytes += size
                if entry.link_count > 1:
                    linked.add(entry.inode_id)
        lines.append((fold(entry.path), "\t".join([
            entry.path, "d" if entry.is_directory else "f", str(size), f"{entry.attributes:x}",
            ",".join(sorted(entry.stream_names)), f"{entry.reparse_tag:x}",
        ])))
    digest = hashlib.sha256()
    for _, line in sorted(lines):
        digest.update(line.encode("utf-8") + b"\n")
    for name in sorted(hives):
        digest.update(f"hive\t{name}\t{hives[name].sha256}\n".encode())
    return files, data_bytes, "sha256:" + digest.hexdigest()


# --- output --------------------------------------------------------------------------------------------


def _write_wim(merged: Wim, index: int, name: str, work: Path, steps: _Steps) -> Path:
    out = work / f"{name}.wim"
    with steps.timed("write"), Wim.create("xpress") as output:
        merged.export_image(index, output, name)
        output.write(out, check_integrity=True, progress=steps.bytes_in(50, 90, "Writing the WIM"),
                     cancel=steps._cancel)
    steps.at(90, "Verifying the WIM")
    with steps.timed("verify"), Wim.open(out, check_integrity=True) as written:
        written.verify(progress=steps.bytes_in(90, 98, "Verifying the WIM"), cancel=steps._cancel)
    return out


def _needed_volume_bytes(entries: Sequence[DirEntry]) -> int:
    total = _NTFS_FIXED
    linked: set[int] = set()
    for entry in entries:
        total += 1024  # its MFT record
        if entry.is_directory or (entry.link_count > 1 and entry.inode_id in linked):
            continue
        linked.add(entry.inode_id)
        total += _rounded(entry.size)
    return total


def _rounded(size: int) -> int:
    """``size`` in whole 4 KiB clusters."""
    return -(-size // 4096) * 4096


def _write_disk(
    merged: Wim, index: int, fmt: str, disk_size: int, entries: Sequence[DirEntry], work: Path, steps: _Steps,
    stack: Sequence[StackLayer], manifests: Sequence[VersionManifest], repository: LayerRepository,
    job: _HiveJob | None, composites: CompositeStore | None = None, from_composite: bool = True,
) -> tuple[Path, str, dict[str, NewHive]]:
    """The merged image on a disk, the disk file's checksum (computed while it is written for
    VHD, VHDX and raw) and the new hive files. An OS layer imported from a gold disk gives the disk its
    layout, its other partitions byte for byte and its Windows boot code (:mod:`app.engine.gold`); any
    other OS layer gets a new GPT disk (ESP formatted but empty, MSR, Windows), keeping the disk and
    partition GUIDs an OS layer imported from a GPT disk recorded (Windows knows its boot disk by them).

    The hives are merged in a child process (:mod:`app.engine.publish_hives`, started with the publish) while
    the image is merged and applied, then overwrite the old files in place on the volume. A hive that cannot
    be used stops the publish at once, and its error is the one raised.

    With ``composites`` (a store on a file system that clones blocks, see :mod:`app.engine.composite`), the
    volume is the last composite of the same stack shape, taken from the store, when there is one, and only
    the paths that differ are changed (not when ``from_composite`` is false); the finished volume is kept for the
    next publish. A composite that cannot be changed is forgotten and :class:`_FullApplyNeeded` raised."""
    os_layer, os_manifest = stack[0], manifests[0]
    plan: gold.DiskPlan | None = None
    boot_contents: dict[int, Path] = {}
    vbr = b""
    if os_manifest.boot is not None:
        steps.at(46, "Reading the OS layer's boot partitions")
        with steps.timed("boot"):
            boot_folder = work / "boot"
            boot_folder.mkdir()
            _, boot_contents, vbr = repository.extract_boot(os_layer.layer_id, os_layer.version_id, boot_folder,
                                                            checksum=os_layer.checksum, cancel=steps._cancel)
            plan = os_manifest.boot.layout.plan(disk_size)
        data_start_lba, data_size = plan.windows.start // disk.SECTOR, plan.windows.size
        room = f"a disk of {disk_size / GiB:g} GB laid out like the OS layer's gold disk leaves {data_size // MiB} MiB"
    else:
        layout = disk.gpt_layout(disk_size)
        data_start_lba, data_size = layout.data_start_lba, layout.data_size
        room = f"a disk of {disk_size / GiB:g} GB leaves {data_size // MiB} MiB for it (after the ESP and the MSR)"
    def check_room(hives: Mapping[str, NewHive]) -> None:
        """The old hive files are in ``entries``; the new ones replace them."""
        old = job.found if job is not None else {}
        needed = _needed_volume_bytes(entries) + sum(
            _rounded(h.file.stat().st_size) - _rounded(old[name].size) for name, h in hives.items())
        if needed > data_size:
            raise ComposeError(f"The merged layers need about {-(-needed // MiB)} MiB on the Windows volume, but "
                               f"{room}; make the template's disk larger.")

    check_room({})
    volume = work / "windows.ntfs"
    if composites is not None and not clones_between(work, _nearest_existing(composites.root)):
        composites = None
    shape = _shape(stack, data_size, data_start_lba, plan is not None)
    base: Composite | None = None
    if composites is not None and from_composite:
        try:
            base = composites.take(shape, volume)
        except OSError as exc:
            if no_space(exc):
                raise _output_full(work) from exc
            log.warning("the last composite could not be taken (%s): applying every layer", exc)
    listed = signatures(entries) if composites is not None else {}
    overwritten = {fold(job.found[hive].path) for hive in job.changed} if job is not None else set()
    changes = _composite_changes(base, entries, listed, overwritten) if base is not None else None
    if base is not None and changes is None:  # not worth it: the store still has its clone
        volume.unlink()
        base = None
    steps.at(50, "Applying the merged image to the Windows volume")
    with steps.timed("apply"):
        try:
            if base is not None and changes is not None and composites is not None:
                try:
                    _change_composite(changes, merged, index, entries, volume, work, steps, composites)
                except _FullApplyNeeded:
                    composites.discard(shape)
                    raise
            else:
                make_ntfs_volume(volume, data_size, label="Windows", partition_start_sector=data_start_lba)
                merged.extract_image_to_ntfs_volume(index, volume, cancel=steps._cancel,
                                                    progress=steps.bytes_in(50, 78, "Applying the image"))
            hives = _new_hives(job, steps) if job is not None else {}
            check_room(hives)
            for hive in hives.values():  # in place: the hive files keep their ACLs and attributes
                overwrite_file_in_ntfs_volume(volume, hive.file, hive.image_path)
        except (WimError, EnvironmentProblem, OSError) as exc:
            if no_space(exc) and _nearly_full(work):  # the output folder's device, not the image's volume
                raise _output_full(work) from exc
            if isinstance(exc, OSError):
                raise
            if "space" in str(exc).lower():
                raise ComposeError(f"The merged layers do not fit on a disk of {disk_size / GiB:g} GB: {exc}") from exc
            raise
    steps.at(80, "Writing the disk image")
    out = work / f"disk.{EXTENSIONS[fmt]}"
    with steps.timed("disk"):
        if plan is not None:
            if not gold.graft_boot_code(volume, vbr):
                log.warning("the OS layer's stored Windows boot code is not an NTFS boot record; the volume keeps "
                            "the boot code mkntfs wrote")
            pieces = gold.write_pieces(plan, work, boot_contents, volume)
        else:
            identity = os_manifest.disk
            gpt = identity if identity is not None and identity.scheme == "gpt" else None
            prefix, suffix = work / "prefix.raw", work / "suffix.raw"
            disk.build_gpt_pieces(volume, prefix, suffix, disk_size=disk_size,
                                  disk_guid=gpt.disk_guid if gpt else None,
                                  partition_guids=gpt.partition_guids if gpt else None)
            pieces = [prefix, volume, suffix]
        # with composites, the volume stays: it is what the next publish of this shape starts from, and the
        # image is laid out around clones of its blocks (hashed from its pages, which are in memory)
        known = None if composites is None else base.known_blocks() if base is not None else Known()
        image_started = time.monotonic()
        try:
            checksum = disk.convert_hashed(pieces, out, fmt,  # type: ignore[arg-type]  # checked in compose()
                                           progress=steps.bytes_in(80, 98, "Writing the disk image"),
                                           cancel=steps._cancel, consume=volume if composites is None else None,
                                           keep=volume if composites is not None else None, known=known)
        except disk.DiskError as exc:
            if isinstance(exc.__cause__, OSError) and exc.__cause__.errno == errno.ENOSPC:
                raise _output_full(work) from exc
            raise
        finally:
            steps.timings["image"] = round(time.monotonic() - image_started, 3)
            if composites is not None:  # complete either way
                kept = dict(listed)
                for hive in hives.values():
                    path = fold(hive.image_path)
                    kept[path] = f"{listed.get(path, '')}+hive-{hive.sha256}"
                composites.adopt(shape, volume, kept, known)
                if known is not None:
                    steps.reused_bytes = known.reused * BLOCK
                    steps.timings["checksum"] = round(known.seconds, 3)
    return out, checksum, hives


#: Changes when what a composite holds for a stack changes meaning: kept composites of older engines are
#: then never used.
_COMPOSITE_FORMAT = 1


#: Free bytes below which a "no space" error during the apply is the output folder's device running out, not
#: the image's Windows volume: the volume is a sparse file there, and each of its writes needs room on it.
_NEARLY_FULL = 64 * MiB


def _nearly_full(work: Path) -> bool:
    try:
        return shutil.disk_usage(work).free < _NEARLY_FULL
    except OSError:
        return False


def _output_full(work: Path) -> ComposeError:
    return ComposeError(f"The disk image does not fit in {work.parent}: no space is left on its device (No space "
                        "left on device). Free some space there or publish to another folder.")


def _shape(stack: Sequence[StackLayer], data_size: int, data_start_lba: int, gold_disk: bool) -> str:
    """What a kept composite must share with a publish to be its starting point: the OS layer version, the
    layers in their order (any versions), the Windows volume's size and place."""
    described = json.dumps([_COMPOSITE_FORMAT, [stack[0].layer_id, stack[0].version_id, stack[0].checksum],
                            [layer.layer_id for layer in stack[1:]], data_size, data_start_lba, gold_disk])
    return hashlib.sha256(described.encode()).hexdigest()[:24]


def _nearest_existing(folder: Path) -> Path:
    """``folder`` or its nearest existing ancestor: on the file system ``folder`` will be created on, without
    creating it where it would stay empty."""
    while not folder.is_dir() and folder.parent != folder:
        folder = folder.parent
    return folder


#: A publish changes the last composite only while the paths to copy in hold at most this share of the merged
#: image's bytes, or fewer than :data:`_COMPOSITE_SMALL` bytes: each of their bytes is written twice (onto the
#: scratch volume, then into the clone), so beyond about half of them applying every layer is as fast and
#: needs no scratch volume; below a few hundred MiB either way takes a moment.
_COMPOSITE_SHARE = 0.5
_COMPOSITE_SMALL = 256 * MiB


def _composite_changes(base: Composite, entries: Sequence[DirEntry], listed: Mapping[str, str],
                       overwritten: Collection[str]) -> Changes | None:
    """What changes the composite ``base`` into the merged image (``entries``, their signatures ``listed``),
    or ``None`` when applying every layer is the better way. Hive files the registry merge overwrites
    afterwards count as unchanged when the composite holds the same file under its merged content."""
    new = dict(listed)
    for path in overwritten:
        previous = base.signatures.get(path, "")
        if previous.startswith(f"{new.get(path)}+hive-"):
            new[path] = previous
    try:
        changes = plan_changes(base.signatures, new)
    except ValueError as exc:
        log.info("the last composite cannot be changed into this image (%s): applying every layer", exc)
        return None
    copied = _needed_volume_bytes(entries_below(entries, changes.added)) - _NTFS_FIXED
    total = _needed_volume_bytes(entries) - _NTFS_FIXED
    if copied > _COMPOSITE_SHARE * total and copied >= _COMPOSITE_SMALL:
        log.info("the changed paths hold %d of the image's %d MiB: applying every layer rather than changing "
                 "the last composite", copied // MiB, total // MiB)
        return None
    return changes


def _change_composite(
    changes: Changes, merged: Wim, index: int, entries: Sequence[DirEntry], volume: Path,
    work: Path, steps: _Steps, composites: CompositeStore,
) -> None:
    """Change the composite taken from the store (now at ``volume``) into the merged image by
    ``changes`` (see :mod:`app.engine.composite`). Prunes the merged image."""
    log.info("re-publishing from the last composite: %d path(s) replaced (%d removed, %d added)",
             len(changes.replaced), len(changes.removed), len(changes.added))
    with steps.timed("composite"):
        try:
            kept = prune_to(merged, index, entries, changes.added)
            scratch = work / "changes.ntfs"
            # a power of two: the few sizes re-publishes need are formatted once and cloned afterwards
            size = 1 << max(26, (_needed_volume_bytes(kept) * 5 // 4 + 16 * MiB - 1).bit_length())
            composites.blank_volume(size, scratch, lambda path, size: make_ntfs_volume(path, size, label="Changes"))
            merged.extract_image_to_ntfs_volume(index, scratch, cancel=steps._cancel,
                                                progress=steps.bytes_in(50, 70, "Applying the changed layers"))
            steps.at(70, "Changing the last published volume")
            times = {entry.path.casefold(): entry.times for entry in entries if entry.is_directory}
            apply_changes(volume, scratch, changes, times, cancel=steps._cancel)
            scratch.unlink()
        except (OSError, NtfsVolumeError, WimError, EnvironmentProblem) as exc:
            if no_space(exc):  # a full apply would need more room still; the composite is fine
                raise
            raise _FullApplyNeeded(str(exc)) from exc


# --- the worker ----------------------------------------------------------------------------------------


def compose_worker(args: dict[str, Any], report: WorkerReport) -> dict[str, Any]:
    """Worker function (child process) of the publish task: :func:`compose` with ``args`` ``repository``,
    ``stack`` (:meth:`StackLayer.to_dict` forms), ``out_dir``, ``format``, ``size_gb``, ``name`` and optionally
    ``work_dir``. A
    SIGTERM (the task's cancel) stops it at the next progress point; nothing is left in ``out_dir`` and the
    process exits 143."""
    token = CancelToken()
    previous: Callable[[int, FrameType | None], Any] | int | None = None
    if hasattr(signal, "SIGTERM"):
        previous = signal.signal(signal.SIGTERM, lambda *_: token.cancel())
    try:
        result = compose(
            [StackLayer.from_dict(layer) for layer in args["stack"]], LayerRepository(Path(args["repository"])),
            Path(args["out_dir"]), str(args["format"]), float(args["size_gb"]), name=str(args["name"]),
            work_dir=Path(args["work_dir"]) if args.get("work_dir") else None,
            cache=LayerDiskCache(Path(args["cache_dir"]), int(args.get("cache_bytes", 0))) if args.get("cache_dir")
            else None,
            progress=lambda percent, message: report.progress(int(percent), message), cancel=token,
        )
    except TaskCanceled:
        report.log("Publish canceled; nothing was written.", "WARNING")
        sys.exit(143)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    report.log(f"Composited {result.files} files ({result.data_bytes} bytes) in {result.seconds:.1f} s, "
               f"{result.cache_hits} layer volume(s) from the layer disk cache, "
               f"{result.reused_bytes >> 20} MiB of the image's checksum from the last publish; "
               f"steps: {', '.join(f'{k} {v:.2f} s' for k, v in result.timings.items())}.")
    return {
        "summary": f"Published {result.path.name}: {result.size_bytes} bytes, {len(result.conflicts)} conflict(s).",
        "path": str(result.path),
        "format": result.format,
        "size_bytes": result.size_bytes,
        "checksum": result.checksum,
        "files": result.files,
        "data_bytes": result.data_bytes,
        "manifest_digest": result.manifest_digest,
        "conflicts": [c.to_dict() for c in result.conflicts],
        "seconds": result.seconds,
        "timings": result.timings,
    }
