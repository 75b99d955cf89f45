"""Read and write Windows registry hive files (the ``regf`` format), in pure Python.

A hive file is a 4096-byte *base block* followed by *hive bins* (``hbin``, multiples of 4096 bytes) that
hold *cells*: a signed 32-bit size (negative while allocated, 8-byte aligned) and the cell's data. Cells
refer to each other by offset from the first hive bin. The cells used here:

* ``nk`` key node: name (Latin-1 when ``KEY_COMP_NAME``, else UTF-16LE), flags, timestamp, the offsets of its
  subkey list, value list, security cell and class name (a raw UTF-16LE cell);
* ``vk`` value: name, type, and the data inline (≤ 4 bytes), in one cell, or - above 16,344 bytes in a hive of
  version 1.4 or later - as a ``db`` big-data cell listing segments of 16,344 bytes;
* ``sk`` security descriptor, shared by every key with an equal descriptor, kept in a circular doubly
  linked list with reference counts;
* subkey lists ``li`` / ``lf`` / ``lh`` (leaves, sorted by upper-case name) and ``ri`` (a list of leaves).

:func:`parse_hive` refuses anything it cannot read completely and correctly (:class:`HiveError`, one line):
a damaged hive is refused, never read partially. A *dirty* hive (sequence numbers differ: the last write
never finished, newer data sits in the transaction logs ``.LOG1``/``.LOG2``) is refused unless its new-format
logs are given (they are replayed in memory; :func:`read_hive` picks them up beside the file) or the caller
accepts the primary file as it is (``allow_dirty=True``).

:func:`serialize_hive` lays the whole tree out afresh: hive bins of 4096 bytes (larger only for a cell that
needs it), the unused end of each bin as one free cell, ``lh`` leaves (``lf`` before version 1.5) of at most
:data:`LEAF_MAX` entries under an ``ri`` when a key has more subkeys (as Windows splits them), big-data
segments for values over 16,344 bytes, one ``sk`` cell per distinct descriptor.

What round-trips besides the tree: the header's file name and version. Key flags: the nk flag bits plus the
virtualization-control and user (Wow64) flags, kept in bits 16-23 of :attr:`RegistryKey.flags`.
"""

from __future__ import annotations

import contextlib
import gc
import operator
import struct
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from app.engine.registry.model import Hive, RegistryKey, RegistryValue, ValueType, fold
from app.errors import UserError
from app.files import write_atomic

__all__ = [
    "BIG_DATA_SEGMENT",
    "LEAF_MAX",
    "HiveError",
    "default_security_descriptor",
    "parse_hive",
    "read_hive",
    "serialize_hive",
    "write_hive",
]


class HiveError(UserError):
    """A file is not a registry hive we can read (or a tree cannot be written as one)."""

    code = "hive"


# --- format constants ------------------------------------------------------------------------------

BASE_BLOCK = 4096
HBIN_HEADER = 32
NIL = 0xFFFFFFFF

KEY_VOLATILE = 0x0001
KEY_HIVE_EXIT = 0x0002
KEY_HIVE_ENTRY = 0x0004
KEY_NO_DELETE = 0x0008
KEY_COMP_NAME = 0x0020
VALUE_COMP_NAME = 0x0001
#: Flag bits the writer computes itself rather than copying from :attr:`RegistryKey.flags`.
_COMPUTED_FLAGS = KEY_VOLATILE | KEY_HIVE_EXIT | KEY_HIVE_ENTRY | KEY_COMP_NAME

DATA_INLINE = 0x80000000
#: The most data one cell holds before a value needs big-data segments (hive version 1.4 and later).
BIG_DATA_SEGMENT = 16344
#: The most entries in one subkey leaf before Windows splits it (what fits a 4 KiB bin: (4096-40)//8).
LEAF_MAX = 507
_RI_MAX = 1013

_NK = struct.Struct("<2sHQ15IHH")  # 76 bytes, the name follows
_VK = struct.Struct("<2sHIIIHH")  # 20 bytes, the name follows
_SK = struct.Struct("<2sHIIII")  # 20 bytes, the descriptor follows
_LIST = struct.Struct("<2sH")
_DB = struct.Struct("<2sHI")
_I32 = struct.Struct("<i")
_U32 = struct.Struct("<I")
_HEADER = struct.Struct("<4sIIQIIIIIII")  # signature ... clustering factor (48 bytes)
_HBIN = struct.Struct("<4sIIQQI")  # 32 bytes
_LOG_ENTRY = struct.Struct("<4sIIIIIQQ")  # 40 bytes

_TYPES = {t.value: t for t in ValueType}


def _checksum(block: bytes | bytearray | memoryview) -> int:
    """The base block's XOR-32 checksum over its first 508 bytes (0 and ~0 are avoided, as Windows does)."""
    value = 0
    for (word,) in struct.iter_unpack("<I", block[:508]):
        value ^= word
    if value == 0xFFFFFFFF:
        return 0xFFFFFFFE
    return value or 1


# --- reading ---------------------------------------------------------------------------------------


def read_hive(path: Path, *, allow_dirty: bool = False) -> Hive:
    """Read the hive file at ``path``. A dirty hive is repaired from ``<file>.LOG1``/``.LOG2`` beside it.

    ``allow_dirty=True`` reads a dirty hive without logs as the primary file has it (possibly missing the
    last changes Windows made) instead of refusing it.
    """
    data, logs = read_hive_file(path)
    return parse_hive(data, name=str(path), logs=logs, allow_dirty=allow_dirty)


def read_hive_file(path: Path) -> tuple[bytes, list[bytes]]:
    """The bytes of the hive file at ``path`` and, when it is dirty, of the transaction logs beside it."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise HiveError(f"cannot read the hive {path}: {exc.strerror or exc}") from exc
    logs: list[bytes] = []
    if _is_dirty(data):
        for suffix in (".LOG1", ".LOG2"):
            for candidate in (path.with_name(path.name + suffix), path.with_name(path.name + suffix.lower())):
                if candidate.is_file():
                    logs.append(candidate.read_bytes())
                    break
    return data, logs


def parse_hive(
    data: bytes,
    *,
    name: str = "hive",
    logs: Sequence[bytes] = (),
    allow_dirty: bool = False,
) -> Hive:
    """The hive held in ``data``. ``logs``: its transaction logs (``.LOG1`` then ``.LOG2``) for a dirty hive."""
    data = clean_hive_data(data, name=name, logs=logs, allow_dirty=allow_dirty)
    with _no_gc():
        return _Reader(data, name).read()


def clean_hive_data(data: bytes, *, name: str, logs: Sequence[bytes] = (), allow_dirty: bool = False) -> bytes:
    """``data`` with its header checked and, when it is dirty, its transaction logs replayed (see
    :func:`parse_hive` for when a dirty hive is refused)."""
    _check_base_block(data, name)
    if _is_dirty(data):
        replayed = _replay_logs(data, logs, name) if logs else None
        if replayed is not None:
            data = replayed
        elif not allow_dirty:
            primary, secondary = struct.unpack_from("<II", data, 4)
            missing = "hold no changes to replay" if logs else "were not found"
            raise HiveError(
                f"{name}: the hive was not cleanly closed (sequence numbers {primary} and {secondary} differ): "
                f"its transaction logs (.LOG1/.LOG2) must be replayed first, and they {missing}"
            )
    return data


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """Hold off the cycle collector while a hive is read or written: it would walk the hundreds of thousands
    of keys and values again and again (2.2 s of the 5.4 s an 80 MB hive took to read), and neither a hive's
    tree nor the writer's lists hold cycles for it to find."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _is_dirty(data: bytes) -> bool:
    if len(data) < BASE_BLOCK:
        return False
    primary, secondary = struct.unpack_from("<II", data, 4)
    return bool(primary != secondary)


def _check_base_block(data: bytes, name: str) -> None:
    if len(data) < 4 or data[:4] != b"regf":
        raise HiveError(f"{name}: not a registry hive (no 'regf' signature at the start)")
    if len(data) < BASE_BLOCK:
        raise HiveError(f"{name}: the hive is truncated ({len(data)} bytes, shorter than its 4096-byte header)")
    stored = _U32.unpack_from(data, 508)[0]
    if stored != _checksum(data):
        raise HiveError(f"{name}: the hive header is damaged (its checksum does not match)")
    file_type = _U32.unpack_from(data, 28)[0]
    if file_type != 0:
        raise HiveError(f"{name}: this is a transaction log (file type {file_type}), not a primary hive file")


class _Reader:
    """Walks the cells of one hive held in a bytes object (offsets are checked, cells are not copied)."""

    def __init__(self, data: bytes, name: str) -> None:
        self.data = data
        self.name = name
        (_, _, _, self.timestamp, self.major, self.minor, _, self.file_format, self.root_offset,
         bins_size, _) = _HEADER.unpack_from(data, 0)
        if self.major != 1 or not 2 <= self.minor <= 6:
            raise HiveError(f"{name}: unsupported hive format version {self.major}.{self.minor}")
        if bins_size % 4096 or bins_size < 4096:
            raise HiveError(f"{name}: the hive header is damaged (hive bins size {bins_size})")
        if BASE_BLOCK + bins_size > len(data):
            raise HiveError(
                f"{name}: the hive is truncated (its header announces {BASE_BLOCK + bins_size} bytes, "
                f"the file has {len(data)})"
            )
        self.end = BASE_BLOCK + bins_size
        self.big_data = (self.major, self.minor) >= (1, 4)
        raw_name = data[48:112]
        cut = next((i for i in range(0, 64, 2) if raw_name[i:i + 2] == b"\0\0"), 64)
        self.file_name = raw_name[:cut].decode("utf-16-le", "surrogatepass")
        self.security: dict[int, bytes] = {}
        self._check_bins()

    def corrupt(self, what: str) -> HiveError:
        return HiveError(f"{self.name}: the hive is damaged ({what}); refusing to read it")

    def _check_bins(self) -> None:
        data, pos, end = self.data, BASE_BLOCK, self.end
        while pos < end:
            signature, offset, size, _, _, _ = _HBIN.unpack_from(data, pos)
            if signature != b"hbin" or offset != pos - BASE_BLOCK or size < 4096 or size % 4096 or pos + size > end:
                raise self.corrupt(f"bad hive bin header at offset {pos - BASE_BLOCK:#x}")
            pos += size

    def cell(self, offset: int) -> tuple[int, int]:
        """``(start, length)`` of the data of the allocated cell at ``offset`` (file positions)."""
        pos = BASE_BLOCK + offset
        if offset & 7 or offset < HBIN_HEADER or pos + 8 > self.end:
            raise self.corrupt(f"cell offset {offset:#x} is out of range")
        size = -_I32.unpack_from(self.data, pos)[0]
        if size < 8 or pos + size > self.end:
            raise self.corrupt(f"cell at {offset:#x} is free or has a bad size")
        return pos + 4, size - 4

    def read(self) -> Hive:
        data = self.data
        nk_unpack = _NK.unpack_from
        start, length = self.cell(self.root_offset)
        root = self.key_node(start, length, self.root_offset)
        seen = {self.root_offset}
        stack = [(self.root_offset, root, start)]
        while stack:
            offset, key, start = stack.pop()
            (_, _, _, _, _, n_subkeys, _, subkeys_offset, _, n_values, values_offset, *_) = nk_unpack(data, start)
            if n_values:
                self.read_values(key, n_values, values_offset)
            if not n_subkeys:
                continue
            children = self.subkey_offsets(subkeys_offset)
            if len(children) != n_subkeys:
                raise self.corrupt(f"key at {offset:#x} lists {len(children)} subkeys but counts {n_subkeys}")
            subkeys = key.subkeys
            for child in children:
                if child in seen:
                    raise self.corrupt(f"key node at {child:#x} is reached twice")
                seen.add(child)
                child_start, child_length = self.cell(child)
                sub = self.key_node(child_start, child_length, child)
                folded = fold(sub.name)
                if folded in subkeys:
                    raise self.corrupt(f"two subkeys named {sub.name!r} under key at {offset:#x}")
                subkeys[folded] = sub
                stack.append((child, sub, child_start))
        return Hive(root, file_name=self.file_name, major_version=self.major, minor_version=self.minor)

    def key_node(self, start: int, length: int, offset: int) -> RegistryKey:
        data = self.data
        if length < 76 or data[start:start + 2] != b"nk":
            raise self.corrupt(f"cell at {offset:#x} is not a key node")
        (_, flags, stamp, _, _, _, _, _, _, _, _, security_offset, class_offset, max_name, _, _, _, _,
         name_length, class_length) = _NK.unpack_from(data, start)
        if 76 + name_length > length:
            raise self.corrupt(f"key node at {offset:#x} has a bad name length")
        raw = data[start + 76:start + 76 + name_length]
        try:
            name = raw.decode("latin-1") if flags & KEY_COMP_NAME else raw.decode("utf-16-le", "surrogatepass")
        except UnicodeDecodeError:
            raise self.corrupt(f"key node at {offset:#x} has a bad name") from None
        class_name = None
        if class_length and class_offset != NIL:
            class_start, class_cell = self.cell(class_offset)
            if class_length > class_cell or class_length & 1:
                raise self.corrupt(f"key node at {offset:#x} has a bad class name")
            class_name = data[class_start:class_start + class_length].decode("utf-16-le", "surrogatepass")
        security = self.security.get(security_offset)
        if security is None:
            security = self.security_descriptor(security_offset)
        # KEY_COMP_NAME only says how the name is stored; the writer decides that again.
        return RegistryKey(name, class_name=class_name, security=security, last_written=stamp,
                           flags=(flags & ~KEY_COMP_NAME) | (max_name & 0x00FF0000))

    def security_descriptor(self, offset: int) -> bytes:
        start, length = self.cell(offset)
        signature, _, _, _, _, size = _SK.unpack_from(self.data, start) if length >= 20 else (b"", 0, 0, 0, 0, 0)
        if signature != b"sk" or 20 + size > length:
            raise self.corrupt(f"cell at {offset:#x} is not a security descriptor")
        descriptor = self.data[start + 20:start + 20 + size]
        self.security[offset] = descriptor
        return descriptor

    def subkey_offsets(self, offset: int) -> list[int]:
        data = self.data
        start, length = self.cell(offset)
        signature, count = _LIST.unpack_from(data, start)
        if signature in (b"lh", b"lf"):
            if 4 + 8 * count > length:
                raise self.corrupt(f"subkey list at {offset:#x} is too short")
            return list(struct.unpack_from(f"<{2 * count}I", data, start + 4)[::2])
        if 4 + 4 * count > length:
            raise self.corrupt(f"subkey list at {offset:#x} is too short")
        entries = list(struct.unpack_from(f"<{count}I", data, start + 4))
        if signature == b"li":
            return entries
        if signature != b"ri":
            raise self.corrupt(f"cell at {offset:#x} is not a subkey list")
        result: list[int] = []
        for leaf in entries:
            leaf_start, _ = self.cell(leaf)
            if data[leaf_start:leaf_start + 2] not in (b"lh", b"lf", b"li"):
                raise self.corrupt(f"index root at {offset:#x} points to a cell that is not a subkey list")
            result.extend(self.subkey_offsets(leaf))
        return result

    def read_values(self, key: RegistryKey, count: int, offset: int) -> None:
        data = self.data
        start, length = self.cell(offset)
        if 4 * count > length:
            raise self.corrupt(f"value list at {offset:#x} is too short")
        values = key.values
        vk_unpack, i32_unpack, types, end, fold_name = _VK.unpack_from, _I32.unpack_from, _TYPES, self.end, fold
        # the hot loop of reading a hive: cell() inlined for the value cells and their data cells
        for vk_offset in struct.unpack_from(f"<{count}I", data, start):
            pos = BASE_BLOCK + vk_offset
            if vk_offset & 7 or vk_offset < HBIN_HEADER or pos + 8 > end:
                raise self.corrupt(f"cell offset {vk_offset:#x} is out of range")
            vk_length = -i32_unpack(data, pos)[0] - 4
            if vk_length < 20 or pos + vk_length + 4 > end:
                raise self.corrupt(f"cell at {vk_offset:#x} is not a value")
            vk_start = pos + 4
            signature, name_length, size, data_offset, kind, flags, _ = vk_unpack(data, vk_start)
            if signature != b"vk" or 20 + name_length > vk_length:
                raise self.corrupt(f"cell at {vk_offset:#x} is not a value")
            raw = data[vk_start + 20:vk_start + 20 + name_length]
            try:
                name = raw.decode("latin-1") if flags & VALUE_COMP_NAME else raw.decode("utf-16-le", "surrogatepass")
            except UnicodeDecodeError:
                raise self.corrupt(f"value at {vk_offset:#x} has a bad name") from None
            if size & DATA_INLINE:
                size &= 0x7FFFFFFF
                if size > 4:
                    raise self.corrupt(f"value at {vk_offset:#x} has a bad inline data size")
                blob = _U32.pack(data_offset)[:size]
            elif size == 0:
                blob = b""
            else:
                pos = BASE_BLOCK + data_offset
                in_range = not data_offset & 7 and data_offset >= HBIN_HEADER and pos + 8 <= end
                cell_size = -i32_unpack(data, pos)[0] if in_range else 0
                if cell_size >= 8 and pos + cell_size <= end and size <= cell_size - 4:
                    blob = data[pos + 4:pos + 4 + size]
                else:  # big data, or a damaged cell (value_data says which)
                    blob = self.value_data(size, data_offset, vk_offset)
            folded = fold_name(name)
            if folded in values:
                raise self.corrupt(f"two values named {name!r} in one key")
            values[folded] = RegistryValue(name, types.get(kind, kind), blob)

    def value_data(self, size: int, offset: int, vk_offset: int) -> bytes:
        data = self.data
        start, length = self.cell(offset)
        if size <= length:
            return data[start:start + size]
        if not (self.big_data and size > BIG_DATA_SEGMENT and data[start:start + 2] == b"db" and length >= 8):
            raise self.corrupt(f"value at {vk_offset:#x} has {size} bytes of data in a {length}-byte cell")
        _, segments, list_offset = _DB.unpack_from(data, start)
        if segments != -(-size // BIG_DATA_SEGMENT):
            raise self.corrupt(f"big data at {offset:#x} has {segments} segments for {size} bytes")
        list_start, list_length = self.cell(list_offset)
        if 4 * segments > list_length:
            raise self.corrupt(f"big data segment list at {list_offset:#x} is too short")
        parts = []
        remaining = size
        for segment in struct.unpack_from(f"<{segments}I", data, list_start):
            seg_start, seg_length = self.cell(segment)
            take = min(remaining, BIG_DATA_SEGMENT)
            if take > seg_length:
                raise self.corrupt(f"big data segment at {segment:#x} is too short")
            parts.append(data[seg_start:seg_start + take])
            remaining -= take
        return b"".join(parts)


# --- transaction logs ------------------------------------------------------------------------------

_MARVIN_SEED = 0x82EF4D887A4E55C5  # the seed Windows uses for log entries (low half 0x7A4E55C5 first)


def _marvin32(data: bytes | memoryview, seed: int = _MARVIN_SEED) -> int:
    """The 64-bit Marvin32 hash the new-format transaction logs use to check their entries."""
    lo, hi = seed & 0xFFFFFFFF, seed >> 32
    whole = len(data) & ~3
    mask = 0xFFFFFFFF

    def mix(lo: int, hi: int) -> tuple[int, int]:
        hi ^= lo
        lo = ((lo << 20) | (lo >> 12)) & mask
        lo = (lo + hi) & mask
        hi = ((hi << 9) | (hi >> 23)) & mask
        hi ^= lo
        lo = ((lo << 27) | (lo >> 5)) & mask
        lo = (lo + hi) & mask
        hi = ((hi << 19) | (hi >> 13)) & mask
        return lo, hi

    for (word,) in struct.iter_unpack("<I", data[:whole]):
        lo, hi = mix((lo + word) & mask, hi)
    tail = bytes(data[whole:])
    final = int.from_bytes(tail + b"\x80", "little")
    lo, hi = mix((lo + final) & mask, hi)
    lo, hi = mix(lo, hi)
    return (hi << 32) | lo


def _log_entries(log: bytes) -> dict[int, tuple[int, list[tuple[int, bytes]]]]:
    """``{sequence number: (hive bins size, [(offset, page)])}`` for the valid entries of a new-format log."""
    entries: dict[int, tuple[int, list[tuple[int, bytes]]]] = {}
    pos = 512
    view = memoryview(log)
    while pos + 40 <= len(log):
        signature, size, _, sequence, bins_size, pages, hash1, hash2 = _LOG_ENTRY.unpack_from(log, pos)
        if (signature != b"HvLE" or size < 40 or size % 512 or pos + size > len(log) or bins_size % 4096
                or 40 + 8 * pages > size):
            break
        if _marvin32(view[pos + 40:pos + size]) != hash1 or _marvin32(view[pos:pos + 32]) != hash2:
            break
        references = struct.unpack_from(f"<{2 * pages}I", log, pos + 40)
        page_pos = pos + 40 + 8 * pages
        dirty: list[tuple[int, bytes]] = []
        for offset, length in zip(references[::2], references[1::2], strict=True):
            if page_pos + length > pos + size or offset + length > bins_size:
                break
            dirty.append((offset, log[page_pos:page_pos + length]))
            page_pos += length
        else:
            entries.setdefault(sequence, (bins_size, dirty))
            pos += size
            continue
        break
    return entries


def _replay_logs(data: bytes, logs: Iterable[bytes], name: str) -> bytes | None:
    """The primary file with the changes of its new-format transaction logs applied (in memory), or
    ``None`` when the logs hold no entry as new as the primary file.

    Only entries whose Marvin32 hashes check out count. Replay starts at the oldest one whose sequence number
    is not below the primary file's secondary sequence number (not necessarily equal to it: Windows 10 logs
    run ahead of the primary's header - the SYSTEM_B test hive says 1621, its logs start at 2107) and goes
    on with each following number in turn, from either log, until one is missing. Each entry writes its
    dirty pages and sets the size of the hive bins.
    """
    entries: dict[int, tuple[int, list[tuple[int, bytes]]]] = {}
    for log in logs:
        if len(log) < 512 or log[:4] != b"regf" or _U32.unpack_from(log, 508)[0] != _checksum(log):
            continue  # a missing or damaged log holds nothing to replay
        if _U32.unpack_from(log, 28)[0] != 6:
            raise HiveError(f"{name}: its transaction logs are in the old (pre-Windows 8.1) format, "
                            "which this reader cannot replay")
        for sequence, entry in _log_entries(log).items():
            entries.setdefault(sequence, entry)
    secondary = _U32.unpack_from(data, 8)[0]
    pending = sorted(s for s in entries if s >= secondary)
    if not pending:
        return None
    buffer = bytearray(data)
    sequence = pending[0]
    while sequence in entries:
        bins_size, pages = entries[sequence]
        end = BASE_BLOCK + bins_size
        if end > len(buffer) + sum(len(page) for _, page in pages):
            break  # a hive grows by the bins an entry brings along; more than that is a bogus entry
        if len(buffer) < end:
            buffer.extend(bytes(end - len(buffer)))
        for offset, page in pages:
            buffer[BASE_BLOCK + offset:BASE_BLOCK + offset + len(page)] = page
        struct.pack_into("<II", buffer, 4, sequence, sequence)
        _U32.pack_into(buffer, 40, bins_size)
        sequence += 1
    if sequence == pending[0]:
        return None
    del buffer[BASE_BLOCK + _U32.unpack_from(buffer, 40)[0]:]
    _U32.pack_into(buffer, 508, _checksum(buffer))
    return bytes(buffer)


# --- writing ---------------------------------------------------------------------------------------


def write_hive(hive: Hive, path: Path) -> None:
    """Write ``hive`` to ``path`` atomically (a temporary file beside it, synced, then renamed over it)."""
    write_atomic(path, serialize_hive(hive))


def default_security_descriptor() -> bytes:
    """A self-relative descriptor for keys that have none: SYSTEM and Administrators full control, Users
    read, inherited by subkeys; owner Administrators, group SYSTEM."""

    def sid(*parts: int) -> bytes:
        authority, *subs = parts
        return struct.pack(f"<BB6s{len(subs)}I", 1, len(subs), authority.to_bytes(6, "big"), *subs)

    system, admins, users = sid(5, 18), sid(5, 32, 544), sid(5, 32, 545)
    key_all_access, key_read, container_inherit = 0xF003F, 0x20019, 0x02
    aces = b"".join(
        struct.pack("<BBHI", 0, container_inherit, 8 + len(who), mask) + who
        for who, mask in ((system, key_all_access), (admins, key_all_access), (users, key_read))
    )
    acl = struct.pack("<BBHHH", 2, 0, 8 + len(aces), 3, 0) + aces
    owner_at = 20
    group_at = owner_at + len(admins)
    dacl_at = group_at + len(system)
    control = 0x8004  # self-relative, DACL present
    return struct.pack("<BBHIIII", 1, 0, control, owner_at, group_at, 0, dacl_at) + admins + system + acl


_UPCASE: dict[str, str] = {}


def _upcase(name: str) -> str:
    """The name upper-cased one UTF-16 unit at a time, as Windows compares and hashes key names."""
    if name.isascii():
        return name.upper()
    out = []
    for ch in name:
        up = _UPCASE.get(ch)
        if up is None:
            up = ch.upper()
            if len(up) != 1:
                up = ch
            _UPCASE[ch] = up
        out.append(up)
    return "".join(out)


def _encode_name(name: str) -> tuple[bytes, bool]:
    """The stored form of a key or value name and whether it is compressed (Latin-1)."""
    try:
        return name.encode("latin-1"), True
    except UnicodeEncodeError:
        return name.encode("utf-16-le", "surrogatepass"), False


#: 37 ** k modulo 2 ** 32, highest power first: ``_POWERS_37[-n:]`` weighs the n units of a name.
_POWERS_37 = [pow(37, k, 1 << 32) for k in range(1024, -1, -1)]


def _name_hash(upper: str) -> int:
    """The lh hash of an upper-cased name: h = h * 37 + unit over its UTF-16 units, 32 bits (the same as the
    sum of each unit times 37 to the power of the units after it, which runs in C)."""
    if upper.isascii():
        units: Sequence[int] = upper.encode("ascii")
    else:
        raw = upper.encode("utf-16-le", "surrogatepass")
        units = struct.unpack(f"<{len(raw) // 2}H", raw)
    if not units:
        return 0
    if len(units) <= len(_POWERS_37):
        return int(sum(map(operator.mul, units, _POWERS_37[-len(units):]))) & 0xFFFFFFFF
    value = 0
    for unit in units:
        value = (value * 37 + unit) & 0xFFFFFFFF
    return value


def _name_hint(name: str) -> bytes:
    head = name[:4]
    try:
        return head.encode("latin-1").ljust(4, b"\0")
    except UnicodeEncodeError:
        return b"\0\0\0\0"


class _Writer:
    def __init__(self, hive: Hive) -> None:
        self.hive = hive
        self.buf = bytearray()
        self.pos = 0
        self.bin_end = 0
        self.big_data = (hive.major_version, hive.minor_version) >= (1, 4)
        self.leaf = b"lh" if (hive.major_version, hive.minor_version) >= (1, 5) else b"lf"
        self.security: dict[bytes, int] = {}
        self.references: dict[int, int] = {}
        self.newest = 0

    # -- cells ------------------------------------------------------------------------------------

    def alloc(self, length: int) -> int:
        """Allocate a cell for ``length`` bytes of data; its offset (the data starts 4 bytes later)."""
        size = (length + 11) & ~7
        if self.pos + size > self.bin_end:
            self.new_bin(size)
        offset = self.pos
        _I32.pack_into(self.buf, offset, -size)
        self.pos += size
        return offset

    def new_bin(self, cell_size: int) -> None:
        self.close_bin()
        start = self.bin_end
        size = max(4096, (cell_size + HBIN_HEADER + 4095) & ~4095)
        self.buf.extend(bytes(size))
        _HBIN.pack_into(self.buf, start, b"hbin", start, size, 0, 0, 0)
        self.pos, self.bin_end = start + HBIN_HEADER, start + size

    def close_bin(self) -> None:
        if self.pos < self.bin_end:
            _I32.pack_into(self.buf, self.pos, self.bin_end - self.pos)  # the rest of the bin: one free cell
            self.pos = self.bin_end

    def cell_with(self, payload: bytes) -> int:
        offset = self.alloc(len(payload))
        self.buf[offset + 4:offset + 4 + len(payload)] = payload
        return offset

    def offsets_cell(self, offsets: Sequence[int]) -> int:
        return self.cell_with(struct.pack(f"<{len(offsets)}I", *offsets))

    # -- tree -------------------------------------------------------------------------------------

    def serialize(self) -> bytearray:
        root = self.hive.root
        root_name, root_comp = _encode_name(root.name)
        root_offset = self.alloc(76 + len(root_name))
        fallback = root.security if root.security is not None else default_security_descriptor()
        stack: list[tuple[RegistryKey, int, int, bytes, bytes, bool]] = [
            (root, root_offset, NIL, fallback, root_name, root_comp)
        ]
        while stack:
            key, offset, parent, inherited, name, compressed = stack.pop()
            security = key.security if key.security is not None else inherited
            children = self.write_key(key, offset, parent, security, name, compressed, key is root)
            stack.extend(reversed(children))
        self.close_bin()
        self.link_security()
        return self.base_block(root_offset) + self.buf

    def write_key(self, key: RegistryKey, offset: int, parent: int, security: bytes, name: bytes,
                  compressed: bool, is_root: bool,
                  ) -> list[tuple[RegistryKey, int, int, bytes, bytes, bool]]:
        if not is_root and (not key.name or "\\" in key.name):
            raise HiveError(f"{key.name!r} cannot be a registry key name (empty, or holds a backslash)")
        if len(name) > 0xFFFF:
            raise HiveError(f"the key name {key.name[:40]!r}… is too long")
        self.newest = max(self.newest, key.last_written)
        sk = self.security_cell(security)
        class_offset, class_length = NIL, 0
        if key.class_name:
            raw_class = key.class_name.encode("utf-16-le", "surrogatepass")
            if len(raw_class) > 0xFFFF:
                raise HiveError(f"the class name of key {key.name!r} is too long")
            class_offset, class_length = self.cell_with(raw_class), len(raw_class)
        values_offset, max_value_name, max_value_data = self.write_values(key)
        # Windows keeps subkey lists sorted by the upper-cased name's UTF-16 units (and hashes that name)
        uppers = [(_upcase(child.name), child) for child in key.subkeys.values()]
        uppers.sort(key=lambda pair: pair[0].encode("utf-16-be", "surrogatepass"))
        children = []
        listed: list[tuple[int, str, str]] = []
        max_name = max_class = 0
        for upper, child in uppers:
            child_name, child_comp = _encode_name(child.name)
            child_offset = self.alloc(76 + len(child_name))
            children.append((child, child_offset, offset, security, child_name, child_comp))
            listed.append((child_offset, upper, child.name))
            shown = 2 * len(child_name) if child_comp else len(child_name)
            if shown > max_name:
                max_name = shown
            if child.class_name:
                max_class = max(max_class, len(child.class_name.encode("utf-16-le", "surrogatepass")))
        subkeys_offset = self.subkey_list(listed) if listed else NIL
        flags = (key.flags & 0xFFFF & ~_COMPUTED_FLAGS) | (KEY_COMP_NAME if compressed else 0)
        if is_root:
            flags |= KEY_HIVE_ENTRY | KEY_NO_DELETE
        _NK.pack_into(
            self.buf, offset + 4, b"nk", flags, key.last_written, 0, parent, len(children), 0, subkeys_offset,
            NIL, len(key.values), values_offset, sk, class_offset, min(max_name, 0xFFFF) | (key.flags & 0x00FF0000),
            max_class, max_value_name, max_value_data, 0, len(name), class_length,
        )
        self.buf[offset + 80:offset + 80 + len(name)] = name
        return children

    def write_values(self, key: RegistryKey) -> tuple[int, int, int]:
        if not key.values:
            return NIL, 0, 0
        buf, vk_pack, i32_pack = self.buf, _VK.pack_into, _I32.pack_into
        small_data = BIG_DATA_SEGMENT if self.big_data else 0x7FFFFFFF
        offsets = []
        max_name = max_data = 0
        # the hot loop of writing a hive: alloc() and cell_with() inlined for the value and data cells
        for value in key.values.values():
            try:
                name, compressed = value.name.encode("latin-1"), True
            except UnicodeEncodeError:
                name, compressed = value.name.encode("utf-16-le", "surrogatepass"), False
            name_length = len(name)
            if name_length > 0xFFFF:
                raise HiveError(f"the value name {value.name[:40]!r}… is too long")
            data = value.data if type(value.data) is bytes else bytes(value.data)
            size = len(data)
            kind = value.type
            if not 0 <= kind <= 0xFFFFFFFF:
                raise HiveError(f"value {value.name!r} has a type outside 32 bits ({kind})")
            if size <= 4:
                size_field, data_field = size | DATA_INLINE, int.from_bytes(data, "little")
            elif size <= small_data:
                cell = (size + 11) & ~7
                if self.pos + cell > self.bin_end:
                    self.new_bin(cell)
                data_field = self.pos
                self.pos += cell
                i32_pack(buf, data_field, -cell)
                buf[data_field + 4:data_field + 4 + size] = data
                size_field = size
            else:
                size_field, data_field = size, self.data_cells(data, value.name)
            cell = (name_length + 31) & ~7  # 20 bytes of vk, the name, the size field, rounded to 8
            if self.pos + cell > self.bin_end:
                self.new_bin(cell)
            vk = self.pos
            self.pos += cell
            i32_pack(buf, vk, -cell)
            # Windows leaves the flag off for the default value (empty name)
            vk_pack(buf, vk + 4, b"vk", name_length, size_field, data_field, kind,
                    VALUE_COMP_NAME if compressed and name else 0, 0)
            buf[vk + 24:vk + 24 + name_length] = name
            offsets.append(vk)
            shown = 2 * name_length if compressed else name_length
            if shown > max_name:
                max_name = shown
            if size > max_data:
                max_data = size
        return self.offsets_cell(offsets), max_name, max_data

    def data_cells(self, data: bytes, name: str) -> int:
        if len(data) > 0x7FFFFFFF:
            raise HiveError(f"value {name!r} is too large for a hive ({len(data)} bytes)")
        if not self.big_data or len(data) <= BIG_DATA_SEGMENT:
            return self.cell_with(data)
        # Like Windows, every segment cell - the last one too - holds a full 16,344 bytes: readers such as hivex
        # take a segment's length from its cell and would cut a shorter last segment short.
        segments = [self.cell_with(data[i:i + BIG_DATA_SEGMENT].ljust(BIG_DATA_SEGMENT, b"\0"))
                    for i in range(0, len(data), BIG_DATA_SEGMENT)]
        if len(segments) > 0xFFFF:
            raise HiveError(f"value {name!r} is too large for a hive ({len(data)} bytes)")
        segment_list = self.offsets_cell(segments)
        return self.cell_with(_DB.pack(b"db", len(segments), segment_list))

    def subkey_list(self, children: list[tuple[int, str, str]]) -> int:
        """The list cell of sorted subkeys given as ``(offset, upper-cased name, name)``."""
        per_leaf = max(LEAF_MAX, -(-len(children) // _RI_MAX))
        leaves = [self.leaf_cell(children[i:i + per_leaf]) for i in range(0, len(children), per_leaf)]
        if len(leaves) == 1:
            return leaves[0]
        return self.cell_with(_LIST.pack(b"ri", len(leaves)) + struct.pack(f"<{len(leaves)}I", *leaves))

    def leaf_cell(self, children: list[tuple[int, str, str]]) -> int:
        fields: list[int | bytes] = []
        if self.leaf == b"lh":
            for offset, upper, _ in children:
                fields += (offset, _name_hash(upper))
            return self.cell_with(_LIST.pack(b"lh", len(children)) + struct.pack(f"<{len(fields)}I", *fields))
        for offset, _, name in children:
            fields += (offset, _name_hint(name))
        return self.cell_with(_LIST.pack(b"lf", len(children)) + struct.pack("<" + "I4s" * len(children), *fields))

    def security_cell(self, descriptor: bytes) -> int:
        offset = self.security.get(descriptor)
        if offset is None:
            offset = self.alloc(20 + len(descriptor))
            self.buf[offset + 24:offset + 24 + len(descriptor)] = descriptor
            self.security[descriptor] = offset
            self.references[offset] = 0
        self.references[offset] += 1
        return offset

    def link_security(self) -> None:
        """Chain the security cells into their circular list (in allocation order) with reference counts."""
        chain = list(self.security.items())
        for index, (descriptor, offset) in enumerate(chain):
            following = chain[(index + 1) % len(chain)][1]
            previous = chain[index - 1][1]
            _SK.pack_into(self.buf, offset + 4, b"sk", 0, following, previous, self.references[offset],
                          len(descriptor))

    def base_block(self, root_offset: int) -> bytearray:
        hive = self.hive
        header = bytearray(BASE_BLOCK)
        stamp = self.newest
        _HEADER.pack_into(header, 0, b"regf", 1, 1, stamp, hive.major_version, hive.minor_version, 0, 1,
                          root_offset, len(self.buf), 1)
        file_name = hive.file_name.encode("utf-16-le", "surrogatepass")[-64:]
        header[48:48 + len(file_name)] = file_name
        _U32.pack_into(header, 508, _checksum(header))
        struct.pack_into("<Q", self.buf, 20, stamp)  # the first bin's copy of the timestamp
        return header


def serialize_hive(hive: Hive) -> bytes:
    """The hive file for ``hive`` (see the module documentation for the layout)."""
    with _no_gc():
        return bytes(_Writer(hive).serialize())
