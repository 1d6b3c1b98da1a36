"""Time of the streamed selection (:mod:`mergescope.merge.magnitude_trim`) against a floor measured in the same
run: one pass over the same blocks forming every model's |τ| and summing it (what any selection must at least
do). In memory, bf16 inputs, one torch thread, like one merge worker. The selections: TIES' threshold and tie cut
of each model's |τ| (density 0.5), Breadcrumbs' two cuts of each (density 0.5, γ 0.01), sce's top 30 % of the
variance across the models (one series formed from all models), and three quantiles of the signed τ of the first
model (the float-comparison counting that arcee_fusion's importance, which may be negative, takes).

    python benchmarks/streamed_selection.py [--entries 134217728] [--models 3] [--repeat 5]

Prints the best of ``--repeat`` alternated runs of each, and the ratio selection / floor.
"""

from __future__ import annotations

import argparse
import time

import torch

from mergescope.merge import magnitude_counts, magnitude_trim, sparsify
from mergescope.merge.methods.adaptive import model_variance


def floor_pass(base: torch.Tensor, models: list[torch.Tensor], block: int) -> float:
    total = 0.0
    source = magnitude_counts.TensorBlocks(base, models, block)
    for _, base_block, blocks in source.blocks(list(range(len(models)))):
        b = base_block.float()
        for model in blocks:
            total += float(model.float().sub_(b).abs_().sum())
    return total


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--entries", type=int, default=1 << 27)
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(args.entries, generator=g).bfloat16()
    models = [(base.float() + 0.01 * torch.randn(args.entries, generator=g)).bfloat16() for _ in range(args.models)]
    counts = [args.entries // 2] * args.models
    block = magnitude_counts.block_size(base.device)
    source = magnitude_counts.TensorBlocks(base, models, block)
    everyone = list(range(args.models))
    outliers = [s for i in everyone for s in sparsify.outlier_selections(args.entries, 0.5, 0.01, i)]
    variance = magnitude_counts.BlockScores(
        source, everyone, lambda start, b, ms: [model_variance(torch.stack([m.float() - b.float() for m in ms]))],
        elementwise=True)
    signed = magnitude_counts.BlockScores(source, [0], lambda start, b, ms: [ms[0].float() - b.float()], signed=True)
    quantiles = [magnitude_trim.Selection(0, args.entries - int(q * (args.entries - 1))) for q in (0.25, 0.5, 0.75)]
    runs = {
        "floor": lambda: floor_pass(base, models, block),
        "TIES cuts": lambda: magnitude_trim.top_magnitude_cuts(base, models, counts),
        "Breadcrumbs cuts": lambda: magnitude_trim.select_cuts(magnitude_counts.TaskMagnitudes(source), outliers),
        "sce variance cut": lambda: magnitude_trim.select_cuts(
            variance, [magnitude_trim.Selection(0, int(0.3 * args.entries))]),
        "signed quantiles": lambda: magnitude_trim.select_cuts(signed, quantiles),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeat):  # alternated, so that load from other processes hits all alike
        for name, run in runs.items():
            times[name].append(timed(run))
    floor = min(times["floor"])
    print(f"{args.entries} entries × {args.models} models (bf16), best of {args.repeat}: floor {floor:.3f} s")
    for name in list(runs)[1:]:
        print(f"  {name}: {min(times[name]):.3f} s, {min(times[name]) / floor:.2f}× floor")


if __name__ == "__main__":
    main()
