"""Role-based access control: who may do what, in one table.

The eight roles are App Layering's. Administrator may do everything; every other role adds the right to
change one area. Every role, Read Only included, may read the whole catalog. A caller with no role at
all may do nothing, not even read.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from app.catalog.models import LayerType, PrincipalKind, Role
from app.errors import PermissionDenied


class Operation(enum.Enum):
    """A kind of change, with the words used when it is refused and the roles that allow it."""

    def __init__(self, wording: str, roles: frozenset[Role]) -> None:
        self.wording = wording
        self.roles = roles | {Role.ADMINISTRATOR}

    EDIT_OS_LAYERS = ("create, change or delete OS layers", frozenset({Role.MANAGE_OS_LAYERS}))
    EDIT_PLATFORM_LAYERS = (
        "create, change or delete platform layers",
        frozenset({Role.MANAGE_PLATFORM_LAYERS}),
    )
    EDIT_APP_LAYERS = ("create, change or delete app layers", frozenset({Role.MANAGE_APP_LAYERS}))
    #: Checked before a layer is looked up, so a caller with no layer role learns nothing of what
    #: exists; the role for the layer's type is checked once it is found.
    EDIT_ANY_LAYERS = (
        "create, change or delete layers",
        frozenset({Role.MANAGE_OS_LAYERS, Role.MANAGE_PLATFORM_LAYERS, Role.MANAGE_APP_LAYERS}),
    )
    EDIT_TEMPLATES = (
        "create, change or delete image templates",
        frozenset({Role.MANAGE_IMAGE_TEMPLATES}),
    )
    PUBLISH_IMAGES = ("publish layered images", frozenset({Role.PUBLISH_LAYERED_IMAGES}))
    EDIT_ELASTIC_ASSIGNMENTS = (
        "change elastic layer assignments and machine associations",
        frozenset({Role.MANAGE_ELASTIC_ASSIGNMENTS}),
    )
    EDIT_STORAGE = ("change user layer storage locations", frozenset[Role]())
    EDIT_CONNECTORS = ("change connector configurations", frozenset[Role]())
    EDIT_DIRECTORY = ("change directory junctions", frozenset[Role]())
    EDIT_SETTINGS = ("change system settings", frozenset[Role]())
    EDIT_ACCESS = ("change local accounts and role grants", frozenset[Role]())
    MANAGE_ALL_TASKS = ("cancel or purge tasks started by others", frozenset[Role]())
    #: Starting and cancelling one's own tasks: any role that may change something.
    RUN_TASKS = (
        "run tasks",
        frozenset(set(Role) - {Role.READ_ONLY}),
    )
    READ = ("read the catalog", frozenset(Role))
    BACKUP_RESTORE = ("back up or restore the LayerDesk home", frozenset[Role]())
    SUPPORT_BUNDLE = ("write a support log bundle", frozenset[Role]())


LAYER_OPERATION = {
    LayerType.OS: Operation.EDIT_OS_LAYERS,
    LayerType.PLATFORM: Operation.EDIT_PLATFORM_LAYERS,
    LayerType.APP: Operation.EDIT_APP_LAYERS,
}


@dataclass(frozen=True)
class Caller:
    """The signed-in administrator on whose behalf a service acts."""

    username: str
    roles: frozenset[Role]
    kind: PrincipalKind = PrincipalKind.OS_USER
    #: Set when the caller is the built-in administrator of an embedded catalog.
    builtin: bool = False
    display_name: str = field(default="", compare=False)

    def may(self, operation: Operation) -> bool:
        return bool(self.roles & operation.roles)

    def require(self, operation: Operation) -> None:
        if self.may(operation):
            return
        held = ", ".join(sorted(r.value for r in self.roles)) or "no role"
        # The specific roles first, Administrator (who may do everything) last.
        needed = " or ".join([*sorted(r.value for r in operation.roles - {Role.ADMINISTRATOR}), "Administrator"])
        raise PermissionDenied(
            f"{self.username} ({held}) may not {operation.wording}: that needs the {needed} role. "
            "Ask an Administrator to grant it."
        )

    def describe(self) -> str:
        held = ", ".join(sorted(r.value for r in self.roles)) or "no role"
        return f"{self.username} ({held})"
