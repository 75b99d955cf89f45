"""``layerctl layer import`` and ``layerctl repo check``: output, exit codes, one-line errors, Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.engine.repository import LayerRepository
from tests.support.keyring_memory import MemoryKeyring
from tests.support.repository_checks import flip_bytes, listing, make_tree
from tests.unit.test_cli import Ctl, _layerctl_env


@pytest.fixture
def cli(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        memory_keyring: MemoryKeyring) -> Ctl:
    ctl = Ctl(tmp_path / "home", capsys, monkeypatch)
    for args in (("layer", "create", "--type", "os", "Win11"),
                 ("layer", "create", "--type", "app", "Tools", "--os-layer", "Win11")):
        status, _, err = ctl(*args)
        assert status == 0, err
    return ctl


def test_import_prints_progress_on_stderr_and_the_version_at_the_end(cli: Ctl, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", {"Tools/tool.exe": b"MZ" * 50, "Tools/.wh.old.exe": b""})
    reg = tmp_path / "tools.reg"
    reg.write_text('REGEDIT4\r\n\r\n[HKEY_LOCAL_MACHINE\\SOFTWARE\\Tools]\r\n"Version"="1.0"\r\n', encoding="ascii")
    status, out, err = cli("layer", "import", "Tools", "--version", "1.0", "--from", str(src), "--registry", str(reg),
                           "--comment", "drop 1")
    assert status == 0, err
    assert out == "Imported Tools:1.0 (deployable): 1 files, 100 B (task 1).\n"
    assert "[  1%] Checking the source" in err.splitlines()
    assert "[100%] Stored" in err.splitlines()
    shown = cli.json("layer", "version", "show", "Tools:1.0")
    assert shown["state"] == "deployable" and shown["comment"] == "drop 1"  # type: ignore[index]


def test_import_json_output_names_the_task(cli: Ctl, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", {"a.txt": b"a", "b/c.txt": b"cc"})
    status, out, err = cli("--json", "layer", "import", "Tools", "--version", "2", "--from", str(src))
    assert status == 0, err
    assert err == ""  # no progress lines with --json
    result = json.loads(out)
    assert (result["layer"], result["name"], result["state"], result["size_bytes"]) == ("Tools", "2", "deployable", 3)
    assert result["checksum"].startswith("sha256:") and result["files"] == 2
    task = cli.json("task", "show", str(result["task"]))
    assert (task["kind"], task["state"]) == ("layer.import", "complete")  # type: ignore[index]


def test_import_errors_are_one_line_with_the_right_exit_status(cli: Ctl, tmp_path: Path) -> None:
    vhd = tmp_path / "disk.vhd"
    vhd.write_bytes(b"\0" * 4096 + b"conectix" + b"\0" * 504)
    status, out, err = cli("layer", "import", "Tools", "--version", "1", "--from", str(vhd))
    assert (status, out) == (3, "")
    assert err == (f"layerctl: error: {vhd} looks like a disk image (VHD) but cannot be imported: {vhd} is a "
                   "damaged VHD (its header is missing, its footer says type 0).\n")
    status, out, _ = cli("--json", "layer", "import", "Tools", "--version", "1", "--from", str(tmp_path / "none"))
    assert status == 3 and json.loads(out)["error"]["code"] == "import_source"
    status, _, err = cli("layer", "import", "Tools", "--version", "1", "--from", str(tmp_path), "--image", "0")
    assert status == 2 and "--image" in err
    # A capture that fails in the worker: the task's error, on one line; the version is gone again.
    fake = tmp_path / "fake.ntfs"
    fake.write_bytes(b"\xebR\x90NTFS    " + os.urandom(32 * 1024))
    status, _, err = cli("layer", "import", "Tools", "--version", "1", "--from", str(fake))
    errors = [line for line in err.splitlines() if line.startswith("layerctl: error:")]
    assert status == 1 and len(errors) == 1 and err.splitlines()[-1] == errors[0]
    assert errors[0].startswith("layerctl: error: Import of Tools:1 failed (task ") and "Cannot capture" in errors[0]
    assert cli.json("layer", "show", "Tools")["versions"] == []  # type: ignore[index]


def test_repo_check_lists_problems_and_exits_1(cli: Ctl, tmp_path: Path) -> None:
    status, out, _ = cli("repo", "check")
    assert status == 0 and "is healthy (0 stored version(s) checked)" in out
    for version in ("1", "2"):
        src = make_tree(tmp_path / version, {f"f{n}.bin": os.urandom(200_000) for n in range(3)})
        assert cli("layer", "import", "Tools", "--version", version, "--from", str(src))[0] == 0
    report = cli.json("repo", "check")
    assert report == {"ok": True, "path": str((cli.home / "repository").resolve()), "problems": [],
                      "versions_in_catalog": 2, "stored_versions": 2}
    repo = LayerRepository(cli.home / "repository")
    wim = repo.wim_path(2)
    flip_bytes(wim, wim.stat().st_size // 2)
    status, out, _ = cli("repo", "check")
    assert status == 1
    lines = out.splitlines()
    assert lines[0].endswith("has 1 problem(s):")
    assert lines[1].startswith("  layers/2.wim: damaged: ") and "integrity" in lines[1]
    status, out, _ = cli("--json", "repo", "check")
    assert status == 1 and json.loads(out)["ok"] is False


def test_repo_check_finds_a_manifest_that_does_not_match_the_catalog(cli: Ctl, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", {"a.txt": b"a"})
    assert cli("layer", "import", "Tools", "--version", "1", "--from", str(src))[0] == 0
    manifest = LayerRepository(cli.home / "repository").manifest_path(2, 1)
    document = json.loads(manifest.read_text(encoding="utf-8"))
    document["manifest"]["files"] = 7  # changed consistently: its own checksum matches, the catalog's does not
    from app.engine.repository import manifest_checksum

    document["checksum"] = manifest_checksum(document["manifest"])
    manifest.write_text(json.dumps(document), encoding="utf-8")
    status, out, _ = cli("repo", "check")
    assert status == 1
    assert "  layer 2 version 1: image v1 holds 1 files, its manifest says 7" in out.splitlines()
    assert any(line.startswith("  layer 2 version 1: the manifest's checksum ") and "does not match the catalog's"
               in line for line in out.splitlines())


def test_ctrl_c_cancels_the_import_and_leaves_nothing_behind(tmp_path: Path) -> None:
    program = Path(sys.executable).with_name("layerctl")
    env = _layerctl_env(tmp_path)
    home = tmp_path / "home"

    def ctl(*args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([program, "--home", str(home), *args], capture_output=True, text=True, env=env,
                              check=False, timeout=60)
        assert done.returncode == 0, done.stderr
        return done

    ctl("layer", "create", "--type", "os", "Win11")
    ctl("layer", "import", "Win11", "--version", "1", "--from", str(make_tree(tmp_path / "v1", {"a.txt": b"a"})))
    before = listing(home / "repository")
    big = tmp_path / "big"
    for n in range(160):
        make_tree(big, {f"d{n % 8}/f{n}.bin": os.urandom(1 << 20)})
    proc = subprocess.Popen([program, "--home", str(home), "layer", "import", "Win11", "--version", "2", "--from",
                             str(big)], stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stderr is not None
    seen = []
    deadline = time.monotonic() + 60
    for line in proc.stderr:
        seen.append(line)
        if "Writing the layer's WIM" in line or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGINT)
    _, rest_err = proc.communicate(timeout=60)
    err = "".join(seen) + rest_err
    assert proc.returncode == 130, err
    assert "Canceling task 2…" in err
    assert err.splitlines()[-1] == "layerctl: error: Import of Win11:2 canceled by Ctrl-C (task 2); nothing was kept."
    task = json.loads(ctl("--json", "task", "show", "2").stdout)
    assert task["state"] == "canceled"
    versions = json.loads(ctl("--json", "layer", "show", "Win11").stdout)["versions"]
    assert [v["name"] for v in versions] == ["1"]
    assert listing(home / "repository") == before


def test_import_with_base_stores_the_difference_of_two_disks(cli: Ctl, tmp_path: Path) -> None:
    from tests.engine.test_difference import EXPECTED_DELETIONS, EXPECTED_LAYER_TREE, build_machine
    from tests.engine.test_wim import wimlib_imagex_dir

    machine = build_machine(tmp_path / "machine")
    status, out, err = cli("layer", "import", "Tools", "--version", "1", "--from", str(machine.after_disk),
                           "--base", str(machine.base_disk), "--comment", "packaged")
    assert status == 0, err
    assert out.startswith("Imported Tools:1 (deployable): 5 files, ") and out.endswith(" (task 1).\n")
    assert err.splitlines()[-1] == "[100%] Stored"
    repo = LayerRepository(cli.home / "repository")
    assert wimlib_imagex_dir(repo.wim_path(2), 1) == EXPECTED_LAYER_TREE
    shown = cli.json("layer", "version", "show", "Tools:1")
    manifest = repo.manifest(2, int(shown["id"]), str(shown["checksum"]))  # type: ignore[call-overload]
    assert set(manifest.deletions) == EXPECTED_DELETIONS and manifest.source.base == machine.base_disk


def test_import_with_base_errors_are_one_line_and_leave_nothing(cli: Ctl, tmp_path: Path) -> None:
    folder = make_tree(tmp_path / "src", {"a.txt": b"a"})
    volume = tmp_path / "fake.ntfs"
    volume.write_bytes(b"\xebR\x90NTFS    " + bytes(4096))
    notes = tmp_path / "notes.txt"
    notes.write_text("not a disk", encoding="utf-8")
    cases = [
        (("Tools", "--from", str(folder), "--base", str(volume)),
         f"--base only applies to disk images and NTFS volume images (the machine after the change), but {folder} "
         "is a folder."),
        (("Win11", "--from", str(volume), "--base", str(volume)),
         "Win11 is an OS layer: it is imported whole, never as a difference (--base is for app and platform "
         "layers)."),
        (("Tools", "--from", str(volume), "--base", str(notes)),
         f"The base cannot be used: {notes} is not a folder, a WIM file or an NTFS volume image (nor a disk image "
         "LayerDesk knows), so it cannot be imported."),
    ]
    for args, message in cases:
        status, out, err = cli("layer", "import", args[0], "--version", "1", *args[1:])
        assert (status, out, err) == (3, "", f"layerctl: error: {message}\n")
    assert cli.json("layer", "show", "Tools")["versions"] == []  # type: ignore[index]
    assert cli.json("task", "list") == []
