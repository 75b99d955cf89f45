"""The Microsoft Azure connector against recorded Entra ID, Resource Manager and Blob exchanges
(tests/connectors/recordings/azure/), played back by a local HTTPS server whose certificate a CA made for
these tests issued: the connector's own HTTP client runs end to end with TLS verification on, and every
request it sends (form, JSON bodies, page ranges and their bytes, headers present and absent) is compared
with the recording. The fixed VHD it uploads is made by the real qemu-img."""

from __future__ import annotations

import copy
import gc
import re
import subprocess
import warnings
from contextlib import AbstractContextManager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from app.connectors import connector_for
from app.connectors.azure import (
    AzureConnector,
    QuotaReached,
    check_fixed_vhd_footer,
    fixed_vhd_for_azure,
    quota_name,
)
from app.connectors.base import ConnectorSettings
from app.errors import AuthenticationFailed, Conflict, EnvironmentProblem, NotFound, UserError, ValidationError
from app.tasks.base import TaskCanceled
from tests.connectors.conftest import Flag, MiB, sidecar_for
from tests.support.recorded_https import (
    HostDown,
    RecordedServer,
    TestCA,
    load_recording,
    make_test_ca,
    recorded_server,
)

RECORDINGS = Path(__file__).parent / "recordings" / "azure"
SECRET = "Qx8~recorded.client-secret_value"
TENANT = "8c1d4e7a-2b3f-4a96-b5d0-6e9c2a1f7b84"
CLIENT = "a4e9c2d7-1b6f-4e38-9d05-7c3a8f2e1b69"
SUBSCRIPTION = "3f2b7a9c-5e14-4d8b-a6c2-9e1f0d7b4a53"
RAW_SIZE = 12 * MiB + 1024  # not a whole MiB: the connector pads it to 13 MiB
VHD_SIZE = 13 * MiB + 512
#: The disk's page blob, where the SAS URL points (its query, the signature, is never shown).
BLOB_PATH = "/md-impexp-t0rlbvkq2jws/abcd"
SIGNATURE = "REC0RDEDs1gnatureXyZ="
DISK_ID = (f"/subscriptions/{SUBSCRIPTION}/resourceGroups/rg-vdi-images/providers/Microsoft.Compute/disks/"
           "Gold-20250301-101500")


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return make_test_ca(tmp_path_factory.mktemp("azure-ca"))


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    """A GPT disk of 12 MiB + 1 KiB with a marker at 9 MiB and nothing between 4 and 8 MiB."""
    path = tmp_path / "published" / "Gold_2025-03-01_10-15.raw"
    path.parent.mkdir()
    with path.open("wb") as file:
        file.truncate(RAW_SIZE)
    subprocess.run(["sgdisk", "-o", "-n", "1:2048:8191", "-t", "1:0700", str(path)], check=True, capture_output=True)
    with path.open("r+b") as file:
        file.seek(9 * MiB)
        file.write(b"LayerDesk marker at 9 MiB")
    return path


def _settings(server: RecordedServer, ca: TestCA, **options: object) -> ConnectorSettings:
    return ConnectorSettings("Azure", "azure", server.base_url, CLIENT, options={
        "login_endpoint": server.base_url, "ca_file": str(ca.ca_file), "tenant": TENANT, "subscription": SUBSCRIPTION,
        "resource_group": "rg-vdi-images", "location": "westeurope", **options})


def _connector() -> AzureConnector:
    connector = AzureConnector()
    connector.poll_cap_s = 0.0
    return connector


def _play(ca: TestCA, name: str) -> AbstractContextManager[RecordedServer]:
    return recorded_server(ca, RECORDINGS / name, {"secret": SECRET})


def _never_leaks_the_secret(server: RecordedServer) -> None:
    for seen in server.seen[1:]:  # the token request is the only one that carries it
        assert SECRET not in seen.path and SECRET.encode() not in seen.body
        assert SECRET not in str(seen.headers)


def test_the_registry_names_the_azure_connector() -> None:
    assert isinstance(connector_for("azure"), AzureConnector)


def test_the_test_signs_in_and_reads_subscription_group_and_disks(ca: TestCA) -> None:
    """Runs against a recording of Entra ID and Resource Manager answering the test's reads."""
    with _play(ca, "test_ok.json") as server:
        report = _connector().test(_settings(server, ca), SECRET)
        server.assert_played()
    assert report.ok, report
    assert [s.name for s in report.steps] == ["sign in", "subscription", "resource group", "managed disks"]
    assert "subscription VDI Production (Enabled)" in report.steps[1].detail
    assert report.steps[2].detail == "resource group rg-vdi-images in westeurope"
    _never_leaks_the_secret(server)


def test_a_wrong_secret_is_invalid_client(ca: TestCA) -> None:
    """Runs against a recording of Entra ID's 401 invalid_client error JSON."""
    with _play(ca, "test_invalid_client.json") as server:
        report = _connector().test(_settings(server, ca), SECRET)
        server.assert_played()
    assert [s.ok for s in report.steps] == [False, None, None, None]
    failure = report.failure or ""
    assert f"refused the application {CLIENT} in tenant {TENANT} (invalid_client: AADSTS7000215: Invalid client " \
           "secret provided." in failure
    assert "Trace ID" not in failure and SECRET not in failure



def test_a_wrong_secret_stops_a_delivery_before_anything_is_made(ca: TestCA, disk: Path) -> None:
    """Runs against the same recording: the token request is the only exchange."""
    with _play(ca, "test_invalid_client.json") as server, pytest.raises(AuthenticationFailed, match="invalid_client"):
        _connector().deliver(disk, sidecar_for(disk), _settings(server, ca), SECRET, lambda *_: None, Flag())
    server.assert_played()


def test_a_missing_role_is_authorization_failed(ca: TestCA) -> None:
    """Runs against a recording of ARM's 403 AuthorizationFailed error JSON."""
    with _play(ca, "test_forbidden.json") as server:
        report = _connector().test(_settings(server, ca), SECRET)
        server.assert_played()
    assert [s.ok for s in report.steps] == [True, True, True, False]
    assert f"Application {CLIENT} may not list the managed disks of the resource group (AuthorizationFailed: " \
           "The client" in (report.failure or "")
    assert "Give it a role on the resource group" in (report.failure or "")


def test_an_untrusted_certificate_is_refused(ca: TestCA) -> None:
    """Runs against the recording's server without its CA file: nothing is sent, the secret least of all."""
    with _play(ca, "test_ok.json") as server:
        settings = _settings(server, ca)
        report = _connector().test(replace(settings, options={**settings.options, "ca_file": None}), SECRET)
        assert server.seen == []
    assert "could not be verified" in (report.failure or "")


def test_delivery_uploads_the_fixed_vhd_without_its_zero_ranges(ca: TestCA, disk: Path) -> None:
    """Runs against a recording of a whole delivery. The page blob the server assembled from the ranges it
    received is the disk padded to 13 MiB plus a fixed VHD footer; the zero range 4–8 MiB was never sent."""
    messages: list[tuple[float, str]] = []
    with _play(ca, "deliver_ok.json") as server:
        result = _connector().deliver(disk, sidecar_for(disk), _settings(server, ca), SECRET,
                                      lambda p, m: messages.append((p, m)), Flag())
        server.assert_played()
    ranges = [s.headers["x-ms-range"] for s in server.seen if s.query.get("comp") == "page"]
    assert ranges == [f"bytes=0-{4 * MiB - 1}", f"bytes={8 * MiB}-{12 * MiB - 1}", f"bytes={12 * MiB}-{VHD_SIZE - 1}"]
    blob = bytearray(VHD_SIZE)
    for offset, data in server.pages.items():
        blob[offset:offset + len(data)] = data
    assert bytes(blob[:RAW_SIZE]) == disk.read_bytes()
    assert not any(blob[RAW_SIZE:13 * MiB])
    assembled = disk.parent.parent / "blob.vhd"
    assembled.write_bytes(bytes(blob))
    assert check_fixed_vhd_footer(assembled) == 13 * MiB
    assert result.ids == {"disk_id": DISK_ID, "disk": "Gold-20250301-101500", "hyper_v_generation": "V2",
                          "resource_group": "rg-vdi-images"}
    assert result.size_bytes == VHD_SIZE
    assert messages[-1][0] == 100.0 and [p for p, _ in messages] == sorted(p for p, _ in messages)
    assert list(disk.parent.iterdir()) == [disk]  # the converted VHD is gone
    _never_leaks_the_secret(server)


def test_a_missing_resource_group_is_named(ca: TestCA, disk: Path) -> None:
    """Runs against a recording of ARM's 404 ResourceGroupNotFound."""
    with _play(ca, "deliver_resource_group_missing.json") as server, \
            pytest.raises(NotFound, match=r"no resource group 'rg-vdi-images'.*Correct the connector's resource group"):
        _connector().deliver(disk, sidecar_for(disk), _settings(server, ca), SECRET, lambda *_: None, Flag())
    server.assert_played()


def test_an_existing_disk_is_left_alone(ca: TestCA, disk: Path) -> None:
    """Runs against a recording where the disk's GET finds it: no PUT, no DELETE."""
    with _play(ca, "deliver_disk_exists.json") as server, \
            pytest.raises(Conflict, match="already has a managed disk 'Gold-20250301-101500'; it was left alone"):
        _connector().deliver(disk, sidecar_for(disk), _settings(server, ca), SECRET, lambda *_: None, Flag())
    server.assert_played()


def test_a_409_from_the_put_deletes_nothing(ca: TestCA, disk: Path) -> None:
    """Runs against a recording of ARM's 409 Conflict for the disk's PUT: the disk is not ours, so the
    recording ends there and any DELETE would go off it."""
    with _play(ca, "deliver_conflict.json") as server, \
            pytest.raises(Conflict, match=r"refused to create the managed disk 'Gold-20250301-101500': Conflict: "
                                          r"Disk .* being created\. What exists there was left alone\.$"):
        _connector().deliver(disk, sidecar_for(disk), _settings(server, ca), SECRET, lambda *_: None, Flag())
    server.assert_played()


#: The recorded token: it may go into Authorization headers only, never into a message.
TOKEN = ("eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiIsIng1dCI6IlJlY29yZGVkIn0"
         ".eyJhdWQiOiJodHRwczovL21hbmFnZW1lbnQuYXp1cmUuY29tIn0.UmVjb3JkZWQ")


def _deliver_refused_by_quota(ca: TestCA, disk: Path, exchanges: list[dict[str, Any]]) -> tuple[str, RecordedServer]:
    with recorded_server(ca, exchanges, {"secret": SECRET}) as server, pytest.raises(QuotaReached) as caught:
        _connector().deliver(disk, sidecar_for(disk), _settings(server, ca), SECRET, lambda *_: None, Flag())
    server.assert_played()  # the token, the name's GET and the refused PUT; a DELETE would go off the recording
    assert isinstance(caught.value, UserError)
    message = str(caught.value)
    assert message.startswith("Azure refused to create the managed disk 'Gold-20250301-101500': the quota "), message
    assert message.endswith("Nothing was created: the resource group 'rg-vdi-images' has no disk "
                            "'Gold-20250301-101500'."), message
    assert "Usage + quotas" in message and "What exists there was left alone" not in message
    assert [s.method for s in server.seen] == ["POST", "GET", "PUT"]
    assert SECRET not in message and TOKEN not in message and SIGNATURE not in message
    _never_leaks_the_secret(server)
    assert list(disk.parent.iterdir()) == [disk]  # the converted VHD is gone too
    return message, server


def test_a_disk_count_quota_refusing_the_put_names_the_quota_and_creates_nothing(ca: TestCA, disk: Path) -> None:
    """Runs against a recording (deliver_disk_quota.json) of ARM's 409 OperationNotAllowed for the disk's PUT:
    the subscription's StandardSSDStorageDisks quota is used up. The message names that quota, where, and that
    nothing was created; nothing is deleted."""
    message, _server = _deliver_refused_by_quota(ca, disk, load_recording(RECORDINGS / "deliver_disk_quota.json"))
    assert message.startswith(
        "Azure refused to create the managed disk 'Gold-20250301-101500': the quota StandardSSDStorageDisks of "
        f"subscription {SUBSCRIPTION} in westeurope is reached (OperationNotAllowed: Operation results in exceeding "
        "quota limits of StandardSSDStorageDisks. Maximum allowed: 50000, Current in use: 50000, Additional "
        "requested: 1). "), message


def test_a_per_group_resource_quota_refusing_the_put_names_the_quota(ca: TestCA, disk: Path) -> None:
    """Runs against a recording (deliver_disk_quota.json) whose PUT answer is ARM's ResourceQuotaExceeded error
    instead (the resource group holds as many disks as ARM allows a group): the quota is named as ARM words it."""
    exchanges = load_recording(RECORDINGS / "deliver_disk_quota.json")
    exchanges[2]["response"] = {"status": 409, "json": {"error": {
        "code": "ResourceQuotaExceeded",
        "message": "Creating the resource of type Microsoft.Compute/disks would exceed the quota of 800 resources of "
                   "type Microsoft.Compute/disks per resource group. The current resource count is 800, please delete "
                   "some resources of this type before creating a new one."}}}
    message, _server = _deliver_refused_by_quota(ca, disk, exchanges)
    assert "the quota 800 resources of type Microsoft.Compute/disks per resource group of subscription " in message


@pytest.mark.parametrize(("code", "message", "quota"), [
    ("OperationNotAllowed", "Operation results in exceeding quota limits of Core. Maximum allowed: 4, Current in "
                            "use: 4, Additional requested: 2.", "Core"),
    ("OperationNotAllowed", "Operation could not be completed as it results in exceeding approved Total Regional "
                            "Cores quota. Additional details - Location: westeurope", "Total Regional Cores"),
    ("QuotaExceeded", "The request exceeds a quota.", "QuotaExceeded"),
    ("OperationNotAllowed", "Disk resize is not allowed while the disk is attached.", None),
    ("Conflict", "Disk Gold already exists.", None),
])
def test_arm_quota_errors_are_recognised(code: str, message: str, quota: str | None) -> None:
    assert quota_name(code, message) == quota


def test_cancel_mid_upload_ends_access_and_deletes_the_disk(ca: TestCA, disk: Path) -> None:
    """Runs against a recording: one page is written, then the cancel ends the access and deletes the disk,
    waiting for the deletion to succeed (the recording's final state: no disk)."""
    flag = Flag()

    def progress(_percent: float, message: str) -> None:
        if message.startswith("Uploaded"):
            flag.cancelled = True

    with _play(ca, "deliver_cancel.json") as server, \
            pytest.raises(TaskCanceled, match="the managed disk 'Gold-20250301-101500' was deleted"):
        _connector().deliver(disk, sidecar_for(disk), _settings(server, ca), SECRET, progress, flag)
    server.assert_played()
    tail = [(s.method, s.path.rsplit("/", 1)[-1]) for s in server.seen[-4:]]
    assert tail[0] == ("POST", "endGetAccess") and tail[2] == ("DELETE", "Gold-20250301-101500")
    assert list(disk.parent.iterdir()) == [disk]


def _second_page_cut_off() -> dict[str, Any]:
    """deliver_ok.json's second page write (8–12 MiB), as a request whose body never arrives whole."""
    page = copy.deepcopy(load_recording(RECORDINGS / "deliver_ok.json")[9])
    assert page["request"]["headers"]["x-ms-range"] == f"bytes={8 * MiB}-{12 * MiB - 1}"
    del page["request"]["body"]
    page["request"]["aborted"] = True
    return page


def _collect_abandoned_sockets() -> None:
    """A connection reset mid-request leaves http.client's half-read response holding the TLS socket until the
    garbage collector runs: collect it in the test that causes it, not in whichever test runs next."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"unclosed <ssl\.SSLSocket", ResourceWarning)
        gc.collect()


def test_the_storage_host_going_down_mid_upload_ends_access_and_deletes_the_disk(ca: TestCA, disk: Path) -> None:
    """Runs against recordings: deliver_cancel.json (one page written, then the access ended and the disk deleted)
    with deliver_ok.json's second page write put before the clean-up. The server resets that write's connection
    after 1 MiB of its body (5 MiB of the upload) without answering, and the blob path stays down (a retry is
    reset as it arrives), while Resource Manager still answers the clean-up."""
    cancel = load_recording(RECORDINGS / "deliver_cancel.json")
    exchanges = [*cancel[:9], _second_page_cut_off(), *cancel[9:]]
    with recorded_server(ca, exchanges, {"secret": SECRET}, host_down=HostDown(BLOB_PATH, 5 * MiB)) as server, \
            pytest.raises(EnvironmentProblem) as caught:
        _connector().deliver(disk, sidecar_for(disk), _settings(server, ca), SECRET, lambda *_: None, Flag())
    server.assert_played()
    host = server.base_url.removeprefix("https://")
    message = str(caught.value)
    assert re.fullmatch(
        rf"The upload of the disk stopped at 8 of 13 MiB: the connection to {host} was lost during PUT "
        rf"{server.base_url}{BLOB_PATH} \((it was reset|it was closed without an answer)\); the host went down or "
        r"the network between failed\. Check that Azure is reachable from this machine\. The managed disk "
        r"'Gold-20250301-101500' was deleted\.", message), message
    cut = server.seen[9]
    assert cut.cut and cut.headers["x-ms-range"] == f"bytes={8 * MiB}-{12 * MiB - 1}" and len(cut.body) == MiB
    assert len(server.refused) <= 1  # at most one retry of the write, on a fresh connection
    tail = [(s.method, s.path.rsplit("/", 1)[-1]) for s in server.seen[-4:]]
    assert tail[0] == ("POST", "endGetAccess") and tail[2] == ("DELETE", "Gold-20250301-101500")
    assert SIGNATURE not in message and SECRET not in message
    _never_leaks_the_secret(server)
    assert list(disk.parent.iterdir()) == [disk]
    del caught
    _collect_abandoned_sockets()


def test_azure_staying_down_names_the_disk_to_remove_by_hand(ca: TestCA, disk: Path) -> None:
    """Runs against a recording (deliver_ok.json up to its second page write, which is cut off): the server
    resets that write's connection after 1 MiB of its body and stops listening, so neither the end of the access
    nor the disk's deletion reaches it; the message names the disk, its resource group and subscription."""
    exchanges = [*load_recording(RECORDINGS / "deliver_ok.json")[:9], _second_page_cut_off()]
    with recorded_server(ca, exchanges, {"secret": SECRET},
                         host_down=HostDown(BLOB_PATH, 5 * MiB, whole_server=True)) as server, \
            pytest.raises(EnvironmentProblem) as caught:
        _connector().deliver(disk, sidecar_for(disk), _settings(server, ca), SECRET, lambda *_: None, Flag())
    server.assert_played()
    host = server.base_url.removeprefix("https://")
    message = str(caught.value)
    # The write's kept-alive connection is reset; the one retry on a fresh connection is refused, or not tried.
    assert re.match(rf"The upload of the disk stopped at 8 of 13 MiB: the connection to {host} was lost during PUT "
                    rf"{server.base_url}{BLOB_PATH} \((it was reset|it was closed without an answer|Connection "
                    r"refused)\); the host went down", message), message
    assert message.endswith(
        f"LayerDesk could not delete the managed disk 'Gold-20250301-101500' (Cannot reach {host} (Connection "
        "refused); check the address, the port and that Azure is reachable from this machine): remove it from the "
        f"resource group 'rg-vdi-images' of subscription {SUBSCRIPTION} by hand (in the Azure portal; revoke its "
        "upload access first when it still has one)."), message
    assert SIGNATURE not in message and SECRET not in message
    _never_leaks_the_secret(server)
    assert list(disk.parent.iterdir()) == [disk]
    del caught
    _collect_abandoned_sockets()


def test_images_become_fixed_vhds_of_whole_mib(disk: Path, tmp_path: Path) -> None:
    qcow = tmp_path / "Gold.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(disk), str(qcow)], check=True)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    vhd = fixed_vhd_for_azure(qcow, scratch, Flag())
    assert vhd.stat().st_size == VHD_SIZE and check_fixed_vhd_footer(vhd) == 13 * MiB
    assert vhd.read_bytes()[:RAW_SIZE] == disk.read_bytes()
    assert sorted(p.name for p in scratch.iterdir()) == ["Gold.vhd", "pad.raw"]  # the raw copy is gone
    # A fixed VHD of whole MiB is taken as it is.
    assert fixed_vhd_for_azure(vhd, scratch, Flag()) == vhd
    dynamic = tmp_path / "dynamic.vhd"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vpc", str(disk), str(dynamic)], check=True)
    with pytest.raises(UserError, match=r"no VHD footer|not a fixed VHD"):
        check_fixed_vhd_footer(dynamic)
    odd = tmp_path / "odd.vhd"
    odd.write_bytes(vhd.read_bytes()[:-4608] + vhd.read_bytes()[-512:])  # 4 KiB of disk missing
    with pytest.raises(UserError, match=r"footer says .* but the file holds"):
        check_fixed_vhd_footer(odd)


def test_settings_are_checked_when_the_connector_is_added() -> None:
    connector = AzureConnector()
    options = {"tenant": TENANT, "subscription": SUBSCRIPTION, "resource_group": "rg", "location": "westeurope"}
    assert connector.validate("https://management.azure.com", CLIENT, options) == options
    with pytest.raises(ValidationError, match="Subscription ID 'prod' is not a GUID"):
        connector.validate("https://management.azure.com", CLIENT, {**options, "subscription": "prod"})
    with pytest.raises(ValidationError, match="client\\) ID 'svc-layerdesk' is not a GUID"):
        connector.validate("https://management.azure.com", "svc-layerdesk", options)
    with pytest.raises(ValidationError, match="not an https:// address"):
        connector.validate("http://management.azure.com", CLIENT, options)
    with pytest.raises(ValidationError, match="not a managed disk name"):
        connector.validate("https://management.azure.com", CLIENT, {**options, "disk_name": "{template}/x"})
