"""The layer disk cache: a second publish takes app and platform layers' volumes from the cache and
gives the same image; the cache stays within its bound, evicting the least recently used volume; a
changed version never matches an old entry; layers missing from it are staged side by side, and one that
fails stops the others; a cached volume whose files no longer match its layer is never published from, but
staged again."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from app.engine import compose as compose_module
from app.engine.compose import ComposeError, StackLayer, compose
from app.engine.composite import CompositeStore
from app.engine.layer_cache import COMPOSITES, LayerDiskCache
from app.engine.repository import LayerRepository, RepositoryDamaged
from app.engine.wim import WimDataChanged, WimError
from tests.engine.test_compose import _check_disk, store
from tests.support.compose_stack import CITRIX, OFFICE, TOOLS, os_layer
from tests.support.tools import run_ok


@pytest.fixture
def stack(tmp_path: Path) -> tuple[LayerRepository, list[StackLayer]]:
    repository = LayerRepository(tmp_path / "repository").ensure()
    layers = [os_layer(tmp_path), OFFICE, TOOLS, CITRIX]
    return repository, [store(repository, tmp_path, layer, n) for n, layer in enumerate(layers, 1)]


def _listing(wim: Path) -> set[str]:
    return {line for line in run_ok("wimlib-imagex", "dir", wim, "1").stdout.splitlines() if line}


def test_a_second_publish_takes_the_layers_from_the_cache(stack: tuple[LayerRepository, list[StackLayer]],
                                                          tmp_path: Path) -> None:
    repository, layers = stack
    cache = LayerDiskCache(tmp_path / "cache", 1024**3)
    (tmp_path / "out").mkdir()
    first = compose(layers, repository, tmp_path / "out", "wim", 1, name="first", cache=cache)
    second = compose(layers, repository, tmp_path / "out", "wim", 1, name="second", cache=cache)
    assert (first.cache_hits, second.cache_hits) == (0, 3)
    assert second.manifest_digest == first.manifest_digest
    assert _listing(second.path) == _listing(first.path)
    # the app layers' volumes, and the OS layer's hive files the registry merge read
    assert sorted(p.name.split("-")[0] for p, _, _ in cache.entries()) == ["2", "3", "4", "hives"]
    assert [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")] == []  # no staging leftovers
    # disk output from cached volumes too
    disk = compose(layers, repository, tmp_path / "out", "vhdx", 1, name="disk", cache=cache)
    assert disk.cache_hits == 3
    run_ok("qemu-img", "check", disk.path)


def test_the_registry_merge_and_the_conflict_report_wait_for_layers_being_staged(
    stack: tuple[LayerRepository, list[StackLayer]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Staging many layers keeps both cores busy: the registry merge and the conflict report start once every
    layer's volume is at hand. With few bytes to stage (a re-publish after one layer changed), or none, they
    start at once."""
    repository, layers = stack
    events: list[str] = []
    real_volume, real_start = LayerDiskCache.volume, compose_module._start_hives
    real_conflicts = compose_module._timed_conflicts

    def volume(self: LayerDiskCache, *args: Any, **kwargs: Any) -> Any:
        found = real_volume(self, *args, **kwargs)
        events.append("cached" if found.hit else "staged")
        return found

    def start(*args: Any) -> Any:
        events.append("hives")
        return real_start(*args)

    def report(*args: Any) -> Any:
        events.append("conflicts")
        return real_conflicts(*args)

    monkeypatch.setattr(LayerDiskCache, "volume", volume)
    monkeypatch.setattr(compose_module, "_start_hives", start)
    monkeypatch.setattr(compose_module, "_timed_conflicts", report)
    (tmp_path / "out").mkdir()
    heavy = LayerDiskCache(tmp_path / "heavy", 1024**3)
    with monkeypatch.context() as patched:
        patched.setattr(compose_module, "_LIGHT_STAGING", 0)  # these small layers count as many bytes
        compose(layers, repository, tmp_path / "out", "vhdx", 1, name="heavy", cache=heavy)
    assert events[:3] == ["staged"] * 3 and sorted(events[3:]) == ["conflicts", "hives"]
    events.clear()
    light = LayerDiskCache(tmp_path / "light", 1024**3)
    compose(layers, repository, tmp_path / "out", "vhdx", 1, name="light", cache=light)
    assert events.index("hives") < events.index("staged") and events.count("staged") == 3
    events.clear()
    compose(layers, repository, tmp_path / "out", "vhdx", 1, name="warm", cache=light)
    assert events.index("hives") < events.index("cached") and events.count("cached") == 3


def _two_of_three(repository: LayerRepository, office: StackLayer, tools: StackLayer,
                  tmp_path: Path) -> tuple[LayerDiskCache, int]:
    """A cache with room for two of the stack's three app layer volumes, holding Office's and then Tools'
    (staged, not taken from it); and the size of one volume."""
    probe = LayerDiskCache(tmp_path / "probe", 1024**3)
    probe.volume(repository, office.layer_id, office.version_id, office.checksum, label="x", scratch=tmp_path)
    ((_, one, _),) = probe.entries()
    cache = LayerDiskCache(tmp_path / "cache", 2 * one + one // 2)
    for layer in (office, tools):
        assert not cache.volume(repository, layer.layer_id, layer.version_id, layer.checksum, label=layer.name,
                                scratch=tmp_path).hit
        time.sleep(0.05)
    return cache, one


def test_the_cache_stays_within_its_bound_least_recently_used_first(
    stack: tuple[LayerRepository, list[StackLayer]], tmp_path: Path
) -> None:
    repository, layers = stack
    office, tools, citrix = layers[1:]
    cache, _ = _two_of_three(repository, office, tools, tmp_path)
    assert cache.volume(repository, office.layer_id, office.version_id, office.checksum, label="x",
                        scratch=tmp_path).hit  # office is now the most recently used
    staged = cache.volume(repository, citrix.layer_id, citrix.version_id, citrix.checksum, label="x",
                          scratch=tmp_path)
    assert not staged.hit
    assert sorted(int(p.name.split("-")[0]) for p, _, _ in cache.entries()) == [office.layer_id, citrix.layer_id]
    assert sum(size for _, size, _ in cache.entries()) <= cache.max_bytes
    # an entry the caller keeps is never evicted, even over the bound
    tiny = LayerDiskCache(tmp_path / "cache", 1)
    kept = {p.name for p, _, _ in tiny.entries()}
    assert tiny.evict(keep=kept) == [] and {p.name for p, _, _ in tiny.entries()} == kept
    assert len(tiny.evict()) == 2 and tiny.entries() == []


def test_an_entry_that_cannot_be_removed_now_is_left_for_later(
    stack: tuple[LayerRepository, list[StackLayer]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Where a file another process has open cannot be removed (Windows), evicting it fails: the staging goes
    on, the next least recently used entry goes instead, and the stuck one is evicted later. The refusal is
    injected here, as Windows would give it."""
    repository, layers = stack
    office, tools, citrix = layers[1:]
    cache, one = _two_of_three(repository, office, tools, tmp_path)
    stuck = cache.entries()[0][0]  # office's, the least recently used
    real_unlink = Path.unlink

    def unlink(self: Path, missing_ok: bool = False) -> None:
        if self == stuck:
            raise PermissionError(13, "The process cannot access the file because it is being used", str(self))
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink)
    with caplog.at_level(logging.WARNING, logger="app.engine.layer_cache"):
        staged = cache.volume(repository, citrix.layer_id, citrix.version_id, citrix.checksum, label="x",
                              scratch=tmp_path)
    assert staged.path.is_file() and not staged.hit
    assert sorted(int(p.name.split("-")[0]) for p, _, _ in cache.entries()) == [office.layer_id, citrix.layer_id]
    assert any(stuck.name in r.getMessage() and "could not be evicted now" in r.getMessage() for r in caplog.records)
    monkeypatch.setattr(Path, "unlink", real_unlink)  # no longer open: the next eviction takes it
    assert LayerDiskCache(tmp_path / "cache", one + one // 2).evict() == [stuck.name]


def test_a_changed_version_or_a_disabled_cache_never_uses_old_entries(
    stack: tuple[LayerRepository, list[StackLayer]], tmp_path: Path
) -> None:
    repository, layers = stack
    tools = layers[2]
    cache = LayerDiskCache(tmp_path / "cache", 1024**3)
    cache.volume(repository, tools.layer_id, tools.version_id, tools.checksum, label="t", scratch=tmp_path)
    # the same version id stored again with other content: a new checksum, so the old volume is not used
    changed = TOOLS.__class__(TOOLS.name, TOOLS.role, {**TOOLS.files, "Program Files/Tools/new.dll": b"new"})
    restored = store(repository, tmp_path / "again", changed, tools.layer_id)
    again = cache.volume(repository, restored.layer_id, restored.version_id, restored.checksum, label="t",
                         scratch=tmp_path)
    assert not again.hit
    assert "new.dll" in run_ok("ntfsls", "-p", "/Program Files/Tools", again.path).stdout
    disabled = LayerDiskCache(tmp_path / "off", 0)
    scratch = tmp_path / "scratch"
    staged = disabled.volume(repository, tools.layer_id, tools.version_id, restored.checksum, label="t",
                             scratch=scratch)
    assert staged.path.parent == scratch and not (tmp_path / "off").exists()
    os.unlink(staged.path)


def _barrier_volumes(monkeypatch: pytest.MonkeyPatch, parties: int) -> list[str]:
    """Make the first ``parties`` stagings wait for each other before they start: a staging that ran alone
    would time out the barrier. Returns the thread names the stagings ran in."""
    barrier = threading.Barrier(parties, timeout=20)
    threads: list[str] = []
    real = LayerDiskCache.volume

    def volume(self: LayerDiskCache, *args: Any, **kwargs: Any) -> Any:
        threads.append(threading.current_thread().name)
        if len(threads) <= parties:
            barrier.wait()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(LayerDiskCache, "volume", volume)
    return threads


def test_layers_missing_from_the_cache_are_staged_side_by_side(
    stack: tuple[LayerRepository, list[StackLayer]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repository, layers = stack
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(compose_module, "_STAGING_THREADS", 1)
    alone = compose(layers, repository, out, "wim", 1, name="alone", cache=LayerDiskCache(tmp_path / "c1", 1 << 30))
    monkeypatch.setattr(compose_module, "_STAGING_THREADS", 2)
    threads = _barrier_volumes(monkeypatch, 2)
    seen: list[float] = []
    together = compose(layers, repository, out, "wim", 1, name="together",
                       cache=LayerDiskCache(tmp_path / "c2", 1 << 30), progress=lambda p, _m: seen.append(p))
    assert len(threads) == 3 and len(set(threads)) == 2 and all(t.startswith("stage") for t in threads)
    assert together.manifest_digest == alone.manifest_digest
    assert _listing(together.path) == _listing(alone.path)
    assert seen == sorted(seen) and together.cache_hits == 0
    assert sorted(p.name.split("-")[0] for p, _, _ in LayerDiskCache(tmp_path / "c2", 1).entries()) == [
        "2", "3", "4", "hives"]


def test_a_staging_that_fails_stops_the_others_and_its_error_is_the_one_reported(
    stack: tuple[LayerRepository, list[StackLayer]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repository, layers = stack
    office, tools, citrix = layers[1:]
    stale = StackLayer(tools.role, tools.name, tools.layer_id, tools.version_id, "sha256:" + "0" * 64)
    monkeypatch.setattr(compose_module, "_STAGING_THREADS", 2)
    failed = threading.Event()
    real = LayerDiskCache.volume

    def volume(self: LayerDiskCache, repo: LayerRepository, layer_id: int, *args: Any, **kwargs: Any) -> Any:
        if layer_id == office.layer_id:  # still to start when the other staging fails
            assert failed.wait(20)
        try:
            return real(self, repo, layer_id, *args, **kwargs)
        except RepositoryDamaged:
            failed.set()
            raise

    monkeypatch.setattr(LayerDiskCache, "volume", volume)
    out = tmp_path / "out"
    out.mkdir()
    cache = LayerDiskCache(tmp_path / "cache", 1 << 30)
    with pytest.raises(RepositoryDamaged, match="does not match the catalog"):
        compose([layers[0], office, stale, citrix], repository, out, "vhdx", 1, name="Broken", cache=cache)
    assert list(out.iterdir()) == []
    assert not (tmp_path / "cache").exists() or list((tmp_path / "cache").iterdir()) == []  # office never staged
    assert repository.check() == []


@pytest.mark.parametrize("fmt", ["wim", "raw"])
def test_a_cached_volume_whose_files_changed_is_staged_again(
    stack: tuple[LayerRepository, list[StackLayer]], tmp_path: Path, fmt: str, caplog: pytest.LogCaptureFixture,
) -> None:
    """The files a cached volume adds carry the SHA-1s of their layer's repository image, and applying or
    writing the image checks the data read against them: a volume changed after it was staged (same size,
    same times, other bytes) is dropped from the cache and staged afresh, and the image holds the layer's
    own bytes."""
    repository, layers = stack
    cache = LayerDiskCache(tmp_path / "cache", 1024**3)
    out = tmp_path / "out"
    out.mkdir()
    first = compose(layers, repository, out, fmt, 1, name="first", cache=cache)
    office = layers[1]
    (volume,) = [p for p, _, _ in cache.entries() if p.name.startswith(f"{office.layer_id}-")]
    forged = tmp_path / "forged.exe"
    forged.write_bytes(b"WORD" * 100)  # the size of Office's winword.exe
    run_ok("ntfscp", "-f", volume, forged, "Program Files/Office/winword.exe")
    assert run_ok("ntfscat", volume, "Program Files/Office/winword.exe").stdout == "WORD" * 100
    stored = _files(repository.root)
    with caplog.at_level(logging.WARNING, logger="app.engine"):
        second = compose(layers, repository, out, fmt, 1, name="second", cache=cache)
    assert "does not match its layer" in caplog.text
    assert _files(repository.root) == stored and repository.check() == []
    assert second.cache_hits == 0 and second.manifest_digest == first.manifest_digest
    if fmt == "wim":
        run_ok("wimlib-imagex", "extract", second.path, "1", "/Program Files/Office/winword.exe",
               f"--dest-dir={tmp_path / 'x'}")
        assert (tmp_path / "x" / "winword.exe").read_bytes() == b"word" * 100
    else:
        (tmp_path / "check").mkdir()
        _check_disk(second.path, tmp_path / "check", 1024**3)  # every file's bytes, read with ntfscat
    # the cache holds the layer's own volume again, and nothing else was left behind
    assert run_ok("ntfscat", volume, "Program Files/Office/winword.exe").stdout == "word" * 100
    assert sorted(p.name for p in out.iterdir()) == sorted([first.path.name, second.path.name])


def test_layer_data_that_keeps_changing_stops_the_publish_with_one_message(
    stack: tuple[LayerRepository, list[StackLayer]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """When file data still does not match its checksum after the cached volumes were staged again (something
    changing the layers under the publish; wimlib's error is injected for both tries), the publish stops with
    one message that names no work file; the cache's entries are the ones staged afresh and nothing is left in
    the output folder."""
    repository, layers = stack
    cache = LayerDiskCache(tmp_path / "cache", 1024**3)
    out = tmp_path / "out"
    out.mkdir()
    compose(layers, repository, out, "raw", 1, name="first", cache=cache)
    used = sorted(p.name for p, _, _ in cache.entries() if p.suffix == ".ntfs")  # the volumes, not the hives
    tries: list[int] = []

    def changed_data(*args: Any, **kwargs: Any) -> Any:
        tries.append(1)
        raise WimDataChanged("Cannot apply image 1 to the NTFS volume /x/windows.ntfs: A file being added to a "
                             "WIM image was concurrently modified (wimlib error 88)")

    stored = _files(repository.root)
    monkeypatch.setattr(compose_module, "_write_disk", changed_data)
    with caplog.at_level(logging.WARNING, logger="app.engine"), pytest.raises(ComposeError) as caught:
        compose(layers, repository, out, "raw", 1, name="second", cache=cache)
    assert str(caught.value).startswith("The layers' files changed while the image was being built")
    assert "Nothing was published" in str(caught.value) and "windows.ntfs" not in str(caught.value)
    assert len(tries) == 2
    assert sorted(p.name for p in out.iterdir()) == ["first.raw"]
    assert _files(repository.root) == stored and repository.check() == []
    removed = sorted(r.getMessage().split()[4].rstrip(",") for r in caplog.records
                     if "no longer matches its layer version" in r.getMessage())
    assert removed == used  # every volume the first try took from the cache was dropped...
    assert sorted(p.name for p, _, _ in cache.entries() if p.suffix == ".ntfs") == used  # ...and staged again


def test_a_damaged_layer_wim_stops_a_publish_even_with_its_volume_cached(
    stack: tuple[LayerRepository, list[StackLayer]], tmp_path: Path,
) -> None:
    """The checksums of a cached layer's files come from its repository WIM: a WIM that cannot be read stops the
    publish with a message naming it, before anything is applied; nothing is written to the output folder, the
    repository is left as it was (damaged, for ``repo check`` to report) and the cache keeps its volumes."""
    repository, layers = stack
    cache = LayerDiskCache(tmp_path / "cache", 1024**3)
    out = tmp_path / "out"
    out.mkdir()
    compose(layers, repository, out, "raw", 1, name="first", cache=cache)
    entries = sorted(p.name for p, _, _ in cache.entries())
    office = layers[1]
    wim = repository.wim_path(office.layer_id)
    wim.write_bytes(b"MSWIM\0\0\0" + bytes(200))  # a WIM header cut short
    before = _files(repository.root)
    with pytest.raises(WimError, match="Cannot open the WIM file") as caught:
        compose(layers, repository, out, "raw", 1, name="second", cache=cache)
    assert str(wim) in str(caught.value) and "header" in str(caught.value)
    assert sorted(p.name for p in out.iterdir()) == ["first.raw"]
    assert _files(repository.root) == before
    assert sorted(p.name for p, _, _ in cache.entries()) == entries
    assert any(str(office.layer_id) in problem for problem in repository.check())


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_composites_count_toward_the_bound_and_go_least_recently_used_first(tmp_path: Path) -> None:
    """The composites kept for re-publishing are in the cache's bound: adopting one evicts what was used
    least recently (layer volumes or other composites), never the composite just adopted."""
    MiB = 1024 * 1024
    cache = LayerDiskCache(tmp_path / "cache", 10 * MiB)
    store = CompositeStore(tmp_path / "cache" / COMPOSITES, keep=5, evict=cache.evict)
    layer = tmp_path / "cache" / "1-2-0123456789abcdef.ntfs"
    layer.parent.mkdir()
    layer.write_bytes(os.urandom(4 * MiB))
    now = time.time()
    os.utime(layer, (now - 100, now - 100))

    def adopt(shape: str, used: float) -> Path:
        volume = tmp_path / f"{shape}.ntfs"
        volume.write_bytes(os.urandom(4 * MiB))
        kept = store.adopt(shape * 24, volume, {"/": shape})
        assert kept is not None
        os.utime(kept.parent / f"{shape * 24}.json", (used, used))
        return kept

    a = adopt("a", now - 50)
    assert {p.name for p, _, _ in cache.entries()} == {layer.name, a.name}  # 8 MiB: within the bound
    b = adopt("b", now - 40)
    assert not layer.exists() and a.exists() and b.exists()  # the layer volume was used least recently
    c = adopt("c", now - 30)
    assert not a.exists() and not (a.parent / f"{'a' * 24}.json").exists()
    assert [p.name for p, _, _ in cache.entries()] == [b.name, c.name]
    big = tmp_path / "big.ntfs"
    big.write_bytes(os.urandom(12 * MiB))
    kept = store.adopt("d" * 24, big, {})
    assert kept is not None and kept.exists()  # larger than the bound alone, but just adopted
    assert [p.name for p, _, _ in cache.entries()] == [kept.name]
