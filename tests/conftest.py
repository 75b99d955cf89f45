"""Shared fixtures. Every test gets its own LayerDesk home under pytest's tmp_path and an in-memory
keyring; HOME and the XDG folders point into tmp_path so no test can touch the real user folders."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import keyring
import pytest

from app.catalog.models import LayerType, PrincipalKind, Role, VersionState
from app.paths import Home
from app.services import Services, open_catalog
from app.services.rbac import Caller
from tests.support import samba_dc
from tests.support.keyring_memory import MemoryKeyring

ADMIN = Caller("admin", frozenset({Role.ADMINISTRATOR}), PrincipalKind.LOCAL_USER)


@pytest.fixture(autouse=True)
def _isolated_user_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_home = tmp_path / "userhome"
    fake_home.mkdir()
    monkeypatch.setenv("HOME", str(fake_home))
    for var in ("XDG_DATA_HOME", "XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME"):
        monkeypatch.setenv(var, str(fake_home / var.lower()))
    monkeypatch.delenv("LAYERDESK_HOME", raising=False)


@pytest.fixture
def memory_keyring() -> Iterator[MemoryKeyring]:
    previous = keyring.get_keyring()
    backend = MemoryKeyring()
    keyring.set_keyring(backend)
    try:
        yield backend
    finally:
        keyring.set_keyring(previous)


@pytest.fixture
def home(tmp_path: Path) -> Home:
    return Home(tmp_path / "layerdesk").ensure()


ServicesFactory = Callable[..., Services]


@pytest.fixture
def services_for(home: Home, memory_keyring: MemoryKeyring) -> Iterator[ServicesFactory]:
    """``services_for(*roles, username=...)`` → a :class:`Services` bundle for that caller."""
    catalog, secrets = open_catalog(home)

    def make(*roles: Role, username: str | None = None) -> Services:
        default = "admin" if roles == (Role.ADMINISTRATOR,) else "-".join(r.name.lower() for r in roles)
        name = username or default or "nobody"
        caller = Caller(name, frozenset(roles), PrincipalKind.LOCAL_USER)
        return Services.for_caller(home, catalog, caller, secrets)

    yield make
    catalog.close()


@pytest.fixture
def admin(services_for: ServicesFactory) -> Services:
    return services_for(Role.ADMINISTRATOR)


def make_deployable(services: Services, ref: str, *, size: int = 1024, checksum: str = "sha256:00") -> None:
    """Walk a version through finalizing to deployable, as the import engine will."""
    services.layers.set_version_state(ref, VersionState.FINALIZING)
    services.layers.set_version_state(ref, VersionState.DEPLOYABLE, size_bytes=size, checksum=checksum)


def build_lab(admin: Services) -> Services:
    """A small catalog: OS layer Win11 (1.0 deployable, 2.0 editing), Win10 (1.0), platform layer
    Citrix-VDA (1.0) on Win11, app layers Office (2024), Chrome (120), Notepad++ (8.6) on Win11,
    and Paint (1.0) on Win10; every version deployable unless said otherwise."""
    layers = admin.layers
    layers.create_layer("Win11", LayerType.OS)
    layers.add_version("Win11", "1.0")
    make_deployable(admin, "Win11:1.0")
    layers.add_version("Win11", "2.0")
    layers.create_layer("Win10", LayerType.OS)
    layers.add_version("Win10", "1.0")
    make_deployable(admin, "Win10:1.0")
    layers.create_layer("Citrix-VDA", LayerType.PLATFORM, os_layer="Win11")
    layers.add_version("Citrix-VDA", "1.0")
    make_deployable(admin, "Citrix-VDA:1.0")
    for name, version in (("Office", "2024"), ("Chrome", "120"), ("Notepad++", "8.6")):
        layers.create_layer(name, LayerType.APP, os_layer="Win11")
        layers.add_version(name, version)
        make_deployable(admin, f"{name}:{version}")
    layers.create_layer("Paint", LayerType.APP, os_layer="Win10")
    layers.add_version("Paint", "1.0")
    make_deployable(admin, "Paint:1.0")
    return admin


def _template_home(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Services], object]) -> Path:
    """A home made once per test session by ``build`` (run as the built-in ``admin``), for
    :func:`copy_home` to give to tests: building it again for every test costs seconds on slow machines."""
    root = tmp_path_factory.mktemp(name) / "layerdesk"
    home = Home(root).ensure()
    previous = keyring.get_keyring()
    keyring.set_keyring(MemoryKeyring())
    try:
        catalog, secrets = open_catalog(home)
        try:
            build(Services.for_caller(home, catalog, ADMIN, secrets))
        finally:
            catalog.close()
    finally:
        keyring.set_keyring(previous)
    return root


def copy_home(services: Services, template: Path) -> Services:
    """Give ``services``' home (open, with nothing in it yet) the template home's catalog and layer
    repository. The catalog is copied with SQLite's backup API, which is safe while the catalog is open;
    the home keeps its own installation id (its secrets are filed under it)."""
    import shutil
    import sqlite3

    from app.services.settings import INSTALLATION_ID

    target = sqlite3.connect(services.home.catalog)
    try:
        (own_id,) = target.execute("SELECT value FROM setting WHERE key = ?", (INSTALLATION_ID,)).fetchone()
        source = sqlite3.connect(f"file:{template / 'catalog.sqlite'}?mode=ro", uri=True)
        try:
            source.backup(target)
        finally:
            source.close()
        with target:
            target.execute("UPDATE setting SET value = ? WHERE key = ?", (own_id, INSTALLATION_ID))
    finally:
        target.close()
    if (template / "repository").is_dir():
        shutil.copytree(template / "repository", services.home.repository, dirs_exist_ok=True)
    return services


@pytest.fixture(scope="session")
def lab_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _template_home(tmp_path_factory, "lab-template", build_lab)


@pytest.fixture
def lab(admin: Services, lab_template: Path) -> Services:
    """The catalog :func:`build_lab` makes, in this test's home."""
    return copy_home(admin, lab_template)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    # In CI every test must run: a skip there is reported as a failure, never hidden.
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, which must run every test: {report.longrepr}"


# --- the Samba AD DC test peer (tests/directory, tests/elastic) ---------------------------------------

_timings: dict[str, float | None] = {}


@pytest.fixture(scope="module")
def samba(tmp_path_factory: pytest.TempPathFactory) -> Iterator[samba_dc.RunningDC]:
    """A DC of the module's own (fresh from the golden copy): test processes running side by side take
    turns, as only one DC can listen on its ports (tests/support/samba_dc.py)."""
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


@pytest.fixture(scope="session")
def demo_lab_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A home holding the demo lab, imported for real once per test session (seconds of wimlib and
    NTFS-3G work each time otherwise); :func:`demo_lab` copies it into a test's own home."""
    from app.services.demo import create_demo_lab
    from app.tasks.runner import TaskRunner

    def build(services: Services) -> None:
        runner = TaskRunner(services.catalog, services.caller)
        try:
            create_demo_lab(services, runner)
        finally:
            runner.shutdown()

    return _template_home(tmp_path_factory, "demo-lab-template", build)


def demo_lab(services: Services, template: Path) -> Services:
    """The demo lab in ``services``' (empty, open) home: the same result as ``create_demo_lab``,
    without importing its layers again."""
    return copy_home(services, template)
