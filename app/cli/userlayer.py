"""``layerctl userlayer …``: where users' User Layers live."""

from __future__ import annotations

import click

from app.cli.main import emit, state


@click.group("userlayer")
def userlayer_group() -> None:
    """User Layers: where each user's layer lives."""


@userlayer_group.command("where")
@click.option("--user", required=True, metavar="USER", help="user, DOMAIN\\user, user@domain or a SID.")
@click.option("--template", required=True, metavar="NAME", help="The image template (its OS layer picks the folder).")
def where(user: str, template: str) -> None:
    """Where USER's User Layer for image template NAME lives: the highest-priority storage location
    assigned to one of the user's groups (nested groups included)."""
    from app.services.storage import UserLayerPlace

    found = state().services().storage.user_layer_location(user, template)

    def human(p: UserLayerPlace) -> str:
        lines = [
            p.folder,
            f"  user:     {p.user} ({p.user_sid})",
            f"  location: {p.location} (priority {p.priority}, via group {p.group_name})",
            f"  OS layer: {p.os_layer} (id {p.os_layer_id}, from template {p.template})",
            f"  size:     {p.size_gb} GB",
        ]
        if p.also:
            lines.append(f"  not used (lower priority): {', '.join(p.also)}")
        return "\n".join(lines)

    emit(found, human)


def register(cli: click.Group) -> None:
    cli.add_command(userlayer_group)
