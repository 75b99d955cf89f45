"""The directory picker: a box that searches Active Directory users and groups as you type, and the list of
what it found. Searches wait for a short pause in the typing, run in a worker thread (the directory may be
slow or unreachable; the console keeps turning), and an answer that comes back for an older text is dropped.
"Searching…", "no match" and the directory's own error show under the box.

:class:`DirectoryPicker` is the widget (pages embed it); :class:`DirectoryPickerDialog` asks for one
principal. The chosen user or group is an :class:`app.console.elastic.PrincipalChoice` (name, SID, kind).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtGui import QHideEvent, QKeyEvent, QShowEvent
from PySide6.QtWidgets import (
    QDialog,
    QDialogButtonBox,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QVBoxLayout,
    QWidget,
)
from shiboken6 import isValid

from app.catalog.models import PrincipalKind
from app.console.elastic import SEARCH_DELAY_MS, SEARCH_LIMIT, PrincipalChoice, SearchGate, kind_words, search_status
from app.errors import LayerDeskError
from app.services import Services
from app.services.directory import DirectoryLookup
from ui.background import off_ui_thread
from ui.icons import icon
from ui.pages import spawn

if TYPE_CHECKING:
    from app.directory import DirectoryPrincipal

log = logging.getLogger(__name__)

#: The role of a result row that holds its :class:`PrincipalChoice`.
CHOICE_ROLE = Qt.ItemDataRole.UserRole + 1
BOTH = (PrincipalKind.AD_USER, PrincipalKind.AD_GROUP)
ERROR_STYLE = "color: #b00020"

Search = Callable[[str, int], "Sequence[DirectoryPrincipal]"]


class _SearchBox(QLineEdit):
    """The search box: Down moves into the results, so the keyboard alone picks."""

    def __init__(self, results: QListWidget, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._results = results

    def keyPressEvent(self, event: QKeyEvent) -> None:
        if event.key() == Qt.Key.Key_Down and self._results.count():
            self._results.setFocus()
            if self._results.currentRow() < 0:
                self._results.setCurrentRow(0)
            event.accept()
            return
        super().keyPressEvent(event)


class DirectoryPicker(QWidget):
    """Search the directory for users and/or groups and pick one."""

    #: A result was chosen (double-click or Enter): the :class:`PrincipalChoice`.
    chosen = Signal(object)
    #: The selected result changed (``None`` when nothing is selected).
    selected = Signal(object)
    #: A search's answer (results, no match or an error) is shown.
    searched = Signal()

    def __init__(self, services: Services, kinds: Sequence[PrincipalKind] = BOTH, *,
                 limit: int = SEARCH_LIMIT, search: Search | None = None, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("directory_picker")
        self._kinds = tuple(kinds)
        self._limit = limit
        self._search = search or DirectoryLookup.for_services(services).search_principals
        self._gate = SearchGate()
        self._running: asyncio.Future[None] | None = None
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(SEARCH_DELAY_MS)
        self._timer.timeout.connect(self._start)
        self._resume = False  # a search was due when the picker was hidden

        self.results = QListWidget()
        self.results.setObjectName("directory_results")
        self.results.setAccessibleName("Users and groups found")
        self.results.setUniformItemSizes(True)
        self.results.itemDoubleClicked.connect(lambda _item: self._choose())
        self.results.itemActivated.connect(lambda _item: self._choose())
        self.results.currentRowChanged.connect(lambda _row: self.selected.emit(self.current()))
        what = kind_words(self._kinds)
        self.edit = _SearchBox(self.results)
        self.edit.setPlaceholderText(f"Search the directory: type the start of a {what} name…")
        self.edit.setAccessibleName(f"Search for a {what}")
        self.edit.setClearButtonEnabled(True)
        self.edit.textChanged.connect(self._typed)
        self.edit.returnPressed.connect(self._return_pressed)
        self.status = QLabel(search_status("", None, self._kinds))
        self.status.setObjectName("picker_status")
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.edit)
        layout.addWidget(self.results, 1)
        layout.addWidget(self.status)

    # --- what was found and chosen -------------------------------------------------------------------

    def current(self) -> PrincipalChoice | None:
        item = self.results.currentItem()
        if item is None or not item.isSelected():
            return None
        choice = item.data(CHOICE_ROLE)
        return choice if isinstance(choice, PrincipalChoice) else None

    def found(self) -> list[PrincipalChoice]:
        return [self.results.item(row).data(CHOICE_ROLE) for row in range(self.results.count())]

    def typed_text(self) -> str:
        return self.edit.text().strip()

    def select(self, name: str) -> bool:
        """Select the result whose name (``DOMAIN\\name`` or the part after the backslash) is ``name``."""
        wanted = name.casefold()
        for row, choice in enumerate(self.found()):
            if wanted in (choice.name.casefold(), choice.name.rpartition("\\")[2].casefold()):
                self.results.setCurrentRow(row)
                return True
        return False

    def _choose(self) -> None:
        choice = self.current()
        if choice is not None:
            self.chosen.emit(choice)

    def _return_pressed(self) -> None:
        # Enter in the box takes the only result, or the selected one.
        if self.results.count() == 1:
            self.results.setCurrentRow(0)
        self._choose()

    def hideEvent(self, event: QHideEvent) -> None:
        # a closed picker does not search; shown again, it searches for what the box holds
        self._resume = self._timer.isActive()
        self._timer.stop()
        super().hideEvent(event)

    def showEvent(self, event: QShowEvent) -> None:
        super().showEvent(event)
        if self._resume:
            self._resume = False
            self._timer.start()

    # --- searching -----------------------------------------------------------------------------------

    def _typed(self, text: str) -> None:
        self._gate.typed(text)
        self.status.setStyleSheet("")
        self.results.clear()
        self._timer.stop()
        if not self._gate.wanted:
            self.status.setText(search_status("", None, self._kinds))
            return
        self.status.setText(search_status(text, None, self._kinds))
        self._timer.start()

    def search_now(self) -> None:
        """Search for the box's text without waiting for the pause (Refresh)."""
        self._timer.stop()
        if self._gate.wanted:
            self._start()

    def _start(self) -> None:
        self._running = spawn(self._run(self._gate.generation, self._gate.text))

    async def _run(self, generation: int, text: str) -> None:
        try:
            principals = await off_ui_thread(self._search, text, self._limit)
        except LayerDeskError as exc:
            if isValid(self) and self._gate.is_current(generation):
                log.info("directory search for %r failed: %s", text, exc)
                self.status.setText(search_status(text, None, self._kinds, error=str(exc)))
                self.status.setStyleSheet(ERROR_STYLE)
                self.searched.emit()
            return
        if not isValid(self) or not self._gate.is_current(generation):
            return  # the box changed meanwhile: a newer search answers
        choices = [PrincipalChoice.from_directory(p) for p in principals]
        choices = [c for c in choices if c.kind in self._kinds]
        for choice in choices:
            item = QListWidgetItem(icon("users" if choice.is_group else "user"), choice.label)
            item.setData(CHOICE_ROLE, choice)
            item.setToolTip(f"{'Group' if choice.is_group else 'User'} {choice.name}\nSID {choice.sid}")
            self.results.addItem(item)
        self.status.setText(search_status(text, len(choices), self._kinds, limit=self._limit))
        self.searched.emit()


class DirectoryPickerDialog(QDialog):
    """Ask for one user or group; :attr:`choice` holds it once accepted."""

    def __init__(self, services: Services, title: str, kinds: Sequence[PrincipalKind] = BOTH, *,
                 intro: str = "", search: Search | None = None, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("directory_picker_dialog")
        self.setWindowTitle(title)
        self.resize(520, 420)
        self.choice: PrincipalChoice | None = None
        self.picker = DirectoryPicker(services, kinds, search=search)
        self.picker.chosen.connect(self._chosen)
        self.buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        self.ok = self.buttons.button(QDialogButtonBox.StandardButton.Ok)
        self.picker.selected.connect(lambda c: self.ok.setEnabled(c is not None))
        self.ok.setEnabled(False)
        self.ok.setAutoDefault(False)
        self.ok.setDefault(False)  # Enter in the search box picks a result, not the button
        self.buttons.accepted.connect(lambda: self._chosen(self.picker.current()))
        self.buttons.rejected.connect(self.reject)
        layout = QVBoxLayout(self)
        if intro:
            text = QLabel(intro)
            text.setWordWrap(True)
            layout.addWidget(text)
        layout.addWidget(self.picker, 1)
        layout.addWidget(self.buttons)
        self.picker.edit.setFocus()

    def _chosen(self, choice: PrincipalChoice | None) -> None:
        if choice is None:
            return
        self.choice = choice
        self.accept()
