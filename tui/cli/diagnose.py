"""``mergescope diagnose MERGED_DIR``: what a merge kept of each source, per layer, and why it lost the rest."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mergescope.analysis.diagnosis import Diagnosis, diagnose_merged_folder
from mergescope.analysis.diagnosis_groups import SourceEffect

from .output import AnalysisProgressBar, write_json

LOW = 1 / 3


def run_diagnose(args: argparse.Namespace) -> int:
    err = Console(stderr=True)
    with AnalysisProgressBar(err) as on_event:
        diagnosis = diagnose_merged_folder(args.merged, base=args.base, device=args.device, on_event=on_event,
                                           memory_budget=args.memory_budget)
    if args.json:
        write_json(diagnosis.to_json(), args.json, err)
        return 0
    print_diagnosis(diagnosis, Console())
    return 0


def retention_cell(value: float | None) -> str:
    """Retention as a percentage, coloured: red below 1/3 (reverse video below 0), yellow below 2/3."""
    if value is None:
        return "[dim]–[/]"
    text = f"{round(100 * value)}%"
    if value < 0:
        return f"[bold reverse red]{text}[/]"
    if value < LOW:
        return f"[bold red]{text}[/]"
    return f"[yellow]{text}[/]" if value < 2 * LOW else f"[green]{text}[/]"


def loss_cell(effect: SourceEffect) -> str:
    """Share of ‖τᵢ‖² the merge zeroed or reversed (%), and in brackets the part at sign conflicts."""
    if effect.lost is None:
        return "[dim]–[/]"
    text = f"{round(100 * effect.lost)}"
    if effect.lost >= 0.5:
        text = f"[bold red]{text}[/]"
    return f"{text} [dim]({round(100 * effect.conflict)})[/]"


def print_diagnosis(diagnosis: Diagnosis, console: Console) -> None:
    names = diagnosis.names
    method = f" ({diagnosis.method})" if diagnosis.method else ""
    console.print(f"[bold]Diagnosis[/] of {escape(diagnosis.merged)}{method} against [bold]{escape(diagnosis.base)}[/]")
    kept = Table(
        title="Retention ⟨τ_m,τᵢ⟩/‖τᵢ‖² (1 kept, 0 gone, <0 reversed)", header_style="bold", title_justify="left"
    )
    kept.add_column("layer", no_wrap=True)
    kept.add_column("‖τ_m‖", justify="right")
    for name in names:
        kept.add_column(escape(name), justify="right")
    lost = Table(
        title="% of ‖τᵢ‖² zeroed or reversed (at sign conflicts)",
        header_style="bold", title_justify="left",
    )
    lost.add_column("layer", no_wrap=True)
    for name in names:
        lost.add_column(escape(name), justify="right")
    for group in diagnosis.groups:
        kept.add_row(group.group, f"{group.merged_norm:.3g}", *(retention_cell(e.retention) for e in group.sources))
        lost.add_row(group.group, *(loss_cell(e) for e in group.sources))
    total = diagnosis.total
    kept.add_section()
    kept.add_row("[bold]whole model", f"{total.merged_norm:.3g}", *(retention_cell(e.retention) for e in total.sources))
    lost.add_section()
    lost.add_row("[bold]whole model", *(loss_cell(e) for e in total.sources))
    console.print(kept)
    cosines = "  ".join(
        f"{n} {e.cosine:.2f}" if e.cosine is not None else f"{n} –" for n, e in zip(names, total.sources)
    )
    console.print(f"[dim]cosine of the merge's change with each source's (whole model): {cosines}[/]")
    if any(e.lost is not None for e in total.sources):
        console.print(lost)
    console.print("[bold]Summary[/]")
    for line in diagnosis.summary:
        console.print(f"  • {escape(line)}")
    for line in diagnosis.warnings:
        console.print(f"[yellow]warning:[/] {escape(line)}")
