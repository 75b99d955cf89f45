"""The Citrix Hypervisor / XenServer connector: a published VHD imported into a storage repository (SR) and a
VM made on it, through the XenAPI of the pool master.

The endpoint is the pool master's URL (``https://xs1.lab.test``). XenAPI is XML-RPC; it is spoken with the
standard library's :mod:`xmlrpc.client` (the XenAPI package adds only the ``Status``/``Value`` unwrapping
done here in a few lines, and with our own transport the TLS context, the CA file and the timeout are
ours). The disk goes up by XAPI's HTTP handler ``PUT /import_raw_vdi`` into a VDI made for it
(``VDI.create`` with the disk's virtual size), watched through a XAPI task; then ``VM.create`` (HVM,
UEFI for a GPT disk, BIOS for MBR), ``VBD.create`` attaches the disk and ``VIF.create`` the network.

A delivery that fails or is cancelled destroys the VM it made (``VM.destroy``) and the VDI
(``VDI.destroy``). The certificate is verified against the system's trust store or the connector's CA
file unless the connector turns that off. The password goes into ``session.login_with_password`` only.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import re
import ssl
import string
import tempfile
import time
import xmlrpc.client
from collections.abc import Iterator
from datetime import UTC
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import quote, urlsplit

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
from app.connectors.reach import lost_reason, mib_text, tcp_reach, tls_context, tls_handshake
from app.engine.disk import image_info, read_image_partition_table
from app.errors import AuthenticationFailed, Conflict, EnvironmentProblem, NotFound, UserError, ValidationError
from app.procs import Cancellable
from app.tasks.base import TaskCanceled

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024
#: The share of the delivery spent uploading.
UPLOAD_SHARE = 95.0
#: Image file extension → the ``format`` import_raw_vdi takes.
IMPORT_FORMATS = {".vhd": "vhd", ".raw": "raw", ".img": "raw"}
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
PATTERN_KEYS = frozenset({"template", "revision", "timestamp", "image"})
NULL_REF = "OpaqueRef:NULL"


class XapiFailure(Exception):
    """A XenAPI call answered ``Status: Failure``; ``description`` is its ErrorDescription array."""

    def __init__(self, method: str, description: list[str]) -> None:
        super().__init__(f"{method}: {' '.join(description)}")
        self.method = method
        self.description = description

    @property
    def code(self) -> str:
        return self.description[0] if self.description else ""


class _Transport(xmlrpc.client.SafeTransport):
    """HTTPS with our TLS context and a timeout (the standard one waits forever)."""

    def __init__(self, context: ssl.SSLContext, timeout_s: float) -> None:
        super().__init__(context=context)
        self._timeout_s = timeout_s

    def make_connection(self, host: Any) -> http.client.HTTPSConnection:
        connection = super().make_connection(host)
        connection.timeout = self._timeout_s
        return connection


class XapiSession:
    """A XenAPI session with the pool master: :meth:`call` unwraps ``Status``/``Value`` and raises
    :class:`XapiFailure`; transport failures become clear :class:`~app.errors.LayerDeskError` s."""

    def __init__(self, url: str, context: ssl.SSLContext, timeout_s: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self.host = urlsplit(self.url).hostname or self.url
        self.context = context
        self.timeout_s = timeout_s
        self._proxy = xmlrpc.client.ServerProxy(self.url, transport=_Transport(context, timeout_s), allow_none=True)
        self.ref = ""

    def call(self, method: str, *args: Any) -> Any:
        try:
            answer = getattr(self._proxy, method)(*args)
        except ssl.SSLCertVerificationError as exc:
            raise UserError(f"The TLS certificate of {self.url} is not trusted ({exc.verify_message}). Give the "
                            "connector the CA file that issued it; turn verification off only in a closed lab.") \
                from None
        except xmlrpc.client.ProtocolError as exc:
            raise EnvironmentProblem(f"{self.url} answered HTTP {exc.errcode} {exc.errmsg} to {method}; is it a "
                                     "XenServer pool master?") from None
        except (OSError, http.client.HTTPException) as exc:
            raise EnvironmentProblem(f"Cannot reach XenAPI at {self.url} ({exc}). Check the URL and that the pool "
                                     "master is on.") from None
        if not isinstance(answer, dict) or "Status" not in answer:
            raise EnvironmentProblem(f"{self.url} answered {method} with something that is not XenAPI.")
        if answer["Status"] != "Success":
            raise XapiFailure(method, [str(part) for part in answer.get("ErrorDescription") or []])
        return answer.get("Value")

    def api(self, method: str, *args: Any) -> Any:
        """``method`` called with this session's reference first."""
        return self.call(method, self.ref, *args)

    def login(self, username: str, password: str) -> None:
        try:
            self.ref = str(self.call("session.login_with_password", username, password, "2.0", "LayerDesk"))
        except XapiFailure as exc:
            if exc.code == "SESSION_AUTHENTICATION_FAILED":
                raise AuthenticationFailed(f"{self.host} refused the user name or password "
                                           "(SESSION_AUTHENTICATION_FAILED). Check the connector's account and "
                                           "password.") from None
            if exc.code == "HOST_IS_SLAVE":
                master = exc.description[1] if len(exc.description) > 1 else "the pool master"
                raise UserError(f"{self.host} is not the pool master; connect to {master} instead "
                                "(HOST_IS_SLAVE).") from None
            raise

    def logout(self) -> None:
        """End the session (when there is one) and close the kept-alive connection."""
        if self.ref:
            with contextlib.suppress(Exception):
                self.call("session.logout", self.ref)
            self.ref = ""
        self._proxy("close")()


def failure_error(exc: XapiFailure, doing: str) -> UserError | EnvironmentProblem:
    """The clear error for a XenAPI failure while ``doing`` something."""
    parts = exc.description
    if exc.code == "SR_FULL":
        needed = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        free = int(parts[2]) if len(parts) > 2 and parts[2].isdigit() else 0
        return UserError(f"The SR is full: {doing} needs {needed / 1024**3:.1f} GiB but {free / 1024**3:.1f} GiB can "
                         "be had (SR_FULL). Free space in the SR or choose another one.")
    if exc.code in ("UUID_INVALID", "HANDLE_INVALID"):
        return NotFound(f"Could not {doing}: the {parts[1] if len(parts) > 1 else 'object'} "
                        f"{parts[2] if len(parts) > 2 else ''} does not exist ({exc.code}).")
    return EnvironmentProblem(f"Could not {doing}: XenServer answered {' '.join(parts) or 'a failure'}.")






_CLEANED_UP = (" The half-imported disk was destroyed.", "; the half-imported disk was destroyed.",
               "; the VM and its disk were destroyed.")


def _not_cleaned_up(exc: BaseException, left: str) -> BaseException:
    """``exc`` (a delivery's failure or cancel) saying ``left`` (what is still there) instead of that what
    it made was destroyed."""
    text = exc.message if isinstance(exc, UserError | EnvironmentProblem) else str(exc)
    for claim in _CLEANED_UP:
        if text.endswith(claim):
            text = text.removesuffix(claim) + ("." if claim.startswith(";") else "")
            break
    text = f"{text} {left}"
    if isinstance(exc, UserError | EnvironmentProblem):
        exc.message = text
        exc.args = (text,)
        return exc
    if isinstance(exc, TaskCanceled):
        return TaskCanceled(text)
    return exc


def vm_name(pattern: str, sidecar: ImageSidecar) -> str:
    """The VM's name label from the pattern (``{template}``, ``{revision}``, ``{timestamp}``, ``{image}``)."""
    try:
        keys = {field for _t, field, _s, _c in string.Formatter().parse(pattern) if field is not None}
    except ValueError as exc:
        raise ValidationError(f"The VM name pattern {pattern!r} is not valid ({exc}).", field="vm_name_pattern") \
            from None
    if keys - PATTERN_KEYS:
        raise ValidationError(f"The VM name pattern knows {', '.join(sorted(PATTERN_KEYS))}, not "
                              f"{', '.join(sorted(keys - PATTERN_KEYS))}.", field="vm_name_pattern")
    created = sidecar.created_at
    created = created.replace(tzinfo=UTC) if created.tzinfo is None else created.astimezone(UTC)
    name = pattern.format(template=sidecar.template, revision=sidecar.template_revision,
                          timestamp=f"{created:%Y%m%dT%H%M%SZ}", image=sidecar.image).strip()
    if not name:
        raise ValidationError("The VM name pattern gives an empty name.", field="vm_name_pattern")
    return name


def firmware(image: Path) -> str:
    """``"uefi"`` for a GPT disk, ``"bios"`` for an MBR disk (read with :mod:`app.engine.disk`)."""
    info = image_info(image)
    with tempfile.TemporaryDirectory(prefix="layerdesk-xen-") as scratch:
        return "uefi" if read_image_partition_table(info, Path(scratch)).scheme == "gpt" else "bios"


def vm_record(name: str, description: str, boot: str, memory_mb: int, vcpus: int,
              other_config: dict[str, str]) -> dict[str, Any]:
    """The ``VM.create`` record of an HVM Windows VM (numbers as strings: XenAPI's int64 over XML-RPC)."""
    memory = str(memory_mb * 1024 * 1024)
    return {
        "name_label": name, "name_description": description, "user_version": "1", "is_a_template": False,
        "affinity": NULL_REF, "memory_target": memory, "memory_static_max": memory, "memory_dynamic_max": memory,
        "memory_dynamic_min": memory, "memory_static_min": memory, "VCPUs_params": {}, "VCPUs_max": str(vcpus),
        "VCPUs_at_startup": str(vcpus), "actions_after_shutdown": "destroy", "actions_after_reboot": "restart",
        "actions_after_crash": "restart", "PV_bootloader": "", "PV_kernel": "", "PV_ramdisk": "", "PV_args": "",
        "PV_bootloader_args": "", "PV_legacy_args": "", "HVM_boot_policy": "BIOS order",
        "HVM_boot_params": {"order": "cd", "firmware": boot}, "HVM_shadow_multiplier": 1.0,
        "platform": {"acpi": "1", "apic": "true", "pae": "true", "nx": "true", "viridian": "true",
                     "device_id": "0002", "secureboot": "false"},
        "PCI_bus": "", "other_config": other_config, "recommendations": "", "xenstore_data": {},
        "ha_always_run": False, "ha_restart_priority": "", "tags": [], "blocked_operations": {},
        "protection_policy": NULL_REF, "is_snapshot_from_vmpp": False, "appliance": NULL_REF, "start_delay": "0",
        "shutdown_delay": "0", "order": "0", "suspend_SR": NULL_REF, "version": "0", "generation_id": "",
        "hardware_platform_version": "0", "has_vendor_device": False, "domain_type": "hvm",
    }


class XenServerConnector(Connector):
    type: ClassVar[str] = "xenserver"
    title: ClassVar[str] = "Citrix Hypervisor / XenServer"
    fields: ClassVar[tuple[ConfigField, ...]] = (
        ConfigField("endpoint", "Pool master URL", required=True, help="https://xs1.lab.test (the pool master)"),
        ConfigField("username", "User name", help="root, or an account with the Pool Admin role"),
        ConfigField("password", "Password", secret=True, help="the account's password"),
        ConfigField("verify_tls", "Verify TLS certificates", FieldKind.FLAG, default=True,
                    help="leave on unless the pool master's certificate cannot be checked (a closed lab only)"),
        ConfigField("ca_file", "CA file", FieldKind.PATH,
                    help="PEM file of the CA that issued the pool master's certificate (empty: the system's)"),
        ConfigField("sr", "Storage repository", required=True, help="the SR's name (or UUID) the disk goes into"),
        ConfigField("network", "Network", help="the network of the VM's interface (empty: none)"),
        ConfigField("memory_mb", "Memory (MiB)", FieldKind.NUMBER, default=4096, minimum=256, maximum=6 * 1024**2),
        ConfigField("vcpus", "Virtual CPUs", FieldKind.NUMBER, default=2, minimum=1, maximum=64),
        ConfigField("vm_name_pattern", "VM name pattern", default="{template}-{timestamp}",
                    help="{template}, {revision}, {timestamp} (UTC) and {image} are replaced"),
    )

    def check_endpoint(self, endpoint: str) -> None:
        parts = urlsplit(endpoint)
        if parts.scheme != "https" or not parts.hostname or parts.path not in ("", "/"):
            raise ValidationError(f"{endpoint!r} is not a pool master URL; write https://HOST (XenAPI is spoken "
                                  "over HTTPS only).", field="endpoint")

    # --- connection -----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _session(self, settings: ConnectorSettings, password: str | None) -> Iterator[XapiSession]:
        endpoint = settings.endpoint.strip()
        self.check_endpoint(endpoint)
        if not settings.username:
            raise ValidationError(f"Connector {settings.name!r} has no user name; set one (root or a Pool Admin).",
                                  field="username")
        if not password:
            raise ValidationError(f"Connector {settings.name!r} has no password in the keyring; set it in the "
                                  "connector.", field="password")
        ca_file = settings.option("ca_file")
        session = XapiSession(endpoint, tls_context(settings.verify_tls, str(ca_file) if ca_file else None))
        try:
            session.login(settings.username, password)
            yield session
        finally:
            session.logout()

    @staticmethod
    def _sr(session: XapiSession, name: str) -> str:
        try:
            if _UUID.match(name):
                return str(session.api("SR.get_by_uuid", name))
            found = session.api("SR.get_by_name_label", name)
        except XapiFailure as exc:
            if exc.code == "UUID_INVALID":
                raise NotFound(f"{session.host} has no SR with UUID {name} (UUID_INVALID); correct the connector's "
                               "storage repository.") from None
            raise failure_error(exc, f"look up SR {name!r}") from None
        if not found:
            raise NotFound(f"{session.host} has no SR named {name!r}; correct the connector's storage repository "
                           "(its name as XenCenter shows it, or its UUID).")
        if len(found) > 1:
            raise UserError(f"{session.host} has {len(found)} SRs named {name!r}; give the SR's UUID instead.")
        return str(found[0])

    @staticmethod
    def _network(session: XapiSession, name: str) -> str:
        try:
            found = session.api("network.get_by_name_label", name)
        except XapiFailure as exc:
            raise failure_error(exc, f"look up network {name!r}") from None
        if not found:
            raise NotFound(f"{session.host} has no network named {name!r}; correct the connector's network.")
        return str(found[0])

    # --- test -----------------------------------------------------------------------------------------

    def test(self, settings: ConnectorSettings, password: str | None) -> TestReport:
        steps = TestSteps(settings.name)
        endpoint = settings.endpoint.strip()
        parts = urlsplit(endpoint)
        host, port = parts.hostname or "", parts.port or 443
        with contextlib.ExitStack() as stack:
            opened: list[XapiSession] = []

            def reach() -> str:
                self.check_endpoint(endpoint)
                return tcp_reach(host, port)

            def tls() -> str:
                ca_file = settings.option("ca_file")
                return tls_handshake(host, port, tls_context(settings.verify_tls, str(ca_file) if ca_file else None))

            def login() -> str:
                opened.append(stack.enter_context(self._session(settings, password)))
                return f"session.login_with_password as {settings.username} succeeded"

            def sr() -> str:
                self._sr(opened[0], str(settings.option("sr", "")))
                return f"SR {settings.option('sr')} exists"

            def network() -> str:
                self._network(opened[0], str(settings.option("network")))
                return f"network {settings.option('network')} exists"

            steps.run("TCP", reach)
            steps.run("TLS", tls)
            steps.run("login", login)
            steps.run("SR", sr)
            if settings.option("network"):
                steps.run("network", network)
            else:
                steps.skip("network", "no network named: the VM gets no network interface")
        return steps.report()

    # --- deliver --------------------------------------------------------------------------------------

    def deliver(self, image: Path, sidecar: ImageSidecar, settings: ConnectorSettings, password: str | None,
                progress: DeliveryProgress, cancel: Cancellable) -> DeliveryResult:
        fmt = IMPORT_FORMATS.get(image.suffix.lower())
        if fmt is None:
            raise UserError(f"{image.name} cannot be imported into XenServer (it takes VHD or raw disks); publish "
                            "the template as VHD for this connector.")
        boot = firmware(image)
        virtual_size = image_info(image).virtual_size
        size = image.stat().st_size
        name = vm_name(str(settings.option("vm_name_pattern", "{template}-{timestamp}")), sidecar)
        started = time.monotonic()
        with self._session(settings, password) as session:
            sr = self._sr(session, str(settings.option("sr", "")))
            network_name = settings.option("network")
            network = self._network(session, str(network_name)) if network_name else None
            if session.api("VM.get_by_name_label", name):
                raise Conflict(f"{session.host} already has a VM named {name!r}; it was left alone. Rename or remove "
                               "it, or change the VM name pattern.")
            description = (f"Published by LayerDesk from template {sidecar.template} (revision "
                           f"{sidecar.template_revision}); image checksum {sidecar.checksum}.")
            try:
                vdi = str(session.api("VDI.create", {
                    "name_label": name, "name_description": description, "SR": sr, "virtual_size": str(virtual_size),
                    "type": "user", "sharable": False, "read_only": False, "other_config": {},
                    "xenstore_data": {}, "sm_config": {}, "tags": []}))
            except XapiFailure as exc:
                raise failure_error(exc, f"create a {virtual_size / 1024**3:.1f} GiB disk") from None
            vm = ""
            vdi_uuid = ""
            try:
                # Asked at once so that a disk left behind can be named by the UUID xe and XenCenter show.
                vdi_uuid = str(session.api("VDI.get_uuid", vdi))
                self._import(session, vdi, image, fmt, size, progress, cancel)
                progress(UPLOAD_SHARE, f"Creating VM {name}")
                vm = str(session.api("VM.create", vm_record(
                    name, description, boot, int(settings.option("memory_mb", 4096)), int(settings.option("vcpus", 2)),
                    {"layerdesk_template": sidecar.template, "layerdesk_checksum": str(sidecar.checksum)})))
                session.api("VBD.create", {
                    "VM": vm, "VDI": vdi, "userdevice": "0", "bootable": True, "mode": "RW", "type": "Disk",
                    "unpluggable": False, "empty": False, "other_config": {}, "qos_algorithm_type": "",
                    "qos_algorithm_params": {}})
                if network:
                    session.api("VIF.create", {
                        "device": "0", "network": network, "VM": vm, "MAC": "", "MTU": "1500", "other_config": {},
                        "qos_algorithm_type": "", "qos_algorithm_params": {}, "locking_mode": "network_default",
                        "ipv4_allowed": [], "ipv6_allowed": []})
                if cancel.cancelled:
                    raise TaskCanceled("The delivery was cancelled; the VM and its disk were destroyed.")
                vm_uuid = str(session.api("VM.get_uuid", vm))
            except BaseException as exc:
                left = self._undo(session, vm, vdi, name, vdi_uuid)
                if isinstance(exc, XapiFailure):
                    error = failure_error(exc, f"make VM {name!r} ({exc.method}); the VM and its disk were "
                                               "destroyed")
                    if left:
                        error.message = f"{failure_error(exc, f'make VM {name!r} ({exc.method})').message} {left}"
                    raise error from None
                if left:
                    raise _not_cleaned_up(exc, left) from None
                raise
        progress(100.0, f"VM {name} is ready")
        return DeliveryResult(settings.name, self.type, f"{session.host}: VM {name} on a VDI in SR "
                              f"{settings.option('sr')}", {"vm": name, "vm_uuid": vm_uuid, "vdi_uuid": vdi_uuid,
                                                          "firmware": boot}, size, time.monotonic() - started)

    @staticmethod
    def _undo(session: XapiSession, vm: str, vdi: str, name: str, vdi_uuid: str) -> str:
        """Destroy what a failed delivery made (the VM first: VM.destroy takes its VBDs and VIFs with it).
        Returns ``""`` when all of it is gone, else a sentence naming what to remove by hand and why."""
        left: list[str] = []
        why = ""
        for method, ref, what in (("VM.destroy", vm, f"the VM {name!r}"),
                                  ("VDI.destroy", vdi, f"the VDI {name!r}" + (f" ({vdi_uuid})" if vdi_uuid else ""))):
            if not ref:
                continue
            try:
                session.api(method, ref)
            except Exception as exc:  # noqa: BLE001 - the delivery's own failure is the one to report
                log.error("%s %s on %s failed (%s); remove it by hand", method, ref, session.host, exc)
                left.append(what)
                why = why or str(exc).rstrip(".")
        if not left:
            return ""
        return (f"LayerDesk could not clean up on XenServer pool master {session.host} ({why}): remove "
                f"{' and '.join(left)} there by hand (xe vdi-destroy, or XenCenter's Storage tab).")

    @staticmethod
    def _import(session: XapiSession, vdi: str, image: Path, fmt: str, size: int, progress: DeliveryProgress,
                cancel: Cancellable) -> None:
        """``PUT /import_raw_vdi`` the image into ``vdi``, watched through a XAPI task (the handler answers
        before it has read the body, so only the task says whether the import succeeded)."""
        task = str(session.api("task.create", "LayerDesk import", f"import {image.name}"))
        try:
            parts = urlsplit(session.url)
            query = (f"session_id={quote(session.ref)}&task_id={quote(task)}&vdi={quote(vdi)}&format={fmt}")
            connection = http.client.HTTPSConnection(parts.hostname or "", parts.port or 443, context=session.context,
                                                     timeout=session.timeout_s)
            done = 0
            try:
                connection.putrequest("PUT", f"/import_raw_vdi?{query}")
                connection.putheader("Content-Length", str(size))
                connection.putheader("Content-Type", "application/octet-stream")
                connection.endheaders()
                with image.open("rb") as file:
                    while chunk := file.read(CHUNK):
                        if cancel.cancelled:
                            raise TaskCanceled("The delivery was cancelled; the half-imported disk was destroyed.")
                        connection.send(chunk)
                        done += len(chunk)
                        progress(UPLOAD_SHARE * done / max(size, 1),
                                 f"Uploaded {done // 1024**2} of {size // 1024**2} MiB")
                answer = connection.getresponse()
                answer.read()
                if answer.status != 200:
                    raise EnvironmentProblem(f"{session.host} refused the disk upload: HTTP {answer.status} "
                                             f"{answer.reason}.")
            except (OSError, http.client.HTTPException) as exc:
                raise EnvironmentProblem(
                    f"The connection to {session.host} was lost during the upload of the disk to "
                    f"{session.url}/import_raw_vdi, after {mib_text(done)} of {mib_text(size)} MiB "
                    f"({lost_reason(exc)}); "
                    f"the host went down or the network between failed. Check that the pool master {session.host} "
                    "is reachable from this machine. The half-imported disk was destroyed.") from None
            finally:
                connection.close()
            status = "pending"
            deadline = time.monotonic() + session.timeout_s
            while status == "pending" and time.monotonic() < deadline:
                status = str(session.api("task.get_status", task))
                if status == "pending":
                    time.sleep(0.2)
            if status != "success":
                info = session.api("task.get_error_info", task) if status == "failure" else [status]
                raise EnvironmentProblem(f"{session.host} could not import the disk: {' '.join(map(str, info))}; "
                                         "the half-imported disk was destroyed.")
        finally:
            with contextlib.suppress(Exception):
                session.api("task.destroy", task)
