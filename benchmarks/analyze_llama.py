"""Analysis wall time and peak memory against the floor of reading the same tensors once.

    python benchmarks/analyze_llama.py [--scale S] [--density D] [--repeats N]

Builds (once) the ~267M-parameter bf16 Llama-shaped base and three fine-tunes of ``llama_fixture.py``
(4 × 534 MB), warms the page cache, then measures, each in a fresh process and alternating, best of
``--repeats``:

* **floor** — every tensor of the four models read once through ``safetensors`` (``get_tensor().clone()``,
  an owning copy, what an analysis needs at least);
* **analysis** — ``mergescope.analysis.run_analysis(base, [ft_a, ft_b, ft_c], use_cache=False)`` on the CPU.

It prints both wall times, their ratio, each process's peak RSS (``VmHWM``, reset just before the measured
part), and checks the analysis against the statistics the fixture recorded while it was built.
Goals (issue 3): ratio ≤ 1.5, peak RSS ≤ 1 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from llama_fixture import FINETUNES, build, default_root, load_manifest  # noqa: E402
from read_checkpoints import _peak_rss, _reset_peak_rss, _rss_now, _shards_in_order, _warm_cache  # noqa: E402


def _child(part: str, root: Path, density: float) -> dict:
    import torch

    torch.zeros(1 << 10).sum()  # one-off start-up of torch's kernels, outside the timed part
    from safetensors import safe_open

    from mergescope.analysis import run_analysis
    from mergescope.checkpoints import open_checkpoint

    paths = build(root, quiet=True)
    _reset_peak_rss()
    rss_start = _rss_now()
    started = time.perf_counter()
    extra: dict = {}
    if part == "floor":
        for key in ("base", *FINETUNES):
            for shard, names in _shards_in_order(paths[key]):
                with safe_open(str(shard), framework="pt") as f:
                    for name in names:
                        f.get_tensor(name).clone()
    else:
        base = open_checkpoint(paths["base"])
        models = [open_checkpoint(paths[k]) for k in FINETUNES]
        report = run_analysis(base, models, density=density, use_cache=False, device="cpu")
        extra["total"] = report["total"]
    seconds = time.perf_counter() - started
    return {"part": part, "seconds": seconds, "rss_start": rss_start, "peak_rss": _peak_rss(), **extra}


def _run(part: str, root: Path, density: float) -> dict:
    cmd = [sys.executable, __file__, "--child", part, "--root", str(root), "--density", str(density)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{part} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--density", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--root", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    root = args.root or default_root(args.scale)
    if args.child:
        print(json.dumps(_child(args.child, root, args.density)))
        return 0

    paths = build(root, scale=args.scale)
    nbytes = _warm_cache([paths["base"], *(paths[k] for k in FINETUNES)])
    runs: dict[str, list[dict]] = {"floor": [], "analysis": []}
    for i in range(args.repeats):
        for part in ("floor", "analysis") if i % 2 == 0 else ("analysis", "floor"):
            runs[part].append(_run(part, root, args.density))
    best = {part: min(r, key=lambda r: r["seconds"]) for part, r in runs.items()}
    print(
        f"machine  {os.cpu_count()} CPUs; {nbytes / 1e9:.2f} GB of weights (base + {len(FINETUNES)} fine-tunes), "
        "warm page cache"
    )
    print(f"{'':12s}{'best':>9s}{'GB/s':>8s}   all runs (s)          peak RSS   above start")
    for part, result in best.items():
        times = " ".join(f"{r['seconds']:.2f}" for r in runs[part])
        print(
            f"{part:12s}{result['seconds']:8.2f}s{nbytes / result['seconds'] / 1e9:8.2f}   {times:20s}"
            f"{result['peak_rss'] / 1e6:8.0f} MB {(result['peak_rss'] - result['rss_start']) / 1e6:8.0f} MB"
        )
    ratio = best["analysis"]["seconds"] / best["floor"]["seconds"]
    print(
        f"analysis / floor: {ratio:.2f}x (goal <= 1.5x); "
        f"analysis peak RSS {best['analysis']['peak_rss'] / 1e6:.0f} MB (goal <= 1000 MB)"
    )
    realised = (load_manifest(root) or {}).get("realised", {})
    total = best["analysis"]["total"]
    print("check against the statistics the fixture builder recorded (float64, independent code):")
    for name, value in realised.get("relative_norm", {}).items():
        print(f"  rel {name:10s} fixture {value:.8f}  analysis {total['delta'][name]['rel']:.8f}")
    pairs = {(p["a"], p["b"]): p for p in total["pairs"]}
    for key, value in realised.get("cosine", {}).items():
        a, b = key.split("|")
        print(f"  cosine {key:12s} fixture {value:+.8f}  analysis {pairs[a, b]['cosine']:+.8f}")
    for key, value in realised.get("sign_conflict_rate", {}).items():
        a, b = key.split("|")
        print(f"  sign conflict {key:5s} fixture {value:.8f}  analysis {pairs[a, b]['sign_conflict']:.8f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
