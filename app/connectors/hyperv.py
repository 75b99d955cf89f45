r"""The Microsoft Hyper-V connector: a published VHDX copied to the Hyper-V host over SMB, and a VM made on
it over WinRM (PowerShell).

The endpoint is the Hyper-V host's name. WinRM is spoken with pywinrm over HTTPS (port 5986, NTLM or
Basic authentication, the certificate verified against the system's trust store or the connector's CA
file) unless the connector says plain HTTP (5985, where NTLM encrypts the messages). The target folder
is a share path (``\\HOST\SHARE\folder``: Hyper-V opens the VHDX there over SMB 3) or a folder of the
host (``D:\Hyper-V\Images``: copied through the host's administrative share ``\\HOST\D$\Hyper-V\Images``).

The image's partition table decides the VM's generation: GPT → Generation 2 (UEFI, VHDX only), MBR →
Generation 1 (BIOS). Every value (VM name, VHD path, switch name, memory, processors, notes) reaches
PowerShell as data: a fixed script decodes a Base64 JSON document and binds its fields as cmdlet
parameters, so no name can change what the script does. A delivery that fails or is cancelled removes
the VM it created (``Remove-VM``) and the VHDX it copied. The password goes to pywinrm and smbprotocol
only; it is never logged nor put in a message.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import re
import string
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import Any, ClassVar, Literal, cast
from xml.etree import ElementTree as ET

import requests
import winrm.exceptions
from urllib3.exceptions import InsecureRequestWarning
from winrm.protocol import Protocol

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
from app.connectors.folder import ConnectorShare
from app.connectors.reach import tcp_reach, tls_context, tls_handshake
from app.elastic.sync import ShareLocation, SyncCanceled, parse_share
from app.engine.disk import image_info, read_image_partition_table
from app.errors import AuthenticationFailed, Conflict, EnvironmentProblem, NotFound, UserError, ValidationError
from app.procs import Cancellable
from app.tasks.base import TaskCanceled

log = logging.getLogger(__name__)

#: The share of the delivery spent copying (the rest is making the VM).
COPY_SHARE = 90.0
#: Characters Windows refuses in a file name.
_BAD_FILE_CHARS = re.compile(r'[<>:"/\\|?*\x00-\x1f]')
_HOST = re.compile(r"^[A-Za-z0-9._-]+$|^\[[0-9A-Fa-f:.]+\]$")
_LOCAL_FOLDER = re.compile(r"^([A-Za-z]):\\(.*)$")
_BASE64 = re.compile(r"^[A-Za-z0-9+/=]*$")
PATTERN_KEYS = frozenset({"template", "revision", "timestamp", "image"})

# --- the PowerShell scripts --------------------------------------------------------------------------
# Each is fixed text. The only thing put into it is the Base64 of the JSON parameters, whose alphabet
# cannot end the string literal it sits in; the fields are then bound as cmdlet parameters.

_PREAMBLE = """$ErrorActionPreference = 'Stop'
$ProgressPreference = 'SilentlyContinue'
$p = [Text.Encoding]::UTF8.GetString([Convert]::FromBase64String('{payload}')) | ConvertFrom-Json
"""

SCRIPTS: dict[str, str] = {
    "get-vmhost": """$h = Get-VMHost
[pscustomobject]@{ Name = $h.ComputerName; LogicalProcessorCount = $h.LogicalProcessorCount;
  MemoryCapacity = [string]$h.MemoryCapacity; VirtualHardDiskPath = $h.VirtualHardDiskPath } | ConvertTo-Json -Compress
""",
    "get-vmswitch": """$names = @(Get-VMSwitch | ForEach-Object { $_.Name })
[pscustomobject]@{ Found = ($names -contains $p.SwitchName); Names = $names } | ConvertTo-Json -Compress
""",
    "new-vm": """if (@(Get-VM | Where-Object { $_.Name -eq $p.Name }).Count) {
  Write-Error -Message ("A virtual machine named '{0}' already exists on this host." -f $p.Name) `
    -Category ResourceExists -ErrorId 'VMNameInUse'
}
$a = @{ Name = $p.Name; Generation = [int16]$p.Generation; MemoryStartupBytes = [int64]$p.MemoryStartupBytes;
  VHDPath = $p.VHDPath }
if ($p.SwitchName) { $a.SwitchName = $p.SwitchName }
$vm = New-VM @a
[pscustomobject]@{ Id = [string]$vm.Id; Name = $vm.Name; Generation = $vm.Generation } | ConvertTo-Json -Compress
""",
    "configure-vm": """$vm = Get-VM -Id $p.Id
Set-VMProcessor -VM $vm -Count ([int64]$p.ProcessorCount)
Set-VM -VM $vm -Notes $p.Notes
if ($vm.Generation -eq 2) {
  Set-VMFirmware -VM $vm -FirstBootDevice (Get-VMHardDiskDrive -VM $vm | Select-Object -First 1)
}
[pscustomobject]@{ Id = [string]$vm.Id; State = [string]$vm.State } | ConvertTo-Json -Compress
""",
    "remove-vm": """$vm = @(Get-VM | Where-Object { [string]$_.Id -eq $p.Id })
foreach ($v in $vm) {
  if ($v.State -ne 'Off') { Stop-VM -VM $v -TurnOff -Force }
  Remove-VM -VM $v -Force
}
[pscustomobject]@{ Removed = $vm.Count } | ConvertTo-Json -Compress
""",
}


def script_text(name: str, params: Mapping[str, Any]) -> str:
    """The PowerShell of script ``name`` with ``params`` as its Base64 JSON document."""
    payload = base64.b64encode(json.dumps(dict(params), ensure_ascii=False).encode("utf-8")).decode("ascii")
    assert _BASE64.match(payload)
    # A marker line first: the host's PowerShell logs (and a recording) say which script ran.
    return f"# layerdesk:{name}\n" + _PREAMBLE.replace("{payload}", payload) + SCRIPTS[name]


def encoded_command(script: str) -> str:
    """``powershell.exe -EncodedCommand``'s argument: Base64 of the UTF-16LE script."""
    return base64.b64encode(script.encode("utf-16-le")).decode("ascii")


class ScriptFailed(EnvironmentProblem):
    """A PowerShell script ended with an error: ``error_id`` is its FullyQualifiedErrorId when known."""

    def __init__(self, message: str, error_id: str = "") -> None:
        super().__init__(message)
        self.error_id = error_id


def powershell_errors(stderr: bytes) -> tuple[str, str]:
    """The first error message and its FullyQualifiedErrorId in a PowerShell error stream (CLIXML, which
    powershell.exe writes when its output is redirected, or plain text)."""
    text = stderr.decode("utf-8", "replace")
    lines: list[str] = []
    if text.startswith("#< CLIXML"):
        try:
            # The host's own error stream, not user input.
            root = ET.fromstring(text.split("\n", 1)[1] if "\n" in text else "")  # noqa: S314
        except ET.ParseError:
            root = None
        if root is not None:
            for element in root.iter():
                if element.tag.endswith("}S") and element.get("S") == "Error":
                    decoded = re.sub(r"_x([0-9A-Fa-f]{4})_", lambda m: chr(int(m[1], 16)), element.text or "")
                    lines.extend(decoded.splitlines())
    else:
        lines = text.splitlines()
    lines = [line.rstrip() for line in lines if line.strip()]
    error_id = ""
    for line in lines:
        match = re.search(r"FullyQualifiedErrorId\s*:\s*([^,\s]+)", line)
        if match:
            error_id = match[1]
    first = lines[0] if lines else "no error text"
    # "New-VM : message" / "Write-Error : message": the cmdlet's name says nothing to an administrator.
    first = re.sub(r"^[A-Za-z]+-[A-Za-z]+\s*:\s*", "", first)
    return first, error_id


@dataclass(frozen=True)
class TargetFolder:
    """Where the VHDX is copied (over SMB) and the same folder as the Hyper-V host sees it."""

    share: ShareLocation
    host_path: str


def target_folder(text: str, host: str) -> TargetFolder:
    r"""``\\HOST\SHARE\folder`` as it is; ``D:\folder`` through the host's administrative share ``D$``."""
    text = text.strip().replace("/", "\\") if text.strip().startswith("//") else text.strip()
    if text.startswith("\\\\"):
        share = parse_share(text)
        return TargetFolder(share, share.unc)
    match = _LOCAL_FOLDER.match(text)
    if match:
        folder = match[2].strip("\\")
        share = ShareLocation(host, f"{match[1].upper()}$", folder)
        return TargetFolder(share, f"{match[1].upper()}:\\{folder}" if folder else f"{match[1].upper()}:\\")
    raise ValidationError(rf"The target folder {text!r} is neither a share path (\\HOST\SHARE\folder) nor a folder of "
                          r"the host (D:\Hyper-V\Images).", field="target_folder")


def vm_name(pattern: str, sidecar: ImageSidecar) -> str:
    """The VM's name from the connector's pattern (``{template}``, ``{revision}``, ``{timestamp}``, ``{image}``)."""
    created = sidecar.created_at
    created = created.replace(tzinfo=UTC) if created.tzinfo is None else created.astimezone(UTC)
    values = {"template": sidecar.template, "revision": sidecar.template_revision,
              "timestamp": f"{created:%Y%m%dT%H%M%SZ}", "image": sidecar.image}
    check_pattern(pattern)
    name = pattern.format(**values).strip()
    if not name or len(name) > 100 or any(ord(ch) < 32 for ch in name):
        raise ValidationError(f"The VM name {name!r} made from the pattern {pattern!r} is empty, too long (Hyper-V "
                              "allows 100 characters) or has control characters; change the pattern.",
                              field="vm_name_pattern")
    return name


def check_pattern(pattern: str) -> None:
    try:
        keys = {field for _text, field, _spec, _conv in string.Formatter().parse(pattern) if field is not None}
    except ValueError as exc:
        raise ValidationError(f"The VM name pattern {pattern!r} is not valid ({exc}); write names in braces like "
                              "{template}-{timestamp}.", field="vm_name_pattern") from None
    unknown = sorted(keys - PATTERN_KEYS)
    if unknown:
        raise ValidationError(f"The VM name pattern knows {', '.join(sorted(PATTERN_KEYS))}, not "
                              f"{', '.join(unknown)}.", field="vm_name_pattern")


def vhd_file_name(name: str, suffix: str) -> str:
    """A file name for the VM's disk: the VM's name with what Windows refuses in file names replaced."""
    return _BAD_FILE_CHARS.sub("_", name).rstrip(" .") + suffix.lower()


def partition_scheme(image: Path) -> str:
    """``"gpt"`` or ``"mbr"``: the published disk's partition table (:class:`app.engine.disk.DiskError` else)."""
    info = image_info(image)
    with tempfile.TemporaryDirectory(prefix="layerdesk-hyperv-") as scratch:
        return read_image_partition_table(info, Path(scratch)).scheme


class HyperVHost:
    """WinRM to one Hyper-V host: runs the fixed scripts of :data:`SCRIPTS` and maps every failure to one
    clear error. A shell is opened per script (Create, Command, Receive, Signal, Delete)."""

    def __init__(self, settings: ConnectorSettings, password: str | None) -> None:
        if not settings.username:
            raise ValidationError(f"Connector {settings.name!r} has no user name; set the Hyper-V host's "
                                  r"administrator account (DOMAIN\user).", field="username")
        if not password:
            raise ValidationError(f"Connector {settings.name!r} has no password in the keyring; set it in the "
                                  "connector.", field="password")
        self.host = settings.endpoint.strip()
        scheme = str(settings.option("winrm_scheme", "https"))
        port = int(settings.option("winrm_port", 5986 if scheme == "https" else 5985))
        self.url = f"{scheme}://{self.host}:{port}/wsman"
        self._verify = settings.verify_tls
        ca_file = settings.option("ca_file")
        if scheme == "https":
            # A missing CA file is a clear error here; turned-off verification is logged as a warning.
            tls_context(self._verify, str(ca_file) if ca_file else None)
        auth: Literal["ntlm", "basic"] = "basic" if settings.option("auth") == "basic" else "ntlm"
        self._protocol = Protocol(
            endpoint=self.url, transport=auth, username=settings.username,
            password=password, server_cert_validation="validate" if self._verify else "ignore",
            # None: the CA file or requests' own trust store, never one named by environment variables.
            ca_trust_path=str(ca_file) if ca_file else cast(str, None),
            proxy=None,  # a Hyper-V host is reached directly
            read_timeout_sec=int(settings.option("timeout_s", 60)) + 10,
            operation_timeout_sec=int(settings.option("timeout_s", 60)))

    @contextlib.contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        try:
            with warnings.catch_warnings():
                if not self._verify:  # logged once when this client was made, not at every request
                    warnings.simplefilter("ignore", InsecureRequestWarning)
                yield
        except winrm.exceptions.InvalidCredentialsError:
            raise AuthenticationFailed(f"{self.host} refused the user name or password for WinRM (HTTP 401). Check "
                                       r"the connector's account (DOMAIN\user, a member of Hyper-V Administrators and "
                                       "of the host's Administrators) and its password.") from None
        except requests.exceptions.SSLError as exc:
            raise UserError(f"The TLS certificate of {self.url} is not trusted ({_reason(exc)}). Give the connector "
                            "the CA file that issued it; turn verification off only in a closed lab.") from None
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
            raise EnvironmentProblem(f"Cannot reach WinRM at {self.url} ({_reason(exc)}). Check the host name, that "
                                     "WinRM listens there (winrm quickconfig -transport:https) and the firewall.") \
                from None
        except winrm.exceptions.WSManFaultError as exc:
            raise EnvironmentProblem(f"{self.host}'s WinRM service refused to {doing}: {exc.reason or exc.code}") \
                from None
        except winrm.exceptions.WinRMTransportError as exc:
            raise EnvironmentProblem(f"{self.host}'s WinRM service answered HTTP {exc.code} to {doing}.") from None
        except winrm.exceptions.WinRMError as exc:
            raise EnvironmentProblem(f"WinRM to {self.host} failed to {doing}: {exc}") from None

    def sign_in(self) -> str:
        """Open and close a shell: proves the account may use WinRM there."""
        with self._errors("open a shell"):
            shell = self._protocol.open_shell(noprofile=True, codepage=65001)
            self._protocol.close_shell(shell)
        return f"signed in to {self.url}"

    def run(self, name: str, params: Mapping[str, Any]) -> dict[str, Any]:
        """Run script ``name`` with ``params``; its JSON result. :class:`ScriptFailed` when it failed."""
        command = encoded_command(script_text(name, params))
        with self._errors(f"run {name}"):
            shell = self._protocol.open_shell(noprofile=True, codepage=65001)
            try:
                command_id = self._protocol.run_command(
                    shell, "powershell.exe", ["-NoLogo", "-NoProfile", "-NonInteractive", "-EncodedCommand", command])
                try:
                    stdout, stderr, exit_code = self._protocol.get_command_output(shell, command_id)
                finally:
                    self._protocol.cleanup_command(shell, command_id)
            finally:
                self._protocol.close_shell(shell)
        if exit_code != 0:
            message, error_id = powershell_errors(stderr)
            log.info("script %s on %s ended with %d (%s)", name, self.host, exit_code, error_id or "no error id")
            raise ScriptFailed(f"{self.host}: {message}", error_id)
        lines = [line for line in stdout.decode("utf-8", "replace").splitlines() if line.strip()]
        try:
            result = json.loads(lines[-1]) if lines else None
        except json.JSONDecodeError:
            result = None
        if not isinstance(result, dict):
            raise EnvironmentProblem(f"{self.host} answered {name} with output LayerDesk cannot read: "
                                     f"{(lines[-1] if lines else 'nothing')[:200]!r}.")
        return result


def _reason(exc: BaseException) -> str:
    """The innermost cause of a requests failure, in one line (no URL credentials: there are none)."""
    inner: BaseException = exc
    while inner.__context__ is not None and inner.__context__ is not inner:
        inner = inner.__context__
    text = str(inner) or type(inner).__name__
    return text.splitlines()[0][:300]


class HyperVConnector(Connector):
    type: ClassVar[str] = "hyperv"
    title: ClassVar[str] = "Microsoft Hyper-V"
    fields: ClassVar[tuple[ConfigField, ...]] = (
        ConfigField("endpoint", "Hyper-V host", required=True, help="the host's name or address (hv1.lab.test)"),
        ConfigField("username", "User name",
                    help=r"DOMAIN\user: a member of Hyper-V Administrators with write access to the target folder"),
        ConfigField("password", "Password", secret=True, help="the account's password"),
        ConfigField("verify_tls", "Verify TLS certificates", FieldKind.FLAG, default=True,
                    help="leave on unless the host's WinRM certificate cannot be checked (a closed lab only)"),
        ConfigField("ca_file", "CA file", FieldKind.PATH,
                    help="PEM file of the CA that issued the host's WinRM certificate (empty: the system's)"),
        ConfigField("winrm_scheme", "WinRM transport", FieldKind.CHOICE, default="https", choices=("https", "http"),
                    help="https (port 5986) unless the host only listens on http (5985; NTLM then encrypts)"),
        ConfigField("winrm_port", "WinRM port", FieldKind.NUMBER, minimum=1, maximum=65535,
                    help="empty: 5986 for https, 5985 for http"),
        ConfigField("auth", "WinRM authentication", FieldKind.CHOICE, default="ntlm", choices=("ntlm", "basic"),
                    help="ntlm for a domain account; basic only over https, for a local account"),
        ConfigField("target_folder", "Target folder", FieldKind.PATH, required=True,
                    help=r"where the VHDX goes: \\HOST\SHARE\folder, or a folder of the host (D:\Hyper-V\Images, "
                         r"reached through \\HOST\D$)"),
        ConfigField("smb_port", "SMB port", FieldKind.NUMBER, default=445, minimum=1, maximum=65535,
                    help="the SMB port of the target folder's server"),
        ConfigField("switch", "Virtual switch", help="the VM's network adapter is connected to it (empty: none)"),
        ConfigField("memory_mb", "Memory (MiB)", FieldKind.NUMBER, default=4096, minimum=32, maximum=12 * 1024**2),
        ConfigField("vcpus", "Virtual processors", FieldKind.NUMBER, default=2, minimum=1, maximum=240),
        ConfigField("vm_name_pattern", "VM name pattern", default="{template}-{timestamp}",
                    help="{template}, {revision}, {timestamp} (UTC) and {image} are replaced"),
    )

    def check_endpoint(self, endpoint: str) -> None:
        if not _HOST.match(endpoint):
            raise ValidationError(f"{endpoint!r} is not a host name; write the Hyper-V host's name or address "
                                  "(hv1.lab.test), without a scheme or path.", field="endpoint")

    def validate(self, endpoint: str, username: str, options: Mapping[str, Any], *,
                 complete: bool = True) -> dict[str, Any]:
        kept = super().validate(endpoint, username, options, complete=complete)
        if "vm_name_pattern" in kept:
            check_pattern(str(kept["vm_name_pattern"]))
        if "target_folder" in kept:
            target_folder(str(kept["target_folder"]), endpoint.strip() or "HOST")
        return kept

    # --- test -----------------------------------------------------------------------------------------

    def test(self, settings: ConnectorSettings, password: str | None) -> TestReport:
        steps = TestSteps(settings.name)
        host = settings.endpoint.strip()
        scheme = str(settings.option("winrm_scheme", "https"))
        port = int(settings.option("winrm_port", 5986 if scheme == "https" else 5985))
        clients: list[HyperVHost] = []

        def reach() -> str:
            self.check_endpoint(host)
            return tcp_reach(host, port)

        def tls() -> str:
            ca_file = settings.option("ca_file")
            return tls_handshake(host, port, tls_context(settings.verify_tls, str(ca_file) if ca_file else None))

        def sign_in() -> str:
            clients.append(HyperVHost(settings, password))
            return clients[0].sign_in()

        def vm_host() -> str:
            found = clients[0].run("get-vmhost", {})
            memory = int(found.get("MemoryCapacity") or 0)
            return (f"Hyper-V host {found.get('Name')}: {found.get('LogicalProcessorCount')} logical processors, "
                    f"{memory / 1024**3:.0f} GiB memory")

        def folder() -> str:
            target = target_folder(str(settings.option("target_folder", "")), host)
            with self._share(settings, password, target):
                pass
            return f"{target.share.unc} exists (the host sees it as {target.host_path})"

        def switch() -> str:
            name = str(settings.option("switch"))
            found = clients[0].run("get-vmswitch", {"SwitchName": name})
            if not found.get("Found"):
                names = [str(n) for n in found.get("Names") or []]
                raise NotFound(f"{host} has no virtual switch {name!r}; its switches are "
                               f"{', '.join(names) or 'none'}. Correct the connector's switch.")
            return f"virtual switch {name} exists"

        steps.run("TCP", reach)
        if scheme == "https":
            steps.run("TLS", tls)
        else:
            steps.skip("TLS", "plain HTTP: NTLM encrypts the WinRM messages (Basic would not)")
        steps.run("authenticate", sign_in)
        steps.run("Get-VMHost", vm_host)
        steps.run("target folder", folder)
        if settings.option("switch"):
            steps.run("switch", switch)
        else:
            steps.skip("switch", "no switch named: the VM's network adapter is left unconnected")
        return steps.report()

    # --- deliver --------------------------------------------------------------------------------------

    def deliver(self, image: Path, sidecar: ImageSidecar, settings: ConnectorSettings, password: str | None,
                progress: DeliveryProgress, cancel: Cancellable) -> DeliveryResult:
        suffix = image.suffix.lower()
        if suffix not in (".vhdx", ".vhd"):
            raise UserError(f"{image.name} is not a VHDX or VHD; publish the template as VHDX for Hyper-V.")
        generation = 2 if partition_scheme(image) == "gpt" else 1
        if generation == 2 and suffix != ".vhdx":
            raise UserError(f"{image.name} has a GPT (UEFI) disk, which needs a Generation 2 VM, and those boot "
                            "from VHDX only; publish the template as VHDX.")
        host = settings.endpoint.strip()
        self.check_endpoint(host)
        target = target_folder(str(settings.option("target_folder", "")), host)
        name = vm_name(str(settings.option("vm_name_pattern", "{template}-{timestamp}")), sidecar)
        file_name = vhd_file_name(name, suffix)
        vhd_path = f"{target.host_path.rstrip(chr(92))}\\{file_name}"
        client = HyperVHost(settings, password)
        size = image.stat().st_size
        started = time.monotonic()
        with self._share(settings, password, target) as share:
            if share.size(file_name) is not None:
                raise Conflict(f"{target.share.path(file_name)} already exists; it was left alone. Move it away or "
                               "change the VM name pattern.")
            self._copy(share, image, file_name, size, progress, cancel)
            try:
                vm_id = self._make_vm(client, name, vhd_path, generation, settings, sidecar, progress, cancel)
            except BaseException:
                with contextlib.suppress(Exception):
                    share.remove(file_name)
                raise
        progress(100.0, f"VM {name} is ready")
        return DeliveryResult(settings.name, self.type, f"{host}: VM {name} on {vhd_path}",
                              {"vm": name, "vm_id": vm_id, "vhd": vhd_path, "generation": str(generation)},
                              size, time.monotonic() - started)

    @staticmethod
    def _share(settings: ConnectorSettings, password: str | None, target: TargetFolder) -> ConnectorShare:
        if not password:
            raise ValidationError(f"Connector {settings.name!r} has no password in the keyring; set it in the "
                                  "connector.", field="password")
        return ConnectorShare(target.share, settings.username, password, port=int(settings.option("smb_port", 445)))

    @staticmethod
    def _copy(share: ConnectorShare, image: Path, file_name: str, size: int, progress: DeliveryProgress,
              cancel: Cancellable) -> None:
        """Copy the image as ``file_name`` (through ``….partial``); nothing is left when it fails or is cancelled
        (signing in to the share anew when the connection was lost), or the error names the ``.partial`` left."""
        done = 0

        def copied(count: int) -> None:
            nonlocal done
            done = count
            progress(COPY_SHARE * count / max(size, 1), f"Copied {count // 1024**2} of {size // 1024**2} MiB")

        try:
            share.upload(image, file_name, progress=copied, cancel=cancel)
        except BaseException as exc:  # noqa: BLE001 - re-raised as the clear error it stands for (or as it is)
            left = share.remove_after_failure(f"{file_name}.partial")
            if not left:
                with contextlib.suppress(Exception):
                    if share.size(file_name) is not None:
                        share.remove(file_name)
            if isinstance(exc, SyncCanceled):
                raise TaskCanceled(f"The delivery was cancelled. {left}" if left else
                                   "The delivery was cancelled; the half-copied VHDX was deleted.") from None
            raise share.upload_failure(exc, file_name, done, size, left) from None
        if cancel.cancelled:
            with contextlib.suppress(Exception):
                share.remove(file_name)
            raise TaskCanceled("The delivery was cancelled; the copied VHDX was deleted.")

    @staticmethod
    def _make_vm(client: HyperVHost, name: str, vhd_path: str, generation: int, settings: ConnectorSettings,
                 sidecar: ImageSidecar, progress: DeliveryProgress, cancel: Cancellable) -> str:
        """New-VM on the copied disk, then its processors, notes and boot order; the VM's id. A VM made here
        is removed again (``Remove-VM``) when a later step fails or the delivery is cancelled."""
        progress(COPY_SHARE, f"Creating VM {name} (Generation {generation})")
        switch = settings.option("switch")
        try:
            made = client.run("new-vm", {
                "Name": name, "Generation": generation, "VHDPath": vhd_path,
                "MemoryStartupBytes": int(settings.option("memory_mb", 4096)) * 1024**2,
                "SwitchName": str(switch) if switch else "",
            })
        except ScriptFailed as exc:
            if exc.error_id.startswith("VMNameInUse"):
                raise Conflict(f"{client.host} already has a VM named {name!r}; it was left alone and the copied "
                               "VHDX was deleted. Rename or remove that VM, or change the VM name pattern.") from None
            raise ScriptFailed(f"New-VM failed: {exc}; the copied VHDX was deleted.", exc.error_id) from None
        vm_id = str(made.get("Id") or "")
        if not vm_id:
            raise EnvironmentProblem(f"{client.host} made VM {name!r} but did not say its id; remove it by hand.")
        try:
            if cancel.cancelled:
                raise TaskCanceled("The delivery was cancelled; the VM and its VHDX were removed.")
            progress(COPY_SHARE + 5, f"Setting up VM {name}")
            client.run("configure-vm", {
                "Id": vm_id, "ProcessorCount": int(settings.option("vcpus", 2)),
                "Notes": f"Published by LayerDesk from template {sidecar.template} (revision "
                         f"{sidecar.template_revision}); image checksum {sidecar.checksum}.",
            })
            if cancel.cancelled:
                raise TaskCanceled("The delivery was cancelled; the VM and its VHDX were removed.")
        except BaseException as exc:
            try:
                client.run("remove-vm", {"Id": vm_id})
            except Exception as cleanup:  # noqa: BLE001 - the first failure is the one to report
                log.error("could not remove the half-made VM %s (%s) on %s: %s", name, vm_id, client.host, cleanup)
                raise EnvironmentProblem(f"Setting up VM {name!r} failed ({exc}) and removing it failed too "
                                         f"({cleanup}); remove VM {vm_id} and {vhd_path} by hand.") from None
            if isinstance(exc, ScriptFailed):
                raise ScriptFailed(f"Setting up the VM failed: {exc}; the VM and its VHDX were removed.",
                                   exc.error_id) from None
            raise
        return vm_id
