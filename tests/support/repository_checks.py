"""Checks shared by the import and repository tests: what the catalog and the repository hold."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

from app.catalog.database import Catalog
from tests.support.catalog_checks import Snapshot, snapshot

#: Tables that record the attempt itself (who tried what, the task and its log), not its outcome.
ATTEMPT_TABLES = frozenset({"audit_entry", "task", "task_log_line"})


def outcome_snapshot(catalog: Catalog) -> Snapshot:
    """Every row of every table except the audit log and the task tables."""
    return {name: rows for name, rows in snapshot(catalog).items() if name not in ATTEMPT_TABLES}


def listing(root: Path) -> dict[str, str]:
    """Every file and folder under ``root`` → its SHA-256 (``"dir"`` for folders)."""
    found: dict[str, str] = {}
    if not root.exists():
        return found
    for folder, dirnames, filenames in os.walk(root):
        for name in dirnames:
            found[(Path(folder) / name).relative_to(root).as_posix()] = "dir"
        for name in filenames:
            path = Path(folder) / name
            found[path.relative_to(root).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def make_tree(root: Path, files: Mapping[str, bytes]) -> Path:
    """Write ``files`` (``a/b.txt`` → content) under ``root``; returns ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return root


def flip_bytes(path: Path, offset: int, count: int = 16) -> None:
    """Invert ``count`` bytes of ``path`` at ``offset`` (a damaged disk)."""
    with path.open("r+b") as file:
        file.seek(offset)
        data = file.read(count)
        file.seek(offset)
        file.write(bytes(b ^ 0xFF for b in data))
