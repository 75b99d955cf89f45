"""The HTTPS client the REST connectors (Nutanix Prism, Microsoft Azure) share: JSON requests, streamed
uploads with progress and cancel, and one clear error for a host that cannot be reached or whose
certificate cannot be verified.

It is built on :mod:`http.client` so that every header and byte sent is ours to choose (a page blob range,
a ``Content-Length`` on a streamed upload) and no third-party client sits between a connector and its
peer. Certificates are verified against the system's CAs, or a CA file the connector names; turning
verification off is the connector's explicit choice and is logged as a warning each time a client is made.

Nothing secret is logged or put into an error message: headers are never logged, and URLs are shown
without their query (an Azure SAS URL carries its signature there).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import socket
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit

from app.connectors.reach import lost_reason, mib_text
from app.errors import EnvironmentProblem, ValidationError
from app.procs import Cancellable
from app.tasks.base import TaskCanceled

log = logging.getLogger(__name__)

#: What one ``send`` of a streamed upload takes: small enough that a cancel lands within a second.
UPLOAD_CHUNK = 1024 * 1024


def without_query(url: str) -> str:
    """``url`` as it may be shown: scheme, host and path, never the query (signatures live there)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


@dataclass(frozen=True)
class Response:
    """One HTTP answer: status, headers (names lower-cased) and the whole body."""

    status: int
    reason: str
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    def json(self) -> Any:
        """The body as JSON (``{}`` when empty); :class:`EnvironmentProblem` when it is not JSON."""
        if not self.body.strip():
            return {}
        try:
            return json.loads(self.body)
        except ValueError:
            raise EnvironmentProblem(f"The server answered {self.status} {self.reason} with a body that is not "
                                     f"JSON: {self.body[:200]!r}") from None


def tls_context(verify: bool, ca_file: str | None, peer: str) -> ssl.SSLContext:
    """The TLS context for ``peer``: certificates verified (against ``ca_file`` when given, else the
    system's CAs) unless ``verify`` is off, which is logged as a warning."""
    if not verify:
        log.warning("TLS certificate verification is OFF for %s: the connection can be intercepted", peer)
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    if ca_file:
        if not Path(ca_file).is_file():
            raise ValidationError(f"The CA file {ca_file} does not exist; give the PEM file of the CA that issued "
                                  f"{peer}'s certificate.", field="ca_file")
        try:
            return ssl.create_default_context(cafile=ca_file)
        except ssl.SSLError as exc:
            raise ValidationError(f"The CA file {ca_file} is not a PEM certificate file ({exc.reason}).",
                                  field="ca_file") from None
    return ssl.create_default_context()


class RestClient:
    """HTTPS requests to one or more hosts, with kept-alive connections (one per host).

    ``what`` names the peer in error messages ("Prism at pc1:9440"). Relative paths are resolved against
    ``base_url``; absolute URLs (an async operation, a SAS URL) are used as given, over HTTPS only."""

    def __init__(self, base_url: str, *, what: str, verify_tls: bool = True, ca_file: str | None = None,
                 timeout_s: float = 60.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.what = what
        self.timeout_s = timeout_s
        self.context = tls_context(verify_tls, ca_file, what)
        self._connections: dict[tuple[str, int], http.client.HTTPSConnection] = {}

    # --- connections ------------------------------------------------------------------------------------

    def _split(self, url: str) -> tuple[str, int, str]:
        if url.startswith("/"):
            url = self.base_url + url
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise ValidationError(f"{without_query(url)} is not an https:// address; LayerDesk talks to "
                                  f"{self.what} over HTTPS only.")
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        return parts.hostname, parts.port or 443, target

    def _shown(self, url: str) -> str:
        """``url`` (relative or absolute) as it may appear in a message: absolute, without its query."""
        return without_query(self.base_url + url if url.startswith("/") else url)

    def _connection(self, host: str, port: int) -> http.client.HTTPSConnection:
        connection = self._connections.get((host, port))
        if connection is None:
            connection = http.client.HTTPSConnection(host, port, timeout=self.timeout_s, context=self.context)
            self._connections[(host, port)] = connection
        return connection

    def _drop(self, host: str, port: int) -> None:
        connection = self._connections.pop((host, port), None)
        if connection is not None:
            connection.close()

    def close(self) -> None:
        for key in list(self._connections):
            self._drop(*key)

    def __enter__(self) -> RestClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _failure(self, exc: BaseException, host: str, port: int, during: str | None = None) -> EnvironmentProblem:
        """The error for ``exc``; ``during`` names what was under way on an established connection (the host
        was reached, then went away or stopped answering)."""
        if during is not None and not isinstance(exc, ssl.SSLCertVerificationError):
            if isinstance(exc, TimeoutError | socket.timeout):
                return EnvironmentProblem(f"{host}:{port} stopped answering during {during} (nothing for "
                                          f"{self.timeout_s:.0f} s); check that {self.what} is still reachable from "
                                          "this machine.")
            return EnvironmentProblem(f"The connection to {host}:{port} was lost during {during} "
                                      f"({lost_reason(exc)}); the host went down or the network between failed. Check "
                                      f"that {self.what} is reachable from this machine.")
        if isinstance(exc, ssl.SSLCertVerificationError):
            return EnvironmentProblem(
                f"The certificate of {host}:{port} could not be verified ({exc.verify_message}). Give the connector "
                "the CA file that issued it, or turn TLS verification off (not recommended).")
        if isinstance(exc, ssl.SSLError):
            return EnvironmentProblem(f"The TLS handshake with {host}:{port} failed ({exc.reason}); check that "
                                      "the port speaks HTTPS.")
        if isinstance(exc, socket.gaierror):
            return EnvironmentProblem(f"The host name {host} cannot be resolved ({exc.strerror}); check the "
                                      f"connector's address for {self.what}.")
        if isinstance(exc, TimeoutError | socket.timeout):
            return EnvironmentProblem(f"{host}:{port} did not answer within {self.timeout_s:.0f} s; check that "
                                      f"{self.what} is reachable from this machine.")
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        return EnvironmentProblem(f"Cannot reach {host}:{port} ({reason}); check the address, the port and "
                                  f"that {self.what} is reachable from this machine.")

    # --- probes (connector tests) ---------------------------------------------------------------------

    def probe_tcp(self) -> str:
        """Open and close a TCP connection to the base URL's host; what was reached."""
        host, port, _ = self._split(self.base_url + "/")
        try:
            with socket.create_connection((host, port), timeout=min(self.timeout_s, 15.0)) as sock:
                peer = sock.getpeername()
        except OSError as exc:
            raise self._failure(exc, host, port) from None
        return f"{host}:{port} accepts connections ({peer[0]})"

    def probe_tls(self) -> str:
        """A TLS handshake with the base URL's host; the certificate's subject and whether it was verified."""
        host, port, _ = self._split(self.base_url + "/")
        try:
            with socket.create_connection((host, port), timeout=min(self.timeout_s, 15.0)) as sock, \
                    self.context.wrap_socket(sock, server_hostname=host) as tls:
                certificate = tls.getpeercert() or {}
                version = tls.version()
        except (OSError, ssl.SSLError) as exc:
            raise self._failure(exc, host, port) from None
        if self.context.verify_mode == ssl.CERT_NONE:
            return f"{version} with {host}:{port}; the certificate was NOT verified (verification is off)"
        subject = _names(certificate.get("subject", ()))
        issuer = _names(certificate.get("issuer", ()))
        return (f"{version} with {host}:{port}; certificate of {subject.get('commonName', host)} issued by "
                f"{issuer.get('commonName', 'an unnamed CA')}, verified")

    # --- requests ---------------------------------------------------------------------------------------

    def request(self, method: str, url: str, *, headers: Mapping[str, str] | None = None,
                body: bytes | None = None, json_body: Any = None) -> Response:
        """Send one request and read its whole answer (any status: the caller decides what it means).

        :class:`EnvironmentProblem` when the host cannot be reached or its certificate not verified."""
        sent = dict(headers or {})
        if json_body is not None:
            body = json.dumps(json_body).encode("utf-8")
            sent.setdefault("Content-Type", "application/json")
        sent.setdefault("Accept", "application/json")
        if body is not None or method in ("POST", "PUT", "PATCH"):
            sent["Content-Length"] = str(len(body or b""))
        host, port, target = self._split(url)
        during = f"{method} {self._shown(url)}"
        # A kept-alive connection the server has closed fails at once; a fresh one is tried once (only then:
        # one that fails when fresh means the host itself went away).
        for attempt in (1, 2):
            connection = self._connection(host, port)
            # A host that refuses the new connection after the first was lost has gone away mid-request.
            reused = self._open(connection, host, port, during if attempt == 2 else None)
            try:
                connection.request(method, target, body=body, headers=sent)
                return self._read(connection)
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                self._drop(host, port)
                if not reused:
                    raise self._failure(exc, host, port, during) from None
            except (OSError, ssl.SSLError, http.client.HTTPException) as exc:
                self._drop(host, port)
                raise self._failure(exc, host, port, during) from None
        raise AssertionError("unreachable")

    def _open(self, connection: http.client.HTTPSConnection, host: str, port: int,
              during: str | None = None) -> bool:
        """Connect ``connection`` unless it is open already (then ``True``: a kept-alive one is reused);
        :class:`EnvironmentProblem` when the host cannot be reached (said as a loss ``during`` a request when
        this is the reconnection after one)."""
        if connection.sock is not None:
            return True
        try:
            connection.connect()
        except (OSError, ssl.SSLError, http.client.HTTPException) as exc:
            self._drop(host, port)
            raise self._failure(exc, host, port, during) from None
        return False

    def upload(self, method: str, url: str, source: BinaryIO, length: int, *, headers: Mapping[str, str],
               progress: Callable[[int], None], cancel: Cancellable) -> Response:
        """Stream ``length`` bytes of ``source`` (from where it stands) as one request's body.

        ``progress(bytes sent)`` after each piece; a cancel closes the connection mid-body and raises
        :class:`TaskCanceled` (the server sees an aborted request)."""
        host, port, target = self._split(url)
        connection = self._connection(host, port)
        self._open(connection, host, port)
        sent = 0
        try:
            connection.putrequest(method, target, skip_accept_encoding=True)
            for name, value in {**headers, "Content-Length": str(length)}.items():
                connection.putheader(name, value)
            connection.endheaders()
            while sent < length:
                if cancel.cancelled:
                    self._drop(host, port)
                    raise TaskCanceled()
                piece = source.read(min(UPLOAD_CHUNK, length - sent))
                if not piece:
                    raise EnvironmentProblem(f"The file being uploaded ended early ({sent} of {length} bytes); it "
                                             "was changed while it was sent.")
                connection.send(piece)
                sent += len(piece)
                progress(sent)
            return self._read(connection)
        except (OSError, ssl.SSLError, http.client.HTTPException) as exc:
            self._drop(host, port)
            raise self._failure(exc, host, port, f"the upload to {self._shown(url)}, after {mib_text(sent)} of "
                                f"{mib_text(length)} MiB") from None
        except BaseException:
            self._drop(host, port)
            raise

    @staticmethod
    def _read(connection: http.client.HTTPSConnection) -> Response:
        answer = connection.getresponse()
        body = answer.read()
        headers = {name.lower(): value for name, value in answer.getheaders()}
        if answer.will_close:
            connection.close()
        return Response(answer.status, answer.reason, headers, body)






def _names(entries: Any) -> dict[str, str]:
    """A certificate's distinguished name (as :meth:`ssl.SSLSocket.getpeercert` gives it) as a dict."""
    return {str(key): str(value) for entry in entries for key, value in entry}


def wait_cancellable(seconds: float, cancel: Cancellable | None) -> None:
    """Sleep ``seconds`` in short steps, raising :class:`TaskCanceled` as soon as ``cancel`` is set."""
    deadline = time.monotonic() + seconds
    while True:
        if cancel is not None and cancel.cancelled:
            raise TaskCanceled()
        left = deadline - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, 0.2))


def close_quietly(client: RestClient) -> None:
    with contextlib.suppress(Exception):
        client.close()


# --- names of what a delivery creates --------------------------------------------------------------------

#: The placeholders a name pattern may use, with what they stand for.
NAME_PLACEHOLDERS = {
    "template": "the image template's name",
    "image": "the published image's name",
    "revision": "the template's revision",
    "timestamp": "when the image was published (UTC, 20250301-101500)",
}


def name_from_pattern(pattern: str, *, template: str, image: str, revision: int, created: datetime,
                      field: str) -> str:
    """``pattern`` with its ``{placeholders}`` (:data:`NAME_PLACEHOLDERS`) filled in.

    :class:`ValidationError` (for ``field``) naming the placeholders when it uses another one."""
    stamp = (created.replace(tzinfo=UTC) if created.tzinfo is None else created.astimezone(UTC))
    values = {"template": template, "image": image, "revision": str(revision),
              "timestamp": f"{stamp:%Y%m%d-%H%M%S}"}
    try:
        return pattern.format_map(values).strip()
    except (KeyError, ValueError, IndexError) as exc:
        raise ValidationError(f"The name pattern {pattern!r} cannot be filled in ({exc}); it may use "
                              f"{', '.join('{' + k + '}' for k in NAME_PLACEHOLDERS)}.", field=field) from None
