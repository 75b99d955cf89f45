"""A WinRM (WS-Management) server that replays recorded exchanges of a Citrix Provisioning server.

Serves ``tests/connectors/recordings/pvs``: the response envelopes under ``envelopes/`` and one scenario
under ``scenarios/`` (what each of the connector's PowerShell steps answers, in order). It runs over
HTTPS with basic authentication on a real socket, so pywinrm and the connector run end to end: Shell
Create → Command → Receive → Signal → Delete per step, with the IDs, ``RelatesTo`` and base64 streams a
WinRM service sends. Every request is kept (:attr:`WinRMReplay.requests`) with its decoded PowerShell,
and the effects the steps declare (a BITS job, a file, a vDisk) are tracked in :attr:`WinRMReplay.state`,
the Provisioning server's state as the recording leaves it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import ssl
import subprocess
import threading
import urllib.request
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

RECORDINGS = Path(__file__).resolve().parents[1] / "connectors" / "recordings" / "pvs"
ACCOUNT = ("LAB\\pvsadmin", "Rec0rded-Pass!")
NS = {"s": "http://www.w3.org/2003/05/soap-envelope", "a": "http://schemas.xmlsoap.org/ws/2004/08/addressing",
      "w": "http://schemas.dmtf.org/wbem/wsman/1/wsman.xsd",
      "rsp": "http://schemas.microsoft.com/wbem/wsman/1/windows/shell"}
SHELL = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/"
TRANSFER = "http://schemas.xmlsoap.org/ws/2004/09/transfer/"


def make_certificate(folder: Path, name: str = "server") -> tuple[Path, Path]:
    """A self-signed certificate for localhost/127.0.0.1 and its key (PEM), made with openssl."""
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "2", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-addext", "basicConstraints=critical,CA:TRUE"], check=True, capture_output=True)
    return cert, key


@dataclass
class Request:
    """One request as the replay received it."""

    action: str
    body: bytes
    #: The PowerShell a Command ran (decoded from ``-EncodedCommand``), else ``""``.
    script: str = ""
    kind: str = ""


def decode_command(arguments: str) -> str:
    """The PowerShell text of ``powershell.exe … -EncodedCommand <base64 UTF-16LE>``."""
    encoded = arguments.split("-EncodedCommand", 1)[1].split()[0]
    return base64.b64decode(encoded).decode("utf-16-le")


def script_data(script: str) -> dict[str, Any]:
    """The values a step's script decodes (the base64 JSON in its prelude)."""
    match = re.search(r"FromBase64String\('([A-Za-z0-9+/=]*)'\)", script)
    assert match, script
    return dict(json.loads(base64.b64decode(match.group(1)).decode("utf-8")))


def _clixml(message: str) -> bytes:
    escaped = (message.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
               .replace("\n", "_x000D__x000A_"))
    return ('#< CLIXML\r\n<Objs Version="1.1.0.1" xmlns="http://schemas.microsoft.com/powershell/2004/04">'
            f'<S S="Error">{escaped}_x000D__x000A_</S></Objs>').encode()


def fetch_like_bits(url: str, context: ssl.SSLContext | None = None) -> str:
    """Download ``url`` the way BITS does (HEAD, then ranges, the later ones with ``If-Range``); its sha256."""
    with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), context=context, timeout=10) as head:
        size, etag = int(head.headers["Content-Length"]), head.headers["ETag"]
    digest, offset, step = hashlib.sha256(), 0, max(1, size // 3)
    while offset < size:
        last = min(size, offset + step) - 1
        ranged = urllib.request.Request(url, headers={"Range": f"bytes={offset}-{last}", "If-Range": etag})
        with urllib.request.urlopen(ranged, context=context, timeout=10) as answer:
            assert answer.status == 206, answer.status
            block = answer.read()
        digest.update(block)
        offset += len(block)
    return digest.hexdigest()


@dataclass
class WinRMReplay:
    """The replay server for one scenario; ``url`` is its WinRM endpoint once started."""

    scenario: str
    certificate: Path
    key: Path
    steps: list[dict[str, Any]] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    state: set[str] = field(default_factory=set)
    fetched: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    #: How the transfer server's certificate is checked when a step fetches over HTTPS.
    fetch_context: ssl.SSLContext | None = None

    def __post_init__(self) -> None:
        recorded = json.loads((RECORDINGS / "scenarios" / f"{self.scenario}.json").read_text())
        self.steps = list(recorded["steps"])
        self.create_fault: dict[str, Any] | None = recorded.get("create_fault")
        self._outputs: dict[str, tuple[bytes, bytes, int]] = {}
        self._lock = threading.Lock()
        replay = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                status, answer, extra = replay.answer(self.headers.get("Authorization", ""), body)
                if status == -1:  # the host goes down: no answer, and nothing listens any more
                    self.close_connection = True
                    threading.Thread(target=replay.stop, daemon=True).start()
                    return
                self.send_response(status)
                for name, value in extra:
                    self.send_header(name, value)
                if answer:
                    self.send_header("Content-Type", "application/soap+xml;charset=UTF-8")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(self.certificate), str(self.key))
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self._running = True

    @property
    def url(self) -> str:
        return f"https://localhost:{self._server.server_address[1]}/wsman"

    def stop(self) -> None:
        if self._running:
            self._running = False
            self._server.shutdown()
            self._server.server_close()

    @property
    def kinds(self) -> list[str]:
        """The connector's steps in the order they ran."""
        return [r.kind for r in self.requests if r.kind]

    # --- one exchange -------------------------------------------------------------------------------------

    def _envelope(self, name: str, **values: str) -> bytes:
        text = (RECORDINGS / "envelopes" / name).read_text().strip()
        values.setdefault("response_id", str(uuid.uuid4()).upper())
        for key, value in values.items():
            text = text.replace("{{" + key + "}}", value)
        return text.encode("utf-8")

    def answer(self, authorization: str, body: bytes) -> tuple[int, bytes, list[tuple[str, str]]]:
        with self._lock:
            return self._answer(authorization, body)

    def _answer(self, authorization: str, body: bytes) -> tuple[int, bytes, list[tuple[str, str]]]:
        expected = "Basic " + base64.b64encode(":".join(ACCOUNT).encode()).decode()
        if authorization != expected:
            self.requests.append(Request("(rejected)", body))
            return 401, b"", [("WWW-Authenticate", "Negotiate"), ("WWW-Authenticate", 'Basic realm="WSMAN"')]
        root = ET.fromstring(body)
        action = root.findtext("s:Header/a:Action", "", NS)
        relates = root.findtext("s:Header/a:MessageID", "", NS)
        request = Request(action, body)
        self.requests.append(request)
        shell_id = root.findtext("s:Header/w:SelectorSet/w:Selector", "", NS)
        if action == TRANSFER + "Create":
            if self.create_fault:
                return (int(self.create_fault["status"]), self._envelope(self.create_fault["envelope"],
                                                                         relates_to=relates), [])
            return 200, self._envelope("create_response.xml", relates_to=relates,
                                       shell_id=str(uuid.uuid4()).upper()), []
        if action == SHELL + "Command":
            arguments = root.findtext("s:Body/rsp:CommandLine/rsp:Arguments", "", NS)
            request.script = decode_command(arguments)
            request.kind = request.script.split("\n", 1)[0].removeprefix("# layerdesk-pvs: ").strip()
            if not self.steps:
                self.errors.append(f"unexpected step {request.kind}")
                return 500, b"", []
            step = self.steps.pop(0)
            if step["kind"] != request.kind:
                self.errors.append(f"expected step {step['kind']}, got {request.kind}")
            if step.get("host_down"):
                return -1, b"", []
            if step.get("fetch"):
                url = script_data(request.script)["url"]
                self.fetched[url] = fetch_like_bits(url, self.fetch_context)
            effect = step.get("effect", {})
            self.state |= set(effect.get("add", ()))
            self.state -= set(effect.get("remove", ()))
            stdout = b""
            if step.get("result") is not None:
                encoded = base64.b64encode(json.dumps(step["result"]).encode("utf-8")).decode()
                stdout = f"LAYERDESK-RESULT {encoded}\r\n".encode()
            stderr = _clixml(step["stderr"]) if step.get("stderr") else b""
            command_id = str(uuid.uuid4()).upper()
            self._outputs[command_id] = (stdout, stderr, int(step.get("exit_code", 0)))
            return 200, self._envelope("command_response.xml", relates_to=relates, command_id=command_id), []
        if action == SHELL + "Receive":
            command_id = root.find("s:Body/rsp:Receive/rsp:DesiredStream", NS).get("CommandId", "")  # type: ignore[union-attr]
            stdout, stderr, code = self._outputs.pop(command_id)
            streams = ""
            for name, data in (("stdout", stdout), ("stderr", stderr)):
                if data:
                    streams += (f'<rsp:Stream Name="{name}" CommandId="{command_id}">'
                                f"{base64.b64encode(data).decode()}</rsp:Stream>")
                streams += f'<rsp:Stream Name="{name}" CommandId="{command_id}" End="true"></rsp:Stream>'
            return 200, self._envelope("receive_response.xml", relates_to=relates, command_id=command_id,
                                       streams=streams, exit_code=str(code)), []
        if action == SHELL + "Signal":
            return 200, self._envelope("signal_response.xml", relates_to=relates), []
        if action == TRANSFER + "Delete":
            assert shell_id
            return 200, self._envelope("delete_response.xml", relates_to=relates), []
        self.errors.append(f"unexpected action {action}")
        return 500, b"", []
