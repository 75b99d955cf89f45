"""The registry difference of two hive states: exact on small cases, on random trees (applying the delta to
the first state gives the second), on a real Windows SYSTEM hive, and as a layer sees a machine's hives
(the current control set, boot noise)."""

from __future__ import annotations

import lzma
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.engine.registry.delta import (
    CreateKey,
    DeleteKey,
    DeleteValue,
    HiveName,
    RegistryDelta,
    RegistryDeltaError,
    SetValue,
    merge_environment,
)
from app.engine.registry.diff import diff_hives, layer_registry_delta, system_view
from app.engine.registry.model import Hive, RegistryKey, ValueType, fold
from app.engine.registry.regf import read_hive, write_hive

HIVES = Path(__file__).resolve().parents[2].parent / "shared" / "testdata" / "hives"
SZ, EXPAND_SZ, BINARY, DWORD = int(ValueType.SZ), int(ValueType.EXPAND_SZ), int(ValueType.BINARY), int(ValueType.DWORD)
SOFTWARE = HiveName.SOFTWARE


def sz(text: str) -> bytes:
    return (text + "\0").encode("utf-16-le")


def dword(number: int) -> bytes:
    return number.to_bytes(4, "little")


def hive_of(spec: dict[str, dict[str, tuple[int, bytes]]]) -> Hive:
    """A hive from ``{key path: {value name: (type, data)}}`` (every key listed is created)."""
    hive = Hive(RegistryKey("ROOT"))
    for path, values in spec.items():
        key = hive.ensure(path)
        for name, (kind, data) in values.items():
            key.set_value(name, kind, data)
    return hive


def folded_tree(key: RegistryKey) -> dict[str, Any]:
    """A key's content as the registry compares it: names folded, values by type and bytes."""
    return {
        "values": {fold(name): (value.type, value.data) for name, value in key.values.items()},
        "keys": {fold(name): folded_tree(sub) for name, sub in key.subkeys.items()},
    }


def spelled_paths(hive: Hive) -> dict[str, str]:
    """Folded key path → the path as the hive spells it."""
    return {fold(path): path for path, _ in hive.root.walk()}


def apply(delta: RegistryDelta, hive: Hive, name: HiveName = SOFTWARE) -> Hive:
    delta.apply({name: hive})
    return hive


def assert_reproduces(before: Callable[[], Hive], after: Hive, name: HiveName = SOFTWARE) -> RegistryDelta:
    """The delta of ``before()`` → ``after``, checked: applied to a fresh ``before()`` it gives ``after`` (new
    keys spelled as ``after`` spells them), and it says nothing about two equal trees."""
    delta = diff_hives(before(), after, name)
    result = apply(delta, before(), name)
    assert folded_tree(result.root) == folded_tree(after.root)
    old_keys = spelled_paths(before())
    result_keys = spelled_paths(result)
    for folded, path in spelled_paths(after).items():
        if folded not in old_keys:  # a new key is spelled as after spells it (its parents may differ in case)
            assert result_keys[folded].rpartition("\\")[2] == path.rpartition("\\")[2]
    assert len(diff_hives(result, after, name)) == 0
    return delta


# --- the operations ------------------------------------------------------------------------------------


def test_each_kind_of_change_gives_its_operation() -> None:
    def before() -> Hive:
        return hive_of({
            "Vendor\\App": {"Version": (SZ, sz("1.0")), "Seats": (DWORD, dword(5)), "Old": (SZ, sz("x"))},
            "Vendor\\Legacy\\Deep\\Deeper": {"v": (BINARY, b"\1")},
            "Vendor\\Legacy\\Other": {},
            "Same": {"v": (DWORD, dword(1))},
        })

    after = hive_of({
        "Vendor\\App": {"Version": (SZ, sz("2.0")), "Seats": (BINARY, dword(5)), "Added": (EXPAND_SZ, sz("%x%"))},
        "Vendor\\App\\Empty": {},
        "Vendor\\New\\Sub": {"": (SZ, sz("default"))},
        "Same": {"v": (DWORD, dword(1))},
    })
    delta = assert_reproduces(before, after)
    assert list(delta) == [  # each key (its values, its deleted subkeys), then its subkeys
        DeleteKey("SOFTWARE", "Vendor\\Legacy"),  # the topmost deleted key only
        DeleteValue("SOFTWARE", "Vendor\\App", "Old"),
        SetValue("SOFTWARE", "Vendor\\App", "Version", SZ, sz("2.0")),
        SetValue("SOFTWARE", "Vendor\\App", "Seats", BINARY, dword(5)),  # the same bytes, another type
        SetValue("SOFTWARE", "Vendor\\App", "Added", EXPAND_SZ, sz("%x%")),
        CreateKey("SOFTWARE", "Vendor\\App\\Empty"),
        CreateKey("SOFTWARE", "Vendor\\New"),
        SetValue("SOFTWARE", "Vendor\\New\\Sub", "", SZ, sz("default")),
    ]


def test_equal_hives_and_case_only_renames_are_no_difference() -> None:
    def before() -> Hive:
        return hive_of({"Vendor\\App": {"Version": (SZ, sz("1"))}})

    assert len(diff_hives(before(), before(), SOFTWARE)) == 0
    renamed = hive_of({"VENDOR\\app": {"VERSION": (SZ, sz("1"))}})
    assert len(diff_hives(before(), renamed, SOFTWARE)) == 0
    changed = hive_of({"VENDOR\\app": {"VERSION": (SZ, sz("2"))}})
    assert list(diff_hives(before(), changed, SOFTWARE)) == [SetValue("SOFTWARE", "VENDOR\\app", "VERSION", SZ,
                                                                      sz("2"))]


def test_value_types_and_bytes_are_exact() -> None:
    def before() -> Hive:
        return hive_of({"K": {"odd": (0xFFFF0012, b"\1\2"), "big": (BINARY, bytes(40_000)), "n": (SZ, sz("a"))}})

    big = bytearray(40_000)
    big[39_999] = 1
    after = hive_of({"K": {"odd": (0xFFFF0013, b"\1\2"), "big": (BINARY, bytes(big)), "n": (SZ, sz("a") + b"\0\0")}})
    delta = assert_reproduces(before, after)
    assert [(op.name, op.type) for op in delta if isinstance(op, SetValue)] == [("odd", 0xFFFF0013),
                                                                                 ("big", BINARY), ("n", SZ)]


def test_a_path_like_variable_is_set_when_merging_gives_it_and_replaced_otherwise() -> None:
    env = "Environment"

    def before() -> Hive:
        return hive_of({env: {"Path": (EXPAND_SZ, sz("%USERPROFILE%\\bin;C:\\Tools"))}})

    appended = hive_of({env: {"Path": (EXPAND_SZ, sz("%USERPROFILE%\\bin;C:\\Tools;C:\\App"))}})
    delta = assert_reproduces(before, appended, HiveName.NTUSER)
    assert [type(op) for op in delta] == [SetValue]  # merging adds C:\App: the layer keeps others' entries
    for changed in ("C:\\Tools;%USERPROFILE%\\bin", "C:\\Tools", "%USERPROFILE%\\bin;C:\\Tools;C:\\App"):
        kind = SZ if changed.endswith("App") else EXPAND_SZ  # a type change is not a merge either
        after = hive_of({env: {"Path": (kind, sz(changed))}})
        delta = assert_reproduces(before, after, HiveName.NTUSER)
        assert [type(op) for op in delta] == [DeleteValue, SetValue], changed


def test_a_key_name_a_delta_cannot_spell_is_refused() -> None:
    after = Hive(RegistryKey("ROOT"))
    after.root.subkeys["a\\b"] = RegistryKey("a\\b")
    with pytest.raises(RegistryDeltaError, match="cannot spell"):
        diff_hives(Hive(RegistryKey("ROOT")), after, SOFTWARE)


# --- random trees --------------------------------------------------------------------------------------

_NAMES = st.sampled_from(["a", "A", "b", "B", "Key", "KEY", "key", "Ω", "ω", "x y"])
_VALUES = st.tuples(st.sampled_from([SZ, EXPAND_SZ, BINARY, DWORD, 0, 0xFFFF0012]), st.binary(max_size=6))


@st.composite
def _tree(draw: st.DrawFn, depth: int = 3) -> dict[str, Any]:
    values = draw(st.dictionaries(st.sampled_from(["", "v", "V", "w", "Path"]), _VALUES, max_size=3))
    keys = draw(st.dictionaries(_NAMES, _tree(depth - 1), max_size=3)) if depth else {}
    return {"values": values, "keys": keys}


def _build(spec: dict[str, Any], key: RegistryKey) -> None:
    for name, (kind, data) in spec["values"].items():
        key.set_value(name, kind, data)
    for name, sub in spec["keys"].items():
        _build(sub, key.add_subkey(name))  # a name folding onto an earlier one lands in that key


def _hive(spec: dict[str, Any]) -> Hive:
    hive = Hive(RegistryKey("ROOT"))
    _build(spec, hive.root)
    return hive


@settings(max_examples=200, database=None, deadline=None)
@given(before=_tree(), after=_tree())
def test_random_trees_apply_to_the_after_state(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert_reproduces(lambda: _hive(before), _hive(after))


@settings(max_examples=100, database=None, deadline=None)
@given(before=_tree(), after=_tree())
def test_random_user_hives_with_environment_variables_apply_to_the_after_state(
    before: dict[str, Any], after: dict[str, Any]
) -> None:
    """Under NTUSER\\Environment, ``Path`` merges when applied; the delta still gives exactly ``after``."""
    def with_environment(spec: dict[str, Any]) -> dict[str, Any]:
        return {"values": {}, "keys": {"Environment": spec}}

    assert_reproduces(lambda: _hive(with_environment(before)), _hive(with_environment(after)), HiveName.NTUSER)


@settings(max_examples=200, database=None, deadline=None)
@given(old=st.lists(st.sampled_from(["C:\\A", "c:\\a\\", "C:\\B", "%X%", "", " C:\\C"]), max_size=5),
       new=st.lists(st.sampled_from(["C:\\A", "c:\\a\\", "C:\\B", "%X%", "", " C:\\C"]), max_size=5),
       old_type=st.sampled_from([SZ, EXPAND_SZ, BINARY]), new_type=st.sampled_from([SZ, EXPAND_SZ]))
def test_random_path_variables_apply_to_the_after_state(old: list[str], new: list[str], old_type: int,
                                                         new_type: int) -> None:
    env = "ControlSet001\\Control\\Session Manager\\Environment"
    after = hive_of({env: {"Path": (new_type, sz(";".join(new)))}})
    delta = assert_reproduces(lambda: hive_of({env: {"Path": (old_type, sz(";".join(old)))}}), after,
                              HiveName.SYSTEM)
    # a value that is not a string is replaced, not merged; a merge gives EXPAND_SZ if either side is one
    merges = old_type == BINARY or (merge_environment(";".join(old), [";".join(new)]) == ";".join(new)
                                    and (new_type == EXPAND_SZ or old_type == SZ))
    if ";".join(old) == ";".join(new) and old_type == new_type:
        assert len(delta) == 0
    else:
        assert [type(op) for op in delta] == ([SetValue] if merges else [DeleteValue, SetValue])


# --- a real hive ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_system(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real Windows 10 SYSTEM hive, decompressed (read in place from shared/testdata, never copied in)."""
    target = tmp_path_factory.mktemp("hives") / "SYSTEM"
    target.write_bytes(lzma.decompress((HIVES / "SYSTEM_WIN_10_1709.xz").read_bytes()))
    return target


def _real(path: Path) -> Hive:
    return read_hive(path, allow_dirty=True)  # dirty, its logs were not kept: read as every tool reads it


def test_a_real_system_hive_changed_in_memory(real_system: Path, tmp_path: Path) -> None:
    after = _real(real_system)
    services = after.find("ControlSet001\\Services")
    assert services is not None and len(services.subkeys) > 100
    # what an installer does: a service, a value changed, a value deleted, a key removed, a big value, a rename
    app = after.ensure("ControlSet001\\Services\\LayerDeskApp")
    app.set_value("ImagePath", ValueType.EXPAND_SZ, sz("%ProgramFiles%\\App\\svc.exe"))
    app.set_value("Start", ValueType.DWORD, dword(2))
    after.ensure("ControlSet001\\Services\\LayerDeskApp\\Parameters\\Empty")
    tcpip = after.find("ControlSet001\\Services\\Tcpip\\Parameters")
    assert tcpip is not None and tcpip.value("Hostname") is not None
    tcpip.set_value("Hostname", ValueType.SZ, sz("PACKAGER"))
    windows = after.find("ControlSet001\\Control\\Windows")
    assert windows is not None and windows.delete_value("CSDVersion")
    gone = next(iter(services.subkeys.values()))
    assert after.delete(f"ControlSet001\\Services\\{gone.name}")
    big = bytes(range(256)) * 200  # 51,200 bytes: big-data segments in the hive
    after.ensure("Software\\LayerDesk").set_value("Blob", ValueType.BINARY, big)
    services.subkeys[fold("Tcpip")].name = "TCPIP"  # a case-only rename: no difference
    expected = [
        SetValue("SYSTEM", "ControlSet001\\Services\\TCPIP\\Parameters", "HostName", SZ, sz("PACKAGER")),
        DeleteValue("SYSTEM", "ControlSet001\\Control\\Windows", "CSDVersion"),
        DeleteKey("SYSTEM", f"ControlSet001\\Services\\{gone.name}"),
        SetValue("SYSTEM", "ControlSet001\\Services\\LayerDeskApp", "ImagePath", EXPAND_SZ,
                 sz("%ProgramFiles%\\App\\svc.exe")),
        SetValue("SYSTEM", "ControlSet001\\Services\\LayerDeskApp", "Start", DWORD, dword(2)),
        CreateKey("SYSTEM", "ControlSet001\\Services\\LayerDeskApp\\Parameters"),
        CreateKey("SYSTEM", "ControlSet001\\Services\\LayerDeskApp\\Parameters\\Empty"),
        SetValue("SYSTEM", "Software\\LayerDesk", "Blob", BINARY, big),
    ]
    delta = diff_hives(_real(real_system), after, HiveName.SYSTEM)
    def order(op: object) -> tuple[str, str, str]:
        return type(op).__name__, getattr(op, "key", ""), getattr(op, "name", "")

    assert sorted(delta, key=order) == sorted(expected, key=order)
    result = apply(delta, _real(real_system), HiveName.SYSTEM)
    assert folded_tree(result.root) == folded_tree(after.root)
    # and through the file: what compositing writes reads back the same
    write_hive(result, tmp_path / "SYSTEM")
    assert folded_tree(read_hive(tmp_path / "SYSTEM").root) == folded_tree(after.root)


def test_a_real_hive_against_itself_is_no_difference_and_fast(real_system: Path) -> None:
    import time

    before, after = _real(real_system), _real(real_system)
    started = time.perf_counter()
    assert len(diff_hives(before, after, HiveName.SYSTEM)) == 0
    assert time.perf_counter() - started < 5  # 43k keys, 90k values: well under a second here


# --- a machine's hives as a layer sees them ------------------------------------------------------------


def _system(current: int, sets: dict[int, dict[str, tuple[int, bytes]]]) -> Hive:
    spec: dict[str, dict[str, tuple[int, bytes]]] = {"Select": {"Current": (DWORD, dword(current)),
                                                                "LastKnownGood": (DWORD, dword(current))}}
    for number, values in sets.items():
        spec[f"ControlSet{number:03d}\\Services\\Svc"] = values
    spec["RNG"] = {"Seed": (BINARY, bytes([current]) * 76)}
    spec[f"ControlSet{current:03d}\\Control\\Windows"] = {"ShutdownTime": (BINARY, bytes([current]) * 8)}
    return hive_of(spec)


def test_the_current_control_set_is_spelled_control_set_001_and_boot_noise_is_left_out() -> None:
    before = _system(1, {1: {"Start": (DWORD, dword(3))}, 2: {"Start": (DWORD, dword(3))}})
    after = _system(2, {1: {"Start": (DWORD, dword(9))}, 2: {"Start": (DWORD, dword(2))}})
    software_before = hive_of({"Microsoft\\Cryptography\\RNG": {"Seed": (BINARY, b"1")}, "A": {}})
    software_after = hive_of({"Microsoft\\Cryptography\\RNG": {"Seed": (BINARY, b"2")}, "A": {"v": (SZ, sz("1"))}})
    delta = layer_registry_delta({HiveName.SYSTEM: before, HiveName.SOFTWARE: software_before},
                                 {HiveName.SYSTEM: after, HiveName.SOFTWARE: software_after})
    # SOFTWARE first (HiveName order); after's current set (002) against before's (001), as ControlSet001;
    # Select, the other control sets, the RNG seeds and the shutdown time are not the layer's
    assert list(delta) == [SetValue("SOFTWARE", "A", "v", SZ, sz("1")),
                           SetValue("SYSTEM", "ControlSet001\\Services\\Svc", "Start", DWORD, dword(2))]


def test_the_system_view_shares_keys_and_leaves_a_hive_without_select_alone() -> None:
    plain = hive_of({"ControlSet001\\Services": {}})
    assert system_view(plain) is plain
    hive = _system(3, {3: {"Start": (DWORD, dword(1))}, 1: {}})
    view = system_view(hive)
    assert sorted(view.root.subkeys) == ["controlset001", "rng"]
    assert view.root.subkeys["controlset001"].name == "ControlSet001"
    assert view.root.subkeys["controlset001"].subkeys is hive.root.subkeys["controlset003"].subkeys
    assert sorted(hive.root.subkeys) == ["controlset001", "controlset003", "rng", "select"]  # unchanged
