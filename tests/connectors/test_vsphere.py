"""The vSphere and MCS-on-vSphere connectors against a real vCenter simulator (govmomi's vcsim, built from
Debian's govmomi sources and served over TLS with a certificate of a test CA): the test steps, bad
credentials, an unreachable host, missing datastore, a datastore too small, a duplicate VM name, a whole
delivery (clone, import lease upload, attach, snapshot), MCS (power on, the guest's shutdown simulated
through the API, snapshot) and cancels; retrieving a delivered disk (as the packaging machine left it, refused
while the VM runs, a removed VM or disk file, cancel mid-download). What was created, or that nothing was left,
is read back through pyvmomi and the simulator's datastore folder."""

from __future__ import annotations

import gc
import json
import os
import re
import socket
import ssl
import subprocess
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("pyVmomi")

from pyVim.connect import Disconnect, SmartConnect
from pyVmomi import vim, vmodl

from app.connectors import connector_for
from app.connectors.base import ConnectorSettings
from app.connectors.vsphere import MCSVSphereConnector, VSphereConnector, vm_name
from app.engine.disk import image_info
from app.errors import AuthenticationFailed, Conflict, EnvironmentProblem, NotFound, UserError, ValidationError
from app.tasks.base import TaskCanceled
from tests.connectors.conftest import Flag, MiB, sidecar_for
from tests.support import vsphere_sim
from tests.support.host_relay import HostRelay

TEMPLATE = "DC0_H0_VM0"


@pytest.fixture(scope="session")
def vcsim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[vsphere_sim.RunningSimulator]:
    try:
        simulator = vsphere_sim.start(tmp_path_factory.mktemp("vcsim"))
    except vsphere_sim.SimulatorUnavailable as missing:
        if os.environ.get("CI"):
            pytest.fail(f"the vCenter simulator is missing in CI: {missing}")
        pytest.skip(f"no vCenter simulator: {missing}")
    try:
        yield simulator
    finally:
        simulator.stop()


@pytest.fixture
def api(vcsim: vsphere_sim.RunningSimulator) -> Iterator[Any]:
    """The simulator's content, through a pyvmomi session of the test's own (to read back what was made)."""
    context = ssl.create_default_context(cafile=str(vcsim.ca_file))
    instance = SmartConnect(host=vcsim.host, port=vcsim.port, user=vsphere_sim.USER, pwd=vsphere_sim.PASSWORD,
                            sslContext=context)
    try:
        yield instance.RetrieveContent()
    finally:
        Disconnect(instance)


def _settings(sim: vsphere_sim.RunningSimulator, connector_type: str = "vsphere",
              **options: object) -> ConnectorSettings:
    base: dict[str, object] = {"port": sim.port, "ca_file": str(sim.ca_file), "datacenter": "DC0",
                               "cluster": "DC0_C0", "datastore": "LocalDS_0", "template_vm": TEMPLATE,
                               "network": "VM Network"}
    base.update(options)
    return ConnectorSettings("vCenter", connector_type, sim.host, vsphere_sim.USER, True,
                             {k: v for k, v in base.items() if v is not None})


def _vms(content: Any) -> dict[str, Any]:
    view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
    try:
        return {vm.name: vm for vm in view.view}
    finally:
        view.Destroy()


def _datastore_files(sim: vsphere_sim.RunningSimulator, name: str) -> list[str]:
    """Every file under the simulator's datastores whose path mentions ``name``."""
    return sorted(str(p.relative_to(sim.datastores)) for p in sim.datastores.rglob("*") if name in str(p))


def _disk(folder: Path, name: str, size: int = 8 * MiB) -> Path:
    """A GPT raw disk with distinct bytes in its data area (the connector converts it to a VMDK)."""
    path = folder / name
    with path.open("wb") as file:
        file.truncate(size)
        file.seek(MiB)
        file.write(bytes(range(256)) * 4096)
    subprocess.run(["sgdisk", "-o", "-n", "1:2048:0", "-t", "1:0700", str(path)], check=True, capture_output=True)
    return path


# --- configuration ----------------------------------------------------------------------------------


def test_both_types_are_registered_with_their_fields() -> None:
    assert isinstance(connector_for("vsphere"), VSphereConnector)
    mcs = connector_for("mcs-vsphere")
    assert isinstance(mcs, MCSVSphereConnector)
    keys = {f.key for f in mcs.fields}
    assert {"endpoint", "port", "username", "password", "verify_tls", "ca_file", "datacenter", "cluster",
            "resource_pool", "datastore", "folder", "template_vm", "network", "vm_name_pattern",
            "shutdown_timeout_s"} <= keys
    assert "shutdown_timeout_s" not in {f.key for f in VSphereConnector.fields}
    assert mcs.field("password").secret and mcs.field("verify_tls").default is True
    with pytest.raises(ValidationError, match="is not a vCenter address"):
        mcs.validate("ftp://vc.lab", "u", {})
    assert VSphereConnector._address(ConnectorSettings("v", "vsphere", "https://vc.lab:8443/sdk")) == ("vc.lab", 8443)
    assert VSphereConnector._address(ConnectorSettings("v", "vsphere", "vc.lab", options={"port": 9443})) == (
        "vc.lab", 9443)
    with pytest.raises(ValidationError, match="Datacenter is required"):
        mcs.validate("vc.lab", "u", {"cluster": "C", "datastore": "D", "template_vm": "T"})


def test_the_vm_name_pattern_fills_in_the_image_and_refuses_what_vsphere_cannot_take(tmp_path: Path) -> None:
    sidecar = sidecar_for(_disk(tmp_path, "Gold.raw"))
    assert vm_name("{image}", sidecar) == "Gold"
    assert vm_name("MCS-{template}-r{revision}-{date}", sidecar) == "MCS-Gold-r3-2025-03-01_10-15"
    with pytest.raises(ValidationError, match=r"can only use \{image\}"):
        vm_name("{owner}", sidecar)
    with pytest.raises(ValidationError, match="not one vSphere takes"):
        vm_name("a/{image}", sidecar)


def test_tls_verification_stays_on_unless_turned_off(vcsim: vsphere_sim.RunningSimulator,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    on = VSphereConnector.tls_context(_settings(vcsim))
    assert on.verify_mode == ssl.CERT_REQUIRED and on.check_hostname
    with pytest.raises(ValidationError, match=r"CA file /nonexistent\.pem does not exist"):
        VSphereConnector.tls_context(_settings(vcsim, ca_file="/nonexistent.pem"))
    off = VSphereConnector.tls_context(replace(_settings(vcsim), verify_tls=False))
    assert off.verify_mode == ssl.CERT_NONE
    assert "verification is off for connector vCenter" in caplog.text


# --- test steps -------------------------------------------------------------------------------------


def test_the_test_reports_every_step(vcsim: vsphere_sim.RunningSimulator) -> None:
    report = VSphereConnector().test(_settings(vcsim), vsphere_sim.PASSWORD)
    assert report.ok, report
    assert [s.name for s in report.steps] == ["tcp", "tls", "login", "datacenter", "datastore", "template VM",
                                              "network"]
    details = {s.name: s.detail for s in report.steps}
    assert "verified (issued by LayerDesk test vCenter CA)" in details["tls"]
    assert "VMware vCenter Server" in details["login"]
    assert "resource pool Resources of DC0_C0" in details["datacenter"]
    assert "datastore LocalDS_0" in details["datastore"] and "GiB free" in details["datastore"]
    assert TEMPLATE in details["template VM"]


def test_without_the_ca_file_the_certificate_is_not_trusted(vcsim: vsphere_sim.RunningSimulator) -> None:
    report = VSphereConnector().test(_settings(vcsim, ca_file=None), vsphere_sim.PASSWORD)
    assert [(s.name, s.ok) for s in report.steps][:3] == [("tcp", True), ("tls", False), ("login", None)]
    assert "could not be verified" in (report.failure or "")
    assert "CA file" in (report.failure or "")
    off = VSphereConnector().test(replace(_settings(vcsim, ca_file=None), verify_tls=False), vsphere_sim.PASSWORD)
    assert off.ok and "WITHOUT checking the certificate" in off.steps[1].detail


def test_a_wrong_password_is_a_clear_error_and_not_echoed(vcsim: vsphere_sim.RunningSimulator) -> None:
    report = VSphereConnector().test(_settings(vcsim), "Wrong-Passw0rd!")
    assert [(s.name, s.ok) for s in report.steps][2:4] == [("login", False), ("datacenter", None)]
    assert "refused the user name or password of 'administrator@vsphere.local'" in (report.failure or "")
    assert "Wrong-Passw0rd!" not in str(report)


def test_an_unreachable_host_is_a_clear_error(tmp_path: Path) -> None:
    image = _disk(tmp_path, "Gold.raw")
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = ConnectorSettings("vCenter", "vsphere", "127.0.0.1", "u", True, {"port": port})
    report = VSphereConnector().test(settings, "x")
    assert [s.ok for s in report.steps] == [False, None, None, None, None, None, None]
    assert f"Cannot reach vCenter at 127.0.0.1:{port}" in (report.failure or "")
    with pytest.raises(EnvironmentProblem, match="Cannot reach vCenter"):
        VSphereConnector().deliver(image, sidecar_for(image), settings, "x",
                                   lambda *_: None, Flag())


def test_missing_objects_are_named_with_what_exists(vcsim: vsphere_sim.RunningSimulator) -> None:
    cases = {
        "datacenter": ({"datacenter": "DC9"}, "has no datacenter 'DC9'; its datacenters are DC0"),
        "datastore": ({"datastore": "SAN-01"}, "has no datastore 'SAN-01'; its datastores are LocalDS_0"),
        "template VM": ({"template_vm": "Win11-Template"}, "has no VM or template 'Win11-Template'"),
        "network": ({"network": "VDI-LAN"}, "has no network 'VDI-LAN'; its networks are"),
    }
    for step, (options, message) in cases.items():
        report = VSphereConnector().test(_settings(vcsim, **options), vsphere_sim.PASSWORD)
        assert {s.name: s.ok for s in report.steps}[step] is False, report
        assert message in (report.failure or ""), report.failure
    report = VSphereConnector().test(_settings(vcsim, cluster="Gold-Cluster"), vsphere_sim.PASSWORD)
    assert "has no cluster or host 'Gold-Cluster'; it has DC0_C0, DC0_H0" in (report.failure or "")


# --- delivery ---------------------------------------------------------------------------------------


def test_a_delivery_clones_the_template_imports_the_disk_and_snapshots(
        vcsim: vsphere_sim.RunningSimulator, api: Any, tmp_path: Path) -> None:
    image = _disk(tmp_path, "Gold_2025-03-01_10-15.raw")
    sidecar = sidecar_for(image)
    seen: list[str] = []
    result = VSphereConnector().deliver(image, sidecar, _settings(vcsim), vsphere_sim.PASSWORD,
                                        lambda _p, message: seen.append(message), Flag())
    vm = _vms(api)[sidecar.image]
    assert result.ids["vm"] == sidecar.image and result.ids["vm_moref"] == vm._moId
    assert f"{sidecar.image}-disk" not in _vms(api)  # the import helper is gone
    disks = [d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)]
    assert [d.backing.fileName for d in disks] == [f"[LocalDS_0] {sidecar.image}/{sidecar.image}-layered.vmdk"]
    assert disks[0].capacityInKB == 8 * 1024
    nic = next(d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualEthernetCard))
    assert nic.backing.deviceName == "VM Network"
    assert vm.runtime.powerState == vim.VirtualMachinePowerState.poweredOff
    assert vm.snapshot.rootSnapshotList[0].name == f"LayerDesk {sidecar.image}"
    assert sidecar.checksum in vm.config.annotation
    assert vm.resourcePool.owner.name == "DC0_C0"
    assert any("Uploaded" in m for m in seen) and "Converting" in seen[0]
    files = _datastore_files(vcsim, sidecar.image)
    assert any(f.endswith(f"{sidecar.image}/{sidecar.image}-layered.vmdk") for f in files), files
    assert not any(f"{sidecar.image}-disk" in f for f in files), files


def test_mcs_starts_the_master_image_waits_for_its_shutdown_and_snapshots(
        vcsim: vsphere_sim.RunningSimulator, api: Any, tmp_path: Path) -> None:
    """The guest's shutdown after its layer scripts is simulated by powering the VM off through the API."""
    image = _disk(tmp_path, "MCS_2025-03-01_10-15.raw")
    sidecar = sidecar_for(image, template="MCS")
    states: list[str] = []

    delivered = threading.Event()

    def guest_shuts_down() -> None:
        # Until the delivery ends (it fails after its own shutdown timeout): a loaded machine is slow.
        while not delivered.is_set():
            try:
                vm = _vms(api).get(sidecar.image)
                if vm is not None and vm.runtime.powerState == vim.VirtualMachinePowerState.poweredOn:
                    states.append("poweredOn")
                    time.sleep(0.5)
                    vm.PowerOffVM_Task()
                    return
            except vmodl.fault.ManagedObjectNotFound:
                pass  # the VM list changed while it was read
            time.sleep(0.1)

    guest = threading.Thread(target=guest_shuts_down)
    guest.start()
    try:
        result = MCSVSphereConnector().deliver(image, sidecar, _settings(vcsim, "mcs-vsphere", shutdown_timeout_s=120),
                                               vsphere_sim.PASSWORD, lambda *_: None, Flag())
    finally:
        delivered.set()
        guest.join()
    assert states == ["poweredOn"]
    vm = _vms(api)[sidecar.image]
    assert result.type == "mcs-vsphere"
    assert vm.runtime.powerState == vim.VirtualMachinePowerState.poweredOff
    assert vm.snapshot.rootSnapshotList[0].name == f"LayerDesk {sidecar.image}"


def test_mcs_removes_a_master_image_that_never_shuts_down(vcsim: vsphere_sim.RunningSimulator, api: Any,
                                                          tmp_path: Path) -> None:
    image = _disk(tmp_path, "Stuck.raw")
    with pytest.raises(EnvironmentProblem, match="did not shut down within 2 s of starting"):
        MCSVSphereConnector().deliver(image, sidecar_for(image), _settings(vcsim, "mcs-vsphere", shutdown_timeout_s=2),
                                      vsphere_sim.PASSWORD, lambda *_: None, Flag())
    assert not {"Stuck", "Stuck-disk"} & set(_vms(api))
    assert _datastore_files(vcsim, "Stuck") == []


def test_a_duplicate_vm_name_is_refused_before_anything_is_made(vcsim: vsphere_sim.RunningSimulator, api: Any,
                                                                tmp_path: Path) -> None:
    image = _disk(tmp_path, "DC0_H0_VM1.raw")
    before = set(_vms(api))
    with pytest.raises(Conflict, match="already has a VM named 'DC0_H0_VM1'; it was left alone"):
        VSphereConnector().deliver(image, sidecar_for(image), _settings(vcsim), vsphere_sim.PASSWORD,
                                   lambda *_: None, Flag())
    assert set(_vms(api)) == before
    assert _vms(api)["DC0_H0_VM1"].runtime.powerState == vim.VirtualMachinePowerState.poweredOn


def test_a_missing_datastore_or_bad_password_refuses_a_delivery(vcsim: vsphere_sim.RunningSimulator, api: Any,
                                                                tmp_path: Path) -> None:
    image = _disk(tmp_path, "Nowhere.raw")
    with pytest.raises(NotFound, match="no datastore 'SAN-01'"):
        VSphereConnector().deliver(image, sidecar_for(image), _settings(vcsim, datastore="SAN-01"),
                                   vsphere_sim.PASSWORD, lambda *_: None, Flag())
    with pytest.raises(AuthenticationFailed, match="refused the user name or password") as raised:
        VSphereConnector().deliver(image, sidecar_for(image), _settings(vcsim), "Wrong-Passw0rd!", lambda *_: None,
                                   Flag())
    assert "Wrong-Passw0rd!" not in str(raised.value)
    assert "Nowhere" not in _vms(api)


def test_a_datastore_too_small_for_the_disk_is_refused_before_anything_is_made(
        vcsim: vsphere_sim.RunningSimulator, api: Any, tmp_path: Path) -> None:
    """The simulator reports its datastore folder's real free space (statfs); a disk that can grow to 4 TiB does
    not fit on this machine's disk."""
    image = tmp_path / "Huge.vmdk"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=streamOptimized", str(image), "4T"],
                   check=True)
    with pytest.raises(UserError, match=r"'LocalDS_0' has [\d.]+ GiB free; the disk can grow to 4096.0 GiB"):
        VSphereConnector().deliver(image, sidecar_for(image), _settings(vcsim), vsphere_sim.PASSWORD,
                                   lambda *_: None, Flag())
    assert not {"Huge", "Huge-disk"} & set(_vms(api))


def test_cancel_mid_upload_leaves_nothing_behind(vcsim: vsphere_sim.RunningSimulator, api: Any,
                                                 tmp_path: Path) -> None:
    image = tmp_path / "Cancelled.vmdk"
    # Random bytes do not compress: the streamOptimized disk stays several MiB, so several chunks go up.
    raw = tmp_path / "noise.raw"
    raw.write_bytes(os.urandom(6 * MiB))
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", str(raw),
                    str(image)], check=True)
    flag = Flag()
    seen: list[str] = []

    def progress(_percent: float, message: str) -> None:
        seen.append(message)
        if message.startswith("Uploaded"):
            assert "Cancelled-disk" in _vms(api) and "Cancelled" in _vms(api)  # both exist mid-upload
            flag.cancelled = True

    with pytest.raises(TaskCanceled, match="during the upload"):
        VSphereConnector().deliver(image, sidecar_for(image), _settings(vcsim), vsphere_sim.PASSWORD, progress, flag)
    assert sum(m.startswith("Uploaded") for m in seen) == 1
    assert not {"Cancelled", "Cancelled-disk"} & set(_vms(api))
    assert _datastore_files(vcsim, "Cancelled") == []


def _noise_vmdk(folder: Path, name: str) -> Path:
    """A streamOptimized VMDK of random bytes (which do not compress: several 1 MiB chunks go up)."""
    raw = folder / f"{name}.raw"
    raw.write_bytes(os.urandom(6 * MiB))
    image = folder / f"{name}.vmdk"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", str(raw),
                    str(image)], check=True)
    raw.unlink()
    return image


def _upload_cut_off(relay: HostRelay, *, stay_down: bool) -> tuple[Any, list[int]]:
    """A progress callback that cuts ``relay`` once the first MiB of the disk went up, and the connections
    the relay had accepted by then (filled in at the cut)."""
    accepted: list[int] = []

    def progress(_percent: float, message: str) -> None:
        if message.startswith("Uploaded") and not accepted:
            accepted.append(relay.accepted)
            relay.cut(stay_down=stay_down)

    return progress, accepted


def _collect_abandoned_sockets() -> None:
    """A reset mid-request leaves http.client's half-read response holding its TLS socket until the garbage
    collector runs: collect it in the test that causes it, not in whichever test runs next."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"unclosed <ssl\.SSLSocket", ResourceWarning)
        gc.collect()


def test_vcenter_going_down_mid_upload_leaves_nothing_once_it_answers_again(
        vcsim: vsphere_sim.RunningSimulator, api: Any, tmp_path: Path) -> None:
    """Runs against vcsim through a relay: the connector's SOAP session and its upload both go through it (the
    lease's upload URL names the host the session uses). After the first MiB of the upload the relay resets
    every connection, as a host going away does; new connections go through again, so the clean-up can run."""
    image = _noise_vmdk(tmp_path, "Blip")
    with HostRelay((vcsim.host, vcsim.port)) as relay:
        progress, accepted = _upload_cut_off(relay, stay_down=False)
        with pytest.raises(EnvironmentProblem) as caught:
            VSphereConnector().deliver(image, sidecar_for(image), _settings(vcsim, port=relay.port),
                                       vsphere_sim.PASSWORD, progress, Flag())
        assert relay.accepted > accepted[0]  # the clean-up came through fresh connections
    where = f"127.0.0.1:{relay.port}"
    message = str(caught.value)
    assert re.fullmatch(rf"The connection to {where} was lost during the upload of the disk, after 1 of [67] MiB "
                        rf"\(.+\); check that vCenter {where} and its hosts are reachable\. What was created was "
                        r"removed again\.", message), message
    assert not {"Blip", "Blip-disk"} & set(_vms(api))
    assert _datastore_files(vcsim, "Blip") == []
    assert vsphere_sim.PASSWORD not in message
    del caught
    _collect_abandoned_sockets()


def test_vcenter_staying_down_mid_upload_names_what_to_remove(vcsim: vsphere_sim.RunningSimulator, api: Any,
                                                              tmp_path: Path) -> None:
    """Runs against vcsim through a relay that resets every connection after the first MiB of the upload and
    refuses new ones from then on: the connector's clean-up cannot reach vCenter, so the message names what is
    left, which this test finds there (through its own session) and removes as the administrator would."""
    image = _noise_vmdk(tmp_path, "Down")
    with HostRelay((vcsim.host, vcsim.port)) as relay:
        progress, _accepted = _upload_cut_off(relay, stay_down=True)
        with pytest.raises(EnvironmentProblem) as caught:
            VSphereConnector().deliver(image, sidecar_for(image), _settings(vcsim, port=relay.port),
                                       vsphere_sim.PASSWORD, progress, Flag())
    where = f"127.0.0.1:{relay.port}"
    message = str(caught.value)
    assert message.startswith(f"The connection to {where} was lost during the upload of the disk, after 1 of "), message
    assert message.endswith(
        f"LayerDesk could not clean up on vCenter {where} (Connection refused): remove the import VM Down-disk with "
        "its half-uploaded disk (its folder on datastore LocalDS_0) and VM Down (in datacenter DC0, on datastore "
        "LocalDS_0) there (in the vSphere Client)."), message
    assert "removed again" not in message and vsphere_sim.PASSWORD not in message
    del caught
    _collect_abandoned_sockets()
    # What the message names is what is there; the administrator removes it.
    vms = _vms(api)
    assert {"Down", "Down-disk"} <= set(vms)
    assert any(path.endswith(".vmdk") for path in _datastore_files(vcsim, "Down-disk/"))
    for name in ("Down-disk", "Down"):
        _wait(vms[name].Destroy_Task())
    assert not {"Down", "Down-disk"} & set(_vms(api))
    assert _datastore_files(vcsim, "Down") == []


def test_a_wim_is_refused_with_what_to_publish_instead(vcsim: vsphere_sim.RunningSimulator, tmp_path: Path) -> None:
    image = tmp_path / "Gold.wim"
    image.write_bytes(b"MSWIM\0\0\0" + bytes(4096))
    with pytest.raises(UserError, match="publish the template as VMDK, VHDX, VHD, qcow2 or raw"):
        VSphereConnector().deliver(image, sidecar_for(image), _settings(vcsim), vsphere_sim.PASSWORD,
                                   lambda *_: None, Flag())


# --- retrieve ---------------------------------------------------------------------------------------


def _qemu_info(image: Path) -> dict[str, Any]:
    done = subprocess.run(["qemu-img", "info", "--output=json", str(image)], check=True, capture_output=True,
                          text=True)
    info: dict[str, Any] = json.loads(done.stdout)
    return info


def _packaging_machine_writes(vcsim: vsphere_sim.RunningSimulator, vm: str, disk: Path) -> Path:
    """Put ``disk`` (raw) where the VM's delivered disk lives, as ESXi keeps a disk: a descriptor and its flat
    extent. The simulator keeps empty disk files (it discards what an import lease uploads), so this stands in
    for the disk the packaging machine changed."""
    descriptors = list(vcsim.datastores.glob(f"*/{vm}/{vm}-layered.vmdk"))
    assert len(descriptors) == 1, descriptors
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=monolithicFlat", str(disk),
                    str(descriptors[0])], check=True)
    assert descriptors[0].with_name(f"{vm}-layered-flat.vmdk").stat().st_size == disk.stat().st_size
    return descriptors[0]


def test_retrieve_downloads_the_disk_as_the_packaging_machine_left_it(
        vcsim: vsphere_sim.RunningSimulator, api: Any, tmp_path: Path) -> None:
    image = _disk(tmp_path, "Pkg_2025-03-01_10-15.raw")
    sidecar = sidecar_for(image)
    result = VSphereConnector().deliver(image, sidecar, _settings(vcsim), vsphere_sim.PASSWORD, lambda *_: None,
                                        Flag())
    changed = tmp_path / "changed.raw"
    changed.write_bytes(image.read_bytes())
    with changed.open("r+b") as file:  # what the packaging machine installed
        file.seek(5 * MiB)
        file.write(b"installed by the packaging machine" * 1000)
    _packaging_machine_writes(vcsim, sidecar.image, changed)
    target = tmp_path / "back" / "Pkg.vmdk"
    target.parent.mkdir()
    seen: list[tuple[float, str]] = []
    assert VSphereConnector.can_retrieve
    assert VSphereConnector().retrieve(result.ids, _settings(vcsim), vsphere_sim.PASSWORD, target,
                                       lambda p, m: seen.append((p, m)), Flag()) == target
    info = _qemu_info(target)
    assert info["format"] == "vmdk" and info["virtual-size"] == _qemu_info(image)["virtual-size"] == 8 * MiB
    assert info["format-specific"]["data"]["create-type"] == "streamOptimized"
    assert subprocess.run(["qemu-img", "compare", "-q", str(changed), str(target)], check=False).returncode == 0
    assert image_info(target).virtual_size == 8 * MiB
    assert list(target.parent.iterdir()) == [target]  # no .partial, no downloaded chain left beside it
    assert any(m == "Downloaded 8 of 8 MiB" for _p, m in seen) and seen[-1][0] == 100.0
    vm = _vms(api)[sidecar.image]  # only read
    assert vm.runtime.powerState == vim.VirtualMachinePowerState.poweredOff
    assert [d.backing.fileName for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)] == [
        result.ids["disk"]]
    with pytest.raises(Conflict, match="already exists; choose another file"):
        VSphereConnector().retrieve(result.ids, _settings(vcsim), vsphere_sim.PASSWORD, target, lambda *_: None,
                                    Flag())


def test_retrieve_refuses_a_powered_on_vm(vcsim: vsphere_sim.RunningSimulator, api: Any, tmp_path: Path) -> None:
    image = _disk(tmp_path, "Running_2025-03-01_10-15.raw")
    result = VSphereConnector().deliver(image, sidecar_for(image), _settings(vcsim), vsphere_sim.PASSWORD,
                                        lambda *_: None, Flag())
    vm = _vms(api)[result.ids["vm"]]
    _wait(vm.PowerOnVM_Task())
    target = tmp_path / "back.vmdk"
    try:
        with pytest.raises(Conflict, match="VM Running_2025-03-01_10-15 is powered on, so its disk is not consistent; "
                                           "shut VM Running_2025-03-01_10-15 down first"):
            VSphereConnector().retrieve(result.ids, _settings(vcsim), vsphere_sim.PASSWORD, target, lambda *_: None,
                                        Flag())
        assert vm.runtime.powerState == vim.VirtualMachinePowerState.poweredOn  # left as it was
    finally:
        _wait(vm.PowerOffVM_Task())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([image.name, "userhome"])


def test_retrieve_of_a_removed_vm_or_disk_file_is_not_found(vcsim: vsphere_sim.RunningSimulator, api: Any,
                                                            tmp_path: Path) -> None:
    image = _disk(tmp_path, "Removed_2025-03-01_10-15.raw")
    result = VSphereConnector().deliver(image, sidecar_for(image), _settings(vcsim), vsphere_sim.PASSWORD,
                                        lambda *_: None, Flag())
    target = tmp_path / "back" / "back.vmdk"
    target.parent.mkdir()
    flat = _packaging_machine_writes(vcsim, result.ids["vm"], image).with_name(f"{result.ids['vm']}-layered-flat.vmdk")
    flat.unlink()
    with pytest.raises(NotFound, match=r"The disk file \[LocalDS_0\] Removed_2025-03-01_10-15/Removed_2025-03-01_10-15"
                                       r"-layered-flat\.vmdk is gone from the datastore 'LocalDS_0'"):
        VSphereConnector().retrieve(result.ids, _settings(vcsim), vsphere_sim.PASSWORD, target, lambda *_: None,
                                    Flag())
    assert list(target.parent.iterdir()) == []
    _wait(_vms(api)[result.ids["vm"]].Destroy_Task())
    with pytest.raises(NotFound, match=r"VM Removed_2025-03-01_10-15 is no longer in vCenter 127\.0\.0\.1:.*: the "
                                       r"packaging machine and its disk are gone"):
        VSphereConnector().retrieve(result.ids, _settings(vcsim), vsphere_sim.PASSWORD, target, lambda *_: None,
                                    Flag())
    assert list(target.parent.iterdir()) == []


def test_cancel_mid_download_keeps_nothing(vcsim: vsphere_sim.RunningSimulator, api: Any, tmp_path: Path) -> None:
    image = _disk(tmp_path, "Halfway_2025-03-01_10-15.raw")
    result = VSphereConnector().deliver(image, sidecar_for(image), _settings(vcsim), vsphere_sim.PASSWORD,
                                        lambda *_: None, Flag())
    _packaging_machine_writes(vcsim, result.ids["vm"], image)
    flag = Flag()
    seen: list[str] = []

    def progress(_percent: float, message: str) -> None:
        seen.append(message)
        flag.cancelled = True

    target = tmp_path / "back" / "back.vmdk"
    target.parent.mkdir()
    with pytest.raises(TaskCanceled, match="download was cancelled; nothing was kept"):
        VSphereConnector().retrieve(result.ids, _settings(vcsim), vsphere_sim.PASSWORD, target, progress, flag)
    assert len(seen) == 1 and seen[0].startswith("Downloaded ")
    assert list(target.parent.iterdir()) == []
    assert result.ids["vm"] in _vms(api)


def _wait(task: Any) -> None:
    deadline = time.monotonic() + 30
    while task.info.state not in (vim.TaskInfo.State.success, vim.TaskInfo.State.error):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert task.info.state == vim.TaskInfo.State.success, task.info.error
