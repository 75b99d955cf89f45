r"""The Citrix Provisioning (PVS) connector: a published VHD/VHDX pulled into a vDisk store by the agent.

As with App Layering's connector, the image is not pushed: LayerDesk serves it (:mod:`transfer_server`,
port 3009 over HTTP or 3509 over HTTPS, one unguessable URL, listening only during the transfer) and
asks the Provisioning server to pull it with BITS into the store's folder. The Provisioning server is
driven over WinRM (pywinrm; NTLM or Kerberos, or basic authentication over HTTPS only) with short
PowerShell scripts, one per step of the agent protocol:

``check``   the site and store exist (the store's path), the post-publish script exists;
``start``   refuse a vDisk name or file that exists already (a clash), start the BITS download;
``poll``    the BITS job's state and bytes (completed once transferred);
``create``  the vDisk (disk locator) for the transferred file in the named store and site;
``script``  the connector's optional post-publish script, given the publish's variables as named
            parameters (``param($VDiskName, $StoreName, …)``; those the script declares);
``cleanup`` after a failure or a cancel: the BITS job removed, the disk locator and the (partial) file
            deleted.

Values never become PowerShell code: each script is fixed text, and its values travel as one base64
string of JSON that the script decodes (base64 cannot close the quoted string it sits in); the
post-publish script gets them by splatting a hashtable. Results come back the same way (one
``LAYERDESK-RESULT <base64 JSON>`` line), so the shell's code page cannot garble them.

The vDisk is named like App Layering names it: the template's name and the publish's UTC date and time
(``Win11-Office_20250301T101500Z``). The password goes to pywinrm only; TLS certificates are verified
unless the connector turns that off (logged as a warning).
"""

from __future__ import annotations

import base64
import contextlib
import html
import json
import logging
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

import requests
from winrm import transport as winrm_transport
from winrm.exceptions import (
    InvalidCredentialsError,
    WinRMError,
    WinRMTransportError,
    WSManFaultError,
)
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
from app.connectors.folder import delivered_names
from app.connectors.transfer_server import DEFAULT_HTTP_PORT, DEFAULT_HTTPS_PORT, TransferServer, tls_context
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

RESULT_MARK = "LAYERDESK-RESULT "
#: The Provisioning server must reach the transfer server, so it listens on every address unless told.
ALL_ADDRESSES = "0.0.0.0"  # noqa: S104
#: The connector's authentication choice → pywinrm's transport.
_AUTH_METHODS: dict[str, Literal["ntlm", "kerberos", "basic"]] = {"ntlm": "ntlm", "kerberos": "kerberos",
                                                                  "basic": "basic"}
#: A Windows command line holds 32767 characters (the command runs without cmd.exe, whose limit is 8191);
#: the encoded script must fit in it with room to spare.
MAX_COMMAND_CHARS = 32000
#: BITS job states (BG_JOB_STATE) that mean the download is still on its way.
_RUNNING_STATES = {"Queued", "Connecting", "Transferring", "TransientError", "Suspended"}
#: The publish's variables handed to the post-publish script, as its parameters.
SCRIPT_VARIABLES = ("ConnectorName", "VDiskName", "VDiskPath", "StoreName", "SiteName", "ImageName", "TemplateName",
                    "TemplateRevision", "ImageFormat", "ImageChecksum", "PublishedBy", "PublishedAt")

# --- the agent's PowerShell -----------------------------------------------------------------------------

_PRELUDE = r"""$ErrorActionPreference = 'Stop'; $ProgressPreference = 'SilentlyContinue'
$p = [Text.Encoding]::UTF8.GetString([Convert]::FromBase64String('@DATA@')) | ConvertFrom-Json
function Out-Result($o) {
  $json = $o | ConvertTo-Json -Compress -Depth 4
  'LAYERDESK-RESULT ' + [Convert]::ToBase64String([Text.Encoding]::UTF8.GetBytes($json)) }
function Fail($kind, $text, $code) { Out-Result @{error = $kind; message = [string]$text}; exit $code }
"""
_PVS = r"""if (-not (Get-Command Get-PvsSite -ErrorAction SilentlyContinue)) {
  Import-Module (Join-Path $env:ProgramFiles 'Citrix\Provisioning Services Console\Citrix.PVS.SnapIn.dll') }
"""
SCRIPTS: dict[str, str] = {
    "check": _PVS + r"""$r = @{host = $env:COMPUTERNAME; powershell = $PSVersionTable.PSVersion.ToString()}
try { $null = Get-PvsSite -SiteName $p.site } catch { Fail 'no_site' $_.Exception.Message 2 }
try { $s = Get-PvsStore -StoreName $p.store } catch { Fail 'no_store' $_.Exception.Message 2 }
$r.store_path = $s.Path
if ($p.script) { $r.script = [bool](Test-Path -LiteralPath $p.script -PathType Leaf) }
Out-Result $r
""",
    "start": _PVS + r"""try { $s = Get-PvsStore -StoreName $p.store } catch { Fail 'no_store' $_.Exception.Message 2 }
$dest = Join-Path $s.Path ($p.name + $p.ext)
$old = $null; try { $old = Get-PvsDiskLocator -DiskLocatorName $p.name -SiteName $p.site -StoreName $p.store } catch { }
if ($old -or (Test-Path -LiteralPath $dest)) { Fail 'clash' ('vDisk ' + $p.name + ' exists: ' + $dest) 3 }
$job = Start-BitsTransfer -Source $p.url -Destination $dest -Asynchronous -Priority Foreground `
  -DisplayName ('LayerDesk ' + $p.name)
Out-Result @{job = $job.JobId.ToString(); destination = $dest}
""",
    "poll": r"""$j = Get-BitsTransfer -JobId $p.job -ErrorAction SilentlyContinue
if (-not $j) { Out-Result @{state = 'Missing'}; exit 0 }
$state = [string]$j.JobState
$r = @{state = $state; bytes = $j.BytesTransferred; total = $j.BytesTotal; error = [string]$j.ErrorDescription}
if ($state -eq 'Transferred') { Complete-BitsTransfer -BitsJob $j }
Out-Result $r
""",
    "create": _PVS + r"""try { $d = New-PvsDiskLocator -Name $p.name -StoreName $p.store -SiteName $p.site `
  -VHDX:([bool]$p.vhdx) }
catch { $m = $_.Exception.Message; if ($m -match 'exist') { Fail 'clash' $m 3 }; Fail 'create' $m 4 }
Out-Result @{id = [string]$d.DiskLocatorId; name = $d.Name}
""",
    "script": r"""if (-not (Test-Path -LiteralPath $p.script -PathType Leaf)) {
  Fail 'no_script' ('No script ' + $p.script) 2 }
$cmd = Get-Command -Name $p.script -CommandType ExternalScript
$named = @{}
foreach ($v in $p.vars.PSObject.Properties) {
  if ($cmd.Parameters.ContainsKey($v.Name)) { $named[$v.Name] = $v.Value } }
$global:LASTEXITCODE = 0
try { $out = & $p.script @named 2>&1 | Out-String } catch { Fail 'script' ($_ | Out-String) 4 }
Out-Result @{output = $out; exit = $LASTEXITCODE}
""",
    "cleanup": _PVS + r"""$done = @()
if ($p.job) { $j = Get-BitsTransfer -JobId $p.job -ErrorAction SilentlyContinue
  if ($j) { $j | Remove-BitsTransfer; $done += 'job' } }
if ($p.locator) { try {
  Remove-PvsDiskLocator -DiskLocatorName $p.name -SiteName $p.site -StoreName $p.store -DeleteDiskFile
  $done += 'vdisk' } catch { } }
foreach ($f in @($p.destination, [IO.Path]::ChangeExtension($p.destination, '.pvp'))) {
  if ($f -and (Test-Path -LiteralPath $f)) { Remove-Item -LiteralPath $f -Force; $done += $f } }
Out-Result @{removed = $done}
""",
}


def encode_script(kind: str, values: dict[str, Any]) -> str:
    """The PowerShell text of step ``kind`` with ``values`` as its data (never as code)."""
    data = base64.b64encode(json.dumps(values, ensure_ascii=False).encode("utf-8")).decode("ascii")
    return f"# layerdesk-pvs: {kind}\n" + _PRELUDE.replace("@DATA@", data) + SCRIPTS[kind]


def powershell_arguments(script: str) -> list[str]:
    """The ``powershell.exe`` arguments that run ``script`` (``-EncodedCommand``: UTF-16LE base64)."""
    encoded = base64.b64encode(script.encode("utf-16-le")).decode("ascii")
    if len(encoded) > MAX_COMMAND_CHARS:
        raise UserError("The values for the Provisioning server are too long to pass in one command (a very long "
                        "script path or names); shorten them.")
    return ["-NoProfile", "-NonInteractive", "-ExecutionPolicy", "Bypass", "-EncodedCommand", encoded]


def _clixml_text(stderr: bytes) -> str:
    """PowerShell's error stream (CLIXML when run over WinRM) as plain text."""
    text = stderr.decode("utf-8", "replace")
    if text.startswith("#< CLIXML"):
        parts = re.findall(r'<S S="Error">(.*?)</S>', text, flags=re.DOTALL)
        text = "".join(html.unescape(p).replace("_x000D__x000A_", "\n") for p in parts)
    return text.strip()


class StoreFull(UserError):
    """The vDisk store's disk has no room for the vDisk (BITS stopped with ERROR_DISK_FULL)."""


def _disk_full(error: str) -> bool:
    """Whether a BITS job's error text is ERROR_DISK_FULL / ERROR_HANDLE_DISK_FULL (0x80070070 / 0x80070027)."""
    text = error.lower()
    return "not enough space on the disk" in text or "disk is full" in text or "0x80070070" in text \
        or "0x80070027" in text


def vdisk_name(sidecar: ImageSidecar, image: Path) -> str:
    """The vDisk's name: the template's name (characters PVS and Windows file names accept) and the time."""
    stem = Path(delivered_names(sidecar, image)[0]).stem
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-.") or "LayerDesk"


def winrm_url(endpoint: str, auth: str) -> str:
    """The WinRM service URL of ``endpoint`` (a host name or a URL); basic authentication means HTTPS."""
    endpoint = endpoint.strip()
    if "://" not in endpoint:
        https = auth == "basic"
        return f"{'https' if https else 'http'}://{endpoint}:{5986 if https else 5985}/wsman"
    parts = urlsplit(endpoint)
    return endpoint if parts.path not in ("", "/") else f"{parts.scheme}://{parts.netloc}/wsman"


@dataclass(frozen=True)
class AgentResult:
    """What one step's script answered: its exit code and its result object."""

    exit_code: int
    data: dict[str, Any]
    errors: str

    @property
    def error(self) -> str | None:
        value = self.data.get("error")
        return str(value) if value else None


class AgentSession:
    """The Provisioning server over WinRM: :meth:`run` one step's script at a time."""

    def __init__(self, settings: ConnectorSettings, password: str | None) -> None:
        auth = str(settings.option("auth", "ntlm"))
        self.url = winrm_url(settings.endpoint, auth)
        self.host = urlsplit(self.url).hostname or settings.endpoint
        if auth == "basic" and not self.url.startswith("https://"):
            raise ValidationError("Basic authentication sends the password readable; use it only with an https:// "
                                  "WinRM endpoint (port 5986), or choose NTLM or Kerberos.", field="auth")
        if not settings.verify_tls and self.url.startswith("https://"):
            log.warning("TLS certificate verification is off for connector %s: anyone on the path to %s can "
                        "pose as it.", settings.name, self.host)
        ca_file = settings.option("ca_file")
        if ca_file and not Path(str(ca_file)).is_file():
            raise NotFound(f"The CA certificate file {ca_file} does not exist; correct the connector's CA file.")
        if auth == "kerberos" and not winrm_transport.HAVE_KERBEROS:
            raise EnvironmentProblem("Kerberos authentication needs pykerberos (pip install pywinrm[kerberos]); "
                                     "or choose NTLM.")
        if not password and auth != "kerberos":
            raise AuthenticationFailed(f"No password is stored for connector {settings.name}; set it with "
                                       f"layerctl connector set-password {settings.name}.")
        try:
            self._protocol = Protocol(
                self.url, transport=_AUTH_METHODS[auth], username=settings.username, password=password or "",
                server_cert_validation="validate" if settings.verify_tls else "ignore",
                # An explicit CA file, or the bundled roots: never a CA path from the environment.
                ca_trust_path=str(ca_file) if ca_file else None,  # type: ignore[arg-type]
                proxy=None,
                read_timeout_sec=60, operation_timeout_sec=30)
        except WinRMError as exc:
            raise UserError(f"The WinRM settings of connector {settings.name} cannot be used: {exc}") from None
        self.username = settings.username

    def run(self, kind: str, values: dict[str, Any]) -> AgentResult:
        """Run step ``kind`` with ``values``; its result. WinRM failures become clear errors."""
        arguments = powershell_arguments(encode_script(kind, values))
        protocol = self._protocol
        try:
            shell = protocol.open_shell(codepage=65001, noprofile=True)
            try:
                command = protocol.run_command(shell, "powershell.exe", arguments, skip_cmd_shell=True)
                try:
                    stdout, stderr, code = protocol.get_command_output(shell, command)
                finally:
                    with contextlib.suppress(WinRMError, requests.RequestException):
                        protocol.cleanup_command(shell, command)
            finally:
                with contextlib.suppress(WinRMError, requests.RequestException):
                    protocol.close_shell(shell, close_session=False)
        except InvalidCredentialsError:
            raise AuthenticationFailed(
                f"{self.host} refused the credentials of {self.username} (HTTP 401). Check the user name and the "
                "connector's password; the account must be a Provisioning administrator and a local administrator "
                "on the server.") from None
        except WSManFaultError as exc:
            if exc.wsman_fault_code == 5:
                raise AuthenticationFailed(f"{self.host} denied {self.username} access to WinRM (access denied); the "
                                           "account must be a local administrator there.") from None
            raise EnvironmentProblem(f"The WinRM service of {self.host} refused the request: "
                                     f"{(exc.reason or '').strip()} (HTTP {exc.code}).") from None
        except WinRMTransportError as exc:
            raise EnvironmentProblem(f"The WinRM service of {self.host} answered HTTP {exc.code}.") from None
        except WinRMError as exc:
            raise EnvironmentProblem(f"WinRM to {self.host} failed: {exc}.") from None
        except requests.exceptions.SSLError as exc:
            raise EnvironmentProblem(
                f"The TLS certificate of {self.host} could not be verified ({_reason(exc)}); give the CA file that "
                "signed it in the connector (or, knowingly, turn verification off).") from None
        except requests.RequestException as exc:
            raise EnvironmentProblem(f"Cannot reach {self.host} over WinRM ({_reason(exc)}). Check that the server "
                                     "is up and WinRM listens on it (winrm quickconfig).") from None
        data: dict[str, Any] = {}
        for line in stdout.decode("utf-8", "replace").splitlines():
            if line.startswith(RESULT_MARK):
                with contextlib.suppress(ValueError):
                    data = json.loads(base64.b64decode(line[len(RESULT_MARK):].strip()).decode("utf-8"))
        errors = _clixml_text(stderr)
        if not data and code != 0:
            raise EnvironmentProblem(f"PowerShell on {self.host} failed ({kind}, exit code {code}): "
                                     f"{errors or 'no message'}")
        log.info("pvs %s on %s: exit %d", kind, self.host, code)
        return AgentResult(code, data, errors)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._protocol.transport.close_session()


def _reason(exc: Exception) -> str:
    """A requests error in a few words (its innermost cause, without the URL)."""
    inner: BaseException = exc
    while inner.__context__ is not None and inner.__context__ is not inner:
        inner = inner.__context__
    text = str(inner) or type(inner).__name__
    return text.split(": ", 1)[-1][:200]


def _local_address_toward(host: str) -> str:
    """This machine's address on the route to ``host`` (what the Provisioning server can reach it at)."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((host, 9))  # UDP: nothing is sent, only the route is chosen
            return str(probe.getsockname()[0])
    except OSError:
        return socket.getfqdn()


class PvsConnector(Connector):
    type: ClassVar[str] = "pvs"
    title: ClassVar[str] = "Citrix Provisioning"
    fields: ClassVar[tuple[ConfigField, ...]] = (
        ConfigField("endpoint", "Provisioning server", required=True,
                    help="the PVS server's host name, or its WinRM URL (https://pvs1.lab.test:5986/wsman)"),
        ConfigField("username", "User name", required=True,
                    help=r"DOMAIN\user: a PVS administrator and a local administrator on the server"),
        ConfigField("password", "Password", secret=True, help="the account's password"),
        ConfigField("verify_tls", "Verify TLS certificates", FieldKind.FLAG, default=True,
                    help="for an https:// WinRM endpoint; leave on unless the certificate cannot be checked"),
        ConfigField("auth", "WinRM authentication", FieldKind.CHOICE, default="ntlm",
                    choices=("ntlm", "kerberos", "basic"), help="basic only over https://"),
        ConfigField("ca_file", "CA certificate file", FieldKind.PATH,
                    help="PEM file of the CA that signed the WinRM certificate (empty: the system's)"),
        ConfigField("site", "PVS site", required=True, help="the site the vDisk is added to"),
        ConfigField("store", "PVS store", required=True, help="the store the vDisk is written to"),
        ConfigField("script", "Post-publish script", help=r"a PowerShell script on the PVS server "
                    r"(C:\Scripts\published.ps1), run after the vDisk is created with the publish's variables as "
                    "named parameters: " + ", ".join(SCRIPT_VARIABLES)),
        ConfigField("transfer_https", "Transfer over HTTPS", FieldKind.FLAG, default=False,
                    help="serve the disk over HTTPS (the PVS server must trust the certificate) instead of HTTP"),
        ConfigField("transfer_certificate", "Transfer certificate", FieldKind.PATH,
                    help="PEM certificate for HTTPS transfers"),
        ConfigField("transfer_key", "Transfer certificate key", FieldKind.PATH,
                    help="its PEM key (empty: in the certificate file)"),
        ConfigField("transfer_host", "LayerDesk address", help="the name or address the PVS server reaches "
                    "LayerDesk at (empty: this machine's address on the route to it)"),
        ConfigField("transfer_bind", "Listen address", default=ALL_ADDRESSES,
                    help="the local address the transfer server listens on"),
        ConfigField("http_port", "HTTP transfer port", FieldKind.NUMBER, default=DEFAULT_HTTP_PORT, minimum=0,
                    maximum=65535),
        ConfigField("https_port", "HTTPS transfer port", FieldKind.NUMBER, default=DEFAULT_HTTPS_PORT, minimum=0,
                    maximum=65535),
        ConfigField("transfer_timeout_min", "Transfer time limit (minutes)", FieldKind.NUMBER, default=240,
                    minimum=1, maximum=7 * 24 * 60),
    )

    def __init__(self, *, poll_interval_s: float = 2.0, contact_retries: int = 3) -> None:
        #: How often the agent is asked how the transfer is going, and how many failed asks in a row are
        #: taken for a lost server (BITS itself keeps going through short outages).
        self.poll_interval_s = poll_interval_s
        self.contact_retries = contact_retries

    def check_endpoint(self, endpoint: str) -> None:
        if "://" in endpoint:
            parts = urlsplit(endpoint)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValidationError(f"{endpoint!r} is not a WinRM URL; write the server's host name or a URL like "
                                      "https://pvs1.lab.test:5986/wsman.", field="endpoint")
        elif not re.fullmatch(r"[A-Za-z0-9.\-]+(:\d+)?|\[[0-9A-Fa-f:]+\]", endpoint):
            raise ValidationError(f"{endpoint!r} is not a host name; write the PVS server's name (pvs1.lab.test).",
                                  field="endpoint")

    # --- test -------------------------------------------------------------------------------------------

    def test(self, settings: ConnectorSettings, password: str | None) -> TestReport:
        steps = TestSteps(settings.name)
        found: dict[str, Any] = {}
        sessions: list[AgentSession] = []

        def connect() -> str:
            self.check_endpoint(settings.endpoint.strip())
            session = AgentSession(settings, password)
            sessions.append(session)
            result = session.run("check", {"site": settings.option("site"), "store": settings.option("store"),
                                           "script": settings.option("script")})
            found.update(result.data)
            warning = "" if settings.verify_tls else " (TLS certificates are NOT verified)"
            return f"ran PowerShell {found.get('powershell', '?')} on {found.get('host', session.host)}{warning}"

        def store() -> str:
            if found.get("error") == "no_site":
                raise NotFound(f"The Provisioning farm has no site {settings.option('site')!r} "
                               f"({found.get('message', '')}); correct the connector's site.")
            if found.get("error") == "no_store":
                raise NotFound(f"The Provisioning farm has no store {settings.option('store')!r} "
                               f"({found.get('message', '')}); correct the connector's store.")
            return f"site {settings.option('site')} and store {settings.option('store')} at {found.get('store_path')}"

        def transfer() -> str:
            with self._transfer_server(settings, Path(__file__)) as server:
                return f"LayerDesk can listen on port {server.port} ({server.scheme})"

        def script() -> str:
            if not found.get("script"):
                raise NotFound(f"The post-publish script {settings.option('script')} is not on the Provisioning "
                               "server; copy it there or correct the path.")
            return f"{settings.option('script')} exists"

        try:
            steps.run("connect", connect)
            steps.run("site and store", store)
            steps.run("transfer port", transfer)
            if settings.option("script"):
                steps.run("post-publish script", script)
            else:
                steps.skip("post-publish script", "no post-publish script configured")
        finally:
            for session in sessions:
                session.close()
        return steps.report()

    # --- deliver ----------------------------------------------------------------------------------------

    def _transfer_server(self, settings: ConnectorSettings, image: Path, checksum: str | None = None,
                         name: str | None = None) -> TransferServer:
        bind = str(settings.option("transfer_bind", ALL_ADDRESSES))
        if settings.option("transfer_https", False):
            certificate = settings.option("transfer_certificate")
            if not certificate:
                raise ValidationError("HTTPS transfers need the transfer certificate (a PEM file the Provisioning "
                                      "server trusts); give it or turn HTTPS transfers off.",
                                      field="transfer_certificate")
            key = settings.option("transfer_key")
            context = tls_context(Path(str(certificate)), Path(str(key)) if key else None)
            return TransferServer(image, bind=bind, port=int(settings.option("https_port", DEFAULT_HTTPS_PORT)),
                                  tls=context, checksum=checksum, name=name)
        return TransferServer(image, bind=bind, port=int(settings.option("http_port", DEFAULT_HTTP_PORT)),
                              checksum=checksum, name=name)

    def deliver(self, image: Path, sidecar: ImageSidecar, settings: ConnectorSettings, password: str | None,
                progress: DeliveryProgress, cancel: Cancellable) -> DeliveryResult:
        extension = image.suffix.lower()
        if extension not in (".vhd", ".vhdx"):
            raise UserError(f"Citrix Provisioning takes VHD or VHDX vDisks, not {image.name}; publish the template "
                            "as VHDX (or VHD) for this connector.")
        self.check_endpoint(settings.endpoint.strip())
        name = vdisk_name(sidecar, image)
        site, store = str(settings.option("site", "")), str(settings.option("store", ""))
        started = time.monotonic()
        session = AgentSession(settings, password)
        try:
            host = str(settings.option("transfer_host") or _local_address_toward(session.host))
            with self._transfer_server(settings, image, sidecar.checksum, name + extension) as server:
                progress(0.0, f"Asking {session.host} to download vDisk {name}")
                begun = session.run("start", {"url": server.url(host), "site": site, "store": store, "name": name,
                                              "ext": extension})
                self._refuse(begun, session, name, store)
                job, destination = str(begun.data["job"]), str(begun.data["destination"])
                state = {"job": job, "destination": destination, "name": name, "site": site, "store": store,
                         "locator": False}
                try:
                    self._await_transfer(session, job, image.stat().st_size, settings, progress, cancel)
                    server.stop()  # the file is on the Provisioning server: stop listening at once
                    progress(90.0, f"Creating vDisk {name} in store {store}")
                    created = session.run("create", {"name": name, "site": site, "store": store,
                                                     "vhdx": extension == ".vhdx"})
                    self._refuse(created, session, name, store)
                    state["locator"] = True
                    if cancel.cancelled:
                        raise TaskCanceled("cancelled")
                    output = self._post_publish(session, settings, sidecar, name, destination, site, store, progress)
                except BaseException as exc:
                    self._clean_up(session, state, exc)
                    raise
        finally:
            session.close()
        ids = {"vdisk": name, "disk_locator_id": str(created.data.get("id", "")), "site": site, "store": store,
               "path": destination, "bits_job": job}
        if output is not None:
            ids["script_output"] = output[-2000:]
        return DeliveryResult(settings.name, self.type, f"{session.host}: vDisk {name} in store {store} ({site})",
                              ids, image.stat().st_size, time.monotonic() - started)

    @staticmethod
    def _refuse(result: AgentResult, session: AgentSession, name: str, store: str) -> None:
        """Raise the clear error a step's ``error`` answer stands for."""
        error = result.error
        if error is None:
            return
        message = str(result.data.get("message", "")).strip()
        if error == "clash":
            raise Conflict(f"Store {store!r} on {session.host} already has a vDisk {name!r} ({message}); it was "
                           "left alone. Remove or rename it there, or publish again in a minute.")
        if error in ("no_store", "no_site"):
            what = "store" if error == "no_store" else "site"
            raise NotFound(f"The Provisioning farm has no {what} named in the connector ({message}); correct the "
                           f"connector's {what}.")
        raise EnvironmentProblem(f"{session.host} could not {error} vDisk {name}: {message or result.errors}")

    def _await_transfer(self, session: AgentSession, job: str, size: int, settings: ConnectorSettings,
                        progress: DeliveryProgress, cancel: Cancellable) -> None:
        """Poll the BITS job until the file is in the store; raises on failure, cancel, timeout or lost contact."""
        deadline = time.monotonic() + 60 * int(settings.option("transfer_timeout_min", 240))
        failures = 0
        while True:
            if cancel.cancelled:
                raise TaskCanceled("cancelled")
            try:
                polled = session.run("poll", {"job": job})
            except EnvironmentProblem as exc:
                failures += 1
                log.warning("pvs: asking %s about the transfer failed (%d of %d): %s", session.host, failures,
                            self.contact_retries, exc)
                if failures >= self.contact_retries:
                    raise EnvironmentProblem(f"Lost contact with {session.host} during the transfer: {exc}") from None
                self._wait(cancel)
                continue
            failures = 0
            state = str(polled.data.get("state", ""))
            done, total = int(polled.data.get("bytes") or 0), int(polled.data.get("total") or 0) or size
            if state == "Transferred":
                progress(90.0, f"Transferred {size // 1024**2} MiB to {session.host}")
                return
            if state == "Error" and _disk_full(str(polled.data.get("error") or "")):
                raise StoreFull(f"The store {settings.option('store')!r} on {session.host} is full: BITS could not "
                                f"write the vDisk there after {done // 1024**2} of {total // 1024**2} MiB "
                                f"({str(polled.data.get('error')).strip()}). Free space in the store (or choose "
                                "another store) and publish again.")
            if state == "Error":
                raise EnvironmentProblem(f"BITS on {session.host} could not download the vDisk: "
                                         f"{polled.data.get('error') or 'no reason given'}. Check that it can reach "
                                         "LayerDesk on the transfer port.")
            if state not in _RUNNING_STATES:
                raise EnvironmentProblem(f"The transfer job on {session.host} ended without the file ({state}).")
            note = f" (BITS retries: {polled.data.get('error')})" if state == "TransientError" else ""
            progress(90.0 * min(done, total) / max(total, 1),
                     f"Transferred {done // 1024**2} of {total // 1024**2} MiB to {session.host}{note}")
            if time.monotonic() > deadline:
                raise EnvironmentProblem(f"The transfer to {session.host} took longer than the connector's "
                                         f"{settings.option('transfer_timeout_min', 240)} minutes.")
            self._wait(cancel)

    def _wait(self, cancel: Cancellable) -> None:
        """Sleep one poll interval, waking for a cancel within a tenth of a second."""
        until = time.monotonic() + self.poll_interval_s
        while time.monotonic() < until and not cancel.cancelled:
            time.sleep(min(0.1, self.poll_interval_s))

    @staticmethod
    def _post_publish(session: AgentSession, settings: ConnectorSettings, sidecar: ImageSidecar, name: str,
                      destination: str, site: str, store: str, progress: DeliveryProgress) -> str | None:
        script = settings.option("script")
        if not script:
            return None
        progress(95.0, f"Running the post-publish script {script}")
        variables = {"ConnectorName": settings.name, "VDiskName": name, "VDiskPath": destination, "StoreName": store,
                     "SiteName": site, "ImageName": sidecar.image, "TemplateName": sidecar.template,
                     "TemplateRevision": sidecar.template_revision, "ImageFormat": sidecar.format,
                     "ImageChecksum": sidecar.checksum or "", "PublishedBy": sidecar.created_by,
                     "PublishedAt": sidecar.created_at.isoformat()}
        ran = session.run("script", {"script": str(script), "vars": variables})
        if ran.error == "no_script":
            raise NotFound(f"The post-publish script {script} is not on {session.host}; copy it there or correct the "
                           "path. The vDisk was removed again.")
        if ran.error or ran.data.get("exit"):
            why = str(ran.data.get("message") or ran.data.get("output") or "").strip()[:2000]
            raise UserError(f"The post-publish script {script} failed on {session.host} (exit code "
                            f"{ran.data.get('exit') or 1}): {why or 'no message'}. The vDisk was removed again.")
        return str(ran.data.get("output", ""))

    @staticmethod
    def _clean_up(session: AgentSession, state: dict[str, Any], exc: BaseException) -> None:
        """Remove the BITS job, the disk locator and the file after ``exc``; say in ``exc`` what could not be."""
        try:
            result = session.run("cleanup", state)
            log.info("pvs: cleaned up on %s after %s: %s", session.host, type(exc).__name__,
                     result.data.get("removed"))
            left = None if result.exit_code == 0 else (result.errors or "the cleanup script failed")
        except LayerDeskError as problem:
            left = str(problem)
        if isinstance(exc, TaskCanceled):
            exc.args = (f"The delivery was cancelled; the transfer on {session.host} was stopped and the partial "
                        "vDisk deleted." if left is None else
                        f"The delivery was cancelled, but {session.host} could not be cleaned up ({left}): remove BITS "
                        f"job {state['job']} and {state['destination']} there.",)
        elif isinstance(exc, StoreFull) and left is None:
            exc.message = (f"{exc.message} The BITS job {state['job']} was removed on {session.host}, and with it "
                           "the partial file.")
            exc.args = (exc.message,)
        elif isinstance(exc, LayerDeskError) and left is not None:
            exc.message = (f"{exc.message} LayerDesk could not clean up on {session.host} ({left}): remove BITS job "
                           f"{state['job']}, the vDisk {state['name']} and {state['destination']} there.")
            exc.args = (exc.message,)
