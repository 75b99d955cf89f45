"""The checksum of a published image: ``sha256-4m:<hex>``.

It is the SHA-256 of the concatenated SHA-256 digests (32 bytes each) of the file's consecutive 4 MiB
blocks, the last one possibly shorter; an empty file has no blocks, so its checksum is the SHA-256 of
nothing. Any machine can check it with standard tools, for example with coreutils::

    split -b 4M --filter='sha256sum' IMAGE | cut -c1-64 | tr a-f A-F | basenc --base16 -d | sha256sum

or with ``layerctl image checksum IMAGE``.

Why blocks and not the SHA-256 of the whole file: SHA-256 reads every byte in order on one core (about
2 s for a 3 GB image on the machines measured), which was most of a re-publish. With blocks,

* the blocks are hashed on every core;
* a block that lies in a hole of the file, or that the writer knows to be zeros, costs nothing (the
  digest of 4 MiB of zeros is a constant);
* a block whose bytes are a range of the Windows volume that provably did not change since the last
  publish of the same stack takes its digest from that publish (:class:`Known`): a re-publish hashes what
  changed, not the whole image.
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.files import data_ranges
from app.procs import Cancellable
from app.tasks.base import TaskCanceled

__all__ = ["BLOCK", "PREFIX", "ZERO_LEAF", "BlockHash", "Known", "checksum_like", "file_checksum"]

BLOCK = 4 * 1024 * 1024
PREFIX = "sha256-4m:"
#: The digest of a block of zeros (a hole, or zeros the writer did not store).
ZERO_LEAF = hashlib.sha256(bytes(BLOCK)).digest()
_ZEROS = bytes(BLOCK)


def root(leaves: bytes | bytearray) -> str:
    """The checksum of a file whose block digests, in order, are ``leaves``."""
    return PREFIX + hashlib.sha256(leaves).hexdigest()


class BlockHash:
    """The checksum of bytes given in order (:meth:`update`, :meth:`zeros`), block by block. Not
    thread-safe: one caller feeds it."""

    def __init__(self) -> None:
        self._leaves = bytearray()
        self._block = hashlib.sha256()
        self._filled = 0  # bytes of the current block hashed so far
        self.position = 0

    def update(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            step = min(len(view), BLOCK - self._filled)
            if step == BLOCK:
                self._leaves += hashlib.sha256(view[:step]).digest()
            else:
                self._block.update(view[:step])
                self._filled += step
                if self._filled == BLOCK:
                    self._end_block()
            view = view[step:]
            self.position += step

    def zeros(self, count: int) -> None:
        while count > 0:
            step = min(count, BLOCK - self._filled)
            if step == BLOCK:
                self._leaves += ZERO_LEAF
                self.position += step
            else:
                self.update(memoryview(_ZEROS)[:step])
            count -= step

    def checksum(self) -> str:
        leaves = bytearray(self._leaves)
        if self._filled:
            leaves += self._block.digest()
        return root(leaves)

    def _end_block(self) -> None:
        self._leaves += self._block.digest()
        self._block = hashlib.sha256()
        self._filled = 0


@dataclass
class Known:
    """What the last publish of the same stack left for this one's checksum: block digests to take instead
    of reading the bytes, and where it put the disk's blocks in its image file.

    A block of the image whose bytes are ranges of the Windows volume is named by its *composition*: each
    range's place in the block, length and offset in the volume (see
    :func:`app.engine.in_place.composition`). ``digests`` maps compositions to the digest the block had
    when the volume was as it was then; ``unchanged(begin, end)`` says whether the volume's bytes in
    ``[begin, end)`` are provably still those (see :func:`app.engine.extents.same_ranges`). ``layouts``
    (by image format) say where that image put each of the disk's blocks: an image laid out alike puts
    the blocks that are still there in the same places, so its blocks have the same compositions.

    The hasher fills ``found`` and ``found_layouts`` with this publish's, for the next one."""

    digests: Mapping[str, bytes] = field(default_factory=dict)
    unchanged: Callable[[int, int], bool] = lambda begin, end: False
    layouts: Mapping[str, Any] = field(default_factory=dict)
    found: dict[str, bytes] = field(default_factory=dict)
    found_layouts: dict[str, Any] = field(default_factory=dict)
    reused: int = 0  # blocks whose digest came from ``digests``
    seconds: float = 0.0  # spent computing the checksum

    def take(self, composition: str, ranges: Sequence[tuple[int, int]]) -> bytes | None:
        """The digest of a block made of the volume's ``ranges`` as ``composition`` says, when it is known
        and none of those ranges changed."""
        digest = self.digests.get(composition)
        if digest is not None and all(self.unchanged(begin, end) for begin, end in ranges):
            self.reused += 1
            return digest
        return None


def file_checksum(path: Path, cancel: Cancellable | None = None, threads: int = 2) -> str:
    """The checksum of the file at ``path``, its blocks read and hashed on ``threads`` threads; blocks in
    holes are not read."""
    with Path(path).open("rb") as file:
        fd = file.fileno()
        size = os.fstat(fd).st_size
        data = data_ranges(fd, size)
        count = -(-size // BLOCK)
        leaves: list[bytes | Future[bytes]] = []

        def read_and_hash(offset: int, length: int) -> bytes:
            buffer = bytearray(length)
            view = memoryview(buffer)
            done = 0
            while done < length:
                got = os.preadv(fd, [view[done:]], offset + done)
                if got <= 0:
                    raise OSError(f"{path} ended at {offset + done} of {size} bytes while it was being hashed")
                done += got
            return hashlib.sha256(buffer).digest()

        next_range = 0
        workers = max(1, threads)
        in_flight: deque[Future[bytes]] = deque()
        with ThreadPoolExecutor(workers, thread_name_prefix="image-checksum") as pool:
            for index in range(count):
                if cancel is not None and cancel.cancelled:
                    raise TaskCanceled()
                begin, end = index * BLOCK, min(size, (index + 1) * BLOCK)
                while next_range < len(data) and data[next_range][1] <= begin:
                    next_range += 1
                in_hole = next_range >= len(data) or data[next_range][0] >= end
                if in_hole and end - begin == BLOCK:
                    leaves.append(ZERO_LEAF)
                    continue
                if in_hole:
                    leaves.append(hashlib.sha256(bytes(end - begin)).digest())
                    continue
                hashing = pool.submit(read_and_hash, begin, end - begin)
                leaves.append(hashing)
                in_flight.append(hashing)
                if len(in_flight) > 2 * workers:
                    in_flight.popleft().result()  # bounded memory: a few blocks in flight
        digests = bytearray()
        for leaf in leaves:
            digests += leaf if isinstance(leaf, bytes) else leaf.result()
    return root(digests)


def checksum_like(path: Path, recorded: str) -> str:
    """The checksum of ``path`` made the way ``recorded`` was: ``sha256-4m:`` (this module), or
    ``sha256:`` (the SHA-256 of the whole file, as images published before block checksums recorded)."""
    if recorded.startswith(PREFIX):
        return file_checksum(path)
    if recorded.startswith("sha256:"):
        from app.engine.transfer import sha256_file  # only for images recorded the old way

        return "sha256:" + sha256_file(Path(path))
    raise ValueError(f"unknown checksum kind {recorded.split(':', 1)[0]!r}")
