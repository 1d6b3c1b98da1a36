"""Every merge method on the Llama-3-8B-wide fixture: wall time and peak RSS against the read floor, one run.

    python benchmarks/methods_memory.py [--methods ties dare_ties ...] [--memory-budget 1.5GB] [--json FILE]

The issue-13 goal is a peak RSS of at most the memory budget (default 1.5 GB) for every command, whatever the
width of a tensor: this runs each method once on the wide fixture (``wide_fixture.py``: 128256 × 4096
embeddings and head, two 8B decoder layers, bf16) with its base and two fine-tunes (one for the two-model
methods), ``dtype: bfloat16``, ``--device cpu``, the page cache warmed, each command under ``/usr/bin/time``.
The floor is one process reading every tensor of the same models once through ``safetensors``
(``scaling.py``'s floor). A method that reads a tensor whole shows it at once: one float32 copy of the
embeddings is 2.1 GB.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

import wide_fixture  # noqa: E402
from merge_llama import timed  # noqa: E402
from read_checkpoints import _warm_cache  # noqa: E402
from scaling import FLOOR  # noqa: E402

#: method (or ties_rescale) → (fine-tunes, per-model parameters, plan parameters)
CASES: dict[str, tuple[int, dict, dict]] = {
    "linear": (2, {}, {}),
    "task_arithmetic": (2, {"weight": 0.5}, {}),
    "ties": (2, {"weight": 0.5, "density": 0.5}, {}),
    "ties_rescale": (2, {"weight": 0.5, "density": 0.5}, {"rescale": True}),
    "dare_linear": (2, {"weight": 0.5, "density": 0.5}, {}),
    "dare_ties": (2, {"weight": 0.5, "density": 0.5}, {}),
    "breadcrumbs": (2, {"weight": 0.5, "density": 0.9, "gamma": 0.01}, {}),
    "breadcrumbs_ties": (2, {"weight": 0.5, "density": 0.9, "gamma": 0.01}, {}),
    "della": (2, {"weight": 0.5, "density": 0.5, "epsilon": 0.1}, {}),
    "della_linear": (2, {"weight": 0.5, "density": 0.5, "epsilon": 0.1}, {}),
    "slerp": (1, {}, {"t": 0.5}),
    "nearswap": (1, {}, {"t": 0.001}),
    "model_stock": (2, {}, {}),
    "sce": (2, {}, {"select_topk": 0.5}),
    "nuslerp": (2, {"weight": 0.5}, {}),
    "multislerp": (2, {"weight": 0.5}, {}),
    "karcher": (2, {}, {}),
    "ram": (2, {}, {}),
    "ramplus_tl": (2, {}, {}),
    "arcee_fusion": (1, {}, {}),
    "passthrough": (1, {}, {}),
}
#: methods whose base is a plain input (no base_model)
NO_BASE = {"linear", "karcher", "passthrough"}


def plan(case: str, base: Path, fine_tunes: list[Path]) -> dict:
    """The plan of ``case`` (a method name, or ``ties_rescale``) on ``base`` and its first fine-tunes."""
    method = "ties" if case == "ties_rescale" else case
    count, per_model, top = CASES[case]
    models = fine_tunes[:count]
    if method in NO_BASE:  # the models are the inputs; linear averages the base with its fine-tunes
        inputs = [base, *models] if method == "linear" else models
        document = {"merge_method": method, "models": [{"model": str(m)} for m in inputs]}
        if method == "linear":
            for entry in document["models"]:
                entry["parameters"] = {"weight": 1.0}
    else:
        document = {"merge_method": method, "base_model": str(base),
                    "models": [{"model": str(m), **({"parameters": dict(per_model)} if per_model else {})}
                               for m in models]}
    if top:
        document["parameters"] = dict(top)
    document["dtype"] = "bfloat16"
    return document


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="*", default=list(CASES), help=f"of {', '.join(CASES)}")
    parser.add_argument("--memory-budget", default="1.5GB")
    parser.add_argument("--root", type=Path, default=wide_fixture.default_root())
    parser.add_argument("--json", type=Path, help="also write every measurement here")
    args = parser.parse_args(argv)
    unknown = [m for m in args.methods if m not in CASES]
    if unknown:
        parser.error(f"unknown methods: {', '.join(unknown)}")
    paths = wide_fixture.build(args.root, fine_tunes=2, layers=2)
    base, fine_tunes = paths["base"], [paths["ft_1"], paths["ft_2"]]
    models = [base, *fine_tunes]
    warm = _warm_cache(models)
    floor_seconds, floor_rss = timed([sys.executable, "-c", FLOOR, *map(str, models)])
    print(f"read floor (base + 2 fine-tunes, {warm / 1e9:.1f} GB): {floor_seconds:.1f} s", file=sys.stderr)
    mergescope = str(Path(sys.executable).with_name("mergescope"))
    rows = []
    wide_fixture.BENCH_OUT.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=wide_fixture.BENCH_OUT) as scratch:
        work = Path(scratch)
        for case in args.methods:
            path = work / f"{case}.yml"
            path.write_text(yaml.safe_dump(plan(case, base, fine_tunes), sort_keys=False))
            out = work / "out"
            seconds, rss = timed([mergescope, "merge", str(path), "-o", str(out), "--device", "cpu", "--force",
                                  "--memory-budget", args.memory_budget])
            shutil.rmtree(out, ignore_errors=True)
            inputs = CASES[case][0] + 1
            row = {"method": case, "inputs": inputs, "seconds": seconds, "rss_gb": round(rss / 1e9, 2)}
            rows.append(row)
            print(f"  {case:17s} {seconds:7.1f} s {rss / 1e9:6.2f} GB", file=sys.stderr, flush=True)
    print(f"| method | inputs | time | × read floor ({floor_seconds:.1f} s, 3 models) | peak RSS |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['method']} | {row['inputs']} | {row['seconds']:.1f} s | "
              f"{row['seconds'] / floor_seconds:.2f}× | {row['rss_gb']:.2f} GB |")
    if args.json:
        args.json.write_text(json.dumps({"floor_seconds": floor_seconds, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
