"""Catalog maintenance that runs as a task in a child process (it may take a while on a big catalog)."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from app.catalog.models import TaskState
from app.errors import EnvironmentProblem
from app.tasks.base import TaskResult
from app.tasks.worker import SubprocessTask, WorkerReport


def check_catalog(args: dict[str, Any], report: WorkerReport) -> dict[str, Any]:
    """Worker function: SQLite's integrity check and a foreign-key check, read-only."""
    path = Path(args["catalog"])
    report.progress(5, "Opening the catalog read-only")
    if not path.is_file():
        raise EnvironmentProblem(f"There is no catalog file at {path}.")
    conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
    try:
        report.progress(10, "Checking every page and index")
        problems = [str(row[0]) for row in conn.execute("PRAGMA integrity_check") if row[0] != "ok"]
        report.log(f"integrity check: {len(problems)} problem(s)")
        report.progress(70, "Checking references between tables")
        for table, rowid, parent, _ in conn.execute("PRAGMA foreign_key_check"):
            problems.append(f"{table} row {rowid} refers to a missing {parent}")
        tables = conn.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table'").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        raise EnvironmentProblem(f"The catalog {path} cannot be read: {exc}.") from None
    finally:
        conn.close()
    report.progress(100, "Done")
    size = sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())
    summary = "The catalog is healthy." if not problems else f"The catalog has {len(problems)} problem(s)."
    return {"summary": summary, "problems": problems, "tables": tables, "size_bytes": size}


@dataclass(frozen=True)
class CatalogCheckResult(TaskResult):
    problems: tuple[str, ...] = ()
    size_bytes: int = 0


class CatalogCheckTask(SubprocessTask):
    kind: ClassVar[str] = "catalog.check"
    function: ClassVar[str] = "app.catalog.maintenance:check_catalog"

    def __init__(self, catalog_path: Path) -> None:
        super().__init__(f"Check catalog {catalog_path.name}")
        self.catalog_path = catalog_path

    def arguments(self) -> dict[str, Any]:
        return {"catalog": str(self.catalog_path)}

    def result(self, data: dict[str, Any]) -> TaskResult:
        problems = tuple(data.get("problems", ()))
        return CatalogCheckResult(
            summary=str(data["summary"]),
            state=TaskState.DONE_WITH_ERRORS if problems else TaskState.COMPLETE,
            problems=problems,
            size_bytes=int(data.get("size_bytes", 0)),
        )
