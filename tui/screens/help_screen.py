"""`?`: the keys, and what each screen shows."""

from __future__ import annotations

from rich.table import Table
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

KEYS = (
    ("Tab / Shift+Tab", "move between panes (in a narrow terminal the pane shown follows the focus)"),
    ("↑ ↓ PgUp PgDn", "move in a table"),
    ("Enter", "drill down: layer → its tensors → one tensor"),
    ("Escape", "back"),
    ("/", "filter the tensors of a layer by name"),
    ("p", "plan builder: method, base, parameters, live retention preview"),
    ("s", "save the plan (mergekit YAML) — in the plan builder"),
    ("r", "run the plan: confirm output and device, then a progress panel"),
    ("c", "cancel the running merge — in the run panel"),
    ("d", "diagnosis of the last merge"),
    ("h", "this session's merges beside the base and fine-tunes: scores, retention, plan diff"),
    ("t", "tokens each model added to or lost from the base's vocabulary — in the overview"),
    ("Ctrl+P", "command palette: every action by name; open a merged folder or a plan file"),
    ("q", "quit (asks first while a merge runs)"),
)

READING = (
    "Heatmap cells: ‖τ‖/‖θ₀‖ of each layer, τ = θ_model − θ_base; colour against the largest cell.",
    "Cosine: cos(τᵢ, τⱼ); near 0 is typical for different tasks, near −1 means the fine-tunes undo each other.",
    "Sign conflict: of the entries both models moved, the share moved in opposite directions (50% = chance).",
    "Retention: ⟨τ_merged, τᵢ⟩ / ‖τᵢ‖², how much of model i's change survives; red below 1/3.",
)


class HelpScreen(ModalScreen):
    BINDINGS = [Binding("escape,question_mark,q", "dismiss", "Close")]

    def compose(self) -> ComposeResult:
        table = Table(title="mergescope keys", box=None, padding=(0, 1), show_header=False)
        table.add_column(style="bold cyan", no_wrap=True)
        table.add_column()
        for key, what in KEYS:
            table.add_row(key, what)
        with VerticalScroll(id="help"):
            yield Static(table)
            yield Static("\n".join(READING), id="help-reading")
            yield Static("Escape closes this help.", classes="dim")
