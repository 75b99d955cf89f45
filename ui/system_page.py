"""The System page: the system settings (checked and saved by the settings service, its refusals shown at
the field), the audit log with a search box, About (versions of LayerDesk and what it runs on), and the
Backup…, Restore… and Log bundle… actions, each run as a task with its progress (Administrator only)."""

from __future__ import annotations

import asyncio
import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import PySide6
from PySide6.QtCore import Qt, Signal, qVersion
from PySide6.QtWidgets import (
    QCheckBox,
    QDialog,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QMessageBox,
    QPushButton,
    QScrollArea,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)
from shiboken6 import isValid

from app import __version__
from app.catalog.models import TaskState
from app.errors import LayerDeskError
from app.services import Services
from app.services.backup import RestoreReport, backup_service
from app.services.rbac import Operation
from app.services.support import LogBundleTask
from app.services.views import SettingInfo, TaskInfo
from app.tasks.runner import TaskRunner
from ui.background import off_ui_thread
from ui.layers_page import TaskProgress
from ui.pages import ListPage, audit_page, confirm, format_when, show_message, spawn
from ui.permissions import guard

ERROR_STYLE = "color: #b00020"
VERSION_ROWS = ("LayerDesk", "Python", "Qt", "PySide6", "wimlib", "qemu-img", "mkntfs (NTFS-3G)", "ntfscp (NTFS-3G)",
                "mkfs.fat (dosfstools)", "System")


def _label(key: str) -> str:
    return key.replace("_", " ").capitalize().replace(" gb", " (GB)")


def component_versions(services: Services) -> list[tuple[str, str]]:
    """(In a worker thread.) The versions of what LayerDesk runs on; a missing engine tool says what it
    is needed for."""
    rows = [
        ("LayerDesk", __version__),
        ("Python", f"{platform.python_version()} ({platform.python_implementation()})"),
        ("Qt", qVersion()),
        ("PySide6", PySide6.__version__),
    ]
    for tool in services.repository.engine_tools():
        rows.append((tool.name, tool.version if tool.version is not None
                     else f"not available ({tool.problem}); needed for {tool.needed_for}"))
    rows.append(("System", platform.platform()))
    return rows


class SettingsEditor(QWidget):
    """One editor per setting; Save sends the changed ones to the settings service."""

    saved = Signal(int)  # number of settings changed

    def __init__(self, services: Services, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.services = services
        self.settings: dict[str, SettingInfo] = {}
        self.editors: dict[str, QLineEdit | QCheckBox] = {}
        self.errors: dict[str, QLabel] = {}
        self.hints: dict[str, QLabel] = {}
        self.form = QFormLayout()
        self.form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.ExpandingFieldsGrow)
        self.comment = QLineEdit(placeholderText="Why (kept in the audit log)")
        self.comment.setAccessibleName("Comment")
        self.save_button = QPushButton("&Save changes")
        self.save_button.setToolTip("Save the changed settings (each is checked by LayerDesk first).")
        self.save_button.clicked.connect(lambda: spawn(self.save()))
        self.revert_button = QPushButton("Re&vert")
        self.revert_button.clicked.connect(self._fill)
        self.status = QLabel()
        self.status.setWordWrap(True)
        buttons = QHBoxLayout()
        buttons.addWidget(QLabel("Comment:"))
        buttons.addWidget(self.comment, 1)
        buttons.addWidget(self.revert_button)
        buttons.addWidget(self.save_button)
        inner = QWidget()
        inner.setLayout(self.form)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setWidget(inner)
        scroll.setFrameShape(QScrollArea.Shape.NoFrame)
        layout = QVBoxLayout(self)
        layout.addWidget(scroll, 1)
        layout.addLayout(buttons)
        layout.addWidget(self.status)
        self.allowed = guard(self.save_button, services, Operation.EDIT_SETTINGS)

    def show_settings(self, settings: list[SettingInfo]) -> None:
        self.settings = {s.key: s for s in settings}
        for info in settings:
            if info.key not in self.editors:
                self._add_row(info)
        self._fill()

    def _add_row(self, info: SettingInfo) -> None:
        editor: QLineEdit | QCheckBox
        if isinstance(info.default, bool):
            editor = QCheckBox(info.description)
        else:
            editor = QLineEdit()
            editor.setPlaceholderText(f"default: {info.default}" if info.default != "" else "empty: none")
            editor.setReadOnly(not self.allowed)
        editor.setEnabled(self.allowed or isinstance(editor, QLineEdit))
        editor.setObjectName(info.key)
        editor.setAccessibleName(_label(info.key))
        editor.setToolTip(info.description if self.allowed else self.save_button.toolTip())
        hint = QLabel()
        hint.setStyleSheet("color: palette(mid)")
        hint.setWordWrap(True)
        error = QLabel()
        error.setObjectName(f"{info.key}_error")
        error.setStyleSheet(ERROR_STYLE)
        error.setWordWrap(True)
        error.hide()
        field = QWidget()
        column = QVBoxLayout(field)
        column.setContentsMargins(0, 0, 0, 6)
        column.setSpacing(2)
        column.addWidget(editor)
        column.addWidget(hint)
        column.addWidget(error)
        label = QLabel(f"{_label(info.key)}:")
        label.setToolTip(info.description)
        label.setBuddy(editor)
        self.form.addRow(label, field)
        self.editors[info.key] = editor
        self.hints[info.key] = hint
        self.errors[info.key] = error

    def _fill(self) -> None:
        for key, info in self.settings.items():
            editor = self.editors[key]
            if isinstance(editor, QCheckBox):
                editor.setChecked(bool(info.value))
                hint = "" if info.value == info.default else f"Default: {'yes' if info.default else 'no'}. "
            else:
                editor.setText(str(info.value))
                hint = f"{info.description} " + (f"Default: {info.default}. " if info.value != info.default else "")
            if info.updated_by:
                hint += f"Changed {format_when(info.updated_at)} by {info.updated_by}."
            self.hints[key].setText(hint.strip())
            self.errors[key].hide()

    def value(self, key: str) -> Any:
        editor = self.editors[key]
        return editor.isChecked() if isinstance(editor, QCheckBox) else editor.text().strip()

    def changed(self) -> dict[str, Any]:
        """The settings whose editor differs from the saved value."""
        changes = {}
        for key, info in self.settings.items():
            value = self.value(key)
            if (value != info.value) if isinstance(value, bool) else (value != str(info.value)):
                changes[key] = value
        return changes

    async def save(self) -> None:
        changes = self.changed()
        for error in self.errors.values():
            error.hide()
        if not changes:
            self.status.setText("Nothing changed.")
            return
        comment = self.comment.text().strip()
        self.save_button.setEnabled(False)
        saved: list[SettingInfo] = []
        refused: dict[str, str] = {}
        for key, value in changes.items():
            try:
                saved.append(await off_ui_thread(
                    lambda k=key, v=value: self.services.settings.set(k, v, comment=comment)))
            except LayerDeskError as exc:
                refused[key] = str(exc)
        if not isValid(self):
            return
        self.save_button.setEnabled(True)
        for info in saved:
            self.settings[info.key] = info
        for key, why in refused.items():
            self.errors[key].setText(why)
            self.errors[key].show()
        self._fill_saved(saved)
        parts = []
        if saved:
            parts.append(f"Saved {', '.join(_label(s.key) for s in saved)}.")
        if refused:
            parts.append(f"Not saved: {', '.join(_label(k) for k in refused)} (see the message at each).")
        self.status.setText(" ".join(parts))
        self.status.setStyleSheet(ERROR_STYLE if refused else "")
        if saved:
            self.comment.clear()
        self.saved.emit(len(saved))

    def _fill_saved(self, saved: list[SettingInfo]) -> None:
        """Show what was saved; refused fields keep what the user typed, next to the reason."""
        for info in saved:
            editor = self.editors[info.key]
            if isinstance(editor, QCheckBox):
                editor.setChecked(bool(info.value))
            else:
                editor.setText(str(info.value))
            self.hints[info.key].setText(f"{info.description} Changed {format_when(info.updated_at)} "
                                         f"by {info.updated_by}.")


class SystemPage(QWidget):
    """Settings, audit log and About, as tabs, under the Backup…, Restore… and Log bundle… actions.
    ``runner`` runs their tasks (the window's; a page made without one makes its own on first use)."""

    loaded = Signal(int)  # number of settings after a load
    failed = Signal(str)
    about_loaded = Signal()
    #: A backup, restore or bundle ended: its kind ("backup", "restore", "bundle") and what to tell the user.
    action_finished = Signal(str, str)

    def __init__(self, services: Services, parent: QWidget | None = None, *, runner: TaskRunner | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("system")
        self.services = services
        self._runner = runner
        self._restore_strip: TaskProgress | None = None
        self.backup_button = QPushButton("&Backup…")
        self.backup_button.setToolTip("Back up the catalog and the layer repository to a folder (safe while "
                                      "LayerDesk works).")
        self.backup_button.clicked.connect(self._ask_backup)
        self.restore_button = QPushButton("&Restore…")
        self.restore_button.setToolTip("Replace the catalog and the layer repository with a backup's; everything "
                                       "is verified first.")
        self.restore_button.clicked.connect(self._ask_restore)
        self.bundle_button = QPushButton("&Log bundle…")
        self.bundle_button.setToolTip("Write a zip file for support: logs, task logs, versions and configurations, "
                                      "without passwords.")
        self.bundle_button.clicked.connect(self._ask_bundle)
        self.transfer_button = QPushButton("&Export / Import…")
        self.transfer_button.setToolTip("Move layers with all their versions to or from another LayerDesk "
                                        "installation through a folder or share.")
        self.transfer_button.clicked.connect(self._open_transfer)
        guard(self.transfer_button, services, Operation.RUN_TASKS, enabled=runner is not None)
        guard(self.backup_button, services, Operation.BACKUP_RESTORE)
        guard(self.restore_button, services, Operation.BACKUP_RESTORE)
        guard(self.bundle_button, services, Operation.SUPPORT_BUNDLE)
        self.action_status = QLabel()
        self.action_status.setObjectName("action_status")
        self.action_status.setWordWrap(True)
        self.action_status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.action_status.hide()
        self.tasks_area = QVBoxLayout()
        self.tasks_area.setContentsMargins(0, 0, 0, 0)
        self._loading: asyncio.Future[None] | None = None
        self._about: asyncio.Future[None] | None = None
        self.settings = SettingsEditor(services)
        self.audit: ListPage = audit_page(services)
        self.about = QWidget()
        self.about_form = QFormLayout(self.about)
        self.about_values: dict[str, QLabel] = {}
        intro = QLabel("<h3>LayerDesk</h3>Layered Windows image management: OS, platform and app layers "
                       "composited into disk images.")
        intro.setWordWrap(True)
        self.about_form.addRow(intro)
        for name in VERSION_ROWS:
            self._about_row(name, "…")
        home = services.home
        for name, value in (("Home folder", str(home.root)), ("Catalog", str(home.catalog)),
                            ("Layer repository", str(home.repository)), ("Logs", str(home.logs))):
            self._about_row(name, value)
        self.tabs = QTabWidget()
        self.tabs.addTab(self.settings, "Settings")
        self.tabs.addTab(self.audit, "Audit log")
        self.tabs.addTab(self.about, "About")
        self.tabs.currentChanged.connect(lambda _i: self._tab_shown())
        header = QHBoxLayout()
        header.addWidget(QLabel("<h2>System</h2>"), 1)
        for button in (self.transfer_button, self.backup_button, self.restore_button, self.bundle_button):
            header.addWidget(button)
        layout = QVBoxLayout(self)
        layout.addLayout(header)
        layout.addLayout(self.tasks_area)
        layout.addWidget(self.action_status)
        layout.addWidget(self.tabs, 1)

    def _about_row(self, name: str, value: str) -> None:
        label = self.about_values.get(name)
        if label is None:
            label = QLabel()
            label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
            label.setWordWrap(True)
            label.setObjectName(name)
            self.about_form.addRow(f"{name}:", label)
            self.about_values[name] = label
        label.setText(value)

    def refresh(self) -> None:
        """Reload the settings and the audit log (and gather the versions once), off the UI thread."""
        if self._loading is None or self._loading.done():
            self._loading = spawn(self._load())
        self.audit.refresh()
        self._tab_shown()

    def _tab_shown(self) -> None:
        if self.tabs.currentWidget() is self.about and self._about is None:
            self._about = spawn(self._load_about())

    async def _load(self) -> None:
        try:
            settings = await off_ui_thread(self.services.settings.list_settings)
        except LayerDeskError as exc:
            if isValid(self):
                self.settings.status.setText(str(exc))
                self.failed.emit(str(exc))
            return
        if not isValid(self):
            return
        self.settings.show_settings(settings)
        self.loaded.emit(len(settings))

    async def _load_about(self) -> None:
        versions = await off_ui_thread(lambda: component_versions(self.services))
        if not isValid(self):
            return
        for name, value in versions:
            self._about_row(name, value)
        self.about_loaded.emit()

    # --- backup, restore, log bundle ------------------------------------------------------------

    @property
    def runner(self) -> TaskRunner:
        if self._runner is None:
            self._runner = TaskRunner(self.services.catalog, self.services.caller)
            self.destroyed.connect(self._runner.shutdown)
        return self._runner

    def _say(self, text: str, *, error: bool = False) -> None:
        self.action_status.setText(text)
        self.action_status.setStyleSheet(ERROR_STYLE if error else "")
        self.action_status.show()

    def _watch(self, task_id: int, what: str, on_end: Any) -> TaskProgress:
        strip = TaskProgress(self.services, task_id, what, self)
        strip.finished.connect(on_end)
        self.tasks_area.addWidget(strip)
        return strip

    def task_strips(self) -> list[TaskProgress]:
        return self.findChildren(TaskProgress)

    def _busy(self, busy: bool) -> None:
        for button, operation in ((self.backup_button, Operation.BACKUP_RESTORE),
                                  (self.restore_button, Operation.BACKUP_RESTORE),
                                  (self.bundle_button, Operation.SUPPORT_BUNDLE)):
            guard(button, self.services, operation, enabled=not busy)

    def _open_transfer(self) -> QDialog | None:
        """The export / import dialog (its tasks run on the console's runner)."""
        if self._runner is None:
            return None
        from ui.transfer_dialog import TransferDialog

        dialog = TransferDialog(self.services, self._runner, self)
        dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        dialog.open()
        return dialog

    def _ask_backup(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Back up LayerDesk into a folder")
        if folder:
            spawn(self.start_backup(Path(folder)))

    def _ask_restore(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Choose the backup folder to restore")
        if folder:
            spawn(self._confirm_restore(Path(folder)))

    def _ask_bundle(self) -> None:
        name = f"layerdesk-support-{datetime.now(UTC).strftime('%Y%m%d-%H%M')}.zip"
        path, _filter = QFileDialog.getSaveFileName(self, "Save the support log bundle", str(Path.home() / name),
                                                    "Zip files (*.zip)")
        if path:
            spawn(self.start_bundle(Path(path)))

    async def start_backup(self, to: Path) -> int | None:
        """Start a backup into ``to`` (a new folder, or a folder to make one in); its progress is shown."""
        try:
            task_id = await off_ui_thread(lambda: backup_service(self.services).backup(self.runner, to))
        except LayerDeskError as exc:
            if isValid(self):
                self._say(f"Backup not started: {exc}", error=True)
                self.action_finished.emit("backup", str(exc))
            return None
        if isValid(self):
            self._busy(True)
            self._watch(task_id, f"Backup (task {task_id})", lambda task: self._ended("backup", task))
        return task_id

    async def start_bundle(self, to: Path) -> int | None:
        """Start writing the support bundle ``to`` (a new .zip file)."""
        try:
            task_id = await off_ui_thread(lambda: self.runner.submit(LogBundleTask(self.services, to)))
        except LayerDeskError as exc:
            if isValid(self):
                self._say(f"Log bundle not written: {exc}", error=True)
                self.action_finished.emit("bundle", str(exc))
            return None
        if isValid(self):
            self._watch(task_id, f"Log bundle (task {task_id})", lambda task: self._ended("bundle", task))
        return task_id

    async def _confirm_restore(self, source: Path) -> None:
        if await confirm(self, "Restore from a backup",
                         f"Replace this home's catalog and layer repository with the backup in\n{source}?\n\n"
                         "The backup is verified completely first; nothing is replaced if anything is wrong. "
                         "Changes made since the backup are lost (the replaced catalog is kept in the backups "
                         "folder).", action="Restore"):
            await self.start_restore(source)

    async def start_restore(self, source: Path) -> int | None:
        """Start verifying the backup ``source``; when that task completes, the home is replaced
        (:meth:`_complete_restore`)."""
        try:
            task_id = await off_ui_thread(lambda: backup_service(self.services).restore(self.runner, source))
        except LayerDeskError as exc:
            if isValid(self):
                self._say(f"Restore refused: {exc}", error=True)
                self.action_finished.emit("restore", str(exc))
            return None
        if isValid(self):
            self._busy(True)
            self._restore_strip = self._watch(task_id, f"Verifying the backup (task {task_id})", self._verified)
        return task_id

    def _verified(self, task: TaskInfo) -> None:
        if task.state is not TaskState.COMPLETE:
            self._ended("restore", task)
            return
        spawn(self._complete_restore(str((task.result or {}).get("staging", ""))))

    async def _complete_restore(self, staging: str) -> None:
        try:
            report: RestoreReport = await off_ui_thread(
                lambda: backup_service(self.services).complete_restore(staging))
        except LayerDeskError as exc:
            if isValid(self):
                self._busy(False)
                self._say(f"Restore failed: {exc}", error=True)
                self.action_finished.emit("restore", str(exc))
            return
        if not isValid(self):
            return
        self._busy(False)
        try:
            made = format_when(datetime.fromisoformat(report.created_at))
        except ValueError:
            made = report.created_at
        text = (f"Restored from {report.source} (made {made} by {report.created_by}). "
                + " ".join(report.notes) + " Restart the console to work with the restored catalog.")
        if self._restore_strip is not None and isValid(self._restore_strip):
            self._restore_strip.label.setText(f"Restore from {report.source}: done.")
        self._say(text)
        show_message(self, "Restore complete", text, icon=QMessageBox.Icon.Information)
        self.action_finished.emit("restore", text)
        self.refresh()

    def _ended(self, kind: str, task: TaskInfo) -> None:
        if not isValid(self):
            return
        if kind != "bundle":
            self._busy(False)
        ok = task.state is TaskState.COMPLETE or task.state is TaskState.DONE_WITH_ERRORS
        state = task.state.value.replace("_", " ").capitalize()
        text = task.message if ok else f"{state}: {task.error or task.message}"
        self.action_status.hide()  # the task's strip says how it ended
        self.action_finished.emit(kind, text)
        if kind == "backup":
            self.audit.refresh()
