"""How fast the regf reader and writer handle a big real hive. A standalone script, not a test.

    python benchmarks/hive_speed.py [--hive NAME] [--runs N] [--baseline-runs N]

Decompresses a real hive from ``../shared/testdata/hives`` (default: the 15 MB SYSTEM hive of Windows 10
1709, 43k keys and 90k values) into a temporary folder, then times (median of N runs):

* read  - ``read_hive``: every key, class name, security descriptor and value into the in-memory model;
* write - ``write_hive``: serialize the whole model and write it (temporary file, fsync, rename);

against the baseline, regipy's full walk of the same file (every subkey with its values, as
``RegistryHive.recurse_subkeys`` gives them), run side by side, and prints the ratios. ``hivexml`` (libhivex,
C), when installed, is timed too as a second point of reference.
"""

from __future__ import annotations

import argparse
import logging
import lzma
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.engine.registry.regf import read_hive, write_hive

HIVES = Path(__file__).resolve().parents[1].parent / "shared" / "testdata" / "hives"
T = TypeVar("T")


def timed(action: Callable[[], T], runs: int) -> tuple[float, T]:
    times = []
    for _ in range(max(runs, 1)):
        started = time.perf_counter()
        result = action()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def regipy_walk(path: Path) -> tuple[int, int]:
    from regipy.registry import RegistryHive

    keys = values = 0
    for subkey in RegistryHive(str(path)).recurse_subkeys(as_json=False):
        keys += 1
        values += len(subkey.values)
    return keys, values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hive", default="SYSTEM_WIN_10_1709", help="a hive under ../shared/testdata/hives")
    parser.add_argument("--runs", type=int, default=5, help="runs of our reader and writer (median)")
    parser.add_argument("--baseline-runs", type=int, default=1, help="runs of regipy's walk (it takes minutes)")
    args = parser.parse_args()
    logging.getLogger("regipy").setLevel(logging.CRITICAL)

    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / args.hive
        source.write_bytes(lzma.decompress((HIVES / f"{args.hive}.xz").read_bytes()))
        target = Path(folder) / "written"
        print(f"hive: {args.hive}, {source.stat().st_size / 1e6:.1f} MB")

        # SYSTEM_WIN_10_1709 is dirty and its logs were not kept: read the primary file as it is
        read_s, hive = timed(lambda: read_hive(source, allow_dirty=True), args.runs)
        keys = list(hive.root.walk())
        counted = (len(keys), sum(len(k.values) for _, k in keys))
        write_s, _ = timed(lambda: write_hive(hive, target), args.runs)
        print(f"ours     read  {read_s:7.2f} s   ({counted[0]} keys, {counted[1]} values)")
        print(f"ours     write {write_s:7.2f} s   ({target.stat().st_size / 1e6:.1f} MB written)")

        if shutil.which("hivexml"):
            hivexml_s, _ = timed(lambda: subprocess.run(["hivexml", str(source)], capture_output=True, check=True),
                                 args.runs)
            print(f"hivexml  dump  {hivexml_s:7.2f} s   (libhivex, C, whole hive to XML)")

        regipy_s, regipy_counted = timed(lambda: regipy_walk(source), args.baseline_runs)
        print(f"regipy   walk  {regipy_s:7.2f} s   ({regipy_counted[0]} keys, {regipy_counted[1]} values; "
              "it skips values of type 0x200000)")
        print(f"ratio: regipy walk / our read = {regipy_s / read_s:.0f}x, "
              f"regipy walk / our read + write = {regipy_s / (read_s + write_s):.0f}x")


if __name__ == "__main__":
    main()
