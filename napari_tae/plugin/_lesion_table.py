"""The lesion table of the dock widget: a Qt model over the lesion list, and its view.

A model/view table (instead of one ``QTableWidgetItem`` per cell) makes a refresh O(1): Qt asks
only for the visible cells, so thousands of noise components at a low squash do not slow the
live update down.
"""

from __future__ import annotations

from typing import Any

from qtpy.QtCore import QAbstractTableModel, QModelIndex, Qt
from qtpy.QtWidgets import QAbstractItemView, QHeaderView, QTableView

from napari_tae.plugin.review import lesion_rows

__all__ = ["COLUMNS", "LesionTableModel", "lesion_table_view"]

COLUMNS = ("#", "mL", "voxels", "max", "mean", "z, y, x")
_TOOLTIPS = ("lesion id (1 = largest)", "volume in millilitres", "number of voxels",
             "largest residual in the lesion", "mean residual in the lesion",
             "centroid: voxel index (z, y, x)")
_WIDEST = ("999", "99.999", "99999", "0.000", "0.000", "999, 999, 999")


class LesionTableModel(QAbstractTableModel):
    """Rows of :func:`napari_tae.plugin.review.lesion_rows`, formatted only when shown."""

    def __init__(self) -> None:
        super().__init__()
        self._lesions: list[dict] = []
        self._cache: dict[int, tuple[str, ...]] = {}

    def set_lesions(self, lesions: list[dict]) -> None:
        self.beginResetModel()
        self._lesions = list(lesions)
        self._cache = {}
        self.endResetModel()

    def rowCount(self, parent: QModelIndex = QModelIndex()) -> int:  # noqa: B008 (Qt API)
        return 0 if parent.isValid() else len(self._lesions)

    def columnCount(self, parent: QModelIndex = QModelIndex()) -> int:  # noqa: B008
        return 0 if parent.isValid() else len(COLUMNS)

    def row(self, row: int) -> tuple[str, ...]:
        if row not in self._cache:
            self._cache[row] = lesion_rows([self._lesions[row]])[0]
        return self._cache[row]

    def data(self, index: QModelIndex, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if not index.isValid():
            return None
        if role == Qt.ItemDataRole.DisplayRole:
            return self.row(index.row())[index.column()]
        if role == Qt.ItemDataRole.TextAlignmentRole and index.column() < 5:
            return int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        return None

    def headerData(self, section: int, orientation: Qt.Orientation,
                   role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if orientation != Qt.Orientation.Horizontal:
            return None
        if role == Qt.ItemDataRole.DisplayRole:
            return COLUMNS[section]
        if role == Qt.ItemDataRole.ToolTipRole:
            return _TOOLTIPS[section]
        return None


def lesion_table_view(model: LesionTableModel) -> QTableView:
    """A compact read-only view that shows all six columns in a ~300 px wide dock."""
    view = QTableView()
    view.setModel(model)
    view.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
    view.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
    view.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
    view.verticalHeader().setVisible(False)
    view.verticalHeader().setDefaultSectionSize(20)
    header = view.horizontalHeader()
    # widths from typical contents, not ResizeToContents: that measures rows on every refresh
    metrics = view.fontMetrics()
    for col, sample in enumerate(_WIDEST):
        width = max(metrics.horizontalAdvance(sample), metrics.horizontalAdvance(COLUMNS[col]))
        header.resizeSection(col, width + 14)
    header.setSectionResizeMode(len(COLUMNS) - 1, QHeaderView.ResizeMode.Stretch)
    view.setMinimumHeight(120)
    # wide enough for all six columns beside a vertical scroll bar: the dock never hides one
    columns = sum(header.sectionSize(col) for col in range(len(COLUMNS)))
    view.setMinimumWidth(columns + view.verticalScrollBar().sizeHint().width()
                         + 2 * view.frameWidth() + 4)
    return view
