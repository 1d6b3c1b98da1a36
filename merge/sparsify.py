"""Sparsification of task vectors: which entries a trimming merge keeps.

Shared by the merge methods (TIES and relatives) and by the analysis, which counts sign conflicts after
the same trim, so a preview and a merge can never disagree.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch


def keep_count(numel: int, density: float) -> int:
    """k = ⌊density · numel⌋: how many entries a top-``density`` trim keeps (mergekit's rounding)."""
    return int(density * numel)


def magnitude_mask(values: "torch.Tensor", density: float) -> "torch.Tensor":
    """Boolean mask of the k = ⌊density·numel⌋ entries of largest |value|.

    Exactly k entries are kept. The threshold is found by selection (``kthvalue``, linear time), not by
    sorting; entries whose magnitude equals the threshold are taken in index order until k are kept, so
    the mask is deterministic on every device.
    """
    import torch

    flat = values.reshape(-1)
    numel = flat.numel()
    k = keep_count(numel, density)
    if k >= numel:
        return torch.ones_like(values, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(values, dtype=torch.bool)
    magnitude = flat.abs()
    if magnitude.dtype not in (torch.float32, torch.float64):
        magnitude = magnitude.float()
    threshold = magnitude.kthvalue(numel - k + 1).values
    mask = magnitude > threshold
    missing = k - int(mask.sum())
    if missing > 0:
        tied = (magnitude == threshold).nonzero().reshape(-1)[:missing]
        mask[tied] = True
    return mask.reshape(values.shape)
