"""The layer disk cache: ready-to-merge NTFS volumes of app and platform layer versions.

Merging a layer into an image needs it as an NTFS volume (wimlib captures it from there with its ACLs,
streams and short names); unpacking it from the repository's WIM every publish costs seconds per layer.
The cache keeps those volumes between publishes, as App Layering's layer disk cache does:

* one sparse volume file per layer version, named ``<layer>-<version>-<checksum>.ntfs`` after the
  version's manifest checksum, so a version re-imported under the same id never matches a stale entry;
* a volume enters the cache only complete (staged under a temporary name, then renamed);
* the cache is bounded (``max_bytes`` of allocated blocks, the ``layer_cache_gb`` setting): after each
  stage, the least recently used volumes are removed until the rest fit, never one the current publish
  uses. Using a volume marks it used (its modification time);
* a volume in use by another publish may be evicted: on POSIX systems the open file lives on until that
  publish is done with it;
* the composites publishes keep in ``composites/`` (:mod:`app.engine.composite`) count toward the bound
  too, each used when a publish starts from it, and are evicted alike (their blocks are shared with the
  images made of them while those exist: counted whole, the bound errs on the safe side);
* so do the OS layer versions' hive files a publish extracted for its registry merge
  (``hives-<layer>-<version>-<checksum>/``, :mod:`app.engine.publish_hives`), used when a publish reads
  them.

``max_bytes`` of 0 disables the cache: volumes are then staged in the publish's work folder only.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

from app.engine.composite import CompositeStore
from app.engine.repository import LayerRepository, VersionManifest
from app.engine.wim import make_ntfs_volume
from app.errors import EnvironmentProblem
from app.files import no_space
from app.procs import Cancellable

log = logging.getLogger(__name__)

__all__ = ["CachedVolume", "LayerDiskCache", "staging_size"]

MiB = 1024 * 1024
#: Per file in the size estimate of an NTFS volume: its MFT record and the rounding to whole clusters.
_NTFS_PER_FILE = 1024 + 4096
_NTFS_FIXED = 32 * MiB  # $MFT zone start, $LogFile, bitmaps of a small volume
_ENTRY = re.compile(r"(\d+)-(\d+)-([0-9a-f]{16})\.ntfs")
_COMPOSITE = re.compile(r"([0-9a-f]{24})\.[0-9a-f]{12}\.ntfs")
_HIVES = re.compile(r"hives-(\d+)-(\d+)-([0-9a-f]{16})")
COMPOSITES = "composites"  # the folder of the composite store, inside the cache

ProgressFn = Callable[[int, int], None]


def staging_size(manifest: VersionManifest) -> int:
    """The size of an NTFS volume that holds the version's files, with room for NTFS's own structures."""
    estimate = manifest.data_bytes + manifest.data_bytes // 8 + manifest.files * 2 * _NTFS_PER_FILE + 2 * _NTFS_FIXED
    return -(-estimate // MiB) * MiB


@dataclass(frozen=True)
class CachedVolume:
    path: Path
    #: Whether it came from the cache (``False``: staged just now).
    hit: bool


class LayerDiskCache:
    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = Path(root)
        self.max_bytes = max(0, int(max_bytes))

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def _name(self, layer_id: int, version_id: int, checksum: str) -> str:
        digest = checksum.removeprefix("sha256:")[:16]
        return f"{layer_id}-{version_id}-{digest}.ntfs"

    def volume(
        self, repository: LayerRepository, layer_id: int, version_id: int, checksum: str | None, *,
        label: str, scratch: Path, keep: Collection[str] = (), progress: ProgressFn | None = None,
        cancel: Cancellable | None = None,
    ) -> CachedVolume:
        """The version's volume: from the cache when there, else staged from the repository (into the cache,
        or into ``scratch`` when the cache is disabled or the volume alone is larger than the cache).
        ``keep``: names of entries the caller is using, never evicted now."""
        manifest = repository.manifest(layer_id, version_id, checksum)
        name = self._name(layer_id, version_id, manifest.checksum)
        cached = self.root / name
        if self.enabled and cached.is_file():
            os.utime(cached)  # most recently used
            log.info("Layer %s from the layer disk cache (%s).", label, name)
            return CachedVolume(cached, True)
        size = staging_size(manifest)
        # what the sparse volume will occupy: its data and its files' MFT records, not its apparent size
        into_cache = self.enabled and manifest.data_bytes + manifest.files * _NTFS_PER_FILE <= self.max_bytes
        folder = self.root if into_cache else scratch
        folder.mkdir(parents=True, exist_ok=True)
        staging = folder / f".{name}.{secrets.token_hex(4)}.partial"
        try:
            make_ntfs_volume(staging, size, label=label[:32])
            repository.extract_version_to_ntfs_volume(layer_id, version_id, staging, checksum=checksum,
                                                      progress=progress, cancel=cancel)
            target = cached if into_cache else scratch / name
            staging.replace(target)
        except BaseException as exc:
            staging.unlink(missing_ok=True)
            if no_space(exc):
                where = "the layer disk cache in" if into_cache else "the publish's work folder in"
                raise EnvironmentProblem(
                    f"Layer {label} could not be unpacked into {where} {folder}: no space is left on its device. "
                    "Free some space there and publish again.") from exc
            raise
        if into_cache:
            self.evict(keep={*keep, name})
        return CachedVolume(target, False)

    def entries(self) -> list[tuple[Path, int, float]]:
        """``(path, allocated bytes, last used)`` of every complete entry, composites included, least
        recently used first."""
        if not self.root.is_dir():
            return []
        found = []
        composites = self.root / COMPOSITES
        listed = [path for path in self.root.iterdir() if _ENTRY.fullmatch(path.name) or _HIVES.fullmatch(path.name)]
        if composites.is_dir():
            listed += [path for path in composites.iterdir() if _COMPOSITE.fullmatch(path.name)]
        for path in listed:
            try:
                stat = path.stat()
                used, size = stat.st_mtime, stat.st_blocks * 512
                if path.parent == composites:  # used when its listing was last taken or written
                    used = (composites / f"{path.name.split('.')[0]}.json").stat().st_mtime
                elif _HIVES.fullmatch(path.name):  # a folder of hive files
                    size = sum(file.stat().st_blocks * 512 for file in path.rglob("*") if file.is_file())
            except FileNotFoundError:  # evicted by another publish meanwhile
                continue
            found.append((path, size, used))
        return sorted(found, key=lambda e: e[2])

    def evict(self, keep: Collection[str] = ()) -> list[str]:
        """Remove least recently used entries until the cache fits in ``max_bytes``; returns their names.
        An entry that cannot be removed now (another publish has it open, where open files cannot be
        removed) is left for a later eviction. Staging leftovers older than a day (a killed publish) go too."""
        removed = []
        entries = self.entries()
        total = sum(size for _, size, _ in entries)
        for path, size, _ in entries:
            if total <= self.max_bytes:
                break
            if path.name in keep:
                continue
            try:
                if path.parent.name == COMPOSITES:
                    CompositeStore(path.parent).discard(path.name.split(".")[0])
                elif path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
            except FileNotFoundError:
                pass  # evicted by another publish meanwhile
            except OSError as exc:
                log.warning("layer disk cache: %s could not be evicted now (%s)", path.name, exc)
                continue
            removed.append(path.name)
            total -= size
            log.info("layer disk cache: evicted %s (%d MiB)", path.name, size // MiB)
        if self.root.is_dir():
            for path in self.root.glob(".*.partial"):
                try:
                    if time.time() - path.stat().st_mtime > 86400:
                        shutil.rmtree(path) if path.is_dir() else path.unlink()
                except FileNotFoundError:
                    pass
        return removed

    def discard(self, names: Collection[str]) -> None:
        """Remove these entries (volumes found not to hold what their layer versions hold): the next use
        stages them afresh."""
        for name in names:
            if _ENTRY.fullmatch(name):
                (self.root / name).unlink(missing_ok=True)
                log.warning("layer disk cache: removed %s, which no longer matches its layer version", name)

    def name_for(self, layer_id: int, version_id: int, checksum: str) -> str:
        return self._name(layer_id, version_id, checksum)

    def hives_folder(self, layer_id: int, version_id: int, checksum: str) -> Path | None:
        """Where the OS layer version's hive files are kept once a publish extracted them (see
        :mod:`app.engine.publish_hives`); ``None`` when the cache is disabled."""
        if not self.enabled:
            return None
        return self.root / f"hives-{self._name(layer_id, version_id, checksum).removesuffix('.ntfs')}"

    def holds(self, layer_id: int, version_id: int, checksum: str) -> bool:
        """Whether the cache has the version's volume (``checksum``: its manifest's)."""
        return self.enabled and (self.root / self._name(layer_id, version_id, checksum)).is_file()
