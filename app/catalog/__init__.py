"""The SQLite catalog: typed mappings, the database wrapper and schema migrations."""

from app.catalog.database import Catalog

__all__ = ["Catalog"]
