"""``layerctl repo …``: the layer repository."""

from __future__ import annotations

import click

from app.cli.main import emit, state
from app.services.repository import RepositoryReport


def _report(report: RepositoryReport) -> str:
    if report.ok:
        return f"The layer repository {report.path} is healthy ({report.stored_versions} stored version(s) checked)."
    lines = [f"The layer repository {report.path} has {len(report.problems)} problem(s):"]
    lines.extend(f"  {problem}" for problem in report.problems)
    return "\n".join(lines)


@click.group("repo")
def repo_group() -> None:
    """The layer repository (stored layer versions)."""


@repo_group.command("check")
def check() -> None:
    """Verify every stored layer version (WIM data, integrity tables, manifests and their checksums)
    against the catalog; list the problems. Exits 1 when there are any."""
    report = state().services().repository.check()
    emit(report, _report)
    if not report.ok:
        click.get_current_context().exit(1)


def register(cli: click.Group) -> None:
    cli.add_command(repo_group)
