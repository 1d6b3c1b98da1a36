"""Streamed selection: the top ``count`` entries of a per-entry score as a threshold and a tie cut, found
block by block. TIES' magnitude trim is its first user (the score |τ| of each model); Breadcrumbs' two cuts,
sce's variance top-k and arcee_fusion's quantiles are the others.

The selection keeps the ``count`` entries of largest score, ties at the threshold taken lowest flat index first
(``low_first``, as :func:`~mergescope.merge.sparsify.top_magnitude_mask`) or highest index first. Such a set is
described by two numbers:

* t, the count-th largest score — the r-th smallest, r = n − count + 1 — and
* c, the flat index of the last (lowest-first) or first (highest-first) entry equal to t that is kept,

and entry j is kept ⇔ sⱼ > t, or sⱼ = t and j ≤ c (lowest first) / j ≥ c (highest first)
(:func:`keep_mask`). With #{s < t} = B, #{s ≤ t} = L, the kept ties are m = L − r + 1 of the L − B entries
equal to t: the m lowest-indexed (c the m-th of them) or the m highest-indexed (c the (L − B − m + 1)-th).
Lowest first is the top of a stable sort of −s; highest first is the top of a stable ascending sort of s, so
the entries at ranks p … q − 1 of a stable ascending sort are the highest-first top n − p without the
highest-first top n − q (Breadcrumbs). Keeping (t, c) instead of a mask lets a merge rebuild any block's mask
from that block's scores: no full-size mask or score ever exists. A quantile is the threshold t alone.

:func:`select_cuts` finds (t, c) for every selection over a score source
(:class:`~mergescope.merge.magnitude_counts.Scores`) in one counting pass (:mod:`~.magnitude_counts`): an
evenly strided sample of each series brackets t (low ≤ t ≤ high with a margin of a few standard errors of
the sample rank); the pass counts the entries < low, ≤ low, < high and ≤ high per chunk of 4096, which places
t at low, at high, or strictly between (then the entries strictly between are gathered with their indices,
and ``kthvalue`` picks t among them). When t is low or high, the per-chunk counts of entries equal to t find
the chunk holding the tie cut, and only that chunk is formed again to find c. A failed bracket (t outside
it) or a NaN falls back to the exact whole-series selection (:func:`exact_cut`). Either way the result is
the one a stable sort gives, on every device, and the whole-tensor path runs the same code over scores in
memory (:class:`~.magnitude_counts.TensorScores`); bf16 task vectors tie heavily (a fifth of a tensor can
share the threshold value), so t usually equals low or high and no entry is gathered at all.

|τ| is always |f32(model) − f32(base)|, one float32 subtraction, so the trim phase, the combine phase
and the whole-tensor merge see the same bits.
"""

from __future__ import annotations

import math
import struct
from typing import TYPE_CHECKING, NamedTuple

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


class Selection(NamedTuple):
    """The ``count`` largest scores of series ``series``, ties taken lowest index first (``low_first``) or
    highest index first."""

    series: int
    count: int
    low_first: bool = True


class Cut(NamedTuple):
    """A selection's answer as a trim keeps it: threshold t, tie cut c (flat index of the tensor or block it
    applies to) and the tie order (:func:`keep_mask`)."""

    threshold: float
    tie: int
    low_first: bool = True

    def block(self, start: int) -> Cut:
        """The same cut for a block whose first entry is flat entry ``start``."""
        return Cut(self.threshold, self.tie - start, self.low_first)

    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        """The entries of a block of scores (first entry at index 0) this cut keeps."""
        return keep_mask(scores, self.threshold, self.tie, self.low_first)


def band_mask(scores: torch.Tensor, above: Cut, top: Cut) -> torch.Tensor:
    """The entries kept by ``above`` and not by ``top``: with both highest first, the stable ascending ranks
    n − count(above) … n − count(top) − 1 (Breadcrumbs' kept band)."""
    return above.mask(scores).logical_and_(top.mask(scores).logical_not_())


def keep_mask(scores: torch.Tensor, threshold: torch.Tensor | float, tie: int, low_first: bool = True) -> torch.Tensor:
    """Boolean mask of the kept entries of a block of scores whose first entry has flat index 0.

    keep ⇔ sⱼ > t, or sⱼ = t and j ≤ c (``low_first``) / j ≥ c: with lowest first sⱼ ≥ t on j ≤ c and sⱼ > t
    on j > c; with highest first sⱼ > t on j < c and sⱼ ≥ t on j ≥ c (c = ``tie``).
    """
    import torch

    flat = scores.reshape(-1)
    numel = flat.numel()
    split = min(max(tie + 1 if low_first else tie, 0), numel)  # entries before split compare one way
    first, second = (torch.ge, torch.gt) if low_first else (torch.gt, torch.ge)
    if split == 0:
        keep = second(flat, threshold)
    elif split == numel:
        keep = first(flat, threshold)
    else:
        keep = torch.empty(numel, dtype=torch.bool, device=flat.device)
        first(flat[:split], threshold, out=keep[:split])
        second(flat[split:], threshold, out=keep[split:])
    return keep.reshape(scores.shape)


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


def exact_cut(scores: torch.Tensor, count: int, low_first: bool = True) -> tuple[torch.Tensor, int]:
    """(t, c) over a whole flat series of scores: t = ``kthvalue`` of rank r = n − count + 1, c the index of the
    m-th entry equal to t (lowest first) or of the (ties − m + 1)-th (highest first), m = count − #{s > t}.
    ``count`` ≤ 0 keeps nothing, ``count`` ≥ n everything (:func:`_nothing`, :func:`_everything`).

    NaNs rank above everything in ``kthvalue`` but are never kept (a NaN is not > t); when they leave fewer
    than m ties, all ties are kept, as :func:`~mergescope.merge.sparsify.select_extreme` does.
    """
    import torch

    numel = scores.numel()
    if count <= 0:
        return _nothing(numel, low_first, scores.device)
    if count >= numel:
        return _everything(numel, low_first, scores.device)
    threshold = scores.kthvalue(numel - count + 1).values
    if bool(threshold.isnan()):  # NaNs fill the top ranks: no entry is > NaN or = NaN
        return _nothing(numel, low_first, scores.device)
    missing = count - int(torch.count_nonzero(scores > threshold))
    tied = (scores == threshold).nonzero().reshape(-1)
    if not tied.numel():
        return threshold, -1 if low_first else numel
    kept = min(missing, tied.numel())
    return threshold, int(tied[kept - 1] if low_first else tied[tied.numel() - kept])


def _nothing(numel: int, low_first: bool, device) -> tuple[torch.Tensor, int]:
    """The cut that keeps no entry: t = +∞ and no tie taken."""
    import torch

    return torch.tensor(float("inf"), device=device), -1 if low_first else numel


def _everything(numel: int, low_first: bool, device) -> tuple[torch.Tensor, int]:
    """The cut that keeps every entry but NaNs: t = −∞ and every tie taken."""
    import torch

    return torch.tensor(float("-inf"), device=device), numel - 1 if low_first else 0


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
    """(t, c) of TIES' trim of each τ = model − base keeping ``counts[i]`` entries (ties lowest index first), all
    from one pass over the tensors in blocks; the same answers as :func:`exact_cut` on each whole |τ|."""
    block = block or counting.block_size(base.device)
    return streamed_magnitude_cuts(counting.TensorBlocks(base, models, block), counts, block=block)


def streamed_magnitude_cuts(
    source: counting.FlatBlocks, counts: list[int], *, block: int | None = None, gather_bytes: int | None = None
) -> list[tuple[torch.Tensor, int]]:
    """:func:`top_magnitude_cuts` over a :class:`~.magnitude_counts.FlatBlocks` source (model i is source
    model i): :func:`select_cuts` on |τᵢ|, ties lowest index first."""
    selections = [Selection(index, count) for index, count in enumerate(counts)]
    return select_cuts(counting.TaskMagnitudes(source), selections, block=block, gather_bytes=gather_bytes)


def select_in_memory(
    scores: list[torch.Tensor], selections: list[Selection], *, signed: bool = False
) -> list[tuple[torch.Tensor, int]]:
    """:func:`select_cuts` over whole score tensors in memory (series i is ``scores[i]``, any shape, float32):
    the whole-tensor path of a streamed selection, the same code and answers."""
    import torch

    block = counting.block_size(scores[0].device)
    signed = signed or scores[0].dtype != torch.float32  # float64 scores: counted by comparisons
    return select_cuts(counting.TensorScores(scores, block, signed=signed), selections, block=block)


def select_cuts(
    scores: counting.Scores, selections: list[Selection], *, block: int | None = None,
    gather_bytes: int | None = None,
) -> list[tuple[torch.Tensor, int]]:
    """(t, c) of every selection (module docstring) over a :class:`~.magnitude_counts.Scores` source: a pass
    for the strided samples of the series, one counting pass for all selections, and a look at one chunk per
    selection for the tie cut; a whole series is formed only on the rare exact fallback (a NaN, t outside its
    bracket) or for a tensor of at most :data:`EXACT_UP_TO` entries. ``gather_bytes`` caps what the counting
    pass gathers between the brackets of all selections together (values and indices, expected from the
    sample); a selection past the cap is gathered in a pass of its own."""
    numel, device = scores.numel, scores.device
    block = block or counting.block_size(device)
    cuts: list[tuple[torch.Tensor, int] | None] = [None] * len(selections)
    sampled = list(dict.fromkeys(s.series for s in selections if 0 < s.count < numel and numel > EXACT_UP_TO))
    samples = dict(zip(sampled, scores.samples(sampled, sample_step(numel)))) if sampled else {}
    pending: list[tuple[int, counting.Bracket]] = []  # (selection, bracket)
    allowance = gather_bytes
    for index, (series, count, low_first) in enumerate(selections):
        rank = numel - count + 1  # t is the rank-th smallest score
        bracket = _bracket(samples[series], numel, rank) if series in samples and 0 < count < numel else None
        if bracket is not None and bracket.gather and gather_bytes is not None:
            expected = _between_bytes(samples[series].numel(), numel, rank)
            if expected > allowance:  # gathered later, alone, in its own pass (see _cut)
                bracket = counting.Bracket(bracket.low, bracket.high, False)
            else:
                allowance -= expected
        if count <= 0:
            cuts[index] = _nothing(numel, low_first, device)
        elif count >= numel:
            cuts[index] = _everything(numel, low_first, device)
        elif bracket is None:
            cuts[index] = exact_cut(scores.span(series, 0, numel), count, low_first)
        else:
            pending.append((index, bracket))
    samples.clear()
    if not pending:  # no counting pass needed
        return cuts  # type: ignore[return-value]
    series = [selections[index].series for index, _ in pending]
    tallies = counting.tally(scores, series, [bracket for _, bracket in pending], block)
    for (index, bracket), tally in zip(pending, tallies):
        cuts[index] = _cut(scores, selections[index], bracket, tally, block)
    return cuts  # type: ignore[return-value]


def _between_bytes(size: int, numel: int, rank: int) -> int:
    """Expected bytes gathered strictly inside a selection's bracket: its share of the sample's ranks × numel,
    at 4 bytes of value and 8 of index each."""
    low, high = bracket_ranks(rank, numel, size)
    return int((high - low + 1) / size * numel * 12)


def _cut(
    scores: counting.Scores, selection: Selection, bracket: counting.Bracket, tally: counting.Tally, block: int
) -> tuple[torch.Tensor, int]:
    """(t, c) from a selection's tally: t at low, at high, or selected among the entries strictly between (a
    second pass gathers them when the first did not); the exact selection when t is outside the bracket."""
    import torch

    series, count, low_first = selection
    rank = scores.numel - count + 1
    below_low, at_most_low, below_high, at_most_high = tally.totals
    if not tally.nan_free or not below_low < rank <= at_most_high:  # a NaN, or t outside the bracket
        return exact_cut(scores.span(series, 0, scores.numel), count, low_first)
    if rank <= at_most_low:
        threshold, below, at_most, ties = bracket.low, below_low, at_most_low, tally.ties(0)
    elif rank > below_high:
        threshold, below, at_most, ties = bracket.high, below_high, at_most_high, tally.ties(2)
    else:  # strictly between: select among the entries there
        if tally.between is None:
            gathering = counting.Bracket(bracket.low, bracket.high, True)
            tally = counting.tally(scores, [series], [gathering], block)[0]
        values, positions = tally.between
        threshold = values.kthvalue(rank - at_most_low).values
        tied = positions[values == threshold]
        kept = at_most_low + int(torch.count_nonzero(values <= threshold)) - rank + 1
        return threshold, int(tied[kept - 1] if low_first else tied[tied.numel() - kept])
    # the kept ties are m = #{s ≤ t} − (r − 1) of the #{s ≤ t} − #{s < t} entries equal to t
    kept = at_most - rank + 1
    nth = kept if low_first else at_most - below - kept + 1
    return threshold, counting.nth_tie(scores, series, threshold, ties, nth)
