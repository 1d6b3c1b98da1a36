"""``mergescope merge PLAN.yml -o OUT``: run a mergekit plan, or show what it would do (``--dry-run``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Column, Table

from mergescope.analysis import unique_names
from mergescope.analysis.merge_inputs import merge_input_warnings
from mergescope.checkpoints import MergescopeError, check_output_folder, layer_group, open_checkpoint
from mergescope.checkpoints.row_blocks import DEFAULT_MEMORY_BUDGET, parse_size
from mergescope.merge.executor import MergeProgress, run_merge
from mergescope.merge.job import MergeJob, build_job
from mergescope.merge.plan import MergePlan, load_plan
from mergescope.merge.plan_commands import ALLOW_FLAG, check_commands_allowed, plan_commands
from mergescope.tui.formatting import human_bytes

from .signals import Terminated, sigterm_raises, stopped
from .soup import run_plan_soup


def run_merge_command(args: argparse.Namespace) -> int:
    plan = load_plan(args.plan)
    if not args.dry_run:  # a plan is data: the programs it names run only when allowed (before anything else)
        check_commands_allowed(plan, allowed=args.allow_eval_cmd)
    if plan.options.get("greedy_soup") and not args.dry_run:
        return run_plan_soup(plan, args)  # choose the soup's ingredients first (see merge/soup.py)
    print_input_warnings(plan, Console(stderr=True))
    job = build_job(plan)
    out = Path(args.output)
    # a dry run writes nothing, so an existing output folder is no reason to refuse it
    check_output_folder(out, job.checkpoints.values(), overwrite=args.force or args.dry_run)
    if args.dry_run:
        print_dry_run(job, out, Console(), args.memory_budget)
        for command in plan_commands(plan):
            Console(highlight=False).print(
                f"{command.key}: the plan would run {command.command!r} to pick which of these models join the "
                f"soup (only with {ALLOW_FLAG})", markup=False, soft_wrap=True)
        return 0
    return _execute(job, out, args, Console(stderr=True))


def print_input_warnings(plan: MergePlan, console: Console) -> None:
    """Before anything runs: what the inputs' headers, configs and a sample of their rows show (another base,
    another vocabulary, tokenizer or architecture), one ``warning:`` line each — what ``analyze`` and the TUI
    would flag."""
    entries = plan.models or [source for piece in plan.slices or [] for source in piece.sources]
    refs = list(dict.fromkeys(entry.model for entry in entries))
    reference_ref = plan.base_model or (refs[0] if refs else None)
    others = [ref for ref in refs if ref != reference_ref]
    if reference_ref is None or not others:
        return
    try:
        reference = open_checkpoint(reference_ref)
        models = [open_checkpoint(ref, base=reference) for ref in others]
    except MergescopeError:
        return  # build_job names the problem with its plan line
    label = "the base" if plan.base_model else reference.name
    for warning in merge_input_warnings(reference, models, unique_names(models), label):
        console.print(f"[yellow]warning:[/] {warning.message}", soft_wrap=True)


def _execute(job: MergeJob, out: Path, args: argparse.Namespace, console: Console) -> int:
    for warning in job.warnings:  # e.g. a model without tokenizer.json taken to share the base's vocabulary
        console.print(f"[yellow]warning:[/] {warning}", markup=True, highlight=False)
    fixed = Column(no_wrap=True)
    bar = Progress(
        TextColumn(f"[bold]merging ({job.method.name})", table_column=fixed), BarColumn(bar_width=16),
        DownloadColumn(table_column=fixed), TransferSpeedColumn(table_column=fixed),
        TimeRemainingColumn(table_column=fixed),
        # the tensor (a first pass names its rows) takes what is left of the line, cut short rather than wrapped
        TextColumn("{task.fields[tensor]}", style="dim", table_column=Column(no_wrap=True, overflow="ellipsis",
                                                                           ratio=1)),
        console=console, transient=True, disable=not console.is_terminal, expand=True,
    )
    task = bar.add_task("merge", total=job.bytes_to_read, tensor="")

    def on_event(event: MergeProgress) -> None:
        bar.update(task, completed=event.bytes_done, tensor=event.tensor)

    try:
        with sigterm_raises(), bar:
            path = run_merge(job, out, device=args.device, seed=args.seed, overwrite=args.force, on_event=on_event,
                             allow_non_finite=args.allow_non_finite or None, memory_budget=args.memory_budget)
    except (KeyboardInterrupt, Terminated) as exc:
        word, status = stopped(exc)
        console.print(f"[yellow]{word}: nothing was written to {out}[/]")
        return status
    console.print(
        f"[green]wrote {path}[/] ({len(job.tasks)} tensors, {human_bytes(job.bytes_to_write)}, {job.out_dtype})"
    )
    return 0


def print_dry_run(job: MergeJob, out: Path, console: Console, memory_budget: str | None = None) -> None:
    plan = job.plan
    budget = parse_size(memory_budget or plan.options.get("memory_budget", DEFAULT_MEMORY_BUDGET), "memory_budget")
    streamed = job.method.elementwise or job.method.two_phase
    console.print(f"[bold]{plan.source}[/]: {job.method.name} — {job.method.description}", soft_wrap=True)
    console.print(f"output {out} · {len(job.tasks)} tensors · dtype {job.out_dtype} · "
                  f"reads {human_bytes(job.bytes_to_read)} · writes {human_bytes(job.bytes_to_write)} · "
                  f"memory budget {human_bytes(budget)} (" + ("row blocks" if streamed else
                  f"{job.method.name} reads large tensors whole: ≈ {human_bytes(2 * job.largest_task_bytes)}") + ")",
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
    console.print(parameters_table(job))
    options = shared_options(job)
    if options:
        console.print(f"method parameters (every tensor): {options}", soft_wrap=True)
    if job.vocabulary is not None:
        vocabulary = job.vocabulary
        new = ", ".join(token for token, _ in vocabulary.new[:8]) + (" …" if len(vocabulary.new) > 8 else "")
        console.print(f"vocabulary ({plan.tokenizer_source}): {len(vocabulary.tokens)} tokens, {vocabulary.rows} rows"
                      + (f"; {len(vocabulary.new)} new: {new}" if vocabulary.new else ""), soft_wrap=True, markup=False)
    for warning in job.warnings:
        console.print(f"[yellow]warning:[/] {warning}")


def _used(job: MergeJob, name: str) -> bool:
    """Whether the method uses parameter ``name`` (an ignored one, like int8_mask, is not shown)."""
    try:
        return not job.method.parameter(name).ignored
    except KeyError:
        return True


def parameters_table(job: MergeJob) -> Table:
    """A row per layer group and model with a column per parameter, every value whole: a parameter is the one
    thing a dry run is for, so nothing is cut at 80 columns (long values wrap in their cell)."""
    first = job.tasks[0] if job.tasks else None
    refs = [ref for ref, _ in first.inputs] if first else []
    names = unique_names([job.checkpoints[ref] for ref in refs])
    keys = list(dict.fromkeys(k for task in job.tasks for params in task.params for k in params if _used(job, k)))
    varying = [k for k in dict.fromkeys(k for task in job.tasks for k in task.options if _used(job, k))
               if len({repr(task.options.get(k)) for task in job.tasks}) > 1]
    table = Table(title="Parameters per layer group and model (its first tensor)", header_style="bold",
                  title_justify="left")
    table.add_column("group", overflow="fold")
    table.add_column("t", justify="right", no_wrap=True)
    table.add_column("model", overflow="fold")
    for key in keys + varying:
        table.add_column(key, justify="right", overflow="fold")
    seen = set()
    for task in job.tasks:
        group = layer_group(task.output)
        if group in seen or len(task.params) != len(names):
            continue
        seen.add(group)
        for i, (name, params) in enumerate(zip(names, task.params)):
            cells = [_fmt(params.get(k)) if params.get(k) is not None else "–" for k in keys]
            cells += [_fmt(task.options.get(k)) if i == 0 else "" for k in varying]
            table.add_row(group if i == 0 else "", f"{task.t:.2f}" if i == 0 else "", name, *cells,
                          end_section=i == len(names) - 1)
    return table


def shared_options(job: MergeJob) -> str:
    """The method-level parameters that are the same for every tensor, as ``k=v, …`` (ignored ones left out)."""
    if not job.tasks:
        return ""
    first = job.tasks[0].options
    same = [k for k in first if _used(job, k) and all(repr(t.options.get(k)) == repr(first[k]) for t in job.tasks)]
    return ", ".join(f"{k}={_fmt(first[k])}" for k in same)


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
