"""``layerctl layer package | finalize | abandon``: layer versions made on a packaging machine."""

from __future__ import annotations

from pathlib import Path

import click

from app.cli.main import comment_option, emit, finish_task, show_progress, state
from app.services.packaging import PACKAGING_FORMATS, PackagingInfo, packaging_service
from app.services.views import to_jsonable


def _inputs(info: PackagingInfo) -> str:
    parts = [f"OS layer {info.os.layer}:{info.os.version}"]
    parts.extend(f"prerequisite {p.layer}:{p.version}" for p in info.prerequisites)
    if info.previous is not None:
        parts.append(f"previous version {info.previous.layer}:{info.previous.version}")
    return ", ".join(parts)


@click.command("package")
@click.argument("layer")
@click.option("--version", "version", required=True, metavar="V", help="The new version's name.")
@click.option("--from-version", "previous", metavar="PREV",
              help="Update: the packaging disk holds this deployable version's content, and the new version keeps it.")
@click.option("--prerequisite", "prerequisites", multiple=True, metavar="LAYER[:VERSION]",
              help="App layers present while packaging only (repeatable; default version: the newest usable).")
@click.option("--os-version", metavar="V", help="The OS layer version to package on (default: its newest deployable).")
@click.option("--output", metavar="DIR", help="The folder the packaging disk is delivered to.")
@click.option("--connector", metavar="NAME",
              help="Deliver the packaging disk through this connector instead (a folder or share, a libvirt VM, a "
                   "vSphere VM…); finalize then fetches it back from there.")
@click.option("--format", "fmt", type=click.Choice([f.value for f in PACKAGING_FORMATS]), default="vhdx",
              show_default=True, help="The packaging disk's format.")
@click.option("--size-gb", type=click.FloatRange(min=0.1, max=65536), metavar="GB",
              help="The packaging disk's size (default: the layers it holds plus 10 GB for the installation).")
@click.option("--script", metavar="FILE", help="A layer script (.ps1, .cmd, .bat; at most 64 KiB) the published "
                                               "image runs once; kept with the version.")
@comment_option
def package(layer: str, version: str, previous: str | None, prerequisites: tuple[str, ...], os_version: str | None,
            output: str | None, connector: str | None, fmt: str, size_gb: float | None, script: str | None,
            comment: str) -> None:
    """Create version V of an app or platform layer (editing) and its packaging disk, delivered to --output DIR or
    through --connector NAME, as a task: progress on stderr, Ctrl-C cancels. Boot a machine from the disk,
    install, shut it down, then `layerctl layer finalize`. A failed or cancelled packaging leaves no version and
    no file."""
    cli_state = state()
    service = packaging_service(cli_state.services())
    runner = cli_state.runner()
    show_progress(runner)
    task_id = service.start_packaging(
        runner, layer, version, Path(output) if output else None, connector=connector, fmt=fmt,
        previous=previous, prerequisites=prerequisites,
        os_version=os_version, script=Path(script) if script else None, size_gb=size_gb, comment=comment,
    )
    task = finish_task(runner, task_id, f"Packaging of {layer}:{version}")
    result = task.result or {}
    info = service.get_packaging(f"{result.get('layer', layer)}:{result.get('version', version)}")
    disk = info.disk
    then = f"layerctl layer finalize {info.layer}:{info.version}" + (
        "" if disk is not None and disk.delivery else " --from DISK")
    emit({**to_jsonable(info), "task": task_id},
         f"Packaging disk of {info.layer}:{info.version} ({info.state.value}): {disk.path if disk else '?'}\n"
         f"  made of: {_inputs(info)}\n"
         f"  Boot a machine from it, install, shut it down, then: {then} (task {task_id}).")


@click.command("finalize")
@click.argument("ref", metavar="LAYER:VERSION")
@click.option("--from", "disk", metavar="DISK",
              help="The packaging machine's disk (shut down), as delivered by `layerctl layer package`. Leave it out "
                   "when the disk went through a connector: it is fetched back from there.")
@comment_option
def finalize(ref: str, disk: str | None, comment: str) -> None:
    """Finalize a version made on a packaging machine, as a task: it becomes what changed on DISK (new and changed
    files, deletions, registry changes). Refused, the version staying editing, when DISK is not its packaging disk
    or has a pending reboot or pending file operations."""
    cli_state = state()
    services = cli_state.services()
    service = packaging_service(services)
    runner = cli_state.runner()
    show_progress(runner)
    task_id = service.start_finalize(runner, ref, Path(disk) if disk else None, comment=comment)
    task = finish_task(runner, task_id, f"Finalize of {ref}")
    result = task.result or {}
    info = services.layers.get_version(f"{result.get('layer')}:{result.get('version')}")
    emit({**to_jsonable(info), "task": task_id, "files": result.get("files"), "added": result.get("added"),
          "changed": result.get("changed"), "deletions": result.get("deletions"),
          "registry_operations": result.get("registry_operations")},
         f"Finalized {info.layer}:{info.name} ({info.state.value}): {result.get('added')} added and "
         f"{result.get('changed')} changed files, {result.get('deletions')} deletion(s), "
         f"{result.get('registry_operations')} registry operation(s) (task {task_id}).")


@click.command("abandon")
@click.argument("ref", metavar="LAYER:VERSION")
@comment_option
def abandon(ref: str, comment: str) -> None:
    """Delete a version being edited on a packaging machine (the packaging disk file is left where it is)."""
    service = packaging_service(state().services())
    service.abandon(ref, comment=comment)
    emit({"abandoned": ref}, f"Abandoned {ref}.")


def register(cli: click.Group) -> None:
    from app.cli.layers import layer_group

    for command in (package, finalize, abandon):
        layer_group.add_command(command)
    del cli  # the commands belong to `layerctl layer`
