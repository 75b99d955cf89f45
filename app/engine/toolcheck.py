"""Which engine tools this machine has, their versions, and what cannot be done without each.

The console shows this on its About page (and can warn before an operation that would fail halfway);
nothing here changes anything.
"""

from __future__ import annotations

from dataclasses import dataclass

from app import procs
from app.errors import LayerDeskError

__all__ = ["ToolStatus", "Unavailable", "engine_tools", "publish_tools", "unavailable", "unavailable_operations"]


@dataclass(frozen=True)
class ToolStatus:
    name: str
    #: The version found, or ``None`` when the tool is missing or unusable.
    version: str | None
    #: Why it is unusable (``None`` when it works).
    problem: str | None
    #: What needs it, in the words the console shows.
    needed_for: str

    @property
    def available(self) -> bool:
        return self.version is not None


def _first_line(argv: list[str]) -> tuple[str | None, str | None]:
    try:
        outcome = procs.run(argv, timeout_s=15)
    except LayerDeskError as exc:
        return None, str(exc)
    lines = (outcome.stdout or outcome.stderr).strip().splitlines()
    if not lines:
        return None, f"{argv[0]} printed nothing (exit status {outcome.returncode})"
    return lines[0].strip(), None


def engine_tools() -> list[ToolStatus]:
    """Every tool the engine uses, probed now (a few short program runs: call it off the UI thread)."""
    from app.engine.wim import library_version

    try:
        wimlib: tuple[str | None, str | None] = (library_version(), None)
    except LayerDeskError as exc:
        wimlib = (None, str(exc))
    qemu = _first_line(["qemu-img", "--version"])
    mkntfs = _first_line(["mkntfs", "--version"])
    ntfscp = _first_line(["ntfscp", "--version"])
    mkfs_fat = _first_line(["mkfs.fat", "--help"])
    return [
        ToolStatus("wimlib", *wimlib, "importing layers, merging them, publishing any image"),
        ToolStatus("qemu-img", *qemu, "importing disk images, publishing VHD, VHDX, VMDK, qcow2 and raw disks"),
        ToolStatus("mkntfs (NTFS-3G)", *mkntfs, "publishing disks, staging layers for a merge"),
        ToolStatus("ntfscp (NTFS-3G)", *ntfscp, "writing merged registry hives into published disks"),
        ToolStatus("mkfs.fat (dosfstools)", *mkfs_fat, "publishing disks for OS layers without a gold disk"),
    ]


#: The tools each kind of work needs, by the names :func:`engine_tools` reports.
WIM_TOOLS: tuple[str, ...] = ("wimlib",)
DISK_TOOLS: tuple[str, ...] = ("wimlib", "qemu-img", "mkntfs (NTFS-3G)", "ntfscp (NTFS-3G)")


@dataclass(frozen=True)
class Unavailable:
    """Work this machine cannot do, and the missing tools that stop it."""

    operation: str
    missing: tuple[ToolStatus, ...]

    def message(self) -> str:
        names = ", ".join(t.name for t in self.missing)
        why = "; ".join(f"{t.name}: {t.problem}" for t in self.missing if t.problem)
        return (f"{self.operation} needs {names}, which {'is' if len(self.missing) == 1 else 'are'} not usable on "
                f"this machine ({why}). Install {'it' if len(self.missing) == 1 else 'them'} (System > About lists "
                "the engine's tools), then try again.")


def publish_tools(fmt: str) -> tuple[str, ...]:
    """The tools publishing in engine format ``fmt`` needs (``wim``, ``vhdx``, ``vhd-dynamic``…)."""
    return WIM_TOOLS if fmt == "wim" else DISK_TOOLS


def unavailable(tools: list[ToolStatus], operation: str, needs: tuple[str, ...]) -> Unavailable | None:
    """``None`` when every tool ``needs`` names is usable; else what is missing for ``operation``."""
    missing = tuple(t for t in tools if t.name in needs and not t.available)
    return Unavailable(operation, missing) if missing else None


def unavailable_operations(tools: list[ToolStatus]) -> list[Unavailable]:
    """What the console warns about at start-up: each kind of work the missing tools rule out."""
    checks = (
        ("Importing and publishing layers", WIM_TOOLS),
        ("Importing disk images and publishing VHD, VHDX, VMDK, qcow2 and raw disks", DISK_TOOLS),
        ("Publishing disks for OS layers without a gold disk", ("mkfs.fat (dosfstools)",)),
    )
    return [found for operation, needs in checks if (found := unavailable(tools, operation, needs)) is not None]
