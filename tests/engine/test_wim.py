"""The libwim binding against the real wimlib and real NTFS volume images.

Layers are small NTFS volume images made with ``mkntfs``, filled through wimlib (a folder captured and
applied onto the volume) and ``ntfscp`` (alternate data streams); no mount is needed, so the tests run
without root. Results are checked with tools that are not ours: ``ntfsls``, ``ntfscat``, ``ntfsinfo``
and ``ntfsfix -n`` from ntfs-3g, and ``wimlib-imagex``. Expected trees are computed here, independently
of the engine.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from app import procs
from app.engine import wim
from app.engine.wim import AddCommand, DeleteCommand, Wim, WimError, make_ntfs_volume
from app.errors import EnvironmentProblem
from app.tasks.base import CancelToken, TaskCanceled
from tests.support.tools import run_ok, tool

MiB = 1024 * 1024
ZONE = b"[ZoneTransfer]\r\nZoneId=3\r\n"

# --- independent tools ------------------------------------------------------------------------------


def ntfs_tree(volume: Path) -> set[str]:
    """Every file and directory on the volume per ``ntfsls -R -F`` (directories end in "/")."""
    found: set[str] = set()
    current = None
    for line in run_ok("ntfsls", "-R", "-F", volume).stdout.splitlines():
        if not line:
            continue
        if line.startswith("/") and line.endswith(":"):
            current = line[:-1].rstrip("/")
            continue
        assert current is not None, line
        if line in {"./", "../"}:
            continue
        found.add(f"{current}/{line}")
    return found


def ntfs_cat(volume: Path, path: str, stream: str | None = None) -> bytes:
    """A file's unnamed (or named) data stream per ``ntfscat``. procs.run decodes output as text, so this
    one tool runs through subprocess to get the bytes."""
    argv = [tool("ntfscat"), *(["-n", stream] if stream else []), str(volume), path]
    done = subprocess.run(argv, capture_output=True, check=False, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def ntfs_info(volume: Path, path: str) -> str:
    return run_ok("ntfsinfo", "-F", path, volume).stdout


def ntfs_named_streams(volume: Path, path: str) -> set[str]:
    """Names of the named $DATA attributes of ``path``, read from ``ntfsinfo``'s attribute dump."""
    names, in_data = set(), False
    for line in ntfs_info(volume, path).splitlines():
        if line.startswith("Dumping attribute"):
            in_data = "$DATA" in line
        elif in_data and (m := re.match(r"\s*Attribute name:\s*'(.*)'", line)):
            names.add(m.group(1))
    return names


def ntfs_attributes(volume: Path, path: str) -> int:
    """The file attributes of $STANDARD_INFORMATION per ``ntfsinfo``."""
    info = ntfs_info(volume, path)
    block = info.split("Dumping attribute $STANDARD_INFORMATION", 1)[1].split("Dumping attribute", 1)[0]
    m = re.search(r"File attributes:.*\((0x[0-9a-fA-F]+)\)", block)
    assert m, block
    return int(m.group(1), 16)


def ntfs_is_consistent(volume: Path) -> None:
    out = run_ok("ntfsfix", "-n", volume).stdout
    assert "processed successfully" in out, out


def wimlib_imagex_dir(wim_file: Path, image: int) -> set[str]:
    return {line for line in run_ok("wimlib-imagex", "dir", wim_file, str(image)).stdout.splitlines() if line}


# --- layers -----------------------------------------------------------------------------------------


@dataclass
class Layer:
    """A layer as the test describes it: files (path → bytes), named streams, whiteouts."""

    name: str
    files: Mapping[str, bytes]
    streams: Mapping[str, Mapping[str, bytes]] = field(default_factory=dict)
    whiteouts: Sequence[str] = ()


def build_volume(tmp: Path, layer: Layer, size: int = 16 * MiB) -> Path:
    """An NTFS volume image holding ``layer``: the tree through wimlib, the streams through ntfscp."""
    source = tmp / f"{layer.name}-files"
    for rel, data in layer.files.items():
        target = source / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    volume = make_ntfs_volume(tmp / f"{layer.name}.ntfs", size, label=layer.name[:32])
    with Wim.create("none") as w:
        w.extract_image_to_ntfs_volume(w.add_image_from_folder(source, layer.name), volume)
    for rel, named in layer.streams.items():
        for stream, data in named.items():
            blob = tmp / f"{layer.name}-stream.bin"
            blob.write_bytes(data)
            run_ok("ntfscp", "-N", stream, volume, blob, "/" + rel)
    return volume


def expected_overlay(layers: Sequence[Layer]) -> dict[str, bytes | None]:
    """The merged tree (display path → content, None for a directory), computed without the engine.

    Paths compare case-insensitively; a directory keeps the name of the lowest layer that made it, a file
    takes the name and content of the highest layer that provides it; whiteouts remove the path and all
    below it before the layer's own files go in.
    """
    tree: dict[str, tuple[str, bytes | None]] = {}  # casefolded path → (display path, content)
    for layer in layers:
        for gone in layer.whiteouts:
            key = gone.strip("/").casefold()
            for existing in [k for k in tree if k == key or k.startswith(key + "/")]:
                del tree[existing]
        for rel, data in layer.files.items():
            parts = rel.split("/")
            display = ""
            for depth in range(1, len(parts)):
                key = "/".join(parts[:depth]).casefold()
                if key not in tree:
                    tree[key] = (f"{display}/{parts[depth - 1]}", None)
                display = tree[key][0]
            tree[rel.casefold()] = (f"{display}/{parts[-1]}", data)
    return dict(tree.values())


def merge(os_volume: Path, app_layers: Sequence[tuple[Layer, Path]], compression: wim.Compression = "none") -> Wim:
    """OS layer image, then one update call per app layer: its whiteouts, then its volume at "/"."""
    w = Wim.create(compression)
    image = w.add_image_from_ntfs_volume(os_volume, "merged")
    for layer, volume in app_layers:
        w.update_image(image, [*(DeleteCommand(p) for p in layer.whiteouts), AddCommand(volume)])
    return w


OS = Layer(
    "os",
    {
        "Windows/System32/kernel32.dll": b"os kernel32" * 100,
        "Windows/System32/drivers/etc/hosts": b"127.0.0.1 localhost\n",
        "Windows/obsolete.txt": b"os obsolete",
        "Windows/Temp/old/a.log": b"old a",
        "Windows/Temp/old/deeper/b.log": b"old b",
        "Windows/Temp/keep.log": b"keep",
        "Program Files/Common Files/shared.dll": b"os shared",
        "Program Files/Vendor/readme.txt": b"os readme",
        "Users/Public/desktop.ini": b"[.ShellClassInfo]",
    },
    streams={"Program Files/Vendor/readme.txt": {"Zone.Identifier": ZONE}},
)
APP_A = Layer(
    "appA",
    {
        "Program Files/AppA/app.exe": b"MZ app A" + os.urandom(300_000),
        "Program Files/AppA/data/config.ini": b"[a]\nx=1\n",
        "Program Files/Common Files/shared.dll": b"A shared",
    },
    streams={"Program Files/AppA/app.exe": {"Zone.Identifier": ZONE, "Extra": b"second stream"}},
    whiteouts=["/WINDOWS/obsolete.TXT"],  # whiteouts match case-insensitively too
)
APP_B = Layer(
    "appB",
    {
        "program files/common files/shared.dll": b"B shared wins",
        "program files/app/x.dll": b"B x",
        "program files/Vendor/README.TXT": b"B readme, no stream",
        "Windows/System32/bapp.dll": b"B sys",
    },
    whiteouts=["/Windows/Temp/old"],
)


@pytest.fixture(scope="module")
def layers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("layers")
    return {layer.name: build_volume(tmp, layer) for layer in (OS, APP_A, APP_B)}


# --- 1 and 2: layers, overlay semantics ----------------------------------------------------------------


def test_layer_volumes_hold_what_was_put_in(layers: dict[str, Path]) -> None:
    for layer in (OS, APP_A, APP_B):
        volume = layers[layer.name]
        ntfs_is_consistent(volume)
        assert {p for p in ntfs_tree(volume) if not p.endswith("/")} == {"/" + rel for rel in layer.files}
        for rel, data in layer.files.items():
            assert ntfs_cat(volume, "/" + rel) == data
        for rel, named in layer.streams.items():
            assert ntfs_named_streams(volume, "/" + rel) == set(named)
            for stream, data in named.items():
                assert ntfs_cat(volume, "/" + rel, stream) == data


def test_os_plus_two_app_layers_apply_to_exactly_the_expected_tree(layers: dict[str, Path], tmp_path: Path) -> None:
    expected = expected_overlay([OS, APP_A, APP_B])
    assert "/Program Files/app/x.dll" in expected and "/program files" not in expected  # the model's own sanity
    out = make_ntfs_volume(tmp_path / "published.ntfs", 32 * MiB, label="Published")
    with merge(layers["os"], [(APP_A, layers["appA"]), (APP_B, layers["appB"])]) as w:
        w.extract_image_to_ntfs_volume(1, out)

    ntfs_is_consistent(out)
    found = ntfs_tree(out)
    assert found == {path + "/" if data is None else path for path, data in expected.items()}
    for path, data in expected.items():
        if data is not None:
            assert ntfs_cat(out, path) == data, path
    # one Program Files, B's lower-case folder merged into it; the whiteouts took effect
    assert {p.split("/")[1] for p in found} == {"Program Files", "Users", "Windows"}
    assert "/Windows/obsolete.txt" not in found and not any(p.startswith("/Windows/Temp/old") for p in found)
    assert ntfs_cat(out, "/Program Files/Common Files/shared.dll") == b"B shared wins"
    # a file from a higher layer replaces the lower one whole: name, data and streams
    assert "/Program Files/Vendor/README.TXT" in found and "/Program Files/Vendor/readme.txt" not in found
    assert ntfs_named_streams(out, "/Program Files/Vendor/README.TXT") == set()
    # streams of a layer's own files arrive intact
    assert ntfs_named_streams(out, "/Program Files/AppA/app.exe") == {"Zone.Identifier", "Extra"}
    assert ntfs_cat(out, "/Program Files/AppA/app.exe", "Zone.Identifier") == ZONE
    assert ntfs_cat(out, "/Program Files/AppA/app.exe", "Extra") == b"second stream"


def test_written_merge_reads_back_with_wimlib_imagex(layers: dict[str, Path], tmp_path: Path) -> None:
    expected = expected_overlay([OS, APP_A, APP_B])
    target = tmp_path / "out" / "merged.wim"
    target.parent.mkdir()
    with merge(layers["os"], [(APP_A, layers["appA"]), (APP_B, layers["appB"])], "xpress") as w:
        w.write(target)
    assert [p.name for p in target.parent.iterdir()] == ["merged.wim"]  # no temporary file left behind
    info = run_ok("wimlib-imagex", "info", target).stdout
    assert re.search(r"^Image Count:\s+1$", info, re.M) and re.search(r"^Compression:\s+XPRESS$", info, re.M)
    assert re.search(r"^Name:\s+merged$", info, re.M)
    assert wimlib_imagex_dir(target, 1) == {"/", *expected}
    with Wim.open(target) as reopened:
        assert reopened.image_count == 1 and reopened.image_name(1) == "merged"
        out = make_ntfs_volume(tmp_path / "from-file.ntfs", 32 * MiB)
        reopened.extract_image_to_ntfs_volume(1, out)
    assert ntfs_cat(out, "/Program Files/AppA/app.exe", "Zone.Identifier") == ZONE
    assert ntfs_cat(out, "/Program Files/Common Files/shared.dll") == b"B shared wins"


def test_images_add_overwrite_and_compressions(tmp_path: Path) -> None:
    folder = tmp_path / "folder"
    (folder / "a" / "b").mkdir(parents=True)
    (folder / "a" / "b" / "f.txt").write_bytes(b"x" * 5000)
    for compression, shown in (("none", "None"), ("xpress", "XPRESS"), ("lzx", "LZX")):
        target = tmp_path / f"{compression}.wim"
        with Wim.create(compression) as w:  # type: ignore[arg-type]
            assert w.image_count == 0
            assert w.add_image_from_folder(folder, "first") == 1
            w.write(target)
        assert re.search(rf"^Compression:\s+{shown}$", run_ok("wimlib-imagex", "info", target).stdout, re.M)
    with Wim.open(tmp_path / "xpress.wim") as w:
        assert w.add_image_from_folder(folder, "second") == 2
        w.overwrite()
    with Wim.open(tmp_path / "xpress.wim") as w:
        assert [w.image_name(i) for i in (1, 2)] == ["first", "second"]
    assert "second" in run_ok("wimlib-imagex", "info", tmp_path / "xpress.wim").stdout
    with pytest.raises(WimError, match="Unknown WIM compression"):
        Wim.create("lzma")  # type: ignore[arg-type]
    with Wim.create() as w, pytest.raises(WimError, match="use write"):
        w.overwrite()


def test_extract_to_folder(layers: dict[str, Path], tmp_path: Path) -> None:
    with merge(layers["os"], [(APP_A, layers["appA"])]) as w:
        w.extract_image_to_folder(1, tmp_path / "out")
        (tmp_path / "busy").mkdir()
        (tmp_path / "busy" / "file").write_bytes(b"")
        with pytest.raises(WimError, match="empty folder"):
            w.extract_image_to_folder(1, tmp_path / "busy")
    expected = {p: d for p, d in expected_overlay([OS, APP_A]).items() if d is not None}
    got = {"/" + p.relative_to(tmp_path / "out").as_posix(): p.read_bytes()
           for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert got == expected


# --- 3: the aliasing bug of wimlib 1.13.6 ---------------------------------------------------------------

TWIN_A = Layer("twinA", {"appA/one.txt": b"A one " * 10, "appA/sub/two.txt": b"A two"})
TWIN_B = Layer("twinB", {"appB/one.txt": b"B one " * 10, "appB/sub/two.txt": b"B two"})


@pytest.fixture(scope="module")
def twins(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two volumes built the same way, so their files get the same MFT record numbers."""
    tmp = tmp_path_factory.mktemp("twins")
    a, b = build_volume(tmp, TWIN_A), build_volume(tmp, TWIN_B)
    inodes = [re.findall(r"^\s*(\d+) (\S+)$", run_ok("ntfsls", "-R", "-i", v).stdout, re.M) for v in (a, b)]
    assert [n for n, _ in inodes[0]] == [n for n, _ in inodes[1]]  # the precondition: numbers collide
    return a, b


def _base_wim(tmp: Path) -> tuple[Wim, int]:
    (tmp / "base").mkdir()
    (tmp / "base" / "os.txt").write_bytes(b"os")
    w = Wim.create("none")
    return w, w.add_image_from_folder(tmp / "base", "base")


def test_one_update_per_layer_keeps_each_file_its_own_content(twins: tuple[Path, Path], tmp_path: Path) -> None:
    w, image = _base_wim(tmp_path)
    with w:
        for volume in twins:
            w.update_image(image, [AddCommand(volume)])
        entries = {e.path: e for e in w.iterate_dir_tree(image)}
        out = make_ntfs_volume(tmp_path / "out.ntfs", 16 * MiB)
        w.extract_image_to_ntfs_volume(image, out)
    assert entries["/appA/one.txt"].inode_id != entries["/appB/one.txt"].inode_id
    for layer in (TWIN_A, TWIN_B):
        for rel, data in layer.files.items():
            assert ntfs_cat(out, "/" + rel) == data


def test_two_ntfs_sources_in_one_update_call_alias_files_so_we_refuse_them(
    twins: tuple[Path, Path], tmp_path: Path
) -> None:
    """wimlib 1.13.6 (and 1.14.x) shares one inode table per update call, keyed on the MFT record number
    with device 0 for every NTFS source: files of the second volume become hard links to the first
    volume's files with the same number and silently carry their content. This pins the bug (should a
    wimlib release fix it, this test fails and says so) and the guard in Wim.update_image."""
    w, image = _base_wim(tmp_path)
    with w:
        with pytest.raises(WimError, match="only one NTFS volume image"):
            w.update_image(image, [AddCommand(twins[0]), AddCommand(twins[1])])
        w._update(image, [AddCommand(twins[0]), AddCommand(twins[1])])  # the raw call, guard bypassed
        entries = {e.path: e for e in w.iterate_dir_tree(image)}
        out = make_ntfs_volume(tmp_path / "out.ntfs", 16 * MiB)
        w.extract_image_to_ntfs_volume(image, out)
    assert entries["/appB/one.txt"].inode_id == entries["/appA/one.txt"].inode_id
    assert entries["/appB/one.txt"].link_count == 2
    assert ntfs_cat(out, "/appB/one.txt") == TWIN_A.files["appA/one.txt"]  # B's file, A's content
    assert ntfs_cat(out, "/appB/sub/two.txt") == TWIN_A.files["appA/sub/two.txt"]


# --- 4: progress and cancellation -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_wim(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    tmp = tmp_path_factory.mktemp("big")
    total = 0
    for n in range(24):
        data = os.urandom(400_000 + n)  # distinct blobs, so wimlib's total is the sum of the sizes
        (tmp / "src" / f"d{n % 3}").mkdir(parents=True, exist_ok=True)
        (tmp / "src" / f"d{n % 3}" / f"f{n}.bin").write_bytes(data)
        total += len(data)
    with Wim.create("xpress") as w:
        w.add_image_from_folder(tmp / "src", "big")
        w.write(tmp / "big.wim")
    return tmp / "big.wim", total


def _assert_increasing(seen: list[tuple[int, int]], total: int) -> None:
    assert len(seen) > 2
    done = [d for d, _ in seen]
    assert done == sorted(done) and done[-1] == total and len(set(done)) > 2
    assert {t for _, t in seen} == {total}


def test_progress_reports_increasing_bytes_for_write_and_extract(big_wim: tuple[Path, int], tmp_path: Path) -> None:
    path, total = big_wim
    with Wim.open(path) as w:
        seen: list[tuple[int, int]] = []
        w.extract_image_to_ntfs_volume(1, make_ntfs_volume(tmp_path / "v.ntfs", 32 * MiB),
                                       progress=lambda d, t: seen.append((d, t)))
        _assert_increasing(seen, total)
        seen.clear()
        w.write(tmp_path / "copy.wim", progress=lambda d, t: seen.append((d, t)), cancel=CancelToken())
        _assert_increasing(seen, total)


def _cancel_after_first_bytes(token: CancelToken, seen: list[int]) -> wim.ProgressFn:
    def progress(done: int, total: int) -> None:
        seen.append(done)
        if done > 0:
            token.cancel()

    return progress


def test_cancel_aborts_extracts_and_writes_and_leaves_no_output(big_wim: tuple[Path, int], tmp_path: Path) -> None:
    path, total = big_wim
    tmp_path = tmp_path / "work"  # the conftest puts a home folder into tmp_path itself
    tmp_path.mkdir()
    with Wim.open(path) as w:
        # to a folder: the folder this call created is removed
        token, seen = CancelToken(), list[int]()
        with pytest.raises(TaskCanceled):
            w.extract_image_to_folder(1, tmp_path / "out", progress=_cancel_after_first_bytes(token, seen),
                                      cancel=token)
        assert 0 < seen[-1] < total and not (tmp_path / "out").exists()
        # to a WIM file: no partial file
        token, seen = CancelToken(), []
        with pytest.raises(TaskCanceled):
            w.write(tmp_path / "copy.wim", progress=_cancel_after_first_bytes(token, seen), cancel=token)
        assert 0 < seen[-1] < total and list(tmp_path.iterdir()) == []
        # to an NTFS volume (the caller's): consistent but partly written, so refused until formatted again
        volume = make_ntfs_volume(tmp_path / "v.ntfs", 32 * MiB)
        token, seen = CancelToken(), []
        with pytest.raises(TaskCanceled):
            w.extract_image_to_ntfs_volume(1, volume, progress=_cancel_after_first_bytes(token, seen), cancel=token)
        assert 0 < seen[-1] < total
        ntfs_is_consistent(volume)
        with pytest.raises(WimError, match="not empty"):
            w.extract_image_to_ntfs_volume(1, volume)
        volume.unlink()
        # a token cancelled before the call: nothing starts
        token = CancelToken()
        token.cancel()
        with pytest.raises(TaskCanceled):
            w.extract_image_to_folder(1, tmp_path / "never", cancel=token)
        assert list(tmp_path.iterdir()) == []


def test_cancel_during_update_scan_leaves_the_image_unchanged(layers: dict[str, Path]) -> None:
    class CancelOnFirstLook:
        looks = 0

        @property
        def cancelled(self) -> bool:
            self.looks += 1
            return self.looks > 1

    with Wim.create("none") as w:
        image = w.add_image_from_ntfs_volume(layers["os"], "os")
        before = [e.path for e in w.iterate_dir_tree(image)]
        token = CancelOnFirstLook()
        with pytest.raises(TaskCanceled):
            w.update_image(image, [DeleteCommand("/Windows"), AddCommand(layers["appA"])], cancel=token)
        assert token.looks > 1
        assert [e.path for e in w.iterate_dir_tree(image)] == before  # wimlib rolls the whole call back


def test_an_exception_in_the_progress_function_surfaces(big_wim: tuple[Path, int], tmp_path: Path) -> None:
    def explode(done: int, total: int) -> None:
        raise ValueError("from the progress function")

    with Wim.open(big_wim[0]) as w, pytest.raises(ValueError, match="from the progress function"):
        w.extract_image_to_folder(1, tmp_path / "out", progress=explode)
    assert not (tmp_path / "out").exists()


# --- 5: bad input -------------------------------------------------------------------------------------


def test_a_file_that_is_not_a_wim(tmp_path: Path) -> None:
    (tmp_path / "notes.wim").write_bytes(b"not a wim at all\n" * 100)
    with pytest.raises(WimError, match="did not begin with the magic characters") as caught:
        Wim.open(tmp_path / "notes.wim")
    assert caught.value.wimlib_code == 43 and "notes.wim" in str(caught.value)


def test_a_truncated_wim(big_wim: tuple[Path, int], tmp_path: Path) -> None:
    data = big_wim[0].read_bytes()
    (tmp_path / "cut.wim").write_bytes(data[: len(data) // 2])
    with pytest.raises(WimError, match="Unexpectedly reached the end of the file"):
        Wim.open(tmp_path / "cut.wim")


def test_a_wim_with_damaged_data_fails_the_extract_and_leaves_no_folder(
    big_wim: tuple[Path, int], tmp_path: Path
) -> None:
    data = bytearray(big_wim[0].read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4096] = bytes(4096)
    (tmp_path / "damaged.wim").write_bytes(data)
    with Wim.open(tmp_path / "damaged.wim") as w, pytest.raises(WimError) as caught:
        w.extract_image_to_folder(1, tmp_path / "out")
    assert caught.value.wimlib_code in {2, 28}  # DECOMPRESSION or INVALID_RESOURCE_HASH
    assert not (tmp_path / "out").exists()


def test_missing_inputs(tmp_path: Path) -> None:
    with pytest.raises(WimError, match="does not exist"):
        Wim.open(tmp_path / "missing.wim")
    with pytest.raises(WimError, match="not a file"):
        Wim.open(tmp_path)
    with Wim.create() as w:
        with pytest.raises(WimError, match="does not exist"):
            w.add_image_from_ntfs_volume(tmp_path / "missing.ntfs", "x")
        with pytest.raises(WimError, match="has no image 1"):
            w.image_name(1)
        image = w.add_image_from_folder(_folder(tmp_path), "x")
        with pytest.raises(WimError, match="does not exist"):
            w.update_image(image, [AddCommand(tmp_path / "missing.ntfs")])
        with pytest.raises(WimError, match="has no image 2"):
            w.extract_image_to_folder(2, tmp_path / "out")
        with pytest.raises(WimError, match="does not exist") as caught:
            w.update_image(image, [DeleteCommand("/no/such/path")])
        assert caught.value.wimlib_code == 49
        w.update_image(image, [DeleteCommand("/no/such/path", missing_ok=True)])
        with pytest.raises(WimError, match="Cannot list") as caught:
            list(w.iterate_dir_tree(image, "/nowhere"))
        with pytest.raises(WimError, match="does not exist; create it"):
            w.extract_image_to_ntfs_volume(image, tmp_path / "missing.ntfs")
    closed = Wim.create()
    closed.close()
    with pytest.raises(WimError, match="closed"):
        _ = closed.image_count


def _folder(tmp: Path) -> Path:
    (tmp / "folder").mkdir(exist_ok=True)
    (tmp / "folder" / "f.txt").write_bytes(b"f")
    return tmp / "folder"


def test_extract_onto_a_volume_that_is_not_empty(layers: dict[str, Path], tmp_path: Path) -> None:
    volume = tmp_path / "used.ntfs"
    shutil.copyfile(layers["appB"], volume)
    with Wim.create() as w:
        image = w.add_image_from_folder(_folder(tmp_path), "x")
        with pytest.raises(WimError, match=r"not empty \(program files, Windows\)"):
            w.extract_image_to_ntfs_volume(image, volume)
    assert ntfs_cat(volume, "/Windows/System32/bapp.dll") == b"B sys"  # untouched


def test_a_volume_too_small_for_the_image_says_so(big_wim: tuple[Path, int], tmp_path: Path) -> None:
    volume = make_ntfs_volume(tmp_path / "small.ntfs", 4 * MiB)
    with Wim.open(big_wim[0]) as w, pytest.raises(WimError, match="No space left on device") as caught:
        w.extract_image_to_ntfs_volume(1, volume)
    assert caught.value.wimlib_code == 46 and "small.ntfs" in str(caught.value)


def test_a_volume_image_that_is_not_ntfs(tmp_path: Path) -> None:
    (tmp_path / "fake.ntfs").write_bytes(b"\0" * (4 * MiB))
    with Wim.create() as w:
        with pytest.raises(WimError, match="NTFS-3G") as caught:
            w.add_image_from_ntfs_volume(tmp_path / "fake.ntfs", "x")
        assert caught.value.wimlib_code == 46
        image = w.add_image_from_folder(_folder(tmp_path), "x")
        with pytest.raises(WimError, match="cannot be opened as an NTFS volume"):
            w.extract_image_to_ntfs_volume(image, tmp_path / "fake.ntfs")


def test_make_ntfs_volume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    volume = make_ntfs_volume(tmp_path / "v.ntfs", 64 * MiB, label="LayerDesk", partition_start_sector=2048)
    assert volume.stat().st_size == 64 * MiB
    assert volume.stat().st_blocks * 512 < 16 * MiB  # sparse
    ntfs_is_consistent(volume)
    assert "LayerDesk" in run_ok("ntfsinfo", "-m", volume).stdout
    assert ntfs_tree(volume) == set()
    with pytest.raises(WimError, match="already exists"):
        make_ntfs_volume(volume, 64 * MiB)
    with pytest.raises(WimError, match="at least 2 MiB"):
        make_ntfs_volume(tmp_path / "tiny.ntfs", 4096)
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    monkeypatch.setattr(procs, "SYSTEM_PROGRAM_DIRS", (str(tmp_path / "empty-sbin"),))
    with pytest.raises(EnvironmentProblem, match=r"'mkntfs' was not found.*ntfs-3g"):
        make_ntfs_volume(tmp_path / "w.ntfs", 64 * MiB)
    assert not (tmp_path / "w.ntfs").exists()


def test_a_missing_library_names_what_to_install() -> None:
    with pytest.raises(EnvironmentProblem, match="libwim15"):
        wim._open_library(["libwim-that-does-not-exist.so.99"])
    assert wim.library_version().startswith("1.1")


# --- 6: listing an image ------------------------------------------------------------------------------


def test_iterate_dir_tree_lists_files_attributes_and_streams(layers: dict[str, Path], tmp_path: Path) -> None:
    with merge(layers["os"], [(APP_A, layers["appA"]), (APP_B, layers["appB"])]) as w:
        entries = list(w.iterate_dir_tree(1))
        under = [e.path for e in w.iterate_dir_tree(1, "/program files/appa")]
    expected = expected_overlay([OS, APP_A, APP_B])
    by_path = {e.path: e for e in entries}
    assert entries[0].path == "/" and set(by_path) == {"/", *expected}
    for path, data in expected.items():
        entry = by_path[path]
        assert entry.is_directory == (data is None), path
        assert entry.size == (0 if data is None else len(data)), path
        assert entry.has_security_descriptor, path  # captured from NTFS volumes: every file keeps its ACL
    app = by_path["/Program Files/AppA/app.exe"]
    assert sorted(app.stream_names) == ["Extra", "Zone.Identifier"]
    assert by_path["/Program Files/Vendor/README.TXT"].stream_names == ()
    assert all(e.reparse_tag == 0 and e.link_count == 1 for e in entries)
    assert under == ["/Program Files/AppA", "/Program Files/AppA/app.exe", "/Program Files/AppA/data",
                     "/Program Files/AppA/data/config.ini"]
    # attributes agree with what ntfsinfo reads from the layer volumes themselves ($STANDARD_INFORMATION
    # holds no DIRECTORY bit, and no bits at all reads as NORMAL, as Windows reports them)
    for volume, path in ((layers["appA"], "/Program Files/AppA/app.exe"), (layers["os"], "/Windows/System32"),
                         (layers["appB"], "/Windows/System32/bapp.dll")):
        entry = by_path[path]
        on_disk = ntfs_attributes(volume, path) | (wim.FILE_ATTRIBUTE_DIRECTORY if entry.is_directory else 0)
        assert entry.attributes == (on_disk or 0x80), path
    assert by_path["/Windows/System32"].attributes == wim.FILE_ATTRIBUTE_DIRECTORY
    # files captured from a plain folder carry no security descriptor
    with Wim.create() as w:
        folder_entries = list(w.iterate_dir_tree(w.add_image_from_folder(_folder(tmp_path), "x")))
    assert [(e.path, e.has_security_descriptor, e.short_name) for e in folder_entries] == [
        ("/", False, None), ("/f.txt", False, None)]


def test_list_paths_gives_the_paths_and_kinds_of_the_whole_image(layers: dict[str, Path]) -> None:
    with merge(layers["os"], [(APP_A, layers["appA"]), (APP_B, layers["appB"])]) as w:
        listed = w.list_paths(1)
        full = [(e.path, e.is_directory) for e in w.iterate_dir_tree(1)]
    expected = expected_overlay([OS, APP_A, APP_B])
    assert listed == full  # same order: parents before children
    assert dict(listed) == {"/": True, **{path: data is None for path, data in expected.items()}}
    with Wim.create() as w, pytest.raises(WimError):
        w.list_paths(1)  # no such image


def test_iterate_callback_errors_surface(layers: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(**kwargs: object) -> Iterator[object]:
        raise RuntimeError("broken entry")

    with Wim.create() as w:
        image = w.add_image_from_ntfs_volume(layers["os"], "os")
        monkeypatch.setattr(wim, "DirEntry", broken)
        with pytest.raises(RuntimeError, match="broken entry"):
            list(w.iterate_dir_tree(image))
