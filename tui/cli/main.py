"""``mergescope``: argument parsing and dispatch.

Only the standard library is imported at start-up, so ``mergescope --help`` answers at once; each
command's module (``mergescope.tui.cli.<command>``) is imported when the command runs, with what it needs
(rich, torch, textual). A :class:`MergescopeError` (bad input the user can fix) is printed as one line on
stderr with exit status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from mergescope.demo.kernels import KERNELS, PORTABLE

DESCRIPTION = (
    "See inside model merges: open checkpoints lazily, analyse task vectors (norms, sign conflicts, "
    "cosines), run mergekit-compatible merge plans, and diagnose merges that went wrong."
)
EVAL_CMD_HELP = "e.g. 'python eval.py {model}'; prints the score last"

MEMORY_BUDGET_HELP = ("host memory to stay within, e.g. 1.5GB (the default); large tensors stream in row blocks "
                      "sized from it")

def _version() -> str:
    # imported here, not at the top: importlib.metadata takes longer to import than --help takes to answer
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mergescope")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown"


class _VersionAction(argparse.Action):
    """``--version`` that looks the version up only when asked."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"mergescope {_version()}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mergescope", description=DESCRIPTION)
    parser.add_argument("--version", action=_VersionAction, help="print the version and exit")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    info = commands.add_parser(
        "info",
        help="describe a checkpoint from its headers alone",
        description="Print a checkpoint's architecture, layers, vocabulary, dtypes, parameters, bytes, shards and "
        "tokenizer fingerprint, reading headers only. CHECKPOINT is a folder, a .safetensors file, a hub id "
        "(org/name[@revision]), a LoRA adapter folder or model+lora.",
    )
    info.add_argument("checkpoint", metavar="CHECKPOINT")
    info.add_argument("--base", metavar="BASE", help="base model for a LoRA adapter (default: the one it names)")
    info.add_argument("--tensors", action="store_true", help="also list every tensor by layer group")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.set_defaults(handler=_command("info", "run_info"))

    analyze = commands.add_parser(
        "analyze",
        help="task-vector statistics of fine-tunes against their base",
        description="Stream the task vectors τ = θ_model − θ_base and report per-tensor and per-layer norms, "
        "sign-conflict rates, cosine similarities and compatibility warnings.",
    )
    analyze.add_argument("base", metavar="BASE")
    analyze.add_argument("models", metavar="MODEL", nargs="+")
    analyze.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH ('-' for stdout)")
    analyze.add_argument("--density", type=float, default=1.0, help="also count sign conflicts after a top-d trim")
    analyze.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    analyze.add_argument("--no-cache", action="store_true", help="recompute instead of using cached results")
    analyze.add_argument("--memory-budget", metavar="SIZE",
                         help=MEMORY_BUDGET_HELP)
    analyze.set_defaults(handler=_command("analyze", "run_analyze"))

    merge = commands.add_parser(
        "merge",
        help="run a mergekit YAML plan",
        description="Execute a merge plan (mergekit YAML) tensor by tensor on the GPU or CPU and write a "
        "checkpoint that transformers loads.",
    )
    merge.add_argument("plan", metavar="PLAN.yml")
    merge.add_argument("-o", "--output", metavar="OUT", required=True, help="output folder")
    merge.add_argument("--device", help="auto (default, or the plan's mergescope.device), cpu, cuda or cuda:N")
    merge.add_argument("--seed", type=int, help="seed for random methods (DARE, DELLA)")
    merge.add_argument("--force", action="store_true", help="replace an existing output folder")
    merge.add_argument("--dry-run", action="store_true", help="resolve the plan and print what would happen")
    merge.add_argument("--allow-non-finite", action="store_true", help="merge even when inputs hold NaN/Inf")
    merge.add_argument("--memory-budget", metavar="SIZE",
                         help=MEMORY_BUDGET_HELP)
    merge.add_argument("--allow-eval-cmd", action="store_true",
                       help="run the program the plan names (mergescope.greedy_soup.eval_cmd); without it, a plan "
                       "that names one is refused before anything runs")
    merge.set_defaults(handler=_command("merge", "run_merge_command"))

    soup = commands.add_parser(
        "soup",
        help="greedy model soup: average fine-tunes while a held-out score does not drop",
        description="Greedy soup (Wortsman et al. 2022): score each MODEL alone with --eval-cmd, start from the best, "
        "add each next one to the uniform average only if the soup's score does not drop, write the soup to OUT. "
        "The eval command's last stdout line must be the score (higher is better); {model} is the folder to score.",
    )
    soup.add_argument("models", metavar="MODEL", nargs="+", help="the candidate fine-tunes (at least two)")
    soup.add_argument("--eval-cmd", metavar="CMD", required=True, help=EVAL_CMD_HELP)
    soup.add_argument("-o", "--output", metavar="OUT", required=True, help="output folder for the soup")
    soup.add_argument("--device", help="auto (default), cpu, cuda or cuda:N, for the merges")
    soup.add_argument("--force", action="store_true", help="replace an existing output folder")
    soup.add_argument("--keep-scratch", action="store_true", help="keep the candidate soups' scratch folders")
    soup.add_argument("--scratch", metavar="DIR", help="where candidate soups are written (default: beside OUT)")
    soup.add_argument("--timeout", type=float, metavar="S", help="seconds allowed per evaluation")
    soup.set_defaults(handler=_command("soup", "run_soup_command"))

    tune = commands.add_parser(
        "tune",
        help="search a plan's parameters with an eval command (grid, random or CMA-ES; threads or Ray)",
        description="Merge and score candidate plans: each --vary KEY=VALUES sets a path in the plan "
        "(models.0.parameters.weight, parameters.density, ...) to a:b:step (inclusive grid), v1,v2,... or low:high "
        "(a continuous range, for --strategy random or cma). Every candidate goes into a SQLite search file beside "
        "the best plan (--resume continues it; mergescope inspect FILE shows it). Prints the candidates by score "
        "and writes the best plan.",
    )
    tune.add_argument("plan", metavar="PLAN.yml")
    tune.add_argument("--eval-cmd", metavar="CMD", required=True, help=EVAL_CMD_HELP)
    tune.add_argument("--vary", metavar="KEY=VALUES", action="append", required=True,
                      help="a plan path and its values: a:b:step, v1,v2,... or low:high (repeatable)")
    tune.add_argument("--strategy", choices=("grid", "random", "cma"),
                      help="grid (default), random (--budget N draws) or cma (CMA-ES over the low:high ranges)")
    tune.add_argument("--budget", type=int, metavar="N",
                      help="candidates to evaluate (cma: default 40; random: the number of draws; grid: the first N)")
    tune.add_argument("--population", type=int, metavar="P",
                      help="cma: candidates per generation (default 4 + 3·ln(numbers searched))")
    tune.add_argument("--layer-granularity", type=int, metavar="K",
                      help="one value per K layers for every low:high range, written as a gradient list")
    tune.add_argument("--random", type=int, metavar="N", help="sample N distinct candidates of the grid instead of all")
    tune.add_argument("--seed", type=int, default=0, help="seed of the random and cma strategies (default 0)")
    tune.add_argument("--jobs", type=int, default=1, metavar="J",
                      help="candidates merged and scored at once on threads (default 1)")
    tune.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                      help="run candidates as Ray tasks: alone, on a local Ray instance; with ADDRESS (auto, "
                      "HOST:6379, ray://HOST:10001), on that cluster (needs pip install 'mergescope[ray]')")
    tune.add_argument("--cpus-per-trial", type=float, default=1, metavar="C", help="--ray: CPUs per candidate (1)")
    tune.add_argument("--gpus-per-trial", type=float, default=0, metavar="G", help="--ray: GPUs per candidate (0)")
    tune.add_argument("--retries", type=int, default=1, metavar="R",
                      help="--ray: times a candidate whose worker died is run again (default 1)")
    tune.add_argument("--resume", action="store_true",
                      help="continue the search in the search file; evaluated candidates are not run again")
    tune.add_argument("--db", metavar="SEARCH.db", help="the search file (default: BEST.search.db beside BEST.yml)")
    tune.add_argument("-o", "--output", metavar="BEST.yml", help="where the best plan goes (default: PLAN.best.yml)")
    tune.add_argument("--device", help="auto (default, or the plan's mergescope.device), cpu, cuda or cuda:N")
    tune.add_argument("--scratch", metavar="DIR",
                      help="where candidates are merged (default: beside BEST.yml; with --ray each node's temp folder)")
    tune.add_argument("--timeout", type=float, metavar="S", help="seconds allowed per evaluation")
    tune.set_defaults(handler=_command("tune", "run_tune_command"))

    diagnose = commands.add_parser(
        "diagnose",
        help="what a merge kept of each source, per layer, and why it lost the rest",
        description="Compare a merged model (a folder written by mergescope merge, holding mergekit_config.yml) with "
        "the base and sources its plan names: retention <τ_m, τ_i>/|τ_i|² and cosine per layer, the share of each "
        "source's change removed at sign conflicts or by trimming, and a plain-words summary.",
    )
    diagnose.add_argument("merged", metavar="MERGED_DIR")
    diagnose.add_argument("--base", metavar="BASE",
                          help="the base the sources were fine-tuned from (needed when the plan has no base_model)")
    diagnose.add_argument("--json", metavar="PATH", help="write the diagnosis as JSON to PATH ('-' for stdout)")
    diagnose.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    diagnose.add_argument("--memory-budget", metavar="SIZE",
                         help=MEMORY_BUDGET_HELP)
    diagnose.set_defaults(handler=_command("diagnose", "run_diagnose"))

    inspect = commands.add_parser(
        "inspect",
        help="open the interactive terminal UI",
        description="Open the TUI on BASE MODEL..., on a plan (PLAN.yml), on a merged folder or on a search file "
        "(SEARCH.db, written by mergescope tune; it follows a search that is still running).",
    )
    inspect.add_argument("targets", metavar="TARGET", nargs="+")
    inspect.add_argument("--base", metavar="BASE",
                         help="the base of a merged folder whose plan names none (linear soups)")
    inspect.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (analysis, previews, merges)")
    inspect.add_argument("--no-cache", action="store_true", help="recompute the analysis instead of using the cache")
    inspect.set_defaults(handler=_command("inspect", "run_inspect_command"))

    demo = commands.add_parser(
        "demo",
        help="build a workspace of small trained fine-tunes and open the TUI on it",
        description="Train a tiny base model and fine-tunes of it (plus traps) into DIR, then open the TUI.",
    )
    demo.add_argument("directory", metavar="DIR", nargs="?", default="mergescope-demo")
    demo.add_argument("--no-tui", action="store_true", help="build the workspace, print how to open it, exit")
    demo.add_argument("--seed", type=int, default=0, help="seed of every initialisation and data stream (default 0)")
    demo.add_argument(
        "--kernels", choices=KERNELS, default=PORTABLE,
        help="portable (default): pinned CPU kernels, the same weights on every x86-64 machine; native: torch's own "
             "kernels for this CPU",
    )
    demo.set_defaults(handler=_command("demo", "run_demo"))

    evaluate = commands.add_parser(
        "eval",
        help="exact-match accuracy of a demo model on the demo tasks",
        description="Score a demo-architecture model (a folder of the demo workspace, a merged output of it, a LoRA "
        "adapter) by greedy decoding on each task's held-out prompts. Prints a table whose last line is the mean "
        'accuracy as a bare number, so it works as --eval-cmd "mergescope eval {model}".',
    )
    evaluate.add_argument("model", metavar="MODEL")
    evaluate.add_argument("--task", action="append", metavar="T", help="a task to score (repeatable; default: all)")
    evaluate.add_argument("--limit", type=int, metavar="N", help="score only the first N held-out prompts of each task")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    evaluate.set_defaults(handler=_command("evaluate", "run_eval"))
    return parser


def _command(module: str, function: str) -> Callable[[argparse.Namespace], int]:
    """The handler that runs ``mergescope.tui.cli.<module>.<function>(args)``, importing the module only then:
    it imports rich, torch or textual, which ``--help`` must not wait for."""

    def handler(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(f"mergescope.tui.cli.{module}"), function)(args)

    return handler


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    # imported once a command runs: importing mergescope.checkpoints would slow --help down by half
    from mergescope.checkpoints.errors import MergescopeError

    try:
        return args.handler(args)
    except MergescopeError as exc:
        print(f"mergescope: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mergescope: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into head & co.
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
