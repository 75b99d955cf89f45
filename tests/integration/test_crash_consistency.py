"""A crash (kill -9) in the middle of a catalog write leaves a consistent catalog.

A child process (tests/support/crash_writer.py) writes through the real services as fast as it can,
printing a line after each commit; the test kills it with SIGKILL at a random moment, reopens the
catalog and checks it: SQLite's integrity and foreign keys, every change with exactly its audit entry
and every audit entry with its change, nothing the child saw committed lost, and the services still
working. Then the same for a task whose process dies: it must not stay "running".
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy import select

from app.catalog.database import Catalog
from app.catalog.models import (
    AuditEntry,
    AuditOutcome,
    ImageTemplate,
    Layer,
    LayerType,
    LayerVersion,
    PrincipalKind,
    Role,
    Task,
    TaskState,
    TemplateRevision,
    VersionState,
)
from app.paths import Home
from app.services import Services, open_catalog
from app.services.rbac import Caller
from app.services.tasks import INTERRUPTED
from tests.support.keyring_memory import MemoryKeyring

pytestmark = pytest.mark.slow

PROJECT_ROOT = Path(__file__).resolve().parents[2]
WRITER = PROJECT_ROOT / "tests" / "support" / "crash_writer.py"
ADMIN = Caller("admin", frozenset({Role.ADMINISTRATOR}), PrincipalKind.LOCAL_USER)
#: The audited number of state changes that bring a new version to each state.
STATE_CHANGES = {VersionState.EDITING: 0, VersionState.FINALIZING: 1, VersionState.DEPLOYABLE: 2}


@dataclass
class Child:
    """A crash_writer process and the lines it printed (each one after a commit)."""

    proc: subprocess.Popen[str]
    stderr_path: Path
    lines: list[str] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)
    ended: bool = False

    def read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self.cond:
                self.lines.append(line.rstrip("\n"))
                self.cond.notify_all()
        with self.cond:
            self.ended = True
            self.cond.notify_all()

    def wait_for_lines(self, count: int, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        with self.cond:
            while len(self.lines) < count:
                remaining = deadline - time.monotonic()
                if self.ended or remaining <= 0:
                    raise AssertionError(
                        f"the writer printed {len(self.lines)} of {count} lines "
                        f"(ended: {self.ended}); its stderr:\n{self.stderr_path.read_text()}"
                    )
                self.cond.wait(remaining)


def start_writer(home: Home, mode: str, prefix: str, stderr_path: Path) -> tuple[Child, threading.Thread]:
    env = {
        **os.environ,
        "PYTHON_KEYRING_BACKEND": "keyring.backends.null.Keyring",
        "PYTHONPATH": str(PROJECT_ROOT),
    }
    with stderr_path.open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, str(WRITER), str(home.root), mode, prefix],
            stdout=subprocess.PIPE, stderr=stderr, text=True, env=env, cwd=PROJECT_ROOT,
        )
    child = Child(proc, stderr_path)
    reader = threading.Thread(target=child.read, daemon=True)
    reader.start()
    return child, reader


def kill_and_reap(child: Child, reader: threading.Thread) -> None:
    assert child.proc.poll() is None, f"the writer ended by itself:\n{child.stderr_path.read_text()}"
    os.kill(child.proc.pid, signal.SIGKILL)
    assert child.proc.wait(timeout=30) == -signal.SIGKILL
    reader.join(timeout=30)  # the lines already in the pipe were committed too
    assert not reader.is_alive()
    assert child.proc.stdout is not None
    child.proc.stdout.close()


def parse(lines: list[str]) -> dict[str, list[str]]:
    reported: dict[str, list[str]] = {"layer": [], "version": [], "state": [], "template": []}
    for line in lines:
        what, _, name = line.partition(" ")
        reported[what].append(name)
    return reported


def check_catalog(catalog: Catalog, reported: dict[str, list[str]]) -> int:
    """Assert the catalog is consistent and holds everything reported committed; return the number
    of layers."""
    assert catalog.integrity_check() == []
    with catalog.read() as session:
        layers = session.scalars(select(Layer.name)).all()
        versions = {
            f"{layer}:{version}": state
            for layer, version, state in session.execute(
                select(Layer.name, LayerVersion.name, LayerVersion.state).join(LayerVersion.layer)
            )
        }
        templates = session.scalars(select(ImageTemplate.name)).all()
        revisions = Counter(
            session.scalars(
                select(ImageTemplate.name).join(TemplateRevision, TemplateRevision.template_id == ImageTemplate.id)
            )
        )
        audits = session.execute(
            select(AuditEntry.operation, AuditEntry.object_name, AuditEntry.change).where(
                AuditEntry.outcome == AuditOutcome.SUCCESS
            ).order_by(AuditEntry.id)
        ).all()

    def audited(operation: str) -> Counter[str]:
        return Counter(name for op, name, _ in audits if op == operation)

    # Every change has exactly one audit entry, every audit entry its change (nothing is deleted).
    assert audited("layer.create") == Counter(layers), "layers and their layer.create entries differ"
    assert audited("layer.version.add") == Counter(list(versions)), "versions and their audit entries differ"
    assert audited("template.create") == Counter(templates), "templates and their audit entries differ"
    state_changes = audited("layer.version.state")
    for ref, state in versions.items():
        assert state_changes[ref] == STATE_CHANGES[state], (
            f"{ref} is {state.value} after {state_changes[ref]} audited state changes"
        )
    last_audited = {name: change["state"][1] for op, name, change in audits if op == "layer.version.state"}
    assert all(versions[ref] == after for ref, after in last_audited.items())
    assert set(state_changes) <= set(versions)
    assert all(revisions[name] == 1 for name in templates), "a template without its one revision"

    # Nothing the writer saw committed was lost.
    assert set(reported["layer"]) <= set(layers)
    assert set(reported["version"]) <= set(versions)
    assert set(reported["template"]) <= set(templates)
    for entry in reported["state"]:
        ref, _, state = entry.rpartition(" ")
        assert STATE_CHANGES[versions[ref]] >= STATE_CHANGES[VersionState(state)], f"lost: {entry}"
    return len(layers)


def test_a_kill_in_the_middle_of_catalog_writes_leaves_a_consistent_catalog(
    home: Home, memory_keyring: MemoryKeyring, tmp_path: Path
) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    reported_before = 0
    for round_number in range(3):
        child, reader = start_writer(home, "writes", f"R{round_number}", tmp_path / f"writer{round_number}.err")
        try:
            # Kill after a random number of commits (at least 30), plus a random few milliseconds so
            # the kill lands anywhere in the next transaction.
            target = rng.randint(30, 250)
            child.wait_for_lines(target)
            time.sleep(rng.uniform(0, 0.01))  # jitter of the kill moment, not a wait for anything
            kill_and_reap(child, reader)
        finally:
            if child.proc.poll() is None:
                child.proc.kill()
                child.proc.wait()
        reported = parse(child.lines)
        assert len(child.lines) >= 30

        catalog, secrets = open_catalog(home)
        try:
            note = f"round {round_number}, seed {seed}, killed after {len(child.lines)} reported commits"
            layer_count = check_catalog(catalog, reported)
            # Earlier rounds' layers, the writer's reported ones and the one added below each round.
            assert layer_count >= reported_before + len(reported["layer"]), note
            admin = Services.for_caller(home, catalog, ADMIN, secrets)
            after = admin.layers.create_layer(
                f"after-crash-{round_number}", LayerType.APP, os_layer=f"R{round_number}-OS"
            )
            assert after.os_layer == f"R{round_number}-OS"
            admin.layers.add_version(after.name, "1.0")
            created = admin.audit.list_entries(object_name=after.name, operation="layer.create")
            assert [e.user for e in created] == ["admin"]
            check_catalog(catalog, reported)
            reported_before = layer_count + 1
        finally:
            catalog.close()


def test_a_task_whose_process_is_killed_is_failed_when_the_catalog_is_next_opened(
    home: Home, memory_keyring: MemoryKeyring, tmp_path: Path
) -> None:
    child, reader = start_writer(home, "task", "crash", tmp_path / "task-writer.err")
    try:
        child.wait_for_lines(1)
        kill_and_reap(child, reader)
    finally:
        if child.proc.poll() is None:
            child.proc.kill()
            child.proc.wait()
    what, _, task_text = child.lines[0].partition(" ")
    assert what == "task"
    task_id = int(task_text)

    # The crash left it "running" in the file...
    raw = Catalog(home.catalog, backups=home.backups)
    try:
        with raw.read() as session:
            row = session.get(Task, task_id)
            assert row is not None
            assert row.state is TaskState.RUNNING
    finally:
        raw.close()

    # ...and opening the catalog, as LayerDesk does when it starts, marks it failed.
    catalog, secrets = open_catalog(home)
    try:
        assert catalog.integrity_check() == []
        admin = Services.for_caller(home, catalog, ADMIN, secrets)
        info = admin.tasks.get_task(task_id)
        assert info.state is TaskState.FAILED
        assert info.error == INTERRUPTED
        assert info.ended_at is not None
        assert info.progress == 5
        assert [(line.level, line.text) for line in admin.tasks.log(task_id)] == [
            ("INFO", "working until killed"),
            ("ERROR", INTERRUPTED),
        ]
        assert admin.tasks.list_tasks(states=[TaskState.RUNNING, TaskState.PENDING, TaskState.CANCELING]) == []
    finally:
        catalog.close()
