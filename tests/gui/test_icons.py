"""Every icon the console ships is a valid SVG that Qt renders at the sizes a high-DPI screen asks for."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest
from PySide6.QtCore import QSize
from PySide6.QtWidgets import QApplication

from ui.icons import ICONS, icon, icon_names

NEEDED = {"layers", "templates", "tasks", "system", "audit", "publish", "import", "new", "delete", "cancel", "edit",
          "clone", "history", "priority", "users", "storage", "connectors", "directory", "refresh"}


def test_the_icon_set_is_complete() -> None:
    assert set(icon_names()) >= NEEDED


@pytest.mark.parametrize("name", sorted(NEEDED))
def test_each_icon_renders_at_every_size(qapp: QApplication, name: str) -> None:
    root = ET.parse(ICONS / f"{name}.svg").getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg" and root.get("viewBox") == "0 0 24 24"
    for size in (16, 24, 32, 48, 64):
        image = icon(name).pixmap(QSize(size, size)).toImage()
        assert image.width() == size
        painted = sum(image.pixelColor(x, y).alpha() > 0 for x in range(size) for y in range(size))
        assert painted > size, f"{name} at {size} px is (almost) empty"


def test_an_unknown_icon_is_an_error() -> None:
    with pytest.raises(KeyError, match="no icon 'nope'"):
        icon("nope")
