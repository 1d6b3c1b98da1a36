"""Shown over everything while the terminal is smaller than the 80x24 the screens are laid out for."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Label

#: the smallest terminal every screen is laid out for: 80x24, less the rows a tmux or screen status line
#: (or two) takes, so an 80x24 terminal running tmux is not told it is too small
MIN_WIDTH, MIN_HEIGHT = 80, 22


def too_small(width: int, height: int) -> bool:
    return width < MIN_WIDTH or height < MIN_HEIGHT


class TooSmallScreen(ModalScreen[None]):
    """Says the terminal's size and the size needed; goes away by itself once the terminal is large enough
    (Escape: carry on anyway)."""

    BINDINGS = [Binding("escape", "dismiss", "Carry on")]

    def compose(self) -> ComposeResult:
        with Vertical(id="too-small"):
            yield Label("", id="too-small-size")
            yield Label(f"mergescope needs {MIN_WIDTH}x{MIN_HEIGHT}: enlarge the terminal", id="too-small-need")
            yield Label("Escape: carry on anyway (columns will be cut)", classes="dim")

    def on_mount(self) -> None:
        self.show_size()

    def on_resize(self) -> None:
        self.show_size()

    def show_size(self) -> None:
        width, height = self.app.size
        self.query_one("#too-small-size", Label).update(f"the terminal is {width}x{height}: too small")

    def action_dismiss(self) -> None:
        self.dismiss(None)
