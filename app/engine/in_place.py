"""Disk images assembled around the Windows volume file instead of copied from it.

A publish applies the merged layers to a sparse volume file, then has to turn it and the small pieces
around it (the partition table, the ESP, a gold disk's other partitions) into the image. Copying the
volume into the image writes every byte a second time. On file systems that can move a file's blocks
(``fallocate`` with ``FALLOC_FL_INSERT_RANGE`` and ``FALLOC_FL_COLLAPSE_RANGE``: ext4 and XFS on Linux),
the volume file itself becomes the image:

* **raw** and **fixed VHD**: a hole the size of everything before the volume is inserted at the file's
  start and those pieces' data is copied into it; the pieces after it are copied past its end (and a
  fixed VHD gets its footer).
* **dynamic VHDX**: the payload blocks that lie wholly inside the volume stay where they are. Room for the
  headers, the metadata and the BAT is inserted before them, and runs of blocks that hold no data are
  collapsed out of the file (the BAT marks them ``PAYLOAD_BLOCK_ZERO``), so the image is as compact as a
  streamed one. Blocks outside the volume, and the two that hold the volume's edges together with a
  neighbour's bytes, are copied to the end of the file. VHDX asks payload blocks to start on a MiB, not on
  a block: a volume that starts on any MiB keeps its blocks in place.
* **qcow2** (version 3, 64 KiB clusters as qemu-img makes them): the same, cluster by cluster, with the
  header, the L1 table, the refcount table and blocks and the L2 tables in front. Every cluster of the
  file is referenced once and counted once (``qemu-img check``: no leak, no corruption).
* **monolithicSparse VMDK**: the same with 64 KiB grains, the header, the embedded descriptor and both
  grain directories with all their grain tables in front.
* **dynamic VHD**: the same with 2 MiB blocks, but each block's 512-byte sector bitmap must sit right
  before its data, and the volume's blocks lie back to back: 4 KiB (one file system block) is inserted
  before each, holding the bitmap in its last sector (the rest is an unreferenced hole).

Only the pieces other than the volume, and at most two blocks of the volume's edges, are copied; then the
file is read once to compute its checksum (:mod:`app.engine.checksum`). :func:`assemble` says ``None``
(and has changed nothing) when it cannot work in place (another format, a file system without the two
operations, a volume not aligned for it, a disk of a few blocks); the caller then streams the image with
:mod:`app.engine.vhd`.

The volume file is consumed: once :func:`assemble` has started changing it, it holds the image or, after
an error or a cancel, garbage to delete.
"""

from __future__ import annotations

import array
import bisect
import ctypes
import ctypes.util
import errno
import hashlib
import itertools
import logging
import os
import struct
import sys
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.engine import vhd
from app.engine.checksum import BLOCK, ZERO_LEAF, Known, root
from app.engine.disk import DiskError, ProgressFn, _pwrite_all
from app.procs import Cancellable

log = logging.getLogger(__name__)

__all__ = ["FORMATS", "assemble", "ranges_supported"]

MiB = 1024 * 1024
FORMATS = ("raw", "vhd-fixed", "vhd-dynamic", "vhdx", "qcow2", "vmdk-sparse")
_BLOCK = vhd.VHDX_BLOCK  # the VHDX payload block, as the streamed writer uses
_QCOW2_CLUSTER = 64 * 1024
_QCOW2_COPIED = 1 << 63  # the cluster's refcount is exactly one
_VMDK_GRAIN = 64 * 1024
_VMDK_GTES = 512  # grain table entries: a grain table maps 32 MiB
_VMDK_DESCRIPTOR_SECTORS = 20
_HASHERS = 2  # threads hashing the image's blocks
_READ_AHEAD = 64 * MiB  # how far ahead of the SHA-256 the volume is asked for (POSIX_FADV_WILLNEED)
_VHD_GAP = 4096  # before each dynamic VHD block: its sector bitmap at the end, a whole file system block
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_COLLAPSE_RANGE = 0x08
_FALLOC_FL_INSERT_RANGE = 0x20


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if _libc.fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


_libc: ctypes.CDLL | None = None


def ranges_supported(folder: Path) -> int:
    """The block size of ``folder``'s file system when it can insert and collapse ranges of a file (tried
    each time on a small scratch file: a device number may name another file system after a remount), else
    0."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=".layerdesk-probe-")
    except OSError as exc:
        log.info("Cannot try moving file blocks in %s (%s): the disk image is written by copying.", folder,
                 exc.strerror)
        return 0
    try:
        block = os.fstatvfs(fd).f_bsize
        os.pwrite(fd, b"\x01" * (4 * block), 0)
        _fallocate(fd, _FALLOC_FL_INSERT_RANGE, 0, block)
        _fallocate(fd, _FALLOC_FL_COLLAPSE_RANGE, 0, block)
        works = os.fstat(fd).st_size == 4 * block and os.pread(fd, 1, 0) == b"\x01"
        return block if works else 0
    except OSError as exc:
        log.info("The file system of %s cannot move file blocks (%s): disk images are written there by "
                 "copying the Windows volume.", folder, exc.strerror)
        return 0
    finally:
        os.close(fd)
        Path(name).unlink()


def assemble(
    pieces: Sequence[Path],
    volume_index: int,
    fmt: str,
    *,
    progress: ProgressFn | None = None,
    cancel: Cancellable | None = None,
    into: Path | None = None,
    known: Known | None = None,
) -> str | None:
    """Turn ``pieces[volume_index]`` (the Windows volume file) into the ``fmt`` image of all ``pieces`` read
    as one disk, in place; returns the image's checksum (:mod:`app.engine.checksum`), or ``None`` when this
    cannot be done in place (nothing changed then). The caller verifies and renames the file.

    The image's layout is planned first and its checksum computed from the pieces as they are (the
    volume's pages are still in the page cache then; moving its blocks drops them); only then is the
    volume changed, so a cancel while hashing leaves it as it was.

    ``into`` (an empty file in the volume's folder): the volume stays as it is, and the image is written to
    ``into`` with the same layout, the volume's blocks copied by ``copy_file_range``, which clones them
    where the file system can (XFS, btrfs: no data is copied, and the volume's pages, still in memory,
    are what the checksum reads). ``known``: block digests of the volume to take where it has not changed
    (:class:`app.engine.checksum.Known`), filled with those of the volume now."""
    if fmt not in FORMATS:
        return None
    volume = Path(pieces[volume_index])
    block = ranges_supported(volume.parent) if into is None else _block_size(volume.parent)
    if not block:
        return None
    disk = vhd._Disk(pieces, into if into is not None else volume.parent / f".{volume.name}.image")
    # beside the volume, with what the last image of this disk left: its blocks in the same places (qcow2's
    # metadata grows with its clusters, so its blocks always go in order)
    layout: dict[str, Any] | None = None
    if into is not None and known is not None and fmt != "qcow2":
        kept = known.layouts.get(fmt)
        layout = kept if isinstance(kept, dict) else {}
    try:
        start = disk.starts[volume_index]
        if fmt == "vhdx":
            vhd._check_sectors("VHDX", vhd._VHDX_MAX)(disk.size)
            aligned = not start % MiB and not MiB % block
            plan: _Plan | None = _vhdx_plan(disk, volume_index, layout) if aligned else None
        elif fmt == "qcow2":
            aligned = not start % _QCOW2_CLUSTER and not _QCOW2_CLUSTER % block
            plan = _qcow2_plan(disk, volume_index) if aligned else None
        elif fmt == "vmdk-sparse":
            aligned = not start % _VMDK_GRAIN and not _VMDK_GRAIN % block
            plan = _vmdk_sparse_plan(disk, volume_index, layout) if aligned else None
        elif fmt == "vhd-dynamic":
            vhd._check_sectors("VHD", vhd._VHD_MAX)(disk.size)
            aligned = not start % block and not _VHD_GAP % block and not vhd._VHD_BLOCK % block
            plan = _vhd_dynamic_plan(disk, volume_index, layout) if aligned else None
        else:
            if fmt == "vhd-fixed":
                vhd._check_sectors("VHD", vhd._VHD_MAX)(disk.size)
            plan = _flat_plan(disk, volume_index, footer=fmt == "vhd-fixed") if not start % block else None
        if plan is None:
            return None
        if plan.layout is not None and known is not None:
            known.found_layouts[fmt] = plan.layout
        ticker = vhd._Ticker(plan.size, progress, cancel)
        started = time.monotonic()
        if into is None:  # hashed while the volume is as it was (moving its blocks drops its pages)
            checksum = plan.checksum(disk, ticker, volume_index, known)
            ticker.check()
        image = volume if into is None else into
        fd = os.open(image, os.O_RDWR)
        try:
            if into is None:
                plan.carry_out(disk, fd)
            else:
                plan.copy_out(disk, fd)
        except OSError as exc:
            raise DiskError(f"Cannot write the disk image in {image}: {exc.strerror or exc}.") from exc
        finally:
            os.close(fd)
        if into is not None:  # after the copy, whose clones flush the volume's changes first (see Known)
            checksum = plan.checksum(disk, ticker, volume_index, known)
        if image.stat().st_size != plan.size:
            raise DiskError(f"The disk image assembled in {image} holds {image.stat().st_size} bytes, "
                            f"not the {plan.size} planned.")
        log.info("Disk image (%s) assembled around the Windows volume in place: a %s disk in a %s file, %.1f s.",
                 fmt, _size_text(disk.size), _size_text(plan.size), time.monotonic() - started)
        return checksum
    finally:
        disk.close()


def _block_size(folder: Path) -> int:
    """The block size of ``folder``'s file system (0 off Linux, where ``copy_file_range`` does not clone)."""
    return os.statvfs(folder).f_bsize if sys.platform.startswith("linux") else 0


def _size_text(count: int) -> str:
    return f"{count / 2**30:.1f} GiB" if count >= 2**30 else f"{-(-count // MiB)} MiB"


@dataclass
class _Plan:
    """The image file as a list of parts in file order, each ``(file offset, length, source)``: ``bytes`` to
    write, or an ``int`` disk offset whose bytes are copied there unless ``in_place`` (already there once
    the volume's blocks are moved). Bytes not covered read as zeros (holes)."""

    size: int
    parts: list[tuple[int, int, bytes | int]]
    in_place: set[int]  # file offsets of the parts that are the volume's own blocks
    move: Callable[[int], None]  # moves the volume's blocks into place (given the open volume)
    layout: dict[str, Any] | None = None  # where the blocks went, for the next image (see _mapped_plan)

    def checksum(self, disk: vhd._Disk, ticker: vhd._Ticker, volume_index: int, known: Known | None = None) -> str:
        """The image's checksum (:mod:`app.engine.checksum`), read from the disk's pieces as the parts say:
        block by block, on two threads. A block that holds no data is not read; a block whose bytes are
        ranges of the volume takes its digest from ``known`` where those ranges are unchanged, and records
        its digest in ``known.found`` (by :func:`composition`)."""
        started = time.monotonic()
        extents = disk.data_extents()
        low = disk.starts[volume_index]
        high = low + disk.sizes[volume_index]
        blocks = _blocks(self.parts, self.size)
        leaves: list[bytes | Future[bytes]] = []
        in_flight: deque[Future[bytes]] = deque()
        volume_blocks: list[tuple[int, str]] = []  # (leaf, composition) of the blocks made of volume bytes
        read = 0
        advised = 0  # the disk's bytes before this have been asked for ahead of the reads

        def read_ahead(offset: int) -> None:
            # a volume cloned from the last composite is not in the page cache: reading 64 MiB ahead lets
            # the disk work while the bytes before are hashed (an uncached 2.9 GB file: 5.9 -> 3.1-3.7 s)
            nonlocal advised
            if offset + _READ_AHEAD // 2 >= advised:
                begin = max(advised, offset)
                disk.will_read(begin, _READ_AHEAD)
                advised = begin + _READ_AHEAD

        def hash_block(length: int, pieces: list[tuple[int, int, bytes | int]]) -> bytes:
            buffer = bytearray(length)  # zeros where no piece writes
            view = memoryview(buffer)
            for at, size, source in pieces:
                if isinstance(source, bytes):
                    view[at:at + size] = source
                else:
                    disk.read_into(view[at:at + size], source)
            return hashlib.sha256(buffer).digest()

        with ThreadPoolExecutor(_HASHERS, thread_name_prefix="image-checksum") as pool:
            ticker.at(0)
            for begin, end, segments in blocks:
                ticker.at(begin)
                named = composition(segments, begin, end, low, high) if known is not None else None
                if named is not None and known is not None:
                    reused = known.take(*named)
                    if reused is not None:
                        volume_blocks.append((len(leaves), named[0]))
                        leaves.append(reused)
                        continue
                pieces: list[tuple[int, int, bytes | int]] = []
                for at, length, source in segments:
                    if isinstance(source, bytes):
                        pieces.append((at - begin, length, source))
                        continue
                    for a, b in _clip(extents, source, source + length):
                        pieces.append((a - source + at - begin, b - a, a))
                if not pieces:
                    leaves.append(ZERO_LEAF if end - begin == BLOCK else hashlib.sha256(bytes(end - begin)).digest())
                else:
                    first_read = next((source for _, _, source in pieces if isinstance(source, int)), None)
                    if first_read is not None:
                        read_ahead(first_read)
                    hashing = pool.submit(hash_block, end - begin, pieces)
                    read += end - begin
                    leaves.append(hashing)
                    in_flight.append(hashing)
                    if len(in_flight) > 2 * _HASHERS:
                        in_flight.popleft().result()  # a few blocks in memory at a time
                if named is not None:
                    volume_blocks.append((len(leaves) - 1, named[0]))
            ticker.at(self.size)
            done = [leaf if isinstance(leaf, bytes) else leaf.result() for leaf in leaves]
        if known is not None:
            for index, named_as in volume_blocks:
                known.found[named_as] = done[index]
            known.seconds += time.monotonic() - started
        log.info("image checksum: %d MiB read and hashed, %d MiB known from the last publish, in %.2f s",
                 read >> 20, (known.reused if known is not None else 0) * BLOCK >> 20, time.monotonic() - started)
        return root(b"".join(done))

    def carry_out(self, disk: vhd._Disk, fd: int) -> None:
        """The volume (``fd``) made the image: its blocks moved into place, the other parts written."""
        # only the other pieces' bytes are read once the volume has changed: the plan makers keep the
        # volume's own bytes out of the parts copied from the disk (or hold them as ``bytes``)
        extents = disk.data_extents()
        self.move(fd)
        self._write(disk, extents, fd, skip=self.in_place)

    def copy_out(self, disk: vhd._Disk, fd: int) -> None:
        """The image written to the empty file ``fd``, the disk left as it is: every part copied (the
        volume's blocks lie at offsets the file system's blocks align with, so ``copy_file_range`` clones
        them where the file system can)."""
        self._write(disk, disk.data_extents(), fd, skip=set())

    def _write(self, disk: vhd._Disk, extents: list[tuple[int, int]], fd: int, *, skip: set[int]) -> None:
        os.ftruncate(fd, self.size)
        for at, length, source in self.parts:
            if at in skip:
                continue
            if isinstance(source, bytes):
                _pwrite_all(fd, source, at)
                continue
            for begin, end in _clip(extents, source, source + length):
                _copy_disk(disk, begin, end, fd, begin - source + at)


def _blocks(parts: Sequence[tuple[int, int, bytes | int]],
            size: int) -> Iterator[tuple[int, int, list[tuple[int, int, bytes | int]]]]:
    """The image file's checksum blocks, each ``(begin, end, parts within it)``, the parts clipped to the
    block (a ``bytes`` part sliced, an ``int`` part's disk offset moved)."""
    ordered = sorted(parts, key=lambda part: part[0])
    first = 0
    for begin in range(0, size, BLOCK):
        end = min(size, begin + BLOCK)
        while first < len(ordered) and ordered[first][0] + ordered[first][1] <= begin:
            first += 1
        inside: list[tuple[int, int, bytes | int]] = []
        for at, length, source in ordered[first:]:
            if at >= end:
                break
            a, b = max(at, begin), min(at + length, end)
            if a < b:
                inside.append((a, b - a, source[a - at:b - at] if isinstance(source, bytes) else source + a - at))
        yield begin, end, inside


def composition(segments: Sequence[tuple[int, int, bytes | int]], begin: int, end: int, low: int,
                high: int) -> tuple[str, list[tuple[int, int]]] | None:
    """The name of the image block ``[begin, end)`` when its bytes are the volume's (disk bytes
    ``[low, high)``), metadata and zeros: each part's place in the block, length, and offset in the volume
    or (metadata) digest, as ``"at:length:offset"`` or ``"at:length:#digest"``, comma-separated; and the
    volume's ranges in it. ``None`` for a short block or one that holds other disk bytes. Two blocks with
    one name hold the same bytes wherever they lie in their files, as long as the volume's bytes in the
    ranges are the same."""
    if end - begin != BLOCK or not segments:
        return None
    names, ranges = [], []
    for at, length, source in segments:
        if isinstance(source, bytes):  # metadata: named by its content
            names.append(f"{at - begin}:{length}:#{hashlib.sha256(source).hexdigest()[:32]}")
            continue
        if source < low or source + length > high:
            return None
        names.append(f"{at - begin}:{length}:{source - low}")
        ranges.append((source - low, source - low + length))
    return ",".join(names), ranges


def _clip(extents: list[tuple[int, int]], begin: int, end: int) -> list[tuple[int, int]]:
    """The parts of the sorted, disjoint data ``extents`` inside ``[begin, end)``."""
    found = []
    for index in range(max(0, bisect.bisect_right(extents, (begin, begin)) - 1), len(extents)):
        a, b = extents[index]
        if a >= end:
            break
        if b > begin:
            found.append((max(a, begin), min(b, end)))
    return found


def _copy_disk(disk: vhd._Disk, begin: int, end: int, fd: int, at: int) -> None:
    """Disk bytes ``[begin, end)`` to ``fd`` at ``at``, copied by the kernel piece by piece (never the
    volume's once it is being changed: see :class:`_Plan`)."""
    for index, source in enumerate(disk.fds):
        low, high = disk.starts[index], disk.starts[index] + disk.sizes[index]
        a, b = max(begin, low), min(end, high)
        while a < b:
            copied = os.copy_file_range(source, fd, b - a, a - low, at + a - begin)
            if copied <= 0:
                raise OSError(errno.EIO, f"copy_file_range stopped at {a - low} of {disk.paths[index]}")
            a += copied


def _flat_plan(disk: vhd._Disk, volume_index: int, *, footer: bool) -> _Plan:
    """raw (and fixed VHD): the pieces before the volume go into a hole inserted at its start, those
    after it past its end."""
    start, size = disk.starts[volume_index], disk.sizes[volume_index]
    parts: list[tuple[int, int, bytes | int]] = [(0, start, 0)] if start else []
    parts.append((start, size, start))
    if start + size < disk.size:
        parts.append((start + size, disk.size - start - size, start + size))
    if footer:
        parts.append((disk.size, vhd.SECTOR, vhd._vhd_footer(disk.size, vhd._VHD_FIXED, 0xFFFFFFFFFFFFFFFF,
                                                             uuid.uuid4())))

    def move(fd: int) -> None:
        if start:
            _fallocate(fd, _FALLOC_FL_INSERT_RANGE, 0, start)

    return _Plan(disk.size + (vhd.SECTOR if footer else 0), parts, {start}, move)


def _vhdx_plan(disk: vhd._Disk, volume_index: int, layout: Mapping[str, Any] | None = None) -> _Plan | None:
    """dynamic VHDX (see the module docstring); ``None`` when the volume holds no whole block."""
    def front_size(present: bytearray) -> int:
        return vhd._VHDX_BAT_AT + vhd.vhdx_bat_size(len(present), _BLOCK)

    def front(locations: list[int | None], _size: int) -> list[tuple[int, bytes]]:
        return vhd.vhdx_front(disk.size, _BLOCK, locations)

    return _mapped_plan(disk, volume_index, _BLOCK, front_size, front, layout=layout)


def _qcow2_plan(disk: vhd._Disk, volume_index: int) -> _Plan | None:
    """qcow2 version 3 with 64 KiB clusters (qemu-img's default): the header, the L1 table, the refcount
    table and blocks and the L2 tables first, then the data clusters; every cluster of the file referenced
    once has a refcount of 1, as ``qemu-img check`` wants. ``None`` when the volume holds no whole cluster."""
    cluster = _QCOW2_CLUSTER
    per_l2 = cluster // 8  # guest clusters an L2 table maps
    per_refblock = cluster // 2  # host clusters a refcount block counts (16-bit refcounts)
    l1_size = -(-disk.size // (cluster * per_l2))
    l1_clusters = -(-l1_size * 8 // cluster)
    shape: dict[str, int] = {}

    def front_size(present: bytearray) -> int:
        tables = [any(present[t * per_l2:(t + 1) * per_l2]) for t in range(l1_size)]
        shape["l2"] = sum(tables)
        data = sum(present)
        refblocks = 1
        while True:  # the refcount blocks count themselves too
            host = 1 + l1_clusters + -(-refblocks * 8 // cluster) + refblocks + shape["l2"] + data
            needed = -(-host // per_refblock)
            if needed <= refblocks:
                break
            refblocks = needed
        shape["refblocks"], shape["reftable"] = refblocks, -(-refblocks * 8 // cluster)
        return (1 + l1_clusters + shape["reftable"] + refblocks + shape["l2"]) * cluster

    def front(locations: list[int | None], size: int) -> list[tuple[int, bytes]]:
        reftable_at = (1 + l1_clusters) * cluster
        refblocks_at = reftable_at + shape["reftable"] * cluster
        l2_at = refblocks_at + shape["refblocks"] * cluster
        l1 = bytearray(l1_clusters * cluster)
        tables: list[tuple[int, bytes]] = []
        for table in range(l1_size):
            entries = locations[table * per_l2:(table + 1) * per_l2]
            if not any(location is not None for location in entries):
                continue
            at = l2_at + len(tables) * cluster
            struct.pack_into(">Q", l1, table * 8, at | _QCOW2_COPIED)
            l2 = bytearray(cluster)
            for number, location in enumerate(entries):
                if location is not None:
                    struct.pack_into(">Q", l2, number * 8, location | _QCOW2_COPIED)
            tables.append((at, bytes(l2)))
        used = {at // cluster for at, _ in tables} | set(range(l2_at // cluster))
        used |= {location // cluster for location in locations if location is not None}
        refblocks = bytearray(shape["refblocks"] * cluster)
        for host in used:
            struct.pack_into(">H", refblocks, host * 2, 1)
        reftable = bytearray(shape["reftable"] * cluster)
        for number in range(shape["refblocks"]):
            struct.pack_into(">Q", reftable, number * 8, refblocks_at + number * cluster)
        header = struct.pack(">4sIQIIQIIQQIIQQQQII", b"QFI\xfb", 3, 0, 0, 16, disk.size, 0, l1_size, cluster,
                             reftable_at, shape["reftable"], 0, 0, 0, 0, 0, 4, 104) + bytes(8)  # no extensions
        return [(0, header), (cluster, bytes(l1)), (reftable_at, bytes(reftable)), (refblocks_at, bytes(refblocks)),
                *tables]

    return _mapped_plan(disk, volume_index, cluster, front_size, front)


def _vhd_dynamic_plan(disk: vhd._Disk, volume_index: int, layout: Mapping[str, Any] | None = None,
                      ) -> _Plan | None:
    """dynamic VHD: each 2 MiB block stored after its 512-byte sector bitmap, which must sit right before
    the block's data. The volume's blocks lie back to back, so 4 KiB (a file system block) is inserted
    before each: its last sector holds the bitmap, the rest stays a hole nothing points at. Then the
    BAT (the sector of each block's bitmap) and the footer, before and after."""
    table_bytes: dict[str, int] = {}

    def front_size(present: bytearray) -> int:
        table_bytes["n"] = -(-len(present) * 4 // vhd.SECTOR) * vhd.SECTOR
        return -(-(vhd.SECTOR + vhd._VHD_DYNAMIC_HEADER.size + table_bytes["n"]) // _VHD_GAP) * _VHD_GAP

    def front(locations: list[int | None], size: int) -> list[tuple[int, bytes]]:
        footer = vhd._vhd_footer(disk.size, vhd._VHD_DYNAMIC, vhd.SECTOR, uuid.uuid4())
        table_at = vhd.SECTOR + vhd._VHD_DYNAMIC_HEADER.size
        fields: list[object] = [b"cxsparse", 0xFFFFFFFFFFFFFFFF, table_at, 0x00010000, len(locations),
                                vhd._VHD_BLOCK, 0, bytes(16), 0, bytes(512), bytes(192)]
        fields[6] = vhd._vhd_checksum(vhd._VHD_DYNAMIC_HEADER.pack(*fields))
        table = array.array("I", [0xFFFFFFFF]) * (table_bytes["n"] // 4)
        bitmaps = []
        for index, location in enumerate(locations):
            if location is not None:
                table[index] = (location - vhd._VHD_BITMAP) // vhd.SECTOR
                bitmaps.append((location - vhd._VHD_BITMAP, b"\xff" * vhd._VHD_BITMAP))
        if sys.byteorder == "little":
            table.byteswap()
        return [(0, footer), (vhd.SECTOR, vhd._VHD_DYNAMIC_HEADER.pack(*fields)), (table_at, table.tobytes()),
                *bitmaps, (size, footer)]

    return _mapped_plan(disk, volume_index, vhd._VHD_BLOCK, front_size, front, gap=_VHD_GAP, layout=layout)


def _vmdk_sparse_plan(disk: vhd._Disk, volume_index: int, layout: Mapping[str, Any] | None = None,
                      ) -> _Plan | None:
    """monolithicSparse VMDK (hosted sparse extent, as qemu-img writes it): the header, the embedded
    descriptor, the redundant and the primary grain directory with all their grain tables, then 64 KiB
    grains; a grain table entry of 0 reads as zeros."""
    grain = _VMDK_GRAIN
    sector = vhd.SECTOR
    if disk.size % sector:
        return None
    capacity = disk.size // sector
    tables = -(-disk.size // (grain * _VMDK_GTES))
    directory_sectors = -(-tables * 4 // sector)
    table_sectors = _VMDK_GTES * 4 // sector
    rgd = 1 + _VMDK_DESCRIPTOR_SECTORS
    gd = rgd + directory_sectors + tables * table_sectors
    overhead = -(-(gd + directory_sectors + tables * table_sectors) * sector // grain) * grain

    def front(locations: list[int | None], _size: int) -> list[tuple[int, bytes]]:
        cylinders = min(capacity // (16 * 63), 16383)
        descriptor = (
            "# Disk DescriptorFile\nversion=1\n"
            f"CID={int.from_bytes(os.urandom(4), 'little') | 1:08x}\nparentCID=ffffffff\n"
            'createType="monolithicSparse"\n\n# Extent description\n'
            f'RW {capacity} SPARSE "image.vmdk"\n\n# The Disk Data Base\n#DDB\n\n'
            'ddb.virtualHWVersion = "4"\n'
            f'ddb.geometry.cylinders = "{cylinders}"\nddb.geometry.heads = "16"\nddb.geometry.sectors = "63"\n'
            'ddb.adapterType = "ide"\n'
        ).encode()
        header = struct.pack("<4sIIQQQQIQQQB4sH433x", b"KDMV", 1, 3, capacity, grain // sector, 1,
                             _VMDK_DESCRIPTOR_SECTORS, _VMDK_GTES, rgd, gd, overhead // sector, 0, b"\n \r\n", 0)
        entries = array.array("I", [0]) * (tables * _VMDK_GTES)
        for index, location in enumerate(locations):
            if location is not None:
                entries[index] = location // sector
        if sys.byteorder == "big":
            entries.byteswap()
        grain_tables = entries.tobytes()

        def directory(first_table: int) -> bytes:
            pointers = array.array("I", [first_table + number * table_sectors for number in range(tables)])
            if sys.byteorder == "big":
                pointers.byteswap()
            return pointers.tobytes()

        return [(0, header), (sector, descriptor),
                (rgd * sector, directory(rgd + directory_sectors)), ((rgd + directory_sectors) * sector, grain_tables),
                (gd * sector, directory(gd + directory_sectors)), ((gd + directory_sectors) * sector, grain_tables)]

    return _mapped_plan(disk, volume_index, grain, lambda present: overhead, front, layout=layout)


def _slots(indices: Sequence[int], kept: object) -> dict[int, int]:
    """A slot for each block number in ``indices``: the one it had in ``kept`` (``{"number": slot}``) when
    it had one, else the lowest free one; all laid out afresh when the slots would leave more than a
    fifth of the file empty."""
    slot_of: dict[int, int] = {}
    if isinstance(kept, dict):
        taken: set[int] = set()
        for index in indices:
            slot = kept.get(str(index))
            if isinstance(slot, int) and slot >= 0 and slot not in taken:
                slot_of[index] = slot
                taken.add(slot)
        free = (number for number in itertools.count() if number not in taken)
        for index in indices:
            if index not in slot_of:
                slot_of[index] = next(free)
        if slot_of and max(slot_of.values()) + 1 > len(indices) + len(indices) // 5 + 4:
            slot_of = {}
    return slot_of or {index: number for number, index in enumerate(indices)}


def _mapped_plan(
    disk: vhd._Disk, volume_index: int, block: int, front_size: Callable[[bytearray], int],
    front: Callable[[list[int | None], int], list[tuple[int, bytes]]], *, gap: int = 0,
    layout: Mapping[str, Any] | None = None,
) -> _Plan | None:
    """A format that maps each ``block`` of the disk to a place in the file (VHDX, qcow2, dynamic VHD):
    ``front_size`` gives the bytes of metadata before the first block (aligned as the format wants its
    blocks), ``front`` the metadata's parts (any offsets: before, between and after the blocks) once each
    block's file offset (or ``None``: not stored) and the end of the last block are known. ``gap``: bytes
    kept before each block (dynamic VHD's sector bitmap). ``None`` when the volume holds no whole block.

    ``layout`` (only for an image written beside the volume, never for one made of it): the blocks go in
    *slots*, and a block the layout of the last image (``{}``: none) had a slot for keeps it; new blocks
    take the slots blocks that went left free, then new ones. So a block that did not change lies where
    it lay, and the image's checksum blocks have the same compositions (:func:`composition`): their
    digests are not computed again. The plan's :attr:`_Plan.layout` is the layout to keep."""
    start, size = disk.starts[volume_index], disk.sizes[volume_index]
    first, end = -(-start // block), (start + size) // block  # the blocks wholly inside the volume
    if end <= first:
        return None
    present = vhd._present_blocks(disk, block, vhd._Ticker(disk.size, None, None), skip_zero_blocks=False)
    head = first * block - start  # volume bytes before its first whole block
    whole_end = end * block - start  # volume bytes up to the end of its last whole block
    # the volume's bytes before its first whole block stay in front of it: room for them at least
    before = max(front_size(present), head - gap)
    whole = [index for index in range(first, end) if present[index]]
    outside = [index for index, flag in enumerate(present) if flag and not first <= index < end]
    indices = [*whole, *outside]
    if layout is None:
        slot_of = {index: number for number, index in enumerate(indices)}
    else:
        same_block = layout.get("block") == block
        kept_before = layout.get("before")
        if same_block and isinstance(kept_before, int) and kept_before > before:
            before = kept_before
        slot_of = _slots(indices, layout.get("slots") if same_block else None)
    stride = gap + block
    locations: list[int | None] = [None] * len(present)
    parts: list[tuple[int, int, bytes | int]] = []
    buffer = bytearray(block)
    merging = False  # the last part is a run of the volume's whole blocks
    for index in sorted(indices, key=slot_of.__getitem__):
        position = before + slot_of[index] * stride + gap
        locations[index] = position
        if first <= index < end:
            last = parts[-1] if merging else None
            if last is not None and isinstance(last[2], int) and last[0] + last[1] == position and \
                    last[2] + last[1] == index * block:  # one part for a run of blocks: read in large pieces
                parts[-1] = (last[0], last[1] + block, last[2])
            else:
                parts.append((position, block, index * block))
            merging = True
            continue
        merging = False
        length = min(block, disk.size - index * block)
        source: bytes | int = index * block
        if (index == first - 1 and head) or (index == end and whole_end < size):  # shares bytes with the volume
            view = memoryview(buffer)[:length]
            disk.read_into(view, index * block)
            source = bytes(view)
        parts.append((position, length, source))
    position = before + (max(slot_of.values()) + 1 if slot_of else 0) * stride  # a short last block takes a whole one
    in_place = {at for at, _, source in parts if isinstance(source, int) and first * block <= source < end * block}
    parts += [(at, len(data), data) for at, data in front(locations, position)]
    parts.sort(key=lambda part: part[0])
    size = max(position, *(at + length for at, length, _ in parts))
    placed = None if layout is None else {"block": block, "before": before,
                                          "slots": {str(index): slot for index, slot in slot_of.items()}}

    def move(fd: int) -> None:
        if placed is not None:
            raise AssertionError("an image laid out in slots is written beside the volume, not in it")
        os.ftruncate(fd, whole_end)
        inserted = before + gap - head  # then block ``first`` starts at ``before`` + ``gap``
        if inserted:
            _fallocate(fd, _FALLOC_FL_INSERT_RANGE, 0, inserted)
        if head:  # those bytes are in an edge block, copied: zeros here, under the metadata written later
            _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, inserted, head)
        before_blocks = before + gap
        # collapse the runs of empty blocks, from the last, so that the runs before keep their offsets
        index = end
        while index > first:
            if present[index - 1]:
                index -= 1
                continue
            run_end = index
            while index > first and not present[index - 1]:
                index -= 1
            at, length = before_blocks + (index - first) * block, (run_end - index) * block
            if at + length >= os.fstat(fd).st_size:
                os.ftruncate(fd, at)
            else:
                _fallocate(fd, _FALLOC_FL_COLLAPSE_RANGE, at, length)
        if gap:  # the stored blocks lie back to back now: room before each but the first, from the last
            for number in range(len(whole) - 1, 0, -1):
                _fallocate(fd, _FALLOC_FL_INSERT_RANGE, before_blocks + number * block, gap)

    return _Plan(size, parts, in_place, move, placed)
