"""Which ranges of two files provably hold the same bytes, from where their blocks lie on the disk.

A file cloned from another (``FICLONE``: XFS with reflink, btrfs) shares its blocks with it until one of
them is written: the file system then writes the new bytes elsewhere (copy on write). So where both files
map a range to the same physical blocks, the bytes are the same, without reading them. ``FS_IOC_FIEMAP``
tells where a file's blocks lie; asked with ``FIEMAP_FLAG_SYNC`` it first writes the file's pending
changes, whose new places only exist once written.

A range that is a hole in both files reads as zeros in both and counts as the same. Anything the kernel
cannot place exactly (delayed allocation, inline or encoded data) counts as changed, as does every range
on a file system without FIEMAP, or off Linux: the answer is always safe, at worst empty.
"""

from __future__ import annotations

import bisect
import logging
import os
import struct
import sys
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["Extent", "SameRanges", "file_extents", "same_ranges"]

_FS_IOC_FIEMAP = 0xC020660B  # _IOWR('f', 11, struct fiemap)
_FIEMAP_FLAG_SYNC = 0x1
_HEADER = struct.Struct("=QQIIII")  # fm_start, fm_length, fm_flags, fm_mapped_extents, fm_extent_count, reserved
_EXTENT = struct.Struct("=QQQ2QI3I")  # fe_logical, fe_physical, fe_length, reserved64[2], fe_flags, reserved[3]
_BATCH = 512
_LAST = 0x1
_UNWRITTEN = 0x800
#: Flags that mean the extent's physical place is not exact: delalloc, unknown, encoded, encrypted, not
#: aligned, inline, tail-packed.
_INEXACT = 0x2 | 0x4 | 0x8 | 0x80 | 0x100 | 0x200 | 0x400

#: ``(logical start, physical start, length, unwritten)`` of one extent of a file.
Extent = tuple[int, int, int, bool]


def file_extents(fd: int, size: int) -> list[Extent] | None:
    """The file's data extents in logical order (its pending writes flushed first), clipped to ``size``;
    ``None`` when the file system cannot say exactly where they lie."""
    import fcntl  # Linux only: callers check the platform

    found: list[Extent] = []
    start = 0
    while start < size:
        request = bytearray(_HEADER.size + _BATCH * _EXTENT.size)
        _HEADER.pack_into(request, 0, start, size - start, _FIEMAP_FLAG_SYNC, 0, _BATCH, 0)
        try:
            fcntl.ioctl(fd, _FS_IOC_FIEMAP, request, True)
        except OSError as exc:
            log.debug("FIEMAP is not available here: %s", exc)
            return None
        mapped = _HEADER.unpack_from(request, 0)[3]
        if not mapped:
            break
        last = False
        for index in range(mapped):
            at = _HEADER.size + index * _EXTENT.size
            logical, physical, length, _, _, flags, *_ = _EXTENT.unpack_from(request, at)
            if flags & _INEXACT:
                return None
            end = min(logical + length, size)
            if end > logical:
                found.append((logical, physical, end - logical, bool(flags & _UNWRITTEN)))
            start = logical + length
            last = bool(flags & _LAST)
        if last:
            break
    return found


class SameRanges:
    """Sorted, disjoint ``[begin, end)`` ranges in which two files hold the same bytes."""

    def __init__(self, ranges: Sequence[tuple[int, int]] = ()) -> None:
        self.ranges = list(ranges)
        self._starts = [begin for begin, _ in self.ranges]

    def __call__(self, begin: int, end: int) -> bool:
        """Whether all of ``[begin, end)`` lies in one of the ranges."""
        index = bisect.bisect_right(self._starts, begin) - 1
        return index >= 0 and self.ranges[index][0] <= begin and end <= self.ranges[index][1]

    def total(self) -> int:
        return sum(end - begin for begin, end in self.ranges)


def _segments(extents: list[Extent], size: int) -> list[tuple[int, int, int | None, bool]]:
    """The file cut into ``(begin, end, physical at begin or None for a hole, unwritten)``."""
    pieces: list[tuple[int, int, int | None, bool]] = []
    at = 0
    for logical, physical, length, unwritten in extents:
        if logical > at:
            pieces.append((at, logical, None, False))
        pieces.append((logical, logical + length, physical, unwritten))
        at = logical + length
    if at < size:
        pieces.append((at, size, None, False))
    return pieces


def same_ranges(changed: Path, twin: Path) -> SameRanges:
    """Where ``changed`` still holds what ``twin`` holds (see the module docstring); empty when it cannot
    be told (another size, no FIEMAP, another platform)."""
    if not sys.platform.startswith("linux"):
        return SameRanges()
    try:
        with Path(changed).open("rb") as a, Path(twin).open("rb") as b:
            size = os.fstat(a.fileno()).st_size
            if os.fstat(b.fileno()).st_size != size:
                return SameRanges()
            mine, theirs = file_extents(a.fileno(), size), file_extents(b.fileno(), size)
    except OSError as exc:
        log.debug("the extents of %s and %s cannot be compared: %s", changed, twin, exc)
        return SameRanges()
    if mine is None or theirs is None:
        return SameRanges()
    left, right = _segments(mine, size), _segments(theirs, size)
    same: list[tuple[int, int]] = []
    i = j = 0
    while i < len(left) and j < len(right):
        a0, a1, ap, au = left[i]
        b0, b1, bp, bu = right[j]
        begin, end = max(a0, b0), min(a1, b1)
        if begin < end:
            if ap is None and bp is None:
                equal = True
            elif ap is not None and bp is not None:
                equal = au == bu and ap + (begin - a0) == bp + (begin - b0)
            else:
                equal = False
            if equal:
                if same and same[-1][1] == begin:
                    same[-1] = (same[-1][0], end)
                else:
                    same.append((begin, end))
        if a1 <= b1:
            i += 1
        if b1 <= a1:
            j += 1
    return SameRanges(same)
