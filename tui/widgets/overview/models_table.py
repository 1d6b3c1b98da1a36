"""The models being compared: name, demo scores and compatibility badges first (what fits at 80 columns), then
parameters and dtype; Enter shows a model's details (its full source)."""

from __future__ import annotations

from dataclasses import dataclass

from rich.text import Text
from textual.binding import Binding
from textual.message import Message
from textual.widgets import DataTable

from mergescope.checkpoints import Checkpoint
from mergescope.tui.display import short
from mergescope.tui.formatting import human_count
from mergescope.tui.report_view import badges, token_changes
from mergescope.tui.state import BASE_KEY

_BADGE_LABELS = {"base": "base", "tokenizer": "tok", "vocab": "vocab", "arch": "arch"}
#: the widest model name shown whole (the demo's trap_grown_vocab)
NAME_WIDTH = 16


@dataclass
class ModelDetailsRequested(Message):
    """Enter on a model: show its details."""

    key: str  # the model's name, BASE_KEY for the base


def badge_text(passed: dict[str, bool] | None, tokens: tuple[list[str], list[str]] | None = None) -> Text:
    """``✓base ✓tok ✗vocab+3``: green for a passed check, red for a failed one, dim while unknown; a vocabulary
    that differs from the base's shows how many tokens the model added (+) and lost (−); `t` lists them."""
    text = Text()
    for key, label in _BADGE_LABELS.items():
        if key == "vocab" and tokens is not None and (tokens[0] or tokens[1]):
            label += (f"+{len(tokens[0])}" if tokens[0] else "") + (f"−{len(tokens[1])}" if tokens[1] else "")
        if passed is None:
            text.append(f"·{label} ", style="dim")
        elif passed[key]:
            text.append(f"✓{label} ", style="green")
        else:
            text.append(f"✗{label} ", style="bold red")
    return text


def score_text(value: float | None) -> Text:
    if value is None:
        return Text("…", style="dim")
    return Text(f"{value:.0%}", style="bold" if value >= 0.5 else "")


class ModelsTable(DataTable):
    """One row per model (the base first); a column per demo task (when ``tasks``) right after the name, badges
    fill in as the analysis finds problems; params and dtype last; Enter posts :class:`ModelDetailsRequested`."""

    DEFAULT_CSS = "ModelsTable { height: auto; max-height: 9; }"
    BINDINGS = [Binding("enter", "details", "Details")]

    def __init__(self, base: Checkpoint, models: list[Checkpoint], names: list[str], tasks: list[str] | None = None,
                 **kwargs) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)
        self.base, self.models, self.names, self.tasks = base, models, names, list(tasks or [])

    def on_mount(self) -> None:
        self.add_column("model", key="model")
        for task in self.tasks:
            self.add_column(task[:4], key=task)
        self.add_column("checks", key="checks")
        self.add_column("params", key="params")
        self.add_column("dtype", key="dtype")
        dots = [Text("…", style="dim") for _ in self.tasks]
        self.add_row(Text("base", style="bold"), *dots, Text("reference", style="dim"),
                     human_count(self.base.num_parameters), _dtype(self.base), key=BASE_KEY)
        for name, model in zip(self.names, self.models):
            self.add_row(Text(short(name, NAME_WIDTH), style="bold"), *dots, badge_text(None),
                         human_count(model.num_parameters), _dtype(model), key=name)

    def show_scores(self, scores: dict[str, dict[str, float]]) -> None:
        """Demo workspace: each model's held-out accuracy per task (BASE_KEY for the base)."""
        for task in dict.fromkeys(task for per_model in scores.values() for task in per_model):
            if task not in self.tasks:  # a task the manifest did not list: a column at the end
                self.tasks.append(task)
                self.add_column(task[:4], key=task)
        for key in [BASE_KEY, *self.names]:
            for task in self.tasks:
                self.update_cell(key, task, score_text(scores.get(key, {}).get(task)), update_width=True)

    def update_report(self, report: dict, done: bool) -> None:
        """Show the badges of every model; unknown (dim) until the pass is done, failures at once."""
        for name in self.names:
            passed = badges(report, name)
            shown = passed if done or not all(passed.values()) else None
            tokens = token_changes(report, name) if done else None
            self.update_cell(name, "checks", badge_text(shown, tokens), update_width=True)

    def action_details(self) -> None:
        if self.row_count:
            key = self.coordinate_to_cell_key((self.cursor_row, 0)).row_key.value
            self.post_message(ModelDetailsRequested(key))

    def details(self, key: str, report: dict) -> str:
        """One model's details: its source, size, dtype and the analysis' warnings about it."""
        checkpoint = self.base if key == BASE_KEY else self.models[self.names.index(key)]
        lines = [f"{'base' if key == BASE_KEY else key}: {checkpoint.source}",
                 f"{human_count(checkpoint.num_parameters)} parameters · {_dtype(checkpoint)} · {checkpoint.kind}"]
        lines += [f"⚠ {w['message']}" for w in report.get("warnings", []) if w.get("model") == key][:4]
        return "\n".join(lines)


def _dtype(checkpoint: Checkpoint) -> str:
    common = checkpoint.dtypes.most_common(1)
    return common[0][0] if common else "—"
