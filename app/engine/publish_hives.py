"""The registry half of a publish, merged in a child process of its own.

A publish rewrites each OS hive some layer's registry delta changes (and reads SYSTEM for its current control
set): every delta applied in stack order, written as a new hive file (:mod:`app.engine.registry.patch`).
Reading, patching and writing a real SOFTWARE hive is about a second of Python. In a thread it would share
the interpreter with the rest of the publish, which is Python too (listing the merged image, planning the
changes to the last composite, the conflict report), and stretch both; in a child process it takes the
machine's other core. It needs nothing from the merged image, so it starts with the publish
(:meth:`PendingHives.start`) and reads the hives from the OS layer's image in the repository.

That is right as long as the merged image holds the OS layer's hive files and transaction logs: no layer
replaced or removed one. The publish checks it after merging (:func:`same_entries`); where a layer did, the
merged image's hives are extracted and the child rewrites those instead (``found``).

The worker (:func:`hive_worker`, run by :func:`app.tasks.worker.call_worker`) returns the new hive files'
places; a hive that cannot be used is a :class:`HiveMergeError` (a user error: its message names the OS layer,
the hive and what is wrong).
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.engine.layer_cache import LayerDiskCache
from app.engine.registry.delta import CreateKey, DeleteKey, DeleteValue, HiveName, Operation, RegistryDelta, SetValue
from app.engine.registry.model import Hive, ValueType, fold
from app.engine.registry.patch import open_hive
from app.engine.registry.regf import HiveError
from app.engine.repository import LayerRepository, VersionManifest
from app.engine.wim import DirEntry, Wim, WimError
from app.errors import EnvironmentProblem, UserError
from app.procs import Cancellable
from app.tasks.base import TaskCanceled
from app.tasks.worker import WorkerFailed, WorkerReport, call_worker

log = logging.getLogger(__name__)

#: Where each hive a delta may change lives in the image.
HIVE_FILES: Mapping[HiveName, str] = {
    HiveName.SOFTWARE: "/Windows/System32/config/SOFTWARE",
    HiveName.SYSTEM: "/Windows/System32/config/SYSTEM",
    HiveName.DEFAULT: "/Windows/System32/config/DEFAULT",
    HiveName.DRIVERS: "/Windows/System32/config/DRIVERS",
    HiveName.NTUSER: "/Users/Default/NTUSER.DAT",
}
_IMPORT_CONTROL_SET = "ControlSet001"  # what .reg imports map CurrentControlSet to


class HiveMergeError(UserError):
    """An OS hive cannot be used (damaged, dirty without usable logs, no current control set)."""

    code = "compose"


def find_entry(image: Wim, index: int, path: str) -> DirEntry | None:
    """The entry at ``path`` (found case-insensitively), or ``None`` when it is not in the image."""
    try:
        entries = image.iterate_dir_tree(index, path)
    except WimError as exc:
        if exc.wimlib_code == 49:  # PATH_DOES_NOT_EXIST
            return None
        raise
    return next(iter(entries), None)


def changed_hives(manifests: Sequence[VersionManifest]) -> list[str]:
    """The hives some layer's registry delta changes, sorted."""
    return sorted({hive for manifest in manifests for hive in manifest.registry.hives})


@dataclass(frozen=True)
class HiveEntries:
    """An image's hive files a publish reads: by hive name, the changed ones and SYSTEM (when the image has
    them as files), and their transaction logs."""

    hives: Mapping[str, DirEntry]
    logs: Sequence[DirEntry]

    @classmethod
    def of(cls, image: Wim, index: int, changed: Sequence[str]) -> HiveEntries:
        hives: dict[str, DirEntry] = {}
        for hive in [*changed, *([] if HiveName.SYSTEM.value in changed else [HiveName.SYSTEM.value])]:
            entry = find_entry(image, index, HIVE_FILES[HiveName(hive)])
            if entry is not None and not entry.is_directory:
                hives[hive] = entry
        logs = []
        for entry in hives.values():
            for suffix in (".LOG1", ".LOG2"):
                found = find_entry(image, index, entry.path + suffix)
                if found is not None and not found.is_directory:
                    logs.append(found)
        return cls(hives, logs)

    def paths(self) -> list[str]:
        return [entry.path for entry in (*self.hives.values(), *self.logs)]

    def to_json(self) -> dict[str, Any]:
        """``hives`` (name → image path), ``logs`` (image paths) and ``sha1`` (image path → SHA-1 of the
        file's data, hex; empty when an entry's is not known)."""
        entries = [*self.hives.values(), *self.logs]
        known = all(entry.stream_hashes and entry.stream_hashes[0] is not None for entry in entries)
        return {
            "hives": {name: entry.path for name, entry in self.hives.items()},
            "logs": [entry.path for entry in self.logs],
            "sha1": {entry.path: entry.stream_hashes[0].hex() for entry in entries  # type: ignore[union-attr]
                     } if known else {},
        }


def same_entries(one: HiveEntries, other: HiveEntries) -> bool:
    """Whether both name the same files with the same data (SHA-1s known and equal)."""
    def key(entry: DirEntry) -> tuple[str, tuple[bytes | None, ...]]:
        return fold(entry.path), entry.stream_hashes

    if any(None in entry.stream_hashes for entry in (*one.hives.values(), *one.logs, *other.hives.values(),
                                                        *other.logs)):
        return False
    return ({name: key(e) for name, e in one.hives.items()} == {name: key(e) for name, e in other.hives.items()}
            and sorted(map(key, one.logs)) == sorted(map(key, other.logs)))


@dataclass(frozen=True)
class NewHive:
    """A hive file the registry merge wrote: where it goes in the image, the local file, its SHA-256."""

    image_path: str
    file: Path
    sha256: str


# --- the merge (in the child) ------------------------------------------------------------------------


def current_control_set(system: Hive) -> str:
    select = system.find("Select")
    value = select.value("Current") if select is not None else None
    if value is None or value.type != ValueType.DWORD or len(value.data) < 4:
        raise HiveMergeError("The OS layer's SYSTEM hive has no Select\\Current value (REG_DWORD), so its current "
                             "control set is unknown.")
    number = int.from_bytes(value.data[:4], "little")
    if not 1 <= number <= 999:
        raise HiveMergeError(f"The OS layer's SYSTEM hive names control set {number} as current.")
    return f"ControlSet{number:03d}"


def retarget(delta: RegistryDelta, control_set: str) -> RegistryDelta:
    """``delta`` with SYSTEM keys under ``ControlSet001`` (what ``CurrentControlSet`` was imported as) moved
    to ``control_set``."""
    if fold(control_set) == fold(_IMPORT_CONTROL_SET):
        return delta

    def moved(op: Operation) -> Operation:
        head, _, rest = op.key.partition("\\")
        if op.hive != HiveName.SYSTEM or fold(head) != fold(_IMPORT_CONTROL_SET):
            return op
        key = f"{control_set}\\{rest}" if rest else control_set
        if isinstance(op, SetValue):
            return SetValue(op.hive, key, op.name, op.type, op.data)
        if isinstance(op, DeleteValue):
            return DeleteValue(op.hive, key, op.name)
        if isinstance(op, DeleteKey):
            return DeleteKey(op.hive, key)
        return CreateKey(op.hive, key)

    return RegistryDelta(moved(op) for op in delta)


def windows_path(image_path: str) -> str:
    """An image path (``/Program Files/x``) as Windows writes it (``Program Files\\x``)."""
    return image_path.strip("/").replace("/", "\\")


def rewrite_hives(found: Mapping[str, str], source: Path, target: Path, os_name: str,
                  manifests: Sequence[VersionManifest], captured: Sequence[int]) -> dict[str, NewHive]:
    """Open the hives extracted into ``source`` (``found``: hive name → image path), apply every layer's delta
    in stack order and write the changed hives into ``target``: each patched where the deltas change it,
    everything else kept as it is. ``captured``: when each layer version was captured (FILETIMEs; 0: not
    known)."""
    files = {hive: source / path.lstrip("/") for hive, path in found.items()}
    try:
        hives = {hive: open_hive(file) for hive, file in files.items()}
        control_set = current_control_set(hives[HiveName.SYSTEM]) if HiveName.SYSTEM in hives else None
        for manifest, when in zip(manifests, captured, strict=True):
            delta = manifest.registry
            if control_set is not None:
                delta = retarget(delta, control_set)
            # the keys a layer changes carry the time its version was captured, so the same layers always give
            # the same hives (a .reg file carries no times of its own)
            delta.apply(hives, written=when or None)
        written: dict[str, NewHive] = {}
        for hive in changed_hives(manifests):
            file = target / hive
            written[hive] = NewHive(found[hive], file, hives[hive].write(file))
    except HiveError as exc:
        # the hive's messages start with its file's name (opening it, or reading a key the deltas reach)
        message = str(exc)
        damaged = next((h for h, file in files.items() if message.startswith(f"{file}: ")), None)
        if damaged is None:
            raise
        raise HiveMergeError(
            f"The OS layer {os_name}'s {damaged} hive ({windows_path(found[damaged])}) cannot be "
            f"used: {message.removeprefix(f'{files[damaged]}: ')}. Import the OS layer again from a machine that was "
            "shut down cleanly."
        ) from None
    return written


def hive_worker(args: dict[str, Any], report: WorkerReport) -> dict[str, Any]:
    """Worker function (child process): the registry merge of a publish. ``args``: ``repository``, ``layers``
    (the stack, bottom first: each ``name``, ``layer_id``, ``version_id``, ``checksum``), ``folder`` (made
    here; the new hives are written into ``folder/out``) and either

    * ``found`` (hive name → image path): the hives were extracted into ``folder/in``; or
    * ``expected`` (:meth:`HiveEntries.to_json` of the OS layer's image): the OS layer's hive files, taken from
      ``cache`` (the layer disk cache's folder for them, :meth:`LayerDiskCache.hives_folder`) when it holds
      them with the expected SHA-1s, else extracted from the OS layer's image in the repository (into
      ``cache``, whose ``cache_bytes`` bound is then kept, never evicting the entries named in ``keep``; or
      into ``folder/in``).

    Returns ``written`` (hive name → ``image_path``, ``file``, ``sha256``), empty with ``missing`` when the
    OS image lacks a hive some delta changes (the publish then decides)."""
    started = time.monotonic()
    repository = LayerRepository(Path(args["repository"]))
    layers = list(args["layers"])
    manifests = [repository.manifest(int(layer["layer_id"]), int(layer["version_id"]), layer.get("checksum"))
                 for layer in layers]
    folder = Path(args["folder"])
    source, target = folder / "in", folder / "out"
    captured = []
    for layer, manifest in zip(layers, manifests, strict=True):
        with Wim.open(repository.wim_path(int(layer["layer_id"]))) as image:
            index = image.find_image(manifest.image)
            if index is None:
                raise HiveMergeError(f"The repository's WIM of layer {layer['name']} has no image {manifest.image}.")
            captured.append(image.image_created(index))
    found: dict[str, str] | None = args.get("found")
    if found is None:
        expected = args["expected"]
        found = {str(hive): str(path) for hive, path in expected["hives"].items()}
        missing = [hive for hive in changed_hives(manifests) if hive not in found]
        if missing:
            return {"written": {}, "missing": missing}
        source = _os_hive_files(repository, int(layers[0]["layer_id"]), manifests[0].image, expected, source,
                                Path(args["cache"]) if args.get("cache") else None, int(args.get("cache_bytes", 0)),
                                [str(name) for name in args.get("keep", [])])
    target.mkdir(parents=True, exist_ok=True)
    try:
        written = rewrite_hives(found, source, target, str(layers[0]["name"]), manifests, captured)
    except (OSError, HiveError, HiveMergeError) as exc:
        if source == folder / "in" or _holds(source, args["expected"]["sha1"]):
            raise  # the hive itself
        # another publish evicted or replaced the kept files between their check and their use
        log.warning("the OS layer's hive files in the layer disk cache went away (%s); reading them from its image",
                    exc)
        source = _os_hive_files(repository, int(layers[0]["layer_id"]), manifests[0].image, args["expected"],
                                folder / "in", None, 0, [])
        written = rewrite_hives(found, source, target, str(layers[0]["name"]), manifests, captured)
    return {
        "written": {hive: {"image_path": new.image_path, "file": str(new.file), "sha256": new.sha256}
                    for hive, new in written.items()},
        "seconds": round(time.monotonic() - started, 3),
    }


def _holds(folder: Path, sha1: Mapping[str, str]) -> bool:
    """Whether ``folder`` has every file of ``sha1`` (image path → SHA-1, hex; zeros: empty) with that SHA-1."""
    for path, expected in sha1.items():
        try:
            data = (folder / path.lstrip("/")).read_bytes()
        except OSError:
            return False
        if (hashlib.sha1(data).hexdigest() if data else "0" * 40) != expected:  # noqa: S324 - WIM's own hash
            return False
    return True


def _keep_bound(kept: Path, cache_bytes: int, keep: Sequence[str]) -> None:
    """Bring the layer disk cache ``kept`` went into back within ``cache_bytes``, never evicting ``kept`` or the
    entries named in ``keep``. The hive files are kept either way: a cache that cannot shrink now does on
    the next publish."""
    try:
        LayerDiskCache(kept.parent, cache_bytes).evict(keep={kept.name, *keep})
    except OSError as exc:
        log.warning("the layer disk cache could not be brought within its bound (%s)", exc)


def _os_hive_files(repository: LayerRepository, layer_id: int, image_name: str, expected: Mapping[str, Any],
                   scratch: Path, cache: Path | None, cache_bytes: int, keep: Sequence[str]) -> Path:
    """The folder holding the OS layer's hive files and logs of ``expected`` at their image paths: ``cache``
    when it holds them all, as their SHA-1s say; else they are extracted from the OS layer's image into a
    new ``cache`` (complete or not at all), or into ``scratch`` when there is no cache or it cannot be
    written."""
    sha1 = {str(path): str(digest) for path, digest in expected["sha1"].items()}
    if cache is not None and sha1 and _holds(cache, sha1):
        os.utime(cache)  # most recently used
        log.info("The OS layer's hive files from the layer disk cache (%s).", cache.name)
        return cache
    with Wim.open(repository.wim_path(layer_id)) as image:
        index = image.find_image(image_name)
        assert index is not None  # checked by the caller
        if cache is not None and sha1:
            partial = cache.parent / f".{cache.name}.{secrets.token_hex(4)}.partial"
            try:
                partial.mkdir(parents=True)
                image.extract_paths_to_folder(index, list(sha1), partial)
                if _holds(partial, sha1):
                    log.info("The OS layer's hive files kept in the layer disk cache (%s).", cache.name)
                    stale = cache.parent / f".{cache.name}.{secrets.token_hex(4)}.stale.partial"
                    if cache.exists():
                        cache.rename(stale)
                    partial.rename(cache)
                    shutil.rmtree(stale, ignore_errors=True)
                    _keep_bound(cache, cache_bytes, keep)
                    return cache
                log.warning("the OS layer's hive files did not match their SHA-1s once extracted; not kept")
            except OSError as exc:
                log.warning("the OS layer's hive files could not be kept in the layer disk cache (%s)", exc)
            finally:
                shutil.rmtree(partial, ignore_errors=True)
        scratch.mkdir(parents=True, exist_ok=True)
        image.extract_paths_to_folder(index, list(sha1) or [*expected["hives"].values(), *expected["logs"]], scratch)
    return scratch


# --- the publish's side ------------------------------------------------------------------------------


class PendingHives:
    """A registry merge running in a child process for a publish (:meth:`start`). :meth:`result` waits for
    its new hive files; :meth:`stop` ends it early. Once the publish knows it needs this merge's hives, it
    :meth:`watch`es it: a failure (now or later) is handed to the watcher at once, so the publish stops what
    it is doing; :meth:`result` raises it too. (A merge started from the OS layer's hives fails harmlessly
    when a layer turns out to replace the damaged hive.)"""

    def __init__(self, args: dict[str, Any], cancel: Cancellable | None) -> None:
        self._args = args
        self._cancel = cancel
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._watcher: Callable[[BaseException], None] | None = None
        self._ended = False
        self._outcome: dict[str, Any] = {}
        self._error: BaseException | None = None
        self.seconds = 0.0
        self._thread = threading.Thread(target=self._run, name="hives", daemon=True)

    @classmethod
    def start(cls, repository: LayerRepository, layers: Sequence[Mapping[str, Any]], folder: Path,
              cancel: Cancellable | None, *, found: Mapping[str, str] | None = None,
              expected: HiveEntries | None = None, cache: Path | None = None, cache_bytes: int = 0,
              keep: Sequence[str] = ()) -> PendingHives:
        """Start merging the registry of ``layers`` (see :func:`hive_worker`) in ``folder``: from the hives
        ``found`` in ``folder/in``, or from the OS layer's hive files ``expected`` (kept in ``cache``)."""
        args: dict[str, Any] = {"repository": str(repository.root), "layers": [dict(layer) for layer in layers],
                                "folder": str(folder)}
        if found is not None:
            args["found"] = dict(found)
        elif expected is not None:
            args.update(expected=expected.to_json(), cache=str(cache) if cache is not None else None,
                        cache_bytes=cache_bytes, keep=list(keep))
        else:
            raise ValueError("a registry merge starts from the hives found or from those expected")
        pending = cls(args, cancel)
        pending._thread.start()
        return pending

    @property
    def cancelled(self) -> bool:
        return self._stopped.is_set() or (self._cancel is not None and self._cancel.cancelled)

    def _run(self) -> None:
        started = time.monotonic()
        error: BaseException | None = None
        try:
            self._outcome = call_worker("app.engine.publish_hives:hive_worker", self._args, self,
                                        log=lambda text, level: log.log(logging.getLevelName(level), "%s", text))
        except TaskCanceled as exc:
            error = exc
        except UserError as exc:
            error = HiveMergeError(str(exc))
        except WorkerFailed as exc:
            error = EnvironmentProblem(f"The registry merge's process failed: {exc}")
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits for the result
            error = exc
        with self._lock:
            self.seconds = round(time.monotonic() - started, 3)
            self._error, self._ended = error, True
            watcher = self._watcher
        if watcher is not None and self.failure is not None:
            watcher(self.failure)

    def watch(self, on_failure: Callable[[BaseException], None]) -> None:
        """Hand this merge's failure to ``on_failure``: at once when it has failed already, else as it fails."""
        with self._lock:
            self._watcher = on_failure
            failed = self.failure
        if failed is not None:
            on_failure(failed)

    @property
    def failure(self) -> BaseException | None:
        """The error it ended with, once it failed (not when stopped or cancelled)."""
        if not self._ended or isinstance(self._error, TaskCanceled):
            return None
        return self._error

    def result(self) -> dict[str, NewHive]:
        """Waits; the new hive files by hive name, or the merge's error."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return {hive: NewHive(str(new["image_path"]), Path(str(new["file"])), str(new["sha256"]))
                for hive, new in self._outcome["written"].items()}

    def stop(self) -> None:
        """End the child process if it still runs, and wait for it."""
        self._stopped.set()
        self._thread.join()
