"""Patching hive files (app.engine.registry.patch): the tree a patch leaves is the tree a whole read, change
and rewrite gives, what the changes do not reach keeps its bytes, and the file stays what Windows expects
(every allocated cell in use, exact security reference counts, sorted and hashed subkey lists). Checked
with the tests' own cell walker, hivexml/hivexsh (libhivex) and regipy, on the real hives and on the
synthetic one."""

from __future__ import annotations

import hashlib
import lzma
import random
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from app.engine.registry.delta import CreateKey, DeleteKey, DeleteValue, Operation, RegistryDelta, SetValue
from app.engine.registry.model import Hive, RegistryKey, ValueType
from app.engine.registry.patch import PatchedHive, open_hive
from app.engine.registry.regf import HiveError, parse_hive, serialize_hive, write_hive
from tests.engine.test_hive import (
    DIRTY_WITHOUT_LOGS,
    EVERY_TYPE,
    HIVES,
    REAL,
    SD_A,
    SD_B,
    Layout,
    assert_same_entries,
    assert_same_tree,
    assert_valid_layout,
    descriptor,
    hivexml_entries,
    hivexsh,
    lh_hash,
    lsval,
    pattern,
    regipy_data,
    regipy_walk,
    synthetic_hive,
    text,
    walk_cells,
)

HIVE = "SOFTWARE"  # the deltas below name one hive; which one does not matter to the file format


@pytest.fixture(scope="module")
def real_hives() -> Callable[[str], bytes]:
    cache: dict[str, bytes] = {}

    def get(name: str) -> bytes:
        if name not in cache:
            cache[name] = lzma.decompress((HIVES / f"{name}.xz").read_bytes())
        return cache[name]

    return get


@pytest.fixture(scope="module")
def synthetic_file() -> bytes:
    return serialize_hive(synthetic_hive())


def random_delta(hive: Hive, seed: int, count: int = 300) -> RegistryDelta:
    """Sets (new and existing values, in new keys too, up to 40,000 bytes so big data is written), deletions
    of values and whole keys, creations and rewrites of a value with its own data, all over the tree."""
    rng = random.Random(seed)
    keys = [(path, key) for path, key in hive.root.walk() if path]
    ops: list[Operation] = []
    for i in range(count):
        path, key = rng.choice(keys)
        roll = rng.random()
        if roll < 0.4:
            where = f"{path}\\Neu{i}-ü" if rng.random() < 0.3 else path
            size = rng.choice([0, 2, 4, 8, 100, 16_344, 16_345, 40_000])
            ops.append(SetValue(HIVE, where, f"Wert{i}", rng.choice([1, 3, 4, 11]), rng.randbytes(size)))
        elif roll < 0.55:
            ops.append(DeleteKey(HIVE, path))
        elif roll < 0.75 and key.values:
            ops.append(DeleteValue(HIVE, path, rng.choice(list(key.values.values())).name))
        elif roll < 0.85:
            ops.append(CreateKey(HIVE, f"{path}\\Créé{i}"))
        elif key.values:
            value = rng.choice(list(key.values.values()))
            ops.append(SetValue(HIVE, path, value.name, value.type, value.data))
    return RegistryDelta(ops)


def patched(data: bytes, delta: RegistryDelta, **options: object) -> bytes:
    hive = PatchedHive(data, **options)  # type: ignore[arg-type]
    delta.apply({HIVE: hive})
    return hive.to_bytes()


def free_neighbours(layout: Layout) -> list[int]:
    """Free cells followed, in the same bin, by another free cell."""
    return [offset for offset, size in layout.cells.items() if size > 0 and layout.cells.get(offset + size, -1) > 0]


@pytest.mark.parametrize("name", REAL)
def test_a_patch_leaves_the_tree_a_whole_rewrite_gives(name: str, real_hives: Callable[[str], bytes],
                                                         tmp_path: Path) -> None:
    """Three hundred random changes to each real hive: our reader, hivexml and the cell walker see in the
    patched file what a whole read, change and rewrite gives; the file has no leaked or doubly used cell."""
    data = real_hives(name)
    dirty = name in DIRTY_WITHOUT_LOGS
    expected = parse_hive(data, allow_dirty=dirty)
    delta = random_delta(expected, seed=len(name))
    out = patched(data, delta, allow_dirty=dirty)
    delta.apply({HIVE: expected})
    assert assert_same_tree(expected.root, parse_hive(out).root) > 0
    assert_valid_layout(out)
    (tmp_path / "patched").write_bytes(out)
    write_hive(expected, tmp_path / "rewritten")
    assert_same_entries(hivexml_entries(tmp_path / "rewritten"), hivexml_entries(tmp_path / "patched"))
    if len(data) < 1 << 20:  # regipy takes minutes over the big SYSTEM hives
        assert sorted(regipy_walk(tmp_path / "patched"), key=str) == sorted(regipy_walk(tmp_path / "rewritten"),
                                                                         key=str)


def test_what_the_changes_do_not_reach_keeps_its_bytes(real_hives: Callable[[str], bytes]) -> None:
    """One value set deep in SYSTEM: every other key keeps its key node where it was, byte for byte, and
    the file grows by one bin."""
    data = real_hives("SYSTEM")
    target = "ControlSet001\\services\\Tcpip\\Parameters"  # spelled as the hive spells it
    delta = RegistryDelta([SetValue(HIVE, target, "LayerDesk", ValueType.DWORD, b"\x01\0\0\0")])
    out = patched(data, delta)
    before, after = walk_cells(data), walk_cells(out)
    assert before.keys.keys() == after.keys.keys()
    changed = {p for p in before.keys if before.keys[p].offset != after.keys[p].offset
               or data[4096 + before.keys[p].offset:4096 + before.keys[p].offset + 80]
               != out[4096 + after.keys[p].offset:4096 + after.keys[p].offset + 80]}
    assert changed == {target}
    assert len(out) == len(data) + 4096
    pages = [at for at in range(4096, len(data), 4096) if data[at:at + 4096] != out[at:at + 4096]]
    assert 1 <= len(pages) <= 2  # the key node's page, and the old value list's if it is another one


def test_the_changed_keys_carry_the_deltas_write_time_and_the_others_keep_theirs(
        real_hives: Callable[[str], bytes], tmp_path: Path) -> None:
    """hivexml (not ours) reads a patched real SYSTEM hive: the key given a value, the parent of a deleted
    key, the parent of a new key and the new keys show the delta's write time; every other key shows the time
    it had before."""
    data = real_hives("SYSTEM")
    tcpip = "ControlSet001\\services\\Tcpip"
    stamp = 134_100_000_000_000_000  # 2025-12-12 08:00 UTC
    delta = RegistryDelta([
        SetValue(HIVE, f"{tcpip}\\Parameters", "LayerDesk", ValueType.DWORD, b"\x01\0\0\0"),
        DeleteKey(HIVE, f"{tcpip}\\Performance"),
        SetValue(HIVE, f"{tcpip}\\ServiceProvider\\LayerDesk\\Sub", "v", ValueType.SZ, text("x")),
    ])
    hive = PatchedHive(data)
    delta.apply({HIVE: hive}, written=stamp)
    (tmp_path / "before").write_bytes(data)
    (tmp_path / "after").write_bytes(hive.to_bytes())
    before = {e[1]: e[2] for e in hivexml_entries(tmp_path / "before") if e[0] == "key"}
    after = {e[1]: e[2] for e in hivexml_entries(tmp_path / "after") if e[0] == "key"}
    shown = "2025-12-12T08:00:00Z"
    changed = {f"\\{tcpip}", f"\\{tcpip}\\Parameters", f"\\{tcpip}\\ServiceProvider",
               f"\\{tcpip}\\ServiceProvider\\LayerDesk", f"\\{tcpip}\\ServiceProvider\\LayerDesk\\Sub"}
    assert {path for path, time in after.items() if time == shown} == changed
    assert {path: time for path, time in after.items() if path not in changed} == {
        path: time for path, time in before.items() if path in after and path not in changed}
    assert set(before) - set(after) == {path for path in before if path.startswith(f"\\{tcpip}\\Performance")}
    assert_valid_layout(hive.to_bytes())


def test_only_the_keys_on_the_way_are_read(real_hives: Callable[[str], bytes]) -> None:
    """Setting a value reads the keys on its path (and their subkeys' key nodes), nothing below them."""
    hive = PatchedHive(real_hives("SYSTEM"))
    hive.ensure("ControlSet001\\Services\\Tcpip\\Parameters").set_value("X", ValueType.DWORD, bytes(4))
    opened: list[str] = []
    stack: list[tuple[str, RegistryKey]] = [("", hive.root)]
    while stack:
        path, key = stack.pop()
        if getattr(key, "opened", False):
            opened.append(path)
            stack.extend((f"{path}\\{k.name}".lstrip("\\"), k) for k in key.subkeys.values())
    assert sorted(opened) == ["", "ControlSet001", "ControlSet001\\services", "ControlSet001\\services\\Tcpip",
                              "ControlSet001\\services\\Tcpip\\Parameters"]
    services = hive.find("ControlSet001\\services")
    assert services is not None
    assert list(services.subkeys) == ["tcpip"]  # of its hundreds of subkeys, only the one on the way is a key
    assert len(services.stored_subkeys) > 300  # type: ignore[attr-defined]


def test_a_key_deleted_and_made_again_is_a_new_empty_key(synthetic_file: bytes) -> None:
    """Deleting keys whose nodes were never read (and one that was), then creating two of them again: the
    old ones are gone with everything below them, the new ones hold only what was set after."""
    expected = parse_hive(synthetic_file)
    delta = RegistryDelta([
        SetValue(HIVE, "Tree\\Branch04\\Leaf001", "Before", ValueType.DWORD, bytes(4)),
        DeleteKey(HIVE, "Tree\\Branch03"), DeleteKey(HIVE, "Tree\\Branch04"), DeleteKey(HIVE, "Tree\\Branch05"),
        SetValue(HIVE, "Tree\\branch03\\Neu", "After", ValueType.DWORD, b"\x01\0\0\0"),
        CreateKey(HIVE, "Tree\\Branch04"),
    ])
    out = patched(synthetic_file, delta)
    delta.apply({HIVE: expected})
    assert_same_tree(expected.root, parse_hive(out).root)
    layout = assert_valid_layout(out)
    assert sorted(p for p in layout.keys if p.startswith(("Tree\\Branch03", "Tree\\branch03", "Tree\\Branch04"))) == [
        "Tree\\Branch04", "Tree\\branch03", "Tree\\branch03\\Neu"]
    assert "Tree\\Branch05" not in layout.keys


def sk_cells(data: bytes, layout: Layout) -> dict[int, bytes]:
    """Every security cell on the list: offset -> descriptor."""
    cells = {}
    for offset in layout.security_refs:
        at = 4096 + offset + 4
        (size,) = struct.unpack_from("<I", data, at + 16)
        cells[offset] = data[at + 20:at + 20 + size]
    return cells


def test_security_cells_follow_the_keys(synthetic_file: bytes, tmp_path: Path) -> None:
    """A new key shares its parent's security cell; deleting every key that used a descriptor unlinks and
    frees its cell; the list stays one consistent circle with exact reference counts."""
    layout = walk_cells(synthetic_file)
    assert sorted(sk_cells(synthetic_file, layout).values()) == sorted([SD_A, SD_B])
    added = patched(synthetic_file, RegistryDelta([CreateKey(HIVE, "Tree\\Branch07\\Neu")]))
    after = assert_valid_layout(added)
    security = after.keys["Tree\\Branch07\\Neu"]
    nk = 4096 + security.offset + 4
    (sk,) = struct.unpack_from("<I", added, nk + 44)
    assert sk_cells(added, after)[sk] == SD_B
    assert after.security_refs[sk] == layout.security_refs[sk] + 1

    gone = patched(synthetic_file, RegistryDelta([DeleteKey(HIVE, "Tree")]))
    after = assert_valid_layout(gone)
    assert list(sk_cells(gone, after).values()) == [SD_A]
    assert not [p for p in after.keys if p.startswith("Tree")]
    assert free_neighbours(after) == []
    assert len(gone) == len(synthetic_file) + 4096  # one bin for the root's new subkey list


def test_new_keys_big_values_and_non_ascii_names_read_back_everywhere(synthetic_file: bytes,
                                                                      tmp_path: Path) -> None:
    """New keys with every value type, a 100,000-byte value and non-ASCII names; an old big value replaced
    by a short one (its big-data cells freed): hivexsh, regipy and our reader read what was written."""
    ops: list[Operation] = [SetValue(HIVE, "Neu\\日本\\値", name, kind, data)
                            for name, (kind, data) in EVERY_TYPE.items()]
    ops += [SetValue(HIVE, "Values", "Binary100000", ValueType.BINARY, b"short"),
            SetValue(HIVE, "Neu\\日本\\値", "Ölwert-名前", ValueType.SZ, text("Wert")),
            DeleteValue(HIVE, "Values", "Binary16345")]
    expected = synthetic_hive()
    delta = RegistryDelta(ops)
    path = tmp_path / "SYNTHETIC"
    path.write_bytes(patched(synthetic_file, delta))
    delta.apply({HIVE: expected})
    assert_same_tree(expected.root, parse_hive(path.read_bytes()).root)
    layout = assert_valid_layout(path.read_bytes())
    assert layout.keys["Neu\\日本\\値"].value_storage["Binary100000"] == ("db", 7)
    assert free_neighbours(layout) == []
    shown = lsval(hivexsh(path, tmp_path, "cd Neu\\日本\\値\nlsval"))
    assert shown["Binary100000"] == EVERY_TYPE["Binary100000"]
    assert shown["Binary16345"] == EVERY_TYPE["Binary16345"]
    assert shown["Ölwert-名前"] == (ValueType.SZ, text("Wert"))
    values = lsval(hivexsh(path, tmp_path, "cd Values\nlsval"))
    assert values["Binary100000"] == (ValueType.BINARY, b"short") and "Binary16345" not in values
    walked = {p.strip("\\"): values for p, _, values in regipy_walk(path)}
    found = {n: d for n, _, d in walked["Neu\\日本\\値"]}
    new = expected.find("Neu\\日本\\値")
    assert new is not None
    assert found["Binary100000"] == regipy_data(new.values["binary100000"]) == EVERY_TYPE["Binary100000"][1]
    assert found["Ölwert-名前"] == "Wert"


def test_subkey_lists_stay_sorted_hashed_and_split(synthetic_file: bytes) -> None:
    """Keys added to a key of 2,100 subkeys (an index root over leaves) and to one of five: the lists are
    rebuilt in Windows' order (upper-case UTF-16) with the right lh hashes, the big one still split."""
    names = ["Entry01000x", "aaa", "ZZZ", "_under", "Ärger"]
    delta = RegistryDelta([*(CreateKey(HIVE, f"Big\\{n}") for n in names), CreateKey(HIVE, "Order\\c"),
                           DeleteKey(HIVE, "Order\\Z"), DeleteKey(HIVE, "Big\\Entry00007")])
    layout = assert_valid_layout(patched(synthetic_file, delta))
    big = layout.keys["Big"]
    assert big.list_kind == "ri" and all(kind == "lh" for kind, _ in big.leaves)
    listed = [name for name, _ in big.entries]
    assert len(listed) == 2100 + len(names) - 1 and "Entry00007" not in listed
    assert listed == sorted(listed, key=lambda n: n.upper().encode("utf-16-be"))
    assert all(value == lh_hash(name) for name, value in big.entries)
    assert [name for name, _ in layout.keys["Order"].entries] == ["A", "a1", "b", "c", "_x"]


def test_a_version_1_3_hive_is_patched_with_its_own_cells(tmp_path: Path) -> None:
    """Before version 1.4 there is no big data and leaves are lf: new cells follow the hive's version."""
    original = synthetic_hive(minor_version=3)
    data = serialize_hive(original)
    delta = RegistryDelta([SetValue(HIVE, "Neu\\Sub", "Big", ValueType.BINARY, pattern(40_000, 9)),
                           CreateKey(HIVE, "Order\\c")])
    out = patched(data, delta)
    delta.apply({HIVE: original})
    assert_same_tree(original.root, parse_hive(out).root)
    layout = assert_valid_layout(out)
    assert layout.header["version"] == "1.3"
    assert layout.keys["Neu\\Sub"].value_storage["Big"] == ("cell", 1)
    assert layout.keys["Order"].list_kind == "lf"


def test_a_dirty_hive_is_patched_after_its_logs_are_replayed(real_hives: Callable[[str], bytes]) -> None:
    data, logs = real_hives("SYSTEM_B"), [real_hives("SYSTEM_B.LOG1"), real_hives("SYSTEM_B.LOG2")]
    expected = parse_hive(data, logs=logs)
    delta = random_delta(expected, seed=5, count=50)
    out = patched(data, delta, logs=logs)
    delta.apply({HIVE: expected})
    assert_same_tree(expected.root, parse_hive(out).root)
    assert assert_valid_layout(out).header["seq1"] > struct.unpack_from("<I", data, 4)[0]
    with pytest.raises(HiveError) as caught:
        PatchedHive(data, name="SYSTEM_B")
    assert "was not cleanly closed" in str(caught.value) and "were not found" in str(caught.value)


def test_open_hive_picks_up_the_logs_beside_the_file(real_hives: Callable[[str], bytes], tmp_path: Path) -> None:
    for name in ("SYSTEM_B", "SYSTEM_B.LOG1", "SYSTEM_B.LOG2"):
        (tmp_path / name).write_bytes(real_hives(name))
    hive = open_hive(tmp_path / "SYSTEM_B")
    select = hive.find("Select")
    assert select is not None and select.value("Current") is not None


def test_damaged_hives_are_refused(real_hives: Callable[[str], bytes], synthetic_file: bytes) -> None:
    """A damaged bin or cell boundary anywhere is refused when the hive is opened; a damaged key node is
    refused when a change reaches it, deleting a key included. Nothing is written either way."""
    with pytest.raises(HiveError) as caught:
        PatchedHive(real_hives("corrupted_system_hive"), name="SYSTEM")
    assert str(caught.value).startswith("SYSTEM: the hive is damaged (bad hive bin header at offset")

    layout = walk_cells(synthetic_file)
    free_cell = max(offset for offset, size in layout.cells.items() if size > 0)
    broken = bytearray(synthetic_file)
    struct.pack_into("<i", broken, 4096 + free_cell, 12)  # a free cell no key reaches, its size no multiple of 8
    with pytest.raises(HiveError) as caught:
        PatchedHive(bytes(broken), name="H")
    assert str(caught.value) == f"H: the hive is damaged (cell at {free_cell:#x} has a bad size); refusing to read it"

    branch = layout.keys["Tree\\Branch05\\Leaf050"].offset
    broken = bytearray(synthetic_file)
    broken[4096 + branch + 4:4096 + branch + 6] = b"xx"
    message = f"H: the hive is damaged (cell at {branch:#x} is not a key node); refusing to read it"
    hive = PatchedHive(bytes(broken), name="H")
    with pytest.raises(HiveError) as caught:
        hive.ensure("Tree\\Branch05")  # reads its subkeys' key nodes: Leaf050's is not one
    assert str(caught.value) == message
    hive = PatchedHive(bytes(broken), name="H")
    RegistryDelta([DeleteKey(HIVE, "Tree\\Branch05")]).apply({HIVE: hive})
    with pytest.raises(HiveError) as caught:
        hive.to_bytes()  # freeing the deleted key walks what was below it
    assert str(caught.value) == message


def test_write_puts_the_patched_file_in_place_and_returns_its_checksum(synthetic_file: bytes,
                                                                     tmp_path: Path) -> None:
    (tmp_path / "config").mkdir()
    target = tmp_path / "config" / "SOFTWARE"
    target.write_bytes(b"the old file")
    hive = PatchedHive(synthetic_file)
    hive.ensure("Neu").set_value("Wert", ValueType.DWORD, b"\x05\0\0\0")
    digest = hive.write(target)
    assert target.read_bytes() == hive.to_bytes()
    assert digest == hashlib.sha256(target.read_bytes()).hexdigest()
    assert sorted(p.name for p in target.parent.iterdir()) == ["SOFTWARE"]  # no temporary file left
    neu = parse_hive(target.read_bytes()).find("Neu")
    assert neu is not None and neu.values["wert"].data == b"\x05\0\0\0"


def test_a_new_key_with_a_descriptor_of_its_own_gets_a_new_security_cell(synthetic_file: bytes) -> None:
    """Deltas never set a descriptor, but the model allows it: a descriptor the file does not hold gets a new
    security cell, linked into the circular list, and its subkeys share it."""
    own = descriptor("S-1-5-19", ("S-1-5-19", 0xF003F))
    hive = PatchedHive(synthetic_file)
    neu = hive.ensure("Neu")
    neu.security = own
    neu.add_subkey("Unter")
    out = hive.to_bytes()
    layout = assert_valid_layout(out)
    cells = sk_cells(out, layout)
    assert sorted(cells.values()) == sorted([SD_A, SD_B, own])
    for path in ("Neu", "Neu\\Unter"):
        (sk,) = struct.unpack_from("<I", out, 4096 + layout.keys[path].offset + 4 + 44)
        assert cells[sk] == own
    reread = parse_hive(out).find("Neu\\Unter")
    assert reread is not None and reread.security == own
