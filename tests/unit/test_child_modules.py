"""How LayerDesk starts its own child processes (task workers, a background ``layerctl``), from source
and from a frozen build, which has no interpreter to run ``python -m`` with."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from app.procs import RUN_MODULE_FLAG, module_command

RUN_LAYERCTL = "from app.cli.main import run; run()"


def test_from_source_children_run_with_this_interpreter() -> None:
    assert module_command("app.tasks.worker") == [sys.executable, "-m", "app.tasks.worker"]
    assert module_command("app.cli") == [sys.executable, "-m", "app.cli"]


def test_a_frozen_build_runs_children_through_its_layerctl(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "LayerDesk" / "layerdesk"))
    assert module_command("app.tasks.worker") == [str(tmp_path / "LayerDesk" / "layerctl"), RUN_MODULE_FLAG,
                                                  "app.tasks.worker"]


def test_only_layerdesk_child_modules_are_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    with pytest.raises(ValueError, match="not a module LayerDesk runs"):
        module_command("http.server")
    done = subprocess.run([sys.executable, "-c", RUN_LAYERCTL, RUN_MODULE_FLAG, "http.server"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert "--run-module takes one of app.tasks.worker, app.cli" in done.stderr


def test_layerctl_runs_a_child_module_with_its_arguments_and_exit_status(tmp_path: Path) -> None:
    """What a frozen layerctl does when started as ``layerctl --run-module app.cli …``."""
    home = tmp_path / "home"
    done = subprocess.run([sys.executable, "-c", RUN_LAYERCTL, RUN_MODULE_FLAG, "app.cli", "--home", str(home),
                           "--json", "init"], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["catalog"] == str(home / "catalog.sqlite")
    missing = subprocess.run([sys.executable, "-c", RUN_LAYERCTL, RUN_MODULE_FLAG, "app.cli", "--home", str(home),
                              "layer", "show", "Nope"], capture_output=True, text=True, timeout=120, check=False)
    assert missing.returncode == 5 and "Nope" in missing.stderr


def test_a_frozen_build_prefers_the_engine_tools_it_ships(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The Windows installer can put qemu-img and wimlib into ``tools`` beside the executables."""
    from app.procs import bundled_tools_dir, find_program

    assert bundled_tools_dir() is None  # from source: only PATH
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "LayerDesk" / "layerdesk"))
    assert bundled_tools_dir() is None  # frozen, but nothing shipped
    tools = tmp_path / "LayerDesk" / "tools"
    tools.mkdir(parents=True)
    shipped = tools / "qemu-img"
    shipped.write_text("#!/bin/sh\necho 'qemu-img version 9.9.9 (shipped)'\n")
    shipped.chmod(0o755)
    assert bundled_tools_dir() == tools
    assert find_program("qemu-img") == str(shipped)
    from app.engine.toolcheck import engine_tools

    qemu = next(t for t in engine_tools() if t.name == "qemu-img")
    assert qemu.version == "qemu-img version 9.9.9 (shipped)"
