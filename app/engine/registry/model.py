"""An in-memory registry hive: keys with class names, security descriptors and values.

Names compare case-insensitively (as Windows does) but keep the case they were created with.
Value data is kept as raw bytes with its type, so nothing is lost between reading and writing.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass, field


class ValueType(enum.IntEnum):
    NONE = 0
    SZ = 1
    EXPAND_SZ = 2
    BINARY = 3
    DWORD = 4
    DWORD_BIG_ENDIAN = 5
    LINK = 6
    MULTI_SZ = 7
    RESOURCE_LIST = 8
    FULL_RESOURCE_DESCRIPTOR = 9
    RESOURCE_REQUIREMENTS_LIST = 10
    QWORD = 11


def fold(name: str) -> str:
    """The form names are compared in (the registry ignores case)."""
    return name.casefold()


@dataclass
class RegistryValue:
    #: ``""`` is the key's default value.
    name: str
    #: A :class:`ValueType` or any other 32-bit type number found in a hive (kept as is).
    type: int
    data: bytes


@dataclass
class RegistryKey:
    name: str
    class_name: str | None = None
    #: The raw self-relative security descriptor (``None``: inherit the parent's when written).
    security: bytes | None = None
    #: Last write time as a Windows FILETIME (100 ns since 1601-01-01 UTC).
    last_written: int = 0
    #: Volatile keys (and other nk flags worth keeping) as read; the writer keeps what it can.
    flags: int = 0
    values: dict[str, RegistryValue] = field(default_factory=dict)
    subkeys: dict[str, RegistryKey] = field(default_factory=dict)

    # --- values --------------------------------------------------------------------------------

    def value(self, name: str) -> RegistryValue | None:
        return self.values.get(fold(name))

    def set_value(self, name: str, type: int, data: bytes) -> RegistryValue:
        existing = self.values.get(fold(name))
        if existing is not None:
            existing.type, existing.data = type, data
            return existing
        value = RegistryValue(name, type, data)
        self.values[fold(name)] = value
        return value

    def delete_value(self, name: str) -> bool:
        return self.values.pop(fold(name), None) is not None

    # --- subkeys -------------------------------------------------------------------------------

    def subkey(self, name: str) -> RegistryKey | None:
        return self.subkeys.get(fold(name))

    def add_subkey(self, name: str) -> RegistryKey:
        """The subkey ``name``, created if missing."""
        existing = self.subkeys.get(fold(name))
        if existing is not None:
            return existing
        key = RegistryKey(name)
        self.subkeys[fold(name)] = key
        return key

    def delete_subkey(self, name: str) -> bool:
        return self.subkeys.pop(fold(name), None) is not None

    def walk(self, path: str = "") -> Iterator[tuple[str, RegistryKey]]:
        """Every key below and including this one, with its path (``Sub\\Key``) from here."""
        yield path, self
        for key in self.subkeys.values():
            yield from key.walk(f"{path}\\{key.name}" if path else key.name)


@dataclass
class Hive:
    """A whole hive. ``root`` is the hive's root key (its name as stored, e.g. ``ROOT``)."""

    root: RegistryKey
    #: The file name recorded in the hive's header (e.g. ``\\SystemRoot\\System32\\Config\\SYSTEM``).
    file_name: str = ""
    major_version: int = 1
    minor_version: int = 5

    def find(self, path: str) -> RegistryKey | None:
        """The key at ``path`` (``Sub\\Key``, relative to the root), or ``None``."""
        key: RegistryKey | None = self.root
        for part in filter(None, path.split("\\")):
            key = key.subkey(part) if key is not None else None
        return key

    def ensure(self, path: str, *, written: int | None = None) -> RegistryKey:
        """The key at ``path``, creating missing keys on the way. ``written`` (a FILETIME): the last write time
        of each key created and of the key it was created under (as creating a subkey does in Windows)."""
        key = self.root
        for part in filter(None, path.split("\\")):
            child = key.subkey(part)
            if child is None:
                child = key.add_subkey(part)
                if written is not None:
                    key.last_written = child.last_written = written
            key = child
        return key

    def delete(self, path: str, *, written: int | None = None) -> bool:
        """Delete the key at ``path`` with everything below it; ``False`` if it was not there. ``written`` (a
        FILETIME): the parent's last write time when the key was deleted."""
        parts = [p for p in path.split("\\") if p]
        if not parts:
            raise ValueError("the root key of a hive cannot be deleted")
        parent = self.find("\\".join(parts[:-1]))
        deleted = parent.delete_subkey(parts[-1]) if parent is not None else False
        if deleted and written is not None:
            assert parent is not None
            parent.last_written = written
        return deleted
