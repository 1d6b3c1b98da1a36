"""An exact account of what a merge took from each source: 1 − retention split into parts that add up.

For source i with task vector τᵢ = θᵢ − θ₀ and the merge's τ_m = θ_m − θ₀, retention is
ρᵢ = ⟨τ_m, τᵢ⟩ / ‖τᵢ‖², so

    1 − ρᵢ = Σⱼ τᵢⱼ (τᵢⱼ − τ_mⱼ) / ‖τᵢ‖²

and every entry's term lands in exactly one part:

- ``zeroed``: τ_mⱼ = 0 ≠ τᵢⱼ (the merge left the base's value): the term is τᵢⱼ², the entry's whole share;
- ``reversed``: τ_mⱼ τᵢⱼ < 0: the term is τᵢⱼ² + |τᵢⱼ τ_mⱼ|, more than the entry's share — a reversed
  entry costs more than a dropped one;
- ``shrunk``: same sign, |τ_mⱼ| ≤ |τᵢⱼ|: 0 ≤ term < τᵢⱼ² (scaled down by weights, normalisation, λ < 1);
- ``amplified``: same sign, |τ_mⱼ| > |τᵢⱼ|: the term is negative — a gain (other sources adding the same
  way, weights or λ above 1).

Entries where τᵢⱼ = 0 contribute nothing. The four parts, each divided by ‖τᵢ‖², sum to 1 − ρᵢ; every term
is formed and summed in float64. They need only θ₀, θᵢ and θ_m, so they work on any merged folder, one
written by mergekit included. The diagnosis pass gathers the terms per sign pattern (s₁…sₙ, s_m) of the
sources and the merge (:mod:`.sign_patterns`), so the reversed part also splits by *who* opposed source i
there: ``against[j]`` is the cost at the reversed entries where source j has the opposite sign (an entry
opposed by two sources counts for both), and ``ratio[j]`` = Σ|τⱼ| / Σ|τᵢ| over those entries — how much
larger j's change is where it wins.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .sign_patterns import pattern_table
from .sums import SignCounts

PARTS = ("zeroed", "reversed", "shrunk", "amplified")


@dataclass(frozen=True)
class LossParts:
    """One source's parts in a layer group or the whole model, as shares of ‖τᵢ‖² (see the module
    docstring); ``against`` and ``ratio`` are keyed by the other sources' indices."""

    zeroed: float
    reversed: float
    shrunk: float
    amplified: float
    against: dict[int, float] = field(default_factory=dict)
    ratio: dict[int, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        """Σ parts = 1 − retention."""
        return self.zeroed + self.reversed + self.shrunk + self.amplified

    @classmethod
    def weighted_mean(cls, parts: list[tuple[float, LossParts]]) -> LossParts | None:
        """The parts of several groups together, each weighted by its ‖τᵢ‖² (``parts``: (mass, parts) pairs);
        the ratios are weighted by the cost they explain."""
        mass = sum(m for m, _ in parts)
        if mass <= 0:
            return None
        values = {p: sum(m * getattr(x, p) for m, x in parts) / mass for p in PARTS}
        keys = {k for _, x in parts for k in x.against}
        against = {k: sum(m * x.against.get(k, 0.0) for m, x in parts) / mass for k in keys}
        ratio = {}
        for k in keys:
            weights = [(m * x.against.get(k, 0.0), x.ratio[k]) for m, x in parts if k in x.ratio]
            total = sum(w for w, _ in weights)
            if total > 0:
                ratio[k] = sum(w * r for w, r in weights) / total
        return cls(**values, against=against, ratio=ratio)


def loss_parts(signs: SignCounts, n: int) -> list[LossParts | None]:
    """Each of the n sources' parts from the pass' per-pattern sums over ``[τ₁…τₙ, τ_m]``; None for a source
    that changed nothing there, or when the pass kept no pattern sums (more than 7 sources)."""
    if signs.pattern_cost is None:
        return [None] * n
    patterns = pattern_table(n + 1)
    merged = patterns[:, n]
    found: list[LossParts | None] = []
    for i in range(n):
        own = patterns[:, i]
        norm_squared = float(signs.pattern_mass[own != 0, i].sum())
        if norm_squared <= 0:
            found.append(None)
            continue
        cost = signs.pattern_cost[:, i] / norm_squared

        def share(mask: np.ndarray, cost: np.ndarray = cost) -> float:
            return float(cost[mask].sum())

        same = share((own != 0) & (merged == own))
        amplified = float(signs.amplified_cost[i]) / norm_squared
        reversed_ = (own != 0) & (merged == -own)
        present = signs.histogram > 0
        against, ratio = {}, {}
        for j in range(n):
            opposed = reversed_ & (patterns[:, j] == -own) & present
            if j == i or not opposed.any():
                continue
            against[j] = share(opposed)
            own_magnitude = float(signs.pattern_magnitude[opposed, i].sum())
            if own_magnitude > 0:
                ratio[j] = float(signs.pattern_magnitude[opposed, j].sum()) / own_magnitude
        found.append(LossParts(
            zeroed=share((own != 0) & (merged == 0)),
            reversed=share(reversed_),
            shrunk=same - amplified,
            amplified=amplified,
            against=against,
            ratio=ratio,
        ))
    return found
