"""Large files are written to disk while they are being made (``writing_back``), seen through the kernel's
own count of a file's dirty pages (the ``cachestat`` system call)."""

from __future__ import annotations

import ctypes
import os
import time
from pathlib import Path

from app.files import writing_back

MiB = 1024 * 1024
_CACHESTAT = 451  # x86_64 and most other architectures (Linux 6.5 and newer)


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Stat(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in
                ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")]


def dirty_pages(path: Path) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        stat = _Stat()
        if libc.syscall(_CACHESTAT, fd, ctypes.byref(_Range(0, 0)), ctypes.byref(stat), 0) != 0:
            raise OSError(ctypes.get_errno(), "cachestat")
        return int(stat.nr_dirty)
    finally:
        os.close(fd)


def _write(path: Path, mib: int) -> None:
    chunk = os.urandom(MiB)
    with path.open("r+b") as file:
        for _ in range(mib):
            file.write(chunk)
        file.flush()


def test_a_file_written_meanwhile_reaches_the_disk_before_anyone_syncs_it(tmp_path: Path) -> None:
    """Without it the kernel keeps these pages dirty for up to 30 s (or until gigabytes are dirty)."""
    target = tmp_path / "volume.img"
    target.touch()
    with writing_back(target, every_s=0.05):
        _write(target, 96)
        deadline = time.monotonic() + 10
        while dirty_pages(target) > 96 * MiB // 4096 // 10 and time.monotonic() < deadline:
            time.sleep(0.05)
        left = dirty_pages(target)
    assert left <= 96 * MiB // 4096 // 10, f"{left} pages still dirty"
