"""Reductions per fixed chunk of a flat block: how the streamed methods (model_stock, sce, nuslerp, multislerp)
take a whole tensor's norms and dot products from row blocks with the same bits as from the whole tensor.

A tensor's statistic is reduced per :data:`STAT_CHUNK` consecutive entries, then the chunks' values are combined
once. A block starts on a chunk (row blocks start on multiples of ``ALIGN_ENTRIES``), so a chunk's value does
not depend on the block it is read in, and blocks side by side give the whole tensor's chunk values.
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
