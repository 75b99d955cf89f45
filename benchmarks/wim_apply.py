"""How fast the engine applies an image onto an NTFS volume image, against ``cp -a`` of the same files.
A standalone script, not a test.

    python benchmarks/wim_apply.py [--dir DIR] [--mb 300] [--files 3000] [--runs 3]

Generates ``--files`` files (about ``--mb`` MB in all, in nested folders; half random bytes, half
repetitive text, like programs next to their data), captures them into a WIM (XPRESS), then times, side
by side and ``--runs`` times each: applying the WIM's image onto a freshly made, empty NTFS volume image
(``Wim.extract_image_to_ntfs_volume``) and ``cp -a`` of the folder into a fresh folder. Each timed run
is followed by a timed ``sync``: the medians and their ratio are printed without and with it (with it,
neither side leaves its writing to the page cache). Making the empty volume (mkntfs) is timed
separately. Without ``--dir`` everything goes to a temporary folder removed at the end.
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
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app import procs
from app.engine.wim import Wim, library_version, make_ntfs_volume


def generate(root: Path, total_mb: int, files: int) -> int:
    """Write ``files`` files of varied sizes adding up to about ``total_mb`` MB; returns the byte count."""
    rng = random.Random(2024)
    weights = [rng.paretovariate(1.2) for _ in range(files)]
    scale = total_mb * 1_000_000 / sum(weights)
    text = b"".join(f"line {n}: some setting = value {n % 97}\n".encode() for n in range(20_000))
    written = 0
    for n, weight in enumerate(weights):
        size = max(1, min(int(weight * scale), 40_000_000))
        folder = root / f"Program Files/Vendor{n % 7}/App{n % 41}/sub{n % 5}"
        folder.mkdir(parents=True, exist_ok=True)
        data = rng.randbytes(size) if n % 2 else (text * (size // len(text) + 1))[:size]
        (folder / f"file{n:05d}.{'dll' if n % 2 else 'txt'}").write_bytes(data)
        written += size
    return written


def copy_tree(source: Path, target: Path) -> None:
    outcome = procs.run(["cp", "-a", str(source), str(target)])
    if not outcome.ok:
        raise SystemExit(f"cp -a failed: {outcome.stderr}")


def timed(action: Callable[[], object]) -> tuple[float, float]:
    """Seconds for ``action`` and for the ``sync`` after it."""
    started = time.perf_counter()
    action()
    done = time.perf_counter()
    os.sync()
    return done - started, time.perf_counter() - done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, help="work folder (default: a temporary folder, removed at the end)")
    parser.add_argument("--mb", type=int, default=300)
    parser.add_argument("--files", type=int, default=3000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="wim-apply-")) if args.dir is None else args.dir
    work.mkdir(parents=True, exist_ok=True)
    try:
        source = work / "source"
        shutil.rmtree(source, ignore_errors=True)
        started = time.perf_counter()
        size = generate(source, args.mb, args.files)
        os.sync()
        print(f"wimlib {library_version()}; {args.files} files, {size / 1e6:.0f} MB generated in "
              f"{time.perf_counter() - started:.1f} s")

        wim_file = work / "layer.wim"
        wim_file.unlink(missing_ok=True)
        with Wim.create("xpress") as w:

            def capture() -> None:
                w.add_image_from_folder(source, "bench")
                w.write(wim_file)

            capture_s = sum(timed(capture))
        print(f"capture to WIM (XPRESS): {capture_s:.2f} s, {wim_file.stat().st_size / 1e6:.0f} MB")

        volume, copy = work / "volume.ntfs", work / "copy"
        volume_size = (size * 13 // 10 // (1 << 20) + 64) << 20
        apply_s: list[tuple[float, float]] = []
        cp_s: list[tuple[float, float]] = []
        mkntfs_s: list[float] = []
        with Wim.open(wim_file) as w:
            for run in range(1, args.runs + 1):
                volume.unlink(missing_ok=True)
                shutil.rmtree(copy, ignore_errors=True)
                os.sync()
                mkntfs_s.append(sum(timed(lambda: make_ntfs_volume(volume, volume_size, label="Bench"))))
                apply_s.append(timed(lambda: w.extract_image_to_ntfs_volume(1, volume)))
                cp_s.append(timed(lambda: copy_tree(source, copy)))
                print(f"run {run}: apply to NTFS volume {apply_s[-1][0]:.2f} s + sync {apply_s[-1][1]:.2f} s   "
                      f"cp -a {cp_s[-1][0]:.2f} s + sync {cp_s[-1][1]:.2f} s   (mkntfs {mkntfs_s[-1]:.2f} s)")
        listed = procs.run(["ntfsls", "-R", str(volume)]).stdout.splitlines()
        on_volume = sum(1 for line in listed if line.startswith("file"))
        print(f"check: ntfsls lists {on_volume} of {args.files} files on the last applied volume")
        print(f"mkntfs median {statistics.median(mkntfs_s):.2f} s")
        for label, with_sync in (("without sync", False), ("with sync", True)):
            apply_median = statistics.median(op + (flush if with_sync else 0.0) for op, flush in apply_s)
            cp_median = statistics.median(op + (flush if with_sync else 0.0) for op, flush in cp_s)
            print(f"median of {args.runs}, {label}: apply {apply_median:.2f} s "
                  f"({size / 1e6 / apply_median:.0f} MB/s), cp -a {cp_median:.2f} s "
                  f"({size / 1e6 / cp_median:.0f} MB/s); apply / cp -a = {apply_median / cp_median:.2f}")
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
