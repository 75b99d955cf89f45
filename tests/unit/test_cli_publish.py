"""``layerctl image publish`` and ``layerctl template conflicts``, on layers imported for real
(tests/support/compose_stack.py), and the publish task's bad cases: a template that is not publishable, a disk
too small, a cancel. Images are checked with wimlib-imagex and qemu-img; the record's checksum with hashlib."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from app.catalog.database import Catalog
from app.catalog.models import AuditOutcome, DiskFormat, LayerType, PublishedImage, Role, TaskState
from app.errors import PermissionDenied
from app.services import Services
from app.services.templates import TemplateSpec
from app.tasks.runner import TaskRunner
from tests.conftest import ServicesFactory, make_deployable
from tests.support.compose_stack import (
    CITRIX,
    EXPECTED_CONFLICTS,
    EXPECTED_DIRS,
    EXPECTED_FILES,
    OFFICE,
    TOOLS,
    os_layer,
)
from tests.support.image_checksum import image_checksum
from tests.support.keyring_memory import MemoryKeyring
from tests.support.tools import run_ok
from tests.unit.test_cli import Ctl

MiB = 1024 * 1024


@pytest.fixture
def cli(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        memory_keyring: MemoryKeyring) -> Ctl:
    """A home with the stack imported through ``layerctl layer import`` and templates over it."""
    ctl = Ctl(tmp_path / "home", capsys, monkeypatch)
    sources = tmp_path / "sources"
    commands: list[tuple[str, ...]] = [
        ("layer", "create", "--type", "os", "Win11"),
        ("layer", "create", "--type", "app", "Office", "--os-layer", "Win11"),
        ("layer", "create", "--type", "app", "Tools", "--os-layer", "Win11"),  # newer: higher priority
        ("layer", "create", "--type", "platform", "Citrix", "--os-layer", "Win11"),
    ]
    for layer in (os_layer(tmp_path), OFFICE, TOOLS, CITRIX):
        reg = layer.reg_file(tmp_path)
        commands.append(("layer", "import", layer.name, "--version", "1", "--from", str(layer.folder(sources)),
                         *(("--registry", str(reg)) if reg else ())))
    commands += [
        ("template", "create", "Gold", "--os", "Win11:1", "--app", "Office:1", "--app", "Tools:1",
         "--platform", "Citrix:1", "--format", "vhdx", "--size-gb", "1"),
        ("template", "create", "GoldWim", "--os", "Win11:1", "--app", "Office:1", "--app", "Tools:1",
         "--platform", "Citrix:1", "--format", "wim", "--size-gb", "1"),
    ]
    for args in commands:
        status, _, err = ctl(*args)
        assert status == 0, (args, err)
    return ctl


def test_template_conflicts_prints_the_exact_report(cli: Ctl) -> None:
    assert cli.json("template", "conflicts", "Gold") == EXPECTED_CONFLICTS
    status, out, _ = cli("template", "conflicts", "Gold")
    assert status == 0
    assert "Windows\\Temp\\old.log" in out and "Tools (removes)" in out and "Win11 < Office" in out


def test_publish_wim_with_wait_and_json(cli: Ctl, tmp_path: Path) -> None:
    out_dir = tmp_path / "published" / "gold"  # created on the way, parents included
    result = cli.json("image", "publish", "GoldWim", "--output", str(out_dir), "--wait", "--comment", "gold")
    assert isinstance(result, dict)
    path = Path(result["path"])
    assert path.parent == out_dir and path.name.startswith("GoldWim_") and path.suffix == ".wim"
    assert [p.name for p in out_dir.iterdir()] == [path.name]
    listed = {line for line in run_ok("wimlib-imagex", "dir", path, "1").stdout.splitlines() if line}
    assert listed == {"/", *(f"/{p}" for p in EXPECTED_DIRS), *(f"/{p}" for p in EXPECTED_FILES)}
    assert result["checksum"] == image_checksum(path) and result["size_bytes"] == path.stat().st_size
    images = cli.json("image", "list")
    assert isinstance(images, list) and len(images) == 1
    record = images[0]
    assert (record["name"], record["location"], record["checksum"], record["size_bytes"], record["conflict_count"]) \
        == (path.stem, str(path), image_checksum(path), path.stat().st_size, len(EXPECTED_CONFLICTS))
    assert [entry["layer"] for entry in record["layers"]] == ["Win11", "Office", "Tools", "Citrix"]
    task = cli.json("task", "show", str(result["task"]))
    assert isinstance(task, dict) and (task["kind"], task["state"]) == ("image.publish", "complete")


def test_publish_vhdx_prints_the_task_then_the_image(cli: Ctl, tmp_path: Path) -> None:
    status, out, err = cli("image", "publish", "Gold", "--wait")
    assert status == 0, err
    first, second = out.splitlines()
    assert first.startswith("Task ") and first.endswith(": publishing template Gold.")
    assert "[  1%] Reading the layers' manifests" in err.splitlines()
    published = cli.home / "published"
    (path,) = published.iterdir()
    assert path.suffix == ".vhdx" and second.startswith(f"Published {path.stem} to {path} (")
    run_ok("qemu-img", "check", "-f", "vhdx", path)
    info = json.loads(run_ok("qemu-img", "info", "--output=json", path).stdout)
    assert info["virtual-size"] == 1024 * MiB
    (record,) = cli.json("image", "list")  # type: ignore[misc]
    assert record["checksum"] == image_checksum(path)
    # Without --wait: the task runs in a background process; the command returns with its id at once.
    status, out, err = cli("--json", "image", "publish", "GoldWim", "--comment", "nightly")
    assert status == 0, err
    started = json.loads(out)
    assert started["background"] is True and "[" not in err
    deadline = time.monotonic() + 120
    task = cli.json("task", "show", str(started["task"]))
    while task["state"] in ("pending", "running") and time.monotonic() < deadline:  # type: ignore[index]
        time.sleep(0.2)
        task = cli.json("task", "show", str(started["task"]))
    assert (task["kind"], task["state"]) == ("image.publish", "complete"), task  # type: ignore[index]
    wim = Path(task["result"]["path"])  # type: ignore[index]
    assert wim.parent == published and wim.suffix == ".wim"
    assert {image["name"] for image in cli.json("image", "list")} == {path.stem, wim.stem}  # type: ignore[union-attr,index]
    newest = cli.json("audit", "list", "--operation", "image.publish", "--limit", "1")
    assert [e["comment"] for e in newest] == ["nightly"]  # type: ignore[union-attr,index]


def test_image_verify_checks_the_file_or_a_copy_against_the_recorded_checksum(cli: Ctl, tmp_path: Path) -> None:
    """The record's checksum is the block checksum coreutils computes; verify reads the file (or a copy)
    and refuses a copy with one byte changed, naming both checksums; an image recorded with the SHA-256
    of the whole file (published before block checksums) is checked that way."""
    result = cli.json("image", "publish", "Gold", "--output", str(tmp_path / "out"), "--wait")
    assert isinstance(result, dict)
    path, name = Path(result["path"]), Path(result["path"]).stem
    assert result["checksum"] == image_checksum(path)

    assert cli.json("image", "verify", name) == {"name": name, "path": str(path), "checksum": result["checksum"]}
    images, image_bytes = cli.json("image", "list"), path.read_bytes()
    copy = tmp_path / "copy.vhdx"
    data = bytearray(path.read_bytes())
    copy.write_bytes(data)
    status, out, _ = cli("image", "verify", name, "--path", str(copy))
    assert status == 0 and out.strip() == f"{copy} is image {name} as it was published ({result['checksum']})."
    data[len(data) // 2] ^= 0xFF
    copy.write_bytes(data)
    status, _, err = cli("image", "verify", name, "--path", str(copy))
    assert status == 3
    assert f"{copy} is not image {name} as it was published: its checksum is {image_checksum(copy)}, the image " \
           f"was published with {result['checksum']}. The file is damaged or holds another image." in err
    assert cli.json("image", "verify", name) == {"name": name, "path": str(path), "checksum": result["checksum"]}

    status, _, err = cli("image", "verify", name, "--path", str(tmp_path / "nowhere.vhdx"))
    assert status == 3 and f"{tmp_path / 'nowhere.vhdx'} is not a file; give the path of a copy" in err
    status, _, err = cli("image", "verify", "NoSuchImage")
    assert status == 5 and "There is no published image named 'NoSuchImage'." in err
    assert cli.json("image", "list") == images and path.read_bytes() == image_bytes  # nothing changed

    whole = "sha256:" + run_ok("sha256sum", path).stdout.split()[0]
    catalog = Catalog(cli.home / "catalog.sqlite")
    with catalog.write() as session:
        session.scalars(select(PublishedImage).where(PublishedImage.name == name)).one().checksum = whole
    catalog.close()
    assert cli.json("image", "verify", name) == {"name": name, "path": str(path), "checksum": whole}


def test_publish_in_the_background_refuses_at_once_what_it_can_check(cli: Ctl) -> None:
    status, out, err = cli("image", "publish", "NoSuchTemplate")
    assert (status, out) == (5, "") and "no image template named 'NoSuchTemplate'" in err


def test_a_template_that_is_not_publishable_writes_nothing(cli: Ctl, tmp_path: Path) -> None:
    for args in (("layer", "version", "add", "Tools", "2"),
                 ("template", "update", "Gold", "--app", "Office:1", "--app", "Tools:2")):
        status, _, err = cli(*args)
        assert status == 0, err
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    status, out, err = cli("image", "publish", "Gold", "--output", str(out_dir), "--wait")
    assert status != 0 and out == ""
    assert err == ("layerctl: error: Template 'Gold' cannot be published yet: Tools:2 is editing, not deployable.\n")
    status, _, err = cli("template", "conflicts", "Gold")
    assert status != 0 and "Tools:2 is editing, not deployable" in err
    assert list(out_dir.iterdir()) == [] and cli.json("image", "list") == []


def test_a_disk_too_small_fails_the_task_and_writes_nothing(cli: Ctl, tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.mkdir()
    with (big / "blob.bin").open("wb") as file:
        file.truncate(1100 * MiB)  # sparse: cheap to make, 1.1 GB of data for the image
    for args in (("layer", "create", "--type", "app", "Big", "--os-layer", "Win11"),
                 ("layer", "import", "Big", "--version", "1", "--from", str(big)),
                 ("template", "create", "Small", "--os", "Win11:1", "--app", "Big:1", "--format", "raw",
                  "--size-gb", "1")):
        status, _, err = cli(*args)
        assert status == 0, err
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    status, _, err = cli("image", "publish", "Small", "--output", str(out_dir), "--wait")
    errors = [line for line in err.splitlines() if line.startswith("layerctl: error:")]
    assert status == 1 and len(errors) == 1
    assert "Publish of Small failed (task" in errors[0] and "make the template's disk larger" in errors[0]
    assert list(out_dir.iterdir()) == [] and cli.json("image", "list") == []


# --- cancel (through the services, as the console does) ----------------------------------------------------


def test_cancel_during_publish_leaves_no_file_and_no_record(admin: Services, tmp_path: Path) -> None:
    admin.imports.repository.ensure()
    runner = TaskRunner(admin.catalog, admin.caller, poll_s=0.05)
    try:
        admin.layers.create_layer("Win11", LayerType.OS)
        admin.layers.create_layer("Office", LayerType.APP, os_layer="Win11")
        sources = tmp_path / "sources"
        for layer in (os_layer(tmp_path), OFFICE):
            reg = layer.reg_file(tmp_path)
            task_id = admin.imports.start_import(runner, layer.name, "1", layer.folder(sources),
                                                 registry_files=[reg] if reg else [])
            assert runner.wait(task_id, 120) is TaskState.COMPLETE
        big = tmp_path / "big"
        big.mkdir()
        with (big / "blob.bin").open("wb") as file:
            file.truncate(400 * MiB)  # enough data for the cancel to land while the layers are staged
        admin.layers.create_layer("Big", LayerType.APP, os_layer="Win11")
        assert runner.wait(admin.imports.start_import(runner, "Big", "1", big), 120) is TaskState.COMPLETE
        admin.templates.create_template("Gold", TemplateSpec(os="Win11:1", apps=("Office:1", "Big:1"), size_gb=2))
        out_dir = tmp_path / "out"
        out_dir.mkdir()
        task_id = admin.publishing.publish(runner, "Gold", out_dir)
        deadline = time.monotonic() + 60
        while admin.tasks.get_task(task_id).progress < 5 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not admin.tasks.get_task(task_id).state.is_final
        admin.tasks.cancel(task_id, comment="changed my mind")
        state = runner.wait(task_id, 120)
        assert state is TaskState.CANCELED, admin.tasks.get_task(task_id)
        assert list(out_dir.iterdir()) == []
        with admin.catalog.read() as session:
            assert session.query(PublishedImage).count() == 0
    finally:
        runner.shutdown()


# --- roles -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("role", list(Role), ids=[r.name for r in Role])
def test_publishing_needs_the_publish_role_and_refusals_are_audited(
    role: Role, admin: Services, services_for: ServicesFactory, tmp_path: Path
) -> None:
    admin.layers.create_layer("Win11", LayerType.OS)
    admin.layers.add_version("Win11", "1")
    make_deployable(admin, "Win11:1", checksum="sha256:" + "0" * 64)  # in the catalog only: never imported
    admin.templates.create_template("Gold", TemplateSpec(os="Win11:1", disk_format=DiskFormat.WIM, size_gb=1))
    caller = services_for(role, username="someone")
    runner = TaskRunner(caller.catalog, caller.caller, poll_s=0.05)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    try:
        if role in (Role.ADMINISTRATOR, Role.PUBLISH_LAYERED_IMAGES):
            task_id = caller.publishing.publish(runner, "Gold", out_dir, comment="try")
            assert runner.wait(task_id, 120) is TaskState.FAILED  # the repository has no such version
            assert "no manifest for layer" in (admin.tasks.get_task(task_id).error or "")
        else:
            with pytest.raises(PermissionDenied, match="may not publish layered images"):
                caller.publishing.publish(runner, "Gold", out_dir, comment="try")
            (entry,) = [e for e in admin.audit.list_entries() if e.outcome is AuditOutcome.DENIED]
            assert (entry.user, entry.operation, entry.object_name) == ("someone", "image.publish", "Gold")
    finally:
        runner.shutdown()
    assert list(out_dir.iterdir()) == []
    with admin.catalog.read() as session:
        assert session.query(PublishedImage).count() == 0
