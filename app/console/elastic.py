"""The elastic layering screens' logic, without Qt: the directory picker's search-as-you-type bookkeeping
and wording, the resolver's answer as rows to show, the storage locations' priority order (a plain list
that tells its observers before and after every move) and the checks of the forms, as the user types.

The console's directory picker, Elastic layers page and User layer storage tab only render these.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from app.catalog.models import LayerType, PrincipalKind, VersionState
from app.console.template_wizard import OrderObserver
from app.errors import ValidationError
from app.services.storage import MAX_USER_LAYER_GB
from app.services.validation import validate_machine_pattern, validate_name, validate_unc_path

if TYPE_CHECKING:
    from app.directory import DirectoryPrincipal
    from app.services import Services
    from app.services.elastic import Resolution

#: Wait this long after the last keystroke before asking the directory.
SEARCH_DELAY_MS = 250
#: How many users and groups one search shows.
SEARCH_LIMIT = 25


# --- the directory picker -------------------------------------------------------------------------------


@dataclass(frozen=True)
class PrincipalChoice:
    """A user or group chosen in the directory picker: what an assignment or a storage location needs."""

    name: str  # DOMAIN\name
    sid: str
    kind: PrincipalKind  # AD_USER or AD_GROUP
    display_name: str = ""

    @classmethod
    def from_directory(cls, principal: DirectoryPrincipal) -> PrincipalChoice:
        kind = PrincipalKind.AD_GROUP if principal.type.value == "group" else PrincipalKind.AD_USER
        return cls(principal.qualified_name, principal.sid, kind, principal.display_name)

    @property
    def is_group(self) -> bool:
        return self.kind is PrincipalKind.AD_GROUP

    @property
    def label(self) -> str:
        """``LAB\\alice – Alice Example`` (the display name only when it says more than the name)."""
        short = self.name.rpartition("\\")[2]
        extra = self.display_name if self.display_name and self.display_name != short else ""
        return f"{self.name} – {extra}" if extra else self.name


class SearchGate:
    """Which search's answer may still be shown: each keystroke starts a new generation, and an answer
    that comes back for an older one is dropped (a slow answer never overwrites a newer query's)."""

    def __init__(self) -> None:
        self.generation = 0
        self.text = ""

    def typed(self, text: str) -> int:
        """The user changed the text: returns the generation a search for it carries."""
        self.generation += 1
        self.text = text.strip()
        return self.generation

    def is_current(self, generation: int) -> bool:
        return generation == self.generation

    @property
    def wanted(self) -> bool:
        """Whether the text is worth a search (an empty box asks nothing)."""
        return bool(self.text)


def kind_words(kinds: Iterable[PrincipalKind]) -> str:
    """``user or group``, ``user``, ``group``: what the picker looks for."""
    wanted = set(kinds)
    if wanted == {PrincipalKind.AD_GROUP}:
        return "group"
    if wanted == {PrincipalKind.AD_USER}:
        return "user"
    return "user or group"


def search_status(text: str, found: int | None, kinds: Iterable[PrincipalKind], *, limit: int = SEARCH_LIMIT,
                  error: str | None = None) -> str:
    """The line under the picker's box: ``found`` is ``None`` while the search runs."""
    what = kind_words(kinds)
    if not text.strip():
        return f"Type the start of a {what} name."
    if error is not None:
        return f"The directory could not be searched: {error}"
    if found is None:
        return "Searching…"
    if found == 0:
        return f"No {what} name starts with {text.strip()!r}."
    more = " (the first ones; type more to narrow it)" if found >= limit else ""
    return f"{found} found{more}. Double-click one, or select it and press Enter."


# --- what can be assigned ------------------------------------------------------------------------------


def assignable_versions(services: Services) -> dict[str, tuple[str, ...]]:
    """App layer name → its deployable versions, newest first (the only versions the services assign).
    Blocking: the console calls it off the UI thread."""
    found: dict[str, tuple[str, ...]] = {}
    for layer in services.layers.list_layers(LayerType.APP):
        if not layer.version_count:
            continue
        versions = services.layers.get_layer(layer.name).versions
        deployable = sorted((v for v in versions if v.state is VersionState.DEPLOYABLE),
                            key=lambda v: (v.created_at, v.id), reverse=True)
        if deployable:
            found[layer.name] = tuple(v.name for v in deployable)
    return found


# --- the resolver's answer --------------------------------------------------------------------------------


class Outcome(enum.StrEnum):
    """How a row of the resolver's answer ends for the user."""

    DELIVERED = "delivered"
    ALSO = "also"  # another assignment giving the delivered version
    LOST = "not delivered"  # another version of the layer won
    SKIPPED = "skipped"  # the version cannot be delivered


@dataclass(frozen=True)
class ResolutionRow:
    layer: str
    version: str
    outcome: Outcome
    why: str
    #: Why it lost or was skipped (empty for delivered rows).
    reason: str = ""


def resolution_rows(resolution: Resolution) -> list[ResolutionRow]:
    """Each delivered layer with its reason, then its other reasons, then what lost to it; the skipped
    assignments at the end."""
    rows: list[ResolutionRow] = []
    for layer in resolution.layers:
        first, *others = layer.reasons
        rows.append(ResolutionRow(layer.layer, layer.version, Outcome.DELIVERED, first.why))
        rows.extend(ResolutionRow(layer.layer, layer.version, Outcome.ALSO, g.why) for g in others)
        rows.extend(ResolutionRow(layer.layer, o.grant.version, Outcome.LOST, o.grant.why, o.reason)
                    for o in layer.overridden)
    rows.extend(ResolutionRow(o.grant.layer, o.grant.version, Outcome.SKIPPED, o.grant.why, o.reason)
                for o in resolution.skipped)
    return rows


def resolution_summary(resolution: Resolution) -> str:
    """One sentence over the answer: who, where, how many layers, how many groups."""
    count = len(resolution.layers)
    groups = len(resolution.groups)
    lost = sum(len(x.overridden) for x in resolution.layers) + len(resolution.skipped)
    text = (f"{resolution.user_name} on {resolution.machine} gets {count} app layer{'s' if count != 1 else ''} "
            f"({groups} group{'s' if groups != 1 else ''} checked, nested included)")
    if lost:
        text += f"; {lost} assignment{'s' if lost != 1 else ''} not delivered, with the reason"
    return text + "."


# --- the storage locations' order -------------------------------------------------------------------------


class LocationOrder:
    """Storage location names, first tried first (index 0 = priority 1). Observers hear of every move
    before and after it (the console's list model emits its move signals from them)."""

    def __init__(self, names: Iterable[str] = ()) -> None:
        self._names = list(names)
        self._observers: list[OrderObserver] = []

    def subscribe(self, observer: OrderObserver) -> None:
        self._observers.append(observer)

    def unsubscribe(self, observer: OrderObserver) -> None:
        if observer in self._observers:
            self._observers.remove(observer)

    def __len__(self) -> int:
        return len(self._names)

    def __getitem__(self, index: int) -> str:
        return self._names[index]

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._names))

    def names(self) -> tuple[str, ...]:
        return tuple(self._names)

    def move(self, source: int, destination: int) -> bool:
        """Move the name at ``source`` so that it ends at ``destination``; whether anything moved. An index
        out of range is a :class:`ValueError`."""
        count = len(self._names)
        if not (0 <= source < count and 0 <= destination < count):
            raise ValueError(f"cannot move item {source} to {destination} of {count}")
        if source == destination:
            return False
        for observer in list(self._observers):
            observer.moving(source, destination)
        self._names.insert(destination, self._names.pop(source))
        for observer in list(self._observers):
            observer.moved(source, destination)
        return True

    def earlier(self, index: int) -> bool:
        """Tried one place sooner; ``False`` when it is first already."""
        return index > 0 and self.move(index, index - 1)

    def later(self, index: int) -> bool:
        return index + 1 < len(self._names) and self.move(index, index + 1)

    def replace(self, names: Iterable[str]) -> None:
        for observer in list(self._observers):
            observer.resetting()
        self._names = list(names)
        for observer in list(self._observers):
            observer.reset()


# --- checks as the user types -----------------------------------------------------------------------------


def pattern_problem(text: str) -> str:
    """Why ``text`` is not a machine-name pattern (the services' wording), or ``""``."""
    try:
        validate_machine_pattern(text)
    except ValidationError as exc:
        return str(exc)
    return ""


def parse_size(text: str) -> int:
    """The user layer size typed in GB; :class:`ValidationError` when it is not a whole number in range."""
    value = text.strip()
    if not value.isdigit() or not 1 <= int(value) <= MAX_USER_LAYER_GB:
        raise ValidationError(f"The default user layer size must be a whole number of GB from 1 to "
                              f"{MAX_USER_LAYER_GB}; got {value!r}.", field="size")
    return int(value)


def location_problem(name: str, path: str, size: str, *, taken: Sequence[str] = ()) -> str:
    """Why the storage location form cannot be saved yet (the first problem), or ``""``. ``taken`` are the
    other locations' names."""
    try:
        checked = validate_name(name, "storage location name")
        if checked.casefold() in {t.casefold() for t in taken}:
            return f"A storage location named {checked!r} already exists."
        validate_unc_path(path, "storage location path")
        parse_size(size)
    except ValidationError as exc:
        return str(exc)
    return ""
