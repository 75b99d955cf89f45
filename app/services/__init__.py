"""The service layer: the only way to change the catalog. The console and ``layerctl`` both call it.

:func:`open_catalog` opens a home's catalog, :func:`resolve_caller` says who is calling, and
:meth:`Services.for_caller` binds every service to that caller.
"""

from __future__ import annotations

from dataclasses import dataclass

from app.catalog.database import Catalog
from app.engine.repository import LayerRepository
from app.paths import Home
from app.secrets import SecretStore
from app.services.access import AccessService, embedded_caller, session_caller
from app.services.assignments import AssignmentService
from app.services.audit import AuditService
from app.services.base import ServiceContext
from app.services.connectors import ConnectorService
from app.services.directory import DirectoryService
from app.services.imports import ImportService
from app.services.layers import LayerService
from app.services.publishing import PublishingService
from app.services.rbac import Caller
from app.services.repository import RepositoryService
from app.services.settings import SettingsService, installation_id
from app.services.storage import StorageService
from app.services.tasks import TaskService, recover_interrupted
from app.services.templates import TemplateService


@dataclass
class Services:
    """Every service, bound to one caller."""

    home: Home
    catalog: Catalog
    caller: Caller
    secrets: SecretStore
    layers: LayerService
    templates: TemplateService
    publishing: PublishingService
    assignments: AssignmentService
    storage: StorageService
    connectors: ConnectorService
    directory: DirectoryService
    tasks: TaskService
    settings: SettingsService
    audit: AuditService
    access: AccessService
    imports: ImportService
    repository: RepositoryService

    @classmethod
    def for_caller(cls, home: Home, catalog: Catalog, caller: Caller, secrets: SecretStore) -> Services:
        ctx = ServiceContext(catalog=catalog, caller=caller, secrets=secrets)
        repository = LayerRepository(home.repository)
        return cls(
            home=home, catalog=catalog, caller=caller, secrets=secrets,
            layers=LayerService(ctx, repository), templates=TemplateService(ctx),
            publishing=PublishingService(ctx, home),
            assignments=AssignmentService(ctx), storage=StorageService(ctx), connectors=ConnectorService(ctx),
            directory=DirectoryService(ctx), tasks=TaskService(ctx), settings=SettingsService(ctx),
            audit=AuditService(ctx), access=AccessService(ctx),
            imports=ImportService(ctx, repository), repository=RepositoryService(ctx, repository),
        )


def open_catalog(home: Home) -> tuple[Catalog, SecretStore]:
    """Open (creating if needed) the home's catalog, mark crashed tasks failed, and return it with the
    installation's secret store."""
    home.ensure()
    catalog = Catalog(home.catalog, backups=home.backups)
    recover_interrupted(catalog)
    with catalog.write() as session:
        install_id = installation_id(session)
    return catalog, SecretStore(install_id)


def resolve_caller(home: Home, catalog: Catalog, secrets: SecretStore) -> Caller:
    """The embedded built-in administrator, or the caller of the kept sign-in session."""
    caller = embedded_caller(catalog, home.root)
    if caller is not None:
        return caller
    return session_caller(catalog, secrets.get("session"))


__all__ = ["Caller", "Services", "open_catalog", "resolve_caller"]
