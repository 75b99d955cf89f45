"""The independent tools the engine tests check our output with (ntfs-3g, wimlib-imagex, qemu-img,
sgdisk, hivex…), found the way the app finds programs (system folders included); and a small real file
system, to show what a full disk does."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from app import procs
from app.errors import EnvironmentProblem


def tool(name: str) -> str:
    try:
        return procs.find_program(name)
    except EnvironmentProblem:
        raise AssertionError(f"{name} is missing: tests/run.sh installs the Debian packages the tests use") from None


def run_ok(*argv: str | Path, timeout_s: float = 120) -> procs.Outcome:
    """Run a tool; fail the test with its output unless it succeeds."""
    outcome = procs.run([tool(str(argv[0])), *map(str, argv[1:])], timeout_s=timeout_s)
    assert outcome.ok, f"{outcome.argv}: {outcome.returncode}\n{outcome.stdout}\n{outcome.stderr}"
    return outcome


@contextlib.contextmanager
def small_filesystem(where: Path, size: str, *, options: str = "") -> Iterator[Path]:
    """A tmpfs of ``size`` (``8m``, ``512k``) mounted at ``where`` (made here, with ``options`` such as
    ``mode=0777``), unmounted and removed afterwards. Mounting needs root: the test is skipped without it
    (and so fails in CI, which runs every test)."""
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(filter(None, (f"size={size}", options))),
                           "tmpfs", str(where)], capture_output=True, check=False)
    if done.returncode != 0:
        where.rmdir()
        pytest.skip(f"a small file system needs mount (root): {done.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)
        with contextlib.suppress(OSError):
            where.rmdir()


@contextlib.contextmanager
def loop_filesystem(where: Path, size_mib: int, fstype: str = "ext4") -> Iterator[Path]:
    """A real ext4 or XFS file system of ``size_mib`` MiB (XFS needs 300), in a file beside ``where`` and
    loop-mounted at ``where``: one that can move file blocks (unlike a tmpfs) and fills up. Needs root,
    like :func:`small_filesystem`."""
    image = where.with_name(where.name + f".{fstype}")
    with image.open("wb") as file:
        file.truncate(size_mib * 1024 * 1024)
    if fstype == "xfs":
        run_ok("mkfs.xfs", "-q", "-f", image)
    else:
        run_ok("mkfs.ext4", "-q", "-F", "-m", "0", "-b", "4096", image)
    where.mkdir()
    done = subprocess.run(["mount", "-o", "loop", str(image), str(where)], capture_output=True, check=False)
    if done.returncode != 0:
        where.rmdir()
        image.unlink()
        pytest.skip(f"a loop-mounted file system needs root: {done.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)
        with contextlib.suppress(OSError):
            where.rmdir()
        image.unlink(missing_ok=True)
