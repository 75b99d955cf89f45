"""Re-publishing from the last composite (app.engine.composite): on a file system that clones blocks, a
publish after one layer changed starts from the last published volume and changes only what differs. Its
volume must hold exactly what a full publish of the same stack holds: checked with ntfs-3g's tools and its
FUSE driver (names, data, streams, ACLs, attributes, short names, reparse data, times, hard links) and sgdisk,
not with the engine's own view.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.engine import compose as compose_module
from app.engine.checksum import BLOCK, ZERO_LEAF, Known
from app.engine.compose import ComposeResult, StackLayer, compose
from app.engine.composite import CompositeStore, plan_changes
from app.engine.importer import scan_folder
from app.engine.layer_cache import LayerDiskCache
from app.engine.registry.delta import RegistryDelta
from app.engine.registry.regfile import parse_reg_file
from app.engine.repository import CaptureSource, LayerRepository, SourceKind
from app.engine.wim import make_ntfs_volume
from app.errors import LayerDeskError
from app.tasks.base import CancelToken, TaskCanceled
from tests.engine.test_compose import _partition_table, store
from tests.engine.test_ntfs_volume import described, mounted
from tests.engine.test_wim import ntfs_cat, ntfs_is_consistent, ntfs_tree
from tests.support.compose_stack import CITRIX, OFFICE, TOOLS, LayerDef, os_layer
from tests.support.image_checksum import image_checksum
from tests.support.repository_checks import listing
from tests.support.tools import loop_filesystem, run_ok

GiB = 1024**3
MiB = 1024**2

#: Tools, version 2: config.ini changes, tool.exe goes, new files (one in a new folder, one in the OS's),
#: another whiteout and other registry changes.
TOOLS_2 = LayerDef("Tools", "app", {
    "PROGRAM FILES/OFFICE/CONFIG.INI": b"tools config, second version",
    "Program Files/Tools/helper.dll": b"helper" * 3000,
    "Program Files/Tools/Plugins/one.dll": b"plugin",
    "Windows/System32/drivers/etc/networks": b"loopback 127\r\n",
}, whiteouts=["Windows/Temp/old.log", "Program Files/Office/winword.exe"], reg=(
    "[HKEY_LOCAL_MACHINE\\SOFTWARE\\Shared]\r\n"
    '"Owner"="Tools 2"\r\n\r\n'
))


@pytest.fixture
def xfs(tmp_path: Path) -> Iterator[Path]:
    with loop_filesystem(tmp_path / "xfs", 1024, "xfs") as root:
        yield root


def new_version(repository: LayerRepository, root: Path, layer: LayerDef, layer_id: int, version_id: int,
                ) -> StackLayer:
    folder = layer.folder(root / str(version_id))
    scan = scan_folder(folder)
    reg = layer.reg_file(root / str(version_id))
    delta = parse_reg_file(reg) if reg is not None else RegistryDelta()
    stored = repository.store_version(layer_id, version_id, CaptureSource(SourceKind.FOLDER, folder),
                                      deletions=scan.deletions, delta=delta, drop=scan.markers)
    return StackLayer(layer.role, layer.name, layer_id, version_id, stored.checksum)


def stacks(root: Path) -> tuple[LayerRepository, list[StackLayer], list[StackLayer]]:
    """The compose test stack, and the same with Tools at version 2."""
    repository = LayerRepository(root / "repository").ensure()
    sources = root / "sources"
    layers = [os_layer(sources), OFFICE, TOOLS, CITRIX]
    first = [store(repository, sources, layer, n) for n, layer in enumerate(layers, 1)]
    second = [*first[:2], new_version(repository, sources, TOOLS_2, 3, 31), first[3]]
    return repository, first, second


def publish(repository: LayerRepository, stack: list[StackLayer], out: Path, name: str,
            cache: LayerDiskCache) -> ComposeResult:
    out.mkdir(exist_ok=True)
    return compose(stack, repository, out, "raw", 1, name=name, cache=cache)


def windows_volume(result: ComposeResult, where: Path) -> Path:
    """The Windows partition of a raw image (per sgdisk), as a volume file."""
    number, first, last, _, _ = next(row for row in _partition_table(result.path) if row[3] == "0700")
    volume = where / f"{result.path.stem}-{number}.ntfs"
    size = (last - first + 1) * 512
    with result.path.open("rb") as image, volume.open("wb") as out:
        image.seek(first * 512)
        for offset in range(0, size, 1 << 20):  # sparse: most of the volume is never written
            chunk = image.read(min(1 << 20, size - offset))
            if chunk.count(0) != len(chunk):
                out.seek(offset)
                out.write(chunk)
        out.truncate(size)
    return volume


def composites(cache: Path) -> dict[str, tuple[str, dict[str, str]]]:
    """What the layer disk cache keeps as composites: each shape's volume (its SHA-256) and signatures, and
    no other volume."""
    root = cache / "composites"
    found = {}
    for listing_file in root.glob("*.json"):
        document = json.loads(listing_file.read_text(encoding="utf-8"))
        volume = (root / document["volume"]).read_bytes()
        found[listing_file.stem] = (hashlib.sha256(volume).hexdigest(), document["signatures"])
    assert sorted(p.name for p in root.glob("*.ntfs")) == sorted(
        json.loads(p.read_text(encoding="utf-8"))["volume"] for p in root.glob("*.json"))
    return found


def assert_same_volumes(first: Path, second: Path, where: Path) -> None:
    ntfs_is_consistent(first)
    ntfs_is_consistent(second)
    assert ntfs_tree(first) == ntfs_tree(second)
    with mounted(first, where / "a") as a, mounted(second, where / "b") as b:
        assert described(a) == described(b)


def test_a_republish_changes_the_last_composite_and_holds_what_a_full_publish_holds(xfs: Path,
                                                                                   tmp_path: Path) -> None:
    repository, first, second = stacks(xfs)
    cache = LayerDiskCache(xfs / "cache", GiB)
    v1 = publish(repository, first, xfs / "out", "v1", cache)
    assert "composite" not in v1.timings
    assert len(list((xfs / "cache" / "composites").glob("*.ntfs"))) == 1
    v2 = publish(repository, second, xfs / "out", "v2", cache)
    assert "composite" in v2.timings  # started from v1's volume
    full = publish(repository, second, xfs / "full", "full", LayerDiskCache(xfs / "other-cache", GiB))
    assert "composite" not in full.timings
    assert v2.manifest_digest == full.manifest_digest and v2.files == full.files
    assert_same_volumes(windows_volume(v2, tmp_path), windows_volume(full, tmp_path), tmp_path)
    volume = windows_volume(v2, tmp_path)
    assert ntfs_cat(volume, "/Program Files/Office/CONFIG.INI") == b"tools config, second version"
    assert "/Program Files/Tools/tool.exe" not in ntfs_tree(volume)
    # and back: version 1 again, from v2's composite, holds what v1 held
    back = publish(repository, first, xfs / "out", "back", cache)
    assert "composite" in back.timings
    assert_same_volumes(windows_volume(back, tmp_path), windows_volume(v1, tmp_path), tmp_path)


def test_hives_go_back_to_the_os_layers_when_no_layer_changes_the_registry_any_more(xfs: Path,
                                                                                    tmp_path: Path) -> None:
    """The composite holds hives merged with Tools' registry changes; Tools' next version has none (and no
    other layer of this stack has any): the OS layer's own hive files come back, as in a full publish."""
    repository, first, _ = stacks(xfs)
    without = LayerDef("Tools", "app", dict(TOOLS.files), whiteouts=list(TOOLS.whiteouts))
    before = [first[0], first[2]]
    after = [first[0], new_version(repository, xfs / "sources", without, 3, 32)]
    cache = LayerDiskCache(xfs / "cache", GiB)
    publish(repository, before, xfs / "out", "v1", cache)
    v2 = publish(repository, after, xfs / "out", "v2", cache)
    assert "composite" in v2.timings
    full = publish(repository, after, xfs / "full", "full", LayerDiskCache(xfs / "other-cache", GiB))
    assert_same_volumes(windows_volume(v2, tmp_path), windows_volume(full, tmp_path), tmp_path)
    assert ntfs_cat(windows_volume(v2, tmp_path), "/Windows/System32/config/SOFTWARE") == (
        xfs / "sources" / "hives" / "SOFTWARE").read_bytes()


def test_a_version_that_only_drops_a_file(xfs: Path, tmp_path: Path) -> None:
    """Nothing to copy in, one file to delete (and the hives it shares with the last composite overwritten)."""
    repository, first, _ = stacks(xfs)
    smaller = LayerDef("Tools", "app", {k: v for k, v in TOOLS.files.items() if not k.endswith("tool.exe")},
                       whiteouts=list(TOOLS.whiteouts), reg=TOOLS.reg)
    cache = LayerDiskCache(xfs / "cache", GiB)
    publish(repository, [first[0], first[2]], xfs / "out", "v1", cache)
    after = [first[0], new_version(repository, xfs / "sources", smaller, 3, 33)]
    v2 = publish(repository, after, xfs / "out", "v2", cache)
    assert "composite" in v2.timings
    full = publish(repository, after, xfs / "full", "full", LayerDiskCache(xfs / "other-cache", GiB))
    assert_same_volumes(windows_volume(v2, tmp_path), windows_volume(full, tmp_path), tmp_path)
    assert "/Program Files/Tools/tool.exe" not in ntfs_tree(windows_volume(v2, tmp_path))


@pytest.mark.parametrize("at", [55, 70])  # applying the changed paths to the scratch volume; copying them
def test_a_cancelled_republish_leaves_nothing_and_keeps_the_composite(xfs: Path, at: int) -> None:
    repository, first, second = stacks(xfs)
    cache = LayerDiskCache(xfs / "cache", GiB)
    publish(repository, first, xfs / "out", "v1", cache)
    kept = composites(xfs / "cache")
    token = CancelToken()

    def progress(percent: float, _message: str) -> None:
        if percent >= at:
            token.cancel()

    (xfs / "cancelled").mkdir()
    with pytest.raises(TaskCanceled):
        compose(second, repository, xfs / "cancelled", "raw", 1, name="v2", cache=cache, progress=progress,
                cancel=token)
    assert list((xfs / "cancelled").iterdir()) == []
    assert composites(xfs / "cache") == kept
    v2 = publish(repository, second, xfs / "out", "v2", cache)
    assert "composite" in v2.timings


def test_another_layer_order_or_disk_size_starts_afresh(xfs: Path) -> None:
    repository, first, _ = stacks(xfs)
    cache = LayerDiskCache(xfs / "cache", GiB)
    publish(repository, first, xfs / "out", "v1", cache)
    reordered = [first[0], first[2], first[1], first[3]]
    swapped = publish(repository, reordered, xfs / "out", "swapped", cache)
    assert "composite" not in swapped.timings
    bigger = compose(first, repository, xfs / "out", "raw", 2, name="bigger", cache=cache)
    assert "composite" not in bigger.timings
    assert len(list((xfs / "cache" / "composites").glob("*.ntfs"))) == 2  # the two most recent shapes


def test_a_damaged_composite_means_a_full_apply(xfs: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                ) -> None:
    repository, first, second = stacks(xfs)
    cache = LayerDiskCache(xfs / "cache", GiB)
    publish(repository, first, xfs / "out", "v1", cache)
    kept = next((xfs / "cache" / "composites").glob("*.ntfs"))
    with kept.open("r+b") as volume:
        volume.write(b"\0" * 4096)  # its boot sector
    stored = listing(repository.root)
    with caplog.at_level(logging.WARNING, logger="app.engine.compose"):
        v2 = publish(repository, second, xfs / "out", "v2", cache)
    assert "re-publishing from the last composite failed" in caplog.text
    assert listing(repository.root) == stored
    assert not kept.exists()  # forgotten; the full apply left a composite of its own
    full = publish(repository, second, xfs / "full", "full", LayerDiskCache(xfs / "other-cache", GiB))
    assert_same_volumes(windows_volume(v2, tmp_path), windows_volume(full, tmp_path), tmp_path)
    again = publish(repository, first, xfs / "out", "again", cache)
    assert "composite" in again.timings


def test_without_block_cloning_nothing_is_kept(tmp_path: Path) -> None:
    with loop_filesystem(tmp_path / "ext4", 600, "ext4") as root:
        repository, first, _ = stacks(root)
        cache = LayerDiskCache(root / "cache", GiB)
        publish(repository, first, root / "out", "v1", cache)
        assert not (root / "cache" / "composites").exists()


def test_plan_changes_replaces_top_most_paths_only() -> None:
    """A replaced folder takes what is below it along, whatever sorts between them ("/a b" sorts between
    "/a" and "/a/c"); folders that stay get their times back."""
    old = {"/": "r", "/a": "1", "/a/c": "2", "/a b": "3", "/keep": "4", "/keep/gone.txt": "5"}
    new = {"/": "r", "/a": "changed", "/a/c": "changed too", "/a b": "3 changed", "/keep": "4", "/keep/new": "6",
           "/keep/new/x": "7"}
    changes = plan_changes(old, new)
    assert changes.replaced == ("/a", "/a b", "/keep/gone.txt", "/keep/new")
    assert changes.removed == ("/a", "/a b", "/keep/gone.txt")
    assert changes.added == ("/a", "/a b", "/keep/new")
    assert changes.parents == ("/", "/keep")
    with pytest.raises(ValueError, match="root directory differs"):
        plan_changes(old, {**new, "/": "other"})


def _fill(root: Path, leave: int) -> Path:
    """A file that takes all of ``root``'s free space but about ``leave`` bytes (another writer filling the
    disk)."""
    filler = root / "filler"
    with filler.open("wb") as file:
        for step in (64 * 1024 * 1024, 1024 * 1024, 65536, 4096):
            with contextlib.suppress(OSError):
                while True:
                    os.posix_fallocate(file.fileno(), os.fstat(file.fileno()).st_size, step)
        os.ftruncate(file.fileno(), max(0, os.fstat(file.fileno()).st_size - leave))
    return filler


@pytest.mark.parametrize("staged", [False, True])
def test_a_disk_that_fills_up_during_a_republish(xfs: Path, staged: bool) -> None:
    """The file system the composite, the layer disk cache and the output share fills up (another writer)
    before a re-publish, before or after the changed layer is in the cache: one clear message, nothing in the
    output folder, the composite and the repository as they were; once there is room again the re-publish
    starts from that composite."""
    repository, first, second = stacks(xfs)
    cache = LayerDiskCache(xfs / "cache", GiB)
    publish(repository, first, xfs / "out", "v1", cache)
    if staged:
        tools = second[2]
        cache.volume(repository, tools.layer_id, tools.version_id, tools.checksum, label=tools.name,
                     scratch=xfs / "scratch")
    kept = composites(xfs / "cache")
    stored = listing(repository.root)
    filler = _fill(xfs, 256 * 1024)
    (xfs / "full").mkdir()
    with pytest.raises(LayerDeskError) as caught:
        compose(second, repository, xfs / "full", "raw", 1, name="v2", cache=cache)
    message = str(caught.value)
    if staged:  # the changed paths' scratch volume, or the clone's changed blocks
        assert message == (f"The disk image does not fit in {xfs / 'full'}: no space is left on its device (No "
                           "space left on device). Free some space there or publish to another folder.")
    else:
        assert message == (f"Layer Tools could not be unpacked into the layer disk cache in {xfs / 'cache'}: no "
                           "space is left on its device. Free some space there and publish again.")
    assert list((xfs / "full").iterdir()) == []
    assert composites(xfs / "cache") == kept
    assert listing(repository.root) == stored
    filler.unlink()
    v2 = publish(repository, second, xfs / "out", "v2", cache)
    assert "composite" in v2.timings


def test_a_version_that_changes_most_of_the_bytes_is_applied_whole(xfs: Path, tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Changing the composite writes each changed byte twice (the scratch volume, the clone): when the new
    Tools version brings most of the image's bytes, every layer is applied instead, and that publish leaves
    the composite the next small change starts from. (Images this small count as large here: the rule
    leaves changes under 256 MiB alone.)"""
    monkeypatch.setattr(compose_module, "_COMPOSITE_SMALL", 1024 * 1024)
    repository, first, second = stacks(xfs)
    cache = LayerDiskCache(xfs / "cache", GiB)
    publish(repository, first, xfs / "out", "v1", cache)
    big = LayerDef("Tools", "app", {**TOOLS_2.files, "Program Files/Tools/data.bin": os.urandom(3 * 1024 * 1024)},
                   whiteouts=TOOLS_2.whiteouts, reg=TOOLS_2.reg)
    heavy = [*first[:2], new_version(repository, xfs / "sources", big, 3, 32), first[3]]
    with caplog.at_level(logging.INFO, logger="app.engine.compose"):
        v2 = publish(repository, heavy, xfs / "out", "v2", cache)
    assert "composite" not in v2.timings
    assert "applying every layer rather than changing the last composite" in caplog.text
    full = publish(repository, heavy, xfs / "full", "full", LayerDiskCache(xfs / "other-cache", GiB))
    assert_same_volumes(windows_volume(v2, tmp_path), windows_volume(full, tmp_path), tmp_path)
    v3 = publish(repository, second, xfs / "out", "v3", cache)  # the big file goes: a small change again
    assert "composite" in v3.timings


def test_a_taken_composite_leaves_its_clone_and_an_adopted_volume_replaces_it(xfs: Path) -> None:
    """Taking moves the kept volume out (the taker changes it) and leaves a clone with the same bytes and
    signatures, so a publish that fails keeps the composite and a concurrent one takes a volume of its
    own; adopting makes a finished volume the composite and keeps the most recent shapes."""
    store = CompositeStore(xfs / "cache" / "composites", keep=2)
    first = xfs / "first.ntfs"
    first.write_bytes(os.urandom(256 * 1024))
    content = first.read_bytes()
    kept = store.adopt("shape-a", first, {"/": "root"})
    assert kept is not None and kept.read_bytes() == content and not first.exists()
    taken = store.take("shape-a", xfs / "taken.ntfs")
    assert taken is not None and taken.volume == xfs / "taken.ntfs" and taken.signatures == {"/": "root"}
    assert kept.read_bytes() == content and kept.stat().st_ino != taken.volume.stat().st_ino  # its clone
    other = store.take("shape-a", xfs / "other.ntfs")  # a concurrent publish: the clone, then its clone
    assert other is not None and other.volume.read_bytes() == content
    with taken.volume.open("r+b") as volume:  # the taker changes its volume: nobody else sees it
        volume.write(b"changed")
    assert other.volume.read_bytes() == content
    assert composites(xfs / "cache") == {"shape-a": (hashlib.sha256(content).hexdigest(), {"/": "root"})}
    found = Known(found={"0:4194304:0": b"d" * 32},
                  found_layouts={"vhdx": {"block": 1, "before": 2, "slots": {"3": 0}}})
    assert store.adopt("shape-a", taken.volume, {"/": "new"}, found) is not None
    assert composites(xfs / "cache")["shape-a"][1] == {"/": "new"}
    again = store.take("shape-a", xfs / "again.ntfs")  # what the image found comes back with the volume
    assert again is not None and again.twin is not None and again.twin.exists()
    assert (again.blocks, again.layouts) == (found.found, found.found_layouts)
    assert again.known_blocks().layouts == found.found_layouts
    again.volume.unlink()
    for shape in ("shape-b", "shape-c"):
        (xfs / shape).write_bytes(b"x" * 4096)
        assert store.adopt(shape, xfs / shape, {}) is not None
    assert sorted(composites(xfs / "cache")) == ["shape-b", "shape-c"]
    assert store.take("shape-a", xfs / "gone.ntfs") is None
    store.discard("shape-b")
    assert sorted(composites(xfs / "cache")) == ["shape-c"]


def test_two_republishes_of_one_shape_at_once_each_get_a_volume_of_their_own(xfs: Path, tmp_path: Path) -> None:
    """Two publishes of the same stack start together: each takes a volume (one the composite, the other
    the clone it left), neither sees the other's changes, both hold what a full publish holds, and the store
    ends with one composite for the shape."""
    repository, first, second = stacks(xfs)
    cache = LayerDiskCache(xfs / "cache", GiB)
    publish(repository, first, xfs / "out", "v1", cache)
    start = threading.Barrier(2)
    results: dict[str, ComposeResult] = {}

    def run(name: str) -> None:
        start.wait()
        results[name] = publish(repository, second, xfs / name, name, cache)

    threads = [threading.Thread(target=run, args=(name,)) for name in ("left", "right")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert sorted(results) == ["left", "right"]
    assert all("composite" in result.timings for result in results.values())
    full = publish(repository, second, xfs / "full", "full", LayerDiskCache(xfs / "other-cache", GiB))
    expected = windows_volume(full, tmp_path)
    for result in results.values():
        assert_same_volumes(windows_volume(result, tmp_path), expected, tmp_path)
    assert len(composites(xfs / "cache")) == 1


def stored_blocks(cache: Path) -> list[tuple[Path, dict[str, str]]]:
    """Each kept composite's volume and the block digests the store keeps for it, by composition."""
    root = cache / "composites"
    found = []
    for listing_file in sorted(root.glob("*.json")):
        document = json.loads(listing_file.read_text(encoding="utf-8"))
        found.append((root / document["volume"], dict(document.get("blocks", {}))))
    return found


def kept_slots(cache: Path, fmt: str) -> dict[str, int]:
    """Where the image of the one kept composite put each of the disk's blocks (block number -> slot)."""
    (listing_file,) = (cache / "composites").glob("*.json")
    return dict(json.loads(listing_file.read_text(encoding="utf-8")).get("layouts", {}).get(fmt, {}).get("slots", {}))


def volume_parts(name: str) -> list[tuple[int, int, int]] | None:
    """``(at, length, volume offset)`` of each part of a block's composition; ``None`` when it holds
    metadata too (named by a digest)."""
    parts = [part.split(":") for part in name.split(",")]
    if any(source.startswith("#") for _, _, source in parts):
        return None
    return [(int(at), int(length), int(source)) for at, length, source in parts]


def assert_blocks_describe_their_volumes(cache: Path) -> int:
    """Every digest the store keeps for a block made of volume bytes is the SHA-256 of those bytes put
    where its composition says (zeros elsewhere); how many were checked."""
    kept = stored_blocks(cache)
    assert kept
    checked = 0
    for volume, blocks in kept:
        assert blocks
        data = volume.read_bytes()
        for name, digest in blocks.items():
            parts = volume_parts(name)
            if parts is None:
                continue
            block = bytearray(BLOCK)
            for at, length, offset in parts:
                block[at:at + length] = data[offset:offset + length]
            assert hashlib.sha256(block).hexdigest() == digest, (volume.name, name)
            checked += 1
    return checked


@pytest.mark.parametrize("fmt", ["raw", "vhdx", "qcow2"])
def test_a_republish_hashes_only_the_blocks_that_changed(xfs: Path, fmt: str) -> None:
    """The image checksum (4 MiB block digests) of a re-publish takes the digests of the volume's blocks
    that still share their disk blocks with the composite it started from; the checksum is still that of
    the whole file (coreutils), and the digests kept for the next publish are those of the new volume."""
    repository = LayerRepository(xfs / "repository").ensure()
    sources = xfs / "sources"
    base = os_layer(sources)
    big = LayerDef(base.name, "os", {**base.files, "Windows/System32/big.dat": os.urandom(32 * 1024 * 1024)})
    first = [store(repository, sources, layer, n) for n, layer in enumerate([big, OFFICE, TOOLS, CITRIX], 1)]
    second = [*first[:2], new_version(repository, sources, TOOLS_2, 3, 31), first[3]]
    cache = LayerDiskCache(xfs / "cache", GiB)
    (xfs / "out").mkdir()
    v1 = compose(first, repository, xfs / "out", fmt, 1, name="v1", cache=cache)
    assert v1.reused_bytes == 0
    assert v1.checksum == image_checksum(v1.path)
    assert assert_blocks_describe_their_volumes(xfs / "cache") >= 8
    first_slots = kept_slots(xfs / "cache", fmt)

    v2 = compose(second, repository, xfs / "out", fmt, 1, name="v2", cache=cache)

    assert "composite" in v2.timings
    assert v2.checksum == image_checksum(v2.path)
    assert v2.checksum != v1.checksum
    # the OS layer's 32 MiB file did not change: its blocks were not read again
    assert v2.reused_bytes >= 6 * BLOCK
    assert v2.reused_bytes < v2.size_bytes
    assert assert_blocks_describe_their_volumes(xfs / "cache") >= 8
    if fmt == "vhdx":  # the blocks the image had before are where they were
        second_slots = kept_slots(xfs / "cache", fmt)
        assert first_slots and all(second_slots[block] == slot for block, slot in first_slots.items())
    back = compose(first, repository, xfs / "out", fmt, 1, name="back", cache=cache)
    assert back.reused_bytes > 0 and back.checksum == image_checksum(back.path)


def test_block_digests_are_taken_only_with_their_twin(xfs: Path) -> None:
    """Without the clone the composite left behind (gone, or another file under its name) nothing proves
    which blocks are unchanged: every block is read; damaged digests in the listing are not used."""
    repository, first, second = stacks(xfs)
    cache = LayerDiskCache(xfs / "cache", GiB)
    publish(repository, first, xfs / "out", "v1", cache)
    store = CompositeStore(xfs / "cache" / "composites")
    (shape_file,) = (xfs / "cache" / "composites").glob("*.json")
    taken = store.take(shape_file.stem, xfs / "taken.ntfs")
    assert taken is not None and taken.twin is not None and taken.blocks
    with taken.volume.open("r+b") as volume:
        volume.seek(BLOCK + 100)
        volume.write(b"changed")
    known = taken.known_blocks()
    named = {name: parts for name in taken.blocks if (parts := volume_parts(name)) is not None}

    def ranges(name: str) -> list[tuple[int, int]]:
        return [(offset, offset + length) for _, length, offset in named[name]]

    changed = next(name for name in named if any(a <= BLOCK + 100 < b for a, b in ranges(name)))
    data = next(name for name in named if name != changed and taken.blocks[name] != ZERO_LEAF)
    hole = next(name for name in named if name != changed and taken.blocks[name] == ZERO_LEAF)
    assert known.take(data, ranges(data)) == taken.blocks[data]
    assert known.take(changed, ranges(changed)) is None  # written since
    taken.twin.unlink()  # the same bytes, but not a clone: proves nothing
    run_ok("cp", "--sparse=always", "--reflink=never", taken.volume, taken.twin)
    assert taken.known_blocks().take(data, ranges(data)) is None
    assert taken.known_blocks().take(hole, ranges(hole)) == ZERO_LEAF  # a hole in both reads as zeros in both
    taken.volume.unlink()

    document = json.loads(shape_file.read_text(encoding="utf-8"))
    document["blocks"] = {"0:4194304:0": "not hex"}
    shape_file.write_text(json.dumps(document), encoding="utf-8")
    v2 = publish(repository, second, xfs / "out", "v2", cache)
    assert "composite" in v2.timings and v2.reused_bytes == 0
    assert v2.checksum == image_checksum(v2.path)


def test_scratch_volumes_are_formatted_once_per_size_and_cloned(xfs: Path) -> None:
    """A re-publish applies the changed paths to an empty scratch volume: the store formats one per size
    once (mkntfs) and clones it afterwards; the kept one never changes, and only a few sizes are kept."""
    store = CompositeStore(xfs / "cache" / "composites")
    made: list[int] = []

    def make(path: Path, size: int) -> None:
        made.append(size)
        make_ntfs_volume(path, size, label="Changes")

    store.blank_volume(64 * MiB, xfs / "a.ntfs", make)
    (template,) = (xfs / "cache" / "composites" / "blank").glob("*.ntfs")
    before = hashlib.sha256(template.read_bytes()).hexdigest()
    with (xfs / "a.ntfs").open("r+b") as changed:
        changed.seek(40 * MiB)
        changed.write(b"the clone is the publish's to change")
    store.blank_volume(64 * MiB, xfs / "b.ntfs", make)
    assert made == [64 * MiB]
    assert hashlib.sha256(template.read_bytes()).hexdigest() == before
    ntfs_is_consistent(xfs / "b.ntfs")
    for size in (128 * MiB, 256 * MiB, 512 * MiB):
        store.blank_volume(size, xfs / f"{size}.ntfs", make)
    assert made == [64 * MiB, 128 * MiB, 256 * MiB, 512 * MiB]
    assert sorted(p.name for p in (xfs / "cache" / "composites" / "blank").glob("*.ntfs")) == sorted(
        f"{size}.ntfs" for size in (128 * MiB, 256 * MiB, 512 * MiB))
    with pytest.raises(LayerDeskError):
        store.blank_volume(1024, xfs / "tiny.ntfs", make)  # mkntfs refuses: nothing is left behind
    assert not (xfs / "tiny.ntfs").exists()
    assert not [p for p in (xfs / "cache" / "composites" / "blank").iterdir() if p.name.startswith(".")]
