"""``layerctl template …``"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import click

from app.catalog.models import DiskFormat, ElasticMode, SysprepMode
from app.cli.main import F, comment_option, emit, state, table
from app.services.templates import TemplateSpec
from app.services.views import FieldChange, TemplateInfo, TemplateRevisionInfo

FORMATS = [f.value for f in DiskFormat]
ELASTIC = [m.value for m in ElasticMode]
SYSPREP = [m.value for m in SysprepMode]


def _show(t: TemplateInfo) -> str:
    lines = [
        f"{t.name} (revision {t.revision})",
        f"  OS layer:       {t.os_version}",
        f"  Platform layer: {t.platform_version or '(none)'}",
        "  App layers (highest priority first):",
    ]
    lines.extend(f"    {len(t.app_layers) - i}. {a}" for i, a in enumerate(reversed(t.app_layers)))
    if not t.app_layers:
        lines.append("    (none)")
    lines += [
        f"  Connector:      {t.connector or '(none)'}",
        f"  Disk:           {t.disk_format.value}, {t.size_gb} GB",
        f"  Elastic mode:   {t.elastic_mode.value}",
        f"  Sysprep:        {t.sysprep.value}",
    ]
    if t.description:
        lines.append(f"  Description:    {t.description}")
    if t.publish_blockers:
        lines.append("  Not publishable yet: " + "; ".join(t.publish_blockers))
    return "\n".join(lines)


def _history(revisions: list[TemplateRevisionInfo]) -> str:
    return table([(r.revision, f"{r.saved_at:%Y-%m-%d %H:%M}", r.saved_by, r.comment) for r in revisions],
                 ["REVISION", "SAVED", "BY", "COMMENT"])


def _diff(changes: list[FieldChange]) -> str:
    if not changes:
        return "No differences."
    return "\n".join(f"{c.field}:\n  - {c.before}\n  + {c.after}" for c in changes)


def spec_options(required: bool) -> Callable[[F], F]:
    """The options that describe a template's content (required when creating)."""

    def wrap(fn: F) -> F:
        for option in reversed([
            click.option("--os", "os_ref", required=required, metavar="NAME[:V]", help="OS layer version."),
            click.option("--platform", metavar="NAME[:V]", help="Platform layer version."),
            click.option("--app", "apps", multiple=True, metavar="NAME[:V]", help="App layer version (repeatable)."),
            click.option("--format", "disk_format", type=click.Choice(FORMATS), required=required),
            click.option("--size-gb", type=int, required=required, help="Disk size in GB."),
            click.option("--elastic", type=click.Choice(ELASTIC), help="Elastic layering mode."),
            click.option("--sysprep", type=click.Choice(SYSPREP)),
            click.option("--connector", metavar="NAME", help="Connector configuration to publish through."),
            click.option("--description", metavar="TEXT"),
        ]):
            fn = option(fn)
        return fn
    return wrap


@click.group("template")
def template_group() -> None:
    """Image templates: the layers and settings of a published image."""


@template_group.command("create")
@click.argument("name")
@spec_options(required=True)
@comment_option
def create(name: str, os_ref: str, platform: str | None, apps: tuple[str, ...], disk_format: str, size_gb: int,
           elastic: str | None, sysprep: str | None, connector: str | None, description: str | None,
           comment: str) -> None:
    """Create an image template. App layers get the default priority (the newest layer highest)."""
    spec = TemplateSpec(
        os=os_ref, platform=platform, apps=apps, disk_format=DiskFormat(disk_format), size_gb=size_gb,
        elastic_mode=ElasticMode(elastic or ElasticMode.NONE),
        sysprep=SysprepMode(sysprep or SysprepMode.NOT_GENERALIZED), connector=connector, description=description or "",
    )
    info = state().services().templates.create_template(name, spec, comment=comment)
    emit(info, _show)


@template_group.command("update")
@click.argument("name")
@spec_options(required=False)
@click.option("--no-platform", is_flag=True, help="Remove the platform layer.")
@click.option("--no-connector", is_flag=True, help="Remove the connector.")
@comment_option
def update(name: str, os_ref: str | None, platform: str | None, apps: tuple[str, ...], disk_format: str | None,
           size_gb: int | None, elastic: str | None, sysprep: str | None, connector: str | None,
           description: str | None, no_platform: bool, no_connector: bool, comment: str) -> None:
    """Change a template; options left out keep their value. --app replaces the whole app layer list."""
    services = state().services()
    current = services.templates.get_template(name)
    spec = TemplateSpec(
        os=current.os_version, platform=current.platform_version, apps=current.app_layers,
        disk_format=current.disk_format, size_gb=current.size_gb, elastic_mode=current.elastic_mode,
        sysprep=current.sysprep, connector=current.connector, description=current.description, icon=current.icon,
    )
    changes: dict[str, object] = {}
    if os_ref:
        changes["os"] = os_ref
    if platform or no_platform:
        changes["platform"] = None if no_platform else platform
    if apps:
        changes["apps"] = apps
    if disk_format:
        changes["disk_format"] = DiskFormat(disk_format)
    if size_gb is not None:
        changes["size_gb"] = size_gb
    if elastic:
        changes["elastic_mode"] = ElasticMode(elastic)
    if sysprep:
        changes["sysprep"] = SysprepMode(sysprep)
    if connector or no_connector:
        changes["connector"] = None if no_connector else connector
    if description is not None:
        changes["description"] = description
    info = services.templates.update_template(name, dataclasses.replace(spec, **changes), comment=comment)  # type: ignore[arg-type]
    emit(info, _show)


@template_group.command("priority")
@click.argument("name")
@click.argument("app_layers", nargs=-1, required=True, metavar="APP_LAYER ...")
@comment_option
def priority(name: str, app_layers: tuple[str, ...], comment: str) -> None:
    """Reorder the template's app layers, lowest priority first (the last one wins)."""
    emit(state().services().templates.set_priority(name, app_layers, comment=comment), _show)


@template_group.command("list")
@click.option("--search", metavar="TEXT")
def list_(search: str | None) -> None:
    """List image templates."""
    templates = state().services().templates.list_templates(search)
    emit(templates, lambda ts: table(
        [(t.name, t.os_version, t.platform_version or "", len(t.app_layers), t.disk_format.value, t.size_gb,
          t.revision, "yes" if not t.publish_blockers else "no") for t in ts],
        ["NAME", "OS", "PLATFORM", "APPS", "FORMAT", "GB", "REV", "PUBLISHABLE"]))


@template_group.command("show")
@click.argument("name")
def show(name: str) -> None:
    """Show a template."""
    emit(state().services().templates.get_template(name), _show)


@template_group.command("history")
@click.argument("name")
def history(name: str) -> None:
    """Every saved revision of a template."""
    emit(state().services().templates.history(name), _history)


@template_group.command("diff")
@click.argument("name")
@click.argument("revision_a", type=int)
@click.argument("revision_b", type=int)
def diff(name: str, revision_a: int, revision_b: int) -> None:
    """What changed between two revisions."""
    emit(state().services().templates.diff(name, revision_a, revision_b), _diff)


@template_group.command("clone")
@click.argument("name")
@click.argument("new_name")
@comment_option
def clone(name: str, new_name: str, comment: str) -> None:
    """Copy a template under a new name."""
    info = state().services().templates.clone_template(name, new_name, comment=comment)
    emit(info, f"Cloned {name!r} to {info.name!r}.")


@template_group.command("rename")
@click.argument("name")
@click.argument("new_name")
@comment_option
def rename(name: str, new_name: str, comment: str) -> None:
    """Rename a template (its history stays)."""
    info = state().services().templates.rename_template(name, new_name, comment=comment)
    emit(info, f"Renamed {name!r} to {info.name!r}.")


@template_group.command("delete")
@click.argument("name")
@comment_option
def delete(name: str, comment: str) -> None:
    """Delete a template (published images keep their records)."""
    state().services().templates.delete_template(name, comment=comment)
    emit({"deleted": name}, f"Deleted template {name!r}.")


@template_group.command("conflicts")
@click.argument("name")
def conflicts(name: str) -> None:
    """Every file path and registry value more than one layer of template NAME supplies, lowest priority
    first, and the layer that wins ("removes" when the winner deletes it). Nothing is written."""
    found = state().services().publishing.conflicts(name)

    def human(_: object) -> str:
        if not found:
            return "No conflicts."
        return table([(c.kind, c.path, " < ".join(c.layers), c.winner + (" (removes)" if c.deleted else ""))
                      for c in found], ["KIND", "PATH", "LAYERS (LOWEST FIRST)", "WINNER"])

    emit([c.to_dict() for c in found], human)


def register(cli: click.Group) -> None:
    cli.add_command(template_group)
