"""A sparkline per model: its delta norm over depth (numbered layers, shallow to deep)."""

from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual.widgets import Static

from mergescope.tui.display import short, sparkline
from mergescope.tui.report_view import depth_profile


class DepthSparklines(Static):
    """Where in depth each fine-tune moved its weights: ‖τᵢ‖/‖θ₀‖ per numbered layer, one block each."""

    def __init__(self, names: list[str], **kwargs) -> None:
        super().__init__(**kwargs)
        self.names = names

    def show(self, report: dict) -> None:
        table = Table(box=None, show_header=False, pad_edge=False, padding=(0, 1))
        table.add_column("model")
        table.add_column("depth", style="cyan", no_wrap=True)
        profiles = {name: depth_profile(report, name) for name in self.names}
        top = max((v for p in profiles.values() for v in p if v is not None), default=0.0)
        for name, profile in profiles.items():
            table.add_row(short(name, 8), sparkline(profile, top) or "—")
        self.update(Group(Text("Δ over depth (‖τ‖/‖θ₀‖ per layer, one scale)", style="bold"), table))
