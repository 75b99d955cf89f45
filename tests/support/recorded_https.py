"""A local HTTPS server that plays a recorded exchange back to the REST connectors (Nutanix, Azure).

The recording is a JSON file (format in ``tests/connectors/recordings/*/README.md``): a list of exchanges,
each the request the real server expects (method, path, query, headers, body) and the answer it gave.
The server listens on a real socket with a certificate issued by a CA made for the test session, so the
connector's own HTTP client, TLS verification included, runs end to end. Each request that arrives is
compared with the next expected one; a difference is kept in :attr:`RecordedServer.mismatches` and
answered with a 599, so the test both fails on the assertion and sees where the exchange went off script.

``{{name}}`` in a recording is replaced by the test's values (the server's own base URL, an expected
``Authorization`` header); ``"{{any}}"`` as an expected value matches anything that is present.

A test can make the host go away in the middle of an upload (:class:`HostDown`): the request's body is cut
off after a number of bytes and its connection reset without an answer; then either only that path stays
down (later requests to it are reset as they arrive, without taking a place in the recording: the storage
host is gone, the API host still answers the clean-up) or the whole server stops listening (every later
connection is refused: nothing can be cleaned up).
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

ANY = "{{any}}"


@dataclass(frozen=True)
class TestCA:
    """A CA made for the test session and a server certificate it issued for 127.0.0.1 / localhost."""

    __test__ = False

    ca_file: Path
    cert_file: Path
    key_file: Path


def make_test_ca(folder: Path) -> TestCA:
    """A fresh CA and server certificate in ``folder``, made with the openssl command."""
    folder.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=folder)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=LayerDesk Test CA",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout", "ca.key", "-out", "ca.pem")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", "server.key",
            "-out", "server.csr")
    (folder / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                                       "extendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "2", "-extfile", "server.ext", "-out", "server.pem")
    return TestCA(folder / "ca.pem", folder / "server.pem", folder / "server.key")


@dataclass
class Seen:
    """A request as it arrived."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    aborted: bool = False
    #: The connection was reset by the server mid-body (:class:`HostDown`), not by the client.
    cut: bool = False

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


@dataclass
class HostDown:
    """The host goes away once ``after`` bytes of request bodies to ``path`` arrived (counted over its
    requests: a page blob is written in several).

    The request during which that happens is answered with nothing: its connection is reset. It takes its
    place in the recording (which marks it ``"aborted": true``). Afterwards, with ``whole_server``, the server
    stops listening, so every later connection is refused; otherwise only ``path`` stays down: each later
    request to it is reset as its headers arrive (kept in :attr:`RecordedServer.refused`, outside the
    recording)."""

    path: str
    after: int
    whole_server: bool = False
    happened: bool = False
    #: Body bytes to ``path`` received so far.
    received: int = 0


@dataclass
class RecordedServer:
    """The running server: its base URL, the requests seen, and what went off script."""

    base_url: str
    exchanges: list[dict[str, Any]]
    values: dict[str, str]
    upload: Path | None = None
    seen: list[Seen] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)
    #: Bytes the server received per page-blob offset (what an Azure disk would hold).
    pages: dict[int, bytes] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: Called with each request after it is checked (e.g. to cancel a delivery at a chosen moment).
    on_request: Callable[[Seen], None] | None = None
    #: When and how the host goes away mid-upload (``None``: it stays up).
    host_down: HostDown | None = None
    #: Requests reset as they arrived because their path was down (they are not in :attr:`seen`).
    refused: list[Seen] = field(default_factory=list)
    #: Stops the server listening (set by :func:`recorded_server`).
    stop_listening: Callable[[], None] | None = None

    @property
    def played(self) -> int:
        return len(self.seen)

    def assert_played(self, count: int | None = None) -> None:
        """Every recorded exchange (or its first ``count``, and no more) was asked for, in order, as recorded."""
        assert not self.mismatches, "\n".join(self.mismatches)
        if count is not None:
            assert len(self.seen) == count, f"{len(self.seen)} requests came, not the first {count} of the recording"
            return
        left = self.exchanges[len(self.seen):]
        assert not left, f"{len(left)} recorded exchanges never came, the first: {_describe(left[0]['request'])}"


def _describe(request: Mapping[str, Any]) -> str:
    return f"{request.get('method')} {request.get('path')}"


def substitute(value: Any, values: Mapping[str, str]) -> Any:
    """``value`` with every ``{{name}}`` replaced by ``values[name]`` (``{{any}}`` is kept)."""
    if isinstance(value, str):
        for key, text in values.items():
            value = value.replace("{{" + key + "}}", text)
        return value
    if isinstance(value, list):
        return [substitute(item, values) for item in value]
    if isinstance(value, dict):
        return {key: substitute(item, values) for key, item in value.items()}
    return value


def differences(expected: Any, actual: Any, where: str = "") -> list[str]:
    """Where ``actual`` differs from ``expected`` (``{{any}}`` matches anything)."""
    if expected == ANY:
        return [] if actual is not None else [f"{where or 'value'}: missing"]
    if isinstance(expected, dict) and isinstance(actual, dict):
        found: list[str] = []
        for key in sorted(set(expected) | set(actual)):
            if key not in actual:
                found.append(f"{where}.{key}: missing")
            elif key not in expected:
                found.append(f"{where}.{key}: not expected ({actual[key]!r})")
            else:
                found += differences(expected[key], actual[key], f"{where}.{key}")
        return found
    if isinstance(expected, list) and isinstance(actual, list) and len(expected) == len(actual):
        return [d for i, (e, a) in enumerate(zip(expected, actual, strict=True))
                for d in differences(e, a, f"{where}[{i}]")]
    return [] if expected == actual else [f"{where or 'value'}: expected {expected!r}, got {actual!r}"]


def load_recording(path: Path) -> list[dict[str, Any]]:
    data = json.loads(path.read_text(encoding="utf-8"))
    exchanges = data["exchanges"]
    assert isinstance(exchanges, list)
    return exchanges


def _check(expected: Mapping[str, Any], seen: Seen, server: RecordedServer) -> list[str]:
    problems: list[str] = []
    if expected["method"] != seen.method or expected["path"] != seen.path:
        return [f"expected {_describe(expected)}, got {seen.method} {seen.path}"]
    for key, value in expected.get("query", {}).items():
        problems += differences(value, seen.query.get(key), f"query {key}")
    extra = sorted(set(seen.query) - set(expected.get("query", {})))
    if extra:
        problems.append(f"query: unexpected {', '.join(extra)}")
    for key, value in expected.get("headers", {}).items():
        problems += differences(value, seen.headers.get(key.lower()), f"header {key}")
    for key in expected.get("absent_headers", []):
        if key.lower() in seen.headers:
            problems.append(f"header {key}: must not be sent")
    if expected.get("aborted"):
        if not seen.aborted:
            problems.append("the upload was expected to be aborted mid-body, but it was sent whole")
        return problems
    if seen.aborted:
        return [*problems, "the request body was cut off"]
    if "json" in expected:
        try:
            body = seen.json()
        except ValueError:
            return [*problems, f"body is not JSON: {seen.body[:80]!r}"]
        problems += differences(expected["json"], body, "json")
    if "form" in expected:
        form = dict(parse_qsl(seen.body.decode("utf-8"), keep_blank_values=True))
        problems += differences(expected["form"], form, "form")
    if expected.get("body") == "page":
        # A page blob write: the body is kept at its offset; the test checks the assembled blob.
        first, _, last = seen.headers.get("x-ms-range", "bytes=0--1").removeprefix("bytes=").partition("-")
        if len(seen.body) != int(last) + 1 - int(first):
            problems.append(f"body: {len(seen.body)} bytes for the range {first}-{last}")
        server.pages[int(first)] = seen.body
    if expected.get("body") == "upload":
        # The body must be the bytes of the file under test at the range the request names.
        assert server.upload is not None
        data = server.upload.read_bytes()
        start, end = 0, len(data) - 1
        if "x-ms-range" in seen.headers:
            first, _, last = seen.headers["x-ms-range"].removeprefix("bytes=").partition("-")
            start, end = int(first), int(last)
            server.pages[start] = seen.body
        if seen.body != data[start:end + 1]:
            problems.append(f"body: not the {end + 1 - start} bytes of the upload at {start}")
    return problems


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the test reads :attr:`RecordedServer.seen`."""

    def _serve(self) -> None:
        recorded = self.server.recorded
        parts = urlsplit(self.path)
        seen = Seen(self.command, parts.path, dict(parse_qsl(parts.query, keep_blank_values=True)),
                    {k.lower(): v for k, v in self.headers.items()}, b"")
        down = recorded.host_down
        # The request takes its place in the order when its headers arrive: a body cut off by a cancel
        # ends later than the clean-up requests that follow it on another connection.
        with recorded.lock:
            if down is not None and down.happened and seen.path == down.path:
                recorded.refused.append(seen)
                self._reset()
                return
            length = int(self.headers.get("Content-Length") or 0)
            cutting = False
            if down is not None and not down.happened and seen.path == down.path:
                if down.received + length > down.after:
                    down.happened = cutting = True
                    length = down.after - down.received
                down.received += length
            index = len(recorded.seen)
            recorded.seen.append(seen)
        chunks: list[bytes] = []
        received = 0
        while received < length:
            try:
                piece = self.rfile.read(min(1024 * 1024, length - received))
            except OSError:
                piece = b""
            if not piece:
                seen.aborted = True
                break
            chunks.append(piece)
            received += len(piece)
        seen.body = b"".join(chunks)
        seen.aborted = seen.aborted or cutting
        seen.cut = cutting
        aborted = seen.aborted
        with recorded.lock:
            if index >= len(recorded.exchanges):
                recorded.mismatches.append(f"request {index + 1} ({seen.method} {seen.path}) is beyond the recording")
                exchange: dict[str, Any] | None = None
            else:
                exchange = substitute(recorded.exchanges[index], recorded.values)
                assert exchange is not None
                problems = _check(exchange["request"], seen, recorded)
                if problems:
                    recorded.mismatches.append(f"request {index + 1} ({seen.method} {seen.path}): "
                                               + "; ".join(problems))
                    exchange = None
        if recorded.on_request is not None:
            recorded.on_request(seen)
        if cutting:
            assert down is not None
            if down.whole_server and recorded.stop_listening is not None:
                recorded.stop_listening()  # before the reset: the clean-up that follows finds no one listening
            self._reset()
            return
        if aborted:
            self.close_connection = True
            return
        if exchange is None:
            self._answer(599, {"Content-Type": "text/plain"}, b"off the recording")
            return
        response = exchange["response"]
        headers = dict(response.get("headers", {}))
        if "json" in response:
            payload = json.dumps(response["json"]).encode("utf-8")
            headers.setdefault("Content-Type", "application/json")
        else:
            payload = str(response.get("text", "")).encode("utf-8")
        self._answer(int(response["status"]), headers, payload)

    def _reset(self) -> None:
        """End the connection with a TCP reset and no answer, as a host that went away does."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def _answer(self, status: int, headers: Mapping[str, str], payload: bytes) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _serve


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    recorded: RecordedServer


@contextlib.contextmanager
def recorded_server(ca: TestCA, recording: Path | list[dict[str, Any]], values: Mapping[str, str] | None = None,
                    upload: Path | None = None, host_down: HostDown | None = None) -> Iterator[RecordedServer]:
    """Serve ``recording`` (a file, or exchanges a test put together from recordings) over HTTPS on
    127.0.0.1 (a free port) while the block runs.

    ``values`` fill the recording's ``{{name}}`` placeholders (``base`` is always the server's URL);
    ``upload`` is the file whose bytes the recording's ``"body": "upload"`` requests must carry;
    ``host_down`` makes the host go away mid-upload."""
    server = _Server(("127.0.0.1", 0), _Handler)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(ca.cert_file, ca.key_file)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    base = f"https://127.0.0.1:{server.server_address[1]}"
    exchanges = load_recording(recording) if isinstance(recording, Path) else recording
    server.recorded = RecordedServer(base, exchanges, {"base": base, **(values or {})}, upload,
                                     host_down=host_down)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def stop_listening() -> None:
        # Called from a request's thread: serve_forever runs in its own, which shutdown() waits for.
        server.shutdown()
        server.socket.close()

    server.recorded.stop_listening = stop_listening
    thread.start()
    try:
        yield server.recorded
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
