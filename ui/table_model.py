"""A table model over a list of immutable service records, updated by id (never by row number)."""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, TypeVar

from PySide6.QtCore import QAbstractTableModel, QModelIndex, QPersistentModelIndex, Qt

R = TypeVar("R")
Index = QModelIndex | QPersistentModelIndex


def _sortable(value: Any) -> Any:
    """A value Qt can compare: it cannot order Python objects such as datetimes."""
    if isinstance(value, datetime):
        return value.timestamp()
    if value is None:
        return ""
    if isinstance(value, bool | int | float | str):
        return value
    return str(value)


class ItemRole(enum.IntEnum):
    #: The record (a frozen dataclass from app.services.views) behind the row.
    RECORD = Qt.ItemDataRole.UserRole + 1
    #: A value that sorts naturally (numbers as numbers, dates as dates).
    SORT = Qt.ItemDataRole.UserRole + 2


@dataclass(frozen=True)
class Column(Generic[R]):
    header: str
    text: Callable[[R], str]
    sort: Callable[[R], Any] | None = None
    tooltip: Callable[[R], str] | None = None


class RecordTableModel(QAbstractTableModel, Generic[R]):
    def __init__(self, columns: Sequence[Column[R]], key: Callable[[R], Any], parent: Any = None) -> None:
        super().__init__(parent)
        self._columns = list(columns)
        self._key = key
        self._records: list[R] = []
        self._rows: dict[Any, int] = {}

    # --- Qt API --------------------------------------------------------------------------------

    def rowCount(self, parent: Index = QModelIndex()) -> int:  # noqa: B008 - Qt's signature
        return 0 if parent.isValid() else len(self._records)

    def columnCount(self, parent: Index = QModelIndex()) -> int:  # noqa: B008
        return 0 if parent.isValid() else len(self._columns)

    def data(self, index: Index, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if not index.isValid() or not 0 <= index.row() < len(self._records):
            return None
        record = self._records[index.row()]
        column = self._columns[index.column()]
        if role == Qt.ItemDataRole.DisplayRole:
            return column.text(record)
        if role == ItemRole.RECORD:
            return record
        if role == ItemRole.SORT:
            return _sortable(column.sort(record) if column.sort else column.text(record))
        if role == Qt.ItemDataRole.ToolTipRole and column.tooltip:
            return column.tooltip(record)
        return None

    def headerData(
        self, section: int, orientation: Qt.Orientation, role: int = Qt.ItemDataRole.DisplayRole
    ) -> Any:
        horizontal = orientation == Qt.Orientation.Horizontal
        if role == Qt.ItemDataRole.DisplayRole and horizontal and 0 <= section < len(self._columns):
            return self._columns[section].header
        return None

    # --- updates -------------------------------------------------------------------------------

    def records(self) -> list[R]:
        return list(self._records)

    def row_of(self, key: Any) -> int | None:
        return self._rows.get(key)

    def replace(self, records: Sequence[R]) -> None:
        """Make the model hold ``records``: rows whose id vanished are removed, changed ones updated
        in place (selection and scroll position survive), new ones appended."""
        incoming = {self._key(r): r for r in records}
        gone = [k for k in self._rows if k not in incoming]
        if len(gone) > 100:
            # Many rows vanished (a new filter, a purge): one reset is cheaper than many removals.
            self.beginResetModel()
            self._records = list(records)
            self._reindex()
            self.endResetModel()
            return
        for key in gone:
            row = self._rows[key]
            self.beginRemoveRows(QModelIndex(), row, row)
            del self._records[row]
            self._reindex()
            self.endRemoveRows()
        for key, record in incoming.items():
            row = self._rows.get(key)
            if row is None:
                continue
            if self._records[row] != record:
                self._records[row] = record
                self.dataChanged.emit(self.index(row, 0), self.index(row, len(self._columns) - 1))
        new = [r for k, r in incoming.items() if k not in self._rows]
        if new:
            first = len(self._records)
            self.beginInsertRows(QModelIndex(), first, first + len(new) - 1)
            self._records.extend(new)
            self._reindex()
            self.endInsertRows()

    def _reindex(self) -> None:
        self._rows = {self._key(r): i for i, r in enumerate(self._records)}
