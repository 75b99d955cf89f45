"""Disk images written by LayerDesk itself (app.engine.vhd), checked with qemu-img.

Each layout is a list of pieces, each a size and the data written at offsets in it (the rest is holes).
The same description builds the pieces and, separately, the raw disk they make, which qemu-img compares
with the image. The images are small on disk: the large layouts are sparse.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from app.engine import disk, vhd
from app.engine.disk import DiskError, DiskFormat
from app.tasks.base import CancelToken, TaskCanceled
from tests.support.image_checksum import image_checksum
from tests.support.tools import run_ok, tool

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
RANDOM = random.Random(11)

Piece = tuple[int, list[tuple[int, bytes]]]  # size, data at offsets
Writer = Callable[..., str]

WRITERS: dict[str, tuple[Writer, str]] = {
    "vhdx": (vhd.write_vhdx, "vhdx"),
    "vhd-dynamic": (vhd.write_vhd_dynamic, "vpc"),
    "vhd-fixed": (vhd.write_vhd_fixed, "vpc"),
    "raw": (vhd.write_raw, "raw"),
}

LAYOUTS: dict[str, list[Piece]] = {
    # prefix (GPT-like, dense), a sparse volume with data at odd offsets and across block edges, suffix
    "odd-offsets": [
        (MiB, [(0, RANDOM.randbytes(17 * KiB)), (512 * KiB + 3, RANDOM.randbytes(999))]),
        (24 * MiB, [(7, b"NTFS"), (2 * MiB - 100, RANDOM.randbytes(300)), (9 * MiB + 12345, RANDOM.randbytes(3 * MiB)),
                    (24 * MiB - 1, b"\x01")]),
        (MiB, [(MiB - 16 * KiB, RANDOM.randbytes(16 * KiB))]),
    ],
    # 7 MiB + 3 sectors: the last block is partial; data in its last sector
    "partial-last-block": [
        (7 * MiB + 3 * 512, [(MiB, RANDOM.randbytes(MiB)), (7 * MiB + 1024, RANDOM.randbytes(512))]),
    ],
    # holes only, and a piece of written zeros (data to SEEK_DATA, zeros to a reader)
    "all-zero": [(5 * MiB, []), (3 * MiB, [(0, bytes(3 * MiB))])],
    # 6 GiB + 1 MiB, a little data: past the first VHDX chunk (2048 blocks of 2 MiB = 4 GiB) and at its edge
    "multi-gib-sparse": [
        (MiB, [(0, RANDOM.randbytes(4 * KiB))]),
        (6 * GiB - 2 * MiB, [(4 * GiB - MiB - 512, RANDOM.randbytes(4096)), (5 * GiB + 5, RANDOM.randbytes(70_000))]),
        (MiB, [(MiB - 512, RANDOM.randbytes(512))]),
    ],
}


def make_pieces(folder: Path, layout: list[Piece]) -> tuple[list[Path], Path]:
    """The pieces, and the raw disk they make written separately (sparse)."""
    pieces = []
    reference = folder / "reference.raw"
    with reference.open("wb") as whole:
        whole.truncate(sum(size for size, _ in layout))
        start = 0
        for number, (size, writes) in enumerate(layout):
            piece = folder / f"piece{number}.raw"
            with piece.open("wb") as file:
                file.truncate(size)
                for offset, data in writes:
                    file.seek(offset)
                    file.write(data)
                    whole.seek(start + offset)
                    whole.write(data)
            pieces.append(piece)
            start += size
    return pieces, reference


def qemu_info(image: Path, fmt: str | None = None) -> dict[str, object]:
    info = json.loads(run_ok("qemu-img", "info", "--output=json", *(["-f", fmt] if fmt else []), image).stdout)
    assert isinstance(info, dict)
    return info


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(4 * MiB):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def assert_image_holds(image: Path, fmt: str, reference: Path) -> None:
    size = reference.stat().st_size
    info = qemu_info(image, fmt)
    assert info["format"] == fmt
    assert info["virtual-size"] == size
    if fmt == "vhdx":
        run_ok("qemu-img", "check", "-f", "vhdx", image)
    compared = run_ok("qemu-img", "compare", "-f", "raw", "-F", fmt, reference, image)
    assert "Images are identical" in compared.stdout


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A folder of its own (tmp_path also holds the test's user home)."""
    folder = tmp_path / "disks"
    folder.mkdir()
    return folder


# --- CRC-32C -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("data", "crc"), [
    (bytes(32), 0x8A9136AA),  # RFC 3720 B.4
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
    (bytes.fromhex("01c00000000000000000000000000000140000000000040000000014000000182800000000000000"
                   "0200000000000000"), 0xD9963A56),
    (b"123456789", 0xE3069283),  # the usual check value
    (b"", 0),
])
def test_crc32c_matches_known_vectors(data: bytes, crc: int) -> None:
    assert vhd.crc32c(data) == crc
    assert vhd.crc32c(data[5:], vhd.crc32c(data[:5])) == crc  # continues from a previous CRC


# --- the writers ----------------------------------------------------------------------------------------


#: Every writer on every layout, except the flat formats (raw, fixed VHD) on the 6 GiB sparse layout: they
#: would hash 6 GiB of holes twice, and the other layouts cover them.
CASES = [(name, layout) for layout in LAYOUTS for name in WRITERS
         if not (layout == "multi-gib-sparse" and name in {"raw", "vhd-fixed"})]


@pytest.mark.parametrize(("name", "layout"), CASES)
def test_image_reads_back_as_the_pieces(work: Path, name: str, layout: str) -> None:
    writer, fmt = WRITERS[name]
    pieces, reference = make_pieces(work, LAYOUTS[layout])
    out = work / f"disk.{name}"
    reports: list[tuple[int, int]] = []

    checksum = writer(pieces, out, progress=lambda done, total: reports.append((done, total)))

    assert checksum == image_checksum(out)
    assert_image_holds(out, fmt, reference)
    assert sorted(p.name for p in work.iterdir()) == sorted([*(p.name for p in pieces), reference.name, out.name])
    assert reports[-1] == (reference.stat().st_size, reference.stat().st_size)
    assert [done for done, _ in reports] == sorted(done for done, _ in reports)
    if name in {"vhdx", "vhd-dynamic"}:  # holes cost nothing: the image holds the touched blocks only
        touched = {(sum(size for size, _ in LAYOUTS[layout][:n]) + offset + k) // (2 * MiB)
                   for n, (_, writes) in enumerate(LAYOUTS[layout]) for offset, data in writes
                   for k in (0, len(data) - 1)}
        assert out.stat().st_size < (len(touched) + 4) * 2 * MiB + 4 * MiB


def test_dynamic_vhd_is_probed_as_vpc_with_2mib_blocks_and_a_fixed_one_only_when_named(work: Path) -> None:
    pieces, _ = make_pieces(work, LAYOUTS["partial-last-block"])
    vhd.write_vhd_dynamic(pieces, work / "dynamic.vhd")
    vhd.write_vhd_fixed(pieces, work / "fixed.vhd")

    dynamic = qemu_info(work / "dynamic.vhd")
    assert (dynamic["format"], dynamic["cluster-size"]) == ("vpc", 2 * MiB)
    assert qemu_info(work / "fixed.vhd")["format"] == "raw"  # qemu probes a fixed VHD as raw
    fixed = qemu_info(work / "fixed.vhd", "vpc")
    assert fixed["format"] == "vpc"
    assert "cluster-size" not in fixed
    assert fixed["virtual-size"] == 7 * MiB + 3 * 512


def test_vhd_footers_carry_the_exact_size_and_valid_checksums(work: Path) -> None:
    pieces, reference = make_pieces(work, LAYOUTS["odd-offsets"])
    size = reference.stat().st_size
    vhd.write_vhd_dynamic(pieces, work / "dynamic.vhd")
    vhd.write_vhd_fixed(pieces, work / "fixed.vhd")
    for image in (work / "dynamic.vhd", work / "fixed.vhd"):
        data = image.read_bytes()
        footer = data[-512:]
        assert footer[:8] == b"conectix"
        assert footer[28:32] == b"win "  # readers that choose by creator take the footer's size
        assert struct.unpack(">QQ", footer[40:56]) == (size, size)
        checksum = struct.unpack(">I", footer[64:68])[0]
        assert checksum == ~sum(footer[:64] + bytes(4) + footer[68:]) & 0xFFFFFFFF
        cylinders, heads, sectors = struct.unpack(">HBB", footer[56:60])
        assert cylinders * heads * sectors * 512 <= size
    dynamic = (work / "dynamic.vhd").read_bytes()
    assert dynamic[:512] == dynamic[-512:]
    assert dynamic[512:520] == b"cxsparse"


def test_vhdx_leaves_holes_out_as_zero_blocks(work: Path) -> None:
    pieces, _ = make_pieces(work, LAYOUTS["all-zero"])
    out = work / "zero.vhdx"
    vhd.write_vhdx(pieces, out, block_size=2 * MiB)
    # the second piece is written zeros: read as data, so its two blocks are stored; the holes are not
    # (qemu-img map reports every VHDX block as data, so the BAT at 3 MiB is read here)
    with out.open("rb") as file:
        file.seek(3 * MiB)
        bat = struct.unpack("<4Q", file.read(32))
    assert [entry & 7 for entry in bat] == [2, 2, 6, 6]  # PAYLOAD_BLOCK_ZERO, FULLY_PRESENT
    assert [entry >> 20 for entry in bat[2:]] == [4, 6]  # in MiB, right after the 1 MiB BAT
    assert out.stat().st_size == 4 * MiB + 4 * MiB  # headers, log, metadata, BAT; two blocks


@pytest.mark.parametrize("name", ["vhdx", "vhd-dynamic"])
def test_skip_zero_blocks_leaves_out_written_zeros_too(work: Path, name: str) -> None:
    writer, fmt = WRITERS[name]
    pieces, reference = make_pieces(work, LAYOUTS["all-zero"])
    writer(pieces, work / "kept.img")
    checksum = writer(pieces, work / "skipped.img", skip_zero_blocks=True)
    assert checksum == image_checksum(work / "skipped.img")
    assert_image_holds(work / "skipped.img", fmt, reference)
    # the blocks of written zeros (MiB 5 to 8) are gone, and nothing else: three of VHDX's 1 MiB blocks, two
    # of VHD's 2 MiB blocks with their sector bitmaps
    written_zeros = 3 * vhd.VHDX_BLOCK if name == "vhdx" else 2 * (2 * MiB + 512)
    assert (work / "kept.img").stat().st_size - (work / "skipped.img").stat().st_size == written_zeros


def test_vhdx_block_size_is_checked(work: Path) -> None:
    pieces, _ = make_pieces(work, LAYOUTS["partial-last-block"])
    with pytest.raises(DiskError, match="power of two"):
        vhd.write_vhdx(pieces, work / "bad.vhdx", block_size=3 * MiB)
    vhd.write_vhdx(pieces, work / "big.vhdx", block_size=32 * MiB)
    run_ok("qemu-img", "check", "-f", "vhdx", work / "big.vhdx")
    assert qemu_info(work / "big.vhdx")["cluster-size"] == 32 * MiB


def test_vhd_needs_whole_sectors_but_raw_does_not(work: Path) -> None:
    pieces, reference = make_pieces(work, [(MiB + 100, [(MiB, b"tail")])])
    for writer in (vhd.write_vhdx, vhd.write_vhd_dynamic, vhd.write_vhd_fixed):
        with pytest.raises(DiskError, match="512-byte sectors"):
            writer(pieces, work / "odd.img")
    assert vhd.write_raw(pieces, work / "odd.raw") == image_checksum(reference)
    assert sorted(p.name for p in work.iterdir()) == ["odd.raw", "piece0.raw", "reference.raw"]


@pytest.mark.parametrize("name", list(WRITERS))
def test_cancel_leaves_no_file(work: Path, name: str) -> None:
    pieces, _ = make_pieces(work, LAYOUTS["odd-offsets"])
    token = CancelToken()

    def progress(done: int, total: int) -> None:
        if done > 0:
            token.cancel()

    with pytest.raises(TaskCanceled):
        WRITERS[name][0](pieces, work / "out.img", progress=progress, cancel=token)
    assert not [p.name for p in work.iterdir() if not p.name.startswith(("piece", "reference"))]


def test_a_missing_piece_is_a_disk_error(work: Path) -> None:
    pieces, _ = make_pieces(work, LAYOUTS["odd-offsets"])
    pieces[1].unlink()
    with pytest.raises(DiskError, match=r"piece1\.raw does not exist"):
        vhd.write_vhdx(pieces, work / "out.vhdx")
    with pytest.raises(DiskError, match=r"piece1\.raw does not exist"):
        disk.convert_hashed(pieces, work / "out.vhdx", "vhdx")
    assert not (work / "out.vhdx").exists()


@pytest.mark.parametrize("name", ["vhdx", "raw"])
def test_a_piece_cut_short_while_writing_is_a_disk_error(work: Path, name: str) -> None:
    pieces, _ = make_pieces(work, LAYOUTS["odd-offsets"])

    def progress(done: int, total: int) -> None:
        os.truncate(pieces[1], MiB)

    with pytest.raises(DiskError, match=r"piece1\.raw (ended early|changed while)"):
        WRITERS[name][0](pieces, work / "out.img", progress=progress)
    assert not [p.name for p in work.iterdir() if not p.name.startswith(("piece", "reference"))]


def test_the_image_may_not_overwrite_a_piece(work: Path) -> None:
    pieces, _ = make_pieces(work, LAYOUTS["partial-last-block"])
    with pytest.raises(DiskError, match="one of the raw disk pieces"):
        vhd.write_raw(pieces, pieces[0])


# --- convert_hashed -------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["vhdx", "vhd-dynamic", "vhd-fixed", "raw", "qcow2"])
def test_convert_hashed_returns_the_checksum_of_a_verified_image(work: Path, fmt: DiskFormat) -> None:
    pieces, reference = make_pieces(work, LAYOUTS["odd-offsets"])
    out = work / "disk.img"
    reports: list[tuple[int, int]] = []

    checksum = disk.convert_hashed(pieces, out, fmt, progress=lambda done, total: reports.append((done, total)))

    assert checksum == image_checksum(out)
    qemu_fmt = {"vhd-dynamic": "vpc", "vhd-fixed": "vpc"}.get(fmt, fmt)
    assert_image_holds(out, qemu_fmt, reference)
    disk.verify_image(out, fmt, reference.stat().st_size)
    assert reports[-1] == (reference.stat().st_size,) * 2
    assert not [p.name for p in work.iterdir() if p.name.endswith(".partial")]


def test_convert_hashed_cancel_leaves_nothing(work: Path) -> None:
    pieces, _ = make_pieces(work, LAYOUTS["odd-offsets"])
    token = CancelToken()
    token.cancel()
    for fmt in ("vhdx", "qcow2"):
        with pytest.raises(TaskCanceled):
            disk.convert_hashed(pieces, work / "disk.img", fmt, cancel=token)
    assert not [p.name for p in work.iterdir() if not p.name.startswith(("piece", "reference"))]


def test_qemu_img_is_there() -> None:
    assert tool("qemu-img")
