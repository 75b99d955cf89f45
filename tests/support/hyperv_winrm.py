"""A WinRM (WS-Management) endpoint on a real local HTTPS socket that answers from the recorded exchanges in
``tests/connectors/recordings/hyperv``: Create (a shell), Command, Receive, Signal and Delete envelopes, a
401 for a wrong password, and the recorded output streams of each LayerDesk PowerShell script.

It reads what pywinrm really sends (the SOAP envelope, the ``-EncodedCommand`` argument, the script's
Base64 JSON parameters), keeps the state a host would (open shells, the VMs made and removed) so a test can
ask for the final state, and logs every exchange. Also a small test CA (:func:`make_test_ca`) for the
TLS of this and the other recorded peers.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import re
import ssl
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from string import Template
from typing import Any
from xml.etree import ElementTree as ET
from xml.sax.saxutils import escape

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

RECORDINGS = Path(__file__).resolve().parents[1] / "connectors" / "recordings" / "hyperv"
NS = {
    "env": "http://www.w3.org/2003/05/soap-envelope",
    "a": "http://schemas.xmlsoap.org/ws/2004/08/addressing",
    "w": "http://schemas.dmtf.org/wbem/wsman/1/wsman.xsd",
    "rsp": "http://schemas.microsoft.com/wbem/wsman/1/windows/shell",
}
SHELL_URI = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/cmd"
ACTIONS = {
    "http://schemas.xmlsoap.org/ws/2004/09/transfer/Create": "Create",
    "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/Command": "Command",
    "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/Receive": "Receive",
    "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/Signal": "Signal",
    "http://schemas.xmlsoap.org/ws/2004/09/transfer/Delete": "Delete",
}


# --- a test CA --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TestCA:
    __test__ = False

    ca_file: Path
    cert_file: Path
    key_file: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context


def make_test_ca(folder: Path, names: tuple[str, ...] = ("localhost", "127.0.0.1")) -> TestCA:
    """A CA and a server certificate it issued for ``names`` (DNS names or IP addresses), as PEM files."""
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "LayerDesk Test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    alt: list[x509.GeneralName] = []
    for name in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt.append(x509.DNSName(name))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])).issuer_name(ca_name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    ca_file, cert_file, key_file = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return TestCA(ca_file, cert_file, key_file)


@contextmanager
def serving(handler: type[BaseHTTPRequestHandler], ca: TestCA, owner: Any) -> Iterator[ThreadingHTTPServer]:
    """``handler`` on 127.0.0.1 (a free port) over TLS with ``ca``'s server certificate; ``server.owner``
    is ``owner``. Stopped and closed on exit."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    context = ca.server_context()
    server.socket = context.wrap_socket(server.socket, server_side=True)
    server.owner = owner  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


# --- the recorded WinRM host ------------------------------------------------------------------------


@dataclass
class Exchange:
    """One request the endpoint answered: its WS-Man action, and for a Command the script and parameters."""

    action: str
    status: int
    script: str = ""
    params: dict[str, Any] = field(default_factory=dict)


def _template(name: str) -> Template:
    return Template((RECORDINGS / name).read_text(encoding="utf-8").strip())


class RecordedHyperVHost:
    """The recorded Hyper-V host. Set ``outcomes[script] = "name-in-use"`` (a key of ``commands.json``) to
    answer a script with another recorded outcome than ``ok``/``found``; ``vms`` is the host's VMs by id."""

    def __init__(self, username: str, password: str) -> None:
        self.username, self.password = username, password
        self.commands: dict[str, dict[str, dict[str, Any]]] = json.loads(
            (RECORDINGS / "commands.json").read_text(encoding="utf-8"))
        self.outcomes: dict[str, str] = {}
        self.exchanges: list[Exchange] = []
        self.vms: dict[str, str] = {}
        self.shells: set[str] = set()
        self._running: dict[str, dict[str, Any]] = {}
        self.on_command: Callable[[str, dict[str, Any]], None] | None = None
        self._lock = threading.Lock()

    @property
    def scripts_run(self) -> list[str]:
        return [e.script for e in self.exchanges if e.action == "Command"]

    def outcome(self, script: str) -> dict[str, Any]:
        default = "found" if script == "get-vmswitch" else "ok"
        return self.commands[script][self.outcomes.get(script, default)]

    # A request, as the handler hands it over: (status, headers, body).
    def answer(self, headers: Any, body: bytes, client_ip: str) -> tuple[int, list[tuple[str, str]], bytes]:
        expected = "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        if headers.get("Authorization") != expected:
            self.exchanges.append(Exchange("unauthorized", 401))
            status_line, *lines = (RECORDINGS / "unauthorized.http").read_text().strip().splitlines()
            return int(status_line.split()[1]), [tuple(line.split(": ", 1)) for line in lines], b""  # type: ignore[misc]
        if not headers.get("Content-Type", "").startswith("application/soap+xml"):
            return 415, [], b""
        envelope = ET.fromstring(body)
        header = envelope.find("env:Header", NS)
        assert header is not None
        action = ACTIONS.get(header.findtext("a:Action", "", NS), "")
        message_id = header.findtext("a:MessageID", "", NS)
        assert header.findtext("w:ResourceURI", "", NS) == SHELL_URI
        selector = header.find("w:SelectorSet/w:Selector[@Name='ShellId']", NS)
        shell_id = selector.text if selector is not None else None
        values = {"message_id": str(uuid.uuid4()).upper(), "relates_to": message_id, "client_ip": client_ip,
                  "address": "https://hv1.lab.test:5986/wsman"}
        with self._lock:
            if action != "Create" and shell_id not in self.shells:
                self.exchanges.append(Exchange(action, 500))
                return self._reply(500, "fault.xml", values | {"shell_id": shell_id or ""})
            if action == "Create":
                shell_id = str(uuid.uuid4()).upper()
                self.shells.add(shell_id)
                self.exchanges.append(Exchange(action, 200))
                return self._reply(200, "create.xml", values | {"shell_id": shell_id})
            if action == "Command":
                return self._command(envelope, shell_id or "", values)
            if action == "Receive":
                stream = envelope.find("env:Body/rsp:Receive/rsp:DesiredStream", NS)
                command_id = stream.get("CommandId", "") if stream is not None else ""
                output = self._running[command_id]
                self.exchanges.append(Exchange(action, 200, output["script"]))
                return self._reply(200, "receive.xml", values | {
                    "command_id": command_id, "exit_code": output["exit_code"],
                    "stdout": base64.b64encode(output["stdout"].encode("utf-8")).decode(),
                    "stderr": base64.b64encode(output["stderr"].encode("utf-8")).decode()})
            if action == "Signal":
                self.exchanges.append(Exchange(action, 200))
                return self._reply(200, "signal.xml", values)
            if action == "Delete":
                self.shells.discard(shell_id or "")
                self.exchanges.append(Exchange(action, 200))
                return self._reply(200, "delete.xml", values)
        raise AssertionError(f"a WS-Man action the recording does not have: {header.findtext('a:Action', '', NS)}")

    def _command(self, envelope: ET.Element, shell_id: str,
                 values: dict[str, Any]) -> tuple[int, list[tuple[str, str]], bytes]:
        command = envelope.find("env:Body/rsp:CommandLine", NS)
        assert command is not None and command.findtext("rsp:Command", "", NS) == "powershell.exe"
        # pywinrm sends the arguments as one space-separated rsp:Arguments element.
        arguments = " ".join(a.text or "" for a in command.findall("rsp:Arguments", NS)).split()
        script = base64.b64decode(arguments[arguments.index("-EncodedCommand") + 1]).decode("utf-16-le")
        name = script.splitlines()[0].removeprefix("# layerdesk:")
        payload = re.search(r"FromBase64String\('([A-Za-z0-9+/=]*)'\)", script)
        assert payload is not None
        params: dict[str, Any] = json.loads(base64.b64decode(payload[1]).decode("utf-8"))
        self.exchanges.append(Exchange("Command", 200, name, params))
        if self.on_command is not None:
            self.on_command(name, params)
        recorded = self.outcome(name)
        vm_id = params.get("Id") or str(uuid.uuid4())
        vm_name = str(params.get("Name") or self.vms.get(str(vm_id), ""))
        fill = {"vm_id": vm_id, "vm_name_json": json.dumps(vm_name)[1:-1], "vm_name_xml": escape(vm_name),
                "generation": params.get("Generation", ""), "processors": params.get("ProcessorCount", "")}
        output = {"script": name, "exit_code": recorded["exit_code"],
                  "stdout": Template(recorded["stdout"]).safe_substitute(fill),
                  "stderr": Template(recorded["stderr"]).safe_substitute(fill)}
        # The host's state, as the recorded outcome left it.
        if name == "new-vm" and recorded["exit_code"] == 0:
            self.vms[vm_id] = vm_name
        if name == "remove-vm" and recorded["exit_code"] == 0:
            self.vms.pop(str(params["Id"]), None)
        command_id = str(uuid.uuid4()).upper()
        self._running[command_id] = output
        return self._reply(200, "command.xml", values | {"command_id": command_id, "shell_id": shell_id})

    @staticmethod
    def _reply(status: int, name: str, values: dict[str, Any]) -> tuple[int, list[tuple[str, str]], bytes]:
        body = _template(name).substitute(values).encode("utf-8")
        return status, [("Content-Type", "application/soap+xml;charset=UTF-8"),
                        ("Server", "Microsoft-HTTPAPI/2.0")], body


class _WinRMHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        if self.path != "/wsman":
            self.send_error(404)
            return
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        host: RecordedHyperVHost = self.server.owner  # type: ignore[attr-defined]
        status, headers, reply = host.answer(self.headers, body, self.client_address[0])
        self.send_response(status)
        for key, value in headers:
            if key != "Content-Length":
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def recorded_hyperv(ca: TestCA, username: str, password: str) -> Iterator[tuple[RecordedHyperVHost, int]]:
    """The recorded host and its HTTPS port on 127.0.0.1."""
    host = RecordedHyperVHost(username, password)
    with serving(_WinRMHandler, ca, host) as server:
        yield host, server.server_address[1]
