from app.services import Services


def test_lab_fixture_builds_a_catalog(lab: Services) -> None:
    names = [layer.name for layer in lab.layers.list_layers()]
    assert names == ["Chrome", "Citrix-VDA", "Notepad++", "Office", "Paint", "Win10", "Win11"]
