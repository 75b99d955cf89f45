"""Registry deltas: applying to hives, merging, environment variables, conflict paths, JSON storage."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.engine.registry.delta import (
    PATH_LIKE_VARIABLES,
    CreateKey,
    DeleteKey,
    DeleteValue,
    HiveName,
    Operation,
    RegistryDelta,
    RegistryDeltaError,
    SetValue,
    Touch,
    TouchKind,
    is_environment_key,
    is_merged_value,
    merge_environment,
)
from app.engine.registry.model import Hive, RegistryKey, ValueType
from app.errors import UserError

SZ, EXPAND_SZ, BINARY, DWORD = int(ValueType.SZ), int(ValueType.EXPAND_SZ), int(ValueType.BINARY), int(ValueType.DWORD)
ENV = r"ControlSet001\Control\Session Manager\Environment"


def sz(text: str) -> bytes:
    return (text + "\0").encode("utf-16-le")


def new_hive() -> Hive:
    return Hive(RegistryKey("ROOT"))


def dump(hive: Hive) -> dict[str, list[tuple[str, int, bytes]]]:
    """Every key (by path, with the names' case as stored) and its values in stored order."""
    return {path: [(v.name, v.type, v.data) for v in key.values.values()] for path, key in hive.root.walk()}


def ordered_dump(hive: Hive) -> list[tuple[str, list[tuple[str, int, bytes]]]]:
    """Like :func:`dump`, but the order of keys counts too."""
    return [(path, [(v.name, v.type, v.data) for v in key.values.values()]) for path, key in hive.root.walk()]


def hives(*names: str) -> dict[str, Hive]:
    return {name: new_hive() for name in (names or tuple(HiveName))}


# --- applying --------------------------------------------------------------------------------------


def test_set_value_creates_the_key_and_its_parents() -> None:
    target = hives("SOFTWARE")
    RegistryDelta([SetValue("SOFTWARE", r"Contoso\Widget\Settings", "Colour", SZ, sz("blue"))]).apply(target)
    assert dump(target["SOFTWARE"]) == {
        "": [], "Contoso": [], r"Contoso\Widget": [],
        r"Contoso\Widget\Settings": [("Colour", SZ, sz("blue"))],
    }


def test_every_operation_applies_in_order_to_the_right_hive() -> None:
    target = hives()
    software = target["SOFTWARE"]
    software.ensure(r"Old\Deep\Deeper").set_value("x", DWORD, b"\1\0\0\0")
    software.ensure("Keep").set_value("gone", SZ, sz("bye"))
    software.ensure("Keep").set_value("stays", SZ, sz("hi"))
    delta = RegistryDelta([
        SetValue("SOFTWARE", r"Keep", "", SZ, sz("default")),
        DeleteValue("SOFTWARE", "Keep", "GONE"),
        DeleteKey("SOFTWARE", "old"),
        CreateKey("SOFTWARE", r"Empty\Key"),
        SetValue("SYSTEM", r"ControlSet001\Services\Widget", "Start", DWORD, b"\2\0\0\0"),
        SetValue("DEFAULT", r"Control Panel\Desktop", "Wallpaper", SZ, sz("")),
        SetValue("DRIVERS", r"DriverDatabase", "Version", BINARY, b"\xde\xad"),
        CreateKey("NTUSER", r"Software\Contoso"),
    ])
    delta.apply(target)
    assert dump(software) == {
        "": [],
        "Keep": [("stays", SZ, sz("hi")), ("", SZ, sz("default"))],
        "Empty": [], r"Empty\Key": [],
    }
    assert dump(target["SYSTEM"]) == {
        "": [], "ControlSet001": [], r"ControlSet001\Services": [],
        r"ControlSet001\Services\Widget": [("Start", DWORD, b"\2\0\0\0")],
    }
    assert dump(target["DEFAULT"]) == {"": [], "Control Panel": [],
                                       r"Control Panel\Desktop": [("Wallpaper", SZ, sz(""))]}
    assert dump(target["DRIVERS"]) == {"": [], "DriverDatabase": [("Version", BINARY, b"\xde\xad")]}
    assert dump(target["NTUSER"]) == {"": [], "Software": [], r"Software\Contoso": []}


def test_names_match_case_insensitively_and_keep_their_first_spelling() -> None:
    target = hives("SOFTWARE")
    target["SOFTWARE"].ensure(r"Contoso\Widget").set_value("Colour", SZ, sz("blue"))
    RegistryDelta([
        SetValue("SOFTWARE", r"CONTOSO\widget", "COLOUR", DWORD, b"\7\0\0\0"),
        CreateKey("SOFTWARE", r"contoso\WIDGET\New"),
    ]).apply(target)
    assert dump(target["SOFTWARE"]) == {
        "": [], "Contoso": [], r"Contoso\Widget": [("Colour", DWORD, b"\7\0\0\0")], r"Contoso\Widget\New": [],
    }


def test_deleting_what_is_absent_does_nothing_and_creates_nothing() -> None:
    target = hives("SOFTWARE", "NTUSER")
    target["SOFTWARE"].ensure("Here").set_value("v", SZ, sz("x"))
    before = dump(target["SOFTWARE"])
    RegistryDelta([
        DeleteValue("SOFTWARE", r"Nowhere\Key", "v"),
        DeleteValue("SOFTWARE", "Here", "other"),
        DeleteKey("SOFTWARE", r"Nowhere\Key"),
        DeleteKey("NTUSER", "Software"),
    ]).apply(target)
    assert dump(target["SOFTWARE"]) == before
    assert dump(target["NTUSER"]) == {"": []}


def test_a_key_deletion_takes_the_subtree_and_a_later_set_recreates_the_key() -> None:
    target = hives("SOFTWARE")
    target["SOFTWARE"].ensure(r"App\A\B").set_value("deep", SZ, sz("1"))
    target["SOFTWARE"].ensure(r"App").set_value("top", SZ, sz("2"))
    RegistryDelta([DeleteKey("SOFTWARE", "App"), SetValue("SOFTWARE", r"App\A", "new", SZ, sz("3"))]).apply(target)
    assert dump(target["SOFTWARE"]) == {"": [], "App": [], r"App\A": [("new", SZ, sz("3"))]}


def test_create_key_on_the_root_and_on_an_existing_key_changes_nothing() -> None:
    target = hives("NTUSER")
    target["NTUSER"].ensure("Software").set_value("v", SZ, sz("x"))
    RegistryDelta([CreateKey("NTUSER", ""), CreateKey("NTUSER", "software"),
                   SetValue("NTUSER", "", "AtRoot", SZ, sz("r"))]).apply(target)
    assert dump(target["NTUSER"]) == {"": [("AtRoot", SZ, sz("r"))], "Software": [("v", SZ, sz("x"))]}


def test_the_keys_a_delta_changes_get_its_write_time_and_no_other_key_does() -> None:
    """As Windows stamps keys: setting or deleting a value stamps its key, creating or deleting a subkey
    stamps the parent, and a new key carries the time; keys the delta only passes through, values it deletes
    that are not there and keys it "creates" that exist keep their times."""
    old, stamp = 130_000_000_000_000_000, 133_500_000_000_000_000
    target = hives("SOFTWARE")
    software = target["SOFTWARE"]
    for path in ("", "Keep", r"Keep\Set", r"Keep\Gone", r"Keep\Values", "Passed", r"Passed\Through", "Exists"):
        software.ensure(path).last_written = old
    software.ensure(r"Keep\Values").set_value("v", SZ, sz("x"))
    RegistryDelta([
        SetValue("SOFTWARE", r"Keep\Set", "new", SZ, sz("1")),
        SetValue("SOFTWARE", r"Passed\Through\New\Deeper", "n", DWORD, b"\1\0\0\0"),
        DeleteValue("SOFTWARE", r"Keep\Values", "v"),
        DeleteValue("SOFTWARE", r"Keep\Values", "never there"),
        DeleteValue("SOFTWARE", "Exists", "never there"),
        DeleteKey("SOFTWARE", r"Keep\Gone"),
        DeleteKey("SOFTWARE", r"Exists\Never There"),
        CreateKey("SOFTWARE", "exists"),
    ]).apply(target, written=stamp)
    times = {path: key.last_written for path, key in software.root.walk()}
    assert times == {
        "": old, "Keep": stamp, r"Keep\Set": stamp, r"Keep\Values": stamp, "Passed": old,
        r"Passed\Through": stamp, r"Passed\Through\New": stamp, r"Passed\Through\New\Deeper": stamp,
        "Exists": old,
    }


def test_without_a_write_time_a_delta_leaves_key_times_alone() -> None:
    target = hives("SOFTWARE")
    target["SOFTWARE"].ensure("Keep").last_written = 5
    RegistryDelta([SetValue("SOFTWARE", "Keep", "a", SZ, sz("1")), SetValue("SOFTWARE", r"Keep\New", "b", SZ, sz("2"))
                   ]).apply(target)
    assert {path: key.last_written for path, key in target["SOFTWARE"].root.walk()} == {
        "": 0, "Keep": 5, r"Keep\New": 0}


def test_a_delta_naming_a_hive_that_is_not_given_changes_nothing() -> None:
    target = hives("SOFTWARE")
    delta = RegistryDelta([SetValue("SOFTWARE", "A", "v", SZ, sz("x")), CreateKey("DRIVERS", "X"),
                           CreateKey("NTUSER", "Y")])
    with pytest.raises(RegistryDeltaError) as caught:
        delta.apply(target)
    assert str(caught.value) == ("the registry delta changes the DRIVERS, NTUSER hives, which were not given "
                                 "(given: SOFTWARE)")
    assert isinstance(caught.value, UserError)
    assert dump(target["SOFTWARE"]) == {"": []}
    with pytest.raises(RegistryDeltaError, match=r"changes the DRIVERS hive, which was not given \(given: none\)"):
        RegistryDelta([CreateKey("DRIVERS", "X")]).apply({})


def test_hive_names_may_be_given_as_the_enum() -> None:
    target = {HiveName.SYSTEM: new_hive()}
    RegistryDelta([CreateKey(HiveName.SYSTEM, "Select")]).apply(target)
    assert dump(target[HiveName.SYSTEM]) == {"": [], "Select": []}
    assert RegistryDelta([CreateKey(HiveName.SYSTEM, "Select")]).hives == frozenset({"SYSTEM"})


# --- validation of operations ----------------------------------------------------------------------


@pytest.mark.parametrize(("make", "message"), [
    (lambda: SetValue("HKLM", "A", "v", SZ, b""), "unknown hive 'HKLM' (a delta may change SOFTWARE, SYSTEM, "
                                                  "DEFAULT, DRIVERS, NTUSER)"),
    (lambda: CreateKey("software", "A"), "unknown hive 'software'"),
    (lambda: DeleteKey("SOFTWARE", ""), "the root key of the SOFTWARE hive cannot be deleted"),
    (lambda: CreateKey("SOFTWARE", r"A\\B"),
     "key path 'A\\\\\\\\B' has an empty key name (a doubled, leading or trailing '\\')"),
    (lambda: CreateKey("SOFTWARE", "\\A"), "has an empty key name"),
    (lambda: CreateKey("SOFTWARE", "A\\"), "has an empty key name"),
    (lambda: DeleteValue("SOFTWARE", r"A\..\B", "v"), "has a '..' component"),
    (lambda: DeleteKey("SOFTWARE", r"A\."), "has a '.' component"),
    (lambda: CreateKey("SOFTWARE", "A\0B"), "contains a NUL character"),
    (lambda: CreateKey("SYSTEM", r"CurrentControlSet\Services"), "uses CurrentControlSet, which exists only"),
    (lambda: SetValue("SOFTWARE", "A", "v", -1, b""), "value type -1 is not a number from 0 to 4294967295"),
    (lambda: SetValue("SOFTWARE", "A", "v", 1 << 32, b""), "is not a number from 0 to 4294967295"),
    (lambda: SetValue("SOFTWARE", "A", "v", True, b""), "value type True is not a number"),
    (lambda: SetValue("SOFTWARE", "A", "v", SZ, "text"), "value data 'text' is not bytes"),  # type: ignore[arg-type]
    (lambda: SetValue("SOFTWARE", "A", 3, SZ, b""), "value name 3 is not a string"),  # type: ignore[arg-type]
    (lambda: CreateKey("SOFTWARE", None), "key path None is not a string"),  # type: ignore[arg-type]
])
def test_operations_are_checked_when_made(make: Any, message: str) -> None:
    with pytest.raises(RegistryDeltaError) as caught:
        make()
    assert message in str(caught.value), str(caught.value)


def test_only_operations_make_a_delta() -> None:
    with pytest.raises(TypeError, match="not a registry operation"):
        RegistryDelta(["set"])  # type: ignore[list-item]


def test_current_control_set_is_only_refused_at_the_start_of_a_system_path() -> None:
    assert CreateKey("SOFTWARE", "CurrentControlSet").key == "CurrentControlSet"
    assert CreateKey("SYSTEM", r"ControlSet001\CurrentControlSet").key == r"ControlSet001\CurrentControlSet"


# --- environment variables -------------------------------------------------------------------------


def test_path_like_variables_are_listed() -> None:
    assert PATH_LIKE_VARIABLES == ("Path", "PSModulePath", "PATHEXT")


@pytest.mark.parametrize(("base", "additions", "expected"), [
    (r"C:\Windows;C:\Windows\System32", [r"C:\Windows\System32;C:\App"], r"C:\Windows;C:\Windows\System32;C:\App"),
    (r"C:\Windows", [r"c:\WINDOWS\;C:\Tools\\"], r"C:\Windows;C:\Tools\\"),
    (r"C:\Tools\;C:\A", [r"C:\tools;C:\B"], r"C:\Tools\;C:\A;C:\B"),
    (r"C:\A;;C:\B;", [";;C:\\C;"], r"C:\A;C:\B;C:\C"),
    (r"C:\A", [r"C:\B", r"C:\C;C:\A", r"C:\b"], r"C:\A;C:\B;C:\C"),
    ("", [r"C:\A"], r"C:\A"),
    (r"C:\A;c:\a", [], r"C:\A"),
    (r"%SystemRoot%\system32", [r"C:\Windows\system32"], r"%SystemRoot%\system32;C:\Windows\system32"),
    (".COM;.EXE;.BAT", [".com;.PY;.exe"], ".COM;.EXE;.BAT;.PY"),
    (r"C:\A", [r" C:\a "], r"C:\A"),
])
def test_merge_environment(base: str, additions: list[str], expected: str) -> None:
    assert merge_environment(base, additions) == expected


@pytest.mark.parametrize(("hive", "key", "expected"), [
    ("SYSTEM", ENV, True),
    ("SYSTEM", r"controlset002\CONTROL\session manager\environment", True),
    ("SYSTEM", r"ControlSet001\Control\Session Manager", False),
    ("SYSTEM", r"ControlSet001\Control\Session Manager\Environment\Sub", False),
    ("NTUSER", "Environment", True),
    ("NTUSER", r"Software\Environment", False),
    ("DEFAULT", "Environment", False),
    ("SOFTWARE", "Environment", False),
    ("NTUSER", "", False),
])
def test_environment_keys(hive: str, key: str, expected: bool) -> None:
    assert is_environment_key(hive, key) is expected


def test_path_like_values_merge_across_layers_lowest_first_and_keep_expand_sz() -> None:
    target = hives("SYSTEM")
    env = target["SYSTEM"].ensure(ENV)
    env.set_value("Path", EXPAND_SZ, sz(r"%SystemRoot%\system32;%SystemRoot%"))
    env.set_value("TEMP", EXPAND_SZ, sz(r"%SystemRoot%\TEMP"))
    lower = RegistryDelta([SetValue("SYSTEM", ENV, "PATH", SZ, sz(r"%SystemRoot%\system32;%SystemRoot%;C:\Java\bin")),
                           SetValue("SYSTEM", ENV, "TEMP", SZ, sz(r"D:\Temp"))])
    higher = RegistryDelta([SetValue("SYSTEM", ENV, "path", SZ, sz(r"C:\Python;c:\java\BIN\;%SystemRoot%"))])
    lower.apply(target)
    higher.apply(target)
    assert dump(target["SYSTEM"])[ENV] == [
        ("Path", EXPAND_SZ, sz(r"%SystemRoot%\system32;%SystemRoot%;C:\Java\bin;C:\Python")),
        ("TEMP", SZ, sz(r"D:\Temp")),
    ]


def test_path_like_values_in_the_default_user_profile_merge_and_turn_expand_sz() -> None:
    target = hives("NTUSER")
    target["NTUSER"].ensure("Environment").set_value("PSModulePath", SZ, sz(r"C:\Modules"))
    RegistryDelta([SetValue("NTUSER", "environment", "psmodulepath", EXPAND_SZ, sz(r"%USERPROFILE%\Modules")),
                   SetValue("NTUSER", "Environment", "PATHEXT", SZ, sz(".PY"))]).apply(target)
    assert dump(target["NTUSER"])["Environment"] == [
        ("PSModulePath", EXPAND_SZ, sz(r"C:\Modules;%USERPROFILE%\Modules")),
        ("PATHEXT", SZ, sz(".PY")),
    ]


def test_path_like_values_are_replaced_outside_environment_keys_or_when_not_strings() -> None:
    target = hives("SYSTEM", "SOFTWARE")
    target["SOFTWARE"].ensure("App").set_value("Path", SZ, sz(r"C:\Old"))
    env = target["SYSTEM"].ensure(ENV)
    env.set_value("Path", BINARY, b"\1\2")
    env.set_value("PATHEXT", SZ, sz(".COM"))
    env.set_value("PSModulePath", SZ, b"\x00\xd8")  # a lone surrogate: not text
    RegistryDelta([
        SetValue("SOFTWARE", "App", "Path", SZ, sz(r"C:\New")),
        SetValue("SYSTEM", ENV, "Path", SZ, sz(r"C:\Windows")),
        SetValue("SYSTEM", ENV, "PATHEXT", BINARY, b"\3"),
        SetValue("SYSTEM", ENV, "PSModulePath", SZ, sz(r"C:\M")),
    ]).apply(target)
    assert dump(target["SOFTWARE"])["App"] == [("Path", SZ, sz(r"C:\New"))]
    assert dump(target["SYSTEM"])[ENV] == [("Path", SZ, sz(r"C:\Windows")), ("PATHEXT", BINARY, b"\3"),
                                           ("PSModulePath", SZ, sz(r"C:\M"))]


def test_merging_reads_strings_up_to_their_first_nul_and_deleting_removes_the_whole_value() -> None:
    target = hives("SYSTEM")
    env = target["SYSTEM"].ensure(ENV)
    env.set_value("Path", SZ, sz(r"C:\A") + sz("junk"))
    RegistryDelta([SetValue("SYSTEM", ENV, "Path", SZ, r"C:\B".encode("utf-16-le"))]).apply(target)
    assert env.value("Path") is not None and env.value("Path").data == sz(r"C:\A;C:\B")  # type: ignore[union-attr]
    RegistryDelta([DeleteValue("SYSTEM", ENV, "Path")]).apply(target)
    assert dump(target["SYSTEM"])[ENV] == []


def test_a_path_value_new_to_the_environment_is_set_as_given() -> None:
    target = hives("SYSTEM")
    RegistryDelta([SetValue("SYSTEM", ENV, "Path", EXPAND_SZ, sz(r"C:\A;C:\A"))]).apply(target)
    assert dump(target["SYSTEM"])[ENV] == [("Path", EXPAND_SZ, sz(r"C:\A;C:\A"))]


def test_is_merged_value() -> None:
    assert is_merged_value("SYSTEM", ENV, "pAtH")
    assert not is_merged_value("SYSTEM", ENV, "TEMP")
    assert not is_merged_value("SOFTWARE", ENV, "Path")


# --- merging deltas --------------------------------------------------------------------------------


def test_merged_lets_later_deltas_win_and_drops_pointless_operations() -> None:
    first = RegistryDelta([
        SetValue("SOFTWARE", "App", "a", SZ, sz("1")),
        SetValue("SOFTWARE", "App", "b", SZ, sz("2")),
        DeleteValue("SOFTWARE", "App", "c"),
        DeleteKey("SOFTWARE", "Gone"),
        SetValue("SYSTEM", ENV, "Path", SZ, sz(r"C:\A")),
    ])
    second = RegistryDelta([
        SetValue("SOFTWARE", "APP", "A", DWORD, b"\1\0\0\0"),
        DeleteValue("SOFTWARE", "App", "C"),
        CreateKey("SOFTWARE", "app"),
        CreateKey("SOFTWARE", ""),
        DeleteKey("SOFTWARE", "gone"),
        SetValue("SYSTEM", ENV, "Path", SZ, sz(r"C:\B")),
    ])
    assert RegistryDelta.merged([first, second]).operations == (
        SetValue("SOFTWARE", "App", "a", DWORD, b"\1\0\0\0"),
        SetValue("SOFTWARE", "App", "b", SZ, sz("2")),
        DeleteValue("SOFTWARE", "App", "c"),
        DeleteKey("SOFTWARE", "Gone"),
        SetValue("SYSTEM", ENV, "Path", SZ, sz(r"C:\A")),
        SetValue("SYSTEM", ENV, "Path", SZ, sz(r"C:\B")),
    )


def test_merged_keeps_what_a_key_deletion_in_between_makes_meaningful() -> None:
    ops: list[Operation] = [
        SetValue("SOFTWARE", r"App\Sub", "a", SZ, sz("1")),
        DeleteKey("SOFTWARE", "App"),
        SetValue("SOFTWARE", r"App\Sub", "a", SZ, sz("2")),
        CreateKey("SOFTWARE", "App"),
        DeleteKey("SOFTWARE", r"App\Sub"),
        DeleteKey("SOFTWARE", r"App\Sub"),
        CreateKey("SOFTWARE", r"App\Sub"),
        DeleteValue("SOFTWARE", "X", "v"),
        SetValue("SOFTWARE", "X", "v", SZ, sz("")),
        DeleteValue("SOFTWARE", "X", "v"),
    ]
    assert RegistryDelta.merged([RegistryDelta(ops)]).operations == (
        ops[0], ops[1], ops[2], ops[4], ops[6], ops[7], ops[8], ops[9])


def test_merged_of_nothing_is_empty() -> None:
    assert RegistryDelta.merged([]) == RegistryDelta()
    assert len(RegistryDelta.merged([RegistryDelta(), RegistryDelta()])) == 0


_names = st.sampled_from(["a", "A", "b", "Path", "PATH"])
_keys = st.sampled_from(["", "K", "k", r"K\S", r"k\s\T", ENV, ENV, ENV.lower()])
_strings = st.lists(st.sampled_from([r"C:\A", r"c:\a\\", r"C:\B", ""]), max_size=3).map(";".join)
_data = st.one_of(_strings.map(sz), st.binary(max_size=3))
_hive = st.sampled_from(["SYSTEM", "NTUSER"])


def _key_for(hive: str, key: str) -> str:
    return "Environment" if hive == "NTUSER" and "Session" in key else key


_operations = st.one_of(
    st.builds(lambda h, k, n, t, d: SetValue(h, _key_for(h, k), n, t, d),
              _hive, _keys, _names, st.sampled_from([SZ, EXPAND_SZ, BINARY]), _data),
    st.builds(lambda h, k, n: DeleteValue(h, _key_for(h, k), n), _hive, _keys, _names),
    st.builds(lambda h, k: DeleteKey(h, _key_for(h, k) or "K"), _hive, _keys),
    st.builds(lambda h, k: CreateKey(h, _key_for(h, k)), _hive, _keys),
)
_deltas = st.lists(st.lists(_operations, max_size=8).map(RegistryDelta), max_size=4)


@settings(max_examples=300, database=None, deadline=None)
@given(base=st.lists(_operations, max_size=6).map(RegistryDelta), deltas=_deltas)
def test_merged_applies_exactly_like_the_deltas_one_after_the_other(
        base: RegistryDelta, deltas: list[RegistryDelta]) -> None:
    one_by_one, at_once = hives("SYSTEM", "NTUSER"), hives("SYSTEM", "NTUSER")
    base.apply(one_by_one)
    base.apply(at_once)
    for delta in deltas:
        delta.apply(one_by_one)
    merged = RegistryDelta.merged(deltas)
    merged.apply(at_once)
    assert len(merged) <= sum(len(delta) for delta in deltas)
    for name in ("SYSTEM", "NTUSER"):
        assert ordered_dump(at_once[name]) == ordered_dump(one_by_one[name])


# --- conflict paths --------------------------------------------------------------------------------


def test_touched_paths_read_like_conflict_reports() -> None:
    delta = RegistryDelta([
        SetValue("SOFTWARE", r"Contoso\Widget", "Colour", SZ, sz("x")),
        SetValue("SOFTWARE", r"Contoso\Widget", "", SZ, sz("x")),
        DeleteValue("SYSTEM", r"ControlSet001\Services\W", "Start"),
        DeleteKey("DEFAULT", r"Control Panel\Old"),
        CreateKey("NTUSER", r"Software\Contoso"),
        SetValue("NTUSER", "", "AtRoot", SZ, sz("x")),
        SetValue("DRIVERS", "DriverDatabase", "V", SZ, sz("x")),
        SetValue("SYSTEM", ENV, "Path", SZ, sz("x")),
        SetValue("NTUSER", "Environment", "TEMP", SZ, sz("x")),
    ])
    assert delta.touched() == [
        Touch(r"HKLM\SOFTWARE\Contoso\Widget\Colour", TouchKind.SET),
        Touch(r"HKLM\SOFTWARE\Contoso\Widget\(Default)", TouchKind.SET),
        Touch(r"HKLM\SYSTEM\ControlSet001\Services\W\Start", TouchKind.DELETE_VALUE),
        Touch("HKU\\.DEFAULT\\Control Panel\\Old\\", TouchKind.DELETE_KEY),
        Touch("HKCU\\Software\\Contoso\\", TouchKind.CREATE_KEY),
        Touch(r"HKCU\AtRoot", TouchKind.SET),
        Touch(r"HKLM\DRIVERS\DriverDatabase\V", TouchKind.SET),
        Touch(r"HKLM\SYSTEM" "\\" + ENV + r"\Path", TouchKind.MERGE),
        Touch(r"HKCU\Environment\TEMP", TouchKind.SET),
    ]


def test_touched_lists_each_path_once_with_its_last_operation_and_first_spelling() -> None:
    delta = RegistryDelta([
        SetValue("SOFTWARE", "App", "Value", SZ, sz("x")),
        CreateKey("SOFTWARE", "App"),
        DeleteValue("SOFTWARE", "APP", "VALUE"),
        CreateKey("SOFTWARE", ""),
    ])
    assert delta.touched() == [Touch(r"HKLM\SOFTWARE\App\Value", TouchKind.DELETE_VALUE),
                               Touch("HKLM\\SOFTWARE\\App\\", TouchKind.CREATE_KEY),
                               Touch("HKLM\\SOFTWARE\\", TouchKind.CREATE_KEY)]
    assert delta.touched()[0].folded == r"hklm\software\app\value"


# --- JSON ------------------------------------------------------------------------------------------

EVERYTHING = RegistryDelta([
    SetValue("SOFTWARE", r"Contoso\Widget", "Colour", SZ, sz("blé")),
    SetValue("SYSTEM", ENV, "", 0x12345678, b""),
    DeleteValue("DEFAULT", "Control Panel", ""),
    DeleteKey("DRIVERS", "X"),
    CreateKey("NTUSER", ""),
])


def test_json_round_trip_with_hex_data_one_operation_a_line() -> None:
    text = EVERYTHING.to_json()
    assert RegistryDelta.from_json(text) == EVERYTHING
    assert RegistryDelta.from_json(text.encode()) == EVERYTHING
    assert text.splitlines()[1] == ('{"op": "set_value", "hive": "SOFTWARE", "key": "Contoso\\\\Widget", '
                                    '"name": "Colour", "type": 1, "data": "62006c00e9000000"},')
    assert len(text.splitlines()) == 2 + len(EVERYTHING)
    assert json.loads(text) == EVERYTHING.to_dict()
    assert RegistryDelta.from_json(RegistryDelta().to_json()) == RegistryDelta()


def _document(*operations: dict[str, Any], **top: Any) -> str:
    return json.dumps({"format": "layerdesk.registry-delta", "version": 1, "operations": list(operations)} | top)


_SET = {"op": "set_value", "hive": "SOFTWARE", "key": "A", "name": "v", "type": 1, "data": "6100"}


@pytest.mark.parametrize(("text", "message"), [
    ("{", "the registry delta is not valid JSON: Expecting property name"),
    (b"\xff\xfe", "the registry delta is not valid JSON"),
    ("[]", "a registry delta must be a JSON object"),
    (json.dumps({"format": "other", "version": 1, "operations": []}), "not a registry delta (format is 'other'"),
    (_document(version=2), "registry delta version 2 is not supported (this LayerDesk reads version 1)"),
    (_document(extra=1), "unknown field 'extra' in the registry delta"),
    (_document(operations={}), "the registry delta's 'operations' must be a list"),
    (_document(_SET, "set"), "registry delta operation 2: not a JSON object"),
    (_document({"op": "rename"}), "registry delta operation 1: unknown operation 'rename' (expected one of "
                                  "set_value, delete_value, delete_key, create_key)"),
    (_document({"op": ["set_value"]}), "operation 1: unknown operation ['set_value']"),
    (_document(_SET | {"hive": "HKLM"}), "operation 1: unknown hive 'HKLM'"),
    (_document(_SET | {"hive": 1}), "operation 1: 'hive' must be a string, not 1"),
    (_document(_SET | {"type": "REG_SZ"}), "operation 1: 'type' must be a number from 0 to 4294967295, not 'REG_SZ'"),
    (_document(_SET | {"type": False}), "operation 1: 'type' must be a number from 0 to 4294967295, not False"),
    (_document(_SET | {"type": -4}), "operation 1: value type -4 is not a number from 0 to 4294967295"),
    (_document(_SET | {"type": 1.0}), "operation 1: 'type' must be a number"),
    (_document(_SET | {"data": "abc"}), "operation 1: 'data' is not hex bytes: 'abc'"),
    (_document(_SET | {"data": "zz"}), "operation 1: 'data' is not hex bytes: 'zz'"),
    (_document(_SET | {"data": "61 00"}), "operation 1: 'data' is not hex bytes"),
    (_document(_SET | {"data": None}), "operation 1: 'data' must be a string, not None"),
    (_document(_SET | {"colour": "red"}), "operation 1: unknown field 'colour' for set_value"),
    (_document({"op": "delete_value", "hive": "SOFTWARE", "key": "A"}), "operation 1: delete_value needs a 'name'"),
    (_document({"op": "delete_key", "hive": "SOFTWARE", "key": ""}),
     "operation 1: the root key of the SOFTWARE hive cannot be deleted"),
    (_document({"op": "create_key", "hive": "SYSTEM", "key": r"A\\B"}), "operation 1: key path"),
    (_document({"op": "create_key", "hive": "SYSTEM", "key": 5}), "operation 1: 'key' must be a string, not 5"),
])
def test_json_is_checked_on_load(text: str | bytes, message: str) -> None:
    with pytest.raises(RegistryDeltaError) as caught:
        RegistryDelta.from_json(text)
    assert message in str(caught.value), str(caught.value)


def test_from_dict_reads_every_operation() -> None:
    document = EVERYTHING.to_dict()
    assert [op["op"] for op in document["operations"]] == [
        "set_value", "set_value", "delete_value", "delete_key", "create_key"]
    assert RegistryDelta.from_dict(document) == EVERYTHING


def test_deltas_compare_and_hash_by_their_operations() -> None:
    again = RegistryDelta(list(EVERYTHING))
    assert again == EVERYTHING and hash(again) == hash(EVERYTHING)
    assert RegistryDelta(EVERYTHING.operations[:-1]) != EVERYTHING
    assert EVERYTHING.operations != EVERYTHING
    assert "CreateKey(hive='NTUSER', key='')" in repr(EVERYTHING)
    assert EVERYTHING.hives == frozenset({"SOFTWARE", "SYSTEM", "DEFAULT", "DRIVERS", "NTUSER"})
