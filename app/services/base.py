"""What every service shares: the caller, the catalog, the unit of work and its audit entry."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.catalog.database import Catalog
from app.catalog.models import AuditEntry, AuditOutcome, Layer, LayerVersion
from app.errors import NotFound, PermissionDenied, ValidationError
from app.secrets import SecretStore
from app.services.rbac import Caller, Operation
from app.services.validation import validate_comment

log = logging.getLogger(__name__)


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class ServiceContext:
    """Everything a service needs; built once per caller by :func:`app.services.open_services`."""

    catalog: Catalog
    caller: Caller
    secrets: SecretStore
    clock: Callable[[], datetime] = _utcnow


@dataclass
class Change:
    """A unit of work in progress: its session and what the audit entry will say."""

    session: Session
    caller: Caller
    object_type: str
    object_name: str
    details: dict[str, Any] = field(default_factory=dict)
    _after_commit: list[Callable[[], None]] = field(default_factory=list)
    _on_rollback: list[Callable[[], None]] = field(default_factory=list)

    def require(self, operation: Operation) -> None:
        """Check a permission that depends on what the transaction found (a layer's type, say)."""
        self.caller.require(operation)

    def after_commit(self, action: Callable[[], None]) -> None:
        """Run ``action`` once the change is committed (e.g. forget a secret of a deleted object)."""
        self._after_commit.append(action)

    def on_rollback(self, action: Callable[[], None]) -> None:
        """Run ``action`` if the change is rolled back (e.g. undo a secret stored for it)."""
        self._on_rollback.append(action)


class Service:
    """Base of the per-area services: reads are open to every role; changes go through :meth:`_change`."""

    def __init__(self, ctx: ServiceContext) -> None:
        self._ctx = ctx

    @property
    def caller(self) -> Caller:
        return self._ctx.caller

    @property
    def catalog(self) -> Catalog:
        return self._ctx.catalog

    def _now(self) -> datetime:
        return self._ctx.clock()

    @contextmanager
    def _read(self) -> Iterator[Session]:
        self.caller.require(Operation.READ)
        with self.catalog.read() as session:
            yield session

    @contextmanager
    def _change(
        self,
        operation: Operation | None,
        action: str,
        object_type: str,
        object_name: str,
        comment: str | None,
    ) -> Iterator[Change]:
        """Check the role, open one transaction, and write the audit entry in it.

        ``operation`` may be ``None`` when the needed permission is known only inside the transaction;
        the body then calls :meth:`Change.require`. A refusal is audited as ``denied`` on its own.
        """
        text = validate_comment(comment)
        change: Change | None = None
        try:
            if operation is not None:
                self.caller.require(operation)
            with self.catalog.write() as session:
                change = Change(session, self.caller, object_type, object_name)
                yield change
                session.add(
                    AuditEntry(
                        at=self._now(),
                        user=self.caller.username,
                        operation=action,
                        object_type=change.object_type,
                        object_name=change.object_name,
                        change=change.details,
                        comment=text,
                        outcome=AuditOutcome.SUCCESS,
                    )
                )
        except BaseException as failure:
            if change is not None:
                for undo in reversed(change._on_rollback):
                    try:
                        undo()
                    except Exception:
                        log.exception("undoing part of a failed %s did not work", action)
            if isinstance(failure, PermissionDenied):
                self._audit_denied(action, object_type, object_name, text, str(failure))
            raise
        for follow_up in change._after_commit:
            follow_up()

    def _audit_denied(self, action: str, object_type: str, object_name: str, comment: str, why: str) -> None:
        log.warning("denied %s on %s %r for %s", action, object_type, object_name, self.caller.username)
        with self.catalog.write() as session:
            session.add(
                AuditEntry(
                    at=self._now(),
                    user=self.caller.username,
                    operation=action,
                    object_type=object_type,
                    object_name=object_name,
                    change={"refused": why},
                    comment=comment,
                    outcome=AuditOutcome.DENIED,
                )
            )


# --- lookups shared by several services ------------------------------------------------------------


def split_qualified(ref: str) -> tuple[str, str | None]:
    """``"Office:2.0"`` → ``("Office", "2.0")``; ``"Office"`` → ``("Office", None)``."""
    name, sep, version = ref.partition(":")
    if not name.strip():
        raise ValidationError(f"{ref!r} names no layer; write LAYER or LAYER:VERSION.")
    if sep and not version.strip():
        raise ValidationError(f"{ref!r} names no version after ':'; write LAYER:VERSION.")
    return name.strip(), (version.strip() if sep else None)


def find_layer(session: Session, name: str) -> Layer:
    layer = session.scalars(select(Layer).where(Layer.name == name)).one_or_none()
    if layer is None:
        raise NotFound(f"There is no layer named {name!r}. `layerctl layer list` shows the layers.")
    return layer


def find_version(session: Session, ref: str, *, default_latest: bool = True) -> LayerVersion:
    """Resolve ``LAYER:VERSION``; a bare ``LAYER`` means its newest version that is not broken."""
    from app.catalog.models import VersionState

    name, version_name = split_qualified(ref)
    layer = find_layer(session, name)
    if version_name is None:
        if not default_latest:
            raise ValidationError(f"Name a version of {layer.name!r}: write {layer.name}:VERSION.")
        usable = [v for v in layer.versions if v.state != VersionState.BROKEN]
        if not usable:
            raise NotFound(f"Layer {layer.name!r} has no usable version yet; add or import one first.")
        return usable[-1]
    for version in layer.versions:
        if version.name.casefold() == version_name.casefold():
            return version
    known = ", ".join(v.name for v in layer.versions) or "none"
    raise NotFound(f"Layer {layer.name!r} has no version {version_name!r} (versions: {known}).")
