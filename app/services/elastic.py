"""Elastic layering: which app layer versions a user gets on a machine, and why.

The rules (the console and ``layerctl elastic resolve`` show their outcome):

1. **Who the user is.** The user is looked up in the first enabled directory junction (in name order)
   that knows them (``user``, ``DOMAIN\\user``, ``user@domain``, a UPN or a SID). Their groups are every
   group they belong to, directly or through other groups (nested membership), plus their primary
   group (``Domain Users``), as the directory reports them.
2. **What reaches them.** An app layer version reaches the user through
   - a **direct** assignment to the user;
   - a **group** assignment to any of their groups (the answer names the chain: ``Finance-Users →
     All-Staff``);
   - a **machine association**: a group tied to a machine-name pattern (``VDA-FIN-*``) gives its
     assignments to *every* user who signs in on a machine whose name matches, whether or not the user
     is in that group. Patterns use ``*`` (any run of characters) and ``?`` (one character) and ignore
     case; they match the machine name as given (``VDA-FIN-*`` matches ``vda-fin-07`` and
     ``vda-fin-07.lab.test``).
3. **One version per layer.** When several assignments give versions of the same layer:
   - a direct user assignment beats every group or machine assignment of that layer;
   - among group and machine assignments, the most recently created version of the layer wins (the
     newest version of the layer; ties cannot happen, a layer's versions are strictly ordered).
   The answer lists the assignments that lost, and why.
4. **Only deployable versions are delivered.** An assignment whose version is no longer deployable
   (it became ``broken``, say) is skipped and reported; the other assignments of that layer then
   decide as if it were not there.

Resolving reads the catalog and the directory and changes nothing, so every role may do it.

:meth:`ElasticService.sync` writes the Elastic Layer repository (every assigned deployable version's
disk and the three JSON files of :mod:`app.elastic.repository`) to an SMB share, as
:mod:`app.elastic.sync` describes; it needs the Manage Elastic Layer Assignments role and is audited.
:meth:`ElasticService.start_sync` runs it as an :class:`ElasticSyncTask` (progress, cancel through the
catalog, an :class:`ElasticSyncResult`); the share account's password stays in that task's memory only.
"""

from __future__ import annotations

import enum
import logging
import re
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from sqlalchemy import select
from sqlalchemy.orm import Session, aliased

from app.catalog.models import (
    ElasticAssignment,
    Layer,
    LayerVersion,
    MachineAssociation,
    PrincipalKind,
    VersionState,
)
from app.errors import LayerDeskError, PermissionDenied, ValidationError
from app.paths import Home
from app.services.base import Service, ServiceContext
from app.services.rbac import Operation
from app.services.validation import validate_comment
from app.tasks.base import LayerDeskTask, TaskCanceled, TaskContext, TaskResult

if TYPE_CHECKING:
    from app.directory import DirectoryClient, DirectoryPrincipal
    from app.elastic.sync import ProgressFn, ShareLocation, SyncPlan, SyncResult
    from app.engine.layer_disk import LayerDiskFormat
    from app.procs import Cancellable
    from app.services import Services
    from app.tasks.runner import TaskRunner

log = logging.getLogger(__name__)

_MACHINE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,252}$")


class GrantSource(enum.StrEnum):
    """How an assignment reaches a user."""

    USER = "user"
    GROUP = "group"
    MACHINE = "machine"


@dataclass(frozen=True)
class Grant:
    """One assignment that gives a version of a layer to the user, and how it reaches them."""

    source: GrantSource
    layer: str
    version: str
    #: The principal the assignment names (the user, or a group).
    principal_sid: str
    principal_name: str
    #: For a group: the groups from the user's own group up to the assigned one (the last is the
    #: assigned group; one name means a direct member; empty for the primary group).
    via: tuple[str, ...] = ()
    #: For a machine association: the pattern the machine name matched.
    pattern: str | None = None
    #: :meth:`explain`'s words, kept so JSON output carries them too.
    why: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "why", self.explain())

    def explain(self) -> str:
        """The reason in words: ``direct``, ``via group LAB\\All-Staff (LAB\\Finance-Users → …)``."""
        if self.source is GrantSource.USER:
            return f"assigned directly to {self.principal_name}"
        if self.source is GrantSource.MACHINE:
            return f"via machine association {self.principal_name} ↔ {self.pattern}"
        if not self.via:
            return f"via group {self.principal_name} (primary group)"
        if len(self.via) == 1:
            return f"via group {self.principal_name}"
        return f"via group {self.principal_name} (nested: {' → '.join(self.via)})"


@dataclass(frozen=True)
class Overridden:
    """An assignment that lost to the delivered version, and why."""

    grant: Grant
    reason: str


@dataclass(frozen=True)
class ResolvedLayer:
    """A layer the user gets on the machine: the version delivered and every reason for it."""

    layer: str
    layer_id: int
    os_layer: str | None
    version: str
    version_id: int
    size_bytes: int
    checksum: str | None
    #: Every assignment that gives this version (the strongest first).
    reasons: tuple[Grant, ...]
    overridden: tuple[Overridden, ...] = ()

    @property
    def explanation(self) -> str:
        return self.reasons[0].why


@dataclass(frozen=True)
class Resolution:
    """What ``user`` gets on ``machine``."""

    user_sid: str
    user_name: str
    machine: str
    #: Every group of the user (``DOMAIN\\name``), sorted.
    groups: tuple[str, ...]
    layers: tuple[ResolvedLayer, ...]
    #: Assignments that would apply but whose version cannot be delivered.
    skipped: tuple[Overridden, ...] = ()


@dataclass(frozen=True)
class Membership:
    """A user as the resolver needs them: SID, name, and each group SID with its chain of names."""

    user_sid: str
    user_name: str
    #: Group SID → the chain of group names from the user's own group to that group (empty: the
    #: primary group, which the directory gives without a chain).
    groups: Mapping[str, tuple[str, ...]]
    #: Group SID → its name.
    group_names: Mapping[str, str]


@dataclass(frozen=True)
class AssignmentRow:
    """An elastic assignment joined with its version and layer (what the rules need of it)."""

    layer_id: int
    layer: str
    os_layer: str | None
    version_id: int
    version: str
    state: VersionState
    size_bytes: int
    checksum: str | None
    principal_kind: PrincipalKind
    principal_sid: str
    principal_name: str
    os_layer_id: int | None = None


@dataclass(frozen=True)
class AssociationRow:
    group_sid: str
    group_name: str
    pattern: str


def pattern_matches(pattern: str, machine: str) -> bool:
    """Whether the machine name matches a machine-association pattern (``*``, ``?``; case ignored)."""
    expression = "".join(".*" if ch == "*" else "." if ch == "?" else re.escape(ch) for ch in pattern)
    return re.fullmatch(expression, machine, re.IGNORECASE | re.DOTALL) is not None


def validate_machine_name(value: str | None) -> str:
    name = (value or "").strip()
    if not _MACHINE_NAME.match(name):
        raise ValidationError(
            f"{value!r} is not a machine name (letters, digits, '-', '_' and '.', up to 253 characters).",
            field="machine",
        )
    return name


def resolve_layers(
    membership: Membership,
    machine: str,
    assignments: Iterable[AssignmentRow],
    associations: Iterable[AssociationRow],
) -> Resolution:
    """Apply the rules of this module's docstring: pure, no catalog or directory access."""
    matched: dict[str, list[str]] = {}
    for association in associations:
        if pattern_matches(association.pattern, machine):
            matched.setdefault(association.group_sid, []).append(association.pattern)

    by_layer: dict[int, list[tuple[Grant, AssignmentRow]]] = {}
    for row in assignments:
        for grant in _grants(row, membership, matched):
            by_layer.setdefault(row.layer_id, []).append((grant, row))

    layers: list[ResolvedLayer] = []
    skipped: list[Overridden] = []
    for candidates in by_layer.values():
        usable = []
        for grant, row in candidates:
            if row.state is VersionState.DEPLOYABLE:
                usable.append((grant, row))
            else:
                skipped.append(Overridden(grant, f"{row.layer}:{row.version} is {row.state.value}, not deployable"))
        if usable:
            layers.append(_decide(usable))
    layers.sort(key=lambda r: r.layer.casefold())
    skipped.sort(key=lambda o: (o.grant.layer.casefold(), o.grant.principal_name.casefold()))
    return Resolution(
        user_sid=membership.user_sid, user_name=membership.user_name, machine=machine,
        groups=tuple(sorted(membership.group_names.values(), key=str.casefold)),
        layers=tuple(layers), skipped=tuple(skipped),
    )


def _grants(row: AssignmentRow, membership: Membership, matched: Mapping[str, list[str]]) -> list[Grant]:
    """Every way ``row`` reaches the user: direct, through membership, through machine patterns."""
    def grant(source: GrantSource, via: tuple[str, ...] = (), pattern: str | None = None) -> Grant:
        return Grant(source, row.layer, row.version, row.principal_sid, row.principal_name, via, pattern)

    found: list[Grant] = []
    if row.principal_kind is PrincipalKind.AD_USER:
        if row.principal_sid == membership.user_sid:
            found.append(grant(GrantSource.USER))
        return found
    if row.principal_sid in membership.groups:
        found.append(grant(GrantSource.GROUP, via=membership.groups[row.principal_sid]))
    found.extend(grant(GrantSource.MACHINE, pattern=p) for p in matched.get(row.principal_sid, ()))
    return found


def _strength(grant: Grant, row: AssignmentRow) -> tuple[int, int]:
    """Sort key, strongest first: a direct assignment, then the newest version (higher version ids are
    newer: a layer's versions are created one after another)."""
    return (0 if grant.source is GrantSource.USER else 1, -row.version_id)


def _decide(candidates: Sequence[tuple[Grant, AssignmentRow]]) -> ResolvedLayer:
    ordered = sorted(candidates, key=lambda c: (_strength(*c), c[0].source.value, c[0].principal_name.casefold()))
    best_grant, best = ordered[0]
    reasons = tuple(g for g, r in ordered if r.version_id == best.version_id)
    overridden: list[Overridden] = []
    for grant, row in ordered:
        if row.version_id == best.version_id:
            continue
        if best_grant.source is GrantSource.USER:
            why = f"a direct assignment of {best.layer}:{best.version} beats group assignments"
        else:
            why = f"{best.layer}:{best.version} is newer"
        overridden.append(Overridden(grant, why))
    return ResolvedLayer(
        layer=best.layer, layer_id=best.layer_id, os_layer=best.os_layer, version=best.version,
        version_id=best.version_id, size_bytes=best.size_bytes, checksum=best.checksum,
        reasons=reasons, overridden=tuple(overridden),
    )


# --- the directory side ---------------------------------------------------------------------------


def membership_of(client: DirectoryClient, user: DirectoryPrincipal) -> Membership:
    """``user``'s groups from the directory: nested membership (the in-chain rule, each group with
    its ``memberOf``, so the chain can be told) plus the token's groups (which add the primary group)."""
    from app.directory import escape_filter_value, sid_from_bytes
    from app.directory.client import IN_CHAIN

    netbios = client.domain().netbios_name

    def attribute(entry: Mapping[str, object], name: str) -> list[bytes]:
        raw = entry.get("raw_attributes")
        values = raw.get(name) if isinstance(raw, Mapping) else None
        return list(values) if isinstance(values, list) else []

    def text(entry: Mapping[str, object], name: str) -> str:
        values = attribute(entry, name)
        return values[0].decode("utf-8", "replace") if values else ""

    # Parent groups of the user and of each of their groups, keyed by case-folded DN.
    parents: dict[str, list[str]] = {}
    sid_of: dict[str, str] = {}
    name_of: dict[str, str] = {}
    for entry in client.paged_search("(objectClass=*)", ["memberOf"], base=user.dn, limit=1):
        parents[user.dn.casefold()] = [v.decode("utf-8", "replace").casefold() for v in attribute(entry, "memberOf")]
    chain_filter = f"(&(objectClass=group)(member:{IN_CHAIN}:={escape_filter_value(user.dn)}))"
    for entry in client.paged_search(chain_filter, ["objectSid", "distinguishedName", "sAMAccountName", "memberOf"]):
        dn = text(entry, "distinguishedName").casefold()
        sids = attribute(entry, "objectSid")
        if not dn or not sids:
            continue
        sid_of[dn] = sid_from_bytes(sids[0])
        name_of[dn] = f"{netbios}\\{text(entry, 'sAMAccountName')}"
        parents[dn] = [v.decode("utf-8", "replace").casefold() for v in attribute(entry, "memberOf")]

    # Breadth first from the user: each group's shortest chain of memberships.
    chains: dict[str, tuple[str, ...]] = {}
    queue: deque[tuple[str, tuple[str, ...]]] = deque([(user.dn.casefold(), ())])
    while queue:
        dn, chain = queue.popleft()
        for parent in parents.get(dn, ()):
            if parent in sid_of and sid_of[parent] not in chains:
                chains[sid_of[parent]] = (*chain, name_of[parent])
                queue.append((parent, chains[sid_of[parent]]))
    names = {sid_of[dn]: name_of[dn] for dn in sid_of}
    for sid in client.token_group_sids(user.dn) - chains.keys():
        # The primary group (and any group the chain search did not return): no chain to tell.
        chains[sid] = ()
        found = client.principal_by_sid(sid)
        names[sid] = found.qualified_name if found is not None else sid
    return Membership(user.sid, user.qualified_name, chains, names)


class ElasticService(Service):
    """Elastic layering: :meth:`resolve` (a read) and :meth:`sync` (writes the repository to a share)."""

    def __init__(self, ctx: ServiceContext, home: Home | None = None) -> None:
        super().__init__(ctx)
        self._home = home

    @classmethod
    def for_services(cls, services: Services) -> ElasticService:
        return cls(ServiceContext(catalog=services.catalog, caller=services.caller, secrets=services.secrets),
                   services.home)

    def sync(self, share: str, username: str, password: str, *, comment: str = "", fmt: LayerDiskFormat = "vhdx",
             progress: ProgressFn | None = None, cancel: Cancellable | None = None) -> SyncResult:
        """Write the Elastic Layer repository to ``share`` (``\\\\HOST\\SHARE[\\folder]``) signed in as
        ``username``: only disks the share lacks are copied (an interrupted copy is resumed), JSON files are
        replaced atomically (see :mod:`app.elastic.sync`). Raises :class:`~app.elastic.sync.ShareAccessDenied`
        for a refused account, :class:`~app.elastic.sync.ShareError` when the share cannot be reached or
        written, and :class:`~app.elastic.sync.SyncCanceled` when ``cancel`` stops it; the share then keeps a
        consistent repository, and running the sync again finishes it."""
        from app.elastic.sync import ShareSession, sync_repository
        from app.engine.repository import LayerRepository

        location, text = self.check_sync(share, username, password, comment)
        assert self._home is not None  # check_sync refused a service without a home
        plan = self.sync_plan()
        cache = self._home.root / "cache" / "elastic"
        cache.mkdir(parents=True, exist_ok=True)
        with ShareSession(location, username.strip(), password) as session:
            result = sync_repository(session, plan, LayerRepository(self._home.repository), cache, fmt=fmt,
                                     progress=progress, cancel=cancel)
        with self._change(Operation.EDIT_ELASTIC_ASSIGNMENTS, "elastic.sync", "elastic layer repository",
                          location.unc, text) as change:
            change.details = {"user": username.strip(), "copied": list(result.copied),
                              "replaced": list(result.replaced), "deleted": list(result.deleted),
                              "bytes_copied": result.bytes_copied, "bytes_resumed": result.bytes_resumed}
        log.info("synced the elastic layer repository to %s: %d disks copied, %d kept", location.unc,
                 len(result.copied), len(result.kept))
        return result

    def check_sync(self, share: str, username: str, password: str, comment: str = "") -> tuple[ShareLocation, str]:
        """Refuse a sync before it starts: the caller's role (a refusal is audited), the share path, the
        account and its password being given. Returns the share and the checked comment."""
        from app.elastic.sync import parse_share

        text = validate_comment(comment)
        try:
            self.caller.require(Operation.EDIT_ELASTIC_ASSIGNMENTS)
        except PermissionDenied as denied:
            self._audit_denied("elastic.sync", "elastic layer repository", share, text, str(denied))
            raise
        location = parse_share(share)
        if not (username or "").strip():
            raise ValidationError("Give the account that writes to the share (--user DOMAIN\\user).", field="user")
        if not password:
            raise ValidationError("Give the share account's password (on stdin).", field="password")
        if self._home is None:
            raise ValidationError("This service has no LayerDesk home to keep its layer disk cache in.")
        return location, text

    def start_sync(self, runner: TaskRunner, share: str, username: str, password: str, *, comment: str = "",
                   fmt: LayerDiskFormat = "vhdx") -> ElasticSyncTask:
        """Start :meth:`sync` as a task on ``runner`` and return it (``task_id`` set; follow it through the
        runner and the catalog, cancel it with ``TaskService.cancel``). Refused before anything is recorded
        as :meth:`check_sync` says. The password is handed to the task in memory only: not to the catalog,
        the task's title or log."""
        self.check_sync(share, username, password, comment)  # first: a refusal of the role is audited
        task = ElasticSyncTask(self, share, username, password, comment=comment, fmt=fmt)
        task.task_id = runner.submit(task)
        return task

    def sync_plan(self) -> SyncPlan:
        """What a sync writes: every assignment of a deployable version (with the versions) and every
        machine association, from the catalog."""
        from app.elastic.repository import AssignmentEntry, AssociationEntry
        from app.elastic.sync import PublishedVersion, SyncPlan

        with self._read() as session:
            rows = self._assignments(session)
            associations = tuple(AssociationEntry(r.group_sid, r.group_name, r.pattern)
                                 for r in session.scalars(select(MachineAssociation)))
        usable = [r for r in rows if r.state is VersionState.DEPLOYABLE]
        for row in rows:
            if row.state is not VersionState.DEPLOYABLE:
                log.warning("not publishing %s:%s to %s: the version is %s", row.layer, row.version,
                            row.principal_name, row.state.value)
        versions = {r.version_id: PublishedVersion(r.layer_id, r.layer, r.os_layer_id, r.os_layer, r.version_id,
                                                   r.version, r.checksum) for r in usable}
        assignments = tuple(
            AssignmentEntry(r.principal_sid, "user" if r.principal_kind is PrincipalKind.AD_USER else "group",
                            r.principal_name, r.layer_id, r.version_id) for r in usable)
        return SyncPlan(tuple(versions.values()), assignments, associations)

    def resolve(self, user: str, machine: str) -> Resolution:
        """Which app layer versions ``user`` (a name, ``DOMAIN\\user``, UPN or SID) gets on ``machine``
        and why; raises :class:`NotFound` when no enabled junction knows the user, or the directory's
        error when none can be reached."""
        from app.services.directory import ask_about_user, enabled_junctions

        machine = validate_machine_name(machine)
        if not (user or "").strip():
            raise ValidationError("Name the user (user, DOMAIN\\user, user@domain or a SID).", field="user")
        with self._read() as session:
            junctions = enabled_junctions(session, self._ctx.secrets)
            assignments = self._assignments(session)
            associations = [AssociationRow(r.group_sid, r.group_name, r.pattern)
                            for r in session.scalars(select(MachineAssociation))]
        name, principal, membership = ask_about_user(junctions, user, membership_of)
        log.info("resolving elastic layers of %s on %s (junction %s, %d groups)",
                 principal.qualified_name, machine, name, len(membership.groups))
        return resolve_layers(membership, machine, assignments, associations)

    @staticmethod
    def _assignments(session: Session) -> list[AssignmentRow]:
        os_layer = aliased(Layer)
        query = (
            select(Layer.id, Layer.name, os_layer.name, LayerVersion.id, LayerVersion.name, LayerVersion.state,
                   LayerVersion.size_bytes, LayerVersion.checksum, ElasticAssignment.principal_kind,
                   ElasticAssignment.principal_sid, ElasticAssignment.principal_name, Layer.os_layer_id)
            .join(LayerVersion, LayerVersion.id == ElasticAssignment.version_id)
            .join(Layer, Layer.id == LayerVersion.layer_id)
            .outerjoin(os_layer, os_layer.id == Layer.os_layer_id)
        )
        return [AssignmentRow(*row) for row in session.execute(query)]


@dataclass(frozen=True)
class ElasticSyncResult(TaskResult):
    """What a finished :class:`ElasticSyncTask` wrote (the fields of :class:`~app.elastic.sync.SyncResult`)."""

    share: str = ""
    copied: tuple[str, ...] = ()
    kept: tuple[str, ...] = ()
    replaced: tuple[str, ...] = ()
    unchanged: tuple[str, ...] = ()
    deleted: tuple[str, ...] = ()
    bytes_copied: int = 0
    bytes_resumed: int = 0


class ElasticSyncTask(LayerDeskTask):
    """Writes the Elastic Layer repository to a share (:meth:`ElasticService.sync`) as a thread task.

    The password lives in this object only while it is needed and is forgotten when the task ends (or is
    canceled before it starts). ``failure`` keeps the error a failed sync raised, so a caller in the same
    process can report it as that error (the catalog keeps its message only)."""

    kind: ClassVar[str] = "elastic.sync"

    def __init__(self, service: ElasticService, share: str, username: str, password: str, *, comment: str = "",
                 fmt: LayerDiskFormat = "vhdx") -> None:
        super().__init__(f"Sync the Elastic Layer repository to {(share or '').strip()}")
        self._service = service
        self.share = share
        self.username = username
        self._password = password
        self.comment = comment
        self.format: LayerDiskFormat = fmt
        self.task_id: int | None = None
        self.failure: LayerDeskError | None = None

    def prepare(self) -> None:
        self._service.check_sync(self.share, self.username, self._password, self.comment)

    def discard(self) -> None:
        self._password = ""

    def run(self, ctx: TaskContext) -> TaskResult:
        from app.elastic.sync import SyncCanceled

        password, self._password = self._password, ""
        try:
            result = self._service.sync(self.share, self.username, password, comment=self.comment, fmt=self.format,
                                        progress=ctx.progress, cancel=ctx.cancel)
        except SyncCanceled as stopped:
            ctx.log(str(stopped), "WARNING")
            raise TaskCanceled() from None
        except LayerDeskError as failed:
            self.failure = failed
            raise
        finally:
            del password
        for disk in result.copied:
            ctx.log(f"Copied {disk}.")
        if result.bytes_resumed:
            ctx.log(f"{result.bytes_resumed} bytes came from interrupted uploads; {result.bytes_copied} were sent.")
        return ElasticSyncResult(
            summary=f"Synced {result.share}: {len(result.copied)} disk(s) copied ({result.bytes_copied} bytes), "
                    f"{len(result.kept)} already there.",
            share=result.share, copied=result.copied, kept=result.kept, replaced=result.replaced,
            unchanged=result.unchanged, deleted=result.deleted, bytes_copied=result.bytes_copied,
            bytes_resumed=result.bytes_resumed)
