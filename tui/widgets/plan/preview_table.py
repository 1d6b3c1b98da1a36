"""The plan preview: per layer, the merged task vector's norm and what each model retains of its own."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import DataTable

from mergescope.tui.display import abbreviations, retention_text, short


class PreviewTable(DataTable):
    """Rows: layer groups, then a whole-model row. Columns: ‖τ_m‖ (relative to ‖θ₀‖ once the analysis is
    complete; the heading says which) and, per model, its retention
    ⟨τ_m, τᵢ⟩/‖τᵢ‖² (red below 1/3: the merge keeps less than a third of that fine-tune there)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, fixed_columns=1, **kwargs)
        self.names: list[str] = []
        self.norm_heading = ""

    def show(
        self, names: list[str], rows: list[tuple[str, str, list[float | None]]], norm_heading: str = "‖τm‖"
    ) -> None:
        """``rows``: (layer label, merged norm as text, retention per model); ``norm_heading`` the norm's unit."""
        if names != self.names or norm_heading != self.norm_heading:
            self.clear(columns=True)
            self.names = list(names)
            self.norm_heading = norm_heading
            self.add_column("layer", key="layer")
            self.add_column("‖τm‖", key="norm")  # its unit is in the status line above (narrow at 80 columns)
            for name, label in zip(names, abbreviations(names, 5)):
                self.add_column(label, key=name)
        cursor = self.cursor_row
        self.clear()
        for label, norm, retention in rows:
            norm_text = Text(norm, style="bold" if label == "all" else "")
            self.add_row(short(label, 10), norm_text, *[retention_text(r) for r in retention], key=label)
        if rows:
            self.move_cursor(row=min(max(cursor, 0), len(rows) - 1))
