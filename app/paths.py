"""Where LayerDesk keeps its files: one place decides, everybody asks here.

The *home* holds the catalog, the layer repository, logs and catalog backups. It defaults to the
user's data folder (platformdirs) and is overridden by ``--home DIR`` or ``LAYERDESK_HOME``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from app.errors import EnvironmentProblem

APP_NAME = "LayerDesk"
HOME_ENV = "LAYERDESK_HOME"


@dataclass(frozen=True)
class Home:
    """The folders of one LayerDesk installation (an *embedded default* or a chosen home)."""

    root: Path

    @property
    def catalog(self) -> Path:
        return self.root / "catalog.sqlite"

    @property
    def repository(self) -> Path:
        return self.root / "repository"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def backups(self) -> Path:
        return self.root / "backups"

    @property
    def layer_cache(self) -> Path:
        """The layer disk cache: ready-to-merge layer volumes, the OS layers' hive files and the composites
        re-publishes start from (bounded by the ``layer_cache_gb`` setting)."""
        return self.root / "cache" / "layers"

    @property
    def work(self) -> Path:
        """Files a task makes and removes again: a packaging disk on its way to a connector, a disk fetched
        back from one to be finalized."""
        return self.root / "work"

    def ensure(self) -> Home:
        """Create the home's folders (idempotent) and return self."""
        try:
            for folder in (self.root, self.repository, self.logs, self.backups):
                folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EnvironmentProblem(
                f"Cannot create the LayerDesk home folder {self.root}: {exc.strerror or exc}. "
                f"Choose another folder with --home or {HOME_ENV}."
            ) from exc
        return self


def default_root() -> Path:
    """The embedded default: the user's data folder for LayerDesk."""
    return Path(platformdirs.user_data_dir(APP_NAME, appauthor=False, roaming=False))


def resolve_home(explicit: str | os.PathLike[str] | None = None) -> Home:
    """Pick the home: an explicit folder, else ``LAYERDESK_HOME``, else the user's data folder."""
    if explicit:
        return Home(Path(explicit).expanduser().resolve())
    from_env = os.environ.get(HOME_ENV)
    if from_env:
        return Home(Path(from_env).expanduser().resolve())
    return Home(default_root())
