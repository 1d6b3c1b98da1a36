"""The exact decomposition of 1 − retention (analysis/loss_parts.py) against a numpy float64 computation
written here, entry by entry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergescope.analysis.loss_parts import PARTS, loss_part_sums, loss_parts


def reference(tau: np.ndarray, merged: np.ndarray) -> list[dict[str, float]]:
    """Per source: each part's Σ τ(τ − τ_m) / ‖τ‖², classifying entry by entry in a Python loop."""
    out = []
    for t in tau:
        parts = dict.fromkeys(PARTS, 0.0)
        for a, m in zip(t.ravel().tolist(), merged.ravel().tolist()):
            if a == 0:
                continue
            if m == 0:
                part = "zeroed"
            elif a * m < 0:
                part = "reversed"
            elif abs(m) > abs(a):
                part = "amplified"
            else:
                part = "shrunk"
            parts[part] += a * (a - m)
        norm = float((t.astype(np.float64) ** 2).sum())
        out.append({k: v / norm for k, v in parts.items()})
    return out


def test_parts_match_an_entry_by_entry_classification_and_sum_to_one_minus_retention():
    rng = np.random.default_rng(0)
    tau = rng.standard_normal((3, 40, 17)).astype(np.float32)
    tau[0, :5] = 0  # unchanged entries of one source
    merged = (0.6 * tau[0] - 0.9 * tau[1] + 0.3 * tau[2]).astype(np.float32)
    merged[3:9] = 0  # entries the merge left at the base
    sums = loss_part_sums(torch.from_numpy(tau), torch.from_numpy(merged))
    expected = reference(tau.astype(np.float64), merged.astype(np.float64))
    for i in range(3):
        norm = float((tau[i].astype(np.float64) ** 2).sum())
        parts = loss_parts(sums[i], norm)
        for name in PARTS:
            assert getattr(parts, name) == pytest.approx(expected[i][name], abs=1e-12)
        retention = float((tau[i].astype(np.float64) * merged.astype(np.float64)).sum()) / norm
        assert parts.total == pytest.approx(1 - retention, abs=1e-9)
        mass = parts.zeroed_mass + parts.reversed_mass + parts.shrunk_mass + parts.amplified_mass
        assert mass == pytest.approx(1.0, abs=1e-9)  # every changed entry is in exactly one part
    assert parts.reversed > 0 and parts.zeroed > 0


def test_blocks_add_up_to_the_whole_tensor():
    rng = np.random.default_rng(1)
    tau = torch.from_numpy(rng.standard_normal((2, 64, 8)))
    merged = tau[0] * 0.5 - tau[1]
    whole = loss_part_sums(tau, merged)
    blocks = sum(loss_part_sums(tau[:, a:a + 16], merged[a:a + 16]) for a in range(0, 64, 16))
    np.testing.assert_allclose(blocks, whole, rtol=1e-12, atol=1e-12)


def test_a_reversed_entry_costs_more_than_its_share_and_an_amplified_one_is_a_gain():
    tau = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    sums = loss_part_sums(tau, torch.tensor([-1.0, 0.0, 0.5, 2.0]))
    parts = loss_parts(sums[0], 4.0)
    assert (parts.reversed, parts.zeroed, parts.shrunk, parts.amplified) == (0.5, 0.25, 0.125, -0.25)
    assert (parts.reversed_mass, parts.zeroed_mass) == (0.25, 0.25)
    assert parts.largest() == "reversed"
    assert loss_parts(np.zeros((2, 4)), 0.0) is None


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(1, 30), st.integers(0, 2**31 - 1), st.sampled_from([torch.float32, torch.bfloat16]))
def test_parts_always_sum_to_one_minus_retention(n, size, seed, dtype):
    generator = torch.Generator().manual_seed(seed)
    tau = torch.randn(n, size, generator=generator).to(dtype)
    tau[torch.rand(n, size, generator=generator) < 0.2] = 0
    merged = (tau.double() * torch.randn(n, 1, generator=generator, dtype=torch.float64)).sum(0).to(dtype)
    merged[torch.rand(size, generator=generator) < 0.2] = 0
    sums = loss_part_sums(tau, merged)
    for i in range(n):
        t, m = tau[i].double(), merged.double()
        norm = float((t * t).sum())
        parts = loss_parts(sums[i], norm)
        if norm == 0:
            assert parts is None
            continue
        assert parts.total == pytest.approx(1 - float((t * m).sum()) / norm, abs=1e-9)
