"""Heavy work in a child process: a crash or a kill there never takes the console down, and the GIL
of the child never stalls the UI.

The parent (:class:`SubprocessTask`) starts ``python -m app.tasks.worker``, writes one JSON line to
its stdin (``{"function": "app.module:function", "args": {...}}``; secrets travel this way, never on
the command line), and reads JSON lines from its stdout:

* ``{"progress": 42, "message": "…"}`` · ``{"log": "…", "level": "INFO"}``
* ``{"result": {...}}`` as the last line of a run that worked, or
* ``{"error": {"kind": "user" | "environment" | "internal", "message": "…"}}``.

LayerDesk's own log records in the child (the ``app`` loggers, INFO and up: a layer disk cache hit, a
file system that cannot move blocks, a wimlib warning) go to the task's log too.

The function runs as ``function(args: dict, report: WorkerReport) -> dict``. Only functions under
``app.`` can be named. A cancel terminates the child (then kills it if it does not stop). A function
that must finish what it has started (an import past its commit point) turns SIGTERM into its own cancel
token and returns its result; a result that arrives after the cancel is kept.
"""

from __future__ import annotations

import importlib
import json
import logging
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TextIO

from app.errors import EnvironmentProblem, LayerDeskError, UserError
from app.procs import Cancellable, module_command, stream
from app.tasks.base import LayerDeskTask, TaskCanceled, TaskContext, TaskResult

WorkerFunction = Callable[[dict[str, Any], "WorkerReport"], dict[str, Any]]


class WorkerReport:
    """What a worker function uses to talk to its task (one JSON line per call, flushed)."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._lock = threading.Lock()  # a worker may report from several threads; a line is never split

    def _send(self, message: dict[str, Any]) -> None:
        line = json.dumps(message, ensure_ascii=False) + "\n"
        with self._lock:
            self._out.write(line)
            self._out.flush()

    def progress(self, percent: float, message: str = "") -> None:
        self._send({"progress": percent, "message": message})

    def log(self, text: str, level: str = "INFO") -> None:
        self._send({"log": text, "level": level})


class _ToTaskLog(logging.Handler):
    """Sends the child's ``app`` log records to the task's log."""

    def __init__(self, report: WorkerReport) -> None:
        super().__init__(logging.INFO)
        self.report = report

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.report.log(record.getMessage(), record.levelname)
        except Exception:  # noqa: BLE001 - logging must never break the work
            self.handleError(record)


def resolve(name: str) -> WorkerFunction:
    module_name, _, attribute = name.partition(":")
    if not module_name.startswith("app.") or not attribute:
        raise UserError(f"{name!r} is not a LayerDesk worker function (app.module:function).")
    function = getattr(importlib.import_module(module_name), attribute, None)
    if not callable(function):
        raise UserError(f"{name!r} is not a LayerDesk worker function.")
    return function  # type: ignore[no-any-return]


def main(
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    resolver: Callable[[str], WorkerFunction] = resolve,
) -> int:
    """The child's entry point (``resolver`` turns the spec's function name into the function)."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    # The parent asks politely with SIGTERM; end at once with the conventional status.
    if hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    report = WorkerReport(stdout)
    ours = logging.getLogger("app")
    handler, level, propagate = _ToTaskLog(report), ours.level, ours.propagate
    ours.addHandler(handler)
    ours.setLevel(logging.INFO)
    ours.propagate = False  # once in the task's log is enough
    try:
        spec = json.loads(stdin.readline())
        result = resolver(spec["function"])(dict(spec.get("args") or {}), report)
        report._send({"result": result})
        return 0
    except UserError as exc:
        report._send({"error": {"kind": "user", "message": str(exc)}})
    except LayerDeskError as exc:
        report._send({"error": {"kind": "environment", "message": str(exc)}})
    except Exception as exc:  # noqa: BLE001 - any bug is reported to the parent, which shows it as one
        report.log("".join(traceback.format_exception(exc)), "ERROR")
        report._send({"error": {"kind": "internal", "message": f"{type(exc).__name__}: {exc}"}})
    finally:
        ours.removeHandler(handler)
        ours.setLevel(level)
        ours.propagate = propagate
    return 1


class WorkerBug(RuntimeError):
    """A bug in the worker function (its traceback is in the task log)."""


@dataclass(frozen=True)
class WorkerResult(TaskResult):
    """What a subprocess task returns: the worker function's result document."""

    data: dict[str, Any] | None = None


class SubprocessTask(LayerDeskTask):
    """A task whose work runs in a child process (see the module docstring for the protocol)."""

    kind: ClassVar[str] = "subprocess"
    #: ``app.module:function`` run in the child.
    function: ClassVar[str]
    #: The module the child runs with ``python -m``.
    worker_module: ClassVar[str] = "app.tasks.worker"

    def arguments(self) -> dict[str, Any]:
        """The JSON-serialisable arguments handed to the worker function."""
        return {}

    def result(self, data: dict[str, Any]) -> TaskResult:
        """Turn the worker's result document into this task's typed result."""
        return WorkerResult(summary=str(data.get("summary", "")), data=data)

    def run(self, ctx: TaskContext) -> TaskResult:
        return self.result(self.run_worker(ctx))

    def run_worker(self, ctx: TaskContext) -> dict[str, Any]:
        """Run the worker function in a child process and return its result document (tasks that do
        more in the parent, such as recording what the child produced, call this from ``run``)."""
        try:
            return call_worker(self.function, self.arguments(), ctx.cancel, progress=ctx.progress, log=ctx.log,
                               module=self.worker_module)
        except WorkerFailed as exc:
            raise EnvironmentProblem(f"The worker process for {self.title!r} failed: {exc}") from None


class WorkerFailed(RuntimeError):
    """The child process ended without a result or an error document (it crashed or was killed); the
    message is the last line of its error output, or its exit status."""


def call_worker(
    function: str, args: dict[str, Any], cancel: Cancellable, *,
    progress: Callable[[float, str], None] | None = None, log: Callable[[str, str], None] | None = None,
    module: str = "app.tasks.worker",
) -> dict[str, Any]:
    """Run ``function`` (``app.module:function``) with ``args`` in a child process (see the module docstring
    for the protocol) and return its result document; its progress and log lines go to ``progress`` and
    ``log``. Raises what the function raised, by kind: :class:`UserError`, :class:`EnvironmentProblem` or
    :class:`WorkerBug`; :class:`TaskCanceled` when ``cancel`` stopped it before it returned a result (a
    result that came anyway, because the work was done, is returned); :class:`WorkerFailed` when it
    ended without saying why. Blocks until the child has ended: run it in a thread to do other work
    meanwhile (the thread only waits on the child's output)."""
    outcome: dict[str, Any] = {}

    def on_line(line: str) -> None:
        try:
            message = json.loads(line)
        except json.JSONDecodeError:
            if log is not None:
                log(line, "INFO")  # stray output (a library printing) goes to the log
            return
        if "progress" in message:
            if progress is not None:
                progress(float(message["progress"]), str(message.get("message", "")))
        elif "log" in message:
            if log is not None:
                log(str(message["log"]), str(message.get("level", "INFO")))
        else:
            outcome.update(message)

    spec = json.dumps({"function": function, "args": args}) + "\n"
    done = stream(module_command(module), on_line, cancel, stdin_text=spec)
    if "result" in outcome:
        if done.cancelled and log is not None:
            # The child had committed its work (an import stores its version all or nothing) before the
            # cancel reached it: undoing finished work is not what a cancel is for.
            log("The cancel came after the work had finished; the result is kept.", "WARNING")
        return dict(outcome["result"])
    if done.cancelled:
        raise TaskCanceled()
    error = outcome.get("error") or {}
    message = str(error.get("message") or "")
    if error.get("kind") == "user":
        raise UserError(message)
    if error.get("kind") == "environment":
        raise EnvironmentProblem(message)
    if error.get("kind") == "internal":
        raise WorkerBug(message)
    raise WorkerFailed(message or (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1])


if __name__ == "__main__":
    sys.exit(main())
