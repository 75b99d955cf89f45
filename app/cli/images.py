"""``layerctl image …``"""

from __future__ import annotations

import secrets
import time
from datetime import UTC, datetime
from pathlib import Path

import click

from app import procs
from app.cli.main import comment_option, emit, finish_task, show_progress, state, table
from app.errors import EnvironmentProblem
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


@image_group.command("verify")
@click.argument("name")
@click.option("--path", "path", metavar="FILE", type=click.Path(dir_okay=False, path_type=Path),
              help="A copy of the image to check instead of the file at its recorded location.")
def verify(name: str, path: Path | None) -> None:
    """Check a published image's file against the checksum recorded when it was published (reads every
    byte). Exits non-zero when they differ."""
    check = state().services().publishing.verify_image(name, str(path) if path else None)
    emit(check, f"{check.path} is image {check.name} as it was published ({check.checksum}).")


@image_group.command("publish")
@click.argument("template")
@click.option("--output", "output", metavar="DIR", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the image (default: published/ in the LayerDesk home).")
@click.option("--wait", is_flag=True, help="Show the progress on stderr until the image is published.")
@click.option("--connector", metavar="NAME", help="Deliver the image to this connector (default: the template's).")
@comment_option
def publish(template: str, output: Path | None, wait: bool, connector: str | None, comment: str) -> None:
    """Publish TEMPLATE's image as a task: composite its layers into <image name>.<ext>.

    Without --wait the task runs in the background and its id is printed (follow it with `layerctl task
    show ID`, stop it with `layerctl task cancel ID`); with --wait the progress is shown on stderr until
    the image is published (Ctrl-C cancels; nothing is left behind)."""
    cli_state = state()
    services = cli_state.services()
    if not wait:
        task_id = _publish_in_background(template, output, comment, connector)
        emit({"task": task_id, "template": template, "background": True},
             f"Task {task_id}: publishing template {template} in the background; follow it with "
             f"`layerctl task show {task_id}`.")
        return
    runner = cli_state.runner()
    show_progress(runner)
    task_id = services.publishing.publish(runner, template, output, comment=comment, connector=connector)
    if not cli_state.json:
        click.echo(f"Task {task_id}: publishing template {template}.")
    task = finish_task(runner, task_id, f"Publish of {template}")
    result = task.result or {}
    emit({"task": task_id, "image": result.get("image"), "path": result.get("path"), "format": result.get("format"),
          "size_bytes": result.get("size_bytes"), "checksum": result.get("checksum"),
          "conflicts": result.get("conflicts"), "seconds": result.get("seconds"),
          "connector": result.get("connector") or None, "delivered_to": result.get("delivered_to") or None,
          "delivery_ids": result.get("delivery_ids") or {}},
         f"Published {result.get('image')} to {result.get('path')} ({result.get('size_bytes')} bytes, "
         f"{result.get('conflicts')} conflict(s); task {task_id})."
         + (f" Delivered to {result.get('delivered_to')}." if result.get("delivered_to") else ""))


#: How long the background publisher may take to record its task before we give up on it.
BACKGROUND_START_S = 60.0


def _publish_in_background(template: str, output: Path | None, comment: str, connector: str | None = None) -> int:
    """Start ``layerctl image publish --wait`` as a detached process and return the id of its task.

    Everything that can be checked here is checked first (role, publishable template), so a refusal is
    reported by this command; the child writes its output to a log file in the home's logs folder."""
    cli_state = state()
    services = cli_state.services()
    plan = services.publishing.plan(template)  # refuses now: no role, unknown or unpublishable template
    if connector or plan.connector:
        services.connectors.delivery(connector or str(plan.connector))  # and an unknown or incomplete connector
    newest = services.tasks.list_tasks(limit=1)
    after = newest[0].id if newest else 0
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    log_path = cli_state.home.logs / f"publish-{stamp}-{secrets.token_hex(3)}.log"
    argv = [*procs.module_command("app.cli"), "--home", str(cli_state.home.root), "image", "publish", template,
            "--wait", "--comment", comment, *(["--output", str(output.absolute())] if output else []),
            *(["--connector", connector] if connector else [])]
    child = procs.spawn_detached(argv, log_path)
    deadline = time.monotonic() + BACKGROUND_START_S
    while time.monotonic() < deadline:
        started = [t for t in services.tasks.list_tasks(kind="image.publish", started_by=services.caller.username,
                                                        limit=20) if t.id > after]
        if started:
            return min(t.id for t in started)
        if child.poll() is not None:
            lines = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
            why = lines[-1].removeprefix("layerctl: error: ") if lines else f"exit status {child.returncode}"
            raise EnvironmentProblem(f"The background publish of {template} did not start: {why}")
        time.sleep(0.1)
    raise EnvironmentProblem(f"The background publish of {template} did not record its task within "
                             f"{BACKGROUND_START_S:.0f} s; see {log_path}.")


def register(cli: click.Group) -> None:
    cli.add_command(image_group)
