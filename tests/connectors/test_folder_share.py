r"""The folder connector on the real test DC's ``[layers]`` share (a subfolder of it), read back from the
DC's own files: delivery, wrong password, unreachable host, missing folder, cancel mid-copy, and handing a
delivered disk back (as it is now; gone, moved or cancelled)."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.connectors.base import ConnectorSettings
from app.connectors.folder import FolderConnector
from app.elastic.sync import ShareAccessDenied, ShareError
from app.errors import Conflict, NotFound, UserError
from app.tasks.base import TaskCanceled
from tests.connectors.conftest import Flag, MiB, image_file, sidecar_for
from tests.support import samba_dc

ACCOUNT = f"Administrator@{samba_dc.DNS_DOMAIN}"
SHARE = r"\\127.0.0.1\layers\connector-images"


@pytest.fixture
def share_folder(samba: samba_dc.RunningDC) -> Iterator[Path]:
    """The DC's own folder behind ``SHARE`` (made empty, removed afterwards)."""
    folder = samba.root / "layers" / "connector-images"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _settings(endpoint: str = SHARE, **options: object) -> ConnectorSettings:
    return ConnectorSettings("Lab-Share", "folder", endpoint, ACCOUNT, options=dict(options))


def test_delivers_to_the_share_and_refuses_a_clash(share_folder: Path, tmp_path: Path) -> None:
    image = image_file(tmp_path, size=9 * MiB)
    result = FolderConnector().deliver(image, sidecar_for(image), _settings(), samba_dc.ADMIN_PASSWORD,
                                       lambda *_: None, Flag())
    assert sorted(p.name for p in share_folder.iterdir()) == ["Gold_20250301T101500Z.json",
                                                              "Gold_20250301T101500Z.vhdx"]
    delivered = share_folder / "Gold_20250301T101500Z.vhdx"
    assert hashlib.sha256(delivered.read_bytes()).digest() == hashlib.sha256(image.read_bytes()).digest()
    assert json.loads((share_folder / "Gold_20250301T101500Z.json").read_text())["template"] == "Gold"
    assert result.location == SHARE + r"\Gold_20250301T101500Z.vhdx"
    with pytest.raises(Conflict, match="already exists; it is never overwritten"):
        FolderConnector().deliver(image, sidecar_for(image), _settings(), samba_dc.ADMIN_PASSWORD,
                                  lambda *_: None, Flag())
    assert len(list(share_folder.iterdir())) == 2


def test_the_share_test_reports_each_step(share_folder: Path) -> None:
    report = FolderConnector().test(_settings(), samba_dc.ADMIN_PASSWORD)
    assert report.ok and [s.name for s in report.steps] == ["sign in", "write"]
    assert list(share_folder.iterdir()) == []


def test_wrong_password_unreachable_host_and_missing_folder(share_folder: Path, tmp_path: Path) -> None:
    image = image_file(tmp_path)
    with pytest.raises(ShareAccessDenied, match="refused the user name or password"):
        FolderConnector().deliver(image, sidecar_for(image), _settings(), "wrong password 1", lambda *_: None, Flag())
    report = FolderConnector().test(_settings(), "wrong password 1")
    assert [s.ok for s in report.steps] == [False, None] and "wrong password" not in str(report)
    with pytest.raises(ShareError, match="Check that the host is reachable"):
        FolderConnector().deliver(image, sidecar_for(image), _settings(port=1), samba_dc.ADMIN_PASSWORD,
                                  lambda *_: None, Flag())
    with pytest.raises(ShareError, match="no folder 'nowhere'"):
        FolderConnector().deliver(image, sidecar_for(image), _settings(r"\\127.0.0.1\layers\nowhere"),
                                  samba_dc.ADMIN_PASSWORD, lambda *_: None, Flag())
    assert list(share_folder.iterdir()) == []


def test_cancel_mid_copy_leaves_nothing_on_the_share(share_folder: Path, tmp_path: Path) -> None:
    image = image_file(tmp_path, size=24 * MiB)
    flag = Flag()

    def progress(_percent: float, _message: str) -> None:
        flag.cancelled = True

    with pytest.raises(TaskCanceled):
        FolderConnector().deliver(image, sidecar_for(image), _settings(), samba_dc.ADMIN_PASSWORD, progress, flag)
    assert list(share_folder.iterdir()) == []


# --- handing a delivered disk back (finalizing a packaging machine) ----------------------------------------


def test_a_delivered_disk_comes_back_as_it_is_now(share_folder: Path, tmp_path: Path) -> None:
    image = image_file(tmp_path / "out", size=9 * MiB)
    result = FolderConnector().deliver(image, sidecar_for(image), _settings(), samba_dc.ADMIN_PASSWORD,
                                       lambda *_: None, Flag())
    delivered = share_folder / "Gold_20250301T101500Z.vhdx"
    with delivered.open("r+b") as file:  # the packaging machine wrote to its disk meanwhile
        file.seek(5 * MiB)
        file.write(b"installed by the packaging machine")
    reported: list[float] = []
    target = tmp_path / "back" / "disk.vhdx"
    target.parent.mkdir()
    back = FolderConnector().retrieve(result.ids, _settings(), samba_dc.ADMIN_PASSWORD, target,
                                      lambda percent, _message: reported.append(percent), Flag())
    assert back == target and target.read_bytes() == delivered.read_bytes() != image.read_bytes()
    assert reported and reported[-1] == 100.0
    assert sorted(p.name for p in target.parent.iterdir()) == ["disk.vhdx"]
    assert FolderConnector.can_retrieve


def test_a_disk_that_is_gone_moved_or_cancelled_leaves_no_file(share_folder: Path, tmp_path: Path) -> None:
    image = image_file(tmp_path / "out", size=24 * MiB)
    result = FolderConnector().deliver(image, sidecar_for(image), _settings(), samba_dc.ADMIN_PASSWORD,
                                       lambda *_: None, Flag())
    back = tmp_path / "back"
    back.mkdir()
    # The connector now writes somewhere else: the disk is not looked for there.
    with pytest.raises(UserError, match=r"now writes to \\\\127\.0\.0\.1\\layers\\elsewhere; copy the disk"):
        FolderConnector().retrieve(result.ids, _settings(r"\\127.0.0.1\layers\elsewhere"),
                                   samba_dc.ADMIN_PASSWORD, back / "disk.vhdx", lambda *_: None, Flag())
    with pytest.raises(ShareAccessDenied, match="refused the user name or password"):
        FolderConnector().retrieve(result.ids, _settings(), "wrong password 1", back / "disk.vhdx",
                                   lambda *_: None, Flag())
    flag = Flag()

    def progress(_percent: float, _message: str) -> None:
        flag.cancelled = True

    with pytest.raises(TaskCanceled, match="nothing was kept"):
        FolderConnector().retrieve(result.ids, _settings(), samba_dc.ADMIN_PASSWORD, back / "disk.vhdx", progress,
                                   flag)
    assert list(back.iterdir()) == []
    (share_folder / "Gold_20250301T101500Z.vhdx").unlink()
    with pytest.raises(NotFound, match=r"Gold_20250301T101500Z\.vhdx is no longer there"):
        FolderConnector().retrieve(result.ids, _settings(), samba_dc.ADMIN_PASSWORD, back / "disk.vhdx",
                                   lambda *_: None, Flag())
    assert list(back.iterdir()) == []
    assert sorted(p.name for p in share_folder.iterdir()) == ["Gold_20250301T101500Z.json"]
