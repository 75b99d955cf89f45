"""``layerdesk``: start the console on the embedded default (or ``--home DIR``)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from types import TracebackType

import psutil
from PySide6.QtCore import QTimer
from PySide6.QtGui import QIcon
from PySide6.QtWidgets import QApplication, QMessageBox

from app import __version__
from app.errors import AuthenticationFailed, LayerDeskError
from app.logs import setup_logging
from app.paths import resolve_home
from app.services import Services, open_catalog, resolve_caller
from ui.background import off_ui_thread

log = logging.getLogger(__name__)
RESOURCES = Path(__file__).resolve().parent.parent / "resources"


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="layerdesk", description="LayerDesk console")
    parser.add_argument("--home", metavar="DIR", help="LayerDesk home (default: your data folder or LAYERDESK_HOME)")
    parser.add_argument("--smoke", action="store_true",
                        help="Start, load the first page, then quit with status 0 (for build checks).")
    parser.add_argument("--version", action="version", version=f"LayerDesk {__version__}")
    return parser.parse_args(argv)


def _seconds_since_process_start() -> float:
    """Seconds since this process started. On Linux from /proc (psutil's start time derives from the
    boot time in whole seconds, so it can be off by up to a second); elsewhere psutil's."""
    if sys.platform.startswith("linux"):
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime, in clock ticks since boot
        return time.clock_gettime(time.CLOCK_BOOTTIME) - started
    return time.time() - psutil.Process().create_time()


def _install_crash_dialog(log_path: str) -> None:
    def hook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        log.critical("unhandled error", exc_info=(kind, value, tb))
        excerpt = "".join(traceback.format_exception(kind, value, tb))[-2000:]
        box = QMessageBox(QMessageBox.Icon.Critical, "LayerDesk – internal error",
                          f"LayerDesk hit a bug: {kind.__name__}: {value}\n\nThe full log is in {log_path}.")
        box.setDetailedText(excerpt)
        box.exec()

    sys.excepthook = hook


async def _start(app: QApplication, args: argparse.Namespace) -> int:
    from ui.main_window import MainWindow
    from ui.sign_in import SignInDialog

    home = resolve_home(args.home).ensure()
    log_path = setup_logging(home.logs)
    _install_crash_dialog(str(log_path))
    loop = asyncio.get_running_loop()
    try:
        catalog, secrets = await off_ui_thread(open_catalog, home)
    except LayerDeskError as exc:
        QMessageBox.critical(None, "LayerDesk cannot start", str(exc))
        return 1
    try:
        caller = await off_ui_thread(resolve_caller, home, catalog, secrets)
    except AuthenticationFailed:
        dialog = SignInDialog(catalog)
        dialog.open()
        finished: asyncio.Future[int] = loop.create_future()
        dialog.finished.connect(lambda code: finished.done() or finished.set_result(code))
        if not await finished or dialog.caller is None:
            return 0
        caller = dialog.caller
    window = MainWindow(Services.for_caller(home, catalog, caller, secrets), remember=not args.smoke)
    window.show()
    args.shown_after = _seconds_since_process_start()
    log.info("console window shown %.2f s after the process started", args.shown_after)
    closed: asyncio.Future[None] = loop.create_future()
    app.lastWindowClosed.connect(lambda: closed.done() or closed.set_result(None))
    if args.smoke:
        page = window.current_page()
        page.loaded.connect(lambda _rows: QTimer.singleShot(0, window.close))
        page.failed.connect(lambda _msg: QTimer.singleShot(0, window.close))
    await closed
    catalog.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parse(list(sys.argv[1:] if argv is None else argv))
    import qasync

    app = QApplication.instance() or QApplication(sys.argv[:1])
    app.setApplicationName("LayerDesk")
    app.setOrganizationName("LayerDesk")
    app.setApplicationVersion(__version__)
    app.setWindowIcon(QIcon(str(RESOURCES / "layerdesk.svg")))
    app.setQuitOnLastWindowClosed(False)
    status = qasync.run(_start(app, args))
    if args.smoke:
        shown = getattr(args, "shown_after", None)
        timing = f" (window shown {shown:.2f} s after start)" if shown is not None else ""
        print(f"LayerDesk console smoke run: ok{timing}" if status == 0 else "LayerDesk console smoke run: FAILED")
    return int(status)


if __name__ == "__main__":
    sys.exit(main())
