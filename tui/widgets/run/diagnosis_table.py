"""The diagnosis per layer: for each source, what it keeps (retention), its cosine with the merge, and the
share of its change that sign conflicts removed."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import DataTable

from mergescope.tui.display import fmt_pct, fmt_signed, retention_text, short


def conflict_text(value: float | None) -> Text:
    """Share of ‖τᵢ‖² removed where another source pulled the other way; red from a half."""
    if value is None:
        return Text("—", style="dim")
    return Text(fmt_pct(value), style="bold red" if value >= 0.5 else "yellow" if value >= 0.2 else "")


class DiagnosisTable(DataTable):
    """Rows: layer groups in model order, then ``all``. Per source: keep ⟨τ_m,τᵢ⟩/‖τᵢ‖², cos(τ_m, τᵢ), and
    ``confl`` — of ‖τᵢ‖², the share at entries the merge zeroed or reversed while another source opposed it."""

    def __init__(self, names: list[str], **kwargs) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)
        self.names = names

    def on_mount(self) -> None:
        self.add_column("layer", key="layer")
        for name in self.names:
            label = short(name, 7)
            self.add_column(f"{label} keep", key=f"{name}:keep")
            self.add_column("cos", key=f"{name}:cos")
            self.add_column("confl", key=f"{name}:conflict")

    def add_group(self, group, label: str | None = None) -> None:
        """Append one :class:`~mergescope.analysis.diagnosis.GroupDiagnosis` (or the total)."""
        cells: list = [short(label or group.group.removeprefix("model."), 14)]
        for effect in group.sources:
            cells += [retention_text(effect.retention), fmt_signed(effect.cosine), conflict_text(effect.conflict)]
        key = label or group.group
        if key in self.rows:
            self.remove_row(key)
        self.add_row(*cells, key=key)
