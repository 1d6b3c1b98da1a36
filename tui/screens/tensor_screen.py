"""One tensor: each model's delta distribution, the energy kept at several densities, sign agreement."""

from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Header, Static

from mergescope.analysis.tensor_detail import TensorDetail, tensor_detail
from mergescope.tui.display import fmt_pct, short, sparkline


def render_detail(detail: TensorDetail) -> Group:
    """Histograms as block sparklines (√count, so the tails show), energy-kept table, sign breakdown."""
    parts: list = []
    sample = f" (a sample of {detail.sampled:,} entries)" if detail.sampled else ""
    shape = "×".join(map(str, detail.shape))
    parts.append(Text(f"{detail.name}  {shape}  {detail.entries:,} entries{sample}", style="bold"))
    histogram = Table(box=None, show_header=False, padding=(0, 1))
    histogram.add_column("model")
    histogram.add_column("histogram", style="cyan", no_wrap=True)
    for name, counts in zip(detail.names, detail.histograms):
        histogram.add_row(short(name, 10), sparkline([c ** 0.5 for c in counts]))
    limits = f"[−{detail.limit:.2e}, +{detail.limit:.2e}]"
    parts += [Text(""), Text(f"Δ distribution over {limits} (height √count)", style="bold"), histogram]
    energy = Table(box=None, padding=(0, 1))
    energy.add_column("model")
    for density in detail.energy_kept:
        energy.add_column(f"d={density:g}", justify="right")
    for i, name in enumerate(detail.names):
        energy.add_row(short(name, 10), *[fmt_pct(values[i]) for values in detail.energy_kept.values()])
    energy_title = Text("‖τ‖² kept by the largest entries (what a TIES trim at density d keeps)", style="bold")
    parts += [Text(""), energy_title, energy]
    total = sum(detail.signs.values()) or 1
    signs = Text("sign agreement over entries: ", style="bold")
    for key, label, style in (("agree", "all agree", "green"), ("conflict", "conflict", "red"),
                              ("one", "one model moved", ""), ("none", "none moved", "dim")):
        signs.append(f"{label} {detail.signs.get(key, 0) / total:.0%}  ", style=style)
    parts += [Text(""), signs]
    return Group(*parts)


class TensorScreen(Screen):
    BINDINGS = [Binding("escape", "back", "Back")]

    def __init__(self, tensor: str) -> None:
        super().__init__()
        self.tensor = tensor

    def compose(self) -> ComposeResult:
        yield Header()
        with VerticalScroll():
            yield Static(Text(f"reading {self.tensor}…", style="dim"), id="detail")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = self.tensor
        self.load_detail()

    @work(thread=True, exclusive=True)
    def load_detail(self) -> None:
        state = self.app.state
        try:
            detail = tensor_detail(state.session.base, state.session.models, state.names, self.tensor)
            renderable = render_detail(detail)
        except Exception as exc:  # a read error must not kill the app
            renderable = Text(f"cannot read {self.tensor}: {exc}", style="bold red")
        self.app.call_from_thread(self.query_one("#detail", Static).update, renderable)

    def action_back(self) -> None:
        self.app.pop_screen()
