"""TIES' magnitude trim as a threshold and a tie cut, found block by block.

The trim keeps the k = :func:`~mergescope.merge.sparsify.trim_count` entries of largest |τ|, ties at the
threshold taken lowest flat index first (as :func:`~mergescope.merge.sparsify.top_magnitude_mask`). Such a
set is described by two numbers:

* t, the k-th largest |τ| — the r-th smallest, r = n − k + 1 — and
* c, the flat index of the last entry equal to t that is kept,

and entry j is kept ⇔ |τⱼ| > t, or |τⱼ| = t and j ≤ c; as ties are taken lowest index first, that is
|τⱼ| ≥ t for j ≤ c and |τⱼ| > t for j > c (:func:`keep_mask`). With #{|τ| ≤ t} = L, the kept ties are the
m = L − r + 1 lowest-indexed entries equal to t, so c is the flat index of the m-th of them. Keeping (t, c)
instead of a mask lets a merge rebuild any block's mask from that block's τ: no full-size mask or float32
|τ| ever exists.

:func:`top_magnitude_cuts` finds (t, c) for every model of a tensor in one pass over blocks of τ
(:mod:`~mergescope.merge.magnitude_counts`): an evenly strided sample of |τ| brackets t (low ≤ t ≤ high
with a margin of a few standard errors of the sample rank); the pass counts the entries < low, ≤ low,
< high and ≤ high per chunk of 4096, which places t at low, at high, or strictly between (then the entries
strictly between are gathered with their indices, and ``kthvalue`` picks t among them). When t is low or
high, the per-chunk counts of entries equal to t find the chunk holding the m-th tie, and only that chunk
is formed again to find c. A failed bracket (t outside it) or a NaN falls back to the exact whole-tensor
selection (:func:`exact_cut`). Either way the result is the one a stable sort of −|τ| gives, on every
device; bf16 task vectors tie heavily (a fifth of a tensor can share the threshold value), so t usually
equals low or high and no entry is gathered at all.

|τ| is always |f32(model) − f32(base)|, one float32 subtraction, so the trim phase, the combine phase
and the whole-tensor merge see the same bits.
"""

from __future__ import annotations

import math
import struct
from typing import TYPE_CHECKING

from mergescope.merge import magnitude_counts as counting

# torch is imported inside the functions that use it: start-up cost (mergescope --help, the TUI's first screen)
if TYPE_CHECKING:  # pragma: no cover
    import torch

#: tensors up to this many entries are selected exactly at once
EXACT_UP_TO = 1 << 18
#: bracket half-width in sample ranks: MARGIN_SE standard errors plus MARGIN_MIN
MARGIN_SE = 4.0
MARGIN_MIN = 8

abs_task_vector = counting.abs_task_vector


def keep_mask(magnitude: torch.Tensor, threshold: torch.Tensor, last_tie: int) -> torch.Tensor:
    """Boolean mask of the kept entries of a block of |τ| whose first entry has flat index 0.

    keep ⇔ |τⱼ| > t, or |τⱼ| = t and j ≤ c: |τⱼ| ≥ t on j ≤ c and |τⱼ| > t on j > c (c = ``last_tie``).
    """
    import torch

    flat = magnitude.reshape(-1)
    numel = flat.numel()
    if last_tie < 0:
        keep = flat > threshold
    elif last_tie >= numel - 1:
        keep = flat >= threshold
    else:
        keep = torch.empty(numel, dtype=torch.bool, device=flat.device)
        torch.ge(flat[: last_tie + 1], threshold, out=keep[: last_tie + 1])
        torch.gt(flat[last_tie + 1 :], threshold, out=keep[last_tie + 1 :])
    return keep.reshape(magnitude.shape)


def float32_bits(value: float) -> int:
    """The int32 bit pattern of ``value`` as a float32 (exact for a value read from a float32 tensor)."""
    return struct.unpack("<i", struct.pack("<f", value))[0]


def apply_cut_(tau: torch.Tensor, threshold: float, last_tie: int) -> torch.Tensor:
    """τ ⊙ m in place, for the float32 τ of a block and the trim (t, c): dropped entries become ±0 (τ·0, the
    sign kept), kept ones are left as they are — the bits of ``tau.mul_(keep_mask(|τ|, t, c))``.

    On the bit patterns: entry j is kept ⇔ bits(|τⱼ|) − b ≥ 0 with b = bits(t) for j ≤ c and bits(t) + 1 for
    j > c (|τ| > t ⇔ |τ| ≥ the next float32 after t); ((bits(|τ|) − b) >> 31) & 0x7FFFFFFF, inverted, is all
    ones for a kept entry and the sign bit alone for a dropped one, and τ's bits are ANDed with it. A NaN
    τ, never kept by the mask, stays NaN here too (τ·0 is NaN). t = ∞ or NaN (nothing kept; an infinite τ
    times 0 is NaN) multiplies by the mask itself.
    """
    import torch

    if not math.isfinite(threshold):
        keep = keep_mask(tau.abs(), torch.tensor(threshold, dtype=torch.float32, device=tau.device), last_tie)
        return tau.mul_(keep)
    bits = tau.view(torch.int32).reshape(-1)
    word = torch.bitwise_and(bits, 0x7FFFFFFF)  # bits of |τ|
    split = min(max(last_tie + 1, 0), word.numel())
    bound = float32_bits(threshold)
    word[:split].sub_(bound)
    word[split:].sub_(bound + 1)
    word.bitwise_right_shift_(31).bitwise_and_(0x7FFFFFFF).bitwise_not_()
    bits.bitwise_and_(word)
    return tau


def exact_cut(magnitude: torch.Tensor, count: int) -> tuple[torch.Tensor, int]:
    """(t, c) over a whole flat |τ|: t = ``kthvalue`` of rank r = n − count + 1, c the index of the m-th entry
    equal to t, m = count − #{|τ| > t}. ``count`` = 0 gives (+∞, −1): nothing kept.

    NaNs rank above everything in ``kthvalue`` but are never kept (a NaN is not > t); when they leave fewer
    than m ties, all ties are kept, as :func:`~mergescope.merge.sparsify.select_extreme` does.
    """
    import torch

    numel = magnitude.numel()
    if count <= 0:
        return torch.tensor(float("inf"), device=magnitude.device), -1
    threshold = magnitude.kthvalue(numel - count + 1).values
    if bool(threshold.isnan()):  # NaNs fill the top ranks: no entry is > NaN or = NaN
        return torch.tensor(float("inf"), device=magnitude.device), -1
    missing = count - int(torch.count_nonzero(magnitude > threshold))
    tied = (magnitude == threshold).nonzero().reshape(-1)
    return threshold, int(tied[min(missing, tied.numel()) - 1]) if tied.numel() else -1


def bracket_ranks(rank: int, numel: int, size: int) -> tuple[int, int]:
    """1-based ranks in a sample of ``size`` evenly strided entries that bracket the rank-th smallest of
    ``numel``: its expected sample rank ± (MARGIN_SE · √size + MARGIN_MIN), clipped to the sample."""
    position = rank / numel * size
    margin = MARGIN_SE * size**0.5 + MARGIN_MIN
    return min(size, max(1, int(position - margin))), max(1, min(size, int(position + margin) + 1))


def sample_size(numel: int) -> int:
    """Entries in the bracket's sample: (2n)^⅔ within [2¹², 2²⁰]. Selecting in the sample costs ~s and the
    entries gathered between low and high (when t is not tied) ~n/√s; (2n)^⅔ balances the two, and keeps
    what is gathered from an embedding of 525M entries near 0.8 % of it (2¹⁶ would gather 3 %)."""
    return min(1 << 20, max(1 << 12, int((2 * numel) ** (2 / 3))))


def sample_step(numel: int) -> int:
    """The stride of the bracket's sample: flat entries 0, step, 2·step, … of |τ|."""
    return numel // sample_size(numel)


def strided_samples(source: counting.FlatBlocks, models: list[int], step: int) -> list[torch.Tensor]:
    """|τ| at flat entries 0, step, 2·step, … of each of ``models``, from one pass over the source's blocks:
    the bits of ``abs_task_vector(model[::step], base[::step])``."""
    import torch

    parts: list[list] = [[] for _ in models]
    for start, base, blocks in source.blocks(models):
        first = -start % step
        picked = base[first::step]
        for part, block in zip(parts, blocks):
            part.append(abs_task_vector(block[first::step], picked))
    return [torch.cat(part) for part in parts]


def _bracket(sample: torch.Tensor, numel: int, rank: int) -> counting.Bracket | None:
    """[low, high] from the strided sample, gathering when t is expected strictly between them (the sample's
    own estimate of t, its entry at the expected rank, is); None when the sample brackets a NaN."""
    size = sample.numel()
    lo_rank, hi_rank = bracket_ranks(rank, numel, size)
    low, high = sample.kthvalue(lo_rank).values, sample.kthvalue(hi_rank).values
    if bool(low.isnan()) or bool(high.isnan()):
        return None
    if low == high:
        return counting.Bracket(low, high, False)
    estimate = sample.kthvalue(min(size, max(1, round(rank / numel * size)))).values
    return counting.Bracket(low, high, bool(low < estimate < high))


def top_magnitude_cuts(
    base: torch.Tensor, models: list[torch.Tensor], counts: list[int], *, block: int | None = None
) -> list[tuple[torch.Tensor, int]]:
    """(t, c) of TIES' trim of each τ = model − base keeping ``counts[i]`` entries (module docstring), all
    from one pass over the tensors in blocks; the same answers as :func:`exact_cut` on each whole |τ|."""
    block = block or counting.block_size(base.device)
    return streamed_magnitude_cuts(counting.TensorBlocks(base, models, block), counts, block=block)


def streamed_magnitude_cuts(
    source: counting.FlatBlocks, counts: list[int], *, block: int | None = None, gather_bytes: int | None = None
) -> list[tuple[torch.Tensor, int]]:
    """:func:`top_magnitude_cuts` over a :class:`~.magnitude_counts.FlatBlocks` source (model i is source
    model i): a pass for the strided samples, a counting pass, and a look at one chunk per model for the tie
    cut; a whole model is formed only on the rare exact fallback (a NaN, t outside its bracket) or for a
    tensor of at most :data:`EXACT_UP_TO` entries. The bits of :func:`top_magnitude_cuts` on the whole
    tensors. ``gather_bytes`` caps what the counting pass gathers between the brackets of all models together
    (values and indices, expected from the sample); a model past the cap is gathered in a pass of its own."""
    import torch

    numel, device = source.numel, source.device
    block = block or counting.block_size(device)
    cuts: list[tuple[torch.Tensor, int] | None] = [None] * len(counts)
    sampled = [i for i, count in enumerate(counts) if 0 < count and numel > EXACT_UP_TO]
    samples = dict(zip(sampled, strided_samples(source, sampled, sample_step(numel)))) if sampled else {}
    pending: list[tuple[int, int, counting.Bracket]] = []  # (model, rank of t, bracket)
    allowance = gather_bytes
    for index, count in enumerate(counts):
        rank = numel - count + 1  # t is the rank-th smallest |τ|
        bracket = _bracket(samples[index], numel, rank) if index in samples else None
        if bracket is not None and bracket.gather and gather_bytes is not None:
            expected = _between_bytes(samples[index].numel(), numel, rank)
            if expected > allowance:  # gathered later, alone, in its own pass (see _cut)
                bracket = counting.Bracket(bracket.low, bracket.high, False)
            else:
                allowance -= expected
        if count <= 0:
            cuts[index] = (torch.tensor(float("inf"), device=device), -1)  # nothing kept
        elif bracket is None:
            cuts[index] = exact_cut(_whole_magnitude(source, index), count)
        else:
            pending.append((index, rank, bracket))
    samples.clear()
    tallies = counting.tally(source, [index for index, _, _ in pending], [b for _, _, b in pending], block)
    for (index, _, bracket), tally in zip(pending, tallies):
        cuts[index] = _cut(source, index, counts[index], bracket, tally, block)
    return cuts  # type: ignore[return-value]


def _between_bytes(size: int, numel: int, rank: int) -> int:
    """Expected bytes gathered strictly inside a model's bracket: its share of the sample's ranks × numel, at
    4 bytes of value and 8 of index each."""
    low, high = bracket_ranks(rank, numel, size)
    return int((high - low + 1) / size * numel * 12)


def _whole_magnitude(source: counting.FlatBlocks, model: int) -> torch.Tensor:
    """|τ| of a whole model, float32: only for the exact fallback."""
    return abs_task_vector(source.span(model, 0, source.numel), source.span(None, 0, source.numel))


def _cut(
    source: counting.FlatBlocks, model: int, count: int, bracket: counting.Bracket, tally: counting.Tally, block: int
) -> tuple[torch.Tensor, int]:
    """(t, c) from a model's tally: t at low, at high, or selected among the entries strictly between (a
    second pass gathers them when the first did not); the exact selection when t is outside the bracket."""
    import torch

    rank = source.numel - count + 1
    below_low, at_most_low, below_high, at_most_high = tally.totals
    if not tally.nan_free or not below_low < rank <= at_most_high:
        return exact_cut(_whole_magnitude(source, model), count)  # a NaN, or t outside the bracket
    if rank <= at_most_low:
        threshold, at_most, ties = bracket.low, at_most_low, tally.ties(0)
    elif rank > below_high:
        threshold, at_most, ties = bracket.high, at_most_high, tally.ties(2)
    else:  # strictly between: select among the entries there
        if tally.between is None:
            gathering = counting.Bracket(bracket.low, bracket.high, True)
            tally = counting.tally(source, [model], [gathering], block)[0]
        values, positions = tally.between
        threshold = values.kthvalue(rank - at_most_low).values
        at_most = at_most_low + int(torch.count_nonzero(values <= threshold))
        return threshold, int(positions[values == threshold][at_most - rank])
    # the kept ties are the m = #{|τ| ≤ t} − (r − 1) lowest-indexed entries equal to t
    return threshold, counting.nth_tie(source, model, threshold, ties, at_most - rank + 1)
