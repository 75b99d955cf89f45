"""Syncing the Elastic Layer repository to the real test DC's ``[layers]`` share, read back over SMB."""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.catalog.models import AuditOutcome, LayerType, PrincipalKind, Role, TaskState
from app.elastic.repository import FILES, LAYERS_FILE, ElasticRepository, read_repository
from app.elastic.sync import (
    ShareAccessDenied,
    ShareError,
    ShareSession,
    SyncCanceled,
    SyncResult,
    parse_share,
    sync_repository,
)
from app.engine.repository import CaptureSource, LayerRepository, SourceKind
from app.errors import PermissionDenied
from app.services import Services, open_catalog
from app.services.elastic import ElasticService, ElasticSyncResult
from app.tasks.runner import TaskEvent, TaskRunner
from tests.conftest import ADMIN, ServicesFactory, make_deployable
from tests.support import samba_dc
from tests.support.host_relay import HostRelay
from tests.support.keyring_memory import MemoryKeyring
from tests.support.repository_checks import make_tree
from tests.unit.test_cli import Ctl

SHARE = r"\\127.0.0.1\layers"
ACCOUNT = f"Administrator@{samba_dc.DNS_DOMAIN}"
USER_SID = "S-1-5-21-1004336348-1177238915-682003330-1105"
GROUP_SID = "S-1-5-21-1004336348-1177238915-682003330-1201"


class Flag:
    def __init__(self) -> None:
        self.cancelled = False


@pytest.fixture
def share(samba: samba_dc.RunningDC) -> Iterator[ShareSession]:
    """A session on the empty ``[layers]`` share (emptied again afterwards)."""
    session = ShareSession(parse_share(SHARE), ACCOUNT, samba_dc.ADMIN_PASSWORD)
    _empty(samba)
    try:
        yield session
    finally:
        session.close()
        _empty(samba)


def _empty(samba: samba_dc.RunningDC) -> None:
    import shutil

    for child in (samba.root / "layers").iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()


def _store(services: Services, ref: str, files: dict[str, bytes], scratch: Path) -> None:
    """Give the version ``ref`` real content in the repository and make it deployable."""
    layer, version = ref.split(":")
    if not any(v.name == version for v in services.layers.get_layer(layer).versions):
        services.layers.add_version(layer, version)
    layer_id = services.layers.get_layer(layer).layer.id
    version_id = services.layers.get_version(ref).id
    folder = make_tree(scratch / f"{layer}-{version}", files)
    stored = LayerRepository(services.home.repository).store_version(
        layer_id, version_id, CaptureSource(SourceKind.FOLDER, folder))
    make_deployable(services, ref, size=stored.data_bytes, checksum=stored.checksum)


@pytest.fixture
def elastic(admin: Services, tmp_path: Path) -> Services:
    """Viewer 1.0 and 2.0 and Editor 1.0 with real content; Viewer 1.0 → a user, Editor 1.0 → a group,
    the group associated with VDA-*."""
    admin.layers.create_layer("Win11", LayerType.OS)
    for name in ("Viewer", "Editor"):
        admin.layers.create_layer(name, LayerType.APP, os_layer="Win11")
    _store(admin, "Viewer:1.0", {"Program Files/Viewer/viewer.exe": b"MZ viewer 1" * 3000}, tmp_path)
    _store(admin, "Viewer:2.0", {"Program Files/Viewer/viewer.exe": b"MZ viewer 2" * 3000}, tmp_path)
    _store(admin, "Editor:1.0", {"Program Files/Editor/editor.exe": b"MZ editor" * 5000}, tmp_path)
    admin.assignments.assign("Viewer:1.0", PrincipalKind.AD_USER, USER_SID, r"LAB\alice")
    admin.assignments.assign("Editor:1.0", PrincipalKind.AD_GROUP, GROUP_SID, r"LAB\Finance-Users")
    admin.assignments.add_machine_association(GROUP_SID, r"LAB\Finance-Users", "VDA-*")
    return admin


def _read_back(session: ShareSession) -> ElasticRepository:
    """The share's repository, every JSON file validated and every disk's size and checksum checked."""
    files = {name: session.read(name) for name in FILES}
    repository = read_repository({k: v for k, v in files.items() if v is not None})
    for entry in repository.layers:
        data = session.read(entry.disk)
        assert data is not None, entry.disk
        assert len(data) == entry.size_bytes
        assert f"sha256:{hashlib.sha256(data).hexdigest()}" == entry.disk_checksum
    return repository


def _names(session: ShareSession, folder: str) -> list[str]:
    return sorted(session.listdir(folder))


def test_full_sync_then_nothing_then_only_what_changed(elastic: Services, share: ShareSession) -> None:
    service = ElasticService.for_services(elastic)
    seen: list[tuple[int, str]] = []
    first = service.sync(SHARE, ACCOUNT, samba_dc.ADMIN_PASSWORD, comment="first",
                         progress=lambda p, m: seen.append((p, m)))
    assert len(first.copied) == 2 and first.kept == () and set(first.replaced) == set(FILES)
    assert seen[-1] == (100, "done") and any(m.startswith("copying Viewer") for _, m in seen)
    back = _read_back(share)
    assert {(e.layer, e.version) for e in back.layers} == {("Viewer", "1.0"), ("Editor", "1.0")}
    assert {(a.name, a.kind) for a in back.assignments} == {(r"LAB\alice", "user"), (r"LAB\Finance-Users", "group")}
    assert [(a.sid, a.pattern) for a in back.associations] == [(GROUP_SID, "VDA-*")]
    assert set(first.copied) == {e.disk for e in back.layers}
    (audit,) = elastic.audit.list_entries(operation="elastic.sync")
    assert audit.comment == "first" and audit.object_name == SHARE and audit.change["user"] == ACCOUNT

    again = service.sync(SHARE, ACCOUNT, samba_dc.ADMIN_PASSWORD)
    assert (again.copied, again.replaced, again.deleted, again.bytes_copied) == ((), (), (), 0)
    assert set(again.kept) == set(first.copied) and set(again.unchanged) == set(FILES)

    elastic.assignments.assign("Viewer:2.0", PrincipalKind.AD_USER, USER_SID, r"LAB\alice")
    changed = service.sync(SHARE, ACCOUNT, samba_dc.ADMIN_PASSWORD)
    (viewer2,) = changed.copied
    assert viewer2.startswith(f"Layers\\{elastic.layers.get_layer('Viewer').layer.id}\\")
    editor = next(e.disk for e in back.layers if e.layer == "Editor")
    old_viewer = next(e.disk for e in back.layers if e.layer == "Viewer")
    assert changed.kept == (editor,) and changed.deleted == (old_viewer,)
    assert set(changed.replaced) == {LAYERS_FILE, "ElasticLayerAssignment.json"}
    back = _read_back(share)
    assert {(e.layer, e.version) for e in back.layers} == {("Viewer", "2.0"), ("Editor", "1.0")}
    assert share.size(old_viewer) is None


def test_an_interrupted_sync_keeps_the_previous_repository_and_a_rerun_finishes(
        elastic: Services, share: ShareSession, tmp_path: Path) -> None:
    service = ElasticService.for_services(elastic)
    service.sync(SHARE, ACCOUNT, samba_dc.ADMIN_PASSWORD)
    before = {name: share.read(name) for name in FILES}
    elastic.assignments.assign("Viewer:2.0", PrincipalKind.AD_USER, USER_SID, r"LAB\alice")
    repository = LayerRepository(elastic.home.repository)
    cache = elastic.home.root / "cache" / "elastic"

    # Canceled in the middle of copying the new disk: the JSON files are the previous ones.
    flag = Flag()

    def cancel_mid_copy(percent: int, message: str) -> None:
        if message.startswith("copying"):
            flag.cancelled = True

    with pytest.raises(SyncCanceled, match="keeps its previous repository"):
        sync_repository(share, service.sync_plan(), repository, cache, progress=cancel_mid_copy, cancel=flag)
    assert {name: share.read(name) for name in FILES} == before
    assert any(n.endswith(".partial") for n in _names(share, f"Layers\\{elastic.layers.get_layer('Viewer').layer.id}"))
    _read_back(share)

    # The connection dropped mid-copy: a clear error, and still the previous repository.
    relay = HostRelay(("127.0.0.1", 445))
    try:
        dropping = ShareSession(parse_share(SHARE), ACCOUNT, samba_dc.ADMIN_PASSWORD, port=relay.port)

        def drop_mid_copy(percent: int, message: str) -> None:
            if message.startswith("copying"):
                relay.cut()

        with pytest.raises(ShareError, match=r"connection to 127\.0\.0\.1 failed.*run the sync again"):
            sync_repository(dropping, service.sync_plan(), repository, cache, progress=drop_mid_copy)
        dropping.close()
    finally:
        relay.close()
    assert {name: share.read(name) for name in FILES} == before

    resumed = service.sync(SHARE, ACCOUNT, samba_dc.ADMIN_PASSWORD)
    assert len(resumed.copied) == 1 and len(resumed.kept) == 1
    back = _read_back(share)
    assert {(e.layer, e.version) for e in back.layers} == {("Viewer", "2.0"), ("Editor", "1.0")}
    leftovers = [n for layer in _names(share, "Layers") for n in _names(share, f"Layers\\{layer}")
                 if n.endswith(".partial")]
    assert leftovers == [] and not any(n.endswith(".tmp") for n in _names(share, ""))


def test_the_sync_task_reports_its_result_and_keeps_the_password_out_of_the_catalog(
        elastic: Services, share: ShareSession) -> None:
    runner = TaskRunner(elastic.catalog, elastic.caller, poll_s=0.05, progress_interval_s=0.0)
    seen: list[TaskEvent] = []
    runner.subscribe(seen.append)
    try:
        task = ElasticService.for_services(elastic).start_sync(runner, SHARE, ACCOUNT, samba_dc.ADMIN_PASSWORD,
                                                               comment="as a task")
        assert task.task_id is not None and runner.wait(task.task_id, timeout_s=120) is TaskState.COMPLETE
    finally:
        runner.shutdown()
    info = elastic.tasks.get_task(task.task_id)
    assert info.kind == "elastic.sync" and info.result is not None and info.result["type"] == ElasticSyncResult.__name__
    assert len(info.result["copied"]) == 2 and set(info.result["replaced"]) == set(FILES)
    assert info.result["bytes_copied"] > 0 and info.result["bytes_resumed"] == 0
    assert any(e.message.startswith("copying Viewer") for e in seen)
    lines = [line.text for line in elastic.tasks.log(task.task_id)]
    assert lines[:2] == [f"Copied {disk}." for disk in info.result["copied"]]
    (audit,) = elastic.audit.list_entries(operation="elastic.sync")
    assert audit.comment == "as a task" and audit.change["copied"] == info.result["copied"]
    _read_back(share)
    catalog_bytes = b"".join(p.read_bytes() for p in elastic.home.root.glob("catalog.sqlite*"))
    assert samba_dc.ADMIN_PASSWORD.encode() not in catalog_bytes
    assert samba_dc.ADMIN_PASSWORD.encode("utf-16-le") not in catalog_bytes


def test_canceling_the_sync_task_through_the_catalog_keeps_the_previous_repository(
        elastic: Services, share: ShareSession) -> None:
    service = ElasticService.for_services(elastic)
    service.sync(SHARE, ACCOUNT, samba_dc.ADMIN_PASSWORD)
    before = {name: share.read(name) for name in FILES}
    elastic.assignments.assign("Viewer:2.0", PrincipalKind.AD_USER, USER_SID, r"LAB\alice")

    # Progress is written (and heard) at every report; the first one of the copy asks the catalog to
    # cancel the task, as `layerctl task cancel` in another process would, then holds the copy until the
    # runner's watcher (polling every 50 ms) has had ample time to pass the request on.
    runner = TaskRunner(elastic.catalog, elastic.caller, poll_s=0.05, progress_interval_s=0.0)
    asked = threading.Event()

    def cancel_mid_copy(event: TaskEvent) -> None:
        if event.message.startswith("copying") and not asked.is_set():
            asked.set()
            elastic.tasks.cancel(event.task_id, comment="stop it")
            threading.Event().wait(1.0)

    runner.subscribe(cancel_mid_copy)
    try:
        task = service.start_sync(runner, SHARE, ACCOUNT, samba_dc.ADMIN_PASSWORD)
        assert task.task_id is not None
        assert runner.wait(task.task_id, timeout_s=120) is TaskState.CANCELED
    finally:
        runner.shutdown()
    assert asked.is_set()
    info = elastic.tasks.get_task(task.task_id)
    assert info.state is TaskState.CANCELED and info.result is None
    assert any("keeps its previous repository" in line.text for line in elastic.tasks.log(task.task_id))
    assert {name: share.read(name) for name in FILES} == before
    viewer = elastic.layers.get_layer("Viewer").layer.id
    assert any(n.endswith(".partial") for n in _names(share, f"Layers\\{viewer}"))
    assert len(elastic.audit.list_entries(operation="elastic.sync")) == 1  # the first sync only
    _read_back(share)

    # Running it again finishes it.
    again = service.sync(SHARE, ACCOUNT, samba_dc.ADMIN_PASSWORD)
    assert len(again.copied) == 1
    assert {(e.layer, e.version) for e in _read_back(share).layers} == {("Viewer", "2.0"), ("Editor", "1.0")}


def test_wrong_password_unreachable_host_and_missing_share_are_clear(elastic: Services, share: ShareSession) -> None:
    service = ElasticService.for_services(elastic)
    with pytest.raises(ShareAccessDenied, match=r"127\.0\.0\.1 refused the user name or password") as refused:
        service.sync(SHARE, ACCOUNT, "Not-The-Passw0rd!")
    assert "Not-The-Passw0rd!" not in str(refused.value)
    with pytest.raises(ShareError, match=r"connection to 127\.0\.0\.2 failed.*port 445"):
        service.sync(r"\\127.0.0.2\layers", ACCOUNT, samba_dc.ADMIN_PASSWORD)
    with pytest.raises(ShareError, match="no share named 'nosuch'"):
        service.sync(r"\\127.0.0.1\nosuch", ACCOUNT, samba_dc.ADMIN_PASSWORD)
    assert share.listdir("") == []
    assert elastic.audit.list_entries(operation="elastic.sync") == []


def test_sync_needs_the_elastic_role_and_refusals_are_audited(elastic: Services, share: ShareSession,
                                                              services_for: ServicesFactory) -> None:
    for role in Role:
        service = ElasticService.for_services(services_for(role))
        if role in (Role.ADMINISTRATOR, Role.MANAGE_ELASTIC_ASSIGNMENTS):
            assert isinstance(service.sync(SHARE, ACCOUNT, samba_dc.ADMIN_PASSWORD), SyncResult)
            continue
        with pytest.raises(PermissionDenied, match="change elastic layer assignments"):
            service.sync(SHARE, ACCOUNT, samba_dc.ADMIN_PASSWORD)
    denied = [e for e in elastic.audit.list_entries(operation="elastic.sync") if e.outcome is AuditOutcome.DENIED]
    assert len(denied) == len(Role) - 2

    # As a task: refused before anything is recorded, and audited the same way.
    reader = services_for(Role.READ_ONLY)
    runner = TaskRunner(reader.catalog, reader.caller)
    try:
        with pytest.raises(PermissionDenied, match="change elastic layer assignments"):
            ElasticService.for_services(reader).start_sync(runner, SHARE, ACCOUNT, samba_dc.ADMIN_PASSWORD)
    finally:
        runner.shutdown()
    assert elastic.tasks.list_tasks(kind="elastic.sync") == []
    denied = [e for e in elastic.audit.list_entries(operation="elastic.sync") if e.outcome is AuditOutcome.DENIED]
    assert len(denied) == len(Role) - 1


def _ctl_with_an_assigned_layer(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                monkeypatch: pytest.MonkeyPatch) -> Ctl:
    """``layerctl`` on a new home where Viewer:1.0 (with content) is assigned to a user."""
    ctl = Ctl(tmp_path / "home", capsys, monkeypatch)
    ctl.json("init")
    ctl.json("layer", "create", "--type", "os", "Win11")
    ctl.json("layer", "create", "--type", "app", "Viewer", "--os-layer", "Win11")
    with _services(ctl) as services:
        _store(services, "Viewer:1.0", {"viewer.exe": b"MZ" * 1000}, tmp_path)
    ctl.json("elastic", "assign", "Viewer:1.0", "--user", USER_SID, "--name", r"LAB\alice")
    return ctl


@contextlib.contextmanager
def _services(ctl: Ctl) -> Iterator[Services]:
    """The Administrator's services on ``ctl``'s home, as another process would open them."""
    from app.paths import Home

    home = Home(ctl.home)
    catalog, secrets = open_catalog(home)
    try:
        yield Services.for_caller(home, catalog, ADMIN, secrets)
    finally:
        catalog.close()


def test_layerctl_elastic_sync(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                               memory_keyring: MemoryKeyring, share: ShareSession) -> None:
    ctl = _ctl_with_an_assigned_layer(tmp_path, capsys, monkeypatch)

    result = ctl.json("elastic", "sync", "--share", SHARE, "--user", ACCOUNT, "--password-stdin",
                      stdin=samba_dc.ADMIN_PASSWORD + "\n")
    assert isinstance(result, dict) and len(result["copied"]) == 1 and isinstance(result["task"], int)
    assert {"share", "copied", "kept", "replaced", "unchanged", "deleted", "bytes_copied"} <= set(result)
    status, out, err = ctl("elastic", "sync", "--share", SHARE, "--user", ACCOUNT, "--password-stdin",
                           stdin=samba_dc.ADMIN_PASSWORD + "\n")
    assert status == 0 and "0 disk(s) copied" in out and "1 already there" in out
    status, out, err = ctl("elastic", "sync", "--share", SHARE, "--user", ACCOUNT, "--password-stdin",
                           stdin="Wrong-Passw0rd!\n")
    assert status == 4 and "refused the user name or password" in err
    assert "Wrong-Passw0rd!" not in out + err
    _read_back(share)
    catalog_bytes = b"".join(p.read_bytes() for p in ctl.home.glob("catalog.sqlite*"))
    for password in (samba_dc.ADMIN_PASSWORD, "Wrong-Passw0rd!"):
        assert password.encode() not in catalog_bytes
    tasks = ctl.json("task", "list")
    assert isinstance(tasks, list) and [t["kind"] for t in tasks].count("elastic.sync") == 3


def test_layerctl_elastic_sync_canceled_through_the_catalog_exits_130(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        memory_keyring: MemoryKeyring, share: ShareSession) -> None:
    ctl = _ctl_with_an_assigned_layer(tmp_path, capsys, monkeypatch)
    # The sync is held before its layer disk until the cancel has reached it, so the cancel (sent through
    # the catalog, as `layerctl task cancel` from another shell would) always lands mid-sync.
    from app.elastic import sync as sync_module

    making_disk = sync_module.cached_disk

    def held(*args: Any, cancel: Any = None, **kwargs: Any) -> Any:
        for _ in range(200):
            if cancel is not None and cancel.cancelled:
                break
            threading.Event().wait(0.05)
        return making_disk(*args, cancel=cancel, **kwargs)

    monkeypatch.setattr(sync_module, "cached_disk", held)
    canceled: list[int] = []

    def cancel_the_sync() -> None:
        with _services(ctl) as services:
            for _ in range(200):
                running = services.tasks.list_tasks(kind="elastic.sync", states=(TaskState.RUNNING,))
                if running:
                    services.tasks.cancel(running[0].id, comment="from another shell")
                    canceled.append(running[0].id)
                    return
                threading.Event().wait(0.05)

    canceller = threading.Thread(target=cancel_the_sync)
    canceller.start()
    try:
        status, _out, err = ctl("elastic", "sync", "--share", SHARE, "--user", ACCOUNT, "--password-stdin",
                                stdin=samba_dc.ADMIN_PASSWORD + "\n")
    finally:
        canceller.join(timeout=30)
    assert canceled and status == 130
    assert f"The sync was canceled (task {canceled[0]}); the share keeps its previous repository" in err
    assert [name for name in FILES if share.read(name) is not None] == []
    with _services(ctl) as services:
        assert services.tasks.get_task(canceled[0]).state is TaskState.CANCELED
        assert services.audit.list_entries(operation="elastic.sync") == []
