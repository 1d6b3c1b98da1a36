"""Per-layer heatmap: rows are layer groups in model order, columns are models, cells the relative delta norm."""

from __future__ import annotations

from dataclasses import dataclass

from rich.text import Text
from textual.binding import Binding
from textual.message import Message
from textual.widgets import DataTable

from mergescope.tui.display import abbreviations, heat, short
from mergescope.tui.report_view import group_rel
from mergescope.tui.widgets.overview.total_matrix import LABEL_WIDTH


@dataclass
class LayerHighlighted(Message):
    """The heatmap's cursor moved to a layer group."""

    group: str  # the group's name in the report, e.g. ``model.layers.3``


class LayerHeatmap(DataTable):
    """‖τᵢ‖/‖θ₀‖ per layer group and model, coloured against the largest cell; Enter drills into a layer."""

    BINDINGS = [Binding("enter", "select_cursor", "Layer")]  # DataTable's own Enter, shown in the footer

    def __init__(self, names: list[str], groups: list[str], **kwargs) -> None:
        super().__init__(cursor_type="row", **kwargs)
        self.names, self.groups = names, groups

    def on_mount(self) -> None:
        self.add_column("layer", key="layer")
        for name, label in zip(self.names, abbreviations(self.names, LABEL_WIDTH)):
            self.add_column(label, key=name)
        for group in self.groups:
            self.add_row(short(_label(group), 18), *[Text("…", style="dim") for _ in self.names], key=group)

    def update_report(self, report: dict) -> None:
        groups = {g["name"]: g for g in report.get("groups", [])}
        values = [group_rel(g, n) for g in groups.values() for n in self.names]
        high = max((v for v in values if v is not None), default=0.0)
        for group, stats in groups.items():
            if group not in self.rows:
                continue
            for name in self.names:
                self.update_cell(group, name, heat(group_rel(stats, name), high), update_width=True)

    @property
    def current_group(self) -> str | None:
        if not self.groups or self.cursor_row < 0:
            return None
        return self.groups[min(self.cursor_row, len(self.groups) - 1)]

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.row_key.value is not None:
            self.post_message(LayerHighlighted(event.row_key.value))


def _label(group: str) -> str:
    """``model.layers.12`` → ``layers.12``: the leading ``model.`` says nothing."""
    return group.removeprefix("model.") if group.startswith("model.") and group != "model." else group
