"""One tensor: each model's delta distribution, the energy kept at several densities, sign agreement."""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.message import Message
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


@dataclass
class TensorDetailRead(Message):
    """The tensor's detail, read from every model."""

    detail: TensorDetail


@dataclass
class TensorUnreadable(Message):
    """The tensor could not be read (a missing shard, a shape the detail cannot compare)."""

    tensor: str
    error: str


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
        except Exception as exc:  # a read error must not kill the app
            self.post_message(TensorUnreadable(self.tensor, str(exc)))
            return
        self.post_message(TensorDetailRead(detail))

    def on_tensor_detail_read(self, message: TensorDetailRead) -> None:
        self.query_one("#detail", Static).update(render_detail(message.detail))

    def on_tensor_unreadable(self, message: TensorUnreadable) -> None:
        failure = Text(f"cannot read {message.tensor}: {message.error}", style="bold red")
        self.query_one("#detail", Static).update(failure)

    def action_back(self) -> None:
        self.app.pop_screen()
