"""A registry delta: the ordered registry changes one layer version makes to the image's hives.

A delta is a list of operations, each naming one of the hives a layer may change (:class:`HiveName`):

* :class:`SetValue` – set a value (creating its key and any missing parents);
* :class:`DeleteValue` – delete a value (nothing happens if the key or the value is absent);
* :class:`DeleteKey` – delete a key with everything below it (nothing happens if it is absent);
* :class:`CreateKey` – make sure a key exists (a ``.reg`` section with no value lines).

Key paths are relative to the hive's root (``Microsoft\\Windows\\CurrentVersion``; ``""`` is the root
itself) and compare case-insensitively, like everything in the registry. ``""`` as a value name is the
key's default value.

Compositing applies the deltas of the layers lowest priority first (DESIGN.md §3), so for every value
the highest layer that sets or deletes it wins – except the ``Path``-like environment variables, which
are merged (see :func:`merge_environment` and :meth:`RegistryDelta.apply`).
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from app.engine.registry.model import Hive, RegistryKey, ValueType, fold
from app.errors import UserError


class RegistryDeltaError(UserError):
    """A registry delta is malformed (bad stored JSON, unknown hive) or cannot be applied as given."""

    code = "registry_delta"


class HiveName(enum.StrEnum):
    """The hives a layer's registry delta may change."""

    SOFTWARE = "SOFTWARE"
    SYSTEM = "SYSTEM"
    #: ``HKEY_USERS\\.DEFAULT`` (``Windows\\System32\\config\\DEFAULT``).
    DEFAULT = "DEFAULT"
    DRIVERS = "DRIVERS"
    #: The default user profile's hive, ``Users\\Default\\NTUSER.DAT`` (``HKEY_CURRENT_USER`` in ``.reg`` files).
    NTUSER = "NTUSER"


#: How each hive is spelled in conflict reports (the usual short forms of the registry's root keys).
HIVE_DISPLAY_ROOTS: Mapping[HiveName, str] = {
    HiveName.SOFTWARE: "HKLM\\SOFTWARE",
    HiveName.SYSTEM: "HKLM\\SYSTEM",
    HiveName.DEFAULT: "HKU\\.DEFAULT",
    HiveName.DRIVERS: "HKLM\\DRIVERS",
    HiveName.NTUSER: "HKCU",
}

#: Environment variables holding ``;``-separated lists: layers add to them instead of replacing them.
PATH_LIKE_VARIABLES: tuple[str, ...] = ("Path", "PSModulePath", "PATHEXT")

_PATH_LIKE_FOLDED = frozenset(fold(name) for name in PATH_LIKE_VARIABLES)
_SYSTEM_ENVIRONMENT_TAIL = tuple(fold(part) for part in ("Control", "Session Manager", "Environment"))
_STRING_TYPES = (ValueType.SZ, ValueType.EXPAND_SZ)
_MAX_TYPE = 0xFFFF_FFFF


# --- operations --------------------------------------------------------------------------------------


def _check_hive(hive: str) -> HiveName:
    try:
        return HiveName(hive)
    except ValueError:
        known = ", ".join(HiveName)
        raise RegistryDeltaError(f"unknown hive {hive!r} (a delta may change {known})") from None


def _check_key_path(hive: str, key: str) -> None:
    if not isinstance(key, str):
        raise RegistryDeltaError(f"key path {key!r} is not a string")
    if key == "":
        return
    for part in key.split("\\"):
        if part == "":
            raise RegistryDeltaError(f"key path {key!r} has an empty key name (a doubled, leading or trailing '\\')")
        if part in (".", ".."):
            raise RegistryDeltaError(f"key path {key!r} has a {part!r} component")
        if "\0" in part:
            raise RegistryDeltaError(f"key path {key!r} contains a NUL character")
    if hive == HiveName.SYSTEM and fold(key.split("\\", 1)[0]) == fold("CurrentControlSet"):
        raise RegistryDeltaError(
            f"key path SYSTEM\\{key} uses CurrentControlSet, which exists only in a running Windows: "
            "name the control set (ControlSet001)")


def _check_name(name: str) -> None:
    if not isinstance(name, str):
        raise RegistryDeltaError(f"value name {name!r} is not a string")


@dataclass(frozen=True)
class SetValue:
    hive: str
    key: str
    name: str
    type: int
    data: bytes

    def __post_init__(self) -> None:
        object.__setattr__(self, "hive", _check_hive(self.hive).value)
        _check_key_path(self.hive, self.key)
        _check_name(self.name)
        if isinstance(self.type, bool) or not isinstance(self.type, int) or not 0 <= self.type <= _MAX_TYPE:
            raise RegistryDeltaError(f"value type {self.type!r} is not a number from 0 to {_MAX_TYPE}")
        if not isinstance(self.data, bytes):
            raise RegistryDeltaError(f"value data {self.data!r} is not bytes")


@dataclass(frozen=True)
class DeleteValue:
    hive: str
    key: str
    name: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "hive", _check_hive(self.hive).value)
        _check_key_path(self.hive, self.key)
        _check_name(self.name)


@dataclass(frozen=True)
class DeleteKey:
    hive: str
    key: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "hive", _check_hive(self.hive).value)
        _check_key_path(self.hive, self.key)
        if self.key == "":
            raise RegistryDeltaError(f"the root key of the {self.hive} hive cannot be deleted")


@dataclass(frozen=True)
class CreateKey:
    hive: str
    key: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "hive", _check_hive(self.hive).value)
        _check_key_path(self.hive, self.key)


Operation = SetValue | DeleteValue | DeleteKey | CreateKey


class TouchKind(enum.StrEnum):
    """What an operation does to the path it touches (for conflict reports)."""

    SET = "set"
    #: A ``Path``-like environment variable the layer adds entries to (no conflict: everyone's entries stay).
    MERGE = "merge"
    DELETE_VALUE = "delete_value"
    DELETE_KEY = "delete_key"
    CREATE_KEY = "create_key"


@dataclass(frozen=True)
class Touch:
    """One registry path a delta touches, as conflict reports show it.

    Values read ``HKLM\\SOFTWARE\\Key\\Sub\\ValueName`` (the default value is ``(Default)``); keys
    (deleted or created) end with a backslash, ``HKLM\\SOFTWARE\\Key\\Sub\\``, so that a key never reads
    like a value of its parent.
    """

    path: str
    kind: TouchKind

    @property
    def folded(self) -> str:
        """The form paths are compared in across layers (case-insensitive)."""
        return fold(self.path)


# --- environment variables ---------------------------------------------------------------------------


def _path_entry_key(entry: str) -> str:
    return fold(entry.strip().rstrip("\\"))


def merge_environment(base: str, additions: Sequence[str]) -> str:
    """Merge ``;``-separated list variables (``Path``, ``PSModulePath``, ``PATHEXT``).

    The result is ``base``'s entries followed by each addition's entries in the order given, each entry
    kept once: entries compare case-insensitively, ignoring surrounding blanks and a trailing backslash
    (``C:\\Tools\\`` and ``c:\\tools`` are the same entry); the first spelling seen is kept. Empty entries
    (``a;;b``, a trailing ``;``) are dropped. Nothing is expanded: ``%SystemRoot%\\System32`` and
    ``C:\\Windows\\System32`` are different entries.

    Compositing applies layers lowest priority first, so ``base`` is what the OS layer and the lower
    layers left and ``additions`` are the higher layers' values: lower layers' entries come first.
    """
    merged: list[str] = []
    seen: set[str] = set()
    for text in (base, *additions):
        for entry in text.split(";"):
            key = _path_entry_key(entry)
            if key == "" or key in seen:
                continue
            seen.add(key)
            merged.append(entry)
    return ";".join(merged)


def is_environment_key(hive: str, key: str) -> bool:
    """Whether ``key`` holds environment variables: ``SYSTEM\\<ControlSet>\\Control\\Session Manager\\Environment``
    (any control set) or ``NTUSER\\Environment``."""
    parts = tuple(fold(part) for part in key.split("\\")) if key else ()
    if hive == HiveName.SYSTEM:
        return len(parts) == 4 and parts[1:] == _SYSTEM_ENVIRONMENT_TAIL
    if hive == HiveName.NTUSER:
        return parts == (fold("Environment"),)
    return False


def is_merged_value(hive: str, key: str, name: str) -> bool:
    """Whether setting this value merges it into the existing one (a ``Path``-like environment variable)."""
    return fold(name) in _PATH_LIKE_FOLDED and is_environment_key(hive, key)


def _decode_string(data: bytes) -> str | None:
    """The text of a REG_SZ/REG_EXPAND_SZ value up to its first NUL, or ``None`` if it is not UTF-16LE."""
    if len(data) % 2:
        return None
    try:
        text = data.decode("utf-16-le")
    except UnicodeDecodeError:
        return None
    return text.split("\0", 1)[0]


def _encode_string(text: str) -> bytes:
    return (text + "\0").encode("utf-16-le")


def _merge_value(key: RegistryKey, op: SetValue) -> None:
    existing = key.value(op.name)
    if existing is None or existing.type not in _STRING_TYPES or op.type not in _STRING_TYPES:
        key.set_value(op.name, op.type, op.data)
        return
    base, addition = _decode_string(existing.data), _decode_string(op.data)
    if base is None or addition is None:
        key.set_value(op.name, op.type, op.data)
        return
    merged_type = ValueType.EXPAND_SZ if ValueType.EXPAND_SZ in (existing.type, op.type) else ValueType.SZ
    key.set_value(op.name, int(merged_type), _encode_string(merge_environment(base, [addition])))


# --- the delta ---------------------------------------------------------------------------------------

_FORMAT = "layerdesk.registry-delta"
_FORMAT_VERSION = 1
_HEX = re.compile(r"(?:[0-9a-fA-F]{2})*")


def _display_path(hive: str, key: str, name: str | None) -> str:
    root = HIVE_DISPLAY_ROOTS[HiveName(hive)]
    key_path = f"{root}\\{key}" if key else root
    if name is None:
        return key_path + "\\"
    return f"{key_path}\\{name if name else '(Default)'}"


def _ancestors_and_self(key: str) -> Iterator[str]:
    """``a\\b\\c`` → ``""``, ``a``, ``a\\b``, ``a\\b\\c`` (folded)."""
    folded = fold(key)
    yield ""
    if folded:
        parts = folded.split("\\")
        for depth in range(1, len(parts) + 1):
            yield "\\".join(parts[:depth])


class RegistryDelta:
    """An ordered list of registry operations on named hives (see the module docstring)."""

    __slots__ = ("_operations",)

    def __init__(self, operations: Iterable[Operation] = ()) -> None:
        ops = tuple(operations)
        for op in ops:
            if not isinstance(op, SetValue | DeleteValue | DeleteKey | CreateKey):
                raise TypeError(f"not a registry operation: {op!r}")
        self._operations = ops

    @property
    def operations(self) -> tuple[Operation, ...]:
        return self._operations

    def __len__(self) -> int:
        return len(self._operations)

    def __iter__(self) -> Iterator[Operation]:
        return iter(self._operations)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RegistryDelta) and self._operations == other._operations

    def __hash__(self) -> int:
        return hash(self._operations)

    def __repr__(self) -> str:
        return f"RegistryDelta({list(self._operations)!r})"

    @property
    def hives(self) -> frozenset[str]:
        """The hives this delta changes."""
        return frozenset(op.hive for op in self._operations)

    # --- applying -------------------------------------------------------------------------------

    def apply(self, hives: Mapping[str, Hive], *, written: int | None = None) -> None:
        """Apply the operations in order to ``hives`` (keyed by :class:`HiveName`).

        ``written`` (a Windows FILETIME): the last write time given to every key the delta changes, as Windows
        stamps a key when a value is set or deleted under it, or a subkey created or deleted below it. A
        composite passes the time the layer version was captured, so the same layers give the same hives.
        ``None`` leaves the keys' times as they are (new keys get 0).

        Setting a value creates its key and missing parents; deleting a value or a key that is absent
        does nothing. Every hive the delta names must be given (checked before anything changes).

        Setting a ``Path``-like environment variable (:data:`PATH_LIKE_VARIABLES` under
        ``SYSTEM\\<ControlSet>\\Control\\Session Manager\\Environment`` or ``NTUSER\\Environment``) that
        already exists as a string merges instead of replacing: the result is the existing entries, then
        this value's entries that are not there yet (:func:`merge_environment`). Layers are applied lowest
        priority first, so this concatenates in priority order, lower layers first. The result is
        REG_EXPAND_SZ if either side was REG_EXPAND_SZ. Deleting the value deletes it whole. Every other
        environment variable is replaced by name like any value.
        """
        missing = sorted(self.hives - set(hives))
        if missing:
            given = ", ".join(sorted(hives)) or "none"
            raise RegistryDeltaError(
                f"the registry delta changes the {', '.join(missing)} hive{'s' if len(missing) > 1 else ''}, "
                f"which {'were' if len(missing) > 1 else 'was'} not given (given: {given})")
        for op in self._operations:
            hive = hives[op.hive]
            if isinstance(op, SetValue):
                key = hive.ensure(op.key, written=written)
                if is_merged_value(op.hive, op.key, op.name):
                    _merge_value(key, op)
                else:
                    key.set_value(op.name, op.type, op.data)
                if written is not None:
                    key.last_written = written
            elif isinstance(op, DeleteValue):
                found = hive.find(op.key)
                if found is not None and found.delete_value(op.name) and written is not None:
                    found.last_written = written
            elif isinstance(op, DeleteKey):
                hive.delete(op.key, written=written)
            else:
                hive.ensure(op.key, written=written)

    # --- combining ------------------------------------------------------------------------------

    @staticmethod
    def merged(deltas: Sequence[RegistryDelta]) -> RegistryDelta:
        """One delta with the effect of applying ``deltas`` in order (later ones win).

        The result applies exactly like the deltas one after the other – the same keys, values and even
        the same order of values within a key – but without the operations a later one makes pointless:
        a value set again later keeps its first place and gets the last data, repeated deletions and
        creations of what is already absent or present go. ``Path``-like environment variables keep every
        set, since each one adds entries.
        """
        out: list[Operation | None] = []
        # Where the newest operation on each value / each key's creation / key deletion sits in ``out``.
        last_value_op: dict[tuple[str, str, str], int] = {}
        last_ensured: dict[tuple[str, str], int] = {}
        last_deleted: dict[tuple[str, str], int] = {}

        def deleted_since(hive: str, key: str, index: int) -> bool:
            """Whether ``key`` or one of its parents was deleted after ``out[index]``."""
            return any(last_deleted.get((hive, part), -1) > index for part in _ancestors_and_self(key))

        def record_ensured(hive: str, key: str) -> None:
            for part in _ancestors_and_self(key):
                last_ensured[(hive, part)] = len(out) - 1

        for op in (op for delta in deltas for op in delta):
            folded_key = fold(op.key)
            if isinstance(op, SetValue | DeleteValue):
                value_id = (op.hive, folded_key, fold(op.name))
                previous = last_value_op.get(value_id)
                earlier = out[previous] if previous is not None else None
                valid = previous is not None and not deleted_since(op.hive, op.key, previous)
                if isinstance(op, SetValue):
                    if (valid and previous is not None and isinstance(earlier, SetValue)
                            and not is_merged_value(op.hive, op.key, op.name)):
                        out[previous] = SetValue(earlier.hive, earlier.key, earlier.name, op.type, op.data)
                        continue
                    out.append(op)
                    record_ensured(op.hive, op.key)
                elif valid and isinstance(earlier, DeleteValue):
                    continue
                else:
                    out.append(op)
                last_value_op[value_id] = len(out) - 1
            elif isinstance(op, CreateKey):
                ensured = last_ensured.get((op.hive, folded_key))
                if ensured is not None and not deleted_since(op.hive, op.key, ensured):
                    continue
                out.append(op)
                record_ensured(op.hive, op.key)
            else:
                newest_delete = max(last_deleted.get((op.hive, part), -1) for part in _ancestors_and_self(op.key))
                if newest_delete >= 0 and last_ensured.get((op.hive, folded_key), -1) < newest_delete:
                    continue
                out.append(op)
                last_deleted[(op.hive, folded_key)] = len(out) - 1
        return RegistryDelta(op for op in out if op is not None)

    # --- reporting ------------------------------------------------------------------------------

    def touched(self) -> list[Touch]:
        """The registry paths this delta touches, each once, in the order first touched, with what the last
        operation on it does (see :class:`Touch` for the path spelling)."""
        touches: dict[str, Touch] = {}
        for op in self._operations:
            if isinstance(op, SetValue):
                kind = TouchKind.MERGE if is_merged_value(op.hive, op.key, op.name) else TouchKind.SET
                path = _display_path(op.hive, op.key, op.name)
            elif isinstance(op, DeleteValue):
                kind, path = TouchKind.DELETE_VALUE, _display_path(op.hive, op.key, op.name)
            elif isinstance(op, DeleteKey):
                kind, path = TouchKind.DELETE_KEY, _display_path(op.hive, op.key, None)
            else:
                kind, path = TouchKind.CREATE_KEY, _display_path(op.hive, op.key, None)
            folded = fold(path)
            first = touches.get(folded)
            touches[folded] = Touch(first.path if first is not None else path, kind)
        return list(touches.values())

    # --- storing --------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form (value data as lowercase hex)."""
        operations: list[dict[str, Any]] = []
        for op in self._operations:
            if isinstance(op, SetValue):
                operations.append({"op": "set_value", "hive": op.hive, "key": op.key, "name": op.name,
                                   "type": op.type, "data": op.data.hex()})
            elif isinstance(op, DeleteValue):
                operations.append({"op": "delete_value", "hive": op.hive, "key": op.key, "name": op.name})
            elif isinstance(op, DeleteKey):
                operations.append({"op": "delete_key", "hive": op.hive, "key": op.key})
            else:
                operations.append({"op": "create_key", "hive": op.hive, "key": op.key})
        return {"format": _FORMAT, "version": _FORMAT_VERSION, "operations": operations}

    def to_json(self) -> str:
        """The :meth:`to_dict` form as JSON text, one operation a line (readable and diff-friendly)."""
        document = self.to_dict()
        operations = ",\n".join(json.dumps(op) for op in document["operations"])
        head = json.dumps({"format": document["format"], "version": document["version"]})[:-1]
        return f'{head}, "operations": [\n{operations}\n]}}\n' if operations else f'{head}, "operations": []}}\n'

    @classmethod
    def from_dict(cls, document: object) -> RegistryDelta:
        """Read :meth:`to_dict`'s form back, checking every field."""
        if not isinstance(document, dict):
            raise RegistryDeltaError("a registry delta must be a JSON object")
        if document.get("format") != _FORMAT:
            raise RegistryDeltaError(f"not a registry delta (format is {document.get('format')!r}, "
                                     f"expected {_FORMAT!r})")
        if document.get("version") != _FORMAT_VERSION:
            raise RegistryDeltaError(f"registry delta version {document.get('version')!r} is not supported "
                                     f"(this LayerDesk reads version {_FORMAT_VERSION})")
        extra = sorted(set(document) - {"format", "version", "operations"})
        if extra:
            raise RegistryDeltaError(f"unknown field {extra[0]!r} in the registry delta")
        operations = document.get("operations")
        if not isinstance(operations, list):
            raise RegistryDeltaError("the registry delta's 'operations' must be a list")
        ops: list[Operation] = []
        for number, entry in enumerate(operations, 1):
            try:
                ops.append(_operation_from_dict(entry))
            except RegistryDeltaError as exc:
                raise RegistryDeltaError(f"registry delta operation {number}: {exc.message}") from None
        return cls(ops)

    @classmethod
    def from_json(cls, text: str | bytes) -> RegistryDelta:
        try:
            document = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RegistryDeltaError(f"the registry delta is not valid JSON: {exc}") from None
        return cls.from_dict(document)


_FIELDS: Mapping[str, tuple[str, ...]] = {
    "set_value": ("hive", "key", "name", "type", "data"),
    "delete_value": ("hive", "key", "name"),
    "delete_key": ("hive", "key"),
    "create_key": ("hive", "key"),
}


def _operation_from_dict(entry: object) -> Operation:
    if not isinstance(entry, dict):
        raise RegistryDeltaError("not a JSON object")
    kind = entry.get("op")
    if not isinstance(kind, str) or kind not in _FIELDS:
        raise RegistryDeltaError(f"unknown operation {kind!r} (expected one of {', '.join(_FIELDS)})")
    fields = _FIELDS[kind]
    extra = sorted(set(entry) - {"op", *fields})
    if extra:
        raise RegistryDeltaError(f"unknown field {extra[0]!r} for {kind}")
    for name in fields:
        if name not in entry:
            raise RegistryDeltaError(f"{kind} needs a {name!r} field")
    for name in ("hive", "key", "name", "data"):
        if name in fields and not isinstance(entry[name], str):
            raise RegistryDeltaError(f"{name!r} must be a string, not {entry[name]!r}")
    hive = _check_hive(entry["hive"])
    if kind == "set_value":
        value_type = entry["type"]
        if isinstance(value_type, bool) or not isinstance(value_type, int):
            raise RegistryDeltaError(f"'type' must be a number from 0 to {_MAX_TYPE}, not {value_type!r}")
        data = entry["data"]
        if not _HEX.fullmatch(data):
            raise RegistryDeltaError(f"'data' is not hex bytes: {data[:40]!r}")
        return SetValue(hive, entry["key"], entry["name"], value_type, bytes.fromhex(data))
    if kind == "delete_value":
        return DeleteValue(hive, entry["key"], entry["name"])
    if kind == "delete_key":
        return DeleteKey(hive, entry["key"])
    return CreateKey(hive, entry["key"])
