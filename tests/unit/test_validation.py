"""Input checks that are not reached through one service alone."""

from __future__ import annotations

import pytest

from app.errors import ValidationError
from app.services.validation import validate_port, validate_principal_name, validate_unc_path


@pytest.mark.parametrize(("value", "message"), [("abc", "is not a number"), (0, "between 1 and 65535"),
                                                 (70000, "between 1 and 65535"), (True, "is not a number")])
def test_bad_ports(value: object, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        validate_port(value)


def test_good_ports() -> None:
    assert validate_port("636") == 636
    assert validate_port(389) == 389


@pytest.mark.parametrize("path", [r"\\fs1\share\..\other", r"\\fs1\share\.", r"\\fs1", r"C:\users", "share",
                                  r"\\bad_host\share", r"\\fs1\CON", r"\\fs1\a*b"])
def test_bad_share_paths(path: str) -> None:
    with pytest.raises(ValidationError):
        validate_unc_path(path)


def test_share_paths_are_normalised() -> None:
    assert validate_unc_path(r"  \\fs1.lab.test\UserLayers\Site A\ ") == r"\\fs1.lab.test\UserLayers\Site A"


@pytest.mark.parametrize("name", ["", "   ", "x" * 257, "LAB\\al\x00ice"])
def test_bad_principal_names(name: str) -> None:
    with pytest.raises(ValidationError):
        validate_principal_name(name)
