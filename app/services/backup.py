"""Backing up and restoring a LayerDesk home: the catalog and the layer repository objects it refers to.

A backup is a **folder**, not one archive file. The layer WIMs are compressed already, so an archive would
save nothing and cost a second full copy (and the disk space for it) on restore; a folder is written under a
temporary name and renamed when complete (one atomic step on its volume), is verified and copied file by file,
and can be moved or inspected with ordinary tools. Its layout::

    backup.json                                {"checksum": "sha256:…", "manifest": {…}} (see BackupManifest)
    catalog.sqlite                             the catalog snapshot (one file, no WAL)
    repository/layers/<layer>.wim              each layer WIM holding a version the snapshot says is stored
    repository/layers/<layer>/v<version>.json  the manifest of each of those versions

**Consistency while LayerDesk runs.** The catalog is copied first, with SQLite's backup API in one read
transaction (imports and publishes may be writing meanwhile). Then exactly what that snapshot names is copied
from the repository: WIMs are never changed in place (a rewrite is a rename), so an open WIM file is a
consistent object even if an import replaces it meanwhile. Images an import added after the snapshot are
removed from the copy; a version deleted after the snapshot makes the backup fail with a "start again".

**Restore** verifies everything before it replaces anything: the manifest and its checksum, the SHA-256 of
every file (while copying them beside the home), that the catalog opens and is healthy, and its schema (a
newer one is refused; an older one is migrated on the copy). Then the home's catalog and repository are moved
aside under ``backups/``, the verified ones moved in, and the moved-aside ones put back if that fails. The
replaced catalog is kept in ``backups/``; the replaced repository is deleted once the restore succeeded.
Secrets are in the OS keyring, never in a backup.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import secrets
import shutil
import sqlite3
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from sqlalchemy import select

from app import __version__
from app.catalog.database import Catalog
from app.catalog.migrations import APPLICATION_ID, SCHEMA_VERSION
from app.catalog.models import FINAL_TASK_STATES, Task
from app.errors import CatalogError, Conflict, EnvironmentProblem, LayerDeskError, PermissionDenied, ValidationError
from app.files import fsync_dir, write_atomic
from app.paths import Home
from app.services.base import Service, ServiceContext
from app.services.rbac import Operation
from app.services.settings import INSTALLATION_ID
from app.services.validation import validate_comment
from app.tasks.base import CancelToken, LayerDeskTask, TaskContext, TaskResult

if TYPE_CHECKING:
    from app.engine.repository import LayerRepository
    from app.services import Services
    from app.tasks.runner import TaskRunner

log = logging.getLogger(__name__)

BACKUP_FORMAT = "layerdesk.backup"
BACKUP_FORMAT_VERSION = 1
MANIFEST_FILE = "backup.json"
CATALOG_FILE = "catalog.sqlite"
REPOSITORY_FOLDER = "repository"
#: Written into a restore's staging folder once everything in it is verified.
VERIFIED_FILE = "verified.json"
_CHUNK = 1024 * 1024
RESTORE_STAGING_PREFIX = ".restore-"

SECRETS_NOTE = (
    "Connector and directory junction passwords are kept in the OS keyring, never in a backup: if the backup "
    "was made on another machine (or this machine's keyring was reset), enter them again "
    "(`layerctl connector update` / `layerctl directory update`, or in the console)."
)


# --- the manifest ------------------------------------------------------------------------------------------


def _canonical(document: Any) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def seal_manifest(document: Mapping[str, Any]) -> bytes:
    """``backup.json``'s bytes for the manifest ``document``: the document with the SHA-256 of its canonical
    JSON (sorted keys, no blanks, UTF-8), so a changed byte anywhere in it is noticed."""
    checksum = "sha256:" + hashlib.sha256(_canonical(document)).hexdigest()
    return (json.dumps({"checksum": checksum, "manifest": document}, indent=1, sort_keys=True,
                       ensure_ascii=False) + "\n").encode("utf-8")


def read_manifest(folder: Path) -> tuple[dict[str, Any], str]:
    """The verified manifest of the backup in ``folder`` and its checksum. :class:`ValidationError` when
    ``folder`` is no backup; :class:`EnvironmentProblem` when its manifest is damaged or from a newer format."""
    path = folder / MANIFEST_FILE
    if not folder.is_dir():
        raise ValidationError(f"{folder} is not a folder: name the folder a LayerDesk backup was written to.")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ValidationError(f"{folder} is not a LayerDesk backup (it has no {MANIFEST_FILE}).") from None
    except OSError as exc:
        raise EnvironmentProblem(f"Cannot read {path}: {exc.strerror or exc}.") from None
    damaged = f"The backup's manifest {path} is damaged"
    try:
        outer = json.loads(raw)
        document = outer["manifest"]
        stated = outer["checksum"]
    except (ValueError, KeyError, TypeError):
        raise EnvironmentProblem(f"{damaged} (it is not a backup manifest). Use another backup.") from None
    if not isinstance(document, dict) or "sha256:" + hashlib.sha256(_canonical(document)).hexdigest() != stated:
        raise EnvironmentProblem(f"{damaged}: its content does not match its checksum. Use another backup.")
    if document.get("format") != BACKUP_FORMAT:
        raise ValidationError(f"{folder} is not a LayerDesk backup (format {document.get('format')!r}).")
    if document.get("format_version") != BACKUP_FORMAT_VERSION:
        raise EnvironmentProblem(
            f"The backup {folder} has format version {document.get('format_version')!r}; this LayerDesk reads "
            f"version {BACKUP_FORMAT_VERSION}. Restore it with the LayerDesk version that made it.")
    files = document.get("files")
    if not isinstance(files, dict) or CATALOG_FILE not in files:
        raise EnvironmentProblem(f"{damaged}: it lists no catalog. Use another backup.")
    for name, entry in files.items():
        parts = Path(name).parts
        if (Path(name).is_absolute() or ".." in parts or not (name == CATALOG_FILE or parts[:2] == (
                REPOSITORY_FOLDER, "layers")) or not isinstance(entry, dict)
                or not isinstance(entry.get("sha256"), str) or not isinstance(entry.get("bytes"), int)):
            raise EnvironmentProblem(f"{damaged}: it lists an unexpected file {name!r}. Use another backup.")
    return document, str(stated)


# --- the catalog snapshot ----------------------------------------------------------------------------------


def snapshot_catalog(source: Path, target: Path) -> None:
    """Copy the catalog at ``source`` to ``target`` as one consistent snapshot (SQLite's backup API, in one
    read transaction, safe while other connections write) and make the copy a single file (no WAL)."""
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=15.0)
    try:
        dest = sqlite3.connect(target)
        try:
            src.backup(dest)
            dest.execute("PRAGMA journal_mode = DELETE")
        finally:
            dest.close()
    finally:
        src.close()


@dataclass(frozen=True)
class CatalogFacts:
    """What a catalog file says of itself (read without changing it)."""

    schema_version: int
    application_id: int
    installation_id: str
    #: Rows per table.
    counts: dict[str, int]
    #: Stored layer versions: ``{layer_id: {version_id: checksum}}``.
    stored: dict[int, dict[int, str]]


def catalog_facts(path: Path, *, check: bool = False) -> CatalogFacts:
    """Read ``path``'s schema version, ids, row counts and stored versions (read-only). ``check``: run
    SQLite's integrity check too. Raises :class:`sqlite3.Error` for what is not a readable catalog."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        if check:
            problems = [str(r[0]) for r in conn.execute("PRAGMA integrity_check") if r[0] != "ok"]
            if problems:
                raise sqlite3.DatabaseError("; ".join(problems[:5]))
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        app_id = int(conn.execute("PRAGMA application_id").fetchone()[0])
        tables = [r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")]
        counts = {t: int(conn.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0]) for t in tables}  # noqa: S608 - names from sqlite_master
        stored: dict[int, dict[int, str]] = {}
        install = ""
        if "layer_version" in tables:
            for version_id, layer_id, checksum in conn.execute(
                    "SELECT id, layer_id, checksum FROM layer_version WHERE checksum IS NOT NULL AND checksum != ''"):
                stored.setdefault(int(layer_id), {})[int(version_id)] = str(checksum)
        if "setting" in tables:
            row = conn.execute("SELECT value FROM setting WHERE key = ?", (INSTALLATION_ID,)).fetchone()
            if row is not None:
                install = str(json.loads(row[0])) if isinstance(row[0], str) else str(row[0])
        return CatalogFacts(version, app_id, install, counts, stored)
    finally:
        conn.close()


# --- copying with checksums --------------------------------------------------------------------------------


def _copy(source: Path, target: Path, cancel: CancelToken, advance: Callable[[int], None]) -> tuple[str, int]:
    """Copy ``source`` to the new file ``target`` (synced); return the SHA-256 and size of what was read."""
    digest = hashlib.sha256()
    size = 0
    target.parent.mkdir(parents=True, exist_ok=True)
    with source.open("rb") as src, target.open("xb") as dst:
        while chunk := src.read(_CHUNK):
            cancel.raise_if_cancelled()
            dst.write(chunk)
            digest.update(chunk)
            size += len(chunk)
            advance(len(chunk))
        dst.flush()
        os.fsync(dst.fileno())
    return "sha256:" + digest.hexdigest(), size


def _hash(path: Path, cancel: CancelToken) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            cancel.raise_if_cancelled()
            digest.update(chunk)
            size += len(chunk)
    return "sha256:" + digest.hexdigest(), size


def _disk_problem(exc: OSError, where: Path, doing: str, outcome: str) -> EnvironmentProblem:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return EnvironmentProblem(f"The disk holding {where} is full: {doing} needs more space. Free some space "
                                  f"or choose another place; {outcome}")
    return EnvironmentProblem(f"{doing[0].upper()}{doing[1:]} failed at {where}: {exc.strerror or exc}. {outcome}")


def _sqlite_problem(exc: sqlite3.Error, where: Path, doing: str, outcome: str) -> EnvironmentProblem:
    if "full" in str(exc).lower():
        return _disk_problem(OSError(errno.ENOSPC, "disk full"), where, doing, outcome)
    return EnvironmentProblem(f"{doing[0].upper()}{doing[1:]} failed: {exc}. {outcome}")


class _Progress:
    """Byte progress of a copy mapped onto ``start``–``end`` %, reported a few times a second at most by
    the runner."""

    def __init__(self, ctx: TaskContext, total: int, start: float, end: float, message: str) -> None:
        self.ctx, self.total, self.start, self.end, self.message = ctx, max(total, 1), start, end, message
        self.done = 0

    def __call__(self, count: int) -> None:
        self.done += count
        share = min(1.0, self.done / self.total)
        self.ctx.progress(self.start + (self.end - self.start) * share, self.message)


# --- results -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackupResult(TaskResult):
    """What a finished backup wrote."""

    path: str = ""
    files: int = 0
    bytes: int = 0
    schema_version: int = 0
    layer_versions: int = 0
    manifest_checksum: str = ""
    #: Versions the catalog says are stored but the repository lacked (already damaged before the backup).
    missing: tuple[str, ...] = ()


@dataclass(frozen=True)
class RestoreStaged(TaskResult):
    """A verified backup copied beside the home, ready for :meth:`BackupService.complete_restore`."""

    staging: str = ""
    source: str = ""
    created_at: str = ""
    created_by: str = ""
    layerdesk_version: str = ""
    schema_version: int = 0
    files: int = 0
    bytes: int = 0


@dataclass(frozen=True)
class RestoreReport:
    """What a completed restore did."""

    source: str
    created_at: str
    created_by: str
    schema_from: int
    schema_now: int
    counts: dict[str, int]
    #: The catalog the restore replaced, kept in the backups folder.
    replaced_catalog: str
    other_installation: bool
    notes: tuple[str, ...] = field(default_factory=tuple)


# --- the tasks ---------------------------------------------------------------------------------------------


class BackupTask(LayerDeskTask):
    """Writes a backup folder under a temporary name and renames it when complete (see the module docstring);
    a failed or cancelled backup leaves nothing."""

    kind: ClassVar[str] = "home.backup"

    def __init__(self, service: BackupService, target: Path, comment: str) -> None:
        super().__init__(f"Back up LayerDesk to {target}")
        self._service = service
        self.home = service.home
        self.target = target
        self.comment = comment
        self.work = target.parent / f".{target.name}.partial-{secrets.token_hex(4)}"

    def run(self, ctx: TaskContext) -> TaskResult:
        outcome = "nothing was left there."
        try:
            try:
                result = self._write(ctx)
            except OSError as exc:
                raise _disk_problem(exc, self.target.parent, "the backup", outcome) from None
            except sqlite3.Error as exc:
                raise _sqlite_problem(exc, self.target.parent, "the catalog snapshot", outcome) from None
            if self.target.exists():
                raise Conflict(f"{self.target} appeared while the backup ran; {outcome} Choose another name.")
            self.work.rename(self.target)
            fsync_dir(self.target.parent)
        except BaseException:
            shutil.rmtree(self.work, ignore_errors=True)
            raise
        try:
            self._service.record_backup(result, comment=self.comment)
        except BaseException:
            shutil.rmtree(self.target, ignore_errors=True)
            raise
        ctx.progress(100, result.summary)
        return result

    def _write(self, ctx: TaskContext) -> BackupResult:
        from app.engine.repository import LayerRepository

        self.work.mkdir(parents=True)
        ctx.progress(0, "Taking a snapshot of the catalog")
        catalog_copy = self.work / CATALOG_FILE
        snapshot_catalog(self.home.catalog, catalog_copy)
        facts = catalog_facts(catalog_copy)
        ctx.log(f"Catalog snapshot taken (schema {facts.schema_version}, "
                f"{sum(len(v) for v in facts.stored.values())} stored layer version(s)).")
        files: dict[str, dict[str, Any]] = {}
        checksum, size = _hash(catalog_copy, ctx.cancel)
        files[CATALOG_FILE] = {"sha256": checksum, "bytes": size}

        live = LayerRepository(self.home.repository)
        copy = LayerRepository(self.work / REPOSITORY_FOLDER)
        wims = {layer: live.wim_path(layer) for layer in facts.stored}
        total = sum(p.stat().st_size for p in wims.values() if p.exists())
        progress = _Progress(ctx, total, 5, 95, "Copying the layer repository")
        missing: list[str] = []
        for layer_id, versions in sorted(facts.stored.items()):
            kept = self._copy_layer(ctx, live, copy, layer_id, versions, progress, missing)
            for version_id in sorted(kept):
                rel = copy.manifest_path(layer_id, version_id).relative_to(self.work).as_posix()
                files[rel] = dict(zip(("sha256", "bytes"), _hash(self.work / rel, ctx.cancel), strict=True))
            wim = copy.wim_path(layer_id)
            if wim.exists():
                files[wim.relative_to(self.work).as_posix()] = dict(
                    zip(("sha256", "bytes"), _hash(wim, ctx.cancel), strict=True))
        ctx.cancel.raise_if_cancelled()
        ctx.progress(97, "Writing the manifest")
        document = {
            "format": BACKUP_FORMAT,
            "format_version": BACKUP_FORMAT_VERSION,
            "schema_version": facts.schema_version,
            "layerdesk_version": __version__,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "created_by": self._service.caller.username,
            "installation_id": facts.installation_id,
            "counts": facts.counts,
            "files": dict(sorted(files.items())),
        }
        body = seal_manifest(document)
        write_atomic(self.work / MANIFEST_FILE, body)
        fsync_dir(self.work)
        total_bytes = sum(int(f["bytes"]) for f in files.values())
        stored = sum(len(v) for v in facts.stored.values()) - len(missing)
        summary = (f"Backed up the catalog and {stored} stored layer version(s) ({total_bytes} bytes, "
                   f"{len(files)} files) to {self.target}.")
        state = TaskResult().state
        if missing:
            from app.catalog.models import TaskState

            state = TaskState.DONE_WITH_ERRORS
            summary += (f" {len(missing)} version(s) the catalog names were already missing from the repository "
                        f"and are not in the backup ({', '.join(missing)}); `layerctl repo check` lists them.")
        outer = json.loads(body)
        return BackupResult(summary=summary, state=state, path=str(self.target), files=len(files), bytes=total_bytes,
                            schema_version=facts.schema_version, layer_versions=stored,
                            manifest_checksum=str(outer["checksum"]), missing=tuple(missing))

    def _copy_layer(
        self, ctx: TaskContext, live: LayerRepository, copy: LayerRepository, layer_id: int,
        versions: Mapping[int, str], progress: _Progress, missing: list[str],
    ) -> set[int]:
        """Copy one layer's manifests (of ``versions``) and WIM, then drop from the copied WIM the images of
        versions the snapshot does not name. Returns the versions kept."""
        from app.engine import gold
        from app.engine.repository import RepositoryDamaged, image_name
        from app.engine.wim import Wim

        kept: set[int] = set()
        for version_id, checksum in sorted(versions.items()):
            source = live.manifest_path(layer_id, version_id)
            target = copy.manifest_path(layer_id, version_id)
            try:
                _copy(source, target, ctx.cancel, lambda _n: None)
            except FileNotFoundError:
                self._missing(layer_id, version_id, checksum, missing)
                continue
            try:
                copy.manifest(layer_id, version_id, checksum)
            except RepositoryDamaged:
                target.unlink()
                self._missing(layer_id, version_id, checksum, missing)
                continue
            kept.add(version_id)
        if not kept:
            return kept
        ctx.log(f"Copying layer {layer_id}: {len(kept)} version(s).")
        wim = copy.wim_path(layer_id)
        try:
            # Opened once: a WIM is replaced by a rename, never changed in place, so this is one consistent object.
            _copy(live.wim_path(layer_id), wim, ctx.cancel, progress)
        except FileNotFoundError:
            raise self._changed(layer_id) from None
        wanted = {image_name(v) for v in kept} | {image_name(v) + gold.BOOT_IMAGE_SUFFIX for v in kept}
        with Wim.open(wim) as layer_wim:
            names = {layer_wim.image_name(i): i for i in range(1, layer_wim.image_count + 1)}
            for version_id in kept:
                if image_name(version_id) not in names:
                    raise self._changed(layer_id)
            extra = sorted((i for name, i in names.items() if name not in wanted), reverse=True)
            if extra:
                ctx.log(f"Layer {layer_id}: leaving out {len(extra)} image(s) stored after the snapshot.")
                for index in extra:
                    layer_wim.delete_image(index)
                trimmed = wim.with_name(f".{wim.name}.trimmed")
                layer_wim.write(trimmed, check_integrity=True, fsync=True, cancel=ctx.cancel)
        if extra:
            trimmed.replace(wim)
        return kept

    def _missing(self, layer_id: int, version_id: int, checksum: str, missing: list[str]) -> None:
        """A snapshot version whose manifest is not in the repository: damage from before (the live catalog
        still has it) is reported and left out; a version deleted while the backup ran fails the backup."""
        from app.catalog.models import LayerVersion

        with self._service.catalog.read() as session:
            row = session.get(LayerVersion, version_id)
            still = row is not None and row.layer_id == layer_id and row.checksum == checksum
        if not still:
            raise self._changed(layer_id)
        log.warning("backup: layer %d version %d is in the catalog but not in the repository; left out",
                    layer_id, version_id)
        missing.append(f"layer {layer_id} version {version_id}")

    @staticmethod
    def _changed(layer_id: int) -> EnvironmentProblem:
        return EnvironmentProblem(f"Layer {layer_id} changed while the backup ran (a version was deleted); "
                                  "nothing was left. Start the backup again.")


class RestoreTask(LayerDeskTask):
    """Verifies a backup and copies it beside the home (``.restore-…``), migrating an older catalog there;
    replaces nothing. On failure or cancel, nothing is left."""

    kind: ClassVar[str] = "home.restore"

    def __init__(self, service: BackupService, source: Path, manifest: dict[str, Any], checksum: str) -> None:
        super().__init__(f"Verify the backup {source} for a restore")
        self._service = service
        self.home = service.home
        self.source = source
        self.manifest = manifest
        self.checksum = checksum
        self.staging = self.home.root / f"{RESTORE_STAGING_PREFIX}{secrets.token_hex(4)}"

    def run(self, ctx: TaskContext) -> TaskResult:
        outcome = "nothing was changed."
        try:
            try:
                return self._stage(ctx)
            except OSError as exc:
                raise _disk_problem(exc, self.home.root, "copying the backup beside the home", outcome) from None
        except BaseException:
            shutil.rmtree(self.staging, ignore_errors=True)
            raise

    def _stage(self, ctx: TaskContext) -> RestoreStaged:
        from app.engine.repository import LayerRepository, RepositoryDamaged

        files: dict[str, dict[str, Any]] = self.manifest["files"]
        for name in files:
            if not (self.source / name).is_file():
                raise EnvironmentProblem(f"The backup {self.source} is incomplete: {name} is missing. Nothing was "
                                         "changed; use another backup.")
        self.staging.mkdir()
        progress = _Progress(ctx, sum(int(f["bytes"]) for f in files.values()), 0, 90, "Verifying the backup")
        for name, entry in sorted(files.items()):
            checksum, size = _copy(self.source / name, self.staging / name, ctx.cancel, progress)
            if checksum != entry["sha256"] or size != entry["bytes"]:
                raise EnvironmentProblem(
                    f"The backup {self.source} is damaged: {name} does not match its checksum in {MANIFEST_FILE}. "
                    "Nothing was changed; use another backup.")
        ctx.log(f"All {len(files)} files of the backup match their checksums.")
        ctx.progress(92, "Checking the catalog")
        catalog = self.staging / CATALOG_FILE
        try:
            facts = catalog_facts(catalog, check=True)
        except sqlite3.Error as exc:
            raise CatalogError(f"The catalog in the backup {self.source} cannot be used ({exc}). Nothing was "
                               "changed; use another backup.") from None
        if facts.application_id != APPLICATION_ID or facts.schema_version < 1:
            raise CatalogError(f"The backup {self.source} holds no LayerDesk catalog. Nothing was changed.")
        if facts.schema_version > SCHEMA_VERSION:
            raise CatalogError(_newer_message(self.source, facts.schema_version))
        copy = LayerRepository(self.staging / REPOSITORY_FOLDER)
        for layer_id, versions in facts.stored.items():
            for version_id, checksum in versions.items():
                with contextlib.suppress(RepositoryDamaged):  # left out of the backup (see BackupResult.missing)
                    copy.manifest(layer_id, version_id, checksum)
        if facts.schema_version < SCHEMA_VERSION:
            ctx.log(f"Upgrading the backup's catalog from schema {facts.schema_version} to {SCHEMA_VERSION}.")
        staged = Catalog(catalog, backups=self.home.backups)  # migrates an older schema, on the copy
        try:
            interrupted = _end_unfinished_tasks(staged)
        finally:
            staged.close()
        if interrupted:
            ctx.log(f"{interrupted} task(s) running when the backup was made are marked failed in the restored "
                    "catalog.")
        single = sqlite3.connect(catalog)  # back to one file, as it came
        try:
            single.execute("PRAGMA journal_mode = DELETE")
        finally:
            single.close()
        ctx.progress(98, "Verified")
        write_atomic(self.staging / VERIFIED_FILE, _canonical({
            "source": str(self.source), "checksum": self.checksum, "manifest": self.manifest,
            "schema_from": facts.schema_version}))
        total = sum(int(f["bytes"]) for f in files.values())
        return RestoreStaged(
            summary=f"The backup {self.source} is verified ({len(files)} files, {total} bytes); ready to restore.",
            staging=str(self.staging), source=str(self.source), created_at=str(self.manifest.get("created_at", "")),
            created_by=str(self.manifest.get("created_by", "")),
            layerdesk_version=str(self.manifest.get("layerdesk_version", "")),
            schema_version=facts.schema_version, files=len(files), bytes=total)


#: What a task that ran while the backup was made says once restored.
RESTORED_INTERRUPTED = "Interrupted: the catalog was restored from a backup made while this task ran. Start it again."


def _end_unfinished_tasks(catalog: Catalog) -> int:
    """Mark failed the tasks a restored catalog shows as pending or running: they ran when the backup was
    made, not in this home now. Returns how many."""
    from app.catalog.models import TaskLogLine, TaskState, utcnow

    with catalog.write() as session:
        rows = session.scalars(select(Task).where(Task.state.not_in(FINAL_TASK_STATES))).all()
        for row in rows:
            row.state = TaskState.FAILED
            row.error = row.message = RESTORED_INTERRUPTED
            row.ended_at = utcnow()
            session.add(TaskLogLine(task_id=row.id, level="ERROR", text=RESTORED_INTERRUPTED, at=utcnow()))
        return len(rows)


def _newer_message(source: Path, schema: int) -> str:
    return (f"The backup {source} was made by a newer LayerDesk (catalog schema {schema}; this version understands "
            f"up to {SCHEMA_VERSION}). Install that LayerDesk version or newer to restore it. Nothing was changed.")


# --- the service -------------------------------------------------------------------------------------------


class BackupService(Service):
    """Back up and restore the home (Administrator only; see the module docstring)."""

    def __init__(self, ctx: ServiceContext, home: Home) -> None:
        super().__init__(ctx)
        self.home = home

    def _require(self, action: str, name: str, comment: str) -> None:
        try:
            self.caller.require(Operation.BACKUP_RESTORE)
        except PermissionDenied as exc:
            self._audit_denied(action, "home", name, comment, str(exc))
            raise

    # --- backup --------------------------------------------------------------------------------

    def backup_target(self, to: Path | str) -> Path:
        """Where a backup to ``to`` goes: ``to`` itself when it does not exist yet, or a new
        ``layerdesk-backup-<time>`` folder inside ``to`` when it is a folder. Refused: a file, a backup
        folder, a place inside the home."""
        path = Path(to).expanduser().absolute()
        if path.is_dir():
            if (path / MANIFEST_FILE).exists():
                raise Conflict(f"{path} holds a backup already; choose a new folder name or the folder above it.")
            path = path / f"layerdesk-backup-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"
        if path.exists():
            raise Conflict(f"{path} exists already; choose a new folder name.")
        if not path.parent.is_dir():
            raise ValidationError(f"The folder {path.parent} does not exist; create it or choose another place.")
        parent, root, backups = path.parent.resolve(), self.home.root.resolve(), self.home.backups.resolve()
        if (parent == root or root in parent.parents) and not (parent == backups or backups in parent.parents):
            raise ValidationError(f"{path} is inside the LayerDesk home; back up to another folder (the home's "
                                  "backups folder, another disk or a share).")
        return path

    def backup(self, runner: TaskRunner, to: Path | str, *, comment: str = "") -> int:
        """Start a backup of the home to ``to`` (see :meth:`backup_target`) as a task; returns its id."""
        comment = validate_comment(comment)
        self._require("home.backup", str(to), comment)
        target = self.backup_target(to)
        return runner.submit(BackupTask(self, target, comment))

    def record_backup(self, result: BackupResult, *, comment: str = "") -> None:
        """Audit a finished backup (called by its task)."""
        with self._change(Operation.BACKUP_RESTORE, "home.backup", "home", result.path, comment) as change:
            change.details = {"files": result.files, "bytes": result.bytes, "schema": result.schema_version,
                              "manifest": result.manifest_checksum, "missing": list(result.missing)}

    # --- restore -------------------------------------------------------------------------------

    def running_tasks(self, *, exclude: int | None = None) -> list[tuple[int, str]]:
        """``(id, title)`` of the tasks that have not ended and whose process still runs."""
        from app.tasks.runner import owner_alive

        with self.catalog.read() as session:
            rows = session.scalars(select(Task).where(Task.state.not_in(FINAL_TASK_STATES))).all()
            return [(r.id, r.title) for r in rows if r.id != exclude and owner_alive(r.owner)]

    def _refuse_while_running(self, *, exclude: int | None = None) -> None:
        running = self.running_tasks(exclude=exclude)
        if running:
            task_id, title = running[0]
            more = f" and {len(running) - 1} more" if len(running) > 1 else ""
            raise Conflict(f"Task {task_id} ({title}){more} is still running, and a restore replaces the catalog "
                           "and repository it works on. Wait for it to end or cancel it (`layerctl task cancel "
                           f"{task_id}`), then restore again. Nothing was changed.")

    def restore(self, runner: TaskRunner, source: Path | str, *, comment: str = "") -> int:
        """Start verifying the backup folder ``source`` and copying it beside the home, as a task; returns its id.
        Its result (:class:`RestoreStaged`) goes to :meth:`complete_restore`, which replaces the home's
        catalog and repository. Refused at once: not a backup, a newer schema, a running task."""
        comment = validate_comment(comment)
        path = Path(source).expanduser().absolute()
        self._require("home.restore", str(path), comment)
        manifest, checksum = read_manifest(path)
        schema = manifest.get("schema_version")
        if isinstance(schema, int) and schema > SCHEMA_VERSION:
            raise CatalogError(_newer_message(path, schema))
        self._refuse_while_running()
        return runner.submit(RestoreTask(self, path, manifest, checksum))

    def discard_restore(self, staging: Path | str) -> None:
        """Remove a verified copy that will not be restored."""
        path = Path(staging)
        if path.parent == self.home.root and path.name.startswith(RESTORE_STAGING_PREFIX):
            shutil.rmtree(path, ignore_errors=True)

    def complete_restore(self, staging: Path | str, *, comment: str = "") -> RestoreReport:
        """Replace the home's catalog and repository with the verified copy in ``staging`` (from a
        :class:`RestoreTask`); on any failure the home is put back as it was. The replaced catalog stays in
        the backups folder. The catalog connections of this process are closed and reopen on the restored
        catalog; restart the console afterwards."""
        comment = validate_comment(comment)
        path = Path(staging)
        try:
            self._require("home.restore", str(path), comment)
            if path.parent != self.home.root or not path.name.startswith(RESTORE_STAGING_PREFIX):
                raise ValidationError(f"{path} is not a verified restore of this home.")
            try:
                verified = json.loads((path / VERIFIED_FILE).read_bytes())
            except (OSError, ValueError):
                raise ValidationError(f"{path} is not a verified restore of this home; restore again.") from None
            self._refuse_while_running()
            with self.catalog.read() as session:
                before_id = _installation(session)
            report = self._swap(path, verified, before_id)
        except BaseException:
            self.discard_restore(path)
            raise
        with self._change(Operation.BACKUP_RESTORE, "home.restore", "home", report.source, comment) as change:
            change.details = {"created_at": report.created_at, "created_by": report.created_by,
                              "schema_from": report.schema_from, "schema_now": report.schema_now,
                              "replaced_catalog": report.replaced_catalog}
        return report

    def _swap(self, staging: Path, verified: dict[str, Any], before_id: str) -> RestoreReport:
        home = self.home
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        aside = home.backups / f"replaced-{stamp}-{secrets.token_hex(2)}"
        aside.mkdir(parents=True)
        # Fold the WAL into the catalog file and close this process's connections: they reopen on the new file.
        with contextlib.suppress(sqlite3.Error):
            conn = sqlite3.connect(home.catalog)
            try:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                conn.close()
        self.catalog.close()
        moved: list[tuple[Path, Path]] = []

        def move(source: Path, target: Path) -> None:
            source.rename(target)
            moved.append((source, target))

        try:
            for suffix in ("", "-wal", "-shm"):
                current = Path(f"{home.catalog}{suffix}")
                if current.exists():
                    move(current, aside / f"{CATALOG_FILE}{suffix}")
            if home.repository.exists():
                move(home.repository, aside / REPOSITORY_FOLDER)
            move(staging / CATALOG_FILE, home.catalog)
            staged_repository = staging / REPOSITORY_FOLDER
            if staged_repository.exists():
                move(staged_repository, home.repository)
            else:
                home.repository.mkdir()
            fsync_dir(home.root)
            Catalog(home.catalog, backups=home.backups).close()  # opens and is at our schema
        except BaseException as exc:
            for source, target in reversed(moved):
                try:
                    if source.exists() and source.is_dir():
                        shutil.rmtree(source)
                    target.rename(source)
                except OSError:
                    log.exception("restore: cannot put %s back to %s", target, source)
            if home.repository.exists() and not any(s == home.repository for s, _ in moved):
                shutil.rmtree(home.repository, ignore_errors=True)
            self.catalog.close()
            if isinstance(exc, LayerDeskError | OSError):
                raise EnvironmentProblem(f"Replacing the catalog and repository failed ({exc}); the home was put "
                                         "back as it was.") from None
            raise
        shutil.rmtree(staging, ignore_errors=True)
        kept = home.backups / f"catalog-before-restore-{stamp}.sqlite"
        (aside / CATALOG_FILE).rename(kept)
        shutil.rmtree(aside, ignore_errors=True)
        # Cached layer volumes are keyed by version ids the restored catalog may give to other content.
        shutil.rmtree(home.layer_cache, ignore_errors=True)
        facts = catalog_facts(home.catalog)
        manifest = verified["manifest"]
        other = bool(manifest.get("installation_id")) and manifest.get("installation_id") != before_id
        notes = [SECRETS_NOTE]
        if other:
            notes.append("The backup comes from another LayerDesk installation: sign in again, and restart the "
                         "console.")
        return RestoreReport(
            source=str(verified["source"]), created_at=str(manifest.get("created_at", "")),
            created_by=str(manifest.get("created_by", "")), schema_from=int(verified["schema_from"]),
            schema_now=facts.schema_version, counts=facts.counts, replaced_catalog=str(kept),
            other_installation=other, notes=tuple(notes))


def _installation(session: Any) -> str:
    from app.catalog.models import Setting

    row = session.get(Setting, INSTALLATION_ID)
    return str(row.value) if row is not None else ""


def backup_service(services: Services) -> BackupService:
    """The backup service bound to ``services``' caller."""
    return BackupService(ServiceContext(catalog=services.catalog, caller=services.caller, secrets=services.secrets),
                         services.home)
