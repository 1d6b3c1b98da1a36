"""A parameter search (``mergescope inspect SEARCH.db``): its candidates, the best so far, how the best score
grew, and what the best plan keeps of each model.

The search file is read again every :data:`POLL_S` seconds on a thread worker (SQLite in WAL mode lets a
reader in while ``mergescope tune`` writes), so a running search fills in as it goes. When the best
candidate changes, its plan is previewed (:func:`~mergescope.tui.plan_preview.preview_rows`: per layer
group, each model's retention ⟨τ_m, τᵢ⟩/‖τᵢ‖², computed with the executor's own tensor functions).
``b`` opens the best plan in the plan builder; ``s`` sorts by score or by candidate number.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, Header, Static

from mergescope.checkpoints import MergescopeError
from mergescope.merge.plan import parse_plan
from mergescope.merge.search_store import Trial, best_trial, open_for_reading
from mergescope.tui.plan_preview import Row, norm_unit_note, preview_rows
from mergescope.tui.screens.plan_screen import PlanScreen
from mergescope.tui.widgets.plan.preview_table import PreviewTable
from mergescope.tui.widgets.search.best_panel import BestPanel
from mergescope.tui.widgets.search.candidates_table import CandidatesTable

#: seconds between two reads of the search file
POLL_S = 1.0


@dataclass
class SearchRead:
    """The search file as last read."""

    settings: dict
    trials: list[Trial]


@dataclass
class SearchFileRead(Message):
    """The poll worker read the search file (or could not: ``problem``)."""

    read: SearchRead | None
    problem: str | None = None


@dataclass
class BestPreviewUpdated(Message):
    """The best plan's preview has more rows (sampled, then exact)."""

    number: int  # the candidate previewed
    cancel: threading.Event  # the preview's own; set once a newer one superseded it
    status: str
    names: list[str]
    rows: list[Row]
    norm_heading: str


class SearchScreen(Screen):
    BINDINGS = [
        Binding("escape", "back", "Back"),
        Binding("s", "sort", "Sort by score/number"),
        Binding("b", "open_best", "Best plan in the builder"),
    ]

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = Path(path)
        self.read: SearchRead | None = None
        self.previewed: int | None = None
        self._cancel = threading.Event()

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal():
            with Vertical(id="search-side"):
                yield BestPanel(id="best-panel")
                yield Static(Text("retention of the best plan: …", style="dim"), id="best-preview-status")
                yield PreviewTable(id="best-preview")
            yield CandidatesTable(id="candidates")
        yield Static("", id="search-status")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = f"search {self.path.name}"
        self.poll()
        self.set_interval(POLL_S, self.poll)
        self.app.analysis_changed.subscribe(self, self._analysis_changed)

    def _analysis_changed(self, report: dict) -> None:
        """The analysis finished: preview the best plan again, now in units of ‖θ₀‖."""
        if self.app.state.analysis_done and self.read is not None:
            self._preview(best_trial(self.read.trials))

    @work(thread=True, exclusive=True, group="search-poll")
    def poll(self) -> None:
        try:
            settings, trials = open_for_reading(self.path)
            self.post_message(SearchFileRead(SearchRead(settings, trials)))
        except MergescopeError as exc:
            self.post_message(SearchFileRead(None, str(exc)))

    def on_search_file_read(self, message: SearchFileRead) -> None:
        status = self.query_one("#search-status", Static)
        if message.read is None:
            status.update(Text(message.problem or "", style="red"))
            return
        self.read = message.read
        settings, trials = message.read.settings, message.read.trials
        keys = list(settings.get("vary", []))
        self.query_one(CandidatesTable).show(keys, trials)
        self.query_one(BestPanel).show(keys, trials, settings.get("budget"))
        failed = sum(t.status != "ok" for t in trials)
        nodes = len({t.node for t in trials})
        status.update(Text(f"{settings.get('strategy', '?')} search · seed {settings.get('seed')} · "
                           f"{len(trials)} evaluated, {failed} not scored · {nodes} node(s) · "
                           f"eval: {settings.get('eval_cmd', '')}", style="dim"))
        best = best_trial(trials)
        if best is not None and best.number != self.previewed:
            self._preview(best)

    def _preview(self, best: Trial | None) -> None:
        if best is None:
            return
        self.previewed = best.number
        self._cancel.set()
        self._cancel = threading.Event()
        self.preview_best(best, self._cancel)

    @work(thread=True, exclusive=True, group="best-preview")
    def preview_best(self, best: Trial, cancel: threading.Event) -> None:
        try:
            plan = parse_plan(best.plan, f"candidate {best.number}")
            for status, names, rows, _warnings, heading in preview_rows(self.app.state, plan, cancel):
                if cancel.is_set():
                    return
                self.post_message(BestPreviewUpdated(best.number, cancel, status, names, rows, heading))
        except (MergescopeError, ValueError) as exc:
            if not cancel.is_set():
                self.post_message(BestPreviewUpdated(best.number, cancel, f"no preview: {exc}", [], [], ""))

    def on_best_preview_updated(self, message: BestPreviewUpdated) -> None:
        if message.number != self.previewed or message.cancel.is_set():  # a newer preview is on its way
            return
        self.query_one("#best-preview-status", Static).update(
            Text(f"#{message.number} · {message.status}{norm_unit_note(message.norm_heading)}",
                 style="green" if "exact" in message.status else "yellow"))
        if message.names:
            self.query_one("#best-preview", PreviewTable).show(message.names, message.rows, message.norm_heading)

    def action_sort(self) -> None:
        table = self.query_one(CandidatesTable)
        table.by_score = not table.by_score
        if self.read is not None:
            table.show(list(self.read.settings.get("vary", [])), self.read.trials)
        self.notify("sorted by score" if table.by_score else "sorted by candidate number")

    def action_open_best(self) -> None:
        best = best_trial(self.read.trials) if self.read is not None else None
        if best is None:
            self.notify("no candidate scored yet", severity="warning")
            return
        try:
            plan = parse_plan(best.plan, f"candidate {best.number}")
        except MergescopeError as exc:
            self.notify(str(exc), severity="error")
            return
        save_as = self.path.with_name(f"{self.path.stem}.candidate-{best.number}.yml")
        self.app.push_screen(PlanScreen(save_as, plan=plan))

    def action_back(self) -> None:
        self._cancel.set()
        if len(self.app.screen_stack) > 2:
            self.app.pop_screen()
