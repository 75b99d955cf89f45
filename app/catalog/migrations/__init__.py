"""Catalog schema versions and the steps between them.

The schema version lives in SQLite's ``PRAGMA user_version``; ``PRAGMA application_id`` marks the file
as a LayerDesk catalog. A new catalog is created at the latest schema in one go. An older catalog is
copied to the backups folder first, then brought forward one :class:`Migration` at a time, each in its
own transaction together with the version bump, so a failure leaves the catalog at a known version.
A catalog from a *newer* LayerDesk is refused: writing to it could lose what the newer version keeps.

To change the schema: change the models, add ``vNNN_<what>.py`` with a ``MIGRATION`` object whose
``apply`` brings schema NNN-1 to NNN, append it to :data:`MIGRATIONS`, and commit a catalog file of
the previous schema under ``tests/data/catalogs/`` so the upgrade is tested from every released schema.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Connection, Engine, inspect

from app.errors import CatalogError

log = logging.getLogger(__name__)

#: 'LYDK' – SQLite's application id for LayerDesk catalogs.
APPLICATION_ID = 0x4C59444B


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    apply: Callable[[Connection], None]


def _v001_initial(conn: Connection) -> None:
    from app.catalog.models import Base

    Base.metadata.create_all(conn)


def _v002_packaging(conn: Connection) -> None:
    from app.catalog.migrations.v002_packaging import apply

    apply(conn)


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "initial catalog", _v001_initial),
    Migration(2, "packaging records and layer scripts", _v002_packaging),
)
SCHEMA_VERSION = MIGRATIONS[-1].version


def read_schema_version(conn: Connection) -> int:
    return int(conn.exec_driver_sql("PRAGMA user_version").scalar_one())


def backup_copy(path: Path, backups: Path, label: str) -> Path:
    """Copy the catalog consistently (SQLite backup API, safe while others use it)."""
    backups.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S-%f")
    target = backups / f"catalog-{label}-{stamp}.sqlite"
    source = sqlite3.connect(path)
    try:
        dest = sqlite3.connect(target)
        try:
            source.backup(dest)
        finally:
            dest.close()
    finally:
        source.close()
    return target


def migrate(
    engine: Engine,
    path: Path,
    backups: Path,
    migrations: Sequence[Migration] = MIGRATIONS,
) -> int:
    """Bring the catalog at ``path`` to the latest schema of ``migrations``; return that version."""
    latest = migrations[-1].version
    with engine.connect() as conn:
        current = read_schema_version(conn)
        app_id = int(conn.exec_driver_sql("PRAGMA application_id").scalar_one())
        has_tables = bool(inspect(conn).get_table_names())
        conn.rollback()

    if current > latest:
        raise CatalogError(
            f"The catalog {path} was written by a newer LayerDesk (catalog schema {current}; this "
            f"version understands up to {latest}). Install that LayerDesk version or newer, or choose "
            "another home with --home. The catalog was not changed."
        )
    if current == 0:
        if has_tables or app_id not in (0, APPLICATION_ID):
            raise CatalogError(
                f"{path} holds tables but no LayerDesk schema version: it is not a LayerDesk catalog. "
                "Move it aside or choose another home with --home."
            )
        from app.catalog.models import Base

        with engine.begin() as conn:
            Base.metadata.create_all(conn)
            conn.exec_driver_sql(f"PRAGMA application_id = {APPLICATION_ID}")
            conn.exec_driver_sql(f"PRAGMA user_version = {latest}")
        log.info("created catalog %s at schema %d", path, latest)
        return latest
    if current == latest:
        return current

    copy = backup_copy(path, backups, f"schema{current}")
    log.info("catalog %s is at schema %d; backed up to %s before migrating", path, current, copy)
    for step in migrations:
        if step.version <= current:
            continue
        try:
            with engine.begin() as conn:
                step.apply(conn)
                conn.exec_driver_sql(f"PRAGMA user_version = {step.version}")
        except Exception as exc:
            raise CatalogError(
                f"Upgrading the catalog to schema {step.version} ({step.description}) failed: {exc}. "
                f"The catalog stays at schema {step.version - 1}; a copy from before the upgrade is "
                f"at {copy}."
            ) from exc
        log.info("catalog %s migrated to schema %d (%s)", path, step.version, step.description)
        current = step.version
    return current
