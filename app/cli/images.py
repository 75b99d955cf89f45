"""``layerctl image …``"""

from __future__ import annotations

import click

from app.cli.main import comment_option, emit, state, table
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


def register(cli: click.Group) -> None:
    cli.add_command(image_group)
