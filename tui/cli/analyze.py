"""``mergescope analyze BASE MODEL...``: task-vector statistics as tables or JSON."""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

from mergescope.checkpoints import open_checkpoint
from mergescope.tui.formatting import human_bytes

#: colours from "barely changed" to "changed the most" for the per-layer table
_SCALE = ("grey50", "cyan", "green", "yellow", "dark_orange", "red")


def run_analyze(args: argparse.Namespace) -> int:
    from rich.console import Console

    from mergescope.analysis import run_analysis

    base = open_checkpoint(args.base)
    models = [open_checkpoint(source, base=base) for source in args.models]
    err = Console(stderr=True)
    with _progress(err) as on_event:
        report = run_analysis(
            base, models, density=args.density, device=args.device, use_cache=not args.no_cache, on_event=on_event
        )
    if args.json:
        text = json.dumps(report, indent=1, allow_nan=False)
        if args.json == "-":
            sys.stdout.write(text + "\n")
        else:
            with open(args.json, "w", encoding="utf-8") as f:
                f.write(text + "\n")
            err.print(f"wrote {args.json}")
        return 0
    print_report(report, Console())
    return 0


class _progress:
    """A rich progress bar on stderr fed by the analysis' Progress events."""

    def __init__(self, console):
        self.console = console

    def __enter__(self):
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

        from mergescope.analysis import Progress as ProgressEvent

        self.bar = Progress(
            TextColumn("[bold]analysing"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
            TextColumn("{task.fields[current]}", style="dim"), console=self.console, transient=True, disable=not self.console.is_terminal,
        )
        self.bar.start()
        self.task = self.bar.add_task("analyse", total=None, current="")

        def on_event(event) -> None:
            if isinstance(event, ProgressEvent):
                self.bar.update(self.task, total=event.bytes_total, completed=event.bytes_done, current=event.current)

        return on_event

    def __exit__(self, *exc):
        self.bar.stop()


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _rel(value: float | None) -> str:
    if value is None:
        return "–"
    if value == 0:
        return "0"
    return f"{value:.2e}" if value < 1e-3 else f"{value:.4f}"


def print_report(report: dict, console) -> None:
    from rich.table import Table

    names = [m["name"] for m in report["models"]]
    console.print(
        f"[bold]Task vectors[/] of {', '.join(names)} against [bold]{report['base']['name']}[/]"
        + (f"  (trimmed to density {report['density']})" if report["density"] < 1 else "")
    )
    groups = Table(title="Relative delta ‖τ‖/‖θ₀‖ per layer", header_style="bold", title_justify="left")
    groups.add_column("layer", no_wrap=True)
    for name in names:
        groups.add_column(name, justify="right")
    groups.add_column("conflict", justify="right")
    groups.add_column("cancel", justify="right")
    rels = [d["rel"] for g in report["groups"] for d in g["delta"].values() if d and d["rel"] is not None]
    top = max(rels, default=0.0) or 1.0
    for group in report["groups"]:
        cells = []
        for name in names:
            delta = group["delta"][name]
            rel = None if delta is None else delta["rel"]
            style = "" if rel is None else _SCALE[min(len(_SCALE) - 1, int(len(_SCALE) * rel / top))]
            cells.append(f"[{style}]{_rel(rel)}[/]" if style else _rel(rel))
        groups.add_row(group["name"], *cells, _fmt(group["conflict_all"]), _fmt(group["cancellation"]))
    total = report["total"]
    groups.add_section()
    groups.add_row(
        "[bold]whole model", *(_rel(total["delta"][n]["rel"]) for n in names), _fmt(total["conflict_all"]), _fmt(total["cancellation"])
    )
    console.print(groups)
    console.print(
        "[dim]conflict: share of entries changed by ≥2 models whose signs disagree; "
        "cancel: 1 − ‖Σ τ‖ / Σ ‖τ‖, what plain averaging destroys[/]"
    )
    if len(names) > 1:
        console.print(_pair_matrix(total, names, "cosine", "Cosine similarity of task vectors (whole model)"))
        key = "sign_conflict_trimmed" if report["density"] < 1 else "sign_conflict"
        console.print(_pair_matrix(total, names, key, "Sign-conflict rate (whole model)"))
    _print_warnings(report["warnings"], console)
    sizes = sum(t["numel"] for t in report["tensors"])
    console.print(f"[dim]{len(report['tensors'])} tensors, {sizes:,} parameters per model ({human_bytes(sizes * 4)} as float32)[/]")


def _pair_matrix(stats: dict, names: list[str], key: str, title: str):
    from rich.table import Table

    values = {}
    for pair in stats["pairs"]:
        values[pair["a"], pair["b"]] = values[pair["b"], pair["a"]] = pair.get(key)
    table = Table(title=title, header_style="bold", title_justify="left")
    table.add_column("")
    for name in names:
        table.add_column(name, justify="right")
    for a in names:
        table.add_row(a, *("·" if a == b else _fmt(values.get((a, b))) for b in names))
    return table


def _print_warnings(warnings: list[dict], console) -> None:
    from rich.table import Table

    if not warnings:
        console.print("[green]No compatibility warnings.[/]")
        return
    grouped: dict[tuple[str, str | None], list[dict]] = defaultdict(list)
    for warning in warnings:
        grouped[warning["code"], warning["model"]].append(warning)
    table = Table(title="Warnings", header_style="bold", title_justify="left", show_lines=False)
    table.add_column("code", style="yellow", no_wrap=True)
    table.add_column("model", no_wrap=True)
    table.add_column("what", overflow="fold")
    for (code, model), items in grouped.items():
        message = items[0]["message"] + (f" (and {len(items) - 1} more tensors)" if len(items) > 1 else "")
        table.add_row(code, model or "base", message)
    console.print(table)
