"""The libvirt / QEMU connector: a published disk uploaded as a storage volume and a VM defined on it.

The endpoint is a libvirt URI (``qemu:///system``, ``qemu+ssh://root@kvm1/system``,
``qemu+tls://kvm1/system``). The image is uploaded through a volume upload stream into the named storage
pool, as a volume named like the image file; then a VM named like the image is defined on it, firmware
chosen by the disk's partition table (GPT: UEFI, MBR: BIOS), with the chosen disk bus, a NIC on the
chosen network (or user-mode networking when none is named) and, optionally, started.

A delivered volume can be fetched back (:meth:`LibvirtConnector.retrieve`, for a packaging machine) through a
volume download stream, as the file it is (raw stays raw, qcow2 stays qcow2), once its VM is shut down.

A delivery that fails or is cancelled deletes the volume it created and undefines the VM it defined.
TLS certificates are verified unless the connector says otherwise (``no_verify=1`` is then added to a
``+tls`` URI). The password is handed to libvirt's authentication callback only (it answers a SASL host's
questions); a host that asks for a user name or password the connector does not have is told apart from one
that refuses them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit
from xml.etree import ElementTree as ET

import libvirt  # type: ignore[import-untyped]

from app.connectors.base import (
    ConfigField,
    Connector,
    ConnectorSettings,
    DeliveryProgress,
    DeliveryResult,
    FieldKind,
    ImageSidecar,
    TestReport,
    TestSteps,
)
from app.errors import AuthenticationFailed, Conflict, EnvironmentProblem, NotFound, UserError, ValidationError
from app.procs import Cancellable, run
from app.tasks.base import TaskCanceled

log = logging.getLogger(__name__)

CHUNK = 4 * 1024 * 1024
#: Image file extension → libvirt volume format.
VOLUME_FORMATS = {".raw": "raw", ".img": "raw", ".qcow2": "qcow2", ".vmdk": "vmdk", ".vhd": "vpc", ".vhdx": "vhdx"}
#: Disk bus → device name prefix.
BUS_DEVICES = {"virtio": "vd", "sata": "sd", "ide": "hd"}

# libvirt stops printing its own copy of every error to stderr: each becomes one clear message here.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


def _connection_failure(exc: libvirt.libvirtError, uri: str, username: str = "") -> UserError | EnvironmentProblem:
    code = exc.get_error_code()
    text = exc.get_error_message() or str(exc)
    if code in (libvirt.VIR_ERR_AUTH_FAILED, libvirt.VIR_ERR_AUTH_CANCELLED) or "authentication" in text.lower():
        of = f" of {username!r}" if username else ""
        return AuthenticationFailed(f"{uri} refused the user name or password{of} ({text}). Check both in the "
                                    "connector's settings.")
    if code == libvirt.VIR_ERR_NO_CONNECT and "no connection driver" in text.lower():
        return ValidationError(f"{uri} is not a libvirt URI this machine can use ({text}); write one like "
                               "qemu:///system or qemu+ssh://root@host/system.", field="endpoint")
    return EnvironmentProblem(f"Cannot connect to {uri}: {text}. Check that the host is reachable and libvirtd "
                              "runs there.")


def image_firmware(image: Path) -> str:
    """``"uefi"`` for a GPT disk, ``"bios"`` for an MBR disk; :class:`UserError` for anything else."""
    fmt = VOLUME_FORMATS.get(image.suffix.lower())
    if fmt is None:
        raise UserError(f"{image.name} is not a disk image libvirt can boot (a {image.suffix or 'file'}); publish "
                        "the template as qcow2, raw, VMDK or VHD for this connector.")
    if fmt == "raw":
        with image.open("rb") as file:
            head = file.read(1024)
    else:
        # qemu-img reads the first two sectors of the virtual disk (any format it knows).
        import tempfile

        with tempfile.TemporaryDirectory() as work:
            out = Path(work) / "head.raw"
            done = run(["qemu-img", "dd", "-f", "vpc" if fmt == "vpc" else fmt, "-O", "raw", "bs=512", "count=2",
                        f"if={image}", f"of={out}"], timeout_s=60)
            if not done.ok:
                raise EnvironmentProblem(f"Cannot read the partition table of {image.name}: {done.stderr.strip()}")
            head = out.read_bytes()
    if head[512:520] == b"EFI PART":
        return "uefi"
    if head[510:512] == b"\x55\xaa":
        return "bios"
    raise UserError(f"{image.name} has no partition table (neither GPT nor MBR), so no VM can boot from it.")


def virtual_size(image: Path) -> int:
    """The disk's size as the VM sees it (for raw, the file's size)."""
    fmt = VOLUME_FORMATS[image.suffix.lower()]
    if fmt == "raw":
        return image.stat().st_size
    done = run(["qemu-img", "info", "--output=json", "-f", fmt, str(image)], timeout_s=60)
    if not done.ok:
        raise EnvironmentProblem(f"Cannot read the size of {image.name}: {done.stderr.strip()}")
    return int(json.loads(done.stdout)["virtual-size"])


def domain_xml(name: str, *, domain_type: str, firmware: str, pool: str, volume: str, volume_format: str,
               disk_bus: str, network: str | None, nic_model: str, memory_mb: int, vcpus: int,
               description: str = "") -> str:
    """The VM's libvirt XML: q35 (i440fx for an IDE disk, which q35 has no controller for)."""
    domain = ET.Element("domain", type=domain_type)
    ET.SubElement(domain, "name").text = name
    if description:
        ET.SubElement(domain, "description").text = description
    ET.SubElement(domain, "memory", unit="MiB").text = str(memory_mb)
    ET.SubElement(domain, "vcpu").text = str(vcpus)
    os_element = ET.SubElement(domain, "os")
    if firmware == "uefi":
        os_element.set("firmware", "efi")
    ET.SubElement(os_element, "type", arch="x86_64", machine="pc" if disk_bus == "ide" else "q35").text = "hvm"
    ET.SubElement(os_element, "boot", dev="hd")
    features = ET.SubElement(domain, "features")
    for feature in ("acpi", "apic"):
        ET.SubElement(features, feature)
    ET.SubElement(domain, "clock", offset="localtime")  # Windows keeps local time in the RTC
    devices = ET.SubElement(domain, "devices")
    disk = ET.SubElement(devices, "disk", type="volume", device="disk")
    ET.SubElement(disk, "driver", name="qemu", type=volume_format)
    ET.SubElement(disk, "source", pool=pool, volume=volume)
    ET.SubElement(disk, "target", dev=f"{BUS_DEVICES[disk_bus]}a", bus=disk_bus)
    interface = ET.SubElement(devices, "interface", type="network" if network else "user")
    if network:
        ET.SubElement(interface, "source", network=network)
    ET.SubElement(interface, "model", type=nic_model)
    ET.SubElement(devices, "graphics", type="vnc", autoport="yes")
    return ET.tostring(domain, encoding="unicode")


class LibvirtConnector(Connector):
    type: ClassVar[str] = "libvirt"
    title: ClassVar[str] = "libvirt / QEMU"
    can_retrieve: ClassVar[bool] = True
    fields: ClassVar[tuple[ConfigField, ...]] = (
        ConfigField("endpoint", "libvirt URI", required=True, default="qemu:///system",
                    help="qemu:///system, qemu+ssh://root@host/system or qemu+tls://host/system"),
        ConfigField("username", "User name", help="when the host asks for one (SASL)"),
        ConfigField("password", "Password", secret=True, help="when the host asks for one (SASL)"),
        ConfigField("verify_tls", "Verify TLS certificates", FieldKind.FLAG, default=True,
                    help="for qemu+tls URIs; leave on unless the host's certificate cannot be checked"),
        ConfigField("pool", "Storage pool", required=True, help="the pool the image is uploaded into"),
        ConfigField("network", "Network", help="the libvirt network of the VM's NIC (empty: user-mode networking)"),
        ConfigField("disk_bus", "Disk bus", FieldKind.CHOICE, default="virtio", choices=("virtio", "sata", "ide"),
                    help="virtio needs the VirtIO drivers in the image; sata and ide work without"),
        ConfigField("nic_model", "NIC model", FieldKind.CHOICE, default="e1000e",
                    choices=("e1000e", "virtio", "rtl8139"), help="virtio needs the VirtIO drivers in the image"),
        ConfigField("memory_mb", "Memory (MiB)", FieldKind.NUMBER, default=4096, minimum=256, maximum=4 * 1024**2),
        ConfigField("vcpus", "Virtual CPUs", FieldKind.NUMBER, default=2, minimum=1, maximum=512),
        ConfigField("start", "Start the VM", FieldKind.FLAG, default=False, help="start the VM once it is defined"),
    )

    def check_endpoint(self, endpoint: str) -> None:
        parts = urlsplit(endpoint)
        if not parts.scheme or "://" not in endpoint:
            raise ValidationError(f"{endpoint!r} is not a libvirt URI; write one like qemu:///system or "
                                  "qemu+ssh://root@host/system.", field="endpoint")

    # --- connection ---------------------------------------------------------------------------------

    @staticmethod
    def uri(settings: ConnectorSettings) -> str:
        """The URI to open: ``no_verify=1`` added to a TLS URI when verification is off."""
        uri = settings.endpoint.strip()
        parts = urlsplit(uri)
        if not settings.verify_tls and "+tls" in parts.scheme:
            query = [(k, v) for k, v in parse_qsl(parts.query) if k != "no_verify"] + [("no_verify", "1")]
            uri = urlunsplit(parts._replace(query=urlencode(query)))
        return uri

    @contextlib.contextmanager
    def _connect(self, settings: ConnectorSettings, password: str | None) -> Iterator[libvirt.virConnect]:
        self.check_endpoint(settings.endpoint.strip())
        uri = self.uri(settings)

        # What the host asked for and the connector does not have: libvirt then only says it "failed to
        # collect auth credentials", which would read as if the host had refused them.
        missing: list[str] = []

        def answer(credentials: list[list[Any]], _data: object) -> int:
            for credential in credentials:
                if credential[0] == libvirt.VIR_CRED_AUTHNAME:
                    name = settings.username or credential[3]
                    if not (name or "").strip():
                        missing.append("user name")
                    credential[4] = name
                elif credential[0] == libvirt.VIR_CRED_PASSPHRASE:
                    if not password:
                        missing.append("password")
                    credential[4] = password
            return -1 if missing else 0

        try:
            connection = libvirt.openAuth(uri, [[libvirt.VIR_CRED_AUTHNAME, libvirt.VIR_CRED_PASSPHRASE], answer, None],
                                          0)
        except libvirt.libvirtError as exc:
            if missing:
                raise AuthenticationFailed(
                    f"{settings.endpoint} asks for a user name and password, and the connector has no "
                    f"{' and no '.join(missing)}; enter {'them' if len(missing) > 1 else 'it'} in the connector's "
                    "settings and test again.") from None
            raise _connection_failure(exc, settings.endpoint, settings.username) from None
        try:
            yield connection
        finally:
            with contextlib.suppress(libvirt.libvirtError):
                connection.close()

    @staticmethod
    def _pool(connection: libvirt.virConnect, name: str) -> libvirt.virStoragePool:
        try:
            pool = connection.storagePoolLookupByName(name)
        except libvirt.libvirtError:
            known = sorted(p.name() for p in connection.listAllStoragePools())
            raise NotFound(f"{connection.getURI()} has no storage pool {name!r}; its pools are "
                           f"{', '.join(known) or 'none'}. Correct the connector's pool.") from None
        if not pool.isActive():
            raise UserError(f"The storage pool {name!r} is not active; start it (virsh pool-start {name}).")
        return pool

    @staticmethod
    def _network(connection: libvirt.virConnect, name: str) -> libvirt.virNetwork:
        try:
            return connection.networkLookupByName(name)
        except libvirt.libvirtError:
            known = sorted(n.name() for n in connection.listAllNetworks())
            raise NotFound(f"{connection.getURI()} has no network {name!r}; its networks are "
                           f"{', '.join(known) or 'none'}. Correct the connector's network.") from None

    @staticmethod
    def _domain_type(connection: libvirt.virConnect) -> str:
        """KVM when the host offers it, else the first type it offers (QEMU emulation, test)."""
        # The host's own capabilities document, from the libvirt API (not user input).
        capabilities = ET.fromstring(connection.getCapabilities())  # noqa: S314
        offered = [d.get("type", "") for d in capabilities.iter("domain")]
        for preferred in ("kvm", "qemu"):
            if preferred in offered:
                return preferred
        return offered[0] if offered else "qemu"

    # --- test -----------------------------------------------------------------------------------------

    def test(self, settings: ConnectorSettings, password: str | None) -> TestReport:
        steps = TestSteps(settings.name)
        with contextlib.ExitStack() as stack:
            opened: list[Any] = []

            def connect() -> str:
                connection = stack.enter_context(self._connect(settings, password))
                opened.append(connection)
                return (f"connected to {connection.getURI()} ({connection.getType()} "
                        f"{_version(connection.getLibVersion())})")

            def pool() -> str:
                found = self._pool(opened[0], str(settings.option("pool", "")))
                _state, capacity, _allocation, available = found.info()
                return f"pool {found.name()} is active: {available / 1024**3:.1f} of {capacity / 1024**3:.1f} GiB free"

            def network() -> str:
                found = self._network(opened[0], str(settings.option("network")))
                return f"network {found.name()} exists ({'active' if found.isActive() else 'not active'})"

            steps.run("connect", connect)
            steps.run("pool", pool)
            if settings.option("network"):
                steps.run("network", network)
            else:
                steps.skip("network", "no network named: the VM gets user-mode networking")
        return steps.report()

    # --- deliver --------------------------------------------------------------------------------------

    def deliver(self, image: Path, sidecar: ImageSidecar, settings: ConnectorSettings, password: str | None,
                progress: DeliveryProgress, cancel: Cancellable) -> DeliveryResult:
        firmware = image_firmware(image)
        volume_format = VOLUME_FORMATS[image.suffix.lower()]
        capacity = virtual_size(image)
        size = image.stat().st_size
        vm_name, volume_name = sidecar.image, image.name
        started = time.monotonic()
        with self._connect(settings, password) as connection:
            pool = self._pool(connection, str(settings.option("pool", "")))
            network = settings.option("network")
            if network:
                self._network(connection, str(network))
            with contextlib.suppress(libvirt.libvirtError):
                connection.lookupByName(vm_name)
                raise Conflict(f"{connection.getURI()} already has a VM named {vm_name!r}; it was left alone. "
                               "Rename or remove it, or publish again in a minute.")
            if volume_name in pool.listVolumes():
                raise Conflict(f"The pool {pool.name()!r} already has a volume {volume_name!r}; it was left alone.")
            xml = domain_xml(
                vm_name, domain_type=self._domain_type(connection), firmware=firmware, pool=pool.name(),
                volume=volume_name, volume_format=volume_format,
                disk_bus=str(settings.option("disk_bus", "virtio")), network=str(network) if network else None,
                nic_model=str(settings.option("nic_model", "e1000e")),
                memory_mb=int(settings.option("memory_mb", 4096)), vcpus=int(settings.option("vcpus", 2)),
                description=f"Published by LayerDesk from template {sidecar.template} (revision "
                            f"{sidecar.template_revision}); image checksum {sidecar.checksum}.",
            )
            volume = self._upload(connection, pool, image, volume_name, volume_format, capacity, size, progress,
                                  cancel)
            try:
                if cancel.cancelled:
                    raise TaskCanceled("The delivery was cancelled; the volume was deleted.")
                try:
                    domain = connection.defineXML(xml)
                except libvirt.libvirtError as exc:
                    raise UserError(f"{connection.getURI()} refused the VM definition: "
                                    f"{exc.get_error_message()}") from None
                try:
                    if settings.option("start", False):
                        progress(100.0, f"Starting VM {vm_name}")
                        domain.create()
                except BaseException as exc:
                    with contextlib.suppress(libvirt.libvirtError):
                        domain.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
                    if isinstance(exc, libvirt.libvirtError):
                        raise EnvironmentProblem(f"VM {vm_name} could not start: {exc.get_error_message()}; it "
                                                 "was removed again.") from None
                    raise
            except BaseException:
                with contextlib.suppress(libvirt.libvirtError):
                    volume.delete(0)
                raise
            return DeliveryResult(
                settings.name, self.type, f"{connection.getURI()}: VM {vm_name} on volume {pool.name()}/{volume_name}",
                {"domain": vm_name, "domain_uuid": domain.UUIDString(), "pool": pool.name(), "volume": volume_name,
                 "volume_key": volume.key(), "firmware": firmware},
                size, time.monotonic() - started)

    @staticmethod
    def _upload(connection: libvirt.virConnect, pool: libvirt.virStoragePool, image: Path, name: str, fmt: str,
                capacity: int, size: int, progress: DeliveryProgress, cancel: Cancellable) -> libvirt.virStorageVol:
        """Create the volume and stream the image into it; on any failure the volume is deleted (or, when
        libvirtd can no longer be reached, the error names the volume to delete by hand)."""
        spec = ET.Element("volume")
        ET.SubElement(spec, "name").text = name
        ET.SubElement(spec, "capacity", unit="bytes").text = str(capacity)
        target = ET.SubElement(spec, "target")
        ET.SubElement(target, "format", type=fmt)
        pool_name, uri = pool.name(), str(connection.getURI())
        try:
            volume = pool.createXML(ET.tostring(spec, encoding="unicode"), 0)
        except libvirt.libvirtError as exc:
            if _is_full(exc):
                raise UserError(f"The storage pool {pool_name!r} is full: it has no room for the "
                                f"{_size_text(capacity)} volume {name!r} ({exc.get_error_message()}). Free space in "
                                "the pool or choose another one; nothing was left in the pool.") from None
            raise UserError(f"The pool {pool_name!r} refused a {capacity / 1024**3:.1f} GiB volume: "
                            f"{exc.get_error_message()}") from None
        stream = connection.newStream(0)
        done = 0
        try:
            try:
                volume.upload(stream, 0, size, 0)
                with image.open("rb") as file:
                    while chunk := file.read(CHUNK):
                        if cancel.cancelled:
                            raise TaskCanceled("The delivery was cancelled; the half-uploaded volume was deleted.")
                        stream.send(chunk)
                        done += len(chunk)
                        progress(100.0 * done / max(size, 1), f"Uploaded {done // 1024**2} of {size // 1024**2} MiB")
                stream.finish()
            except BaseException:
                with contextlib.suppress(libvirt.libvirtError):
                    stream.abort()
                raise
            # libvirtd's writer may fail after the stream's end was accepted (e.g. a full file system): what
            # landed is checked, so a short volume is never mistaken for a delivered one.
            landed = _download_size(volume)
            if landed < size:
                raise _ShortUpload(landed)
        except _ShortUpload as short:
            left = _delete_volume(uri, volume, pool_name, name)
            raise UserError(f"The storage pool {pool_name!r} is full: the volume holds only {_size_text(short.landed)} "
                            f"of the {_size_text(size)} image after the upload. Free space in the pool or choose "
                            "another one. " + (left or "The half volume was deleted.")) from None
        except libvirt.libvirtError as exc:
            left = _delete_volume(uri, volume, pool_name, name)
            if exc.get_error_code() == libvirt.VIR_ERR_NO_SUPPORT and not left:
                raise UserError(f"{uri} cannot receive uploads into a storage pool (its driver has no "
                                "volume upload); nothing was left in the pool.") from None
            if _is_full(exc):
                raise UserError(f"The storage pool {pool_name!r} is full: it ran out of space during the upload of "
                                f"the {_size_text(size)} image ({exc.get_error_message()}). "
                                "Free space in the pool or choose another one. "
                                + (left or "The half volume was deleted.")) from None
            if _connection_lost(connection):
                raise EnvironmentProblem(
                    f"The connection to libvirt at {uri} was lost during the upload into pool "
                    f"{pool_name!r}, after {_size_text(done)} of {_size_text(size)} ({exc.get_error_message()}); "
                    "libvirtd stopped or the host went down. Check that libvirtd is running and reachable from "
                    "this machine. " + (left or "The half volume was deleted.")) from None
            raise EnvironmentProblem(f"The upload into pool {pool_name!r} failed: {exc.get_error_message()}; "
                                     + (left or "the half volume was deleted.")) from None
        except BaseException as exc:
            left = _delete_volume(uri, volume, pool_name, name)
            if left and isinstance(exc, TaskCanceled):
                raise TaskCanceled(f"The delivery was cancelled. {left}") from None
            raise
        return volume

    # --- retrieve -------------------------------------------------------------------------------------

    def retrieve(self, ids: Mapping[str, str], settings: ConnectorSettings, password: str | None, target: Path,
                 progress: DeliveryProgress, cancel: Cancellable) -> Path:
        """Download the delivered volume (``ids``: ``pool``, ``volume``, ``volume_key``, ``domain``,
        ``domain_uuid``) into ``target``, refusing while its VM runs; the VM and the volume are only read."""
        partial = target.with_name(target.name + ".partial")
        if target.exists():
            raise Conflict(f"{target} already exists; choose another file to receive the disk.")
        with self._connect(settings, password) as connection:
            volume = self._delivered_volume(connection, ids)
            self._refuse_running(connection, ids)
            total = _download_size(volume)
            stream = connection.newStream(0)
            try:
                try:
                    volume.download(stream, 0, 0, 0)
                    with partial.open("wb") as file:  # a stale one from a crash is ours to replace
                        done = reported = 0
                        while True:
                            if cancel.cancelled:
                                raise TaskCanceled("The disk's download was cancelled; nothing was kept.")
                            # libvirt hands the stream over in pieces of up to 256 KiB.
                            chunk = stream.recv(CHUNK)
                            if not chunk:
                                break
                            file.write(chunk)
                            done += len(chunk)
                            if done - reported >= CHUNK:  # a report every CHUNK, not every piece
                                reported = done
                                progress(min(100.0, 100.0 * done / max(total, 1)),
                                         f"Downloaded {done // 1024**2} of {total // 1024**2} MiB")
                    stream.finish()
                except BaseException:
                    with contextlib.suppress(libvirt.libvirtError):
                        stream.abort()
                    raise
            except libvirt.libvirtError as exc:
                partial.unlink(missing_ok=True)
                if exc.get_error_code() == libvirt.VIR_ERR_NO_SUPPORT:
                    raise UserError(f"{connection.getURI()} cannot download a storage volume (its driver has no "
                                    "volume download); copy the disk's file from the host to this computer and "
                                    "finalize from that file.") from None
                raise EnvironmentProblem(f"The download of volume {volume.name()!r} failed: "
                                         f"{exc.get_error_message()}; nothing was kept.") from None
            except OSError as exc:
                partial.unlink(missing_ok=True)
                raise EnvironmentProblem(f"Cannot write the disk to {partial.parent}: {exc.strerror or exc}; nothing "
                                         "was kept.") from None
            except BaseException:
                partial.unlink(missing_ok=True)
                raise
        partial.replace(target)
        progress(100.0, f"Downloaded {done // 1024**2} of {total // 1024**2} MiB")
        return target

    @staticmethod
    def _delivered_volume(connection: libvirt.virConnect, ids: Mapping[str, str]) -> libvirt.virStorageVol:
        """The volume by its key, else by pool and name; NotFound when it is gone."""
        pool_name, name = ids.get("pool", ""), ids.get("volume", "")
        if ids.get("volume_key"):
            with contextlib.suppress(libvirt.libvirtError):
                return connection.storageVolLookupByKey(ids["volume_key"])
        try:
            pool = connection.storagePoolLookupByName(pool_name)
            if not pool.isActive():
                raise UserError(f"The storage pool {pool_name!r} is not active, so the packaging machine's disk cannot "
                                f"be read; start it (virsh pool-start {pool_name}) and finalize again.")
            # What is really in the pool's folder now (a refresh only rereads it).
            with contextlib.suppress(libvirt.libvirtError):
                pool.refresh(0)
            return pool.storageVolLookupByName(name)
        except libvirt.libvirtError:
            raise NotFound(f"The volume {pool_name}/{name} is no longer on {connection.getURI()}: the packaging "
                           "machine's disk is gone, so there is nothing to finalize from; abandon the version and "
                           "create a new packaging disk.") from None

    @staticmethod
    def _refuse_running(connection: libvirt.virConnect, ids: Mapping[str, str]) -> None:
        """Conflict while the delivered VM runs (or is paused): its disk is not consistent then."""
        domain = None
        if ids.get("domain_uuid"):
            with contextlib.suppress(libvirt.libvirtError):
                domain = connection.lookupByUUIDString(ids["domain_uuid"])
        if domain is None and ids.get("domain"):
            with contextlib.suppress(libvirt.libvirtError):
                domain = connection.lookupByName(ids["domain"])
        if domain is not None and domain.isActive():
            raise Conflict(f"VM {domain.name()} is still running on {connection.getURI()}, so its disk is not "
                           f"consistent; shut VM {domain.name()} down first, then finalize again.")


def _is_full(exc: libvirt.libvirtError) -> bool:
    """Whether ``exc`` says the pool's file system (or its space accounting) ran out of room."""
    text = (exc.get_error_message() or str(exc)).lower()
    return "no space left on device" in text or "not enough space" in text or "disk quota exceeded" in text


def _connection_lost(connection: libvirt.virConnect) -> bool:
    try:
        return not connection.isAlive()
    except libvirt.libvirtError:
        return True


def _size_text(count: int) -> str:
    return f"{count / 1024**2:.0f} MiB" if count < 10 * 1024**3 else f"{count / 1024**3:.1f} GiB"


def _delete_volume(uri: str, volume: libvirt.virStorageVol, pool: str, name: str) -> str:
    """Delete the volume a failed delivery created: ``""`` when it is gone, else a sentence naming the pool
    and the volume to delete by hand, and why it could not be done here."""
    try:
        volume.delete(0)
    except libvirt.libvirtError as exc:
        why = (exc.get_error_message() or str(exc)).rstrip(".")
        log.error("could not delete volume %s/%s after a failed delivery: %s", pool, name, why)
        return (f"LayerDesk could not clean up on {uri} ({why}): delete the volume {name!r} in "
                f"the storage pool {pool!r} there by hand (virsh vol-delete --pool {pool} {name}).")
    return ""


class _ShortUpload(Exception):
    """The volume holds fewer bytes than were uploaded."""

    def __init__(self, landed: int) -> None:
        super().__init__(landed)
        self.landed = landed


def _download_size(volume: libvirt.virStorageVol) -> int:
    """How many bytes a download of ``volume`` yields (its file's size), for progress."""
    try:
        _kind, capacity, physical = volume.infoFlags(libvirt.VIR_STORAGE_VOL_GET_PHYSICAL)
    except libvirt.libvirtError:
        _kind, capacity, physical = volume.info()
    return int(physical or capacity)


def _version(number: int) -> str:
    return f"{number // 1_000_000}.{number // 1000 % 1000}.{number % 1000}"
