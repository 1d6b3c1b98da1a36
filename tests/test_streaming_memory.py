"""With row-block streaming, peak memory follows the memory budget, not the tensor size or the number of models.

In a fresh process a first merge and analysis of a small model pay the one-off costs; then, for each of
TIES, task arithmetic, DARE-TIES and DELLA (random drops and L1 rescale, streamed) and the analysis, the peak
RSS (``VmHWM``) is reset and the command runs on a base and 2, then 6, models whose one tensor is 32 MiB
(float32, 4096 × 2048), under a budget that leaves 16 MiB for blocks. Whole tensors would put the growth at
several copies of the tensor per model (hundreds of MiB); blocks keep it at the budget's share whatever the
number of models.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from test_analysis_memory import STABLE_MALLOC

SHAPE = (4096, 2048)
# What a child process that measures peak growth starts with: a budget leaving 16 MiB for blocks, the peak RSS
# (reset by writing 5 to /proc/self/clear_refs), and the heap guard (tests/test_heap.py) off: its releases would
# move the peaks measured.
MEASURING_CHILD = r"""
import json, sys
from mergescope.checkpoints import heap
heap.CEILING = 1e6
from mergescope.checkpoints.row_blocks import RUNTIME_BYTES
from mergescope.merge.executor import run_merge
from mergescope.merge.job import build_job
from mergescope.merge.plan import load_plan
budget = RUNTIME_BYTES + (16 << 20)
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
"""
CHILD = MEASURING_CHILD + r"""
from mergescope.analysis import run_analysis
from mergescope.checkpoints import open_checkpoint
def run(root, what, n):
    if what == "analyze":
        run_analysis(open_checkpoint(root + "/base"), [open_checkpoint(root + f"/m{i}") for i in range(n)],
                     use_cache=False, device="cpu", memory_budget=budget)
    else:
        run_merge(build_job(load_plan(root + f"/{what}{n}.yml")), root + f"/out-{what}{n}", device="cpu",
                  memory_budget=budget)
for what in ("ties", "task_arithmetic", "dare_ties", "della", "analyze"):
    run(sys.argv[1], what, 2)
growth = {}
for what in ("ties", "task_arithmetic", "dare_ties", "della", "analyze"):
    for n in (2, 6):
        open("/proc/self/clear_refs", "w").write("5")
        start = hwm()
        run(sys.argv[2], what, n)
        growth[f"{what}{n}"] = (hwm() - start) / (1 << 20)
print(json.dumps(growth))
"""


def write_models(root: Path, shape: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(*shape, generator=g)
    for name in ("base", *(f"m{i}" for i in range(6))):
        (root / name).mkdir(parents=True)
        tensor = base if name == "base" else base + 0.01 * torch.randn(*shape, generator=g)
        save_file({"model.embed_tokens.weight": tensor}, str(root / name / "model.safetensors"))
    for method in ("ties", "task_arithmetic", "dare_ties", "della"):
        for n in (2, 6):
            parameters = {"weight": 0.5, "density": 0.5, **({"epsilon": 0.1} if method == "della" else {})}
            plan = {"merge_method": method, "base_model": str(root / "base"),
                    "models": [{"model": str(root / f"m{i}"), "parameters": parameters} for i in range(n)]}
            (root / f"{method}{n}.yml").write_text(yaml.safe_dump(plan))


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_peak_memory_follows_the_budget_not_the_tensor_or_the_models(tmp_path):
    write_models(tmp_path / "small", (256, 256))
    write_models(tmp_path / "large", SHAPE)
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "small"), str(tmp_path / "large")],
        capture_output=True, text=True, timeout=600, env={**os.environ, **STABLE_MALLOC},
    )
    assert out.returncode == 0, out.stderr
    growth = json.loads(out.stdout.strip().splitlines()[-1])
    tensor_mib = SHAPE[0] * SHAPE[1] * 4 / (1 << 20)
    for mib in growth.values():
        assert mib < tensor_mib, growth  # less than one input tensor, whatever the number of models
    for what in ("ties", "task_arithmetic", "dare_ties", "della", "analyze"):
        assert growth[f"{what}6"] - growth[f"{what}2"] < 8, growth  # flat as models are added
