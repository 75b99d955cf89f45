"""Elastic layer assignments (app layer versions → AD users and groups) and machine associations
(AD groups → machine-name patterns).

One version of a layer per principal: assigning another version of the same layer to the same user or
group replaces the earlier one (audited as such). Only deployable app layer versions are assigned.
"""

from __future__ import annotations

from sqlalchemy import select

from app.catalog.models import (
    ElasticAssignment,
    Layer,
    LayerType,
    LayerVersion,
    MachineAssociation,
    PrincipalKind,
    VersionState,
)
from app.errors import Conflict, NotFound, ValidationError
from app.services.base import Service, find_layer, find_version
from app.services.rbac import Operation
from app.services.validation import choice, validate_machine_pattern, validate_principal_name, validate_sid
from app.services.views import ElasticAssignmentInfo, MachineAssociationInfo

ASSIGNABLE = (PrincipalKind.AD_USER, PrincipalKind.AD_GROUP)


def _info(row: ElasticAssignment) -> ElasticAssignmentInfo:
    return ElasticAssignmentInfo(
        id=row.id,
        layer=row.version.layer.name,
        version=row.version.name,
        principal_kind=row.principal_kind,
        principal_sid=row.principal_sid,
        principal_name=row.principal_name,
        created_at=row.created_at,
        created_by=row.created_by,
    )


def _association(row: MachineAssociation) -> MachineAssociationInfo:
    return MachineAssociationInfo(row.id, row.group_sid, row.group_name, row.pattern, row.created_at, row.created_by)


class AssignmentService(Service):
    def list_assignments(
        self, *, layer: str | None = None, principal: str | None = None
    ) -> list[ElasticAssignmentInfo]:
        """``principal`` matches a SID or a name (ignoring case)."""
        with self._read() as session:
            # Plain columns in one joined query, not ORM objects: a catalog holds up to some 100,000
            # assignments, and building (and identity-mapping) an object per row plus its version
            # took seconds where the rows themselves take a tenth of a second.
            query = (
                select(
                    ElasticAssignment.id,
                    Layer.name,
                    LayerVersion.name,
                    ElasticAssignment.principal_kind,
                    ElasticAssignment.principal_sid,
                    ElasticAssignment.principal_name,
                    ElasticAssignment.created_at,
                    ElasticAssignment.created_by,
                )
                .join(LayerVersion, LayerVersion.id == ElasticAssignment.version_id)
                .join(Layer, Layer.id == LayerVersion.layer_id)
                .order_by(ElasticAssignment.principal_name, ElasticAssignment.id)
            )
            if layer:
                query = query.where(ElasticAssignment.layer_id == find_layer(session, layer).id)
            if principal:
                query = query.where(
                    (ElasticAssignment.principal_sid == principal.upper())
                    | (ElasticAssignment.principal_name == principal)
                )
            return [ElasticAssignmentInfo(*row) for row in session.execute(query)]

    def assign(
        self,
        ref: str,
        kind: PrincipalKind,
        sid: str,
        name: str,
        *,
        comment: str = "",
    ) -> ElasticAssignmentInfo:
        with self._change(
            Operation.EDIT_ELASTIC_ASSIGNMENTS, "elastic.assign", "elastic assignment", ref, comment
        ) as change:
            kind = choice(PrincipalKind, kind, "principal kind")
            if kind not in ASSIGNABLE:
                raise ValidationError("Elastic layers are assigned to AD users or AD groups.", field="kind")
            sid = validate_sid(sid)
            name = validate_principal_name(name)
            session = change.session
            version = find_version(session, ref)
            if version.layer.type is not LayerType.APP:
                raise ValidationError(
                    f"{version.layer.name!r} is a {version.layer.type.value} layer; only app layers are elastic."
                )
            if version.state is not VersionState.DEPLOYABLE:
                raise Conflict(
                    f"{version.qualified_name} is {version.state.value}; only deployable versions are assigned."
                )
            row = session.scalars(
                select(ElasticAssignment).where(
                    ElasticAssignment.layer_id == version.layer_id, ElasticAssignment.principal_sid == sid
                )
            ).one_or_none()
            if row is not None and row.version_id == version.id:
                raise Conflict(f"{version.qualified_name} is already assigned to {row.principal_name}.")
            before = row.version.qualified_name if row is not None else None
            if row is None:
                row = ElasticAssignment(layer_id=version.layer_id, principal_sid=sid)
                session.add(row)
            row.version = version
            row.version_id = version.id
            row.principal_kind = kind
            row.principal_name = name
            row.created_at = self._now()
            row.created_by = self.caller.username
            session.flush()
            change.object_name = f"{version.qualified_name} → {name}"
            change.details = {"sid": sid, "kind": kind.value, "replaced": before}
            return _info(row)

    def unassign(self, layer: str, principal: str, *, comment: str = "") -> None:
        """Remove a layer's assignment from a principal (by SID or name)."""
        with self._change(
            Operation.EDIT_ELASTIC_ASSIGNMENTS, "elastic.unassign", "elastic assignment", layer, comment
        ) as change:
            session = change.session
            layer_row = find_layer(session, layer)
            rows = session.scalars(
                select(ElasticAssignment).where(
                    ElasticAssignment.layer_id == layer_row.id,
                    (ElasticAssignment.principal_sid == principal.upper())
                    | (ElasticAssignment.principal_name == principal),
                )
            ).all()
            if not rows:
                raise NotFound(f"Layer {layer_row.name!r} is not assigned to {principal!r}.")
            if len(rows) > 1:
                raise ValidationError(
                    f"Layer {layer_row.name!r} is assigned to more than one principal named {principal!r} "
                    f"({', '.join(sorted(r.principal_sid for r in rows))}); name the one to remove by its SID."
                )
            row = rows[0]
            change.object_name = f"{row.version.qualified_name} → {row.principal_name}"
            change.details = {"sid": row.principal_sid}
            session.delete(row)

    # --- machine associations ------------------------------------------------------------------

    def list_machine_associations(self) -> list[MachineAssociationInfo]:
        with self._read() as session:
            rows = session.scalars(
                select(MachineAssociation).order_by(MachineAssociation.group_name, MachineAssociation.pattern)
            )
            return [_association(r) for r in rows]

    def add_machine_association(
        self, group_sid: str, group_name: str, pattern: str, *, comment: str = ""
    ) -> MachineAssociationInfo:
        with self._change(
            Operation.EDIT_ELASTIC_ASSIGNMENTS, "machine_association.add", "machine association", pattern, comment
        ) as change:
            sid = validate_sid(group_sid)
            pattern = validate_machine_pattern(pattern)
            group_name = validate_principal_name(group_name, "group name")
            session = change.session
            clash = session.scalars(
                select(MachineAssociation).where(
                    MachineAssociation.group_sid == sid, MachineAssociation.pattern == pattern
                )
            ).first()
            if clash is not None:
                raise Conflict(f"Group {clash.group_name} is already associated with {clash.pattern!r}.")
            row = MachineAssociation(
                group_sid=sid, group_name=group_name, pattern=pattern,
                created_at=self._now(), created_by=self.caller.username,
            )
            session.add(row)
            session.flush()
            change.object_name = f"{row.group_name} ↔ {pattern}"
            change.details = {"sid": sid}
            return _association(row)

    def remove_machine_association(self, association_id: int, *, comment: str = "") -> None:
        with self._change(
            Operation.EDIT_ELASTIC_ASSIGNMENTS, "machine_association.remove", "machine association",
            str(association_id), comment,
        ) as change:
            row = change.session.get(MachineAssociation, association_id)
            if row is None:
                raise NotFound(f"There is no machine association {association_id}.")
            change.object_name = f"{row.group_name} ↔ {row.pattern}"
            change.details = {"sid": row.group_sid}
            change.session.delete(row)
