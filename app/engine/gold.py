"""The gold disk of an OS layer: everything a published disk needs from it to boot.

An OS layer imported from a disk image (App Layering's "import the gold image") keeps, besides the
Windows volume's files:

* the **partition table**: scheme, disk GUID (GPT) or disk signature (MBR), the MBR boot code, and every
  partition's slot, position, type, unique GUID, name, attributes and active flag (:class:`GoldLayout`);
* the **bytes of every other partition** (ESP with the boot manager and its BCD store, "System Reserved",
  recovery, MSR, OEM partitions), stored as files of a second image of the layer's WIM
  (``v<id>-boot``), so unchanged partitions are stored once across the layer's versions;
* the Windows volume's **NTFS boot code** (its first 16 sectors, ``$Boot``), which a BIOS boots through
  when the Windows partition is the active one.

Windows finds its boot disk by those identities: the BCD store names the Windows partition by its GPT
unique GUID, or on MBR by the disk signature and the partition's byte offset. :meth:`GoldLayout.plan`
therefore lays the published disk out like the gold one:

* partitions before the Windows partition, and the Windows partition's start, keep their exact places;
* on **GPT**, the Windows partition grows (or shrinks) to the template's disk size, and the partitions
  that followed it (usually recovery) move to the end of the disk, in their order, with their GUIDs (GPT
  references survive a move);
* on **MBR**, partitions that followed the Windows partition keep their byte offsets (the BCD finds a
  recovery partition by its offset), so the Windows partition keeps its gold size and the disk can only be
  made larger than the gold one; with nothing after it, it grows to the end of the disk (at most 2 TiB).

:func:`write_pieces` writes what surrounds the partitions (the table, gaps, the backup GPT) as small
sparse raw files and returns the pieces in disk order, so ``qemu-img convert`` writes the disk from the
stored partitions and the new Windows volume without a raw disk ever being assembled.
:func:`graft_boot_code` puts the gold NTFS boot code into the new Windows volume, keeping the new volume's
BPB (geometry, size, MFT location, serial number).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import struct
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from app.engine import disk
from app.engine.disk import DiskError, Partition, PartitionTable

__all__ = [
    "BOOT_IMAGE_SUFFIX",
    "VBR_FILE",
    "DiskPlan",
    "GoldLayout",
    "GoldPartition",
    "Placed",
    "graft_boot_code",
    "partition_file",
    "sha256_file",
    "write_pieces",
]

SECTOR = disk.SECTOR
MiB = 1024 * 1024
#: The image of a layer's WIM that holds version ``v<id>``'s boot partitions is named ``v<id>-boot``.
BOOT_IMAGE_SUFFIX = "-boot"
#: The Windows volume's first 16 sectors (the boot sector and the NTFS bootstrap code after it).
VBR_FILE = "windows-boot.bin"
VBR_BYTES = 16 * SECTOR
_BPB_END = 0x54  # jump, OEM id, BPB and extended BPB: what the new volume keeps of its own boot sector
_GPT_SLOTS = 128
_MBR_TABLE = 446
_MAX_MBR_SECTORS = 0xFFFFFFFF
_MIN_WINDOWS = 64 * MiB


def partition_file(slot: int) -> str:
    """The file name of a kept partition's bytes in the boot image."""
    return f"partition-{slot}.img"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as file:
        while chunk := file.read(4 * MiB):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


@dataclass(frozen=True)
class GoldPartition:
    """One partition of the gold disk. ``slot`` is its 1-based entry in the table (GPT entry number or MBR
    primary entry); positions are bytes. Every partition but the Windows one is kept byte for byte."""

    slot: int
    start: int
    size: int
    kind: str
    windows: bool = False
    type_guid: uuid.UUID | None = None
    unique_guid: uuid.UUID | None = None
    name: str = ""
    attributes: int = 0
    mbr_type: int | None = None
    active: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "slot": self.slot, "start": self.start, "size": self.size, "kind": self.kind, "windows": self.windows,
            "type_guid": str(self.type_guid) if self.type_guid else None,
            "unique_guid": str(self.unique_guid) if self.unique_guid else None,
            "name": self.name, "attributes": self.attributes, "mbr_type": self.mbr_type, "active": self.active,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GoldPartition:
        def count(key: str) -> int:
            value = data[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"partition {key!r} is not a count: {value!r}")
            return value

        def guid(key: str) -> uuid.UUID | None:
            value = data.get(key)
            return uuid.UUID(str(value)) if value else None

        mbr_type = data.get("mbr_type")
        if mbr_type is not None and (isinstance(mbr_type, bool) or not isinstance(mbr_type, int)
                                     or not 0 < mbr_type < 256):
            raise ValueError(f"bad MBR partition type {mbr_type!r}")
        partition = cls(
            slot=count("slot"), start=count("start"), size=count("size"), kind=str(data["kind"]),
            windows=bool(data["windows"]), type_guid=guid("type_guid"), unique_guid=guid("unique_guid"),
            name=str(data.get("name", "")), attributes=count("attributes"), mbr_type=mbr_type,
            active=bool(data.get("active", False)),
        )
        if partition.start % SECTOR or partition.size % SECTOR or not partition.size or not partition.slot:
            raise ValueError(f"partition {partition.slot} is not whole sectors")
        return partition

    @property
    def file(self) -> str | None:
        """Its file in the boot image (``None`` for the Windows partition, which is built anew)."""
        return None if self.windows else partition_file(self.slot)

    def describe(self) -> str:
        what = "Windows" if self.windows else self.name or self.kind
        return f"partition {self.slot} ({what}, {self.size // MiB} MiB)"


@dataclass(frozen=True)
class Placed:
    """Where a gold partition lies on the published disk."""

    partition: GoldPartition
    start: int
    size: int

    @property
    def end(self) -> int:
        return self.start + self.size


@dataclass(frozen=True)
class DiskPlan:
    """The published disk: ``placed`` in disk order, the Windows partition among them."""

    layout: GoldLayout
    disk_size: int
    placed: tuple[Placed, ...]

    @property
    def windows(self) -> Placed:
        return next(p for p in self.placed if p.partition.windows)


@dataclass(frozen=True)
class GoldLayout:
    """The partition table of an OS layer's gold disk (see the module docstring)."""

    scheme: Literal["gpt", "mbr"]
    disk_size: int
    partitions: tuple[GoldPartition, ...]
    disk_guid: uuid.UUID | None = None
    mbr_signature: int | None = None
    boot_code: bytes = b""

    @classmethod
    def of(cls, table: PartitionTable) -> GoldLayout:
        """The layout of a disk as read; refused (:class:`DiskError`) when LayerDesk cannot lay a disk out
        like it (4 KiB sectors, extended/logical MBR partitions, overlapping partitions)."""
        if table.sector_size != SECTOR:
            raise DiskError(f"The gold disk has {table.sector_size}-byte sectors; LayerDesk builds disks with "
                            f"{SECTOR}-byte sectors, so it cannot keep its layout.")
        windows = table.ntfs_data_partition()
        kept = []
        for partition in table.partitions:
            if table.scheme == "mbr" and (partition.index > 4 or partition.kind == "extended"):
                raise DiskError(f"The gold disk has an extended MBR partition ({partition.describe()}); LayerDesk "
                                "keeps primary partitions only. Convert the disk to GPT or move that partition.")
            if partition.index > _GPT_SLOTS:
                raise DiskError(f"The gold disk's {partition.describe()} uses GPT entry {partition.index}; LayerDesk "
                                f"writes {_GPT_SLOTS} entries.")
            kept.append(_gold_partition(partition, partition == windows))
        ordered = sorted(kept, key=lambda p: p.start)
        for lower, upper in itertools.pairwise(ordered):
            if lower.start + lower.size > upper.start:
                raise DiskError(f"The gold disk's {lower.describe()} overlaps its {upper.describe()}.")
        return cls(table.scheme, table.disk_size, tuple(kept), table.disk_guid, table.mbr_signature,
                   bytes(table.boot_code[:440]))

    def to_dict(self) -> dict[str, Any]:
        return {
            "scheme": self.scheme, "disk_size": self.disk_size,
            "disk_guid": str(self.disk_guid) if self.disk_guid else None,
            "mbr_signature": self.mbr_signature, "boot_code": self.boot_code.hex(),
            "partitions": [p.to_dict() for p in self.partitions],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GoldLayout:
        scheme = data["scheme"]
        if scheme not in ("gpt", "mbr"):
            raise ValueError(f"unknown partition scheme {scheme!r}")
        partitions = tuple(GoldPartition.from_dict(p) for p in data["partitions"])
        if sum(p.windows for p in partitions) != 1:
            raise ValueError("a gold layout has exactly one Windows partition")
        boot_code = bytes.fromhex(str(data.get("boot_code", "")))
        if len(boot_code) > 440:
            raise ValueError("MBR boot code is at most 440 bytes")
        signature = data.get("mbr_signature")
        disk_size = data["disk_size"]
        if isinstance(disk_size, bool) or not isinstance(disk_size, int) or disk_size <= 0:
            raise ValueError(f"bad disk size {disk_size!r}")
        return cls(scheme, disk_size, partitions, uuid.UUID(str(data["disk_guid"])) if data.get("disk_guid") else None,
                   int(signature) if signature is not None else None, boot_code)

    @property
    def windows(self) -> GoldPartition:
        return next(p for p in self.partitions if p.windows)

    @property
    def kept(self) -> tuple[GoldPartition, ...]:
        """The partitions whose bytes are stored (all but the Windows one)."""
        return tuple(p for p in self.partitions if not p.windows)

    def plan(self, disk_size: int) -> DiskPlan:
        """Lay out a disk of ``disk_size`` bytes like the gold one (see the module docstring)."""
        if disk_size <= 0 or disk_size % MiB:
            raise DiskError(f"The disk size must be a positive multiple of 1 MiB; {disk_size} bytes were asked for.")
        ordered = sorted(self.partitions, key=lambda p: p.start)
        windows = self.windows
        before = [Placed(p, p.start, p.size) for p in ordered if p.start < windows.start]
        after_gold = [p for p in ordered if p.start > windows.start]
        need = f"{-(-self._minimum(after_gold) // MiB)} MiB"
        if self.scheme == "gpt":
            end = (disk_size - (1 + _GPT_SLOTS * 128 // SECTOR) * SECTOR) // MiB * MiB
            after: list[Placed] = []
            for partition in reversed(after_gold):
                start = (end - partition.size) // MiB * MiB
                after.insert(0, Placed(partition, start, partition.size))
                end = start
            windows_size = end - windows.start
        else:
            if disk_size // SECTOR > _MAX_MBR_SECTORS + 1:
                raise DiskError("An MBR disk cannot be larger than 2 TiB; make the template's disk smaller.")
            after = [Placed(p, p.start, p.size) for p in after_gold]
            if after:
                windows_size = windows.size
                if disk_size < max(p.end for p in after):
                    raise DiskError(
                        f"The OS layer's gold disk has partitions after the Windows partition, which must keep their "
                        f"places on an MBR disk; the disk must be at least {need}, not {disk_size // MiB} MiB."
                    )
            else:
                windows_size = disk_size // MiB * MiB - windows.start
        if windows_size < _MIN_WINDOWS:
            raise DiskError(f"A disk of {disk_size // MiB} MiB laid out like the OS layer's gold disk leaves no room "
                            f"for the Windows partition; it must be at least {need}.")
        placed = (*before, Placed(windows, windows.start, windows_size), *after)
        return DiskPlan(self, disk_size, tuple(placed))

    def _minimum(self, after: Sequence[GoldPartition]) -> int:
        """The smallest disk :meth:`plan` accepts."""
        windows = self.windows
        if self.scheme == "mbr" and after:
            return max(p.start + p.size for p in after)
        tail = sum(-(-p.size // MiB) * MiB for p in after) + MiB
        return windows.start + _MIN_WINDOWS + tail + MiB


def _gold_partition(partition: Partition, windows: bool) -> GoldPartition:
    return GoldPartition(
        slot=partition.index, start=partition.start, size=partition.size, kind=partition.kind, windows=windows,
        type_guid=partition.type_guid, unique_guid=partition.unique_guid, name=partition.name,
        attributes=partition.attributes, mbr_type=partition.mbr_type, active=partition.active,
    )


# --- writing the disk ----------------------------------------------------------------------------


def write_pieces(plan: DiskPlan, work: Path, contents: Mapping[int, Path], volume: Path) -> list[Path]:
    """The pieces of the published disk in order, for ``qemu-img convert``: the table (and the gaps, and
    the backup GPT) as sparse raw files written in ``work``, each kept partition's stored bytes
    (``contents`` by slot) and the Windows ``volume``. Sizes are checked: the pieces add up to the disk."""
    layout = plan.layout
    for placed in plan.placed:
        source = volume if placed.partition.windows else contents.get(placed.partition.slot)
        if source is None:
            raise DiskError(f"The bytes of the gold disk's {placed.partition.describe()} are missing.")
        if Path(source).stat().st_size != placed.size:
            raise DiskError(f"{source} holds {Path(source).stat().st_size} bytes for {placed.partition.describe()}, "
                            f"which is {placed.size} bytes on the disk.")
    if layout.scheme == "gpt":
        head, tail = _gpt_table(plan)
    else:
        head, tail = _mbr_table(plan), b""
    pieces: list[Path] = []
    position = 0

    def raw_piece(name: str, size: int, data: bytes = b"", at_end: bool = False) -> None:
        path = work / name
        with path.open("wb") as file:
            file.truncate(size)
            if data:
                file.seek(size - len(data) if at_end else 0)
                file.write(data)
        pieces.append(path)

    for number, placed in enumerate(plan.placed):
        if placed.start < position or (number == 0 and placed.start < len(head)):
            raise DiskError(f"{placed.partition.describe()} would overlap the partition table or another partition.")
        if placed.start > position:
            raw_piece(f"gap-{number}.raw", placed.start - position, head if number == 0 else b"")
        pieces.append(volume if placed.partition.windows else contents[placed.partition.slot])
        position = placed.end
    if plan.disk_size - position < len(tail):
        raise DiskError("The last partition would overlap the backup GPT.")
    if plan.disk_size > position:
        raw_piece("gap-end.raw", plan.disk_size - position, tail, at_end=True)
    return pieces


def _gpt_table(plan: DiskPlan) -> tuple[bytes, bytes]:
    entries = bytearray(_GPT_SLOTS * 128)
    for placed in plan.placed:
        partition = placed.partition
        if partition.type_guid is None or partition.unique_guid is None:
            raise DiskError(f"The gold disk's {partition.describe()} has no GPT type or unique GUID.")
        entry = disk.gpt_entry(partition.type_guid, partition.unique_guid, placed.start // SECTOR,
                               placed.end // SECTOR - 1, partition.attributes, partition.name)
        entries[(partition.slot - 1) * 128 : partition.slot * 128] = entry
    disk_guid = plan.layout.disk_guid or uuid.uuid4()
    return disk.gpt_head_and_tail(bytes(entries), plan.disk_size, disk_guid, plan.layout.boot_code)


def _mbr_table(plan: DiskPlan) -> bytes:
    layout = plan.layout
    sector0 = bytearray(SECTOR)
    sector0[: len(layout.boot_code)] = layout.boot_code
    struct.pack_into("<I", sector0, 440, layout.mbr_signature or 0)
    for placed in plan.placed:
        partition = placed.partition
        first, count = placed.start // SECTOR, placed.size // SECTOR
        if first + count > _MAX_MBR_SECTORS:
            raise DiskError(f"{partition.describe()} would end beyond what an MBR can address (2 TiB).")
        struct.pack_into("<B3sB3sII", sector0, _MBR_TABLE + 16 * (partition.slot - 1),
                         0x80 if partition.active else 0, disk.mbr_chs(first), partition.mbr_type or 0x07,
                         disk.mbr_chs(first + count - 1), first, count)
    sector0[510:512] = b"\x55\xaa"
    return bytes(sector0)


def graft_boot_code(volume: Path, gold_vbr: bytes) -> bool:
    """Put the gold Windows volume's NTFS boot code (``gold_vbr``: its first 16 sectors) into ``volume``'s
    boot sectors, keeping ``volume``'s own jump, OEM id and BPB (and write the result to the backup boot
    sector at the volume's end too). Returns ``False``, changing nothing, when ``gold_vbr`` is not an NTFS
    boot record."""
    if len(gold_vbr) != VBR_BYTES or gold_vbr[3:11] != b"NTFS    " or gold_vbr[510:512] != b"\x55\xaa":
        return False
    fd = os.open(volume, os.O_RDWR)
    try:
        own = os.pread(fd, VBR_BYTES, 0)
        if own[3:11] != b"NTFS    ":
            raise DiskError(f"{volume} is not an NTFS volume image.")
        merged = bytearray(gold_vbr)
        merged[:_BPB_END] = own[:_BPB_END]
        _pwrite(fd, bytes(merged), 0)
        sectors = struct.unpack_from("<Q", own, 0x28)[0]  # the volume's sectors, less the backup boot sector
        backup = sectors * SECTOR
        if os.pread(fd, 11, backup)[3:11] == b"NTFS    ":
            _pwrite(fd, bytes(merged[:SECTOR]), backup)
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def _pwrite(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written
