"""Re-publishing by changing the last composite instead of applying every layer again.

A publish applies the merged layers onto a fresh Windows volume. After one app layer changed, a full apply
writes every unchanged layer again (the OS layer alone is most of the bytes). When the output folder and the
layer disk cache sit on one file system that clones blocks (XFS with reflink, btrfs: ``FICLONE``), a publish
keeps its finished Windows volume, with a signature of every path the merged image held, in a
:class:`CompositeStore`. A later publish of a stack of the same shape (the same OS layer version, the same
layers in the same order, the same volume) takes that volume out of the store (leaving a clone behind, see
:meth:`CompositeStore.take`) and changes only what differs:

1. :func:`plan_changes` compares the two merged images path by path (data hashes, streams, attributes,
   security descriptor, short name, reparse tag, times, hard link siblings). A path whose entry differs, or
   that only one side has, is replaced whole, with everything below it.
2. :func:`prune_to` removes everything else from the new merged image, and wimlib applies what is left onto
   a small scratch volume: the replaced paths carry exactly what a full apply would have written.
3. :func:`apply_changes` deletes the replaced paths from the volume, copies them in from the scratch volume
   (:mod:`app.engine.ntfs_volume`) and gives the directories they were in their times back.

The hives are then overwritten in place as after a full apply. The disk image is laid out in a new file
around clones of the finished volume's blocks (:func:`app.engine.in_place.assemble` with ``into``), and the
volume goes back into the store. The image's checksum (:mod:`app.engine.checksum`) is made of 4 MiB block
digests: the store keeps those of the volume's blocks, and a block of the volume that provably did not
change (it still shares its physical blocks with the clone left in the store, :mod:`app.engine.extents`)
is not read again. The blocks that changed are read from the volume, whose pages are still in memory (a
clone's page cache starts empty). On a file system without block cloning nothing is kept (copying
the volume would cost every publish more than it saves a re-publish).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import secrets
import sys
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.engine.checksum import Known
from app.engine.extents import SameRanges, same_ranges
from app.engine.ntfs_volume import NtfsVolume
from app.engine.wim import DeleteCommand, DirEntry, Wim
from app.files import fsync_dir
from app.procs import Cancellable
from app.tasks.base import TaskCanceled

log = logging.getLogger(__name__)

__all__ = ["Changes", "CompositeStore", "apply_changes", "clone_file", "entries_below", "plan_changes", "prune_to",
           "signatures"]

_FICLONE = 0x40049409
_BLANKS = 3  # empty NTFS volumes kept to clone (see CompositeStore.blank_volume), one per size


def clone_file(source: Path, target: Path) -> None:
    """``target`` (new) made to share ``source``'s blocks (``FICLONE``); :class:`OSError` where the file
    system cannot."""
    if not sys.platform.startswith("linux"):
        raise OSError(errno.EOPNOTSUPP, "block cloning is only used on Linux")
    import fcntl  # Unix only: this module is imported on Windows too

    with source.open("rb") as src:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            fcntl.ioctl(fd, _FICLONE, src.fileno())
        except OSError:
            os.close(fd)
            target.unlink(missing_ok=True)
            raise
        os.close(fd)


def clones_between(first: Path, second: Path) -> bool:
    """Whether files in folder ``first`` can be cloned into folder ``second``, tried on a one-block scratch
    file each time (a device number may name another file system after a remount: not worth caching)."""
    token = secrets.token_hex(4)  # publishes probe at once, in threads of one process too
    probe, copy = first / f".clone-probe-{token}", second / f".clone-probe-{token}.copy"
    try:
        probe.write_bytes(b"\0" * 4096)
        clone_file(probe, copy)
    except OSError as exc:
        log.info("no block cloning between %s and %s (%s): publishes apply every layer", first, second,
                 os.strerror(exc.errno or errno.EOPNOTSUPP))
        return False
    finally:
        probe.unlink(missing_ok=True)
        copy.unlink(missing_ok=True)
    return True


def signatures(entries: Sequence[DirEntry]) -> dict[str, str]:
    """Each path of a merged image's listing (case-folded) -> a digest of everything a full apply writes for
    it: the spelling of its name, its data and streams' hashes, attributes, security descriptor, short name,
    reparse tag, times and the paths of its hard links."""
    siblings: dict[int, list[str]] = {}
    for entry in entries:
        if entry.link_count > 1 and not entry.is_directory:
            siblings.setdefault(entry.inode_id, []).append(entry.path.casefold())
    found: dict[str, str] = {}
    for entry in entries:
        links = sorted(siblings.get(entry.inode_id, ())) if entry.link_count > 1 and not entry.is_directory else []
        described = repr((
            entry.path.rsplit("/", 1)[-1], entry.is_directory, entry.size, entry.attributes,
            entry.security_descriptor, entry.stream_names, entry.short_name, entry.reparse_tag,
            entry.stream_hashes, entry.times, links,
        ))
        found[entry.path.casefold()] = hashlib.sha256(described.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return found


@dataclass(frozen=True)
class Changes:
    """What turns the last composite's volume into the new one (paths case-folded, ``/``-separated)."""

    #: Paths replaced whole, with everything below them (top-most only).
    replaced: tuple[str, ...]
    #: Of those, the ones the old volume holds (to delete) and the new image holds (to copy in).
    removed: tuple[str, ...]
    added: tuple[str, ...]
    #: Directories in both whose entries changed: their times are set back afterwards.
    parents: tuple[str, ...]


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] or "/"


def plan_changes(old: Mapping[str, str], new: Mapping[str, str]) -> Changes:
    """The paths whose signature differs between ``old`` and ``new`` (see :func:`signatures`), reduced to the
    top-most ones (a replaced directory takes everything below it along)."""
    differing = sorted(path for path in old.keys() | new.keys() if old.get(path) != new.get(path))
    replaced: list[str] = []
    taken: set[str] = set()
    for path in differing:
        if path == "/":  # the root itself cannot be replaced: its new metadata needs a full apply
            raise ValueError("the volume's root directory differs")
        if not any(ancestor in taken for ancestor in _ancestors(path)):
            replaced.append(path)
            taken.add(path)
    parents = sorted({_parent(path) for path in replaced})
    return Changes(
        replaced=tuple(replaced), removed=tuple(p for p in replaced if p in old),
        added=tuple(p for p in replaced if p in new), parents=tuple(parents),
    )


def entries_below(entries: Sequence[DirEntry], paths: Iterable[str]) -> list[DirEntry]:
    """The entries at or below any of ``paths`` (case-folded)."""
    tops = set(paths)
    return [entry for entry in entries if _within(entry.path.casefold(), tops)]


def _within(path: str, tops: Collection[str]) -> bool:
    """Whether ``path`` is one of ``tops`` or below one of them."""
    return path in tops or any(ancestor in tops for ancestor in _ancestors(path))


def prune_to(merged: Wim, index: int, entries: Sequence[DirEntry], keep: Iterable[str]) -> list[DirEntry]:
    """Delete from image ``index`` everything but the paths ``keep`` (case-folded), what is below them and the
    directories above them; the entries left."""
    kept = set(keep)
    above = {"/"} | {ancestor for path in kept for ancestor in _ancestors(path)}
    commands: list[DeleteCommand] = []
    left: list[DirEntry] = []
    for entry in entries:
        path = entry.path.casefold()
        if path == "/" or path in above:
            left.append(entry)
            continue
        if _within(path, kept):
            left.append(entry)
        elif _parent(path) in above:  # the top-most path of a tree that goes
            commands.append(DeleteCommand(entry.path, recursive=True))
    if commands:
        merged.update_image(index, commands)
    return left


def _ancestors(path: str) -> list[str]:
    found = []
    while path not in {"/", ""}:
        path = _parent(path)
        found.append(path)
    return found


def apply_changes(volume: Path, scratch: Path, changes: Changes, times: Mapping[str, tuple[int, int, int]], *,
                  cancel: Cancellable | None = None) -> None:
    """Change the clone ``volume`` as ``changes`` says, copying the new paths from the ``scratch`` volume
    (which holds them, and the directories above them, as wimlib applied them); ``times``: each directory in
    ``changes.parents`` -> its times in the new image. A cancel stops it between two paths
    (:class:`TaskCanceled`); the clone is then half changed, to be thrown away."""

    def check() -> None:
        if cancel is not None and cancel.cancelled:
            raise TaskCanceled()

    with NtfsVolume.opened(volume, writable=True) as target, NtfsVolume.opened(scratch) as source:
        for path in changes.removed:
            check()
            target.delete(path)
        links: dict[int, int] = {}
        for path in changes.added:
            check()
            target.copy_tree_from(source, path, links=links)
        for path in sorted(changes.parents, key=lambda p: p.count("/"), reverse=True):
            target.set_times(path, times[path])


@dataclass(frozen=True)
class Composite:
    """A composite taken from the store: its volume (now the taker's to change), its paths' signatures, the
    digests of its image's 4 MiB blocks by composition and the image's layouts (see
    :class:`app.engine.checksum.Known`), and the clone left in the store (``twin``: the volume as it was
    taken)."""

    volume: Path
    signatures: Mapping[str, str]
    blocks: Mapping[str, bytes] = field(default_factory=dict)
    layouts: Mapping[str, Any] = field(default_factory=dict)
    twin: Path | None = None

    def known_blocks(self) -> Known:
        """The block digests a checksum of the changed volume may take: those of ranges that still share
        their blocks with the twin, compared when first asked (the changes are made by then)."""
        twin = self.twin
        ranges: SameRanges | None = None

        def unchanged(begin: int, end: int) -> bool:
            nonlocal ranges
            if ranges is None:
                ranges = same_ranges(self.volume, twin) if twin is not None else SameRanges()
                log.info("the composite's volume still shares %d MiB with the one kept", ranges.total() >> 20)
            return ranges(begin, end)

        return Known(self.blocks, unchanged, self.layouts)


def _blocks(listed: object) -> dict[str, bytes]:
    """The block digests a listing holds; none when they are damaged (every block is then read again)."""
    if not isinstance(listed, dict):
        return {}
    try:
        blocks = {str(name): bytes.fromhex(digest) for name, digest in listed.items()}
    except (TypeError, ValueError):
        return {}
    return {} if any(len(digest) != 32 for digest in blocks.values()) else blocks


class CompositeStore:
    """The composites kept in ``root`` (inside the layer disk cache): one per stack shape, the ``keep``
    most recently published.

    A shape's ``<shape>.json`` names its volume file (``<shape>.<token>.ntfs``, never changed while it is in
    the store) and holds the signatures. A publish *takes* the volume out (a rename: the file keeps its
    pages in the page cache, so hashing the new image reads memory, not the disk) and leaves a clone of it
    in its place, which stays the composite if the publish fails; a finished publish *adopts* its volume as
    the new composite. Taking and adopting hold a lock on the store, and the JSON is replaced atomically:
    concurrent publishes each get a volume of their own and signatures that belong to it."""

    def __init__(self, root: Path, keep: int = 2, evict: Callable[[Collection[str]], object] | None = None) -> None:
        self.root = Path(root)
        self.keep = keep
        #: Called with the name of a volume just adopted (never to be evicted now), to keep the cache the
        #: store is in within its bound.
        self._evict = evict

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        import fcntl  # composites exist only where files can be cloned (Linux)

        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _read(self, shape: str) -> Composite | None:
        try:
            document = json.loads((self.root / f"{shape}.json").read_text(encoding="utf-8"))
            found, name = document["signatures"], document["volume"]
            volume = self.root / name
            if not isinstance(found, dict) or Path(name).name != name or not volume.is_file():
                return None
        except (OSError, ValueError, KeyError, TypeError):
            return None
        layouts = document.get("layouts")
        return Composite(volume, found, _blocks(document.get("blocks")), layouts if isinstance(layouts, dict) else {})

    def _write(self, shape: str, name: str, found: Mapping[str, str], blocks: Mapping[str, bytes],
               layouts: Mapping[str, Any]) -> None:
        listing = self.root / f".{name}.json"
        document = {"volume": name, "signatures": found, "layouts": layouts,
                    "blocks": {named: digest.hex() for named, digest in blocks.items()}}
        try:
            listing.write_text(json.dumps(document, separators=(",", ":")), encoding="utf-8")
            listing.replace(self.root / f"{shape}.json")
        except BaseException:
            listing.unlink(missing_ok=True)
            raise
        fsync_dir(self.root)

    def take(self, shape: str, into: Path) -> Composite | None:
        """Move the composite of ``shape`` to ``into`` (new), leaving a clone of it as the kept composite;
        ``None`` when there is none (or its files are unusable). :class:`OSError` when the clone cannot be
        made (nothing changed then)."""
        with self._locked():
            kept = self._read(shape)
            if kept is None:
                return None
            volume = kept.volume
            os.utime(self.root / f"{shape}.json")  # used now: the least recently used are evicted first
            clone = self.root / f".{volume.name}.{secrets.token_hex(4)}.clone"
            clone_file(volume, clone)
            # the clone takes the volume's name: the listing stays as it is (no rewrite of its signatures)
            try:
                volume.replace(into)
                clone.replace(volume)
            except BaseException:
                clone.unlink(missing_ok=True)
                raise
            return Composite(into, kept.signatures, kept.blocks, kept.layouts, twin=volume)

    def adopt(self, shape: str, volume: Path, found: Mapping[str, str], known: Known | None = None) -> Path | None:
        """Move ``volume`` into the store as the composite of ``shape`` (replacing the one kept before) with
        its signatures and what ``known`` found of its image's blocks, then forget all but the
        :attr:`keep` most recent shapes; its new path. ``None`` when it cannot be kept (it stays where it
        was): the next publish then applies every layer."""
        name = f"{shape}.{secrets.token_hex(6)}.ntfs"
        try:
            with self._locked():
                volume.replace(self.root / name)
                try:
                    self._write(shape, name, found, known.found if known is not None else {},
                                known.found_layouts if known is not None else {})
                except BaseException:
                    (self.root / name).replace(volume)
                    raise
                for old in self.root.glob(f"{shape}.*.ntfs"):
                    if old.name != name:
                        old.unlink(missing_ok=True)
                shapes = sorted(self.root.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
                for stale in shapes[self.keep:]:
                    self._forget(stale.stem)
        except OSError as exc:
            log.warning("the composite could not be kept for the next publish: %s", exc)
            return None
        if self._evict is not None:
            self._evict({name})
        return self.root / name

    def blank_volume(self, size: int, into: Path, make: Callable[[Path, int], object]) -> None:
        """An empty NTFS volume of ``size`` bytes at ``into`` (new): a clone of the one kept for that size,
        made by ``make(path, size)`` the first time (formatting costs a quarter of a second; a clone, none).
        A few sizes are kept, the most recently used, in ``blank/``."""
        blanks = self.root / "blank"
        template = blanks / f"{size}.ntfs"
        blanks.mkdir(parents=True, exist_ok=True)
        if not template.is_file():
            partial = blanks / f".{template.name}.{secrets.token_hex(4)}"
            try:
                make(partial, size)
                partial.replace(template)
            except BaseException:
                partial.unlink(missing_ok=True)
                raise
            kept = sorted(blanks.glob("*.ntfs"), key=lambda p: p.stat().st_mtime, reverse=True)
            for stale in kept[_BLANKS:]:
                stale.unlink(missing_ok=True)
        clone_file(template, into)
        os.utime(template)

    def discard(self, shape: str) -> None:
        """Forget the composite of ``shape``."""
        with self._locked():
            self._forget(shape)

    def _forget(self, shape: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.root / f"{shape}.json").unlink()
        for volume in [*self.root.glob(f"{shape}.*.ntfs"), *self.root.glob(f".{shape}.*.clone")]:
            volume.unlink(missing_ok=True)
