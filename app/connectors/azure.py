"""The Microsoft Azure connector: a published disk uploaded as a managed disk, through Azure Resource Manager
(ARM) REST and the page blob upload protocol, without the Azure SDK.

Azure imports a disk only as a *fixed* VHD whose virtual size is a whole number of MiB (the file is that
plus its 512-byte footer). The published image is converted to one with qemu-img (through
:mod:`app.engine.disk`) unless it is one already, and its footer is checked. Then:

1. an OAuth2 client-credentials token for ARM comes from Microsoft Entra ID
   (``POST {login}/{tenant}/oauth2/v2.0/token``) with the connector's application (client) ID and secret;
2. the disk name is checked to be free (``GET …/disks/{name}``) and the disk created empty for upload
   (``PUT …/Microsoft.Compute/disks/{name}`` with ``creationData.createOption=Upload`` and
   ``uploadSizeBytes`` = the VHD's size);
3. write access is granted (``POST …/beginGetAccess``, an asynchronous operation polled through its
   ``Azure-AsyncOperation`` or ``Location`` header) and gives a SAS URL of the disk's page blob;
4. the VHD is written with ``PUT <SAS>&comp=page`` (``x-ms-page-write: update``, ``x-ms-range``) in ranges of
   at most 4 MiB; a range that is all zeros is not sent (a new disk reads as zeros);
5. access is ended (``POST …/endGetAccess``), which turns the disk from ``ActiveUpload`` to ``Unattached``.

A delivery that fails or is cancelled after the disk was created ends the access and deletes the disk. A disk
refused because a quota of the subscription is reached (ARM's ``OperationNotAllowed`` / ``QuotaExceeded``) is
:class:`QuotaReached`, a :class:`UserError` naming the quota and saying that nothing was created. The
client secret goes only into the token request's body, the token only into ``Authorization`` headers, and the
SAS URL (its query is a signature) is never logged nor shown.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import re
import struct
import tempfile
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import quote, urlencode
from xml.etree import ElementTree as ET

from app import procs
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
from app.connectors.rest import (
    NAME_PLACEHOLDERS,
    Response,
    RestClient,
    name_from_pattern,
    wait_cancellable,
    without_query,
)
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

MiB = 1024 * 1024
SECTOR = 512
#: The largest range one ``Put Page`` may write.
PAGE_RANGE = 4 * MiB
_ZERO_RANGE = bytes(PAGE_RANGE)
DISKS_API = "2023-04-02"
RESOURCES_API = "2021-04-01"
SUBSCRIPTIONS_API = "2022-12-01"
#: The Blob service version the page writes speak.
BLOB_VERSION = "2021-08-06"
#: How long write access to the disk is granted for (an upload must finish within it).
ACCESS_SECONDS = 24 * 3600
#: Azure's limit for an uploaded OS disk (32 TiB + footer); larger ones are refused before any upload.
MAX_DISK = 32 * 1024**4
ASYNC_TIMEOUT_S = 3600.0
SKUS = ("Standard_LRS", "StandardSSD_LRS", "Premium_LRS", "StandardSSD_ZRS", "Premium_ZRS", "PremiumV2_LRS")
#: Managed disk names: 1–80 letters, digits, ``_ . -``; starting with a letter or digit, not ending in ``.``/``-``.
_DISK_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,78}[A-Za-z0-9_])?$")
_GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


# --- the fixed VHD Azure takes -------------------------------------------------------------------------


def check_fixed_vhd_footer(vhd: Path) -> int:
    """The virtual size of ``vhd`` after checking its footer is one Azure accepts: ``conectix`` cookie, type
    fixed, a correct checksum, a current size of whole MiB and a file of exactly that size plus the footer.
    :class:`UserError` saying what is wrong otherwise."""
    size = vhd.stat().st_size
    if size < SECTOR + MiB:
        raise UserError(f"{vhd.name} is too small to be a disk ({size} bytes).")
    with vhd.open("rb") as file:
        file.seek(size - SECTOR)
        footer = file.read(SECTOR)
    if footer[:8] != b"conectix":
        raise UserError(f"{vhd.name} has no VHD footer (no 'conectix' cookie in its last 512 bytes).")
    disk_type = struct.unpack_from(">I", footer, 60)[0]
    if disk_type != 2:
        raise UserError(f"{vhd.name} is not a fixed VHD (its footer says disk type {disk_type}); Azure takes fixed "
                        "VHDs only.")
    stored = struct.unpack_from(">I", footer, 64)[0]
    blank = footer[:64] + bytes(4) + footer[68:]
    if stored != (~sum(blank) & 0xFFFFFFFF):
        raise UserError(f"{vhd.name} has a damaged VHD footer (its checksum does not match).")
    current = int(struct.unpack_from(">Q", footer, 48)[0])
    if current != size - SECTOR:
        raise UserError(f"{vhd.name}'s footer says {current} bytes of disk, but the file holds {size - SECTOR}.")
    if current % MiB:
        raise UserError(f"{vhd.name} is {current} bytes of disk, not a whole number of MiB as Azure requires.")
    return current


def fixed_vhd_for_azure(image: Path, scratch: Path, cancel: Cancellable,
                        progress: DeliveryProgress | None = None) -> Path:
    """``image`` itself when it is a fixed VHD of whole MiB, else a fixed VHD made from it in ``scratch``
    (qemu-img: any format to raw, zeros added up to the next whole MiB, raw to fixed VHD); its footer is
    checked either way. :class:`TaskCanceled` when ``cancel`` is set while converting."""
    from app.engine import disk

    info = disk.image_info(image)
    if info.fixed_vhd and info.virtual_size % MiB == 0:
        check_fixed_vhd_footer(image)
        return image

    def step(done: int, total: int) -> None:
        if progress is not None:
            progress(10.0 * done / max(total, 1), f"Converting {image.name} to a fixed VHD for Azure")

    if info.format == "raw":
        raw = image
    else:
        raw = scratch / "disk.raw"
        qemu_img = procs.find_program("qemu-img", package_hint="the Debian package qemu-utils")
        outcome = procs.stream([qemu_img, "convert", "-f", info.format, "-O", "raw", str(image), str(raw)],
                               lambda _line: None, cancel)
        if outcome.cancelled:
            raise TaskCanceled()
        if not outcome.ok:
            raise EnvironmentProblem(f"qemu-img could not read {image.name}: {outcome.stderr.strip()[-400:]}")
    size = raw.stat().st_size
    pieces = [raw]
    padded = math.ceil(size / MiB) * MiB
    if padded != size:
        # The disk grows to the next whole MiB with zeros at its end (a hole: nothing is written).
        pad = scratch / "pad.raw"
        with pad.open("wb") as file:
            file.truncate(padded - size)
        pieces.append(pad)
    out = scratch / f"{image.stem}.vhd"
    disk.convert(pieces, out, "vhd-fixed", step, cancel)
    if raw != image:
        raw.unlink()
    check_fixed_vhd_footer(out)
    return out


def hyper_v_generation(vhd: Path, size: int) -> str:
    """``"V2"`` (UEFI) for a GPT disk, ``"V1"`` (BIOS) for an MBR disk."""
    from app.engine import disk

    return "V2" if disk.read_partition_table(vhd, size=size).scheme == "gpt" else "V1"


# --- ARM and Entra ID ----------------------------------------------------------------------------------


def arm_message(response: Response) -> tuple[str, str]:
    """``(code, message)`` of ARM's error JSON (``{"error": {"code": …, "message": …}}``), of Entra ID's
    (``{"error": "invalid_client", "error_description": …}``) or of the Blob service's XML."""
    if response.body.lstrip().startswith(b"<"):
        try:
            root = ET.fromstring(response.body)  # noqa: S314 - a short error document from the peer
            return root.findtext("Code") or "", (root.findtext("Message") or "").splitlines()[0]
        except ET.ParseError:
            return "", f"HTTP {response.status} {response.reason}"
    try:
        data = response.json()
    except EnvironmentProblem:
        data = {}
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        return str(error.get("code", "")), str(error.get("message", "")).strip()
    if isinstance(error, str):
        # Entra ID's description has its trace and correlation ids on further lines: the first says it.
        description = str(data.get("error_description", "")).strip().splitlines()
        return error, description[0] if description else error
    return "", f"HTTP {response.status} {response.reason}"


class QuotaReached(UserError):
    """A quota of the subscription (a count or size of managed disks, cores, resources of a type per group) stops
    Azure from creating what the delivery needs."""


#: ARM's codes for a request refused by a quota (``OperationNotAllowed`` only when its message says quota).
_QUOTA_CODES = frozenset({"QuotaExceeded", "ResourceQuotaExceeded", "OperationNotAllowed"})
#: How ARM names the quota in its message: "… exceeding quota limits of StandardSSDStorageDisks. Maximum …",
#: "… exceeding approved Total Regional Cores quota …", "… would exceed the quota of 800 resources of type …".
_QUOTA_NAME = re.compile(r"quota limits of (?P<limits>.+?)\.(?:\s|$)|exceeding approved (?P<approved>.+?) quota"
                         r"|exceed the quota of (?P<count>.+?)\.(?:\s|$)")


def quota_name(code: str, message: str) -> str | None:
    """The quota an ARM error says is reached (its name as ARM gives it, or ``code`` when the message does not
    name one); ``None`` when the error is not about a quota."""
    if code not in _QUOTA_CODES or (code == "OperationNotAllowed" and "quota" not in message.lower()):
        return None
    found = _QUOTA_NAME.search(message)
    if found is None:
        return code
    return next(value for value in found.groupdict().values() if value).strip()


class Arm:
    """Calls to Entra ID and ARM as the connector makes them, each turning Azure's answers into LayerDesk
    errors."""

    def __init__(self, client: RestClient, settings: ConnectorSettings, poll_cap_s: float) -> None:
        self.client = client
        self.settings = settings
        self.poll_cap_s = poll_cap_s
        self._token: str | None = None
        subscription = quote(str(settings.option("subscription", "")), safe="")
        group = quote(str(settings.option("resource_group", "")), safe="")
        self.subscription_path = f"/subscriptions/{subscription}"
        self.group_path = f"{self.subscription_path}/resourceGroups/{group}"

    def sign_in(self, secret: str | None) -> str:
        """Get an ARM token with the client secret; what was signed in as."""
        settings = self.settings
        if not settings.username or not secret:
            raise AuthenticationFailed(f"The connector {settings.name!r} has no application (client) ID or client "
                                       "secret; set them (the secret is kept in the keyring).")
        tenant = str(settings.option("tenant", ""))
        login = str(settings.option("login_endpoint", "https://login.microsoftonline.com")).rstrip("/")
        form = urlencode({"client_id": settings.username, "client_secret": secret, "grant_type": "client_credentials",
                          "scope": str(settings.option("token_scope", "https://management.azure.com/.default"))})
        response = self.client.request("POST", f"{login}/{quote(tenant, safe='')}/oauth2/v2.0/token",
                                       headers={"Content-Type": "application/x-www-form-urlencoded"},
                                       body=form.encode("ascii"))
        if response.status != 200:
            code, message = arm_message(response)
            if response.status in (400, 401) and code in ("invalid_client", "unauthorized_client"):
                raise AuthenticationFailed(f"Microsoft Entra ID refused the application {settings.username} in tenant "
                                           f"{tenant} ({code}: {message}). Correct the client ID or secret.")
            if "AADSTS90002" in message or "AADSTS900023" in message:
                raise NotFound(f"Microsoft Entra ID has no tenant {tenant!r} ({message}). Correct the tenant.")
            raise AuthenticationFailed(f"Microsoft Entra ID gave no token to {settings.username} "
                                       f"(HTTP {response.status} {code}: {message}).")
        token = response.json().get("access_token")
        if not isinstance(token, str) or not token:
            raise EnvironmentProblem("Microsoft Entra ID answered without an access token.")
        self._token = token
        return f"signed in to tenant {tenant} as application {settings.username}"

    @property
    def _auth(self) -> dict[str, str]:
        assert self._token is not None, "sign_in first"
        return {"Authorization": f"Bearer {self._token}"}

    def request(self, method: str, url: str, body: Any = None) -> Response:
        return self.client.request(method, url, headers=self._auth, json_body=body)

    def failure(self, response: Response, doing: str) -> LayerDeskError:
        code, message = arm_message(response)
        message = message.rstrip(".")
        detail = f"{code}: {message}" if code else message
        if response.status == 401:
            return AuthenticationFailed(f"Azure refused the token of application {self.settings.username} ({detail}).")
        quota = quota_name(code, message)
        if quota is not None:
            settings = self.settings
            return QuotaReached(f"Azure refused to {doing}: the quota {quota} of subscription "
                                f"{settings.option('subscription')} in {settings.option('location')} is reached "
                                f"({detail}). Delete managed disks (or other resources) you no longer need, or "
                                "ask for a higher quota (Azure portal: Subscriptions > Usage + quotas), then publish "
                                "again.")
        if response.status == 403:
            return PermissionDenied(f"Application {self.settings.username} may not {doing} ({detail}). Give it a role "
                                    "on the resource group that may (Disk Snapshot Contributor or Contributor).")
        if code == "ResourceGroupNotFound":
            return NotFound(f"The subscription has no resource group {self.settings.option('resource_group')!r} "
                            f"({message}). Correct the connector's resource group.")
        if code in ("SubscriptionNotFound", "InvalidSubscriptionId"):
            return NotFound(f"Azure knows no subscription {self.settings.option('subscription')!r} for this "
                            f"application ({message}). Correct the connector's subscription.")
        if response.status == 404:
            return NotFound(f"Azure could not {doing}: {detail}.")
        if response.status == 409:
            return Conflict(f"Azure refused to {doing}: {detail}. What exists there was left alone.")
        if response.status in (400, 412, 422):
            return UserError(f"Azure refused to {doing}: {detail}.")
        return EnvironmentProblem(f"Azure could not {doing} (HTTP {response.status}): {detail}.")

    def call(self, method: str, url: str, doing: str, body: Any = None,
             ok: tuple[int, ...] = (200, 201, 202)) -> Response:
        response = self.request(method, url, body)
        if response.status not in ok:
            raise self.failure(response, doing)
        return response

    def wait(self, accepted: Response, doing: str, cancel: Cancellable | None) -> dict[str, Any]:
        """Follow an accepted request's asynchronous operation to its end; its result: the operation's
        ``properties.output`` through ``Azure-AsyncOperation``, else what ``Location`` gives once it answers
        200. The answer itself when it is final already."""
        operation = accepted.header("Azure-AsyncOperation")
        location = accepted.header("Location")
        if accepted.status in (200, 201) and not operation:
            data = accepted.json()
            return dict(data) if isinstance(data, dict) else {}
        deadline = time.monotonic() + ASYNC_TIMEOUT_S
        delay = _retry_after(accepted)
        while operation:
            wait_cancellable(min(delay, self.poll_cap_s), cancel)
            polled = self.call("GET", operation, f"report on its operation to {doing}", ok=(200,))
            status = polled.json()
            state = str(status.get("status", ""))
            if state == "Succeeded":
                output = (status.get("properties") or {}).get("output")
                return dict(output) if isinstance(output, dict) else {}
            if state in ("Failed", "Canceled"):
                error = status.get("error") or {}
                raise EnvironmentProblem(f"Azure could not {doing}: {error.get('code', state)}: "
                                         f"{error.get('message', 'the operation ended ' + state.lower())}.")
            if time.monotonic() > deadline:
                raise EnvironmentProblem(f"Azure did not {doing} within {ASYNC_TIMEOUT_S / 60:.0f} minutes.")
            delay = _retry_after(polled, delay)
        while location:
            polled = self.call("GET", location, f"report on its operation to {doing}", ok=(200, 202))
            if polled.status == 200:
                data = polled.json()
                return dict(data) if isinstance(data, dict) else {}
            if time.monotonic() > deadline:
                raise EnvironmentProblem(f"Azure did not {doing} within {ASYNC_TIMEOUT_S / 60:.0f} minutes.")
            wait_cancellable(min(_retry_after(polled), self.poll_cap_s), cancel)
        return {}


def _retry_after(response: Response, default: float = 5.0) -> float:
    try:
        return max(0.0, float(response.header("Retry-After") or default))
    except ValueError:
        return default


def _page_failure(response: Response, offset: int) -> EnvironmentProblem:
    code, message = arm_message(response)
    return EnvironmentProblem(f"Azure refused the disk's bytes at offset {offset} (HTTP {response.status} {code}: "
                              f"{message}).")


class AzureConnector(Connector):
    type: ClassVar[str] = "azure"
    title: ClassVar[str] = "Microsoft Azure (managed disk)"
    fields: ClassVar[tuple[ConfigField, ...]] = (
        ConfigField("endpoint", "Resource Manager endpoint", required=True, default="https://management.azure.com",
                    help="https://management.azure.com (another for a sovereign cloud)"),
        ConfigField("username", "Application (client) ID", required=True,
                    help="the app registration (service principal) LayerDesk signs in as"),
        ConfigField("password", "Client secret", secret=True, required=True,
                    help="a client secret of that application"),
        ConfigField("verify_tls", "Verify TLS certificates", FieldKind.FLAG, default=True,
                    help="leave on; give a CA file when a proxy re-signs Azure's certificates"),
        ConfigField("ca_file", "CA file", FieldKind.PATH, help="a PEM file of CAs to trust besides the system's"),
        ConfigField("tenant", "Directory (tenant) ID", required=True, help="the Microsoft Entra tenant of the app"),
        ConfigField("subscription", "Subscription ID", required=True),
        ConfigField("resource_group", "Resource group", required=True, help="where the managed disk is created"),
        ConfigField("location", "Location", required=True, help="the resource group's region, e.g. westeurope"),
        ConfigField("disk_name", "Disk name pattern", default="{template}-{timestamp}",
                    help="the managed disk's name; may use " + ", ".join("{" + k + "}" for k in NAME_PLACEHOLDERS)),
        ConfigField("sku", "Disk SKU", FieldKind.CHOICE, default="StandardSSD_LRS", choices=SKUS),
        ConfigField("login_endpoint", "Entra ID endpoint", default="https://login.microsoftonline.com",
                    help="where tokens come from (another for a sovereign cloud)"),
        ConfigField("token_scope", "Token scope", default="https://management.azure.com/.default",
                    help="the Resource Manager's scope (another for a sovereign cloud)"),
    )

    #: The longest wait between two polls of an asynchronous operation, whatever ``Retry-After`` says.
    poll_cap_s: float = 10.0

    def check_endpoint(self, endpoint: str) -> None:
        if not endpoint.startswith("https://"):
            raise ValidationError(f"{endpoint!r} is not an https:// address; the Resource Manager endpoint is "
                                  "https://management.azure.com.", field="endpoint")

    def validate(self, endpoint: str, username: str, options: Mapping[str, Any], *,
                 complete: bool = True) -> dict[str, Any]:
        kept = super().validate(endpoint, username, options, complete=complete)
        for key in ("tenant", "subscription"):
            if key in kept and not _GUID.match(str(kept[key])):
                raise ValidationError(f"{self.field(key).label} {kept[key]!r} is not a GUID; copy it from the Azure "
                                      "portal (e.g. 72f988bf-86f1-41af-91ab-2d7cd011db47).", field=key)
        if username and not _GUID.match(username.strip()):
            raise ValidationError(f"The application (client) ID {username!r} is not a GUID; copy it from the app "
                                  "registration's overview.", field="username")
        if "disk_name" in kept:
            _disk_name(str(kept["disk_name"]), template="Template", image="Image", revision=1,
                       created=datetime(2025, 1, 1, tzinfo=UTC))
        return kept

    def client(self, settings: ConnectorSettings) -> RestClient:
        self.check_endpoint(settings.endpoint.strip())
        ca_file = settings.option("ca_file")
        return RestClient(settings.endpoint.strip(), what="Azure", verify_tls=settings.verify_tls,
                          ca_file=str(ca_file) if ca_file else None)

    # --- test ---------------------------------------------------------------------------------------------

    def test(self, settings: ConnectorSettings, password: str | None) -> TestReport:
        steps = TestSteps(settings.name)
        opened: list[Arm] = []

        def sign_in() -> str:
            arm = Arm(self.client(settings), settings, self.poll_cap_s)
            opened.append(arm)
            return arm.sign_in(password)

        def subscription() -> str:
            arm = opened[0]
            data = arm.call("GET", f"{arm.subscription_path}?api-version={SUBSCRIPTIONS_API}",
                            "read the subscription", ok=(200,)).json()
            state = str(data.get("state", ""))
            if state and state != "Enabled":
                raise UserError(f"The subscription {data.get('displayName', '')} is {state}; disks cannot be created "
                                "in it.")
            return f"subscription {data.get('displayName', settings.option('subscription'))} ({state or 'enabled'})"

        def group() -> str:
            arm = opened[0]
            data = arm.call("GET", f"{arm.group_path}?api-version={RESOURCES_API}", "read the resource group",
                            ok=(200,)).json()
            where = str(data.get("location", ""))
            wanted = str(settings.option("location", ""))
            note = "" if not where or where == wanted else f"; note: the group is in {where}, the disk goes to {wanted}"
            return f"resource group {data.get('name', settings.option('resource_group'))} in {where}{note}"

        def disks() -> str:
            arm = opened[0]
            data = arm.call("GET", f"{arm.group_path}/providers/Microsoft.Compute/disks?api-version={DISKS_API}",
                            "list the managed disks of the resource group", ok=(200,)).json()
            return f"may read managed disks here ({len(data.get('value') or ())} present)"

        try:
            steps.run("sign in", sign_in)
            steps.run("subscription", subscription)
            steps.run("resource group", group)
            steps.run("managed disks", disks)
        finally:
            for arm in opened:
                arm.client.close()
        return steps.report()

    # --- deliver ------------------------------------------------------------------------------------------

    def deliver(self, image: Path, sidecar: ImageSidecar, settings: ConnectorSettings, password: str | None,
                progress: DeliveryProgress, cancel: Cancellable) -> DeliveryResult:
        name = _disk_name(str(settings.option("disk_name", "{template}-{timestamp}")), template=sidecar.template,
                          image=sidecar.image, revision=sidecar.template_revision, created=sidecar.created_at)
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix=".layerdesk-azure-", dir=image.parent) as scratch:
            vhd = fixed_vhd_for_azure(image, Path(scratch), cancel, progress)
            size = vhd.stat().st_size
            if size > MAX_DISK + SECTOR:
                raise UserError(f"{image.name} is a {size / 1024**4:.1f} TiB disk; Azure takes at most 32 TiB.")
            generation = hyper_v_generation(vhd, size - SECTOR)
            with self.client(settings) as client:
                arm = Arm(client, settings, self.poll_cap_s)
                arm.sign_in(password)
                disk_path = f"{arm.group_path}/providers/Microsoft.Compute/disks/{quote(name, safe='')}"
                disk_url = f"{disk_path}?api-version={DISKS_API}"
                found = arm.request("GET", disk_url)
                if found.status == 200:
                    raise Conflict(f"The resource group {settings.option('resource_group')!r} already has a managed "
                                   f"disk {name!r}; it was left alone. Remove it or change the disk name pattern.")
                if found.status != 404 or arm_message(found)[0] == "ResourceGroupNotFound":
                    raise arm.failure(found, f"read the disk {name!r}")
                body = {
                    "location": settings.option("location"),
                    "sku": {"name": settings.option("sku", "StandardSSD_LRS")},
                    "tags": {"layerdesk-template": sidecar.template,
                             "layerdesk-revision": str(sidecar.template_revision),
                             "layerdesk-image": sidecar.image},
                    "properties": {"osType": "Windows", "hyperVGeneration": generation,
                                   "creationData": {"createOption": "Upload", "uploadSizeBytes": size}},
                }
                try:
                    created = arm.call("PUT", disk_url, f"create the managed disk {name!r}", body)
                except QuotaReached as refused:
                    # ARM checks quotas before it creates anything: there is nothing to clean up.
                    raise QuotaReached(f"{refused.message} Nothing was created: the resource group "
                                       f"{settings.option('resource_group')!r} has no disk {name!r}.") from None
                access = False
                try:
                    arm.wait(created, f"create the managed disk {name!r}", cancel)
                    granted = arm.wait(arm.call("POST", f"{disk_path}/beginGetAccess?api-version={DISKS_API}",
                                                f"grant write access to the disk {name!r}",
                                                {"access": "Write", "durationInSeconds": ACCESS_SECONDS}),
                                       f"grant write access to the disk {name!r}", cancel)
                    access = True
                    sas = granted.get("accessSAS")
                    if not isinstance(sas, str) or not sas.startswith("https://"):
                        raise EnvironmentProblem(f"Azure granted access to the disk {name!r} without a SAS URL.")
                    sent = self._upload_pages(client, vhd, sas, progress, cancel)
                    progress(99.0, "Ending the disk's upload access")
                    arm.wait(arm.call("POST", f"{disk_path}/endGetAccess?api-version={DISKS_API}",
                                      f"end the upload access to the disk {name!r}"),
                             f"end the upload access to the disk {name!r}", cancel)
                    access = False
                except BaseException as exc:
                    left = self._clean_up(arm, disk_path, name, access)
                    if isinstance(exc, TaskCanceled):
                        raise TaskCanceled(f"The delivery was cancelled; {left}") from None
                    if isinstance(exc, LayerDeskError):
                        raise type(exc)(f"{exc.message} {left[0].upper()}{left[1:]}") from None
                    raise
        progress(100.0, f"Created the managed disk {name}")
        disk_id = f"{arm.group_path}/providers/Microsoft.Compute/disks/{name}"
        log.info("delivered %s to Azure as managed disk %s (%d of %d bytes sent)", image.name, disk_id, sent, size)
        return DeliveryResult(settings.name, self.type, f"Azure {disk_id}",
                              {"disk_id": disk_id, "disk": name, "hyper_v_generation": generation,
                               "resource_group": str(settings.option("resource_group"))},
                              size, time.monotonic() - started)

    @staticmethod
    def _upload_pages(client: RestClient, vhd: Path, sas: str, progress: DeliveryProgress,
                      cancel: Cancellable) -> int:
        """Write the VHD into the page blob, range by range, leaving all-zero ranges out; the bytes sent."""
        size = vhd.stat().st_size
        url = f"{sas}&comp=page" if "?" in sas else f"{sas}?comp=page"
        sent = 0
        with vhd.open("rb") as file:
            offset = 0
            while offset < size:
                if cancel.cancelled:
                    raise TaskCanceled()
                count = min(PAGE_RANGE, size - offset)
                # A hole in the (sparse) VHD is skipped without reading it.
                data_at = _next_data(file.fileno(), offset, size)
                if data_at >= offset + count:
                    offset += count
                    continue
                file.seek(offset)
                chunk = file.read(count)
                if chunk != _ZERO_RANGE[:count]:
                    try:
                        response = client.request("PUT", url, body=chunk, headers={
                            "x-ms-version": BLOB_VERSION, "x-ms-page-write": "update",
                            "x-ms-range": f"bytes={offset}-{offset + count - 1}"})
                    except EnvironmentProblem as lost:
                        text = lost.message
                        raise EnvironmentProblem(f"The upload of the disk stopped at {offset // MiB} of {size // MiB} "
                                                 f"MiB: {text[:1].lower()}{text[1:]}") from None
                    if response.status != 201:
                        raise _page_failure(response, offset)
                    sent += count
                offset += count
                progress(10.0 + 89.0 * offset / size, f"Uploaded {offset // MiB} of {size // MiB} MiB "
                         f"({sent // MiB} MiB sent, the rest is zeros)")
        log.info("wrote %d of %d bytes to %s", sent, size, without_query(sas))
        return sent

    @staticmethod
    def _clean_up(arm: Arm, disk_path: str, name: str, access: bool) -> str:
        """End the access (when granted) and delete the disk this delivery created; what happened, as a
        sentence."""
        if access:
            try:
                ended = arm.call("POST", f"{disk_path}/endGetAccess?api-version={DISKS_API}",
                                 f"end the upload access to the disk {name!r}")
                arm.wait(ended, f"end the upload access to the disk {name!r}", None)
            except LayerDeskError as exc:
                log.warning("could not end the upload access to %s: %s", name, exc)
        try:
            deleted = arm.call("DELETE", f"{disk_path}?api-version={DISKS_API}", f"delete the disk {name!r}",
                               ok=(200, 202, 204, 404))
            if deleted.status == 202:
                arm.wait(deleted, f"delete the disk {name!r}", None)
        except LayerDeskError as exc:
            log.warning("could not delete the managed disk %s after a failed delivery: %s", name, exc)
            settings = arm.settings
            return (f"LayerDesk could not delete the managed disk {name!r} ({exc.message.rstrip('.')}): remove it "
                    f"from the resource group {settings.option('resource_group')!r} of subscription "
                    f"{settings.option('subscription')} by hand (in the Azure portal; revoke its upload access first "
                    "when it still has one).")
        return f"the managed disk {name!r} was deleted."


def _next_data(fd: int, offset: int, size: int) -> int:
    """Where the next data at or after ``offset`` starts (``size`` when only a hole follows)."""
    try:
        return os.lseek(fd, offset, os.SEEK_DATA)
    except OSError as exc:  # ENXIO: a hole to the end; otherwise the file system cannot tell (then read it)
        return size if exc.errno == errno.ENXIO else offset


def _disk_name(pattern: str, *, template: str, image: str, revision: int, created: datetime) -> str:
    name = name_from_pattern(pattern, template=template, image=image, revision=revision, created=created,
                             field="disk_name")
    if not _DISK_NAME.match(name):
        raise ValidationError(f"The disk name {name!r} (from the pattern {pattern!r}) is not a managed disk name: "
                              "use 1–80 letters, digits, underscores, dots and dashes, starting with a letter or "
                              "digit and not ending in a dot or dash.", field="disk_name")
    return name
