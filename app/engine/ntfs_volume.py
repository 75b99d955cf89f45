"""Read and change files inside an NTFS volume image through libntfs-3g (the library wimlib applies images
with), without a mount.

wimlib can only apply an image onto an empty volume. Changing a volume that already holds a composite (a
re-publish that takes out one layer version's files and puts in the next one's) needs file-level access:
:class:`NtfsVolume` lists directories, reads a file's NTFS metadata and data, copies a file from another
volume with everything NTFS keeps for it, and deletes trees.

What a copy keeps, as wimlib's own NTFS-3G apply does: the unnamed and named data streams, the file
attributes, the security descriptor, the reparse data, the extended attributes, the object ID, the short
(8.3) name and the creation, last-write and last-access times. Hard links inside the copied set stay hard
links when the caller passes the same ``links`` map to every copy. A file without a short name keeps its
long name in the POSIX namespace, as wimlib leaves it.

Names are passed to libntfs-3g as UTF-16 (never through the C locale); lookups ignore case, as Windows
does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from app.errors import EnvironmentProblem

__all__ = ["NtfsEntry", "NtfsFile", "NtfsVolume", "NtfsVolumeError"]

_MOUNT_RDONLY = 0x1
_MOUNT_EXCLUSIVE = 0x08000000
_AT_DATA = 0x80
_AT_END = 0xFFFFFFFF
_FILE_ROOT = 5
_FILE_FIRST_USER = 16  # MFT records below this one are the volume's own files ($MFT, $Bitmap, ...)
_MREF_MASK = 0x0000FFFFFFFFFFFF
_DT_DIR = 4
_FILE_NAME_DOS = 2
_S_IFDIR = 0o040000
_S_IFREG = 0o100000
_FILE_ATTRIBUTE_DIRECTORY = 0x10
_CHUNK = 1 << 20
_MAX_NAME = 255


class NtfsVolumeError(EnvironmentProblem):
    """libntfs-3g could not do something to a volume image. ``errno`` is the C library's error number."""

    def __init__(self, message: str, error: int = 0) -> None:
        super().__init__(message)
        self.errno = error


@dataclass(frozen=True)
class NtfsEntry:
    """One name in a directory."""

    name: str
    #: The file's MFT record number.
    record: int
    is_directory: bool


@dataclass(frozen=True)
class NtfsFile:
    """What NTFS keeps for one file or directory (besides its data)."""

    record: int
    attributes: int
    #: Self-relative security descriptor (``b""``: none).
    security: bytes
    #: Creation, last write and last access times, as FILETIMEs.
    times: tuple[int, int, int]
    #: The 8.3 name in the directory it was read from (``""``: none).
    short_name: str
    #: The reparse point's data (``b""``: not a reparse point).
    reparse: bytes
    #: The extended attributes, as libntfs-3g packs them (``b""``: none).
    extended_attributes: bytes
    #: The object ID attribute (``b""``: none).
    object_id: bytes
    #: Named data streams: name -> size in bytes (the unnamed stream is :attr:`size`).
    streams: dict[str, int] = field(default_factory=dict)
    size: int = 0
    links: int = 1

    @property
    def is_directory(self) -> bool:
        return bool(self.attributes & _FILE_ATTRIBUTE_DIRECTORY)


class _Attr(ctypes.Structure):
    """The start of libntfs-3g's ``ntfs_attr`` (attrib.h): the fields read here."""

    _fields_ = [("rl", ctypes.c_void_p), ("ni", ctypes.c_void_p), ("type", ctypes.c_uint32),
                ("data_flags", ctypes.c_uint16), ("name", ctypes.c_void_p), ("name_len", ctypes.c_uint32),
                ("state", ctypes.c_ulong), ("allocated_size", ctypes.c_int64), ("data_size", ctypes.c_int64)]


class _SearchContext(ctypes.Structure):
    """The start of ``ntfs_attr_search_ctx``: the MFT record and the attribute record found."""

    _fields_ = [("mrec", ctypes.c_void_p), ("attr", ctypes.c_void_p)]


_FILLDIR = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                            ctypes.c_int64, ctypes.c_uint64, ctypes.c_uint)


class _Library:
    def __init__(self) -> None:
        lib = ctypes.CDLL(ctypes.util.find_library("ntfs-3g") or "libntfs-3g.so.89", use_errno=True)
        vp, i, u8, u32, i64, u64 = (ctypes.c_void_p, ctypes.c_int, ctypes.c_uint8, ctypes.c_uint32, ctypes.c_int64,
                                    ctypes.c_uint64)
        size_t = ctypes.c_size_t

        def proto(name: str, restype: object, argtypes: list[object]) -> None:
            function = getattr(lib, name)
            function.restype = restype
            function.argtypes = argtypes

        proto("ntfs_mount", vp, [ctypes.c_char_p, u32])
        proto("ntfs_umount", i, [vp, i])
        proto("ntfs_inode_open", vp, [vp, u64])
        proto("ntfs_inode_close", i, [vp])
        proto("ntfs_inode_close_in_dir", i, [vp, vp])
        proto("ntfs_inode_lookup_by_name", u64, [vp, vp, i])
        proto("ntfs_readdir", i, [vp, ctypes.POINTER(i64), vp, _FILLDIR])
        proto("ntfs_create", vp, [vp, u32, vp, u8, u32])
        proto("ntfs_link", i, [vp, vp, vp, u8])
        proto("ntfs_delete", i, [vp, vp, vp, vp, vp, u8])
        proto("ntfs_attr_open", ctypes.POINTER(_Attr), [vp, u32, vp, u32])
        proto("ntfs_attr_close", None, [ctypes.POINTER(_Attr)])
        proto("ntfs_attr_pread", i64, [ctypes.POINTER(_Attr), i64, i64, vp])
        proto("ntfs_attr_pwrite", i64, [ctypes.POINTER(_Attr), i64, i64, vp])
        proto("ntfs_attr_add", i, [vp, u32, vp, u8, vp, i64])
        proto("ntfs_attr_get_search_ctx", ctypes.POINTER(_SearchContext), [vp, vp])
        proto("ntfs_attr_put_search_ctx", None, [ctypes.POINTER(_SearchContext)])
        proto("ntfs_attr_lookup", i, [u32, vp, u32, i, i64, vp, u32, ctypes.POINTER(_SearchContext)])
        proto("ntfs_get_ntfs_attrib", i, [vp, vp, size_t])
        proto("ntfs_set_ntfs_attrib", i, [vp, vp, size_t, i])
        proto("ntfs_get_ntfs_acl", i, [vp, vp, vp, size_t])
        proto("ntfs_set_ntfs_acl", i, [vp, vp, vp, size_t, i])
        proto("ntfs_inode_get_times", i, [vp, vp, size_t])
        proto("ntfs_inode_set_times", i, [vp, vp, size_t, i])
        proto("ntfs_get_ntfs_dos_name", i, [vp, vp, vp, size_t])
        proto("ntfs_set_ntfs_dos_name", i, [vp, vp, vp, size_t, i])
        proto("ntfs_get_ntfs_reparse_data", i, [vp, vp, size_t])
        proto("ntfs_set_ntfs_reparse_data", i, [vp, vp, size_t, i])
        proto("ntfs_get_ntfs_ea", i, [vp, vp, size_t])
        proto("ntfs_set_ntfs_ea", i, [vp, vp, size_t, i])
        proto("ntfs_get_ntfs_object_id", i, [vp, vp, size_t])
        proto("ntfs_set_ntfs_object_id", i, [vp, vp, size_t, i])
        self.lib = lib
        self.unnamed = ctypes.addressof(ctypes.c_uint16.in_dll(lib, "AT_UNNAMED"))


_loaded: _Library | None = None


def _library() -> _Library:
    global _loaded
    if _loaded is None:
        try:
            _loaded = _Library()
        except OSError as exc:
            raise NtfsVolumeError(f"libntfs-3g cannot be loaded ({exc}); install the ntfs-3g package.") from None
    return _loaded


def _utf16(name: str) -> ctypes.Array[ctypes.c_char]:
    return ctypes.create_string_buffer(name.encode("utf-16-le", "surrogatepass"))


def _units(name: str) -> int:
    return len(name.encode("utf-16-le", "surrogatepass")) // 2


def _upcase(name: str) -> str:
    """``name`` as NTFS compares it: each character uppercased on its own (one character stays one)."""
    return "".join(upper if len(upper := c.upper()) == 1 else c for c in name)


def _parts(path: str) -> list[str]:
    """``/a/b`` or ``a\\b`` as its names; ``.``/``..`` are refused, not resolved."""
    parts = [part for part in path.replace("\\", "/").split("/") if part]
    for part in parts:
        if part in {".", ".."} or _units(part) > _MAX_NAME:
            raise NtfsVolumeError(f"{path!r} is not a path inside an NTFS volume.", errno.EINVAL)
    return parts


class NtfsVolume:
    """An NTFS volume image opened with libntfs-3g (see the module docstring); use :meth:`opened`."""

    def __init__(self, image: Path, handle: int, lib: _Library, *, writable: bool) -> None:
        self.image = image
        self.writable = writable
        self._handle: int | None = handle
        self._lib = lib
        # libntfs-3g's SECURITY_CONTEXT: only its first field, the volume, is used for NTFS ACLs
        self._security_context = (ctypes.c_void_p * 8)(handle)
        #: Directory record -> its names as NTFS compares them -> (record, name as spelled), listed when a
        #: name is first looked up there without its exact spelling; forgotten when the directory changes.
        self._names: dict[int, dict[str, tuple[int, str]]] = {}

    @classmethod
    @contextmanager
    def opened(cls, image: Path | str, *, writable: bool = False) -> Iterator[NtfsVolume]:
        """``image`` opened (exclusively when ``writable``); closed, and its changes written, on leaving. A
        volume that cannot be opened, or whose changes cannot all be written back, raises
        :class:`NtfsVolumeError`."""
        lib = _library()
        image = Path(image)
        flags = _MOUNT_EXCLUSIVE if writable else _MOUNT_RDONLY
        handle = lib.lib.ntfs_mount(os.fsencode(image), flags)
        if not handle:
            error = ctypes.get_errno()
            raise NtfsVolumeError(f"{image} cannot be opened as an NTFS volume: {os.strerror(error)}.", error)
        volume = cls(image, handle, lib, writable=writable)
        try:
            yield volume
        except BaseException:
            volume._handle = None
            lib.lib.ntfs_umount(handle, 0)  # the error that stopped the work is the one to report
            raise
        volume._handle = None
        if lib.lib.ntfs_umount(handle, 0) != 0:
            error = ctypes.get_errno()
            raise NtfsVolumeError(f"{image}: the changes could not all be written: {os.strerror(error)}.", error)

    # --- inodes ----------------------------------------------------------------------------------------

    @property
    def _volume(self) -> int:
        if self._handle is None:
            raise NtfsVolumeError(f"{self.image} has been closed.", errno.EBADF)
        return self._handle

    def _fail(self, what: str, error: int | None = None) -> NtfsVolumeError:
        error = ctypes.get_errno() if error is None else error
        if error == errno.ENOSPC:
            return NtfsVolumeError(f"{self.image}: no space is left on the volume ({what}).", error)
        return NtfsVolumeError(f"{self.image}: {what}: {os.strerror(error)}.", error)

    def _open_record(self, record: int) -> int:
        ni = self._lib.lib.ntfs_inode_open(self._volume, record)
        if not ni:
            raise self._fail(f"MFT record {record} cannot be read")
        return int(ni)

    def _close(self, ni: int | None, parent: int | None = None) -> None:
        """Close ``ni``. While its directory is open too, pass it as ``parent``: closing a changed file
        updates its entry in its directory, and libntfs-3g would otherwise open that directory a second time
        and keep the stale copy (an entry just added to it would seem to vanish)."""
        if ni:
            if parent:
                self._lib.lib.ntfs_inode_close_in_dir(ni, parent)
            else:
                self._lib.lib.ntfs_inode_close(ni)

    def _record_of(self, path: str) -> int:
        """The MFT record number at ``path`` (names compared as Windows compares them)."""
        return self._resolve(path)[0]

    def spelled(self, path: str) -> str:
        """``path`` as the volume spells its names (``/program files`` -> ``/Program Files``)."""
        return self._resolve(path)[1] or "/"

    def _resolve(self, path: str) -> tuple[int, str]:
        record = _FILE_ROOT
        walked = ""
        for part in _parts(path):
            ni = self._open_record(record)
            try:
                name = _utf16(part)
                found = self._lib.lib.ntfs_inode_lookup_by_name(ni, name, _units(part))
            finally:
                self._close(ni)
            walked += "/" + part
            if found == 0xFFFFFFFFFFFFFFFF:
                # libntfs-3g's index lookup matches exactly; names in the POSIX namespace (files without a
                # short name, as wimlib writes them) only so. Windows ignores case in every namespace.
                match = self._named(record, part)
                if match is None:
                    raise NtfsVolumeError(f"{self.image}: {walked} does not exist.", errno.ENOENT)
                found, spelled = match
                walked = walked[:-len(part)] + spelled
            record = found & _MREF_MASK
        return record, walked

    def _named(self, directory: int, name: str) -> tuple[int, str] | None:
        """The entry of ``directory`` named ``name`` as Windows compares names (the first one, in the
        directory's order): its record and its name as spelled there. The directory is listed once, not at
        every lookup (re-publishing a few hundred paths spelled in lower case listed thousands)."""
        names = self._names.get(directory)
        if names is None:
            names = {}
            for entry in self._list_record(directory, False):
                names.setdefault(_upcase(entry.name), (entry.record, entry.name))
            self._names[directory] = names
        return names.get(_upcase(name))

    def _changed(self, *directories: int) -> None:
        """Names were added to or removed from ``directories`` (or they were deleted)."""
        for directory in directories:
            self._names.pop(directory, None)

    @contextmanager
    def _inode(self, path: str) -> Iterator[int]:
        ni = self._open_record(self._record_of(path))
        try:
            yield ni
        finally:
            self._close(ni)

    # --- reading ----------------------------------------------------------------------------------------

    def exists(self, path: str) -> bool:
        try:
            self._record_of(path)
        except NtfsVolumeError as exc:
            if exc.errno == errno.ENOENT:
                return False
            raise
        return True

    def listdir(self, path: str = "/") -> list[NtfsEntry]:
        """The names in the directory at ``path`` (not ``.``/``..``, not short names, and at the root not the
        volume's own files), in the directory's order."""
        return self._list_record(self._record_of(path), not _parts(path), path)

    def _list_record(self, record: int, root: bool, path: str = "") -> list[NtfsEntry]:
        entries: list[NtfsEntry] = []

        def on_name(_dirent: int | None, name: int, length: int, kind: int, _pos: int, mref: int,
                    dt_type: int) -> int:
            if kind == _FILE_NAME_DOS:
                return 0
            text = ctypes.string_at(name, 2 * length).decode("utf-16-le", "surrogatepass")
            record = mref & _MREF_MASK
            if text in {".", ".."} or (root and record < _FILE_FIRST_USER):
                return 0
            entries.append(NtfsEntry(text, record, dt_type == _DT_DIR))
            return 0

        callback = _FILLDIR(on_name)
        ni = self._open_record(record)
        try:
            position = ctypes.c_int64(0)
            if self._lib.lib.ntfs_readdir(ni, ctypes.byref(position), None, callback) != 0:
                raise self._fail(f"{path or f'MFT record {record}'} cannot be listed")
        finally:
            self._close(ni)
        return entries

    def walk(self, path: str = "/") -> Iterator[tuple[str, NtfsEntry]]:
        """Every entry below ``path`` (its ``/``-separated path from the volume's root), parents first."""
        base = "/" + "/".join(_parts(path))
        for entry in self.listdir(base):
            child = f"{base.rstrip('/')}/{entry.name}"
            yield child, entry
            if entry.is_directory:
                yield from self.walk(child)

    def _value(self, getter: str, *args: int) -> bytes:
        """What one of libntfs-3g's ``ntfs_get_ntfs_*`` calls returns (``b""`` when there is none)."""
        function = getattr(self._lib.lib, getter)
        needed = function(*args, None, 0)
        if needed in (-errno.ENODATA, 0):
            return b""
        if needed < 0:
            raise self._fail(f"{getter.removeprefix('ntfs_get_ntfs_')} cannot be read", -needed)
        buffer = ctypes.create_string_buffer(needed)
        got = function(*args, buffer, needed)
        if got < 0:
            raise self._fail(f"{getter.removeprefix('ntfs_get_ntfs_')} cannot be read", -got)
        return buffer.raw[:got]

    def _streams(self, ni: int) -> dict[str, int]:
        """The file's data streams: name (``""`` for the unnamed one) -> size."""
        lib = self._lib.lib
        names: list[str] = []
        context = lib.ntfs_attr_get_search_ctx(ni, None)
        if not context:
            raise self._fail("its attributes cannot be searched")
        try:
            while lib.ntfs_attr_lookup(_AT_DATA, None, 0, 0, 0, None, 0, context) == 0:
                record = context.contents.attr
                name_length, name_offset = struct.unpack_from("<BH", ctypes.string_at(record + 9, 3))
                non_resident = ctypes.string_at(record + 8, 1)[0]
                lowest_vcn = struct.unpack("<q", ctypes.string_at(record + 16, 8))[0] if non_resident else 0
                if lowest_vcn == 0:  # later extents of a fragmented stream are the same stream
                    names.append(ctypes.string_at(record + name_offset, 2 * name_length)
                                 .decode("utf-16-le", "surrogatepass"))
        finally:
            lib.ntfs_attr_put_search_ctx(context)
        sizes: dict[str, int] = {}
        for name in names:
            attr = self._open_stream(ni, name)
            try:
                sizes[name] = int(attr.contents.data_size)
            finally:
                lib.ntfs_attr_close(attr)
        return sizes

    def _open_stream(self, ni: int, name: str) -> ctypes._Pointer[_Attr]:
        attr: ctypes._Pointer[_Attr]
        if name:
            attr = self._lib.lib.ntfs_attr_open(ni, _AT_DATA, _utf16(name), _units(name))
        else:
            attr = self._lib.lib.ntfs_attr_open(ni, _AT_DATA, self._lib.unnamed, 0)
        if not attr:
            raise self._fail(f"its data stream {name!r} cannot be opened")
        return attr

    def _stat(self, ni: int, dir_ni: int, record: int) -> NtfsFile:
        attributes = struct.unpack("<I", self._value("ntfs_get_ntfs_attrib", ni))[0]
        times_raw = ctypes.create_string_buffer(32)
        got = self._lib.lib.ntfs_inode_get_times(ni, times_raw, 32)
        if got < 24:
            raise self._fail("its times cannot be read", -got if got < 0 else errno.EIO)
        times = struct.unpack_from("<3Q", times_raw.raw)
        short = self._value("ntfs_get_ntfs_dos_name", ni, dir_ni).decode("utf-8", "surrogateescape")
        streams = {} if attributes & _FILE_ATTRIBUTE_DIRECTORY else self._streams(ni)
        record_data = ctypes.c_void_p.from_address(ni + 8).value  # ntfs_inode.mrec: the MFT record in memory
        links = struct.unpack("<H", ctypes.string_at((record_data or 0) + 0x12, 2))[0] if record_data else 1
        return NtfsFile(
            record=record, attributes=attributes,
            security=self._value("ntfs_get_ntfs_acl", ctypes.addressof(self._security_context), ni),
            times=(times[0], times[1], times[2]), short_name=short,
            reparse=self._value("ntfs_get_ntfs_reparse_data", ni),
            extended_attributes=self._value("ntfs_get_ntfs_ea", ni),
            object_id=self._value("ntfs_get_ntfs_object_id", ni),
            streams={name: size for name, size in streams.items() if name}, size=streams.get("", 0), links=links,
        )

    def stat(self, path: str) -> NtfsFile:
        """What NTFS keeps for the file or directory at ``path``."""
        parts = _parts(path)
        record = self._record_of(path)
        if not parts:
            with self._inode("/") as ni:
                return self._stat(ni, ni, record)
        with self._inode("/" + "/".join(parts[:-1])) as dir_ni:
            ni = self._open_record(record)
            try:
                return self._stat(ni, dir_ni, record)
            finally:
                self._close(ni, dir_ni)

    def read(self, path: str, stream: str = "") -> bytes:
        """All of one data stream of the file at ``path``."""
        with self._inode(path) as ni:
            return b"".join(self._chunks(ni, stream))

    def _chunks(self, ni: int, stream: str) -> Iterator[bytes]:
        attr = self._open_stream(ni, stream)
        try:
            size, done = int(attr.contents.data_size), 0
            buffer = ctypes.create_string_buffer(min(_CHUNK, max(size, 1)))
            while done < size:
                want = min(len(buffer), size - done)
                got = self._lib.lib.ntfs_attr_pread(attr, done, want, buffer)
                if got <= 0:
                    raise self._fail(f"stream {stream!r} cannot be read at byte {done}")
                yield buffer.raw[:got]
                done += got
        finally:
            self._lib.lib.ntfs_attr_close(attr)

    # --- changing ----------------------------------------------------------------------------------------

    def _writable(self) -> None:
        if not self.writable:
            raise NtfsVolumeError(f"{self.image} was opened read-only.", errno.EROFS)

    def delete(self, path: str) -> int:
        """Delete the file or the whole directory tree at ``path``; how many names were removed."""
        self._writable()
        if not _parts(path):
            raise NtfsVolumeError("The root directory of a volume cannot be deleted.", errno.EINVAL)
        record, path = self._resolve(path)  # libntfs-3g removes a name only as the directory spells it
        parts = _parts(path)
        removed = 0
        if self.stat(path).is_directory:
            for entry in self.listdir(path):
                removed += self.delete(f"{path.rstrip('/')}/{entry.name}")
        parent_record = self._record_of("/" + "/".join(parts[:-1]))
        self._changed(parent_record, record)
        parent = self._open_record(parent_record)
        ni = self._open_record(record)
        name = _utf16(parts[-1])
        # ntfs_delete closes both inodes, whether it succeeds or not
        if self._lib.lib.ntfs_delete(self._volume, None, ni, parent, name, _units(parts[-1])) != 0:
            raise self._fail(f"{path} cannot be deleted")
        return removed + 1

    def copy_from(self, source: NtfsVolume, path: str, *, to: str | None = None,
                  links: MutableMapping[int, int] | None = None) -> int:
        """Copy the file or directory at ``path`` on ``source`` (without a directory's contents) to ``to``
        (default: the same path, spelled as ``source`` spells it) on this volume, whose parent directory must
        exist and which must not hold that name yet; the new MFT record. ``links`` maps source records to the
        records copied from them: a source file already in it becomes another hard link to its copy."""
        self._writable()
        target = _parts(to if to is not None else source.spelled(path))
        if not target:
            raise NtfsVolumeError("The root directory cannot be copied onto another volume.", errno.EINVAL)
        name = target[-1]
        parent_path = "/" + "/".join(target[:-1])
        if self.exists("/" + "/".join(target)):
            raise NtfsVolumeError(f"{self.image}: /{'/'.join(target)} already exists.", errno.EEXIST)
        info = source.stat(path)
        lib = self._lib.lib
        parent_record = self._record_of(parent_path)
        self._changed(parent_record)
        known = links.get(info.record) if links is not None and not info.is_directory else None
        if known is not None:
            parent, ni = self._open_record(parent_record), self._open_record(known)
            try:
                if lib.ntfs_link(ni, parent, _utf16(name), _units(name)) != 0:
                    raise self._fail(f"/{'/'.join(target)} cannot be linked")
            finally:
                self._close(ni, parent)
                self._close(parent)
            return known
        parent = self._open_record(parent_record)
        try:
            kind = _S_IFDIR if info.is_directory else _S_IFREG
            ni = lib.ntfs_create(parent, 0, _utf16(name), _units(name), kind)
            if not ni:
                raise self._fail(f"/{'/'.join(target)} cannot be created")
            record = int(ctypes.c_uint64.from_address(ni).value)
            try:
                self._fill(int(ni), source, path, info)
            finally:
                self._close(ni, parent)
        finally:
            self._close(parent)
        if info.short_name:
            parent, ni = self._open_record(parent_record), self._open_record(record)
            raw = info.short_name.encode("utf-8", "surrogateescape")
            # ntfs_set_ntfs_dos_name closes both inodes, whether it succeeds or not
            if lib.ntfs_set_ntfs_dos_name(ni, parent, raw, len(raw), 0) != 0:
                raise self._fail(f"/{'/'.join(target)} cannot be given the short name {info.short_name}")
        self.set_times("/" + "/".join(target), info.times)  # last: every change above moved them
        if links is not None and not info.is_directory:
            links[info.record] = record
        return record

    def copy_tree_from(self, source: NtfsVolume, path: str, *, to: str | None = None,
                       links: MutableMapping[int, int] | None = None) -> int:
        """Copy the file or the whole directory tree at ``path`` on ``source`` to ``to`` (default: the same
        path; see :meth:`copy_from`); how many names were copied. Each directory gets its times back after
        its contents went in, so the copy's times are the source's."""
        links = {} if links is None else links
        target = "/" + "/".join(_parts(to if to is not None else source.spelled(path)))
        self.copy_from(source, path, to=target, links=links)
        info = source.stat(path)
        if not info.is_directory:
            return 1
        copied = 1
        for entry in source.listdir(path):
            copied += self.copy_tree_from(source, f"{path.rstrip('/')}/{entry.name}", to=f"{target}/{entry.name}",
                                          links=links)
        self.set_times(target, info.times)
        return copied

    def set_times(self, path: str, times: tuple[int, int, int]) -> None:
        """Set the creation, last-write and last-access times (FILETIMEs) of ``path``."""
        self._writable()
        with self._inode(path) as ni:
            raw = struct.pack("<3Q", *times)
            if self._lib.lib.ntfs_inode_set_times(ni, raw, len(raw), 0) != 0:
                raise self._fail(f"the times of {path} cannot be set")

    def _fill(self, ni: int, source: NtfsVolume, path: str, info: NtfsFile) -> None:
        """Give the new inode ``ni`` the data and metadata of ``path`` on ``source``."""
        lib = self._lib.lib
        if info.reparse:
            self._set("reparse data", lib.ntfs_set_ntfs_reparse_data(ni, info.reparse, len(info.reparse), 0))
        if not info.is_directory:
            with source._inode(path) as source_ni:
                for stream in ["", *info.streams]:
                    if stream and lib.ntfs_attr_add(ni, _AT_DATA, _utf16(stream), _units(stream), None, 0) != 0:
                        raise self._fail(f"stream {stream!r} of {path} cannot be created")
                    attr = self._open_stream(ni, stream)
                    try:
                        done = 0
                        for chunk in source._chunks(source_ni, stream):
                            if lib.ntfs_attr_pwrite(attr, done, len(chunk), chunk) != len(chunk):
                                raise self._fail(f"stream {stream!r} of {path} cannot be written")
                            done += len(chunk)
                    finally:
                        lib.ntfs_attr_close(attr)
        if info.extended_attributes:
            self._set("extended attributes", lib.ntfs_set_ntfs_ea(ni, info.extended_attributes,
                                                                  len(info.extended_attributes), 0))
        if info.object_id:
            self._set("object ID", lib.ntfs_set_ntfs_object_id(ni, info.object_id, len(info.object_id), 0))
        if info.security:
            self._set("security descriptor", lib.ntfs_set_ntfs_acl(ctypes.addressof(self._security_context), ni,
                                                                   info.security, len(info.security), 0))
        attributes = struct.pack("<I", info.attributes & ~_FILE_ATTRIBUTE_DIRECTORY)
        self._set("attributes", lib.ntfs_set_ntfs_attrib(ni, attributes, 4, 0))

    def _set(self, what: str, result: int) -> None:
        if result != 0:
            raise self._fail(f"its {what} cannot be set", -result if result < -1 else None)
