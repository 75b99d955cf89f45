"""How fast a composited NTFS volume becomes a dynamic VHDX, against ``cp`` of the same bytes.
A standalone script, not a test.

    python benchmarks/disk_convert.py [--dir DIR] [--gb 1] [--mb 500] [--runs 3]

Makes a sparse NTFS volume of ``--gb`` GiB (``make_ntfs_volume``, made for its GPT partition's offset)
and copies about ``--mb`` MB of files into it with ``ntfscp`` (half random bytes, half repetitive text).
Then times, side by side and ``--runs`` times each:

* full: :func:`build_gpt_disk` (a sparse raw disk with the volume spliced in) + :func:`convert` to VHDX,
* pieces: :func:`build_gpt_pieces` (``prefix.raw`` + ``suffix.raw`` only) + :func:`convert` of
  prefix + volume + suffix to VHDX (no raw disk is written),
* ``cp --sparse=always`` of the volume (the same bytes, read and written once).

Each timed run is followed by a timed ``sync``; the medians and their ratios are printed without and
with it. ``--drop-caches`` (root only) empties the page cache before each timed action, so that every
side reads the volume from the disk. Without ``--dir`` everything goes to a temporary folder removed at
the end.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app import procs
from app.engine import disk
from app.engine.wim import make_ntfs_volume

MiB = 1024 * 1024
#: Fixed identities, so that the full and the pieces VHDX can be compared byte for byte.
DISK_GUID = uuid.UUID("5f0b8c1e-0000-4000-8000-00000000d15c")
GUIDS: dict[disk.Role, uuid.UUID] = {"esp": uuid.UUID(int=1), "msr": uuid.UUID(int=2), "data": uuid.UUID(int=3)}


def fill(volume: Path, folder: Path, total_mb: int) -> int:
    """Copy about ``total_mb`` MB of files into the volume with ntfscp; returns the byte count."""
    rng = random.Random(2024)
    text = b"".join(f"line {n}: some setting = value {n % 97}\n".encode() for n in range(20_000))
    written, n = 0, 0
    while written < total_mb * 1_000_000:
        size = min(50_000_000, total_mb * 1_000_000 - written)
        data = rng.randbytes(size) if n % 2 else (text * (size // len(text) + 1))[:size]
        source = folder / f"file{n:02d}.bin"
        source.write_bytes(data)
        outcome = procs.run(["ntfscp", str(volume), str(source), f"file{n:02d}.{'dll' if n % 2 else 'txt'}"])
        if not outcome.ok:
            raise SystemExit(f"ntfscp failed: {outcome.stderr}")
        source.unlink()
        written, n = written + size, n + 1
    return written


def timed(action: Callable[[], object], drop_caches: bool) -> tuple[float, float]:
    """Seconds for ``action`` and for the ``sync`` after it."""
    os.sync()
    if drop_caches:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    started = time.perf_counter()
    action()
    done = time.perf_counter()
    os.sync()
    return done - started, time.perf_counter() - done


def allocated(path: Path) -> float:
    return path.stat().st_blocks * 512 / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, help="work folder (default: a temporary folder, removed at the end)")
    parser.add_argument("--gb", type=int, default=1, help="size of the NTFS volume in GiB")
    parser.add_argument("--mb", type=int, default=500, help="MB of file data on it")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--drop-caches", action="store_true", help="empty the page cache before each timed action")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="disk-convert-")) if args.dir is None else args.dir
    work.mkdir(parents=True, exist_ok=True)
    try:
        disk_size = (1 + 100 + 16) * MiB + args.gb * 1024 * MiB + MiB  # before the ESP, ESP, MSR, volume, backup GPT
        layout = disk.gpt_layout(disk_size)
        assert layout.data_size == args.gb * 1024 * MiB
        volume = work / "volume.ntfs"
        volume.unlink(missing_ok=True)
        started = time.perf_counter()
        make_ntfs_volume(volume, layout.data_size, partition_start_sector=layout.data_start_lba)
        data = fill(volume, work, args.mb)
        os.sync()
        print(f"volume: {layout.data_size / MiB:.0f} MiB, {data / 1e6:.0f} MB of files, {allocated(volume):.0f} MB "
              f"allocated, made in {time.perf_counter() - started:.1f} s; disk {disk_size / MiB:.0f} MiB")

        raw, prefix, suffix = work / "disk.raw", work / "prefix.raw", work / "suffix.raw"
        full_out, pieces_out, copy = work / "full.vhdx", work / "pieces.vhdx", work / "copy.ntfs"
        build_s: list[tuple[float, float]] = []
        convert_s: list[tuple[float, float]] = []
        pieces_s: list[tuple[float, float]] = []
        cp_s: list[tuple[float, float]] = []
        for run in range(1, args.runs + 1):
            for path in (raw, prefix, suffix, full_out, pieces_out, copy):
                path.unlink(missing_ok=True)
            os.sync()
            cold = args.drop_caches

            def build() -> None:
                disk.build_gpt_disk(volume, raw, disk_size=disk_size, disk_guid=DISK_GUID, partition_guids=GUIDS)

            build_s.append(timed(build, cold))
            convert_s.append(timed(lambda: disk.convert(raw, full_out, "vhdx"), cold))

            def pieces() -> None:
                disk.build_gpt_pieces(volume, prefix, suffix, disk_size=disk_size, disk_guid=DISK_GUID,
                                      partition_guids=GUIDS)
                disk.convert([prefix, volume, suffix], pieces_out, "vhdx")

            pieces_s.append(timed(pieces, cold))
            cp_s.append(timed(lambda: procs.run(["cp", "--sparse=always", str(volume), str(copy)]), cold))
            print(f"run {run}: full = build {build_s[-1][0]:.2f} s + convert {convert_s[-1][0]:.2f} s "
                  f"(+ sync {build_s[-1][1] + convert_s[-1][1]:.2f} s)   pieces {pieces_s[-1][0]:.2f} s "
                  f"(+ sync {pieces_s[-1][1]:.2f} s)   cp {cp_s[-1][0]:.2f} s (+ sync {cp_s[-1][1]:.2f} s)")

        same = procs.run(["qemu-img", "compare", "-f", "vhdx", "-F", "vhdx", str(full_out), str(pieces_out)])
        print(f"check: qemu-img compare full.vhdx pieces.vhdx: {same.stdout.strip() or same.stderr.strip()}; "
              f"raw disk {allocated(raw):.0f} MB allocated, VHDX {full_out.stat().st_size / 1e6:.0f} MB")
        full_s = [(b[0] + c[0], b[1] + c[1]) for b, c in zip(build_s, convert_s, strict=True)]
        for label, with_sync in (("without sync", False), ("with sync", True)):
            def median(samples: list[tuple[float, float]], with_sync: bool = with_sync) -> float:
                return statistics.median(op + (flush if with_sync else 0.0) for op, flush in samples)

            full, piece, cp = median(full_s), median(pieces_s), median(cp_s)
            print(f"median of {args.runs}, {label}: full {full:.2f} s (build {median(build_s):.2f} + convert "
                  f"{median(convert_s):.2f}), pieces {piece:.2f} s, cp {cp:.2f} s; full / cp = {full / cp:.2f}, "
                  f"pieces / cp = {piece / cp:.2f}, pieces / full = {piece / full:.2f}")
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
