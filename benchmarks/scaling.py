"""Time and peak RSS of analyze, task arithmetic and TIES as models get wider and more numerous, against the
whole-process read floor and mergekit, all in one run.

    python benchmarks/scaling.py [--models 2 4 8] [--mergekit-max-models 4] [--skip-width]

Width: the ~267M-parameter fixture (``llama_fixture.py``, base + 3 fine-tunes, largest tensor 32000 × 1024)
and the Llama-3-8B-wide one (``wide_fixture.py``, base + 3 fine-tunes, 128256 × 4096 embeddings and head, two
8B decoder layers). Number of models: the wide fixture's base with 2, 4 and 8 fine-tunes. Plans as in
issue 13: ``dtype: bfloat16``, weight 0.5, TIES density 0.5; ``--device cpu``, fresh processes, page cache
warmed before each set (a set larger than the free memory is read from disk: the floor says so too).
Each command runs under ``/usr/bin/time`` (wall time, peak RSS). The floor is one process reading every tensor
of every model once through ``safetensors`` (``safe_open``/``get_tensor``, copied into owned memory: the
tensor it returns only views the file's mapping) and dropping it.

mergekit's TIES on the wide fixture took 464 s and 23 GB (mapped file pages) with three fine-tunes on a 24 GB
machine: ``--mergekit-max-models`` limits the model counts mergekit runs at (default 4; 0 for none).
Outputs go to a temporary folder under ``bench-out/`` and are deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

import llama_fixture  # noqa: E402
import wide_fixture  # noqa: E402
from merge_llama import timed  # noqa: E402
from mergekit_env import ensure_mergekit_venv  # noqa: E402
from read_checkpoints import _warm_cache  # noqa: E402

# safetensors >= 0.6 returns tensors that view its memory map, so get_tensor alone reads nothing: each tensor is
# copied into memory it owns (what a reader must do), on one thread (see read_checkpoints.py)
FLOOR = r"""
import sys
from pathlib import Path
import torch
from safetensors import safe_open
torch.set_num_threads(1)
for model in sys.argv[1:]:
    for shard in sorted(Path(model).glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                f.get_tensor(name).clone()
"""


def plan(method: str, base: Path, models: list[Path]) -> dict:
    parameters = {"weight": 0.5, "density": 0.5} if method == "ties" else {"weight": 0.5}
    return {"merge_method": method, "base_model": str(base), "dtype": "bfloat16",
            "models": [{"model": str(m), "parameters": dict(parameters)} for m in models]}


def measure(label: str, base: Path, models: list[Path], work: Path, mergekit: Path, caps: dict[str, int]
            ) -> list[dict]:
    """The floor, analyze, and both merges with mergescope, and with mergekit where ``caps[method]`` allows
    this many fine-tunes, on one model set."""
    mergescope = str(Path(sys.executable).with_name("mergescope"))
    warm = _warm_cache([base, *models])
    floor = [sys.executable, "-c", FLOOR, str(base), *map(str, models)]
    rows = [{"set": label, "command": "read floor", **_run(floor)}]
    rows.append({"set": label, "command": "analyze", **_run([mergescope, "analyze", str(base), *map(str, models),
                                                           "--no-cache", "--device", "cpu", "--json", "/dev/null"])})
    for method in ("task_arithmetic", "ties"):
        path = work / f"{method}.yml"
        path.write_text(yaml.safe_dump(plan(method, base, models), sort_keys=False))
        out = work / "out"
        rows.append({"set": label, "command": f"{method} mergescope",
                     **_run([mergescope, "merge", str(path), "-o", str(out), "--device", "cpu", "--force"])})
        shutil.rmtree(out, ignore_errors=True)
        if len(models) <= caps[method]:
            rows.append({"set": label, "command": f"{method} mergekit",
                         **_run([str(mergekit), str(path), str(out), "--device", "cpu", "--no-copy-tokenizer",
                                 "--quiet", "--lazy-unpickle"])})
            shutil.rmtree(out, ignore_errors=True)
    for row in rows:
        row["input_gb"] = round(warm / 1e9, 2)
    return rows


def _run(cmd: list[str]) -> dict:
    seconds, rss = timed(cmd)
    print(f"  {seconds:7.1f} s {rss / 1e9:6.2f} GB  {' '.join(Path(c).name if '/' in c else c for c in cmd[:3])}",
          file=sys.stderr, flush=True)
    return {"seconds": seconds, "rss_gb": round(rss / 1e9, 2)}


def print_table(rows: list[dict]) -> None:
    sets = list(dict.fromkeys(r["set"] for r in rows))
    by = {(r["set"], r["command"]): r for r in rows}
    print(f"| command | {' | '.join(sets)} |")
    print(f"|---|{'---|' * len(sets)}")
    for command in dict.fromkeys(r["command"] for r in rows):
        cells = []
        for s in sets:
            row = by.get((s, command))
            if row is None:
                cells.append("–")
                continue
            floor = by[(s, "read floor")]["seconds"]
            ratio = ""
            theirs = by.get((s, command.replace("mergescope", "mergekit")))
            if command.endswith("mergescope") and theirs is not None:
                ratio = f", {row['seconds'] / theirs['seconds']:.2f}× mergekit"
            elif command == "analyze":
                ratio = f", {row['seconds'] / floor:.2f}× floor"
            cells.append(f"{row['seconds']:.1f} s, {row['rss_gb']:.2f} GB{ratio}")
        print(f"| {command} | {' | '.join(cells)} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=int, nargs="*", default=[2, 4, 8], help="fine-tune counts on the wide fixture")
    parser.add_argument("--mergekit-max-models", type=int, default=4, help="most fine-tunes mergekit's TA runs on")
    parser.add_argument("--mergekit-ties-max-models", type=int, default=2,
                        help="most fine-tunes mergekit's TIES runs on (wide, 3 fine-tunes: 464 s, 23 GB)")
    parser.add_argument("--skip-width", action="store_true", help="only the model-count sets")
    parser.add_argument("--json", type=Path, help="also write every measurement here")
    args = parser.parse_args(argv)
    mergekit = ensure_mergekit_venv(quiet=True)
    most = max([3, *args.models])
    wide = wide_fixture.build(wide_fixture.default_root(), most)
    names = wide_fixture.model_names(most)
    work = Path(tempfile.mkdtemp(prefix="scaling-", dir=wide_fixture.BENCH_OUT))
    caps = {"task_arithmetic": args.mergekit_max_models, "ties": args.mergekit_ties_max_models}
    rows: list[dict] = []
    began = time.perf_counter()
    try:
        if not args.skip_width:
            small = llama_fixture.build(llama_fixture.default_root())
            print("267M fixture, 3 fine-tunes", file=sys.stderr)
            rows += measure("267M ×3", small["base"], [small[k] for k in llama_fixture.FINETUNES], work, mergekit,
                            {"task_arithmetic": 3, "ties": 3})
            print("wide fixture, 3 fine-tunes", file=sys.stderr)
            rows += measure("wide ×3", wide["base"], [wide[n] for n in names[1:4]], work, mergekit, caps)
        for n in args.models:
            print(f"wide fixture, {n} fine-tunes", file=sys.stderr)
            rows += measure(f"wide ×{n}", wide["base"], [wide[m] for m in names[1 : n + 1]], work, mergekit, caps)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_table(rows)
    print(f"total {time.perf_counter() - began:.0f} s", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
