r"""Writing the Elastic Layer repository to an SMB share at scale (issue 5, "Proof"). A standalone script,
not a test.

    python benchmarks/elastic_sync.py [--users N] [--groups N] [--layers N] [--mb N] [--runs N] [--dir DIR]

Starts the test Samba AD DC on 127.0.0.1 (``tests/support/samba_dc.py``: its golden copy, provisioned
on first use; needs root and the Samba packages) and writes to its ``[layers]`` share as the domain's
Administrator. A fresh catalog is seeded with fast bulk inserts (SQLAlchemy core ``insert()`` inside
one ``catalog.write()``, no per-row service calls): ``--layers`` app layers (default 500) with one
deployable version each, ``--users`` users (default 10,000) with two direct assignments each,
``--groups`` groups (default 2,000) with five assignments each, and machine associations for every
tenth group. SIDs are made up but well formed. Then, median of ``--runs`` (default 3):

(1) **JSON files**: the time to build and write ``Layers.json``, ``ElasticLayerAssignment.json`` and
    ``MachineAssociations.json`` to the share with LayerDesk's own code: ``ElasticService.sync_plan``
    (the catalog read), each version's entry from the local layer disk cache (``cached_disk``; the cache
    is filled beforehand with small stand-in disks, as an earlier sync leaves it), the documents
    (``ElasticRepository.documents``) and three atomic replaces (``ShareSession.write_atomic``), in one
    signed-in session. Goal: ≤ 2 s. For context, a whole ``sync_repository`` run whose disks are all on
    the share already (the JSON files removed first, so they are written) is timed too;
(2) **upload throughput**: a ``--mb`` MB layer disk (default 1,000 MB, ~1 GB: random blocks repeated)
    uploaded with ``ShareSession.upload`` ÷ Samba's own ``smbclient put`` of the same file to the same
    share (its credentials in an authentication file, mode 0600, removed afterwards), run alternately;
    the ratio of each pair is shown too, as a measure of how much the machine's load moved the numbers.
    Goal: ≥ 0.8.
    Without Samba's ``smbclient`` program only LayerDesk's throughput is shown.

Everything (catalog, cache, generated disk, the DC's copy and the files on the share) goes to a
temporary folder removed at the end, and the DC is stopped.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

os.environ.setdefault("PYTHON_KEYRING_BACKEND", "keyring.backends.null.Keyring")  # never the user's keyring
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import insert

from app.catalog.database import Catalog
from app.catalog.models import (
    ElasticAssignment,
    Layer,
    LayerType,
    LayerVersion,
    MachineAssociation,
    PrincipalKind,
    Role,
    VersionState,
)
from app.elastic.repository import FILES, ElasticRepository, LayerEntry, disk_path
from app.elastic.sync import (
    CHUNK,
    IN_FLIGHT_LIMIT,
    WRITE_SIZE,
    ShareSession,
    SyncPlan,
    cached_disk,
    parse_share,
    sync_repository,
)
from app.engine.repository import LayerRepository
from app.paths import Home
from app.services import Services, open_catalog
from app.services.elastic import ElasticService
from app.services.rbac import Caller
from tests.support import samba_dc

MB = 1_000_000
SHARE = rf"\\127.0.0.1\{samba_dc.LAYERS_SHARE}"
ACCOUNT = f"Administrator@{samba_dc.DNS_DOMAIN}"
DOMAIN_SID = "S-1-5-21-2718281828-3141592653-1414213562"
USER_RID, GROUP_RID = 100_000, 500_000
DIRECT_PER_USER, PER_GROUP = 2, 5
JSON_GOAL_S, RATIO_GOAL = 2.0, 0.8
STAND_IN_DISK = 64 * 1024
UPLOAD_NAME = "bench-upload.vhdx"
BY = "bench"


# --- the catalog ------------------------------------------------------------------------------------


def seed(catalog: Catalog, users: int, groups: int, layers: int) -> dict[str, int]:
    """Bulk-insert the layers, their versions, the assignments and the machine associations."""
    t0 = datetime(2024, 1, 1, tzinfo=UTC)
    layer_rows: list[dict[str, Any]] = [{
        "id": 1, "name": "Win11-23H2", "type": LayerType.OS, "description": "OS layer", "icon": None,
        "os_layer_id": None, "created_at": t0, "created_by": BY,
    }]
    version_rows: list[dict[str, Any]] = [{
        "id": 1, "layer_id": 1, "name": "1.0", "state": VersionState.DEPLOYABLE, "state_reason": "",
        "size_bytes": 20 << 30, "checksum": f"sha256:{1:064x}", "comment": "", "created_at": t0, "created_by": BY,
    }]
    apps: list[tuple[int, int]] = []  # (layer id, version id)
    for number in range(layers):
        layer_id = version_id = number + 2
        layer_rows.append({
            "id": layer_id, "name": f"App-{number:04d}", "type": LayerType.APP, "description": "app layer",
            "icon": None, "os_layer_id": 1, "created_at": t0 + timedelta(minutes=layer_id), "created_by": BY,
        })
        version_rows.append({
            "id": version_id, "layer_id": layer_id, "name": f"{1 + number % 7}.{number % 10}",
            "state": VersionState.DEPLOYABLE, "state_reason": "", "size_bytes": (1 + number % 50) << 20,
            "checksum": f"sha256:{version_id:064x}", "comment": "",
            "created_at": t0 + timedelta(minutes=version_id), "created_by": BY,
        })
        apps.append((layer_id, version_id))

    def assign(kind: PrincipalKind, sid: str, name: str, app: tuple[int, int]) -> dict[str, Any]:
        return {"layer_id": app[0], "version_id": app[1], "principal_kind": kind, "principal_sid": sid,
                "principal_name": name, "created_at": t0, "created_by": BY}

    assignments: list[dict[str, Any]] = []
    for number in range(users):
        sid, name = f"{DOMAIN_SID}-{USER_RID + number}", f"{samba_dc.NETBIOS_DOMAIN}\\user{number:05d}"
        for k in range(DIRECT_PER_USER):
            assignments.append(assign(PrincipalKind.AD_USER, sid, name, apps[(number + k * 97) % layers]))
    associations: list[dict[str, Any]] = []
    for number in range(groups):
        sid, name = f"{DOMAIN_SID}-{GROUP_RID + number}", f"{samba_dc.NETBIOS_DOMAIN}\\group{number:04d}"
        for k in range(PER_GROUP):
            assignments.append(assign(PrincipalKind.AD_GROUP, sid, name, apps[(number * 3 + k * 101) % layers]))
        if number % 10 == 0:
            for pattern in (f"VDA-G{number:04d}-*", f"vdi-{number % 100:02d}-??"):
                associations.append({"group_sid": sid, "group_name": name, "pattern": pattern,
                                     "created_at": t0, "created_by": BY})
    # Users with more assignments than layers would repeat a layer: one assignment per (layer, SID).
    unique = list({(a["layer_id"], a["principal_sid"]): a for a in assignments}.values())

    with catalog.write() as session:
        session.execute(insert(Layer.__table__), layer_rows[:1])
        session.execute(insert(Layer.__table__), layer_rows[1:])
        session.execute(insert(LayerVersion.__table__), version_rows)
        session.execute(insert(ElasticAssignment.__table__), unique)
        session.execute(insert(MachineAssociation.__table__), associations)
    return {"app layers": layers, "assignments": len(unique), "machine associations": len(associations)}


def fill_disk_cache(cache: Path, repository: LayerRepository, plan: SyncPlan) -> None:
    """Stand-in layer disks in the local cache for every version of the plan (as an earlier sync leaves
    them; LayerDesk then takes their size and checksum from the cache without reading them again)."""
    import hashlib
    import json

    for version in plan.versions:
        folder = cache / str(version.layer_id)
        folder.mkdir(parents=True, exist_ok=True)
        disk = folder / f"{version.version_id}.vhdx"
        data = hashlib.sha256(str(version.version_id).encode()).digest() * (STAND_IN_DISK // 32)
        disk.write_bytes(data)
        disk.with_name(disk.name + ".json").write_text(json.dumps({
            "version_checksum": version.checksum, "size_bytes": len(data),
            "checksum": f"sha256:{hashlib.sha256(data).hexdigest()}"}), encoding="utf-8")
        # The cache must answer without making a disk: a miss here would be a benchmark bug.
        assert cached_disk(cache, repository, version, "vhdx").size_bytes == len(data)


# --- (1) the JSON files ---------------------------------------------------------------------------------


def build_and_write_json(elastic: ElasticService, session: ShareSession, cache: Path,
                         repository: LayerRepository) -> dict[str, int]:
    """The catalog read, the three documents built and each replaced atomically on the share."""
    plan = elastic.sync_plan()
    entries = []
    for version in sorted(plan.versions, key=lambda v: (v.layer_id, v.version_id)):
        disk = cached_disk(cache, repository, version, "vhdx")
        entries.append(LayerEntry(version.layer_id, version.layer, version.os_layer_id, version.os_layer,
                                  version.version_id, version.version, version.checksum,
                                  disk_path(version.layer_id, version.version_id, "vhdx", disk.checksum),
                                  "vhdx", disk.size_bytes, disk.checksum))
    documents = ElasticRepository(tuple(entries), plan.assignments, plan.associations).documents()
    for name in FILES:
        session.write_atomic(name, documents[name])
    return {name: len(data) for name, data in documents.items()}


def remove_json(session: ShareSession) -> None:
    present = set(session.listdir(""))
    for name in FILES:
        if name in present:
            session.remove(name)


# --- (2) upload throughput --------------------------------------------------------------------------------


def make_disk(path: Path, size: int) -> None:
    """``size`` bytes of random-looking data: 64 distinct random MiB blocks, repeated."""
    blocks = [os.urandom(CHUNK) for _ in range(64)]
    with path.open("wb") as file:
        written = 0
        while written < size:
            chunk = blocks[(written // CHUNK) % len(blocks)][: size - written]
            file.write(chunk)
            written += len(chunk)


def find_smbclient() -> str | None:
    return shutil.which("smbclient", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/bin", "/usr/sbin"]))


def smbclient_put(program: str, source: Path, auth_file: Path) -> None:
    done = subprocess.run(
        [program, f"//127.0.0.1/{samba_dc.LAYERS_SHARE}", "-A", str(auth_file), "-c", f'put "{source}" {UPLOAD_NAME}'],
        capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=900, check=False)
    if done.returncode != 0 or "NT_STATUS" in done.stdout + done.stderr:
        raise RuntimeError(f"smbclient put failed ({done.returncode}): {(done.stdout + done.stderr).strip()[-800:]}")


def write_auth_file(folder: Path) -> Path:
    """Samba's authentication file for smbclient (``-A``), readable by its owner only."""
    path = folder / "smbclient.auth"
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as file:
        file.write(f"username = Administrator\npassword = {samba_dc.ADMIN_PASSWORD}\n"
                   f"domain = {samba_dc.NETBIOS_DOMAIN}\n")
    return path


# --- running --------------------------------------------------------------------------------------------


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--groups", type=int, default=2_000)
    parser.add_argument("--layers", type=int, default=500)
    parser.add_argument("--mb", type=int, default=1_000, help="size of the uploaded layer disk in MB (10^6 bytes)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each measurement; the median is shown")
    parser.add_argument("--dir", help="a parent folder for the temporary work folder (default: the system's)")
    args = parser.parse_args(argv)
    if min(args.users, args.groups, args.layers, args.mb, args.runs) < 1:
        parser.error("every count must be at least 1")

    work = Path(tempfile.mkdtemp(prefix="layerdesk-elastic-bench-", dir=args.dir))
    dc: samba_dc.RunningDC | None = None
    try:
        print("Starting the Samba AD DC on 127.0.0.1 (tests/support/samba_dc.py)...")
        try:
            dc = samba_dc.start(work)
        except samba_dc.SambaUnavailable as missing:
            print(f"Cannot run: no Samba AD DC ({missing}).")
            return 2
        cold = f", provisioned the golden copy in {dc.provision_s:.1f} s" if dc.provision_s is not None else ""
        print(f"DC answering after {dc.start_s:.1f} s{cold}; share {SHARE} as {ACCOUNT}")
        return run(args, work, dc)
    finally:
        if dc is not None:
            dc.stop()
        shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path, dc: samba_dc.RunningDC) -> int:
    home = Home(work / "home").ensure()
    catalog, secrets = open_catalog(home)
    try:
        services = Services.for_caller(
            home, catalog, Caller("admin", frozenset({Role.ADMINISTRATOR}), PrincipalKind.LOCAL_USER), secrets)
        elastic = ElasticService.for_services(services)
        seeding_s, counts = timed(lambda: seed(catalog, args.users, args.groups, args.layers))
        print(f"Seeded {args.users:,} users, {args.groups:,} groups: "
              + ", ".join(f"{n:,} {what}" for what, n in counts.items()) + f" in {seeding_s:.1f} s")
        repository = LayerRepository(home.repository)
        cache = work / "cache"
        plan = elastic.sync_plan()
        fill_disk_cache(cache, repository, plan)

        with ShareSession(parse_share(SHARE), ACCOUNT, samba_dc.ADMIN_PASSWORD) as session:
            json_times, sizes = [], {}
            for _ in range(args.runs):
                remove_json(session)
                seconds, sizes = timed(lambda: build_and_write_json(elastic, session, cache, repository))
                json_times.append(seconds)
            # Every disk onto the share once (not timed), then whole syncs that copy no disk.
            first = sync_repository(session, elastic.sync_plan(), repository, cache)
            sync_times = []
            for _ in range(args.runs):
                remove_json(session)
                seconds, result = timed(lambda: sync_repository(session, elastic.sync_plan(), repository, cache))
                assert not result.copied and len(result.kept) == len(first.copied)
                sync_times.append(seconds)
            share_bytes = sum(f.stat().st_size for f in (dc.root / samba_dc.LAYERS_SHARE).rglob("*") if f.is_file())
            print(f"Share now holds {len(first.copied):,} stand-in disks and the JSON files "
                  f"({share_bytes / MB:.1f} MB)")

        print()
        print(f"(1) Build + write the 3 JSON files, median of {args.runs}: {statistics.median(json_times):.3f} s "
              f"(goal ≤ {JSON_GOAL_S:.0f} s: {'met' if statistics.median(json_times) <= JSON_GOAL_S else 'MISSED'})"
              f"   runs: {', '.join(f'{t:.3f}' for t in json_times)}")
        print("    sizes: " + ", ".join(f"{name} {size / MB:.2f} MB" for name, size in sizes.items()))
        print(f"    for context, a whole sync with every disk already on the share: "
              f"{statistics.median(sync_times):.3f} s median ({', '.join(f'{t:.3f}' for t in sync_times)})")
        print()
        upload(args, work, dc)
        return 0
    finally:
        catalog.close()


def upload(args: argparse.Namespace, work: Path, dc: samba_dc.RunningDC) -> None:
    size = args.mb * MB
    source = work / "layer-disk.vhdx"
    print(f"(2) Generating a {size / MB:,.0f} MB layer disk...")
    make_disk(source, size)
    on_share = dc.root / samba_dc.LAYERS_SHARE / UPLOAD_NAME
    program = find_smbclient()

    def layerdesk() -> float:
        with ShareSession(parse_share(SHARE), ACCOUNT, samba_dc.ADMIN_PASSWORD) as session:
            seconds, _ = timed(lambda: session.upload(source, UPLOAD_NAME))
        assert on_share.stat().st_size == size
        on_share.unlink()
        return seconds

    ours: list[float] = []
    theirs: list[float] = []
    auth = write_auth_file(work) if program else None
    try:
        for _ in range(args.runs):  # alternated, so neither side gets a warmer cache throughout
            ours.append(layerdesk())
            if program and auth:
                seconds, _ = timed(lambda: smbclient_put(program, source, auth))
                assert on_share.stat().st_size == size
                on_share.unlink()
                theirs.append(seconds)
    finally:
        if auth is not None:
            auth.unlink(missing_ok=True)
        source.unlink(missing_ok=True)

    ours_mbs = size / statistics.median(ours) / MB
    print(f"    LayerDesk ShareSession.upload: {ours_mbs:,.1f} MB/s median of {args.runs} "
          f"(runs: {', '.join(f'{t:.2f} s' for t in ours)})")
    if not program:
        print("    Samba's smbclient program is not installed: the throughput ratio (goal ≥ "
              f"{RATIO_GOAL}) was NOT measured. Install smbclient and run again for it.")
        return
    theirs_mbs = size / statistics.median(theirs) / MB
    ratio = ours_mbs / theirs_mbs
    print(f"    smbclient put:                 {theirs_mbs:,.1f} MB/s median of {args.runs} "
          f"(runs: {', '.join(f'{t:.2f} s' for t in theirs)})")
    print(f"    Throughput ratio LayerDesk ÷ smbclient: {ratio:.2f} "
          f"(goal ≥ {RATIO_GOAL}: {'met' if ratio >= RATIO_GOAL else 'MISSED'})")
    # Each run of ours beside the smbclient run right after it: how much the machine's load moved things.
    pairs = [t / o for o, t in zip(ours, theirs, strict=True)]
    print(f"    ratio of each alternated pair of runs: {', '.join(f'{r:.2f}' for r in pairs)} "
          f"(writes of up to {WRITE_SIZE // CHUNK} MiB, up to {IN_FLIGHT_LIMIT // CHUNK} MiB in flight)")


if __name__ == "__main__":
    sys.exit(main())
