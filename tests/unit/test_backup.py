"""``layerctl backup`` / ``restore`` on a real home (the demo lab, imported for real): a backup taken while
a publish runs restores into another home with the same catalog rows and repository files; content stored
after the snapshot stays out; a damaged byte, a newer schema, a running task or a full disk are refused with
one clear message and leave the home (or the backup's place) exactly as it was."""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from app.catalog.migrations import SCHEMA_VERSION
from app.catalog.models import AuditOutcome, LayerType, LayerVersion, Role, TaskState
from app.engine.repository import CaptureSource, LayerRepository, SourceKind
from app.engine.wim import Wim
from app.errors import CatalogError, Conflict, EnvironmentProblem, PermissionDenied
from app.paths import Home
from app.services import Services, open_catalog
from app.services.backup import (
    CATALOG_FILE,
    MANIFEST_FILE,
    RESTORED_INTERRUPTED,
    BackupTask,
    backup_service,
    read_manifest,
    seal_manifest,
)
from app.tasks.base import CancelToken, LayerDeskTask, TaskCanceled, TaskContext, TaskResult
from app.tasks.runner import TaskRunner
from tests.conftest import ADMIN, ServicesFactory, demo_lab
from tests.support.repository_checks import make_tree
from tests.support.tools import small_filesystem
from tests.unit.test_cli import Ctl

#: Tables whose rows a publish running during the backup does not change.
STABLE_TABLES = ("layer", "layer_version", "image_template", "template_app_layer", "template_revision", "setting")


@pytest.fixture
def runner(admin: Services) -> Iterator[TaskRunner]:
    task_runner = TaskRunner(admin.catalog, admin.caller)
    yield task_runner
    task_runner.shutdown()


@pytest.fixture
def demo(admin: Services, demo_lab_template: Path) -> Services:
    return demo_lab(admin, demo_lab_template)


def rows(catalog: Path, table: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{catalog}?mode=ro", uri=True)
    try:
        return list(conn.execute(f'SELECT * FROM "{table}" ORDER BY 1'))
    finally:
        conn.close()


def tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` → its SHA-256 (lock files aside: they come and go with work)."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.name.endswith(".lock")}


def home_state(home: Home) -> tuple[dict[str, list[tuple[Any, ...]]], dict[str, str]]:
    """The home's catalog rows (every table) and repository files."""
    conn = sqlite3.connect(f"file:{home.catalog}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table' "
                                             "AND name NOT LIKE 'sqlite_%'")]
    finally:
        conn.close()
    return {t: rows(home.catalog, t) for t in tables}, tree(home.repository)


def wait_ok(runner: TaskRunner, services: Services, task_id: int) -> dict[str, Any]:
    assert runner.wait(task_id, 120) is TaskState.COMPLETE, services.tasks.get_task(task_id).error
    return dict(services.tasks.get_task(task_id).result or {})


def wait_for_state(services: Services, task_id: int, state: TaskState, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while services.tasks.get_task(task_id).state is not state:
        assert time.monotonic() < deadline, services.tasks.get_task(task_id)
        time.sleep(0.02)


class Waiting(LayerDeskTask):
    """A real task that runs until cancelled (something running in the home)."""

    kind: ClassVar[str] = "test.waiting"

    def run(self, ctx: TaskContext) -> TaskResult:
        ctx.cancel.wait(60)
        ctx.cancel.raise_if_cancelled()
        return TaskResult()


class CancelOnProgress(TaskContext):
    """Runs a task outside a runner and cancels it at its first progress past ``at`` %."""

    def __init__(self, at: float) -> None:
        self.cancel = CancelToken()
        self.at = at
        self.lines: list[str] = []

    def progress(self, percent: float, message: str = "") -> None:
        if percent > self.at:
            self.cancel.cancel()

    def log(self, text: str, level: str = "INFO") -> None:
        self.lines.append(text)


def _second_home(tmp_path: Path, name: str = "other") -> tuple[Home, Services, TaskRunner]:
    home = Home(tmp_path / name).ensure()
    catalog, secrets = open_catalog(home)
    services = Services.for_caller(home, catalog, ADMIN, secrets)
    return home, services, TaskRunner(catalog, ADMIN)


@contextlib.contextmanager
def other_home(tmp_path: Path, name: str = "other") -> Iterator[tuple[Home, Services, TaskRunner]]:
    home, services, task_runner = _second_home(tmp_path, name)
    try:
        yield home, services, task_runner
    finally:
        task_runner.shutdown()
        services.catalog.close()


def restore(services: Services, task_runner: TaskRunner, source: Path) -> Any:
    service = backup_service(services)
    task = service.restore(task_runner, source)
    staged = wait_ok(task_runner, services, task)
    return service.complete_restore(staged["staging"])


# --- backup and restore, the good path ------------------------------------------------------------------


def test_a_backup_taken_while_a_publish_runs_restores_into_another_home(
    demo: Services, runner: TaskRunner, tmp_path: Path,
) -> None:
    home = demo.home
    publish = demo.publishing.publish(runner, "Demo-Desktop", tmp_path / "published")
    wait_for_state(demo, publish, TaskState.RUNNING)
    target = tmp_path / "backups" / "monday"
    target.parent.mkdir()
    task = backup_service(demo).backup(runner, target, comment="before patch day")
    result = wait_ok(runner, demo, task)
    publish_info = demo.tasks.get_task(publish)
    backup_info = demo.tasks.get_task(task)
    assert backup_info.started_at is not None
    assert publish_info.started_at is not None and publish_info.started_at <= backup_info.started_at
    assert publish_info.ended_at is None or publish_info.ended_at > backup_info.started_at, \
        "the publish had ended before the backup started: it did not run during the backup"
    assert runner.wait(publish, 120) is TaskState.COMPLETE, demo.tasks.get_task(publish).error

    assert result["path"] == str(target) and result["layer_versions"] == 5
    assert not [p for p in target.parent.iterdir() if p.name != "monday"]  # no work folder left
    manifest, _checksum = read_manifest(target)
    assert manifest["schema_version"] == SCHEMA_VERSION and manifest["created_by"] == "admin"
    assert set(manifest["files"]) == {p.relative_to(target).as_posix() for p in target.rglob("*")
                                      if p.is_file() and p.name != MANIFEST_FILE}
    (entry,) = demo.audit.list_entries(operation="home.backup")
    assert (entry.object_name, entry.comment, entry.outcome) == (str(target), "before patch day",
                                                                  AuditOutcome.SUCCESS)

    with other_home(tmp_path) as (other, services, other_runner):
        report = restore(services, other_runner, target)
        assert report.schema_now == SCHEMA_VERSION and report.other_installation
        assert any("keyring" in note for note in report.notes)
        for table in STABLE_TABLES:
            assert rows(other.catalog, table) == rows(home.catalog, table), table
        assert tree(other.repository) == tree(home.repository)
        check = services.repository.check()
        assert check.ok and check.stored_versions == 5, check.problems
        for unfinished in (publish, task):  # they ran when the backup was made, not in the restored home
            info = services.tasks.get_task(unfinished)
            assert (info.state, info.error) == (TaskState.FAILED, RESTORED_INTERRUPTED)
        assert [e.operation for e in services.audit.list_entries(operation="home.restore")] == ["home.restore"]
        # the restored home publishes
        published = services.publishing.publish(other_runner, "Demo-Desktop", tmp_path / "published-other")
        assert other_runner.wait(published, 120) is TaskState.COMPLETE, services.tasks.get_task(published).error


def test_content_stored_after_the_snapshot_stays_out_of_the_backup(
    demo: Services, runner: TaskRunner, tmp_path: Path,
) -> None:
    """An import whose content is stored but not yet committed in the catalog when the snapshot is taken: the
    backup holds the catalog as it was (version without content) and no image for that version."""
    version = demo.layers.add_version("Demo-Tools", "2.0")
    with demo.catalog.read() as session:
        row = session.get(LayerVersion, version.id)
        assert row is not None and row.checksum is None
        layer_id = row.layer_id
    repository = LayerRepository(demo.home.repository)
    repository.store_version(layer_id, version.id, CaptureSource(
        SourceKind.FOLDER, make_tree(tmp_path / "late", {"Program Files/Late/late.txt": b"stored later"})))
    with Wim.open(repository.wim_path(layer_id)) as wim:
        assert wim.image_count == 2
    target = tmp_path / "backup"
    wait_ok(runner, demo, backup_service(demo).backup(runner, target))
    (kept,) = [v for v in read_manifest(target)[0]["files"] if v.startswith(f"repository/layers/{layer_id}/")]
    with Wim.open(target / "repository" / "layers" / f"{layer_id}.wim", check_integrity=True) as wim:
        assert [wim.image_name(i) for i in range(1, wim.image_count + 1)] == [Path(kept).stem]
    assert not (target / "repository" / "layers" / str(layer_id) / f"v{version.id}.json").exists()
    with other_home(tmp_path) as (_other, services, other_runner):
        restore(services, other_runner, target)
        check = services.repository.check()
        assert check.ok, check.problems


def test_only_an_administrator_may_back_up_and_the_refusal_is_audited(
    demo: Services, services_for: ServicesFactory, tmp_path: Path,
) -> None:
    publisher = services_for(Role.PUBLISH_LAYERED_IMAGES, Role.MANAGE_APP_LAYERS)
    task_runner = TaskRunner(publisher.catalog, publisher.caller)
    try:
        with pytest.raises(PermissionDenied) as caught:
            backup_service(publisher).backup(task_runner, tmp_path / "b")
        assert "back up or restore the LayerDesk home" in str(caught.value)
        assert "Administrator" in str(caught.value)
    finally:
        task_runner.shutdown()
    (entry,) = demo.audit.list_entries(operation="home.backup")
    assert entry.outcome is AuditOutcome.DENIED
    assert not (tmp_path / "b").exists()


# --- a backup that does not finish leaves nothing ----------------------------------------------------------


def test_a_cancelled_backup_leaves_nothing(demo: Services, tmp_path: Path) -> None:
    place = tmp_path / "place"
    place.mkdir()
    service = backup_service(demo)
    task = BackupTask(service, service.backup_target(place / "b"), "")
    ctx = CancelOnProgress(at=5)
    with pytest.raises(TaskCanceled):
        task.run(ctx)
    assert ctx.cancel.cancelled
    assert list(place.iterdir()) == []
    assert demo.audit.list_entries(operation="home.backup") == []



@pytest.mark.parametrize("room", ["none for the catalog", "the catalog but not the layers"])
def test_a_full_disk_during_the_backup_says_so_and_leaves_nothing(
    demo: Services, runner: TaskRunner, tmp_path: Path, room: str,
) -> None:
    measured = tmp_path / "measured"
    wait_ok(runner, demo, backup_service(demo).backup(runner, measured))
    snapshot_kb = (measured / CATALOG_FILE).stat().st_size // 1024
    kilobytes = 64 if room.startswith("none") else snapshot_kb + 8
    with small_filesystem(tmp_path / "small", f"{kilobytes}k") as small:
        task = backup_service(demo).backup(runner, small / "b")
        assert runner.wait(task, 60) is TaskState.FAILED
        error = demo.tasks.get_task(task).error
        assert error is not None and f"The disk holding {small} is full" in error, error
        assert "nothing was left there" in error
        assert list(small.iterdir()) == []
    check = demo.repository.check()
    assert check.ok, check.problems


# --- restore refuses what it cannot trust, and leaves the home untouched -----------------------------------


@pytest.fixture
def backup(demo: Services, runner: TaskRunner, tmp_path: Path) -> Path:
    target = tmp_path / "backup"
    wait_ok(runner, demo, backup_service(demo).backup(runner, target))
    return target


def _reseal(backup_folder: Path, **changes: Any) -> None:
    """Recompute the manifest of a backup whose files a test changed on purpose (as a newer LayerDesk would
    have written them), so only what the test means to show is wrong."""
    document, _ = read_manifest(backup_folder)
    for name in document["files"]:
        data = (backup_folder / name).read_bytes()
        document["files"][name] = {"sha256": "sha256:" + hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    document.update(changes)
    (backup_folder / MANIFEST_FILE).write_bytes(seal_manifest(document))


def _restore_refused(tmp_path: Path, source: Path, name: str = "target") -> str:
    """Restore ``source`` into a lab home and return the refusal; the home must be exactly as before."""
    with other_home(tmp_path, name) as (home, services, task_runner):
        services.layers.create_layer("Kept", LayerType.OS)
        before = home_state(home)
        service = backup_service(services)
        message = ""
        try:
            task = service.restore(task_runner, source)
        except (CatalogError, EnvironmentProblem, Conflict) as refused:
            message = str(refused)
        else:
            assert task_runner.wait(task, 60) is TaskState.FAILED
            message = services.tasks.get_task(task).error or ""
        after = home_state(home)
        # the refused restore's own task is the only change
        after[0].pop("task"), before[0].pop("task"), after[0].pop("task_log_line"), before[0].pop("task_log_line")
        assert after == before
        assert not any(p.name.startswith(".restore-") for p in home.root.iterdir())
        return message


def test_restore_refuses_a_backup_with_one_damaged_byte_and_names_the_file(backup: Path, tmp_path: Path) -> None:
    wim = backup / "repository" / "layers" / "1.wim"
    data = bytearray(wim.read_bytes())
    data[len(data) // 2] ^= 0x01
    wim.write_bytes(bytes(data))
    message = _restore_refused(tmp_path, backup)
    assert "is damaged: repository/layers/1.wim does not match its checksum" in message, message
    assert "Nothing was changed" in message


def test_restore_refuses_a_damaged_manifest(backup: Path, tmp_path: Path) -> None:
    manifest = backup / MANIFEST_FILE
    manifest.write_bytes(manifest.read_bytes().replace(b'"created_by": "admin"', b'"created_by": "admim"'))
    message = _restore_refused(tmp_path, backup)
    assert "manifest" in message and "does not match its checksum" in message, message


def test_restore_refuses_a_backup_from_a_newer_schema(backup: Path, tmp_path: Path) -> None:
    conn = sqlite3.connect(backup / CATALOG_FILE)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    _reseal(backup)  # the manifest still says the old schema: the catalog itself is checked
    message = _restore_refused(tmp_path, backup)
    assert f"was made by a newer LayerDesk (catalog schema {SCHEMA_VERSION + 1}" in message, message
    assert "Nothing was changed" in message
    _reseal(backup, schema_version=SCHEMA_VERSION + 1)  # refused at once, before anything is copied
    message = _restore_refused(tmp_path, backup, "target2")
    assert f"catalog schema {SCHEMA_VERSION + 1}; this version understands up to {SCHEMA_VERSION}" in message


def test_restore_migrates_a_backup_of_an_older_schema(backup: Path, tmp_path: Path) -> None:
    old = Path(__file__).parents[1] / "data" / "catalogs" / "schema1.sqlite"
    if SCHEMA_VERSION == 1:
        pytest.skip("no older schema yet")
    (backup / CATALOG_FILE).write_bytes(old.read_bytes())
    for layer_file in (backup / "repository").rglob("*"):  # that catalog stores no layer content
        if layer_file.is_file():
            layer_file.unlink()
    document, _ = read_manifest(backup)
    data = old.read_bytes()
    document["files"] = {CATALOG_FILE: {"sha256": "sha256:" + hashlib.sha256(data).hexdigest(), "bytes": len(data)}}
    document["schema_version"] = 1
    (backup / MANIFEST_FILE).write_bytes(seal_manifest(document))
    with other_home(tmp_path) as (other, services, task_runner):
        report = restore(services, task_runner, backup)
        assert (report.schema_from, report.schema_now) == (1, SCHEMA_VERSION)
        conn = sqlite3.connect(other.catalog)
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        conn.close()


def test_restore_is_refused_while_a_task_runs(backup: Path, tmp_path: Path) -> None:
    with other_home(tmp_path, "busy") as (home, services, task_runner):
        waiting = task_runner.submit(Waiting("Waits for a cancel"))
        wait_for_state(services, waiting, TaskState.RUNNING)
        before = home_state(home)
        with pytest.raises(Conflict) as caught:
            backup_service(services).restore(task_runner, backup)
        assert f"Task {waiting} (Waits for a cancel) is still running" in str(caught.value)
        assert "Nothing was changed" in str(caught.value)
        assert home_state(home) == before
        services.tasks.cancel(waiting)
        assert task_runner.wait(waiting, 10) is TaskState.CANCELED
        restore(services, task_runner, backup)
        assert services.repository.check().ok


def test_layerctl_backup_and_restore(demo: Services, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    source = Ctl(demo.home.root, capsys, monkeypatch)
    place = tmp_path / "backups"
    place.mkdir()
    result = source.json("backup", "--to", str(place))
    assert isinstance(result, dict)
    made = Path(result["path"])
    assert made.parent == place and made.name.startswith("layerdesk-backup-")
    status, _out, err = source("backup", "--to", str(made))
    assert status == 6 and "holds a backup already" in err

    target = Ctl(tmp_path / "restored", capsys, monkeypatch)
    assert target("init")[0] == 0
    status, out, err = target("restore", "--from", str(made))
    assert status == 0, err
    assert f"Restored the catalog and layer repository from {made}" in out
    assert "passwords are kept in the OS keyring" in out and "enter them again" in out
    status, out, _ = target("repo", "check")
    assert status == 0 and "healthy (5 stored version(s) checked)" in out
    status, _out, err = target("restore", "--from", str(tmp_path))
    assert status == 3 and "is not a LayerDesk backup" in err
