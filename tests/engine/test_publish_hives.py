"""The registry merge's child process (app.engine.publish_hives): its new hives, the OS layer's hive files it
keeps in the layer disk cache (and never uses once changed), its end when stopped, and a clear error when
the process dies. The hives are read back with hivexget, not with our reader."""

from __future__ import annotations

import io
import logging
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from app.engine import publish_hives
from app.engine.compose import StackLayer, compose
from app.engine.layer_cache import LayerDiskCache
from app.engine.publish_hives import HiveEntries, PendingHives, changed_hives
from app.engine.repository import LayerRepository
from app.engine.wim import Wim
from app.errors import EnvironmentProblem
from app.tasks.worker import WorkerReport
from tests.engine.test_compose import hive_value, store
from tests.support.compose_stack import OFFICE, TOOLS, os_layer
from tests.support.tools import run_ok

Stack = tuple[LayerRepository, list[StackLayer]]


@pytest.fixture
def layers(tmp_path: Path) -> Stack:
    repository = LayerRepository(tmp_path / "repository").ensure()
    return repository, [store(repository, tmp_path, os_layer(tmp_path), 1), store(repository, tmp_path, OFFICE, 2)]


def _os_hives(repository: LayerRepository, stack: list[StackLayer]) -> HiveEntries:
    manifests = [repository.manifest(layer.layer_id, layer.version_id, layer.checksum) for layer in stack]
    with Wim.open(repository.wim_path(stack[0].layer_id)) as image:
        index = image.find_image(manifests[0].image)
        assert index is not None
        return HiveEntries.of(image, index, changed_hives(manifests))


def _start(repository: LayerRepository, stack: list[StackLayer], folder: Path) -> PendingHives:
    return PendingHives.start(repository, [layer.to_dict() for layer in stack], folder, None,
                              expected=_os_hives(repository, stack))


def _said(caplog: pytest.LogCaptureFixture) -> list[str]:
    """What the registry merge logged (its child's records come through this module's logger)."""
    return [r.getMessage() for r in caplog.records if r.name == "app.engine.publish_hives"]


def _hive_child() -> psutil.Process | None:
    for child in psutil.Process().children(recursive=True):
        try:
            if "app.tasks.worker" in " ".join(child.cmdline()):
                return child
        except psutil.Error:
            pass
    return None


def _wait_for_child() -> psutil.Process:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        child = _hive_child()
        if child is not None:
            return child
        time.sleep(0.002)
    raise AssertionError("the registry merge's process never started")


def test_the_new_hives_are_written_from_the_os_layers_image(layers: Stack, tmp_path: Path) -> None:
    repository, stack = layers
    failures: list[BaseException] = []
    pending = _start(repository, stack, tmp_path / "hives")
    pending.watch(failures.append)
    written = pending.result()
    assert sorted(written) == ["SOFTWARE"] and not failures
    assert written["SOFTWARE"].image_path == "/Windows/System32/config/SOFTWARE"
    assert written["SOFTWARE"].file.parent == tmp_path / "hives" / "out"
    assert hive_value(written["SOFTWARE"].file, "\\Vendor\\App", "Version") == "1.0"
    assert hive_value(written["SOFTWARE"].file, "\\Shared", "Owner") == "Office"
    assert pending.seconds > 0


def test_a_merge_needs_the_hives_found_or_those_expected(layers: Stack, tmp_path: Path) -> None:
    repository, stack = layers
    with pytest.raises(ValueError, match="found or from those expected"):
        PendingHives.start(repository, [layer.to_dict() for layer in stack], tmp_path / "hives", None)


def test_the_os_layers_hive_files_are_kept_in_the_layer_disk_cache(
    layers: Stack, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """The first publish extracts the OS layer's hive files from its image into the layer disk cache; the
    next ones read them from there, checked against the SHA-1s the OS layer's image records. The folder
    counts toward the cache's bound like its volumes."""
    repository, stack = layers
    cache = LayerDiskCache(tmp_path / "cache", 1024**3)
    out = tmp_path / "out"
    out.mkdir()
    caplog.set_level(logging.INFO, logger="app.engine.publish_hives")
    compose(stack, repository, out, "wim", 1, name="first", cache=cache)
    folder = cache.hives_folder(stack[0].layer_id, stack[0].version_id,
                                repository.manifest(stack[0].layer_id, stack[0].version_id, stack[0].checksum).checksum)
    assert folder is not None and folder.is_dir()
    kept = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert kept == ["Windows/System32/config/SOFTWARE", "Windows/System32/config/SYSTEM"]
    assert any("hive files kept in the layer disk cache" in message for message in _said(caplog))
    assert folder in [path for path, _, _ in cache.entries()]
    caplog.clear()
    second = compose([*stack, store(repository, tmp_path, TOOLS, 3)], repository, out, "wim", 1, name="second",
                     cache=cache)
    assert any("hive files from the layer disk cache" in message and folder.name in message
               for message in _said(caplog))
    extracted = tmp_path / "x"
    run_ok("wimlib-imagex", "extract", second.path, "1", "/Windows/System32/config/SOFTWARE",
           f"--dest-dir={extracted}")
    assert hive_value(extracted / "SOFTWARE", "\\Shared", "Owner") == "Tools"
    assert hive_value(extracted / "SOFTWARE", "\\Microsoft\\Windows NT\\CurrentVersion", "ProductName") == \
        "Windows 11 Pro"


def test_keeping_the_hive_files_keeps_the_cache_within_its_bound(layers: Stack, tmp_path: Path) -> None:
    """The hive files enter a full cache: least recently used entries make room, never the folder itself or
    an entry the publish uses."""
    repository, stack = layers
    os_, office = stack
    tools = store(repository, tmp_path, TOOLS, 3)
    roomy = LayerDiskCache(tmp_path / "cache", 1024**3)
    for layer in (office, tools):
        roomy.volume(repository, layer.layer_id, layer.version_id, layer.checksum, label=layer.name, scratch=tmp_path)
        time.sleep(0.05)
    in_use = roomy.name_for(tools.layer_id, tools.version_id,
                            repository.manifest(tools.layer_id, tools.version_id, tools.checksum).checksum)
    folder = roomy.hives_folder(os_.layer_id, os_.version_id,
                                repository.manifest(os_.layer_id, os_.version_id, os_.checksum).checksum)
    assert folder is not None
    pending = PendingHives.start(repository, [layer.to_dict() for layer in stack], tmp_path / "hives", None,
                                 expected=_os_hives(repository, stack), cache=folder, cache_bytes=1, keep=[in_use])
    assert sorted(pending.result()) == ["SOFTWARE"]
    assert sorted(path.name for path, _, _ in roomy.entries()) == sorted([folder.name, in_use])


def test_kept_hive_files_evicted_between_their_check_and_their_use_are_read_from_the_image(
    layers: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """Another publish may evict (or replace) the kept hive files after this merge checked them: it then reads
    them from the OS layer's image instead. Run in this process (the worker function itself) to remove the
    folder at that very moment."""
    repository, stack = layers
    cache = LayerDiskCache(tmp_path / "cache", 1024**3)
    os_ = stack[0]
    folder = cache.hives_folder(os_.layer_id, os_.version_id,
                                repository.manifest(os_.layer_id, os_.version_id, os_.checksum).checksum)
    assert folder is not None
    args = {"repository": str(repository.root), "layers": [layer.to_dict() for layer in stack],
            "expected": _os_hives(repository, stack).to_json(), "cache": str(folder), "cache_bytes": 1024**3}
    publish_hives.hive_worker({**args, "folder": str(tmp_path / "first")}, WorkerReport(io.StringIO()))
    assert folder.is_dir()
    real_rewrite = publish_hives.rewrite_hives
    calls: list[Path] = []

    def rewrite(found: Any, source: Path, *rest: Any) -> Any:
        calls.append(source)
        if len(calls) == 1:
            shutil.rmtree(folder)  # evicted after the check
        return real_rewrite(found, source, *rest)

    monkeypatch.setattr(publish_hives, "rewrite_hives", rewrite)
    caplog.set_level(logging.WARNING, logger="app.engine.publish_hives")
    result = publish_hives.hive_worker({**args, "folder": str(tmp_path / "second")}, WorkerReport(io.StringIO()))
    assert calls == [folder, tmp_path / "second" / "in"]
    assert any("went away" in message for message in _said(caplog))
    assert hive_value(Path(result["written"]["SOFTWARE"]["file"]), "\\Shared", "Owner") == "Office"


def test_a_kept_hive_file_that_changed_is_never_used(layers: Stack, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    repository, stack = layers
    cache = LayerDiskCache(tmp_path / "cache", 1024**3)
    out = tmp_path / "out"
    out.mkdir()
    first = compose(stack, repository, out, "wim", 1, name="first", cache=cache)
    folder = next(path for path, _, _ in cache.entries() if path.name.startswith("hives-"))
    software = folder / "Windows/System32/config/SOFTWARE"
    damaged = bytearray(software.read_bytes())
    damaged[-100:] = b"\xff" * 100  # inside the last hive bin: it still reads as a hive
    software.write_bytes(bytes(damaged))
    caplog.set_level(logging.INFO, logger="app.engine.publish_hives")
    again = compose(stack, repository, out, "wim", 1, name="again", cache=cache)
    assert not any("hive files from the layer disk cache" in message for message in _said(caplog))
    assert any("hive files kept in the layer disk cache" in message for message in _said(caplog))
    assert again.manifest_digest == first.manifest_digest  # the same hives as from the OS layer's image
    assert software.read_bytes() != bytes(damaged)


def test_stopping_the_merge_ends_its_process(layers: Stack, tmp_path: Path) -> None:
    repository, stack = layers
    failures: list[BaseException] = []
    pending = _start(repository, stack, tmp_path / "hives")
    pending.watch(failures.append)
    child = _wait_for_child()
    pending.stop()
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
    assert failures == [] and pending.failure is None  # stopped is not failed


def test_a_merge_whose_process_dies_is_reported_as_such(layers: Stack, tmp_path: Path) -> None:
    repository, stack = layers
    failures: list[BaseException] = []
    pending = _start(repository, stack, tmp_path / "hives")
    _wait_for_child().send_signal(signal.SIGKILL)
    with pytest.raises(EnvironmentProblem, match=r"^The registry merge's process failed: exit status -9$"):
        pending.result()
    assert isinstance(pending.failure, EnvironmentProblem)
    pending.watch(failures.append)  # watched after it failed: told at once
    assert failures == [pending.failure]
