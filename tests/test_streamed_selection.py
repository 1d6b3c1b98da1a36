"""The streamed selection (mergescope.merge.magnitude_trim.select_cuts) on any per-entry score, and the methods
that select with it: Model Breadcrumbs' two cuts, arcee_fusion's quantiles, sce's variance top-k.

Expected values are computed here independently: the kept entries by numpy's stable argsort, arcee_fusion's
quantiles by ``np.quantile(method="lower")`` (mergekit's order statistic at ⌊q·(n − 1)⌋), the merges in float64.
A merged tensor larger than one row block under the smallest memory budget must come from passes over row blocks
(never the whole inputs: neither ``prepare`` on them nor a read of more than a chunk's rows at once) with the
bits of the same plan merged whole, which are those of :func:`merge_tensor` on the whole tensors.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from mergescope.checkpoints.row_blocks import ALIGN_ENTRIES
from mergescope.merge import magnitude_counts, magnitude_trim
from mergescope.merge.executor import plan_blocks, run_merge
from mergescope.merge.job import build_job
from mergescope.merge.plan import load_plan
from mergescope.merge.row_source import RowBlocks
from mergescope.merge.tensor_merge import merge_tensor
from test_analysis_memory import STABLE_MALLOC
from test_streaming_memory import MEASURING_CHILD

NAME = "model.embed_tokens.weight"
ROWS, WIDTH = 3001, 1000  # six row blocks at the smallest budget, a partial 4096-entry chunk at the end


# --- the generalised selection against a stable sort ------------------------------------------------------------
def stable_keep(scores: np.ndarray, count: int, low_first: bool) -> np.ndarray:
    """The ``count`` largest: lowest index first is the head of a stable sort of −s, highest index first the tail
    of a stable ascending sort of s."""
    keep = np.zeros(scores.size, dtype=bool)
    if count > 0:
        order = np.argsort(-scores, kind="stable")[:count] if low_first else np.argsort(scores, kind="stable")[-count:]
        keep[order] = True
    return keep


@settings(max_examples=150, deadline=None)
@given(
    values=st.lists(st.integers(-4, 6), min_size=1, max_size=300),
    signed=st.booleans(),
    margin=st.sampled_from([(4.0, 8), (0.0, 0), (-4.0, -8)]),
    sample_share=st.integers(2, 6),
    counts=st.lists(st.integers(0, 300), min_size=1, max_size=6),
)
def test_select_cuts_keep_the_stable_sort_top_for_both_tie_orders(values, signed, margin, sample_share, counts):
    """Small inputs with many ties run the streamed path (chunks of 16, blocks of 64, a sample of n/share), with
    brackets that hold t, that miss it (negative margin: the exact fallback) or that put t strictly between."""
    scores = np.asarray(values, dtype=np.float32) * np.float32(0.25)
    if not signed:
        scores = np.abs(scores)
    n = scores.size
    counts = [c % (n + 1) for c in counts] + [0, n]
    selections = [magnitude_trim.Selection(0, c, low) for c in counts for low in (True, False)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(magnitude_counts, "CHUNK", 16)
        patch.setattr(magnitude_trim, "EXACT_UP_TO", 0)
        patch.setattr(magnitude_trim, "MARGIN_SE", margin[0])
        patch.setattr(magnitude_trim, "MARGIN_MIN", margin[1])
        patch.setattr(magnitude_trim, "sample_size", lambda numel: max(1, numel // sample_share))
        source = magnitude_counts.TensorScores([torch.from_numpy(scores)], 64, signed=signed)
        cuts = magnitude_trim.select_cuts(source, selections, block=64)
    tensor = torch.from_numpy(scores)
    for (_, count, low_first), (threshold, tie) in zip(selections, cuts):
        keep = magnitude_trim.keep_mask(tensor, threshold, tie, low_first).numpy()
        assert np.array_equal(keep, stable_keep(scores, count, low_first)), (count, low_first)


def test_selection_with_a_large_tied_tensor_counts_in_one_pass():
    """Several selections of one series share a counting pass; the |τ| of bf16 inputs ties at every cut."""
    g = torch.Generator().manual_seed(3)
    scores = (torch.randn(700_001, generator=g) * 0.01).bfloat16().float().abs()
    n = scores.numel()
    selections = [magnitude_trim.Selection(0, c, low) for c in (1, 999, n // 3, n // 2, n - 2) for low in (True, False)]
    passes = []
    tally = magnitude_counts.tally
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(magnitude_counts, "tally", lambda *a: passes.append(len(a[2])) or tally(*a))
        cuts = magnitude_trim.select_in_memory([scores], selections)
    assert passes[0] == len(selections)
    for (_, count, low_first), (threshold, tie) in zip(selections, cuts):
        keep = magnitude_trim.keep_mask(scores, threshold, tie, low_first).numpy()
        assert np.array_equal(keep, stable_keep(scores.numpy(), count, low_first)), (count, low_first)


# --- methods merged from row blocks ------------------------------------------------------------------------------
def _save(tmp_path, tensors: dict[str, torch.Tensor]) -> None:
    for name, tensor in tensors.items():
        (tmp_path / name).mkdir()
        save_file({NAME: tensor.contiguous()}, str(tmp_path / name / "model.safetensors"))


def _no_whole_prepare(*args, **kwargs):
    raise AssertionError("prepare on the whole inputs: the streamed first pass was not used")


def _merged(job, out, budget) -> torch.Tensor:
    return load_file(run_merge(job, out, device="cpu", memory_budget=budget) / "model.safetensors")[NAME]


def streamed_and_whole(tmp_path, config: dict, inputs: list[torch.Tensor], monkeypatch) -> torch.Tensor:
    """Merge the plan whole and from row blocks (the smallest budget) with the whole-input ``prepare`` refused
    and no read of more than a few rows at once: the bits agree with each other and with merge_tensor on the
    whole tensors. Returns the merged tensor."""
    path = tmp_path / "plan.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    job = build_job(load_plan(str(path)))
    assert len(plan_blocks(job, ALIGN_ENTRIES)) == 6
    whole = _merged(job, tmp_path / "whole", 10**12)
    job.method = replace(job.method, prepare=_no_whole_prepare)
    span = RowBlocks.span

    def small_span(self, model, start, stop):
        assert stop - start <= magnitude_counts.CHUNK, f"read {stop - start} entries at once"
        return span(self, model, start, stop)

    monkeypatch.setattr(RowBlocks, "span", small_span)
    blocks = _merged(job, tmp_path / "blocks", 1)
    assert torch.equal(whole.view(torch.int32), blocks.view(torch.int32))
    task = next(task for task in build_job(load_plan(str(path))).tasks if task.output == NAME)
    direct = merge_tensor(build_job(load_plan(str(path))).method, task, inputs, seed=0, device="cpu",
                          out_dtype="F32")
    assert torch.equal(direct.view(torch.int32), whole.view(torch.int32))
    return blocks


def grid_task_vectors(seed: int, count: int, levels: int = 8) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A bf16-valued base and fine-tunes whose τ are multiples of 2⁻⁸ in [−levels, levels]·2⁻⁸ (float32, exact):
    |τ| takes levels + 1 values, so every cut falls inside a run of equal magnitudes."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(ROWS, WIDTH, generator=g).bfloat16().float()
    models = [base + torch.randint(-levels, levels + 1, (ROWS, WIDTH), generator=g).float() * 2.0**-8
              for _ in range(count)]
    return base, models


def band_oracle(tau: np.ndarray, density: float, gamma: float) -> tuple[np.ndarray, tuple[int, int]]:
    """Breadcrumbs' kept entries: ascending stable ranks n_bot … n_bot + k − 1 of |τ|, and (n_bot, n − n_top)."""
    n = tau.size
    k = int(density * n)
    n_bottom = max(0, n - k - int(gamma * n))
    keep = np.zeros(n, dtype=bool)
    keep[np.argsort(np.abs(tau), kind="stable")[n_bottom : n_bottom + k]] = True
    return keep, (n_bottom, n_bottom + k)


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_breadcrumbs_takes_its_two_cuts_from_passes_over_row_blocks(tmp_path, monkeypatch, method):
    base, models = grid_task_vectors(21, 2)
    _save(tmp_path, {"base": base, "a": models[0], "b": models[1]})
    per_model = [{"weight": 0.7, "density": 0.5, "gamma": 0.1}, {"weight": 1.3, "density": 0.3, "gamma": 0.05}]
    config = {"merge_method": method, "base_model": str(tmp_path / "base"), "dtype": "float32",
              "models": [{"model": str(tmp_path / n), "parameters": p} for n, p in zip("ab", per_model)]}
    merged = streamed_and_whole(tmp_path, config, [base, *models], monkeypatch)

    x0 = base.double().numpy().reshape(-1)
    deltas = []
    for model, p in zip(models, per_model):
        tau = model.double().numpy().reshape(-1) - x0
        keep, (low, high) = band_oracle(tau, p["density"], p["gamma"])
        ordered = np.sort(np.abs(tau), kind="stable")
        assert ordered[low - 1] == ordered[low] and ordered[high - 1] == ordered[high]  # ties at both cuts
        deltas.append(p["weight"] * np.where(keep, tau, 0.0))
    deltas = np.stack(deltas)
    if method == "breadcrumbs_ties":
        elected = np.where(deltas.sum(axis=0) >= 0, 1.0, -1.0)
        deltas = np.where(np.sign(deltas) == elected, deltas, 0.0)
    expected = x0 + deltas.sum(axis=0)
    np.testing.assert_allclose(merged.double().numpy().reshape(-1), expected, rtol=0, atol=1e-6)


def test_arcee_fusion_takes_its_quantiles_from_passes_over_row_blocks(tmp_path, monkeypatch):
    """Rows changed by different amounts, so the KL and the importance spread over decades."""
    g = torch.Generator().manual_seed(17)
    base = torch.randn(ROWS, WIDTH, generator=g).bfloat16().float()
    strength = torch.rand(ROWS, 1, generator=g) ** 3 * 0.2
    model = (base + strength * torch.randn(ROWS, WIDTH, generator=g)).bfloat16().float()
    _save(tmp_path, {"base": base, "ft": model})
    config = {"merge_method": "arcee_fusion", "base_model": str(tmp_path / "base"), "dtype": "float32",
              "models": [{"model": str(tmp_path / "base")}, {"model": str(tmp_path / "ft")}]}
    merged = streamed_and_whole(tmp_path, config, [base, model], monkeypatch).numpy()

    # the selection is exact: numpy's lower quantiles of the float32 importance give the merge's threshold
    p, q = torch.softmax(model, -1) + 1e-8, torch.softmax(base, -1) + 1e-8
    importance32 = ((model - base).abs() * (p * torch.log(p / q)).sum(-1, keepdim=True)).numpy()
    q1, median, q3 = np.quantile(importance32, [0.25, 0.5, 0.75], method="lower")
    threshold32 = np.float32(median) + np.float32(1.5) * (np.float32(q3) - np.float32(q1))
    assert np.array_equal(merged, np.where(importance32 >= threshold32, model.numpy(), base.numpy()))

    # float64 maths: the same choice everywhere but at importances within float32 rounding of the threshold
    x0, x1 = base.double().numpy(), model.double().numpy()

    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True) + 1e-8

    p64, q64 = softmax(x1), softmax(x0)
    importance = np.abs(x1 - x0) * (p64 * np.log(p64 / q64)).sum(-1, keepdims=True)
    q1, median, q3 = np.quantile(importance, [0.25, 0.5, 0.75], method="lower")
    threshold = median + 1.5 * (q3 - q1)
    keep = importance >= threshold
    assert 0.01 < keep.mean() < 0.5  # the threshold really selects
    differs = merged != np.where(keep, x1, x0)
    assert np.all(np.abs(importance[differs] - threshold) <= 1e-4 * threshold)
    assert differs.sum() <= 20


def test_sce_below_select_topk_1_takes_its_variance_cut_from_passes_over_row_blocks(tmp_path, monkeypatch):
    """Two fine-tunes on a grid of 2⁻⁸: the variance across them, ((τ₁ − τ₂)/2)², is exact in float32 and ties
    heavily, so the top-k cut falls inside a run of equal variances (ties: lowest index first)."""
    base, models = grid_task_vectors(23, 2, levels=6)
    _save(tmp_path, {"base": base, "a": models[0], "b": models[1]})
    config = {"merge_method": "sce", "base_model": str(tmp_path / "base"), "parameters": {"select_topk": 0.3},
              "models": [{"model": str(tmp_path / n)} for n in "ab"], "dtype": "float32"}
    merged = streamed_and_whole(tmp_path, config, [base, *models], monkeypatch)

    x0 = base.double().numpy().reshape(-1)
    taus = np.stack([m.double().numpy().reshape(-1) - x0 for m in models])
    variance = taus.var(axis=0)
    count = int(np.float32(np.count_nonzero(variance)) * np.float32(0.3))
    keep = stable_keep(variance, count, low_first=True)
    ordered = np.sort(variance)[::-1]
    assert ordered[count - 1] == ordered[count]  # ties at the cut
    taus = taus * keep
    energy = (taus**2).mean(axis=1)
    weights = (energy / energy.sum())[:, None]
    elected = np.where(taus.sum(axis=0) >= 0, 1.0, -1.0)
    kept = weights * (np.sign(taus) == elected)
    expected = x0 + (taus * kept).sum(axis=0) / np.maximum(kept.sum(axis=0), 1e-6)
    np.testing.assert_allclose(merged.double().numpy().reshape(-1), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("models", [1, 2, 3, 5, 8])
def test_sce_variance_has_the_bits_of_torch_var_on_the_cpu(models):
    """What mergekit computes (torch.var across the models), for inputs of every scale, bf16 ties and zeros."""
    from mergescope.merge.methods.adaptive import model_variance

    g = torch.Generator().manual_seed(models)
    taus = torch.cat([torch.randn(models, 100_000, generator=g) * scale for scale in (1e-6, 0.01, 1.0, 300.0)], dim=1)
    taus[:, ::7] = taus[:, ::7].bfloat16().float()
    taus[:, ::11] = 0
    taus[:, ::13] = taus[:1, ::13]  # equal across the models: zero variance
    assert torch.equal(model_variance(taus), torch.var(taus, dim=0, unbiased=False))


MEMORY_CHILD = MEASURING_CHILD + r"""
methods = sys.argv[3:]
for method in methods:
    run_merge(build_job(load_plan(sys.argv[1] + f"/{method}.yml")), sys.argv[1] + f"/out-{method}", device="cpu",
              memory_budget=budget)
growth = {}
for method in methods:
    open("/proc/self/clear_refs", "w").write("5")
    start = hwm()
    run_merge(build_job(load_plan(sys.argv[2] + f"/{method}.yml")), sys.argv[2] + f"/out-{method}", device="cpu",
              memory_budget=budget)
    growth[method] = (hwm() - start) / (1 << 20)
print(json.dumps(growth))
"""
SELECTING = {"breadcrumbs": {"density": 0.5, "gamma": 0.05}, "breadcrumbs_ties": {"density": 0.3, "gamma": 0.1},
             "sce": {"select_topk": 0.3}, "arcee_fusion": {}}


def _write_selecting_plans(root, shape: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(*shape, generator=g)
    names = ["base", "m0", "m1"]
    for name in names:
        (root / name).mkdir(parents=True)
        tensor = base if name == "base" else base + 0.01 * torch.randn(*shape, generator=g)
        save_file({NAME: tensor}, str(root / name / "model.safetensors"))
    for method, parameters in SELECTING.items():
        per_model = {"weight": 0.5, **parameters} if "density" in parameters else {}
        models = [{"model": str(root / "m0")}] if method == "arcee_fusion" else [
            {"model": str(root / m), "parameters": per_model} for m in ("m0", "m1")]
        plan = {"merge_method": method, "base_model": str(root / "base"), "models": models}
        if method == "sce":
            plan["parameters"] = parameters
        (root / f"{method}.yml").write_text(yaml.safe_dump(plan))


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_selecting_methods_merge_within_the_budget_not_the_tensor(tmp_path):
    """As tests/test_streaming_memory.py for TIES: a 128 MiB tensor (16384 × 2048 float32) and two fine-tunes
    under a budget leaving 16 MiB for blocks. The peak RSS grows by less than half an input tensor (the whole
    inputs alone are three); what it grows by is the first large merge's one-off costs, the entries gathered
    inside the brackets and freed temporaries glibc keeps for reuse (the executor lets it keep up to 64 MiB:
    ``keep_freed_memory``). Small results kept per block would fragment that heap and grow it by about a block
    per block (arcee_fusion grew by 145 MiB so)."""
    _write_selecting_plans(tmp_path / "small", (256, 256))
    _write_selecting_plans(tmp_path / "large", (16384, 2048))
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_CHILD, str(tmp_path / "small"), str(tmp_path / "large"), *SELECTING],
        capture_output=True, text=True, timeout=600, env={**os.environ, **STABLE_MALLOC},
    )
    assert out.returncode == 0, out.stderr
    growth = json.loads(out.stdout.strip().splitlines()[-1])
    assert all(mib < 64 for mib in growth.values()), growth  # before: 640–1060 MiB
