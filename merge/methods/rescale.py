"""The L1 rescale of the task-arithmetic family's trims, ‖τ‖₁ / ‖τ ⊙ m‖₁ per model, from one reduction that
whole tensors and row blocks share.

Any trim that gives the keep mask m of flat entries start:stop from those entries' |τ| — ``trim.block(start,
stop).keep(|τ|)``: a threshold and tie cut (TIES), a random drop (DARE, DELLA; DELLA's blocks hold whole rows),
an explicit mask — is rescaled here: |τ| and |τ ⊙ m| are summed per
:data:`~mergescope.merge.methods.chunks.STAT_CHUNK` chunk (:func:`~mergescope.merge.l1_chunk_sums`),
block by block, and the chunks' sums combined once (:func:`~mergescope.merge.l1_rescale_from_sums`).
Blocks start on chunks (row blocks start on multiples of ``ALIGN_ENTRIES``), so the streamed pass
(:func:`streamed_rescale`, a pass over the executor's row blocks) gives the bits of the whole-tensor one
(:func:`whole_rescale`), with one block of |τ| and one block's mask in memory at a time.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING

from mergescope.merge.magnitude_counts import abs_task_vector
from mergescope.merge.methods.chunks import STAT_CHUNK, chunk_sums

# torch is imported inside the functions that use it: start-up cost (mergescope --help, the TUI's first screen)
if TYPE_CHECKING:  # pragma: no cover
    import torch


def l1_chunk_sums(magnitude: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ|τ|, Σ|τ ⊙ m|) per :data:`~.chunks.STAT_CHUNK` chunk of the flat float32
    ``magnitude`` |τ| and boolean ``keep`` m of a block starting on a chunk: blocks side by side give the whole
    tensor's chunk sums, bit for bit."""
    flat = magnitude.reshape(-1)
    return chunk_sums(flat), chunk_sums(flat * keep.reshape(-1))


def l1_rescale_from_sums(before: torch.Tensor, after: torch.Tensor, eps: float = 1e-7) -> torch.Tensor | None:
    """‖τ‖₁ / ‖τ ⊙ m‖₁ from the chunk sums of :func:`l1_chunk_sums` (all chunks of the tensor, in any blocks), as
    a float32 0-dim tensor, or None when either norm is below ``eps`` (then no rescale).

    Each norm is the exactly rounded float64 sum of its chunks (``math.fsum``: independent of order and of
    torch's threads), the quotient rounded to float32. mergekit's ``rescale`` is ``(τ ⊙ m) · factor``: it
    matches L1 norms rather than dividing by the keep probability (for DARE the factor is close to 1/density
    on large tensors, not equal to it). Computed apart from the product, the factor lets a merge apply the
    rescale block by block.
    """
    import torch

    total, kept = math.fsum(before.double().tolist()), math.fsum(after.double().tolist())
    if not (total >= eps and kept >= eps):  # a NaN never rescales
        return None
    return torch.tensor(total / kept, dtype=torch.float32, device=before.device)


def l1_rescale_factor(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-7) -> torch.Tensor | None:
    """‖τ‖₁ / ‖τ ⊙ m‖₁ of a whole τ (``values``) and mask (:func:`l1_rescale_from_sums` of its chunk sums)."""
    return l1_rescale_from_sums(*l1_chunk_sums(values.float().abs(), mask.bool()), eps)


def rescaled(trim, before: torch.Tensor, after: torch.Tensor):
    """``trim`` with the rescale factor of its chunk sums (:func:`block_sums` of every chunk of the tensor)."""
    return replace(trim, scale=l1_rescale_from_sums(before, after))


def block_sums(trim, magnitude: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ|τ|, Σ|τ ⊙ m|) per chunk of the block of |τ| ``magnitude`` (flat entries ``start …``; whole rows
    for a trim with a ``row_numel``), m from ``trim``."""
    keep = trim.block(start, start + magnitude.numel()).keep(magnitude)
    return l1_chunk_sums(magnitude, keep)


def whole_rescale(trims: list, base: torch.Tensor, models: list[torch.Tensor], which: list[int]) -> list:
    """``trims`` with the rescale factors of models ``which``, from their whole tensors."""
    trims = list(trims)
    for i in which:
        magnitude = abs_task_vector(models[i], base)  # τ's shape: a DELLA trim ranks its rows
        trims[i] = rescaled(trims[i], *block_sums(trims[i], magnitude, 0))
        del magnitude
    return trims


def streamed_rescale(trims: list, source, which: list[int]) -> list:
    """``trims`` with the rescale factors of models ``which``, from one pass over the row blocks of ``source``
    (a :class:`~mergescope.merge.magnitude_counts.FlatBlocks` whose blocks hold whole rows and start on chunks).
    The chunk sums go into two tensors per model allocated up front: small tensors kept from every block would
    split the heap's freed block-sized temporaries, and the heap grew by a block per block (measured)."""
    import torch

    trims = list(trims)
    if not which:
        return trims
    chunks = -(-source.numel // STAT_CHUNK)
    sums = {i: torch.empty((2, chunks), dtype=torch.float32, device=source.device) for i in which}
    for start, base, blocks in source.blocks(which):
        assert start % STAT_CHUNK == 0, "blocks start on chunks"
        first = start // STAT_CHUNK
        for i, block in zip(which, blocks):
            before, after = block_sums(trims[i], abs_task_vector(block, base), start)
            sums[i][0, first : first + before.numel()] = before
            sums[i][1, first : first + after.numel()] = after
    for i in which:
        trims[i] = rescaled(trims[i], sums[i][0], sums[i][1])
    return trims
