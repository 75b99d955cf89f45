"""The binding's additions for the layer repository: integrity tables, verify, export and delete of images.

Checked against the real wimlib and, where it matters, against ``wimlib-imagex`` (not our code).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import pytest

from app import procs
from app.engine.wim import Wim, WimError, load_library
from app.tasks.base import CancelToken, TaskCanceled
from tests.engine.test_wim import wimlib_imagex_dir
from tests.support.repository_checks import flip_bytes, make_tree
from tests.support.tools import run_ok

MiB = 1024 * 1024


@pytest.fixture
def two_trees(tmp_path: Path) -> tuple[Path, Path]:
    """Two folders sharing most of their data: ``shared.bin`` is in both, each has its own file."""
    shared = os.urandom(2 * MiB)
    first = make_tree(tmp_path / "first", {"shared.bin": shared, "one/only-first.bin": os.urandom(MiB)})
    second = make_tree(tmp_path / "second", {"shared.bin": shared, "two/only-second.bin": os.urandom(MiB)})
    return first, second


def _two_image_wim(tmp_path: Path, two_trees: tuple[Path, Path], *, integrity: bool = True) -> Path:
    target = tmp_path / "two.wim"
    with Wim.create("xpress") as w:
        w.add_image_from_folder(two_trees[0], "first")
        w.add_image_from_folder(two_trees[1], "second")
        w.write(target, check_integrity=integrity, fsync=True)
    return target


def test_integrity_table_is_written_when_asked_and_kept_by_default(
    tmp_path: Path, two_trees: tuple[Path, Path]
) -> None:
    with_table = _two_image_wim(tmp_path, two_trees)
    without, kept = tmp_path / "plain.wim", tmp_path / "kept.wim"
    with Wim.open(with_table) as w:
        assert w.has_integrity_table
        w.write(without, check_integrity=False)
        w.write(kept)
    with Wim.open(without) as w:
        assert not w.has_integrity_table
        w.write(tmp_path / "still-plain.wim")
    with Wim.open(kept) as w, Wim.open(tmp_path / "still-plain.wim") as plain:
        assert w.has_integrity_table and not plain.has_integrity_table
    assert "Integrity info" in run_ok("wimlib-imagex", "info", with_table).stdout
    assert "Integrity info" not in run_ok("wimlib-imagex", "info", without).stdout


def test_find_and_delete_image_keep_shared_data(tmp_path: Path, two_trees: tuple[Path, Path]) -> None:
    source = _two_image_wim(tmp_path, two_trees)
    with Wim.open(source) as w:
        assert (w.find_image("first"), w.find_image("second"), w.find_image("First"), w.find_image("x")) == (
            1, 2, None, None)
        w.delete_image(1)
        assert w.image_count == 1 and w.image_name(1) == "second"
        w.write(tmp_path / "second-only.wim")
        with pytest.raises(WimError, match="has no image 2"):
            w.delete_image(2)
    kept = tmp_path / "second-only.wim"
    # The first image's own megabyte is gone; the shared data stays.
    assert source.stat().st_size - kept.stat().st_size > 0.9 * MiB
    assert wimlib_imagex_dir(kept, 1) == {"/", "/shared.bin", "/two", "/two/only-second.bin"}
    out = tmp_path / "out"
    with Wim.open(kept) as w:
        w.verify()
        w.extract_image_to_folder(1, out)
    assert (out / "shared.bin").read_bytes() == (two_trees[1] / "shared.bin").read_bytes()
    assert (out / "two/only-second.bin").read_bytes() == (two_trees[1] / "two/only-second.bin").read_bytes()


def test_export_image_copies_one_image_into_another_wim(tmp_path: Path, two_trees: tuple[Path, Path]) -> None:
    source = _two_image_wim(tmp_path, two_trees)
    target = tmp_path / "target.wim"
    with Wim.open(source) as src, Wim.create("xpress") as dest:
        assert src.export_image(2, dest, "copied") == 1
        dest.write(target)
        with pytest.raises(WimError, match="has no image 3"):
            src.export_image(3, dest, "nope")
    assert wimlib_imagex_dir(target, 1) == wimlib_imagex_dir(source, 2)
    with Wim.open(target) as w:
        assert w.image_name(1) == "copied"
        w.verify()


def test_verify_reports_progress_and_finds_flipped_bytes(tmp_path: Path, two_trees: tuple[Path, Path]) -> None:
    damaged = _two_image_wim(tmp_path, two_trees, integrity=False)
    seen: list[tuple[int, int]] = []
    with Wim.open(damaged) as w:
        w.verify(progress=lambda done, total: seen.append((done, total)))
    assert seen and seen[-1][0] == seen[-1][1] > 3 * MiB
    flip_bytes(damaged, damaged.stat().st_size // 3)
    with Wim.open(damaged) as w, pytest.raises(WimError, match="failed verification"):
        w.verify()
    assert not procs.run(["wimlib-imagex", "verify", str(damaged)], timeout_s=60).ok  # the independent tool agrees


def test_integrity_check_on_open_finds_damage_anywhere(tmp_path: Path, two_trees: tuple[Path, Path]) -> None:
    damaged = _two_image_wim(tmp_path, two_trees)
    flip_bytes(damaged, damaged.stat().st_size // 2)
    with pytest.raises(WimError, match="integrity"):
        Wim.open(damaged, check_integrity=True)
    Wim.open(damaged).close()  # without the check, opening does not read the data


def test_verify_can_be_cancelled(tmp_path: Path, two_trees: tuple[Path, Path]) -> None:
    source = _two_image_wim(tmp_path, two_trees)
    token = CancelToken()
    with Wim.open(source) as w, pytest.raises(TaskCanceled):
        w.verify(progress=lambda done, total: token.cancel(), cancel=token)


def test_messages_of_calls_in_two_threads_are_each_logged_once_and_errors_reach_the_calls(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two library calls overlap (layers staged side by side): what wimlib writes to its one process-wide
    message file meanwhile is logged once per warning, a failing call sees the error lines written during it,
    and the file is emptied when no call runs. The calls write to the file as wimlib does (appending)."""
    lib = load_library()
    assert lib._messages is not None
    fd = os.open(f"/proc/self/fd/{lib._messages.fileno()}", os.O_WRONLY | os.O_APPEND)
    first_in, second_done = threading.Event(), threading.Event()

    def first_call() -> int:
        os.write(fd, b"[WARNING] first warns\n")
        first_in.set()
        assert second_done.wait(10)
        os.write(fd, b"[ERROR] first fails\n")
        return 1

    def second_call() -> int:
        os.write(fd, b"[WARNING] second warns\n")
        return 0

    results: dict[str, tuple[int, list[str]]] = {}
    try:
        with caplog.at_level(logging.WARNING, logger="app.engine.wim"):
            thread = threading.Thread(target=lambda: results.__setitem__("first", lib.run(first_call)))
            thread.start()
            assert first_in.wait(10)  # the second call starts after the first one's warning
            results["second"] = lib.run(second_call)
            second_done.set()
            thread.join(10)
    finally:
        os.close(fd)
    assert results["first"] == (1, ["first fails"])
    assert results["second"] == (0, [])
    warnings = [r.getMessage() for r in caplog.records if r.getMessage().startswith("wimlib: ")]
    assert sorted(warnings) == ["wimlib: first warns", "wimlib: second warns"]
    assert os.fstat(lib._messages.fileno()).st_size == 0
