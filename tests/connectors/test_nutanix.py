"""The Nutanix AHV connector against recorded Prism v3 exchanges (tests/connectors/recordings/nutanix/), played
back by a local HTTPS server whose certificate a CA made for these tests issued: the connector's own HTTP
client runs end to end with TLS verification on, and every request it sends (path, headers, JSON body,
uploaded bytes) is compared with the recording."""

from __future__ import annotations

import base64
import gc
import re
import subprocess
import warnings
from dataclasses import replace
from pathlib import Path

import pytest

from app.connectors import connector_for
from app.connectors.base import ConnectorSettings
from app.connectors.nutanix import ContainerFull, NutanixConnector, says_container_full
from app.errors import Conflict, EnvironmentProblem, NotFound, UserError, ValidationError
from app.tasks.base import TaskCanceled
from tests.connectors.conftest import Flag, MiB, sidecar_for
from tests.support.recorded_https import HostDown, RecordedServer, TestCA, make_test_ca, recorded_server

RECORDINGS = Path(__file__).parent / "recordings" / "nutanix"
PASSWORD = "Nx-s3cret!pw"
IMAGE_UUID = "7e1b5c93-4a2d-4f86-b0e7-1c9a3d5f8e62"
VM_UUID = "e4a7c2d9-6b1f-4c38-9a5e-2d8f0b6c3a17"
UPLOAD_PATH = f"/api/nutanix/v3/images/{IMAGE_UUID}/file"


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return make_test_ca(tmp_path_factory.mktemp("nutanix-ca"))


def _gpt_disk(path: Path, size: int) -> Path:
    """A GPT disk whose bytes are not all the same (so a wrong upload range shows)."""
    with path.open("wb") as file:
        file.truncate(size)
    subprocess.run(["sgdisk", "-o", "-n", "1:2048:0", "-t", "1:0700", str(path)], check=True, capture_output=True)
    with path.open("r+b") as file:
        for offset in range(MiB, size - MiB, MiB):
            file.seek(offset)
            file.write(f"LayerDesk block {offset}".encode())
    return path


def _settings(server: RecordedServer, ca: TestCA, **options: object) -> ConnectorSettings:
    port = server.base_url.rsplit(":", 1)[1]
    return ConnectorSettings("AHV", "nutanix", "127.0.0.1", "layerdesk-svc",
                             options={"port": int(port), "ca_file": str(ca.ca_file), "cluster": "AHV-Lab",
                                      "container": "Images", "subnet": "VDI-VLAN20", **options})


def _values(image: Path | None = None) -> dict[str, str]:
    auth = "Basic " + base64.b64encode(f"layerdesk-svc:{PASSWORD}".encode()).decode()
    return {"auth": auth, "size": str(image.stat().st_size) if image else "0"}


def _connector() -> NutanixConnector:
    connector = NutanixConnector()
    connector.poll_s = 0.0
    return connector


@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _gpt_disk(tmp_path_factory.mktemp("nutanix-disk") / "Gold_2025-03-01_10-15.raw", 5 * MiB)


def _never_leaks_the_password(server: RecordedServer) -> None:
    for seen in server.seen:
        assert PASSWORD not in seen.path and PASSWORD.encode() not in seen.body


def test_the_registry_names_the_nutanix_connector() -> None:
    assert isinstance(connector_for("nutanix"), NutanixConnector)


def test_the_test_walks_tcp_tls_sign_in_cluster_container_subnet(ca: TestCA) -> None:
    """Runs against a recording of Prism Central answering the lookups."""
    with recorded_server(ca, RECORDINGS / "test_ok.json", _values()) as server:
        report = _connector().test(_settings(server, ca), PASSWORD)
        server.assert_played()
    assert report.ok, report
    assert [s.name for s in report.steps] == ["connect", "TLS", "sign in", "cluster", "storage container", "subnet"]
    assert "verified" in report.steps[1].detail and "LayerDesk Test CA" in report.steps[1].detail
    assert "cluster AHV-Lab (0005f1a2-9c4b-3e7d-0000-00000000e1a5)" in report.steps[3].detail
    assert "b2c9e7a4-5d31-4f0a-8e6b-3a9d1c7f2e40" in report.steps[4].detail


def test_a_wrong_password_is_a_clear_sign_in_failure(ca: TestCA) -> None:
    """Runs against a recording of Prism's 401 error JSON."""
    with recorded_server(ca, RECORDINGS / "test_bad_password.json", _values()) as server:
        report = _connector().test(_settings(server, ca), PASSWORD)
        server.assert_played()
    assert [(s.name, s.ok) for s in report.steps][:4] == [("connect", True), ("TLS", True), ("sign in", False),
                                                           ("cluster", None)]
    assert "refused the user name or password of 'layerdesk-svc' (Authentication required. " \
           "(AUTHENTICATION_REQUIRED))" in (report.failure or "")
    assert PASSWORD not in (report.failure or "")


def test_an_untrusted_certificate_fails_the_tls_step(ca: TestCA) -> None:
    """Runs against the recording's server without its CA file: verification stays on and refuses it."""
    with recorded_server(ca, RECORDINGS / "test_ok.json", _values()) as server:
        report = _connector().test(replace(_settings(server, ca), options={
            **_settings(server, ca).options, "ca_file": None}), PASSWORD)
        assert server.seen == []  # no request went out over the unverified connection
    assert [(s.name, s.ok) for s in report.steps][:3] == [("connect", True), ("TLS", False), ("sign in", None)]
    assert "could not be verified" in (report.failure or "") and "CA file" in (report.failure or "")


def test_verification_off_is_an_explicit_choice(ca: TestCA) -> None:
    """Runs against a recording; with verification turned off the same server is accepted and said to be
    unverified."""
    with recorded_server(ca, RECORDINGS / "test_ok.json", _values()) as server:
        settings = _settings(server, ca)
        report = _connector().test(replace(settings, verify_tls=False, options={**settings.options, "ca_file": None}),
                                   PASSWORD)
        server.assert_played()
    assert report.ok and "NOT verified" in report.steps[1].detail


def test_an_unreachable_host_is_a_clear_error() -> None:
    settings = ConnectorSettings("AHV", "nutanix", "127.0.0.1", "u", options={"port": 1, "cluster": "c",
                                                                              "container": "c", "subnet": "s"})
    report = _connector().test(settings, PASSWORD)
    assert [s.ok for s in report.steps][:2] == [False, None]
    assert "Cannot reach 127.0.0.1:1" in (report.failure or "")


def test_delivery_uploads_the_disk_and_creates_the_vm(ca: TestCA, disk: Path) -> None:
    """Runs against a recording of a whole delivery: the image's bytes and every JSON body are checked."""
    seen: list[float] = []
    with recorded_server(ca, RECORDINGS / "deliver_ok.json", _values(disk), upload=disk) as server:
        result = _connector().deliver(disk, sidecar_for(disk), _settings(server, ca), PASSWORD,
                                      lambda p, _m: seen.append(p), Flag())
        server.assert_played()
    upload = server.seen[6]
    assert upload.method == "PUT" and upload.body == disk.read_bytes()
    assert result.ids == {"vm_uuid": VM_UUID, "image_uuid": IMAGE_UUID,
                          "cluster_uuid": "0005f1a2-9c4b-3e7d-0000-00000000e1a5", "vm": "Gold-20250301-101500"}
    assert seen[-1] == 100.0 and seen == sorted(seen)
    _never_leaks_the_password(server)


def test_a_missing_container_is_named_with_those_that_exist(ca: TestCA, disk: Path) -> None:
    """Runs against a recording of a cluster without the container."""
    with recorded_server(ca, RECORDINGS / "deliver_missing_container.json", _values(disk)) as server, \
            pytest.raises(NotFound, match="no storage container 'Images'; its containers are SelfServiceContainer, "
                                          "default-container-41"):
        _connector().deliver(disk, sidecar_for(disk), _settings(server, ca), PASSWORD, lambda *_: None, Flag())
    server.assert_played()


def test_a_name_clash_from_prism_leaves_nothing_behind(ca: TestCA, disk: Path) -> None:
    """Runs against a recording of Prism's 409 error JSON for the image; nothing was created, so nothing is
    deleted (the recording holds no DELETE, and any extra request fails it)."""
    with recorded_server(ca, RECORDINGS / "deliver_name_clash.json", _values(disk)) as server, \
            pytest.raises(Conflict, match="refused to create the image 'Gold-20250301-101500': Image with name "
                                          r"Gold-20250301-101500 already exists .*Nothing was created in Prism"):
        _connector().deliver(disk, sidecar_for(disk), _settings(server, ca), PASSWORD, lambda *_: None, Flag())
    server.assert_played()


def test_an_existing_vm_of_the_name_is_refused_before_anything_is_made(ca: TestCA, disk: Path) -> None:
    """Runs against a recording where the VM list finds the name."""
    with recorded_server(ca, RECORDINGS / "deliver_vm_exists.json", _values(disk)) as server, \
            pytest.raises(Conflict, match=r"already has a VM named 'Gold-20250301-101500'.*left alone"):
        _connector().deliver(disk, sidecar_for(disk), _settings(server, ca), PASSWORD, lambda *_: None, Flag())
    server.assert_played()


def test_cancel_mid_upload_deletes_the_image(ca: TestCA, disk: Path) -> None:
    """Runs against a recording: the upload's body is cut off after its first MiB, then the image is deleted
    and its delete task waited for (the recording's last exchanges)."""
    flag = Flag()

    def progress(percent: float, _message: str) -> None:
        if percent > 0:
            flag.cancelled = True

    with recorded_server(ca, RECORDINGS / "deliver_cancel.json", _values(disk), upload=disk) as server, \
            pytest.raises(TaskCanceled, match=f"the image 'Gold-20250301-101500' \\({IMAGE_UUID}\\) was deleted from "
                                              "Prism at 127.0.0.1:"):
        _connector().deliver(disk, sidecar_for(disk), _settings(server, ca), PASSWORD, progress, flag)
    server.assert_played()
    assert server.seen[6].aborted and len(server.seen[6].body) < disk.stat().st_size
    assert (server.seen[-2].method, server.seen[-2].path) == ("DELETE", f"/api/nutanix/v3/images/{IMAGE_UUID}")


def _collect_abandoned_sockets() -> None:
    """When a server resets a connection mid-request, http.client abandons the response it began reading and
    with it a reference to the TLS socket, whose close then waits for the garbage collector: collect it here,
    in the test that causes it, so it is not reported against whichever test runs next."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"unclosed <ssl\.SSLSocket", ResourceWarning)
        gc.collect()


def test_the_host_going_down_mid_upload_deletes_the_image_once_it_answers_again(ca: TestCA, disk: Path) -> None:
    """Runs against a recording (deliver_cancel.json: the upload's body cut off, then the image deleted and its
    delete task waited for). Here no cancel cuts the body: the server resets the upload's connection after its
    first MiB without answering, as a host going away does, and is reachable again for the clean-up."""
    with recorded_server(ca, RECORDINGS / "deliver_cancel.json", _values(disk), upload=disk,
                         host_down=HostDown(UPLOAD_PATH, MiB)) as server, \
            pytest.raises(EnvironmentProblem) as caught:
        _connector().deliver(disk, sidecar_for(disk), _settings(server, ca), PASSWORD, lambda *_: None, Flag())
    server.assert_played()
    host = server.base_url.removeprefix("https://")
    message = str(caught.value)
    assert re.fullmatch(
        rf"The connection to {host} was lost during the upload to {server.base_url}{UPLOAD_PATH}, after [\d.]+ of "
        r"5 MiB \((it was reset|it was closed without an answer)\); the host went down or the network between "
        rf"failed\. Check that Prism at {host} is reachable from this machine\. The image 'Gold-20250301-101500' "
        rf"\({IMAGE_UUID}\) was deleted from Prism at {host}\.", message), message
    upload = server.seen[6]
    assert upload.cut and len(upload.body) == MiB and upload.body == disk.read_bytes()[:MiB]
    assert [(s.method, s.path) for s in server.seen if s.method == "DELETE"] == [
        ("DELETE", f"/api/nutanix/v3/images/{IMAGE_UUID}")]
    assert PASSWORD not in message
    _never_leaks_the_password(server)
    del caught
    _collect_abandoned_sockets()


def test_the_host_staying_down_names_the_image_to_remove_by_hand(ca: TestCA, disk: Path) -> None:
    """Runs against a recording (deliver_cancel.json, up to its cut-off upload): the server resets the upload's
    connection after its first MiB and stops listening, so the image's DELETE cannot reach it either; the
    message names exactly what the administrator must remove, and where."""
    with recorded_server(ca, RECORDINGS / "deliver_cancel.json", _values(disk), upload=disk,
                         host_down=HostDown(UPLOAD_PATH, MiB, whole_server=True)) as server, \
            pytest.raises(EnvironmentProblem) as caught:
        _connector().deliver(disk, sidecar_for(disk), _settings(server, ca), PASSWORD, lambda *_: None, Flag())
    server.assert_played(7)  # the lookups, the image's creation and the cut-off upload; nothing after
    host = server.base_url.removeprefix("https://")
    message = str(caught.value)
    assert message.startswith(f"The connection to {host} was lost during the upload to {server.base_url}"
                              f"{UPLOAD_PATH}, after "), message
    assert message.endswith(
        f"LayerDesk could not clean up on Prism at {host} (Cannot reach {host} (Connection refused); check the "
        f"address, the port and that Prism at {host} is reachable from this machine): remove the image "
        f"'Gold-20250301-101500' ({IMAGE_UUID}) there by hand."), message
    assert server.seen[6].cut
    assert PASSWORD not in message
    _never_leaks_the_password(server)
    del caught
    _collect_abandoned_sockets()


def test_a_failed_vm_task_deletes_the_half_vm_and_the_image(ca: TestCA, disk: Path) -> None:
    """Runs against a recording where Prism's create_vm task FAILED (its disk's clone found the container full:
    a :class:`ContainerFull`, which the user fixes)."""
    with recorded_server(ca, RECORDINGS / "deliver_vm_task_fails.json", _values(disk), upload=disk) as server, \
            pytest.raises(ContainerFull, match="Not enough space in storage container Images.* The VM "
                                               rf"'Gold-20250301-101500' \({VM_UUID}\) and the image "
                                               rf"'Gold-20250301-101500' \({IMAGE_UUID}\) were deleted"):
        _connector().deliver(disk, sidecar_for(disk), _settings(server, ca), PASSWORD, lambda *_: None, Flag())
    server.assert_played()
    deletes = [(s.method, s.path) for s in server.seen if s.method == "DELETE"]
    assert deletes == [("DELETE", f"/api/nutanix/v3/vms/{VM_UUID}"), ("DELETE", f"/api/nutanix/v3/images/{IMAGE_UUID}")]


def _assert_container_full(message: str, failed: str, server: RecordedServer) -> None:
    """``message`` says the container is full, what failed, what to do and that the half image was deleted; it
    holds no secret; and the server's request log ends with the image's DELETE and its task."""
    host = server.base_url.removeprefix("https://")
    assert message.startswith(f"The storage container 'Images' is full: Prism at {host} could not {failed} ("), message
    assert "Free space in the container" in message and "choose another container in the connector" in message
    assert message.endswith(f"The image 'Gold-20250301-101500' ({IMAGE_UUID}) was deleted from Prism at {host}."), \
        message
    assert PASSWORD not in message and _values()["auth"] not in message
    assert [(s.method, s.path) for s in server.seen if s.method == "DELETE"] == [
        ("DELETE", f"/api/nutanix/v3/images/{IMAGE_UUID}")]
    assert (server.seen[-1].method, server.seen[-1].path) == ("GET", "/api/nutanix/v3/tasks/"
                                                                      "9c3a6e1f-7d2b-4e58-b1a9-4f8d2c6e0a75")
    assert not any(s.path == "/api/nutanix/v3/vms" for s in server.seen)  # no VM was even asked for
    _never_leaks_the_password(server)


def test_a_full_container_refusing_the_upload_deletes_the_half_image(ca: TestCA, disk: Path) -> None:
    """Runs against a recording (deliver_upload_container_full.json): Prism answers the image's PUT .../file with
    its v3 error JSON (message_list: insufficient space in the container); the delivery says the container is full
    and what to do, and deletes the half image, waiting for its delete task."""
    with recorded_server(ca, RECORDINGS / "deliver_upload_container_full.json", _values(disk), upload=disk) as server, \
            pytest.raises(ContainerFull) as caught:
        _connector().deliver(disk, sidecar_for(disk), _settings(server, ca), PASSWORD, lambda *_: None, Flag())
    server.assert_played()
    assert isinstance(caught.value, UserError)
    message = str(caught.value)
    _assert_container_full(message, f"receive the disk of image {IMAGE_UUID}", server)
    assert "(Image upload failed: Insufficient space in storage container Images to write 5242880 bytes (0 bytes " \
           "available). (INTERNAL_ERROR))" in message
    assert server.seen[6].body == disk.read_bytes()


def test_a_full_container_failing_the_image_task_deletes_the_half_image(ca: TestCA, disk: Path) -> None:
    """Runs against a recording (deliver_image_task_container_full.json): the upload is taken, then the image's
    create_image task ends FAILED with an error_detail saying the container has no space; the delivery says the
    container is full and deletes the half image."""
    with recorded_server(ca, RECORDINGS / "deliver_image_task_container_full.json", _values(disk),
                         upload=disk) as server, pytest.raises(ContainerFull) as caught:
        _connector().deliver(disk, sidecar_for(disk), _settings(server, ca), PASSWORD, lambda *_: None, Flag())
    server.assert_played()
    message = str(caught.value)
    _assert_container_full(message, "store the image 'Gold-20250301-101500'", server)
    assert "Image create failed: Not enough space in storage container Images)" in message


@pytest.mark.parametrize(("text", "full"), [
    ("Failed to clone the image disk: Not enough space in storage container Images.", True),
    ("kDiskSpaceUnavailable", True),
    ("No space left on device", True),
    ("Image with name Gold already exists", False),
    ("Authentication required.", False),
])
def test_prism_texts_that_mean_a_full_container(text: str, full: bool) -> None:
    assert says_container_full(text) is full


def test_settings_are_checked_when_the_connector_is_added() -> None:
    connector = NutanixConnector()
    options = {"cluster": "c", "container": "c", "subnet": "s"}
    assert connector.validate("pc1.lab.local", "u", options)["cluster"] == "c"
    with pytest.raises(ValidationError, match="not a host name"):
        connector.validate("https://pc1:9440", "u", options)
    with pytest.raises(ValidationError, match=r"cannot be filled in .*\{template\}"):
        connector.validate("pc1", "u", {**options, "vm_name": "{owner}-vm"})
    with pytest.raises(ValidationError, match="letters, digits"):
        connector.validate("pc1", "u", {**options, "vm_name": "{template};drop"})
