"""The diagnosis study's arithmetic (:mod:`mergescope.analysis.ground_truth`) against independent float64
formulas written here, and — on a demo workspace built in this session — that the statistic the diagnosis
leads with predicts which skills a merge keeps (``benchmarks/diagnosis_study.py`` runs the full study)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mergescope.analysis.ground_truth import (
    CANDIDATES,
    assess,
    average_ranks,
    balanced_accuracy,
    best_threshold,
    bootstrap_interval,
    kept_share,
    loss_parts,
    permutation_p_value,
    source_statistics,
    span_statistics,
    spearman,
)


# --- independent references -------------------------------------------------------------------------------------
def brute_ranks(values) -> list[float]:
    """rank(xᵢ) = #{xⱼ < xᵢ} + (#{xⱼ = xᵢ} + 1) / 2: the average rank of a tie, counted, not sorted."""
    return [sum(v < x for v in values) + (sum(v == x for v in values) + 1) / 2 for x in values]


def pearson_sums(a, b) -> float:
    """Pearson's r from raw sums: (nΣab − ΣaΣb) / √((nΣa² − (Σa)²)(nΣb² − (Σb)²))."""
    n = len(a)
    sa, sb = math.fsum(a), math.fsum(b)
    sab = math.fsum(x * y for x, y in zip(a, b))
    saa, sbb = math.fsum(x * x for x in a), math.fsum(y * y for y in b)
    return (n * sab - sa * sb) / math.sqrt((n * saa - sa * sa) * (n * sbb - sb * sb))


def brute_best_balanced_accuracy(values, kept, higher_means_kept=True) -> float:
    """Best balanced accuracy over every split of the sorted distinct values that puts pairs on both sides,
    counted pair by pair."""
    truth = [k >= 0.5 for k in kept]
    positives, negatives = sum(truth), len(truth) - sum(truth)
    best = 0.0
    for cut in sorted(set(values)):
        for strict in (False, True):  # kept ⇔ v ≥ cut, or v > cut (the split just above the value)
            predicted = [
                (v > cut if strict else v >= cut) if higher_means_kept else (v < cut if strict else v <= cut)
                for v in values
            ]
            if all(predicted) or not any(predicted):
                continue
            tp = sum(p and t for p, t in zip(predicted, truth))
            tn = sum(not p and not t for p, t in zip(predicted, truth))
            best = max(best, 0.5 * (tp / positives + tn / negatives))
    return best


# --- kept share, ranks, Spearman -------------------------------------------------------------------------------
def test_kept_share_is_the_share_of_the_fine_tunes_gain():
    assert kept_share(0.39, 0.20, 0.40) == pytest.approx(0.95)
    assert kept_share(0.03, 0.20, 0.40) == pytest.approx(-0.85)  # below the base
    assert kept_share(0.5, 0.4, 0.4) is None  # no gain to keep


def test_average_ranks_give_ties_the_mean_of_their_ranks():
    values = [3.0, 1.0, 2.0, 2.0, 5.0, 2.0, 1.0]
    assert average_ranks(values).tolist() == brute_ranks(values)
    assert average_ranks([1.0, 2.0, 2.0, 3.0]).tolist() == [1.0, 2.5, 2.5, 4.0]


def test_spearman_without_ties_is_the_rank_difference_formula():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=25), rng.normal(size=25)
    d = np.array(brute_ranks(list(x))) - np.array(brute_ranks(list(y)))
    n = len(x)
    assert spearman(x, y) == pytest.approx(1 - 6 * float(d @ d) / (n * (n * n - 1)), abs=1e-12)


def test_spearman_with_ties_is_pearson_of_average_ranks():
    # ranks x: 1, 2.5, 2.5, 4; y: 1, 3, 2, 4 → Σdxdy = 4.5, Σdx² = 4.5, Σdy² = 5
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5), abs=1e-15)
    rng = np.random.default_rng(5)
    x = rng.integers(0, 4, 40).astype(float)  # many ties on both sides
    y = x + rng.integers(0, 3, 40)
    expected = pearson_sums(brute_ranks(list(x)), brute_ranks(list(y)))
    assert spearman(x, y) == pytest.approx(expected, abs=1e-12)


def test_spearman_is_invariant_to_monotone_maps_and_undefined_for_constants():
    x = np.linspace(-2, 3, 17)
    assert spearman(x, np.exp(x)) == pytest.approx(1.0)
    assert spearman(x, -x**3) == pytest.approx(-1.0)
    assert math.isnan(spearman(x, np.ones_like(x)))
    assert math.isnan(spearman([1.0], [2.0]))
    with pytest.raises(ValueError):
        spearman([1, 2], [1, 2, 3])


def test_permutation_p_value_is_small_for_a_perfect_order_and_one_for_no_correlation():
    x = list(range(8))
    # 8! = 40320 orders, 2 of them with |ρ| = 1: a permutation reaches |ρ| ≥ 1 rarely
    assert permutation_p_value(x, x, permutations=2000) <= 3 / 2001
    y = [2, 7, 0, 5, 4, 1, 6, 3]
    assert spearman(x, y) == pytest.approx(pearson_sums(brute_ranks(x), brute_ranks(y)))
    zero_x, zero_y = [1, 2, 3, 4, 5], [2, 5, 3, 1, 4]  # Σd² = 20 = n(n²−1)/6 → ρ = 0
    assert spearman(zero_x, zero_y) == pytest.approx(0.0, abs=1e-15)
    assert permutation_p_value(zero_x, zero_y) == 1.0


def test_bootstrap_interval_contains_the_estimate():
    rng = np.random.default_rng(1)
    x = rng.normal(size=60)
    y = x + rng.normal(size=60)
    low, high = bootstrap_interval(x, y, resamples=300)
    assert low < spearman(x, y) < high and 0 < low and high <= 1


# --- the threshold ---------------------------------------------------------------------------------------------
def test_balanced_accuracy_does_not_reward_the_majority_class():
    truth = [True] * 9 + [False]
    assert balanced_accuracy([True] * 10, truth) == 0.5
    assert balanced_accuracy(truth, truth) == 1.0
    assert balanced_accuracy([True, False, True, False], [True, True, False, False]) == 0.5
    assert math.isnan(balanced_accuracy([True, False], [True, True]))


def test_best_threshold_separates_a_separable_sample_between_the_classes():
    values = [0.1, 0.2, 0.3, 0.6, 0.7, 0.9]
    kept = [0.0, 0.1, 0.2, 0.8, 0.9, 1.0]
    found = best_threshold(values, kept)
    assert found.balanced_accuracy == 1.0 and found.cut == pytest.approx(0.45) and found.low == found.high
    assert found.rule == "kept if ≥ 0.45" and (found.n, found.n_kept) == (6, 3)
    lost_share = [1 - v for v in values]  # a statistic where higher means lost
    found = best_threshold(lost_share, kept, higher_means_kept=False)
    assert found.balanced_accuracy == 1.0 and found.cut == pytest.approx(0.55)
    assert best_threshold(values, [1.0] * 6) is None  # one class only


@pytest.mark.parametrize("seed", range(6))
def test_best_threshold_matches_an_exhaustive_count(seed):
    rng = np.random.default_rng(seed)
    values = list(np.round(rng.normal(size=30), 1))  # ties
    kept = list(np.array(values) + rng.normal(scale=0.8, size=30))
    for higher in (True, False):
        found = best_threshold(values, kept, higher_means_kept=higher)
        assert found.balanced_accuracy == pytest.approx(brute_best_balanced_accuracy(values, kept, higher), abs=1e-12)
        truth = np.array(kept) >= 0.5
        predicted = np.array(values) >= found.cut if higher else np.array(values) <= found.cut
        assert balanced_accuracy(predicted, truth) == pytest.approx(found.balanced_accuracy)


def test_assess_skips_undefined_values():
    candidate = CANDIDATES[0]
    result = assess(candidate, [0.1, None, 0.5, float("nan"), 0.9, 0.3], [0.0, 1.0, 0.6, 1.0, 1.0, 0.2],
                    permutations=100, resamples=50)
    assert result.n == 4 and result.rho == pytest.approx(1.0)
    assert result.threshold.balanced_accuracy == 1.0


# --- the candidate statistics ------------------------------------------------------------------------------------
def test_loss_parts_sum_to_one_minus_retention():
    tau = np.array([1.0, 2.0, -1.0, 0.5, 0.0])
    merged = np.array([0.0, 3.0, 1.0, 0.25, 7.0])
    parts = loss_parts(tau, merged)
    # zeroed 1·1, amplified 2·(2−3), reversed −1·(−1−1), shrunk 0.5·0.25; ‖τ‖² = 6.25
    assert parts == pytest.approx(
        {"zeroed": 1 / 6.25, "amplified": -2 / 6.25, "reversed": 2 / 6.25, "shrunk": 0.125 / 6.25}
    )
    retention = float(merged @ tau) / float(tau @ tau)
    assert sum(parts.values()) == pytest.approx(1 - retention)
    assert loss_parts(np.zeros(3), merged[:3]) is None


def test_span_statistics_match_a_least_squares_fit_of_the_vectors():
    rng = np.random.default_rng(2)
    taus = rng.normal(size=(3, 50))
    taus[2] = 0.6 * taus[0] + 0.3 * rng.normal(size=50)  # overlapping sources
    noise = rng.normal(size=50)
    merged = 0.8 * taus[0] - 0.4 * taus[1] + 1.3 * taus[2] + 0.5 * noise
    stacked = np.vstack([taus, merged])
    found = span_statistics(stacked @ stacked.T)
    coefficients, *_ = np.linalg.lstsq(taus.T, merged, rcond=None)
    residual = merged - coefficients @ taus
    for i, stats in enumerate(found):
        off = np.linalg.norm(residual) / np.linalg.norm(taus[i])
        assert stats["weight_estimate"] == pytest.approx(coefficients[i], abs=1e-9)
        assert stats["off_span"] == pytest.approx(off, rel=1e-6)
        assert stats["own_distance"] == pytest.approx(math.hypot(1 - coefficients[i], off), rel=1e-6)
    exact = np.vstack([taus[:2], taus[0] + taus[1]])  # the merge is exactly τ₁ + τ₂
    assert [s["own_distance"] for s in span_statistics(exact @ exact.T)] == pytest.approx([0.0, 0.0], abs=1e-6)
    dependent = np.vstack([taus[0], taus[0], taus[0]])  # a source twice: the pseudo-inverse splits it
    assert [s["weight_estimate"] for s in span_statistics(dependent @ dependent.T)] == pytest.approx([0.5, 0.5])
    unchanged = np.vstack([np.zeros(50), taus[1], taus[1]])
    assert span_statistics(unchanged @ unchanged.T)[0] is None


def _effect(norm, retention, cosine=None, **shares):
    return {"norm": norm, "retention": retention, "cosine": cosine, "lost": None, "reversed": None, "conflict": None,
            "trimmed": None, "conflict_with": {}, "weight": None, "density": None, **shares}


def test_source_statistics_from_a_diagnosis_document():
    # τᵢ = (1, 0) in group g0 and (0, 2) in g1; τ_m = (0.5, 1) and (0, 0): ρ(g0) = 0.5, ρ(g1) = 0
    # whole model: ‖τᵢ‖² = 5, ⟨τ_m, τᵢ⟩ = 0.5, ρ = 0.1, ‖τ_m‖² = 1.25
    document = {
        "total": {"merged_norm": math.sqrt(1.25), "sources": {"a": _effect(
            math.sqrt(5), 0.1, 0.5 / math.sqrt(5 * 1.25), lost=0.8,
            loss_parts={"zeroed": 0.8, "reversed": 0.0, "shrunk": 0.1, "amplified": 0.0})}},
        "groups": [
            {"name": "g0", "merged_norm": math.sqrt(1.25), "sources": {"a": _effect(1.0, 0.5)}},
            {"name": "g1", "merged_norm": 0.0, "sources": {"a": _effect(2.0, 0.0)}},
            {"name": "g2", "merged_norm": 0.0, "sources": {"a": _effect(0.0, None)}},
        ],
    }
    found = source_statistics(document, "a")
    assert found["retention"] == 0.1 and found["closeness"] == pytest.approx(0.1)
    assert found["interference"] == pytest.approx(math.sqrt(1.25 / 5 - 0.01))  # ‖τ_m − 0.1τᵢ‖ / ‖τᵢ‖
    assert np.linalg.norm(np.array([0.5, 1, 0, 0]) - 0.1 * np.array([1, 0, 0, 2])) / math.sqrt(5) == pytest.approx(
        found["interference"]
    )
    assert found["min_layer_retention"] == 0.0 and found["mean_layer_retention"] == pytest.approx(0.25)
    assert found["low_retention_mass"] == pytest.approx(4 / 5)  # g1 holds 4 of ‖τᵢ‖² = 5
    assert found["lost"] == 0.8 and found["part_zeroed"] == 0.8 and found["part_shrunk"] == 0.1
    del document["total"]["sources"]["a"]["loss_parts"]
    assert source_statistics(document, "a")["part_zeroed"] is None  # read by key: absent, not an error


# --- the overlap-aware overshoot rule (analysis/plan_warnings.py) -------------------------------------------------
@pytest.fixture(scope="module")
def overlapping(tmp_path_factory):
    """A base, two fine-tunes with independent random task vectors (nearly orthogonal), and a third whose
    task vector is 0.9·τ_a plus a little noise (nearly parallel to τ_a); their analysis report."""
    import torch

    from builders import llama_config, llama_state, write_model
    from mergescope.analysis import run_analysis
    from mergescope.checkpoints import open_checkpoint

    root = tmp_path_factory.mktemp("overlap")
    config = llama_config(layers=3)
    base = llama_state(config, seed=0)

    def noise(seed):
        g = torch.Generator().manual_seed(seed)
        return {k: 0.02 * torch.randn(v.shape, generator=g) for k, v in base.items()}

    tau_a, tau_b, small = noise(1), noise(2), noise(3)
    states = {"base": base, "ft_a": {k: base[k] + tau_a[k] for k in base},
              "ft_b": {k: base[k] + tau_b[k] for k in base},
              "ft_a2": {k: base[k] + 0.9 * tau_a[k] + 0.2 * small[k] for k in base}}
    paths = {n: str(write_model(root / n, s, config)) for n, s in states.items()}
    report = run_analysis(open_checkpoint(paths["base"]),
                          [open_checkpoint(paths[n]) for n in ("ft_a", "ft_b", "ft_a2")],
                          use_cache=False, device="cpu")
    return paths, report


def _job(paths, weights: dict, parameters=None):
    import yaml

    from mergescope.merge.job import build_job
    from mergescope.merge.plan import parse_plan

    plan = {"merge_method": "task_arithmetic", "base_model": paths["base"], "dtype": "float32",
            "models": [{"model": paths[n], "parameters": {"weight": w}} for n, w in weights.items()]}
    if parameters:
        plan["parameters"] = parameters
    return build_job(parse_plan(yaml.safe_dump(plan)))


def test_overshoot_counts_only_the_overlap_of_the_task_vectors(overlapping):
    from mergescope.analysis.plan_warnings import plan_findings, plan_overlap

    paths, report = overlapping
    orthogonal = _job(paths, {"ft_a": 1.0, "ft_b": 1.0})  # Σw = 2, the old rule's warning
    overlap = plan_overlap(orthogonal, report)
    assert overlap.retention[paths["ft_a"]] == pytest.approx(1.0, abs=0.05)
    assert [w for w in plan_findings(orthogonal, report) if w.rule == "overshoot"] == []
    parallel = _job(paths, {"ft_a": 1.0, "ft_a2": 1.0})  # the same direction twice: 1 + ⟨τ_a2, τ_a⟩/‖τ_a‖² ≈ 1.9
    overlap = plan_overlap(parallel, report)
    assert overlap.retention[paths["ft_a"]] == pytest.approx(1.9, abs=0.02)
    lines = [w for w in plan_findings(parallel, report) if w.rule == "overshoot"]
    assert {w.model for w in lines} == {paths["ft_a"], paths["ft_a2"]}
    assert "ft_a: the merge moves 1.9× as far along its task vector" in lines[0].message
    assert f"multiply lambda by {1 / overlap.largest:.2g}" in lines[0].message
    # the same plan without the report: the overlap is unknown, the vectors count as orthogonal
    assert [w for w in plan_findings(parallel, None) if w.rule == "overshoot"] == []
    scaled = _job(paths, {"ft_a": 1.0, "ft_a2": 1.0}, {"lambda": 1 / overlap.largest})  # the suggested fix
    assert [w for w in plan_findings(scaled, report) if w.rule == "overshoot"] == []


def test_predicted_retention_is_the_merges_retention_for_task_arithmetic(overlapping, tmp_path):
    from safetensors.torch import load_file

    from mergescope.analysis.plan_warnings import plan_overlap
    from mergescope.merge.executor import run_merge

    paths, report = overlapping
    job = _job(paths, {"ft_a": 0.7, "ft_b": -0.4, "ft_a2": 0.5}, {"lambda": 1.3})
    out = run_merge(job, tmp_path / "merged", device="cpu")
    base, merged = load_file(f"{paths['base']}/model.safetensors"), {}
    for file in sorted(out.glob("*.safetensors")):
        merged.update(load_file(file))
    for name in ("ft_a", "ft_b", "ft_a2"):
        source = load_file(f"{paths[name]}/model.safetensors")
        dot = sum(
            float(((merged[k].double() - base[k].double()) * (source[k].double() - base[k].double())).sum())
            for k in base
        )
        own = sum(float(((source[k].double() - base[k].double()) ** 2).sum()) for k in base)
        assert plan_overlap(job, report).retention[paths[name]] == pytest.approx(dot / own, rel=1e-4)


def test_a_layer_gradient_overshoots_where_its_weight_is_high(overlapping):
    from mergescope.analysis.plan_warnings import plan_findings, plan_overlap

    paths, report = overlapping
    # the first layer (and embeddings, head) at 1.4, the last at 0.2
    job = _job(paths, {"ft_a": [1.4, 0.2], "ft_b": 1.0})
    overlap = plan_overlap(job, report)
    assert overlap.retention[paths["ft_a"]] < 1.1 < overlap.largest  # the whole model averages it away
    [line] = [w.message for w in plan_findings(job, report) if w.rule == "overshoot"]
    assert line.startswith("ft_a: the merge moves 1.4×") and "(at model.layers.0)" in line
    normalized = _job(paths, {"ft_a": 1.0, "ft_a2": 1.0}, {"normalize": True})
    assert plan_overlap(normalized, report) is None  # normalised: the weights only set proportions


# --- the ground truth on a demo workspace built here (slow: the build takes a few minutes on 2 cores) ----------
#: 8 plans of the study (benchmarks/diagnosis_study.py) whose pairs span kept skills and every way of losing one:
#: the best plan, a small weight, overshoot (weights 1.5), averaging, a random drop at density 0.1, a negation,
#: slerp towards one fine-tune, a trim to 5%
SUBSET = ("ta-AS-1", "ta-AS-0.7", "ta-AS-1.5", "linear-soup-ARS", "dare_ties-AS-d0.1", "neg-S1-A-0.5",
          "slerp-AS-t0.75", "ties-AS-d0.05")


@pytest.fixture(scope="session")
def study_workspace(tmp_path_factory):
    from mergescope.demo.workspace import build_workspace

    return build_workspace(tmp_path_factory.mktemp("study") / "ws")


@pytest.mark.demo_study
def test_the_leading_statistic_predicts_which_skills_a_merge_keeps(study_workspace, tmp_path):
    """Merge the subset, measure every task's accuracy, and hold the statistic the study found best
    (``LEADING``) to the measured kept shares: its rank correlation must be far from chance, and its
    'likely lost' cut must tell kept from lost. Nothing here is a number copied from a run."""
    from mergescope.analysis.ground_truth import KEPT, LEADING, LIKELY_LOST
    from mergescope.demo.study import measure_plan, pairs_of, study_plans
    from mergescope.demo.workspace import read_manifest

    plans = {plan.name: plan for plan in study_plans()}
    reference = read_manifest(study_workspace)["accuracy"]  # measured by the build, as mergescope eval measures
    pairs = []
    for name in SUBSET:
        plan = plans[name]  # evaluated on its fine-tunes' tasks only
        pairs += pairs_of(plan, measure_plan(plan, study_workspace, tmp_path / name, plan.tasks), reference)
    kept = [p.kept for p in pairs]
    assert len(pairs) == 17 and sum(k >= KEPT for k in kept) >= 3 and sum(k < KEPT for k in kept) >= 3  # both outcomes
    lead = [p.statistics[LEADING] for p in pairs]
    rho = spearman(lead, kept)
    assert rho <= -0.5, f"{LEADING} vs kept share: Spearman ρ = {rho:.2f}"  # a distance: smaller means kept
    assert permutation_p_value(lead, kept, permutations=2000) < 0.01
    predicted_kept = [v <= LIKELY_LOST for v in lead]
    assert balanced_accuracy(predicted_kept, [k >= KEPT for k in kept]) >= 0.7
