"""Input checks shared by the services: names, comments, UNC paths, SIDs, wildcard patterns.

Names end up as file and folder names on Windows (layer disks, published images, share folders), so
they must be valid Windows file names.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable
from typing import TypeVar

from app.catalog.models import NAME_LENGTH
from app.errors import ValidationError

E = TypeVar("E", bound=enum.Enum)

#: Characters Windows refuses in file names, besides control characters.
FORBIDDEN_CHARACTERS = '<>:"/\\|?*'
_RESERVED_DEVICES = frozenset(
    ["CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"]
    + [f"{dev}{n}" for dev in ("COM", "LPT") for n in [*"123456789", "¹", "²", "³"]]
)
COMMENT_LENGTH = 2000


def validate_name(value: str | None, what: str = "name", *, max_length: int = NAME_LENGTH) -> str:
    """Return ``value`` if it is a valid object name; raise :class:`ValidationError` saying why not."""
    if value is None or not value.strip():
        raise ValidationError(f"The {what} is empty: give it a name.", field=what)
    if value != value.strip():
        raise ValidationError(
            f"The {what} {value!r} starts or ends with a space; remove it.", field=what
        )
    if len(value) > max_length:
        raise ValidationError(
            f"The {what} {value[:20]!r}… is {len(value)} characters long; at most {max_length} are allowed.",
            field=what,
        )
    for ch in value:
        if ch in FORBIDDEN_CHARACTERS or ord(ch) < 32 or ord(ch) == 127:
            shown = repr(ch) if ord(ch) < 32 or ord(ch) == 127 else f"'{ch}'"
            raise ValidationError(
                f"The {what} {value!r} contains {shown}, which Windows does not allow in file names "
                f"(forbidden: {' '.join(FORBIDDEN_CHARACTERS)} and control characters).",
                field=what,
            )
    if value.endswith("."):
        raise ValidationError(
            f"The {what} {value!r} ends with a dot, which Windows drops from file names.", field=what
        )
    stem = value.split(".", 1)[0].rstrip(" ").upper()
    if stem in _RESERVED_DEVICES:
        raise ValidationError(
            f"The {what} {value!r} is a reserved Windows device name ({stem}); choose another name.",
            field=what,
        )
    return value


def choice(kind: type[E], value: object, what: str) -> E:
    """``value`` as a member of the enum ``kind``, or a :class:`ValidationError` listing the choices."""
    try:
        return kind(value)
    except ValueError:
        raise ValidationError(
            f"Unknown {what} {value!r}; use one of: " + ", ".join(str(m.value) for m in kind) + "."
        ) from None


def like_escape(text: str) -> str:
    """``text`` for a LIKE pattern with escape character ``\\``: ``%`` and ``_`` match themselves."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def like_contains(text: str) -> str:
    """A LIKE pattern (escape character ``\\``) matching ``text`` anywhere."""
    return f"%{like_escape(text)}%"


def validate_comment(value: str | None) -> str:
    text = (value or "").strip()
    if len(text) > COMMENT_LENGTH:
        raise ValidationError(
            f"The comment is {len(text)} characters long; at most {COMMENT_LENGTH} are allowed.",
            field="comment",
        )
    if any(ord(ch) < 32 and ch not in "\t\n" for ch in text):
        raise ValidationError("The comment contains control characters.", field="comment")
    return text


def validate_description(value: str | None) -> str:
    text = (value or "").strip()
    if len(text) > COMMENT_LENGTH:
        raise ValidationError(
            f"The description is {len(text)} characters long; at most {COMMENT_LENGTH} are allowed.",
            field="description",
        )
    return text


_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*$")
_IPV4 = re.compile(r"^\d{1,3}(\.\d{1,3}){3}$")


def validate_host(value: str | None, what: str = "server") -> str:
    host = (value or "").strip()
    if not host:
        raise ValidationError(f"The {what} is empty: give a host name or IP address.", field=what)
    if _IPV4.match(host):
        if all(0 <= int(part) <= 255 for part in host.split(".")):
            return host
        raise ValidationError(f"The {what} {host!r} is not a valid IPv4 address.", field=what)
    if ":" in host and re.fullmatch(r"[0-9A-Fa-f:]+", host):
        return host  # IPv6 literal
    if not _HOST.match(host):
        raise ValidationError(f"The {what} {host!r} is not a valid host name.", field=what)
    return host


def validate_port(value: object, what: str = "port") -> int:
    try:
        port = int(str(value).strip())
    except ValueError:
        raise ValidationError(f"The {what} {value!r} is not a number.", field=what) from None
    if not 1 <= port <= 65535:
        raise ValidationError(f"The {what} {value!r} is not between 1 and 65535.", field=what)
    return port


def validate_unc_path(value: str | None, what: str = "path") -> str:
    r"""A UNC path ``\\server\share[\folder...]``: no ``..``, no empty or invalid components."""
    path = (value or "").strip()
    if not path:
        raise ValidationError(f"The {what} is empty: give a share path like \\\\server\\share.", field=what)
    if not path.startswith("\\\\"):
        raise ValidationError(
            f"The {what} {path!r} is not a share path: it must look like \\\\server\\share\\folder.",
            field=what,
        )
    parts = path[2:].rstrip("\\").split("\\")
    if len(parts) < 2:
        raise ValidationError(f"The {what} {path!r} names a server but no share.", field=what)
    validate_host(parts[0], what=f"server in {what}")
    for part in parts[1:]:
        if part in (".", ".."):
            raise ValidationError(f"The {what} {path!r} contains '{part}'; give the folder directly.", field=what)
        validate_name(part, what=f"folder {part!r} in {what}", max_length=255)
    return "\\\\" + "\\".join(parts)


_SID = re.compile(r"^S-1-\d{1,14}(-\d{1,10}){1,15}$")


def validate_sid(value: str | None, what: str = "SID") -> str:
    sid = (value or "").strip().upper()
    if not _SID.match(sid):
        raise ValidationError(
            f"{value!r} is not a Windows security identifier (expected S-1-5-21-…).", field=what
        )
    return sid


_PATTERN = re.compile(r"^[A-Za-z0-9*?._-]+$")


def validate_machine_pattern(value: str | None) -> str:
    """A machine-name wildcard such as ``VDA-FIN-*`` (``*`` any run, ``?`` one character)."""
    pattern = (value or "").strip()
    if not pattern:
        raise ValidationError("The machine-name pattern is empty.", field="pattern")
    if len(pattern) > 64:
        raise ValidationError("The machine-name pattern is longer than 64 characters.", field="pattern")
    if not _PATTERN.match(pattern):
        raise ValidationError(
            f"The machine-name pattern {pattern!r} may hold only letters, digits, '-', '_', '.', "
            "and the wildcards '*' and '?'.",
            field="pattern",
        )
    return pattern


def check_unique(items: Iterable[str], what: str) -> None:
    seen: dict[str, str] = {}
    for item in items:
        key = item.casefold()
        if key in seen:
            raise ValidationError(f"{what} lists {item!r} twice.")
        seen[key] = item


def validate_principal_name(value: str | None, what: str = "user or group name") -> str:
    r"""A directory name as shown to people (``LAB\alice``, ``alice@lab.test``, ``Finance Users``)."""
    name = (value or "").strip()
    if not name:
        raise ValidationError(f"The {what} is empty.", field=what)
    if len(name) > 256:
        raise ValidationError(f"The {what} is longer than 256 characters.", field=what)
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        raise ValidationError(f"The {what} contains control characters.", field=what)
    return name
