"""The catalog file: pragmas, schema versions, refusals and migrations."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import Connection, text

from app.catalog.database import Catalog, _make_engine
from app.catalog.migrations import APPLICATION_ID, MIGRATIONS, SCHEMA_VERSION, Migration, migrate
from app.errors import CatalogError


def _pragma(path: Path, name: str) -> object:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(f"PRAGMA {name}").fetchone()[0]
    finally:
        conn.close()


def test_new_catalog_uses_wal_foreign_keys_and_marks_itself(tmp_path: Path) -> None:
    path = tmp_path / "catalog.sqlite"
    catalog = Catalog(path)
    try:
        with catalog.read() as session:
            assert session.execute(text("PRAGMA foreign_keys")).scalar_one() == 1
            assert session.execute(text("PRAGMA journal_mode")).scalar_one() == "wal"
    finally:
        catalog.close()
    assert _pragma(path, "user_version") == SCHEMA_VERSION
    assert _pragma(path, "application_id") == APPLICATION_ID
    assert Catalog(path).integrity_check() == []


def test_foreign_keys_are_enforced_by_the_database(tmp_path: Path) -> None:
    catalog = Catalog(tmp_path / "c.sqlite")
    try:
        with pytest.raises(CatalogError, match="could not be used"), catalog.write() as session:
            session.execute(
                text(
                    "INSERT INTO layer_version (layer_id, name, state, state_reason, size_bytes, comment, "
                    "created_at, created_by) VALUES (999, 'v', 'editing', '', 0, '', '2026-01-01', 'x')"
                )
            )
    finally:
        catalog.close()


def test_catalog_from_a_newer_layerdesk_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    Catalog(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 5}")
    conn.close()
    before = path.read_bytes()
    with pytest.raises(CatalogError) as refused:
        Catalog(path)
    message = str(refused.value)
    assert f"catalog schema {SCHEMA_VERSION + 5}" in message
    assert "newer LayerDesk" in message and "not changed" in message
    assert path.read_bytes() == before


def test_a_file_that_is_not_a_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    path.write_bytes(b"MZ this is a Windows program, not a catalog" * 10)
    before = path.read_bytes()
    with pytest.raises(CatalogError, match="not a LayerDesk catalog"):
        Catalog(path)
    assert path.read_bytes() == before


def test_another_programs_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE bookmarks (url TEXT)")
    conn.execute("INSERT INTO bookmarks VALUES ('https://example.invalid')")
    conn.commit()
    conn.close()
    with pytest.raises(CatalogError, match="not a LayerDesk catalog"):
        Catalog(path)
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT count(*) FROM bookmarks").fetchone()[0] == 1
    conn.close()


def test_database_with_foreign_application_id_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA application_id = 1234")
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    with pytest.raises(CatalogError, match="another program"):
        Catalog(path)


def test_a_folder_in_place_of_the_catalog_is_refused(tmp_path: Path) -> None:
    (tmp_path / "c.sqlite").mkdir()
    with pytest.raises(CatalogError, match="is a folder"):
        Catalog(tmp_path / "c.sqlite")


def _v2_add_notes(conn: Connection) -> None:
    conn.exec_driver_sql("ALTER TABLE layer ADD COLUMN notes TEXT DEFAULT ''")


def _v3_fails(conn: Connection) -> None:
    conn.exec_driver_sql("CREATE TABLE half_done (x)")
    raise RuntimeError("disk went away")


def _make_v1_catalog(path: Path) -> None:
    catalog = Catalog(path)
    with catalog.write() as session:
        session.execute(
            text(
                "INSERT INTO layer (name, type, description, created_at, created_by) "
                "VALUES ('Win11', 'os', '', '2026-01-01 00:00:00', 'admin')"
            )
        )
    catalog.close()


def test_migration_backs_up_then_steps_forward(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    backups = tmp_path / "backups"
    _make_v1_catalog(path)
    steps = (*MIGRATIONS, Migration(SCHEMA_VERSION + 1, "layer notes", _v2_add_notes))
    engine = _make_engine(path, begin="BEGIN IMMEDIATE")
    try:
        assert migrate(engine, path, backups, steps) == SCHEMA_VERSION + 1
    finally:
        engine.dispose()
    assert _pragma(path, "user_version") == SCHEMA_VERSION + 1
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT name, notes FROM layer").fetchall() == [("Win11", "")]
    conn.close()
    copies = list(backups.glob(f"catalog-schema{SCHEMA_VERSION}-*.sqlite"))
    assert len(copies) == 1
    assert _pragma(copies[0], "user_version") == SCHEMA_VERSION
    conn = sqlite3.connect(copies[0])
    assert conn.execute("SELECT name FROM layer").fetchall() == [("Win11",)]
    conn.close()


def test_a_failed_migration_leaves_the_catalog_at_the_last_good_schema(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    backups = tmp_path / "backups"
    _make_v1_catalog(path)
    steps = (
        *MIGRATIONS,
        Migration(SCHEMA_VERSION + 1, "layer notes", _v2_add_notes),
        Migration(SCHEMA_VERSION + 2, "broken step", _v3_fails),
    )
    engine = _make_engine(path, begin="BEGIN IMMEDIATE")
    try:
        with pytest.raises(CatalogError) as failed:
            migrate(engine, path, backups, steps)
    finally:
        engine.dispose()
    message = str(failed.value)
    assert "broken step" in message and "disk went away" in message
    assert f"stays at schema {SCHEMA_VERSION + 1}" in message and str(backups) in message
    assert _pragma(path, "user_version") == SCHEMA_VERSION + 1
    conn = sqlite3.connect(path)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    conn.close()
    assert "half_done" not in tables, "the failed step's DDL must be rolled back"


CATALOGS = sorted((Path(__file__).resolve().parents[1] / "data" / "catalogs").glob("schema*.sqlite"))


@pytest.mark.parametrize("committed", CATALOGS, ids=[p.stem for p in CATALOGS])
def test_catalogs_of_every_released_schema_open_with_their_content(
    committed: Path, tmp_path: Path, memory_keyring: object
) -> None:
    """Each file was written by tests/support/make_catalog_fixture.py at its schema."""
    import shutil

    from app.catalog.models import Role
    from app.paths import Home
    from app.services import Services, open_catalog
    from app.services.rbac import Caller

    assert CATALOGS, "tests/data/catalogs holds a catalog of every released schema"
    home = Home(tmp_path / "home").ensure()
    shutil.copy(committed, home.catalog)
    catalog, secrets = open_catalog(home)
    try:
        admin = Services.for_caller(home, catalog, Caller("t", frozenset({Role.ADMINISTRATOR})), secrets)
        assert [layer.name for layer in admin.layers.list_layers()] == ["Office", "Win11"]
        finance = admin.templates.get_template("Finance")
        assert (finance.os_version, finance.app_layers, finance.publish_blockers) == ("Win11:1.0", ("Office:2024",), ())
        assert [a.principal_name for a in admin.assignments.list_assignments()] == ["LAB\\Finance"]
        assert [s.path for s in admin.storage.list_locations()] == ["\\\\files\\userlayers"]
        assert catalog.integrity_check() == []
    finally:
        catalog.close()
    assert _pragma(home.catalog, "user_version") == SCHEMA_VERSION


def test_a_full_disk_gives_a_clear_error_and_loses_nothing(tmp_path: Path, memory_keyring: object) -> None:
    """SQLite's page limit stands in for a full disk: the same SQLITE_FULL error reaches us."""
    from sqlalchemy import event

    from app.catalog.models import LayerType, Role
    from app.errors import EnvironmentProblem
    from app.paths import Home
    from app.services import Services, open_catalog
    from app.services.rbac import Caller

    home = Home(tmp_path / "home").ensure()
    catalog, secrets = open_catalog(home)
    admin = Services.for_caller(home, catalog, Caller("a", frozenset({Role.ADMINISTRATOR})), secrets)
    admin.layers.create_layer("Win11", LayerType.OS)
    with catalog.read() as session:
        pages = session.execute(text("PRAGMA page_count")).scalar_one()
    catalog.write_engine.dispose()

    @event.listens_for(catalog.write_engine, "connect")
    def _no_room(dbapi_connection: sqlite3.Connection, _record: object) -> None:
        dbapi_connection.execute(f"PRAGMA max_page_count = {pages}")

    with pytest.raises(EnvironmentProblem) as full:
        for i in range(500):
            admin.layers.create_layer(f"App{i:03}", LayerType.APP, os_layer="Win11",
                                      description="x" * 1900)
    assert "is full" in str(full.value) and "nothing was changed" in str(full.value)
    created = [layer.name for layer in admin.layers.list_layers()]
    event.remove(catalog.write_engine, "connect", _no_room)
    catalog.write_engine.dispose()
    assert catalog.integrity_check() == []
    entries = {e.object_name for e in admin.audit.list_entries(operation="layer.create")}
    assert entries == set(created), "every layer that exists has its audit entry and no other"
    admin.layers.create_layer("AfterSpaceFreed", LayerType.APP, os_layer="Win11")
    catalog.close()


def test_a_catalog_kept_busy_by_another_process_gives_a_clear_error(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import app.catalog.database as database

    monkeypatch.setattr(database, "BUSY_TIMEOUT_S", 0.2)
    path = tmp_path / "c.sqlite"
    catalog = Catalog(path)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(CatalogError, match="is busy: another LayerDesk process kept it locked"), \
                catalog.write() as session:
            session.execute(text("SELECT 1"))
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    with catalog.write() as session:
        assert session.execute(text("SELECT 1")).scalar_one() == 1
    catalog.close()


def _columns(path: Path, table: str) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(path)
    try:
        return [row[1:] for row in conn.execute(f"PRAGMA table_info({table})")]
    finally:
        conn.close()


def test_a_schema1_catalog_upgrades_to_the_packaging_schema_like_a_new_one(tmp_path: Path,
                                                                           memory_keyring: object) -> None:
    """Schema 2 adds the packaging record and the layer script to every layer version; the versions a schema-1
    catalog holds were imported, so they have neither."""
    import shutil

    from app.catalog.models import Role
    from app.errors import NotFound
    from app.paths import Home
    from app.services import Services, open_catalog
    from app.services.packaging import packaging_service
    from app.services.rbac import Caller

    schema1 = Path(__file__).resolve().parents[1] / "data" / "catalogs" / "schema1.sqlite"
    home = Home(tmp_path / "home").ensure()
    shutil.copy(schema1, home.catalog)
    catalog, secrets = open_catalog(home)
    try:
        admin = Services.for_caller(home, catalog, Caller("t", frozenset({Role.ADMINISTRATOR})), secrets)
        with pytest.raises(NotFound, match=r"Office:2024 was not made on a packaging machine"):
            packaging_service(admin).get_packaging("Office:2024")
        with catalog.read() as session:
            rows = session.execute(text("SELECT name, layer_script, packaging FROM layer_version ORDER BY id")).all()
        assert [tuple(r) for r in rows] == [("1.0", "", None), ("2024", "", None)]
    finally:
        catalog.close()
    assert [p.name for p in home.backups.glob("catalog-schema1-*.sqlite")], "the schema-1 catalog was backed up"
    fresh = tmp_path / "fresh.sqlite"
    Catalog(fresh).close()
    assert _columns(home.catalog, "layer_version") == _columns(fresh, "layer_version")
    assert SCHEMA_VERSION == 2
