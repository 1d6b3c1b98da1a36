"""Task-vector statistics against an independent numpy reference (tests/analysis_reference.py): every number
in ``tensors``, ``groups`` and ``total``, on fixtures with known structure."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import analysis_reference as ref
from analysis_reference import assert_matches, assert_report, noise, plus
from builders import llama_config, llama_state, write_lora, write_model, write_sharded
from mergescope.analysis import SCHEMA, run_analysis
from mergescope.checkpoints import open_checkpoint

CONFIG = llama_config()


# --- fixtures ---------------------------------------------------------------------------------------------
def grid_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A base on the 2⁻⁸ grid, so θ₀ + k·2⁻¹⁰ is exact in float32 and so is every τ formed from it."""
    return {k: (v * 256).round() / 256 for k, v in llama_state(CONFIG, seed=seed).items()}


def grid_delta(state, seed: int, zero_fraction: float = 0.1) -> dict[str, torch.Tensor]:
    """Integer multiples of 2⁻¹⁰ in [−8, 8] (many equal magnitudes: trims break ties by index)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, v in state.items():
        k = torch.randint(-8, 9, v.shape, generator=g).float()
        k[torch.rand(v.shape, generator=g) < zero_fraction] = 0
        out[name] = k * 2.0**-10
    return out


def analyse(tmp_path, base_state, models: dict[str, dict], *, shards: int | None = None, **kwargs) -> dict:
    def write(folder, state):
        return write_sharded(folder, state, shards, CONFIG) if shards else write_model(folder, state, CONFIG)

    base = open_checkpoint(write(tmp_path / "base", base_state))
    checkpoints = [open_checkpoint(write(tmp_path / name, state)) for name, state in models.items()]
    return run_analysis(base, checkpoints, use_cache=False, **kwargs)


def check(tmp_path, base_state, models, density: float = 1.0, **kwargs) -> dict:
    report = analyse(tmp_path, base_state, models, density=density, **kwargs)
    assert_report(report, ref.reference_from_states(base_state, models, density))
    return report


def pair(stats: dict, a: str, b: str) -> dict:
    return next(p for p in stats["pairs"] if (p["a"], p["b"]) == (a, b))


# --- the reference itself ------------------------------------------------------------------------------------
def test_reference_trim_keeps_k_largest_lowest_index_first():
    tau = np.array([1, -3, 3, 0, -1, 3, 2], np.float32)
    assert ref.trim_mask(tau, 0.5).tolist() == [False, True, True, False, False, True, False]  # k = 3
    assert ref.trim_mask(tau, 0.3).tolist() == [False, True, True, False, False, False, False]  # k = 2
    assert ref.trim_mask(tau, 0.1).tolist() == [False, True, False, False, False, False, False]  # ⌊0.7⌋ = 0, at least 1
    stats = ref.statistics(
        np.ones(3), [np.array([1, -1, 0.0]), np.array([1, 1, 2.0]), np.array([-1, 0, 0.0])], ["a", "b", "c"]
    )
    assert stats["conflict_all"] == 2 / 2 and pair(stats, "a", "b")["sign_conflict"] == 1 / 2
    assert pair(stats, "b", "c")["sign_conflict"] == 1.0 and stats["delta"]["a"]["nonzero"] == 2 / 3


@pytest.mark.parametrize("density", [0.0005, 0.1, 0.5, 0.77, 1.0])
def test_magnitude_mask_is_the_reference_trim(density):
    """The analysis counts conflicts after TIES' own trim: k = max(1, ⌊d·numel⌋), ties by lowest index."""
    from mergescope.merge.sparsify import top_magnitude_mask as magnitude_mask

    values = torch.randint(-4, 5, (3, 337), generator=torch.Generator().manual_seed(0)).float()
    mask = magnitude_mask(values, density)
    expected = values.numel() if density >= 1 else max(1, math.floor(density * values.numel()))
    assert mask.shape == values.shape and int(mask.sum()) == expected
    assert np.array_equal(mask.reshape(-1).numpy(), ref.trim_mask(values.numpy(), density))
    assert torch.equal(magnitude_mask(values.bfloat16(), density), mask)


# --- structure --------------------------------------------------------------------------------------------------
def test_known_structure(tmp_path):
    """τ_b = 2τ_a, τ_c = −τ_a, d identical to the base: the exact values the definitions give."""
    base = grid_state()
    delta = grid_delta(base, seed=1)
    models = {"a": plus(base, delta), "b": plus(base, delta, 2), "c": plus(base, delta, -1), "d": plus(base, {})}
    nonzero = sum(int(torch.count_nonzero(d)) for d in delta.values())
    numel = sum(v.numel() for v in base.values())

    report = check(tmp_path / "abcd", base, models)
    total = report["total"]
    assert total["delta"]["d"] == {"norm": 0.0, "rel": 0.0, "nonzero": 0.0, "max_abs": 0.0}
    assert total["delta"]["a"]["nonzero"] == nonzero / numel
    assert total["delta"]["b"]["norm"] == pytest.approx(2 * total["delta"]["a"]["norm"], rel=1e-12)
    ab, ac = pair(total, "a", "b"), pair(total, "a", "c")
    assert ab["cosine"] == pytest.approx(1.0, abs=1e-12) and ab["sign_conflict"] == 0.0
    assert ac["cosine"] == pytest.approx(-1.0, abs=1e-12) and ac["sign_conflict"] == 1.0
    assert pair(total, "a", "d")["cosine"] is None and pair(total, "a", "d")["sign_conflict"] is None
    assert total["conflict_all"] == 1.0  # wherever δ ≠ 0, c opposes a and b
    assert total["cancellation"] == pytest.approx(1 - 2 / 4, abs=1e-9)  # ‖δ + 2δ − δ‖ / (1 + 2 + 1)‖δ‖
    for t in report["tensors"]:
        assert t["delta"]["d"]["norm"] == 0.0 and pair(t, "a", "d")["cosine"] is None

    correlated = check(tmp_path / "ab", base, {"a": models["a"], "b": models["b"]})["total"]
    assert correlated["cancellation"] == pytest.approx(0.0, abs=1e-9) and correlated["conflict_all"] == 0.0
    opposed = check(tmp_path / "ac", base, {"a": models["a"], "c": models["c"]})["total"]
    assert opposed["cancellation"] == pytest.approx(1.0, abs=1e-9) and opposed["conflict_all"] == 1.0
    assert pair(opposed, "a", "c")["sign_conflict"] == 1.0
    only_identical = check(tmp_path / "d", base, {"d": models["d"]})["total"]
    assert only_identical["cancellation"] is None and only_identical["conflict_all"] is None


def test_sparse_deltas(tmp_path):
    base = llama_state(CONFIG, seed=0)
    sparse = {}
    for k, (name, v) in enumerate(base.items()):
        d = torch.zeros_like(v).reshape(-1)
        d[[0, k % v.numel(), v.numel() - 1]] = torch.tensor([0.5, -0.25, 0.125]) * (k + 1)
        sparse[name] = d.reshape(v.shape)
    models = {"sparse": plus(base, sparse), "dense": plus(base, noise(base, 3))}
    report = check(tmp_path, base, models)
    for t in report["tensors"]:
        changed = int(np.count_nonzero(ref.task_vector(base[t["name"]], models["sparse"][t["name"]])))
        assert t["delta"]["sparse"]["nonzero"] == changed / t["numel"] and changed <= 3


@pytest.mark.parametrize("density", [1.0, 0.5, 0.1])
def test_three_models_with_trim(tmp_path, density):
    base = grid_state()
    models = {f"m{i}": plus(base, grid_delta(base, seed=i, zero_fraction=0.3)) for i in (1, 2, 3)}
    report = check(tmp_path, base, models, density)
    trimmed_keys = {"conflict_all_trimmed"} <= set(report["total"])
    assert trimmed_keys == (density < 1)
    assert all(("sign_conflict_trimmed" in p) == (density < 1) for p in report["total"]["pairs"])
    if density < 1:  # the trim changes the answer, so it is really being checked
        assert report["total"]["conflict_all_trimmed"] != report["total"]["conflict_all"]


def test_trim_counts_float_deltas(tmp_path):
    base = llama_state(CONFIG, seed=0)
    models = {f"m{i}": plus(base, noise(base, i)) for i in (1, 2)}
    check(tmp_path, base, models, 0.25)


@pytest.mark.parametrize("density", [1.0, 0.5])
def test_small_chunks_equal_default(tmp_path, density):
    base = llama_state(CONFIG, seed=0)
    models = {f"m{i}": plus(base, noise(base, i)) for i in (1, 2, 3)}
    default = check(tmp_path / "default", base, models, density)
    for chunk in (7, 1000):
        chunked = check(tmp_path / f"chunk{chunk}", base, models, density, chunk=chunk)
        assert_matches(chunked["total"], default["total"])
        assert_matches(chunked["groups"], default["groups"])
        assert_matches(chunked["tensors"], default["tensors"])


def test_bf16_inputs(tmp_path):
    base = llama_state(CONFIG, seed=0, dtype=torch.bfloat16)
    models = {f"m{i}": plus(base, noise(base, i, scale=0.05)) for i in (1, 2)}
    assert all(v.dtype == torch.bfloat16 for v in models["m1"].values())
    check(tmp_path, base, models, 0.5)


def test_sharded_inputs(tmp_path):
    base = llama_state(CONFIG, seed=0)
    models = {f"m{i}": plus(base, noise(base, i)) for i in (1, 2)}
    sharded = check(tmp_path / "sharded", base, models, shards=3)
    single = check(tmp_path / "single", base, models)
    assert_matches(sharded["tensors"], single["tensors"])
    assert_matches(sharded["total"], single["total"])


def test_lora_adapter_as_a_model(tmp_path):
    base_state = llama_state(CONFIG, seed=0)
    base_dir = write_model(tmp_path / "base", base_state, CONFIG)
    targets = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.v_proj"]
    deltas = write_lora(tmp_path / "lora", base_state, targets, r=4, alpha=8, base_ref=str(base_dir))
    full = plus(base_state, noise(base_state, 5))
    base = open_checkpoint(base_dir)
    models = [
        open_checkpoint(tmp_path / "lora", base=base),
        open_checkpoint(write_model(tmp_path / "full", full, CONFIG)),
    ]
    report = run_analysis(base, models, use_cache=False)
    lora_tau = {
        n: ref.f32(deltas[n]) if n in deltas else np.zeros(v.numel(), np.float32) for n, v in base_state.items()
    }
    full_tau = {n: ref.task_vector(base_state[n], full[n]) for n in base_state}
    clean = {n: ref.clean_base(t) for n, t in base_state.items()}
    assert_report(report, ref.expected_report(clean, [lora_tau, full_tau], ["lora", "full"]))
    untouched = next(t for t in report["tensors"] if t["name"] == "model.layers.0.mlp.up_proj.weight")
    assert untouched["delta"]["lora"] == {"norm": 0.0, "rel": 0.0, "nonzero": 0.0, "max_abs": 0.0}


def test_groups_are_concatenations_not_averages(tmp_path):
    """One tensor moves a lot one way, another a little the opposite way: the group is dominated by the
    first, which averaging per-tensor cosines (+1 and −1 → 0) would hide."""
    base = llama_state(CONFIG, seed=0)
    a_big, b_small = "model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.gate_proj.weight"
    d = noise(base, 1, scale=1.0)
    da = {a_big: d[a_big], b_small: 0.001 * d[b_small]}
    db = {a_big: 2 * d[a_big], b_small: -0.001 * d[b_small]}
    report = check(tmp_path, base, {"a": plus(base, da), "b": plus(base, db)})
    group = next(g for g in report["groups"] if g["name"] == "model.layers.0")
    tensors = {t["name"]: t for t in report["tensors"]}
    assert pair(tensors[a_big], "a", "b")["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert pair(tensors[b_small], "a", "b")["cosine"] == pytest.approx(-1.0, abs=1e-6)
    assert pair(group, "a", "b")["cosine"] > 0.99
    members = group["tensors"]
    base_cat = np.concatenate([ref.clean_base(base[n]) for n in members])
    taus = [np.concatenate([ref.task_vector(base[n], plus(base, dx)[n]) for n in members]) for dx in (da, db)]
    assert_matches({k: group[k] for k in ("numel", "base_norm", "delta", "pairs", "conflict_all", "cancellation")},
                   ref.statistics(base_cat, taus, ["a", "b"]))
    assert group["numel"] == sum(tensors[n]["numel"] for n in members)


# --- the JSON shape ----------------------------------------------------------------------------------------------
STATS = {"numel", "base_norm", "delta", "pairs", "conflict_all", "cancellation"}


@pytest.mark.parametrize("density", [1.0, 0.5])
def test_json_shape(tmp_path, density):
    base = llama_state(CONFIG, seed=0)
    models = {"x": plus(base, noise(base, 1)), "y": plus(base, noise(base, 2)), "z": plus(base, noise(base, 3))}
    report = analyse(tmp_path, base, models, density=density)
    json.loads(json.dumps(report, allow_nan=False))
    trimmed = {"conflict_all_trimmed"} if density < 1 else set()
    pair_keys = {"a", "b", "cosine", "sign_conflict"} | ({"sign_conflict_trimmed"} if density < 1 else set())
    assert set(report) == {"schema", "density", "base", "models", "tensors", "groups", "total", "warnings"}
    assert report["schema"] == SCHEMA == "mergescope.analysis/1" and report["density"] == density
    assert report["base"] == {"name": "base", "source": str(tmp_path / "base")}
    assert report["models"] == [{"name": n, "source": str(tmp_path / n)} for n in models]
    assert report["warnings"] == []

    def check_stats(block, extra):
        assert set(block) == STATS | trimmed | extra
        assert set(block["delta"]) == set(models)
        for stats in block["delta"].values():
            assert set(stats) == {"norm", "rel", "nonzero", "max_abs"} and all(
                isinstance(v, float) for v in stats.values()
            )
        assert [(p["a"], p["b"]) for p in block["pairs"]] == [("x", "y"), ("x", "z"), ("y", "z")]
        assert all(set(p) == pair_keys for p in block["pairs"])
        assert isinstance(block["numel"], int) and not isinstance(block["numel"], bool)

    assert [t["name"] for t in report["tensors"]] == [n for g in report["groups"] for n in g["tensors"]]
    assert sorted(t["name"] for t in report["tensors"]) == sorted(base)
    for t in report["tensors"]:
        check_stats(t, {"name", "group", "shape"})
        assert t["shape"] == list(base[t["name"]].shape) and t["numel"] == math.prod(t["shape"])
        assert t["group"] == ref.layer_group(t["name"])
    groups = ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm", "lm_head"]
    assert [g["name"] for g in report["groups"]] == groups
    for g in report["groups"]:
        check_stats(g, {"name", "tensors"})
    check_stats(report["total"], set())
    assert report["total"]["numel"] == sum(v.numel() for v in base.values())


@pytest.mark.parametrize("count", [8, 9])
def test_many_models_on_both_sign_paths(tmp_path, count):
    """Up to 8 models the sign statistics come from a 3ⁿ pattern histogram, beyond from sign products."""
    from mergescope.analysis.sign_patterns import MAX_PATTERN_MODELS

    assert (count <= MAX_PATTERN_MODELS) == (count == 8)
    base = grid_state()
    models = {f"m{i}": plus(base, grid_delta(base, seed=i, zero_fraction=0.4)) for i in range(count)}
    check(tmp_path, base, models, density=0.5)


def test_trim_one_model_at_a_time_gives_the_same_statistics(tmp_path, monkeypatch):
    """Above the trim's memory budget (an embedding) the models are trimmed one by one: same numbers."""
    import mergescope.analysis.trim_pass as trim_pass

    monkeypatch.setattr(trim_pass, "TRIM_MEMORY_BYTES", 0)
    base = grid_state()
    models = {f"m{i}": plus(base, grid_delta(base, seed=i, zero_fraction=0.3)) for i in (1, 2, 3)}
    check(tmp_path, base, models, 0.5)
