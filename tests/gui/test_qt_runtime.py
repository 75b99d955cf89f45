"""The Qt binding LayerDesk runs on must not leak references when Python code emits signals: PySide6
6.12.0 drops one reference to ``True`` per emit, and after a few thousand emits the interpreter aborts
("bool_dealloc"). Run in a child process so a bad binding fails this test instead of the whole run."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys
from PySide6.QtCore import QObject, Signal
class Emitter(QObject):
    changed = Signal()
    counted = Signal(int)
emitter = Emitter()
before = sys.getrefcount(True)
for n in range(500):
    emitter.changed.emit()
    emitter.counted.emit(n)
print(before - sys.getrefcount(True))
"""


def test_emitting_signals_from_python_leaks_no_references() -> None:
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.strip()) == 0, "the installed PySide6 leaks a reference per signal emit"
