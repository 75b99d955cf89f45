"""The elastic screens' logic without Qt: the picker's search bookkeeping and wording, the resolver's answer
as rows, the storage locations' order and the forms' checks."""

from __future__ import annotations

import pytest

from app.catalog.models import PrincipalKind, VersionState
from app.console.elastic import (
    LocationOrder,
    Outcome,
    PrincipalChoice,
    SearchGate,
    assignable_versions,
    location_problem,
    parse_size,
    pattern_problem,
    resolution_rows,
    resolution_summary,
    search_status,
)
from app.directory import DirectoryPrincipal, PrincipalType
from app.errors import ValidationError
from app.services import Services
from app.services.elastic import AssignmentRow, AssociationRow, Membership, resolve_layers
from tests.conftest import make_deployable

USER = "S-1-5-21-1-2-3-1105"
FINANCE = "S-1-5-21-1-2-3-1201"
STAFF = "S-1-5-21-1-2-3-1202"
KIOSK = "S-1-5-21-1-2-3-1203"
BOTH = (PrincipalKind.AD_USER, PrincipalKind.AD_GROUP)


def test_a_search_answer_for_an_older_text_is_dropped() -> None:
    gate = SearchGate()
    assert not gate.wanted
    first = gate.typed("al")
    second = gate.typed(" alice ")
    assert gate.text == "alice" and gate.wanted
    assert not gate.is_current(first) and gate.is_current(second)
    gate.typed("")
    assert not gate.wanted and not gate.is_current(second)


def test_the_picker_says_what_is_going_on() -> None:
    assert search_status("", None, BOTH) == "Type the start of a user or group name."
    assert search_status("fin", None, (PrincipalKind.AD_GROUP,)) == "Searching…"
    assert search_status("zz", 0, (PrincipalKind.AD_USER,)) == "No user name starts with 'zz'."
    assert search_status("a", 3, BOTH).startswith("3 found.")
    assert "type more to narrow it" in search_status("a", 25, BOTH, limit=25)
    failed = search_status("a", None, BOTH, error="The directory refused the bind account.")
    assert failed == "The directory could not be searched: The directory refused the bind account."


def test_a_directory_principal_becomes_a_choice() -> None:
    group = DirectoryPrincipal(FINANCE, PrincipalType.GROUP, "Finance-Users", "LAB\\Finance-Users", "Finance-Users",
                               "CN=Finance-Users,CN=Users,DC=lab,DC=test")
    user = DirectoryPrincipal(USER, PrincipalType.USER, "alice", "LAB\\alice", "Alice Example",
                              "CN=alice,CN=Users,DC=lab,DC=test")
    assert PrincipalChoice.from_directory(group) == PrincipalChoice("LAB\\Finance-Users", FINANCE,
                                                                    PrincipalKind.AD_GROUP, "Finance-Users")
    assert PrincipalChoice.from_directory(group).label == "LAB\\Finance-Users"
    assert PrincipalChoice.from_directory(user).label == "LAB\\alice – Alice Example"
    assert not PrincipalChoice.from_directory(user).is_group


def _row(layer_id: int, layer: str, version_id: int, version: str, kind: PrincipalKind, sid: str, name: str,
         state: VersionState = VersionState.DEPLOYABLE) -> AssignmentRow:
    return AssignmentRow(layer_id, layer, "Win11", version_id, version, state, 1024, None, kind, sid, name)


def test_the_resolvers_answer_reads_as_rows() -> None:
    membership = Membership(USER, "LAB\\alice", {FINANCE: ("LAB\\Finance-Users",),
                                                 STAFF: ("LAB\\Finance-Users", "LAB\\All-Staff")},
                            {FINANCE: "LAB\\Finance-Users", STAFF: "LAB\\All-Staff"})
    assignments = [
        _row(1, "Office", 10, "2024", PrincipalKind.AD_GROUP, STAFF, "LAB\\All-Staff"),
        _row(1, "Office", 11, "2025", PrincipalKind.AD_GROUP, FINANCE, "LAB\\Finance-Users"),
        _row(2, "Chrome", 20, "120", PrincipalKind.AD_USER, USER, "LAB\\alice"),
        _row(3, "Paint", 30, "1.0", PrincipalKind.AD_GROUP, KIOSK, "LAB\\Kiosk", VersionState.BROKEN),
    ]
    resolution = resolve_layers(membership, "VDA-FIN-01", assignments,
                                [AssociationRow(KIOSK, "LAB\\Kiosk", "VDA-*")])
    rows = resolution_rows(resolution)
    assert [(r.layer, r.version, r.outcome) for r in rows] == [
        ("Chrome", "120", Outcome.DELIVERED),
        ("Office", "2025", Outcome.DELIVERED),
        ("Office", "2024", Outcome.LOST),
        ("Paint", "1.0", Outcome.SKIPPED),
    ]
    assert rows[0].why == "assigned directly to LAB\\alice"
    assert rows[1].why == "via group LAB\\Finance-Users"
    assert rows[2].why == "via group LAB\\All-Staff (nested: LAB\\Finance-Users → LAB\\All-Staff)"
    assert rows[2].reason == "Office:2025 is newer"
    assert rows[3].why == "via machine association LAB\\Kiosk ↔ VDA-*" and "not deployable" in rows[3].reason
    assert resolution_summary(resolution) == ("LAB\\alice on VDA-FIN-01 gets 2 app layers (2 groups checked, "
                                              "nested included); 2 assignments not delivered, with the reason.")


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, int, int]] = []

    def moving(self, source: int, destination: int) -> None:
        self.events.append(("moving", source, destination))

    def moved(self, source: int, destination: int) -> None:
        self.events.append(("moved", source, destination))

    def resetting(self) -> None:
        self.events.append(("resetting", -1, -1))

    def reset(self) -> None:
        self.events.append(("reset", -1, -1))


def test_the_location_order_moves_and_tells_its_observers() -> None:
    order = LocationOrder(["Main", "Finance", "Archive"])
    seen = Recorder()
    order.subscribe(seen)
    assert order.earlier(2) and order.names() == ("Main", "Archive", "Finance")
    assert not order.earlier(0), "the first is tried first already"
    assert not order.later(2), "the last is tried last already"
    assert order.later(0) and order.names() == ("Archive", "Main", "Finance")
    assert seen.events == [("moving", 2, 1), ("moved", 2, 1), ("moving", 0, 1), ("moved", 0, 1)]
    with pytest.raises(ValueError, match="cannot move item 3"):
        order.move(3, 0)
    order.unsubscribe(seen)
    order.replace(["Only"])
    assert list(order) == ["Only"] and len(seen.events) == 4


def test_forms_say_what_is_wrong_as_it_is_typed() -> None:
    assert pattern_problem("VDA-FIN-*") == ""
    assert pattern_problem("") == "The machine-name pattern is empty."
    assert "may hold only letters" in pattern_problem("VDA FIN")
    assert parse_size(" 20 ") == 20
    with pytest.raises(ValidationError, match="whole number of GB from 1 to 2040; got 'ten'"):
        parse_size("ten")
    with pytest.raises(ValidationError, match="got '0'"):
        parse_size("0")
    assert location_problem("Main", r"\\fs1\userlayers", "10") == ""
    assert location_problem("main", r"\\fs1\userlayers", "10", taken=["Main"]) == \
        "A storage location named 'main' already exists."
    assert "is not a share path" in location_problem("Main", "C:\\layers", "10")
    assert "got '5000'" in location_problem("Main", r"\\fs1\userlayers", "5000")


def test_only_deployable_app_layer_versions_are_assignable(lab: Services) -> None:
    lab.layers.add_version("Office", "2025")
    make_deployable(lab, "Office:2025")
    lab.layers.add_version("Office", "2026")  # still editing
    found = assignable_versions(lab)
    assert found == {"Chrome": ("120",), "Notepad++": ("8.6",), "Office": ("2025", "2024"), "Paint": ("1.0",)}
