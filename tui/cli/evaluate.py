"""``mergescope eval MODEL [--task T ...] [--json]``: exact-match accuracy of a demo-architecture model.

The table goes to stdout and its last line is a bare number — the mean accuracy over the selected tasks —
so that ``--eval-cmd "mergescope eval {model} --task add"`` can read it. ``--json`` prints one JSON object
instead.
"""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.table import Table

from mergescope.checkpoints import MergescopeError
from mergescope.demo.evaluate import evaluate
from mergescope.demo.tasks import TASK_DESCRIPTIONS, check_tasks, eval_examples


def run_eval(args: argparse.Namespace) -> int:
    tasks = check_tasks(args.task)
    if args.limit is not None and args.limit < 1:
        raise MergescopeError(f"--limit {args.limit}: give at least 1 prompt per task")
    scores = evaluate(args.model, list(tasks), args.limit)
    mean = sum(scores.values()) / len(scores)
    prompts = {task: len(eval_examples(task)[: args.limit]) for task in tasks}
    if args.json:
        print(json.dumps({"model": args.model, "accuracy": scores, "prompts": prompts, "mean": mean}))
        return 0
    table = Table(title=f"{args.model}: exact match, greedy decoding", header_style="bold", title_justify="left")
    table.add_column("task", no_wrap=True)
    table.add_column("accuracy", justify="right")
    table.add_column("prompts", justify="right")
    table.add_column("what it asks")
    for task, score in scores.items():
        table.add_row(task, f"{score:.1%}", str(prompts[task]), TASK_DESCRIPTIONS[task])
    console = Console()
    console.print(table)
    console.print(f"mean over {len(scores)} task{'s' if len(scores) > 1 else ''}:", style="bold")
    print(f"{mean:.4f}", flush=True)
    return 0
