"""The tensors of one layer group with their statistics; filterable by name."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import DataTable

from mergescope.tui.display import fmt_pct, heat, short
from mergescope.tui.report_view import tensors_of


class TensorTable(DataTable):
    """A row per tensor: shape, ‖τᵢ‖/‖θ₀‖ per model, the share of entries where the models' signs conflict
    and the cancellation 1 − ‖Στᵢ‖/Σ‖τᵢ‖."""

    def __init__(self, names: list[str], group: str | None, **kwargs) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)
        self.names, self.group = names, group
        self.filter = ""
        self.report: dict = {}

    def on_mount(self) -> None:
        self.add_column("tensor", key="tensor")
        self.add_column("shape", key="shape")
        for name in self.names:
            self.add_column(short(name, 8), key=name)
        self.add_column("conflict", key="conflict")
        self.add_column("cancel", key="cancel")

    def show(self, report: dict | None = None, filter_text: str | None = None) -> None:
        if report is not None:
            self.report = report
        if filter_text is not None:
            self.filter = filter_text.lower()
        tensors = [t for t in tensors_of(self.report, self.group) if self.filter in t["name"].lower()]
        cells = [t["delta"].get(n) for t in tensors for n in self.names]
        high = max((c["rel"] for c in cells if c and c.get("rel") is not None), default=0.0)
        self.clear()
        for entry in tensors:
            label = entry["name"].removeprefix(self.group + ".") if self.group else entry["name"].removeprefix("model.")
            row = [short(label, 26 if self.group else 36), Text("×".join(map(str, entry["shape"])), style="dim")]
            for name in self.names:
                delta = entry["delta"].get(name)
                row.append(heat(None if delta is None else delta.get("rel"), high))
            row += [fmt_pct(entry.get("conflict_all")), fmt_pct(entry.get("cancellation"))]
            self.add_row(*row, key=entry["name"])

    @property
    def current_tensor(self) -> str | None:
        if self.row_count == 0:
            return None
        key, _ = self.coordinate_to_cell_key(self.cursor_coordinate)
        return key.value
