"""A real merge, killed mid-way: nothing is left behind, the exit status says how it ended, a rerun works."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file


@pytest.fixture(scope="module")
def slow_plan(tmp_path_factory) -> Path:
    """Three 64 MiB float32 models: a TIES merge takes a few seconds on two cores."""
    root = tmp_path_factory.mktemp("slow")
    g = torch.Generator().manual_seed(0)
    base = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(1024, 1024, generator=g) for i in range(16)}
    for name in ("base", "a", "b"):
        (root / name).mkdir()
        state = base if name == "base" else {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        save_file(state, str(root / name / "model.safetensors"))
    plan = {"merge_method": "ties", "base_model": str(root / "base"), "parameters": {"normalize": True},
            "models": [{"model": str(root / n), "parameters": {"weight": 1.0, "density": 0.3}} for n in ("a", "b")]}
    (root / "plan.yml").write_text(yaml.safe_dump(plan))
    return root


def start_merge(root: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "mergescope.tui.cli.main", "merge", str(root / "plan.yml"), "-o", str(out),
         "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def wait_for_partial_output(parent: Path, out: Path, process: subprocess.Popen, timeout: float = 60) -> None:
    """Until the writer's hidden temporary folder exists: the merge is under way."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.name.startswith(f".{out.name}.") for p in parent.iterdir()):
            time.sleep(0.3)  # a few tensors into it
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.02)
    pytest.fail("the merge never started writing")


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_killed_merge_leaves_nothing_and_reruns(tmp_path, slow_plan, signum, status):
    out = tmp_path / "merged"
    process = start_merge(slow_plan, out)
    wait_for_partial_output(tmp_path, out, process)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == status, stderr
    assert "nothing was written" in stderr and "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == []  # no output, no temporary folder
    rerun = start_merge(slow_plan, out)
    _, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr
    assert (out / "model.safetensors").is_file() and (out / "mergekit_config.yml").is_file()
