"""layerctl end to end: exact command names, --json output, exit codes and one-line errors."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.cli.main import main
from tests.support.keyring_memory import MemoryKeyring


class Ctl:
    """Runs ``layerctl --home HOME ...`` in this process and keeps what it printed."""

    def __init__(self, home: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
        self.home = home
        self.capsys = capsys
        self.monkeypatch = monkeypatch

    def __call__(self, *args: str, stdin: str | None = None) -> tuple[int, str, str]:
        if stdin is not None:
            self.monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        status = main(["--home", str(self.home), *args])
        out, err = self.capsys.readouterr()
        return status, out, err

    def json(self, *args: str, stdin: str | None = None) -> object:
        status, out, err = self("--json", *args, stdin=stdin)
        assert status == 0, err
        return json.loads(out)


@pytest.fixture
def ctl(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        memory_keyring: MemoryKeyring) -> Ctl:
    return Ctl(tmp_path / "home", capsys, monkeypatch)


def _lab(ctl: Ctl) -> None:
    for args in (
        ("layer", "create", "--type", "os", "Win11", "--comment", "base image"),
        ("layer", "create", "--type", "os", "Win10"),
        ("layer", "create", "--type", "platform", "VDA", "--os-layer", "Win11"),
        ("layer", "create", "--type", "app", "Office", "--os-layer", "Win11"),
        ("layer", "create", "--type", "app", "Chrome", "--os-layer", "Win11"),
        ("layer", "create", "--type", "app", "Paint", "--os-layer", "Win10"),
        ("layer", "version", "add", "Win11", "1.0"),
        ("layer", "version", "add", "VDA", "2402"),
        ("layer", "version", "add", "Office", "2024"),
        ("layer", "version", "add", "Chrome", "120"),
        ("layer", "version", "add", "Paint", "1"),
    ):
        status, _, err = ctl(*args)
        assert status == 0, (args, err)


def test_init_creates_the_home_and_reports_the_builtin_administrator(ctl: Ctl) -> None:
    result = ctl.json("init")
    assert isinstance(result, dict)
    assert Path(result["catalog"]).is_file()
    assert Path(result["repository"]).is_dir()
    assert result["roles"] == ["Administrator"]
    assert result["home"] == str(ctl.home.resolve())


def test_home_comes_from_the_environment_when_not_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str],
                                                         memory_keyring: MemoryKeyring) -> None:
    monkeypatch.setenv("LAYERDESK_HOME", str(tmp_path / "from-env"))
    assert main(["--json", "init"]) == 0
    assert json.loads(capsys.readouterr().out)["home"] == str(tmp_path / "from-env")


def test_layer_commands_round_trip(ctl: Ctl) -> None:
    _lab(ctl)
    layers = ctl.json("layer", "list", "--type", "app")
    assert [layer["name"] for layer in layers] == ["Chrome", "Office", "Paint"]  # type: ignore[union-attr,index]
    shown = ctl.json("layer", "show", "Win11")
    assert shown["bound_layers"] == ["Chrome", "Office", "VDA"]  # type: ignore[index]
    assert shown["versions"][0]["state"] == "editing"  # type: ignore[index]
    status, out, _ = ctl("layer", "list")
    assert status == 0 and "Win11" in out and "NAME" in out


def test_template_commands_priority_history_clone(ctl: Ctl) -> None:
    _lab(ctl)
    created = ctl.json("template", "create", "Finance", "--os", "Win11:1.0", "--platform", "VDA",
                       "--app", "Office", "--app", "Chrome", "--format", "vhdx", "--size-gb", "80",
                       "--comment", "first cut")
    assert created["app_layers"] == ["Office:2024", "Chrome:120"]  # type: ignore[index]
    reordered = ctl.json("template", "priority", "Finance", "Chrome", "Office", "--comment", "Office wins")
    assert reordered["app_layers"] == ["Chrome:120", "Office:2024"]  # type: ignore[index]
    assert reordered["revision"] == 2  # type: ignore[index]
    history = ctl.json("template", "history", "Finance")
    assert [(r["revision"], r["comment"]) for r in history] == [(1, "first cut"), (2, "Office wins")]  # type: ignore[union-attr,index]
    diff = ctl.json("template", "diff", "Finance", "1", "2")
    assert diff == [{"field": "apps", "before": ["Office:2024", "Chrome:120"], "after": ["Chrome:120", "Office:2024"]}]
    clone = ctl.json("template", "clone", "Finance", "Finance-Test")
    assert clone["app_layers"] == ["Chrome:120", "Office:2024"]  # type: ignore[index]
    shown = ctl.json("template", "show", "Finance-Test")
    assert shown["revision"] == 1  # type: ignore[index]
    _, out, _ = ctl("template", "show", "Finance")
    assert out.index("2. Office:2024") < out.index("1. Chrome:120")  # highest priority listed first


@pytest.mark.parametrize(
    ("args", "status", "fragment"),
    [
        (("layer", "create", "--type", "os", "CON"), 3, "reserved Windows device name"),
        (("layer", "create", "--type", "os", "a|b"), 3, "Windows does not allow"),
        (("layer", "create", "--type", "app", "Office"), 6, "already exists"),
        (("layer", "create", "--type", "app", "Visio"), 3, "--os-layer"),
        (("layer", "show", "Nope"), 5, "no layer named 'Nope'"),
        (("layer", "delete", "Win11"), 6, "in use"),
        (("template", "create", "T", "--os", "Win11", "--app", "Paint", "--format", "vhd", "--size-gb", "10"),
         3, "bound to OS layer 'Win10'"),
        (("template", "create", "T", "--os", "Win11", "--format", "vhd", "--size-gb", "0"), 3, "1 to 65536"),
        (("template", "create", "T", "--os", "Win11", "--format", "iso", "--size-gb", "10"), 2, "iso"),
        (("task", "show", "42"), 5, "no task 42"),
        (("task", "show", "forty-two"), 2, "not a valid integer"),
        (("settings", "set", "task_retention_days", "0"), 3, "outside the allowed range"),
        (("nonsense",), 2, "No such command"),
    ],
)
def test_errors_are_one_clear_line_with_a_json_object(ctl: Ctl, args: tuple[str, ...], status: int,
                                                      fragment: str) -> None:
    _lab(ctl)
    got, out, err = ctl(*args)
    assert got == status
    assert err.count("\n") == 1 and err.startswith("layerctl: error: "), err
    assert fragment in err
    assert "Traceback" not in err and out == ""
    got, out, err = ctl("--json", *args)
    assert got == status
    error = json.loads(out)["error"]
    assert fragment in error["message"] and error["exit_status"] == status


def test_mutations_take_a_comment_that_lands_in_the_audit_log(ctl: Ctl) -> None:
    _lab(ctl)
    entries = ctl.json("audit", "list", "--object", "Win11")
    assert [(e["operation"], e["comment"]) for e in entries] == [  # type: ignore[union-attr,index]
        ("layer.version.add", ""),
        ("layer.create", "base image"),
    ]


def test_task_commands_show_log_and_cancel(ctl: Ctl, tmp_path: Path) -> None:
    """Tasks are created by services (publish, import …); here one is planted as a running task of a
    live process so the CLI's view and cancel can be exercised."""
    from app.catalog.database import Catalog
    from app.catalog.models import Task, TaskLogLine, TaskState, utcnow
    from app.tasks.runner import process_owner

    ctl.json("init")
    catalog = Catalog(ctl.home / "catalog.sqlite")
    with catalog.write() as session:
        task = Task(kind="demo", title="Demo work", state=TaskState.RUNNING, started_by="root",
                    owner=process_owner(), created_at=utcnow(), started_at=utcnow(), progress=40,
                    message="copying")
        session.add(task)
        session.flush()
        session.add(TaskLogLine(task_id=task.id, text="step one", at=utcnow()))
        task_id = task.id
    catalog.close()
    listed = ctl.json("task", "list")
    assert [(t["id"], t["state"], t["progress"]) for t in listed] == [(task_id, "running", 40)]  # type: ignore[union-attr,index]
    log = ctl.json("task", "log", str(task_id))
    assert [line["text"] for line in log] == ["step one"]  # type: ignore[union-attr,index]
    cancelled = ctl.json("task", "cancel", str(task_id), "--comment", "wrong template")
    assert cancelled["state"] == "canceling" and cancelled["cancel_requested"] is True  # type: ignore[index]
    status, _, err = ctl("task", "cancel", "999")
    assert status == 5 and "no task 999" in err


def test_sign_in_required_flow(ctl: Ctl) -> None:
    ctl.json("init")
    status, _, err = ctl("settings", "set", "require_sign_in", "true")
    assert status == 6 and "user add" in err  # no local administrator yet: refused, nobody locked out
    ctl.json("user", "add", "helpdesk", "--role", "Read Only", "--password-stdin", stdin="correct horse\n")
    ctl.json("user", "add", "boss", "--role", "Administrator", "--password-stdin", stdin="battery staple\n")
    ctl.json("settings", "set", "require_sign_in", "true", "--comment", "lab goes shared")

    status, _, err = ctl("layer", "list")
    assert status == 4 and "layerctl login" in err

    status, _, err = ctl("login", "--username", "helpdesk", "--password-stdin", stdin="wrong horse\n")
    assert status == 4 and "user name or password is incorrect" in err
    who = ctl.json("login", "--username", "helpdesk", "--password-stdin", stdin="correct horse\n")
    assert who == {"username": "helpdesk", "roles": ["Read Only"]}
    assert ctl.json("whoami")["username"] == "helpdesk"  # type: ignore[index]
    assert ctl.json("layer", "list") == []
    status, _, err = ctl("layer", "create", "--type", "os", "Win11")
    assert status == 4 and "helpdesk (Read Only) may not create" in err

    ctl.json("logout")
    status, _, err = ctl("whoami")
    assert status == 4
    ctl.json("login", "--username", "boss", "--password-stdin", stdin="battery staple\n")
    assert ctl.json("whoami")["roles"] == ["Administrator"]  # type: ignore[index]
    denied = ctl.json("audit", "list", "--denied")
    assert [e["user"] for e in denied] == ["helpdesk", "helpdesk"]  # type: ignore[union-attr,index]


def test_passwords_are_never_taken_from_the_command_line(ctl: Ctl) -> None:
    status, _, err = ctl("user", "add", "x", "--password", "secret123")
    assert status == 2 and "No such option" in err


def _layerctl_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAYERDESK")}
    env["HOME"] = str(tmp_path / "userhome")
    env["XDG_DATA_HOME"] = str(tmp_path / "userhome" / "data")
    env["PYTHON_KEYRING_BACKEND"] = "keyrings.alt.file.PlaintextKeyring"
    return env


def test_installed_layerctl_program_exit_codes_and_no_traceback(tmp_path: Path) -> None:
    """The real console script, as automation calls it."""
    program = Path(sys.executable).with_name("layerctl")
    assert program.exists(), "layerctl is installed with the package (pip install -e .)"
    env = _layerctl_env(tmp_path)
    home = str(tmp_path / "home")
    ok = subprocess.run([program, "--home", home, "--json", "layer", "create", "--type", "os", "Win11"],
                        capture_output=True, text=True, env=env, check=False)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["name"] == "Win11"
    bad = subprocess.run([program, "--home", home, "layer", "create", "--type", "os", "nul"],
                         capture_output=True, text=True, env=env, check=False)
    assert bad.returncode == 3
    assert bad.stderr.strip().splitlines() == [
        "layerctl: error: The layer name 'nul' is a reserved Windows device name (NUL); choose another name."
    ]


def test_default_home_is_the_users_data_folder(tmp_path: Path) -> None:
    program = Path(sys.executable).with_name("layerctl")
    env = _layerctl_env(tmp_path)
    done = subprocess.run([program, "--json", "init"], capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["home"] == str(tmp_path / "userhome" / "data" / "LayerDesk")


def test_catalog_check_runs_as_a_task_and_is_listed(ctl: Ctl) -> None:
    result = ctl.json("catalog", "check")
    assert result["ok"] is True and result["problems"] == []  # type: ignore[index]
    (task,) = ctl.json("task", "list")  # type: ignore[misc]
    assert (task["id"], task["kind"], task["state"]) == (result["task"], "catalog.check", "complete")  # type: ignore[index]


def test_storage_add_by_path_and_priority_by_path_or_name(ctl: Ctl) -> None:
    group = "S-1-5-21-1-2-3-4000=LAB\\Staff"
    made = ctl.json("storage", "add", r"\\fs1\userlayers\EU", "--group", group)
    assert isinstance(made, dict) and (made["name"], made["path"], made["priority"]) == (
        "fs1-userlayers-EU", r"\\fs1\userlayers\EU", 1)
    ctl.json("storage", "add", "Finance", r"\\fs2\finance", "--group", group, "--size-gb", "25")
    ctl.json("storage", "add", "--name", "Archive", r"\\fs3\old")

    order = ctl.json("storage", "priority", r"\\FS3\old", "Finance", r"\\fs1\userlayers\EU\\")
    assert isinstance(order, list)
    assert [(row["name"], row["priority"]) for row in order] == [("Archive", 1), ("Finance", 2),
                                                                ("fs1-userlayers-EU", 3)]
    status, _, err = ctl("storage", "priority", r"\\fs9\nothing", "Finance", "Archive")
    assert status == 5 and r"No storage location has the path \\fs9\nothing" in err
    status, _, err = ctl("storage", "priority", "Finance", "Archive")
    assert status == 3 and "must name every storage location" in err
    status, _, err = ctl("storage", "add", "A", "B", r"\\fs4\x")
    assert status == 2 and "give the share path" in err
    status, _, err = ctl("storage", "add", "Other", r"\\fs5\x", "--name", "Else")
    assert status == 2 and "give the name once" in err
    listed = ctl.json("storage", "list")
    assert isinstance(listed, list) and [row["name"] for row in listed] == ["Archive", "Finance",
                                                                          "fs1-userlayers-EU"]
