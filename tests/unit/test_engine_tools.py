"""The engine tools check the console's About page (and, later, start-up) shows: every tool found here
with the version the tool itself prints, and what it is needed for; refused to a caller without a role."""

from __future__ import annotations

import pytest

from app.catalog.models import Role
from app.errors import PermissionDenied
from tests.conftest import ServicesFactory
from tests.support.tools import run_ok


def test_every_engine_tool_is_found_with_its_version(services_for: ServicesFactory) -> None:
    tools = {t.name: t for t in services_for(Role.READ_ONLY).repository.engine_tools()}
    assert set(tools) == {"wimlib", "qemu-img", "mkntfs (NTFS-3G)", "ntfscp (NTFS-3G)", "mkfs.fat (dosfstools)"}
    assert all(t.available and t.problem is None and t.needed_for for t in tools.values())
    assert tools["qemu-img"].version == run_ok("qemu-img", "--version").stdout.splitlines()[0].strip()
    # wimlib-imagex prints the version it was built with; the library may be a later patch release
    imagex = run_ok("wimlib-imagex", "--version").stdout.split()[1]
    assert (tools["wimlib"].version or "").split(".")[:2] == imagex.split(".")[:2]


def test_a_caller_without_a_role_is_refused(services_for: ServicesFactory) -> None:
    with pytest.raises(PermissionDenied):
        services_for().repository.engine_tools()
