"""A parameter search's candidates: one row each, sorted by score (best first) or by number."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import DataTable

from mergescope.merge.search_store import Trial


def cell(value: object) -> str:
    """A searched value as the table shows it: numbers to 4 significant digits, gradients as [a, b, …]."""
    if isinstance(value, list):
        return "[" + ", ".join(cell(v) for v in value) + "]"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def ordered(trials: list[Trial], by_score: bool) -> list[Trial]:
    """By score, best first, unscored last (each group by number); or all by number."""
    if not by_score:
        return sorted(trials, key=lambda t: t.number)
    return sorted(trials, key=lambda t: (t.score is None, -(t.score or 0.0), t.number))


class CandidatesTable(DataTable):
    """Columns: #, score, each --vary key, seconds, status, node (the score first: it stays in view on a narrow
    terminal). Failed and invalid rows in red."""

    def __init__(self, **kwargs) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)
        self.keys: list[str] = []
        self.by_score = True

    def show(self, keys: list[str], trials: list[Trial]) -> None:
        if keys != self.keys:
            self.clear(columns=True)
            self.keys = list(keys)
            self.add_column("#", key="number")
            self.add_column("score", key="score")
            for key in keys:
                self.add_column(".".join(p for p in key.split(".") if p != "parameters"), key=key)
            for name in ("time", "status", "node"):
                self.add_column(name, key=name)
        cursor = self.cursor_row
        self.clear()
        for trial in ordered(trials, self.by_score):
            style = "" if trial.status == "ok" else "red"
            score = "–" if trial.score is None else f"{trial.score:.4g}"
            self.add_row(str(trial.number), Text(score, style="bold"), *[cell(v) for v in trial.point],
                         f"{trial.seconds:.1f} s", Text(trial.status, style=style), trial.node[:8],
                         key=str(trial.number))
        if trials:
            self.move_cursor(row=min(max(cursor, 0), len(trials) - 1))
