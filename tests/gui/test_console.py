"""The console's first screens over a real catalog: pages fill in the background, filter, sort,
and tables update rows by id."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace

from PySide6.QtCore import Qt
from pytestqt.modeltest import ModelTester
from pytestqt.qtbot import QtBot

from app.catalog.models import LayerType
from app.services import Services
from ui.main_window import MainWindow
from ui.table_model import Column, ItemRole, RecordTableModel


@dataclass(frozen=True)
class Row:
    id: int
    name: str
    size: int


COLUMNS = [Column[Row]("Name", lambda r: r.name), Column[Row]("Size", lambda r: str(r.size), sort=lambda r: r.size)]


def test_record_model_passes_qt_model_checks_and_updates_by_id(qtmodeltester: ModelTester) -> None:
    model: RecordTableModel[Row] = RecordTableModel(COLUMNS, key=lambda r: r.id)
    qtmodeltester.check(model)
    model.replace([Row(1, "Office", 10), Row(2, "Chrome", 20), Row(3, "Paint", 5)])
    changed: list[int] = []
    model.dataChanged.connect(lambda top, _bottom: changed.append(top.row()))
    model.replace([Row(1, "Office", 10), Row(2, "Chrome", 25), Row(4, "Visio", 1)])
    assert [r.name for r in model.records()] == ["Office", "Chrome", "Visio"]
    assert changed == [1], "only the changed row is refreshed"
    assert model.data(model.index(1, 1)) == "25"
    assert model.data(model.index(1, 1), ItemRole.SORT) == 25
    assert model.data(model.index(2, 0), ItemRole.RECORD) == Row(4, "Visio", 1)
    qtmodeltester.check(model)


def test_record_model_handles_ten_thousand_rows(qtmodeltester: ModelTester) -> None:
    model: RecordTableModel[Row] = RecordTableModel(COLUMNS, key=lambda r: r.id)
    rows = [Row(i, f"Layer {i}", i) for i in range(10_000)]
    model.replace(rows)
    model.replace([replace(r, size=r.size + 1) if r.id % 2 else r for r in rows[::2]])
    assert model.rowCount() == 5_000
    assert model.row_of(9_998) == 4_999


def _wait_loaded(qtbot: QtBot, window: MainWindow) -> None:
    page = window.current_page()
    with qtbot.waitSignal(page.loaded, timeout=5000):
        page.refresh()


def test_main_window_shows_the_catalog(qtbot: QtBot, event_loop: asyncio.AbstractEventLoop, lab: Services) -> None:
    window = MainWindow(lab, remember=False)
    qtbot.addWidget(window)
    window.show()
    page = window.current_page()
    qtbot.waitUntil(lambda: page.model.rowCount() == 7, timeout=5000)
    names = sorted(r.layer.name for r in page.model.records())
    assert names == ["Chrome", "Citrix-VDA", "Notepad++", "Office", "Paint", "Win10", "Win11"]

    page.filter.setText("notepad")
    assert page.proxy.rowCount() == 1
    page.filter.setText("win10")  # matches the layer and the app layer bound to it
    assert sorted(page.proxy.index(r, 0).data() for r in range(page.proxy.rowCount())) == ["Paint", "Win10"]
    page.filter.clear()

    lab.layers.create_layer("Visio", LayerType.APP, os_layer="Win11")
    _wait_loaded(qtbot, window)
    assert page.model.rowCount() == 8

    window.nav.setCurrentRow(1)
    templates = window.current_page()
    assert templates.objectName() == "image_templates"
    qtbot.waitUntil(lambda: templates.status.text() == "0 items", timeout=5000)
    assert "admin" in window.statusBar().findChildren(type(templates.status))[0].text()


def test_the_audit_log_reads_newest_first_and_sorts_by_time(
    qtbot: QtBot, event_loop: asyncio.AbstractEventLoop, lab: Services
) -> None:
    from datetime import UTC, datetime, timedelta

    from app.catalog.models import AuditEntry

    # Entries whose ids and times run in opposite orders: only a real time sort puts them right.
    with lab.catalog.write() as session:
        base = datetime(2026, 1, 1, tzinfo=UTC)
        for hours, name in ((3, "third"), (1, "first"), (2, "second")):
            session.add(AuditEntry(at=base + timedelta(hours=hours), user="u", operation="probe",
                                   object_type="t", object_name=name, change={}, comment="",
                                   outcome="success"))
    window = MainWindow(lab, remember=False)
    qtbot.addWidget(window)
    window.show_page("system")
    system = window.current_page()
    assert system.objectName() == "system"
    page = system.audit
    qtbot.waitUntil(lambda: page.model.rowCount() > 3, timeout=5000)
    page.filter.setText("probe")
    shown = [page.proxy.index(r, 3).data() for r in range(page.proxy.rowCount())]
    assert shown == ["third", "second", "first"]
    page.table.sortByColumn(0, Qt.SortOrder.AscendingOrder)
    shown = [page.proxy.index(r, 3).data() for r in range(page.proxy.rowCount())]
    assert shown == ["first", "second", "third"]
