"""The regf reader and writer: real Windows hives round-trip, and what we write is checked by readers that
are not ours (hivex's ``hivexml``/``hivexsh`` and ``regipy``) and by a small cell walker written here."""

from __future__ import annotations

import base64
import gc
import logging
import lzma
import re
import shutil
import struct
import subprocess
import time
import warnings
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from regipy.recovery import apply_transaction_logs
from regipy.registry import RegistryHive

from app.engine.registry.model import Hive, RegistryKey, RegistryValue, ValueType
from app.engine.registry.regf import (
    HiveError,
    default_security_descriptor,
    parse_hive,
    read_hive,
    serialize_hive,
    write_hive,
)

HIVES = Path(__file__).resolve().parents[2].parent / "shared" / "testdata" / "hives"
REAL = ["SYSTEM_WIN_10_1709", "SYSTEM", "NTUSER.DAT", "SAM", "BCD"]
#: SYSTEM_WIN_10_1709 is itself dirty (sequence numbers 4317/4316) and its logs were not kept: it is read
#: as the primary file has it (``allow_dirty=True``), which is how every other tool reads it too.
DIRTY_WITHOUT_LOGS = {"SYSTEM_WIN_10_1709"}
LSA_BOOT_KEY = ("JD", "Skew1", "GBG", "Data")
NIL = 0xFFFFFFFF

# regipy logs a warning for every value it cannot decode as text; that is noise here.
logging.getLogger("regipy").setLevel(logging.CRITICAL)


# --- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def hive_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real test hives, decompressed once per session (never copied into the repository)."""
    assert HIVES.is_dir(), f"the real test hives are missing: {HIVES}"
    target = tmp_path_factory.mktemp("hives")
    for packed in sorted(HIVES.glob("*.xz")):
        (target / packed.stem).write_bytes(lzma.decompress(packed.read_bytes()))
    return target


@dataclass
class RoundTrip:
    original: Hive
    written: Path
    reread: Hive


@pytest.fixture(scope="session")
def round_trip(hive_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], RoundTrip]:
    """``round_trip(name)``: the real hive read, written by us, and read back (cached for the session)."""
    out = tmp_path_factory.mktemp("written")
    done: dict[str, RoundTrip] = {}

    def get(name: str) -> RoundTrip:
        if name not in done:
            original = read_hive(hive_dir / name, allow_dirty=name in DIRTY_WITHOUT_LOGS)
            write_hive(original, out / name)
            done[name] = RoundTrip(original, out / name, read_hive(out / name))
        return done[name]

    return get


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is not installed: apt-get install libhivex-bin (tests/run.sh does it)"
    return path


# --- comparing trees -------------------------------------------------------------------------------


def assert_same_tree(expected: RegistryKey, actual: RegistryKey, *, flags: bool = True) -> int:
    """Walk both trees in step: names, class names, effective security descriptors, timestamps, flags, and
    every value's name, type and data, in order. Returns the number of values compared."""
    compared = 0
    stack: list[tuple[RegistryKey, RegistryKey, str, bytes | None, bytes | None]] = [
        (expected, actual, expected.name, None, None)
    ]
    while stack:
        want, got, path, want_sd, got_sd = stack.pop()
        want_sd = want.security if want.security is not None else want_sd
        got_sd = got.security if got.security is not None else got_sd
        assert got.name == want.name, path
        assert got.class_name == want.class_name, f"class name of {path}"
        assert got_sd == want_sd, f"security descriptor of {path}"
        assert got.last_written == want.last_written, f"timestamp of {path}"
        if flags:
            assert got.flags == want.flags, f"flags of {path}"
        assert [v.name for v in got.values.values()] == [v.name for v in want.values.values()], path
        for name, value in want.values.items():
            other = got.values[name]
            assert (other.type, other.data) == (value.type, value.data), f"value {value.name!r} of {path}"
            compared += 1
        assert sorted(got.subkeys) == sorted(want.subkeys), f"subkeys of {path}"
        stack.extend((want.subkeys[k], got.subkeys[k], f"{path}\\{want.subkeys[k].name}", want_sd, got_sd)
                     for k in want.subkeys)
    return compared


def count(hive: Hive) -> tuple[int, int]:
    keys = list(hive.root.walk())
    return len(keys), sum(len(k.values) for _, k in keys)


# --- an independent cell walker ---------------------------------------------------------------------


@dataclass
class RawKey:
    offset: int
    list_kind: str = ""  # "lh", "lf", "li" or "ri"
    leaves: list[tuple[str, int]] = field(default_factory=list)  # (signature, entries) of each leaf
    entries: list[tuple[str, int]] = field(default_factory=list)  # (subkey name, hash / hint field)
    value_storage: dict[str, tuple[str, int]] = field(default_factory=dict)  # name -> (inline/cell/db, segments)


@dataclass
class Layout:
    cells: dict[int, int]  # offset -> signed cell size, as the bins hold them
    referenced: set[int]
    security_refs: Counter[int]
    keys: dict[str, RawKey]
    header: dict[str, int | str]


def walk_cells(data: bytes) -> Layout:
    """Check a hive file's header and bins and follow every reference from the root key.

    Written for these tests from the format description, sharing nothing with the module under test."""
    assert data[:4] == b"regf"
    seq1, seq2, stamp, major, minor, file_type, file_format, root, bins_size, _ = struct.unpack_from(
        "<IIQIIIIIII", data, 4)
    checksum = 0
    for (word,) in struct.iter_unpack("<I", data[:508]):
        checksum ^= word
    header: dict[str, int | str] = {
        "seq1": seq1, "seq2": seq2, "stamp": stamp, "version": f"{major}.{minor}", "type": file_type,
        "format": file_format, "bins_size": bins_size,
        "checksum_ok": int(checksum == struct.unpack_from("<I", data, 508)[0]),
        "file_name": data[48:112].decode("utf-16-le").split("\0")[0],
    }
    cells: dict[int, int] = {}
    pos = 4096
    while pos < 4096 + bins_size:
        signature, offset, size = struct.unpack_from("<4sII", data, pos)
        assert signature == b"hbin" and offset == pos - 4096, f"hbin at {pos - 4096:#x}"
        assert size >= 4096 and size % 4096 == 0, f"hbin size {size}"
        cell = pos + 32
        while cell < pos + size:
            length = struct.unpack_from("<i", data, cell)[0]
            assert length != 0 and abs(length) % 8 == 0, f"cell at {cell - 4096:#x}"
            cells[cell - 4096] = length
            cell += abs(length)
        assert cell == pos + size, f"cells overrun the hbin at {pos - 4096:#x}"
        pos += size

    referenced: set[int] = set()
    security_refs: Counter[int] = Counter()
    keys: dict[str, RawKey] = {}

    def body(offset: int) -> int:
        assert cells.get(offset, 0) < 0, f"reference to a free or unknown cell {offset:#x}"
        referenced.add(offset)
        return 4096 + offset + 4

    def name_of(raw: bytes, compressed: bool) -> str:
        return raw.decode("latin-1") if compressed else raw.decode("utf-16-le")

    stack = [(root, "")]
    while stack:
        offset, path = stack.pop()
        at = body(offset)
        assert data[at:at + 2] == b"nk"
        n_sub, _, sub_list, _, n_val, val_list, security, class_offset = struct.unpack_from("<8I", data, at + 20)
        key = keys[path] = RawKey(offset)
        security_refs[security] += 1
        body(security)
        if class_offset != NIL:
            body(class_offset)
        if n_val:
            values_at = body(val_list)
            for vk in struct.unpack_from(f"<{n_val}I", data, values_at):
                v = body(vk)
                assert data[v:v + 2] == b"vk"
                length, size, data_offset, _, vflags = struct.unpack_from("<HIIIH", data, v + 2)
                value_name = name_of(data[v + 20:v + 20 + length], bool(vflags & 1))
                if size & 0x80000000 or size == 0:
                    key.value_storage[value_name] = ("inline", 0)
                    continue
                d = body(data_offset)
                if data[d:d + 2] == b"db" and size > 16344:
                    segments, segment_list = struct.unpack_from("<HI", data, d + 2)
                    for segment in struct.unpack_from(f"<{segments}I", data, body(segment_list)):
                        body(segment)
                    key.value_storage[value_name] = ("db", segments)
                else:
                    key.value_storage[value_name] = ("cell", 1)
        if n_sub:
            at_list = body(sub_list)
            key.list_kind = data[at_list:at_list + 2].decode()
            (n,) = struct.unpack_from("<H", data, at_list + 2)
            leaves = struct.unpack_from(f"<{n}I", data, at_list + 4) if key.list_kind == "ri" else (sub_list,)
            children = []
            for leaf in leaves:
                at_leaf = body(leaf)
                kind = data[at_leaf:at_leaf + 2].decode()
                (m,) = struct.unpack_from("<H", data, at_leaf + 2)
                key.leaves.append((kind, m))
                step = 4 if kind == "li" else 8
                for i in range(m):
                    child, extra = struct.unpack_from("<II", data, at_leaf + 4 + step * i) if step == 8 else (
                        struct.unpack_from("<I", data, at_leaf + 4 + 4 * i)[0], 0)
                    children.append((child, extra))
            assert len(children) == n_sub, path
            for child, extra in children:
                at_child = 4096 + child + 4
                (child_flags,) = struct.unpack_from("<H", data, at_child + 2)
                (child_length,) = struct.unpack_from("<H", data, at_child + 72)
                (parent,) = struct.unpack_from("<I", data, at_child + 16)
                assert parent == offset, f"parent of a subkey of {path}"
                child_name = name_of(data[at_child + 76:at_child + 76 + child_length], bool(child_flags & 0x20))
                key.entries.append((child_name, extra))
                stack.append((child, f"{path}\\{child_name}" if path else child_name))
    return Layout(cells, referenced, security_refs, keys, header)


def assert_valid_layout(data: bytes) -> Layout:
    """Header, bins and allocation are what Windows expects; the security list is consistent."""
    layout = walk_cells(data)
    h = layout.header
    assert h["seq1"] == h["seq2"], "a written hive must be clean"
    assert h["checksum_ok"] == 1
    assert (h["type"], h["format"]) == (0, 1)
    assert h["bins_size"] == len(data) - 4096
    allocated = {offset for offset, size in layout.cells.items() if size < 0}
    assert allocated == layout.referenced, "every allocated cell is in use and every used cell allocated"
    # the security cells: one circular doubly linked list holding them all, with exact reference counts
    first = next(iter(layout.security_refs))
    seen, current = [], first
    while True:
        at = 4096 + current + 4
        signature, _, flink, _, refs, size = struct.unpack_from("<2sHIIII", data, at)
        assert signature == b"sk"
        assert refs == layout.security_refs[current], f"reference count of sk at {current:#x}"
        assert size <= -layout.cells[current] - 24
        assert struct.unpack_from("<I", data, 4096 + flink + 4 + 8)[0] == current, "blink of the next sk"
        seen.append(current)
        current = flink
        if current == first:
            break
    assert sorted(seen) == sorted(layout.security_refs)
    return layout


def lh_hash(name: str) -> int:
    value = 0
    for ch in name.upper():
        value = (value * 37 + ord(ch)) & 0xFFFFFFFF
    return value


# --- independent readers -----------------------------------------------------------------------------


def hivexml_entries(path: Path) -> list[tuple[object, ...]]:
    """hivexml's dump of a hive as a flat list: each key (path, timestamp) then its values, in file order."""
    done = subprocess.run([_tool("hivexml"), str(path)], capture_output=True, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    document = ET.fromstring(done.stdout)
    entries: list[tuple[object, ...]] = []
    start = document.find("node")
    assert start is not None
    stack = [(start, "")]
    while stack:
        node, path = stack.pop()
        entries.append(("key", path, node.findtext("mtime")))
        for value in node.findall("value"):
            name = "" if value.get("default") == "1" else value.get("key", "")
            strings = tuple(s.text or "" for s in value.findall("string"))
            entries.append(("value", path, name, value.get("type"), value.get("encoding"), value.get("value"), strings))
        children = node.findall("node")
        stack.extend((child, f"{path}\\{child.get('name')}") for child in reversed(children))
    return entries


def hivexml_expected(hive: Hive) -> list[tuple[object, ...]]:
    """What hivexml prints for our model (for the value types and well-formed data the synthetic hive uses)."""
    names = {ValueType.SZ: "string", ValueType.EXPAND_SZ: "expand", ValueType.LINK: "link"}
    encoded = {ValueType.NONE: "none", ValueType.BINARY: "binary", ValueType.RESOURCE_LIST: "resource-list",
               ValueType.FULL_RESOURCE_DESCRIPTOR: "resource-description",
               ValueType.RESOURCE_REQUIREMENTS_LIST: "resource-requirements"}
    entries: list[tuple[object, ...]] = []
    stack = [(hive.root, "")]
    while stack:
        key, path = stack.pop()
        stamp = datetime(1601, 1, 1, tzinfo=UTC) + timedelta(microseconds=key.last_written // 10)
        entries.append(("key", path, stamp.strftime("%Y-%m-%dT%H:%M:%SZ") if key.last_written else None))
        for v in key.values.values():
            kind = v.type
            if kind in names:
                item: tuple[object, ...] = (names[ValueType(kind)], None, v.data.decode("utf-16-le").rstrip("\0"), ())
            elif kind in (ValueType.DWORD, ValueType.DWORD_BIG_ENDIAN):
                order = "little" if kind == ValueType.DWORD else "big"
                item = ("int32", None, str(int.from_bytes(v.data, order, signed=True)), ())
            elif kind == ValueType.QWORD:
                item = ("int64", None, str(int.from_bytes(v.data, "little", signed=True)), ())
            elif kind == ValueType.MULTI_SZ:
                item = ("string-list", None, None, tuple(v.data.decode("utf-16-le").split("\0")[:-1]))
            else:
                item = (encoded.get(kind, "unknown"), "base64", v.data, ())
            entries.append(("value", path, v.name, *item))
        ordered = sorted(key.subkeys.values(), key=lambda k: k.name.upper().encode("utf-16-be"))
        stack.extend((k, f"{path}\\{k.name}") for k in reversed(ordered))
    return entries


def decode_base64_entries(entries: list[tuple[object, ...]]) -> list[tuple[object, ...]]:
    out = []
    for entry in entries:
        if entry[0] == "value" and entry[4] == "base64":
            text = str(entry[5] or "")
            entry = (*entry[:5], base64.b64decode("".join(text.split())), entry[6])
        out.append(entry)
    return out


def assert_same_entries(expected: list[tuple[object, ...]], actual: list[tuple[object, ...]]) -> None:
    for want, got in zip(expected, actual, strict=False):
        assert got == want
    assert len(actual) == len(expected)


#: The value types whose data regipy decodes from the value itself. For any other type it reads as many bytes
#: as the size field says from where the data offset points - for inline data (size field 0x80000000 + n)
#: that is whatever follows in the file, so it differs between two layouts of the same tree.
REGIPY_DECODES = {"REG_SZ", "REG_EXPAND_SZ", "REG_BINARY", "REG_NONE", "REG_DWORD", "REG_QWORD", "REG_MULTI_SZ"}


def regipy_walk(path: Path) -> Iterator[tuple[str, str, list[tuple[str, str, object]]]]:
    """(path, key name, [(value name, type name, decoded data or None)]) for every key regipy finds."""
    hive = RegistryHive(str(path))
    for sub in hive.recurse_subkeys(as_json=False):  # the root key comes last, as "\\"
        yield sub.path, sub.subkey_name, [
            (v.name, v.value_type, v.value if v.value_type in REGIPY_DECODES else None) for v in sub.values]


# --- the synthetic hive ------------------------------------------------------------------------------

T0 = 132_223_104_000_000_000  # 2020-01-01T00:00:00Z as a FILETIME


def descriptor(owner: str, *aces: tuple[str, int]) -> bytes:
    """A self-relative security descriptor: owner and group ``owner``, an ACL allowing ``aces``."""

    def sid(text: str) -> bytes:
        _, _, authority, *subs = text.split("-")
        return struct.pack(f"<BB6s{len(subs)}I", 1, len(subs), int(authority).to_bytes(6, "big"),
                           *map(int, subs))

    body = b"".join(struct.pack("<BBHI", 0, 2, 8 + len(sid(s)), mask) + sid(s) for s, mask in aces)
    acl = struct.pack("<BBHHH", 2, 0, 8 + len(body), len(aces), 0) + body
    o = sid(owner)
    return struct.pack("<BBHIIII", 1, 0, 0x8004, 20, 20 + len(o), 0, 20 + 2 * len(o)) + o + o + acl


SD_A = descriptor("S-1-5-32-544", ("S-1-5-18", 0xF003F), ("S-1-5-32-544", 0xF003F), ("S-1-5-32-545", 0x20019))
SD_B = descriptor("S-1-5-18", ("S-1-5-18", 0xF003F), ("S-1-1-0", 0x20019))


def text(value: str) -> bytes:
    return (value + "\0").encode("utf-16-le")


def pattern(size: int, seed: int) -> bytes:
    return bytes((i * 7 + seed) % 251 for i in range(size))


EVERY_TYPE: dict[str, tuple[int, bytes]] = {
    "None": (ValueType.NONE, b""),
    "String": (ValueType.SZ, text("hello, registry")),
    "Expand": (ValueType.EXPAND_SZ, text("%SystemRoot%\\System32")),
    "Binary": (ValueType.BINARY, bytes(range(40))),
    "Dword": (ValueType.DWORD, (0x12345678).to_bytes(4, "little")),
    "DwordBigEndian": (ValueType.DWORD_BIG_ENDIAN, (0x12345678).to_bytes(4, "big")),
    "Link": (ValueType.LINK, "\\Registry\\Machine\\System\\ControlSet001".encode("utf-16-le")),
    "Multi": (ValueType.MULTI_SZ, "alpha\0beta\0gamma\0\0".encode("utf-16-le")),
    "ResourceList": (ValueType.RESOURCE_LIST, pattern(48, 1)),
    "FullResourceDescriptor": (ValueType.FULL_RESOURCE_DESCRIPTOR, pattern(36, 2)),
    "ResourceRequirementsList": (ValueType.RESOURCE_REQUIREMENTS_LIST, pattern(72, 3)),
    "Qword": (ValueType.QWORD, (2**40 + 5).to_bytes(8, "little")),
    "Binary100000": (ValueType.BINARY, pattern(100_000, 4)),
    "Binary16344": (ValueType.BINARY, pattern(16_344, 5)),
    "Binary16345": (ValueType.BINARY, pattern(16_345, 6)),
    "Inline0": (ValueType.BINARY, b""),
    "Inline1": (ValueType.BINARY, b"\x01"),
    "Inline2": (ValueType.BINARY, b"\x01\x02"),
    "Inline3": (ValueType.BINARY, b"\x01\x02\x03"),
    "Inline4": (ValueType.BINARY, b"\x01\x02\x03\x04"),
    "Five": (ValueType.BINARY, b"\x01\x02\x03\x04\x05"),
    "DeviceProperty": (0xFFFF0012, pattern(20, 7)),  # a type number outside ValueType, as real hives have
}
BIG_KEY_SUBKEYS = 2100


def synthetic_hive(minor_version: int = 5) -> Hive:
    """5,000+ keys: one with 2,100 subkeys, a 30 x 100 tree under a second descriptor, every value type,
    big-data boundaries, default values, class names, non-ASCII key and value names."""
    root = RegistryKey("SyntheticRoot", security=SD_A, last_written=T0, flags=0x000C)
    hive = Hive(root, file_name="\\REGISTRY\\MACHINE\\SYNTHETIC", minor_version=minor_version)
    big = root.add_subkey("Big")
    big.last_written = T0 + 1
    for i in range(BIG_KEY_SUBKEYS):
        entry = big.add_subkey(f"Entry{i:05d}")
        entry.last_written = T0 + 10 + i
        if i % 3 == 0:
            entry.set_value("", ValueType.SZ, text(f"default {i}"))
    tree = root.add_subkey("Tree")
    tree.security, tree.last_written = SD_B, T0 + 2
    for a in range(30):
        branch = tree.add_subkey(f"Branch{a:02d}")
        branch.last_written = T0 + 3000 + a
        for b in range(100):
            leaf = branch.add_subkey(f"Leaf{b:03d}")
            leaf.last_written = T0 + 10_000 + a * 100 + b
            leaf.set_value("Index", ValueType.DWORD, (a * 100 + b).to_bytes(4, "little"))
            if b % 10 == 0:
                leaf.security = SD_A  # back to the first descriptor inside the second one's subtree
    values = root.add_subkey("Values")
    values.class_name, values.last_written = "ValuesClass", T0 + 4
    for name, (kind, data) in EVERY_TYPE.items():
        values.set_value(name, kind, data)
    values.set_value("", ValueType.SZ, text("the default value"))
    zurich = root.add_subkey("Zürich")
    zurich.class_name, zurich.last_written = "Klasse-ß", T0 + 5
    japanese = zurich.add_subkey("日本語")
    japanese.class_name, japanese.last_written = "クラス", T0 + 6
    japanese.set_value("Größe", ValueType.SZ, text("groß"))
    japanese.set_value("名前", ValueType.SZ, text("値"))
    japanese.set_value("", ValueType.DWORD, (7).to_bytes(4, "little"))
    order = root.add_subkey("Order")  # Windows sorts by upper-case name: "_" (0x5F) comes after "Z"
    for name in ("b", "A", "_x", "Z", "a1"):
        order.add_subkey(name).last_written = T0 + 7
    lsa = hive.ensure("Control\\Lsa")
    for name, klass in zip(LSA_BOOT_KEY, ("9e3626b3", "5c0d8e47", "a4b0a8b1", "c8f3e3a2"), strict=True):
        lsa.add_subkey(name).class_name = klass
    return hive


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> tuple[Hive, Path]:
    hive = synthetic_hive()
    path = tmp_path_factory.mktemp("synthetic") / "SYNTHETIC"
    write_hive(hive, path)
    return hive, path


# === 1. speed =========================================================================================


def test_reads_and_writes_the_big_real_system_hive_in_seconds(hive_dir: Path) -> None:
    data = (hive_dir / "SYSTEM_WIN_10_1709").read_bytes()
    assert len(data) > 15_000_000
    started = time.perf_counter()
    hive = parse_hive(data, allow_dirty=True)
    read_seconds = time.perf_counter() - started
    started = time.perf_counter()
    written = serialize_hive(hive)
    write_seconds = time.perf_counter() - started
    assert count(hive) == (43_211, 90_307)  # hivexml counts the same
    assert len(written) > 14_000_000
    # about 0.4 s each on the 2-core development machine; a few seconds leaves room for slow CI runners
    assert read_seconds < 5, f"reading took {read_seconds:.2f} s"
    assert write_seconds < 5, f"writing took {write_seconds:.2f} s"


# === 2. round trip of real hives ======================================================================


@pytest.mark.parametrize("name", REAL)
def test_real_hive_round_trips_exactly(name: str, round_trip: Callable[[str], RoundTrip]) -> None:
    trip = round_trip(name)
    compared = assert_same_tree(trip.original.root, trip.reread.root)
    assert compared == count(trip.original)[1]
    assert (trip.reread.file_name, trip.reread.major_version, trip.reread.minor_version) == (
        trip.original.file_name, trip.original.major_version, trip.original.minor_version)


def test_real_hives_hold_what_the_round_trip_must_carry(round_trip: Callable[[str], RoundTrip]) -> None:
    """The hives really contain big-data values, default values, class names and many descriptors, so the
    round-trip tests above cover them."""
    system = round_trip("SYSTEM_WIN_10_1709").original
    keys = [k for _, k in system.root.walk()]
    big = [v for k in keys for v in k.values.values() if len(v.data) > 16_344]
    assert len(big) == 4 and max(len(v.data) for v in big) == 269_986
    assert sum(1 for k in keys for v in k.values.values() if v.name == "") > 10_000
    assert sum(1 for k in keys if k.class_name) > 0
    assert len({k.security for k in keys}) == 311
    assert round_trip("NTUSER.DAT").original.minor_version == 3  # version 1.3: big values in one cell
    assert max(len(v.data) for _, k in round_trip("NTUSER.DAT").original.root.walk() for v in k.values.values()) \
        == 73_315


@pytest.mark.parametrize("name", ["SYSTEM_WIN_10_1709", "SYSTEM"])
def test_sam_boot_key_class_names_survive(name: str, round_trip: Callable[[str], RoundTrip]) -> None:
    trip = round_trip(name)
    for part in LSA_BOOT_KEY:
        before = trip.original.find(f"ControlSet001\\Control\\Lsa\\{part}")
        after = trip.reread.find(f"ControlSet001\\Control\\Lsa\\{part}")
        assert before is not None and after is not None
        assert before.class_name and re.fullmatch(r"[0-9a-f]{8}", before.class_name), before.class_name
        assert after.class_name == before.class_name
    # and regipy reads the same class names from our file
    regipy_hive = RegistryHive(str(trip.written))
    for part in LSA_BOOT_KEY:
        key = trip.original.find(f"ControlSet001\\Control\\Lsa\\{part}")
        assert key is not None
        assert regipy_hive.get_key(f"\\ControlSet001\\Control\\Lsa\\{part}").get_class_name() == key.class_name


def test_windows_and_our_writer_agree_on_subkey_order_and_hashes(
        hive_dir: Path, round_trip: Callable[[str], RoundTrip]) -> None:
    """Every subkey list Windows wrote in the real SYSTEM hive has the same order and lh hashes in ours."""
    original = walk_cells((hive_dir / "SYSTEM").read_bytes())
    ours = walk_cells(round_trip("SYSTEM").written.read_bytes())
    lists = 0
    for path, key in original.keys.items():
        if key.entries:
            assert ours.keys[path].entries == key.entries, path
            lists += 1
    assert lists > 10_000


@pytest.mark.parametrize("name", REAL)
def test_hivexml_sees_the_same_tree_in_our_rewrite(name: str, hive_dir: Path,
                                                   round_trip: Callable[[str], RoundTrip]) -> None:
    """hivexml (libhivex) dumps our file exactly as it dumps the original: every key with its timestamp,
    every value with its type and data, in the same order."""
    before = hivexml_entries(hive_dir / name)
    after = hivexml_entries(round_trip(name).written)
    assert_same_entries(before, after)
    keys, values = count(round_trip(name).original)
    assert Counter(e[0] for e in after) == {"key": keys, "value": values}


@pytest.mark.parametrize("name", ["NTUSER.DAT", "SAM", "BCD"])
def test_regipy_sees_the_same_tree_in_our_rewrite(name: str, hive_dir: Path,
                                                  round_trip: Callable[[str], RoundTrip]) -> None:
    """regipy's full walk of our file equals its walk of the original (the big SYSTEM hives take regipy
    minutes, so they are checked through hivexml and the targeted regipy checks instead)."""
    before = list(regipy_walk(hive_dir / name))
    after = list(regipy_walk(round_trip(name).written))
    assert len(after) == count(round_trip(name).original)[0]
    assert sorted(after, key=str) == sorted(before, key=str)


def test_regipy_reads_the_same_security_descriptors_from_our_system_hive(
        hive_dir: Path, round_trip: Callable[[str], RoundTrip]) -> None:
    original = RegistryHive(str(hive_dir / "SYSTEM"))
    ours = RegistryHive(str(round_trip("SYSTEM").written))
    paths = ["\\ControlSet001\\Control\\Lsa", "\\ControlSet001\\Services", "\\Select", "\\ControlSet001\\Enum"]
    for path in paths:
        assert ours.get_key(path).get_security_key_info() == original.get_key(path).get_security_key_info()


def test_real_system_rewrite_has_valid_allocation(round_trip: Callable[[str], RoundTrip]) -> None:
    trip = round_trip("SYSTEM")
    layout = assert_valid_layout(trip.written.read_bytes())
    assert len(layout.keys) == count(trip.original)[0]
    assert len(layout.security_refs) == len({k.security for _, k in trip.original.root.walk()})


# === 3. the synthetic hive, checked by other readers ==================================================


def test_synthetic_hive_round_trips(synthetic: tuple[Hive, Path]) -> None:
    hive, path = synthetic
    reread = read_hive(path)
    keys, values = count(hive)
    assert keys > 5_000
    assert assert_same_tree(hive.root, reread.root) == values
    assert (reread.file_name, reread.major_version, reread.minor_version) == ("\\REGISTRY\\MACHINE\\SYNTHETIC", 1, 5)


def test_synthetic_hive_layout(synthetic: tuple[Hive, Path]) -> None:
    hive, path = synthetic
    layout = assert_valid_layout(path.read_bytes())
    assert layout.header["version"] == "1.5"
    assert layout.header["file_name"] == hive.file_name
    assert layout.header["stamp"] == max(k.last_written for _, k in hive.root.walk())
    # a key with more subkeys than one leaf holds: an ri of lh leaves of at most 507 entries, as Windows does
    big = layout.keys["Big"]
    assert big.list_kind == "ri"
    assert {kind for kind, _ in big.leaves} == {"lh"}
    assert max(n for _, n in big.leaves) <= 507
    assert sum(n for _, n in big.leaves) == BIG_KEY_SUBKEYS > 1024
    assert [name for name, _ in big.entries] == [f"Entry{i:05d}" for i in range(BIG_KEY_SUBKEYS)]
    assert all(field == lh_hash(name) for name, field in big.entries)
    assert [name for name, _ in layout.keys["Order"].entries] == ["A", "a1", "b", "Z", "_x"]
    # big data: above 16,344 bytes the value is split into 16,344-byte segments
    storage = layout.keys["Values"].value_storage
    assert storage["Binary16344"] == ("cell", 1)
    assert storage["Binary16345"] == ("db", 2)
    assert storage["Binary100000"] == ("db", 7)
    assert storage["Inline4"] == ("inline", 0) and storage["Five"] == ("cell", 1)
    # exactly the two descriptors, each in one sk cell shared by all its keys
    assert len(layout.security_refs) == 2
    assert sorted(layout.security_refs.values()) == sorted(
        Counter(sd for sd in effective_security(hive.root)).values())


def effective_security(root: RegistryKey) -> Iterator[bytes]:
    stack = [(root, root.security)]
    while stack:
        key, inherited = stack.pop()
        sd = key.security if key.security is not None else inherited
        assert sd is not None
        yield sd
        stack.extend((child, sd) for child in key.subkeys.values())


def test_hivexml_reads_the_synthetic_hive_as_built(synthetic: tuple[Hive, Path]) -> None:
    hive, path = synthetic
    assert_same_entries(hivexml_expected(hive), decode_base64_entries(hivexml_entries(path)))


def test_hivexsh_reads_non_ascii_keys_and_big_values(synthetic: tuple[Hive, Path], tmp_path: Path) -> None:
    hive, path = synthetic
    assert hivexsh(path, tmp_path, "cd \\Zürich\nls") == ["日本語"]
    seen = lsval(hivexsh(path, tmp_path, "cd \\Zürich\\日本語\nlsval"))
    japanese = hive.find("Zürich\\日本語")
    assert japanese is not None
    assert seen == {value.name: (value.type, value.data) for value in japanese.values.values()}
    seen = lsval(hivexsh(path, tmp_path, "cd \\Values\nlsval"))
    values = hive.find("Values")
    assert values is not None
    for name in ("", "Binary", "Binary16344", "Binary16345", "Binary100000", "Inline0", "Inline1", "Inline3",
                 "DeviceProperty", "ResourceList", "Qword", "String", "Expand", "Dword"):
        value = values.values[name.casefold()]
        assert seen[name] == (value.type, value.data), name


def hivexsh(path: Path, tmp_path: Path, commands: str) -> list[str]:
    script = tmp_path / "script"
    script.write_text(commands + "\n", encoding="utf-8")
    done = subprocess.run([_tool("hivexsh"), "-f", str(script), str(path)], capture_output=True, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done.stdout.decode("utf-8").splitlines()


def lsval(lines: list[str]) -> dict[str, tuple[int, bytes]]:
    """hivexsh's ``lsval`` lines back to (type, data) by value name."""
    seen: dict[str, tuple[int, bytes]] = {}
    for line in lines:
        match = re.fullmatch(r'"(.*?)"=(.*)', line)
        assert match, line
        name, shown = ("" if match[1] == "@" else match[1]), match[2]
        if m := re.fullmatch(r"hex\((\d+)\):(.*)", shown):
            seen[name] = (int(m[1]), bytes.fromhex(m[2].replace(",", "")))
        elif m := re.fullmatch(r"dword:([0-9a-f]{8})", shown):
            seen[name] = (ValueType.DWORD, int(m[1], 16).to_bytes(4, "little"))
        elif m := re.fullmatch(r'(?:str\((\d+)\):)?"(.*)"', shown):
            seen[name] = (int(m[1] or 1), text(m[2].replace("\\\\", "\\")))
        else:
            pytest.fail(f"unexpected hivexsh line {line!r}")
    return seen


def test_regipy_reads_the_synthetic_hive(synthetic: tuple[Hive, Path]) -> None:
    """regipy walks every key and value. What it decodes reliably is compared: names stored as UTF-16 or
    plain ASCII (regipy decodes Latin-1 "compressed" names such as "Zürich" or "Größe" as UTF-8 and gets
    U+FFFD), and data of the types it decodes faithfully (it returns "" for REG_DWORD_BIG_ENDIAN, reads
    REG_FULL_RESOURCE_DESCRIPTOR as text and masks type numbers above 0xFFFF)."""
    hive, path = synthetic
    walked = list(regipy_walk(path))
    keys, values = count(hive)
    assert len(walked) == keys
    assert sum(len(v) for _, _, v in walked) == values
    assert "日本語" in {name for _, name, _ in walked}
    compared = 0
    for key_path, _, found in walked:
        if "\ufffd" in key_path:
            continue
        key = hive.find(key_path)
        assert key is not None, key_path
        for name, kind, data in found:
            if "\ufffd" in name:
                continue
            value = key.values["" if name == "(default)" else name.casefold()]
            if value.type <= ValueType.QWORD:
                assert kind == f"REG_{ValueType(value.type).name}", (key_path, name)
            expected = regipy_data(value)
            if expected is not None:
                assert data == expected, (key_path, name)
                compared += 1
    assert compared > values - 20


def regipy_data(value: RegistryValue) -> object:
    """What regipy returns for ``value`` (``None``: a type regipy does not decode faithfully)."""
    kind, data = value.type, value.data
    if kind in (ValueType.SZ, ValueType.EXPAND_SZ):
        return data.decode("utf-16-le").rstrip("\0")
    if kind == ValueType.MULTI_SZ:
        return [s for s in data.decode("utf-16-le").split("\0") if s]
    if kind in (ValueType.DWORD, ValueType.QWORD):
        return int.from_bytes(data, "little")
    if kind in (ValueType.BINARY, ValueType.NONE):
        return data if len(data) > 16_344 else data.hex()[:256]  # regipy trims what is not big data
    return None


def test_regipy_reads_class_names_and_both_descriptors(synthetic: tuple[Hive, Path]) -> None:
    _, path = synthetic
    regipy_hive = RegistryHive(str(path))
    assert regipy_hive.get_key("\\Values").get_class_name() == "ValuesClass"
    assert regipy_hive.get_key("\\Control\\Lsa\\Skew1").get_class_name() == "5c0d8e47"
    assert regipy_hive.get_key("\\Big\\Entry00007").get_security_key_info()["owner"] == "S-1-5-32-544"
    assert regipy_hive.get_key("\\Tree\\Branch03\\Leaf007").get_security_key_info()["owner"] == "S-1-5-18"
    assert regipy_hive.get_key("\\Tree\\Branch03\\Leaf010").get_security_key_info()["owner"] == "S-1-5-32-544"


def test_version_1_3_hive_uses_fast_leaves_and_single_cells(tmp_path: Path) -> None:
    hive = synthetic_hive(minor_version=3)
    path = tmp_path / "OLD"
    write_hive(hive, path)
    layout = assert_valid_layout(path.read_bytes())
    assert layout.header["version"] == "1.3"
    assert {kind for kind, _ in layout.keys["Big"].leaves} == {"lf"}
    assert all(hint.to_bytes(4, "little") == name[:4].encode() for name, hint in layout.keys["Big"].entries)
    assert layout.keys["Values"].value_storage["Binary100000"] == ("cell", 1)
    assert_same_tree(hive.root, read_hive(path).root)
    assert_same_entries(hivexml_expected(hive), decode_base64_entries(hivexml_entries(path)))


def test_a_new_hive_gets_version_1_5_and_a_default_descriptor(tmp_path: Path) -> None:
    hive = Hive(RegistryKey("ROOT"))
    hive.ensure("Software\\Vendor").set_value("Name", ValueType.SZ, text("x"))
    write_hive(hive, tmp_path / "NEW")
    data = (tmp_path / "NEW").read_bytes()
    layout = assert_valid_layout(data)
    assert layout.header["version"] == "1.5"
    reread = parse_hive(data)
    assert reread.root.security == default_security_descriptor()
    assert reread.find("Software\\Vendor") is not None
    assert reread.root.flags & 0x0C == 0x0C  # KEY_HIVE_ENTRY | KEY_NO_DELETE on the root
    # the default descriptor is well formed: regipy decodes it
    info = RegistryHive(str(tmp_path / "NEW")).get_key("\\Software\\Vendor").get_security_key_info()
    assert (info["owner"], info["group"]) == ("S-1-5-32-544", "S-1-5-18")
    assert [(ace["sid"], ace["flags"]["CONTAINER_INHERIT_ACE"]) for ace in info["dacl"]] == [
        ("S-1-5-18", True), ("S-1-5-32-544", True), ("S-1-5-32-545", True)]


def test_write_hive_replaces_the_file_atomically(tmp_path: Path) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    path = folder / "HIVE"
    path.write_bytes(b"old content")
    write_hive(synthetic_hive(), path)
    assert [p.name for p in folder.iterdir()] == ["HIVE"]
    assert count(read_hive(path)) == count(synthetic_hive())


def test_writer_refuses_impossible_names() -> None:
    hive = Hive(RegistryKey("ROOT"))
    hive.root.subkeys["a\\b"] = RegistryKey("a\\b")
    with pytest.raises(HiveError, match="cannot be a registry key name"):
        serialize_hive(hive)


# === 4. bad input =====================================================================================


def message(data: bytes, **options: object) -> str:
    with pytest.raises(HiveError) as caught:
        parse_hive(data, name="HIVE", **options)  # type: ignore[arg-type]
    text_ = str(caught.value)
    assert "\n" not in text_
    return text_


def test_refuses_what_is_not_a_hive() -> None:
    assert message(b"MZ\x90\x00" + bytes(5000)) == "HIVE: not a registry hive (no 'regf' signature at the start)"
    assert "not a registry hive" in message(b"")


def test_refuses_a_truncated_hive(hive_dir: Path) -> None:
    data = (hive_dir / "NTUSER.DAT").read_bytes()
    assert message(data[:3000]) == "HIVE: the hive is truncated (3000 bytes, shorter than its 4096-byte header)"
    assert message(data[:400_000]) == (
        "HIVE: the hive is truncated (its header announces 737280 bytes, the file has 400000)")


def test_refuses_a_bad_header_checksum(hive_dir: Path) -> None:
    data = bytearray((hive_dir / "SAM").read_bytes())
    data[0x30] ^= 0x01  # one bit of the file name
    assert message(bytes(data)) == "HIVE: the hive header is damaged (its checksum does not match)"


def test_refuses_the_corrupted_hive(hive_dir: Path) -> None:
    """corrupted_system_hive has a zeroed page where a hive bin should start; hivex refuses it as well."""
    with pytest.raises(HiveError) as caught:
        read_hive(hive_dir / "corrupted_system_hive")
    assert str(caught.value) == (f"{hive_dir / 'corrupted_system_hive'}: the hive is damaged "
                                 "(bad hive bin header at offset 0x19000); refusing to read it")


def test_refuses_corrupted_cells(synthetic: tuple[Hive, Path]) -> None:
    _, path = synthetic
    data = path.read_bytes()
    layout = walk_cells(data)
    broken = bytearray(data)
    offset = layout.keys["Values"].offset
    broken[4096 + offset + 4:4096 + offset + 6] = b"xx"  # the "nk" signature of a key node
    assert message(bytes(broken)) == (
        f"HIVE: the hive is damaged (cell at {offset:#x} is not a key node); refusing to read it")
    broken = bytearray(data)
    struct.pack_into("<i", broken, 4096 + offset, 80)  # the key's cell marked free
    assert message(bytes(broken)) == (
        f"HIVE: the hive is damaged (cell at {offset:#x} is free or has a bad size); refusing to read it")


def test_refuses_a_dirty_hive_without_its_logs(hive_dir: Path, tmp_path: Path) -> None:
    alone = tmp_path / "SYSTEM"
    shutil.copyfile(hive_dir / "SYSTEM_B", alone)
    with pytest.raises(HiveError) as caught:
        read_hive(alone)
    assert str(caught.value) == (
        f"{alone}: the hive was not cleanly closed (sequence numbers 1622 and 1621 differ): its transaction "
        "logs (.LOG1/.LOG2) must be replayed first, and they were not found")
    assert "not cleanly closed" in message((hive_dir / "SYSTEM_WIN_10_1709").read_bytes())
    assert count(read_hive(alone, allow_dirty=True)) == (33_123, 74_957)


def test_replays_the_transaction_logs_beside_a_dirty_hive(hive_dir: Path, tmp_path: Path) -> None:
    replayed = read_hive(hive_dir / "SYSTEM_B")  # picks up SYSTEM_B.LOG1 and SYSTEM_B.LOG2
    stale = parse_hive((hive_dir / "SYSTEM_B").read_bytes(), allow_dirty=True)  # the primary file alone
    assert count(replayed)[0] == count(stale)[0] + 2_472
    newest = max(k.last_written for _, k in replayed.root.walk())
    assert newest > max(k.last_written for _, k in stale.root.walk())
    # regipy's own log replay, given the logs oldest first (it applies its "secondary" log first), must give
    # the same tree. regipy leaves the header checksum stale, so that is recomputed before reading its file.
    restored = tmp_path / "SYSTEM_B.regipy"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)  # regipy leaves the files it reads to the collector
        apply_transaction_logs(str(hive_dir / "SYSTEM_B"), str(hive_dir / "SYSTEM_B.LOG2"),
                               str(hive_dir / "SYSTEM_B.LOG1"), str(restored))
        gc.collect()
    data = bytearray(restored.read_bytes())
    checksum = 0
    for (word,) in struct.iter_unpack("<I", data[:508]):
        checksum ^= word
    struct.pack_into("<I", data, 508, checksum)
    assert_same_tree(parse_hive(bytes(data), allow_dirty=True).root, replayed.root)
    # and the replayed hive writes out as a clean one that hivexml reads in full
    write_hive(replayed, tmp_path / "SYSTEM")
    assert Counter(e[0] for e in hivexml_entries(tmp_path / "SYSTEM")) == dict(
        zip(("key", "value"), count(replayed), strict=True))


def test_log_replay_stops_at_a_damaged_entry(hive_dir: Path) -> None:
    primary = (hive_dir / "SYSTEM_B").read_bytes()
    log1, log2 = (hive_dir / "SYSTEM_B.LOG1").read_bytes(), (hive_dir / "SYSTEM_B.LOG2").read_bytes()
    damaged = bytearray(log2)
    damaged[512 + 40 + 100] ^= 0xFF  # inside the first entry of LOG2: its hash no longer matches
    only_log1 = parse_hive(primary, logs=[log1, bytes(damaged)])
    assert count(only_log1) == count(parse_hive(primary, logs=[log1]))
    assert count(only_log1) != count(parse_hive(primary, logs=[log1, log2]))


def test_refuses_old_format_logs_and_logs_given_as_hives(hive_dir: Path) -> None:
    log = bytearray((hive_dir / "SYSTEM_B.LOG1").read_bytes())
    assert message(bytes(log)) == "HIVE: this is a transaction log (file type 6), not a primary hive file"
    struct.pack_into("<I", log, 28, 1)  # the file type of a pre-Windows 8.1 log
    checksum = 0
    for (word,) in struct.iter_unpack("<I", log[:508]):
        checksum ^= word
    struct.pack_into("<I", log, 508, checksum)
    assert "old (pre-Windows 8.1) format" in message((hive_dir / "SYSTEM_B").read_bytes(), logs=[bytes(log)])
