"""The registry merge's child process (app.engine.publish_hives): its new hives, its end when stopped, and a
clear error when the process dies. The hives are read back with hivexget, not with our reader."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import psutil
import pytest

from app.engine.publish_hives import PendingHives
from app.engine.repository import LayerRepository
from app.errors import EnvironmentProblem
from tests.engine.test_compose import hive_value, store
from tests.support.compose_stack import OFFICE, os_layer


@pytest.fixture
def layers(tmp_path: Path) -> tuple[LayerRepository, list[dict[str, object]]]:
    repository = LayerRepository(tmp_path / "repository").ensure()
    stack = [store(repository, tmp_path, os_layer(tmp_path), 1), store(repository, tmp_path, OFFICE, 2)]
    return repository, [layer.to_dict() for layer in stack]


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


def test_the_new_hives_are_written_from_the_os_layers_image(layers: tuple[LayerRepository, list[dict[str, object]]],
                                                            tmp_path: Path) -> None:
    repository, stack = layers
    failures: list[BaseException] = []
    pending = PendingHives.start(repository, stack, tmp_path / "hives", None)
    pending.watch(failures.append)
    written = pending.result()
    assert sorted(written) == ["SOFTWARE"] and not failures
    assert written["SOFTWARE"].image_path == "/Windows/System32/config/SOFTWARE"
    assert written["SOFTWARE"].file.parent == tmp_path / "hives" / "out"
    assert hive_value(written["SOFTWARE"].file, "\\Vendor\\App", "Version") == "1.0"
    assert hive_value(written["SOFTWARE"].file, "\\Shared", "Owner") == "Office"
    assert pending.seconds > 0


def test_stopping_the_merge_ends_its_process(layers: tuple[LayerRepository, list[dict[str, object]]],
                                             tmp_path: Path) -> None:
    repository, stack = layers
    failures: list[BaseException] = []
    pending = PendingHives.start(repository, stack, tmp_path / "hives", None)
    pending.watch(failures.append)
    child = _wait_for_child()
    pending.stop()
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
    assert failures == [] and pending.failure is None  # stopped is not failed


def test_a_merge_whose_process_dies_is_reported_as_such(layers: tuple[LayerRepository, list[dict[str, object]]],
                                                        tmp_path: Path) -> None:
    repository, stack = layers
    failures: list[BaseException] = []
    pending = PendingHives.start(repository, stack, tmp_path / "hives", None)
    _wait_for_child().send_signal(signal.SIGKILL)
    with pytest.raises(EnvironmentProblem, match=r"^The registry merge's process failed: exit status -9$"):
        pending.result()
    assert isinstance(pending.failure, EnvironmentProblem)
    pending.watch(failures.append)  # watched after it failed: told at once
    assert failures == [pending.failure]
