"""The pipeline table: the selected run's stages, one row each (state, progress, ETA, latest metrics)."""

from __future__ import annotations

from rich.cells import cell_len
from rich.text import Text
from textual.widgets import DataTable

from tui.widgets.text import clip


class PipelineTable(DataTable):
    def __init__(self, *, id: str):
        super().__init__(id=id, cursor_type="row", zebra_stripes=False)
        self.add_columns("stage", "state", "progress", "ETA", "latest")

    def show(self, stages: tuple) -> None:
        """`stages`: store_reader.StageRow. Column widths follow their cells (also when a cell is updated), and
        the last column is cut to the room the others leave, so no column is pushed out of sight."""
        rows = [[s.name, Text(f"{s.glyph} {s.state}", style=s.style), s.progress, s.eta, s.latest] for s in stages]
        labels = [str(column.label) for column in self.columns.values()]
        widths = [max([cell_len(labels[i])] + [cell_len(str(row[i])) for row in rows]) for i in range(4)]
        # each column has one cell of padding either side
        room = (self.scrollable_content_region.width or 40) - sum(widths) - 2 * len(labels)
        for row in rows:
            row[4] = clip(row[4], max(room, cell_len(labels[4])))
        if self.row_count != len(rows):
            self.clear()
            for row in rows:
                self.add_row(*row, key=row[0])
        else:
            for row in rows:
                for column, value in zip(self.columns, row):
                    self.update_cell(row[0], column, value, update_width=True)
