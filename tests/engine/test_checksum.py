"""The image checksum (``sha256-4m:``) against coreutils, and the extents that let a re-publish take the
digests of unchanged blocks: a real XFS with reflink, loop-mounted (root, as in CI)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from app.engine.checksum import BLOCK, ZERO_LEAF, BlockHash, Known, checksum_like, file_checksum
from app.engine.composite import clone_file
from app.engine.extents import same_ranges
from app.tasks.base import CancelToken, TaskCanceled
from tests.support.image_checksum import image_checksum
from tests.support.tools import loop_filesystem

MiB = 1024 * 1024

SIZES = [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 12345]


def _pattern(size: int, seed: int = 0) -> bytes:
    """Bytes that differ from block to block (so a digest in the wrong place shows)."""
    unit = hashlib.sha256(str(seed).encode()).digest()
    stream = bytearray()
    counter = 0
    while len(stream) < size:
        stream += hashlib.sha256(unit + counter.to_bytes(8, "little")).digest() * 128
        counter += 1
    return bytes(stream[:size])


@pytest.mark.parametrize("size", SIZES)
def test_file_and_stream_checksums_agree_with_coreutils(tmp_path: Path, size: int) -> None:
    data = _pattern(size)
    path = tmp_path / "image.bin"
    path.write_bytes(data)
    stream = BlockHash()
    for offset in range(0, size, 1_000_003):  # pieces that straddle block boundaries
        stream.update(data[offset:offset + 1_000_003])

    expected = image_checksum(path)

    assert expected.startswith("sha256-4m:") and len(expected) == len("sha256-4m:") + 64
    assert file_checksum(path) == expected
    assert file_checksum(path, threads=1) == expected
    assert stream.checksum() == expected
    if size <= BLOCK:  # one block: the root is the SHA-256 of that block's digest
        assert expected == "sha256-4m:" + hashlib.sha256(hashlib.sha256(data).digest() if size else b"").hexdigest()


def test_holes_and_zeros_hash_as_the_zeros_they_read_as(tmp_path: Path) -> None:
    path = tmp_path / "sparse.raw"
    with path.open("wb") as file:
        file.truncate(7 * BLOCK + 5)
        file.seek(2 * BLOCK + 100)
        file.write(b"data in the third block")
    stream = BlockHash()
    stream.zeros(2 * BLOCK + 100)
    stream.update(b"data in the third block")
    stream.zeros(7 * BLOCK + 5 - stream.position)

    expected = image_checksum(path)

    assert file_checksum(path) == expected
    assert stream.checksum() == expected
    assert hashlib.sha256(bytes(BLOCK)).digest() == ZERO_LEAF


def test_a_checksum_is_made_the_way_the_recorded_one_was(tmp_path: Path) -> None:
    path = tmp_path / "image.bin"
    path.write_bytes(_pattern(BLOCK + 7))
    assert checksum_like(path, "sha256-4m:" + "0" * 64) == image_checksum(path)
    assert checksum_like(path, "sha256:" + "0" * 64) == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(ValueError, match="unknown checksum kind 'md5'"):
        checksum_like(path, "md5:" + "0" * 32)


def test_a_cancelled_checksum_stops(tmp_path: Path) -> None:
    path = tmp_path / "image.bin"
    path.write_bytes(_pattern(3 * BLOCK))
    token = CancelToken()
    token.cancel()

    with pytest.raises(TaskCanceled):
        file_checksum(path, cancel=token)


def test_known_gives_a_digest_only_where_every_range_is_unchanged() -> None:
    known = Known({"0:4194304:0": b"a" * 32, "0:1048576:0,1048576:3145728:8388608": b"b" * 32},
                  unchanged=lambda begin, end: end <= BLOCK)

    assert known.take("0:4194304:0", [(0, BLOCK)]) == b"a" * 32
    assert known.take("0:1048576:0,1048576:3145728:8388608", [(0, MiB), (2 * BLOCK, 2 * BLOCK + 3 * MiB)]) is None
    assert known.take("0:4194304:4194304", [(BLOCK, 2 * BLOCK)]) is None  # never hashed
    assert known.reused == 1


def test_a_clone_is_the_same_until_written_and_only_where_written(tmp_path: Path) -> None:
    """XFS with reflink: the clone shares every block; writes (in the page cache only, not yet flushed),
    a hole filled and a tail cut differ; the rest stays the same, and those ranges do hold equal bytes."""
    with loop_filesystem(tmp_path / "xfs", 400, "xfs") as folder:
        original = folder / "volume.ntfs"
        with original.open("wb") as file:
            file.truncate(64 * MiB)
            file.write(_pattern(20 * MiB, seed=1))
            file.seek(40 * MiB)
            file.write(_pattern(8 * MiB, seed=2))  # 20..40 MiB stays a hole, as does 48..64
        clone = folder / "composite.ntfs"
        clone_file(original, clone)

        assert same_ranges(original, clone).ranges == [(0, 64 * MiB)]

        fd = os.open(original, os.O_WRONLY)
        try:
            os.pwrite(fd, b"changed", 5 * MiB + 10)  # a shared block: written elsewhere
            os.pwrite(fd, b"new data", 30 * MiB)  # in a hole of both
        finally:
            os.close(fd)
        same = same_ranges(original, clone)

        assert not same(5 * MiB, 5 * MiB + 4096 * 2)
        assert not same(30 * MiB, 30 * MiB + 8)
        assert same(0, 5 * MiB) and same(6 * MiB, 30 * MiB - 64 * 1024) and same(31 * MiB, 64 * MiB)
        assert same.total() >= 64 * MiB - 2 * MiB
        left, right = original.read_bytes(), clone.read_bytes()
        for begin, end in same.ranges:
            assert left[begin:end] == right[begin:end]


def test_files_that_are_not_clones_share_nothing(tmp_path: Path) -> None:
    """Equal bytes in two files that are not clones are not provably equal from their extents (each has
    its own blocks)."""
    data = _pattern(4 * MiB)
    with loop_filesystem(tmp_path / "xfs", 400, "xfs") as folder:
        (folder / "a").write_bytes(data)
        (folder / "b").write_bytes(data)
        assert same_ranges(folder / "a", folder / "b").ranges == []
        (folder / "c").write_bytes(data + b"x")
        assert same_ranges(folder / "a", folder / "c").ranges == []  # another size
