r"""The folder connector on the real test DC's ``[layers]`` share (a subfolder of it), read back from the
DC's own files: delivery, wrong password, unreachable host, missing folder, cancel mid-copy, the host going
down mid-copy (a relay in front of the DC's SMB port, cut), a full share (a tiny tmpfs under the share's
folder), and handing a delivered disk back (as it is now; gone, moved or cancelled)."""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.connectors.base import ConnectorSettings, DeliveryProgress
from app.connectors.folder import FolderConnector
from app.elastic.sync import ShareAccessDenied, ShareError
from app.errors import Conflict, EnvironmentProblem, NotFound, UserError
from app.tasks.base import TaskCanceled
from tests.connectors.conftest import Flag, MiB, image_file, sidecar_for
from tests.support import samba_dc
from tests.support.host_relay import HostRelay
from tests.support.tools import small_filesystem

ACCOUNT = f"Administrator@{samba_dc.DNS_DOMAIN}"
SHARE = r"\\127.0.0.1\layers\connector-images"
PARTIAL = re.escape(SHARE + r"\Gold_20250301T101500Z.vhdx.partial")


@pytest.fixture
def share_folder(samba: samba_dc.RunningDC) -> Iterator[Path]:
    """The DC's own folder behind ``SHARE`` (made empty, removed afterwards)."""
    with samba.layers_folder("connector-images") as folder:
        yield folder


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


def _cut_after_first_chunk(relay: HostRelay, *, stay_down: bool) -> tuple[Flag, DeliveryProgress, list[int]]:
    """A progress callback that cuts ``relay`` once the first chunk was written; the list gets how many
    connections the relay had relayed by then."""
    relayed_at_cut: list[int] = []

    def progress(_percent: float, _message: str) -> None:
        if not relayed_at_cut:
            relayed_at_cut.append(relay.accepted)
            relay.cut(stay_down=stay_down)

    return Flag(), progress, relayed_at_cut


def test_the_host_going_down_mid_copy_removes_the_partial_once_it_answers_again(share_folder: Path,
                                                                                tmp_path: Path) -> None:
    """Runs against the real DC, through a relay in front of its SMB port (the connector's ``port``): the relay
    resets the connection after the first chunk was written, as a host going away does, and answers again;
    the connector signs in anew to delete the ``.partial``, and says how far the copy got."""
    image = image_file(tmp_path, size=24 * MiB)
    with HostRelay(("127.0.0.1", 445)) as relay:
        flag, progress, relayed_at_cut = _cut_after_first_chunk(relay, stay_down=False)
        started = time.monotonic()
        with pytest.raises(EnvironmentProblem) as caught:
            FolderConnector().deliver(image, sidecar_for(image), _settings(port=relay.port), samba_dc.ADMIN_PASSWORD,
                                      progress, flag)
        assert time.monotonic() - started < 20
    message = str(caught.value)
    assert re.fullmatch(
        rf"The connection to 127\.0\.0\.1 was lost during the copy to {PARTIAL}, after \d+ of 24 MiB \(it was "
        rf"reset\); the host went down or the network between failed\. Check that 127\.0\.0\.1 is reachable from "
        rf"this machine and serves SMB \(port {relay.port}\)\. The partial file {PARTIAL} was deleted\.", message), \
        message
    assert relay.accepted > relayed_at_cut[0]  # the clean-up signed in anew
    assert list(share_folder.iterdir()) == []
    assert samba_dc.ADMIN_PASSWORD not in message


def test_the_host_staying_down_names_the_partial_to_remove_by_hand(share_folder: Path, tmp_path: Path) -> None:
    """Runs against the real DC, through a relay in front of its SMB port that is cut after the first chunk and
    then refuses every connection: the ``.partial`` cannot be deleted, so the message names it (and it is
    indeed there, in the DC's folder)."""
    image = image_file(tmp_path, size=24 * MiB)
    with HostRelay(("127.0.0.1", 445)) as relay:
        flag, progress, _ = _cut_after_first_chunk(relay, stay_down=True)
        started = time.monotonic()
        with pytest.raises(EnvironmentProblem) as caught:
            FolderConnector().deliver(image, sidecar_for(image), _settings(port=relay.port), samba_dc.ADMIN_PASSWORD,
                                      progress, flag)
        assert time.monotonic() - started < 20
    message = str(caught.value)
    assert message.startswith(f"The connection to 127.0.0.1 was lost during the copy to {SHARE}"
                              r"\Gold_20250301T101500Z.vhdx.partial, after "), message
    assert re.search(
        rf"\. LayerDesk could not clean up on 127\.0\.0\.1 \(Failed to connect to '127\.0\.0\.1:{relay.port}': "
        rf"\[Errno 111\] Connection refused\): remove {PARTIAL} there by hand\.$", message), message
    assert "was deleted" not in message
    # What the message names is what is there: the .partial alone, no image.
    assert [p.name for p in share_folder.iterdir()] == ["Gold_20250301T101500Z.vhdx.partial"]
    assert samba_dc.ADMIN_PASSWORD not in message



def test_a_full_share_is_a_clear_error_and_leaves_nothing(share_folder: Path, tmp_path: Path) -> None:
    """Runs against the real DC, writing into a subfolder of its share that is a real 8 MiB tmpfs: the 12 MiB
    image does not fit, Samba answers the write that finds no room with STATUS_DISK_FULL, and the connector
    says the share is full and deletes its ``.partial``."""
    image = image_file(tmp_path, size=12 * MiB)
    with small_filesystem(share_folder / "small", "8m", options="mode=0777") as small:
        with pytest.raises(UserError) as caught:
            FolderConnector().deliver(image, sidecar_for(image), _settings(SHARE + r"\small"),
                                      samba_dc.ADMIN_PASSWORD, lambda *_: None, Flag())
        message = str(caught.value)
        assert re.fullmatch(
            r"The share \\\\127\.0\.0\.1\\layers\\connector-images\\small is full: 127\.0\.0\.1 ran out of "
            r"space after \d+ of 12 MiB of Gold_20250301T101500Z\.vhdx were written \(STATUS_DISK_FULL\)\. Free space "
            r"on the share or choose another folder\. The partial file .*\\small\\Gold_20250301T101500Z\.vhdx\.partial "
            r"was deleted\.", message), message
        assert list(small.iterdir()) == []
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
