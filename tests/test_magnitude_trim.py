"""TIES' trim as a threshold and a tie cut (mergescope.merge.magnitude_trim), against direct computations.

Every expected value here is written out independently of the implementation: the kept entries by a stable
numpy sort of −|τ| (first k kept), the merge by numpy float32 arithmetic in the order of the docstring of
mergescope.merge.methods.task_arithmetic. Large tensors (above the executor's block and the exact-selection
size) take the blockwise path; the counting pass is made to run in many small blocks so ties straddle them.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mergescope.merge import magnitude_counts, magnitude_trim, sparsify, tensor_merge
from mergescope.merge.methods import get_method
from mergescope.merge.methods.task_arithmetic import Trim, disjoint_sums, elect_signs, ties

N = 3 * tensor_merge.ELEMENTWISE_BLOCK + 12_345  # above the executor's block and the exact-selection size


@pytest.fixture
def small_blocks(monkeypatch):
    """The counting pass in blocks of 16 chunks, so one tensor spans dozens of them."""
    monkeypatch.setattr(magnitude_counts, "BLOCK", 16 * magnitude_counts.CHUNK)


def stable_top(magnitude: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` largest entries, ties lowest index first: the first ``count`` of a stable sort of −|τ|."""
    keep = np.zeros(magnitude.size, dtype=bool)
    keep[np.argsort(-magnitude, kind="stable")[:count]] = True
    return keep


def tied_inputs(seed: int, models: int = 3, n: int = N) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A bf16-rounded base and fine-tunes whose task vectors are bf16-rounded too: few distinct magnitudes,
    each shared by thousands of entries spread over the whole tensor, a fifth of the entries unchanged."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g).bfloat16().float()
    out = []
    for i in range(models):
        tau = (torch.randn(n, generator=g) * 2.0 ** (-6 - i)).bfloat16().float()
        tau[torch.rand(n, generator=g) < 0.2] = 0
        out.append(base + tau)  # exact in float32: |τ| ≪ |base| needs fewer than 24 bits here
    return base, out


def reference_ties(
    base: np.ndarray, models: list[np.ndarray], weights: list[float], densities: list[float]
) -> np.ndarray:
    """TIES with normalize, in numpy float32: trim (stable sort), weight, elect by the sign of the sum (ties to
    +), disjoint weighted mean, added to the base. Sums run model by model from +0, as torch's do."""
    deltas = []
    for model, w, d in zip(models, weights, densities):
        tau = model - base
        keep = stable_top(np.abs(tau), sparsify.trim_count(tau.size, d)) if d < 1 else np.ones(tau.size, bool)
        deltas.append(np.float32(w) * np.where(keep, tau, np.float32(0)))
    total = np.zeros_like(base)
    for delta in deltas:
        total = total + delta
    elected = np.where(total >= 0, np.float32(1), np.float32(-1))
    merged, divisor = np.zeros_like(base), np.zeros_like(base)
    for delta, w in zip(deltas, weights):
        agree = np.sign(delta) == elected
        merged = merged + np.where(agree, delta, np.float32(0))
        divisor = divisor + np.where(agree, np.float32(w), np.float32(0))
    divisor[divisor == 0] = 1
    return base + merged / divisor


def blockwise(base: torch.Tensor, models: list[torch.Tensor], params: list[dict]) -> torch.Tensor:
    """TIES through the executor's block-by-block path (trims over the whole tensor, then blocks)."""
    task = SimpleNamespace(output="w", options={"normalize": True}, params=params, base=True, shape=tuple(base.shape))
    return tensor_merge.merge_tensor(get_method("ties"), task, [base, *models], seed=0, device="cpu", out_dtype="F32")


def bits(tensor: torch.Tensor) -> np.ndarray:
    return tensor.contiguous().view(torch.int32).numpy()


@pytest.mark.parametrize("weights, densities", [([1.0, 1.0, 1.0], [0.5, 0.5, 0.5]), ([1.0, 0.5, 2.0], [0.5, 0.3, 0.8])])
def test_ties_on_a_large_tied_tensor_equals_a_direct_computation(small_blocks, monkeypatch, weights, densities):
    base, models = tied_inputs(1)
    exact_calls = []
    monkeypatch.setattr(magnitude_trim, "exact_cut", lambda *a: exact_calls.append(1) or pytest.fail("fallback ran"))
    params = [{"weight": w, "density": d} for w, d in zip(weights, densities)]
    expected = reference_ties(base.numpy(), [m.numpy() for m in models], weights, densities)
    blocked = blockwise(base, models, params)
    whole = ties.merge(base, models, params, {"normalize": True})
    assert not exact_calls  # the blockwise selection answered, without the exact fallback
    assert np.array_equal(bits(whole), expected.view(np.int32))
    assert np.array_equal(bits(blocked), bits(whole))


def test_ties_bf16_inputs_block_by_block_equal_the_whole_tensor(small_blocks):
    """Stored-dtype inputs (bf16) in the blockwise path, float32 in the whole-tensor one: the same bits."""
    g = torch.Generator().manual_seed(2)
    base = torch.randn(N, generator=g).bfloat16()
    models = [(base.float() + 0.01 * torch.randn(N, generator=g)).bfloat16() for _ in range(3)]
    params = [{"weight": 1.0, "density": d} for d in (0.5, 0.2, 0.9)]
    whole = ties.merge(base.float(), [m.float() for m in models], params, {"normalize": True})
    assert np.array_equal(bits(blockwise(base, models, params)), bits(whole))


@pytest.mark.parametrize("bracket", ["negative margin", "sample minimum", "sample maximum"])
def test_a_failed_bracket_falls_back_to_the_exact_selection(small_blocks, monkeypatch, bracket):
    """A bracket of negative width (low above high), or one at the sample's extremes, cannot hold t."""
    base, models = tied_inputs(3)
    params = [{"weight": 1.0, "density": 0.5}] * 3
    expected = reference_ties(base.numpy(), [m.numpy() for m in models], [1.0] * 3, [0.5] * 3)
    calls = []
    exact = magnitude_trim.exact_cut
    monkeypatch.setattr(magnitude_trim, "exact_cut", lambda *a: calls.append(1) or exact(*a))
    if bracket == "negative margin":
        monkeypatch.setattr(magnitude_trim, "MARGIN_SE", -4.0)
        monkeypatch.setattr(magnitude_trim, "MARGIN_MIN", -8)
    else:
        at = (lambda size: 1) if bracket == "sample minimum" else (lambda size: size)
        monkeypatch.setattr(magnitude_trim, "bracket_ranks", lambda rank, numel, size: (at(size), at(size)))
    assert np.array_equal(bits(blockwise(base, models, params)), expected.view(np.int32))
    assert len(calls) == 3


def cut_inputs() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(base, model) pairs whose |τ| ties, aliases with the sample's stride, or is continuous."""
    g = torch.Generator().manual_seed(4)
    n = 300_001
    base = torch.randn(n, generator=g)
    taus = {
        "continuous": torch.randn(n, generator=g) * 0.01,
        "bf16 ties": (torch.randn(n, generator=g) * 0.01).bfloat16().float(),
        "all equal": torch.full((n,), -0.5),
        "sorted": torch.arange(n, dtype=torch.float32) / n,
        "periodic": (torch.arange(n) % 65536).float() / 65536,
        "mostly zero": torch.where(torch.rand(n, generator=g) < 0.99, 0.0, torch.rand(n, generator=g)),
        "two values": torch.where(torch.rand(n, generator=g) < 0.5, 0.25, -0.125),
    }
    return {name: (base, base + tau) for name, tau in taus.items()}


@pytest.mark.parametrize("name", list(cut_inputs()))
def test_cuts_keep_the_stable_sort_top(small_blocks, name):
    base, model = cut_inputs()[name]
    magnitude = (model - base).abs()
    n = magnitude.numel()
    counts = [1, 2, 1000, n // 3, n // 2, n // 2 + 1, n - 7, n - 1, n]
    for count, (threshold, last_tie) in zip(
        counts, magnitude_trim.top_magnitude_cuts(base, [model] * len(counts), counts)
    ):
        keep = magnitude_trim.keep_mask(magnitude, threshold, last_tie)
        assert np.array_equal(keep.numpy(), stable_top(magnitude.numpy(), count)), (name, count)


def test_t_strictly_inside_the_bracket_gathered_in_a_second_pass(small_blocks, monkeypatch):
    """When the sample wrongly predicts a tie at low or high, the entries between are gathered afterwards."""
    base, model = cut_inputs()["continuous"]
    passes = []
    tally = magnitude_counts.tally
    monkeypatch.setattr(magnitude_counts, "tally", lambda *a: passes.append(a[2][0].gather) or tally(*a))
    predicted = magnitude_trim._bracket
    monkeypatch.setattr(magnitude_trim, "_bracket", lambda *a: magnitude_counts.Bracket(
        predicted(*a).low, predicted(*a).high, False))
    count = model.numel() // 2
    threshold, last_tie = magnitude_trim.top_magnitude_cuts(base, [model], [count])[0]
    magnitude = (model - base).abs()
    assert passes == [False, True]
    assert np.array_equal(
        magnitude_trim.keep_mask(magnitude, threshold, last_tie).numpy(), stable_top(magnitude.numpy(), count)
    )


def kthvalue_top(magnitude: np.ndarray, count: int) -> np.ndarray:
    """The trim with NaNs: t is the (n − count + 1)-th smallest with NaN above every number (as ``kthvalue``
    orders), entries > t are kept and ties at t fill up to ``count``, lowest index first; NaN is never kept."""
    t = np.sort(magnitude)[magnitude.size - count]  # numpy sorts NaN last
    keep = magnitude > t
    if not np.isnan(t):
        keep[np.flatnonzero(magnitude == t)[: count - keep.sum()]] = True
    return keep


def test_nan_task_vectors_take_the_exact_selection(small_blocks):
    base, model = cut_inputs()["continuous"]
    model = model.clone()
    model[::1000] = float("nan")
    magnitude = (model - base).abs()
    n = model.numel()
    for count in (n // 2, n - 5, n // 1000, 1):
        threshold, last_tie = magnitude_trim.top_magnitude_cuts(base, [model], [count])[0]
        keep = magnitude_trim.keep_mask(magnitude, threshold, last_tie)
        assert np.array_equal(keep.numpy(), kthvalue_top(magnitude.numpy(), count)), count


def test_apply_cut_has_the_bits_of_multiplying_by_the_mask():
    g = torch.Generator().manual_seed(5)
    tau = (torch.randn(10_000, generator=g) * 0.01).bfloat16().float()
    tau[::17] = -0.0
    tau[5], tau[6], tau[7] = float("inf"), float("-inf"), float("nan")
    magnitude = tau.abs()
    for threshold in (0.0, 0.005, float(magnitude[100]), float(magnitude.nan_to_num(0).max()), float("inf")):
        for last_tie in (-5, -1, 0, 1234, 9_998, 9_999, 20_000):
            expected = tau * magnitude_trim.keep_mask(magnitude, torch.tensor(threshold), last_tie)
            got = magnitude_trim.apply_cut_(tau.clone(), threshold, last_tie)
            assert np.array_equal(bits(got), bits(expected)), (threshold, last_tie)


def test_trim_blocks_keep_the_tie_cut_at_its_flat_index():
    trim = Trim(threshold=0.5, last_tie=10)
    assert trim.block(8, 20).last_tie == 2 and trim.block(16, 20).last_tie == -6 and trim.block(0, 4).last_tie == 10


@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0, 1.0], [0.3, -0.7, 1.0, 2.0]])
def test_disjoint_sums_equal_the_sign_mask_formula(weights):
    """Σ δᵢ·[agree] and Σ wᵢ·[agree] with zeros of both signs, exact cancellations and all-zero entries."""
    g = torch.Generator().manual_seed(6)
    deltas = (torch.randn(4, 50_000, generator=g) * 0.01).bfloat16().float()
    deltas[:, ::7] = 0.0
    deltas[1, ::5] = -0.0
    deltas[2, ::3] = -deltas[0, ::3]
    deltas[:, ::11] = -0.0
    w = torch.tensor(weights).reshape(-1, 1)
    deltas *= w
    agree = elect_signs(deltas)
    expected_merged, expected_divisor = (deltas * agree).sum(dim=0), (w * agree).sum(dim=0)
    merged, divisor = disjoint_sums(deltas.clone(), weights)
    assert np.array_equal(bits(merged), bits(expected_merged))
    assert np.array_equal(bits(divisor), bits(expected_divisor))
