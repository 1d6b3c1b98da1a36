"""DARE's and DELLA's random drops and every L1 rescale, streamed: a tensor merged in row blocks under the smallest
memory budget never reads its inputs whole (the streamed first pass replaces ``prepare``; whole reads of the
tensor fail) and has the bits of :func:`merge_tensor` on the whole tensors; the same seed gives the same bits, another
seed others; a float64 merge built here from the documented per-chunk draws (``draw_reference``) agrees within
float32 rounding. Statistics check the draws themselves: DARE keeps ~density of the entries, DELLA keeps larger
|τ| more often, as its per-row ranks say.

mergekit draws its masks from torch's global generator in one stream, so random masks cannot be compared with
mergekit bit for bit; the compatibility suite compares their statistics (tests/test_mergekit_compat.py).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import draw_reference
from mergescope.checkpoints import Checkpoint
from mergescope.checkpoints.row_blocks import ALIGN_ENTRIES
from mergescope.merge import draws, sparsify
from mergescope.merge.executor import plan_blocks, run_merge
from mergescope.merge.job import build_job
from mergescope.merge.plan import load_plan
from mergescope.merge.tensor_merge import merge_tensor, tensor_seed

NAME = "model.embed_tokens.weight"
SHAPE = (1501, 1000)  # 512-row blocks at the smallest budget: starts on no 2¹⁶-entry chunk, rows of 1000 entries
WEIGHTS, DENSITIES, EPSILONS = [0.7, 0.5], [0.4, 0.6], [0.1, 0.2]

# method: (elect, normalize default, rescale default, trim)
METHODS = {
    "dare_linear": (False, False, True, "random"),
    "dare_ties": (True, False, True, "random"),
    "della": (True, True, True, "della"),
    "della_linear": (False, False, True, "della"),
    "ties": (True, True, False, "magnitude"),
    "breadcrumbs": (False, False, False, "outliers"),
    "breadcrumbs_ties": (True, False, False, "outliers"),
}
GAMMA = 0.01  # breadcrumbs' default
CASES = [(m, r) for m in ("dare_linear", "dare_ties", "della", "della_linear") for r in (True, False)] + [
    ("ties", True), ("breadcrumbs", True), ("breadcrumbs_ties", True)]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple:
    root = tmp_path_factory.mktemp("draws")
    g = torch.Generator().manual_seed(17)
    base = torch.randn(SHAPE, generator=g)
    models = [base + 0.05 * torch.randn(SHAPE, generator=g) for _ in WEIGHTS]
    for name, tensor in zip(["base", "a", "b"], [base, *models]):
        (root / name).mkdir()
        save_file({NAME: tensor}, str(root / name / "model.safetensors"))
    return root, base, models


def _config(root, method: str, rescale: bool) -> dict:
    models = [{"model": str(root / name), "parameters": {"weight": w, "density": d, "epsilon": e}}
              for name, w, d, e in zip("ab", WEIGHTS, DENSITIES, EPSILONS)]
    if not method.startswith("della"):
        for model in models:
            del model["parameters"]["epsilon"]
    return {"merge_method": method, "base_model": str(root / "base"), "models": models, "dtype": "float32",
            "parameters": {"rescale": rescale}}


def _job(root, tmp_path, method: str, rescale: bool):
    plan = tmp_path / f"{method}.yml"
    plan.write_text(yaml.safe_dump(_config(root, method, rescale), sort_keys=False))
    return build_job(load_plan(str(plan)))


def _no_whole_prepare(*args, **kwargs):
    raise AssertionError("prepare on the whole inputs: the streamed first pass was not used")


def _streamed(job, out, monkeypatch, seed: int = 0) -> torch.Tensor:
    """The merge under the smallest budget, with ``prepare`` and whole reads of the tensor forbidden."""
    real = Checkpoint.read

    def read(self, name, *args, **kwargs):
        assert name != NAME, "the tensor was read whole"
        return real(self, name, *args, **kwargs)

    monkeypatch.setattr(Checkpoint, "read", read)
    streamed_job = replace(job, method=replace(job.method, prepare=_no_whole_prepare))
    folder = run_merge(streamed_job, out, device="cpu", memory_budget=1, seed=seed)
    monkeypatch.setattr(Checkpoint, "read", real)
    return load_file(folder / "model.safetensors")[NAME]


def _whole(job, base, models, seed: int = 0) -> torch.Tensor:
    task = next(task for task in job.tasks if task.output == NAME)
    return merge_tensor(job.method, task, [base, *models], seed=seed, device="cpu", out_dtype="F32")


@pytest.mark.parametrize("method,rescale", CASES, ids=[f"{m}-rescale{int(r)}" for m, r in CASES])
def test_streamed_random_and_rescaled_trims_have_the_bits_of_the_whole_merge(tmp_path, inputs, monkeypatch, method,
                                                                            rescale):
    root, base, models = inputs
    job = _job(root, tmp_path, method, rescale)
    assert len(plan_blocks(job, ALIGN_ENTRIES)) == 3
    streamed = _streamed(job, tmp_path / "blocks", monkeypatch)
    whole = _whole(job, base, models)
    assert torch.equal(streamed, whole)
    task = job.tasks[0]
    options = {**task.options, "tensor_name": NAME}
    draw_seed = tensor_seed(0, NAME)
    assert torch.equal(job.method.function(base, models, task.params, options, draw_seed), whole)
    assert torch.equal(_streamed(job, tmp_path / "again", monkeypatch), streamed)  # same seed, same bits
    if METHODS[method][3] in ("random", "della"):
        other = _streamed(job, tmp_path / "other", monkeypatch, seed=1)
        assert not torch.equal(other, streamed) and torch.equal(other, _whole(job, base, models, seed=1))

    expected, sure = _reference(method, rescale, base, models, draw_seed)
    np.testing.assert_allclose(streamed.double().numpy()[sure], expected[sure], rtol=1e-5, atol=1e-6)
    assert sure.mean() > 0.999


def _reference(method: str, rescale: bool, base, models, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The merge in float64 from the documented masks, and where its elected sign is not within rounding of a
    tie (there float32 and float64 sums may elect differently; elsewhere they must agree)."""
    elect, normalize, _, trim = METHODS[method]
    taus = [(m - base).double().numpy() for m in models]  # the float32 differences, as the merge forms them
    deltas = []
    for i, (tau, w, d, e) in enumerate(zip(taus, WEIGHTS, DENSITIES, EPSILONS)):
        magnitude = np.abs(tau).astype(np.float32)
        if trim == "random":
            keep = draw_reference.dare_keep(tau.shape, d, seed, i)
        elif trim == "della":
            ranks = np.argsort(np.argsort(magnitude, axis=1, kind="stable"), axis=1, kind="stable")
            # (d − ε) + 2ε·r/(n − 1), evaluated in float32 as the documented formula's float32 probabilities
            norm = ranks.astype(np.float32) / np.float32(tau.shape[1] - 1)
            p = np.float32(d - e) + norm * np.float32(2) * np.float32(e)
            assert np.abs(p - ((d - e) + 2 * e * ranks / (tau.shape[1] - 1))).max() < 1e-6
            keep = draw_reference.keep(p, seed, i)
        elif trim == "outliers":  # ranks n_bot … n_bot + k − 1 of a stable ascending sort of |τ|
            kept = int(d * tau.size)
            n_bottom = max(0, tau.size - kept - int(GAMMA * tau.size))
            keep = np.zeros(tau.size, bool)
            keep[np.argsort(magnitude.reshape(-1), kind="stable")[n_bottom : n_bottom + kept]] = True
            keep = keep.reshape(tau.shape)
        else:
            keep = np.zeros(tau.size, bool)
            keep[np.argsort(-magnitude.reshape(-1), kind="stable")[: max(1, int(d * tau.size))]] = True
            keep = keep.reshape(tau.shape)
        trimmed = tau * keep
        if rescale:
            trimmed *= np.abs(tau).sum() / np.abs(trimmed).sum()
        deltas.append(w * trimmed)
    deltas = np.stack(deltas)
    weights = np.array(WEIGHTS).reshape(-1, 1, 1)
    total = deltas.sum(axis=0)
    sure = np.ones(total.shape, bool)
    if elect:
        sign = np.where(total >= 0, 1.0, -1.0)
        agree = np.sign(deltas) == sign
        merged, divisor = (deltas * agree).sum(axis=0), (weights * agree).sum(axis=0)
        divisor[divisor == 0] = 1
        sure = (np.abs(total) > 1e-5) | (np.count_nonzero(deltas, axis=0) < 2)  # a near-tie of two signs
    else:
        merged, divisor = total, weights.sum()
    if normalize:
        merged = merged / divisor
    return base.double().numpy() + merged, sure


def test_a_one_dimensional_della_tensor_larger_than_a_block_is_merged_from_its_whole_rows(tmp_path):
    """A 1-D tensor is one DELLA row: its masks are ranked over the whole tensor (read whole, it is small), then
    merged in blocks; the bits of the whole merge."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(20_000, generator=g)
    models = [base + 0.05 * torch.randn(20_000, generator=g) for _ in WEIGHTS]
    for name, tensor in zip(["base", "a", "b"], [base, *models]):
        (tmp_path / name).mkdir()
        save_file({"model.norm.weight": tensor}, str(tmp_path / name / "model.safetensors"))
    plan = tmp_path / "plan.yml"
    plan.write_text(yaml.safe_dump(_config(tmp_path, "della", True), sort_keys=False))
    job = build_job(load_plan(str(plan)))
    assert len(plan_blocks(job, ALIGN_ENTRIES)) > 1
    blocks = load_file(run_merge(job, tmp_path / "out", device="cpu", memory_budget=1) / "model.safetensors")
    task = job.tasks[0]
    whole = merge_tensor(job.method, task, [base, *models], seed=0, device="cpu", out_dtype="F32")
    assert torch.equal(blocks["model.norm.weight"], whole)


def test_draws_of_any_blocks_are_the_documented_draws_of_the_whole_tensor():
    """Blocks cut anywhere (not on chunks), drawn in any order on threads, give the whole tensor's mask, which is
    the documented per-chunk draw; the last chunk is partial."""
    numel, seed, model = 5 * draws.RANDOM_CHUNK + 1234, 99, 1
    p = torch.rand(numel, generator=torch.Generator().manual_seed(0))
    whole = draws.draw_keep_mask(p, 0, numel, seed, model)
    assert np.array_equal(whole.numpy(), draw_reference.keep(p.numpy(), seed, model))
    cuts = [0, 1, 4095, 70_000, 131_072, 200_001, numel]
    with ThreadPoolExecutor(4) as pool:
        parts = list(pool.map(lambda ab: draws.draw_keep_mask(p[ab[0]:ab[1]], ab[0], ab[1] - ab[0], seed, model),
                              reversed(list(zip(cuts, cuts[1:])))))
    assert torch.equal(torch.cat(parts[::-1]), whole)
    assert not torch.equal(draws.draw_keep_mask(p, 0, numel, seed, 0), whole)  # another model, other draws
    torch.manual_seed(0)
    state = torch.get_rng_state()
    draws.draw_keep_mask(p, 0, numel, seed, model)
    assert torch.equal(torch.get_rng_state(), state)  # the global generator was never drawn from


def test_dare_keeps_density_of_the_entries_independently_per_model():
    n, density = 4_000_000, 0.3
    values = torch.empty(n)
    masks = [sparsify.bernoulli_mask(values, density, 5, model).numpy() for model in range(2)]
    sigma = (density * (1 - density) / n) ** 0.5
    for mask in masks:
        assert abs(mask.mean() - density) < 5 * sigma
    both = (masks[0] & masks[1]).mean()  # independent models: P(both) = density²
    assert abs(both - density**2) < 5 * (density**2 * (1 - density**2) / n) ** 0.5
    chunks = masks[0][: n // draws.RANDOM_CHUNK * draws.RANDOM_CHUNK].reshape(-1, draws.RANDOM_CHUNK).mean(axis=1)
    chunk_sigma = (density * (1 - density) / draws.RANDOM_CHUNK) ** 0.5
    assert np.abs(chunks - density).max() < 5 * chunk_sigma  # no chunk repeats a degenerate stream


def test_della_keeps_larger_magnitudes_more_often_by_their_rank_in_the_row():
    rows, width, density, epsilon = 4000, 500, 0.5, 0.2
    tau = torch.randn(rows, width, generator=torch.Generator().manual_seed(8))
    drop = sparsify.RandomDrop(density, 11, 0, epsilon, (width,))
    keep = drop.keep(tau.abs(), 0).numpy()
    ranks = np.argsort(np.argsort(np.abs(tau.numpy()), axis=1, kind="stable"), axis=1, kind="stable")
    deciles = [keep[(ranks * 10 // width) == k].mean() for k in range(10)]
    expected = [density - epsilon + 2 * epsilon * (k * width / 10 + (width / 10 - 1) / 2) / (width - 1)
                for k in range(10)]
    sigma = (0.25 / (rows * width / 10)) ** 0.5
    assert all(abs(got - want) < 5 * sigma for got, want in zip(deciles, expected)), deciles
    assert all(a < b for a, b in zip(deciles, deciles[1:]))
    with pytest.raises(ValueError, match="whole rows"):
        drop.keep(tau.abs().reshape(-1)[:750], 0)


def test_first_passes_report_progress_before_the_blocks_are_merged(tmp_path, inputs):
    """A first pass reads no output, so it reports its rows itself: without it the bar stood still for the whole
    pass (a minute for DELLA on a Llama-3 embedding)."""
    root, _, _ = inputs
    job = _job(root, tmp_path, "dare_ties", True)  # a drop (data), then the rescale pass: one first pass
    events = []
    run_merge(job, tmp_path / "out", device="cpu", memory_budget=1, on_event=events.append)
    labels = [event.tensor for event in events]
    passes = [label for label in labels if label.startswith("pass ")]
    assert passes == [f"pass 1 ({percent}%) · {NAME}" for percent in (34, 68, 100)]  # 512, 1024, 1501 rows
    assert labels.index(passes[-1]) < labels.index(NAME)  # all before the first merged block
    done = [event.bytes_done for event in events]
    assert done == sorted(done) and done[-1] == events[-1].bytes_total
