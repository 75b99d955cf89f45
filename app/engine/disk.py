"""Disk images around NTFS volumes: partition tables, disk layouts, extraction and format conversion.

The engine composites layers into one NTFS volume image; this module puts a bootable disk around it and
takes one apart again:

* :func:`read_partition_table` reads an MBR or a GPT (primary header and entries with their CRC32s, the
  backup GPT at the end of the disk when the primary one is damaged) from a raw disk file or any readable,
  seekable file object. :meth:`PartitionTable.ntfs_data_partition` finds the Windows volume,
  :meth:`PartitionTable.boot_partitions` the partitions Windows boots with (ESP, MSR, recovery; the
  active partition of an MBR disk).
* :func:`build_gpt_disk` writes a sparse raw disk: protective MBR, primary and backup GPT, an ESP
  formatted FAT32 (``mkfs.fat``), an MSR and the NTFS volume spliced in at its partition's offset, all
  1 MiB aligned, keeping the disk and partition GUIDs it is given (an OS layer's identities must survive
  for the image to boot). :func:`build_mbr_disk` does the same with one active NTFS partition.
  :func:`build_gpt_pieces` writes only what comes before and after the volume (``prefix.raw`` and
  ``suffix.raw``), so that ``qemu-img convert`` can read prefix + volume + suffix as one disk
  (:func:`convert` takes the three paths) without a raw disk ever being written.
* :func:`extract_ntfs_volume` copies the NTFS partition out of a disk image of any format qemu-img
  reads (raw, VHD fixed or dynamic, VHDX, VMDK, qcow2), reading it through qemu-img without converting
  the whole disk first, and returns the partition table with it.
* :func:`convert` writes a raw disk (or the pieces) in one of the output formats of :data:`DiskFormat`
  with ``qemu-img convert``, reporting progress and honouring a cancel, and verifies the result
  (:func:`verify_image`) before it appears under its final name.

qemu-img 7.2 rules learned while measuring (DESIGN.md §4), enforced here: a dynamic VHD needs
``force_size=on`` (else CHS rounding grows the disk and the backup GPT is no longer at its end); a fixed
VHD is probed as raw, so a ``conectix`` footer in the last 512 bytes is looked for; VHDX is written
dynamic with 1 MiB blocks (DESIGN.md's 2 MiB stores a fifth more: see :data:`app.engine.vhd.VHDX_BLOCK`).
``qemu-img convert -p`` ends its progress lines with a carriage return: :func:`app.procs.stream` reads the
program's output as text with universal newlines, which turns each ``\\r`` into a line end, so no change to
the runner is needed.

Sectors are 512 bytes for everything written here. The reader also recognises a GPT with 4096-byte
sectors (header at byte 4096), a path no test covers yet (no 4Kn disk image can be made without a loop
device).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import secrets
import struct
import tempfile
import uuid
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from app import procs
from app.engine.checksum import Known, file_checksum
from app.errors import EnvironmentProblem, UserError
from app.procs import Cancellable
from app.tasks.base import TaskCanceled

log = logging.getLogger(__name__)

__all__ = [
    "BASIC_DATA_TYPE",
    "ESP_TYPE",
    "MSR_TYPE",
    "RECOVERY_TYPE",
    "ByteSource",
    "DiskError",
    "DiskFormat",
    "DiskLayout",
    "ExtractedVolume",
    "ImageInfo",
    "Partition",
    "PartitionTable",
    "ProgressFn",
    "Role",
    "build_gpt_disk",
    "build_gpt_pieces",
    "build_mbr_disk",
    "check_image",
    "convert",
    "convert_hashed",
    "extract_ntfs_volume",
    "extract_partition",
    "gpt_entry",
    "gpt_head_and_tail",
    "gpt_layout",
    "image_info",
    "mbr_chs",
    "mbr_layout",
    "read_image_partition_table",
    "read_partition_table",
    "verify_image",
]

KiB = 1024
MiB = 1024 * KiB
SECTOR = 512
_ALIGN = MiB
_COPY_CHUNK = MiB
_READ_CHUNK = MiB  # what one qemu-img run fetches when a partition table is read from a non-raw image

ESP_TYPE = uuid.UUID("C12A7328-F81F-11D2-BA4B-00A0C93EC93B")
MSR_TYPE = uuid.UUID("E3C9E316-0B5C-4DB8-817D-F92DF00215AE")
BASIC_DATA_TYPE = uuid.UUID("EBD0A0A2-B9E5-4433-87C0-68B6B72699C7")
RECOVERY_TYPE = uuid.UUID("DE94BBA4-06D1-4D40-A16A-BFD50179D6AC")

_MBR_NTFS = 0x07
_MBR_RECOVERY = 0x27
_MBR_PROTECTIVE = 0xEE
_MBR_EXTENDED = frozenset({0x05, 0x0F, 0x85})
_BOOT_SIGNATURE = b"\x55\xaa"
_NTFS_OEM = b"NTFS    "
_GPT_SIGNATURE = b"EFI PART"
_GPT_REVISION = 0x00010000
_GPT_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")  # 92 bytes
_GPT_ENTRY = struct.Struct("<16s16sQQQ72s")  # 128 bytes
_GPT_ENTRIES = 128
_GPT_ENTRY_SIZE = 128
_GPT_ENTRY_SECTORS = _GPT_ENTRIES * _GPT_ENTRY_SIZE // SECTOR  # 32
_MBR_ENTRY = struct.Struct("<B3sB3sII")
_VHD_FOOTER = b"conectix"

#: ``(bytes done, bytes in all)``, as in :data:`app.engine.wim.ProgressFn`.
ProgressFn = Callable[[int, int], None]

Role = Literal["esp", "msr", "data"]
_ROLES: tuple[Role, ...] = ("esp", "msr", "data")
_NAMES: dict[Role, str] = {
    "esp": "EFI system partition",
    "msr": "Microsoft reserved partition",
    "data": "Basic data partition",
}
_TYPES: dict[Role, uuid.UUID] = {"esp": ESP_TYPE, "msr": MSR_TYPE, "data": BASIC_DATA_TYPE}

DiskFormat = Literal["vhd-dynamic", "vhd-fixed", "vhdx", "vmdk-stream", "vmdk-sparse", "qcow2", "raw"]

#: qemu-img's output format and options per :data:`DiskFormat` (DESIGN.md §4).
_FORMATS: dict[DiskFormat, tuple[str, str]] = {
    "vhd-dynamic": ("vpc", "subformat=dynamic,force_size=on"),
    "vhd-fixed": ("vpc", "subformat=fixed,force_size=on"),
    "vhdx": ("vhdx", "subformat=dynamic,block_size=1M"),  # as app.engine.vhd writes it
    "vmdk-stream": ("vmdk", "subformat=streamOptimized"),
    "vmdk-sparse": ("vmdk", "subformat=monolithicSparse"),
    "qcow2": ("qcow2", ""),
    "raw": ("raw", ""),
}
#: Formats whose images ``qemu-img check`` can check; the others are verified by their size alone.
_CHECKABLE = frozenset({"qcow2", "vhdx", "vmdk", "vdi", "qed", "parallels"})
#: Formats :func:`extract_ntfs_volume` reads.
_READABLE = frozenset({"raw", "vpc", "vhdx", "vmdk", "qcow2", "vdi"})
_PROGRESS = re.compile(r"\((\d+(?:\.\d+)?)/100%\)")


class DiskError(UserError):
    """A disk image or volume that cannot be used as given: no or a damaged partition table, no NTFS
    partition, a truncated or unreadable image, a volume of the wrong size."""

    code = "disk"


class ByteSource(Protocol):
    """What :func:`read_partition_table` reads from: a seekable binary file object."""

    def seek(self, offset: int, whence: int = ..., /) -> int: ...

    def read(self, size: int = ..., /) -> bytes: ...


# --- partition tables -----------------------------------------------------------------------------


@dataclass(frozen=True)
class DiskIdentity:
    """What Windows knows its boot disk by: kept from an OS layer's gold image so the published disk
    carries the same disk GUID and partition GUIDs (GPT) or disk signature (MBR)."""

    scheme: Literal["gpt", "mbr"]
    disk_guid: uuid.UUID | None = None
    partition_guids: Mapping[Role, uuid.UUID] = field(default_factory=dict)
    mbr_signature: int | None = None

    @classmethod
    def of(cls, table: PartitionTable) -> DiskIdentity:
        return cls(table.scheme, table.disk_guid, table.partition_guids(), table.mbr_signature)

    def to_dict(self) -> dict[str, Any]:
        return {
            "scheme": self.scheme,
            "disk_guid": str(self.disk_guid) if self.disk_guid else None,
            "partition_guids": {role: str(guid) for role, guid in sorted(self.partition_guids.items())},
            "mbr_signature": self.mbr_signature,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DiskIdentity:
        scheme = data["scheme"]
        if scheme not in ("gpt", "mbr"):
            raise ValueError(f"unknown partition scheme {scheme!r}")
        roles: tuple[Role, ...] = ("esp", "msr", "data")
        guids = {role: uuid.UUID(str(data["partition_guids"][role]))
                 for role in roles if role in data.get("partition_guids", {})}
        signature = data.get("mbr_signature")
        return cls(scheme, uuid.UUID(str(data["disk_guid"])) if data.get("disk_guid") else None, guids,
                   int(signature) if signature is not None else None)


@dataclass(frozen=True)
class Partition:
    """One partition. Positions are in bytes from the start of the disk; ``index`` is 1-based (as
    sgdisk, fdisk and Windows count; MBR logical partitions start at 5)."""

    index: int
    start: int
    size: int
    type_guid: uuid.UUID | None = None  # GPT
    mbr_type: int | None = None  # MBR
    unique_guid: uuid.UUID | None = None  # GPT
    name: str = ""  # GPT
    attributes: int = 0  # GPT attribute bits
    active: bool = False  # MBR boot flag
    ntfs: bool = False  # the first sector carries the NTFS boot signature

    @property
    def end(self) -> int:
        return self.start + self.size

    @property
    def start_lba(self) -> int:
        return self.start // SECTOR

    @property
    def kind(self) -> str:
        """``esp``, ``msr``, ``recovery``, ``ntfs`` (an NTFS data partition), ``extended`` or ``other``."""
        if self.type_guid is not None:
            known = {ESP_TYPE: "esp", MSR_TYPE: "msr", RECOVERY_TYPE: "recovery"}.get(self.type_guid)
            if known:
                return known
            return "ntfs" if self.type_guid == BASIC_DATA_TYPE and self.ntfs else "other"
        if self.mbr_type == _MBR_RECOVERY:
            return "recovery"
        if self.mbr_type in _MBR_EXTENDED:
            return "extended"
        return "ntfs" if self.mbr_type == _MBR_NTFS and self.ntfs else "other"

    def describe(self) -> str:
        kind = f"type {self.type_guid}" if self.type_guid else f"type 0x{self.mbr_type or 0:02x}"
        name = f" {self.name!r}" if self.name else ""
        return f"partition {self.index}{name} ({kind}, {self.size // MiB} MiB at {self.start})"


@dataclass(frozen=True)
class PartitionTable:
    """A disk's partition table as read (or as written by the builders)."""

    scheme: Literal["gpt", "mbr"]
    disk_size: int
    partitions: tuple[Partition, ...]
    sector_size: int = SECTOR
    disk_guid: uuid.UUID | None = None  # GPT
    mbr_signature: int | None = None  # MBR disk signature (bytes 440–443 of sector 0)
    boot_code: bytes = b""  # the first 440 bytes of sector 0 (MBR boot code)
    first_usable_lba: int | None = None  # GPT
    last_usable_lba: int | None = None  # GPT
    from_backup_gpt: bool = False  # the primary GPT was damaged; this is the backup's

    def ntfs_data_partition(self) -> Partition:
        """The Windows volume: the largest NTFS partition of GPT type "basic data" (MBR type 0x07)."""
        found = [p for p in self.partitions if p.kind == "ntfs"]
        if not found:
            listed = "; ".join(p.describe() for p in self.partitions) or "none"
            raise DiskError(f"The disk has no NTFS data partition (partitions: {listed}).")
        if len(found) > 1:
            log.info("%d NTFS partitions; taking the largest as the Windows volume", len(found))
        return max(found, key=lambda p: p.size)

    def boot_partitions(self) -> tuple[Partition, ...]:
        """The partitions Windows boots with: ESP, MSR and recovery on GPT; on MBR the active partition
        (when it is not the Windows volume itself, e.g. "System Reserved") and recovery (type 0x27)."""
        if self.scheme == "gpt":
            return tuple(p for p in self.partitions if p.kind in {"esp", "msr", "recovery"})
        data = self.ntfs_data_partition() if any(p.kind == "ntfs" for p in self.partitions) else None
        return tuple(p for p in self.partitions if (p.active and p != data) or p.kind == "recovery")

    def partition_guids(self) -> dict[Role, uuid.UUID]:
        """The unique GUIDs of the ESP, the MSR and the NTFS data partition, keyed as
        :func:`build_gpt_disk` takes them (an OS layer keeps its identities)."""
        guids: dict[Role, uuid.UUID] = {}
        boot_roles: dict[str, Role] = {"esp": "esp", "msr": "msr"}
        for partition in self.partitions:
            role = boot_roles.get(partition.kind)
            if role and partition.unique_guid is not None:
                guids.setdefault(role, partition.unique_guid)
        if any(p.kind == "ntfs" for p in self.partitions):
            data = self.ntfs_data_partition()
            if data.unique_guid is not None:
                guids["data"] = data.unique_guid
        return guids


def read_partition_table(
    source: Path | str | ByteSource, *, size: int | None = None, name: str | None = None
) -> PartitionTable:
    """Read the MBR or GPT of a raw disk (a file path or a seekable binary file object).

    ``size`` limits the disk to its first ``size`` bytes (e.g. a fixed VHD without its footer); by
    default it is the file's size. A damaged primary GPT is replaced by the backup at the end of the
    disk, with a warning in the log. Raises :class:`DiskError` for anything that is not a readable,
    complete partitioned disk.
    """
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        try:
            with path.open("rb") as file:
                return read_partition_table(file, size=size, name=name or str(path))
        except FileNotFoundError as exc:
            raise DiskError(f"The disk image {path} does not exist.") from exc
    label = name or "the disk"
    end = source.seek(0, os.SEEK_END)
    disk_size = end if size is None else min(size, end)
    if size is not None and size > end:
        raise DiskError(f"{label} is truncated: it should hold {size} bytes but has only {end}.")
    return _TableReader(source, disk_size, label).read()


def _read_at(source: ByteSource, offset: int, length: int) -> bytes:
    source.seek(offset)
    parts: list[bytes] = []
    left = length
    while left > 0:
        data = source.read(left)
        if not data:
            break
        parts.append(data)
        left -= len(data)
    return b"".join(parts)


def _guid(raw: bytes) -> uuid.UUID:
    return uuid.UUID(bytes_le=raw)


@dataclass(frozen=True)
class _GptHeader:
    lba: int
    alternate_lba: int
    first_usable: int
    last_usable: int
    disk_guid: uuid.UUID
    entries_lba: int
    entry_count: int
    entry_size: int
    entries: bytes


class _TableReader:
    def __init__(self, source: ByteSource, disk_size: int, label: str) -> None:
        self.source = source
        self.disk_size = disk_size
        self.label = label

    def read(self) -> PartitionTable:
        if self.disk_size < 2 * SECTOR:
            raise DiskError(f"{self.label} ({self.disk_size} bytes) is too small to hold a partition table.")
        sector0 = _read_at(self.source, 0, SECTOR)
        if sector0[3:11] == _NTFS_OEM:
            raise DiskError(f"{self.label} is an NTFS volume image, not a partitioned disk.")
        if sector0[0x52:0x5A] == b"FAT32   " or sector0[0x36:0x3B] in {b"FAT12", b"FAT16"}:
            raise DiskError(f"{self.label} is a FAT volume image, not a partitioned disk.")
        has_mbr = sector0[510:512] == _BOOT_SIGNATURE
        entries = [_MBR_ENTRY.unpack_from(sector0, 446 + 16 * i) for i in range(4)] if has_mbr else []
        protective = any(entry[2] == _MBR_PROTECTIVE for entry in entries)
        gpt_sector = next(
            (ss for ss in (SECTOR, 4096) if _read_at(self.source, ss, 8) == _GPT_SIGNATURE), None
        )
        if protective or gpt_sector is not None:
            return self._gpt(sector0, gpt_sector)
        if has_mbr:
            return self._mbr(sector0, entries)
        raise DiskError(f"{self.label} has no partition table (neither an MBR nor a GPT was found).")

    # GPT

    def _gpt(self, sector0: bytes, sector_size: int | None) -> PartitionTable:
        sizes = [sector_size] if sector_size else [SECTOR, 4096]
        header: _GptHeader | str = "no GPT header signature at LBA 1"
        for ss in sizes:
            header = self._header(ss, 1)
            if isinstance(header, _GptHeader):
                break
        recovered = False
        if isinstance(header, str):
            primary_problem = header
            backup: _GptHeader | str = primary_problem
            for ss in sizes:
                backup_lba = self.disk_size // ss - 1
                backup = self._header(ss, backup_lba)
                if isinstance(backup, _GptHeader):
                    sector_size = ss
                    break
            if isinstance(backup, str):
                raise DiskError(
                    f"{self.label}: both GPT headers are damaged (primary at LBA 1: {primary_problem}; backup at "
                    f"the end of the disk: {backup}). The disk image may be truncated or overwritten."
                )
            log.warning(
                "%s: the primary GPT header is damaged (%s); using the backup GPT header at LBA %d",
                self.label, primary_problem, backup.lba,
            )
            header, recovered = backup, True
        else:
            sector_size = sector_size or SECTOR
            if (header.alternate_lba + 1) * sector_size > self.disk_size:
                described = (header.alternate_lba + 1) * sector_size
                raise DiskError(
                    f"{self.label} is truncated: its GPT describes a disk of {described} bytes but it holds only "
                    f"{self.disk_size}."
                )
        assert sector_size is not None
        partitions = []
        for number in range(header.entry_count):
            raw = header.entries[number * header.entry_size : number * header.entry_size + _GPT_ENTRY.size]
            type_raw, unique_raw, first, last, attributes, name_raw = _GPT_ENTRY.unpack(raw)
            if type_raw == bytes(16):
                continue
            if last < first:
                raise DiskError(f"{self.label}: GPT partition {number + 1} ends (LBA {last}) before it starts.")
            start, size = first * sector_size, (last - first + 1) * sector_size
            self._check_inside(number + 1, start, size)
            partitions.append(
                Partition(
                    index=number + 1,
                    start=start,
                    size=size,
                    type_guid=_guid(type_raw),
                    unique_guid=_guid(unique_raw),
                    name=name_raw.decode("utf-16-le", "replace").split("\0", 1)[0],
                    attributes=attributes,
                    ntfs=self._is_ntfs(start),
                )
            )
        return PartitionTable(
            scheme="gpt",
            disk_size=self.disk_size,
            partitions=tuple(partitions),
            sector_size=sector_size,
            disk_guid=header.disk_guid,
            boot_code=sector0[:440],
            first_usable_lba=header.first_usable,
            last_usable_lba=header.last_usable,
            from_backup_gpt=recovered,
        )

    def _header(self, sector_size: int, lba: int) -> _GptHeader | str:
        """The GPT header at ``lba`` with its entries, or why it cannot be used."""
        if lba < 1 or (lba + 1) * sector_size > self.disk_size:
            return "it lies beyond the end of the disk"
        raw = _read_at(self.source, lba * sector_size, sector_size)
        if raw[:8] != _GPT_SIGNATURE:
            return "no GPT header signature"
        (_, _, header_size, crc, _, my_lba, alternate, first_usable, last_usable, disk_guid, entries_lba,
         count, entry_size, entries_crc) = _GPT_HEADER.unpack_from(raw)
        if not _GPT_HEADER.size <= header_size <= sector_size:
            return f"impossible header size {header_size}"
        if zlib.crc32(raw[:16] + b"\0\0\0\0" + raw[20:header_size]) != crc:
            return "header CRC32 mismatch"
        if my_lba != lba:
            return f"the header says it lies at LBA {my_lba}"
        if entry_size < _GPT_ENTRY.size or entry_size % 8 or not 0 < count * entry_size <= 4 * MiB:
            return f"impossible partition entry array ({count} entries of {entry_size} bytes)"
        entries = _read_at(self.source, entries_lba * sector_size, count * entry_size)
        if len(entries) != count * entry_size:
            return "its partition entries lie beyond the end of the disk"
        if zlib.crc32(entries) != entries_crc:
            return "partition entries CRC32 mismatch"
        return _GptHeader(lba, alternate, first_usable, last_usable, _guid(disk_guid), entries_lba, count,
                          entry_size, entries)

    # MBR

    def _mbr(self, sector0: bytes, entries: list[tuple[int, bytes, int, bytes, int, int]]) -> PartitionTable:
        if any(status not in {0x00, 0x80} for status, *_ in entries):
            raise DiskError(f"{self.label} has no partition table (sector 0 is not a valid MBR).")
        partitions: list[Partition] = []
        for slot, (status, _, kind, _, first, count) in enumerate(entries):
            if kind == 0 or count == 0:
                continue
            start, size = first * SECTOR, count * SECTOR
            self._check_inside(slot + 1, start, size)
            partitions.append(Partition(slot + 1, start, size, mbr_type=kind, active=status == 0x80,
                                        ntfs=self._is_ntfs(start)))
            if kind in _MBR_EXTENDED:
                partitions += self._logical(first)
        return PartitionTable(
            scheme="mbr",
            disk_size=self.disk_size,
            partitions=tuple(partitions),
            mbr_signature=struct.unpack_from("<I", sector0, 440)[0],
            boot_code=sector0[:440],
        )

    def _logical(self, extended_lba: int) -> list[Partition]:
        """The logical partitions of an extended partition (its chain of EBRs)."""
        found: list[Partition] = []
        ebr_lba, seen = extended_lba, set[int]()
        while ebr_lba not in seen and len(seen) < 128:
            seen.add(ebr_lba)
            ebr = _read_at(self.source, ebr_lba * SECTOR, SECTOR)
            if len(ebr) < SECTOR or ebr[510:512] != _BOOT_SIGNATURE:
                raise DiskError(f"{self.label}: the extended partition's boot record at LBA {ebr_lba} is damaged.")
            status, _, kind, _, first, count = _MBR_ENTRY.unpack_from(ebr, 446)
            if kind and count:
                start, size = (ebr_lba + first) * SECTOR, count * SECTOR
                self._check_inside(5 + len(found), start, size)
                found.append(Partition(5 + len(found), start, size, mbr_type=kind, active=status == 0x80,
                                       ntfs=self._is_ntfs(start)))
            _, _, next_kind, _, next_first, _ = _MBR_ENTRY.unpack_from(ebr, 462)
            if next_kind not in _MBR_EXTENDED or next_first == 0:
                break
            ebr_lba = extended_lba + next_first
        return found

    # both

    def _check_inside(self, index: int, start: int, size: int) -> None:
        if start + size > self.disk_size:
            raise DiskError(
                f"{self.label} is truncated: partition {index} ends at byte {start + size} but the disk holds "
                f"only {self.disk_size} bytes."
            )

    def _is_ntfs(self, start: int) -> bool:
        return _read_at(self.source, start + 3, 8) == _NTFS_OEM


# --- layouts --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiskLayout:
    """Where the partitions of a disk built here lie (bytes). For MBR disks ``esp_size`` and ``msr_size``
    are 0. Make the NTFS volume with ``make_ntfs_volume(path, layout.data_size,
    partition_start_sector=layout.data_start_lba)``."""

    disk_size: int
    esp_start: int
    esp_size: int
    msr_start: int
    msr_size: int
    data_start: int
    data_size: int

    @property
    def data_start_lba(self) -> int:
        return self.data_start // SECTOR

    @property
    def data_end(self) -> int:
        return self.data_start + self.data_size


def gpt_layout(disk_size: int, *, esp_size: int = 100 * MiB, msr_size: int = 16 * MiB) -> DiskLayout:
    """ESP at 1 MiB, then the MSR, then the NTFS data partition up to the last whole MiB before the
    backup GPT. Every size is a multiple of 1 MiB."""
    for what, value in (("disk size", disk_size), ("ESP size", esp_size), ("MSR size", msr_size)):
        if value <= 0 or value % _ALIGN:
            raise DiskError(f"The {what} must be a positive multiple of 1 MiB; {value} bytes were asked for.")
    if esp_size < 36 * MiB:
        raise DiskError(f"An ESP formatted FAT32 needs at least 36 MiB; {esp_size // MiB} MiB were asked for.")
    esp_start = _ALIGN
    msr_start = esp_start + esp_size
    data_start = msr_start + msr_size
    data_end = (disk_size - (_GPT_ENTRY_SECTORS + 1) * SECTOR) // _ALIGN * _ALIGN
    if data_end - data_start < 8 * MiB:
        raise DiskError(
            f"A disk of {disk_size // MiB} MiB leaves no room for a Windows volume after the ESP and the MSR."
        )
    return DiskLayout(disk_size, esp_start, esp_size, msr_start, msr_size, data_start, data_end - data_start)


def mbr_layout(disk_size: int) -> DiskLayout:
    """One NTFS partition from 1 MiB to the end of the disk."""
    if disk_size <= 0 or disk_size % _ALIGN:
        raise DiskError(f"The disk size must be a positive multiple of 1 MiB; {disk_size} bytes were asked for.")
    if disk_size // SECTOR > 0xFFFFFFFF:
        raise DiskError("An MBR disk cannot be larger than 2 TiB; build a GPT disk.")
    if disk_size < 9 * MiB:
        raise DiskError(f"A disk of {disk_size // MiB} MiB leaves no room for a Windows volume.")
    return DiskLayout(disk_size, 0, 0, 0, 0, _ALIGN, disk_size - _ALIGN)


# --- writing disks --------------------------------------------------------------------------------


def build_gpt_disk(
    volume: Path,
    out_raw: Path,
    *,
    disk_size: int,
    esp_size: int = 100 * MiB,
    msr_size: int = 16 * MiB,
    disk_guid: uuid.UUID | None = None,
    partition_guids: Mapping[Role, uuid.UUID] | None = None,
    progress: ProgressFn | None = None,
    cancel: Cancellable | None = None,
) -> PartitionTable:
    """Write a sparse raw GPT disk of ``disk_size`` bytes around the NTFS volume image ``volume``.

    The volume must be exactly :func:`gpt_layout`'s ``data_size``; its boot sector's "hidden sectors"
    (the partition's start, which Windows boots by) is corrected in the copy if it differs. GUIDs not
    given (``partition_guids`` keys ``esp``, ``msr``, ``data``) are made up. The disk appears under
    ``out_raw`` only when complete. Returns the table written.
    """
    layout = gpt_layout(disk_size, esp_size=esp_size, msr_size=msr_size)
    table, head, tail = _gpt_structures(layout, disk_guid, partition_guids)
    volume = Path(volume)
    fixups = _check_volume(volume, layout, allow_fixups=True)
    _check_cancel(cancel)
    with _output(Path(out_raw)) as tmp:
        with tmp.open("r+b") as out:
            out.truncate(disk_size)
            out.seek(0)
            out.write(head)
            out.seek(disk_size - len(tail))
            out.write(tail)
        _format_esp(tmp, layout, table)
        _splice(volume, tmp, layout.data_start, fixups, progress, cancel)
    return table


def build_gpt_pieces(
    volume: Path,
    prefix_out: Path,
    suffix_out: Path,
    *,
    disk_size: int,
    esp_size: int = 100 * MiB,
    msr_size: int = 16 * MiB,
    disk_guid: uuid.UUID | None = None,
    partition_guids: Mapping[Role, uuid.UUID] | None = None,
) -> PartitionTable:
    """Write what a GPT disk holds before and after its NTFS volume as two sparse raw files, so that
    ``convert([prefix_out, volume, suffix_out], ...)`` writes the disk without a raw copy of it.

    The volume is not copied, so it cannot be corrected: it must be exactly :func:`gpt_layout`'s
    ``data_size`` and made for its offset (``make_ntfs_volume(..., partition_start_sector=
    layout.data_start_lba)``). Same GUID rules as :func:`build_gpt_disk`.
    """
    layout = gpt_layout(disk_size, esp_size=esp_size, msr_size=msr_size)
    table, head, tail = _gpt_structures(layout, disk_guid, partition_guids)
    _check_volume(Path(volume), layout, allow_fixups=False)
    with _output(Path(prefix_out)) as prefix:
        with prefix.open("r+b") as out:
            out.truncate(layout.data_start)
            out.seek(0)
            out.write(head)
        _format_esp(prefix, layout, table)
        with _output(Path(suffix_out)) as suffix, suffix.open("r+b") as out:
            out.truncate(disk_size - layout.data_end)
            out.seek(disk_size - layout.data_end - len(tail))
            out.write(tail)
    return table


def build_mbr_disk(
    volume: Path,
    out_raw: Path,
    *,
    disk_size: int,
    disk_signature: int | None = None,
    boot_code: bytes = b"",
    progress: ProgressFn | None = None,
    cancel: Cancellable | None = None,
) -> PartitionTable:
    """Write a sparse raw MBR disk with one active NTFS partition (type 0x07) at 1 MiB holding
    ``volume`` (exactly :func:`mbr_layout`'s ``data_size``; its hidden sectors are corrected in the copy).

    ``disk_signature`` (Windows finds its volumes by it) is kept when given, else made up. ``boot_code``
    (at most 440 bytes, e.g. :attr:`PartitionTable.boot_code` of the disk the volume came from) goes
    before the table; without it the disk cannot boot by BIOS until boot code is written to it (e.g.
    ``bootsect /nt60``).
    """
    layout = mbr_layout(disk_size)
    if len(boot_code) > 440:
        raise DiskError(f"MBR boot code is at most 440 bytes; {len(boot_code)} were given.")
    signature = disk_signature if disk_signature is not None else secrets.randbelow(0xFFFFFFFF) + 1
    if not 0 <= signature <= 0xFFFFFFFF:
        raise DiskError(f"An MBR disk signature is a 32-bit number; {signature} was given.")
    sector0 = bytearray(SECTOR)
    sector0[: len(boot_code)] = boot_code
    struct.pack_into("<I", sector0, 440, signature)
    first, count = layout.data_start_lba, layout.data_size // SECTOR
    struct.pack_into("<B3sB3sII", sector0, 446, 0x80, _chs(first), _MBR_NTFS, _chs(first + count - 1), first, count)
    sector0[510:512] = _BOOT_SIGNATURE
    volume = Path(volume)
    fixups = _check_volume(volume, layout, allow_fixups=True)
    _check_cancel(cancel)
    with _output(Path(out_raw)) as tmp:
        with tmp.open("r+b") as out:
            out.truncate(disk_size)
            out.seek(0)
            out.write(sector0)
        _splice(volume, tmp, layout.data_start, fixups, progress, cancel)
    data = Partition(1, layout.data_start, layout.data_size, mbr_type=_MBR_NTFS, active=True, ntfs=True)
    return PartitionTable("mbr", disk_size, (data,), mbr_signature=signature, boot_code=bytes(sector0[:440]))


def _chs(lba: int) -> bytes:
    """CHS address of ``lba`` for 255 heads and 63 sectors per track (1023/254/63 past the CHS limit)."""
    cylinder, rest = divmod(lba, 255 * 63)
    head, sector = divmod(rest, 63)
    if cylinder > 1023:
        cylinder, head, sector = 1023, 254, 62
    return bytes((head, (sector + 1) | ((cylinder >> 2) & 0xC0), cylinder & 0xFF))


def _gpt_structures(
    layout: DiskLayout, disk_guid: uuid.UUID | None, partition_guids: Mapping[Role, uuid.UUID] | None
) -> tuple[PartitionTable, bytes, bytes]:
    """The table and the bytes of LBA 0–33 (protective MBR, primary GPT) and of the disk's last 33
    sectors (backup entries, backup header)."""
    guids = dict(partition_guids or {})
    unknown = set(guids) - set(_ROLES)
    if unknown:
        raise DiskError(f"Unknown partition roles {sorted(unknown)}; use esp, msr and data.")
    disk_guid = disk_guid or uuid.uuid4()
    total = layout.disk_size // SECTOR
    spans = {
        "esp": (layout.esp_start, layout.esp_size),
        "msr": (layout.msr_start, layout.msr_size),
        "data": (layout.data_start, layout.data_size),
    }
    partitions = []
    entries = bytearray(_GPT_ENTRIES * _GPT_ENTRY_SIZE)
    for number, role in enumerate(_ROLES):
        start, size = spans[role]
        unique = guids.get(role) or uuid.uuid4()
        _GPT_ENTRY.pack_into(
            entries, number * _GPT_ENTRY_SIZE, _TYPES[role].bytes_le, unique.bytes_le, start // SECTOR,
            (start + size) // SECTOR - 1, 0, _NAMES[role].encode("utf-16-le"),
        )
        partitions.append(Partition(number + 1, start, size, type_guid=_TYPES[role], unique_guid=unique,
                                    name=_NAMES[role], ntfs=role == "data"))
    head, tail = gpt_head_and_tail(bytes(entries), layout.disk_size, disk_guid)
    first_usable, last_usable = 2 + _GPT_ENTRY_SECTORS, total - _GPT_ENTRY_SECTORS - 2
    table = PartitionTable(
        scheme="gpt", disk_size=layout.disk_size, partitions=tuple(partitions), disk_guid=disk_guid,
        boot_code=bytes(440), first_usable_lba=first_usable, last_usable_lba=last_usable,
    )
    return table, head, tail


def gpt_head_and_tail(
    entries: bytes, disk_size: int, disk_guid: uuid.UUID, boot_code: bytes = b""
) -> tuple[bytes, bytes]:
    """The bytes of LBA 0–33 (protective MBR, primary GPT header, the entry array) and of the disk's last
    33 sectors (the backup entry array and header) of a GPT disk of ``disk_size`` bytes with the 128 entries
    ``entries`` (16 KiB). ``boot_code`` (at most 440 bytes) goes at the start of the protective MBR."""
    if len(entries) != _GPT_ENTRIES * _GPT_ENTRY_SIZE:
        raise DiskError(f"A GPT entry array is {_GPT_ENTRIES * _GPT_ENTRY_SIZE} bytes, not {len(entries)}.")
    if len(boot_code) > 440:
        raise DiskError(f"MBR boot code is at most 440 bytes; {len(boot_code)} were given.")
    total = disk_size // SECTOR
    first_usable, last_usable = 2 + _GPT_ENTRY_SECTORS, total - _GPT_ENTRY_SECTORS - 2
    entries_crc = zlib.crc32(entries)

    def header(my_lba: int, alternate: int, entries_lba: int) -> bytes:
        fields = [_GPT_SIGNATURE, _GPT_REVISION, _GPT_HEADER.size, 0, 0, my_lba, alternate, first_usable,
                  last_usable, disk_guid.bytes_le, entries_lba, _GPT_ENTRIES, _GPT_ENTRY_SIZE, entries_crc]
        fields[3] = zlib.crc32(_GPT_HEADER.pack(*fields))
        return _GPT_HEADER.pack(*fields).ljust(SECTOR, b"\0")

    protective = bytearray(SECTOR)
    protective[: len(boot_code)] = boot_code
    struct.pack_into("<B3sB3sII", protective, 446, 0, b"\x00\x02\x00", _MBR_PROTECTIVE, b"\xff\xff\xff", 1,
                     min(total - 1, 0xFFFFFFFF))
    protective[510:512] = _BOOT_SIGNATURE
    head = bytes(protective) + header(1, total - 1, 2) + entries
    tail = entries + header(total - 1, 1, total - 1 - _GPT_ENTRY_SECTORS)
    return head, tail


def gpt_entry(type_guid: uuid.UUID, unique_guid: uuid.UUID, first_lba: int, last_lba: int, attributes: int,
              name: str) -> bytes:
    """One 128-byte GPT partition entry."""
    encoded = name.encode("utf-16-le")
    if len(encoded) > 72:
        raise DiskError(f"A GPT partition name is at most 36 characters: {name!r}.")
    return _GPT_ENTRY.pack(type_guid.bytes_le, unique_guid.bytes_le, first_lba, last_lba, attributes, encoded)


def mbr_chs(lba: int) -> bytes:
    """The CHS address an MBR entry gives for ``lba`` (255 heads, 63 sectors a track)."""
    return _chs(lba)


def _format_esp(target: Path, layout: DiskLayout, table: PartitionTable) -> None:
    """Format the ESP's byte range of ``target`` FAT32 (its volume serial taken from the partition's GUID,
    so equal inputs give equal disks)."""
    esp = table.partitions[0]
    assert esp.unique_guid is not None
    # mkfs.fat would pick the cluster size and geometry from the size of the whole file, which gives a
    # 100 MiB ESP on a large disk too few clusters for FAT32 (it needs at least 65,525): pick the largest
    # of 4, 2, 1 KiB or 512 B that leaves enough. It rounds the volume down to whole tracks, so the
    # geometry has 32 sectors a track (a MiB-multiple ESP loses nothing).
    per_cluster = 8
    while per_cluster > 1 and layout.esp_size // (SECTOR * per_cluster) < 66_000:
        per_cluster //= 2
    argv = [
        _sbin_program("mkfs.fat", "dosfstools"), "-F", "32", "-s", str(per_cluster), "-g", "64/32",
        "-i", esp.unique_guid.hex[:8], "-h", str(esp.start_lba), f"--offset={esp.start_lba}", str(target),
        str(layout.esp_size // KiB),
    ]
    outcome = procs.run(argv, timeout_s=300)
    if not outcome.ok:
        raise EnvironmentProblem(f"mkfs.fat could not format the ESP: {_tail(outcome.stderr, outcome.returncode)}")


def _check_volume(volume: Path, layout: DiskLayout, *, allow_fixups: bool) -> list[tuple[int, bytes]]:
    """Check that ``volume`` is an NTFS volume image of the data partition's size; the boot sectors to
    write over the copy (offset in the volume, sector) so that its hidden sectors match the partition."""
    try:
        size = volume.stat().st_size
        with volume.open("rb") as file:
            boot = file.read(SECTOR)
            if boot[3:11] != _NTFS_OEM:
                raise DiskError(f"{volume} is not an NTFS volume image.")
            bytes_per_sector = struct.unpack_from("<H", boot, 0x0B)[0]
            hidden = struct.unpack_from("<I", boot, 0x1C)[0]
            sectors = struct.unpack_from("<Q", boot, 0x28)[0]
            backup_offset = sectors * bytes_per_sector
            file.seek(backup_offset)
            backup = file.read(SECTOR)
    except FileNotFoundError as exc:
        raise DiskError(f"The NTFS volume image {volume} does not exist.") from exc
    if size != layout.data_size:
        raise DiskError(
            f"The NTFS volume image {volume} holds {size} bytes, but the data partition of a "
            f"{layout.disk_size // MiB} MiB disk holds {layout.data_size}: make the volume for exactly that size "
            f"(make_ntfs_volume(path, {layout.data_size}, partition_start_sector={layout.data_start_lba}))."
        )
    if bytes_per_sector not in {512, 1024, 2048, 4096} or backup_offset >= size:
        raise DiskError(f"{volume}: its NTFS boot sector describes a volume larger than the file.")
    if hidden == layout.data_start_lba:
        return []
    if not allow_fixups:
        raise DiskError(
            f"The NTFS volume {volume} was made for partition start sector {hidden}, but its partition starts at "
            f"sector {layout.data_start_lba}: make it with partition_start_sector={layout.data_start_lba}, or "
            "build the whole disk with build_gpt_disk(), which corrects it."
        )
    log.info("%s: setting the NTFS boot sector's hidden sectors from %d to %d", volume, hidden, layout.data_start_lba)
    fixups = []
    for offset, sector in ((0, boot), (backup_offset, backup)):
        if sector[3:11] == _NTFS_OEM:
            patched = bytearray(sector)
            struct.pack_into("<I", patched, 0x1C, layout.data_start_lba)
            fixups.append((offset, bytes(patched)))
    return fixups


def _splice(
    volume: Path,
    target: Path,
    offset: int,
    fixups: Sequence[tuple[int, bytes]],
    progress: ProgressFn | None,
    cancel: Cancellable | None,
) -> None:
    size = volume.stat().st_size
    src = os.open(volume, os.O_RDONLY)
    try:
        dst = os.open(target, os.O_WRONLY)
        try:
            _copy_sparse(src, 0, size, dst, offset, progress, cancel)
            for where, sector in fixups:
                _pwrite_all(dst, sector, offset + where)
        finally:
            os.close(dst)
    finally:
        os.close(src)


def _copy_sparse(
    src: int,
    src_offset: int,
    length: int,
    dst: int,
    dst_offset: int,
    progress: ProgressFn | None,
    cancel: Cancellable | None,
) -> None:
    """Copy ``length`` bytes between open files, skipping the source's holes (SEEK_DATA/SEEK_HOLE) and
    blocks of zeros, so that a sparse target stays sparse."""
    end = src_offset + length
    zero = bytes(_COPY_CHUNK)
    position = src_offset
    while position < end:
        _check_cancel(cancel)
        try:
            data = os.lseek(src, position, os.SEEK_DATA)
            hole = os.lseek(src, data, os.SEEK_HOLE)
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # ENXIO: no data after ``position``
                raise
            break
        if data >= end:
            break
        stop = min(hole, end)
        while data < stop:
            _check_cancel(cancel)
            count = min(_COPY_CHUNK - data % _COPY_CHUNK, stop - data)
            chunk = os.pread(src, count, data)
            if len(chunk) != count:
                raise DiskError(f"The source ended early: {count} bytes at {data} could not be read.")
            if chunk != (zero if count == _COPY_CHUNK else bytes(count)):
                _pwrite_all(dst, chunk, dst_offset + data - src_offset)
            data += count
            if progress is not None:
                progress(data - src_offset, length)
        position = stop
    if progress is not None:
        progress(length, length)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


# --- reading images of any format -----------------------------------------------------------------


@dataclass(frozen=True)
class ImageInfo:
    """What qemu-img says a disk image is. ``format`` is qemu-img's name (``vpc`` for VHD, fixed ones
    included, which qemu-img itself probes as raw)."""

    path: Path
    format: str
    virtual_size: int
    fixed_vhd: bool = False

    @property
    def raw_readable(self) -> bool:
        """The file holds the disk byte for byte from offset 0 (raw, fixed VHD)."""
        return self.format == "raw" or self.fixed_vhd


@dataclass(frozen=True)
class ExtractedVolume:
    volume: Path
    partition: Partition
    table: PartitionTable
    image: ImageInfo


def image_info(image: Path) -> ImageInfo:
    """Detect an image's format with ``qemu-img info``; a fixed VHD (probed as raw by qemu-img) is
    recognised by the ``conectix`` footer in its last 512 bytes."""
    image = Path(image)
    if not image.is_file():
        raise DiskError(f"The disk image {image} does not exist.")
    info = _qemu_info(image, None)
    fmt = str(info.get("format", ""))
    if info.get("backing-filename"):
        raise DiskError(f"{image} depends on a backing file ({info['backing-filename']}); flatten it first.")
    size = image.stat().st_size
    if fmt == "raw" and size >= SECTOR:
        with image.open("rb") as file:
            file.seek(size - SECTOR)
            footer = file.read(SECTOR)
        if footer.startswith(_VHD_FOOTER):
            disk_type = struct.unpack_from(">I", footer, 0x3C)[0]
            if disk_type != 2:  # 2 = fixed; a dynamic/differencing VHD would have been probed as vpc
                raise DiskError(f"{image} is a damaged VHD (its header is missing, its footer says type {disk_type}).")
            virtual = int(_qemu_info(image, "vpc")["virtual-size"])
            if virtual > size - SECTOR:
                raise DiskError(f"{image} is a truncated fixed VHD ({size} bytes for a {virtual}-byte disk).")
            return ImageInfo(image, "vpc", virtual, fixed_vhd=True)
    if fmt not in _READABLE:
        raise DiskError(f"{image} is a {fmt or 'unknown'} image; LayerDesk reads {', '.join(sorted(_READABLE))}.")
    if fmt == "raw":  # qemu-img rounds a raw file's size up to whole sectors
        return ImageInfo(image, fmt, size)
    return ImageInfo(image, fmt, int(info["virtual-size"]))


def extract_ntfs_volume(
    image: Path,
    volume_out: Path,
    *,
    progress: ProgressFn | None = None,
    cancel: Cancellable | None = None,
) -> ExtractedVolume:
    """Copy the NTFS data partition of a disk image of any supported format into a new, sparse volume
    image file ``volume_out``; return it with the disk's partition table (ESP, MSR, recovery, GUIDs,
    MBR signature and boot code). Raw and fixed VHD disks are read directly; other formats through
    qemu-img (only the partition's bytes are converted). ``volume_out`` appears only when complete.
    """
    info = image_info(Path(image))
    _check_cancel(cancel)
    check_image(info)
    table = read_image_partition_table(info, Path(volume_out).parent)
    partition = table.ntfs_data_partition()
    extract_partition(info, partition, Path(volume_out), progress=progress, cancel=cancel)
    with Path(volume_out).open("rb") as file:
        if _read_at(file, 3, 8) != _NTFS_OEM:
            Path(volume_out).unlink(missing_ok=True)
            raise DiskError(f"{info.path}: the partition read back is not an NTFS volume.")
    return ExtractedVolume(Path(volume_out), partition, table, info)


def read_image_partition_table(info: ImageInfo, scratch: Path) -> PartitionTable:
    """The partition table of the disk in the image ``info``; a non-raw image is read through qemu-img
    (a few 1 MiB pieces, converted in a temporary folder inside ``scratch``)."""
    if info.raw_readable:
        with info.path.open("rb") as file:
            return read_partition_table(file, size=info.virtual_size, name=str(info.path))
    with tempfile.TemporaryDirectory(prefix=".layerdesk-read-", dir=scratch) as folder:
        return read_partition_table(_QemuReader(info, Path(folder)), name=str(info.path))


def check_image(info: ImageInfo) -> None:
    """``qemu-img check`` an image of a format that has it: qemu-img reads a truncated qcow2 or VMDK's
    missing clusters as zeros without a word."""
    if info.format not in _CHECKABLE:
        return
    outcome = procs.run([_qemu_img(), "check", "-f", info.format, str(info.path)], timeout_s=3600)
    if outcome.returncode == 3:
        log.warning("%s: qemu-img check found leaked clusters (harmless): %s", info.path, _summary(outcome))
    elif not outcome.ok:
        raise DiskError(f"{info.path} is damaged or truncated (qemu-img check): {_summary(outcome)}")


def extract_partition(
    info: ImageInfo,
    partition: Partition,
    out: Path,
    *,
    progress: ProgressFn | None = None,
    cancel: Cancellable | None = None,
) -> Path:
    """Copy ``partition``'s bytes out of the disk image ``info`` (see :func:`image_info`; check it first
    with :func:`check_image`) into a new sparse file ``out``, which appears only when complete. Raw and
    fixed VHD disks are read directly; other formats through qemu-img (only the partition's bytes)."""
    out = Path(out)
    if info.raw_readable:
        with info.path.open("rb") as file, _output(out) as tmp:
            dst = os.open(tmp, os.O_WRONLY)
            try:
                os.ftruncate(dst, partition.size)
                _copy_sparse(file.fileno(), partition.start, partition.size, dst, 0, progress, cancel)
            finally:
                os.close(dst)
        return out
    with _output(out) as tmp:
        tmp.unlink()  # qemu-img creates it
        source = _json_view(info, partition.start, partition.size)
        _run_qemu_convert([_qemu_img(), "convert", "-p", "-O", "raw", source, str(tmp)], partition.size,
                          progress, cancel, failure=f"Cannot read {info.path} as {info.format}")
        if tmp.stat().st_size != partition.size:
            raise DiskError(f"{info.path}: {tmp.stat().st_size} bytes of partition {partition.index} came back, "
                            f"not {partition.size}.")
    return out


class _QemuReader:
    """A read-only file object over the disk inside a non-raw image: each 1 MiB piece read is converted
    to raw by one ``qemu-img convert`` run (only a few pieces are needed to read a partition table)."""

    def __init__(self, info: ImageInfo, scratch: Path) -> None:
        self._info = info
        self._scratch = scratch
        self._position = 0
        self._pieces: dict[int, bytes] = {}

    def seek(self, offset: int, whence: int = os.SEEK_SET, /) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._position, os.SEEK_END: self._info.virtual_size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def read(self, size: int = -1, /) -> bytes:
        end = self._info.virtual_size if size < 0 else min(self._info.virtual_size, self._position + size)
        parts = []
        while self._position < end:
            index, within = divmod(self._position, _READ_CHUNK)
            piece = self._piece(index)[within : within + end - self._position]
            parts.append(piece)
            self._position += len(piece)
        return b"".join(parts)

    def _piece(self, index: int) -> bytes:
        if index not in self._pieces:
            start = index * _READ_CHUNK
            length = min(_READ_CHUNK, self._info.virtual_size - start)
            target = self._scratch / f"piece-{index}.raw"
            outcome = procs.run(
                [_qemu_img(), "convert", "-O", "raw", _json_view(self._info, start, length), str(target)],
                timeout_s=300,
            )
            if not outcome.ok:
                raise DiskError(
                    f"Cannot read {self._info.path} as {self._info.format} (damaged or truncated?): "
                    f"{_tail(outcome.stderr, outcome.returncode)}"
                )
            data = target.read_bytes()
            target.unlink()
            if len(data) != length:
                raise DiskError(f"Cannot read {self._info.path}: {len(data)} of {length} bytes at {start} came back.")
            self._pieces[index] = data
        return self._pieces[index]


def _json_view(info: ImageInfo, offset: int, size: int) -> str:
    """A qemu ``json:`` filename for ``size`` bytes at ``offset`` of the disk in ``info`` (the format is
    named, never probed)."""
    inner: dict[str, object] = {"driver": info.format, "file": {"driver": "file", "filename": str(info.path)}}
    return "json:" + json.dumps({"driver": "raw", "offset": offset, "size": size, "file": inner})


def _qemu_info(image: Path, fmt: str | None) -> dict[str, Any]:
    argv = [_qemu_img(), "info", "--output=json", *(["-f", fmt] if fmt else []), str(image)]
    outcome = procs.run(argv, timeout_s=120)
    if not outcome.ok:
        raise DiskError(f"{image} is not a readable disk image (damaged or truncated?): "
                        f"{_tail(outcome.stderr, outcome.returncode)}")
    info = json.loads(outcome.stdout)
    assert isinstance(info, dict)
    return info


# --- converting -----------------------------------------------------------------------------------


def convert(
    raw: Path | Sequence[Path],
    out: Path,
    fmt: DiskFormat,
    progress: ProgressFn | None = None,
    cancel: Cancellable | None = None,
) -> Path:
    """Write the raw disk ``raw`` (or the raw pieces it is made of, in order, e.g. from
    :func:`build_gpt_pieces`) as ``out`` in format ``fmt`` with ``qemu-img convert``.

    ``progress`` gets ``(bytes done, bytes in all)`` from qemu-img's percentages; ``cancel`` stops it
    (:class:`TaskCanceled`). The image is written under a temporary name beside ``out``, verified with
    :func:`verify_image` and only then renamed to ``out`` (replacing an older one); on any failure or
    cancel nothing is left behind.
    """
    if fmt not in _FORMATS:
        raise DiskError(f"Unknown disk format {fmt!r}; choose one of {', '.join(_FORMATS)}.")
    sources = [Path(raw)] if isinstance(raw, str | os.PathLike) else [Path(p) for p in raw]
    out = Path(out)
    if not sources:
        raise DiskError("Nothing to convert: no raw disk was given.")
    for source in sources:
        if not source.is_file():
            raise DiskError(f"The raw disk {source} does not exist.")
        if out.exists() and out.samefile(source):
            raise DiskError(f"{out} is one of the raw disks to convert; write the image to another file.")
    total = sum(source.stat().st_size for source in sources)
    driver, options = _FORMATS[fmt]
    _check_cancel(cancel)
    with _output(out) as tmp:
        tmp.unlink()  # qemu-img creates it
        argv = [_qemu_img(), "convert", "-p", "-f", "raw", *map(str, sources), "-O", driver]
        argv += ["-o", options] if options else []
        _run_qemu_convert([*argv, str(tmp)], total, progress, cancel, failure=f"qemu-img could not write {out}")
        verify_image(tmp, fmt, total)
    return out


def convert_hashed(
    raw: Path | Sequence[Path],
    out: Path,
    fmt: DiskFormat,
    progress: ProgressFn | None = None,
    cancel: Cancellable | None = None,
    consume: Path | None = None,
    keep: Path | None = None,
    known: Known | None = None,
) -> str:
    """:func:`convert`, returning the checksum of the image written (:mod:`app.engine.checksum`).

    ``consume``: one of the pieces (the Windows volume, in the same folder as ``out``) that may become the
    image itself: VHDX, fixed VHD and raw are then assembled around it in place where its file system
    allows (:mod:`app.engine.in_place`), and the piece is gone afterwards. ``keep``: one of the pieces to
    leave as it is: the image is laid out alike in a new file, the piece's blocks cloned where the file
    system can; ``known`` then holds digests of the piece's blocks to take where it did not change, and
    gets those of its blocks now (:class:`app.engine.checksum.Known`). Otherwise VHDX, dynamic and fixed
    VHD and raw are written by :mod:`app.engine.vhd` in one pass that hashes the image as it writes it (no
    read-back), and the other formats go through :func:`convert` and are then read once to hash them.
    Either way the image is verified (:func:`verify_image`) before it appears as ``out``, and nothing is
    left behind on a failure or a cancel.
    """
    from app.engine import in_place, vhd  # imported here: they build on this module

    writers: dict[str, Callable[..., str]] = {
        "vhdx": vhd.write_vhdx, "vhd-dynamic": vhd.write_vhd_dynamic, "vhd-fixed": vhd.write_vhd_fixed,
        "raw": vhd.write_raw,
    }
    if fmt not in _FORMATS:
        raise DiskError(f"Unknown disk format {fmt!r}; choose one of {', '.join(_FORMATS)}.")
    sources = [Path(raw)] if isinstance(raw, str | os.PathLike) else [Path(p) for p in raw]
    out = Path(out)
    writer = writers.get(fmt)
    try:
        total = sum(source.stat().st_size for source in sources)
    except FileNotFoundError as exc:
        raise DiskError(f"The raw disk piece {exc.filename} does not exist.") from exc
    if consume is not None and Path(consume) in sources:
        checksum = in_place.assemble(sources, sources.index(Path(consume)), fmt, progress=progress, cancel=cancel)
        if checksum is not None:
            with _output(out) as tmp:
                Path(consume).replace(tmp)
                verify_image(tmp, fmt, total)
            return checksum
    if keep is not None and Path(keep) in sources:
        with contextlib.suppress(_NotInPlace), _output(out) as tmp:
            checksum = in_place.assemble(sources, sources.index(Path(keep)), fmt, progress=progress,
                                         cancel=cancel, into=tmp, known=known)
            if checksum is None:
                raise _NotInPlace  # the empty file goes; the image is written by copying below
            verify_image(tmp, fmt, total)
            return checksum
    with _output(out) as tmp:
        if writer is None:
            convert(sources, tmp, fmt, progress, cancel)
            return file_checksum(tmp, cancel)
        checksum = writer(sources, tmp, progress=progress, cancel=cancel)
        verify_image(tmp, fmt, total)
    return checksum


class _NotInPlace(Exception):
    """The image cannot be laid out around the kept piece: it is written by copying."""


def verify_image(image: Path, fmt: DiskFormat, disk_size: int) -> None:
    """Check a written image: ``qemu-img check`` where the format has it (qcow2, VHDX, VMDK), and for
    every format that qemu-img reads it as ``fmt`` with a virtual size of exactly ``disk_size``."""
    driver = _FORMATS[fmt][0]
    info = _qemu_info(Path(image), driver)
    if int(info.get("virtual-size", -1)) != disk_size:
        raise DiskError(f"{image}: qemu-img reads a disk of {info.get('virtual-size')} bytes, not {disk_size}.")
    if fmt == "vhd-fixed":
        with Path(image).open("rb") as file:
            file.seek(-SECTOR, os.SEEK_END)
            if not file.read(8).startswith(_VHD_FOOTER):
                raise DiskError(f"{image} has no VHD footer.")
    if driver in _CHECKABLE:
        outcome = procs.run([_qemu_img(), "check", "-f", driver, str(image)], timeout_s=3600)
        if not outcome.ok:
            raise DiskError(f"{image} did not pass qemu-img check: {_summary(outcome)}")


def _run_qemu_convert(
    argv: list[str], total: int, progress: ProgressFn | None, cancel: Cancellable | None, *, failure: str
) -> None:
    def on_line(line: str) -> None:
        match = _PROGRESS.search(line)
        if match and progress is not None:
            progress(min(total, int(total * float(match.group(1)) / 100)), total)

    outcome = procs.stream(argv, on_line, cancel or _NEVER)
    if outcome.cancelled:
        raise TaskCanceled()
    if not outcome.ok:
        raise DiskError(f"{failure}: {_tail(outcome.stderr, outcome.returncode)}")
    if progress is not None:
        progress(total, total)


class _NeverCancelled:
    cancelled = False


_NEVER = _NeverCancelled()


# --- helpers --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _output(final: Path) -> Iterator[Path]:
    """An empty temporary file beside ``final``, renamed to it when the block ends normally and removed
    when it does not."""
    if not final.parent.is_dir():
        raise DiskError(f"The folder {final.parent} does not exist.")
    tmp = final.with_name(f".{final.name}.{secrets.token_hex(6)}.partial")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask applies, as for any new file
    try:
        yield tmp
        tmp.replace(final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _check_cancel(cancel: Cancellable | None) -> None:
    if cancel is not None and cancel.cancelled:
        raise TaskCanceled()


def _qemu_img() -> str:
    return procs.find_program("qemu-img", package_hint="the Debian package qemu-utils")


def _sbin_program(name: str, package: str) -> str:
    """Tools of dosfstools live in /usr/sbin (found by procs.find_program even off the PATH)."""
    return procs.find_program(name, package_hint=f"the Debian package {package}")


def _tail(stderr: str, returncode: int) -> str:
    return " ".join(stderr.split()[-40:]) or f"exit status {returncode}"


def _summary(outcome: procs.Outcome) -> str:
    """The gist of a ``qemu-img check``: its first error lines and its verdict, not hundreds of lines."""
    lines = [line.strip() for line in (outcome.stderr + outcome.stdout).splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(("ERROR", "qemu-img:", "Leaked"))]
    verdict = [line for line in lines if "errors were found" in line or "leaked clusters" in line]
    picked = errors[:3] + (["…"] if len(errors) > 3 else []) + verdict
    return " ".join(picked or lines[-3:]) or f"exit status {outcome.returncode}"
