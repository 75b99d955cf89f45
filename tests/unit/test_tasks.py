"""The task runner (app.tasks), the task service (app.services.tasks) and external programs (app.procs).

Tasks run in real worker threads against a real SQLite catalog; nothing is mocked. Waits are
wait-for-condition with a deadline, never fixed sleeps.
"""

from __future__ import annotations

import math
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest
from sqlalchemy import event, func, select

from app import procs
from app.catalog.database import Catalog
from app.catalog.models import AuditOutcome, Role, Task, TaskLogLine, TaskState, utcnow
from app.errors import Conflict, EnvironmentProblem, PermissionDenied, UserError
from app.paths import Home
from app.services import Services
from app.services.rbac import Caller
from app.services.tasks import INTERRUPTED, recover_interrupted
from app.tasks.base import CancelToken, LayerDeskTask, TaskContext, TaskResult
from app.tasks.runner import TaskEvent, TaskRunner, process_owner

PROJECT_ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")


# --- helpers ----------------------------------------------------------------------------------------


def wait_for(condition: Callable[[], T], *, timeout_s: float = 5.0, what: str = "the condition") -> T:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.005)


def hold(gate: threading.Event, ctx: TaskContext) -> None:
    """Block a task until ``gate`` opens, honouring cancellation as a task must."""
    while not gate.wait(0.01):
        ctx.cancel.raise_if_cancelled()


Body = Callable[[TaskContext], Any]


class FnTask(LayerDeskTask):
    """A task whose work is a function given by the test."""

    kind = "test.fn"

    def __init__(
        self,
        body: Body | None = None,
        *,
        title: str = "test task",
        prepare: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(title)
        self._body = body or (lambda ctx: TaskResult("done"))
        self._prepare = prepare
        self.ran = threading.Event()

    def prepare(self) -> None:
        if self._prepare is not None:
            self._prepare()

    def run(self, ctx: TaskContext) -> TaskResult:
        self.ran.set()
        return self._body(ctx)  # type: ignore[no-any-return]


class OtherTask(FnTask):
    kind = "test.other"


def blocking(gate: threading.Event, *, before: Body | None = None) -> Body:
    def body(ctx: TaskContext) -> TaskResult:
        if before is not None:
            before(ctx)
        hold(gate, ctx)
        return TaskResult("released")

    return body


@dataclass(frozen=True)
class CopyResult(TaskResult):
    files: int = 0
    names: tuple[str, ...] = ()


RunnerFactory = Callable[..., TaskRunner]


@pytest.fixture
def runners(services_for: Callable[..., Services]) -> Iterator[RunnerFactory]:
    """``runners(services, **options)`` → a TaskRunner for that caller, shut down after the test
    (before the catalog closes: this fixture depends on ``services_for``)."""
    made: list[TaskRunner] = []

    def make(services: Services, **options: Any) -> TaskRunner:
        runner = TaskRunner(services.catalog, services.caller, **options)
        made.append(runner)
        return runner

    yield make
    for runner in made:
        runner.shutdown(cancel=True, timeout_s=5)


@pytest.fixture
def other_process(home: Home, admin: Services) -> Iterator[Callable[[Caller], Services]]:
    """Services on a second, independent connection to the catalog file – as ``layerctl`` in
    another process would have."""
    catalog = Catalog(home.catalog, backups=home.backups)
    try:
        yield lambda caller: Services.for_caller(home, catalog, caller, admin.secrets)
    finally:
        catalog.close()


def state_of(services: Services, task_id: int) -> TaskState:
    return services.tasks.get_task(task_id).state


def log_texts(services: Services, task_id: int) -> list[str]:
    return [line.text for line in services.tasks.log(task_id)]


def insert_task(services: Services, *, state: TaskState, owner: str | None, **fields: Any) -> int:
    with services.catalog.write() as session:
        row = Task(
            kind="test.raw", title="inserted", state=state, started_by="admin", owner=owner,
            created_at=fields.pop("created_at", utcnow()), **fields,
        )
        session.add(row)
        session.flush()
        return row.id


def dead_pid() -> int:
    """A pid no process can have: above the kernel's pid_max."""
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    with pytest.raises(psutil.NoSuchProcess):
        psutil.Process(pid_max + 1)
    return pid_max + 1


# --- the task package itself ----------------------------------------------------------------------------


def test_the_task_package_imports_on_its_own() -> None:
    # A worker process or a script may import app.tasks before anything else.
    for module in ("app.tasks", "app.tasks.runner", "app.tasks.base"):
        result = subprocess.run(
            [sys.executable, "-c", f"import {module}"],
            cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60, check=False,
        )
        assert result.returncode == 0, f"import {module} failed:\n{result.stderr}"


# --- progress, log, results ---------------------------------------------------------------------------


def test_progress_and_log_lines_reach_the_catalog_while_the_task_runs(
    admin: Services, runners: RunnerFactory
) -> None:
    runner = runners(admin)
    gate = threading.Event()

    def report(ctx: TaskContext) -> None:
        ctx.progress(40, "copying files")
        ctx.log("first line")
        ctx.log("second line", "warning")

    task_id = runner.submit(FnTask(blocking(gate, before=report), title="copy"))

    # While the task is still busy (and silent), what it reported is in the catalog.
    wait_for(
        lambda: (info := admin.tasks.get_task(task_id)).progress == 40 and info.message == "copying files",
        timeout_s=2, what="the progress",
    )
    wait_for(lambda: len(admin.tasks.log(task_id)) == 2, timeout_s=2, what="both log lines")
    lines = admin.tasks.log(task_id)
    assert [(line.level, line.text) for line in lines] == [("INFO", "first line"), ("WARNING", "second line")]
    assert state_of(admin, task_id) is TaskState.RUNNING

    gate.set()
    assert runner.wait(task_id, timeout_s=5) is TaskState.COMPLETE
    info = admin.tasks.get_task(task_id)
    assert info.progress == 100
    assert info.message == "released"
    assert info.started_by == "admin"
    assert info.kind == "test.fn"
    assert info.title == "copy"
    assert info.started_at is not None and info.ended_at is not None
    assert info.created_at <= info.started_at <= info.ended_at
    assert log_texts(admin, task_id) == ["first line", "second line"]


def test_progress_and_log_writes_are_throttled(admin: Services, runners: RunnerFactory) -> None:
    runner = runners(admin)
    spent: list[float] = []

    def chatty(ctx: TaskContext) -> TaskResult:
        started = time.monotonic()
        for i in range(10_000):
            ctx.progress(i / 100, f"item {i}")
        for i in range(2_000):
            ctx.log(f"line {i}")
        spent.append(time.monotonic() - started)
        return TaskResult("chatted")

    commits: list[float] = []

    def on_commit(_conn: Any) -> None:
        commits.append(time.monotonic())

    engine = admin.catalog.write_engine
    event.listen(engine, "commit", on_commit)
    try:
        task_id = runner.submit(FnTask(chatty))
        assert runner.wait(task_id, timeout_s=30) is TaskState.COMPLETE
    finally:
        event.remove(engine, "commit", on_commit)

    # 12,000 reports; the writes are: submit, start, the throttled flushes (the first report, then
    # about one per progress interval – the worker and the cancel watcher may race for one now and
    # then, hence the factor 2), the final flush and the final state.
    intervals = math.ceil(spent[0] / runner.progress_interval_s)
    allowed = 5 + 2 * intervals
    assert len(commits) <= allowed, f"{len(commits)} catalog writes for 12,000 reports in {spent[0]:.2f} s"
    assert len(commits) < 100
    # Throttled, yet nothing lost: every log line is there, in order.
    with admin.catalog.read() as session:
        texts = session.scalars(
            select(TaskLogLine.text).where(TaskLogLine.task_id == task_id).order_by(TaskLogLine.id)
        ).all()
    assert texts == [f"line {i}" for i in range(2_000)]
    assert admin.tasks.get_task(task_id).progress == 100


def test_a_typed_result_is_stored_as_json_with_its_type_name(admin: Services, runners: RunnerFactory) -> None:
    runner = runners(admin)
    task_id = runner.submit(FnTask(lambda ctx: CopyResult("copied 2 files", files=2, names=("a.vhdx", "b.vhdx"))))
    assert runner.wait(task_id, timeout_s=5) is TaskState.COMPLETE
    info = admin.tasks.get_task(task_id)
    assert info.result == {
        "type": "CopyResult",
        "summary": "copied 2 files",
        "state": "complete",
        "files": 2,
        "names": ["a.vhdx", "b.vhdx"],
    }
    assert info.message == "copied 2 files"
    assert info.error == ""
    # It really is JSON in the catalog, not a pickled object.
    with admin.catalog.read_engine.connect() as conn:
        raw = conn.exec_driver_sql("SELECT result FROM task WHERE id = ?", (task_id,)).scalar_one()
    assert '"type": "CopyResult"' in raw


@pytest.mark.parametrize("state", [TaskState.DONE_WITH_ERRORS, TaskState.ACTION_REQUIRED])
def test_a_result_may_end_the_task_in_another_state(
    admin: Services, runners: RunnerFactory, state: TaskState
) -> None:
    runner = runners(admin)

    def body(ctx: TaskContext) -> TaskResult:
        ctx.progress(60)
        return CopyResult("2 of 3 files copied", state=state, files=2)

    task_id = runner.submit(FnTask(body))
    assert runner.wait(task_id, timeout_s=5) is state
    info = admin.tasks.get_task(task_id)
    assert info.state is state
    assert info.message == "2 of 3 files copied"
    assert info.result is not None
    assert info.result["type"] == "CopyResult"
    assert info.result["state"] == state.value
    assert info.ended_at is not None
    assert info.progress == 60  # only a complete task is forced to 100 %


@pytest.mark.parametrize(
    "error",
    [
        UserError("Layer 'Office' has no deployable version."),
        EnvironmentProblem("The disk holding the repository is full."),
    ],
    ids=["user-error", "environment-problem"],
)
def test_a_layerdesk_error_fails_the_task_with_its_message(
    admin: Services, runners: RunnerFactory, error: Exception
) -> None:
    runner = runners(admin)

    def body(ctx: TaskContext) -> TaskResult:
        ctx.log("starting")
        raise error

    task_id = runner.submit(FnTask(body))
    assert runner.wait(task_id, timeout_s=5) is TaskState.FAILED
    info = admin.tasks.get_task(task_id)
    assert info.message == str(error)
    assert info.error == str(error)
    assert info.result is None
    lines = admin.tasks.log(task_id)
    assert [(line.level, line.text) for line in lines] == [("INFO", "starting"), ("ERROR", str(error))]
    assert "Traceback" not in "".join(line.text for line in lines)


def test_an_unexpected_exception_is_an_internal_error_with_the_traceback_in_the_log(
    admin: Services, runners: RunnerFactory
) -> None:
    runner = runners(admin)

    def deep_helper() -> None:
        raise KeyError("boom-marker")

    def body(ctx: TaskContext) -> TaskResult:
        deep_helper()
        return TaskResult()

    task_id = runner.submit(FnTask(body))
    assert runner.wait(task_id, timeout_s=5) is TaskState.FAILED
    info = admin.tasks.get_task(task_id)
    assert info.message.startswith("Internal error")
    assert "KeyError" in info.error and "boom-marker" in info.error
    assert "Traceback" not in info.message  # the message stays readable; the log has the details
    errors = [line for line in admin.tasks.log(task_id) if line.level == "ERROR"]
    assert len(errors) == 1
    assert "Traceback (most recent call last)" in errors[0].text
    assert "deep_helper" in errors[0].text
    assert "KeyError: 'boom-marker'" in errors[0].text


def test_a_run_that_returns_no_task_result_is_an_internal_error(
    admin: Services, runners: RunnerFactory
) -> None:
    runner = runners(admin)
    task_id = runner.submit(FnTask(lambda ctx: {"not": "a TaskResult"}))
    assert runner.wait(task_id, timeout_s=5) is TaskState.FAILED
    info = admin.tasks.get_task(task_id)
    assert info.message.startswith("Internal error")
    assert "TypeError" in info.error and "not a TaskResult" in info.error


def test_prepare_raising_refuses_the_submit_and_records_nothing(
    admin: Services, runners: RunnerFactory
) -> None:
    runner = runners(admin)
    events: list[TaskEvent] = []
    runner.subscribe(events.append)

    def refuse() -> None:
        raise UserError("Template 'Base' has no OS version.")

    task = FnTask(prepare=refuse)
    with pytest.raises(UserError, match="has no OS version"):
        runner.submit(task)
    assert not task.ran.is_set()
    assert admin.tasks.list_tasks() == []
    with admin.catalog.read() as session:
        assert session.scalar(select(func.count()).select_from(Task)) == 0
    assert runner.running() == []
    assert events == []


def test_a_read_only_caller_may_not_submit(services_for: Callable[..., Services], runners: RunnerFactory) -> None:
    reader = services_for(Role.READ_ONLY, username="rita")
    runner = runners(reader)
    task = FnTask()
    with pytest.raises(PermissionDenied, match="run tasks"):
        runner.submit(task)
    assert not task.ran.is_set()
    assert reader.tasks.list_tasks() == []


# --- cancellation -----------------------------------------------------------------------------------------


def test_cancel_through_the_catalog_stops_a_running_task_within_a_second(
    admin: Services, runners: RunnerFactory, other_process: Callable[[Caller], Services]
) -> None:
    runner = runners(admin)
    started = threading.Event()

    def long_work(ctx: TaskContext) -> TaskResult:
        started.set()
        ctx.progress(10, "working")
        while not ctx.cancel.wait(0.05):
            pass
        ctx.cancel.raise_if_cancelled()
        return TaskResult("should not get here")

    task_id = runner.submit(FnTask(long_work, title="long work"))
    assert started.wait(5)
    remote = other_process(admin.caller)
    wait_for(lambda: state_of(remote, task_id) is TaskState.RUNNING, what="the task to run")

    t0 = time.monotonic()
    info = remote.tasks.cancel(task_id, comment="wrong template")
    assert info.state is TaskState.CANCELING
    assert info.cancel_requested
    wait_for(lambda: state_of(remote, task_id) is TaskState.CANCELED, timeout_s=3, what="the cancel")
    elapsed = time.monotonic() - t0
    assert elapsed < 1.0, f"the task took {elapsed:.2f} s to stop"

    assert runner.wait(task_id, timeout_s=5) is TaskState.CANCELED
    final = admin.tasks.get_task(task_id)
    assert final.message == "Canceled by the user."
    assert final.ended_at is not None
    assert final.result is None
    assert ("WARNING", "Canceled by the user.") in [(line.level, line.text) for line in admin.tasks.log(task_id)]
    audits = admin.audit.list_entries(operation="task.cancel")
    assert len(audits) == 1
    assert audits[0].object_name == f"{task_id} long work"
    assert audits[0].comment == "wrong template"
    assert audits[0].change == {"state": "running"}


def test_cancel_of_a_pending_task_means_it_never_runs(admin: Services, runners: RunnerFactory) -> None:
    runner = runners(admin, workers=1)
    gate = threading.Event()
    first = FnTask(blocking(gate))
    second = FnTask(lambda ctx: TaskResult("ran anyway"))
    first_id = runner.submit(first)
    second_id = runner.submit(second)
    assert first.ran.wait(5)
    wait_for(lambda: state_of(admin, first_id) is TaskState.RUNNING, what="the first task to run")
    assert state_of(admin, second_id) is TaskState.PENDING

    info = admin.tasks.cancel(second_id)
    assert info.state is TaskState.CANCELED
    assert info.message == "Canceled before it started."

    gate.set()
    assert runner.wait(first_id, timeout_s=5) is TaskState.COMPLETE
    assert runner.wait(second_id, timeout_s=5) is TaskState.CANCELED
    assert not second.ran.is_set()
    final = admin.tasks.get_task(second_id)
    assert final.started_at is None
    assert final.ended_at is not None
    assert final.message == "Canceled before it started."


def test_cancel_of_an_ended_task_is_refused(admin: Services, runners: RunnerFactory) -> None:
    runner = runners(admin)
    task_id = runner.submit(FnTask())
    assert runner.wait(task_id, timeout_s=5) is TaskState.COMPLETE
    with pytest.raises(Conflict, match=rf"Task {task_id} has already ended \(complete\); nothing to cancel"):
        admin.tasks.cancel(task_id)
    info = admin.tasks.get_task(task_id)
    assert info.state is TaskState.COMPLETE
    assert not info.cancel_requested
    assert admin.audit.list_entries(operation="task.cancel") == []


def test_cancel_of_an_unknown_task_says_so(admin: Services) -> None:
    from app.errors import NotFound

    with pytest.raises(NotFound, match="There is no task 4242"):
        admin.tasks.cancel(4242)


def test_cancelling_another_users_task_needs_administrator(
    services_for: Callable[..., Services],
    runners: RunnerFactory,
    other_process: Callable[[Caller], Services],
) -> None:
    alice = services_for(Role.MANAGE_APP_LAYERS, username="alice")
    bob = other_process(Caller("bob", frozenset({Role.MANAGE_APP_LAYERS})))
    boss = other_process(Caller("boss", frozenset({Role.ADMINISTRATOR})))
    runner = runners(alice)
    gate = threading.Event()
    task = FnTask(blocking(gate))
    task_id = runner.submit(task)
    assert task.ran.wait(5)

    with pytest.raises(PermissionDenied, match="bob"):
        bob.tasks.cancel(task_id)
    info = alice.tasks.get_task(task_id)
    assert info.state is TaskState.RUNNING
    assert not info.cancel_requested
    denied = boss.audit.list_entries(operation="task.cancel", outcome=AuditOutcome.DENIED)
    assert [e.user for e in denied] == ["bob"]

    assert boss.tasks.cancel(task_id).state is TaskState.CANCELING
    assert runner.wait(task_id, timeout_s=5) is TaskState.CANCELED
    allowed = boss.audit.list_entries(operation="task.cancel", outcome=AuditOutcome.SUCCESS)
    assert [e.user for e in allowed] == ["boss"]


def test_a_user_may_cancel_their_own_task(services_for: Callable[..., Services], runners: RunnerFactory) -> None:
    alice = services_for(Role.MANAGE_APP_LAYERS, username="alice")
    runner = runners(alice)
    task = FnTask(blocking(threading.Event()))
    task_id = runner.submit(task)
    assert task.ran.wait(5)
    alice.tasks.cancel(task_id)
    assert runner.wait(task_id, timeout_s=5) is TaskState.CANCELED


# --- listing and the live log ------------------------------------------------------------------------------


def test_list_filters_by_state_user_and_kind(
    admin: Services, services_for: Callable[..., Services], runners: RunnerFactory
) -> None:
    alice = services_for(Role.MANAGE_APP_LAYERS, username="alice")
    admin_runner = runners(admin)
    alice_runner = runners(alice)

    def fail(ctx: TaskContext) -> TaskResult:
        raise UserError("nope")

    done_a = admin_runner.submit(FnTask(title="a"))
    done_b = admin_runner.submit(FnTask(title="b"))
    failed = admin_runner.submit(OtherTask(fail, title="c"))
    for task_id in (done_a, done_b, failed):
        admin_runner.wait(task_id, timeout_s=5)
    alice_done = alice_runner.submit(OtherTask(title="d"))
    alice_runner.wait(alice_done, timeout_s=5)
    gate = threading.Event()
    alice_task = FnTask(blocking(gate), title="e")
    running = alice_runner.submit(alice_task)
    assert alice_task.ran.wait(5)
    wait_for(lambda: state_of(admin, running) is TaskState.RUNNING, what="alice's task to run")

    def ids(**filters: Any) -> list[int]:
        return [t.id for t in admin.tasks.list_tasks(**filters)]

    assert ids() == [running, alice_done, failed, done_b, done_a]  # newest first
    assert ids(states=[TaskState.RUNNING]) == [running]
    assert ids(states=[TaskState.COMPLETE]) == [alice_done, done_b, done_a]
    assert ids(states=[TaskState.FAILED, TaskState.RUNNING]) == [running, failed]
    assert ids(states=[TaskState.CANCELED]) == []
    assert ids(started_by="alice") == [running, alice_done]
    assert ids(started_by="admin") == [failed, done_b, done_a]
    assert ids(kind="test.other") == [alice_done, failed]
    assert ids(kind="test.other", started_by="admin") == [failed]
    assert ids(kind="test.fn", states=[TaskState.COMPLETE]) == [done_b, done_a]
    assert ids(limit=2) == [running, alice_done]
    # Every role may read the task list.
    reader = services_for(Role.READ_ONLY, username="rita")
    assert [t.id for t in reader.tasks.list_tasks(started_by="alice")] == [running, alice_done]
    gate.set()
    alice_runner.wait(running, timeout_s=5)


def test_log_after_id_follows_a_live_log(admin: Services, runners: RunnerFactory) -> None:
    runner = runners(admin)
    steps = [threading.Event() for _ in range(3)]

    def stepwise(ctx: TaskContext) -> TaskResult:
        for number, go_on in enumerate(steps):
            ctx.log(f"step {number}")
            hold(go_on, ctx)  # quiet until the test has seen the line
        ctx.log("finished")
        return TaskResult("all steps")

    task_id = runner.submit(FnTask(stepwise))
    seen: list[tuple[int, str]] = []
    last_id = 0
    for number, go_on in enumerate(steps):
        new = wait_for(
            lambda after=last_id: admin.tasks.log(task_id, after_id=after),
            timeout_s=2, what=f"step {number}",
        )
        assert [line.text for line in new] == [f"step {number}"]
        seen.extend((line.id, line.text) for line in new)
        last_id = new[-1].id
        assert admin.tasks.log(task_id, after_id=last_id) == []
        go_on.set()
    assert runner.wait(task_id, timeout_s=5) is TaskState.COMPLETE
    rest = admin.tasks.log(task_id, after_id=last_id)
    assert [line.text for line in rest] == ["finished"]
    seen.extend((line.id, line.text) for line in rest)
    whole = admin.tasks.log(task_id)
    assert [(line.id, line.text) for line in whole] == seen
    assert [i for i, _ in seen] == sorted(i for i, _ in seen)


# --- retention and crash recovery --------------------------------------------------------------------------


def test_purge_expired_deletes_only_old_ended_tasks_and_their_logs(
    admin: Services, services_for: Callable[..., Services], runners: RunnerFactory
) -> None:
    runner = runners(admin)

    def talk(ctx: TaskContext) -> TaskResult:
        ctx.log("a line")
        ctx.log("another line")
        return TaskResult("ok")

    old, recent, fresh = (runner.submit(FnTask(talk)) for _ in range(3))
    for task_id in (old, recent, fresh):
        runner.wait(task_id, timeout_s=5)
    now = utcnow()
    old_running = insert_task(admin, state=TaskState.RUNNING, owner=process_owner(),
                              created_at=now - timedelta(days=400), started_at=now - timedelta(days=400))
    with admin.catalog.write() as session:
        session.get(Task, old).ended_at = now - timedelta(days=31)  # type: ignore[union-attr]
        session.get(Task, recent).ended_at = now - timedelta(days=29)  # type: ignore[union-attr]
        session.add(TaskLogLine(task_id=old_running, text="still going", at=now))

    def log_counts() -> dict[int, int]:
        with admin.catalog.read() as session:
            rows = session.execute(
                select(TaskLogLine.task_id, func.count()).group_by(TaskLogLine.task_id)
            ).all()
        return {task_id: int(count) for task_id, count in rows}

    assert log_counts() == {old: 2, recent: 2, fresh: 2, old_running: 1}

    manager = services_for(Role.MANAGE_APP_LAYERS, username="alice")
    with pytest.raises(PermissionDenied):
        manager.tasks.purge_expired()

    assert admin.tasks.purge_expired() == 1  # retention is 30 days by default
    remaining = {t.id for t in admin.tasks.list_tasks()}
    assert remaining == {recent, fresh, old_running}
    assert log_counts() == {recent: 2, fresh: 2, old_running: 1}

    admin.settings.set("task_retention_days", 10)
    assert admin.tasks.purge_expired(comment="tidy") == 1
    assert {t.id for t in admin.tasks.list_tasks()} == {fresh, old_running}
    assert log_counts() == {fresh: 2, old_running: 1}
    assert admin.tasks.purge_expired() == 0
    purges = admin.audit.list_entries(operation="task.purge", outcome=AuditOutcome.SUCCESS)
    assert [e.change for e in purges] == [
        {"deleted": 0, "retention_days": 10},
        {"deleted": 1, "retention_days": 10},
        {"deleted": 1, "retention_days": 30},
    ]


def test_recover_interrupted_fails_tasks_of_dead_processes_only(
    admin: Services, runners: RunnerFactory
) -> None:
    host = socket.gethostname()
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as child:
        owner_of_child = f"{host}:{child.pid}:{int(psutil.Process(child.pid).create_time())}"
        child.kill()
        child.wait()
    killed = insert_task(admin, state=TaskState.RUNNING, owner=owner_of_child, started_at=utcnow())
    never_was = insert_task(admin, state=TaskState.RUNNING, owner=f"{host}:{dead_pid()}:1700000000")
    pending_dead = insert_task(admin, state=TaskState.PENDING, owner=owner_of_child)
    canceling_dead = insert_task(admin, state=TaskState.CANCELING, owner=owner_of_child)
    no_owner = insert_task(admin, state=TaskState.RUNNING, owner=None)
    reused_pid = insert_task(  # this very pid, but another process start time: a reused pid
        admin, state=TaskState.RUNNING, owner=process_owner().rsplit(":", 1)[0] + ":12345"
    )
    mine = insert_task(admin, state=TaskState.RUNNING, owner=process_owner())
    other_host = insert_task(admin, state=TaskState.RUNNING, owner=f"not-{host}.example:1:1700000000")
    ended = insert_task(admin, state=TaskState.COMPLETE, owner=owner_of_child, ended_at=utcnow())

    # And a task really running in this process's runner.
    runner = runners(admin)
    gate = threading.Event()
    live = FnTask(blocking(gate))
    live_id = runner.submit(live)
    assert live.ran.wait(5)
    wait_for(lambda: state_of(admin, live_id) is TaskState.RUNNING, what="the live task to run")

    lost = recover_interrupted(admin.catalog)
    assert sorted(lost) == sorted([killed, never_was, pending_dead, canceling_dead, no_owner, reused_pid])
    for task_id in lost:
        info = admin.tasks.get_task(task_id)
        assert info.state is TaskState.FAILED
        assert info.error == INTERRUPTED
        assert info.message == INTERRUPTED
        assert info.ended_at is not None
        assert [(line.level, line.text) for line in admin.tasks.log(task_id)] == [("ERROR", INTERRUPTED)]
    for task_id in (mine, other_host, live_id):
        assert state_of(admin, task_id) is TaskState.RUNNING
    assert state_of(admin, ended) is TaskState.COMPLETE
    assert recover_interrupted(admin.catalog) == []  # nothing twice

    gate.set()
    assert runner.wait(live_id, timeout_s=5) is TaskState.COMPLETE


# --- shutdown and listeners ---------------------------------------------------------------------------------


def test_shutdown_cancels_running_and_pending_tasks(admin: Services, runners: RunnerFactory) -> None:
    runner = runners(admin, workers=1)
    running = FnTask(blocking(threading.Event()))
    queued = FnTask(lambda ctx: TaskResult("ran after shutdown"))
    running_id = runner.submit(running)
    queued_id = runner.submit(queued)
    assert running.ran.wait(5)

    t0 = time.monotonic()
    runner.shutdown(cancel=True, timeout_s=5)
    assert time.monotonic() - t0 < 2.0
    assert state_of(admin, running_id) is TaskState.CANCELED
    assert state_of(admin, queued_id) is TaskState.CANCELED
    assert not queued.ran.is_set()
    assert runner.running() == []
    with pytest.raises(RuntimeError, match="shut down"):
        runner.submit(FnTask())


def test_shutdown_without_cancel_lets_tasks_finish(admin: Services, runners: RunnerFactory) -> None:
    runner = runners(admin)
    gate = threading.Event()
    task = FnTask(blocking(gate))
    task_id = runner.submit(task)
    assert task.ran.wait(5)
    stopper = threading.Thread(target=runner.shutdown, kwargs={"cancel": False, "timeout_s": 5})
    stopper.start()
    assert state_of(admin, task_id) is TaskState.RUNNING
    gate.set()
    stopper.join(timeout=5)
    assert not stopper.is_alive()
    assert state_of(admin, task_id) is TaskState.COMPLETE


def test_listeners_receive_task_events(admin: Services, runners: RunnerFactory) -> None:
    runner = runners(admin)
    events: list[TaskEvent] = []
    lock = threading.Lock()

    def listen(event_: TaskEvent) -> None:
        with lock:
            events.append(event_)

    def broken_listener(event_: TaskEvent) -> None:
        raise RuntimeError("a listener bug must not break the task")

    runner.subscribe(broken_listener)
    runner.subscribe(listen)

    def body(ctx: TaskContext) -> TaskResult:
        ctx.progress(50, "half way")
        return TaskResult("all done")

    task_id = runner.submit(FnTask(body))
    assert runner.wait(task_id, timeout_s=5) is TaskState.COMPLETE
    with lock:
        got = list(events)
    assert all(e.task_id == task_id for e in got)
    assert got[0] == TaskEvent(task_id, TaskState.PENDING, 0, "")
    assert got[1] == TaskEvent(task_id, TaskState.RUNNING, 0, "")
    assert TaskEvent(task_id, TaskState.RUNNING, 50, "half way") in got
    assert got[-1] == TaskEvent(task_id, TaskState.COMPLETE, 100, "all done")

    def refuse(ctx: TaskContext) -> TaskResult:
        raise UserError("bad input")

    failing = runner.submit(FnTask(refuse))
    assert runner.wait(failing, timeout_s=5) is TaskState.FAILED
    with lock:
        last = [e for e in events if e.task_id == failing][-1]
    assert (last.state, last.message) == (TaskState.FAILED, "bad input")


# --- external programs (app.procs) ------------------------------------------------------------------------


def test_run_of_a_missing_program_names_it() -> None:
    with pytest.raises(EnvironmentProblem, match="'layerdesk-no-such-tool' was not found"):
        procs.run(["layerdesk-no-such-tool", "--version"])
    with pytest.raises(EnvironmentProblem, match="Install wimtools"):
        procs.find_program("layerdesk-no-such-tool", package_hint="wimtools")


def test_run_captures_output_and_status() -> None:
    outcome = procs.run(
        [
            sys.executable, "-c",
            "import sys; print(sys.stdin.read().upper()); print('oops', file=sys.stderr); sys.exit(3)",
        ],
        stdin="secret by stdin",
    )
    assert outcome.returncode == 3
    assert not outcome.ok
    assert outcome.stdout.strip() == "SECRET BY STDIN"
    assert outcome.stderr.strip() == "oops"
    assert outcome.argv[0] == sys.executable


def test_stream_hands_over_lines_as_they_come(tmp_path: Path) -> None:
    flag = tmp_path / "go-on"
    child = (
        "import pathlib, sys, time\n"
        "print('first', flush=True)\n"
        "print('to stderr', file=sys.stderr, flush=True)\n"
        "flag = pathlib.Path(sys.argv[1])\n"
        "deadline = time.monotonic() + 10\n"
        "while not flag.exists():\n"
        "    if time.monotonic() > deadline:\n"
        "        print('first line was not handed over in time', flush=True)\n"
        "        sys.exit(3)\n"
        "    time.sleep(0.01)\n"
        "print('second', flush=True)\n"
    )
    lines: list[str] = []

    def on_line(line: str) -> None:
        lines.append(line)
        if line == "first":
            flag.touch()  # the child only goes on once the parent has seen this line

    outcome = procs.stream([sys.executable, "-c", child, str(flag)], on_line, CancelToken())
    assert lines == ["first", "second"]
    assert outcome.ok
    assert outcome.returncode == 0
    assert not outcome.cancelled
    assert outcome.stderr.strip() == "to stderr"


def test_stream_cancel_kills_a_child_that_ignores_terminate() -> None:
    child = (
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    token = CancelToken()
    cancelled_at: list[float] = []

    def on_line(line: str) -> None:
        if line == "ready":
            cancelled_at.append(time.monotonic())
            token.cancel()

    outcome = procs.stream([sys.executable, "-c", child], on_line, token)
    elapsed = time.monotonic() - cancelled_at[0]
    assert outcome.cancelled
    assert not outcome.ok
    assert outcome.returncode == -signal.SIGKILL  # terminate was ignored; it had to be killed
    assert elapsed < procs.TERMINATE_GRACE_S + 1, f"took {elapsed:.2f} s to stop"


def test_stream_cancel_stops_a_polite_child_at_once() -> None:
    child = "import time\nprint('ready', flush=True)\ntime.sleep(60)\n"
    token = CancelToken()
    cancelled_at: list[float] = []

    def on_line(line: str) -> None:
        cancelled_at.append(time.monotonic())
        token.cancel()

    outcome = procs.stream([sys.executable, "-c", child], on_line, token)
    assert outcome.cancelled
    assert outcome.returncode == -signal.SIGTERM
    assert time.monotonic() - cancelled_at[0] < 1.0


def test_stream_of_a_missing_program_names_it() -> None:
    with pytest.raises(EnvironmentProblem, match="'layerdesk-no-such-tool' was not found"):
        procs.stream(["layerdesk-no-such-tool"], lambda line: None, CancelToken())


def test_stream_stops_the_child_when_the_line_handler_fails() -> None:
    child = "import os, time\nprint(os.getpid(), flush=True)\ntime.sleep(60)\n"
    pids: list[int] = []

    def on_line(line: str) -> None:
        pids.append(int(line))
        raise CatalogBusy("the catalog is busy")

    try:
        with pytest.raises(CatalogBusy):
            procs.stream([sys.executable, "-c", child], on_line, CancelToken())
        with pytest.raises(psutil.NoSuchProcess):  # stopped and reaped, not left behind
            psutil.Process(pids[0])
    finally:
        if pids and psutil.pid_exists(pids[0]):
            psutil.Process(pids[0]).kill()


class CatalogBusy(Exception):
    pass
