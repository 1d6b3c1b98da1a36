"""``mergescope demo [DIR] [--no-tui] [--seed N] [--kernels portable|native]``: build (or reuse) the demo
workspace, then open the TUI on it."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from mergescope.demo.manifest import read_manifest
from mergescope.demo.recipe import Recipe
from mergescope.demo.workspace import build_workspace


def run_demo(args: argparse.Namespace) -> int:
    err = Console(stderr=True)
    with _BuildProgress(err) as progress:
        root = build_workspace(Path(args.directory), progress, recipe=Recipe(seed=args.seed), kernels=args.kernels)
    manifest = read_manifest(root) or {}
    if progress.started:
        err.print(f"[green]built the demo workspace in {root}[/] ({manifest.get('build_seconds', '?')} s)")
    else:
        err.print(f"using the demo workspace already in {root}")
    if args.no_tui:
        out = Console()
        print_summary(manifest, out)
        out.print("open it with:", style="bold")
        print(f"mergescope inspect {shlex.quote(str(root))}")
        return 0
    from .inspect import run_inspect  # imports textual, which --no-tui does not wait for

    return run_inspect([str(root)])


class _BuildProgress:
    """A rich progress bar on stderr with the time left, fed by the build; when stderr is not a terminal, a plain
    line at every tenth of the steps with the time left estimated from the pace so far."""

    def __init__(self, console: Console, clock: Callable[[], float] = time.monotonic):
        self.console = console
        self.started = False
        self.clock = clock
        self.start = 0.0
        self.next_tenth = 1

    def __enter__(self) -> _BuildProgress:
        self.bar = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
            TimeElapsedColumn(), TextColumn("·"), TimeRemainingColumn(), TextColumn("left"), console=self.console,
            transient=True, disable=not self.console.is_terminal,
        )
        self.bar.start()
        self.task = self.bar.add_task("building the demo workspace", total=None)
        return self

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.started:
            self.started, self.start = True, self.clock()
            if not self.console.is_terminal:
                print("mergescope demo: training the demo models (1.5–4 minutes on a 2-core machine)...",
                      file=sys.stderr, flush=True)
        self.bar.update(self.task, description=stage, completed=done, total=total)
        if not self.console.is_terminal and total > 0 and done * 10 >= self.next_tenth * total:
            self.next_tenth = done * 10 // total + 1
            print(f"mergescope demo: {eta_line(stage, done, total, self.clock() - self.start)}", file=sys.stderr,
                  flush=True)

    def __exit__(self, *exc) -> None:
        self.bar.stop()


def eta_line(stage: str, done: int, total: int, elapsed: float) -> str:
    """``40% (1480/3700 steps, fine-tuning add) · about 1:25 left``: the time left at the pace so far,
    elapsed · (total − done) / done."""
    left = elapsed * (total - done) / done if done else None
    clock = f"about {int(left + 0.5) // 60}:{int(left + 0.5) % 60:02d} left" if left is not None else "estimating"
    return f"{done * 100 // total}% ({done}/{total} steps, {stage}) · {clock}"


def print_summary(manifest: dict, console: Console) -> None:
    """The workspace's models with their task and measured accuracy per task, and its plans."""
    tasks = list(manifest.get("tasks", {}))
    accuracy = manifest.get("accuracy", {})
    roles = {manifest.get("base"): "base"}
    roles.update(
        {f["path"]: f"full fine-tune ({f['task']}, {f['steps']} steps)" for f in manifest.get("fine_tunes", [])}
    )
    roles.update({f["path"]: f"LoRA r={f['rank']} ({f['task']}, {f['steps']} steps)" for f in manifest.get("lora", [])})
    roles.update({t["path"]: f"trap: {t['kind'].replace('_', ' ')}" for t in manifest.get("traps", [])})
    table = Table(title="Models (exact-match accuracy on held-out prompts)", header_style="bold", title_justify="left")
    table.add_column("folder", no_wrap=True)
    table.add_column("what")
    for task in tasks:
        table.add_column(task, justify="right")
    for folder, role in roles.items():
        scores = accuracy.get(folder, {})
        table.add_row(folder, role, *(f"{scores[t]:.0%}" if t in scores else "–" for t in tasks))
    console.print(table)
    plans = Table(title="Merge plans (mergescope merge PLAN -o OUT)", header_style="bold", title_justify="left")
    plans.add_column("plan", no_wrap=True)
    plans.add_column("method", no_wrap=True)
    plans.add_column("what it shows")
    for plan in manifest.get("plans", []):
        plans.add_row(plan["path"], plan["method"], plan["description"])
    console.print(plans)
