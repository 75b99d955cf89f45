"""``layerctl image …``"""

from __future__ import annotations

from pathlib import Path

import click

from app.cli.main import comment_option, emit, finish_task, show_progress, state, table
from app.services.views import PublishPlan


def _plan(p: PublishPlan) -> str:
    lines = [f"Image {p.image_name} ({p.disk_format.value}, {p.size_gb} GB) from {p.template} revision "
             f"{p.template_revision}", "Layers, top (wins) to bottom:"]
    lines.extend(f"  {e.role:<9} {e.layer}:{e.version}" for e in reversed(p.stack))
    if p.connector:
        lines.append(f"Connector: {p.connector}")
    return "\n".join(lines)


@click.group("image")
def image_group() -> None:
    """Published images."""


@image_group.command("plan")
@click.argument("template")
def plan(template: str) -> None:
    """Show what publishing TEMPLATE would composite, or why it cannot be published yet."""
    emit(state().services().publishing.plan(template), _plan)


@image_group.command("list")
@click.option("--template", metavar="NAME")
def list_(template: str | None) -> None:
    """Published images, newest first."""
    images = state().services().publishing.list_images(template)
    emit(images, lambda rows: table(
        [(i.name, i.template, i.disk_format.value, i.size_bytes, i.location, i.created_by) for i in rows],
        ["NAME", "TEMPLATE", "FORMAT", "BYTES", "LOCATION", "BY"]))


@image_group.command("forget")
@click.argument("name")
@comment_option
def forget(name: str, comment: str) -> None:
    """Delete a published image's record (the disk itself is left where it is)."""
    state().services().publishing.delete_image_record(name, comment=comment)
    emit({"deleted": name}, f"Forgot published image {name!r}.")


@image_group.command("publish")
@click.argument("template")
@click.option("--output", "output", metavar="DIR", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the image (default: published/ in the LayerDesk home).")
@click.option("--wait", is_flag=True, help="Show the progress on stderr until the image is published.")
@comment_option
def publish(template: str, output: Path | None, wait: bool, comment: str) -> None:
    """Publish TEMPLATE's image as a task: composite its layers into <image name>.<ext>.

    The task id is printed at once. Tasks run inside this command, so it stays until the image is
    published (Ctrl-C cancels; nothing is left behind); --wait also shows the progress on stderr."""
    cli_state = state()
    services = cli_state.services()
    runner = cli_state.runner()
    if wait:
        show_progress(runner)
    task_id = services.publishing.publish(runner, template, output, comment=comment)
    if not cli_state.json:
        click.echo(f"Task {task_id}: publishing template {template}.")
    task = finish_task(runner, task_id, f"Publish of {template}")
    result = task.result or {}
    emit({"task": task_id, "image": result.get("image"), "path": result.get("path"), "format": result.get("format"),
          "size_bytes": result.get("size_bytes"), "checksum": result.get("checksum"),
          "conflicts": result.get("conflicts"), "seconds": result.get("seconds")},
         f"Published {result.get('image')} to {result.get('path')} ({result.get('size_bytes')} bytes, "
         f"{result.get('conflicts')} conflict(s); task {task_id}).")


def register(cli: click.Group) -> None:
    cli.add_command(image_group)
