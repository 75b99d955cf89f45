"""The support log bundle: one zip file with what a support engineer needs to understand a problem, and no
secret.

It holds the home's log files, the tasks with their logs (from the catalog), the versions of LayerDesk,
Python, its libraries and the engine tools, the settings, the directory junctions and connector
configurations, and the catalog's schema version and row counts. Secrets are kept out three ways: the
objects are read through views that carry no password; any field whose name looks like a password, token
or key is replaced; and every secret this installation keeps in the keyring, plus anything written as
``password=…`` in a log line, is blanked out of every text before it is written.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import platform
import re
import sys
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from sqlalchemy import select

from app import __version__
from app.catalog.models import ConnectorConfig, DirectoryJunction, Task, TaskLogLine
from app.errors import EnvironmentProblem, LayerDeskError, ValidationError
from app.services.rbac import Operation
from app.services.views import to_jsonable
from app.tasks.base import LayerDeskTask, TaskContext, TaskResult

if TYPE_CHECKING:
    from app.services import Services

log = logging.getLogger(__name__)

REMOVED = "[removed]"
#: Field names whose values are never written (case-insensitive, anywhere in the name).
SECRET_FIELD = re.compile(r"pass(word|wd|phrase)?|pwd|secret|token|credential|api[_-]?key|private[_-]?key|"
                          r"auth(orization)?$|cookie|session", re.IGNORECASE)
#: ``password=…``, ``token: …`` and the like inside free text (log lines, scripts).
SECRET_TEXT = re.compile(r"(?i)\b(pass(?:word|wd|phrase)?|pwd|secret|token|api[_-]?key|authorization)"
                         r"(\s*[:=]\s*|\s+)(\"[^\"]*\"|'[^']*'|\S+)")
#: The libraries whose versions go into the bundle.
LIBRARIES = ("SQLAlchemy", "click", "keyring", "platformdirs", "psutil", "ldap3", "PySide6", "qasync", "smbprotocol",
             "regipy")
#: Newest tasks (with their log lines) put into the bundle.
MAX_TASKS = 500


def scrub(value: Any) -> Any:
    """``value`` (JSON-like) with every field whose name looks secret replaced by ``[removed]``."""
    if isinstance(value, dict):
        return {k: (REMOVED if SECRET_FIELD.search(str(k)) and v not in (None, "", False)
                    and not isinstance(v, bool) else scrub(v)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [scrub(v) for v in value]
    return value


def scrub_text(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every known secret and every ``password=…``-like value blanked out."""
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = text.replace(secret, REMOVED)
    return SECRET_TEXT.sub(lambda m: f"{m[1]}{m[2]}{REMOVED}", text)


@dataclass(frozen=True)
class BundleResult:
    """What ``layerctl logs bundle`` wrote."""

    path: str
    members: tuple[str, ...]
    bytes: int


def _known_secrets(services: Services) -> list[str]:
    """This installation's secrets from the keyring (to blank them wherever they might appear)."""
    names = ["session"]
    with services.catalog.read() as session:
        names += [f"connector/{i}" for i in session.scalars(select(ConnectorConfig.id))]
        names += [f"directory/{i}" for i in session.scalars(select(DirectoryJunction.id))]
    found: list[str] = []
    for name in names:
        try:
            value = services.secrets.get(name)
        except LayerDeskError:
            return found  # no keyring: nothing of it can be in the catalog or logs either
        if value:
            found.append(value)
    return found


def _versions(services: Services) -> dict[str, Any]:
    libraries: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            libraries[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            libraries[name] = None
    tools = [to_jsonable(t) for t in services.repository.engine_tools()]
    return {"layerdesk": __version__, "python": sys.version, "platform": platform.platform(),
            "libraries": libraries, "engine_tools": tools}


def _catalog(services: Services) -> dict[str, Any]:
    from app.catalog.migrations import SCHEMA_VERSION
    from app.services.backup import catalog_facts

    facts = catalog_facts(services.home.catalog)
    return {"schema_version": facts.schema_version, "schema_version_of_this_layerdesk": SCHEMA_VERSION,
            "row_counts": facts.counts, "size_bytes": services.catalog.size_bytes()}


def _tasks(services: Services) -> list[dict[str, Any]]:
    tasks = []
    with services.catalog.read() as session:
        rows = session.scalars(select(Task).order_by(Task.id.desc()).limit(MAX_TASKS)).all()
        for row in rows:
            lines = session.execute(select(TaskLogLine.at, TaskLogLine.level, TaskLogLine.text)
                                    .where(TaskLogLine.task_id == row.id).order_by(TaskLogLine.id)).all()
            tasks.append({
                "id": row.id, "kind": row.kind, "title": row.title, "state": row.state.value,
                "progress": row.progress, "message": row.message, "error": row.error, "result": row.result,
                "started_by": row.started_by, "created_at": row.created_at, "started_at": row.started_at,
                "ended_at": row.ended_at,
                "log": [f"{at.isoformat()} {level} {text}" for at, level, text in lines],
            })
    return tasks


def bundle_target(to: Path | str) -> Path:
    """The checked place of a new bundle: a ``.zip`` file that does not exist yet, in an existing folder."""
    path = Path(to).expanduser().absolute()
    if path.suffix.lower() != ".zip":
        raise ValidationError(f"{path} does not end in .zip; name the bundle FILE.zip.")
    if path.exists():
        raise ValidationError(f"{path} exists already; choose a new file name.")
    if not path.parent.is_dir():
        raise ValidationError(f"The folder {path.parent} does not exist; create it or choose another place.")
    return path


def write_log_bundle(services: Services, to: Path | str, *,
                     progress: Callable[[float, str], None] | None = None) -> BundleResult:
    """Write the support bundle to the zip file ``to`` (written beside it and renamed when complete).
    Read-only for the catalog; Administrator only (it shows every configuration). Returns what was written."""
    services.caller.require(Operation.SUPPORT_BUNDLE)
    path = bundle_target(to)
    progress = progress or (lambda _percent, _message: None)
    progress(5, "Collecting versions, settings and configurations")
    known = _known_secrets(services)
    documents: dict[str, Any] = {
        "bundle.json": {"made_at": datetime.now(UTC), "made_by": services.caller.username,
                        "home": str(services.home.root)},
        "versions.json": _versions(services),
        "settings.json": services.settings.list_settings(),
        "directory_junctions.json": services.directory.list_junctions(),
        "connectors.json": services.connectors.list_connectors(),
        "catalog.json": _catalog(services),
        "tasks.json": _tasks(services),
    }
    work = path.with_name(f".{path.name}.partial")
    members = []
    try:
        progress(50, "Writing the bundle")
        with zipfile.ZipFile(work, "w", compression=zipfile.ZIP_DEFLATED) as bundle:
            for name, document in documents.items():
                text = json.dumps(scrub(to_jsonable(document)), indent=1, ensure_ascii=False, default=str)
                bundle.writestr(name, scrub_text(text, known))
                members.append(name)
            logs = services.home.logs
            for log_file in sorted(logs.glob("*.log*")) if logs.is_dir() else []:
                if not log_file.is_file():
                    continue
                text = log_file.read_text(encoding="utf-8", errors="replace")
                name = f"logs/{log_file.name}"
                bundle.writestr(name, scrub_text(text, known))
                members.append(name)
        work.replace(path)
    except OSError as exc:
        work.unlink(missing_ok=True)
        raise EnvironmentProblem(f"Cannot write the log bundle {path}: {exc.strerror or exc}. Nothing was "
                                 "left there.") from None
    except BaseException:
        work.unlink(missing_ok=True)
        raise
    log.info("support bundle written to %s (%d members)", path, len(members))
    return BundleResult(str(path), tuple(members), path.stat().st_size)


@dataclass(frozen=True)
class BundleTaskResult(TaskResult):
    """What a :class:`LogBundleTask` wrote."""

    path: str = ""
    bytes: int = 0


class LogBundleTask(LayerDeskTask):
    """:func:`write_log_bundle` as a task (the console runs it so, with its progress)."""

    kind: ClassVar[str] = "support.bundle"

    def __init__(self, services: Services, to: Path | str) -> None:
        self._services = services
        self.target = bundle_target(to)
        super().__init__(f"Write the support bundle {self.target}")

    def prepare(self) -> None:
        self._services.caller.require(Operation.SUPPORT_BUNDLE)

    def run(self, ctx: TaskContext) -> TaskResult:
        ctx.cancel.raise_if_cancelled()
        result = write_log_bundle(self._services, self.target, progress=ctx.progress)
        return BundleTaskResult(summary=f"Wrote the support bundle {result.path} ({result.bytes} bytes).",
                                path=result.path, bytes=result.bytes)
