"""The transfer server the Provisioning server's BITS job pulls a vDisk from, tested with real downloaders
(curl and wget, interrupted and resumed), a Python client for the range semantics, and raw requests for
everything it must refuse."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from app.connectors.transfer_server import TransferServer, parse_range, tls_context
from app.errors import EnvironmentProblem
from tests.support.pvs_winrm_replay import make_certificate

MiB = 1024 * 1024
LOGGER = "app.connectors.transfer_server"


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("image") / "Gold_20250301T101500Z.vhdx"
    path.write_bytes(os.urandom(24 * MiB))
    return path


@pytest.fixture
def server(image: Path, caplog: pytest.LogCaptureFixture) -> Iterator[TransferServer]:
    caplog.set_level(logging.INFO, logger=LOGGER)
    with TransferServer(image, bind="127.0.0.1", port=0) as started:
        yield started


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _request(server: TransferServer, method: str = "GET", path: str | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        connection.request(method, path or server.path, headers=headers or {})
        answer = connection.getresponse()
        return answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read()
    finally:
        connection.close()


def _raw(server: TransferServer, request_line: str) -> bytes:
    """Send a request line exactly as written (clients normalise ``..`` away) and return the answer."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
        raw.sendall(f"{request_line}\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        answer = b""
        while block := raw.recv(65536):
            answer += block
    return answer


def _logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


# --- real downloaders ------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_interrupted_and_resumed_gets_the_same_bytes(server: TransferServer, image: Path, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "download.vhdx"
    url = server.url("127.0.0.1")
    first = subprocess.Popen(["curl", "-sS", "--limit-rate", "4M", "-o", str(out), url])
    deadline = time.monotonic() + 20
    while (not out.exists() or out.stat().st_size < 2 * MiB) and time.monotonic() < deadline:
        time.sleep(0.05)
    first.kill()
    first.wait()
    partial = out.stat().st_size
    assert 0 < partial < image.stat().st_size, "the first download was not interrupted mid-file"
    subprocess.run(["curl", "-sS", "--fail", "-C", "-", "-o", str(out), url], check=True, timeout=60)
    assert _sha256(out) == _sha256(image)
    lines = _logged(caplog)
    assert any(" -> 206, " in line for line in lines), lines  # the resume asked for the rest only
    assert not any(server.path in line for line in lines)  # the token never reaches the log
    assert all("<token>" in line for line in lines if "GET /layerdesk/" in line)


@pytest.mark.skipif(shutil.which("wget") is None, reason="wget is not installed")
def test_wget_continues_a_partial_file(server: TransferServer, image: Path, tmp_path: Path) -> None:
    out = tmp_path / "download.vhdx"
    out.write_bytes(image.read_bytes()[: 5 * MiB + 123])
    subprocess.run(["wget", "-q", "-c", "-O", str(out), server.url("127.0.0.1")], check=True, timeout=60)
    assert _sha256(out) == _sha256(image)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_https_serves_with_the_named_certificate(image: Path, tmp_path: Path) -> None:
    cert, key = make_certificate(tmp_path)
    out = tmp_path / "download.vhdx"
    with TransferServer(image, bind="127.0.0.1", port=0, tls=tls_context(cert, key)) as server:
        url = server.url("127.0.0.1")
        assert url.startswith("https://")
        subprocess.run(["curl", "-sS", "--fail", "--cacert", str(cert), "-o", str(out), url], check=True, timeout=60)
        assert _sha256(out) == _sha256(image)
        # Without trusting the certificate, curl refuses it (the client checks; nothing is sent in clear).
        refused = subprocess.run(["curl", "-sS", "-o", os.devnull, url], capture_output=True, timeout=30)
        assert refused.returncode != 0


# --- range semantics ------------------------------------------------------------------------------------


def test_ranges_etag_and_if_range(server: TransferServer, image: Path) -> None:
    data, size = image.read_bytes(), image.stat().st_size
    status, headers, body = _request(server, "HEAD")
    assert (status, body) == (200, b"")
    assert headers["content-length"] == str(size) and headers["accept-ranges"] == "bytes"
    etag = headers["etag"]
    assert etag == f'"sha256-{hashlib.sha256(data).hexdigest()}"'

    status, headers, body = _request(server, headers={"Range": "bytes=100-199"})
    assert (status, headers["content-range"], headers["content-length"], body) == (
        206, f"bytes 100-199/{size}", "100", data[100:200])
    status, headers, body = _request(server, headers={"Range": "bytes=-10"})
    assert (status, headers["content-range"], body) == (206, f"bytes {size - 10}-{size - 1}/{size}", data[-10:])
    status, headers, body = _request(server, headers={"Range": f"bytes={size - 5}-"})
    assert (status, body) == (206, data[-5:])
    status, headers, body = _request(server, headers={"Range": f"bytes={size}-"})
    assert (status, headers["content-range"], body) == (416, f"bytes */{size}", b"")
    # If-Range with our ETag resumes; with another version's ETag the whole (current) file comes back.
    status, _headers, body = _request(server, headers={"Range": "bytes=10-19", "If-Range": etag})
    assert (status, body) == (206, data[10:20])
    status, headers, body = _request(server, headers={"Range": "bytes=10-19", "If-Range": '"sha256-other"'})
    assert (status, headers["content-length"], len(body)) == (200, str(size), size)
    # Several ranges at once are answered with the whole file (allowed; BITS asks one at a time).
    status, _headers, body = _request(server, headers={"Range": "bytes=0-1,5-6"})
    assert status == 200 and body == data


def test_parse_range() -> None:
    assert parse_range("bytes=0-0", 10) == (0, 0)
    assert parse_range("bytes=5-100", 10) == (5, 9)
    assert parse_range("bytes=-3", 10) == (7, 9)
    assert parse_range("items=0-1", 10) is None
    assert parse_range("bytes=5-2", 10) is None
    with pytest.raises(ValueError):
        parse_range("bytes=10-", 10)
    with pytest.raises(ValueError):
        parse_range("bytes=-0", 10)


# --- refusals -------------------------------------------------------------------------------------------


def test_anything_but_the_one_url_is_404(server: TransferServer, image: Path,
                                          caplog: pytest.LogCaptureFixture) -> None:
    token = server.path.split("/")[2]
    guessed = server.path.replace(token, token[:-1] + ("A" if token[-1] != "A" else "B"))
    for path in (guessed, "/", "/layerdesk/", f"/layerdesk/{token}/", f"/layerdesk/{token}/other.vhdx",
                 server.path + "?x=1", server.path.upper(), f"/{image.name}"):
        status, _headers, body = _request(server, path=path)
        assert (status, body) == (404, b"Not found.\n"), path
    for line in (f"GET /layerdesk/{token}/../../../etc/passwd HTTP/1.1",
                 f"GET /layerdesk/{token}/%2e%2e/%2e%2e/etc/passwd HTTP/1.1",
                 f"GET {server.path}/../{image.name} HTTP/1.1", "GET ../../etc/passwd HTTP/1.1",
                 f"GET http://127.0.0.1{server.path} HTTP/1.1"):
        answer = _raw(server, line)
        assert answer.startswith(b"HTTP/1.1 404 "), (line, answer[:80])
        assert b"root:" not in answer and len(answer) < 1000
    assert _raw(server, f"DELETE {server.path} HTTP/1.1").startswith(b"HTTP/1.1 501 ")
    lines = _logged(caplog)
    assert sum(" -> 404, " in line for line in lines) == 13, lines
    assert any("501" in line for line in lines)
    assert not any(token in line for line in lines)


def test_after_the_transfer_nothing_listens(image: Path) -> None:
    with TransferServer(image, bind="127.0.0.1", port=0) as server:
        url = server.url("127.0.0.1")
        assert _request(server, "HEAD")[0] == 200
    parts = urlsplit(url)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((parts.hostname, parts.port), timeout=2)
    assert not server.listening


def test_stop_cuts_off_a_download_in_progress(image: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    with TransferServer(image, bind="127.0.0.1", port=0) as server:
        client = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        client.sendall(f"GET {server.path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        received = len(client.recv(65536))
    started = time.monotonic()
    # The client sees a reset, or the end of the stream when the reset lands after it drained the data.
    with client, contextlib.suppress(ConnectionResetError):
        while block := client.recv(1024 * 1024):
            received += len(block)
    assert received < image.stat().st_size and time.monotonic() - started < 5
    assert any("interrupted after" in line for line in _logged(caplog))


def test_a_port_in_use_is_a_clear_error(server: TransferServer, image: Path) -> None:
    with pytest.raises(EnvironmentProblem, match=f"cannot listen on 127.0.0.1:{server.port}"):
        TransferServer(image, bind="127.0.0.1", port=server.port).start()


def test_a_bad_certificate_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "cert.pem"
    bad.write_text("not a certificate")
    from app.errors import UserError

    with pytest.raises(UserError, match=r"cert\.pem"):
        tls_context(bad)
