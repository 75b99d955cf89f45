"""The layer disk cache: a second publish takes app and platform layers' volumes from the cache and
gives the same image; the cache stays within its bound, evicting the least recently used volume; a
changed version never matches an old entry."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from app.engine.compose import StackLayer, compose
from app.engine.layer_cache import LayerDiskCache
from app.engine.repository import LayerRepository
from tests.engine.test_compose import store
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
    assert sorted(p.name.split("-")[0] for p, _, _ in cache.entries()) == ["2", "3", "4"]
    assert [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")] == []  # no staging leftovers
    # disk output from cached volumes too
    disk = compose(layers, repository, tmp_path / "out", "vhdx", 1, name="disk", cache=cache)
    assert disk.cache_hits == 3
    run_ok("qemu-img", "check", disk.path)


def test_the_cache_stays_within_its_bound_least_recently_used_first(
    stack: tuple[LayerRepository, list[StackLayer]], tmp_path: Path
) -> None:
    repository, layers = stack
    office, tools, citrix = layers[1:]
    probe = LayerDiskCache(tmp_path / "probe", 1024**3)
    probe.volume(repository, office.layer_id, office.version_id, office.checksum, label="x", scratch=tmp_path)
    ((_, one, _),) = probe.entries()
    cache = LayerDiskCache(tmp_path / "cache", 2 * one + one // 2)  # room for two volumes, not three
    for layer in (office, tools):
        assert not cache.volume(repository, layer.layer_id, layer.version_id, layer.checksum, label=layer.name,
                                scratch=tmp_path).hit
        time.sleep(0.05)
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
