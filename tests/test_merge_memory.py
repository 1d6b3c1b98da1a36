"""The merge executor keeps memory bounded by a few copies of the largest tensor, not the model size.

As in test_analysis_memory: in a fresh process a first merge of a small model pays the one-off costs,
then the peak RSS is reset and a model with the same largest tensor but 8× more tensors is merged (TIES,
three models, 64 MiB each). Streaming holds two output tensors' float32 inputs (2 × 4 × 1 MiB), the
trim's scratch and one output tensor; holding the models would add 256 MiB.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from test_analysis_memory import STABLE_MALLOC, write_models

CHILD = r"""
import json, sys
from mergescope.merge.executor import run_merge
from mergescope.merge.job import build_job
from mergescope.merge.plan import load_plan
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
run_merge(build_job(load_plan(sys.argv[1] + "/plan.yml")), sys.argv[1] + "/out", device="cpu")
open("/proc/self/clear_refs", "w").write("5")
start = hwm()
run_merge(build_job(load_plan(sys.argv[2] + "/plan.yml")), sys.argv[2] + "/out", device="cpu")
print(json.dumps({"start": start, "peak": hwm()}))
"""


def prepare(root: Path, layers: int) -> None:
    root.mkdir()
    write_models(root, layers)
    plan = {"merge_method": "ties", "base_model": str(root / "base"), "parameters": {"normalize": True},
            "models": [{"model": str(root / f"m{i}"), "parameters": {"weight": 1.0, "density": 0.5}} for i in range(3)]}
    (root / "plan.yml").write_text(yaml.safe_dump(plan))


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_merge_peak_memory_does_not_grow_with_the_number_of_tensors(tmp_path):
    prepare(tmp_path / "small", layers=8)
    prepare(tmp_path / "large", layers=64)
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "small"), str(tmp_path / "large")],
        capture_output=True, text=True, timeout=300, env={**os.environ, **STABLE_MALLOC},
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    growth = (result["peak"] - result["start"]) / (1 << 20)
    assert growth < 32, growth
