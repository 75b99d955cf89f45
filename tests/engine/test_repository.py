"""The layer repository: one WIM per layer, a verified manifest per version, atomic and deduplicated.

Stored images are read back with ``wimlib-imagex`` and ``ntfsls``/``ntfscat`` (not our code); damage is
made by flipping bytes in the files.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from app.engine.registry.delta import RegistryDelta, SetValue
from app.engine.repository import (
    CaptureSource,
    Deletion,
    LayerRepository,
    RepositoryDamaged,
    SourceKind,
    StoredVersion,
    manifest_checksum,
)
from app.engine.wim import make_ntfs_volume
from app.tasks.base import CancelToken, TaskCanceled
from tests.engine.test_wim import Layer, build_volume, ntfs_cat, ntfs_named_streams, ntfs_tree, wimlib_imagex_dir
from tests.support.repository_checks import flip_bytes, listing, make_tree

MiB = 1024 * 1024
DELTA = RegistryDelta([SetValue("SOFTWARE", "Vendor\\App", "Version", 1, "2.0\0".encode("utf-16-le"))])


@pytest.fixture
def repo(tmp_path: Path) -> LayerRepository:
    return LayerRepository(tmp_path / "repository").ensure()


def _folder(tmp_path: Path, name: str, files: dict[str, bytes]) -> CaptureSource:
    return CaptureSource(SourceKind.FOLDER, make_tree(tmp_path / name, files))


def _store(repo: LayerRepository, layer: int, version: int, source: CaptureSource, **kw: object) -> StoredVersion:
    return repo.store_version(layer, version, source, **kw)  # type: ignore[arg-type]


def test_store_writes_one_wim_per_layer_and_a_verified_manifest(repo: LayerRepository, tmp_path: Path) -> None:
    source = _folder(tmp_path, "src", {"App/app.exe": b"MZ" * 1000, "App/conf/app.ini": b"[a]\r\n",
                                       "App/.wh.old.dll": b""})
    deletions = (Deletion("App\\old.dll"), Deletion("App\\cache", opaque=True))
    stored = _store(repo, 3, 7, source, deletions=deletions, delta=DELTA, drop=["/App/.wh.old.dll"])
    assert (stored.image, stored.files, stored.data_bytes) == ("v7", 2, 2005)
    assert stored.checksum.startswith("sha256:") and len(stored.checksum) == 71
    assert stored.wim_bytes == repo.wim_path(3).stat().st_size
    assert sorted(listing(repo.root)) == ["layers", "layers/.3.lock", "layers/3", "layers/3.wim", "layers/3/v7.json"]
    # The marker is not stored; wimlib-imagex sees exactly the layer's files.
    assert wimlib_imagex_dir(repo.wim_path(3), 1) == {"/", "/App", "/App/app.exe", "/App/conf", "/App/conf/app.ini"}
    manifest = repo.manifest(3, 7, stored.checksum)
    assert (manifest.image, manifest.deletions, manifest.registry) == ("v7", deletions, DELTA)
    assert (manifest.files, manifest.data_bytes, manifest.source) == (2, 2005, source)
    # The checksum is the SHA-256 of the canonical manifest content.
    document = json.loads(repo.manifest_path(3, 7).read_text(encoding="utf-8"))
    assert document["checksum"] == stored.checksum == manifest_checksum(document["manifest"])
    assert document["manifest"]["schema"] == 1 and document["manifest"]["registry"] == DELTA.to_dict()


def test_manifest_is_never_used_when_it_does_not_match(repo: LayerRepository, tmp_path: Path) -> None:
    stored = _store(repo, 1, 1, _folder(tmp_path, "src", {"a.txt": b"a"}), delta=DELTA)
    with pytest.raises(RepositoryDamaged, match="does not match the catalog"):
        repo.manifest(1, 1, "sha256:" + "0" * 64)
    with pytest.raises(RepositoryDamaged, match="no checksum"):
        repo.manifest(1, 1, None)
    with pytest.raises(RepositoryDamaged, match="no manifest"):
        repo.manifest(1, 2, stored.checksum)
    # An edited manifest (the checksum no longer matches its content) is damaged.
    path = repo.manifest_path(1, 1)
    path.write_text(path.read_text(encoding="utf-8").replace('"files": 1', '"files": 5'), encoding="utf-8")
    with pytest.raises(RepositoryDamaged, match="content does not match its checksum"):
        repo.manifest(1, 1, stored.checksum)
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(RepositoryDamaged, match="is damaged"):
        repo.manifest(1, 1, stored.checksum)


def test_versions_share_unchanged_data_and_removal_keeps_the_rest(repo: LayerRepository, tmp_path: Path) -> None:
    files = {f"dir{n % 5}/file{n}.bin": os.urandom(64 * 1024) for n in range(40)}
    v1 = _store(repo, 1, 1, _folder(tmp_path, "v1", files))
    changed = dict(files, **{"dir0/file0.bin": os.urandom(64 * 1024), "dir1/file1.bin": os.urandom(64 * 1024)})
    v2 = _store(repo, 1, 2, _folder(tmp_path, "v2", changed))
    assert v2.wim_bytes < 1.15 * v1.wim_bytes  # 5 % changed: far less than a second copy
    assert repo.remove_version(1, 1)
    assert repo.wim_path(1).stat().st_size < v2.wim_bytes
    assert not repo.manifest_path(1, 1).exists()
    out = tmp_path / "out"
    from app.engine.wim import Wim

    with Wim.open(repo.wim_path(1)) as w:
        assert (w.image_count, w.image_name(1)) == (1, "v2")
        w.verify()
        w.extract_image_to_folder(1, out)
    assert {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()} == changed
    assert repo.manifest(1, 2, v2.checksum).files == 40
    # Removing the last version leaves the empty repository, lock file included; again is a no-op.
    assert repo.remove_version(1, 2)
    assert listing(repo.root) == {"layers": "dir"}
    assert not repo.remove_version(1, 2)
    assert repo.check({}) == []


def test_a_stale_image_of_a_reused_version_id_is_replaced(repo: LayerRepository, tmp_path: Path) -> None:
    _store(repo, 1, 1, _folder(tmp_path, "a", {"keep.txt": b"keep"}))
    _store(repo, 1, 2, _folder(tmp_path, "old", {"old.txt": b"old"}))
    repo.manifest_path(1, 2).unlink()  # as if the catalog row was deleted and the process died
    stored = _store(repo, 1, 2, _folder(tmp_path, "new", {"new.txt": b"new"}))
    assert wimlib_imagex_dir(repo.wim_path(1), 2) == {"/", "/new.txt"}
    assert repo.check({(1, 1): repo.manifest(1, 1, _checksum(repo, 1, 1)).checksum, (1, 2): stored.checksum}) == []


def _checksum(repo: LayerRepository, layer: int, version: int) -> str:
    return str(json.loads(repo.manifest_path(layer, version).read_text(encoding="utf-8"))["checksum"])


def test_cancel_or_failure_leaves_the_previous_wim_untouched(repo: LayerRepository, tmp_path: Path) -> None:
    stored = _store(repo, 1, 1, _folder(tmp_path, "a", {"a.txt": b"a"}))
    before = listing(repo.root)
    big = _folder(tmp_path, "big", {f"f{n}.bin": os.urandom(MiB) for n in range(12)})
    token = CancelToken()
    seen: list[int] = []

    def progress(done: int, total: int) -> None:
        seen.append(done)
        if done > 0:
            token.cancel()

    with pytest.raises(TaskCanceled):
        repo.store_version(1, 2, big, progress=progress, cancel=token)
    assert seen and listing(repo.root) == before
    missing = CaptureSource(SourceKind.NTFS_VOLUME, tmp_path / "nope.ntfs")
    with pytest.raises(Exception, match="does not exist"):
        repo.store_version(1, 2, missing)
    assert listing(repo.root) == before
    assert repo.manifest(1, 1, stored.checksum).files == 1


def test_work_files_of_a_killed_store_are_found_and_removed(repo: LayerRepository, tmp_path: Path) -> None:
    stored = _store(repo, 1, 1, _folder(tmp_path, "a", {"a.txt": b"a"}))
    before = listing(repo.root)
    leftovers = [repo.layers / ".1.wim.v2.tmp", repo.layers / "..1.wim.v2.tmp.4242.partial",
                 repo.layers / "1" / ".v2.json.tmp"]
    for path in leftovers:
        path.write_bytes(b"half")
    problems = repo.check({(1, 1): stored.checksum})
    assert sorted(problems) == sorted(f"{p.relative_to(repo.root).as_posix()}: work file left by an interrupted "
                                      "store or removal" for p in leftovers)
    # While version 2 is still being stored (no checksum yet), its work files are not problems.
    assert repo.check({(1, 1): stored.checksum, (1, 2): None}) == []
    assert repo.remove_version(1, 2)
    assert listing(repo.root) == before


def test_check_finds_damaged_wims_mismatched_and_orphaned_manifests(repo: LayerRepository, tmp_path: Path) -> None:
    a = _store(repo, 1, 1, _folder(tmp_path, "a", {f"f{n}": os.urandom(300_000) for n in range(4)}))
    b = _store(repo, 2, 2, _folder(tmp_path, "b", {"b.txt": b"b"}))
    c = _store(repo, 2, 3, _folder(tmp_path, "c", {"c.txt": b"c"}))
    catalog = {(1, 1): a.checksum, (2, 2): b.checksum, (2, 3): c.checksum}
    assert repo.check(catalog) == []
    flip_bytes(repo.wim_path(1), repo.wim_path(1).stat().st_size // 2)
    problems = repo.check({**catalog, (2, 3): "sha256:" + "1" * 64, (5, 9): "sha256:" + "2" * 64})
    assert len(problems) == 3, problems
    assert problems[0].startswith("layers/1.wim: damaged: ") and "integrity" in problems[0]
    assert problems[1] == (f"layer 2 version 3: the manifest's checksum {c.checksum} does not match the catalog's "
                           f"sha256:{'1' * 64}")
    assert problems[2].startswith("layer 5 version 9: the catalog says it is stored")
    # A version the catalog does not know is an orphan; an image without manifest is reported too.
    repo.manifest_path(2, 2).unlink()
    problems = repo.check({(2, 3): c.checksum})
    assert "layer 2 version 2: image v2 in layers/2.wim has no manifest" in problems
    assert "layer 2 version 2: stored, but the catalog has no such version (orphan)" in problems
    (repo.layers / "stray.txt").write_text("?", encoding="utf-8")
    assert "layers/stray.txt: unexpected file in the repository" in repo.check()


def test_an_ntfs_volume_round_trips_with_streams(repo: LayerRepository, tmp_path: Path) -> None:
    layer = Layer("App", {"Program Files/App/app.exe": b"MZ" + b"\0" * 5000, "Program Files/App/readme.txt": b"hi"},
                  streams={"Program Files/App/readme.txt": {"Zone.Identifier": b"[ZoneTransfer]\r\nZoneId=3\r\n"}})
    volume = build_volume(tmp_path, layer)
    stored = _store(repo, 4, 11, CaptureSource(SourceKind.NTFS_VOLUME, volume))
    assert stored.files == 2
    target = make_ntfs_volume(tmp_path / "out.ntfs", 16 * MiB)
    manifest = repo.extract_version_to_ntfs_volume(4, 11, target, checksum=stored.checksum)
    assert manifest.image == "v11"
    assert {p for p in ntfs_tree(target) if not p.startswith("/$")} >= {
        "/Program Files/", "/Program Files/App/", "/Program Files/App/app.exe", "/Program Files/App/readme.txt"}
    assert ntfs_cat(target, "/Program Files/App/readme.txt") == b"hi"
    assert ntfs_named_streams(target, "/Program Files/App/readme.txt") == {"Zone.Identifier"}
    with pytest.raises(RepositoryDamaged):
        repo.extract_version_to_ntfs_volume(4, 11, target, checksum="sha256:" + "f" * 64)


def test_concurrent_stores_into_one_layer_both_land(repo: LayerRepository, tmp_path: Path) -> None:
    sources = {v: _folder(tmp_path, f"s{v}", {f"v{v}.bin": os.urandom(2 * MiB)}) for v in (1, 2, 3)}
    results: dict[int, StoredVersion] = {}
    errors: list[BaseException] = []

    def store(version: int) -> None:
        try:
            results[version] = _store(LayerRepository(repo.root), 1, version, sources[version])
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=store, args=(v,)) for v in sources]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    catalog = {(1, v): r.checksum for v, r in results.items()}
    assert len(catalog) == 3 and repo.check(catalog) == []


def test_import_work_folders_are_reported_only_when_no_import_is_running(repo: LayerRepository,
                                                                          tmp_path: Path) -> None:
    """A disk or difference import works in ``.import-<layer>-v<version>-…`` / ``.difference-<layer>-v<version>``
    folders beside the WIMs: while the catalog says that version is being imported they are expected; once
    it is not, they are leftovers of a killed import, reported, and removed with the version."""
    stored = repo.store_version(1, 10, _folder(tmp_path, "a", {"a.txt": b"a"}))
    leftovers = [repo.layers / ".import-1-v11-k3x9_q", repo.layers / ".difference-1-v11"]
    for folder in leftovers:
        folder.mkdir()
        (folder / "volume.ntfs").write_bytes(b"x")
    assert repo.check({(1, 10): stored.checksum, (1, 11): None}) == []  # version 11 is being imported
    problems = repo.check({(1, 10): stored.checksum})
    assert problems == [f"layers/{f.name}: work folder left by an interrupted import" for f in sorted(leftovers)]
    assert repo.remove_version(1, 11)
    assert not any(f.exists() for f in leftovers)
    assert repo.check({(1, 10): stored.checksum}) == []
