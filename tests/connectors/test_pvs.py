"""The Citrix Provisioning connector's WinRM side, against recorded exchanges of a Provisioning server.

Every test here runs against a recording: :mod:`tests.support.pvs_winrm_replay` serves the WS-Management
envelopes under ``recordings/pvs`` over HTTPS on a real socket, so pywinrm and the connector run end to
end (Shell Create, Command, Receive, Signal, Delete per step). What the connector left on the Provisioning
server is the recording's final state; the transfer server is fetched from like BITS fetches.
"""

from __future__ import annotations

import gc
import hashlib
import socket
import ssl
import warnings
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from app.connectors import connector_for
from app.connectors.base import ConnectorSettings
from app.connectors.pvs import PvsConnector, encode_script, powershell_arguments
from app.errors import AuthenticationFailed, Conflict, EnvironmentProblem, UserError, ValidationError
from app.tasks.base import TaskCanceled
from tests.connectors.conftest import Flag, image_file, sidecar_for
from tests.support.pvs_winrm_replay import (
    ACCOUNT,
    SHELL,
    TRANSFER,
    WinRMReplay,
    make_certificate,
    script_data,
)

STEP_ACTIONS = [TRANSFER + "Create", SHELL + "Command", SHELL + "Receive", SHELL + "Signal", TRANSFER + "Delete"]
HOSTILE = "Gold'; Remove-Item C:\\ -Recurse -Force; \"$(Stop-Computer)\" `n$env:X\r\nnext line ; exit 1 #"


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def replays(certificate: tuple[Path, Path]) -> Iterator[Any]:
    started: list[WinRMReplay] = []

    def start(scenario: str) -> WinRMReplay:
        replay = WinRMReplay(scenario, *certificate)
        started.append(replay)
        return replay

    yield start
    for replay in started:
        replay.stop()
        assert not replay.errors, replay.errors


def _settings(replay: WinRMReplay, certificate: tuple[Path, Path], **options: Any) -> ConnectorSettings:
    return ConnectorSettings("PVS", "pvs", replay.url, ACCOUNT[0], True, {
        "auth": "basic", "ca_file": str(certificate[0]), "site": "Site1", "store": "Store1",
        "transfer_bind": "127.0.0.1", "transfer_host": "127.0.0.1", "http_port": 0, "https_port": 0, **options})


def _connector() -> PvsConnector:
    return PvsConnector(poll_interval_s=0.05, contact_retries=2)


def _refused(url: str) -> bool:
    parts = urlsplit(url)
    try:
        socket.create_connection((parts.hostname, parts.port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def _deliver(replay: WinRMReplay, certificate: tuple[Path, Path], image: Path, *, cancel: Flag | None = None,
             sidecar: Any = None, **options: Any) -> Any:
    return _connector().deliver(image, sidecar or sidecar_for(image), _settings(replay, certificate, **options),
                                ACCOUNT[1], lambda _p, _m: None, cancel or Flag())


# --- test ---------------------------------------------------------------------------------------------


def test_the_connector_test_checks_winrm_site_store_port_and_script(replays: Any, certificate: Any) -> None:
    """Runs against a recording (check.json)."""
    replay = replays("check")
    report = _connector().test(_settings(replay, certificate, script="C:\\Scripts\\published.ps1"), ACCOUNT[1])
    assert report.ok, report
    assert [(s.name, s.ok) for s in report.steps] == [("connect", True), ("site and store", True),
                                                      ("transfer port", True), ("post-publish script", True)]
    assert "on PVS1" in report.steps[0].detail and "D:\\Store" in report.steps[1].detail
    assert replay.kinds == ["check"]
    assert [r.action for r in replay.requests] == STEP_ACTIONS
    assert script_data(replay.requests[1].script) == {"site": "Site1", "store": "Store1",
                                                      "script": "C:\\Scripts\\published.ps1"}


def test_a_missing_store_is_named(replays: Any, certificate: Any) -> None:
    """Runs against a recording (check_no_store.json)."""
    report = _connector().test(_settings(replays("check_no_store"), certificate, store="Store9"), ACCOUNT[1])
    assert [(s.name, s.ok) for s in report.steps][:3] == [("connect", True), ("site and store", False),
                                                          ("transfer port", None)]
    assert "no store 'Store9'" in (report.failure or "") and "correct the connector's store" in (report.failure or "")


def test_a_bad_password_is_http_401_and_a_clear_error(replays: Any, certificate: Any) -> None:
    """Runs against a recording (bad_password.json: HTTP 401 with the offered schemes)."""
    replay = replays("bad_password")
    report = _connector().test(_settings(replay, certificate), "wrong-password")
    assert [s.ok for s in report.steps][:2] == [False, None]
    assert "refused the credentials of LAB\\pvsadmin (HTTP 401)" in (report.failure or "")
    assert "wrong-password" not in (report.failure or "")
    image = image_file(Path(str(certificate[0])).parent / "img")
    with pytest.raises(AuthenticationFailed):
        _connector().deliver(image, sidecar_for(image), _settings(replay, certificate), "wrong-password",
                             lambda _p, _m: None, Flag())
    assert all(r.action == "(rejected)" for r in replay.requests)


def test_a_wsman_access_denied_fault_says_what_the_account_needs(replays: Any, certificate: Any) -> None:
    """Runs against a recording (access_denied.json: Shell Create answers a SOAP fault, WSManFault code 5)."""
    report = _connector().test(_settings(replays("access_denied"), certificate), ACCOUNT[1])
    assert "denied LAB\\pvsadmin access to WinRM" in (report.failure or "")
    assert "local administrator" in (report.failure or "")


def test_tls_is_verified_by_default(replays: Any, certificate: Any) -> None:
    """Runs against a recording (check.json) whose certificate no system CA signed."""
    replay = replays("check")
    settings = _settings(replay, certificate)
    unverified = replace(settings, options={k: v for k, v in settings.options.items() if k != "ca_file"})
    report = _connector().test(unverified, ACCOUNT[1])
    assert "could not be verified" in (report.failure or "")
    report = _connector().test(replace(unverified, verify_tls=False), ACCOUNT[1])
    assert report.ok and "NOT verified" in report.steps[0].detail


def test_settings_that_cannot_work_are_refused(tmp_path: Path) -> None:
    connector = connector_for("pvs")
    assert isinstance(connector, PvsConnector)
    report = connector.test(ConnectorSettings("P", "pvs", "http://pvs1.lab.test:5985/wsman", "u",
                                              options={"auth": "basic"}), "pw")
    assert "only with an https:// WinRM endpoint" in (report.failure or "")
    with pytest.raises(ValidationError, match="not a host name"):
        connector.check_endpoint("pvs1; rm -rf /")
    image = image_file(tmp_path, "x.qcow2", 1024)
    with pytest.raises(UserError, match="VHD or VHDX"):
        connector.deliver(image, sidecar_for(image), ConnectorSettings("P", "pvs", "pvs1"), "pw",
                          lambda _p, _m: None, Flag())


# --- deliver ------------------------------------------------------------------------------------------


def test_publish_pulls_the_vdisk_creates_it_and_runs_the_script(replays: Any, certificate: Any,
                                                                 tmp_path: Path) -> None:
    """Runs against a recording (happy.json); the recording downloads the image from LayerDesk like BITS."""
    replay = replays("happy")
    image = image_file(tmp_path, "Gold.vhdx")
    result = _deliver(replay, certificate, image, script="C:\\Scripts\\published.ps1")
    assert result.ids["vdisk"] == "Gold_20250301T101500Z"
    assert result.ids["disk_locator_id"] == "b9d1f0a4-8f1e-4c4c-b0a5-5d8e1e3f7c20"
    assert result.ids["path"] == "D:\\Store\\Gold_20250301T101500Z.vhdx"
    assert "set to standard mode" in result.ids["script_output"]
    assert replay.kinds == ["start", "poll", "poll", "create", "script"]
    assert [r.action for r in replay.requests] == STEP_ACTIONS * 5
    # BITS got exactly the published bytes, and LayerDesk stopped listening once the transfer was done.
    [(url, digest)] = replay.fetched.items()
    assert digest == hashlib.sha256(image.read_bytes()).hexdigest()
    assert url.startswith("http://127.0.0.1:") and url.endswith("/Gold_20250301T101500Z.vhdx")
    assert _refused(url)
    assert replay.state == {"file", "vdisk"}
    start = script_data(replay.requests[1].script)
    assert (start["site"], start["store"], start["name"], start["ext"]) == ("Site1", "Store1",
                                                                           "Gold_20250301T101500Z", ".vhdx")
    create = script_data(replay.requests[16].script)
    assert create == {"name": "Gold_20250301T101500Z", "site": "Site1", "store": "Store1", "vhdx": True}
    assert ACCOUNT[1] not in b"".join(r.body for r in replay.requests).decode()


def test_publish_over_https_transfers(replays: Any, certificate: Any, tmp_path: Path) -> None:
    """Runs against a recording (happy.json) with the transfer on HTTPS and the connector's certificate."""
    replay = replays("happy")
    replay.fetch_context = ssl.create_default_context(cafile=str(certificate[0]))
    image = image_file(tmp_path, "Gold.vhdx")
    _deliver(replay, certificate, image, transfer_https=True, transfer_certificate=str(certificate[0]),
             transfer_key=str(certificate[1]), script="C:\\Scripts\\published.ps1")
    [(url, digest)] = replay.fetched.items()
    assert url.startswith("https://127.0.0.1:") and digest == hashlib.sha256(image.read_bytes()).hexdigest()


def test_script_variables_arrive_as_data_not_code(replays: Any, certificate: Any, tmp_path: Path) -> None:
    """Runs against a recording (happy.json): a value with quotes, ``;``, ``$()`` and newlines reaches the
    post-publish script as a parameter value; the recorded Command body carries it only inside base64."""
    replay = replays("happy")
    image = image_file(tmp_path, "Gold.vhdx")
    sidecar = replace(sidecar_for(image), image=HOSTILE)
    _deliver(replay, certificate, image, sidecar=sidecar, script="C:\\Scripts\\published.ps1")
    command = next(r for r in replay.requests if r.kind == "script")
    assert script_data(command.script)["vars"]["ImageName"] == HOSTILE
    assert script_data(command.script)["script"] == "C:\\Scripts\\published.ps1"
    for fragment in ("Remove-Item C:", "$(Stop-Computer)", "next line", "Gold'"):
        assert fragment not in command.script
        assert fragment not in command.body.decode()
    assert "& $p.script @named" in command.script  # the values are splatted as named parameters
    # The script text around the data is the same whatever the values are.
    plain = encode_script("script", {"script": "a", "vars": {"ImageName": "b"}})
    assert command.script.split("\n", 3)[3] == plain.split("\n", 3)[3]


def test_a_vdisk_name_clash_reported_by_the_agent(replays: Any, certificate: Any, tmp_path: Path) -> None:
    """Runs against a recording (clash.json)."""
    replay = replays("clash")
    with pytest.raises(Conflict, match="already has a vDisk 'Gold_20250301T101500Z'") as caught:
        _deliver(replay, certificate, image_file(tmp_path, "Gold.vhdx"))
    assert "left alone" in str(caught.value)
    assert replay.kinds == ["start"] and replay.state == set()
    assert _refused(script_data(replay.requests[1].script)["url"])


def test_cancel_mid_transfer_stops_the_job_and_deletes_the_partial_vdisk(replays: Any, certificate: Any,
                                                                          tmp_path: Path) -> None:
    """Runs against a recording (cancel.json)."""
    replay = replays("cancel")
    image = image_file(tmp_path, "Gold.vhdx")
    cancel = Flag()

    def progress(percent: float, _message: str) -> None:
        if 0 < percent < 90:
            cancel.cancelled = True

    with pytest.raises(TaskCanceled, match="stopped and the partial vDisk deleted"):
        _connector().deliver(image, sidecar_for(image), _settings(replay, certificate), ACCOUNT[1], progress, cancel)
    assert replay.kinds == ["start", "poll", "cleanup"]
    cleanup = script_data(replay.requests[-4].script)
    assert cleanup["job"] == "0d7e2f7a-61c4-4b1e-8d2c-9a4f5b6c7d8e"
    assert cleanup["destination"] == "D:\\Store\\Gold_20250301T101500Z.vhdx" and cleanup["locator"] is False
    assert replay.state == set()
    assert _refused(script_data(replay.requests[1].script)["url"])


def test_the_host_going_down_mid_transfer(replays: Any, certificate: Any, tmp_path: Path) -> None:
    """Runs against a recording (host_down.json): the server stops answering after the first status."""
    replay = replays("host_down")
    with pytest.raises(EnvironmentProblem) as caught:
        _deliver(replay, certificate, image_file(tmp_path, "Gold.vhdx"))
    message = str(caught.value)
    assert message.startswith("Lost contact with localhost during the transfer: Cannot reach localhost")
    # Nothing could be cleaned up there: the message says exactly what to remove.
    assert "remove BITS job 7a3b9c1d-2e4f-4a6b-8c0d-1e2f3a4b5c6d" in message
    assert "D:\\Store\\Gold_20250301T101500Z.vhdx" in message
    assert ACCOUNT[1] not in message
    assert _refused(script_data(replay.requests[1].script)["url"])
    # When a server closes without answering, http.client abandons the response it began reading and
    # with it a reference to the TLS socket, whose close therefore waits for the garbage collector.
    # Collect it here, where it comes from, so it is not reported against whichever test runs next.
    del caught
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"unclosed <ssl\.SSLSocket", ResourceWarning)
        gc.collect()


def test_a_command_error_while_creating_cleans_up(replays: Any, certificate: Any, tmp_path: Path) -> None:
    """Runs against a recording (command_error.json: PowerShell's error stream as CLIXML, exit code 1)."""
    replay = replays("command_error")
    with pytest.raises(EnvironmentProblem, match="failed \\(create, exit code 1\\): Import-Module : Could not load"):
        _deliver(replay, certificate, image_file(tmp_path, "Gold.vhdx"))
    assert replay.kinds == ["start", "poll", "create", "cleanup"]
    assert script_data(replay.requests[-4].script)["locator"] is False
    assert replay.state == set()


def test_a_full_store_is_a_clear_error_and_the_partial_file_is_deleted(replays: Any, certificate: Any,
                                                                       tmp_path: Path) -> None:
    """Runs against a recording (store_full.json): the store's disk fills up mid-transfer and the BITS job goes
    to the Error state with the system's "There is not enough space on the disk." (ERROR_DISK_FULL); the
    delivery says the store is full, and the clean-up step removes the job, which deletes its partial file."""
    replay = replays("store_full")
    with pytest.raises(UserError) as caught:
        _deliver(replay, certificate, image_file(tmp_path, "Gold.vhdx"))
    message = str(caught.value)
    assert message == (
        "The store 'Store1' on localhost is full: BITS could not write the vDisk there after 2 of 3 MiB (There is "
        "not enough space on the disk.). Free space in the store (or choose another store) and publish again. The "
        "BITS job 5e8f1a2b-3c4d-4e6f-9a0b-7c8d9e0f1a2b was removed on localhost, and with it the partial file."), \
        message
    assert replay.kinds == ["start", "poll", "poll", "cleanup"]
    cleanup = script_data(replay.requests[-4].script)
    assert cleanup["job"] == "5e8f1a2b-3c4d-4e6f-9a0b-7c8d9e0f1a2b" and cleanup["locator"] is False
    assert cleanup["destination"] == "D:\\Store\\Gold_20250301T101500Z.vhdx"
    assert replay.state == set()  # no BITS job, no partial file, no vDisk
    assert ACCOUNT[1] not in message
    assert _refused(script_data(replay.requests[1].script)["url"])


def test_every_script_fits_the_command_line() -> None:
    long = {"url": "http://" + "h" * 200 + "/layerdesk/" + "t" * 43 + "/" + "n" * 80, "site": "s" * 60,
            "store": "s" * 60, "name": "n" * 80, "ext": ".vhdx", "job": "0" * 36, "destination": "D:\\" + "d" * 200,
            "locator": True, "vhdx": True, "script": "C:\\" + "x" * 200,
            "vars": {"ImageName": "i" * 200, "TemplateName": "t" * 100}}
    from app.connectors.pvs import SCRIPTS

    for kind in SCRIPTS:
        assert powershell_arguments(encode_script(kind, long))
