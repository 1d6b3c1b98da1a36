"""``mergescope merge PLAN.yml -o OUT``: run a mergekit plan, or show what it would do (``--dry-run``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from mergescope.analysis import unique_names
from mergescope.checkpoints import check_output_folder, layer_group
from mergescope.merge.executor import MergeProgress, run_merge
from mergescope.merge.job import MergeJob, build_job
from mergescope.merge.plan import load_plan
from mergescope.tui.formatting import human_bytes

from .signals import Terminated, sigterm_raises, stopped
from .soup import run_plan_soup


def run_merge_command(args: argparse.Namespace) -> int:
    plan = load_plan(args.plan)
    if plan.options.get("greedy_soup") and not args.dry_run:
        return run_plan_soup(plan, args)  # choose the soup's ingredients first (see merge/soup.py)
    job = build_job(plan)
    out = Path(args.output)
    # a dry run writes nothing, so an existing output folder is no reason to refuse it
    check_output_folder(out, job.checkpoints.values(), overwrite=args.force or args.dry_run)
    if args.dry_run:
        print_dry_run(job, out, Console())
        if plan.options.get("greedy_soup"):
            Console().print("greedy_soup: the eval command picks which of these models join the soup")
        return 0
    return _execute(job, out, args, Console(stderr=True))


def _execute(job: MergeJob, out: Path, args: argparse.Namespace, console: Console) -> int:
    for warning in job.warnings:  # e.g. a model without tokenizer.json taken to share the base's vocabulary
        console.print(f"[yellow]warning:[/] {warning}", markup=True, highlight=False)
    bar = Progress(
        TextColumn(f"[bold]merging ({job.method.name})"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        TimeRemainingColumn(), TextColumn("{task.fields[tensor]}", style="dim"), console=console, transient=True,
        disable=not console.is_terminal,
    )
    task = bar.add_task("merge", total=job.bytes_to_read, tensor="")

    def on_event(event: MergeProgress) -> None:
        bar.update(task, completed=event.bytes_done, tensor=event.tensor)

    try:
        with sigterm_raises(), bar:
            path = run_merge(job, out, device=args.device, seed=args.seed, overwrite=args.force, on_event=on_event,
                             allow_non_finite=args.allow_non_finite or None)
    except (KeyboardInterrupt, Terminated) as exc:
        word, status = stopped(exc)
        console.print(f"[yellow]{word}: nothing was written to {out}[/]")
        return status
    console.print(
        f"[green]wrote {path}[/] ({len(job.tasks)} tensors, {human_bytes(job.bytes_to_write)}, {job.out_dtype})"
    )
    return 0


def print_dry_run(job: MergeJob, out: Path, console: Console) -> None:
    plan = job.plan
    console.print(f"[bold]{plan.source}[/]: {job.method.name} — {job.method.description}", soft_wrap=True)
    console.print(f"output {out} · {len(job.tasks)} tensors · dtype {job.out_dtype} · "
                  f"reads {human_bytes(job.bytes_to_read)} · writes {human_bytes(job.bytes_to_write)} · "
                  f"peak memory ≈ {human_bytes(2 * job.largest_task_bytes)} (two output tensors' float32 inputs)",
                  soft_wrap=True)
    inputs = Table(title="Inputs", header_style="bold", title_justify="left")
    for column in ("model", "format", "tensors", "size"):
        inputs.add_column(column, no_wrap=True)
    inputs.add_column("source", overflow="fold")
    for ref, checkpoint in job.checkpoints.items():
        role = " (base)" if ref == plan.base_model else ""
        size = human_bytes(checkpoint.num_bytes)
        inputs.add_row(checkpoint.name + role, checkpoint.kind, str(len(checkpoint)), size, ref)
    console.print(inputs)
    first = job.tasks[0] if job.tasks else None
    refs = [ref for ref, _ in first.inputs] if first else []
    names = unique_names([job.checkpoints[ref] for ref in refs])
    table = Table(title="Parameters per layer group (its first tensor)", header_style="bold", title_justify="left")
    table.add_column("group", no_wrap=True)
    table.add_column("t", justify="right")
    for name in names:
        table.add_column(name)
    table.add_column("method")
    seen = set()
    for task in job.tasks:
        group = layer_group(task.output)
        if group in seen or len(task.params) != len(names):
            continue
        seen.add(group)
        cells = [
            ", ".join(f"{k}={_fmt(v)}" for k, v in params.items() if v is not None) or "–" for params in task.params
        ]
        shared = ", ".join(f"{k}={_fmt(v)}" for k, v in task.options.items())
        table.add_row(group, f"{task.t:.2f}", *cells, shared or "–")
    console.print(table)
    if job.vocabulary is not None:
        vocabulary = job.vocabulary
        new = ", ".join(token for token, _ in vocabulary.new[:8]) + (" …" if len(vocabulary.new) > 8 else "")
        console.print(f"vocabulary ({plan.tokenizer_source}): {len(vocabulary.tokens)} tokens, {vocabulary.rows} rows"
                      + (f"; {len(vocabulary.new)} new: {new}" if vocabulary.new else ""), soft_wrap=True, markup=False)
    for warning in job.warnings:
        console.print(f"[yellow]warning:[/] {warning}")


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
