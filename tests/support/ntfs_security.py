"""Security descriptors of files inside NTFS volume images, read and written with libntfs-3g's own
file-security API (``ntfs_initialize_file_security`` and friends, which ntfs-3g's tools use): no mount and
none of LayerDesk's code in between, so tests can give layer files real Windows ACLs and check them after
a publish.

:func:`security_descriptor` builds a self-relative descriptor (owner, group, a DACL of access-allowed
ACEs) from SID strings, the way Windows lays it out.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

OWNER, GROUP, DACL = 1, 2, 4
FULL_CONTROL = 0x001F01FF
READ_EXECUTE = 0x001200A9
SYSTEM = "S-1-5-18"
ADMINISTRATORS = "S-1-5-32-544"
USERS = "S-1-5-32-545"


def _library() -> ctypes.CDLL:
    name = ctypes.util.find_library("ntfs-3g") or "libntfs-3g.so.89"
    lib = ctypes.CDLL(name, use_errno=True)
    lib.ntfs_initialize_file_security.restype = ctypes.c_void_p
    lib.ntfs_initialize_file_security.argtypes = [ctypes.c_char_p, ctypes.c_ulong]
    lib.ntfs_leave_file_security.restype = ctypes.c_int
    lib.ntfs_leave_file_security.argtypes = [ctypes.c_void_p]
    lib.ntfs_get_file_security.restype = ctypes.c_int
    lib.ntfs_get_file_security.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint32, ctypes.c_char_p,
                                           ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32)]
    lib.ntfs_set_file_security.restype = ctypes.c_int
    lib.ntfs_set_file_security.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint32, ctypes.c_char_p]
    lib.ntfs_get_file_attributes.restype = ctypes.c_int
    lib.ntfs_get_file_attributes.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.ntfs_set_file_attributes.restype = ctypes.c_int
    lib.ntfs_set_file_attributes.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int32]
    return lib


@contextmanager
def _opened(volume: Path) -> Iterator[tuple[ctypes.CDLL, int]]:
    lib = _library()
    api = lib.ntfs_initialize_file_security(str(volume).encode(), 0)
    if not api:
        raise OSError(ctypes.get_errno(), f"libntfs-3g cannot open {volume}")
    try:
        yield lib, api
    finally:
        lib.ntfs_leave_file_security(api)


def sid_bytes(sid: str) -> bytes:
    parts = sid.split("-")
    if parts[:2] != ["S", "1"]:
        raise ValueError(sid)
    authority, subs = int(parts[2]), [int(p) for p in parts[3:]]
    return bytes([1, len(subs)]) + authority.to_bytes(6, "big") + b"".join(struct.pack("<I", s) for s in subs)


def security_descriptor(owner: str, group: str, allowed: Sequence[tuple[str, int]]) -> bytes:
    """A self-relative security descriptor: ``owner`` and ``group`` SIDs and a DACL granting each
    ``(sid, access mask)`` of ``allowed``."""
    aces = b""
    for sid, mask in allowed:
        body = struct.pack("<I", mask) + sid_bytes(sid)
        aces += struct.pack("<BBH", 0, 0, 4 + len(body)) + body  # ACCESS_ALLOWED_ACE_TYPE, no flags
    dacl = struct.pack("<BBHHH", 2, 0, 8 + len(aces), len(allowed), 0) + aces
    owner_raw, group_raw = sid_bytes(owner), sid_bytes(group)
    header = 20
    control = 0x8000 | 0x0004  # self-relative, DACL present
    offsets = (header, header + len(owner_raw), 0, header + len(owner_raw) + len(group_raw))
    return struct.pack("<BBHIIII", 1, 0, control, *offsets) + owner_raw + group_raw + dacl


def set_security(volume: Path, path: str, descriptor: bytes) -> None:
    """Give the file ``path`` (``/``-separated) in ``volume`` the owner, group and DACL of ``descriptor``."""
    with _opened(volume) as (lib, api):
        if not lib.ntfs_set_file_security(api, path.encode(), OWNER | GROUP | DACL, descriptor):
            raise OSError(ctypes.get_errno(), f"libntfs-3g cannot set the security of {path} in {volume}")


def get_security(volume: Path, path: str) -> bytes:
    """The owner, group and DACL of ``path`` in ``volume`` as a self-relative security descriptor."""
    with _opened(volume) as (lib, api):
        needed = ctypes.c_uint32(0)
        buffer = ctypes.create_string_buffer(65536)
        if not lib.ntfs_get_file_security(api, path.encode(), OWNER | GROUP | DACL, buffer, len(buffer),
                                          ctypes.byref(needed)):
            raise OSError(ctypes.get_errno(), f"libntfs-3g cannot read the security of {path} in {volume}")
        return buffer.raw[: needed.value]


def get_attributes(volume: Path, path: str) -> int:
    """The Windows file attributes (``FILE_ATTRIBUTE_*`` bits) of ``path`` in ``volume``."""
    with _opened(volume) as (lib, api):
        value = lib.ntfs_get_file_attributes(api, path.encode())
        if value < 0:
            raise OSError(ctypes.get_errno(), f"libntfs-3g cannot read the attributes of {path} in {volume}")
        return int(value)


def set_attributes(volume: Path, path: str, attributes: int) -> None:
    with _opened(volume) as (lib, api):
        if not lib.ntfs_set_file_attributes(api, path.encode(), attributes):
            raise OSError(ctypes.get_errno(), f"libntfs-3g cannot set the attributes of {path} in {volume}")


def dacl_entries(descriptor: bytes) -> list[tuple[str, int]]:
    """The ``(sid, mask)`` of each access-allowed ACE of a self-relative descriptor's DACL."""
    dacl_offset = struct.unpack_from("<I", descriptor, 16)[0]
    count = struct.unpack_from("<H", descriptor, dacl_offset + 4)[0]
    position, found = dacl_offset + 8, []
    for _ in range(count):
        kind, _flags, size = struct.unpack_from("<BBH", descriptor, position)
        if kind == 0:
            mask = struct.unpack_from("<I", descriptor, position + 4)[0]
            found.append((_sid_text(descriptor[position + 8 : position + size]), mask))
        position += size
    return found


def owner_sid(descriptor: bytes) -> str:
    return _sid_text(descriptor[struct.unpack_from("<I", descriptor, 4)[0]:])


def _sid_text(raw: bytes) -> str:
    count = raw[1]
    authority = int.from_bytes(raw[2:8], "big")
    subs = struct.unpack_from(f"<{count}I", raw, 8)
    return "-".join(["S", str(raw[0]), str(authority), *map(str, subs)])
