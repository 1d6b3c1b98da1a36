"""How much of each source's task vector a merge keeps, from one Gram matrix.

For a base θ₀, sources θ₁…θₙ and a merged model θ_m, with τᵢ = θᵢ − θ₀ and τ_m = θ_m − θ₀, over a set of
elements (a tensor, a layer group, the whole model):

* **retention** ρᵢ = ⟨τ_m, τᵢ⟩ / ‖τᵢ‖² — the coefficient of τ_m's projection on τᵢ: 1 when the merge keeps
  τᵢ whole (τ_m = τᵢ + something orthogonal to it), 0 when nothing of it is left, negative when the merge
  moves the other way. A task-arithmetic merge θ₀ + Σⱼ wⱼτⱼ of orthogonal task vectors has ρᵢ = wᵢ.
* **cosine** ⟨τ_m, τᵢ⟩ / (‖τ_m‖ ‖τᵢ‖) — whether the merge points the way τᵢ does, whatever the lengths.

:class:`MergeGram` holds only sums — the Gram matrix of ``[τ₁, …, τₙ, τ_m]`` — so the sums of disjoint
sets add, and a group's numbers are exactly those of the concatenation of its tensors (ratios are formed
at the end, never averaged).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass
class MergeGram:
    """``gram[a][b] = ⟨vₐ, v_b⟩`` for v = [τ₁, …, τₙ, τ_m] over ``numel`` elements.

    ``evaluated`` is how many of those elements were actually computed: fewer than ``numel`` when the sums
    are estimates from a sample, scaled up to the whole set (see :mod:`.preview`).
    """

    n: int
    gram: np.ndarray = field(default=None)  # type: ignore[assignment]  # (n+1, n+1) float64
    numel: int = 0
    evaluated: int = 0

    def __post_init__(self) -> None:
        if self.gram is None:
            self.gram = np.zeros((self.n + 1, self.n + 1), np.float64)

    def add(self, other: MergeGram) -> None:
        """Accumulate the sums of a disjoint set of elements."""
        self.gram += other.gram
        self.numel += other.numel
        self.evaluated += other.evaluated

    @property
    def merged_norm(self) -> float:
        """‖τ_m‖."""
        return math.sqrt(max(self.gram[self.n, self.n], 0.0))

    def norm(self, i: int) -> float:
        """‖τᵢ‖ (i counts sources from 0)."""
        return math.sqrt(max(self.gram[i, i], 0.0))

    def retention(self, i: int) -> float | None:
        """⟨τ_m, τᵢ⟩ / ‖τᵢ‖²; None when τᵢ is 0 here."""
        own = self.gram[i, i]
        return None if own <= 0 else float(self.gram[self.n, i] / own)

    def cosine(self, i: int) -> float | None:
        """⟨τ_m, τᵢ⟩ / (‖τ_m‖ ‖τᵢ‖); None when either is 0."""
        denominator = self.merged_norm * self.norm(i)
        return None if denominator == 0 else float(min(max(self.gram[self.n, i] / denominator, -1.0), 1.0))


def merge_gram_from_task_sums(task_gram: np.ndarray, numel: int) -> MergeGram:
    """The :class:`MergeGram` inside an analysis Gram over ``[θ₀, τ₁…τₙ, τ_m, Σ]`` (the merged model passed as
    the last of the analysed models): rows and columns 1…n+1."""
    n = task_gram.shape[0] - 3
    return MergeGram(n, np.array(task_gram[1 : n + 2, 1 : n + 2], dtype=np.float64), numel, numel)
