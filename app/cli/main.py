"""``layerctl``: every service operation from the command line, with ``--json`` output for automation.

Errors a user can fix print one line on stderr (and, with ``--json``, an error object on stdout) and
exit non-zero: 2 usage, 3 invalid input, 4 permission or sign-in, 5 not found, 6 conflict,
1 environment (disk, keyring, catalog), 70 internal error (with the log file named).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import click

from app import __version__
from app.catalog.database import Catalog
from app.catalog.models import TaskState
from app.errors import Conflict, EnvironmentProblem, LayerDeskError
from app.logs import setup_logging
from app.paths import Home, resolve_home
from app.secrets import SecretStore
from app.services import Services, open_catalog, resolve_caller
from app.services.views import TaskInfo, to_jsonable
from app.tasks.runner import TaskEvent, TaskRunner

log = logging.getLogger(__name__)
INTERNAL_ERROR_STATUS = 70
F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class CliState:
    home_option: str | None
    json: bool
    _home: Home | None = None
    _services: Services | None = None
    _opened: tuple[Catalog, SecretStore] | None = None
    _runner: TaskRunner | None = None
    _cleanups: list[Callable[[], None]] = field(default_factory=list)

    @property
    def home(self) -> Home:
        if self._home is None:
            self._home = resolve_home(self.home_option)
        return self._home

    def open(self) -> tuple[Catalog, SecretStore]:
        """Open (creating if needed) the home and its catalog, without resolving a caller."""
        if self._opened is None:
            home = self.home.ensure()
            setup_logging(home.logs)
            self._opened = open_catalog(home)
            self._cleanups.append(self._opened[0].close)
        return self._opened

    def services(self) -> Services:
        """Open the catalog and resolve the caller (on first use only)."""
        if self._services is None:
            catalog, secrets = self.open()
            caller = resolve_caller(self.home, catalog, secrets)
            self._services = Services.for_caller(self.home, catalog, caller, secrets)
        return self._services

    def runner(self) -> TaskRunner:
        """A task runner for this command; its tasks are canceled if the command is interrupted."""
        if self._runner is None:
            services = self.services()
            self._runner = TaskRunner(services.catalog, services.caller)
            self._cleanups.append(self._runner.shutdown)
        return self._runner

    def close(self) -> None:
        while self._cleanups:
            self._cleanups.pop()()


def state() -> CliState:
    found = click.get_current_context().find_object(CliState)
    assert found is not None, "layerctl commands run under the cli group"
    return found


def emit(value: Any, human: Callable[[Any], str] | str | None = None) -> None:
    """Print a result: JSON with ``--json``, else the human rendering."""
    if state().json:
        click.echo(json.dumps(to_jsonable(value), indent=2, ensure_ascii=False))
        return
    if human is None:
        return
    text = human if isinstance(human, str) else human(value)
    if text:
        click.echo(text)


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    """A plain text table, columns as wide as their widest cell."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) if rows else f"(none)\n{lines[0]}"


class Interrupted(LayerDeskError):
    """The user stopped the command with Ctrl-C (after it cleaned up)."""

    code = "interrupted"
    exit_status = 130


def format_size(n: int) -> str:
    """Bytes as people read them: ``512 B``, ``1.5 MiB``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def show_progress(runner: TaskRunner) -> None:
    """Print each task's progress on stderr as ``[ 42%] message`` (once per change; not with --json).
    The end (done, failed, canceled) is reported by the command once the task is over."""
    if state().json:
        return
    last: dict[int, tuple[int, str]] = {}

    def show(event: TaskEvent) -> None:
        seen = (event.progress, event.message)
        if event.message and not event.state.is_final and last.get(event.task_id) != seen:
            last[event.task_id] = seen
            click.echo(f"[{event.progress:3d}%] {event.message}", err=True)

    runner.subscribe(show)


def finish_task(runner: TaskRunner, task_id: int, what: str) -> TaskInfo:
    """Wait for a task this command started; Ctrl-C cancels it (nothing is kept). Returns the task
    when it completed; otherwise one clear error saying that ``what`` (e.g. "Import of Office:2")
    failed or was canceled."""
    services = state().services()
    try:
        runner.wait(task_id)
    except KeyboardInterrupt as interrupt:
        click.echo(f"Canceling task {task_id}…", err=True)
        with contextlib.suppress(Conflict):  # it has just ended
            services.tasks.cancel(task_id, comment="Ctrl-C in layerctl")
        if runner.wait(task_id) is TaskState.CANCELED:
            raise Interrupted(f"{what} canceled by Ctrl-C (task {task_id}); nothing was kept.") from interrupt
        # It ended before the cancel arrived: report how, as usual.
    task = services.tasks.get_task(task_id)
    if task.state is TaskState.CANCELED:
        raise EnvironmentProblem(f"{what} was canceled (task {task_id}); nothing was kept.")
    if task.state is not TaskState.COMPLETE:
        raise EnvironmentProblem(f"{what} failed (task {task_id}): {task.error or task.message}")
    return task


def comment_option(fn: F) -> F:
    return click.option("--comment", default="", metavar="TEXT", help="Why: kept in the audit log.")(fn)


def read_password(prompt: str, from_stdin: bool, *, confirm: bool = False) -> str:
    """A password from stdin (one line) or an interactive hidden prompt; never from the command line."""
    if from_stdin:
        line = sys.stdin.readline()
        return line.rstrip("\r\n")
    if not sys.stdin.isatty():
        raise click.UsageError("no terminal to ask for the password: pass it on stdin with --password-stdin")
    return str(click.prompt(prompt, hide_input=True, confirmation_prompt=confirm))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--home", "home_option", metavar="DIR", envvar="LAYERDESK_HOME",
              help="LayerDesk home folder (default: your data folder; or LAYERDESK_HOME).")
@click.option("--json", "json_output", is_flag=True, help="Machine-readable JSON output.")
@click.version_option(__version__, prog_name="layerctl")
@click.pass_context
def cli(ctx: click.Context, home_option: str | None, json_output: bool) -> None:
    """LayerDesk command line: layers, image templates, tasks, elastic layers, settings, audit."""
    cli_state = CliState(home_option, json_output)
    ctx.obj = cli_state
    ctx.call_on_close(cli_state.close)


def _register() -> None:
    from app.cli import (
        access,
        admin,
        backup,
        demo,
        elastic,
        images,
        layers,
        packaging,
        repo,
        system,
        tasks,
        templates,
        transfer,
        userlayer,
    )

    for module in (access, admin, backup, demo, elastic, images, layers, packaging, repo, system, tasks, templates,
                   transfer, userlayer):
        module.register(cli)


_register()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status instead of raising (tests call it directly)."""
    args = list(sys.argv[1:] if argv is None else argv)
    json_output = "--json" in args[: args.index("--") if "--" in args else len(args)]
    try:
        # Without standalone mode, click returns the status of ``ctx.exit(N)`` instead of raising it.
        status = cli.main(args=args, prog_name="layerctl", standalone_mode=False)
        return status if isinstance(status, int) and not isinstance(status, bool) else 0
    except click.exceptions.Exit as done:
        return int(done.exit_code)
    except click.exceptions.Abort:
        _fail("aborted", "aborted", 1, json_output)
        return 1
    except click.ClickException as usage:
        hint = ""
        if isinstance(usage, click.UsageError) and usage.ctx is not None:
            hint = f" (see `{usage.ctx.command_path} --help`)"
        _fail(usage.format_message() + hint, "usage", 2, json_output)
        return 2
    except LayerDeskError as exc:
        _fail(str(exc), exc.code, exc.exit_status, json_output)
        return exc.exit_status
    except KeyboardInterrupt:
        _fail("interrupted", "interrupted", 130, json_output)
        return 130
    except Exception as exc:
        log.exception("layerctl failed with an internal error")
        where = _log_hint()
        _fail(f"internal error ({type(exc).__name__}: {exc}); this is a bug in LayerDesk.{where}",
              "internal", INTERNAL_ERROR_STATUS, json_output)
        return INTERNAL_ERROR_STATUS


def _log_hint() -> str:
    for handler in logging.getLogger().handlers:
        filename = getattr(handler, "baseFilename", None)
        if filename:
            return f" Details are in {filename}."
    return ""


def _fail(message: str, code: str, status: int, json_output: bool) -> None:
    one_line = " ".join(message.split())
    click.echo(f"layerctl: error: {one_line}", err=True)
    if json_output:
        click.echo(json.dumps({"error": {"code": code, "message": one_line, "exit_status": status}}))


def run() -> None:
    from app.procs import RUN_MODULE_FLAG, run_child_module

    if sys.argv[1:2] == [RUN_MODULE_FLAG]:  # a frozen build starting one of its own child processes
        sys.exit(run_child_module(sys.argv[2:]))
    sys.exit(main())
