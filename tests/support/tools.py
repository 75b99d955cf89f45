"""The independent tools the engine tests check our output with (ntfs-3g, wimlib-imagex, qemu-img,
sgdisk, hivex…), found the way the app finds programs (system folders included)."""

from __future__ import annotations

from pathlib import Path

from app import procs
from app.errors import EnvironmentProblem


def tool(name: str) -> str:
    try:
        return procs.find_program(name)
    except EnvironmentProblem:
        raise AssertionError(f"{name} is missing: tests/run.sh installs the Debian packages the tests use") from None


def run_ok(*argv: str | Path, timeout_s: float = 120) -> procs.Outcome:
    """Run a tool; fail the test with its output unless it succeeds."""
    outcome = procs.run([tool(str(argv[0])), *map(str, argv[1:])], timeout_s=timeout_s)
    assert outcome.ok, f"{outcome.argv}: {outcome.returncode}\n{outcome.stdout}\n{outcome.stderr}"
    return outcome
