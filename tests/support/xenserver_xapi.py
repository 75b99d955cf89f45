"""A XenServer pool master on a real local HTTPS socket that answers from the recorded XenAPI exchanges in
``tests/connectors/recordings/xenserver``: XML-RPC ``methodResponse`` documents (``Status: Success`` with a
``Value``, or ``Status: Failure`` with an ``ErrorDescription`` array) and the ``PUT /import_raw_vdi``
handler's answer.

It parses each real ``methodCall`` (so xmlrpc.client's bytes cross the socket), checks the session
reference, keeps the state a pool would (sessions, VDIs, VMs and what was uploaded into each VDI) so a test
can ask for the final state, and logs every call with its parameters.

A test can make the host go away in the middle of the upload (:attr:`RecordedPool.cut_upload_after`): the
``PUT /import_raw_vdi`` connection is reset after that many body bytes, without an answer; with
:attr:`RecordedPool.stay_down` the pool master then stops listening and resets every XML-RPC request that
still arrives on a kept-alive connection, so nothing can be cleaned up.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import xmlrpc.client
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from string import Template
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.support.hyperv_winrm import TestCA, serving

RECORDINGS = Path(__file__).resolve().parents[1] / "connectors" / "recordings" / "xenserver"
#: Outcomes answered unless a test picks another.
DEFAULTS = {"VM.get_by_name_label": "none", "task.get_status": "success", "task.get_error_info": "failure"}


@dataclass
class Call:
    method: str
    params: tuple[Any, ...]
    outcome: str


def _text(method: str, outcome: str, **fill: str) -> str:
    return Template((RECORDINGS / f"{method}.{outcome}.xml").read_text(encoding="utf-8")).safe_substitute(fill)


class RecordedPool:
    """The recorded pool master. ``outcomes[method] = "sr-full"`` picks another recorded answer."""

    def __init__(self, username: str, password: str) -> None:
        self.username, self.password = username, password
        self.outcomes: dict[str, str] = {}
        self.calls: list[Call] = []
        self.sessions: set[str] = set()
        self.vdis: dict[str, dict[str, Any]] = {}
        self.vms: dict[str, dict[str, Any]] = {}
        self.vbds: list[dict[str, Any]] = []
        self.uploads: dict[str, bytes] = {}
        self.aborted_uploads = 0
        self.import_requests: list[dict[str, list[str]]] = []
        self.on_call: Callable[[str], None] | None = None
        #: Reset the upload's connection after this many body bytes (``None``: the host stays up).
        self.cut_upload_after: int | None = None
        #: After the cut, the whole pool master is gone (refuses connections, resets requests).
        self.stay_down = False
        #: The cut happened; with :attr:`stay_down`, the host is down from then on.
        self.cut = False
        #: XML-RPC calls that arrived after the host went down (reset, not answered; not in :attr:`calls`).
        self.refused: list[str] = []
        self.stop_listening: Callable[[], None] | None = None
        self._lock = threading.Lock()

    @property
    def down(self) -> bool:
        return self.cut and self.stay_down

    @property
    def methods(self) -> list[str]:
        return [c.method for c in self.calls]

    def call(self, body: bytes) -> str:
        params, method = xmlrpc.client.loads(body)
        assert method is not None
        with self._lock:
            return self._call(method, params)

    def _call(self, method: str, params: tuple[Any, ...]) -> str:
        outcome = self.outcomes.get(method, DEFAULTS.get(method, "ok"))
        if method == "session.login_with_password":
            if params[:2] != (self.username, self.password):
                outcome = "auth-failed"
        elif params[0] not in self.sessions:
            raise AssertionError(f"{method} with a session that is not logged in: {params[0]!r}")
        if method == "SR.get_by_uuid" and method not in self.outcomes:
            outcome = "ok" if params[1] == "0e4c7a9b-5d3f-4a1e-8b6c-2f9d7e5a3c1b" else "uuid-invalid"
        self.calls.append(Call(method, params, outcome))
        if self.on_call is not None:
            self.on_call(method)
        path = RECORDINGS / f"{method}.{outcome}.xml"
        if not path.exists():
            return _text("fault", "unknown-method", method=method)
        answer = _text(method, outcome, uuid=str(params[1]) if len(params) > 1 else "")
        value = xmlrpc.client.loads(answer)[0][0].get("Value")
        # The pool's state, as the recorded answer left it.
        if method == "session.login_with_password" and value:
            self.sessions.add(str(value))
        elif method == "session.logout":
            self.sessions.discard(str(params[0]))
        elif method == "VDI.create" and value:
            self.vdis[str(value)] = dict(params[1])
        elif method == "VDI.destroy" and outcome == "ok":
            self.vdis.pop(str(params[1]), None)
            self.uploads.pop(str(params[1]), None)
        elif method == "VM.create" and value:
            self.vms[str(value)] = dict(params[1])
        elif method == "VM.destroy" and outcome == "ok":
            self.vms.pop(str(params[1]), None)
            self.vbds = [v for v in self.vbds if v["VM"] != params[1]]
        elif method == "VBD.create" and value:
            self.vbds.append(dict(params[1]))
        return answer

    def import_raw_vdi(self, query: dict[str, list[str]], body: bytes, complete: bool) -> None:
        with self._lock:
            self.import_requests.append(query)
            assert query["session_id"][0] in self.sessions
            assert query["vdi"][0] in self.vdis
            if complete:
                self.uploads[query["vdi"][0]] = body
            else:
                self.aborted_uploads += 1


class _XapiHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _reset(self) -> None:
        """End the connection with a TCP reset and no answer, as a host that went away does."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def do_POST(self) -> None:
        pool: RecordedPool = self.server.owner  # type: ignore[attr-defined]
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if pool.down:
            pool.refused.append(str(xmlrpc.client.loads(body)[1]))
            self._reset()
            return
        reply = pool.call(body).encode("utf-8")
        self.send_response(200)
        self.send_header("Content-Type", "text/xml")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def do_PUT(self) -> None:
        pool: RecordedPool = self.server.owner  # type: ignore[attr-defined]
        parts = urlsplit(self.path)
        assert parts.path == "/import_raw_vdi"
        length = int(self.headers.get("Content-Length", "0"))
        cutting = pool.cut_upload_after is not None and not pool.cut
        wanted = min(length, pool.cut_upload_after or 0) if cutting else length
        received = bytearray()
        while len(received) < wanted:
            piece = self.rfile.read(min(1024 * 1024, wanted - len(received)))
            if not piece:
                break
            received += piece
        pool.import_raw_vdi(parse_qs(parts.query), bytes(received), len(received) == length)
        if cutting:
            pool.cut = True
            if pool.stay_down and pool.stop_listening is not None:
                pool.stop_listening()  # before the reset: the clean-up that follows finds no one listening
            self._reset()
            return
        if len(received) < length:
            self.close_connection = True
            return
        status_line, *lines = (RECORDINGS / "import_raw_vdi.ok.http").read_text().strip().splitlines()
        self.send_response(int(status_line.split()[1]))
        for line in lines:
            key, value = line.split(": ", 1)
            self.send_header(key, value)
        self.end_headers()
        self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def recorded_pool(ca: TestCA, username: str, password: str) -> Iterator[tuple[RecordedPool, int]]:
    """The recorded pool master and its HTTPS port on 127.0.0.1."""
    pool = RecordedPool(username, password)
    with serving(_XapiHandler, ca, pool) as server:

        def stop_listening() -> None:
            # Called from a request's thread: serve_forever runs in its own, which shutdown() waits for.
            server.shutdown()
            server.socket.close()

        pool.stop_listening = stop_listening
        yield pool, server.server_address[1]
