"""Helpers for the directory tests; the ``samba`` fixture (one real Samba AD DC for the whole test
session) lives in tests/conftest.py, shared with the elastic layering tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.catalog.models import DirectorySecurity
from app.directory import DirectorySettings
from app.services.directory import JunctionSpec
from tests.support import samba_dc


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
