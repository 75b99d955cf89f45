"""Publishing a layered image end to end, against ``cp -a`` of the same layer folders (issue 3, "Proof").
A standalone script, not a test.

    python benchmarks/publish.py [--full] [--dir DIR] [--apps N] [--runs N] [--drop-caches] [--hive-keys N]
                                 [--xfs GB]

Generates an OS layer folder (default ~300 MB / ~4,000 files; ``--full``: ~1.6 GB / ~20,000 files) with
SOFTWARE and SYSTEM hives (small, or of Windows' size with ``--hive-keys 250000``), and ``--apps`` app
layers (default 10 of 5–20 MB; ``--full``: 10 of 50–200 MB) whose paths overlap: every app layer holds some
files at the same shared paths and some at OS-layer paths, each with its own content, plus a ``.reg`` file.
Half the files are random bytes, half repetitive text. The layers are imported through the real services
(``ImportService`` via a ``TaskRunner``, the capture in a child process) into a fresh LayerDesk home, a VHDX
template is made of them, and then:

(a) cold publish (``PublishingService.publish``, wall time from submit to the task's end, the layer disk
    cache emptied first) and ``cp -a --reflink=never`` (a copy of the bytes, also where the file system
    could clone them)
    of the OS folder then every app folder into one fresh target folder, alternated, ``--runs`` times
    each (median; 3, or 5 with ``--full``); each followed by a timed ``sync``; then warm publishes (every
    app layer's volume in the layer disk cache, no composite kept: every layer applied). With
    ``--drop-caches`` (root) the page cache is dropped before each cold publish and each ``cp -a``, so
    both read their inputs from the disk, and warm
    publishes are compared with warm ``cp -a`` runs too (their sources read just before). Without it,
    whatever the machine kept cached decides: a machine that evicts idle pages (DAMON reclaim) makes
    ``cp -a`` read its sources from the disk in some runs and not in others;
(b) re-publish after one change: the first app layer gets a new version with 5 % of its bytes changed,
    the template is updated to it and published, ``--runs`` times; median ÷ the cold median. Where the
    file system clones blocks (``--xfs``), each re-publish starts from the last composite
    (:mod:`app.engine.composite`); elsewhere it applies every layer;
(c) repository bytes of that app layer (its WIM and manifests) after ten 5 %-changed versions on top of
    the first ÷ after the first;
(d) peak memory: the parent's and its children's ``ru_maxrss``, each phase's largest child process
    (``VmHWM`` sampled from ``/proc``) and the most its processes held at one time (``VmRSS`` summed: a
    publish merges the registry in a process of its own);
(e) floors, no LayerDesk code involved: wimlib's own ``wimlib-imagex apply`` of the OS layer's repository
    WIM onto an empty NTFS volume ÷ ``cp -a`` of the OS layer's folder (each + ``sync``, the page cache
    dropped before each with ``--drop-caches``); and, for scale, writing a new file of a published image's
    bytes (a clone where the file system can clone blocks) plus the SHA-256 of the whole file ÷ the cold
    publish: what a re-publish paid here while an image's checksum was the SHA-256 of the whole file (it is
    made of 4 MiB block digests now, :mod:`app.engine.checksum`, and a re-publish hashes the changed blocks).

The publish tasks' per-step timings (from the worker's log line) are printed as medians. Without
``--dir`` everything goes to a temporary folder removed at the end. ``--xfs GB`` (root) makes a sparse
file of that size in the work folder, formats it XFS (reflink on) and runs everything, ``cp -a`` included,
on it, loop-mounted with direct I/O; it is removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("PYTHON_KEYRING_BACKEND", "keyring.backends.null.Keyring")  # never the user's keyring
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.catalog.models import DiskFormat, LayerType, PrincipalKind, Role, TaskState
from app.engine.registry.model import Hive, RegistryKey, ValueType
from app.engine.registry.regf import write_hive
from app.paths import Home
from app.services import Services, open_catalog
from app.services.rbac import Caller
from app.services.templates import TemplateSpec
from app.tasks.runner import TaskRunner

MB = 1_000_000
GiB = 1 << 30
TEMPLATE = "Bench"
CHANGE = 0.05
TEXT = b"".join(f"line {n}: some setting = value {n % 97}\n".encode() for n in range(20_000))


# --- generated layers ---------------------------------------------------------------------------------


def _content(rng: random.Random, size: int, text: bool, variant: int = 0) -> bytes:
    if not text:
        return rng.randbytes(size)
    head = f"variant {variant} {rng.random()}\n".encode()
    return (head + TEXT * (size // len(TEXT) + 1))[:size]


def _sizes(rng: random.Random, files: int, total_mb: float) -> list[int]:
    weights = [rng.paretovariate(1.2) for _ in range(files)]
    scale = total_mb * MB / sum(weights)
    return [max(1, min(int(w * scale), 40 * MB)) for w in weights]


def _sz(text: str) -> bytes:
    return (text + "\0").encode("utf-16-le")


def fill_hive(hive: Hive, keys: int, rng: random.Random) -> None:
    """``keys`` keys of the shapes Windows' hives are made of: class registrations, components and services,
    each with a few string, DWORD and binary values."""
    for n in range(keys):
        area = ("Classes\\CLSID", "Microsoft\\Windows\\CurrentVersion\\Component Based Servicing\\Packages",
                "Microsoft\\Windows\\CurrentVersion\\Installer\\UserData")[n % 3]
        key = hive.ensure(f"{area}\\{{{rng.getrandbits(128):032X}}}\\Item{n % 4}")
        key.set_value("", ValueType.SZ, _sz(f"Component {n}"))
        key.set_value("InprocServer32", ValueType.EXPAND_SZ, _sz(f"%SystemRoot%\\System32\\comp{n}.dll"))
        key.set_value("Flags", ValueType.DWORD, (n % 8).to_bytes(4, "little"))
        key.set_value("Data", ValueType.BINARY, rng.randbytes(64))


def generate_os(root: Path, total_mb: float, files: int, hive_keys: int) -> tuple[list[str], int]:
    """The OS layer folder; returns its file paths and byte count. Its SOFTWARE hive gets ``hive_keys`` keys
    (a Windows 11 SOFTWARE hive has some 300,000 keys and 80–100 MB) and SYSTEM a fifth of them."""
    rng = random.Random(2024)
    paths, written = [], 0
    for n, size in enumerate(_sizes(rng, files, total_mb)):
        top = ("Windows/System32", "Windows/SysWOW64", "Windows/WinSxS", "Program Files", "ProgramData")[n % 5]
        rel = f"{top}/Dir{n % 53}/sub{n % 7}/file{n:05d}.{'dll' if n % 2 else 'txt'}"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(_content(rng, size, text=n % 2 == 0))
        paths.append(rel)
        written += size
    config = root / "Windows/System32/config"
    config.mkdir(parents=True, exist_ok=True)
    software = Hive(RegistryKey("ROOT"), file_name="\\SystemRoot\\System32\\Config\\SOFTWARE")
    software.ensure("Microsoft\\Windows NT\\CurrentVersion").set_value("ProductName", ValueType.SZ,
                                                                        _sz("Windows 11 Pro"))
    software.ensure("Shared").set_value("Owner", ValueType.SZ, _sz("OS"))
    fill_hive(software, hive_keys, rng)
    write_hive(software, config / "SOFTWARE")
    system = Hive(RegistryKey("ROOT"), file_name="\\SystemRoot\\System32\\Config\\SYSTEM")
    for name in ("Current", "Default"):
        system.ensure("Select").set_value(name, ValueType.DWORD, (1).to_bytes(4, "little"))
    system.ensure("ControlSet001\\Control\\Session Manager\\Environment").set_value(
        "Path", ValueType.EXPAND_SZ, _sz("%SystemRoot%\\system32;%SystemRoot%"))
    fill_hive(system, hive_keys // 5, rng)
    write_hive(system, config / "SYSTEM")
    written += (config / "SOFTWARE").stat().st_size + (config / "SYSTEM").stat().st_size
    return paths, written


@dataclass
class AppLayer:
    name: str
    folder: Path
    reg: Path
    files: dict[str, bool] = field(default_factory=dict)  # path → text content
    bytes: int = 0


def generate_app(root: Path, number: int, total_mb: float, os_paths: list[str]) -> AppLayer:
    """App layer ``number``: 80 % of its files its own, 10 % at paths every app layer shares, 10 % at OS
    paths (the same ones for every app layer); every file with this layer's own content."""
    rng = random.Random(1000 + number)
    name = f"App{number:02d}"
    layer = AppLayer(name, root / name, root / f"{name}.reg")
    files = max(40, int(total_mb * 8))
    for n, size in enumerate(_sizes(rng, files, total_mb)):
        if n % 10 == 1:  # the same names in every app layer, never twice in one
            rel = f"Program Files/Common Files/Shared/lib{n:05d}.dll"
        elif n % 10 == 2:
            rel = os_paths[(n // 10 * 7) % len(os_paths)]
        else:
            rel = f"Program Files/{name}/Dir{n % 11}/file{n:05d}.{'dll' if n % 2 else 'dat'}"
        text = n % 2 == 0
        (layer.folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (layer.folder / rel).write_bytes(_content(rng, size, text))
        layer.files[rel] = text
        layer.bytes += size
    assert layer.bytes == sum((layer.folder / rel).stat().st_size for rel in layer.files)  # no path written twice
    layer.reg.write_text(
        "Windows Registry Editor Version 5.00\r\n\r\n"
        f"[HKEY_LOCAL_MACHINE\\SOFTWARE\\Vendor\\{name}]\r\n"
        '"Version"="1.0"\r\n'
        f'"InstallDir"="C:\\\\Program Files\\\\{name}"\r\n\r\n'
        "[HKEY_LOCAL_MACHINE\\SOFTWARE\\Shared]\r\n"
        f'"Owner"="{name}"\r\n\r\n', encoding="utf-16")
    return layer


def change_app(layer: AppLayer, version: int) -> tuple[int, int, int]:
    """Rewrite files (same size, new content) in random order until 5 % of the layer's bytes changed, skipping
    files that would overshoot; returns (files, bytes, bytes of random content) changed.

    Each kind of content changes by 5 % of its own bytes: 5 % of the random bytes and 5 % of the text bytes.
    Drawn from all files at once, a few large files decide the mix, and it swings from version to version
    (in one run 71 % of the changed bytes were random, against 50 % of the layer). New random bytes cannot be
    compressed or deduplicated by any store: they bound (c) from below."""
    rng = random.Random(version * 7919)
    order = sorted(layer.files)
    rng.shuffle(order)
    sizes = {rel: (layer.folder / rel).stat().st_size for rel in order}
    changed, count, random_bytes = 0, 0, 0
    for text in (False, True):
        kind = [rel for rel in order if layer.files[rel] is text]
        budget, done = sum(sizes[rel] for rel in kind) * CHANGE, 0
        for rel in kind:
            if done + sizes[rel] > budget:
                continue
            (layer.folder / rel).write_bytes(_content(rng, sizes[rel], text, variant=version))
            done += sizes[rel]
            count += 1
            if done > budget * 0.98:
                break
        changed += done
        random_bytes += 0 if text else done
    return count, changed, random_bytes


# --- measuring ----------------------------------------------------------------------------------------


class MemorySampler:
    """Largest ``VmHWM`` of any descendant process seen during each phase, and the largest sum of the
    descendants' ``VmRSS`` at one time (a publish runs its registry merge in a process of its own), sampled
    every 0.1 s."""

    def __init__(self) -> None:
        self.phase = "setup"
        self.peaks: dict[str, tuple[int, str]] = {}
        self.together: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.wait(0.1):
            parents: dict[int, int] = {}
            for entry in Path("/proc").iterdir():
                if entry.name.isdigit():
                    try:
                        stat = (entry / "stat").read_text()
                        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
                    except (OSError, ValueError, IndexError):
                        continue
            resident = 0
            for pid in parents:
                ancestor = parents.get(pid)
                while ancestor and ancestor != me:
                    ancestor = parents.get(ancestor)
                if ancestor != me:
                    continue
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:60]
                except OSError:
                    continue
                for line in status.splitlines():
                    if line.startswith("VmHWM:"):
                        kb = int(line.split()[1])
                        if kb > self.peaks.get(self.phase, (0, ""))[0]:
                            self.peaks[self.phase] = (kb, cmdline.strip())
                    elif line.startswith("VmRSS:"):
                        resident += int(line.split()[1])
            self.together[self.phase] = max(self.together.get(self.phase, 0), resident)


def drop_caches() -> bool:
    """Write back, then drop the page cache (root only): the next run reads its inputs from the disk."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1")
    except OSError:
        return False
    return True


def sync_time() -> float:
    started = time.perf_counter()
    os.sync()
    return time.perf_counter() - started


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@dataclass
class Bench:
    services: Services
    runner: TaskRunner
    out: Path

    def wait(self, task_id: int, what: str) -> dict[str, Any]:
        state = self.runner.wait(task_id, 3600)
        info = self.services.tasks.get_task(task_id)
        if state is not TaskState.COMPLETE:
            raise SystemExit(f"{what} ended {state.name}: {info.error}")
        return info.result or {}

    def import_version(self, name: str, version: str, folder: Path, reg: Path | None) -> tuple[float, dict[str, Any]]:
        started = time.perf_counter()
        task_id = self.services.imports.start_import(self.runner, name, version, folder,
                                                     registry_files=[reg] if reg else [])
        result = self.wait(task_id, f"import of {name}:{version}")
        return time.perf_counter() - started, result

    def publish(self, keep: Callable[[Path], None] | None = None) -> tuple[float, float, dict[str, float], float]:
        """(wall seconds, the worker's own seconds, per-step timings, seconds of a ``sync`` right after it);
        the image and its record are removed after the sync (removed first, its pages would never be
        written). ``keep`` is given the image's path before it is removed."""
        started = time.perf_counter()
        task_id = self.services.publishing.publish(self.runner, TEMPLATE, self.out)
        result = self.wait(task_id, "publish")
        wall = time.perf_counter() - started
        if keep is not None:
            keep(Path(str(result["path"])))
        steps: dict[str, float] = {}
        for line in self.services.tasks.log(task_id):
            if "steps: " in line.text:
                for part in line.text.split("steps: ", 1)[1].rstrip(".").split(", "):
                    key, value, _ = part.split(" ")
                    steps[key] = float(value)
        synced = sync_time()
        self.services.publishing.delete_image_record(str(result["image"]))
        Path(str(result["path"])).unlink()
        return wall, float(result.get("seconds", 0.0)), steps, synced


def copy_layers(sources: list[Path], target: Path) -> None:
    target.mkdir()
    for source in sources:
        # --reflink=never: coreutils 9 clones files where the file system can, which copies no bytes at all
        subprocess.run(["cp", "-a", "--reflink=never", f"{source}/.", str(target)], check=True)


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


@contextmanager
def phase(sampler: MemorySampler, name: str) -> Iterator[None]:
    sampler.phase = name
    yield
    sampler.phase = "between"


def image_floor(image: Path, work: Path) -> tuple[float, float, str]:
    """Seconds to write a new file of ``image``'s bytes, seconds of their SHA-256 (what a publish recorded
    before block checksums) and how the file was made. The image is read into the page cache first (a
    re-publish has most of its bytes in memory); the file is a clone where the file system can clone blocks
    (``cp --reflink=always``), else an in-kernel copy (``copy_file_range``, every byte written)."""
    copy = work / f"floor-copy{image.suffix}"
    copy.unlink(missing_ok=True)
    with image.open("rb") as file:  # read to its end, into the page cache
        while file.read(8 << 20):
            continue
    how = "clone"
    started = time.perf_counter()
    if subprocess.run(["cp", "--reflink=always", str(image), str(copy)], capture_output=True).returncode != 0:
        how = "copy"
        copy.unlink(missing_ok=True)
        started = time.perf_counter()
        shutil.copyfile(image, copy)
    written = time.perf_counter() - started

    def sha256() -> None:
        digest = hashlib.sha256()
        with copy.open("rb") as file:
            while chunk := file.read(8 << 20):
                digest.update(chunk)

    hashed = timed(sha256)
    copy.unlink()
    return written, hashed, how


def apply_floor(wim: Path, os_folder: Path, volume_bytes: int, work: Path, runs: int,
                drop: bool) -> tuple[list[float], list[float]]:
    """wimlib's own ``wimlib-imagex apply`` of the OS layer's repository WIM onto an empty NTFS volume, against
    ``cp -a`` of the OS layer's folder, alternated, each + ``sync`` (page cache dropped first with ``drop``):
    the engine's own floor, no LayerDesk code involved."""
    volume, target = work / "floor.ntfs", work / "floor-cp"
    applied: list[float] = []
    copied: list[float] = []
    for _ in range(runs):
        volume.unlink(missing_ok=True)
        with volume.open("wb") as file:
            file.truncate(volume_bytes)
        subprocess.run(["mkntfs", "-F", "-q", "-f", str(volume)], check=True, capture_output=True)
        if drop:
            drop_caches()
        applied.append(timed(lambda: subprocess.run(["wimlib-imagex", "apply", str(wim), "1", str(volume)],
                                                    check=True, capture_output=True)) + sync_time())
        volume.unlink()
        shutil.rmtree(target, ignore_errors=True)
        if drop:
            drop_caches()
        copied.append(timed(lambda: subprocess.run(["cp", "-a", "--reflink=never", str(os_folder), str(target)],
                                                   check=True))
                      + sync_time())
        shutil.rmtree(target)
    return applied, copied


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="the issue's sizes: OS ~1.6 GB / 20k files, apps 50–200 MB")
    parser.add_argument("--dir", type=Path, help="work folder (default: a temporary folder, removed at the end)")
    parser.add_argument("--apps", type=int, default=10)
    parser.add_argument("--runs", type=int, help="runs of each measurement (default 3, with --full 5)")
    parser.add_argument("--os-mb", type=float, help="OS layer size in MB (default 300, with --full 1600)")
    parser.add_argument("--os-files", type=int, help="OS layer file count (default 4000, with --full 20000)")
    parser.add_argument("--hive-keys", type=int, default=0,
                        help="keys in the OS layer's SOFTWARE hive (SYSTEM gets a fifth); 0: a few (default)")
    parser.add_argument("--drop-caches", action="store_true",
                        help="(a): drop the page cache before each cold publish and each cp -a, so both read their "
                             "inputs from the disk (needs root); warm publishes then compare with warm cp -a runs")
    parser.add_argument("--xfs", type=int, metavar="GB",
                        help="run on an XFS file system (block cloning) of GB GiB in a loop-mounted file (root)")
    args = parser.parse_args()
    runs = args.runs or (5 if args.full else 3)
    os_mb = args.os_mb or (1600 if args.full else 300)
    os_files = args.os_files or (20_000 if args.full else 4000)
    app_low, app_high = (50, 200) if args.full else (5, 20)

    top = Path(tempfile.mkdtemp(prefix="publish-bench-")) if args.dir is None else args.dir
    top.mkdir(parents=True, exist_ok=True)
    runners: list[TaskRunner] = []
    with contextlib.ExitStack() as held:
        work = held.enter_context(xfs_mounted(top, args.xfs)) if args.xfs else top
        os.environ["HOME"] = str(work / "userhome")  # keep the benchmark's LayerDesk state out of the real home
        try:
            with MemorySampler() as sampler:
                run(args, work, runs, os_mb, os_files, app_low, app_high, sampler, runners.append)
        finally:
            for runner in runners:
                runner.shutdown()
    if args.dir is None:
        shutil.rmtree(top, ignore_errors=True)


@contextmanager
def xfs_mounted(top: Path, size_gb: int) -> Iterator[Path]:
    """An XFS file system (reflink on) of ``size_gb`` GiB, in a sparse file in ``top``, mounted on ``top/xfs``."""
    image, mount = top / "xfs.img", top / "xfs"
    with image.open("wb") as file:
        file.truncate(size_gb * GiB)
    subprocess.run(["mkfs.xfs", "-q", "-f", "-m", "reflink=1", str(image)], check=True)
    mount.mkdir(exist_ok=True)
    # direct I/O: a plain loop device keeps every block twice in the page cache and reads a file that is not
    # cached at a third of the disk's speed (a 2.9 GB volume: 5.5 s instead of 2.4-3.8 s)
    device = subprocess.run(["losetup", "--find", "--show", "--direct-io=on", str(image)], check=True,
                            capture_output=True, text=True).stdout.strip()
    try:
        subprocess.run(["mount", device, str(mount)], check=True)
        try:
            yield mount
        finally:
            # lazily: the catalog's connections (and the task runner's last children) may still hold files
            subprocess.run(["umount", "-l", str(mount)], check=False)
    finally:
        subprocess.run(["losetup", "-d", device], check=False)
        image.unlink(missing_ok=True)


def run(args: argparse.Namespace, work: Path, runs: int, os_mb: float, os_files: int, app_low: int, app_high: int,
        sampler: MemorySampler, keep_runner: Callable[[TaskRunner], None]) -> None:
    sources = work / "sources"
    shutil.rmtree(sources, ignore_errors=True)
    started = time.perf_counter()
    os_folder = sources / "Win11"
    os_paths, os_bytes = generate_os(os_folder, os_mb, os_files, args.hive_keys)
    apps = [generate_app(sources, k, app_low + (app_high - app_low) * k / max(1, args.apps - 1), os_paths)
            for k in range(args.apps)]
    total = os_bytes + sum(a.bytes for a in apps)
    all_files = len(os_paths) + 2 + sum(len(a.files) for a in apps)
    os.sync()
    low, high = min(a.bytes for a in apps) / MB, max(a.bytes for a in apps) / MB
    print(f"generated in {time.perf_counter() - started:.0f} s: OS layer {os_bytes / MB:.0f} MB / {len(os_paths) + 2} "
          f"files, {len(apps)} app layers {low:.0f}–{high:.0f} MB "
          f"({sum(len(a.files) for a in apps)} files); {total / MB:.0f} MB / {all_files} files in all", flush=True)

    home = Home(work / "layerdesk")
    shutil.rmtree(home.root, ignore_errors=True)
    home.ensure()
    catalog, secrets = open_catalog(home)
    services = Services.for_caller(home, catalog, Caller("bench", frozenset({Role.ADMINISTRATOR}),
                                                        PrincipalKind.LOCAL_USER), secrets)
    services.imports.repository.ensure()
    runner = TaskRunner(catalog, services.caller, poll_s=0.05)
    keep_runner(runner)
    out = work / "published"
    out.mkdir(exist_ok=True)
    bench = Bench(services, runner, out)

    # --- imports ---
    with phase(sampler, "import"):
        services.layers.create_layer("Win11", LayerType.OS)
        seconds, _ = bench.import_version("Win11", "1", os_folder, None)
        import_s = [seconds]
        for app in apps:
            services.layers.create_layer(app.name, LayerType.APP, os_layer="Win11")
            seconds, result = bench.import_version(app.name, "1", app.folder, app.reg)
            import_s.append(seconds)
            if app is apps[0]:
                first_wim = int(result["wim_bytes"])
    repo_bytes = dir_bytes(home.repository)
    print(f"imported {len(import_s)} layers in {sum(import_s):.1f} s (OS {import_s[0]:.1f} s, "
          f"{total / MB / sum(import_s):.0f} MB/s); repository {repo_bytes / MB:.0f} MB "
          f"({repo_bytes / total:.2f} of the layer bytes)", flush=True)
    size_gb = int(total * 1.6 / GiB) + 2
    spec = TemplateSpec(os="Win11:1", apps=tuple(f"{a.name}:1" for a in apps), disk_format=DiskFormat.VHDX,
                        size_gb=size_gb)
    services.templates.create_template(TEMPLATE, spec)

    # --- (a) cold publish against cp -a, alternated ---
    target = work / "cp-target"
    cold: list[tuple[float, float]] = []
    worker_s: list[float] = []
    cp: list[tuple[float, float]] = []
    cold_steps: list[dict[str, float]] = []
    folders = [os_folder] + [a.folder for a in apps]
    for number in range(1, runs + 1):
        shutil.rmtree(target, ignore_errors=True)
        os.sync()
        order = ("publish", "cp") if number % 2 else ("cp", "publish")
        for what in order:
            if args.drop_caches and not drop_caches():
                raise SystemExit("--drop-caches: cannot write /proc/sys/vm/drop_caches (run as root)")
            if what == "publish":
                shutil.rmtree(home.layer_cache, ignore_errors=True)  # cold: every layer staged from its WIM
                with phase(sampler, "publish"):
                    wall, inner, steps, synced = bench.publish()
                cold.append((wall, synced))
                worker_s.append(inner)
                cold_steps.append(steps)
            else:
                with phase(sampler, "cp"):
                    cp.append((timed(lambda: copy_layers(folders, target)), sync_time()))
        print(f"run {number}: publish {cold[-1][0]:.2f} s + sync {cold[-1][1]:.2f} s (worker {worker_s[-1]:.2f} s)   "
              f"cp -a {cp[-1][0]:.2f} s + sync {cp[-1][1]:.2f} s", flush=True)
    copied = dir_bytes(target)
    shutil.rmtree(target, ignore_errors=True)
    # warm cp -a: its sources read just before (only with --drop-caches; otherwise the runs above are the baseline)
    cp_warm: list[float] = []
    for _ in range(runs if args.drop_caches else 0):
        shutil.rmtree(target, ignore_errors=True)
        os.sync()
        for folder in folders:
            for path in folder.rglob("*"):
                if path.is_file():
                    path.read_bytes()
        with phase(sampler, "cp"):
            cp_warm.append(timed(lambda: copy_layers(folders, target)))
        print(f"warm cp -a {cp_warm[-1]:.2f} s", flush=True)
    shutil.rmtree(target, ignore_errors=True)
    # warm: the layer disk cache holds every app layer's volume (the last cold publish filled it)
    warm: list[float] = []
    warm_steps: list[dict[str, float]] = []
    for number in range(1, runs + 1):
        shutil.rmtree(home.layer_cache / "composites", ignore_errors=True)  # every layer applied
        with phase(sampler, "publish"):
            wall, _, steps, _ = bench.publish()
        warm.append(wall)
        warm_steps.append(steps)
        print(f"warm run {number}: publish {wall:.2f} s", flush=True)

    # --- (b) re-publish after one app layer changed, (c) ten changed versions ---
    first = apps[0]
    layer_id = services.layers.get_layer(first.name).layer.id
    manifests = services.imports.repository.layers / str(layer_id)

    def layer_bytes() -> int:
        wim = services.imports.repository.wim_path(layer_id).stat().st_size
        return wim + (dir_bytes(manifests) if manifests.is_dir() else 0)

    one_version = layer_bytes()
    republish: list[float] = []
    republish_steps: list[dict[str, float]] = []
    sizes = [one_version]
    changed_bytes: list[int] = []
    random_changed: list[int] = []
    for version in range(2, 12):
        n_files, n_bytes, n_random = change_app(first, version)
        changed_bytes.append(n_bytes)
        random_changed.append(n_random)
        with phase(sampler, "import"):
            seconds, _ = bench.import_version(first.name, str(version), first.folder, first.reg)
        sizes.append(layer_bytes())
        line = (f"{first.name}:{version}: {n_files} files / {n_bytes / MB:.1f} MB changed "
                f"({n_bytes / first.bytes:.1%} of its bytes), import {seconds:.1f} s, layer now "
                f"{sizes[-1] / MB:.1f} MB ({sizes[-1] / one_version:.2f}× one version)")
        if version <= runs + 1:
            apps_now = tuple(f"{a.name}:{version if a is first else 1}" for a in apps)
            services.templates.update_template(TEMPLATE, TemplateSpec(
                os="Win11:1", apps=apps_now, disk_format=DiskFormat.VHDX, size_gb=size_gb))
            with phase(sampler, "publish"):
                wall, _, steps, _ = bench.publish()
            republish.append(wall)
            republish_steps.append(steps)
            line += f"; re-publish {wall:.2f} s"
        print(line, flush=True)

    # --- floors: what wimlib, the file system and SHA-256 cost here whatever the engine does ---
    kept: list[Path] = []

    def keep(image: Path) -> None:
        kept.append(work / f"floor-image{image.suffix}")
        os.link(image, kept[-1])

    bench.publish(keep=keep)
    image_copy_s, image_sha_s, image_how = image_floor(kept[0], work)
    kept[0].unlink()
    os_wim = services.imports.repository.wim_path(services.layers.get_layer("Win11").layer.id)
    wimapply_s, cp_os_s = apply_floor(os_wim, os_folder, size_gb * GiB, work, min(runs, 3), args.drop_caches)

    # --- the table ---
    cold_median = median([op for op, _ in cold])
    cold_sync_median = median([op + flush for op, flush in cold])
    cp_median = median([op for op, _ in cp])
    cp_sync_median = median([op + flush for op, flush in cp])
    re_median = median(republish)
    parent_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print()
    print(f"layers: {total / MB:.0f} MB / {all_files} files ({len(apps)} app layers); cp -a target "
          f"{copied / MB:.0f} MB; VHDX template {size_gb} GB; median of {runs}"
          f"{'; page cache dropped before each cold publish and cp -a' if args.drop_caches else ''}")
    rows = [
        ("(a) cold publish ÷ cp -a", f"{cold_median:.2f} s ÷ {cp_median:.2f} s", cold_median / cp_median, "≤ 1.05"),
        ("(a) same, each + sync", f"{cold_sync_median:.2f} s ÷ {cp_sync_median:.2f} s",
         cold_sync_median / cp_sync_median, "≤ 1.05"),
        ("(a) warm (layer disk cache) ÷ cp -a", f"{median(warm):.2f} s ÷ {cp_median:.2f} s",
         median(warm) / cp_median, "≤ 1.05"),
        *([("(a) warm ÷ warm cp -a", f"{median(warm):.2f} s ÷ {median(cp_warm):.2f} s",
            median(warm) / median(cp_warm), "≤ 1.05")] if cp_warm else []),
        ("(b) re-publish after 1 change ÷ cold" + (" (from the last composite)" if all(
            "composite" in steps for steps in republish_steps) else ""), f"{re_median:.2f} s ÷ {cold_median:.2f} s",
         re_median / cold_median, "≤ 0.25"),
        ("(c) layer bytes, 1 + 10 versions ÷ 1", f"{sizes[-1] / MB:.1f} MB ÷ {one_version / MB:.1f} MB",
         sizes[-1] / one_version, "≤ 1.6"),
        ("(c) same, 10 versions ÷ 1", f"{sizes[-2] / MB:.1f} MB ÷ {one_version / MB:.1f} MB",
         sizes[-2] / one_version, "≤ 1.6"),
        ("(c) floor: + new random bytes, 1 + 10", f"{(one_version + sum(random_changed)) / MB:.1f} MB ÷ "
         f"{one_version / MB:.1f} MB", (one_version + sum(random_changed)) / one_version, "(any store)"),
        ("(c) above the floor ÷ 1", f"{(sizes[-1] - one_version - sum(random_changed)) / MB:.1f} MB ÷ "
         f"{one_version / MB:.1f} MB", (sizes[-1] - one_version - sum(random_changed)) / one_version,
         "(versions' metadata, text)"),
    ]
    rows += [
        ("(a) floor: wimapply of the OS alone ÷ cp", f"{median(wimapply_s):.2f} s ÷ {median(cp_os_s):.2f} s",
         median(wimapply_s) / median(cp_os_s), "(each + sync)"),
        ("(b) for scale: new file + whole SHA-256", f"{image_copy_s + image_sha_s:.2f} s ÷ {cold_median:.2f} s",
         (image_copy_s + image_sha_s) / cold_median,
         f"({image_how} {image_copy_s:.2f} s, SHA-256 {image_sha_s:.2f} s: not paid, block checksums)"),
    ]
    print(f"{'measure':40} {'measured':28} {'ratio':>7}  goal")
    for label, measured, ratio, goal in rows:
        print(f"{label:40} {measured:28} {ratio:7.2f}  {goal}")
    print(f"(c) changed per version: {median([float(b) for b in changed_bytes]) / MB:.1f} MB median "
          f"({median([float(b) for b in changed_bytes]) / first.bytes:.1%} of {first.bytes / MB:.1f} MB); the "
          f"layer's first WIM {first_wim / MB:.1f} MB")
    print(f"(d) peak memory: parent {parent_kb / 1024:.0f} MiB, children (ru_maxrss) {children_kb / 1024:.0f} MiB")
    for name, (kb, command) in sorted(sampler.peaks.items()):
        if name != "between":
            print(f"    largest {name} process: {kb / 1024:.0f} MiB ({command}); its processes at one time: "
                  f"{sampler.together.get(name, 0) / 1024:.0f} MiB")
    step_names = sorted({k for s in cold_steps + warm_steps + republish_steps for k in s},
                        key=lambda k: -median([s.get(k, 0.0) for s in cold_steps]))
    print(f"publish steps (median s): {'step':10} {'cold':>7} {'warm':>7} {'re-publish':>11}")
    for key in step_names:
        print(f"{'':26}{key:10} {median([s.get(key, 0.0) for s in cold_steps]):7.2f} "
              f"{median([s.get(key, 0.0) for s in warm_steps]):7.2f} "
              f"{median([s.get(key, 0.0) for s in republish_steps]):11.2f}")
    print(f"{'':26}{'(worker)':10} {median(worker_s):7.2f}")


if __name__ == "__main__":
    main()
