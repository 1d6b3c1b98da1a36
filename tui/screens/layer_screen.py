"""Layer drill-down: the tensors of one layer group (or of the whole model, from `/` on the overview);
Enter opens a tensor, / filters by name."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Input

from mergescope.tui.screens.tensor_screen import TensorScreen
from mergescope.tui.widgets.layer.tensor_table import TensorTable


class LayerScreen(Screen):
    BINDINGS = [
        Binding("escape", "back", "Back"),
        Binding("slash", "filter", "Filter"),
        Binding("enter", "open_tensor", "Tensor", show=True),
    ]

    def __init__(self, group: str | None, filter_first: bool = False) -> None:
        super().__init__()
        self.group = group
        self.filter_first = filter_first

    def compose(self) -> ComposeResult:
        yield Header()
        yield Input(placeholder="filter tensors by name (Enter to apply, Escape to close)", id="filter")
        yield TensorTable(self.app.state.names, self.group, id="tensors")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = f"layer {self.group}" if self.group else "all tensors"
        self.query_one("#filter").display = False
        self.app.analysis_changed.subscribe(self, self.refresh_table)
        self.refresh_table()
        self.query_one(TensorTable).focus()
        if self.filter_first:
            self.action_filter()

    def refresh_table(self, _=None) -> None:
        self.query_one(TensorTable).show(self.app.state.report)

    def action_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.display = True
        box.focus()

    def on_input_changed(self, event: Input.Changed) -> None:
        self.query_one(TensorTable).show(filter_text=event.value)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.query_one(TensorTable).focus()

    def action_back(self) -> None:
        box = self.query_one("#filter", Input)
        if box.has_focus:
            box.display = bool(box.value)
            self.query_one(TensorTable).focus()
            return
        self.app.pop_screen()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        self.action_open_tensor()

    def action_open_tensor(self) -> None:
        tensor = self.query_one(TensorTable).current_tensor
        if tensor is not None:
            self.app.push_screen(TensorScreen(tensor))
