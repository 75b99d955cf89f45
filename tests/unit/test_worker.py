"""Subprocess tasks: the JSON-lines protocol with a real child process, cancel, and failures."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import psutil
import pytest

from app.catalog.maintenance import CatalogCheckResult, CatalogCheckTask
from app.catalog.models import Role, TaskState
from app.errors import UserError
from app.services import Services
from app.tasks.base import CancelToken, TaskCanceled
from app.tasks.runner import TaskRunner
from app.tasks.worker import SubprocessTask, call_worker, resolve
from tests.conftest import ServicesFactory


class ProbeWorkerTask(SubprocessTask):
    kind: ClassVar[str] = "test.worker"
    worker_module: ClassVar[str] = "tests.support.worker_entry"
    function: ClassVar[str] = "count"

    def __init__(self, function: str, **args: Any) -> None:
        super().__init__(f"worker {function}")
        self.function = function  # type: ignore[misc]
        self.args = args

    def arguments(self) -> dict[str, Any]:
        return self.args


@pytest.fixture
def runner(admin: Services) -> Iterator[TaskRunner]:
    runner = TaskRunner(admin.catalog, admin.caller)
    yield runner
    runner.shutdown()


def _run(runner: TaskRunner, admin: Services, task: SubprocessTask, timeout: float = 20) -> Any:
    task_id = runner.submit(task)
    runner.wait(task_id, timeout)
    return admin.tasks.get_task(task_id)


def test_progress_log_and_result_cross_from_the_child(runner: TaskRunner, admin: Services) -> None:
    task = _run(runner, admin, ProbeWorkerTask("count", to=5, secret="s3cr3t"))
    assert task.state is TaskState.COMPLETE and task.progress == 100
    assert task.result["data"] == {"summary": "counted to 5", "secret_seen": True}
    assert task.message == "counted to 5"
    lines = [line.text for line in admin.tasks.log(task.id)]
    assert lines == [f"did item {i}" for i in range(1, 6)] + ["a library printing to stdout"]


def test_layerdesk_log_records_in_the_child_reach_the_task_log(runner: TaskRunner, admin: Services) -> None:
    task = _run(runner, admin, ProbeWorkerTask("chatty"))
    assert task.state is TaskState.COMPLETE
    lines = [(line.level, line.text) for line in admin.tasks.log(task.id)]
    assert lines == [("INFO", "layer disk cache hit: 2-2-abc.ntfs"), ("WARNING", "wimlib: a warning")]


def test_arguments_travel_on_stdin_never_on_the_command_line(runner: TaskRunner, admin: Services) -> None:
    task_id = runner.submit(ProbeWorkerTask("forever", secret="s3cr3t"))
    try:
        deadline = time.monotonic() + 10
        child = None
        while child is None and time.monotonic() < deadline:
            for proc in psutil.Process().children(recursive=True):
                if "tests.support.worker_entry" in proc.cmdline():
                    child = proc
            time.sleep(0.05)
        assert child is not None, "the worker process started"
        assert not any("s3cr3t" in part for part in child.cmdline())
    finally:
        admin.tasks.cancel(task_id)
        runner.wait(task_id, 10)


def test_cancel_stops_the_child_within_a_second(runner: TaskRunner, admin: Services) -> None:
    task_id = runner.submit(ProbeWorkerTask("forever"))
    deadline = time.monotonic() + 10
    while not admin.tasks.log(task_id) and time.monotonic() < deadline:
        time.sleep(0.05)
    pid = int(admin.tasks.log(task_id)[0].text.split()[1])
    started = time.monotonic()
    admin.tasks.cancel(task_id)
    assert runner.wait(task_id, 10) is TaskState.CANCELED
    assert time.monotonic() - started < 1.0
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_a_result_that_comes_after_the_cancel_is_kept() -> None:
    """A child past its commit point (an import that has stored its version) finishes and answers even when
    the cancel reaches it: the work is kept, not reported as canceled and undone."""
    token = CancelToken()
    lines: list[tuple[str, str]] = []

    def log(text: str, level: str) -> None:
        lines.append((level, text))
        if text == "committed":
            token.cancel()

    data = call_worker("commit_then_linger", {}, token, log=log, module="tests.support.worker_entry")
    assert data == {"summary": "kept", "terminated": True}
    assert lines == [("INFO", "committed"),
                     ("WARNING", "The cancel came after the work had finished; the result is kept.")]


def test_a_cancel_before_the_result_raises_task_canceled() -> None:
    token = CancelToken()

    def log(text: str, level: str) -> None:
        token.cancel()

    with pytest.raises(TaskCanceled):
        call_worker("forever", {}, token, log=log, module="tests.support.worker_entry")


@pytest.mark.parametrize(
    ("function", "error"),
    [
        ("refuse", "That layer disk is not NTFS."),
        ("bug", "Internal error in LayerDesk: WorkerBug: ZeroDivisionError: division by zero"),
        ("die", "The worker process for 'worker die' failed: out of memory"),
    ],
)
def test_failures_in_the_child_fail_the_task_with_a_clear_message(
    runner: TaskRunner, admin: Services, function: str, error: str
) -> None:
    task = _run(runner, admin, ProbeWorkerTask(function))
    assert task.state is TaskState.FAILED
    assert task.error.startswith(error)
    if function == "bug":
        assert any("ZeroDivisionError" in line.text for line in admin.tasks.log(task.id))


def test_only_layerdesk_functions_can_be_named() -> None:
    with pytest.raises(UserError, match="not a LayerDesk worker function"):
        resolve("os:system")
    with pytest.raises(UserError, match="not a LayerDesk worker function"):
        resolve("app.catalog.maintenance:CatalogCheckResultX")
    assert resolve("app.catalog.maintenance:check_catalog").__name__ == "check_catalog"


def test_catalog_check_task_on_a_healthy_catalog(runner: TaskRunner, lab: Services) -> None:
    task = _run(runner, lab, CatalogCheckTask(lab.catalog.path))
    assert task.state is TaskState.COMPLETE, task.error
    assert task.result["type"] == CatalogCheckResult.__name__
    assert task.result["problems"] == [] and task.result["size_bytes"] > 0


def test_catalog_check_task_reports_damage(tmp_path: Path, runner: TaskRunner, admin: Services) -> None:
    damaged = tmp_path / "damaged.sqlite"
    conn = sqlite3.connect(damaged)
    conn.executescript("PRAGMA foreign_keys = OFF; CREATE TABLE parent (id INTEGER PRIMARY KEY);"
                       "CREATE TABLE child (id INTEGER PRIMARY KEY, parent_id REFERENCES parent(id));"
                       "INSERT INTO child VALUES (1, 42);")
    conn.close()
    task = _run(runner, admin, CatalogCheckTask(damaged))
    assert task.state is TaskState.DONE_WITH_ERRORS
    assert task.result["problems"] == ["child row 1 refers to a missing parent"]


def test_catalog_check_of_a_missing_or_garbage_file(tmp_path: Path, runner: TaskRunner, admin: Services) -> None:
    missing = _run(runner, admin, CatalogCheckTask(tmp_path / "nope.sqlite"))
    assert missing.state is TaskState.FAILED and "There is no catalog file" in missing.error
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"\x00garbage" * 1000)
    failed = _run(runner, admin, CatalogCheckTask(garbage))
    assert failed.state is TaskState.FAILED and "cannot be read" in failed.error


def test_read_only_callers_cannot_start_tasks(services_for: ServicesFactory) -> None:
    reader = services_for(Role.READ_ONLY)
    runner = TaskRunner(reader.catalog, reader.caller)
    try:
        with pytest.raises(Exception, match="may not run tasks"):
            runner.submit(CatalogCheckTask(reader.catalog.path))
    finally:
        runner.shutdown()


def test_a_publish_worker_starts_without_the_catalog() -> None:
    """The child process of a publish imports the worker and the engine only: neither SQLAlchemy nor the task
    runner (they made every task's child process 0.3–0.5 s slower to start)."""
    probe = ("import sys, app.tasks.worker, app.engine.compose\n"
             "print(sorted(m for m in sys.modules if m.startswith(('sqlalchemy', 'app.catalog', 'app.tasks.runner',"
             " 'app.services'))))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"
    assert TaskState.COMPLETE.is_final and not TaskState.RUNNING.is_final  # re-exported by the catalog's models
