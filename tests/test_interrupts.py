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


# The real CLI in a subprocess, paused (never by timing) once it has written a block: the executor's per-block
# merge is wrapped to touch `paused` before its third block and to wait there until `release` exists. The
# wait is in the main thread, so a signal's handler interrupts it as it would interrupt a merge.
_PAUSING_CLI = """
import sys, time
from pathlib import Path
import mergescope.merge.executor as executor
paused, release = Path(sys.argv[1]), Path(sys.argv[2])
calls = [0]
def pausing(merge):
    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:
            paused.touch()
            while not release.exists():
                time.sleep(0.01)
        return merge(*args, **kwargs)
    return wrapped
executor.merge_tensor = pausing(executor.merge_tensor)
executor.merge_rows = pausing(executor.merge_rows)
from mergescope.tui.cli.main import main
sys.exit(main(sys.argv[3:]))
"""


_started: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def no_merge_outlives_its_test():
    """A test that fails while a merge waits paused must not leave that process waiting forever."""
    yield
    for process in _started:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=60)
    _started.clear()


def start_merge(root: Path, out: Path, plan: str = "plan.yml", *extra: str, pause: Path | None = None
                ) -> subprocess.Popen:
    """``mergescope merge`` on ``root/plan``; with ``pause`` (a folder) it stops before its third block until
    ``pause/release`` exists (:func:`wait_until_paused`, :func:`release`)."""
    command = ["merge", str(root / plan), "-o", str(out), "--device", "cpu", *extra]
    if pause is None:
        program = [sys.executable, "-m", "mergescope.tui.cli.main"]
    else:
        pause.mkdir(exist_ok=True)
        program = [sys.executable, "-c", _PAUSING_CLI, str(pause / "paused"), str(pause / "release")]
    process = subprocess.Popen([*program, *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _started.append(process)
    return process


def wait_until_paused(pause: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    """Until the merge stops before its third block: its temporary folder exists and holds written blocks."""
    deadline = time.monotonic() + timeout
    while not (pause / "paused").exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the merge never reached its third block"
        time.sleep(0.01)


def release(pause: Path) -> None:
    (pause / "release").touch()


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_killed_merge_leaves_nothing_and_reruns(tmp_path, tmp_path_factory, slow_plan, signum, status):
    out, pause = tmp_path / "merged", tmp_path_factory.mktemp("pause")
    process = start_merge(slow_plan, out, pause=pause)
    wait_until_paused(pause, process)
    assert any(p.name.endswith(".partial") for p in tmp_path.iterdir())
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == status, stderr
    assert "nothing was written" in stderr and "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == []  # no output, no temporary folder
    rerun = start_merge(slow_plan, out)
    _, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr
    assert (out / "model.safetensors").is_file() and (out / "mergekit_config.yml").is_file()


def test_sigkill_leaves_no_complete_looking_output_and_the_rerun_removes_the_leftover(tmp_path, tmp_path_factory,
                                                                                   slow_plan):
    out, pause = tmp_path / "merged", tmp_path_factory.mktemp("pause")
    process = start_merge(slow_plan, out, pause=pause)
    wait_until_paused(pause, process)
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


def test_a_second_merge_into_a_folder_being_written_fails_at_once_and_the_first_completes(tmp_path, tmp_path_factory,
                                                                                        slow_plan):
    """Both with --force; the second starts while the first is mid-write (paused there, not timed): the second
    stops with one line, the first writes the folder, whole."""
    plan = yaml.safe_load((slow_plan / "plan.yml").read_text())
    for model in plan["models"]:
        model["parameters"]["density"] = 0.6
    (tmp_path / "other.yml").write_text(yaml.safe_dump(plan))
    out, pause = tmp_path / "merged", tmp_path_factory.mktemp("pause")
    first = start_merge(slow_plan, out, "plan.yml", "--force", pause=pause)
    wait_until_paused(pause, first)
    second = start_merge(tmp_path, out, "other.yml", "--force")
    _, message = second.communicate(timeout=300)
    assert first.poll() is None  # still paused: the second did not wait for it
    release(pause)
    _, first_stderr = first.communicate(timeout=300)
    assert (first.returncode, second.returncode) == (0, 2), (first_stderr, message)
    assert message.count("\n") == 1 and "Traceback" not in message, message
    assert f"{out}: another mergescope process (pid {first.pid}) is writing this folder" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "other.yml"]  # no lock, no temporary folder
    # the folder is the first merge, all of it: its plan, and its bytes equal a merge of that plan alone
    assert yaml.safe_load((out / "mergekit_config.yml").read_text()) == yaml.safe_load(
        (slow_plan / "plan.yml").read_text())
    alone = run_merge(build_job(load_plan(slow_plan / "plan.yml")), tmp_path / "alone", device="cpu")
    assert (out / "model.safetensors").read_bytes() == (alone / "model.safetensors").read_bytes()
