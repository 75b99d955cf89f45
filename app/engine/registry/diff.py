"""The registry difference between two states of a hive, as a :class:`RegistryDelta`.

:func:`diff_hives` compares two trees of one hive exactly: applying its delta to ``before`` gives a tree
equal to ``after`` (the same keys, and in every key the same values with the same type and bytes). Names
compare case-insensitively, as in the registry: a key or value whose name only changed case is the same
key or value (a delta cannot rename one either). What a delta cannot carry is not compared: key class
names, key security descriptors, key timestamps and flags, and the order of values within a key.

The operations, in the order of a walk of ``after`` (each key, then its subkeys):

* :class:`DeleteValue` for a value ``after`` no longer has, :class:`SetValue` for a new value or one whose
  type or bytes changed;
* one :class:`DeleteKey` for the topmost key of a deleted subtree (nothing for what was below it);
* for a new key: a :class:`SetValue` for each of its values, or a :class:`CreateKey` when it has none (so an
  empty key is created too), then the same for its subkeys;
* a ``Path``-like environment variable (:func:`app.engine.registry.delta.is_merged_value`) merges when a delta
  is applied: when merging the new value into the old one would not give exactly the new value (an entry was
  removed or moved), the value is deleted first, then set.

:func:`layer_registry_delta` is how a layer's registry delta is captured from a machine's hives before and
after a change (a difference import, finalizing a packaging machine): SYSTEM is compared through its current
control set, spelled ``ControlSet001`` as in every layer delta (compositing moves it to the OS layer's current
control set), and a few values Windows rewrites on every boot are left out (:data:`BOOT_NOISE`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import replace

from app.engine.registry.delta import (
    CreateKey,
    DeleteKey,
    DeleteValue,
    HiveName,
    Operation,
    RegistryDelta,
    RegistryDeltaError,
    SetValue,
    is_merged_value,
)
from app.engine.registry.model import Hive, RegistryKey, RegistryValue, ValueType, fold

__all__ = ["BOOT_NOISE", "DELTA_CONTROL_SET", "diff_hives", "layer_registry_delta", "system_view"]

#: How a layer delta spells the current control set (``.reg`` imports map ``CurrentControlSet`` to it too).
DELTA_CONTROL_SET = "ControlSet001"

#: Values Windows rewrites on every boot or shutdown, left out of a captured layer delta: (hive, key, value).
#: SYSTEM keys are spelled through :data:`DELTA_CONTROL_SET`.
BOOT_NOISE: tuple[tuple[HiveName, str, str], ...] = (
    # The random number generator's seed, rewritten at every boot (Windows 10 and later keep it in SYSTEM,
    # earlier versions in SOFTWARE). It is also a machine's own secret state: a layer must never carry it.
    (HiveName.SYSTEM, "RNG", "Seed"),
    (HiveName.SOFTWARE, "Microsoft\\Cryptography\\RNG", "Seed"),
    # The time of the last shutdown, written at every shutdown.
    (HiveName.SYSTEM, f"{DELTA_CONTROL_SET}\\Control\\Windows", "ShutdownTime"),
)

_CONTROL_SET = re.compile(r"controlset(\d{3})")
_NOISE = frozenset((hive.value, fold(key), fold(name)) for hive, key, name in BOOT_NOISE)


def diff_hives(before: Hive, after: Hive, hive: HiveName | str) -> RegistryDelta:
    """The operations that turn ``before`` into ``after``, on hive ``hive`` (see the module docstring).
    :class:`RegistryDeltaError` when a key name cannot be spelled in a delta (empty, or holding a backslash)."""
    name = HiveName(hive).value
    return RegistryDelta(_walk(before.root, after.root, name))


def _child(path: str, key: RegistryKey) -> str:
    if not key.name or "\\" in key.name:
        where = f"{path}\\{key.name}" if path else key.name
        raise RegistryDeltaError(f"the key {where!r} has a name a registry delta cannot spell")
    return f"{path}\\{key.name}" if path else key.name


def _walk(old_root: RegistryKey, new_root: RegistryKey, hive: str) -> Iterator[Operation]:
    # An explicit stack: hives nest up to 512 keys deep, and a damaged one may claim more.
    stack: list[tuple[RegistryKey | None, RegistryKey, str]] = [(old_root, new_root, "")]
    while stack:
        old, new, path = stack.pop()
        children: list[tuple[RegistryKey | None, RegistryKey, str]] = []
        if old is None:
            for value in new.values.values():
                yield SetValue(hive, path, value.name, value.type, value.data)
            if not new.values and path:
                yield CreateKey(hive, path)
            children = [(None, key, _child(path, key)) for key in new.subkeys.values()]
        else:
            for folded, value in old.values.items():
                if folded not in new.values:
                    yield DeleteValue(hive, path, value.name)
            for folded, value in new.values.items():
                yield from _value_change(hive, path, old.values.get(folded), value)
            for folded, key in old.subkeys.items():
                if folded not in new.subkeys:
                    yield DeleteKey(hive, _child(path, key))
            children = [(old.subkeys.get(folded), key, _child(path, key)) for folded, key in new.subkeys.items()]
        stack.extend(reversed(children))


def _value_change(hive: str, path: str, old: RegistryValue | None, new: RegistryValue) -> Iterator[Operation]:
    if old is not None and old.type == new.type and old.data == new.data:
        return
    op = SetValue(hive, path, new.name, new.type, new.data)
    if old is not None and is_merged_value(hive, path, new.name) and not _merges_to(old, op):
        yield DeleteValue(hive, path, new.name)
    yield op


def _merges_to(old: RegistryValue, op: SetValue) -> bool:
    """Whether applying ``op`` (a merged environment variable) onto ``old`` gives exactly ``op``'s value."""
    scratch = Hive(RegistryKey("ROOT"))
    scratch.ensure(op.key).set_value(old.name, old.type, old.data)
    RegistryDelta([op]).apply({op.hive: scratch})
    merged = scratch.ensure(op.key).value(op.name)
    return merged is not None and (merged.type, merged.data) == (op.type, op.data)


# --- a machine's hives, as a layer delta sees them ----------------------------------------------------


def _current_control_set(system: Hive) -> str | None:
    select = system.find("Select")
    value = select.value("Current") if select is not None else None
    if value is None or value.type != ValueType.DWORD or len(value.data) < 4:
        return None
    number = int.from_bytes(value.data[:4], "little")
    return f"controlset{number:03d}" if 1 <= number <= 999 else None


def system_view(system: Hive) -> Hive:
    """The SYSTEM hive as a layer delta addresses it: its current control set (``Select\\Current``) spelled
    :data:`DELTA_CONTROL_SET`; the other control sets (last known good copies) and ``Select`` itself left out,
    since a layer cannot address them. A hive without ``Select\\Current`` is returned as it is. The view shares
    the keys of ``system``: change neither while the view is in use."""
    current = _current_control_set(system)
    if current is None:
        return system
    root = replace(system.root, subkeys={})
    for folded, key in system.root.subkeys.items():
        if folded == fold("Select") or folded == fold("CurrentControlSet"):
            continue
        if _CONTROL_SET.fullmatch(folded):
            if folded == current:
                root.subkeys[fold(DELTA_CONTROL_SET)] = replace(key, name=DELTA_CONTROL_SET)
            continue
        root.subkeys[folded] = key
    return replace(system, root=root)


def layer_registry_delta(before: Mapping[HiveName, Hive], after: Mapping[HiveName, Hive]) -> RegistryDelta:
    """The registry delta of a layer captured as the difference between a machine's hives ``before`` and
    ``after`` a change (each hive in both; hives in only one of them are the caller's to refuse): every hive's
    :func:`diff_hives`, in :class:`HiveName` order, SYSTEM through :func:`system_view`, without the
    :data:`BOOT_NOISE` values."""
    operations: list[Operation] = []
    for hive in HiveName:
        if hive not in before or hive not in after:
            continue
        old, new = before[hive], after[hive]
        if hive is HiveName.SYSTEM:
            old, new = system_view(old), system_view(new)
        operations.extend(op for op in diff_hives(old, new, hive) if not _is_noise(op))
    return RegistryDelta(operations)


def _is_noise(op: Operation) -> bool:
    return isinstance(op, SetValue | DeleteValue) and (op.hive, fold(op.key), fold(op.name)) in _NOISE
