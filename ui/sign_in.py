"""Sign-in dialog for catalogs that require it. Checking the password runs off the UI thread."""

from __future__ import annotations

import asyncio

from PySide6.QtWidgets import QDialog, QDialogButtonBox, QFormLayout, QLabel, QLineEdit

from app.catalog.database import Catalog
from app.errors import LayerDeskError
from app.services.access import sign_in
from app.services.rbac import Caller
from ui.background import off_ui_thread


class SignInDialog(QDialog):
    def __init__(self, catalog: Catalog) -> None:
        super().__init__()
        self.setWindowTitle("Sign in to LayerDesk")
        self._catalog = catalog
        self.caller: Caller | None = None
        self.token: str | None = None
        self.username = QLineEdit()
        self.username.setAccessibleName("User name")
        self.password = QLineEdit(echoMode=QLineEdit.EchoMode.Password)
        self.password.setAccessibleName("Password")
        self.message = QLabel()
        self.message.setWordWrap(True)
        self.buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        self.buttons.accepted.connect(lambda: asyncio.ensure_future(self._check()))
        self.buttons.rejected.connect(self.reject)
        form = QFormLayout(self)
        form.addRow(QLabel("This catalog requires sign-in."))
        form.addRow("&User name:", self.username)
        form.addRow("&Password:", self.password)
        form.addRow(self.message)
        form.addRow(self.buttons)

    async def _check(self) -> None:
        self.buttons.setEnabled(False)
        self.message.setText("Checking…")
        try:
            self.token, self.caller = await off_ui_thread(
                sign_in, self._catalog, self.username.text().strip(), self.password.text())
        except LayerDeskError as exc:
            self.message.setText(str(exc))
            self.password.clear()
            self.password.setFocus()
            return
        finally:
            self.buttons.setEnabled(True)
        self.accept()
