r"""An HTTPS front that signs WinRM clients in with NTLM the way a Windows WinRM listener does, verified by
pyspnego's NTLM acceptor, and hands what they send on to a recorded WinRM peer.

The recorded peers (:mod:`tests.support.pvs_winrm_replay`, :mod:`tests.support.hyperv_winrm`) accept only
HTTP Basic authentication. Real Windows hosts are spoken to with NTLM, which authenticates a *TCP
connection*, not a request: this front puts that in between.

On one kept-alive TLS connection, as HTTP.sys does for WinRM:

1. a request without credentials → ``401`` with ``WWW-Authenticate: Negotiate`` and ``WWW-Authenticate: NTLM``;
2. ``Authorization: NTLM <NEGOTIATE>`` (or ``Negotiate <NEGOTIATE>``) → ``401`` with the CHALLENGE in
   ``WWW-Authenticate``;
3. ``Authorization: NTLM <AUTHENTICATE>`` with the request's body → the body is answered once pyspnego's
   acceptor (``spnego.server(..., protocol="ntlm")``) verified the response; a wrong password (or user, or
   channel binding) is a ``401`` offering the schemes again;
4. later requests on that connection need no ``Authorization``; a new connection starts at 1.

pyspnego's acceptor takes the accounts from the file named by ``NTLM_USER_FILE`` (``DOMAIN:USER:PASSWORD``
lines, :func:`write_user_file`); tests set that variable with ``monkeypatch``. Over HTTPS, requests_ntlm
puts the ``tls-server-end-point`` channel binding (RFC 5929) of the certificate it saw into its
AUTHENTICATE message; the front gives the acceptor the binding of its own certificate, so a client that
saw another certificate (a TLS interceptor) is refused. No message encryption: pywinrm uses NTLM's
sealing over plain HTTP only.

Once signed in, a request's SOAP body goes to the recorded peer with the Basic credentials it expects,
and its answer comes back. Every request (:attr:`NtlmFront.requests`) and handshake
(:attr:`NtlmFront.handshakes`) is kept, with what crossed the wire, so a test can check that no password did.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import http.client
import os
import socket
import ssl
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import spnego
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding

# pyspnego's own NTLM message parser: only to say which user and which channel binding an AUTHENTICATE
# message carried (the acceptor does the verifying).
from spnego._ntlm_raw.messages import Authenticate, AvId, NTClientChallengeV2
from spnego.channel_bindings import GssChannelBindings
from spnego.exceptions import SpnegoError

from tests.support.hyperv_winrm import TestCA, serving

SIGNATURE = b"NTLMSSP\x00"
MESSAGE_TYPES = {1: "NEGOTIATE", 2: "CHALLENGE", 3: "AUTHENTICATE"}
#: What a Windows WinRM listener offers in its first 401 (Basic too when enabled; these hosts have it off).
OFFER = (("WWW-Authenticate", "Negotiate"), ("WWW-Authenticate", "NTLM"))
SERVER = "Microsoft-HTTPAPI/2.0"


def write_user_file(path: Path, accounts: Mapping[str, str]) -> Path:
    r"""The NTLM account file pyspnego's acceptor reads: ``accounts`` maps ``DOMAIN\user`` (or a UPN) to
    its password, written as ``DOMAIN:USER:PASSWORD`` lines. Returns ``path``."""
    lines = []
    for account, password in accounts.items():
        domain, _, user = account.rpartition("\\")
        lines.append(f"{domain}:{user}:{password}\n")
    path.write_text("".join(lines), encoding="utf-8")
    path.chmod(0o600)
    return path


def tls_server_end_point(certificate: x509.Certificate) -> GssChannelBindings:
    """The ``tls-server-end-point`` channel binding of ``certificate`` (RFC 5929 §4.1: its DER hashed with its
    signature's hash, SHA-256 in place of MD5 and SHA-1)."""
    algorithm = certificate.signature_hash_algorithm
    if algorithm is None or algorithm.name in ("md5", "sha1"):
        algorithm = hashes.SHA256()
    digest = hashes.Hash(algorithm)
    digest.update(certificate.public_bytes(Encoding.DER))
    return GssChannelBindings(application_data=b"tls-server-end-point:" + digest.finalize())


def certificate_bindings(pem_file: Path) -> GssChannelBindings:
    """:func:`tls_server_end_point` of the (first) certificate in ``pem_file``."""
    return tls_server_end_point(x509.load_pem_x509_certificate(pem_file.read_bytes()))


def message_type(token: bytes) -> str:
    """``NEGOTIATE``, ``CHALLENGE`` or ``AUTHENTICATE`` for an NTLM message, ``""`` for anything else."""
    if not token.startswith(SIGNATURE) or len(token) < 12:
        return ""
    return MESSAGE_TYPES.get(int.from_bytes(token[8:12], "little"), "")


def authenticate_details(token: bytes) -> tuple[str, bytes | None]:
    r"""The ``DOMAIN\user`` an AUTHENTICATE message names and the channel binding (MD5 of the client's
    bindings) in its NTLMv2 response; ``None`` when it has none (an all-zero binding means "unbound")."""
    message = Authenticate.unpack(token)
    user = message.user_name or ""
    if message.domain_name:
        user = f"{message.domain_name}\\{user}"
    response = message.nt_challenge_response or b""
    if len(response) <= 24:  # NTLMv1: no room for a binding
        return user, None
    pairs = NTClientChallengeV2.unpack(response[16:]).av_pairs
    binding = pairs.get(AvId.channel_bindings)
    return user, binding if isinstance(binding, bytes) else None


@dataclass
class Handshake:
    """One NTLM handshake on connection ``connection``: the messages in the order they crossed, who signed in."""

    connection: int
    scheme: str
    messages: list[str] = field(default_factory=list)
    #: ``DOMAIN\user`` as the AUTHENTICATE message names it.
    user: str = ""
    #: The channel binding the client sent (MD5 of its bindings), ``None`` when it sent none.
    channel_binding: bytes | None = None
    accepted: bool = False
    #: Why the acceptor refused (the pyspnego error's name and text), ``""`` when it did not.
    refusal: str = ""


@dataclass
class FrontRequest:
    """One HTTP request the front answered.

    ``leg`` is ``anonymous`` (no credentials), ``NEGOTIATE`` / ``AUTHENTICATE`` (an NTLM message in
    ``Authorization``), ``signed-in`` (on a connection an earlier AUTHENTICATE signed in) or ``other``."""

    connection: int
    leg: str
    status: int
    forwarded: bool
    #: Headers and body as they arrived.
    raw: bytes


class NtlmFront:
    """The front's state: the recorded peer it forwards to, and what it saw. Made by :func:`ntlm_front`."""

    def __init__(self, backend_url: str, backend_account: tuple[str, str], backend_tls: ssl.SSLContext,
                 ca: TestCA) -> None:
        if not os.environ.get("NTLM_USER_FILE"):
            raise RuntimeError("NTLM_USER_FILE names no account file: pyspnego's NTLM acceptor needs one "
                               "(monkeypatch.setenv it to a write_user_file() in tmp_path).")
        self.backend = urlsplit(backend_url)
        self._backend_authorization = "Basic " + base64.b64encode(":".join(backend_account).encode()).decode()
        self._backend_tls = backend_tls
        #: The binding a client must have put in its AUTHENTICATE message: that of this front's certificate.
        #: A test may set another (a TLS interceptor's certificate) to see a bound client refused.
        self.channel_bindings: GssChannelBindings | None = certificate_bindings(ca.cert_file)
        self.port = 0
        self.handshakes: list[Handshake] = []
        self.requests: list[FrontRequest] = []
        self._lock = threading.Lock()
        self._connections: list[tuple[socket.socket, threading.Thread]] = []

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/wsman"

    @property
    def forwarded(self) -> int:
        return sum(request.forwarded for request in self.requests)

    def legs(self, connection: int) -> list[tuple[str, int]]:
        """``(leg, status)`` of each request on ``connection``, in order."""
        return [(r.leg, r.status) for r in self.requests if r.connection == connection]

    @property
    def connections(self) -> list[int]:
        """The connections requests came on, in the order they first did."""
        return list(dict.fromkeys(r.connection for r in self.requests))

    def wire_bytes(self) -> bytes:
        """Everything the clients sent the front (headers and bodies, base64 tokens decoded too)."""
        parts: list[bytes] = []
        for request in self.requests:
            parts.append(request.raw)
            for line in request.raw.split(b"\r\n"):
                if line.lower().startswith(b"authorization:"):
                    with contextlib.suppress(binascii.Error, ValueError):
                        parts.append(base64.b64decode(line.split()[-1]))
        return b"\n".join(parts)

    # --- used by the handler ----------------------------------------------------------------------------

    def register(self, connection: socket.socket) -> int:
        with self._lock:
            self._connections.append((connection, threading.current_thread()))
            return len(self._connections)

    def record(self, request: FrontRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def begin(self, handshake: Handshake) -> None:
        with self._lock:
            self.handshakes.append(handshake)

    def forward(self, body: bytes, content_type: str) -> tuple[int, list[tuple[str, str]], bytes]:
        """``body`` sent to the recorded peer with its Basic credentials; its status, headers and answer."""
        peer = http.client.HTTPSConnection(self.backend.hostname or "localhost", self.backend.port,
                                           context=self._backend_tls, timeout=30)
        try:
            peer.request("POST", self.backend.path or "/wsman", body, headers={
                "Authorization": self._backend_authorization, "Content-Type": content_type})
            answer = peer.getresponse()
            data = answer.read()
            headers = [(k, v) for k, v in answer.getheaders()
                       if k.lower() not in ("content-length", "connection", "transfer-encoding", "www-authenticate",
                                            "server", "date")]
            return answer.status, headers, data
        finally:
            peer.close()

    def hang_up(self) -> None:
        """Close every connection still open (a client's pooled keep-alive one) and wait for its thread."""
        with self._lock:
            connections = list(self._connections)
        for connection, _thread in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        for _connection, thread in connections:
            thread.join(5)


class _NtlmHandler(BaseHTTPRequestHandler):
    """One TLS connection: its NTLM context and, once signed in, its user."""

    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        self.front: NtlmFront = self.server.owner  # type: ignore[attr-defined]
        self.number = self.front.register(self.connection)
        self.context: spnego.ContextProxy | None = None
        self.handshake: Handshake | None = None
        self.user: str | None = None

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the test reads :attr:`NtlmFront.requests`."""

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        raw = (self.requestline + "\r\n" + str(self.headers)).encode("latin-1") + body
        if self.path != "/wsman":
            self._send(404, [], b"")
            self.front.record(FrontRequest(self.number, "other", 404, False, raw))
            return
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() in ("ntlm", "negotiate") and token.strip():
            self._ntlm(scheme, token.strip(), body, raw)
            return
        if self.user is None or scheme:
            # No credentials on a connection nobody signed in on (or a scheme this listener does not take).
            self._send(401, list(OFFER), b"")
            self.front.record(FrontRequest(self.number, "anonymous" if not scheme else "other", 401, False, raw))
            return
        status = self._forward(body)
        self.front.record(FrontRequest(self.number, "signed-in", status, True, raw))

    def _ntlm(self, scheme: str, token: str, body: bytes, raw: bytes) -> None:
        try:
            message = base64.b64decode(token, validate=True)
        except (binascii.Error, ValueError):
            message = b""
        kind = message_type(message)
        if kind == "NEGOTIATE":
            # A new handshake: whoever signed in on this connection before is forgotten.
            self.user = None
            self.context = spnego.server(hostname="localhost", service="http", protocol="ntlm",
                                         channel_bindings=self.front.channel_bindings,
                                         options=spnego.NegotiateOptions.use_ntlm)
            self.handshake = Handshake(self.number, scheme, ["NEGOTIATE"])
            self.front.begin(self.handshake)
            try:
                challenge = self.context.step(message) or b""
            except SpnegoError as exc:
                self.handshake.refusal = f"{type(exc).__name__}: {exc}"
                self.context = self.handshake = None
                self._send(401, list(OFFER), b"")
                self.front.record(FrontRequest(self.number, kind, 401, False, raw))
                return
            self.handshake.messages.append(message_type(challenge))
            self._send(401, [("WWW-Authenticate", f"{scheme} {base64.b64encode(challenge).decode()}")], b"")
            self.front.record(FrontRequest(self.number, kind, 401, False, raw))
            return
        if kind != "AUTHENTICATE" or self.context is None or self.handshake is None:
            self._send(401, list(OFFER), b"")
            self.front.record(FrontRequest(self.number, kind or "other", 401, False, raw))
            return
        handshake, context = self.handshake, self.context
        self.context = self.handshake = None
        handshake.messages.append(kind)
        with contextlib.suppress(Exception):  # a message the acceptor refuses may not parse either
            handshake.user, handshake.channel_binding = authenticate_details(message)
        try:
            context.step(message)
        except SpnegoError as exc:
            handshake.refusal = f"{type(exc).__name__}: {exc}"
        if handshake.refusal or not context.complete:
            handshake.refusal = handshake.refusal or "the handshake did not complete"
            # The same 401 as for no credentials (the schemes offered again); the connection stays open.
            self._send(401, list(OFFER), b"")
            self.front.record(FrontRequest(self.number, kind, 401, False, raw))
            return
        handshake.accepted = True
        self.user = context.client_principal or handshake.user
        status = self._forward(body)
        self.front.record(FrontRequest(self.number, kind, status, True, raw))

    def _forward(self, body: bytes) -> int:
        status, headers, answer = self.front.forward(body, self.headers.get("Content-Type", ""))
        self._send(status, headers, answer)
        return status

    def _send(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def version_string(self) -> str:
        return SERVER


@contextmanager
def ntlm_front(ca: TestCA, backend_url: str, backend_account: tuple[str, str],
               backend_tls: ssl.SSLContext) -> Iterator[NtlmFront]:
    """An NTLM front on 127.0.0.1 (a free port, TLS with ``ca``'s server certificate) for the recorded WinRM
    peer at ``backend_url``, which it signs in to with ``backend_account`` (Basic) over ``backend_tls``.
    Every connection is closed and its thread ended on exit."""
    front = NtlmFront(backend_url, backend_account, backend_tls, ca)
    try:
        with serving(_NtlmHandler, ca, front) as server:
            front.port = server.server_address[1]
            yield front
    finally:
        front.hang_up()
