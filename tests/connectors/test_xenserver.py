"""The XenServer connector against a recording: the XenAPI exchanges of a pool master
(``tests/connectors/recordings/xenserver``) served over HTTPS on a real local socket, with TLS verified
against a CA made here, so xmlrpc.client's real ``methodCall`` requests and the ``PUT /import_raw_vdi``
upload run end to end. What is left on the pool is read back from the recorded pool's state."""

from __future__ import annotations

import gc
import hashlib
import logging
import re
import subprocess
import warnings
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from app.connectors import connector_for
from app.connectors.base import ConnectorSettings
from app.connectors.xenserver import XenServerConnector
from app.engine.disk import image_info
from app.errors import Conflict, EnvironmentProblem, NotFound, UserError, ValidationError
from app.tasks.base import TaskCanceled
from tests.connectors.conftest import Flag, MiB, sidecar_for
from tests.support.hyperv_winrm import TestCA, make_test_ca
from tests.support.xenserver_xapi import RecordedPool, recorded_pool

USER, PASSWORD = "root", "Xapi-Secret-1"
SR_UUID = "0e4c7a9b-5d3f-4a1e-8b6c-2f9d7e5a3c1b"
VDI = "OpaqueRef:a8d4c6e2-1b3f-4d5a-9c7e-2f4a6b8d0c1e"
VM = "OpaqueRef:4d6f8a0c-2e4b-4d6f-8a1c-5e7b9d1f3a5c"


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return make_test_ca(tmp_path_factory.mktemp("xen-ca"))


@pytest.fixture
def pool(ca: TestCA) -> Iterator[tuple[RecordedPool, int]]:
    with recorded_pool(ca, USER, PASSWORD) as served:
        yield served


def _settings(port: int, ca: TestCA | None, **options: object) -> ConnectorSettings:
    base: dict[str, object] = {"sr": "Local storage", "network": "Pool-wide network associated with eth0"}
    if ca is not None:
        base["ca_file"] = str(ca.ca_file)
    base.update(options)
    return ConnectorSettings("XS1", "xenserver", f"https://localhost:{port}", USER,
                             options={k: v for k, v in base.items() if v is not None})


def _vhd(folder: Path, scheme: str = "gpt", size: int = 16 * MiB, fmt: str = "vpc") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    raw = folder / "disk.raw"
    with raw.open("wb") as file:
        file.truncate(size)
        file.seek(2 * MiB)
        file.write(bytes(range(256)) * 4096 * 4)
    if scheme == "gpt":
        subprocess.run(["sgdisk", "-o", "-n", "1:2048:0", "-t", "1:0700", str(raw)], check=True, capture_output=True)
    else:
        with raw.open("r+b") as file:
            file.seek(446)
            file.write(bytes([0x80, 0, 0x21, 0, 0x07, 0, 0, 0]) + (2048).to_bytes(4, "little")
                       + (size // 512 - 2048).to_bytes(4, "little"))
            file.seek(510)
            file.write(b"\x55\xaa")
    image = folder / ("Gold_2025-03-01_10-15." + {"vpc": "vhd", "vhdx": "vhdx"}[fmt])
    subprocess.run(["qemu-img", "convert", "-O", fmt, str(raw), str(image)], check=True, capture_output=True)
    raw.unlink()
    return image


def _nothing_left(pool: RecordedPool) -> None:
    assert pool.vdis == {} and pool.vms == {} and pool.vbds == [] and pool.sessions == set()


def test_fields_and_endpoint() -> None:
    assert isinstance(connector_for("xenserver"), XenServerConnector)
    with pytest.raises(ValidationError, match="over HTTPS only"):
        XenServerConnector().validate("http://xs1", USER, {"sr": "Local storage"})
    with pytest.raises(ValidationError, match="Storage repository is required"):
        XenServerConnector().validate("https://xs1", USER, {})


def test_the_test_reports_each_step(ca: TestCA, pool: tuple[RecordedPool, int]) -> None:
    """Against a recording."""
    recorded, port = pool
    report = XenServerConnector().test(_settings(port, ca), PASSWORD)
    assert report.ok, report
    assert [s.name for s in report.steps] == ["TCP", "TLS", "login", "SR", "network"]
    assert "certificate verified" in report.steps[1].detail
    assert recorded.methods == ["session.login_with_password", "SR.get_by_name_label", "network.get_by_name_label",
                                "session.logout"]
    _nothing_left(recorded)


def test_wrong_password_missing_sr_network_and_unknown_sr_uuid(ca: TestCA, pool: tuple[RecordedPool, int]) -> None:
    """Against a recording: SESSION_AUTHENTICATION_FAILED, empty name lookups, UUID_INVALID."""
    recorded, port = pool
    report = XenServerConnector().test(_settings(port, ca), "wrong password 1")
    assert [s.ok for s in report.steps] == [True, True, False, None, None]
    assert "refused the user name or password (SESSION_AUTHENTICATION_FAILED)" in (report.failure or "")
    assert "wrong password 1" not in str(report)
    recorded.outcomes["SR.get_by_name_label"] = "none"
    report = XenServerConnector().test(_settings(port, ca, sr="Fast SSD"), PASSWORD)
    assert [s.ok for s in report.steps] == [True, True, True, False, None]
    assert "has no SR named 'Fast SSD'" in (report.failure or "")
    report = XenServerConnector().test(_settings(port, ca, sr="0e4c7a9b-0000-4a1e-8b6c-2f9d7e5a3c1b"), PASSWORD)
    assert "has no SR with UUID 0e4c7a9b-0000-4a1e-8b6c-2f9d7e5a3c1b (UUID_INVALID)" in (report.failure or "")
    assert XenServerConnector().test(_settings(port, ca, sr=SR_UUID), PASSWORD).steps[3].ok
    recorded.outcomes["network.get_by_name_label"] = "none"
    report = XenServerConnector().test(_settings(port, ca, sr=SR_UUID, network="Storage"), PASSWORD)
    assert "has no network named 'Storage'" in (report.failure or "")
    recorded.outcomes["session.login_with_password"] = "host-is-slave"
    report = XenServerConnector().test(_settings(port, ca), PASSWORD)
    assert "is not the pool master; connect to 192.0.2.10 instead" in (report.failure or "")
    _nothing_left(recorded)


def test_untrusted_certificate_unreachable_host_and_verification_off(
        tmp_path: Path, ca: TestCA, pool: tuple[RecordedPool, int], caplog: pytest.LogCaptureFixture) -> None:
    """Against a recording whose certificate comes from a CA the system does not trust."""
    recorded, port = pool
    report = XenServerConnector().test(_settings(port, None), PASSWORD)
    assert [s.ok for s in report.steps] == [True, False, None, None, None]
    assert "is not trusted" in (report.failure or "")
    report = XenServerConnector().test(_settings(1, ca), PASSWORD)
    assert "Cannot reach localhost on port 1" in (report.failure or "")
    image = _vhd(tmp_path)
    with pytest.raises(EnvironmentProblem, match="Cannot reach XenAPI at https://localhost:1"):
        XenServerConnector().deliver(image, sidecar_for(image), _settings(1, ca), PASSWORD, lambda *_: None, Flag())
    with caplog.at_level(logging.WARNING, logger="app.connectors.reach"):
        report = XenServerConnector().test(replace(_settings(port, None), verify_tls=False), PASSWORD)
    assert report.ok and "NOT verified" in report.steps[1].detail
    assert "verification is turned off" in caplog.text
    _nothing_left(recorded)


def test_delivers_a_vhd_as_a_uefi_vm(tmp_path: Path, ca: TestCA, pool: tuple[RecordedPool, int]) -> None:
    """Against a recording: VDI.create, PUT /import_raw_vdi (watched by a task), VM.create, VBD and VIF."""
    recorded, port = pool
    image = _vhd(tmp_path)
    result = XenServerConnector().deliver(image, sidecar_for(image), _settings(port, ca, vcpus=4, memory_mb=8192),
                                          PASSWORD, lambda *_: None, Flag())
    assert recorded.methods == [
        "session.login_with_password", "SR.get_by_name_label", "network.get_by_name_label", "VM.get_by_name_label",
        "VDI.create", "VDI.get_uuid", "task.create", "task.get_status", "task.destroy", "VM.create", "VBD.create",
        "VIF.create", "VM.get_uuid", "session.logout"]
    created = recorded.vdis[VDI]
    # qemu-img rounds a VHD's size up to whole CHS cylinders: the VDI gets the disk's size as VHD says it.
    assert created["virtual_size"] == str(image_info(image).virtual_size) and created["SR"].startswith("OpaqueRef:")
    assert hashlib.sha256(recorded.uploads[VDI]).digest() == hashlib.sha256(image.read_bytes()).digest()
    query = recorded.import_requests[0]
    assert query["format"] == ["vhd"] and query["vdi"] == [VDI] and "task_id" in query
    vm = recorded.vms[VM]
    assert vm["name_label"] == "Gold-20250301T101500Z" and vm["HVM_boot_params"]["firmware"] == "uefi"
    assert vm["VCPUs_max"] == "4" and vm["memory_static_max"] == str(8192 * MiB)
    assert recorded.vbds == [{**recorded.vbds[0], "VM": VM, "VDI": VDI, "bootable": True}]
    assert result.ids == {"vm": "Gold-20250301T101500Z", "vm_uuid": "8e2d4f6a-1c3b-4e5d-9f7a-2b4c6d8e0f1a",
                          "vdi_uuid": "3f9b2c1d-7e6a-4b5c-8d9e-0f1a2b3c4d5e", "firmware": "uefi"}
    assert recorded.sessions == set()


def test_an_mbr_disk_boots_bios_and_names_arrive_whole(tmp_path: Path, ca: TestCA,
                                                        pool: tuple[RecordedPool, int]) -> None:
    """Against a recording."""
    recorded, port = pool
    image = _vhd(tmp_path, "mbr")
    name = "Gold <&> ']]> \"x\""
    XenServerConnector().deliver(image, sidecar_for(image, template=name),
                                 _settings(port, ca, network=None, vm_name_pattern="{template}"), PASSWORD,
                                 lambda *_: None, Flag())
    vm = recorded.vms[VM]
    assert vm["name_label"] == name and vm["HVM_boot_params"]["firmware"] == "bios"
    assert "VIF.create" not in recorded.methods


def test_a_vhdx_is_refused_before_anything_is_asked(tmp_path: Path, ca: TestCA, pool: tuple[RecordedPool, int]) -> None:
    recorded, port = pool
    image = _vhd(tmp_path, fmt="vhdx")
    with pytest.raises(UserError, match="publish the template as VHD"):
        XenServerConnector().deliver(image, sidecar_for(image), _settings(port, ca), PASSWORD, lambda *_: None, Flag())
    assert recorded.calls == []


def test_a_name_clash_and_a_full_sr_leave_nothing(tmp_path: Path, ca: TestCA, pool: tuple[RecordedPool, int]) -> None:
    """Against a recording: an existing VM of that name; SR_FULL from VDI.create."""
    recorded, port = pool
    image = _vhd(tmp_path)
    recorded.outcomes["VM.get_by_name_label"] = "taken"
    with pytest.raises(Conflict, match="already has a VM named 'Gold-20250301T101500Z'; it was left alone"):
        XenServerConnector().deliver(image, sidecar_for(image), _settings(port, ca), PASSWORD, lambda *_: None, Flag())
    assert "VDI.create" not in recorded.methods
    del recorded.outcomes["VM.get_by_name_label"]
    recorded.outcomes["VDI.create"] = "sr-full"
    with pytest.raises(UserError, match=r"The SR is full: .* needs 16.0 GiB but 10.0 GiB can be had \(SR_FULL\)"):
        XenServerConnector().deliver(image, sidecar_for(image), _settings(port, ca), PASSWORD, lambda *_: None, Flag())
    _nothing_left(recorded)
    assert recorded.uploads == {}


def test_a_failed_import_or_attach_destroys_the_vdi_and_the_vm(tmp_path: Path, ca: TestCA,
                                                              pool: tuple[RecordedPool, int]) -> None:
    """Against a recording: the import task fails (VDI_IO_ERROR); VBD.create answers HANDLE_INVALID."""
    recorded, port = pool
    image = _vhd(tmp_path)
    recorded.outcomes["task.get_status"] = "failure"
    with pytest.raises(EnvironmentProblem, match="could not import the disk: VDI_IO_ERROR Device I/O errors"):
        XenServerConnector().deliver(image, sidecar_for(image), _settings(port, ca), PASSWORD, lambda *_: None, Flag())
    assert recorded.methods[-3:] == ["task.destroy", "VDI.destroy", "session.logout"]
    _nothing_left(recorded)
    del recorded.outcomes["task.get_status"]
    recorded.outcomes["VBD.create"] = "handle-invalid"
    with pytest.raises(NotFound, match=r"VBD\.create.*the VM and its disk were destroyed"):
        XenServerConnector().deliver(image, sidecar_for(image), _settings(port, ca), PASSWORD, lambda *_: None, Flag())
    assert recorded.methods[-4:] == ["VBD.create", "VM.destroy", "VDI.destroy", "session.logout"]
    _nothing_left(recorded)
    assert recorded.uploads == {}


def test_cancel_mid_upload_destroys_the_vdi(tmp_path: Path, ca: TestCA, pool: tuple[RecordedPool, int]) -> None:
    """Against a recording: the upload stops part way, the pool sees a short body, and VDI.destroy follows."""
    recorded, port = pool
    image = _vhd(tmp_path, size=24 * MiB)
    flag = Flag()

    def progress(percent: float, _message: str) -> None:
        if percent > 10:
            flag.cancelled = True

    with pytest.raises(TaskCanceled, match="half-imported disk was destroyed"):
        XenServerConnector().deliver(image, sidecar_for(image), _settings(port, ca), PASSWORD, progress, flag)
    assert recorded.aborted_uploads == 1 and "VM.create" not in recorded.methods
    assert recorded.methods[-3:] == ["task.destroy", "VDI.destroy", "session.logout"]
    _nothing_left(recorded)


VDI_UUID = "3f9b2c1d-7e6a-4b5c-8d9e-0f1a2b3c4d5e"


def _collect_abandoned_sockets() -> None:
    """When the server resets the upload mid-body, http.client may abandon the TLS socket of the response it
    began to read, whose close then waits for the garbage collector: collect it here, in the test that
    causes it, so it is not reported against whichever test runs next."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"unclosed <ssl\.SSLSocket", ResourceWarning)
        gc.collect()


def test_the_host_going_down_mid_upload_destroys_the_vdi_once_it_answers_again(
        tmp_path: Path, ca: TestCA, pool: tuple[RecordedPool, int]) -> None:
    """Against a recording: the pool master resets the ``PUT /import_raw_vdi`` connection after the first MiB
    of the VHD without answering (as a host going away does) and answers XenAPI again for the clean-up, so the
    half-imported VDI is destroyed and the error says how far the upload got."""
    recorded, port = pool
    image = _vhd(tmp_path, size=24 * MiB)
    recorded.cut_upload_after = MiB
    with pytest.raises(EnvironmentProblem) as caught:
        XenServerConnector().deliver(image, sidecar_for(image), _settings(port, ca), PASSWORD, lambda *_: None, Flag())
    message = str(caught.value)
    assert re.fullmatch(
        rf"The connection to localhost was lost during the upload of the disk to https://localhost:{port}"
        r"/import_raw_vdi, after [\d.]+ of [\d.]+ MiB \((it was reset|it was closed without an answer)\); the "
        r"host went down or the network between failed\. Check that the pool master localhost is reachable "
        r"from this machine\. The half-imported disk was destroyed\.", message), message
    assert recorded.cut and recorded.aborted_uploads == 1 and "VM.create" not in recorded.methods
    assert recorded.methods[-3:] == ["task.destroy", "VDI.destroy", "session.logout"]
    _nothing_left(recorded)
    assert recorded.uploads == {}
    assert PASSWORD not in message
    del caught
    _collect_abandoned_sockets()


def test_the_host_staying_down_names_the_vdi_to_remove_by_hand(tmp_path: Path, ca: TestCA,
                                                                pool: tuple[RecordedPool, int]) -> None:
    """Against a recording: the upload's connection is reset after the first MiB and the pool master stops
    listening (and resets what still arrives on a kept-alive connection), so VDI.destroy cannot reach it; the
    message names the VDI, by name and UUID, to remove by hand instead of saying it was destroyed."""
    recorded, port = pool
    image = _vhd(tmp_path, size=24 * MiB)
    recorded.cut_upload_after = MiB
    recorded.stay_down = True
    with pytest.raises(EnvironmentProblem) as caught:
        XenServerConnector().deliver(image, sidecar_for(image), _settings(port, ca), PASSWORD, lambda *_: None, Flag())
    message = str(caught.value)
    assert message.startswith(f"The connection to localhost was lost during the upload of the disk to "
                              f"https://localhost:{port}/import_raw_vdi, after "), message
    assert "was destroyed" not in message
    assert re.search(
        r"from this machine\. LayerDesk could not clean up on XenServer pool master localhost \(Cannot reach "
        rf"XenAPI at https://localhost:{port} \(.+\)\. Check the URL and that the pool master is on\): remove "
        rf"the VDI 'Gold-20250301T101500Z' \({VDI_UUID}\) there by hand \(xe vdi-destroy, or XenCenter's Storage "
        r"tab\)\.$", message), message
    # Nothing reached the pool after the upload began.
    assert recorded.methods[-2:] == ["VDI.get_uuid", "task.create"] and recorded.cut
    assert VDI in recorded.vdis  # the half VDI is still there, as the message says
    assert PASSWORD not in message
    del caught
    _collect_abandoned_sockets()
