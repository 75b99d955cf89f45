"""System settings: retention, sign-in policy, shares, cache size. Each key has a type and a range."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.catalog.models import DirectoryJunction, Setting
from app.errors import Conflict, NotFound, ValidationError
from app.services.base import Service
from app.services.rbac import Operation
from app.services.validation import validate_unc_path
from app.services.views import SettingInfo


@dataclass(frozen=True)
class SettingSpec:
    key: str
    default: Any
    description: str
    parse: Callable[[Any], Any]


def _days(low: int, high: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        try:
            number = int(str(value).strip())
        except ValueError:
            raise ValidationError(f"{value!r} is not a whole number of days.") from None
        if not low <= number <= high:
            raise ValidationError(f"{number} days is outside the allowed range {low}–{high}.")
        return number

    return parse


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"true", "yes", "on", "1"}:
        return True
    if text in {"false", "no", "off", "0"}:
        return False
    raise ValidationError(f"{value!r} is not yes or no (use true/false).")


def _share_or_empty(value: Any) -> str:
    text = str(value or "").strip()
    return validate_unc_path(text, "share path") if text else ""


def _gigabytes(value: Any) -> int:
    try:
        number = int(str(value).strip())
    except ValueError:
        raise ValidationError(f"{value!r} is not a whole number of GB.") from None
    if not 0 <= number <= 100_000:
        raise ValidationError(f"{number} GB is outside the allowed range 0–100000.")
    return number


SPECS: dict[str, SettingSpec] = {
    spec.key: spec
    for spec in (
        SettingSpec("task_retention_days", 30, "Days ended tasks and their logs are kept.", _days(1, 3650)),
        SettingSpec("audit_retention_days", 365, "Days audit entries are kept.", _days(30, 36500)),
        SettingSpec("log_retention_days", 30, "Days rotated log files are kept.", _days(1, 3650)),
        SettingSpec(
            "require_sign_in",
            False,
            "Require sign-in even on an embedded catalog without a directory.",
            _bool,
        ),
        SettingSpec(
            "network_file_share",
            "",
            r"The share (\\server\share) used for uploads and exports; empty for none.",
            _share_or_empty,
        ),
        SettingSpec(
            "elastic_layer_share",
            "",
            r"The share (\\server\share) that holds the Elastic Layer repository; empty for none.",
            _share_or_empty,
        ),
        SettingSpec("layer_cache_gb", 50, "Size of the cache of ready-to-merge layer volumes, of the OS layers' hive "
                    "files and of the composites re-publishes start from.", _gigabytes),
    )
}

#: Set once per installation; names its secrets in the OS keyring.
INSTALLATION_ID = "installation_id"


def read_setting(session: Session, key: str) -> Any:
    row = session.get(Setting, key)
    if row is not None:
        return row.value
    if key in SPECS:
        return SPECS[key].default
    raise NotFound(f"There is no setting {key!r}.")


def installation_id(session: Session) -> str:
    """The installation's id, created on first use (inside the caller's write transaction)."""
    row = session.get(Setting, INSTALLATION_ID)
    if row is None:
        row = Setting(key=INSTALLATION_ID, value=uuid.uuid4().hex, updated_by="LayerDesk")
        session.add(row)
        session.flush()
    return str(row.value)


class SettingsService(Service):
    def list_settings(self) -> list[SettingInfo]:
        with self._read() as session:
            rows = {row.key: row for row in session.scalars(select(Setting))}
            return [
                SettingInfo(
                    key=spec.key,
                    value=rows[spec.key].value if spec.key in rows else spec.default,
                    default=spec.default,
                    description=spec.description,
                    updated_at=rows[spec.key].updated_at if spec.key in rows else None,
                    updated_by=rows[spec.key].updated_by if spec.key in rows else "",
                )
                for spec in SPECS.values()
            ]

    def get(self, key: str) -> Any:
        self._spec(key)
        with self._read() as session:
            return read_setting(session, key)

    def set(self, key: str, value: Any, *, comment: str = "") -> SettingInfo:
        spec = self._spec(key)
        with self._change(Operation.EDIT_SETTINGS, "settings.set", "setting", key, comment) as change:
            parsed = spec.parse(value)
            if key == "require_sign_in" and parsed:
                self._refuse_lockout(change.session)
            row = change.session.get(Setting, key)
            before = row.value if row is not None else spec.default
            if row is None:
                row = Setting(key=key, value=parsed)
                change.session.add(row)
            row.value = parsed
            row.updated_at = self._now()
            row.updated_by = self.caller.username
            change.details = {"value": [before, parsed]}
            return SettingInfo(key, parsed, spec.default, spec.description, row.updated_at, row.updated_by)

    @staticmethod
    def _refuse_lockout(session: Session) -> None:
        from app.services.access import has_enabled_local_administrator

        junctions = session.scalar(
            select(func.count()).select_from(DirectoryJunction).where(DirectoryJunction.enabled.is_(True))
        )
        if not junctions and not has_enabled_local_administrator(session):
            raise Conflict(
                "Sign-in cannot be required yet: nobody could sign in. Create a local account with the "
                "Administrator role first (`layerctl user add NAME --role Administrator`)."
            )

    @staticmethod
    def _spec(key: str) -> SettingSpec:
        spec = SPECS.get(key)
        if spec is None:
            raise NotFound(f"There is no setting {key!r}; known settings: {', '.join(SPECS)}.")
        return spec
