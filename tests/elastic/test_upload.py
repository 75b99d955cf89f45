"""Uploading a layer disk to the real test DC's ``[layers]`` share: an interrupted upload is resumed from
its ``.partial`` file, and a ``.partial`` that cannot be trusted is written again in full."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.elastic import sync as sync_module
from app.elastic.sync import (
    CHUNK,
    IN_FLIGHT_LIMIT,
    ShareError,
    ShareSession,
    SyncCanceled,
    parse_share,
    resume_offset,
)
from tests.support import samba_dc
from tests.support.host_relay import HostRelay

SHARE = r"\\127.0.0.1\layers"
ACCOUNT = f"Administrator@{samba_dc.DNS_DOMAIN}"
NAME = "Layers\\7\\12-0123456789abcdef.vhdx"
#: Room for twice the writes in flight, and not a whole number of chunks: the last write is a short one.
DISK_BYTES = 2 * IN_FLIGHT_LIMIT + 24 * CHUNK + 12_345
#: Where the tests stop an upload: far enough for a resume to keep something.
STOP_AT = IN_FLIGHT_LIMIT + 12 * CHUNK


class Flag:
    def __init__(self) -> None:
        self.cancelled = False


@pytest.fixture
def share(samba: samba_dc.RunningDC) -> Iterator[ShareSession]:
    """A session on the ``[layers]`` share with an empty ``Layers\\7`` folder (emptied again afterwards)."""
    session = ShareSession(parse_share(SHARE), ACCOUNT, samba_dc.ADMIN_PASSWORD)
    _empty(samba)
    session.makedirs("Layers\\7")
    try:
        yield session
    finally:
        session.close()
        _empty(samba)


def _empty(samba: samba_dc.RunningDC) -> None:
    import shutil

    for child in (samba.root / "layers").iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "disk.vhdx"
    path.write_bytes(os.urandom(DISK_BYTES))
    return path


def _on_share(samba: samba_dc.RunningDC, relative: str) -> Path:
    return samba.root / "layers" / relative.replace("\\", "/")


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _interrupted_by_a_dropped_connection(disk: Path, after_bytes: int) -> None:
    """Upload ``disk`` through a relay that resets the connection once ``after_bytes`` are acknowledged, as a
    network failure does: the server keeps the ``.partial`` open until it notices, which a resume right
    afterwards must wait out."""
    relay = HostRelay(("127.0.0.1", 445))
    try:
        session = ShareSession(parse_share(SHARE), ACCOUNT, samba_dc.ADMIN_PASSWORD, port=relay.port)

        def cut(done: int) -> None:
            if done >= after_bytes:
                relay.cut()

        with pytest.raises(ShareError, match=r"connection to 127\.0\.0\.1 failed.*run the sync again"):
            session.upload(disk, NAME, progress=cut, resume=True)
        session.close()
    finally:
        relay.close()


def test_resume_offset_backs_off_below_the_writes_in_flight() -> None:
    assert resume_offset(0, DISK_BYTES) == 0
    assert resume_offset(IN_FLIGHT_LIMIT + CHUNK - 1, DISK_BYTES) == 0
    assert resume_offset(IN_FLIGHT_LIMIT + 5 * CHUNK + 17, DISK_BYTES) == 5 * CHUNK
    assert resume_offset(DISK_BYTES, DISK_BYTES) == (DISK_BYTES - IN_FLIGHT_LIMIT) // CHUNK * CHUNK
    assert resume_offset(DISK_BYTES + 1, DISK_BYTES) == 0


@pytest.mark.parametrize("framed", [True, False], ids=["framed-writes", "smbprotocol-writes"])
def test_an_upload_cut_off_mid_copy_resumes_from_its_partial_file(
        samba: samba_dc.RunningDC, share: ShareSession, disk: Path, framed: bool,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Both ways of sending writes: frames built here (signed sessions), and smbprotocol's own requests
    # (what an encrypted session or share gets).
    used: list[bool] = []
    usable = sync_module._WriteFrames.usable
    monkeypatch.setattr(sync_module._WriteFrames, "usable",
                        staticmethod(lambda handle: used.append(framed and usable(handle)) or used[-1]))
    _interrupted_by_a_dropped_connection(disk, after_bytes=STOP_AT)
    partial = _on_share(samba, NAME + ".partial")
    left = partial.stat().st_size
    assert STOP_AT <= left < DISK_BYTES and share.size(NAME) is None
    expected = resume_offset(left, DISK_BYTES)
    assert expected >= STOP_AT - IN_FLIGHT_LIMIT - CHUNK

    seen: list[int] = []
    outcome = share.upload(disk, NAME, progress=seen.append, resume=True)
    # The server may still write what it had received when the connection was reset, after the size above
    # was read: the resume starts from what is there then, never below.
    assert outcome.resumed >= expected and outcome.resumed % CHUNK == 0
    assert outcome.resumed + outcome.sent == DISK_BYTES
    assert outcome.sent < DISK_BYTES and seen[0] == outcome.resumed and seen[-1] == DISK_BYTES
    on_share = share.read(NAME)
    assert on_share is not None and _digest(on_share) == _digest(disk.read_bytes())
    assert not partial.exists()
    assert used == [framed, framed]


def test_a_tampered_partial_file_is_not_trusted(samba: samba_dc.RunningDC, share: ShareSession,
                                                 disk: Path) -> None:
    # A canceled upload leaves a .partial whose bytes are all the disk's.
    flag = Flag()

    def stop(done: int) -> None:
        if done >= STOP_AT:
            flag.cancelled = True

    with pytest.raises(SyncCanceled):
        share.upload(disk, NAME, progress=stop, cancel=flag, resume=True)
    partial = _on_share(samba, NAME + ".partial")
    left = partial.stat().st_size
    kept = resume_offset(left, DISK_BYTES)
    assert kept > 0 and partial.read_bytes() == disk.read_bytes()[:left]

    # One byte changed just below where the upload would go on: it is read back, found, and the whole
    # disk is written again.
    with partial.open("r+b") as file:
        file.seek(kept - 3)
        byte = file.read(1)
        file.seek(kept - 3)
        file.write(bytes([byte[0] ^ 0xFF]))
    outcome = share.upload(disk, NAME, resume=True)
    assert (outcome.resumed, outcome.sent) == (0, DISK_BYTES)
    on_share = share.read(NAME)
    assert on_share is not None and _digest(on_share) == _digest(disk.read_bytes())
    assert not partial.exists()


def test_a_partial_file_larger_than_the_disk_is_written_again(samba: samba_dc.RunningDC, share: ShareSession,
                                                              disk: Path) -> None:
    partial = _on_share(samba, NAME + ".partial")
    partial.write_bytes(disk.read_bytes() + b"from another disk")
    outcome = share.upload(disk, NAME, resume=True)
    assert (outcome.resumed, outcome.sent) == (0, DISK_BYTES)
    on_share = share.read(NAME)
    assert on_share is not None and _digest(on_share) == _digest(disk.read_bytes())


def test_a_partial_file_whose_kept_bytes_match_is_resumed_even_if_its_tail_is_torn(
        samba: samba_dc.RunningDC, share: ShareSession, disk: Path) -> None:
    # Garbage after the trusted prefix (a write that landed torn, or writes that landed out of order)
    # is written over; only the chunk below the resume point is checked.
    data = disk.read_bytes()
    left = IN_FLIGHT_LIMIT + 5 * CHUNK + 999
    kept = resume_offset(left, DISK_BYTES)
    partial = _on_share(samba, NAME + ".partial")
    partial.write_bytes(data[:kept] + b"\0" * (left - kept))
    outcome = share.upload(disk, NAME, resume=True)
    assert (outcome.resumed, outcome.sent) == (kept, DISK_BYTES - kept)
    on_share = share.read(NAME)
    assert on_share is not None and _digest(on_share) == _digest(data)


def test_without_resume_a_partial_file_is_written_over(samba: samba_dc.RunningDC, share: ShareSession,
                                                       disk: Path) -> None:
    # For names that do not carry their content's hash, a .partial may be of other content: never kept.
    data = disk.read_bytes()
    _on_share(samba, NAME + ".partial").write_bytes(data[:IN_FLIGHT_LIMIT + 8 * CHUNK])
    outcome = share.upload(disk, NAME)
    assert (outcome.resumed, outcome.sent) == (0, DISK_BYTES)
    on_share = share.read(NAME)
    assert on_share is not None and _digest(on_share) == _digest(data)
