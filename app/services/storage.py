r"""User Layer storage locations: SMB paths for AD groups, tried in priority order.

A user's layer lives at ``<location>\Users\<Domain>_<Username>\<OSLayerID>_<OSLayerName>\``; the first
location (lowest priority number) assigned to one of the user's groups wins.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import func, select
from sqlalchemy.orm import Session, selectinload

from app.catalog.models import StorageLocation, StorageLocationGroup
from app.errors import Conflict, NotFound, ValidationError
from app.services.base import Service
from app.services.rbac import Operation
from app.services.validation import (
    check_unique,
    validate_name,
    validate_principal_name,
    validate_sid,
    validate_unc_path,
)
from app.services.views import StorageLocationInfo

if TYPE_CHECKING:
    from app.directory import DirectoryClient, DirectoryPrincipal

MAX_USER_LAYER_GB = 2040  # the VHD format's limit


@dataclass(frozen=True)
class UserLayerPlace:
    """Where one user's User Layer for one image template's OS layer lives, and why there."""

    user: str  # DOMAIN\name
    user_sid: str
    template: str
    os_layer_id: int
    os_layer: str
    location: str
    location_path: str
    priority: int
    #: The user's group the location is assigned to (the first, by name, when several are).
    group_sid: str
    group_name: str
    folder: str
    size_gb: int
    #: Other locations the user's groups also have, in priority order (lower priority: not used).
    also: tuple[str, ...] = ()


def user_layer_folder(location_path: str, domain: str, username: str, os_layer_id: int, os_layer_name: str) -> str:
    """The folder that holds one user's layer for one OS layer."""
    for part, what in ((domain, "domain"), (username, "user name"), (os_layer_name, "OS layer name")):
        validate_name(part, what, max_length=256)
    return f"{location_path.rstrip(chr(92))}\\Users\\{domain}_{username}\\{os_layer_id}_{os_layer_name}\\"


def _info(row: StorageLocation) -> StorageLocationInfo:
    return StorageLocationInfo(
        row.id, row.name, row.path, row.priority, row.default_size_gb,
        tuple((g.group_sid, g.group_name) for g in row.groups),
    )


def _groups(groups: Sequence[tuple[str, str]]) -> list[StorageLocationGroup]:
    parsed = [(validate_sid(sid), validate_principal_name(name, "group name")) for sid, name in groups]
    check_unique([sid for sid, _ in parsed], "The group list")
    return [StorageLocationGroup(group_sid=sid, group_name=name) for sid, name in parsed]


def _size(size_gb: int) -> int:
    if isinstance(size_gb, bool) or not isinstance(size_gb, int) or not 1 <= size_gb <= MAX_USER_LAYER_GB:
        raise ValidationError(f"The default user layer size must be 1–{MAX_USER_LAYER_GB} GB; got {size_gb!r}.")
    return size_gb


class StorageService(Service):
    def list_locations(self) -> list[StorageLocationInfo]:
        with self._read() as session:
            rows = session.scalars(
                select(StorageLocation).options(selectinload(StorageLocation.groups)).order_by(StorageLocation.priority)
            )
            return [_info(r) for r in rows]

    def add_location(
        self,
        name: str,
        path: str,
        *,
        groups: Sequence[tuple[str, str]] = (),
        default_size_gb: int = 10,
        comment: str = "",
    ) -> StorageLocationInfo:
        """Add a location after the existing ones (lowest priority)."""
        with self._change(Operation.EDIT_STORAGE, "storage.add", "storage location", name, comment) as change:
            name = validate_name(name, "storage location name")
            path = validate_unc_path(path, "storage location path")
            session = change.session
            if session.scalars(select(StorageLocation).where(StorageLocation.name == name)).first():
                raise Conflict(f"A storage location named {name!r} already exists.")
            if session.scalars(select(StorageLocation).where(func.lower(StorageLocation.path) == path.lower())).first():
                raise Conflict(f"Another storage location already uses {path}.")
            last = session.scalar(select(func.max(StorageLocation.priority))) or 0
            row = StorageLocation(name=name, path=path, priority=last + 1, default_size_gb=_size(default_size_gb),
                                  groups=_groups(groups))
            session.add(row)
            session.flush()
            change.details = {"path": path, "groups": [g.group_name for g in row.groups]}
            return _info(row)

    def update_location(
        self,
        name: str,
        *,
        path: str | None = None,
        groups: Sequence[tuple[str, str]] | None = None,
        default_size_gb: int | None = None,
        comment: str = "",
    ) -> StorageLocationInfo:
        with self._change(Operation.EDIT_STORAGE, "storage.update", "storage location", name, comment) as change:
            row = self._row(change.session, name)
            details: dict[str, object] = {}
            if path is not None:
                path = validate_unc_path(path, "storage location path")
                clash = change.session.scalars(
                    select(StorageLocation.name).where(
                        func.lower(StorageLocation.path) == path.lower(), StorageLocation.id != row.id
                    )
                ).first()
                if clash is not None:
                    raise Conflict(f"Another storage location ({clash!r}) already uses {path}.")
                details["path"] = [row.path, path]
                row.path = path
            if groups is not None:
                new_groups = _groups(groups)
                details["groups"] = [[g.group_name for g in row.groups], [g.group_name for g in new_groups]]
                row.groups = new_groups
            if default_size_gb is not None:
                details["default_size_gb"] = [row.default_size_gb, _size(default_size_gb)]
                row.default_size_gb = default_size_gb
            change.details = details
            change.session.flush()
            return _info(row)

    def reorder(self, names: Sequence[str], *, comment: str = "") -> list[StorageLocationInfo]:
        """Set the priority order; ``names`` lists every location, first tried first."""
        with self._change(Operation.EDIT_STORAGE, "storage.reorder", "storage location", "priority", comment) as change:
            session = change.session
            rows = list(session.scalars(select(StorageLocation).order_by(StorageLocation.priority)))
            check_unique(names, "The priority list")
            by_name = {r.name.casefold(): r for r in rows}
            unknown = [n for n in names if n.casefold() not in by_name]
            if unknown:
                raise ValidationError(f"There is no storage location named {unknown[0]!r}.")
            missing = [r.name for r in rows if r.name.casefold() not in {n.casefold() for n in names}]
            if missing:
                raise ValidationError("The priority list must name every storage location; it leaves out "
                                      + ", ".join(repr(m) for m in missing) + ".")
            before = [r.name for r in rows]
            ordered = [by_name[n.casefold()] for n in names]
            for index, row in enumerate(ordered):
                row.priority = -1 - index
            session.flush()
            for index, row in enumerate(ordered):
                row.priority = index + 1
            session.flush()
            change.details = {"order": [before, [r.name for r in ordered]]}
            return [_info(r) for r in ordered]

    def user_layer_location(self, user: str, template: str) -> UserLayerPlace:
        """Where ``user``'s (a name, ``DOMAIN\\user``, UPN or SID) User Layer for ``template`` lives: in
        the highest-priority location assigned to any of the user's groups, nested membership included.
        Raises :class:`NotFound` for an unknown user or template, or when no location applies."""
        from app.services.directory import ask_about_user, enabled_junctions
        from app.services.templates import find_template

        if not (user or "").strip():
            raise ValidationError("Name the user (user, DOMAIN\\user, user@domain or a SID).", field="user")
        with self._read() as session:
            found_template = find_template(session, template)
            os_layer = found_template.os_version.layer
            template_name, os_layer_id, os_layer_name = found_template.name, os_layer.id, os_layer.name
            locations = [_info(r) for r in session.scalars(
                select(StorageLocation).options(selectinload(StorageLocation.groups))
                .order_by(StorageLocation.priority))]
            junctions = enabled_junctions(session, self._ctx.secrets)

        def groups_and_domain(client: DirectoryClient, principal: DirectoryPrincipal) -> tuple[set[str], str]:
            groups = set(client.token_group_sids(principal.dn))
            groups.update(g.sid for g in client.nested_groups(principal.dn))
            return groups, client.domain().netbios_name

        _, principal, (groups, domain) = ask_about_user(junctions, user, groups_and_domain)
        usable = [loc for loc in locations if any(sid in groups for sid, _ in loc.groups)]
        if not usable:
            raise NotFound(
                f"No storage location is assigned to {principal.qualified_name} or any of their groups "
                f"({len(groups)} checked, nested included); `layerctl storage list` shows the locations.")
        best = usable[0]
        group_sid, group_name = next((sid, name) for sid, name in best.groups if sid in groups)
        return UserLayerPlace(
            user=principal.qualified_name, user_sid=principal.sid, template=template_name,
            os_layer_id=os_layer_id, os_layer=os_layer_name, location=best.name, location_path=best.path,
            priority=best.priority, group_sid=group_sid, group_name=group_name,
            folder=user_layer_folder(best.path, domain, principal.name, os_layer_id, os_layer_name),
            size_gb=best.default_size_gb, also=tuple(loc.name for loc in usable[1:]),
        )

    def remove_location(self, name: str, *, comment: str = "") -> None:
        with self._change(Operation.EDIT_STORAGE, "storage.remove", "storage location", name, comment) as change:
            row = self._row(change.session, name)
            change.details = {"path": row.path}
            change.session.delete(row)

    @staticmethod
    def _row(session: Session, name: str) -> StorageLocation:
        row = session.scalars(select(StorageLocation).where(StorageLocation.name == name)).one_or_none()
        if row is None:
            raise NotFound(f"There is no storage location named {name!r}.")
        return row
