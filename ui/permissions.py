"""Role-based enabling of the console's buttons: an action the signed-in administrator may not do is
disabled, and its tooltip says which role it needs (the services refuse it anyway; this only says so early)."""

from __future__ import annotations

from PySide6.QtGui import QAction
from PySide6.QtWidgets import QWidget

from app.errors import PermissionDenied
from app.services import Services
from app.services.rbac import Operation

#: The widget's own tooltip, kept while a refusal replaces it.
_OWN_TOOLTIP = "layerdesk_own_tooltip"


def refusal(services: Services, *operations: Operation) -> str | None:
    """Why the caller may not do all of ``operations`` (the services' own wording), or ``None``."""
    for operation in operations:
        try:
            services.caller.require(operation)
        except PermissionDenied as exc:
            return str(exc)
    return None


def guard(widget: QWidget | QAction, services: Services, *operations: Operation, enabled: bool = True) -> bool:
    """Enable ``widget`` when the caller may do every one of ``operations`` and ``enabled`` (a page's own
    condition, e.g. "a row is selected") holds; otherwise disable it. When a role is missing, the tooltip
    says which one; the widget's own tooltip comes back once it is allowed. Call it again whenever the
    operation or the condition changes. Returns whether the caller is allowed."""
    own = widget.property(_OWN_TOOLTIP)
    if own is None:
        own = widget.toolTip()
        widget.setProperty(_OWN_TOOLTIP, own)
    why = refusal(services, *operations)
    widget.setEnabled(why is None and enabled)
    widget.setToolTip(why if why is not None else str(own))
    return why is None
