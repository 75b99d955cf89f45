"""The error vocabulary shared by services, the CLI and the console.

Two families, as an administrator sees them:

* :class:`UserError` – something the user can fix (a bad name, a missing role, an unknown layer).
  The message says what is wrong and, where possible, what to do. Never shown with a traceback.
* :class:`EnvironmentProblem` – the machine's fault (disk full, catalog locked or damaged, no keyring).
  Shown to the user with the remedy; not a bug in LayerDesk.

Anything else that escapes is a bug in LayerDesk and is reported as such (crash dialog / log).
"""

from __future__ import annotations


class LayerDeskError(Exception):
    """Base class of every error LayerDesk raises on purpose."""

    #: A stable, machine-readable code (used in ``layerctl --json`` error objects).
    code = "error"
    #: The process exit status ``layerctl`` uses for this family.
    exit_status = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UserError(LayerDeskError):
    """The request cannot be carried out as given; the user can fix it."""

    code = "invalid"
    exit_status = 3


class ValidationError(UserError):
    """An input value is not acceptable (name, size, priority list, ...)."""

    code = "validation"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class NotFound(UserError):
    """The named object does not exist in the catalog."""

    code = "not_found"
    exit_status = 5


class Conflict(UserError):
    """The change clashes with what the catalog holds (duplicate, still in use, wrong state)."""

    code = "conflict"
    exit_status = 6


class PermissionDenied(UserError):
    """The signed-in administrator's roles do not allow the operation."""

    code = "permission_denied"
    exit_status = 4


class AuthenticationFailed(UserError):
    """Sign-in failed or is required."""

    code = "authentication"
    exit_status = 4


class EnvironmentProblem(LayerDeskError):
    """The environment stops the operation (disk, locks, damaged files, missing keyring)."""

    code = "environment"
    exit_status = 1


class CatalogError(EnvironmentProblem):
    """The catalog database cannot be opened or used as it is."""

    code = "catalog"


class SecretStoreUnavailable(EnvironmentProblem):
    """No usable OS keyring: secrets cannot be stored or read."""

    code = "keyring"
