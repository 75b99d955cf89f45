"""The VMware vSphere connectors: a published disk imported into a datastore and a VM cloned from a
template VM around it (``vsphere``), and the same for Machine Creation Services (``mcs-vsphere``), whose
master image VM is also started so layer scripts can run, awaited until it shuts down and snapshotted.

The endpoint is the vCenter host; the API speaks SOAP over HTTPS on :data:`DEFAULT_PORT` unless the
connector names another port. A delivery:

1. writes the image as a streamOptimized VMDK (qemu-img) unless it already is one;
2. clones the template VM into a new, powered-off VM named by the connector's name pattern;
3. uploads the disk through an OVF **import lease** (``ImportVApp`` of a disk-only OVF descriptor into a
   helper VM, then the disk is detached, moved into the new VM's folder and the helper destroyed). A
   lease, not the datastore ``/folder`` HTTP upload, because ESXi can only attach disks in its own
   format: a streamOptimized VMDK put on a datastore as a file cannot be attached (the simulator the
   tests run refuses it too: it finds no ``-flat`` extent), while the host converts a lease upload as it
   arrives;
4. replaces the template's disks with the uploaded one (and points the first NIC at the connector's
   network, when one is named);
5. takes a snapshot (``mcs-vsphere``: first powers the VM on and waits, up to the shutdown timeout, for
   the guest to shut itself down once its scripts ran).

A delivered VM's disk can be fetched back (:meth:`VSphereConnector.retrieve`, for a packaging machine) once the
VM is powered off: every file of the disk's current chain (descriptors and extents, snapshot deltas included)
is downloaded through vCenter's datastore ``/folder`` HTTP access with the session's cookie, and qemu-img
writes the chain as one streamOptimized VMDK, the format delivered. Not an export lease (``ExportVm``), which
would hand over a streamOptimized VMDK directly: govmomi's simulator the tests run does not implement it.

A delivery that fails or is cancelled aborts the lease and destroys the helper VM, the uploaded disk and
the new VM. TLS certificates are verified (against the connector's CA file, or the system's CAs) unless
the connector turns verification off, which is logged as a warning on every connection. The password is
handed to the vCenter login call only.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import re
import socket
import ssl
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import quote, urlencode, urlsplit
from xml.parsers.expat import ExpatError
from xml.sax.saxutils import escape, quoteattr

import pyVmomi
from pyVim import connect as pyvim_connect

from app import procs
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
from app.errors import (
    AuthenticationFailed,
    Conflict,
    EnvironmentProblem,
    LayerDeskError,
    NotFound,
    UserError,
    ValidationError,
)
from app.procs import Cancellable
from app.tasks.base import TaskCanceled

log = logging.getLogger(__name__)

# pyVmomi's bundled type hints leave constructors untyped and miss some enums: its objects are used as Any.
vim: Any = pyVmomi.vim
vmodl: Any = pyVmomi.vmodl
_stub_adapter: Any = pyvim_connect.SmartStubAdapter

DEFAULT_PORT = 443
CHUNK = 1024 * 1024
#: Seconds between polls of a vCenter task or of the master image's power state.
POLL_S = 0.25
#: Seconds between lease progress reports (vCenter times an import lease out after 5 minutes without one).
LEASE_REPORT_S = 10.0
CONNECT_TIMEOUT_S = 30
STREAM_VMDK = "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"
NAME_FIELDS = ("image", "template", "revision", "date")
#: ``[datastore] folder/file.vmdk``
DATASTORE_PATH = re.compile(r"^\[(?P<datastore>[^\]]+)\] ?(?P<path>.*)$")


# --- failures as the administrator reads them ---------------------------------------------------------


def _fault_text(fault: Any) -> str:
    text = getattr(fault, "msg", None) or ""
    if not text and getattr(fault, "faultMessage", None):
        text = "; ".join(m.message for m in fault.faultMessage if getattr(m, "message", None))
    return text or type(fault).__name__.rpartition(".")[2]


def _is_no_space(fault: Any) -> bool:
    return isinstance(fault, (vim.fault.NoDiskSpace, vim.fault.InsufficientStorageSpace)) or "space" in (
        _fault_text(fault).lower())


def _unreachable(where: str, exc: BaseException) -> EnvironmentProblem:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return EnvironmentProblem(
            f"The TLS certificate of {where} could not be verified ({exc.verify_message}). Give the connector the "
            "CA file that signed it (CA file), or turn certificate verification off if you trust the network.")
    return EnvironmentProblem(f"Cannot reach vCenter at {where}: {exc.strerror or exc}. Check the host name and "
                              "port, and that a firewall lets this machine reach it on that port."
                              if isinstance(exc, OSError) else f"Cannot reach vCenter at {where}: {exc}.")


def vm_name(pattern: str, sidecar: ImageSidecar) -> str:
    """The VM's name: ``pattern`` with ``{image}``, ``{template}``, ``{revision}`` and ``{date}`` (the
    image's UTC time, ``2025-03-01_10-15``) filled in. :class:`ValidationError` for another placeholder or
    a name vSphere cannot take (empty, over 80 characters, ``/``, ``\\`` or ``%``)."""
    values = {"image": sidecar.image, "template": sidecar.template, "revision": str(sidecar.template_revision),
              "date": sidecar.created_at.strftime("%Y-%m-%d_%H-%M")}
    try:
        name = pattern.format(**values).strip()
    except (KeyError, IndexError, ValueError):
        allowed = ", ".join("{" + f + "}" for f in NAME_FIELDS)
        raise ValidationError(f"The VM name pattern {pattern!r} can only use {allowed}.",
                              field="vm_name_pattern") from None
    if not name or len(name) > 80 or any(ch in name for ch in "/\\%"):
        raise ValidationError(f"The VM name {name!r} (from the pattern {pattern!r}) is not one vSphere takes: 1 to 80 "
                              "characters without / \\ or %.", field="vm_name_pattern")
    return name


# --- the disk -------------------------------------------------------------------------------------


def disk_facts(image: Path) -> tuple[str, int, bool]:
    """``(qemu-img format, virtual size in bytes, whether it is a streamOptimized VMDK already)``;
    :class:`UserError` for a file that is no disk image."""
    done = procs.run(["qemu-img", "info", "--output=json", str(image)], timeout_s=120)
    if not done.ok:
        raise UserError(f"{image.name} is not a disk image qemu-img can read ({done.stderr.strip()}); publish the "
                        "template as VMDK, VHDX, VHD, qcow2 or raw for this connector.")
    info = json.loads(done.stdout)
    fmt = info.get("format")
    if image.suffix.lower() == ".wim" or fmt not in ("vmdk", "vpc", "vhdx", "qcow2", "raw"):
        raise UserError(f"{image.name} is not a disk image (a {fmt or image.suffix} file); publish the template as "
                        "VMDK, VHDX, VHD, qcow2 or raw for this connector.")
    stream = fmt == "vmdk" and info.get("format-specific", {}).get("data", {}).get("create-type") == "streamOptimized"
    return str(fmt), int(info["virtual-size"]), stream


def stream_vmdk(image: Path, fmt: str, work: Path, progress: DeliveryProgress, cancel: Cancellable) -> Path:
    """``image`` (of qemu-img format ``fmt``) written as a streamOptimized VMDK under ``work``."""
    out = work / f"{image.stem}.vmdk"
    progress(0.0, f"Converting {image.name} to a streamOptimized VMDK")
    outcome = procs.stream(["qemu-img", "convert", "-f", fmt, "-O", "vmdk", "-o", "subformat=streamOptimized",
                            str(image), str(out)], lambda _line: None, cancel)
    if outcome.cancelled:
        raise TaskCanceled("The delivery was cancelled while the disk was converted; nothing was sent to vCenter.")
    if not outcome.ok:
        raise EnvironmentProblem(f"qemu-img could not write {image.name} as a VMDK: {outcome.stderr.strip()[-400:]}")
    return out


def disk_ovf(name: str, vmdk: Path, capacity: int) -> str:
    """A disk-only OVF 1.0 descriptor: one VM ``name`` with one SCSI (paravirtual) disk from ``vmdk``."""
    entity = quoteattr(name)
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
    xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
    xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData">
  <References><File ovf:id="file1" ovf:href={quoteattr(vmdk.name)} ovf:size="{vmdk.stat().st_size}"/></References>
  <DiskSection>
    <Info>The published disk</Info>
    <Disk ovf:diskId="disk1" ovf:fileRef="file1" ovf:capacity="{capacity}" ovf:capacityAllocationUnits="byte"
        ovf:format="{STREAM_VMDK}"/>
  </DiskSection>
  <VirtualSystem ovf:id={entity}>
    <Info>Carries the published disk into the datastore; LayerDesk removes it afterwards</Info>
    <Name>{escape(name)}</Name>
    <VirtualHardwareSection>
      <Info>Virtual hardware</Info>
      <System>
        <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>
        <vssd:InstanceID>0</vssd:InstanceID>
        <vssd:VirtualSystemIdentifier>{escape(name)}</vssd:VirtualSystemIdentifier>
        <vssd:VirtualSystemType>vmx-13</vssd:VirtualSystemType>
      </System>
      <Item>
        <rasd:AllocationUnits>hertz * 10^6</rasd:AllocationUnits>
        <rasd:ElementName>1 virtual CPU</rasd:ElementName>
        <rasd:InstanceID>1</rasd:InstanceID>
        <rasd:ResourceType>3</rasd:ResourceType>
        <rasd:VirtualQuantity>1</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits>
        <rasd:ElementName>512 MB of memory</rasd:ElementName>
        <rasd:InstanceID>2</rasd:InstanceID>
        <rasd:ResourceType>4</rasd:ResourceType>
        <rasd:VirtualQuantity>512</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:Address>0</rasd:Address>
        <rasd:ElementName>SCSI controller 0</rasd:ElementName>
        <rasd:InstanceID>3</rasd:InstanceID>
        <rasd:ResourceSubType>VirtualSCSI</rasd:ResourceSubType>
        <rasd:ResourceType>6</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>0</rasd:AddressOnParent>
        <rasd:ElementName>Hard disk 1</rasd:ElementName>
        <rasd:HostResource>ovf:/disk/disk1</rasd:HostResource>
        <rasd:InstanceID>4</rasd:InstanceID>
        <rasd:Parent>3</rasd:Parent>
        <rasd:ResourceType>17</rasd:ResourceType>
      </Item>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"""


# --- the connector --------------------------------------------------------------------------------


class _Session:
    """One logged-in vCenter session and what the connector's settings name in it."""

    def __init__(self, instance: Any, host: str, port: int, context: ssl.SSLContext) -> None:
        self.instance = instance
        self.content = instance.RetrieveContent()
        self.host, self.port, self.context = host, port, context

    @property
    def where(self) -> str:
        return self.host if self.port == DEFAULT_PORT else f"{self.host}:{self.port}"

    def view(self, root: Any, kind: type) -> list[Any]:
        container = self.content.viewManager.CreateContainerView(root, [kind], True)
        try:
            return list(container.view)
        finally:
            container.Destroy()

    def find(self, path: str) -> Any:
        return self.content.searchIndex.FindByInventoryPath(path)

    @property
    def cookie(self) -> str | None:
        """The session's cookie (``vmware_soap_session=…``) for vCenter's HTTP transfers, or ``None``."""
        cookie: str | None = self.instance._stub.cookie
        return cookie.split(";")[0] if cookie else None

    def find_path(self, entity: Any) -> str:
        """The inventory path of ``entity`` (``Region/DC1``), as :meth:`find` takes it."""
        parts: list[str] = []
        while entity is not None and entity != self.content.rootFolder:
            parts.append(entity.name)
            entity = entity.parent
        return "/".join(reversed(parts))

    def wait(self, task: Any, what: str, cancel: Cancellable | None = None) -> Any:
        """The task's result once it succeeded; its fault as an error naming ``what`` otherwise. A cancel
        asks vCenter to cancel the task (when it can be) and raises :class:`TaskCanceled`."""
        while True:
            info = self._task_info(task)
            if info["info.state"] == vim.TaskInfo.State.success:
                return info.get("info.result")
            if info["info.state"] == vim.TaskInfo.State.error:
                raise _TaskFailed(what, info.get("info.error"))
            if cancel is not None and cancel.cancelled:
                with contextlib.suppress(vmodl.MethodFault):
                    if info.get("info.cancelable"):
                        task.CancelTask()
                raise TaskCanceled(f"The delivery was cancelled while {what}.")
            time.sleep(POLL_S)

    def _task_info(self, task: Any) -> dict[str, Any]:
        """The task's state, result, error and cancelability: only these properties are read, because some
        servers (govmomi's simulator) name in ``info.entity`` a manager that is no managed entity, which the
        API's own types refuse."""
        spec = vmodl.query.PropertyCollector.FilterSpec(
            objectSet=[vmodl.query.PropertyCollector.ObjectSpec(obj=task)],
            propSet=[vmodl.query.PropertyCollector.PropertySpec(
                type=vim.Task, pathSet=["info.state", "info.result", "info.error", "info.cancelable"])])
        found = self.content.propertyCollector.RetrieveContents([spec])
        return {prop.name: prop.val for prop in found[0].propSet} if found else {"info.state": None}


class _Undo:
    """What a delivery created, each with how to remove it, undone newest first after a failure."""

    def __init__(self) -> None:
        self._actions: dict[str, tuple[str, Callable[[], None]]] = {}

    def add(self, key: str, what: str, action: Callable[[], None]) -> None:
        """Register (or replace, keeping its place) how to remove ``key``."""
        self._actions[key] = (what, action)

    def forget(self, key: str) -> None:
        """``key`` no longer needs removing (it now belongs to something else that is removed)."""
        self._actions.pop(key, None)

    def run_now(self, key: str) -> None:
        """Remove ``key`` now (no longer only after a failure)."""
        _what, action = self._actions.pop(key)
        action()

    def undo_all(self) -> tuple[list[str], str | None]:
        """Remove everything registered, newest first; what could not be removed (each as :meth:`add` named
        it) and why the first of those failed (``None`` when all went)."""
        left: list[str] = []
        reason: str | None = None
        for what, action in reversed(list(self._actions.values())):
            try:
                try:
                    action()
                except (OSError, http.client.HTTPException):
                    # The first call after a lost connection fails on the dead socket; pyVmomi then opens a new one.
                    action()
            except Exception as failure:  # noqa: BLE001 - keep undoing; the delivery's own error is reported
                log.warning("could not remove %s after a failed delivery: %s", what, failure)
                left.append(what)
                reason = reason or _reason(failure)
        self._actions.clear()
        return left, reason


def _reason(failure: BaseException) -> str:
    """A short text for why a call failed: a vCenter fault's message, a socket error's, or the type's name."""
    if isinstance(failure, vmodl.MethodFault):
        return _fault_text(failure)
    if isinstance(failure, http.client.RemoteDisconnected):
        return "it was closed without an answer"
    if isinstance(failure, ConnectionResetError | BrokenPipeError | ssl.SSLEOFError | ssl.SSLZeroReturnError):
        return "it was reset"
    if isinstance(failure, ssl.SSLError):
        return failure.reason or str(failure)
    if isinstance(failure, OSError):
        return failure.strerror or str(failure) or type(failure).__name__
    return str(failure) or type(failure).__name__


#: What an error says when the clean-up after it succeeded; replaced when something was left behind.
_CLEANED = re.compile(r"[;.,]? *(?:what was created was removed again|the VM was removed|the half-uploaded disk and "
                      r"the VM were removed|nothing was left behind)(?=[.;]|$)[.;]?", re.IGNORECASE)


def _left_behind(error: BaseException, left: list[str], reason: str | None, where: str) -> None:
    """Say in ``error`` (a :class:`LayerDeskError` or :class:`TaskCanceled`) exactly what an administrator must
    remove by hand, instead of that what was created was removed."""
    things = ", ".join(left[:-1]) + f" and {left[-1]}" if len(left) > 1 else left[0]
    why = f" ({reason})" if reason else ""
    if isinstance(error, TaskCanceled):
        error.args = (f"The delivery was cancelled, but vCenter {where} could not be cleaned up{why}: remove "
                      f"{things} there.",)
        return
    assert isinstance(error, LayerDeskError)
    text = _CLEANED.sub(".", error.message).rstrip(" .;") + "."
    error.message = (f"{text} LayerDesk could not clean up on vCenter {where}{why}: remove {things} there (in the "
                     "vSphere Client).")
    error.args = (error.message,)


class _TaskFailed(Exception):
    def __init__(self, what: str, fault: Any) -> None:
        super().__init__(f"{what}: {_fault_text(fault)}")
        self.what, self.fault = what, fault


class VSphereConnector(Connector):
    type: ClassVar[str] = "vsphere"
    title: ClassVar[str] = "VMware vSphere"
    #: Whether a delivery starts the VM and waits for it to shut down before the snapshot (MCS).
    runs_master_image: ClassVar[bool] = False
    can_retrieve: ClassVar[bool] = True

    _COMMON: ClassVar[tuple[ConfigField, ...]] = (
        ConfigField("endpoint", "vCenter host", required=True,
                    help="the vCenter Server's host name or address (https://host/sdk is understood too)"),
        ConfigField("port", "Port", FieldKind.NUMBER, default=DEFAULT_PORT, minimum=1, maximum=65535,
                    help="vCenter's HTTPS port"),
        # Both are needed to sign in; a connector may be saved before they are known.
        ConfigField("username", "User name", help="a vCenter account, e.g. svc-layerdesk@vsphere.local"),
        ConfigField("password", "Password", secret=True, help="kept in the OS keyring"),
        ConfigField("verify_tls", "Verify TLS certificates", FieldKind.FLAG, default=True,
                    help="leave on: turned off, anyone on the network path can pose as vCenter and read the "
                         "password"),
        ConfigField("ca_file", "CA file", FieldKind.PATH,
                    help="PEM file of the CA that signed vCenter's certificate (empty: the system's CAs)"),
        ConfigField("datacenter", "Datacenter", required=True, help="its inventory path, e.g. DC1 or Region/DC1"),
        ConfigField("cluster", "Cluster or host", required=True,
                    help="the cluster (or standalone host) the VM runs on"),
        ConfigField("resource_pool", "Resource pool", help="a pool of the cluster, e.g. VDI/Masters (empty: the "
                                                           "cluster's own)"),
        ConfigField("datastore", "Datastore", required=True, help="where the VM and its disk are stored"),
        ConfigField("folder", "VM folder", help="e.g. LayerDesk/Images (empty: the datacenter's VM folder)"),
        ConfigField("template_vm", "Template VM", required=True,
                    help="the VM (or VM template) whose hardware the new VM gets; its disks are not used"),
        ConfigField("network", "Network", help="the port group of the VM's first NIC (empty: as in the template)"),
        ConfigField("vm_name_pattern", "VM name pattern", default="{image}",
                    help="{image}, {template}, {revision} and {date} are filled in"),
    )
    fields: ClassVar[tuple[ConfigField, ...]] = _COMMON

    def check_endpoint(self, endpoint: str) -> None:
        self._split_endpoint(endpoint)

    @staticmethod
    def _split_endpoint(endpoint: str) -> tuple[str, int | None]:
        """``(host, port or None)`` of ``vc.lab``, ``vc.lab:8443`` or ``https://vc.lab[:port][/sdk]``."""
        text = endpoint.strip()
        parts = urlsplit(text if "://" in text else f"https://{text}")
        try:
            port = parts.port
        except ValueError:
            port = -1
        if parts.scheme != "https" or not parts.hostname or port == -1 or parts.path.rstrip("/") not in ("", "/sdk") \
                or parts.query or " " in text:
            raise ValidationError(f"{endpoint!r} is not a vCenter address; write its host name or address "
                                  "(vcenter.lab.local, or https://vcenter.lab.local/sdk).", field="endpoint")
        return parts.hostname, port

    # --- connection -----------------------------------------------------------------------------------

    @staticmethod
    def tls_context(settings: ConnectorSettings) -> ssl.SSLContext:
        """Verifying (against the CA file, else the system's CAs) unless verification is turned off."""
        if not settings.verify_tls:
            log.warning("TLS certificate verification is off for connector %s: vCenter's identity is not checked",
                        settings.name)
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            return context
        ca_file = settings.option("ca_file")
        if ca_file and not Path(str(ca_file)).is_file():
            raise ValidationError(f"The CA file {ca_file} does not exist; give the PEM file of the CA that signed "
                                  "vCenter's certificate.", field="ca_file")
        try:
            return ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        except ssl.SSLError as exc:
            raise ValidationError(f"The CA file {ca_file} is not a PEM certificate file ({exc.reason}).",
                                  field="ca_file") from None

    @classmethod
    def _address(cls, settings: ConnectorSettings) -> tuple[str, int]:
        """The host and port to connect to: a port in the endpoint wins over the Port setting."""
        host, port = cls._split_endpoint(settings.endpoint)
        return host, port or int(settings.option("port", DEFAULT_PORT))

    @contextlib.contextmanager
    def _login(self, settings: ConnectorSettings, password: str | None) -> Iterator[_Session]:
        self.check_endpoint(settings.endpoint)
        host, port = self._address(settings)
        where = host if port == DEFAULT_PORT else f"{host}:{port}"
        if not settings.username:
            raise AuthenticationFailed(f"Connector {settings.name} has no user name; set the vCenter account it "
                                       "signs in with.")
        if not password:
            raise AuthenticationFailed(f"No password is stored for connector {settings.name}; set it (layerctl "
                                       "connector set-password) and try again.")
        context = self.tls_context(settings)
        stub: Any = None
        try:
            # The stub finds the API version vCenter speaks; the login is ours, so a refused one closes its socket.
            stub = _stub_adapter(host=host, port=port, sslContext=context, httpConnectionTimeout=CONNECT_TIMEOUT_S)
            instance = vim.ServiceInstance("ServiceInstance", stub)
            instance.RetrieveContent().sessionManager.Login(settings.username, password, None)
        except vim.fault.InvalidLogin:
            stub.DropConnections()
            raise AuthenticationFailed(f"vCenter {where} refused the user name or password of {settings.username!r}; "
                                       "correct them in the connector.") from None
        except vmodl.MethodFault as fault:
            stub.DropConnections()
            raise EnvironmentProblem(f"vCenter {where} refused the login: {_fault_text(fault)}") from None
        except (OSError, http.client.HTTPException) as exc:
            if stub is not None:
                stub.DropConnections()
            raise _unreachable(where, exc) from None
        try:
            yield _Session(instance, host, port, context)
        finally:
            with contextlib.suppress(Exception):
                instance.RetrieveContent().sessionManager.Logout()
            stub.DropConnections()

    # --- what the settings name -----------------------------------------------------------------------

    @staticmethod
    def _datacenter(session: _Session, settings: ConnectorSettings) -> Any:
        path = str(settings.option("datacenter", "")).strip("/")
        found = session.find(path)
        if not isinstance(found, vim.Datacenter):
            known = sorted(d.name for d in session.view(session.content.rootFolder, vim.Datacenter))
            raise NotFound(f"vCenter {session.where} has no datacenter {path!r}; its datacenters are "
                           f"{', '.join(known) or 'none'}. Correct the connector's datacenter.")
        return found

    @staticmethod
    def _pool(session: _Session, settings: ConnectorSettings, datacenter: Any) -> Any:
        name = str(settings.option("cluster", "")).strip("/")
        compute = session.find(f"{session.find_path(datacenter)}/host/{name}") if name else None
        if not isinstance(compute, vim.ComputeResource):
            known = sorted(c.name for c in session.view(datacenter.hostFolder, vim.ComputeResource))
            raise NotFound(f"The datacenter {datacenter.name!r} has no cluster or host {name!r}; it has "
                           f"{', '.join(known) or 'none'}. Correct the connector's cluster.")
        pool_path = str(settings.option("resource_pool", "") or "").strip("/")
        if not pool_path:
            return compute.resourcePool
        pool = compute.resourcePool
        for part in pool_path.split("/"):
            children = {p.name: p for p in pool.resourcePool}
            if part not in children:
                raise NotFound(f"The cluster {compute.name!r} has no resource pool {pool_path!r} ({part!r} is not in "
                               f"{pool.name!r}, which holds {', '.join(sorted(children)) or 'no pools'}).")
            pool = children[part]
        return pool

    @staticmethod
    def _datastore(session: _Session, settings: ConnectorSettings, datacenter: Any) -> Any:
        name = str(settings.option("datastore", ""))
        for datastore in datacenter.datastore:
            if datastore.name == name:
                if not datastore.summary.accessible:
                    raise EnvironmentProblem(f"The datastore {name!r} is not accessible now; check its hosts' storage.")
                return datastore
        known = sorted(d.name for d in datacenter.datastore)
        raise NotFound(f"The datacenter {datacenter.name!r} has no datastore {name!r}; its datastores are "
                       f"{', '.join(known) or 'none'}. Correct the connector's datastore.")

    @staticmethod
    def _folder(session: _Session, settings: ConnectorSettings, datacenter: Any) -> Any:
        path = str(settings.option("folder", "") or "").strip("/")
        if not path:
            return datacenter.vmFolder
        found = session.find(f"{session.find_path(datacenter)}/vm/{path}")
        if not isinstance(found, vim.Folder):
            raise NotFound(f"The datacenter {datacenter.name!r} has no VM folder {path!r}; create it or correct the "
                           "connector's folder.")
        return found

    @staticmethod
    def _template(session: _Session, settings: ConnectorSettings, datacenter: Any) -> Any:
        name = str(settings.option("template_vm", ""))
        found = session.find(f"{session.find_path(datacenter)}/vm/{name.strip('/')}") if "/" in name else None
        if not isinstance(found, vim.VirtualMachine):
            matches = [vm for vm in session.view(datacenter.vmFolder, vim.VirtualMachine) if vm.name == name]
            found = matches[0] if len(matches) == 1 else None
            if len(matches) > 1:
                raise UserError(f"The datacenter {datacenter.name!r} has {len(matches)} VMs named {name!r}; give the "
                                "template VM's folder path (Folder/Name) in the connector.")
        if found is None:
            raise NotFound(f"The datacenter {datacenter.name!r} has no VM or template {name!r}; correct the "
                           "connector's template VM.")
        return found

    @staticmethod
    def _network(session: _Session, settings: ConnectorSettings, datacenter: Any) -> Any:
        name = str(settings.option("network"))
        for network in datacenter.network:
            if network.name == name:
                return network
        known = sorted({n.name for n in datacenter.network if not isinstance(n, vim.dvs.DistributedVirtualPortgroup)
                        or not n.config.uplink})
        raise NotFound(f"The datacenter {datacenter.name!r} has no network {name!r}; its networks are "
                       f"{', '.join(known) or 'none'}. Correct the connector's network.")

    # --- test -----------------------------------------------------------------------------------------

    def test(self, settings: ConnectorSettings, password: str | None) -> TestReport:
        steps = TestSteps(settings.name)
        found: dict[str, Any] = {}
        host, port, where = settings.endpoint, DEFAULT_PORT, settings.endpoint

        def tcp() -> str:
            nonlocal host, port, where
            host, port = self._address(settings)
            where = host if port == DEFAULT_PORT else f"{host}:{port}"
            try:
                with socket.create_connection((host, port), timeout=10):
                    return f"{where} accepts connections"
            except OSError as exc:
                raise _unreachable(where, exc) from None

        def tls() -> str:
            context = self.tls_context(settings)
            try:
                with socket.create_connection((host, port), timeout=10) as raw, \
                        context.wrap_socket(raw, server_hostname=host) as wrapped:
                    certificate: dict[str, Any] = dict(wrapped.getpeercert() or {})
            except OSError as exc:
                raise _unreachable(where, exc) from None
            if not settings.verify_tls:
                return "connected over TLS WITHOUT checking the certificate (verification is off for this connector)"
            subject = {key: value for part in certificate.get("subject", ()) for key, value in part}
            issuer = {key: value for part in certificate.get("issuer", ()) for key, value in part}
            return (f"certificate of {subject.get('commonName', host)} verified (issued by "
                    f"{issuer.get('commonName', 'an unnamed CA')})")

        def login() -> str:
            session = stack.enter_context(self._login(settings, password))
            found["session"] = session
            about = session.content.about
            return f"signed in as {settings.username} to {about.fullName}"

        def datacenter() -> str:
            session = found["session"]
            found["datacenter"] = dc = self._datacenter(session, settings)
            pool = self._pool(session, settings, dc)
            folder = self._folder(session, settings, dc)
            return f"datacenter {dc.name}: resource pool {pool.name} of {pool.owner.name}, VM folder {folder.name}"

        def datastore() -> str:
            ds = self._datastore(found["session"], settings, found["datacenter"])
            summary = ds.summary
            return (f"datastore {ds.name} ({summary.type}): {summary.freeSpace / 1024**3:.1f} of "
                    f"{summary.capacity / 1024**3:.1f} GiB free")

        def template() -> str:
            vm = self._template(found["session"], settings, found["datacenter"])
            hardware = vm.config.hardware
            return (f"{'template' if vm.config.template else 'VM'} {vm.name}: {hardware.numCPU} vCPU, "
                    f"{hardware.memoryMB} MiB, {vm.config.guestFullName or vm.config.guestId}")

        def network() -> str:
            net = self._network(found["session"], settings, found["datacenter"])
            return f"network {net.name} exists"

        with contextlib.ExitStack() as stack:
            steps.run("tcp", tcp)
            steps.run("tls", tls)
            steps.run("login", login)
            steps.run("datacenter", datacenter)
            steps.run("datastore", datastore)
            steps.run("template VM", template)
            if settings.option("network"):
                steps.run("network", network)
            else:
                steps.skip("network", "no network named: the VM's NICs stay as in the template")
        return steps.report()

    # --- deliver --------------------------------------------------------------------------------------

    def deliver(self, image: Path, sidecar: ImageSidecar, settings: ConnectorSettings, password: str | None,
                progress: DeliveryProgress, cancel: Cancellable) -> DeliveryResult:
        name = vm_name(str(settings.option("vm_name_pattern", "{image}")), sidecar)
        started = time.monotonic()
        fmt, capacity, is_stream = disk_facts(image)
        # Everything is checked before the (slow) conversion, which then runs inside the session.
        with tempfile.TemporaryDirectory(prefix="layerdesk-vsphere-") as work, \
                self._login(settings, password) as session:
            dc = self._datacenter(session, settings)
            pool = self._pool(session, settings, dc)
            datastore = self._datastore(session, settings, dc)
            folder = self._folder(session, settings, dc)
            template = self._template(session, settings, dc)
            network = self._network(session, settings, dc) if settings.option("network") else None
            taken = {vm.name for vm in session.view(dc.vmFolder, vim.VirtualMachine)}
            for candidate in (name, f"{name}-disk"):
                if candidate in taken:
                    raise Conflict(f"The datacenter {dc.name!r} already has a VM named {candidate!r}; it was left "
                                   "alone. Rename or remove it, or change the connector's VM name pattern.")
            # Fresh figures when vCenter gives them (govmomi's simulator answers this call with an empty body).
            with contextlib.suppress(vmodl.MethodFault, ExpatError):
                datastore.RefreshDatastore()
            free = datastore.summary.freeSpace
            if free < capacity:
                raise UserError(f"The datastore {datastore.name!r} has {free / 1024**3:.1f} GiB free; the disk can "
                                f"grow to {capacity / 1024**3:.1f} GiB. Free space there or choose another "
                                "datastore; nothing was created.")
            vmdk = image if is_stream else stream_vmdk(image, fmt, Path(work), progress, cancel)
            undo = _Undo()
            try:
                result = self._build(session, settings, sidecar, name, vmdk, capacity, dc, pool, datastore,
                                     folder, template, network, undo, progress, cancel)
            except BaseException as exc:
                left, reason = undo.undo_all()
                error: BaseException
                if isinstance(exc, _TaskFailed):
                    error = self._task_error(exc, datastore.name)
                elif isinstance(exc, vmodl.MethodFault):
                    error = EnvironmentProblem(f"vCenter {session.where} refused a step of the delivery: "
                                               f"{_fault_text(exc)}; what was created was removed again.")
                elif isinstance(exc, OSError | http.client.HTTPException):
                    error = EnvironmentProblem(f"Lost contact with vCenter {session.where} during the delivery "
                                               f"({_reason(exc)}); what was created was removed again.")
                elif isinstance(exc, LayerDeskError | TaskCanceled):
                    error = exc
                else:
                    raise
                if left:
                    _left_behind(error, left, reason, session.where)
                raise error from None
            location = f"vCenter {session.where}: VM {name} in {dc.name} on {datastore.name}"
        return DeliveryResult(settings.name, self.type, location, result, image.stat().st_size,
                              time.monotonic() - started)

    @staticmethod
    def _task_error(failed: _TaskFailed, datastore: str) -> LayerDeskError:
        fault = failed.fault
        if isinstance(fault, vim.fault.DuplicateName):
            return Conflict(f"{failed.what}: vCenter already has an object named so ({_fault_text(fault)}); nothing "
                            "was left behind.")
        if _is_no_space(fault):
            return UserError(f"The datastore {datastore!r} is full ({_fault_text(fault)}); free space there or choose "
                             "another datastore. What was created was removed again.")
        return EnvironmentProblem(f"vCenter failed while {failed.what}: {_fault_text(fault)}. What was created was "
                                  "removed again.")

    def _build(self, session: _Session, settings: ConnectorSettings, sidecar: ImageSidecar, name: str, vmdk: Path,
               capacity: int, dc: Any, pool: Any, datastore: Any, folder: Any, template: Any, network: Any,
               undo: _Undo, progress: DeliveryProgress, cancel: Cancellable) -> dict[str, str]:
        """Clone, import, attach, (run,) snapshot; every object made is registered in ``undo`` first."""
        # 1. The VM, from the template, powered off.
        progress(1.0, f"Cloning {template.name} into {name}")
        relocate = vim.vm.RelocateSpec(pool=pool, datastore=datastore)
        clone_spec = vim.vm.CloneSpec(location=relocate, powerOn=False, template=False)
        vm = session.wait(template.CloneVM_Task(folder=folder, name=name, spec=clone_spec),
                          f"cloning {template.name} into {name}", cancel)
        undo.add("vm", f"VM {name} (in datacenter {dc.name}, on datastore {datastore.name})",
                 lambda: _destroy(session, vm))

        # 2. The disk, through an import lease into a helper VM.
        helper_name = f"{name}-disk"
        disk_path = self._import_disk(session, helper_name, vmdk, capacity, dc, pool, datastore, folder, undo,
                                      progress, cancel)

        # 3. The disk moved beside the VM's files; the helper destroyed.
        vm_dir = vm.config.files.vmPathName.rpartition("/")[0]
        final_path = f"{vm_dir}/{name}-layered.vmdk"
        manager = session.content.virtualDiskManager
        session.wait(manager.MoveVirtualDisk_Task(sourceName=disk_path, sourceDatacenter=dc, destName=final_path,
                                                  destDatacenter=dc, force=False), "moving the uploaded disk", cancel)
        undo.add("disk", f"the uploaded disk {final_path}", lambda: session.wait(
            manager.DeleteVirtualDisk_Task(name=final_path, datacenter=dc), "deleting the uploaded disk"))
        undo.run_now("helper")

        # 4. The template's disks replaced by the uploaded one; the NIC on the connector's network.
        progress(92.0, f"Attaching the disk to {name}")
        spec = _attach_spec(vm, final_path, capacity, network)
        spec.annotation = (f"Published by LayerDesk from template {sidecar.template} (revision "
                           f"{sidecar.template_revision}); image {sidecar.image}, checksum {sidecar.checksum}.")
        session.wait(vm.ReconfigVM_Task(spec=spec), f"attaching the disk to {name}", cancel)
        undo.forget("disk")  # the disk now belongs to the VM: destroying the VM removes it

        # 5. MCS: the master image runs its layer scripts and shuts down.
        if self.runs_master_image:
            self._run_master_image(session, vm, settings, progress, cancel)

        progress(98.0, f"Taking a snapshot of {name}")
        snapshot = session.wait(vm.CreateSnapshot_Task(
            name=f"LayerDesk {sidecar.image}", description=f"Published image of template {sidecar.template} "
            f"(revision {sidecar.template_revision}), checksum {sidecar.checksum}.", memory=False, quiesce=False),
            f"taking a snapshot of {name}", cancel)
        if cancel.cancelled:
            raise TaskCanceled("The delivery was cancelled; the VM was removed.")
        progress(100.0, f"VM {name} is ready")
        return {"vm": name, "vm_moref": vm._moId, "vm_uuid": vm.config.instanceUuid or "", "disk": final_path,
                "snapshot": snapshot._moId if snapshot is not None else "", "datacenter": dc.name,
                "datastore": datastore.name}

    def _import_disk(self, session: _Session, helper_name: str, vmdk: Path, capacity: int, dc: Any, pool: Any,
                     datastore: Any, folder: Any, undo: _Undo, progress: DeliveryProgress, cancel: Cancellable) -> str:
        """Upload ``vmdk`` through an import lease into the helper VM and detach it there; the disk's datastore
        path. ``undo`` then holds the helper VM (``"helper"``) and the detached disk (``"disk"``)."""
        params = vim.OvfManager.CreateImportSpecParams(entityName=helper_name, diskProvisioning="thin")
        spec = session.content.ovfManager.CreateImportSpec(
            ovfDescriptor=disk_ovf(helper_name, vmdk, capacity), resourcePool=pool, datastore=datastore, cisp=params)
        if spec.error:
            raise EnvironmentProblem(f"vCenter {session.where} refused the disk's import description: "
                                     f"{'; '.join(_fault_text(e) for e in spec.error)}")
        lease = pool.ImportVApp(spec=spec.importSpec, folder=folder)
        helper: list[Any] = []

        def remove_helper() -> None:
            with contextlib.suppress(vmodl.MethodFault):
                if lease.state not in (vim.HttpNfcLease.State.done, vim.HttpNfcLease.State.error):
                    lease.HttpNfcLeaseAbort()
            entity = helper[0] if helper else _lease_entity(lease)
            if entity is not None:
                _destroy(session, entity)

        undo.add("helper", f"the import VM {helper_name} with its half-uploaded disk (its folder on datastore "
                           f"{datastore.name})", remove_helper)
        deadline = time.monotonic() + 300
        while lease.state == vim.HttpNfcLease.State.initializing:
            if cancel.cancelled:
                raise TaskCanceled("The delivery was cancelled before the upload began; nothing was left behind.")
            if time.monotonic() > deadline:
                raise EnvironmentProblem(f"vCenter {session.where} did not get the import ready within 5 minutes.")
            time.sleep(POLL_S)
        if lease.state == vim.HttpNfcLease.State.error:
            raise _TaskFailed("preparing the disk's upload", lease.error)
        helper.append(lease.info.entity)
        keys = {item.deviceId for item in spec.fileItem}
        targets = [u for u in lease.info.deviceUrl if u.importKey in keys] or list(lease.info.deviceUrl)
        if not targets:
            raise EnvironmentProblem(f"vCenter {session.where} offered no place to upload the disk to.")
        url = targets[0].url.replace("://*", f"://{session.host}:{session.port}", 1)
        self._upload(session, lease, url, vmdk, progress, cancel)
        lease.HttpNfcLeaseComplete()

        disks = [d for d in helper[0].config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)]
        if not disks:
            raise EnvironmentProblem(f"The import VM {helper_name} holds no disk after the upload.")
        detach = vim.vm.ConfigSpec(deviceChange=[
            vim.vm.device.VirtualDeviceSpec(operation=vim.vm.device.VirtualDeviceSpec.Operation.remove, device=d)
            for d in disks])
        session.wait(helper[0].ReconfigVM_Task(spec=detach), "detaching the uploaded disk from the import VM")
        path: str = disks[0].backing.fileName
        # Detached, the disk no longer goes with the helper: remove it explicitly should a later step fail.
        manager = session.content.virtualDiskManager
        undo.add("disk", f"the uploaded disk {path}", lambda: session.wait(
            manager.DeleteVirtualDisk_Task(name=path, datacenter=dc), "deleting the uploaded disk"))
        return path

    @staticmethod
    def _upload(session: _Session, lease: Any, url: str, vmdk: Path, progress: DeliveryProgress,
                cancel: Cancellable) -> None:
        """POST the streamOptimized VMDK to the lease's device URL, reporting progress to vCenter (which keeps
        the lease alive) and to ``progress`` (2–90 %)."""
        parts = urlsplit(url)
        size = vmdk.stat().st_size
        connection = http.client.HTTPSConnection(parts.hostname or session.host, parts.port or 443,
                                                 context=session.context, timeout=CONNECT_TIMEOUT_S)
        cookie = session.cookie
        sent, reported = 0, time.monotonic()
        try:
            connection.putrequest("POST", parts.path + (f"?{parts.query}" if parts.query else ""))
            connection.putheader("Content-Type", "application/x-vnd.vmware-streamVmdk")
            connection.putheader("Content-Length", str(size))
            connection.putheader("Overwrite", "t")
            if cookie:
                connection.putheader("Cookie", cookie)
            connection.endheaders()
            with vmdk.open("rb") as file:
                while chunk := file.read(CHUNK):
                    if cancel.cancelled:
                        raise TaskCanceled("The delivery was cancelled during the upload; the half-uploaded disk "
                                           "and the VM were removed.")
                    connection.send(chunk)
                    sent += len(chunk)
                    percent = 100.0 * sent / max(size, 1)
                    progress(2.0 + 0.88 * percent, f"Uploaded {sent // 1024**2} of {size // 1024**2} MiB")
                    if time.monotonic() - reported > LEASE_REPORT_S:
                        lease.HttpNfcLeaseProgress(percent=int(percent))
                        reported = time.monotonic()
            response = connection.getresponse()
            body = response.read(4096).decode("utf-8", "replace")
        except (OSError, http.client.HTTPException) as exc:
            lease_error = None
            # vCenter may say why it broke the upload off; a host that went away cannot (its session's
            # connection is likely gone too: that failure is the one below, not this one's).
            with contextlib.suppress(vmodl.MethodFault, OSError, http.client.HTTPException):
                lease_error = lease.error if lease.state == vim.HttpNfcLease.State.error else None
            if lease_error is not None:
                raise _TaskFailed("uploading the disk", lease_error) from None
            raise EnvironmentProblem(
                f"The connection to {parts.hostname}:{parts.port or 443} was lost during the upload of the disk, "
                f"after {sent // 1024**2} of {size // 1024**2} MiB ({_reason(exc)}); check that vCenter "
                f"{session.where} and its hosts are reachable. What was created was removed again.") from None
        finally:
            connection.close()
        if response.status >= 300:
            if "space" in body.lower():
                raise _TaskFailed("uploading the disk", vim.fault.NoDiskSpace(msg=body.strip()[:300]))
            raise EnvironmentProblem(f"{parts.hostname} refused the disk upload (HTTP {response.status} "
                                     f"{response.reason}: {body.strip()[:300]}); what was created was removed again.")
        lease.HttpNfcLeaseProgress(percent=100)

    # --- retrieve -------------------------------------------------------------------------------------

    def retrieve(self, ids: Mapping[str, str], settings: ConnectorSettings, password: str | None, target: Path,
                 progress: DeliveryProgress, cancel: Cancellable) -> Path:
        """Download the delivered VM's disk (``ids``: ``vm``, ``vm_uuid``, ``vm_moref``, ``disk``) as it is now
        into ``target``, a streamOptimized VMDK; refused while the VM is not powered off. The VM is only read."""
        if target.exists():
            raise Conflict(f"{target} already exists; choose another file to receive the disk.")
        partial = target.with_name(target.name + ".partial")
        # The chain's files are as large as the disk: beside the target, not in the system's temp folder.
        with tempfile.TemporaryDirectory(prefix=".layerdesk-retrieve-", dir=target.parent) as work, \
                self._login(settings, password) as session:
            try:
                vm = self._delivered_vm(session, ids)
                state = vm.runtime.powerState
                if state != vim.VirtualMachinePowerState.poweredOff:
                    how = "suspended" if state == vim.VirtualMachinePowerState.suspended else "powered on"
                    raise Conflict(f"VM {vm.name} is {how}, so its disk is not consistent; shut VM {vm.name} down "
                                   "first, then finalize again.")
                top, files = _disk_chain(vm, ids)
                dc_path = session.find_path(_datacenter_of(vm))
                expected = sum(size for _name, size in files)
                done = 0
                for name, _size in files:
                    done = self._download(session, name, dc_path, Path(work), done, expected, progress, cancel)
                progress(90.0, f"Writing the disk of {vm.name} as a streamOptimized VMDK")
                outcome = procs.stream(
                    ["qemu-img", "convert", "-f", "vmdk", "-O", "vmdk", "-o", "subformat=streamOptimized",
                     str(Path(work) / _file_name(top)), str(partial)], lambda _line: None, cancel)
                if outcome.cancelled:
                    raise TaskCanceled("The disk's download was cancelled; nothing was kept.")
                if not outcome.ok:
                    raise EnvironmentProblem(f"qemu-img could not read the disk of {vm.name} as downloaded "
                                             f"({outcome.stderr.strip()[-400:]}); nothing was kept.")
                partial.replace(target)
            except BaseException as exc:
                partial.unlink(missing_ok=True)
                if isinstance(exc, vmodl.MethodFault):
                    raise EnvironmentProblem(f"vCenter {session.where} refused a step of the disk's download: "
                                             f"{_fault_text(exc)}; nothing was kept.") from None
                raise
        progress(100.0, f"Downloaded the disk of {ids.get('vm', target.stem)}")
        return target

    @staticmethod
    def _delivered_vm(session: _Session, ids: Mapping[str, str]) -> Any:
        """The VM by its instance UUID, else by its managed object id; NotFound when it is gone."""
        vm = None
        if ids.get("vm_uuid"):
            vm = session.content.searchIndex.FindByUuid(None, ids["vm_uuid"], True, True)
        if vm is None and ids.get("vm_moref"):
            candidate = vim.VirtualMachine(ids["vm_moref"], session.instance._stub)
            with contextlib.suppress(vmodl.fault.ManagedObjectNotFound):
                if candidate.name == ids.get("vm", candidate.name):
                    vm = candidate
        if vm is None:
            raise NotFound(f"VM {ids.get('vm', '?')} is no longer in vCenter {session.where}: the packaging "
                           "machine and its disk are gone, so there is nothing to finalize from; abandon the "
                           "version and create a new packaging disk.")
        return vm

    @staticmethod
    def _download(session: _Session, name: str, dc_path: str, work: Path, done: int, expected: int,
                  progress: DeliveryProgress, cancel: Cancellable) -> int:
        """GET the datastore file ``name`` (``[datastore] path``) into ``work``; the bytes downloaded so far."""
        match = DATASTORE_PATH.match(name)
        if match is None:
            raise EnvironmentProblem(f"vCenter {session.where} names a disk file {name!r} LayerDesk cannot read.")
        datastore, path = match["datastore"], match["path"]
        query = urlencode({"dcPath": dc_path, "dsName": datastore})
        connection = http.client.HTTPSConnection(session.host, session.port, context=session.context,
                                                 timeout=CONNECT_TIMEOUT_S)
        try:
            connection.putrequest("GET", f"/folder/{quote(path)}?{query}")
            if session.cookie:
                connection.putheader("Cookie", session.cookie)
            connection.endheaders()
            response = connection.getresponse()
            if response.status == 404:
                raise NotFound(f"The disk file {name} is gone from the datastore {datastore!r}, so the packaging "
                               "machine's disk cannot be read; deliver it again.")
            if response.status >= 300:
                body = response.read(4096).decode("utf-8", "replace")
                raise EnvironmentProblem(f"vCenter {session.where} refused the download of {name} (HTTP "
                                         f"{response.status} {response.reason}: {body.strip()[:300]}).")
            length = int(response.getheader("Content-Length") or 0)
            expected = max(expected, done + length)
            with (work / _file_name(name)).open("wb") as file:
                while chunk := response.read(CHUNK):
                    if cancel.cancelled:
                        raise TaskCanceled("The disk's download was cancelled; nothing was kept.")
                    file.write(chunk)
                    done += len(chunk)
                    progress(90.0 * done / max(expected, 1), f"Downloaded {done // 1024**2} of "
                                                             f"{expected // 1024**2} MiB")
        except (OSError, http.client.HTTPException) as exc:
            raise EnvironmentProblem(f"The download of {name} from vCenter {session.where} failed: {exc}; nothing "
                                     "was kept.") from None
        finally:
            connection.close()
        return done

    def _run_master_image(self, session: _Session, vm: Any, settings: ConnectorSettings, progress: DeliveryProgress,
                          cancel: Cancellable) -> None:
        """Power the master image on and wait until its guest shut it down (after running the layer scripts)."""
        timeout = int(settings.option("shutdown_timeout_s", 3600))
        progress(94.0, f"Starting {vm.name} so its layer scripts run")
        session.wait(vm.PowerOnVM_Task(), f"starting {vm.name}", cancel)
        progress(95.0, f"Waiting up to {timeout} s for {vm.name} to shut down")
        deadline = time.monotonic() + timeout
        while vm.runtime.powerState != vim.VirtualMachinePowerState.poweredOff:
            if cancel.cancelled:
                raise TaskCanceled(f"The delivery was cancelled while {vm.name} ran its layer scripts; the VM was "
                                   "removed.")
            if time.monotonic() > deadline:
                raise EnvironmentProblem(
                    f"{vm.name} did not shut down within {timeout} s of starting (its layer scripts may wait for "
                    "input, or the image does not shut down when they are done); the VM was removed. Check the "
                    "scripts, or raise the connector's shutdown timeout.")
            time.sleep(POLL_S)


class MCSVSphereConnector(VSphereConnector):
    """Machine Creation Services on vSphere: the master image VM is started once, runs its layer scripts,
    shuts down, and is snapshotted; MCS then provisions from that snapshot."""

    type: ClassVar[str] = "mcs-vsphere"
    title: ClassVar[str] = "Machine Creation for vSphere"
    runs_master_image: ClassVar[bool] = True
    fields: ClassVar[tuple[ConfigField, ...]] = (
        *VSphereConnector._COMMON,
        ConfigField("shutdown_timeout_s", "Shutdown timeout (seconds)", FieldKind.NUMBER, default=3600, minimum=1,
                    maximum=7 * 24 * 3600,
                    help="how long the master image may run its layer scripts before it must have shut down"),
    )


# --- vSphere helpers ------------------------------------------------------------------------------


def _lease_entity(lease: Any) -> Any:
    with contextlib.suppress(vmodl.MethodFault, AttributeError):
        return lease.info.entity if lease.info is not None else None
    return None


def _file_name(datastore_path: str) -> str:
    """The file name of ``[datastore] folder/file.vmdk`` (the chain's descriptors name each other so)."""
    return datastore_path.rpartition("/")[2].rpartition("] ")[2]


def _datacenter_of(entity: Any) -> Any:
    while entity is not None and not isinstance(entity, vim.Datacenter):
        entity = entity.parent
    if entity is None:
        raise EnvironmentProblem("vCenter places the VM in no datacenter.")
    return entity


def _disk_chain(vm: Any, ids: Mapping[str, str]) -> tuple[str, list[tuple[str, int]]]:
    """The delivered disk's current descriptor (a snapshot's delta when there is one) and every file of its chain,
    descriptors and extents with their sizes, as ``[datastore] path``. The disk is the VM's one whose chain holds
    the delivered file (``ids["disk"]``), else its first; NotFound when it has none."""
    disks = [d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)]

    def chain(disk: Any) -> list[str]:
        names, backing = [], disk.backing
        while backing is not None:
            names.append(str(getattr(backing, "fileName", "")))
            backing = getattr(backing, "parent", None)
        return names

    delivered = ids.get("disk")
    matches = [d for d in disks if delivered in chain(d)] if delivered else disks[:1]
    if not matches:
        raise NotFound(f"VM {vm.name} no longer has the delivered disk {delivered or ''}; its disks were changed, so "
                       "there is nothing to finalize from; abandon the version and create a new packaging disk.")
    disk = matches[0]
    layout = vm.layoutEx
    files = {f.key: f for f in (layout.file if layout is not None else [])}
    units = [u for d in (layout.disk if layout is not None else []) if d.key == disk.key for u in d.chain]
    names = [(files[key].name, int(files[key].size or 0)) for unit in units for key in unit.fileKey if key in files]
    if not names:
        raise EnvironmentProblem(f"vCenter does not list the files of the disk of VM {vm.name}; try again in a "
                                 "minute (its file layout is refreshed after a change).")
    return str(disk.backing.fileName), list(dict.fromkeys(names))


def _destroy(session: _Session, vm: Any) -> None:
    """Power ``vm`` off when it runs, then destroy it with its files (gone already counts as done)."""
    try:
        if vm.runtime.powerState != vim.VirtualMachinePowerState.poweredOff:
            session.wait(vm.PowerOffVM_Task(), f"powering off {vm.name}")
        session.wait(vm.Destroy_Task(), f"destroying {vm.name}")
    except vmodl.fault.ManagedObjectNotFound:
        pass


def _attach_spec(vm: Any, disk_path: str, capacity: int, network: Any) -> Any:
    """Remove the VM's disks (with their files), attach ``disk_path`` as its first SCSI disk (adding a
    paravirtual controller when it has no SCSI controller) and, with ``network``, move its first NIC there."""
    Spec = vim.vm.device.VirtualDeviceSpec
    devices = vm.config.hardware.device
    changes = [Spec(operation=Spec.Operation.remove, fileOperation=Spec.FileOperation.destroy, device=d)
               for d in devices if isinstance(d, vim.vm.device.VirtualDisk)]
    controllers = [d for d in devices if isinstance(d, vim.vm.device.VirtualSCSIController)]
    if controllers:
        controller_key = controllers[0].key
    else:
        controller = vim.vm.device.ParaVirtualSCSIController(key=-100, busNumber=0,
                                                             sharedBus=vim.vm.device.VirtualSCSIController.Sharing.noSharing)
        changes.append(Spec(operation=Spec.Operation.add, device=controller))
        controller_key = controller.key
    disk = vim.vm.device.VirtualDisk(
        key=-101, controllerKey=controller_key, unitNumber=0, capacityInBytes=capacity,
        capacityInKB=capacity // 1024,
        backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(fileName=disk_path, diskMode="persistent",
                                                             thinProvisioned=True))
    changes.append(Spec(operation=Spec.Operation.add, device=disk))
    if network is not None:
        nics = [d for d in devices if isinstance(d, vim.vm.device.VirtualEthernetCard)]
        if nics:
            nic = nics[0]
            if isinstance(network, vim.dvs.DistributedVirtualPortgroup):
                nic.backing = vim.vm.device.VirtualEthernetCard.DistributedVirtualPortBackingInfo(
                    port=vim.dvs.PortConnection(portgroupKey=network.key,
                                                switchUuid=network.config.distributedVirtualSwitch.uuid))
            else:
                nic.backing = vim.vm.device.VirtualEthernetCard.NetworkBackingInfo(network=network,
                                                                                   deviceName=network.name)
            changes.append(Spec(operation=Spec.Operation.edit, device=nic))
    return vim.vm.ConfigSpec(deviceChange=changes)
