"""The demo lab: ``layerctl demo`` builds it through the normal services, its conflict report has file and
registry conflicts, and it publishes as WIM; the published tree and hives are checked with wimlib-imagex and
hivexget (not with our own readers). Refusals leave nothing behind."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from app.catalog.models import AuditOutcome, Role
from app.errors import PermissionDenied, UserError
from app.services import demo
from app.services.demo import DEMO_LABEL, DEMO_LAYERS, DEMO_TEMPLATE, create_demo_lab
from app.tasks.runner import TaskRunner
from tests.conftest import ServicesFactory
from tests.support.keyring_memory import MemoryKeyring
from tests.support.tools import run_ok
from tests.unit.test_cli import Ctl

#: Written out by hand from the layer definitions in app/services/demo.py (lowest priority first).
EXPECTED_CONFLICTS = [
    {"kind": "file", "path": "Program Files\\Common Files\\Demo\\shared.dll",
     "layers": ["Demo-Office", "Demo-Browser", "Demo-Tools"], "winner": "Demo-Tools"},
    {"kind": "file", "path": "Windows\\System32\\demo-runtime.dll",
     "layers": ["Demo-Win11", "Demo-Office", "Demo-Browser"], "winner": "Demo-Browser"},
    {"kind": "file", "path": "Windows\\System32\\drivers\\etc\\hosts",
     "layers": ["Demo-Win11", "Demo-Hypervisor"], "winner": "Demo-Hypervisor"},
    {"kind": "file", "path": "Windows\\Temp\\setup.log",
     "layers": ["Demo-Win11", "Demo-Tools"], "winner": "Demo-Tools"},
    {"kind": "registry", "path": "HKCU\\Software\\Demo\\Preferences\\Theme",
     "layers": ["Demo-Office", "Demo-Browser", "Demo-Tools"], "winner": "Demo-Tools"},
    {"kind": "registry", "path": "HKLM\\SOFTWARE\\Demo\\Shared\\Owner",
     "layers": ["Demo-Office", "Demo-Browser", "Demo-Tools", "Demo-Hypervisor"], "winner": "Demo-Hypervisor"},
    {"kind": "registry", "path": "HKLM\\SOFTWARE\\Demo\\Shared\\Runtime",
     "layers": ["Demo-Office", "Demo-Browser"], "winner": "Demo-Browser"},
]


@pytest.fixture
def ctl(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        memory_keyring: MemoryKeyring) -> Ctl:
    return Ctl(tmp_path / "home", capsys, monkeypatch)


def _hive_value(hive: Path, key: str, name: str) -> str:
    return run_ok("hivexget", hive, key, name).stdout.rstrip("\n")


def test_layerctl_demo_builds_a_lab_whose_conflicts_show_and_which_publishes_as_wim(ctl: Ctl, tmp_path: Path) -> None:
    status, out, err = ctl("demo")
    assert status == 0, err
    assert "[100%] Demo lab ready" in err and f"image template {DEMO_TEMPLATE}" in out

    layers = ctl.json("layer", "list")
    assert isinstance(layers, list)
    assert sorted((layer["name"], layer["type"], layer["os_layer"], layer["latest_state"]) for layer in layers) == [
        ("Demo-Browser", "app", "Demo-Win11", "deployable"),
        ("Demo-Hypervisor", "platform", "Demo-Win11", "deployable"),
        ("Demo-Office", "app", "Demo-Win11", "deployable"),
        ("Demo-Tools", "app", "Demo-Win11", "deployable"),
        ("Demo-Win11", "os", None, "deployable"),
    ]
    assert all(DEMO_LABEL in layer["description"] for layer in layers)
    template = ctl.json("template", "show", DEMO_TEMPLATE)
    assert isinstance(template, dict) and DEMO_LABEL in template["description"]
    assert template["app_layers"] == ["Demo-Office:1.0", "Demo-Browser:1.0", "Demo-Tools:1.0"]

    assert ctl.json("template", "conflicts", DEMO_TEMPLATE) == EXPECTED_CONFLICTS

    out_dir = tmp_path / "published"
    result = ctl.json("image", "publish", DEMO_TEMPLATE, "--output", str(out_dir), "--wait")
    assert isinstance(result, dict) and result["conflicts"] == len(EXPECTED_CONFLICTS)
    wim = Path(result["path"])
    assert wim.suffix == ".wim"
    tree = tmp_path / "tree"
    run_ok("wimlib-imagex", "apply", wim, "1", tree)
    assert (tree / "Windows/System32/demo-runtime.dll").read_bytes() == b"demo runtime 3.0 (Demo-Browser)"
    assert (tree / "Program Files/Common Files/Demo/shared.dll").read_bytes() == b"shared library from Demo-Tools"
    assert not (tree / "Windows/Temp/setup.log").exists()
    config = tree / "Windows/System32/config"
    assert _hive_value(config / "SYSTEM", "\\Select", "Current") == "1"
    assert _hive_value(config / "SYSTEM", "\\ControlSet001\\Control\\Session Manager\\Environment", "Path") \
        == "%SystemRoot%\\system32;%SystemRoot%;C:\\Program Files\\Demo Office"
    assert _hive_value(config / "SYSTEM", "\\ControlSet001\\Services\\DemoHv", "Start") == "0"
    assert _hive_value(config / "SOFTWARE", "\\Demo\\Shared", "Owner") == "Demo-Hypervisor"
    assert _hive_value(config / "SOFTWARE", "\\Microsoft\\Windows NT\\CurrentVersion", "ProductName") \
        == f"Windows 11 Pro ({DEMO_LABEL})"
    assert _hive_value(tree / "Users/Default/NTUSER.DAT", "\\Software\\Demo\\Preferences", "Theme") == "High contrast"


def test_a_second_demo_is_refused_and_changes_nothing(ctl: Ctl) -> None:
    assert ctl("demo")[0] == 0
    before = ctl.json("task", "list")
    status, _, err = ctl("demo")
    assert status == 6 and "demo lab is in the catalog already" in err
    assert ctl.json("task", "list") == before


def test_a_caller_without_every_role_it_needs_is_refused_before_anything_is_created(
    services_for: ServicesFactory,
) -> None:
    apps = services_for(Role.MANAGE_APP_LAYERS, Role.MANAGE_IMAGE_TEMPLATES)
    runner = TaskRunner(apps.catalog, apps.caller)
    try:
        with pytest.raises(PermissionDenied, match="OS layers"):
            create_demo_lab(apps, runner)
    finally:
        runner.shutdown()
    assert apps.layers.list_layers() == []
    (entry,) = apps.audit.list_entries(operation="demo.create")
    assert entry.outcome is AuditOutcome.DENIED


def test_a_failing_step_undoes_what_the_demo_created(
    services_for: ServicesFactory, monkeypatch: pytest.MonkeyPatch,
) -> None:
    admin = services_for(Role.ADMINISTRATOR)
    broken = replace(DEMO_LAYERS[3], reg="[HKEY_LOCAL_MACHINE\\SOFTWARE\\Demo]\r\n\"Bad\"=nonsense\r\n")
    monkeypatch.setattr(demo, "DEMO_LAYERS", (*DEMO_LAYERS[:3], broken, *DEMO_LAYERS[4:]))
    seen: list[tuple[int, str]] = []
    runner = TaskRunner(admin.catalog, admin.caller)
    try:
        with pytest.raises(UserError, match=r"Demo-Browser\.reg"):
            create_demo_lab(admin, runner, progress=lambda percent, message: seen.append((percent, message)))
    finally:
        runner.shutdown()
    assert admin.layers.list_layers() == [] and admin.templates.list_templates() == []
    assert [message for _, message in seen][-1] == "Importing Demo-Browser (4 of 5)"
    assert [percent for percent, _ in seen] == sorted(percent for percent, _ in seen)
