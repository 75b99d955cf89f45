"""The image template wizard's flow: its steps, what each step offers, next/back rules, per-step checks,
the :class:`TemplateSpec` it builds, and the save. The console's wizard pages only render it.

Steps: name → OS layer version → platform layer → app layers → priority → connector → disk and options →
summary (with the conflict report, which the console computes through
:meth:`app.services.publishing.PublishingService.preview_conflicts`) → save with a comment.

Editing reopens the same flow filled from the template. The app layer order is one :class:`PriorityOrder`
(lowest priority first, as the services list it), shared by the wizard's priority step and the console's
priority editor: a plain list that tells its observers before and after every move.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Protocol

from app.catalog.models import DiskFormat, ElasticMode, LayerType, SysprepMode, VersionState
from app.errors import UserError, ValidationError
from app.services.templates import MAX_SIZE_GB, TemplateSpec
from app.services.validation import validate_comment, validate_description, validate_name
from app.services.views import TemplateInfo

if TYPE_CHECKING:
    from app.services import Services
    from app.services.templates import TemplateService


def layer_of(ref: str) -> str:
    """``"Office:2024"`` → ``"Office"``."""
    return ref.partition(":")[0]


# --- the app layer order -------------------------------------------------------------------------------


class OrderObserver(Protocol):
    """Told before and after every change of a :class:`PriorityOrder` (a Qt model emits its signals)."""

    def moving(self, source: int, destination: int) -> None: ...
    def moved(self, source: int, destination: int) -> None: ...
    def resetting(self) -> None: ...
    def reset(self) -> None: ...


class PriorityOrder:
    """App layer versions (``LAYER:VERSION``), lowest priority first: the last one wins over the others."""

    def __init__(self, refs: Iterable[str] = ()) -> None:
        self._refs = list(refs)
        self._observers: list[OrderObserver] = []

    def subscribe(self, observer: OrderObserver) -> None:
        self._observers.append(observer)

    def unsubscribe(self, observer: OrderObserver) -> None:
        if observer in self._observers:
            self._observers.remove(observer)

    def __len__(self) -> int:
        return len(self._refs)

    def __getitem__(self, index: int) -> str:
        return self._refs[index]

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._refs))

    def refs(self) -> tuple[str, ...]:
        return tuple(self._refs)

    def layers(self) -> tuple[str, ...]:
        return tuple(layer_of(ref) for ref in self._refs)

    def move(self, source: int, destination: int) -> bool:
        """Move the item at ``source`` so that it ends at ``destination`` (both 0 = lowest priority).
        Returns whether anything moved; an index out of range is a :class:`ValueError`."""
        count = len(self._refs)
        if not (0 <= source < count and 0 <= destination < count):
            raise ValueError(f"cannot move item {source} to {destination} of {count}")
        if source == destination:
            return False
        for observer in list(self._observers):
            observer.moving(source, destination)
        self._refs.insert(destination, self._refs.pop(source))
        for observer in list(self._observers):
            observer.moved(source, destination)
        return True

    def raise_priority(self, index: int) -> bool:
        """One step towards winning; ``False`` at the top already."""
        return index + 1 < len(self._refs) and self.move(index, index + 1)

    def lower_priority(self, index: int) -> bool:
        return index > 0 and self.move(index, index - 1)

    def replace(self, refs: Iterable[str]) -> None:
        for observer in list(self._observers):
            observer.resetting()
        self._refs = list(refs)
        for observer in list(self._observers):
            observer.reset()


# --- what the catalog offers ---------------------------------------------------------------------------


@dataclass(frozen=True)
class VersionChoice:
    """One layer version the wizard can offer."""

    layer: str
    version: str
    layer_type: LayerType
    os_layer: str | None
    state: VersionState
    layer_id: int
    layer_created_at: datetime
    description: str = ""

    @property
    def ref(self) -> str:
        return f"{self.layer}:{self.version}"

    @property
    def label(self) -> str:
        return f"{self.layer} {self.version} ({self.state.value})"


@dataclass(frozen=True)
class WizardCatalog:
    """The layer versions, connectors and template names the wizard chooses from."""

    versions: tuple[VersionChoice, ...] = ()
    connectors: tuple[str, ...] = ()
    template_names: tuple[str, ...] = ()


def load_catalog(services: Services) -> WizardCatalog:
    """Read what the wizard offers (blocking: the console calls it off the UI thread)."""
    versions: list[VersionChoice] = []
    for layer in services.layers.list_layers():
        if not layer.version_count:
            continue
        detail = services.layers.get_layer(layer.name)
        versions.extend(
            VersionChoice(layer.name, v.name, layer.type, layer.os_layer, v.state, layer.id, layer.created_at,
                          layer.description)
            for v in detail.versions
        )
    return WizardCatalog(
        versions=tuple(versions),
        connectors=tuple(c.name for c in services.connectors.list_connectors()),
        template_names=tuple(t.name for t in services.templates.list_templates()),
    )


# --- the flow --------------------------------------------------------------------------------------------


class Step(enum.Enum):
    """The wizard's steps in order; the value is the page title."""

    IDENTITY = "Name and description"
    OS = "OS layer"
    PLATFORM = "Platform layer"
    APPS = "App layers"
    PRIORITY = "Priority"
    CONNECTOR = "Connector"
    DISK = "Disk and options"
    SUMMARY = "Summary"


STEPS: tuple[Step, ...] = tuple(Step)

ELASTIC_LABELS: dict[ElasticMode, str] = {
    ElasticMode.NONE: "None",
    ElasticMode.APPLICATION: "Application layering",
    ElasticMode.USER_LAYER_FULL: "Application layering + full user layer",
    ElasticMode.USER_LAYER_OFFICE365: "Application layering + Office 365 user layer",
    ElasticMode.SESSION_OFFICE365: "Application layering + session host Office 365 user layer",
}
SYSPREP_LABELS: dict[SysprepMode, str] = {
    SysprepMode.NOT_GENERALIZED: "Not generalized",
    SysprepMode.GENERALIZE_OFFLINE: "Generalize offline",
}


@dataclass(frozen=True)
class StepCheck:
    """Whether a step's input lets the wizard go on; ``error`` says what to fix, ``warning`` what to know."""

    valid: bool
    error: str = ""
    warning: str = ""


OK = StepCheck(True)


def _not_deployable(choices: Iterable[VersionChoice]) -> str:
    late = [c for c in choices if c.state is not VersionState.DEPLOYABLE]
    if not late:
        return ""
    names = ", ".join(f"{c.ref} ({c.state.value})" for c in late)
    return f"Not deployable yet: {names}. The template can be saved, but not published until they are."


@dataclass
class TemplateWizardFlow:
    """The wizard's state. ``template`` set: editing that template (its name is kept)."""

    catalog: WizardCatalog
    template: TemplateInfo | None = None
    name: str = ""
    description: str = ""
    icon: str = ""
    os: str | None = None
    platform: str | None = None
    #: The chosen version of each selected app layer, by layer name.
    apps: dict[str, str] = field(default_factory=dict)
    order: PriorityOrder = field(default_factory=PriorityOrder)
    connector: str | None = None
    disk_format: DiskFormat = DiskFormat.VHDX
    size_gb: int = 100
    elastic_mode: ElasticMode = ElasticMode.NONE
    sysprep: SysprepMode = SysprepMode.NOT_GENERALIZED
    comment: str = ""
    current: Step = Step.IDENTITY
    #: What the last change of the OS layer removed (shown once by the next page).
    notice: str = ""

    def __post_init__(self) -> None:
        t = self.template
        if t is None:
            return
        self.name, self.description, self.icon = t.name, t.description, t.icon or ""
        self.os, self.platform, self.connector = t.os_version, t.platform_version, t.connector
        self.apps = {layer_of(ref): ref for ref in t.app_layers}
        self.order.replace(t.app_layers)
        self.disk_format, self.size_gb = t.disk_format, t.size_gb
        self.elastic_mode, self.sysprep = t.elastic_mode, t.sysprep

    @classmethod
    def for_template(cls, catalog: WizardCatalog, template: TemplateInfo | None = None) -> TemplateWizardFlow:
        return cls(catalog=catalog, template=template)

    @property
    def editing(self) -> bool:
        return self.template is not None

    @property
    def title(self) -> str:
        return f"Edit image template {self.template.name}" if self.template else "New image template"

    # --- what each step offers ---------------------------------------------------------------------

    def _choice(self, ref: str | None) -> VersionChoice | None:
        if not ref:
            return None
        folded = ref.casefold()
        return next((c for c in self.catalog.versions if c.ref.casefold() == folded), None)

    @property
    def os_layer(self) -> str | None:
        choice = self._choice(self.os)
        return choice.layer if choice else (layer_of(self.os) if self.os else None)

    def os_choices(self) -> list[VersionChoice]:
        """OS layer versions that are not broken."""
        return [c for c in self.catalog.versions
                if c.layer_type is LayerType.OS and c.state is not VersionState.BROKEN]

    def platform_choices(self) -> list[VersionChoice]:
        """Platform layer versions bound to the chosen OS layer, not broken."""
        return [c for c in self.catalog.versions
                if c.layer_type is LayerType.PLATFORM and c.os_layer == self.os_layer
                and c.state is not VersionState.BROKEN]

    def app_choices(self) -> dict[str, list[VersionChoice]]:
        """App layers bound to the chosen OS layer → their versions that are not broken (newest last)."""
        offered: dict[str, list[VersionChoice]] = {}
        for c in self.catalog.versions:
            if c.layer_type is LayerType.APP and c.os_layer == self.os_layer and c.state is not VersionState.BROKEN:
                offered.setdefault(c.layer, []).append(c)
        return dict(sorted(offered.items(), key=lambda item: item[0].casefold()))

    # --- changes -------------------------------------------------------------------------------------

    def set_os(self, ref: str | None) -> None:
        """Choose the OS layer version. Choosing another OS *layer* drops the platform and app layers bound
        to the old one (``notice`` names them)."""
        old_layer = self.os_layer
        self.os = ref
        if old_layer is None or self.os_layer == old_layer:
            return
        dropped = []
        if self.platform:
            dropped.append(self.platform)
            self.platform = None
        dropped.extend(self.apps.values())
        self.apps = {}
        self._sync_order()
        self.notice = (f"Changing the OS layer to {self.os_layer} removed what was bound to {old_layer}: "
                       + ", ".join(dropped) + ".") if dropped else ""

    def set_platform(self, ref: str | None) -> None:
        self.platform = ref or None

    def set_app(self, layer: str, version: str | None) -> None:
        """Select app layer ``layer`` at ``version`` (``LAYER:VERSION`` or the bare version name), or
        deselect it with ``None``. The priority order keeps the layers it had; added ones go on top."""
        if version is None:
            self.apps.pop(layer, None)
        else:
            self.apps[layer] = version if ":" in version else f"{layer}:{version}"
        self._sync_order()

    def _sync_order(self) -> None:
        """Keep the order of layers still selected (with their chosen version); put added layers on top,
        the newest layer highest – the order the services give them by default."""
        kept = [self.apps[layer_of(ref)] for ref in self.order if layer_of(ref) in self.apps]
        have = {layer_of(ref) for ref in kept}
        added = [ref for layer, ref in self.apps.items() if layer not in have]

        def created(ref: str) -> tuple[datetime, int]:
            choice = self._choice(ref)
            return (choice.layer_created_at, choice.layer_id) if choice else (datetime.max, 0)

        added.sort(key=created)
        refs = kept + added
        if tuple(refs) != self.order.refs():
            self.order.replace(refs)

    # --- checks --------------------------------------------------------------------------------------

    def check(self, step: Step | None = None) -> StepCheck:
        """Whether ``step`` (the current one by default) lets the wizard go on, and why not."""
        step = step or self.current
        try:
            return self._check(step)
        except ValidationError as exc:
            return StepCheck(False, exc.message)

    def _check(self, step: Step) -> StepCheck:
        if step is Step.IDENTITY:
            validate_name(self.name, "template name")
            if not self.editing and self.name.casefold() in {n.casefold() for n in self.catalog.template_names}:
                return StepCheck(False, f"An image template named {self.name!r} already exists (names ignore "
                                        "case); choose another name.")
            validate_description(self.description)
            if self.icon:
                validate_name(self.icon, "icon file name", max_length=260)
            return OK
        if step is Step.OS:
            os_choice = self._choice(self.os)
            if os_choice is None or os_choice not in self.os_choices():
                if not self.os_choices():
                    return StepCheck(False, "There is no usable OS layer version: create an OS layer and import "
                                            "a version first.")
                return StepCheck(False, "Choose the OS layer version the image starts from.")
            return StepCheck(True, warning=_not_deployable([os_choice]))
        if step is Step.PLATFORM:
            if not self.platform:
                return StepCheck(True, warning="" if self.platform_choices() else
                                 f"No platform layer is bound to {self.os_layer}; the image gets none.")
            platform = self._choice(self.platform)
            if platform is None or platform not in self.platform_choices():
                return StepCheck(False, f"{self.platform} is not a platform layer version bound to OS layer "
                                        f"{self.os_layer}; choose another one or none.")
            return StepCheck(True, warning=_not_deployable([platform]))
        if step is Step.APPS:
            offered = {c.ref.casefold(): c for versions in self.app_choices().values() for c in versions}
            wrong = [ref for ref in self.apps.values() if ref.casefold() not in offered]
            if wrong:
                return StepCheck(False, "Not an app layer version bound to OS layer "
                                        f"{self.os_layer}: {', '.join(wrong)}. Deselect it.")
            return StepCheck(True, warning=_not_deployable(offered[r.casefold()] for r in self.apps.values()))
        if step is Step.PRIORITY:
            if sorted(self.order.refs()) != sorted(self.apps.values()):
                return StepCheck(False, "The priority list does not match the chosen app layers.")
            return OK
        if step is Step.CONNECTOR:
            if self.connector and self.connector not in self.catalog.connectors:
                return StepCheck(False, f"There is no connector configuration named {self.connector!r}.")
            return OK
        if step is Step.DISK:
            size = self.size_gb
            if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_SIZE_GB:
                return StepCheck(False, f"The disk size must be a whole number of GB from 1 to {MAX_SIZE_GB}.")
            if self.disk_format is DiskFormat.WIM and self.elastic_mode is not ElasticMode.NONE:
                return StepCheck(True, warning="A WIM image is a file image, not a disk; elastic layering "
                                               "applies once it is deployed to a disk.")
            return OK
        # The summary: everything before it, then the comment.
        verdict = self._summary_check_without_comment()
        if verdict.valid:
            validate_comment(self.comment)
        return verdict

    # --- navigation ----------------------------------------------------------------------------------

    def next_step(self, step: Step | None = None) -> Step | None:
        index = STEPS.index(step or self.current)
        return STEPS[index + 1] if index + 1 < len(STEPS) else None

    def previous_step(self, step: Step | None = None) -> Step | None:
        index = STEPS.index(step or self.current)
        return STEPS[index - 1] if index else None

    def next(self) -> Step:
        """Go on to the next step when the current one is valid; :class:`ValidationError` says why not."""
        verdict = self.check()
        if not verdict.valid:
            raise ValidationError(verdict.error)
        following = self.next_step()
        if following is None:
            raise ValidationError("This is the last step: save the template.")
        self.current = following
        return following

    def back(self) -> Step:
        """Go back one step; what was entered is kept."""
        previous = self.previous_step()
        if previous is not None:
            self.current = previous
        return self.current

    # --- the result ----------------------------------------------------------------------------------

    def spec(self) -> TemplateSpec:
        """The template as entered; a :class:`ValidationError` names the first step to fix."""
        verdict = self._summary_check_without_comment()
        if not verdict.valid:
            raise ValidationError(verdict.error)
        assert self.os is not None
        return TemplateSpec(
            os=self.os, apps=self.order.refs(), platform=self.platform, disk_format=self.disk_format,
            size_gb=self.size_gb, elastic_mode=self.elastic_mode, sysprep=self.sysprep, connector=self.connector,
            description=self.description.strip(), icon=self.icon or None,
        )

    def _summary_check_without_comment(self) -> StepCheck:
        for step in STEPS[: STEPS.index(Step.SUMMARY)]:
            verdict = self.check(step)
            if not verdict.valid:
                return StepCheck(False, f"{step.value}: {verdict.error}")
        return OK

    def stack(self) -> tuple[str | None, tuple[str, ...], str | None]:
        """``(os, apps lowest first, platform)`` for the conflict report."""
        return self.os, self.order.refs(), self.platform

    def summary(self) -> list[tuple[str, str]]:
        """The summary page's rows: label → value."""
        top_first = list(reversed(self.order.refs()))
        return [
            ("Name", self.name),
            ("Description", self.description.strip() or "—"),
            ("Icon", self.icon or "—"),
            ("OS layer", self.os or "—"),
            ("Platform layer", self.platform or "none"),
            ("App layers (top wins)", ", ".join(top_first) or "none"),
            ("Connector", self.connector or "none (publish to a folder)"),
            ("Disk", f"{self.disk_format.value.upper()}, {self.size_gb} GB"),
            ("Elastic layering", ELASTIC_LABELS[self.elastic_mode]),
            ("Sysprep", SYSPREP_LABELS[self.sysprep]),
        ]

    def save(self, templates: TemplateService) -> TemplateInfo:
        """Create or update the template in one service call (one revision, audited with ``comment``) with
        exactly the priority order shown. On any error the flow is left as it was, so nothing entered is
        lost; the error (a :class:`UserError`) says what to fix."""
        verdict = self.check(Step.SUMMARY)
        if not verdict.valid:
            raise ValidationError(verdict.error)
        spec = self.spec()
        comment = self.comment.strip()
        if self.template is None:
            return templates.create_template(self.name, spec, comment=comment, given_order=True)
        return templates.update_template(self.template.name, spec, comment=comment, given_order=True)


def clone_name_problem(name: str, existing: Sequence[str]) -> str:
    """Why ``name`` cannot name a clone (empty when it can)."""
    try:
        validate_name(name, "template name")
    except UserError as exc:
        return exc.message
    if name.casefold() in {n.casefold() for n in existing}:
        return f"An image template named {name!r} already exists (names ignore case)."
    return ""
