"""Logging: one rotating log file per home, one logger per module, nothing secret ever logged."""

from __future__ import annotations

import logging
import logging.handlers
from pathlib import Path

LOG_FILE = "layerdesk.log"
_FORMAT = "%(asctime)s %(levelname)-7s %(process)d %(threadName)s %(name)s: %(message)s"


def setup_logging(logs_dir: Path, *, level: int = logging.INFO, stderr_level: int | None = None) -> Path:
    """Send LayerDesk's log records to ``logs_dir/layerdesk.log`` (rotated at 5 MB, 5 kept)."""
    logs_dir.mkdir(parents=True, exist_ok=True)
    path = logs_dir / LOG_FILE
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_layerdesk", False):
            root.removeHandler(handler)
            handler.close()
    file_handler = logging.handlers.RotatingFileHandler(path, maxBytes=5_000_000, backupCount=5, encoding="utf-8")
    file_handler.setFormatter(logging.Formatter(_FORMAT))
    file_handler._layerdesk = True  # type: ignore[attr-defined]
    root.addHandler(file_handler)
    if stderr_level is not None:
        console = logging.StreamHandler()
        console.setLevel(stderr_level)
        console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        console._layerdesk = True  # type: ignore[attr-defined]
        root.addHandler(console)
    root.setLevel(level)
    return path
