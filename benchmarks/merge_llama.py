"""mergescope merge vs mergekit-yaml on the same plans, same machine, same run.

    python benchmarks/merge_llama.py [--scale S] [--methods ties task_arithmetic] [--repeats N]

Builds (once) the ~267M-parameter bf16 Llama base and three fine-tunes of ``llama_fixture.py`` and the
mergekit 0.1.5 venv of ``mergekit_env.py``, warms the page cache, then runs each plan with both tools
(``--device cpu``, fresh processes, alternating, best of ``--repeats``) under ``/usr/bin/time`` for wall
time and peak RSS. Plans compute in float32 (``dtype: float32``) and write bfloat16, so both tools do the
same arithmetic; the outputs are compared tensor by tensor (bf16: within one rounding step).

Goals (issue 4): TIES (density 0.5) ≤ 0.2× mergekit's wall time, task arithmetic ≤ 0.5×, peak RSS ≤ 1 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from llama_fixture import FINETUNES, build, default_root  # noqa: E402
from mergekit_env import ensure_mergekit_venv  # noqa: E402
from read_checkpoints import _warm_cache  # noqa: E402

PLANS = {
    "ties": {"parameters": {"weight": 1.0, "density": 0.5}, "top": {"normalize": True}},
    "task_arithmetic": {"parameters": {"weight": 0.5}, "top": {}},
    "dare_ties": {"parameters": {"weight": 1.0, "density": 0.5}, "top": {}},
    "linear": {"parameters": {"weight": 1.0}, "top": {}},
}


def plan_for(method: str, paths: dict[str, Path]) -> dict:
    spec = PLANS[method]
    plan = {"merge_method": method}
    if method != "linear":
        plan["base_model"] = str(paths["base"])
    plan["models"] = [{"model": str(paths[k]), "parameters": dict(spec["parameters"])} for k in FINETUNES]
    if spec["top"]:
        plan["parameters"] = dict(spec["top"])
    plan.update({"dtype": "float32", "out_dtype": "bfloat16"})
    return plan


def timed(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of ``cmd``, from GNU time."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as report:
        proc = subprocess.run(["/usr/bin/time", "-o", report.name, "-f", "%e %M", *cmd], capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
        seconds, kilobytes = report.read().split()[-2:]
    return float(seconds), int(kilobytes) * 1024


def alternate(
    commands: dict[str, list[str]], repeats: int, run=None, before=None
) -> dict[str, list[tuple[float, int]]]:
    """Each command ``repeats`` times, the order reversed every other round so that neither always runs second;
    the (seconds, peak RSS) of every run by ``run`` (default :func:`timed`). ``before(name)`` runs first."""
    names = list(commands)
    runs: dict[str, list[tuple[float, int]]] = {name: [] for name in names}
    for i in range(repeats):
        for name in names if i % 2 == 0 else names[::-1]:
            if before is not None:
                before(name)
            runs[name].append((run or timed)(commands[name]))
    return runs


def compare(ours: Path, theirs: Path) -> tuple[int, float]:
    """Tensors compared and the largest difference in units of bf16 rounding (2⁻⁸ relative)."""
    import torch
    from safetensors import safe_open

    def tensors(folder: Path) -> dict[str, tuple[Path, str]]:
        found = {}
        for shard in folder.glob("*.safetensors"):
            with safe_open(str(shard), framework="pt") as f:
                found.update({name: (shard, name) for name in f.keys()})
        return found

    a, b = tensors(ours), tensors(theirs)
    if set(a) != set(b):
        raise SystemExit(f"different tensor names: {sorted(set(a) ^ set(b))[:5]}")
    worst = 0.0
    for name in a:
        with safe_open(str(a[name][0]), framework="pt") as f:
            x = f.get_tensor(name).float()
        with safe_open(str(b[name][0]), framework="pt") as f:
            y = f.get_tensor(name).float()
        ulp = torch.maximum(x.abs(), y.abs()) * 2**-8 + 1e-30
        worst = max(worst, float(((x - y).abs() / ulp).max()))
    return len(a), worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--methods", nargs="+", default=["ties", "task_arithmetic"], choices=sorted(PLANS))
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)

    paths = build(default_root(args.scale), scale=args.scale)
    mergekit_yaml = ensure_mergekit_venv(quiet=False)
    mergescope = shutil.which("mergescope") or str(Path(sys.executable).with_name("mergescope"))
    nbytes = _warm_cache([paths["base"], *(paths[k] for k in FINETUNES)])
    work = Path(tempfile.mkdtemp(prefix="merge-bench-", dir=default_root(args.scale).parent))
    print(f"machine  {os.cpu_count()} CPUs; inputs {nbytes / 1e9:.2f} GB (bf16 base + {len(FINETUNES)} fine-tunes), "
          "warm page cache")
    print(f"{'method':16s}{'mergekit':>10s}{'mergescope':>12s}{'ratio':>8s}{'goal':>7s}{'RSS mergekit':>14s}"
          f"{'RSS ours':>10s}  outputs")
    goals = {"ties": 0.2, "task_arithmetic": 0.5}
    try:
        for method in args.methods:
            plan = work / f"{method}.yml"
            plan.write_text(yaml.safe_dump(plan_for(method, paths), sort_keys=False))
            out = {tool: work / f"{method}-{tool}" for tool in ("mergekit", "mergescope")}
            commands = {
                "mergekit": [str(mergekit_yaml), str(plan), str(out["mergekit"]), "--device", "cpu",
                             "--no-copy-tokenizer", "--quiet", "--lazy-unpickle"],
                "mergescope": [mergescope, "merge", str(plan), "-o", str(out["mergescope"]), "--device", "cpu",
                               "--force"],
            }
            # out is this iteration's: alternate() calls the lambda before it returns
            runs = alternate(commands, args.repeats, before=lambda tool: shutil.rmtree(out[tool], ignore_errors=True))  # noqa: B023
            best = {tool: min(r) for tool, r in runs.items()}
            count, worst = compare(work / f"{method}-mergescope", work / f"{method}-mergekit")
            ratio = best["mergescope"][0] / best["mergekit"][0]
            goal = goals.get(method)
            print(
                f"{method:16s}{best['mergekit'][0]:9.1f}s{best['mergescope'][0]:11.1f}s{ratio:7.2f}x"
                f"{(f'{goal:.1f}x' if goal else '–'):>7s}"
                f"{best['mergekit'][1] / 1e9:12.2f}GB{best['mergescope'][1] / 1e9:8.2f}GB"
                f"  {count} tensors, max diff {worst:.1f} bf16 steps"
            )
            print(json.dumps({"method": method, "runs": runs}), file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
