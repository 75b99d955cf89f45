"""NtfsVolume: listing, reading, copying and deleting inside NTFS volume images through libntfs-3g.

The source volumes are built through ntfs-3g's FUSE driver (files, streams, hard links, short names,
reparse data, attributes and times as its ``system.ntfs_*`` extended attributes) and libntfs-3g's
file-security API (ACLs); the copies are checked the same way and with ``ntfsfix``, ``ntfsls`` and
``ntfscat``: none of it goes through the code under test.
"""

from __future__ import annotations

import errno
import hashlib
import os
import struct
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from app.engine.ntfs_volume import NtfsVolume, NtfsVolumeError
from app.engine.wim import make_ntfs_volume
from tests.engine.test_wim import Layer, build_volume, ntfs_cat, ntfs_is_consistent, ntfs_named_streams, ntfs_tree
from tests.support.ntfs_security import (
    ADMINISTRATORS,
    FULL_CONTROL,
    READ_EXECUTE,
    SYSTEM,
    USERS,
    get_security,
    security_descriptor,
    set_security,
)
from tests.support.tools import run_ok

MiB = 1024 * 1024
ZONE = b"[ZoneTransfer]\r\nZoneId=3\r\n"
APP_SD = security_descriptor(ADMINISTRATORS, SYSTEM, [(ADMINISTRATORS, FULL_CONTROL), (USERS, READ_EXECUTE)])
#: FILETIMEs (100 ns since 1601) the source gives app.exe: 2014-05-13 and 2016-07-22
WRITTEN_NS, ACCESSED_NS = 1_400_000_000_000_000_000, 1_469_000_000_000_000_000


def symlink_reparse(target: str) -> bytes:
    """An IO_REPARSE_TAG_SYMLINK reparse buffer for a relative link to ``target``."""
    name = target.encode("utf-16-le")
    body = struct.pack("<HHHHI", 0, len(name), len(name), len(name), 1) + name + name  # SYMLINK_FLAG_RELATIVE
    return struct.pack("<IHH", 0xA000000C, len(body), 0) + body


@contextmanager
def mounted(volume: Path, where: Path, *, writable: bool = False) -> Iterator[Path]:
    """``volume`` mounted with ntfs-3g (FUSE), streams reachable as ``file:stream``."""
    where.mkdir(exist_ok=True)
    options = "streams_interface=windows" + ("" if writable else ",ro")
    run_ok("ntfs-3g", "-o", options, volume, where)
    try:
        yield where
    finally:
        subprocess.run(["fusermount", "-u", str(where)], check=True, timeout=60)


def build_source(tmp: Path) -> Path:
    volume = make_ntfs_volume(tmp / "source.ntfs", 64 * MiB, label="Source")
    with mounted(volume, tmp / "build", writable=True) as root:
        app = root / "Program Files" / "Vendor App"
        app.mkdir(parents=True)
        (app / "app.exe").write_bytes(bytes(range(256)) * 400)
        (app / "app.exe:Zone.Identifier").write_bytes(ZONE)
        os.link(app / "app.exe", app / "app-copy.exe")
        (app / "big.dat").write_bytes(os.urandom(3 * MiB + 12345))  # more than one read chunk
        (app / "empty.txt").write_bytes(b"")
        (app / "link.exe").write_bytes(b"")
        os.setxattr(app / "link.exe", "system.ntfs_reparse_data", symlink_reparse("app.exe"))
        os.setxattr(root / "Program Files", "system.ntfs_dos_name", b"PROGRA~1")
        os.setxattr(app, "system.ntfs_dos_name", b"VENDOR~1")
        os.setxattr(app / "app.exe", "system.ntfs_attrib", struct.pack("<I", 0x21))  # read-only, archive
        os.utime(app / "app.exe", ns=(ACCESSED_NS, WRITTEN_NS))
        notes = root / "Données" / "Résumé – 日本.txt"
        notes.parent.mkdir()
        notes.write_text("non-ASCII names", encoding="utf-8")
    set_security(volume, "/Program Files/Vendor App/app.exe", APP_SD)
    return volume


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_source(tmp_path_factory.mktemp("ntfs-source"))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def xattr(path: Path, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError as exc:
        if exc.errno == errno.ENODATA:
            return None
        raise


def described(root: Path) -> dict[str, tuple[Any, ...]]:
    """Everything ntfs-3g's driver shows of each path below ``root``: data, named streams, ACL, attributes,
    short name, reparse data, creation/write/access times, hard link count and which paths share a file."""
    found: dict[str, tuple[Any, ...]] = {}
    inodes: dict[int, str] = {}
    for folder, dirs, files in os.walk(root):
        for name in sorted(dirs + files):
            path = Path(folder) / name
            rel = "/" + path.relative_to(root).as_posix()
            info = path.lstat()
            is_file = name in files and xattr(path, "system.ntfs_reparse_data") is None
            data = hashlib.sha256(path.read_bytes()).hexdigest() if is_file else None
            times = xattr(path, "system.ntfs_times")
            found[rel] = (
                data, xattr(path, "system.ntfs_acl"), xattr(path, "system.ntfs_attrib"),
                xattr(path, "system.ntfs_dos_name"), xattr(path, "system.ntfs_reparse_data"),
                times[:24] if times else None, info.st_nlink, inodes.setdefault(info.st_ino, rel),
            )
    return found


def test_a_copied_tree_keeps_everything_ntfs_keeps(source: Path, tmp_path: Path) -> None:
    target = make_ntfs_volume(tmp_path / "target.ntfs", 64 * MiB, label="Target")
    with NtfsVolume.opened(source) as src, NtfsVolume.opened(target, writable=True) as dst:
        copied = sum(dst.copy_tree_from(src, "/" + entry.name) for entry in src.listdir("/"))
    assert copied == 9
    ntfs_is_consistent(target)
    assert ntfs_tree(target) == ntfs_tree(source)
    app = "/Program Files/Vendor App/app.exe"
    assert ntfs_cat(target, app) == bytes(range(256)) * 400
    assert ntfs_named_streams(target, app) == {"Zone.Identifier"}
    assert ntfs_cat(target, app, "Zone.Identifier") == ZONE
    assert get_security(target, app) == get_security(source, app)
    with mounted(source, tmp_path / "s") as before, mounted(target, tmp_path / "t") as after:
        expected, got = described(before), described(after)
        assert got == expected
        assert len(got) == 9
        copy = got["/Program Files/Vendor App/app-copy.exe"]
        assert copy[6] == got[app][6] == 2 and copy[7] == got[app][7]  # still one file with two names
        assert got["/Program Files"][3] == b"PROGRA~1"
        assert got["/Program Files/Vendor App/link.exe"][4] == symlink_reparse("app.exe")
        assert struct.unpack("<I", got[app][2] or b"")[0] & 0x21 == 0x21
        assert struct.unpack_from("<QQQ", got[app][5] or b"")[1:] == (WRITTEN_NS // 100 + 116444736000000000,
                                                                       ACCESSED_NS // 100 + 116444736000000000)


def test_reading_a_file_and_its_metadata(source: Path) -> None:
    with NtfsVolume.opened(source) as volume:
        app = volume.stat("/program files/VENDOR APP/App.exe")  # names compare as Windows compares them
        assert (app.size, app.streams, app.links, app.short_name) == (102400, {"Zone.Identifier": len(ZONE)}, 2, "")
        assert app.security == get_security(source, "/Program Files/Vendor App/app.exe")
        assert volume.stat("/Program Files").short_name == "PROGRA~1"
        assert volume.stat("/Program Files").is_directory and not app.is_directory
        assert volume.read("/Program Files/Vendor App/app.exe", "Zone.Identifier") == ZONE
        assert volume.read("/Données/Résumé – 日本.txt") == b"non-ASCII names"
        assert [e.name for e in volume.listdir("/")] == ["Données", "Program Files"]
        assert volume.exists("/Program Files/Vendor App") and not volume.exists("/Program Files/Nothing")


def test_layer_volumes_wimlib_applied_are_read_and_merged_whatever_the_case_of_a_path(tmp_path: Path) -> None:
    """wimlib leaves files without short names in the POSIX namespace, which libntfs-3g's index lookup only
    matches exactly: a path in another case still finds them (as on Windows), and the copy keeps the
    volume's own spelling."""
    tools = Layer("Tools", {"Program Files/Tools/tool.exe": b"tool" * 5000, "Program Files/Tools/readme.txt": b"r"},
                  streams={"Program Files/Tools/tool.exe": {"Zone.Identifier": ZONE}})
    base = Layer("Base", {"Windows/notepad.exe": b"notepad", "Program Files/Common/shared.dll": b"dll"})
    layer, merged = build_volume(tmp_path, tools), build_volume(tmp_path, base)
    before = ntfs_tree(merged)
    with NtfsVolume.opened(layer) as src, NtfsVolume.opened(merged, writable=True) as dst:
        assert src.spelled("/PROGRAM FILES/tools/TOOL.EXE") == "/Program Files/Tools/tool.exe"
        assert dst.copy_tree_from(src, "/program files/TOOLS", to="/Program Files/Tools") == 3
    ntfs_is_consistent(merged)
    assert ntfs_tree(merged) == before | {"/Program Files/Tools/", "/Program Files/Tools/tool.exe",
                                          "/Program Files/Tools/readme.txt"}
    assert ntfs_cat(merged, "/Program Files/Tools/tool.exe") == b"tool" * 5000
    assert ntfs_cat(merged, "/Program Files/Tools/tool.exe", "Zone.Identifier") == ZONE
    with NtfsVolume.opened(layer) as src, NtfsVolume.opened(merged, writable=True) as dst:
        dst.delete("/program files/tools")
        dst.copy_tree_from(src, "/program files/tools")
    assert ntfs_tree(merged) == before | {"/Program Files/Tools/", "/Program Files/Tools/tool.exe",
                                          "/Program Files/Tools/readme.txt"}


def test_names_looked_up_in_another_case_follow_the_volume_as_it_changes(tmp_path: Path) -> None:
    """A directory is listed once for lookups in another case; deleting and copying in it (and deleting a
    directory whose record a new one may take) are seen by the next lookup at once, in one open volume."""
    tools = Layer("Tools", {"Program Files/Tools/tool.exe": b"one", "Program Files/Tools/Sub/a.txt": b"a"})
    other = Layer("Other", {"Program Files/Tools/Tool.exe": b"two", "Program Files/Tools/New.txt": b"new"})
    base = Layer("Base", {"Windows/notepad.exe": b"notepad", "Program Files/Common/shared.dll": b"dll"})
    first, second, merged = build_volume(tmp_path, tools), build_volume(tmp_path, other), build_volume(tmp_path, base)
    with NtfsVolume.opened(first) as one, NtfsVolume.opened(second) as two, \
            NtfsVolume.opened(merged, writable=True) as dst:
        dst.copy_tree_from(one, "/program files/tools", to="/Program Files/Tools")
        assert dst.spelled("/PROGRAM FILES/TOOLS/TOOL.EXE") == "/Program Files/Tools/tool.exe"
        assert dst.spelled("/program files/tools/sub/A.TXT") == "/Program Files/Tools/Sub/a.txt"
        dst.delete("/program files/tools/TOOL.EXE")
        dst.delete("/PROGRAM FILES/TOOLS/SUB")
        assert not dst.exists("/program files/tools/tool.exe")
        assert not dst.exists("/program files/tools/sub/a.txt")
        dst.copy_from(two, "/program files/tools/tool.exe", to="/Program Files/Tools/Tool.exe")
        dst.copy_from(two, "/program files/tools/new.txt", to="/Program Files/Tools/New.txt")
        assert dst.spelled("/program files/tools/TOOL.EXE") == "/Program Files/Tools/Tool.exe"
        assert dst.read("/program files/tools/tool.exe") == b"two"
        assert dst.read("/PROGRAM FILES/TOOLS/NEW.TXT") == b"new"
    ntfs_is_consistent(merged)
    assert ntfs_cat(merged, "/Program Files/Tools/Tool.exe") == b"two"


def test_delete_takes_a_whole_tree_and_gives_its_space_back(source: Path, tmp_path: Path) -> None:
    target = make_ntfs_volume(tmp_path / "target.ntfs", 64 * MiB, label="Target")
    with mounted(target, tmp_path / "m") as root:
        empty = os.statvfs(root).f_bfree
    with NtfsVolume.opened(source) as src, NtfsVolume.opened(target, writable=True) as dst:
        dst.copy_tree_from(src, "/Program Files")
        dst.copy_tree_from(src, "/Données")
    with mounted(target, tmp_path / "m") as root:
        full = os.statvfs(root).f_bfree
    with NtfsVolume.opened(target, writable=True) as dst:
        assert dst.delete("/PROGRAM FILES") == 7
    ntfs_is_consistent(target)
    assert ntfs_tree(target) == {"/Données/", "/Données/Résumé – 日本.txt"}
    with mounted(target, tmp_path / "m") as root:
        freed = os.statvfs(root).f_bfree
        block = os.statvfs(root).f_bsize
    assert (freed - full) * block >= 3 * MiB + 100 * 1024
    assert (empty - freed) * block <= 64 * 1024  # what is left: the MFT grown for the copies, the other file


def test_mistakes_are_refused_with_a_clear_message_and_change_nothing(source: Path, tmp_path: Path) -> None:
    target = make_ntfs_volume(tmp_path / "target.ntfs", 16 * MiB, label="Target")
    with NtfsVolume.opened(source) as src, NtfsVolume.opened(target, writable=True) as dst:
        dst.copy_from(src, "/Données")
    before = digest(target)
    with NtfsVolume.opened(source) as src, NtfsVolume.opened(target, writable=True) as dst:
        with pytest.raises(NtfsVolumeError, match="/Données already exists"):
            dst.copy_from(src, "/Données")
        with pytest.raises(NtfsVolumeError, match="/Program Files does not exist"):
            dst.copy_from(src, "/Program Files/Vendor App")
        with pytest.raises(NtfsVolumeError, match="/Nothing does not exist"):
            dst.delete("/Nothing/here")
        with pytest.raises(NtfsVolumeError, match="is not a path inside an NTFS volume"):
            dst.delete("/Données/../Données")
        with pytest.raises(NtfsVolumeError, match="root directory of a volume cannot be deleted"):
            dst.delete("/")
    with NtfsVolume.opened(target) as read_only, pytest.raises(NtfsVolumeError, match="opened read-only"):
        read_only.delete("/Données")
    assert digest(target) == before  # nothing written, not even by mounting


def test_what_is_not_an_ntfs_volume_is_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.img"
    junk.write_bytes(os.urandom(MiB))
    with pytest.raises(NtfsVolumeError, match=r"junk.img cannot be opened as an NTFS volume"), \
            NtfsVolume.opened(junk):
        pass
    with pytest.raises(NtfsVolumeError, match="cannot be opened as an NTFS volume: No such file"), \
            NtfsVolume.opened(tmp_path / "missing.img"):
        pass


def test_a_full_volume_stops_the_copy_with_a_clear_message(source: Path, tmp_path: Path) -> None:
    """The 3 MiB file does not fit on a 2 MiB volume: the error says so; the volume is still consistent (a
    caller changes a copy of its volume and throws it away on failure)."""
    target = make_ntfs_volume(tmp_path / "small.ntfs", 2 * MiB, label="Small")
    with NtfsVolume.opened(source) as src, pytest.raises(NtfsVolumeError, match="no space is left on the volume"), \
            NtfsVolume.opened(target, writable=True) as dst:
        dst.copy_tree_from(src, "/Program Files")
    ntfs_is_consistent(target)
