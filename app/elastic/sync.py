r"""Writing the Elastic Layer repository to an SMB share (smbprotocol's ``smbclient``).

What a sync does, in this order (so the share is consistent after every step, and a sync that fails
or is stopped half-way leaves the previous repository readable and is finished by running it again):

1. **Disks.** Each assigned version's layer disk is made once in a local cache (``write_layer_disk``)
   and named on the share after its content: ``Layers\<layer id>\<version id>-<first 16 hex digits of
   its SHA-256>.vhdx``. A disk whose file is already on the share (with its size) is not copied again;
   any other is uploaded as ``….partial`` and renamed into place once complete, so a disk file under its
   final name is always whole and never changes. An interrupted upload leaves only a ``.partial`` file,
   which the next sync goes on from: it holds a prefix of the same bytes (same name, same content, written
   in order), so the upload resumes a little below its end once the bytes there read back the same as the
   local disk (:func:`resume_offset`); a ``.partial`` that is larger or differs is written again in full.
   Uploads keep several write requests in flight, so the link does not wait for each round trip.
2. **Layers.json** is replaced with the new layer list *plus* the versions the share's previous
   ``Layers.json`` listed (their disks are still there): the previous assignments still find their
   versions while the next step runs.
3. **ElasticLayerAssignment.json** and **MachineAssociations.json** are replaced.
4. **Layers.json** is replaced with the new layer list alone, and disks (and leftover ``.partial``
   files) no JSON file names any more are deleted.

Each JSON file is uploaded under a temporary name and renamed over the old one (an atomic replace on
the server), so a reader sees the old file or the new one, never half of one; a file whose bytes are
already the same is not written at all, so a second sync with nothing changed writes nothing.

The password is given to the SMB session only: it is never logged or placed in a message.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import json
import logging
import re
import struct
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path, PureWindowsPath
from typing import Any

import smbclient  # type: ignore[import-untyped]
from cryptography.hazmat.primitives import cmac
from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from smbprotocol.connection import Request, SigningAlgorithms  # type: ignore[import-untyped]
from smbprotocol.exceptions import (  # type: ignore[import-untyped]
    SMBAuthenticationError,
    SMBException,
    SMBOSError,
    SMBResponseException,
)
from smbprotocol.header import Commands, NtStatus, SMB2HeaderRequest  # type: ignore[import-untyped]
from smbprotocol.open import SMB2WriteRequest, SMB2WriteResponse  # type: ignore[import-untyped]

from app.elastic.repository import (
    ASSIGNMENTS_FILE,
    ASSOCIATIONS_FILE,
    DISK_SUFFIXES,
    LAYERS_FILE,
    AssignmentEntry,
    AssociationEntry,
    ElasticRepository,
    LayerEntry,
    RepositoryFormatError,
    disk_path,
    parse_layers,
)
from app.engine.layer_disk import LayerDiskFormat, write_layer_disk
from app.engine.repository import LayerRepository
from app.errors import AuthenticationFailed, EnvironmentProblem, NotFound, UserError, ValidationError
from app.procs import Cancellable
from app.tasks.base import TaskCanceled

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024
#: What one read of a download asks for (smbprotocol splits it into the reads the server allows).
DOWNLOAD_CHUNK = 4 * 1024 * 1024
#: The most a single write request carries: SMB 3's usual maximum (the negotiated one may be lower).
WRITE_SIZE = 8 * 1024 * 1024
#: The most bytes of one upload that are ever in flight (sent, not yet acknowledged): four writes keep
#: the link busy. The server may complete writes in flight in any order, so only the bytes this far
#: below a ``.partial`` file's end are known to have landed (see :func:`resume_offset`).
IN_FLIGHT_LIMIT = 32 * 1024 * 1024
#: How often an upload waiting for the server looks at its cancel flag.
_CANCEL_POLL_S = 0.5
ProgressFn = Callable[[int, str], None]
_SHARE = re.compile(r"^\\\\([A-Za-z0-9._:\[\]-]+)\\([^\\/:*?\"<>|]+)((?:\\[^\\/:*?\"<>|]+)*)\\?$")
_DISK_NAME = re.compile(r"^\d+-[0-9a-f]{16}\.(vhdx|vhd)$")
_JSON_TEMPORARY = re.compile(r"^\.(Layers|ElasticLayerAssignment|MachineAssociations)\.json\.[0-9a-f]{12}\.tmp$")


_SIGN_IN_REFUSALS = {
    "0xc0000072": "the account is disabled",
    "0xc0000234": "the account is locked out",
    "0xc0000071": "the password has expired",
    "0xc0000193": "the account has expired",
    "0xc0000224": "the password must be changed",
}


class ShareError(EnvironmentProblem):
    """The share cannot be reached or written (unreachable host, connection lost, no space…)."""

    code = "share"


class ShareAccessDenied(AuthenticationFailed):
    """The share refused the account (wrong user name or password, or no right to write)."""


class SyncCanceled(UserError):
    """The sync was stopped; the share keeps the previous repository (run the sync again to finish)."""

    code = "canceled"
    exit_status = 130


@dataclass(frozen=True)
class ShareEntry:
    """A file or folder on a share, as a directory listing gives it."""

    name: str
    is_dir: bool
    size_bytes: int
    last_write: datetime


@dataclass(frozen=True)
class ShareLocation:
    r"""``\\HOST\SHARE[\folder…]`` taken apart."""

    server: str
    share: str
    folder: str = ""

    @property
    def unc(self) -> str:
        return f"\\\\{self.server}\\{self.share}" + (f"\\{self.folder}" if self.folder else "")

    def path(self, relative: str = "") -> str:
        return self.unc + (f"\\{relative}" if relative else "")


def parse_share(text: str) -> ShareLocation:
    match = _SHARE.match((text or "").strip())
    if not match:
        raise ValidationError(f"{text!r} is not a share path like \\\\HOST\\SHARE or \\\\HOST\\SHARE\\folder.",
                              field="share")
    return ShareLocation(match[1], match[2], match[3].strip("\\"))


@dataclass(frozen=True)
class PublishedVersion:
    """An assigned layer version, as the sync needs it from the catalog."""

    layer_id: int
    layer: str
    os_layer_id: int | None
    os_layer: str | None
    version_id: int
    version: str
    checksum: str | None


@dataclass(frozen=True)
class SyncPlan:
    versions: tuple[PublishedVersion, ...]
    assignments: tuple[AssignmentEntry, ...]
    associations: tuple[AssociationEntry, ...]


@dataclass(frozen=True)
class SyncResult:
    share: str
    #: Disk paths (relative to the repository) uploaded, and those already on the share.
    copied: tuple[str, ...]
    kept: tuple[str, ...]
    #: JSON files replaced, and those whose bytes were already the same.
    replaced: tuple[str, ...]
    unchanged: tuple[str, ...]
    deleted: tuple[str, ...]
    #: Bytes sent to the share by this sync, and bytes of interrupted uploads (``.partial``) it went on from.
    bytes_copied: int
    bytes_resumed: int = 0


@dataclass(frozen=True)
class UploadOutcome:
    """What :meth:`ShareSession.upload` did: bytes sent now, and bytes of an earlier ``.partial`` kept."""

    sent: int
    resumed: int


def resume_offset(partial_size: int, disk_size: int) -> int:
    """Where an upload of a ``disk_size``-byte disk may go on from when its ``.partial`` holds
    ``partial_size`` bytes: a multiple of :data:`CHUNK`, or 0 to start over.

    Writes are sent in order but up to :data:`IN_FLIGHT_LIMIT` bytes at a time, and the server may finish
    those in any order, so only the bytes that far below the end are known to have landed; the rest is
    written again. A ``.partial`` larger than the disk is not a prefix of it: start over."""
    if partial_size > disk_size:
        return 0
    return max(0, (partial_size - IN_FLIGHT_LIMIT) // CHUNK * CHUNK)


def _smb_failure(exc: BaseException, location: ShareLocation, doing: str) -> UserError | EnvironmentProblem:
    """The clear error an smbprotocol failure stands for (never carrying the password)."""
    text = str(exc)
    lowered = text.lower()
    for status, why in _SIGN_IN_REFUSALS.items():
        if doing == "sign in" and status in lowered:
            return ShareAccessDenied(f"{location.server} refused the account for {location.unc}: {why}.")
    if isinstance(exc, SMBAuthenticationError) or "LOGON_FAILURE" in text or "0xc000006d" in lowered or (
            doing == "sign in" and isinstance(exc, SMBResponseException)):
        # Samba answers a wrong password given with a user@domain name with STATUS_NOT_FOUND.
        return ShareAccessDenied(f"{location.server} refused the user name or password for {location.unc}.")
    if "ACCESS_DENIED" in text or "0xc0000022" in text.lower():
        return ShareAccessDenied(f"The account may not {doing} on {location.unc} (access denied).")
    if "BAD_NETWORK_NAME" in text or "0xc00000cc" in text.lower():
        return ShareError(f"{location.server} has no share named {location.share!r}.")
    if isinstance(exc, SMBOSError):
        if doing == "open the share" and exc.errno == 2:
            return ShareError(f"{location.server} has no share named {location.share!r} (or no folder "
                              f"{location.folder!r} in it).")
        return ShareError(f"{location.unc}: could not {doing}: {exc.strerror}.")
    if isinstance(exc, SMBResponseException):
        return ShareError(f"{location.unc}: the server refused to {doing}: {getattr(exc, 'message', text)}")
    if isinstance(exc, SMBException | ConnectionError | OSError | ValueError):
        return ShareError(f"The connection to {location.server} failed while trying to {doing} "
                          f"({type(exc).__name__}: {text.splitlines()[0] if text else 'no detail'}). "
                          "Check that the host is reachable and serves SMB (port 445), then run the sync again.")
    return ShareError(f"{location.unc}: could not {doing}: {type(exc).__name__}")


def _discard(handle: Any) -> None:
    """Close a remote file after a failure, without raising. When the connection is gone the server has
    dropped the handle with it; smbprotocol has no public way to say so, and would otherwise warn of an
    unclosed handle when the object is collected, so its open is marked closed."""
    try:
        handle.close()
    except Exception:  # noqa: BLE001 - the failure being handled is the one to report
        fd = getattr(getattr(handle, "raw", handle), "fd", None)
        if fd is not None and hasattr(fd, "_connected"):
            fd._connected = False


def _write_pipelined(handle: Any, local: Any, start: int, size: int, progress: Callable[[int], None] | None,
                     cancel: Cancellable | None) -> None:
    """Write ``local``'s bytes from ``start`` to ``size`` into the smbprotocol ``Open`` ``handle`` at the
    same offsets, keeping several write requests in flight (up to :data:`IN_FLIGHT_LIMIT` bytes, within
    the credits the server granted) so the link never waits for a round trip. ``progress`` gets the end
    of the acknowledged prefix; ``cancel`` is looked at before each request and while waiting."""
    connection = handle.connection
    tree = handle.tree_connect
    write_size = max(1, min(WRITE_SIZE, int(connection.max_write_size)))
    if connection.supports_multi_credit:
        # A write of n bytes costs one credit per 64 KiB; a server that grants few credits gets smaller writes.
        _ask_for_credits(connection, tree.session.session_id, IN_FLIGHT_LIMIT // 65536)
        write_size = min(write_size, max(1, _credits(connection)) * 65536)
    charge = -(-write_size // 65536) if connection.supports_multi_credit else 0
    depth = max(1, IN_FLIGHT_LIMIT // write_size)
    frames = _WriteFrames(handle, write_size) if _WriteFrames.usable(handle) else None
    in_flight: deque[tuple[Any, int]] = deque()
    acknowledged = start

    def check_cancel() -> None:
        if cancel is not None and cancel.cancelled:
            raise SyncCanceled("The sync was canceled; the share keeps its previous repository. "
                               "Run the sync again to finish it.")

    def settle_oldest() -> None:
        nonlocal acknowledged
        request, length = in_flight[0]
        while not request.response_event.wait(_CANCEL_POLL_S):
            check_cancel()  # the request stays in flight: its answer is collected with the others'
            if not connection.transport.connected:
                break  # receive() raises what ended the connection
        in_flight.popleft()
        written = _written(connection, request)
        if written != length:
            raise ShareError(f"The server wrote {written} of {length} bytes at offset {acknowledged}; "
                             "run the sync again.")
        acknowledged += length
        if progress is not None:
            progress(acknowledged)

    try:
        local.seek(start)
        offset = start
        while offset < size:
            check_cancel()
            length = min(write_size, size - offset)
            while in_flight and (len(in_flight) >= depth or _credits(connection) < charge):
                settle_oldest()
            if frames is not None:
                request = frames.send(local, offset, length)
            else:
                data = local.read(length)
                if len(data) != length:
                    raise EOFError
                message, _receive = handle.write(data, offset, send=False)
                request = connection.send(message, tree.session.session_id, tree.tree_connect_id)
            in_flight.append((request, length))
            offset += length
        while in_flight:
            settle_oldest()
    except EOFError:
        _drain(connection, in_flight)
        raise ShareError(f"The layer disk {local.name} became shorter while it was uploaded; "
                         "run the sync again.") from None
    except BaseException:
        _drain(connection, in_flight)
        raise


def _written(connection: Any, request: Any) -> int:
    """The byte count of a write's answer (raises the server's refusal, or what ended the connection)."""
    response = connection.receive(request)
    answer = SMB2WriteResponse()
    answer.unpack(response["data"].get_value())
    return int(answer["count"].get_value())


class _WriteFrames:
    """SMB2 WRITE requests built in one reusable buffer and sent as they are, for an unencrypted session:
    the file's bytes are read straight into the frame, signed in place and handed to the socket, once
    each. (smbprotocol's own path copies each request's data several times and allocates it anew each
    time, which on a fast link costs far more than the network: about a quarter of Samba's own client's
    speed.) Message ids, credits and the answers stay smbprotocol's: each request is registered with the
    connection before it is sent, and its answer is received as usual. This reaches into smbprotocol's
    connection (its sequence window, its table of requests, its socket and that socket's lock), so
    :meth:`usable` falls back to smbprotocol's own path when those are not there."""

    _TCP = struct.Struct(">I")  # Direct TCP transport: the SMB message's length
    _HEADER = struct.Struct("<4sHHHHHHIIQIIQ16s")  # [MS-SMB2] 2.2.1.2 SMB2 Packet Header - SYNC
    _WRITE = struct.Struct("<HHIQ16sIIHHI")  # [MS-SMB2] 2.2.21 SMB2 WRITE Request, before its data
    _SIGNED = 0x00000008
    _DFS = 0x10000000
    _DATA_AT = _TCP.size + _HEADER.size + _WRITE.size

    @staticmethod
    def usable(handle: Any) -> bool:
        """Whether requests on ``handle`` can be framed here: not for encrypted sessions or shares (their
        frames are sealed by smbprotocol), nor for a signing algorithm this class does not know."""
        tree = handle.tree_connect
        session = tree.session
        if session.encrypt_data or tree.encrypt_data:
            return False
        transport = handle.connection.transport
        if not (hasattr(transport, "_sock") and hasattr(transport, "_sock_lock")):  # another smbprotocol
            return False
        return not (session.signing_required and session.signing_key) or _WriteFrames._algorithm(handle) in (
            SigningAlgorithms.AES_GMAC, SigningAlgorithms.AES_CMAC, SigningAlgorithms.HMAC_SHA256)

    @staticmethod
    def _algorithm(handle: Any) -> int:
        connection = handle.connection
        if connection.dialect >= 0x0311 and connection.signing_algorithm_id is not None:
            return int(connection.signing_algorithm_id)
        return int(SigningAlgorithms.AES_CMAC if connection.dialect >= 0x0300 else SigningAlgorithms.HMAC_SHA256)

    def __init__(self, handle: Any, write_size: int) -> None:
        self._handle = handle
        self._connection = handle.connection
        self._session = handle.tree_connect.session
        self._tree = handle.tree_connect
        self._buffer = bytearray(self._DATA_AT + write_size)
        self._view = memoryview(self._buffer)
        key = self._session.signing_key if self._session.signing_required else None
        self._signing_key = bytes(key) if key else b""
        self._algorithm_id = self._algorithm(handle) if self._signing_key else None
        self._gmac = AESGCM(self._signing_key) if self._algorithm_id == SigningAlgorithms.AES_GMAC else None
        self._flags = (self._SIGNED if self._signing_key else 0) | (self._DFS if self._tree.is_dfs_share else 0)

    def send(self, local: Any, offset: int, length: int) -> Any:
        """Read ``length`` bytes of ``local`` (at its position) into a WRITE request for ``offset`` and send
        it; return smbprotocol's record of the request (to receive its answer)."""
        connection = self._connection
        data = self._view[self._DATA_AT:self._DATA_AT + length]
        got = 0
        while got < length:
            read = local.readinto(data[got:])
            if not read:
                raise EOFError
            got += read
        charge = (max(0, length - 1) // 65536 + 1) if connection.supports_multi_credit else 0
        record = SMB2HeaderRequest()
        record["command"] = Commands.SMB2_WRITE
        record["session_id"] = self._session.session_id
        record["tree_id"] = self._tree.tree_connect_id
        with connection.sequence_lock:
            window = connection.sequence_window
            if charge > window["high"] - window["low"]:
                raise SMBException(f"Request requires {charge} credits but only "
                                   f"{window['high'] - window['low']} credits are available")
            message_id = window["low"]
            window["low"] += charge if charge > 0 else 1
            record["message_id"] = message_id
            request = Request(record, SMB2WriteRequest, connection, session_id=self._session.session_id)
            connection.outstanding_requests[message_id] = request
        end = self._DATA_AT + length
        self._TCP.pack_into(self._buffer, 0, end - self._TCP.size)
        self._HEADER.pack_into(self._buffer, self._TCP.size, b"\xfeSMB", 64, charge, 0, 0, int(Commands.SMB2_WRITE),
                               charge, self._flags, 0, message_id, 0, self._tree.tree_connect_id,
                               self._session.session_id, bytes(16))
        self._WRITE.pack_into(self._buffer, self._TCP.size + self._HEADER.size, 49, 0x70, length, offset,
                              self._handle.file_id, 0, 0, 0, 0, 0)
        message = self._view[self._TCP.size:end]
        if self._signing_key:
            signature_at = self._TCP.size + 48
            self._buffer[signature_at:signature_at + 16] = self._sign(message, message_id)
        transport = connection.transport
        with transport._sock_lock:
            transport._sock.sendall(self._view[:end])
        return request

    def _sign(self, message: memoryview, message_id: int) -> bytes:
        """[MS-SMB2] 3.1.4.1: the message's signature (its signature field zero while signing)."""
        if self._gmac is not None:
            nonce = message_id.to_bytes(8, "little") + bytes(4)  # a request, not a cancel
            return self._gmac.encrypt(nonce, b"", message)[-16:]
        if self._algorithm_id == SigningAlgorithms.AES_CMAC:
            mac = cmac.CMAC(algorithms.AES(self._signing_key))
            mac.update(message)  # type: ignore[arg-type]  # any buffer: no copy of the frame
            return mac.finalize()
        return hmac.new(self._signing_key, message, hashlib.sha256).digest()[:16]


def _credits(connection: Any) -> int:
    window = connection.sequence_window
    return int(window["high"]) - int(window["low"])


def _ask_for_credits(connection: Any, session_id: int, wanted: int) -> None:
    """Ask the server (with an echo) for enough credits to keep ``wanted`` credits' worth of writes in
    flight; a server that grants fewer only means fewer writes in flight."""
    if connection.supports_multi_credit and _credits(connection) < wanted:
        connection.echo(sid=session_id, credit_request=min(8192, wanted - _credits(connection) + 1))


def _drain(connection: Any, in_flight: deque[tuple[Any, int]]) -> None:
    """Collect the answers to writes still in flight after a failure or cancel (briefly: on a dropped
    connection they are all answered at once), so no answer is left behind on the connection."""
    while in_flight:
        request, _length = in_flight.popleft()
        if request.response_event.wait(5):
            with contextlib.suppress(Exception):
                connection.receive(request)


class ShareSession:
    """One authenticated SMB session to a share, with its own connection cache; use ``with``."""

    #: How long the server may go on holding open a file for a connection that was lost (after a network
    #: cut it does until it notices): opening or deleting that file waits this long before giving up.
    HANDLE_RELEASE_S = 10.0

    def __init__(self, location: ShareLocation, username: str, password: str, *, port: int = 445,
                 timeout_s: float = 15.0) -> None:
        self._smb: Any = smbclient
        self.location = location
        self._cache: dict[str, Any] = {}
        self._port = port
        if not password:
            raise ValidationError("Give the share account's password (on stdin).", field="password")
        with self._errors("sign in"):
            self._smb.register_session(location.server, username=username, password=password, port=port,
                                       connection_timeout=timeout_s, connection_cache=self._cache)
        with self._errors("open the share"):
            self._smb.stat(location.path(), port=port, connection_cache=self._cache)

    def __enter__(self) -> ShareSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._smb.reset_connection_cache(fail_on_error=False, connection_cache=self._cache)
        self._cache.clear()

    @contextlib.contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        try:
            yield
        except (UserError, EnvironmentProblem, SyncCanceled):
            raise
        except Exception as exc:  # noqa: BLE001 - smbprotocol raises many kinds; each becomes a clear message
            raise _smb_failure(exc, self.location, doing) from None

    def _kw(self) -> dict[str, Any]:
        return {"port": self._port, "connection_cache": self._cache}

    def read(self, relative: str) -> bytes | None:
        """The file's bytes, or ``None`` when it does not exist."""
        with self._errors(f"read {relative}"):
            try:
                with self._smb.open_file(self.location.path(relative), mode="rb", **self._kw()) as file:
                    return bytes(file.read())
            except SMBOSError as exc:
                if exc.errno == 2:
                    return None
                raise

    def download(self, relative: str, target: Path, *, progress: Callable[[int], None] | None = None,
                 cancel: Cancellable | None = None) -> None:
        """Copy the share's file ``relative`` into the local file ``target``, reporting the bytes done.
        :class:`NotFound` when the share has no such file; a cancel raises :class:`TaskCanceled`. On any
        failure ``target`` is removed again."""
        canceled = False
        try:
            with self._errors(f"read {relative}"):
                try:
                    remote = self._smb.open_file(self.location.path(relative), mode="rb", **self._kw())
                except SMBOSError as exc:
                    if exc.errno == errno.ENOENT:
                        raise NotFound(f"{self.location.path(relative)} does not exist.") from None
                    raise
                with remote, target.open("wb") as local:
                    done = 0
                    while chunk := remote.read(DOWNLOAD_CHUNK):
                        if cancel is not None and cancel.cancelled:
                            canceled = True
                            break
                        local.write(chunk)
                        done += len(chunk)
                        if progress is not None:
                            progress(done)
            if canceled:  # outside the SMB error mapping, which would report it as a share failure
                raise TaskCanceled()
        except BaseException:
            target.unlink(missing_ok=True)
            raise

    def size(self, relative: str) -> int | None:
        with self._errors(f"look at {relative}"):
            try:
                return int(self._smb.stat(self.location.path(relative), **self._kw()).st_size)
            except SMBOSError as exc:
                if exc.errno == 2:
                    return None
                raise

    def makedirs(self, relative: str) -> None:
        with self._errors(f"create {relative}"):
            self._smb.makedirs(self.location.path(relative), exist_ok=True, **self._kw())

    def upload(self, source: Path, relative: str, *, progress: Callable[[int], None] | None = None,
               cancel: Cancellable | None = None, resume: bool = False) -> UploadOutcome:
        """Copy ``source`` to ``relative``: written as ``….partial`` then renamed over the final name.

        With ``resume`` (for names that carry their content's hash, like layer disks'), a ``.partial`` left
        by an interrupted upload of the same name holds a prefix of the same bytes (same name, same content,
        written in order): the upload goes on from :func:`resume_offset` once the last :data:`CHUNK` before
        that point reads back the same as ``source``; otherwise (or when it is larger than ``source``) it
        starts over, as it always does without ``resume``. ``progress`` gets the bytes on the share so far
        (resumed ones included), ``cancel`` is looked at at least every second (:class:`SyncCanceled`).
        Returns the bytes sent and resumed."""
        partial = f"{relative}.partial"
        size = source.stat().st_size
        with self._errors(f"write {relative}"), source.open("rb", buffering=0) as local:
            start = 0
            remote = self._open_partial(partial) if resume else None
            try:
                if remote is not None:
                    start = self._verified_prefix(remote, local, size)
                    if start == 0:
                        remote.close()
                        remote = None
                if remote is None:
                    remote = self._open_released(partial, "wb")
                if start:
                    log.info("resuming the upload of %s at byte %d of %d", relative, start, size)
                if progress is not None:
                    progress(start)
                _write_pipelined(remote.fd, local, start, size, progress, cancel)
            except BaseException:
                if remote is not None:
                    _discard(remote)
                raise
            remote.close()
            self._smb.replace(self.location.path(partial), self.location.path(relative), **self._kw())
        return UploadOutcome(sent=size - start, resumed=start)

    def _open_partial(self, partial: str) -> Any | None:
        """The existing ``.partial`` file opened for reading and writing (not truncated), or ``None``."""
        try:
            return self._open_released(partial, "r+b")
        except SMBOSError as exc:
            if exc.errno == 2:
                return None
            raise

    def _open_released(self, relative: str, mode: str) -> Any:
        """Open ``relative`` (unbuffered), waiting up to :attr:`HANDLE_RELEASE_S` while the server still holds
        it open for a connection that was lost (a sharing violation until the server notices)."""
        held_until = time.monotonic() + self.HANDLE_RELEASE_S
        while True:
            try:
                return self._smb.open_file(self.location.path(relative), mode=mode, buffering=0, **self._kw())
            except SMBOSError as exc:
                if exc.ntstatus != NtStatus.STATUS_SHARING_VIOLATION or time.monotonic() >= held_until:
                    raise
                time.sleep(0.2)

    @staticmethod
    def _verified_prefix(remote: Any, local: Any, size: int) -> int:
        """How many leading bytes of the open ``.partial`` ``remote`` can be kept (0: none): see
        :func:`resume_offset`; the chunk just below that point must read back equal to ``local``'s."""
        kept = resume_offset(int(remote.fd.end_of_file), size)
        if kept < CHUNK:
            return 0
        local.seek(kept - CHUNK)
        expected = local.read(CHUNK)
        piece = max(1, min(CHUNK, int(remote.fd.connection.max_read_size)))
        found = b"".join(bytes(remote.fd.read(at, piece)) for at in range(kept - CHUNK, kept, piece))
        if found != expected:
            log.warning("an interrupted upload's bytes differ from the layer disk: uploading it again in full")
            return 0
        return kept

    def write_atomic(self, relative: str, data: bytes) -> None:
        """Replace ``relative`` with ``data`` in one rename: a reader sees the old bytes or the new ones."""
        temporary = f".{relative}.{uuid.uuid4().hex[:12]}.tmp"
        with self._errors(f"replace {relative}"):
            try:
                file = self._smb.open_file(self.location.path(temporary), mode="wb", **self._kw())
                try:
                    file.write(data)
                except BaseException:
                    _discard(file)
                    raise
                file.close()
                self._smb.replace(self.location.path(temporary), self.location.path(relative), **self._kw())
            except BaseException:
                with contextlib.suppress(Exception):
                    self._smb.remove(self.location.path(temporary), **self._kw())
                raise

    def listdir(self, relative: str) -> list[str]:
        with self._errors(f"list {relative}"):
            try:
                return [str(n) for n in self._smb.listdir(self.location.path(relative), **self._kw())]
            except SMBOSError as exc:
                if exc.errno == 2:
                    return []
                raise

    def remove(self, relative: str) -> None:
        with self._errors(f"delete {relative}"):
            self._smb.remove(self.location.path(relative), **self._kw())

    def entries(self, relative: str = "") -> list[ShareEntry]:
        """What the folder ``relative`` holds, one :class:`ShareEntry` each (``.`` and ``..`` left out);
        an empty list when the folder does not exist. One directory query: no extra round trip per file."""
        _DIRECTORY = 0x10  # FILE_ATTRIBUTE_DIRECTORY
        with self._errors(f"list {relative or 'the share'}"):
            try:
                found = []
                for entry in self._smb.scandir(self.location.path(relative), **self._kw()):
                    info = entry.smb_info
                    if entry.name in (".", ".."):
                        continue
                    found.append(ShareEntry(str(entry.name), bool(info.file_attributes & _DIRECTORY),
                                            int(info.end_of_file), info.last_write_time))
                return found
            except SMBOSError as exc:
                if exc.errno == 2:
                    return []
                raise


# --- the local disk cache ---------------------------------------------------------------------------


@dataclass
class CachedDisk:
    path: Path
    size_bytes: int
    checksum: str


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(CHUNK):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def cached_disk(cache: Path, repository: LayerRepository, version: PublishedVersion, fmt: LayerDiskFormat,
                *, cancel: Cancellable | None = None) -> CachedDisk:
    """The version's layer disk in the local cache, made when missing (or made of other content), with
    its size and SHA-256 (kept beside it, so an unchanged disk is not read again)."""
    folder = cache / str(version.layer_id)
    folder.mkdir(parents=True, exist_ok=True)
    disk = folder / f"{version.version_id}{DISK_SUFFIXES[fmt]}"
    note = disk.with_name(disk.name + ".json")
    if disk.is_file() and note.is_file():
        with contextlib.suppress(ValueError, KeyError, OSError):
            known = json.loads(note.read_text(encoding="utf-8"))
            if known["version_checksum"] == version.checksum and known["size_bytes"] == disk.stat().st_size:
                return CachedDisk(disk, int(known["size_bytes"]), str(known["checksum"]))
    disk.unlink(missing_ok=True)
    note.unlink(missing_ok=True)
    write_layer_disk(repository, version.layer_id, version.version_id, version.checksum, disk,
                     layer_name=version.layer, layer_type="app", version_name=version.version, fmt=fmt,
                     cancel=cancel)
    made = CachedDisk(disk, disk.stat().st_size, _sha256(disk))
    note.write_text(json.dumps({"version_checksum": version.checksum, "size_bytes": made.size_bytes,
                                "checksum": made.checksum}), encoding="utf-8")
    return made


# --- the sync -----------------------------------------------------------------------------------------


@dataclass
class _Tally:
    copied: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    bytes_copied: int = 0
    bytes_resumed: int = 0


def sync_repository(session: ShareSession, plan: SyncPlan, repository: LayerRepository, cache: Path, *,
                    fmt: LayerDiskFormat = "vhdx", progress: ProgressFn | None = None,
                    cancel: Cancellable | None = None) -> SyncResult:
    """Bring the share's repository to ``plan`` (see the module docstring for the steps)."""

    def report(percent: int, message: str) -> None:
        if progress is not None:
            progress(max(0, min(100, percent)), message)

    def check_cancel() -> None:
        if cancel is not None and cancel.cancelled:
            raise SyncCanceled("The sync was canceled; the share keeps its previous repository. "
                               "Run the sync again to finish it.")

    tally = _Tally()
    previous = _previous_layers(session)
    entries: list[LayerEntry] = []
    total = max(1, len(plan.versions))
    for index, version in enumerate(sorted(plan.versions, key=lambda v: (v.layer_id, v.version_id))):
        check_cancel()
        base = 5 + 80 * index // total
        report(base, f"layer disk of {version.layer}:{version.version}")
        try:
            disk = cached_disk(cache, repository, version, fmt, cancel=cancel)
        except TaskCanceled:  # the engine's word for it; the sync's says what the share keeps
            check_cancel()
            raise
        relative = disk_path(version.layer_id, version.version_id, fmt, disk.checksum)
        entries.append(LayerEntry(version.layer_id, version.layer, version.os_layer_id, version.os_layer,
                                  version.version_id, version.version, version.checksum, relative, fmt,
                                  disk.size_bytes, disk.checksum))
        if session.size(relative) == disk.size_bytes:
            tally.kept.append(relative)
            continue
        session.makedirs(str(PureWindowsPath(relative).parent))

        def moved(done: int, size: int = disk.size_bytes, at: int = base, name: str = version.layer) -> None:
            report(at + (80 // total) * done // max(1, size), f"copying {name}: {done // CHUNK} of "
                                                              f"{-(-size // CHUNK)} MiB")

        # A disk's name carries its content's hash: a .partial of that name is a start of the same bytes.
        outcome = session.upload(disk.path, relative, progress=moved, cancel=cancel, resume=True)
        tally.copied.append(relative)
        tally.bytes_copied += outcome.sent
        tally.bytes_resumed += outcome.resumed
        log.info("copied layer disk %s (%d bytes, %d of them from an interrupted upload) to %s", relative,
                 disk.size_bytes, outcome.resumed, session.location.unc)

    check_cancel()
    final = ElasticRepository(tuple(entries), plan.assignments, plan.associations).documents()
    listed = {e.version_id for e in entries}
    bridge = [*entries, *(e for e in previous if e.version_id not in listed and session.size(e.disk) is not None)]
    report(88, "replacing the repository's JSON files")
    _replace(session, LAYERS_FILE, ElasticRepository(tuple(bridge), (), ()).documents()[LAYERS_FILE], tally)
    check_cancel()
    _replace(session, ASSIGNMENTS_FILE, final[ASSIGNMENTS_FILE], tally)
    _replace(session, ASSOCIATIONS_FILE, final[ASSOCIATIONS_FILE], tally)
    _replace(session, LAYERS_FILE, final[LAYERS_FILE], tally)
    report(95, "removing disks no longer listed")
    _collect_garbage(session, {e.disk for e in entries}, tally)
    report(100, "done")
    # A file replaced twice (the bridge, then the final list) is reported once.
    replaced = tuple(dict.fromkeys(tally.replaced))
    unchanged = tuple(n for n in dict.fromkeys(tally.unchanged) if n not in replaced)
    return SyncResult(session.location.unc, tuple(tally.copied), tuple(tally.kept), replaced, unchanged,
                      tuple(tally.deleted), tally.bytes_copied, tally.bytes_resumed)


def _previous_layers(session: ShareSession) -> tuple[LayerEntry, ...]:
    data = session.read(LAYERS_FILE)
    if data is None:
        return ()
    try:
        return parse_layers(data)
    except RepositoryFormatError as damaged:
        log.warning("the share's %s is not readable (%s): it is replaced", LAYERS_FILE, damaged)
        return ()


def _replace(session: ShareSession, name: str, data: bytes, tally: _Tally) -> None:
    if session.read(name) == data:
        tally.unchanged.append(name)
        return
    session.write_atomic(name, data)
    tally.replaced.append(name)


def _collect_garbage(session: ShareSession, wanted: set[str], tally: _Tally) -> None:
    """Delete disks and ``.partial`` files under ``Layers`` that no JSON file names any more (only names
    this module makes: anything else on the share is left alone)."""
    wanted_folded = {w.casefold() for w in wanted}
    for name in session.listdir(""):
        if _JSON_TEMPORARY.match(name):  # left by a sync that was killed between upload and rename
            session.remove(name)
            tally.deleted.append(name)
    for layer_folder in session.listdir("Layers"):
        if not layer_folder.isdigit():
            continue
        for name in session.listdir(f"Layers\\{layer_folder}"):
            relative = f"Layers\\{layer_folder}\\{name}"
            ours = _DISK_NAME.match(name.removesuffix(".partial"))
            if ours and relative.casefold() not in wanted_folded:
                session.remove(relative)
                tally.deleted.append(relative)

