"""A process for the crash tests to kill with SIGKILL (tests/integration/test_crash_consistency.py).

``python crash_writer.py HOME writes PREFIX`` writes to the catalog at HOME without end, through the
real services as an Administrator: one OS layer, then app layers, each with a version walked to
deployable, and every third layer an image template. Each service call is one transaction with its
audit entry; after it returns (committed) the process prints one line: ``<what> <name>``.

``python crash_writer.py HOME task PREFIX`` starts a task in a TaskRunner that works until cancelled,
prints ``task <id>`` once the catalog shows it running, and waits to be killed.

Only the keyring-free parts of the services are used: connectors and directories are left alone.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    root, mode, prefix = argv[1], argv[2], argv[3]
    from sqlalchemy import func, select

    from app.catalog.models import (
        LayerType,
        PrincipalKind,
        Role,
        Task,
        TaskLogLine,
        TaskState,
        VersionState,
    )
    from app.paths import Home
    from app.services import Services, open_catalog
    from app.services.rbac import Caller
    from app.services.templates import TemplateSpec
    from app.tasks.base import LayerDeskTask, TaskContext, TaskResult
    from app.tasks.runner import TaskRunner

    home = Home(Path(root))
    catalog, secrets = open_catalog(home)
    caller = Caller("crash-writer", frozenset({Role.ADMINISTRATOR}), PrincipalKind.LOCAL_USER)
    admin = Services.for_caller(home, catalog, caller, secrets)

    def committed(what: str, name: str) -> None:
        print(f"{what} {name}", flush=True)

    if mode == "task":

        class Endless(LayerDeskTask):
            kind = "test.endless"

            def run(self, ctx: TaskContext) -> TaskResult:
                ctx.progress(5, "working")
                ctx.log("working until killed")
                while not ctx.cancel.wait(0.05):
                    pass
                ctx.cancel.raise_if_cancelled()
                return TaskResult()

        runner = TaskRunner(catalog, caller)
        task_id = runner.submit(Endless(f"{prefix} endless"))
        # Wait until the catalog shows the task running with its log line, as the parent will check.
        deadline = time.monotonic() + 30
        while True:
            with catalog.read() as session:
                row = session.get(Task, task_id)
                logged = session.scalar(select(func.count()).where(TaskLogLine.task_id == task_id))
                if row is not None and row.state is TaskState.RUNNING and logged:
                    break
            if time.monotonic() > deadline:
                print("the task did not start", file=sys.stderr, flush=True)
                return 2
            time.sleep(0.02)
        committed("task", str(task_id))
        threading.Event().wait()  # until killed
        return 0

    os_layer = f"{prefix}-OS"
    admin.layers.create_layer(os_layer, LayerType.OS)
    committed("layer", os_layer)
    admin.layers.add_version(os_layer, "1.0")
    committed("version", f"{os_layer}:1.0")
    for state in (VersionState.FINALIZING, VersionState.DEPLOYABLE):
        admin.layers.set_version_state(f"{os_layer}:1.0", state, size_bytes=1 << 30, checksum="sha256:0s")
        committed("state", f"{os_layer}:1.0 {state.value}")

    apps: list[str] = []
    number = 0
    while True:
        name = f"{prefix}-App{number:05d}"
        admin.layers.create_layer(name, LayerType.APP, os_layer=os_layer, description=f"app {number}")
        committed("layer", name)
        admin.layers.add_version(name, "1.0", comment="crash test")
        committed("version", f"{name}:1.0")
        for state in (VersionState.FINALIZING, VersionState.DEPLOYABLE):
            admin.layers.set_version_state(f"{name}:1.0", state, size_bytes=1 << 20, checksum=f"sha256:{number}")
            committed("state", f"{name}:1.0 {state.value}")
        apps.append(name)
        if number % 3 == 2:
            template = f"{prefix}-T{number:05d}"
            spec = TemplateSpec(os=f"{os_layer}:1.0", apps=tuple(f"{a}:1.0" for a in apps[-3:]))
            admin.templates.create_template(template, spec, comment="crash test")
            committed("template", template)
        number += 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
