"""Disk images assembled around the volume file in place (app.engine.in_place), checked with qemu-img.

The layouts are described as in test_vhd: each piece a size and the data written at offsets in it. The
raw disk the pieces make is written separately as the reference; qemu-img compares it with the image.
tmp_path is on the machine's disk (ext4 here and in CI), which can insert and collapse file ranges; a
tmpfs cannot, and shows the fallback.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import pytest

from app.engine import disk, in_place, vhd
from app.engine.checksum import Known
from app.engine.disk import DiskError
from app.tasks.base import CancelToken, TaskCanceled
from tests.engine.test_vhd import Piece, assert_image_holds, make_pieces, qemu_info, sha256
from tests.support.image_checksum import image_checksum
from tests.support.tools import loop_filesystem, run_ok, small_filesystem

KiB = 1024
MiB = 1024 * KiB
RANDOM = random.Random(23)
QEMU_NAMES = {"vhdx": "vhdx", "raw": "raw", "vhd-fixed": "vpc", "qcow2": "qcow2", "vhd-dynamic": "vpc",
              "vmdk-sparse": "vmdk", "vmdk-stream": "vmdk"}

LAYOUTS: dict[str, list[Piece]] = {
    # a GPT-like prefix ending on an odd MiB (the volume's first block is shared with it), a volume with
    # data at both edges, empty runs inside it (collapsed) and an end inside a block, then a suffix
    "odd-mib-start": [
        (3 * MiB, [(0, RANDOM.randbytes(17 * KiB)), (2 * MiB + 5, RANDOM.randbytes(9000))]),
        (40 * MiB + 512 * KiB, [(0, b"\xebR\x90NTFS    "), (MiB - 10, RANDOM.randbytes(20)),
                                (5 * MiB, RANDOM.randbytes(3 * MiB)), (21 * MiB + 7, RANDOM.randbytes(100)),
                                (40 * MiB + 100 * KiB, RANDOM.randbytes(4 * KiB))]),
        (MiB + 512 * KiB, [(MiB + 512 * KiB - 16 * KiB, RANDOM.randbytes(16 * KiB))]),
    ],
    # a volume on a block edge, whole blocks only, its first and last blocks empty (a run collapsed at
    # the start, one cut off at the end)
    "block-aligned": [
        (2 * MiB, [(0, RANDOM.randbytes(512))]),
        (16 * MiB, [(4 * MiB + 1, RANDOM.randbytes(MiB)), (9 * MiB, RANDOM.randbytes(2 * MiB))]),
        (2 * MiB, [(2 * MiB - 512, RANDOM.randbytes(512))]),
    ],
    # the volume first (no piece before it), then a gold disk's partition with data of its own
    "volume-first": [
        (10 * MiB, [(0, RANDOM.randbytes(4 * KiB)), (7 * MiB, RANDOM.randbytes(MiB))]),
        (6 * MiB, [(0, RANDOM.randbytes(5 * MiB))]),
    ],
}
VOLUME = {"odd-mib-start": 1, "block-aligned": 1, "volume-first": 0}


@pytest.fixture
def work(tmp_path: Path) -> Path:
    folder = tmp_path / "disks"
    folder.mkdir()
    return folder


def present_blocks(layout: list[Piece], block: int = 2 * MiB) -> int:
    """Blocks the data touches (what a compact dynamic VHDX, or qcow2 with 64 KiB clusters, stores)."""
    touched: set[int] = set()
    start = 0
    for size, writes in layout:
        for offset, data in writes:
            touched.update(range((start + offset) // block, (start + offset + len(data) - 1) // block + 1))
        start += size
    return len(touched)


@pytest.mark.parametrize("fmt", ["vhdx", "raw", "vhd-fixed", "qcow2", "vhd-dynamic", "vmdk-sparse"])
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_the_volume_becomes_an_image_of_the_whole_disk(work: Path, name: str, fmt: str) -> None:
    pieces, reference = make_pieces(work, LAYOUTS[name])
    volume = pieces[VOLUME[name]]
    inode = volume.stat().st_ino
    checksum = in_place.assemble(pieces, VOLUME[name], fmt)
    assert checksum == image_checksum(volume)
    assert volume.stat().st_ino == inode  # the same file, not a copy
    disk_size = reference.stat().st_size
    if fmt == "vhd-fixed":
        assert volume.stat().st_size == disk_size + 512
        disk.verify_image(volume, "vhd-fixed", disk_size)  # the footer, and qemu-img reads it as VHD of this size
        shutil.copyfile(volume, work / "body.raw")
        os.truncate(work / "body.raw", disk_size)
        assert sha256(work / "body.raw") == sha256(reference)
    else:
        assert_image_holds(volume, QEMU_NAMES[fmt], reference)
    if fmt == "vmdk-sparse":  # grains of 64 KiB: only those holding data stored
        run_ok("qemu-img", "check", "-f", "vmdk", volume)
        info = qemu_info(volume, "vmdk")
        assert info["format-specific"]["data"]["create-type"] == "monolithicSparse"  # type: ignore[index]
        assert volume.stat().st_size <= 2 * MiB + present_blocks(LAYOUTS[name], 64 * KiB) * 64 * KiB
    elif fmt == "qcow2":  # every cluster counted once, none leaked; only the clusters holding data stored
        checked = json.loads(run_ok("qemu-img", "check", "--output=json", "-f", "qcow2", volume).stdout)
        assert (checked.get("corruptions", 0), checked.get("leaks", 0)) == (0, 0), checked
        assert checked["allocated-clusters"] == present_blocks(LAYOUTS[name], 64 * KiB)
    elif fmt == "vhdx":  # as compact as a streamed one: the front, then only the blocks holding data
        streamed = work / "streamed.vhdx"
        assert volume.stat().st_size == 4 * MiB + present_blocks(LAYOUTS[name], vhd.VHDX_BLOCK) * vhd.VHDX_BLOCK
        vhd.write_vhdx([reference], streamed)
        assert volume.stat().st_size == streamed.stat().st_size
    elif fmt == "vhd-dynamic":  # each stored block gets a file system block before it for its bitmap
        streamed = work / "streamed.vhd"
        vhd.write_vhd_dynamic([reference], streamed)
        blocks = present_blocks(LAYOUTS[name])
        assert streamed.stat().st_size < volume.stat().st_size <= streamed.stat().st_size + blocks * 4 * KiB + MiB
    else:  # holes stay holes
        data_bytes = sum(len(data) for _, writes in LAYOUTS[name] for _, data in writes)
        assert volume.stat().st_blocks * 512 < data_bytes + 2 * MiB


def test_the_pieces_around_the_volume_are_left_as_they_were(work: Path) -> None:
    pieces, _ = make_pieces(work, LAYOUTS["odd-mib-start"])
    before = [sha256(piece) for piece in (pieces[0], pieces[2])]
    assert in_place.assemble(pieces, 1, "vhdx") is not None
    assert [sha256(piece) for piece in (pieces[0], pieces[2])] == before


@pytest.mark.parametrize(("fmt", "prefix"), [
    ("vhdx", MiB + 512),  # VHDX blocks start on a MiB
    ("raw", 3 * 512),  # raw: on the file system's block
    ("vhd-fixed", 7 * 512),
])
def test_a_volume_off_the_alignment_is_left_untouched(work: Path, fmt: str, prefix: int) -> None:
    pieces, _ = make_pieces(work, [(prefix, [(0, b"head")]), (8 * MiB, [(0, RANDOM.randbytes(MiB))])])
    before = sha256(pieces[1])
    assert in_place.assemble(pieces, 1, fmt) is None
    assert sha256(pieces[1]) == before


def test_a_disk_with_no_whole_block_in_the_volume_is_left_untouched(work: Path) -> None:
    pieces, _ = make_pieces(work, [(MiB, [(0, b"head")]), (MiB // 2, [(0, RANDOM.randbytes(MiB // 4))])])
    before = sha256(pieces[1])
    assert in_place.assemble(pieces, 1, "vhdx") is None
    assert sha256(pieces[1]) == before


@pytest.mark.parametrize("fmt", ["vmdk-stream", "wim"])
def test_other_formats_are_not_done_in_place(work: Path, fmt: str) -> None:
    pieces, _ = make_pieces(work, LAYOUTS["block-aligned"])
    before = sha256(pieces[1])
    assert in_place.assemble(pieces, 1, fmt) is None
    assert sha256(pieces[1]) == before


def test_a_file_system_that_cannot_move_blocks_is_left_untouched(tmp_path: Path) -> None:
    with small_filesystem(tmp_path / "tmpfs", "64m") as folder:
        assert in_place.ranges_supported(folder) == 0
        pieces, _ = make_pieces(folder, LAYOUTS["block-aligned"])
        before = sha256(pieces[1])
        assert in_place.assemble(pieces, 1, "vhdx") is None
        assert sha256(pieces[1]) == before
        assert sorted(p.name for p in folder.iterdir()) == ["piece0.raw", "piece1.raw", "piece2.raw",
                                                              "reference.raw"]  # no probe file left


def test_the_machine_disk_can_move_blocks(work: Path) -> None:
    """The rest of this file relies on it: ext4 (tmp_path here and in CI) inserts and collapses ranges."""
    assert in_place.ranges_supported(work) == os.statvfs(work).f_bsize
    assert list(work.iterdir()) == []  # the probe's scratch file is gone


def test_cancel_while_hashing_is_a_cancel(work: Path) -> None:
    pieces, _ = make_pieces(work, LAYOUTS["odd-mib-start"])
    token = CancelToken()

    def progress(done: int, total: int) -> None:
        if done > 0:
            token.cancel()

    with pytest.raises(TaskCanceled):
        in_place.assemble(pieces, 1, "raw", progress=progress, cancel=token)


def test_a_cancel_inside_a_large_hole_stops_the_hashing_and_changes_nothing(work: Path) -> None:
    """A raw disk of 3 GiB that is mostly one hole: the cancel is seen while its zeros are hashed, and the
    volume is as it was."""
    pieces, _ = make_pieces(work, [(MiB, [(0, b"GPT")]), (3 * 1024 * MiB, [(0, b"NTFS")])])
    stat = pieces[1].stat()
    before = (stat.st_size, stat.st_mtime_ns, stat.st_blocks)  # written to or moved, these would change
    token = CancelToken()
    seen: list[int] = []

    def progress(done: int, total: int) -> None:
        seen.append(done)
        if done >= 512 * MiB:
            token.cancel()

    with pytest.raises(TaskCanceled):
        in_place.assemble(pieces, 1, "raw", progress=progress, cancel=token)
    assert max(seen) < 1536 * MiB  # stopped long before the 3 GiB were hashed
    stat = pieces[1].stat()
    assert (stat.st_size, stat.st_mtime_ns, stat.st_blocks) == before
    with pieces[1].open("rb") as volume:
        assert volume.read(4) == b"NTFS"


def test_a_too_large_vhd_is_refused_before_anything_changes(work: Path) -> None:
    pieces, _ = make_pieces(work, [(MiB, []), (8 * MiB, [(0, b"x")])])
    os.truncate(pieces[1], 2041 * 1024 * MiB)  # sparse: past VHD's 2040 GiB
    with pytest.raises(DiskError, match="at most 2040 GiB"):
        in_place.assemble(pieces, 1, "vhd-fixed")
    assert pieces[1].stat().st_size == 2041 * 1024 * MiB


@pytest.mark.parametrize("fmt", ["vhdx", "raw", "vhd-fixed", "qcow2", "vhd-dynamic", "vmdk-sparse", "vmdk-stream"])
def test_convert_hashed_consumes_the_volume_and_verifies_the_image(work: Path, fmt: str) -> None:
    pieces, reference = make_pieces(work, LAYOUTS["odd-mib-start"])
    out = work / f"disk.{fmt}"
    checksum = disk.convert_hashed(pieces, out, fmt, consume=pieces[1])  # type: ignore[arg-type]
    assert checksum == image_checksum(out)
    assert pieces[1].exists() == (fmt == "vmdk-stream")  # consumed where done in place, else read
    assert sorted(p.name for p in work.iterdir() if p.name.startswith(".")) == []
    if fmt == "vhd-fixed":
        disk.verify_image(out, "vhd-fixed", reference.stat().st_size)
    else:
        assert_image_holds(out, QEMU_NAMES[fmt], reference)


@pytest.mark.parametrize("fmt", ["vhdx", "raw", "vhd-fixed", "qcow2", "vhd-dynamic", "vmdk-sparse", "vmdk-stream"])
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_an_image_beside_a_kept_volume_leaves_it_as_it_was(work: Path, name: str, fmt: str) -> None:
    """``keep``: the image is laid out as in place, in a new file, and the volume is not changed."""
    pieces, reference = make_pieces(work, LAYOUTS[name])
    kept = pieces[VOLUME[name]]
    before = sha256(kept)
    out = work / f"disk.{fmt}"
    checksum = disk.convert_hashed(pieces, out, fmt, keep=kept)  # type: ignore[arg-type]
    assert checksum == image_checksum(out)
    assert sha256(kept) == before
    assert sorted(p.name for p in work.iterdir() if p.name.startswith(".")) == []
    if fmt == "vhd-fixed":
        disk.verify_image(out, "vhd-fixed", reference.stat().st_size)
    else:
        assert_image_holds(out, QEMU_NAMES[fmt], reference)


@pytest.mark.parametrize("fmt", ["vhdx", "raw", "qcow2"])
def test_on_xfs_an_image_beside_a_kept_volume_shares_its_blocks(tmp_path: Path, fmt: str) -> None:
    """Where the file system clones (XFS with reflink), the volume's blocks are not copied into the image:
    the file system's free space hardly changes, however much data the volume holds."""
    with loop_filesystem(tmp_path / "xfs", 400, "xfs") as folder:
        data = RANDOM.randbytes(96 * MiB)
        pieces, reference = make_pieces(folder, [(MiB, [(0, b"table")]), (128 * MiB, [(4 * MiB, data)]),
                                                  (MiB, [(0, b"backup")])])
        reference.unlink()  # not on the measured file system
        os.sync()
        free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
        out = folder / f"disk.{fmt}"
        checksum = disk.convert_hashed(pieces, out, fmt, keep=pieces[1])  # type: ignore[arg-type]
        os.sync()
        used = free - os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
        assert used < 8 * MiB, used
        assert checksum == image_checksum(out)
        with out.open("rb") as image:
            assert data in image.read()  # the volume's bytes are in the image


def _whole_disk(pieces: list[Path], out: Path) -> Path:
    """The pieces concatenated: the raw disk an image of them must read as."""
    with out.open("wb") as whole:
        for piece in pieces:
            with piece.open("rb") as part:
                shutil.copyfileobj(part, whole)
    return out


def _republished(work: Path, fmt: str, layouts: bool) -> tuple[Known, Known]:
    """An image beside a volume, then the volume changed (a block that held nothing now holds data, before
    every other; one that held data is emptied) and an image of it beside it again, told what the first one
    found: its block digests, its layouts when ``layouts``, and which of the volume's ranges changed."""
    chunks = {offset * MiB: RANDOM.randbytes(2 * MiB) for offset in range(4, 156, 8)}
    pieces, reference = make_pieces(work, [(3 * MiB, [(0, b"table")]), (160 * MiB, list(chunks.items())),
                                           (MiB, [(MiB - 512, b"backup")])])
    first = Known()
    checksum = disk.convert_hashed(pieces, work / f"first.{fmt}", fmt, keep=pieces[1], known=first)  # type: ignore[arg-type]
    assert checksum == image_checksum(work / f"first.{fmt}") and first.found and first.reused == 0
    assert_image_holds(work / f"first.{fmt}", QEMU_NAMES[fmt], reference)
    assert (fmt in first.found_layouts) == (fmt in {"vhdx", "vhd-dynamic", "vmdk-sparse"})
    changed = [(MiB, 2 * MiB), (36 * MiB, 38 * MiB)]
    with pieces[1].open("r+b") as volume:
        volume.seek(MiB)
        volume.write(RANDOM.randbytes(MiB))
    fd = os.open(pieces[1], os.O_RDWR)
    try:
        punch = in_place._FALLOC_FL_PUNCH_HOLE | in_place._FALLOC_FL_KEEP_SIZE
        in_place._fallocate(fd, punch, 36 * MiB, 2 * MiB)
    finally:
        os.close(fd)

    def unchanged(begin: int, end: int) -> bool:
        return all(end <= a or b <= begin for a, b in changed)

    second = Known(first.found, unchanged, first.found_layouts if layouts else {})
    out = work / f"second.{fmt}"
    checksum = disk.convert_hashed(pieces, out, fmt, keep=pieces[1], known=second)  # type: ignore[arg-type]
    assert checksum == image_checksum(out)
    assert_image_holds(out, QEMU_NAMES[fmt], _whole_disk(pieces, work / "second.raw"))
    return first, second


@pytest.mark.parametrize("fmt", ["vhdx", "vhd-dynamic", "vmdk-sparse", "raw"])
def test_an_image_beside_a_changed_volume_keeps_its_unchanged_blocks_where_they_were(work: Path, fmt: str) -> None:
    """With the last image's layout, the blocks that still hold the same data lie where they lay, so
    their checksum blocks are not hashed again although a new block came before them; the image is
    still exactly the disk (qemu-img compare) and its checksum that of the file (coreutils)."""
    first, second = _republished(work, fmt, layouts=True)
    assert second.reused >= len(first.found) - 4, (second.reused, len(first.found))


@pytest.mark.parametrize("fmt", ["vhdx", "vmdk-sparse", "qcow2"])
def test_without_the_last_layout_a_new_block_moves_every_block_after_it(work: Path, fmt: str) -> None:
    """Blocks in disk order: the new block before the others moves them all by one block, and their
    checksum blocks have to be hashed again (what the kept layout avoids; qcow2 always lays its clusters
    out in order, its metadata growing with them)."""
    _, without = _republished(work, fmt, layouts=False)
    assert without.reused <= 1, without.reused


def test_an_image_that_fails_verification_leaves_nothing(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pieces, _ = make_pieces(work, LAYOUTS["block-aligned"])

    def broken(image: Path, fmt: str, disk_size: int) -> None:
        raise DiskError(f"{image} did not pass qemu-img check")

    monkeypatch.setattr(disk, "verify_image", broken)
    with pytest.raises(DiskError, match="did not pass"):
        disk.convert_hashed(pieces, work / "disk.vhdx", "vhdx", consume=pieces[1])
    assert not (work / "disk.vhdx").exists()
    assert [p.name for p in work.iterdir() if p.name.endswith(".partial")] == []


@pytest.mark.parametrize("fmt", ["vhdx", "qcow2", "vhd-dynamic", "vmdk-sparse"])
def test_qemu_img_reads_every_block_of_a_larger_volume(work: Path, fmt: str) -> None:
    """Many runs to collapse: a block of data every third block over 600 MiB (two qcow2 L2 tables), the
    volume on an odd MiB as after a GPT's ESP and MSR."""
    data = [(index * 6 * MiB + 1000, hashlib.sha256(bytes([index % 256])).digest() * 64) for index in range(100)]
    pieces, reference = make_pieces(work, [(117 * MiB, [(0, b"GPT"), (MiB, b"ESP")]), (600 * MiB, data),
                                           (MiB, [(MiB - 512, b"tail")])])
    assert in_place.assemble(pieces, 1, fmt) is not None
    assert_image_holds(pieces[1], QEMU_NAMES[fmt], reference)
    if fmt != "vhd-dynamic":  # qemu-img checks VHDX, qcow2 and VMDK, not VHD
        run_ok("qemu-img", "check", "-f", QEMU_NAMES[fmt], pieces[1])


def test_a_qcow2_whose_clusters_need_two_refcount_blocks(work: Path) -> None:
    """A byte in each of 34,000 clusters of 64 KiB: more host clusters than one refcount block counts
    (32,768), so the refcount table holds two blocks, and they count themselves. Sparse on disk."""
    clusters = 34_000
    data = [(number * 64 * KiB + number % 997, bytes([1 + number % 255])) for number in range(clusters)]
    pieces, reference = make_pieces(work, [(MiB, [(0, b"GPT")]), (clusters * 64 * KiB, data)])
    assert in_place.assemble(pieces, 1, "qcow2") is not None
    checked = json.loads(run_ok("qemu-img", "check", "--output=json", "-f", "qcow2", pieces[1]).stdout)
    assert (checked.get("corruptions", 0), checked.get("leaks", 0)) == (0, 0), checked
    assert checked["allocated-clusters"] == clusters + 1
    assert_image_holds(pieces[1], "qcow2", reference)


def test_a_disk_that_fills_up_while_the_image_is_assembled(tmp_path: Path) -> None:
    """On a small real ext4: the volume's blocks move, but the partitions before it (12 MiB of data) no
    longer fit. One clear message; no image and no partial file."""
    with loop_filesystem(tmp_path / "small", 64) as folder:
        prefix, volume = folder / "prefix.raw", folder / "windows.ntfs"
        for path, size, data in ((prefix, 13 * MiB, RANDOM.randbytes(12 * MiB)),
                                 (volume, 16 * MiB, RANDOM.randbytes(12 * MiB))):
            with path.open("wb") as file:
                file.truncate(size)
                file.write(data)
        filler = folder / "filler"
        free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
        with filler.open("wb") as file:
            file.write(bytes(free - 8 * MiB))  # leaves less room than the copied partitions need
        with pytest.raises(DiskError, match=r"Cannot write the disk image in .*No space left on device"):
            disk.convert_hashed([prefix, volume], folder / "disk.vhdx", "vhdx", consume=volume)
        assert sorted(p.name for p in folder.iterdir() if p.name != "lost+found") == ["filler", "prefix.raw",
                                                                                       "windows.ntfs"]


def test_a_full_file_system_is_asked_again_later(tmp_path: Path) -> None:
    """A probe that fails because the disk is full says nothing about the file system: the next one, with
    room, finds it can."""
    with loop_filesystem(tmp_path / "small", 16) as folder:
        filler = folder / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        for step in (MiB, 64 * KiB, 4 * KiB):  # to the last block
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, bytes(step))
        os.fsync(fd)
        os.close(fd)
        assert in_place.ranges_supported(folder) == 0
        filler.unlink()
        assert in_place.ranges_supported(folder) == os.statvfs(folder).f_bsize


@pytest.mark.parametrize("fmt", ["vhdx", "raw", "vhd-fixed", "qcow2", "vhd-dynamic", "vmdk-sparse"])
def test_xfs_moves_file_blocks_too(tmp_path: Path, fmt: str) -> None:
    """The other common Linux file system that can: the same images, read back alike."""
    with loop_filesystem(tmp_path / "xfs", 320, "xfs") as folder:
        assert in_place.ranges_supported(folder) == os.statvfs(folder).f_bsize
        pieces, reference = make_pieces(folder, LAYOUTS["odd-mib-start"])
        checksum = in_place.assemble(pieces, 1, fmt)
        assert checksum == image_checksum(pieces[1])
        if fmt == "vhd-fixed":
            disk.verify_image(pieces[1], "vhd-fixed", reference.stat().st_size)
        else:
            assert_image_holds(pieces[1], QEMU_NAMES[fmt], reference)
