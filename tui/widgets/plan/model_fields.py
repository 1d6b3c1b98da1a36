"""One model in the plan builder: a checkbox (merged or not) and its per-model parameter fields."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Checkbox, Input, Label

from mergescope.tui.display import short
from mergescope.tui.plan_document import ModelRow


class ModelFields(Vertical):
    """Fields are named ``<row index>:<parameter>`` so the screen can route an edit to its value."""

    DEFAULT_CSS = """
    ModelFields { height: auto; margin-top: 1; }
    ModelFields Checkbox { width: 1fr; }
    ModelFields Horizontal { height: auto; }
    ModelFields .param-label { width: 10; padding: 0 0 0 2; color: $text-muted; }
    ModelFields Input { width: 1fr; }
    """

    def __init__(self, index: int, row: ModelRow, **kwargs) -> None:
        super().__init__(**kwargs)
        self.index, self.row = index, row

    def compose(self) -> ComposeResult:
        yield Checkbox(short(self.row.name, 30), self.row.included, compact=True, id=f"use-{self.index}")
        for name, text in self.row.fields.items():
            with Horizontal():
                yield Label(name, classes="param-label")
                yield Input(text, placeholder="default", compact=True, id=f"param-{self.index}-{name}", classes="param-input")
