r"""The Hyper-V connector. WinRM runs against a recording: the WS-Management exchanges of a Hyper-V host
(``tests/connectors/recordings/hyperv``) served by a local HTTPS endpoint, so pywinrm's real requests
(Create, Command, Receive, Signal, Delete) cross a real socket with TLS verified against a CA made here.
The VHDX is copied over real SMB to the test DC's ``[layers]`` share and read back from the DC's own
files (those tests use the ``samba`` fixture); the host going down mid-copy is a relay in front of the DC's SMB
port (the connector's ``smb_port``) that is cut, and the host's disk full a tiny tmpfs under the share."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import random
import re
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from app.connectors import connector_for
from app.connectors.base import ConnectorSettings, DeliveryProgress
from app.connectors.hyperv import (
    SCRIPTS,
    HyperVConnector,
    ScriptFailed,
    script_text,
    target_folder,
    vhd_file_name,
)
from app.errors import AuthenticationFailed, Conflict, EnvironmentProblem, UserError, ValidationError
from app.tasks.base import TaskCanceled
from tests.connectors.conftest import Flag, MiB, sidecar_for
from tests.support import samba_dc
from tests.support.host_relay import HostRelay
from tests.support.hyperv_winrm import RecordedHyperVHost, TestCA, make_test_ca, recorded_hyperv
from tests.support.tools import small_filesystem

WINRM_USER = r"LAB\hvadmin"
WINRM_PASSWORD = "Winrm-Secret-1"  # the recorded host's; the share uses the DC's Administrator
SHARE = r"\\127.0.0.1\layers\hyperv-images"
HOSTILE = "Gold'; Remove-VM * -Force; $(Stop-Computer) \"x\" `n <b>&"


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return make_test_ca(tmp_path_factory.mktemp("hyperv-ca"))


@pytest.fixture
def hyperv(ca: TestCA) -> Iterator[tuple[RecordedHyperVHost, int]]:
    with recorded_hyperv(ca, WINRM_USER, WINRM_PASSWORD) as served:
        yield served


def _settings(port: int, ca: TestCA | None, *, user: str = WINRM_USER, **options: object) -> ConnectorSettings:
    base: dict[str, object] = {"winrm_port": port, "auth": "basic", "target_folder": SHARE, "switch": "LAN"}
    if ca is not None:
        base["ca_file"] = str(ca.ca_file)
    base.update(options)
    return ConnectorSettings("HV1", "hyperv", "127.0.0.1", user,
                             options={k: v for k, v in base.items() if v is not None})


def _disk(folder: Path, scheme: str, fmt: str = "vhdx", size: int = 16 * MiB, fill: int = 0) -> Path:
    """A real disk image with a GPT or MBR partition table (``fill`` MiB of random bytes in its partition)."""
    folder.mkdir(parents=True, exist_ok=True)
    raw = folder / f"{scheme}.raw"
    with raw.open("wb") as file:
        file.truncate(size)
        if fill:
            file.seek(2 * MiB)
            file.write(random.Random(7).randbytes(fill * MiB))
    if scheme == "gpt":
        subprocess.run(["sgdisk", "-o", "-n", "1:2048:0", "-t", "1:0700", str(raw)], check=True, capture_output=True)
    else:
        with raw.open("r+b") as file:
            file.seek(446)
            file.write(bytes([0x80, 0, 0x21, 0, 0x07, 0, 0, 0]) + (2048).to_bytes(4, "little")
                       + (size // 512 - 2048).to_bytes(4, "little"))
            file.seek(510)
            file.write(b"\x55\xaa")
    image = folder / f"Gold_2025-03-01_10-15.{fmt}"
    subprocess.run(["qemu-img", "convert", "-O", "vpc" if fmt == "vhd" else fmt, str(raw), str(image)], check=True,
                   capture_output=True)
    raw.unlink()
    return image


# --- without the share -------------------------------------------------------------------------------


def test_target_folder_share_or_host_folder_through_the_admin_share() -> None:
    share = target_folder(r"\\fs1\vms\images", "hv1")
    assert (share.share.unc, share.host_path) == (r"\\fs1\vms\images", r"\\fs1\vms\images")
    local = target_folder(r"d:\Hyper-V\Images", "hv1")
    assert (local.share.unc, local.host_path) == (r"\\hv1\D$\Hyper-V\Images", r"D:\Hyper-V\Images")
    with pytest.raises(ValidationError, match="neither a share path"):
        target_folder("images", "hv1")
    with pytest.raises(ValidationError, match="not a host name"):
        HyperVConnector().validate("https://hv1/wsman", WINRM_USER, {"target_folder": SHARE})
    with pytest.raises(ValidationError, match="not owner"):
        HyperVConnector().validate("hv1", WINRM_USER, {"target_folder": SHARE, "vm_name_pattern": "{owner}"})
    assert vhd_file_name('a<b>:"c"|?*', ".VHDX") == "a_b___c____.vhdx"
    assert isinstance(connector_for("hyperv"), HyperVConnector)


def test_values_reach_powershell_only_as_data() -> None:
    """A hostile VM name changes the Base64 document, never the script around it."""
    params = {"Name": HOSTILE, "VHDPath": r"\\fs1\vms\x.vhdx", "Generation": 2}
    text = script_text("new-vm", params)
    payload = re.search(r"FromBase64String\('([A-Za-z0-9+/=]*)'\)", text)
    assert payload is not None
    assert json.loads(base64.b64decode(payload[1]))["Name"] == HOSTILE
    assert text.replace(payload[1], "") == script_text("new-vm", {}).replace(
        re.search(r"String\('([^']*)'\)", script_text("new-vm", {}))[1], "")  # type: ignore[index]
    assert "Remove-VM * -Force" not in text and HOSTILE not in text
    assert all("$p." in body or name == "get-vmhost" for name, body in SCRIPTS.items())


def test_the_test_stops_at_a_wrong_password(ca: TestCA, hyperv: tuple[RecordedHyperVHost, int]) -> None:
    """Against a recording: the host answers 401 to every request of a wrong password."""
    host, port = hyperv
    report = HyperVConnector().test(_settings(port, ca), "wrong password 1")
    assert [(s.name, s.ok) for s in report.steps] == [("TCP", True), ("TLS", True), ("authenticate", False),
                                                      ("Get-VMHost", None), ("target folder", None), ("switch", None)]
    assert "refused the user name or password for WinRM (HTTP 401)" in (report.failure or "")
    assert "wrong password 1" not in str(report)
    assert [e.action for e in host.exchanges] == ["unauthorized"]
    with pytest.raises(AuthenticationFailed):
        from app.connectors.hyperv import HyperVHost

        HyperVHost(_settings(port, ca), "wrong password 1").run("get-vmhost", {})


def test_an_untrusted_certificate_and_an_unreachable_host(ca: TestCA, hyperv: tuple[RecordedHyperVHost, int],
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """Against a recording: the endpoint's certificate comes from a CA the system does not trust."""
    host, port = hyperv
    report = HyperVConnector().test(_settings(port, None), WINRM_PASSWORD)
    assert [s.ok for s in report.steps][:3] == [True, False, None]
    assert "is not trusted" in (report.failure or "") and "CA file" in (report.failure or "")
    report = HyperVConnector().test(_settings(1, ca), WINRM_PASSWORD)
    assert [s.ok for s in report.steps][:2] == [False, None]
    assert "Cannot reach 127.0.0.1 on port 1" in (report.failure or "")
    # Verification turned off: it works, and says so (step detail and a logged warning).
    with caplog.at_level(logging.WARNING, logger="app.connectors.reach"):
        report = HyperVConnector().test(replace(_settings(port, None), verify_tls=False), WINRM_PASSWORD)
    assert [s.ok for s in report.steps][:4] == [True, True, True, True]
    assert "NOT verified" in report.steps[1].detail
    assert "verification is turned off" in caplog.text
    assert host.exchanges and not host.shells  # every shell opened was deleted again


def test_get_vmhost_failing_is_reported_with_the_host_s_error(ca: TestCA,
                                                              hyperv: tuple[RecordedHyperVHost, int]) -> None:
    """Against a recording: a host without the Hyper-V module answers CommandNotFoundException."""
    host, port = hyperv
    host.outcomes["get-vmhost"] = "no-hyper-v"
    report = HyperVConnector().test(_settings(port, ca), WINRM_PASSWORD)
    assert [(s.name, s.ok) for s in report.steps][2:4] == [("authenticate", True), ("Get-VMHost", False)]
    assert "The term 'Get-VMHost' is not recognized" in (report.failure or "")
    assert [e.action for e in host.exchanges if e.script == "get-vmhost"] == ["Command", "Receive"]


def test_images_hyper_v_cannot_boot_are_refused(tmp_path: Path, ca: TestCA,
                                                hyperv: tuple[RecordedHyperVHost, int]) -> None:
    host, port = hyperv
    qcow = _disk(tmp_path, "gpt", "qcow2")
    with pytest.raises(Exception, match="not a VHDX or VHD"):
        HyperVConnector().deliver(qcow, sidecar_for(qcow), _settings(port, ca), WINRM_PASSWORD, lambda *_: None,
                                  Flag())
    vhd = _disk(tmp_path / "vhd", "gpt", "vhd")
    with pytest.raises(Exception, match="Generation 2 VM, and those boot from VHDX only"):
        HyperVConnector().deliver(vhd, sidecar_for(vhd), _settings(port, ca), WINRM_PASSWORD, lambda *_: None, Flag())
    assert host.exchanges == []


# --- with the share ----------------------------------------------------------------------------------


@pytest.fixture
def share_folder(samba: samba_dc.RunningDC) -> Iterator[Path]:
    """The DC's own folder behind ``SHARE`` (made empty, removed afterwards)."""
    with samba.layers_folder("hyperv-images") as folder:
        yield folder


# The account the connector signs in with is the DC's; the recorded WinRM host checks the same one.
ADMIN = f"Administrator@{samba_dc.DNS_DOMAIN}"


@pytest.fixture
def lab(ca: TestCA, share_folder: Path) -> Iterator[tuple[RecordedHyperVHost, int, Path]]:
    with recorded_hyperv(ca, ADMIN, samba_dc.ADMIN_PASSWORD) as (host, port):
        yield host, port, share_folder


def _lab_settings(port: int, ca: TestCA, **options: object) -> ConnectorSettings:
    return _settings(port, ca, user=ADMIN, **options)


def test_the_test_reports_each_step(ca: TestCA, lab: tuple[RecordedHyperVHost, int, Path]) -> None:
    """Against a recording (WinRM) and the real share."""
    host, port, folder = lab
    report = HyperVConnector().test(_lab_settings(port, ca), samba_dc.ADMIN_PASSWORD)
    assert report.ok, report
    assert [s.name for s in report.steps] == ["TCP", "TLS", "authenticate", "Get-VMHost", "target folder", "switch"]
    assert "Hyper-V host HV1: 16 logical processors, 128 GiB memory" in report.steps[3].detail
    assert report.steps[4].detail == rf"{SHARE} exists (the host sees it as {SHARE})"
    host.outcomes["get-vmswitch"] = "missing"
    report = HyperVConnector().test(_lab_settings(port, ca, switch="Lab-Extern"), samba_dc.ADMIN_PASSWORD)
    assert [s.ok for s in report.steps] == [True, True, True, True, True, False]
    assert "has no virtual switch 'Lab-Extern'; its switches are LAN, Lab-Internal" in (report.failure or "")
    report = HyperVConnector().test(_lab_settings(port, ca, target_folder=r"\\127.0.0.1\layers\nowhere"),
                                    samba_dc.ADMIN_PASSWORD)
    assert report.steps[4].ok is False and "nowhere" in (report.failure or "")
    assert list(folder.iterdir()) == [] and host.vms == {}


def test_a_gpt_vhdx_becomes_a_generation_2_vm(tmp_path: Path, ca: TestCA,
                                              lab: tuple[RecordedHyperVHost, int, Path]) -> None:
    """Against a recording (WinRM) and the real share: copy, New-VM -Generation 2, processors and notes."""
    host, port, folder = lab
    image = _disk(tmp_path, "gpt")
    steps: list[str] = []
    result = HyperVConnector().deliver(image, sidecar_for(image), _lab_settings(port, ca, vcpus=4, memory_mb=8192),
                                       samba_dc.ADMIN_PASSWORD, lambda _p, message: steps.append(message), Flag())
    delivered = folder / "Gold-20250301T101500Z.vhdx"
    assert [p.name for p in folder.iterdir()] == [delivered.name]
    assert hashlib.sha256(delivered.read_bytes()).digest() == hashlib.sha256(image.read_bytes()).digest()
    new_vm = next(e for e in host.exchanges if e.script == "new-vm" and e.action == "Command")
    assert new_vm.params == {"Name": "Gold-20250301T101500Z", "Generation": 2, "MemoryStartupBytes": 8192 * MiB,
                             "VHDPath": SHARE + r"\Gold-20250301T101500Z.vhdx", "SwitchName": "LAN"}
    configure = next(e for e in host.exchanges if e.script == "configure-vm" and e.action == "Command")
    assert configure.params["ProcessorCount"] == 4 and "template Gold (revision 3)" in configure.params["Notes"]
    assert list(host.vms.values()) == ["Gold-20250301T101500Z"]
    assert result.ids["vm_id"] in host.vms and result.ids["generation"] == "2"
    assert result.location == rf"127.0.0.1: VM Gold-20250301T101500Z on {SHARE}\Gold-20250301T101500Z.vhdx"
    assert "Creating VM Gold-20250301T101500Z (Generation 2)" in steps
    assert not host.shells and "remove-vm" not in host.scripts_run


def test_an_mbr_vhd_becomes_a_generation_1_vm(tmp_path: Path, ca: TestCA,
                                              lab: tuple[RecordedHyperVHost, int, Path]) -> None:
    """Against a recording (WinRM) and the real share."""
    host, port, folder = lab
    image = _disk(tmp_path, "mbr", "vhd")
    result = HyperVConnector().deliver(image, sidecar_for(image), _lab_settings(port, ca, switch=None),
                                       samba_dc.ADMIN_PASSWORD, lambda *_: None, Flag())
    assert [p.name for p in folder.iterdir()] == ["Gold-20250301T101500Z.vhd"]
    new_vm = next(e for e in host.exchanges if e.script == "new-vm" and e.action == "Command")
    assert new_vm.params["Generation"] == 1 and new_vm.params["SwitchName"] == ""
    assert result.ids["generation"] == "1"


def test_hostile_names_arrive_as_data(tmp_path: Path, ca: TestCA, lab: tuple[RecordedHyperVHost, int, Path]) -> None:
    """Against a recording: the template name lands whole in the VM name, and only there."""
    host, port, folder = lab
    image = _disk(tmp_path, "gpt")
    HyperVConnector().deliver(image, sidecar_for(image, template=HOSTILE),
                              _lab_settings(port, ca, vm_name_pattern="{template}"), samba_dc.ADMIN_PASSWORD,
                              lambda *_: None, Flag())
    assert list(host.vms.values()) == [HOSTILE]
    new_vm = next(e for e in host.exchanges if e.script == "new-vm" and e.action == "Command")
    assert new_vm.params["Name"] == HOSTILE
    file_name = vhd_file_name(HOSTILE, ".vhdx")
    assert new_vm.params["VHDPath"] == SHARE + "\\" + file_name
    assert [p.name for p in folder.iterdir()] == [file_name]


def test_a_vm_name_in_use_is_a_conflict_and_leaves_nothing(tmp_path: Path, ca: TestCA,
                                                           lab: tuple[RecordedHyperVHost, int, Path]) -> None:
    """Against a recording: the host's script writes a VMNameInUse error to the error stream."""
    host, port, folder = lab
    host.outcomes["new-vm"] = "name-in-use"
    image = _disk(tmp_path, "gpt")
    with pytest.raises(Conflict, match="already has a VM named 'Gold-20250301T101500Z'; it was left alone"):
        HyperVConnector().deliver(image, sidecar_for(image), _lab_settings(port, ca), samba_dc.ADMIN_PASSWORD,
                                  lambda *_: None, Flag())
    assert list(folder.iterdir()) == [] and host.vms == {}
    host.outcomes["new-vm"] = "vhd-not-found"
    with pytest.raises(ScriptFailed, match=r"New-VM failed: 127.0.0.1: Failed to add device 'Virtual Hard Disk'"):
        HyperVConnector().deliver(image, sidecar_for(image), _lab_settings(port, ca), samba_dc.ADMIN_PASSWORD,
                                  lambda *_: None, Flag())
    assert list(folder.iterdir()) == [] and host.vms == {} and not host.shells


def test_a_failed_setup_removes_the_half_made_vm(tmp_path: Path, ca: TestCA,
                                                 lab: tuple[RecordedHyperVHost, int, Path]) -> None:
    """Against a recording: Set-VMProcessor fails after New-VM; Remove-VM runs and the VHDX is deleted."""
    host, port, folder = lab
    host.outcomes["configure-vm"] = "too-many-processors"
    image = _disk(tmp_path, "gpt")
    with pytest.raises(ScriptFailed, match=r"Setting up the VM failed: .*Failed to modify device 'Processor'.*the VM "
                                           "and its VHDX were removed"):
        HyperVConnector().deliver(image, sidecar_for(image), _lab_settings(port, ca, vcpus=64),
                                  samba_dc.ADMIN_PASSWORD, lambda *_: None, Flag())
    assert host.scripts_run == ["new-vm", "configure-vm", "remove-vm"]
    removed = next(e for e in host.exchanges if e.script == "remove-vm" and e.action == "Command")
    made = next(e for e in host.exchanges if e.script == "configure-vm" and e.action == "Command")
    assert removed.params == {"Id": made.params["Id"]}
    assert host.vms == {} and list(folder.iterdir()) == []


def test_cancel_mid_copy_leaves_nothing(tmp_path: Path, ca: TestCA, lab: tuple[RecordedHyperVHost, int, Path]) -> None:
    """The real share, mid-copy: no ``.partial`` is left and WinRM is never asked to make a VM."""
    host, port, folder = lab
    image = _disk(tmp_path, "gpt", size=64 * MiB, fill=48)
    flag = Flag()
    seen: list[float] = []

    def progress(percent: float, _message: str) -> None:
        seen.append(percent)
        if percent > 0:
            flag.cancelled = True

    with pytest.raises(TaskCanceled, match="half-copied VHDX was deleted"):
        HyperVConnector().deliver(image, sidecar_for(image), _lab_settings(port, ca), samba_dc.ADMIN_PASSWORD,
                                  progress, flag)
    assert 0 < max(seen) < 90
    assert list(folder.iterdir()) == [] and host.scripts_run == []


def test_cancel_after_new_vm_removes_the_vm_and_the_vhdx(tmp_path: Path, ca: TestCA,
                                                         lab: tuple[RecordedHyperVHost, int, Path]) -> None:
    """Against a recording: the cancel lands while New-VM runs; Remove-VM is sent and the VHDX deleted."""
    host, port, folder = lab
    flag = Flag()
    host.on_command = lambda script, _params: setattr(flag, "cancelled", flag.cancelled or script == "new-vm")
    image = _disk(tmp_path, "gpt")
    with pytest.raises(TaskCanceled, match="the VM and its VHDX were removed"):
        HyperVConnector().deliver(image, sidecar_for(image), _lab_settings(port, ca), samba_dc.ADMIN_PASSWORD,
                                  lambda *_: None, flag)
    assert host.scripts_run == ["new-vm", "remove-vm"]
    assert host.vms == {} and list(folder.iterdir()) == [] and not host.shells


PARTIAL = re.escape(SHARE + r"\Gold-20250301T101500Z.vhdx.partial")


def _cut_after_first_write(relay: HostRelay, *, stay_down: bool) -> tuple[list[int], DeliveryProgress]:
    """A progress callback that cuts ``relay`` once the copy is under way; the list gets how many connections
    the relay had relayed by then."""
    relayed_at_cut: list[int] = []

    def progress(percent: float, _message: str) -> None:
        if percent > 0 and not relayed_at_cut:
            relayed_at_cut.append(relay.accepted)
            relay.cut(stay_down=stay_down)

    return relayed_at_cut, progress


def test_the_host_going_down_mid_copy_deletes_the_partial_once_it_answers_again(
        tmp_path: Path, ca: TestCA, lab: tuple[RecordedHyperVHost, int, Path]) -> None:
    """The real share (DC) through a relay on the connector's ``smb_port``, WinRM recorded (never reached): the
    relay resets the SMB connection once the copy is under way and answers again; the connector signs in to the
    share anew and deletes the ``.partial``, and WinRM is never asked to make a VM."""
    host, port, folder = lab
    image = _disk(tmp_path, "gpt", size=64 * MiB, fill=48)
    with HostRelay(("127.0.0.1", 445)) as relay:
        relayed_at_cut, progress = _cut_after_first_write(relay, stay_down=False)
        with pytest.raises(EnvironmentProblem) as caught:
            HyperVConnector().deliver(image, sidecar_for(image), _lab_settings(port, ca, smb_port=relay.port),
                                      samba_dc.ADMIN_PASSWORD, progress, Flag())
    message = str(caught.value)
    assert re.fullmatch(
        rf"The connection to 127\.0\.0\.1 was lost during the copy to {PARTIAL}, after \d+ of \d+ MiB \(it was "
        r"reset\); the host went down or the network between failed\. Check that 127\.0\.0\.1 is reachable from "
        rf"this machine and serves SMB \(port {relay.port}\)\. The partial file {PARTIAL} was deleted\.", message), \
        message
    assert relay.accepted > relayed_at_cut[0]  # the clean-up signed in anew
    assert list(folder.iterdir()) == [] and host.scripts_run == []
    assert samba_dc.ADMIN_PASSWORD not in message


def test_the_host_staying_down_mid_copy_names_the_partial_to_remove(
        tmp_path: Path, ca: TestCA, lab: tuple[RecordedHyperVHost, int, Path]) -> None:
    """The real share (DC) through a relay on ``smb_port`` that is cut mid-copy and then refuses every
    connection, WinRM recorded (never reached): the ``.partial`` cannot be deleted, so the message names it,
    and it is indeed what is left in the DC's folder."""
    host, port, folder = lab
    image = _disk(tmp_path, "gpt", size=64 * MiB, fill=48)
    with HostRelay(("127.0.0.1", 445)) as relay:
        _, progress = _cut_after_first_write(relay, stay_down=True)
        with pytest.raises(EnvironmentProblem) as caught:
            HyperVConnector().deliver(image, sidecar_for(image), _lab_settings(port, ca, smb_port=relay.port),
                                      samba_dc.ADMIN_PASSWORD, progress, Flag())
    message = str(caught.value)
    assert re.search(
        rf"^The connection to 127\.0\.0\.1 was lost during the copy to {PARTIAL}, after .* LayerDesk could not "
        rf"clean up on 127\.0\.0\.1 \(Failed to connect to '127\.0\.0\.1:{relay.port}': \[Errno 111\] Connection "
        rf"refused\): remove {PARTIAL} there by hand\.$", message), message
    assert [p.name for p in folder.iterdir()] == ["Gold-20250301T101500Z.vhdx.partial"] and host.scripts_run == []
    assert samba_dc.ADMIN_PASSWORD not in message



def test_the_host_s_disk_full_is_a_clear_error_and_leaves_nothing(
        tmp_path: Path, ca: TestCA, lab: tuple[RecordedHyperVHost, int, Path]) -> None:
    """The real share (DC), its target folder a real 8 MiB tmpfs, WinRM recorded (never reached): Samba answers
    the write that finds no room with STATUS_DISK_FULL ("There is not enough space on the disk"); the delivery
    says the share is full, deletes the ``.partial`` and makes no VM."""
    host, port, folder = lab
    image = _disk(tmp_path, "gpt", size=32 * MiB, fill=16)
    with small_filesystem(folder / "small", "8m", options="mode=0777") as small:
        with pytest.raises(UserError) as caught:
            HyperVConnector().deliver(image, sidecar_for(image),
                                      _lab_settings(port, ca, target_folder=SHARE + r"\small"),
                                      samba_dc.ADMIN_PASSWORD, lambda *_: None, Flag())
        message = str(caught.value)
        assert re.fullmatch(
            rf"The share {re.escape(SHARE)}\\small is full: 127\.0\.0\.1 ran out of space after \d+ of \d+ MiB of "
            r"Gold-20250301T101500Z\.vhdx were written \(STATUS_DISK_FULL\)\. Free space on the share or choose "
            rf"another folder\. The partial file {re.escape(SHARE)}\\small\\Gold-20250301T101500Z\.vhdx\.partial "
            r"was deleted\.", message), message
        assert list(small.iterdir()) == [] and host.scripts_run == []
