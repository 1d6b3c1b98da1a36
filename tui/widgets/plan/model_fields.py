"""One model in the plan builder: a checkbox (merged or not) and its per-model parameter fields."""

from __future__ import annotations

from dataclasses import dataclass

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import Checkbox, Input, Label

from mergescope.tui.display import short
from mergescope.tui.plan_document import ModelRow
from mergescope.tui.widgets.tick_box import TickBox


@dataclass
class ModelFieldsChanged(Message):
    """The user ticked or unticked a model, or edited one of its parameters."""

    index: int  # the model's row in the plan form
    model: str  # its reference, as the plan names it
    included: bool  # whether the plan merges it
    parameter: str | None  # the parameter edited; None when the checkbox changed
    text: str  # the parameter's text as typed (YAML); "" for the checkbox


class ModelFields(Vertical):
    """A model's checkbox and parameter fields; every edit is posted as a :class:`ModelFieldsChanged`."""

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
        yield TickBox(short(self.row.name, 30), self.row.included, compact=True, id=f"use-{self.index}")
        for name, text in self.row.fields.items():
            with Horizontal():
                yield Label(name, classes="param-label")
                yield Input(text, placeholder="default", compact=True, name=name, id=f"param-{self.index}-{name}",
                            classes="param-input")

    def on_checkbox_changed(self, event: Checkbox.Changed) -> None:
        event.stop()
        self.post_message(ModelFieldsChanged(self.index, self.row.reference, event.value, None, ""))

    def on_input_changed(self, event: Input.Changed) -> None:
        event.stop()
        included = self.query_one(Checkbox).value
        self.post_message(ModelFieldsChanged(self.index, self.row.reference, included, event.input.name, event.value))
