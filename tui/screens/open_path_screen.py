"""Asks for a path (a merged folder, a plan file) and answers it, or None on Escape."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Label


class OpenPathScreen(ModalScreen[str | None]):
    """One line of input: Enter answers the path typed, Escape answers None."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, question: str, start: str = "") -> None:
        super().__init__()
        self.question, self.start = question, start

    def compose(self) -> ComposeResult:
        with Vertical(id="open-path"):
            yield Label(self.question)
            yield Input(self.start, id="open-path-input")
            yield Label("Enter: open · Escape: cancel", classes="dim")

    def on_mount(self) -> None:
        self.query_one(Input).focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip() or None)

    def action_cancel(self) -> None:
        self.dismiss(None)
