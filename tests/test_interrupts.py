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

from mergescope.merge.executor import run_merge
from mergescope.merge.job import build_job
from mergescope.merge.plan import load_plan


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


def start_merge(root: Path, out: Path, plan: str = "plan.yml", *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "mergescope.tui.cli.main", "merge", str(root / plan), "-o", str(out),
         "--device", "cpu", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def wait_for_partial_output(parent: Path, out: Path, process: subprocess.Popen, timeout: float = 60) -> None:
    """Until the writer's hidden temporary folder exists: the merge is under way."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.name.startswith(f".{out.name}.") and p.name.endswith(".partial") for p in parent.iterdir()):
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


def test_sigkill_leaves_no_complete_looking_output_and_the_rerun_removes_the_leftover(tmp_path, slow_plan):
    out = tmp_path / "merged"
    process = start_merge(slow_plan, out)
    wait_for_partial_output(tmp_path, out, process)
    process.kill()  # SIGKILL: no handler runs, as on a power loss or an OOM kill
    process.communicate(timeout=60)
    assert not out.exists()
    [partial] = [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    assert partial.name.startswith(".merged.")
    bystander = tmp_path / ".merged.v2.abcdefgh.partial"  # another output's temporary folder: not ours to remove
    bystander.mkdir()
    rerun = start_merge(slow_plan, out)
    _, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr
    assert (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [bystander.name, "merged"]  # the dead run's folder is gone


def test_two_merges_racing_for_one_folder_one_completes_the_other_fails(tmp_path, slow_plan):
    """Both with --force, started together: exactly one writes the folder, whole; the other stops with one line."""
    plan = yaml.safe_load((slow_plan / "plan.yml").read_text())
    for model in plan["models"]:
        model["parameters"]["density"] = 0.6
    (tmp_path / "other.yml").write_text(yaml.safe_dump(plan))
    out = tmp_path / "merged"
    first = start_merge(slow_plan, out, "plan.yml", "--force")
    second = start_merge(tmp_path, out, "other.yml", "--force")
    stderr = [p.communicate(timeout=300)[1] for p in (first, second)]
    assert sorted([first.returncode, second.returncode]) == [0, 2], stderr
    winner = 0 if first.returncode == 0 else 1
    message, holder = stderr[1 - winner], (first, second)[winner]
    assert message.count("\n") == 1 and "Traceback" not in message, message
    assert f"{out}: another mergescope process (pid {holder.pid}) is writing this folder" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "other.yml"]  # no lock, no temporary folder
    # the folder is the winner's merge, all of it: its plan, and its bytes equal a merge of that plan alone
    winner_plan = slow_plan / "plan.yml" if winner == 0 else tmp_path / "other.yml"
    assert yaml.safe_load((out / "mergekit_config.yml").read_text()) == yaml.safe_load(winner_plan.read_text())
    alone = run_merge(build_job(load_plan(winner_plan)), tmp_path / "alone", device="cpu")
    assert (out / "model.safetensors").read_bytes() == (alone / "model.safetensors").read_bytes()
