"""The one way LayerDesk runs external programs (qemu-img, wimlib tools, worker processes).

Programs are resolved with ``shutil.which`` (a clear error when missing), never run through a shell,
and secrets go by environment or stdin, never on the command line. Results are :class:`Outcome`s.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from app.errors import EnvironmentProblem

log = logging.getLogger(__name__)

#: How long a cancelled program gets to stop politely before it is killed.
TERMINATE_GRACE_S = 3.0


class Cancellable(Protocol):
    @property
    def cancelled(self) -> bool: ...


@dataclass(frozen=True)
class Outcome:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    duration_s: float
    cancelled: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.cancelled


#: Where system tools (mkntfs, mkfs.fat, ...) live on Linux even when a user's PATH leaves them out.
SYSTEM_PROGRAM_DIRS: tuple[str, ...] = ("/usr/local/sbin", "/usr/sbin", "/sbin")


def bundled_tools_dir() -> Path | None:
    """The ``tools`` folder beside a frozen build's executables, where the Windows installer puts the
    engine's tools (qemu-img, wimlib) it ships; ``None`` when running from source or when it is absent.
    Tools found there are preferred to those on PATH."""
    if not getattr(sys, "frozen", False):
        return None
    folder = Path(sys.executable).resolve().parent / "tools"
    return folder if folder.is_dir() else None


def find_program(name: str, *, package_hint: str = "") -> str:
    """The full path of ``name``; :class:`EnvironmentProblem` naming what to install when missing."""
    if (os.sep in name or (os.altsep and os.altsep in name)) and Path(name).is_file():
        return name
    found = None
    bundled = bundled_tools_dir()
    if bundled is not None:
        found = shutil.which(name, path=str(bundled))
    found = found or shutil.which(name)
    if found is None and os.name != "nt":
        found = shutil.which(name, path=os.pathsep.join(SYSTEM_PROGRAM_DIRS))
    if found is None:
        hint = f" Install {package_hint}." if package_hint else ""
        raise EnvironmentProblem(f"The program {name!r} was not found on this machine.{hint}")
    return found


def run(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    stdin: str | None = None,
    cwd: Path | None = None,
    timeout_s: float | None = None,
) -> Outcome:
    """Run a program to its end and capture its output."""
    resolved = [find_program(argv[0]), *argv[1:]]
    started = time.monotonic()
    try:
        proc = subprocess.run(  # noqa: S603 - argument list, resolved program, no shell
            resolved,
            input=stdin,
            capture_output=True,
            text=True,
            env={**os.environ, **env} if env else None,
            cwd=cwd,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise EnvironmentProblem(f"{Path(resolved[0]).name} did not finish within {timeout_s:.0f} s.") from exc
    return Outcome(tuple(resolved), proc.returncode, proc.stdout, proc.stderr, time.monotonic() - started)


def stream(
    argv: Sequence[str],
    on_line: Callable[[str], None],
    cancel: Cancellable,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    poll_s: float = 0.1,
    stdin_text: str | None = None,
) -> Outcome:
    """Run a program, hand each stdout line to ``on_line`` as it comes, stop it when ``cancel`` says so.

    Cancelling sends a polite terminate, then kills after :data:`TERMINATE_GRACE_S`. ``stdin_text``
    (a small document, e.g. a job description with secrets) is written to the program's stdin,
    which is then closed.
    """
    resolved = [find_program(argv[0]), *argv[1:]]
    started = time.monotonic()
    proc = subprocess.Popen(  # noqa: S603 - argument list, resolved program, no shell
        resolved,
        stdin=subprocess.DEVNULL if stdin_text is None else subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        bufsize=1,
        env={**os.environ, **env} if env else None,
        cwd=cwd,
    )
    if stdin_text is not None:
        assert proc.stdin is not None
        try:
            proc.stdin.write(stdin_text)
        except BrokenPipeError:
            pass  # the program ended before reading; its exit status tells why
        finally:
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()
    stderr_parts: list[str] = []
    assert proc.stdout is not None and proc.stderr is not None
    err_reader = threading.Thread(target=lambda: stderr_parts.append(proc.stderr.read()), daemon=True)  # type: ignore[union-attr]
    err_reader.start()
    lines: list[str] = []
    lock = threading.Condition()

    def read_stdout() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            with lock:
                lines.append(line.rstrip("\n"))
                lock.notify()
        with lock:
            lock.notify()

    out_reader = threading.Thread(target=read_stdout, daemon=True)
    out_reader.start()
    cancelled = False
    try:
        while True:
            with lock:
                if not lines and out_reader.is_alive():
                    lock.wait(poll_s)
                pending, lines[:] = list(lines), []
            for line in pending:
                on_line(line)
            if cancel.cancelled and not cancelled:
                cancelled = True
                _stop(proc)
            if not out_reader.is_alive() and not pending:
                with lock:
                    if not lines:
                        break
        proc.wait()
    except BaseException:
        # ``on_line`` failed (or the caller was interrupted): never leave the program running.
        proc.kill()
        proc.wait()
        raise
    finally:
        out_reader.join(timeout=5)
        err_reader.join(timeout=5)
        for pipe, reader in ((proc.stdout, out_reader), (proc.stderr, err_reader)):
            if not reader.is_alive():  # a reader still blocked (a grandchild holds the pipe) keeps it
                pipe.close()
    return Outcome(
        tuple(resolved), proc.returncode, "", "".join(stderr_parts), time.monotonic() - started, cancelled
    )


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=TERMINATE_GRACE_S)
    except subprocess.TimeoutExpired:
        log.warning("process %d ignored terminate; killing it", proc.pid)
        proc.kill()


def spawn_detached(argv: Sequence[str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start a program that may outlive this one (its own session, no terminal), its output going to
    ``log_path``. The caller watches it through what it records (e.g. the task it creates). While this
    process lives, a daemon thread reaps the program when it ends, so it never lingers as a zombie."""
    resolved = [find_program(argv[0]), *argv[1:]]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log_file:
        child = subprocess.Popen(  # noqa: S603 - argument list, resolved program, no shell
            resolved,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    threading.Thread(target=child.wait, name=f"reap-{child.pid}", daemon=True).start()
    return child


#: The modules LayerDesk runs as child processes of its own: task workers and ``layerctl`` itself.
CHILD_MODULES: tuple[str, ...] = ("app.tasks.worker", "app.cli")
#: How a frozen build's ``layerctl`` is asked to run one of them instead of a command.
RUN_MODULE_FLAG = "--run-module"


def module_command(module: str) -> list[str]:
    """The command line that runs ``module`` in a child process:
    ``python -m MODULE`` from source; in a frozen build, which has no interpreter to give ``-m`` to,
    the ``layerctl`` executable beside the running one with ``--run-module MODULE`` (which runs only
    :data:`CHILD_MODULES`)."""
    if getattr(sys, "frozen", False):
        if module not in CHILD_MODULES:
            raise ValueError(f"{module} is not a module LayerDesk runs as a child process")
        layerctl = Path(sys.executable).with_name("layerctl.exe" if os.name == "nt" else "layerctl")
        return [str(layerctl), RUN_MODULE_FLAG, module]
    return [sys.executable, "-m", module]


def run_child_module(argv: Sequence[str]) -> int:
    """``layerctl --run-module MODULE ARGS…``: run MODULE as ``__main__`` with ARGS (the frozen build's
    counterpart of ``python -m``); only :data:`CHILD_MODULES` are run. Returns the exit status."""
    import runpy

    if not argv or argv[0] not in CHILD_MODULES:
        print(f"layerctl: error: {RUN_MODULE_FLAG} takes one of {', '.join(CHILD_MODULES)}", file=sys.stderr)
        return 2
    sys.argv = [argv[0], *argv[1:]]
    try:
        runpy.run_module(argv[0], run_name="__main__", alter_sys=True)
    except SystemExit as done:
        code = done.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0
