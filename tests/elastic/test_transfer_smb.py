r"""Export to the real test DC's ``[layers]`` share and import back into a second home, over SMB; the
share is read back with smbprotocol and on the DC's disk (hashlib, json), not with our reader."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.elastic.sync import ShareSession, parse_share
from tests.engine.test_transfer import _services, _stock, _wim_dir
from tests.support import samba_dc
from tests.support.catalog_checks import catalog_bytes
from tests.support.keyring_memory import MemoryKeyring
from tests.support.repository_checks import outcome_snapshot
from tests.unit.test_cli import Ctl

SHARE = r"\\127.0.0.1\layers\transfer"
ACCOUNT = f"Administrator@{samba_dc.DNS_DOMAIN}"


@pytest.fixture
def share_folder(samba: samba_dc.RunningDC) -> Iterator[Path]:
    """The share's ``transfer`` folder on the DC's disk (removed before and after)."""
    folder = samba.root / "layers" / "transfer"
    shutil.rmtree(folder, ignore_errors=True)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_export_to_the_share_and_import_back(share_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch, memory_keyring: MemoryKeyring) -> None:
    first, second = Ctl(tmp_path / "first", capsys, monkeypatch), Ctl(tmp_path / "second", capsys, monkeypatch)
    _stock(first, tmp_path)
    password = samba_dc.ADMIN_PASSWORD + "\n"

    # a wrong password: refused clearly, nothing written
    status, _, err = first("export", "--to", SHARE, "--user", ACCOUNT, "--password-stdin", stdin="wrong\n")
    assert status != 0 and "refused the user name or password" in err and "wrong" not in err, err
    assert not share_folder.exists()

    result = first.json("export", "--to", SHARE, "Office", "--user", ACCOUNT, "--password-stdin", stdin=password)
    assert isinstance(result, dict) and sorted(result["copied"]) == ["Office:1", "Win11:1"]

    # read back over SMB and on the DC's disk
    with ShareSession(parse_share(SHARE), ACCOUNT, samba_dc.ADMIN_PASSWORD) as session:
        raw = session.read("layerdesk-export.json")
        assert raw is not None
        document = json.loads(raw)
        for layer in document["layers"]:
            for version in layer["versions"]:
                for item in version["objects"]:
                    data = session.read(item["path"].replace("/", "\\"))
                    assert data is not None and hashlib.sha256(data).hexdigest() == item["sha256"]
    assert (share_folder / "layerdesk-export.json").read_bytes() == raw
    assert {layer["name"] for layer in document["layers"]} == {"Office", "Win11"}

    imported = second.json("import", "--from", SHARE, "--user", ACCOUNT, "--password-stdin", stdin=password)
    assert isinstance(imported, dict) and sorted(imported["copied"]) == ["Office:1", "Win11:1"]
    for name in ("Win11", "Office"):
        assert _wim_dir(first, name, "1") == _wim_dir(second, name, "1")
    check = second.json("repo", "check")
    assert isinstance(check, dict) and check["problems"] == []

    # an incremental sync copies only the new version
    changed = tmp_path / "office2"
    (changed / "Program Files" / "Office").mkdir(parents=True)
    (changed / "Program Files" / "Office" / "winword.exe").write_bytes(b"word 2" * 100)
    status, _, err = first("layer", "import", "Office", "--version", "2", "--from", str(changed))
    assert status == 0, err
    synced = first.json("sync", "--to", SHARE, "--user", ACCOUNT, "--password-stdin", stdin=password)
    assert isinstance(synced, dict)
    assert sorted(synced["copied"]) == ["Citrix:1", "Office:2", "Tools:1"] and sorted(synced["skipped"]) == [
        "Office:1", "Win11:1"]
    before = outcome_snapshot(_services(second).catalog)
    again = second.json("import", "--from", SHARE, "Office", "--user", ACCOUNT, "--password-stdin", stdin=password)
    assert isinstance(again, dict) and again["copied"] == ["Office:2"]
    assert outcome_snapshot(_services(second).catalog) != before

    # the password never reaches a catalog
    for ctl in (first, second):
        assert samba_dc.ADMIN_PASSWORD.encode() not in catalog_bytes(_services(ctl).catalog)
