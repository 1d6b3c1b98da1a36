"""The counting pass of :mod:`~mergescope.merge.magnitude_trim`: where the threshold of a streamed selection
lies relative to a bracket [low, high], from one pass over blocks of a per-entry float32 score (TIES' |τ|,
Breadcrumbs' |τ|, sce's variance across models, arcee_fusion's importance).

A score source (:class:`Scores`) gives each of its series block by block. Non-negative scores are counted on
their bit patterns: for non-negative IEEE floats (NaN after ``abs`` included, above +∞) the int32 view orders
exactly as the values, so #{s < b} = −Σ ((bits − bits(b)) >> 31) — an integer subtract, an arithmetic shift and
an integer sum, three times faster on a CPU than a float comparison into a boolean tensor and its count. No
difference overflows: both operands lie in [0, 2³¹). A score that may be negative (``signed``) is counted by
float comparisons instead (−0 = +0, as the selection and the masks compare). The counts are kept per
:data:`CHUNK` of consecutive entries, so a tied entry is later looked for again in one chunk only.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

# torch is imported inside the functions that use it: start-up cost (mergescope --help, the TUI's first screen)
if TYPE_CHECKING:  # pragma: no cover
    import torch

#: entries per block of the counting pass (4 MB of float32) on a CPU; GPUs take 4× as many per block
BLOCK = 1 << 20
#: entries per chunk of the counts; a block is a whole number of chunks
CHUNK = 1 << 12

_scratch = threading.local()


def block_size(device: torch.device) -> int:
    """Entries per block of the counting pass on ``device``."""
    return BLOCK if device.type == "cpu" else BLOCK * 4


def abs_task_vector(model: torch.Tensor, base: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """|τ| = |f32(model) − f32(base)| in float32 (fresh, or written into ``out``); exact for bf16 and fp16."""
    import torch

    tau = model.to(torch.float32, copy=True) if out is None else out.copy_(model)
    return tau.sub_(base if base.dtype != torch.float64 else base.float()).abs_()


def scratch_buffers(numel: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Two float32 and two int32 buffers of ``numel`` entries, kept per thread for reuse on a CPU: a fresh
    4 MB buffer costs a millisecond of page faults, as much as counting a million entries."""
    import torch

    dtypes = (torch.float32, torch.float32, torch.int32, torch.int32)
    if device.type != "cpu":
        return tuple(torch.empty(numel, dtype=dtype, device=device) for dtype in dtypes)
    kept = getattr(_scratch, "buffers", None)
    if kept is None or kept[0].numel() < numel:
        kept = _scratch.buffers = tuple(torch.empty(numel, dtype=dtype) for dtype in dtypes)
    return tuple(buffer[:numel] for buffer in kept)


def bits_of(value: torch.Tensor) -> int:
    """The int32 bit pattern of a non-negative float32 0-dim tensor."""
    import torch

    return int(value.reshape(1).view(torch.int32))


class FlatBlocks(Protocol):
    """A base and models of one tensor seen as flat float tensors, block by block: in memory
    (:class:`TensorBlocks`) or read from checkpoints a row range at a time (the executor's streamed pass).

    Blocks cover the tensor in order; each starts at a whole number of :data:`CHUNK` entries.
    """

    numel: int
    device: torch.device
    gather_bytes: int | None  # what a pass may gather besides its blocks (None: no limit)

    def blocks(self, models: list[int]) -> Iterator[tuple[int, torch.Tensor, list[torch.Tensor]]]:
        """(flat start, base block, blocks of ``models`` (indices)) in order, any float dtype."""

    def span(self, model: int | None, start: int, stop: int) -> torch.Tensor:
        """Flat entries ``start:stop`` of the base (``model`` None) or of model ``model``."""


class TensorBlocks:
    """:class:`FlatBlocks` over tensors in memory, ``block`` entries at a time."""

    def __init__(self, base: torch.Tensor, models: list[torch.Tensor], block: int) -> None:
        self.base, self.models = base.reshape(-1), [model.reshape(-1) for model in models]
        self.numel, self.device, self.block = self.base.numel(), base.device, block
        self.gather_bytes = None

    def blocks(self, models: list[int]) -> Iterator[tuple[int, torch.Tensor, list[torch.Tensor]]]:
        for start in range(0, self.numel, self.block):
            stop = min(start + self.block, self.numel)
            yield start, self.base[start:stop], [self.models[i][start:stop] for i in models]

    def span(self, model: int | None, start: int, stop: int) -> torch.Tensor:
        return (self.base if model is None else self.models[model])[start:stop]


class Scores(Protocol):
    """Series of per-entry float32 scores over the flat entries of one tensor, given block by block: the input
    of a streamed selection (:func:`~mergescope.merge.magnitude_trim.select_cuts`). ``signed``: a score may be
    negative (then it is counted by float comparisons); otherwise every score is ≥ +0 or NaN."""

    numel: int
    device: torch.device
    gather_bytes: int | None  # what a pass may gather besides its blocks (None: no limit)
    signed: bool

    def blocks(self, series: list[int], block: int) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(flat start, position in ``series``, scores) for every block of at most ``block`` entries (a whole
        number of :data:`CHUNK`), each series in turn, in flat order; the scores are valid until the next."""

    def span(self, series: int, start: int, stop: int) -> torch.Tensor:
        """The scores of entries ``start:stop`` of one series (a fresh float32 tensor)."""

    def samples(self, series: list[int], step: int) -> list[torch.Tensor]:
        """Each series' scores at flat entries 0, step, 2·step, …"""


class TaskMagnitudes:
    """:class:`Scores` |τᵢ| = |f32(model i) − f32(base)| of the models of a :class:`FlatBlocks` source: each
    block of the base converted to float32 once for all models, |τ| formed in reused scratch."""

    signed = False

    def __init__(self, source: FlatBlocks) -> None:
        self.source = source
        self.numel, self.device, self.gather_bytes = source.numel, source.device, source.gather_bytes

    def blocks(self, series: list[int], block: int) -> Iterator[tuple[int, int, torch.Tensor]]:
        import torch

        base_buffer, magnitude_buffer = scratch_buffers(min(block, self.numel), self.device)[:2]
        for first, base, models in self.source.blocks(series):
            for offset in range(0, base.numel(), block):
                stop = min(offset + block, base.numel())
                base_block, magnitude = base_buffer[: stop - offset], magnitude_buffer[: stop - offset]
                base_block.copy_(base[offset:stop])
                for index, model in enumerate(models):
                    torch.sub(magnitude.copy_(model[offset:stop]), base_block, out=magnitude).abs_()
                    yield first + offset, index, magnitude

    def span(self, series: int, start: int, stop: int) -> torch.Tensor:
        return abs_task_vector(self.source.span(series, start, stop), self.source.span(None, start, stop))

    def samples(self, series: list[int], step: int) -> list[torch.Tensor]:
        """The bits of ``abs_task_vector(model[::step], base[::step])``, from one pass over the source's blocks
        that forms |τ| at the sampled entries only (written in place, as :func:`strided_samples`)."""
        import torch

        samples = torch.empty((len(series), -(-self.numel // step)), dtype=torch.float32, device=self.device)
        for start, base, blocks in self.source.blocks(series):
            first = -start % step
            picked, at = base[first::step], (start + first) // step
            for index, block in enumerate(blocks):
                abs_task_vector(block[first::step], picked, out=samples[index, at : at + picked.numel()])
        return list(samples)


class BlockScores:
    """:class:`Scores` computed by ``score(start, base, models)`` — float32 scores of each series for a block of a
    :class:`FlatBlocks` source whose first entry is flat entry ``start`` (base and ``models`` blocks in any float
    dtype) — from one read of the source's blocks; a score may depend only on its own entry (given ``start``).
    ``elementwise``: it depends on the entry's inputs alone, not on ``start``, so the strided samples are scored
    from the sampled inputs only."""

    def __init__(self, source: FlatBlocks, models: list[int], score, *, signed: bool = False,
                 elementwise: bool = False) -> None:
        self.source, self.models, self.score, self.signed = source, models, score, signed
        self.elementwise = elementwise
        self.numel, self.device, self.gather_bytes = source.numel, source.device, source.gather_bytes

    def blocks(self, series: list[int], block: int) -> Iterator[tuple[int, int, torch.Tensor]]:
        for first, base, models in self.source.blocks(self.models):
            scores = self.score(first, base, models)
            for offset in range(0, base.numel(), block):
                for index, one in enumerate(series):
                    yield first + offset, index, scores[one][offset : offset + block]

    def span(self, series: int, start: int, stop: int) -> torch.Tensor:
        models = [self.source.span(model, start, stop) for model in self.models]
        return self.score(start, self.source.span(None, start, stop), models)[series]

    def samples(self, series: list[int], step: int) -> list[torch.Tensor]:
        import torch

        if not self.elementwise:
            return strided_samples(self, series, step)
        parts: list[list] = [[] for _ in series]
        for start, base, models in self.source.blocks(self.models):
            first = -start % step
            scores = self.score(None, base[first::step], [model[first::step] for model in models])
            for part, one in zip(parts, series):
                part.append(scores[one])
        return [torch.cat(part) for part in parts]


class TensorScores:
    """:class:`Scores` held in memory (flat float32 tensors), ``block`` entries at a time: the whole-tensor path
    of a selection runs the same code as the streamed one."""

    def __init__(self, scores: list[torch.Tensor], block: int, *, signed: bool = False) -> None:
        self.scores = [score.reshape(-1) for score in scores]
        self.numel, self.device, self.block = self.scores[0].numel(), self.scores[0].device, block
        self.gather_bytes, self.signed = None, signed

    def blocks(self, series: list[int], block: int) -> Iterator[tuple[int, int, torch.Tensor]]:
        for start in range(0, self.numel, block):
            for index, one in enumerate(series):
                yield start, index, self.scores[one][start : start + block]

    def span(self, series: int, start: int, stop: int) -> torch.Tensor:
        return self.scores[series][start:stop].clone()

    def samples(self, series: list[int], step: int) -> list[torch.Tensor]:
        return [self.scores[one][::step].contiguous() for one in series]


def strided_samples(scores: Scores, series: list[int], step: int) -> list[torch.Tensor]:
    """Each series' scores at flat entries 0, step, 2·step, … from one pass over its blocks, written in place into
    the samples: nothing small is kept per block between the blocks' freed temporaries, which would fragment
    the heap (the executor lets glibc keep freed memory) and grow it by about a block per block."""
    import torch

    samples = torch.empty((len(series), -(-scores.numel // step)), dtype=torch.float32, device=scores.device)
    for start, index, block in scores.blocks(series, block_size(scores.device)):
        first = -start % step
        picked = block[first::step]
        at = (start + first) // step
        samples[index, at : at + picked.numel()] = picked
    return list(samples)


@dataclass
class Tally:
    """What one pass found: per chunk, #{s < low}, #{s ≤ low}, #{s < high}, #{s ≤ high} (rows of ``counts``);
    the entries strictly between low and high with their flat indices, when gathered; and whether no score
    was NaN."""

    counts: torch.Tensor  # int64 [4, chunks]
    between: tuple[torch.Tensor, torch.Tensor] | None  # (values, flat indices), in flat order
    nan_free: bool
    totals: list[int] = field(init=False)  # the four counts over the whole tensor

    def __post_init__(self) -> None:
        self.totals = self.counts.sum(dim=1).tolist()

    def ties(self, row: int) -> torch.Tensor:
        """Per chunk, the entries equal to low (``row`` 0) or to high (``row`` 2): #{≤ b} − #{< b}."""
        return self.counts[row + 1] - self.counts[row]


@dataclass
class Bracket:
    """[low, high] for one selection's threshold, and whether the pass gathers the entries strictly between."""

    low: torch.Tensor
    high: torch.Tensor
    gather: bool


class _Counter:
    """One selection's counts, filled block by block (:func:`tally`)."""

    def __init__(self, bracket: Bracket, numel: int, device: torch.device, signed: bool) -> None:
        import torch

        self.signed = signed
        self.low, self.high = float(bracket.low), float(bracket.high)
        self.lo, self.hi = (0, 0) if signed else (bits_of(bracket.low), bits_of(bracket.high))
        same = self.low == self.high if signed else self.lo == self.hi
        self.same = same
        self.bounds = (self.lo, self.lo + 1) if same else (self.lo, self.lo + 1, self.hi, self.hi + 1)
        self.gather = bracket.gather
        self.counts = torch.empty((len(self.bounds), -(-numel // CHUNK)), dtype=torch.int32, device=device)
        self.sums = None  # Σ s over the blocks so far (one running 0-dim tensor): NaN if any entry is
        self.values: torch.Tensor | None = None  # the entries gathered so far, in [: self.filled]
        self.positions: torch.Tensor | None = None
        self.filled = 0

    def count(self, start: int, scores: torch.Tensor, scratch: torch.Tensor, kept: torch.Tensor) -> None:
        """Count one block of scores (flat entries from ``start``), using two int32 scratch blocks."""
        import torch

        total = scores.sum()
        self.sums = total if self.sums is None else self.sums.add_(total)
        chunks = slice(start // CHUNK, -(-(start + scores.numel()) // CHUNK))
        if self.signed:
            self._count_floats(start, scores, chunks, scratch)
            return
        bits = scores.view(torch.int32)
        between = self.gather and not self.same
        for row, bound in enumerate(self.bounds):  # −[bits < bound], counted per chunk
            out = kept if between and row == 1 else scratch
            torch.sub(bits, bound, out=out).bitwise_right_shift_(31)
            chunk_sums(out, self.counts[row, chunks])
            if between and row == 2:  # [bits < hi] − [bits ≤ lo] is 1 exactly strictly between
                self._gather(scores, kept.sub_(out).nonzero().reshape(-1), start)

    def _count_floats(self, start: int, scores: torch.Tensor, chunks: slice, scratch: torch.Tensor) -> None:
        """The counts of a ``signed`` series by float comparisons, stored negated as the bit counts are."""
        import torch

        bounds = [(torch.lt, self.low), (torch.le, self.low), (torch.lt, self.high), (torch.le, self.high)]
        for row, (compare, bound) in enumerate(bounds[: len(self.bounds)]):
            torch.neg(compare(scores, bound).to(torch.int32), out=scratch)
            chunk_sums(scratch, self.counts[row, chunks])
        if self.gather and not self.same:
            self._gather(scores, ((scores > self.low) & (scores < self.high)).nonzero().reshape(-1), start)

    def _gather(self, scores: torch.Tensor, inside: torch.Tensor, start: int) -> None:
        """Append the entries ``inside`` (indices in the block) and their flat indices to the gathered ones, in
        buffers grown by doubling: one piece kept per block between the blocks' freed temporaries would fragment
        the heap (see :func:`strided_samples`)."""
        import torch

        count, filled = inside.numel(), self.filled
        if self.values is None or filled + count > self.values.numel():
            capacity = max(2 * (filled + count), 1 << 16)
            values = torch.empty(capacity, dtype=torch.float32, device=scores.device)
            positions = torch.empty(capacity, dtype=torch.int64, device=scores.device)
            if self.values is not None:
                values[:filled], positions[:filled] = self.values[:filled], self.positions[:filled]
            self.values, self.positions = values, positions
        torch.index_select(scores, 0, inside, out=self.values[filled : filled + count])
        torch.add(inside, start, out=self.positions[filled : filled + count])
        self.filled += count

    def finish(self) -> Tally:
        import torch

        counts = self.counts.to(torch.int64).neg_()
        if self.same:
            counts = counts.repeat(2, 1)
        gathered = None
        if self.gather:
            if self.values is None:
                gathered = (torch.empty(0, dtype=torch.float32, device=counts.device),
                            torch.empty(0, dtype=torch.int64, device=counts.device))
            else:
                gathered = (self.values[: self.filled], self.positions[: self.filled])
        nan_free = self.sums is None or not bool(self.sums.isnan())
        return Tally(counts, gathered, nan_free)


def tally(scores: Scores, series: list[int], brackets: list[Bracket], block: int) -> list[Tally]:
    """One pass over ``scores`` in blocks of at most ``block`` entries: the :class:`Tally` of selection k — the
    scores of series ``series[k]`` against ``brackets[k]`` (several selections may count one series; each
    series is formed once per block).

    ``block`` must be a whole number of :data:`CHUNK` entries.
    """
    numel, device = scores.numel, scores.device
    assert block % CHUNK == 0, "a block is a whole number of chunks"
    counters = [_Counter(bracket, numel, device, scores.signed) for bracket in brackets]
    distinct = list(dict.fromkeys(series))
    by_series: list[list[_Counter]] = [[] for _ in distinct]
    for one, counter in zip(series, counters):
        by_series[distinct.index(one)].append(counter)
    scratch_block, kept_block = scratch_buffers(min(block, numel), device)[2:]
    for start, index, block_scores in scores.blocks(distinct, block):
        scratch, kept = scratch_block[: block_scores.numel()], kept_block[: block_scores.numel()]
        for counter in by_series[index]:
            counter.count(start, block_scores, scratch, kept)
    return [counter.finish() for counter in counters]


def chunk_sums(values: torch.Tensor, out: torch.Tensor) -> None:
    """Σ of each :data:`CHUNK` of consecutive ``values`` (the last may be shorter) into int32 ``out``."""
    import torch

    full = values.numel() // CHUNK * CHUNK
    if full:
        torch.sum(values[:full].view(-1, CHUNK), 1, dtype=torch.int32, out=out[: full // CHUNK])
    if full < values.numel():
        torch.sum(values[full:], 0, dtype=torch.int32, out=out[-1])


def nth_tie(scores: Scores, series: int, threshold: torch.Tensor, ties: torch.Tensor, nth: int) -> int:
    """Flat index of the ``nth`` (1-based) entry of series ``series`` whose score equals ``threshold``, given the
    number of such entries per chunk: the chunk holding it is formed again and searched."""
    import torch

    reached = torch.cumsum(ties, dim=0)
    chunk = int(torch.searchsorted(reached, torch.tensor([nth], dtype=reached.dtype, device=reached.device)))
    nth -= int(reached[chunk] - ties[chunk])
    start = chunk * CHUNK
    stop = min(start + CHUNK, scores.numel)
    return start + int((scores.span(series, start, stop) == threshold).nonzero()[nth - 1])
