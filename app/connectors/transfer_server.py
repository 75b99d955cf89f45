"""The transfer server: one published disk served over HTTP(S) to a Provisioning server's BITS job.

The App Layering agent on a Citrix Provisioning server pulls a published vDisk with BITS from the
appliance (port 3009 over HTTP, 3509 over HTTPS). :class:`TransferServer` is LayerDesk's side of that
pull: a threaded HTTP(S) server that listens only while one transfer is in progress, serves exactly one
file under an unguessable per-transfer URL (``/layerdesk/<token>/<file name>``) and answers 404 to
anything else — another path, a wrong token, ``..`` — without ever looking at the file system for it.

BITS downloads in ranges and resumes after an interruption, so the server answers ``HEAD`` and ``GET``
with ``Accept-Ranges``, ``Content-Length``, a strong ``ETag`` (the image's checksum) and
``Last-Modified``; a single ``Range`` gets a 206 with ``Content-Range``, an unsatisfiable one a 416, and
``If-Range`` is honoured so a resumed download never mixes two versions of a file. Every request is
logged (client, method, path with the token masked, status, bytes sent).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import re
import secrets
import socket
import ssl
import struct
import threading
import time
from email.utils import formatdate
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

from app.errors import EnvironmentProblem, UserError

log = logging.getLogger(__name__)

#: The ports App Layering's Citrix Provisioning connector uses for disk uploads.
DEFAULT_HTTP_PORT = 3009
DEFAULT_HTTPS_PORT = 3509
#: How much is read from the file per write when the socket cannot ``sendfile`` (TLS).
CHUNK = 1024 * 1024
#: An idle client connection is closed after this long (BITS reconnects on its own).
IDLE_TIMEOUT_S = 120.0
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


def file_etag(path: Path, checksum: str | None = None) -> str:
    """The strong ETag of ``path``: its checksum (``sha256:<hex>`` as the catalog keeps it), computed when
    not given; quoted as HTTP wants it."""
    if not checksum:
        digest = hashlib.sha256()
        with path.open("rb") as file:
            while block := file.read(CHUNK * 4):
                digest.update(block)
        checksum = f"sha256:{digest.hexdigest()}"
    return '"' + checksum.replace(":", "-") + '"'


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """The inclusive byte range ``(first, last)`` a ``Range`` header asks of a ``size``-byte file.

    ``None`` when the header is not a single byte range (the whole file is then sent, as RFC 9110
    allows); :class:`ValueError` when it is one but no byte of it is in the file (416)."""
    match = _RANGE.fullmatch(header.strip())
    if match is None:
        return None
    first_text, last_text = match.groups()
    if not first_text and not last_text:
        return None
    if not first_text:  # a suffix: the last N bytes
        count = int(last_text)
        if count == 0 or size == 0:
            raise ValueError("empty suffix range")
        return max(0, size - count), size - 1
    first = int(first_text)
    last = int(last_text) if last_text else size - 1
    if last_text and last < first:
        return None  # syntactically invalid: ignored
    if first >= size:
        raise ValueError("range starts after the end of the file")
    return first, min(last, size - 1)


class _TransferHandler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = "LayerDesk-Transfer/1"
    sys_version = ""
    timeout = IDLE_TIMEOUT_S

    # --- one request -----------------------------------------------------------------------------------

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def _not_found(self) -> None:
        body = b"Not found.\n"
        self._status(HTTPStatus.NOT_FOUND, {"Content-Type": "text/plain; charset=utf-8",
                                            "Content-Length": str(len(body))})
        if self.command != "HEAD":
            self.wfile.write(body)
            self._sent += len(body)

    def _answer(self, *, send_body: bool) -> None:
        self._sent = 0
        transfer = self.server.transfer
        # The raw request target is compared as a whole, in constant time; nothing of it ever names a file.
        if not hmac.compare_digest(self.path.encode("utf-8", "surrogateescape"), transfer.path.encode("ascii")):
            self._not_found()
            return
        size = transfer.size
        headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes", "ETag": transfer.etag,
                   "Last-Modified": transfer.last_modified}
        first, last = 0, size - 1
        status = HTTPStatus.OK
        wanted = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        if wanted and (if_range is None or if_range.strip() in (transfer.etag, transfer.last_modified)):
            try:
                asked = parse_range(wanted, size)
            except ValueError:
                self._status(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE,
                             {**headers, "Content-Range": f"bytes */{size}", "Content-Length": "0"})
                return
            if asked is not None:
                first, last = asked
                status = HTTPStatus.PARTIAL_CONTENT
                headers["Content-Range"] = f"bytes {first}-{last}/{size}"
        count = max(0, last - first + 1)
        headers["Content-Length"] = str(count)
        self._status(status, headers)
        if send_body and count:
            self._send_file(first, count)

    def _status(self, status: HTTPStatus, headers: dict[str, str]) -> None:
        self._code = int(status)
        self.send_response_only(status)
        self.send_header("Date", formatdate(usegmt=True))
        self.send_header("Server", self.server_version)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()

    def _send_file(self, offset: int, count: int) -> None:
        with self.server.transfer.file.open("rb") as file:
            if isinstance(self.connection, ssl.SSLSocket):
                file.seek(offset)
                left = count
                while left > 0:
                    block = file.read(min(CHUNK, left))
                    if not block:
                        break
                    self.wfile.write(block)
                    left -= len(block)
                    self._sent += len(block)
            else:
                self._sent += self.connection.sendfile(file, offset, count)

    # --- logging -----------------------------------------------------------------------------------------

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Replaced by the one line :meth:`handle_one_request` writes once the answer is sent."""

    def log_message(self, format: str, *args: Any) -> None:
        log.info("transfer %s: %s", self.client_address[0], self.server.transfer.mask(format % args))

    def handle_one_request(self) -> None:
        self._code = 0
        self._sent = 0
        self.requestline = ""
        try:
            super().handle_one_request()
        except (ConnectionError, TimeoutError, ssl.SSLError, OSError) as exc:
            self.close_connection = True
            if self.requestline:
                log.info("transfer %s: %s interrupted after %d bytes (%s)", self.client_address[0],
                         self.server.transfer.mask(self.requestline), self._sent, type(exc).__name__)
            return
        if self.requestline and self._code:
            log.info("transfer %s: %s -> %d, %d bytes", self.client_address[0],
                     self.server.transfer.mask(self.requestline), self._code, self._sent)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    transfer: TransferServer

    def finish_request(self, request: Any, client_address: Any) -> None:
        transfer = self.transfer
        if transfer.tls is None:
            with transfer.track(request):
                super().finish_request(request, client_address)
            return
        # The TLS handshake runs in the request's own thread, so a slow client cannot stall accept().
        request.settimeout(IDLE_TIMEOUT_S)
        try:
            wrapped = transfer.tls.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError) as exc:
            log.info("transfer %s: TLS handshake failed (%s)", client_address[0], exc)
            return
        # wrap_socket took over the descriptor: the wrapped socket is the one to close.
        with wrapped, transfer.track(wrapped):
            super().finish_request(wrapped, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.warning("transfer %s: request failed", client_address[0], exc_info=True)


class TransferServer:
    """Serves one file for one transfer: ``with TransferServer(image, ...) as server: server.url(host)``.

    ``port`` 0 picks a free port (tests); ``tls`` a server context (:func:`tls_context`) for HTTPS. The
    server listens from :meth:`start` (or entering the ``with``) to :meth:`stop`, which also closes the
    connections still open."""

    def __init__(self, file: Path, *, bind: str = "0.0.0.0", port: int = DEFAULT_HTTP_PORT,  # noqa: S104
                 tls: ssl.SSLContext | None = None, checksum: str | None = None, name: str | None = None) -> None:
        self.file = file
        self.size = file.stat().st_size
        self.etag = file_etag(file, checksum)
        self.last_modified = formatdate(file.stat().st_mtime, usegmt=True)
        self.tls = tls
        self.scheme = "https" if tls is not None else "http"
        self._token = secrets.token_urlsafe(32)
        self.path = f"/layerdesk/{self._token}/{quote(name or file.name)}"
        self._bind, self._port = bind, port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()

    # --- life ------------------------------------------------------------------------------------------

    def start(self) -> TransferServer:
        """Listen; :class:`EnvironmentProblem` when the address or port cannot be bound."""
        try:
            server = _Server((self._bind, self._port), _TransferHandler, bind_and_activate=True)
        except OSError as exc:
            raise EnvironmentProblem(
                f"LayerDesk cannot listen on {self._bind}:{self._port} for the vDisk transfer ({exc.strerror or exc}); "
                "free the port or choose another transfer port in the connector.") from None
        server.transfer = self
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name=f"transfer-{self.port}", daemon=True)
        self._thread.start()
        log.info("transfer server listening on %s:%d (%s) for %s, %d bytes", self._bind, self.port, self.scheme,
                 self.file.name, self.size)
        return self

    def stop(self) -> None:
        """Stop listening and close every open connection (idempotent)."""
        server, self._server = self._server, None
        if server is None:
            return
        port = int(server.server_address[1])
        server.shutdown()
        server.server_close()
        with self._lock:
            connections = list(self._open)
        for connection in connections:
            with contextlib.suppress(OSError):
                # Reset, not a graceful end: bytes still queued for a slow client are dropped at once.
                connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                connection.shutdown(socket.SHUT_RDWR)
        # Return once every request thread has let go of its connection (and logged how it ended).
        deadline = time.monotonic() + 5
        while self._open and time.monotonic() < deadline:
            time.sleep(0.01)
        if self._thread is not None:
            self._thread.join(timeout=5)
        log.info("transfer server on port %d stopped", port)

    def __enter__(self) -> TransferServer:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.stop()

    @property
    def listening(self) -> bool:
        return self._server is not None

    @property
    def port(self) -> int:
        """The port listened on (the chosen one once started with port 0)."""
        return int(self._server.server_address[1]) if self._server is not None else self._port

    def url(self, host: str) -> str:
        """The file's URL as a client reaching this machine at ``host`` uses it."""
        shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
        return f"{self.scheme}://{shown}:{self.port}{self.path}"

    def mask(self, text: str) -> str:
        """``text`` with the transfer's token replaced (for logs)."""
        return text.replace(self._token, "<token>")

    @contextlib.contextmanager
    def track(self, connection: socket.socket) -> Any:
        with self._lock:
            self._open.add(connection)
        try:
            yield
        finally:
            with self._lock:
                self._open.discard(connection)


def tls_context(certificate: Path, key: Path | None = None) -> ssl.SSLContext:
    """A server TLS context from a PEM certificate (chain) and its key (in the certificate file when
    ``key`` is ``None``); :class:`UserError` naming the file when it cannot be used."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(certificate), str(key) if key else None)
    except (OSError, ssl.SSLError) as exc:
        raise UserError(f"The transfer certificate {certificate} (key {key or 'in the same file'}) cannot be used: "
                        f"{getattr(exc, 'strerror', None) or exc}. Give a PEM certificate and its unencrypted "
                        "key.") from None
    return context
