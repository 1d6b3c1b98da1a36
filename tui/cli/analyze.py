"""``mergescope analyze BASE MODEL...``: task-vector statistics as tables or JSON."""

from __future__ import annotations

import argparse
from collections import defaultdict

from rich.console import Console
from rich.table import Table

from mergescope.analysis import run_analysis
from mergescope.checkpoints import open_checkpoint
from mergescope.tui.formatting import human_bytes

from .output import AnalysisProgressBar, write_json

#: colours from "barely changed" to "changed the most" for the per-layer table
_SCALE = ("grey50", "cyan", "green", "yellow", "dark_orange", "red")


def run_analyze(args: argparse.Namespace) -> int:
    base = open_checkpoint(args.base)
    models = [open_checkpoint(source, base=base) for source in args.models]
    err = Console(stderr=True)
    with AnalysisProgressBar(err) as on_event:
        report = run_analysis(
            base, models, density=args.density, device=args.device, use_cache=not args.no_cache, on_event=on_event,
            memory_budget=args.memory_budget,
        )
    if args.json:
        write_json(report, args.json, err)
        return 0
    print_report(report, Console())
    return 0


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _rel(value: float | None) -> str:
    if value is None:
        return "–"
    if value == 0:
        return "0"
    return f"{value:.2e}" if value < 1e-3 else f"{value:.4f}"


def print_report(report: dict, console: Console) -> None:
    names = [m["name"] for m in report["models"]]
    trimmed = report["density"] < 1
    conflict_key = "conflict_all_trimmed" if trimmed else "conflict_all"
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
        groups.add_row(group["name"], *cells, _fmt(group.get(conflict_key)), _fmt(group["cancellation"]))
    total = report["total"]
    groups.add_section()
    groups.add_row(
        "[bold]whole model", *(_rel(total["delta"][n]["rel"]) for n in names), _fmt(total.get(conflict_key)),
        _fmt(total["cancellation"]),
    )
    console.print(groups)
    after_trim = f", after each τ is trimmed to its top {report['density']:g} by magnitude" if trimmed else ""
    console.print(
        f"[dim]conflict: share of entries changed by ≥2 models whose signs disagree{after_trim}; "
        "cancel: 1 − ‖Σ τ‖ / Σ ‖τ‖, what plain averaging destroys (untrimmed)[/]"
    )
    if len(names) > 1:
        console.print(_pair_matrix(total, names, "cosine", "Cosine similarity of task vectors (whole model)"))
        key = "sign_conflict_trimmed" if trimmed else "sign_conflict"
        where = f"whole model, trimmed to density {report['density']:g}" if trimmed else "whole model"
        title = f"Sign-conflict rate ({where})"
        console.print(_pair_matrix(total, names, key, title))
    _print_warnings(report["warnings"], console)
    sizes = sum(t["numel"] for t in report["tensors"])
    console.print(
        f"[dim]{len(report['tensors'])} tensors, {sizes:,} parameters per model "
        f"({human_bytes(sizes * 4)} as float32)[/]"
    )


def _pair_matrix(stats: dict, names: list[str], key: str, title: str) -> Table:
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


def _print_warnings(warnings: list[dict], console: Console) -> None:
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
