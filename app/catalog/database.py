"""Opening the catalog: SQLite in WAL mode, foreign keys on, schema checked and migrated.

Reads and writes use separate engines on the same file: writes start with ``BEGIN IMMEDIATE`` so two
writers queue on SQLite's busy timeout instead of failing half-way, while reads never take the write
lock. A session is a unit of work, never shared across threads.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.exc import DatabaseError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from app.catalog.migrations import APPLICATION_ID, migrate
from app.errors import CatalogError, EnvironmentProblem

log = logging.getLogger(__name__)

#: How long a writer waits for another process's write to finish before giving up.
BUSY_TIMEOUT_S = 15.0


def _make_engine(path: Path, *, begin: str) -> Engine:
    engine = create_engine(
        f"sqlite+pysqlite:///{path}",
        connect_args={"timeout": BUSY_TIMEOUT_S, "check_same_thread": False},
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: sqlite3.Connection, _record: Any) -> None:
        # Let SQLAlchemy's BEGIN below, not the driver, delimit transactions (DDL included).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA foreign_keys = ON")
            cursor.execute("PRAGMA journal_mode = WAL")
            # FULL: a committed change survives a power cut, not only a process crash.
            cursor.execute("PRAGMA synchronous = FULL")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql(begin)

    return engine


def translate_database_error(exc: Exception, path: Path) -> EnvironmentProblem:
    """Turn a driver error into a message that tells the administrator what to do."""
    detail = str(getattr(exc, "orig", exc)).lower()
    if "locked" in detail or "busy" in detail:
        return CatalogError(
            f"The catalog {path} is busy: another LayerDesk process kept it locked for more than "
            f"{BUSY_TIMEOUT_S:.0f} s. Wait for its task to finish and try again."
        )
    if "disk is full" in detail or "database or disk is full" in detail:
        return EnvironmentProblem(
            f"The disk holding the catalog {path} is full. Free some space and try again; "
            "nothing was changed."
        )
    if "malformed" in detail or "not a database" in detail or "file is encrypted" in detail:
        return CatalogError(
            f"The catalog {path} is damaged or is not a LayerDesk catalog ({detail}). "
            "Restore it from a backup (see the backups folder in the LayerDesk home)."
        )
    if "readonly" in detail or "read-only" in detail:
        return CatalogError(f"The catalog {path} is read-only: check the file's permissions.")
    return CatalogError(f"The catalog {path} could not be used: {detail}")


class Catalog:
    """The SQLite catalog of one LayerDesk home."""

    def __init__(self, path: Path, *, backups: Path | None = None) -> None:
        self.path = path
        self._backups = backups or path.parent / "backups"
        self._check_file()
        self.read_engine = _make_engine(path, begin="BEGIN")
        self.write_engine = _make_engine(path, begin="BEGIN IMMEDIATE")
        try:
            migrate(self.write_engine, path, self._backups)
        except (OperationalError, DatabaseError) as exc:
            self.close()
            raise translate_database_error(exc, path) from exc
        except BaseException:
            self.close()
            raise
        self._reader = sessionmaker(self.read_engine, expire_on_commit=False)
        self._writer = sessionmaker(self.write_engine, expire_on_commit=False)

    def _check_file(self) -> None:
        if not self.path.exists():
            return
        if self.path.is_dir():
            raise CatalogError(f"The catalog path {self.path} is a folder, not a catalog file.")
        with self.path.open("rb") as fh:
            head = fh.read(100)
        if head and not head.startswith(b"SQLite format 3\x00"):
            raise CatalogError(
                f"{self.path} is not a LayerDesk catalog (not an SQLite database). "
                "Move it aside or choose another home with --home."
            )
        if len(head) >= 72:
            app_id = int.from_bytes(head[68:72], "big")
            if app_id not in (0, APPLICATION_ID):
                raise CatalogError(
                    f"{self.path} is an SQLite database of another program, not a LayerDesk catalog."
                )

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A read-only unit of work."""
        session = self._reader()
        try:
            with session.begin():
                yield session
        except (OperationalError, DatabaseError) as exc:
            raise translate_database_error(exc, self.path) from exc
        finally:
            session.close()

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A unit of work that commits when the block ends and rolls back on any error."""
        session = self._writer()
        try:
            with session.begin():
                yield session
        except (OperationalError, DatabaseError) as exc:
            raise translate_database_error(exc, self.path) from exc
        finally:
            session.close()

    def integrity_check(self) -> list[str]:
        """SQLite's own consistency check plus foreign keys; an empty list means healthy."""
        problems: list[str] = []
        with self.read_engine.connect() as conn:
            rows = conn.execute(text("PRAGMA integrity_check")).scalars().all()
            problems.extend(str(r) for r in rows if r != "ok")
            for row in conn.execute(text("PRAGMA foreign_key_check")).all():
                problems.append(f"foreign key broken: table {row[0]} row {row[1]} → {row[2]}")
        return problems

    def size_bytes(self) -> int:
        total = 0
        for suffix in ("", "-wal", "-shm"):
            part = Path(f"{self.path}{suffix}")
            if part.exists():
                total += part.stat().st_size
        return total

    def close(self) -> None:
        for name in ("read_engine", "write_engine"):
            engine = getattr(self, name, None)
            if engine is not None:
                engine.dispose()
