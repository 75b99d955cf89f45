"""Writes a small catalog at the current schema, to be committed as tests/data/catalogs/schemaN.sqlite.

Run once per released schema: ``python -m tests.support.make_catalog_fixture tests/data/catalogs``.
The upgrade tests open every committed file with the current LayerDesk.
"""

from __future__ import annotations

import sqlite3
import sys
import tempfile
from pathlib import Path

from app.catalog.migrations import SCHEMA_VERSION
from app.catalog.models import LayerType, PrincipalKind, Role, VersionState
from app.paths import Home
from app.secrets import SecretStore
from app.services import Services, open_catalog
from app.services.rbac import Caller
from app.services.templates import TemplateSpec


def build(target_dir: Path) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        home = Home(Path(tmp)).ensure()
        catalog, _ = open_catalog(home)
        admin = Services.for_caller(home, catalog, Caller("fixture", frozenset({Role.ADMINISTRATOR})),
                                    SecretStore("fixture"))
        admin.layers.create_layer("Win11", LayerType.OS, comment="fixture")
        admin.layers.add_version("Win11", "1.0")
        admin.layers.create_layer("Office", LayerType.APP, os_layer="Win11")
        admin.layers.add_version("Office", "2024")
        for ref in ("Win11:1.0", "Office:2024"):
            admin.layers.set_version_state(ref, VersionState.FINALIZING)
            admin.layers.set_version_state(ref, VersionState.DEPLOYABLE, size_bytes=1 << 20, checksum="sha256:ab")
        admin.templates.create_template("Finance", TemplateSpec(os="Win11:1.0", apps=("Office",)), comment="v1")
        admin.assignments.assign("Office:2024", PrincipalKind.AD_GROUP, "S-1-5-21-1-2-3-1001", "LAB\\Finance")
        admin.storage.add_location("Primary", "\\\\files\\userlayers")
        catalog.close()
        target = target_dir / f"schema{SCHEMA_VERSION}.sqlite"
        # A single self-contained file (no -wal beside it).
        source = sqlite3.connect(home.catalog)
        try:
            source.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            dest = sqlite3.connect(target)
            source.backup(dest)
            dest.execute("PRAGMA journal_mode = DELETE")
            dest.execute("VACUUM")
            dest.close()
        finally:
            source.close()
        return target


if __name__ == "__main__":
    print(build(Path(sys.argv[1])))
