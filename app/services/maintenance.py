"""Retention as a periodic job: ended tasks, audit entries and rotated log files older than their
retention settings (``task_retention_days``, ``audit_retention_days``, ``log_retention_days``) go, and so do
the leftovers of work that a crash or a power cut interrupted (untouched for a day): the home's work folder
(packaging disks on their way to a connector, disks fetched back to be finalized) and a restore's staging
copy (``.restore-…``) that was never completed or discarded.

:func:`run_maintenance` runs at console start-up and every few hours while the console runs, and from
``layerctl maintenance run``. It acts as the *system* (an Administrator caller named ``system``), so each
purge is audited under that name whoever is signed in; a purge with nothing to delete is not run (and
leaves no audit entry), so the audit log is not filled with empty purges.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from sqlalchemy import func, select

from app.catalog.database import Catalog
from app.catalog.models import FINAL_TASK_STATES, AuditEntry, PrincipalKind, Role, Task
from app.errors import LayerDeskError
from app.logs import LOG_FILE
from app.paths import Home
from app.secrets import SecretStore
from app.services.audit import AuditService
from app.services.backup import RESTORE_STAGING_PREFIX
from app.services.base import Service, ServiceContext
from app.services.rbac import Caller
from app.services.settings import read_setting
from app.services.tasks import TaskService

log = logging.getLogger(__name__)

#: Who the periodic job acts as (in the audit log).
SYSTEM = Caller("system", frozenset({Role.ADMINISTRATOR}), PrincipalKind.OS_USER, display_name="LayerDesk")
#: How often the console runs the job.
INTERVAL_HOURS = 6
#: Rotated log files: ``layerdesk.log.1`` … (the file being written, ``layerdesk.log``, is never deleted).
_ROTATED = re.compile(re.escape(LOG_FILE) + r"\.\d+")
#: Work left behind is removed once nothing in it has changed for this long: no task writes for a day
#: without touching its files.
STALE_AFTER = timedelta(days=1)


@dataclass(frozen=True)
class MaintenanceReport:
    """What one run deleted."""

    tasks_deleted: int
    audit_entries_deleted: int
    log_files_deleted: tuple[str, ...]
    #: Interrupted work removed: paths relative to the home.
    leftovers_deleted: tuple[str, ...] = ()


class _LogRetention(Service):
    """Deletes rotated log files older than ``log_retention_days`` (audited as one change)."""

    def purge_logs(self, logs: Path) -> list[str]:
        with self.catalog.read() as session:
            days = int(read_setting(session, "log_retention_days"))
        cutoff = (self._now() - timedelta(days=days)).timestamp()
        old = sorted(p for p in logs.iterdir() if _ROTATED.fullmatch(p.name) and p.is_file()
                     and p.stat().st_mtime < cutoff) if logs.is_dir() else []
        if not old:
            return []
        deleted: list[str] = []
        with self._change(None, "logs.purge", "log files", "retention", "") as change:
            for path in old:
                try:
                    path.unlink()
                    deleted.append(path.name)
                except OSError as exc:
                    log.warning("cannot delete the old log file %s: %s", path, exc)
            change.details = {"deleted": deleted, "retention_days": days}
        return deleted


class _Leftovers(Service):
    """Deletes what interrupted work left in the home (audited as one change)."""

    def purge(self, home: Home) -> list[str]:
        cutoff = (self._now() - STALE_AFTER).timestamp()
        try:
            candidates = sorted(home.work.iterdir()) if home.work.is_dir() else []
            if home.root.is_dir():
                candidates += sorted(p for p in home.root.iterdir()
                                     if p.name.startswith(RESTORE_STAGING_PREFIX) and p.is_dir())
        except OSError as exc:  # an unreadable home: the next run tries again
            log.warning("cannot look for leftovers of interrupted work in %s: %s", home.root, exc)
            return []
        stale = [p for p in candidates if _last_change(p) < cutoff]
        if not stale:
            return []
        deleted: list[str] = []
        freed = 0
        with self._change(None, "work.purge", "interrupted work", "leftovers", "") as change:
            for path in stale:
                size = _size(path)
                try:
                    if path.is_dir() and not path.is_symlink():
                        shutil.rmtree(path)
                    else:
                        path.unlink()
                except OSError as exc:
                    log.warning("cannot delete the leftover %s: %s", path, exc)
                    continue
                deleted.append(path.relative_to(home.root).as_posix())
                freed += size
            change.details = {"deleted": deleted, "bytes": freed}
        return deleted


def _last_change(path: Path) -> float:
    """The newest modification time of ``path`` and, for a folder, of everything in it."""
    try:
        newest = path.lstat().st_mtime
    except OSError:
        return float("inf")  # gone meanwhile, or unreadable: left alone
    if path.is_dir() and not path.is_symlink():
        for folder, dirnames, filenames in os.walk(path):
            for name in (*dirnames, *filenames):
                try:
                    newest = max(newest, (Path(folder) / name).lstat().st_mtime)
                except OSError:
                    return float("inf")
    return newest


def _size(path: Path) -> int:
    if not path.is_dir() or path.is_symlink():
        try:
            return path.lstat().st_size
        except OSError:
            return 0
    total = 0
    for folder, _dirnames, filenames in os.walk(path):
        for name in filenames:
            with contextlib.suppress(OSError):
                total += (Path(folder) / name).lstat().st_size
    return total


def run_maintenance(home: Home, catalog: Catalog, secrets: SecretStore) -> MaintenanceReport:
    """Purge expired tasks, audit entries and rotated log files of ``home``, as the system; return what went."""
    ctx = ServiceContext(catalog=catalog, caller=SYSTEM, secrets=secrets)
    now = ctx.clock()
    with catalog.read() as session:
        task_cutoff = now - timedelta(days=int(read_setting(session, "task_retention_days")))
        audit_cutoff = now - timedelta(days=int(read_setting(session, "audit_retention_days")))
        expired_tasks = session.scalar(select(func.count(Task.id)).where(
            Task.state.in_(FINAL_TASK_STATES), Task.ended_at < task_cutoff)) or 0
        expired_audit = session.scalar(select(func.count(AuditEntry.id)).where(AuditEntry.at < audit_cutoff)) or 0
    tasks = TaskService(ctx).purge_expired(comment="retention") if expired_tasks else 0
    audit = AuditService(ctx).purge_expired(comment="retention") if expired_audit else 0
    logs = _LogRetention(ctx).purge_logs(home.logs)
    leftovers = _Leftovers(ctx).purge(home)
    report = MaintenanceReport(tasks, audit, tuple(logs), tuple(leftovers))
    log.info("maintenance: deleted %d task(s), %d audit entr(y/ies), %d log file(s), %d leftover(s) of "
             "interrupted work", tasks, audit, len(logs), len(leftovers))
    return report


def run_scheduled_maintenance(home: Home, catalog: Catalog, secrets: SecretStore) -> MaintenanceReport | None:
    """:func:`run_maintenance` for the console's timer: a problem (a busy catalog, a full disk) is logged and
    the job runs again next time, instead of interrupting the administrator."""
    try:
        return run_maintenance(home, catalog, secrets)
    except LayerDeskError as exc:
        log.warning("maintenance did not run: %s", exc)
        return None
