"""A catalog joined to the real test DC (the ``samba`` fixture in tests/conftest.py), with app layers
to assign."""

from __future__ import annotations

import pytest

from app.catalog.models import Role
from app.directory import PrincipalType
from app.services import Services
from app.services.directory import DirectoryLookup
from tests.conftest import make_deployable
from tests.directory.conftest import spec_for
from tests.support import samba_dc
from tests.support.samba_dc import RunningDC

BREAK_GLASS_PASSWORD = "break glass 123"


@pytest.fixture
def joined(lab: Services, samba: RunningDC) -> Services:
    """``lab`` (Office 2024, Chrome 120, Notepad++ 8.6, Paint 1.0 …) plus Office 2025, a local
    break-glass Administrator and a junction ``Lab`` to the test DC."""
    lab.layers.add_version("Office", "2025")
    make_deployable(lab, "Office:2025")
    lab.access.create_account("breakglass", BREAK_GLASS_PASSWORD, [Role.ADMINISTRATOR])
    lab.directory.add_junction("Lab", spec_for(samba), password=samba_dc.BIND_PASSWORD)
    return lab


def sid_of(services: Services, name: str, kind: PrincipalType) -> str:
    return DirectoryLookup.for_services(services).resolve_principal(name, kind).sid
