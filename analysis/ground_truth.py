"""Holding the diagnosis to measured accuracies: the kept share of a skill, the candidate statistics a
diagnosis could lead with, and how well each predicts the kept share (rank correlation, best threshold).

``benchmarks/diagnosis_study.py`` merges many plans on the demo workspace and uses these functions; the
tests use them on a small subset. Everything here is plain numpy (float64) and needs no model.

**Kept share.** For a merge m, a source fine-tune i that learned task t, and the base,

    kept(m, i) = (acc_m(t) − acc_base(t)) / (acc_i(t) − acc_base(t))

1 when the merge is as good as the fine-tune on its task, 0 at the base's level, negative below it
(:func:`kept_share`; the same as :func:`mergescope.demo.story.kept`). A skill is *kept* when kept ≥ 1/2.

**Rank correlation.** Spearman's ρ is Pearson's correlation of the two samples' ranks, ties given the
average of the ranks they span (:func:`average_ranks`, :func:`spearman`). Its significance is a two-sided
permutation p-value, (1 + #{permutations with |ρ*| ≥ |ρ|}) / (1 + P) (:func:`permutation_p_value`), and its
uncertainty a percentile bootstrap interval over resampled pairs (:func:`bootstrap_interval`).

**Threshold.** For a statistic s where higher means kept, the rule "kept ⇔ s ≥ c" has the balanced accuracy
½ (TP/P + TN/N) (P the kept pairs, N the lost ones, so a rule is not rewarded for the majority class); for a
statistic where higher means lost the rule is "kept ⇔ s ≤ c". :func:`best_threshold` tries every cut between
two consecutive distinct values (never one that calls every pair kept, or every pair lost: those score ½) and
reports the best balanced accuracy and the range of cuts reaching it; below ½ the statistic points the other
way.

**Candidate statistics** of source i, from a ``mergescope.diagnosis/1`` document (:func:`source_statistics`),
with ρ = retention, ‖·‖ norms of τᵢ = θᵢ − θ₀ and τ_m = θ_m − θ₀ over the whole model:

- ``retention`` ⟨τ_m, τᵢ⟩ / ‖τᵢ‖², ``cosine`` ⟨τ_m, τᵢ⟩ / (‖τ_m‖ ‖τᵢ‖);
- ``closeness`` 1 − |1 − ρ|: like retention, but moving *past* the fine-tune counts against it too;
- ``interference`` ‖τ_m − ρτᵢ‖ / ‖τᵢ‖ = √(‖τ_m‖²/‖τᵢ‖² − ρ²): the part of the merge's change that is not
  along τᵢ, in units of τᵢ (what other sources add on top; cosine = ρ / √(ρ² + interference²));
- ``distance`` ‖τ_m − τᵢ‖ / ‖τᵢ‖ = √((1 − ρ)² + interference²): how far the merge is from the fine-tune, in
  units of the fine-tune's own move (0: the merge is θᵢ; 1: as far as the base is);
- from the Gram matrix of [τ₁…τₙ, τ_m] (:func:`span_statistics`): ``weight_estimate`` cᵢ, the coefficient of
  τᵢ when τ_m is written as Σⱼ cⱼτⱼ + r with r orthogonal to every source (least squares: c = G⁻¹g,
  Gⱼₖ = ⟨τⱼ, τₖ⟩, gⱼ = ⟨τⱼ, τ_m⟩; with orthogonal sources cᵢ = retention), ``off_span`` ‖r‖ / ‖τᵢ‖ (what
  the merge adds that no source has — trims, random drops, rescaling — in units of τᵢ), and ``own_distance``
  √((1 − cᵢ)² + off_span²): the distance from the fine-tune not counting the other sources' parts;
- ``min_layer_retention`` and ``mean_layer_retention``: the smallest and the unweighted mean per-group
  retention over the groups where τᵢ ≠ 0 (the ‖τᵢ‖²-weighted mean would be the whole-model retention);
- ``low_retention_mass``: the share of ‖τᵢ‖² in groups whose retention is below 1/3 (what the findings cover);
- the sign-pattern shares ``lost``, ``reversed``, ``conflict``, ``trimmed`` (see :mod:`.diagnosis`);
- the loss parts, when the document carries them (``loss_parts`` per source: ``zeroed``, ``reversed``,
  ``shrunk``, ``amplified``, which sum to 1 − ρ) — or as computed from the tensors by :func:`loss_parts`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

KEPT = 0.5  # a skill is kept when the merge keeps at least half of the fine-tune's gain
LOW_RETENTION = 1 / 3
#: the statistic the study found best at predicting the kept share (benchmarks/diagnosis_study.py,
#: docs/diagnosis_study.md): pooled over 145 (plan, source) pairs of 63 demo merges, Spearman's ρ = −0.32
#: (retention: −0.03); within each task −0.47 / −0.59 / −0.25
LEADING = "own_distance"
#: above this own_distance the study's best rule calls the skill likely lost (balanced accuracy ≈ 0.7)
LIKELY_LOST = 0.5


# --- the measured outcome -------------------------------------------------------------------------------------
def kept_share(acc_merged: float, acc_base: float, acc_fine_tune: float) -> float | None:
    """(acc_merged − acc_base) / (acc_fine_tune − acc_base); None when the fine-tune gained nothing."""
    gain = acc_fine_tune - acc_base
    return None if gain <= 0 else (acc_merged - acc_base) / gain


# --- rank correlation -----------------------------------------------------------------------------------------
def average_ranks(values: Sequence[float]) -> np.ndarray:
    """Ranks 1…n of ``values`` (float64); tied values all get the mean of the ranks they occupy."""
    x = np.asarray(values, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    sorted_x = x[order]
    start = 0
    while start < len(x):
        stop = start + 1
        while stop < len(x) and sorted_x[stop] == sorted_x[start]:
            stop += 1
        ranks[order[start:stop]] = (start + 1 + stop) / 2  # mean of ranks start+1 … stop
        start = stop
    return ranks


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    denominator = math.sqrt(float(a @ a) * float(b @ b))
    return float("nan") if denominator == 0 else float(a @ b) / denominator


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's ρ: Pearson's correlation of the average ranks; NaN when either sample is constant or n < 2."""
    if len(x) != len(y):
        raise ValueError(f"samples of different lengths: {len(x)} and {len(y)}")
    if len(x) < 2:
        return float("nan")
    return _pearson(average_ranks(x), average_ranks(y))


def permutation_p_value(x: Sequence[float], y: Sequence[float], permutations: int = 2000, seed: int = 0) -> float:
    """Two-sided permutation p-value of Spearman's ρ: (1 + #{|ρ(x, permuted y)| ≥ |ρ(x, y)|}) / (1 + permutations)."""
    observed = spearman(x, y)
    if math.isnan(observed):
        return float("nan")
    rx, ry = average_ranks(x), average_ranks(y)
    rx = (rx - rx.mean()) / np.linalg.norm(rx - rx.mean())
    ry = (ry - ry.mean()) / np.linalg.norm(ry - ry.mean())
    rng = np.random.default_rng(seed)
    shuffled = np.stack([ry[rng.permutation(len(ry))] for _ in range(permutations)])
    null = shuffled @ rx
    return float((1 + np.count_nonzero(np.abs(null) >= abs(observed) - 1e-12)) / (1 + permutations))


def bootstrap_interval(x: Sequence[float], y: Sequence[float], resamples: int = 1000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of Spearman's ρ over pairs resampled with replacement (resamples where
    either side is constant are skipped)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    rng = np.random.default_rng(seed)
    found = []
    for _ in range(resamples):
        pick = rng.integers(0, len(x), len(x))
        value = spearman(x[pick], y[pick])
        if not math.isnan(value):
            found.append(value)
    if not found:
        return float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(found, [tail, 100 - tail])
    return float(low), float(high)


# --- the threshold that separates kept from lost ----------------------------------------------------------------
def balanced_accuracy(predicted_kept: Sequence[bool], kept: Sequence[bool]) -> float:
    """½ (TP/P + TN/N); NaN when either class is empty."""
    predicted, truth = np.asarray(predicted_kept, bool), np.asarray(kept, bool)
    positives, negatives = int(truth.sum()), int((~truth).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    return 0.5 * (np.count_nonzero(predicted & truth) / positives + np.count_nonzero(~predicted & ~truth) / negatives)


@dataclass(frozen=True)
class Threshold:
    """The best cut of a statistic: kept ⇔ value ≥ ``cut`` (``higher_means_kept``) or value ≤ ``cut``.

    ``cut`` is the middle one (the lower middle of an even count) of the cuts — midpoints between consecutive
    distinct values — that reach ``balanced_accuracy``; ``low`` and ``high`` the smallest and largest."""

    cut: float
    balanced_accuracy: float
    low: float
    high: float
    higher_means_kept: bool
    n: int
    n_kept: int

    @property
    def rule(self) -> str:
        return f"kept if ≥ {self.cut:.3g}" if self.higher_means_kept else f"kept if ≤ {self.cut:.3g}"


def best_threshold(values: Sequence[float], kept: Sequence[float], higher_means_kept: bool = True,
                   kept_at: float = KEPT) -> Threshold | None:
    """The cut of ``values`` with the best balanced accuracy at telling kept (``kept`` ≥ ``kept_at``) from lost;
    None when every pair is on one side."""
    x = np.asarray(values, np.float64)
    truth = np.asarray(kept, np.float64) >= kept_at
    if truth.all() or not truth.any():
        return None
    distinct = np.unique(x)
    cuts = (distinct[:-1] + distinct[1:]) / 2 if len(distinct) > 1 else distinct
    scores = np.array([balanced_accuracy(x >= c if higher_means_kept else x <= c, truth) for c in cuts])
    best = float(scores.max())
    reaching = cuts[scores >= best - 1e-12]
    # the cuts reaching the best score need not be contiguous: report their extent and the middle one of them
    low, high, middle = float(reaching.min()), float(reaching.max()), float(reaching[(len(reaching) - 1) // 2])
    return Threshold(middle, best, low, high, higher_means_kept, len(x), int(truth.sum()))


# --- candidate statistics ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Candidate:
    """A statistic a diagnosis could lead with, and which way it points."""

    name: str
    higher_means_kept: bool
    text: str


CANDIDATES: tuple[Candidate, ...] = (
    Candidate("retention", True, "whole-model retention ⟨τ_m, τᵢ⟩ / ‖τᵢ‖²"),
    Candidate("cosine", True, "cosine of τ_m with τᵢ"),
    Candidate("closeness", True, "1 − |1 − retention| (overshooting counts against it)"),
    Candidate("interference", False, "‖τ_m − ρτᵢ‖ / ‖τᵢ‖: the merge's change off τᵢ, in units of τᵢ"),
    Candidate("distance", False, "‖τ_m − τᵢ‖ / ‖τᵢ‖: the merge's distance from the fine-tune, in units of τᵢ"),
    Candidate("weight_estimate", True, "cᵢ of τ_m ≈ Σ cⱼτⱼ (least squares over the sources)"),
    Candidate("weight_closeness", True, "1 − |1 − cᵢ|"),
    Candidate("off_span", False, "‖τ_m − Σ cⱼτⱼ‖ / ‖τᵢ‖: what no source has (trims, drops), in units of τᵢ"),
    Candidate("own_distance", False, "√((1 − cᵢ)² + off_span²): the distance from θᵢ, the other sources' parts aside"),
    Candidate("min_layer_retention", True, "smallest per-group retention"),
    Candidate("mean_layer_retention", True, "unweighted mean of per-group retention"),
    Candidate("low_retention_mass", False, "share of ‖τᵢ‖² in groups with retention < 1/3"),
    Candidate("lost", False, "share of ‖τᵢ‖² zeroed or reversed"),
    Candidate("reversed", False, "share of ‖τᵢ‖² reversed"),
    Candidate("conflict", False, "share of ‖τᵢ‖² lost where another source opposes"),
    Candidate("trimmed", False, "share of ‖τᵢ‖² lost where no other source opposes"),
    Candidate("part_zeroed", False, "loss part: entries set back to the base (Σ τᵢ² there / ‖τᵢ‖²)"),
    Candidate("part_reversed", False, "loss part: entries whose sign flipped (τᵢ² + |τᵢτ_m| there / ‖τᵢ‖²)"),
    Candidate("part_shrunk", False, "loss part: same sign, smaller"),
    Candidate("part_amplified", False, "loss part: same sign, larger (≤ 0, a gain)"),
)
LOSS_PARTS = ("zeroed", "reversed", "shrunk", "amplified")


def source_statistics(diagnosis: dict, name: str) -> dict[str, float | None]:
    """The candidate statistics of source ``name`` in a ``mergescope.diagnosis/1`` document (see the module
    docstring); a statistic the document cannot give is None. Loss parts are read from the key ``loss_parts``
    of the source's whole-model entry when the document has it."""
    total = diagnosis["total"]["sources"][name]
    merged_norm = float(diagnosis["total"]["merged_norm"])
    retention, norm = total.get("retention"), float(total.get("norm") or 0.0)
    found: dict[str, float | None] = {c.name: None for c in CANDIDATES}
    found["retention"] = retention
    found["cosine"] = total.get("cosine")
    if retention is not None and norm > 0:
        found["closeness"] = 1 - abs(1 - retention)
        found["interference"] = math.sqrt(max((merged_norm / norm) ** 2 - retention**2, 0.0))
        found["distance"] = math.sqrt((1 - retention) ** 2 + found["interference"] ** 2)
    layer_retention, layer_mass = [], []
    for group in diagnosis["groups"]:
        effect = group["sources"][name]
        if effect.get("retention") is not None and (effect.get("norm") or 0) > 0:
            layer_retention.append(float(effect["retention"]))
            layer_mass.append(float(effect["norm"]) ** 2)
    if layer_retention:
        r, mass = np.array(layer_retention), np.array(layer_mass)
        found["min_layer_retention"] = float(r.min())
        found["mean_layer_retention"] = float(r.mean())
        found["low_retention_mass"] = float(mass[r < LOW_RETENTION].sum() / mass.sum())
    for key in ("lost", "reversed", "conflict", "trimmed"):
        found[key] = total.get(key)
    parts = total.get("loss_parts")
    if isinstance(parts, dict):
        for part in LOSS_PARTS:
            found[f"part_{part}"] = parts.get(part)
    return found


def span_statistics(gram: np.ndarray) -> list[dict[str, float] | None]:
    """Per source i of the Gram matrix ``gram`` of [τ₁…τₙ, τ_m] ((n+1) × (n+1)): ``weight_estimate`` cᵢ,
    ``weight_closeness`` 1 − |1 − cᵢ|, ``off_span`` and ``own_distance`` (see the module docstring); None for a
    source with τᵢ = 0. c solves G c = g in the least-squares sense (a pseudo-inverse when the sources are
    linearly dependent), and ‖r‖² = ‖τ_m‖² − gᵀc (r is orthogonal to the sources' span)."""
    g = np.asarray(gram, np.float64)
    n = g.shape[0] - 1
    sources, towards = g[:n, :n], g[:n, n]
    c = np.linalg.pinv(sources, hermitian=True) @ towards
    residual = math.sqrt(max(float(g[n, n] - towards @ c), 0.0))
    found: list[dict[str, float] | None] = []
    for i in range(n):
        if sources[i, i] <= 0:
            found.append(None)
            continue
        off = residual / math.sqrt(sources[i, i])
        found.append({"weight_estimate": float(c[i]), "weight_closeness": 1 - abs(1 - float(c[i])), "off_span": off,
                      "own_distance": math.sqrt((1 - float(c[i])) ** 2 + off**2)})
    return found


def loss_parts(tau: np.ndarray, tau_merged: np.ndarray) -> dict[str, float] | None:
    """1 − retention split over the entries of τᵢ (``tau``) by what the merge did to them, each part a share
    of ‖τᵢ‖² (float64): with term_j = τᵢⱼ(τᵢⱼ − τ_mⱼ),

    - ``zeroed``: τ_mⱼ = 0 ≠ τᵢⱼ;  ``reversed``: τ_mⱼτᵢⱼ < 0;
    - ``shrunk``: same sign, |τ_mⱼ| ≤ |τᵢⱼ|;  ``amplified``: same sign, |τ_mⱼ| > |τᵢⱼ| (a negative term).

    The parts sum to 1 − ⟨τ_m, τᵢ⟩ / ‖τᵢ‖². None when τᵢ = 0. Several tensors: pass them concatenated."""
    t = np.asarray(tau, np.float64).ravel()
    m = np.asarray(tau_merged, np.float64).ravel()
    square = float(t @ t)
    if square <= 0:
        return None
    product = t * m
    term = t * (t - m)
    same = product > 0
    amplified = same & (np.abs(m) > np.abs(t))
    masks = {
        "zeroed": (t != 0) & (m == 0), "reversed": product < 0, "shrunk": same & ~amplified, "amplified": amplified
    }
    return {part: float(term[mask].sum()) / square for part, mask in masks.items()}


# --- one statistic against the outcome ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Assessment:
    """How well one statistic predicts the kept share over the pairs where it is defined."""

    name: str
    n: int
    rho: float
    p_value: float
    interval: tuple[float, float]
    threshold: Threshold | None

    def to_json(self) -> dict:
        t = self.threshold
        return {
            "statistic": self.name, "n": self.n, "spearman": self.rho, "p_value": self.p_value,
            "bootstrap_95": list(self.interval),
            "threshold": None if t is None else {
                "cut": t.cut, "low": t.low, "high": t.high, "balanced_accuracy": t.balanced_accuracy,
                "higher_means_kept": t.higher_means_kept, "n_kept": t.n_kept,
            },
        }


def assess(candidate: Candidate, values: Sequence[float | None], kept: Sequence[float],
           permutations: int = 2000, resamples: int = 1000) -> Assessment:
    """Spearman's ρ (with p-value and bootstrap interval) and the best threshold of one statistic against
    the kept shares, over the pairs where the statistic is not None."""
    pairs = [(float(v), float(k)) for v, k in zip(values, kept) if v is not None and math.isfinite(v)]
    if len(pairs) < 3:
        return Assessment(candidate.name, len(pairs), float("nan"), float("nan"), (float("nan"), float("nan")), None)
    x, y = [p[0] for p in pairs], [p[1] for p in pairs]
    return Assessment(
        candidate.name, len(pairs), spearman(x, y), permutation_p_value(x, y, permutations),
        bootstrap_interval(x, y, resamples), best_threshold(x, y, candidate.higher_means_kept),
    )
