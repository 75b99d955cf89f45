"""``layerctl connector add|list|test|remove`` for a type whose peer runs as a recording (Citrix Hypervisor's
XenAPI: the recorded XML-RPC exchanges of a pool master, served over HTTPS with a test CA): the settings
are checked against the type's fields, the password goes from stdin to the keyring only, the test reports
each step and exits 3 on a failure, and removal takes the keyring entry with it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.connectors.test_xenserver import PASSWORD, USER, ca  # noqa: F401 - ca: a fixture
from tests.support.hyperv_winrm import TestCA
from tests.support.keyring_memory import MemoryKeyring
from tests.support.xenserver_xapi import RecordedPool, recorded_pool
from tests.unit.test_cli import Ctl

SR, NETWORK = "Local storage", "Pool-wide network associated with eth0"


@pytest.fixture
def pool(ca: TestCA) -> Iterator[tuple[RecordedPool, int]]:  # noqa: F811
    with recorded_pool(ca, USER, PASSWORD) as served:
        yield served


@pytest.fixture
def ctl(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        memory_keyring: MemoryKeyring) -> Ctl:
    return Ctl(tmp_path / "home", capsys, monkeypatch)


def _add(ctl: Ctl, port: int, ca_file: Path, password: str, *extra: str) -> tuple[int, str, str]:
    return ctl("connector", "add", "XS1", "--type", "xenserver", "--endpoint", f"https://localhost:{port}",
               "--username", USER, "--password-stdin", "--option", f"sr={SR}", "--option", f"network={NETWORK}",
               "--option", f"ca_file={ca_file}", *extra, stdin=password + "\n")


def test_add_test_list_and_remove_a_xenserver_connector(
        ctl: Ctl, ca: TestCA, pool: tuple[RecordedPool, int], memory_keyring: MemoryKeyring) -> None:  # noqa: F811
    recorded, port = pool
    status, _, err = ctl("connector", "add", "XS1", "--type", "xenserver", "--endpoint", f"https://localhost:{port}",
                         "--option", "sr_uuid=42")
    assert status == 3 and "has no setting 'sr_uuid'" in err  # checked before a password is asked for
    status, out, err = _add(ctl, port, ca.ca_file, PASSWORD)
    assert status == 0, err
    assert PASSWORD not in out + err
    assert PASSWORD in memory_keyring.store.values()  # the keyring holds it, and only the keyring
    assert PASSWORD.encode() not in (ctl.home / "catalog.sqlite").read_bytes()

    listed = ctl.json("connector", "list")
    assert isinstance(listed, list) and [(c["name"], c["type"], c["has_credentials"]) for c in listed] == [
        ("XS1", "xenserver", True)]
    status, out, err = ctl("connector", "test", "XS1")
    assert status == 0, err
    assert [line.split()[:2] for line in out.splitlines()] == [
        ["ok", "TCP"], ["ok", "TLS"], ["ok", "login"], ["ok", "SR"], ["ok", "network"]]
    assert recorded.sessions == set()  # the test logged out again

    # A wrong password: the login step fails, the rest is not run, exit code 3, the password is not shown.
    status, _, err = ctl("connector", "update", "XS1", "--password-stdin", stdin="wrong password 1\n")
    assert status == 0, err
    status, out, _ = ctl("--json", "connector", "test", "XS1")
    report = json.loads(out)
    assert status == 3 and report["ok"] is False
    assert [(s["name"], s["ok"]) for s in report["steps"]] == [
        ("TCP", True), ("TLS", True), ("login", False), ("SR", None), ("network", None)]
    assert "wrong password 1" not in out

    status, _, err = ctl("connector", "remove", "XS1")
    assert status == 0, err
    assert ctl.json("connector", "list") == [] and memory_keyring.store == {}


def test_an_untrusted_certificate_fails_the_tls_step_until_its_ca_is_given(
        ctl: Ctl, ca: TestCA, pool: tuple[RecordedPool, int], tmp_path: Path) -> None:  # noqa: F811
    _recorded, port = pool
    status, _, err = ctl("connector", "add", "XS1", "--type", "xenserver", "--endpoint", f"https://localhost:{port}",
                         "--username", USER, "--password-stdin", "--option", f"sr={SR}",
                         "--option", f"network={NETWORK}", stdin=PASSWORD + "\n")
    assert status == 0, err
    status, out, _ = ctl("connector", "test", "XS1")
    assert status == 3
    steps = [line.split()[:2] for line in out.splitlines() if line[:4] in ("ok  ", "FAIL", "-   ")]
    assert steps[:3] == [["ok", "TCP"], ["FAIL", "TLS"], ["-", "login"]]
    assert "certificate" in out.lower()
    status, _, err = ctl("connector", "update", "XS1", "--option", f"sr={SR}", "--option", f"network={NETWORK}",
                         "--option", f"ca_file={ca.ca_file}")
    assert status == 0, err
    status, _, err = ctl("connector", "test", "XS1")
    assert status == 0, err
