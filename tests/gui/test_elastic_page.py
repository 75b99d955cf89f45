"""The Elastic layers page against the real test DC: the directory picker searching as you type (off the UI
thread, dropping stale answers, showing the directory's error inline), assigning a layer to a group, the
resolver's explanation, machine associations, the User Layer storage order (model moves, keyboard, one save)
and "where is this user's layer", and buttons that follow the caller's roles."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time

import pytest
from PySide6.QtCore import QModelIndex, Qt, QTimer
from pytestqt.modeltest import ModelTester
from pytestqt.qtbot import QtBot

from app.catalog.models import PrincipalKind, Role
from app.console.elastic import SEARCH_DELAY_MS
from app.directory import PrincipalType
from app.services import Services
from app.services.templates import TemplateSpec
from tests.conftest import ServicesFactory, make_deployable
from tests.directory.conftest import spec_for
from tests.elastic.conftest import BREAK_GLASS_PASSWORD, sid_of
from tests.gui.test_tasks_page import answer, settled  # noqa: F401 - settled: an autouse fixture
from tests.support import samba_dc
from tests.support.host_relay import HostRelay
from tests.support.samba_dc import RunningDC
from ui.directory_picker import DirectoryPicker, DirectoryPickerDialog
from ui.elastic_page import AssignDialog, AssociationDialog, ElasticPage
from ui.storage_tab import LocationDialog, LocationModel, LocationRole

#: Every chunk the slow directory sends back waits this long (a WAN link to a far domain controller).
SLOW_CHUNK_S = 0.25


class SlowRelay(HostRelay):
    """A relay to the DC that holds every chunk back a while: a slow directory."""

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                time.sleep(SLOW_CHUNK_S)
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_RDWR)


def join(services: Services, samba: RunningDC, **changes: object) -> Services:
    """A break-glass Administrator and a junction ``Lab`` to the test DC (as tests/elastic's ``joined``)."""
    services.access.create_account("breakglass", BREAK_GLASS_PASSWORD, [Role.ADMINISTRATOR])
    password = str(changes.pop("password", samba_dc.BIND_PASSWORD))
    services.directory.add_junction("Lab", spec_for(samba, **changes), password=password)
    return services


@pytest.fixture
def joined(lab: Services, samba: RunningDC) -> Services:
    """``lab`` plus Office 2025 and the junction to the test DC."""
    lab.layers.add_version("Office", "2025")
    make_deployable(lab, "Office:2025")
    return join(lab, samba)


def open_page(qtbot: QtBot, services: Services) -> ElasticPage:
    page = ElasticPage(services)
    qtbot.addWidget(page)
    page.resize(1100, 700)
    page.show()
    with qtbot.waitSignal(page.loaded, timeout=5000):
        page.refresh()
    return page


def search(qtbot: QtBot, picker: DirectoryPicker, text: str, *, timeout: int = 10000) -> list[str]:
    """Type ``text`` into an empty picker like a user and wait for the answer: the names found."""
    picker.edit.clear()
    with qtbot.waitSignal(picker.searched, timeout=timeout):
        qtbot.keyClicks(picker.edit, text)
    return [c.name for c in picker.found()]


def test_the_picker_finds_users_and_groups_as_you_type(qtbot: QtBot, event_loop: asyncio.AbstractEventLoop,
                                                       joined: Services) -> None:
    picker = DirectoryPicker(joined)
    qtbot.addWidget(picker)
    picker.show()
    assert picker.status.text() == "Type the start of a user or group name."
    assert "LAB\\alice" in search(qtbot, picker, "ali")
    alice = picker.found()[0]
    assert (alice.kind, alice.sid) == (PrincipalKind.AD_USER, sid_of(joined, "alice", PrincipalType.USER))
    assert search(qtbot, picker, "Finance") == ["LAB\\Finance-Users"]
    assert picker.found()[0].kind is PrincipalKind.AD_GROUP
    assert picker.results.item(0).icon().cacheKey() != 0, "users and groups come with their icons"
    assert picker.current() is None, "nothing is chosen until the user picks"
    with qtbot.waitSignal(picker.chosen) as chosen:
        qtbot.keyClick(picker.edit, Qt.Key.Key_Return)  # the only result
    assert chosen.args[0].name == "LAB\\Finance-Users" and chosen.args[0].sid.startswith("S-1-5-21-")
    assert search(qtbot, picker, "zzz-nobody") == []
    assert picker.status.text() == "No user or group name starts with 'zzz-nobody'."

    # A groups-only picker (machine associations, storage locations) offers no users.
    groups = DirectoryPickerDialog(joined, "Choose a group", (PrincipalKind.AD_GROUP,))
    qtbot.addWidget(groups)
    groups.show()
    assert search(qtbot, groups.picker, "alice") == []
    assert groups.picker.status.text() == "No group name starts with 'alice'."
    assert search(qtbot, groups.picker, "All-") == ["LAB\\All-Staff"]
    assert not groups.ok.isEnabled()
    groups.picker.select("All-Staff")
    assert groups.ok.isEnabled()
    groups.ok.click()
    assert groups.result() == 1 and groups.choice is not None and groups.choice.name == "LAB\\All-Staff"


def test_a_hidden_picker_does_not_search_until_it_is_shown_again(
        qtbot: QtBot, event_loop: asyncio.AbstractEventLoop, joined: Services) -> None:
    """Closing the dialog right after typing must not leave a search to run against whatever the console
    holds by then; shown again, the picker searches for what the box holds."""
    picker = DirectoryPicker(joined)
    qtbot.addWidget(picker)
    picker.show()
    searched: list[None] = []
    picker.searched.connect(lambda: searched.append(None))
    qtbot.keyClicks(picker.edit, "ali")
    picker.hide()
    qtbot.wait(3 * SEARCH_DELAY_MS)
    assert searched == [] and picker.found() == []
    with qtbot.waitSignal(picker.searched, timeout=10000):
        picker.show()
    assert "LAB\\alice" in [c.name for c in picker.found()]


def test_assigning_a_layer_to_a_group_and_the_resolvers_explanation(
    qtbot: QtBot, event_loop: asyncio.AbstractEventLoop, joined: Services,
) -> None:
    page = open_page(qtbot, joined)
    tab = page.assignments
    assert tab.model.rowCount() == 0
    tab.assign_button.click()
    qtbot.waitUntil(lambda: isinstance(tab.dialog, AssignDialog), timeout=5000)
    dialog = tab.dialog
    assert isinstance(dialog, AssignDialog)
    assert [dialog.layer.itemText(i) for i in range(dialog.layer.count())] == ["Chrome", "Notepad++", "Office",
                                                                               "Paint"]
    dialog.layer.setCurrentText("Office")
    assert [dialog.version.itemText(i) for i in range(dialog.version.count())] == ["2025", "2024"]
    assert not dialog.ok.isEnabled(), "no user or group chosen yet"
    assert search(qtbot, dialog.picker, "Finance-U") == ["LAB\\Finance-Users"]
    assert dialog.picker.select("Finance-Users")
    assert dialog.ok.isEnabled() and "LAB\\Finance-Users" in dialog.who.text()
    dialog.comment.setText("finance desks")
    with qtbot.waitSignal(tab.loaded, timeout=5000):
        dialog.ok.click()
    finance_sid = sid_of(joined, "Finance-Users", PrincipalType.GROUP)
    (assignment,) = joined.assignments.list_assignments()
    assert (assignment.layer, assignment.version, assignment.principal_name, assignment.principal_kind,
            assignment.principal_sid) == ("Office", "2025", "LAB\\Finance-Users", PrincipalKind.AD_GROUP, finance_sid)
    assert [e.comment for e in joined.audit.list_entries() if e.operation == "elastic.assign"] == ["finance desks"]
    row = [tab.model.index(0, c).data() for c in range(tab.model.columnCount())]
    assert row[:5] == ["Office", "2025", "LAB\\Finance-Users", "Group", finance_sid] and row[5] == "admin"

    # A second, refused assignment (the same version again): the reason shows in the dialog, which stays.
    tab.assign_button.click()
    qtbot.waitUntil(lambda: tab.dialog is not dialog and isinstance(tab.dialog, AssignDialog), timeout=5000)
    again = tab.dialog
    assert isinstance(again, AssignDialog)
    again.layer.setCurrentText("Office")
    search(qtbot, again.picker, "Finance-U")
    again.picker.select("Finance-Users")
    again.ok.click()
    qtbot.waitUntil(lambda: "already assigned" in again.error.text(), timeout=5000)
    assert again.isVisible() and len(joined.assignments.list_assignments()) == 1
    again.reject()

    # All-Staff (which holds Finance-Users) gets Chrome: alice has it through the nesting.
    staff_sid = sid_of(joined, "All-Staff", PrincipalType.GROUP)
    joined.assignments.assign("Chrome:120", PrincipalKind.AD_GROUP, staff_sid, "LAB\\All-Staff")
    page.show_tab(page.resolver)
    resolver = page.resolver
    assert "LAB\\alice" in search(qtbot, resolver.picker, "alice")
    resolver.picker.select("alice")
    resolver.machine.setText("VDA-FIN-01")
    with qtbot.waitSignal(resolver.resolved, timeout=15000):
        resolver.resolve_button.click()
    assert resolver.rows() == [
        ("Chrome", "120", "delivered", "via group LAB\\All-Staff (nested: LAB\\Finance-Users → LAB\\All-Staff)", ""),
        ("Office", "2025", "delivered", "via group LAB\\Finance-Users", ""),
    ]
    assert resolver.summary.text().startswith("LAB\\alice on VDA-FIN-01 gets 2 app layers")
    assert "LAB\\All-Staff" in resolver.groups.text() and "LAB\\Finance-Users" in resolver.groups.text()

    # A direct assignment of the older Office wins, and the group's newer one is shown losing, with why.
    alice_sid = sid_of(joined, "alice", PrincipalType.USER)
    joined.assignments.assign("Office:2024", PrincipalKind.AD_USER, alice_sid, "LAB\\alice")
    resolver.picker.edit.setText("LAB\\alice")  # typed, not picked: the name is looked up
    assert resolver.picker.current() is None
    with qtbot.waitSignal(resolver.resolved, timeout=15000):
        resolver.resolve_button.click()
    office = [r for r in resolver.rows() if r[0] == "Office"]
    assert office == [
        ("Office", "2024", "delivered", "assigned directly to LAB\\alice", ""),
        ("Office", "2025", "not delivered", "via group LAB\\Finance-Users",
         "a direct assignment of Office:2024 beats group assignments"),
    ]
    # A machine name that cannot be one: the reason, no table.
    resolver.machine.setText("VDA FIN")
    with qtbot.waitSignal(resolver.resolved, timeout=5000):
        resolver.resolve_button.click()
    assert "is not a machine name" in resolver.summary.text() and resolver.rows() == []

    # Remove the group's assignment through the page, after a confirmation.
    page.show_tab(tab)
    qtbot.waitUntil(lambda: tab.model.rowCount() == 3, timeout=5000)
    row = tab.model.row_of(assignment.id)
    assert row is not None
    tab.table.selectRow(tab.proxy.mapFromSource(tab.model.index(row, 0)).row())
    assert tab.remove_button.isEnabled()
    tab.remove_button.click()
    with qtbot.waitSignal(tab.loaded, timeout=5000):
        assert "Remove Office:2025 from LAB\\Finance-Users?" in answer(tab, qtbot, "confirm", "Remove")
    assert {(a.layer, a.principal_name) for a in joined.assignments.list_assignments()} == {
        ("Chrome", "LAB\\All-Staff"), ("Office", "LAB\\alice")}


def test_machine_associations_check_the_pattern_as_it_is_typed(
    qtbot: QtBot, event_loop: asyncio.AbstractEventLoop, joined: Services,
) -> None:
    page = open_page(qtbot, joined)
    page.show_tab(page.machines)
    tab = page.machines
    tab.add_button.click()
    dialog = tab.dialog
    assert isinstance(dialog, AssociationDialog)
    search(qtbot, dialog.picker, "Finance")
    dialog.picker.select("Finance-Users")
    assert not dialog.ok.isEnabled() and dialog.error.text() == "", "no pattern yet: not done, not wrong"
    qtbot.keyClicks(dialog.pattern, "VDA FIN")
    assert "may hold only letters" in dialog.error.text() and not dialog.ok.isEnabled()
    dialog.pattern.setText("VDA-FIN-*")
    assert dialog.error.text() == "" and dialog.ok.isEnabled()
    with qtbot.waitSignal(tab.loaded, timeout=5000):
        dialog.ok.click()
    (association,) = joined.assignments.list_machine_associations()
    assert (association.group_name, association.pattern) == ("LAB\\Finance-Users", "VDA-FIN-*")
    assert tab.model.index(0, 0).data() == "LAB\\Finance-Users" and tab.model.index(0, 1).data() == "VDA-FIN-*"
    tab.table.selectRow(0)
    tab.remove_button.click()
    with qtbot.waitSignal(tab.loaded, timeout=5000):
        answer(tab, qtbot, "confirm", "Remove")
    assert joined.assignments.list_machine_associations() == []


def test_storage_locations_reorder_by_the_models_moves_and_save_in_one_call(
    qtbot: QtBot, event_loop: asyncio.AbstractEventLoop, lab: Services, qtmodeltester: ModelTester,
) -> None:
    group = ("S-1-5-21-1004336348-1177238915-682003330-1201", "LAB\\Finance-Users")
    for name in ("Main", "Finance", "Archive"):
        lab.storage.add_location(name, rf"\\fs1\{name.lower()}", groups=[group])
    page = open_page(qtbot, lab)
    page.show_tab(page.storage)
    tab = page.storage
    qtbot.waitUntil(lambda: tab.model.rowCount() == 3, timeout=5000)
    model = tab.model
    qtmodeltester.check(model)

    def shown() -> list[str]:
        return [model.index(r, LocationModel.NAME).data() for r in range(model.rowCount())]

    assert shown() == ["Main", "Finance", "Archive"]
    assert [model.index(r, LocationModel.PRIORITY).data() for r in range(3)] == ["1", "2", "3"]
    assert model.index(0, LocationModel.GROUPS).data() == "LAB\\Finance-Users"
    assert not tab.save_button.isEnabled(), "nothing to save before a move"
    # Archive dragged to the top.
    data = model.mimeData([model.index(2, 0)])
    assert model.dropMimeData(data, Qt.DropAction.MoveAction, 0, 0, QModelIndex())
    assert tab.order.names() == ("Archive", "Main", "Finance") == tuple(shown())
    # Drops of other data or other models' rows are refused.
    other = LocationModel(type(tab.order)(["Elsewhere"]))
    assert not model.dropMimeData(other.mimeData([other.index(0, 0)]), Qt.DropAction.MoveAction, 0, 0, QModelIndex())
    # The keyboard: Main (now second) goes back to the top.
    tab.view.setFocus()
    tab.view.setCurrentIndex(model.index(1, 0))
    qtbot.keyClick(tab.view, Qt.Key.Key_Up, Qt.KeyboardModifier.ControlModifier)
    assert tab.order.names() == ("Main", "Archive", "Finance")
    assert tab.view.currentIndex().data(LocationRole.NAME) == "Main", "the selection follows the row"
    qtmodeltester.check(model)
    assert lab.storage.list_locations()[0].name == "Main" and [loc.name for loc in lab.storage.list_locations()] == [
        "Main", "Finance", "Archive"], "nothing saved before Save"
    assert tab.save_button.isEnabled()
    tab.comment.setText("archive before finance")
    tab.save_button.click()
    qtbot.waitUntil(lambda: tab.status.text().startswith("Saved the order"), timeout=5000)
    assert [(loc.name, loc.priority) for loc in lab.storage.list_locations()] == [
        ("Main", 1), ("Archive", 2), ("Finance", 3)]
    audit = [e for e in lab.audit.list_entries() if e.operation == "storage.reorder"]
    assert [e.comment for e in audit] == ["archive before finance"], "one change, with its comment"
    assert not tab.save_button.isEnabled()

    # Add a location through the dialog: the form says what is wrong while it is typed.
    tab.add_button.click()
    dialog = tab.dialog
    assert isinstance(dialog, LocationDialog)
    qtbot.keyClicks(dialog.name, "main")
    qtbot.keyClicks(dialog.path, "C:\\layers")
    assert dialog.error.text() == "A storage location named 'main' already exists." and not dialog.ok.isEnabled()
    dialog.name.setText("Scratch")
    assert "is not a share path" in dialog.error.text()
    dialog.path.setText(r"\\fs2\scratch")
    dialog.size_gb.setText("30")
    assert dialog.error.text() == "" and dialog.ok.isEnabled()
    with qtbot.waitSignal(tab.loaded, timeout=5000):
        dialog.ok.click()
    added = lab.storage.list_locations()[-1]
    assert (added.name, added.path, added.priority, added.default_size_gb, added.groups) == (
        "Scratch", r"\\fs2\scratch", 4, 30, ())
    assert shown()[-1] == "Scratch" and model.index(3, LocationModel.GROUPS).data() == "(no group: never used)"


def test_where_is_a_users_layer(qtbot: QtBot, event_loop: asyncio.AbstractEventLoop, joined: Services) -> None:
    staff = (sid_of(joined, "All-Staff", PrincipalType.GROUP), "LAB\\All-Staff")
    joined.storage.add_location("Main", r"\\fs1\userlayers", groups=[staff])
    joined.templates.create_template("Finance", TemplateSpec(os="Win11:1.0", apps=("Office:2024",)))
    page = open_page(qtbot, joined)
    page.show_tab(page.storage)
    where = page.storage.where
    qtbot.waitUntil(lambda: where.template.count() == 1, timeout=5000)
    search(qtbot, where.picker, "alice")
    where.picker.select("alice")
    with qtbot.waitSignal(where.answered, timeout=15000):
        where.find_button.click()
    assert where.place is not None and where.place.location == "Main"
    win11 = joined.layers.get_layer("Win11").layer.id
    assert rf"\\fs1\userlayers\Users\LAB_alice\{win11}_Win11" + "\\" in where.answer.text()
    assert "via group LAB\\All-Staff" in where.answer.text()
    where.picker.edit.setText("bob")  # typed: bob is in no group with a location
    with qtbot.waitSignal(where.answered, timeout=15000):
        where.find_button.click()
    assert where.place is None and "No storage location is assigned to LAB\\bob" in where.answer.text()


def test_a_directory_error_shows_in_the_picker(qtbot: QtBot, event_loop: asyncio.AbstractEventLoop, lab: Services,
                                               samba: RunningDC) -> None:
    join(lab, samba, password="not the bind password")
    picker = DirectoryPicker(lab)
    qtbot.addWidget(picker)
    picker.show()
    assert search(qtbot, picker, "alice") == []
    assert picker.status.text().startswith("The directory could not be searched: ")
    assert "bind account" in picker.status.text()
    assert picker.isVisible(), "shown inline, no crash and no dialog"

    # Without any junction the picker says how to add one.
    lab.directory.remove_junction("Lab")
    assert search(qtbot, picker, "alice") == []
    assert "No directory junction is configured: add one with `layerctl directory add`." in picker.status.text()


def test_a_slow_directory_does_not_block_the_ui_and_stale_answers_are_dropped(
    qtbot: QtBot, event_loop: asyncio.AbstractEventLoop, lab: Services, samba: RunningDC,
) -> None:
    relay = SlowRelay(("127.0.0.1", 636))
    try:
        join(lab, samba, port=relay.port)
        picker = DirectoryPicker(lab)
        qtbot.addWidget(picker)
        picker.show()
        shown: list[str] = []
        picker.results.model().rowsInserted.connect(
            lambda _p, first, last: shown.extend(picker.results.item(r).text() for r in range(first, last + 1)))
        ticks: list[float] = []
        timer = QTimer(interval=20, timeout=lambda: ticks.append(time.monotonic()))
        timer.start()
        started = time.monotonic()
        qtbot.keyClicks(picker.edit, "alice")
        # The search for "alice" starts after the pause; while it is on its way, the text changes.
        qtbot.waitUntil(lambda: time.monotonic() - started > 0.6, timeout=2000)
        assert picker.status.text() == "Searching…" and picker.found() == []
        with qtbot.waitSignal(picker.searched, timeout=30000):
            picker.edit.setText("Finance")
        ended = time.monotonic()
        timer.stop()
    finally:
        relay.close()
    assert ended - started > 1.5, "the directory was slow"
    assert [c.name for c in picker.found()] == ["LAB\\Finance-Users"]
    assert not [text for text in shown if "alice" in text], "the stale answer for 'alice' was never shown"
    gaps = [b - a for a, b in zip([started, *ticks], [*ticks, ended], strict=True)]
    assert len(ticks) > (ended - started) / 0.2, "the timer ticked all through"
    # A search on the UI thread would stand it still for the whole slow answer (over a second); a loaded
    # machine (the suite runs a worker per core) may delay a tick by a few hundred milliseconds.
    assert max(gaps) < 0.6, f"the UI thread stalled for {max(gaps):.2f} s"


def test_a_read_only_user_sees_disabled_buttons_with_the_reason(
    qtbot: QtBot, event_loop: asyncio.AbstractEventLoop, lab: Services, services_for: ServicesFactory,
) -> None:
    lab.storage.add_location("Main", r"\\fs1\userlayers")
    reader = open_page(qtbot, services_for(Role.READ_ONLY))
    for button in (reader.assignments.assign_button, reader.assignments.remove_button, reader.machines.add_button,
                   reader.machines.remove_button, reader.storage.add_button, reader.storage.edit_button,
                   reader.storage.remove_button, reader.storage.save_button):
        assert not button.isEnabled(), button.text()
        assert "read_only (Read Only) may not" in button.toolTip(), button.text()
    assert "change elastic layer assignments" in reader.assignments.assign_button.toolTip()
    assert "change user layer storage locations" in reader.storage.add_button.toolTip()
    assert reader.resolver.resolve_button.isEnabled(), "every role may ask the resolver"
    assert reader.storage.where.find_button.isEnabled()

    elastic = open_page(qtbot, services_for(Role.MANAGE_ELASTIC_ASSIGNMENTS))
    assert elastic.assignments.assign_button.isEnabled() and elastic.machines.add_button.isEnabled()
    assert elastic.assignments.assign_button.toolTip() == "Assign an app layer version to an AD user or group"
    elastic.show_tab(elastic.storage)
    qtbot.waitUntil(lambda: elastic.storage.model.rowCount() == 1, timeout=5000)
    elastic.storage.view.selectRow(0)
    assert not elastic.storage.add_button.isEnabled() and not elastic.storage.edit_button.isEnabled()
    assert "may not change user layer storage locations" in elastic.storage.edit_button.toolTip()
