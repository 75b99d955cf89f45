"""``layerctl demo``"""

from __future__ import annotations

import click

from app.cli.main import emit, state
from app.services.demo import DEMO_LABEL, DemoLab, create_demo_lab


def _done(lab: DemoLab) -> str:
    lines = [f"Created the demo lab ({DEMO_LABEL}):", f"  image template {lab.template}"]
    lines.extend(f"  layer version {ref} (import task {task})"
                 for ref, task in zip(lab.versions, lab.tasks, strict=True))
    lines.append(f"Try `layerctl template conflicts {lab.template}` and "
                 f"`layerctl image publish {lab.template} --wait`.")
    return "\n".join(lines)


@click.command("demo")
def demo() -> None:
    """Create a demo lab: a synthetic OS layer (with real registry hives), a platform layer, three app
    layers that overlap in files and registry values, and an image template over them (WIM).

    Everything is named Demo-… and is a demo – not bootable. Progress goes to stderr."""
    cli_state = state()
    services = cli_state.services()
    runner = cli_state.runner()
    quiet = cli_state.json

    def progress(percent: int, message: str) -> None:
        if not quiet:
            click.echo(f"[{percent:3d}%] {message}", err=True)

    emit(create_demo_lab(services, runner, progress=progress), _done)


def register(cli: click.Group) -> None:
    cli.add_command(demo)
