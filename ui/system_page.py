"""The System page: the system settings (checked and saved by the settings service, its refusals shown at
the field), the audit log with a search box, and About (versions of LayerDesk and what it runs on)."""

from __future__ import annotations

import asyncio
import platform
from typing import Any

import PySide6
from PySide6.QtCore import Qt, Signal, qVersion
from PySide6.QtWidgets import (
    QCheckBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QScrollArea,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)
from shiboken6 import isValid

from app import __version__
from app.errors import LayerDeskError
from app.services import Services
from app.services.rbac import Operation
from app.services.views import SettingInfo
from ui.background import off_ui_thread
from ui.pages import ListPage, audit_page, format_when, spawn
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
    """Settings, audit log and About, as tabs."""

    loaded = Signal(int)  # number of settings after a load
    failed = Signal(str)
    about_loaded = Signal()

    def __init__(self, services: Services, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("system")
        self.services = services
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
        layout = QVBoxLayout(self)
        layout.addWidget(QLabel("<h2>System</h2>"))
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
