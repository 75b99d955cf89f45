"""Disk images LayerDesk writes itself: dynamic VHDX, dynamic and fixed VHD, and raw, each in one sequential
pass over the raw pieces of a disk that also computes the image's checksum (:mod:`app.engine.checksum`).

The pieces (``prefix.raw``, the Windows volume, ``suffix.raw`` from :func:`app.engine.disk.build_gpt_pieces`,
or a gold disk's pieces) are read as one disk, in order. Which blocks hold data is decided from the pieces'
holes (``SEEK_DATA``/``SEEK_HOLE``), before anything is written: a block that touches data is written whole
(even when its bytes happen to be zeros), a block that lies entirely in holes is left out of the image. So
the allocation table, which comes before the blocks, is known up front, and every byte of the image is
written once, in file order, and hashed as it goes; nobody has to read the image back to checksum it.

Formats, as qemu-img 7.2 and Windows read them:

* VHDX (MS-VHDX 1.0): file type identifier, two headers and two region tables (CRC-32C), an empty 1 MiB
  log, the metadata region (File Parameters, Virtual Disk Size, Page 83 Data, 512-byte logical and
  4096-byte physical sectors), then the BAT (payload entries with a sector bitmap entry after every
  chunk) and the payload blocks. Blocks left out are ``PAYLOAD_BLOCK_ZERO``: the spec leaves the contents
  of a ``NOT_PRESENT`` block undefined.
* VHD dynamic: footer copy, ``cxsparse`` header, BAT (big-endian sector offsets), then each present 2 MiB
  block after its 512-byte sector bitmap, then the footer. VHD fixed: the raw disk and the footer.
  The footer's size is the disk's exact size; its creator says ``win `` so that readers which pick the
  size by creator (qemu among them) take that size, not the CHS geometry rounded down (what qemu-img's
  ``force_size=on`` does, DESIGN.md §4).
* raw: the pieces concatenated into a sparse file (holes and all-zero chunks stay holes).

Each writer returns the checksum of the file it wrote. The image is written under a temporary name
beside ``out`` and renamed when complete; on a failure or a cancel nothing is left behind. Like
``qemu-img convert`` (whose flushes cost nothing measurable: it does not wait for the data), the writers
leave flushing to the page cache: an fsync costs about 0.3 s per GB on the machines measured.
"""

from __future__ import annotations

import array
import logging
import os
import struct
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from app.engine.checksum import BlockHash
from app.engine.disk import DiskError, ProgressFn, _output
from app.files import data_ranges
from app.procs import Cancellable
from app.tasks.base import TaskCanceled

log = logging.getLogger(__name__)

__all__ = ["crc32c", "write_raw", "write_vhd_dynamic", "write_vhd_fixed", "write_vhdx"]

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
SECTOR = 512
PHYSICAL_SECTOR = 4096
_CHUNK = 2 * MiB  # what one read of the raw writers takes
_ZEROS = bytes(4 * MiB)
_PROGRESS_STEP = 32 * MiB  # progress is reported at least every this many bytes of the disk (1 % when less)


# --- CRC-32C (Castagnoli), for the VHDX headers and region tables -----------------------------------


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes, crc: int = 0) -> int:
    """CRC-32C of ``data`` (continuing from ``crc``), as MS-VHDX and iSCSI (RFC 3720) define it. Table
    driven and slow (a few MB/s), which is plenty for 4 KiB headers and 64 KiB region tables."""
    crc ^= 0xFFFFFFFF
    table = _CRC32C_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# --- reading the pieces as one disk -----------------------------------------------------------------


class _Disk:
    """The raw pieces, opened, read as one disk of ``size`` bytes."""

    def __init__(self, pieces: Sequence[Path], out: Path) -> None:
        self.paths = [Path(p) for p in pieces]
        if not self.paths:
            raise DiskError("Nothing to write: no raw disk pieces were given.")
        self.fds: list[int] = []
        self.starts: list[int] = []
        self.sizes: list[int] = []
        self.size = 0
        try:
            for path in self.paths:
                try:
                    fd = os.open(path, os.O_RDONLY)
                except FileNotFoundError as exc:
                    raise DiskError(f"The raw disk piece {path} does not exist (removed while the disk was "
                                    "being written?).") from exc
                except OSError as exc:
                    raise DiskError(f"Cannot read the raw disk piece {path}: {exc.strerror}.") from exc
                self.fds.append(fd)
                if out.exists() and out.samefile(path):
                    raise DiskError(f"{out} is one of the raw disk pieces; write the image to another file.")
                self.starts.append(self.size)
                self.sizes.append(os.fstat(fd).st_size)
                self.size += self.sizes[-1]
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def check_unchanged(self) -> None:
        """A piece that grew or shrank while it was read would make an image of neither version."""
        for path, fd, size in zip(self.paths, self.fds, self.sizes, strict=True):
            now = os.fstat(fd).st_size
            if now != size:
                raise DiskError(f"The raw disk piece {path} changed while the disk image was being written "
                                f"({size} bytes, then {now}).")

    def data_extents(self) -> list[tuple[int, int]]:
        """``(start, end)`` of the disk's bytes that are not holes in their piece, in order, merged."""
        extents: list[tuple[int, int]] = []
        for fd, start, end in zip(self.fds, self.starts, [*self.starts[1:], self.size], strict=True):
            for data, hole in data_ranges(fd, end - start):
                if extents and extents[-1][1] == start + data:
                    extents[-1] = (extents[-1][0], start + hole)
                else:
                    extents.append((start + data, start + hole))
        return extents

    def will_read(self, offset: int, length: int) -> None:
        """Ask the kernel to start reading ``[offset, offset + length)`` of the disk into the page cache now
        (``POSIX_FADV_WILLNEED``), so reading it later overlaps with hashing what came before."""
        advise = getattr(os, "posix_fadvise", None)
        if advise is None:
            return
        for index, fd in enumerate(self.fds):
            start = self.starts[index]
            end = self.starts[index + 1] if index + 1 < len(self.fds) else self.size
            begin, stop = max(offset, start), min(offset + length, end)
            if begin < stop:
                advise(fd, begin - start, stop - begin, os.POSIX_FADV_WILLNEED)

    def read_into(self, buffer: memoryview, offset: int) -> None:
        """Fill ``buffer`` with the disk's bytes from ``offset``; bytes past the disk's end are zeros."""
        filled = 0
        for index, fd in enumerate(self.fds):
            start = self.starts[index]
            end = self.starts[index + 1] if index + 1 < len(self.fds) else self.size
            position = offset + filled
            if filled == len(buffer):
                break
            if not start <= position < end:
                continue
            count = min(len(buffer) - filled, end - position)
            got = 0
            while got < count:
                try:
                    read = os.preadv(fd, [buffer[filled + got : filled + count]], position - start + got)
                except OSError as exc:
                    raise DiskError(f"Cannot read the raw disk piece {self.paths[index]}: {exc.strerror}.") from exc
                if read <= 0:
                    raise DiskError(f"The raw disk piece {self.paths[index]} ended early: it was changed while "
                                    f"the disk image was being written ({position - start + got} of "
                                    f"{end - start} bytes could be read).")
                got += read
            filled += count
        if filled < len(buffer):
            buffer[filled:] = bytes(len(buffer) - filled)


def _present_blocks(disk: _Disk, block_size: int, ticker: _Ticker, skip_zero_blocks: bool) -> bytearray:
    """One flag per block of the disk: 1 where the block touches data (and, with ``skip_zero_blocks``, where
    its bytes are not all zeros, which costs a read of every such block before the image is written)."""
    present = bytearray(-(-disk.size // block_size))
    for start, end in disk.data_extents():
        first, last = start // block_size, (end - 1) // block_size
        present[first : last + 1] = b"\x01" * (last - first + 1)
    if skip_zero_blocks:
        buffer = bytearray(block_size)
        zeros = bytes(block_size)
        for index, flag in enumerate(present):
            if flag:
                ticker.check()
                disk.read_into(memoryview(buffer), index * block_size)
                if buffer == zeros:
                    present[index] = 0
    return present


# --- writing and hashing the image ------------------------------------------------------------------


class _Sink:
    """The image file, written strictly in order; every byte goes through the checksum
    (:mod:`app.engine.checksum`). Runs of zeros are hashed but left as holes.

    The hashing runs on a thread of its own (hashlib lets go of the GIL), overlapping the reads and writes:
    one pass then costs about what SHA-256 alone costs. Data read for the image goes into the buffers
    :meth:`buffer` hands out, which are reused only once they are hashed.
    """

    _RING = 3  # buffers in turn: one being read and written while the others wait for the hash

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.position = 0
        self._digest = BlockHash()
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="image-checksum")
        self._ring: list[tuple[bytearray, Future[None] | None]] = []
        self._turn = 0
        self._last: Future[None] | None = None

    def buffer(self, size: int) -> memoryview:
        """A buffer of ``size`` bytes to read the next data into, free to overwrite."""
        if len(self._ring) < self._RING:
            self._ring.append((bytearray(size), None))
        self._turn = (self._turn + 1) % len(self._ring)
        buffer, hashed = self._ring[self._turn]
        if hashed is not None:
            hashed.result()
        if len(buffer) < size:
            buffer = bytearray(size)
        self._ring[self._turn] = (buffer, None)
        return memoryview(buffer)[:size]

    def write(self, data: bytes | memoryview, *, store: bool = True) -> None:
        """Write and hash ``data``: bytes, or a view of the latest :meth:`buffer` (``store=False``: only
        hash it, as the bytes already in the file at this position)."""
        view = memoryview(data)
        self._hash(view)
        if isinstance(data, memoryview):
            buffer, _ = self._ring[self._turn]
            self._ring[self._turn] = (buffer, self._last)
        done = len(view) if not store else 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], self.position + done)
        self.position += len(view)

    def zeros(self, count: int) -> None:
        self._last = self._hasher.submit(self._digest.zeros, count)  # whole blocks of zeros cost nothing
        self.position += count

    def pad_to(self, offset: int) -> None:
        if offset < self.position:
            raise AssertionError(f"layout error: at {self.position}, asked to pad to {offset}")
        self.zeros(offset - self.position)

    def finish(self) -> str:
        os.ftruncate(self.fd, self.position)  # a trailing hole still counts
        return self.digest()

    def digest(self) -> str:
        """The checksum (:mod:`app.engine.checksum`) of everything written (or hashed); the hashing thread
        ends."""
        self.close()
        return self._digest.checksum()

    def close(self) -> None:
        """Wait for the hashing thread and end it."""
        self._hasher.shutdown(wait=True)

    def _hash(self, view: memoryview) -> None:
        self._last = self._hasher.submit(self._digest.update, view)  # one worker: in order


class _Ticker:
    """Progress every 32 MiB of the disk (or 1 % of it) and a cancel check at every block."""

    def __init__(self, total: int, progress: ProgressFn | None, cancel: Cancellable | None) -> None:
        self.total = total
        self.progress = progress
        self.cancel = cancel
        self.step = max(1, min(_PROGRESS_STEP, total // 100))
        self.reported = -self.step

    def check(self) -> None:
        if self.cancel is not None and self.cancel.cancelled:
            raise TaskCanceled()

    def at(self, done: int) -> None:
        self.check()
        if self.progress is not None and (done - self.reported >= self.step or done >= self.total):
            self.reported = done
            self.progress(min(done, self.total), self.total)


def _write_image(
    pieces: Sequence[Path],
    out: Path,
    what: str,
    body: Callable[[_Disk, _Sink, _Ticker], None],
    progress: ProgressFn | None,
    cancel: Cancellable | None,
    check: Callable[[int], None] = lambda size: None,
) -> str:
    out = Path(out)
    disk = _Disk(pieces, out)
    try:
        check(disk.size)
        ticker = _Ticker(disk.size, progress, cancel)
        ticker.at(0)
        started = time.monotonic()
        with _output(out) as tmp:
            fd = os.open(tmp, os.O_WRONLY)
            sink = _Sink(fd)
            try:
                body(disk, sink, ticker)
                disk.check_unchanged()
                ticker.at(disk.size)
                checksum = sink.finish()
            except OSError as exc:
                raise DiskError(f"Cannot write {out}: {exc.strerror or exc}.") from exc
            finally:
                sink.close()
                os.close(fd)
        log.info("wrote %s (%s, %d bytes of disk, %d bytes of image) in %.1f s", out, what, disk.size,
                 sink.position, time.monotonic() - started)
        return checksum
    finally:
        disk.close()


def _check_sectors(fmt: str, limit: int) -> Callable[[int], None]:
    def check(size: int) -> None:
        if size <= 0 or size % SECTOR:
            raise DiskError(f"A {fmt} disk must be a whole number of 512-byte sectors; the pieces hold {size} bytes.")
        if size > limit:
            raise DiskError(f"A {fmt} disk holds at most {limit // GiB} GiB; the pieces hold {size / GiB:.1f} GiB.")
    return check


def _block_loop(disk: _Disk, sink: _Sink, ticker: _Ticker, present: bytearray, block_size: int,
                before_block: bytes = b"") -> None:
    """Each present block in order (after ``before_block``, e.g. a VHD sector bitmap), whole; bytes past
    the disk's end are zeros, written as a hole."""
    for index, flag in enumerate(present):
        offset = index * block_size
        ticker.at(offset)
        if not flag:
            continue
        if before_block:
            sink.write(before_block)
        view = sink.buffer(min(block_size, disk.size - offset))
        disk.read_into(view, offset)
        sink.write(view)
        sink.zeros(block_size - len(view))


# --- raw -----------------------------------------------------------------------------------------------


def write_raw(
    pieces: Sequence[Path], out: Path, *, progress: ProgressFn | None = None, cancel: Cancellable | None = None
) -> str:
    """The pieces concatenated into the sparse raw disk ``out``; returns its checksum. Holes
    are hashed as the zeros they read as (whole blocks of zeros at no cost)."""
    return _write_image(pieces, out, "raw", _write_flat, progress, cancel)


def _write_flat(disk: _Disk, sink: _Sink, ticker: _Ticker) -> None:
    for start, end in disk.data_extents():
        sink.pad_to(start)
        while sink.position < end:
            ticker.at(sink.position)
            count = min(_CHUNK - sink.position % _CHUNK, end - sink.position)
            chunk = sink.buffer(count)
            disk.read_into(chunk, sink.position)
            if bytes(chunk) == _ZEROS[:count]:  # memcmp; a memoryview would compare item by item
                sink.zeros(count)
            else:
                sink.write(chunk)
    sink.pad_to(disk.size)


# --- VHD -----------------------------------------------------------------------------------------------

_VHD_FOOTER = struct.Struct(">8sIIQI4sI4sQQHBBII16sB427x")  # 512 bytes
_VHD_DYNAMIC_HEADER = struct.Struct(">8sQQIIII16sI4x512s192s256x")  # 1024 bytes
_VHD_BLOCK = 2 * MiB
_VHD_BITMAP = 512  # one bit per sector of a 2 MiB block, a sector in all
_VHD_FIXED, _VHD_DYNAMIC = 2, 3
_VHD_EPOCH = 946684800  # 2000-01-01 00:00:00 UTC, where VHD timestamps count from
_VHD_MAX = 2040 * GiB  # qemu's limit for VHD; Hyper-V's is 2040 GiB too
#: "win " (Hyper-V): readers that choose by creator then take the footer's size, not the CHS geometry.
_VHD_CREATOR = b"win "
_VHD_CREATOR_VERSION = 0x000A0000
_VHD_HOST_WINDOWS = b"Wi2k"


def _chs(size: int) -> tuple[int, int, int]:
    """Cylinders, heads and sectors per track for a disk of ``size`` bytes, as the VHD specification
    computes them (the geometry's capacity may be a little less than the disk; the footer's size rules)."""
    total = min(size // SECTOR, 65535 * 16 * 255)
    if total >= 65535 * 16 * 63:
        sectors, heads = 255, 16
        cylinder_heads = total // sectors
    else:
        sectors = 17
        cylinder_heads = total // sectors
        heads = max(4, (cylinder_heads + 1023) // 1024)
        if cylinder_heads >= heads * 1024 or heads > 16:
            sectors, heads = 31, 16
            cylinder_heads = total // sectors
        if cylinder_heads >= heads * 1024:
            sectors, heads = 63, 16
            cylinder_heads = total // sectors
    return cylinder_heads // heads, heads, sectors


def _vhd_checksum(data: bytes) -> int:
    return ~sum(data) & 0xFFFFFFFF


def _vhd_footer(size: int, disk_type: int, data_offset: int, unique_id: uuid.UUID) -> bytes:
    cylinders, heads, sectors = _chs(size)
    fields = [b"conectix", 2, 0x00010000, data_offset, int(time.time()) - _VHD_EPOCH, _VHD_CREATOR,
              _VHD_CREATOR_VERSION, _VHD_HOST_WINDOWS, size, size, cylinders, heads, sectors, disk_type, 0,
              unique_id.bytes, 0]
    blank = _VHD_FOOTER.pack(*fields)
    fields[14] = _vhd_checksum(blank)
    return _VHD_FOOTER.pack(*fields)


def write_vhd_fixed(
    pieces: Sequence[Path], out: Path, *, progress: ProgressFn | None = None, cancel: Cancellable | None = None
) -> str:
    """A fixed VHD of the pieces (the sparse raw disk and a footer); returns its checksum.
    qemu reads it as VHD only when told (``-f vpc``): it probes a fixed VHD as raw."""
    def body(disk: _Disk, sink: _Sink, ticker: _Ticker) -> None:
        _write_flat(disk, sink, ticker)
        sink.write(_vhd_footer(disk.size, _VHD_FIXED, 0xFFFFFFFFFFFFFFFF, uuid.uuid4()))

    return _write_image(pieces, out, "fixed VHD", body, progress, cancel, _check_sectors("VHD", _VHD_MAX))


def write_vhd_dynamic(
    pieces: Sequence[Path],
    out: Path,
    *,
    skip_zero_blocks: bool = False,
    progress: ProgressFn | None = None,
    cancel: Cancellable | None = None,
) -> str:
    """A dynamic VHD of the pieces with 2 MiB blocks, only blocks that touch data stored (with
    ``skip_zero_blocks``, only those that are not all zeros); returns its checksum."""
    def body(disk: _Disk, sink: _Sink, ticker: _Ticker) -> None:
        present = _present_blocks(disk, _VHD_BLOCK, ticker, skip_zero_blocks)
        footer = _vhd_footer(disk.size, _VHD_DYNAMIC, SECTOR, uuid.uuid4())
        table_offset = SECTOR + _VHD_DYNAMIC_HEADER.size
        table_bytes = -(-len(present) * 4 // SECTOR) * SECTOR
        fields: list[object] = [b"cxsparse", 0xFFFFFFFFFFFFFFFF, table_offset, 0x00010000, len(present),
                                _VHD_BLOCK, 0, bytes(16), 0, bytes(512), bytes(192)]
        fields[6] = _vhd_checksum(_VHD_DYNAMIC_HEADER.pack(*fields))
        table = array.array("I", [0xFFFFFFFF]) * (table_bytes // 4)
        next_sector = (table_offset + table_bytes) // SECTOR
        for index, flag in enumerate(present):
            if flag:
                table[index] = next_sector
                next_sector += (_VHD_BITMAP + _VHD_BLOCK) // SECTOR
        if sys.byteorder == "little":
            table.byteswap()
        sink.write(footer)
        sink.write(_VHD_DYNAMIC_HEADER.pack(*fields))
        sink.write(table.tobytes())
        _block_loop(disk, sink, ticker, present, _VHD_BLOCK, before_block=b"\xff" * _VHD_BITMAP)
        sink.write(footer)

    return _write_image(pieces, out, "dynamic VHD", body, progress, cancel, _check_sectors("VHD", _VHD_MAX))


# --- VHDX ----------------------------------------------------------------------------------------------

_VHDX_HEADER = struct.Struct("<4sIQ16s16s16sHHIQ")
_VHDX_REGION_TABLE = struct.Struct("<4sIII")
_VHDX_REGION = struct.Struct("<16sQII")
_VHDX_METADATA_TABLE = struct.Struct("<8sHH20x")
_VHDX_METADATA = struct.Struct("<16sIII4x")
_VHDX_BAT_GUID = uuid.UUID("2DC27766-F623-4200-9D64-115E9BFD4A08")
_VHDX_METADATA_GUID = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E")
_VHDX_FILE_PARAMETERS = uuid.UUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
_VHDX_VIRTUAL_DISK_SIZE = uuid.UUID("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
_VHDX_PAGE_83 = uuid.UUID("BECA12AB-B2E6-4523-93EF-C309E000C746")
_VHDX_LOGICAL_SECTOR = uuid.UUID("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
_VHDX_PHYSICAL_SECTOR = uuid.UUID("CDA348C7-445D-4471-9CC9-E9885251C556")
_VHDX_IS_VIRTUAL_DISK, _VHDX_IS_REQUIRED = 2, 4
_VHDX_PAYLOAD_ZERO, _VHDX_PAYLOAD_FULLY_PRESENT = 2, 6
_VHDX_MAX = 64 * 1024 * GiB
# The file's fixed layout: headers and region tables in the first MiB, then the log, the metadata, the BAT.
_VHDX_HEADER_AT = (64 * KiB, 128 * KiB)
_VHDX_REGION_TABLE_AT = (192 * KiB, 256 * KiB)
_VHDX_LOG_AT, _VHDX_LOG_SIZE = MiB, MiB
_VHDX_METADATA_AT, _VHDX_METADATA_SIZE = 2 * MiB, MiB
_VHDX_BAT_AT = 3 * MiB
#: The payload block size LayerDesk writes: the smallest VHDX allows. NTFS-3G spreads a volume's files over
#: it with gaps of free clusters between them (its allocator moves its position 4,096 clusters past each new
#: allocation, then fills the gaps on later passes: a 1.6 GiB apply of a Windows-size layer on a 6 GiB disk
#: gave 1,273 runs of data, half the gaps 16 KiB or less); a block touching any data is stored whole, so
#: with 2 MiB blocks the image held 1.48× the volume's data, with 1 MiB blocks 1.19×.
VHDX_BLOCK = MiB


def write_vhdx(
    pieces: Sequence[Path],
    out: Path,
    *,
    block_size: int = VHDX_BLOCK,
    skip_zero_blocks: bool = False,
    progress: ProgressFn | None = None,
    cancel: Cancellable | None = None,
) -> str:
    """A dynamic VHDX of the pieces (``block_size``: a power of two from 1 to 256 MiB), only blocks that
    touch data stored (with ``skip_zero_blocks``, only those that are not all zeros); returns its
    checksum."""
    if block_size < MiB or block_size > 256 * MiB or block_size & (block_size - 1):
        raise DiskError(f"A VHDX block size is a power of two from 1 MiB to 256 MiB, not {block_size}.")

    def body(disk: _Disk, sink: _Sink, ticker: _Ticker) -> None:
        present = _present_blocks(disk, block_size, ticker, skip_zero_blocks)
        bat_size = vhdx_bat_size(len(present), block_size)
        locations: list[int | None] = []
        next_block = _VHDX_BAT_AT + bat_size
        for flag in present:
            locations.append(next_block if flag else None)
            next_block += block_size if flag else 0
        for at, data in vhdx_front(disk.size, block_size, locations):
            sink.pad_to(at)
            sink.write(data)
        _block_loop(disk, sink, ticker, present, block_size)

    return _write_image(pieces, out, "dynamic VHDX", body, progress, cancel, _check_sectors("VHDX", _VHDX_MAX))


def vhdx_bat_size(blocks: int, block_size: int) -> int:
    """Bytes of the BAT region (a whole number of MiB) for a disk of ``blocks`` payload blocks."""
    chunk_ratio = (1 << 23) * SECTOR // block_size  # payload blocks per sector bitmap block
    entries = blocks + (blocks - 1) // chunk_ratio
    return -(-entries * 8 // MiB) * MiB


def vhdx_front(disk_size: int, block_size: int, locations: Sequence[int | None]) -> list[tuple[int, bytes]]:
    """What a dynamic VHDX holds before its payload blocks, as ``(file offset, bytes)`` in file order: the
    file type identifier, the headers, the region tables, the metadata and the whole BAT region (zero
    padded), which starts at 3 MiB. ``locations`` gives each payload block's file offset (a multiple of
    1 MiB), or ``None`` for a block left out (``PAYLOAD_BLOCK_ZERO``). The log (1–2 MiB) stays zeros:
    there is nothing to replay."""
    chunk_ratio = (1 << 23) * SECTOR // block_size
    bat_size = vhdx_bat_size(len(locations), block_size)
    bat = array.array("Q", bytes(bat_size))  # sector bitmap entries stay 0: SB_BLOCK_NOT_PRESENT
    for index, location in enumerate(locations):
        if location is not None and location % MiB:
            raise AssertionError(f"layout error: block {index} at {location}, not on a MiB")
        bat[index + index // chunk_ratio] = (_VHDX_PAYLOAD_ZERO if location is None
                                             else location | _VHDX_PAYLOAD_FULLY_PRESENT)
    if sys.byteorder == "big":
        bat.byteswap()
    file_write, data_write = uuid.uuid4(), uuid.uuid4()
    front = [(0, b"vhdxfile" + "LayerDesk".encode("utf-16-le"))]
    front += [(at, _vhdx_header(sequence, file_write, data_write))
              for sequence, at in enumerate(_VHDX_HEADER_AT, start=1)]
    table = _vhdx_region_table([(_VHDX_BAT_GUID, _VHDX_BAT_AT, bat_size),
                                (_VHDX_METADATA_GUID, _VHDX_METADATA_AT, _VHDX_METADATA_SIZE)])
    front += [(at, table) for at in _VHDX_REGION_TABLE_AT]
    front += [(_VHDX_METADATA_AT, _vhdx_metadata(disk_size, block_size)), (_VHDX_BAT_AT, bat.tobytes())]
    return front


def _vhdx_header(sequence: int, file_write: uuid.UUID, data_write: uuid.UUID) -> bytes:
    """One 4 KiB header: no log to replay (log GUID zero), the log's place, its CRC-32C."""
    def pack(checksum: int) -> bytes:
        fields = _VHDX_HEADER.pack(b"head", checksum, sequence, file_write.bytes_le, data_write.bytes_le,
                                   bytes(16), 0, 1, _VHDX_LOG_SIZE, _VHDX_LOG_AT)
        return fields + bytes(4 * KiB - len(fields))
    return pack(crc32c(pack(0)))


def _vhdx_region_table(regions: Sequence[tuple[uuid.UUID, int, int]]) -> bytes:
    """A 64 KiB region table (every region required), with its CRC-32C."""
    entries = b"".join(_VHDX_REGION.pack(guid.bytes_le, offset, length, 1) for guid, offset, length in regions)

    def pack(checksum: int) -> bytes:
        data = _VHDX_REGION_TABLE.pack(b"regi", checksum, len(regions), 0) + entries
        return data + bytes(64 * KiB - len(data))
    return pack(crc32c(pack(0)))


def _vhdx_metadata(size: int, block_size: int) -> bytes:
    """The metadata table and its items (items from 64 KiB into the region, as the spec asks)."""
    items = [
        (_VHDX_FILE_PARAMETERS, struct.pack("<II", block_size, 0), _VHDX_IS_REQUIRED),  # no parent, blocks not kept
        (_VHDX_VIRTUAL_DISK_SIZE, struct.pack("<Q", size), _VHDX_IS_VIRTUAL_DISK | _VHDX_IS_REQUIRED),
        (_VHDX_PAGE_83, uuid.uuid4().bytes_le, _VHDX_IS_VIRTUAL_DISK | _VHDX_IS_REQUIRED),
        (_VHDX_LOGICAL_SECTOR, struct.pack("<I", SECTOR), _VHDX_IS_VIRTUAL_DISK | _VHDX_IS_REQUIRED),
        (_VHDX_PHYSICAL_SECTOR, struct.pack("<I", PHYSICAL_SECTOR), _VHDX_IS_VIRTUAL_DISK | _VHDX_IS_REQUIRED),
    ]
    table = bytearray(_VHDX_METADATA_TABLE.pack(b"metadata", 0, len(items)))
    data = bytearray()
    for guid, value, flags in items:
        table += _VHDX_METADATA.pack(guid.bytes_le, 64 * KiB + len(data), len(value), flags)
        data += value
    return bytes(table) + bytes(64 * KiB - len(table)) + bytes(data)
