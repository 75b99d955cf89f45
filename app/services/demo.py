"""A demo lab: a small, synthetic layer set to try LayerDesk with on an empty catalog. It does not boot.

:class:`DemoLabService` builds it through the normal services, as an administrator would: it writes an
OS layer's files (with real registry hives — ``SYSTEM`` with ``Select\\Current`` = 1 and
``ControlSet001``, ``SOFTWARE`` and ``Users\\Default\\NTUSER.DAT`` — written by
:func:`app.engine.registry.regf.write_hive`), a platform layer's and three app layers' to a temporary
folder, creates the layers, imports a version of each through :class:`~app.services.imports.ImportService`
(each a task, with ``.reg`` files as the registry changes), and saves an image template over them (WIM, so
it publishes in seconds). The app layers overlap on purpose — the same files and the same registry values
— so the conflict report has something to show. Every name starts with ``Demo-`` and every description
and comment says "demo – not bootable".

If a step fails (or an import is canceled), what was created is deleted again, so a second try starts
clean.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from app.catalog.models import DiskFormat, LayerType, TaskState
from app.engine.registry.model import Hive, RegistryKey, ValueType
from app.engine.registry.regf import write_hive
from app.errors import Conflict, EnvironmentProblem, LayerDeskError, PermissionDenied
from app.services.base import Service, ServiceContext
from app.services.rbac import Operation
from app.services.templates import TemplateSpec

if TYPE_CHECKING:  # app.tasks.runner imports app.services: imported for type checking only
    from app.services import Services
    from app.tasks.runner import TaskRunner

log = logging.getLogger(__name__)

DEMO_LABEL = "demo – not bootable"
DEMO_TEMPLATE = "Demo-Desktop"
DEMO_VERSION = "1.0"
#: ``progress(percent, message)``
DemoProgress = Callable[[int, str], None]


def _sz(text: str) -> bytes:
    return (text + "\0").encode("utf-16-le")


def _dword(number: int) -> bytes:
    return number.to_bytes(4, "little")


def system_hive() -> Hive:
    """A minimal SYSTEM hive: control set 001 is the current one."""
    hive = Hive(RegistryKey("ROOT"), file_name="\\SystemRoot\\System32\\Config\\SYSTEM")
    select = hive.ensure("Select")
    for name, number in (("Current", 1), ("Default", 1), ("LastKnownGood", 1), ("Failed", 0)):
        select.set_value(name, ValueType.DWORD, _dword(number))
    hive.ensure("ControlSet001\\Control\\ComputerName\\ComputerName").set_value(
        "ComputerName", ValueType.SZ, _sz("DEMO-PC"))
    environment = hive.ensure("ControlSet001\\Control\\Session Manager\\Environment")
    environment.set_value("Path", ValueType.EXPAND_SZ, _sz("%SystemRoot%\\system32;%SystemRoot%"))
    environment.set_value("OS", ValueType.SZ, _sz("Windows_NT"))
    environment.set_value("windir", ValueType.EXPAND_SZ, _sz("%SystemRoot%"))
    hive.ensure("ControlSet001\\Services")
    return hive


def software_hive() -> Hive:
    hive = Hive(RegistryKey("ROOT"), file_name="\\SystemRoot\\System32\\Config\\SOFTWARE")
    current = hive.ensure("Microsoft\\Windows NT\\CurrentVersion")
    current.set_value("ProductName", ValueType.SZ, _sz(f"Windows 11 Pro ({DEMO_LABEL})"))
    current.set_value("EditionID", ValueType.SZ, _sz("Professional"))
    current.set_value("CurrentBuild", ValueType.SZ, _sz("22631"))
    shared = hive.ensure("Demo\\Shared")
    shared.set_value("Owner", ValueType.SZ, _sz("Demo-Win11"))
    shared.set_value("Runtime", ValueType.SZ, _sz("1.0"))
    return hive


def default_user_hive() -> Hive:
    hive = Hive(RegistryKey("ROOT"), file_name="\\??\\C:\\Users\\Default\\NTUSER.DAT")
    hive.ensure("Control Panel\\Desktop").set_value("Wallpaper", ValueType.SZ, _sz(""))
    hive.ensure("Environment").set_value("TEMP", ValueType.EXPAND_SZ, _sz("%USERPROFILE%\\AppData\\Local\\Temp"))
    hive.ensure("Software\\Demo\\Preferences").set_value("Theme", ValueType.SZ, _sz("System"))
    return hive


@dataclass(frozen=True)
class DemoLayer:
    """One layer of the demo lab as plain data: its files, whiteouts and ``.reg`` text."""

    name: str
    type: LayerType
    description: str
    #: ``/``-separated paths → content.
    files: Mapping[str, bytes] = field(default_factory=dict)
    #: ``/``-separated paths the layer removes from the layers below.
    whiteouts: tuple[str, ...] = ()
    #: The body of a ``.reg`` file (after its header line).
    reg: str = ""

    def write(self, root: Path, hives: Mapping[str, Hive] | None = None) -> tuple[Path, list[Path]]:
        """Write the layer as an import folder (with ``hives`` written as hive files at their paths) and
        its ``.reg`` file under ``root``; return the folder and the ``.reg`` files."""
        folder = root / self.name
        for rel, data in self.files.items():
            target = folder / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        for rel, hive in (hives or {}).items():
            target = folder / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            write_hive(hive, target)
        for gone in self.whiteouts:
            parent, _, name = gone.rpartition("/")
            marker = folder / parent / f".wh.{name}"
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_bytes(b"")
        registry: list[Path] = []
        if self.reg:
            reg_file = root / f"{self.name}.reg"
            reg_file.write_text("Windows Registry Editor Version 5.00\r\n\r\n" + self.reg, encoding="utf-16")
            registry.append(reg_file)
        return folder, registry


OS_HIVES: Mapping[str, Callable[[], Hive]] = {
    "Windows/System32/config/SYSTEM": system_hive,
    "Windows/System32/config/SOFTWARE": software_hive,
    "Users/Default/NTUSER.DAT": default_user_hive,
}

#: Bottom to top: the OS layer, the platform layer, then the app layers from the lowest priority up.
DEMO_LAYERS: tuple[DemoLayer, ...] = (
    DemoLayer(
        "Demo-Win11", LayerType.OS,
        f"Synthetic Windows 11 OS layer with real registry hives ({DEMO_LABEL}).",
        {
            "README-DEMO.txt": (f"LayerDesk demo lab ({DEMO_LABEL}): a few synthetic files and registry hives "
                                "to try layering, conflicts and publishing with.\r\n").encode(),
            "Windows/System32/drivers/etc/hosts": b"127.0.0.1 localhost\r\n",
            "Windows/System32/demo-runtime.dll": b"demo runtime 1.0 (OS layer)",
            "Windows/win.ini": b"; for 16-bit app support\r\n[fonts]\r\n[extensions]\r\n",
            "Windows/Temp/setup.log": b"demo setup log\r\n",
        },
    ),
    DemoLayer(
        "Demo-Hypervisor", LayerType.PLATFORM,
        f"Synthetic platform layer: hypervisor tools and broker agent ({DEMO_LABEL}).",
        {
            "Program Files/Demo Hypervisor/agent.exe": b"demo hypervisor agent",
            "Windows/System32/drivers/demohv.sys": b"demo hypervisor driver",
            "Windows/System32/drivers/etc/hosts": b"127.0.0.1 localhost\r\n10.0.0.10 broker.demo.test\r\n",
        },
        reg=(
            "[HKEY_LOCAL_MACHINE\\SYSTEM\\CurrentControlSet\\Services\\DemoHv]\r\n"
            '"Start"=dword:00000000\r\n'
            '"ImagePath"="System32\\\\drivers\\\\demohv.sys"\r\n\r\n'
            "[HKEY_LOCAL_MACHINE\\SOFTWARE\\Demo\\Shared]\r\n"
            '"Owner"="Demo-Hypervisor"\r\n\r\n'
        ),
    ),
    DemoLayer(
        "Demo-Office", LayerType.APP,
        f"Synthetic office suite app layer ({DEMO_LABEL}).",
        {
            "Program Files/Demo Office/word.exe": b"demo word processor",
            "Program Files/Common Files/Demo/shared.dll": b"shared library from Demo-Office",
            "Windows/System32/demo-runtime.dll": b"demo runtime 2.0 (Demo-Office)",
        },
        reg=(
            "[HKEY_LOCAL_MACHINE\\SOFTWARE\\Demo\\Office]\r\n"
            '"Version"="16.0"\r\n\r\n'
            "[HKEY_LOCAL_MACHINE\\SOFTWARE\\Demo\\Shared]\r\n"
            '"Owner"="Demo-Office"\r\n'
            '"Runtime"="2.0"\r\n\r\n'
            "[HKEY_LOCAL_MACHINE\\SYSTEM\\CurrentControlSet\\Control\\Session Manager\\Environment]\r\n"
            '"Path"="C:\\\\Program Files\\\\Demo Office"\r\n\r\n'
            "[HKEY_CURRENT_USER\\Software\\Demo\\Preferences]\r\n"
            '"Theme"="Light"\r\n\r\n'
        ),
    ),
    DemoLayer(
        "Demo-Browser", LayerType.APP,
        f"Synthetic web browser app layer ({DEMO_LABEL}).",
        {
            "Program Files/Demo Browser/browser.exe": b"demo browser",
            "Program Files/Common Files/Demo/shared.dll": b"shared library from Demo-Browser",
            "Windows/System32/demo-runtime.dll": b"demo runtime 3.0 (Demo-Browser)",
        },
        reg=(
            "[HKEY_LOCAL_MACHINE\\SOFTWARE\\Demo\\Shared]\r\n"
            '"Owner"="Demo-Browser"\r\n'
            '"Runtime"="3.0"\r\n\r\n'
            "[HKEY_CURRENT_USER\\Software\\Demo\\Preferences]\r\n"
            '"Theme"="Dark"\r\n'
            '"Homepage"="https://intranet.demo.test/"\r\n\r\n'
        ),
    ),
    DemoLayer(
        "Demo-Tools", LayerType.APP,
        f"Synthetic admin tools app layer; removes the OS layer's setup log ({DEMO_LABEL}).",
        {
            "Program Files/Demo Tools/tool.exe": b"demo tool",
            "Program Files/Common Files/Demo/shared.dll": b"shared library from Demo-Tools",
        },
        whiteouts=("Windows/Temp/setup.log",),
        reg=(
            "[HKEY_LOCAL_MACHINE\\SOFTWARE\\Demo\\Shared]\r\n"
            '"Owner"="Demo-Tools"\r\n\r\n'
            "[HKEY_CURRENT_USER\\Software\\Demo\\Preferences]\r\n"
            '"Theme"="High contrast"\r\n\r\n'
        ),
    ),
)

#: What creating the demo lab needs (checked before anything is created).
REQUIRED_OPERATIONS = (
    Operation.EDIT_OS_LAYERS, Operation.EDIT_PLATFORM_LAYERS, Operation.EDIT_APP_LAYERS,
    Operation.EDIT_TEMPLATES, Operation.RUN_TASKS,
)


@dataclass(frozen=True)
class DemoLab:
    """What :meth:`DemoLabService.create` built."""

    template: str
    #: ``LAYER:VERSION`` of every layer, OS first, then the platform and app layers.
    versions: tuple[str, ...]
    #: The import tasks, in the same order.
    tasks: tuple[int, ...]


class DemoLabService(Service):
    """Builds the demo lab for the caller of ``services``, through those services."""

    def __init__(self, services: Services) -> None:
        super().__init__(ServiceContext(catalog=services.catalog, caller=services.caller, secrets=services.secrets))
        self._services = services

    def exists(self) -> bool:
        """Whether any layer or template of the demo lab is in the catalog."""
        names = {layer.name.casefold() for layer in self._services.layers.list_layers()}
        names |= {template.name.casefold() for template in self._services.templates.list_templates()}
        return bool(names & {n.casefold() for n in (DEMO_TEMPLATE, *(d.name for d in DEMO_LAYERS))})

    def create(self, runner: TaskRunner, *, progress: DemoProgress | None = None) -> DemoLab:
        """Create the demo lab (see the module docstring); ``progress(percent, message)`` is called as it
        goes, from this thread. Refused before anything is created when the caller lacks a role it needs
        or a demo layer or template exists already; undone when a step fails."""
        report = progress or (lambda _percent, _message: None)
        for operation in REQUIRED_OPERATIONS:
            try:
                self.caller.require(operation)
            except PermissionDenied as exc:
                self._audit_denied("demo.create", "demo lab", DEMO_TEMPLATE, DEMO_LABEL, str(exc))
                raise
        if self.exists():
            raise Conflict(f"A demo lab is in the catalog already (its template is {DEMO_TEMPLATE!r}, its layers' "
                           "names start with 'Demo-'). Delete it first, or use it as it is.")
        created: list[str] = []
        template_created = False
        try:
            with tempfile.TemporaryDirectory(prefix="layerdesk-demo-") as scratch:
                lab = self._build(Path(scratch), runner, report, created)
            self._services.templates.create_template(
                DEMO_TEMPLATE,
                TemplateSpec(
                    os=lab.versions[0], platform=lab.versions[1], apps=lab.versions[2:],
                    disk_format=DiskFormat.WIM, size_gb=1,
                    description=f"Demo image template: Demo-Win11 + three app layers + Demo-Hypervisor ({DEMO_LABEL}).",
                ),
                comment=f"Demo lab ({DEMO_LABEL})",
            )
            template_created = True
        except BaseException:
            self._undo(created, template_created)
            raise
        report(100, f"Demo lab ready: template {DEMO_TEMPLATE}")
        return lab

    def _build(self, scratch: Path, runner: TaskRunner, report: DemoProgress, created: list[str]) -> DemoLab:
        services = self._services
        report(1, "Writing the demo layers' files and registry hives")
        sources: list[tuple[Path, list[Path]]] = []
        for layer in DEMO_LAYERS:
            hives = {rel: make() for rel, make in OS_HIVES.items()} if layer.type is LayerType.OS else {}
            sources.append(layer.write(scratch, hives))
        versions: list[str] = []
        tasks: list[int] = []
        os_name = DEMO_LAYERS[0].name
        step = 90 / len(DEMO_LAYERS)
        for n, (layer, (folder, registry)) in enumerate(zip(DEMO_LAYERS, sources, strict=True)):
            report(int(5 + n * step), f"Importing {layer.name} ({n + 1} of {len(DEMO_LAYERS)})")
            services.layers.create_layer(
                layer.name, layer.type, os_layer=None if layer.type is LayerType.OS else os_name,
                description=layer.description, comment=f"Demo lab ({DEMO_LABEL})",
            )
            created.append(layer.name)
            task_id = services.imports.start_import(
                runner, layer.name, DEMO_VERSION, folder, registry_files=registry,
                comment=f"Demo lab ({DEMO_LABEL})",
            )
            tasks.append(task_id)
            runner.wait(task_id)
            task = services.tasks.get_task(task_id)
            if task.state is not TaskState.COMPLETE:
                why = task.error or task.message or task.state.value
                raise EnvironmentProblem(
                    f"The demo lab was not created: importing {layer.name} ended {task.state.value} "
                    f"(task {task_id}): {why}"
                )
            versions.append(f"{layer.name}:{DEMO_VERSION}")
        report(96, f"Saving the image template {DEMO_TEMPLATE}")
        return DemoLab(template=DEMO_TEMPLATE, versions=tuple(versions), tasks=tuple(tasks))

    def _undo(self, created: list[str], template_created: bool) -> None:
        """Delete what a failed attempt created: the template, then the layers from the top down."""
        comment = f"Demo lab not completed ({DEMO_LABEL})"
        if template_created:
            with contextlib.suppress(LayerDeskError):
                self._services.templates.delete_template(DEMO_TEMPLATE, comment=comment)
        for name in reversed(created):
            try:
                self._services.layers.delete_layer(name, comment=comment)
            except LayerDeskError:
                log.exception("cannot delete the demo layer %s after a failed attempt", name)


def create_demo_lab(services: Services, runner: TaskRunner, *, progress: DemoProgress | None = None) -> DemoLab:
    """Shorthand for ``DemoLabService(services).create(runner, progress=progress)``."""
    return DemoLabService(services).create(runner, progress=progress)
