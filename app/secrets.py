"""Secrets (bind passwords, connector credentials, sign-in sessions) live in the OS keyring only.

Never in the catalog, logs, command lines or exception messages. When no keyring is usable (a headless
Linux without Secret Service), the caller gets a clear :class:`SecretStoreUnavailable`.
"""

from __future__ import annotations

import keyring
import keyring.errors

from app.errors import SecretStoreUnavailable

SERVICE = "LayerDesk"

_NO_KEYRING = (
    "No usable OS keyring is available to keep LayerDesk's secrets. On Windows the Credential Manager "
    "is used; on Linux start and unlock a Secret Service (for example gnome-keyring). Nothing was saved."
)


class SecretStore:
    """Named secrets of one LayerDesk installation, kept apart from other installations' secrets."""

    def __init__(self, installation_id: str) -> None:
        self._prefix = installation_id

    def _key(self, name: str) -> str:
        return f"{self._prefix}/{name}"

    def set(self, name: str, value: str) -> None:
        try:
            keyring.set_password(SERVICE, self._key(name), value)
        except keyring.errors.NoKeyringError:
            raise SecretStoreUnavailable(_NO_KEYRING) from None
        except keyring.errors.KeyringError as exc:
            raise SecretStoreUnavailable(f"The OS keyring refused to store a secret: {type(exc).__name__}.") from None

    def get(self, name: str) -> str | None:
        try:
            return keyring.get_password(SERVICE, self._key(name))
        except keyring.errors.NoKeyringError:
            raise SecretStoreUnavailable(_NO_KEYRING) from None
        except keyring.errors.KeyringError as exc:
            raise SecretStoreUnavailable(f"The OS keyring could not be read: {type(exc).__name__}.") from None

    def delete(self, name: str) -> None:
        try:
            keyring.delete_password(SERVICE, self._key(name))
        except keyring.errors.PasswordDeleteError:
            return
        except keyring.errors.NoKeyringError:
            raise SecretStoreUnavailable(_NO_KEYRING) from None
        except keyring.errors.KeyringError as exc:
            raise SecretStoreUnavailable(f"The OS keyring could not delete a secret: {type(exc).__name__}.") from None
