"""ram, ramplus_tl and arcee_fusion against their formulas, computed here in numpy float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mergescope.merge.methods import METHODS


def run(name, base, models, **options):
    method = METHODS[name]
    inputs = [torch.tensor(m, dtype=torch.float32) for m in models]
    out = method.function(torch.tensor(base, dtype=torch.float32), inputs, [{} for _ in models], options, None)
    return out.double().numpy()


@pytest.fixture
def inputs():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(6, 40))
    models = []
    for _ in range(3):
        tau = rng.normal(size=base.shape) * 0.01
        tau[rng.random(base.shape) < 0.5] = 0.0  # sparse changes: unique and shared entries both occur
        models.append(base + tau)
    return base.astype(np.float32).astype(np.float64), [m.astype(np.float32).astype(np.float64) for m in models]


def reference_ram(base, models, eps, r=None, alpha=None):
    taus = np.stack([m - base for m in models]).reshape(len(models), -1)
    counts = np.abs(taus) > eps
    c = counts.sum(0)
    merged = np.zeros(taus.shape[1])
    for i in range(len(models)):
        unique = counts[i] & (c == 1)
        shared = counts[i] & (c > 1)
        factor = 1.0
        if r is not None:
            rho = shared.sum() / max((counts[i] & (c == 1)).sum(), eps)
            factor = 1 + r * min(max(rho, 0), alpha)
        merged += np.where(unique, taus[i] * factor, 0) + np.where(shared, taus[i] / np.maximum(c, 1), 0)
    return base + merged.reshape(base.shape)


def test_ram(inputs):
    base, models = inputs
    got = run("ram", base, models, epsilon=1e-5)
    np.testing.assert_allclose(got, reference_ram(base, models, 1e-5), rtol=1e-6, atol=1e-7)
    # an entry only one model changed takes that change whole; one several changed takes their mean
    taus = np.stack([m - base for m in models])
    one = np.argwhere((np.abs(taus) > 1e-5).sum(0) == 1)[0]
    changer = int(np.argmax(np.abs(taus[:, one[0], one[1]])))
    assert got[tuple(one)] == pytest.approx(models[changer][tuple(one)], abs=1e-6)


@pytest.mark.parametrize("r, alpha", [(0.1, 0.2), (0.5, 5.0)])
def test_ramplus_tl(inputs, r, alpha):
    base, models = inputs
    got = run("ramplus_tl", base, models, epsilon=1e-5, r=r, alpha=alpha)
    np.testing.assert_allclose(got, reference_ram(base, models, 1e-5, r, alpha), rtol=1e-6, atol=1e-7)


def test_arcee_fusion(inputs):
    base, models = inputs
    model = models[0]
    got = run("arcee_fusion", base, [model])

    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    p, q = softmax(model) + 1e-8, softmax(base) + 1e-8
    importance = np.abs(model - base) * (p * np.log(p / q)).sum(-1, keepdims=True)
    ordered = np.sort(importance.reshape(-1))
    n = ordered.size
    q1, med, q3 = (ordered[int(np.float32(level) * np.float32(n - 1))] for level in (0.25, 0.5, 0.75))
    keep = importance >= med + 1.5 * (q3 - q1)
    assert 0 < keep.sum() < keep.size  # the threshold really selects
    expected = np.where(keep, model, base)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_arcee_fusion_needs_one_model_and_a_base(inputs):
    from mergescope.checkpoints import MergescopeError

    base, models = inputs
    with pytest.raises(MergescopeError, match="exactly one model"):
        run("arcee_fusion", base, models[:2])
