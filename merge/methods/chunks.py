"""Reductions per fixed chunk of a flat block: how the streamed methods (model_stock, sce, nuslerp, multislerp,
karcher) take a whole tensor's norms and dot products from row blocks with the same bits as from the whole
tensor.

A tensor's statistic is reduced per :data:`STAT_CHUNK` consecutive entries, then the chunks' values are combined
once. A block starts on a chunk (row blocks start on multiples of ``ALIGN_ENTRIES``), so a chunk's value does
not depend on the block it is read in, and blocks side by side give the whole tensor's chunk values.

A sum over rows (a column's sums, a mean row) is reduced per chunk of :data:`ROW_CHUNK` rows and the chunks
added in row order (:class:`RowSums`), with the same bits whatever the row blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

# torch is imported inside the function: start-up cost (mergescope --help, the TUI's first screen)
if TYPE_CHECKING:  # pragma: no cover
    import torch

#: entries per chunk (one ALIGN_ENTRIES unit of a row block)
STAT_CHUNK = 1 << 12


def per_chunk(x: torch.Tensor, reduce: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``reduce`` (over the last dimension) of each :data:`STAT_CHUNK`-entry chunk of ``x``'s last dimension, and
    of a shorter tail: ``x`` is [..., entries] starting on a chunk, the result [..., chunks]."""
    import torch

    lead, entries = x.shape[:-1], x.shape[-1]
    full = entries // STAT_CHUNK * STAT_CHUNK
    parts = [reduce(x[..., :full].reshape(*lead, -1, STAT_CHUNK))]
    if full < entries:
        parts.append(reduce(x[..., full:].reshape(*lead, 1, -1)))
    return torch.cat(parts, dim=-1)


def chunk_sums(x: torch.Tensor) -> torch.Tensor:
    """Σ x per chunk of the last dimension."""
    return per_chunk(x, lambda y: y.sum(dim=-1))


def chunk_norms(x: torch.Tensor) -> torch.Tensor:
    """‖x‖₂ per chunk of the last dimension."""
    import torch

    return per_chunk(x, lambda y: torch.linalg.vector_norm(y, dim=-1))


#: rows per chunk of a sum over rows (nuslerp's column vectors, a padded vocabulary's mean row)
ROW_CHUNK = 64


class RowSums:
    """Σ over rows of values fed as row blocks ``[*lead, rows, width]`` in row order, with the same bits for any
    split into blocks: each chunk of :data:`ROW_CHUNK` consecutive rows (the last may be shorter) is summed in
    float32, then the chunks' sums are added one after another, in row order, into a ``dtype`` total (which
    starts at zero: 0 + s is s). A chunk split between two blocks is completed from the next: fewer than
    ROW_CHUNK rows are carried, so memory is one block and that carry."""

    def __init__(self, lead: tuple[int, ...], width: int, device, dtype=None) -> None:
        import torch

        self.total = torch.zeros(*lead, width, dtype=dtype or torch.float32, device=device)
        self.carry = None  # the rows of the chunk begun in the last block
        self.rows = 0

    def _fold(self, values) -> None:
        """Add the chunks of ``values`` ([*lead, chunks·k, width], k = ROW_CHUNK or the tail's length)."""
        count = values.shape[-2]
        length = min(count, ROW_CHUNK)
        lead, width = values.shape[:-2], values.shape[-1]
        # the chunk's rows made the last dimension: a reduction over contiguous entries, as per_chunk does
        sums = values.reshape(*lead, count // length, length, width).transpose(-1, -2).contiguous().sum(dim=-1)
        for k in range(sums.shape[-2]):  # in place: a new total per chunk, kept across it, fragments the heap
            self.total += sums[..., k, :].to(self.total.dtype)

    def add(self, values) -> None:
        """The next rows (float32)."""
        import torch

        self.rows += values.shape[-2]
        if self.carry is not None:
            values = torch.cat([self.carry, values], dim=-2)
        full = values.shape[-2] // ROW_CHUNK * ROW_CHUNK
        if full:
            self._fold(values[..., :full, :])
        self.carry = values[..., full:, :].clone() if full < values.shape[-2] else None

    def finish(self):
        """The total over every row added."""
        if self.carry is not None:
            self._fold(self.carry)
            self.carry = None
        return self.total


class SideBySide:
    """Per-block results ``[..., k]`` (or 0-dim) side by side along the last dimension — what ``torch.cat`` of
    them along it (``torch.stack`` of 0-dim ones) gives — kept in one tensor that grows by doubling.

    A pass's small per-block results kept in a list until its end fragment glibc's heap, so that the freed
    temporaries of the next block no longer fit where they were (``checkpoints/heap.py``); one tensor,
    reallocated a few times, does not. The values are copies: the same bits as the list's ``cat``."""

    def __init__(self) -> None:
        self.values = None
        self.filled = 0

    def append(self, part) -> None:
        import torch

        part = part.reshape(1) if part.dim() == 0 else part
        width = part.shape[-1]
        if self.values is None or self.filled + width > self.values.shape[-1]:
            grown = torch.empty((*part.shape[:-1], max(2 * (self.filled + width), 1024)), dtype=part.dtype,
                                device=part.device)
            if self.values is not None:
                grown[..., : self.filled] = self.values[..., : self.filled]
            self.values = grown
        self.values[..., self.filled : self.filled + width] = part
        self.filled += width

    def cat(self):
        """Every part appended, side by side (contiguous)."""
        return self.values[..., : self.filled].contiguous()
