"""Does the demo's story hold on every build? Builds the demo workspace for several seeds and both kernel
settings, merges every plan, measures every accuracy, and prints each claim of ``mergescope.demo.story``
(the README's demo claims) as min / median / max over the builds, with the bound it must meet.

    python benchmarks/demo_robustness.py [--seeds 0 1 2 3 4] [--kernels portable native] [--jobs 2] [--out DIR] \
        [--json F]

``portable`` pins the CPU kernels (the same weights on every x86-64 machine); ``native`` trains with torch's
own kernels for this CPU, so the two settings are two genuinely different numerical histories per seed —
the spread a user on another machine could see if the pins did not hold. Workspaces are kept under
``bench-out/demo-robustness/`` (git-ignored) and reused by a second run. ``--jobs`` builds run at once (each
trains on one thread, so two use a 2-core machine fully).

Also printed: each model's and merge's accuracy range, the build and merge times, and whether the portable
builds are byte-identical when the outer environment asks for other kernels (``ATEN_CPU_CAPABILITY=avx2``,
``MKL_ENABLE_INSTRUCTIONS=SSE4_2``) — they must be, since the build pins its own.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from mergescope.demo.evaluate import evaluate
from mergescope.demo.manifest import read_manifest
from mergescope.demo.recipe import Recipe
from mergescope.demo.story import CLAIMS, MERGES, Scores
from mergescope.demo.workspace import build_workspace
from mergescope.merge.executor import run_merge
from mergescope.merge.job import build_job
from mergescope.merge.plan import load_plan

REPO = Path(__file__).resolve().parent.parent


def measure(workspace: Path, merged_root: Path) -> Scores:
    """Every folder's accuracies (from the manifest, measured at build time) and every plan's merge."""
    manifest = read_manifest(workspace)
    scores: Scores = {name: dict(acc) for name, acc in manifest["accuracy"].items()}
    for plan in MERGES:
        out = merged_root / plan
        if not (out / "model.safetensors").exists():
            run_merge(build_job(load_plan(workspace / "plans" / f"{plan}.yml")), out, device="cpu", overwrite=True)
        scores[f"merge:{plan}"] = evaluate(out)
    return scores


def spread(values: list[float]) -> str:
    return f"{min(values):+.3f} / {statistics.median(values):+.3f} / {max(values):+.3f}"


def markdown_tables(runs: dict[str, Scores], names: list[str], tasks: list[str]) -> str:
    """The README's two tables: each claim's range and bound, and each model's and merge's accuracy range."""
    def cell(values: list[float]) -> str:
        low, mid, high = min(values), statistics.median(values), max(values)
        return f"{low:.2f} / {mid:.2f} / {high:.2f}"

    lines = ["| claim | bound | min / median / max | holds |", "| --- | --- | --- | --- |"]
    for claim in CLAIMS:
        values = [claim.value(s) for s in runs.values()]
        holds = sum(claim.holds(s) for s in runs.values())
        lines.append(f"| {claim.text} | {claim.condition} | {cell(values)} | {holds}/{len(runs)} |")
    lines += ["", "| model or merge | " + " | ".join(tasks) + " |", "| --- |" + " ---: |" * len(tasks)]
    for name in names:
        percent = [[100 * s[name][t] for s in runs.values()] for t in tasks]
        lines.append(f"| `{name}` | " + " | ".join(
            f"{min(v):.0f}–{max(v):.0f}% ({statistics.median(v):.0f})" for v in percent) + " |")
    return "\n".join(lines)


def outer_environment_check(root: Path, seed: int, reference: dict) -> list[str]:
    """Rebuild ``seed`` portably under outer environments that ask for other kernels; the digests must match."""
    lines = []
    for variable, value in (("ATEN_CPU_CAPABILITY", "avx2"), ("MKL_ENABLE_INSTRUCTIONS", "SSE4_2")):
        before = os.environ.get(variable)
        os.environ[variable] = value
        try:
            folder = build_workspace(root / f"seed{seed}-portable-{variable.lower()}", recipe=Recipe(seed=seed))
        finally:
            if before is None:
                os.environ.pop(variable)
            else:
                os.environ[variable] = before
        same = read_manifest(folder)["weights_sha256"] == reference
        lines.append(f"  outer {variable}={value}: {'byte-identical' if same else 'DIFFERENT'} weights")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--kernels", nargs="+", default=["portable", "native"], choices=["portable", "native"])
    parser.add_argument("--out", type=Path, default=REPO / "bench-out" / "demo-robustness")
    parser.add_argument("--json", type=Path, help="also write every build's scores and claim values here")
    parser.add_argument("--no-outer-check", action="store_true", help="skip the rebuilds under other outer kernels")
    parser.add_argument("--jobs", type=int, default=2, help="builds at once (default 2)")
    parser.add_argument("--markdown", action="store_true", help="also print the README's tables")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # evaluation and merges here: one thread per job, like the builds

    def one(seed: int, kernels: str) -> tuple[str, Scores, float]:
        key = f"seed{seed}-{kernels}"
        start = time.perf_counter()
        workspace = build_workspace(args.out / key, recipe=Recipe(seed=seed), kernels=kernels)
        built = time.perf_counter() - start
        scores = measure(workspace, args.out / "merged" / key)
        seconds = read_manifest(workspace).get("train_seconds", built)
        held = sum(c.holds(scores) for c in CLAIMS)
        print(f"{key}: trained in {seconds:.0f} s, {held}/{len(CLAIMS)} claims hold", file=sys.stderr, flush=True)
        return key, scores, seconds

    with ThreadPoolExecutor(args.jobs) as pool:
        done = list(pool.map(lambda sk: one(*sk), [(s, k) for s in args.seeds for k in args.kernels]))
    runs: dict[str, Scores] = {key: scores for key, scores, _ in done}
    times: dict[str, float] = {key: seconds for key, _, seconds in done}

    print(f"\n{len(runs)} builds: seeds {args.seeds} × kernels {args.kernels}; training time "
          f"{min(times.values()):.0f}–{max(times.values()):.0f} s (one thread each, {args.jobs} at once)\n")
    print(f"{'claim':<28} {'bound':>7}   {'min / median / max':<24} holds")
    failed = 0
    for claim in CLAIMS:
        values = [claim.value(s) for s in runs.values()]
        holds = sum(claim.holds(s) for s in runs.values())
        failed += holds < len(runs)
        print(f"{claim.name:<28} {claim.condition:>7}   {spread(values):<24} {holds}/{len(runs)}")
    print("\naccuracy (min / median / max over builds)")
    names = list(next(iter(runs.values())))
    tasks = list(next(iter(runs.values()))["base"])
    print(f"{'model or merge':<26}" + "".join(f"{t:>26}" for t in tasks))
    for name in names:
        print(f"{name:<26}" + "".join(f"{spread([s[name][t] for s in runs.values()]):>26}" for t in tasks))

    if "portable" in args.kernels and not args.no_outer_check:
        seed = args.seeds[0]
        reference = read_manifest(args.out / f"seed{seed}-portable")["weights_sha256"]
        print(f"\nportable build of seed {seed} under other outer kernel settings:")
        print("\n".join(outer_environment_check(args.out, seed, reference)))
    if args.markdown:
        print("\n" + markdown_tables(runs, names, tasks))
    if args.json:
        document = {"runs": runs, "train_seconds": times,
                    "claims": {c.name: {k: c.value(s) for k, s in runs.items()} for c in CLAIMS}}
        args.json.write_text(json.dumps(document, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
