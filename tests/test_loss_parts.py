"""The exact decomposition of 1 − retention (analysis/loss_parts.py), from the pass' sign-pattern accumulator,
against a numpy float64 classification written here, entry by entry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergescope.analysis.loss_parts import PARTS, LossParts, loss_parts
from mergescope.analysis.sign_patterns import SignAccumulator


def accumulated(taus: torch.Tensor, merged: torch.Tensor, chunk: int = 7):
    """The accumulator's sums over ``[τ₁…τₙ, τ_m]`` fed in chunks, as the pass feeds it."""
    stacked = torch.cat([taus, merged[None]]).float()
    acc = SignAccumulator(stacked.shape[0], chunk, "cpu", patterns=True)
    for start in range(0, stacked.shape[1], chunk):
        block = stacked[:, start:start + chunk]
        acc.add(torch.sign(block), block)
    return acc.result()


def reference(tau: np.ndarray, merged: np.ndarray, others: list[np.ndarray]) -> dict:
    """One source's parts, classifying entry by entry in a Python loop (float64)."""
    parts = dict.fromkeys(PARTS, 0.0)
    against: dict[int, float] = {}
    for j_entry, (a, m) in enumerate(zip(tau.tolist(), merged.tolist())):
        if a == 0:
            continue
        term = a * (a - m)
        if m == 0:
            parts["zeroed"] += term
        elif a * m < 0:
            parts["reversed"] += term
            for k, other in enumerate(others):
                if other is not None and other[j_entry] * a < 0:
                    against[k] = against.get(k, 0.0) + term
        elif abs(m) > abs(a):
            parts["amplified"] += term
        else:
            parts["shrunk"] += term
    norm = float(tau @ tau)
    return {**{k: v / norm for k, v in parts.items()}, "against": {k: v / norm for k, v in against.items()}}


def test_parts_match_an_entry_by_entry_classification_and_sum_to_one_minus_retention():
    rng = np.random.default_rng(0)
    taus = rng.standard_normal((3, 300)).astype(np.float32)
    taus[0, :20] = 0  # unchanged entries of one source
    merged = (0.6 * taus[0] - 0.9 * taus[1] + 0.3 * taus[2]).astype(np.float32)
    merged[40:70] = 0  # entries the merge left at the base
    found = loss_parts(accumulated(torch.from_numpy(taus), torch.from_numpy(merged)), 3)
    for i in range(3):
        t, m = taus[i].astype(np.float64), merged.astype(np.float64)
        others = [taus[k].astype(np.float64) if k != i else None for k in range(3)]
        want = reference(t, m, others)
        for name in PARTS:
            assert getattr(found[i], name) == pytest.approx(want[name], abs=1e-12)
        assert found[i].against == pytest.approx(want["against"], abs=1e-12)
        assert found[i].total == pytest.approx(1 - (t @ m) / (t @ t), abs=1e-12)
    assert found[1].reversed > 1.0  # ft 1 is subtracted: its reversed entries cost more than their share


def test_a_reversed_entry_costs_more_than_its_share_and_an_amplified_one_is_a_gain():
    taus = torch.tensor([[1.0, 1.0, 1.0, 1.0], [-3.0, 0.0, 0.0, 1.0]])
    [first, _] = loss_parts(accumulated(taus, torch.tensor([-1.0, 0.0, 0.5, 2.0])), 2)
    assert (first.reversed, first.zeroed, first.shrunk, first.amplified) == (0.5, 0.25, 0.125, -0.25)
    assert first.against == {1: 0.5} and first.ratio == {1: 3.0}  # |−3| against |1| where it reversed


def test_a_source_that_changed_nothing_has_no_parts_and_groups_combine_by_mass():
    taus = torch.tensor([[0.0, 0.0], [1.0, -1.0]])
    assert loss_parts(accumulated(taus, torch.tensor([1.0, 0.0])), 2)[0] is None
    a = LossParts(0.2, 0.4, 0.1, -0.1, against={1: 0.4}, ratio={1: 2.0})
    b = LossParts(0.0, 0.2, 0.0, 0.0, against={1: 0.2}, ratio={1: 4.0})
    both = LossParts.weighted_mean([(3.0, a), (1.0, b)])
    assert (both.zeroed, both.reversed, both.shrunk, both.amplified) == pytest.approx((0.15, 0.35, 0.075, -0.075))
    assert both.against[1] == pytest.approx(0.35)
    assert both.ratio[1] == pytest.approx((1.2 * 2.0 + 0.2 * 4.0) / 1.4)  # weighted by the cost each explains
    assert LossParts.weighted_mean([(0.0, a)]) is None


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(1, 40), st.integers(0, 2**31 - 1),
       st.sampled_from([torch.float32, torch.bfloat16]))
def test_parts_always_sum_to_one_minus_retention(n, size, seed, dtype):
    generator = torch.Generator().manual_seed(seed)
    taus = torch.randn(n, size, generator=generator).to(dtype)
    taus[torch.rand(n, size, generator=generator) < 0.2] = 0
    merged = (taus.double() * torch.randn(n, 1, generator=generator, dtype=torch.float64)).sum(0).to(dtype)
    merged[torch.rand(size, generator=generator) < 0.2] = 0
    found = loss_parts(accumulated(taus, merged), n)
    for i in range(n):
        t, m = taus[i].double(), merged.double()
        norm = float((t * t).sum())
        if norm == 0:
            assert found[i] is None
            continue
        assert found[i].total == pytest.approx(1 - float((t * m).sum()) / norm, abs=1e-9)
