"""The counting pass of :mod:`~mergescope.merge.magnitude_trim`: where the threshold of a TIES trim lies
relative to a bracket [low, high], from one pass over blocks of |τ|.

Counts use the bit patterns of |τ|: for non-negative IEEE floats (NaN after ``abs`` included, above +∞) the
int32 view orders exactly as the values, so #{|τ| < b} = −Σ ((bits − bits(b)) >> 31) — an integer subtract,
an arithmetic shift and an integer sum, three times faster on a CPU than a float comparison into a boolean
tensor and its count. No difference overflows: both operands lie in [0, 2³¹). The counts are kept per
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


@dataclass
class Tally:
    """What one pass found: per chunk, #{|τ| < low}, #{|τ| ≤ low}, #{|τ| < high}, #{|τ| ≤ high} (rows of
    ``counts``); the entries strictly between low and high with their flat indices, when gathered; and
    whether no |τ| was NaN."""

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
    """[low, high] for one model's |τ|, and whether the pass gathers the entries strictly between."""

    low: torch.Tensor
    high: torch.Tensor
    gather: bool


class _Counter:
    """One model's counts, filled block by block (:func:`tally`)."""

    def __init__(self, bracket: Bracket, numel: int, device: torch.device) -> None:
        import torch

        self.lo, self.hi = bits_of(bracket.low), bits_of(bracket.high)
        self.bounds = (self.lo, self.lo + 1) if self.lo == self.hi else (self.lo, self.lo + 1, self.hi, self.hi + 1)
        self.gather = bracket.gather
        self.counts = torch.empty((len(self.bounds), -(-numel // CHUNK)), dtype=torch.int32, device=device)
        self.sums: list = []  # Σ|τ| per block: NaN if any entry is
        self.values: list = []
        self.positions: list = []

    def count(self, start: int, magnitude: torch.Tensor, scratch: torch.Tensor, kept: torch.Tensor) -> None:
        """Count one block of |τ| (flat entries from ``start``), using two int32 scratch blocks."""
        import torch

        self.sums.append(magnitude.sum())
        bits, chunks = magnitude.view(torch.int32), slice(start // CHUNK, -(-(start + magnitude.numel()) // CHUNK))
        between = self.gather and self.lo != self.hi
        for row, bound in enumerate(self.bounds):  # −[bits < bound], counted per chunk
            out = kept if between and row == 1 else scratch
            torch.sub(bits, bound, out=out).bitwise_right_shift_(31)
            chunk_sums(out, self.counts[row, chunks])
            if between and row == 2:  # [bits < hi] − [bits ≤ lo] is 1 exactly strictly between
                inside = kept.sub_(out).nonzero().reshape(-1)
                self.values.append(magnitude[inside])
                self.positions.append(inside.add_(start))

    def finish(self) -> Tally:
        import torch

        counts = self.counts.to(torch.int64).neg_()
        if self.lo == self.hi:
            counts = counts.repeat(2, 1)
        gathered = None
        if self.gather:
            device = counts.device
            values = self.values or [torch.empty(0, dtype=torch.float32, device=device)]
            positions = self.positions or [torch.empty(0, dtype=torch.int64, device=device)]
            gathered = (torch.cat(values), torch.cat(positions))
        nan_free = not self.sums or not bool(torch.stack(self.sums).isnan().any())
        return Tally(counts, gathered, nan_free)


def tally(source: FlatBlocks, models: list[int], brackets: list[Bracket], block: int) -> list[Tally]:
    """One pass over ``source`` in blocks of at most ``block`` entries: the :class:`Tally` of |τ| of each of
    ``models`` (indices into the source) against its bracket. Each block of the base is converted to float32
    once for all models.

    ``block`` must be a whole number of :data:`CHUNK` entries.
    """
    import torch

    numel, device = source.numel, source.device
    assert block % CHUNK == 0, "a block is a whole number of chunks"
    counters = [_Counter(bracket, numel, device) for bracket in brackets]
    buffers = scratch_buffers(min(block, numel), device)
    for first, base, blocks in source.blocks(models):
        for offset in range(0, base.numel(), block):
            stop = min(offset + block, base.numel())
            base_block, magnitude, scratch, kept = (buffer[: stop - offset] for buffer in buffers)
            base_block.copy_(base[offset:stop])
            for model, counter in zip(blocks, counters):
                torch.sub(magnitude.copy_(model[offset:stop]), base_block, out=magnitude).abs_()
                counter.count(first + offset, magnitude, scratch, kept)
    return [counter.finish() for counter in counters]


def chunk_sums(values: torch.Tensor, out: torch.Tensor) -> None:
    """Σ of each :data:`CHUNK` of consecutive ``values`` (the last may be shorter) into int32 ``out``."""
    import torch

    full = values.numel() // CHUNK * CHUNK
    if full:
        torch.sum(values[:full].view(-1, CHUNK), 1, dtype=torch.int32, out=out[: full // CHUNK])
    if full < values.numel():
        torch.sum(values[full:], 0, dtype=torch.int32, out=out[-1])


def nth_tie(source: FlatBlocks, model: int, threshold: torch.Tensor, ties: torch.Tensor, nth: int) -> int:
    """Flat index of the ``nth`` (1-based) entry with |τ| = t of model ``model``, given the number of such
    entries per chunk: the chunk holding it is formed again and searched."""
    import torch

    reached = torch.cumsum(ties, dim=0)
    chunk = int(torch.searchsorted(reached, torch.tensor([nth], dtype=reached.dtype, device=reached.device)))
    nth -= int(reached[chunk] - ties[chunk])
    start = chunk * CHUNK
    stop = min(start + CHUNK, source.numel)
    magnitude = abs_task_vector(source.span(model, start, stop), source.span(None, start, stop))
    return start + int((magnitude == threshold).nonzero()[nth - 1])
