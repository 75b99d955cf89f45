"""One real Samba AD DC for the whole test session (see tests/support/samba_dc.py), started on first use.

Without Samba installed the DC tests are skipped on a developer's machine; under ``CI=true`` they
fail instead (tests/run.sh installs Samba, so a missing DC there is a broken setup, not a choice).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.catalog.models import DirectorySecurity
from app.directory import DirectorySettings
from app.services.directory import JunctionSpec
from tests.support import samba_dc

_timings: dict[str, float | None] = {}


@pytest.fixture(scope="session")
def samba(tmp_path_factory: pytest.TempPathFactory) -> Iterator[samba_dc.RunningDC]:
    try:
        dc = samba_dc.start(tmp_path_factory.mktemp("samba"))
    except samba_dc.SambaUnavailable as missing:
        if os.environ.get("CI"):
            pytest.fail(f"the Samba AD DC test peer is missing in CI: {missing}")
        pytest.skip(f"no Samba AD DC test peer: {missing}")
    _timings.update(provision_s=dc.provision_s, start_s=dc.start_s)
    try:
        yield dc
    finally:
        dc.stop()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if "start_s" in _timings:
        provision = _timings["provision_s"]
        cold = f"provisioned the golden copy in {provision:.1f} s, " if provision is not None else ""
        terminalreporter.write_line(f"Samba AD DC test peer: {cold}started from the golden copy in "
                                    f"{_timings['start_s']:.2f} s")


def settings_for(dc: samba_dc.RunningDC, **changes: object) -> DirectorySettings:
    """Settings reaching the test DC over LDAPS as the bind account, with its CA trusted."""
    values: dict[str, object] = {
        "server": dc.host, "port": 636, "security": DirectorySecurity.LDAPS, "base_dn": dc.base_dn,
        "bind_account": f"{samba_dc.BIND_USER}@{dc.dns_domain}", "bind_password": samba_dc.BIND_PASSWORD,
        "ca_certificate": dc.ca_pem, "timeout_s": 5.0,
    }
    values.update(changes)
    return DirectorySettings(**values)  # type: ignore[arg-type]


def spec_for(dc: samba_dc.RunningDC, **changes: object) -> JunctionSpec:
    values: dict[str, object] = {
        "server": dc.host, "port": 636, "security": DirectorySecurity.LDAPS, "base_dn": dc.base_dn,
        "bind_account": f"{samba_dc.BIND_USER}@{dc.dns_domain}", "ca_certificate": dc.ca_pem,
    }
    values.update(changes)
    return JunctionSpec(**values)  # type: ignore[arg-type]


@pytest.fixture
def dc_ca_file(samba: samba_dc.RunningDC) -> Path:
    return samba.ca_file
