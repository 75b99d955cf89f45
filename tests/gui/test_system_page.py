"""The System page over a real catalog: settings saved through the settings service (its refusals shown at
the field), role-based disabling, the audit log with its search box, and About's versions."""

from __future__ import annotations

import asyncio
import platform
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from PySide6.QtCore import qVersion
from PySide6.QtWidgets import QCheckBox, QLineEdit
from pytestqt.qtbot import QtBot

from app import __version__
from app.catalog.models import LayerType, Role
from app.engine.wim import library_version
from app.services import Services
from app.tasks.runner import TaskRunner
from tests.conftest import ServicesFactory
from tests.gui.test_tasks_page import settled  # noqa: F401 - an autouse fixture
from tests.support.tools import run_ok
from ui.pages import spawn
from ui.system_page import SystemPage


def open_page(qtbot: QtBot, services: Services) -> SystemPage:
    page = SystemPage(services)
    qtbot.addWidget(page)
    page.resize(1000, 700)
    page.show()
    with qtbot.waitSignal(page.loaded, timeout=5000):
        page.refresh()
    return page


def editor(page: SystemPage, key: str) -> QLineEdit:
    found = page.settings.editors[key]
    assert isinstance(found, QLineEdit)
    return found


def test_settings_are_saved_through_the_service_and_its_refusals_shown_at_the_field(
    qtbot: QtBot, event_loop: asyncio.AbstractEventLoop, admin: Services,
) -> None:
    page = open_page(qtbot, admin)
    settings = page.settings
    assert set(settings.editors) == {s.key for s in admin.settings.list_settings()}
    assert editor(page, "task_retention_days").text() == "30"
    assert isinstance(settings.editors["require_sign_in"], QCheckBox)

    editor(page, "task_retention_days").setText("0")
    editor(page, "log_retention_days").setText("14")
    settings.comment.setText("shorter logs")
    with qtbot.waitSignal(settings.saved, timeout=5000) as saved:
        settings.save_button.click()
    assert saved.args == [1]
    error = settings.errors["task_retention_days"]
    assert not error.isHidden() and error.text() == "0 days is outside the allowed range 1–3650."
    assert editor(page, "task_retention_days").text() == "0"  # kept as typed, beside the reason
    assert settings.errors["log_retention_days"].isHidden()
    assert "Not saved: Task retention days" in settings.status.text()
    assert (admin.settings.get("task_retention_days"), admin.settings.get("log_retention_days")) == (30, 14)
    (entry,) = admin.audit.list_entries(operation="settings.set")
    assert (entry.object_name, entry.comment) == ("log_retention_days", "shorter logs")

    sign_in = settings.editors["require_sign_in"]
    assert isinstance(sign_in, QCheckBox)
    sign_in.setChecked(True)
    editor(page, "task_retention_days").setText("45")
    with qtbot.waitSignal(settings.saved, timeout=5000):
        settings.save_button.click()
    assert "nobody could sign in" in settings.errors["require_sign_in"].text()
    assert settings.errors["task_retention_days"].isHidden()
    assert admin.settings.get("task_retention_days") == 45 and admin.settings.get("require_sign_in") is False
    assert settings.changed() == {"require_sign_in": True}
    settings.revert_button.click()
    assert settings.changed() == {}


def test_a_role_without_the_settings_permission_sees_save_disabled_with_the_reason(
    qtbot: QtBot, event_loop: asyncio.AbstractEventLoop, services_for: ServicesFactory,
) -> None:
    page = open_page(qtbot, services_for(Role.MANAGE_APP_LAYERS))
    save = page.settings.save_button
    assert not save.isEnabled()
    assert "may not change system settings: that needs the Administrator role" in save.toolTip()
    assert editor(page, "task_retention_days").isReadOnly()
    assert not page.settings.editors["require_sign_in"].isEnabled()


def test_the_audit_log_has_a_search_box(
    qtbot: QtBot, event_loop: asyncio.AbstractEventLoop, lab: Services,
) -> None:
    page = open_page(qtbot, lab)
    audit = page.audit
    qtbot.waitUntil(lambda: audit.model.rowCount() > 10, timeout=5000)
    page.tabs.setCurrentWidget(audit)
    audit.filter.setText("notepad++")
    objects = {audit.proxy.index(r, 3).data() for r in range(audit.proxy.rowCount())}
    assert objects == {"Notepad++", "Notepad++:8.6"}
    assert audit.filter.placeholderText().startswith("Search")


def test_about_shows_the_versions_gathered_in_the_background(
    qtbot: QtBot, event_loop: asyncio.AbstractEventLoop, admin: Services,
) -> None:
    page = open_page(qtbot, admin)
    assert page.about_values["wimlib"].text() == "…"  # nothing gathered before About is shown
    with qtbot.waitSignal(page.about_loaded, timeout=10000):
        page.tabs.setCurrentWidget(page.about)
    values = {name: label.text() for name, label in page.about_values.items()}
    qemu = run_ok("qemu-img", "--version").stdout.splitlines()[0]
    assert values["LayerDesk"] == __version__
    assert values["Python"].startswith(platform.python_version())
    assert values["Qt"] == qVersion()
    assert values["wimlib"] == library_version()
    assert values["qemu-img"] == qemu and qemu.startswith("qemu-img version")
    assert values["Home folder"] == str(admin.home.root)


# --- Backup…, Restore…, Log bundle… -------------------------------------------------------------------------


def test_backup_restore_and_bundle_are_disabled_for_other_roles_with_the_reason(
    qtbot: QtBot, event_loop: asyncio.AbstractEventLoop, services_for: ServicesFactory,
) -> None:
    page = open_page(qtbot, services_for(Role.MANAGE_IMAGE_TEMPLATES, Role.PUBLISH_LAYERED_IMAGES))
    for button, wording in ((page.backup_button, "back up or restore the LayerDesk home"),
                            (page.restore_button, "back up or restore the LayerDesk home"),
                            (page.bundle_button, "write a support log bundle")):
        assert not button.isEnabled(), button.text()
        assert f"may not {wording}: that needs the Administrator role" in button.toolTip()


def _run(page: SystemPage, qtbot: QtBot, start: Coroutine[Any, Any, int | None], kind: str) -> str:
    with qtbot.waitSignal(page.action_finished, timeout=60_000,
                          check_params_cb=lambda k, _text: k == kind) as finished:
        spawn(start)
    return str(finished.args[1])


def test_backup_bundle_and_restore_run_as_tasks_and_say_how_they_ended(
    qtbot: QtBot, event_loop: asyncio.AbstractEventLoop, lab: Services, tmp_path: Path,
) -> None:
    runner = TaskRunner(lab.catalog, lab.caller, poll_s=0.1, progress_interval_s=0.05)
    page = SystemPage(lab, runner=runner)
    qtbot.addWidget(page)
    page.resize(1000, 700)
    page.show()
    try:
        assert page.backup_button.isEnabled() and page.restore_button.isEnabled() and page.bundle_button.isEnabled()
        # the lab's versions are catalog entries without stored content: the backup says so
        text = _run(page, qtbot, page.start_backup(tmp_path / "bk"), "backup")
        assert "Backed up the catalog and 0 stored layer version(s)" in text and "already missing" in text
        assert (tmp_path / "bk" / "backup.json").is_file()
        assert page.task_strips() and "done" in page.task_strips()[0].label.text().lower()

        text = _run(page, qtbot, page.start_bundle(tmp_path / "support.zip"), "bundle")
        assert text.startswith(f"Wrote the support bundle {tmp_path / 'support.zip'}")

        text = _run(page, qtbot, page.start_backup(tmp_path / "bk"), "backup")  # not started: said at once
        assert "holds a backup already" in page.action_status.text()

        lab.layers.create_layer("Made-after-the-backup", LayerType.OS)
        text = _run(page, qtbot, page.start_restore(tmp_path / "bk"), "restore")
        assert text.startswith(f"Restored from {tmp_path / 'bk'}") and "OS keyring" in text
        assert "Made-after-the-backup" not in {layer.name for layer in lab.layers.list_layers()}
        assert page.backup_button.isEnabled()

        (tmp_path / "bk" / "catalog.sqlite").write_bytes(b"SQLite format 3\x00" + bytes(100))
        text = _run(page, qtbot, page.start_restore(tmp_path / "bk"), "restore")
        assert "catalog.sqlite does not match its checksum" in text
        failed = page.task_strips()[-1].label
        assert "catalog.sqlite does not match its checksum" in failed.text() and "b00020" in failed.styleSheet()
        assert page.action_status.isHidden()
    finally:
        runner.shutdown()


def test_export_import_opens_the_transfer_dialog_on_the_consoles_runner(
        qtbot: QtBot, event_loop: asyncio.AbstractEventLoop, admin: Services) -> None:
    from app.tasks.runner import TaskRunner
    from ui.system_page import SystemPage
    from ui.transfer_dialog import TransferDialog

    runner = TaskRunner(admin.catalog, admin.caller)
    try:
        page = SystemPage(admin, runner=runner)
        qtbot.addWidget(page)
        assert page.transfer_button.isEnabled()
        page.transfer_button.click()
        qtbot.waitUntil(lambda: page.findChild(TransferDialog) is not None, timeout=3000)
        dialog = page.findChild(TransferDialog)
        assert dialog is not None and dialog.runner is runner
        dialog.reject()
        # Without a runner (nothing could run the export) the button says why it is off.
        bare = SystemPage(admin)
        qtbot.addWidget(bare)
        assert not bare.transfer_button.isEnabled()
    finally:
        runner.shutdown()
