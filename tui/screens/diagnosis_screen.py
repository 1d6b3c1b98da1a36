"""Diagnosis of a merged model: per layer, what each source kept and what sign conflicts removed, with a
plain-words summary (see :class:`~mergescope.tui.widgets.run.diagnosis_view.DiagnosisView`)."""

from __future__ import annotations

from pathlib import Path

from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Footer, Header

from mergescope.tui.widgets.run.diagnosis_view import DiagnosisView


class DiagnosisScreen(Screen):
    BINDINGS = [Binding("escape", "back", "Back")]

    def __init__(self, merged_dir: Path | str) -> None:
        super().__init__()
        self.merged_dir = Path(merged_dir)

    def compose(self) -> ComposeResult:
        yield Header()
        state = self.app.state
        yield DiagnosisView(self.merged_dir, base=state.session.base, device=state.device, id="diagnosis")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = f"diagnosis: {self.merged_dir}"

    @property
    def view(self) -> DiagnosisView:
        return self.query_one(DiagnosisView)

    @property
    def diagnosis(self):
        return self.view.diagnosis

    @property
    def error(self) -> str | None:
        return self.view.error

    def action_back(self) -> None:
        self.app.pop_screen()
