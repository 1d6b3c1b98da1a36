"""The models being compared: source, parameters, dtype and compatibility badges."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import DataTable

from mergescope.checkpoints import Checkpoint
from mergescope.tui.formatting import human_count
from mergescope.tui.report_view import badges, token_changes
from mergescope.tui.state import BASE_KEY

_BADGE_LABELS = {"base": "base", "tokenizer": "tok", "vocab": "vocab", "arch": "arch"}


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


class ModelsTable(DataTable):
    """One row per model (the base first); badges fill in as the analysis finds problems."""

    DEFAULT_CSS = "ModelsTable { height: auto; max-height: 9; }"

    def __init__(self, base: Checkpoint, models: list[Checkpoint], names: list[str], **kwargs) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)
        self.base, self.models, self.names = base, models, names

    def on_mount(self) -> None:
        self.add_columns("model", "source", "params", "dtype", "checks")
        self.add_row(Text("base", style="bold"), short_source(self.base.source, 24),
                     human_count(self.base.num_parameters), _dtype(self.base), Text("reference", style="dim"),
                     key=BASE_KEY)
        for name, model in zip(self.names, self.models):
            self.add_row(Text(name, style="bold"), short_source(model.source, 24), human_count(model.num_parameters),
                         _dtype(model), badge_text(None), key=name)

    def show_scores(self, scores: dict[str, dict[str, float]]) -> None:
        """Demo workspace: a column per demo task with each model's held-out accuracy (BASE_KEY for the base)."""
        tasks = list(dict.fromkeys(task for per_model in scores.values() for task in per_model))
        for task in tasks:
            if task not in self.columns:
                self.add_column(task[:4], key=task)
        for key in [BASE_KEY, *self.names]:
            for task in tasks:
                value = scores.get(key, {}).get(task)
                if value is None:
                    cell = Text("…", style="dim")
                else:
                    cell = Text(f"{value:.0%}", style="bold" if value >= 0.5 else "")
                self.update_cell(key, task, cell, update_width=True)

    def update_report(self, report: dict, done: bool) -> None:
        """Show the badges of every model; unknown (dim) until the pass is done, failures at once."""
        checks_column = list(self.columns)[4]
        for name in self.names:
            passed = badges(report, name)
            shown = passed if done or not all(passed.values()) else None
            tokens = token_changes(report, name) if done else None
            self.update_cell(name, checks_column, badge_text(shown, tokens), update_width=True)


def short_source(source: str, width: int) -> str:
    """A long path by its end (``…/demo/ft_add``), where the distinguishing part is."""
    return source if len(source) <= width else "…" + source[-(width - 1):]


def _dtype(checkpoint: Checkpoint) -> str:
    common = checkpoint.dtypes.most_common(1)
    return common[0][0] if common else "—"
