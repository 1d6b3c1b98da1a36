"""`t`: the tokens each model added to or lost from the base's vocabulary (the analysis compares embedding and head
rows by token string; these rows are left out of its statistics)."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static

from mergescope.tui.report_view import model_names, token_changes

#: tokens listed per cell; the rest are counted
SHOWN = 12


def token_list(tokens: list[str]) -> str:
    shown = " ".join(tokens[:SHOWN])
    return shown + (f" … (+{len(tokens) - SHOWN})" if len(tokens) > SHOWN else "")


class TokensScreen(Screen):
    BINDINGS = [Binding("escape", "app.pop_screen", "Back")]

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(id="tokens-note")
        yield DataTable(id="tokens", cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = "tokens"
        report = self.app.state.report
        table = self.query_one("#tokens", DataTable)
        table.add_columns("model", "added", "lost", "added tokens", "lost tokens")
        differing = 0
        for name in model_names(report):
            changes = token_changes(report, name)
            added, lost = changes if changes is not None else ([], [])
            differing += bool(added or lost)
            table.add_row(Text(name, style="bold"), str(len(added)), str(len(lost)), token_list(added),
                          token_list(lost), key=name)
        shared = next((v.get("shared") for v in (report.get("vocabularies") or {}).values()), None)
        if not self.app.state.analysis_done:
            note = Text("the analysis is still running…", style="dim")
        elif shared is None:
            note = Text("every model has the base's vocabulary: rows are compared by id", style="green")
        else:
            note = Text(f"{differing} model(s) differ from the base's vocabulary; embeddings and heads are compared "
                        f"over the {shared} tokens all share. Merge them with tokenizer_source: union (or base, or a "
                        "model) in the plan.")
        self.query_one("#tokens-note", Static).update(note)
        table.focus()
