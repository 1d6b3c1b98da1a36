"""An independent reference for the analysis statistics, written in numpy float64 straight from the
issue's definitions (explicit sign masks and per-element counts, no Gram matrices), so that the fused
engine in ``mergescope.analysis`` is checked against something that shares none of its code.

Task vectors are computed in float32 (τ = θᵢ − θ₀ with both converted to float32 first, as the issue
says); every statistic is then formed in float64. Elements that are NaN/Inf in a model or in the base
count as 0. Groups and the total are the statistics of the *concatenation* of their tensors.

At the end: helpers the analysis tests share (comparing a report with this reference, making fine-tunes).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch


# --- inputs ---------------------------------------------------------------------------------------------
def f32(values) -> np.ndarray:
    """A torch tensor (any float dtype, bf16 included) or array → flat float32 numpy array."""
    if hasattr(values, "detach"):
        values = values.detach().float().cpu().numpy()
    return np.asarray(values, dtype=np.float32).reshape(-1).copy()


def clean_base(base) -> np.ndarray:
    """θ₀ in float32 with its non-finite elements counted as 0."""
    base = f32(base)
    base[~np.isfinite(base)] = 0.0
    return base


def task_vector(base, model) -> np.ndarray:
    """τ = θ − θ₀ computed in float32; 0 wherever the model or the base is NaN/Inf."""
    base, model = f32(base), f32(model)
    bad = ~np.isfinite(base) | ~np.isfinite(model)
    safe_base = np.where(bad, np.float32(0), base)
    safe_model = np.where(bad, np.float32(0), model)
    tau = (safe_model - safe_base).astype(np.float32)  # a float32 subtraction
    tau[bad] = 0.0
    return tau


def trim_mask(tau: np.ndarray, density: float) -> np.ndarray:
    """Top-k by |τ| with k = max(1, ⌊density · numel⌋) (TIES keeps at least one entry) for density < 1;
    equal magnitudes are taken lowest index first."""
    tau = np.asarray(tau).reshape(-1)
    k = tau.size if density >= 1 else max(1, math.floor(density * tau.size))
    order = np.argsort(-np.abs(tau), kind="stable")  # stable: ties keep index order
    mask = np.zeros(tau.size, dtype=bool)
    mask[order[:k]] = True
    return mask


# --- statistics of one set of elements ------------------------------------------------------------------
def _pair_sign_conflict(a: np.ndarray, b: np.ndarray) -> float | None:
    sa, sb = np.sign(a), np.sign(b)
    both = int(np.count_nonzero((sa != 0) & (sb != 0)))
    opposite = int(np.count_nonzero(sa * sb < 0))
    return None if both == 0 else opposite / both


def _conflict_all(taus: list[np.ndarray]) -> float | None:
    """Elements nonzero in ≥ 2 models whose nonzero signs are not all equal, over the former."""
    positives = sum((t > 0).astype(np.int64) for t in taus)
    negatives = sum((t < 0).astype(np.int64) for t in taus)
    several = (positives + negatives) >= 2
    disagree = several & (positives > 0) & (negatives > 0)
    count = int(np.count_nonzero(several))
    return None if count == 0 else int(np.count_nonzero(disagree)) / count


def statistics(
    base: np.ndarray, taus: list[np.ndarray], names: list[str], trimmed: list[np.ndarray] | None = None
) -> dict:
    """The statistics block over one set of elements: base (cleaned) and the models' τ (float32 arrays)."""
    base64 = np.asarray(base, dtype=np.float64)
    t64 = [np.asarray(t, dtype=np.float64) for t in taus]
    numel = base64.size
    base_norm = math.sqrt(float(np.sum(base64 * base64)))
    norms = [math.sqrt(float(np.sum(t * t))) for t in t64]
    delta = {}
    for name, t, norm in zip(names, t64, norms):
        delta[name] = {
            "norm": norm,
            "rel": None if base_norm == 0 else norm / base_norm,
            "nonzero": None if numel == 0 else int(np.count_nonzero(t)) / numel,
            "max_abs": float(np.max(np.abs(t))) if numel else 0.0,
        }
    pairs = []
    for i in range(len(t64)):
        for j in range(i + 1, len(t64)):
            denominator = norms[i] * norms[j]
            pair = {
                "a": names[i],
                "b": names[j],
                "cosine": None if denominator == 0 else float(np.sum(t64[i] * t64[j])) / denominator,
                "sign_conflict": _pair_sign_conflict(t64[i], t64[j]),
            }
            if trimmed is not None:
                pair["sign_conflict_trimmed"] = _pair_sign_conflict(trimmed[i], trimmed[j])
            pairs.append(pair)
    total_norm = sum(norms)
    summed = np.sum(t64, axis=0) if t64 else np.zeros(numel)
    result = {
        "numel": numel,
        "base_norm": base_norm,
        "delta": delta,
        "pairs": pairs,
        "conflict_all": _conflict_all(t64),
        "cancellation": None if total_norm == 0 else 1.0 - math.sqrt(float(np.sum(summed * summed))) / total_norm,
    }
    if trimmed is not None:
        result["conflict_all_trimmed"] = _conflict_all([np.asarray(t, dtype=np.float64) for t in trimmed])
    return result


# --- a whole report ---------------------------------------------------------------------------------------
def layer_group(name: str) -> str:
    """Up to the first integer component, else the module path (the documented grouping rule)."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1]) if len(parts) > 1 else name


def expected_report(base: dict, taus: list[dict], names: list[str], density: float = 1.0) -> dict:
    """Expected ``tensors`` (by name), ``groups`` (by name) and ``total``.

    ``base`` maps tensor name → cleaned float32 base values (already cut to the compared rows where a
    vocabulary differs); ``taus[i]`` maps tensor name → model i's float32 τ over the same elements, or
    lacks the name (or holds None) where model i lacks the tensor or cannot be compared (τ counts as 0
    in groups and the total, and the tensor's delta and pairs are null).
    """
    trim = density < 1.0
    parts: dict[str, tuple] = {}
    tensors: dict[str, dict] = {}
    for name, base_values in base.items():
        present = [t.get(name) is not None for t in taus]
        values = [t[name] if p else np.zeros_like(base_values) for t, p in zip(taus, present)]
        trimmed = [np.where(trim_mask(v, density), v, np.float32(0)) for v in values] if trim else None
        parts[name] = (base_values, values, trimmed)
        stats = statistics(base_values, values, names, trimmed)
        for model, p in zip(names, present):
            if not p:
                stats["delta"][model] = None
        for pair in stats["pairs"]:
            if not (present[names.index(pair["a"])] and present[names.index(pair["b"])]):
                pair.update({key: None for key in pair if key not in ("a", "b")})
        tensors[name] = {"name": name, "group": layer_group(name), **stats}

    def concatenated(members: list[str]) -> dict:
        base_cat = np.concatenate([parts[m][0] for m in members])
        values = [np.concatenate([parts[m][1][i] for m in members]) for i in range(len(names))]
        trimmed = [np.concatenate([parts[m][2][i] for m in members]) for i in range(len(names))] if trim else None
        return statistics(base_cat, values, names, trimmed)

    members: dict[str, list[str]] = {}
    for name in base:
        members.setdefault(layer_group(name), []).append(name)
    groups = {g: {"name": g, "tensors": m, **concatenated(m)} for g, m in members.items()}
    return {"tensors": tensors, "groups": groups, "total": concatenated(list(base))}


# --- test helpers: comparing a report with the reference, and making fine-tunes ------------------------
#: ratios of counts (and names, and max_abs) must match exactly; the rest are floats formed from float32 inputs
EXACT = {
    "numel", "nonzero", "sign_conflict", "conflict_all", "sign_conflict_trimmed", "conflict_all_trimmed", "a", "b",
    "name", "group", "max_abs",
}
RTOL, ATOL = 1e-5, 1e-6


def assert_matches(actual, expected, path: str = "") -> None:
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and set(actual) == set(expected), (
            f"{path}: keys {sorted(actual)} != {sorted(expected)}"
        )
        for key in expected:
            if key in EXACT and not isinstance(expected[key], (dict, list)):
                assert actual[key] == expected[key], f"{path}.{key}: {actual[key]!r} != {expected[key]!r}"
            else:
                assert_matches(actual[key], expected[key], f"{path}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), path
        for k, (a, e) in enumerate(zip(actual, expected)):
            assert_matches(a, e, f"{path}[{k}]")
    elif expected is None:
        assert actual is None, f"{path}: {actual!r} is not null"
    else:
        assert actual is not None and actual == pytest.approx(expected, rel=RTOL, abs=ATOL), (
            f"{path}: {actual!r} != {expected!r}"
        )


def assert_report(report: dict, expected: dict) -> None:
    tensors = {t["name"]: t for t in report["tensors"]}
    assert list(tensors) == [n for g in report["groups"] for n in g["tensors"]]
    assert set(tensors) == set(expected["tensors"])
    for name, want in expected["tensors"].items():
        got = {k: v for k, v in tensors[name].items() if k not in ("shape", "compared_rows")}
        assert_matches(got, want, name)
    groups = {g["name"]: g for g in report["groups"]}
    assert set(groups) == set(expected["groups"])
    for name, want in expected["groups"].items():
        got = dict(groups[name], tensors=sorted(groups[name]["tensors"]))
        assert_matches(got, dict(want, tensors=sorted(want["tensors"])), name)
    assert_matches(report["total"], expected["total"], "total")


def noise(state, seed: int, scale: float = 0.01) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: scale * torch.randn(v.shape, generator=g) for name, v in state.items()}


def plus(state, delta, factor: float = 1.0) -> dict[str, torch.Tensor]:
    return {
        name: (v.float() + factor * delta[name]).to(v.dtype) if name in delta else v.clone()
        for name, v in state.items()
    }


def reference_from_states(base_state: dict, models: dict[str, dict], density: float = 1.0) -> dict:
    """The expected report for full checkpoints given as state dicts (a tensor a model lacks, or has in
    another shape, counts as absent)."""
    base = {n: clean_base(t) for n, t in base_state.items()}
    taus = [{n: task_vector(base_state[n], s[n]) for n in base_state if n in s and s[n].shape == base_state[n].shape}
            for s in models.values()]
    return expected_report(base, taus, list(models), density)
