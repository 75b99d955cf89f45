"""A small but real layer stack for the compose and publish tests, and what publishing it must give.

The layers are defined here as plain data (files, whiteouts, ``.reg`` text); the expected merged tree,
file contents, registry values and conflict report are written out by hand from these definitions, not
computed by the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from app.engine.registry.model import Hive, RegistryKey, ValueType
from app.engine.registry.regf import write_hive
from tests.support.repository_checks import make_tree

OS_PATH = "%SystemRoot%\\system32;%SystemRoot%"
ENVIRONMENT = "ControlSet001\\Control\\Session Manager\\Environment"


def _sz(text: str) -> bytes:
    return (text + "\0").encode("utf-16-le")


def software_hive() -> Hive:
    hive = Hive(RegistryKey("ROOT"), file_name="\\SystemRoot\\System32\\Config\\SOFTWARE")
    key = hive.ensure("Microsoft\\Windows NT\\CurrentVersion")
    key.set_value("ProductName", ValueType.SZ, _sz("Windows 11 Pro"))
    hive.ensure("Shared").set_value("Owner", ValueType.SZ, _sz("OS"))
    return hive


def system_hive() -> Hive:
    hive = Hive(RegistryKey("ROOT"), file_name="\\SystemRoot\\System32\\Config\\SYSTEM")
    select = hive.ensure("Select")
    select.set_value("Current", ValueType.DWORD, (1).to_bytes(4, "little"))
    select.set_value("Default", ValueType.DWORD, (1).to_bytes(4, "little"))
    hive.ensure(ENVIRONMENT).set_value("Path", ValueType.EXPAND_SZ, _sz(OS_PATH))
    hive.ensure(ENVIRONMENT).set_value("OS", ValueType.SZ, _sz("Windows_NT"))
    return hive


@dataclass
class LayerDef:
    name: str
    role: str
    files: dict[str, bytes]
    whiteouts: list[str] = field(default_factory=list)  # "/"-separated paths the layer removes
    reg: str = ""

    def folder(self, root: Path) -> Path:
        """The layer as an import folder (whiteouts as ``.wh.`` marker files)."""
        files = dict(self.files)
        for gone in self.whiteouts:
            parent, _, name = gone.rpartition("/")
            files[f"{parent}/.wh.{name}" if parent else f".wh.{name}"] = b""
        return make_tree(root / self.name, files)

    def reg_file(self, root: Path) -> Path | None:
        if not self.reg:
            return None
        path = root / f"{self.name}.reg"
        path.write_text("Windows Registry Editor Version 5.00\r\n\r\n" + self.reg, encoding="utf-16")
        return path


def os_layer(root: Path) -> LayerDef:
    hives = root / "hives"
    hives.mkdir(parents=True, exist_ok=True)
    write_hive(software_hive(), hives / "SOFTWARE")
    write_hive(system_hive(), hives / "SYSTEM")
    return LayerDef("Win11", "os", {
        "Windows/System32/config/SOFTWARE": (hives / "SOFTWARE").read_bytes(),
        "Windows/System32/config/SYSTEM": (hives / "SYSTEM").read_bytes(),
        "Windows/System32/drivers/etc/hosts": b"127.0.0.1 localhost\r\n",
        "Windows/notepad.exe": b"os notepad",
        "Windows/Temp/old.log": b"os log",
        "Program Files/Common/shared.dll": b"os shared",
    })


OFFICE = LayerDef("Office", "app", {
    "Program Files/Office/winword.exe": b"word" * 100,
    "program files/common/Shared.dll": b"office shared",  # the OS layer spells the folders differently
    "Program Files/Office/config.ini": b"office config",
}, reg=(
    "[HKEY_LOCAL_MACHINE\\SOFTWARE\\Vendor\\App]\r\n"
    '"Version"="1.0"\r\n'
    '"InstallDir"="C:\\\\Program Files\\\\Office"\r\n'
    '"Seats"=dword:0000002a\r\n\r\n'
    "[HKEY_LOCAL_MACHINE\\SOFTWARE\\Shared]\r\n"
    '"Owner"="Office"\r\n\r\n'
))

TOOLS = LayerDef("Tools", "app", {
    "PROGRAM FILES/OFFICE/CONFIG.INI": b"tools config",
    "Program Files/Tools/tool.exe": b"tool",
}, whiteouts=["Windows/Temp/old.log", "ghost.txt"], reg=(
    "[HKEY_LOCAL_MACHINE\\SYSTEM\\CurrentControlSet\\Control\\Session Manager\\Environment]\r\n"
    '"Path"="C:\\\\Tools;%SystemRoot%\\\\system32"\r\n\r\n'
    "[HKEY_LOCAL_MACHINE\\SOFTWARE\\Shared]\r\n"
    '"Owner"="Tools"\r\n\r\n'
))

CITRIX = LayerDef("Citrix", "platform", {
    "Windows/notepad.exe": b"platform notepad",
    "Program Files/Citrix/vda.exe": b"vda",
})

#: The merged tree's regular files (Windows spelling as the merged image has it) → content; the hives
#: are rewritten, so only their presence is expected here.
EXPECTED_FILES: dict[str, bytes | None] = {
    "Windows/System32/config/SOFTWARE": None,
    "Windows/System32/config/SYSTEM": None,
    "Windows/System32/drivers/etc/hosts": b"127.0.0.1 localhost\r\n",
    "Windows/notepad.exe": b"platform notepad",
    "Program Files/Common/Shared.dll": b"office shared",
    "Program Files/Office/winword.exe": b"word" * 100,
    "Program Files/Office/CONFIG.INI": b"tools config",
    "Program Files/Tools/tool.exe": b"tool",
    "Program Files/Citrix/vda.exe": b"vda",
}
EXPECTED_DIRS = {
    "Windows", "Windows/System32", "Windows/System32/config", "Windows/System32/drivers",
    "Windows/System32/drivers/etc", "Windows/Temp", "Program Files", "Program Files/Common",
    "Program Files/Office", "Program Files/Tools", "Program Files/Citrix",
}

EXPECTED_CONFLICTS = [
    {"kind": "file", "path": "Program Files\\Common\\Shared.dll", "layers": ["Win11", "Office"], "winner": "Office"},
    {"kind": "file", "path": "Program Files\\Office\\CONFIG.INI", "layers": ["Office", "Tools"], "winner": "Tools"},
    {"kind": "file", "path": "Windows\\notepad.exe", "layers": ["Win11", "Citrix"], "winner": "Citrix"},
    {"kind": "file", "path": "Windows\\Temp\\old.log", "layers": ["Win11", "Tools"], "winner": "Tools"},
    {"kind": "registry", "path": "HKLM\\SOFTWARE\\Shared\\Owner", "layers": ["Office", "Tools"], "winner": "Tools"},
]
#: The merged Path: the OS entries, then the Tools entries not there yet.
EXPECTED_PATH = "%SystemRoot%\\system32;%SystemRoot%;C:\\Tools"
