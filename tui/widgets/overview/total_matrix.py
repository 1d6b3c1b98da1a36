"""The whole model's pairwise matrix in one block, for the rows under the heatmap: cosine above the diagonal,
sign conflict below, short unique labels and their legend beside it."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.widgets import Static

from mergescope.tui.display import abbreviations
from mergescope.tui.report_view import pair_value
from mergescope.tui.widgets.overview.pair_matrices import _conflict_cell, _cosine_cell

#: characters per label (a cell is ``+0.42`` or ``12%``)
LABEL_WIDTH = 5


def total_matrix(names: list[str], total: dict | None) -> Table:
    """Row a, column b: cos(τ_a, τ_b) when b comes after a, the sign-conflict rate of the pair when before."""
    labels = abbreviations(names, LABEL_WIDTH)
    table = Table(box=None, pad_edge=False, padding=(0, 0, 0, 1), show_header=True, header_style="bold")
    table.add_column("all", no_wrap=True, header_style="dim")  # the scope: the whole model
    for label in labels:
        table.add_column(label, justify="right", no_wrap=True)
    for i, (a, label) in enumerate(zip(names, labels)):
        cells: list[Text | str] = [label]
        for j, b in enumerate(names):
            if total is None:
                cells.append(Text("…", style="dim"))
            elif j > i:
                cells.append(_cosine_cell(pair_value(total, a, b, "cosine"), False))
            elif j < i:
                cells.append(_conflict_cell(pair_value(total, a, b, "sign_conflict"), False))
            else:
                cells.append(Text("·", style="dim"))
        table.add_row(*cells)
    return table


def matrix_legend(names: list[str]) -> Text:
    """What the halves hold, then each label that is not its model's name (one line each: the legend is never
    taller than the matrix)."""
    text = Text("↗ cosine  ↙ sign conflict\n", style="dim")
    for name, label in zip(names, abbreviations(names, LABEL_WIDTH)):
        if label != name:
            text.append(f"{label}", style="bold")
            text.append(f" {name}\n")
    return text


def rows_needed(names: list[str]) -> int:
    """The lines :class:`TotalMatrix` takes: the matrix's header and rows (the legend beside it is no taller)."""
    return len(names) + 1


class TotalMatrix(Static):
    """:func:`total_matrix` with :func:`matrix_legend` to its right."""

    def __init__(self, names: list[str], **kwargs) -> None:
        super().__init__(**kwargs)
        self.names = names

    def show(self, report: dict) -> None:
        total = report.get("total") if report.get("groups") else None
        grid = Table.grid(padding=(0, 2))
        grid.add_column(no_wrap=True)
        grid.add_column()
        grid.add_row(total_matrix(self.names, total), matrix_legend(self.names))
        self.update(grid)
