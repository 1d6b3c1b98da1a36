"""The session's merges side by side with the base and the fine-tunes (`h`): demo scores per task, what each
merge's exact preview said every source keeps, and the highlighted merge's plan against the plan it started
from."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static

from mergescope.tui.display import abbreviations, retention_text, short
from mergescope.tui.history import plan_diff
from mergescope.tui.state import BASE_KEY
from mergescope.tui.widgets.overview.models_table import score_text


def diff_text(lines: list[str]) -> Text:
    text = Text()
    for line in lines:
        style = "green" if line.startswith("+") else "red" if line.startswith("-") else "dim"
        text.append(line + "\n", style=style)
    return text


class HistoryScreen(Screen):
    BINDINGS = [Binding("escape", "back", "Back")]

    def compose(self) -> ComposeResult:
        yield Header()
        yield DataTable(id="history", cursor_type="row", zebra_stripes=True, fixed_columns=1, header_height=2)
        yield Static("", id="history-diff")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = "merges of this session"
        self.app.scores_changed.subscribe(self, lambda _: self.redraw())
        self.redraw()
        self.query_one("#history", DataTable).focus()

    def redraw(self) -> None:
        state = self.app.state
        table = self.query_one("#history", DataTable)
        cursor = table.cursor_row
        table.clear(columns=True)
        tasks = list(dict.fromkeys(t for scores in state.demo_scores.values() for t in scores))
        sources = list(dict.fromkeys(s for record in state.history for s in record.retention))
        labels = dict(zip(sources, abbreviations(sources, 5)))
        table.add_column("model or merge\n", key="name")
        for task in tasks:
            table.add_column(f"{task[:4]}\nacc", key=task)
        for source in sources:
            table.add_column(f"{labels[source]}\nkept", key=f"keep:{source}")
        blank = [Text("") for _ in sources]
        for key, name in [(BASE_KEY, "base"), *((n, n) for n in state.names)]:
            if key in state.demo_scores or not tasks:
                scores = state.demo_scores.get(key, {})
                table.add_row(Text(short(name, 20)), *[score_text(scores.get(t)) for t in tasks], *blank, key=key)
        for index, record in enumerate(state.history):
            label = Text(f"{short(record.output.name, 12)} ({record.method})", style="bold")
            scores = record.scores or {}
            cells = [score_text(scores.get(t)) if record.status == "done" else Text(record.status, style="dim")
                     for t in tasks]
            table.add_row(label, *cells, *[retention_text(record.retention.get(s)) for s in sources],
                          key=f"merge:{index}")
        if table.row_count:
            table.move_cursor(row=min(max(cursor, 0), table.row_count - 1))
        self.show_diff()

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self.show_diff()

    def show_diff(self) -> None:
        """The highlighted merge's plan against the plan it started from (the latest merge when a model row is
        highlighted)."""
        state, table = self.app.state, self.query_one("#history", DataTable)
        panel = self.query_one("#history-diff", Static)
        if not state.history:
            panel.update(Text("no merge yet: p builds a plan, r runs it", style="dim"))
            return
        key = table.coordinate_to_cell_key((table.cursor_row, 0)).row_key.value if table.row_count else None
        index = int(key.split(":")[1]) if key and key.startswith("merge:") else len(state.history) - 1
        record = state.history[index]
        lines = plan_diff(record.started_from, record.plan_text)
        head = Text(f"{record.output}: its plan against the plan it started from", style="bold")
        panel.update(Text.assemble(head, "\n", diff_text(lines) if lines else Text("the same plan", style="dim")))

    def action_back(self) -> None:
        self.app.pop_screen()
