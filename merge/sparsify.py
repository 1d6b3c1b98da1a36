"""Sparsification of task vectors: which entries a trimming merge keeps.

Shared by the merge methods (TIES and relatives) and by the analysis, which counts sign conflicts after
the same trim, so a preview and a merge can never disagree.

Every magnitude trim here finds its threshold by *selection* (``kthvalue``, linear time) rather than by
sorting. Entries whose magnitude equals the threshold are taken as a stable sort would order them: the
result is the same on every device and every torch version. (mergekit sorts with an unstable sort, so which
of several equal magnitudes it keeps at the threshold depends on its device and torch build; only entries of
exactly equal magnitude can differ.)

The random masks (DARE, DELLA) draw per chunk of entries from generators seeded from the tensor's draw seed
(:mod:`~mergescope.merge.draws`), never from torch's global generator: a seed gives bit-identical masks on the
same device, whole or in blocks of any size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mergescope.merge import draws, magnitude_trim

# torch is imported inside the functions that use it: start-up cost (mergescope --help, the TUI's first screen)
if TYPE_CHECKING:  # pragma: no cover
    import torch


def keep_count(numel: int, density: float) -> int:
    """k = ⌊density · numel⌋: how many entries a top-``density`` trim keeps (mergekit's rounding)."""
    return int(density * numel)


def _magnitudes(values: torch.Tensor, absolute: bool = False) -> torch.Tensor:
    """|values| flat in float32 (or float64); ``absolute`` says the caller already holds a float |τ|, used as is."""
    import torch

    magnitude = values.reshape(-1)
    if magnitude.dtype not in (torch.float32, torch.float64):
        return magnitude.float().abs_()
    return magnitude if absolute else magnitude.abs()


_SAMPLE = 1 << 16


def kth_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest entry (1-based) of a 1-D tensor, exactly, by selection rather than sorting."""
    return _kth_with_candidates(values, k)[0]


def _kth_with_candidates(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The k-th smallest entry, and the ascending indices of a bracket of entries that holds every entry
    equal to it (None when the whole tensor was searched).

    ``kthvalue`` alone is a scalar quickselect (~60 M entries/s on one core). For large inputs an evenly
    strided sample brackets the answer: v_lo ≤ x_(k) ≤ v_hi with a margin of a few standard errors; a
    vectorised count checks the bracket, and ``kthvalue`` runs only on the few entries inside it. The
    answer is the same value either way (a failed bracket falls back to ``kthvalue`` on everything).
    """
    import torch

    numel = values.numel()
    if numel <= 4 * _SAMPLE:
        return values.kthvalue(k).values, None
    sample = values[:: numel // _SAMPLE].contiguous()
    size = sample.numel()
    position = k / numel * size
    margin = 4.0 * (size**0.5) + 8
    lo_rank = max(1, int(position - margin))
    hi_rank = min(size, int(position + margin) + 1)
    low, high = sample.kthvalue(lo_rank).values, sample.kthvalue(hi_rank).values
    at_least_low = values >= low
    below = numel - int(torch.count_nonzero(at_least_low))  # bool .sum() is 25x slower
    candidates = at_least_low.logical_and_(values <= high).nonzero().reshape(-1)
    inside = values[candidates]
    if below < k <= below + inside.numel():
        return inside.kthvalue(k - below).values, candidates
    return values.kthvalue(k).values, None


def select_extreme(magnitude: torch.Tensor, count: int, *, largest: bool, low_index_first: bool) -> torch.Tensor:
    """Flat boolean mask of exactly ``count`` entries of a 1-D ``magnitude``: its largest or its smallest.

    The threshold is the count-th extreme value (by selection); entries beyond it are taken, and entries
    equal to it are taken lowest index first (``low_index_first``) or highest index first until ``count``
    are taken. The tied entries are looked for only inside the selection's bracket, which holds them all.
    """
    import torch

    numel = magnitude.numel()
    if count >= numel:
        return torch.ones(numel, dtype=torch.bool, device=magnitude.device)
    if count <= 0:
        return torch.zeros(numel, dtype=torch.bool, device=magnitude.device)
    threshold, candidates = _kth_with_candidates(magnitude, numel - count + 1 if largest else count)
    mask = magnitude > threshold if largest else magnitude < threshold
    missing = count - int(torch.count_nonzero(mask))
    if missing > 0:
        if candidates is None:
            tied = (magnitude == threshold).nonzero().reshape(-1)
        else:
            tied = candidates[magnitude[candidates] == threshold]
        mask[tied[:missing] if low_index_first else tied[tied.numel() - missing :]] = True
    return mask


# --- the trims of mergekit's task-arithmetic family ------------------------------------------------------------
def trim_count(numel: int, density: float) -> int:
    """Entries a TIES trim keeps: k = max(1, ⌊density·numel⌋) for 0 < density < 1, all for density ≥ 1, none for ≤ 0.

    The analysis counts sign conflicts after exactly this trim, so its preview and a TIES merge agree.
    """
    if density >= 1:
        return numel
    if density <= 0 or numel == 0:
        return 0
    return max(1, keep_count(numel, density))


def top_magnitude_mask(values: torch.Tensor, density: float, *, absolute: bool = False) -> torch.Tensor:
    """TIES' trim: the :func:`trim_count` entries of largest |τ|, ties lowest index first.

    ``absolute``: ``values`` already is |τ| in float32, so no copy is made.
    """
    k = trim_count(values.numel(), density)
    return select_extreme(_magnitudes(values, absolute), k, largest=True, low_index_first=True).reshape(values.shape)


def outlier_counts(numel: int, density: float, gamma: float) -> tuple[int, int]:
    """Model Breadcrumbs' (n_bot, n_top) for density < 1: with k = ⌊density·n⌋ kept, n_bot = max(0, n − k − ⌊γ·n⌋)
    smallest and n_top = n − n_bot − k largest entries dropped (fewer than ⌊γ·n⌋ outliers when k + ⌊γ·n⌋ > n)."""
    kept = keep_count(numel, density)
    n_bottom = max(0, numel - kept - int(gamma * numel))
    return n_bottom, numel - n_bottom - kept


def outlier_selections(numel: int, density: float, gamma: float, series: int = 0) -> list[magnitude_trim.Selection]:
    """Breadcrumbs' trim of series ``series`` as two selections, both ties highest index first: the kept band
    is the top n − n_bot (not among the n_bot smallest, lowest index dropped first) without the top n_top (the
    outliers, highest index dropped first) — :func:`~mergescope.merge.magnitude_trim.band_mask`."""
    n_bottom, n_top = outlier_counts(numel, density, gamma)
    return [magnitude_trim.Selection(series, numel - n_bottom, False), magnitude_trim.Selection(series, n_top, False)]


def outlier_band(magnitude: torch.Tensor, density: float, gamma: float) -> tuple[magnitude_trim.Cut, ...]:
    """Breadcrumbs' two cuts (:func:`outlier_selections`) over a whole float32 |τ| in memory."""
    return as_band(magnitude_trim.select_in_memory([magnitude], outlier_selections(magnitude.numel(), density, gamma)))


def as_band(cuts: list[tuple[torch.Tensor, int]]) -> tuple[magnitude_trim.Cut, ...]:
    """The answers of :func:`outlier_selections` (thresholds and tie cuts) as the band's two cuts."""
    return tuple(magnitude_trim.Cut(float(threshold), tie, False) for threshold, tie in cuts)


def outlier_mask(values: torch.Tensor, density: float, gamma: float, *, absolute: bool = False) -> torch.Tensor:
    """Model Breadcrumbs' trim: drop the largest outliers and the smallest entries, keep k = ⌊density·n⌋ between.

    With n_top = ⌊γ·n⌋ and n_bot = max(0, n − k − n_top), the kept entries are ranks n_bot … n_bot + k − 1 of
    the ascending order of |τ|: the n_bot smallest are dropped (ties: lowest index dropped first) and the
    n − n_bot − k largest (ties: highest index dropped first), i.e. exactly the slice a stable ascending sort
    gives (:func:`outlier_counts`; found as two cuts, :func:`outlier_band`). When k + n_top > n, fewer than
    n_top outliers are dropped so that k entries survive.
    For density ≥ 1 nothing is dropped, not even the outliers (mergekit returns the input unchanged).
    """
    import torch

    if density >= 1:
        return torch.ones_like(values, dtype=torch.bool)
    magnitude = _magnitudes(values, absolute)
    return magnitude_trim.band_mask(magnitude, *outlier_band(magnitude, density, gamma)).reshape(values.shape)


def bernoulli_mask(values: torch.Tensor, density: float, seed: int | None, model: int = 0,
                   first_entry: int = 0) -> torch.Tensor:
    """DARE's drop: a boolean mask shaped as ``values``, each entry kept independently with probability
    ``density``; ``values`` holds flat entries ``first_entry …`` of model ``model`` of a tensor whose draw seed is
    ``seed`` (the per-chunk draws of :mod:`~mergescope.merge.draws`)."""
    mask = draws.draw_keep_mask(density, first_entry, values.numel(), _need(seed, "DARE"), model, values.device)
    return mask.reshape(values.shape)


def della_probabilities(values: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's keep probabilities: p = (density − ε) + 2ε · r / (m − 1) for the entry of 0-based rank r among m.

    Ranks are by |τ| ascending along dim 1 — within each row of a matrix (along the second axis for higher
    ranks; a 1-D tensor is one row) — so the smallest entry of a row is kept with probability density − ε and
    the largest with density + ε. Equal magnitudes are ranked by index (a stable sort; this needs full ranks,
    so it is a per-row sort, not a selection). A row of one entry gets p = density (mergekit fails there:
    its 0/0 normalisation produces a NaN probability). A row's probabilities depend on that row only, so
    blocks of whole rows give the whole tensor's bits.
    """
    import torch

    rows = values.unsqueeze(0) if values.dim() < 2 else values
    length = rows.shape[1]
    order = torch.argsort(rows.abs().float(), dim=1, stable=True)
    ranks = torch.empty_like(order)
    positions = torch.arange(length, device=rows.device).reshape((1, length) + (1,) * (rows.dim() - 2))
    ranks.scatter_(1, order, positions.expand_as(order))
    if length > 1:
        rank_norm = ranks.float() / float(length - 1)
    else:
        rank_norm = torch.full(ranks.shape, 0.5, dtype=torch.float32, device=rows.device)
    return ((density - epsilon) + rank_norm * 2 * epsilon).reshape(values.shape)


def della_mask(values: torch.Tensor, density: float, epsilon: float, seed: int | None, model: int = 0,
               first_entry: int = 0) -> torch.Tensor:
    """DELLA's MagPrune drop: a boolean mask, entry kept with its :func:`della_probabilities` probability, drawn as
    :func:`bernoulli_mask` draws. ``values`` (τ or |τ|) holds whole rows: flat entries ``first_entry …``."""
    probabilities = della_probabilities(values, density, epsilon)
    mask = draws.draw_keep_mask(probabilities, first_entry, values.numel(), _need(seed, "DELLA"), model,
                                values.device)
    return mask.reshape(values.shape)


def _need(seed: int | None, what: str) -> int:
    if seed is None:
        raise ValueError(f"{what} draws random masks: pass a draw seed (the global RNG is never used)")
    return seed


#: a drop draws (and DELLA ranks) at most this many entries at once — whole rows for DELLA, one at least — cut
#: where the tensor's flat index is a multiple of it: temporaries stay small, and DARE's pieces start on chunks
PIECE_ENTRIES = 1 << 18


@dataclass(frozen=True)
class RandomDrop:
    """A random drop of model ``model`` of a tensor with draw seed ``seed``, as data: DARE's (each entry kept with
    probability ``density``) or, with ``epsilon``, DELLA's (:func:`della_probabilities` over rows of shape
    ``row_shape``). :meth:`keep` draws the mask of any block, so no whole-tensor mask need exist."""

    density: float
    seed: int
    model: int
    epsilon: float | None = None
    row_shape: tuple[int, ...] = ()

    @property
    def row_numel(self) -> int | None:
        """Entries of a row that a DELLA block must hold whole; None for DARE (any block)."""
        return None if self.epsilon is None else math.prod(self.row_shape)

    def keep(self, magnitude: torch.Tensor, first_entry: int) -> torch.Tensor:
        """Boolean keep mask of a block of |τ| (or τ) holding flat entries ``first_entry …``, drawn in pieces of
        :data:`PIECE_ENTRIES` (the same bits: draws are per chunk, DELLA's rows independent); for DELLA the block
        holds whole rows."""
        import torch

        row = self.row_numel or 1
        flat = magnitude.reshape(-1)
        numel = flat.numel()
        if self.epsilon is not None and (not self.row_shape or row == 0 or numel % row or first_entry % row):
            raise ValueError(f"DELLA ranks whole rows of {row} entries: block {first_entry}+{numel} cuts one")
        per = max(1, PIECE_ENTRIES // row) * row
        cuts = range(per - first_entry % per, numel, per)
        if not cuts:
            return self._piece(flat, first_entry).reshape(magnitude.shape)
        keep = torch.empty(numel, dtype=torch.bool, device=flat.device)
        for start, stop in zip([0, *cuts], [*cuts, numel]):
            keep[start:stop] = self._piece(flat[start:stop], first_entry + start)
        return keep.reshape(magnitude.shape)

    def _piece(self, flat: torch.Tensor, first_entry: int) -> torch.Tensor:
        if self.epsilon is None:
            return bernoulli_mask(flat, self.density, self.seed, self.model, first_entry)
        rows = flat.reshape(-1, *self.row_shape)
        return della_mask(rows, self.density, self.epsilon, self.seed, self.model, first_entry).reshape(-1)
