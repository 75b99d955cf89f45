"""Schema 2: layer versions made on a packaging machine.

``layer_version`` gains ``layer_script`` (the run-once script a version carries, text; empty: none) and
``packaging`` (JSON: what the version's packaging disk was made of and the disk delivered; ``NULL`` for
versions imported from elsewhere, which every schema-1 version was).
"""

from __future__ import annotations

from sqlalchemy import Connection


def apply(conn: Connection) -> None:
    """Bring a schema-1 catalog to schema 2 (inside the migration's transaction)."""
    conn.exec_driver_sql("ALTER TABLE layer_version ADD COLUMN layer_script TEXT DEFAULT '' NOT NULL")
    conn.exec_driver_sql("ALTER TABLE layer_version ADD COLUMN packaging JSON")
