"""Publishing through a connector: ``layerctl image publish --connector`` composites the image, records it and
delivers it in the same task; the task result and the audit say where it went. A delivery that fails says
so and leaves the published image recorded, and nothing at the destination."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tests.unit.test_cli import Ctl
from tests.unit.test_cli_publish import cli  # noqa: F401 - the fixture: layers imported, templates Gold/GoldWim


def test_publish_delivers_to_the_connector_and_audits_it(cli: Ctl, tmp_path: Path) -> None:  # noqa: F811
    dest = tmp_path / "delivered"
    dest.mkdir()
    cli.json("connector", "add", "Out", "--type", "folder", "--endpoint", str(dest))
    result = cli.json("image", "publish", "GoldWim", "--output", str(tmp_path / "out"), "--connector", "Out",
                      "--wait")
    assert isinstance(result, dict)
    (image,) = [p for p in dest.iterdir() if p.suffix == ".wim"]
    (note,) = [p for p in dest.iterdir() if p.suffix == ".json"]
    assert image.name.startswith("GoldWim_") and image.name.endswith("Z.wim")
    assert result["delivered_to"] == str(image) and result["connector"] == "Out"
    published = Path(result["path"])
    assert hashlib.sha256(image.read_bytes()).hexdigest() == hashlib.sha256(published.read_bytes()).hexdigest()
    sidecar = json.loads(note.read_text())
    assert sidecar["checksum"] == result["checksum"] and sidecar["template"] == "GoldWim"
    assert [layer["layer"] for layer in sidecar["layers"]] == ["Win11", "Office", "Tools", "Citrix"]
    entries = cli.json("audit", "list")
    assert isinstance(entries, list)
    (delivered,) = [e for e in entries if e["operation"] == "image.deliver"]
    assert delivered["change"]["location"] == str(image) and delivered["change"]["connector"] == "Out"


def test_a_failed_delivery_says_so_and_leaves_the_image_published(cli: Ctl, tmp_path: Path) -> None:  # noqa: F811
    dest = tmp_path / "delivered"
    cli.json("connector", "add", "Out", "--type", "folder", "--endpoint", str(dest))  # folder missing
    status, _, err = cli("image", "publish", "GoldWim", "--output", str(tmp_path / "out"), "--connector", "Out",
                         "--wait")
    assert status != 0 and "was published to" in err and "but not delivered to connector Out" in err
    assert "does not exist" in err and not dest.exists()
    images = cli.json("image", "list")
    assert isinstance(images, list) and len(images) == 1 and Path(images[0]["location"]).is_file()
