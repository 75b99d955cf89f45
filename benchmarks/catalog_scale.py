"""How the services hold up on a large catalog. A standalone script, not a test.

    python benchmarks/catalog_scale.py [--home DIR] [--runs N]

Seeds a fresh catalog with fast bulk inserts (SQLAlchemy core ``insert()`` with lists of dicts, inside
``catalog.write()``; no service, validation or audit per row): 1,000 app layers × 10 versions on four
OS layers (plus platform layers), 1,000 image templates (OS version, platform version, 8 app layers,
one revision each), 100,000 elastic assignments (deployable app versions, 5,000 distinct SIDs × 20
layers) and 50,000 audit entries. Then times read operations through the real services as an
Administrator (median of N runs) against a baseline: the same rows selected with the plain sqlite3
module, no ORM. Without ``--home`` the catalog goes to a temporary folder removed at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# The services touch the keyring only for connector and directory passwords; this script uses neither.
os.environ.setdefault("PYTHON_KEYRING_BACKEND", "keyring.backends.null.Keyring")

from sqlalchemy import event, insert

from app.catalog.database import Catalog
from app.catalog.models import (
    AuditEntry,
    AuditOutcome,
    DiskFormat,
    ElasticAssignment,
    ElasticMode,
    ImageTemplate,
    Layer,
    LayerType,
    LayerVersion,
    PrincipalKind,
    Role,
    SysprepMode,
    TemplateAppLayer,
    TemplateRevision,
    VersionState,
)
from app.paths import Home
from app.services import Services, open_catalog
from app.services.rbac import Caller

OS_LAYERS = ("Win10-22H2", "Win11-23H2", "Server2019", "Server2022")
OS_VERSIONS = 3
PLATFORM_VERSIONS = 3
APP_LAYERS = 1_000
VERSIONS_PER_APP = 10
TEMPLATES = 1_000
APPS_PER_TEMPLATE = 8
PRINCIPALS = 5_000
LAYERS_PER_PRINCIPAL = 20  # 5,000 × 20 = 100,000 assignments
AUDIT_ENTRIES = 50_000
SID_BASE = "S-1-5-21-3623811015-3361044348-30300820"
SLOW_S = 2.0
BY = "bench"


# --- seeding ---------------------------------------------------------------------------------------


def seed(catalog: Catalog) -> dict[str, Any]:
    """Bulk-insert the catalog; return facts the timings refer to (names to look up)."""
    t0 = datetime(2024, 1, 1, tzinfo=UTC)
    layers: list[dict[str, Any]] = []
    versions: list[dict[str, Any]] = []
    layer_id = 0
    version_id = 0
    os_version_of: dict[int, list[int]] = {}  # os layer id → its version ids
    platform_of: dict[int, tuple[int, str, list[int]]] = {}  # os layer id → platform layer
    apps_of: dict[int, list[tuple[int, str, list[int]]]] = {}  # os layer id → app layers

    def add_layer(
        name: str, type_: LayerType, os_layer_id: int | None, count: int, deployable: int
    ) -> tuple[int, list[int]]:
        nonlocal layer_id, version_id
        layer_id += 1
        layers.append({
            "id": layer_id, "name": name, "type": type_, "description": f"{type_.value} layer {name}",
            "icon": None, "os_layer_id": os_layer_id, "created_at": t0 + timedelta(minutes=layer_id),
            "created_by": BY,
        })
        ids = []
        for number in range(count):
            version_id += 1
            ids.append(version_id)
            state = VersionState.DEPLOYABLE if number < deployable else VersionState.EDITING
            versions.append({
                "id": version_id, "layer_id": layer_id, "name": f"{number + 1}.0", "state": state,
                "state_reason": "", "size_bytes": (number + 1) * 1_048_576,
                "checksum": f"sha256:{version_id:064x}" if state is VersionState.DEPLOYABLE else None,
                "comment": "", "created_at": t0 + timedelta(minutes=version_id), "created_by": BY,
            })
        return layer_id, ids

    for os_name in OS_LAYERS:
        os_id, os_versions = add_layer(os_name, LayerType.OS, None, OS_VERSIONS, OS_VERSIONS)
        os_version_of[os_id] = os_versions
        pid, pversions = add_layer(f"VDA-{os_name}", LayerType.PLATFORM, os_id, PLATFORM_VERSIONS, PLATFORM_VERSIONS)
        platform_of[os_id] = (pid, f"VDA-{os_name}", pversions)
        apps_of[os_id] = []
    os_ids = list(os_version_of)
    for number in range(APP_LAYERS):
        os_id = os_ids[number % len(os_ids)]
        name = f"App-{number:04d}"
        # The newest version of each app is still being edited; the rest are deployable.
        aid, aversions = add_layer(name, LayerType.APP, os_id, VERSIONS_PER_APP, VERSIONS_PER_APP - 1)
        apps_of[os_id].append((aid, name, aversions))

    templates: list[dict[str, Any]] = []
    entries: list[dict[str, Any]] = []
    revisions: list[dict[str, Any]] = []
    entry_id = 0
    for number in range(TEMPLATES):
        template_id = number + 1
        os_id = os_ids[number % len(os_ids)]
        apps = apps_of[os_id]
        pid, pname, pversions = platform_of[os_id]
        os_vid = os_version_of[os_id][-1]
        chosen = [apps[(number * 3 + k * 29) % len(apps)] for k in range(APPS_PER_TEMPLATE)]
        assert len({a[0] for a in chosen}) == APPS_PER_TEMPLATE
        name = f"Template-{number:04d}"
        templates.append({
            "id": template_id, "name": name, "description": "", "icon": None, "os_version_id": os_vid,
            "platform_version_id": pversions[-1], "connector_id": None, "disk_format": DiskFormat.VHDX,
            "size_gb": 100, "elastic_mode": ElasticMode.APPLICATION, "sysprep": SysprepMode.NOT_GENERALIZED,
            "revision": 1, "created_at": t0, "created_by": BY, "updated_at": t0,
        })
        app_refs = []
        for priority, (aid, aname, aversions) in enumerate(chosen):
            entry_id += 1
            vid = aversions[(number + priority) % (VERSIONS_PER_APP - 1)]  # a deployable one
            entries.append({"id": entry_id, "template_id": template_id, "layer_id": aid, "version_id": vid,
                            "priority": priority})
            app_refs.append(f"{aname}:{aversions.index(vid) + 1}.0")
        os_name = OS_LAYERS[os_ids.index(os_id)]
        revisions.append({
            "template_id": template_id, "revision": 1, "saved_at": t0, "saved_by": BY, "comment": "seeded",
            "snapshot": {
                "name": name, "description": "", "icon": None, "os": f"{os_name}:{OS_VERSIONS}.0",
                "platform": f"{pname}:{PLATFORM_VERSIONS}.0", "apps": app_refs, "connector": None,
                "disk_format": "vhdx", "size_gb": 100, "elastic_mode": "application",
                "sysprep": "not_generalized",
            },
        })

    all_apps = [app for os_id in os_ids for app in apps_of[os_id]]
    all_apps.sort(key=lambda a: a[0])
    assignments: list[dict[str, Any]] = []
    for k in range(PRINCIPALS):
        is_group = k % 10 == 0
        sid = f"{SID_BASE}-{10_000 + k}"
        principal = f"CORP\\{'group' if is_group else 'user'}{k:05d}"
        for j in range(LAYERS_PER_PRINCIPAL):
            aid, _, aversions = all_apps[(k + j * (APP_LAYERS // LAYERS_PER_PRINCIPAL)) % APP_LAYERS]
            assignments.append({
                "layer_id": aid, "version_id": aversions[(k + j) % (VERSIONS_PER_APP - 1)],
                "principal_kind": PrincipalKind.AD_GROUP if is_group else PrincipalKind.AD_USER,
                "principal_sid": sid, "principal_name": principal, "created_at": t0, "created_by": BY,
            })

    operations = ("layer.create", "layer.version.add", "layer.version.state", "template.update", "elastic.assign")
    audits = [
        {
            "at": t0 + timedelta(seconds=n), "user": f"admin{n % 7}", "operation": operations[n % len(operations)],
            "object_type": "layer", "object_name": f"App-{n % APP_LAYERS:04d}",
            "change": {"state": ["editing", "finalizing"], "n": n}, "comment": "" if n % 3 else "seeded change",
            "outcome": AuditOutcome.SUCCESS,
        }
        for n in range(AUDIT_ENTRIES)
    ]

    tables = [
        (Layer, layers), (LayerVersion, versions), (ImageTemplate, templates), (TemplateAppLayer, entries),
        (TemplateRevision, revisions), (ElasticAssignment, assignments), (AuditEntry, audits),
    ]
    with catalog.write() as session:
        # Layers refer to their OS layer: OS layers (os_layer_id NULL) go in first.
        for model, rows in tables:
            if model is Layer:
                session.execute(insert(Layer.__table__), [r for r in rows if r["os_layer_id"] is None])
                session.execute(insert(Layer.__table__), [r for r in rows if r["os_layer_id"] is not None])
            else:
                session.execute(insert(model.__table__), rows)  # type: ignore[attr-defined]
    counts = {model.__tablename__: len(rows) for model, rows in tables}  # type: ignore[attr-defined]
    return {
        "counts": counts,
        "one_layer": all_apps[APP_LAYERS // 2][1],
        "one_template": templates[TEMPLATES // 2]["name"],
        "one_sid": f"{SID_BASE}-{10_000 + PRINCIPALS // 2}",
    }


# --- timing ----------------------------------------------------------------------------------------


def median_time(fn: Callable[[], Any], runs: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(runs):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


class QueryCounter:
    """Counts the SQL statements the services send (to spot N+1 loading)."""

    def __init__(self, catalog: Catalog) -> None:
        self.count = 0
        event.listen(catalog.read_engine, "before_cursor_execute", self._on_execute)

    def _on_execute(self, *_args: Any) -> None:
        self.count += 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", help="a folder for the new catalog (default: a temporary folder)")
    parser.add_argument("--runs", type=int, default=5, help="runs per operation; the median is shown")
    args = parser.parse_args(argv)

    temporary = args.home is None
    root = Path(tempfile.mkdtemp(prefix="layerdesk-bench-")) if temporary else Path(args.home).resolve()
    home = Home(root)
    if home.catalog.exists():
        print(f"{home.catalog} exists; the benchmark needs a fresh catalog. Choose an empty --home.")
        return 2
    try:
        return run(home, args.runs)
    finally:
        if temporary:
            shutil.rmtree(root, ignore_errors=True)


def run(home: Home, runs: int) -> int:
    catalog, secrets = open_catalog(home)
    try:
        admin = Services.for_caller(
            home, catalog, Caller("admin", frozenset({Role.ADMINISTRATOR}), PrincipalKind.LOCAL_USER), secrets
        )
        print(f"Catalog: {home.catalog}")
        print("Seeding with bulk inserts (SQLAlchemy core insert() of lists of dicts inside one "
              "catalog.write(); no per-row service calls, validation or audit entries)...")
        started = time.perf_counter()
        facts = seed(catalog)
        seeding_s = time.perf_counter() - started
        counts = facts["counts"]
        print(f"Seeded in {seeding_s:.1f} s: " + ", ".join(f"{n:,} {table}" for table, n in counts.items()))
        print(f"Catalog size: {catalog.size_bytes() / 1_048_576:.1f} MiB (database + WAL + shared memory)")
        checkpoint = sqlite3.connect(home.catalog)
        try:
            checkpoint.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        finally:
            checkpoint.close()
        print(f"Catalog size after a WAL checkpoint: {catalog.size_bytes() / 1_048_576:.1f} MiB")
        assert counts["layer_version"] >= 10_000 and counts["elastic_assignment"] == 100_000

        layer, template, sid = facts["one_layer"], facts["one_template"], facts["one_sid"]
        layer_id = catalog_id(catalog, "layer", layer)
        like = "%App-01%"
        operations: list[tuple[str, Callable[[], list[Any] | Any], str, tuple[Any, ...]]] = [
            ("layers.list_layers()", admin.layers.list_layers,
             "SELECT * FROM layer ORDER BY name", ()),
            ("layers.list_layers(type=APP)", lambda: admin.layers.list_layers(type=LayerType.APP),
             "SELECT * FROM layer WHERE type = 'app' ORDER BY name", ()),
            ("layers.list_layers(search='App-01')", lambda: admin.layers.list_layers(search="App-01"),
             "SELECT * FROM layer WHERE name LIKE ? ORDER BY name", (like,)),
            (f"layers.get_layer({layer!r})", lambda: admin.layers.get_layer(layer),
             "SELECT * FROM layer_version WHERE layer_id = ? ORDER BY id", (layer_id,)),
            ("templates.list_templates()", admin.templates.list_templates,
             "SELECT * FROM image_template ORDER BY name", ()),
            ("templates.list_templates(search='Template-01')",
             lambda: admin.templates.list_templates(search="Template-01"),
             "SELECT * FROM image_template WHERE name LIKE '%Template-01%' ORDER BY name", ()),
            (f"templates.get_template({template!r})", lambda: admin.templates.get_template(template),
             "SELECT * FROM image_template WHERE name = ?", (template,)),
            ("assignments.list_assignments()", admin.assignments.list_assignments,
             "SELECT * FROM elastic_assignment ORDER BY principal_name, id", ()),
            (f"assignments.list_assignments(layer={layer!r})", lambda: admin.assignments.list_assignments(layer=layer),
             "SELECT * FROM elastic_assignment WHERE layer_id = ? ORDER BY principal_name, id", (layer_id,)),
            ("assignments.list_assignments(principal=SID)", lambda: admin.assignments.list_assignments(principal=sid),
             "SELECT * FROM elastic_assignment WHERE principal_sid = ? OR principal_name = ? "
             "ORDER BY principal_name, id", (sid, sid)),
            ("audit.list_entries()", admin.audit.list_entries,
             "SELECT * FROM audit_entry ORDER BY id DESC LIMIT 1000", ()),
        ]

        raw = sqlite3.connect(home.catalog)
        counter = QueryCounter(catalog)
        rows_out: list[tuple[str, int, float, int, float, int]] = []
        slow: list[str] = []
        try:
            for label, call, sql, params in operations:
                before = counter.count
                service_s, result = median_time(call, runs)
                queries = (counter.count - before) // runs
                raw_s, raw_rows = median_time(lambda sql=sql, params=params: raw.execute(sql, params).fetchall(), runs)
                if hasattr(result, "versions"):  # a layer's detail: its versions
                    rows = len(result.versions)
                else:
                    rows = len(result) if isinstance(result, list) else 1
                rows_out.append((label, rows, service_s, len(raw_rows), raw_s, queries))
                if service_s > SLOW_S:
                    slow.append(label)
        finally:
            raw.close()

        print()
        print(f"Read operations as an Administrator, median of {runs} runs "
              "(baseline: the same rows of the main table through the plain sqlite3 module):")
        header = (f"{'operation':<54} {'rows':>7} {'service':>10} {'queries':>8} {'raw SQL':>10} "
                  f"{'raw rows':>8} {'ratio':>8}")
        print(header)
        print("-" * len(header))
        for label, rows, service_s, raw_rows, raw_s, queries in rows_out:
            ratio = service_s / raw_s if raw_s > 0 else float("inf")
            print(f"{label:<54} {rows:>7,} {service_s * 1000:>8.1f}ms {queries:>8} {raw_s * 1000:>8.2f}ms "
                  f"{raw_rows:>8,} {ratio:>7.0f}×")
        print()
        if slow:
            print(f"SLOW (over {SLOW_S:.0f} s at this scale): " + ", ".join(slow))
        else:
            print(f"No operation took over {SLOW_S:.0f} s at this scale.")
        return 0
    finally:
        catalog.close()


def catalog_id(catalog: Catalog, table: str, name: str) -> int:
    with catalog.read() as session:
        return int(session.connection().exec_driver_sql(f"SELECT id FROM {table} WHERE name = ?", (name,)).scalar_one())


if __name__ == "__main__":
    sys.exit(main())
