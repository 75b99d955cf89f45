r"""The Connectors page and the connector form over a real catalog and real destinations: a folder connector
added and tested through the form (a real folder), a missing folder's failed step, a share's password kept in
the (memory) keyring only, a required field's refusal beside the input, a removal a template refuses,
role-based disabling, and a test that waits on a silent SMB server while the UI thread keeps ticking."""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QLineEdit, QSpinBox
from pytestqt.qtbot import QtBot

from app.catalog.models import Role
from app.connectors.base import TestReport
from app.services import Services
from app.services.templates import TemplateSpec
from tests.conftest import ServicesFactory
from tests.gui.test_tasks_page import answer, settled  # noqa: F401 - an autouse fixture
from tests.support.keyring_memory import MemoryKeyring
from ui.connector_form import ConnectorForm
from ui.connectors_page import ConnectorsPage, TestReportDialog

SHARE_PASSWORD = "Conn3ctor-S3cret!"  # a test value, looked for where it must not be


def open_page(qtbot: QtBot, services: Services) -> ConnectorsPage:
    page = ConnectorsPage(services)
    qtbot.addWidget(page)
    page.resize(1100, 600)
    page.show()
    with qtbot.waitSignal(page.loaded, timeout=5000):
        page.refresh()
    return page


def open_add_form(qtbot: QtBot, page: ConnectorsPage, connector_type: str = "folder") -> ConnectorForm:
    page.add_button.click()
    form = page.dialog
    assert isinstance(form, ConnectorForm)
    qtbot.waitUntil(lambda: bool(form.fields), timeout=5000)
    if form.connector_type() != connector_type:
        with qtbot.waitSignal(form.fields_ready, timeout=5000):
            form.type.setCurrentIndex(form.type.findData(connector_type))
    return form


def line(form: ConnectorForm, key: str) -> QLineEdit:
    editor = form.editors[key]
    assert isinstance(editor, QLineEdit)
    return editor


def run_test(qtbot: QtBot, form: ConnectorForm) -> TestReport | None:
    with qtbot.waitSignal(form.tested, timeout=20000) as tested:
        form.test_button.click()
    report = tested.args[0]
    assert report is None or isinstance(report, TestReport)
    return report


def test_a_folder_connector_added_through_the_form_passes_every_step(
    qtbot: QtBot, event_loop: asyncio.AbstractEventLoop, admin: Services, tmp_path: Path,
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    page = open_page(qtbot, admin)
    assert page.model.rowCount() == 0
    form = open_add_form(qtbot, page)
    assert list(form.editors) == ["endpoint", "username", "password", "port"]
    assert line(form, "password").echoMode() is QLineEdit.EchoMode.Password
    port = form.editors["port"]
    assert isinstance(port, QSpinBox) and port.value() == 445 and port.maximum() == 65535
    assert form.labels["endpoint"].text() == "Folder or share <span style='color: #b00020'>*</span>:"
    assert form.labels["username"].text() == "User name:"
    assert "share path" in form.editors["endpoint"].toolTip()

    form.name.setText("Lab-Share")
    line(form, "endpoint").setText(str(images))
    form.comment.setText("offline lab")
    report = run_test(qtbot, form)
    assert report is not None
    assert [(step, result) for step, result, _detail in form.steps.rows()] == [
        ("folder", "✔ ok"), ("write", "✔ ok"), ("space", "✔ ok")]
    assert form.steps.rows()[0][2].startswith(f"{images} exists")
    assert form.test_status.text().startswith("All 3 steps passed")
    assert list(images.iterdir()) == []  # the test's probe file is gone

    with qtbot.waitSignal(page.loaded, timeout=5000):
        form.ok.click()
    info = admin.connectors.get_connector("Lab-Share")
    assert (info.type, info.endpoint, info.options, info.has_credentials) == ("folder", str(images), {"port": 445},
                                                                               False)
    (entry,) = admin.audit.list_entries(operation="connector.add")
    assert entry.comment == "offline lab"
    assert page.selected() is not None
    row = [page.proxy.index(0, c).data() for c in range(page.proxy.columnCount())]
    assert row == ["Lab-Share", "Local folder or SMB share (offline labs)", str(images), "", "not used", ""]

    # The saved connector's Test, from the page.
    with qtbot.waitSignal(page.tested, timeout=10000) as tested:
        page.test_button.click()
    assert isinstance(tested.args[0], TestReport) and tested.args[0].ok
    dialog = page.dialog
    assert isinstance(dialog, TestReportDialog)
    assert [result for _step, result, _detail in dialog.steps.rows()] == ["✔ ok"] * 3
    dialog.close()


def test_a_missing_folder_shows_the_failed_step_and_its_reason(
    qtbot: QtBot, event_loop: asyncio.AbstractEventLoop, admin: Services, tmp_path: Path,
) -> None:
    missing = tmp_path / "no-such-folder"
    page = open_page(qtbot, admin)
    form = open_add_form(qtbot, page)
    form.name.setText("Gone")
    line(form, "endpoint").setText(str(missing))
    report = run_test(qtbot, form)
    assert report is not None and not report.ok
    assert form.steps.rows() == [
        ("folder", "✘ failed", f"The folder {missing} does not exist; create it or correct the connector's folder."),
        ("write", "– not tried", "not run: an earlier step failed"),
        ("space", "– not tried", "not run: an earlier step failed"),
    ]
    assert form.test_status.text() == ("The step “folder” failed: The folder "
                                       f"{missing} does not exist; create it or correct the connector's folder.")
    assert not missing.exists() and admin.connectors.list_connectors() == []
    form.reject()


def test_a_share_password_goes_to_the_keyring_only_and_is_never_shown_again(
    qtbot: QtBot, event_loop: asyncio.AbstractEventLoop, admin: Services, memory_keyring: MemoryKeyring,
) -> None:
    page = open_page(qtbot, admin)
    form = open_add_form(qtbot, page)
    form.name.setText("Share")
    line(form, "endpoint").setText(r"\\fs1.lab.test\images")
    line(form, "username").setText(r"LAB\svc-publish")
    line(form, "password").setText(SHARE_PASSWORD)
    with qtbot.waitSignal(form.saved, timeout=5000):
        form.ok.click()
    info = admin.connectors.get_connector("Share")
    assert info.has_credentials
    kept = {key.split("/", 1)[1]: value for (service, key), value in memory_keyring.store.items()
            if service == "LayerDesk"}
    assert kept == {f"connector/{info.id}": SHARE_PASSWORD}
    admin.catalog.close()  # the catalog and its journal on disk, everything written
    stored = b"".join(p.read_bytes() for p in admin.home.root.rglob("*") if p.is_file())
    assert SHARE_PASSWORD.encode() not in stored
    assert all(SHARE_PASSWORD not in str(e.change) for e in admin.audit.list_entries())
    qtbot.waitUntil(lambda: page.model.rowCount() == 1, timeout=5000)
    assert page.proxy.index(0, 3).data() == r"LAB\svc-publish (password in keyring)"

    # Editing: the password box starts empty, and leaving it so keeps the stored one.
    page.select("Share")
    page.edit_button.click()
    edit = page.dialog
    assert isinstance(edit, ConnectorForm) and edit is not form
    qtbot.waitUntil(lambda: bool(edit.fields), timeout=5000)
    assert line(edit, "password").text() == ""
    assert "leave empty to keep it" in line(edit, "password").placeholderText()
    assert line(edit, "username").text() == r"LAB\svc-publish"
    line(edit, "username").setText(r"LAB\svc-images")
    with qtbot.waitSignals([edit.saved, page.loaded], timeout=5000):
        edit.ok.click()
    assert admin.connectors.get_connector("Share").username == r"LAB\svc-images"
    assert admin.connectors.password("Share") == SHARE_PASSWORD


def test_a_required_field_left_empty_shows_the_services_message_and_keeps_the_input(
    qtbot: QtBot, event_loop: asyncio.AbstractEventLoop, admin: Services,
) -> None:
    page = open_page(qtbot, admin)
    form = open_add_form(qtbot, page, "libvirt")
    assert line(form, "endpoint").text() == "qemu:///system"
    assert form.editors["disk_bus"].currentText() == "virtio"  # type: ignore[union-attr]
    form.name.setText("KVM")
    line(form, "network").setText("lab-net")
    with qtbot.waitSignal(form.tested, timeout=5000) as tested:
        form.test_button.click()
    assert tested.args == [None]
    pool_error = form.errors["pool"]
    assert not pool_error.isHidden()
    assert pool_error.text() == "Storage pool is required: the pool the image is uploaded into"

    form.ok.click()
    qtbot.waitUntil(lambda: form.ok.isEnabled(), timeout=5000)
    assert pool_error.text() == "Storage pool is required: the pool the image is uploaded into"
    assert (form.name.text(), line(form, "network").text(), line(form, "endpoint").text()) == (
        "KVM", "lab-net", "qemu:///system")
    assert form.isVisible()
    assert admin.connectors.list_connectors() == []
    assert admin.audit.list_entries(operation="connector.add") == []

    line(form, "pool").setText("default")
    with qtbot.waitSignals([form.saved, page.loaded], timeout=5000):
        form.ok.click()
    info = admin.connectors.get_connector("KVM")
    assert info.options == {"pool": "default", "network": "lab-net", "disk_bus": "virtio", "nic_model": "e1000e",
                            "memory_mb": 4096, "vcpus": 2, "start": False}


def test_removing_a_connector_a_template_uses_shows_the_refusal(
    qtbot: QtBot, event_loop: asyncio.AbstractEventLoop, lab: Services, tmp_path: Path,
) -> None:
    lab.connectors.add_connector("Lab-Share", "folder", endpoint=str(tmp_path))
    lab.templates.create_template("Finance", TemplateSpec(os="Win11:1.0", connector="Lab-Share"))
    page = open_page(qtbot, lab)
    assert page.proxy.index(0, 5).data() == "Finance"
    page.select("Lab-Share")
    with qtbot.waitSignal(page.removed, timeout=5000) as removed:
        page.remove_button.click()
        assert "It is used by Finance." in answer(page, qtbot, "confirm", "Remove")
    assert removed.args == [""]
    text = answer(page, qtbot, "message", "OK")
    assert text == "Connector 'Lab-Share' is used by image template(s) Finance; not removed."
    assert [c.name for c in lab.connectors.list_connectors()] == ["Lab-Share"]


def test_a_read_only_administrator_sees_disabled_buttons_with_the_reason(
    qtbot: QtBot, event_loop: asyncio.AbstractEventLoop, admin: Services, services_for: ServicesFactory,
    tmp_path: Path,
) -> None:
    admin.connectors.add_connector("Lab-Share", "folder", endpoint=str(tmp_path))
    reader = services_for(Role.READ_ONLY, username="auditor")
    page = open_page(qtbot, reader)
    page.select("Lab-Share")
    assert page.selected() is not None
    for button, wording in ((page.add_button, "change connector configurations"),
                            (page.edit_button, "change connector configurations"),
                            (page.remove_button, "change connector configurations"),
                            (page.test_button, "publish layered images")):
        assert not button.isEnabled()
        assert button.toolTip() == (f"auditor (Read Only) may not {wording}: that needs the "
                                    f"{'Publish Layered Images or ' if 'publish' in wording else ''}Administrator "
                                    "role. Ask an Administrator to grant it.")


@pytest.fixture
def silent_smb_server() -> Iterator[int]:
    """A port on loopback that accepts connections and never answers (an SMB server that hangs)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    yield server.getsockname()[1]
    server.close()  # the waiting connection is reset, so the abandoned test's thread ends


def test_the_ui_keeps_ticking_while_a_slow_test_runs_and_the_form_closes_meanwhile(
    qtbot: QtBot, event_loop: asyncio.AbstractEventLoop, admin: Services, silent_smb_server: int,
) -> None:
    page = open_page(qtbot, admin)
    form = open_add_form(qtbot, page)
    form.name.setText("Slow")
    line(form, "endpoint").setText(r"\\127.0.0.1\images")
    line(form, "username").setText("svc")
    line(form, "password").setText(SHARE_PASSWORD)
    port = form.editors["port"]
    assert isinstance(port, QSpinBox)
    port.setValue(silent_smb_server)
    ticks: list[int] = []
    timer = QTimer(interval=50)
    timer.timeout.connect(lambda: ticks.append(1))
    timer.start()
    reports: list[object] = []
    form.tested.connect(reports.append)
    form.test_button.click()
    qtbot.wait(1500)
    timer.stop()
    assert form.testing() and reports == []
    assert len(ticks) >= 15, f"the UI thread ticked only {len(ticks)} times in 1.5 s"
    # the elapsed seconds are shown while it runs (1 s, or more on a loaded machine)
    assert re.match(r"Testing… [1-9]\d* s\. ", form.test_status.text()), form.test_status.text()
    assert not form.test_button.isEnabled()
    line(form, "username").setText("svc-2")  # still typing while it runs
    assert line(form, "username").text() == "svc-2"

    form.reject()  # closing lets the test go; nothing waits for it
    qtbot.waitUntil(lambda: form._testing is not None and form._testing.done(), timeout=2000)
    assert reports == [] and admin.connectors.list_connectors() == []


def test_a_xenserver_connector_from_its_generated_form_tested_against_a_recorded_pool(
    qtbot: QtBot, event_loop: asyncio.AbstractEventLoop, admin: Services, tmp_path: Path,
    memory_keyring: MemoryKeyring,
) -> None:
    """Against a recording (the XenAPI XML-RPC exchanges of a pool master over HTTPS with a test CA): the form
    the XenServer type's fields make, a wrong password's failed login step, then the right one, saved."""
    from tests.connectors.test_xenserver import PASSWORD, USER
    from tests.support.hyperv_winrm import make_test_ca
    from tests.support.xenserver_xapi import recorded_pool

    ca = make_test_ca(tmp_path / "ca")
    page = open_page(qtbot, admin)
    form = open_add_form(qtbot, page, "xenserver")
    assert list(form.editors)[:6] == ["endpoint", "username", "password", "verify_tls", "ca_file", "sr"]
    assert form.labels["sr"].text() == "Storage repository <span style='color: #b00020'>*</span>:"
    with recorded_pool(ca, USER, PASSWORD) as (pool, port):
        form.name.setText("XS1")
        line(form, "endpoint").setText(f"https://localhost:{port}")
        line(form, "username").setText(USER)
        line(form, "password").setText("wrong password 1")
        line(form, "ca_file").setText(str(ca.ca_file))
        line(form, "sr").setText("Local storage")
        report = run_test(qtbot, form)
        assert report is not None and not report.ok
        assert [(step, result) for step, result, _detail in form.steps.rows()][:3] == [
            ("TCP", "✔ ok"), ("TLS", "✔ ok"), ("login", "✘ failed")]
        assert "wrong password 1" not in form.test_status.text() + str(form.steps.rows())
        line(form, "password").setText(PASSWORD)
        report = run_test(qtbot, form)
        assert report is not None and report.ok, report
        assert pool.sessions == set()
        with qtbot.waitSignal(page.loaded, timeout=5000):
            form.ok.click()
    info = admin.connectors.get_connector("XS1")
    assert (info.type, info.options["sr"], info.options["ca_file"], info.has_credentials) == (
        "xenserver", "Local storage", str(ca.ca_file), True)
    assert list(memory_keyring.store.values()) == [PASSWORD]
