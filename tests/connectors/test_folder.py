"""The folder connector on a local folder: names, sidecar, no overwrite, a missing folder, a full disk and
a cancel mid-copy, each leaving nothing half-written; and ``layerctl connector add|fields|test``."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

import pytest

from app.connectors import connector_for
from app.connectors.base import ConnectorSettings
from app.connectors.folder import FolderConnector
from app.errors import Conflict, NotFound, UserError, ValidationError
from app.services import Services
from app.services.connectors import CONNECTOR_TYPES
from app.tasks.base import TaskCanceled
from tests.connectors.conftest import Flag, MiB, image_file, sidecar_for
from tests.support.tools import small_filesystem
from tests.unit.test_cli import Ctl, ctl  # noqa: F401 - the fixture

NAME = "Gold_20250301T101500Z.vhdx"
SIDECAR = "Gold_20250301T101500Z.json"


def _settings(folder: Path | str) -> ConnectorSettings:
    return ConnectorSettings("Lab-Folder", "folder", str(folder))


def _sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def test_delivers_the_image_and_its_sidecar_under_the_template_and_utc_time(tmp_path: Path) -> None:
    image = image_file(tmp_path / "published")
    out = tmp_path / "images"
    out.mkdir()
    seen: list[float] = []
    result = FolderConnector().deliver(image, sidecar_for(image), _settings(out), None,
                                       lambda percent, _: seen.append(percent), Flag())
    assert sorted(os.listdir(out)) == [SIDECAR, NAME]
    assert _sha256(out / NAME) == _sha256(image)
    note = json.loads((out / SIDECAR).read_text(encoding="utf-8"))
    assert (note["template"], note["template_revision"], note["format"], note["size_bytes"]) == \
        ("Gold", 3, "vhdx", 3 * MiB)
    assert note["checksum"] == _sha256(image) and note["created_by"] == "admin"
    assert note["created_at"] == "2025-03-01T10:15:00+00:00"
    assert [(x["layer"], x["version"], x["checksum"]) for x in note["layers"]] == \
        [("Win11", "1", "sha256:" + "a" * 64), ("Office", "2024", "sha256:" + "b" * 64)]
    assert result.location == str(out / NAME) and result.ids["sidecar"] == str(out / SIDECAR)
    assert seen and seen[-1] == 100.0


def test_a_name_clash_is_refused_and_the_existing_file_is_untouched(tmp_path: Path) -> None:
    image = image_file(tmp_path / "published")
    out = tmp_path / "images"
    out.mkdir()
    (out / NAME).write_bytes(b"someone else's image")
    with pytest.raises(Conflict, match="already exists; it is never overwritten"):
        FolderConnector().deliver(image, sidecar_for(image), _settings(out), None, lambda *_: None, Flag())
    assert os.listdir(out) == [NAME] and (out / NAME).read_bytes() == b"someone else's image"


def test_a_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    image = image_file(tmp_path / "published")
    with pytest.raises(NotFound, match=r"images does not exist; create it or correct the connector's folder"):
        FolderConnector().deliver(image, sidecar_for(image), _settings(tmp_path / "images"), None,
                                  lambda *_: None, Flag())
    assert not (tmp_path / "images").exists()
    report = FolderConnector().test(_settings(tmp_path / "images"), None)
    assert not report.ok and [(s.name, s.ok) for s in report.steps] == \
        [("folder", False), ("write", None), ("space", None)]
    assert "does not exist" in (report.failure or "")


def test_the_test_reports_each_step(tmp_path: Path) -> None:
    out = tmp_path / "images"
    out.mkdir()
    report = connector_for("folder").test(_settings(out), None)
    assert report.ok and [s.name for s in report.steps] == ["folder", "write", "space"]
    assert "GiB free" in report.steps[2].detail
    assert os.listdir(out) == []  # the probe file is gone


def test_a_relative_folder_is_refused() -> None:
    with pytest.raises(ValidationError, match="not an absolute path"):
        FolderConnector().validate("images", "", {})



def test_a_full_disk_is_a_clear_error_and_leaves_nothing(tmp_path: Path) -> None:
    image = image_file(tmp_path / "published", size=12 * MiB)
    with small_filesystem(tmp_path / "small", "8m") as out:
        with pytest.raises(UserError, match="MiB free but the image needs 12 MiB; free some space"):
            FolderConnector().deliver(image, sidecar_for(image), _settings(out), None, lambda *_: None, Flag())
        assert os.listdir(out) == []
        # Space that runs out during the copy (another writer filled it): same cleanliness.
        (out / "filler").write_bytes(b"\0" * (4 * MiB))
        small = image_file(tmp_path / "published", "Small.raw", size=3 * MiB)

        def fill(_percent: float, _message: str) -> None:
            with contextlib.suppress(OSError), (out / "late").open("ab") as late:
                late.write(b"\0" * (8 * MiB))

        with contextlib.suppress(UserError):
            FolderConnector().deliver(small, sidecar_for(small, template="Small"), _settings(out), None, fill,
                                      Flag())
        assert not [n for n in os.listdir(out) if n.endswith(".partial")]


def test_cancel_mid_copy_leaves_nothing(tmp_path: Path) -> None:
    image = tmp_path / "published" / "Gold_2025-03-01_10-15.raw"
    image.parent.mkdir()
    with image.open("wb") as file:
        file.truncate(300 * MiB)  # several copy chunks
    out = tmp_path / "images"
    out.mkdir()
    flag = Flag()
    steps: list[float] = []

    def progress(percent: float, _message: str) -> None:
        steps.append(percent)
        flag.cancelled = True  # after the first chunk

    with pytest.raises(TaskCanceled):
        FolderConnector().deliver(image, sidecar_for(image), _settings(out), None, progress, flag)
    assert len(steps) == 1 and steps[0] < 100
    assert os.listdir(out) == []


# --- layerctl ---------------------------------------------------------------------------------------


def test_connector_add_checks_the_settings_against_the_type(ctl: Ctl, tmp_path: Path) -> None:  # noqa: F811
    status, _, err = ctl("connector", "add", "Lab", "--type", "folder", "--endpoint", str(tmp_path),
                         "--option", "datastore=ds1")
    assert status == 3 and "has no setting 'datastore'; its settings are port" in err
    status, _, err = ctl("connector", "add", "Lab", "--type", "folder", "--endpoint", "relative/path")
    assert status == 3 and "not an absolute path" in err
    status, _, err = ctl("connector", "add", "Lab", "--type", "libvirt", "--endpoint", "qemu:///system",
                         "--option", "pool=p", "--option", "disk_bus=scsi")
    assert status == 3 and "Disk bus: 'scsi' is not one of virtio, sata, ide" in err
    status, _, err = ctl("connector", "add", "Lab", "--type", "libvirt", "--endpoint", "qemu:///system")
    assert status == 3 and "Storage pool is required" in err
    assert ctl.json("connector", "list") == []
    info = ctl.json("connector", "add", "Lab", "--type", "libvirt", "--endpoint", "test:///default",
                    "--option", "pool=default-pool", "--option", "memory_mb=2048", "--option", "start=no")
    assert info["options"] == {"pool": "default-pool", "memory_mb": 2048, "start": False}  # type: ignore[index]


#: A connector type this LayerDesk names but cannot publish to (as a catalog from a newer one might hold).
FUTURE_TYPE = ("future-cloud", "A platform a later LayerDesk publishes to")


def test_every_connector_type_has_an_implementation() -> None:
    from app.connectors import REGISTRY

    assert set(CONNECTOR_TYPES) == set(REGISTRY)


def test_connector_fields_lists_what_the_form_shows(ctl: Ctl) -> None:  # noqa: F811
    fields = ctl.json("connector", "fields", "libvirt")
    assert isinstance(fields, list)
    by_key = {f["key"]: f for f in fields}
    assert by_key["password"]["secret"] is True and by_key["pool"]["required"] is True
    assert by_key["disk_bus"]["choices"] == ["virtio", "sata", "ide"]
    status, _, err = ctl("connector", "fields", FUTURE_TYPE[0])  # a type this LayerDesk does not know
    assert status == 2 and "'future-cloud' is not one of" in err


def test_connector_test_reports_each_step_and_exits_3_on_a_failure(ctl: Ctl, tmp_path: Path) -> None:  # noqa: F811
    ctl.json("connector", "add", "Here", "--type", "folder", "--endpoint", str(tmp_path / "out"))
    status, out, _ = ctl("connector", "test", "Here")
    assert status == 3 and "FAIL  folder" in out and "does not exist" in out and "-     write" in out
    (tmp_path / "out").mkdir()
    report = ctl.json("connector", "test", "Here")
    assert report["ok"] is True and [s["name"] for s in report["steps"]] == ["folder", "write", "space"]  # type: ignore[index]


def test_a_connector_of_a_type_without_an_implementation_says_so(admin: Services,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(CONNECTOR_TYPES, *FUTURE_TYPE)
    admin.connectors.add_connector("VC", FUTURE_TYPE[0], endpoint="vc.lab.test")
    with pytest.raises(ValidationError, match="type 'future-cloud' cannot test or publish yet"):
        admin.connectors.test_connector("VC")
