"""Change a hive file where it changes, instead of writing the whole tree anew (as Windows itself does).

:func:`open_hive` checks the hive's header, every hive bin and every cell boundary, and returns a
:class:`PatchedHive`: a :class:`~app.engine.registry.model.Hive` whose keys are read from the file when a
path reaches them (``find``, ``ensure``, ``delete``, and a key's ``value``/``subkey`` methods), so a registry
delta applies to it as to a hive read whole. :meth:`PatchedHive.to_bytes` then writes only what changed:

* a key whose values changed gets new value cells and a new value list;
* a key that gained or lost subkeys gets a new subkey list, laid out as :mod:`~app.engine.registry.regf`'s
  writer lays out every list (``lh``/``lf`` leaves, an ``ri`` over them when there are many);
* a new key is written with everything below it, inheriting its parent's security cell (whose reference
  count goes up);
* a deleted key's cells (key node, values, data, big-data segments, lists, class name) are freed, and its
  security cell's reference count goes down; a security cell nothing refers to any more leaves the list
  and is freed;
* the key nodes of changed keys are updated where they are (last write time, counts, list offsets, the
  longest-name and longest-data fields).

New cells go into hive bins appended at the end of the file; a freed cell becomes a free cell, merged with
free cells next to it in its bin. Every other byte keeps its place, so the work and the memory are those of
the changes plus one copy of the file, not of the tree: an 80 MB SOFTWARE hive takes a fraction of a second
instead of the seconds and hundreds of megabytes a whole read and rewrite cost.

What is checked: the header (as :func:`~app.engine.registry.regf.parse_hive` checks it, dirty hives
included), every bin header and cell boundary of the file, and every cell the changes read or free. A
damaged cell that nothing reaches is carried over as it is.
"""

from __future__ import annotations

import bisect
import hashlib
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path

from app.engine.registry.model import Hive, RegistryKey, RegistryValue, fold
from app.engine.registry.regf import (
    _DB,
    _HBIN,
    _I32,
    _NK,
    _SK,
    _U32,
    _VK,
    BASE_BLOCK,
    BIG_DATA_SEGMENT,
    DATA_INLINE,
    HBIN_HEADER,
    KEY_COMP_NAME,
    NIL,
    _checksum,
    _encode_name,
    _no_gc,
    _Reader,
    _upcase,
    _Writer,
    clean_hive_data,
    read_hive_file,
)
from app.files import write_atomic

__all__ = ["PatchedHive", "open_hive"]

# Where the fields of a key node's data sit (see ``_NK``): the last write time, counts and offsets this
# module updates.
_NK_WRITTEN = 4
_NK_SUBKEY_COUNT = 20
_NK_SUBKEY_LIST = 28
_NK_VALUE_COUNT = 36
_NK_VALUE_LIST = 40
_NK_SECURITY = 44
_NK_MAX_NAME = 52
_NK_MAX_CLASS = 56
_NK_MAX_VALUE_NAME = 60
_NK_MAX_VALUE_DATA = 64
# ... and of a security cell's data: forward link, backward link, reference count.
_SK_FLINK = 4
_SK_BLINK = 8
_SK_REFS = 12


def open_hive(path: Path, *, allow_dirty: bool = False) -> PatchedHive:
    """Open the hive file at ``path`` for changes (a dirty hive is replayed from the logs beside it, as
    :func:`~app.engine.registry.regf.read_hive` does)."""
    data, logs = read_hive_file(path)
    return PatchedHive(data, name=str(path), logs=logs, allow_dirty=allow_dirty)


class _StoredKey(RegistryKey):
    """A key that is in the hive file. Its values and its subkeys' names are read when it is opened: by any
    of the methods below, or by a :class:`PatchedHive` path lookup that reaches it. A subkey becomes a key
    object of its own only when it is asked for (a key such as ``Classes\\CLSID`` has tens of thousands).
    :attr:`subkeys` holds the subkeys asked for and the new ones."""

    def __init__(self, hive: PatchedHive, offset: int, key: RegistryKey) -> None:
        super().__init__(key.name, class_name=key.class_name, security=key.security,
                         last_written=key.last_written, flags=key.flags)
        self.hive = hive
        self.offset = offset
        self.opened = False
        #: As read: the last write time.
        self.stored_written = key.last_written
        #: As read: the values (folded name, name, type, data), to tell whether they changed.
        self.stored_values: list[tuple[str, str, int, bytes]] = []
        #: As read: each subkey's folded name -> (key node offset, name).
        self.stored_subkeys: dict[str, tuple[int, str]] = {}
        #: The folded names of stored subkeys deleted since (one may have been created again, as a new key).
        self.deleted: set[str] = set()

    def open(self) -> None:
        if not self.opened:
            self.hive.open_key(self)

    def value(self, name: str) -> RegistryValue | None:
        self.open()
        return super().value(name)

    def set_value(self, name: str, type: int, data: bytes) -> RegistryValue:
        self.open()
        return super().set_value(name, type, data)

    def delete_value(self, name: str) -> bool:
        self.open()
        return super().delete_value(name)

    def subkey(self, name: str) -> RegistryKey | None:
        self.open()
        folded = fold(name)
        key = self.subkeys.get(folded)
        if key is None and folded in self.stored_subkeys and folded not in self.deleted:
            key = self.subkeys[folded] = self.hive.stored_key(self.stored_subkeys[folded][0])
        return key

    def add_subkey(self, name: str) -> RegistryKey:
        key = self.subkey(name)
        if key is None:
            key = self.subkeys[fold(name)] = RegistryKey(name)
        return key

    def delete_subkey(self, name: str) -> bool:
        self.open()
        folded = fold(name)
        found = self.subkeys.pop(folded, None) is not None
        if folded in self.stored_subkeys and folded not in self.deleted:
            self.deleted.add(folded)
            found = True
        return found

    def walk(self, path: str = "") -> Iterator[tuple[str, RegistryKey]]:
        self.open()
        yield path, self
        for folded, (_, name) in self.stored_subkeys.items():
            if folded not in self.deleted:
                self.subkey(name)
        for key in list(self.subkeys.values()):
            yield from key.walk(f"{path}\\{key.name}" if path else key.name)


class PatchedHive(Hive):
    """A hive file opened for changes (see the module documentation)."""

    def __init__(self, data: bytes, *, name: str = "hive", logs: Sequence[bytes] = (),
                 allow_dirty: bool = False) -> None:
        data = clean_hive_data(data, name=name, logs=logs, allow_dirty=allow_dirty)
        self._reader = reader = _Reader(data, name)
        self._bins = _check_cells(reader)
        start, length = reader.cell(reader.root_offset)
        root = _StoredKey(self, reader.root_offset, reader.key_node(start, length, reader.root_offset))
        super().__init__(root, file_name=reader.file_name, major_version=reader.major,
                         minor_version=reader.minor)

    # --- reading, as paths reach keys ---------------------------------------------------------

    def find(self, path: str) -> RegistryKey | None:
        key = super().find(path)
        if isinstance(key, _StoredKey):
            key.open()
        return key

    def ensure(self, path: str, *, written: int | None = None) -> RegistryKey:
        key = super().ensure(path, written=written)
        if isinstance(key, _StoredKey):
            key.open()
        return key

    def open_key(self, key: _StoredKey) -> None:
        """Read ``key``'s values and its subkeys' names (their key nodes wait until they are asked for)."""
        reader, data = self._reader, self._reader.data
        start, _ = reader.cell(key.offset)
        (_, _, _, _, _, n_subkeys, _, subkeys_offset, _, n_values, values_offset, *_) = _NK.unpack_from(data, start)
        stored: dict[str, tuple[int, str]] = {}
        with _no_gc():
            if n_values:
                reader.read_values(key, n_values, values_offset)
            key.stored_values = [(folded, v.name, v.type, v.data) for folded, v in key.values.items()]
            if n_subkeys:
                children = reader.subkey_offsets(subkeys_offset)
                if len(children) != n_subkeys:
                    raise reader.corrupt(f"key at {key.offset:#x} lists {len(children)} subkeys but counts "
                                         f"{n_subkeys}")
                for child in children:
                    name = _stored_name(reader, child)
                    folded = fold(name)
                    if folded in stored:
                        raise reader.corrupt(f"two subkeys named {name!r} under key at {key.offset:#x}")
                    stored[folded] = (child, name)
        key.stored_subkeys = stored
        key.opened = True

    def stored_key(self, offset: int) -> _StoredKey:
        """The key whose key node is at ``offset`` (not opened yet)."""
        start, length = self._reader.cell(offset)
        return _StoredKey(self, offset, self._reader.key_node(start, length, offset))

    # --- writing ------------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """The hive file with the changes made so far (the opened hive itself is left as it was)."""
        return b"".join(self._pieces())

    def write(self, path: Path) -> str:
        """Write the hive file with the changes made so far to ``path`` atomically (see
        :func:`~app.files.write_atomic`); its SHA-256, in hex. Holds one copy of the file in memory, besides
        the file as read."""
        header, bins = self._pieces()
        digest = hashlib.sha256(header)
        digest.update(bins)
        write_atomic(path, header, bins)
        return digest.hexdigest()

    def _pieces(self) -> tuple[bytes, bytearray]:
        """The new header and hive bins."""
        with _no_gc():
            return _Patcher(self, self._reader, self._bins).run()


def _stored_name(reader: _Reader, offset: int) -> str:
    """The name in the key node at ``offset`` (the rest of the node is checked when the key is read)."""
    data = reader.data
    start, length = reader.cell(offset)
    if length < 76 or data[start:start + 2] != b"nk":
        raise reader.corrupt(f"cell at {offset:#x} is not a key node")
    (flags,) = struct.unpack_from("<H", data, start + 2)
    (name_length,) = struct.unpack_from("<H", data, start + 72)
    if 76 + name_length > length:
        raise reader.corrupt(f"key node at {offset:#x} has a bad name length")
    raw = data[start + 76:start + 76 + name_length]
    try:
        return raw.decode("latin-1") if flags & KEY_COMP_NAME else raw.decode("utf-16-le", "surrogatepass")
    except UnicodeDecodeError:
        raise reader.corrupt(f"key node at {offset:#x} has a bad name") from None


def _check_cells(reader: _Reader) -> list[int]:
    """Walk every cell of every bin (sizes non-zero, multiples of 8, ending where their bin ends); the bins'
    offsets, in order."""
    data, end = reader.data, reader.end
    i32 = _I32.unpack_from
    bins: list[int] = []
    pos = BASE_BLOCK
    while pos < end:
        size = _U32.unpack_from(data, pos + 8)[0]
        bins.append(pos - BASE_BLOCK)
        cell, bin_end = pos + HBIN_HEADER, pos + size
        while cell < bin_end:
            length = i32(data, cell)[0]
            if length == 0 or length & 7:
                raise reader.corrupt(f"cell at {cell - BASE_BLOCK:#x} has a bad size")
            cell += length if length > 0 else -length
        if cell != bin_end:
            raise reader.corrupt(f"a cell overruns the hive bin at {pos - BASE_BLOCK:#x}")
        pos = bin_end
    return bins


class _Patcher(_Writer):
    """Writes a :class:`PatchedHive`'s changes into a copy of its bins: new cells in bins appended at the end
    (the writer's allocator, started at the end of the file), freed cells marked free in place."""

    def __init__(self, hive: PatchedHive, reader: _Reader, bins: list[int]) -> None:
        super().__init__(hive)
        self.reader = reader
        self.bins = bins
        self.buf = bytearray(memoryview(reader.data)[BASE_BLOCK:reader.end])
        self.pos = self.bin_end = len(self.buf)
        self.freed_bins: set[int] = set()
        # the descriptors of the security cells read so far, for new keys to share
        self.security = {descriptor: offset for offset, descriptor in reader.security.items()}
        self.new_security: list[int] = []

    def run(self) -> tuple[bytes, bytearray]:
        root = self.hive.root
        assert isinstance(root, _StoredKey)
        stack = [root]
        while stack:
            key = stack.pop()
            if key.opened:
                stack.extend(self.commit(key))
        self.close_bin()
        self.settle_security()
        self.merge_free_cells()
        header = bytearray(self.reader.data[:BASE_BLOCK])
        sequence = (_U32.unpack_from(header, 4)[0] + 1) & 0xFFFFFFFF
        struct.pack_into("<II", header, 4, sequence, sequence)
        struct.pack_into("<Q", header, 12, max(struct.unpack_from("<Q", header, 12)[0], self.newest))
        _U32.pack_into(header, 40, len(self.buf))
        _U32.pack_into(header, 508, _checksum(header))
        return bytes(header), self.buf

    # -- changed keys -------------------------------------------------------------------------------

    def commit(self, key: _StoredKey) -> list[_StoredKey]:
        """Write what changed in the opened ``key``; its stored subkeys that stay (to be looked at next)."""
        buf, nk = self.buf, key.offset + 4
        if key.last_written != key.stored_written:
            struct.pack_into("<Q", buf, nk + _NK_WRITTEN, key.last_written)
            self.newest = max(self.newest, key.last_written)
        current = [(folded, v.name, v.type, v.data) for folded, v in key.values.items()]
        if current != key.stored_values:
            (count,) = _U32.unpack_from(buf, nk + _NK_VALUE_COUNT)
            if count:
                self.free_values(count, _U32.unpack_from(buf, nk + _NK_VALUE_LIST)[0])
            values_offset, max_value_name, max_value_data = self.write_values(key)
            for field, number in ((_NK_VALUE_COUNT, len(key.values)), (_NK_VALUE_LIST, values_offset),
                                  (_NK_MAX_VALUE_NAME, max_value_name), (_NK_MAX_VALUE_DATA, max_value_data)):
                _U32.pack_into(buf, nk + field, number)
        subkeys, deleted = key.subkeys, key.deleted
        staying = [child for child in subkeys.values() if isinstance(child, _StoredKey)]
        if not deleted and len(staying) == len(subkeys):
            return staying
        for folded in deleted:
            self.free_key(key.stored_subkeys[folded][0])
        (count,) = _U32.unpack_from(buf, nk + _NK_SUBKEY_COUNT)
        if count:
            self.free_subkey_list(_U32.unpack_from(buf, nk + _NK_SUBKEY_LIST)[0])
        (security_offset,) = _U32.unpack_from(buf, nk + _NK_SECURITY)
        listed: list[tuple[int, str, str]] = []
        max_name = max_class = 0
        data, cell = self.reader.data, self.reader.cell
        for folded, (offset, name) in key.stored_subkeys.items():
            if folded in deleted:
                continue
            listed.append((offset, _upcase(name), name))
            max_name = max(max_name, len(name.encode("utf-16-le", "surrogatepass")))  # as UTF-16, stored either way
            max_class = max(max_class, struct.unpack_from("<H", data, cell(offset)[0] + 74)[0])
        for child in subkeys.values():
            if isinstance(child, _StoredKey):
                continue
            encoded, compressed = _encode_name(child.name)
            offset = self.write_new_key(child, key.offset, security_offset, encoded, compressed)
            listed.append((offset, _upcase(child.name), child.name))
            max_name = max(max_name, 2 * len(encoded) if compressed else len(encoded))
            if child.class_name:
                max_class = max(max_class, len(child.class_name.encode("utf-16-le", "surrogatepass")))
        listed.sort(key=lambda entry: entry[1].encode("utf-16-be", "surrogatepass"))
        (name_field,) = _U32.unpack_from(buf, nk + _NK_MAX_NAME)
        for field, number in ((_NK_SUBKEY_COUNT, len(listed)),
                              (_NK_SUBKEY_LIST, self.subkey_list(listed) if listed else NIL),
                              (_NK_MAX_NAME, (name_field & 0xFFFF0000) | min(max_name, 0xFFFF)),
                              (_NK_MAX_CLASS, max_class)):
            _U32.pack_into(buf, nk + field, number)
        return staying

    def write_new_key(self, key: RegistryKey, parent: int, parent_security: int, name: bytes,
                      compressed: bool) -> int:
        """Write a key that is not in the file, with everything below it; its offset."""
        descriptor = self.reader.security.get(parent_security)
        if descriptor is None:
            descriptor = self.reader.security_descriptor(parent_security)
        self.security.setdefault(descriptor, parent_security)
        offset = self.alloc(76 + len(name))
        stack = [(key, offset, parent, descriptor, name, compressed)]
        while stack:
            child, at, above, inherited, child_name, child_compressed = stack.pop()
            security = child.security if child.security is not None else inherited
            stack.extend(reversed(self.write_key(child, at, above, security, child_name, child_compressed, False)))
        return offset

    # -- security cells -----------------------------------------------------------------------------

    def security_cell(self, descriptor: bytes) -> int:
        """The security cell for ``descriptor``: one in the file when one holds it, else a new one."""
        offset = self.security.get(descriptor)
        if offset is None:
            offset = self.alloc(20 + len(descriptor))
            self.buf[offset + 24:offset + 24 + len(descriptor)] = descriptor
            _SK.pack_into(self.buf, offset + 4, b"sk", 0, offset, offset, 0, len(descriptor))
            self.security[descriptor] = offset
            self.new_security.append(offset)
        self.references[offset] = self.references.get(offset, 0) + 1
        return offset

    def settle_security(self) -> None:
        """Apply the reference count changes; unlink and free the security cells left unused, link new ones
        in after the root key's."""
        buf = self.buf
        for offset, change in self.references.items():
            at = offset + 4
            count = _U32.unpack_from(buf, at + _SK_REFS)[0] + change
            if count > 0:
                _U32.pack_into(buf, at + _SK_REFS, count)
                continue
            if count < 0:
                raise self.reader.corrupt(f"security cell at {offset:#x} has a bad reference count")
            following, previous = struct.unpack_from("<II", buf, at + _SK_FLINK)
            _U32.pack_into(buf, previous + 4 + _SK_FLINK, following)
            _U32.pack_into(buf, following + 4 + _SK_BLINK, previous)
            self.free(offset)
        (anchor,) = _U32.unpack_from(buf, self.reader.root_offset + 4 + _NK_SECURITY)
        for offset in self.new_security:
            if self.references.get(offset, 0) <= 0:
                continue  # (freed above)
            (following,) = _U32.unpack_from(buf, anchor + 4 + _SK_FLINK)
            struct.pack_into("<II", buf, offset + 4 + _SK_FLINK, following, anchor)
            _U32.pack_into(buf, anchor + 4 + _SK_FLINK, offset)
            _U32.pack_into(buf, following + 4 + _SK_BLINK, offset)

    def link_security(self) -> None:
        raise AssertionError("a patch keeps the file's security list (see settle_security)")

    # -- freeing ------------------------------------------------------------------------------------

    def free(self, offset: int) -> None:
        buf = self.buf
        if offset & 7 or offset < HBIN_HEADER or offset + 8 > len(buf):
            raise self.reader.corrupt(f"cell offset {offset:#x} is out of range")
        (size,) = _I32.unpack_from(buf, offset)
        if size >= 0:
            raise self.reader.corrupt(f"cell at {offset:#x} is referred to twice or is free")
        _I32.pack_into(buf, offset, -size)
        self.freed_bins.add(self.bins[bisect.bisect_right(self.bins, offset) - 1])

    def free_key(self, offset: int) -> None:
        """Free a key of the file with everything below it (as the file has them)."""
        reader, data = self.reader, self.reader.data
        stack = [offset]
        while stack:
            at = stack.pop()
            start, length = reader.cell(at)
            if length < 76 or data[start:start + 2] != b"nk":
                raise reader.corrupt(f"cell at {at:#x} is not a key node")
            fields = _NK.unpack_from(data, start)
            n_subkeys, subkeys_offset, n_values, values_offset = fields[5], fields[7], fields[9], fields[10]
            security_offset, class_offset, class_length = fields[11], fields[12], fields[19]
            if n_values:
                self.free_values(n_values, values_offset)
            if class_length and class_offset != NIL:
                self.free(class_offset)
            if n_subkeys:
                stack.extend(reader.subkey_offsets(subkeys_offset))
                self.free_subkey_list(subkeys_offset)
            if security_offset not in reader.security:
                reader.security_descriptor(security_offset)  # checks it is a security cell
            self.references[security_offset] = self.references.get(security_offset, 0) - 1
            self.free(at)

    def free_values(self, count: int, list_offset: int) -> None:
        reader, data = self.reader, self.reader.data
        start, length = reader.cell(list_offset)
        if 4 * count > length:
            raise reader.corrupt(f"value list at {list_offset:#x} is too short")
        for vk_offset in struct.unpack_from(f"<{count}I", data, start):
            vk_start, vk_length = reader.cell(vk_offset)
            if vk_length < 20 or data[vk_start:vk_start + 2] != b"vk":
                raise reader.corrupt(f"cell at {vk_offset:#x} is not a value")
            _, _, size, data_offset, _, _, _ = _VK.unpack_from(data, vk_start)
            if not size & DATA_INLINE and size:
                self.free_data(size, data_offset)
            self.free(vk_offset)
        self.free(list_offset)

    def free_data(self, size: int, offset: int) -> None:
        reader, data = self.reader, self.reader.data
        start, length = reader.cell(offset)
        if (size > length and reader.big_data and size > BIG_DATA_SEGMENT and length >= 8
                and data[start:start + 2] == b"db"):
            _, segments, list_offset = _DB.unpack_from(data, start)
            list_start, list_length = reader.cell(list_offset)
            if 4 * segments > list_length:
                raise reader.corrupt(f"big data segment list at {list_offset:#x} is too short")
            for segment in struct.unpack_from(f"<{segments}I", data, list_start):
                self.free(segment)
            self.free(list_offset)
        self.free(offset)

    def free_subkey_list(self, offset: int) -> None:
        reader, data = self.reader, self.reader.data
        start, _ = reader.cell(offset)
        if data[start:start + 2] == b"ri":
            (count,) = struct.unpack_from("<H", data, start + 2)
            for leaf in struct.unpack_from(f"<{count}I", data, start + 4):
                self.free(leaf)
        self.free(offset)

    def merge_free_cells(self) -> None:
        """Merge neighbouring free cells in the bins where cells were freed (as Windows keeps them)."""
        buf = self.buf
        for start in sorted(self.freed_bins):
            end = start + _HBIN.unpack_from(buf, start)[2]
            pos, run = start + HBIN_HEADER, -1
            while pos < end:
                (size,) = _I32.unpack_from(buf, pos)
                if size > 0:
                    if run < 0:
                        run = pos
                    else:
                        _I32.pack_into(buf, run, pos + size - run)
                    pos += size
                else:
                    run = -1
                    pos -= size
