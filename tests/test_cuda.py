"""The CUDA path: merges, trims and analyses on the GPU against the same computations on the CPU.

Skipped where torch sees no CUDA device (CI has none). The CPU results are themselves checked against
direct computations and mergekit elsewhere, so agreement here carries that over to the GPU.
"""

from __future__ import annotations

import contextlib
import io
import string
from pathlib import Path

import pytest
import torch
import yaml

import analysis_reference as ref
import mergekit_reference as mk
from analysis_reference import assert_report, noise, plus
from builders import llama_config, llama_state, write_model
from mergekit_cases import CASES, STAT_CASES, Case
from mergekit_reference import FINE_TUNES, assert_tensors_close, fixture_states, load_merged
from mergescope.analysis import run_analysis
from mergescope.checkpoints import open_checkpoint, resolve_device
from mergescope.merge import sparsify
from mergescope.merge.executor import run_merge
from mergescope.merge.job import build_job
from mergescope.merge.plan import load_plan

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def fixture_paths(tmp_path_factory) -> dict[str, str]:
    return mk.write_fixtures(tmp_path_factory.mktemp("cuda-fixture"))


def merge_cli(case: Case, paths: dict[str, str], out: Path, device: str, seed: int = 0) -> dict:
    """``mergescope merge PLAN -o OUT --device D --seed S`` in-process; the merged tensors."""
    from mergescope.tui.cli.main import main

    config = yaml.safe_load(string.Template(case.config).substitute(paths))
    plan = mk.write_config(config, out.parent / f"{out.name}.plan.yml")
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        rc = main(["merge", str(plan), "-o", str(out), "--device", device, "--seed", str(seed)])
    assert rc == 0, stderr.getvalue()
    return load_merged(out)


def test_auto_picks_the_gpu():
    assert resolve_device("auto") == "cuda"
    assert resolve_device("cuda:0") == "cuda:0"


@pytest.mark.parametrize("case", [c for c in CASES if c.mergescope], ids=lambda c: c.id)
def test_gpu_merge_equals_cpu_merge(case: Case, fixture_paths, tmp_path):
    """Every deterministic method: the GPU's float32 arithmetic matches the CPU's to rounding (reductions
    may sum in another order), and TIES/breadcrumbs trims select exactly the same entries."""
    cpu = merge_cli(case, fixture_paths, tmp_path / "cpu", "cpu")
    gpu = merge_cli(case, fixture_paths, tmp_path / "gpu", "cuda")
    assert set(gpu) == set(cpu)
    if case.id == "arcee_fusion":
        gpu = _undo_flipped_selections(gpu, cpu, base="base", model="ft_b")
    bf16 = case.out_dtype == torch.bfloat16
    # bf16 output: a last-bit difference in float32 can round to the neighbouring bf16 value
    assert_tensors_close(gpu, cpu, rtol=2.0**-7 if bf16 else 1e-5, atol=1e-6, label=f"{case.id} gpu vs cpu")


def _undo_flipped_selections(gpu: dict, cpu: dict, *, base: str, model: str) -> dict:
    """Arcee Fusion keeps an entry when |τ|·KL(softmax θ ‖ softmax θ₀) clears a quantile threshold; the
    softmax, log and sum round their last bits differently on the GPU, so an entry lying at the threshold
    may be kept on one device and not on the other. Such an entry must still be exactly θ₀ or θ on both
    (the decision flipped, not the arithmetic), and be rare; it is then taken from the CPU result."""
    states = fixture_states(torch.float32)
    out = {}
    for name, tensor in gpu.items():
        flipped = tensor != cpu[name]
        assert float(flipped.float().mean()) < 0.03, name
        ends = (states[base][name][flipped], states[model][name][flipped])
        for result in (tensor[flipped], cpu[name][flipped]):
            assert bool(((result == ends[0]) | (result == ends[1])).all()), name
        out[name] = torch.where(flipped, cpu[name], tensor)
    return out


@pytest.mark.parametrize("case", STAT_CASES, ids=lambda c: c.id)
def test_gpu_random_methods(case: Case, fixture_paths, tmp_path):
    """DARE and DELLA draw from a CUDA generator on the GPU: other masks than on the CPU, but the same
    statistics, and bit-identical for the same seed."""
    first = merge_cli(case, fixture_paths, tmp_path / "a", "cuda", seed=3)
    again = merge_cli(case, fixture_paths, tmp_path / "b", "cuda", seed=3)
    assert all(torch.equal(first[name], again[name]) for name in first)
    states = fixture_states(torch.float32)
    case.stats(first, {name: states[name] for name in ("base", *FINE_TUNES)})


@pytest.mark.parametrize("density", [0.5, 0.01])
def test_large_trim_selects_the_same_entries(density):
    """The sampled-bracket selection (tensors over 2¹⁸ entries) with many tied magnitudes (bf16 values):
    the GPU keeps exactly the CPU's entries, ties lowest index first."""
    g = torch.Generator().manual_seed(0)
    tau = (torch.randn(3_000_000, generator=g) * 0.01).to(torch.bfloat16).float()
    cpu = sparsify.top_magnitude_mask(tau, density)
    gpu = sparsify.top_magnitude_mask(tau.cuda(), density)
    assert int(cpu.sum()) == sparsify.trim_count(tau.numel(), density)
    assert torch.equal(gpu.cpu(), cpu)
    outliers_cpu = sparsify.outlier_mask(tau, density, 0.01)
    assert torch.equal(sparsify.outlier_mask(tau.cuda(), density, 0.01).cpu(), outliers_cpu)


def test_block_by_block_ties_on_gpu(tmp_path):
    """A tensor above the executor's block size merges in two phases on the GPU; it must equal the direct
    formula (top-k by |τ|, elected signs, disjoint mean) computed here on the CPU."""
    base = {"w": torch.randn(1024, 768, generator=torch.Generator().manual_seed(0))}
    fts = [{"w": base["w"] + 0.01 * torch.randn(1024, 768, generator=torch.Generator().manual_seed(i))} for i in (1, 2)]
    paths = [write_model(tmp_path / n, s) for n, s in zip(("base", "a", "b"), (base, *fts))]
    plan = tmp_path / "plan.yml"
    plan.write_text(yaml.safe_dump({
        "merge_method": "ties", "base_model": str(paths[0]),
        "models": [{"model": str(p), "parameters": {"weight": 1.0, "density": 0.3}} for p in paths[1:]],
        "dtype": "float32",
    }))
    events = []
    out = run_merge(build_job(load_plan(str(plan))), tmp_path / "out", device="cuda", on_event=events.append)
    merged = load_merged(out)["w"]
    taus = torch.stack([ft["w"] - base["w"] for ft in fts]).reshape(2, -1)
    keep = taus.numel() // 2 * 3 // 10
    masks = torch.zeros_like(taus, dtype=torch.bool)
    for i in range(2):
        order = torch.argsort(-taus[i].abs(), stable=True)
        masks[i, order[:keep]] = True
    trimmed = taus * masks
    elected = torch.where(trimmed.sum(0) >= 0, 1.0, -1.0)
    agree = torch.sign(trimmed) == elected
    count = agree.sum(0).clamp(min=1)
    expected = base["w"].reshape(-1) + (trimmed * agree).sum(0) / count
    torch.testing.assert_close(merged.reshape(-1), expected, rtol=1e-5, atol=1e-6)
    assert events and all(e.device_memory is not None for e in events)


@pytest.mark.parametrize("density", [1.0, 0.5])
def test_gpu_analysis_matches_reference(tmp_path, density):
    """The streaming analysis on the GPU against the independent numpy reference."""
    config = llama_config()
    base = llama_state(config, seed=0)
    models = {f"m{i}": plus(base, noise(base, i)) for i in (1, 2, 3)}
    base_ckpt = open_checkpoint(write_model(tmp_path / "base", base, config))
    ckpts = [open_checkpoint(write_model(tmp_path / name, state, config)) for name, state in models.items()]
    report = run_analysis(base_ckpt, ckpts, density=density, device="cuda", use_cache=False)
    assert_report(report, ref.reference_from_states(base, models, density))
