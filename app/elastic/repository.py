r"""The Elastic Layer repository's JSON files: LayerDesk's own schema (no public one exists).

A repository is a folder (an SMB share, or a folder on one) holding three JSON files and the layer
disks they name::

    Layers.json                       every layer version a VDA may be given, with its disk
    ElasticLayerAssignment.json       which users and groups (by SID) get which versions
    MachineAssociations.json          groups tied to machine-name patterns
    Layers\<layer id>\<version id>-<16 hex digits of the disk's SHA-256>.vhdx

How a sync writes them so that readers always see a consistent repository: :mod:`app.elastic.sync`.

Every file is UTF-8 JSON, one object with a ``format`` naming the file's kind and a ``schema``
version (this module writes and reads schema :data:`SCHEMA`; a reader refuses any other, so a newer
LayerDesk's repository is never misread). Lists are sorted, keys are sorted and nothing depends on the
time of writing, so the same catalog always gives the same bytes (a sync that changes nothing rewrites
nothing).

``Layers.json``::

    {"format": "layerdesk.elastic.layers", "schema": 1,
     "layers": [{"layer_id": 7, "layer": "Office", "os_layer_id": 1, "os_layer": "Win11",
                 "version_id": 12, "version": "2024",
                 "version_checksum": "sha256:…",          # the repository manifest's checksum (may be null)
                 "disk": "Layers\\7\\12-0123456789abcdef.vhdx",  # relative to the repository, "\" separated
                 "disk_format": "vhdx",                    # or "vhd-dynamic" (then the disk ends in .vhd)
                 "size_bytes": 33554432,                   # the disk file's size
                 "disk_checksum": "sha256:<64 hex>"}]}     # SHA-256 of the disk file's bytes

``ElasticLayerAssignment.json``::

    {"format": "layerdesk.elastic.assignments", "schema": 1,
     "assignments": [{"sid": "S-1-5-21-…-1105", "kind": "user", "name": "LAB\\alice",
                      "layer_id": 7, "version_id": 12}]}    # kind: "user" or "group"

``MachineAssociations.json``::

    {"format": "layerdesk.elastic.machine-associations", "schema": 1,
     "associations": [{"sid": "S-1-5-21-…-1201", "name": "LAB\\Finance-Users", "pattern": "VDA-FIN-*"}]}

What a reader checks (:func:`read_repository`, or one file with :func:`parse_layers` and its siblings):
valid UTF-8 JSON, the format and schema, every field present with its type, SIDs that look like SIDs,
disk paths that are relative and stay inside the repository (no drive, no leading ``\``, no ``..``),
checksums of the form ``sha256:<64 hex>``, at most one entry per layer version, one version of a layer
per principal, and every assignment naming a version that ``Layers.json`` lists. A failure raises
:class:`RepositoryFormatError` naming the file and what is wrong.

How VDAs apply assignments (which version a user gets) is documented in :mod:`app.services.elastic`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from app.errors import UserError

SCHEMA = 1
LAYERS_FILE = "Layers.json"
ASSIGNMENTS_FILE = "ElasticLayerAssignment.json"
ASSOCIATIONS_FILE = "MachineAssociations.json"
#: In the order a sync replaces them: the disks' index first, so an assignment never names a version
#: the share's Layers.json does not list yet.
FILES = (LAYERS_FILE, ASSIGNMENTS_FILE, ASSOCIATIONS_FILE)
FORMATS = {
    LAYERS_FILE: "layerdesk.elastic.layers",
    ASSIGNMENTS_FILE: "layerdesk.elastic.assignments",
    ASSOCIATIONS_FILE: "layerdesk.elastic.machine-associations",
}
DISK_SUFFIXES = {"vhdx": ".vhdx", "vhd-dynamic": ".vhd"}
PrincipalKindName = Literal["user", "group"]

_SID = re.compile(r"^S-1-\d+(-\d+)+$")
_CHECKSUM = re.compile(r"^sha256:[0-9a-f]{64}$")


class RepositoryFormatError(UserError):
    """A repository JSON file is malformed or of a schema this LayerDesk does not read."""

    code = "repository_format"


@dataclass(frozen=True)
class LayerEntry:
    layer_id: int
    layer: str
    os_layer_id: int | None
    os_layer: str | None
    version_id: int
    version: str
    version_checksum: str | None
    disk: str
    disk_format: str
    size_bytes: int
    disk_checksum: str


@dataclass(frozen=True)
class AssignmentEntry:
    sid: str
    kind: PrincipalKindName
    name: str
    layer_id: int
    version_id: int


@dataclass(frozen=True)
class AssociationEntry:
    sid: str
    name: str
    pattern: str


@dataclass(frozen=True)
class ElasticRepository:
    layers: tuple[LayerEntry, ...]
    assignments: tuple[AssignmentEntry, ...]
    associations: tuple[AssociationEntry, ...]

    def documents(self) -> dict[str, bytes]:
        """The three files' bytes, by file name (in :data:`FILES` order)."""
        return {
            LAYERS_FILE: _dump(LAYERS_FILE, "layers", sorted(
                (_layer_dict(e) for e in self.layers), key=lambda d: (d["layer_id"], d["version_id"]))),
            ASSIGNMENTS_FILE: _dump(ASSIGNMENTS_FILE, "assignments", sorted(
                (_plain(e) for e in self.assignments), key=lambda d: (d["sid"], d["layer_id"]))),
            ASSOCIATIONS_FILE: _dump(ASSOCIATIONS_FILE, "associations", sorted(
                (_plain(e) for e in self.associations), key=lambda d: (d["sid"], d["pattern"]))),
        }


def disk_path(layer_id: int, version_id: int, disk_format: str, checksum: str) -> str:
    """Where a version's disk lives, relative to the repository: ``Layers\\<layer id>\\<version id>-<the
    first 16 hex digits of its SHA-256>.vhdx``. Named after its content, a disk file never changes: a
    new disk of a version is a new file, and the one the current JSON files name stays until they no
    longer do."""
    return f"Layers\\{layer_id}\\{version_id}-{checksum.removeprefix('sha256:')[:16]}{DISK_SUFFIXES[disk_format]}"


def _plain(entry: AssignmentEntry | AssociationEntry) -> dict[str, Any]:
    return dict(vars(entry))


def _layer_dict(entry: LayerEntry) -> dict[str, Any]:
    return dict(vars(entry))


def _dump(file: str, key: str, items: list[dict[str, Any]]) -> bytes:
    document = {"format": FORMATS[file], "schema": SCHEMA, key: items}
    return (json.dumps(document, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


# --- reading ------------------------------------------------------------------------------------------


class _Fields:
    """Typed access to one JSON object's fields, every failure naming the file and the entry."""

    def __init__(self, file: str, where: str, value: object) -> None:
        if not isinstance(value, dict):
            raise RepositoryFormatError(f"{file}: {where} is not a JSON object.")
        self.file, self.where, self.value = file, where, value

    def fail(self, message: str) -> RepositoryFormatError:
        return RepositoryFormatError(f"{self.file}: {self.where}: {message}")

    def _get(self, key: str) -> object:
        if key not in self.value:
            raise self.fail(f"{key!r} is missing.")
        return self.value[key]

    def integer(self, key: str, *, optional: bool = False, minimum: int = 0) -> int | None:
        value = self._get(key)
        if value is None and optional:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise self.fail(f"{key!r} must be a whole number of at least {minimum}, not {value!r}.")
        return value

    def required_int(self, key: str, *, minimum: int = 0) -> int:
        value = self.integer(key, minimum=minimum)
        assert value is not None
        return value

    def text(self, key: str, *, optional: bool = False) -> str | None:
        value = self._get(key)
        if value is None and optional:
            return None
        if not isinstance(value, str) or not value.strip():
            raise self.fail(f"{key!r} must be a non-empty string, not {value!r}.")
        return value

    def required_text(self, key: str) -> str:
        value = self.text(key)
        assert value is not None
        return value

    def sid(self, key: str = "sid") -> str:
        value = self.required_text(key)
        if not _SID.match(value):
            raise self.fail(f"{value!r} is not a SID (S-1-5-21-…).")
        return value

    def items(self, key: str) -> list[object]:
        value = self._get(key)
        if not isinstance(value, list):
            raise self.fail(f"{key!r} must be a list.")
        return value


def _document(file: str, data: bytes, key: str) -> list[object]:
    try:
        document = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise RepositoryFormatError(f"{file} is not UTF-8 text.") from None
    except json.JSONDecodeError as exc:
        raise RepositoryFormatError(
            f"{file} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}).") from None
    top = _Fields(file, "the document", document)
    if document.get("format") != FORMATS[file]:
        raise RepositoryFormatError(f"{file} is not a LayerDesk repository file (format "
                                    f"{document.get('format')!r}, expected {FORMATS[file]!r}).")
    schema = document.get("schema")
    if schema != SCHEMA:
        raise RepositoryFormatError(f"{file} has schema {schema!r}; this LayerDesk reads schema {SCHEMA} only "
                                    "(a newer LayerDesk wrote it, or it is damaged).")
    return top.items(key)


def _checked_disk(fields: _Fields, path: str, disk_format: str) -> str:
    parts = path.split("\\")
    if ("/" in path or ":" in path or path.startswith("\\") or any(p in ("", ".", "..") for p in parts)
            or not path.lower().endswith(DISK_SUFFIXES.get(disk_format, "\0"))):
        raise fields.fail(f"the disk path {path!r} must be relative, '\\'-separated, inside the repository, "
                          f"and end in {DISK_SUFFIXES.get(disk_format, '.vhdx or .vhd')}.")
    return path


def parse_layers(data: bytes) -> tuple[LayerEntry, ...]:
    """``Layers.json``'s entries, checked (see the module docstring)."""
    found: dict[int, LayerEntry] = {}
    for index, item in enumerate(_document(LAYERS_FILE, data, "layers")):
        f = _Fields(LAYERS_FILE, f"layer entry {index + 1}", item)
        disk_format = f.required_text("disk_format")
        if disk_format not in DISK_SUFFIXES:
            raise f.fail(f"disk_format {disk_format!r} is not one of {', '.join(DISK_SUFFIXES)}.")
        checksum = f.required_text("disk_checksum")
        if not _CHECKSUM.match(checksum):
            raise f.fail(f"disk_checksum {checksum!r} is not sha256:<64 hex digits>.")
        entry = LayerEntry(
            layer_id=f.required_int("layer_id", minimum=1), layer=f.required_text("layer"),
            os_layer_id=f.integer("os_layer_id", optional=True, minimum=1),
            os_layer=f.text("os_layer", optional=True),
            version_id=f.required_int("version_id", minimum=1), version=f.required_text("version"),
            version_checksum=f.text("version_checksum", optional=True),
            disk=_checked_disk(f, f.required_text("disk"), disk_format), disk_format=disk_format,
            size_bytes=f.required_int("size_bytes", minimum=1), disk_checksum=checksum,
        )
        if entry.version_id in found:
            raise f.fail(f"version id {entry.version_id} is listed twice.")
        found[entry.version_id] = entry
    return tuple(found.values())


def parse_assignments(data: bytes) -> tuple[AssignmentEntry, ...]:
    """``ElasticLayerAssignment.json``'s entries, checked (not yet against Layers.json)."""
    found: dict[tuple[str, int], AssignmentEntry] = {}
    for index, item in enumerate(_document(ASSIGNMENTS_FILE, data, "assignments")):
        f = _Fields(ASSIGNMENTS_FILE, f"assignment {index + 1}", item)
        kind = f.required_text("kind")
        if kind not in ("user", "group"):
            raise f.fail(f"kind {kind!r} must be 'user' or 'group'.")
        entry = AssignmentEntry(sid=f.sid(), kind="user" if kind == "user" else "group",
                                name=f.required_text("name"), layer_id=f.required_int("layer_id", minimum=1),
                                version_id=f.required_int("version_id", minimum=1))
        if (entry.sid, entry.layer_id) in found:
            raise f.fail(f"layer {entry.layer_id} is assigned to {entry.sid} twice.")
        found[(entry.sid, entry.layer_id)] = entry
    return tuple(found.values())


def parse_associations(data: bytes) -> tuple[AssociationEntry, ...]:
    """``MachineAssociations.json``'s entries, checked."""
    found: list[AssociationEntry] = []
    for index, item in enumerate(_document(ASSOCIATIONS_FILE, data, "associations")):
        f = _Fields(ASSOCIATIONS_FILE, f"association {index + 1}", item)
        found.append(AssociationEntry(sid=f.sid(), name=f.required_text("name"), pattern=f.required_text("pattern")))
    return tuple(found)


def read_repository(files: Mapping[str, bytes]) -> ElasticRepository:
    """The three files (by name) read and checked, each on its own and against each other."""
    missing = [name for name in FILES if name not in files]
    if missing:
        raise RepositoryFormatError(f"The repository lacks {', '.join(missing)}.")
    layers = parse_layers(files[LAYERS_FILE])
    assignments = parse_assignments(files[ASSIGNMENTS_FILE])
    listed = {(e.layer_id, e.version_id) for e in layers}
    for entry in assignments:
        if (entry.layer_id, entry.version_id) not in listed:
            raise RepositoryFormatError(
                f"{ASSIGNMENTS_FILE}: the assignment to {entry.name} names layer {entry.layer_id} version "
                f"{entry.version_id}, which {LAYERS_FILE} does not list.")
    return ElasticRepository(layers, assignments, parse_associations(files[ASSOCIATIONS_FILE]))


def layers_by_version(entries: Iterable[LayerEntry]) -> dict[int, LayerEntry]:
    return {e.version_id: e for e in entries}
