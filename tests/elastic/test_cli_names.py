"""``layerctl elastic assign|unassign --user/--group`` and ``layerctl machine associate`` with names
looked up in the real test DC (alice ∈ Finance-Users ∈ All-Staff)."""

from __future__ import annotations

import pytest

from app.directory import PrincipalType
from app.services import Services
from tests.elastic.conftest import BREAK_GLASS_PASSWORD, sid_of
from tests.unit.test_cli import Ctl


@pytest.fixture
def ctl(joined: Services, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Ctl:
    """layerctl on the ``joined`` catalog, signed in as the break-glass Administrator."""
    runner = Ctl(joined.home.root, capsys, monkeypatch)
    runner.json("login", "--user", "breakglass", "--password-stdin", stdin=BREAK_GLASS_PASSWORD + "\n")
    return runner


def _assignments(ctl: Ctl) -> list[tuple[str, str, str, str]]:
    rows = ctl.json("elastic", "list")
    assert isinstance(rows, list)
    return sorted((r["layer"], r["principal_kind"], r["principal_name"], r["principal_sid"]) for r in rows)


def test_assign_takes_user_names_in_every_form_and_stores_the_sid(ctl: Ctl, joined: Services) -> None:
    alice = sid_of(joined, "alice", PrincipalType.USER)
    ctl.json("elastic", "assign", "Office:2024", "--user", "alice")
    ctl.json("elastic", "assign", "Chrome:120", "--user", r"LAB\alice")
    ctl.json("elastic", "assign", "Notepad++:8.6", "--user", "alice@lab.test")
    assert _assignments(ctl) == [
        ("Chrome", "ad_user", r"LAB\alice", alice),
        ("Notepad++", "ad_user", r"LAB\alice", alice),
        ("Office", "ad_user", r"LAB\alice", alice),
    ]


def test_assign_takes_group_names_and_sids(ctl: Ctl, joined: Services) -> None:
    finance = sid_of(joined, "Finance-Users", PrincipalType.GROUP)
    staff = sid_of(joined, "All-Staff", PrincipalType.GROUP)
    admins = sid_of(joined, "LayerDesk-Admins", PrincipalType.GROUP)
    info = ctl.json("elastic", "assign", "Office:2024", "--group", "Finance-Users")
    assert isinstance(info, dict)
    assert (info["principal_sid"], info["principal_name"]) == (finance, r"LAB\Finance-Users")
    ctl.json("elastic", "assign", "Chrome:120", "--group", r"LAB\All-Staff")
    # A SID keeps working: with --name as given (no lookup), without it named by the directory.
    ctl.json("elastic", "assign", "Notepad++:8.6", "--group", admins, "--name", "Admins (given)")
    ctl.json("elastic", "assign", "Paint:1.0", "--group", staff)
    assert _assignments(ctl) == [
        ("Chrome", "ad_group", r"LAB\All-Staff", staff),
        ("Notepad++", "ad_group", "Admins (given)", admins),
        ("Office", "ad_group", r"LAB\Finance-Users", finance),
        ("Paint", "ad_group", r"LAB\All-Staff", staff),
    ]


def test_unknown_names_wrong_kinds_and_missing_principals_are_clear_errors(ctl: Ctl) -> None:
    status, _, err = ctl("elastic", "assign", "Office:2024", "--user", "nobody-here")
    assert status == 5 and "nobody-here" in err
    status, _, err = ctl("elastic", "assign", "Office:2024", "--group", "alice")  # a user, not a group
    assert status == 5 and "group" in err and "alice" in err
    status, _, err = ctl("elastic", "assign", "Office:2024", "--user", "Finance-Users")
    assert status == 5 and "Finance-Users" in err
    status, _, err = ctl("elastic", "assign", "Office:2024")
    assert status == 2 and "--user USER or --group GROUP" in err
    status, _, err = ctl("elastic", "assign", "Office:2024", "--user", "alice", "--group", "All-Staff")
    assert status == 2
    status, _, err = ctl("machine", "associate", "No-Such-Group", "--pattern", "VDA-*")
    assert status == 5 and "No-Such-Group" in err
    assert _assignments(ctl) == []


def test_unassign_by_user_or_group_name(ctl: Ctl, joined: Services) -> None:
    ctl.json("elastic", "assign", "Office:2024", "--user", "alice")
    ctl.json("elastic", "assign", "Office:2025", "--group", "All-Staff")
    ctl.json("elastic", "assign", "Chrome:120", "--group", "Finance-Users")
    ctl.json("elastic", "unassign", "Office", "--user", "alice@lab.test")
    ctl.json("elastic", "unassign", "Office", "--group", r"LAB\All-Staff")
    finance = sid_of(joined, "Finance-Users", PrincipalType.GROUP)
    assert _assignments(ctl) == [("Chrome", "ad_group", r"LAB\Finance-Users", finance)]
    status, _, err = ctl("elastic", "unassign", "Chrome", "--user", "alice")
    assert status == 5 and "not assigned" in err
    # The positional SID|NAME, as the assignment shows it, still works.
    ctl.json("elastic", "unassign", "Chrome", r"LAB\Finance-Users")
    assert _assignments(ctl) == []


def test_machine_associate_by_group_name_and_the_old_command_still_works(ctl: Ctl, joined: Services) -> None:
    finance = sid_of(joined, "Finance-Users", PrincipalType.GROUP)
    admins = sid_of(joined, "LayerDesk-Admins", PrincipalType.GROUP)
    info = ctl.json("machine", "associate", "Finance-Users", "--pattern", "VDA-FIN-*")
    assert isinstance(info, dict) and (info["group_sid"], info["group_name"], info["pattern"]) == (
        finance, r"LAB\Finance-Users", "VDA-FIN-*")
    ctl.json("elastic", "machine", "add", admins, "VDA-ADM-*", "--name", r"LAB\LayerDesk-Admins")
    rows = ctl.json("machine", "list")
    assert isinstance(rows, list)
    assert sorted((r["group_name"], r["pattern"]) for r in rows) == [
        (r"LAB\Finance-Users", "VDA-FIN-*"), (r"LAB\LayerDesk-Admins", "VDA-ADM-*")]
    status, _, err = ctl("machine", "associate", "Finance-Users", "--pattern", "VDA-FIN-*")
    assert status == 6 and "already associated" in err

    # The association reaches a non-member's assignment on a matching machine.
    ctl.json("elastic", "assign", "Chrome:120", "--group", "LayerDesk-Admins")
    found = ctl.json("elastic", "resolve", "--user", "alice", "--machine", "VDA-ADM-07")
    assert isinstance(found, dict) and [x["layer"] for x in found["layers"]] == ["Chrome"]
