r"""User Layers already on a storage location's share (``StorageService.list_user_layers`` and
``layerctl userlayer list``), read over SMB from the real test DC's ``[layers]`` share and checked against
its directory: alice and bob exist, ``zed`` does not; OS layers come from the catalog."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from app.directory import PrincipalType
from app.elastic.sync import ShareAccessDenied
from app.elastic.userlayers import UserLayerStatus
from app.errors import NotFound, ValidationError
from app.services import Services
from tests.elastic.conftest import BREAK_GLASS_PASSWORD, sid_of
from tests.support import samba_dc
from tests.unit.test_cli import Ctl

ACCOUNT = f"Administrator@{samba_dc.DNS_DOMAIN}"
LOCATION_PATH = r"\\127.0.0.1\layers\ul"
WRITTEN = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)


def _put(root: Path, relative: str, size: int, when: datetime = WRITTEN) -> None:
    target = root.joinpath(*relative.split("\\"))
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(os.urandom(size))
    os.utime(target, (when.timestamp(), when.timestamp()))


@pytest.fixture
def on_share(joined: Services, samba: samba_dc.RunningDC) -> Iterator[Services]:
    r"""A storage location ``UL`` on the DC's share holding, under ``ul\Users``: alice's layers for
    Win11 (a disk and its metadata file) and for an OS layer id the catalog never had, bob's for Win10
    and a stray file in his folder, a deleted user's (``zed``), one for Win11 under its old name, one of
    a domain no junction serves, and a file that is no user folder at all."""
    root = samba.root / "layers" / "ul"
    shutil.rmtree(root, ignore_errors=True)
    win11 = joined.layers.get_layer("Win11").layer.id
    win10 = joined.layers.get_layer("Win10").layer.id
    joined.storage.add_location("UL", LOCATION_PATH, groups=[(sid_of(joined, "All-Staff", PrincipalType.GROUP),
                                                              r"LAB\All-Staff")])
    _put(root, rf"Users\LAB_alice\{win11}_Win11\UserLayer.vhdx", 3_000_000)
    _put(root, rf"Users\LAB_alice\{win11}_Win11\UserLayer.json", 500,
         datetime(2026, 5, 1, 8, 0, 0, tzinfo=UTC))
    _put(root, r"Users\LAB_alice\9999_Win7\UserLayer.vhdx", 1000)
    _put(root, rf"Users\lab_BOB\{win10}_Win10\UserLayer.vhdx", 2048)
    _put(root, r"Users\LAB_bob\notes.txt", 10)
    _put(root, rf"Users\LAB_zed\{win11}_Win11\UserLayer.vhdx", 4096)
    _put(root, rf"Users\LAB_alice\{win11}_Windows 11\UserLayer.vhdx", 100)
    _put(root, rf"Users\OTHER_x\{win11}_Win11\UserLayer.vhdx", 7)
    _put(root, r"Users\readme.txt", 3)
    try:
        yield joined
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_every_user_layer_with_its_size_last_write_and_whether_anyone_can_use_it(on_share: Services) -> None:
    win11 = on_share.layers.get_layer("Win11").layer.id
    win10 = on_share.layers.get_layer("Win10").layer.id
    report = on_share.storage.list_user_layers("UL", ACCOUNT, samba_dc.ADMIN_PASSWORD)
    assert (report.location, report.path) == ("UL", LOCATION_PATH)
    by_folder = {f.relative: f for f in report.folders}
    assert sorted(by_folder) == sorted([
        rf"Users\LAB_alice\{win11}_Win11", r"Users\LAB_alice\9999_Win7", rf"Users\LAB_alice\{win11}_Windows 11",
        rf"Users\lab_BOB\{win10}_Win10", r"Users\LAB_bob\notes.txt", rf"Users\LAB_zed\{win11}_Win11",
        rf"Users\OTHER_x\{win11}_Win11", r"Users\readme.txt"])

    alice = by_folder[rf"Users\LAB_alice\{win11}_Win11"]
    assert (alice.status, alice.reason) == (UserLayerStatus.IN_USE, "")
    assert (alice.domain, alice.username, alice.os_layer_id, alice.os_layer_name) == ("LAB", "alice", win11, "Win11")
    assert alice.size_bytes == 3_000_500
    assert alice.files == ("UserLayer.json", "UserLayer.vhdx")
    assert alice.last_write is not None and alice.last_write >= datetime(2026, 5, 1, 8, 0, 0, tzinfo=UTC)
    assert alice.unc == rf"{LOCATION_PATH}\Users\LAB_alice\{win11}_Win11"
    # Names are compared as Windows does: without regard to case.
    assert by_folder[rf"Users\lab_BOB\{win10}_Win10"].status is UserLayerStatus.IN_USE

    zed = by_folder[rf"Users\LAB_zed\{win11}_Win11"]
    assert zed.status is UserLayerStatus.ORPHANED
    assert zed.reason == r"the directory has no user LAB\zed (deleted, or renamed)"
    gone = by_folder[r"Users\LAB_alice\9999_Win7"]
    assert (gone.status, gone.reason) == (UserLayerStatus.ORPHANED, "OS layer 9999 is not in the catalog (deleted)")
    renamed = by_folder[rf"Users\LAB_alice\{win11}_Windows 11"]
    assert renamed.status is UserLayerStatus.ORPHANED
    assert renamed.reason == f"OS layer {win11} is now named 'Win11', not 'Windows 11'"
    other = by_folder[rf"Users\OTHER_x\{win11}_Win11"]
    assert (other.status, other.reason) == (UserLayerStatus.UNKNOWN_DOMAIN,
                                           "no directory junction serves the domain OTHER")
    for stray in (r"Users\LAB_bob\notes.txt", r"Users\readme.txt"):
        assert by_folder[stray].status is UserLayerStatus.NOT_A_USER_LAYER
    assert {f.relative for f in report.orphans} == {
        rf"Users\LAB_zed\{win11}_Win11", r"Users\LAB_alice\9999_Win7", rf"Users\LAB_alice\{win11}_Windows 11"}


def test_a_user_deleted_from_the_directory_turns_their_layer_into_an_orphan(
        on_share: Services, samba: samba_dc.RunningDC) -> None:
    """A real deletion in the DC (``samba-tool user delete``), not a folder named after nobody."""
    root = samba.root / "layers" / "ul"
    win11 = on_share.layers.get_layer("Win11").layer.id
    samba.tool("user", "create", "temp-user", "Temp!Passw0rd-9")
    _put(root, rf"Users\LAB_temp-user\{win11}_Win11\UserLayer.vhdx", 64)
    try:
        before = on_share.storage.list_user_layers(LOCATION_PATH, ACCOUNT, samba_dc.ADMIN_PASSWORD)
        folder = rf"Users\LAB_temp-user\{win11}_Win11"
        assert {f.relative: f.status for f in before.folders}[folder] is UserLayerStatus.IN_USE
        # A path that is a location's path names that location.
        assert before.location == "UL"
    finally:
        samba.tool("user", "delete", "temp-user")
    after = on_share.storage.list_user_layers("UL", ACCOUNT, samba_dc.ADMIN_PASSWORD)
    assert {f.relative: f.status for f in after.folders}[folder] is UserLayerStatus.ORPHANED
    # Listing deletes nothing.
    assert (root / "Users" / "LAB_temp-user" / f"{win11}_Win11" / "UserLayer.vhdx").is_file()


def test_bad_location_wrong_password_and_empty_share_are_clear(on_share: Services,
                                                               samba: samba_dc.RunningDC) -> None:
    with pytest.raises(NotFound, match="no storage location named 'Nowhere'"):
        on_share.storage.list_user_layers("Nowhere", ACCOUNT, samba_dc.ADMIN_PASSWORD)
    with pytest.raises(ValidationError, match="Name the storage location"):
        on_share.storage.list_user_layers("  ", ACCOUNT, samba_dc.ADMIN_PASSWORD)
    with pytest.raises(ShareAccessDenied) as refused:
        on_share.storage.list_user_layers("UL", ACCOUNT, "Not-The-Passw0rd!")
    assert "Not-The-Passw0rd" not in str(refused.value)
    # A share (not a location) with no Users folder yet: no user layers, and no error.
    (samba.root / "layers" / "empty").mkdir(exist_ok=True)
    try:
        report = on_share.storage.list_user_layers(r"\\127.0.0.1\layers\empty", ACCOUNT, samba_dc.ADMIN_PASSWORD)
    finally:
        (samba.root / "layers" / "empty").rmdir()
    assert (report.location, report.folders) == (None, ())


def test_layerctl_userlayer_list_and_orphans(on_share: Services, capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    ctl = Ctl(on_share.home.root, capsys, monkeypatch)
    ctl.json("login", "--user", "breakglass", "--password-stdin", stdin=BREAK_GLASS_PASSWORD + "\n")
    win11 = on_share.layers.get_layer("Win11").layer.id
    status, out, err = ctl("userlayer", "list", "UL", "--user", ACCOUNT, "--password-stdin",
                           stdin=samba_dc.ADMIN_PASSWORD + "\n")
    assert status == 0, err
    assert out.splitlines()[0] == rf"User Layers on UL ({LOCATION_PATH}): 8 (3 orphaned)"
    alice_row = next(line for line in out.splitlines() if rf"LAB\alice  {win11}_Win11 " in line)
    assert "2.9 MiB" in alice_row and "in use" in alice_row

    found = ctl.json("userlayer", "list", "UL", "--user", ACCOUNT, "--password-stdin", "--orphans",
                     stdin=samba_dc.ADMIN_PASSWORD + "\n")
    assert isinstance(found, dict)
    assert sorted((f["username"], f["os_layer_id"], f["status"]) for f in found["folders"]) == [
        ("alice", win11, "orphaned"), ("alice", 9999, "orphaned"), ("zed", win11, "orphaned")]
    assert all(isinstance(f["size_bytes"], int) and f["last_write"] for f in found["folders"])

    status, _, err = ctl("userlayer", "list", "UL", "--user", ACCOUNT, "--password-stdin", stdin="wrong\n")
    assert status == 4 and "refused the user name or password" in err and "wrong" not in err.replace(
        "wrong password", "")
