"""The drill-down's per-tensor numbers against numpy."""

from __future__ import annotations

import math

import numpy as np
import torch

from builders import llama_config, llama_state, write_model
from mergescope.analysis.tensor_detail import tensor_detail
from mergescope.checkpoints import open_checkpoint

TENSOR = "model.layers.0.mlp.up_proj.weight"


def _models(tmp_path):
    config = llama_config()
    base = llama_state(config, seed=0)
    g = torch.Generator().manual_seed(3)
    tau_a = torch.randn(base[TENSOR].shape, generator=g) * 0.01
    tau_a[tau_a.abs() < 0.004] = 0.0  # entries ft_a leaves alone
    tau_b = -tau_a.clone()
    tau_b[:, ::2] = 0.02  # conflicts on odd columns only where ft_a moved, agreement or "one" elsewhere
    states = {"base": base, "ft_a": dict(base), "ft_b": dict(base)}
    states["ft_a"][TENSOR] = base[TENSOR] + tau_a
    states["ft_b"][TENSOR] = base[TENSOR] + tau_b
    for name, state in states.items():
        write_model(tmp_path / name, state, config)
    b = open_checkpoint(str(tmp_path / "base"))
    return b, [open_checkpoint(str(tmp_path / n), base=b) for n in ("ft_a", "ft_b")], states


def test_detail_matches_numpy(tmp_path):
    base, models, states = _models(tmp_path)
    detail = tensor_detail(base, models, ["ft_a", "ft_b"], TENSOR, bins=11)
    theta0 = states["base"][TENSOR].numpy().astype(np.float64).ravel()
    taus = [states[n][TENSOR].numpy().astype(np.float64).ravel() - theta0 for n in ("ft_a", "ft_b")]
    # sign breakdown
    signs = np.stack([np.sign(t) for t in taus])
    pos, neg = (signs > 0).sum(0), (signs < 0).sum(0)
    moved = pos + neg
    assert detail.signs == {
        "none": int((moved == 0).sum()), "one": int((moved == 1).sum()),
        "agree": int(((moved >= 2) & ((pos == 0) | (neg == 0))).sum()), "conflict": int(((pos > 0) & (neg > 0)).sum()),
    }
    assert detail.signs["conflict"] > 0 and detail.signs["one"] > 0
    # energy kept by the top ⌈d·N⌉ squared entries
    for d in (0.1, 0.5):
        for i, tau in enumerate(taus):
            squares = np.sort(tau**2)[::-1]
            k = math.ceil(d * squares.size)
            assert math.isclose(detail.energy_kept[d][i], squares[:k].sum() / squares.sum(), rel_tol=1e-5)
    # histograms: every entry counted once, symmetric range at the largest |τ|
    limit = max(np.abs(t).max() for t in taus)
    assert math.isclose(detail.limit, limit, rel_tol=1e-6)
    for counts, tau in zip(detail.histograms, taus):
        assert sum(counts) == tau.size
        expected, _ = np.histogram(tau, bins=11, range=(-limit, limit))
        assert np.abs(np.array(counts) - expected).sum() <= 2  # bin-edge rounding of float32 vs float64


def test_sampled_detail_is_deterministic(tmp_path):
    base, models, _ = _models(tmp_path)
    first = tensor_detail(base, models, ["ft_a", "ft_b"], TENSOR, max_entries=100)
    second = tensor_detail(base, models, ["ft_a", "ft_b"], TENSOR, max_entries=100)
    assert first.sampled == 100 and sum(first.signs.values()) == 100
    assert first.signs == second.signs and first.histograms == second.histograms
