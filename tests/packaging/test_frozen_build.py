"""The frozen build: PyInstaller's one folder is built from this checkout (packaging/build-frozen.sh),
then run the way an administrator would run it, and wrapped in the NSIS installer, whose contents are
listed with 7-Zip. Slow (a few minutes), so it is built once for the module."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(argv: list[str], *, timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def frozen(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The built ``LayerDesk`` folder."""
    try:
        import PyInstaller  # noqa: F401
    except ImportError:
        pytest.skip("PyInstaller is not installed (tests/run.sh installs the project's build extra)")
    base = tmp_path_factory.mktemp("frozen")
    done = _run(["bash", str(ROOT / "packaging" / "build-frozen.sh"), str(base / "dist"), str(base / "work")],
                timeout=1500, env={"PYTHON": sys.executable})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    app = base / "dist" / "LayerDesk"
    yield app
    shutil.rmtree(base, ignore_errors=True)


def _exe(app: Path, name: str) -> str:
    return str(app / (f"{name}.exe" if os.name == "nt" else name))


def test_the_frozen_console_starts_shows_its_window_and_exits(frozen: Path, tmp_path: Path) -> None:
    done = _run([_exe(frozen, "layerdesk"), "--smoke", "--home", str(tmp_path / "home")], timeout=180,
                env={"QT_QPA_PLATFORM": "offscreen"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "LayerDesk console smoke run: ok" in done.stdout
    assert (tmp_path / "home" / "catalog.sqlite").is_file()


def test_the_frozen_layerctl_creates_a_home_lists_layers_and_runs_a_child_task(frozen: Path, tmp_path: Path) -> None:
    home = str(tmp_path / "home")
    layerctl = _exe(frozen, "layerctl")
    init = _run([layerctl, "--json", "--home", home, "init"], timeout=120)
    assert init.returncode == 0, init.stderr
    made = json.loads(init.stdout)
    assert made["catalog"] == str(tmp_path / "home" / "catalog.sqlite") and made["roles"] == ["Administrator"]
    listed = _run([layerctl, "--json", "--home", home, "layer", "list"], timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == []
    # catalog check runs as a task in a child process: the frozen layerctl started with --run-module.
    checked = _run([layerctl, "--home", home, "catalog", "check"], timeout=180)
    assert checked.returncode == 0, checked.stderr
    assert "The catalog is healthy." in checked.stdout
    refused = _run([layerctl, "--home", home, "layer", "show", "Nope"], timeout=120)
    assert refused.returncode == 5 and "Nope" in refused.stderr


def test_the_build_ships_resources_and_leaves_out_what_it_should(frozen: Path) -> None:
    internal = frozen / "_internal"
    assert (internal / "resources" / "layerdesk.svg").is_file()
    assert len(list((internal / "resources" / "icons").glob("*.svg"))) >= 10
    assert (internal / "LICENSE").read_text(encoding="utf-8").startswith("                    GNU GENERAL PUBLIC")
    everything = [p.relative_to(frozen).as_posix() for p in frozen.rglob("*")]
    assert not [p for p in everything if "/translations/" in p or p.endswith(".qm")]
    assert not [p for p in everything if "QtQml" in p or "QtQuick" in p or "QtWebEngine" in p]
    assert not [p for p in everything if "/pytest" in p or "/_pytest" in p or "/hypothesis" in p]
    for name in ("layerdesk", "layerctl"):  # never UPX-compressed
        assert b"UPX!" not in Path(_exe(frozen, name)).read_bytes()


def test_the_installer_compiles_around_the_build_and_lists_its_files(frozen: Path, tmp_path: Path) -> None:
    if shutil.which("makensis") is None or shutil.which("7z") is None:
        pytest.skip("makensis or 7z is missing (tests/run.sh installs nsis and p7zip-full)")
    installer = tmp_path / "LayerDesk-setup.exe"
    built = _run(["bash", str(ROOT / "installer" / "build.sh"), str(frozen), str(installer)], timeout=1500,
                 env={"NSIS_COMPRESSOR": "none"})  # the contents are checked, not the compression
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    assert installer.read_bytes()[:2] == b"MZ"
    listing = _run(["7z", "l", str(installer)], timeout=300)
    assert listing.returncode == 0, listing.stderr
    assert "Type = Nsis" in listing.stdout
    names = {line.split()[-1] for line in listing.stdout.splitlines() if line[:4].isdigit() or line.startswith(" ")}
    suffix = ".exe" if os.name == "nt" else ""
    assert {f"layerdesk{suffix}", f"layerctl{suffix}", "_internal/LICENSE", "_internal/resources/layerdesk.svg",
            "_internal/base_library.zip"} <= names


def test_the_windows_version_resource_says_which_version(tmp_path: Path) -> None:
    """PyInstaller reads the file only on Windows (its reader needs win32api), so it is checked here as
    the Python expression it is: a VSVersionInfo call with the numbers and strings Windows shows."""
    import ast
    import tomllib

    target = tmp_path / "version.txt"
    done = _run([sys.executable, str(ROOT / "packaging" / "version_resource.py"), str(target), "--exe", "layerctl",
                 "--description", "LayerDesk command line"], timeout=60)
    assert done.returncode == 0, done.stderr
    version = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
    tree = ast.parse(target.read_text(encoding="utf-8"), mode="eval").body
    assert isinstance(tree, ast.Call) and isinstance(tree.func, ast.Name) and tree.func.id == "VSVersionInfo"
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)]
    strings = dict(ast.literal_eval(ast.Tuple(node.args, ast.Load())) for node in calls
                   if node.func.id == "StringStruct")
    assert strings["FileVersion"] == strings["ProductVersion"] == version
    assert (strings["OriginalFilename"], strings["FileDescription"]) == ("layerctl.exe", "LayerDesk command line")
    fixed = next(node for node in calls if node.func.id == "FixedFileInfo")
    filevers = ast.literal_eval(next(k.value for k in fixed.keywords if k.arg == "filevers"))
    numbers = [int(n) for n in version.split(".")]
    assert filevers == tuple(numbers + [0] * (4 - len(numbers)))
