"""Export and import of layers between two real homes (layers imported for real from
tests/support/compose_stack.py), incremental sync, damaged and malformed export folders, cancels.

The export folder is checked with hashlib and json (not our reader); stored versions with wimlib-imagex; the
published images of both homes with wimlib-imagex."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from app.catalog.models import AuditEntry, Layer, LayerVersion
from app.services import Services, open_catalog
from app.services.transfer import Destination, TransferService
from app.tasks.base import CancelToken, TaskCanceled, TaskContext
from tests.support.compose_stack import CITRIX, OFFICE, TOOLS, os_layer
from tests.support.keyring_memory import MemoryKeyring
from tests.support.repository_checks import flip_bytes, listing, outcome_snapshot
from tests.support.tools import run_ok
from tests.unit.test_cli import Ctl

MANIFEST = "layerdesk-export.json"


def _stock(ctl: Ctl, tmp_path: Path) -> None:
    """Win11, Office, Tools and Citrix imported from folders (with whiteouts and .reg files) and a template."""
    sources = tmp_path / "sources"
    commands: list[tuple[str, ...]] = [
        ("layer", "create", "--type", "os", "Win11", "--description", "gold"),
        ("layer", "create", "--type", "app", "Office", "--os-layer", "Win11", "--description", "M365"),
        ("layer", "create", "--type", "app", "Tools", "--os-layer", "Win11"),
        ("layer", "create", "--type", "platform", "Citrix", "--os-layer", "Win11"),
    ]
    for layer in (os_layer(tmp_path), OFFICE, TOOLS, CITRIX):
        reg = layer.reg_file(tmp_path)
        commands.append(("layer", "import", layer.name, "--version", "1", "--from", str(layer.folder(sources)),
                         "--comment", f"{layer.name} one", *(("--registry", str(reg)) if reg else ())))
    for args in commands:
        status, _, err = ctl(*args)
        assert status == 0, (args, err)


def _template_and_publish(ctl: Ctl, out: Path) -> Path:
    for args in (("template", "create", "Gold", "--os", "Win11:1", "--app", "Office:1", "--app", "Tools:1",
                  "--platform", "Citrix:1", "--format", "wim", "--size-gb", "1"),):
        status, _, err = ctl(*args)
        assert status == 0, err
    result = ctl.json("image", "publish", "Gold", "--output", str(out), "--wait")
    assert isinstance(result, dict)
    return Path(result["path"])


@pytest.fixture
def homes(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
          memory_keyring: MemoryKeyring) -> tuple[Ctl, Ctl]:
    first = Ctl(tmp_path / "first", capsys, monkeypatch)
    _stock(first, tmp_path)
    return first, Ctl(tmp_path / "second", capsys, monkeypatch)


def _manifest(folder: Path) -> dict[str, Any]:
    document = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    assert isinstance(document, dict)
    return document


def _versions(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f"{layer['name']}:{v['name']}": v for layer in document["layers"] for v in layer["versions"]}


def _wim_dir(ctl: Ctl, layer: str, version: str) -> list[str]:
    """The version's stored files as wimlib-imagex lists them (not our reader)."""
    services = _services(ctl)
    with services.catalog.read() as session:
        row = next(v for v in session.query(LayerVersion).all()
                   if v.layer.name == layer and v.name == version)
        layer_id, image = row.layer_id, f"v{row.id}"
    wim = ctl.home / "repository" / "layers" / f"{layer_id}.wim"
    return sorted(run_ok("wimlib-imagex", "dir", wim, image).stdout.splitlines())


def _services(ctl: Ctl) -> Services:
    from app.paths import Home
    from app.services import resolve_caller

    home = Home(ctl.home)
    catalog, secrets = open_catalog(home)
    return Services.for_caller(home, catalog, resolve_caller(home, catalog, secrets), secrets)


def _stored_manifest(ctl: Ctl, layer: str, version: str) -> dict[str, Any]:
    services = _services(ctl)
    with services.catalog.read() as session:
        row = next(v for v in session.query(LayerVersion).all() if v.layer.name == layer and v.name == version)
        path = ctl.home / "repository" / "layers" / str(row.layer_id) / f"v{row.id}.json"
    document = json.loads(path.read_text(encoding="utf-8"))["manifest"]
    assert isinstance(document, dict)
    return document


def test_export_then_import_into_a_second_home_gives_the_same_layers_and_image(
        homes: tuple[Ctl, Ctl], tmp_path: Path) -> None:
    first, second = homes
    folder = tmp_path / "export"
    result = first.json("export", "--to", str(folder))
    assert isinstance(result, dict)
    assert sorted(result["copied"]) == ["Citrix:1", "Office:1", "Tools:1", "Win11:1"]

    # the manifest, read with json, and every object's SHA-256 with hashlib
    document = _manifest(folder)
    assert document["format"] == "layerdesk.export" and document["schema"] == 1 and document["layerdesk"]
    office = next(layer for layer in document["layers"] if layer["name"] == "Office")
    assert (office["type"], office["os_layer"], office["description"]) == ("app", "Win11", "M365")
    v1 = office["versions"][0]
    shown_first = first.json("layer", "show", "Office")
    assert isinstance(shown_first, dict)
    assert (v1["name"], v1["state"], v1["comment"], v1["created_by"]) == (
        "1", "deployable", "Office one", shown_first["versions"][0]["created_by"])
    assert v1["checksum"].startswith("sha256:") and v1["size_bytes"] > 0
    for version in _versions(document).values():
        assert sorted(o["kind"] for o in version["objects"]) == ["manifest", "wim"]
        for item in version["objects"]:
            data = (folder / item["path"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == item["sha256"] and len(data) == item["size"]

    preview = second.json("import", "--from", str(folder), "--preview")
    assert isinstance(preview, dict)
    assert {(i["layer"], i["version"], i["action"]) for i in preview["items"]} >= {
        ("Win11", "", "new"), ("Office", "1", "new"), ("Citrix", "1", "new")}
    imported = second.json("import", "--from", str(folder), "--comment", "from the lab")
    assert isinstance(imported, dict)
    assert sorted(imported["copied"]) == ["Citrix:1", "Office:1", "Tools:1", "Win11:1"]
    assert imported["state"] == "complete"

    # the second home: repository clean, the same files, deletions and registry deltas
    check = second.json("repo", "check")
    assert isinstance(check, dict) and check["problems"] == [], check
    for name in ("Win11", "Office", "Tools", "Citrix"):
        assert _wim_dir(first, name, "1") == _wim_dir(second, name, "1")
        mine, theirs = _stored_manifest(first, name, "1"), _stored_manifest(second, name, "1")
        for key in ("deletions", "registry", "files", "data_bytes"):
            assert mine[key] == theirs[key], (name, key)
    shown = second.json("layer", "show", "Office")
    assert isinstance(shown, dict)
    assert shown["layer"]["description"] == "M365" and shown["versions"][0]["comment"] == "Office one"
    assert shown["versions"][0]["state"] == "deployable"
    with _services(second).catalog.read() as session:
        operations = [e.operation for e in session.query(AuditEntry).all()]
    assert operations.count("transfer.import") == 2 and "layer.create" in operations

    # the same content checksum on both sides
    checksums_here = TransferService.for_services(_services(second)).preview_import(Destination(str(folder)))
    assert {i.action for i in checksums_here.items if i.version} == {"here"}

    # both homes publish the same image
    image_a = _template_and_publish(first, tmp_path / "out-a")
    image_b = _template_and_publish(second, tmp_path / "out-b")
    run_ok("wimlib-imagex", "apply", image_a, "1", tmp_path / "tree-a")
    run_ok("wimlib-imagex", "apply", image_b, "1", tmp_path / "tree-b")
    a, b = listing(tmp_path / "tree-a"), listing(tmp_path / "tree-b")
    assert a.keys() == b.keys()
    assert {k: v for k, v in a.items() if "/config/" not in k} == {k: v for k, v in b.items() if "/config/" not in k}

    # importing again: everything is already here, nothing changes
    before = outcome_snapshot(_services(second).catalog)
    again = second.json("import", "--from", str(folder))
    assert isinstance(again, dict) and again["copied"] == [] and len(again["skipped"]) == 4
    assert outcome_snapshot(_services(second).catalog) == before


def test_one_damaged_byte_is_found_and_nothing_is_imported(homes: tuple[Ctl, Ctl], tmp_path: Path) -> None:
    first, second = homes
    folder = tmp_path / "export"
    first.json("export", "--to", str(folder), "Office")
    office = _versions(_manifest(folder))["Office:1"]
    wim = next(o for o in office["objects"] if o["kind"] == "wim")
    flip_bytes(folder / wim["path"], wim["size"] // 2, 1)
    status, _, err = second("init")
    assert status == 0, err
    before = outcome_snapshot(_services(second).catalog)
    status, _, err = second("import", "--from", str(folder))
    assert status != 0
    assert wim["path"] in err and "Office:1" in err and "does not match its SHA-256" in err
    assert outcome_snapshot(_services(second).catalog) == before
    layers = second.home / "repository" / "layers"
    assert not layers.exists() or not [p for p in layers.iterdir() if not p.name.startswith(".")]
    work = second.home / "transfer"
    assert not work.exists() or not list(work.iterdir())


def test_re_export_skips_and_sync_copies_only_the_new_version(homes: tuple[Ctl, Ctl], tmp_path: Path) -> None:
    first, second = homes
    folder = tmp_path / "export"
    first.json("export", "--to", str(folder))
    objects = {p.name: p.stat().st_mtime_ns for p in (folder / "objects").iterdir()}
    again = first.json("export", "--to", str(folder))
    assert isinstance(again, dict) and again["copied"] == [] and len(again["skipped"]) == 4
    assert {p.name: p.stat().st_mtime_ns for p in (folder / "objects").iterdir()} == objects

    changed = tmp_path / "office2"
    (changed / "Program Files" / "Office").mkdir(parents=True)
    (changed / "Program Files" / "Office" / "winword.exe").write_bytes(b"word 2" * 100)
    status, _, err = first("layer", "import", "Office", "--version", "2", "--from", str(changed))
    assert status == 0, err
    synced = first.json("sync", "--to", str(folder))
    assert isinstance(synced, dict)
    assert synced["copied"] == ["Office:2"] and len(synced["skipped"]) == 4
    document = _manifest(folder)
    assert document["last_sync"]["copied"] == ["Office:2"] and document["last_sync"]["kind"] == "sync"
    assert set(_versions(document)) == {"Win11:1", "Office:1", "Office:2", "Tools:1", "Citrix:1"}
    assert len(list((folder / "objects").iterdir())) == len(objects) + 2

    # a version deleted here leaves the folder at the next sync, objects included
    status, _, err = first("layer", "delete", "Tools:1")
    assert status == 0, err
    synced = first.json("sync", "--to", str(folder))
    assert isinstance(synced, dict) and synced["copied"] == [] and len(synced["removed"]) == 2
    assert "Tools:1" not in _versions(_manifest(folder))

    imported = second.json("import", "--from", str(folder), "Office")
    assert isinstance(imported, dict) and sorted(imported["copied"]) == ["Office:1", "Office:2", "Win11:1"]


def test_same_name_other_content_is_a_conflict_not_overwritten(homes: tuple[Ctl, Ctl], tmp_path: Path) -> None:
    first, second = homes
    folder = tmp_path / "export"
    first.json("export", "--to", str(folder), "Tools")
    other = tmp_path / "other-tools"
    (other / "Tools").mkdir(parents=True)
    (other / "Tools" / "tool.exe").write_bytes(b"another tool")
    for args in (("layer", "create", "--type", "os", "Win11"),
                 ("layer", "create", "--type", "app", "Tools", "--os-layer", "Win11"),
                 ("layer", "import", "Tools", "--version", "1", "--from", str(other))):
        status, _, err = second(*args)
        assert status == 0, err
    before = _wim_dir(second, "Tools", "1")
    status, out, err = second("import", "--from", str(folder))
    assert status == 1, err
    assert "Tools:1: a version of that name with other content is here" in out
    assert "Imported 1 version(s)" in out  # Win11:1 was new here
    assert _wim_dir(second, "Tools", "1") == before


@pytest.mark.parametrize(("setup", "message"), [
    (lambda folder: None, "does not exist"),
    (lambda folder: (folder.mkdir(), (folder / MANIFEST).write_text('{"format": "layerdesk.export",\n "schema": 1,\n'
                                                                     ' "layers": [}\n')),
     "is not valid JSON: Expecting value at line 3, column 13"),
    (lambda folder: None, "points outside the export folder"),
    (lambda folder: None, "written by a newer LayerDesk"),
    (lambda folder: folder.mkdir(), "holds no LayerDesk export"),
])
def test_bad_export_folders_are_refused_and_change_nothing(
        homes: tuple[Ctl, Ctl], tmp_path: Path, setup: Any, message: str) -> None:
    first, second = homes
    folder = tmp_path / "bad"
    if message == "points outside the export folder" or message.startswith("written by"):
        first.json("export", "--to", str(folder), "Office")
        document = _manifest(folder)
        if message.startswith("written by"):
            document["schema"] = 2
        else:
            office = _versions(document)["Office:1"]
            office["objects"][0]["path"] = "../../first/catalog.db"
        (folder / MANIFEST).write_text(json.dumps(document), encoding="utf-8")
    else:
        setup(folder)
    status, _, err = second("init")
    assert status == 0
    before = outcome_snapshot(_services(second).catalog)
    repository = listing(second.home / "repository")
    status, _, err = second("import", "--from", str(folder))
    assert status != 0 and message in err, err
    status, _, err = second("import", "--from", str(folder), "--preview")
    assert status != 0 and message in err, err
    assert outcome_snapshot(_services(second).catalog) == before
    assert listing(second.home / "repository") == repository


def test_an_absolute_object_path_is_refused(homes: tuple[Ctl, Ctl], tmp_path: Path) -> None:
    first, second = homes
    folder = tmp_path / "export"
    first.json("export", "--to", str(folder), "Office")
    document = _manifest(folder)
    _versions(document)["Office:1"]["objects"][1]["path"] = "/etc/passwd"
    (folder / MANIFEST).write_text(json.dumps(document), encoding="utf-8")
    status, _, err = second("import", "--from", str(folder))
    assert status != 0 and "'/etc/passwd' points outside the export folder" in err


class _CancelAt(TaskContext):
    """A task context that cancels when a progress message starts with ``word``."""

    def __init__(self, word: str) -> None:
        self.cancel = CancelToken()
        self.word = word
        self.messages: list[str] = []

    def progress(self, percent: float, message: str = "") -> None:
        self.messages.append(message)
        if message.startswith(self.word):
            self.cancel.cancel()

    def log(self, text: str, level: str = "INFO") -> None:
        pass


def test_a_cancelled_import_leaves_nothing(homes: tuple[Ctl, Ctl], tmp_path: Path) -> None:
    first, second = homes
    folder = tmp_path / "export"
    first.json("export", "--to", str(folder))
    status, _, _ = second("init")
    assert status == 0
    services = _services(second)
    before = outcome_snapshot(services.catalog)
    service = TransferService.for_services(services)
    from app.services.transfer import TransferImportTask

    for word in ("Verifying Office", "Storing Office"):
        ctx = _CancelAt(word)
        with pytest.raises(TaskCanceled):
            service._run_import(TransferImportTask(service, Destination(str(folder)), (), comment=""), ctx)
        assert any(m.startswith(word) for m in ctx.messages)
        assert outcome_snapshot(services.catalog) == before
        check = second.json("repo", "check")
        assert isinstance(check, dict) and check["problems"] == []
        with services.catalog.read() as session:
            assert session.query(Layer).count() == 0
    assert not list((second.home / "transfer").iterdir())


def test_a_cancelled_export_leaves_the_previous_manifest(homes: tuple[Ctl, Ctl], tmp_path: Path) -> None:
    first, _ = homes
    folder = tmp_path / "export"
    first.json("export", "--to", str(folder), "Office")
    previous = (folder / MANIFEST).read_bytes()
    services = _services(first)
    service = TransferService.for_services(services)
    from app.services.transfer import TransferExportTask

    task = TransferExportTask(service, Destination(str(folder)), service._export_selection(()), mirror=True,
                              comment="")
    with pytest.raises(TaskCanceled):
        service._run_export(task, _CancelAt("Copying Tools"))
    assert (folder / MANIFEST).read_bytes() == previous
    document = _manifest(folder)
    for version in _versions(document).values():
        for item in version["objects"]:
            assert hashlib.sha256((folder / item["path"]).read_bytes()).hexdigest() == item["sha256"]
    assert not [p for p in (folder / "objects").iterdir() if p.name.endswith(".partial")]


def test_transfer_calls_need_their_roles_and_refusals_are_audited(services_for: Any, tmp_path: Path) -> None:
    """Each role against each call: an allowed caller gets past the role checks (to the next, input check);
    a refused one gets the refusal naming the roles needed, audited as denied, and nothing else changes."""
    from app.catalog.models import AuditOutcome, LayerType, Role
    from app.errors import LayerDeskError, PermissionDenied
    from app.tasks.runner import TaskRunner

    admin = services_for(Role.ADMINISTRATOR)
    admin.layers.create_layer("Win11", LayerType.OS)
    export = tmp_path / "export"
    export.mkdir()
    document = {"format": "layerdesk.export", "schema": 1, "layers": [
        {"name": "Win11", "type": "os", "description": "", "icon": None, "os_layer": None, "versions": []},
        {"name": "Office", "type": "app", "description": "", "icon": None, "os_layer": "Win11", "versions": []}]}
    (export / MANIFEST).write_text(json.dumps(document), encoding="utf-8")
    run_tasks = set(Role) - {Role.READ_ONLY}
    import_roles = {Role.ADMINISTRATOR, Role.MANAGE_APP_LAYERS}  # the only new layer is an app layer
    calls = [
        ("transfer.export", run_tasks, "run tasks",
         lambda sv, runner: TransferService.for_services(sv).start_export(runner, Destination(str(tmp_path / "x")),
                                                                          ["Nope"])),
        ("transfer.sync", run_tasks, "run tasks",
         lambda sv, runner: TransferService.for_services(sv).start_sync(
             runner, Destination(str(tmp_path / "missing" / "x")))),
        ("layer.export_disk", run_tasks, "run tasks",
         lambda sv, runner: TransferService.for_services(sv).start_layer_disk_export(runner, "Win11:1", "x.qcow2")),
        ("transfer.import", import_roles, "create, change or delete",
         lambda sv, runner: TransferService.for_services(sv).start_import(runner, Destination(str(export)),
                                                                          ["Office"])),
    ]
    for operation, allowed, wording, call in calls:
        for role in Role:
            caller = services_for(role, username=f"caller-{role.name.lower()}")
            runner = TaskRunner(caller.catalog, caller.caller, poll_s=0.05)
            before = outcome_snapshot(admin.catalog)
            try:
                if role in allowed:
                    try:
                        call(caller, runner)
                    except PermissionDenied as exc:
                        pytest.fail(f"{role} was refused {operation}: {exc}")
                    except LayerDeskError:
                        pass  # past the role checks: refused for its input
                    else:
                        runner.wait(runner.running()[0], 60) if runner.running() else None
                    continue
                with pytest.raises(PermissionDenied, match=f"may not {wording}"):
                    call(caller, runner)
                with admin.catalog.read() as session:
                    last = session.query(AuditEntry).order_by(AuditEntry.id.desc()).first()
                    assert last is not None
                    assert (last.user, last.operation, last.outcome) == (
                        f"caller-{role.name.lower()}", operation, AuditOutcome.DENIED)
                assert outcome_snapshot(admin.catalog) == before
            finally:
                runner.shutdown(timeout_s=30)


def test_two_versions_of_the_same_content_share_their_objects(homes: tuple[Ctl, Ctl], tmp_path: Path) -> None:
    first, second = homes
    reg = TOOLS.reg_file(tmp_path)
    assert reg is not None
    status, _, err = first("layer", "import", "Tools", "--version", "1b", "--from", str(tmp_path / "sources" / "Tools"),
                           "--registry", str(reg))
    assert status == 0, err
    folder = tmp_path / "export"
    result = first.json("export", "--to", str(folder), "Tools")
    assert isinstance(result, dict) and result["skipped"] == ["Tools:1b"]
    versions = _versions(_manifest(folder))
    assert versions["Tools:1"]["checksum"] == versions["Tools:1b"]["checksum"]
    assert versions["Tools:1"]["objects"] == versions["Tools:1b"]["objects"]
    for version in versions.values():
        for item in version["objects"]:
            assert hashlib.sha256((folder / item["path"]).read_bytes()).hexdigest() == item["sha256"]
    imported = second.json("import", "--from", str(folder))
    assert isinstance(imported, dict) and sorted(imported["copied"]) == ["Tools:1", "Tools:1b", "Win11:1"]
