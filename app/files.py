"""Writing files so that a crash or a full disk never leaves half a file behind, and large files that are
written to disk while they are still being made."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

_SYNC_FILE_RANGE_WRITE = 2


def fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, *data: bytes | bytearray | memoryview) -> None:
    """``path`` holds ``data`` (one or more pieces, written one after the other) entirely or keeps what it
    had: a temporary file beside it is written, synced and renamed over it, then the folder is synced."""
    work = path.with_name(f".{path.name}.tmp")
    try:
        with work.open("wb") as file:
            for piece in data:
                file.write(piece)
            file.flush()
            os.fsync(file.fileno())
        work.replace(path)
    except BaseException:
        work.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@functools.cache
def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's ``sync_file_range`` (Linux only), or ``None``."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


@contextlib.contextmanager
def writing_back(path: Path, every_s: float = 0.25) -> Iterator[None]:
    """While the block runs, start writing ``path``'s dirty pages to disk every ``every_s`` seconds, without
    waiting for them.

    A library that writes a large file and syncs it when done (NTFS-3G writing a volume) otherwise leaves
    gigabytes dirty until that sync, which then waits for all of them while the disk was idle before. Started
    early, the disk writes while the writer still computes. Nothing is waited for here, and no write error is
    taken from the writer's own sync. A no-op where the system has no ``sync_file_range``."""
    start = _sync_file_range()
    if start is None:
        yield
        return
    fd = os.open(path, os.O_RDONLY)
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every_s):
            start(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)

    thread = threading.Thread(target=loop, name="writeback", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        os.close(fd)


def no_space(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is a file system running out of space: an :class:`OSError`, or the
    words of one in a tool's message (mkntfs, wimlib, NTFS-3G)."""
    seen: BaseException | None = exc
    while seen is not None:
        if getattr(seen, "errno", None) == errno.ENOSPC:  # OSError, and our errors that carry one
            return True
        if "no space left on device" in str(seen).lower():
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def data_ranges(fd: int, size: int) -> list[tuple[int, int]]:
    """``(start, end)`` of the ranges of the open file ``fd`` (``size`` bytes) that hold data, in order; the
    whole file where the system cannot tell holes (``SEEK_DATA``/``SEEK_HOLE``)."""
    seek_data, seek_hole = getattr(os, "SEEK_DATA", None), getattr(os, "SEEK_HOLE", None)
    if seek_data is None or seek_hole is None:
        return [(0, size)] if size else []
    found = []
    position = 0
    while position < size:
        try:
            data = os.lseek(fd, position, seek_data)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after ``position``
                break
            raise
        if data >= size:
            break
        hole = min(os.lseek(fd, data, seek_hole), size)
        found.append((data, hole))
        position = hole
    return found
