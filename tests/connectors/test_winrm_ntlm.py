r"""NTLM sign-in of the WinRM connectors (Citrix Provisioning, Hyper-V), for real.

NTLM handshakes verified by pyspnego's acceptor in front of a recording of the WS-Management exchanges:
:mod:`tests.support.winrm_ntlm` answers pywinrm as a Windows WinRM listener does (401 offering Negotiate and
NTLM, the NEGOTIATE message, 401 with the CHALLENGE, the AUTHENTICATE message with the request's body on
the same connection, channel binding to the TLS certificate checked), then hands the SOAP body to the
recorded peer (:mod:`tests.support.pvs_winrm_replay`, :mod:`tests.support.hyperv_winrm`), which only speaks
Basic. The accounts the acceptor knows are an ``NTLM_USER_FILE`` in the test's tmp_path.
"""

from __future__ import annotations

import hashlib
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.connectors.base import ConnectorSettings
from app.connectors.hyperv import HyperVConnector, HyperVHost
from app.connectors.pvs import PvsConnector
from app.errors import AuthenticationFailed
from tests.connectors.conftest import Flag, image_file, sidecar_for
from tests.support import samba_dc
from tests.support.hyperv_winrm import RecordedHyperVHost, TestCA, make_test_ca, recorded_hyperv
from tests.support.pvs_winrm_replay import ACCOUNT, SHELL, TRANSFER, WinRMReplay, make_certificate
from tests.support.winrm_ntlm import NtlmFront, certificate_bindings, ntlm_front, write_user_file

PVS_USER = "LAB\\pvsadmin"
PVS_PASSWORD = "Ntlm!Pvs-Passw0rd"
HV_USER = "LAB\\hvadmin"
HV_PASSWORD = "Ntlm!Hv-Passw0rd"
#: The recorded Hyper-V host's own (Basic) account, which only the front uses.
HV_RECORDED = ("LAB\\recorded", "Recorded-Basic-1")
#: The test DC's administrator, for the Hyper-V connector's share step: NTLM to WinRM and to SMB alike.
LAB_ADMIN = f"{samba_dc.NETBIOS_DOMAIN}\\Administrator"
WRONG = "Wr0ng!Passw0rd-9"
HANDSHAKE = ["NEGOTIATE", "CHALLENGE", "AUTHENTICATE"]
STEP_ACTIONS = [TRANSFER + "Create", SHELL + "Command", SHELL + "Receive", SHELL + "Signal", TRANSFER + "Delete"]
#: A pywinrm connection, as the front sees it: refused without credentials, the NTLM handshake (the
#: AUTHENTICATE message carries the first request), then requests on the signed-in connection.
SIGNED_IN = [("anonymous", 401), ("NEGOTIATE", 401), ("AUTHENTICATE", 200)]


@pytest.fixture(autouse=True)
def _no_thread_left() -> Iterator[None]:
    """Every server thread a test started (the front's, the recorded peers') has ended after it."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 5
    while (left := [t for t in threading.enumerate() if t not in before]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left, f"threads left running: {left}"


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return make_test_ca(tmp_path_factory.mktemp("ntlm-ca"))


@pytest.fixture(scope="module")
def pvs_certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_certificate(tmp_path_factory.mktemp("pvs-tls"))


@pytest.fixture
def accounts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The accounts pyspnego's acceptor knows, for this test only."""
    path = write_user_file(tmp_path / "ntlm-users", {PVS_USER: PVS_PASSWORD, HV_USER: HV_PASSWORD,
                                                     LAB_ADMIN: samba_dc.ADMIN_PASSWORD})
    monkeypatch.setenv("NTLM_USER_FILE", str(path))
    return path


def _trusting(ca_file: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca_file))


def _binding(front: NtlmFront) -> bytes:
    """What a client that saw the front's certificate puts in its AUTHENTICATE message (MD5 of the bindings)."""
    assert front.channel_bindings is not None
    return hashlib.md5(front.channel_bindings.pack()).digest()


# --- Citrix Provisioning ------------------------------------------------------------------------------


@pytest.fixture
def pvs(ca: TestCA, pvs_certificate: tuple[Path, Path], accounts: Path) -> Iterator[tuple[NtlmFront, WinRMReplay]]:
    """The NTLM front before the recorded Provisioning server (check.json)."""
    replay = WinRMReplay("check", *pvs_certificate)
    try:
        with ntlm_front(ca, replay.url, ACCOUNT, _trusting(pvs_certificate[0])) as front:
            yield front, replay
    finally:
        replay.stop()
    assert not replay.errors, replay.errors


def _pvs_settings(front: NtlmFront, ca: TestCA, **options: Any) -> ConnectorSettings:
    return ConnectorSettings("PVS", "pvs", front.url, PVS_USER, True, {
        "auth": "ntlm", "ca_file": str(ca.ca_file), "site": "Site1", "store": "Store1",
        "transfer_bind": "127.0.0.1", "transfer_host": "127.0.0.1", "http_port": 0, "https_port": 0, **options})


def _pvs_connector() -> PvsConnector:
    return PvsConnector(poll_interval_s=0.05, contact_retries=2)


def test_pvs_test_signs_in_with_ntlm(ca: TestCA, pvs: tuple[NtlmFront, WinRMReplay]) -> None:
    r"""NTLM handshakes verified by pyspnego's acceptor in front of a recording of the WS-Management exchanges
    (check.json): the connector's test with auth=ntlm and LAB\pvsadmin runs its WinRM step through one
    signed-in connection, its channel binding naming the front's certificate."""
    front, replay = pvs
    report = _pvs_connector().test(_pvs_settings(front, ca), PVS_PASSWORD)
    assert report.ok, report
    assert [(s.name, s.ok) for s in report.steps][:3] == [("connect", True), ("site and store", True),
                                                          ("transfer port", True)]
    assert "on PVS1" in report.steps[0].detail
    [handshake] = front.handshakes
    assert (handshake.scheme, handshake.messages, handshake.user) == ("NTLM", HANDSHAKE, PVS_USER)
    assert handshake.accepted and not handshake.refusal
    assert handshake.channel_binding == _binding(front)
    # One connection for the whole step: the five WS-Management requests, the first inside AUTHENTICATE.
    assert front.connections == [1]
    assert front.legs(1) == SIGNED_IN + [("signed-in", 200)] * 4
    assert [r.action for r in replay.requests] == STEP_ACTIONS
    assert replay.kinds == ["check"]
    # Over HTTPS pywinrm does not seal the messages with NTLM: plain SOAP, as the recorded server reads it.
    assert b"multipart/encrypted" not in front.wire_bytes()
    assert PVS_PASSWORD.encode() not in front.wire_bytes()


def test_pvs_a_new_connection_signs_in_again(ca: TestCA, pvs: tuple[NtlmFront, WinRMReplay]) -> None:
    """NTLM handshakes verified by pyspnego's acceptor in front of a recording of the WS-Management exchanges
    (check.json, twice): NTLM signs in a connection, so a second test (a new session, a new connection) is
    refused without credentials and goes through the whole handshake again."""
    front, replay = pvs
    replay.steps = replay.steps * 2
    for _ in range(2):
        report = _pvs_connector().test(_pvs_settings(front, ca), PVS_PASSWORD)
        assert report.ok, report
    assert front.connections == [1, 2]
    assert [(h.connection, h.messages, h.accepted) for h in front.handshakes] == [(1, HANDSHAKE, True),
                                                                                 (2, HANDSHAKE, True)]
    assert front.legs(2) == front.legs(1) == SIGNED_IN + [("signed-in", 200)] * 4
    assert replay.kinds == ["check", "check"]


def test_pvs_a_wrong_password_with_ntlm(ca: TestCA, pvs: tuple[NtlmFront, WinRMReplay], tmp_path: Path) -> None:
    """NTLM handshakes verified by pyspnego's acceptor in front of a recording of the WS-Management exchanges:
    the acceptor refuses the AUTHENTICATE message of a wrong password (401, as Windows answers); the test's
    connect step fails with the clear message and a delivery with AuthenticationFailed, neither naming the
    password. Nothing reaches the recorded server."""
    front, replay = pvs
    report = _pvs_connector().test(_pvs_settings(front, ca), WRONG)
    assert [(s.name, s.ok) for s in report.steps][:2] == [("connect", False), ("site and store", None)]
    assert "refused the credentials of LAB\\pvsadmin (HTTP 401)" in (report.failure or "")
    image = image_file(tmp_path / "img")
    with pytest.raises(AuthenticationFailed) as refused:
        _pvs_connector().deliver(image, sidecar_for(image), _pvs_settings(front, ca), WRONG, lambda _p, _m: None,
                                 Flag())
    assert "refused the credentials of LAB\\pvsadmin" in str(refused.value)
    for message in (str(report), str(refused.value)):
        assert WRONG not in message and PVS_PASSWORD not in message
    assert len(front.handshakes) == 2
    for handshake in front.handshakes:
        assert (handshake.messages, handshake.user, handshake.accepted) == (HANDSHAKE, PVS_USER, False)
        assert "Invalid NTLM response" in handshake.refusal
    assert all(legs[-1] == ("AUTHENTICATE", 401) for legs in map(front.legs, front.connections))
    assert front.forwarded == 0 and replay.requests == []
    assert WRONG.encode() not in front.wire_bytes()


def test_pvs_a_channel_binding_to_another_certificate_is_refused(
        ca: TestCA, pvs: tuple[NtlmFront, WinRMReplay], pvs_certificate: tuple[Path, Path]) -> None:
    """NTLM handshakes verified by pyspnego's acceptor in front of a recording of the WS-Management exchanges:
    a listener behind a TLS interceptor sees the client bound to the interceptor's certificate, not its own,
    and refuses it although the password is right (so the binding is really checked)."""
    front, replay = pvs
    front.channel_bindings = certificate_bindings(pvs_certificate[0])
    report = _pvs_connector().test(_pvs_settings(front, ca), PVS_PASSWORD)
    assert "refused the credentials of LAB\\pvsadmin (HTTP 401)" in (report.failure or "")
    [handshake] = front.handshakes
    assert not handshake.accepted and handshake.refusal.startswith("BadBindingsError")
    assert replay.requests == []


# --- Hyper-V --------------------------------------------------------------------------------------------


@pytest.fixture
def hyperv(ca: TestCA, accounts: Path) -> Iterator[tuple[NtlmFront, RecordedHyperVHost]]:
    """The NTLM front before the recorded Hyper-V host."""
    with recorded_hyperv(ca, *HV_RECORDED) as (host, port), \
            ntlm_front(ca, f"https://127.0.0.1:{port}/wsman", HV_RECORDED, _trusting(ca.ca_file)) as front:
        yield front, host


def _hv_settings(front: NtlmFront, ca: TestCA, user: str = HV_USER, **options: object) -> ConnectorSettings:
    return ConnectorSettings("HV1", "hyperv", "127.0.0.1", user, options={
        "winrm_port": front.port, "auth": "ntlm", "ca_file": str(ca.ca_file),
        "target_folder": r"\\127.0.0.1\layers\hyperv-images", "switch": "LAN", **options})


def test_hyperv_signs_in_and_runs_with_ntlm(ca: TestCA, hyperv: tuple[NtlmFront, RecordedHyperVHost]) -> None:
    r"""NTLM handshakes verified by pyspnego's acceptor in front of a recording of the WS-Management exchanges:
    HyperVHost with auth "ntlm" and LAB\hvadmin signs in (a shell opened and closed) and runs Get-VMHost;
    each closes its session, so each comes on a new connection that signs in again."""
    front, host = hyperv
    client = HyperVHost(_hv_settings(front, ca), HV_PASSWORD)
    assert client.sign_in() == f"signed in to https://127.0.0.1:{front.port}/wsman"
    found = client.run("get-vmhost", {})
    assert (found["Name"], found["LogicalProcessorCount"]) == ("HV1", 16)
    assert [(h.connection, h.scheme, h.messages, h.user, h.accepted) for h in front.handshakes] == [
        (1, "NTLM", HANDSHAKE, HV_USER, True), (2, "NTLM", HANDSHAKE, HV_USER, True)]
    assert all(h.channel_binding == _binding(front) for h in front.handshakes)
    assert front.legs(1) == [*SIGNED_IN, ("signed-in", 200)]  # Create, Delete
    assert front.legs(2) == SIGNED_IN + [("signed-in", 200)] * 4  # Create, Command, Receive, Signal, Delete
    assert [e.action for e in host.exchanges] == ["Create", "Delete", "Create", "Command", "Receive", "Signal",
                                                  "Delete"]
    assert host.scripts_run == ["get-vmhost"] and not host.shells
    assert HV_PASSWORD.encode() not in front.wire_bytes()


def test_hyperv_a_wrong_password_with_ntlm(ca: TestCA, hyperv: tuple[NtlmFront, RecordedHyperVHost]) -> None:
    """NTLM handshakes verified by pyspnego's acceptor in front of a recording of the WS-Management exchanges:
    a wrong password is refused after the AUTHENTICATE message; the connector's test stops at its
    authenticate step with the clear message, and HyperVHost raises AuthenticationFailed, neither naming
    the password."""
    front, host = hyperv
    report = HyperVConnector().test(_hv_settings(front, ca), WRONG)
    assert [(s.name, s.ok) for s in report.steps] == [("TCP", True), ("TLS", True), ("authenticate", False),
                                                      ("Get-VMHost", None), ("target folder", None), ("switch", None)]
    assert "refused the user name or password for WinRM (HTTP 401)" in (report.failure or "")
    with pytest.raises(AuthenticationFailed) as refused:
        HyperVHost(_hv_settings(front, ca), WRONG).run("get-vmhost", {})
    for message in (str(report), str(refused.value)):
        assert WRONG not in message and HV_PASSWORD not in message
    assert [(h.messages, h.user, h.accepted) for h in front.handshakes] == [(HANDSHAKE, HV_USER, False)] * 2
    assert all("Invalid NTLM response" in h.refusal for h in front.handshakes)
    assert front.forwarded == 0 and host.exchanges == []
    assert WRONG.encode() not in front.wire_bytes()


@pytest.fixture
def share_folder(samba: samba_dc.RunningDC) -> Iterator[Path]:
    """The DC's own folder behind the connector's target folder (made empty, removed afterwards)."""
    with samba.layers_folder("hyperv-images") as folder:
        yield folder


def test_hyperv_test_signs_in_with_ntlm(ca: TestCA, hyperv: tuple[NtlmFront, RecordedHyperVHost],
                                        share_folder: Path) -> None:
    r"""NTLM handshakes verified by pyspnego's acceptor in front of a recording of the WS-Management exchanges,
    and the test DC's share: the Hyper-V connector's whole test with auth "ntlm" and LAB\Administrator
    (WinRM through the front, the target folder over SMB to Samba)."""
    front, host = hyperv
    report = HyperVConnector().test(_hv_settings(front, ca, user=LAB_ADMIN), samba_dc.ADMIN_PASSWORD)
    assert report.ok, report
    assert [s.name for s in report.steps] == ["TCP", "TLS", "authenticate", "Get-VMHost", "target folder", "switch"]
    assert "Hyper-V host HV1: 16 logical processors" in report.steps[3].detail
    assert report.steps[4].detail.startswith(r"\\127.0.0.1\layers\hyperv-images exists")
    # sign-in, Get-VMHost, Get-VMSwitch: three sessions, three connections, three handshakes.
    assert [(h.messages, h.user, h.accepted) for h in front.handshakes] == [(HANDSHAKE, LAB_ADMIN, True)] * 3
    assert host.scripts_run == ["get-vmhost", "get-vmswitch"] and not host.shells
    assert list(share_folder.iterdir()) == []
