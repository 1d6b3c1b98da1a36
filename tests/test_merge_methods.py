"""The merge methods against formulas written out here, in numpy float64, independently of the implementation.

Each reference follows the maths in the method's docstring (mergekit 0.1.5's semantics); trims use a stable
numpy sort, the behaviour the implementation must reproduce with selection. Random methods are checked for
reproducibility, for their draw contract (per-chunk generators seeded from the draw seed passed in, written
out in ``draw_reference``) and statistically.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import draw_reference
from mergescope.checkpoints.errors import MergescopeError
from mergescope.merge import sparsify
from mergescope.merge.methods import METHODS, get_method

ORDER = [
    "linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della",
    "della_linear", "slerp", "nearswap", "model_stock", "sce", "nuslerp", "multislerp", "karcher", "ram", "ramplus_tl",
    "arcee_fusion", "passthrough",
]


# --- helpers ----------------------------------------------------------------------------------------------------
def run(name, base, models, per_model=None, seed=None, **options):
    """Call a method the way the executor does: defaults filled, per-model values given as lists."""
    method = get_method(name)
    params = []
    for i in range(len(models)):
        p = {s.name: s.default for s in method.parameters if s.per_model}
        p.update({k: v[i] for k, v in (per_model or {}).items()})
        params.append(p)
    opts = {s.name: s.default for s in method.parameters if not s.per_model}
    opts.update(options)
    opts["tensor_name"] = "model.layers.0.mlp.up_proj.weight"
    t = lambda x: None if x is None else torch.as_tensor(np.asarray(x), dtype=torch.float32)  # noqa: E731
    out = method.function(t(base), [t(m) for m in models], params, opts, seed)
    assert out.dtype == torch.float32
    return out.numpy().astype(np.float64)


def rng(seed=0):
    return np.random.default_rng(seed)


def f32(x):
    """Round to float32 (the inputs the methods see), back in float64."""
    return np.asarray(x, dtype=np.float32).astype(np.float64)


def fine_tunes(shape, n, seed=0, scale=0.1):
    r = rng(seed)
    base = f32(r.normal(size=shape))
    return base, [f32(base + scale * r.normal(size=shape)) for _ in range(n)]


def close(a, b, tol=1e-5):
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


def ref_top(tau, density):
    """TIES trim: the max(1, ⌊d·n⌋) largest |τ| (stable order: equal magnitudes lowest index first)."""
    flat = tau.reshape(-1)
    if density >= 1:
        return np.ones(flat.size, bool).reshape(tau.shape)
    k = 0 if density <= 0 else max(1, int(density * flat.size))
    keep = np.zeros(flat.size, bool)
    keep[np.argsort(-np.abs(flat), kind="stable")[:k]] = True
    return keep.reshape(tau.shape)


def ref_outliers(tau, density, gamma):
    flat = tau.reshape(-1)
    n = flat.size
    if density >= 1:
        return np.ones(n, bool).reshape(tau.shape)
    k = int(density * n)
    bottom = max(0, n - k - int(gamma * n))
    keep = np.zeros(n, bool)
    keep[np.argsort(np.abs(flat), kind="stable")[bottom : bottom + k]] = True
    return keep.reshape(tau.shape)


def ref_task_arithmetic(base, models, weights, masks=None, elect=False, normalize=False, lam=1.0, rescale=False):
    taus = [m - base for m in models]
    if masks is not None:
        trimmed = []
        for tau, mask in zip(taus, masks):
            kept = tau * mask
            before, after = np.abs(tau).sum(), np.abs(kept).sum()
            if rescale and before >= 1e-7 and after >= 1e-7:
                kept = kept * before / after
            trimmed.append(kept)
        taus = trimmed
    deltas = np.stack([w * tau for w, tau in zip(weights, taus)])
    w = np.asarray(weights, float).reshape((-1,) + (1,) * base.ndim)
    if elect:
        elected = np.where(deltas.sum(0) >= 0, 1.0, -1.0)
        agree = np.sign(deltas) == elected
        total = (deltas * agree).sum(0)
        divisor = (w * agree).sum(0)
        divisor[divisor == 0] = 1
    else:
        total = deltas.sum(0)
        divisor = w.sum()
        divisor = 1.0 if abs(divisor) < 1e-8 else divisor
    if normalize:
        total = total / divisor
    return base + lam * total


# --- registry -----------------------------------------------------------------------------------------------------
def test_registry_names_roles_and_defaults():
    assert list(METHODS) == ORDER
    for name, method in METHODS.items():
        assert method.name == name and method.description and "\n" not in method.description
        assert method.needs_base == (method.base_role == "required")
        assert method.random == (name in {"dare_linear", "dare_ties", "della", "della_linear"})
    assert {n for n, m in METHODS.items() if m.base_role == "input"} == {"linear", "karcher", "passthrough"}
    assert {n for n, m in METHODS.items() if m.base_role == "optional"} == {"nuslerp", "multislerp"}
    normalize = {n: METHODS[n].parameter("normalize").default for n in ORDER[1:9]}
    rescale = {n: METHODS[n].parameter("rescale").default for n in ORDER[1:9]}
    assert [k for k, v in normalize.items() if v] == ["ties", "della"]
    assert [k for k, v in rescale.items() if v] == ["dare_linear", "dare_ties", "della", "della_linear"]
    ties = METHODS["ties"]
    assert [p.name for p in ties.parameters] == ["int8_mask", "normalize", "rescale", "lambda", "weight", "density"]
    assert ties.parameter("weight").required and ties.parameter("weight").per_model
    density = ties.parameter("density")
    assert density.default == 1.0 and (density.low, density.high) == (0, 1)
    assert METHODS["breadcrumbs"].parameter("gamma").default == 0.01
    assert METHODS["della"].parameter("epsilon").default == 0.15
    assert METHODS["slerp"].parameter("t").required and not METHODS["slerp"].parameter("t").per_model
    assert METHODS["linear"].parameter("normalize").default is True
    assert METHODS["sce"].parameter("select_topk").default == 1.0
    assert METHODS["karcher"].parameter("max_iter").default == 10
    assert not METHODS["passthrough"].parameter("scale").required


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(MergescopeError, match="unknown merge method 'tie'.*linear.*karcher"):
        get_method("tie")


# --- linear, task arithmetic ---------------------------------------------------------------------------------
def test_linear_normalize_on_and_off():
    _, models = fine_tunes((4, 6), 3)
    w = [1.0, 0.5, 2.0]
    weighted = sum(wi * m for wi, m in zip(w, models))
    close(run("linear", None, models, {"weight": w}), weighted / 3.5)
    close(run("linear", None, models, {"weight": w}, normalize=False), weighted)
    with pytest.raises(ValueError):  # the base is an ordinary input of linear
        run("linear", models[0], models[1:], {"weight": w[1:]})


def test_linear_does_not_guard_a_zero_weight_sum():
    _, models = fine_tunes((5,), 2)
    assert not np.isfinite(run("linear", None, models, {"weight": [1.0, -1.0]})).any()


@pytest.mark.parametrize("normalize", [False, True])
def test_task_arithmetic(normalize):
    base, models = fine_tunes((3, 7), 3)
    w = [0.6, 0.3, -0.2]
    expected = ref_task_arithmetic(base, models, w, normalize=normalize, lam=0.8)
    close(run("task_arithmetic", base, models, {"weight": w}, normalize=normalize, **{"lambda": 0.8}), expected)
    # defaults: no normalisation, λ = 1; density is accepted and ignored
    ignored_density = run("task_arithmetic", base, models, {"weight": w, "density": [0.1] * 3})
    close(ignored_density, ref_task_arithmetic(base, models, w))
    # weights summing to ~0 are not divided by
    close(
        run("task_arithmetic", base, models[:2], {"weight": [1.0, -1.0]}, normalize=True), base + models[0] - models[1]
    )
    close(run("task_arithmetic", base, [], {}), base)


# --- TIES ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("densities", [(1.0, 1.0, 1.0), (0.5, 0.3, 0.77), (0.2, 0.2, 0.2), (0.0, 0.4, 1.0)])
@pytest.mark.parametrize("normalize", [True, False])
def test_ties_matches_the_formula(densities, normalize):
    base, models = fine_tunes((6, 9), 3, seed=3)
    w = [1.0, 0.7, 0.4]
    masks = [ref_top(m - base, d) for m, d in zip(models, densities)]
    expected = ref_task_arithmetic(base, models, w, masks, elect=True, normalize=normalize)
    got = run("ties", base, models, {"weight": w, "density": list(densities)}, normalize=normalize)
    close(got, expected)


def test_ties_defaults_normalize_and_rescale_option():
    base, models = fine_tunes((50,), 2, seed=4)
    w, d = [1.0, 2.0], [0.3, 0.6]
    masks = [ref_top(m - base, x) for m, x in zip(models, d)]
    close(
        run("ties", base, models, {"weight": w, "density": d}), ref_task_arithmetic(base, models, w, masks, True, True)
    )
    rescaled = ref_task_arithmetic(base, models, w, masks, True, False, rescale=True)
    got = run("ties", base, models, {"weight": w, "density": d}, normalize=False, rescale=True)
    close(got, rescaled)
    assert np.array_equal(
        got, run("ties", base, models, {"weight": w, "density": d}, normalize=False, rescale=True, int8_mask=True)
    )


def test_ties_sign_election_uses_the_weighted_sum_not_a_count():
    base = np.zeros(3)
    models = [np.array([1.0, 1.0, 2.0]), np.array([1.0, 1.0, -2.0]), np.array([-3.0, 0.0, 0.0])]
    got = run("ties", base, models, {"weight": [1.0, 1.0, 1.0]}, normalize=False)
    # entry 0: two votes for +, but Σ = −1 elects −: only the −3 survives (a count would keep 1 + 1)
    # entry 1: Σ = 2 → +; the zero of model 3 does not agree with anything
    # entry 2: Σ = 0 → + wins the tie
    assert got.tolist() == [-3.0, 2.0, 2.0]
    normalized = run("ties", base, models, {"weight": [1.0, 1.0, 1.0]})
    assert normalized.tolist() == [-3.0, 1.0, 2.0]  # divided by the agreeing weights: 1, 2, 1
    # a negative weight flips a model's vote and enters the divisor with its sign
    flipped = run("ties", np.zeros(1), [np.array([1.0]), np.array([2.0])], {"weight": [1.0, -0.25]})
    assert flipped.tolist() == [1.0]  # δ = (1, −0.5): + elected; only model 1 agrees, divisor 1
    nowhere = run("ties", base, [np.zeros(3), np.zeros(3)], {"weight": [1.0, 1.0]})
    assert nowhere.tolist() == [0.0, 0.0, 0.0]  # nobody agrees: divisor set to 1, not 0


def test_ties_trim_counts_and_threshold_ties():
    tau = np.array([1, -3, 3, 0, -1, 3, 2], float)
    kept = lambda d: run("ties", np.zeros(7), [tau], {"weight": [1.0], "density": [d]}, normalize=False)  # noqa: E731
    assert kept(0.3).tolist() == [0, -3, 3, 0, 0, 0, 0]  # k = 2 of three |3|: the lowest indices
    assert kept(0.6).tolist() == [0, -3, 3, 0, 0, 3, 2]  # k = 4
    assert kept(0.01).tolist() == [0, -3, 0, 0, 0, 0, 0]  # ⌊0.07⌋ = 0 but mergekit keeps at least one
    assert kept(0.0).tolist() == [0] * 7
    big = torch.randint(-3, 4, (40, 31), generator=torch.Generator().manual_seed(2)).float()
    for d in (0.05, 0.33, 0.5, 0.9):
        assert np.array_equal(sparsify.top_magnitude_mask(big, d).numpy(), ref_top(big.numpy(), d))


# --- Model Breadcrumbs ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("density,gamma", [(0.5, 0.1), (0.9, 0.3), (0.3, 0.0), (0.2, 0.05), (0.0, 0.1)])
def test_breadcrumbs(density, gamma):
    base, models = fine_tunes((8, 11), 2, seed=5)
    w = [0.8, 0.5]
    masks = [ref_outliers(m - base, density, gamma) for m in models]
    per = {"weight": w, "density": [density] * 2, "gamma": [gamma] * 2}
    close(run("breadcrumbs", base, models, per), ref_task_arithmetic(base, models, w, masks))
    close(run("breadcrumbs_ties", base, models, per, normalize=True, rescale=True),
          ref_task_arithmetic(base, models, w, masks, elect=True, normalize=True, rescale=True))


def test_breadcrumbs_drops_outliers_and_small_entries_with_stable_ties():
    tau = np.array([5.0, 1.0, 4.0, 2.0, 3.0, 0.5, 6.0, 0.1, 4.0, 1.0])
    got = run("breadcrumbs", np.zeros(10), [tau], {"weight": [1.0], "density": [0.5], "gamma": [0.2]})
    # k = 5, 2 outliers (6, 5) and the 3 smallest (0.1, 0.5 and, of the two 1s, the lower index) dropped
    assert got.tolist() == [0, 0, 4, 2, 3, 0, 0, 0, 4, 1]
    tied = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    mask = sparsify.outlier_mask(torch.tensor(tied), 0.5, 0.2).tolist()
    assert mask == [False, False, True, True, True, False]  # bottom 2 drop the low indices, top 1 the highest
    # density 1 (the default) trims nothing, not even outliers: breadcrumbs is then task arithmetic
    base, models = fine_tunes((30,), 2, seed=6)
    close(run("breadcrumbs", base, models, {"weight": [1.0, 1.0], "gamma": [0.5, 0.5]}),
          ref_task_arithmetic(base, models, [1.0, 1.0]))


# --- DARE -----------------------------------------------------------------------------------------------------------
def draws(seed, shapes, densities):
    """The masks the draw contract implies (``draw_reference``): model i's entries kept with probability densityᵢ
    from chunk generators seeded from (seed, i, chunk); density < 1 only."""
    return [
        draw_reference.dare_keep(shape, d, seed, i).astype(np.float64) if d < 1 else np.ones(shape)
        for i, (shape, d) in enumerate(zip(shapes, densities))
    ]


@pytest.mark.parametrize("name,elect", [("dare_linear", False), ("dare_ties", True)])
def test_dare_formula_given_its_draws(name, elect):
    base, models = fine_tunes((10, 12), 3, seed=7)
    w, d = [1.0, 0.6, 0.3], [0.5, 1.0, 0.2]
    masks = draws(11, [base.shape] * 3, d)
    close(run(name, base, models, {"weight": w, "density": d}, seed=11),
          ref_task_arithmetic(base, models, w, masks, elect=elect, rescale=True))
    close(run(name, base, models, {"weight": w, "density": d}, seed=11, rescale=False, normalize=True),
          ref_task_arithmetic(base, models, w, masks, elect=elect, normalize=True))


def test_random_methods_are_reproducible_and_use_only_their_seed():
    base, models = fine_tunes((16, 16), 2, seed=8)
    per = {"weight": [1.0, 1.0], "density": [0.4, 0.6]}
    for name in ("dare_linear", "dare_ties", "della", "della_linear"):
        torch.manual_seed(0)
        first = run(name, base, models, per, seed=3)
        state = torch.get_rng_state()
        torch.manual_seed(1)
        assert np.array_equal(first, run(name, base, models, per, seed=3))
        assert not np.array_equal(first, run(name, base, models, per, seed=4))
        torch.manual_seed(1)
        run(name, base, models, per, seed=5)
        torch.manual_seed(0)
        assert torch.equal(torch.get_rng_state(), state)  # the global generator was never drawn from
        with pytest.raises(ValueError, match="draw seed"):
            run(name, base, models, per)
    # no draw at density 1: no seed needed, the result is task arithmetic
    close(run("dare_linear", base, models, {"weight": [1.0, 1.0]}), ref_task_arithmetic(base, models, [1.0, 1.0]))


def test_dare_statistics():
    r = rng(9)
    base = np.zeros(20_000)
    tau = f32(r.normal(size=20_000))
    density = 0.3
    out = run("dare_linear", base, [tau], {"weight": [1.0], "density": [density]}, seed=1)
    kept = out != 0
    assert abs(kept.mean() - density) < 0.015
    assert np.abs(out).sum() == pytest.approx(np.abs(tau).sum(), rel=1e-5)  # L1-norm rescale, not 1/density
    assert np.allclose(out[kept] / tau[kept], np.abs(tau).sum() / np.abs(tau[kept]).sum(), rtol=1e-5)
    assert abs(np.abs(tau).sum() / np.abs(tau[kept]).sum() - 1 / density) < 0.2
    # expectation preserved: the mean over draws of the rescaled entries approaches τ
    small = f32(r.normal(size=200))
    mean = np.mean([run("dare_linear", np.zeros(200), [small], {"weight": [1.0], "density": [0.5]}, seed=s)
                    for s in range(400)], axis=0)
    assert np.abs(mean - small).mean() < 0.1 * np.abs(small).mean()
    no_rescale = run("dare_linear", base, [tau], {"weight": [1.0], "density": [density]}, seed=1, rescale=False)
    assert np.array_equal(no_rescale[no_rescale != 0], tau[no_rescale != 0])


# --- DELLA ----------------------------------------------------------------------------------------------------------
def ref_della_probabilities(tau, density, epsilon):
    rows = tau.reshape(1, -1) if tau.ndim < 2 else tau
    ranks = np.argsort(np.argsort(np.abs(rows), axis=1, kind="stable"), axis=1, kind="stable")
    n = rows.shape[1]
    norm = ranks / (n - 1) if n > 1 else np.full(rows.shape, 0.5)
    return (density - epsilon + 2 * epsilon * norm).reshape(tau.shape)


def test_della_probabilities_rank_by_magnitude_per_row():
    tau = np.array([[0.3, -2.0, 0.1, 1.0, 1.0], [5.0, 4.0, 3.0, 2.0, 1.0]])
    got = sparsify.della_probabilities(torch.tensor(tau, dtype=torch.float32), 0.5, 0.2).numpy()
    close(got, ref_della_probabilities(tau, 0.5, 0.2))
    assert got[1].tolist() == pytest.approx([0.7, 0.6, 0.5, 0.4, 0.3])
    cube = f32(rng(1).normal(size=(3, 6, 4)))  # ranked along dim 1
    close(sparsify.della_probabilities(torch.tensor(cube, dtype=torch.float32), 0.4, 0.1).numpy(),
          0.3 + 0.2 * np.argsort(np.argsort(np.abs(cube), axis=1), axis=1) / 5)
    single = sparsify.della_probabilities(torch.ones(4, 1), 0.4, 0.1)  # mergekit fails here (0/0)
    assert torch.allclose(single, torch.full((4, 1), 0.4))


@pytest.mark.parametrize("name,elect,normalize", [("della", True, True), ("della_linear", False, False)])
def test_della_formula_given_its_draws(name, elect, normalize):
    base, models = fine_tunes((6, 20), 2, seed=10)
    w, d, e = [1.0, 0.5], [0.5, 0.4], [0.1, 0.2]
    masks = [
        draw_reference.keep(ref_della_probabilities(m - base, di, ei), 21, i).astype(np.float64)
        for i, (m, di, ei) in enumerate(zip(models, d, e))
    ]
    got = run(name, base, models, {"weight": w, "density": d, "epsilon": e}, seed=21)
    close(got, ref_task_arithmetic(base, models, w, masks, elect=elect, normalize=normalize, rescale=True))


def test_della_statistics_and_epsilon_check():
    tau = f32(rng(11).normal(size=(4, 5000)))
    out = run("della_linear", np.zeros_like(tau), [tau], {"weight": [1.0], "density": [0.4], "epsilon": [0.2]}, seed=2)
    kept = out != 0
    assert abs(kept.mean() - 0.4) < 0.02
    order = np.argsort(np.abs(tau), axis=1)
    low = np.take_along_axis(kept, order[:, :1000], axis=1).mean()
    high = np.take_along_axis(kept, order[:, -1000:], axis=1).mean()
    assert abs(low - 0.22) < 0.04 and abs(high - 0.58) < 0.04  # p from 0.2 (smallest) to 0.6 (largest)
    with pytest.raises(MergescopeError, match="epsilon"):
        run("della", np.zeros(8), [np.ones(8)], {"weight": [1.0], "density": [0.1]}, seed=0)  # 0.1 − 0.15 ≤ 0


# --- slerp, nearswap ---------------------------------------------------------------------------------------------
def ref_slerp(t, a, b):
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    na, nb = (na if na > 1e-8 else 1.0), (nb if nb > 1e-8 else 1.0)
    c = np.clip(np.sum(a / na * b / nb), -1, 1)
    if abs(c) > 0.9995:
        return (1 - t) * a + t * b
    phi = math.acos(c)
    return (math.sin((1 - t) * phi) * a + math.sin(t * phi) * b) / math.sin(phi)


@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 1.0])
def test_slerp(t):
    r = rng(12)
    a, b = f32(r.normal(size=(5, 8))), f32(r.normal(size=(5, 8)))
    got = run("slerp", a, [b], t=t)
    close(got, ref_slerp(t, a, b))
    if t == 0.0:
        close(got, a)
    colinear = f32(2 * a + 1e-4 * r.normal(size=a.shape))  # |cos| > 0.9995: plain interpolation
    close(run("slerp", a, [colinear], t=t), (1 - t) * a + t * colinear)
    close(run("slerp", a, [-a], t=t), (1 - t) * a - t * a)
    with pytest.raises(MergescopeError, match="exactly one"):
        run("slerp", a, [b, b], t=t)


def test_nearswap():
    a = np.array([0.0, 0.0, 1.0, 2.0, 5.0])
    b = np.array([0.0, 0.05, 1.5, 1.0, 5.0 + 1e-9])
    t = 0.1
    w = np.clip(t / np.maximum(np.abs(a - b), 1e-6), 0, 1)
    close(run("nearswap", a, [b], t=t), w * b + (1 - w) * a)
    assert run("nearswap", a, [b], t=t)[1] == pytest.approx(0.05)  # within t: b's value


# --- model_stock, sce ------------------------------------------------------------------------------------------------
def ref_model_stock(base, models, filter_wise=False):
    shape = base.shape
    if filter_wise:
        base2, ms = (base[None], [m[None] for m in models]) if base.ndim == 1 else (base, models)
    else:
        base2, ms = base.reshape(-1), [m.reshape(-1) for m in models]
    taus = [m - base2 for m in ms]
    cos = []
    for i in range(len(taus)):
        for j in range(i + 1, len(taus)):
            dot = (taus[i] * taus[j]).sum(-1)
            norms = np.linalg.norm(taus[i], axis=-1) * np.linalg.norm(taus[j], axis=-1)
            cos.append(np.clip(dot / np.maximum(norms, 1e-6), -1, 1))
    c = np.mean(cos, axis=0)[..., None]
    n = len(ms)
    den = 1 + (n - 1) * c
    t = np.where(np.abs(den) < 1e-6, 0.0, n * c / np.where(np.abs(den) < 1e-6, 1, den))
    return (t * (sum(ms) / n) + (1 - t) * base2).reshape(shape)


@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("shape", [(6, 10), (12,)])
def test_model_stock(filter_wise, shape):
    r = rng(13)
    base = f32(r.normal(size=shape))
    common = r.normal(size=shape)
    models = [f32(base + 0.1 * common + 0.1 * r.normal(size=shape)) for _ in range(3)]
    close(run("model_stock", base, models, filter_wise=filter_wise), ref_model_stock(base, models, filter_wise))
    tau = f32(r.normal(size=shape))
    close(run("model_stock", base, [base + tau, base - tau]), base)  # c = −1: singular, the base is kept
    with pytest.raises(MergescopeError):
        run("model_stock", base, models[:1])


def ref_sce(base, models, topk):
    taus = np.stack([m - base for m in models])
    if topk < 1:
        var = taus.var(axis=0).reshape(-1)
        k = int(np.float32(np.count_nonzero(var)) * np.float32(topk))
        keep = np.zeros(var.size, bool)
        keep[np.argsort(-var, kind="stable")[:k]] = True
        taus = taus * keep.reshape(base.shape)
    energy = (taus**2).reshape(len(models), -1).mean(1)
    w = np.full(len(models), 1 / len(models)) if abs(energy.sum()) < 1e-6 else energy / energy.sum()
    w = w.reshape((-1,) + (1,) * base.ndim)
    agree = np.sign(taus) == np.where(taus.sum(0) >= 0, 1.0, -1.0)
    kept = w * agree
    return base + (taus * kept).sum(0) / np.maximum(kept.sum(0), 1e-6)


@pytest.mark.parametrize("topk", [1.0, 0.5, 0.1, 0.0])
def test_sce(topk):
    base, models = fine_tunes((7, 9), 3, seed=14)
    models[2] = f32(base + 3 * (models[2] - base))
    got = run("sce", base, models, select_topk=topk)
    close(got, ref_sce(base, models, topk))
    assert np.array_equal(got, run("sce", base, models, select_topk=topk, int8_mask=True))
    if topk == 0.0:
        close(got, base)


# --- nuslerp, multislerp, karcher -----------------------------------------------------------------------------------
def ref_arc(t, v0, v1):
    """slerp between the rows of v0, v1 (last axis), lerp when exactly colinear."""
    u0 = v0 / np.maximum(np.linalg.norm(v0, axis=-1, keepdims=True), 1e-7)
    u1 = v1 / np.maximum(np.linalg.norm(v1, axis=-1, keepdims=True), 1e-7)
    c = np.clip((u0 * u1).sum(-1, keepdims=True), -1, 1)
    phi = np.arccos(c)
    with np.errstate(invalid="ignore", divide="ignore"):
        arc = (np.sin((1 - t) * phi) * v0 + np.sin(t * phi) * v1) / np.sin(phi)
    return np.where(1 - c**2 <= 1e-16, (1 - t) * v0 + t * v1, arc)


@pytest.mark.parametrize("with_base", [True, False])
def test_nuslerp(with_base):
    base, (m1, m2) = fine_tunes((4, 6), 2, seed=15)
    b = base if with_base else None
    x1, x2 = (m1 - base, m2 - base) if with_base else (m1, m2)
    offset = base if with_base else 0
    t = 3.0 / 4.0
    w = {"weight": [1.0, 3.0]}
    close(run("nuslerp", b, [m1, m2], w), offset + ref_arc(t, x1.reshape(-1), x2.reshape(-1)).reshape(4, 6))
    close(run("nuslerp", b, [m1, m2], w, nuslerp_flatten=False), offset + ref_arc(t, x1, x2))
    close(
        run("nuslerp", b, [m1, m2], w, nuslerp_flatten=False, nuslerp_row_wise=True), offset + ref_arc(t, x1.T, x2.T).T
    )
    close(
        run("nuslerp", b, [m1, m2], {"weight": [1.0, -1.0]}),  # weights summing to 0: t = 1/2
        offset + ref_arc(0.5, x1.reshape(-1), x2.reshape(-1)).reshape(4, 6),
    )


def ref_multislerp(base, models, weights, normalize=True, eps=1e-8):
    x = np.stack([m - (0 if base is None else base) for m in models]).reshape(len(models), -1)
    w = np.asarray(weights, float)
    w = w / w.sum() if normalize else w
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    u = x / (norms + eps)
    m = (w[:, None] * u).sum(0)
    m = m / np.linalg.norm(m)
    v = ((u - (u @ m)[:, None] * m) * w[:, None]).sum(0)
    length = np.linalg.norm(v) + eps
    r = (m * np.cos(length) + v * np.sin(length) / length) * (norms[:, 0] * w).sum()
    return r.reshape(models[0].shape) + (0 if base is None else base)


@pytest.mark.parametrize("with_base", [True, False])
def test_multislerp(with_base):
    base, models = fine_tunes((5, 4), 3, seed=16)
    b = base if with_base else None
    w = [1.0, 0.5, 0.25]
    close(run("multislerp", b, models, {"weight": w}), ref_multislerp(b, models, w))
    close(run("multislerp", b, models, {"weight": w}, normalize_weights=False), ref_multislerp(b, models, w, False))
    close(run("multislerp", b, models[:1], {"weight": w[:1]}), models[0])
    tau = f32(rng(1).normal(size=(5, 4)))
    zero = np.zeros((5, 4))
    close(run("multislerp", zero, [tau, -tau], {"weight": [1.0, 1.0]}), zero)  # antipodal pair: linear fallback
    with pytest.raises(MergescopeError):
        run("multislerp", zero, [tau, -tau, tau, -tau], {"weight": [1.0] * 4})


def ref_karcher(models, max_iter=10, tol=1e-5):
    x = [m.reshape(-1) for m in models]
    norms = [np.linalg.norm(v) for v in x]
    valid = [(v / n) for v, n in zip(x, norms) if n > tol]
    a = 1 / len(valid)
    m = sum(a * u for u in valid)
    m = m / np.linalg.norm(m)
    for _ in range(max_iter):
        tangent = np.zeros_like(m)
        for u in valid:
            c = np.clip(m @ u, -1, 1)
            phi = math.acos(c)
            if phi >= tol:
                tangent += a * phi / math.sin(phi) * (u - c * m)
        length = np.linalg.norm(tangent)
        if length < tol:
            break
        m = math.cos(length) * m + math.sin(length) * tangent / length
        m = m / np.linalg.norm(m)
    return (sum(norms) / len(models) * m).reshape(models[0].shape)


def test_karcher():
    r = rng(17)
    models = [f32(r.normal(size=(6, 5)) + 2) for _ in range(3)]
    close(run("karcher", None, models), ref_karcher(models), tol=2e-5)
    with_zero = models[:2] + [np.zeros((6, 5))]  # a zero input drops out of the direction, counts in the norm
    close(run("karcher", None, with_zero), ref_karcher(with_zero), tol=2e-5)
    close(run("karcher", None, [models[0], models[0]]), models[0])
    assert not run("karcher", None, [np.zeros(3), np.zeros(3)]).any()
    with pytest.raises(ValueError):  # the base is an ordinary input of karcher
        run("karcher", models[0], models[1:])


def test_passthrough():
    x = f32(rng(18).normal(size=(3, 3)))
    close(run("passthrough", None, [x]), x)
    close(run("passthrough", None, [x], {"scale": [0.5]}), 0.5 * x)
    with pytest.raises(MergescopeError):
        run("passthrough", None, [x, x])


# --- sparsify's selection ----------------------------------------------------------------------------------------
def test_select_extreme_tie_directions():
    values = torch.tensor([2.0, 1.0, 2.0, 3.0, 2.0, 0.0])
    assert sparsify.select_extreme(values, 2, largest=True, low_index_first=True).tolist() == [1, 0, 0, 1, 0, 0]
    assert sparsify.select_extreme(values, 3, largest=True, low_index_first=False).tolist() == [0, 0, 1, 1, 1, 0]
    assert sparsify.select_extreme(values, 3, largest=False, low_index_first=True).tolist() == [1, 1, 0, 0, 0, 1]
    assert sparsify.select_extreme(values, 0, largest=True, low_index_first=True).sum() == 0
    assert sparsify.select_extreme(values, 9, largest=False, low_index_first=True).all()
    r = torch.randint(-5, 6, (2000,), generator=torch.Generator().manual_seed(1)).float()
    for k in (1, 100, 1234):
        top = np.zeros(2000, bool)
        top[np.argsort(-np.abs(r.numpy()), kind="stable")[:k]] = True
        assert np.array_equal(sparsify.select_extreme(r.abs(), k, largest=True, low_index_first=True).numpy(), top)
