"""Merging layers' registry changes into an OS hive of Windows' size: patching the file where it changes
(what a publish does) against reading the whole hive and writing it anew. A standalone script, not a test.

    python benchmarks/hive_merge.py [--keys N] [--changes N] [--runs N]

Generates a SOFTWARE hive of ``--keys`` keys (default 140,000: an 82 MB file, the size of a Windows 11
SOFTWARE hive) shaped as ``benchmarks/publish.py`` shapes it, and a registry delta like ten app layers' of
``--changes`` operations in all: values set in new keys, values replaced and deleted in existing keys, a
key deleted. Then each way runs ``--runs`` times (median), alternated, each in a child process of its own so
its peak memory (``VmHWM``) is its own:

* whole - ``read_hive``, apply the delta, ``write_hive`` (temporary file, fsync, rename);
* patch - ``open_hive``, apply the delta, ``PatchedHive.write`` (the same).

Prints both, patch ÷ whole, and checks that both files hold the same tree.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from publish import fill_hive

from app.engine.registry.delta import DeleteKey, DeleteValue, Operation, RegistryDelta, SetValue
from app.engine.registry.model import Hive, RegistryKey, ValueType
from app.engine.registry.patch import open_hive
from app.engine.registry.regf import read_hive, write_hive

HIVE = "SOFTWARE"


def delta_for(hive: Hive, changes: int, rng: random.Random) -> RegistryDelta:
    """About half the operations set values in the layers' own new keys; the rest replace or delete values
    of existing keys all over the hive, and one deletes a whole existing key."""
    existing = [(path, key) for path, key in hive.root.walk() if key.values]
    ops: list[Operation] = []
    for n in range(changes - 1):
        layer = n % 10
        if n % 2 == 0:
            ops.append(SetValue(HIVE, f"Vendor{layer}\\App{layer}\\Settings\\Group{n % 40}", f"Value{n}",
                                ValueType.SZ, f"setting {n}\0".encode("utf-16-le")))
            continue
        path, key = rng.choice(existing)
        if n % 5 == 1:
            ops.append(DeleteValue(HIVE, path, rng.choice(list(key.values.values())).name))
        else:
            ops.append(SetValue(HIVE, path, "Flags", ValueType.DWORD, (n % 8).to_bytes(4, "little")))
    ops.append(DeleteKey(HIVE, rng.choice(existing)[0]))
    return RegistryDelta(ops)


def child(way: str, source: Path, delta_file: Path, target: Path) -> None:
    delta = RegistryDelta.from_json(delta_file.read_bytes())
    started = time.perf_counter()
    if way == "whole":
        hive: Hive = read_hive(source)
        delta.apply({HIVE: hive})
        write_hive(hive, target)
    else:
        patched = open_hive(source)
        delta.apply({HIVE: patched})
        patched.write(target)
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "peak_mib": peak_mib()}))


def peak_mib() -> float:
    """This process's peak resident memory: ``VmHWM`` (``ru_maxrss`` would count the parent's pages a fork
    held before the exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=140_000, help="keys of the generated hive")
    parser.add_argument("--changes", type=int, default=3_000, help="registry operations of the delta")
    parser.add_argument("--runs", type=int, default=5, help="runs of each way (median)")
    parser.add_argument("--child", nargs=4, metavar=("WAY", "HIVE", "DELTA", "TARGET"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], *map(Path, args.child[1:]))
        return

    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        rng = random.Random(2024)
        hive = Hive(RegistryKey("ROOT"), file_name="\\SystemRoot\\System32\\Config\\SOFTWARE")
        fill_hive(hive, args.keys, rng)
        source = work / "SOFTWARE"
        write_hive(hive, source)
        delta = delta_for(hive, args.changes, rng)
        (work / "delta.json").write_text(delta.to_json())
        print(f"hive: {args.keys} keys, {source.stat().st_size / 1e6:.1f} MB; delta: {len(delta)} operations")
        del hive

        results: dict[str, list[dict[str, float]]] = {"whole": [], "patch": []}
        for _ in range(args.runs):
            for way in results:
                done = subprocess.run([sys.executable, __file__, "--child", way, str(source),
                                       str(work / "delta.json"), str(work / way)],
                                      capture_output=True, text=True, check=True)
                results[way].append(json.loads(done.stdout))
        same = read_hive(work / "whole") == read_hive(work / "patch")
        median = {way: statistics.median(r["seconds"] for r in runs) for way, runs in results.items()}
        peak = {way: max(r["peak_mib"] for r in runs) for way, runs in results.items()}
        for way in results:
            print(f"{way:6} {median[way]:6.2f} s   peak {peak[way]:6.0f} MiB   "
                  f"{(work / way).stat().st_size / 1e6:.1f} MB written")
        print(f"patch ÷ whole: {median['patch'] / median['whole']:.2f} (time), "
              f"{peak['patch'] / peak['whole']:.2f} (peak memory); same tree: {'yes' if same else 'NO'}")
        if not same:
            raise SystemExit("the two ways gave different trees")


if __name__ == "__main__":
    main()
