"""``layerctl layer …``"""

from __future__ import annotations

from pathlib import Path

import click

from app.catalog.models import LayerType, VersionState
from app.cli.main import comment_option, emit, finish_task, show_progress, state, table
from app.services.base import split_qualified
from app.services.views import LayerDetail, LayerInfo, LayerVersionInfo, to_jsonable


def _size(n: int) -> str:
    step = 1024.0
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < step or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= step
    return f"{n} B"


def _layers_table(layers: list[LayerInfo]) -> str:
    return table(
        [(layer.name, layer.type.value, layer.os_layer or "", layer.version_count, layer.latest_version or "",
          layer.latest_state.value if layer.latest_state else "", _size(layer.size_bytes)) for layer in layers],
        ["NAME", "TYPE", "OS LAYER", "VERSIONS", "LATEST", "STATE", "SIZE"],
    )


def _version_line(v: LayerVersionInfo) -> str:
    extra = f" – {v.state_reason}" if v.state_reason else ""
    used = f"\n      used by: {'; '.join(v.used_by)}" if v.used_by else ""
    prereq = f"\n      prerequisites: {', '.join(v.prerequisites)}" if v.prerequisites else ""
    return (f"  {v.name:<16} {v.state.value:<11} {_size(v.size_bytes):>10}  {v.created_at:%Y-%m-%d %H:%M} "
            f"{v.created_by}{extra}{prereq}{used}")


def _detail(d: LayerDetail) -> str:
    layer = d.layer
    lines = [f"{layer.name} ({layer.type.value} layer)"]
    if layer.os_layer:
        lines.append(f"OS layer: {layer.os_layer}")
    if layer.description:
        lines.append(f"Description: {layer.description}")
    lines.append(f"Created: {layer.created_at:%Y-%m-%d %H:%M} by {layer.created_by}")
    if d.bound_layers:
        lines.append(f"Bound layers: {', '.join(d.bound_layers)}")
    lines.append(f"Versions ({len(d.versions)}):")
    lines.extend(_version_line(v) for v in d.versions)
    return "\n".join(lines)


@click.group("layer")
def layer_group() -> None:
    """OS, platform and app layers and their versions."""


@layer_group.command("create")
@click.option("--type", "layer_type", type=click.Choice([t.value for t in LayerType]), required=True)
@click.argument("name")
@click.option("--os-layer", metavar="NAME", help="The OS layer an app or platform layer belongs to.")
@click.option("--description", default="", metavar="TEXT")
@comment_option
def create(layer_type: str, name: str, os_layer: str | None, description: str, comment: str) -> None:
    """Create a layer (no versions yet)."""
    info = state().services().layers.create_layer(
        name, LayerType(layer_type), os_layer=os_layer, description=description, comment=comment
    )
    emit(info, f"Created {info.type.value} layer {info.name!r}.")


@layer_group.command("list")
@click.option("--type", "layer_type", type=click.Choice([t.value for t in LayerType]))
@click.option("--search", metavar="TEXT", help="Only layers whose name contains TEXT.")
def list_(layer_type: str | None, search: str | None) -> None:
    """List layers."""
    layers = state().services().layers.list_layers(LayerType(layer_type) if layer_type else None, search)
    emit(layers, _layers_table)


@layer_group.command("show")
@click.argument("name")
def show(name: str) -> None:
    """Show a layer with its versions and what uses them."""
    emit(state().services().layers.get_layer(name), _detail)


@layer_group.command("update")
@click.argument("name")
@click.option("--rename", "new_name", metavar="NEW")
@click.option("--description", metavar="TEXT")
@comment_option
def update(name: str, new_name: str | None, description: str | None, comment: str) -> None:
    """Rename a layer or change its description."""
    info = state().services().layers.update_layer(name, new_name=new_name, description=description, comment=comment)
    emit(info, f"Updated layer {info.name!r}.")


@layer_group.command("delete")
@click.argument("ref", metavar="NAME[:VERSION]")
@comment_option
def delete(ref: str, comment: str) -> None:
    """Delete a layer, or one version of it (refused while in use)."""
    services = state().services()
    name, version = split_qualified(ref)
    if version is None:
        services.layers.delete_layer(name, comment=comment)
        emit({"deleted": name}, f"Deleted layer {name!r}.")
    else:
        services.layers.delete_version(ref, comment=comment)
        emit({"deleted": ref}, f"Deleted version {ref}.")


@layer_group.group("version")
def version_group() -> None:
    """Layer versions."""


@version_group.command("add")
@click.argument("layer")
@click.argument("version")
@click.option("--prerequisite", "prerequisites", multiple=True, metavar="LAYER[:VERSION]",
              help="A layer that must be present while this app layer version is packaged (repeatable).")
@comment_option
def version_add(layer: str, version: str, prerequisites: tuple[str, ...], comment: str) -> None:
    """Start a new version of a layer (state: editing)."""
    info = state().services().layers.add_version(layer, version, prerequisites=prerequisites, comment=comment)
    emit(info, f"Added version {info.layer}:{info.name} ({info.state.value}).")


@version_group.command("show")
@click.argument("ref", metavar="LAYER:VERSION")
def version_show(ref: str) -> None:
    """Show one version."""
    emit(state().services().layers.get_version(ref), _version_line)


@version_group.command("prerequisites")
@click.argument("ref", metavar="LAYER:VERSION")
@click.argument("prerequisites", nargs=-1, metavar="[LAYER[:VERSION] ...]")
@comment_option
def version_prerequisites(ref: str, prerequisites: tuple[str, ...], comment: str) -> None:
    """Replace a version's prerequisite layers (none to clear them)."""
    info = state().services().layers.set_prerequisites(ref, prerequisites, comment=comment)
    emit(info, f"{info.layer}:{info.name} prerequisites: {', '.join(info.prerequisites) or 'none'}.")


@version_group.command("mark-broken")
@click.argument("ref", metavar="LAYER:VERSION")
@click.option("--reason", required=True, metavar="TEXT", help="Why the version must not be used.")
@comment_option
def version_mark_broken(ref: str, reason: str, comment: str) -> None:
    """Mark a version that is being edited or finalized as broken."""
    info = state().services().layers.set_version_state(ref, VersionState.BROKEN, reason=reason, comment=comment)
    emit(info, f"{info.layer}:{info.name} is now broken.")


@layer_group.command("import")
@click.argument("name")
@click.option("--version", "version", required=True, metavar="V", help="The new version's name.")
@click.option("--from", "source", required=True, metavar="PATH",
              help="A folder (OCI-style .wh. whiteouts honoured), a WIM file, an NTFS volume image, or a disk "
                   "image (VHD, VHDX, VMDK, qcow2, raw; its Windows NTFS partition).")
@click.option("--image", type=click.IntRange(min=1), metavar="N", help="The image of a WIM file (default 1).")
@click.option("--registry", "registry_files", multiple=True, metavar="FILE.reg",
              help="Registry changes of the version (repeatable; later files win).")
@click.option("--base", metavar="PATH",
              help="App and platform layers: the packaging machine's disk (or NTFS volume image) before the "
                   "installation; --from is then the same machine after it, and the version is the difference: "
                   "new and changed files, deletions, and the registry changes of its hives.")
@comment_option
def import_(name: str, version: str, source: str, image: int | None, registry_files: tuple[str, ...],
            base: str | None, comment: str) -> None:
    """Import a new version of a layer, as a task: progress on stderr, Ctrl-C cancels.

    With --base, the version is the difference between two disks of the packaging machine. A failed or
    cancelled import leaves nothing behind."""
    cli_state = state()
    services = cli_state.services()
    runner = cli_state.runner()
    show_progress(runner)
    task_id = services.imports.start_import(
        runner, name, version, Path(source), image=image, registry_files=[Path(f) for f in registry_files],
        base=Path(base) if base is not None else None, comment=comment,
    )
    task = finish_task(runner, task_id, f"Import of {name}:{version}")
    result = task.result or {}
    info = services.layers.get_version(f"{result.get('layer', name)}:{result.get('version', version)}")
    emit({**to_jsonable(info), "task": task_id, "files": result.get("files"),
          "wim_bytes": result.get("wim_bytes")},
         f"Imported {info.layer}:{info.name} ({info.state.value}): {result.get('files')} files, "
         f"{_size(info.size_bytes)} (task {task_id}).")


@layer_group.command("export-disk")
@click.argument("ref", metavar="LAYER:VERSION")
@click.option("--to", "out", required=True, metavar="FILE.vhdx|FILE.vhd",
              help="The layer disk to write (VHDX, or a dynamic VHD for .vhd); it must not exist yet.")
@comment_option
def export_disk(ref: str, out: str, comment: str) -> None:
    """Write a version as a layer disk of its own: its files on an NTFS volume, with its deletions and
    registry changes in LayerDesk\\layer.json. `layer import --from FILE` reads it back as a version."""
    from app.services.transfer import TransferService

    cli_state = state()
    runner = cli_state.runner()
    show_progress(runner)
    task_id = TransferService.for_services(cli_state.services()).start_layer_disk_export(
        runner, ref, Path(out), comment=comment)
    task = finish_task(runner, task_id, f"Layer disk of {ref}")
    result = task.result or {}
    emit({**result, "task": task_id}, task.message)


def register(cli: click.Group) -> None:
    cli.add_command(layer_group)
