"""The audit log: who changed what, when, with which comment; searchable; kept for a set time."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import delete, or_, select

from app.catalog.models import AuditEntry, AuditOutcome
from app.services.base import Service
from app.services.rbac import Operation
from app.services.settings import read_setting
from app.services.validation import like_contains, like_escape
from app.services.views import AuditEntryInfo


class AuditService(Service):
    def list_entries(
        self,
        *,
        object_name: str | None = None,
        user: str | None = None,
        operation: str | None = None,
        search: str | None = None,
        outcome: AuditOutcome | None = None,
        since: datetime | None = None,
        limit: int = 1000,
    ) -> list[AuditEntryInfo]:
        """Newest first. ``object_name`` matches whole names (ignoring case); ``search`` matches any
        part of the object name, operation, user or comment."""
        with self._read() as session:
            query = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(max(1, min(limit, 100_000)))
            if object_name:
                query = query.where(
                    or_(
                        AuditEntry.object_name == object_name,
                        AuditEntry.object_name.like(f"{like_escape(object_name)}:%", escape="\\"),
                    )
                )
            if user:
                query = query.where(AuditEntry.user == user)
            if operation:
                query = query.where(AuditEntry.operation == operation)
            if outcome:
                query = query.where(AuditEntry.outcome == AuditOutcome(outcome))
            if since:
                query = query.where(AuditEntry.at >= since)
            if search:
                pattern = like_contains(search)
                query = query.where(
                    or_(
                        AuditEntry.object_name.ilike(pattern, escape="\\"),
                        AuditEntry.operation.ilike(pattern, escape="\\"),
                        AuditEntry.user.ilike(pattern, escape="\\"),
                        AuditEntry.comment.ilike(pattern, escape="\\"),
                    )
                )
            return [
                AuditEntryInfo(
                    e.id, e.at, e.user, e.operation, e.object_type, e.object_name, e.change, e.comment, e.outcome
                )
                for e in session.scalars(query)
            ]

    def purge_expired(self, *, comment: str = "") -> int:
        """Delete audit entries older than the retention setting; the purge itself is audited."""
        with self._change(Operation.EDIT_SETTINGS, "audit.purge", "audit log", "retention", comment) as change:
            days = int(read_setting(change.session, "audit_retention_days"))
            cutoff = self._now() - timedelta(days=days)
            result = change.session.execute(delete(AuditEntry).where(AuditEntry.at < cutoff))
            deleted = int(getattr(result, "rowcount", 0) or 0)
            change.details = {"deleted": deleted, "retention_days": days}
            return deleted
