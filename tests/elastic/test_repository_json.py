"""The Elastic Layer repository's JSON files: written deterministically, read back and checked."""

from __future__ import annotations

import json

import pytest

from app.elastic.repository import (
    ASSIGNMENTS_FILE,
    ASSOCIATIONS_FILE,
    FILES,
    LAYERS_FILE,
    AssignmentEntry,
    AssociationEntry,
    ElasticRepository,
    LayerEntry,
    RepositoryFormatError,
    disk_path,
    read_repository,
)

SID = "S-1-5-21-1004336348-1177238915-682003330-1105"
GROUP = "S-1-5-21-1004336348-1177238915-682003330-1201"
CHECKSUM = "sha256:" + "ab" * 32


def _repository() -> ElasticRepository:
    other = "sha256:" + "cd" * 32
    office = LayerEntry(7, "Office", 1, "Win11", 12, "2024", "sha256:00", disk_path(7, 12, "vhdx", CHECKSUM),
                        "vhdx", 33554432, CHECKSUM)
    chrome = LayerEntry(3, "Chrome", 1, "Win11", 4, "120", None, disk_path(3, 4, "vhd-dynamic", other),
                        "vhd-dynamic", 1048576, other)
    return ElasticRepository(
        layers=(office, chrome),
        assignments=(AssignmentEntry(SID, "user", r"LAB\alice", 7, 12),
                     AssignmentEntry(GROUP, "group", r"LAB\Fin", 3, 4)),
        associations=(AssociationEntry(GROUP, r"LAB\Fin", "VDA-FIN-*"),),
    )


def _edited(file: str, edit: object) -> dict[str, bytes]:
    files = _repository().documents()
    document = json.loads(files[file])
    assert callable(edit)
    edit(document)
    files[file] = json.dumps(document).encode()
    return files


def test_documents_round_trip_and_are_deterministic() -> None:
    repository = _repository()
    files = repository.documents()
    assert list(files) == list(FILES)
    assert files == ElasticRepository(tuple(reversed(repository.layers)), tuple(reversed(repository.assignments)),
                                      repository.associations).documents()
    back = read_repository(files)
    assert set(back.layers) == set(repository.layers)
    assert set(back.assignments) == set(repository.assignments)
    assert back.associations == repository.associations
    layers = json.loads(files[LAYERS_FILE])
    assert layers["format"] == "layerdesk.elastic.layers" and layers["schema"] == 1
    assert [e["disk"] for e in layers["layers"]] == [
        "Layers\\3\\4-cdcdcdcdcdcdcdcd.vhd", "Layers\\7\\12-abababababababab.vhdx"]


@pytest.mark.parametrize(("file", "data", "message"), [
    (LAYERS_FILE, b"{\"format\": ", r"Layers.json is not valid JSON \(line 1"),
    (LAYERS_FILE, b"\xff\xfe", "Layers.json is not UTF-8 text"),
    (ASSIGNMENTS_FILE, b"[]", "ElasticLayerAssignment.json: the document is not a JSON object"),
    (ASSOCIATIONS_FILE, b'{"format": "something.else", "schema": 1}', "is not a LayerDesk repository file"),
    (LAYERS_FILE, b'{"format": "layerdesk.elastic.layers", "schema": 2, "layers": []}',
     "has schema 2; this LayerDesk reads schema 1 only"),
])
def test_malformed_documents_and_other_schemas_are_refused(file: str, data: bytes, message: str) -> None:
    files = _repository().documents()
    files[file] = data
    with pytest.raises(RepositoryFormatError, match=message):
        read_repository(files)


def _set(file: str, key: str, index: int, field: str, value: object) -> dict[str, bytes]:
    def edit(document: dict[str, list[dict[str, object]]]) -> None:
        document[key][index][field] = value
    return _edited(file, edit)


@pytest.mark.parametrize(("files", "message"), [
    (_set(LAYERS_FILE, "layers", 0, "disk", "..\\escape.vhdx"), "must be relative"),
    (_set(LAYERS_FILE, "layers", 0, "disk", "\\\\fs1\\share\\a.vhd"), "must be relative"),
    (_set(LAYERS_FILE, "layers", 0, "disk", "C:\\a.vhd"), "must be relative"),
    (_set(LAYERS_FILE, "layers", 1, "disk", "Layers\\7\\12.vhd"), r"end in \.vhdx"),
    (_set(LAYERS_FILE, "layers", 0, "disk_checksum", "md5:00"), "is not sha256"),
    (_set(LAYERS_FILE, "layers", 0, "size_bytes", "12"), "'size_bytes' must be a whole number"),
    (_set(LAYERS_FILE, "layers", 0, "disk_format", "vmdk"), "disk_format 'vmdk'"),
    (_set(LAYERS_FILE, "layers", 1, "version_id", 4), "version id 4 is listed twice"),
    (_set(ASSIGNMENTS_FILE, "assignments", 0, "sid", "alice"), "'alice' is not a SID"),
    (_set(ASSIGNMENTS_FILE, "assignments", 0, "kind", "machine"), "kind 'machine'"),
    (_set(ASSIGNMENTS_FILE, "assignments", 0, "version_id", 99), "which Layers.json does not list"),
    (_set(ASSOCIATIONS_FILE, "associations", 0, "pattern", ""), "'pattern' must be a non-empty string"),
])
def test_entries_are_checked_field_by_field(files: dict[str, bytes], message: str) -> None:
    with pytest.raises(RepositoryFormatError, match=message):
        read_repository(files)


def test_a_missing_field_and_a_missing_file_are_named() -> None:
    def drop(document: dict[str, list[dict[str, object]]]) -> None:
        del document["layers"][0]["layer_id"]
    with pytest.raises(RepositoryFormatError, match=r"Layers\.json: layer entry 1: 'layer_id' is missing"):
        read_repository(_edited(LAYERS_FILE, drop))
    files = _repository().documents()
    del files[ASSOCIATIONS_FILE]
    with pytest.raises(RepositoryFormatError, match=r"lacks MachineAssociations\.json"):
        read_repository(files)
