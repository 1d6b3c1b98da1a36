"""One layer group's diagnosis (or the whole model's): per source, its retention and cosine, and where the
merge's signs removed it. The definitions are in :mod:`.diagnosis`; the numbers come from the analysis pass'
sums over ``[τ₁…τₙ, τ_m]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .diagnosis_context import PlanContext
from .ground_truth import span_statistics
from .loss_parts import LossParts, loss_parts
from .retention import merge_gram_from_task_sums
from .sign_patterns import pattern_table
from .sums import TaskVectorSums


@dataclass
class SourceEffect:
    """What the merge did to one source's task vector over one group (see the module docstring)."""

    norm: float
    retention: float | None
    cosine: float | None
    lost: float | None = None
    reversed: float | None = None
    conflict: float | None = None
    trimmed: float | None = None
    conflict_with: dict[str, float] = field(default_factory=dict)
    weight: float | None = None
    density: float | None = None
    parts: LossParts | None = None  # 1 − retention, split exactly (see .loss_parts)
    #: τ_m = Σⱼ cⱼτⱼ + r fitted over the sources (least squares, :func:`.ground_truth.span_statistics`): this
    #: source's effective weight cᵢ, what no source has ‖r‖/‖τᵢ‖, and √((1 − cᵢ)² + (‖r‖/‖τᵢ‖)²) — the
    #: statistic the ground-truth study found to predict a lost skill best
    effective_weight: float | None = None
    off_span: float | None = None
    own_distance: float | None = None


@dataclass
class GroupDiagnosis:
    group: str  # a layer group, or "total"
    numel: int
    merged_norm: float
    sources: list[SourceEffect]


def sign_losses(pattern_mass: np.ndarray, n: int) -> list[dict]:
    """Per source i < n: ``lost``, ``reversed``, ``conflict``, ``trimmed`` and ``conflict_with`` (index → share)
    as shares of Σ τᵢ², from the pattern mass of the n sources and the merge (the last of n + 1 vectors)."""
    patterns = pattern_table(n + 1)
    merged = patterns[:, n]
    found = []
    for i in range(n):
        own = patterns[:, i]
        mass = pattern_mass[:, i]
        total = float(mass[own != 0].sum())
        if total <= 0:
            found.append({"lost": None, "reversed": None, "conflict": None, "trimmed": None, "conflict_with": {}})
            continue
        lost = (own != 0) & (merged != own)
        opposed_by = {j: lost & (patterns[:, j] == -own) for j in range(n) if j != i}
        conflicted = np.zeros_like(lost)
        for mask in opposed_by.values():
            conflicted |= mask
        found.append({
            "lost": _share(mass, lost, total),
            "reversed": _share(mass, lost & (merged == -own), total),
            "conflict": _share(mass, conflicted, total),
            "trimmed": _share(mass, lost & ~conflicted, total),
            "conflict_with": {j: _share(mass, mask, total) for j, mask in opposed_by.items()},
        })
    return found


def _share(mass: np.ndarray, mask: np.ndarray, total: float) -> float:
    """Σ mass over the patterns in ``mask``, as a share of ``total``."""
    return float(mass[mask].sum()) / total


def group_diagnosis(group: str, sums: TaskVectorSums, names: list[str], context: PlanContext | None) -> GroupDiagnosis:
    """The numbers of one group (or ``"total"``) from its summed analysis sums over ``[τ₁…τₙ, τ_m]``."""
    n = len(names)
    gram = merge_gram_from_task_sums(sums.gram, sums.numel)
    losses = sign_losses(sums.signs.pattern_mass, n) if sums.signs.pattern_mass is not None else [None] * n
    parameters = context.parameters.get(group) if context is not None else None
    effects = []
    spans = span_statistics(gram.gram)
    for i, (loss, parts) in enumerate(zip(losses, loss_parts(sums.signs, n))):
        effect = SourceEffect(gram.norm(i), gram.retention(i), gram.cosine(i), parts=parts)
        if spans[i] is not None:
            effect.effective_weight = spans[i]["weight_estimate"]
            effect.off_span, effect.own_distance = spans[i]["off_span"], spans[i]["own_distance"]
        if loss is not None:
            effect.lost, effect.reversed, effect.conflict, effect.trimmed = (
                loss["lost"],
                loss["reversed"],
                loss["conflict"],
                loss["trimmed"],
            )
            effect.conflict_with = {names[j]: value for j, value in loss["conflict_with"].items()}
        if parameters is not None:
            effect.weight, effect.density = parameters.weights[i], parameters.densities[i]
        effects.append(effect)
    return GroupDiagnosis(group, sums.numel, gram.merged_norm, effects)
