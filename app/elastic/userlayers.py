r"""The User Layers already on a storage location's share, and which of them nobody can use any more.

A user's layer lives in ``<location>\Users\<Domain>_<Username>\<OSLayerID>_<OSLayerName>\`` (the VDA
creates the disk there at the user's first logon). :func:`scan_user_layers` reads that tree over SMB with
one directory query per folder; :func:`classify` then says, for each folder, whether it still belongs to
someone:

* **in use** — the domain is one a directory junction serves, the user exists there, and the OS layer
  id is in the catalog under the same name;
* **orphaned** — the user is no longer in the directory (deleted, or renamed: AD keeps the folder under
  the old ``sAMAccountName``), or the OS layer was deleted from the catalog or renamed;
* **unknown domain** — no junction serves the folder's domain, so nothing can be said about the user;
* **not a user layer** — a folder or file that does not follow the naming convention (left alone).

Nothing here deletes: an orphan may hold a user's data, and removing it is the administrator's decision.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime

from app.elastic.sync import ShareEntry, ShareSession

USERS_FOLDER = "Users"
_USER_FOLDER = re.compile(r"^(?P<domain>[^_\\/]+)_(?P<user>.+)$")
_OS_FOLDER = re.compile(r"^(?P<id>\d+)_(?P<name>.+)$")


class UserLayerStatus(enum.StrEnum):
    IN_USE = "in_use"
    ORPHANED = "orphaned"
    UNKNOWN_DOMAIN = "unknown_domain"
    NOT_A_USER_LAYER = "not_a_user_layer"


@dataclass(frozen=True)
class UserLayerFolder:
    r"""One ``Users\<Domain>_<Username>\<OSLayerID>_<OSLayerName>`` folder on a share."""

    #: Relative to the storage location, e.g. ``Users\LAB_alice\3_Win11``.
    relative: str
    unc: str
    domain: str
    username: str
    os_layer_id: int | None
    os_layer_name: str
    #: Bytes of the files in the folder (the user layer disk and whatever the VDA keeps beside it).
    size_bytes: int
    #: The newest write to the folder or any file in it; ``None`` for an empty folder the server gave no time for.
    last_write: datetime | None
    files: tuple[str, ...]
    status: UserLayerStatus = UserLayerStatus.IN_USE
    reason: str = ""


def scan_user_layers(session: ShareSession, *, on_folder: Callable[[str], None] | None = None) -> list[UserLayerFolder]:
    r"""Every folder under ``Users\`` of the session's location, two levels deep, with the sizes and last
    write times of the files in each OS-layer folder. Folders that do not follow the convention come
    back as :attr:`UserLayerStatus.NOT_A_USER_LAYER` (sorted by path)."""
    found: list[UserLayerFolder] = []

    def odd(relative: str, why: str, entry: ShareEntry) -> UserLayerFolder:
        return UserLayerFolder(relative, session.location.path(relative), "", "", None, "",
                               entry.size_bytes, entry.last_write, (), UserLayerStatus.NOT_A_USER_LAYER, why)

    for user_entry in session.entries(USERS_FOLDER):
        user_relative = f"{USERS_FOLDER}\\{user_entry.name}"
        named = _USER_FOLDER.match(user_entry.name)
        if not user_entry.is_dir or named is None:
            found.append(odd(user_relative, "not a <Domain>_<Username> folder", user_entry))
            continue
        if on_folder is not None:
            on_folder(user_relative)
        for os_entry in session.entries(user_relative):
            relative = f"{user_relative}\\{os_entry.name}"
            os_named = _OS_FOLDER.match(os_entry.name)
            if not os_entry.is_dir or os_named is None:
                found.append(odd(relative, "not an <OSLayerID>_<OSLayerName> folder", os_entry))
                continue
            files = [e for e in session.entries(relative) if not e.is_dir]
            newest = max([os_entry.last_write, *(f.last_write for f in files)], default=None)
            found.append(UserLayerFolder(
                relative, session.location.path(relative), named["domain"], named["user"], int(os_named["id"]),
                os_named["name"], sum(f.size_bytes for f in files), newest, tuple(sorted(f.name for f in files))))
    return sorted(found, key=lambda f: f.relative.casefold())


def classify(
    folders: Iterable[UserLayerFolder],
    users_by_domain: Mapping[str, frozenset[str]],
    os_layers: Mapping[int, str],
) -> list[UserLayerFolder]:
    """Mark each folder in use, orphaned (saying why) or of an unknown domain.

    ``users_by_domain`` maps a domain's NetBIOS name to the ``sAMAccountName`` of every user in it, both
    case-folded; ``os_layers`` maps each OS layer id in the catalog to its name. Windows compares these
    names without regard to case, and so does this."""
    result = []
    for folder in folders:
        if folder.status is UserLayerStatus.NOT_A_USER_LAYER:
            result.append(folder)
            continue
        users = users_by_domain.get(folder.domain.casefold())
        reasons = []
        if users is None:
            status = UserLayerStatus.UNKNOWN_DOMAIN
            reasons.append(f"no directory junction serves the domain {folder.domain}")
        else:
            status = UserLayerStatus.IN_USE
            if folder.username.casefold() not in users:
                status = UserLayerStatus.ORPHANED
                reasons.append(f"the directory has no user {folder.domain}\\{folder.username} "
                               "(deleted, or renamed)")
        if folder.os_layer_id is not None:
            current = os_layers.get(folder.os_layer_id)
            if current is None:
                reasons.append(f"OS layer {folder.os_layer_id} is not in the catalog (deleted)")
            elif current.casefold() != folder.os_layer_name.casefold():
                reasons.append(f"OS layer {folder.os_layer_id} is now named {current!r}, not "
                               f"{folder.os_layer_name!r}")
            if current is None or current.casefold() != folder.os_layer_name.casefold():
                status = UserLayerStatus.ORPHANED if status is UserLayerStatus.IN_USE else status
        result.append(replace(folder, status=status, reason="; ".join(reasons)))
    return result
