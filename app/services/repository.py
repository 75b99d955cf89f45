"""The layer repository as the administrator sees it: check it against the catalog."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select

from app.catalog.models import LayerVersion
from app.engine.repository import LayerRepository, VersionKey
from app.engine.toolcheck import ToolStatus, engine_tools
from app.engine.wim import ProgressFn
from app.procs import Cancellable
from app.services.base import Service, ServiceContext
from app.services.rbac import Operation


@dataclass(frozen=True)
class RepositoryReport:
    """What ``layerctl repo check`` prints: every problem found (none: healthy)."""

    ok: bool
    path: str
    problems: tuple[str, ...]
    versions_in_catalog: int
    stored_versions: int


class RepositoryService(Service):
    def __init__(self, ctx: ServiceContext, repository: LayerRepository) -> None:
        super().__init__(ctx)
        self.repository = repository

    def check(self, *, progress: ProgressFn | None = None, cancel: Cancellable | None = None) -> RepositoryReport:
        """Verify every stored object (WIM data and integrity tables, manifests and their checksums) and
        compare the repository with the catalog: missing, mismatched and orphaned versions. Read-only."""
        with self._read() as session:
            catalog: dict[VersionKey, str | None] = {
                (layer_id, version_id): checksum
                for version_id, layer_id, checksum in session.execute(
                    select(LayerVersion.id, LayerVersion.layer_id, LayerVersion.checksum)
                )
            }
        problems = self.repository.check(catalog, progress=progress, cancel=cancel)
        return RepositoryReport(
            ok=not problems,
            path=str(self.repository.root),
            problems=tuple(problems),
            versions_in_catalog=len(catalog),
            stored_versions=sum(1 for checksum in catalog.values() if checksum),
        )

    def engine_tools(self) -> list[ToolStatus]:
        """The engine's tools on this machine (wimlib, qemu-img, NTFS-3G, dosfstools) with their versions
        and what cannot be done without each. Read-only; runs a few programs, so call it off the UI thread."""
        self.caller.require(Operation.READ)
        return engine_tools()
