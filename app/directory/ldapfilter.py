"""Values placed into LDAP search filters, and Windows security identifiers (SIDs).

Every value a user typed goes into a filter through :func:`escape_filter_value` (RFC 4515), so
``*``, ``(``, ``)``, ``\\`` and NUL are matched literally and can never change the filter's meaning.
SIDs travel as strings (``S-1-5-21-…``) everywhere in LayerDesk; :func:`sid_from_bytes` and
:func:`sid_to_bytes` convert them to and from the binary ``objectSid`` the directory stores.
"""

from __future__ import annotations

import re

_SPECIAL = {"\\": r"\5c", "*": r"\2a", "(": r"\28", ")": r"\29", "\x00": r"\00"}
_SID_TEXT = re.compile(r"^S-1-(\d+)((?:-\d+){0,15})$", re.IGNORECASE)


def escape_filter_value(value: str) -> str:
    """``value`` as an RFC 4515 assertion value: the five special characters become ``\\XX``."""
    return "".join(_SPECIAL.get(ch, ch) for ch in value)


def escape_filter_bytes(value: bytes) -> str:
    """Binary data (an ``objectSid``, say) as an assertion value: every byte as ``\\XX``."""
    return "".join(f"\\{b:02x}" for b in value)


def sid_from_bytes(data: bytes) -> str:
    """A binary SID (revision, count, 48-bit authority, little-endian sub-authorities) → ``S-1-…``."""
    if len(data) < 8 or data[0] != 1:
        raise ValueError("not a binary SID (revision 1)")
    count = data[1]
    if len(data) != 8 + 4 * count:
        raise ValueError(f"a binary SID with {count} sub-authorities must have {8 + 4 * count} bytes, not {len(data)}")
    authority = int.from_bytes(data[2:8], "big")
    subs = [int.from_bytes(data[8 + 4 * i: 12 + 4 * i], "little") for i in range(count)]
    return "-".join(["S", "1", str(authority), *map(str, subs)])


def sid_to_bytes(sid: str) -> bytes:
    """``S-1-…`` → the binary form ``objectSid`` holds."""
    match = _SID_TEXT.match(sid.strip())
    if not match:
        raise ValueError(f"{sid!r} is not a SID like S-1-5-21-…")
    authority = int(match.group(1))
    subs = [int(s) for s in match.group(2).split("-")[1:]]
    if authority >= 1 << 48 or any(s >= 1 << 32 for s in subs):
        raise ValueError(f"{sid!r} has a part out of range")
    return bytes([1, len(subs)]) + authority.to_bytes(6, "big") + b"".join(s.to_bytes(4, "little") for s in subs)


def is_sid(text: str) -> bool:
    return bool(_SID_TEXT.match(text.strip()))


def domain_sid_of(sid: str) -> str:
    """The domain part of an account SID (everything before its last sub-authority, the RID)."""
    return sid.rsplit("-", 1)[0]
