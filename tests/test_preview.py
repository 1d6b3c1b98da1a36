"""Plan preview (``mergescope.analysis.preview``): exact previews against the executor's real output read
back from disk and compared in float64 numpy; known retentions; sampling; cancellation; plan warnings."""

from __future__ import annotations

import re
import threading

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from builders import llama_config, llama_state, write_model
from mergescope.analysis import run_analysis
from mergescope.analysis.plan_warnings import plan_warnings
from mergescope.analysis.preview import (
    GroupPreview,
    PlanPreview,
    PreviewCancelled,
    PreviewProgress,
    SampleCache,
    run_preview,
    sample_rows,
    stream_preview,
)
from mergescope.checkpoints import MergescopeError, open_checkpoint
from mergescope.merge.executor import run_merge
from mergescope.merge.job import build_job
from mergescope.merge.plan import parse_plan


# --- fixtures and an independent reference --------------------------------------------------------------
def group_of(name: str) -> str:
    """The layer group, written again here: up to the first integer component, else the module path."""
    match = re.match(r"^(.*?\.\d+)\.", name)
    return match.group(1) if match else name.rsplit(".", 1)[0]


def reference(base: dict, sources: list[dict], merged: dict) -> dict:
    """{group or "total": (‖τ_m‖, [retention], [cosine])} in float64 from τ = θ − θ₀ formed in float32."""
    sums: dict[str, np.ndarray] = {}
    for name, theta0 in base.items():
        b = theta0.float().numpy().reshape(-1)
        taus = [(s[name].float().numpy().reshape(-1) - b).astype(np.float64) for s in sources]
        taus.append((merged[name].float().numpy().reshape(-1) - b).astype(np.float64))
        x = np.stack(taus)
        gram = x @ x.T
        for key in (group_of(name), "total"):
            sums[key] = sums.get(key, 0) + gram
    result = {}
    for key, gram in sums.items():
        m = len(sources)
        retention = [gram[m, i] / gram[i, i] if gram[i, i] > 0 else None for i in range(m)]
        cosine = [
            gram[m, i] / np.sqrt(gram[i, i] * gram[m, m]) if gram[i, i] * gram[m, m] > 0 else None for i in range(m)
        ]
        result[key] = (np.sqrt(gram[m, m]), retention, cosine)
    return result


def assert_matches(preview: PlanPreview, expected: dict, tol: float = 2e-6) -> None:
    rows = {g.group: g for g in preview.groups} | {"total": preview.total}
    assert set(rows) == set(expected)
    for key, (norm, retention, cosine) in expected.items():
        got = rows[key]
        assert got.merged_norm == pytest.approx(norm, rel=tol, abs=1e-9), key
        for mine, theirs in zip(got.retention + got.cosine, retention + cosine):
            assert (mine is None) == (theirs is None), key
            if theirs is not None:
                assert mine == pytest.approx(theirs, rel=tol, abs=tol), key


def fine_tune(base: dict, seed: int, scale: float = 0.02) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in base.items()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("preview")
    config = llama_config(layers=3)
    base = llama_state(config, seed=0)
    states = {"base": base, "ft_a": fine_tune(base, 1), "ft_b": fine_tune(base, 2)}
    paths = {n: str(write_model(root / n, s, config, tokenizer_vocab=64)) for n, s in states.items()}
    return root, states, paths


def plan_for(method: str, paths: dict, *, out_dtype: str | None = None) -> dict:
    """A valid plan of ``method`` over the tiny models (one or two sources, the parameters it requires)."""
    two = [
        {"model": paths["ft_a"], "parameters": {"weight": 0.7}},
        {"model": paths["ft_b"], "parameters": {"weight": 0.4}},
    ]
    one = [{"model": paths["ft_a"]}]
    plan = {"merge_method": method, "base_model": paths["base"], "models": two, "dtype": "float32",
            "mergescope": {"seed": 3}}
    if method in ("ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"):
        for entry, density in zip(plan["models"], (0.6, 0.5)):
            entry["parameters"]["density"] = density
    if method in ("slerp", "nearswap"):
        plan.update(models=one, parameters={"t": 0.3 if method == "slerp" else 0.01})
    if method in ("arcee_fusion", "passthrough"):
        plan["models"] = one
    if method in ("model_stock", "sce", "ram", "ramplus_tl", "karcher"):
        plan["models"] = [{"model": paths["ft_a"]}, {"model": paths["ft_b"]}]
    if method in ("linear", "karcher", "passthrough"):
        del plan["base_model"]  # the base is compared against, passed explicitly
    if out_dtype:
        plan["out_dtype"] = out_dtype
    return plan


def job_of(plan: dict):
    return build_job(parse_plan(yaml.safe_dump(plan)))


ALL_METHODS = [
    "linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della",
    "della_linear", "slerp", "nuslerp", "multislerp", "karcher", "model_stock", "sce", "nearswap", "ram", "ramplus_tl",
    "arcee_fusion", "passthrough",
]


# --- exact mode equals the merge ---------------------------------------------------------------------------
@pytest.mark.parametrize("method", ALL_METHODS)
def test_exact_preview_equals_the_written_merge(tiny, method, tmp_path):
    root, states, paths = tiny
    job = job_of(plan_for(method, paths))
    base = open_checkpoint(paths["base"])
    preview = run_preview(job, base, mode="exact")
    merged = load_file(run_merge(job, tmp_path / "out", device="cpu") / "model.safetensors")
    sources = [states[n] for n in preview.names]
    assert_matches(preview, reference(states["base"], sources, merged))
    assert preview.total.exact and preview.mode == "exact" and not preview.skipped


def test_exact_preview_of_a_bf16_output_is_what_the_merge_writes(tiny, tmp_path):
    root, states, paths = tiny
    job = job_of(plan_for("ties", paths, out_dtype="bfloat16"))
    preview = run_preview(job, mode="exact")
    merged = load_file(run_merge(job, tmp_path / "out", device="cpu") / "model.safetensors")
    assert next(iter(merged.values())).dtype == torch.bfloat16
    assert_matches(preview, reference(states["base"], [states["ft_a"], states["ft_b"]], merged))


# --- known retentions ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def orthogonal(tmp_path_factory):
    """Two fine-tunes whose task vectors have disjoint supports (even / odd entries): exactly orthogonal."""
    root = tmp_path_factory.mktemp("orthogonal")
    config = llama_config(layers=2)
    base = llama_state(config, seed=0)
    g = torch.Generator().manual_seed(5)
    states = {"base": base, "ft_a": {}, "ft_b": {}}
    for name, theta in base.items():
        tau = 0.05 * torch.randn(theta.shape, generator=g)
        even = (torch.arange(theta.numel()) % 2 == 0).reshape(theta.shape)
        states["ft_a"][name] = theta + tau * even
        states["ft_b"][name] = theta + tau * ~even
    paths = {n: str(write_model(root / n, s, config)) for n, s in states.items()}
    return paths


def test_task_arithmetic_of_orthogonal_task_vectors_keeps_each_weight(orthogonal):
    plan = {"merge_method": "task_arithmetic", "base_model": orthogonal["base"], "dtype": "float32", "models": [
        {"model": orthogonal["ft_a"], "parameters": {"weight": 0.8}},
        {"model": orthogonal["ft_b"], "parameters": {"weight": 0.3}},
    ]}
    preview = run_preview(job_of(plan), mode="exact")
    assert preview.names == ["ft_a", "ft_b"]
    for group in [*preview.groups, preview.total]:
        assert group.retention == pytest.approx([0.8, 0.3], abs=1e-5)
        assert group.merged_norm == pytest.approx(
            np.hypot(0.8 * group.source_norms[0], 0.3 * group.source_norms[1]), rel=1e-5
        )


def test_linear_soup_of_two_orthogonal_fine_tunes_keeps_half_of_each(orthogonal):
    plan = {"merge_method": "linear", "dtype": "float32", "models": [
        {"model": orthogonal["ft_a"], "parameters": {"weight": 1.0}},
        {"model": orthogonal["ft_b"], "parameters": {"weight": 1.0}},
    ]}
    preview = run_preview(job_of(plan), open_checkpoint(orthogonal["base"]), mode="exact")
    assert preview.total.retention == pytest.approx([0.5, 0.5], abs=1e-5)
    assert preview.total.cosine[0] == pytest.approx(
        preview.total.source_norms[0] / np.hypot(*preview.total.source_norms), abs=1e-5
    )  # ⟨(a+b)/2, a⟩ / (‖a‖·‖a+b‖/2)


def test_linear_plan_listing_its_base_leaves_the_base_out_of_the_sources(orthogonal):
    plan = {"merge_method": "linear", "base_model": orthogonal["base"], "dtype": "float32", "models": [
        {"model": orthogonal["ft_a"], "parameters": {"weight": 1.0}},
        {"model": orthogonal["base"], "parameters": {"weight": 1.0}},
    ]}
    preview = run_preview(job_of(plan), mode="exact")
    assert preview.names == ["ft_a"]
    assert preview.total.retention == pytest.approx([0.5], abs=1e-5)  # half base, half ft_a


# --- sampling ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """Larger tensors (embedding 1024 × 64, MLP 256 × 64), correlated task vectors."""
    root = tmp_path_factory.mktemp("wide")
    config = llama_config(vocab=1024, hidden=64, intermediate=256, layers=2, heads=4, kv_heads=2)
    base = llama_state(config, seed=0)
    ft_a = fine_tune(base, 1)

    def noise(name: str) -> torch.Tensor:
        return 0.015 * torch.randn(base[name].shape, generator=torch.Generator().manual_seed(hash(name) % 1000))

    ft_b = {k: base[k] + 0.6 * (ft_a[k] - base[k]) + noise(k) for k in base}
    paths = {n: str(write_model(root / n, s, config)) for n, s in (("base", base), ("ft_a", ft_a), ("ft_b", ft_b))}
    return paths


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_sampled_preview_is_close_to_exact_and_deterministic(wide, method):
    plan = {"merge_method": method, "base_model": wide["base"], "dtype": "float32", "models": [
        {"model": wide["ft_a"], "parameters": {"weight": 0.7}}, {"model": wide["ft_b"], "parameters": {"weight": 0.5}},
    ]}
    if method == "linear":
        del plan["base_model"]
    job, base = job_of(plan), open_checkpoint(wide["base"])
    exact = run_preview(job, base, mode="exact")
    sampled = run_preview(job, base, mode="sampled", sample_size=2048)
    assert sampled.total.evaluated < exact.total.numel / 4  # it did sample
    assert sampled.total.numel == exact.total.numel
    assert sampled.total.retention == pytest.approx(exact.total.retention, abs=0.03)
    assert sampled.total.merged_norm == pytest.approx(exact.total.merged_norm, rel=0.03)
    for s, e in zip(sampled.groups, exact.groups):
        assert s.group == e.group
        assert s.retention == pytest.approx(e.retention, abs=0.06)
    again = run_preview(job, base, mode="sampled", sample_size=2048)
    assert again.total == sampled.total and again.groups == sampled.groups


def test_sample_rows_are_stratified_and_fall_back_to_whole_tensors():
    rows, lengths = sample_rows((1000, 64), 640, seed=0, tensor="w")
    assert len(rows) == 10 and int(lengths.sum()) == 1000
    bounds = np.arange(11) * 1000 // 10
    assert all(lo <= r < hi for r, lo, hi in zip(rows.tolist(), bounds[:-1], bounds[1:]))
    assert sample_rows((1000, 64), 640, seed=0, tensor="w")[0].tolist() == rows.tolist()
    assert sample_rows((1000, 64), 640, seed=0, tensor="other")[0].tolist() != rows.tolist()
    assert sample_rows((10, 64), 640, seed=0, tensor="w") is None  # small: whole
    rows_1d, _ = sample_rows((5000,), 100, seed=1, tensor="b")
    assert len(rows_1d) == 100


def test_sample_cache_reads_once_and_follows_weight_changes(wide, monkeypatch):
    import mergescope.analysis.preview_sampling as sampling

    def plan(weight_b):
        return job_of({"merge_method": "task_arithmetic", "base_model": wide["base"], "dtype": "float32", "models": [
            {"model": wide["ft_a"], "parameters": {"weight": 0.7}},
            {"model": wide["ft_b"], "parameters": {"weight": weight_b}},
        ]})

    cache = SampleCache()
    first = run_preview(plan(0.5), mode="sampled", sample_size=2048, cache=cache)
    reads = []
    real = sampling.read_rows
    monkeypatch.setattr(sampling, "read_rows", lambda *a: reads.append(a) or real(*a))
    changed = run_preview(plan(0.1), mode="sampled", sample_size=2048, cache=cache)
    assert reads == []  # every sample came from the cache
    assert changed.total == run_preview(plan(0.1), mode="sampled", sample_size=2048).total
    assert changed.total.retention[1] < first.total.retention[1]


@pytest.mark.parametrize("method", ALL_METHODS)
def test_sampled_preview_runs_every_method(tiny, method):
    root, states, paths = tiny
    base = open_checkpoint(paths["base"])
    preview = run_preview(job_of(plan_for(method, paths)), base, mode="sampled", sample_size=64)
    assert 0 < preview.total.evaluated < preview.total.numel
    assert all(r is None or np.isfinite(r) for r in preview.total.retention)


# --- streaming and cancellation ------------------------------------------------------------------------------
def test_stream_yields_groups_progress_then_the_preview(tiny):
    root, states, paths = tiny
    events = list(stream_preview(job_of(plan_for("ties", paths)), mode="exact"))
    groups = [e for e in events if isinstance(e, GroupPreview)]
    progress = [e for e in events if isinstance(e, PreviewProgress)]
    assert isinstance(events[-1], PlanPreview) and events[-1].groups == groups
    assert [g.group for g in groups] == list(open_checkpoint(paths["base"]).groups())
    assert [p.tensors_done for p in progress] == list(range(1, len(progress) + 1)) == list(range(1, 31))


def test_cancel_stops_between_tensors(tiny):
    root, states, paths = tiny
    cancel = threading.Event()
    events = []
    for event in stream_preview(job_of(plan_for("ties", paths)), mode="exact", cancel=cancel):
        events.append(event)
        if isinstance(event, PreviewProgress) and event.tensors_done == 3:
            cancel.set()
    assert not any(isinstance(e, PlanPreview) for e in events)
    assert max(e.tensors_done for e in events if isinstance(e, PreviewProgress)) == 3
    with pytest.raises(PreviewCancelled):
        run_preview(job_of(plan_for("ties", paths)), cancel=cancel)


def test_plans_the_preview_cannot_compare_are_refused(tiny):
    root, states, paths = tiny
    with pytest.raises(MergescopeError, match="base"):
        run_preview(job_of(plan_for("linear", paths)))
    sliced = {"merge_method": "passthrough", "dtype": "float32", "slices": [
        {"sources": [{"model": paths["ft_a"], "layer_range": [0, 2]}]},
    ]}
    with pytest.raises(MergescopeError, match="slices"):
        run_preview(job_of(sliced), open_checkpoint(paths["base"]))


# --- plan warnings -------------------------------------------------------------------------------------------
def warnings_for(paths: dict, method: str, weights, *, parameters=None, per_model=None, report=None) -> list[str]:
    models = [
        {"model": paths[n], "parameters": {"weight": w, **(per_model or {}).get(n, {})}}
        for n, w in zip(("ft_a", "ft_b"), weights)
    ]
    plan = {"merge_method": method, "base_model": paths["base"], "models": models, "dtype": "float32"}
    if parameters:
        plan["parameters"] = parameters
    if method == "linear":
        del plan["base_model"]
    return plan_warnings(job_of(plan), report)


def test_linear_without_normalize_warns_when_weights_do_not_sum_to_one(tiny):
    paths = tiny[2]
    [line] = warnings_for(paths, "linear", [0.8, 0.8], parameters={"normalize": False})
    assert "sum to 1.6" in line and "ft_a 0.8 + ft_b 0.8" in line
    assert warnings_for(paths, "linear", [0.6, 0.4], parameters={"normalize": False}) == []
    assert warnings_for(paths, "linear", [0.8, 0.8]) == []  # normalized: only proportions matter


def test_task_arithmetic_weights_that_overshoot_are_flagged_but_normalised_ties_is_not(tiny):
    paths = tiny[2]
    # without the analysis the task vectors count as orthogonal: each λ·wᵢ is held against 1.1 (the overlap-aware
    # rule, with the analysis report, is tested in tests/test_diagnosis_study.py)
    assert warnings_for(paths, "task_arithmetic", [1.0, 1.0]) == []
    assert warnings_for(paths, "task_arithmetic", [0.5, 0.5]) == []
    assert warnings_for(paths, "ties", [1.5, 1.5], per_model={"ft_a": {"density": 0.5}, "ft_b": {"density": 0.5}}) == []
    lines = warnings_for(paths, "task_arithmetic", [0.5, 0.5], parameters={"lambda": 4.0})
    assert [line.split(":")[0] for line in lines] == ["ft_a", "ft_b"] and "moves the merge 2×" in lines[0]  # each × 2
    extrapolated = warnings_for(paths, "task_arithmetic", [2.0, -0.3])
    assert any(line.startswith("ft_a: weight 2 × λ 1 moves the merge 2×") for line in extrapolated)
    assert any(line.startswith("ft_b: negative weight -0.3") for line in extrapolated)


def test_low_densities_and_dare_rescale_are_flagged_naming_the_model(tiny):
    paths = tiny[2]
    [line] = warnings_for(paths, "ties", [0.5, 0.5], per_model={"ft_a": {"density": 0.5}, "ft_b": {"density": 0.05}})
    assert line.startswith("ft_b: density 0.05 keeps only 5%")
    [line] = warnings_for(
        paths, "dare_ties", [0.5, 0.5], per_model={"ft_a": {"density": 0.15}, "ft_b": {"density": 0.5}}
    )
    assert line.startswith("ft_a: density 0.15 with rescale") and "about 7" in line
    [line] = warnings_for(
        paths, "ties", [0.5, 0.5], per_model={"ft_a": {"density": [0.5, 0.02]}, "ft_b": {"density": 0.5}}
    )
    assert line.startswith("ft_a: density 0.02") and "(at model.layers.2." in line  # the gradient's end
    [line] = warnings_for(paths, "ties", [0.0, 0.5], per_model={"ft_a": {"density": 0.5}, "ft_b": {"density": 0.5}})
    assert line == "ft_a: weight 0, so it contributes nothing to the merge"


def test_models_the_analysis_flagged_are_named(tiny, tmp_path):
    root, states, paths = tiny
    config = llama_config(layers=3)
    unrelated = str(write_model(tmp_path / "other", llama_state(config, seed=9), config))
    models = [open_checkpoint(paths["ft_a"]), open_checkpoint(unrelated)]
    report = run_analysis(open_checkpoint(paths["base"]), models, use_cache=False, device="cpu")
    plan = {"merge_method": "task_arithmetic", "base_model": paths["base"], "dtype": "float32", "models": [
        {"model": paths["ft_a"], "parameters": {"weight": 0.5}}, {"model": unrelated, "parameters": {"weight": 0.5}},
    ]}
    lines = plan_warnings(job_of(plan), report)
    assert len(lines) == 1 and lines[0].startswith("other: different_base:")
    plan["models"] = plan["models"][:1]  # not merged any more: not reported
    assert plan_warnings(job_of(plan), report) == []
    # ... also when the job knows the model (the TUI hands every open checkpoint to build_job)
    known = {ref: open_checkpoint(ref) for ref in (paths["base"], paths["ft_a"], unrelated)}
    assert plan_warnings(build_job(parse_plan(yaml.safe_dump(plan)), checkpoints=known), report) == []
