"""The diagnosis per layer: for each source, what it keeps (retention), its cosine with the merge, and the
share of its change that sign conflicts removed."""

from __future__ import annotations

from rich.text import Text
from textual.binding import Binding
from textual.widgets import DataTable

from mergescope.tui.display import abbreviations, fmt_pct, fmt_signed, retention_text, short


def conflict_text(value: float | None) -> Text:
    """Share of ‖τᵢ‖² removed where another source pulled the other way; red from a half."""
    if value is None:
        return Text("—", style="dim")
    return Text(fmt_pct(value), style="bold red" if value >= 0.5 else "yellow" if value >= 0.2 else "")


def opponent_text(conflict_with: dict[str, float], labels: dict[str, str]) -> Text:
    """Whom the source lost to: the source whose opposition cost it the largest share (its short label)."""
    if not conflict_with:
        return Text("—", style="dim")
    name, share = max(conflict_with.items(), key=lambda item: item[1])
    return Text(labels.get(name, name), style="bold" if share >= 0.2 else "")


class DiagnosisTable(DataTable):

    """Rows: layer groups in model order, then ``all``. Per source: keep ⟨τ_m,τᵢ⟩/‖τᵢ‖², cos(τ_m, τᵢ),
    ``confl`` — of ‖τᵢ‖², the share at entries the merge zeroed or reversed while another source opposed it —
    and ``with``: the source that opposed it most. The layer column stays while ←/→ scroll the sources."""

    BINDINGS = [Binding("right", "scroll_right", "Next source", show=False),
                Binding("left", "scroll_left", "Previous source", show=False)]

    def __init__(self, names: list[str], **kwargs) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, fixed_columns=1, header_height=2, **kwargs)
        self.names = names
        self.labels = dict(zip(names, abbreviations(names, 5)))

    def on_mount(self) -> None:
        self.add_column("layer", key="layer")
        for name in self.names:
            self.add_column(f"{self.labels[name]}\nkeep", key=f"{name}:keep")
            self.add_column("\ncos", key=f"{name}:cos")
            self.add_column("\nconfl", key=f"{name}:conflict")
            self.add_column("\nwith", key=f"{name}:with")

    def source_offsets(self) -> list[int]:
        """The horizontal scroll offset that puts each source's block just right of the layer column."""
        x, fixed, offsets = 0, 0, []
        for index, column in enumerate(self.ordered_columns):
            if index == 0:
                fixed = column.get_render_width(self)
            elif str(column.key.value).endswith(":keep"):
                offsets.append(x - fixed)
            x += column.get_render_width(self)
        return offsets

    def action_scroll_right(self) -> None:
        """→: the next source's block (the layer column stays)."""
        later = [x for x in self.source_offsets() if x > self.scroll_x]
        self.scroll_to(x=min(later[0], self.max_scroll_x) if later else self.max_scroll_x, animate=False)

    def action_scroll_left(self) -> None:
        """←: the previous source's block."""
        earlier = [x for x in self.source_offsets() if x < self.scroll_x]
        self.scroll_to(x=earlier[-1] if earlier else 0, animate=False)

    def add_group(self, group, label: str | None = None) -> None:
        """Append one :class:`~mergescope.analysis.diagnosis.GroupDiagnosis` (or the total)."""
        cells: list = [short(label or group.group.removeprefix("model."), 12)]
        for effect in group.sources:
            cells += [retention_text(effect.retention), fmt_signed(effect.cosine), conflict_text(effect.conflict),
                      opponent_text(effect.conflict_with, self.labels)]
        key = label or group.group
        if key in self.rows:
            self.remove_row(key)
        self.add_row(*cells, key=key)
