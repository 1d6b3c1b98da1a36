"""Additive sufficient statistics of task vectors, and the ratios a user reads.

For a base θ₀ and task vectors τ₁…τₙ (τᵢ = θᵢ − θ₀) over some set of elements — a chunk, a tensor, a
layer group, a whole model — :class:`TaskVectorSums` holds only sums: the Gram matrix of
``[θ₀, τ₁…τₙ, Σᵢτᵢ]``,
sign agreement counts, and the count of elements where several task vectors disagree in sign. Sums of
disjoint sets add, so a group's statistics are exactly those of the concatenation of its tensors; ratios
are formed only at the end (:meth:`TaskVectorSums.statistics`), never averaged.

With sᵢ = sign(τᵢ) ∈ {−1, 0, 1} per element:

* ``gram[i][j] = ⟨vᵢ, vⱼ⟩`` with v₀ = θ₀, vᵢ = τᵢ, vₙ₊₁ = Σᵢ τᵢ → ``‖τᵢ‖``, ``‖θ₀‖``, ``⟨τᵢ, τⱼ⟩`` and
  ``‖Σᵢ τᵢ‖`` — kept as its own row rather than formed as Σᵢⱼ⟨τᵢ, τⱼ⟩, which loses every digit when task
  vectors nearly cancel;
* ``sign_dot[i][j] = Σ sᵢsⱼ`` and ``both_nonzero[i][j] = Σ |sᵢ||sⱼ|``, so
  ``#(τᵢτⱼ < 0) = (both_nonzero − sign_dot) / 2`` and ``#(τᵢ ≠ 0) = both_nonzero[i][i]``;
* ``multi_nonzero`` = #elements nonzero in at least two models, ``multi_conflict`` = #of those whose
  nonzero signs are not all equal: with P, N the counts of positive and negative signs, that is
  ``P + N ≥ 2`` and ``|P − N| < P + N``.

The ``trimmed_*`` fields are the same sign counts after each τᵢ is trimmed to its top-d fraction by
magnitude (``--density d``); they are absent when d = 1.

On request (``patterns=True`` in the pass, n ≤ 8) :class:`SignCounts` also keeps the per-pattern sums
themselves: ``histogram[p]`` = #elements with sign pattern p = (s₁…sₙ) (coded as in
:mod:`.sign_patterns`) and ``pattern_mass[p, i]`` = Σ τᵢ² over those elements — which share of each task
vector's squared norm sits at elements where the others agree or disagree with it (the diagnosis of a merge
uses them). The diagnosis passes the merge's task vector τ_m last, and for it the pass also keeps
``pattern_magnitude[p, i]`` = Σ |τᵢ| and ``pattern_cost[p, i]`` = Σ τᵢ(τᵢ − τ_m) per pattern, and
``amplified_cost[i]`` = Σ τᵢ(τᵢ − τ_m) over the elements where τ_m has τᵢ's sign and a larger magnitude —
the exact parts of 1 − retention (:mod:`.loss_parts`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass
class SignCounts:
    """Sign agreement sums over a set of elements, for n task vectors."""

    sign_dot: np.ndarray  # (n, n) int64
    both_nonzero: np.ndarray  # (n, n) int64
    multi_nonzero: int = 0
    multi_conflict: int = 0
    histogram: np.ndarray | None = None  # (3ⁿ,) int64, kept only on request
    pattern_mass: np.ndarray | None = None  # (3ⁿ, n) float64: Σ τᵢ² per sign pattern, kept only on request
    pattern_magnitude: np.ndarray | None = None  # (3ⁿ, n) float64: Σ |τᵢ| per sign pattern, likewise
    pattern_cost: np.ndarray | None = None  # (3ⁿ, n) float64: Σ τᵢ(τᵢ − τ_last) per sign pattern, likewise
    amplified_cost: np.ndarray | None = None  # (n,) float64: Σ τᵢ(τᵢ − τ_last) where |τ_last| > |τᵢ|, same sign

    @classmethod
    def zeros(cls, n: int) -> SignCounts:
        return cls(np.zeros((n, n), np.int64), np.zeros((n, n), np.int64))

    def add(self, other: SignCounts) -> None:
        self.sign_dot += other.sign_dot
        self.both_nonzero += other.both_nonzero
        self.multi_nonzero += other.multi_nonzero
        self.multi_conflict += other.multi_conflict
        self.histogram = _add_optional(self.histogram, other.histogram)
        self.pattern_mass = _add_optional(self.pattern_mass, other.pattern_mass)
        self.pattern_magnitude = _add_optional(self.pattern_magnitude, other.pattern_magnitude)
        self.pattern_cost = _add_optional(self.pattern_cost, other.pattern_cost)
        self.amplified_cost = _add_optional(self.amplified_cost, other.amplified_cost)

    def sign_conflict(self, i: int, j: int) -> float | None:
        """#(τᵢτⱼ < 0) / #(τᵢ ≠ 0 ∧ τⱼ ≠ 0); None when no element is nonzero in both."""
        both = int(self.both_nonzero[i, j])
        return None if both == 0 else (both - int(self.sign_dot[i, j])) / 2 / both

    def conflict_all(self) -> float | None:
        """Fraction of elements nonzero in ≥ 2 models whose nonzero signs are not all equal (TIES)."""
        return None if self.multi_nonzero == 0 else self.multi_conflict / self.multi_nonzero


@dataclass
class TaskVectorSums:
    """Sums over a set of ``numel`` elements for a base and n task vectors (see the module docstring)."""

    n: int
    numel: int = 0
    gram: np.ndarray = field(default=None)  # type: ignore[assignment]  # (n+2, n+2) float64
    max_abs: np.ndarray = field(default=None)  # type: ignore[assignment]  # (n,) float64
    signs: SignCounts = field(default=None)  # type: ignore[assignment]
    trimmed: SignCounts | None = None

    def __post_init__(self) -> None:
        if self.gram is None:
            self.gram = np.zeros((self.n + 2, self.n + 2), np.float64)
        if self.max_abs is None:
            self.max_abs = np.zeros(self.n, np.float64)
        if self.signs is None:
            self.signs = SignCounts.zeros(self.n)

    def add(self, other: TaskVectorSums) -> None:
        """Accumulate the sums of a disjoint set of elements."""
        self.numel += other.numel
        self.gram += other.gram
        np.maximum(self.max_abs, other.max_abs, out=self.max_abs)
        self.signs.add(other.signs)
        if other.trimmed is not None:
            if self.trimmed is None:
                self.trimmed = SignCounts.zeros(self.n)
            self.trimmed.add(other.trimmed)

    # --- the numbers a user reads ----------------------------------------------------------------
    def norm(self, i: int) -> float:
        """‖τᵢ‖₂ (i counts models from 0)."""
        return math.sqrt(max(self.gram[i + 1, i + 1], 0.0))

    @property
    def base_norm(self) -> float:
        return math.sqrt(max(self.gram[0, 0], 0.0))

    def cosine(self, i: int, j: int) -> float | None:
        """⟨τᵢ, τⱼ⟩ / (‖τᵢ‖ ‖τⱼ‖); None when either norm is 0."""
        denominator = self.norm(i) * self.norm(j)
        return None if denominator == 0 else _clip(self.gram[i + 1, j + 1] / denominator, -1.0, 1.0)

    def cancellation(self) -> float | None:
        """1 − ‖Σᵢ τᵢ‖ / Σᵢ ‖τᵢ‖: the share of the task vectors' length that plain summing destroys."""
        total = sum(self.norm(i) for i in range(self.n))
        if total == 0:
            return None
        sum_norm = math.sqrt(max(self.gram[-1, -1], 0.0))
        return _clip(1.0 - sum_norm / total, 0.0, 1.0)

    def model_statistics(self, i: int) -> dict:
        base = self.base_norm
        return {
            "norm": self.norm(i),
            "rel": None if base == 0 else self.norm(i) / base,
            "nonzero": None if self.numel == 0 else int(self.signs.both_nonzero[i, i]) / self.numel,
            "max_abs": float(self.max_abs[i]),
        }

    def statistics(self, names: list[str]) -> dict:
        """The JSON statistics block: ``delta`` per model, ``pairs``, ``conflict_all``, ``cancellation``."""
        pairs = []
        for i in range(self.n):
            for j in range(i + 1, self.n):
                pair = {
                    "a": names[i], "b": names[j], "cosine": self.cosine(i, j),
                    "sign_conflict": self.signs.sign_conflict(i, j),
                }
                if self.trimmed is not None:
                    pair["sign_conflict_trimmed"] = self.trimmed.sign_conflict(i, j)
                pairs.append(pair)
        result = {
            "numel": self.numel,
            "base_norm": self.base_norm,
            "delta": {name: self.model_statistics(i) for i, name in enumerate(names)},
            "pairs": pairs,
            "conflict_all": self.signs.conflict_all(),
            "cancellation": self.cancellation(),
        }
        if self.trimmed is not None:
            result["conflict_all_trimmed"] = self.trimmed.conflict_all()
        return result


def _add_optional(mine: np.ndarray | None, other: np.ndarray | None) -> np.ndarray | None:
    """``mine + other`` where both are kept; a side that was not kept contributes nothing."""
    if other is None:
        return mine
    return other.copy() if mine is None else mine + other


def _clip(x: float, lo: float, hi: float) -> float:
    return float(min(max(x, lo), hi))
