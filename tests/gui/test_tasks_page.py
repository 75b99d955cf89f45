"""The task monitor over a real catalog and task runner: tasks show with progress and elapsed time, the
selected task's log grows while the task runs, Cancel ends a running task canceled (through the catalog,
as from another process), filters, role-based disabling, and the status bar's way to the page."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from PySide6.QtWidgets import QMessageBox, QWidget
from pytestqt.qtbot import QtBot

from app.catalog.models import Role, TaskState
from app.services import Services
from app.tasks.base import LayerDeskTask, TaskContext, TaskResult
from app.tasks.runner import TaskRunner
from tests.conftest import ServicesFactory
from ui.main_window import MainWindow
from ui.tasks_page import TasksPage


class Ticker(LayerDeskTask):
    """Logs ``tick N`` ten times a second until it is canceled (or has ticked ``limit`` times)."""

    kind = "test.ticker"

    def __init__(self, title: str = "Ticker", limit: int = 10_000) -> None:
        super().__init__(title)
        self.limit = limit

    def run(self, ctx: TaskContext) -> TaskResult:
        for n in range(1, self.limit + 1):
            ctx.log(f"tick {n}")
            ctx.progress(min(99, n), f"tick {n}")
            if ctx.cancel.wait(0.1):
                ctx.cancel.raise_if_cancelled()
        return TaskResult(f"ticked {self.limit} times")


@pytest.fixture(autouse=True)
def settled(qtbot: QtBot, event_loop: asyncio.AbstractEventLoop) -> Iterator[None]:
    """After the test (its widgets are closed by then), let the coroutines it started finish on its own
    event loop, so none is left to run under the next test's loop."""
    yield
    qtbot.waitUntil(lambda: all(task.done() for task in asyncio.all_tasks(event_loop)), timeout=10000)


@pytest.fixture
def runner(lab: Services) -> Iterator[TaskRunner]:
    runner = TaskRunner(lab.catalog, lab.caller, poll_s=0.1, progress_interval_s=0.05)
    yield runner
    runner.shutdown()


def answer(parent: QWidget, qtbot: QtBot, name: str, button: str) -> str:
    """Click ``button`` in the message box ``name`` once it shows; return the box's text."""

    def showing() -> list[QMessageBox]:
        return [b for b in parent.findChildren(QMessageBox, name) if b.isVisible()]

    qtbot.waitUntil(lambda: len(showing()) == 1, timeout=3000)
    (box,) = showing()
    text = box.text()
    (chosen,) = [b for b in box.buttons() if b.text().replace("&", "") == button]
    chosen.click()
    return text


def open_page(qtbot: QtBot, services: Services) -> TasksPage:
    page = TasksPage(services)
    qtbot.addWidget(page)
    page.resize(1000, 600)
    page.show()
    return page


def state_of(page: TasksPage, task_id: int) -> TaskState:
    row = page.model.row_of(task_id)
    assert row is not None
    return page.model.records()[row].task.state


def test_the_selected_tasks_log_streams_and_cancel_ends_it_canceled(
    qtbot: QtBot, event_loop: asyncio.AbstractEventLoop, lab: Services, runner: TaskRunner,
) -> None:
    done = runner.submit(Ticker("Finished ticker", limit=2))
    runner.wait(done)
    task_id = runner.submit(Ticker("Long ticker"))
    page = open_page(qtbot, lab)
    qtbot.waitUntil(lambda: page.model.row_of(task_id) is not None, timeout=3000)
    assert [page.proxy.index(r, 0).data() for r in range(page.proxy.rowCount())] == [str(task_id), str(done)]
    assert page.select_task(task_id)
    assert page.log_title.text() == f"Log of task {task_id}: Long ticker"

    qtbot.waitUntil(lambda: "tick 3" in page.log.toPlainText(), timeout=5000)
    first = page.log.toPlainText().count("\n")
    qtbot.waitUntil(lambda: page.log.toPlainText().count("\n") >= first + 3, timeout=5000)  # it grows live
    lines = [line.split()[-1] for line in page.log.toPlainText().splitlines()]
    assert lines == [str(n) for n in range(1, len(lines) + 1)], "every line once, in order"
    row = page.model.row_of(task_id)
    progress = page.model.data(page.model.index(row, 4))
    assert progress.endswith("%") and int(progress[:-1]) >= 3
    assert page.model.data(page.model.index(row, 8)).endswith(" s")  # elapsed
    assert state_of(page, task_id) is TaskState.RUNNING
    assert not page.grab().isNull()  # the progress bar delegate paints

    assert page.cancel_button.isEnabled()
    page.cancel_button.click()
    assert "Cancel task" in answer(page, qtbot, "confirm", "Cancel task")
    qtbot.waitUntil(lambda: state_of(page, task_id) is TaskState.CANCELED, timeout=5000)
    assert lab.tasks.get_task(task_id).state is TaskState.CANCELED
    qtbot.waitUntil(lambda: "Canceled by the user." in page.log.toPlainText(), timeout=3000)
    assert not page.cancel_button.isEnabled()


def test_filters_by_state_kind_and_text(
    qtbot: QtBot, event_loop: asyncio.AbstractEventLoop, lab: Services, runner: TaskRunner,
) -> None:
    ended = runner.submit(Ticker("Quick one", limit=1))
    runner.wait(ended)
    running = runner.submit(Ticker("Slow one"))
    page = open_page(qtbot, lab)
    qtbot.waitUntil(lambda: page.proxy.rowCount() == 2, timeout=3000)

    def shown() -> list[int]:
        return sorted(int(page.proxy.index(r, 0).data()) for r in range(page.proxy.rowCount()))

    page.state_filter.setCurrentIndex(page.state_filter.findText("Active"))
    qtbot.waitUntil(lambda: shown() == [running], timeout=3000)
    page.state_filter.setCurrentIndex(page.state_filter.findText("Complete"))
    qtbot.waitUntil(lambda: shown() == [ended], timeout=3000)
    page.state_filter.setCurrentIndex(0)
    qtbot.waitUntil(lambda: shown() == [ended, running], timeout=3000)
    assert page.kind_filter.findText("test.ticker") >= 0  # kinds seen are offered
    page.kind_filter.setCurrentIndex(page.kind_filter.findText("layer.import"))
    qtbot.waitUntil(lambda: shown() == [], timeout=3000)
    page.kind_filter.setCurrentIndex(page.kind_filter.findText("test.ticker"))
    qtbot.waitUntil(lambda: shown() == [ended, running], timeout=3000)
    page.filter.setText("slow")
    assert shown() == [running]


def test_polling_runs_only_while_the_page_is_visible(
    qtbot: QtBot, event_loop: asyncio.AbstractEventLoop, lab: Services,
) -> None:
    page = open_page(qtbot, lab)
    assert page._timer.isActive()
    page.hide()
    assert not page._timer.isActive()
    page.show()
    assert page._timer.isActive()


@pytest.mark.parametrize(("roles", "why"), [
    ((Role.READ_ONLY,), "may not run tasks"),
    ((Role.MANAGE_APP_LAYERS,), "may not cancel or purge tasks started by others"),
])
def test_a_role_without_permission_sees_cancel_disabled_with_the_reason(
    qtbot: QtBot, event_loop: asyncio.AbstractEventLoop, lab: Services, runner: TaskRunner,
    services_for: ServicesFactory, roles: tuple[Role, ...], why: str,
) -> None:
    task_id = runner.submit(Ticker("Admin's ticker"))
    page = open_page(qtbot, services_for(*roles))
    qtbot.waitUntil(lambda: page.model.row_of(task_id) is not None, timeout=3000)
    assert page.select_task(task_id)
    assert not page.cancel_button.isEnabled()
    assert why in page.cancel_button.toolTip() and "Administrator" in page.cancel_button.toolTip()


def test_the_running_tasks_indicator_opens_the_tasks_page(
    qtbot: QtBot, event_loop: asyncio.AbstractEventLoop, lab: Services, runner: TaskRunner,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("ui.main_window.TASK_POLL_MS", 100)
    window = MainWindow(lab, remember=False)
    qtbot.addWidget(window)
    window.show()
    runner.submit(Ticker())
    indicator = window.running
    qtbot.waitUntil(lambda: indicator.text() == "1 task running", timeout=3000)
    assert window.current_page().objectName() == "layers"
    indicator.click()
    assert window.current_page().objectName() == "tasks"
    assert window.nav.currentItem().text() == "Tasks"
