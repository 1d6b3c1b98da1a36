"""Methods that choose, entry by entry, which fine-tune's change to keep: ``ram``, ``ramplus_tl``, ``arcee_fusion``.

**RAM** (Reinforced Agent Merging). With τᵢ = θᵢ − θ₀, an entry *counts* for model i when |τᵢ| > ε; c is the
number of models that count there. Where exactly one model counts, its change is kept whole; where several
do, their changes are averaged (Σ τᵢ / c over those that count); entries where none counts keep θ₀::

    θ = θ₀ + Σᵢ τᵢ·[|τᵢ| > ε]·([c = 1] + [c > 1] / max(c, 1))

**RAM+ (tensor-local)** additionally boosts each model's unique entries by λᵢ = 1 + r·clip(ρᵢ, 0, α), with
ρᵢ = (#entries where model i counts and c > 1) / max(#entries where it counts alone, ε), counted over the
tensor. Parameters (method-level): ``epsilon`` (1e-5), and for RAM+ ``r`` (0.1) and ``alpha`` (0.2). The counts
are integers, so a pass over row blocks (:func:`ramplus_stream_prepare`) finds the same λᵢ.

**Arcee Fusion** keeps the other model's change only where it is important: importance = |θ − θ₀| · KL(p ‖ q)
with p = softmax(θ) + 1e-8 and q = softmax(θ₀) + 1e-8 along the last dimension (one KL per row). The
threshold is median + 1.5·(Q3 − Q1) of the importances, where the quantile at q is the order statistic at
index ⌊q·(n − 1)⌋ (q·(n − 1) formed in float32, as mergekit does); entries at or above it take θ, the rest θ₀.
mergekit estimates the quantiles from a random sample of one million entries for larger tensors; mergescope
computes them exactly by selection on every tensor, so results agree exactly up to a million entries and
are deterministic beyond. A large tensor streams: one pass over row blocks takes each row's KL, then the
streamed selection (:func:`~mergescope.merge.magnitude_trim.select_cuts`, counting by float comparisons as an
importance may be slightly negative from rounding) finds the three order statistics, and the merge runs
block by block given the rows' KL and the threshold — the bits of the whole-tensor merge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from mergescope.checkpoints.errors import MergescopeError
from mergescope.merge.magnitude_counts import BlockScores, TensorScores, block_size
from mergescope.merge.magnitude_trim import Selection, select_cuts

# torch is imported inside the functions that use it: start-up cost (mergescope --help, the TUI's first screen)
if TYPE_CHECKING:  # pragma: no cover
    import torch


def _counting(base: torch.Tensor, models: list[torch.Tensor], epsilon: float):
    """τ as an (n, numel) matrix with non-counting entries zeroed, the counting mask, and c per entry."""
    import torch

    taus = torch.stack([model - base for model in models]).reshape(len(models), -1)
    counts_mask = taus.abs() > epsilon
    contributors = counts_mask.sum(dim=0, keepdim=True)
    return taus * counts_mask, counts_mask, contributors


def _check_ram(base) -> None:
    if base is None:
        raise MergescopeError("ram needs a base_model: set base_model in the plan")


def overlap_counts(base, models: list, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per model (int64 [n]): #entries where it counts and c > 1, #entries where it counts alone — over the
    given entries (any float dtype, taken as float32); counts of blocks add up to the tensor's exactly."""
    base = base.float()
    _, counts_mask, contributors = _counting(base, [m.float() for m in models], epsilon)
    alone, shared = contributors == 1, contributors > 1
    return (counts_mask & shared).sum(dim=1), (counts_mask & alone).sum(dim=1)


@dataclass
class RamBoost:
    """RAM+'s whole-tensor part: each model's boost λᵢ of its unique changes ([n])."""

    factor: torch.Tensor

    def block(self, start: int, stop: int) -> RamBoost:
        return self


def ram_boost(shared_count, alone_count, options: dict) -> RamBoost:
    """λᵢ = 1 + r·clip(ρᵢ, 0, α) with ρᵢ = shared_countᵢ / max(alone_countᵢ, ε)."""
    epsilon = float(options.get("epsilon", 1e-5))
    rho = shared_count / alone_count.clamp(min=epsilon)
    return RamBoost(1 + float(options.get("r", 0.1)) * rho.clamp(min=0, max=float(options.get("alpha", 0.2))))


def _ram(base, models, options, boost: RamBoost | None) -> torch.Tensor:
    """θ₀ + Σᵢ τᵢ·[|τᵢ| > ε]·([c = 1]·λᵢ + [c > 1] / max(c, 1)) (λᵢ = 1 without a boost), in float32."""
    base = base.float()
    taus, counts_mask, contributors = _counting(base, [m.float() for m in models], float(options.get("epsilon", 1e-5)))
    alone, shared = contributors == 1, contributors > 1
    unique_part = taus * alone
    if boost is not None:
        unique_part = unique_part * boost.factor.unsqueeze(-1)
    merged = (unique_part + taus * shared / contributors.clamp(min=1)).sum(dim=0, keepdim=True)
    return base + merged.reshape(base.shape)


def ram(base, models, params, options, seed=None) -> torch.Tensor:
    """RAM: unique changes kept whole, overlapping ones averaged over the models that made them."""
    _check_ram(base)
    return _ram(base, models, options, None) if models else base.clone()


def ramplus_prepare(base, models, params, options, seed=None) -> list[RamBoost]:
    """RAM+'s boosts from the overlap counts over whole tensors."""
    _check_ram(base)
    return [ram_boost(*overlap_counts(base, models, float(options.get("epsilon", 1e-5))), options)]


def ramplus_combine(base, models, boosts, params, options) -> torch.Tensor:
    """RAM with the given boosts, entry by entry."""
    return _ram(base, models, options, boosts[0])


def ramplus_stream_prepare(source, params, options, seed=None) -> list[RamBoost] | None:
    """:func:`ramplus_prepare` from one pass over a block source: the blocks' overlap counts added (exact)."""
    if not params or source.numel == 0:
        return None
    epsilon = float(options.get("epsilon", 1e-5))
    counts = None  # added in place: a new total per block, kept across it, would fragment the heap
    for _, base, models in source.blocks(list(range(len(params)))):
        block = overlap_counts(base, models, epsilon)
        if counts is None:
            counts = block
        else:
            for total, part in zip(counts, block):
                total += part
    return [ram_boost(*counts, options)]


def ramplus_tl(base, models, params, options, seed=None) -> torch.Tensor:
    """RAM+ (tensor-local): RAM with each model's unique changes boosted by 1 + r·clip(ρᵢ, 0, α)."""
    _check_ram(base)
    if not models:
        return base.clone()
    return ramplus_combine(base, models, ramplus_prepare(base, models, params, options), params, options)


def _quantile_rank(numel: int, q: float) -> int:
    """The 1-based rank of mergekit's q-quantile among ``numel`` entries: index ⌊q·(n − 1)⌋ + 1, the product
    formed in float32."""
    import torch

    return int((torch.tensor(q, dtype=torch.float32) * (numel - 1)).long()) + 1


def _check_fusion(base, models) -> None:
    if base is None or len(models) != 1:
        raise MergescopeError("arcee_fusion merges exactly one model into its base_model")


def row_divergence(base, model) -> torch.Tensor:
    """KL(p ‖ q) of each vector along the last dimension (one per row; a 1-D tensor is one row), p = softmax(θ)
    + 1e-8 and q = softmax(θ₀) + 1e-8, in float32 from inputs of any float dtype: [rows]. A row's value depends
    on that row only, so row blocks give the whole tensor's values side by side."""
    import torch

    p = torch.softmax(model.float(), dim=-1) + 1e-8
    q = torch.softmax(base.float(), dim=-1) + 1e-8
    return torch.sum(p * torch.log(p / q), dim=-1).reshape(-1)


@dataclass
class FusionThreshold:
    """arcee_fusion's whole-tensor part: each row's KL divergence ([rows], rows of ``length`` entries) and the
    importance threshold T = median + 1.5·(Q3 − Q1)."""

    divergence: torch.Tensor
    length: int
    threshold: torch.Tensor | None = None

    def block(self, start: int, stop: int) -> FusionThreshold:
        """The same threshold with the KL of each of flat entries ``start:stop`` (one per entry)."""
        first, last = start // self.length, -(-stop // self.length)
        spread = self.divergence[first:last].repeat_interleave(self.length)
        return FusionThreshold(spread[start - first * self.length : stop - first * self.length], 1, self.threshold)

    def importance(self, start: int, base, model) -> torch.Tensor:
        """|θ − θ₀|·KL of the row for flat entries ``start:`` (base and model blocks, any float dtype)."""
        spread = self.block(start, start + base.numel()).divergence
        return (model.float().reshape(-1) - base.float().reshape(-1)).abs() * spread


def _fusion_threshold(fusion: FusionThreshold, scores) -> FusionThreshold:
    """T from the three quantiles of the importance (``scores``, a score source), each an order statistic
    found by the streamed selection; the arithmetic in float32 as mergekit's."""
    import torch

    selections = [Selection(0, scores.numel - _quantile_rank(scores.numel, level) + 1) for level in (0.25, 0.5, 0.75)]
    q1, median, q3 = (torch.tensor(float(t), dtype=torch.float32) for t, _ in
                      select_cuts(scores, selections, gather_bytes=scores.gather_bytes))
    fusion.threshold = median + 1.5 * (q3 - q1)
    return fusion


def fusion_prepare(base, models, params, options, generator=None) -> list[FusionThreshold]:
    """arcee_fusion's row divergences and threshold over whole tensors (any float dtype, as float32)."""
    _check_fusion(base, models)
    length = max(base.shape[-1], 1) if base.dim() else 1
    fusion = FusionThreshold(row_divergence(base, models[0]), length)
    importance = fusion.importance(0, base, models[0])
    return [_fusion_threshold(fusion, TensorScores([importance], block_size(importance.device), signed=True))]


def fusion_stream_prepare(source, params, options, generator=None) -> list[FusionThreshold] | None:
    """:func:`fusion_prepare` from passes over a block source of whole rows: one for each row's divergence, then
    the streamed selection of the three quantiles over the importance. None for a 1-D tensor (one row)."""
    import torch

    shape = getattr(source, "shape", None)
    if len(params) != 1 or shape is None or len(shape) < 2 or source.numel == 0:
        return None
    length = shape[-1]
    # filled in place: a small result kept per block between the blocks' freed temporaries would fragment the
    # heap (the executor lets glibc keep freed memory), growing it by about a block per block
    divergence = torch.empty(source.numel // length, dtype=torch.float32, device=source.device)
    for start, base, blocks in source.blocks([0]):
        rows = base.numel() // length
        divergence[start // length : start // length + rows] = row_divergence(base.reshape(rows, length),
                                                                            blocks[0].reshape(rows, length))
    fusion = FusionThreshold(divergence, length)
    scores = BlockScores(source, [0], lambda start, base, blocks: [fusion.importance(start, base, blocks[0])],
                         signed=True)
    return [_fusion_threshold(fusion, scores)]


def fusion_combine(base, models, trims, params, options) -> torch.Tensor:
    """θ₀ + (θ − θ₀)·[|θ − θ₀|·KL ≥ T] entry by entry, given the block's KL per entry and T, in float32."""
    fusion = trims[0]
    base, model = base.float(), models[0].float()
    importance = (model - base).abs() * fusion.divergence.reshape(base.shape)
    keep = (importance >= fusion.threshold).float()
    return base + (model - base) * keep


def arcee_fusion(base, models, params, options, seed=None) -> torch.Tensor:
    """θ₀ + (θ − θ₀)·[importance ≥ median + 1.5·IQR], importance = |θ − θ₀|·KL(softmax θ ‖ softmax θ₀).

    The softmax, log and sum round their last bits differently on a GPU, so an entry whose importance lies
    at the threshold can be kept on one device and not on another (a few entries per tensor); every entry
    is still exactly θ₀ or θ.
    """
    _check_fusion(base, models)
    fusion = fusion_prepare(base, models, params, options)[0]
    flat = fusion_combine(base.reshape(-1), [models[0].reshape(-1)], [fusion.block(0, base.numel())], params, options)
    return flat.reshape(base.shape)
