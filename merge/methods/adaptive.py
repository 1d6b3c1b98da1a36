"""Methods whose mixing coefficients come from the task vectors themselves: model_stock, sce.

model_stock (base + at least two models)
    With τᵢ = θᵢ − θ₀ (i = 1…N) and c the mean over all pairs i < j of cos(τᵢ, τⱼ) = ⟨τᵢ,τⱼ⟩ / max(‖τᵢ‖‖τⱼ‖, 1e-6)
    (each clamped to [−1, 1]), the interpolation ratio is t = N·c / (1 + (N−1)·c) and
    θ = t·θ̄ + (1 − t)·θ₀ with θ̄ = (1/N)Σθᵢ. Where |1 + (N−1)c| < 1e-6 there is no finite ratio and t = 0 (the
    base is kept). A negative c gives t < 0 (extrapolation away from the models), as in mergekit.
    ``filter_wise``: one c and t per vector along the last dimension (per row of a matrix; a 1-D tensor is one
    vector) instead of one for the whole tensor. Without it, ‖τᵢ‖ and ⟨τᵢ,τⱼ⟩ are reduced in float32 per chunk
    of 4096 entries, then over the chunks (‖τᵢ‖ as the norm of the chunks' norms), so a merge streamed in row
    blocks has the bits of a whole-tensor merge.

sce (base + models; ``select_topk``)
    τᵢ = θᵢ − θ₀ stacked. Select: if select_topk < 1, keep only the entries whose variance across the models
    (population variance, Var_i τᵢ) is among the k largest, k = ⌊(number of entries with nonzero variance) ·
    select_topk⌋ computed in float32 as mergekit does (ties at the threshold: lowest index first); the others
    are zeroed in every τᵢ. Calculate: wᵢ = mean(τᵢ²) / Σⱼ mean(τⱼ²) over the selected vectors (uniform 1/n when
    that sum is < 1e-6). Erase: TIES' sign election on the unweighted τᵢ (elected sign = sign of Σᵢτᵢ, + on 0).
    θ = θ₀ + Σ_{agreeing} wᵢτᵢ / max(Σ_{agreeing} wᵢ, 1e-6). ``int8_mask`` never changes the result. mean(τᵢ²)
    is Σ τᵢ² per chunk of 4096 entries in float32, summed over the chunks, over the entry count, so a merge
    streamed in row blocks has the bits of a whole-tensor merge. The kept entries are a threshold and a tie cut
    of the variance found by the streamed selection (:func:`~mergescope.merge.magnitude_trim.select_cuts`), so a
    merge from row blocks never holds a whole-tensor mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from mergescope.checkpoints.errors import MergescopeError
from mergescope.merge.magnitude_counts import BlockScores
from mergescope.merge.magnitude_trim import Cut, Selection, select_cuts, select_in_memory
from mergescope.merge.methods.chunks import STAT_CHUNK, SideBySide, chunk_norms, chunk_sums
from mergescope.merge.methods.task_arithmetic import elect_signs

# torch is imported inside the functions that use it: start-up cost (mergescope --help, the TUI's first screen)
if TYPE_CHECKING:  # pragma: no cover
    import torch




def _check_stock(base, models, options) -> None:
    if base is None:
        raise MergescopeError("model_stock needs a base_model: set base_model in the plan")
    if len(models) < 2:
        where = options.get("tensor_name") or "tensor"
        raise MergescopeError(f"{where}: model_stock needs at least two models besides the base, got {len(models)}")


def stock_terms(taus: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Per :data:`~.chunks.STAT_CHUNK`-entry chunk of the flat τᵢ (a block starting on a chunk, in float32): ‖τᵢ‖
    over the chunk ([N, chunks]) and ⟨τᵢ, τⱼ⟩ over the chunk for each pair i < j in order ([pairs, chunks]). A
    chunk's terms do not depend on the block it is in, so blocks give the whole tensor's terms side by side."""
    import torch

    norms = torch.stack([chunk_norms(tau) for tau in taus])
    dots = torch.stack([chunk_sums(first * second) for i, first in enumerate(taus) for second in taus[i + 1 :]])
    return norms, dots


def vector_terms(taus: list) -> tuple[torch.Tensor, torch.Tensor]:
    """``filter_wise``: ‖τᵢ‖ and ⟨τᵢ, τⱼ⟩ along the last dimension, one per vector ([N, vectors], [pairs,
    vectors]); the τᵢ are [vectors, length] (a row block of whole vectors gives its vectors' terms)."""
    import torch

    norms = torch.stack([torch.norm(tau, dim=-1) for tau in taus])
    dots = torch.stack([(first * second).sum(dim=-1) for i, first in enumerate(taus) for second in taus[i + 1 :]])
    return norms, dots


@dataclass
class StockRatio:
    """model_stock's whole-tensor part: the ratio t, one for the tensor ([1]) or one per vector of ``length``
    entries along the last dimension (``filter_wise``)."""

    ratio: torch.Tensor
    length: int = 0  # 0: one ratio for the whole tensor

    def block(self, start: int, stop: int) -> torch.Tensor:
        """The ratio of flat entries ``start:stop``, as a tensor that broadcasts against the flat block."""
        if not self.length:
            return self.ratio
        first, last = start // self.length, -(-stop // self.length)
        spread = self.ratio[first:last].repeat_interleave(self.length)
        return spread[start - first * self.length : stop - first * self.length]


def stock_ratio(norms, dots, count: int) -> torch.Tensor:
    """t = N·c̄ / (1 + (N−1)·c̄), one per column of the norms ([N, k]) and pairwise dots ([pairs, k], pairs
    i < j in order): c̄ the mean over pairs of ⟨τᵢ,τⱼ⟩ / max(‖τᵢ‖‖τⱼ‖, 1e-6) clamped to [−1, 1]; 0 where
    singular."""
    import torch

    pairs = [(i, j) for i in range(count) for j in range(i + 1, count)]
    cosines = [(dots[p] / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1) for p, (i, j) in enumerate(pairs)]
    cosine = torch.stack(cosines).mean(dim=0)
    denominator = 1 + (count - 1) * cosine
    singular = denominator.abs() < 1e-6
    return torch.where(singular, torch.zeros_like(cosine),
                       count * cosine / torch.where(singular, torch.ones_like(denominator), denominator))


def _whole(norms, dots):
    """The whole tensor's ‖τᵢ‖ (root of the sum of the chunks' squared norms) and ⟨τᵢ, τⱼ⟩ (sum of the chunks'
    dots) from per-chunk terms: one reduction over all chunks, so any split into blocks gives the same bits."""
    import torch

    return torch.linalg.vector_norm(norms, dim=-1, keepdim=True), dots.sum(dim=-1, keepdim=True)


def model_stock_prepare(base, models, params, options, seed=None) -> list[StockRatio]:
    """model_stock's ratio over whole tensors (any float dtype, taken as float32)."""
    _check_stock(base, models, options)
    count = len(models)
    base = base.float()
    if options.get("filter_wise", False) and base.dim() > 0:
        length = base.shape[-1] if base.dim() > 1 else 0  # a 1-D tensor is one vector: one ratio
        flat = base.reshape(-1, base.shape[-1]) if base.dim() > 1 else base.reshape(1, -1)
        taus = [m.float().reshape(flat.shape) - flat for m in models]
        return [StockRatio(stock_ratio(*vector_terms(taus), count).reshape(-1), length)]
    taus = [m.float().reshape(-1) - base.reshape(-1) for m in models]
    return [StockRatio(stock_ratio(*_whole(*stock_terms(taus)), count).reshape(-1))]


def model_stock_combine(base, models, ratios, params, options):
    """θ = t·mean(θᵢ) + (1 − t)·θ₀, entry by entry, in float32."""
    ratio = ratios[0]
    base = base.float()
    average = sum(m.float() for m in models) / len(models)
    return ratio * average + (1 - ratio) * base


def model_stock_stream_prepare(source, params, options, seed=None) -> list[StockRatio] | None:
    """:func:`model_stock_prepare` from one pass over a block source: each block's chunk terms (or, with
    ``filter_wise``, its vectors' terms) side by side, then one reduction — the same bits. None for a
    ``filter_wise`` 1-D tensor (one vector: no blocks), or a source without its tensor's shape."""

    count = len(params)
    if count < 2 or source.numel == 0:
        return None
    shape = getattr(source, "shape", None)
    filter_wise = options.get("filter_wise", False)
    if filter_wise and (shape is None or len(shape) < 2):
        return None
    norms, dots = SideBySide(), SideBySide()
    for _, base, models in source.blocks(list(range(count))):
        base = base.float()
        if filter_wise:
            flat = base.reshape(-1, shape[-1])
            terms = vector_terms([m.float().reshape(flat.shape) - flat for m in models])
        else:
            terms = stock_terms([m.float() - base for m in models])
        norms.append(terms[0])
        dots.append(terms[1])
    norms, dots = norms.cat(), dots.cat()
    if filter_wise:
        return [StockRatio(stock_ratio(norms, dots, count).reshape(-1), shape[-1])]
    return [StockRatio(stock_ratio(*_whole(norms, dots), count).reshape(-1))]


def model_stock(base, models, params, options, seed=None):
    """θ = t·mean(θᵢ) + (1 − t)·θ₀ with t = N·c̄ / (1 + (N−1)·c̄) from the mean pairwise cosine c̄ of the τᵢ."""
    ratios = model_stock_prepare(base, models, params, options)
    flat = model_stock_combine(base.reshape(-1), [m.reshape(-1) for m in models],
                               [ratio.block(0, base.numel()) for ratio in ratios], params, options)
    return flat.reshape(base.shape)


#: entries whose float64 variance terms are formed at once (2 MiB of temporaries)
_VARIANCE_SLICE = 1 << 16


def model_variance(taus: torch.Tensor) -> torch.Tensor:
    """Var_i τᵢ per entry (population variance across the models) of the stacked flat τ [n, entries], as +0 or
    more (−0 made +0: the score the variance selection counts on its bit pattern).

    Welford's update in float64, model by model — d = τᵢ − mean, mean += d / i, M2 += d·(τᵢ − mean) — then M2 / n
    rounded to float32: the bits of ``torch.var(taus, dim=0, unbiased=False)`` on a CPU (which accumulates so,
    one entry at a time), 3–10× faster vectorised, and the same on every device. Formed
    :data:`_VARIANCE_SLICE` entries at a time, so its float64 temporaries stay small.
    """
    import torch

    out = torch.empty(taus.shape[1:], dtype=torch.float32, device=taus.device)
    for start in range(0, taus.shape[1], _VARIANCE_SLICE):
        part = taus[:, start : start + _VARIANCE_SLICE]
        mean = torch.zeros(part.shape[1:], dtype=torch.float64, device=taus.device)
        square = torch.zeros_like(mean)
        for count, tau in enumerate(part, start=1):
            value = tau.double()
            delta = value - mean
            mean.add_(delta / count)
            square.add_(delta.mul_(value.sub_(mean)))
        out[start : start + _VARIANCE_SLICE] = square.div_(len(taus))
    return out.abs_()


def _variance_count(nonzero: int, fraction: float) -> int:
    """k = ⌊(entries with nonzero variance) · select_topk⌋, the product in float32 as mergekit forms it."""
    import torch

    return int(torch.tensor(nonzero, dtype=torch.int64) * fraction)


def _variance_cut(variance: torch.Tensor, fraction: float) -> Cut:
    """The entries whose variance is among the :func:`_variance_count` largest (ties lowest index first), as a
    cut over the whole flat variance: the selection the streamed path runs over blocks."""
    count = _variance_count(int(variance.count_nonzero()), fraction)
    threshold, tie = select_in_memory([variance], [Selection(0, count)])[0]
    return Cut(float(threshold), tie)


@dataclass
class SceWeights:
    """sce's whole-tensor part: each model's weight wᵢ ([n]) and, when select_topk < 1, the kept entries as a cut
    of the per-entry variance (flat index of the tensor or block it applies to)."""

    weights: torch.Tensor
    cut: Cut | None = None

    def block(self, start: int, stop: int) -> SceWeights:
        return self if self.cut is None else SceWeights(self.weights, self.cut.block(start))

    def select(self, taus: torch.Tensor) -> torch.Tensor:
        """The stacked flat τ [n, entries] of this block with the entries outside the cut zeroed."""
        if self.cut is None:
            return taus
        return taus * self.cut.mask(model_variance(taus)).to(taus.dtype).unsqueeze(0)


def _square_sums(taus) -> torch.Tensor:
    """Σ τᵢ² per :data:`~.chunks.STAT_CHUNK`-entry chunk of the flat stacked τ ([n, entries], a block starting on a
    chunk): [n, chunks]."""
    return chunk_sums(taus.square())


def _sce_weights(square_sums, numel: int) -> torch.Tensor:
    """wᵢ = mean(τᵢ²) / Σⱼ mean(τⱼ²) (uniform when that sum is < 1e-6), the means from the chunks' square sums."""
    import torch

    energy = square_sums.sum(dim=1) / max(numel, 1)
    total = torch.sum(energy).item()
    return torch.ones_like(energy) / len(energy) if abs(total) < 1e-6 else energy / total


def _stacked_taus(base, models):
    import torch

    base = base.float().reshape(-1)
    return torch.stack([m.float().reshape(-1) - base for m in models]), base


def sce_prepare(base, models, params, options, seed=None) -> list[SceWeights]:
    """sce's weights (and kept entries when select_topk < 1) over whole tensors (any float dtype, as float32)."""
    import torch

    if base is None:
        raise MergescopeError("sce needs a base_model: set base_model in the plan")
    taus, _ = _stacked_taus(base, models)
    fraction = float(options.get("select_topk", 1.0))
    trim = SceWeights(torch.empty(0))
    if fraction < 1:
        trim.cut = _variance_cut(model_variance(taus), fraction)
    trim.weights = _sce_weights(_square_sums(trim.select(taus)), taus.shape[1])
    return [trim]


def sce_combine(base, models, trims, params, options):
    """θ = θ₀ + Σ_{agreeing} wᵢτᵢ / max(Σ_{agreeing} wᵢ, 1e-6) entry by entry given the weights, in float32."""
    taus, base = _stacked_taus(base, models)
    trim = trims[0]
    taus = trim.select(taus)
    kept = trim.weights.reshape(-1, 1) * elect_signs(taus)
    return base + (taus * kept).sum(dim=0) / kept.sum(dim=0).clamp(min=1e-6)


def _variance_scores(start, base, models) -> list[torch.Tensor]:
    """The variance score of a block (:class:`~mergescope.merge.magnitude_counts.BlockScores`)."""
    return [model_variance(_stacked_taus(base, models)[0])]


def sce_stream_prepare(source, params, options, seed=None) -> list[SceWeights] | None:
    """:func:`sce_prepare` from passes over a block source: below select_topk 1, one pass counts the entries
    of nonzero variance and the streamed selection (:func:`~mergescope.merge.magnitude_trim.select_cuts`) finds
    the variance cut; then one pass takes each chunk's square sums of the selected τᵢ, reduced once."""
    import torch

    if not params or source.numel == 0:
        return None
    models = list(range(len(params)))
    fraction = float(options.get("select_topk", 1.0))
    trim = SceWeights(torch.empty(0))
    if fraction < 1:
        nonzero = sum(int(model_variance(_stacked_taus(base, blocks)[0]).count_nonzero())
                      for _, base, blocks in source.blocks(models))
        scores = BlockScores(source, models, _variance_scores,
                             elementwise=True)
        threshold, tie = select_cuts(scores, [Selection(0, _variance_count(nonzero, fraction))],
                                     gather_bytes=source.gather_bytes)[0]
        trim.cut = Cut(float(threshold), tie)
    # filled in place, not kept per block: see fusion_stream_prepare in selective.py
    sums = torch.empty((len(models), -(-source.numel // STAT_CHUNK)), dtype=torch.float32, device=source.device)
    for start, base, blocks in source.blocks(models):
        block = _square_sums(trim.block(start, start + base.numel()).select(_stacked_taus(base, blocks)[0]))
        sums[:, start // STAT_CHUNK : start // STAT_CHUNK + block.shape[1]] = block
    trim.weights = _sce_weights(sums, source.numel)
    return [trim]


def sce(base, models, params, options, seed=None):
    """Select by variance, Calculate weights from mean squares, Erase minority signs (see the module docstring)."""
    if base is None:
        raise MergescopeError("sce needs a base_model: set base_model in the plan")
    if not models:
        return base.clone()
    trims = sce_prepare(base, models, params, options)
    flat = sce_combine(base, models, [trim.block(0, base.numel()) for trim in trims], params, options)
    return flat.reshape(base.shape)
