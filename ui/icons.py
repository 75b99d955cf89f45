"""The console's icons: SVG files in ``resources/icons`` (sharp at any scale, so high-DPI screens get crisp
icons), loaded once each."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from PySide6.QtGui import QIcon

ICONS = Path(__file__).resolve().parent.parent / "resources" / "icons"


def icon_names() -> list[str]:
    return sorted(path.stem for path in ICONS.glob("*.svg"))


@cache
def icon(name: str) -> QIcon:
    """The icon ``name`` (``layers``, ``publish``, …); an unknown name is a programming error."""
    path = ICONS / f"{name}.svg"
    if not path.is_file():
        raise KeyError(f"no icon {name!r} in {ICONS}")
    return QIcon(str(path))
