"""Pairwise cosine and sign-conflict matrices, for the whole model and for the selected layer."""

from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual.widgets import Static

from mergescope.tui.display import abbreviations, fmt_pct, legend, short
from mergescope.tui.report_view import group_by_name, pair_value


def _cosine_cell(value: float | None, diagonal: bool) -> Text:
    if diagonal:
        return Text("·", style="dim")
    if value is None:
        return Text("—", style="dim")
    style = "red" if value < -0.1 else "green" if value > 0.3 else ""
    return Text(f"{value:+.2f}", style=style)


def _conflict_cell(value: float | None, diagonal: bool) -> Text:
    if diagonal:
        return Text("·", style="dim")
    if value is None:
        return Text("—", style="dim")
    return Text(fmt_pct(value), style="red" if value > 0.45 else "")


def matrix(title: str, names: list[str], scopes: list[tuple[str, dict | None]], key: str) -> Table:
    """One table: a row per model, for each scope (whole model, layer) a column block of the other models."""
    table = Table(title=title, title_justify="left", title_style="bold", box=None, pad_edge=False, padding=(0, 0, 0, 1))
    table.add_column("")
    labels = abbreviations(names, 5)
    for index, (scope, _) in enumerate(scopes):
        for j, header in enumerate(labels):
            table.add_column(f"{scope}\n{header}" if j == 0 else f"\n{header}", justify="right",
                             style="on grey15" if index % 2 else "")
    cell = _cosine_cell if key == "cosine" else _conflict_cell
    for a, label in zip(names, labels):
        row: list[Text | str] = [label]
        for _, stats in scopes:
            for b in names:
                row.append(cell(None if stats is None else pair_value(stats, a, b, key), a == b))
        table.add_row(*row)
    return table


class PairMatrices(Static):
    """cos(τᵢ, τⱼ) and the sign-conflict rate of each pair (entries where both moved, in opposite directions)."""

    def __init__(self, names: list[str], **kwargs) -> None:
        super().__init__(**kwargs)
        self.names = names
        self.report: dict = {}
        self.group: str | None = None

    def show(self, report: dict | None = None, group: str | None = None) -> None:
        if report is not None:
            self.report = report
        if group is not None:
            self.group = group
        self._draw()

    def on_resize(self) -> None:
        self._draw()

    def _draw(self) -> None:
        total = self.report.get("total") if self.report.get("groups") else None
        layer = group_by_name(self.report, self.group) if self.group else None
        label = (self.group or "layer").removeprefix("model.")
        self.update(matrices(self.names, [("all", total), (short(label, 12), layer)], self.size.width or None))


def matrix_width(models: int, scopes: int) -> int:
    """Columns a :func:`matrix` needs: a 6-wide name column, then 1 + 5 per cell (``+0.42``, ``12.3%``)."""
    return 6 + 6 * models * scopes


def matrices(names: list[str], scopes: list[tuple[str, dict | None]], width: int | None) -> Group:
    """The cosine and sign-conflict matrices, the scopes side by side when they fit in ``width`` (None: any
    width), one above the other otherwise (at 80 columns), so that every cell keeps its full number."""
    side_by_side = width is None or width >= matrix_width(len(names), len(scopes))
    blocks = [scopes] if side_by_side else [[scope] for scope in scopes]
    parts: list = []
    for title, key in (("cosine", "cosine"), ("sign conflict", "sign_conflict")):
        for block in blocks:
            parts += [matrix(title, names, block, key), Text("")]
    key = legend(names, abbreviations(names, 5))
    if key:
        parts.append(Text(key, style="dim"))
    return Group(*parts if key else parts[:-1])
