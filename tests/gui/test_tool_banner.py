"""The console's start-up check of the engine's tools: a banner says which operations are unavailable on
this machine and why, before anyone tries one; nothing is shown when every tool is there."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from pytestqt.qtbot import QtBot

from app.services import Services
from tests.unit.test_engine_tools import _path_without
from ui.main_window import MainWindow
from ui.tool_banner import EngineToolsBanner


def test_nothing_is_shown_when_every_tool_is_there(qtbot: QtBot, event_loop: asyncio.AbstractEventLoop,
                                                   admin: Services) -> None:
    banner = EngineToolsBanner(admin)
    qtbot.addWidget(banner)
    banner.show()
    with qtbot.waitSignal(banner.checked, timeout=30000) as checked:
        banner.check()
    assert checked.args == [[]] and not banner.isVisible()


def test_the_main_window_names_what_is_unavailable_and_why(
        qtbot: QtBot, event_loop: asyncio.AbstractEventLoop, admin: Services, monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    _path_without(monkeypatch, tmp_path, "qemu-img")
    window = MainWindow(admin, remember=False)
    qtbot.addWidget(window)
    window.show()
    qtbot.waitUntil(window.tools_banner.isVisible, timeout=30000)
    text = window.tools_banner.text.text()
    assert ("Importing disk images and publishing VHD, VHDX, VMDK, qcow2 and raw disks: needs <b>qemu-img</b> – "
            "The program 'qemu-img' was not found on this machine.") in text
    assert "WIM" not in text  # WIM images need wimlib only, which is there
    window.tools_banner.dismiss.click()
    assert not window.tools_banner.isVisible()
    window.close()
