"""``mergescope tune PLAN.yml --eval-cmd CMD --vary KEY=VALUES ...``: search a plan's parameters — a grid, a
seeded random sample or CMA-ES (:mod:`mergescope.merge.search_strategy`), on threads of this process or as Ray
tasks (:mod:`mergescope.merge.ray_trials`), every candidate recorded in a SQLite search file
(:mod:`mergescope.merge.search_store`) that ``--resume`` continues."""

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
from mergescope.merge.job import build_job, layer_count
from mergescope.merge.plan import load_plan
from mergescope.merge.search_run import run_strategy
from mergescope.merge.search_space import Variable, check_path, parse_vary
from mergescope.merge.search_store import SearchStore, default_store_path
from mergescope.merge.search_strategy import layer_groups, make_strategy
from mergescope.merge.tune import ThreadEngine, TuneResult, best_plan_text, best_result, ranked
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
    if args.jobs < 1:
        raise MergescopeError(f"--jobs {args.jobs}: run at least one candidate at a time")
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
    strategy_name = args.strategy or ("random" if args.random is not None else "grid")
    if args.random is not None and strategy_name != "random":
        raise MergescopeError(f"--random belongs to --strategy random, not {strategy_name}; use --budget N")
    if args.ray is not None:
        from mergescope.merge.ray_trials import import_ray  # Ray only for --ray: it takes a second to import

        import_ray()  # without Ray installed, say how to get it before anything else happens
    job = build_job(plan)  # the models open and fit together before any candidate runs
    groups = layer_groups(layer_count(job.reference), args.layer_granularity)
    strategy = make_strategy(strategy_name, document, variables, seed=args.seed, groups=groups, budget=args.budget,
                             random_count=args.random, popsize=args.population)
    settings = {"plan": Path(args.plan).read_text(encoding="utf-8"), "vary": [v.key for v in variables],
                "vary_specs": list(args.vary), "strategy": strategy_name, "seed": args.seed,
                "layer_granularity": args.layer_granularity, "population": args.population,
                "eval_cmd": args.eval_cmd, "budget": strategy.total, "output": str(best_path.absolute()),
                "plan_path": str(Path(args.plan).absolute())}
    store_path = Path(args.db) if args.db else default_store_path(best_path)
    store = SearchStore(store_path, settings, resume=args.resume)
    try:
        return _search(strategy, document, variables, best_path, store, args, Console(highlight=False))
    finally:
        store.close()


def _engine(args: argparse.Namespace):
    if args.ray is None:
        return ThreadEngine(args.eval_cmd, jobs=args.jobs, device=args.device, timeout=args.timeout,
                            scratch_dir=args.scratch or None)
    from mergescope.merge.ray_trials import RayEngine  # imports Ray lazily, only for --ray

    return RayEngine(args.eval_cmd, args.ray or None, cpus_per_trial=args.cpus_per_trial,
                     gpus_per_trial=args.gpus_per_trial, device=args.device, timeout=args.timeout,
                     scratch=args.scratch, retries=args.retries)


def _search(strategy, document: dict, variables: list[Variable], best_path: Path, store: SearchStore,
            args: argparse.Namespace, console: Console) -> int:
    errors = Console(stderr=True, highlight=False)
    bar = Progress(TextColumn("[bold]candidates"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("best {task.fields[best]}"), console=errors, transient=True,
                   disable=not errors.is_terminal)
    task = bar.add_task("tune", total=strategy.total, best="–")
    results = []

    def on_result(result: TuneResult) -> None:
        results.append(result)
        scores = [r.score for r in results if r.status == "ok"]
        bar.update(task, advance=1, best=f"{max(scores):.6g}" if scores else "–")

    start = time.perf_counter()
    if args.ray is None and not args.scratch:
        args.scratch = str(best_path.absolute().parent)
    try:
        with _engine(args) as engine, sigterm_raises(), bar:
            run_strategy(strategy, document, variables, engine, store, on_result)
    except (KeyboardInterrupt, Terminated) as exc:
        print_results(console, results, variables)
        word, status = stopped(exc)
        finished = [r for r in results if r.status != "cancelled"]
        errors.print(
            f"[yellow]{word}: {len(finished)} of {strategy.total} candidates finished; scratch removed; "
            f"{best_path} not written; continue with --resume ({store.path})[/]"
        )
        return status
    print_results(console, results, variables)
    best = best_result(results)
    _write_text(best_path, best_plan_text(best, variables, args.eval_cmd, len(results)))
    values = ", ".join(f"{v.key}={_cell(value)}" for v, value in zip(variables, best.candidate.values))
    seconds = time.perf_counter() - start
    resumed = sum(r.resumed for r in results)
    nodes = len({r.node for r in results if not r.resumed})
    console.print(f"best: {values} · score {best.score:.6g} · {len(results)} candidates"
                  f"{f' ({resumed} from the search file)' if resumed else ''} in {seconds:.1f} s"
                  f"{f' on {nodes} Ray node(s)' if args.ray is not None and nodes else ''}", soft_wrap=True)
    console.print(f"[green]wrote {best_path}[/] (every candidate: {store.path})", soft_wrap=True)
    return 0


def print_results(console: Console, results: list[TuneResult], variables: list[Variable]) -> None:
    """The results table (scored candidates best first, then invalid and failed ones), then one line per
    distinct reason a candidate was not scored, naming the candidates."""
    table = Table(title="Candidates by score", header_style="bold", title_justify="left")
    table.add_column("#", justify="right", no_wrap=True, min_width=len(str(len(results))))
    for label in column_labels(variables):
        table.add_column(escape(label), justify="right", no_wrap=True, min_width=min(len(label), 24))
    ray = any(r.node != "local" for r in results)
    for column, width in (("score", 10), ("time", 7), ("status", 7)) + ((("node", 8),) if ray else ()):
        table.add_column(column, justify="left" if column == "status" else "right", no_wrap=True, min_width=width)
    reasons: dict[tuple[str, str], list[int]] = {}
    for result in ranked(results):
        score = f"{result.score:.6g}" if result.score is not None else "–"
        style = None if result.status == "ok" else "red"
        table.add_row(str(result.candidate.number), *(_cell(v) for v in result.candidate.values), score,
                      f"{result.seconds:.2f} s", result.status, *([result.node[:8]] if ray else []), style=style)
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
    if isinstance(value, list):
        return "[" + ", ".join(map(_cell, value)) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _write_text(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise MergescopeError(f"{path}: cannot write the best plan: {exc.strerror or exc}") from None
