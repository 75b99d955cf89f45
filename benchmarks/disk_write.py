"""How fast LayerDesk writes a disk image itself, against ``qemu-img convert`` followed by a separate SHA-256
of its output (what publishing did before). A standalone script, not a test.

    python benchmarks/disk_write.py [--dir DIR] [--gb 1.5] [--data 0.5] [--runs 6]

Makes the pieces of a disk: ``prefix.raw`` (1 MiB, a partition table's worth of data), a sparse volume of
``--gb`` GiB about ``--data`` of which is data (random extents from 4 KiB to 16 MiB; one in twenty written
as zeros, as a volume holds zero-filled files and preallocated areas) and ``suffix.raw`` (1 MiB). Then,
side by side and ``--runs`` times each (median; the order changes from run to run, as on this machine the
run right after another is often slower), for VHDX, dynamic VHD, qcow2 and monolithicSparse VMDK:

* in place: :func:`app.engine.in_place.assemble` turns a copy of the volume into the image (checksum
  included); the copy is made (and synced) before the clock starts, as publishing's volume is there
  already;
* ours (VHDX and VHD): :func:`app.engine.vhd.write_vhdx` / :func:`~app.engine.vhd.write_vhd_dynamic`
  (checksum included),
* ours, skip zeros: the same with ``skip_zero_blocks=True`` (a first read of the data finds blocks of zeros),
* qemu: ``qemu-img convert`` with the options :func:`app.engine.disk.convert` uses, then SHA-256 of the image
  (read back in 4 MiB pieces, as compose did).

Neither side waits for the image to reach the disk (qemu-img's fdatasync calls took about 1 ms in all for
a 0.9 GB image here; ours leaves it to the page cache). The page cache is warm for every side (the pieces
were just written), and everything is synced before each timed run. Without ``--dir`` everything goes to
a temporary folder removed at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.engine import in_place, vhd

MiB = 1024 * 1024
GiB = 1024 * MiB
QEMU = {"vhdx": ["-O", "vhdx", "-o", "subformat=dynamic,block_size=2M"],
        "vhd-dynamic": ["-O", "vpc", "-o", "subformat=dynamic,force_size=on"],
        "qcow2": ["-O", "qcow2"],
        "vmdk-sparse": ["-O", "vmdk", "-o", "subformat=monolithicSparse"]}
OURS: dict[str, Callable[..., str]] = {"vhdx": vhd.write_vhdx, "vhd-dynamic": vhd.write_vhd_dynamic}


def make_pieces(folder: Path, size: int, share: float) -> tuple[list[Path], int]:
    """prefix.raw, volume.raw, suffix.raw; returns them and the bytes of data written."""
    rng = random.Random(2024)
    noise = rng.randbytes(64 * MiB)
    prefix, volume, suffix = folder / "prefix.raw", folder / "volume.raw", folder / "suffix.raw"
    prefix.write_bytes(noise[:64 * 1024] + bytes(MiB - 64 * 1024))
    suffix.write_bytes(bytes(MiB - 32 * 512) + noise[:32 * 512])
    written = 0
    with volume.open("wb") as file:
        file.truncate(size)
        position = 0
        while position < size:
            length = min(rng.choice([4096, 64 * 1024, MiB, 4 * MiB, 16 * MiB]), size - position)
            if rng.random() < share:
                start = rng.randrange(0, len(noise) - length + 1)
                file.seek(position)
                file.write(bytes(length) if rng.random() < 0.05 else noise[start : start + length])
                written += length
            position += length
    return [prefix, volume, suffix], written


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(4 * MiB):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def qemu_then_hash(fmt: str, pieces: list[Path], out: Path) -> str:
    subprocess.run(["qemu-img", "convert", "-f", "raw", *map(str, pieces), *QEMU[fmt], str(out)], check=True)
    return sha256(out)


def in_place_from_copy(fmt: str, pieces: list[Path], out: Path) -> Callable[[], str]:
    """Copy the volume (sparse) beside it, untimed; the returned action assembles the image in that copy."""
    copy = pieces[1].with_name("volume-copy.raw")
    copy.unlink(missing_ok=True)
    subprocess.run(["cp", "--sparse=always", str(pieces[1]), str(copy)], check=True)

    def action() -> str:
        checksum = in_place.assemble([pieces[0], copy, pieces[2]], 1, fmt)
        assert checksum is not None, "this file system cannot move file blocks"
        copy.replace(out)
        return checksum
    return action


def timed(action: Callable[[], str], out: Path, prepare: Callable[[], Callable[[], str]] | None = None,
          ) -> tuple[float, int]:
    """Seconds for ``action`` (or the action ``prepare`` returns, untimed), which writes ``out`` and returns
    its checksum (checked afterwards). The previous image is removed and everything synced first, so no
    side pays for another's writeback."""
    out.unlink(missing_ok=True)
    if prepare is not None:
        action = prepare()
    os.sync()
    started = time.perf_counter()
    checksum = action()
    seconds = time.perf_counter() - started
    assert checksum == sha256(out), "the returned checksum is not the image's"
    return seconds, out.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path)
    parser.add_argument("--gb", type=float, default=1.5)
    parser.add_argument("--data", type=float, default=0.5)
    parser.add_argument("--runs", type=int, default=6)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as scratch:
        folder = Path(scratch)
        pieces, written = make_pieces(folder, int(args.gb * GiB) // MiB * MiB, args.data)
        disk_size = sum(p.stat().st_size for p in pieces)
        print(f"disk {disk_size / 1e9:.2f} GB, {written / 1e9:.2f} GB of data written ({written / disk_size:.0%})")
        for fmt in ("vhdx", "vhd-dynamic", "qcow2", "vmdk-sparse"):
            out = folder / f"disk.{fmt}"
            sides: dict[str, Callable[[], str]] = {
                "in place": lambda: "",  # prepared for each run: see below
                "qemu-img + sha256": lambda fmt=fmt, out=out: qemu_then_hash(fmt, pieces, out),  # type: ignore[misc]
            }
            if fmt in OURS:
                sides["ours"] = lambda fmt=fmt, out=out: OURS[fmt](pieces, out)  # type: ignore[misc]
                sides["ours, skip zeros"] = lambda fmt=fmt, out=out: OURS[fmt](pieces, out, skip_zero_blocks=True)  # type: ignore[misc]
            times: dict[str, list[float]] = {name: [] for name in sides}
            sizes: dict[str, int] = {}
            orders = list(itertools.permutations(sides))
            for run in range(args.runs):  # the order changes from run to run: each side follows each other one
                for name in orders[run % len(orders)]:
                    prepare = (lambda fmt=fmt, out=out: in_place_from_copy(fmt, pieces, out)) if name == "in place" \
                        else None
                    seconds, sizes[name] = timed(sides[name], out, prepare)
                    times[name].append(seconds)
            base = statistics.median(times["qemu-img + sha256"])
            print(f"\n{fmt}:")
            for name, values in times.items():
                median = statistics.median(values)
                print(f"  {name:18} median {median:6.2f} s  (runs {', '.join(f'{v:.2f}' for v in values)})  "
                      f"image {sizes[name] / 1e9:.3f} GB  ÷ qemu-img+sha256 {median / base:.2f}")


if __name__ == "__main__":
    main()
