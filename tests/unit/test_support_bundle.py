"""``layerctl logs bundle``: what a support engineer needs, and never a secret. Known passwords are put
into the keyring, a directory junction, a connector configuration (and its options), a sign-in and the log;
then every byte of the zip, and every member decompressed, is searched for them."""

from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path

import pytest

from app.catalog.migrations import SCHEMA_VERSION
from app.catalog.models import DirectorySecurity, Role
from app.errors import ValidationError
from app.logs import setup_logging
from app.services import Services
from app.services.access import sign_in
from app.services.connectors import CONNECTOR_TYPES
from app.services.directory import JunctionSpec
from app.services.support import REMOVED, scrub, scrub_text, write_log_bundle
from tests.unit.test_cli import Ctl

JUNCTION_PASSWORD = "Bind-Pa55-7f3c9e"
CONNECTOR_PASSWORD = "vCenter-S3cret-4b1d"
OPTION_TOKEN = "opt-t0ken-a8e2"
ACCOUNT_PASSWORD = "Local-Acc0unt-99zx"
LOGGED_PASSWORD = "Leaked-1n-L0g-5521"
SECRETS = (JUNCTION_PASSWORD, CONNECTOR_PASSWORD, OPTION_TOKEN, ACCOUNT_PASSWORD, LOGGED_PASSWORD)


def _encodings(secret: str) -> list[bytes]:
    return [secret.encode("utf-8"), secret.encode("utf-16-le"), json.dumps(secret).encode()]


def _assert_no_secret(data: bytes, where: str, known: tuple[str, ...]) -> None:
    for secret in known:
        for encoded in _encodings(secret):
            assert encoded not in data, f"{secret!r} found in {where}"


@pytest.fixture
def secret_home(lab: Services, monkeypatch: pytest.MonkeyPatch) -> Services:
    # A connector type of a later LayerDesk keeps whatever options it was given, a secret-looking one too.
    monkeypatch.setitem(CONNECTOR_TYPES, "future-cloud", "A platform a later LayerDesk publishes to")
    lab.access.create_account("helpdesk", ACCOUNT_PASSWORD, [Role.ADMINISTRATOR])
    lab.directory.add_junction("corp", JunctionSpec(server="dc1.corp.example", base_dn="DC=corp,DC=example",
                                                    bind_account="CORP\\svc-layerdesk",
                                                    security=DirectorySecurity.LDAPS), password=JUNCTION_PASSWORD)
    lab.connectors.add_connector("vcenter", "future-cloud", endpoint="https://vc.corp.example", username="svc",
                                 password=CONNECTOR_PASSWORD, options={"datastore": "ds1", "api_token": OPTION_TOKEN})
    token, _caller = sign_in(lab.catalog, "helpdesk", ACCOUNT_PASSWORD, secrets=lab.secrets)
    lab.secrets.set("session", token)  # as `layerctl login` keeps it
    setup_logging(lab.home.logs)
    logging.getLogger("tests.support_bundle").warning("connecting with password=%s to the share", LOGGED_PASSWORD)
    logging.getLogger("tests.support_bundle").warning("session %s opened", token)
    for handler in logging.getLogger().handlers:
        handler.flush()
    return lab


def test_the_bundle_holds_what_support_needs_and_no_secret(secret_home: Services, tmp_path: Path) -> None:
    token = secret_home.secrets.get("session")
    assert token
    assert LOGGED_PASSWORD.encode() in (secret_home.home.logs / "layerdesk.log").read_bytes()  # the trap is set
    target = tmp_path / "support.zip"
    result = write_log_bundle(secret_home, target)
    assert result.path == str(target) and target.is_file()

    known = (*SECRETS, token)
    raw = target.read_bytes()
    _assert_no_secret(raw, "the zip file", known)
    with zipfile.ZipFile(target) as bundle:
        names = bundle.namelist()
        assert {"versions.json", "settings.json", "directory_junctions.json", "connectors.json", "catalog.json",
                "tasks.json", "logs/layerdesk.log"} <= set(names)
        assert all(info.compress_type == zipfile.ZIP_DEFLATED for info in bundle.infolist())
        members = {name: bundle.read(name) for name in names}
    for name, data in members.items():
        _assert_no_secret(data, name, known)

    catalog = json.loads(members["catalog.json"])
    assert catalog["schema_version"] == SCHEMA_VERSION and catalog["row_counts"]["layer"] == 7
    (connector,) = json.loads(members["connectors.json"])
    assert connector["name"] == "vcenter" and connector["has_credentials"] is True
    assert connector["options"] == {"datastore": "ds1", "api_token": REMOVED}
    (junction,) = json.loads(members["directory_junctions.json"])
    assert junction["bind_account"] == "CORP\\svc-layerdesk"
    versions = json.loads(members["versions.json"])
    assert {tool["name"] for tool in versions["engine_tools"]} >= {"wimlib", "qemu-img"}
    assert versions["libraries"]["SQLAlchemy"]
    settings = {s["key"]: s["value"] for s in json.loads(members["settings.json"])}
    assert settings["task_retention_days"] == 30
    log_text = members["logs/layerdesk.log"].decode()
    assert f"password={REMOVED} to the share" in log_text and f"session {REMOVED} opened" in log_text
    tasks = json.loads(members["tasks.json"])
    assert isinstance(tasks, list)


def test_scrubbing_rules() -> None:
    assert scrub({"password": "x", "nested": [{"bindPassword": "y", "name": "n"}], "has_password": True,
                  "token": None}) == {"password": REMOVED, "nested": [{"bindPassword": REMOVED, "name": "n"}],
                                      "has_password": True, "token": None}
    assert scrub_text('pwd: "two words" and token=abc', ["abc"]) == f"pwd: {REMOVED} and token={REMOVED}"


def test_layerctl_logs_bundle(secret_home: Services, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                              monkeypatch: pytest.MonkeyPatch) -> None:
    ctl = Ctl(secret_home.home.root, capsys, monkeypatch)
    status, out, err = ctl("logs", "bundle", "--to", str(tmp_path / "b.zip"))
    assert status == 0, err
    assert "It holds no passwords" in out
    _assert_no_secret((tmp_path / "b.zip").read_bytes(), "the zip file", SECRETS)
    status, _out, err = ctl("logs", "bundle", "--to", str(tmp_path / "b.zip"))
    assert status == 3 and "exists already" in err
    with pytest.raises(ValidationError, match=r"does not end in \.zip"):
        write_log_bundle(secret_home, tmp_path / "b.tar")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".b", "b."))) == ["b.zip"]
