"""The retention job: ended tasks, audit entries and rotated log files older than their settings go, recent
ones and the log being written stay; each purge is audited as the system; a run with nothing to do leaves no
trace; what interrupted work left in the home goes once untouched for a day; ``layerctl maintenance run`` is for
Administrators."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pytest

from app.catalog.models import AuditEntry, AuditOutcome, Role, Task, TaskLogLine, TaskState, utcnow
from app.services import Services
from app.services.access import sign_in
from app.services.maintenance import run_maintenance, run_scheduled_maintenance
from tests.conftest import ServicesFactory
from tests.unit.test_cli import Ctl


def _age(services: Services) -> None:
    """Tasks ended 40 and 2 days ago, a running one started 40 days ago, audit entries of 400 and 10 days,
    rotated logs of 40 and 2 days, and the current log last written 40 days ago."""
    now = utcnow()
    with services.catalog.write() as session:
        for title, state, ended in (("old", TaskState.COMPLETE, now - timedelta(days=40)),
                                    ("recent", TaskState.FAILED, now - timedelta(days=2)),
                                    ("still running", TaskState.RUNNING, None)):
            task = Task(kind="test", title=title, state=state, started_by="admin", created_at=now - timedelta(days=41),
                        ended_at=ended)
            session.add(task)
            session.flush()
            session.add(TaskLogLine(task_id=task.id, at=now - timedelta(days=41), level="INFO", text=title))
        for days in (400, 10):
            session.add(AuditEntry(at=now - timedelta(days=days), user="admin", operation="layer.create",
                                   object_type="layer", object_name=f"{days} days", change={}, comment="",
                                   outcome=AuditOutcome.SUCCESS))
    logs = services.home.logs
    logs.mkdir(exist_ok=True)
    for name, days in (("layerdesk.log", 40), ("layerdesk.log.1", 2), ("layerdesk.log.2", 40),
                       ("layerdesk.log.3", 41), ("notes.txt", 400)):
        path = logs / name
        path.write_text(name)
        stamp = (now - timedelta(days=days)).timestamp()
        os.utime(path, (stamp, stamp))


def test_the_job_purges_what_is_old_and_keeps_what_is_recent(admin: Services) -> None:
    _age(admin)
    report = run_maintenance(admin.home, admin.catalog, admin.secrets)
    assert (report.tasks_deleted, report.audit_entries_deleted) == (1, 1)
    assert report.log_files_deleted == ("layerdesk.log.2", "layerdesk.log.3")
    assert sorted(t.title for t in admin.tasks.list_tasks()) == ["recent", "still running"]
    names = {e.object_name for e in admin.audit.list_entries()}
    assert "10 days" in names and "400 days" not in names
    assert sorted(p.name for p in admin.home.logs.iterdir()) == ["layerdesk.log", "layerdesk.log.1", "notes.txt"]
    purges = admin.audit.list_entries(user="system")
    assert sorted(e.operation for e in purges) == ["audit.purge", "logs.purge", "task.purge"]
    assert all(e.outcome is AuditOutcome.SUCCESS and e.comment in ("retention", "") for e in purges)

    again = run_maintenance(admin.home, admin.catalog, admin.secrets)
    assert (again.tasks_deleted, again.audit_entries_deleted, again.log_files_deleted) == (0, 0, ())
    assert len(admin.audit.list_entries(user="system")) == 3  # nothing to do: no new entries


def test_shorter_retention_settings_are_honoured(admin: Services) -> None:
    _age(admin)
    admin.settings.set("task_retention_days", 1)
    admin.settings.set("log_retention_days", 1)
    report = run_scheduled_maintenance(admin.home, admin.catalog, admin.secrets)
    assert report is not None and report.tasks_deleted == 2
    assert "layerdesk.log.1" in report.log_files_deleted


def test_layerctl_maintenance_run_is_for_administrators(
    services_for: ServicesFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    admin = services_for(Role.ADMINISTRATOR)
    _age(admin)
    ctl = Ctl(admin.home.root, capsys, monkeypatch)
    status, out, err = ctl("maintenance", "run")
    assert status == 0, err
    assert out.strip() == "Deleted 1 task(s), 1 audit entry, 2 old log file(s) and 0 leftover(s) of interrupted work."

    # signed in as an app layer manager: refused, nothing purged
    _age(admin)
    admin.access.create_account("keeper", "Keeper-pw-123!", [Role.ADMINISTRATOR])
    admin.access.create_account("ops", "Ops-pw-12345!", [Role.MANAGE_APP_LAYERS])
    admin.settings.set("require_sign_in", True)
    token, _caller = sign_in(admin.catalog, "ops", "Ops-pw-12345!", secrets=admin.secrets)
    admin.secrets.set("session", token)
    status, _out, err = ctl("maintenance", "run")
    assert status == 4 and "ops (Manage App Layers) may not cancel or purge tasks started by others" in err
    assert len(admin.tasks.list_tasks()) == 5


def _touch(path: Path, days: float) -> None:
    stamp = (utcnow() - timedelta(days=days)).timestamp()
    os.utime(path, (stamp, stamp), follow_symlinks=False)


def test_leftovers_of_interrupted_work_go_once_untouched_for_a_day(admin: Services) -> None:
    home = admin.home
    work = home.work
    old_packaging = work / "packaging-0a1b2c3d4e5f"
    old_packaging.mkdir(parents=True)
    (old_packaging / "Notes_1_packaging.vhdx").write_bytes(b"x" * 4096)
    old_fetch = work / "finalize-7-0a1b2c3d.vhdx"
    old_fetch.write_bytes(b"y" * 1024)
    busy = work / "packaging-ffeeddccbbaa"  # an old folder whose disk is still being written
    busy.mkdir()
    (busy / "Office_2_packaging.vhdx").write_bytes(b"z")
    fresh = work / "finalize-8-99887766.qcow2"
    fresh.write_bytes(b"w")
    old_restore = home.root / ".restore-12345678"
    old_restore.mkdir()
    (old_restore / "catalog.sqlite").write_bytes(b"c" * 100)
    for path in (old_packaging / "Notes_1_packaging.vhdx", old_packaging, old_fetch, busy,
                 old_restore / "catalog.sqlite", old_restore):
        _touch(path, 2)
    _touch(fresh, 0.5)

    report = run_maintenance(home, admin.catalog, admin.secrets)
    assert report.leftovers_deleted == (
        "work/finalize-7-0a1b2c3d.vhdx", "work/packaging-0a1b2c3d4e5f", ".restore-12345678")
    assert sorted(p.name for p in work.iterdir()) == ["finalize-8-99887766.qcow2", "packaging-ffeeddccbbaa"]
    assert home.catalog.is_file() and home.repository.is_dir()
    (entry,) = admin.audit.list_entries(operation="work.purge")
    assert entry.user == "system" and entry.change["bytes"] == 4096 + 1024 + 100
    assert entry.change["deleted"] == list(report.leftovers_deleted)
    assert run_maintenance(home, admin.catalog, admin.secrets).leftovers_deleted == ()
    assert len(admin.audit.list_entries(operation="work.purge")) == 1  # nothing to do: no new entry
