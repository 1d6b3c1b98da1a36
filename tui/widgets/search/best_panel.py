"""The search's best candidate so far: its score and values, and how the best score grew."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Sparkline, Static

from mergescope.merge.search_store import Trial, best_so_far, best_trial
from mergescope.tui.widgets.search.candidates_table import cell


def best_summary(keys: list[str], trials: list[Trial], total: int | None) -> Text:
    """``best 0.65 (#38 of 40) · models.0.weight 0.213 …`` or a waiting line."""
    best = best_trial(trials)
    done = f"{len(trials)} of {total}" if total else str(len(trials))
    if best is None:
        return Text(f"no candidate scored yet ({done} evaluated)", style="dim")
    text = Text()
    text.append(f"best {best.score:.4g}", style="bold green")
    text.append(f"  #{best.number} · {done} evaluated\n")
    for key, value in zip(keys, best.point):
        text.append(f"{key} = {cell(value)}\n", style="cyan")
    return text


class BestPanel(Vertical):
    """The best candidate's summary above a sparkline of the best score after each evaluation."""

    def compose(self) -> ComposeResult:
        yield Static(id="best-summary")
        yield Static("best score over evaluations", classes="dim")
        yield Sparkline([], id="best-curve")

    def show(self, keys: list[str], trials: list[Trial], total: int | None) -> None:
        self.query_one("#best-summary", Static).update(best_summary(keys, trials, total))
        self.query_one("#best-curve", Sparkline).data = best_so_far(trials)
