r"""User Layer storage locations: SMB paths for AD groups, tried in priority order.

A user's layer lives at ``<location>\Users\<Domain>_<Username>\<OSLayerID>_<OSLayerName>\``; the first
location (lowest priority number) assigned to one of the user's groups wins.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

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
    from app.directory import DirectoryClient, DirectoryPrincipal, DirectorySettings
    from app.elastic.userlayers import UserLayerFolder

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


@dataclass(frozen=True)
class UserLayerReport:
    """The User Layers found on one storage location's share."""

    location: str | None  # the storage location's name; None for a path that is not one
    path: str
    folders: tuple[UserLayerFolder, ...]

    @property
    def orphans(self) -> tuple[UserLayerFolder, ...]:
        from app.elastic.userlayers import UserLayerStatus

        return tuple(f for f in self.folders if f.status is UserLayerStatus.ORPHANED)


def _directory_users(junctions: Sequence[tuple[str, DirectorySettings]]) -> dict[str, frozenset[str]]:
    """Each junction's domain (NetBIOS name) and the logon names of every user in it, case-folded: one
    paged search per junction, so a share with thousands of user layers costs no query per folder."""
    from app.directory import DirectoryClient

    users: dict[str, frozenset[str]] = {}
    for _, settings in junctions:
        with DirectoryClient(settings) as client:
            login = settings.attribute("user_login")
            names = frozenset(
                value.casefold()
                for entry in client.paged_search("(&(objectCategory=person)(objectClass=user))", [login])
                for value in _values(entry, login))
            domain = client.domain().netbios_name.casefold()
            users[domain] = users.get(domain, frozenset()) | names
    return users


def _values(entry: Mapping[str, Any], attribute: str) -> list[str]:
    """An attribute's values as text, from the raw bytes the directory sent."""
    return [v.decode("utf-8", "replace") for v in (entry.get("raw_attributes") or {}).get(attribute) or []]


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

    def list_user_layers(self, location: str, username: str, password: str, *, port: int = 445,
                         progress: Callable[[str], None] | None = None) -> UserLayerReport:
        r"""The User Layers on ``location`` (a storage location's name, or a ``\\server\share[\folder]``
        path), read over SMB as ``username``, each marked in use, orphaned (user gone from the directory,
        or OS layer deleted/renamed in the catalog) or of a domain no junction serves. Reads only: nothing
        on the share or in the catalog changes. The password goes to the SMB session and nowhere else."""
        from app.catalog.models import Layer, LayerType
        from app.elastic.sync import ShareSession, parse_share
        from app.elastic.userlayers import classify, scan_user_layers
        from app.services.directory import enabled_junctions

        text = (location or "").strip()
        if not text:
            raise ValidationError("Name the storage location (or give its \\\\server\\share path).",
                                  field="location")
        with self._read() as session:
            if text.startswith("\\\\"):
                path = validate_unc_path(text, "storage location path")
                row = session.scalars(select(StorageLocation).where(func.lower(StorageLocation.path) == path.lower())
                                      ).first()
            else:
                row = self._row(session, text)
                path = row.path
            location_name = row.name if row is not None else None
            os_layers = {row.id: row.name for row in session.execute(
                select(Layer.id, Layer.name).where(Layer.type == LayerType.OS))}
            junctions = enabled_junctions(session, self._ctx.secrets)
        with ShareSession(parse_share(path), username, password, port=port) as share:
            folders = scan_user_layers(share, on_folder=progress)
        users = _directory_users(junctions)
        return UserLayerReport(location_name, path, tuple(classify(folders, users, os_layers)))

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
