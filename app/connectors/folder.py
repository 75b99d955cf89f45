r"""The folder connector: a published image copied to a local folder or an SMB share (offline labs).

The image is named ``<template>_<UTC timestamp>.<ext>`` (``Win11-Office_20250301T101500Z.vhdx``) and a
JSON sidecar of the same name (``….json``) says what it is made of: the template and its revision, every
layer version with its checksum, the image's checksum, size and format, when and by whom it was
published. Both are written as ``….partial`` and then renamed to their final name, which is never
overwritten: a clash is an error. A delivery that fails or is cancelled removes what it wrote.

The endpoint is a folder (``/srv/images``, ``D:\Images``) or a share path (``\\HOST\SHARE\folder``); a
share is written over SMB with the connector's user name and password (never logged).

A delivered disk can be fetched back (:meth:`FolderConnector.retrieve`, for finalizing a packaging
machine): one in a local folder is read where it is; one on a share is downloaded.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Mapping
from datetime import UTC
from pathlib import Path, PureWindowsPath
from typing import BinaryIO, ClassVar

from smbprotocol.exceptions import (  # type: ignore[import-untyped]
    DiskFull,
    SMBConnectionClosed,
    SMBOSError,
)
from smbprotocol.header import NtStatus  # type: ignore[import-untyped]

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
from app.connectors.reach import lost_reason, mib_text
from app.elastic.sync import ShareError, ShareLocation, ShareSession, parse_share
from app.elastic.sync import _discard as discard_remote
from app.elastic.sync import _smb_failure as smb_failure
from app.errors import Conflict, EnvironmentProblem, LayerDeskError, NotFound, UserError, ValidationError
from app.procs import Cancellable
from app.tasks.base import TaskCanceled

log = logging.getLogger(__name__)

#: Large enough that a copy is bound by the disks, small enough that a cancel lands within a second.
LOCAL_CHUNK = 64 * 1024 * 1024
SHARE_CHUNK = 4 * 1024 * 1024


def delivered_names(sidecar: ImageSidecar, image: Path) -> tuple[str, str]:
    """The image's and the sidecar's file names at the destination."""
    created = sidecar.created_at
    created = created.replace(tzinfo=UTC) if created.tzinfo is None else created.astimezone(UTC)
    stem = f"{sidecar.template}_{created:%Y%m%dT%H%M%SZ}"
    return f"{stem}{image.suffix}", f"{stem}.json"


def _sidecar_bytes(sidecar: ImageSidecar) -> bytes:
    return (json.dumps(sidecar.to_json(), indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def _is_share(endpoint: str) -> bool:
    return endpoint.startswith(("\\\\", "//"))


def _share_text(endpoint: str) -> str:
    return endpoint.replace("/", "\\") if endpoint.startswith("//") else endpoint




#: What a socket that was reset under a transfer says (EBADF: smbprotocol closed it as the reset came in).
_LOST_ERRNOS = frozenset({errno.EBADF, errno.ENOTCONN, errno.EPIPE, errno.ECONNRESET, errno.ECONNABORTED})


def _connection_lost(exc: BaseException) -> bool:
    """Whether ``exc`` says an established SMB connection went away (not that the server refused something)."""
    if isinstance(exc, SMBConnectionClosed | ConnectionError | TimeoutError):
        return True
    return isinstance(exc, OSError) and not isinstance(exc, SMBOSError) and exc.errno in _LOST_ERRNOS


def _lost_reason(exc: BaseException) -> str:
    """Why an established SMB connection failed, in words."""
    if not isinstance(exc, TimeoutError) and _connection_lost(exc):
        return "it was reset"
    return lost_reason(exc)


def _canceled() -> TaskCanceled:
    return TaskCanceled("The delivery was cancelled; nothing was left at the destination.")


class FolderConnector(Connector):
    type: ClassVar[str] = "folder"
    title: ClassVar[str] = "Local folder or SMB share"
    fields: ClassVar[tuple[ConfigField, ...]] = (
        ConfigField("endpoint", "Folder or share", FieldKind.PATH, required=True,
                    help=r"a folder on this machine (/srv/images) or a share path (\\HOST\SHARE\folder)"),
        ConfigField("username", "User name", help=r"for a share: the account (DOMAIN\user or user@domain)"),
        ConfigField("password", "Password", secret=True, help="for a share: the account's password"),
        ConfigField("port", "SMB port", FieldKind.NUMBER, default=445, minimum=1, maximum=65535,
                    help="for a share: the server's SMB port"),
    )

    def check_endpoint(self, endpoint: str) -> None:
        if _is_share(endpoint):
            parse_share(_share_text(endpoint))
        elif not Path(endpoint).is_absolute():
            raise ValidationError(f"The folder {endpoint!r} is not an absolute path; write the whole path "
                                  r"(/srv/images, D:\Images) or a share path (\\HOST\SHARE\folder).",
                                  field="endpoint")

    # --- test ------------------------------------------------------------------------------------------

    def test(self, settings: ConnectorSettings, password: str | None) -> TestReport:
        steps = TestSteps(settings.name)
        endpoint = settings.endpoint.strip()
        if _is_share(endpoint):
            opened: list[ConnectorShare] = []

            def sign_in() -> str:
                self.check_endpoint(endpoint)
                session = self._open_share(settings, password)
                opened.append(session)
                return f"signed in to {session.location.server} as {settings.username}; {session.location.unc} exists"

            def write_share() -> str:
                probe = f".layerdesk-test-{secrets.token_hex(4)}"
                opened[0].write_new(probe, b"LayerDesk connector test\n")
                opened[0].remove(probe)
                return f"created and removed a test file in {opened[0].location.unc}"

            try:
                steps.run("sign in", sign_in)
                steps.run("write", write_share)
            finally:
                for session in opened:
                    session.close()
            return steps.report()
        folder = Path(endpoint)

        def exists() -> str:
            self.check_endpoint(endpoint)
            _require_folder(folder)
            return f"{folder} exists"

        def write() -> str:
            probe_file = folder / f".layerdesk-test-{secrets.token_hex(4)}"
            try:
                probe_file.write_bytes(b"LayerDesk connector test\n")
                probe_file.unlink()
            except OSError as exc:
                raise UserError(f"Cannot write in {folder}: {exc.strerror or exc}. Give this account write access "
                                "to the folder or choose another one.") from None
            return f"created and removed a test file in {folder}"

        steps.run("folder", exists)
        steps.run("write", write)
        steps.run("space", lambda: f"{shutil.disk_usage(folder).free / 1024**3:.1f} GiB free")
        return steps.report()

    # --- deliver --------------------------------------------------------------------------------------

    def deliver(self, image: Path, sidecar: ImageSidecar, settings: ConnectorSettings, password: str | None,
                progress: DeliveryProgress, cancel: Cancellable) -> DeliveryResult:
        endpoint = settings.endpoint.strip()
        self.check_endpoint(endpoint)
        image_name, sidecar_name = delivered_names(sidecar, image)
        size = image.stat().st_size
        started = time.monotonic()
        if _is_share(endpoint):
            with self._open_share(settings, password) as session:
                for name in (image_name, sidecar_name):
                    if session.size(name) is not None:
                        raise Conflict(f"{session.location.path(name)} already exists; it is never overwritten. "
                                       "Move it away, or publish again in a second.")
                written: list[str] = []
                try:
                    session.upload_new(image, image_name, size, progress, cancel)
                    written.append(image_name)
                    session.write_new(sidecar_name, _sidecar_bytes(sidecar))
                    written.append(sidecar_name)
                except BaseException:
                    for name in written:
                        with contextlib.suppress(Exception):
                            session.remove(name)
                    raise
                return DeliveryResult(settings.name, self.type, session.location.path(image_name),
                                      {"image": session.location.path(image_name),
                                       "sidecar": session.location.path(sidecar_name)},
                                      size, time.monotonic() - started)
        folder = Path(endpoint)
        _require_folder(folder)
        target, note = folder / image_name, folder / sidecar_name
        for path in (target, note):
            if path.exists():
                raise Conflict(f"{path} already exists; it is never overwritten. Move it away, or publish again "
                               "in a second.")
        needed = size + 64 * 1024
        free = shutil.disk_usage(folder).free
        if free < needed:
            raise UserError(f"{folder} has {free / 1024**2:.0f} MiB free but the image needs {needed / 1024**2:.0f} "
                            "MiB; free some space there or choose another folder.")
        _copy_new(image, target, size, progress, cancel)
        try:
            _write_new(note, _sidecar_bytes(sidecar))
        except BaseException:
            target.unlink(missing_ok=True)
            raise
        return DeliveryResult(settings.name, self.type, str(target), {"image": str(target), "sidecar": str(note)},
                              size, time.monotonic() - started)

    # --- retrieve -------------------------------------------------------------------------------------

    can_retrieve: ClassVar[bool] = True

    def retrieve(self, ids: Mapping[str, str], settings: ConnectorSettings, password: str | None, target: Path,
                 progress: DeliveryProgress, cancel: Cancellable) -> Path:
        where = str(ids.get("image") or "")
        if not where:
            raise UserError(f"The delivery through connector {settings.name!r} names no disk file; copy the disk "
                            "to this computer and finalize from that file.")
        if not _is_share(where):
            disk = Path(where)
            if not disk.is_file():
                raise NotFound(f"The disk {disk} is no longer there; it was moved or deleted. Finalize from the "
                               "disk file where it is now.")
            progress(100.0, f"Reading {disk} where it is")
            return disk
        endpoint = settings.endpoint.strip()
        if not _is_share(endpoint):
            raise UserError(f"The disk was delivered to {where}, but connector {settings.name!r} now writes to the "
                            f"folder {endpoint}; copy the disk to this computer and finalize from that file.")
        name = PureWindowsPath(_share_text(where)).name
        location = parse_share(_share_text(endpoint))
        if location.path(name).casefold() != _share_text(where).casefold():
            raise UserError(f"The disk was delivered to {where}, but connector {settings.name!r} now writes to "
                            f"{location.unc}; copy the disk to this computer and finalize from that file.")
        with self._open_share(settings, password) as session:
            size = session.size(name)
            if size is None:
                raise NotFound(f"The disk {where} is no longer there; it was moved or deleted. Finalize from the "
                               "disk file where it is now.")
            partial = target.with_name(target.name + ".partial")
            try:
                session.download(name, partial, cancel=cancel, progress=lambda done: progress(
                    100.0 * done / max(size, 1), f"Copied {done // 1024**2} of {size // 1024**2} MiB"))
                _rename_new(partial, target)
            except BaseException as exc:
                partial.unlink(missing_ok=True)
                if isinstance(exc, TaskCanceled):
                    raise TaskCanceled("The copy of the disk was cancelled; nothing was kept.") from None
                if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise UserError(f"{target.parent} ran out of space while {where} was copied; nothing was "
                                    "kept. Free some space and finalize again.") from None
                raise
        return target

    @staticmethod
    def _open_share(settings: ConnectorSettings, password: str | None) -> ConnectorShare:
        if not settings.username:
            raise ValidationError(f"Connector {settings.name!r} writes to a share but has no user name; set one "
                                  "(and its password) in the connector.", field="username")
        if not password:
            raise ValidationError(f"Connector {settings.name!r} has no password in the keyring; set it in the "
                                  "connector.", field="password")
        return ConnectorShare(parse_share(_share_text(settings.endpoint.strip())), settings.username, password,
                              port=int(settings.option("port", 445)))


def _require_folder(folder: Path) -> None:
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise NotFound(f"The folder {folder} {what}; create it or correct the connector's folder.")


def _no_space(folder: Path) -> UserError:
    return UserError(f"{folder} ran out of space while the image was copied; nothing was left there. Free "
                     "some space or choose another folder.")


def _copy_new(source: Path, target: Path, size: int, progress: DeliveryProgress, cancel: Cancellable) -> None:
    """Copy ``source`` to ``target`` (which must not exist) through ``target.partial``."""
    partial = target.with_name(target.name + ".partial")
    try:
        with source.open("rb") as src, partial.open("xb") as dst:
            _copy_stream(src, dst, size, progress, cancel)
            dst.flush()
            os.fsync(dst.fileno())
        _rename_new(partial, target)
    except BaseException as exc:
        partial.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _no_space(target.parent) from None
        if isinstance(exc, OSError) and not isinstance(exc, FileExistsError):
            raise EnvironmentProblem(f"Cannot write {target}: {exc.strerror or exc}.") from None
        raise


def _copy_stream(src: BinaryIO, dst: BinaryIO, size: int, progress: DeliveryProgress, cancel: Cancellable) -> None:
    done = 0
    in_kernel = hasattr(os, "copy_file_range")
    while True:
        if cancel.cancelled:
            raise _canceled()
        if in_kernel:
            try:
                count = os.copy_file_range(src.fileno(), dst.fileno(), LOCAL_CHUNK)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                in_kernel = False  # across file systems on older kernels: copy through Python
                continue
        else:
            chunk = src.read(LOCAL_CHUNK)
            dst.write(chunk)
            count = len(chunk)
        if not count:
            break
        done += count
        progress(100.0 * done / max(size, 1), f"Copied {done // 1024**2} of {size // 1024**2} MiB")


def _write_new(target: Path, data: bytes) -> None:
    partial = target.with_name(target.name + ".partial")
    try:
        with partial.open("xb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        _rename_new(partial, target)
    except BaseException as exc:
        partial.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _no_space(target.parent) from None
        raise


def _rename_new(partial: Path, target: Path) -> None:
    """Give ``partial`` its final name, refusing (never replacing) an existing file of that name."""
    try:
        os.link(partial, target)  # fails when the name exists, unlike a rename
    except FileExistsError:
        raise Conflict(f"{target} appeared while the image was copied; it was not overwritten.") from None
    except OSError:
        # Some file systems have no hard links: check, then rename (a narrow window, but never silent).
        if target.exists():
            raise Conflict(f"{target} appeared while the image was copied; it was not overwritten.") from None
        partial.rename(target)
        return
    partial.unlink()


class ConnectorShare(ShareSession):
    """A share session that writes new files only (``….partial`` then a rename that refuses a clash)."""

    #: How long signing in anew (to clean up after the connection was lost) may take.
    RECONNECT_TIMEOUT_S = 5.0

    def __init__(self, location: ShareLocation, username: str, password: str, *, port: int = 445) -> None:
        super().__init__(location, username, password, port=port)
        # Kept in memory only, to sign in anew when the connection is lost and a .partial must be removed.
        self._account = (username, password)

    def __enter__(self) -> ConnectorShare:
        return self

    def upload_new(self, source: Path, relative: str, size: int, progress: DeliveryProgress,
                   cancel: Cancellable) -> None:
        """Copy ``source`` to the new file ``relative`` through ``relative.partial``. On any failure the
        ``.partial`` is deleted (signing in anew when the connection was lost); when even that fails, the
        error names it, to be removed by hand."""
        partial = f"{relative}.partial"
        done = 0
        with self._errors(f"write {relative}"):
            remote = self._smb.open_file(self.location.path(partial), mode="wb", **self._kw())
        try:
            try:
                with source.open("rb") as local:
                    while chunk := local.read(SHARE_CHUNK):
                        if cancel.cancelled:
                            raise _canceled()
                        remote.write(chunk)
                        done += len(chunk)
                        progress(100.0 * done / max(size, 1), f"Copied {done // 1024**2} of {size // 1024**2} MiB")
            except BaseException:
                discard_remote(remote)
                raise
            remote.close()
            self._rename_new(partial, relative)
        except BaseException as exc:  # noqa: BLE001 - re-raised as the clear error it stands for (or as it is)
            left = self.remove_after_failure(partial)
            raise self.upload_failure(exc, relative, done, size, left) from None

    def upload_failure(self, exc: BaseException, relative: str, done: int, size: int, left: str) -> BaseException:
        """The clear error for an upload of ``relative`` that failed with ``exc`` after ``done`` bytes; ``left``
        is what could not be removed (``""``: nothing is left). ``exc`` may be the raw smbprotocol failure or
        the share error :meth:`ShareSession.upload` made of it (then its cause is looked at)."""
        partial = self.location.path(f"{relative}.partial")
        cause = exc.__context__ if isinstance(exc, ShareError) and exc.__suppress_context__ else None
        if isinstance(cause, DiskFull | SMBConnectionClosed | OSError):
            exc = cause
        cleaned = left or f"The partial file {partial} was deleted."
        copied = f"{mib_text(done)} of {mib_text(size)} MiB"
        if isinstance(exc, TaskCanceled):
            return TaskCanceled(f"The delivery was cancelled. {left}") if left else exc
        if isinstance(exc, LayerDeskError):
            if left:
                exc.message = f"{exc.message} {left}"
                exc.args = (exc.message,)
            return exc
        if isinstance(exc, DiskFull) or (isinstance(exc, SMBOSError | OSError)
                                         and exc.errno in (errno.ENOSPC, errno.EDQUOT)):
            return UserError(f"The share {self.location.unc} is full: {self.location.server} ran out of space after "
                             f"{copied} of {relative} were written (STATUS_DISK_FULL). Free space on the share or "
                             f"choose another folder. {cleaned}")
        if _connection_lost(exc):
            return ShareError(f"The connection to {self.location.server} was lost during the copy to {partial}, after "
                              f"{copied} ({_lost_reason(exc)}); the host went down or the network between failed. "
                              f"Check that {self.location.server} is reachable from this machine and serves SMB "
                              f"(port {self._port}). {cleaned}")
        if not isinstance(exc, Exception):
            return exc
        error = smb_failure(exc, self.location, f"write {relative}")
        error.message = f"{error.message} {left}" if left else error.message
        error.args = (error.message,)
        return error

    def remove_after_failure(self, partial: str) -> str:
        """Delete ``partial`` after a failed upload, signing in anew once when the connection is gone:
        ``""`` when it is gone, else a sentence naming it to remove by hand (and why that could not be done)."""
        why = ""
        attempt = 0
        held_until: float | None = None
        while attempt < 2:
            try:
                if attempt:
                    self._sign_in_again()
                self._smb.remove(self.location.path(partial), **self._kw())
                return ""
            except SMBOSError as exc:
                if exc.errno == errno.ENOENT:
                    return ""
                why = exc.strerror or str(exc)
                if exc.ntstatus == NtStatus.STATUS_SHARING_VIOLATION and attempt:
                    # The server has not let go yet of the handle the lost connection had open: it does once
                    # it notices that connection is gone.
                    held_until = held_until or time.monotonic() + self.HANDLE_RELEASE_S
                    if time.monotonic() < held_until:
                        time.sleep(0.2)
                        continue
            except Exception as exc:  # noqa: BLE001 - smbprotocol raises many kinds; the reason is named below
                text = str(exc).strip()
                why = text.splitlines()[0] if text else type(exc).__name__
            attempt += 1
        log.warning("could not delete %s after a failed delivery: %s", self.location.path(partial), why)
        return (f"LayerDesk could not clean up on {self.location.server} ({why.rstrip('.')}): remove "
                f"{self.location.path(partial)} there by hand.")

    def _sign_in_again(self) -> None:
        self.close()
        username, password = self._account
        self._smb.register_session(self.location.server, username=username, password=password, port=self._port,
                                   connection_timeout=self.RECONNECT_TIMEOUT_S, connection_cache=self._cache)

    def write_new(self, relative: str, data: bytes) -> None:
        partial = f"{relative}.partial"
        with self._errors(f"write {relative}"):
            try:
                with self._smb.open_file(self.location.path(partial), mode="wb", **self._kw()) as remote:
                    remote.write(data)
                self._rename_new(partial, relative)
            except BaseException:
                with contextlib.suppress(Exception):
                    self._smb.remove(self.location.path(partial), **self._kw())
                raise

    def _rename_new(self, partial: str, relative: str) -> None:
        try:
            self._smb.rename(self.location.path(partial), self.location.path(relative), **self._kw())
        except SMBOSError as exc:
            if exc.errno == errno.EEXIST:
                raise Conflict(f"{self.location.path(relative)} appeared while the image was copied; it was not "
                               "overwritten.") from None
            raise
