"""The libvirt connector against libvirt's own ``test:///default`` driver (steps, missing pool/network, a
duplicate VM name, a driver without uploads or downloads, a running VM's disk refused) and against a real
``qemu:///session`` libvirtd started for these tests (upload, the VM's XML, cancel mid-upload; retrieving a
volume as the VM left it, a deleted volume, cancel mid-download; a pool on a full file system, libvirtd going
away mid-upload; a second one that asks for a SASL user name and password on its UNIX socket). What was created
is read back through libvirt."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NoReturn
from xml.etree import ElementTree as ET

import pytest

from tests.support.libvirt_sasl import SaslUnavailable, configure_sasl

libvirt = pytest.importorskip("libvirt")

from app.connectors.base import ConnectorSettings  # noqa: E402
from app.connectors.libvirt import LibvirtConnector, domain_xml, image_firmware  # noqa: E402
from app.engine.disk import image_info  # noqa: E402
from app.errors import AuthenticationFailed, Conflict, EnvironmentProblem, NotFound, UserError  # noqa: E402
from app.tasks.base import TaskCanceled  # noqa: E402
from tests.connectors.conftest import Flag, MiB, sidecar_for  # noqa: E402
from tests.support.tools import small_filesystem  # noqa: E402

TEST_URI = "test:///default"


def _settings(uri: str = TEST_URI, **options: object) -> ConnectorSettings:
    return ConnectorSettings("KVM", "libvirt", uri, options={"pool": "default-pool", "network": "default",
                                                            **options})


def _gpt_disk(path: Path, size: int = 8 * MiB) -> Path:
    with path.open("wb") as file:
        file.truncate(size)
    subprocess.run(["sgdisk", "-o", "-n", "1:2048:0", "-t", "1:0700", str(path)], check=True, capture_output=True)
    return path


def _mbr_disk(path: Path, size: int = 8 * MiB) -> Path:
    with path.open("wb") as file:
        file.truncate(size)
        file.seek(446)
        file.write(bytes([0x80, 0, 0x21, 0, 0x07, 0, 0, 0]) + (2048).to_bytes(4, "little")
                   + (size // 512 - 2048).to_bytes(4, "little"))
        file.seek(510)
        file.write(b"\x55\xaa")
    return path


# --- test:///default ---------------------------------------------------------------------------------


def test_the_test_reports_connect_pool_and_network() -> None:
    report = LibvirtConnector().test(_settings(), None)
    assert report.ok, report
    assert [(s.name, s.ok) for s in report.steps] == [("connect", True), ("pool", True), ("network", True)]
    assert "pool default-pool is active" in report.steps[1].detail


def test_a_missing_pool_or_network_is_named_with_what_exists() -> None:
    report = LibvirtConnector().test(_settings(pool="images"), None)
    assert [(s.name, s.ok) for s in report.steps] == [("connect", True), ("pool", False), ("network", None)]
    assert "has no storage pool 'images'; its pools are default-pool" in (report.failure or "")
    report = LibvirtConnector().test(_settings(network="lab"), None)
    assert "has no network 'lab'; its networks are default" in (report.failure or "")


def test_an_unreachable_host_is_a_clear_error() -> None:
    report = LibvirtConnector().test(_settings("qemu+tcp://127.0.0.1:1/system"), None)
    assert [s.ok for s in report.steps] == [False, None, None]
    assert "Cannot connect to qemu+tcp://127.0.0.1:1/system" in (report.failure or "")


def test_tls_verification_is_on_unless_turned_off() -> None:
    on = _settings("qemu+tls://kvm1/system")
    assert LibvirtConnector.uri(on) == "qemu+tls://kvm1/system"
    assert LibvirtConnector.uri(replace(on, verify_tls=False)) == "qemu+tls://kvm1/system?no_verify=1"


def test_a_duplicate_vm_name_is_refused_before_anything_is_uploaded(tmp_path: Path) -> None:
    image = _gpt_disk(tmp_path / "test.raw")  # the test driver has a VM named "test"
    sidecar = replace(sidecar_for(image), image="test")
    with pytest.raises(Conflict, match="already has a VM named 'test'; it was left alone"):
        LibvirtConnector().deliver(image, sidecar, _settings(), None, lambda *_: None, Flag())


def test_missing_pool_and_network_refuse_a_delivery(tmp_path: Path) -> None:
    image = _gpt_disk(tmp_path / "Gold.raw")
    with pytest.raises(NotFound, match="no storage pool 'images'"):
        LibvirtConnector().deliver(image, sidecar_for(image), _settings(pool="images"), None, lambda *_: None, Flag())
    with pytest.raises(NotFound, match="no network 'lab'"):
        LibvirtConnector().deliver(image, sidecar_for(image), _settings(network="lab"), None, lambda *_: None, Flag())


def test_a_driver_without_uploads_leaves_no_volume(tmp_path: Path) -> None:
    image = _gpt_disk(tmp_path / "Gold.raw")
    with pytest.raises(UserError, match="cannot receive uploads into a storage pool"):
        LibvirtConnector().deliver(image, sidecar_for(image), _settings(), None, lambda *_: None, Flag())
    connection = libvirt.open(TEST_URI)
    assert "Gold.raw" not in connection.storagePoolLookupByName("default-pool").listVolumes()


@pytest.fixture
def test_volume() -> Iterator[tuple[object, dict[str, str]]]:
    """A volume in the test driver's ``default-pool`` (its state lives as long as a connection is open) and the
    ids a delivery would have recorded for it, naming no VM."""
    connection = libvirt.open(TEST_URI)
    pool = connection.storagePoolLookupByName("default-pool")
    volume = pool.createXML("<volume><name>Packaging.raw</name><capacity>1048576</capacity></volume>", 0)
    try:
        yield connection, {"pool": "default-pool", "volume": "Packaging.raw", "volume_key": volume.key()}
    finally:
        volume.delete(0)
        connection.close()


def test_retrieve_refuses_while_the_vm_runs(test_volume: tuple[object, dict[str, str]], tmp_path: Path) -> None:
    connection, ids = test_volume
    running = connection.lookupByName("test")  # type: ignore[attr-defined]  # the test driver's VM runs
    assert running.isActive()
    target = tmp_path / "back.raw"
    with pytest.raises(Conflict, match=r"VM test is still running .*; shut VM test down first"):
        LibvirtConnector().retrieve({**ids, "domain": "test", "domain_uuid": running.UUIDString()}, _settings(), None,
                                    target, lambda *_: None, Flag())
    assert running.isActive()
    assert not target.exists() and not target.with_name("back.raw.partial").exists()


def test_a_driver_without_downloads_is_a_clear_error(test_volume: tuple[object, dict[str, str]],
                                                     tmp_path: Path) -> None:
    _connection, ids = test_volume
    target = tmp_path / "back.raw"
    assert LibvirtConnector.can_retrieve
    with pytest.raises(UserError, match=r"cannot download a storage volume .*copy the disk's file from the host"):
        LibvirtConnector().retrieve({**ids, "domain": "Packaging"}, _settings(), None, target, lambda *_: None,
                                    Flag())
    assert not target.exists() and not target.with_name("back.raw.partial").exists()


def test_firmware_follows_the_partition_table(tmp_path: Path) -> None:
    assert image_firmware(_gpt_disk(tmp_path / "a.raw")) == "uefi"
    assert image_firmware(_mbr_disk(tmp_path / "b.raw")) == "bios"
    qcow = tmp_path / "c.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(tmp_path / "b.raw"), str(qcow)], check=True)
    assert image_firmware(qcow) == "bios"
    (tmp_path / "d.raw").write_bytes(bytes(4096))
    with pytest.raises(UserError, match="no partition table"):
        image_firmware(tmp_path / "d.raw")
    (tmp_path / "e.wim").write_bytes(b"MSWIM")
    with pytest.raises(UserError, match="publish the template as qcow2, raw, VMDK or VHD"):
        image_firmware(tmp_path / "e.wim")


def test_an_ide_disk_gets_a_pc_machine_and_bios_no_efi() -> None:
    xml = ET.fromstring(domain_xml("vm", domain_type="kvm", firmware="bios", pool="p", volume="v", volume_format="raw",
                                   disk_bus="ide", network="default", nic_model="e1000e", memory_mb=1024, vcpus=1))
    assert xml.find("os").get("firmware") is None  # type: ignore[union-attr]
    assert xml.find("os/type").get("machine") == "pc"  # type: ignore[union-attr]
    assert xml.find("devices/disk/target").attrib == {"dev": "hda", "bus": "ide"}  # type: ignore[union-attr]


# --- a real libvirtd: qemu:///session -------------------------------------------------------------------


@dataclass
class SessionDaemon:
    """A ``qemu:///session`` libvirtd started for these tests: its URI, its folder and its process."""

    uri: str
    root: Path
    process: subprocess.Popen[bytes]

    def kill(self) -> None:
        """Kill libvirtd itself at once (SIGKILL, no clean shutdown), as when its host goes down: the child
        that ``runuser`` started for this daemon, found by its parent's id."""
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
        for child in children:
            os.kill(int(child), signal.SIGKILL)
        self.process.wait(10)


def _missing(what: str) -> NoReturn:
    """Skip (fail on CI, whose setup installs everything) for a missing prerequisite."""
    if os.environ.get("CI"):
        pytest.fail(what)
    pytest.skip(what)


def _open(uri: str, sasl: tuple[str, str] | None = None) -> Any:
    """A connection for the tests' own checks, signed in with ``sasl`` (user name, password) when given."""
    if sasl is None:
        return libvirt.open(uri)
    user, password = sasl

    def answer(credentials: list[list[object]], _data: object) -> int:
        for credential in credentials:
            credential[4] = user if credential[0] == libvirt.VIR_CRED_AUTHNAME else password
        return 0

    return libvirt.openAuth(uri, [[libvirt.VIR_CRED_AUTHNAME, libvirt.VIR_CRED_PASSPHRASE], answer, None], 0)


@contextlib.contextmanager
def _session_daemon(sasl: tuple[str, str] | None = None) -> Iterator[SessionDaemon]:
    """``qemu:///session`` of an unprivileged account, served by a libvirtd started here (root's own session
    would be the system daemon), with a directory pool ``lab`` and a defined network ``labnet``. With ``sasl``
    (a user name and password) the daemon asks for them through SASL on its UNIX sockets."""
    daemon = shutil.which("libvirtd") or shutil.which("libvirtd", path="/usr/sbin")
    if daemon is None or os.geteuid() != 0:
        _missing("qemu:///session needs libvirtd (Debian libvirt-daemon) and root to start it as nobody")
    # Outside pytest's folders, which the unprivileged account may not enter.
    root = Path(tempfile.mkdtemp(prefix="layerdesk-libvirt-"))
    runtime = root / "run"
    runtime.mkdir(mode=0o700)
    (root / "pool").mkdir()
    env = {"PATH": os.environ["PATH"], "HOME": str(root), "XDG_RUNTIME_DIR": str(runtime),
           "XDG_CONFIG_HOME": str(root / "config"), "XDG_CACHE_HOME": str(root / "cache")}
    if sasl is not None:
        try:
            env.update(configure_sasl(root, *sasl).env)
        except SaslUnavailable as exc:
            shutil.rmtree(root, ignore_errors=True)
            _missing(f"a libvirtd with SASL needs the Cyrus SASL tools and modules: {exc}")
    for path in (root, *root.rglob("*")):  # the SASL config and sasldb too, when there are any
        shutil.chown(path, "nobody", "nogroup")
    process = subprocess.Popen(["runuser", "-u", "nobody", "--", "env", *(f"{k}={v}" for k, v in env.items()),
                                daemon, "--timeout", "300"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    socket = runtime / "libvirt" / "libvirt-sock"
    deadline = time.monotonic() + 30
    while not socket.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.1)
    uri = f"qemu+unix:///session?socket={socket}"
    try:
        connection = _open(uri, sasl)
        pool = connection.storagePoolDefineXML(
            f"<pool type='dir'><name>lab</name><target><path>{root / 'pool'}</path></target></pool>", 0)
        pool.create(0)
        connection.networkDefineXML("<network><name>labnet</name><bridge name='virbr97'/></network>")
        connection.close()
        yield SessionDaemon(uri, root, process)
    finally:
        if process.poll() is None:
            process.terminate()
        process.wait(10)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def session_uri() -> Iterator[str]:
    """The libvirtd the session tests share (never stopped by a test: one that stops it has its own)."""
    with _session_daemon() as daemon:
        yield daemon.uri


def _session(uri: str, **options: object) -> ConnectorSettings:
    return ConnectorSettings("KVM", "libvirt", uri, options={"pool": "lab", "network": "labnet", **options})


def test_upload_defines_a_uefi_vm_on_the_volume(session_uri: str, tmp_path: Path) -> None:
    image = _gpt_disk(tmp_path / "Gold_2025-03-01_10-15.raw", 12 * MiB)
    with image.open("r+b") as file:
        file.seek(5 * MiB)
        file.write(b"LayerDesk marker")
    seen: list[float] = []
    result = LibvirtConnector().deliver(image, sidecar_for(image), _session(session_uri, disk_bus="sata",
                                        memory_mb=1024), None, lambda p, _: seen.append(p), Flag())
    connection = libvirt.open(session_uri)
    volume = connection.storagePoolLookupByName("lab").storageVolLookupByName(image.name)
    _kind, capacity, allocation = volume.info()
    assert capacity == 12 * MiB and 0 < allocation <= 12 * MiB
    assert Path(volume.path()).read_bytes() == image.read_bytes()
    domain = ET.fromstring(connection.lookupByName("Gold_2025-03-01_10-15").XMLDesc(0))
    assert domain.find("os").get("firmware") == "efi"  # type: ignore[union-attr]
    assert domain.find("devices/disk/source").attrib == {"pool": "lab", "volume": image.name}  # type: ignore[union-attr]
    assert domain.find("devices/disk/target").attrib == {"dev": "sda", "bus": "sata"}  # type: ignore[union-attr]
    assert domain.find("devices/interface/source").get("network") == "labnet"  # type: ignore[union-attr]
    assert domain.find("memory").text == str(1024 * 1024)  # type: ignore[union-attr]
    assert result.ids["domain"] == "Gold_2025-03-01_10-15" and seen[-1] == 100.0
    with pytest.raises(Conflict, match="already has a VM named"):
        LibvirtConnector().deliver(image, sidecar_for(image), _session(session_uri), None, lambda *_: None, Flag())


def test_cancel_mid_upload_deletes_the_half_volume(session_uri: str, tmp_path: Path) -> None:
    image = _mbr_disk(tmp_path / "Cancel_2025-03-01_10-15.raw", 40 * MiB)
    flag = Flag()

    def progress(_percent: float, _message: str) -> None:
        flag.cancelled = True

    with pytest.raises(TaskCanceled):
        LibvirtConnector().deliver(image, replace(sidecar_for(image), image="Cancel"), _session(session_uri), None,
                                   progress, flag)
    connection = libvirt.open(session_uri)
    pool = connection.storagePoolLookupByName("lab")
    pool.refresh(0)  # what is really in the pool's folder, not libvirt's memory of it
    assert image.name not in pool.listVolumes()
    assert "Cancel" not in [d.name() for d in connection.listAllDomains()]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_retrieve_downloads_the_volume_as_the_vm_left_it(session_uri: str, tmp_path: Path) -> None:
    image = _gpt_disk(tmp_path / "Packaging_2025-03-01_10-15.raw", 12 * MiB)
    result = LibvirtConnector().deliver(image, sidecar_for(image), _session(session_uri), None, lambda *_: None,
                                        Flag())
    connection = libvirt.open(session_uri)
    volume = connection.storagePoolLookupByName("lab").storageVolLookupByName(image.name)
    disk = Path(volume.path())
    with disk.open("r+b") as file:  # what the packaging machine installed
        file.seek(7 * MiB)
        file.write(b"installed by the packaging machine")
    assert _sha256(disk) != _sha256(image)
    seen: list[tuple[float, str]] = []
    target = tmp_path / "back" / "Packaging.raw"
    target.parent.mkdir()
    assert LibvirtConnector().retrieve(result.ids, _session(session_uri), None, target,
                                       lambda p, m: seen.append((p, m)), Flag()) == target
    assert _sha256(target) == _sha256(disk)
    assert sorted(p.name for p in target.parent.iterdir()) == ["Packaging.raw"]
    assert seen[-1][0] == 100.0 and any(m.startswith("Downloaded 12 of 12 MiB") for _p, m in seen)
    info = image_info(target)
    assert (info.format, info.virtual_size) == ("raw", 12 * MiB)
    # The VM and the volume were only read.
    assert connection.lookupByName("Packaging_2025-03-01_10-15").UUIDString() == result.ids["domain_uuid"]
    assert volume.info()[1] == 12 * MiB
    with pytest.raises(Conflict, match="already exists; choose another file"):
        LibvirtConnector().retrieve(result.ids, _session(session_uri), None, target, lambda *_: None, Flag())


def test_retrieve_keeps_a_qcow2_volume_qcow2(session_uri: str, tmp_path: Path) -> None:
    raw = _mbr_disk(tmp_path / "q.raw", 16 * MiB)
    image = tmp_path / "Qcow_2025-03-01_10-15.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(image)], check=True)
    result = LibvirtConnector().deliver(image, sidecar_for(image), _session(session_uri), None, lambda *_: None,
                                        Flag())
    target = tmp_path / "back.qcow2"
    LibvirtConnector().retrieve(result.ids, _session(session_uri), None, target, lambda *_: None, Flag())
    info = image_info(target)
    assert (info.format, info.virtual_size) == ("qcow2", 16 * MiB)
    assert subprocess.run(["qemu-img", "compare", "-q", str(raw), str(target)], check=False).returncode == 0


def test_retrieve_of_a_deleted_volume_is_not_found(session_uri: str, tmp_path: Path) -> None:
    image = _mbr_disk(tmp_path / "Gone_2025-03-01_10-15.raw")
    result = LibvirtConnector().deliver(image, sidecar_for(image), _session(session_uri), None, lambda *_: None,
                                        Flag())
    connection = libvirt.open(session_uri)
    connection.storagePoolLookupByName("lab").storageVolLookupByName(image.name).delete(0)
    target = tmp_path / "back.raw"
    with pytest.raises(NotFound, match=r"The volume lab/Gone_2025-03-01_10-15\.raw is no longer on .*: the packaging "
                                       "machine's disk is gone"):
        LibvirtConnector().retrieve(result.ids, _session(session_uri), None, target, lambda *_: None, Flag())
    assert not target.exists() and not target.with_name("back.raw.partial").exists()


def test_cancel_mid_download_keeps_nothing(session_uri: str, tmp_path: Path) -> None:
    image = _mbr_disk(tmp_path / "Halfway_2025-03-01_10-15.raw", 40 * MiB)
    result = LibvirtConnector().deliver(image, sidecar_for(image), _session(session_uri), None, lambda *_: None,
                                        Flag())
    flag = Flag()
    seen: list[str] = []

    def progress(_percent: float, message: str) -> None:
        seen.append(message)
        flag.cancelled = True

    target = tmp_path / "back" / "back.raw"
    target.parent.mkdir()
    with pytest.raises(TaskCanceled, match="download was cancelled; nothing was kept"):
        LibvirtConnector().retrieve(result.ids, _session(session_uri), None, target, progress, flag)
    assert seen == ["Downloaded 4 of 40 MiB"]
    assert list(target.parent.iterdir()) == []  # neither the file nor its .partial
    connection = libvirt.open(session_uri)
    volume = connection.storagePoolLookupByName("lab").storageVolLookupByName(image.name)
    assert _sha256(Path(volume.path())) == _sha256(image)  # the volume was not changed
    # The connection is still usable: a second retrieve runs to the end.
    LibvirtConnector().retrieve(result.ids, _session(session_uri), None, target, lambda *_: None, Flag())
    assert _sha256(target) == _sha256(image)


@contextlib.contextmanager
def _small_pool(daemon_uri: str, root: Path, megabytes: int) -> Iterator[str]:
    """A directory pool ``small`` on a tmpfs of ``megabytes`` MiB (real ENOSPC), removed afterwards."""
    with small_filesystem(root / "small", f"{megabytes}m", options="uid=65534,gid=65534,mode=0755") as folder:
        connection = libvirt.open(daemon_uri)
        pool = None
        try:
            pool = connection.storagePoolCreateXML(
                f"<pool type='dir'><name>small</name><target><path>{folder}</path></target></pool>", 0)
            yield "small"
        finally:
            if pool is not None:
                with contextlib.suppress(libvirt.libvirtError):
                    pool.destroy()
            connection.close()


def test_a_full_pool_is_a_clear_error_and_leaves_no_volume(session_uri: str, tmp_path: Path) -> None:
    """Runs against the real libvirtd (qemu:///session) with a directory pool on a real 8 MiB tmpfs: a 12 MiB
    raw image cannot fit (libvirt allocates a raw volume whole, so it is the volume's creation that fails with
    the file system's ENOSPC), and a qcow2 image that fits when created runs out of room mid-upload (its file
    grows as it is written, after 4 MiB of filler took most of the space)."""
    socket = session_uri.partition("socket=")[2]
    root = Path(socket).parents[2]
    image = _mbr_disk(tmp_path / "Full_2025-03-01_10-15.raw", 12 * MiB)
    with _small_pool(session_uri, root, 8) as pool_name:
        with pytest.raises(UserError, match=r"^The storage pool 'small' is full: it has no room for the 12 MiB "
                                            r"volume 'Full_2025-03-01_10-15\.raw' \(.*No space left on device\)\. "
                                            r"Free space in the pool or choose another one; nothing was left in the "
                                            r"pool\.$") as caught:
            LibvirtConnector().deliver(image, replace(sidecar_for(image), image="Full"),
                                       _session(session_uri, pool=pool_name), None, lambda *_: None, Flag())
        assert "Traceback" not in str(caught.value)
        _nothing_in_pool(session_uri, pool_name, root / "small")
        # A qcow2 volume is created small and grows as the upload writes it: the room runs out mid-upload.
        (root / "small" / "filler").write_bytes(b"\0" * (5 * MiB))
        qcow2 = _qcow2_of_noise(tmp_path / "Full_2025-03-01_10-16.qcow2", 6 * MiB)
        # libvirtd reports the writer's ENOSPC through the stream, or (a race in its stream end) not at all:
        # then the volume is found short of the upload. Either way it is a full pool and nothing is left.
        with pytest.raises(UserError, match=r"^The storage pool 'small' is full: (it ran out of space during the "
                                            r"upload of the \d+ MiB image \(.*No space left on device.*\)|the volume "
                                            r"holds only [\d.]+ MiB of the \d+ MiB image after the upload)\. Free "
                                            r"space in the pool or choose another one\. The half volume was "
                                            r"deleted\.$"):
            LibvirtConnector().deliver(qcow2, replace(sidecar_for(qcow2), image="Full2"),
                                       _session(session_uri, pool=pool_name), None, lambda *_: None, Flag())
        (root / "small" / "filler").unlink()
        _nothing_in_pool(session_uri, pool_name, root / "small")


def _qcow2_of_noise(path: Path, size: int) -> Path:
    """A qcow2 image (MBR partition table) whose clusters hold random bytes, so it is about ``size`` on disk."""
    raw = _mbr_disk(path.with_suffix(".raw"), size)
    with raw.open("r+b") as file:
        file.seek(MiB)
        file.write(os.urandom(size - MiB))
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path)], check=True,
                   capture_output=True)
    raw.unlink()
    return path


def _nothing_in_pool(uri: str, pool_name: str, folder: Path) -> None:
    connection = libvirt.open(uri)
    try:
        pool = connection.storagePoolLookupByName(pool_name)
        pool.refresh(0)  # what is really in the pool's folder, not libvirt's memory of it
        assert pool.listVolumes() == []
        assert not {"Full", "Full2"} & {d.name() for d in connection.listAllDomains()}
    finally:
        connection.close()
    assert os.listdir(folder) == []


def test_libvirtd_going_down_mid_upload_names_the_volume_to_delete(tmp_path: Path) -> None:
    """Runs against a real libvirtd (qemu:///session) of its own, so the shared one stays up: the daemon is
    killed (SIGKILL, as when its host goes down) from the progress callback after the first chunk went up.
    The upload fails with a clear EnvironmentProblem; with the daemon gone the half volume cannot be deleted
    through libvirt, so the message names the pool and the volume to delete by hand, and the volume's file is
    indeed still in the pool's folder."""
    image = _mbr_disk(tmp_path / "Down_2025-03-01_10-15.raw", 24 * MiB)
    with _session_daemon() as daemon:
        def progress(_percent: float, _message: str) -> None:
            if daemon.process.poll() is None:
                daemon.kill()

        started = time.monotonic()
        with pytest.raises(EnvironmentProblem) as caught:
            LibvirtConnector().deliver(image, replace(sidecar_for(image), image="Down"), _session(daemon.uri), None,
                                       progress, Flag())
        assert time.monotonic() - started < 20
        message = str(caught.value)
        assert message.startswith(f"The connection to libvirt at {daemon.uri} was lost during the upload into pool "
                                  "'lab', after "), message
        assert "libvirtd stopped or the host went down. Check that libvirtd is running and reachable from this " \
               "machine. LayerDesk could not clean up on " in message, message
        assert message.endswith(": delete the volume 'Down_2025-03-01_10-15.raw' in the storage pool 'lab' there by "
                                "hand (virsh vol-delete --pool lab Down_2025-03-01_10-15.raw)."), message
        assert "Traceback" not in message and "was deleted" not in message
        assert (daemon.root / "pool" / image.name).exists()  # left, as the message says


# --- a real libvirtd asking for a SASL user name and password -------------------------------------------

SASL_USER, SASL_PASSWORD = "layerdesk", "Kvm-Lab-7f3a!pass"


@pytest.fixture(scope="module")
def sasl_uri() -> Iterator[str]:
    """A second ``qemu:///session`` libvirtd, its own socket, that lets nobody in without the SASL account
    ``layerdesk`` (``auth_unix_rw = "sasl"``, a sasldb made with saslpasswd2): the shared one stays open."""
    with _session_daemon(sasl=(SASL_USER, SASL_PASSWORD)) as daemon:
        with pytest.raises(libvirt.libvirtError, match="authentication failed"):
            libvirt.open(daemon.uri)  # really shut to a client that brings no credentials
        yield daemon.uri


def _sasl(uri: str, username: str = SASL_USER) -> ConnectorSettings:
    return replace(_session(uri), username=username)


def _shown(report_or_error: object, caplog: pytest.LogCaptureFixture) -> str:
    """Everything a user or the log could see: the report's steps (or the error) and every log record."""
    steps = getattr(report_or_error, "steps", None)
    seen = [f"{s.name} {s.ok} {s.detail}" for s in steps] if steps is not None else [str(report_or_error),
                                                                                       repr(report_or_error)]
    return "\n".join([*seen, *(r.getMessage() for r in caplog.records)])


def test_the_right_sasl_password_passes_the_connect_step(sasl_uri: str, caplog: pytest.LogCaptureFixture) -> None:
    report = LibvirtConnector().test(_sasl(sasl_uri), SASL_PASSWORD)
    assert report.ok, report
    assert [(s.name, s.ok) for s in report.steps] == [("connect", True), ("pool", True), ("network", True)]
    assert report.steps[0].detail.startswith(f"connected to {sasl_uri} (QEMU ")
    assert SASL_PASSWORD not in _shown(report, caplog)


def test_a_wrong_sasl_password_is_refused_and_never_shown(sasl_uri: str, tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    wrong = "Not-The-Kvm-Password-91"
    report = LibvirtConnector().test(_sasl(sasl_uri), wrong)
    assert [s.ok for s in report.steps] == [False, None, None]
    assert (report.failure or "").startswith(f"{sasl_uri} refused the user name or password of 'layerdesk' "
                                             "(authentication failed"), report.failure
    assert (report.failure or "").endswith("Check both in the connector's settings."), report.failure
    assert wrong not in _shown(report, caplog) and SASL_PASSWORD not in _shown(report, caplog)
    # A delivery stops at the same door, as an AuthenticationFailed, before anything is uploaded.
    image = _mbr_disk(tmp_path / "Refused_2025-03-01_10-15.raw")
    with pytest.raises(AuthenticationFailed, match="refused the user name or password of 'layerdesk'") as caught:
        LibvirtConnector().deliver(image, sidecar_for(image), _sasl(sasl_uri), wrong, lambda *_: None, Flag())
    assert wrong not in _shown(caught.value, caplog)
    # An account the daemon does not know reads the same (which of the two was wrong is not told).
    report = LibvirtConnector().test(_sasl(sasl_uri, "mallory"), SASL_PASSWORD)
    assert "refused the user name or password of 'mallory'" in (report.failure or ""), report.failure
    assert SASL_PASSWORD not in _shown(report, caplog)
    connection = _open(sasl_uri, (SASL_USER, SASL_PASSWORD))
    assert image.name not in connection.storagePoolLookupByName("lab").listVolumes()
    assert "Refused_2025-03-01_10-15" not in [d.name() for d in connection.listAllDomains()]
    connection.close()


def test_no_sasl_password_is_a_clear_error(sasl_uri: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """libvirt itself would only say it "failed to collect auth credentials"; the connector says what is
    missing and where to enter it, without pretending the host refused anything."""
    for password in (None, ""):
        report = LibvirtConnector().test(_sasl(sasl_uri), password)
        assert [s.ok for s in report.steps] == [False, None, None]
        assert report.failure == (f"{sasl_uri} asks for a user name and password, and the connector has no "
                                  "password; enter it in the connector's settings and test again."), report.failure
    target = tmp_path / "back.raw"
    with pytest.raises(AuthenticationFailed, match=r"and the connector has no password; enter it"):
        LibvirtConnector().retrieve({"pool": "lab", "volume": "Any.raw"}, _sasl(sasl_uri), None, target,
                                    lambda *_: None, Flag())
    assert not target.exists() and not target.with_name("back.raw.partial").exists()
    report = LibvirtConnector().test(_sasl(sasl_uri, ""), SASL_PASSWORD)
    assert (report.failure or "").endswith("and the connector has no user name; enter it in the connector's "
                                           "settings and test again."), report.failure
    assert SASL_PASSWORD not in _shown(report, caplog)
    report = LibvirtConnector().test(_sasl(sasl_uri, ""), None)
    assert (report.failure or "").endswith("and the connector has no user name and no password; enter them in "
                                           "the connector's settings and test again."), report.failure
