"""The Nutanix AHV connector: a published disk uploaded to the image service through Prism's v3 REST API and
a VM created with a disk cloned from it.

Prism Central (or Prism Element) is reached over HTTPS on port 9440 with basic authentication; the
certificate is verified (against the connector's CA file when it names one). A delivery:

1. finds the cluster, the storage container (``POST /api/nutanix/v3/groups``) and the subnet by name, and
   refuses a VM or an image of the chosen name that exists already (Prism itself would allow duplicates,
   which nobody can tell apart later);
2. creates the image entity (``POST /api/nutanix/v3/images``, a ``DISK_IMAGE`` without a source), streams
   the disk's bytes into it (``PUT /api/nutanix/v3/images/{uuid}/file``) and waits for the image's task
   (``GET /api/nutanix/v3/tasks/{uuid}``) to succeed;
3. creates the VM (``POST /api/nutanix/v3/vms``) on the cluster with one disk cloned from the image into the
   container, a NIC on the subnet and UEFI or legacy BIOS boot by the disk's partition table, and waits
   for its task.

A delivery that fails or is cancelled deletes the VM and the image it created. A storage container that runs
out of space (the upload's answer or a task's ``error_detail`` says so) is :class:`ContainerFull`, a
:class:`UserError` naming the container and what to do. The password is sent
in the ``Authorization`` header only; it never appears in a log, a message or a command line.
"""

from __future__ import annotations

import base64
import logging
import re
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

from app.connectors.base import (
    ConfigField,
    Connector,
    ConnectorSettings,
    DeliveryProgress,
    DeliveryResult,
    FieldKind,
    ImageSidecar,
    TestReport,
    TestSteps,
)
from app.connectors.rest import NAME_PLACEHOLDERS, Response, RestClient, name_from_pattern, wait_cancellable
from app.errors import (
    AuthenticationFailed,
    Conflict,
    EnvironmentProblem,
    LayerDeskError,
    NotFound,
    PermissionDenied,
    UserError,
    ValidationError,
)
from app.procs import Cancellable
from app.tasks.base import TaskCanceled

log = logging.getLogger(__name__)

API = "/api/nutanix/v3"
API_VERSION = "3.1.0"
#: The image service takes these disk formats as they are (it converts them itself).
DISK_SUFFIXES = frozenset({".qcow2", ".vmdk", ".vhd", ".vhdx", ".raw", ".img"})
#: Prism names; kept to characters that need no escaping in a v3 list filter (FIQL).
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,79}$")
_HOST = re.compile(r"^[A-Za-z0-9.-]+$|^\[[0-9A-Fa-f:]+\]$")
#: How long a Prism task may take before LayerDesk gives up waiting (it is left to Prism then).
TASK_TIMEOUT_S = 4 * 3600.0


class ContainerFull(UserError):
    """The storage container has no room for the image's (or the VM disk's) bytes."""


#: How Prism (Stargate, the image service, Acropolis) says a container has no room left; compared lower-cased.
_FULL_TEXTS = ("not enough space", "insufficient space", "insufficient storage", "out of space",
               "no space left", "kdiskspaceunavailable", "disk space unavailable", "container is full")


def says_container_full(text: str) -> bool:
    """Whether a Prism message or task ``error_detail`` says the storage container ran out of space."""
    lowered = text.lower()
    return any(words in lowered for words in _FULL_TEXTS)


def prism_message(response: Response) -> str:
    """The messages of Prism's error JSON (``{"code": 409, "message_list": [...], "state": "ERROR"}``), or
    the HTTP status when the body is no such thing."""
    try:
        data = response.json()
    except EnvironmentProblem:
        data = {}
    messages: list[str] = []
    if isinstance(data, dict):
        for item in data.get("message_list") or ():
            if isinstance(item, dict):
                text = str(item.get("message") or "").strip()
                reason = str(item.get("reason") or "").strip()
                messages.append(f"{text} ({reason})" if text and reason else text or reason)
    return "; ".join(m for m in messages if m) or f"HTTP {response.status} {response.reason}"


class Prism:
    """Prism v3 calls as the connector makes them, each turning Prism's answers into LayerDesk errors."""

    def __init__(self, client: RestClient, settings: ConnectorSettings, password: str | None,
                 poll_s: float) -> None:
        if not settings.username or not password:
            raise AuthenticationFailed(f"The connector {settings.name!r} has no Prism user name or password; set "
                                       "them (the password is kept in the keyring).")
        token = base64.b64encode(f"{settings.username}:{password}".encode()).decode("ascii")
        self._auth = {"Authorization": f"Basic {token}"}
        self.client = client
        self.settings = settings
        self.poll_s = poll_s

    def call(self, method: str, path: str, doing: str, body: Any = None, *, ok: tuple[int, ...] = (200, 202),
             missing_ok: bool = False) -> Any:
        """One v3 call; its JSON answer (``None`` for a 404 when ``missing_ok``). ``doing`` ends the sentence
        "Prism refused to …" of an error."""
        response = self.client.request(method, API + path, headers=self._auth, json_body=body)
        if response.status in ok:
            return response.json()
        if response.status == 404 and missing_ok:
            return None
        raise self.failure(response, doing)

    def failure(self, response: Response, doing: str) -> LayerDeskError:
        message = prism_message(response)
        where = self.client.what
        if says_container_full(message):
            return self.container_full(f"{where} could not {doing}", message)
        if response.status == 401:
            return AuthenticationFailed(f"{where} refused the user name or password of {self.settings.username!r} "
                                        f"({message}). Correct them in the connector.")
        if response.status == 403:
            return PermissionDenied(f"{where} does not let {self.settings.username!r} {doing} ({message}); give the "
                                    "account a role that may.")
        if response.status == 404:
            return NotFound(f"{where} could not {doing}: {message}.")
        if response.status == 409:
            return Conflict(f"{where} refused to {doing}: {message}.")
        if response.status in (400, 422):
            return UserError(f"{where} refused to {doing}: {message}.")
        return EnvironmentProblem(f"{where} could not {doing} (HTTP {response.status}): {message}.")

    def container_full(self, failed: str, detail: str) -> ContainerFull:
        """The error for a full storage container: ``failed`` says what could not be done ("Prism at … could
        not store the image 'x'"), ``detail`` is Prism's own words."""
        container = self.settings.option("container", "")
        return ContainerFull(f"The storage container {container!r} is full: {failed} ({detail.rstrip('.')}). Free "
                             "space in the container (delete old images or VMs, or raise its reservation or "
                             "advertised capacity) or choose another container in the connector, then publish again.")

    def entities(self, kind: str, doing: str, filter_text: str | None = None) -> list[dict[str, Any]]:
        body: dict[str, Any] = {"kind": kind, "length": 500}
        if filter_text:
            body["filter"] = filter_text
        data = self.call("POST", f"/{kind}s/list", doing, body, ok=(200,))
        return [e for e in data.get("entities") or () if isinstance(e, dict)]

    # --- what must exist ------------------------------------------------------------------------------

    def cluster(self, name: str, clusters: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """The cluster named ``name`` (from ``clusters`` when they were listed already)."""
        if clusters is None:
            clusters = self.entities("cluster", "list its clusters")
        for cluster in clusters:
            if _name(cluster) == name:
                return cluster
        known = sorted(_name(c) for c in clusters if "PRISM_CENTRAL" not in _services(c))
        raise NotFound(f"{self.client.what} has no cluster {name!r}; its clusters are {', '.join(known) or 'none'}. "
                       "Correct the connector's cluster.")

    def container(self, name: str, cluster_uuid: str) -> str:
        """The storage container's UUID (v3 has no container list of its own: the groups API has them)."""
        body = {"entity_type": "storage_container", "group_member_count": 500,
                "group_member_attributes": [{"attribute": "container_name"}, {"attribute": "cluster"}]}
        data = self.call("POST", "/groups", "list its storage containers", body, ok=(200,))
        found: list[tuple[str, str, str]] = []
        for group in data.get("group_results") or ():
            for entity in group.get("entity_results") or ():
                values = {d.get("name"): _first_value(d) for d in entity.get("data") or ()}
                found.append((str(entity.get("entity_id", "")), values.get("container_name", ""),
                              values.get("cluster", "")))
        for uuid, container, cluster in found:
            if container == name and (not cluster or cluster == cluster_uuid):
                return uuid
        known = sorted({c for _u, c, cl in found if not cl or cl == cluster_uuid})
        raise NotFound(f"The cluster has no storage container {name!r}; its containers are "
                       f"{', '.join(known) or 'none'}. Correct the connector's storage container.")

    def subnet(self, name: str, cluster_uuid: str) -> str:
        subnets = self.entities("subnet", "list its subnets")
        on_cluster = [s for s in subnets
                      if (s.get("spec", {}).get("cluster_reference") or {}).get("uuid", cluster_uuid) == cluster_uuid]
        for subnet in on_cluster:
            if _name(subnet) == name:
                return str(subnet["metadata"]["uuid"])
        known = sorted(_name(s) for s in on_cluster)
        raise NotFound(f"The cluster has no subnet {name!r}; its subnets are {', '.join(known) or 'none'}. "
                       "Correct the connector's subnet.")

    def refuse_existing(self, kind: str, name: str) -> None:
        field_name = "vm_name" if kind == "vm" else "name"
        found = [e for e in self.entities(kind, f"list its {kind}s", f"{field_name}=={name}") if _name(e) == name]
        if found:
            what = "a VM" if kind == "vm" else "an image"
            raise Conflict(f"{self.client.what} already has {what} named {name!r} ({found[0]['metadata']['uuid']}); "
                           "it was left alone. Rename or remove it, or change the connector's name pattern.")

    # --- tasks --------------------------------------------------------------------------------------------

    def wait(self, task_uuid: str, what: str, cancel: Cancellable | None) -> dict[str, Any]:
        """Poll the task until it ends; the task when it SUCCEEDED, else :class:`ContainerFull` when its
        ``error_detail`` says the container has no room, :class:`EnvironmentProblem` with Prism's reason
        otherwise. ``cancel`` stops the waiting (:class:`TaskCanceled`)."""
        deadline = time.monotonic() + TASK_TIMEOUT_S
        while True:
            task = self.call("GET", f"/tasks/{task_uuid}", f"report on its task {task_uuid}", ok=(200,))
            status = str(task.get("status", ""))
            if status == "SUCCEEDED":
                return dict(task)
            if status in ("FAILED", "ABORTED"):
                detail = str(task.get("error_detail") or task.get("progress_message") or status)
                if says_container_full(detail):
                    raise self.container_full(f"{self.client.what} could not {what}", detail)
                raise EnvironmentProblem(f"{self.client.what} could not {what}: {detail}")
            if time.monotonic() > deadline:
                raise EnvironmentProblem(f"{self.client.what} did not {what} within {TASK_TIMEOUT_S / 3600:.0f} hours "
                                         f"(task {task_uuid} is still {status}).")
            wait_cancellable(self.poll_s, cancel)


def _name(entity: dict[str, Any]) -> str:
    return str((entity.get("spec") or {}).get("name") or (entity.get("status") or {}).get("name") or "")


def _services(cluster: dict[str, Any]) -> list[str]:
    config = ((cluster.get("status") or {}).get("resources") or {}).get("config") or {}
    return list(config.get("service_list") or ())


def _first_value(datum: dict[str, Any]) -> str:
    for entry in datum.get("values") or ():
        for value in entry.get("values") or ():
            return str(value)
    return ""


def boot_type(image: Path) -> str:
    """``"UEFI"`` for a GPT disk, ``"LEGACY"`` for an MBR disk (read with the engine, any disk format)."""
    from app.engine import disk

    table = disk.read_image_partition_table(disk.image_info(image), image.parent)
    return "UEFI" if table.scheme == "gpt" else "LEGACY"


class NutanixConnector(Connector):
    type: ClassVar[str] = "nutanix"
    title: ClassVar[str] = "Nutanix AHV (Prism)"
    fields: ClassVar[tuple[ConfigField, ...]] = (
        ConfigField("endpoint", "Prism host", required=True,
                    help="the Prism Central (or Prism Element) host name or address, without https://"),
        ConfigField("username", "Prism user", required=True, help="a Prism account that may create images and VMs"),
        ConfigField("password", "Password", secret=True, required=True, help="the Prism account's password"),
        ConfigField("verify_tls", "Verify TLS certificates", FieldKind.FLAG, default=True,
                    help="leave on; give a CA file when Prism's certificate is issued by your own CA"),
        ConfigField("port", "Prism port", FieldKind.NUMBER, default=9440, minimum=1, maximum=65535),
        ConfigField("ca_file", "CA file", FieldKind.PATH,
                    help="the PEM file of the CA that issued Prism's certificate"),
        ConfigField("cluster", "Cluster", required=True, help="the AHV cluster the VM is created on"),
        ConfigField("container", "Storage container", required=True, help="the container the VM's disk is put in"),
        ConfigField("subnet", "Subnet", required=True, help="the subnet (network) of the VM's NIC"),
        ConfigField("vm_name", "VM name pattern", default="{template}-{timestamp}",
                    help="the name of the VM and its image; may use "
                         + ", ".join("{" + k + "}" for k in NAME_PLACEHOLDERS)),
        ConfigField("disk_bus", "Disk bus", FieldKind.CHOICE, default="SCSI", choices=("SCSI", "SATA", "IDE"),
                    help="SCSI needs the Nutanix VirtIO drivers in the image (the platform layer)"),
        ConfigField("memory_mb", "Memory (MiB)", FieldKind.NUMBER, default=4096, minimum=256, maximum=4 * 1024**2),
        ConfigField("vcpus", "Virtual CPUs", FieldKind.NUMBER, default=2, minimum=1, maximum=240),
    )

    #: Seconds between two polls of a Prism task.
    poll_s: float = 2.0

    def check_endpoint(self, endpoint: str) -> None:
        if not _HOST.match(endpoint):
            raise ValidationError(f"{endpoint!r} is not a host name or address; write Prism's host alone "
                                  "(pc1.lab.local or 10.0.0.5), its port in the connector's port.", field="endpoint")

    def validate(self, endpoint: str, username: str, options: Mapping[str, Any], *,
                 complete: bool = True) -> dict[str, Any]:
        kept = super().validate(endpoint, username, options, complete=complete)
        if "vm_name" in kept:
            _vm_name(str(kept["vm_name"]), template="Template", image="Image", revision=1,
                     created=datetime(2025, 1, 1, tzinfo=UTC))
        return kept

    def client(self, settings: ConnectorSettings) -> RestClient:
        host = settings.endpoint.strip()
        self.check_endpoint(host)
        port = int(settings.option("port", 9440))
        ca_file = settings.option("ca_file")
        return RestClient(f"https://{host}:{port}", what=f"Prism at {host}:{port}", verify_tls=settings.verify_tls,
                          ca_file=str(ca_file) if ca_file else None)

    # --- test ---------------------------------------------------------------------------------------------

    def test(self, settings: ConnectorSettings, password: str | None) -> TestReport:
        steps = TestSteps(settings.name)
        found: dict[str, Any] = {}
        opened: list[RestClient] = []

        def connect() -> str:
            opened.append(self.client(settings))
            return opened[0].probe_tcp()

        def sign_in() -> str:
            prism = Prism(opened[0], settings, password, self.poll_s)
            clusters = prism.entities("cluster", "list its clusters")
            found["prism"], found["clusters"] = prism, clusters
            return f"signed in as {settings.username}; {len(clusters)} clusters visible"

        def cluster() -> str:
            entity = found["prism"].cluster(str(settings.option("cluster", "")), found["clusters"])
            found["cluster"] = str(entity["metadata"]["uuid"])
            return f"cluster {_name(entity)} ({found['cluster']})"

        def container() -> str:
            uuid = found["prism"].container(str(settings.option("container", "")), found["cluster"])
            return f"storage container {settings.option('container')} ({uuid})"

        def subnet() -> str:
            uuid = found["prism"].subnet(str(settings.option("subnet", "")), found["cluster"])
            return f"subnet {settings.option('subnet')} ({uuid})"

        try:
            steps.run("connect", connect)
            steps.run("TLS", lambda: opened[0].probe_tls())
            steps.run("sign in", sign_in)
            steps.run("cluster", cluster)
            steps.run("storage container", container)
            steps.run("subnet", subnet)
        finally:
            for client in opened:
                client.close()
        return steps.report()

    # --- deliver ------------------------------------------------------------------------------------------

    def deliver(self, image: Path, sidecar: ImageSidecar, settings: ConnectorSettings, password: str | None,
                progress: DeliveryProgress, cancel: Cancellable) -> DeliveryResult:
        if image.suffix.lower() not in DISK_SUFFIXES:
            raise UserError(f"{image.name} is not a disk image AHV can import (a {image.suffix or 'file'}); publish "
                            "the template as qcow2, VHDX, VHD, VMDK or raw for this connector.")
        firmware = boot_type(image)
        name = _vm_name(str(settings.option("vm_name", "{template}-{timestamp}")), template=sidecar.template,
                        image=sidecar.image, revision=sidecar.template_revision, created=sidecar.created_at)
        size = image.stat().st_size
        started = time.monotonic()
        with self.client(settings) as client:
            prism = Prism(client, settings, password, self.poll_s)
            cluster_uuid = str(prism.cluster(str(settings.option("cluster", "")))["metadata"]["uuid"])
            container_uuid = prism.container(str(settings.option("container", "")), cluster_uuid)
            subnet_uuid = prism.subnet(str(settings.option("subnet", "")), cluster_uuid)
            prism.refuse_existing("vm", name)
            prism.refuse_existing("image", name)
            description = (f"LayerDesk: template {sidecar.template} revision {sidecar.template_revision}, "
                           f"published {sidecar.created_at:%Y-%m-%d %H:%M} by {sidecar.created_by}")
            created: dict[str, str] = {}
            try:
                if cancel.cancelled:
                    raise TaskCanceled()
                answer = prism.call("POST", "/images", f"create the image {name!r}", {
                    "spec": {"name": name, "description": description,
                             "resources": {"image_type": "DISK_IMAGE"}},
                    "metadata": {"kind": "image"}, "api_version": API_VERSION})
                created["image"] = str(answer["metadata"]["uuid"])
                image_task = str(answer["status"]["execution_context"]["task_uuid"])
                progress(0.0, f"Uploading {image.name} to {client.what}")
                self._upload(prism, created["image"], image, size, progress, cancel)
                progress(90.0, "Waiting for Prism to store the image")
                prism.wait(image_task, f"store the image {name!r}", cancel)
                answer = prism.call("POST", "/vms", f"create the VM {name!r}", self._vm_spec(
                    name, description, settings, firmware, created["image"], container_uuid, subnet_uuid,
                    cluster_uuid))
                created["vm"] = str(answer["metadata"]["uuid"])
                progress(95.0, f"Creating the VM {name}")
                prism.wait(str(answer["status"]["execution_context"]["task_uuid"]), f"create the VM {name!r}",
                           cancel)
            except BaseException as exc:
                left = self._clean_up(prism, created, name)
                if isinstance(exc, TaskCanceled):
                    raise TaskCanceled(f"The delivery was cancelled; {left}") from None
                if isinstance(exc, LayerDeskError):
                    raise type(exc)(f"{exc.message} {left[0].upper()}{left[1:]}") from None
                raise
            progress(100.0, f"Created the VM {name}")
        log.info("delivered %s to %s as VM %s (image %s)", image.name, client.what, created["vm"], created["image"])
        return DeliveryResult(
            settings.name, self.type, f"{client.what} / {settings.option('cluster')} / VM {name}",
            {"vm_uuid": created["vm"], "image_uuid": created["image"], "cluster_uuid": cluster_uuid, "vm": name},
            size, time.monotonic() - started)

    @staticmethod
    def _upload(prism: Prism, image_uuid: str, image: Path, size: int, progress: DeliveryProgress,
                cancel: Cancellable) -> None:
        def sent(done: int) -> None:
            progress(90.0 * done / max(size, 1), f"Uploaded {done // 1024**2} of {size // 1024**2} MiB")

        with image.open("rb") as source:
            response = prism.client.upload(
                "PUT", f"{API}/images/{image_uuid}/file", source, size, progress=sent, cancel=cancel,
                headers={**prism._auth, "Content-Type": "application/octet-stream", "Accept": "application/json"})
        if response.status not in (200, 202):
            raise prism.failure(response, f"receive the disk of image {image_uuid}")

    def _vm_spec(self, name: str, description: str, settings: ConnectorSettings, firmware: str, image_uuid: str,
                 container_uuid: str, subnet_uuid: str, cluster_uuid: str) -> dict[str, Any]:
        return {
            "spec": {
                "name": name,
                "description": description,
                "resources": {
                    "num_sockets": int(settings.option("vcpus", 2)),
                    "num_vcpus_per_socket": 1,
                    "memory_size_mib": int(settings.option("memory_mb", 4096)),
                    "power_state": "OFF",
                    "boot_config": {"boot_type": firmware},
                    "disk_list": [{
                        "device_properties": {"device_type": "DISK", "disk_address": {
                            "adapter_type": str(settings.option("disk_bus", "SCSI")), "device_index": 0}},
                        "data_source_reference": {"kind": "image", "uuid": image_uuid},
                        "storage_config": {"storage_container_reference": {"kind": "storage_container",
                                                                           "uuid": container_uuid}},
                    }],
                    "nic_list": [{"subnet_reference": {"kind": "subnet", "uuid": subnet_uuid}}],
                },
                "cluster_reference": {"kind": "cluster", "uuid": cluster_uuid},
            },
            "metadata": {"kind": "vm"},
            "api_version": API_VERSION,
        }

    @staticmethod
    def _clean_up(prism: Prism, created: dict[str, str], name: str) -> str:
        """Delete the VM and the image this delivery created (the VM first: its disk was cloned from the
        image); a sentence saying what was removed, or exactly what is left for an administrator to remove
        and where."""
        removed: list[str] = []
        left: list[str] = []
        why = ""
        for kind, path in (("vm", "/vms"), ("image", "/images")):
            uuid = created.get(kind)
            if uuid is None:
                continue
            what = f"the {'VM' if kind == 'vm' else 'image'} {name!r} ({uuid})"
            try:
                answer = prism.call("DELETE", f"{path}/{uuid}", f"delete {what}", missing_ok=True)
                task = ((answer or {}).get("status") or {}).get("execution_context", {}).get("task_uuid")
                if task:
                    prism.wait(str(task), f"delete {what}", None)
                removed.append(what)
            except LayerDeskError as exc:
                log.warning("could not delete %s after a failed delivery: %s", what, exc)
                left.append(what)
                why = why or exc.message.rstrip(".")
        where = prism.client.what
        if left:
            done = f"; {' and '.join(removed)} {'was' if len(removed) == 1 else 'were'} deleted" if removed else ""
            return (f"LayerDesk could not clean up on {where} ({why}){done}: remove {' and '.join(left)} there by "
                    "hand.")
        if removed:
            return f"{' and '.join(removed)} {'was' if len(removed) == 1 else 'were'} deleted from {where}."
        return "nothing was created in Prism."


def _vm_name(pattern: str, *, template: str, image: str, revision: int, created: datetime) -> str:
    """The VM's (and its image's) name from the connector's pattern; :class:`ValidationError` when it is
    not a name LayerDesk gives a Prism VM."""
    name = name_from_pattern(pattern, template=template, image=image, revision=revision, created=created,
                             field="vm_name")
    if not _NAME.match(name):
        raise ValidationError(f"The VM name {name!r} (from the pattern {pattern!r}) is not one LayerDesk gives a "
                              "Prism VM: use letters, digits, spaces, dots, dashes and underscores, at most 80.",
                              field="vm_name")
    return name
