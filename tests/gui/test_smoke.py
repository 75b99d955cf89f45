"""`layerdesk --smoke` (what packaging and CI run): a fresh home gets its catalog, the window shows the
first page, and the process exits 0 saying so."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path


def test_smoke_run_on_a_fresh_home(tmp_path: Path) -> None:
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "PYTHON_KEYRING_BACKEND": "keyring.backends.null.Keyring"}
    home = tmp_path / "home"
    done = subprocess.run([sys.executable, "-m", "ui.main", "--smoke", "--home", str(home)], capture_output=True,
                          text=True, timeout=120, env=env, cwd=Path(__file__).parents[2], check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"smoke run: ok \(window shown \d+\.\d\d s after start\)", done.stdout), done.stdout
    assert (home / "catalog.sqlite").is_file() and (home / "repository").is_dir()
    assert not (home / "console.ini").exists()  # a smoke run remembers no window state
