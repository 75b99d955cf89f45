"""A small ctypes binding to libwim (wimlib 1.13.x): the engine's way to capture, merge and apply layers.

What the engine needs and nothing more: create/open a WIM, add an image from an NTFS volume image or a
folder, update an image with ADD/DELETE commands (layers and their whiteouts), export an image into
another WIM, delete an image, verify a WIM (and its integrity table), write it, apply an image
onto an empty NTFS volume image (wimlib's NTFS-3G mode) or a folder, list an image's tree, and report
progress with cancellation.

Rules learned while measuring (DESIGN.md §4), enforced here:

* ``wimlib_global_init(WIMLIB_INIT_FLAG_DEFAULT_CASE_INSENSITIVE)`` runs once before anything else, so
  ``program files`` in one layer lands in ``Program Files`` of another, as on Windows.
* wimlib 1.13.6 treats files of *different* NTFS sources that share an MFT record number as hard links
  when they are added in one ``wimlib_update_image`` call (the capture shares one inode table per call
  and keys it on the MFT number alone). :meth:`Wim.update_image` therefore refuses more than one NTFS
  source per call: merge one layer per call.
* wimlib's NTFS-3G apply needs an empty volume; :meth:`Wim.extract_image_to_ntfs_volume` checks first.

Every non-zero wimlib return code becomes a LayerDesk error carrying wimlib's own text: :class:`WimError`
(a :class:`UserError`) for problems with the input the user chose (not a WIM, damaged, wrong image,
missing path, bad volume), :class:`EnvironmentProblem` for the machine's (memory, disk, privileges).
Struct layouts and constants follow ``wimlib.h`` of wimlib 1.13.6; the library's version is checked on
load. The ``*_ntfs_volume`` operations need libwim built with NTFS-3G, i.e. Linux.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import logging
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Literal, Self

from app import procs
from app.errors import EnvironmentProblem, UserError
from app.files import writing_back
from app.procs import Cancellable
from app.tasks.base import TaskCanceled

log = logging.getLogger(__name__)

__all__ = [
    "FILE_ATTRIBUTE_DIRECTORY",
    "FILE_ATTRIBUTE_HIDDEN",
    "FILE_ATTRIBUTE_READONLY",
    "FILE_ATTRIBUTE_REPARSE_POINT",
    "FILE_ATTRIBUTE_SYSTEM",
    "AddCommand",
    "Compression",
    "DeleteCommand",
    "DirEntry",
    "ProgressFn",
    "RenameCommand",
    "UpdateCommand",
    "Wim",
    "WimDataChanged",
    "WimError",
    "library_version",
    "load_library",
    "make_ntfs_volume",
    "overwrite_file_in_ntfs_volume",
]

# --- constants from wimlib.h (1.13.6) ---------------------------------------------------------------

_COMPRESSION = {"none": 0, "xpress": 1, "lzx": 2}
Compression = Literal["none", "xpress", "lzx"]

_INIT_FLAG_DEFAULT_CASE_INSENSITIVE = 0x20
_OPEN_FLAG_CHECK_INTEGRITY = 0x1
_WRITE_FLAG_CHECK_INTEGRITY = 0x1
_WRITE_FLAG_NO_CHECK_INTEGRITY = 0x2
_WRITE_FLAG_FSYNC = 0x20
_ADD_FLAG_NTFS = 0x1
_ADD_FLAG_VERBOSE = 0x4  # only makes wimlib send a progress message per scanned file (for cancellation)
_DELETE_FLAG_FORCE = 0x1
_DELETE_FLAG_RECURSIVE = 0x2
_EXTRACT_FLAG_NTFS = 0x1
_UPDATE_FLAG_SEND_PROGRESS = 0x1
_ITERATE_DIR_TREE_FLAG_RECURSIVE = 0x1
_ALL_IMAGES = -1
_UPDATE_OP_ADD = 0
_UPDATE_OP_DELETE = 1
_UPDATE_OP_RENAME = 2

_PROGRESS_MSG_EXTRACT_STREAMS = 4
_PROGRESS_MSG_WRITE_STREAMS = 12
_PROGRESS_MSG_VERIFY_STREAMS = 29
_PROGRESS_STATUS_CONTINUE = 0
_PROGRESS_STATUS_ABORT = 1

_ERR_ABORTED_BY_PROGRESS = 76
_ZERO_HASH = bytes(20)

FILE_ATTRIBUTE_READONLY = 0x1
FILE_ATTRIBUTE_HIDDEN = 0x2
FILE_ATTRIBUTE_SYSTEM = 0x4
FILE_ATTRIBUTE_DIRECTORY = 0x10
FILE_ATTRIBUTE_REPARSE_POINT = 0x400

#: CONCURRENT_MODIFICATION_DETECTED: data read does not match the SHA-1 wimlib holds for it (WimDataChanged).
_ERR_CONCURRENT_MODIFICATION = 88
#: wimlib error codes that mean "the input you gave is not usable" (file, image, path, volume); every
#: other code is the environment's fault (memory, disk, privileges, a library without NTFS-3G).
_USER_ERRORS = frozenset({
    2,   # DECOMPRESSION: damaged data
    10,  # IMAGE_COUNT
    11,  # IMAGE_NAME_COLLISION
    13,  # INTEGRITY
    15,  # INVALID_CHUNK_SIZE
    16,  # INVALID_COMPRESSION_TYPE
    17,  # INVALID_HEADER
    18,  # INVALID_IMAGE
    19,  # INVALID_INTEGRITY_TABLE
    20,  # INVALID_LOOKUP_TABLE_ENTRY
    21,  # INVALID_METADATA_RESOURCE
    23,  # INVALID_OVERLAY
    24,  # INVALID_PARAM
    26,  # INVALID_PIPABLE_WIM
    27,  # INVALID_REPARSE_DATA
    28,  # INVALID_RESOURCE_HASH
    30,  # INVALID_UTF16_STRING
    31,  # INVALID_UTF8_STRING
    32,  # IS_DIRECTORY
    33,  # IS_SPLIT_WIM
    36,  # METADATA_NOT_FOUND
    40,  # NOTDIR
    41,  # NOTEMPTY
    42,  # NOT_A_REGULAR_FILE
    43,  # NOT_A_WIM_FILE
    44,  # NOT_PIPABLE
    46,  # NTFS_3G: the volume image could not be opened or written as NTFS
    49,  # PATH_DOES_NOT_EXIST
    55,  # RESOURCE_NOT_FOUND
    62,  # SPLIT_INVALID
    65,  # UNEXPECTED_END_OF_FILE: truncated file
    67,  # UNKNOWN_VERSION
    71,  # WIM_IS_READONLY
    73,  # XML
    74,  # WIM_IS_ENCRYPTED
    84,  # WIM_IS_INCOMPLETE
})

_MIN_VERSION = (1, 13)


class WimError(UserError):
    """A WIM file, image, path or volume image that cannot be used as given."""

    code = "wim"

    def __init__(self, message: str, *, wimlib_code: int | None = None) -> None:
        super().__init__(message)
        self.wimlib_code = wimlib_code


class WimDataChanged(EnvironmentProblem):
    """File data read from a captured folder or volume does not match the SHA-1 wimlib holds for it (wimlib's
    CONCURRENT_MODIFICATION_DETECTED): the source changed after it was scanned, or after
    :meth:`Wim.take_hashes_from` gave it the SHA-1s of what it should hold."""


# --- C structures ---------------------------------------------------------------------------------

_WINDOWS = sys.platform == "win32"


class _Timespec(ctypes.Structure):
    # struct timespec on Unix; wimlib's own {int64 tv_sec; int32 tv_nsec} on 64-bit Windows: both 16 bytes.
    _fields_ = [("tv_sec", ctypes.c_int64), ("tv_nsec", ctypes.c_int32 if _WINDOWS else ctypes.c_long)]


class _ResourceEntry(ctypes.Structure):
    _fields_ = [
        ("uncompressed_size", ctypes.c_uint64),
        ("compressed_size", ctypes.c_uint64),
        ("offset", ctypes.c_uint64),
        ("sha1_hash", ctypes.c_uint8 * 20),
        ("part_number", ctypes.c_uint32),
        ("reference_count", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),  # is_compressed:1 is_metadata:1 ... packed:1 reserved:26
        ("raw_resource_offset_in_wim", ctypes.c_uint64),
        ("raw_resource_compressed_size", ctypes.c_uint64),
        ("raw_resource_uncompressed_size", ctypes.c_uint64),
        ("reserved", ctypes.c_uint64 * 1),
    ]


class _StreamEntry(ctypes.Structure):
    _fields_ = [
        ("stream_name", ctypes.c_void_p),
        ("resource", _ResourceEntry),
        ("reserved", ctypes.c_uint64 * 4),
    ]


class _DirEntry(ctypes.Structure):
    _fields_ = [
        ("filename", ctypes.c_void_p),
        ("dos_name", ctypes.c_void_p),
        ("full_path", ctypes.c_void_p),
        ("depth", ctypes.c_size_t),
        ("security_descriptor", ctypes.c_void_p),
        ("security_descriptor_size", ctypes.c_size_t),
        ("attributes", ctypes.c_uint32),
        ("reparse_tag", ctypes.c_uint32),
        ("num_links", ctypes.c_uint32),
        ("num_named_streams", ctypes.c_uint32),
        ("hard_link_group_id", ctypes.c_uint64),
        ("creation_time", _Timespec),
        ("last_write_time", _Timespec),
        ("last_access_time", _Timespec),
        ("unix_uid", ctypes.c_uint32),
        ("unix_gid", ctypes.c_uint32),
        ("unix_mode", ctypes.c_uint32),
        ("unix_rdev", ctypes.c_uint32),
        ("object_id", ctypes.c_uint8 * 64),
        ("creation_time_high", ctypes.c_int32),
        ("last_write_time_high", ctypes.c_int32),
        ("last_access_time_high", ctypes.c_int32),
        ("reserved2", ctypes.c_int32),
        ("reserved", ctypes.c_uint64 * 4),
        # followed by struct wimlib_stream_entry streams[1 + num_named_streams]
    ]


class _WimInfo(ctypes.Structure):
    _fields_ = [
        ("guid", ctypes.c_uint8 * 16),
        ("image_count", ctypes.c_uint32),
        ("boot_index", ctypes.c_uint32),
        ("wim_version", ctypes.c_uint32),
        ("chunk_size", ctypes.c_uint32),
        ("part_number", ctypes.c_uint16),
        ("total_parts", ctypes.c_uint16),
        ("compression_type", ctypes.c_int32),
        ("total_bytes", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32 * 9),
    ]


class _AddCommand(ctypes.Structure):
    _fields_ = [
        ("fs_source_path", ctypes.c_void_p),
        ("wim_target_path", ctypes.c_void_p),
        ("config_file", ctypes.c_void_p),
        ("add_flags", ctypes.c_int),
    ]


class _DeleteCommand(ctypes.Structure):
    _fields_ = [("wim_path", ctypes.c_void_p), ("delete_flags", ctypes.c_int)]


class _RenameCommand(ctypes.Structure):
    _fields_ = [
        ("wim_source_path", ctypes.c_void_p),
        ("wim_target_path", ctypes.c_void_p),
        ("rename_flags", ctypes.c_int),
    ]


class _CommandUnion(ctypes.Union):
    _fields_ = [("add", _AddCommand), ("delete", _DeleteCommand), ("rename", _RenameCommand)]


class _UpdateCommand(ctypes.Structure):
    _anonymous_ = ("u",)
    _fields_ = [("op", ctypes.c_int), ("u", _CommandUnion)]


class _ExtractProgress(ctypes.Structure):  # the head of union wimlib_progress_info's "extract" member
    _fields_ = [
        ("image", ctypes.c_uint32),
        ("extract_flags", ctypes.c_uint32),
        ("wimfile_name", ctypes.c_void_p),
        ("image_name", ctypes.c_void_p),
        ("target", ctypes.c_void_p),
        ("reserved", ctypes.c_void_p),
        ("total_bytes", ctypes.c_uint64),
        ("completed_bytes", ctypes.c_uint64),
    ]


class _VerifyStreamsProgress(ctypes.Structure):  # the "verify_streams" member
    _fields_ = [
        ("wimfile", ctypes.c_void_p),
        ("total_streams", ctypes.c_uint64),
        ("total_bytes", ctypes.c_uint64),
        ("completed_streams", ctypes.c_uint64),
        ("completed_bytes", ctypes.c_uint64),
    ]


class _WriteStreamsProgress(ctypes.Structure):  # the head of the "write_streams" member
    _fields_ = [
        ("total_bytes", ctypes.c_uint64),
        ("total_streams", ctypes.c_uint64),
        ("completed_bytes", ctypes.c_uint64),
    ]


_ITERATE_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(_DirEntry), ctypes.c_void_p)
_PROGRESS_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)

# --- strings: wimlib_tchar is char (UTF-8) on Unix and wchar_t (UTF-16) on Windows -----------------


def _tstr(text: str | os.PathLike[str]) -> ctypes.Array[Any]:
    """A NUL-terminated wimlib_tchar buffer; the caller keeps it alive for the duration of the call."""
    if _WINDOWS:
        return ctypes.create_unicode_buffer(os.fspath(text))
    return ctypes.create_string_buffer(os.fsencode(text))


def _filetime(stamp: _Timespec) -> int:
    """A wimlib timespec as the Windows FILETIME it was made from (100 ns steps since 1601)."""
    return (int(stamp.tv_sec) + 11_644_473_600) * 10_000_000 + int(stamp.tv_nsec) // 100


def _from_tstr(address: int | None) -> str | None:
    if not address:
        return None
    if _WINDOWS:
        return ctypes.wstring_at(address)
    return os.fsdecode(ctypes.string_at(address))


# --- loading --------------------------------------------------------------------------------------


class _Library:
    """The loaded libwim with the prototypes LayerDesk uses."""

    def __init__(self, cdll: ctypes.CDLL) -> None:
        self.cdll = cdll
        vp, i, u = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint
        self._proto("wimlib_global_init", i, [i])
        self._proto("wimlib_get_version", ctypes.c_uint32, [])
        self._proto("wimlib_get_error_string", vp, [i])
        self._proto("wimlib_create_new_wim", i, [i, ctypes.POINTER(vp)])
        self._proto("wimlib_open_wim", i, [vp, i, ctypes.POINTER(vp)])
        self._proto("wimlib_free", None, [vp])
        self._proto("wimlib_get_wim_info", i, [vp, ctypes.POINTER(_WimInfo)])
        self._proto("wimlib_get_image_name", vp, [vp, i])
        self._proto("wimlib_get_image_property", vp, [vp, i, vp])
        self._proto("wimlib_add_image", i, [vp, vp, vp, vp, i])
        self._proto("wimlib_update_image", i, [vp, i, ctypes.POINTER(_UpdateCommand), ctypes.c_size_t, i])
        self._proto("wimlib_write", i, [vp, vp, i, i, u])
        self._proto("wimlib_delete_image", i, [vp, i])
        self._proto("wimlib_export_image", i, [vp, i, vp, vp, vp, i])
        self._proto("wimlib_reference_template_image", i, [vp, i, vp, i, i])
        self._proto("wimlib_verify_wim", i, [vp, i])
        self._proto("wimlib_overwrite", i, [vp, i, u])
        self._proto("wimlib_extract_image", i, [vp, i, vp, i])
        self._proto("wimlib_extract_paths", i, [vp, i, vp, ctypes.POINTER(vp), ctypes.c_size_t, i])
        self._proto("wimlib_iterate_dir_tree", i, [vp, i, vp, i, _ITERATE_CALLBACK, vp])
        self._proto("wimlib_register_progress_function", None, [vp, _PROGRESS_CALLBACK, vp])
        self._proto("wimlib_set_error_file_by_name", i, [vp])
        self._messages: BinaryIO | None = None
        self._messages_lock = threading.Lock()
        self._calls = 0  # library calls running now, in any thread
        self._logged: set[int] = set()  # offsets in the message file of the warnings logged

    def capture_messages(self) -> None:
        """Have wimlib write its error and warning lines to an (unlinked) temporary file that :meth:`run`
        reads after each call. wimlib's message file is process-wide: while calls run in several threads at
        once (each on its own WIM), a failing call's error lines may include another call's; each warning
        is logged once."""
        if _WINDOWS:  # an open file cannot be unlinked there; wimlib's generic error texts must do
            return
        fd, name = tempfile.mkstemp(prefix="layerdesk-wimlib-", suffix=".log")
        os.close(fd)
        try:
            if int(self.cdll.wimlib_set_error_file_by_name(_tstr(name))) == 0:
                self._messages = Path(name).open("r+b")  # noqa: SIM115 - open as long as the library is loaded
                atexit.register(self._messages.close)  # closed, not left to the interpreter's teardown
        finally:
            Path(name).unlink()

    def run(self, call: Callable[[], Any]) -> tuple[int, list[str]]:
        """Make one library call; its return code and the error lines wimlib wrote meanwhile (warnings
        go to the log)."""
        messages = self._messages
        if messages is None:
            return int(call()), []
        with self._messages_lock:
            mark = messages.seek(0, os.SEEK_END)
            self._calls += 1
        errors: list[str] = []
        warnings: list[str] = []
        try:
            code = int(call())
        finally:
            with self._messages_lock:
                self._calls -= 1
                end = messages.seek(0, os.SEEK_END)
                messages.seek(mark)
                offset = mark
                for raw in messages.read(end - mark).splitlines(keepends=True):
                    line = raw.decode("utf-8", "replace").strip()
                    if line.startswith("[ERROR] "):
                        errors.append(line.removeprefix("[ERROR] "))
                    elif line and offset not in self._logged:  # a call that overlapped may have logged it
                        self._logged.add(offset)
                        warnings.append(line.removeprefix("[WARNING] "))
                    offset += len(raw)
                if self._calls == 0:  # wimlib appends (O_APPEND): emptied, the file never outgrows one call's lines
                    messages.truncate(0)
                    self._logged.clear()
        for line in warnings:
            log.warning("wimlib: %s", line)
        return code, errors

    def check(self, doing: str, call: Callable[[], Any]) -> None:
        code, errors = self.run(call)
        _raise_for(self, code, doing, errors)

    def _proto(self, name: str, restype: Any, argtypes: list[Any]) -> None:
        function = getattr(self.cdll, name)
        function.restype = restype
        function.argtypes = argtypes

    def __getattr__(self, name: str) -> Any:
        return getattr(self.cdll, name)

    def version(self) -> tuple[int, int, int]:
        packed = int(self.cdll.wimlib_get_version())
        return packed >> 20, (packed >> 10) & 0x3FF, packed & 0x3FF

    def error_text(self, code: int) -> str:
        return _from_tstr(self.cdll.wimlib_get_error_string(code)) or f"unknown wimlib error {code}"


_lock = threading.Lock()
_library: _Library | None = None


def _candidates() -> list[str]:
    names: list[str] = []
    bundled = procs.bundled_tools_dir()
    if bundled is not None:
        names.extend(str(bundled / n) for n in ("libwim-15.dll", "libwim.so.15", "libwim.15.dylib")
                     if (bundled / n).is_file())
    found = ctypes.util.find_library("wim") or ctypes.util.find_library("libwim-15")
    if found:
        names.append(found)
    if _WINDOWS:
        names.append("libwim-15.dll")
    elif sys.platform == "darwin":
        names.append("libwim.15.dylib")
    else:
        names.append("libwim.so.15")
    return names


def _open_library(candidates: Sequence[str]) -> _Library:
    """Load the first candidate that loads, check its version and initialise it once."""
    if ctypes.sizeof(ctypes.c_void_p) != 8:
        raise EnvironmentProblem("LayerDesk's wimlib binding needs a 64-bit Python.")
    problems = []
    for name in candidates:
        try:
            lib = _Library(ctypes.CDLL(name))
        except (OSError, AttributeError) as exc:
            problems.append(f"{name}: {exc}")
            continue
        version = lib.version()
        if version[:2] < _MIN_VERSION or version[0] != _MIN_VERSION[0]:
            raise EnvironmentProblem(
                f"libwim {'.'.join(map(str, version))} is installed; LayerDesk needs wimlib 1.13 or newer 1.x. "
                "Install the Debian package libwim15 from Debian 12 or newer."
            )
        code = int(lib.wimlib_global_init(_INIT_FLAG_DEFAULT_CASE_INSENSITIVE))
        if code:
            raise EnvironmentProblem(f"wimlib could not be initialised: {lib.error_text(code)}")
        lib.capture_messages()
        return lib
    hint = "the wimlib DLL (libwim-15.dll) next to LayerDesk" if _WINDOWS else "the Debian package libwim15"
    raise EnvironmentProblem(
        f"The wimlib library (libwim) was not found on this machine. Install {hint}. "
        f"Tried: {'; '.join(problems) or ', '.join(candidates)}"
    )


def load_library() -> _Library:
    """libwim, loaded and initialised (case-insensitive paths) on first use; :class:`EnvironmentProblem`
    naming what to install when it is missing."""
    global _library
    with _lock:
        if _library is None:
            _library = _open_library(_candidates())
        return _library


def library_version() -> str:
    return ".".join(map(str, load_library().version()))


def _raise_for(lib: _Library, code: int, doing: str, errors: Sequence[str] = ()) -> None:
    if code == 0:
        return
    text = lib.error_text(code).replace(" (check errno)", "")
    message = f"{doing}: {text} (wimlib error {code})"
    if errors:  # wimlib's own words on what failed, e.g. "Error writing data to NTFS volume: No space left…"
        message += ": " + "; ".join(errors[-3:])
    if code in _USER_ERRORS:
        raise WimError(message, wimlib_code=code)
    if code == _ERR_CONCURRENT_MODIFICATION:
        raise WimDataChanged(message)
    raise EnvironmentProblem(message)


# --- public types ---------------------------------------------------------------------------------

#: ``progress(done_bytes, total_bytes)``, called while file data is written to a WIM or applied.
ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class AddCommand:
    """Add ``source`` at ``target`` in the image; directories overlay existing ones, files replace whole.

    ``ntfs=True``: ``source`` is an NTFS volume image (its files keep ACLs, streams, short names).
    ``ntfs=False``: ``source`` is a folder or file of the local file system.
    """

    source: Path | str
    target: str = "/"
    ntfs: bool = True


@dataclass(frozen=True)
class DeleteCommand:
    """Delete ``path`` from the image (a layer's whiteout). ``missing_ok``: no error when it is absent."""

    path: str
    recursive: bool = True
    missing_ok: bool = False


@dataclass(frozen=True)
class RenameCommand:
    """Move the file or directory ``source`` to ``target`` (which must not exist) within the image."""

    source: str
    target: str


UpdateCommand = AddCommand | DeleteCommand | RenameCommand


@dataclass(frozen=True)
class DirEntry:
    """One file or directory of an image, as wimlib_iterate_dir_tree reports it."""

    path: str  # "/"-separated, "/" is the root
    is_directory: bool
    size: int  # of the unnamed data stream (of the reparse data for a reparse point)
    attributes: int  # FILE_ATTRIBUTE_* bits
    has_security_descriptor: bool
    stream_names: tuple[str, ...]  # named (alternate) data streams
    short_name: str | None  # the 8.3 (DOS) name, if the file has one
    reparse_tag: int  # 0 unless a reparse point
    link_count: int
    inode_id: int  # equal for hard links of one file
    #: SHA-1 of the unnamed data stream (of the reparse data for a reparse point), then of each named stream in
    #: ``stream_names`` order; 20 zero bytes for an empty stream, ``None`` while wimlib has not hashed the data
    #: yet (files captured since the WIM was last written: see :meth:`Wim.compute_hashes`).
    stream_hashes: tuple[bytes | None, ...] = ()
    #: The self-relative security descriptor, if any (entries with equal descriptors share one object).
    security_descriptor: bytes | None = None
    #: Creation, last write and last access times, as Windows FILETIMEs.
    times: tuple[int, int, int] = (0, 0, 0)


# --- the WIM handle --------------------------------------------------------------------------------


class Wim:
    """An open WIMStruct. Use as a context manager (or call :meth:`close`): it is freed on close.

    Image indexes are 1-based as in wimlib. The heavy operations take ``progress`` (a
    :data:`ProgressFn`) and ``cancel`` (anything with ``.cancelled``); a cancel makes wimlib stop at its
    next progress message and the call raise :class:`TaskCanceled`. Byte progress is reported while file
    data is written, applied or verified; capturing and updating only scan (file data is read at write/apply time),
    so there ``cancel`` is checked per scanned file and ``progress`` is not called. One thread at a time.
    """

    def __init__(self, lib: _Library, handle: int, path: Path | None) -> None:
        self._lib = lib
        self._handle: int | None = handle
        self.path = path

    # construction and life time

    @classmethod
    def create(cls, compression: Compression = "xpress") -> Wim:
        """A new, empty WIM in memory (nothing is written until :meth:`write`)."""
        if compression not in _COMPRESSION:
            raise WimError(f"Unknown WIM compression {compression!r}; use one of {', '.join(_COMPRESSION)}.")
        lib = load_library()
        handle = ctypes.c_void_p()
        lib.check("Cannot create a WIM",
                  lambda: lib.wimlib_create_new_wim(_COMPRESSION[compression], ctypes.byref(handle)))
        assert handle.value is not None
        return cls(lib, handle.value, None)

    @classmethod
    def open(cls, path: Path | str, *, check_integrity: bool = False) -> Wim:
        """Open an existing WIM file. ``check_integrity``: if the file has an integrity table, check the
        whole file against it first (a damaged file raises :class:`WimError`)."""
        path = Path(path)
        if not path.exists():
            raise WimError(f"The WIM file {path} does not exist.")
        if not path.is_file():
            raise WimError(f"{path} is not a file, so it cannot be a WIM file.")
        lib = load_library()
        handle = ctypes.c_void_p()
        buf = _tstr(path)
        flags = _OPEN_FLAG_CHECK_INTEGRITY if check_integrity else 0
        lib.check(f"Cannot open the WIM file {path}", lambda: lib.wimlib_open_wim(buf, flags, ctypes.byref(handle)))
        assert handle.value is not None
        return cls(lib, handle.value, path)

    def close(self) -> None:
        if self._handle is not None:
            self._lib.wimlib_free(self._handle)
            self._handle = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def _wim(self) -> int:
        if self._handle is None:
            raise WimError("This WIM has been closed.")
        return self._handle

    # information

    def _info(self) -> _WimInfo:
        info = _WimInfo()
        wim = self._wim
        self._lib.check("Cannot read the WIM's header", lambda: self._lib.wimlib_get_wim_info(wim, ctypes.byref(info)))
        return info

    @property
    def image_count(self) -> int:
        return int(self._info().image_count)

    @property
    def has_integrity_table(self) -> bool:
        """Whether the file this WIM was opened from carries an integrity table (SHA-1 of every chunk)."""
        return bool(self._info().flags & 0x1)  # the first bit field of wimlib_wim_info's flags

    def _check_index(self, index: int) -> None:
        count = self.image_count
        if not 1 <= index <= count:
            where = f"{self.path}" if self.path else "this WIM"
            raise WimError(f"{where} has no image {index} (it has {count} image{'s' * (count != 1)}).")

    def image_name(self, index: int) -> str:
        self._check_index(index)
        return _from_tstr(self._lib.wimlib_get_image_name(self._wim, index)) or ""

    def image_created(self, index: int) -> int:
        """When image ``index`` was added to its WIM, as a Windows FILETIME (100 ns since 1601-01-01 UTC) from
        the WIM's XML data; 0 when the XML does not say."""
        self._check_index(index)
        parts = []
        for part in ("HIGHPART", "LOWPART"):
            name = _tstr(f"CREATIONTIME/{part}")
            text = _from_tstr(self._lib.wimlib_get_image_property(self._wim, index, name))
            try:
                parts.append(int(text or "", 0) & 0xFFFFFFFF)
            except ValueError:
                return 0
        return parts[0] << 32 | parts[1]

    def find_image(self, name: str) -> int | None:
        """The index of the image named ``name`` (exactly), or ``None``."""
        for index in range(1, self.image_count + 1):
            if _from_tstr(self._lib.wimlib_get_image_name(self._wim, index)) == name:
                return index
        return None

    def iterate_dir_tree(self, index: int, path: str = "/") -> Iterator[DirEntry]:
        """Every file and directory at and under ``path`` of image ``index``, parents before children.

        wimlib walks the tree in one call: the entries are gathered (and errors raised) before this returns.
        """
        self._check_index(index)
        entries: list[DirEntry] = []
        stream_size = ctypes.sizeof(_StreamEntry)
        descriptors: dict[tuple[int, int], bytes] = {}  # wimlib keeps each distinct descriptor once

        def digest(stream: _StreamEntry) -> bytes | None:
            sha1 = bytes(stream.resource.sha1_hash)
            return None if sha1 == _ZERO_HASH and stream.resource.uncompressed_size else sha1

        def on_entry(entry_ptr: Any) -> None:
            entry = entry_ptr.contents
            first_stream = ctypes.addressof(entry) + ctypes.sizeof(_DirEntry)
            names = []
            unnamed = _StreamEntry.from_address(first_stream)
            hashes = [digest(unnamed)]
            for n in range(1, 1 + int(entry.num_named_streams)):
                stream = _StreamEntry.from_address(first_stream + n * stream_size)
                names.append(_from_tstr(stream.stream_name) or "")
                hashes.append(digest(stream))
            size = unnamed.resource.uncompressed_size
            security = None
            if entry.security_descriptor and entry.security_descriptor_size:
                where = (int(entry.security_descriptor), int(entry.security_descriptor_size))
                security = descriptors.get(where)
                if security is None:
                    security = descriptors[where] = ctypes.string_at(*where)
            raw_path = _from_tstr(entry.full_path) or "/"
            entries.append(DirEntry(
                path=raw_path.replace("\\", "/") if _WINDOWS else raw_path,
                is_directory=bool(entry.attributes & FILE_ATTRIBUTE_DIRECTORY),
                size=int(size),
                attributes=int(entry.attributes),
                has_security_descriptor=bool(entry.security_descriptor and entry.security_descriptor_size),
                stream_names=tuple(names),
                short_name=_from_tstr(entry.dos_name) or None,
                reparse_tag=int(entry.reparse_tag),
                link_count=int(entry.num_links),
                inode_id=int(entry.hard_link_group_id),
                stream_hashes=tuple(hashes),
                security_descriptor=security,
                times=(_filetime(entry.creation_time), _filetime(entry.last_write_time),
                       _filetime(entry.last_access_time)),
            ))

        self._walk(index, path, on_entry)
        return iter(entries)

    def list_paths(self, index: int) -> list[tuple[str, bool]]:
        """``(path, is a directory)`` of every file and directory of image ``index``, parents before children:
        what :meth:`iterate_dir_tree` gives, less everything else (a fifth of its time)."""
        self._check_index(index)
        found: list[tuple[str, bool]] = []
        path_at, attributes_at = _DirEntry.full_path.offset, _DirEntry.attributes.offset
        pointer_at, u32_at = ctypes.c_void_p.from_address, ctypes.c_uint32.from_address

        def on_entry(entry_ptr: Any) -> None:
            base = ctypes.addressof(entry_ptr.contents)
            raw_path = _from_tstr(pointer_at(base + path_at).value) or "/"
            found.append((raw_path.replace("\\", "/") if _WINDOWS else raw_path,
                          bool(u32_at(base + attributes_at).value & FILE_ATTRIBUTE_DIRECTORY)))

        self._walk(index, "/", on_entry)
        return found

    def _walk(self, index: int, path: str, visit: Callable[[Any], None]) -> None:
        """One wimlib_iterate_dir_tree call over ``path`` of image ``index`` and everything under it:
        ``visit`` gets each entry (a pointer to its ``wimlib_dir_entry``); an exception it raises stops the
        walk and is raised here."""
        failure: list[BaseException] = []

        def on_entry(entry_ptr: Any, _ctx: Any) -> int:
            try:
                visit(entry_ptr)
            except BaseException as exc:  # noqa: BLE001 - carried across the C frame and re-raised below
                failure.append(exc)
                return 1
            return 0

        callback = _ITERATE_CALLBACK(on_entry)
        buf = _tstr(path)
        wim = self._wim
        code, errors = self._lib.run(
            lambda: self._lib.wimlib_iterate_dir_tree(wim, index, buf, _ITERATE_DIR_TREE_FLAG_RECURSIVE, callback, None)
        )
        if failure:
            raise failure[0]
        _raise_for(self._lib, code, f"Cannot list {path} in image {index}", errors)

    # building images

    def add_image_from_ntfs_volume(
        self, volume_path: Path | str, name: str, *, progress: ProgressFn | None = None,
        cancel: Cancellable | None = None,
    ) -> int:
        """Capture an (unmounted) NTFS volume image as a new image; returns its index."""
        return self._add_image(Path(volume_path), name, _ADD_FLAG_NTFS, progress, cancel)

    def add_image_from_folder(
        self, path: Path | str, name: str, *, progress: ProgressFn | None = None, cancel: Cancellable | None = None
    ) -> int:
        """Capture a folder of the local file system as a new image; returns its index."""
        return self._add_image(Path(path), name, 0, progress, cancel)

    def _add_image(
        self, source: Path, name: str, flags: int, progress: ProgressFn | None, cancel: Cancellable | None
    ) -> int:
        _require_source(source, ntfs=bool(flags & _ADD_FLAG_NTFS))
        if cancel is not None:
            flags |= _ADD_FLAG_VERBOSE
        src, image_name = _tstr(source), _tstr(name)
        with self._progress(progress, cancel, f"Cannot capture {source}") as run:
            run(lambda: self._lib.wimlib_add_image(self._wim, src, image_name, None, flags))
        return self.image_count

    def update_image(
        self, index: int, commands: Sequence[UpdateCommand], *, progress: ProgressFn | None = None,
        cancel: Cancellable | None = None,
    ) -> None:
        """Apply ``commands`` to image ``index`` in ONE wimlib_update_image call (all or nothing).

        Merge a layer per call: its whiteouts (:class:`DeleteCommand`) first, then its volume
        (:class:`AddCommand`). More than one NTFS source per call is refused (wimlib 1.13.6 would alias
        files of different volumes that share an MFT record number).
        """
        ntfs_sources = [c for c in commands if isinstance(c, AddCommand) and c.ntfs]
        if len(ntfs_sources) > 1:
            raise WimError(
                "One update may add only one NTFS volume image (wimlib 1.13.6 mixes up files of different "
                "volumes that share an MFT record number); merge one layer per update."
            )
        self._update(index, commands, progress=progress, cancel=cancel)

    def _update(
        self, index: int, commands: Sequence[UpdateCommand], *, progress: ProgressFn | None = None,
        cancel: Cancellable | None = None,
    ) -> None:
        """The raw wimlib_update_image call, without the one-NTFS-source guard."""
        self._check_index(index)
        if not commands:
            return
        keep: list[ctypes.Array[Any]] = []  # the strings must outlive the call

        def address(text: str | os.PathLike[str]) -> int:
            keep.append(_tstr(text))
            return ctypes.addressof(keep[-1])

        array = (_UpdateCommand * len(commands))()
        scan_flags = _ADD_FLAG_VERBOSE if cancel is not None else 0  # a progress message per file: cancellable
        for slot, command in zip(array, commands, strict=True):
            if isinstance(command, AddCommand):
                _require_source(Path(command.source), ntfs=command.ntfs)
                slot.op = _UPDATE_OP_ADD
                slot.add.fs_source_path = address(Path(command.source))
                slot.add.wim_target_path = address(command.target)
                slot.add.config_file = None
                slot.add.add_flags = (_ADD_FLAG_NTFS if command.ntfs else 0) | scan_flags
            elif isinstance(command, RenameCommand):
                slot.op = _UPDATE_OP_RENAME
                slot.rename.wim_source_path = address(command.source)
                slot.rename.wim_target_path = address(command.target)
                slot.rename.rename_flags = 0
            else:
                slot.op = _UPDATE_OP_DELETE
                slot.delete.wim_path = address(command.path)
                slot.delete.delete_flags = ((_DELETE_FLAG_RECURSIVE if command.recursive else 0)
                                            | (_DELETE_FLAG_FORCE if command.missing_ok else 0))
        flags = _UPDATE_FLAG_SEND_PROGRESS if cancel is not None else 0
        with self._progress(progress, cancel, f"Cannot update image {index}") as run:
            run(lambda: self._lib.wimlib_update_image(self._wim, index, array, len(commands), flags))

    def take_hashes_from(self, index: int, template: Wim, template_index: int) -> None:
        """Give files of image ``index`` captured since the last write (their data not yet hashed) the SHA-1s
        of the files at the same paths in image ``template_index`` of ``template`` (paths compared case
        sensitively), where both have the same creation and last write times and the same stream sizes:
        ``wimlib_reference_template_image``. Their data is then not read to hash it; it is still read, and
        checked against those SHA-1s, when the image is applied or written. Files already hashed, and files
        the template does not have or holds with other times or sizes, are left alone. ``template`` may be
        closed afterwards."""
        self._check_index(index)
        template._check_index(template_index)
        wim, other = self._wim, template._wim
        self._lib.check(
            f"Cannot compare image {index} with image {template_index} of {template.path or 'another WIM'}",
            lambda: self._lib.wimlib_reference_template_image(wim, index, other, template_index, 0),
        )

    def delete_image(self, index: int) -> None:
        """Remove image ``index`` from this WIM in memory (later images move down by one); the file
        changes on :meth:`write`, which leaves out data no remaining image uses."""
        self._check_index(index)
        wim = self._wim
        self._lib.check(f"Cannot delete image {index}", lambda: self._lib.wimlib_delete_image(wim, index))

    def export_image(self, index: int, destination: Wim, name: str) -> int:
        """Copy image ``index`` into ``destination`` (in memory) as a new image called ``name``; returns its
        index there. Keep this WIM open until ``destination`` is written: the file data is read from it then.
        wimlib cannot update either image's tree afterwards while both are open."""
        self._check_index(index)
        source, target, image_name = self._wim, destination._wim, _tstr(name)
        self._lib.check(
            f"Cannot export image {index}",
            lambda: self._lib.wimlib_export_image(source, index, target, image_name, None, 0),
        )
        return destination.image_count

    # checking

    def verify(self, *, progress: ProgressFn | None = None, cancel: Cancellable | None = None) -> None:
        """wimlib_verify_wim: every image's metadata and every file data blob is read back and checked
        against its SHA-1; a damaged WIM raises :class:`WimError` (or :class:`EnvironmentProblem` for a read
        error). Open with ``check_integrity=True`` to check the integrity table as well."""
        wim = self._wim
        with self._progress(progress, cancel, f"The WIM file {self.path or ''} failed verification") as run:
            run(lambda: self._lib.wimlib_verify_wim(wim, 0))

    # writing

    def write(
        self, path: Path | str, *, check_integrity: bool | None = None, fsync: bool = False,
        progress: ProgressFn | None = None, cancel: Cancellable | None = None,
    ) -> None:
        """Write every image to a new WIM file at ``path`` (through a temporary file: a failed or cancelled
        write leaves nothing behind and never damages an existing file). ``check_integrity``: ``True`` writes
        an integrity table (SHA-1 of every chunk of the file), ``False`` none, ``None`` one if the WIM this
        was opened from had one (wimlib's default); ``fsync``: the data is on disk when this returns."""
        path = Path(path)
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        buf = _tstr(partial)
        integrity = {True: _WRITE_FLAG_CHECK_INTEGRITY, False: _WRITE_FLAG_NO_CHECK_INTEGRITY, None: 0}
        flags = integrity[check_integrity] | (_WRITE_FLAG_FSYNC if fsync else 0)
        try:
            with self._progress(progress, cancel, f"Cannot write the WIM file {path}") as run:
                run(lambda: self._lib.wimlib_write(self._wim, buf, _ALL_IMAGES, flags, 0))
            partial.replace(path)
        finally:
            partial.unlink(missing_ok=True)

    def compute_hashes(self, *, progress: ProgressFn | None = None, cancel: Cancellable | None = None) -> None:
        """Have wimlib compute the SHA-1 of every file's data captured since this WIM was last written, so that
        :meth:`iterate_dir_tree` reports them (:attr:`DirEntry.stream_hashes`). wimlib only hashes data while
        writing it, so every image is written to the null device: the data is read once and nothing is kept.
        Cheapest on a WIM created with compression ``"none"``. ``progress`` reports the bytes read.

        Afterwards the WIM is for listing only: wimlib 1.13.6 loses some file data when an image of it is
        exported or written again (found by test); capture the files again into another WIM for that."""
        wim, sink = self._wim, _tstr(os.devnull)
        with self._progress(progress, cancel, "Cannot read the captured files' data") as run:
            run(lambda: self._lib.wimlib_write(wim, sink, _ALL_IMAGES, _WRITE_FLAG_NO_CHECK_INTEGRITY, 0))

    def overwrite(self, *, progress: ProgressFn | None = None, cancel: Cancellable | None = None) -> None:
        """Commit changes to the WIM file this WIM was opened from."""
        if self.path is None:
            raise WimError("This WIM was created in memory; use write(path) to save it.")
        with self._progress(progress, cancel, f"Cannot update the WIM file {self.path}") as run:
            run(lambda: self._lib.wimlib_overwrite(self._wim, 0, 0))

    # applying

    def extract_image_to_ntfs_volume(
        self, index: int, volume_path: Path | str, *, progress: ProgressFn | None = None,
        cancel: Cancellable | None = None,
    ) -> None:
        """Apply image ``index`` onto an EMPTY, unmounted NTFS volume image (e.g. from :func:`make_ntfs_volume`).

        A failed or cancelled apply leaves the volume partly written: format it again before reuse.
        """
        self._check_index(index)
        volume = Path(volume_path)
        _require_empty_ntfs_volume(volume)
        buf = _tstr(volume)
        with (self._progress(progress, cancel, f"Cannot apply image {index} to the NTFS volume {volume}") as run,
              writing_back(volume)):  # NTFS-3G syncs the volume when done: the disk starts early
            run(lambda: self._lib.wimlib_extract_image(self._wim, index, buf, _EXTRACT_FLAG_NTFS))

    def extract_image_to_folder(
        self, index: int, path: Path | str, *, progress: ProgressFn | None = None, cancel: Cancellable | None = None
    ) -> None:
        """Extract image ``index`` into a folder that is missing or empty; on failure or cancel the folder's
        new content (and the folder, if this call created it) is removed."""
        self._check_index(index)
        target = Path(path)
        created = not target.exists()
        if not created and (not target.is_dir() or any(target.iterdir())):
            raise WimError(f"Cannot extract into {target}: it must be an empty folder or not exist yet.")
        buf = _tstr(target)
        try:
            with self._progress(progress, cancel, f"Cannot extract image {index} to {target}") as run:
                run(lambda: self._lib.wimlib_extract_image(self._wim, index, buf, 0))
        except BaseException:
            if created:
                shutil.rmtree(target, ignore_errors=True)
            elif target.is_dir():
                for child in target.iterdir():
                    if child.is_dir() and not child.is_symlink():
                        shutil.rmtree(child, ignore_errors=True)
                    else:
                        child.unlink(missing_ok=True)
            raise

    def extract_paths_to_folder(self, index: int, paths: Sequence[str], folder: Path | str) -> None:
        """Extract the files ``paths`` (``/``-separated, looked up case-insensitively) of image ``index`` into
        the existing ``folder``, keeping their directory structure (``/a/b.txt`` lands in ``folder/a/b.txt``).
        A path that is not in the image raises :class:`WimError`."""
        self._check_index(index)
        target = Path(folder)
        if not target.is_dir():
            raise WimError(f"Cannot extract into {target}: it is not a folder.")
        if not paths:
            return
        keep = [_tstr(path) for path in paths]
        array = (ctypes.c_void_p * len(keep))(*(ctypes.addressof(buf) for buf in keep))
        buf, wim = _tstr(target), self._wim
        self._lib.check(
            f"Cannot extract {', '.join(paths)} from image {index}",
            lambda: self._lib.wimlib_extract_paths(wim, index, buf, array, len(keep), 0),
        )

    # progress and cancellation

    @contextlib.contextmanager
    def _progress(
        self, progress: ProgressFn | None, cancel: Cancellable | None, doing: str
    ) -> Iterator[Callable[[Callable[[], Any]], None]]:
        """Register a progress function for the duration of one wimlib call; yields ``run(call)``, which
        makes the call and turns its result into an error, :class:`TaskCanceled`, or the exception the
        ``progress`` callable raised."""
        if cancel is not None and cancel.cancelled:
            raise TaskCanceled()
        failure: list[BaseException] = []

        def on_progress(msg: int, info: int | None, _ctx: int | None) -> int:
            try:
                if cancel is not None and cancel.cancelled:
                    return _PROGRESS_STATUS_ABORT
                if progress is not None and info:
                    if msg == _PROGRESS_MSG_EXTRACT_STREAMS:
                        extract = _ExtractProgress.from_address(info)
                        progress(int(extract.completed_bytes), int(extract.total_bytes))
                    elif msg == _PROGRESS_MSG_WRITE_STREAMS:
                        write = _WriteStreamsProgress.from_address(info)
                        progress(int(write.completed_bytes), int(write.total_bytes))
                    elif msg == _PROGRESS_MSG_VERIFY_STREAMS:
                        verify = _VerifyStreamsProgress.from_address(info)
                        progress(int(verify.completed_bytes), int(verify.total_bytes))
                if cancel is not None and cancel.cancelled:
                    return _PROGRESS_STATUS_ABORT
            except BaseException as exc:  # noqa: BLE001 - carried across the C frame and re-raised below
                failure.append(exc)
                return _PROGRESS_STATUS_ABORT
            return _PROGRESS_STATUS_CONTINUE

        hooked = progress is not None or cancel is not None
        callback = _PROGRESS_CALLBACK(on_progress)

        def run(call: Callable[[], Any]) -> None:
            code, errors = self._lib.run(call)
            if failure:
                raise failure[0]
            if code == _ERR_ABORTED_BY_PROGRESS and cancel is not None and cancel.cancelled:
                raise TaskCanceled()
            _raise_for(self._lib, code, doing, errors)

        if hooked:
            self._lib.wimlib_register_progress_function(self._wim, callback, None)
        try:
            yield run
        finally:
            if hooked and self._handle is not None:
                self._lib.wimlib_register_progress_function(self._handle, _PROGRESS_CALLBACK(), None)


# --- checks and NTFS volume images ----------------------------------------------------------------


def _require_source(source: Path, *, ntfs: bool) -> None:
    if not source.exists():
        kind = "NTFS volume image" if ntfs else "folder"
        raise WimError(f"The {kind} {source} does not exist.")
    if ntfs and not source.is_file() and not source.is_block_device():
        raise WimError(f"{source} is not an NTFS volume image (a file or block device).")


def _ntfs_program(name: str) -> str:
    """ntfs-3g's tools live in /usr/sbin (mkntfs, ntfscp) or /usr/bin."""
    return procs.find_program(name, package_hint="the Debian package ntfs-3g")


def _require_empty_ntfs_volume(volume: Path) -> None:
    """wimlib's NTFS apply needs a fresh volume: refuse one whose root holds anything but system files."""
    if not volume.exists():
        raise WimError(f"The NTFS volume image {volume} does not exist; create it with make_ntfs_volume().")
    outcome = procs.run([_ntfs_program("ntfsls"), str(volume)], timeout_s=120)
    if not outcome.ok:
        detail = (outcome.stderr.strip().splitlines() or ["no details"])[-1]
        raise WimError(f"{volume} cannot be opened as an NTFS volume: {detail}")
    names = [line for line in outcome.stdout.splitlines() if line.strip() and line not in {".", ".."}]
    if names:
        shown = ", ".join(names[:5]) + (", …" if len(names) > 5 else "")
        raise WimError(
            f"The NTFS volume {volume} is not empty ({shown}); an image can only be applied onto a freshly "
            "formatted volume."
        )


def overwrite_file_in_ntfs_volume(volume: Path | str, source: Path | str, path: str) -> None:
    """Replace the data of the existing file ``path`` (``/``-separated, as the volume spells it) inside the
    NTFS volume image ``volume`` with the contents of the local file ``source`` (``ntfscp -f``): the file
    keeps its security descriptor, attributes, short name and other streams."""
    outcome = procs.run([_ntfs_program("ntfscp"), "-f", str(volume), str(source), path], timeout_s=600)
    if not outcome.ok:
        detail = " ".join(outcome.stderr.split()[-40:]) or f"exit status {outcome.returncode}"
        raise WimError(f"Cannot write {path} inside {volume}: {detail}")


def make_ntfs_volume(
    path: Path | str, size_bytes: int, *, label: str = "", partition_start_sector: int | None = None
) -> Path:
    """Create a sparse file of ``size_bytes`` and format it as NTFS (``mkntfs -F -Q -c 4096``).

    ``partition_start_sector`` (in 512-byte sectors) records where the volume will sit on a disk
    (``-p N -H 255 -S 63``), which Windows needs to boot from it. The file must not exist yet.
    """
    path = Path(path)
    if size_bytes < 2 * 1024 * 1024:
        raise WimError(f"An NTFS volume needs at least 2 MiB; {size_bytes} bytes were asked for.")
    if path.exists():
        raise WimError(f"{path} already exists; an NTFS volume image is only created as a new file.")
    mkntfs = _ntfs_program("mkntfs")
    argv = [mkntfs, "-F", "-Q", "-q", "-c", "4096"]
    if label:
        argv += ["-L", label]
    if partition_start_sector is not None:
        argv += ["-p", str(partition_start_sector), "-H", "255", "-S", "63"]
    argv.append(str(path))
    with path.open("xb") as file:
        file.truncate(size_bytes)
    try:
        outcome = procs.run(argv, timeout_s=600)
        if not outcome.ok:
            detail = " ".join(outcome.stderr.split()[-40:]) or f"exit status {outcome.returncode}"
            raise EnvironmentProblem(f"mkntfs could not format {path}: {detail}")
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path
