"""``mergescope tune PLAN.yml --eval-cmd CMD --vary KEY=VALUES ...``: search a plan's parameters."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from mergescope.checkpoints import MergescopeError
from mergescope.merge.eval_command import check_template
from mergescope.merge.inert_vary import inert_variables
from mergescope.merge.job import build_job
from mergescope.merge.plan import load_plan
from mergescope.merge.search_space import (
    Candidate,
    Variable,
    candidates,
    check_path,
    grid_points,
    parse_vary,
    random_points,
)
from mergescope.merge.tune import TuneResult, best_plan_text, best_result, ranked, run_search
from mergescope.merge.yaml_lines import plain_document

from .signals import Terminated, sigterm_raises, stopped


def default_best_path(plan_path: str) -> Path:
    """``plan.yml`` → ``plan.best.yml`` beside it."""
    path = Path(plan_path)
    return path.with_name(f"{path.stem}.best{path.suffix or '.yml'}")


def run_tune_command(args: argparse.Namespace) -> int:
    plan = load_plan(args.plan)
    check_template(args.eval_cmd)
    variables = [parse_vary(spec) for spec in args.vary]
    repeated = sorted({v.key for v in variables if [w.key for w in variables].count(v.key) > 1})
    if repeated:
        raise MergescopeError(f"--vary {repeated[0]} is given twice; give each key once with all its values")
    document = plain_document(plan.raw)
    for variable in variables:
        check_path(document, variable)
    best_path = Path(args.output) if args.output else default_best_path(args.plan)
    if best_path.resolve() == Path(args.plan).resolve():
        raise MergescopeError(f"{best_path}: is the plan being tuned; write the best plan elsewhere (-o)")
    inert = inert_variables(document, variables)
    if inert and len(inert) == len(variables):
        raise MergescopeError(inert[0].message() + " (every candidate would be the same merge)")
    for variable in inert:
        Console(stderr=True, highlight=False).print(f"warning: {escape(variable.message())}", soft_wrap=True)
    build_job(plan)  # the models open and fit together before any candidate runs
    points = random_points(variables, args.random, args.seed) if args.random is not None else grid_points(variables)
    return _search(candidates(document, variables, points), variables, best_path, args, Console(highlight=False))


def _search(pool: list[Candidate], variables: list[Variable], best_path: Path, args: argparse.Namespace,
            console: Console) -> int:
    errors = Console(stderr=True, highlight=False)
    bar = Progress(TextColumn("[bold]candidates"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("best {task.fields[best]}"), console=errors, transient=True,
                   disable=not errors.is_terminal)
    task = bar.add_task("tune", total=len(pool), best="–")
    results = []

    def on_result(result: TuneResult) -> None:
        results.append(result)
        scores = [r.score for r in results if r.status == "ok"]
        bar.update(task, advance=1, best=f"{max(scores):.6g}" if scores else "–")

    start = time.perf_counter()
    scratch = args.scratch or best_path.absolute().parent
    try:
        with sigterm_raises(), bar:
            run_search(pool, args.eval_cmd, jobs=args.jobs, device=args.device, timeout=args.timeout,
                       scratch_dir=scratch, on_result=on_result)
    except (KeyboardInterrupt, Terminated) as exc:
        print_results(console, results, variables)
        word, status = stopped(exc)
        errors.print(
            f"[yellow]{word}: {len(results)} of {len(pool)} candidates finished; scratch removed; "
            f"{best_path} not written[/]"
        )
        return status
    print_results(console, results, variables)
    best = best_result(results)
    _write_text(best_path, best_plan_text(best, variables, args.eval_cmd, len(pool)))
    values = ", ".join(f"{v.key}={value}" for v, value in zip(variables, best.candidate.values))
    seconds = time.perf_counter() - start
    console.print(f"best: {values} · score {best.score:.6g} · {len(pool)} candidates in {seconds:.1f} s",
                  soft_wrap=True)
    console.print(f"[green]wrote {best_path}[/]")
    return 0


def print_results(console: Console, results: list[TuneResult], variables: list[Variable]) -> None:
    """The results table (scored candidates best first, then invalid and failed ones), then one line per
    distinct reason a candidate was not scored, naming the candidates."""
    table = Table(title="Candidates by score", header_style="bold", title_justify="left")
    table.add_column("#", justify="right")
    for label in column_labels(variables):
        table.add_column(escape(label), justify="right", no_wrap=True, min_width=min(len(label), 24))
    for column, width in (("score", 10), ("time", 7), ("status", 7)):
        table.add_column(column, justify="left" if column == "status" else "right", no_wrap=True, min_width=width)
    reasons: dict[tuple[str, str], list[int]] = {}
    for result in ranked(results):
        score = f"{result.score:.6g}" if result.score is not None else "–"
        style = None if result.status == "ok" else "red"
        table.add_row(str(result.candidate.number), *(_cell(v) for v in result.candidate.values), score,
                      f"{result.seconds:.2f} s", result.status, style=style)
        if result.status != "ok":
            reasons.setdefault((result.status, result.message), []).append(result.candidate.number)
    console.print(table)
    for (status, message), numbers in reasons.items():
        console.print(f"[red]{status}[/] #{', #'.join(map(str, numbers))}: {escape(message)}", soft_wrap=True)


def column_labels(variables: list[Variable]) -> list[str]:
    """Short column titles: the keys without their ``parameters`` parts (``models.0.weight``), unless two
    would then read the same."""
    short = [".".join(part for part in v.path if part != "parameters") or v.key for v in variables]
    return short if len(set(short)) == len(short) else [v.key for v in variables]


def _cell(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _write_text(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise MergescopeError(f"{path}: cannot write the best plan: {exc.strerror or exc}") from None
