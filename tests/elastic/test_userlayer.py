r"""Where a user's User Layer lives (``StorageService.user_layer_location`` and ``layerctl userlayer
where``), against the real test DC: alice ∈ Finance-Users ∈ All-Staff, bob ∈ LayerDesk-Admins only."""

from __future__ import annotations

import pytest

from app.directory import PrincipalType
from app.errors import NotFound, ValidationError
from app.services import Services
from app.services.templates import TemplateSpec
from tests.elastic.conftest import BREAK_GLASS_PASSWORD, sid_of
from tests.unit.test_cli import Ctl


@pytest.fixture
def storage(joined: Services) -> Services:
    """Templates on Win11 and Win10, and two locations: ``Staff`` (All-Staff, 10 GB) tried before
    ``Finance`` (Finance-Users, 25 GB)."""
    joined.templates.create_template("Finance-Desktop", TemplateSpec(os="Win11:1.0", apps=("Office:2024",)))
    joined.templates.create_template("Legacy", TemplateSpec(os="Win10:1.0"))
    staff = sid_of(joined, "All-Staff", PrincipalType.GROUP)
    finance = sid_of(joined, "Finance-Users", PrincipalType.GROUP)
    joined.storage.add_location("Staff", r"\\fs1\userlayers", groups=[(staff, r"LAB\All-Staff")])
    joined.storage.add_location("Finance", r"\\fs2\finance\ul", groups=[(finance, r"LAB\Finance-Users")],
                                default_size_gb=25)
    return joined


def _os_id(services: Services, name: str) -> int:
    return services.layers.get_layer(name).layer.id


def test_the_highest_priority_location_of_any_nested_group_wins_and_reordering_changes_it(
        storage: Services) -> None:
    win11 = _os_id(storage, "Win11")
    found = storage.storage.user_layer_location("alice", "Finance-Desktop")
    assert found.folder == rf"\\fs1\userlayers\Users\LAB_alice\{win11}_Win11" + "\\"
    assert (found.location, found.group_name, found.size_gb, found.also) == ("Staff", r"LAB\All-Staff", 10,
                                                                             ("Finance",))
    assert (found.user, found.user_sid) == (r"LAB\alice", sid_of(storage, "alice", PrincipalType.USER))
    assert (found.os_layer_id, found.os_layer, found.template) == (win11, "Win11", "Finance-Desktop")

    storage.storage.reorder(["Finance", "Staff"])
    found = storage.storage.user_layer_location(r"LAB\alice", "Finance-Desktop")
    assert found.folder == rf"\\fs2\finance\ul\Users\LAB_alice\{win11}_Win11" + "\\"
    assert (found.location, found.group_name, found.size_gb, found.also) == ("Finance", r"LAB\Finance-Users", 25,
                                                                             ("Staff",))


def test_the_template_picks_the_os_layer_folder(storage: Services) -> None:
    win10 = _os_id(storage, "Win10")
    found = storage.storage.user_layer_location("alice@lab.test", "Legacy")
    assert found.folder == rf"\\fs1\userlayers\Users\LAB_alice\{win10}_Win10" + "\\"


def test_the_location_overrides_the_default_size(storage: Services) -> None:
    storage.storage.update_location("Staff", default_size_gb=40)
    assert storage.storage.user_layer_location("alice", "Finance-Desktop").size_gb == 40


def test_no_location_unknown_user_or_template_are_clear(storage: Services) -> None:
    with pytest.raises(NotFound, match=r"No storage location is assigned to LAB\\bob"):
        storage.storage.user_layer_location("bob", "Finance-Desktop")
    with pytest.raises(NotFound, match="nobody-here"):
        storage.storage.user_layer_location("nobody-here", "Finance-Desktop")
    with pytest.raises(NotFound, match="No-Such-Template"):
        storage.storage.user_layer_location("alice", "No-Such-Template")
    with pytest.raises(ValidationError, match="Name the user"):
        storage.storage.user_layer_location(" ", "Finance-Desktop")


def test_layerctl_userlayer_where(storage: Services, capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    ctl = Ctl(storage.home.root, capsys, monkeypatch)
    ctl.json("login", "--user", "breakglass", "--password-stdin", stdin=BREAK_GLASS_PASSWORD + "\n")
    win11 = _os_id(storage, "Win11")
    found = ctl.json("userlayer", "where", "--user", r"LAB\alice", "--template", "Finance-Desktop")
    assert isinstance(found, dict)
    assert found["folder"] == rf"\\fs1\userlayers\Users\LAB_alice\{win11}_Win11" + "\\"
    assert (found["location"], found["size_gb"]) == ("Staff", 10)

    ctl.json("storage", "priority", r"\\fs2\finance\ul", "Staff")  # by path or by name
    status, out, _ = ctl("userlayer", "where", "--user", "alice", "--template", "Finance-Desktop")
    assert status == 0
    assert out.splitlines()[0] == rf"\\fs2\finance\ul\Users\LAB_alice\{win11}_Win11" + "\\"
    assert r"Finance (priority 1, via group LAB\Finance-Users)" in out and "25 GB" in out

    status, _, err = ctl("userlayer", "where", "--user", "bob", "--template", "Finance-Desktop")
    assert status == 5 and "No storage location" in err
    status, _, err = ctl("userlayer", "where", "--user", "alice")
    assert status == 2 and "--template" in err


def test_layerctl_storage_add_takes_group_names(joined: Services, capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    joined.templates.create_template("Finance-Desktop", TemplateSpec(os="Win11:1.0"))
    ctl = Ctl(joined.home.root, capsys, monkeypatch)
    ctl.json("login", "--user", "breakglass", "--password-stdin", stdin=BREAK_GLASS_PASSWORD + "\n")
    staff = sid_of(joined, "All-Staff", PrincipalType.GROUP)
    info = ctl.json("storage", "add", "Staff", r"\\fs1\userlayers", "--group", r"LAB\All-Staff",
                    "--group", "S-1-5-21-1-2-3-4000=LAB\\Retired")
    assert isinstance(info, dict)
    assert sorted(map(tuple, info["groups"])) == [("S-1-5-21-1-2-3-4000", r"LAB\Retired"), (staff, r"LAB\All-Staff")]
    ctl.json("storage", "add", "Finance", r"\\fs2\finance\ul", "--group", "Finance-Users", "--size-gb", "25")
    found = ctl.json("userlayer", "where", "--user", "alice", "--template", "Finance-Desktop")
    assert isinstance(found, dict) and (found["location"], found["group_name"]) == ("Staff", r"LAB\All-Staff")
    ctl.json("storage", "update", "Staff", "--group", "LayerDesk-Admins")
    found = ctl.json("userlayer", "where", "--user", "alice", "--template", "Finance-Desktop")
    assert isinstance(found, dict) and (found["location"], found["size_gb"]) == ("Finance", 25)

    status, _, err = ctl("storage", "add", "Other", r"\\fs3\ul", "--group", "No-Such-Group")
    assert status == 5 and "No-Such-Group" in err
    rows = ctl.json("storage", "list")
    assert isinstance(rows, list) and [r["name"] for r in rows] == ["Staff", "Finance"]
