"""Checks shared by the service tests: the whole catalog before and after, and its raw bytes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from app.catalog.database import Catalog
from app.catalog.models import Base
from app.errors import LayerDeskError
from app.services import Services

Snapshot = dict[str, list[tuple[Any, ...]]]


def snapshot(catalog: Catalog, *, with_audit: bool = True) -> Snapshot:
    """Every row of every table in primary-key order (the audit log too, unless told otherwise)."""
    tables: Snapshot = {}
    with catalog.read_engine.connect() as conn:
        for table in Base.metadata.sorted_tables:
            if table.name == "audit_entry" and not with_audit:
                continue
            rows = conn.execute(select(table).order_by(*table.primary_key.columns)).all()
            tables[table.name] = [tuple(r) for r in rows]
    return tables


def catalog_bytes(catalog: Catalog) -> bytes:
    """The catalog file and its write-ahead log, to search for what must never be stored."""
    data = b""
    for suffix in ("", "-wal"):
        part = Path(f"{catalog.path}{suffix}")
        if part.exists():
            data += part.read_bytes()
    return data


def assert_refused(
    services: Services, action: Callable[[], object], error: type[LayerDeskError], *fragments: str
) -> LayerDeskError:
    """Run a change that must be refused: it raises ``error`` whose message holds every fragment, and
    no row of any table changes (the audit log included: a refusal for bad input is not audited)."""
    before = snapshot(services.catalog)
    with pytest.raises(error) as caught:
        action()
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert snapshot(services.catalog) == before
    return caught.value
